//! The `stepstream.v1.Diffusion` service: stream sessions bridged to the engine.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::validation::{self, Limits};
use crate::engine::{
    ClientInput, Doorbell, Engine, EngineError, EngineEvent, Job, SessionLink, Slot, Verdict,
};
use crate::proto;
use crate::proto::diffusion_server::Diffusion;
use crate::proto::{client_message, server_message};

/// Events buffered towards one client; past that the session sits out ticks until the client
/// reads (the device loop never waits for it).
const EVENT_BUFFER: usize = 4;
/// Replies buffered towards the device loop before the session refuses more.
const REPLY_BUFFER: usize = 8;

/// The service implementation.
#[derive(Clone)]
pub struct DiffusionService {
    engine: Engine,
    limits: Limits,
    log_prompts: bool,
}

/// What a started generation hands its session.
struct Started {
    events: mpsc::Receiver<EngineEvent>,
    replies: mpsc::Sender<ClientInput>,
    slot: Arc<Slot>,
    verdict: Verdict,
    doorbell: Arc<Doorbell>,
    observe_only: bool,
    await_steps: bool,
}

/// Parses gRPC's `grpc-timeout` header (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl DiffusionService {
    /// A service over a started engine.
    pub fn new(engine: Engine, limits: Limits, log_prompts: bool) -> Self {
        Self {
            engine,
            limits,
            log_prompts,
        }
    }

    /// Validates, admits and submits one generation.
    fn start(
        &self,
        req: proto::GenerateRequest,
        timeout: Option<Duration>,
    ) -> Result<Started, EngineError> {
        let result = self.try_start(req, timeout);
        if let Err(e) = &result {
            self.engine.metrics().request(e.outcome());
        }
        result
    }

    fn try_start(
        &self,
        req: proto::GenerateRequest,
        timeout: Option<Duration>,
    ) -> Result<Started, EngineError> {
        let started_at = Instant::now();
        // A replay runs the record's request; its edits become a subscription the session
        // answers itself.
        let (req, replay) = validation::unwrap_replay(req)?;
        let (index, card) = self.engine.find_model(&req.model)?;
        let mut valid = validation::validate(&req, card, &self.limits)?;
        if let Some(edits) = &replay {
            valid.subscription = validation::replay_subscription(
                edits,
                card,
                &self.limits,
                valid.params.num_images_per_prompt,
            )?;
        }
        let p = &valid.params;
        let per_step =
            p.guidance_plan != Default::default() || p.loras.iter().any(|l| l.schedule.is_some());
        if valid.subscription.is_some() || per_step {
            // Checked here, before the queue: a bad step index or schedule never waits its turn.
            let n = self
                .engine
                .num_timesteps(index, &p.scheduler, p.num_inference_steps)?;
            if let Some(sub) = &valid.subscription {
                validation::check_step_indices(sub, n).map_err(|e| {
                    if replay.is_some() {
                        validation::misfit(e)
                    } else {
                        e
                    }
                })?;
            }
            validation::check_schedules(p, n)?;
        }
        let (slot, ahead) = self.engine.admit()?;
        let request_id = format!("{:016x}", validation::random_u64());
        // A replay takes no replies: its session answers itself.
        let observe_only = replay.is_some()
            || valid
                .subscription
                .as_ref()
                .map(|s| s.observe_only)
                .unwrap_or(true);
        let await_steps = valid.subscription.as_ref().is_some_and(|s| s.await_steps);
        let span = tracing::info_span!("generate", request_id = %request_id, model = %card.id);
        span.in_scope(|| {
            tracing::info!(
                steps = valid.params.num_inference_steps,
                width = valid.params.width,
                height = valid.params.height,
                subscribed = valid.subscription.is_some(),
                queue_position = ahead,
                "admitted"
            );
            if self.log_prompts {
                tracing::info!(prompt = %req.prompt, negative_prompt = ?req.negative_prompt, "prompt");
            } else {
                tracing::debug!(prompt_bytes = req.prompt.len(), "prompt not logged (--log-prompts)");
            }
        });
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let (replies_tx, replies_rx) = mpsc::channel(REPLY_BUFFER);
        let verdict = Verdict::default();
        if ahead > 0 {
            // Capacity is fresh: this cannot fail or block.
            let _ = events_tx.try_send(Ok(proto::ServerMessage {
                kind: Some(server_message::Kind::Queued(proto::Queued {
                    position: ahead as u32,
                })),
            }));
        }
        self.engine.submit(Job {
            request_id,
            model_index: index,
            params: valid.params,
            tensors: valid.tensors,
            queue_position: ahead as u32,
            subscription: valid.subscription,
            return_latents: valid.return_latents,
            link: SessionLink {
                events: events_tx,
                replies: replies_rx,
                cancel: slot.cancel_flag().clone(),
                verdict: verdict.clone(),
            },
            slot: slot.clone(),
            admitted: started_at,
            deadline: timeout.map(|t| (started_at + t, t)),
            span,
            replay,
            record: valid.record.map(|request| proto::ReplayRecord {
                version: 1,
                request: Some(Box::new(request)),
                edits: Vec::new(),
                device: card.device.clone(),
                dtype: card.dtype.clone(),
            }),
        })?;
        Ok(Started {
            events: events_rx,
            replies: replies_tx,
            slot,
            verdict,
            doorbell: self.engine.doorbell().clone(),
            observe_only,
            await_steps,
        })
    }
}

