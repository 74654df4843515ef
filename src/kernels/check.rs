//! Checks of the fused kernels against the f32 reference on fresh random inputs: run by the bench
//! (which reports the errors) and at engine start on CUDA, where a kernel that fails is switched
//! off for the process rather than trusted.

use candle_core::{DType, Device, Result, Tensor};

use super::FusedKernel;

/// One comparison of a fused kernel with the f32 reference.
#[derive(Clone, Debug)]
pub struct KernelCheck {
    /// Which kernel.
    pub kernel: FusedKernel,
    /// The case, e.g. `2x1024 queries, 77 keys, 8 heads of 40` or `2x320x64x64 / 32 groups + silu`.
    pub case: String,
    /// The input and output dtype of the kernel.
    pub dtype: DType,
    /// Whether the fused kernel ran (false: no kernel applies here, nothing was compared).
    pub applied: bool,
    /// `‖fused − reference‖₂ / ‖reference‖₂`.
    pub rel_l2: f64,
    /// Largest `|fused − reference|` over the largest `|reference|`.
    pub rel_max: f64,
    /// The bound `rel_l2` must stay under for this dtype.
    pub tolerance: f64,
}

impl KernelCheck {
    /// Whether the kernel matched (or did not apply).
    pub fn passed(&self) -> bool {
        !self.applied || self.rel_l2 <= self.tolerance
    }
}

/// Relative L2 bound per dtype: a few units of the dtype's rounding error, since inputs are exact
/// in the dtype and only the kernel's roundings (probabilities, outputs) differ from f32.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 4e-3,
        DType::BF16 => 3e-2,
        _ => 1e-5,
    }
}

/// Attention cases: the UNet's self- and cross-attention shapes at SD 1.5 and SDXL widths, and
/// ragged sizes that exercise partial tiles.
type AttentionCase = ((usize, usize, usize, usize), usize);
const ATTENTION_CASES: &[AttentionCase] = &[
    ((2, 8, 1024, 40), 1024),
    ((2, 8, 1024, 40), 77),
    ((2, 8, 256, 80), 256),
    ((2, 10, 1024, 64), 1024),
    ((1, 3, 100, 24), 37),
    ((2, 4, 130, 128), 150),
    ((1, 2, 5, 16), 3),
];

/// GroupNorm cases: (shape, groups, silu).
const GROUP_NORM_CASES: &[(&[usize], usize, bool)] = &[
    (&[2, 320, 64, 64], 32, true),
    (&[2, 1280, 8, 8], 32, false),
    (&[1, 128, 128, 128], 32, true),
    (&[2, 640, 1024], 32, false),
    (&[1, 6, 5, 7], 3, true),
];

fn compare(got: &Tensor, want: &Tensor) -> Result<(f64, f64)> {
    let got = got.to_dtype(DType::F64)?;
    let want = want.to_dtype(DType::F64)?;
    let diff = (&got - &want)?;
    let norm = |t: &Tensor| -> Result<f64> { t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>() };
    let rel_l2 = norm(&diff)? / norm(&want)?.max(f64::MIN_POSITIVE);
    let max_diff = diff.abs()?.max_all()?.to_scalar::<f64>()?;
    let max_ref = want.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok((rel_l2, max_diff / max_ref.max(f64::MIN_POSITIVE)))
}

/// Random normal tensor in `dtype` on `device`.
fn randn(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)
}

/// The check of one case: `fused` is the kernel's output (`None`: no kernel applies, nothing is
/// compared), `reference` computes the f32 result it is compared with.
fn case_check(
    kernel: FusedKernel,
    case: String,
    dtype: DType,
    fused: Option<Tensor>,
    reference: impl FnOnce() -> Result<Tensor>,
) -> Result<KernelCheck> {
    let (applied, rel_l2, rel_max) = match fused {
        Some(got) => {
            let (l2, max) = compare(&got, &reference()?)?;
            (true, l2, max)
        }
        None => (false, 0.0, 0.0),
    };
    Ok(KernelCheck {
        kernel,
        case,
        dtype,
        applied,
        rel_l2,
        rel_max,
        tolerance: tolerance(dtype),
    })
}

