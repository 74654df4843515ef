//! LoRAs: read at start from the two common file formats, kept beside the base weights
//! (never merged), applied per batch row with a scale that may change at every step.
//!
//! Formats:
//! - **kohya / A1111** (`lora_unet_*`, `lora_te_*`, `lora_te1_*`, `lora_te2_*`, with
//!   `.lora_down.weight`, `.lora_up.weight` and `.alpha`): module names with `_` for `.`, in
//!   diffusers' UNet naming or the original one (`input_blocks_4_1_...`, as SDXL trainers write);
//! - **diffusers / PEFT** (`unet.<module>.lora_A.weight` / `lora_B.weight`, `text_encoder.`,
//!   `text_encoder_2.`; the older `lora.down` / `lora.up`): alpha from `.alpha` keys or the
//!   `lora_adapter_metadata` diffusers writes (`lora_alpha`, `alpha_pattern`, `use_rslora`).
//!
//! Each pair is matched to an adaptable layer of the model by name (see [`layer`]); a module
//! the model does not have as an adaptable layer, or whose widths differ, refuses the file.

pub mod layer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::tensor_file::TensorFile;

pub use layer::{LoraScales, LoraSlot, Scale};

/// What can go wrong reading or attaching a LoRA.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file could not be read as safetensors.
    #[error("LoRA `{name}` ({path}): {reason}")]
    Unreadable {
        /// The LoRA's name.
        name: String,
        /// Its file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file is not a LoRA of a supported kind.
    #[error("LoRA `{name}` ({path}): {reason}")]
    Unsupported {
        /// The LoRA's name.
        name: String,
        /// Its file.
        path: String,
        /// What it is and what is supported.
        reason: String,
    },
    /// A module does not fit the model.
    #[error("LoRA `{name}` does not fit model `{model}`: {component} `{module}`: {reason}")]
    DoesNotFit {
        /// The LoRA's name.
        name: String,
        /// The model.
        model: String,
        /// `unet`, `text_encoder` or `text_encoder_2`.
        component: String,
        /// The module, as the file names it.
        module: String,
        /// Why.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The file format a LoRA came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya-ss / A1111 / ComfyUI (`lora_unet_*`, `lora_te*_*`).
    Kohya,
    /// diffusers / PEFT (`unet.*.lora_A.weight`).
    Diffusers,
}

impl LoraFormat {
    /// The wire name (`kohya`, `diffusers`).
    pub fn as_str(self) -> &'static str {
        match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Diffusers => "diffusers",
        }
    }
}

/// The network a pair adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// The UNet.
    Unet,
    /// The (first) text encoder.
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Target {
    /// The diffusers component name.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Unet => "unet",
            Target::TextEncoder => "text_encoder",
            Target::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// One low-rank pair as read from a file.
#[derive(Debug)]
pub struct Pair {
    /// The network it adapts.
    pub target: Target,
    /// The module as the file names it (dots or underscores).
    pub module: String,
    /// `A`, `[r, in]` or `[r, in, 1, 1]`.
    pub down: Tensor,
    /// `B`, `[out, r]` or `[out, r, 1, 1]`.
    pub up: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA).
    pub factor: f64,
}

/// A LoRA file, read.
#[derive(Debug)]
pub struct LoraFile {
    /// The name requests use.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: LoraFormat,
    /// Its pairs.
    pub pairs: Vec<Pair>,
}

