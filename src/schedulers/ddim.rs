//! DDIM (diffusers' DDIMScheduler): `set_timesteps` and `step`, float32 like diffusers.

use candle_core::Tensor;

use super::common::{self, div_scalar, mul_scalar, to_f32};
use super::config::{PredictionType, TimestepSpacing};
use super::{Result, SchedulerConfig, SchedulerError, SchedulerOptions};
use crate::rng::NoiseSource;

/// diffusers' DDIMScheduler, set up for a fixed number of inference steps.
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    step_ratio: i64,
    prediction_type: PredictionType,
    clip_sample: Option<f32>,
    eta: f32,
}

impl DdimScheduler {
    /// Builds the scheduler from `config` and runs diffusers' `set_timesteps(num_inference_steps)`.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        options: &SchedulerOptions,
    ) -> Result<Self> {
        if config.thresholding {
            return Err(SchedulerError::InvalidConfig(
                "`thresholding` = true (dynamic thresholding) is not supported".into(),
            ));
        }
        if !options.eta.is_finite() || !(0.0..=1.0).contains(&options.eta) {
            return Err(SchedulerError::InvalidConfig(format!(
                "eta = {} is out of range (expected 0 <= eta <= 1)",
                options.eta
            )));
        }
        common::check_num_inference_steps(config, num_inference_steps)?;
        let alphas_cumprod = common::alphas_cumprod(config)?;
        let set_alpha_to_one = config.set_alpha_to_one.unwrap_or(true);
        let final_alpha_cumprod = if set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let big_n = config.num_train_timesteps;
        // DDIM's timesteps are int64: linspace values are rounded half-to-even (`.round()`).
        let int_timesteps: Vec<i64> =
            common::spaced_timesteps(spacing, big_n, num_inference_steps, config.steps_offset)
                .into_iter()
                .map(|t| t.round_ties_even() as i64)
                .collect();
        let this = Self {
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (big_n / num_inference_steps) as i64,
            prediction_type: config.prediction_type,
            clip_sample: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range as f32),
            eta: options.eta as f32,
        };
        // Fail now rather than mid-run if a timestep cannot index alphas_cumprod (e.g. a
        // steps_offset pushing `leading` past the last training timestep).
        for &t in &this.int_timesteps {
            this.alpha_cumprod_at(t)?;
        }
        Ok(this)
    }

    /// `alphas_cumprod` (float32, one per training timestep), as diffusers computes it.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `final_alpha_cumprod`: 1 with `set_alpha_to_one`, else `alphas_cumprod[0]`.
    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    /// `alphas_cumprod[t]` with Python indexing (a negative `t` counts from the end).
    fn alpha_cumprod_at(&self, t: i64) -> Result<f32> {
        let n = self.alphas_cumprod.len() as i64;
        let i = if t < 0 { t + n } else { t };
        if (0..n).contains(&i) {
            Ok(self.alphas_cumprod[i as usize])
        } else {
            Err(SchedulerError::InvalidConfig(format!(
                "timestep {t} is outside the {n} training timesteps"
            )))
        }
    }

    /// `pred_original_sample` (clipped when `clip_sample` is set), float32.
    fn x0(&self, model_output: &Tensor, sample: &Tensor, alpha_prod_t: f32) -> Result<Tensor> {
        let x0 = common::x0_alpha(
            self.prediction_type,
            model_output,
            sample,
            alpha_prod_t.sqrt(),
            (1.0 - alpha_prod_t).sqrt(),
        )?;
        Ok(match self.clip_sample {
            Some(range) => x0.clamp(-range, range)?,
            None => x0,
        })
    }

    /// The step's `(alpha_prod_t, alpha_prod_t_prev)`.
    fn alphas_at(&self, step_index: usize) -> Result<(f32, f32)> {
        let t = *self
            .int_timesteps
            .get(step_index)
            .ok_or_else(|| common::step_out_of_range(step_index, self.int_timesteps.len()))?;
        let prev_t = t - self.step_ratio;
        let alpha_prod_t = self.alpha_cumprod_at(t)?;
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.alpha_cumprod_at(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        Ok((alpha_prod_t, alpha_prod_t_prev))
    }
}

impl super::Scheduler for DdimScheduler {
    fn name(&self) -> &'static str {
        "ddim"
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn pred_original_sample(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let (alpha_prod_t, _) = self.alphas_at(step_index)?;
        let x0 = self.x0(&to_f32(model_output)?, &to_f32(sample)?, alpha_prod_t)?;
        Ok(x0.to_dtype(sample.dtype())?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (alpha_prod_t, alpha_prod_t_prev) = self.alphas_at(step_index)?;
        let out_dtype = sample.dtype();
        let model_output = to_f32(model_output)?;
        let sample = to_f32(sample)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let pred_original_sample = self.x0(&model_output, &sample, alpha_prod_t)?;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let pred_epsilon = match self.prediction_type {
            PredictionType::Epsilon => model_output.clone(),
            PredictionType::Sample => {
                div_scalar(&(&sample - mul_scalar(&model_output, sqrt_a)?)?, sqrt_b)?
            }
            PredictionType::VPrediction => {
                (mul_scalar(&model_output, sqrt_a)? + mul_scalar(&sample, sqrt_b)?)?
            }
        };

        // _get_variance(timestep, prev_timestep)
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta * variance.sqrt();
        // diffusers would give NaN for a (rounding-)negative radicand; clamp it to 0 instead.
        let direction_coeff = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t)
            .max(0.0)
            .sqrt();
        let pred_sample_direction = mul_scalar(&pred_epsilon, direction_coeff)?;
        let mut prev_sample =
            (mul_scalar(&pred_original_sample, alpha_prod_t_prev.sqrt())? + pred_sample_direction)?;
        if self.eta > 0.0 {
            let variance_noise = to_f32(&noise.randn(sample.dims(), sample.device())?)?;
            prev_sample = (prev_sample + mul_scalar(&variance_noise, std_dev_t)?)?;
        }
        Ok(prev_sample.to_dtype(out_dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::NoiseGenerator;
    use crate::schedulers::Scheduler;
    use candle_core::Device;

    #[test]
    fn trailing_61_steps_runs_all_62_diffusers_timesteps() {
        // numpy's arange gives 62 values here; diffusers indexes alphas_cumprod[-1] (the last
        // one) for the extra timestep -1.
        let c = SchedulerConfig::from_value(serde_json::json!({"timestep_spacing": "trailing"}))
            .unwrap();
        let mut s = DdimScheduler::new(&c, 61, &SchedulerOptions::default()).unwrap();
        assert_eq!(s.timesteps().len(), 62);
        assert_eq!(s.timesteps()[61], -1.0);
        let x = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        for i in 0..62 {
            s.step(&x, i, &x, &mut NoiseGenerator::new(0)).unwrap();
        }
    }
}
