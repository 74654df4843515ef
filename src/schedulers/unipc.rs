//! UniPC (diffusers' UniPCMultistepScheduler): `set_timesteps` (plain or Karras sigmas) and the
//! multistep predictor (UniP) with its corrector (UniC), bh1 or bh2, any solver order, float32
//! like diffusers.
//!
//! The solver keeps the converted model outputs of previous steps and the sample the last
//! predictor started from; a callback that replaces the latents does not reset them, as in
//! diffusers (the corrector then corrects the replaced latents).

use candle_core::Tensor;

use super::common::{self, alpha_sigma_t, div_scalar, lambda_of, mul_scalar, to_f32};
use super::config::{FinalSigmasType, PredictionType, SolverType, TimestepSpacing};
use super::{Result, SchedulerConfig, SchedulerError};
use crate::rng::NoiseSource;

/// diffusers' UniPCMultistepScheduler, set up for a fixed number of inference steps.
#[derive(Clone, Debug)]
pub struct UniPcScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction_type: PredictionType,
    predict_x0: bool,
    bh2: bool,
    solver_order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// The last `solver_order` converted model outputs, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    /// The sample the previous predictor started from (`last_sample`).
    last_sample: Option<Tensor>,
    /// The order the previous predictor used (`this_order`), which its corrector reuses.
    this_order: usize,
    lower_order_nums: usize,
}

/// One multistep update's coefficients: `hh` (= -h for x0 prediction), `h_phi_1`, `B(h)`, and
/// the R matrix / b vector of the order conditions.
struct Coefficients {
    h_phi_1: f32,
    b_h: f32,
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
}

