//! A whole text-to-image model loaded from a diffusers folder: tokenizer, text encoder, UNet, VAE,
//! scheduler config, and the defaults and facts a client can ask about.

use candle_core::{DType, Device};
use serde::Deserialize;

use std::collections::HashMap;
use std::sync::Arc;

use super::clip::{ClipTextConfig, ClipTextModel};
use super::lora::layer::collect_slots;
use super::lora::{LoraError, LoraFile, LoraInfo, LoraScales, Slots, Target};
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKl, VaeConfig};
use super::{ModelError, ModelSource, Result};
use crate::schedulers::config::TimestepSpacing;
use crate::schedulers::{self, SchedulerConfig};

/// Which pipeline family a model belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Stable Diffusion 1.x (CLIP ViT-L text encoder, 768-wide cross attention).
    Sd1,
    /// Stable Diffusion 2.x (OpenCLIP-H text encoder, 1024-wide cross attention).
    Sd2,
    /// Stable Diffusion XL (two text encoders, text_time conditioning).
    Sdxl,
}

impl Family {
    /// The wire name (`sd1`, `sd2`, `sdxl`).
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Sd1 => "sd1",
            Family::Sd2 => "sd2",
            Family::Sdxl => "sdxl",
        }
    }
}

/// `model_index.json`: only the fields we read.
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
    /// SDXL: a `None` negative prompt means all-zero negative conditioning.
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
}

/// The defaults a model advertises (ListModels) and requests fall back to.
#[derive(Clone, Debug)]
pub struct ModelDefaults {
    /// Native width in pixels (unet sample_size × VAE scale factor).
    pub width: u32,
    /// Native height in pixels.
    pub height: u32,
    /// Default number of inference steps.
    pub steps: u32,
    /// Default guidance scale.
    pub guidance_scale: f32,
    /// The scheduler used when a request names none.
    pub scheduler: &'static str,
}

/// SDXL's second text encoder and its tokenizer (`text_encoder_2`, `tokenizer_2`).
pub struct SecondEncoder {
    /// `tokenizer_2` (pads with `!`).
    pub tokenizer: ClipTokenizer,
    /// `text_encoder_2` (CLIPTextModelWithProjection).
    pub text_encoder: ClipTextModel,
    /// Its config.
    pub config: ClipTextConfig,
}

/// A loaded Stable Diffusion 1.x / 2.x / XL model, ready to run on its device.
pub struct StableDiffusionModel {
    /// The id clients use (folder name, hub id, or the embedded model's name).
    pub id: String,
    /// The pipeline family.
    pub family: Family,
    /// The prompt tokenizer.
    pub tokenizer: ClipTokenizer,
    /// The text encoder.
    pub text_encoder: ClipTextModel,
    /// The text encoder's config.
    pub text_config: ClipTextConfig,
    /// SDXL's second encoder.
    pub encoder_2: Option<SecondEncoder>,
    /// SDXL: whether an unset negative prompt gives zero conditioning.
    pub force_zeros_for_empty_prompt: bool,
    /// The denoising UNet.
    pub unet: UNet2DConditionModel,
    /// The UNet's config.
    pub unet_config: UNetConfig,
    /// The VAE (decoder used).
    pub vae: AutoencoderKl,
    /// The VAE's config (scaling factor, upcast).
    pub vae_config: VaeConfig,
    /// The dtype the VAE runs in.
    pub vae_dtype: DType,
    /// The model's own scheduler config.
    pub scheduler_config: SchedulerConfig,
    /// What requests fall back to.
    pub defaults: ModelDefaults,
    /// The device the weights live on.
    pub device: Device,
    /// The compute dtype.
    pub dtype: DType,
    /// The LoRAs attached, in adapter order (a request's names index into this).
    pub loras: Vec<LoraInfo>,
    /// The per-call adapter scales every adapted layer reads.
    pub lora_scales: Arc<LoraScales>,
    /// The adaptable layers of each network.
    lora_slots: HashMap<Target, Slots>,
    /// TAESD / TAESDXL for step previews (`serve --preview-decoder`).
    pub preview_decoder: Option<crate::models::taesd::TinyDecoder>,
}

