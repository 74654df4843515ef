//! The Rust client of the Diffusion service.
//!
//! - [`Client::generate`] runs one generation over the `Generate` stream and calls a closure at
//!   each subscribed step with a [`StepState`] (tensors as candle tensors); what the closure
//!   returns ([`StepChanges`]) becomes the `StepReply`. This is diffusers'
//!   `callback_on_step_end`, remotely.
//! - [`Client::observe`] runs an observe-only generation as a [`Stream`] of [`Event`]s: the
//!   server never waits for this client.
//! - [`Client::generate_once`] runs a generation without callbacks; [`Client::list_models`]
//!   describes the served models.
//!
//! [`CfgCutoff`] is diffusers' `SDCFGCutoffCallback`, correct at any batch size.
//!
//! A call the server refuses before admitting it (`UNAVAILABLE` from a draining replica,
//! `RESOURCE_EXHAUSTED` from a full queue) is retried under the client's [`RetryPolicy`]
//! (default: 5 attempts), honouring `grpc-retry-pushback-ms`; a failure after `Accepted` is never
//! retried and says how many steps had run ([`ClientError::FailedAfterSteps`]). TLS, mutual TLS
//! included: [`Client::connect_with`] and [`TlsOptions`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), stepstream::client::ClientError> {
//! use stepstream::client::{CfgCutoff, Client};
//! use stepstream::proto;
//!
//! let mut client = Client::connect("127.0.0.1:50051").await?;
//! let cutoff = CfgCutoff::ratio(0.4);
//! let request = proto::GenerateRequest {
//!     prompt: "a photo of an astronaut riding a horse on mars".into(),
//!     callback: Some(cutoff.subscription()),
//!     ..Default::default()
//! };
//! // The cutoff step is chosen from Accepted's timesteps: only that step waits for us.
//! let done = client
//!     .generate_with_steps(request, |a| cutoff.selection(a), |step| cutoff.apply(step))
//!     .await?;
//! std::fs::write("out.png", &done.images[0].data).unwrap();
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use candle_core::Tensor;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
pub use tokio_stream::Stream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::proto::{self, client_message, diffusion_client::DiffusionClient, server_message};

mod connect;
mod retry;

pub(crate) use connect::channel;
pub use connect::{ConnectOptions, TlsOptions};
pub use retry::{pushback, RetryPolicy, PUSHBACK_KEY};

/// Largest message either side may send (images and tensors of big models exceed 4 MiB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// An error a callback may return; it ends the generation.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address could not be parsed or connected to.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The address as given.
        url: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server (or the channel) ended the call with a status before any step had run, or a
    /// `GenerateOnce` with one (`code()` says which).
    #[error("server: {}", status_text(.0))]
    Status(#[from] tonic::Status),
    /// The call was refused again after retries, or the retry policy let it not be retried
    /// (`why` says which).
    #[error("server: {} ({why})", status_text(status))]
    GaveUp {
        /// Attempts made, the first included.
        attempts: u32,
        /// Why no further attempt was made.
        why: String,
        /// The last attempt's status.
        status: tonic::Status,
    },
    /// A generation failed after the server had accepted it. It is never retried: steps had run
    /// (or may have), and running them again is the caller's choice.
    #[error(
        "failed after {steps_completed} of {num_steps} steps: {}",
        status_text(status)
    )]
    FailedAfterSteps {
        /// The steps that had run: a lower bound when the call subscribed to only some steps
        /// (the last `StepEnd` seen, plus one).
        steps_completed: u32,
        /// The generation's timestep count, from `Accepted`.
        num_steps: u32,
        /// The status the server (or the channel) ended the call with.
        status: tonic::Status,
    },
    /// The server refused a reply (and no retry was left).
    #[error("reply to step {step_index} rejected: {field}: {reason}")]
    ReplyRejected {
        /// The step.
        step_index: u32,
        /// What was wrong, e.g. `tensors[prompt_embeds]`.
        field: String,
        /// Why.
        reason: String,
    },
    /// The callback failed; the generation was cancelled.
    #[error("callback failed at step {step_index}: {source}")]
    Callback {
        /// The step.
        step_index: u32,
        /// The callback's error.
        #[source]
        source: BoxError,
    },
    /// A tensor could not be encoded or decoded.
    #[error("tensor `{name}`: {reason}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The server broke the protocol, or a value could not be used.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// A status as `Code: message` (tonic's own text is a debug dump).
fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl ClientError {
    /// The gRPC status code, when the server ended the call with one.
    pub fn code(&self) -> Option<tonic::Code> {
        self.status().map(tonic::Status::code)
    }

    /// The status the call ended with, if it ended with one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s)
            | ClientError::GaveUp { status: s, .. }
            | ClientError::FailedAfterSteps { status: s, .. } => Some(s),
            _ => None,
        }
    }

    /// How many denoising steps had run when a generation failed after `Accepted` (a lower
    /// bound, see [`ClientError::FailedAfterSteps`]); `None` otherwise.
    pub fn steps_completed(&self) -> Option<u32> {
        match self {
            ClientError::FailedAfterSteps {
                steps_completed, ..
            } => Some(*steps_completed),
            _ => None,
        }
    }
}

/// The step at which a cutoff `ratio` applies: Python's `int(num_timesteps * ratio)`.
pub fn cutoff_step(num_timesteps: usize, ratio: f64) -> usize {
    (num_timesteps as f64 * ratio).floor() as usize
}

/// The conditional half of a `[negative; positive]` prompt_embeds wire tensor (any batch).
pub fn conditional_half(t: &proto::Tensor) -> Result<proto::Tensor, ClientError> {
    let b = *t
        .shape
        .first()
        .ok_or_else(|| ClientError::Protocol("empty shape".into()))?;
    if b % 2 != 0 || b == 0 {
        return Err(ClientError::Protocol(format!(
            "prompt_embeds batch {b} is not [negative; positive]"
        )));
    }
    let half_bytes = t.data.len() / 2;
    let mut shape = t.shape.clone();
    shape[0] = b / 2;
    Ok(proto::Tensor {
        dtype: t.dtype,
        shape,
        data: t.data[half_bytes..].to_vec(),
    })
}

/// The conditional half of a `[negative×N; positive×N]` CFG batch, as a candle tensor.
pub fn conditional_half_tensor(t: &Tensor) -> Result<Tensor, ClientError> {
    let b = t.dims().first().copied().unwrap_or(0);
    if b % 2 != 0 || b == 0 {
        return Err(ClientError::Protocol(format!(
            "batch {b} is not [negative; positive]"
        )));
    }
    t.narrow(0, b / 2, b / 2)
        .map_err(|e| ClientError::Protocol(e.to_string()))
}

/// What a callback sees at the end of a step (diffusers' `pipe` attributes and `callback_kwargs`).
#[derive(Clone, Debug)]
pub struct StepState {
    /// diffusers' `step_index`.
    pub step_index: usize,
    /// Where in the step this event is (STEP_END unless the request asked for other phases).
    pub phase: proto::CallbackPhase,
    /// The step's timestep.
    pub timestep: f64,
    /// `pipe.num_timesteps`: the number of timesteps of this run.
    pub num_timesteps: usize,
    /// `pipe.guidance_scale` in force for this step.
    pub guidance_scale: f32,
    /// Whether this step ran classifier-free guidance.
    pub do_classifier_free_guidance: bool,
    /// The subscribed tensors after this step (f32, CPU), by name.
    pub tensors: HashMap<String, Tensor>,
    /// Server time spent on this step, in ms.
    pub step_ms: f64,
    /// Whether the server waits for a reply (false in observe-only runs).
    pub reply_required: bool,
    /// This step's previews (`callback.preview`), one per previewed batch item.
    pub previews: Vec<proto::Preview>,
    /// The server's refusal of this closure's previous answer to this same step, when
    /// [`Client::reply_retries`] let it try again.
    pub rejected: Option<proto::ReplyRejected>,
    /// The server's `Accepted` (seed, timesteps, size, scheduler, ...).
    pub accepted: Arc<proto::Accepted>,
}

impl StepState {
    /// A subscribed tensor, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<&Tensor, ClientError> {
        self.tensors.get(name).ok_or_else(|| ClientError::Tensor {
            name: name.into(),
            reason: "not in this step's tensors (subscribe to it in callback.tensor_inputs)".into(),
        })
    }
}

