//! Server-side guidance (`GenerateRequest.guidance_plan`), with no round trip: a CFG cutoff
//! equals diffusers' `SDCFGCutoffCallback` / `SDXLCFGCutoffCallback` on the golden cases, a
//! per-step schedule equals a diffusers callback setting `_guidance_scale` at every step, and a
//! client's reply wins over the plan.

mod common;

use candle_core::{DType, Device, Tensor};
use common::session::{ok_reply, Session};
use common::{rel_diff, unwire, Case};
use stepstream::proto::{self, guidance_plan::CfgCutoff, server_message::Kind};
use tonic::Code;

/// The golden README's tolerance for latents.
const LATENTS_TOL: f32 = 1e-5;

async fn server() -> common::server::TestServer {
    common::server::start(common::server::Options {
        models: common::server::both_models(),
        ..Default::default()
    })
    .await
}

fn request(model: &str, scheduler: &str, init: &Tensor, guidance: f32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        guidance_scale: Some(guidance),
        ..common::preset_request(model, scheduler, init, &["latents", "prompt_embeds"])
    }
}

/// Each StepEnd's latents, CFG flag, guidance and prompt_embeds rows; then Completed.
struct Run {
    latents: Vec<Tensor>,
    cfg: Vec<bool>,
    guidance: Vec<f32>,
    embeds_rows: Vec<usize>,
    accepted: proto::Accepted,
    completed: proto::Completed,
}

