//! The concurrency section: many clients sharing one device through the real gRPC API.
//! - Scaling: N sessions at once against the same N one at a time, in the same run: images/s,
//!   the step latency each client sees (p50/p99), rows per UNet call, and whether every image
//!   is byte-identical to its one-at-a-time twin. A quarter of the sessions run with guidance 1
//!   (no CFG), so sessions of different row counts share calls.
//! - Think time: K clients that each think T ms before every reply, plus one observer started
//!   just after them; the observer's time over its time alone, and the device's busy share.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::grpc::{send, Loopback};
use super::{median, BenchError, PROMPT};
use crate::proto::{self, client_message, server_message::Kind};

/// The think-time goal: the observer takes at most this many times its time alone.
pub const THINK_TARGET_RATIO: f64 = 1.5;

/// What the concurrency section measures.
#[derive(Clone, Debug)]
pub struct ConcurrencyOptions {
    /// Session counts of the scaling table.
    pub sessions: Vec<usize>,
    /// Thinking clients of the think-time scenario.
    pub thinkers: usize,
    /// How long each thinker thinks before every reply, ms.
    pub think_ms: u64,
    /// Steps per generation.
    pub steps: u32,
    /// Image side, pixels.
    pub size: u32,
    /// Rounds per measurement (medians are reported).
    pub rounds: usize,
}

/// One line of the scaling table.
#[derive(Clone, Debug, Serialize)]
pub struct ScalingRow {
    /// Concurrent sessions.
    pub sessions: usize,
    /// `observe-only` or `blocking` (every step waits for an immediate reply).
    pub mode: &'static str,
    /// Images per second with all sessions at once.
    pub images_per_s: f64,
    /// Images per second with the same requests one at a time.
    pub one_at_a_time_images_per_s: f64,
    /// `images_per_s / one_at_a_time_images_per_s`.
    pub speedup: f64,
    /// Median time between a client's consecutive events, all at once, ms.
    pub step_p50_ms: f64,
    /// 99th percentile of the same, ms.
    pub step_p99_ms: f64,
    /// Median of the same, one at a time, ms.
    pub one_at_a_time_step_p50_ms: f64,
    /// Mean rows per UNet call while all ran at once.
    pub rows_per_call: f64,
    /// Every image byte-identical to its one-at-a-time run, in every round.
    pub identical: bool,
}

/// The think-time scenario.
#[derive(Clone, Debug, Serialize)]
pub struct ThinkReport {
    /// Thinking clients.
    pub thinkers: usize,
    /// Think time before every reply, ms.
    pub think_ms: u64,
    /// Steps per generation.
    pub steps: u32,
    /// The observer alone, median wall ms.
    pub observer_alone_ms: f64,
    /// The observer behind the thinkers, median wall ms.
    pub observer_shared_ms: f64,
    /// `observer_shared_ms / observer_alone_ms`.
    pub ratio: f64,
    /// Device busy time over the observer's wall time while it shared the device, %.
    pub busy_pct: f64,
    /// The goal for `ratio`.
    pub target_ratio: f64,
    /// Whether `ratio` meets it.
    pub meets_target: bool,
}

/// The whole section.
#[derive(Clone, Debug, Serialize)]
pub struct ConcurrencyReport {
    /// Steps per generation.
    pub steps: u32,
    /// Image side, pixels.
    pub size: u32,
    /// Rounds per measurement.
    pub rounds: usize,
    /// The scaling table.
    pub scaling: Vec<ScalingRow>,
    /// The think-time scenario.
    pub think: ThinkReport,
}

/// What one client saw of one generation.
struct Trace {
    wall_ms: f64,
    gaps_ms: Vec<f64>,
    png: Vec<u8>,
}

