//! One device loop per device owns the loaded models and every live session (see [`device`]):
//! concurrent sessions share each UNet call, and a session waiting for its client's reply sits
//! the tick out while the others step. Requests beyond `max_sessions` queue in FIFO order,
//! bounded by `max_queue`. Sessions talk to the loop through channels that never block it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{Metrics, Outcome};
use crate::models::pipeline_model::StableDiffusionModel;
use crate::models::{ModelError, ModelSource};
use crate::pipeline::sd::{self, GenerateParams};
use crate::pipeline::{NoCallback, PipelineError};
use crate::proto;
use crate::schedulers::config::PredictionType;

mod cards;
mod device;
mod doorbell;
mod live;
mod slot;
mod subscription;

pub use doorbell::Doorbell;
pub use slot::{CancelFlag, Slot, StopReason};
pub use subscription::{sorted, steps_in_range, Hook, Subscription, GUIDANCE_TENSORS};

/// Errors of a request's life in the engine (and of its validation); the server maps each to a
/// gRPC status in one place.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum EngineError {
    /// A request field is invalid.
    #[error("invalid `{field}`: {reason}")]
    InvalidRequest {
        /// The field, e.g. `start.width`.
        field: String,
        /// Why.
        reason: String,
    },
    /// The model id is not served.
    #[error("unknown model `{name}`; served models: {}", available.join(", "))]
    UnknownModel {
        /// What was asked for.
        name: String,
        /// What exists.
        available: Vec<String>,
    },
    /// The queue is full.
    #[error("the generation queue is full ({capacity} live or queued); retry later")]
    QueueFull {
        /// Live plus queued places.
        capacity: usize,
    },
    /// A reply did not come in time and the request said to abort.
    #[error("no valid reply for step {step_index} within {timeout_ms} ms")]
    ReplyTimeout {
        /// The step waited on.
        step_index: usize,
        /// The deadline used.
        timeout_ms: u64,
    },
    /// The client stopped reading events.
    #[error("the client read no event for {timeout_ms} ms")]
    ClientStalled {
        /// The deadline used.
        timeout_ms: u64,
    },
    /// No `start` message came in time.
    #[error("no `start` message within {timeout_ms} ms")]
    StartTimeout {
        /// The deadline used.
        timeout_ms: u64,
    },
    /// The whole generation ran past the client's `grpc-timeout`.
    #[error("the generation ran past its deadline of {timeout_ms} ms")]
    DeadlineExceeded {
        /// The deadline, from the start of the request.
        timeout_ms: u64,
    },
    /// The RPC carried no valid token.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The client went away.
    #[error("cancelled by the client")]
    Cancelled,
    /// The client broke the session protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server is shutting down or the device loop is gone.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or a failure inside the model code.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// The metrics outcome this error counts as.
    pub fn outcome(&self) -> Outcome {
        match self {
            EngineError::InvalidRequest { .. }
            | EngineError::UnknownModel { .. }
            | EngineError::Protocol(_)
            | EngineError::Unauthenticated(_) => Outcome::Invalid,
            EngineError::QueueFull { .. } => Outcome::QueueFull,
            EngineError::ReplyTimeout { .. }
            | EngineError::ClientStalled { .. }
            | EngineError::StartTimeout { .. }
            | EngineError::DeadlineExceeded { .. } => Outcome::Deadline,
            EngineError::Cancelled => Outcome::Cancelled,
            EngineError::Unavailable(_) => Outcome::Unavailable,
            EngineError::Internal(_) => Outcome::Internal,
        }
    }
}

impl From<PipelineError> for EngineError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::InvalidRequest { field, reason } => EngineError::InvalidRequest {
                field: format!("start.{field}"),
                reason,
            },
            // The device loop runs no StepCallback, so no callback error reaches it: the
            // rest are failures of the model code.
            other => EngineError::Internal(other.to_string()),
        }
    }
}

