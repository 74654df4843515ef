//! The device loop: one OS thread per device owns the models and every live session, and ticks.
//! A tick takes the replies that arrived (never waiting for one), ends sessions whose client
//! left or whose deadline passed, takes queued jobs live in FIFO order, runs one UNet call per
//! group of ready compatible sessions (rows packed per session), sends each session its own
//! events, and decodes finished sessions together. It sleeps only when no session is ready.

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use super::doorbell::Doorbell;
use super::live::{Live, Meta, Phase};
use super::{EngineConfig, EngineError, Job};
use crate::metrics::Metrics;
use crate::models::pipeline_model::StableDiffusionModel;
use crate::pipeline::{decode_batch, sd, step_batch, BatchKey, Session};
use crate::proto;

/// How many queued jobs one tick may encode while other sessions are ready to step: text
/// encoding is interleaved between ticks so that it never holds ready sessions back for long.
const ENCODES_PER_BUSY_TICK: usize = 1;

/// The longest a tick is held for replies that were just asked for (see [`gather_until`]).
const MAX_GATHER: Duration = Duration::from_millis(50);

/// Runs the loop until the engine is dropped and every live session has ended.
pub(super) fn run(
    config: &EngineConfig,
    models: &[StableDiffusionModel],
    jobs: Receiver<Job>,
    bell: &Doorbell,
    metrics: &Metrics,
) {
    metrics
        .max_sessions
        .store(config.max_sessions as u64, Ordering::Relaxed);
    metrics
        .max_batch
        .store(config.max_batch as u64, Ordering::Relaxed);
    let mut live: Vec<Live<'_>> = Vec::new();
    let mut pending: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    // How long the last tick's UNet calls took: the scale of the gather window.
    let mut last_steps = Duration::ZERO;
    loop {
        // Everything submitted so far, in order; the queue's length is bounded by admission.
        while open {
            match jobs.try_recv() {
                Ok(job) => pending.push_back(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        drop_departed(&mut pending, metrics);
        if !open && live.is_empty() && pending.is_empty() {
            return;
        }

        // Poll every session: none of this waits.
        let now = Instant::now();
        for l in live.iter_mut() {
            if let Err(e) = l.poll(now, metrics) {
                end(l, e, metrics);
            }
        }
        retire(&mut live);
        if let Some(until) = gather_until(&live, last_steps, config.batch_window_pct, now) {
            bell.wait(Some(until));
            continue;
        }

        let busy = Instant::now();
        // FIFO admission: queued jobs go live in order while there is room.
        let budget = if live.iter().any(|l| l.is_ready()) {
            ENCODES_PER_BUSY_TICK
        } else {
            usize::MAX
        };
        let mut started = 0;
        while live.len() < config.max_sessions && started < budget {
            let Some(job) = pending.pop_front() else {
                break;
            };
            started += 1;
            if let Some(l) = go_live(config, models, job, metrics) {
                live.push(l);
            }
        }
        let steps_start = Instant::now();
        let stepped = step_ready(&mut live, config.max_batch, metrics);
        if stepped > 0 {
            last_steps = steps_start.elapsed();
        }
        let decoded = decode_finished(&mut live, metrics);
        if started + stepped + decoded > 0 {
            metrics
                .busy_us
                .fetch_add(busy.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        retire(&mut live);

        let ready = live.iter().filter(|l| l.is_ready()).count();
        let waiting = live.iter().filter(|l| l.is_waiting()).count();
        metrics
            .sessions_live
            .store(live.len() as u64, Ordering::Relaxed);
        metrics
            .sessions_ready
            .store(ready as u64, Ordering::Relaxed);
        metrics
            .sessions_waiting
            .store(waiting as u64, Ordering::Relaxed);
        // The load report (metrics, ORCA): compute the live sessions want, and the queue's.
        let rows_wanted: usize = live.iter().map(|l| l.rows_wanted()).sum();
        let rows_queued: usize = pending.iter().map(|j| j.rows()).sum();
        metrics
            .rows_wanted
            .store(rows_wanted as u64, Ordering::Relaxed);
        metrics
            .rows_queued
            .store(rows_queued as u64, Ordering::Relaxed);
        let can_start = !pending.is_empty() && live.len() < config.max_sessions;
        if ready == 0 && !can_start {
            // Nothing to compute: sleep until a ring (reply, departure, new job, room for
            // events, shutdown) or the nearest deadline of a live session.
            let wake = live.iter().filter_map(|l| l.next_wake()).min();
            bell.wait(wake);
        }
    }
}

/// When to start the next tick, if it should be held at all: some sessions are ready, and
/// others were asked for a reply less than `pct`% of the last tick's step time ago (at most
/// [`MAX_GATHER`]). Why: a client that answers at once takes well under a millisecond on
/// loopback, but after a tick every blocking session waits at the same moment; without this
/// the first reply would start a tick of one and the rest would follow in a second tick, so a
/// batch of blocking sessions would split apart. The hold is bounded by each reply's own
/// window, so a client that thinks longer than that sits the tick out and costs the others at
/// most `pct`% of a step.
fn gather_until(
    live: &[Live<'_>],
    last_steps: Duration,
    pct: u32,
    now: Instant,
) -> Option<Instant> {
    if pct == 0 || !live.iter().any(|l| l.is_ready()) {
        return None;
    }
    let window = (last_steps * pct / 100).min(MAX_GATHER);
    live.iter()
        .filter_map(|l| l.waiting_since())
        .map(|since| since + window)
        .filter(|&until| until > now)
        .max()
}

/// Queued jobs whose client left are answered now (their slot is already free).
fn drop_departed(pending: &mut VecDeque<Job>, metrics: &Metrics) {
    pending.retain(|job| {
        if job.link.events.is_closed() {
            job.slot.leave();
        }
        if job.slot.cancel_flag().is_cancelled() {
            let e = stop_error(&job.slot);
            tracing::info!(parent: &job.span, request_id = %job.request_id, "left while queued");
            job.link.verdict.set(e.clone());
            metrics.request(e.outcome());
            false
        } else {
            true
        }
    });
}

/// The error a job stopped before it went live ends with (a cancelled flag with no reason
/// cannot happen; it would read as the client's departure).
fn stop_error(slot: &super::Slot) -> EngineError {
    slot.cancel_flag()
        .reason()
        .unwrap_or(super::StopReason::ClientGone)
        .error()
}

/// Ends a session with `e`: the client's stream reports it after the events already sent.
fn end(l: &mut Live<'_>, e: EngineError, metrics: &Metrics) {
    tracing::info!(parent: &l.meta.span, error = %e, "generation ended with an error");
    // A generation already counted as completed (its client left before reading Completed)
    // keeps that one outcome.
    if !l.counted() {
        metrics.request(e.outcome());
    }
    l.link.verdict.set(e);
    l.meta.slot.finish();
    l.abandon();
}

/// Drops sessions that are over (each was counted when it completed or failed).
fn retire(live: &mut Vec<Live<'_>>) {
    live.retain(|l| !l.is_finished());
}

/// Runs `f`, turning a panic into an internal error (a bug must end requests, not the device).
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            tracing::error!(error = %msg, "{what} panicked");
            Err(EngineError::Internal(format!("{what} panicked: {msg}")))
        }
    }
}

/// Takes a queued job live: decodes its tensors, encodes the prompt, checks what needs the
/// scheduler, and queues Accepted. A failure answers the job and returns `None`.
fn go_live<'m>(
    config: &EngineConfig,
    models: &'m [StableDiffusionModel],
    job: Job,
    metrics: &Metrics,
) -> Option<Live<'m>> {
    if !job.slot.start() {
        let e = stop_error(&job.slot);
        job.link.verdict.set(e.clone());
        metrics.request(e.outcome());
        return None;
    }
    let span = job.span.clone();
    let _enter = span.enter();
    let Job {
        request_id,
        model_index,
        mut params,
        tensors,
        queue_position,
        subscription,
        return_latents,
        link,
        slot,
        deadline,
        admitted,
        replay,
        record,
        ..
    } = job;
    let queue_ms = admitted.elapsed().as_secs_f64() * 1e3;
    let model = &models[model_index];
    let prepared = guarded("prepare", || {
        tensors.decode_into(&mut params, config.max_tensor_bytes)?;
        let session = sd::prepare(model, &params)?;
        let accepted = accepted(
            &request_id,
            model,
            &params,
            &session,
            &subscription,
            queue_position,
        )?;
        Ok((session, accepted))
    });
    let (session, accepted) = match prepared {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(error = %e, "generation ended with an error");
            metrics.request(e.outcome());
            link.verdict.set(e);
            slot.finish();
            return None;
        }
    };
    let stall_timeout = subscription
        .as_ref()
        .map(|s| s.reply_timeout)
        .unwrap_or(config.default_reply_timeout);
    let meta = Meta {
        request_id,
        seed: params.seed,
        return_latents,
        queue_ms,
        deadline,
        span: span.clone(),
        slot,
        stall_timeout,
        max_tensor_bytes: config.max_tensor_bytes,
        script: replay.map(VecDeque::from),
        record,
    };
    let mut l = Live::new(meta, session, subscription, link, accepted);
    if let Err(e) = l.start(Instant::now()) {
        end(&mut l, e, metrics);
    }
    Some(l)
}

