//! Callback phases (`CallbackOptions.phases`) and step selections after Accepted
//! (`CallbackOptions.await_steps`): a STEP_BEGIN change applies to its own step, AFTER_GUIDANCE
//! carries diffusers' guided noise prediction, its two halves and each scheduler's own x0, and a
//! replaced noise prediction equals diffusers editing it before `scheduler.step`; a client picks
//! its steps from the real timestep count, with no guess.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::session::{ok_reply, reply_to, Session};
use common::{png_max_diff, rel_diff, unwire, wire, Case};
use stepstream::proto::{self, client_message, server_message::Kind, CallbackPhase};
use stepstream::schedulers::{self, SchedulerConfig, SchedulerOptions};
use tonic::Code;

/// The golden README's tolerance (max |a - r| / max(1, max |r|)).
const TOL: f32 = 1e-5;

const AFTER_GUIDANCE: [&str; 5] = [
    "latents",
    "noise_pred",
    "noise_pred_uncond",
    "noise_pred_text",
    "pred_original_sample",
];

async fn server() -> common::server::TestServer {
    common::server::start(common::server::Options {
        models: common::server::both_models(),
        ..Default::default()
    })
    .await
}

/// `tests/fixtures/cases/phases/<name>.safetensors`.
fn phase_fixture(name: &str) -> HashMap<String, Tensor> {
    let path = common::fixtures()
        .join("cases/phases")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(path, &Device::Cpu)
        .expect("phase fixture (tests/make_phase_fixtures.py)")
        .into_iter()
        .collect()
}

/// The golden preset with `phases`, `tensor_inputs` at every step.
fn request(
    model: &str,
    scheduler: &str,
    init: &Tensor,
    tensor_inputs: &[&str],
    phases: &[CallbackPhase],
) -> proto::GenerateRequest {
    let mut req = common::preset_request(model, scheduler, init, tensor_inputs);
    if let Some(cb) = req.callback.as_mut() {
        cb.phases = phases.iter().map(|&p| p as i32).collect();
    }
    req
}

/// Every event of a run, answered by `answer`, and Completed.
async fn run(
    client: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    req: proto::GenerateRequest,
    answer: impl FnMut(&proto::StepEnd) -> proto::StepReply,
) -> (Vec<proto::StepEnd>, proto::Completed) {
    common::session::run(client, req, answer)
        .await
        .expect("runs")
}

fn phase_of(step: &proto::StepEnd) -> CallbackPhase {
    CallbackPhase::try_from(step.phase).expect("a known phase")
}

#[test]
fn every_schedulers_x0_equals_diffusers_teacher_forced() {
    for (model, name, steps) in [
        ("tiny-sd15", "ddim", 10),
        ("tiny-sd15", "ddpm", 10),
        ("tiny-sd15", "euler", 10),
        ("tiny-sd15", "euler_a", 10),
        ("tiny-sd15", "dpmpp_2m", 10),
        ("tiny-sd15", "dpmpp_2m_karras", 10),
        ("tiny-sd15", "pndm", 10),
        ("tiny-sd15", "lcm", 4),
        ("tiny-sd15", "unipc", 10),
        ("tiny-sdxl", "euler", 10),
    ] {
        let bytes = std::fs::read(common::model_dir(model).join("scheduler/scheduler_config.json"))
            .expect("scheduler config");
        let config = SchedulerConfig::from_json_bytes(&bytes).expect("config parses");
        let s = schedulers::build(name, &config, steps, &SchedulerOptions::default())
            .expect("scheduler");
        let rec = phase_fixture(&format!("x0-{model}-{name}"));
        let n = s.timesteps().len();
        assert_eq!(rec.len(), 3 * n, "{model} {name}: one record per timestep");
        for k in 0..n {
            let x0 = s
                .pred_original_sample(
                    &rec[&format!("step{k}_model_output")],
                    k,
                    &rec[&format!("step{k}_sample")],
                )
                .expect("x0");
            let err = rel_diff(&x0, &rec[&format!("step{k}_x0")]);
            assert!(err <= TOL, "{model} {name} step {k}: x0 off by {err:e}");
        }
    }
}