/// How the engine is set up.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The device the loop runs on.
    pub device: Device,
    /// The compute dtype.
    pub dtype: DType,
    /// Models to load, `(id, files)`; the first is the default.
    pub models: Vec<(String, ModelSource)>,
    /// Generations allowed to wait while `max_sessions` are live.
    pub max_queue: usize,
    /// Sessions live on the device at once (stepping or waiting for their clients).
    pub max_sessions: usize,
    /// Rows in one UNet call (each session's images, doubled under CFG).
    pub max_batch: usize,
    /// How long a tick may be held for replies just asked for, in % of the last tick's step
    /// time (capped at 50 ms; 0: never held).
    pub batch_window_pct: u32,
    /// Reply deadline when a request sets none.
    pub default_reply_timeout: Duration,
    /// The largest tensor a client may send, in bytes.
    pub max_tensor_bytes: usize,
    /// LoRAs to attach at load, `(model id, file)`, in the order requests see them.
    pub loras: Vec<(String, Arc<crate::models::lora::LoraFile>)>,
    /// TAESD folders for step previews, `(model id, AutoencoderTiny folder)`.
    pub preview_decoders: Vec<(String, std::path::PathBuf)>,
}

impl EngineConfig {
    /// The documented default `(max_sessions, max_batch)` for a device and dtype: on the CPU a
    /// batch mostly saves per-call overhead, so 16 rows; on a GPU, 32 rows in f16/bf16 and 16 in
    /// f32 (activation memory at SD 1.5 512² is about 0.2 GiB a row in f16). Live sessions cost
    /// only their latents and conditioning while they wait, so 64 may be live everywhere.
    pub fn default_capacity(device: &Device, dtype: DType) -> (usize, usize) {
        match (device.is_cpu(), dtype) {
            (true, _) => (64, 16),
            (false, DType::F32) => (64, 16),
            (false, _) => (64, 32),
        }
    }
}

/// What the device loop sends back to a session.
pub type EngineEvent = Result<proto::ServerMessage, EngineError>;

/// How a session ended when it did not complete: set by the device loop before it drops the
/// event channel, so the stream can end with the status the session earned. Never blocks the
/// loop (a client that reads nothing cannot hold the final error back).
#[derive(Clone, Debug, Default)]
pub struct Verdict(Arc<Mutex<Option<EngineError>>>);

impl Verdict {
    /// Records the error the session ended with (the first one wins).
    pub fn set(&self, e: EngineError) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.is_none() {
            *v = Some(e);
        }
    }

    /// The error the session ended with, if it did not complete.
    pub fn get(&self) -> Option<EngineError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What a client sends a live session after `start`.
#[derive(Debug)]
pub enum ClientInput {
    /// The answer to an event that waits.
    Reply(proto::StepReply),
    /// The steps of a subscription with `await_steps`.
    Steps(proto::StepSelection),
}

/// A session's end of a job: where events go and where replies come from.
pub struct SessionLink {
    /// Events to the client (Accepted, StepEnd, ReplyRejected, Completed).
    pub events: mpsc::Sender<EngineEvent>,
    /// The client's replies and step selection, in arrival order; closed when the client is
    /// gone.
    pub replies: mpsc::Receiver<ClientInput>,
    /// Set when the client is gone.
    pub cancel: CancelFlag,
    /// Set by the loop when the session ends with an error.
    pub verdict: Verdict,
}

/// A request's input tensors as they came over the wire (headers checked, data not yet read).
#[derive(Debug, Default)]
pub struct RequestTensors {
    /// Initial latents.
    pub latents: Option<proto::Tensor>,
    /// Prompt embeddings instead of the prompt.
    pub prompt_embeds: Option<proto::Tensor>,
    /// Negative prompt embeddings.
    pub negative_prompt_embeds: Option<proto::Tensor>,
}

