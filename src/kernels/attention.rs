//! Multi-head scaled dot-product attention on token-major `(batch, tokens, heads·head_dim)`
//! tensors: the fused CUDA kernel where it applies, else the chunked candle-op reference.

use candle_core::{DType, Result, Tensor};

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
    token_major_reference(q, k, v, heads, scale, upcast)
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
