//! The UNet's building layers, written to follow diffusers' modules operation by operation
//! (`Timesteps`, `TimestepEmbedding`, `ResnetBlock2D`, `Transformer2DModel`, `Downsample2D`, `Upsample2D`).

use candle_core::{DType, Device, Module, Tensor, D};
use std::sync::Arc;

use candle_nn::{LayerNorm, Linear, VarBuilder};

use crate::models::lora::layer::{self as lora, LoraLinear};
use crate::models::lora::LoraSlot;

use crate::kernels::{Conv2d, GroupNorm};

use crate::models::Result;

/// Epsilon of the transformers' input GroupNorm (fixed in diffusers' `Transformer2DModel`).
const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;
/// Epsilon of `BasicTransformerBlock`'s LayerNorms (diffusers' default `norm_eps`).
const TRANSFORMER_LAYER_NORM_EPS: f64 = 1e-5;

/// The `dim / 2` frequencies of [`timestep_embedding`]: torch's
/// `exp(-math.log(10000) * arange(half, f32) / (half - shift))`, every operation in float32.
fn timestep_frequencies(dim: usize, freq_shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    (0..half)
        .map(|i| ((neg_log * i as f32) / denom).exp())
        .collect()
}

/// diffusers' `get_timestep_embedding` in float32: `[sin | cos]` (or `[cos | sin]` when flipped) of
/// `t * exp(-ln(10000) * i / (dim/2 - shift))`, one row per value of `timesteps`.
pub(crate) fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let freqs = timestep_frequencies(dim, freq_shift);
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|&f| t * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            data.extend(cos);
            data.extend(sin);
        } else {
            data.extend(sin);
            data.extend(cos);
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

/// [`timestep_embedding`] of values already on the device (`(n,)` or `(n, 1)`, any float dtype),
/// computed there: no device-to-host copy, so the forward pass never waits for the device. The
/// same float32 operations in the same order as the host version.
pub(crate) fn timestep_embedding_of(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs = timestep_frequencies(dim, freq_shift);
    let n = timesteps.elem_count();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .reshape((n, 1))?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut parts = if flip_sin_to_cos {
        vec![cos, sin]
    } else {
        vec![sin, cos]
    };
    if dim % 2 == 1 {
        parts.push(Tensor::zeros((n, 1), DType::F32, timesteps.device())?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`, optionally followed by silu.
#[derive(Debug)]
pub(crate) struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    post_act: bool,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, post_act: bool) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(out_dim, out_dim, vb.pp("linear_2"))?,
            post_act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = rowwise_linear(&self.linear_1, x)?.silu()?;
        let x = rowwise_linear(&self.linear_2, &h)?;
        Ok(if self.post_act { x.silu()? } else { x })
    }
}

/// Products with fewer output elements than this take gemm's small-product kernel (16 × 16).
const GEMM_SMALL_OUTPUTS: usize = 16 * 16;

/// `linear.forward(x)` for `x: (rows, k)`, computed the same way whatever `rows` is, so that a
/// session's numbers do not depend on how many sessions share its UNet call.
///
/// Why: on the CPU, gemm sums a one-row product as a matrix-vector product and a product of at
/// most 16 × 16 outputs with its horizontal small-product kernel; both sum in another order
/// than its general kernel, whose rows are independent of the row count (checked up to 300
/// rows). The embedding path's rows are the batch's rows, so a session alone (1 or 2 rows) and
/// in a batch would round differently. Zero rows pad the input past both cases; they are
/// dropped again. Layers whose rows are batch × tokens never hit those cases at SD sizes.
pub(crate) fn rowwise_linear(linear: &Linear, x: &Tensor) -> Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let outputs = linear.weight().dim(0)?;
    let min_rows = (GEMM_SMALL_OUTPUTS / outputs.max(1) + 1).max(2);
    if rows >= min_rows {
        return Ok(linear.forward(x)?);
    }
    let pad = Tensor::zeros((min_rows - rows, k), x.dtype(), x.device())?;
    Ok(linear
        .forward(&Tensor::cat(&[x, &pad], 0)?)?
        .narrow(0, 0, rows)?)
}

/// GroupNorm with weights from `vb`.
pub(crate) fn group_norm(
    vb: VarBuilder,
    groups: usize,
    channels: usize,
    eps: f64,
) -> Result<GroupNorm> {
    Ok(GroupNorm::load(vb, groups, channels, eps)?)
}

fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Conv2d> {
    Ok(Conv2d::load(vb, cin, cout, k, stride, pad)?)
}

/// A `kernel x kernel` convolution with "same" padding `(kernel - 1) / 2`.
pub(crate) fn conv_same(vb: VarBuilder, cin: usize, cout: usize, kernel: usize) -> Result<Conv2d> {
    conv(vb, cin, cout, kernel, 1, (kernel - 1) / 2)
}

/// diffusers' `ResnetBlock2D` (time_embedding_norm "default", silu, pre-norm).
#[derive(Debug)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        temb: usize,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let conv_shortcut = if cin != cout {
            Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), groups, cin, eps)?,
            conv1: conv_same(vb.pp("conv1"), cin, cout, 3)?,
            time_emb_proj: candle_nn::linear(temb, cout, vb.pp("time_emb_proj"))?,
            norm2: group_norm(vb.pp("norm2"), groups, cout, eps)?,
            conv2: conv_same(vb.pp("conv2"), cout, cout, 3)?,
            conv_shortcut,
            output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = rowwise_linear(&self.time_emb_proj, &temb.silu()?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (x + h)?;
        Ok(if self.output_scale_factor == 1.0 {
            out
        } else {
            (out / self.output_scale_factor)?
        })
    }
}

/// diffusers' `Attention` with the default processor: softmax(Q Kᵀ / sqrt(d)) V per head, then `to_out.0`.
#[derive(Debug)]
struct Attention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: usize,
    scale: f64,
    upcast: bool,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: lora::linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: lora::linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: lora::linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: lora::linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let out = crate::kernels::attention(&q, &k, &v, self.heads, self.scale, self.upcast)?;
        Ok(self.to_out.forward(&out)?)
    }
}

/// diffusers' `FeedForward` with GEGLU: `net.2(h * gelu_erf(gate))` where `[h | gate] = net.0.proj(x)`.
#[derive(Debug)]
struct FeedForward {
    proj: LoraLinear,
    out: LoraLinear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: lora::linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            out: lora::linear(inner, dim, vb.pp("net").pp("2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = crate::kernels::geglu(&self.proj.forward(x)?)?;
        Ok(self.out.forward(&h)?)
    }
}

/// diffusers' `BasicTransformerBlock` (layer_norm, self attention, cross attention, GEGLU feed-forward).
#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross: usize,
        upcast: bool,
    ) -> Result<Self> {
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(candle_nn::layer_norm(
                dim,
                TRANSFORMER_LAYER_NORM_EPS,
                vb.pp(name),
            )?)
        };
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim, upcast)?,
            norm2: ln("norm2")?,
            attn2: Attention::new(vb.pp("attn2"), dim, cross, heads, head_dim, upcast)?,
            norm3: ln("norm3")?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + x)?;
        let x = (self.ff.forward(&self.norm3.forward(&x)?)? + x)?;
        Ok(x)
    }
}

/// `proj_in` / `proj_out`: a Linear on tokens or a 1x1 convolution on the feature map (whose
/// LoRA slot is applied on the tokens, where a 1x1 convolution is a Linear).
#[derive(Debug)]
enum Proj {
    Linear(LoraLinear),
    Conv(Conv2d, Arc<LoraSlot>),
}

/// diffusers' `Transformer2DModel` on continuous input (GroupNorm, proj_in, blocks, proj_out, residual).
#[derive(Debug)]
pub(crate) struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
    inner: usize,
}

/// Construction parameters of a [`Transformer2D`].
pub(crate) struct Transformer2DParams {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub cross_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub upcast: bool,
}

impl Transformer2D {
    pub fn new(vb: VarBuilder, p: &Transformer2DParams) -> Result<Self> {
        let head_dim = p.channels / p.heads;
        let inner = p.heads * head_dim;
        let (proj_in, proj_out) = if p.linear_projection {
            (
                Proj::Linear(lora::linear(p.channels, inner, vb.pp("proj_in"))?),
                Proj::Linear(lora::linear(inner, p.channels, vb.pp("proj_out"))?),
            )
        } else {
            let (vin, vout) = (vb.pp("proj_in"), vb.pp("proj_out"));
            (
                Proj::Conv(
                    conv(vin.clone(), p.channels, inner, 1, 1, 0)?,
                    lora::slot(&vin, p.channels, inner),
                ),
                Proj::Conv(
                    conv(vout.clone(), inner, p.channels, 1, 1, 0)?,
                    lora::slot(&vout, inner, p.channels),
                ),
            )
        };
        let blocks = (0..p.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i.to_string()),
                    inner,
                    p.heads,
                    head_dim,
                    p.cross_dim,
                    p.upcast,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(
                vb.pp("norm"),
                p.groups,
                p.channels,
                TRANSFORMER_GROUP_NORM_EPS,
            )?,
            proj_in,
            blocks,
            proj_out,
            inner,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let hs = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor, c: usize| -> Result<Tensor> {
            Ok(t.permute((0, 2, 3, 1))?
                .contiguous()?
                .reshape((b, h * w, c))?)
        };
        let mut hs = match &self.proj_in {
            Proj::Conv(c, slot) => {
                let y = to_tokens(&c.forward(&hs)?, self.inner)?;
                if slot.is_adapted() {
                    slot.add(&to_tokens(&hs, hs.dim(1)?)?, y)?
                } else {
                    y
                }
            }
            Proj::Linear(l) => l.forward(&to_tokens(&hs, hs.dim(1)?)?)?,
        };
        for block in &self.blocks {
            hs = block.forward(&hs, context)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(2)?;
            Ok(t.reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let out = match &self.proj_out {
            Proj::Conv(c, slot) => {
                let y = c.forward(&to_map(&hs)?)?;
                if slot.is_adapted() {
                    let tokens = (y.permute((0, 2, 3, 1))?.contiguous()?).reshape((
                        b,
                        h * w,
                        slot.out_dim,
                    ))?;
                    to_map(&slot.add(&hs, tokens)?)?
                } else {
                    y
                }
            }
            Proj::Linear(l) => to_map(&l.forward(&hs)?)?,
        };
        Ok((out + x)?)
    }
}

/// diffusers' `Downsample2D` with a convolution: stride-2 3x3 conv (zero-padded right/bottom when padding is 0).
#[derive(Debug)]
pub(crate) struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: conv(vb.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            let x = x
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            Ok(self.conv.forward(&x)?)
        } else {
            Ok(self.conv.forward(x)?)
        }
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest-neighbour 2x (or to a given size), then 3x3 conv.
#[derive(Debug)]
pub(crate) struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv_same(vb.pp("conv"), channels, channels, 3)?,
        })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let x = x.upsample_nearest2d(th, tw)?;
        Ok(self.conv.forward(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rowwise_linear_gives_every_row_the_same_bits_whatever_the_row_count() {
        let dev = Device::Cpu;
        // Widths of the tiny fixtures' embedding path (16, 64) and of SD's (1280).
        for (k, n) in [(16usize, 64usize), (64, 16), (64, 64), (320, 1280)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let linear = Linear::new(w, Some(b));
            let x = Tensor::randn(0f32, 1.0, (40, k), &dev).unwrap();
            let all: Vec<Vec<f32>> = rowwise_linear(&linear, &x).unwrap().to_vec2().unwrap();
            for rows in 1..40 {
                let some: Vec<Vec<f32>> = rowwise_linear(&linear, &x.narrow(0, 0, rows).unwrap())
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                assert!(some[..] == all[..rows], "k {k}, n {n}: {rows} rows differ");
            }
        }
    }

    #[test]
    fn the_device_timestep_embedding_equals_the_host_one() {
        let values = [0.0f32, 1.0, 512.0, 1024.0, 999.0, 256.0];
        for (dim, flip, shift) in [(256, true, 0.0), (320, false, 1.0), (7, true, 0.0)] {
            let host = timestep_embedding(&values, dim, flip, shift, &Device::Cpu).unwrap();
            let ids = Tensor::new(&values, &Device::Cpu).unwrap();
            let device = timestep_embedding_of(&ids, dim, flip, shift).unwrap();
            assert_eq!(host.dims(), device.dims());
            let diff = (host - device)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "dim {dim}, flip {flip}, shift {shift}");
        }
    }
}