/// What a callback changes; the default changes nothing.
#[derive(Clone, Debug, Default)]
pub struct StepChanges {
    /// diffusers' `pipe._guidance_scale = x`.
    pub guidance_scale: Option<f32>,
    /// Replacement tensors (only names in `tensor_inputs`).
    pub tensors: HashMap<String, Tensor>,
    /// diffusers' `pipe._interrupt = True`: skip the remaining steps, still decode.
    pub interrupt: bool,
}

impl StepChanges {
    /// No change.
    pub fn none() -> Self {
        Self::default()
    }
    /// Sets the guidance scale.
    pub fn guidance(mut self, g: f32) -> Self {
        self.guidance_scale = Some(g);
        self
    }
    /// Replaces a tensor.
    pub fn tensor(mut self, name: impl Into<String>, t: Tensor) -> Self {
        self.tensors.insert(name.into(), t);
        self
    }
    /// Interrupts the run after this step.
    pub fn interrupt(mut self) -> Self {
        self.interrupt = true;
        self
    }
}

/// diffusers' `SDCFGCutoffCallback`: at step `int(num_timesteps * ratio)` (or a fixed index) set
/// guidance to 0 and keep the conditional half of `prompt_embeds` (right at any batch size;
/// nothing happens when CFG is already off).
#[derive(Clone, Copy, Debug)]
pub enum CfgCutoff {
    /// `cutoff_step_ratio`.
    Ratio(f64),
    /// `cutoff_step_index`.
    Index(usize),
}

impl CfgCutoff {
    /// A cutoff at `int(num_timesteps * ratio)`.
    pub fn ratio(r: f64) -> Self {
        CfgCutoff::Ratio(r)
    }
    /// The step it acts on.
    pub fn step(&self, num_timesteps: usize) -> usize {
        match *self {
            CfgCutoff::Ratio(r) => cutoff_step(num_timesteps, r),
            CfgCutoff::Index(i) => i,
        }
    }
    /// A subscription with `prompt_embeds` whose steps come after Accepted
    /// ([`Client::generate_with_steps`] with [`CfgCutoff::selection`]), so the cutoff step is
    /// computed from the run's real timestep count.
    pub fn subscription(&self) -> proto::CallbackOptions {
        proto::CallbackOptions {
            tensor_inputs: vec!["prompt_embeds".into()],
            await_steps: true,
            ..Default::default()
        }
    }
    /// The same subscription for `model`, naming every CFG-batched tensor it offers (SDXL's
    /// `add_text_embeds` and `add_time_ids` must be halved with `prompt_embeds`, as diffusers'
    /// `SDXLCFGCutoffCallback` does).
    pub fn subscription_for_model(&self, model: &proto::ModelInfo) -> proto::CallbackOptions {
        proto::CallbackOptions {
            tensor_inputs: crate::pipeline::CFG_BATCHED
                .iter()
                .filter(|n| model.callback_tensor_inputs.iter().any(|m| m == *n))
                .map(|n| n.to_string())
                .collect(),
            await_steps: true,
            ..Default::default()
        }
    }
    /// The steps for a run `accepted` describes: only the cutoff step sends an event, and waits.
    pub fn selection(&self, accepted: &proto::Accepted) -> proto::StepSelection {
        let step = self.step(accepted.timesteps.len()) as u32;
        proto::StepSelection {
            step_indices: vec![step],
            ..Default::default()
        }
    }
    /// The changes at this step: guidance 0 and the conditional half of every CFG-batched
    /// tensor the step carries.
    pub fn apply(&self, s: &StepState) -> Result<StepChanges, ClientError> {
        if s.step_index != self.step(s.num_timesteps) || !s.do_classifier_free_guidance {
            return Ok(StepChanges::none());
        }
        let mut changes = StepChanges::none().guidance(0.0);
        for name in crate::pipeline::CFG_BATCHED {
            if s.tensors.contains_key(*name) {
                changes = changes.tensor(*name, conditional_half_tensor(s.tensor(name)?)?);
            }
        }
        Ok(changes)
    }
}

