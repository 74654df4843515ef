//! diffusers `scheduler_config.json`, parsed with diffusers' defaults.
//!
//! One config serves every scheduler class, the way diffusers' `from_config` lets any compatible
//! class be built from another's config: each class reads only the keys its `__init__` takes.
//! Where the classes disagree on a default (`timestep_spacing`, `clip_sample`,
//! `set_alpha_to_one`), the field is an `Option` and each scheduler applies its own default.
//! Keys listed in `_use_default_values` (diffusers' in-memory record of keys that were absent from
//! the file) are treated as absent, as diffusers' `extract_init_dict` does.

use serde_json::{Map, Value};

use super::{Result, SchedulerError};

/// How betas are laid out over the training timesteps (`beta_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linear`: `torch.linspace(beta_start, beta_end, n)`.
    Linear,
    /// `scaled_linear`: `torch.linspace(beta_start**0.5, beta_end**0.5, n) ** 2` (Stable Diffusion).
    ScaledLinear,
    /// `squaredcos_cap_v2`: the Glide cosine schedule (`betas_for_alpha_bar`, max beta 0.999).
    SquaredCosCapV2,
}

/// What the model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// `epsilon`: the noise.
    Epsilon,
    /// `v_prediction`: v = alpha_t * noise - sigma_t * x0.
    VPrediction,
    /// `sample`: the denoised sample x0 directly.
    Sample,
}

/// How inference timesteps are picked from the training ones (`timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `leading`: `arange(n) * (N // n) + steps_offset`, descending.
    Leading,
    /// `trailing`: `round(arange(N, 0, -N / n)) - 1`.
    Trailing,
    /// `linspace`: `linspace(0, N - 1, n)`, descending.
    Linspace,
}

/// How Euler-type schedulers interpolate sigmas between training timesteps (`interpolation_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterpolationType {
    /// `linear`: `np.interp` of the training sigmas at the inference timesteps.
    Linear,
    /// `log_linear`: sigmas evenly spaced in log space between the extreme training sigmas.
    LogLinear,
}

/// The last sigma of Euler-type schedules (`final_sigmas_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigmasType {
    /// `zero`: the schedule ends at sigma 0.
    Zero,
    /// `sigma_min`: the schedule ends at the smallest training sigma.
    SigmaMin,
}

/// Whether timesteps are the discrete training indices or derived from sigmas (`timestep_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepType {
    /// `discrete`: timesteps are (possibly fractional) training timestep values.
    Discrete,
    /// `continuous`: with v_prediction, timesteps are `0.25 * ln(sigma)`.
    Continuous,
}

/// DPM-Solver's `algorithm_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlgorithmType {
    /// `dpmsolver++` (also what diffusers turns `deis` into): the data-prediction solver.
    DpmSolverPlusPlus,
    /// `sde-dpmsolver++`: the stochastic data-prediction solver.
    SdeDpmSolverPlusPlus,
    /// `dpmsolver`: the noise-prediction solver (deprecated in diffusers).
    DpmSolver,
    /// `sde-dpmsolver`: the stochastic noise-prediction solver (deprecated in diffusers).
    SdeDpmSolver,
}

/// The multistep solvers' `solver_type`. DPM-Solver maps `logrho`, `bh1` and `bh2` to
/// `midpoint`; UniPC maps `midpoint`, `heun` and `logrho` to `bh2` (as diffusers does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    /// `midpoint` (DPM-Solver).
    Midpoint,
    /// `heun` (DPM-Solver).
    Heun,
    /// `logrho` (accepted, remapped by both classes).
    Logrho,
    /// `bh1` (UniPC, B(h) = h).
    Bh1,
    /// `bh2` (UniPC, B(h) = e^h - 1).
    Bh2,
}

/// DDPM's (and DPM-Solver's) `variance_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarianceType {
    /// `fixed_small`: the posterior variance.
    FixedSmall,
    /// `fixed_small_log`: the posterior variance, through its log.
    FixedSmallLog,
    /// `fixed_large`: beta_t.
    FixedLarge,
    /// `fixed_large_log`: log beta_t.
    FixedLargeLog,
    /// `learned`: predicted by the model (twice the channels).
    Learned,
    /// `learned_range`: interpolated by the model (twice the channels).
    LearnedRange,
}

