//! Real-sized architectures with zero weights, made in memory (no download): for benchmarks of
//! speed and memory on any machine. Their images are meaningless.

use std::sync::Arc;

use super::{embedded, ModelError, ModelSource, Result};

/// The architectures `--random-weights` knows.
pub const NAMES: &[&str] = &["sd15"];

const SD15_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

const SD15_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
  "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

const SD15_TEXT: &str = r#"{
  "architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
  "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
  "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408
}"#;

/// The files of a synthetic model: its configs, plus the embedded tiny model's tokenizer and
/// scheduler (token ids stay within the real vocabulary).
pub fn source(name: &str) -> Result<ModelSource> {
    let (unet, vae, text) = match name {
        "sd15" => (SD15_UNET, SD15_VAE, SD15_TEXT),
        other => {
            return Err(ModelError::Unsupported {
                path: "--random-weights".into(),
                reason: format!(
                    "unknown architecture `{other}`; known: {}",
                    NAMES.join(", ")
                ),
            })
        }
    };
    let tiny = embedded::source();
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("unet/config.json".into(), unet.as_bytes().to_vec()),
        ("vae/config.json".into(), vae.as_bytes().to_vec()),
        ("text_encoder/config.json".into(), text.as_bytes().to_vec()),
    ];
    for rel in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
    ] {
        files.push((rel.into(), tiny.read(rel)?.into_owned()));
    }
    Ok(ModelSource::Synthetic {
        name: format!("random-{name}"),
        files: Arc::new(files),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::clip::ClipTextConfig;
    use crate::models::unet::UNetConfig;
    use crate::models::vae::VaeConfig;

    #[test]
    fn sd15_configs_parse_with_real_sizes_and_weights_are_synthesised() {
        let src = source("sd15").unwrap();
        let unet = UNetConfig::load(&src, "unet").unwrap();
        assert_eq!(unet.block_out_channels, vec![320, 640, 1280, 1280]);
        let text = ClipTextConfig::load(&src, "text_encoder").unwrap();
        assert_eq!((text.hidden_size, text.num_hidden_layers), (768, 12));
        let vae = VaeConfig::load(&src, "vae").unwrap();
        assert_eq!(vae.block_out_channels, vec![128, 256, 512, 512]);
        assert!(src.exists("unet/diffusion_pytorch_model.safetensors"));
        let vb = src
            .var_builder("unet", candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let w = vb.get((4, 3), "any.weight").unwrap();
        assert_eq!(w.dims(), &[4, 3]);
        assert!(source("sd99").is_err());
    }

    #[test]
    fn synthetic_weights_are_plain_zero_tensors_that_record_no_graph() {
        let src = source("sd15").unwrap();
        let vb = src
            .var_builder("unet", candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let w = vb.get((64, 32), "w").unwrap();
        // A training variable would make every op record its inputs, so the denoising loop's
        // latents would keep each step's activations alive.
        assert!(!w.is_variable());
        let x = candle_core::Tensor::ones((32, 8), candle_core::DType::F32, w.device()).unwrap();
        let y = w.matmul(&x).unwrap();
        assert!(!y.track_op(), "no op recorded on plain weights");
        assert_eq!(
            y.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}
