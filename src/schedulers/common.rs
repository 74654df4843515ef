//! Pieces shared by the schedulers, written to reproduce diffusers' arithmetic (torch float32
//! tensors, numpy float64 arrays) value for value: beta schedules, `alphas_cumprod`, timestep
//! spacing, sigma tables, numpy's `linspace` / `arange` / `interp`, and float32 scalar-tensor ops.

use candle_core::{DType, Tensor};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{Result, SchedulerError};

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on CPU: float32 step, the first half
/// counted up from `start`, the second half counted down from `end`. torch's vectorised x86 kernel
/// fuses each `start + step * i` into one FMA; doing the same reproduces the recorded
/// `alphas_cumprod` bit for bit (unfused: 121 of 1000 values differ by 1 ulp).
pub fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - i - 1) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `np.linspace(start, stop, num)` (float64, endpoint included).
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            y[num - 1] = stop;
            y
        }
    }
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, values
/// `start + i * ((start + step) - start)` (numpy's fill rule).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, xp, fp)` for one point (`xp` increasing): clamps outside, exact at knots.
pub fn np_interp(x: f64, xp: &[f64], fp: &[f64]) -> f64 {
    let n = xp.len().min(fp.len());
    if n == 0 || x.is_nan() {
        return f64::NAN;
    }
    if x < xp[0] {
        return fp[0];
    }
    if x > xp[n - 1] {
        return fp[n - 1];
    }
    // j: the last knot with xp[j] <= x.
    let j = xp[..n].partition_point(|&v| v <= x) - 1;
    if j == n - 1 || xp[j] == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
    let r = slope * (x - xp[j]) + fp[j];
    if r.is_nan() {
        slope * (x - xp[j + 1]) + fp[j + 1]
    } else {
        r
    }
}

/// `torch.cumprod` of a float32 tensor on CPU (accumulated in float64, stored as float32).
pub fn cumprod_f32(xs: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    xs.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar(n)` with the cosine transform and max beta 0.999.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr(betas)` in float32.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut s: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (Some(&s0), Some(&st)) = (s.first(), s.last()) else {
        return Vec::new();
    };
    let factor = s0 / (s0 - st);
    for v in s.iter_mut() {
        *v = (*v - st) * factor;
    }
    let bar: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// The training betas as diffusers' schedulers compute them (float32), including
/// `trained_betas` and `rescale_betas_zero_snr`.
pub fn betas(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = config.num_train_timesteps;
    let betas = if let Some(trained) = &config.trained_betas {
        if trained.len() != n {
            return Err(SchedulerError::InvalidConfig(format!(
                "`trained_betas` has {} values but `num_train_timesteps` is {n}",
                trained.len()
            )));
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match config.beta_schedule {
            BetaSchedule::Linear => {
                torch_linspace_f32(config.beta_start as f32, config.beta_end as f32, n)
            }
            BetaSchedule::ScaledLinear => torch_linspace_f32(
                config.beta_start.sqrt() as f32,
                config.beta_end.sqrt() as f32,
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            BetaSchedule::SquaredCosCapV2 => betas_for_alpha_bar_cosine(n),
        }
    };
    Ok(if config.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    })
}

/// `alphas_cumprod = cumprod(1 - betas)` in float32, as diffusers' `__init__` computes it.
pub fn alphas_cumprod(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let alphas: Vec<f32> = betas(config)?.iter().map(|b| 1.0 - b).collect();
    Ok(cumprod_f32(&alphas))
}

/// The training sigma table `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32,
/// indexed by training timestep (ascending).
pub fn training_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// Checks the step count the way diffusers' `set_timesteps` would need it to be.
pub fn check_num_inference_steps(config: &SchedulerConfig, n: usize) -> Result<()> {
    if n == 0 {
        return Err(SchedulerError::InvalidConfig(
            "num_inference_steps must be at least 1".into(),
        ));
    }
    if n > config.num_train_timesteps {
        return Err(SchedulerError::InvalidConfig(format!(
            "num_inference_steps {n} cannot be larger than num_train_timesteps {}",
            config.num_train_timesteps
        )));
    }
    Ok(())
}

/// The inference timesteps of the DDIM/Euler family for `spacing`, descending, before the
/// class's own dtype conversion: `leading` and `trailing` give whole numbers (trailing already
/// rounded half-to-even like `np.round`), `linspace` gives the unrounded float64
/// `np.linspace(0, N - 1, n)` values (DDIM rounds them, Euler casts them to float32).
///
/// Like numpy, `trailing` can give one extra timestep (`-1`) when `N / (N / n)` rounds above `n`
/// (e.g. N = 1000, n = 61); diffusers keeps it, and so does this.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let big_n = num_train_timesteps;
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = big_n / n.max(1);
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = big_n as f64 / n.max(1) as f64;
            np_arange(big_n as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect()
        }
        TimestepSpacing::Linspace => {
            let mut t = np_linspace(0.0, (big_n - 1) as f64, n);
            t.reverse();
            t
        }
    }
}

