//! Where a model's files come from: a diffusers folder on disk or files compiled into the binary.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use super::{ModelError, Result};

/// Weight file stems inside a component folder (diffusers', then transformers').
const WEIGHT_STEMS: &[&str] = &["diffusion_pytorch_model", "model"];

/// The weight file names of a component folder in the order to try them: an explicit
/// `variant`'s files first; otherwise the smallest that fits `dtype` (f16/bf16 compute: the
/// `fp16` files; f32: the full-precision ones), then the others.
pub fn weight_files(variant: Option<&str>, dtype: DType) -> Vec<String> {
    let plain = WEIGHT_STEMS.iter().map(|s| format!("{s}.safetensors"));
    let of = |v: &str| -> Vec<String> {
        WEIGHT_STEMS
            .iter()
            .map(|s| format!("{s}.{v}.safetensors"))
            .collect()
    };
    let half = matches!(dtype, DType::F16 | DType::BF16);
    let mut out: Vec<String> = match variant {
        Some(v) => of(v).into_iter().chain(plain).collect(),
        None if half => of("fp16").into_iter().chain(plain).collect(),
        None => plain.chain(of("fp16")).collect(),
    };
    out.dedup();
    out
}

/// Pickled weight files: refused by name, never opened (unpickling runs code).
pub const PICKLE_EXTENSIONS: &[&str] = &["ckpt", "bin", "pt", "pth", "pkl", "pickle"];

/// Whether `path` names a pickled weight file.
pub fn is_pickle(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A model seen in the diffusers layout: paths inside it are relative, e.g. `unet/config.json`.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A folder on disk (a local diffusers folder or a resolved hub snapshot).
    Dir(PathBuf),
    /// Configs made in memory with all-zero weights of the shapes they imply: for benchmarks
    /// of real-sized architectures without downloading weights.
    Synthetic {
        /// A name for messages.
        name: String,
        /// The config and tokenizer files: `(relative path, bytes)`.
        files: std::sync::Arc<Vec<(String, Vec<u8>)>>,
    },
    /// A single-file checkpoint in the original layout, with its configs and tokenizers.
    Checkpoint(std::sync::Arc<super::checkpoint::Checkpoint>),
    /// Another source whose weights are read from a variant's files (`--variant fp16`:
    /// `unet/diffusion_pytorch_model.fp16.safetensors`), falling back to the plain files.
    Variant {
        /// The variant, e.g. `fp16`.
        variant: String,
        /// The source.
        inner: Box<ModelSource>,
    },
    /// Files compiled into the binary: `(relative path, bytes)`.
    Embedded {
        /// A name for messages.
        name: &'static str,
        /// The files.
        files: &'static [(&'static str, &'static [u8])],
    },
}

