//! Euler ancestral (diffusers' EulerAncestralDiscreteScheduler): `set_timesteps`,
//! `scale_model_input` and the stochastic `step`, float32 like diffusers. Each step draws one
//! standard-normal tensor (the last one too, where it is multiplied by 0).

use candle_core::Tensor;

use super::common::{self, div_scalar, mul_scalar, to_f32};
use super::config::{PredictionType, TimestepSpacing};
use super::{Result, SchedulerConfig, SchedulerError};
use crate::rng::NoiseSource;

/// diffusers' EulerAncestralDiscreteScheduler, set up for a fixed number of inference steps.
#[derive(Clone, Debug)]
pub struct EulerAncestralScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
}

impl EulerAncestralScheduler {
    /// Builds the scheduler from `config` and runs diffusers' `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            // diffusers: NotImplementedError("prediction_type not implemented yet: sample").
            return Err(SchedulerError::InvalidConfig(
                "`prediction_type` = `sample` is not supported by the euler_a scheduler".into(),
            ));
        }
        common::check_num_inference_steps(config, num_inference_steps)?;
        let mut alphas_cumprod = common::alphas_cumprod(config)?;
        if config.rescale_betas_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        // float32 timesteps, as EulerDiscreteScheduler.
        let timesteps: Vec<f32> = common::spaced_timesteps(
            spacing,
            config.num_train_timesteps,
            num_inference_steps,
            config.steps_offset,
        )
        .into_iter()
        .map(|t| t as f32)
        .collect();
        let t64: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        let train_sigmas = common::training_sigmas(&alphas_cumprod);
        let mut sigmas: Vec<f32> = common::interp_sigmas(&t64, &train_sigmas)
            .into_iter()
            .map(|s| s as f32)
            .collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps: t64,
            sigmas,
            init_noise_sigma,
            prediction_type: config.prediction_type,
        })
    }

    /// The sigma schedule (float32): one per timestep plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn sigma_pair(&self, step_index: usize) -> Result<(f32, f32)> {
        common::sigma_pair(&self.sigmas, self.timesteps.len(), step_index)
    }
}

impl super::Scheduler for EulerAncestralScheduler {
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn name(&self) -> &'static str {
        "euler_a"
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (sigma, _) = self.sigma_pair(step_index)?;
        common::scale_by_sigma(sample, sigma)
    }

    fn pred_original_sample(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let (sigma, _) = self.sigma_pair(step_index)?;
        let x0 = common::x0_sigma(
            self.prediction_type,
            &to_f32(model_output)?,
            &to_f32(sample)?,
            sigma,
        )?;
        Ok(x0.to_dtype(sample.dtype())?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sigma, sigma_to) = self.sigma_pair(step_index)?;
        let out_dtype = model_output.dtype();
        let model_output = to_f32(model_output)?;
        let sample = to_f32(sample)?;
        let pred_original_sample =
            common::x0_sigma(self.prediction_type, &model_output, &sample, sigma)?;
        let sigma_from = sigma;
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        // diffusers would give NaN for a (rounding-)negative radicand; clamp it to 0 instead.
        let sigma_up = (to2 * (from2 - to2) / from2).max(0.0).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = div_scalar(&(&sample - pred_original_sample)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev_sample = (&sample + mul_scalar(&derivative, dt)?)?;
        let variance_noise = to_f32(&noise.randn(model_output.dims(), model_output.device())?)?;
        let prev_sample = (prev_sample + mul_scalar(&variance_noise, sigma_up)?)?;
        Ok(prev_sample.to_dtype(out_dtype)?)
    }
}
