//! diffusers' UNet blocks: `CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D` / `UpBlock2D` (a plain block is a cross-attention block without transformers).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::{AttnSpec, DownSpec, MidSpec, UpSpec};
use super::layers::{Downsample2D, ResnetBlock2D, Transformer2D, Transformer2DParams, Upsample2D};
use crate::models::{ModelError, Result};

/// Settings shared by every block.
pub(crate) struct Common {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub linear_projection: bool,
    pub upcast: bool,
    pub downsample_padding: usize,
    pub mid_scale: f64,
}

fn transformers(
    vb: &VarBuilder,
    attn: Option<&AttnSpec>,
    channels: usize,
    c: &Common,
) -> Result<Vec<Transformer2D>> {
    let Some(a) = attn else {
        return Ok(Vec::new());
    };
    a.depths
        .iter()
        .enumerate()
        .map(|(j, &depth)| {
            let p = Transformer2DParams {
                channels,
                heads: a.heads,
                depth,
                cross_dim: a.cross_dim,
                groups: c.groups,
                linear_projection: c.linear_projection,
                upcast: c.upcast,
            };
            Transformer2D::new(vb.pp("attentions").pp(j.to_string()), &p)
        })
        .collect()
}

/// A down block: `layers` x (resnet [+ transformer]) and an optional downsampler.
#[derive(Debug)]
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(vb: VarBuilder, s: &DownSpec, c: &Common) -> Result<Self> {
        let resnets = (0..s.layers)
            .map(|j| {
                let cin = if j == 0 { s.in_ch } else { s.out_ch };
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(j.to_string()),
                    cin,
                    s.out_ch,
                    c.temb,
                    c.groups,
                    c.eps,
                    1.0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = transformers(&vb, s.attn.as_ref(), s.out_ch, c)?;
        let downsampler = if s.add_downsample {
            Some(Downsample2D::new(
                vb.pp("downsamplers").pp("0"),
                s.out_ch,
                c.downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and appends the skip states (one per layer, plus the downsampled one).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb)?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, ctx)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) per layer.
#[derive(Debug)]
pub(crate) struct MidBlock {
    first: ResnetBlock2D,
    layers: Vec<(Transformer2D, ResnetBlock2D)>,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, s: &MidSpec, c: &Common) -> Result<Self> {
        let ch = s.channels;
        let resnet = |j: usize| {
            ResnetBlock2D::new(
                vb.pp("resnets").pp(j.to_string()),
                ch,
                ch,
                c.temb,
                c.groups,
                c.eps,
                c.mid_scale,
            )
        };
        let first = resnet(0)?;
        let attns = transformers(&vb, Some(&s.attn), ch, c)?;
        let layers = attns
            .into_iter()
            .enumerate()
            .map(|(j, a)| Ok((a, resnet(j + 1)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { first, layers })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x, temb)?;
        for (attn, resnet) in &self.layers {
            h = attn.forward(&h, ctx)?;
            h = resnet.forward(&h, temb)?;
        }
        Ok(h)
    }
}

/// An up block: `layers` x (concat skip, resnet [+ transformer]) and an optional upsampler.
#[derive(Debug)]
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn new(vb: VarBuilder, s: &UpSpec, c: &Common) -> Result<Self> {
        let resnets = (0..s.layers)
            .map(|j| {
                let skip = if j + 1 == s.layers { s.in_ch } else { s.out_ch };
                let cin = if j == 0 { s.prev_out } else { s.out_ch };
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(j.to_string()),
                    cin + skip,
                    s.out_ch,
                    c.temb,
                    c.groups,
                    c.eps,
                    1.0,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = transformers(&vb, s.attn.as_ref(), s.out_ch, c)?;
        let upsampler = if s.add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers").pp("0"), s.out_ch)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip states this block consumes.
    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// Pops one skip state per layer (last pushed first); upsamples to `upsample_size` when given.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        skips: &mut Vec<Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                ModelError::Candle(candle_core::Error::Msg(
                    "unet: ran out of skip connections".to_string(),
                ))
            })?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, temb)?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, ctx)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, upsample_size)?;
        }
        Ok(h)
    }
}
