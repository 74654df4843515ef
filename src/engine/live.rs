//! One live session on the device loop: its pipeline [`Session`], its client's channels, its
//! subscription and deadlines, and where it stands (ready to step, waiting for its client,
//! ready to decode, done). Every method returns at once: the loop polls sessions, it never
//! waits on one.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

use super::subscription::{Hook, Subscription, GUIDANCE_TENSORS};
use super::{ClientInput, EngineError, SessionLink, Slot, StopReason};
use crate::metrics::Metrics;
use crate::pipeline::check_lora_scale;
use crate::pipeline::preview::{self, PreviewSpec};
use crate::pipeline::sd::GenerationOutput;
use crate::pipeline::{validate_control, Session, StepControl, StepState};
use crate::proto;
use crate::proto::server_message::Kind;

/// Where a live session stands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Phase {
    /// Steps at the next tick (once its events are delivered).
    Ready,
    /// Sent an event of `step_index` at `on` (or Accepted, for a step selection) and waits
    /// for the client's answer until `until`.
    Waiting {
        /// What the client must send.
        on: Awaited,
        /// The step the reply answers.
        step_index: usize,
        /// When the wait began.
        since: Instant,
        /// When the reply deadline passes.
        until: Instant,
    },
    /// The loop is over; decodes at the next tick.
    Decode,
    /// Completed is queued; the session leaves once its events are delivered.
    Done,
}

/// What a waiting session waits for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Awaited {
    /// A `StepSelection` (after Accepted, before step 0).
    Steps,
    /// A reply to the event sent at this hook.
    Reply(Hook),
}

impl Phase {
    /// Where a session stands when nothing holds it: stepping, or decoding once its loop is over.
    fn stepping(session: &Session<'_>) -> Phase {
        if session.is_done() {
            Phase::Decode
        } else {
            Phase::Ready
        }
    }
}

/// The fixed facts of a live session, from its job.
pub(super) struct Meta {
    pub(super) request_id: String,
    pub(super) seed: u64,
    pub(super) return_latents: bool,
    pub(super) queue_ms: f64,
    pub(super) deadline: Option<(Instant, Duration)>,
    pub(super) span: tracing::Span,
    pub(super) slot: Arc<Slot>,
    /// How long an event may sit undelivered before the client counts as stalled.
    pub(super) stall_timeout: Duration,
    pub(super) max_tensor_bytes: usize,
    /// A replay's edits still to apply, in loop order: the session answers its own waits from
    /// them and sends no step events.
    pub(super) script: Option<VecDeque<proto::StepReply>>,
    /// The record being kept for `Completed.replay` (the resolved request; edits appended as
    /// they are applied).
    pub(super) record: Option<proto::ReplayRecord>,
}

/// One session on the device loop; see the module docs.
pub(super) struct Live<'m> {
    pub(super) meta: Meta,
    pub(super) session: Option<Session<'m>>,
    pub(super) sub: Option<Subscription>,
    pub(super) link: SessionLink,
    pub(super) phase: Phase,
    outbox: VecDeque<proto::ServerMessage>,
    blocked_since: Option<Instant>,
    /// Counted as completed (when its Completed was queued).
    counted: bool,
}

impl<'m> Live<'m> {
    /// A session that has just been prepared; `accepted` is its first event ([`Live::start`]
    /// sends it).
    pub(super) fn new(
        meta: Meta,
        session: Session<'m>,
        sub: Option<Subscription>,
        link: SessionLink,
        accepted: Kind,
    ) -> Self {
        Self {
            meta,
            session: Some(session),
            sub,
            link,
            phase: Phase::Ready,
            outbox: VecDeque::from([proto::ServerMessage {
                kind: Some(accepted),
            }]),
            blocked_since: None,
            counted: false,
        }
    }

    /// Sends Accepted, then waits for the step selection (`await_steps`) or enters step 0
    /// (sending its STEP_BEGIN event if subscribed).
    pub(super) fn start(&mut self, now: Instant) -> Result<(), EngineError> {
        match &self.sub {
            Some(sub) if sub.await_steps => {
                self.phase = Phase::Waiting {
                    on: Awaited::Steps,
                    step_index: 0,
                    since: now,
                    until: now + sub.reply_timeout,
                };
                self.flush(now)
            }
            _ => self.enter_step(now),
        }
    }

