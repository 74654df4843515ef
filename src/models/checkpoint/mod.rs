//! Single-file checkpoints in the original Stable Diffusion layout (LDM, as A1111, ComfyUI and
//! model sites publish them), served as if they were diffusers folders.
//!
//! The header is read once; each tensor is then read by position
//! ([`TensorFile`](super::tensor_file::TensorFile)), through a
//! [`VarBuilder`] backend that turns the diffusers name a model asks for into the checkpoint's
//! key ([`keys`]), so the networks are the same code as for folders and give the same numbers.
//! The configs come from `--model-config DIR` (a diffusers folder of the same architecture) or
//! are inferred from the keys and shapes ([`infer`]); the tokenizers from that folder or from
//! the CLIP tokenizer files compiled into the binary.

mod infer;
mod keys;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use super::pipeline_model::Family;
use super::tensor_file::TensorFile;
use super::{ModelError, Result};
use keys::Take;

/// Key prefix of the UNet in every supported layout.
const UNET: &str = "model.diffusion_model.";
/// Key prefix of the VAE.
const VAE: &str = "first_stage_model.";
/// SD 1.x: the transformers CLIP text model.
const SD1_TEXT: &str = "cond_stage_model.transformer.";
/// SD 2.x: the OpenCLIP text tower (fused `in_proj` attention).
const SD2_TEXT: &str = "cond_stage_model.model.";
/// SDXL base: the first encoder (transformers CLIP ViT-L).
const XL_TEXT_1: &str = "conditioner.embedders.0.transformer.";
/// SDXL base: the second encoder (OpenCLIP ViT-bigG).
const XL_TEXT_2: &str = "conditioner.embedders.1.model.";
/// SDXL refiner: only an OpenCLIP encoder, as embedder 0.
const XL_REFINER_TEXT: &str = "conditioner.embedders.0.model.";

/// How to read a single-file checkpoint (`serve --model-config`, `--prediction-type`).
#[derive(Clone, Debug, Default)]
pub struct CheckpointOptions {
    /// A diffusers folder whose configs and tokenizers describe the checkpoint's architecture
    /// (its weights are not read); without one, the configs are inferred from the weights.
    pub config_dir: Option<PathBuf>,
    /// The scheduler's `prediction_type` (`epsilon`, `v_prediction`, `sample`), which weights
    /// cannot tell: SD 2.x checkpoints default to `v_prediction`, like diffusers.
    pub prediction_type: Option<String>,
}

/// The component a weight belongs to (the diffusers folder names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Component {
    Unet,
    Vae,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    fn parse(name: &str) -> Option<Component> {
        Some(match name {
            "unet" => Component::Unet,
            "vae" => Component::Vae,
            "text_encoder" => Component::TextEncoder,
            "text_encoder_2" => Component::TextEncoder2,
            _ => return None,
        })
    }
}

/// An opened single-file checkpoint: its tensors, its family, and the diffusers-layout config and
/// tokenizer files that describe it.
pub struct Checkpoint {
    path: PathBuf,
    family: Family,
    tensors: TensorFile,
    /// Every key with its shape, for lookups and inference without touching tensor data.
    shapes: BTreeMap<String, Vec<usize>>,
    /// `(relative path, bytes)`: `model_index.json`, the component configs, the tokenizers.
    files: Vec<(String, Vec<u8>)>,
    /// Where the configs came from, for messages.
    config_origin: String,
    /// The UNet's `layers_per_block` (the LDM block numbering depends on it).
    unet_layers_per_block: usize,
    /// The VAE's number of resolution levels (the LDM decoder numbers them in reverse).
    vae_levels: usize,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("family", &self.family)
            .field("configs", &self.config_origin)
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// Opens `path` (a `.safetensors` file in the original layout), recognises its family and
    /// gathers or infers its configs.
    pub fn open(path: &Path, options: &CheckpointOptions) -> Result<Checkpoint> {
        let tensors = TensorFile::open(path).map_err(|e| ModelError::NotAModel {
            path: path.display().to_string(),
            reason: format!("not a readable safetensors file ({e})"),
        })?;
        let shapes = tensors.shapes();
        let family = detect(path, &shapes)?;
        let (files, config_origin) = match &options.config_dir {
            Some(dir) => (
                infer::files_from_dir(dir, family)?,
                dir.display().to_string(),
            ),
            None => (
                infer::files_from_weights(path, family, &shapes, options)?,
                "inferred from the weights".to_string(),
            ),
        };
        let files = match &options.prediction_type {
            Some(p) => infer::with_prediction_type(files, p)?,
            None => files,
        };
        let json = |rel: &str| -> Result<serde_json::Value> {
            let bytes = &files
                .iter()
                .find(|(n, _)| n == rel)
                .ok_or_else(|| ModelError::MissingFile {
                    source_desc: config_origin.clone(),
                    path: rel.to_string(),
                })?
                .1;
            serde_json::from_slice(bytes).map_err(|source| ModelError::Json {
                path: format!("{config_origin}/{rel}"),
                source,
            })
        };
        let unet_layers_per_block = json("unet/config.json")?["layers_per_block"]
            .as_u64()
            .unwrap_or(2) as usize;
        let vae_levels = json("vae/config.json")?["block_out_channels"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(4);
        Ok(Checkpoint {
            path: path.to_path_buf(),
            family,
            tensors,
            shapes,
            files,
            config_origin,
            unet_layers_per_block,
            vae_levels,
        })
    }

    /// The file, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The family recognised from the keys.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Where the configs came from: the `--model-config` folder, or "inferred from the weights".
    pub fn config_origin(&self) -> &str {
        &self.config_origin
    }

    /// A config or tokenizer file by its diffusers path, e.g. `unet/config.json`.
    pub fn file(&self, rel: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|(n, _)| n == rel)
            .map(|(_, b)| b.as_slice())
    }