impl UniPcScheduler {
    /// Builds the scheduler from `config` and runs diffusers' `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.check_keys(&[
            "solver_order",
            "solver_type",
            "lower_order_final",
            "predict_x0",
            "disable_corrector",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ])?;
        common::reject_flags(
            "unipc",
            &[
                ("thresholding", config.thresholding),
                ("use_flow_sigmas", config.use_flow_sigmas),
                ("use_dynamic_shifting", config.use_dynamic_shifting),
            ],
        )?;
        if config.use_exponential_sigmas || config.use_beta_sigmas {
            return Err(SchedulerError::InvalidConfig(
                "`use_exponential_sigmas` / `use_beta_sigmas` are not supported by the unipc \
                 scheduler"
                    .into(),
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
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let mut timesteps: Vec<f64> =
            common::multistep_timesteps(spacing, big_n, big_n, n, config.steps_offset)
                .into_iter()
                .map(|t| t as f64)
                .collect();
        let train_sigmas = common::training_sigmas(&alphas_cumprod);
        let sigma_min_type = config.final_sigmas_type == FinalSigmasType::SigmaMin;
        let mut sigmas: Vec<f64> = if config.use_karras_sigmas {
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let sigma_min = config
                .sigma_min
                .unwrap_or_else(|| train_sigmas.first().copied().unwrap_or(0.0) as f64);
            let sigma_max = config
                .sigma_max
                .unwrap_or_else(|| train_sigmas.last().copied().unwrap_or(0.0) as f64);
            let s = common::karras_sigmas(sigma_min, sigma_max, n);
            timesteps = s
                .iter()
                .map(|&x| common::sigma_to_t(x, &log_sigmas).round_ties_even())
                .collect();
            s
        } else {
            common::interp_sigmas(&timesteps, &train_sigmas)
        };
        let sigma_last = match (sigma_min_type, config.use_karras_sigmas) {
            (false, _) => 0.0,
            (true, true) => sigmas.last().copied().unwrap_or(0.0),
            (true, false) => train_sigmas.first().copied().unwrap_or(0.0) as f64,
        };
        sigmas.push(sigma_last);
        let solver_type = config.solver_type.unwrap_or(SolverType::Bh2);
        Ok(Self {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction_type: config.prediction_type,
            predict_x0: config.predict_x0,
            bh2: solver_type != SolverType::Bh1,
            solver_order: config.solver_order,
            lower_order_final: config.lower_order_final,
            disable_corrector: config.disable_corrector.clone(),
            model_outputs: vec![None; config.solver_order],
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
        })
    }

    /// The sigma schedule (float32): one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn lambda_at(&self, i: usize) -> f32 {
        let (alpha, sigma) = alpha_sigma_t(self.sigmas[i]);
        lambda_of(alpha, sigma)
    }

    /// `convert_model_output`: the x0 prediction (`predict_x0`) or the noise prediction.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[step_index]);
        Ok(match (self.predict_x0, self.prediction_type) {
            (true, pt) => common::x0_alpha(pt, model_output, sample, alpha_t, sigma_t)?,
            (false, PredictionType::Epsilon) => model_output.clone(),
            (false, PredictionType::Sample) => {
                div_scalar(&(sample - mul_scalar(model_output, alpha_t)?)?, sigma_t)?
            }
            (false, PredictionType::VPrediction) => {
                (mul_scalar(model_output, alpha_t)? + mul_scalar(sample, sigma_t)?)?
            }
        })
    }

    /// The stored model output `back` steps ago (0 = the newest), as diffusers'
    /// `model_outputs[-(back + 1)]`.
    fn past_output(&self, back: usize) -> Result<&Tensor> {
        self.model_outputs
            .len()
            .checked_sub(back + 1)
            .and_then(|i| self.model_outputs[i].as_ref())
            .ok_or_else(|| {
                SchedulerError::InvalidConfig(
                    "UniPC step without the model outputs its order needs".into(),
                )
            })
    }

    /// The shared part of `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update`: from
    /// `h` and the `rks`, the coefficients of `order`.
    fn coefficients(&self, h: f32, mut rks: Vec<f32>, order: usize) -> Coefficients {
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i: u64 = 1;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(
                rks.iter()
                    .map(|&x| x.powi(i as i32 - 1))
                    .collect::<Vec<f32>>(),
            );
            b.push(h_phi_k * factorial_i as f32 / b_h);
            factorial_i *= i as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial_i as f64) as f32;
        }
        Coefficients { h_phi_1, b_h, r, b }
    }

    /// `sum_k rhos[k] * d1s[k]`.
    fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (rho, d) in rhos.iter().zip(d1s) {
            let term = mul_scalar(d, *rho)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        Ok(acc)
    }

    fn singular() -> SchedulerError {
        SchedulerError::InvalidConfig("UniPC order conditions are singular".into())
    }

    /// `multistep_uni_p_bh_update`: the predictor from `sample` at step `i`.
    fn predictor(&self, sample: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let m0 = self.past_output(0)?;
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma_t(self.sigmas[i]);
        let lambda_s0 = lambda_of(alpha_s0, sigma_s0);
        let h = lambda_of(alpha_t, sigma_t) - lambda_s0;
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let si = i.checked_sub(k).ok_or_else(Self::singular)?;
            let mi = self.past_output(k)?;
            let rk = (self.lambda_at(si) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div_scalar(&(mi - m0)?, rk)?);
        }
        let c = self.coefficients(h, rks, order);
        let rhos_p: Vec<f32> = if d1s.is_empty() {
            Vec::new()
        } else if order == 2 {
            vec![0.5]
        } else {
            let r: Vec<Vec<f32>> = c.r[..order - 1]
                .iter()
                .map(|row| row[..order - 1].to_vec())
                .collect();
            common::solve_f32(r, c.b[..order - 1].to_vec()).ok_or_else(Self::singular)?
        };
        let pred_res = Self::weighted_sum(&rhos_p, &d1s)?;
        let (x_t_, coeff) = if self.predict_x0 {
            (
                (mul_scalar(sample, sigma_t / sigma_s0)? - mul_scalar(m0, alpha_t * c.h_phi_1)?)?,
                alpha_t * c.b_h,
            )
        } else {
            (
                (mul_scalar(sample, alpha_t / alpha_s0)? - mul_scalar(m0, sigma_t * c.h_phi_1)?)?,
                sigma_t * c.b_h,
            )
        };
        Ok(match pred_res {
            Some(p) => (x_t_ - mul_scalar(&p, coeff)?)?,
            None => x_t_,
        })
    }

    /// `multistep_uni_c_bh_update`: the corrected input of step `i`, from the previous step's
    /// `last_sample` and this step's converted model output `model_t` (the input itself only
    /// went into `model_t`).
    fn corrector(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        i: usize,
        order: usize,
    ) -> Result<Tensor> {
        let m0 = self.past_output(0)?;
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[i]);
        let (alpha_s0, sigma_s0) = alpha_sigma_t(self.sigmas[i - 1]);
        let lambda_s0 = lambda_of(alpha_s0, sigma_s0);
        let h = lambda_of(alpha_t, sigma_t) - lambda_s0;
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let si = i.checked_sub(k + 1).ok_or_else(Self::singular)?;
            let mi = self.past_output(k)?;
            let rk = (self.lambda_at(si) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div_scalar(&(mi - m0)?, rk)?);
        }
        let c = self.coefficients(h, rks, order);
        let rhos_c: Vec<f32> = if order == 1 {
            vec![0.5]
        } else {
            common::solve_f32(c.r.clone(), c.b.clone()).ok_or_else(Self::singular)?
        };
        let (rho_last, rho_rest) = rhos_c.split_last().ok_or_else(Self::singular)?;
        let corr_res = Self::weighted_sum(rho_rest, &d1s)?;
        let d1_t = (model_t - m0)?;
        let (x_t_, coeff) = if self.predict_x0 {
            (
                (mul_scalar(last_sample, sigma_t / sigma_s0)?
                    - mul_scalar(m0, alpha_t * c.h_phi_1)?)?,
                alpha_t * c.b_h,
            )
        } else {
            (
                (mul_scalar(last_sample, alpha_t / alpha_s0)?
                    - mul_scalar(m0, sigma_t * c.h_phi_1)?)?,
                sigma_t * c.b_h,
            )
        };
        let last_term = mul_scalar(&d1_t, *rho_last)?;
        let total = match corr_res {
            Some(r) => (r + last_term)?,
            None => last_term,
        };
        Ok((x_t_ - mul_scalar(&total, coeff)?)?)
    }
}