impl RequestTensors {
    /// Decodes the tensors into `params` (on the device loop: tensor work stays off the async runtime).
    fn decode_into(self, params: &mut GenerateParams, max_bytes: usize) -> Result<(), EngineError> {
        let decode = |field: &str, t: Option<proto::Tensor>| {
            t.map(|t| crate::tensor::decode(&t, max_bytes))
                .transpose()
                .map_err(|e| EngineError::InvalidRequest {
                    field: format!("start.{field}"),
                    reason: e.to_string(),
                })
        };
        params.latents = decode("latents", self.latents)?;
        params.prompt_embeds = decode("prompt_embeds", self.prompt_embeds)?;
        params.negative_prompt_embeds =
            decode("negative_prompt_embeds", self.negative_prompt_embeds)?;
        Ok(())
    }
}

/// One generation waiting for the device loop.
pub struct Job {
    /// The id reported to the client.
    pub request_id: String,
    /// Index of the model in the engine's list.
    pub model_index: usize,
    /// The validated request.
    pub params: GenerateParams,
    /// Its input tensors, decoded on the device loop.
    pub tensors: RequestTensors,
    /// Its queue position when it was admitted (reported in Accepted).
    pub queue_position: u32,
    /// Callback subscription (`None`: no StepEnd at all).
    pub subscription: Option<Subscription>,
    /// Whether to send the final latents.
    pub return_latents: bool,
    /// The session's channels.
    pub link: SessionLink,
    /// The admission slot, shared with the session (a client leaving the queue frees it at once).
    pub slot: Arc<Slot>,
    /// When the whole generation must be done (the client's `grpc-timeout`), and that timeout.
    pub deadline: Option<(Instant, Duration)>,
    /// When the job was admitted.
    pub admitted: Instant,
    /// The request's tracing span.
    pub span: tracing::Span,
    /// A replay's edits, applied by the session itself in loop order (`None`: not a replay).
    pub replay: Option<Vec<proto::StepReply>>,
    /// The record to fill for `Completed.replay` (the resolved request, no edits yet).
    pub record: Option<proto::ReplayRecord>,
}

impl Job {
    /// UNet rows it will take once live: its images, doubled under CFG (an upper estimate: a
    /// guidance-distilled model never doubles).
    pub fn rows(&self) -> usize {
        let images = self.params.num_images_per_prompt.max(1);
        if self.params.guidance_scale > 1.0 {
            2 * images
        } else {
            images
        }
    }
}

/// The engine as the server sees it: model cards, admission, submission.
#[derive(Clone)]
pub struct Engine {
    jobs: std::sync::mpsc::Sender<Job>,
    admission: Arc<slot::Admission>,
    metrics: Arc<Metrics>,
    models: Arc<Vec<proto::ModelInfo>>,
    schedules: Arc<Vec<Schedule>>,
    doorbell: Arc<Doorbell>,
}

/// What a model's timesteps follow from: its scheduler config and default scheduler. Kept off
/// the device so that requests are checked against their timesteps before they queue.
#[derive(Clone, Debug)]
struct Schedule {
    config: crate::schedulers::config::SchedulerConfig,
    default: &'static str,
}

/// A model's card and its schedule, as the device thread reports them once loaded.
type Loaded = (Vec<proto::ModelInfo>, Vec<Schedule>);

