//! Multi-head scaled dot-product attention on token-major `(batch, tokens, heads·head_dim)`
//! tensors: the fused CUDA kernel where it applies, else the chunked candle-op reference.

use candle_core::{DType, Result, Tensor};

use super::cpu::{product, Operand};

/// Largest score matrix (elements) the reference path materialises at once; longer query
/// sequences are processed in row chunks so memory stays bounded (same numbers per row).
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// Multi-head `softmax(q kᵀ · scale) v` on token-major tensors: `q: (b, n, heads·d)`,
/// `k, v: (b, m, heads·d)` (what the projections produce), returning `(b, n, heads·d)` in the
/// input dtype. With `upcast` the scores and softmax are f32 whatever the input dtype (diffusers'
/// `upcast_attention` / `upcast_softmax`); the fused kernel always works in f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fused() {
        if let Some(out) = super::cuda::attention(q, k, v, heads, scale)? {
            return Ok(out);
        }
    }
    if super::fused() && q.device().is_cpu() && q.dtype() == DType::F32 {
        return cpu(q, k, v, heads, scale, false);
    }
    token_major_reference(q, k, v, heads, scale, upcast)
}

/// [`attention`] with a causal mask (query `i` sees keys `0..=i`; CLIP's text encoder), on
/// `q, k, v: (b, n, heads·d)`: the CPU path in f32, else the candle ops with an additive
/// `-inf` mask (the CUDA kernel has no mask).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    if super::fused() && q.device().is_cpu() && q.dtype() == DType::F32 {
        return cpu(q, k, v, heads, scale, true);
    }
    causal_reference(q, k, v, heads, scale)
}

/// Heads split out, `softmax(q kᵀ · scale + mask) v`, heads merged back.
fn causal_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, n, width) = q.dims3()?;
    let m = k.dim(1)?;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, width / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..m).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (n, m), q.device())?.to_dtype(q.dtype())?;
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, width))
}

/// Query rows per CPU attention task: the task's score block (`rows × keys` f32) stays a few MB
/// while a 32×32 map at batch 2 still gives the two cores dozens of tasks.
const CPU_QUERY_ROWS: usize = 256;

/// The CPU's f32 attention without copies: per batch item, head and block of query rows, one
/// matrix product writes the scaled scores `q kᵀ · scale` (reading the head's columns of the
/// token-major `q` and `k` in place, no split, transpose or scale pass), the softmax runs in
/// place, and a second product writes `probs · v` straight into the head's columns of the
/// token-major output (no merge). f32 whatever `upcast` says, as the reference is for f32.
/// With `causal`, row `i`'s softmax covers keys `0..=i` and the rest get an exact zero: the
/// masked reference's numbers, as `exp(-inf)` adds zeros to its sums.
fn cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (b, n, width) = q.dims3()?;
    let m = k.dim(1)?;
    if k.dims() != [b, m, width] || v.dims() != [b, m, width] || width % heads != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let d = width / heads;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (qd, kd, vd) = (f32s(&qs, ql)?, f32s(&ks, kl)?, f32s(&vs, vl)?);
    let mut out = vec![0f32; b * n * width];
    let blocks = n.div_ceil(CPU_QUERY_ROWS);
    let out_addr = out.as_mut_ptr() as usize;
    (0..b * heads * blocks).into_par_iter().for_each_init(
        || vec![0f32; CPU_QUERY_ROWS * m],
        |scores, task| {
            let (item, rest) = (task / (heads * blocks), task % (heads * blocks));
            let (head, block) = (rest / blocks, rest % blocks);
            let r0 = block * CPU_QUERY_ROWS;
            let rows = CPU_QUERY_ROWS.min(n - r0);
            let scores = &mut scores[..rows * m];
            let q0 = (item * n + r0) * width + head * d;
            let kv0 = item * m * width + head * d;
            // SAFETY: every pointer and stride stays inside its buffer: rows `r0..r0 + rows` of
            // `q` and the output, all `m` rows of `k` and `v`, columns `head·d..(head + 1)·d`;
            // this task alone writes those output elements, and `out` outlives the loop.
            unsafe {
                // scores (rows × m) = scale · q_h (rows × d) · k_hᵀ (d × m): kᵀ is `k` read
                // with its strides swapped.
                product(
                    (rows, m, d),
                    scores.as_mut_ptr(),
                    m,
                    Operand {
                        ptr: qd.as_ptr().add(q0),
                        row_stride: width,
                        col_stride: 1,
                    },
                    Operand {
                        ptr: kd.as_ptr().add(kv0),
                        row_stride: 1,
                        col_stride: width,
                    },
                    scale as f32,
                    false,
                    1,
                );
            }
            for (i, row) in scores.chunks_mut(m).enumerate() {
                let seen = if causal { (r0 + i + 1).min(m) } else { m };
                let (row, masked) = row.split_at_mut(seen);
                masked.fill(0.0);
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                // Divided, not multiplied by 1/sum: the reference's (and torch's) rounding.
                row.iter_mut().for_each(|s| *s /= sum);
            }
            unsafe {
                // out_h (rows × d) = probs (rows × m) · v_h (m × d)
                product(
                    (rows, d, m),
                    (out_addr as *mut f32).add(q0),
                    width,
                    Operand {
                        ptr: scores.as_ptr(),
                        row_stride: m,
                        col_stride: 1,
                    },
                    Operand {
                        ptr: vd.as_ptr().add(kv0),
                        row_stride: width,
                        col_stride: 1,
                    },
                    1.0,
                    false,
                    1,
                );
            }
        },
    );
    drop((qs, ks, vs));
    Tensor::from_vec(out, (b, n, width), q.device())
}

