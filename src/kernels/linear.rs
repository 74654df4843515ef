//! Linear layers (`x · wᵀ + b`). On the CPU in f32 the weight is kept transposed and the
//! product of each batch item runs in fixed chunks of output features, one single-threaded
//! product each, spread over the cores; elsewhere candle's Linear.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use super::cpu::{f32_slice, product, Operand};

/// Output features per CPU product. Why fixed chunks of one thread each: gemm's own threading
/// synchronises its threads at every block of the sum (a third of a 77-token text encoder's
/// time went to spinning), and a fixed chunk makes an element's sum order depend on the layer's
/// shape alone, never on the core count or on how many items share the call. 192 measured best
/// among 96–768 on the text encoder's and the UNet's shapes.
const CPU_CHUNK: usize = 192;

/// `x · wᵀ + b` over the last dimension, like `torch.nn.Linear`.
#[derive(Clone, Debug)]
pub struct Linear {
    /// candle's layer, for every case the CPU path does not take; on the CPU in f32 its weight
    /// is a transposed view of `transposed` (one copy of the weight either way).
    inner: candle_nn::Linear,
    /// `wᵀ` as a contiguous `(in, out)` matrix, on the CPU in f32. Why: read this way the
    /// product takes the weight in place; the stored `(out, in)` layout is repacked by gemm at
    /// every call, which cost as much as the arithmetic at 77 rows.
    transposed: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` `(out_dim, in_dim)` and, with `bias`, `bias` `(out_dim)` from `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::new(weight, bias)
    }

    /// A Linear from its weight `(out, in)` and optional bias `(out)`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.device().is_cpu() && weight.dtype() == DType::F32 && weight.rank() == 2 {
            let transposed = weight.t()?.contiguous()?;
            return Ok(Self {
                inner: candle_nn::Linear::new(transposed.t()?, bias),
                transposed: Some(transposed),
            });
        }
        Ok(Self {
            inner: candle_nn::Linear::new(weight, bias),
            transposed: None,
        })
    }

    /// The CPU f32 product for `x: (items, tokens, in)`: per item and chunk of output features,
    /// `out[item][:, chunk] = x[item] · wᵀ[:, chunk]`, then the bias added to the chunk while it
    /// is in cache (after the product, as the reference rounds).
    fn cpu(&self, x: &Tensor, transposed: &Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        let x = x.contiguous()?;
        let (items, tokens, k) = x.dims3()?;
        let (wk, n) = transposed.dims2()?;
        if wk != k {
            candle_core::bail!("linear: input {:?} for a {n}×{wk} weight", x.dims());
        }
        let (xs, xl) = x.storage_and_layout();
        let xd = f32_slice(&xs, xl, "linear")?;
        let (ws, wl) = transposed.storage_and_layout();
        let wd = f32_slice(&ws, wl, "linear")?;
        let bias: Option<Vec<f32>> = self.inner.bias().map(|b| b.to_vec1()).transpose()?;
        let mut out = vec![0f32; items * tokens * n];
        let chunks = n.div_ceil(CPU_CHUNK);
        let out_addr = out.as_mut_ptr() as usize;
        (0..items * chunks).into_par_iter().for_each(|task| {
            let (item, chunk) = (task / chunks, task % chunks);
            let o0 = chunk * CPU_CHUNK;
            let width = CPU_CHUNK.min(n - o0);
            let dst = (out_addr as *mut f32).wrapping_add(item * tokens * n + o0);
            // SAFETY: the operands stay inside `x` (this item's rows) and `wᵀ` (this chunk's
            // columns); this task alone writes the chunk's columns of this item's rows, and
            // `out` outlives the loop.
            unsafe {
                product(
                    (tokens, width, k),
                    dst,
                    n,
                    Operand {
                        ptr: xd.as_ptr().add(item * tokens * k),
                        row_stride: k,
                        col_stride: 1,
                    },
                    Operand {
                        ptr: wd.as_ptr().add(o0),
                        row_stride: n,
                        col_stride: 1,
                    },
                    1.0,
                    false,
                    1,
                );
                if let Some(bias) = &bias {
                    let b = &bias[o0..o0 + width];
                    for row in 0..tokens {
                        let r = std::slice::from_raw_parts_mut(dst.add(row * n), width);
                        r.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                    }
                }
            }
        });
        drop((xs, ws));
        Tensor::from_vec(out, (items, tokens, n), x.device())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused() && x.rank() == 3 && x.device().is_cpu() && x.dtype() == DType::F32 {
            if let Some(transposed) = &self.transposed {
                return self.cpu(x, transposed);
            }
        }
        self.inner.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn the_cpu_path_matches_candles_linear() {
        let dev = Device::Cpu;
        // Text-encoder and UNet widths, a chunk-straddling one, with and without bias.
        for (tokens, k, n, bias) in [
            (77usize, 64usize, 400usize, true),
            (5, 96, 192, false),
            (33, 200, 7, true),
        ] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = bias.then(|| Tensor::randn(0f32, 1.0, n, &dev).unwrap());
            let x = Tensor::randn(0f32, 1.0, (3, tokens, k), &dev).unwrap();
            let ours = Linear::new(w.clone(), b.clone()).unwrap();
            let fast = ours.cpu(&x, ours.transposed.as_ref().unwrap()).unwrap();
            let plain = candle_nn::Linear::new(w, b).forward(&x).unwrap();
            assert_eq!(fast.dims(), plain.dims());
            let scale = (k as f32).sqrt();
            assert!(max_diff(&fast, &plain) < 1e-5 * scale, "{tokens}×{k}→{n}");
        }
    }

    #[test]
    fn every_item_gets_the_same_bits_alone_or_in_a_batch() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (600, 320), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 600, &dev).unwrap();
        let linear = Linear::new(w, Some(b)).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 77, 320), &dev).unwrap();
        let t = linear.transposed.as_ref().unwrap();
        let batched: Vec<Vec<Vec<f32>>> = linear.cpu(&x, t).unwrap().to_vec3().unwrap();
        for (i, row) in batched.iter().enumerate() {
            let alone = linear.cpu(&x.narrow(0, i, 1).unwrap(), t).unwrap();
            assert_eq!(&alone.to_vec3::<f32>().unwrap()[0], row, "item {i}");
        }
    }
}
