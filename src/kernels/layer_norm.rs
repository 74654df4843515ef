//! LayerNorm over the last dimension with a two-pass variance (mean first, then the mean of the
//! squared deviations), as transformers' CLIP computes it in torch.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `nn.LayerNorm` (affine) over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

/// Rows per CPU task: a task's rows are a few hundred KB at CLIP's widths, so a 77-token
/// sequence still splits over two cores.
const CPU_ROWS: usize = 32;

impl LayerNorm {
    /// Loads `weight` and `bias` (`size` each) from `vb`.
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    /// `LayerNorm(x)` over `x`'s last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused() && x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 1 {
            return self.cpu(x);
        }
        self.reference(x)
    }

    /// The CPU's f32 LayerNorm: per row, the mean and the variance in f64 (two passes over the
    /// row while it is in cache) and one pass writing `(x - mean) / std · w + b`, the
    /// reference's order. The reference makes seven full-size temporaries.
    fn cpu(&self, x: &Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        let x = x.contiguous()?;
        let width = x.dim(D::Minus1)?;
        if self.weight.dims() != [width] {
            candle_core::bail!(
                "LayerNorm: rows of {width}, weights of {:?}",
                self.weight.dims()
            );
        }
        let (weight, bias) = (
            self.weight.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            self.bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        );
        let (storage, layout) = x.storage_and_layout();
        let src = super::cpu::f32_slice(&storage, layout, "LayerNorm")?;
        let mut out = vec![0f32; src.len()];
        let eps = self.eps;
        out.par_chunks_mut(CPU_ROWS * width)
            .zip(src.par_chunks(CPU_ROWS * width))
            .for_each(|(dst, src)| {
                for (dst, src) in dst.chunks_mut(width).zip(src.chunks(width)) {
                    let n = width as f64;
                    let mean = src.iter().map(|&v| v as f64).sum::<f64>() / n;
                    let var = src.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
                    let (mean, std) = (mean as f32, (var + eps).sqrt() as f32);
                    for (((d, &v), &w), &b) in dst.iter_mut().zip(src).zip(&weight).zip(&bias) {
                        *d = (v - mean) / std * w + b;
                    }
                }
            });
        drop(storage);
        Tensor::from_vec(out, x.dims(), x.device())
    }

    /// The candle-op composition: the mean, the centred values, their mean square, then the
    /// affine (in the input dtype).
    pub(crate) fn reference(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs(t: Tensor) -> f64 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Against the same formula in f64: the CPU path is within 1e-6 of the output's scale and no
    /// further off than the f32 reference (its f64 statistics are the more accurate ones).
    #[test]
    fn the_cpu_path_matches_the_reference() {
        let dev = Device::Cpu;
        for (rows, width) in [(77usize, 768usize), (3, 40), (70, 5)] {
            let norm = LayerNorm {
                weight: Tensor::randn(1f32, 0.5, width, &dev).unwrap(),
                bias: Tensor::randn(0f32, 0.5, width, &dev).unwrap(),
                eps: 1e-5,
            };
            // An offset mean, where a one-pass E[x²] − mean² variance would lose digits.
            let x = (Tensor::randn(0f32, 1.0, (2, rows, width), &dev).unwrap() + 3.0).unwrap();
            let f64_norm = LayerNorm {
                weight: norm.weight.to_dtype(DType::F64).unwrap(),
                bias: norm.bias.to_dtype(DType::F64).unwrap(),
                eps: norm.eps,
            };
            let truth = f64_norm
                .reference(&x.to_dtype(DType::F64).unwrap())
                .unwrap();
            let error = |t: Tensor| max_abs((t.to_dtype(DType::F64).unwrap() - &truth).unwrap());
            let fast = error(norm.cpu(&x).unwrap());
            let plain = error(norm.reference(&x).unwrap());
            let scale = max_abs(truth.clone());
            assert!(
                fast < 1e-6 * scale,
                "{rows}×{width}: {fast} at scale {scale}"
            );
            assert!(
                fast <= plain * 1.5 + 1e-7,
                "{rows}×{width}: {fast} against {plain}"
            );
        }
    }
}