/// The f32 contents of a contiguous CPU tensor.
fn f32s<'a>(storage: &'a candle_core::Storage, layout: &candle_core::Layout) -> Result<&'a [f32]> {
    super::cpu::f32_slice(storage, layout, "attention")
}

/// [`reference`] on token-major tensors: split the heads, attend, merge them back.
pub(crate) fn token_major_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
) -> Result<Tensor> {
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, n, width) = t.dims3()?;
        t.reshape((b, n, heads, width / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (b, n, width) = q.dims3()?;
    let out = reference(&split(q)?, &split(k)?, &split(v)?, scale, upcast)?;
    out.transpose(1, 2)?.contiguous()?.reshape((b, n, width))
}

/// The candle-op composition on `(b, heads, n, d)` tensors: scores, softmax, weighted sum (query
/// rows chunked when large).
pub(crate) fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    upcast: bool,
) -> Result<Tensor> {
    chunked(q, k, v, scale, upcast, MAX_SCORE_ELEMENTS)
}

/// [`reference`] with at most `max_scores` score elements materialised at once.
fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    upcast: bool,
    max_scores: usize,
) -> Result<Tensor> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let rows = (max_scores / (b * h * m).max(1)).max(1);
    if rows >= n {
        return dense(q, k, v, scale, upcast);
    }
    let mut parts = Vec::with_capacity(n.div_ceil(rows));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        parts.push(dense(&q.narrow(2, start, len)?, k, v, scale, upcast)?);
        start += len;
    }
    Tensor::cat(&parts, 2)
}

fn dense(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, upcast: bool) -> Result<Tensor> {
    let dtype = q.dtype();
    let (q, k) = if upcast && dtype != DType::F32 {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    } else {
        (q.clone(), k.clone())
    };
    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Random token-major `q (b, n, ·)`, `k, v (b, m, ·)` and the largest
    /// difference between `path` and `reference` on them.
    fn max_difference(
        (b, n, m, heads, d): (usize, usize, usize, usize, usize),
        path: impl Fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>,
        reference: impl Fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>,
    ) -> f32 {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let got = path(&q, &k, &v, scale).unwrap();
        let want = reference(&q, &k, &v, scale).unwrap();
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap()
    }

    /// The CPU path (the default mode) equals the reference on token-major tensors, with more
    /// query rows than one task takes and a key count that is not a multiple of anything.
    #[test]
    fn the_cpu_path_matches_the_reference() {
        for shape @ (_, _, _, heads, _) in [(2, 600, 77, 8, 5), (1, 300, 300, 2, 16)] {
            let diff = max_difference(
                shape,
                |q, k, v, scale| cpu(q, k, v, heads, scale, false),
                |q, k, v, scale| token_major_reference(q, k, v, heads, scale, false),
            );
            assert!(diff < 2e-6, "{shape:?}");
        }
    }

    /// The causal CPU path equals the masked reference, past one task's rows (so the mask's
    /// diagonal is found by the row's global index) and at CLIP's own shape.
    #[test]
    fn the_causal_cpu_path_matches_the_masked_reference() {
        for shape @ (_, _, _, heads, _) in [(2, 77, 77, 12, 8), (1, 300, 300, 2, 16)] {
            let diff = max_difference(
                shape,
                |q, k, v, scale| cpu(q, k, v, heads, scale, true),
                |q, k, v, scale| causal_reference(q, k, v, heads, scale),
            );
            assert!(diff < 2e-6, "{shape:?}");
        }
    }

    #[test]
    fn chunked_rows_give_the_dense_result() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 300, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 2, 70, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 2, 70, 8), &dev).unwrap();
        let want = dense(&q, &k, &v, 0.35, false).unwrap();
        // 2 heads x 70 keys x 64 rows per chunk: 5 chunks, the last one short.
        let got = chunked(&q, &k, &v, 0.35, false, 2 * 70 * 64).unwrap();
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