/// The per-component PEFT settings diffusers stores in `lora_adapter_metadata`.
#[derive(Debug, Default)]
struct PeftSettings {
    alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

fn peft_settings(meta: &BTreeMap<String, String>, component: &str) -> PeftSettings {
    let Some(v) = meta
        .get("lora_adapter_metadata")
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
    else {
        return PeftSettings::default();
    };
    let get = |k: &str| v.get(format!("{component}.{k}"));
    PeftSettings {
        alpha: get("lora_alpha").and_then(Value::as_f64),
        alpha_pattern: get("alpha_pattern")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, a)| Some((k.clone(), a.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default(),
        rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
    }
}

impl LoraFile {
    /// Reads `path` as the LoRA `name`.
    pub fn read(name: &str, path: &Path) -> Result<LoraFile, LoraError> {
        let unreadable = |reason: String| LoraError::Unreadable {
            name: name.to_string(),
            path: path.display().to_string(),
            reason,
        };
        let unsupported = |reason: &str| LoraError::Unsupported {
            name: name.to_string(),
            path: path.display().to_string(),
            reason: reason.to_string(),
        };
        if crate::models::source::is_pickle(path) {
            return Err(unsupported(
                "a Python pickle: loading one can run arbitrary code; use the .safetensors file",
            ));
        }
        let file = TensorFile::open(path)
            .map_err(|e| unreadable(format!("not a readable safetensors file ({e})")))?;
        let tensors: HashMap<String, Tensor> = file
            .names()
            .map(|n| Ok((n.to_string(), file.load(n)?)))
            .collect::<candle_core::Result<_>>()?;
        let keys: BTreeSet<&str> = tensors.keys().map(String::as_str).collect();
        if keys
            .iter()
            .any(|k| k.contains("hada_") || k.contains("lokr_"))
        {
            return Err(unsupported(
                "a LyCORIS LoHa/LoKr network; only plain LoRA (low-rank pairs) is supported",
            ));
        }
        if keys
            .iter()
            .any(|k| k.contains("dora_scale") || k.contains("lora_magnitude_vector"))
        {
            return Err(unsupported("a DoRA; only plain LoRA is supported"));
        }
        let (format, pairs) = if keys
            .iter()
            .any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te"))
        {
            (LoraFormat::Kohya, kohya_pairs(&tensors, &unsupported)?)
        } else if keys.iter().any(|k| {
            k.contains(".lora_A.") || k.contains(".lora.down.") || k.contains(".lora_A.default.")
        }) {
            (
                LoraFormat::Diffusers,
                diffusers_pairs(&tensors, file.metadata(), &unsupported)?,
            )
        } else if keys.iter().any(|k| k.contains("_lora.down.")) {
            return Err(unsupported(
                "diffusers' pre-PEFT attention-processor format (`processor.to_q_lora`); \
                 re-save it with a current diffusers (`save_lora_weights`)",
            ));
        } else {
            return Err(unsupported(
                "no LoRA keys: expected kohya (`lora_unet_*.lora_down.weight`) or diffusers/PEFT \
                 (`unet.*.lora_A.weight`) names",
            ));
        };
        if pairs.is_empty() {
            return Err(unsupported("no low-rank pairs"));
        }
        Ok(LoraFile {
            name: name.to_string(),
            path: path.to_path_buf(),
            format,
            pairs,
        })
    }
}

type Unsupported<'a> = dyn Fn(&str) -> LoraError + 'a;

/// A module's `(down, up, alpha)` as gathered from its keys.
type Parts<'a> = (Option<&'a Tensor>, Option<&'a Tensor>, Option<f64>);

fn rank_of(down: &Tensor) -> usize {
    down.dims().first().copied().unwrap_or(1).max(1)
}

fn factor(alpha: Option<f64>, rank: usize, rslora: bool) -> f64 {
    let r = rank as f64;
    match alpha {
        Some(a) if rslora => a / r.sqrt(),
        Some(a) => a / r,
        None => 1.0,
    }
}

fn scalar(t: &Tensor) -> Option<f64> {
    t.to_dtype(DType::F64)
        .ok()?
        .flatten_all()
        .ok()?
        .to_vec1::<f64>()
        .ok()?
        .first()
        .copied()
}

fn kohya_pairs(
    tensors: &HashMap<String, Tensor>,
    unsupported: &Unsupported,
) -> Result<Vec<Pair>, LoraError> {
    let mut modules: BTreeMap<&str, Parts> = BTreeMap::new();
    for (k, t) in tensors {
        let (module, part) = k.split_once('.').unwrap_or((k, ""));
        let entry = modules.entry(module).or_default();
        match part {
            "lora_down.weight" => entry.0 = Some(t),
            "lora_up.weight" => entry.1 = Some(t),
            "alpha" => entry.2 = scalar(t),
            _ => {}
        }
    }
    let mut pairs = Vec::new();
    for (module, (down, up, alpha)) in modules {
        let (target, rest) = if let Some(r) = module.strip_prefix("lora_unet_") {
            (Target::Unet, r)
        } else if let Some(r) = module.strip_prefix("lora_te1_") {
            (Target::TextEncoder, r)
        } else if let Some(r) = module.strip_prefix("lora_te2_") {
            (Target::TextEncoder2, r)
        } else if let Some(r) = module.strip_prefix("lora_te_") {
            (Target::TextEncoder, r)
        } else {
            continue;
        };
        let (Some(down), Some(up)) = (down, up) else {
            return Err(unsupported(&format!(
                "`{module}` lacks its lora_down or lora_up weight"
            )));
        };
        pairs.push(Pair {
            target,
            module: rest.to_string(),
            down: down.clone(),
            up: up.clone(),
            factor: factor(alpha, rank_of(down), false),
        });
    }
    Ok(pairs)
}

fn diffusers_pairs(
    tensors: &HashMap<String, Tensor>,
    meta: &BTreeMap<String, String>,
    unsupported: &Unsupported,
) -> Result<Vec<Pair>, LoraError> {
    let mut modules: BTreeMap<(Target, String), Parts> = BTreeMap::new();
    for (k, t) in tensors {
        let (target, rest) = if let Some(r) = k.strip_prefix("unet.") {
            (Target::Unet, r)
        } else if let Some(r) = k.strip_prefix("text_encoder_2.") {
            (Target::TextEncoder2, r)
        } else if let Some(r) = k.strip_prefix("text_encoder.") {
            (Target::TextEncoder, r)
        } else {
            continue;
        };
        let rest = rest
            .replace(".lora_A.default.", ".lora_A.")
            .replace(".lora_B.default.", ".lora_B.");
        let (module, which) = if let Some(m) = rest
            .strip_suffix(".lora_A.weight")
            .or_else(|| rest.strip_suffix(".lora.down.weight"))
        {
            (m.to_string(), 0)
        } else if let Some(m) = rest
            .strip_suffix(".lora_B.weight")
            .or_else(|| rest.strip_suffix(".lora.up.weight"))
        {
            (m.to_string(), 1)
        } else if let Some(m) = rest.strip_suffix(".alpha") {
            (m.to_string(), 2)
        } else if rest.ends_with(".lora_B.bias") || rest.ends_with(".lora_A.bias") {
            return Err(unsupported(
                "LoRA with biases (PEFT lora_bias) is not supported",
            ));
        } else {
            continue;
        };
        let entry = modules.entry((target, module)).or_default();
        match which {
            0 => entry.0 = Some(t),
            1 => entry.1 = Some(t),
            _ => entry.2 = scalar(t),
        }
    }
    let settings: HashMap<Target, PeftSettings> =
        [Target::Unet, Target::TextEncoder, Target::TextEncoder2]
            .into_iter()
            .map(|t| (t, peft_settings(meta, t.as_str())))
            .collect();
    let mut pairs = Vec::new();
    for ((target, module), (down, up, alpha)) in modules {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(unsupported(&format!(
                "{} `{module}` lacks its lora_A or lora_B weight",
                target.as_str()
            )));
        };
        let s = &settings[&target];
        // PEFT's alpha_pattern keys match a module name or its trailing part.
        let patterned = s
            .alpha_pattern
            .iter()
            .find(|(p, _)| module == *p || module.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a);
        let alpha = alpha.or(patterned).or(s.alpha);
        pairs.push(Pair {
            target,
            module,
            down: down.clone(),
            up: up.clone(),
            factor: factor(alpha, rank_of(down), s.rslora),
        });
    }
    Ok(pairs)
}

/// A module name reduced to compare across formats: `text_model.` dropped, `.` as `_`.
pub(crate) fn flat(module: &str) -> String {
    let m = module.strip_prefix("text_model.").unwrap_or(module);
    let m = m.strip_prefix("text_model_").unwrap_or(m);
    m.replace('.', "_")
}

/// The adaptable layers of one network, by flattened name (and any aliases, e.g. the original
/// UNet naming for kohya SDXL files).
#[derive(Debug, Default)]
pub struct Slots {
    by_name: HashMap<String, Arc<LoraSlot>>,
    all: Vec<Arc<LoraSlot>>,
}

impl Slots {
    /// Indexes `slots` under their flattened names and `alias(name)` for each.
    pub(crate) fn new(slots: Vec<Arc<LoraSlot>>, alias: impl Fn(&str) -> Option<String>) -> Self {
        let mut by_name = HashMap::new();
        for s in &slots {
            if let Some(a) = alias(&s.module) {
                by_name.insert(flat(&a), s.clone());
            }
            by_name.insert(flat(&s.module), s.clone());
        }
        Self {
            by_name,
            all: slots,
        }
    }