impl Engine {
    /// Starts the device loop's thread, loads every model on it and returns once they are ready
    /// (or with the load error, so a bad model fails at start).
    pub async fn start(config: EngineConfig) -> Result<Engine, ModelError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Job>();
        let worker_config = config.clone();
        let metrics = Metrics::new();
        let worker_metrics = metrics.clone();
        let doorbell = Arc::new(Doorbell::default());
        let worker_bell = doorbell.clone();
        std::thread::Builder::new()
            .name(format!("stepstream-device-{:?}", config.device.location()))
            .spawn(move || {
                worker(
                    worker_config,
                    jobs_rx,
                    ready_tx,
                    worker_metrics,
                    worker_bell,
                )
            })
            .map_err(|source| ModelError::Io {
                path: "device thread".into(),
                source,
            })?;
        let (models, schedules) = ready_rx
            .await
            .map_err(|_| ModelError::Hub("the device thread died while loading models".into()))??;
        Ok(Engine {
            jobs: jobs_tx,
            admission: slot::Admission::new(
                config.max_sessions,
                config.max_queue,
                metrics.clone(),
                doorbell.clone(),
            ),
            metrics,
            models: Arc::new(models),
            schedules: Arc::new(schedules),
            doorbell,
        })
    }

    /// The number of timesteps a request for model `index` runs: scheduler `name` ("" = the
    /// model's own) at `steps` steps. Host arithmetic only (no tensors), so the server calls it
    /// while validating, before the request queues.
    pub fn num_timesteps(
        &self,
        index: usize,
        name: &str,
        steps: usize,
    ) -> Result<usize, EngineError> {
        let s = self
            .schedules
            .get(index)
            .ok_or_else(|| EngineError::UnknownModel {
                name: format!("#{index}"),
                available: self.models.iter().map(|m| m.id.clone()).collect(),
            })?;
        let name = if name.is_empty() { s.default } else { name };
        crate::schedulers::build(name, &s.config, steps, &Default::default())
            .map(|sch| sch.timesteps().len())
            .map_err(|e| EngineError::InvalidRequest {
                field: "start.scheduler".into(),
                reason: e.to_string(),
            })
    }

    /// The device loop's doorbell: ring it after handing the loop a reply or taking an event.
    pub fn doorbell(&self) -> &Arc<Doorbell> {
        &self.doorbell
    }

    /// The served models; the first is the default.
    pub fn models(&self) -> &[proto::ModelInfo] {
        &self.models
    }

    /// Finds a model by id ("" = the default).
    pub fn find_model(&self, id: &str) -> Result<(usize, &proto::ModelInfo), EngineError> {
        if id.is_empty() {
            return Ok((0, &self.models[0]));
        }
        self.models
            .iter()
            .enumerate()
            .find(|(_, m)| m.id == id)
            .ok_or_else(|| EngineError::UnknownModel {
                name: id.to_string(),
                available: self.models.iter().map(|m| m.id.clone()).collect(),
            })
    }

    /// Takes a live-or-queued slot, or fails at once (`QueueFull`, or `Unavailable` while
    /// draining); returns it with its queue position (0: it goes live at once).
    pub fn admit(&self) -> Result<(Arc<Slot>, usize), EngineError> {
        self.admission.admit()
    }

    /// Generations live or queued right now.
    pub fn active(&self) -> usize {
        self.admission.active()
    }

    /// Stops admitting: new requests get UNAVAILABLE; admitted ones go on.
    pub fn begin_drain(&self) {
        self.admission.begin_drain();
    }

    /// Stops every live generation (they end with UNAVAILABLE).
    pub fn abort_all(&self) {
        self.admission.abort_all();
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Hands a job to the device loop.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        self.jobs
            .send(job)
            .map_err(|_| EngineError::Unavailable("the device thread has stopped".into()))?;
        self.doorbell.ring();
        Ok(())
    }
}

fn model_card(m: &StableDiffusionModel, device: &Device) -> proto::ModelInfo {
    proto::ModelInfo {
        id: m.id.clone(),
        family: m.family.as_str().into(),
        default_width: m.defaults.width,
        default_height: m.defaults.height,
        default_steps: m.defaults.steps,
        default_guidance_scale: m.defaults.guidance_scale,
        default_scheduler: m.defaults.scheduler.into(),
        schedulers: crate::schedulers::SCHEDULER_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        scheduler_info: cards::scheduler_info(&m.scheduler_config),
        callback_tensor_inputs: m
            .callback_tensor_inputs()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        prediction_type: match m.scheduler_config.prediction_type {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
        .into(),
        dtype: format!("{:?}", m.dtype).to_lowercase(),
        device: match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".into(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            other => format!("{other:?}"),
        },
        loras: m
            .loras
            .iter()
            .map(|l| proto::LoraInfo {
                name: l.name.clone(),
                format: l.format.as_str().into(),
                rank: l.rank as u32,
                modules: l.modules.clone(),
            })
            .collect(),
        preview_decoders: std::iter::once("linear")
            .chain(m.preview_decoder.as_ref().map(|_| "taesd"))
            .map(String::from)
            .collect(),
    }
}

