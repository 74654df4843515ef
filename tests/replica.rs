//! What one replica does for a fleet: a SIGTERM drain that loses nothing behind a balancer
//! (health NOT_SERVING at once, new streams served through the grace, then refused before any
//! response, every admitted session completed, then exit; liveness stays SERVING), and the load
//! report (live, waiting and queued sessions, free batch rows, the load ratio) that the metrics
//! and the ORCA out-of-band stream both give.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::server::{self, Options};
use common::session::Session;
use stepstream::proto::xds::data::orca::v3::OrcaLoadReport;
use stepstream::proto::xds::service::orca::v3::open_rca_service_client::OpenRcaServiceClient;
use stepstream::proto::xds::service::orca::v3::OrcaLoadReportRequest;
use stepstream::proto::{self, server_message::Kind};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn request(steps: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: "a cat".into(),
        num_inference_steps: steps,
        seed: Some(1),
        ..Default::default()
    }
}

/// A request whose client answers every step (the server waits for each reply).
fn blocking(steps: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        callback: Some(proto::CallbackOptions::default()),
        ..request(steps)
    }
}

async fn health(channel: tonic::transport::Channel, service: &str) -> ServingStatus {
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

/// Reads events up to the first StepEnd, which the server then waits on: the session holds its
/// live place until [`finish`] answers it.
async fn hold(s: &mut Session) -> u32 {
    loop {
        if let Kind::StepEnd(e) = s.expect().await {
            return e.step_index;
        }
    }
}

/// Answers the held step, if any, then reads events up to Completed, answering every StepEnd
/// with an empty reply.
async fn finish(s: &mut Session, held: Option<u32>) -> proto::Completed {
    if let Some(step_index) = held {
        s.reply(proto::StepReply {
            step_index,
            ..Default::default()
        })
        .await;
    }
    loop {
        match s.next().await.expect("stream ok").expect("an event") {
            Kind::StepEnd(e) => {
                s.reply(proto::StepReply {
                    step_index: e.step_index,
                    ..Default::default()
                })
                .await
            }
            Kind::Completed(c) => return c,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_serves_through_the_grace_then_refuses_before_any_response_and_completes_every_admitted_session(
) {
    let grace = Duration::from_millis(2500);
    let mut server = common::process::spawn_serve([
        "--drain-grace-ms",
        &grace.as_millis().to_string(),
        "--drain-timeout-ms",
        "60000",
        "--max-sessions",
        "1",
        "--max-queue",
        "8",
    ]);
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = server::connect(addr).await;

    // A holds the one live place (it waits for a reply at step 0); B is queued behind it.
    let mut a = Session::start(&mut c, blocking(4)).await.unwrap();
    let held = hold(&mut a).await;
    let mut b = Session::start(&mut c, request(4)).await.unwrap();
    assert!(matches!(b.expect().await, Kind::Queued(q) if q.position == 1));

    let t0 = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());

    // Readiness turns NOT_SERVING at once; liveness does not (a draining pod is not restarted).
    let not_serving = loop {
        if health(channel.clone(), "").await == ServingStatus::NotServing {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < grace, "health still SERVING after the grace");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        health(channel.clone(), "stepstream.v1.Diffusion").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        health(channel.clone(), "liveness").await,
        ServingStatus::Serving
    );

    // Inside the grace a new stream is still served: it queues behind A and B.
    let mut during = Session::start(&mut c, request(4)).await.unwrap();
    let admitted_at = t0.elapsed();
    assert!(
        admitted_at < grace,
        "the in-grace stream started {admitted_at:?} after SIGTERM"
    );
    assert!(matches!(during.expect().await, Kind::Queued(q) if q.position == 2));

    // After the grace a new stream is refused with UNAVAILABLE before any response (the call
    // itself fails: no header, no event), so a balancer or client may retry it elsewhere.
    let wait = (t0 + grace + Duration::from_millis(300)).saturating_duration_since(Instant::now());
    tokio::time::sleep(wait).await;
    let refused = Session::start(&mut c, request(4))
        .await
        .err()
        .expect("a stream after the grace is refused before any response");
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    assert!(refused.message().contains("shutting down"), "{refused}");

    // Every admitted session completes: A (its client answers now), then B and the in-grace one.
    let done_a = finish(&mut a, Some(held)).await;
    let done_b = finish(&mut b, None).await;
    let done_during = finish(&mut during, None).await;
    for (name, done) in [("A", &done_a), ("B", &done_b), ("in-grace", &done_during)] {
        assert_eq!(done.images.len(), 1, "{name}");
        assert!(!done.interrupted, "{name}");
    }
    assert!(a.next().await.unwrap().is_none());

    // Then the process exits by itself, cleanly.
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    println!(
        "drain: NOT_SERVING after {not_serving:?}, in-grace stream admitted after {admitted_at:?}, \
         refused after the {grace:?} grace, 3 admitted sessions completed, exit after {:?}",
        t0.elapsed()
    );
}

/// Reads ORCA reports until one satisfies `pred` (at most `n` reports).
async fn report_until(
    reports: &mut tonic::Streaming<OrcaLoadReport>,
    n: usize,
    what: &str,
    pred: impl Fn(&OrcaLoadReport) -> bool,
) -> OrcaLoadReport {
    let mut last = None;
    for _ in 0..n {
        let r = reports.message().await.unwrap().expect("a report");
        if pred(&r) {
            return r;
        }
        last = Some(r);
    }
    panic!("no report with {what} in {n} reports; last: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_report_counts_live_waiting_and_queued_sessions_in_the_metrics_and_over_orca() {
    let srv = server::start(Options {
        max_sessions: 2,
        max_batch: 8,
        ..Default::default()
    })
    .await;
    let mut orca = OpenRcaServiceClient::new(srv.channel().await);
    let mut reports = orca
        .stream_core_metrics(OrcaLoadReportRequest {
            report_interval: Some(Duration::from_millis(100).try_into().unwrap()),
            request_cost_names: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let idle = reports.message().await.unwrap().unwrap();
    assert_eq!(idle.application_utilization, 0.0);
    assert_eq!(idle.named_metrics["max_sessions"], 2.0);
    assert_eq!(idle.named_metrics["batch_rows_free"], 8.0);
    assert_eq!(
        srv.metrics
            .orca_streams
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Two blocking sessions take both live places and wait for their clients; a third (CFG:
    // two rows) queues.
    let mut c = srv.client().await;
    let mut a = Session::start(&mut c, blocking(3)).await.unwrap();
    let mut b = Session::start(&mut c, blocking(3)).await.unwrap();
    let held_a = hold(&mut a).await;
    let held_b = hold(&mut b).await;
    let mut q = Session::start(&mut c, request(3)).await.unwrap();
    assert!(matches!(q.expect().await, Kind::Queued(_)));

    let busy = report_until(&mut reports, 50, "2 live, 2 waiting, 1 queued", |r| {
        r.named_metrics["sessions_live"] == 2.0
            && r.named_metrics["sessions_waiting"] == 2.0
            && r.named_metrics["sessions_queued"] == 1.0
    })
    .await;
    // Waiting sessions want no compute: every row is free; the queued session's two rows are
    // the whole demand.
    assert_eq!(busy.named_metrics["batch_rows_free"], 8.0);
    assert_eq!(busy.application_utilization, 2.0 / 8.0);
    assert_eq!(busy.utilization["sessions"], 1.0);
    let text = srv.metrics.render();
    for needle in [
        "stepstream_sessions_live 2",
        "stepstream_sessions_waiting 2",
        "stepstream_queue_depth 1",
        "stepstream_batch_rows_free 8",
        "stepstream_load_ratio 0.25",
        "stepstream_max_sessions 2",
        "stepstream_orca_streams 1",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }

    // Everyone finishes: the load returns to zero and completions show as a rate.
    finish(&mut a, Some(held_a)).await;
    finish(&mut b, Some(held_b)).await;
    finish(&mut q, None).await;
    let after = report_until(
        &mut reports,
        50,
        "an idle replica that completed work",
        |r| r.named_metrics["sessions_live"] == 0.0 && r.named_metrics["sessions_queued"] == 0.0,
    )
    .await;
    assert_eq!(after.application_utilization, 0.0);
    // Closing the stream is seen in the metrics.
    drop(reports);
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv
        .metrics
        .orca_streams
        .load(std::sync::atomic::Ordering::Relaxed)
        != 0
    {
        assert!(
            Instant::now() < deadline,
            "the closed ORCA stream is still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
