//! Scheduler specs: schedules and single steps against recorded diffusers 0.42.1 runs (golden
//! cases in tests/fixtures), plus hand-worked spacing and prediction-type examples.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, model_dir, Case};
use serde_json::{json, Value};
use stepstream::rng::{NoiseGenerator, NoiseSource, ReplayNoise};
use stepstream::schedulers::ddim::DdimScheduler;
use stepstream::schedulers::ddpm::DdpmScheduler;
use stepstream::schedulers::dpm_solver::DpmSolverMultistepScheduler;
use stepstream::schedulers::euler::EulerDiscreteScheduler;
use stepstream::schedulers::euler_ancestral::EulerAncestralScheduler;
use stepstream::schedulers::unipc::UniPcScheduler;
use stepstream::schedulers::{
    build, config_for_name, name_for_class, Scheduler, SchedulerConfig, SchedulerError,
    SchedulerOptions, SCHEDULER_NAMES,
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

/// Every golden scheduler case (tiny SD 1.5) and the scheduler name that reproduces it. The
/// fixture copies are byte-identical to `shared/golden/cases/tiny-sd15` except that the two
/// DPM-Solver JSONs say `"lambda_min_clipped": null` where Python wrote `-Infinity` (not JSON;
/// serde_json refuses it); null means the default, which is -inf.
const GOLDEN: &[(&str, &str)] = &[
    ("ddim-10", "ddim"),
    ("euler-10", "euler"),
    ("euler-a-10", "euler_a"),
    ("dpmpp2m-10", "dpmpp_2m"),
    ("dpmpp2m-karras-10", "dpmpp_2m_karras"),
    ("pndm-10", "pndm"),
    ("lcm-4", "lcm"),
    ("unipc-10", "unipc"),
];

/// Replays recorded noise and counts the draws (to check a step draws exactly what diffusers did).
struct Counted {
    inner: ReplayNoise,
    draws: usize,
}

impl NoiseSource for Counted {
    fn randn(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        self.draws += 1;
        self.inner.randn(shape, device)
    }
}

/// The noise diffusers' `step` drew at executed step `k` (empty for deterministic samplers).
fn recorded_noise(case: &Case, k: usize) -> Vec<Tensor> {
    match case.step(k)["scheduler_noise"].as_array() {
        None => Vec::new(),
        Some(names) => names
            .iter()
            .map(|n| case.tensor(n.as_str().unwrap()))
            .collect(),
    }
}

/// Teacher-forced run over every executed step of `case` (a fresh scheduler fed the recorded
/// model output and sample of each step, and the recorded sampler noise); returns the max abs
/// error against the recorded post-step latents.
fn teacher_forced(case: &Case, scheduler: &mut dyn Scheduler) -> f32 {
    let mut worst = 0f32;
    for k in 0..case.num_steps() {
        let step_index = case.step(k)["step_index"].as_u64().unwrap() as usize;
        assert_eq!(
            scheduler.timesteps()[step_index],
            case.step(k)["timestep"].as_f64().unwrap(),
            "timestep of step {k}"
        );
        let noise = recorded_noise(case, k);
        let want_draws = noise.len();
        let mut source = Counted {
            inner: ReplayNoise::new(noise),
            draws: 0,
        };
        let out = scheduler
            .step(
                &case.step_tensor(k, &["scheduler_step", "model_output"]),
                step_index,
                &case.step_tensor(k, &["scheduler_step", "sample"]),
                &mut source,
            )
            .unwrap();
        assert_eq!(source.draws, want_draws, "noise draws at step {k}");
        let want = case.step_tensor(k, &["callback_in", "latents"]);
        let err = max_abs_diff(&out, &want);
        assert!(err <= STEP_TOL, "step {k}: max abs {err:e} > {STEP_TOL:e}");
        worst = worst.max(err);
    }
    worst
}

fn steps_of(case: &Case) -> usize {
    case.json["num_inference_steps"].as_u64().unwrap() as usize
}

#[test]
fn every_golden_schedule_matches_diffusers() {
    let config = model_config();
    for (case_name, name) in GOLDEN {
        let case = Case::load("tiny-sd15", case_name);
        let n = steps_of(&case);
        let s = build(name, &config, n, &SchedulerOptions::default()).unwrap();
        assert_eq!(s.name(), *name);
        let want = json_f64s(&case.json["timesteps"]);
        assert_eq!(s.timesteps(), want, "{case_name}: timesteps");
        assert_eq!(
            s.timesteps().len(),
            case.json["num_timesteps"].as_u64().unwrap() as usize,
            "{case_name}: num_timesteps"
        );
        let recorded: Vec<f64> = tensor_f32s(&case.tensor("schedule.timesteps"))
            .into_iter()
            .map(f64::from)
            .collect();
        assert_eq!(s.timesteps(), recorded, "{case_name}: schedule.timesteps");
        let want_sigma = case.json["scheduler"]["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (s.init_noise_sigma() - want_sigma).abs() <= 1e-6 * want_sigma,
            "{case_name}: init_noise_sigma {} vs {want_sigma}",
            s.init_noise_sigma()
        );
        // The case's own recorded config (its class, overrides applied) gives the same
        // schedule, under the name its class maps to ("" = the config's own class).
        let own = case_config(&case);
        assert!(name.starts_with(name_for_class(&own.class_name).unwrap()));
        let from_case = build("", &own, n, &SchedulerOptions::default()).unwrap();
        assert_eq!(from_case.timesteps(), s.timesteps(), "{case_name}");
        assert_eq!(from_case.init_noise_sigma(), s.init_noise_sigma());
    }
}

/// The float32 sigma tables of the sigma-based samplers against the recorded ones.
#[test]
fn golden_sigma_tables_match() {
    let config = model_config();
    let check = |case_name: &str, sigmas: &[f32]| {
        let case = Case::load("tiny-sd15", case_name);
        let want_json: Vec<f32> = json_f64s(&case.json["sigmas"])
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let want_tensor = tensor_f32s(&case.tensor("schedule.sigmas"));
        let (a, b) = (
            max_abs_vec(sigmas, &want_json),
            max_abs_vec(sigmas, &want_tensor),
        );
        println!("{case_name}: sigmas max abs err json {a:e}, tensor {b:e}");
        assert!(a <= 1e-6 && b <= 1e-6, "{case_name}: {a:e} {b:e}");
    };
    check(
        "euler-a-10",
        EulerAncestralScheduler::new(&config_for_name("euler_a", &config), 10)
            .unwrap()
            .sigmas(),
    );
    for (case_name, name) in [
        ("dpmpp2m-10", "dpmpp_2m"),
        ("dpmpp2m-karras-10", "dpmpp_2m_karras"),
    ] {
        let c = config_for_name(name, &config);
        check(
            case_name,
            DpmSolverMultistepScheduler::new(name, &c, 10)
                .unwrap()
                .sigmas(),
        );
    }
    check(
        "unipc-10",
        UniPcScheduler::new(&config_for_name("unipc", &config), 10)
            .unwrap()
            .sigmas(),
    );
}

#[test]
fn every_golden_case_teacher_forced_within_tolerance() {
    let config = model_config();
    for (case_name, name) in GOLDEN {
        let case = Case::load("tiny-sd15", case_name);
        let mut s = build(name, &config, steps_of(&case), &SchedulerOptions::default()).unwrap();
        let err = teacher_forced(&case, s.as_mut());
        println!("{case_name} ({name}): teacher-forced step max abs err {err:e}");
    }
}

/// Euler-type samplers scale the UNet input by 1 / sqrt(sigma^2 + 1); the others pass it as is.
#[test]
fn scale_model_input_matches_recorded_unet_input() {
    let config = model_config();
    for (case_name, name) in GOLDEN {
        let case = Case::load("tiny-sd15", case_name);
        let s = build(name, &config, steps_of(&case), &SchedulerOptions::default()).unwrap();
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
            assert!(err <= STEP_TOL, "{case_name} step {k}: {err:e}");
            worst = worst.max(err);
        }
        println!("{case_name}: scale_model_input max abs err {worst:e}");
    }
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
    // A model whose scheduler class we do not implement has no default name.
    let lms = with(&config, json!({"_class_name": "LMSDiscreteScheduler"}));
    assert!(matches!(
        build("", &lms, 10, &opts),
        Err(SchedulerError::UnknownName { .. })
    ));
    let invalid = |r: Result<Box<dyn Scheduler>, SchedulerError>| {
        assert!(matches!(r, Err(SchedulerError::InvalidConfig(_))));
    };
    for name in SCHEDULER_NAMES {
        invalid(build(name, &config, 0, &opts));
        invalid(build(name, &config, 1001, &opts));
        let mut s = build(name, &config, 4, &opts).unwrap();
        let len = s.timesteps().len();
        let x = scalar(1.0);
        assert!(s.scale_model_input(&x, len).is_err(), "{name}");
        assert!(
            s.step(&x, len, &x, &mut NoiseGenerator::new(0)).is_err(),
            "{name}"
        );
        assert!(
            s.step(&x, len - 1, &x, &mut NoiseGenerator::new(0)).is_ok(),
            "{name}"
        );
        // Dynamic thresholding is not implemented (Euler-type and PNDM have no such setting).
        if !["pndm", "euler", "euler_a"].contains(name) {
            invalid(build(
                name,
                &with(&config, json!({"thresholding": true})),
                4,
                &opts,
            ));
        }
    }
    // Settings diffusers rejects, or that we do not implement, are refused when building.
    invalid(build(
        "euler_a",
        &with(&config, json!({"prediction_type": "sample"})),
        10,
        &opts,
    ));
    invalid(build(
        "pndm",
        &with(&config, json!({"prediction_type": "sample"})),
        10,
        &opts,
    ));
    invalid(build("lcm", &config, 51, &opts));
    invalid(build(
        "lcm",
        &with(&config, json!({"original_inference_steps": 2000})),
        4,
        &opts,
    ));
    invalid(build(
        "ddpm",
        &with(&config, json!({"variance_type": "learned_range"})),
        10,
        &opts,
    ));
    invalid(build(
        "dpmpp_2m",
        &with(
            &config,
            json!({"use_lu_lambdas": true, "use_karras_sigmas": true}),
        ),
        10,
        &opts,
    ));
    invalid(build(
        "unipc",
        &with(&config, json!({"use_flow_sigmas": true})),
        10,
        &opts,
    ));
    // Another class's settings do not get in the way (diffusers ignores keys a class does not
    // take, and the name's overrides win), but a bad value of a key the scheduler reads does.
    let sa_solver = with(
        &config,
        json!({"algorithm_type": "data_prediction", "variance_type": "fixed_small"}),
    );
    for name in SCHEDULER_NAMES {
        assert!(build(name, &sa_solver, 10, &opts).is_ok(), "{name}");
    }
    invalid(build(
        "unipc",
        &with(&config, json!({"solver_order": 0})),
        10,
        &opts,
    ));
    invalid(build(
        "lcm",
        &with(&config, json!({"timestep_scaling": "big"})),
        4,
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

/// A deterministic "recorded" noise stream: the documented generator's draws for `shape`.
fn noise_tensors(seed: u64, shape: &[usize], n: usize) -> Vec<Tensor> {
    let mut g = NoiseGenerator::new(seed);
    (0..n)
        .map(|_| g.randn(shape, &Device::Cpu).unwrap())
        .collect()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    tensor_f32s(t).into_iter().map(f64::from).collect()
}

fn ddpm(config: &SchedulerConfig, steps: usize) -> DdpmScheduler {
    DdpmScheduler::new(&config_for_name("ddpm", config), steps).unwrap()
}

#[test]
fn ddpm_spacing_follows_diffusers_formulas() {
    let base = model_config(); // leading, steps_offset 1
    let ts = |overrides: Value, n: usize| ddpm(&with(&base, overrides), n).timesteps().to_vec();
    // DDPMScheduler.set_timesteps uses DDIM's three formulas.
    for (overrides, n) in [
        (json!({}), 10),
        (json!({"timestep_spacing": "trailing"}), 16),
        (json!({"timestep_spacing": "linspace"}), 5),
        (json!({"steps_offset": 0}), 1000),
    ] {
        assert_eq!(
            ts(overrides.clone(), n),
            ddim(&with(&base, overrides.clone()), n).timesteps(),
            "{overrides}"
        );
    }
    assert_eq!(
        ts(json!({}), 4),
        vec![751.0, 501.0, 251.0, 1.0],
        "leading + steps_offset"
    );
    // DDPMScheduler's own default spacing is leading.
    let mut raw = base.raw.clone();
    raw.as_object_mut().unwrap().remove("timestep_spacing");
    assert_eq!(
        ddpm(&SchedulerConfig::from_value(raw).unwrap(), 2).timesteps(),
        &[501.0, 1.0]
    );
}

/// DDPM teacher-forced against values derived here in float64, on a real trajectory of the tiny
/// model (the recorded DDIM run's model outputs and samples, which sit at the same timesteps
/// 901, 801, ..., 1) with a known noise stream.
///
/// With a_t = alphas_cumprod[t], a_p = alphas_cumprod[prev t] (1 after the last step),
/// alpha_t = a_t / a_p and beta_t = 1 - alpha_t (the effective beta of the skipped interval),
/// DDPM's ancestral step from x_t with noise prediction e and standard-normal z is the posterior
/// q(x_prev | x_t, x0) at x0 = (x_t - sqrt(1 - a_t) e) / sqrt(a_t):
///   mean = sqrt(a_p) beta_t / (1 - a_t) * x0 + sqrt(alpha_t) (1 - a_p) / (1 - a_t) * x_t
///   var  = (1 - a_p) / (1 - a_t) * beta_t            ("fixed_small")
///   x_prev = mean + sqrt(var) z                        (z drawn while t > 0)
#[test]
fn ddpm_teacher_forced_against_derived_posterior() {
    let case = Case::load("tiny-sd15", "ddim-10");
    let mut s = build("ddpm", &model_config(), 10, &SchedulerOptions::default()).unwrap();
    let ac: Vec<f64> = ddpm(&model_config(), 10)
        .alphas_cumprod()
        .iter()
        .map(|&a| a as f64)
        .collect();
    assert_eq!(s.timesteps(), json_f64s(&case.json["timesteps"]));
    let shape = case.tensor("init_latents").dims().to_vec();
    let zs = noise_tensors(5, &shape, 10);
    let mut worst = 0f64;
    for k in 0..case.num_steps() {
        let t = s.timesteps()[k] as usize;
        let a_t = ac[t];
        let a_p = if k + 1 < 10 {
            ac[s.timesteps()[k + 1] as usize]
        } else {
            1.0
        };
        let (alpha, beta) = (a_t / a_p, 1.0 - a_t / a_p);
        let e_t = case.step_tensor(k, &["scheduler_step", "model_output"]);
        let x_t = case.step_tensor(k, &["scheduler_step", "sample"]);
        let (e, x, z) = (f64s(&e_t), f64s(&x_t), f64s(&zs[k]));
        let var = (1.0 - a_p) / (1.0 - a_t) * beta;
        let want: Vec<f64> = (0..x.len())
            .map(|i| {
                let x0 = (x[i] - (1.0 - a_t).sqrt() * e[i]) / a_t.sqrt();
                a_p.sqrt() * beta / (1.0 - a_t) * x0
                    + alpha.sqrt() * (1.0 - a_p) / (1.0 - a_t) * x[i]
                    + var.sqrt() * z[i]
            })
            .collect();
        let mut one = Counted {
            inner: ReplayNoise::new(vec![zs[k].clone()]),
            draws: 0,
        };
        let got = f64s(&s.step(&e_t, k, &x_t, &mut one).unwrap());
        assert_eq!(one.draws, 1, "t = {t} > 0 draws noise");
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max);
        assert!(err <= STEP_TOL as f64, "step {k}: {err:e}");
        worst = worst.max(err);
    }
    println!("ddpm: teacher-forced step max abs err vs float64 derivation {worst:e}");
}

/// DDIM with eta = 1 is DDPM's ancestral sampler (the DDIM paper, section 4.1): the same
/// posterior variance, and sqrt(a_p) x0 + sqrt(1 - a_p - var) e equals the posterior mean.
#[test]
fn ddpm_equals_ddim_with_eta_one() {
    let case = Case::load("tiny-sd15", "ddim-10");
    let config = model_config();
    let mut p = build("ddpm", &config, 10, &SchedulerOptions::default()).unwrap();
    let mut d = build("ddim", &config, 10, &SchedulerOptions { eta: 1.0 }).unwrap();
    let shape = case.tensor("init_latents").dims().to_vec();
    let zs = noise_tensors(9, &shape, 10);
    let mut worst = 0f32;
    // Not the last step: there DDPM goes to alpha 1 while this DDIM config (set_alpha_to_one
    // false) goes to alphas_cumprod[0].
    for (k, z) in zs.iter().enumerate().take(9) {
        let e = case.step_tensor(k, &["scheduler_step", "model_output"]);
        let x = case.step_tensor(k, &["scheduler_step", "sample"]);
        let a = p
            .step(&e, k, &x, &mut ReplayNoise::new(vec![z.clone()]))
            .unwrap();
        let b = d
            .step(&e, k, &x, &mut ReplayNoise::new(vec![z.clone()]))
            .unwrap();
        let err = max_abs_diff(&a, &b);
        assert!(err <= STEP_TOL, "step {k}: {err:e}");
        worst = worst.max(err);
    }
    println!("ddpm vs ddim(eta=1): max abs diff {worst:e}");
}

#[test]
fn ddpm_last_step_at_t0_draws_nothing_and_returns_x0() {
    let config = with(&model_config(), json!({"timestep_spacing": "linspace"}));
    let mut s = build("ddpm", &config, 5, &SchedulerOptions::default()).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 749.0, 500.0, 250.0, 0.0]);
    let a0 = ddpm(&config, 5).alphas_cumprod()[0] as f64;
    let (x0, eps) = (0.3f64, -0.7f64);
    let x_t = a0.sqrt() * x0 + (1.0 - a0).sqrt() * eps;
    let out = s
        .step(
            &scalar(eps as f32),
            4,
            &scalar(x_t as f32),
            &mut ReplayNoise::new(vec![]),
        )
        .unwrap();
    assert!((value(&out) - x0).abs() < 1e-5, "{}", value(&out));
    // Other variance types: fixed_large uses sqrt(beta_t); fixed_small_log equals fixed_small.
    let base = ddpm(&model_config(), 10);
    let small = base.coefficients(3).unwrap();
    let log = ddpm(
        &with(&model_config(), json!({"variance_type": "fixed_small_log"})),
        10,
    )
    .coefficients(3)
    .unwrap();
    assert!((small.noise_coeff - log.noise_coeff).abs() <= 1e-6);
    let large = ddpm(
        &with(&model_config(), json!({"variance_type": "fixed_large"})),
        10,
    )
    .coefficients(3)
    .unwrap();
    let beta = 1.0 - small.alpha_prod_t as f64 / small.alpha_prod_t_prev as f64;
    assert!((large.noise_coeff as f64 - beta.sqrt()).abs() < 1e-6);
    assert!(large.noise_coeff > small.noise_coeff);
    // With every training step, the effective beta is the training beta.
    let all = ddpm(&with(&model_config(), json!({"steps_offset": 0})), 1000);
    let c = all.coefficients(500).unwrap(); // t = 499, prev 498
    let beta_499 = 1.0 - c.alpha_prod_t as f64 / c.alpha_prod_t_prev as f64;
    let betas = stepstream::schedulers::common::betas(&model_config()).unwrap();
    assert!((beta_499 - betas[499] as f64).abs() < 1e-6);
}

