//! Exact replay (`OutputOptions.return_replay`, `GenerateRequest.replay`): a session steered at
//! several phases comes back with a record of the request as resolved and every edit applied;
//! the record, stored as bytes and run again with no client, makes the same PNG and the same
//! latents, bit for bit. A record that no longer fits is refused, naming what.

mod common;

use candle_core::Tensor;
use common::session::{ok_reply, reply_to, run};
use common::{unwire, wire};
use prost::Message;
use stepstream::proto::{self, CallbackPhase};
use tonic::Code;

type Client = proto::diffusion_client::DiffusionClient<tonic::transport::Channel>;

fn output() -> Option<proto::OutputOptions> {
    Some(proto::OutputOptions {
        format: proto::ImageFormat::Png as i32,
        return_latents: true,
        return_replay: true,
    })
}

/// 10 DDIM steps of tiny SD 1.5 with an unset seed (the record must carry the one drawn),
/// every phase observed.
fn steered_request() -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        num_inference_steps: 10,
        width: Some(64),
        height: Some(64),
        scheduler: "ddim".into(),
        callback: Some(proto::CallbackOptions {
            tensor_inputs: ["latents", "prompt_embeds", "noise_pred"]
                .map(String::from)
                .to_vec(),
            phases: [
                CallbackPhase::StepBegin,
                CallbackPhase::AfterGuidance,
                CallbackPhase::StepEnd,
            ]
            .map(|p| p as i32)
            .to_vec(),
            ..Default::default()
        }),
        output: output(),
        ..Default::default()
    }
}

/// The interactive edits: a latents edit at the beginning of step 2, a noise_pred edit after
/// guidance at step 4, a guidance change at the end of step 5 and a CFG cutoff at the end of
/// step 6 (guidance 0 and the conditional half of prompt_embeds).
fn steer(e: &proto::StepEnd) -> proto::StepReply {
    let phase = CallbackPhase::try_from(e.phase).unwrap();
    let scaled = |name: &str, by: f64| {
        let t: Tensor = (unwire(&e.tensors[name]) * by).unwrap();
        [(name.to_string(), wire(&t))].into()
    };
    let mut r = proto::StepReply {
        phase: e.phase,
        ..ok_reply(e.step_index)
    };
    match (e.step_index, phase) {
        (2, CallbackPhase::StepBegin) => r.tensors = scaled("latents", 0.9),
        (4, CallbackPhase::AfterGuidance) => r.tensors = scaled("noise_pred", 0.8),
        (5, CallbackPhase::StepEnd) => r.guidance_scale = Some(5.0),
        (6, CallbackPhase::StepEnd) => {
            let embeds = unwire(&e.tensors["prompt_embeds"]);
            let cond = embeds.narrow(0, 1, 1).unwrap();
            r.guidance_scale = Some(0.0);
            r.tensors = [("prompt_embeds".to_string(), wire(&cond))].into();
        }
        _ => {}
    }
    r
}

/// A replay request for `record`.
fn replay_of(record: proto::ReplayRecord) -> proto::GenerateRequest {
    proto::GenerateRequest {
        replay: Some(Box::new(record)),
        output: output(),
        ..Default::default()
    }
}

async fn steered(client: &mut Client) -> proto::Completed {
    run(client, steered_request(), steer).await.expect("runs").1
}

