//! DPM-Solver++ multistep (diffusers' DPMSolverMultistepScheduler with `algorithm_type`
//! `dpmsolver++`): `set_timesteps` (plain, Karras or Lu-lambda sigmas) and the first- and
//! second-order multistep updates (midpoint or heun), float32 like diffusers.
//!
//! The solver keeps the converted model outputs (x0 predictions) of previous steps; a callback
//! that replaces the latents does not reset them, as in diffusers.

use candle_core::Tensor;

use super::common::{self, alpha_sigma_t, lambda_of, mul_scalar, to_f32};
use super::config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, PredictionType, SolverType, TimestepSpacing,
    VarianceType,
};
use super::{Result, SchedulerConfig, SchedulerError};
use crate::rng::NoiseSource;

/// diffusers' DPMSolverMultistepScheduler (dpmsolver++), set up for a fixed number of steps.
#[derive(Clone, Debug)]
pub struct DpmSolverMultistepScheduler {
    name: &'static str,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction_type: PredictionType,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The last `solver_order` x0 predictions, oldest first (`model_outputs`).
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl DpmSolverMultistepScheduler {
    /// Builds the scheduler from `config` and runs diffusers' `set_timesteps(num_inference_steps)`.
    /// `name` is the ListModels name it is reported under.
    pub fn new(
        name: &'static str,
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self> {
        config.check_keys(&[
            "algorithm_type",
            "solver_order",
            "solver_type",
            "lower_order_final",
            "euler_at_final",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
            "lambda_min_clipped",
            "variance_type",
        ])?;
        common::reject_flags(
            name,
            &[
                ("thresholding", config.thresholding),
                ("use_flow_sigmas", config.use_flow_sigmas),
                ("use_dynamic_shifting", config.use_dynamic_shifting),
            ],
        )?;
        let unsupported = |what: String| {
            Err(SchedulerError::InvalidConfig(format!(
                "{what} is not supported by the {name} scheduler"
            )))
        };
        if config.algorithm_type != AlgorithmType::DpmSolverPlusPlus {
            return unsupported(format!(
                "`algorithm_type` = {:?} (only `dpmsolver++`)",
                config.algorithm_type
            ));
        }
        if !(1..=2).contains(&config.solver_order) {
            return unsupported(format!(
                "`solver_order` = {} (only 1 and 2)",
                config.solver_order
            ));
        }
        // DPM-Solver reads only the learned variance types (and would then cut the model output
        // to 3 channels); the fixed ones of a DDPM config are ignored, as in diffusers.
        if matches!(
            config.variance_type,
            Some(VarianceType::Learned | VarianceType::LearnedRange)
        ) {
            return unsupported("a learned `variance_type`".into());
        }
        if config.use_exponential_sigmas || config.use_beta_sigmas {
            return unsupported("`use_exponential_sigmas` / `use_beta_sigmas`".into());
        }
        if [config.use_karras_sigmas, config.use_lu_lambdas]
            .iter()
            .filter(|x| **x)
            .count()
            > 1
        {
            return Err(SchedulerError::InvalidConfig(
                "only one of `use_karras_sigmas` and `use_lu_lambdas` can be used".into(),
            ));
        }
        common::check_num_inference_steps(config, num_inference_steps)?;
        let n = num_inference_steps;
        let big_n = config.num_train_timesteps;
        let mut alphas_cumprod = common::alphas_cumprod(config)?;
        if config.rescale_betas_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }

        // last_timestep: N minus the number of training lambdas below lambda_min_clipped
        // (searchsorted on the ascending, i.e. flipped, lambda table).
        let clipped = alphas_cumprod
            .iter()
            .filter(|&&a| {
                let (alpha, sigma) = (a.sqrt(), (1.0 - a).sqrt());
                (lambda_of(alpha, sigma) as f64) < config.lambda_min_clipped
            })
            .count();
        let last_timestep = big_n - clipped;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let mut timesteps: Vec<f64> =
            common::multistep_timesteps(spacing, big_n, last_timestep, n, config.steps_offset)
                .into_iter()
                .map(|t| t as f64)
                .collect();

        let train_sigmas = common::training_sigmas(&alphas_cumprod);
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
        // Timesteps derived from sigmas are rounded, except for the cosine schedule, whose
        // float timesteps are then truncated by the cast to int64.
        let to_int = |t: f64| {
            if config.beta_schedule == BetaSchedule::SquaredCosCapV2 {
                t.trunc()
            } else {
                t.round_ties_even()
            }
        };
        let mut sigmas: Vec<f64> = if config.use_karras_sigmas {
            let sigma_min = config
                .sigma_min
                .unwrap_or_else(|| train_sigmas.first().copied().unwrap_or(0.0) as f64);
            let sigma_max = config
                .sigma_max
                .unwrap_or_else(|| train_sigmas.last().copied().unwrap_or(0.0) as f64);
            let s = common::karras_sigmas(sigma_min, sigma_max, n);
            timesteps = s
                .iter()
                .map(|&x| to_int(common::sigma_to_t(x, &log_sigmas)))
                .collect();
            s
        } else if config.use_lu_lambdas {
            // diffusers' `_convert_to_lu` on the flipped log-sigma table: log sigmas evenly
            // spaced from the largest training one down to the smallest.
            let lambda_min = *log_sigmas.first().unwrap_or(&0.0) as f64;
            let lambda_max = *log_sigmas.last().unwrap_or(&0.0) as f64;
            let s: Vec<f64> = common::np_linspace(0.0, 1.0, n)
                .into_iter()
                .map(|ramp| (lambda_max + ramp * (lambda_min - lambda_max)).exp())
                .collect();
            timesteps = s
                .iter()
                .map(|&x| to_int(common::sigma_to_t(x, &log_sigmas)))
                .collect();
            s
        } else {
            common::interp_sigmas(&timesteps, &train_sigmas)
        };
        let final_sigma_zero = config.final_sigmas_type == FinalSigmasType::Zero;
        let sigma_last = if final_sigma_zero {
            0.0
        } else {
            train_sigmas.first().copied().unwrap_or(0.0) as f64
        };
        sigmas.push(sigma_last);
        let solver_type = config.solver_type.unwrap_or(SolverType::Midpoint);
        Ok(Self {
            name,
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction_type: config.prediction_type,
            solver_order: config.solver_order,
            heun: solver_type == SolverType::Heun,
            lower_order_final: config.lower_order_final,
            euler_at_final: config.euler_at_final,
            final_sigma_zero,
            model_outputs: vec![None; config.solver_order],
            lower_order_nums: 0,
        })
    }

    /// The sigma schedule (float32): one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `(alpha_t, sigma_t, lambda_t)` of schedule entry `i`, float32.
    fn coefficients(&self, i: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = alpha_sigma_t(self.sigmas[i]);
        (alpha, sigma, lambda_of(alpha, sigma))
    }

    /// `convert_model_output`: the x0 prediction (dpmsolver++), float32.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let sigma = *self
            .sigmas
            .get(step_index)
            .ok_or_else(|| common::step_out_of_range(step_index, self.timesteps.len()))?;
        let (alpha_t, sigma_t) = alpha_sigma_t(sigma);
        common::x0_alpha(self.prediction_type, model_output, sample, alpha_t, sigma_t)
    }

