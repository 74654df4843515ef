//! TAESD / TAESDXL: diffusers' `AutoencoderTiny` decoder, for step previews (`serve
//! --preview-decoder DIR`). A stack of 3×3 convolutions, ReLUs, residual blocks and nearest
//! upsampling that turns SD latents into an image at the VAE's resolution in a fraction of its
//! time. Only the decoder is loaded; the encoder's weights are never read.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::Conv2d;
use serde::Deserialize;

use super::{ModelError, ModelSource, Result};

/// The `config.json` keys of an `AutoencoderTiny` that shape its decoder.
#[derive(Clone, Debug, Deserialize)]
pub struct TinyConfig {
    /// Must be `AutoencoderTiny` when present.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Channels of each decoder level.
    #[serde(default = "default_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    /// Residual blocks of each decoder level.
    #[serde(default = "default_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    /// Latent channels (4 for SD 1.x, 2.x and XL).
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Image channels.
    #[serde(default = "default_out_channels")]
    pub out_channels: usize,
    /// The upsampling factor between levels.
    #[serde(default = "default_factor")]
    pub upsampling_scaling_factor: usize,
    /// Only `relu`.
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// Only `nearest`.
    #[serde(default = "default_upsample")]
    pub upsample_fn: String,
    /// The pipeline divides latents by it before decoding (1 for TAESD).
    #[serde(default = "one")]
    pub scaling_factor: f64,
    /// Added after that division (0 for TAESD).
    #[serde(default)]
    pub shift_factor: f64,
}

fn default_channels() -> Vec<usize> {
    vec![64; 4]
}
fn default_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn default_latent_channels() -> usize {
    4
}
fn default_out_channels() -> usize {
    3
}
fn default_factor() -> usize {
    2
}
fn default_act() -> String {
    "relu".into()
}
fn default_upsample() -> String {
    "nearest".into()
}
fn one() -> f64 {
    1.0
}

/// One entry of the decoder's `layers` sequence.
enum Layer {
    Conv(Conv2d),
    Relu,
    /// `AutoencoderTinyBlock`: three convolutions with ReLUs between, plus the input, then ReLU.
    Block([Conv2d; 3]),
    Upsample(usize),
}

/// The `AutoencoderTiny` decoder; see the module docs.
pub struct TinyDecoder {
    layers: Vec<Layer>,
    config: TinyConfig,
    /// Its compute dtype.
    pub dtype: DType,
}

/// A 3×3 "same" convolution: the model's shared layer, so TAESD gets the same fast paths as
/// the VAE.
fn conv(cin: usize, cout: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    if bias {
        Conv2d::load(vb, cin, cout, 3, 1, 1)
    } else {
        Conv2d::load_no_bias(vb, cin, cout, 3, 1, 1)
    }
}

