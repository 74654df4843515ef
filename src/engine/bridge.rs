//! The step loop's bridge to a session: sends `StepEnd`, then blocks (with a deadline) for the
//! client's `StepReply`, checks it, answers bad ones with `ReplyRejected` and waits again.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{EngineError, EngineEvent, SessionLink, StopReason};
use crate::metrics::Metrics;
use crate::pipeline::{validate_control, CallbackError, StepCallback, StepControl, StepState};
use crate::proto;
use crate::proto::server_message::Kind;

/// How often a blocked reply wait checks whether it should stop.
const WAKE_INTERVAL: Duration = Duration::from_millis(50);

/// What a session subscribed to (the validated `CallbackOptions`).
#[derive(Clone, Debug)]
pub struct Subscription {
    /// Tensors sent with each StepEnd and replaceable in replies.
    pub tensor_inputs: Vec<String>,
    /// Explicit steps (sorted, unique); empty means every `every`-th step.
    pub step_indices: Vec<u32>,
    /// Report every `every`-th step when `step_indices` is empty (0 and 1: every step).
    pub every: u32,
    /// Events only; never wait for replies.
    pub observe_only: bool,
    /// Deadline of each reply wait.
    pub reply_timeout: Duration,
    /// What to do when the deadline passes.
    pub on_timeout: proto::TimeoutAction,
    /// Dtype of tensors sent to the client.
    pub wire_dtype: proto::DType,
}

impl Subscription {
    /// Whether step `i` produces a StepEnd.
    pub fn wants(&self, i: usize) -> bool {
        if !self.step_indices.is_empty() {
            return self.step_indices.binary_search(&(i as u32)).is_ok();
        }
        self.every <= 1 || i % self.every as usize == 0
    }
}

/// Sends one event, waiting at most `timeout` for room; a closed or stuck session cancels the job.
pub(super) fn send_event(
    handle: &tokio::runtime::Handle,
    events: &mpsc::Sender<EngineEvent>,
    event: EngineEvent,
    timeout: Duration,
) -> Result<(), EngineError> {
    match handle.block_on(async { tokio::time::timeout(timeout, events.send(event)).await }) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(EngineError::Cancelled),
        Err(_) => Err(EngineError::ClientStalled {
            timeout_ms: timeout.as_millis() as u64,
        }),
    }
}

fn to_callback_error(e: EngineError) -> CallbackError {
    match e {
        EngineError::ReplyTimeout {
            step_index,
            timeout_ms,
        } => CallbackError::ReplyTimeout {
            step_index,
            timeout_ms,
        },
        EngineError::ClientStalled { timeout_ms } => CallbackError::ClientStalled { timeout_ms },
        EngineError::Cancelled => CallbackError::Cancelled,
        other => CallbackError::Protocol(other.to_string()),
    }
}

/// Why a job must stop now: its client left, the server is shutting down, or its whole-generation
/// deadline passed.
fn interruption(
    link: &SessionLink,
    deadline: Option<(Instant, Duration)>,
) -> Option<CallbackError> {
    match link.cancel.reason() {
        Some(StopReason::Shutdown) => return Some(CallbackError::Shutdown),
        Some(StopReason::ClientGone) => return Some(CallbackError::Cancelled),
        None => {}
    }
    if link.events.is_closed() {
        return Some(CallbackError::Cancelled);
    }
    match deadline {
        Some((at, timeout)) if Instant::now() >= at => Some(CallbackError::Deadline {
            timeout_ms: timeout.as_millis() as u64,
        }),
        _ => None,
    }
}

/// A callback for requests without a subscription: it only notices when to stop.
pub(super) struct CancelOnly<'a> {
    link: &'a SessionLink,
    deadline: Option<(Instant, Duration)>,
    metrics: &'a Metrics,
}

impl<'a> CancelOnly<'a> {
    pub(super) fn new(
        link: &'a SessionLink,
        deadline: Option<(Instant, Duration)>,
        metrics: &'a Metrics,
    ) -> Self {
        Self {
            link,
            deadline,
            metrics,
        }
    }
}

impl StepCallback for CancelOnly<'_> {
    fn interruption(&self) -> Option<CallbackError> {
        interruption(self.link, self.deadline)
    }
    fn step_finished(&mut self, step_ms: f64) {
        self.metrics.step_latency.observe_ms(step_ms);
    }
    fn wants(&self, _: usize) -> bool {
        false
    }
    fn on_step_end(&mut self, _: &StepState<'_>) -> Result<StepControl, CallbackError> {
        Ok(StepControl::default())
    }
}

/// The engine's [`StepCallback`]: one session's subscription, channels and deadlines.
pub(super) struct SessionCallback<'a> {
    link: &'a mut SessionLink,
    sub: &'a Subscription,
    handle: &'a tokio::runtime::Handle,
    max_tensor_bytes: usize,
    deadline: Option<(Instant, Duration)>,
    metrics: &'a Metrics,
}

impl<'a> SessionCallback<'a> {
    pub(super) fn new(
        link: &'a mut SessionLink,
        sub: &'a Subscription,
        handle: &'a tokio::runtime::Handle,
        max_tensor_bytes: usize,
        deadline: Option<(Instant, Duration)>,
        metrics: &'a Metrics,
    ) -> Self {
        Self {
            link,
            sub,
            handle,
            max_tensor_bytes,
            deadline,
            metrics,
        }
    }

    fn send(&self, kind: Kind) -> Result<(), CallbackError> {
        send_event(
            self.handle,
            &self.link.events,
            Ok(proto::ServerMessage { kind: Some(kind) }),
            self.sub.reply_timeout,
        )
        .map_err(to_callback_error)
    }

