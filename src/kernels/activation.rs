//! Element-wise activations that the reference composes from several candle ops: on the CPU in
//! f32 one pass each (same formula, same rounding), elsewhere the composition.

use candle_core::{DType, Result, Tensor, D};

/// Elements per CPU task: big enough that rayon's split costs nothing, small enough that a
/// 77-token MLP still splits over two cores.
const CPU_ELEMENTS: usize = 1 << 15;

/// OpenAI CLIP's `quick_gelu`, `x · sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(x) {
        return quick_gelu_cpu(x);
    }
    quick_gelu_reference(x)
}

/// diffusers' GEGLU on a projection `p = [h | gate]` (halves of the last dimension):
/// `h · gelu(gate)` with the exact erf GELU (torch's `F.gelu`).
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    if p.dim(D::Minus1)? % 2 != 0 {
        candle_core::bail!("GEGLU: odd projection width {:?}", p.dims());
    }
    if cpu_f32(p) {
        return geglu_cpu(p);
    }
    geglu_reference(p)
}

/// Whether the one-pass CPU path applies.
fn cpu_f32(x: &Tensor) -> bool {
    super::fused() && x.device().is_cpu() && x.dtype() == DType::F32
}

/// The candle ops: a scale, a sigmoid, a product.
fn quick_gelu_reference(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// One pass, in the reference's order: `x · (exp(-(1.702 x)) + 1)⁻¹`.
fn quick_gelu_cpu(x: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let src = super::cpu::f32_slice(&storage, layout, "quick_gelu")?;
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(CPU_ELEMENTS)
        .zip(src.par_chunks(CPU_ELEMENTS))
        .for_each(|(d, s)| {
            for (d, &v) in d.iter_mut().zip(s) {
                *d = v * (1.0 / ((-(v * 1.702f32)).exp() + 1.0));
            }
        });
    drop(storage);
    Tensor::from_vec(out, x.dims(), x.device())
}

/// The candle ops: two strided halves, an erf GELU, a product.
fn geglu_reference(p: &Tensor) -> Result<Tensor> {
    let inner = p.dim(D::Minus1)? / 2;
    let h = p.narrow(D::Minus1, 0, inner)?;
    let gate = p.narrow(D::Minus1, inner, inner)?;
    h * gate.gelu_erf()?
}

/// One pass over each row's halves (the reference copies both strided halves first).
fn geglu_cpu(p: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let p = p.contiguous()?;
    let mut dims = p.dims().to_vec();
    let width = p.dim(D::Minus1)?;
    let inner = width / 2;
    let (storage, layout) = p.storage_and_layout();
    let src = super::cpu::f32_slice(&storage, layout, "GEGLU")?;
    let mut out = vec![0f32; src.len() / 2];
    let rows = (CPU_ELEMENTS / inner.max(1)).max(1);
    out.par_chunks_mut(rows * inner)
        .zip(src.par_chunks(rows * width))
        .for_each(|(dst, src)| {
            for (dst, row) in dst.chunks_mut(inner).zip(src.chunks(width)) {
                let (h, gate) = row.split_at(inner);
                for ((d, &h), &g) in dst.iter_mut().zip(h).zip(gate) {
                    // candle's f32 erf GELU.
                    let gelu =
                        (candle_core::cpu::erf::erf_f32(g * std::f32::consts::FRAC_1_SQRT_2) + 1.)
                            * 0.5
                            * g;
                    *d = h * gelu;
                }
            }
        });
    drop(storage);
    if let Some(last) = dims.last_mut() {
        *last = inner;
    }
    Tensor::from_vec(out, dims, p.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_pass_activations_give_the_references_bits() {
        let x = Tensor::randn(0f32, 3.0, (2, 7, 40), &Device::Cpu).unwrap();
        let bits = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        assert_eq!(
            bits(quick_gelu_cpu(&x).unwrap()),
            bits(quick_gelu_reference(&x).unwrap())
        );
        assert_eq!(
            bits(geglu_cpu(&x).unwrap()),
            bits(geglu_reference(&x).unwrap())
        );
    }
}