impl super::Scheduler for UniPcScheduler {
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn name(&self) -> &'static str {
        "unipc"
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The x0 prediction at the step (as `convert_model_output` gives it with `predict_x0`).
    fn pred_original_sample(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let sigma = *self
            .sigmas
            .get(step_index)
            .ok_or_else(|| common::step_out_of_range(step_index, self.timesteps.len()))?;
        let (alpha_t, sigma_t) = alpha_sigma_t(sigma);
        let pt = self.prediction_type;
        let x0 = common::x0_alpha(
            pt,
            &to_f32(model_output)?,
            &to_f32(sample)?,
            alpha_t,
            sigma_t,
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
        let len = self.timesteps.len();
        if step_index >= len || step_index + 1 >= self.sigmas.len() {
            return Err(common::step_out_of_range(step_index, len));
        }
        let i = step_index;
        let out_dtype = sample.dtype();
        let mut sample = to_f32(sample)?;
        let converted = self.convert_model_output(&to_f32(model_output)?, &sample, i)?;
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i - 1));
        if use_corrector {
            if let Some(last) = &self.last_sample {
                sample = self.corrector(&converted, last, i, self.this_order)?;
            }
        }
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(converted);
        }
        let order = if self.lower_order_final {
            self.solver_order.min(len - i)
        } else {
            self.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev_sample = self.predictor(&sample, i, self.this_order)?;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev_sample.to_dtype(out_dtype)?)
    }
}
