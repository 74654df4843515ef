//! What a model offers for each scheduler name, in diffusers' terms: the class a name builds and
//! the effective config it runs with on that model (the model's `scheduler_config.json` with the
//! name's overrides applied and every class default filled in), so that a client holding a
//! diffusers scheduler object can find the name that reproduces it, or learn which of its
//! settings no name honours.

use serde_json::{Map, Value};

use super::config::{
    name_of, SolverType, ALGORITHM_TYPES, BETA_SCHEDULES, FINAL_SIGMAS_TYPES, INTERPOLATION_TYPES,
    PREDICTION_TYPES, SOLVER_TYPES, TIMESTEP_SPACINGS, TIMESTEP_TYPES, VARIANCE_TYPES,
};
use super::{
    config_for_name, entry, SchedulerConfig, SchedulerEntry, COMMON_KEYS, REGISTRY, SCHEDULER_NAMES,
};

/// One scheduler name as a model offers it.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerInfo {
    /// The name a request asks for (`dpmpp_2m_karras`).
    pub name: &'static str,
    /// The diffusers class it builds (`DPMSolverMultistepScheduler`).
    pub diffusers_class: &'static str,
    /// The effective config, a JSON object with diffusers' key names (see [`effective_config`]).
    pub config: Value,
}

/// The effective config of scheduler `name` on a model whose scheduler config is `model`: the
/// value of every key its class reads, as `build` uses it, under diffusers' key names and
/// spellings. Keys the model leaves unset get the class's own default, and values the class
/// re-registers (DPM-Solver's `solver_type = "bh2"` becomes `midpoint`) are reported as
/// re-registered. A non-finite number (`lambda_min_clipped = -inf`) is the string `"-inf"`,
/// `"inf"` or `"nan"`, since JSON has no such numbers. `None` for a name we do not implement.
pub fn effective_config(name: &str, model: &SchedulerConfig) -> Option<Value> {
    let e = entry(name)?;
    let c = config_for_name(name, model);
    let mut out = Map::new();
    for key in COMMON_KEYS.iter().chain(e.keys) {
        let value = value_of(&c, key, e).unwrap_or_else(|| {
            // A registry key this function cannot read is a mistake the unit tests catch.
            debug_assert!(false, "no effective value for `{key}` of `{name}`");
            Value::Null
        });
        out.insert(key.to_string(), value);
    }
    Some(Value::Object(out))
}

/// Every scheduler name, in [`SCHEDULER_NAMES`] order, with its class and effective config on a
/// model whose scheduler config is `model`.
pub fn scheduler_infos(model: &SchedulerConfig) -> Vec<SchedulerInfo> {
    debug_assert_eq!(REGISTRY.len(), SCHEDULER_NAMES.len());
    REGISTRY
        .iter()
        .map(|e| SchedulerInfo {
            name: e.name,
            diffusers_class: e.class,
            config: effective_config(e.name, model).unwrap_or(Value::Null),
        })
        .collect()
}

/// A float as JSON; non-finite values as strings (JSON has no infinity).
fn number(x: f64) -> Value {
    if x.is_finite() {
        Value::from(x)
    } else if x.is_nan() {
        "nan".into()
    } else if x > 0.0 {
        "inf".into()
    } else {
        "-inf".into()
    }
}

fn default_of(e: &SchedulerEntry, key: &str) -> Value {
    e.class_defaults
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_json())
        .unwrap_or(Value::Null)
}