    /// Whether the checkpoint holds weights for a diffusers component folder name.
    pub fn has_component(&self, component: &str) -> bool {
        match Component::parse(component) {
            Some(Component::TextEncoder2) => self.family == Family::Sdxl,
            Some(_) => true,
            None => false,
        }
    }

    /// The weights of one component, named as diffusers names them.
    pub fn var_builder(
        self: &Arc<Self>,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        let component = Component::parse(component)
            .filter(|_| self.has_component(component))
            .ok_or_else(|| ModelError::MissingFile {
                source_desc: self.path.display().to_string(),
                path: format!("{component} weights"),
            })?;
        Ok(VarBuilder::from_backend(
            Box::new(ComponentWeights {
                checkpoint: self.clone(),
                component,
            }),
            dtype,
            device.clone(),
        ))
    }

    /// Where a diffusers weight lives in the file and the shape it has there once taken (a third
    /// of a fused q/k/v, a transposed projection), from the header alone; `None` when the file
    /// has no such weight.
    pub fn locate(&self, component: &str, name: &str) -> Option<(String, Vec<usize>)> {
        let component = Component::parse(component).filter(|_| self.has_component(component))?;
        let (key, take) = self.lookup(component, name)?;
        let mut shape = self.shapes.get(&key)?.clone();
        match take {
            Take::Whole => {}
            Take::Third(_) => shape[0] /= 3,
            Take::Transposed => shape.reverse(),
        }
        Some((key, shape))
    }

    /// The checkpoint key and how to take the tensor from it, for a diffusers weight name.
    fn lookup(&self, component: Component, name: &str) -> Option<(String, Take)> {
        let has = |k: &str| self.shapes.contains_key(k);
        match component {
            Component::Unet => keys::unet(name, self.unet_layers_per_block, &|k| {
                has(&format!("{UNET}{k}"))
            })
            .map(|k| (format!("{UNET}{k}"), Take::Whole)),
            Component::Vae => {
                keys::vae(name, self.vae_levels).map(|k| (format!("{VAE}{k}"), Take::Whole))
            }
            Component::TextEncoder => match self.family {
                Family::Sd1 => keys::clip(name, SD1_TEXT, &has),
                Family::Sd2 => keys::open_clip(name, SD2_TEXT, false),
                Family::Sdxl => keys::clip(name, XL_TEXT_1, &has),
            },
            Component::TextEncoder2 => keys::open_clip(name, XL_TEXT_2, true),
        }
    }

    /// Reads one weight: the checkpoint tensor, cut or transposed as the mapping says, reshaped
    /// where the layouts differ only by unit dimensions (1×1 convolutions stored for linears).
    fn load(
        &self,
        component: Component,
        name: &str,
        want: Option<&Shape>,
    ) -> candle_core::Result<Tensor> {
        let (key, take) = self.lookup(component, name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: no checkpoint key for diffusers weight `{name}`",
                self.path.display()
            ))
        })?;
        if !self.shapes.contains_key(&key) {
            candle_core::bail!(
                "{}: missing `{key}` (the weight diffusers calls `{}.{name}`)",
                self.path.display(),
                component_name(component)
            );
        }
        let t = self.tensors.load(&key)?;
        let t = match take {
            Take::Whole => t,
            Take::Third(i) => {
                let rows = t.dim(0)?;
                if rows % 3 != 0 {
                    candle_core::bail!(
                        "{}: `{key}` has {rows} rows, not three equal q/k/v parts",
                        self.path.display()
                    );
                }
                t.narrow(0, i * rows / 3, rows / 3)?
            }
            Take::Transposed => t.t()?,
        };
        match want {
            Some(want) if t.shape() != want => {
                let squeeze = |d: &[usize]| -> Vec<usize> {
                    let mut d = d.to_vec();
                    while d.len() > 1 && d.last() == Some(&1) {
                        d.pop();
                    }
                    d
                };
                if squeeze(t.dims()) == squeeze(want.dims()) {
                    t.reshape(want)
                } else {
                    Err(candle_core::Error::UnexpectedShape {
                        msg: format!(
                            "{}: `{key}` (diffusers `{}.{name}`) does not fit the config ({})",
                            self.path.display(),
                            component_name(component),
                            self.config_origin
                        ),
                        expected: want.clone(),
                        got: t.shape().clone(),
                    })
                }
            }
            _ => Ok(t),
        }
    }
}

