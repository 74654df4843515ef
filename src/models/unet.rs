//! Config-driven `UNet2DConditionModel` matching diffusers 0.42.1 (SD 1.x/2.x layouts and SDXL's
//! `text_time` micro-conditioning), built from diffusers weight names.
//!
//! Supported: `CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn` (or no mid block),
//! `CrossAttnUpBlock2D` / `UpBlock2D`, per-block heads / cross-attention widths / layer counts /
//! transformer depths, linear or convolutional transformer projections, positional time embedding,
//! `addition_embed_type = "text_time"`. Everything else is rejected with [`ModelError::Unsupported`].

mod blocks;
mod config;
mod layers;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::{Conv2d, GroupNorm};

pub use config::{OneOrMany, TransformerLayers, UNetConfig};

use crate::models::{ModelError, Result};
use blocks::{Common, DownBlock, MidBlock, UpBlock};
use layers::{conv_same, group_norm, timestep_embedding, timestep_embedding_of, TimestepEmbedding};

/// SDXL's extra conditioning (`added_cond_kwargs` of diffusers' `addition_embed_type = "text_time"`).
#[derive(Clone, Debug)]
pub struct AddedConditions {
    /// Pooled, projected output of the second text encoder, `[batch, dim]`.
    pub text_embeds: Tensor,
    /// `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]` per batch row, `[batch, 6]`.
    pub time_ids: Tensor,
}

/// `text_time` additional embedding: sinusoidal time-id embeddings + pooled text through an MLP.
#[derive(Debug)]
struct TextTimeEmbedding {
    time_dim: usize,
    embedding: TimestepEmbedding,
}

/// diffusers' `UNet2DConditionModel` (noise prediction network of Stable Diffusion).
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TextTimeEmbedding>,
    time_embed_act: bool,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

fn invalid_input(msg: String) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(format!("unet input: {msg}")))
}