/// `np.interp(timesteps, arange(len(sigmas)), sigmas)`: the training sigma table (float32,
/// ascending in training timestep) read at possibly fractional timesteps, in float64.
pub fn interp_sigmas(timesteps: &[f64], train_sigmas: &[f32]) -> Vec<f64> {
    let xp: Vec<f64> = (0..train_sigmas.len()).map(|i| i as f64).collect();
    let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
    timesteps.iter().map(|&t| np_interp(t, &xp, &fp)).collect()
}

/// The timesteps of the multistep solvers (DPM-Solver++, UniPC), descending, as int64:
/// `n + 1` points spaced over `[0, last_timestep)`, the last one dropped.
/// `leading`: `arange(n + 1) * (last // (n + 1))`, reversed, minus its last, `+ steps_offset`;
/// `linspace`: `round(linspace(0, last - 1, n + 1))`, reversed, minus its last;
/// `trailing`: `round(arange(last, 0, -N / n)) - 1`.
pub fn multistep_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    last_timestep: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = (last_timestep / (n + 1)) as i64;
            (1..=n as i64)
                .rev()
                .map(|i| i * ratio + steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Linspace => {
            let mut t = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1);
            t.reverse();
            t.pop();
            t.into_iter().map(|x| x.round_ties_even() as i64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train_timesteps as f64 / n.max(1) as f64;
            np_arange(last_timestep as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| t.round_ties_even() as i64 - 1)
                .collect()
        }
    }
}

/// diffusers' `_convert_to_karras`: `n` sigmas from `sigma_max` down to `sigma_min`, evenly
/// spaced in `sigma ** (1 / 7)` (float64, as numpy computes them).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating
/// linearly in log sigma between the two neighbouring entries of `log_sigmas` (float32,
/// ascending). Float64 except `low - high`, which numpy computes in float32.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // The last index with log_sigmas[i] <= log_sigma (0 when there is none), at most n - 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// diffusers' `_sigma_to_alpha_sigma_t` in float32: `alpha = 1 / sqrt(sigma^2 + 1)`,
/// `sigma_t = sigma * alpha`.
pub fn alpha_sigma_t(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// The x0 prediction in alpha space, float32: from `model_output` at a step whose noise
/// level is `alpha_t = sqrt(alphabar_t)`, `sigma_t = sqrt(1 - alphabar_t)` (DDIM, DDPM, LCM,
/// PNDM, and the multistep solvers' `convert_model_output`).
pub fn x0_alpha(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_t: f32,
    sigma_t: f32,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => {
            div_scalar(&(sample - mul_scalar(model_output, sigma_t)?)?, alpha_t)?
        }
        PredictionType::Sample => model_output.clone(),
        PredictionType::VPrediction => {
            (mul_scalar(sample, alpha_t)? - mul_scalar(model_output, sigma_t)?)?
        }
    })
}

/// The x0 prediction in sigma space (Euler-type samplers, whose `sample` is unscaled), float32.
pub fn x0_sigma(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Sample => model_output.clone(),
        PredictionType::Epsilon => (sample - mul_scalar(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (mul_scalar(model_output, c_out)? + div_scalar(sample, sigma * sigma + 1.0)?)?
        }
    })
}