#[tokio::test]
async fn a_steered_session_replays_to_the_same_png_and_latents_with_no_client() {
    let server = common::server::start(Default::default()).await;
    let mut client = server.client().await;
    let done = steered(&mut client).await;
    let record = done.replay.clone().expect("a replay record");

    // The record: the request as resolved, and the four edits in loop order.
    let req = record.request.as_ref().unwrap();
    assert_eq!(record.version, 1);
    assert_eq!(req.model, "tiny-sd15");
    assert_eq!(req.seed, Some(done.seed), "the drawn seed");
    assert_eq!(
        (req.width, req.height, req.num_inference_steps),
        (Some(64), Some(64), 10)
    );
    assert_eq!(
        req.guidance_scale,
        Some(7.5),
        "the model's default, filled in"
    );
    assert_eq!(req.num_images_per_prompt, 1);
    assert!(req.callback.is_none() && req.output.is_none());
    let edits: Vec<(u32, CallbackPhase)> = record
        .edits
        .iter()
        .map(|e| (e.step_index, CallbackPhase::try_from(e.phase).unwrap()))
        .collect();
    assert_eq!(
        edits,
        [
            (2, CallbackPhase::StepBegin),
            (4, CallbackPhase::AfterGuidance),
            (5, CallbackPhase::StepEnd),
            (6, CallbackPhase::StepEnd),
        ]
    );
    assert_eq!(record.device, "cpu");

    // Stored as bytes, read back, run with no client: GenerateOnce, then a Generate stream.
    let bytes = record.encode_to_vec();
    let stored = proto::ReplayRecord::decode(bytes.as_slice()).unwrap();
    let once = client
        .generate_once(replay_of(stored.clone()))
        .await
        .expect("the replay runs")
        .into_inner();
    let (events, streamed) = run(&mut client, replay_of(stored), |_| {
        panic!("no reply is asked")
    })
    .await
    .expect("the replay runs on a stream");
    assert!(events.is_empty(), "a replay sends no step events");
    for again in [&once, &streamed] {
        assert_eq!(
            again.images[0].data, done.images[0].data,
            "the same PNG, byte for byte"
        );
        assert_eq!(
            again.latents.as_ref().unwrap().data,
            done.latents.as_ref().unwrap().data,
            "the same latents, bit for bit"
        );
        assert_eq!(again.seed, done.seed);
        // (Compared without printing: the edits hold tensors.)
        assert!(
            again.replay.as_ref().unwrap().edits == record.edits,
            "a replay records what it applied"
        );
    }

    // And the edits mattered: the same request unsteered makes another image.
    let plain = run(&mut client, steered_request(), reply_to)
        .await
        .unwrap()
        .1;
    assert_eq!(
        plain.replay.unwrap().edits,
        [],
        "replies that change nothing are left out"
    );
    let mut unsteered = steered_request();
    unsteered.seed = Some(done.seed);
    let plain = run(&mut client, unsteered, reply_to).await.unwrap().1;
    assert_ne!(plain.images[0].data, done.images[0].data);
}

#[tokio::test]
async fn a_generation_with_no_edits_replays_from_its_resolved_request() {
    let server = common::server::start(Default::default()).await;
    let mut client = server.client().await;
    let done = client
        .generate_once(proto::GenerateRequest {
            prompt: "a lighthouse".into(),
            num_inference_steps: 4,
            output: output(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let record = done.replay.clone().unwrap();
    assert!(record.edits.is_empty());
    let again = client
        .generate_once(replay_of(record))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.images[0].data, done.images[0].data);
}

#[tokio::test]
async fn records_that_no_longer_fit_are_refused_naming_what() {
    let server = common::server::start(Default::default()).await;
    let mut client = server.client().await;
    let record = steered(&mut client).await.replay.unwrap();
    let refused = |mut client: Client, req: proto::GenerateRequest| async move {
        client.generate_once(req).await.expect_err("refused")
    };

    // Another size: the recorded latents edit has the old shape.
    let mut resized = record.clone();
    resized.request.as_mut().unwrap().width = Some(128);
    let s = refused(client.clone(), replay_of(resized)).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().contains("start.replay.edits")
            && s.message().contains("step 2")
            && s.message().contains("tensors[latents]"),
        "{}",
        s.message()
    );

    // Fewer steps: an edit past the run.
    let mut shorter = record.clone();
    shorter.request.as_mut().unwrap().num_inference_steps = 4;
    let s = refused(client.clone(), replay_of(shorter)).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("start.replay.edits"),
        "{}",
        s.message()
    );

    // Edits out of loop order.
    let mut shuffled = record.clone();
    shuffled.edits.swap(0, 1);
    let s = refused(client.clone(), replay_of(shuffled)).await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("start.replay.edits[1]"),
        "{}",
        s.message()
    );

    // A replay request that sets more than replay and output.
    let mut mixed = replay_of(record.clone());
    mixed.prompt = "something else".into();
    let s = refused(client.clone(), mixed).await;
    assert!(s.message().contains("start.replay"), "{}", s.message());

    // A version this server does not read.
    let mut future = record;
    future.version = 2;
    let s = refused(client.clone(), replay_of(future)).await;
    assert!(
        s.message().contains("start.replay.version"),
        "{}",
        s.message()
    );
}
