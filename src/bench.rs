//! `stepstream bench`: the performance report. It runs the server in-process on a chosen model
//! and device, drives it through a real gRPC client on loopback, and measures:
//! - the model's components (UNet, VAE, text encoder, a whole generation) once per kernel mode,
//!   and the peak memory of the whole generation ([`components`]);
//! - G2: what each callback mode adds to the denoising loop against no callback ([`g2`]);
//! - G3: one blocking callback round trip against a raw TCP echo of the same bytes, taken in the
//!   same run ([`g3`], [`tcp_echo_ms`]);
//! - concurrency: N sessions at once against one at a time, and clients that think while an
//!   observer runs ([`concurrency`]).
//!
//! Each section prints as a Markdown table; [`Report::json`] holds everything as one object.

mod components;
mod concurrency;
mod echo;
mod grpc;
mod report;

use candle_core::{DType, Device};

pub use components::{
    components, components_per_kernels, kernel_runs, ComponentRow, ComponentTimes, KernelChoice,
    KernelRun, PeakRow,
};
pub use concurrency::{
    concurrency, ConcurrencyOptions, ConcurrencyReport, ScalingRow, ThinkReport, THINK_TARGET_RATIO,
};
pub use echo::{tcp_echo_ms, ECHO_ROUND_TRIPS, ECHO_WARMUP};
pub use grpc::{g2, g3, G2Row, G3Report, G3Row, Loopback, G3_SIZE, G3_STEPS, G3_TARGET_RATIO};
pub use report::{
    components_table, concurrency_table, g2_table, g3_table, kernel_check_table, peak_table,
    KernelCheckRow, Report,
};

use crate::engine::{Engine, EngineConfig};
use crate::models::pipeline_model::StableDiffusionModel;
use crate::models::{ModelError, ModelSource};
use crate::pipeline::PipelineError;
use crate::server::Limits;

/// The prompt of every bench generation.
const PROMPT: &str = "a photo of an astronaut riding a horse on mars";

/// How much to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Timed runs per measurement (after warm-up runs).
    pub runs: usize,
    /// Denoising steps per generation.
    pub steps: u32,
    /// Image side in pixels for G2 and the components (0: the model's native size).
    pub size: u32,
    /// Denoising steps per G3 generation (each step is one round-trip sample).
    pub g3_steps: u32,
    /// Image side in pixels of the G3 generations ([`G3_SIZE`] for 1×4×64×64 latents).
    pub g3_size: u32,
    /// Session counts of the concurrency section's scaling table.
    pub sessions: Vec<usize>,
    /// Thinking clients of the think-time scenario.
    pub thinkers: usize,
    /// Their think time before every reply, ms.
    pub think_ms: u64,
    /// Rounds of each concurrency measurement.
    pub concurrency_rounds: usize,
    /// The server's live sessions (`None`: the device's default; 1 schedules one generation at
    /// a time, as the first wave did).
    pub max_sessions: Option<usize>,
    /// The server's rows per UNet call (`None`: the device's default).
    pub max_batch: Option<usize>,
    /// The server's gather window, % of a tick's step time (as `serve --batch-window-pct`).
    pub batch_window_pct: u32,
}

/// Which sections to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sections {
    /// Component timings and peak memory.
    pub components: bool,
    /// G2: the callback modes' overhead.
    pub g2: bool,
    /// G3: the callback round trip against a TCP echo.
    pub g3: bool,
    /// Sessions sharing the device.
    pub concurrency: bool,
}

/// A whole bench run: what to load, where, and what to measure.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    /// The model's id (for the report).
    pub model_id: String,
    /// Where its files are.
    pub source: ModelSource,
    /// The compute device.
    pub device: Device,
    /// The device's name as given (`cpu`, `cuda:0`).
    pub device_name: String,
    /// The compute dtype.
    pub dtype: DType,
    /// The dtype's name as given (`f32`, `f16`, `bf16`).
    pub dtype_name: String,
    /// Runs, steps and size.
    pub opts: BenchOptions,
    /// The kernel modes to time the components under.
    pub kernels: KernelChoice,
    /// The sections to measure.
    pub sections: Sections,
}