    fn reject(
        &self,
        step_index: usize,
        field: String,
        reason: String,
    ) -> Result<(), CallbackError> {
        tracing::debug!(step_index, %field, %reason, "reply rejected");
        self.metrics
            .reply_rejections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.send(Kind::ReplyRejected(proto::ReplyRejected {
            step_index: step_index as u32,
            field,
            reason,
        }))
    }

    /// Turns a wire reply into a control, or the (field, reason) to reject it with.
    fn check(
        &self,
        state: &StepState<'_>,
        reply: proto::StepReply,
    ) -> Result<StepControl, (String, String)> {
        if reply.step_index as usize != state.step_index {
            return Err((
                "step_index".into(),
                format!(
                    "the server is waiting on step {}, not {}",
                    state.step_index, reply.step_index
                ),
            ));
        }
        let mut tensors = Vec::with_capacity(reply.tensors.len());
        let mut names: Vec<&String> = reply.tensors.keys().collect();
        names.sort();
        for name in names {
            let field = format!("tensors[{name}]");
            if !self.sub.tensor_inputs.iter().any(|n| n == name) {
                return Err((
                    field,
                    format!(
                        "not in this request's tensor_inputs [{}]",
                        self.sub.tensor_inputs.join(", ")
                    ),
                ));
            }
            let t = crate::tensor::decode(&reply.tensors[name], self.max_tensor_bytes)
                .map_err(|e| (field.clone(), e.to_string()))?;
            tensors.push((name.clone(), t));
        }
        let control = StepControl {
            guidance_scale: reply.guidance_scale.map(f64::from),
            tensors,
            interrupt: reply.interrupt,
        };
        validate_control(state, &self.sub.tensor_inputs, &control)
            .map_err(|r| (r.field, r.reason))?;
        Ok(control)
    }
}

impl StepCallback for SessionCallback<'_> {
    fn interruption(&self) -> Option<CallbackError> {
        interruption(self.link, self.deadline)
    }

    fn step_finished(&mut self, step_ms: f64) {
        self.metrics.step_latency.observe_ms(step_ms);
    }

    fn wants(&self, step_index: usize) -> bool {
        self.sub.wants(step_index)
    }

    fn on_step_end(&mut self, state: &StepState<'_>) -> Result<StepControl, CallbackError> {
        // Only the subscribed tensors leave the device, in one transfer.
        let (names, subscribed): (Vec<&String>, Vec<&candle_core::Tensor>) = self
            .sub
            .tensor_inputs
            .iter()
            .filter_map(|name| state.tensors.get(name).map(|t| (name, t)))
            .unzip();
        let encoded = crate::tensor::encode_all(&subscribed, self.sub.wire_dtype)
            .map_err(|e| CallbackError::Protocol(e.to_string()))?;
        let tensors: std::collections::HashMap<String, proto::Tensor> =
            names.into_iter().cloned().zip(encoded).collect();
        self.send(Kind::StepEnd(proto::StepEnd {
            step_index: state.step_index as u32,
            timestep: state.timestep,
            num_timesteps: state.num_timesteps as u32,
            guidance_scale: state.guidance_scale as f32,
            do_classifier_free_guidance: state.do_classifier_free_guidance,
            tensors,
            reply_required: !self.sub.observe_only,
            step_ms: state.step_ms,
        }))?;
        if self.sub.observe_only {
            return Ok(StepControl::default());
        }
        let wait_start = Instant::now();
        let reply_deadline = wait_start + self.sub.reply_timeout;
        // The whole-generation deadline cuts the wait short when it comes first.
        let (wait_until, generation_bound) = match self.deadline {
            Some((at, _)) if at < reply_deadline => (at, true),
            _ => (reply_deadline, false),
        };
        let result = loop {
            // Wake up now and then so a shutdown or a departed client ends the wait promptly.
            let slice_end = wait_until.min(Instant::now() + WAKE_INTERVAL);
            let next = self.handle.block_on(async {
                tokio::time::timeout_at(slice_end.into(), self.link.replies.recv()).await
            });
            if next.is_err() && Instant::now() < wait_until {
                match interruption(self.link, None) {
                    Some(stop) => break Err(stop),
                    None => continue,
                }
            }
            match next {
                Err(_elapsed) if generation_bound => {
                    break Err(CallbackError::Deadline {
                        timeout_ms: self
                            .deadline
                            .map(|(_, t)| t.as_millis() as u64)
                            .unwrap_or(0),
                    })
                }
                Err(_elapsed) => {
                    break match self.sub.on_timeout {
                        proto::TimeoutAction::Continue => {
                            tracing::info!(
                                step_index = state.step_index,
                                "reply deadline passed; continuing unchanged"
                            );
                            Ok(StepControl::default())
                        }
                        _ => Err(CallbackError::ReplyTimeout {
                            step_index: state.step_index,
                            timeout_ms: self.sub.reply_timeout.as_millis() as u64,
                        }),
                    }
                }
                Ok(None) => {
                    break Err(interruption(self.link, None).unwrap_or(CallbackError::Cancelled))
                }
                Ok(Some(reply)) => match self.check(state, reply) {
                    Ok(control) => break Ok(control),
                    Err((field, reason)) => self.reject(state.step_index, field, reason)?,
                },
            }
        };
        self.metrics
            .callback_wait
            .observe_ms(wait_start.elapsed().as_secs_f64() * 1e3);
        result
    }
}