impl ModelSource {
    /// A human-readable description for messages and logs.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Dir(p) => p.display().to_string(),
            ModelSource::Embedded { name, .. } => format!("embedded:{name}"),
            ModelSource::Synthetic { name, .. } => format!("synthetic:{name}"),
            ModelSource::Checkpoint(c) => c.path().display().to_string(),
            ModelSource::Variant { variant, inner } => format!("{} ({variant})", inner.describe()),
        }
    }

    /// Whether the relative path exists in this model.
    pub fn exists(&self, rel: &str) -> bool {
        match self {
            ModelSource::Dir(p) => p.join(rel).is_file(),
            ModelSource::Embedded { files, .. } => files.iter().any(|(n, _)| *n == rel),
            ModelSource::Synthetic { files, .. } => {
                files.iter().any(|(n, _)| n == rel) || is_weight_file(rel)
            }
            ModelSource::Variant { inner, .. } => inner.exists(rel),
            ModelSource::Checkpoint(c) => {
                c.file(rel).is_some()
                    || rel
                        .split_once('/')
                        .is_some_and(|(comp, f)| is_weight_file(f) && c.has_component(comp))
            }
        }
    }

    fn missing(&self, rel: &str) -> ModelError {
        ModelError::MissingFile {
            source_desc: self.describe(),
            path: rel.to_string(),
        }
    }

    /// Why a component has no weights: a pickle in their place is named as such.
    fn no_weights(&self, component: &str) -> ModelError {
        if let ModelSource::Dir(p) = self {
            let pickle = std::fs::read_dir(p.join(component))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|f| is_pickle(f))
                .min();
            if let Some(f) = pickle {
                return ModelError::Pickle {
                    path: f.display().to_string(),
                };
            }
        }
        self.missing(&format!("{component}/{}.safetensors", WEIGHT_STEMS[0]))
    }

    /// The bytes of a file.
    pub fn read(&self, rel: &str) -> Result<Cow<'static, [u8]>> {
        match self {
            ModelSource::Dir(p) => {
                let path = p.join(rel);
                if !path.is_file() {
                    return Err(self.missing(rel));
                }
                std::fs::read(&path)
                    .map(Cow::Owned)
                    .map_err(|source| ModelError::Io {
                        path: path.display().to_string(),
                        source,
                    })
            }
            ModelSource::Embedded { files, .. } => files
                .iter()
                .find(|(n, _)| *n == rel)
                .map(|(_, b)| Cow::Borrowed(*b))
                .ok_or_else(|| self.missing(rel)),
            ModelSource::Synthetic { files, .. } => files
                .iter()
                .find(|(n, _)| n == rel)
                .map(|(_, b)| Cow::Owned(b.clone()))
                .ok_or_else(|| self.missing(rel)),
            ModelSource::Checkpoint(c) => c
                .file(rel)
                .map(|b| Cow::Owned(b.to_vec()))
                .ok_or_else(|| self.missing(rel)),
            ModelSource::Variant { inner, .. } => inner.read(rel),
        }
    }

    /// A file as UTF-8 text.
    pub fn read_string(&self, rel: &str) -> Result<String> {
        let bytes = self.read(rel)?;
        String::from_utf8(bytes.into_owned()).map_err(|e| ModelError::Io {
            path: rel.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// A JSON file parsed into `T`.
    pub fn read_json<T: DeserializeOwned>(&self, rel: &str) -> Result<T> {
        let bytes = self.read(rel)?;
        serde_json::from_slice(&bytes).map_err(|source| ModelError::Json {
            path: format!("{}/{rel}", self.describe()),
            source,
        })
    }

    /// The weights of one component folder (`unet`, `vae`, `text_encoder`, ...) as a VarBuilder.
    pub fn var_builder(
        &self,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        self.var_builder_preferring(component, dtype, device, None)
    }

    fn var_builder_preferring(
        &self,
        component: &str,
        dtype: DType,
        device: &Device,
        variant: Option<&str>,
    ) -> Result<VarBuilder<'static>> {
        if let ModelSource::Variant { variant, inner } = self {
            return inner.var_builder_preferring(component, dtype, device, Some(variant));
        }
        let candidates = weight_files(variant, dtype);
        let rel = candidates
            .iter()
            .map(|f| format!("{component}/{f}"))
            .find(|rel| self.exists(rel))
            .ok_or_else(|| self.no_weights(component))?;
        if let Some(v) = variant {
            if !rel.contains(&format!(".{v}.")) {
                tracing::warn!(source = %self.describe(), component, variant = v, file = %rel, "no variant weights for this component: loading the plain file");
            }
        }
        match self {
            ModelSource::Dir(p) => {
                let path: PathBuf = p.join(&rel);
                // SAFETY: the file is memory-mapped read-only; the server never writes model files and
                // treats changing them while serving as unsupported (documented in the README).
                let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device)? };
                Ok(vb)
            }
            ModelSource::Embedded { files, .. } => {
                let bytes: &'static [u8] = files
                    .iter()
                    .find(|(n, _)| *n == rel)
                    .map(|(_, b)| *b)
                    .ok_or_else(|| self.missing(&rel))?;
                Ok(VarBuilder::from_slice_safetensors(bytes, dtype, device)?)
            }
            // Every weight is created on first use, zero-filled, with the shape the model asks for.
            // Plain tensors, not training variables: ops on a variable record the graph, and the
            // denoising loop's latents would then keep every step's activations alive.
            ModelSource::Synthetic { .. } => Ok(VarBuilder::from_backend(
                Box::new(MaterialisedZeros),
                dtype,
                device.clone(),
            )),
            ModelSource::Checkpoint(c) => c.var_builder(component, dtype, device),
            ModelSource::Variant { .. } => unreachable!("handled above"),
        }
    }

    /// The folder, when this source is one on disk.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            ModelSource::Dir(p) => Some(p),
            ModelSource::Variant { inner, .. } => inner.dir(),
            ModelSource::Embedded { .. }
            | ModelSource::Synthetic { .. }
            | ModelSource::Checkpoint(_) => None,
        }
    }
}

/// Zero weights that occupy real memory. A plain zero-filled CPU allocation is lazily mapped to
/// the kernel's one shared zero page, which would make a real-sized model look free (no resident
/// memory, every weight read a cache hit); writing the zeros makes it cost what real weights cost.
struct MaterialisedZeros;

impl candle_nn::var_builder::SimpleBackend for MaterialisedZeros {
    fn get(
        &self,
        shape: candle_core::Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        if device.is_cpu() {
            // `ones` writes every element; the affine map writes zeros into a fresh buffer.
            candle_core::Tensor::ones(shape, dtype, device)?.affine(0.0, 0.0)
        } else {
            candle_core::Tensor::zeros(shape, dtype, device)
        }
    }

    fn get_unchecked(
        &self,
        name: &str,
        _: DType,
        _: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::bail!("synthetic weights need a shape (asked for `{name}` without one)")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn is_weight_file(rel: &str) -> bool {
    weight_files(None, DType::F32)
        .iter()
        .any(|f| rel.ends_with(f.as_str()))
}
