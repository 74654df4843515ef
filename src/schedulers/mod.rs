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
pub mod info;
pub mod lcm;
pub mod pndm;
pub mod unipc;

pub use config::SchedulerConfig;
pub use info::{effective_config, scheduler_infos, SchedulerInfo};

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
    /// diffusers' `sigmas` for samplers that keep them (one per timestep, then the final one);
    /// `None` for those that step in alpha space (their sigmas come from `alphas_cumprod`).
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    /// The sampler's own estimate of the clean sample x0 from `model_output` at `step_index`
    /// (diffusers' `pred_original_sample`; LCM's `denoised`; the multistep solvers'
    /// `convert_model_output`; PNDM, which reports none, by the alpha-space formula). It reads
    /// no state a step changes, so it may be asked before [`Scheduler::step`].
    fn pred_original_sample(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor>;
    /// diffusers' `step(model_output, timesteps[step_index], sample).prev_sample`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

/// Each step's noise level σ = sqrt((1 - ᾱ_t) / ᾱ_t): the sampler's own `sigmas` where it keeps
/// them, else from the `alphas_cumprod` of `config` (the config the sampler was built from) at
/// each timestep.
pub fn step_sigmas(s: &dyn Scheduler, config: &SchedulerConfig) -> Result<Vec<f64>> {
    let n = s.timesteps().len();
    if let Some(sig) = s.sigmas() {
        return Ok(sig.iter().take(n).map(|&x| x as f64).collect());
    }
    let ac = common::alphas_cumprod(config)?;
    s.timesteps()
        .iter()
        .map(|&t| {
            let a = common::alpha_cumprod_at(&ac, t.round() as i64)? as f64;
            Ok(((1.0 - a) / a).sqrt())
        })
        .collect()
}

/// A value a registry entry forces or defaults: a JSON scalar known at compile time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Setting {
    /// A JSON boolean.
    Bool(bool),
    /// A JSON non-negative integer.
    Int(u64),
    /// A JSON string.
    Str(&'static str),
}

impl Setting {
    /// The setting as JSON.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            Setting::Bool(b) => b.into(),
            Setting::Int(n) => n.into(),
            Setting::Str(s) => s.into(),
        }
    }
}

/// One scheduler name a request may ask for: the diffusers class it builds, the settings it
/// forces on the model's config, and what ListModels reports about that class.
#[derive(Debug)]
pub struct SchedulerEntry {
    /// The ListModels name, e.g. `dpmpp_2m_karras`.
    pub name: &'static str,
    /// The diffusers class it builds, e.g. `DPMSolverMultistepScheduler`.
    pub class: &'static str,
    /// The overrides passed to diffusers' `from_config(model_config, **overrides)`.
    pub overrides: &'static [(&'static str, Setting)],
    /// The config keys this class's `__init__` takes that change its result (diffusers' names).
    pub keys: &'static [&'static str],
    /// The class's own default for each key our config leaves unset (`None`) when absent;
    /// a key not listed here has one default for every class, or none (JSON null).
    pub class_defaults: &'static [(&'static str, Setting)],
}

/// The config keys every class reads (diffusers' names); each entry's `keys` adds its own.
pub const COMMON_KEYS: &[&str] = &[
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
];

const DPM_KEYS: &[&str] = &[
    "solver_order",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "algorithm_type",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "final_sigmas_type",
    "lambda_min_clipped",
    "variance_type",
    "rescale_betas_zero_snr",
    "use_dynamic_shifting",
    // Not in the signature, but read from the config when present (Karras sigmas).
    "sigma_min",
    "sigma_max",
];

const DPM_DEFAULTS: &[(&str, Setting)] = &[
    ("timestep_spacing", Setting::Str("linspace")),
    ("solver_type", Setting::Str("midpoint")),
];