    /// Ends the session after an error (already reported through the link's verdict): its
    /// tensors and undelivered events are dropped at once.
    pub(super) fn abandon(&mut self) {
        self.session = None;
        self.sub = None;
        self.outbox.clear();
        self.blocked_since = None;
        self.phase = Phase::Done;
    }

    /// Whether it was counted as completed.
    pub(super) fn counted(&self) -> bool {
        self.counted
    }

    /// Steps at this tick: ready, and every event so far delivered (a client that does not
    /// read its events does not run ahead of them).
    pub(super) fn is_ready(&self) -> bool {
        self.phase == Phase::Ready && self.outbox.is_empty()
    }

    /// UNet rows it wants at the next tick: its rows while it is stepping and not held by its
    /// client, else none (waiting, decoding or done sessions take no UNet compute).
    pub(super) fn rows_wanted(&self) -> usize {
        match &self.session {
            Some(s) if self.is_ready() => s.rows(),
            _ => 0,
        }
    }

    /// Waiting for its client: a reply, or room for its events.
    pub(super) fn is_waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting { .. })
            || (!self.outbox.is_empty() && self.phase != Phase::Done)
    }

    /// When it began to wait for its client's reply, if it is waiting for one.
    pub(super) fn waiting_since(&self) -> Option<Instant> {
        match self.phase {
            Phase::Waiting { since, .. } => Some(since),
            _ => None,
        }
    }

    /// Done and every event delivered: the loop drops it.
    pub(super) fn is_finished(&self) -> bool {
        self.phase == Phase::Done && self.outbox.is_empty()
    }

    /// The earliest moment this session needs the loop without any ring: a reply deadline, the
    /// generation deadline or the stall deadline.
    pub(super) fn next_wake(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut take = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        if let Phase::Waiting { since, until, .. } = self.phase {
            // A replay answers its own waits: at once.
            take(if self.meta.script.is_some() {
                since
            } else {
                until
            });
        }
        if self.phase != Phase::Done {
            if let Some((d, _)) = self.meta.deadline {
                take(d);
            }
        }
        if let Some(since) = self.blocked_since {
            take(since + self.meta.stall_timeout);
        }
        at
    }

    /// Why this session must end now, if it must: its client left, the server is stopping, or
    /// its whole-generation deadline passed. A done session only delivers its last events.
    fn stop_reason(&self, now: Instant) -> Option<EngineError> {
        match self.link.cancel.reason() {
            Some(StopReason::Shutdown) if self.phase == Phase::Done => {}
            Some(reason) => return Some(reason.error()),
            None => {}
        }
        if self.link.events.is_closed() {
            return Some(EngineError::Cancelled);
        }
        match self.meta.deadline {
            Some((at, timeout)) if now >= at && self.phase != Phase::Done => {
                Some(EngineError::DeadlineExceeded {
                    timeout_ms: timeout.as_millis() as u64,
                })
            }
            _ => None,
        }
    }

    /// Queues an event for the client (a replay's step events are internal: dropped).
    pub(super) fn push(&mut self, kind: Kind) {
        if self.meta.script.is_some() && matches!(kind, Kind::StepEnd(_)) {
            return;
        }
        self.outbox
            .push_back(proto::ServerMessage { kind: Some(kind) });
    }

    /// Hands queued events to the client's stream without waiting; a stream that has taken
    /// nothing for the stall timeout ends the session.
    pub(super) fn flush(&mut self, now: Instant) -> Result<(), EngineError> {
        while let Some(msg) = self.outbox.pop_front() {
            match self.link.events.try_send(Ok(msg)) {
                Ok(()) => self.blocked_since = None,
                Err(TrySendError::Full(Ok(msg))) => {
                    self.outbox.push_front(msg);
                    let since = *self.blocked_since.get_or_insert(now);
                    if now.duration_since(since) >= self.meta.stall_timeout {
                        return Err(EngineError::ClientStalled {
                            timeout_ms: self.meta.stall_timeout.as_millis() as u64,
                        });
                    }
                    return Ok(());
                }
                Err(TrySendError::Full(Err(_)) | TrySendError::Closed(_)) => {
                    return Err(EngineError::Cancelled)
                }
            }
        }
        Ok(())
    }

    /// One poll at the start of a tick: stop reasons, event delivery, and (while waiting) the
    /// replies that arrived and the reply deadline.
    pub(super) fn poll(&mut self, now: Instant, metrics: &Metrics) -> Result<(), EngineError> {
        if let Some(stop) = self.stop_reason(now) {
            return Err(stop);
        }
        self.flush(now)?;
        let Phase::Waiting {
            on,
            step_index,
            since,
            until,
        } = self.phase
        else {
            return Ok(());
        };
        if self.meta.script.is_some() {
            return self.replay_answer(now, on, step_index, since, metrics);
        }
        loop {
            let answer = match self.link.replies.try_recv() {
                Ok(input) => self.take(on, input),
                Err(TryRecvError::Disconnected) => return Err(EngineError::Cancelled),
                Err(TryRecvError::Empty) => break,
            };
            match answer {
                Ok(control) => {
                    self.resume(now, since, on, control, metrics)?;
                    return Ok(());
                }
                Err((field, reason)) => {
                    tracing::debug!(step_index, %field, %reason, "reply rejected");
                    metrics.reply_rejections.fetch_add(1, Ordering::Relaxed);
                    self.push(Kind::ReplyRejected(proto::ReplyRejected {
                        step_index: step_index as u32,
                        field,
                        reason,
                    }));
                    self.flush(now)?;
                }
            }
        }
        if now >= until {
            let on_timeout = self.sub.as_ref().map(|s| s.on_timeout);
            let timeout = self
                .sub
                .as_ref()
                .map(|s| s.reply_timeout)
                .unwrap_or_default();
            if on_timeout == Some(proto::TimeoutAction::Continue) {
                tracing::info!(step_index, "reply deadline passed; continuing unchanged");
                self.resume(now, since, on, None, metrics)?;
            } else {
                return Err(EngineError::ReplyTimeout {
                    step_index,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
        }
        Ok(())
    }

    /// A replay's wait: the record's edit for this step and phase, or no change. An edit that
    /// no longer fits (the model or shapes changed) ends the run, naming it.
    fn replay_answer(
        &mut self,
        now: Instant,
        on: Awaited,
        step_index: usize,
        since: Instant,
        metrics: &Metrics,
    ) -> Result<(), EngineError> {
        let Awaited::Reply(hook) = on else {
            return Err(EngineError::Internal(
                "a replay waits for no step selection".into(),
            ));
        };
        let script = self
            .meta
            .script
            .as_mut()
            .ok_or_else(|| EngineError::Internal("not a replay".into()))?;
        let due = script.front().is_some_and(|e| {
            e.step_index as usize == step_index && Hook::from_wire(e.phase) == Some(hook)
        });
        let reply = match script.pop_front() {
            Some(edit) if due => edit,
            other => {
                // Not this wait's edit: put it back; this wait changes nothing.
                if let Some(edit) = other {
                    script.push_front(edit);
                }
                proto::StepReply {
                    step_index: step_index as u32,
                    phase: hook.proto() as i32,
                    ..Default::default()
                }
            }
        };
        // A replay asked for a record records what it applied: the same edits again.
        let control = self
            .check_and_record(hook, reply)
            .map_err(|(field, reason)| {
                let at = format!("step {step_index} ({})", hook.name());
                EngineError::InvalidRequest {
                    field: "start.replay.edits".into(),
                    reason: format!("the edit at {at} does not fit this run: {field}: {reason}"),
                }
            })?;
        self.resume(now, since, on, Some(control), metrics)
    }

    /// The wait is over: apply the answer (if any) where the step stands, and go on.
    fn resume(
        &mut self,
        now: Instant,
        since: Instant,
        on: Awaited,
        control: Option<StepControl>,
        metrics: &Metrics,
    ) -> Result<(), EngineError> {
        let waited_ms = now.duration_since(since).as_secs_f64() * 1e3;
        metrics.callback_wait.observe_ms(waited_ms);
        let session = self.session_mut()?;
        session.add_callback_wait(waited_ms);
        match on {
            // The selection was taken when it came (see `take`).
            Awaited::Steps => self.enter_step(now),
            // Applied to the step about to run (an interrupt skips it).
            Awaited::Reply(Hook::Begin) => {
                if let Some(control) = control {
                    session.apply(control).map_err(EngineError::from)?;
                }
                let phase = Phase::stepping(session);
                self.phase = phase;
                Ok(())
            }
            // The scheduler step takes the replaced noise_pred; the rest applies from the next
            // step on, after the server's plan (so a reply wins over it, as at STEP_END).
            Awaited::Reply(Hook::Guidance) => {
                let mut control = control.unwrap_or_default();
                let noise_pred = control
                    .tensors
                    .iter()
                    .position(|(n, _)| n == "noise_pred")
                    .map(|i| control.tensors.remove(i).1);
                session
                    .finish_guided(noise_pred)
                    .map_err(EngineError::from)?;
                session.apply(control).map_err(EngineError::from)?;
                self.at_end(now, metrics)
            }
            Awaited::Reply(Hook::End) => {
                if let Some(control) = control {
                    session.apply(control).map_err(EngineError::from)?;
                }
                self.enter_step(now)
            }
        }
    }

    /// Takes one client input while waiting `on` something: the control to resume with, or
    /// the (field, reason) to reject it with.
    fn take(
        &mut self,
        on: Awaited,
        input: ClientInput,
    ) -> Result<Option<StepControl>, (String, String)> {
        match (on, input) {
            (Awaited::Steps, ClientInput::Steps(sel)) => {
                let n = self.session.as_ref().map_or(0, |s| s.num_timesteps());
                let sub = self
                    .sub
                    .as_mut()
                    .ok_or_else(|| ("steps".to_string(), "no subscription".to_string()))?;
                sub.select(&sel, n)?;
                Ok(None)
            }
            (Awaited::Steps, ClientInput::Reply(_)) => Err((
                "reply".into(),
                "the server waits for the step selection (ClientMessage.steps) before step 0"
                    .into(),
            )),
            (Awaited::Reply(_), ClientInput::Steps(_)) => Err((
                "steps".into(),
                "a step selection is taken only once, before step 0, with CallbackOptions.await_steps"
                    .into(),
            )),
            (Awaited::Reply(hook), ClientInput::Reply(reply)) => {
                self.check_and_record(hook, reply).map(Some)
            }
        }
    }

    fn session_mut(&mut self) -> Result<&mut Session<'m>, EngineError> {
        self.session
            .as_mut()
            .ok_or_else(|| EngineError::Internal("the session has already finished".into()))
    }

    /// [`Self::check`], then, when a record is asked for and the reply was applied and changes
    /// something, the reply kept as sent (tensor bytes included, its phase set to `hook`): a
    /// replay decodes the same bytes the same way. Live replies and a replay's own edits are
    /// recorded alike.
    fn check_and_record(
        &mut self,
        hook: Hook,
        reply: proto::StepReply,
    ) -> Result<StepControl, (String, String)> {
        let kept =
            (self.meta.record.is_some() && changes_something(&reply)).then(|| proto::StepReply {
                phase: hook.proto() as i32,
                ..reply.clone()
            });
        let control = self.check(hook, reply)?;
        if let (Some(record), Some(reply)) = (self.meta.record.as_mut(), kept) {
            record.edits.push(reply);
        }
        Ok(control)
    }

    /// Turns a wire reply to the event at `hook` into a control, or the (field, reason) to
    /// reject it with.
    fn check(&self, hook: Hook, reply: proto::StepReply) -> Result<StepControl, (String, String)> {
        let (Some(session), Some(sub)) = (&self.session, &self.sub) else {
            return Err(("reply".into(), "no reply is expected".into()));
        };
        let tensors = match hook {
            Hook::Guidance => session.guided_tensors(),
            Hook::Begin | Hook::End => session.callback_tensors(),
        };
        let state = match hook {
            Hook::Begin => session.begin_state(&tensors),
            Hook::Guidance => session.guided_state(&tensors),
            Hook::End => session.step_state(&tensors),
        };
        let Some(state) = state else {
            return Err(("step_index".into(), "no step is waiting".into()));
        };
        if reply.step_index as usize != state.step_index {
            return Err((
                "step_index".into(),
                format!(
                    "the server is waiting on step {}, not {}",
                    state.step_index, reply.step_index
                ),
            ));
        }
        if Hook::from_wire(reply.phase) != Some(hook) {
            return Err((
                "phase".into(),
                format!(
                    "the server is waiting on {} of step {}, not {}",
                    hook.name(),
                    state.step_index,
                    proto::CallbackPhase::try_from(reply.phase).map_or_else(
                        |_| format!("phase {}", reply.phase),
                        |p| p.as_str_name().into()
                    )
                ),
            ));
        }
        let mut replaced = Vec::with_capacity(reply.tensors.len());
        let mut names: Vec<&String> = reply.tensors.keys().collect();
        names.sort();
        for name in names {
            let field = format!("tensors[{name}]");
            let guidance_only = GUIDANCE_TENSORS.contains(&name.as_str());
            if (hook == Hook::Guidance) != (name == "noise_pred")
                && sub.tensor_inputs.iter().any(|n| n == name)
            {
                return Err((
                    field,
                    match (hook, guidance_only) {
                        (Hook::Guidance, false) => format!(
                            "only noise_pred may be replaced at AFTER_GUIDANCE; replace {name} \
                             at STEP_END or STEP_BEGIN"
                        ),
                        (Hook::Guidance, true) => format!("{name} is read-only"),
                        _ => format!("{name} may be replaced only at AFTER_GUIDANCE"),
                    },
                ));
            }
            if !sub.tensor_inputs.iter().any(|n| n == name) {
                return Err((
                    field,
                    format!(
                        "not in this request's tensor_inputs [{}]",
                        sub.tensor_inputs.join(", ")
                    ),
                ));
            }
            let t = crate::tensor::decode(&reply.tensors[name], self.meta.max_tensor_bytes)
                .map_err(|e| (field.clone(), e.to_string()))?;
            replaced.push((name.clone(), t));
        }
        let mut lora_scales = Vec::with_capacity(reply.lora_scales.len());
        let mut lora_names: Vec<&String> = reply.lora_scales.keys().collect();
        lora_names.sort();
        for name in lora_names {
            let field = format!("lora_scales[{name}]");
            let scale = reply.lora_scales[name];
            let adapter = session
                .model()
                .lora_index(name)
                .filter(|a| session.loras().iter().any(|l| l.adapter == *a))
                .ok_or_else(|| {
                    (
                        field.clone(),
                        "not a LoRA of this request (list it in GenerateRequest.loras, with \
                         scale 0 to start it off)"
                            .to_string(),
                    )
                })?;
            check_lora_scale(scale).map_err(|why| (field, why))?;
            lora_scales.push((adapter, scale as f64));
        }
        let control = StepControl {
            guidance_scale: reply.guidance_scale.map(f64::from),
            tensors: replaced,
            interrupt: reply.interrupt,
            lora_scales,
        };
        validate_control(&state, &sub.tensor_inputs, &control).map_err(|r| (r.field, r.reason))?;
        Ok(control)
    }

    /// After this session's UNet call: its AFTER_GUIDANCE event when the step was held for it
    /// (then a wait, unless observe-only), else straight to the step's end.
    pub(super) fn after_unet(
        &mut self,
        now: Instant,
        metrics: &Metrics,
    ) -> Result<(), EngineError> {
        let session = self.session_mut()?;
        if !session.is_guided() {
            return self.at_end(now, metrics);
        }
        let tensors = session.guided_tensors();
        let state = session
            .guided_state(&tensors)
            .ok_or_else(|| EngineError::Internal("no held step".into()))?;
        let sub = self.sub.as_ref().ok_or_else(|| {
            EngineError::Internal("a step was held without a subscription".into())
        })?;
        let event = event(&state, sub, Hook::Guidance)?;
        let i = state.step_index;
        let waits = sub.waits(i);
        let until = now + sub.reply_timeout;
        self.push(Kind::StepEnd(event));
        if waits {
            self.phase = Phase::Waiting {
                on: Awaited::Reply(Hook::Guidance),
                step_index: i,
                since: now,
                until,
            };
            self.flush(now)
        } else {
            self.session_mut()?
                .finish_guided(None)
                .map_err(EngineError::from)?;
            self.at_end(now, metrics)
        }
    }

    /// A step is over: its StepEnd when subscribed (then a wait, unless observe-only), else
    /// on to the next step.
    fn at_end(&mut self, now: Instant, metrics: &Metrics) -> Result<(), EngineError> {
        let session = self
            .session
            .as_ref()
            .ok_or_else(|| EngineError::Internal("a finished session was stepped".into()))?;
        let tensors = session.callback_tensors();
        let state = session
            .step_state(&tensors)
            .ok_or_else(|| EngineError::Internal("no step state after a step".into()))?;
        metrics.step_latency.observe_ms(state.step_ms);
        let i = state.step_index;
        if let Some(sub) = self.sub.as_ref().filter(|s| s.sends(Hook::End, i)) {
            let mut event = event(&state, sub, Hook::End)?;
            if let Some(spec) = sub.preview_at(i) {
                event.previews = previews(session, spec)?;
            }
            if sub.waits(i) {
                self.phase = Phase::Waiting {
                    on: Awaited::Reply(Hook::End),
                    step_index: i,
                    since: now,
                    until: now + sub.reply_timeout,
                };
                self.push(Kind::StepEnd(event));
                return self.flush(now);
            }
            self.push(Kind::StepEnd(event));
        }
        self.enter_step(now)
    }

    /// Before the next step (or decode, once the loop is over): its STEP_BEGIN event when
    /// subscribed (then a wait, unless observe-only), and whether it holds after guidance.
    fn enter_step(&mut self, now: Instant) -> Result<(), EngineError> {
        let Some(session) = self.session.as_mut() else {
            return Err(EngineError::Internal(
                "the session has already finished".into(),
            ));
        };
        if session.is_done() {
            self.phase = Phase::Decode;
            return self.flush(now);
        }
        let i = session.next_step();
        let sub = self.sub.as_ref();
        session.hold_after_guidance(sub.is_some_and(|s| s.sends(Hook::Guidance, i)));
        session.keep_x0(
            sub.and_then(|s| s.preview_at(i))
                .is_some_and(|p| p.source == preview::Source::X0),
        );
        self.phase = Phase::Ready;
        if let Some(sub) = sub.filter(|s| s.sends(Hook::Begin, i)) {
            let tensors = session.callback_tensors();
            let state = session
                .begin_state(&tensors)
                .ok_or_else(|| EngineError::Internal("no step to begin".into()))?;
            let event = event(&state, sub, Hook::Begin)?;
            if sub.waits(i) {
                self.phase = Phase::Waiting {
                    on: Awaited::Reply(Hook::Begin),
                    step_index: i,
                    since: now,
                    until: now + sub.reply_timeout,
                };
            }
            self.push(Kind::StepEnd(event));
        }
        self.flush(now)
    }

    /// Takes the session out for decoding (the phase must be [`Phase::Decode`]).
    pub(super) fn take_for_decode(&mut self) -> Option<Session<'m>> {
        if self.phase == Phase::Decode {
            self.session.take()
        } else {
            None
        }
    }

    /// Queues Completed for a decoded session; its device work is over, so its slot is freed.
    pub(super) fn complete(
        &mut self,
        output: GenerationOutput,
        now: Instant,
        metrics: &Metrics,
    ) -> Result<(), EngineError> {
        let latents = if self.meta.return_latents {
            Some(
                crate::tensor::encode(&output.latents, proto::DType::DtypeF32)
                    .map_err(|e| EngineError::Internal(e.to_string()))?,
            )
        } else {
            None
        };
        let t = &output.timings;
        let completed = proto::Completed {
            images: output
                .images
                .into_iter()
                .map(|i| proto::Image {
                    data: i.png,
                    mime_type: "image/png".into(),
                    width: i.width,
                    height: i.height,
                })
                .collect(),
            latents,
            interrupted: output.interrupted,
            seed: self.meta.seed,
            request_id: self.meta.request_id.clone(),
            replay: self.meta.record.take(),
            timings: Some(proto::Timings {
                queue_ms: self.meta.queue_ms,
                encode_ms: t.encode_ms,
                denoise_ms: t.denoise_ms,
                callback_wait_ms: t.callback_wait_ms,
                decode_ms: t.decode_ms,
            }),
        };
        self.meta.slot.finish();
        self.phase = Phase::Done;
        // Counted before the client can see it, so whoever holds a Completed finds it in the
        // metrics (counted after delivery, a fast client could read the metrics first).
        metrics.request(crate::metrics::Outcome::Completed);
        self.counted = true;
        self.push(Kind::Completed(completed));
        self.flush(now)
    }
}