impl UNet2DConditionModel {
    /// Builds the model from diffusers-named weights (`conv_in.weight`, `down_blocks.0.resnets.0...`).
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let plan = cfg.plan()?;
        let c0 = cfg.block_out_channels[0];
        let common = Common {
            temb: plan.temb,
            groups: plan.groups,
            eps: cfg.norm_eps,
            linear_projection: cfg.use_linear_projection,
            upcast: cfg.upcast_attention,
            downsample_padding: cfg.downsample_padding,
            mid_scale: cfg.mid_block_scale_factor,
        };
        let conv_in = conv_same(vb.pp("conv_in"), cfg.in_channels, c0, cfg.conv_in_kernel)?;
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            c0,
            plan.temb,
            cfg.timestep_post_act.is_some(),
        )?;
        let add_embedding = match plan.add {
            Some((time_dim, in_dim)) => Some(TextTimeEmbedding {
                time_dim,
                embedding: TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    in_dim,
                    plan.temb,
                    false,
                )?,
            }),
            None => None,
        };
        let down = plan
            .down
            .iter()
            .enumerate()
            .map(|(i, s)| DownBlock::new(vb.pp("down_blocks").pp(i.to_string()), s, &common))
            .collect::<Result<Vec<_>>>()?;
        let mid = match &plan.mid {
            Some(s) => Some(MidBlock::new(vb.pp("mid_block"), s, &common)?),
            None => None,
        };
        let up = plan
            .up
            .iter()
            .enumerate()
            .map(|(i, s)| UpBlock::new(vb.pp("up_blocks").pp(i.to_string()), s, &common))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            time_embed_act: cfg.time_embedding_act_fn.is_some(),
            down,
            mid,
            up,
            conv_norm_out: group_norm(vb.pp("conv_norm_out"), plan.groups, c0, cfg.norm_eps)?,
            conv_out: conv_same(vb.pp("conv_out"), c0, cfg.out_channels, cfg.conv_out_kernel)?,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The time embedding (plus the `text_time` embedding) for a batch of `b` rows, each with its
    /// own timestep, in `dtype`.
    fn embedding(
        &self,
        timesteps: &[f64],
        b: usize,
        dtype: DType,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let device = self.conv_in.weight().device();
        // diffusers: timesteps.expand(batch), sinusoidal embedding in float32, then cast to the
        // sample's dtype. Rows of a batched step carry their own sessions' timesteps.
        if timesteps.len() != b {
            return Err(invalid_input(format!(
                "{} timesteps for a batch of {b} rows",
                timesteps.len()
            )));
        }
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t_emb = timestep_embedding(
            &t,
            cfg.block_out_channels[0],
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
            device,
        )?
        .to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(add) = &self.add_embedding {
            let added = added.ok_or_else(|| {
                invalid_input(
                    "this UNet (addition_embed_type \"text_time\") needs text_embeds and time_ids"
                        .into(),
                )
            })?;
            let (tb, _) = added.text_embeds.dims2()?;
            let (ib, n_ids) = added.time_ids.dims2()?;
            if tb != b || ib != b {
                return Err(invalid_input(format!(
                    "text_embeds batch {tb} and time_ids batch {ib} must equal the sample batch {b}"
                )));
            }
            // On the device: a host copy of the ids here would make every forward pass wait
            // for the device to finish the previous step.
            let time_embeds = timestep_embedding_of(
                &added.time_ids.flatten_all()?,
                add.time_dim,
                cfg.flip_sin_to_cos,
                cfg.freq_shift,
            )?
            .reshape((b, n_ids * add.time_dim))?
            .to_dtype(dtype)?;
            let add_in = Tensor::cat(&[&added.text_embeds.to_dtype(dtype)?, &time_embeds], 1)?;
            emb = (emb + add.embedding.forward(&add_in)?)?;
        }
        if self.time_embed_act {
            emb = emb.silu()?;
        }
        Ok(emb)
    }

    /// diffusers' `unet(sample, t, encoder_hidden_states, added_cond_kwargs=...).sample`.
    ///
    /// `sample` is `[b, in_channels, h, w]`, `encoder_hidden_states` `[b, tokens, cross_attention_dim]`;
    /// the timestep is broadcast to the batch. `added` is required for `text_time` (SDXL) models.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        let b = sample.dims().first().copied().unwrap_or(0);
        self.forward_rows(sample, &vec![timestep; b], encoder_hidden_states, added)
    }

    /// [`UNet::forward`] with one timestep per row: the batched step of several sessions, each
    /// at its own point of its own schedule. Every row is computed as it would be alone.
    pub fn forward_rows(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, c, h, w) = sample.dims4()?;
        if c != cfg.in_channels {
            return Err(invalid_input(format!(
                "sample has {c} channels, the config says in_channels = {}",
                cfg.in_channels
            )));
        }
        let (eb, _, _) = encoder_hidden_states.dims3()?;
        if eb != b {
            return Err(invalid_input(format!(
                "encoder_hidden_states batch {eb} != sample batch {b}"
            )));
        }
        let dtype = sample.dtype();
        let factor = cfg.overall_up_factor();
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let emb = self.embedding(timesteps, b, dtype, added)?;
        let x = if cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let ctx = encoder_hidden_states.to_dtype(dtype)?;

        let mut hs = self.conv_in.forward(&x)?;
        let mut skips = vec![hs.clone()];
        for block in &self.down {
            hs = block.forward(&hs, &emb, &ctx, &mut skips)?;
        }
        if let Some(mid) = &self.mid {
            hs = mid.forward(&hs, &emb, &ctx)?;
        }
        let n_up = self.up.len();
        for (i, block) in self.up.iter().enumerate() {
            let upsample_size = if i + 1 < n_up && forward_upsample_size {
                let rest = skips.len().checked_sub(block.num_layers() + 1);
                match rest.and_then(|k| skips.get(k)) {
                    Some(t) => {
                        let (_, _, th, tw) = t.dims4()?;
                        Some((th, tw))
                    }
                    None => None,
                }
            } else {
                None
            };
            hs = block.forward(&hs, &emb, &ctx, &mut skips, upsample_size)?;
        }
        let hs = self.conv_norm_out.forward_silu(&hs)?;
        Ok(self.conv_out.forward(&hs)?)
    }
}
