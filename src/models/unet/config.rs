//! `unet/config.json` as diffusers' `UNet2DConditionModel` reads it, and its resolution into a
//! per-block build plan (with every unimplemented feature rejected by name).

use serde::Deserialize;

use crate::models::{ModelError, ModelSource, Result};

/// A config value that diffusers accepts either once for every block or as one entry per block.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// The same value for every block.
    One(T),
    /// One value per block (in down-block order).
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The value for each of `n` blocks; `None` when a list has the wrong length.
    pub fn per_block(&self, n: usize) -> Option<Vec<T>> {
        match self {
            OneOrMany::One(v) => Some(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Some(v.clone()),
            OneOrMany::Many(_) => None,
        }
    }
}

/// `transformer_layers_per_block`: one count, one count per block, or one count per layer of each block.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TransformerLayers {
    /// The same depth for every transformer.
    One(usize),
    /// One depth per block.
    PerBlock(Vec<usize>),
    /// One depth per layer of each block (asymmetric UNets; needs `reverse_transformer_layers_per_block`).
    PerLayer(Vec<Vec<usize>>),
}

fn d_in_channels() -> usize {
    4
}
fn d_out_channels() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_down_block_types() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
fn d_up_block_types() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
fn d_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".to_string())
}
fn d_only_cross_attention() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn d_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers_per_block() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_one_usize() -> usize {
    1
}
fn d_one_f64() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".to_string()
}
fn d_norm_num_groups() -> Option<usize> {
    Some(32)
}
fn d_norm_eps() -> f64 {
    1e-5
}
fn d_cross_attention_dim() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_transformer_layers() -> TransformerLayers {
    TransformerLayers::One(1)
}
fn d_attention_head_dim() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn d_default() -> String {
    "default".to_string()
}
fn d_positional() -> String {
    "positional".to_string()
}
fn d_kernel() -> usize {
    3
}
fn d_num_heads() -> usize {
    64
}
fn d_config_path() -> String {
    "unet/config.json".to_string()
}