/// The VP-space samplers (DPM-Solver++ 2M, UniPC, PNDM): when the model output always agrees with
/// the same (x0, eps), the higher-order corrections vanish and every step lands exactly on
/// alpha_next * x0 + sigma_next * eps (the last one on x0), for every prediction type.
#[test]
fn multistep_samplers_are_exact_on_a_consistent_model() {
    let (x0, eps) = (0.3f64, -0.7f64);
    for pred in ["epsilon", "v_prediction"] {
        let config = with(&model_config(), json!({"prediction_type": pred}));
        for name in ["dpmpp_2m", "dpmpp_2m_karras", "unipc"] {
            let c = config_for_name(name, &config);
            let sigmas: Vec<f64> = if name == "unipc" {
                UniPcScheduler::new(&c, 10).unwrap().sigmas().to_vec()
            } else {
                DpmSolverMultistepScheduler::new(name, &c, 10)
                    .unwrap()
                    .sigmas()
                    .to_vec()
            }
            .into_iter()
            .map(f64::from)
            .collect();
            // VP form of sigma: alpha = 1 / sqrt(1 + sigma^2), sigma_t = sigma * alpha.
            let vp = |s: f64| (1.0 / (1.0 + s * s).sqrt(), s / (1.0 + s * s).sqrt());
            let x_at = |i: usize| {
                let (a, s) = vp(sigmas[i]);
                (a * x0 + s * eps) as f32
            };
            let out_at = |i: usize| {
                let (a, s) = vp(sigmas[i]);
                match pred {
                    "epsilon" => eps as f32,
                    _ => (a * eps - s * x0) as f32,
                }
            };
            let mut s = build(name, &config, 10, &SchedulerOptions::default()).unwrap();
            for i in 0..10 {
                let got = value(
                    &s.step(
                        &scalar(out_at(i)),
                        i,
                        &scalar(x_at(i)),
                        &mut ReplayNoise::new(vec![]),
                    )
                    .unwrap(),
                );
                let (a, sg) = vp(sigmas[i + 1]);
                let want = a * x0 + sg * eps;
                assert!(
                    (got - want).abs() < 1e-5,
                    "{name} {pred} step {i}: {got} vs {want}"
                );
            }
        }
        // PNDM: every linear multistep combination of equal noise predictions is that
        // prediction, so each step is the DDIM step to its previous timestep; step 1 restarts
        // from step 0's sample, so it lands where step 0 did, whatever sample it is given.
        // (With v_prediction diffusers combines the raw v of different timesteps, which is not
        // exact; only its first step is.)
        let steps = if pred == "epsilon" { usize::MAX } else { 1 };
        let mut s = build("pndm", &config, 10, &SchedulerOptions::default()).unwrap();
        let ac: Vec<f64> = ddim(&config, 10)
            .alphas_cumprod()
            .iter()
            .map(|&a| a as f64)
            .collect();
        let at = |t: f64| {
            let a = ac[t as usize];
            (a.sqrt() * x0 + (1.0 - a).sqrt() * eps, a)
        };
        let ts = s.timesteps().to_vec();
        let mut outs = Vec::new();
        for i in 0..ts.len().min(steps) {
            let (x, a) = at(ts[i]);
            let out = match pred {
                "epsilon" => eps,
                _ => a.sqrt() * eps - (1.0 - a).sqrt() * x0,
            };
            let given = if i == 1 { 123.0 } else { x as f32 };
            let got = value(
                &s.step(
                    &scalar(out as f32),
                    i,
                    &scalar(given),
                    &mut ReplayNoise::new(vec![]),
                )
                .unwrap(),
            );
            let prev_t = if i == 0 {
                ts[2]
            } else {
                ts.get(i + 1).copied().unwrap_or(-1.0)
            };
            let want = if prev_t >= 0.0 {
                at(prev_t).0
            } else {
                // set_alpha_to_one false: the final alpha is alphas_cumprod[0].
                at(0.0).0
            };
            assert!(
                (got - want).abs() < 2e-5,
                "pndm {pred} step {i}: {got} vs {want}"
            );
            outs.push(got);
        }
        if pred == "epsilon" {
            assert_eq!(outs[0], outs[1]);
        }
    }
}

