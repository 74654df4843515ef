//! The `stepstream.v1.Diffusion` service: stream sessions bridged to the engine.

use std::pin::Pin;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::validation::{self, Limits};
use crate::engine::{CancelFlag, Engine, EngineError, EngineEvent, Job, SessionLink};
use crate::proto;
use crate::proto::diffusion_server::Diffusion;
use crate::proto::{client_message, server_message};

/// Events buffered towards one client before the worker waits.
const EVENT_BUFFER: usize = 4;
/// Replies buffered towards the worker before the session refuses more.
const REPLY_BUFFER: usize = 8;

/// The service implementation.
#[derive(Clone)]
pub struct DiffusionService {
    engine: Engine,
    limits: Limits,
}

impl DiffusionService {
    /// A service over a started engine.
    pub fn new(engine: Engine, limits: Limits) -> Self {
        Self { engine, limits }
    }

    /// Validates, admits and submits one generation; returns the stream of its events and the
    /// handles the session needs to feed replies and cancel.
    fn start(
        &self,
        req: proto::GenerateRequest,
    ) -> Result<
        (
            mpsc::Receiver<EngineEvent>,
            mpsc::Sender<proto::StepReply>,
            CancelFlag,
            bool,
        ),
        EngineError,
    > {
        let (index, card) = self.engine.find_model(&req.model)?;
        let valid = validation::validate(&req, card, &self.limits)?;
        let permit = self.engine.admit()?;
        let request_id = format!("{:016x}", validation::random_u64());
        let observe_only = valid
            .subscription
            .as_ref()
            .map(|s| s.observe_only)
            .unwrap_or(true);
        let span = tracing::info_span!("generate", request_id = %request_id, model = %card.id);
        span.in_scope(|| {
            tracing::info!(
                steps = valid.params.num_inference_steps,
                width = valid.params.width,
                height = valid.params.height,
                subscribed = valid.subscription.is_some(),
                "admitted"
            )
        });
        let (events_tx, events_rx) = mpsc::channel(EVENT_BUFFER);
        let (replies_tx, replies_rx) = mpsc::channel(REPLY_BUFFER);
        let cancel = CancelFlag::default();
        self.engine.submit(Job {
            request_id,
            model_index: index,
            params: valid.params,
            tensors: valid.tensors,
            subscription: valid.subscription,
            return_latents: valid.return_latents,
            link: SessionLink {
                events: events_tx,
                replies: replies_rx,
                cancel: cancel.clone(),
            },
            permit,
            admitted: Instant::now(),
            span,
        })?;
        Ok((events_rx, replies_tx, cancel, observe_only))
    }
}

/// Cancels its job when dropped (the response stream went away).
struct CancelOnDrop(CancelFlag);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Diffusion for DiffusionService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<Streaming<proto::ClientMessage>>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
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
        let (events, replies, cancel, observe_only) = self.start(start)?;

        // Inbound side: forward replies to the worker; the client ending or breaking the stream
        // cancels the job. Runs until the client is done or the job is.
        let (notice_tx, mut notice_rx) = mpsc::channel::<EngineEvent>(1);
        let inbound_cancel = cancel.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = replies.closed() => break,
                        msg = inbound.message() => match msg {
                            Ok(Some(proto::ClientMessage { kind: Some(client_message::Kind::Reply(r)) })) => {
                                if observe_only {
                                    let _ = notice_tx.send(Ok(rejected(r.step_index, "reply", "this session is observe-only (or has no callback): no reply is expected"))).await;
                                    continue;
                                }
                                if replies.try_send(r).is_err() {
                                    let _ = notice_tx.send(Err(EngineError::Protocol(format!(
                                        "more than {REPLY_BUFFER} replies sent ahead of the steps they answer"
                                    )))).await;
                                    break;
                                }
                            }
                            Ok(Some(_)) => {
                                let _ = notice_tx.send(Err(EngineError::Protocol(
                                    "only `reply` messages may follow `start`".into(),
                                ))).await;
                                break;
                            }
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
                inbound_cancel.cancel();
                tracing::debug!("client side of the stream ended");
            }
            .in_current_span(),
        );

        // Outbound side: engine events merged with session notices (observe-only replies,
        // protocol errors); ends after Completed or the first error. The client dropping the
        // response cancels the job.
        let (out_tx, out_rx) = mpsc::channel::<Result<proto::ServerMessage, Status>>(EVENT_BUFFER);
        let mut events = events;
        tokio::spawn(
            async move {
                let _guard = CancelOnDrop(cancel);
                loop {
                    let ev = tokio::select! {
                        biased;
                        _ = out_tx.closed() => break,
                        ev = events.recv() => match ev {
                            Some(ev) => ev,
                            None => break,
                        },
                        Some(n) = notice_rx.recv() => n,
                    };
                    let last = matches!(
                        ev,
                        Err(_)
                            | Ok(proto::ServerMessage {
                                kind: Some(server_message::Kind::Completed(_))
                            })
                    );
                    if out_tx.send(ev.map_err(Status::from)).await.is_err() || last {
                        break;
                    }
                }
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn generate_once(
        &self,
        request: Request<proto::GenerateRequest>,
    ) -> Result<Response<proto::Completed>, Status> {
        let mut req = request.into_inner();
        req.callback = None;
        let (mut events, _replies, cancel, _) = self.start(req)?;
        let _guard = CancelOnDrop(cancel);
        while let Some(ev) = events.recv().await {
            match ev? {
                proto::ServerMessage {
                    kind: Some(server_message::Kind::Completed(c)),
                } => return Ok(Response::new(c)),
                _ => continue,
            }
        }
        Err(EngineError::Internal("the generation ended without a result".into()).into())
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