/// diffusers' `UNet2DConditionModel` config (`unet/config.json`), with diffusers' defaults for missing keys.
///
/// Unknown keys are ignored; keys whose values this implementation does not support are rejected by
/// [`UNetConfig::validate`] (called by [`UNetConfig::load`] and [`super::UNet2DConditionModel::new`]).
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    /// Nominal latent size (height, or `[height, width]`); informational.
    #[serde(default)]
    pub sample_size: Option<OneOrMany<usize>>,
    /// Channels of the input sample (latent channels).
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    /// Channels of the output.
    #[serde(default = "d_out_channels")]
    pub out_channels: usize,
    /// Whether the input is mapped with `2 * x - 1` first.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Order of the sinusoidal embedding halves (cos first when true).
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the sinusoidal embeddings.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block class names, outermost first.
    #[serde(default = "d_down_block_types")]
    pub down_block_types: Vec<String>,
    /// Mid block class name (`None`: no mid block).
    #[serde(default = "d_mid_block_type")]
    pub mid_block_type: Option<String>,
    /// Up block class names, innermost first.
    #[serde(default = "d_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Whether attention blocks only do cross attention (only `false` is supported).
    #[serde(default = "d_only_cross_attention")]
    pub only_cross_attention: OneOrMany<bool>,
    /// Output channels of each down block.
    #[serde(default = "d_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "d_layers_per_block")]
    pub layers_per_block: OneOrMany<usize>,
    /// Padding of the stride-2 downsampling convolutions.
    #[serde(default = "d_one_usize")]
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    #[serde(default = "d_one_f64")]
    pub mid_block_scale_factor: f64,
    /// Dropout (unused at inference).
    #[serde(default)]
    pub dropout: f64,
    /// Activation of resnets and time embedding (only `silu`/`swish` supported).
    #[serde(default = "d_silu")]
    pub act_fn: String,
    /// GroupNorm groups (must be set).
    #[serde(default = "d_norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    /// GroupNorm epsilon of resnets and the output norm.
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    /// Width of the encoder hidden states fed to cross attention.
    #[serde(default = "d_cross_attention_dim")]
    pub cross_attention_dim: OneOrMany<usize>,
    /// Transformer depth of each attention block.
    #[serde(default = "d_transformer_layers")]
    pub transformer_layers_per_block: TransformerLayers,
    /// Transformer depths of the up blocks' layers (asymmetric UNets).
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<Vec<usize>>>,
    /// Extra projection of the encoder hidden states (not supported).
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Kind of `encoder_hid_proj` (not supported).
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// diffusers' misnomer: the number of attention HEADS per block (when `num_attention_heads` is null).
    #[serde(default = "d_attention_head_dim")]
    pub attention_head_dim: OneOrMany<usize>,
    /// Number of heads (diffusers 0.42.1 itself rejects a non-null value; so do we).
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    /// Dual cross attention (not supported).
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Linear (true) or 1x1 convolution (false) `proj_in`/`proj_out` of the transformers.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Class embedding kind (not supported).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Additional embedding kind: `None` or `text_time` (SDXL).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each sinusoidal embedding of the SDXL time ids.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Number of class embeddings (not supported).
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Attention scores in float32 (only matters for half-precision weights).
    #[serde(default)]
    pub upcast_attention: bool,
    /// How resnets apply the time embedding (only `default`).
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    /// Skip-time-activation of simple-attention resnets (only `false`).
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Output scale of simple-attention resnets (only `1.0`).
    #[serde(default = "d_one_f64")]
    pub resnet_out_scale_factor: f64,
    /// Time embedding kind (only `positional`).
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    /// Width of the time embedding (default: 4 * `block_out_channels[0]`).
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Activation applied to the summed time embedding (`None` or `silu`).
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Activation after the time embedding MLP (`None` or `silu`).
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// Guidance-embedding conditioning width (LCM distilled; not supported).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel size of `conv_in` (odd).
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    /// Kernel size of `conv_out` (odd).
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    /// Input width of `add_embedding` (text_time: 6 * `addition_time_embed_dim` + pooled text width).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Attention kind (only `default`).
    #[serde(default = "d_default")]
    pub attention_type: String,
    /// Concatenate class and time embeddings (only `false`).
    #[serde(default)]
    pub class_embeddings_concat: bool,
    /// Cross-attention-only mid block (simple-attention mid blocks only; must not be `true`).
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    /// Cross attention norm (simple-attention blocks only; must be null).
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    /// Heads of the `text` addition embedding (unused here).
    #[serde(default = "d_num_heads")]
    pub addition_embed_type_num_heads: usize,
    /// Where this config was read from, for error messages.
    #[serde(skip, default = "d_config_path")]
    pub config_path: String,
}