/// The diffusers spellings of [`BetaSchedule`] (the first spelling of a value is its name).
pub const BETA_SCHEDULES: &[(&str, BetaSchedule)] = &[
    ("linear", BetaSchedule::Linear),
    ("scaled_linear", BetaSchedule::ScaledLinear),
    ("squaredcos_cap_v2", BetaSchedule::SquaredCosCapV2),
];

/// The diffusers spellings of [`PredictionType`] (the first spelling of a value is its name).
pub const PREDICTION_TYPES: &[(&str, PredictionType)] = &[
    ("epsilon", PredictionType::Epsilon),
    ("v_prediction", PredictionType::VPrediction),
    ("sample", PredictionType::Sample),
];

/// The diffusers spellings of [`TimestepSpacing`] (the first spelling of a value is its name).
pub const TIMESTEP_SPACINGS: &[(&str, TimestepSpacing)] = &[
    ("leading", TimestepSpacing::Leading),
    ("trailing", TimestepSpacing::Trailing),
    ("linspace", TimestepSpacing::Linspace),
];

/// The diffusers spellings of [`InterpolationType`] (the first spelling of a value is its name).
pub const INTERPOLATION_TYPES: &[(&str, InterpolationType)] = &[
    ("linear", InterpolationType::Linear),
    ("log_linear", InterpolationType::LogLinear),
];

/// The diffusers spellings of [`FinalSigmasType`] (the first spelling of a value is its name).
pub const FINAL_SIGMAS_TYPES: &[(&str, FinalSigmasType)] = &[
    ("zero", FinalSigmasType::Zero),
    ("sigma_min", FinalSigmasType::SigmaMin),
];

/// The diffusers spellings of [`TimestepType`] (the first spelling of a value is its name).
pub const TIMESTEP_TYPES: &[(&str, TimestepType)] = &[
    ("discrete", TimestepType::Discrete),
    ("continuous", TimestepType::Continuous),
];

/// The diffusers spellings of [`AlgorithmType`] (the first spelling of a value is its name).
pub const ALGORITHM_TYPES: &[(&str, AlgorithmType)] = &[
    ("dpmsolver++", AlgorithmType::DpmSolverPlusPlus),
    ("sde-dpmsolver++", AlgorithmType::SdeDpmSolverPlusPlus),
    ("dpmsolver", AlgorithmType::DpmSolver),
    ("sde-dpmsolver", AlgorithmType::SdeDpmSolver),
    // diffusers registers `deis` as `dpmsolver++`.
    ("deis", AlgorithmType::DpmSolverPlusPlus),
];

/// The diffusers spellings of [`SolverType`] (the first spelling of a value is its name).
pub const SOLVER_TYPES: &[(&str, SolverType)] = &[
    ("midpoint", SolverType::Midpoint),
    ("heun", SolverType::Heun),
    ("logrho", SolverType::Logrho),
    ("bh1", SolverType::Bh1),
    ("bh2", SolverType::Bh2),
];

/// The diffusers spellings of [`VarianceType`] (the first spelling of a value is its name).
pub const VARIANCE_TYPES: &[(&str, VarianceType)] = &[
    ("fixed_small", VarianceType::FixedSmall),
    ("fixed_small_log", VarianceType::FixedSmallLog),
    ("fixed_large", VarianceType::FixedLarge),
    ("fixed_large_log", VarianceType::FixedLargeLog),
    ("learned", VarianceType::Learned),
    ("learned_range", VarianceType::LearnedRange),
];

