//! The VAE decoder of diffusers' `AutoencoderKL`, built from `vae/config.json`.
//!
//! Only the decode path is implemented (`post_quant_conv` then the `Decoder`); the encoder and
//! `quant_conv` are not loaded.

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::kernels::{Conv2d, GroupNorm};
use serde::Deserialize;

use super::{ModelError, ModelSource, Result};

/// GroupNorm epsilon used throughout diffusers' VAE decoder.
const NORM_EPS: f64 = 1e-6;

/// `vae/config.json` (diffusers `AutoencoderKL`); missing keys take diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    /// The diffusers class name; only `AutoencoderKL` is supported.
    #[serde(default, rename = "_class_name")]
    pub class_name: Option<String>,
    /// Image channels going into the encoder.
    #[serde(default = "default_three")]
    pub in_channels: usize,
    /// Image channels coming out of the decoder.
    #[serde(default = "default_three")]
    pub out_channels: usize,
    /// Encoder block types (not used by the decoder).
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// Decoder block types; only `UpDecoderBlock2D` is supported.
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Channels per resolution level, highest resolution first.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder uses one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    /// Activation; only `silu` is supported.
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Channels of the latent space.
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Groups of every GroupNorm.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Training image size (informational).
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    /// Latents are divided by this before decoding (0.18215 SD1.x, 0.13025 SDXL).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Added after dividing by `scaling_factor` when set (SD3 / Flux style VAEs); applied by the caller.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent mean (some SDXL-family VAEs); applied by the caller, not by `decode`.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent std (some SDXL-family VAEs); applied by the caller, not by `decode`.
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Whether diffusers runs this VAE in float32 even when the pipeline is half precision.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Whether the encoder output goes through `quant_conv` (not used when decoding).
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether latents go through `post_quant_conv` before the decoder.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid block has its self-attention layer.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_three() -> usize {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".to_string()]
}
fn default_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".to_string()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_sample_size() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

fn unsupported(path: &str, reason: String) -> ModelError {
    ModelError::Unsupported {
        path: path.to_string(),
        reason,
    }
}

impl VaeConfig {
    /// Reads and checks `<component>/config.json` (normally `vae`).
    pub fn load(source: &ModelSource, component: &str) -> Result<Self> {
        let path = format!("{component}/config.json");
        let cfg: VaeConfig = source.read_json(&path)?;
        cfg.validate(&format!("{}/{path}", source.describe()))?;
        Ok(cfg)
    }

    /// How much smaller the latents are than the image (8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Checks that every setting the decoder depends on is supported; `path` names the config in errors.
    pub fn validate(&self, path: &str) -> Result<()> {
        if let Some(c) = &self.class_name {
            if c != "AutoencoderKL" {
                return Err(unsupported(
                    path,
                    format!("_class_name = {c:?} (only \"AutoencoderKL\")"),
                ));
            }
        }
        if self.act_fn != "silu" {
            return Err(unsupported(
                path,
                format!("act_fn = {:?} (only \"silu\")", self.act_fn),
            ));
        }
        if self.block_out_channels.is_empty() {
            return Err(unsupported(path, "block_out_channels = []".to_string()));
        }
        if self.up_block_types.len() != self.block_out_channels.len() {
            return Err(unsupported(
                path,
                format!(
                    "up_block_types has {} entries but block_out_channels has {}",
                    self.up_block_types.len(),
                    self.block_out_channels.len()
                ),
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| t.as_str() != "UpDecoderBlock2D")
        {
            return Err(unsupported(
                path,
                format!("up_block_types contains {t:?} (only \"UpDecoderBlock2D\")"),
            ));
        }
        let g = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| g == 0 || c % g != 0)
        {
            return Err(unsupported(
                path,
                format!("block_out_channels entry {c} is not a multiple of norm_num_groups = {g}"),
            ));
        }
        Ok(())
    }
}

fn conv3x3(in_c: usize, out_c: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    Conv2d::load(vb, in_c, out_c, 3, 1, 1)
}

fn conv1x1(in_c: usize, out_c: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    Conv2d::load(vb, in_c, out_c, 1, 1, 0)
}

fn group_norm(groups: usize, channels: usize, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    GroupNorm::load(vb, groups, channels, NORM_EPS)
}

/// diffusers `ResnetBlock2D` without a time embedding (`resnet_time_scale_shift = "default"`).
#[derive(Clone, Debug)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(in_c: usize, out_c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let conv_shortcut = if in_c != out_c {
            Some(conv1x1(in_c, out_c, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, in_c, vb.pp("norm1"))?,
            conv1: conv3x3(in_c, out_c, vb.pp("conv1"))?,
            norm2: group_norm(groups, out_c, vb.pp("norm2"))?,
            conv2: conv3x3(out_c, out_c, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        skip + h
    }
}

/// The mid block's single-head spatial self-attention (diffusers `Attention` with a residual connection).
#[derive(Clone, Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
}

