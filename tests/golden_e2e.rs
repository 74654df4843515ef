//! Golden parity through the real gRPC server: the recorded diffusers runs of the tiny SD 1.5
//! and SDXL models, reproduced step by step by a remote client (tolerances from the golden
//! README: per-step and final latents 1e-5 relative to max(1, max|ref|); PNG within 1 of 255),
//! each case alone and all of them at once, sharing batched UNet calls with other sessions.

mod common;

use std::collections::HashMap;

use common::session::{ok_reply, Session};
use common::{rel_diff, unwire, wire, Case};
use stepstream::proto::{self, server_message::Kind};

const LATENTS_TOL: f32 = 1e-5;
const EMBEDS_TOL: f32 = 1e-5;

/// What the remote client does at a step (the case's recorded callback).
fn reply_for(case: &Case, step: &proto::StepEnd) -> proto::StepReply {
    let spec = &case.json["callback"]["spec"];
    let mut reply = ok_reply(step.step_index);
    let k = step.step_index as u64;
    match spec["type"].as_str().unwrap_or("none") {
        kind @ ("sd_cfg_cutoff" | "sdxl_cfg_cutoff") if spec["cutoff_step"].as_u64() == Some(k) => {
            // The client computes the cutoff itself, like SDCFGCutoffCallback.
            let ratio = spec["cutoff_step_ratio"].as_f64().unwrap();
            assert_eq!(
                stepstream::client::cutoff_step(step.num_timesteps as usize, ratio) as u64,
                k
            );
            // SDXLCFGCutoffCallback also keeps the conditional half of the added conditions.
            let names: &[&str] = if kind == "sdxl_cfg_cutoff" {
                &["prompt_embeds", "add_text_embeds", "add_time_ids"]
            } else {
                &["prompt_embeds"]
            };
            reply.guidance_scale = Some(0.0);
            reply.tensors = names
                .iter()
                .map(|n| {
                    let half = stepstream::client::conditional_half(&step.tensors[*n]).unwrap();
                    (n.to_string(), half)
                })
                .collect();
        }
        "scale_latents" if spec["step_index"].as_u64() == Some(k) => {
            let factor = spec["factor"].as_f64().unwrap();
            let l = unwire(&step.tensors["latents"]);
            reply.tensors = HashMap::from([("latents".to_string(), wire(&(l * factor).unwrap()))]);
        }
        "interrupt" if spec["step_index"].as_u64() == Some(k) => reply.interrupt = true,
        _ => {}
    }
    reply
}

fn scheduler_name(case: &Case) -> &'static str {
    match case.json["scheduler"]["class"].as_str().unwrap() {
        "DDIMScheduler" => "ddim",
        "EulerDiscreteScheduler" => "euler",
        other => panic!("no scheduler name for {other}"),
    }
}

async fn run_case(name: &str) {
    run_model_case("tiny-sd15", name).await
}

async fn run_model_case(model: &str, name: &str) {
    let server = common::server::start(common::server::Options {
        models: vec![(
            model.to_string(),
            stepstream::models::ModelSource::Dir(common::model_dir(model)),
        )],
        ..Default::default()
    })
    .await;
    let mut client = server.client().await;
    golden_run(&mut client, model, name).await;
}

/// What a golden run produced, byte for byte: each StepEnd's latents, the final latents, the PNG.
#[derive(PartialEq)]
struct Record {
    steps: Vec<Vec<u8>>,
    final_latents: Vec<u8>,
    png: Vec<u8>,
}