#[tokio::test]
async fn after_guidance_carries_the_guided_prediction_its_halves_and_x0() {
    let server = server().await;
    let mut client = server.client().await;
    for (model, case_name, scheduler) in [
        ("tiny-sd15", "ddim-10", "ddim"),
        ("tiny-sdxl", "euler-10", "euler"),
    ] {
        let case = Case::load(model, case_name);
        let x0 = phase_fixture(&format!("x0-{model}-{scheduler}"));
        let init = case.tensor("init_latents");
        let req = request(
            model,
            scheduler,
            &init,
            &AFTER_GUIDANCE,
            &[CallbackPhase::AfterGuidance],
        );
        let (events, done) = run(&mut client, req, reply_to).await;
        assert_eq!(events.len(), 10, "{model}: one AFTER_GUIDANCE event a step");
        for (k, e) in events.iter().enumerate() {
            assert_eq!(phase_of(e), CallbackPhase::AfterGuidance);
            assert_eq!(e.step_index as usize, k);
            assert!(e.do_classifier_free_guidance);
            let got = |n: &str| unwire(&e.tensors[n]);
            let out = case.step_tensor(k, &["unet", "out"]);
            let checks = [
                (
                    "latents",
                    case.step_tensor(k, &["scheduler_step", "sample"]),
                ),
                (
                    "noise_pred",
                    case.step_tensor(k, &["scheduler_step", "model_output"]),
                ),
                ("noise_pred_uncond", out.narrow(0, 0, 1).unwrap()),
                ("noise_pred_text", out.narrow(0, 1, 1).unwrap()),
                ("pred_original_sample", x0[&format!("step{k}_x0")].clone()),
            ];
            for (name, want) in checks {
                let err = rel_diff(&got(name), &want);
                assert!(err <= TOL, "{model} step {k}: {name} off by {err:e}");
            }
        }
        let png = case.json["outputs"]["png"]
            .as_str()
            .map(|p| common::fixtures().join("cases").join(model).join(p));
        if let Some(png) = png.filter(|p| p.exists()) {
            assert!(
                png_max_diff(&done.images[0].data, &png) <= 1,
                "{model}: image"
            );
        }
    }
}

#[tokio::test]
async fn a_noise_pred_replaced_after_guidance_equals_diffusers_editing_it_before_the_step() {
    let server = server().await;
    let mut client = server.client().await;
    let case = Case::load("tiny-sd15", "ddim-10");
    let rec = phase_fixture("noise-pred-edit");
    let req = request(
        "tiny-sd15",
        "ddim",
        &case.tensor("init_latents"),
        &["latents", "noise_pred"],
        &[CallbackPhase::AfterGuidance, CallbackPhase::StepEnd],
    );
    let (events, done) = run(&mut client, req, |e| {
        let mut r = reply_to(e);
        if phase_of(e) == CallbackPhase::AfterGuidance && e.step_index == 3 {
            let half = (unwire(&e.tensors["noise_pred"]) * 0.5).unwrap();
            r.tensors.insert("noise_pred".into(), wire(&half));
        }
        r
    })
    .await;
    let ends: Vec<&proto::StepEnd> = events
        .iter()
        .filter(|e| phase_of(e) == CallbackPhase::StepEnd)
        .collect();
    assert_eq!(ends.len(), 10);
    for (k, e) in ends.iter().enumerate() {
        assert!(
            !e.tensors.contains_key("noise_pred"),
            "noise_pred travels only after guidance"
        );
        let err = rel_diff(
            &unwire(&e.tensors["latents"]),
            &rec[&format!("step{k}_latents")],
        );
        assert!(err <= TOL, "step {k}: latents off by {err:e}");
    }
    let png = common::fixtures().join("cases/phases/noise-pred-edit.png");
    assert!(png_max_diff(&done.images[0].data, &png) <= 1);
}