async fn run(
    client: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    req: proto::GenerateRequest,
    reply: impl Fn(&proto::StepEnd) -> proto::StepReply,
) -> Run {
    let mut s = Session::start(client, req).await.expect("accepted");
    let mut r = Run {
        latents: vec![],
        cfg: vec![],
        guidance: vec![],
        embeds_rows: vec![],
        accepted: Default::default(),
        completed: Default::default(),
    };
    loop {
        match s.expect().await {
            Kind::StepEnd(step) => {
                r.latents.push(unwire(&step.tensors["latents"]));
                r.cfg.push(step.do_classifier_free_guidance);
                r.guidance.push(step.guidance_scale);
                r.embeds_rows
                    .push(step.tensors["prompt_embeds"].shape[0] as usize);
                s.reply(reply(&step)).await;
            }
            Kind::Completed(c) => {
                r.completed = c;
                return r;
            }
            Kind::Accepted(a) => r.accepted = a,
            Kind::Queued(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The status a refused request ends with (before or after the stream opens).
async fn refused(
    client: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    req: proto::GenerateRequest,
) -> tonic::Status {
    match Session::start(client, req).await {
        Err(s) => s,
        Ok(mut s) => s.next().await.expect_err("refused"),
    }
}

fn no_change(step: &proto::StepEnd) -> proto::StepReply {
    ok_reply(step.step_index)
}

fn plan(cutoff: Option<CfgCutoff>, schedule: Vec<f32>) -> Option<proto::GuidancePlan> {
    Some(proto::GuidancePlan {
        cfg_cutoff: cutoff,
        schedule,
        ..Default::default()
    })
}

fn interval(lo: Option<f64>, hi: Option<f64>) -> Option<proto::GuidancePlan> {
    Some(proto::GuidancePlan {
        interval_sigma_lo: lo,
        interval_sigma_hi: hi,
        ..Default::default()
    })
}

#[tokio::test]
async fn a_server_side_cfg_cutoff_equals_diffusers_cutoff_callbacks() {
    let server = server().await;
    let mut client = server.client().await;
    for (model, name, scheduler) in [
        ("tiny-sd15", "ddim-10-cfg-cutoff", "ddim"),
        ("tiny-sdxl", "euler-10-cfg-cutoff", "euler"),
    ] {
        let case = Case::load(model, name);
        let spec = &case.json["callback"]["spec"];
        let ratio = spec["cutoff_step_ratio"].as_f64().unwrap() as f32;
        let cutoff = spec["cutoff_step"].as_u64().unwrap() as usize;
        let mut req = request(model, scheduler, &case.tensor("init_latents"), 7.5);
        req.negative_prompt = case.json["negative_prompt"].as_str().map(String::from);
        req.guidance_plan = plan(Some(CfgCutoff::CutoffStepRatio(ratio)), vec![]);
        let got = run(&mut client, req, no_change).await;
        assert_eq!(got.latents.len(), case.num_steps(), "{name}");
        for (k, lat) in got.latents.iter().enumerate() {
            let d = rel_diff(lat, &case.step_tensor(k, &["callback_in", "latents"]));
            assert!(d <= LATENTS_TOL, "{name} step {k}: {d:.2e}");
            assert_eq!(got.cfg[k], k <= cutoff, "{name} step {k}: CFG");
            // From the cutoff step's StepEnd on, the conditional half alone is held.
            assert_eq!(
                got.embeds_rows[k],
                if k < cutoff { 2 } else { 1 },
                "{name} step {k}"
            );
        }
        let d = rel_diff(
            &unwire(got.completed.latents.as_ref().unwrap()),
            &case.tensor("final.latents"),
        );
        assert!(d <= LATENTS_TOL, "{name} final: {d:.2e}");
        // The same cutoff given as an index gives the same numbers, bit for bit.
        let mut req = request(model, scheduler, &case.tensor("init_latents"), 7.5);
        req.negative_prompt = case.json["negative_prompt"].as_str().map(String::from);
        req.guidance_plan = plan(Some(CfgCutoff::CutoffStepIndex(cutoff as u32)), vec![]);
        let by_index = run(&mut client, req, no_change).await;
        assert_eq!(by_index.completed.latents, got.completed.latents, "{name}");
    }
}

#[tokio::test]
async fn a_guidance_schedule_equals_a_callback_setting_guidance_at_every_step() {
    let server = server().await;
    let mut client = server.client().await;
    let dir = common::fixtures().join("cases/tiny-sd15-guidance");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("schedule.json")).unwrap()).unwrap();
    let schedule: Vec<f32> = json["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let rec =
        candle_core::safetensors::load(dir.join("schedule.safetensors"), &Device::Cpu).unwrap();
    let init = rec["init_latents"].to_dtype(DType::F32).unwrap();
    // The request's guidance_scale is ignored: the schedule's first value is step 0's.
    let mut req = request("tiny-sd15", "ddim", &init, 1.0);
    req.guidance_plan = plan(None, schedule.clone());
    let got = run(&mut client, req, no_change).await;
    for (k, lat) in got.latents.iter().enumerate() {
        let d = rel_diff(lat, &rec[&format!("step{k}_latents")]);
        assert!(d <= LATENTS_TOL, "step {k}: {d:.2e}");
        // Each StepEnd shows the guidance the next step will use.
        let next = schedule.get(k + 1).copied().unwrap_or(schedule[9]);
        assert_eq!(got.guidance[k], next, "step {k}");
    }
    let worst = common::png_max_diff(&got.completed.images[0].data, &dir.join("schedule.png"));
    assert!(worst <= 1, "PNG differs by {worst} of 255");
}

#[tokio::test]
async fn a_schedule_below_one_runs_those_steps_without_cfg_and_may_turn_it_back_on() {
    let server = server().await;
    let mut client = server.client().await;
    let case = Case::load("tiny-sd15", "ddim-10-cfg-cutoff");
    let init = case.tensor("init_latents");
    // Guidance 0 from step 5 on is the cutoff after step 4, to the bit.
    let mut req = request("tiny-sd15", "ddim", &init, 7.5);
    req.guidance_plan = plan(None, [[7.5f32; 5], [0.0; 5]].concat());
    let scheduled = run(&mut client, req, no_change).await;
    let mut req = request("tiny-sd15", "ddim", &init, 7.5);
    req.guidance_plan = plan(Some(CfgCutoff::CutoffStepIndex(4)), vec![]);
    let cut = run(&mut client, req, no_change).await;
    assert_eq!(scheduled.completed.latents, cut.completed.latents);
    assert_eq!(scheduled.cfg, cut.cfg);
    // The schedule keeps both halves, so CFG can come back.
    let mut req = request("tiny-sd15", "ddim", &init, 7.5);
    req.guidance_plan = plan(
        None,
        [7.5, 7.5, 1.0, 1.0, 7.5, 7.5, 7.5, 7.5, 7.5, 7.5].to_vec(),
    );
    let back = run(&mut client, req, no_change).await;
    assert_eq!(
        back.cfg,
        [true, true, false, false, true, true, true, true, true, true]
    );
    assert!(back.embeds_rows.iter().all(|&r| r == 2));
}

#[tokio::test]
async fn a_reply_wins_over_the_plan_and_ends_it() {
    let server = server().await;
    let mut client = server.client().await;
    let init = Case::load("tiny-sd15", "ddim-10").tensor("init_latents");
    let mut req = request("tiny-sd15", "ddim", &init, 7.5);
    req.guidance_plan = plan(None, vec![9.0; 10]);
    // At step 2 the client sets 3.0: that holds for every later step.
    let got = run(&mut client, req, |step| {
        let mut r = ok_reply(step.step_index);
        if step.step_index == 2 {
            r.guidance_scale = Some(3.0);
        }
        r
    })
    .await;
    assert_eq!(got.guidance[..2], [9.0, 9.0]);
    assert!(
        got.guidance[3..].iter().all(|&g| g == 3.0),
        "{:?}",
        got.guidance
    );
}

#[tokio::test]
async fn plans_that_do_not_fit_the_run_are_refused_by_field() {
    let server = server().await;
    let mut client = server.client().await;
    let init = Case::load("tiny-sd15", "ddim-10").tensor("init_latents");
    let cases: Vec<(Option<proto::GuidancePlan>, &str)> = vec![
        (plan(None, vec![7.5; 3]), "start.guidance_plan.schedule"),
        (
            plan(None, vec![7.5, f32::NAN]),
            "start.guidance_plan.schedule[1]",
        ),
        (
            plan(Some(CfgCutoff::CutoffStepRatio(1.5)), vec![]),
            "start.guidance_plan.cutoff_step_ratio",
        ),
        (
            plan(Some(CfgCutoff::CutoffStepIndex(10)), vec![]),
            "start.guidance_plan.cutoff_step_index",
        ),
    ];
    for (p, field) in cases {
        let mut req = request("tiny-sd15", "ddim", &init, 7.5);
        req.guidance_plan = p;
        let status = refused(&mut client, req).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{field}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    // PNDM runs one timestep more than its steps: the schedule follows the timesteps.
    let mut req = request("tiny-sd15", "pndm", &init, 7.5);
    req.guidance_plan = plan(None, vec![7.5; 11]);
    let got = run(&mut client, req, no_change).await;
    assert_eq!(got.latents.len(), 11);
}

/// Accepted carries each step's sigma (diffusers' for a sigma-space sampler); a guidance
/// interval runs CFG exactly at the steps whose sigma is inside it, which is the schedule that
/// turns guidance to 1 elsewhere, bit for bit.
#[tokio::test]
async fn a_guidance_interval_runs_cfg_only_where_sigma_is_inside_it() {
    let server = server().await;
    let mut client = server.client().await;
    let case = Case::load("tiny-sd15", "euler-10");
    let init = case.tensor("init_latents");
    let plain = run(
        &mut client,
        request("tiny-sd15", "euler", &init, 7.5),
        no_change,
    )
    .await;
    let sigmas = plain.accepted.sigmas.clone();
    let theirs: Vec<f64> = case.json["sigmas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(sigmas.len(), 10);
    for (k, (a, b)) in sigmas.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * b.max(1.0),
            "sigma {k}: {a} vs diffusers' {b}"
        );
    }
    let (lo, hi) = (sigmas[6], sigmas[2]);
    let mut req = request("tiny-sd15", "euler", &init, 7.5);
    req.guidance_plan = interval(Some(lo), Some(hi));
    let inside = run(&mut client, req, no_change).await;
    let want: Vec<bool> = sigmas.iter().map(|&s| (lo..=hi).contains(&s)).collect();
    assert_eq!(inside.cfg, want);
    let mut req = request("tiny-sd15", "euler", &init, 7.5);
    let g: Vec<f32> = want.iter().map(|&on| if on { 7.5 } else { 1.0 }).collect();
    req.guidance_plan = plan(None, g);
    let scheduled = run(&mut client, req, no_change).await;
    assert_eq!(inside.completed.latents, scheduled.completed.latents);
    // Alpha-space samplers report sigma from alphas_cumprod, falling with the steps.
    let ddim = run(
        &mut client,
        request("tiny-sd15", "ddim", &init, 7.5),
        no_change,
    )
    .await;
    let s = &ddim.accepted.sigmas;
    assert_eq!(s.len(), 10);
    assert!(s.windows(2).all(|w| w[0] > w[1]) && s[9] > 0.0, "{s:?}");
    // Bounds out of order are refused.
    let mut req = request("tiny-sd15", "euler", &init, 7.5);
    req.guidance_plan = interval(Some(2.0), Some(1.0));
    let status = refused(&mut client, req).await;
    assert!(
        status
            .message()
            .contains("start.guidance_plan.interval_sigma_lo"),
        "{status:?}"
    );
}
