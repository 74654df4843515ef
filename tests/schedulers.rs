//! Scheduler specs: schedules and single steps against recorded diffusers 0.42.1 runs (golden
//! cases in tests/fixtures), plus hand-worked spacing and prediction-type examples.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, model_dir, Case};
use serde_json::{json, Value};
use stepstream::rng::{NoiseGenerator, ReplayNoise};
use stepstream::schedulers::ddim::DdimScheduler;
use stepstream::schedulers::euler::EulerDiscreteScheduler;
use stepstream::schedulers::{
    build, Scheduler, SchedulerConfig, SchedulerError, SchedulerOptions, SCHEDULER_NAMES,
};

/// The golden README's recommended tolerance for one teacher-forced scheduler step.
const STEP_TOL: f32 = 2e-5;

const DDIM_CASES: &[&str] = &[
    "ddim-10",
    "ddim-10-cfg-cutoff",
    "ddim-10-latents-edit",
    "ddim-10-interrupt",
    "ddim-10-guidance1",
    "neg-prompt",
];

fn model_config() -> SchedulerConfig {
    let bytes = std::fs::read(model_dir("tiny-sd15").join("scheduler/scheduler_config.json"))
        .expect("fixture scheduler config");
    SchedulerConfig::from_json_bytes(&bytes).expect("config parses")
}

/// The scheduler config the case recorded (full diffusers config, `_use_default_values` included).
fn case_config(case: &Case) -> SchedulerConfig {
    SchedulerConfig::from_value(case.json["scheduler"]["config"].clone()).expect("case config")
}