/// The diffusers spelling of `value` in `table` (its first entry).
pub fn name_of<T: Copy + PartialEq>(table: &[(&'static str, T)], value: T) -> &'static str {
    table
        .iter()
        .find(|(_, t)| *t == value)
        .map(|(n, _)| *n)
        .unwrap_or("")
}

/// A diffusers scheduler config.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`, e.g. `DDIMScheduler` (empty when absent).
    pub class_name: String,
    /// `num_train_timesteps` (default 1000).
    pub num_train_timesteps: usize,
    /// `beta_start` (default 0.0001).
    pub beta_start: f64,
    /// `beta_end` (default 0.02).
    pub beta_end: f64,
    /// `beta_schedule` (default `linear`).
    pub beta_schedule: BetaSchedule,
    /// `trained_betas`: explicit betas that replace the schedule (default none).
    pub trained_betas: Option<Vec<f64>>,
    /// `prediction_type` (default `epsilon`).
    pub prediction_type: PredictionType,
    /// `timestep_spacing`; `None` = the class default (DDIM: leading, Euler: linspace).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// `steps_offset` (default 0).
    pub steps_offset: usize,
    /// `set_alpha_to_one`; `None` = the class default (DDIM: true).
    pub set_alpha_to_one: Option<bool>,
    /// `clip_sample`; `None` = the class default (DDIM: true).
    pub clip_sample: Option<bool>,
    /// `clip_sample_range` (default 1.0).
    pub clip_sample_range: f64,
    /// `thresholding` (default false; dynamic thresholding is not implemented).
    pub thresholding: bool,
    /// `dynamic_thresholding_ratio` (default 0.995; kept for completeness).
    pub dynamic_thresholding_ratio: f64,
    /// `sample_max_value` (default 1.0; kept for completeness).
    pub sample_max_value: f64,
    /// `rescale_betas_zero_snr` (default false).
    pub rescale_betas_zero_snr: bool,
    /// `interpolation_type` (default `linear`).
    pub interpolation_type: InterpolationType,
    /// `use_karras_sigmas` (default false).
    pub use_karras_sigmas: bool,
    /// `use_exponential_sigmas` (default false).
    pub use_exponential_sigmas: bool,
    /// `use_beta_sigmas` (default false).
    pub use_beta_sigmas: bool,
    /// `sigma_min` (default none: the smallest training sigma).
    pub sigma_min: Option<f64>,
    /// `sigma_max` (default none: the largest training sigma).
    pub sigma_max: Option<f64>,
    /// `final_sigmas_type` (default `zero`).
    pub final_sigmas_type: FinalSigmasType,
    /// `timestep_type` (default `discrete`).
    pub timestep_type: TimestepType,
    /// `skip_prk_steps` (PNDM; default false).
    pub skip_prk_steps: bool,
    /// `algorithm_type` (DPM-Solver; default `dpmsolver++`).
    pub algorithm_type: AlgorithmType,
    /// `solver_order` (DPM-Solver, UniPC; default 2).
    pub solver_order: usize,
    /// `solver_type`; `None` = the class default (DPM-Solver: midpoint, UniPC: bh2).
    pub solver_type: Option<SolverType>,
    /// `lower_order_final` (multistep solvers; default true).
    pub lower_order_final: bool,
    /// `euler_at_final` (DPM-Solver; default false).
    pub euler_at_final: bool,
    /// `use_lu_lambdas` (DPM-Solver; default false).
    pub use_lu_lambdas: bool,
    /// `use_flow_sigmas` (default false; flow matching is not implemented).
    pub use_flow_sigmas: bool,
    /// `use_dynamic_shifting` (default false; not implemented).
    pub use_dynamic_shifting: bool,
    /// `lambda_min_clipped` (DPM-Solver; default -inf).
    pub lambda_min_clipped: f64,
    /// `variance_type`; `None` = the class default (DDPM: fixed_small, DPM-Solver: none).
    pub variance_type: Option<VarianceType>,
    /// `predict_x0` (UniPC; default true).
    pub predict_x0: bool,
    /// `disable_corrector` (UniPC; step indices whose corrector is skipped; default none).
    pub disable_corrector: Vec<usize>,
    /// `original_inference_steps` (LCM; default 50).
    pub original_inference_steps: usize,
    /// `timestep_scaling` (LCM; default 10.0).
    pub timestep_scaling: f64,
    /// `(key, message)` for each class-specific key above whose value could not be read; the
    /// schedulers that read the key refuse to build (see `check_keys`).
    pub deferred_errors: Vec<(String, String)>,
    /// The JSON object this config was parsed from (after overrides), unknown keys included.
    pub raw: Value,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::defaults(Value::Object(Map::new()))
    }
}

fn invalid(field: &str, value: &Value, expected: &str) -> SchedulerError {
    SchedulerError::InvalidConfig(format!(
        "`{field}` = {value} is not supported (expected {expected})"
    ))
}

/// The value of `key` unless it is absent or null.
fn present<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn get_f64(map: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match present(map, key) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(invalid(key, v, "a finite number")),
        },
    }
}

