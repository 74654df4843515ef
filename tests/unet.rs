//! UNet2DConditionModel against diffusers 0.42.1: teacher-forced per-step golden checks and config handling.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, model_dir, Case};
use stepstream::models::unet::{
    AddedConditions, OneOrMany, TransformerLayers, UNet2DConditionModel, UNetConfig,
};
use stepstream::models::{ModelError, ModelSource};

/// Recommended tolerance of the golden README for one UNet call: max abs / max |ref|.
const TOL: f32 = 1e-5;

fn load(model: &str) -> UNet2DConditionModel {
    let src = ModelSource::Dir(model_dir(model));
    let cfg = UNetConfig::load(&src, "unet").expect("unet config");
    let vb = src
        .var_builder("unet", DType::F32, &Device::Cpu)
        .expect("unet weights");
    UNet2DConditionModel::new(vb, &cfg).expect("unet builds")
}

fn max_abs(t: &Tensor) -> f32 {
    t.flatten_all()
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs every executed step of a case teacher-forced; returns the worst max abs / max |ref|.
fn check_case(unet: &UNet2DConditionModel, model: &str, name: &str) -> f32 {
    let case = Case::load(model, name);
    assert!(case.num_steps() > 0, "{model}/{name}: no steps");
    let sdxl = unet.config().needs_added_conditions();
    let mut worst = 0f32;
    for k in 0..case.num_steps() {
        let sample = case.step_tensor(k, &["unet", "sample"]);
        let ehs = case.step_tensor(k, &["unet", "encoder_hidden_states"]);
        let reference = case.step_tensor(k, &["unet", "out"]);
        let t = case.step(k)["unet"]["timestep"]
            .as_f64()
            .expect("timestep is a number");
        let added = sdxl.then(|| AddedConditions {
            text_embeds: case.step_tensor(k, &["unet", "text_embeds"]),
            time_ids: case.step_tensor(k, &["unet", "time_ids"]),
        });
        let out = unet
            .forward(&sample, t, &ehs, added.as_ref())
            .expect("unet forward");
        let rel = max_abs_diff(&out, &reference) / max_abs(&reference);
        eprintln!(
            "{model}/{name} step {k} (t={t}, batch {}): max abs / max|ref| = {rel:.3e}",
            sample.dim(0).unwrap()
        );
        worst = worst.max(rel);
    }
    eprintln!(
        "{model}/{name}: worst {worst:.3e} over {} steps",
        case.num_steps()
    );
    worst
}

#[test]
fn sd15_ddim_teacher_forced() {
    let unet = load("tiny-sd15");
    let worst = check_case(&unet, "tiny-sd15", "ddim-10");
    assert!(worst <= TOL, "ddim-10: {worst:e} > {TOL:e}");
}

#[test]
fn sd15_euler_float_timesteps_teacher_forced() {
    let unet = load("tiny-sd15");
    let worst = check_case(&unet, "tiny-sd15", "euler-10");
    assert!(worst <= TOL, "euler-10: {worst:e} > {TOL:e}");
}

#[test]
fn sd15_cfg_cutoff_batch_one_teacher_forced() {
    let unet = load("tiny-sd15");
    let case = Case::load("tiny-sd15", "ddim-10-cfg-cutoff");
    let batches: Vec<usize> = (0..case.num_steps())
        .map(|k| case.step_tensor(k, &["unet", "sample"]).dim(0).unwrap())
        .collect();
    assert!(
        batches.contains(&1) && batches.contains(&2),
        "case mixes batch 2 and 1: {batches:?}"
    );
    let worst = check_case(&unet, "tiny-sd15", "ddim-10-cfg-cutoff");
    assert!(worst <= TOL, "ddim-10-cfg-cutoff: {worst:e} > {TOL:e}");
}

#[test]
fn sdxl_text_time_teacher_forced() {
    let unet = load("tiny-sdxl");
    assert!(unet.config().needs_added_conditions());
    let worst = check_case(&unet, "tiny-sdxl", "euler-10");
    assert!(worst <= TOL, "tiny-sdxl euler-10: {worst:e} > {TOL:e}");
}

#[test]
fn sdxl_without_added_conditions_is_an_error() {
    let unet = load("tiny-sdxl");
    let case = Case::load("tiny-sdxl", "euler-10");
    let sample = case.step_tensor(0, &["unet", "sample"]);
    let ehs = case.step_tensor(0, &["unet", "encoder_hidden_states"]);
    let err = unet.forward(&sample, 901.0, &ehs, None).unwrap_err();
    assert!(err.to_string().contains("text_embeds"), "{err}");
}

#[test]
fn sample_size_not_multiple_of_upsampling_keeps_shape() {
    // diffusers forwards the skip sizes to the upsamplers when h/w are not multiples of 2^upsamplers.
    let unet = load("tiny-sd15");
    let sample = Tensor::zeros((1, 4, 7, 5), DType::F32, &Device::Cpu).unwrap();
    let ehs = Tensor::zeros((1, 77, 32), DType::F32, &Device::Cpu).unwrap();
    let out = unet.forward(&sample, 500.0, &ehs, None).unwrap();
    assert_eq!(out.dims(), &[1, 4, 7, 5]);
}

fn base_config() -> serde_json::Value {
    let path = model_dir("tiny-sd15").join("unet/config.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn assert_unsupported(key: &str, value: serde_json::Value, expect_in_reason: &str) {
    let mut cfg = base_config();
    cfg[key] = value.clone();
    let text = cfg.to_string();
    // Through a model folder (the way the server loads it) ...
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("unet")).unwrap();
    std::fs::write(dir.path().join("unet/config.json"), &text).unwrap();
    match UNetConfig::load(&ModelSource::Dir(dir.path().to_path_buf()), "unet") {
        Err(ModelError::Unsupported { path, reason }) => {
            assert!(path.ends_with("unet/config.json"), "path {path}");
            assert!(
                reason.contains(key),
                "{key}={value}: reason `{reason}` does not name the key"
            );
            assert!(
                reason.contains(expect_in_reason),
                "{key}={value}: reason `{reason}` does not name the value"
            );
        }
        other => panic!("{key}={value}: expected Unsupported, got {other:?}"),
    }
    // ... and from JSON text.
    assert!(matches!(
        UNetConfig::from_json_str(&text),
        Err(ModelError::Unsupported { .. })
    ));
}

#[test]
fn unsupported_features_are_rejected_by_name() {
    use serde_json::json;
    assert_unsupported("class_embed_type", json!("timestep"), "timestep");
    assert_unsupported("num_class_embeds", json!(10), "10");
    assert_unsupported("addition_embed_type", json!("text"), "text");
    assert_unsupported("encoder_hid_dim_type", json!("text_proj"), "text_proj");
    assert_unsupported("encoder_hid_dim", json!(64), "64");
    assert_unsupported("time_cond_proj_dim", json!(256), "256");
    assert_unsupported("attention_type", json!("gated"), "gated");
    assert_unsupported("time_embedding_type", json!("fourier"), "fourier");
    assert_unsupported(
        "resnet_time_scale_shift",
        json!("scale_shift"),
        "scale_shift",
    );
    assert_unsupported("act_fn", json!("mish"), "mish");
    assert_unsupported("dual_cross_attention", json!(true), "true");
    assert_unsupported("only_cross_attention", json!(true), "true");
    assert_unsupported("num_attention_heads", json!(8), "8");
    assert_unsupported(
        "mid_block_type",
        json!("UNetMidBlock2DSimpleCrossAttn"),
        "UNetMidBlock2DSimpleCrossAttn",
    );
    assert_unsupported(
        "down_block_types",
        json!(["AttnDownBlock2D", "DownBlock2D"]),
        "AttnDownBlock2D",
    );
    assert_unsupported(
        "up_block_types",
        json!(["UpBlock2D", "SimpleCrossAttnUpBlock2D"]),
        "SimpleCrossAttnUpBlock2D",
    );
    assert_unsupported("class_embeddings_concat", json!(true), "true");
    assert_unsupported("norm_num_groups", json!(null), "None");
}

#[test]
fn list_valued_keys_parse() {
    // The tiny SDXL config has attention_head_dim [2, 4] and transformer_layers_per_block [1, 2].
    let src = ModelSource::Dir(model_dir("tiny-sdxl"));
    let cfg = UNetConfig::load(&src, "unet").unwrap();
    assert_eq!(cfg.attention_head_dim, OneOrMany::Many(vec![2, 4]));
    assert_eq!(
        cfg.transformer_layers_per_block,
        TransformerLayers::PerBlock(vec![1, 2])
    );
    assert!(cfg.use_linear_projection);
    assert_eq!(cfg.addition_time_embed_dim, Some(8));

    let mut j = base_config();
    j["attention_head_dim"] = serde_json::json!([2, 4]);
    j["transformer_layers_per_block"] = serde_json::json!([1, 3]);
    j["layers_per_block"] = serde_json::json!([1, 2]);
    j["cross_attention_dim"] = serde_json::json!([32, 32]);
    let cfg = UNetConfig::from_json_str(&j.to_string()).unwrap();
    assert_eq!(cfg.attention_head_dim, OneOrMany::Many(vec![2, 4]));
    assert_eq!(
        cfg.transformer_layers_per_block,
        TransformerLayers::PerBlock(vec![1, 3])
    );
    assert_eq!(cfg.layers_per_block, OneOrMany::Many(vec![1, 2]));

    // Wrong list lengths are rejected, naming the key.
    j["attention_head_dim"] = serde_json::json!([2, 4, 8]);
    match UNetConfig::from_json_str(&j.to_string()) {
        Err(ModelError::Unsupported { reason, .. }) => {
            assert!(reason.contains("attention_head_dim"), "{reason}")
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn missing_keys_take_diffusers_defaults() {
    let cfg = UNetConfig::from_json_str("{\"unknown_key\": 1}").unwrap();
    assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(cfg.attention_head_dim, OneOrMany::One(8));
    assert_eq!(cfg.cross_attention_dim, OneOrMany::One(1280));
    assert_eq!(cfg.norm_num_groups, Some(32));
    assert_eq!(cfg.down_block_types.len(), 4);
    assert_eq!(cfg.time_embed_dim(), 1280);
    assert!(cfg.flip_sin_to_cos);
}
