//! Diffusion schedulers (samplers) behind one trait: pure tensor math, no I/O, no knowledge of
//! pipelines. Built from a diffusers `scheduler_config.json` plus per-name overrides, the way
//! diffusers' `from_config` does.

use candle_core::Tensor;

use crate::rng::NoiseSource;

pub mod common;
pub mod config;
pub mod ddim;
pub mod euler;

pub use config::SchedulerConfig;

/// Errors from building or stepping a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The requested scheduler name is not one we implement.
    #[error("unknown scheduler `{name}`; valid names: {}", valid.join(", "))]
    UnknownName {
        /// The name asked for.
        name: String,
        /// The names that exist.
        valid: Vec<&'static str>,
    },
    /// The config (or a request option) asks for something out of range or unsupported.
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for scheduler code.
pub type Result<T> = std::result::Result<T, SchedulerError>;

/// Options a request may set that affect stepping.
#[derive(Clone, Debug, Default)]
pub struct SchedulerOptions {
    /// DDIM's eta (0: deterministic DDIM). Ignored by samplers without it.
    pub eta: f64,
}

/// One sampler instance, set up for a fixed number of inference steps.
pub trait Scheduler: Send {
    /// The ListModels name of this scheduler (e.g. `ddim`).
    fn name(&self) -> &'static str;
    /// The timesteps, in loop order, exactly as diffusers' `scheduler.timesteps` holds them.
    fn timesteps(&self) -> &[f64];
    /// diffusers' `init_noise_sigma`: the factor the initial latents are multiplied by.
    fn init_noise_sigma(&self) -> f64;
    /// diffusers' `scale_model_input` for the given step.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;
    /// diffusers' `step(model_output, timesteps[step_index], sample).prev_sample`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

/// The scheduler names a request may ask for.
pub const SCHEDULER_NAMES: &[&str] = &["ddim", "euler"];

/// The name for a diffusers scheduler class name (`DDIMScheduler` -> `ddim`), if we implement it.
pub fn name_for_class(class_name: &str) -> Option<&'static str> {
    match class_name {
        "DDIMScheduler" => Some("ddim"),
        "EulerDiscreteScheduler" => Some("euler"),
        _ => None,
    }
}

/// Builds scheduler `name` ("" = the config's own class) from `config`, set up for `num_inference_steps`.
pub fn build(
    name: &str,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    options: &SchedulerOptions,
) -> Result<Box<dyn Scheduler>> {
    let resolved = if name.is_empty() {
        name_for_class(&config.class_name).ok_or_else(|| SchedulerError::UnknownName {
            name: config.class_name.clone(),
            valid: SCHEDULER_NAMES.to_vec(),
        })?
    } else {
        name
    };
    if num_inference_steps == 0 {
        return Err(SchedulerError::InvalidConfig(
            "num_inference_steps must be at least 1".into(),
        ));
    }
    match resolved {
        "ddim" => Ok(Box::new(ddim::DdimScheduler::new(
            config,
            num_inference_steps,
            options,
        )?)),
        "euler" => Ok(Box::new(euler::EulerDiscreteScheduler::new(
            config,
            num_inference_steps,
        )?)),
        other => Err(SchedulerError::UnknownName {
            name: other.to_string(),
            valid: SCHEDULER_NAMES.to_vec(),
        }),
    }
}