/// Whether a reply changes anything (a reply that changes nothing is left out of a record).
fn changes_something(r: &proto::StepReply) -> bool {
    r.guidance_scale.is_some() || r.interrupt || !r.tensors.is_empty() || !r.lora_scales.is_empty()
}

/// The event of `state` at `hook` for `sub`: only the subscribed tensors leave the device, in
/// one transfer.
fn event(
    state: &StepState<'_>,
    sub: &Subscription,
    hook: Hook,
) -> Result<proto::StepEnd, EngineError> {
    let (names, subscribed): (Vec<&String>, Vec<&candle_core::Tensor>) = sub
        .tensor_inputs
        .iter()
        .filter_map(|name| state.tensors.get(name).map(|t| (name, t)))
        .unzip();
    let encoded = crate::tensor::encode_all(&subscribed, sub.wire_dtype)
        .map_err(|e| EngineError::Internal(e.to_string()))?;
    Ok(proto::StepEnd {
        step_index: state.step_index as u32,
        timestep: state.timestep,
        num_timesteps: state.num_timesteps as u32,
        guidance_scale: state.guidance_scale as f32,
        do_classifier_free_guidance: state.do_classifier_free_guidance,
        tensors: names.into_iter().cloned().zip(encoded).collect(),
        reply_required: sub.waits(state.step_index),
        step_ms: state.step_ms,
        phase: hook.proto() as i32,
        previews: Vec::new(),
    })
}

