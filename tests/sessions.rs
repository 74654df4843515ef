//! Sessions share the device: a client that thinks (or never answers) costs the others nothing
//! but its memory, and every behaviour of a lone session holds while others share its ticks.
//! The assertions count UNet calls and compare bytes; none of them times anything.

mod common;

use std::time::Duration;

use common::server::{self, Options, TestServer};
use common::session::{ok_reply, Session};
use stepstream::proto::{self, server_message::Kind};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn request(steps: u32, seed: u64) -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        num_inference_steps: steps,
        seed: Some(seed),
        output: Some(proto::OutputOptions {
            format: proto::ImageFormat::Png as i32,
            return_latents: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn with_callback(
    req: proto::GenerateRequest,
    cb: proto::CallbackOptions,
) -> proto::GenerateRequest {
    proto::GenerateRequest {
        callback: Some(cb),
        ..req
    }
}

fn observe() -> proto::CallbackOptions {
    proto::CallbackOptions {
        tensor_inputs: vec!["latents".into()],
        observe_only: true,
        ..Default::default()
    }
}

fn blocking() -> proto::CallbackOptions {
    proto::CallbackOptions::default()
}

/// The final latents' bytes of a generation run alone (no other session on the server).
async fn solo_latents(srv: &TestServer, req: proto::GenerateRequest) -> Vec<u8> {
    let mut c = srv.client().await;
    let mut req = req;
    req.callback = None;
    let done = c.generate_once(req).await.unwrap().into_inner();
    done.latents.unwrap().data
}

/// Reads events up to the first StepEnd (Queued and Accepted before it).
async fn until_step(s: &mut Session) -> proto::StepEnd {
    loop {
        match s.expect().await {
            Kind::StepEnd(e) => return e,
            Kind::Queued(_) | Kind::Accepted(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The status a stream ends with after its events (Completed ends it with `Ok`).
async fn end_of(mut s: Session) -> Result<proto::Completed, tonic::Status> {
    loop {
        match s.next().await? {
            Some(Kind::Completed(c)) => return Ok(c),
            Some(_) => {}
            None => panic!("the stream ended with OK but no Completed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_reply_cost_an_observer_no_ticks() {
    let srv = server::start(Options {
        reply_timeout: Duration::from_secs(120),
        ..Default::default()
    })
    .await;
    let steps = 10;
    let observer_req = with_callback(request(steps, 5), observe());
    let observer_solo = solo_latents(&srv, observer_req.clone()).await;
    let thinker_req = with_callback(request(steps, 9), blocking());
    let thinker_solo = solo_latents(&srv, thinker_req.clone()).await;

    // Three clients take their first step and then think: their replies are withheld.
    let mut thinkers = Vec::new();
    for _ in 0..3 {
        let mut c = srv.client().await;
        let mut s = Session::start(&mut c, thinker_req.clone()).await.unwrap();
        assert_eq!(until_step(&mut s).await.step_index, 0);
        thinkers.push((c, s));
    }
    let calls_before = srv.metrics.unet_rows.count();
    let rows_before = srv.metrics.unet_rows.sum();

    // The observer runs to the end while all three wait: had the device waited for any of
    // them, it would still be on its first step when their 120 s reply deadline passed.
    let mut c = srv.client().await;
    let mut observer = Session::start(&mut c, observer_req).await.unwrap();
    let done = observer.until_completed().await;
    assert_eq!(done.latents.unwrap().data, observer_solo);
    let calls = srv.metrics.unet_rows.count() - calls_before;
    let rows = srv.metrics.unet_rows.sum() - rows_before;
    assert_eq!(
        calls, steps as u64,
        "the observer's {steps} steps took {calls} UNet calls: exactly one call per step, nobody \
         else stepped"
    );
    assert_eq!(rows, 2.0 * steps as f64, "only the observer's CFG rows ran");
    assert!(
        srv.metrics
            .sessions_waiting
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );

    // The thinkers answer at last, and finish with their solo numbers.
    for (_, s) in &mut thinkers {
        for step in 0..steps {
            s.reply(ok_reply(step)).await;
            if step + 1 < steps {
                assert_eq!(until_step(s).await.step_index, step + 1);
            }
        }
    }
    for (_, s) in thinkers {
        let done = end_of(s).await.unwrap();
        assert_eq!(done.latents.unwrap().data, thinker_solo);
    }
}

/// Opens a stream whose `grpc-timeout` is `timeout`.
async fn start_with_deadline(
    srv: &TestServer,
    req: proto::GenerateRequest,
    timeout: Duration,
) -> (
    tokio::sync::mpsc::Sender<proto::ClientMessage>,
    tonic::Streaming<proto::ServerMessage>,
) {
    let mut c = srv.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(proto::ClientMessage {
        kind: Some(proto::client_message::Kind::Start(req)),
    })
    .await
    .unwrap();
    let mut call = tonic::Request::new(ReceiverStream::new(rx));
    call.set_timeout(timeout);
    (tx, c.generate(call).await.unwrap().into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_rejections_interrupts_and_departures_hold_while_sessions_share_ticks() {
    let srv = server::start(Options {
        max_sessions: 16,
        ..Default::default()
    })
    .await;
    let steps = 8;
    let reference = solo_latents(&srv, request(steps, 3)).await;
    let mut tasks = tokio::task::JoinSet::new();

    // Observers share every tick and keep their solo numbers.
    for _ in 0..3 {
        let mut c = srv.client().await;
        let req = with_callback(request(steps, 3), observe());
        let want = reference.clone();
        tasks.spawn(async move {
            let mut s = Session::start(&mut c, req).await.unwrap();
            assert_eq!(s.until_completed().await.latents.unwrap().data, want);
            "observer"
        });
    }
    // A silent client with ABORT ends DEADLINE_EXCEEDED; one with CONTINUE completes unchanged.
    for (action, label) in [
        (proto::TimeoutAction::Abort, "abort"),
        (proto::TimeoutAction::Continue, "continue"),
    ] {
        let mut c = srv.client().await;
        let req = with_callback(
            request(steps, 3),
            proto::CallbackOptions {
                reply_timeout_ms: 50,
                on_timeout: action as i32,
                ..Default::default()
            },
        );
        let want = reference.clone();
        tasks.spawn(async move {
            let s = Session::start(&mut c, req).await.unwrap();
            match (action, end_of(s).await) {
                (proto::TimeoutAction::Abort, Err(e)) => {
                    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}")
                }
                (proto::TimeoutAction::Continue, Ok(done)) => {
                    assert_eq!(done.latents.unwrap().data, want)
                }
                (_, other) => panic!("{label}: {other:?}"),
            }
            label
        });
    }
    // A rejected reply is answered with ReplyRejected; the corrected one goes through.
    {
        let mut c = srv.client().await;
        let req = with_callback(request(steps, 3), blocking());
        let want = reference.clone();
        tasks.spawn(async move {
            let mut s = Session::start(&mut c, req).await.unwrap();
            for step in 0..steps {
                let e = until_step(&mut s).await;
                assert_eq!(e.step_index, step);
                if step == 2 {
                    s.reply(ok_reply(step + 5)).await;
                    let Kind::ReplyRejected(r) = s.expect().await else {
                        panic!("expected ReplyRejected")
                    };
                    assert_eq!((r.step_index, r.field.as_str()), (2, "step_index"));
                }
                s.reply(ok_reply(step)).await;
            }
            assert_eq!(end_of(s).await.unwrap().latents.unwrap().data, want);
            "rejected then corrected"
        });
    }
    // An interrupt skips the remaining steps and still decodes.
    {
        let mut c = srv.client().await;
        let req = with_callback(request(steps, 3), blocking());
        tasks.spawn(async move {
            let mut s = Session::start(&mut c, req).await.unwrap();
            for step in 0..3 {
                assert_eq!(until_step(&mut s).await.step_index, step);
                let mut reply = ok_reply(step);
                reply.interrupt = step == 2;
                s.reply(reply).await;
            }
            let done = end_of(s).await.unwrap();
            assert!(done.interrupted && done.images.len() == 1);
            "interrupted"
        });
    }
    // A client that leaves while its reply is awaited, and one whose grpc-timeout passes.
    {
        let mut c = srv.client().await;
        let req = with_callback(request(steps, 3), blocking());
        tasks.spawn(async move {
            let mut s = Session::start(&mut c, req).await.unwrap();
            until_step(&mut s).await;
            drop(s);
            "departed"
        });
        let (tx, mut rx) = start_with_deadline(
            &srv,
            with_callback(request(steps, 3), blocking()),
            Duration::from_millis(300),
        )
        .await;
        tasks.spawn(async move {
            let status = loop {
                match rx.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("ended OK without Completed"),
                    Err(e) => break e,
                }
            };
            drop(tx);
            assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
            "grpc-timeout"
        });
    }
    let mut ended = Vec::new();
    while let Some(done) = tasks.join_next().await {
        ended.push(done.expect("a session task panicked"));
    }
    assert_eq!(ended.len(), 9);
    // Every session has left the device: the departed one's rows and memory with it.
    // (The gauge is written at the end of each tick, so give the loop a few ticks to finish.)
    let mut c = srv.client().await;
    let mut live = u64::MAX;
    for _ in 0..100 {
        c.generate_once(request(1, 0)).await.unwrap();
        live = srv
            .metrics
            .sessions_live
            .load(std::sync::atomic::Ordering::Relaxed);
        if live == 0 {
            break;
        }
    }
    assert_eq!(live, 0, "sessions still live after every client has gone");
}