/// One server event of an observe-only run.
#[derive(Clone, Debug)]
pub enum Event {
    /// The request was accepted.
    Accepted(proto::Accepted),
    /// A step ended (its tensors decoded).
    Step(StepState),
    /// The generation finished; the stream ends after it.
    Completed(proto::Completed),
}

/// A connection to a stepstream server.
#[derive(Clone)]
pub struct Client {
    inner: DiffusionClient<Channel>,
    token: Option<MetadataValue<Ascii>>,
    reply_retries: u32,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("reply_retries", &self.reply_retries)
            .field("retry", &self.retry)
            .finish()
    }
}

/// Decodes a wire tensor into an f32 CPU tensor (non-finite values pass: they are the
/// server's, and the client should see them).
fn decode(name: &str, t: &proto::Tensor) -> Result<Tensor, ClientError> {
    crate::tensor::decode_lenient(t, usize::MAX).map_err(|e| ClientError::Tensor {
        name: name.into(),
        reason: e.to_string(),
    })
}

fn step_state(
    s: proto::StepEnd,
    accepted: &Arc<proto::Accepted>,
    rejected: Option<proto::ReplyRejected>,
) -> Result<StepState, ClientError> {
    let mut tensors = HashMap::with_capacity(s.tensors.len());
    for (name, t) in &s.tensors {
        tensors.insert(name.clone(), decode(name, t)?);
    }
    Ok(StepState {
        step_index: s.step_index as usize,
        phase: proto::CallbackPhase::try_from(s.phase).unwrap_or(proto::CallbackPhase::StepEnd),
        timestep: s.timestep,
        num_timesteps: s.num_timesteps as usize,
        guidance_scale: s.guidance_scale,
        do_classifier_free_guidance: s.do_classifier_free_guidance,
        tensors,
        step_ms: s.step_ms,
        reply_required: s.reply_required,
        previews: s.previews.clone(),
        rejected,
        accepted: accepted.clone(),
    })
}

fn closed() -> ClientError {
    ClientError::Protocol("the request stream closed early".into())
}

/// How far an admitted generation got: what a failure after `Accepted` reports.
#[derive(Default)]
struct Progress {
    num_steps: u32,
    steps_completed: u32,
}

impl Progress {
    fn accepted(&mut self, a: &proto::Accepted) {
        self.num_steps = a.timesteps.len() as u32;
    }

    fn step(&mut self, s: &proto::StepEnd) {
        self.steps_completed = self.steps_completed.max(s.step_index + 1);
        if s.num_timesteps > 0 {
            self.num_steps = s.num_timesteps;
        }
    }

    /// `err`, said to have come after `Accepted`.
    fn failed(&self, err: ClientError) -> ClientError {
        match err {
            ClientError::Status(status) => ClientError::FailedAfterSteps {
                steps_completed: self.steps_completed,
                num_steps: self.num_steps,
                status,
            },
            other => other,
        }
    }
}

impl Client {
    /// Connects to `url`: `host:port`, `http://` or `grpc://` in plain HTTP/2; `https://` or
    /// `grpcs://` in TLS checked against the public roots.
    pub async fn connect(url: impl AsRef<str>) -> Result<Self, ClientError> {
        Self::connect_with(url, ConnectOptions::default()).await
    }

