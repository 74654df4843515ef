//! The default model compiled into the binary: a tiny SD-1.5-architecture model with random
//! weights (its images are noise), so `stepstream serve` works with no download.

use super::ModelSource;

macro_rules! embed {
    ($($rel:literal),* $(,)?) => {
        &[$(($rel, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15/", $rel)) as &[u8])),*]
    };
}

/// The id the embedded model is served under.
pub const EMBEDDED_MODEL_ID: &str = "tiny-sd15";

static FILES: &[(&str, &[u8])] = embed!(
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// The embedded tiny model's files.
pub fn source() -> ModelSource {
    ModelSource::Embedded {
        name: EMBEDDED_MODEL_ID,
        files: FILES,
    }
}
