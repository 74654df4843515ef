//! Diffusion schedulers (samplers) behind one trait: pure tensor math, no I/O, no knowledge of
//! pipelines. Built from a diffusers `scheduler_config.json` plus per-name overrides, the way
//! diffusers' `from_config` does.

use candle_core::Tensor;

use crate::rng::NoiseSource;

pub mod common;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod lcm;
pub mod pndm;
pub mod unipc;

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
    /// diffusers' `init_noise_sigma`: the factor the initial latents are multiplied by
    /// (1 unless the sampler works in sigma space).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers' `scale_model_input` for the given step (the identity unless the sampler works
    /// in sigma space); an out-of-range step is an error.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let n = self.timesteps().len();
        if step_index >= n {
            return Err(common::step_out_of_range(step_index, n));
        }
        Ok(sample.clone())
    }
    /// diffusers' `step(model_output, timesteps[step_index], sample).prev_sample`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

/// The scheduler names a request may ask for, each a diffusers class plus settings:
///
/// | name | diffusers class and settings |
/// |---|---|
/// | `ddim` | DDIMScheduler |
/// | `euler` | EulerDiscreteScheduler |
/// | `euler_a` | EulerAncestralDiscreteScheduler |
/// | `dpmpp_2m` | DPMSolverMultistepScheduler, algorithm_type dpmsolver++, solver_order 2 |
/// | `dpmpp_2m_karras` | the same with use_karras_sigmas |
/// | `pndm` | PNDMScheduler with skip_prk_steps |
/// | `lcm` | LCMScheduler |
/// | `unipc` | UniPCMultistepScheduler |
/// | `ddpm` | DDPMScheduler |
pub const SCHEDULER_NAMES: &[&str] = &[
    "ddim",
    "euler",
    "euler_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "pndm",
    "lcm",
    "unipc",
    "ddpm",
];

/// The name for a diffusers scheduler class name (`DDIMScheduler` -> `ddim`), if we implement it.
/// A model that ships DPMSolverMultistepScheduler gets `dpmpp_2m`, which keeps the model's own
/// sigma settings (Karras sigmas included) and forces only the 2M++ algorithm and order.
pub fn name_for_class(class_name: &str) -> Option<&'static str> {
    match class_name {
        "DDIMScheduler" => Some("ddim"),
        "EulerDiscreteScheduler" => Some("euler"),
        "EulerAncestralDiscreteScheduler" => Some("euler_a"),
        "DPMSolverMultistepScheduler" => Some("dpmpp_2m"),
        "PNDMScheduler" => Some("pndm"),
        "LCMScheduler" => Some("lcm"),
        "UniPCMultistepScheduler" => Some("unipc"),
        "DDPMScheduler" => Some("ddpm"),
        _ => None,
    }
}

/// The diffusers class a name builds and the overrides it passes to `from_config`, as JSON.
pub fn class_and_overrides(name: &str) -> Option<(&'static str, serde_json::Value)> {
    use serde_json::json;
    Some(match name {
        "ddim" => ("DDIMScheduler", json!({})),
        "euler" => ("EulerDiscreteScheduler", json!({})),
        "euler_a" => ("EulerAncestralDiscreteScheduler", json!({})),
        "dpmpp_2m" => (
            "DPMSolverMultistepScheduler",
            json!({"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ),
        "dpmpp_2m_karras" => (
            "DPMSolverMultistepScheduler",
            json!({"algorithm_type": "dpmsolver++", "solver_order": 2,
                   "use_karras_sigmas": true}),
        ),
        "pndm" => ("PNDMScheduler", json!({"skip_prk_steps": true})),
        "lcm" => ("LCMScheduler", json!({})),
        "unipc" => ("UniPCMultistepScheduler", json!({})),
        "ddpm" => ("DDPMScheduler", json!({})),
        _ => return None,
    })
}

/// `config` with the overrides of scheduler `name` applied (what `build` builds from). The
/// overrides are set on the typed fields (not re-parsed from `raw`), so that adjustments made to
/// a loaded config (diffusers' legacy fix-ups) survive; `raw` records them too.
pub fn config_for_name(name: &str, config: &SchedulerConfig) -> SchedulerConfig {
    let mut c = config.clone();
    let Some((class, overrides)) = class_and_overrides(name) else {
        return c;
    };
    match name {
        "dpmpp_2m" | "dpmpp_2m_karras" => {
            c.algorithm_type = config::AlgorithmType::DpmSolverPlusPlus;
            c.solver_order = 2;
            if name == "dpmpp_2m_karras" {
                c.use_karras_sigmas = true;
            }
        }
        "pndm" => c.skip_prk_steps = true,
        _ => {}
    }
    c.class_name = class.to_string();
    if let (serde_json::Value::Object(raw), serde_json::Value::Object(over)) =
        (&mut c.raw, overrides)
    {
        raw.insert("_class_name".into(), class.into());
        // An overridden key's unreadable model value no longer matters.
        c.deferred_errors.retain(|(k, _)| !over.contains_key(k));
        for (k, v) in over {
            raw.insert(k, v);
        }
    }
    c
}

/// Builds scheduler `name` ("" = the config's own class) from `config`, set up for
/// `num_inference_steps`: like diffusers' `<Class>.from_config(config, **overrides)` followed
/// by `set_timesteps(num_inference_steps)`.
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
    let n = num_inference_steps;
    let c = config_for_name(resolved, config);
    Ok(match resolved {
        "ddim" => Box::new(ddim::DdimScheduler::new(&c, n, options)?),
        "euler" => Box::new(euler::EulerDiscreteScheduler::new(&c, n)?),
        "euler_a" => Box::new(euler_ancestral::EulerAncestralScheduler::new(&c, n)?),
        "dpmpp_2m" => Box::new(dpm_solver::DpmSolverMultistepScheduler::new(
            "dpmpp_2m", &c, n,
        )?),
        "dpmpp_2m_karras" => Box::new(dpm_solver::DpmSolverMultistepScheduler::new(
            "dpmpp_2m_karras",
            &c,
            n,
        )?),
        "pndm" => Box::new(pndm::PndmScheduler::new(&c, n)?),
        "lcm" => Box::new(lcm::LcmScheduler::new(&c, n)?),
        "unipc" => Box::new(unipc::UniPcScheduler::new(&c, n)?),
        "ddpm" => Box::new(ddpm::DdpmScheduler::new(&c, n)?),
        other => {
            return Err(SchedulerError::UnknownName {
                name: other.to_string(),
                valid: SCHEDULER_NAMES.to_vec(),
            })
        }
    })
}