    /// Every adaptable layer, in construction order.
    pub fn all(&self) -> &[Arc<LoraSlot>] {
        &self.all
    }

    /// The slot a file's module name means.
    pub fn find(&self, module: &str) -> Option<&Arc<LoraSlot>> {
        self.by_name.get(&flat(module))
    }

    /// How many adaptable layers there are.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

/// What ListModels says of a loaded LoRA.
#[derive(Clone, Debug)]
pub struct LoraInfo {
    /// The name requests use.
    pub name: String,
    /// The file format.
    pub format: LoraFormat,
    /// The modules it adapts, as `component.module` in diffusers naming.
    pub modules: Vec<String>,
    /// The largest rank among its pairs.
    pub rank: usize,
}

/// Checks `file` against the model's slots and attaches every pair as adapter `index`.
/// Either every pair fits and all attach, or none does.
pub(crate) fn attach(
    file: &LoraFile,
    index: usize,
    model: &str,
    slots: &HashMap<Target, &Slots>,
    scales: &Arc<LoraScales>,
    dtype: DType,
    device: &Device,
) -> Result<LoraInfo, LoraError> {
    let mut planned = Vec::new();
    for pair in &file.pairs {
        let doesnt_fit = |reason: String| LoraError::DoesNotFit {
            name: file.name.clone(),
            model: model.to_string(),
            component: pair.target.as_str().to_string(),
            module: pair.module.clone(),
            reason,
        };
        let Some(slot) = slots.get(&pair.target).and_then(|s| s.find(&pair.module)) else {
            return Err(doesnt_fit(if slots.contains_key(&pair.target) {
                "not an adaptable layer of this model (LoRAs apply to attention, feed-forward and \
                 proj_in/proj_out layers, and to the text encoders' attention and MLP)"
                    .into()
            } else {
                "the model has no such network".into()
            }));
        };
        let as_matrix = |t: &Tensor, what: &str| -> Result<Tensor, LoraError> {
            match t.dims() {
                [a, b] => Ok(t.reshape((*a, *b))?),
                [a, b, 1, 1] => Ok(t.reshape((*a, *b))?),
                dims => Err(doesnt_fit(format!(
                    "{what} has shape {dims:?}; only linear and 1x1-convolution LoRAs are \
                     supported (not LoCon on 3x3 convolutions)"
                ))),
            }
        };
        let down = as_matrix(&pair.down, "lora_down")?;
        let up = as_matrix(&pair.up, "lora_up")?;
        let (r, inp) = down.dims2()?;
        let (out, r2) = up.dims2()?;
        if r != r2 || inp != slot.in_dim || out != slot.out_dim {
            return Err(doesnt_fit(format!(
                "the pair maps {inp} -> rank {r} / rank {r2} -> {out}, the layer {} -> {}",
                slot.in_dim, slot.out_dim
            )));
        }
        planned.push((slot.clone(), down, up, pair.factor, r));
    }
    let mut modules = Vec::new();
    let mut rank = 0;
    for ((slot, down, up, factor, r), pair) in planned.into_iter().zip(&file.pairs) {
        slot.attach(
            layer::Delta {
                adapter: index,
                down: down.to_dtype(dtype)?.to_device(device)?,
                up: up.to_dtype(dtype)?.to_device(device)?,
                factor,
            },
            scales,
        );
        modules.push(format!("{}.{}", pair.target.as_str(), slot.module));
        rank = rank.max(r);
    }
    modules.sort();
    Ok(LoraInfo {
        name: file.name.clone(),
        format: file.format,
        modules,
        rank,
    })
}