#[tokio::test]
async fn step_begin_changes_apply_to_their_own_step() {
    let server = server().await;
    let mut client = server.client().await;

    // Latents halved at the beginning of step 4 = diffusers halving them at the end of step 3.
    let case = Case::load("tiny-sd15", "ddim-10-latents-edit");
    let init = case.tensor("init_latents");
    let req = request(
        "tiny-sd15",
        "ddim",
        &init,
        &["latents"],
        &[CallbackPhase::StepBegin],
    );
    let (events, done) = run(&mut client, req, |e| {
        let mut r = reply_to(e);
        if e.step_index == 4 {
            let half = (unwire(&e.tensors["latents"]) * 0.5).unwrap();
            r.tensors.insert("latents".into(), wire(&half));
        }
        r
    })
    .await;
    assert_eq!(events.len(), 10);
    let first = &events[0];
    assert_eq!(
        (phase_of(first), first.step_index),
        (CallbackPhase::StepBegin, 0)
    );
    assert!(first.do_classifier_free_guidance && first.guidance_scale == 7.5);
    // Step 0 begins on the initial latents (DDIM's init_noise_sigma is 1).
    assert!(
        rel_diff(
            &unwire(&first.tensors["latents"]),
            &case.tensor("init_latents_scaled")
        ) <= TOL
    );
    for (k, event) in events.iter().enumerate().skip(1) {
        // Step k begins on the latents step k-1 left (before any edit of this step).
        let want = case.step_tensor(k - 1, &["callback_in", "latents"]);
        let err = rel_diff(&unwire(&event.tensors["latents"]), &want);
        assert!(err <= TOL, "begin of step {k}: {err:e}");
    }
    let final_latents = unwire(done.latents.as_ref().expect("latents"));
    assert!(rel_diff(&final_latents, &case.tensor("final.latents")) <= TOL);

    // An interrupt at the beginning of step 6 skips it = diffusers interrupting after step 5.
    let case = Case::load("tiny-sd15", "ddim-10-interrupt");
    let req = request(
        "tiny-sd15",
        "ddim",
        &init,
        &["latents"],
        &[CallbackPhase::StepBegin],
    );
    let (events, done) = run(&mut client, req, |e| proto::StepReply {
        interrupt: e.step_index == 6,
        ..reply_to(e)
    })
    .await;
    assert_eq!(events.len(), 7, "begins of steps 0..=6");
    assert!(done.interrupted);
    let final_latents = unwire(done.latents.as_ref().expect("latents"));
    assert!(rel_diff(&final_latents, &case.tensor("final.latents")) <= TOL);

    // Guidance set at each step's beginning = a diffusers callback setting it for the next step.
    let rec = Case::load("tiny-sd15-guidance", "schedule");
    let schedule: Vec<f32> = rec.json["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let mut req = request(
        "tiny-sd15",
        "ddim",
        &rec.tensor("init_latents"),
        &["latents"],
        &[CallbackPhase::StepBegin],
    );
    req.guidance_scale = Some(7.5);
    let (events, _) = run(&mut client, req, |e| proto::StepReply {
        guidance_scale: Some(schedule[e.step_index as usize]),
        ..reply_to(e)
    })
    .await;
    assert_eq!(
        events[0].guidance_scale, 7.5,
        "the event shows the guidance before the reply"
    );
    let mut req = request(
        "tiny-sd15",
        "ddim",
        &rec.tensor("init_latents"),
        &["latents"],
        &[CallbackPhase::StepBegin, CallbackPhase::StepEnd],
    );
    req.guidance_scale = Some(7.5);
    let (events, _) = run(&mut client, req, |e| proto::StepReply {
        guidance_scale: (phase_of(e) == CallbackPhase::StepBegin)
            .then(|| schedule[e.step_index as usize]),
        ..reply_to(e)
    })
    .await;
    let ends: Vec<&proto::StepEnd> = events
        .iter()
        .filter(|e| phase_of(e) == CallbackPhase::StepEnd)
        .collect();
    for (k, e) in ends.iter().enumerate() {
        assert_eq!(
            e.guidance_scale, schedule[k],
            "step {k} ran with the guidance set at its beginning"
        );
        let err = rel_diff(
            &unwire(&e.tensors["latents"]),
            &rec.tensor(&format!("step{k}_latents")),
        );
        assert!(err <= TOL, "step {k}: {err:e}");
    }
}

