//! The CLIP text encoder (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`), built from its
//! `config.json` and run in the dtype of its weights.
//!
//! Matches transformers 5.x: token + position embeddings, pre-norm transformer layers with a causal
//! self-attention mask, a final layer norm, pooling at the first EOS token (or at the largest id for
//! legacy configs whose `eos_token_id` is 2) and an optional bias-free `text_projection`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::lora::layer::{self as lora, LoraLinear};
use crate::kernels::LayerNorm;
use serde::Deserialize;

use super::{ModelError, ModelSource, Result};

/// The text encoder's `config.json` (transformers `CLIPTextConfig`); missing keys take transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    /// Number of token embeddings.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the hidden states.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Output width of `text_projection` (only used when the weights have one).
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// Number of transformer layers.
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads per layer.
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    /// Number of positions (the longest token sequence).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// MLP activation: `quick_gelu`, `gelu` (exact erf), `gelu_new` / `gelu_pytorch_tanh` (tanh approximation).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Epsilon of every layer norm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id.
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: u32,
    /// Start-of-text token id.
    #[serde(default = "default_bos_token_id")]
    pub bos_token_id: u32,
    /// End-of-text token id (the pooled output is taken at its first occurrence).
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: u32,
    /// transformers' `model_type`; only `clip_text_model` is supported.
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_projection_dim() -> usize {
    512
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".to_string()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_pad_token_id() -> u32 {
    1
}
fn default_bos_token_id() -> u32 {
    49406
}
fn default_eos_token_id() -> u32 {
    49407
}

/// The MLP activations a CLIP text encoder may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD1.x).
    QuickGelu,
    /// Exact GELU with erf (`gelu`; OpenCLIP ViT-H / bigG).
    GeluErf,
    /// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl ClipActivation {
    fn forward(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            ClipActivation::QuickGelu => crate::kernels::quick_gelu(xs),
            ClipActivation::GeluErf => xs.gelu_erf(),
            ClipActivation::GeluTanh => xs.gelu(),
        }
    }
}

impl ClipTextConfig {
    /// Reads and checks `<component>/config.json` (e.g. `text_encoder`, `text_encoder_2`).
    pub fn load(source: &ModelSource, component: &str) -> Result<Self> {
        let path = format!("{component}/config.json");
        let cfg: ClipTextConfig = source.read_json(&path)?;
        cfg.validate(&format!("{}/{path}", source.describe()))?;
        Ok(cfg)
    }

    /// The configured MLP activation, or `Unsupported` for one this implementation lacks.
    pub fn activation(&self) -> Result<ClipActivation> {
        self.activation_at("text encoder config")
    }