    fn first_order_update(
        &self,
        x0: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = self.coefficients(step_index + 1);
        let (_, sigma_s, lambda_s) = self.coefficients(step_index);
        let h = lambda_t - lambda_s;
        let a = sigma_t / sigma_s;
        let b = alpha_t * ((-h).exp() - 1.0);
        Ok((mul_scalar(sample, a)? - mul_scalar(x0, b)?)?)
    }

    fn second_order_update(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (Some(Some(m1)), Some(Some(m0))) = (
            self.model_outputs.get(self.solver_order - 2),
            self.model_outputs.last(),
        ) else {
            return Err(SchedulerError::InvalidConfig(
                "second-order DPM-Solver step without a previous model output".into(),
            ));
        };
        let (alpha_t, sigma_t, lambda_t) = self.coefficients(step_index + 1);
        let (_, sigma_s0, lambda_s0) = self.coefficients(step_index);
        let (_, _, lambda_s1) = self.coefficients(step_index - 1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = mul_scalar(&(m0 - m1)?, 1.0 / r0)?;
        let exp_m1 = (-h).exp() - 1.0;
        let x = (mul_scalar(sample, sigma_t / sigma_s0)? - mul_scalar(m0, alpha_t * exp_m1)?)?;
        Ok(if self.heun {
            (x + mul_scalar(&d1, alpha_t * (exp_m1 / h + 1.0))?)?
        } else {
            (x - mul_scalar(&d1, 0.5 * (alpha_t * exp_m1))?)?
        })
    }
}

impl super::Scheduler for DpmSolverMultistepScheduler {
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn name(&self) -> &'static str {
        self.name
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
        let x0 = self.convert_model_output(&to_f32(model_output)?, &to_f32(sample)?, step_index)?;
        Ok(x0.to_dtype(sample.dtype())?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let len = self.timesteps.len();
        if step_index >= len || step_index + 1 >= self.sigmas.len() {
            return Err(common::step_out_of_range(step_index, len));
        }
        let out_dtype = model_output.dtype();
        let lower_order_final = step_index == len - 1
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || self.final_sigma_zero);

        let sample = to_f32(sample)?;
        let x0 = self.convert_model_output(&to_f32(model_output)?, &sample, step_index)?;
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(x0.clone());
        }

        let prev_sample = if self.solver_order == 1
            || self.lower_order_nums < 1
            || lower_order_final
            || step_index == 0
        {
            self.first_order_update(&x0, &sample, step_index)?
        } else {
            // solver_order 2 (diffusers' `lower_order_second` only matters for order 3).
            self.second_order_update(&sample, step_index)?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev_sample.to_dtype(out_dtype)?)
    }
}