/// Tells the engine the client left when dropped (the response stream or call went away).
struct LeaveOnDrop(Arc<Slot>);

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// How a stream ends when the engine's events stop without Completed: the verdict the device
/// loop recorded, else the client's own departure, else an internal error. So every stream ends
/// with Completed and OK, or with a non-OK status that says why: never OK without a result.
fn unfinished(verdict: &Verdict, slot: &Slot) -> EngineError {
    verdict
        .get()
        .unwrap_or_else(|| match slot.cancel_flag().reason() {
            Some(reason) => reason.error(),
            None => EngineError::Internal("the generation ended without a result".into()),
        })
}

/// A session's response stream: engine events merged with session notices (observe-only
/// replies, protocol errors), engine events first. It ends after Completed or the first error;
/// the client going away drops it, which leaves the slot and so cancels the job.
struct SessionStream {
    events: mpsc::Receiver<EngineEvent>,
    notices: mpsc::Receiver<EngineEvent>,
    verdict: Verdict,
    doorbell: Arc<Doorbell>,
    slot: LeaveOnDrop,
    done: bool,
}

impl Stream for SessionStream {
    type Item = Result<proto::ServerMessage, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let event = match this.events.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                // Room for the next event: a session that sat out ticks for it may step again.
                this.doorbell.ring();
                event
            }
            Poll::Ready(None) => {
                this.done = true;
                let e = unfinished(&this.verdict, &this.slot.0);
                return Poll::Ready(Some(Err(Status::from(e))));
            }
            // A closed notice channel just means no more notices; the events decide the end.
            Poll::Pending => match this.notices.poll_recv(cx) {
                Poll::Ready(Some(notice)) => notice,
                _ => return Poll::Pending,
            },
        };
        this.done = matches!(
            event,
            Err(_)
                | Ok(proto::ServerMessage {
                    kind: Some(server_message::Kind::Completed(_))
                })
        );
        Poll::Ready(Some(event.map_err(Status::from)))
    }
}