/// Every scheduler name a request may ask for, in ListModels order. The first entry of a class
/// is the one a model shipping that class gets by default ([`name_for_class`]).
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
pub const REGISTRY: &[SchedulerEntry] = &[
    SchedulerEntry {
        name: "ddim",
        class: "DDIMScheduler",
        overrides: &[],
        keys: &[
            "clip_sample",
            "set_alpha_to_one",
            "thresholding",
            "dynamic_thresholding_ratio",
            "clip_sample_range",
            "sample_max_value",
            "rescale_betas_zero_snr",
        ],
        class_defaults: &[
            ("timestep_spacing", Setting::Str("leading")),
            ("clip_sample", Setting::Bool(true)),
            ("set_alpha_to_one", Setting::Bool(true)),
        ],
    },
    SchedulerEntry {
        name: "euler",
        class: "EulerDiscreteScheduler",
        overrides: &[],
        keys: &[
            "interpolation_type",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "sigma_min",
            "sigma_max",
            "timestep_type",
            "rescale_betas_zero_snr",
            "final_sigmas_type",
        ],
        class_defaults: &[("timestep_spacing", Setting::Str("linspace"))],
    },
    SchedulerEntry {
        name: "euler_a",
        class: "EulerAncestralDiscreteScheduler",
        overrides: &[],
        keys: &["rescale_betas_zero_snr"],
        class_defaults: &[("timestep_spacing", Setting::Str("linspace"))],
    },
    SchedulerEntry {
        name: "dpmpp_2m",
        class: "DPMSolverMultistepScheduler",
        overrides: &[
            ("algorithm_type", Setting::Str("dpmsolver++")),
            ("solver_order", Setting::Int(2)),
        ],
        keys: DPM_KEYS,
        class_defaults: DPM_DEFAULTS,
    },
    SchedulerEntry {
        name: "dpmpp_2m_karras",
        class: "DPMSolverMultistepScheduler",
        overrides: &[
            ("algorithm_type", Setting::Str("dpmsolver++")),
            ("solver_order", Setting::Int(2)),
            ("use_karras_sigmas", Setting::Bool(true)),
        ],
        keys: DPM_KEYS,
        class_defaults: DPM_DEFAULTS,
    },
    SchedulerEntry {
        name: "pndm",
        class: "PNDMScheduler",
        overrides: &[("skip_prk_steps", Setting::Bool(true))],
        keys: &["skip_prk_steps", "set_alpha_to_one"],
        class_defaults: &[
            ("timestep_spacing", Setting::Str("leading")),
            ("set_alpha_to_one", Setting::Bool(false)),
        ],
    },
    SchedulerEntry {
        name: "lcm",
        class: "LCMScheduler",
        overrides: &[],
        keys: &[
            "original_inference_steps",
            "clip_sample",
            "clip_sample_range",
            "set_alpha_to_one",
            "thresholding",
            "dynamic_thresholding_ratio",
            "sample_max_value",
            "timestep_scaling",
            "rescale_betas_zero_snr",
        ],
        class_defaults: &[
            ("timestep_spacing", Setting::Str("leading")),
            ("clip_sample", Setting::Bool(false)),
            ("set_alpha_to_one", Setting::Bool(true)),
        ],
    },
    SchedulerEntry {
        name: "unipc",
        class: "UniPCMultistepScheduler",
        overrides: &[],
        keys: &[
            "solver_order",
            "thresholding",
            "dynamic_thresholding_ratio",
            "sample_max_value",
            "predict_x0",
            "solver_type",
            "lower_order_final",
            "disable_corrector",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_flow_sigmas",
            "final_sigmas_type",
            "rescale_betas_zero_snr",
            "use_dynamic_shifting",
            "sigma_min",
            "sigma_max",
        ],
        class_defaults: &[
            ("timestep_spacing", Setting::Str("linspace")),
            ("solver_type", Setting::Str("bh2")),
        ],
    },
    SchedulerEntry {
        name: "ddpm",
        class: "DDPMScheduler",
        overrides: &[],
        keys: &[
            "variance_type",
            "clip_sample",
            "thresholding",
            "dynamic_thresholding_ratio",
            "clip_sample_range",
            "sample_max_value",
            "rescale_betas_zero_snr",
        ],
        class_defaults: &[
            ("timestep_spacing", Setting::Str("leading")),
            ("clip_sample", Setting::Bool(true)),
            ("variance_type", Setting::Str("fixed_small")),
        ],
    },
];

const NAMES: [&str; REGISTRY.len()] = {
    let mut out = [""; REGISTRY.len()];
    let mut i = 0;
    while i < REGISTRY.len() {
        out[i] = REGISTRY[i].name;
        i += 1;
    }
    out
};

/// The scheduler names a request may ask for: the names of [`REGISTRY`], in its order.
pub const SCHEDULER_NAMES: &[&str] = &NAMES;

/// The registry entry of scheduler `name`.
pub fn entry(name: &str) -> Option<&'static SchedulerEntry> {
    REGISTRY.iter().find(|e| e.name == name)
}

/// The name for a diffusers scheduler class name (`DDIMScheduler` -> `ddim`), if we implement it:
/// the class's first registry entry. A model that ships DPMSolverMultistepScheduler gets
/// `dpmpp_2m`, which keeps the model's own sigma settings (Karras sigmas included) and forces
/// only the 2M++ algorithm and order.
pub fn name_for_class(class_name: &str) -> Option<&'static str> {
    REGISTRY
        .iter()
        .find(|e| e.class == class_name)
        .map(|e| e.name)
}