impl TinyDecoder {
    /// Loads a diffusers `AutoencoderTiny` folder (`config.json` and its safetensors weights),
    /// or a pipeline folder whose `vae/` is one.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let dir = if !dir.join("config.json").is_file() && dir.join("vae/config.json").is_file() {
            dir.join("vae")
        } else {
            dir.to_path_buf()
        };
        let (Some(parent), Some(name)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str()))
        else {
            return Err(ModelError::MissingFile {
                source_desc: dir.display().to_string(),
                path: "config.json".into(),
            });
        };
        let source = ModelSource::Dir(dir.clone());
        let config: TinyConfig = source.read_json("config.json")?;
        let path = format!("{}/config.json", source.describe());
        let vb = ModelSource::Dir(parent.to_path_buf()).var_builder(name, dtype, device)?;
        Self::new(config, vb, dtype, &path)
    }

    /// Builds the decoder of `config` from `vb` (the folder's weights); `path` names the config
    /// in errors.
    pub fn new(config: TinyConfig, vb: VarBuilder, dtype: DType, path: &str) -> Result<Self> {
        let unsupported = |reason: String| ModelError::Unsupported {
            path: path.to_string(),
            reason,
        };
        if let Some(c) = config
            .class_name
            .as_deref()
            .filter(|c| *c != "AutoencoderTiny")
        {
            return Err(unsupported(format!(
                "_class_name = {c:?} (only \"AutoencoderTiny\")"
            )));
        }
        if config.act_fn != "relu" || config.upsample_fn != "nearest" {
            return Err(unsupported(format!(
                "act_fn {:?}, upsample_fn {:?} (only \"relu\" and \"nearest\")",
                config.act_fn, config.upsample_fn
            )));
        }
        let levels = config.decoder_block_out_channels.len();
        if levels == 0 || levels != config.num_decoder_blocks.len() {
            return Err(unsupported(format!(
                "{levels} decoder_block_out_channels for {} num_decoder_blocks",
                config.num_decoder_blocks.len()
            )));
        }
        let vb = vb.pp("decoder").pp("layers");
        let mut layers = Vec::new();
        // diffusers' DecoderTiny, entry by entry: the Sequential's index names each weight.
        let c0 = config.decoder_block_out_channels[0];
        layers.push(Layer::Conv(conv(
            config.latent_channels,
            c0,
            true,
            vb.pp("0"),
        )?));
        layers.push(Layer::Relu);
        for (i, (&channels, &blocks)) in config
            .decoder_block_out_channels
            .iter()
            .zip(&config.num_decoder_blocks)
            .enumerate()
        {
            let last = i + 1 == levels;
            if i > 0 && channels != config.decoder_block_out_channels[i - 1] {
                return Err(unsupported(
                    "decoder levels of different widths (their skips would need weights)".into(),
                ));
            }
            for _ in 0..blocks {
                let b = vb.pp(layers.len().to_string()).pp("conv");
                layers.push(Layer::Block([
                    conv(channels, channels, true, b.pp("0"))?,
                    conv(channels, channels, true, b.pp("2"))?,
                    conv(channels, channels, true, b.pp("4"))?,
                ]));
            }
            if !last {
                layers.push(Layer::Upsample(config.upsampling_scaling_factor));
            }
            let out = if last { config.out_channels } else { channels };
            let at = layers.len().to_string();
            layers.push(Layer::Conv(conv(channels, out, last, vb.pp(at))?));
        }
        Ok(Self {
            layers,
            config,
            dtype,
        })
    }

    /// How much larger than the latents its images are.
    pub fn scale(&self) -> usize {
        self.config
            .upsampling_scaling_factor
            .pow(self.config.decoder_block_out_channels.len() as u32 - 1)
    }

    /// Decodes SD latents `[B, C, h, w]` (as the loop holds them) into images `[B, 3, H, W]`
    /// in [0, 1], f32: what a pipeline with this as its VAE returns (`vae.decode(latents /
    /// scaling_factor)`, then `/ 2 + 0.5`, clamped).
    pub fn decode_unit(&self, latents: &Tensor) -> Result<Tensor> {
        let mut z = (latents / self.config.scaling_factor)?;
        if self.config.shift_factor != 0.0 {
            z = (z + self.config.shift_factor)?;
        }
        // DecoderTiny's input clamp: tanh(x / 3) * 3.
        let mut x = ((z.to_dtype(self.dtype)? / 3.0)?.tanh()? * 3.0)?;
        for layer in &self.layers {
            x = match layer {
                Layer::Conv(c) => c.forward(&x)?,
                Layer::Relu => x.relu()?,
                Layer::Block([a, b, c]) => {
                    let y = c.forward(&b.forward(&a.forward(&x)?.relu()?)?.relu()?)?;
                    (y + &x)?.relu()?
                }
                Layer::Upsample(f) => {
                    let (_, _, h, w) = x.dims4()?;
                    x.upsample_nearest2d(h * f, w * f)?
                }
            };
        }
        // The decoder's own output is in [0, 1] (diffusers maps it to [-1, 1], and the image
        // processor back); clamp as the processor does.
        Ok(x.to_dtype(DType::F32)?.clamp(0f32, 1f32)?)
    }
}