/// The previews of a session's last step for `spec`. Tensor work on the device thread, like
/// the step itself; the linear map is a few thousand multiply-adds per item.
fn previews(session: &Session<'_>, spec: &PreviewSpec) -> Result<Vec<proto::Preview>, EngineError> {
    let latents = match spec.source {
        preview::Source::Latents => session.latents(),
        preview::Source::X0 => session
            .last_x0()
            .ok_or_else(|| EngineError::Internal("no x0 was kept for the preview".into()))?,
    };
    let model = session.model();
    let rgb = match (spec.decoder, &model.preview_decoder) {
        (preview::Decoder::Linear, _) => preview::linear_rgb(model.family, latents, &spec.items),
        (preview::Decoder::Tiny, Some(tiny)) => preview::tiny_rgb(tiny, latents, &spec.items),
        (preview::Decoder::Tiny, None) => {
            return Err(EngineError::Internal(
                "the model has no preview decoder".into(),
            ))
        }
    }
    .map_err(EngineError::from)?;
    rgb.into_iter()
        .map(|(item, bytes, w, h)| {
            let p = preview::encode(item, bytes, w, h, spec.max_side, spec.format)
                .map_err(EngineError::from)?;
            Ok(proto::Preview {
                item: p.item as u32,
                image: Some(proto::Image {
                    data: p.data,
                    mime_type: p.mime_type.into(),
                    width: p.width,
                    height: p.height,
                }),
            })
        })
        .collect()
}