/// Euler ancestral on a consistent model (x = x0 + sigma * eps): the deterministic part lands on
/// x0 + sigma_down * eps, and the drawn noise is added times sigma_up, where
/// sigma_up^2 + sigma_down^2 = sigma_next^2.
#[test]
fn euler_ancestral_on_a_hand_worked_example() {
    let (x0, eps, z) = (0.3f64, -0.7f64, 1.25f32);
    let config = model_config();
    let sigmas: Vec<f64> = EulerAncestralScheduler::new(&config, 10)
        .unwrap()
        .sigmas()
        .iter()
        .map(|&s| s as f64)
        .collect();
    let mut s = build("euler_a", &config, 10, &SchedulerOptions::default()).unwrap();
    let mut noise = ReplayNoise::new(vec![scalar(z); 10]);
    for i in 0..10 {
        let (from, to) = (sigmas[i], sigmas[i + 1]);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        assert!((up * up + down * down - to * to).abs() < 1e-9);
        let got = value(
            &s.step(
                &scalar(eps as f32),
                i,
                &scalar((x0 + from * eps) as f32),
                &mut noise,
            )
            .unwrap(),
        );
        let want = x0 + down * eps + up * z as f64;
        assert!(
            (got - want).abs() < 1e-5 * (1.0 + from),
            "step {i}: {got} vs {want}"
        );
    }
    // One draw per step, the last one included.
    assert!(noise.randn(&[1], &Device::Cpu).is_err());
}