    fn activation_at(&self, path: &str) -> Result<ClipActivation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(ClipActivation::QuickGelu),
            "gelu" => Ok(ClipActivation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(ClipActivation::GeluTanh),
            other => Err(unsupported(
                path,
                format!("hidden_act = {other:?} (supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)"),
            )),
        }
    }

    /// Checks that every setting is one this implementation handles; `path` names the config in errors.
    pub fn validate(&self, path: &str) -> Result<()> {
        if let Some(mt) = &self.model_type {
            if mt != "clip_text_model" {
                return Err(unsupported(
                    path,
                    format!("model_type = {mt:?} (only \"clip_text_model\")"),
                ));
            }
        }
        self.activation_at(path)?;
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(unsupported(
                path,
                format!(
                    "hidden_size = {} is not a multiple of num_attention_heads = {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err(unsupported(path, "num_hidden_layers = 0".to_string()));
        }
        Ok(())
    }
}

fn unsupported(path: &str, reason: String) -> ModelError {
    ModelError::Unsupported {
        path: path.to_string(),
        reason,
    }
}

#[derive(Clone, Debug)]
struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    out_proj: LoraLinear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.num_attention_heads;
        Ok(Self {
            q_proj: lora::linear(h, h, vb.pp("q_proj"))?,
            k_proj: lora::linear(h, h, vb.pp("k_proj"))?,
            v_proj: lora::linear(h, h, vb.pp("v_proj"))?,
            out_proj: lora::linear(h, h, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// Causal self-attention over `xs` [B, S, H].
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let q = self.q_proj.forward(xs)?;
        let k = self.k_proj.forward(xs)?;
        let v = self.v_proj.forward(xs)?;
        let out = crate::kernels::causal_attention(&q, &k, &v, self.num_heads, self.scale)?;
        self.out_proj.forward(&out)
    }
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: LoraLinear,
    fc2: LoraLinear,
    act: ClipActivation,
}

impl EncoderLayer {
    fn new(cfg: &ClipTextConfig, act: ClipActivation, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            fc1: lora::linear(h, cfg.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: lora::linear(cfg.intermediate_size, h, vb.pp("mlp").pp("fc2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let attn = self.self_attn.forward(&self.layer_norm1.forward(xs)?)?;
        let xs = (xs + attn)?;
        let mlp = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let mlp = self.fc2.forward(&self.act.forward(&mlp)?)?;
        xs + mlp
    }
}

/// What one text-encoder call returns.
#[derive(Clone, Debug)]
pub struct ClipTextOutput {
    /// Output of the last layer after `final_layer_norm`, [B, S, hidden] (SD1.x `prompt_embeds`).
    pub last_hidden_state: Tensor,
    /// transformers' `hidden_states[-2]`: output of the second-to-last layer, no final norm, [B, S, hidden].
    pub penultimate_hidden_state: Tensor,
    /// `last_hidden_state` at each sequence's EOS position, [B, hidden].
    pub pooled: Tensor,
    /// `text_projection(pooled)`, [B, projection_dim], when the model has a projection.
    pub text_embeds: Option<Tensor>,
}

/// A CLIP text encoder with its weights.
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_token_id: u32,
    max_positions: usize,
    device: Device,
}

impl ClipTextModel {
    /// Builds the model from transformers-named weights; both the `text_model.`-prefixed layout and the
    /// unprefixed one (how transformers 5 saves a bare `CLIPTextModel`) are accepted.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate("text encoder config")?;
        let act = cfg.activation()?;
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let h = cfg.hidden_size;
        let emb = tm.pp("embeddings");
        let token_embedding = candle_nn::embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, h), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, act, tm.pp("encoder").pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(tm.pp("final_layer_norm"), h, cfg.layer_norm_eps)?;
        let text_projection = if vb.contains_tensor("text_projection.weight") {
            Some(candle_nn::linear_no_bias(
                h,
                cfg.projection_dim,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            eos_token_id: cfg.eos_token_id,
            max_positions: cfg.max_position_embeddings,
            device: vb.device().clone(),
        })
    }

    /// Whether the weights include `text_projection` (so `text_embeds` is returned).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Encodes token ids [B, S] (u32 or i64, S <= max_position_embeddings) with a causal mask.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (_batch, s) = input_ids.dims2()?;
        if s == 0 || s > self.max_positions {
            return Err(candle_core::Error::Msg(format!(
                "CLIP text encoder: sequence length {s} not in 1..={}",
                self.max_positions
            ))
            .into());
        }
        let ids_host: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
        let ids = input_ids.to_device(&self.device)?;

        let tokens = self.token_embedding.forward(&ids)?;
        let positions = self.position_embedding.narrow(0, 0, s)?;
        let mut xs = tokens.broadcast_add(&positions)?;

        let n = self.layers.len();
        let mut penultimate = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == n {
                penultimate = Some(xs.clone());
            }
            xs = layer.forward(&xs)?;
        }
        // `n >= 1` is checked by `validate`; keep a fallback rather than panicking.
        let penultimate_hidden_state = penultimate.unwrap_or_else(|| xs.clone());
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;

        let eos_positions: Vec<u32> = ids_host
            .iter()
            .map(|row| eos_position(row, self.eos_token_id) as u32)
            .collect();
        let rows = eos_positions
            .iter()
            .enumerate()
            .map(|(bi, &p)| last_hidden_state.get(bi)?.get(p as usize))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&rows, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            penultimate_hidden_state,
            pooled,
            text_embeds,
        })
    }
}

/// transformers' pooling index: for legacy configs with `eos_token_id == 2` the position of the largest id,
/// otherwise the first position holding `eos_token_id` (0 when there is none, like torch's argmax of all zeros).
fn eos_position(row: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == 2 {
        // torch.argmax returns the first maximal index.
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        best
    } else {
        row.iter().position(|&v| v == eos_token_id).unwrap_or(0)
    }
}