/// Runs golden case `name` of `model` through `client`, asserting diffusers' numbers at every step.
async fn golden_run(
    client: &mut stepstream::proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    model: &str,
    name: &str,
) -> Record {
    let case = Case::load(model, name);
    let tensor_inputs: Vec<String> = if model == "tiny-sdxl" {
        vec![
            "latents",
            "prompt_embeds",
            "add_text_embeds",
            "add_time_ids",
        ]
    } else {
        vec!["latents", "prompt_embeds", "negative_prompt_embeds"]
    }
    .into_iter()
    .map(String::from)
    .collect();
    let j = &case.json;
    let request = proto::GenerateRequest {
        model: model.to_string(),
        prompt: j["prompt"].as_str().unwrap().into(),
        negative_prompt: j["negative_prompt"].as_str().map(String::from),
        num_inference_steps: j["num_inference_steps"].as_u64().unwrap() as u32,
        guidance_scale: Some(j["guidance_scale"].as_f64().unwrap() as f32),
        width: Some(j["width"].as_u64().unwrap() as u32),
        height: Some(j["height"].as_u64().unwrap() as u32),
        scheduler: scheduler_name(&case).into(),
        latents: Some(wire(&case.tensor("init_latents"))),
        callback: Some(proto::CallbackOptions {
            tensor_inputs: tensor_inputs.clone(),
            ..Default::default()
        }),
        output: Some(proto::OutputOptions {
            format: proto::ImageFormat::Png as i32,
            return_latents: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut session = Session::start(client, request).await.expect("accepted");
    let Kind::Accepted(acc) = session.expect().await else {
        panic!("first event must be Accepted")
    };
    let want_ts: Vec<f64> = j["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(acc.timesteps, want_ts, "{name}: timesteps");

    let mut executed = Vec::new();
    let mut steps = Vec::new();
    let mut worst_latents = 0f32;
    let completed = loop {
        match session.expect().await {
            Kind::StepEnd(step) => {
                let k = executed.len();
                assert_eq!(
                    step.step_index as usize,
                    case.step(k)["step_index"].as_u64().unwrap() as usize
                );
                assert_eq!(step.timestep, case.step(k)["timestep"].as_f64().unwrap());
                assert_eq!(
                    step.do_classifier_free_guidance,
                    case.step(k)["cfg_applied"].as_bool().unwrap(),
                    "{name} step {k}: CFG decision"
                );
                steps.push(step.tensors["latents"].data.clone());
                let lat = unwire(&step.tensors["latents"]);
                let d = rel_diff(&lat, &case.step_tensor(k, &["callback_in", "latents"]));
                worst_latents = worst_latents.max(d);
                assert!(d <= LATENTS_TOL, "{name} step {k}: latents rel diff {d}");
                // The conditioning tensors as the callback sees them (None-valued ones are absent).
                for t in tensor_inputs.iter().filter(|t| *t != "latents") {
                    let recorded = &case.step(k)["callback_in"][t.as_str()];
                    match step.tensors.get(t.as_str()) {
                        Some(got) => {
                            let d = common::max_abs_diff(
                                &unwire(got),
                                &case.tensor(recorded.as_str().unwrap()),
                            );
                            assert!(d <= EMBEDS_TOL, "{name} step {k}: {t} diff {d}");
                        }
                        None => assert!(recorded.is_null(), "{name} step {k}: {t} missing"),
                    }
                }
                executed.push(step.step_index as u64);
                let reply = reply_for(&case, &step);
                session.reply(reply).await;
            }
            Kind::Completed(c) => break c,
            other => panic!("{name}: unexpected {other:?}"),
        }
    };
    let want_exec: Vec<u64> = j["executed_step_indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(executed, want_exec, "{name}: executed steps");
    assert_eq!(
        completed.interrupted,
        !j["skipped_step_indices"].as_array().unwrap().is_empty()
    );

    let final_latents = unwire(completed.latents.as_ref().expect("latents returned"));
    let d_final = rel_diff(&final_latents, &case.tensor("final.latents"));
    assert!(
        d_final <= LATENTS_TOL,
        "{name}: final latents rel diff {d_final}"
    );

    assert_eq!(completed.images.len(), 1);
    let png = image::load_from_memory(&completed.images[0].data)
        .unwrap()
        .to_rgb8();
    let want = case
        .tensor("image_u8")
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let got = png.as_raw();
    assert_eq!(got.len(), want.len());
    let (max_u8, differ) = got.iter().zip(&want).fold((0u8, 0usize), |(m, n), (a, b)| {
        let d = a.abs_diff(*b);
        (m.max(d), n + usize::from(d > 0))
    });
    assert!(max_u8 <= 1, "{name}: PNG max diff {max_u8}");
    println!(
        "{name}: worst step latents rel {worst_latents:.2e}, final latents rel {d_final:.2e}, \
         png max diff {max_u8} ({differ} values differ)"
    );
    Record {
        steps,
        final_latents: completed.latents.unwrap().data,
        png: completed.images[0].data.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddim_10_matches_diffusers_every_step() {
    run_case("ddim-10").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cfg_cutoff_by_a_remote_client_matches_diffusers() {
    run_case("ddim-10-cfg-cutoff").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latents_edited_by_a_remote_client_match_diffusers() {
    run_case("ddim-10-latents-edit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_skips_remaining_steps_and_still_decodes() {
    run_case("ddim-10-interrupt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_prompt_matches_diffusers() {
    run_case("neg-prompt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn euler_10_matches_diffusers_every_step() {
    run_case("euler-10").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guidance_one_runs_without_cfg_and_matches_diffusers() {
    run_case("ddim-10-guidance1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_euler_10_with_zero_negative_conditioning_matches_diffusers() {
    run_model_case("tiny-sdxl", "euler-10").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_cfg_cutoff_by_a_remote_client_matches_diffusers() {
    run_model_case("tiny-sdxl", "euler-10-cfg-cutoff").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_negative_prompt_matches_diffusers() {
    run_model_case("tiny-sdxl", "neg-prompt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdxl_empty_negative_prompt_is_encoded_not_zeroed() {
    run_model_case("tiny-sdxl", "neg-empty").await;
}

/// Every golden case above, as `(model, case)`.
const CASES: &[(&str, &str)] = &[
    ("tiny-sd15", "ddim-10"),
    ("tiny-sd15", "ddim-10-cfg-cutoff"),
    ("tiny-sd15", "ddim-10-latents-edit"),
    ("tiny-sd15", "ddim-10-interrupt"),
    ("tiny-sd15", "neg-prompt"),
    ("tiny-sd15", "euler-10"),
    ("tiny-sd15", "ddim-10-guidance1"),
    ("tiny-sdxl", "euler-10"),
    ("tiny-sdxl", "euler-10-cfg-cutoff"),
    ("tiny-sdxl", "neg-prompt"),
    ("tiny-sdxl", "neg-empty"),
];

/// Sessions that share the golden cases' batches: other schedulers, guidance 1 (no CFG), two
/// images, observe-only; they only read.
fn bystander(model: &str, i: usize) -> proto::GenerateRequest {
    let (scheduler, guidance, images) = match i % 4 {
        0 => ("euler_a", 7.5, 1),
        1 => ("dpmpp_2m", 1.0, 1),
        2 => ("ddim", 5.0, 2),
        _ => ("unipc", 1.0, 2),
    };
    proto::GenerateRequest {
        model: model.into(),
        prompt: format!("bystander {i}"),
        num_inference_steps: 7 + i as u32,
        guidance_scale: Some(guidance),
        num_images_per_prompt: images,
        scheduler: scheduler.into(),
        seed: Some(i as u64),
        callback: Some(proto::CallbackOptions {
            tensor_inputs: vec!["latents".into()],
            observe_only: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_cases_run_together_give_diffusers_numbers_bit_identical_to_their_solo_runs() {
    let server = common::server::start(common::server::Options {
        models: common::server::both_models(),
        max_sessions: 32,
        max_batch: 64,
        ..Default::default()
    })
    .await;
    // Each case alone first: the reference for its concurrent run.
    let mut client = server.client().await;
    let mut solo = Vec::new();
    for (model, name) in CASES {
        solo.push(golden_run(&mut client, model, name).await);
    }
    let calls_before = server.metrics.unet_rows.count();
    let rows_before = server.metrics.unet_rows.sum();

    // Then every case at once, with bystanders of both models sharing their batches.
    let mut tasks = Vec::new();
    for (i, model) in ["tiny-sd15", "tiny-sdxl"]
        .iter()
        .cycle()
        .take(8)
        .enumerate()
    {
        let mut c = server.client().await;
        let req = bystander(model, i);
        tasks.push(tokio::spawn(async move {
            let mut s = Session::start(&mut c, req).await.unwrap();
            s.until_completed().await;
            None
        }));
    }
    for (model, name) in CASES {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            Some(golden_run(&mut c, model, name).await)
        }));
    }
    let mut together = Vec::new();
    for t in tasks {
        if let Some(r) = t.await.expect("a session task panicked") {
            together.push(r);
        }
    }
    for ((model, name), (alone, shared)) in CASES.iter().zip(solo.iter().zip(&together)) {
        assert_eq!(alone.steps.len(), shared.steps.len(), "{model}/{name}");
        for (k, (a, b)) in alone.steps.iter().zip(&shared.steps).enumerate() {
            assert!(
                a == b,
                "{model}/{name} step {k}: latents differ from the solo run"
            );
        }
        assert!(
            alone.final_latents == shared.final_latents,
            "{model}/{name}: final latents differ from the solo run"
        );
        assert!(alone.png == shared.png, "{model}/{name}: PNG differs");
    }
    // The cases really shared UNet calls: more rows per call than any one session has.
    let calls = server.metrics.unet_rows.count() - calls_before;
    let rows = server.metrics.unet_rows.sum() - rows_before;
    let mean = rows / calls as f64;
    println!("{calls} UNet calls, {mean:.2} rows per call");
    assert!(
        mean > 4.0,
        "mean rows per UNet call {mean}: the sessions were not batched"
    );
}