fn get_usize(map: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match present(map, key) {
        None => Ok(None),
        Some(v) => {
            let n = v
                .as_u64()
                .or_else(|| {
                    // Accept integral floats such as `1000.0`.
                    v.as_f64()
                        .filter(|x| x.fract() == 0.0 && *x >= 0.0 && *x < 9.0e15)
                        .map(|x| x as u64)
                })
                .ok_or_else(|| invalid(key, v, "a non-negative integer"))?;
            usize::try_from(n)
                .map(Some)
                .map_err(|_| invalid(key, v, "a smaller integer"))
        }
    }
}

fn get_bool(map: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match present(map, key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| invalid(key, v, "true or false")),
    }
}

fn get_enum<T: Copy>(
    map: &Map<String, Value>,
    key: &str,
    choices: &[(&str, T)],
) -> Result<Option<T>> {
    match present(map, key) {
        None => Ok(None),
        Some(v) => {
            let found = v
                .as_str()
                .and_then(|s| choices.iter().find(|(name, _)| *name == s));
            match found {
                Some((_, t)) => Ok(Some(*t)),
                None => {
                    let names: Vec<String> =
                        choices.iter().map(|(n, _)| format!("`{n}`")).collect();
                    Err(invalid(key, v, &format!("one of {}", names.join(", "))))
                }
            }
        }
    }
}

impl SchedulerConfig {
    /// A config with every field at diffusers' default, remembering `raw`.
    fn defaults(raw: Value) -> Self {
        Self {
            class_name: String::new(),
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            rescale_betas_zero_snr: false,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            final_sigmas_type: FinalSigmasType::Zero,
            timestep_type: TimestepType::Discrete,
            skip_prk_steps: false,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_order: 2,
            solver_type: None,
            lower_order_final: true,
            euler_at_final: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            use_dynamic_shifting: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            predict_x0: true,
            disable_corrector: Vec::new(),
            original_inference_steps: 50,
            timestep_scaling: 10.0,
            deferred_errors: Vec::new(),
            raw,
        }
    }