#[tokio::test]
async fn the_phases_of_a_step_come_in_loop_order() {
    let server = server().await;
    let mut client = server.client().await;
    let init = Case::load("tiny-sd15", "ddim-10").tensor("init_latents");
    let mut req = request(
        "tiny-sd15",
        "ddim",
        &init,
        &["latents"],
        &[
            CallbackPhase::StepEnd,
            CallbackPhase::AfterGuidance,
            CallbackPhase::StepBegin,
        ],
    );
    req.num_inference_steps = 3;
    let (events, _) = run(&mut client, req, reply_to).await;
    let order: Vec<(u32, CallbackPhase)> =
        events.iter().map(|e| (e.step_index, phase_of(e))).collect();
    let mut want = Vec::new();
    for i in 0..3 {
        want.extend([
            (i, CallbackPhase::StepBegin),
            (i, CallbackPhase::AfterGuidance),
            (i, CallbackPhase::StepEnd),
        ]);
    }
    assert_eq!(order, want);
    // Observe-only events of every phase, blocking nowhere.
    let mut req = request(
        "tiny-sd15",
        "ddim",
        &init,
        &["noise_pred"],
        &[CallbackPhase::AfterGuidance, CallbackPhase::StepBegin],
    );
    req.num_inference_steps = 3;
    req.callback.as_mut().unwrap().observe_only = true;
    let (events, done) = run(&mut client, req, |_| panic!("observe-only")).await;
    assert_eq!(events.len(), 6);
    assert!(events.iter().all(|e| !e.reply_required));
    assert!(events
        .iter()
        .filter(|e| phase_of(e) == CallbackPhase::StepBegin)
        .all(|e| e.tensors.is_empty()));
    assert!(!done.images.is_empty());
}

/// The first ReplyRejected after answering the first event with `bad`, then the good reply.
async fn rejected_reply(
    client: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    req: proto::GenerateRequest,
    bad: impl Fn(&proto::StepEnd) -> proto::StepReply,
) -> proto::ReplyRejected {
    let mut s = Session::start(client, req).await.expect("accepted");
    let mut rejection = None;
    loop {
        match s.expect().await {
            Kind::StepEnd(step) if rejection.is_none() => s.reply(bad(&step)).await,
            Kind::StepEnd(step) => s.reply(reply_to(&step)).await,
            Kind::ReplyRejected(r) => {
                s.reply(proto::StepReply {
                    phase: CallbackPhase::AfterGuidance as i32,
                    ..ok_reply(r.step_index)
                })
                .await;
                rejection = Some(r);
            }
            Kind::Completed(_) => return rejection.expect("a rejection"),
            Kind::Accepted(_) | Kind::Queued(_) => {}
        }
    }
}

#[tokio::test]
async fn phase_replies_are_checked_by_name_shape_and_phase() {
    let server = server().await;
    let mut client = server.client().await;
    let init = Case::load("tiny-sd15", "ddim-10").tensor("init_latents");
    let req = || {
        let mut r = request(
            "tiny-sd15",
            "ddim",
            &init,
            &AFTER_GUIDANCE,
            &[CallbackPhase::AfterGuidance],
        );
        r.num_inference_steps = 2;
        r
    };
    let with = |name: &'static str, t: Tensor| {
        move |e: &proto::StepEnd| {
            let mut r = reply_to(e);
            r.tensors.insert(name.into(), wire(&t));
            r
        }
    };
    let zeros =
        |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
    for (reply, field, says) in [
        (
            Box::new(with("latents", zeros(&[1, 4, 8, 8])))
                as Box<dyn Fn(&proto::StepEnd) -> proto::StepReply>,
            "tensors[latents]",
            "only noise_pred",
        ),
        (
            Box::new(with("pred_original_sample", zeros(&[1, 4, 8, 8]))),
            "tensors[pred_original_sample]",
            "read-only",
        ),
        (
            Box::new(with("noise_pred", zeros(&[1, 4, 8, 4]))),
            "tensors[noise_pred]",
            "shape",
        ),
        (
            Box::new(|e: &proto::StepEnd| ok_reply(e.step_index)),
            "phase",
            "CALLBACK_PHASE_AFTER_GUIDANCE",
        ),
    ] {
        let r = rejected_reply(&mut client, req(), reply).await;
        assert_eq!(r.field, field);
        assert!(r.reason.contains(says), "{field}: {}", r.reason);
    }

    // noise_pred exists only after guidance: asking for it without that phase is refused.
    let mut bad = request(
        "tiny-sd15",
        "ddim",
        &init,
        &["noise_pred"],
        &[CallbackPhase::StepEnd],
    );
    bad.num_inference_steps = 2;
    let status = match Session::start(&mut client, bad).await {
        Err(s) => s,
        Ok(mut s) => s.next().await.expect_err("refused"),
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("AFTER_GUIDANCE"),
        "{}",
        status.message()
    );
}