/// Errors of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The server answered with an error.
    #[error("server: {0}")]
    Status(#[from] tonic::Status),
    /// Loading the model failed.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// A direct generation failed.
    #[error("pipeline: {0}")]
    Pipeline(#[from] PipelineError),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    /// A loopback socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// Setting up the in-process server or client, or a measurement, failed.
    #[error("setup: {0}")]
    Setup(String),
}

/// The median of `v` (the upper one for an even count); 0 for none.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the planned sections (components, then G2, then G3), handing each finished section's
/// Markdown to `emit` as soon as it is measured, and returns the whole report.
pub async fn run(plan: BenchPlan, mut emit: impl FnMut(&str)) -> Result<Report, BenchError> {
    let runs_of_kernels = kernel_runs(plan.kernels);
    let mut report = Report {
        model: plan.model_id.clone(),
        device: plan.device_name.clone(),
        dtype: plan.dtype_name.clone(),
        kernels: runs_of_kernels.iter().map(|k| k.label.clone()).collect(),
        runs: plan.opts.runs.max(1),
        steps: plan.opts.steps,
        size: plan.opts.size,
        ..Default::default()
    };
    emit(&report.header());
    if !plan.device.is_cpu() && plan.kernels != KernelChoice::Reference {
        let checks = crate::kernels::check(&plan.device, plan.dtype)?;
        let rows: Vec<KernelCheckRow> = checks.iter().map(KernelCheckRow::from).collect();
        emit(&kernel_check_table(&rows));
        report.kernel_checks = Some(rows);
    }
    if plan.sections.components {
        measure_components(&plan, &runs_of_kernels, &mut report)?;
        emit(&components_table(
            report.components.as_deref().unwrap_or_default(),
            report.size,
            report.runs,
        ));
        emit(&peak_table(
            report.peak_memory.as_deref().unwrap_or_default(),
        ));
    }
    if !(plan.sections.g2 || plan.sections.g3 || plan.sections.concurrency) {
        return Ok(report);
    }
    crate::kernels::set_mode(runs_of_kernels[0].mode);
    let mut lb = Loopback::start(start_engine(&plan).await?).await?;
    if report.size == 0 {
        report.size = lb.model().default_width;
    }
    if plan.sections.g2 {
        let rows = g2(&mut lb, &plan.opts).await?;
        emit(&g2_table(&rows, report.steps, report.size, report.runs));
        report.g2 = Some(rows);
    }
    if plan.sections.g3 {
        let g3 = g3(&mut lb, &plan.opts).await?;
        emit(&g3_table(&g3));
        report.g3 = Some(g3);
    }
    if plan.sections.concurrency {
        let opts = ConcurrencyOptions {
            sessions: plan.opts.sessions.clone(),
            thinkers: plan.opts.thinkers,
            think_ms: plan.opts.think_ms,
            steps: plan.opts.steps,
            size: report.size,
            rounds: plan.opts.concurrency_rounds,
        };
        let c = concurrency(&mut lb, &opts).await?;
        emit(&concurrency_table(&c));
        report.concurrency = Some(c);
    }
    Ok(report)
}

/// Loads the model directly (no server), times its components per kernel mode and drops it
/// again before the server's engine loads its own copy.
fn measure_components(
    plan: &BenchPlan,
    runs_of_kernels: &[KernelRun],
    report: &mut Report,
) -> Result<(), BenchError> {
    let model = StableDiffusionModel::load(
        plan.model_id.clone(),
        &plan.source,
        &plan.device,
        plan.dtype,
    )?;
    if report.size == 0 {
        report.size = model.defaults.width;
    }
    let (rows, peaks) = components_per_kernels(
        &model,
        runs_of_kernels,
        report.size as usize,
        plan.opts.steps as usize,
        report.runs,
    )?;
    report.components = Some(rows);
    report.peak_memory = Some(peaks);
    Ok(())
}

/// Starts an engine that serves the plan's model (the server's default limits).
async fn start_engine(plan: &BenchPlan) -> Result<Engine, BenchError> {
    let limits = Limits::default();
    let (max_sessions, max_batch) = EngineConfig::default_capacity(&plan.device, plan.dtype);
    Ok(Engine::start(EngineConfig {
        device: plan.device.clone(),
        dtype: plan.dtype,
        models: vec![(plan.model_id.clone(), plan.source.clone())],
        max_queue: 64,
        max_sessions: plan.opts.max_sessions.unwrap_or(max_sessions).max(1),
        max_batch: plan.opts.max_batch.unwrap_or(max_batch).max(1),
        batch_window_pct: plan.opts.batch_window_pct,
        default_reply_timeout: limits.default_reply_timeout,
        max_tensor_bytes: limits.max_tensor_bytes,
        loras: Vec::new(),
        preview_decoders: Vec::new(),
    })
    .await?)
}
