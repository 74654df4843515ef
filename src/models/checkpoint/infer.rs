//! The diffusers config and tokenizer files of a checkpoint: read from a `--model-config`
//! folder, or inferred from key names and shapes.
//!
//! Inference follows diffusers' `from_single_file`, which takes the configs of the family's
//! reference repository (SD 1.5, SD 2.1, SDXL base 1.0): the same fixed values here, with every
//! size (channels, depths, widths, vocabulary) read from the weights instead, so pruned and
//! resized models load too. What weights cannot tell is taken from the family: attention heads
//! (SD 1.x: 8; SD 2.x and XL: 64 channels each), norm groups (32), the scheduler, and SD 2.x's
//! prediction type (`v_prediction`, as diffusers; `--prediction-type epsilon` for a 512-base
//! model).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};

use super::{has_prefix, CheckpointOptions, SD1_TEXT, SD2_TEXT, UNET, VAE, XL_TEXT_1, XL_TEXT_2};
use crate::models::pipeline_model::Family;
use crate::models::{ModelError, Result};

/// The full CLIP BPE vocabulary (`openai/clip-vit-large-patch14`'s, shared by OpenCLIP), compiled in.
const CLIP_VOCAB: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/tokenizers/clip-full/vocab.json"
));
/// Its merges.
const CLIP_MERGES: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/tokenizers/clip-full/merges.txt"
));

type Files = Vec<(String, Vec<u8>)>;
type Shapes = BTreeMap<String, Vec<usize>>;

/// The config and tokenizer files of a diffusers folder (every `.json` and `.txt` at its top and
/// one level down; weights are not read).
pub(super) fn files_from_dir(dir: &Path, family: Family) -> Result<Files> {
    let io = |path: &Path, source| ModelError::Io {
        path: path.display().to_string(),
        source,
    };
    if !dir.join("model_index.json").is_file() {
        return Err(ModelError::NotAModel {
            path: dir.display().to_string(),
            reason: "--model-config takes a diffusers folder (with model_index.json) of the \
                     checkpoint's architecture"
                .into(),
        });
    }
    let mut files = vec![(
        "model_index.json".to_string(),
        std::fs::read(dir.join("model_index.json")).map_err(|e| io(dir, e))?,
    )];
    let mut subdirs: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for sub in subdirs {
        let Some(name) = sub.file_name().and_then(|n| n.to_str()).map(String::from) else {
            continue;
        };
        for entry in std::fs::read_dir(&sub).map_err(|e| io(&sub, e))?.flatten() {
            let p = entry.path();
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if p.is_file() && matches!(ext, "json" | "txt") {
                let file = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                files.push((
                    format!("{name}/{file}"),
                    std::fs::read(&p).map_err(|e| io(&p, e))?,
                ));
            }
        }
    }
    let index: Value = serde_json::from_slice(&files[0].1).map_err(|source| ModelError::Json {
        path: dir.join("model_index.json").display().to_string(),
        source,
    })?;
    let class = index["_class_name"].as_str().unwrap_or("");
    let xl = class == "StableDiffusionXLPipeline";
    if xl != (family == Family::Sdxl) {
        return Err(ModelError::Unsupported {
            path: dir.display().to_string(),
            reason: format!(
                "--model-config is a `{class}` folder, but the checkpoint is {}",
                family_words(family)
            ),
        });
    }
    Ok(files)
}

fn family_words(family: Family) -> &'static str {
    match family {
        Family::Sd1 => "an SD 1.x model",
        Family::Sd2 => "an SD 2.x model",
        Family::Sdxl => "an SDXL model",
    }
}

/// `files` with the scheduler's `prediction_type` set.
pub(super) fn with_prediction_type(mut files: Files, prediction_type: &str) -> Result<Files> {
    const REL: &str = "scheduler/scheduler_config.json";
    let slot = files
        .iter_mut()
        .find(|(n, _)| n == REL)
        .ok_or_else(|| ModelError::MissingFile {
            source_desc: "--model-config".into(),
            path: REL.into(),
        })?;
    let mut cfg: Value = serde_json::from_slice(&slot.1).map_err(|source| ModelError::Json {
        path: REL.into(),
        source,
    })?;
    cfg["prediction_type"] = json!(prediction_type);
    slot.1 = cfg.to_string().into_bytes();
    Ok(files)
}

/// Reads shapes under one prefix, with a clear error for a missing key.
struct Reader<'a> {
    path: &'a Path,
    shapes: &'a Shapes,
}