/// LCM: the schedule is a subsample of the distillation schedule 999, 979, ..., 19; a step maps
/// the predicted x0 through the consistency boundary condition and re-noises it to the next
/// timestep (not after the last one).
#[test]
fn lcm_schedule_and_step_on_a_hand_worked_example() {
    let config = model_config();
    let ts = |n: usize, overrides: Value| {
        build(
            "lcm",
            &with(&config, overrides),
            n,
            &SchedulerOptions::default(),
        )
        .unwrap()
        .timesteps()
        .to_vec()
    };
    assert_eq!(ts(4, json!({})), vec![999.0, 759.0, 499.0, 259.0]);
    assert_eq!(ts(1, json!({})), vec![999.0]);
    assert_eq!(
        ts(8, json!({})),
        vec![999.0, 879.0, 759.0, 639.0, 499.0, 379.0, 259.0, 139.0]
    );
    assert_eq!(ts(50, json!({})).last(), Some(&19.0));
    assert_eq!(
        ts(2, json!({"original_inference_steps": 10})),
        vec![999.0, 499.0]
    );

    let mut s = build("lcm", &config, 4, &SchedulerOptions::default()).unwrap();
    let ac: Vec<f64> = ddim(&config, 10)
        .alphas_cumprod()
        .iter()
        .map(|&a| a as f64)
        .collect();
    let (x0, eps, z) = (0.3f64, -0.7f64, 0.9f32);
    let mut noise = ReplayNoise::new(vec![scalar(z); 3]);
    let t = [999usize, 759, 499, 259];
    for i in 0..4 {
        let a = ac[t[i]];
        let x = a.sqrt() * x0 + (1.0 - a).sqrt() * eps;
        let scaled = t[i] as f64 * 10.0;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();
        let denoised = c_out * x0 + c_skip * x;
        let want = if i < 3 {
            let a_next = ac[t[i + 1]];
            a_next.sqrt() * denoised + (1.0 - a_next).sqrt() * z as f64
        } else {
            denoised
        };
        let got = value(
            &s.step(&scalar(eps as f32), i, &scalar(x as f32), &mut noise)
                .unwrap(),
        );
        assert!((got - want).abs() < 2e-6, "step {i}: {got} vs {want}");
    }
    assert!(
        noise.randn(&[1], &Device::Cpu).is_err(),
        "3 draws for 4 steps"
    );
}

