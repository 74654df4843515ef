//! LCM (diffusers' LCMScheduler): the latent-consistency timestep schedule and the
//! consistency-model `step`, float32 like diffusers. Every step but the last draws one
//! standard-normal tensor to re-noise the denoised sample to the next timestep.

use candle_core::Tensor;

use super::common::{self, mul_scalar, to_f32};
use super::config::PredictionType;
use super::{Result, SchedulerConfig, SchedulerError};
use crate::rng::NoiseSource;

/// diffusers' LCMScheduler, set up for a fixed number of inference steps.
#[derive(Clone, Debug)]
pub struct LcmScheduler {
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    clip_sample: Option<f32>,
    timestep_scaling: f32,
}

impl LcmScheduler {
    /// Builds the scheduler from `config` and runs diffusers' `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.check_keys(&["original_inference_steps", "timestep_scaling"])?;
        common::reject_flags("lcm", &[("thresholding", config.thresholding)])?;
        common::check_num_inference_steps(config, num_inference_steps)?;
        let n = num_inference_steps;
        let big_n = config.num_train_timesteps;
        let original_steps = config.original_inference_steps;
        if original_steps > big_n {
            return Err(SchedulerError::InvalidConfig(format!(
                "`original_inference_steps` {original_steps} cannot be larger than \
                 `num_train_timesteps` {big_n}"
            )));
        }
        if n > original_steps {
            return Err(SchedulerError::InvalidConfig(format!(
                "num_inference_steps {n} cannot be larger than the LCM schedule's \
                 `original_inference_steps` {original_steps}"
            )));
        }
        // The distillation schedule k-1, 2k-1, ..., original_steps * k - 1 (k = N // original),
        // descending, sampled at floor(linspace(0, len, n, endpoint=False)).
        let k = (big_n / original_steps) as i64;
        let origin: Vec<i64> = (1..=original_steps as i64)
            .rev()
            .map(|i| i * k - 1)
            .collect();
        let step = origin.len() as f64 / n as f64;
        let int_timesteps: Vec<i64> = (0..n)
            .map(|i| origin[((i as f64 * step).floor() as usize).min(origin.len() - 1)])
            .collect();
        // Default diffusers values: set_alpha_to_one true, clip_sample false.
        let alphas_cumprod = common::alphas_cumprod(config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let this = Self {
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction_type: config.prediction_type,
            clip_sample: config
                .clip_sample
                .unwrap_or(false)
                .then_some(config.clip_sample_range as f32),
            timestep_scaling: config.timestep_scaling as f32,
        };
        for &t in &this.int_timesteps {
            common::alpha_cumprod_at(&this.alphas_cumprod, t)?;
        }
        Ok(this)
    }

    /// `denoised = c_out * pred_original_sample + c_skip * sample` at `timestep`, float32.
    fn denoised(&self, model_output: &Tensor, sample: &Tensor, timestep: i64) -> Result<Tensor> {
        let alpha_prod_t = common::alpha_cumprod_at(&self.alphas_cumprod, timestep)?;
        let mut pred_original_sample = common::x0_alpha(
            self.prediction_type,
            model_output,
            sample,
            alpha_prod_t.sqrt(),
            (1.0 - alpha_prod_t).sqrt(),
        )?;
        if let Some(range) = self.clip_sample {
            pred_original_sample = pred_original_sample.clamp(-range, range)?;
        }
        let (c_skip, c_out) = self.boundary_scalings(timestep);
        Ok((mul_scalar(&pred_original_sample, c_out)? + mul_scalar(sample, c_skip)?)?)
    }

    /// `get_scalings_for_boundary_condition_discrete` in float32 (the timestep is an int64
    /// tensor, so `timestep * timestep_scaling` is a float32 tensor): `(c_skip, c_out)`.
    pub fn boundary_scalings(&self, timestep: i64) -> (f32, f32) {
        let sigma_data2 = 0.25f32;
        let scaled = timestep as f32 * self.timestep_scaling;
        let c_skip = sigma_data2 / (scaled * scaled + sigma_data2);
        let c_out = scaled / (scaled * scaled + sigma_data2).sqrt();
        (c_skip, c_out)
    }
}

impl super::Scheduler for LcmScheduler {
    fn name(&self) -> &'static str {
        "lcm"
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// LCM's `denoised`: its x0 estimate after the boundary condition.
    fn pred_original_sample(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let len = self.int_timesteps.len();
        let timestep = *self
            .int_timesteps
            .get(step_index)
            .ok_or_else(|| common::step_out_of_range(step_index, len))?;
        let x0 = self.denoised(&to_f32(model_output)?, &to_f32(sample)?, timestep)?;
        Ok(x0.to_dtype(sample.dtype())?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let len = self.int_timesteps.len();
        let timestep = *self
            .int_timesteps
            .get(step_index)
            .ok_or_else(|| common::step_out_of_range(step_index, len))?;
        let prev_timestep = self
            .int_timesteps
            .get(step_index + 1)
            .copied()
            .unwrap_or(timestep);
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            common::alpha_cumprod_at(&self.alphas_cumprod, prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;

        let out_dtype = sample.dtype();
        let model_output = to_f32(model_output)?;
        let sample = to_f32(sample)?;
        let denoised = self.denoised(&model_output, &sample, timestep)?;
        let prev_sample = if step_index != len - 1 {
            let z = to_f32(&noise.randn(model_output.dims(), model_output.device())?)?;
            (mul_scalar(&denoised, alpha_prod_t_prev.sqrt())?
                + mul_scalar(&z, beta_prod_t_prev.sqrt())?)?
        } else {
            denoised
        };
        Ok(prev_sample.to_dtype(out_dtype)?)
    }
}