impl UNetConfig {
    /// Reads `<component>/config.json` (e.g. component `unet`) and validates it.
    pub fn load(source: &ModelSource, component: &str) -> Result<Self> {
        let rel = format!("{component}/config.json");
        let mut cfg: UNetConfig = source.read_json(&rel)?;
        cfg.config_path = format!("{}/{rel}", source.describe());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a config from JSON text (diffusers' defaults for missing keys) and validates it.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let cfg: UNetConfig = serde_json::from_str(json).map_err(|source| ModelError::Json {
            path: d_config_path(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that every key has a value this implementation supports (errors name the key and value).
    pub fn validate(&self) -> Result<()> {
        self.plan().map(|_| ())
    }

    /// Width of the time embedding fed to the resnets.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// Whether the model needs SDXL's `text_embeds` / `time_ids` ([`super::AddedConditions`]).
    pub fn needs_added_conditions(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// `2 ** (number of upsamplers)`: sample sizes that are multiples of this need no size forwarding.
    pub fn overall_up_factor(&self) -> usize {
        1usize << self.block_out_channels.len().saturating_sub(1)
    }

    pub(crate) fn unsupported(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Unsupported {
            path: self.config_path.clone(),
            reason: reason.into(),
        }
    }

    /// Resolves per-block settings the way diffusers' constructor does, rejecting what is not implemented.
    pub(crate) fn plan(&self) -> Result<Plan> {
        let u = |r: String| self.unsupported(r);
        let is_silu = |s: &str| s == "silu" || s == "swish";
        // --- features that are not implemented ---
        if !is_silu(&self.act_fn) {
            return Err(u(format!(
                "act_fn = {:?} (only \"silu\" is implemented)",
                self.act_fn
            )));
        }
        if self.time_embedding_type != "positional" {
            return Err(u(format!(
                "time_embedding_type = {:?} (only \"positional\" is implemented)",
                self.time_embedding_type
            )));
        }
        if let Some(v) = &self.class_embed_type {
            return Err(u(format!(
                "class_embed_type = {v:?} (class embeddings are not implemented)"
            )));
        }
        if let Some(v) = self.num_class_embeds {
            return Err(u(format!(
                "num_class_embeds = {v} (class embeddings are not implemented)"
            )));
        }
        if self.class_embeddings_concat {
            return Err(u("class_embeddings_concat = true (not implemented)".into()));
        }
        if let Some(v) = &self.encoder_hid_dim_type {
            return Err(u(format!(
                "encoder_hid_dim_type = {v:?} (encoder_hid_proj is not implemented)"
            )));
        }
        if let Some(v) = self.encoder_hid_dim {
            return Err(u(format!(
                "encoder_hid_dim = {v} (encoder_hid_proj is not implemented)"
            )));
        }
        if let Some(v) = self.time_cond_proj_dim {
            return Err(u(format!(
                "time_cond_proj_dim = {v} (guidance-embedding conditioning is not implemented)"
            )));
        }
        if self.attention_type != "default" {
            return Err(u(format!(
                "attention_type = {:?} (only \"default\" is implemented)",
                self.attention_type
            )));
        }
        if self.dual_cross_attention {
            return Err(u("dual_cross_attention = true (not implemented)".into()));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(u(format!(
                "resnet_time_scale_shift = {:?} (only \"default\" is implemented)",
                self.resnet_time_scale_shift
            )));
        }
        if self.resnet_skip_time_act {
            return Err(u("resnet_skip_time_act = true (not implemented)".into()));
        }
        if self.resnet_out_scale_factor != 1.0 {
            return Err(u(format!(
                "resnet_out_scale_factor = {} (only 1.0 is implemented)",
                self.resnet_out_scale_factor
            )));
        }
        if let Some(v) = &self.cross_attention_norm {
            return Err(u(format!("cross_attention_norm = {v:?} (not implemented)")));
        }
        if self.mid_block_only_cross_attention == Some(true) {
            return Err(u(
                "mid_block_only_cross_attention = true (not implemented)".into()
            ));
        }
        if let Some(v) = &self.num_attention_heads {
            return Err(u(format!(
                "num_attention_heads = {v:?} (diffusers 0.42.1 rejects it too; heads come from attention_head_dim)"
            )));
        }
        if let Some(v) = &self.time_embedding_act_fn {
            if !is_silu(v) {
                return Err(u(format!(
                    "time_embedding_act_fn = {v:?} (only null or \"silu\")"
                )));
            }
        }
        if let Some(v) = &self.timestep_post_act {
            if !is_silu(v) {
                return Err(u(format!(
                    "timestep_post_act = {v:?} (only null or \"silu\")"
                )));
            }
        }
        let groups = match self.norm_num_groups {
            Some(g) if g > 0 => g,
            other => {
                return Err(u(format!(
                    "norm_num_groups = {other:?} (a positive group count is required)"
                )))
            }
        };
        for (key, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(u(format!(
                    "{key} = {k} (only odd kernel sizes are implemented)"
                )));
            }
        }
        let add = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let t = self.addition_time_embed_dim.ok_or_else(|| {
                    u("addition_embed_type = \"text_time\" needs addition_time_embed_dim".into())
                })?;
                let p = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    u("addition_embed_type = \"text_time\" needs projection_class_embeddings_input_dim".into())
                })?;
                Some((t, p))
            }
            Some(v) => {
                return Err(u(format!(
                    "addition_embed_type = {v:?} (only null or \"text_time\" is implemented)"
                )))
            }
        };

