//! The session protocol, through a real tonic client against a server on 127.0.0.1:0:
//! subscriptions, observe-only, every rejection kind, deadlines, disconnects, admission,
//! errors, health and reflection.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::server::{self, Options};
use common::session::{ok_reply, Session};
use common::{unwire, wire};
use stepstream::proto::{self, server_message::Kind};
use tonic::Code;

fn request(steps: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        num_inference_steps: steps,
        seed: Some(7),
        output: Some(proto::OutputOptions {
            format: proto::ImageFormat::Png as i32,
            return_latents: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn subscribed(steps: u32, cb: proto::CallbackOptions) -> proto::GenerateRequest {
    proto::GenerateRequest {
        callback: Some(cb),
        ..request(steps)
    }
}

fn blocking(tensors: &[&str]) -> proto::CallbackOptions {
    proto::CallbackOptions {
        tensor_inputs: tensors.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Reads Accepted then returns the next StepEnd.
async fn first_step(s: &mut Session) -> (proto::Accepted, proto::StepEnd) {
    let Kind::Accepted(a) = s.expect().await else {
        panic!("expected Accepted")
    };
    let Kind::StepEnd(e) = s.expect().await else {
        panic!("expected StepEnd")
    };
    (a, e)
}

async fn reference_latents(server: &server::TestServer, steps: u32) -> candle_core::Tensor {
    let mut c = server.client().await;
    let done = c.generate_once(request(steps)).await.unwrap().into_inner();
    unwire(done.latents.as_ref().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_only_never_waits_for_a_reply() {
    let srv = server::start(Default::default()).await;
    let mut c = srv.client().await;
    // A 1 ms deadline with ABORT would end any session that waited.
    let cb = proto::CallbackOptions {
        observe_only: true,
        reply_timeout_ms: 1,
        on_timeout: proto::TimeoutAction::Abort as i32,
        tensor_inputs: vec!["latents".into()],
        ..Default::default()
    };
    let mut s = Session::start(&mut c, subscribed(6, cb)).await.unwrap();
    let mut steps = Vec::new();
    let done = loop {
        match s.expect().await {
            Kind::Accepted(_) => {}
            Kind::StepEnd(e) => {
                assert!(!e.reply_required);
                assert!(e.tensors.contains_key("latents"));
                steps.push(e.step_index);
            }
            Kind::Completed(c) => break c,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(steps, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(done.images.len(), 1);
    assert!(done.timings.unwrap().callback_wait_ms < 50.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_subscribed_steps_produce_events() {
    let srv = server::start(Default::default()).await;
    let mut c = srv.client().await;
    for (cb, want) in [
        (
            proto::CallbackOptions {
                step_indices: vec![7, 1, 4, 4],
                observe_only: true,
                ..Default::default()
            },
            vec![1, 4, 7],
        ),
        (
            proto::CallbackOptions {
                every: 3,
                observe_only: true,
                ..Default::default()
            },
            vec![0, 3, 6, 9],
        ),
    ] {
        let mut s = Session::start(&mut c, subscribed(10, cb)).await.unwrap();
        let mut seen = Vec::new();
        loop {
            match s.expect().await {
                Kind::StepEnd(e) => {
                    assert!(e.tensors.is_empty(), "no tensor_inputs: no tensors travel");
                    seen.push(e.step_index)
                }
                Kind::Completed(_) => break,
                _ => {}
            }
        }
        assert_eq!(seen, want);
    }
    // No callback at all: Accepted then Completed, nothing in between.
    let mut s = Session::start(&mut c, request(3)).await.unwrap();
    assert!(matches!(s.expect().await, Kind::Accepted(_)));
    assert!(matches!(s.expect().await, Kind::Completed(_)));
}

/// A client may watch every step and block at a few: only `reply_step_indices` wait, and a
/// reply there acts from the next step on.
#[tokio::test]
async fn a_client_can_observe_every_step_and_block_at_chosen_ones() {
    let srv = server::start(Default::default()).await;
    let mut c = srv.client().await;
    let cb = proto::CallbackOptions {
        every: 4,
        reply_step_indices: vec![6, 2],
        ..Default::default()
    };
    let mut s = Session::start(&mut c, subscribed(10, cb)).await.unwrap();
    let mut seen = Vec::new();
    loop {
        match s.expect().await {
            Kind::StepEnd(e) => {
                seen.push((e.step_index, e.reply_required, e.guidance_scale));
                if e.reply_required {
                    let mut r = ok_reply(e.step_index);
                    r.guidance_scale = Some(3.0 + e.step_index as f32);
                    s.reply(r).await;
                }
            }
            Kind::Completed(_) => break,
            _ => {}
        }
    }
    // Every 4th step observed, plus the blocking ones; the replies' guidance shows after.
    assert_eq!(
        seen,
        [
            (0, false, 7.5),
            (2, true, 7.5),
            (4, false, 5.0),
            (6, true, 5.0),
            (8, false, 9.0)
        ]
    );
    // Blocking steps beyond the run, or with observe_only, are refused.
    for (cb, field) in [
        (
            proto::CallbackOptions {
                reply_step_indices: vec![10],
                ..Default::default()
            },
            "start.callback.reply_step_indices",
        ),
        (
            proto::CallbackOptions {
                reply_step_indices: vec![1],
                observe_only: true,
                ..Default::default()
            },
            "start.callback.reply_step_indices",
        ),
    ] {
        let status = match Session::start(&mut c, subscribed(10, cb)).await {
            Err(e) => e,
            Ok(mut s) => s.next().await.expect_err("refused"),
        };
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(field), "{}", status.message());
    }
}

/// Checked before the queue: refused at once, even while the only live place is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_indices_beyond_the_schedule_are_invalid_before_any_queueing() {
    let srv = server::start(Options {
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    let mut c = srv.client().await;
    let mut holder = Session::start(&mut c, subscribed(10, blocking(&[])))
        .await
        .unwrap();
    let _ = first_step(&mut holder).await;
    for (scheduler, steps, bad) in [("ddim", 10, 10), ("pndm", 10, 11), ("", 4, 4)] {
        let cb = proto::CallbackOptions {
            step_indices: vec![0, bad],
            ..Default::default()
        };
        let mut req = subscribed(steps, cb);
        req.scheduler = scheduler.into();
        let err = Session::start(&mut c, req).await.err().expect("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{scheduler}");
        assert!(err.message().contains("step_indices"), "{}", err.message());
    }
}

/// Every malformed reply is answered with ReplyRejected naming the field, the server waits
/// again for the same step, and the generation ends exactly as if only the good replies came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_kind_is_answered_and_nothing_is_lost() {
    let srv = server::start(Default::default()).await;
    let reference = reference_latents(&srv, 4).await;
    let mut c = srv.client().await;
    let mut s = Session::start(
        &mut c,
        subscribed(4, blocking(&["latents", "prompt_embeds"])),
    )
    .await
    .unwrap();
    let (acc, step) = first_step(&mut s).await;
    assert_eq!(acc.tensor_specs.len(), 2);
    let latents = step.tensors["latents"].clone();
    let embeds = step.tensors["prompt_embeds"].clone();
    assert_eq!(embeds.shape, vec![2, 77, 32]);

    let with = |name: &str, t: proto::Tensor| proto::StepReply {
        step_index: 0,
        tensors: HashMap::from([(name.to_string(), t)]),
        ..Default::default()
    };
    let nan = {
        let mut t = latents.clone();
        t.data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        t
    };
    let bad: Vec<(proto::StepReply, &str, &str)> = vec![
        (ok_reply(3), "step_index", "waiting on step 0"),
        (
            with("negative_prompt_embeds", embeds.clone()),
            "tensors[negative_prompt_embeds]",
            "tensor_inputs",
        ),
        (
            with("bogus", latents.clone()),
            "tensors[bogus]",
            "tensor_inputs",
        ),
        (
            with(
                "latents",
                proto::Tensor {
                    dtype: 0,
                    ..latents.clone()
                },
            ),
            "tensors[latents]",
            "dtype",
        ),
        (
            with(
                "latents",
                proto::Tensor {
                    shape: vec![1, 4, 4, 16],
                    ..latents.clone()
                },
            ),
            "tensors[latents]",
            "shape",
        ),
        (
            with(
                "latents",
                proto::Tensor {
                    data: latents.data[..10].to_vec(),
                    ..latents.clone()
                },
            ),
            "tensors[latents]",
            "bytes",
        ),
        (with("latents", nan), "tensors[latents]", "non-finite"),
        (
            with(
                "latents",
                proto::Tensor {
                    shape: vec![i64::MAX, 4, 8, 8],
                    ..latents.clone()
                },
            ),
            "tensors[latents]",
            "exceeds",
        ),
        (
            proto::StepReply {
                step_index: 0,
                guidance_scale: Some(0.0),
                ..Default::default()
            },
            "guidance_scale",
            "turns classifier-free guidance off",
        ),
        (
            with(
                "prompt_embeds",
                stepstream::client::conditional_half(&embeds).unwrap(),
            ),
            "tensors[prompt_embeds]",
            "runs classifier-free guidance",
        ),
        (
            proto::StepReply {
                step_index: 0,
                guidance_scale: Some(f32::NAN),
                ..Default::default()
            },
            "guidance_scale",
            "finite",
        ),
    ];
    let kinds = bad.len();
    for (reply, field, reason) in bad {
        s.reply(reply).await;
        match s.expect().await {
            Kind::ReplyRejected(r) => {
                assert_eq!(r.step_index, 0);
                assert_eq!(r.field, field);
                assert!(r.reason.contains(reason), "{field}: {}", r.reason);
            }
            other => panic!("expected ReplyRejected for {field}, got {other:?}"),
        }
    }
    // The same step is still pending; valid empty replies finish the run unchanged.
    s.reply(ok_reply(0)).await;
    let mut last = 0;
    let done = loop {
        match s.expect().await {
            Kind::StepEnd(e) => {
                last = e.step_index;
                s.reply(ok_reply(e.step_index)).await;
            }
            Kind::Completed(c) => break c,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(last, 3);
    let got = unwire(done.latents.as_ref().unwrap());
    assert_eq!(common::max_abs_diff(&got, &reference), 0.0);
    println!("{kinds} rejection kinds answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_abort_ends_the_stream_with_deadline_exceeded() {
    let srv = server::start(Default::default()).await;
    let mut c = srv.client().await;
    let cb = proto::CallbackOptions {
        reply_timeout_ms: 100,
        on_timeout: proto::TimeoutAction::Abort as i32,
        ..Default::default()
    };
    let mut s = Session::start(&mut c, subscribed(4, cb)).await.unwrap();
    let (_, step) = first_step(&mut s).await;
    assert!(step.reply_required);
    let err = s.next().await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.message().contains("step 0"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_continue_goes_on_unchanged() {
    let srv = server::start(Default::default()).await;
    let reference = reference_latents(&srv, 4).await;
    let mut c = srv.client().await;
    let cb = proto::CallbackOptions {
        reply_timeout_ms: 30,
        on_timeout: proto::TimeoutAction::Continue as i32,
        tensor_inputs: vec!["latents".into()],
        ..Default::default()
    };
    let mut s = Session::start(&mut c, subscribed(4, cb)).await.unwrap();
    let done = s.until_completed().await;
    let got = unwire(done.latents.as_ref().unwrap());
    assert_eq!(common::max_abs_diff(&got, &reference), 0.0);
    assert!(done.timings.unwrap().callback_wait_ms >= 4.0 * 30.0 * 0.9);
}

/// With one live place and no queue: a client that disconnects mid-run frees it at once for the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_run_frees_the_slot_for_the_next_client() {
    let srv = server::start(Options {
        max_queue: 0,
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    let mut a_client = srv.client().await;
    let mut a = Session::start(&mut a_client, subscribed(10, blocking(&[])))
        .await
        .unwrap();
    let _ = first_step(&mut a).await;
    // While A holds the only slot, B is refused.
    let mut b_client = srv.client().await;
    let err = b_client.generate_once(request(2)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // A vanishes (drops its stream and connection).
    drop(a);
    drop(a_client);
    let start = Instant::now();
    loop {
        match b_client.generate_once(request(2)).await {
            Ok(done) => {
                assert_eq!(done.into_inner().images.len(), 1);
                break;
            }
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "slot not freed after A left"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    println!("slot freed {:?} after disconnect", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_cancels_the_generation() {
    let srv = server::start(Options {
        max_queue: 0,
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    let mut c = srv.client().await;
    let mut s = Session::start(&mut c, subscribed(10, blocking(&[])))
        .await
        .unwrap();
    let _ = first_step(&mut s).await;
    s.half_close();
    let err = s.next().await.unwrap_err();
    assert_eq!(err.code(), Code::Cancelled);
    // The slot is free again.
    let done = c.generate_once(request(2)).await.unwrap().into_inner();
    assert!(!done.images.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_resource_exhausted_and_queued_clients_run_in_turn() {
    let srv = server::start(Options {
        max_queue: 1,
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    let mut c = srv.client().await;
    let mut a = Session::start(&mut c, subscribed(3, blocking(&[])))
        .await
        .unwrap();
    let _ = first_step(&mut a).await;
    // B waits in the queue (admitted, not yet Accepted).
    let mut b = Session::start(&mut c, subscribed(3, blocking(&[])))
        .await
        .unwrap();
    // C finds no room.
    let err = Session::start(&mut c, request(3))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("queue is full"), "{}", err.message());
    // B is told at once that one generation is ahead of it.
    let Kind::Queued(q) = b.expect().await else {
        panic!("expected Queued")
    };
    assert_eq!(q.position, 1);
    // A finishes, then B runs.
    for i in 0..3 {
        a.reply(ok_reply(i)).await;
        if i < 2 {
            assert!(matches!(a.expect().await, Kind::StepEnd(_)));
        }
    }
    assert!(matches!(a.expect().await, Kind::Completed(_)));
    let (acc, step) = first_step(&mut b).await;
    assert_eq!(acc.queue_position, 1);
    assert_eq!(step.step_index, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field() {
    let srv = server::start(Default::default()).await;
    let mut c = srv.client().await;
    let cases: Vec<(proto::GenerateRequest, Code, &str)> = vec![
        (
            proto::GenerateRequest {
                model: "nope".into(),
                ..request(2)
            },
            Code::NotFound,
            "tiny-sd15",
        ),
        (
            proto::GenerateRequest {
                scheduler: "warp".into(),
                ..request(2)
            },
            Code::InvalidArgument,
            "ddim, euler",
        ),
        (
            proto::GenerateRequest {
                width: Some(60),
                ..request(2)
            },
            Code::InvalidArgument,
            "start.width",
        ),
        (
            proto::GenerateRequest {
                num_inference_steps: 5000,
                ..request(2)
            },
            Code::InvalidArgument,
            "start.num_inference_steps",
        ),
        (
            proto::GenerateRequest {
                latents: Some(wire(
                    &candle_core::Tensor::zeros(
                        (1, 4, 4, 4),
                        candle_core::DType::F32,
                        &candle_core::Device::Cpu,
                    )
                    .unwrap(),
                )),
                ..request(2)
            },
            Code::InvalidArgument,
            "start.latents",
        ),
        (
            subscribed(2, blocking(&["add_time_ids"])),
            Code::InvalidArgument,
            "start.callback.tensor_inputs",
        ),
        (
            proto::GenerateRequest {
                latents: Some(wire(
                    &candle_core::Tensor::full(f32::NAN, (1, 4, 8, 8), &candle_core::Device::Cpu)
                        .unwrap(),
                )),
                ..request(2)
            },
            Code::InvalidArgument,
            "start.latents",
        ),
        (
            proto::GenerateRequest {
                guidance_scale: Some(f32::INFINITY),
                ..request(2)
            },
            Code::InvalidArgument,
            "start.guidance_scale",
        ),
    ];
    for (req, code, needle) in cases {
        let err = match Session::start(&mut c, req).await {
            Err(e) => e,
            Ok(mut s) => loop {
                match s.next().await {
                    Err(e) => break e,
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("no error for {needle}"),
                }
            },
        };
        assert_eq!(err.code(), code, "{needle}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    // A stream that does not begin with `start`.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(proto::ClientMessage {
        kind: Some(proto::client_message::Kind::Reply(ok_reply(0))),
    })
    .await
    .unwrap();
    drop(tx);
    let err = c
        .generate(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("start"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_reproduce_and_unset_seeds_are_reported() {
    let srv = server::start(Default::default()).await;
    let mut c = srv.client().await;
    let a = c.generate_once(request(3)).await.unwrap().into_inner();
    let b = c.generate_once(request(3)).await.unwrap().into_inner();
    assert_eq!(a.images[0].data, b.images[0].data);
    assert_eq!(a.seed, 7);
    let mut s = Session::start(
        &mut c,
        proto::GenerateRequest {
            seed: None,
            ..request(3)
        },
    )
    .await
    .unwrap();
    let Kind::Accepted(acc) = s.expect().await else {
        panic!()
    };
    let done = s.until_completed().await;
    assert_eq!(acc.seed, done.seed);
    let again = c
        .generate_once(proto::GenerateRequest {
            seed: Some(done.seed),
            ..request(3)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.images[0].data, done.images[0].data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_models_and_latent_only_output() {
    let srv = server::start(Default::default()).await;
    let mut c = srv.client().await;
    let list = c
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.default_model, "tiny-sd15");
    let m = &list.models[0];
    assert_eq!(
        (m.family.as_str(), m.default_width, m.default_height),
        ("sd1", 64, 64)
    );
    assert_eq!(m.default_scheduler, "ddim");
    assert_eq!(
        m.schedulers,
        vec![
            "ddim",
            "euler",
            "euler_a",
            "dpmpp_2m",
            "dpmpp_2m_karras",
            "pndm",
            "lcm",
            "unipc",
            "ddpm",
        ]
    );
    assert_eq!(
        m.callback_tensor_inputs,
        vec!["latents", "prompt_embeds", "negative_prompt_embeds"]
    );
    assert_eq!(
        (
            m.prediction_type.as_str(),
            m.device.as_str(),
            m.dtype.as_str()
        ),
        ("epsilon", "cpu", "f32")
    );
    let done = c
        .generate_once(proto::GenerateRequest {
            output: Some(proto::OutputOptions {
                format: proto::ImageFormat::None as i32,
                return_latents: false,
                ..Default::default()
            }),
            ..request(2)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.images.is_empty());
    assert_eq!(done.latents.unwrap().shape, vec![1, 4, 8, 8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let srv = server::start(Default::default()).await;
    let mut health = HealthClient::new(srv.channel().await);
    for service in ["", "stepstream.v1.Diffusion"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }

    use tonic_reflection::pb::v1 as r1;
    let mut refl = r1::server_reflection_client::ServerReflectionClient::new(srv.channel().await);
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"stepstream.v1.Diffusion"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    use tonic_reflection::pb::v1alpha as ra;
    let mut refl = ra::server_reflection_client::ServerReflectionClient::new(srv.channel().await);
    let req = ra::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            ra::server_reflection_request::MessageRequest::FileContainingSymbol(
                "stepstream.v1.Diffusion".into(),
            ),
        ),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        resp.message_response,
        Some(ra::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_to_an_observe_only_session_are_rejected_not_fatal() {
    let srv = server::start(Default::default()).await;
    let mut c = srv.client().await;
    let cb = proto::CallbackOptions {
        observe_only: true,
        step_indices: vec![0],
        ..Default::default()
    };
    let mut s = Session::start(&mut c, subscribed(3, cb)).await.unwrap();
    s.reply(ok_reply(0)).await;
    let mut rejected = false;
    loop {
        match s.expect().await {
            Kind::ReplyRejected(r) => {
                assert!(r.reason.contains("observe-only"));
                rejected = true;
            }
            Kind::Completed(_) => break,
            _ => {}
        }
    }
    assert!(rejected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_start_times_out() {
    let srv = server::start(Options {
        reply_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let mut c = srv.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::ClientMessage>(1);
    let started = Instant::now();
    let err = c
        .generate(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    drop(tx);
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.message().contains("start"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(5));
}