/// Compares each fused kernel with the f32 reference on fresh random inputs on `device` in
/// `dtype`; cases where no kernel applies come back with `applied: false`.
pub fn check(device: &Device, dtype: DType) -> Result<Vec<KernelCheck>> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let mut out = Vec::new();
    for &((b, h, n, d), m) in ATTENTION_CASES {
        let q = randn(&[b, n, h * d], dtype, device)?;
        let k = randn(&[b, m, h * d], dtype, device)?;
        let v = randn(&[b, m, h * d], dtype, device)?;
        let scale = 1.0 / (d as f64).sqrt();
        out.push(case_check(
            FusedKernel::Attention,
            format!("{b}x{n} queries, {m} keys, {h} heads of {d}"),
            dtype,
            fused_attention(&q, &k, &v, h, scale)?,
            || {
                super::attention::token_major_reference(
                    &f32(&q)?,
                    &f32(&k)?,
                    &f32(&v)?,
                    h,
                    scale,
                    true,
                )
            },
        )?);
    }
    for &(shape, groups, silu) in GROUP_NORM_CASES {
        let c = shape[1];
        let x = (randn(shape, dtype, device)? * 3.0)?.affine(1.0, 0.5)?;
        let weight = randn(&[c], dtype, device)?;
        let bias = randn(&[c], dtype, device)?;
        let norm = super::GroupNorm::from_parts(weight.clone(), bias.clone(), groups, 1e-5)?;
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        out.push(case_check(
            FusedKernel::GroupNorm,
            format!(
                "{} / {groups} groups{}",
                dims.join("x"),
                if silu { " + silu" } else { "" }
            ),
            dtype,
            fused_group_norm(&norm, &x, silu)?,
            || {
                let reference =
                    super::GroupNorm::from_parts(f32(&weight)?, f32(&bias)?, groups, 1e-5)?;
                let want = reference.reference(&f32(&x)?)?;
                if silu {
                    want.silu()
                } else {
                    Ok(want)
                }
            },
        )?);
    }
    Ok(out)
}

#[cfg(feature = "cuda")]
fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    super::cuda::attention(q, k, v, heads, scale)
}

#[cfg(not(feature = "cuda"))]
fn fused_attention(_: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: f64) -> Result<Option<Tensor>> {
    Ok(None)
}

#[cfg(feature = "cuda")]
fn fused_group_norm(norm: &super::GroupNorm, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
    norm.fused(x, silu)
}

#[cfg(not(feature = "cuda"))]
fn fused_group_norm(_: &super::GroupNorm, _: &Tensor, _: bool) -> Result<Option<Tensor>> {
    Ok(None)
}

/// Runs [`check`] on `device` and switches off, for the rest of the process, every fused kernel
/// with a failing case (logged as an error; the reference path then runs). Returns the checks.
/// Checks `dtype` and f32. On the CPU, or in reference mode, there is nothing to verify and the
/// result is empty.
pub fn verify(device: &Device, dtype: DType) -> Result<Vec<KernelCheck>> {
    // In reference mode no fused kernel runs at all, not even here: that mode is also the way
    // out should a kernel ever fault and take the CUDA context down with it.
    if device.is_cpu() || super::mode() == super::KernelMode::Reference {
        return Ok(Vec::new());
    }
    // f32 too: a VAE that asks for upcasting (SDXL's) normalises in f32 whatever the model dtype.
    let mut dtypes = vec![dtype];
    if dtype != DType::F32 {
        dtypes.push(DType::F32);
    }
    let all = dtypes
        .into_iter()
        .map(|d| check(device, d))
        .collect::<Result<Vec<_>>>()
        .map(|v| v.concat());
    let checks = match all {
        Ok(checks) => checks,
        Err(e) => {
            // A kernel that cannot even run (module load, launch) is as unusable as a wrong one.
            #[cfg(feature = "cuda")]
            for kernel in [FusedKernel::Attention, FusedKernel::GroupNorm] {
                super::cuda::set_enabled(kernel, false);
            }
            tracing::error!(error = %e, "fused kernel check failed to run; using the reference ops");
            return Err(e);
        }
    };
    for c in &checks {
        if c.passed() {
            tracing::debug!(kernel = c.kernel.name(), case = %c.case, rel_l2 = c.rel_l2, applied = c.applied, "fused kernel check");
        } else {
            tracing::error!(
                kernel = c.kernel.name(),
                case = %c.case,
                rel_l2 = c.rel_l2,
                tolerance = c.tolerance,
                "fused kernel disagrees with the f32 reference; using the reference ops instead"
            );
            #[cfg(feature = "cuda")]
            super::cuda::set_enabled(c.kernel, false);
        }
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_the_cpu_no_fused_kernel_applies_and_every_case_passes() {
        let checks = check(&Device::Cpu, DType::F32).unwrap();
        assert_eq!(checks.len(), ATTENTION_CASES.len() + GROUP_NORM_CASES.len());
        assert!(checks.iter().all(|c| !c.applied && c.passed()));
        assert!(verify(&Device::Cpu, DType::F32).unwrap().is_empty());
    }

    #[test]
    fn the_comparison_measures_relative_error() {
        let want = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        let got = Tensor::new(&[3f32, 4.5], &Device::Cpu).unwrap();
        let (l2, max) = compare(&got, &want).unwrap();
        assert!((l2 - 0.1).abs() < 1e-9, "{l2}");
        assert!((max - 0.125).abs() < 1e-9, "{max}");
    }
}