        // --- shapes ---
        let n = self.down_block_types.len();
        if n == 0 {
            return Err(u("down_block_types is empty".into()));
        }
        if self.up_block_types.len() != n {
            return Err(u(format!(
                "up_block_types has {} entries, down_block_types {n}",
                self.up_block_types.len()
            )));
        }
        if self.block_out_channels.len() != n {
            return Err(u(format!(
                "block_out_channels has {} entries, down_block_types {n}",
                self.block_out_channels.len()
            )));
        }
        let wrong_len = |key: &str| u(format!("{key} must be a single value or have {n} entries"));
        let only_cross = self
            .only_cross_attention
            .per_block(n)
            .ok_or_else(|| wrong_len("only_cross_attention"))?;
        if only_cross.iter().any(|&b| b) {
            return Err(u(format!(
                "only_cross_attention = {:?} (only false is implemented)",
                self.only_cross_attention
            )));
        }
        let heads = self
            .attention_head_dim
            .per_block(n)
            .ok_or_else(|| wrong_len("attention_head_dim"))?;
        if heads.contains(&0) {
            return Err(u("attention_head_dim contains 0".into()));
        }
        let cross = self
            .cross_attention_dim
            .per_block(n)
            .ok_or_else(|| wrong_len("cross_attention_dim"))?;
        let layers = self
            .layers_per_block
            .per_block(n)
            .ok_or_else(|| wrong_len("layers_per_block"))?;
        // Transformer depth per layer of each down block; the mid block uses the last down block's entry.
        let down_depths: Vec<Vec<usize>> = match &self.transformer_layers_per_block {
            TransformerLayers::One(d) => layers.iter().map(|&l| vec![*d; l]).collect(),
            TransformerLayers::PerBlock(v) if v.len() == n => {
                layers.iter().zip(v).map(|(&l, &d)| vec![d; l]).collect()
            }
            TransformerLayers::PerLayer(v) if v.len() == n => {
                for (i, (d, &l)) in v.iter().zip(&layers).enumerate() {
                    if d.len() != l {
                        return Err(u(format!(
                            "transformer_layers_per_block[{i}] has {} entries, layers_per_block {l}",
                            d.len()
                        )));
                    }
                }
                v.clone()
            }
            _ => return Err(wrong_len("transformer_layers_per_block")),
        };
        let mid_depth = match &self.transformer_layers_per_block {
            TransformerLayers::One(d) => *d,
            TransformerLayers::PerBlock(v) => v[n - 1],
            // diffusers' one-layer mid block uses the first entry of the last block's list.
            TransformerLayers::PerLayer(v) => match v[n - 1].first() {
                Some(d) => *d,
                None => return Err(u("transformer_layers_per_block[-1] is empty".into())),
            },
        };
        let up_depths: Vec<Vec<usize>> = match (
            &self.reverse_transformer_layers_per_block,
            &self.transformer_layers_per_block,
        ) {
            (None, TransformerLayers::One(d)) => {
                (0..n).map(|i| vec![*d; layers[n - 1 - i] + 1]).collect()
            }
            (None, TransformerLayers::PerBlock(v)) => (0..n)
                .map(|i| vec![v[n - 1 - i]; layers[n - 1 - i] + 1])
                .collect(),
            (None, TransformerLayers::PerLayer(_)) => return Err(u(
                "transformer_layers_per_block per layer needs reverse_transformer_layers_per_block"
                    .into(),
            )),
            (Some(r), _) => {
                if r.len() != n {
                    return Err(wrong_len("reverse_transformer_layers_per_block"));
                }
                for (i, d) in r.iter().enumerate() {
                    if d.len() != layers[n - 1 - i] + 1 {
                        return Err(u(format!(
                            "reverse_transformer_layers_per_block[{i}] has {} entries, expected {}",
                            d.len(),
                            layers[n - 1 - i] + 1
                        )));
                    }
                }
                r.clone()
            }
        };
        for c in &self.block_out_channels {
            if c % groups != 0 {
                return Err(u(format!(
                    "norm_num_groups = {groups} does not divide block_out_channels entry {c}"
                )));
            }
        }