impl SpatialAttention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, vb.pp("group_norm"))?,
            to_q: candle_nn::linear(channels, channels, vb.pp("to_q"))?,
            to_k: candle_nn::linear(channels, channels, vb.pp("to_k"))?,
            to_v: candle_nn::linear(channels, channels, vb.pp("to_v"))?,
            to_out: candle_nn::linear(channels, channels, vb.pp("to_out").pp(0))?,
            // One head whose width is the channel count (attention_head_dim = block_out_channels[-1]).
            scale: (channels as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        // One head as wide as the channels.
        let attn = crate::kernels::attention(&q, &k, &v, 1, self.scale, false)?;
        let out = self
            .to_out
            .forward(&attn)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

/// One decoder level: `layers_per_block + 1` ResNet blocks and an optional 2x nearest upsampler + conv.
#[derive(Clone, Debug)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Conv2d>,
}

impl UpDecoderBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for r in &self.resnets {
            xs = r.forward(&xs)?;
        }
        if let Some(conv) = &self.upsampler {
            let (_, _, h, w) = xs.dims4()?;
            xs = conv.forward(&xs.upsample_nearest2d(h * 2, w * 2)?)?;
        }
        Ok(xs)
    }
}

/// diffusers `AutoencoderKL`, decode path only.
#[derive(Clone, Debug)]
pub struct AutoencoderKl {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnet_0: ResnetBlock,
    mid_attention: Option<SpatialAttention>,
    mid_resnet_1: ResnetBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    latent_channels: usize,
}

impl AutoencoderKl {
    /// Builds the decoder from diffusers-named weights (`post_quant_conv.*`, `decoder.*`).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate("vae config")?;
        let g = cfg.norm_num_groups;
        let lc = cfg.latent_channels;
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv1x1(lc, lc, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let dec = vb.pp("decoder");
        // validate() guarantees a non-empty list.
        let top = cfg.block_out_channels.last().copied().unwrap_or_default();
        let conv_in = conv3x3(lc, top, dec.pp("conv_in"))?;
        let mid = dec.pp("mid_block");
        let mid_resnet_0 = ResnetBlock::new(top, top, g, mid.pp("resnets").pp(0))?;
        let mid_attention = if cfg.mid_block_add_attention {
            Some(SpatialAttention::new(top, g, mid.pp("attentions").pp(0))?)
        } else {
            None
        };
        let mid_resnet_1 = ResnetBlock::new(top, top, g, mid.pp("resnets").pp(1))?;

        let levels = cfg.block_out_channels.len();
        let mut up_blocks = Vec::with_capacity(levels);
        let mut prev = top;
        for (i, &out_c) in cfg.block_out_channels.iter().rev().enumerate() {
            let ub = dec.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let in_c = if j == 0 { prev } else { out_c };
                    ResnetBlock::new(in_c, out_c, g, ub.pp("resnets").pp(j))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsampler = if i + 1 < levels {
                Some(conv3x3(out_c, out_c, ub.pp("upsamplers").pp(0).pp("conv"))?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
            prev = out_c;
        }
        let bottom = cfg.block_out_channels[0];
        let conv_norm_out = group_norm(g, bottom, dec.pp("conv_norm_out"))?;
        let conv_out = conv3x3(bottom, cfg.out_channels, dec.pp("conv_out"))?;
        Ok(Self {
            post_quant_conv,
            conv_in,
            mid_resnet_0,
            mid_attention,
            mid_resnet_1,
            up_blocks,
            conv_norm_out,
            conv_out,
            latent_channels: lc,
        })
    }

    /// Decodes latents [B, latent_channels, h, w] that were ALREADY divided by `scaling_factor` (and shifted /
    /// de-normalised where the config asks for it) into images [B, out_channels, 8h, 8w], roughly in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = latents.dims4()?;
        if c != self.latent_channels {
            return Err(candle_core::Error::Msg(format!(
                "VAE decode: latents have {c} channels, expected {}",
                self.latent_channels
            ))
            .into());
        }
        let mut xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        xs = self.conv_in.forward(&xs)?;
        xs = self.mid_resnet_0.forward(&xs)?;
        if let Some(attn) = &self.mid_attention {
            xs = attn.forward(&xs)?;
        }
        xs = self.mid_resnet_1.forward(&xs)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        Ok(self.conv_out.forward(&xs)?)
    }
}

/// Maps decoder output in [-1, 1] to [0, 1] like diffusers' `(x / 2 + 0.5).clamp(0, 1)`.
pub fn to_unit_range(decoded: &Tensor) -> Result<Tensor> {
    Ok(((decoded / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
}