/// The tensors a callback may read and replace for SD 1.x/2.x (diffusers' `_callback_tensor_inputs`).
pub const SD_CALLBACK_TENSOR_INPUTS: &[&str] =
    &["latents", "prompt_embeds", "negative_prompt_embeds"];

/// The tensors a callback may read and replace for SDXL (diffusers 0.42.1's list).
pub const SDXL_CALLBACK_TENSOR_INPUTS: &[&str] = &[
    "latents",
    "prompt_embeds",
    "add_text_embeds",
    "add_time_ids",
];

fn unsupported(source: &ModelSource, file: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Unsupported {
        path: format!("{}/{file}", source.describe()),
        reason: reason.into(),
    }
}

impl StableDiffusionModel {
    /// Loads every component named in `model_index.json` from `source` onto `device` in `dtype`.
    pub fn load(id: String, source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        let index: ModelIndex = source.read_json("model_index.json")?;
        let unet_config = UNetConfig::load(source, "unet")?;
        let text_config = ClipTextConfig::load(source, "text_encoder")?;
        let family = match index.class_name.as_str() {
            // SD 2.x: OpenCLIP-H (exact GELU) text encoder, 1024-wide cross attention.
            "StableDiffusionPipeline"
                if unet_config.cross_attention_dim.per_block(1) == Some(vec![1024])
                    || text_config.hidden_act == "gelu" =>
            {
                Family::Sd2
            }
            "StableDiffusionPipeline" => Family::Sd1,
            "StableDiffusionXLPipeline" => Family::Sdxl,
            other => {
                return Err(unsupported(
                    source,
                    "model_index.json",
                    format!(
                        "pipeline class `{other}` (supported: StableDiffusionPipeline, StableDiffusionXLPipeline)"
                    ),
                ))
            }
        };
        if (family == Family::Sdxl) != unet_config.needs_added_conditions() {
            return Err(unsupported(
                source,
                "unet/config.json",
                format!(
                    "a {} pipeline needs a UNet {} text_time conditioning",
                    index.class_name,
                    if family == Family::Sdxl {
                        "with"
                    } else {
                        "without"
                    }
                ),
            ));
        }
        let scheduler_bytes = source.read("scheduler/scheduler_config.json")?;
        let scheduler_config = SchedulerConfig::from_json_bytes(&scheduler_bytes)
            .map_err(|e| unsupported(source, "scheduler/scheduler_config.json", e.to_string()))?;
        let scheduler_config = legacy_scheduler_fixups(&id, scheduler_config);
        let tokenizer = ClipTokenizer::load(source, "tokenizer")?;
        let mut lora_slots = HashMap::new();
        let (text_encoder, slots) = collect_slots(|| {
            ClipTextModel::new(
                source.var_builder("text_encoder", dtype, device)?,
                &text_config,
            )
        });
        let text_encoder = text_encoder?;
        lora_slots.insert(Target::TextEncoder, Slots::new(slots, |_| None));
        let encoder_2 = if family == Family::Sdxl {
            let config = ClipTextConfig::load(source, "text_encoder_2")?;
            let (text_encoder, slots) = collect_slots(|| {
                ClipTextModel::new(
                    source.var_builder("text_encoder_2", dtype, device)?,
                    &config,
                )
            });
            let text_encoder = text_encoder?;
            lora_slots.insert(Target::TextEncoder2, Slots::new(slots, |_| None));
            if !text_encoder.has_projection() {
                return Err(unsupported(
                    source,
                    "text_encoder_2",
                    "SDXL's text_encoder_2 needs a text_projection (CLIPTextModelWithProjection)",
                ));
            }
            Some(SecondEncoder {
                tokenizer: ClipTokenizer::load(source, "tokenizer_2")?,
                text_encoder,
                config,
            })
        } else {
            None
        };
        let (unet, slots) = collect_slots(|| {
            UNet2DConditionModel::new(source.var_builder("unet", dtype, device)?, &unet_config)
        });
        let unet = unet?;
        // kohya files for SDXL name UNet modules in the original layout (`input_blocks_4_1_...`).
        let layers = match &unet_config.layers_per_block {
            super::unet::OneOrMany::One(n) => *n,
            super::unet::OneOrMany::Many(v) => v.first().copied().unwrap_or(2),
        };
        lora_slots.insert(
            Target::Unet,
            Slots::new(slots, |m| super::checkpoint::ldm_unet_module(m, layers)),
        );
        let vae_config = VaeConfig::load(source, "vae")?;
        let vae_dtype = vae_dtype_for(family, &vae_config, dtype);
        let vae = AutoencoderKl::new(source.var_builder("vae", vae_dtype, device)?, &vae_config)?;

        let vae_scale = vae_scale_factor(&vae_config);
        let sample = match &unet_config.sample_size {
            Some(super::unet::OneOrMany::One(s)) => *s,
            Some(super::unet::OneOrMany::Many(v)) => v.first().copied().unwrap_or(64),
            None => 64,
        };
        let native = (sample * vae_scale) as u32;
        let default_scheduler = schedulers::name_for_class(&scheduler_config.class_name)
            .unwrap_or_else(|| {
                tracing::warn!(
                    model = %id,
                    class = %scheduler_config.class_name,
                    "scheduler class not implemented; requests without a scheduler name use ddim"
                );
                "ddim"
            });
        // Distilled (Turbo-style) models ship trailing timestep spacing: few steps, no CFG.
        let distilled = scheduler_config.timestep_spacing == Some(TimestepSpacing::Trailing);
        Ok(Self {
            id,
            family,
            tokenizer,
            text_encoder,
            text_config,
            encoder_2,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(false),
            vae_dtype,
            unet,
            unet_config,
            vae,
            vae_config,
            scheduler_config,
            defaults: ModelDefaults {
                width: native,
                height: native,
                steps: if distilled { 4 } else { 50 },
                guidance_scale: if distilled { 0.0 } else { 7.5 },
                scheduler: default_scheduler,
            },
            device: device.clone(),
            dtype,
            loras: Vec::new(),
            lora_scales: Arc::new(LoraScales::default()),
            preview_decoder: None,
            lora_slots,
        })
    }