/// The diffusers class a name builds and the overrides it passes to `from_config`, as JSON.
pub fn class_and_overrides(name: &str) -> Option<(&'static str, serde_json::Value)> {
    let e = entry(name)?;
    let overrides = e
        .overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_json()))
        .collect::<serde_json::Map<_, _>>();
    Some((e.class, serde_json::Value::Object(overrides)))
}

/// Sets the typed field behind override `key` of a registry entry; false for a key this
/// function does not know (a registry mistake, caught by the unit tests).
fn set_override(c: &mut SchedulerConfig, key: &str, value: Setting) -> bool {
    use config::ALGORITHM_TYPES;
    match (key, value) {
        ("algorithm_type", Setting::Str(s)) => {
            match ALGORITHM_TYPES.iter().find(|(n, _)| *n == s) {
                Some((_, t)) => c.algorithm_type = *t,
                None => return false,
            }
        }
        ("solver_order", Setting::Int(n)) => c.solver_order = n as usize,
        ("use_karras_sigmas", Setting::Bool(b)) => c.use_karras_sigmas = b,
        ("skip_prk_steps", Setting::Bool(b)) => c.skip_prk_steps = b,
        _ => return false,
    }
    true
}

/// `config` with the overrides of scheduler `name` applied (what `build` builds from). The
/// overrides are set on the typed fields (not re-parsed from `raw`), so that adjustments made to
/// a loaded config (diffusers' legacy fix-ups) survive; `raw` records them too.
pub fn config_for_name(name: &str, config: &SchedulerConfig) -> SchedulerConfig {
    let mut c = config.clone();
    let Some(e) = entry(name) else {
        return c;
    };
    for (k, v) in e.overrides {
        let known = set_override(&mut c, k, *v);
        debug_assert!(known, "registry override `{k}` has no typed field");
    }
    c.class_name = e.class.to_string();
    if let serde_json::Value::Object(raw) = &mut c.raw {
        raw.insert("_class_name".into(), e.class.into());
        // An overridden key's unreadable model value no longer matters.
        c.deferred_errors
            .retain(|(k, _)| !e.overrides.iter().any(|(o, _)| o == k));
        for (k, v) in e.overrides {
            raw.insert(k.to_string(), v.to_json());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_registry_in_order() {
        let names: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
        assert_eq!(SCHEDULER_NAMES, names.as_slice());
        for (i, n) in names.iter().enumerate() {
            assert!(!names[..i].contains(n), "`{n}` listed twice");
        }
    }

    #[test]
    fn a_class_maps_to_its_first_entry() {
        for (class, name) in [
            ("DDIMScheduler", "ddim"),
            ("EulerDiscreteScheduler", "euler"),
            ("EulerAncestralDiscreteScheduler", "euler_a"),
            ("DPMSolverMultistepScheduler", "dpmpp_2m"),
            ("PNDMScheduler", "pndm"),
            ("LCMScheduler", "lcm"),
            ("UniPCMultistepScheduler", "unipc"),
            ("DDPMScheduler", "ddpm"),
        ] {
            assert_eq!(name_for_class(class), Some(name));
        }
        assert_eq!(name_for_class("HeunDiscreteScheduler"), None);
    }

    #[test]
    fn every_override_reaches_its_typed_field_and_the_raw_config() {
        for e in REGISTRY {
            for (key, value) in e.overrides {
                let mut c = SchedulerConfig::default();
                assert!(set_override(&mut c, key, *value), "{}: `{key}`", e.name);
            }
            let (class, over) = class_and_overrides(e.name).unwrap();
            assert_eq!(class, e.class);
            let c = config_for_name(e.name, &SchedulerConfig::default());
            assert_eq!(c.class_name, e.class);
            for (k, v) in over.as_object().unwrap() {
                assert_eq!(&c.raw[k], v, "{}: raw `{k}`", e.name);
            }
        }
        let c = config_for_name("dpmpp_2m_karras", &SchedulerConfig::default());
        assert!(c.use_karras_sigmas);
        assert_eq!(c.solver_order, 2);
        assert_eq!(c.algorithm_type, config::AlgorithmType::DpmSolverPlusPlus);
        assert!(config_for_name("pndm", &SchedulerConfig::default()).skip_prk_steps);
        assert!(class_and_overrides("no_such").is_none());
    }
}
