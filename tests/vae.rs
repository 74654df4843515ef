//! VAE decode of the recorded final latents vs the recorded diffusers image.

mod common;

use candle_core::{DType, Device};
use common::{max_abs_diff, model_dir, Case};
use stepstream::models::vae::{to_unit_range, AutoencoderKl, VaeConfig};
use stepstream::models::{ModelError, ModelSource};

/// The golden README's recommended VAE tolerance (max abs on the [0, 1] image).
const TOL: f32 = 1e-5;

fn check(model: &str, case_name: &str, expected_scaling: f64) {
    let source = ModelSource::Dir(model_dir(model));
    let cfg = VaeConfig::load(&source, "vae").unwrap();
    assert_eq!(cfg.scaling_factor, expected_scaling);
    assert_eq!(cfg.vae_scale_factor(), 8);
    let vb = source.var_builder("vae", DType::F32, &Device::Cpu).unwrap();
    let vae = AutoencoderKl::new(vb, &cfg).unwrap();

    let case = Case::load(model, case_name);
    let latents = case.tensor("final.latents");
    let decoded = vae
        .decode(&(latents / cfg.scaling_factor).unwrap())
        .unwrap();
    assert_eq!(decoded.dims(), &[1, 3, 64, 64]);
    let image = to_unit_range(&decoded)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    let expected = case.tensor("image");
    let err = max_abs_diff(&image, &expected);
    println!("{model} {case_name}: decoded image max abs err = {err:e}");
    assert!(err <= TOL, "{model} {case_name}: image err {err}");
}

#[test]
fn sd15_decode_ddim10() {
    check("tiny-sd15", "ddim-10", 0.18215);
}

#[test]
fn sd15_decode_neg_prompt() {
    check("tiny-sd15", "neg-prompt", 0.18215);
}

#[test]
fn sdxl_decode_euler10() {
    check("tiny-sdxl", "euler-10", 0.13025);
}

#[test]
fn batch_two_matches_single() {
    let source = ModelSource::Dir(model_dir("tiny-sd15"));
    let cfg = VaeConfig::load(&source, "vae").unwrap();
    let vb = source.var_builder("vae", DType::F32, &Device::Cpu).unwrap();
    let vae = AutoencoderKl::new(vb, &cfg).unwrap();
    let a =
        (Case::load("tiny-sd15", "ddim-10").tensor("final.latents") / cfg.scaling_factor).unwrap();
    let b =
        (Case::load("tiny-sd15", "euler-10").tensor("final.latents") / cfg.scaling_factor).unwrap();
    let both = vae
        .decode(&candle_core::Tensor::cat(&[&a, &b], 0).unwrap())
        .unwrap();
    let sa = vae.decode(&a).unwrap();
    let sb = vae.decode(&b).unwrap();
    let err = max_abs_diff(&both, &candle_core::Tensor::cat(&[&sa, &sb], 0).unwrap());
    println!("vae batch-2 vs 2x batch-1: {err:e}");
    assert!(err <= 1e-6);
}

#[test]
fn unsupported_settings_are_errors() {
    let cfg: VaeConfig = serde_json::from_str(r#"{"act_fn": "gelu"}"#).unwrap();
    match cfg.validate("vae/config.json") {
        Err(ModelError::Unsupported { reason, .. }) => assert!(reason.contains("act_fn")),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let cfg: VaeConfig = serde_json::from_str(
        r#"{"up_block_types": ["AttnUpDecoderBlock2D"], "block_out_channels": [64]}"#,
    )
    .unwrap();
    match cfg.validate("vae/config.json") {
        Err(ModelError::Unsupported { reason, .. }) => {
            assert!(reason.contains("AttnUpDecoderBlock2D"))
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let cfg: VaeConfig = serde_json::from_str(r#"{"unknown": true}"#).unwrap();
    assert_eq!(cfg.norm_num_groups, 32);
    assert_eq!(cfg.scaling_factor, 0.18215);
    cfg.validate("vae/config.json").unwrap();
}