    /// Attaches a LoRA as the next adapter, after checking every pair against the layers;
    /// refused (nothing attached) when a module does not fit or the name is taken.
    pub fn add_lora(&mut self, file: &LoraFile) -> std::result::Result<&LoraInfo, LoraError> {
        if self.lora_index(&file.name).is_some() {
            return Err(LoraError::Unsupported {
                name: file.name.clone(),
                path: file.path.display().to_string(),
                reason: format!("model `{}` already has a LoRA of this name", self.id),
            });
        }
        let slots: HashMap<Target, &Slots> = self.lora_slots.iter().map(|(t, s)| (*t, s)).collect();
        let info = super::lora::attach(
            file,
            self.loras.len(),
            &self.id,
            &slots,
            &self.lora_scales,
            self.dtype,
            &self.device,
        )?;
        self.loras.push(info);
        Ok(self.loras.last().expect("just pushed"))
    }

    /// Every layer a LoRA may adapt: `(network, module, in, out)`, in diffusers naming.
    pub fn adaptable_layers(&self) -> Vec<(Target, String, usize, usize)> {
        let mut out = Vec::new();
        for target in [Target::Unet, Target::TextEncoder, Target::TextEncoder2] {
            if let Some(slots) = self.lora_slots.get(&target) {
                out.extend(
                    slots
                        .all()
                        .iter()
                        .map(|s| (target, s.module.clone(), s.in_dim, s.out_dim)),
                );
            }
        }
        out
    }

    /// The adapter index of a LoRA name.
    pub fn lora_index(&self, name: &str) -> Option<usize> {
        self.loras.iter().position(|l| l.name == name)
    }

    /// Pixels per latent cell along each axis.
    pub fn vae_scale_factor(&self) -> usize {
        vae_scale_factor(&self.vae_config)
    }

    /// The width of the prompt embeddings the UNet cross-attends to (both encoders for SDXL).
    pub fn text_encoder_hidden_size(&self) -> usize {
        self.text_config.hidden_size
            + self
                .encoder_2
                .as_ref()
                .map(|e| e.config.hidden_size)
                .unwrap_or(0)
    }