        let temb = self.time_embed_dim();
        let mut down = Vec::with_capacity(n);
        let mut out_ch = self.block_out_channels[0];
        for (i, ty) in self.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = self.block_out_channels[i];
            let attn = match ty.as_str() {
                "CrossAttnDownBlock2D" => Some(AttnSpec {
                    heads: heads[i],
                    cross_dim: cross[i],
                    depths: down_depths[i].clone(),
                }),
                "DownBlock2D" => None,
                other => {
                    return Err(u(format!(
                        "down_block_types[{i}] = {other:?} (only CrossAttnDownBlock2D and DownBlock2D are implemented)"
                    )))
                }
            };
            down.push(DownSpec {
                in_ch,
                out_ch,
                layers: layers[i],
                attn,
                add_downsample: i + 1 < n,
            });
        }
        let last = self.block_out_channels[n - 1];
        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => Some(MidSpec {
                channels: last,
                attn: AttnSpec {
                    heads: heads[n - 1],
                    cross_dim: cross[n - 1],
                    depths: vec![mid_depth],
                },
            }),
            Some(other) => {
                return Err(u(format!(
                "mid_block_type = {other:?} (only UNetMidBlock2DCrossAttn or null is implemented)"
            )))
            }
        };
        let mut up = Vec::with_capacity(n);
        let rev_ch: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        let mut out_ch = rev_ch[0];
        for (i, ty) in self.up_block_types.iter().enumerate() {
            let prev_out = out_ch;
            out_ch = rev_ch[i];
            let in_ch = rev_ch[(i + 1).min(n - 1)];
            let r = n - 1 - i;
            let attn = match ty.as_str() {
                "CrossAttnUpBlock2D" => Some(AttnSpec {
                    heads: heads[r],
                    cross_dim: cross[r],
                    depths: up_depths[i].clone(),
                }),
                "UpBlock2D" => None,
                other => {
                    return Err(u(format!(
                        "up_block_types[{i}] = {other:?} (only CrossAttnUpBlock2D and UpBlock2D are implemented)"
                    )))
                }
            };
            up.push(UpSpec {
                in_ch,
                prev_out,
                out_ch,
                layers: layers[r] + 1,
                attn,
                add_upsample: i + 1 < n,
            });
        }
        Ok(Plan {
            groups,
            temb,
            add,
            down,
            mid,
            up,
        })
    }
}

/// Attention settings of one block.
#[derive(Clone, Debug)]
pub(crate) struct AttnSpec {
    pub heads: usize,
    pub cross_dim: usize,
    /// Transformer depth of each of the block's attention layers.
    pub depths: Vec<usize>,
}

#[derive(Clone, Debug)]
pub(crate) struct DownSpec {
    pub in_ch: usize,
    pub out_ch: usize,
    pub layers: usize,
    pub attn: Option<AttnSpec>,
    pub add_downsample: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct MidSpec {
    pub channels: usize,
    pub attn: AttnSpec,
}

#[derive(Clone, Debug)]
pub(crate) struct UpSpec {
    pub in_ch: usize,
    pub prev_out: usize,
    pub out_ch: usize,
    pub layers: usize,
    pub attn: Option<AttnSpec>,
    pub add_upsample: bool,
}

/// The resolved structure of a UNet.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub groups: usize,
    pub temb: usize,
    /// text_time: (addition_time_embed_dim, projection_class_embeddings_input_dim).
    pub add: Option<(usize, usize)>,
    pub down: Vec<DownSpec>,
    pub mid: Option<MidSpec>,
    pub up: Vec<UpSpec>,
}