/// Opens a session with `await_steps` and returns it with its Accepted.
async fn awaiting(
    client: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    scheduler: &str,
    steps: u32,
) -> (Session, proto::Accepted) {
    let init = Case::load("tiny-sd15", "ddim-10").tensor("init_latents");
    let mut req = common::preset_request("tiny-sd15", scheduler, &init, &["latents"]);
    req.num_inference_steps = steps;
    req.callback.as_mut().unwrap().await_steps = true;
    let mut s = Session::start(client, req).await.expect("started");
    loop {
        match s.expect().await {
            Kind::Accepted(a) => return (s, a),
            Kind::Queued(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn steps_msg(sel: proto::StepSelection) -> proto::ClientMessage {
    proto::ClientMessage {
        kind: Some(client_message::Kind::Steps(sel)),
    }
}

#[tokio::test]
async fn a_client_picks_its_steps_from_the_real_timestep_count() {
    let server = server().await;
    let mut client = server.client().await;
    // PNDM runs 11 timesteps for 10 steps: a cutoff at int(0.4 * n) is step 4, not 4.0 of 10.
    let (mut s, accepted) = awaiting(&mut client, "pndm", 10).await;
    let n = accepted.timesteps.len();
    assert_eq!(n, 11);
    let cutoff = (n as f64 * 0.45) as u32; // 4
    s.send(steps_msg(proto::StepSelection {
        reply_step_indices: vec![cutoff],
        ..Default::default()
    }))
    .await;
    let mut seen = Vec::new();
    loop {
        match s.expect().await {
            Kind::StepEnd(e) => {
                if e.reply_required {
                    s.reply(ok_reply(e.step_index)).await;
                }
                seen.push((e.step_index, e.reply_required));
            }
            Kind::Completed(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    // Every step observed (the callback's default selection), only the chosen one waits.
    let want: Vec<(u32, bool)> = (0..n as u32).map(|i| (i, i == cutoff)).collect();
    assert_eq!(seen, want);

    // An out-of-range selection is rejected and the server waits again; a reply before the
    // selection is rejected too; then a selection of no steps runs to the end without events.
    let (mut s, _) = awaiting(&mut client, "ddim", 4).await;
    s.reply(ok_reply(0)).await;
    match s.expect().await {
        Kind::ReplyRejected(r) => assert_eq!(r.field, "reply", "{}", r.reason),
        other => panic!("unexpected {other:?}"),
    }
    s.send(steps_msg(proto::StepSelection {
        step_indices: vec![4],
        ..Default::default()
    }))
    .await;
    match s.expect().await {
        Kind::ReplyRejected(r) => {
            assert_eq!(r.field, "steps.step_indices");
            assert!(r.reason.contains("4 timesteps"), "{}", r.reason);
        }
        other => panic!("unexpected {other:?}"),
    }
    s.send(steps_msg(proto::StepSelection {
        no_steps: true,
        ..Default::default()
    }))
    .await;
    match s.expect().await {
        Kind::Completed(c) => assert!(!c.images.is_empty()),
        other => panic!("unexpected {other:?}"),
    }

    // Steps in the request and await_steps together are refused before the queue.
    let init = Case::load("tiny-sd15", "ddim-10").tensor("init_latents");
    let mut req = common::preset_request("tiny-sd15", "ddim", &init, &["latents"]);
    let cb = req.callback.as_mut().unwrap();
    cb.await_steps = true;
    cb.step_indices = vec![1];
    let status = match Session::start(&mut client, req).await {
        Err(s) => s,
        Ok(mut s) => s.next().await.expect_err("refused"),
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("await_steps"),
        "{}",
        status.message()
    );
}