fn request_timeout<T>(request: &Request<T>) -> Option<Duration> {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Diffusion for DiffusionService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<Streaming<proto::ClientMessage>>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let timeout = request_timeout(&request);
        let mut inbound = request.into_inner();
        let wait = self.limits.default_reply_timeout;
        let first = match tokio::time::timeout(wait, inbound.message()).await {
            Err(_) => {
                return Err(EngineError::StartTimeout {
                    timeout_ms: wait.as_millis() as u64,
                }
                .into())
            }
            Ok(m) => m?,
        };
        let first = match first {
            Some(m) => m,
            None => {
                return Err(EngineError::Protocol(
                    "the stream ended before a `start` message".into(),
                )
                .into())
            }
        };
        let start = match first.kind {
            Some(client_message::Kind::Start(s)) => s,
            _ => {
                return Err(
                    EngineError::Protocol("the first message must be `start`".into()).into(),
                )
            }
        };
        let Started {
            events,
            replies,
            slot,
            verdict,
            doorbell,
            observe_only,
            await_steps,
        } = self.start(start, timeout)?;

        // Inbound side: forward replies to the worker; the client ending or breaking the stream
        // cancels the job. Runs until the client is done or the job is.
        let (notice_tx, notice_rx) = mpsc::channel::<EngineEvent>(1);
        let inbound_slot = slot.clone();
        let inbound_bell = doorbell.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = replies.closed() => break,
                        msg = inbound.message() => match msg {
                            Ok(Some(proto::ClientMessage { kind: Some(kind @ (client_message::Kind::Reply(_) | client_message::Kind::Steps(_))) })) => {
                                let input = match kind {
                                    client_message::Kind::Reply(r) if observe_only => {
                                        let _ = notice_tx.send(Ok(rejected(r.step_index, "reply", "this session is observe-only (or has no callback): no reply is expected"))).await;
                                        continue;
                                    }
                                    client_message::Kind::Reply(r) => ClientInput::Reply(r),
                                    client_message::Kind::Steps(_) if !await_steps => {
                                        let _ = notice_tx.send(Ok(rejected(0, "steps", "a step selection is taken only with CallbackOptions.await_steps"))).await;
                                        continue;
                                    }
                                    client_message::Kind::Steps(s) => ClientInput::Steps(s),
                                    client_message::Kind::Start(_) => unreachable!("matched above"),
                                };
                                if replies.try_send(input).is_err() {
                                    let _ = notice_tx.send(Err(EngineError::Protocol(format!(
                                        "more than {REPLY_BUFFER} replies sent ahead of the steps they answer"
                                    )))).await;
                                    break;
                                }
                                // The loop takes replies without waiting; wake it if it sleeps.
                                inbound_bell.ring();
                            }
                            Ok(Some(_)) => {
                                let _ = notice_tx.send(Err(EngineError::Protocol(
                                    "only `reply` and `steps` messages may follow `start`".into(),
                                ))).await;
                                break;
                            }
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
                inbound_slot.leave();
                tracing::debug!("client side of the stream ended");
            }
            .in_current_span(),
        );

        // Outbound side: engine events merged with session notices, polled by the connection
        // itself (no forwarding task between the worker and the socket).
        Ok(Response::new(Box::pin(SessionStream {
            events,
            notices: notice_rx,
            verdict,
            doorbell,
            slot: LeaveOnDrop(slot),
            done: false,
        })))
    }

    async fn generate_once(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<proto::Completed>, Status> {
        let timeout = request_timeout(&request);
        let mut req = request.into_inner();
        req.callback = None;
        let Started {
            mut events,
            slot,
            verdict,
            doorbell,
            ..
        } = self.start(req, timeout)?;
        let guard = LeaveOnDrop(slot);
        while let Some(ev) = events.recv().await {
            doorbell.ring();
            match ev? {
                proto::ServerMessage {
                    kind: Some(server_message::Kind::Completed(c)),
                } => return Ok(Response::new(c)),
                _ => continue,
            }
        }
        Err(unfinished(&verdict, &guard.0).into())
    }

    async fn list_models(
        &self,
        _request: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        let models = self.engine.models().to_vec();
        Ok(Response::new(proto::ListModelsResponse {
            default_model: models.first().map(|m| m.id.clone()).unwrap_or_default(),
            models,
        }))
    }
}

fn rejected(step_index: u32, field: &str, reason: &str) -> proto::ServerMessage {
    proto::ServerMessage {
        kind: Some(server_message::Kind::ReplyRejected(proto::ReplyRejected {
            step_index,
            field: field.into(),
            reason: reason.into(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "5", "5x", "-5S", "1234567890S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