    /// Connects to `url` with `options` (TLS with a private CA, mutual TLS, a connect timeout).
    pub async fn connect_with(
        url: impl AsRef<str>,
        options: ConnectOptions,
    ) -> Result<Self, ClientError> {
        Ok(Self::from_channel(
            connect::channel(url.as_ref(), &options).await?,
        ))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: DiffusionClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            token: None,
            reply_retries: 0,
            retry: RetryPolicy::default(),
        }
    }

    /// Sends `authorization: Bearer <token>` with every call.
    pub fn with_token(mut self, token: &str) -> Result<Self, ClientError> {
        let v = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Protocol("the token is not valid header text".into()))?;
        self.token = Some(v);
        Ok(self)
    }

    /// How many times a rejected reply may be retried: the closure runs again for the same step
    /// with [`StepState::rejected`] set. Past that, [`ClientError::ReplyRejected`]. Default 0.
    pub fn reply_retries(mut self, n: u32) -> Self {
        self.reply_retries = n;
        self
    }

    /// How calls the server refuses before admitting them are retried (default:
    /// [`RetryPolicy::default`]; [`RetryPolicy::never`] to see every refusal).
    pub fn retry(mut self, policy: RetryPolicy) -> Result<Self, ClientError> {
        policy.validate()?;
        self.retry = policy;
        Ok(self)
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    /// The served models, their defaults, schedulers and callback tensors.
    pub async fn list_models(&mut self) -> Result<proto::ListModelsResponse, ClientError> {
        let r = self.request(proto::ListModelsRequest {});
        Ok(self.inner.list_models(r).await?.into_inner())
    }

    /// Runs a replay record (`Completed.replay` of a generation that asked for one with
    /// `OutputOptions.return_replay`) again with GenerateOnce: the server applies its edits
    /// itself and makes the same image on the same device and dtype.
    pub async fn replay(
        &mut self,
        record: proto::ReplayRecord,
        output: Option<proto::OutputOptions>,
    ) -> Result<proto::Completed, ClientError> {
        self.generate_once(proto::GenerateRequest {
            replay: Some(Box::new(record)),
            output,
            ..Default::default()
        })
        .await
    }

    /// One generation without callbacks (`GenerateOnce`).
    ///
    /// `GenerateOnce` has no `Accepted` to mark admission, so a status with a retryable code is
    /// retried whenever it comes: almost always a refusal before any step, but a replica cut off
    /// mid-run behind a balancer can also end the call with `UNAVAILABLE`, and that generation
    /// then runs again from the start. Use [`Client::generate`] or [`Client::observe`] when a
    /// run must never be repeated.
    pub async fn generate_once(
        &mut self,
        request: proto::GenerateRequest,
    ) -> Result<proto::Completed, ClientError> {
        let mut attempts = retry::Attempts::new(&self.retry);
        loop {
            let r = self.request(request.clone());
            match self.inner.generate_once(r).await {
                Ok(done) => return Ok(done.into_inner()),
                Err(status) => {
                    let wait = attempts.after(status.into(), "GenerateOnce")?;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Opens a `Generate` stream with `request` as `start`; returns the reply sender (which must
    /// stay alive until `Completed`) and the event stream.
    async fn open(
        &mut self,
        request: proto::GenerateRequest,
    ) -> Result<
        (
            mpsc::Sender<proto::ClientMessage>,
            tonic::Streaming<proto::ServerMessage>,
        ),
        ClientError,
    > {
        let (tx, rx) = mpsc::channel(4);
        tx.send(proto::ClientMessage {
            kind: Some(client_message::Kind::Start(request)),
        })
        .await
        .map_err(|_| closed())?;
        let r = self.request(ReceiverStream::new(rx));
        let inbound = self.inner.generate(r).await?.into_inner();
        Ok((tx, inbound))
    }

    /// Runs one generation, calling `callback` at each step the request subscribes to
    /// (`request.callback`; unset: every step, no tensors) and sending what it returns as the
    /// step's reply. Only the subscribed steps wait for this client: subscribe to the steps the
    /// callback acts on (`step_indices`) to let the others run at full speed.
    ///
    /// A refusal before `Accepted` is retried under the client's [`RetryPolicy`]; the callback
    /// only ever sees the attempt that was admitted. A failure after `Accepted` is
    /// [`ClientError::FailedAfterSteps`].
    pub async fn generate<F, E>(
        &mut self,
        request: proto::GenerateRequest,
        callback: F,
    ) -> Result<proto::Completed, ClientError>
    where
        F: FnMut(&StepState) -> Result<StepChanges, E>,
        E: Into<BoxError>,
    {
        self.generate_selecting(
            request,
            None::<fn(&proto::Accepted) -> proto::StepSelection>,
            callback,
        )
        .await
    }

    /// [`Client::generate`] whose steps are chosen from `Accepted` (its timesteps and sigmas) by
    /// `select`, before step 0 runs (`CallbackOptions.await_steps`; leave the request's
    /// `step_indices`, `every` and `reply_step_indices` unset). A helper that acts at
    /// `int(num_timesteps * ratio)` so never guesses the count.
    pub async fn generate_with_steps<S, F, E>(
        &mut self,
        mut request: proto::GenerateRequest,
        select: S,
        callback: F,
    ) -> Result<proto::Completed, ClientError>
    where
        S: Fn(&proto::Accepted) -> proto::StepSelection,
        F: FnMut(&StepState) -> Result<StepChanges, E>,
        E: Into<BoxError>,
    {
        request
            .callback
            .get_or_insert_with(Default::default)
            .await_steps = true;
        self.generate_selecting(request, Some(select), callback)
            .await
    }

    async fn generate_selecting<S, F, E>(
        &mut self,
        mut request: proto::GenerateRequest,
        select: Option<S>,
        mut callback: F,
    ) -> Result<proto::Completed, ClientError>
    where
        S: Fn(&proto::Accepted) -> proto::StepSelection,
        F: FnMut(&StepState) -> Result<StepChanges, E>,
        E: Into<BoxError>,
    {
        let mut cb = request.callback.take().unwrap_or_default();
        cb.observe_only = false;
        request.callback = Some(cb);
        let mut attempts = retry::Attempts::new(&self.retry);
        loop {
            let mut progress = None;
            match self
                .generate_attempt(
                    request.clone(),
                    select.as_ref(),
                    &mut callback,
                    &mut progress,
                )
                .await
            {
                Ok(done) => return Ok(done),
                Err(e) => match progress {
                    // Admitted: never retried.
                    Some(p) => return Err(p.failed(e)),
                    None => tokio::time::sleep(attempts.after(e, "Generate")?).await,
                },
            }
        }
    }

    /// One attempt of [`Client::generate`]; `progress` is set once the server accepts it.
    async fn generate_attempt<S, F, E>(
        &mut self,
        request: proto::GenerateRequest,
        select: Option<&S>,
        mut callback: F,
        progress: &mut Option<Progress>,
    ) -> Result<proto::Completed, ClientError>
    where
        S: Fn(&proto::Accepted) -> proto::StepSelection,
        F: FnMut(&StepState) -> Result<StepChanges, E>,
        E: Into<BoxError>,
    {
        let wire = request
            .callback
            .as_ref()
            .and_then(|c| proto::DType::try_from(c.wire_dtype).ok())
            .unwrap_or(proto::DType::DtypeF32);
        let (tx, mut inbound) = self.open(request).await?;
        let mut accepted: Option<Arc<proto::Accepted>> = None;
        let mut last: Option<proto::StepEnd> = None;
        let mut tries = 0u32;
        let mut answer = |step: &proto::StepEnd,
                          accepted: &Arc<proto::Accepted>,
                          rejected: Option<proto::ReplyRejected>|
         -> Result<proto::StepReply, ClientError> {
            let state = step_state(step.clone(), accepted, rejected)?;
            let changes = callback(&state).map_err(|e| ClientError::Callback {
                step_index: step.step_index,
                source: e.into(),
            })?;
            let mut reply = proto::StepReply {
                step_index: step.step_index,
                phase: step.phase,
                guidance_scale: changes.guidance_scale,
                interrupt: changes.interrupt,
                ..Default::default()
            };
            for (name, t) in &changes.tensors {
                let w = crate::tensor::encode(t, wire).map_err(|e| ClientError::Tensor {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
                reply.tensors.insert(name.clone(), w);
            }
            Ok(reply)
        };
        while let Some(msg) = inbound.message().await? {
            match msg.kind {
                Some(server_message::Kind::Accepted(a)) => {
                    progress.get_or_insert_with(Progress::default).accepted(&a);
                    if let Some(select) = select {
                        tx.send(proto::ClientMessage {
                            kind: Some(client_message::Kind::Steps(select(&a))),
                        })
                        .await
                        .map_err(|_| closed())?;
                    }
                    accepted = Some(Arc::new(a));
                }
                Some(server_message::Kind::StepEnd(s)) => {
                    let acc = accepted
                        .as_ref()
                        .ok_or_else(|| ClientError::Protocol("StepEnd before Accepted".into()))?;
                    if let Some(p) = progress.as_mut() {
                        p.step(&s);
                    }
                    tries = 0;
                    let reply = answer(&s, acc, None)?;
                    if s.reply_required {
                        tx.send(proto::ClientMessage {
                            kind: Some(client_message::Kind::Reply(reply)),
                        })
                        .await
                        .map_err(|_| closed())?;
                    }
                    last = Some(s);
                }
                Some(server_message::Kind::ReplyRejected(r)) => {
                    if r.field.starts_with("steps") {
                        // The selector's answer is a function of Accepted: asking again gives
                        // the same one.
                        return Err(ClientError::ReplyRejected {
                            step_index: r.step_index,
                            field: r.field,
                            reason: r.reason,
                        });
                    }
                    let (Some(step), Some(acc)) = (&last, &accepted) else {
                        return Err(ClientError::Protocol(
                            "ReplyRejected before any StepEnd".into(),
                        ));
                    };
                    if tries >= self.reply_retries {
                        return Err(ClientError::ReplyRejected {
                            step_index: r.step_index,
                            field: r.field,
                            reason: r.reason,
                        });
                    }
                    tries += 1;
                    let reply = answer(step, acc, Some(r))?;
                    tx.send(proto::ClientMessage {
                        kind: Some(client_message::Kind::Reply(reply)),
                    })
                    .await
                    .map_err(|_| closed())?;
                }
                Some(server_message::Kind::Completed(c)) => return Ok(c),
                Some(server_message::Kind::Queued(_)) | None => {}
            }
        }
        Err(ClientError::Protocol(
            "the stream ended without Completed".into(),
        ))
    }

    /// Runs one observe-only generation: the server sends the events `request.callback` asks for
    /// (unset: every step, no tensors) and never waits for this client. Dropping the stream
    /// before `Completed` cancels the generation.
    ///
    /// Returns once the server has accepted the generation (the stream's first event is
    /// [`Event::Accepted`]); refusals before that are retried under the client's
    /// [`RetryPolicy`]. A failure after it is [`ClientError::FailedAfterSteps`].
    pub async fn observe(
        &mut self,
        mut request: proto::GenerateRequest,
    ) -> Result<Events, ClientError> {
        let mut cb = request.callback.take().unwrap_or_default();
        cb.observe_only = true;
        request.callback = Some(cb);
        let mut attempts = retry::Attempts::new(&self.retry);
        loop {
            match self.observe_attempt(request.clone()).await {
                Ok(events) => return Ok(events),
                Err(e) => tokio::time::sleep(attempts.after(e, "Generate")?).await,
            }
        }
    }

    /// Opens an observe-only stream and reads it up to `Accepted`.
    async fn observe_attempt(
        &mut self,
        request: proto::GenerateRequest,
    ) -> Result<Events, ClientError> {
        let (tx, mut inbound) = self.open(request).await?;
        loop {
            match inbound.message().await? {
                Some(proto::ServerMessage {
                    kind: Some(server_message::Kind::Accepted(a)),
                }) => {
                    let mut progress = Progress::default();
                    progress.accepted(&a);
                    return Ok(Events {
                        inbound,
                        _requests: Some(tx),
                        accepted: Arc::new(a),
                        first: true,
                        progress,
                        done: false,
                    });
                }
                Some(proto::ServerMessage {
                    kind: Some(server_message::Kind::Queued(_)) | None,
                }) => continue,
                Some(_) => {
                    return Err(ClientError::Protocol(
                        "the server sent an event before Accepted".into(),
                    ))
                }
                None => {
                    return Err(ClientError::Protocol(
                        "the stream ended without Completed".into(),
                    ))
                }
            }
        }
    }
}

/// The events of an observe-only run ([`Client::observe`]); ends after [`Event::Completed`] or
/// the first error.
pub struct Events {
    inbound: tonic::Streaming<proto::ServerMessage>,
    // Keeps the request stream open until the run ends: closing it cancels the generation.
    _requests: Option<mpsc::Sender<proto::ClientMessage>>,
    accepted: Arc<proto::Accepted>,
    /// Whether `Accepted` (read by `observe` already) is still to be yielded.
    first: bool,
    progress: Progress,
    done: bool,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("request_id", &self.accepted.request_id)
            .field("steps_completed", &self.progress.steps_completed)
            .field("done", &self.done)
            .finish()
    }
}

impl Stream for Events {
    type Item = Result<Event, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.first {
            self.first = false;
            return Poll::Ready(Some(Ok(Event::Accepted((*self.accepted).clone()))));
        }
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let msg = match Pin::new(&mut self.inbound).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(ClientError::Protocol(
                        "the stream ended without Completed".into(),
                    ))));
                }
                Poll::Ready(Some(Err(status))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(self.progress.failed(status.into()))));
                }
                Poll::Ready(Some(Ok(m))) => m,
            };
            let ev = match msg.kind {
                Some(server_message::Kind::Accepted(_)) => {
                    Err(ClientError::Protocol("a second Accepted".into()))
                }
                Some(server_message::Kind::StepEnd(s)) => {
                    self.progress.step(&s);
                    step_state(s, &self.accepted, None).map(Event::Step)
                }
                Some(server_message::Kind::Completed(c)) => {
                    self.done = true;
                    self._requests = None;
                    Ok(Event::Completed(c))
                }
                Some(server_message::Kind::ReplyRejected(r)) => {
                    Err(ClientError::Protocol(format!(
                        "ReplyRejected in an observe-only run: {}: {}",
                        r.field, r.reason
                    )))
                }
                Some(server_message::Kind::Queued(_)) | None => continue,
            };
            if ev.is_err() {
                self.done = true;
            }
            return Poll::Ready(Some(ev));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cutoff_step_is_pythons_int_of_the_product() {
        assert_eq!(cutoff_step(10, 0.4), 4);
        assert_eq!(cutoff_step(100, 0.29), 28); // 100 * 0.29 = 28.999999999999996
        assert_eq!(cutoff_step(11, 0.4), 4);
        assert_eq!(cutoff_step(10, 0.0), 0);
    }

    #[test]
    fn conditional_half_keeps_the_positive_rows_at_any_batch() {
        let t = proto::Tensor {
            dtype: proto::DType::DtypeF32 as i32,
            shape: vec![4, 1, 2],
            data: (0u8..32).collect(),
        };
        let h = conditional_half(&t).unwrap();
        assert_eq!(h.shape, vec![2, 1, 2]);
        assert_eq!(h.data, (16u8..32).collect::<Vec<_>>());
        let odd = proto::Tensor {
            shape: vec![3, 1, 1],
            data: vec![0; 12],
            ..t
        };
        assert!(conditional_half(&odd).is_err());

        let c = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 2))
            .unwrap();
        let h = conditional_half_tensor(&c).unwrap();
        assert_eq!(
            h.to_vec2::<f32>().unwrap(),
            vec![vec![4.0, 5.0], vec![6.0, 7.0]]
        );
        assert!(conditional_half_tensor(&c.narrow(0, 0, 3).unwrap()).is_err());
    }

    fn state(step: usize, cfg: bool, batch: usize) -> StepState {
        StepState {
            step_index: step,
            phase: proto::CallbackPhase::StepEnd,
            timestep: 0.0,
            num_timesteps: 10,
            guidance_scale: if cfg { 7.5 } else { 0.0 },
            do_classifier_free_guidance: cfg,
            tensors: HashMap::from([(
                "prompt_embeds".to_string(),
                Tensor::zeros((batch, 77, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
            )]),
            step_ms: 0.0,
            reply_required: true,
            previews: Vec::new(),
            rejected: None,
            accepted: Arc::new(proto::Accepted::default()),
        }
    }

    #[test]
    fn cfg_cutoff_acts_once_and_only_under_cfg() {
        let c = CfgCutoff::ratio(0.4);
        let pndm = proto::Accepted {
            timesteps: vec![0.0; 11],
            ..Default::default()
        };
        assert_eq!(c.selection(&pndm).step_indices, vec![4]);
        assert!(c.subscription().await_steps);
        let none = c.apply(&state(3, true, 4)).unwrap();
        assert!(none.guidance_scale.is_none() && none.tensors.is_empty());
        let at = c.apply(&state(4, true, 4)).unwrap();
        assert_eq!(at.guidance_scale, Some(0.0));
        assert_eq!(at.tensors["prompt_embeds"].dims(), &[2, 77, 8]);
        assert!(c.apply(&state(4, false, 2)).unwrap().tensors.is_empty());
        assert_eq!(CfgCutoff::Index(7).step(100), 7);
    }
}
