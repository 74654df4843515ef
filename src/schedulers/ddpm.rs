//! DDPM (diffusers' DDPMScheduler): `set_timesteps` and the ancestral `step` (posterior mean
//! plus posterior noise), float32 like diffusers. Every step at a timestep above 0 draws one
//! standard-normal tensor.

use candle_core::Tensor;

use super::common::{self, mul_scalar, to_f32};
use super::config::{PredictionType, TimestepSpacing, VarianceType};
use super::{Result, SchedulerConfig, SchedulerError};
use crate::rng::NoiseSource;

/// diffusers' DDPMScheduler, set up for a fixed number of inference steps.
#[derive(Clone, Debug)]
pub struct DdpmScheduler {
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
    variance_type: VarianceType,
    clip_sample: Option<f32>,
}

/// The scalars of one DDPM step (float32, as diffusers computes them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DdpmCoefficients {
    /// `alphas_cumprod[t]`.
    pub alpha_prod_t: f32,
    /// `alphas_cumprod[prev_t]`, or 1 past the end of the schedule.
    pub alpha_prod_t_prev: f32,
    /// The factor of the predicted x0 in the posterior mean.
    pub pred_original_sample_coeff: f32,
    /// The factor of the current sample in the posterior mean.
    pub current_sample_coeff: f32,
    /// The factor of the drawn noise (0 when the timestep is 0 and nothing is drawn).
    pub noise_coeff: f32,
}

impl DdpmScheduler {
    /// Builds the scheduler from `config` and runs diffusers' `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.check_keys(&["variance_type"])?;
        common::reject_flags("ddpm", &[("thresholding", config.thresholding)])?;
        let variance_type = config.variance_type.unwrap_or(VarianceType::FixedSmall);
        if matches!(
            variance_type,
            VarianceType::FixedLargeLog | VarianceType::Learned | VarianceType::LearnedRange
        ) {
            return Err(SchedulerError::InvalidConfig(format!(
                "`variance_type` = {variance_type:?} is not supported by the ddpm scheduler \
                 (fixed_small, fixed_small_log and fixed_large are)"
            )));
        }
        common::check_num_inference_steps(config, num_inference_steps)?;
        let alphas_cumprod = common::alphas_cumprod(config)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let int_timesteps: Vec<i64> = common::spaced_timesteps(
            spacing,
            config.num_train_timesteps,
            num_inference_steps,
            config.steps_offset,
        )
        .into_iter()
        .map(|t| t.round_ties_even() as i64)
        .collect();
        let this = Self {
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            alphas_cumprod,
            prediction_type: config.prediction_type,
            variance_type,
            clip_sample: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range as f32),
        };
        for &t in &this.int_timesteps {
            common::alpha_cumprod_at(&this.alphas_cumprod, t)?;
        }
        Ok(this)
    }

    /// `alphas_cumprod` (float32, one per training timestep).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
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

    /// The scalars `step` uses at `step_index`.
    pub fn coefficients(&self, step_index: usize) -> Result<DdpmCoefficients> {
        let len = self.int_timesteps.len();
        let t = *self
            .int_timesteps
            .get(step_index)
            .ok_or_else(|| common::step_out_of_range(step_index, len))?;
        // previous_timestep: the next one in the schedule, -1 after the last.
        let prev_t = self
            .int_timesteps
            .get(step_index + 1)
            .copied()
            .unwrap_or(-1);
        let alpha_prod_t = common::alpha_cumprod_at(&self.alphas_cumprod, t)?;
        let alpha_prod_t_prev = if prev_t >= 0 {
            common::alpha_cumprod_at(&self.alphas_cumprod, prev_t)?
        } else {
            1.0
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;
        let pred_original_sample_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let current_sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let noise_coeff = if t > 0 {
            // _get_variance(t)
            let variance =
                ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t).max(1e-20);
            match self.variance_type {
                VarianceType::FixedSmall => variance.sqrt(),
                VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::FixedLarge => current_beta_t.sqrt(),
                _ => unreachable!("rejected in new()"),
            }
        } else {
            0.0
        };
        Ok(DdpmCoefficients {
            alpha_prod_t,
            alpha_prod_t_prev,
            pred_original_sample_coeff,
            current_sample_coeff,
            noise_coeff,
        })
    }
}

impl super::Scheduler for DdpmScheduler {
    fn name(&self) -> &'static str {
        "ddpm"
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
        let c = self.coefficients(step_index)?;
        let x0 = self.x0(&to_f32(model_output)?, &to_f32(sample)?, c.alpha_prod_t)?;
        Ok(x0.to_dtype(sample.dtype())?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let c = self.coefficients(step_index)?;
        let t = self.int_timesteps[step_index];
        let out_dtype = model_output.dtype();
        let model_output = to_f32(model_output)?;
        let sample = to_f32(sample)?;
        let pred_original_sample = self.x0(&model_output, &sample, c.alpha_prod_t)?;
        let mut prev_sample = (mul_scalar(&pred_original_sample, c.pred_original_sample_coeff)?
            + mul_scalar(&sample, c.current_sample_coeff)?)?;
        if t > 0 {
            let z = to_f32(&noise.randn(model_output.dims(), model_output.device())?)?;
            prev_sample = (prev_sample + mul_scalar(&z, c.noise_coeff)?)?;
        }
        Ok(prev_sample.to_dtype(out_dtype)?)
    }
}