/// Multistep samplers keep their history when a callback replaces the latents between steps
/// (diffusers does not reset it): the step after a replacement is still a higher-order step.
/// Checked against DPM-Solver++(2M) written out here in float64 from the previous x0.
#[test]
fn multistep_history_survives_replaced_latents() {
    let case = Case::load("tiny-sd15", "dpmpp2m-10");
    let config = model_config();
    let mut s = build("dpmpp_2m", &config, 10, &SchedulerOptions::default()).unwrap();
    let c = config_for_name("dpmpp_2m", &config);
    let sig: Vec<f64> = DpmSolverMultistepScheduler::new("dpmpp_2m", &c, 10)
        .unwrap()
        .sigmas()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let vp = |s: f64| (1.0 / (1.0 + s * s).sqrt(), s / (1.0 + s * s).sqrt());
    let lambda = |s: f64| {
        let (a, sg) = vp(s);
        a.ln() - sg.ln()
    };
    let x0_of = |k: usize, x: &[f64], e: &[f64]| -> Vec<f64> {
        let (a, sg) = vp(sig[k]);
        x.iter().zip(e).map(|(x, e)| (x - sg * e) / a).collect()
    };
    let noise = &mut ReplayNoise::new(vec![]);
    // Steps 0..3 as recorded.
    for k in 0..3 {
        s.step(
            &case.step_tensor(k, &["scheduler_step", "model_output"]),
            k,
            &case.step_tensor(k, &["scheduler_step", "sample"]),
            noise,
        )
        .unwrap();
    }
    let prev_x0 = x0_of(
        2,
        &f64s(&case.step_tensor(2, &["scheduler_step", "sample"])),
        &f64s(&case.step_tensor(2, &["scheduler_step", "model_output"])),
    );
    // The callback halves the latents after step 2; step 3 sees them with the recorded output.
    let k = 3;
    let replaced = (case.step_tensor(k, &["scheduler_step", "sample"]) * 0.5).unwrap();
    let e = case.step_tensor(k, &["scheduler_step", "model_output"]);
    let got = f64s(&s.step(&e, k, &replaced, noise).unwrap());
    let (x, ev) = (f64s(&replaced), f64s(&e));
    let m0 = x0_of(k, &x, &ev);
    let (alpha_t, sigma_t) = vp(sig[k + 1]);
    let (_, sigma_s0) = vp(sig[k]);
    let h = lambda(sig[k + 1]) - lambda(sig[k]);
    let r0 = (lambda(sig[k]) - lambda(sig[k - 1])) / h;
    let want: Vec<f64> = (0..x.len())
        .map(|i| {
            let d1 = (m0[i] - prev_x0[i]) / r0;
            sigma_t / sigma_s0 * x[i]
                - alpha_t * ((-h).exp() - 1.0) * m0[i]
                - 0.5 * alpha_t * ((-h).exp() - 1.0) * d1
        })
        .collect();
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    println!("dpmpp_2m after replaced latents vs float64 2M formula: {err:e}");
    assert!(err <= STEP_TOL as f64, "{err:e}");

    // A scheduler that forgot the history would take a first-order step instead; and UniPC /
    // PNDM given the same replaced latents also differ from a fresh start.
    for name in ["dpmpp_2m", "unipc", "pndm"] {
        let case = Case::load(
            "tiny-sd15",
            match name {
                "dpmpp_2m" => "dpmpp2m-10",
                "unipc" => "unipc-10",
                _ => "pndm-10",
            },
        );
        let mut kept = build(name, &config, 10, &SchedulerOptions::default()).unwrap();
        for k in 0..3 {
            kept.step(
                &case.step_tensor(k, &["scheduler_step", "model_output"]),
                k,
                &case.step_tensor(k, &["scheduler_step", "sample"]),
                noise,
            )
            .unwrap();
        }
        let replaced = (case.step_tensor(3, &["scheduler_step", "sample"]) * 0.5).unwrap();
        let e = case.step_tensor(3, &["scheduler_step", "model_output"]);
        let with_history = kept.step(&e, 3, &replaced, noise).unwrap();
        let mut fresh = build(name, &config, 10, &SchedulerOptions::default()).unwrap();
        let without = fresh.step(&e, 3, &replaced, noise).unwrap();
        let d = max_abs_diff(&with_history, &without);
        assert!(d > 1e-3, "{name}: history made no difference ({d:e})");
    }
}
