//! Every stream ends honestly: with `Completed` and then OK, or with a non-OK status that says
//! why; never OK without a result. A client half-closes, or disconnects, at every point of a
//! session's life, 100 times each, and each ending is checked (disconnects, whose client sees
//! nothing more, by the outcome the server counts).

mod common;

use std::time::Duration;

use common::server::{self, Options, TestServer};
use common::session::{ok_reply, Session};
use stepstream::metrics::Outcome;
use stepstream::proto::{self, server_message::Kind};
use tonic::Code;

const TIMES: usize = 100;

/// Where in a session's life the client goes away.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Point {
    /// Right after sending `start`.
    AfterStart,
    /// While queued behind a session that holds the only live place.
    Queued,
    /// While the device computes its steps (observe-only, many steps).
    MidStep,
    /// While the server waits for its reply.
    AwaitingReply,
    /// After the last step's StepEnd, its reply not sent.
    AfterLastStep,
}

const POINTS: [Point; 5] = [
    Point::AfterStart,
    Point::Queued,
    Point::MidStep,
    Point::AwaitingReply,
    Point::AfterLastStep,
];

const STEPS: u32 = 3;

fn request(observe_only: bool, steps: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: "end of stream".into(),
        num_inference_steps: steps,
        seed: Some(1),
        callback: Some(proto::CallbackOptions {
            observe_only,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How a stream ended, as its client saw it.
#[derive(Debug, PartialEq)]
enum End {
    Completed,
    Status(Code),
}

/// Reads the stream to its end; panics on an OK end without Completed, or events after it.
async fn end_of(s: &mut Session) -> End {
    loop {
        match s.next().await {
            Ok(Some(Kind::Completed(_))) => {
                assert!(
                    matches!(s.next().await, Ok(None)),
                    "Completed must be the last event, followed by OK"
                );
                return End::Completed;
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended with OK but no Completed"),
            Err(status) => {
                assert_ne!(status.code(), Code::Ok);
                return End::Status(status.code());
            }
        }
    }
}

/// Drives a session to `point`; returns it (and the holder of the live place, for `Queued`).
async fn reach(srv: &TestServer, point: Point) -> (Session, Option<Session>) {
    let mut c = srv.client().await;
    match point {
        Point::AfterStart => (
            Session::start(&mut c, request(false, STEPS)).await.unwrap(),
            None,
        ),
        Point::Queued => {
            let mut holder = Session::start(&mut c, request(false, STEPS)).await.unwrap();
            loop {
                if let Kind::StepEnd(_) = holder.expect().await {
                    break;
                }
            }
            let mut s = Session::start(&mut c, request(false, STEPS)).await.unwrap();
            let Kind::Queued(q) = s.expect().await else {
                panic!("expected Queued")
            };
            assert_eq!(q.position, 1);
            (s, Some(holder))
        }
        Point::MidStep => {
            let mut s = Session::start(&mut c, request(true, 50)).await.unwrap();
            loop {
                if let Kind::StepEnd(_) = s.expect().await {
                    break (s, None);
                }
            }
        }
        Point::AwaitingReply | Point::AfterLastStep => {
            let mut s = Session::start(&mut c, request(false, STEPS)).await.unwrap();
            let last = if point == Point::AwaitingReply {
                0
            } else {
                STEPS - 1
            };
            loop {
                if let Kind::StepEnd(e) = s.expect().await {
                    if e.step_index == last {
                        break (s, None);
                    }
                    s.reply(ok_reply(e.step_index)).await;
                }
            }
        }
    }
}

/// A server with one live place, so that a second session queues.
async fn one_place() -> TestServer {
    server::start(Options {
        max_sessions: 1,
        max_queue: 4,
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_at_any_point_ends_the_stream_cancelled() {
    let srv = one_place().await;
    for point in POINTS {
        for i in 0..TIMES {
            let (mut s, holder) = reach(&srv, point).await;
            s.half_close();
            assert_eq!(
                end_of(&mut s).await,
                End::Status(Code::Cancelled),
                "{point:?}, try {i}"
            );
            drop(holder);
        }
    }
}

/// Waits (a bounded number of polls) until the server has counted `n` cancelled requests.
async fn cancelled_reaches(srv: &TestServer, n: u64) -> u64 {
    let mut seen = 0;
    for _ in 0..500 {
        seen = srv.metrics.requests(Outcome::Cancelled);
        if seen >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_at_any_point_is_counted_cancelled_and_frees_the_place() {
    let srv = one_place().await;
    let mut expected = 0;
    for point in POINTS {
        for i in 0..TIMES {
            let (s, holder) = reach(&srv, point).await;
            drop(s);
            expected += 1;
            let counted = cancelled_reaches(&srv, expected).await;
            assert_eq!(counted, expected, "{point:?}, try {i}");
            if let Some(h) = holder {
                drop(h);
                expected += 1;
            }
        }
    }
    // Every place is free again: a fresh generation runs at once.
    let mut c = srv.client().await;
    let mut req = request(true, 1);
    req.callback = None;
    c.generate_once(req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_end_before_any_event_with_the_status_that_says_why() {
    let srv = server::start(Options {
        max_sessions: 1,
        max_queue: 0,
        ..Default::default()
    })
    .await;
    let mut c = srv.client().await;
    let (mut holder, _) = reach(&srv, Point::AwaitingReply).await;
    // Queue overflow.
    let err = Session::start(&mut c, request(false, STEPS))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::ResourceExhausted);
    // An invalid request.
    let mut bad = request(false, STEPS);
    bad.width = Some(65);
    let err = Session::start(&mut c, bad).await.err().expect("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    // The holder completes honestly.
    for step in 0..STEPS {
        holder.reply(ok_reply(step)).await;
        if step + 1 < STEPS {
            loop {
                if let Kind::StepEnd(_) = holder.expect().await {
                    break;
                }
            }
        }
    }
    assert_eq!(end_of(&mut holder).await, End::Completed);
}