/// The Accepted event of a prepared session (its step indices were checked before it queued).
fn accepted(
    request_id: &str,
    model: &StableDiffusionModel,
    params: &sd::GenerateParams,
    session: &Session<'_>,
    subscription: &Option<super::Subscription>,
    queue_position: u32,
) -> Result<proto::server_message::Kind, EngineError> {
    let timesteps = session.timesteps();
    let wire = subscription
        .as_ref()
        .map(|s| s.wire_dtype)
        .unwrap_or(proto::DType::DtypeF32);
    let initial = session.callback_tensors();
    let tensor_specs = subscription
        .as_ref()
        .map(|s| {
            s.tensor_inputs
                .iter()
                .filter_map(|n| {
                    initial.get(n).map(|t| proto::TensorSpec {
                        name: n.clone(),
                        dtype: wire as i32,
                        shape: t.dims().iter().map(|&d| d as i64).collect(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(proto::server_message::Kind::Accepted(proto::Accepted {
        request_id: request_id.to_string(),
        model: model.id.clone(),
        seed: params.seed,
        timesteps,
        callback_tensor_inputs: model
            .callback_tensor_inputs()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        width: params.width as u32,
        height: params.height as u32,
        guidance_scale: session.guidance_scale() as f32,
        scheduler: session.scheduler_name().into(),
        sigmas: session.sigmas().to_vec(),
        tensor_specs,
        queue_position,
    }))
}

/// Steps every ready session once: grouped by [`BatchKey`] (in admission order within a
/// group), each group split into UNet calls of at most `max_batch` rows. No ready session is
/// left out of a tick. Returns the number of sessions stepped.
fn step_ready(live: &mut [Live<'_>], max_batch: usize, metrics: &Metrics) -> usize {
    let mut groups: BTreeMap<BatchKey, Vec<usize>> = BTreeMap::new();
    for (i, l) in live.iter().enumerate() {
        if let (true, Some(s)) = (l.is_ready(), &l.session) {
            groups.entry(s.batch_key()).or_default().push(i);
        }
    }
    let mut stepped = 0;
    for members in groups.into_values() {
        // Calls of at most max_batch rows; a session larger than that runs alone.
        let mut calls: Vec<Vec<usize>> = Vec::new();
        let mut rows = 0;
        for i in members {
            let r = live[i].session.as_ref().map_or(0, |s| s.rows());
            match calls.last_mut() {
                Some(call) if rows + r <= max_batch => {
                    call.push(i);
                    rows += r;
                }
                _ => {
                    calls.push(vec![i]);
                    rows = r;
                }
            }
        }
        for call in calls {
            stepped += call.len();
            run_call(live, &call, metrics);
        }
    }
    stepped
}

/// One UNet call over the sessions at `indices`, then each session's events.
fn run_call(live: &mut [Live<'_>], indices: &[usize], metrics: &Metrics) {
    let sync = indices.iter().any(|&i| {
        let l = &live[i];
        match (&l.sub, &l.session) {
            (Some(sub), Some(s)) => sub.wants(s.next_step()),
            _ => false,
        }
    });
    let mut members: Vec<&mut Live<'_>> = live
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| indices.contains(i))
        .map(|(_, l)| l)
        .collect();
    let rows: usize = members
        .iter()
        .filter_map(|l| l.session.as_ref())
        .map(|s| s.rows())
        .sum();
    let result = guarded("a denoising step", || {
        let mut sessions: Vec<&mut Session<'_>> = members
            .iter_mut()
            .filter_map(|l| l.session.as_mut())
            .collect();
        step_batch(&mut sessions, sync).map_err(EngineError::from)
    });
    metrics.unet_rows.observe(rows as f64);
    let now = Instant::now();
    for l in members {
        let r = match &result {
            Ok(_) => l.after_unet(now, metrics),
            Err(e) => Err(e.clone()),
        };
        if let Err(e) = r {
            end(l, e, metrics);
        }
    }
}

/// Decodes every session whose loop is over, those of one model and latent shape in one VAE
/// call, and queues their Completed. Returns the number decoded.
fn decode_finished(live: &mut [Live<'_>], metrics: &Metrics) -> usize {
    let mut groups: BTreeMap<(usize, Vec<usize>), Vec<usize>> = BTreeMap::new();
    for (i, l) in live.iter().enumerate() {
        if let (Phase::Decode, Some(s)) = (l.phase, &l.session) {
            let model = s.model() as *const StableDiffusionModel as usize;
            groups.entry((model, s.latent_shape())).or_default().push(i);
        }
    }
    let mut decoded = 0;
    for members in groups.into_values() {
        let sessions: Vec<Session<'_>> = members
            .iter()
            .filter_map(|&i| live[i].take_for_decode())
            .collect();
        let Some(model) = sessions.first().map(|s| s.model()) else {
            continue;
        };
        decoded += sessions.len();
        let result = guarded("decode", || {
            decode_batch(model, sessions).map_err(EngineError::from)
        });
        let now = Instant::now();
        match result {
            Ok(outputs) => {
                for (&i, output) in members.iter().zip(outputs) {
                    if let Err(e) = live[i].complete(output, now, metrics) {
                        end(&mut live[i], e, metrics);
                    }
                }
            }
            Err(e) => {
                for &i in &members {
                    end(&mut live[i], e.clone(), metrics);
                }
            }
        }
    }
    decoded
}