impl Reader<'_> {
    fn get(&self, key: &str) -> Option<&[usize]> {
        self.shapes.get(key).map(Vec::as_slice)
    }

    fn need(&self, key: &str) -> Result<&[usize]> {
        self.get(key)
            .ok_or_else(|| self.cannot(&format!("it has no `{key}`")))
    }

    fn dim(&self, key: &str, i: usize) -> Result<usize> {
        let s = self.need(key)?;
        s.get(i)
            .copied()
            .ok_or_else(|| self.cannot(&format!("`{key}` has shape {s:?}")))
    }

    /// The distinct indices `N` of keys `prefix N.`.
    fn indices(&self, prefix: &str) -> BTreeSet<usize> {
        self.shapes
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, _)| k[prefix.len()..].split('.').next()?.parse().ok())
            .collect()
    }

    fn cannot(&self, why: &str) -> ModelError {
        ModelError::Unsupported {
            path: self.path.display().to_string(),
            reason: format!(
                "cannot infer the model's configs: {why}; give --model-config DIR, a diffusers \
                 folder of this architecture (its weights are not read)"
            ),
        }
    }
}

/// The configs and tokenizers of a checkpoint, inferred from its weights.
pub(super) fn files_from_weights(
    path: &Path,
    family: Family,
    shapes: &Shapes,
    options: &CheckpointOptions,
) -> Result<Files> {
    let r = Reader { path, shapes };
    let v_prediction = match options.prediction_type.as_deref() {
        Some(p) => p == "v_prediction",
        None => {
            if family == Family::Sd2 {
                tracing::warn!(
                    checkpoint = %path.display(),
                    "SD 2.x weights cannot tell v-prediction (768-v models) from epsilon (512-base \
                     models): using v_prediction, as diffusers does; pass --prediction-type epsilon \
                     for a base model"
                );
            }
            family == Family::Sd2
        }
    };
    let (text, text_2) = match family {
        Family::Sd1 => (clip_config(&r, SD1_TEXT)?, None),
        Family::Sd2 => (open_clip_config(&r, SD2_TEXT, false)?, None),
        Family::Sdxl => (
            clip_config(&r, XL_TEXT_1)?,
            Some(open_clip_config(&r, XL_TEXT_2, true)?),
        ),
    };
    let pooled = text_2
        .as_ref()
        .and_then(|t| t["projection_dim"].as_u64())
        .unwrap_or(0) as usize;
    let unet = unet_config(&r, family, v_prediction, pooled)?;
    let vae = vae_config(&r, family)?;
    let mut files: Files = vec![
        (
            "model_index.json".into(),
            model_index(family).to_string().into_bytes(),
        ),
        ("unet/config.json".into(), unet.to_string().into_bytes()),
        ("vae/config.json".into(), vae.to_string().into_bytes()),
        (
            "text_encoder/config.json".into(),
            text.to_string().into_bytes(),
        ),
        (
            "scheduler/scheduler_config.json".into(),
            scheduler_config(family, v_prediction)
                .to_string()
                .into_bytes(),
        ),
    ];
    // SD 2.x and SDXL's second tokenizer pad with `!` (OpenCLIP's padding, id 0).
    let pad_1 = if family == Family::Sd2 {
        "!"
    } else {
        "<|endoftext|>"
    };
    files.extend(tokenizer("tokenizer", pad_1));
    if let Some(t2) = text_2 {
        files.push((
            "text_encoder_2/config.json".into(),
            t2.to_string().into_bytes(),
        ));
        files.extend(tokenizer("tokenizer_2", "!"));
    }
    Ok(files)
}

fn tokenizer(folder: &str, pad: &str) -> Files {
    let config = json!({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad,
    });
    vec![
        (format!("{folder}/vocab.json"), CLIP_VOCAB.to_vec()),
        (format!("{folder}/merges.txt"), CLIP_MERGES.to_vec()),
        (
            format!("{folder}/tokenizer_config.json"),
            config.to_string().into_bytes(),
        ),
    ]
}

