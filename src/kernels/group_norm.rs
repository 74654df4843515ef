//! GroupNorm over `(batch, channels, ...)` tensors, optionally followed by SiLU.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

/// diffusers' `nn.GroupNorm` (affine) with the statistics in f32 whatever the input dtype.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (`channels` each) from `vb`.
    pub fn load(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Self::from_parts(
            vb.get(channels, "weight")?,
            vb.get(channels, "bias")?,
            groups,
            eps,
        )
    }

    /// A GroupNorm from its parts (`weight`, `bias`: one value per channel).
    pub fn from_parts(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dim(0)?;
        if groups == 0 || channels % groups != 0 || bias.dims() != weight.dims() {
            candle_core::bail!(
                "GroupNorm: {groups} groups for {channels} channels, weight {:?}, bias {:?}",
                weight.dims(),
                bias.dims()
            );
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// `GroupNorm(x)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// `SiLU(GroupNorm(x))`, one pass over `x` on the fused path.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if super::fused() {
            if let Some(out) = self.fused(x, silu)? {
                return Ok(out);
            }
        }
        if super::fused() && x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 3 {
            return self.cpu(x, silu);
        }
        let out = self.reference(x)?;
        if silu {
            out.silu()
        } else {
            Ok(out)
        }
    }

    /// The fused CUDA kernel's result where it applies.
    #[cfg(feature = "cuda")]
    pub(crate) fn fused(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        super::cuda::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, silu)
    }

    /// The CPU's f32 GroupNorm(+SiLU): per group, one pass for the mean and one for the variance
    /// (both accumulated in f64), then one pass that normalises, applies the affine and the SiLU
    /// into the output. The reference makes six full-size temporaries (a fresh, page-faulted
    /// allocation each) and seven passes.
    fn cpu(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        use rayon::prelude::*;
        let x = x.contiguous()?;
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        if c != self.weight.dim(0)? {
            candle_core::bail!(
                "GroupNorm: {c} channels, weights for {}",
                self.weight.dim(0)?
            );
        }
        let plane = x.elem_count() / (b * c);
        let per = c / self.groups;
        let (weight, bias) = (
            self.weight.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            self.bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        );
        let (storage, layout) = x.storage_and_layout();
        let src = super::cpu::f32_slice(&storage, layout, "GroupNorm")?;
        let mut out = vec![0f32; src.len()];
        let eps = self.eps;
        out.par_chunks_mut(per * plane)
            .zip(src.par_chunks(per * plane))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let n = src.len() as f64;
                let mean = src.iter().map(|&v| v as f64).sum::<f64>() / n;
                let var = src.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                let (mean, std) = (mean as f32, (var + eps).sqrt() as f32);
                let group = i % self.groups;
                for (ch, (dst, src)) in dst.chunks_mut(plane).zip(src.chunks(plane)).enumerate() {
                    let (w, b) = (weight[group * per + ch], bias[group * per + ch]);
                    // The reference's order, `(x - mean) / std · w + b`: folding it into
                    // `x·scale + shift` rounds differently where x is close to the mean.
                    if silu {
                        for (d, &v) in dst.iter_mut().zip(src) {
                            let y = (v - mean) / std * w + b;
                            *d = y / (1.0 + (-y).exp());
                        }
                    } else {
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = (v - mean) / std * w + b;
                        }
                    }
                }
            });
        drop(storage);
        Tensor::from_vec(out, dims, x.device())
    }

    /// The candle-op composition: per-group mean and biased variance in f32, normalise, back to
    /// the input dtype, then the per-channel affine.
    pub(crate) fn reference(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 3 {
            candle_core::bail!("GroupNorm needs (batch, channels, ...), got {dims:?}");
        }
        let (b, c) = (dims[0], dims[1]);
        if c != self.weight.dim(0)? {
            candle_core::bail!(
                "GroupNorm: {c} channels, weights for {}",
                self.weight.dim(0)?
            );
        }
        let per_group = x.elem_count() / (b * self.groups);
        let dtype = x.dtype();
        let xs = x
            .reshape((b, self.groups, per_group))?
            .to_dtype(DType::F32)?;
        let mean = (xs.sum_keepdim(2)? / per_group as f64)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(2)? / per_group as f64)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut affine_shape = vec![1; dims.len()];
        affine_shape[1] = c;
        normed
            .to_dtype(dtype)?
            .reshape(dims)?
            .broadcast_mul(&self.weight.reshape(affine_shape.clone())?)?
            .broadcast_add(&self.bias.reshape(affine_shape)?)
    }
}