    /// Checks that pooled embeddings of width `pooled_dim` and `n_time_ids` time ids fit the UNet's
    /// add-embedding (diffusers' `_get_add_time_ids` check).
    pub fn check_added_conditions(
        &self,
        pooled_dim: usize,
        n_time_ids: usize,
    ) -> std::result::Result<(), String> {
        let per_id = self.unet_config.addition_time_embed_dim.unwrap_or(0);
        let want = self.unet_config.projection_class_embeddings_input_dim;
        let got = per_id * n_time_ids + pooled_dim;
        if want != Some(got) {
            return Err(format!(
                "the UNet's add embedding expects {want:?} inputs but addition_time_embed_dim \
                 {per_id} x {n_time_ids} time ids + pooled {pooled_dim} = {got}"
            ));
        }
        Ok(())
    }

    /// Latent channels the UNet denoises.
    pub fn unet_in_channels(&self) -> usize {
        self.unet_config.in_channels
    }

    /// The tensors a callback may read and replace.
    pub fn callback_tensor_inputs(&self) -> &'static [&'static str] {
        match self.family {
            Family::Sdxl => SDXL_CALLBACK_TENSOR_INPUTS,
            _ => SD_CALLBACK_TENSOR_INPUTS,
        }
    }
}

/// The dtype the VAE decodes in. Like diffusers, only the SDXL pipeline upcasts a half-precision
/// VAE to f32 when its config sets `force_upcast` (SDXL's VAE overflows in f16); SD 1.x/2.x
/// decode in the model's dtype.
pub fn vae_dtype_for(family: Family, vae: &VaeConfig, dtype: DType) -> DType {
    let half = matches!(dtype, DType::F16 | DType::BF16);
    if family == Family::Sdxl && vae.force_upcast && half {
        DType::F32
    } else {
        dtype
    }
}

/// diffusers' `vae_scale_factor = 2 ** (len(block_out_channels) - 1)`.
fn vae_scale_factor(cfg: &VaeConfig) -> usize {
    1usize << cfg.block_out_channels.len().saturating_sub(1)
}

/// diffusers' StableDiffusionPipeline rewrites outdated scheduler configs at load time
/// (`steps_offset` != 1 becomes 1; `clip_sample: true` becomes false); so do we, with a warning.
fn legacy_scheduler_fixups(id: &str, mut cfg: SchedulerConfig) -> SchedulerConfig {
    if cfg.steps_offset != 1 {
        tracing::warn!(model = %id, steps_offset = cfg.steps_offset, "outdated scheduler config: steps_offset set to 1, as diffusers does");
        cfg.steps_offset = 1;
    }
    if cfg.clip_sample == Some(true) {
        tracing::warn!(model = %id, "outdated scheduler config: clip_sample set to false, as diffusers does");
        cfg.clip_sample = Some(false);
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sdxl_upcasts_a_half_precision_vae() {
        let json = br#"{"force_upcast": true, "block_out_channels": [8, 8]}"#;
        let cfg: VaeConfig = serde_json::from_slice(json).unwrap();
        assert_eq!(vae_dtype_for(Family::Sdxl, &cfg, DType::F16), DType::F32);
        assert_eq!(vae_dtype_for(Family::Sdxl, &cfg, DType::F32), DType::F32);
        assert_eq!(vae_dtype_for(Family::Sd1, &cfg, DType::F16), DType::F16);
        assert_eq!(vae_dtype_for(Family::Sd2, &cfg, DType::BF16), DType::BF16);
    }

    #[test]
    fn outdated_scheduler_configs_are_fixed_like_diffusers() {
        let cfg = SchedulerConfig::from_json_bytes(
            br#"{"_class_name": "DDIMScheduler", "steps_offset": 0, "clip_sample": true}"#,
        )
        .unwrap();
        let fixed = legacy_scheduler_fixups("m", cfg);
        assert_eq!(fixed.steps_offset, 1);
        assert_eq!(fixed.clip_sample, Some(false));
    }
}
