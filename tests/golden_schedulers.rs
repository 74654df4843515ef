//! The schedulers of issue 3 free-running against diffusers 0.42.1 (tiny SD 1.5 golden cases):
//! the deterministic ones through the real gRPC server, step by step, as a remote client sees
//! them; the stochastic ones (which diffusers seeds with torch's generator) through the pipeline
//! with the recorded sampler noise replayed, plus a seed-reproducibility run over gRPC.
//! Tolerances from the golden README: per-step and final latents 1e-5 relative to
//! max(1, max|ref|); decoded float image 1e-5; PNG within 1 of 255.

mod common;

use candle_core::{DType, Device, Tensor};
use common::session::{ok_reply, Session};
use common::{max_abs_diff, model_dir, rel_diff, unwire, wire, Case};
use stepstream::models::pipeline_model::StableDiffusionModel;
use stepstream::models::ModelSource;
use stepstream::pipeline::sd::{self, GenerateParams};
use stepstream::pipeline::{CallbackError, StepCallback, StepControl, StepState};
use stepstream::proto::{self, server_message::Kind};
use stepstream::rng::ReplayNoise;
use tonic::Code;

const LATENTS_TOL: f32 = 1e-5;
const IMAGE_TOL: f32 = 1e-5;

fn json_f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn request(case: &Case, scheduler: &str) -> proto::GenerateRequest {
    let j = &case.json;
    proto::GenerateRequest {
        prompt: j["prompt"].as_str().unwrap().into(),
        negative_prompt: j["negative_prompt"].as_str().map(String::from),
        num_inference_steps: j["num_inference_steps"].as_u64().unwrap() as u32,
        guidance_scale: Some(j["guidance_scale"].as_f64().unwrap() as f32),
        width: Some(j["width"].as_u64().unwrap() as u32),
        height: Some(j["height"].as_u64().unwrap() as u32),
        scheduler: scheduler.into(),
        latents: Some(wire(&case.tensor("init_latents"))),
        callback: Some(proto::CallbackOptions {
            tensor_inputs: vec!["latents".into()],
            ..Default::default()
        }),
        output: Some(proto::OutputOptions {
            format: proto::ImageFormat::Png as i32,
            return_latents: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// max |PNG - recorded image_u8| and how many values differ.
fn png_diff(case: &Case, png: &[u8]) -> (u8, usize) {
    let got = image::load_from_memory(png).unwrap().to_rgb8();
    let want = case
        .tensor("image_u8")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert_eq!(got.as_raw().len(), want.len());
    got.as_raw()
        .iter()
        .zip(&want)
        .fold((0u8, 0usize), |(m, n), (a, b)| {
            let d = a.abs_diff(*b);
            (m.max(d), n + usize::from(d > 0))
        })
}

/// A deterministic scheduler's golden case, free-running through the gRPC server: every step's
/// latents as the remote client receives them, the final latents and the PNG.
async fn run_over_grpc(case_name: &str, scheduler: &str) {
    let case = Case::load("tiny-sd15", case_name);
    let server = common::server::start(Default::default()).await;
    let mut client = server.client().await;
    let mut session = Session::start(&mut client, request(&case, scheduler))
        .await
        .expect("accepted");
    let Kind::Accepted(acc) = session.expect().await else {
        panic!("first event must be Accepted")
    };
    let want_ts = json_f64s(&case.json["timesteps"]);
    assert_eq!(acc.timesteps, want_ts, "{case_name}: timesteps");

    let num_timesteps = case.json["num_timesteps"].as_u64().unwrap() as usize;
    let mut worst = 0f32;
    let mut k = 0;
    let completed = loop {
        match session.expect().await {
            Kind::StepEnd(step) => {
                assert_eq!(step.step_index as usize, k);
                assert_eq!(step.timestep, want_ts[k], "{case_name} step {k}");
                assert_eq!(step.num_timesteps as usize, num_timesteps);
                let lat = unwire(&step.tensors["latents"]);
                let d = rel_diff(&lat, &case.step_tensor(k, &["callback_in", "latents"]));
                assert!(d <= LATENTS_TOL, "{case_name} step {k}: latents rel {d:e}");
                worst = worst.max(d);
                session.reply(ok_reply(step.step_index)).await;
                k += 1;
            }
            Kind::Completed(c) => break c,
            other => panic!("{case_name}: unexpected {other:?}"),
        }
    };
    assert_eq!(k, case.num_steps(), "{case_name}: executed steps");
    let final_latents = unwire(completed.latents.as_ref().expect("latents returned"));
    let d_final = rel_diff(&final_latents, &case.tensor("final.latents"));
    assert!(d_final <= LATENTS_TOL, "{case_name}: final rel {d_final:e}");
    assert_eq!(completed.images.len(), 1);
    let (max_u8, differ) = png_diff(&case, &completed.images[0].data);
    assert!(max_u8 <= 1, "{case_name}: PNG max diff {max_u8}");
    println!(
        "{case_name} ({scheduler}, gRPC): worst step latents rel {worst:.2e}, final latents rel \
         {d_final:.2e}, png max diff {max_u8} ({differ} values differ)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpmpp_2m_matches_diffusers_every_step_over_grpc() {
    run_over_grpc("dpmpp2m-10", "dpmpp_2m").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpmpp_2m_karras_matches_diffusers_every_step_over_grpc() {
    run_over_grpc("dpmpp2m-karras-10", "dpmpp_2m_karras").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pndm_matches_diffusers_every_step_over_grpc() {
    // 10 steps give 11 timesteps (the first target timestep is visited twice).
    run_over_grpc("pndm-10", "pndm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unipc_matches_diffusers_every_step_over_grpc() {
    run_over_grpc("unipc-10", "unipc").await;
}

fn model() -> StableDiffusionModel {
    StableDiffusionModel::load(
        "tiny-sd15".into(),
        &ModelSource::Dir(model_dir("tiny-sd15")),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

/// Compares every step's post-step latents with the recorded ones.
struct Compare<'a> {
    case: &'a Case,
    worst: f32,
    steps: usize,
}

impl StepCallback for Compare<'_> {
    fn wants(&self, _: usize) -> bool {
        true
    }
    fn on_step_end(&mut self, s: &StepState<'_>) -> Result<StepControl, CallbackError> {
        let k = s.step_index;
        assert_eq!(
            s.timestep,
            self.case.step(k)["timestep"].as_f64().unwrap(),
            "step {k}"
        );
        let d = rel_diff(
            &s.tensors["latents"],
            &self.case.step_tensor(k, &["callback_in", "latents"]),
        );
        assert!(d <= LATENTS_TOL, "step {k}: latents rel {d:e}");
        self.worst = self.worst.max(d);
        self.steps += 1;
        Ok(StepControl::default())
    }
}

/// A stochastic scheduler's golden case, free-running through the pipeline with diffusers'
/// recorded sampler noise replayed in order: every step's latents, the final latents and the
/// decoded float image.
fn run_with_replayed_noise(case_name: &str, scheduler: &str) {
    let case = Case::load("tiny-sd15", case_name);
    let m = model();
    let j = &case.json;
    let params = GenerateParams {
        prompt: j["prompt"].as_str().unwrap().into(),
        negative_prompt: j["negative_prompt"].as_str().map(String::from),
        prompt_embeds: None,
        negative_prompt_embeds: None,
        num_inference_steps: j["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: j["guidance_scale"].as_f64().unwrap(),
        guidance_rescale: 0.0,
        width: 64,
        height: 64,
        seed: 0,
        scheduler: scheduler.into(),
        num_images_per_prompt: 1,
        latents: Some(case.tensor("init_latents")),
        eta: 0.0,
        decode: false,
        loras: Vec::new(),
        guidance_plan: Default::default(),
    };
    let noise: Vec<Tensor> = (0..case.num_steps())
        .flat_map(|k| {
            case.step(k)["scheduler_noise"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|n| case.tensor(n.as_str().unwrap()))
        .collect();
    let draws = noise.len();
    let mut prepared = sd::prepare(&m, &params).unwrap();
    assert_eq!(prepared.timesteps(), json_f64s(&j["timesteps"]));
    prepared.set_noise_source(Box::new(ReplayNoise::new(noise)));
    let mut cb = Compare {
        case: &case,
        worst: 0.0,
        steps: 0,
    };
    let out = prepared.run(&mut cb).unwrap();
    assert_eq!(cb.steps, case.num_steps());
    let d_final = rel_diff(&out.latents, &case.tensor("final.latents"));
    assert!(d_final <= LATENTS_TOL, "{case_name}: final rel {d_final:e}");
    let image = sd::decode_to_unit(&m, &out.latents)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    let d_image = max_abs_diff(&image, &case.tensor("image"));
    assert!(d_image <= IMAGE_TOL, "{case_name}: image {d_image:e}");
    println!(
        "{case_name} ({scheduler}, pipeline, {draws} replayed noise tensors): worst step latents \
         rel {:.2e}, final latents rel {d_final:.2e}, image max abs {d_image:.2e}",
        cb.worst
    );
}

#[test]
fn euler_a_matches_diffusers_with_replayed_noise() {
    run_with_replayed_noise("euler-a-10", "euler_a");
}

#[test]
fn lcm_matches_diffusers_with_replayed_noise() {
    run_with_replayed_noise("lcm-4", "lcm");
}

/// Over gRPC the stochastic samplers draw their noise from the request's seed (the documented
/// generator): the same seed gives the same image, another seed another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stochastic_samplers_reproduce_their_image_from_the_seed() {
    let case = Case::load("tiny-sd15", "euler-a-10");
    let server = common::server::start(Default::default()).await;
    let client = server.client().await;
    for (scheduler, steps) in [("euler_a", 6), ("lcm", 4), ("ddpm", 6)] {
        let run = |seed: u64| {
            let mut client = client.clone();
            let req = proto::GenerateRequest {
                seed: Some(seed),
                num_inference_steps: steps,
                callback: None,
                latents: None,
                ..request(&case, scheduler)
            };
            async move { client.generate_once(req).await.unwrap().into_inner() }
        };
        let (a, b, c) = (run(42).await, run(42).await, run(43).await);
        assert_eq!(a.seed, 42);
        let lat = |x: &proto::Completed| unwire(x.latents.as_ref().unwrap());
        assert_eq!(a.images[0].data, b.images[0].data, "{scheduler}: same seed");
        assert_eq!(max_abs_diff(&lat(&a), &lat(&b)), 0.0, "{scheduler}");
        assert!(max_abs_diff(&lat(&a), &lat(&c)) > 1e-3, "{scheduler}");
        // Same initial latents, other sampler noise: only the sampler's draws differ.
        let fixed = |seed: u64| {
            let mut client = client.clone();
            let req = proto::GenerateRequest {
                seed: Some(seed),
                num_inference_steps: steps,
                callback: None,
                ..request(&case, scheduler)
            };
            async move { client.generate_once(req).await.unwrap().into_inner() }
        };
        let (d, e) = (fixed(1).await, fixed(2).await);
        assert!(
            max_abs_diff(&lat(&d), &lat(&e)) > 1e-3,
            "{scheduler}: the seed drives the sampler noise"
        );
    }
}

/// Every name works over the wire; an unknown one is INVALID_ARGUMENT listing all nine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scheduler_name_runs_over_grpc_and_unknown_names_are_refused() {
    let case = Case::load("tiny-sd15", "ddim-10");
    let server = common::server::start(Default::default()).await;
    let mut client = server.client().await;
    let models = client
        .list_models(proto::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names = models.models[0].schedulers.clone();
    assert_eq!(names, stepstream::schedulers::SCHEDULER_NAMES.to_vec());
    for name in &names {
        let req = proto::GenerateRequest {
            seed: Some(7),
            num_inference_steps: 3,
            callback: None,
            ..request(&case, name)
        };
        let done = client.generate_once(req).await.unwrap().into_inner();
        let lat = unwire(done.latents.as_ref().unwrap());
        let finite = lat
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite());
        assert!(finite, "{name}: non-finite latents");
        assert_eq!(done.images.len(), 1, "{name}");
    }
    let err = client
        .generate_once(proto::GenerateRequest {
            scheduler: "k_lms".into(),
            ..request(&case, "")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for name in &names {
        assert!(err.message().contains(name.as_str()), "{}", err.message());
    }
}