    /// Parses the bytes of a `scheduler_config.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            SchedulerError::InvalidConfig(format!("scheduler config is not valid JSON: {e}"))
        })?;
        Self::from_value(value)
    }

    /// Parses a scheduler config JSON object.
    pub fn from_value(value: Value) -> Result<Self> {
        let Value::Object(all) = &value else {
            return Err(SchedulerError::InvalidConfig(format!(
                "scheduler config must be a JSON object, got {value}"
            )));
        };
        // diffusers drops keys that only held class defaults when the config was loaded.
        let used_defaults: Vec<&str> = all
            .get("_use_default_values")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let map: Map<String, Value> = all
            .iter()
            .filter(|(k, _)| !used_defaults.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();

        let mut c = Self::defaults(value.clone());
        if let Some(v) = present(&map, "_class_name") {
            c.class_name = v
                .as_str()
                .ok_or_else(|| invalid("_class_name", v, "a string"))?
                .to_string();
        }
        if let Some(n) = get_usize(&map, "num_train_timesteps")? {
            if n == 0 {
                return Err(invalid(
                    "num_train_timesteps",
                    &Value::from(0),
                    "at least 1",
                ));
            }
            c.num_train_timesteps = n;
        }
        if let Some(x) = get_f64(&map, "beta_start")? {
            c.beta_start = x;
        }
        if let Some(x) = get_f64(&map, "beta_end")? {
            c.beta_end = x;
        }
        if let Some(x) = get_enum(&map, "beta_schedule", BETA_SCHEDULES)? {
            c.beta_schedule = x;
        }
        if let Some(v) = present(&map, "trained_betas") {
            let arr = v
                .as_array()
                .ok_or_else(|| invalid("trained_betas", v, "a list of numbers"))?;
            let betas = arr
                .iter()
                .map(|b| b.as_f64().filter(|x| x.is_finite()))
                .collect::<Option<Vec<f64>>>()
                .ok_or_else(|| invalid("trained_betas", v, "a list of finite numbers"))?;
            c.trained_betas = Some(betas);
        }
        if let Some(x) = get_enum(&map, "prediction_type", PREDICTION_TYPES)? {
            c.prediction_type = x;
        }
        c.timestep_spacing = get_enum(&map, "timestep_spacing", TIMESTEP_SPACINGS)?;
        if let Some(x) = get_usize(&map, "steps_offset")? {
            c.steps_offset = x;
        }
        c.set_alpha_to_one = get_bool(&map, "set_alpha_to_one")?;
        c.clip_sample = get_bool(&map, "clip_sample")?;
        if let Some(x) = get_f64(&map, "clip_sample_range")? {
            c.clip_sample_range = x;
        }
        if let Some(x) = get_bool(&map, "thresholding")? {
            c.thresholding = x;
        }
        if let Some(x) = get_f64(&map, "dynamic_thresholding_ratio")? {
            c.dynamic_thresholding_ratio = x;
        }
        if let Some(x) = get_f64(&map, "sample_max_value")? {
            c.sample_max_value = x;
        }
        if let Some(x) = get_bool(&map, "rescale_betas_zero_snr")? {
            c.rescale_betas_zero_snr = x;
        }
        if let Some(x) = get_enum(&map, "interpolation_type", INTERPOLATION_TYPES)? {
            c.interpolation_type = x;
        }
        if let Some(x) = get_bool(&map, "use_karras_sigmas")? {
            c.use_karras_sigmas = x;
        }
        if let Some(x) = get_bool(&map, "use_exponential_sigmas")? {
            c.use_exponential_sigmas = x;
        }
        if let Some(x) = get_bool(&map, "use_beta_sigmas")? {
            c.use_beta_sigmas = x;
        }
        c.sigma_min = get_f64(&map, "sigma_min")?;
        c.sigma_max = get_f64(&map, "sigma_max")?;
        if let Some(x) = get_enum(&map, "final_sigmas_type", FINAL_SIGMAS_TYPES)? {
            c.final_sigmas_type = x;
        }
        if let Some(x) = get_enum(&map, "timestep_type", TIMESTEP_TYPES)? {
            c.timestep_type = x;
        }
        c.parse_class_keys(&map);
        Ok(c)
    }

    /// Parses the keys only some scheduler classes read. They are parsed leniently: a value that
    /// cannot be read is recorded in `deferred_errors` and reported only when a scheduler that
    /// reads the key is built, since diffusers ignores the keys a class does not take (another
    /// class's unusual setting must not stop a model from loading).
    fn parse_class_keys(&mut self, map: &Map<String, Value>) {
        let mut errors = Vec::new();
        let mut take = |key: &str, r: Result<()>| {
            if let Err(e) = r {
                errors.push((key.to_string(), e.to_string()));
            }
        };
        take(
            "skip_prk_steps",
            get_bool(map, "skip_prk_steps").map(|x| {
                if let Some(x) = x {
                    self.skip_prk_steps = x;
                }
            }),
        );
        take(
            "algorithm_type",
            get_enum(map, "algorithm_type", ALGORITHM_TYPES).map(|x| {
                if let Some(x) = x {
                    self.algorithm_type = x;
                }
            }),
        );
        take(
            "solver_order",
            match get_usize(map, "solver_order") {
                Ok(Some(0)) => Err(invalid("solver_order", &Value::from(0), "at least 1")),
                Ok(Some(x)) => {
                    self.solver_order = x;
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
        );
        take(
            "solver_type",
            get_enum(map, "solver_type", SOLVER_TYPES).map(|x| self.solver_type = x),
        );
        for (key, field) in [
            ("lower_order_final", &mut self.lower_order_final),
            ("euler_at_final", &mut self.euler_at_final),
            ("use_lu_lambdas", &mut self.use_lu_lambdas),
            ("use_flow_sigmas", &mut self.use_flow_sigmas),
            ("use_dynamic_shifting", &mut self.use_dynamic_shifting),
            ("predict_x0", &mut self.predict_x0),
        ] {
            take(
                key,
                get_bool(map, key).map(|x| {
                    if let Some(x) = x {
                        *field = x;
                    }
                }),
            );
        }
        if let Some(v) = present(map, "lambda_min_clipped") {
            // Python writes -inf (the default) as `-Infinity`, which is not JSON; a config that
            // went through a strict JSON writer may hold it as a string.
            let parsed = match v {
                Value::String(s) if matches!(s.as_str(), "-inf" | "-Infinity") => {
                    Some(f64::NEG_INFINITY)
                }
                _ => v.as_f64().filter(|x| !x.is_nan()),
            };
            match parsed {
                Some(x) => self.lambda_min_clipped = x,
                None => take(
                    "lambda_min_clipped",
                    Err(invalid("lambda_min_clipped", v, "a number")),
                ),
            }
        }
        take(
            "variance_type",
            get_enum(map, "variance_type", VARIANCE_TYPES).map(|x| self.variance_type = x),
        );
        if let Some(v) = present(map, "disable_corrector") {
            let steps = v.as_array().and_then(|a| {
                a.iter()
                    .map(|i| i.as_u64().and_then(|i| usize::try_from(i).ok()))
                    .collect::<Option<Vec<usize>>>()
            });
            match steps {
                Some(steps) => self.disable_corrector = steps,
                None => take(
                    "disable_corrector",
                    Err(invalid("disable_corrector", v, "a list of step indices")),
                ),
            }
        }
        take(
            "original_inference_steps",
            match get_usize(map, "original_inference_steps") {
                Ok(Some(0)) => Err(invalid(
                    "original_inference_steps",
                    &Value::from(0),
                    "at least 1",
                )),
                Ok(Some(x)) => {
                    self.original_inference_steps = x;
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
        );
        take(
            "timestep_scaling",
            get_f64(map, "timestep_scaling").map(|x| {
                if let Some(x) = x {
                    self.timestep_scaling = x;
                }
            }),
        );
        self.deferred_errors = errors;
    }

    /// The first value among `keys` that could not be read (see `deferred_errors`), as the
    /// error a scheduler reading those keys reports.
    pub fn check_keys(&self, keys: &[&str]) -> Result<()> {
        match self
            .deferred_errors
            .iter()
            .find(|(k, _)| keys.contains(&k.as_str()))
        {
            Some((_, message)) => Err(SchedulerError::InvalidConfig(message.clone())),
            None => Ok(()),
        }
    }

    /// This config with `overrides` (a JSON object) applied, like diffusers'
    /// `from_config(config, **overrides)`: overridden keys win, the rest is kept.
    pub fn with_overrides(&self, overrides: &Value) -> Result<Self> {
        let Value::Object(over) = overrides else {
            return Err(SchedulerError::InvalidConfig(format!(
                "scheduler overrides must be a JSON object, got {overrides}"
            )));
        };
        let mut raw = match &self.raw {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        for (k, v) in over {
            raw.insert(k.clone(), v.clone());
        }
        // An explicitly passed key is no longer a "default value" to be dropped.
        if let Some(Value::Array(used)) = raw.get_mut("_use_default_values") {
            used.retain(|k| k.as_str().is_none_or(|k| !over.contains_key(k)));
        }
        Self::from_value(Value::Object(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_through_the_tables() {
        fn check<T: Copy + PartialEq + std::fmt::Debug>(key: &str, table: &[(&'static str, T)]) {
            for (name, value) in table {
                let mut m = Map::new();
                m.insert(key.into(), Value::from(*name));
                assert_eq!(get_enum(&m, key, table).unwrap(), Some(*value));
                let first = table.iter().find(|(_, v)| v == value).unwrap().0;
                assert_eq!(name_of(table, *value), first);
            }
        }
        check("beta_schedule", BETA_SCHEDULES);
        check("prediction_type", PREDICTION_TYPES);
        check("timestep_spacing", TIMESTEP_SPACINGS);
        check("interpolation_type", INTERPOLATION_TYPES);
        check("final_sigmas_type", FINAL_SIGMAS_TYPES);
        check("timestep_type", TIMESTEP_TYPES);
        check("algorithm_type", ALGORITHM_TYPES);
        check("solver_type", SOLVER_TYPES);
        check("variance_type", VARIANCE_TYPES);
        // `deis` is read as dpmsolver++ and reported under that name.
        assert_eq!(
            name_of(ALGORITHM_TYPES, AlgorithmType::DpmSolverPlusPlus),
            "dpmsolver++"
        );
    }

    #[test]
    fn empty_config_gets_diffusers_defaults() {
        let c = SchedulerConfig::from_json_bytes(b"{}").unwrap();
        assert_eq!(c.num_train_timesteps, 1000);
        assert_eq!(c.beta_start, 0.0001);
        assert_eq!(c.beta_end, 0.02);
        assert_eq!(c.beta_schedule, BetaSchedule::Linear);
        assert_eq!(c.prediction_type, PredictionType::Epsilon);
        assert_eq!(c.timestep_spacing, None);
        assert_eq!(c.clip_sample, None);
        assert_eq!(c.steps_offset, 0);
        assert_eq!(c, SchedulerConfig::default());
    }

    #[test]
    fn unknown_keys_ignored_nulls_are_defaults() {
        let c = SchedulerConfig::from_json_bytes(
            br#"{"_class_name": "DDIMScheduler", "skip_prk_steps": true, "trained_betas": null,
                 "sigma_min": null, "beta_schedule": "scaled_linear"}"#,
        )
        .unwrap();
        assert_eq!(c.class_name, "DDIMScheduler");
        assert_eq!(c.trained_betas, None);
        assert_eq!(c.sigma_min, None);
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(c.raw["skip_prk_steps"], Value::Bool(true));
    }

    #[test]
    fn bad_values_name_the_field() {
        for (json, field) in [
            (r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule"),
            (r#"{"prediction_type": "flow"}"#, "prediction_type"),
            (r#"{"timestep_spacing": "middle"}"#, "timestep_spacing"),
            (r#"{"steps_offset": -1}"#, "steps_offset"),
            (r#"{"clip_sample": "yes"}"#, "clip_sample"),
            (r#"{"num_train_timesteps": 0}"#, "num_train_timesteps"),
        ] {
            let err = SchedulerConfig::from_json_bytes(json.as_bytes()).unwrap_err();
            assert!(
                matches!(&err, SchedulerError::InvalidConfig(m) if m.contains(field)),
                "{json}: {err}"
            );
        }
        assert!(SchedulerConfig::from_json_bytes(b"[1]").is_err());
        assert!(SchedulerConfig::from_json_bytes(b"{").is_err());
    }

    #[test]
    fn class_specific_keys_are_lenient_until_read() {
        // An SA-Solver config: `algorithm_type` is none of DPM-Solver's, yet the model loads.
        let c = SchedulerConfig::from_json_bytes(
            br#"{"algorithm_type": "data_prediction", "solver_order": 0,
                 "variance_type": "fixed_small_log", "lambda_min_clipped": "-inf"}"#,
        )
        .unwrap();
        assert_eq!(c.algorithm_type, AlgorithmType::DpmSolverPlusPlus);
        assert_eq!(c.variance_type, Some(VarianceType::FixedSmallLog));
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert!(c.check_keys(&["variance_type", "skip_prk_steps"]).is_ok());
        let err = c.check_keys(&["algorithm_type"]).unwrap_err().to_string();
        assert!(
            err.contains("algorithm_type") && err.contains("data_prediction"),
            "{err}"
        );
        assert!(c.check_keys(&["solver_order"]).is_err());
        // Overriding the key clears its error.
        let o = c
            .with_overrides(&serde_json::json!({"algorithm_type": "dpmsolver++"}))
            .unwrap();
        assert!(o.check_keys(&["algorithm_type"]).is_ok());
    }

    #[test]
    fn overrides_win_and_defaults_list_is_honoured() {
        let c = SchedulerConfig::from_json_bytes(
            br#"{"timestep_spacing": "linspace", "steps_offset": 1,
                 "_use_default_values": ["timestep_spacing"]}"#,
        )
        .unwrap();
        // Listed as a default value: dropped, so the class default applies.
        assert_eq!(c.timestep_spacing, None);
        assert_eq!(c.steps_offset, 1);
        let o = c
            .with_overrides(&serde_json::json!({"timestep_spacing": "trailing",
                                                "prediction_type": "v_prediction"}))
            .unwrap();
        assert_eq!(o.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert_eq!(o.prediction_type, PredictionType::VPrediction);
        assert_eq!(o.steps_offset, 1);
        assert!(c.with_overrides(&Value::Null).is_err());
    }
}