/// The effective value of `key` in `c` for the class of entry `e`; `None` for a key we do not
/// model.
fn value_of(c: &SchedulerConfig, key: &str, e: &SchedulerEntry) -> Option<Value> {
    let or_default = |v: Option<Value>| v.unwrap_or_else(|| default_of(e, key));
    Some(match key {
        "num_train_timesteps" => c.num_train_timesteps.into(),
        "beta_start" => number(c.beta_start),
        "beta_end" => number(c.beta_end),
        "beta_schedule" => name_of(BETA_SCHEDULES, c.beta_schedule).into(),
        "trained_betas" => match &c.trained_betas {
            Some(b) => b.iter().map(|&x| number(x)).collect(),
            None => Value::Null,
        },
        "prediction_type" => name_of(PREDICTION_TYPES, c.prediction_type).into(),
        "timestep_spacing" => or_default(
            c.timestep_spacing
                .map(|t| name_of(TIMESTEP_SPACINGS, t).into()),
        ),
        "steps_offset" => c.steps_offset.into(),
        "set_alpha_to_one" => or_default(c.set_alpha_to_one.map(Value::from)),
        "clip_sample" => or_default(c.clip_sample.map(Value::from)),
        "clip_sample_range" => number(c.clip_sample_range),
        "thresholding" => c.thresholding.into(),
        "dynamic_thresholding_ratio" => number(c.dynamic_thresholding_ratio),
        "sample_max_value" => number(c.sample_max_value),
        "rescale_betas_zero_snr" => c.rescale_betas_zero_snr.into(),
        "interpolation_type" => name_of(INTERPOLATION_TYPES, c.interpolation_type).into(),
        "use_karras_sigmas" => c.use_karras_sigmas.into(),
        "use_exponential_sigmas" => c.use_exponential_sigmas.into(),
        "use_beta_sigmas" => c.use_beta_sigmas.into(),
        "sigma_min" => c.sigma_min.map(number).unwrap_or(Value::Null),
        "sigma_max" => c.sigma_max.map(number).unwrap_or(Value::Null),
        "final_sigmas_type" => name_of(FINAL_SIGMAS_TYPES, c.final_sigmas_type).into(),
        "timestep_type" => name_of(TIMESTEP_TYPES, c.timestep_type).into(),
        "skip_prk_steps" => c.skip_prk_steps.into(),
        "algorithm_type" => name_of(ALGORITHM_TYPES, c.algorithm_type).into(),
        "solver_order" => c.solver_order.into(),
        "solver_type" => solver_type(c.solver_type, &default_of(e, key)),
        "lower_order_final" => c.lower_order_final.into(),
        "euler_at_final" => c.euler_at_final.into(),
        "use_lu_lambdas" => c.use_lu_lambdas.into(),
        "use_flow_sigmas" => c.use_flow_sigmas.into(),
        "use_dynamic_shifting" => c.use_dynamic_shifting.into(),
        "lambda_min_clipped" => number(c.lambda_min_clipped),
        "variance_type" => or_default(c.variance_type.map(|v| name_of(VARIANCE_TYPES, v).into())),
        "predict_x0" => c.predict_x0.into(),
        "disable_corrector" => c.disable_corrector.iter().copied().collect(),
        "original_inference_steps" => c.original_inference_steps.into(),
        "timestep_scaling" => number(c.timestep_scaling),
        _ => return None,
    })
}