/// Runs `req` on `lb`'s client, replying to every StepEnd that waits after `think`; tells
/// `admitted` when the server's first event (Queued or Accepted) arrives.
async fn drive(
    lb: &mut Loopback,
    req: proto::GenerateRequest,
    think: Duration,
    mut admitted: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<Trace, BenchError> {
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel(4);
    send(&tx, client_message::Kind::Start(req)).await?;
    let mut inbound = lb
        .client_mut()
        .generate(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut gaps = Vec::new();
    let mut last: Option<Instant> = None;
    while let Some(msg) = inbound.message().await? {
        let now = Instant::now();
        if let Some(tell) = admitted.take() {
            let _ = tell.send(());
        }
        match msg.kind {
            Some(Kind::Accepted(_)) => last = Some(now),
            Some(Kind::StepEnd(s)) => {
                if let Some(l) = last {
                    gaps.push((now - l).as_secs_f64() * 1e3);
                }
                if s.reply_required {
                    if !think.is_zero() {
                        tokio::time::sleep(think).await;
                    }
                    let reply = proto::StepReply {
                        step_index: s.step_index,
                        ..Default::default()
                    };
                    send(&tx, client_message::Kind::Reply(reply)).await?;
                }
                last = Some(Instant::now());
            }
            Some(Kind::Completed(c)) => {
                return Ok(Trace {
                    wall_ms: t0.elapsed().as_secs_f64() * 1e3,
                    gaps_ms: gaps,
                    png: c
                        .images
                        .into_iter()
                        .next()
                        .map(|i| i.data)
                        .unwrap_or_default(),
                })
            }
            Some(Kind::ReplyRejected(r)) => {
                return Err(BenchError::Setup(format!("reply rejected: {r:?}")))
            }
            _ => {}
        }
    }
    Err(BenchError::Setup("stream ended without Completed".into()))
}

/// Session `i` of a scaling run: its own seed; every fourth runs with guidance 1 (no CFG).
fn session_request(
    i: usize,
    opts: &ConcurrencyOptions,
    observe_only: bool,
) -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: format!("{PROMPT}, variation {i}"),
        num_inference_steps: opts.steps,
        width: Some(opts.size),
        height: Some(opts.size),
        seed: Some(i as u64),
        guidance_scale: Some(if i % 4 == 3 { 1.0 } else { 7.5 }),
        callback: Some(proto::CallbackOptions {
            observe_only,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The `p`-quantile of `v` (nearest rank); 0 for none.
fn quantile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Runs every request at once, one client (connection) each; returns the wall time and traces.
async fn all_at_once(
    lb: &Loopback,
    requests: &[proto::GenerateRequest],
    think: Duration,
) -> Result<(f64, Vec<Trace>), BenchError> {
    let mut clients = Vec::with_capacity(requests.len());
    for _ in requests {
        clients.push(lb.another().await?);
    }
    let t0 = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .zip(requests.iter().cloned())
        .map(|(mut c, req)| tokio::spawn(async move { drive(&mut c, req, think, None).await }))
        .collect();
    let mut traces = Vec::with_capacity(tasks.len());
    for t in tasks {
        traces.push(
            t.await
                .map_err(|e| BenchError::Setup(format!("a client task failed: {e}")))??,
        );
    }
    Ok((t0.elapsed().as_secs_f64() * 1e3, traces))
}

/// The scaling table: each session count and mode, one at a time against all at once.
async fn scaling(
    lb: &mut Loopback,
    opts: &ConcurrencyOptions,
) -> Result<Vec<ScalingRow>, BenchError> {
    let mut rows = Vec::new();
    for &n in &opts.sessions {
        for (mode, observe_only) in [("observe-only", true), ("blocking", false)] {
            let requests: Vec<_> = (0..n)
                .map(|i| session_request(i, opts, observe_only))
                .collect();
            let (mut seq_walls, mut par_walls) = (Vec::new(), Vec::new());
            let (mut seq_gaps, mut par_gaps) = (Vec::new(), Vec::new());
            let mut rows_per_call = Vec::new();
            let mut identical = true;
            for _ in 0..opts.rounds.max(1) {
                let t0 = Instant::now();
                let mut solo = Vec::with_capacity(n);
                for req in &requests {
                    solo.push(drive(lb, req.clone(), Duration::ZERO, None).await?);
                }
                seq_walls.push(t0.elapsed().as_secs_f64() * 1e3);
                let (calls0, rows0) =
                    (lb.metrics().unet_rows.count(), lb.metrics().unet_rows.sum());
                let (wall, shared) = all_at_once(lb, &requests, Duration::ZERO).await?;
                let calls = lb.metrics().unet_rows.count() - calls0;
                let rows_run = lb.metrics().unet_rows.sum() - rows0;
                rows_per_call.push(rows_run / calls.max(1) as f64);
                par_walls.push(wall);
                identical &= solo.iter().zip(&shared).all(|(a, b)| a.png == b.png);
                seq_gaps.extend(solo.into_iter().flat_map(|t| t.gaps_ms));
                par_gaps.extend(shared.into_iter().flat_map(|t| t.gaps_ms));
            }
            let images_per_s = n as f64 / (median(par_walls) / 1e3);
            let one_at_a_time = n as f64 / (median(seq_walls) / 1e3);
            rows.push(ScalingRow {
                sessions: n,
                mode,
                images_per_s,
                one_at_a_time_images_per_s: one_at_a_time,
                speedup: images_per_s / one_at_a_time,
                step_p50_ms: quantile(par_gaps.clone(), 0.5),
                step_p99_ms: quantile(par_gaps, 0.99),
                one_at_a_time_step_p50_ms: quantile(seq_gaps, 0.5),
                rows_per_call: median(rows_per_call),
                identical,
            });
        }
    }
    Ok(rows)
}

/// The think-time scenario: the observer alone, then behind `thinkers` thinking clients.
async fn think_time(
    lb: &mut Loopback,
    opts: &ConcurrencyOptions,
) -> Result<ThinkReport, BenchError> {
    let observer = proto::GenerateRequest {
        callback: Some(proto::CallbackOptions {
            observe_only: true,
            ..Default::default()
        }),
        seed: Some(1000),
        ..session_request(0, opts, true)
    };
    let think = Duration::from_millis(opts.think_ms);
    let (mut alone, mut shared, mut busy) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.rounds.max(1) {
        alone.push(
            drive(lb, observer.clone(), Duration::ZERO, None)
                .await?
                .wall_ms,
        );

        // The thinkers start first: each is admitted (Queued or Accepted) before the observer.
        let mut thinkers = Vec::new();
        let mut started = Vec::new();
        for i in 0..opts.thinkers {
            let mut c = lb.another().await?;
            let req = session_request(100 + i, opts, false);
            let (tell, told) = tokio::sync::oneshot::channel();
            started.push(told);
            thinkers.push(tokio::spawn(async move {
                drive(&mut c, req, think, Some(tell)).await
            }));
        }
        for told in started {
            let _ = told.await;
        }
        let busy0 = lb
            .metrics()
            .busy_us
            .load(std::sync::atomic::Ordering::Relaxed);
        let trace = drive(lb, observer.clone(), Duration::ZERO, None).await?;
        let busy_ms = (lb
            .metrics()
            .busy_us
            .load(std::sync::atomic::Ordering::Relaxed)
            - busy0) as f64
            / 1e3;
        shared.push(trace.wall_ms);
        // Busy time is booked at the end of each tick, so a tick that began before the
        // observer can push the share a little past 100%.
        busy.push((100.0 * busy_ms / trace.wall_ms).min(100.0));
        for t in thinkers {
            t.await
                .map_err(|e| BenchError::Setup(format!("a thinker failed: {e}")))??;
        }
    }
    let (observer_alone_ms, observer_shared_ms) = (median(alone), median(shared));
    let ratio = observer_shared_ms / observer_alone_ms;
    Ok(ThinkReport {
        thinkers: opts.thinkers,
        think_ms: opts.think_ms,
        steps: opts.steps,
        observer_alone_ms,
        observer_shared_ms,
        ratio,
        busy_pct: median(busy),
        target_ratio: THINK_TARGET_RATIO,
        meets_target: ratio <= THINK_TARGET_RATIO,
    })
}

/// Measures the whole section on `lb`'s server.
pub async fn concurrency(
    lb: &mut Loopback,
    opts: &ConcurrencyOptions,
) -> Result<ConcurrencyReport, BenchError> {
    let scaling = scaling(lb, opts).await?;
    let think = think_time(lb, opts).await?;
    Ok(ConcurrencyReport {
        steps: opts.steps,
        size: opts.size,
        rounds: opts.rounds.max(1),
        scaling,
        think,
    })
}