fn json_f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn tensor_f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_vec(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn ddim(config: &SchedulerConfig, steps: usize) -> DdimScheduler {
    DdimScheduler::new(config, steps, &SchedulerOptions::default()).unwrap()
}

fn with(config: &SchedulerConfig, overrides: Value) -> SchedulerConfig {
    config.with_overrides(&overrides).unwrap()
}

/// Teacher-forced run over every executed step of `case`; returns the max abs error.
fn teacher_forced(case: &Case, scheduler: &mut dyn Scheduler) -> f32 {
    let mut noise = NoiseGenerator::new(0);
    let mut worst = 0f32;
    for k in 0..case.num_steps() {
        let step_index = case.step(k)["step_index"].as_u64().unwrap() as usize;
        assert_eq!(
            scheduler.timesteps()[step_index],
            case.step(k)["timestep"].as_f64().unwrap(),
            "timestep of step {k}"
        );
        let out = scheduler
            .step(
                &case.step_tensor(k, &["scheduler_step", "model_output"]),
                step_index,
                &case.step_tensor(k, &["scheduler_step", "sample"]),
                &mut noise,
            )
            .unwrap();
        let want = case.step_tensor(k, &["callback_in", "latents"]);
        let err = max_abs_diff(&out, &want);
        assert!(err <= STEP_TOL, "step {k}: max abs {err:e} > {STEP_TOL:e}");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn ddim_schedule_matches_golden() {
    let config = model_config();
    assert_eq!(config.class_name, "DDIMScheduler");
    for name in DDIM_CASES {
        let case = Case::load("tiny-sd15", name);
        let s = build("", &config, 10, &SchedulerOptions::default()).unwrap();
        assert_eq!(s.name(), "ddim");
        assert_eq!(s.timesteps(), json_f64s(&case.json["timesteps"]), "{name}");
        let recorded: Vec<f64> = tensor_f32s(&case.tensor("schedule.timesteps"))
            .into_iter()
            .map(f64::from)
            .collect();
        assert_eq!(s.timesteps(), recorded, "{name}");
        assert_eq!(
            s.init_noise_sigma(),
            case.json["scheduler"]["init_noise_sigma"].as_f64().unwrap()
        );
        // Built from the case's own recorded config as well.
        let from_case = ddim(&case_config(&case), 10);
        assert_eq!(from_case.timesteps(), s.timesteps());
    }
    let case = Case::load("tiny-sd15", "ddim-10");
    let s = ddim(&config, 10);
    let err = max_abs_vec(
        s.alphas_cumprod(),
        &tensor_f32s(&case.tensor("schedule.alphas_cumprod")),
    );
    println!("ddim alphas_cumprod max abs err: {err:e}");
    assert_eq!(err, 0.0, "alphas_cumprod max abs {err:e}");
    // set_alpha_to_one = false: the final alpha is alphas_cumprod[0].
    assert_eq!(s.final_alpha_cumprod(), s.alphas_cumprod()[0]);
}

#[test]
fn ddim_teacher_forced_steps_match_golden() {
    let config = model_config();
    for name in DDIM_CASES {
        let case = Case::load("tiny-sd15", name);
        let mut s = build("ddim", &config, 10, &SchedulerOptions::default()).unwrap();
        let err = teacher_forced(&case, s.as_mut());
        println!("{name}: teacher-forced DDIM step max abs err {err:e}");
    }
}

#[test]
fn euler_schedule_matches_golden() {
    let case = Case::load("tiny-sd15", "euler-10");
    // As the case was made: EulerDiscreteScheduler.from_config(<the model's DDIM config>).
    let s = EulerDiscreteScheduler::new(&model_config(), 10).unwrap();
    let from_case = EulerDiscreteScheduler::new(&case_config(&case), 10).unwrap();
    assert_eq!(case_config(&case).class_name, "EulerDiscreteScheduler");
    assert_eq!(s.timesteps(), json_f64s(&case.json["timesteps"]));
    assert_eq!(from_case.timesteps(), s.timesteps());
    let recorded: Vec<f64> = tensor_f32s(&case.tensor("schedule.timesteps"))
        .into_iter()
        .map(f64::from)
        .collect();
    assert_eq!(s.timesteps(), recorded);
    assert_eq!(from_case.sigmas(), s.sigmas());

    let want_init = case.json["scheduler"]["init_noise_sigma"].as_f64().unwrap();
    println!(
        "euler init_noise_sigma {} vs golden {want_init} (diff {:e})",
        s.init_noise_sigma(),
        (s.init_noise_sigma() - want_init).abs()
    );
    assert!((s.init_noise_sigma() - want_init).abs() <= 1e-6);

    let json_sigmas: Vec<f32> = json_f64s(&case.json["sigmas"])
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let err_json = max_abs_vec(s.sigmas(), &json_sigmas);
    let err_tensor = max_abs_vec(s.sigmas(), &tensor_f32s(&case.tensor("schedule.sigmas")));
    println!("euler sigmas max abs err: json {err_json:e}, tensor {err_tensor:e}");
    assert!(err_json <= 1e-6 && err_tensor <= 1e-6);
    assert_eq!(*s.sigmas().last().unwrap(), 0.0);

    let err = max_abs_vec(
        s.alphas_cumprod(),
        &tensor_f32s(&case.tensor("schedule.alphas_cumprod")),
    );
    println!("euler alphas_cumprod max abs err: {err:e}");
    assert_eq!(err, 0.0);
}

#[test]
fn euler_teacher_forced_steps_match_golden() {
    let case = Case::load("tiny-sd15", "euler-10");
    let mut s = build("euler", &model_config(), 10, &SchedulerOptions::default()).unwrap();
    let err = teacher_forced(&case, s.as_mut());
    println!("euler-10: teacher-forced Euler step max abs err {err:e}");
}

#[test]
fn euler_scale_model_input_matches_recorded_unet_input() {
    let case = Case::load("tiny-sd15", "euler-10");
    let s = build("euler", &model_config(), 10, &SchedulerOptions::default()).unwrap();
    let mut worst = 0f32;
    for k in 0..case.num_steps() {
        let step_index = case.step(k)["step_index"].as_u64().unwrap() as usize;
        let latents = case.step_tensor(k, &["scheduler_step", "sample"]);
        let x = if case.step(k)["cfg_applied"].as_bool().unwrap() {
            Tensor::cat(&[&latents, &latents], 0).unwrap()
        } else {
            latents
        };
        let scaled = s.scale_model_input(&x, step_index).unwrap();
        let err = max_abs_diff(&scaled, &case.step_tensor(k, &["unet", "sample"]));
        assert!(err <= STEP_TOL, "step {k}: {err:e}");
        worst = worst.max(err);
    }
    println!("euler scale_model_input max abs err {worst:e}");
    // The first step starts from init_latents * init_noise_sigma.
    let init = case.tensor("init_latents");
    let scaled0 = (init.affine(s.init_noise_sigma(), 0.0)).unwrap();
    let err = max_abs_diff(&scaled0, &case.tensor("init_latents_scaled"));
    println!("euler init_latents * init_noise_sigma max abs err {err:e}");
    assert!(err <= 1e-5);
}

#[test]
fn ddim_spacing_follows_diffusers_formulas() {
    let base = model_config(); // N = 1000, steps_offset 1
    let ts = |overrides: Value, n: usize| ddim(&with(&base, overrides), n).timesteps().to_vec();

    // leading: arange(n) * (N // n), reversed, + steps_offset.
    assert_eq!(
        ts(json!({}), 10),
        vec![901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
    );
    assert_eq!(
        ts(json!({"steps_offset": 0}), 4),
        vec![750.0, 500.0, 250.0, 0.0]
    );
    assert_eq!(ts(json!({}), 3), vec![667.0, 334.0, 1.0]);
    // trailing: round(arange(N, 0, -N / n)) - 1 (round half to even).
    assert_eq!(
        ts(json!({"timestep_spacing": "trailing"}), 10),
        vec![999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0, 199.0, 99.0]
    );
    assert_eq!(
        ts(json!({"timestep_spacing": "trailing"}), 16),
        vec![
            999.0, 937.0, 874.0, 811.0, 749.0, 687.0, 624.0, 561.0, 499.0, 437.0, 374.0, 311.0,
            249.0, 187.0, 124.0, 61.0
        ]
    );
    // numpy quirk kept by diffusers: 61 trailing steps give 62 timesteps, the last being -1.
    let t61 = ts(json!({"timestep_spacing": "trailing"}), 61);
    assert_eq!(t61.len(), 62);
    assert_eq!(*t61.last().unwrap(), -1.0);
    // linspace: round(linspace(0, N - 1, n)) reversed (round half to even).
    assert_eq!(
        ts(json!({"timestep_spacing": "linspace"}), 10),
        vec![999.0, 888.0, 777.0, 666.0, 555.0, 444.0, 333.0, 222.0, 111.0, 0.0]
    );
    assert_eq!(
        ts(json!({"timestep_spacing": "linspace"}), 3),
        vec![999.0, 500.0, 0.0]
    );
    assert_eq!(
        ts(json!({"timestep_spacing": "linspace"}), 5),
        vec![999.0, 749.0, 500.0, 250.0, 0.0]
    );
    // One step, and all training steps.
    assert_eq!(ts(json!({}), 1), vec![1.0]);
    let all = ts(json!({"steps_offset": 0}), 1000);
    assert_eq!(all.len(), 1000);
    assert_eq!((all[0], all[999]), (999.0, 0.0));
    // A missing timestep_spacing means DDIM's default, leading.
    let mut raw = base.raw.clone();
    raw.as_object_mut().unwrap().remove("timestep_spacing");
    let no_spacing = SchedulerConfig::from_value(raw).unwrap();
    assert_eq!(ddim(&no_spacing, 2).timesteps(), &[501.0, 1.0]);
}

#[test]
fn euler_spacing_follows_diffusers_formulas() {
    let base = model_config();
    let euler = |overrides: Value, n: usize| {
        EulerDiscreteScheduler::new(&with(&base, overrides), n).unwrap()
    };
    let ac = ddim(&base, 10).alphas_cumprod().to_vec();
    let train_sigma = |t: usize| ((1.0 - ac[t]) / ac[t]).sqrt();

    // linspace: float32 linspace(0, N - 1, n), not rounded; sigmas interpolated linearly.
    let s = euler(json!({"timestep_spacing": "linspace"}), 3);
    assert_eq!(s.timesteps(), &[999.0, 499.5, 0.0]);
    let mid = ((train_sigma(499) as f64 + train_sigma(500) as f64) / 2.0) as f32;
    assert_eq!(
        s.sigmas(),
        &[train_sigma(999), mid, train_sigma(0), 0.0][..]
    );
    // linspace / trailing: init_noise_sigma = sigma_max.
    assert_eq!(s.init_noise_sigma(), train_sigma(999) as f64);

    // trailing.
    let s = euler(json!({"timestep_spacing": "trailing"}), 4);
    assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
    assert_eq!(s.init_noise_sigma(), train_sigma(999) as f64);

    // leading + steps_offset: init_noise_sigma = sqrt(sigma_max^2 + 1).
    let s = euler(json!({}), 4);
    assert_eq!(s.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    let sm = train_sigma(751);
    assert_eq!(
        s.sigmas(),
        &[sm, train_sigma(501), train_sigma(251), train_sigma(1), 0.0][..]
    );
    assert_eq!(s.init_noise_sigma(), (sm * sm + 1.0).sqrt() as f64);

    // final_sigmas_type sigma_min ends at the smallest training sigma.
    let s = euler(json!({"final_sigmas_type": "sigma_min"}), 4);
    assert_eq!(*s.sigmas().last().unwrap(), train_sigma(0));

    // A config without timestep_spacing gets Euler's default, linspace.
    let mut raw = base.raw.clone();
    raw.as_object_mut().unwrap().remove("timestep_spacing");
    let s = EulerDiscreteScheduler::new(&SchedulerConfig::from_value(raw).unwrap(), 4).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
}

fn scalar(x: f32) -> Tensor {
    Tensor::new(&[x], &Device::Cpu).unwrap()
}

fn value(t: &Tensor) -> f64 {
    t.to_vec1::<f32>().unwrap()[0] as f64
}

/// With the model output consistent with a known (x0, eps), one DDIM step must land exactly on
/// sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, for every prediction type.
#[test]
fn ddim_prediction_types_on_a_hand_worked_example() {
    let (x0, eps) = (0.3f64, -0.7f64);
    for pred in ["epsilon", "v_prediction", "sample"] {
        let config = with(&model_config(), json!({"prediction_type": pred}));
        let mut s = ddim(&config, 10);
        let ac = s.alphas_cumprod().to_vec();
        // Step 2: t = 701, prev t = 601.
        let (a, a_prev) = (ac[701] as f64, ac[601] as f64);
        let x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps;
        let out = match pred {
            "epsilon" => eps,
            "sample" => x0,
            _ => a.sqrt() * eps - (1.0 - a).sqrt() * x0,
        };
        let prev = s
            .step(
                &scalar(out as f32),
                2,
                &scalar(x_t as f32),
                &mut NoiseGenerator::new(0),
            )
            .unwrap();
        let want = a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps;
        assert!(
            (value(&prev) - want).abs() < 2e-6,
            "{pred}: {} vs {want}",
            value(&prev)
        );
        // Last step: prev timestep < 0 uses final_alpha_cumprod (= alphas_cumprod[0] here).
        let a = ac[1] as f64;
        let a_final = s.final_alpha_cumprod() as f64;
        let x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps;
        let out = match pred {
            "epsilon" => eps,
            "sample" => x0,
            _ => a.sqrt() * eps - (1.0 - a).sqrt() * x0,
        };
        let prev = s
            .step(
                &scalar(out as f32),
                9,
                &scalar(x_t as f32),
                &mut NoiseGenerator::new(0),
            )
            .unwrap();
        let want = a_final.sqrt() * x0 + (1.0 - a_final).sqrt() * eps;
        assert!(
            (value(&prev) - want).abs() < 2e-6,
            "{pred} last: {}",
            value(&prev)
        );
    }
    // set_alpha_to_one: the last step returns x0 itself.
    let config = with(&model_config(), json!({"set_alpha_to_one": true}));
    let mut s = ddim(&config, 10);
    let a = s.alphas_cumprod()[1] as f64;
    let x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps;
    let prev = s
        .step(
            &scalar(eps as f32),
            9,
            &scalar(x_t as f32),
            &mut NoiseGenerator::new(0),
        )
        .unwrap();
    assert!((value(&prev) - x0).abs() < 2e-6);
}

/// Euler (k-diffusion parameterisation x = x0 + sigma * eps, model input x / sqrt(sigma^2 + 1)):
/// with a consistent model output, one step lands on x0 + sigma_next * eps.
#[test]
fn euler_prediction_types_on_a_hand_worked_example() {
    let (x0, eps) = (0.3f64, -0.7f64);
    for pred in ["epsilon", "v_prediction", "sample"] {
        let config = with(&model_config(), json!({"prediction_type": pred}));
        let mut s = EulerDiscreteScheduler::new(&config, 10).unwrap();
        for i in [0usize, 4, 9] {
            let (sig, sig_next) = (s.sigmas()[i] as f64, s.sigmas()[i + 1] as f64);
            let x = x0 + sig * eps;
            let (c_in_a, c_in_s) = (
                1.0 / (sig * sig + 1.0).sqrt(),
                sig / (sig * sig + 1.0).sqrt(),
            );
            let out = match pred {
                "epsilon" => eps,
                "sample" => x0,
                // v for the scaled input alpha * x0 + sigma_t * eps.
                _ => c_in_a * eps - c_in_s * x0,
            };
            let prev = s
                .step(
                    &scalar(out as f32),
                    i,
                    &scalar(x as f32),
                    &mut NoiseGenerator::new(0),
                )
                .unwrap();
            let want = x0 + sig_next * eps;
            assert!(
                (value(&prev) - want).abs() < 1e-5 * (1.0 + sig),
                "{pred} step {i}: {} vs {want}",
                value(&prev)
            );
        }
    }
}

#[test]
fn ddim_eta_draws_variance_noise() {
    let config = model_config();
    let options = SchedulerOptions { eta: 1.0 };
    let mut s = DdimScheduler::new(&config, 10, &options).unwrap();
    let ac = s.alphas_cumprod().to_vec();
    let (a, a_prev) = (ac[501], ac[401]);
    let sample = Tensor::new(&[[0.5f32, -1.0]], &Device::Cpu).unwrap();
    let out = Tensor::new(&[[0.1f32, 0.2]], &Device::Cpu).unwrap();
    let zeros = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).unwrap();
    let ones = Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap();
    let mut replay = ReplayNoise::new(vec![zeros, ones]);
    let base = s.step(&out, 4, &sample, &mut replay).unwrap();
    let noisy = s.step(&out, 4, &sample, &mut replay).unwrap();
    // Both recorded noises consumed.
    assert!(s.step(&out, 4, &sample, &mut replay).is_err());
    let variance = ((1.0 - a_prev) / (1.0 - a)) * (1.0 - a / a_prev);
    let d = tensor_f32s(&(noisy - &base).unwrap());
    for x in d {
        assert!(
            (x - variance.sqrt()).abs() < 1e-6,
            "{x} vs {}",
            variance.sqrt()
        );
    }
    // eta = 0 draws nothing.
    let mut empty = ReplayNoise::new(vec![]);
    let mut det = ddim(&config, 10);
    det.step(&out, 4, &sample, &mut empty).unwrap();
}

#[test]
fn ddim_clip_sample_clamps_x0() {
    let config = with(
        &model_config(),
        json!({"clip_sample": true, "clip_sample_range": 1.0, "prediction_type": "sample"}),
    );
    let mut s = ddim(&config, 10);
    let a = s.alphas_cumprod()[701] as f64;
    let a_prev = s.alphas_cumprod()[601] as f64;
    let x_t = 0.1f64;
    // Model says x0 = 5, clipped to 1; eps is derived from the clipped-before value (diffusers
    // computes pred_epsilon before clipping).
    let eps = (x_t - a.sqrt() * 5.0) / (1.0 - a).sqrt();
    let prev = s
        .step(
            &scalar(5.0),
            2,
            &scalar(x_t as f32),
            &mut NoiseGenerator::new(0),
        )
        .unwrap();
    let want = a_prev.sqrt() * 1.0 + (1.0 - a_prev).sqrt() * eps;
    assert!(
        (value(&prev) - want).abs() < 1e-5,
        "{} vs {want}",
        value(&prev)
    );
}

#[test]
fn unknown_names_and_bad_requests_are_errors() {
    let config = model_config();
    let opts = SchedulerOptions::default();
    match build("k_lms", &config, 10, &opts) {
        Err(SchedulerError::UnknownName { name, valid }) => {
            assert_eq!(name, "k_lms");
            assert_eq!(valid, SCHEDULER_NAMES.to_vec());
            let msg = SchedulerError::UnknownName { name, valid }.to_string();
            assert!(msg.contains("ddim") && msg.contains("euler"), "{msg}");
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("k_lms should be unknown"),
    }
    let pndm = with(&config, json!({"_class_name": "PNDMScheduler"}));
    assert!(matches!(
        build("", &pndm, 10, &opts),
        Err(SchedulerError::UnknownName { .. })
    ));
    let invalid = |r: Result<Box<dyn Scheduler>, SchedulerError>| {
        assert!(matches!(r, Err(SchedulerError::InvalidConfig(_))));
    };
    for name in ["ddim", "euler"] {
        invalid(build(name, &config, 0, &opts));
        invalid(build(name, &config, 1001, &opts));
        let mut s = build(name, &config, 10, &opts).unwrap();
        let x = scalar(1.0);
        assert!(s.scale_model_input(&x, 10).is_err());
        assert!(s.step(&x, 10, &x, &mut NoiseGenerator::new(0)).is_err());
        assert!(s.step(&x, 9, &x, &mut NoiseGenerator::new(0)).is_ok());
    }
    invalid(build(
        "ddim",
        &with(&config, json!({"thresholding": true})),
        10,
        &opts,
    ));
    invalid(build("ddim", &config, 10, &SchedulerOptions { eta: -0.5 }));
    invalid(build(
        "ddim",
        &config,
        10,
        &SchedulerOptions { eta: f64::NAN },
    ));
    invalid(build(
        "euler",
        &with(&config, json!({"use_karras_sigmas": true})),
        10,
        &opts,
    ));
    // leading + steps_offset past the last training timestep cannot index alphas_cumprod.
    invalid(build("ddim", &config, 1000, &opts));
    match config.with_overrides(&json!({"prediction_type": "flow"})) {
        Err(SchedulerError::InvalidConfig(m)) => {
            assert!(m.contains("prediction_type") && m.contains("flow"), "{m}")
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}