fn component_name(c: Component) -> &'static str {
    match c {
        Component::Unet => "unet",
        Component::Vae => "vae",
        Component::TextEncoder => "text_encoder",
        Component::TextEncoder2 => "text_encoder_2",
    }
}

/// One component's view of the checkpoint, for [`VarBuilder`].
struct ComponentWeights {
    checkpoint: Arc<Checkpoint>,
    component: Component,
}

impl candle_nn::var_builder::SimpleBackend for ComponentWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        // Converted on the CPU, then moved: a half-precision file reaches the GPU in half
        // precision, and no full-model f32 copy is ever made.
        self.checkpoint
            .load(self.component, name, Some(&shape))?
            .to_dtype(dtype)?
            .contiguous()?
            .to_device(device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.checkpoint
            .load(self.component, name, None)?
            .to_dtype(dtype)?
            .contiguous()?
            .to_device(device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.checkpoint
            .lookup(self.component, name)
            .is_some_and(|(key, _)| self.checkpoint.shapes.contains_key(&key))
    }
}

/// A UNet module's name in the original layout (`down_blocks.1.attentions.0.proj_in` →
/// `input_blocks.4.1.proj_in`), for LoRA files that use it.
pub(crate) fn ldm_unet_module(module: &str, layers_per_block: usize) -> Option<String> {
    let key = keys::unet(&format!("{module}.weight"), layers_per_block, &|_| false)?;
    key.strip_suffix(".weight").map(String::from)
}

/// Whether any key starts with `prefix`.
fn has_prefix(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> bool {
    shapes
        .range(prefix.to_string()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(prefix))
}

/// The family, from which text encoders the file holds (diffusers looks at a few keys of
/// real-sized models instead, e.g. `resblocks.9` or a 1024-wide `attn2`; prefixes also fit small
/// and pruned models).
fn detect(path: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> Result<Family> {
    let not_a_model = |reason: String| ModelError::NotAModel {
        path: path.display().to_string(),
        reason,
    };
    let unsupported = |reason: &str| ModelError::Unsupported {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    if !has_prefix(shapes, UNET) {
        return Err(not_a_model(what_else(shapes)));
    }
    if !has_prefix(shapes, VAE) {
        return Err(not_a_model(
            "a UNet with no VAE (`first_stage_model.*`): stepstream loads whole checkpoints; \
             serve a diffusers folder to combine parts"
                .into(),
        ));
    }
    let family = if has_prefix(shapes, XL_TEXT_2) {
        Family::Sdxl
    } else if has_prefix(shapes, XL_REFINER_TEXT) {
        return Err(unsupported(
            "an SDXL refiner (one OpenCLIP encoder as `conditioner.embedders.0.model`): only \
             text-to-image base models are served",
        ));
    } else if has_prefix(shapes, SD2_TEXT) {
        Family::Sd2
    } else if has_prefix(shapes, SD1_TEXT) {
        Family::Sd1
    } else {
        return Err(not_a_model(
            "a UNet and VAE with no text encoder (`cond_stage_model.*` or \
             `conditioner.embedders.*`)"
                .into(),
        ));
    };
    if let Some(conv_in) = shapes.get(&format!("{UNET}input_blocks.0.0.weight")) {
        if conv_in.get(1).is_some_and(|&c| c != 4) {
            return Err(unsupported(&format!(
                "the UNet takes {} input channels (an inpainting or other image-conditioned \
                 model); only text-to-image checkpoints (4 channels) are served",
                conv_in[1]
            )));
        }
    }
    Ok(family)
}

/// What a safetensors file without `model.diffusion_model.*` keys looks like, for the error.
fn what_else(shapes: &BTreeMap<String, Vec<usize>>) -> String {
    let any = |f: &dyn Fn(&str) -> bool| shapes.keys().any(|k| f(k));
    if any(&|k| {
        k.starts_with("lora_unet_")
            || k.starts_with("lora_te")
            || k.contains(".lora_A.")
            || k.contains(".lora_down.")
            || k.contains("lora.down.")
    }) {
        "a LoRA, not a model: give the model it applies to as --model".into()
    } else if any(&|k| k.starts_with("down_blocks.") || k.starts_with("decoder.up_blocks.")) {
        "the weights of one diffusers component (`down_blocks.*`), not a whole checkpoint: \
         give the diffusers folder it belongs to"
            .into()
    } else {
        "no `model.diffusion_model.*` weights: not a Stable Diffusion checkpoint in the \
         original layout"
            .into()
    }
}