/// `solver_type` as the class registers it: DPM-Solver (default `midpoint`) keeps `heun` and
/// turns every other value into `midpoint`; UniPC (default `bh2`) keeps `bh1` and turns every
/// other value into `bh2`.
fn solver_type(value: Option<SolverType>, class_default: &Value) -> Value {
    let (kept, default) = match class_default.as_str() {
        Some("bh2") => (SolverType::Bh1, SolverType::Bh2),
        _ => (SolverType::Heun, SolverType::Midpoint),
    };
    let effective = if value == Some(kept) { kept } else { default };
    name_of(SOLVER_TYPES, effective).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::NoiseGenerator;
    use crate::schedulers::{build, SchedulerOptions};
    use candle_core::{Device, Tensor};
    use serde_json::json;

    /// tiny-sd15's `scheduler/scheduler_config.json` (SD 1.5's, with a DDIM class name).
    fn sd15() -> SchedulerConfig {
        SchedulerConfig::from_value(json!({
            "_class_name": "DDIMScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "clip_sample_range": 1.0,
            "dynamic_thresholding_ratio": 0.995,
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "rescale_betas_zero_snr": false,
            "sample_max_value": 1.0,
            "set_alpha_to_one": false,
            "steps_offset": 1,
            "thresholding": false,
            "timestep_spacing": "leading",
            "trained_betas": null
        }))
        .unwrap()
    }

    fn config_of(name: &str, model: &SchedulerConfig) -> Map<String, Value> {
        match effective_config(name, model) {
            Some(Value::Object(m)) => m,
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn every_name_reports_every_key_of_its_class() {
        let infos = scheduler_infos(&SchedulerConfig::default());
        let names: Vec<&str> = infos.iter().map(|i| i.name).collect();
        assert_eq!(names, SCHEDULER_NAMES);
        for (info, e) in infos.iter().zip(REGISTRY) {
            assert_eq!(info.diffusers_class, e.class);
            let Value::Object(m) = &info.config else {
                panic!("{}: not an object", info.name)
            };
            let want: Vec<&str> = COMMON_KEYS.iter().chain(e.keys).copied().collect();
            assert_eq!(m.len(), want.len(), "{}: a key listed twice", info.name);
            for key in want {
                assert!(
                    value_of(
                        &config_for_name(e.name, &SchedulerConfig::default()),
                        key,
                        e
                    )
                    .is_some(),
                    "{}: `{key}` has no effective value",
                    e.name
                );
                assert!(m.contains_key(key), "{}: `{key}` missing", e.name);
            }
            for (key, _) in e.class_defaults {
                assert!(
                    m.contains_key(*key),
                    "{}: default for unlisted `{key}`",
                    e.name
                );
            }
        }
        assert_eq!(
            effective_config("no_such", &SchedulerConfig::default()),
            None
        );
    }

    #[test]
    fn sd15_dpm_names_differ_exactly_in_karras_sigmas() {
        let plain = config_of("dpmpp_2m", &sd15());
        let karras = config_of("dpmpp_2m_karras", &sd15());
        assert_eq!(plain["use_karras_sigmas"], json!(false));
        assert_eq!(karras["use_karras_sigmas"], json!(true));
        for c in [&plain, &karras] {
            assert_eq!(c["algorithm_type"], json!("dpmsolver++"));
            assert_eq!(c["solver_order"], json!(2));
            assert_eq!(c["solver_type"], json!("midpoint"));
            // The model's own settings, not the class defaults (linspace, linear betas).
            assert_eq!(c["timestep_spacing"], json!("leading"));
            assert_eq!(c["steps_offset"], json!(1));
            assert_eq!(c["beta_schedule"], json!("scaled_linear"));
            assert_eq!(c["beta_start"], json!(0.00085));
            assert_eq!(c["prediction_type"], json!("epsilon"));
            assert_eq!(c["lambda_min_clipped"], json!("-inf"));
            assert_eq!(c["variance_type"], Value::Null);
        }
        let differing: Vec<&String> = plain.keys().filter(|k| plain[*k] != karras[*k]).collect();
        assert_eq!(differing, ["use_karras_sigmas"]);
        let ddim = config_of("ddim", &sd15());
        assert_eq!(ddim["clip_sample"], json!(false));
        assert_eq!(ddim["set_alpha_to_one"], json!(false));
        assert!(!ddim.contains_key("use_karras_sigmas"));
    }

    #[test]
    fn overrides_win_over_the_model_and_model_settings_survive() {
        let model = SchedulerConfig::from_value(json!({
            "_class_name": "DPMSolverMultistepScheduler",
            "algorithm_type": "sde-dpmsolver++", "solver_order": 3,
            "use_karras_sigmas": true, "prediction_type": "v_prediction",
            "timestep_spacing": "trailing", "lambda_min_clipped": -5.1,
            "solver_type": "heun"
        }))
        .unwrap();
        let c = config_of("dpmpp_2m", &model);
        assert_eq!(c["algorithm_type"], json!("dpmsolver++"));
        assert_eq!(c["solver_order"], json!(2));
        // dpmpp_2m keeps the model's Karras sigmas; the other settings are the model's too.
        assert_eq!(c["use_karras_sigmas"], json!(true));
        assert_eq!(c["prediction_type"], json!("v_prediction"));
        assert_eq!(c["timestep_spacing"], json!("trailing"));
        assert_eq!(c["lambda_min_clipped"], json!(-5.1));
        assert_eq!(c["solver_type"], json!("heun"));
        let pndm = config_of("pndm", &model);
        assert_eq!(pndm["skip_prk_steps"], json!(true));
    }

    #[test]
    fn unset_keys_get_each_class_default() {
        let empty = SchedulerConfig::default();
        let spacing = |n: &str| config_of(n, &empty)["timestep_spacing"].clone();
        for (name, want) in [
            ("ddim", "leading"),
            ("euler", "linspace"),
            ("euler_a", "linspace"),
            ("dpmpp_2m", "linspace"),
            ("pndm", "leading"),
            ("lcm", "leading"),
            ("unipc", "linspace"),
            ("ddpm", "leading"),
        ] {
            assert_eq!(spacing(name), json!(want), "{name}");
        }
        assert_eq!(config_of("ddim", &empty)["clip_sample"], json!(true));
        assert_eq!(config_of("lcm", &empty)["clip_sample"], json!(false));
        assert_eq!(config_of("pndm", &empty)["set_alpha_to_one"], json!(false));
        assert_eq!(config_of("ddim", &empty)["set_alpha_to_one"], json!(true));
        assert_eq!(
            config_of("ddpm", &empty)["variance_type"],
            json!("fixed_small")
        );
        assert_eq!(config_of("unipc", &empty)["solver_type"], json!("bh2"));
        assert_eq!(
            config_of("dpmpp_2m", &empty)["beta_schedule"],
            json!("linear")
        );
        assert_eq!(config_of("dpmpp_2m", &empty)["trained_betas"], Value::Null);
    }

    #[test]
    fn solver_type_is_reported_as_each_class_registers_it() {
        for (given, dpm, unipc) in [
            ("midpoint", "midpoint", "bh2"),
            ("heun", "heun", "bh2"),
            ("logrho", "midpoint", "bh2"),
            ("bh1", "midpoint", "bh1"),
            ("bh2", "midpoint", "bh2"),
        ] {
            let model = SchedulerConfig::from_value(json!({ "solver_type": given })).unwrap();
            assert_eq!(
                config_of("dpmpp_2m", &model)["solver_type"],
                json!(dpm),
                "{given}"
            );
            assert_eq!(
                config_of("unipc", &model)["solver_type"],
                json!(unipc),
                "{given}"
            );
        }
    }

    /// Timesteps and three steps' outputs of `name` built from `config`.
    fn run(name: &str, config: &SchedulerConfig) -> (Vec<f64>, Vec<Vec<f32>>) {
        let mut s = build(name, config, 4, &SchedulerOptions::default()).unwrap();
        let dev = Device::Cpu;
        let mut sample = Tensor::full(5.0f32, (1, 4, 2, 2), &dev).unwrap();
        let out = Tensor::full(3.0f32, (1, 4, 2, 2), &dev).unwrap();
        let mut noise = NoiseGenerator::new(7);
        let mut outs = Vec::new();
        for i in 0..s.timesteps().len() {
            sample = s.step(&out, i, &sample, &mut noise).unwrap();
            outs.push(sample.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        (s.timesteps().to_vec(), outs)
    }

    #[test]
    fn class_defaults_are_what_the_schedulers_do() {
        // A model config without the key and one that sets it to the reported default must
        // run identically; otherwise ListModels would misreport what a name does.
        let base = json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                          "beta_end": 0.012, "steps_offset": 1});
        for e in REGISTRY {
            let without = SchedulerConfig::from_value(base.clone()).unwrap();
            let want = run(e.name, &without);
            for (key, value) in e.class_defaults {
                let mut with = base.clone();
                with[*key] = value.to_json();
                let with = SchedulerConfig::from_value(with).unwrap();
                assert_eq!(run(e.name, &with), want, "{}: `{key}`", e.name);
            }
        }
        // The comparison can tell settings apart.
        let other = SchedulerConfig::from_value(json!({"timestep_spacing": "trailing"})).unwrap();
        let linspace =
            SchedulerConfig::from_value(json!({"timestep_spacing": "linspace"})).unwrap();
        assert_ne!(run("euler", &other), run("euler", &linspace));
    }

    #[test]
    fn non_finite_numbers_are_strings() {
        assert_eq!(number(f64::NEG_INFINITY), json!("-inf"));
        assert_eq!(number(f64::INFINITY), json!("inf"));
        assert_eq!(number(f64::NAN), json!("nan"));
        assert_eq!(number(0.5), json!(0.5));
    }
}
