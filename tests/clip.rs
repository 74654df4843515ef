//! CLIP text encoder vs the recorded diffusers / transformers prompt embeddings.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{max_abs_diff, model_dir, Case};
use stepstream::models::clip::{ClipTextConfig, ClipTextModel};
use stepstream::models::{ModelError, ModelSource};

/// The golden README's recommended text-encoder tolerance (max abs).
const TOL: f32 = 1e-5;

fn load(model: &str, component: &str) -> (ClipTextConfig, ClipTextModel) {
    let source = ModelSource::Dir(model_dir(model));
    let cfg = ClipTextConfig::load(&source, component).expect("config");
    let vb = source
        .var_builder(component, DType::F32, &Device::Cpu)
        .expect("weights");
    let model = ClipTextModel::new(vb, &cfg).expect("model");
    (cfg, model)
}

fn ids(case: &Case, key: &str) -> Vec<u32> {
    case.json["token_ids"][key]
        .as_array()
        .unwrap_or_else(|| panic!("token_ids.{key}"))
        .iter()
        .map(|v| v.as_u64().expect("token id") as u32)
        .collect()
}

fn batch(rows: &[&[u32]]) -> Tensor {
    let s = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), s), &Device::Cpu).unwrap()
}

/// SD1.5: prompt_embeds = last_hidden_state; under CFG the recorded tensor is [negative; positive].
fn check_sd15(case_name: &str) {
    let case = Case::load("tiny-sd15", case_name);
    let (_, model) = load("tiny-sd15", "text_encoder");
    assert!(!model.has_projection());
    let pos = ids(&case, "prompt");
    let neg = ids(&case, "negative_prompt");
    assert_eq!(pos.len(), 77);

    let both = model.forward(&batch(&[&neg, &pos])).unwrap();
    let expected = case.step_tensor(0, &["unet", "encoder_hidden_states"]);
    assert_eq!(expected.dims(), &[2, 77, 32]);
    let err = max_abs_diff(&both.last_hidden_state, &expected);
    println!("{case_name}: prompt_embeds [neg; pos] max abs err = {err:e}");
    assert!(err <= TOL, "{case_name}: prompt_embeds err {err}");

    let neg_expected = case.step_tensor(0, &["callback_in", "negative_prompt_embeds"]);
    let neg_only = model.forward(&batch(&[&neg])).unwrap();
    let err_neg = max_abs_diff(&neg_only.last_hidden_state, &neg_expected);
    println!("{case_name}: negative_prompt_embeds max abs err = {err_neg:e}");
    assert!(err_neg <= TOL);

    // Batch 2 in one call equals two batch-1 calls.
    let pos_only = model.forward(&batch(&[&pos])).unwrap();
    let separate = Tensor::cat(
        &[&neg_only.last_hidden_state, &pos_only.last_hidden_state],
        0,
    )
    .unwrap();
    let err_batch = max_abs_diff(&both.last_hidden_state, &separate);
    let separate_pooled = Tensor::cat(&[&neg_only.pooled, &pos_only.pooled], 0).unwrap();
    let err_pooled = max_abs_diff(&both.pooled, &separate_pooled);
    println!("{case_name}: batch-2 vs 2x batch-1: hidden {err_batch:e}, pooled {err_pooled:e}");
    assert!(err_batch <= 1e-6 && err_pooled <= 1e-6);

    // Pooled = the final-normed state at the first EOS of each row.
    let eos = pos.iter().position(|&t| t == 1513).unwrap();
    let want = both.last_hidden_state.i((1, eos)).unwrap();
    assert_eq!(max_abs_diff(&both.pooled.i(1).unwrap(), &want), 0.0);
    assert!(both.text_embeds.is_none());
    assert_eq!(both.penultimate_hidden_state.dims(), &[2, 77, 32]);
}

#[test]
fn sd15_prompt_embeds_ddim10() {
    check_sd15("ddim-10");
}

#[test]
fn sd15_prompt_embeds_neg_prompt() {
    check_sd15("neg-prompt");
}

