//! PNDM with `skip_prk_steps` (diffusers' PNDMScheduler as Stable Diffusion 1.x ships it): the
//! pseudo linear multistep (PLMS) steps only, float32 like diffusers.
//!
//! With `skip_prk_steps` the schedule has `n + 1` timesteps: the second one repeats the first
//! step's target timestep, and the first two steps together form one Heun-like step
//! (`counter` 0 and 1 below). The solver keeps the model outputs of previous steps (`ets`); a
//! callback that replaces the latents does not reset them, as in diffusers. Note that step 1
//! restarts from the sample step 0 started from, so a replacement of the latents after step 0
//! has no effect, exactly as in diffusers.

use candle_core::Tensor;

use super::common::{self, div_scalar, mul_scalar, to_f32};
use super::config::{PredictionType, TimestepSpacing};
use super::{Result, SchedulerConfig, SchedulerError};
use crate::rng::NoiseSource;

/// diffusers' PNDMScheduler (PLMS only), set up for a fixed number of inference steps.
#[derive(Clone, Debug)]
pub struct PndmScheduler {
    timesteps: Vec<f64>,
    int_timesteps: Vec<i64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: i64,
    prediction_type: PredictionType,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    /// Builds the scheduler from `config` and runs diffusers' `set_timesteps(num_inference_steps)`.
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.check_keys(&["skip_prk_steps"])?;
        if !config.skip_prk_steps {
            return Err(SchedulerError::InvalidConfig(
                "`skip_prk_steps` = false (Runge-Kutta warm-up steps) is not supported by the \
                 pndm scheduler"
                    .into(),
            ));
        }
        if config.prediction_type == PredictionType::Sample {
            return Err(SchedulerError::InvalidConfig(
                "`prediction_type` = `sample` is not supported by the pndm scheduler (diffusers: \
                 epsilon or v_prediction)"
                    .into(),
            ));
        }
        common::check_num_inference_steps(config, num_inference_steps)?;
        let n = num_inference_steps;
        let big_n = config.num_train_timesteps;
        let alphas_cumprod = common::alphas_cumprod(config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        // `_timesteps` ascending, int64.
        let mut base: Vec<i64> = common::spaced_timesteps(spacing, big_n, n, config.steps_offset)
            .into_iter()
            .map(|t| t.round_ties_even() as i64)
            .collect();
        base.reverse();
        // plms_timesteps = concat(_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:])[::-1]
        let mut plms: Vec<i64> = Vec::with_capacity(base.len() + 1);
        if let Some((last, rest)) = base.split_last() {
            plms.extend_from_slice(rest);
            plms.extend(rest.last());
            plms.push(*last);
        }
        plms.reverse();
        let this = Self {
            timesteps: plms.iter().map(|&t| t as f64).collect(),
            int_timesteps: plms,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (big_n / n) as i64,
            prediction_type: config.prediction_type,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
        };
        for &t in &this.int_timesteps {
            common::alpha_cumprod_at(&this.alphas_cumprod, t)?;
        }
        Ok(this)
    }

    /// `_get_prev_sample`: from `sample` at `timestep` to `prev_timestep` with the combined
    /// noise prediction `model_output`.
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha_prod_t = common::alpha_cumprod_at(&self.alphas_cumprod, timestep)?;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            common::alpha_cumprod_at(&self.alphas_cumprod, prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let model_output = match self.prediction_type {
            PredictionType::VPrediction => {
                (mul_scalar(model_output, alpha_prod_t.sqrt())?
                    + mul_scalar(sample, beta_prod_t.sqrt())?)?
            }
            _ => model_output.clone(),
        };
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        let scaled = div_scalar(
            &mul_scalar(&model_output, alpha_prod_t_prev - alpha_prod_t)?,
            denom,
        )?;
        Ok((mul_scalar(sample, sample_coeff)? - scaled)?)
    }
}

impl super::Scheduler for PndmScheduler {
    fn name(&self) -> &'static str {
        "pndm"
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// PNDM reports no x0; this is the alpha-space formula at the step's own timestep.
    fn pred_original_sample(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let timestep = *self
            .int_timesteps
            .get(step_index)
            .ok_or_else(|| common::step_out_of_range(step_index, self.int_timesteps.len()))?;
        let a = common::alpha_cumprod_at(&self.alphas_cumprod, timestep)?;
        let x0 = common::x0_alpha(
            self.prediction_type,
            &to_f32(model_output)?,
            &to_f32(sample)?,
            a.sqrt(),
            (1.0 - a).sqrt(),
        )?;
        Ok(x0.to_dtype(sample.dtype())?)
    }

    /// diffusers' `step_plms`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let mut timestep = *self
            .int_timesteps
            .get(step_index)
            .ok_or_else(|| common::step_out_of_range(step_index, self.int_timesteps.len()))?;
        let out_dtype = sample.dtype();
        let model_output = to_f32(model_output)?;
        let mut sample = to_f32(sample)?;

        let mut prev_timestep = timestep - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += self.step_ratio;
        }

        let e = &self.ets;
        let k = e.len();
        let combined = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output
        } else if k == 1 && self.counter == 1 {
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            div_scalar(&(&model_output + &e[0])?, 2.0)?
        } else if k == 2 {
            div_scalar(&(mul_scalar(&e[1], 3.0)? - &e[0])?, 2.0)?
        } else if k == 3 {
            let x =
                ((mul_scalar(&e[2], 23.0)? - mul_scalar(&e[1], 16.0)?)? + mul_scalar(&e[0], 5.0)?)?;
            div_scalar(&x, 12.0)?
        } else if k >= 4 {
            let x = (((mul_scalar(&e[k - 1], 55.0)? - mul_scalar(&e[k - 2], 59.0)?)?
                + mul_scalar(&e[k - 3], 37.0)?)?
                - mul_scalar(&e[k - 4], 9.0)?)?;
            mul_scalar(&x, (1.0f64 / 24.0) as f32)?
        } else {
            return Err(SchedulerError::InvalidConfig(
                "PNDM step out of sequence: it must start at step 0".into(),
            ));
        };
        let prev_sample = self.prev_sample(&sample, timestep, prev_timestep, &combined)?;
        self.counter += 1;
        Ok(prev_sample.to_dtype(out_dtype)?)
    }
}
