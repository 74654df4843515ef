//! Euler (diffusers' EulerDiscreteScheduler): `set_timesteps`, `scale_model_input` and the
//! deterministic (`s_churn = 0`) `step`, float32 like diffusers.

use candle_core::Tensor;

use super::common::{self, div_scalar, mul_scalar, to_f32};
use super::config::{
    FinalSigmasType, InterpolationType, PredictionType, TimestepSpacing, TimestepType,
};
use super::{Result, SchedulerConfig, SchedulerError};
use crate::rng::NoiseSource;

/// diffusers' EulerDiscreteScheduler, set up for a fixed number of inference steps.
#[derive(Clone, Debug)]
pub struct EulerDiscreteScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler from `config` and runs diffusers' `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        for (flag, on) in [
            ("use_karras_sigmas", config.use_karras_sigmas),
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
        ] {
            if on {
                return Err(SchedulerError::InvalidConfig(format!(
                    "`{flag}` = true is not supported by the euler scheduler yet"
                )));
            }
        }
        common::check_num_inference_steps(config, num_inference_steps)?;
        let n = num_inference_steps;
        let mut alphas_cumprod = common::alphas_cumprod(config)?;
        if config.rescale_betas_zero_snr {
            // diffusers: avoid an infinite sigma at the last training timestep.
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        // Euler's timesteps are float32.
        let mut timesteps: Vec<f32> =
            common::spaced_timesteps(spacing, config.num_train_timesteps, n, config.steps_offset)
                .into_iter()
                .map(|t| t as f32)
                .collect();

        let train_sigmas = common::training_sigmas(&alphas_cumprod);
        let mut sigmas: Vec<f32> = match config.interpolation_type {
            InterpolationType::Linear => {
                let xp: Vec<f64> = (0..train_sigmas.len()).map(|i| i as f64).collect();
                let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
                timesteps
                    .iter()
                    .map(|&t| common::np_interp(t as f64, &xp, &fp) as f32)
                    .collect()
            }
            InterpolationType::LogLinear => {
                // torch.linspace(log(sigmas[-1]), log(sigmas[0]), n + 1).exp() (n + 1 values, as
                // diffusers does).
                let (Some(&hi), Some(&lo)) = (train_sigmas.last(), train_sigmas.first()) else {
                    return Err(SchedulerError::InvalidConfig("empty sigma table".into()));
                };
                common::torch_linspace_f32(hi.ln(), lo.ln(), n + 1)
                    .into_iter()
                    .map(f32::exp)
                    .collect()
            }
        };
        let sigma_last = match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train_sigmas[0],
        };
        sigmas.push(sigma_last);

        if config.timestep_type == TimestepType::Continuous
            && config.prediction_type == PredictionType::VPrediction
        {
            timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|s| 0.25 * s.ln())
                .collect();
        }

        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas,
            alphas_cumprod,
            init_noise_sigma,
            prediction_type: config.prediction_type,
        })
    }

    /// The sigma schedule (float32): one per timestep plus the final one, as diffusers'
    /// `scheduler.sigmas`.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `alphas_cumprod` (float32, one per training timestep).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn sigma_pair(&self, step_index: usize) -> Result<(f32, f32)> {
        common::sigma_pair(&self.sigmas, self.timesteps.len(), step_index)
    }
}

impl super::Scheduler for EulerDiscreteScheduler {
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn name(&self) -> &'static str {
        "euler"
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sigma, sigma_next) = self.sigma_pair(step_index)?;
        let out_dtype = model_output.dtype();
        let model_output = to_f32(model_output)?;
        let sample = to_f32(sample)?;
        // s_churn = 0: gamma = 0, sigma_hat = sigma * (0 + 1) = sigma.
        let sigma_hat = sigma;
        let pred_original_sample =
            common::x0_sigma(self.prediction_type, &model_output, &sample, sigma_hat)?;
        let derivative = div_scalar(&(&sample - pred_original_sample)?, sigma_hat)?;
        let dt = sigma_next - sigma_hat;
        let prev_sample = (&sample + mul_scalar(&derivative, dt)?)?;
        Ok(prev_sample.to_dtype(out_dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::Scheduler;

    fn sd_config(extra: serde_json::Value) -> SchedulerConfig {
        SchedulerConfig::from_value(serde_json::json!({
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "timestep_spacing": "leading"
        }))
        .unwrap()
        .with_overrides(&extra)
        .unwrap()
    }

    #[test]
    fn continuous_v_prediction_timesteps_are_quarter_log_sigma() {
        let c = sd_config(
            serde_json::json!({"timestep_type": "continuous", "prediction_type": "v_prediction"}),
        );
        let s = EulerDiscreteScheduler::new(&c, 5).unwrap();
        assert_eq!(s.timesteps().len(), 5);
        for (t, sigma) in s.timesteps().iter().zip(s.sigmas()) {
            assert_eq!(*t, (0.25 * sigma.ln()) as f64);
        }
        // Continuous timesteps only apply with v_prediction.
        let c = sd_config(serde_json::json!({"timestep_type": "continuous"}));
        let s = EulerDiscreteScheduler::new(&c, 5).unwrap();
        assert_eq!(s.timesteps(), &[801.0, 601.0, 401.0, 201.0, 1.0]);
    }

    #[test]
    fn log_linear_sigmas_follow_diffusers() {
        let c = sd_config(serde_json::json!({"interpolation_type": "log_linear"}));
        let s = EulerDiscreteScheduler::new(&c, 4).unwrap();
        // diffusers makes n + 1 log-spaced sigmas (largest to smallest) plus the final 0.
        assert_eq!(s.sigmas().len(), 6);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
        assert!(s.sigmas().windows(2).all(|w| w[0] > w[1]));
        let train = common::training_sigmas(s.alphas_cumprod());
        assert!((s.sigmas()[0] - train[999]).abs() <= 1e-5 * train[999]);
        assert!((s.sigmas()[4] - train[0]).abs() <= 1e-5 * train[0]);
    }

    #[test]
    fn zero_snr_sets_last_alpha_cumprod() {
        let c = sd_config(serde_json::json!({"rescale_betas_zero_snr": true,
                                              "timestep_spacing": "trailing"}));
        let s = EulerDiscreteScheduler::new(&c, 4).unwrap();
        assert_eq!(s.alphas_cumprod()[999], 2f32.powi(-24));
        assert_eq!(s.timesteps()[0], 999.0);
        assert!(s.init_noise_sigma() > 4000.0);
    }
}