/// SDXL text_encoder_2 (CLIPTextModelWithProjection, exact-erf gelu, pad id 0): the penultimate hidden state
/// is the last 48 channels of prompt_embeds, text_embeds is add_text_embeds. euler-10 has negative_prompt=None,
/// so the negative halves are zeros and only the positive row is encoded.
#[test]
fn sdxl_text_encoder_2_penultimate_and_text_embeds() {
    let case = Case::load("tiny-sdxl", "euler-10");
    let (cfg, model) = load("tiny-sdxl", "text_encoder_2");
    assert_eq!(cfg.hidden_act, "gelu");
    assert!(model.has_projection());
    let pos = ids(&case, "prompt_2");
    assert_eq!(pos[pos.len() - 1], 0, "tokenizer_2 pads with '!' (id 0)");

    let out = model.forward(&batch(&[&pos])).unwrap();
    let prompt_embeds = case.step_tensor(0, &["unet", "encoder_hidden_states"]);
    assert_eq!(prompt_embeds.dims(), &[2, 77, 80]);
    let want = prompt_embeds.i((1..2, .., 32..80)).unwrap();
    let err = max_abs_diff(&out.penultimate_hidden_state, &want);
    println!("sdxl euler-10: text_encoder_2 hidden_states[-2] max abs err = {err:e}");
    assert!(err <= TOL, "penultimate err {err}");

    let add_text_embeds = case.step_tensor(0, &["unet", "text_embeds"]);
    assert_eq!(add_text_embeds.dims(), &[2, 40]);
    let text_embeds = out.text_embeds.expect("projection");
    let err_te = max_abs_diff(&text_embeds, &add_text_embeds.i(1..2).unwrap());
    println!("sdxl euler-10: text_embeds (add_text_embeds) max abs err = {err_te:e}");
    assert!(err_te <= TOL, "text_embeds err {err_te}");

    // Batch 2 with a different second row still gives the same first row.
    let neg = ids(&case, "prompt");
    let two = model.forward(&batch(&[&pos, &neg])).unwrap();
    let err_b = max_abs_diff(&two.text_embeds.unwrap().i(0..1).unwrap(), &text_embeds);
    assert!(err_b <= 1e-6, "batch consistency {err_b}");
}

/// The tolerance separates exact-erf GELU from the tanh approximation: text_encoder_2 run with `gelu_new`
/// must miss the recorded add_text_embeds (the golden README measured ~2.3e-4).
#[test]
fn sdxl_tanh_gelu_is_detected() {
    let case = Case::load("tiny-sdxl", "euler-10");
    let source = ModelSource::Dir(model_dir("tiny-sdxl"));
    let mut cfg = ClipTextConfig::load(&source, "text_encoder_2").unwrap();
    cfg.hidden_act = "gelu_new".to_string();
    let vb = source
        .var_builder("text_encoder_2", DType::F32, &Device::Cpu)
        .unwrap();
    let model = ClipTextModel::new(vb, &cfg).unwrap();
    let out = model.forward(&batch(&[&ids(&case, "prompt_2")])).unwrap();
    let add_text_embeds = case.step_tensor(0, &["unet", "text_embeds"]);
    let err = max_abs_diff(&out.text_embeds.unwrap(), &add_text_embeds.i(1..2).unwrap());
    println!("sdxl euler-10: tanh-GELU text_embeds max abs err = {err:e}");
    assert!(err > TOL, "tanh GELU should not match: {err}");
}

#[test]
fn unsupported_activation_is_an_error() {
    let cfg: ClipTextConfig = serde_json::from_str(
        r#"{"hidden_act": "relu", "hidden_size": 32, "num_attention_heads": 4}"#,
    )
    .unwrap();
    match cfg.validate("text_encoder/config.json") {
        Err(ModelError::Unsupported { path, reason }) => {
            assert_eq!(path, "text_encoder/config.json");
            assert!(
                reason.contains("hidden_act") && reason.contains("relu"),
                "{reason}"
            );
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn config_defaults_and_unknown_keys() {
    let cfg: ClipTextConfig = serde_json::from_str(r#"{"some_future_key": 1}"#).unwrap();
    assert_eq!(cfg.vocab_size, 49408);
    assert_eq!(cfg.hidden_size, 512);
    assert_eq!(cfg.hidden_act, "quick_gelu");
    assert_eq!(cfg.eos_token_id, 49407);
    cfg.validate("x").unwrap();
}