/// `lambda = ln(alpha) - ln(sigma)` in float32 (`+inf` at sigma 0).
pub fn lambda_of(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// `alphas_cumprod[t]` with Python indexing (a negative `t` counts from the end).
pub fn alpha_cumprod_at(alphas_cumprod: &[f32], t: i64) -> Result<f32> {
    let n = alphas_cumprod.len() as i64;
    let i = if t < 0 { t + n } else { t };
    if (0..n).contains(&i) {
        Ok(alphas_cumprod[i as usize])
    } else {
        Err(SchedulerError::InvalidConfig(format!(
            "timestep {t} is outside the {n} training timesteps"
        )))
    }
}

/// Solves `a x = b` (`a` square, row-major) in float32 by LU with partial pivoting, the way
/// LAPACK's `sgesv` (behind `torch.linalg.solve`) does. `None` if `a` is singular.
pub fn solve_f32(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Option<Vec<f32>> {
    let n = b.len();
    if a.len() != n || a.iter().any(|r| r.len() != n) {
        return None;
    }
    for k in 0..n {
        // The first row holding the largest |a[i][k]| (isamax).
        let mut p = k;
        for i in k + 1..n {
            if a[i][k].abs() > a[p][k].abs() {
                p = i;
            }
        }
        if a[p][k] == 0.0 {
            return None;
        }
        a.swap(k, p);
        b.swap(k, p);
        let inv = 1.0 / a[k][k];
        let (top, bottom) = a.split_at_mut(k + 1);
        let pivot_row = &top[k];
        for row in bottom.iter_mut() {
            let l = row[k] * inv;
            row[k] = l;
            for (x, p) in row[k + 1..].iter_mut().zip(&pivot_row[k + 1..]) {
                *x -= l * p;
            }
        }
    }
    // Forward substitution with the unit lower factor, then back substitution.
    for i in 0..n {
        let s: f32 = a[i][..i].iter().zip(&b[..i]).map(|(l, y)| l * y).sum();
        b[i] -= s;
    }
    for i in (0..n).rev() {
        let s: f32 = a[i][i + 1..]
            .iter()
            .zip(&b[i + 1..])
            .map(|(u, x)| u * x)
            .sum();
        b[i] = (b[i] - s) / a[i][i];
    }
    Some(b)
}

/// Rejects the switches among `flags` (config key, value) that are on: features of the
/// scheduler's diffusers class that are not implemented here. Each scheduler passes only the
/// keys its class reads (diffusers ignores the others).
pub fn reject_flags(scheduler: &str, flags: &[(&str, bool)]) -> Result<()> {
    match flags.iter().find(|(_, on)| *on) {
        Some((flag, _)) => Err(SchedulerError::InvalidConfig(format!(
            "`{flag}` = true is not supported by the {scheduler} scheduler"
        ))),
        None => Ok(()),
    }
}

/// A 0-dim tensor holding `x` with `like`'s dtype and device.
pub fn scalar_like(x: f32, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::new(x, like.device())?.to_dtype(like.dtype())?)
}

/// `t * x` element-wise, rounded once (as torch's `tensor * float32 scalar`).
pub fn mul_scalar(t: &Tensor, x: f32) -> Result<Tensor> {
    // candle's affine computes `v * mul + add`; with add = 0 that is one rounded product.
    Ok(t.affine(x as f64, 0.0)?)
}

/// `t / x` element-wise as a true division (not a multiplication by `1 / x`).
pub fn div_scalar(t: &Tensor, x: f32) -> Result<Tensor> {
    Ok(t.broadcast_div(&scalar_like(x, t)?)?)
}

/// `t` as float32 (the dtype all scheduler math runs in).
pub fn to_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// The error for a step index past the end of the schedule.
pub fn step_out_of_range(step_index: usize, len: usize) -> SchedulerError {
    SchedulerError::InvalidConfig(format!(
        "step_index {step_index} is out of range: the schedule has {len} steps"
    ))
}

/// `(sigma_i, sigma_{i+1})` of a sigma schedule with `num_timesteps` steps (plus the final sigma).
pub fn sigma_pair(sigmas: &[f32], num_timesteps: usize, step_index: usize) -> Result<(f32, f32)> {
    if step_index >= num_timesteps || step_index + 1 >= sigmas.len() {
        return Err(step_out_of_range(step_index, num_timesteps));
    }
    Ok((sigmas[step_index], sigmas[step_index + 1]))
}

/// The sigma samplers' `scale_model_input`: `x / sqrt(sigma² + 1)`, in f32, back in x's dtype.
pub fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let scaled = div_scalar(&to_f32(sample)?, (sigma * sigma + 1.0).sqrt())?;
    Ok(scaled.to_dtype(sample.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_like_numpy_and_torch() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(
            torch_linspace_f32(0.0, 1.0, 5),
            vec![0.0, 0.25, 0.5, 0.75, 1.0]
        );
        assert_eq!(torch_linspace_f32(2.0, 3.0, 1), vec![2.0]);
    }

    #[test]
    fn arange_and_interp_like_numpy() {
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(np_arange(0.0, 1.0, 0.5), vec![0.0, 0.5]);
        assert!(np_arange(0.0, 1.0, -0.5).is_empty());
        // numpy: 1000 / (1000 / 61) = 61.00000000000001 -> 62 values.
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        let xp = [0.0, 1.0, 2.0];
        let fp = [10.0, 20.0, 40.0];
        assert_eq!(np_interp(-1.0, &xp, &fp), 10.0);
        assert_eq!(np_interp(0.5, &xp, &fp), 15.0);
        assert_eq!(np_interp(1.0, &xp, &fp), 20.0);
        assert_eq!(np_interp(1.25, &xp, &fp), 25.0);
        assert_eq!(np_interp(2.0, &xp, &fp), 40.0);
        assert_eq!(np_interp(7.0, &xp, &fp), 40.0);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let c = SchedulerConfig {
            rescale_betas_zero_snr: true,
            beta_schedule: BetaSchedule::ScaledLinear,
            beta_start: 0.00085,
            beta_end: 0.012,
            ..SchedulerConfig::default()
        };
        let ac = alphas_cumprod(&c).unwrap();
        assert_eq!(ac.len(), 1000);
        assert!(ac[999].abs() < 1e-12, "{}", ac[999]);
        // The first alpha_cumprod is unchanged by the rescale.
        let plain = alphas_cumprod(&SchedulerConfig {
            rescale_betas_zero_snr: false,
            ..c.clone()
        })
        .unwrap();
        assert!((ac[0] - plain[0]).abs() < 1e-6);
    }

    #[test]
    fn multistep_spacing_like_diffusers() {
        use TimestepSpacing::*;
        assert_eq!(
            multistep_timesteps(Leading, 1000, 1000, 10, 1),
            vec![901, 811, 721, 631, 541, 451, 361, 271, 181, 91]
        );
        assert_eq!(
            multistep_timesteps(Linspace, 1000, 1000, 4, 0),
            vec![999, 749, 500, 250]
        );
        assert_eq!(
            multistep_timesteps(Trailing, 1000, 1000, 4, 0),
            vec![999, 749, 499, 249]
        );
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let log_sigmas: Vec<f32> = [0.1f32, 0.2, 0.4, 0.8].iter().map(|s| s.ln()).collect();
        // (float64 log of the point vs the float32 table: equal to ~1e-7.)
        assert!((sigma_to_t(0.2f32 as f64, &log_sigmas) - 1.0).abs() < 1e-6);
        let mid = ((0.2f64.ln() + 0.4f64.ln()) / 2.0).exp();
        assert!((sigma_to_t(mid, &log_sigmas) - 1.5).abs() < 1e-6);
        // Clamped at both ends.
        assert_eq!(sigma_to_t(0.01, &log_sigmas), 0.0);
        assert_eq!(sigma_to_t(5.0, &log_sigmas), 3.0);
    }

    #[test]
    fn karras_endpoints_and_solve() {
        let k = karras_sigmas(0.03, 14.6, 5);
        assert_eq!(k.len(), 5);
        assert!((k[0] - 14.6).abs() < 1e-12 && (k[4] - 0.03).abs() < 1e-12);
        assert!(k.windows(2).all(|w| w[0] > w[1]));
        let x = solve_f32(vec![vec![1.0, 1.0], vec![-2.0, 1.0]], vec![3.0, 0.0]).unwrap();
        assert!((x[0] - 1.0).abs() < 1e-6 && (x[1] - 2.0).abs() < 1e-6);
        assert!(solve_f32(vec![vec![1.0, 1.0], vec![1.0, 1.0]], vec![1.0, 0.0]).is_none());
    }

    #[test]
    fn cosine_betas_are_capped() {
        let c = SchedulerConfig {
            beta_schedule: BetaSchedule::SquaredCosCapV2,
            ..SchedulerConfig::default()
        };
        let b = betas(&c).unwrap();
        assert_eq!(b.len(), 1000);
        assert_eq!(b[999], 0.999);
        assert!(b[0] > 0.0 && b[0] < 1e-3);
        let bad = SchedulerConfig {
            trained_betas: Some(vec![0.1; 3]),
            ..SchedulerConfig::default()
        };
        assert!(betas(&bad).is_err());
    }
}