fn model_index(family: Family) -> Value {
    let mut index = json!({
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    match family {
        Family::Sd1 => index["scheduler"] = json!(["diffusers", "PNDMScheduler"]),
        Family::Sd2 => {}
        Family::Sdxl => {
            index["_class_name"] = json!("StableDiffusionXLPipeline");
            index["scheduler"] = json!(["diffusers", "EulerDiscreteScheduler"]);
            index["text_encoder_2"] = json!(["transformers", "CLIPTextModelWithProjection"]);
            index["tokenizer_2"] = json!(["transformers", "CLIPTokenizer"]);
            index["force_zeros_for_empty_prompt"] = json!(true);
        }
    }
    index
}

/// The reference repositories' schedulers: SD 1.5 PNDM, SD 2.1 DDIM, SDXL Euler.
fn scheduler_config(family: Family, v_prediction: bool) -> Value {
    let mut cfg = json!({
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": false,
        "set_alpha_to_one": false, "trained_betas": null,
        "prediction_type": if v_prediction { "v_prediction" } else { "epsilon" },
    });
    match family {
        Family::Sd1 => {
            cfg["_class_name"] = json!("PNDMScheduler");
            cfg["skip_prk_steps"] = json!(true);
        }
        Family::Sd2 => cfg["_class_name"] = json!("DDIMScheduler"),
        Family::Sdxl => {
            cfg["_class_name"] = json!("EulerDiscreteScheduler");
            cfg["interpolation_type"] = json!("linear");
            cfg["timestep_spacing"] = json!("leading");
            cfg["use_karras_sigmas"] = json!(false);
            cfg["skip_prk_steps"] = json!(true);
        }
    }
    cfg
}

/// A transformers CLIP text model (SD 1.x; SDXL's first encoder): CLIP ViT-L's fixed values.
fn clip_config(r: &Reader, prefix: &str) -> Result<Value> {
    let base = if has_prefix(r.shapes, &format!("{prefix}text_model.")) {
        format!("{prefix}text_model.")
    } else {
        prefix.to_string()
    };
    let tok = r.need(&format!("{base}embeddings.token_embedding.weight"))?;
    let (vocab, hidden) = (tok[0], tok[1]);
    let positions = r.dim(&format!("{base}embeddings.position_embedding.weight"), 0)?;
    let layers = r.indices(&format!("{base}encoder.layers.")).len();
    let intermediate = r.dim(&format!("{base}encoder.layers.0.mlp.fc1.weight"), 0)?;
    Ok(json!({
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "hidden_act": "quick_gelu", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_attention_heads": heads_of_64(r, hidden, "text encoder")?,
        "num_hidden_layers": layers, "max_position_embeddings": positions,
        "vocab_size": vocab, "layer_norm_eps": 1e-5, "projection_dim": 768,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }))
}

/// An OpenCLIP text tower. SD 2.x conditions on its penultimate layer, which diffusers makes the
/// last one (23 of 24 layers); SDXL keeps all of them and reads the penultimate hidden state.
fn open_clip_config(r: &Reader, prefix: &str, with_projection: bool) -> Result<Value> {
    let tok = r.need(&format!("{prefix}token_embedding.weight"))?;
    let (vocab, hidden) = (tok[0], tok[1]);
    let positions = r.dim(&format!("{prefix}positional_embedding"), 0)?;
    let blocks = r.indices(&format!("{prefix}transformer.resblocks.")).len();
    let intermediate = r.dim(
        &format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"),
        0,
    )?;
    let (layers, projection, arch) = if with_projection {
        let proj = r.dim(&format!("{prefix}text_projection"), 1)?;
        (blocks, proj, "CLIPTextModelWithProjection")
    } else {
        (blocks.saturating_sub(1), 512, "CLIPTextModel")
    };
    Ok(json!({
        "architectures": [arch], "model_type": "clip_text_model",
        "hidden_act": "gelu", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_attention_heads": heads_of_64(r, hidden, "text encoder")?,
        "num_hidden_layers": layers, "max_position_embeddings": positions,
        "vocab_size": vocab, "layer_norm_eps": 1e-5, "projection_dim": projection,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }))
}

/// Heads of 64 channels (CLIP, OpenCLIP, SD 2.x and XL attention).
fn heads_of_64(r: &Reader, channels: usize, what: &str) -> Result<usize> {
    if channels == 0 || channels % 64 != 0 {
        return Err(r.cannot(&format!(
            "the {what} is {channels} wide, not a multiple of the 64 channels per attention head \
             its family uses, so its head count is unknown"
        )));
    }
    Ok(channels / 64)
}

fn unet_config(r: &Reader, family: Family, v_prediction: bool, pooled: usize) -> Result<Value> {
    let key = |k: &str| format!("{UNET}{k}");
    let conv_in = r.need(&key("input_blocks.0.0.weight"))?;
    let in_channels = conv_in[1];
    let out_channels = r.dim(&key("out.2.weight"), 0)?;
    let inputs = r.indices(&key("input_blocks.")).len();
    // Each level is `layers_per_block` resnets and a downsampler, the last without one:
    // conv_in + levels * (layers + 1) - 1 input blocks.
    let first_down = (1..inputs).find(|i| {
        r.get(&key(&format!("input_blocks.{i}.0.op.weight")))
            .is_some()
    });
    let layers = first_down
        .map(|i| i - 1)
        .unwrap_or(inputs.saturating_sub(1));
    let per_level = layers + 1;
    if layers == 0 || inputs % per_level != 0 {
        return Err(r.cannot(&format!(
            "{inputs} UNet input blocks do not make levels of {layers} layers"
        )));
    }
    let levels = inputs / per_level;
    let mut channels = Vec::new();
    let mut down_types = Vec::new();
    let mut depths = Vec::new();
    let mut context = None;
    let mut linear = None;
    for level in 0..levels {
        let first = 1 + level * per_level;
        channels.push(r.dim(
            &key(&format!("input_blocks.{first}.0.out_layers.3.weight")),
            0,
        )?);
        let attn = key(&format!("input_blocks.{first}.1."));
        if has_prefix(r.shapes, &attn) {
            down_types.push("CrossAttnDownBlock2D");
            depths.push(r.indices(&format!("{attn}transformer_blocks.")).len());
            context
                .get_or_insert(r.dim(&format!("{attn}transformer_blocks.0.attn2.to_k.weight"), 1)?);
            linear.get_or_insert(r.need(&format!("{attn}proj_in.weight"))?.len() == 2);
        } else {
            down_types.push("DownBlock2D");
            depths.push(1);
        }
    }
    let up_types: Vec<&str> = (0..levels)
        .map(|level| {
            let attn = key(&format!(
                "output_blocks.{}.1.norm.weight",
                level * per_level
            ));
            if r.get(&attn).is_some() {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    let Some(context) = context else {
        return Err(r.cannot("the UNet has no cross-attention"));
    };
    let heads: Value = match family {
        Family::Sd1 => {
            if channels.iter().any(|c| c % 8 != 0) {
                return Err(r.cannot(&format!(
                    "UNet channels {channels:?} do not split into SD 1.x's 8 attention heads"
                )));
            }
            json!(8)
        }
        Family::Sd2 | Family::Sdxl => json!(channels
            .iter()
            .map(|&c| heads_of_64(r, c, "UNet"))
            .collect::<Result<Vec<_>>>()?),
    };
    // SD 2.x and XL vary the transformer depth by level; SD 1.x has one everywhere.
    let depth: Value = if depths.iter().all(|&d| d == 1) {
        json!(1)
    } else {
        json!(depths)
    };
    let sample = match family {
        Family::Sd1 => 64,
        Family::Sd2 if v_prediction => 96,
        Family::Sd2 => 64,
        Family::Sdxl => 128,
    };
    let mut cfg = json!({
        "_class_name": "UNet2DConditionModel", "act_fn": "silu",
        "attention_head_dim": heads, "block_out_channels": channels,
        "center_input_sample": false, "cross_attention_dim": context,
        "down_block_types": down_types, "up_block_types": up_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1,
        "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": in_channels,
        "out_channels": out_channels, "layers_per_block": layers, "mid_block_scale_factor": 1,
        "norm_eps": 1e-5, "norm_num_groups": 32, "sample_size": sample,
        "transformer_layers_per_block": depth, "use_linear_projection": linear.unwrap_or(false),
        // SD 2.1 (768-v) upcasts attention to f32; its 512-base does not.
        "upcast_attention": family == Family::Sd2 && v_prediction,
    });
    if family == Family::Sdxl {
        let added = r.dim(&key("label_emb.0.0.weight"), 1)?;
        // The added conditioning is the pooled text embedding and six time ids.
        if added <= pooled || (added - pooled) % 6 != 0 {
            return Err(r.cannot(&format!(
                "the UNet's added conditioning takes {added} inputs, which is not the pooled \
                 {pooled} plus six time ids"
            )));
        }
        cfg["addition_embed_type"] = json!("text_time");
        cfg["addition_time_embed_dim"] = json!((added - pooled) / 6);
        cfg["projection_class_embeddings_input_dim"] = json!(added);
    }
    Ok(cfg)
}

fn vae_config(r: &Reader, family: Family) -> Result<Value> {
    let key = |k: &str| format!("{VAE}{k}");
    let levels = r.indices(&key("decoder.up.")).len();
    let layers = r.indices(&key("decoder.up.0.block.")).len();
    if levels == 0 || layers < 2 {
        return Err(r.cannot("the VAE decoder has no up levels"));
    }
    let channels = (0..levels)
        .map(|i| r.dim(&key(&format!("decoder.up.{i}.block.0.conv2.weight")), 0))
        .collect::<Result<Vec<_>>>()?;
    let latent = r.dim(&key("decoder.conv_in.weight"), 1)?;
    let out = r.dim(&key("decoder.conv_out.weight"), 0)?;
    let (scaling, px) = match family {
        Family::Sd1 => (0.18215, 512),
        Family::Sd2 => (0.18215, 768),
        Family::Sdxl => (0.13025, 1024),
    };
    Ok(json!({
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "in_channels": 3, "out_channels": out, "latent_channels": latent,
        // The decoder has one more resnet per level than the encoder's `layers_per_block`.
        "layers_per_block": layers - 1, "norm_num_groups": 32, "sample_size": px,
        "scaling_factor": scaling,
        // SDXL's VAE overflows in f16 (diffusers' SDXL config sets this).
        "force_upcast": family == Family::Sdxl,
    }))
}