fn worker(
    config: EngineConfig,
    jobs: std::sync::mpsc::Receiver<Job>,
    ready: oneshot::Sender<Result<Loaded, ModelError>>,
    metrics: Arc<Metrics>,
    bell: Arc<Doorbell>,
) {
    // Check the fused kernels before any model uses them; one that disagrees with the f32
    // reference is switched off (logged) and the reference ops run instead.
    match crate::kernels::verify(&config.device, config.dtype) {
        Ok(checks) if !checks.is_empty() => {
            let applied = checks.iter().filter(|c| c.applied).count();
            let failed = checks.iter().filter(|c| !c.passed()).count();
            tracing::info!(
                applied,
                failed,
                "fused kernels checked against the f32 reference"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "fused kernel check could not run"),
    }
    if let Some((model, dir)) = config
        .preview_decoders
        .iter()
        .find(|(model, _)| !config.models.iter().any(|(id, _)| id == model))
    {
        let _ = ready.send(Err(ModelError::Unsupported {
            path: dir.display().to_string(),
            reason: format!("a preview decoder for model `{model}`, which is not served"),
        }));
        return;
    }
    if let Some((model, file)) = config
        .loras
        .iter()
        .find(|(model, _)| !config.models.iter().any(|(id, _)| id == model))
    {
        let _ = ready.send(Err(ModelError::Unsupported {
            path: file.path.display().to_string(),
            reason: format!(
                "LoRA `{}` is for model `{model}`, which is not served",
                file.name
            ),
        }));
        return;
    }
    let mut models = Vec::new();
    for (id, source) in &config.models {
        let t0 = Instant::now();
        let loaded = StableDiffusionModel::load(id.clone(), source, &config.device, config.dtype)
            .and_then(|mut m| {
                tracing::info!(model = %id, source = %source.describe(), ms = t0.elapsed().as_millis() as u64, "model loaded");
                for (_, file) in config.loras.iter().filter(|(model, _)| model == id) {
                    let info = m.add_lora(file)?;
                    tracing::info!(model = %id, lora = %info.name, format = info.format.as_str(), rank = info.rank, modules = info.modules.len(), "LoRA attached");
                }
                if let Some((_, dir)) = config.preview_decoders.iter().find(|(model, _)| model == id) {
                    let tiny = crate::models::taesd::TinyDecoder::load(dir, &config.device, config.dtype)?;
                    tracing::info!(model = %id, dir = %dir.display(), "preview decoder loaded");
                    m.preview_decoder = Some(tiny);
                }
                Ok(m)
            });
        match loaded {
            Ok(m) => models.push(m),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        }
    }
    // Warm up: one tiny denoising step per model, so the first request pays no first-use cost.
    for m in &models {
        if let Err(e) = warm_up(m) {
            tracing::warn!(model = %m.id, error = %e, "warm-up failed");
        }
    }
    let cards = models
        .iter()
        .map(|m| model_card(m, &config.device))
        .collect();
    let schedules = models
        .iter()
        .map(|m| Schedule {
            config: m.scheduler_config.clone(),
            default: m.defaults.scheduler,
        })
        .collect();
    if ready.send(Ok((cards, schedules))).is_err() {
        return;
    }
    device::run(&config, &models, jobs, &bell, &metrics);
}

fn warm_up(m: &StableDiffusionModel) -> Result<(), PipelineError> {
    let vsf = m.vae_scale_factor();
    let params = GenerateParams::text("", 1, vsf * 8, vsf * 8);
    sd::prepare(m, &params)?.run(&mut NoCallback)?;
    Ok(())
}
