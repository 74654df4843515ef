//! The `stepstream` binary: `serve` runs the gRPC server, `generate` is a command-line client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use stepstream::client::{self, CfgCutoff, Client, Event};
use stepstream::engine::{Engine, EngineConfig};
use stepstream::models::{embedded, hub};
use stepstream::proto;
use stepstream::server::{self, Limits, ServerConfig};
use tokio_stream::StreamExt;

/// Stable Diffusion over gRPC, steerable at every denoising step.
#[derive(Parser, Debug)]
#[command(name = "stepstream", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gRPC server.
    Serve(ServeArgs),
    /// Generate one image through a running server (a client with a progress bar).
    Generate(GenerateArgs),
    /// Run a replay record (`generate --save-replay`) again on a server: the same image, bit
    /// for bit, on the same device and dtype.
    Replay(ReplayArgs),
    /// The performance report: component timings and peak memory, what each callback mode adds
    /// (G2) and one callback round trip against a raw TCP echo (G3), through an in-process
    /// server on loopback driven by a real gRPC client (Markdown tables, then one JSON line).
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Model to load (default: the embedded tiny model).
    #[arg(long, env = "STEPSTREAM_MODEL")]
    model: Option<String>,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, env = "STEPSTREAM_DEVICE", default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, env = "STEPSTREAM_DTYPE", default_value = "f32")]
    dtype: String,
    /// Timed runs per measurement (after warm-up).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Denoising steps of the G2 and whole-generation runs (G3: --g3-steps).
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// Image side in pixels for G2 and the components (0: the model's native size); G3 has
    /// its own (--g3-size).
    #[arg(long, default_value_t = 0)]
    size: u32,
    /// Denoising steps per G3 generation (each step is one round-trip sample).
    #[arg(long, default_value_t = stepstream::bench::G3_STEPS)]
    g3_steps: u32,
    /// Image side of the G3 generations; 512 gives the SD-family 1x4x64x64 latents the goal
    /// is stated for.
    #[arg(long, default_value_t = stepstream::bench::G3_SIZE)]
    g3_size: u32,
    /// Use a real-sized architecture with zero weights instead of --model (`sd15`).
    #[arg(long)]
    random_weights: Option<String>,
    /// Only the components and peak memory (the same as `--skip-g2 --skip-g3
    /// --skip-concurrency`).
    #[arg(long)]
    components: bool,
    /// Kernel implementations to time the components under: fused, reference or both (in the
    /// same run, for a same-run ratio).
    #[arg(long, default_value = "both")]
    kernels: stepstream::bench::KernelChoice,
    /// Skip the component timings and peak memory.
    #[arg(long)]
    skip_components: bool,
    /// Skip G2 (the callback modes' overhead in the denoising loop).
    #[arg(long)]
    skip_g2: bool,
    /// Skip G3 (one callback round trip against a raw TCP echo).
    #[arg(long)]
    skip_g3: bool,
    /// Skip the concurrency section (sessions sharing the device).
    #[arg(long)]
    skip_concurrency: bool,
    /// Session counts of the concurrency section, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    sessions: Vec<usize>,
    /// Thinking clients of the think-time scenario.
    #[arg(long, default_value_t = 3)]
    thinkers: usize,
    /// Each thinker's think time before every reply, in milliseconds.
    #[arg(long, default_value_t = 100)]
    think_ms: u64,
    /// Rounds of each concurrency measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    concurrency_rounds: usize,
    /// The in-process server's live sessions (default: as `serve`); 1 schedules one
    /// generation at a time, as before sessions shared the device.
    #[arg(long)]
    max_sessions: Option<usize>,
    /// The in-process server's rows per UNet call (default: as `serve`).
    #[arg(long)]
    max_batch: Option<usize>,
    /// The in-process server's gather window, % of a tick's step time (as `serve`).
    #[arg(long, default_value_t = 10)]
    batch_window_pct: u32,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Model to serve: a diffusers folder, a single-file `.safetensors` checkpoint (SD 1.x, 2.x,
    /// XL base in the original layout; served under its file stem) or a hub id
    /// `org/name[@revision]`; repeat for more (the first is the default). Default: the embedded
    /// tiny model (random weights: noise images).
    #[arg(long = "model", env = "STEPSTREAM_MODEL", value_delimiter = ',')]
    models: Vec<String>,
    /// For single-file checkpoints: a diffusers folder of the same architecture whose configs
    /// and tokenizers to use (its weights are not read). Without it they are inferred from the
    /// weights, as diffusers' `from_single_file` does.
    #[arg(long, env = "STEPSTREAM_MODEL_CONFIG")]
    model_config: Option<PathBuf>,
    /// For single-file checkpoints: the scheduler's prediction type, which weights cannot tell
    /// (SD 2.x defaults to v_prediction, as diffusers; 512-base models need epsilon).
    #[arg(long, env = "STEPSTREAM_PREDICTION_TYPE", value_parser = ["epsilon", "v_prediction", "sample"])]
    prediction_type: Option<String>,
    /// For diffusers folders and hub ids: the weight variant to load, e.g. `fp16`
    /// (`*.fp16.safetensors`, falling back to the plain file where a component has none).
    /// Unset: the smallest files that fit --dtype (the `fp16` ones for f16/bf16).
    #[arg(long, env = "STEPSTREAM_VARIANT")]
    variant: Option<String>,
    /// A LoRA to load at start, `[MODEL:]NAME=PATH` (a kohya/A1111 or diffusers/PEFT
    /// `.safetensors`); requests name it in `loras`. MODEL defaults to the first --model.
    /// Repeat for more.
    #[arg(long = "lora", env = "STEPSTREAM_LORA", value_delimiter = ',')]
    loras: Vec<String>,
    /// A TAESD / TAESDXL folder (a diffusers `AutoencoderTiny`) for step previews,
    /// `[MODEL=]DIR`; MODEL defaults to the first --model. Requests ask for it with
    /// `callback.preview.decoder = TAESD`. Repeat for more models.
    #[arg(
        long = "preview-decoder",
        env = "STEPSTREAM_PREVIEW_DECODER",
        value_delimiter = ','
    )]
    preview_decoders: Vec<String>,
    /// Address to listen on.
    #[arg(long, env = "STEPSTREAM_ADDR", default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// Device: `cpu` or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, env = "STEPSTREAM_DEVICE", default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, f16 or bf16 (f16/bf16 are for GPUs).
    #[arg(long, env = "STEPSTREAM_DTYPE", default_value = "f32")]
    dtype: String,
    /// Fast paths: `fused` (GPU: fused CUDA kernels, checked against the f32 reference at start;
    /// CPU f32: Winograd/direct 3×3 convolutions, one-pass GroupNorm, copy-free attention) or
    /// `reference` (plain candle ops).
    #[arg(long, env = "STEPSTREAM_KERNELS", default_value = "fused")]
    kernels: stepstream::kernels::KernelMode,
    /// Reply deadline in milliseconds when a request sets none.
    #[arg(long, env = "STEPSTREAM_REPLY_TIMEOUT_MS", default_value_t = 30_000)]
    reply_timeout_ms: u64,
    /// Generations that may queue while --max-sessions are live; more are refused
    /// (RESOURCE_EXHAUSTED).
    #[arg(long, env = "STEPSTREAM_MAX_QUEUE", default_value_t = 16)]
    max_queue: usize,
    /// Sessions live on the device at once, stepping or waiting for their clients
    /// [default: 64 on every device].
    #[arg(long, env = "STEPSTREAM_MAX_SESSIONS")]
    max_sessions: Option<usize>,
    /// Rows in one UNet call (a session's images, doubled under CFG) [default: 16 on the CPU
    /// and for f32 on a GPU, 32 for f16/bf16 on a GPU].
    #[arg(long, env = "STEPSTREAM_MAX_BATCH")]
    max_batch: Option<usize>,
    /// How long a tick may wait for replies it has just asked for, in % of the last tick's
    /// step time (at most 50 ms), so sessions that answer at once stay in one batch; 0: never.
    #[arg(long, env = "STEPSTREAM_BATCH_WINDOW_PCT", default_value_t = 10)]
    batch_window_pct: u32,
    /// The longest reply deadline a request may ask for, in milliseconds.
    #[arg(
        long,
        env = "STEPSTREAM_MAX_REPLY_TIMEOUT_MS",
        default_value_t = 600_000
    )]
    max_reply_timeout_ms: u64,
    /// Most denoising steps per request.
    #[arg(long, env = "STEPSTREAM_MAX_STEPS", default_value_t = 1000)]
    max_steps: u32,
    /// Largest width or height in pixels.
    #[arg(long, env = "STEPSTREAM_MAX_SIDE", default_value_t = 2048)]
    max_side: u32,
    /// Largest width × height in pixels.
    #[arg(long, env = "STEPSTREAM_MAX_PIXELS", default_value_t = 2048 * 2048)]
    max_pixels: u64,
    /// Most images per request.
    #[arg(long, env = "STEPSTREAM_MAX_IMAGES", default_value_t = 16)]
    max_images: u32,
    /// Longest prompt (and negative prompt) in bytes.
    #[arg(long, env = "STEPSTREAM_MAX_PROMPT_BYTES", default_value_t = 16 * 1024)]
    max_prompt_bytes: usize,
    /// Largest tensor a client may send (request latents/embeddings, reply tensors), in bytes.
    #[arg(long, env = "STEPSTREAM_MAX_TENSOR_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_tensor_bytes: usize,
    /// Largest gRPC message received or sent, in bytes (SDXL f32 embeddings at 16 images need ~16 MiB).
    #[arg(long, env = "STEPSTREAM_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024 * 1024)]
    max_message_bytes: usize,
    /// HTTP/2 streams per connection.
    #[arg(long, env = "STEPSTREAM_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval in seconds (0: off).
    #[arg(long, env = "STEPSTREAM_HTTP2_KEEPALIVE_SECS", default_value_t = 30)]
    http2_keepalive_secs: u64,
    /// TCP keepalive in seconds (0: off).
    #[arg(long, env = "STEPSTREAM_TCP_KEEPALIVE_SECS", default_value_t = 60)]
    tcp_keepalive_secs: u64,
    /// File of accepted bearer tokens, one per line; when set, every Diffusion RPC needs
    /// `authorization: Bearer <token>` (health stays open).
    #[arg(long, env = "STEPSTREAM_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Do not serve gRPC reflection.
    #[arg(long, env = "STEPSTREAM_NO_REFLECTION")]
    no_reflection: bool,
    /// TLS certificate chain (PEM); with --tls-key, serve TLS.
    #[arg(long, env = "STEPSTREAM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "STEPSTREAM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) whose client certificates are required (mutual TLS).
    #[arg(long, env = "STEPSTREAM_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Longest a TLS handshake may take, in milliseconds.
    #[arg(
        long,
        env = "STEPSTREAM_TLS_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    tls_handshake_timeout_ms: u64,
    /// On SIGINT/SIGTERM, health turns NOT_SERVING at once and new streams are still served
    /// for this long, in milliseconds, so balancers notice first (keep it at least two of
    /// their health-check intervals); then new streams are refused with UNAVAILABLE.
    #[arg(long, env = "STEPSTREAM_DRAIN_GRACE_MS", default_value_t = 5_000)]
    drain_grace_ms: u64,
    /// After the grace, how long admitted generations (queued ones included) may finish before
    /// they end with UNAVAILABLE, in milliseconds.
    #[arg(long, env = "STEPSTREAM_DRAIN_TIMEOUT_MS", default_value_t = 30_000)]
    drain_timeout_ms: u64,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9090).
    #[arg(long, env = "STEPSTREAM_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Log prompts at info level (off: prompts are never logged above debug).
    #[arg(long, env = "STEPSTREAM_LOG_PROMPTS")]
    log_prompts: bool,
}

/// How a client command reaches the server.
#[derive(clap::Args, Debug)]
struct ConnectArgs {
    /// Server address: `host:port` or `http://host:port` (plain), `https://host:port` (TLS).
    #[arg(long, env = "STEPSTREAM_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// Bearer token sent as `authorization` metadata.
    #[arg(long, env = "STEPSTREAM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Speak TLS, checking the server against the public roots (or --tls-ca).
    #[arg(long, env = "STEPSTREAM_CLIENT_TLS")]
    tls: bool,
    /// PEM root certificates to check the server against (implies --tls).
    #[arg(long, env = "STEPSTREAM_CLIENT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for a server that asks for one (implies --tls).
    #[arg(long, env = "STEPSTREAM_CLIENT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "STEPSTREAM_CLIENT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry, when not the address's host.
    #[arg(long, env = "STEPSTREAM_CLIENT_TLS_DOMAIN")]
    tls_domain: Option<String>,
    /// Retries of a generation the server refuses before admitting it (a draining replica, a
    /// full queue), honouring the server's pushback; 0: never retry. A failure after steps have
    /// run is never retried.
    #[arg(long, env = "STEPSTREAM_RETRIES", default_value_t = 4)]
    retries: u32,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Model id (empty: the server's default).
    #[arg(long, env = "STEPSTREAM_GENERATE_MODEL", default_value = "")]
    model: String,
    /// The prompt.
    #[arg(long, env = "STEPSTREAM_PROMPT")]
    prompt: String,
    /// The negative prompt (unset: none).
    #[arg(long, env = "STEPSTREAM_NEGATIVE_PROMPT")]
    negative_prompt: Option<String>,
    /// Denoising steps (0: the model's default).
    #[arg(long, env = "STEPSTREAM_STEPS", default_value_t = 0)]
    steps: u32,
    /// Guidance scale (unset: the model's default).
    #[arg(long, env = "STEPSTREAM_GUIDANCE")]
    guidance: Option<f32>,
    /// Seed (unset: random, printed).
    #[arg(long, env = "STEPSTREAM_SEED")]
    seed: Option<u64>,
    /// Scheduler name (empty: the model's own).
    #[arg(long, env = "STEPSTREAM_SCHEDULER", default_value = "")]
    scheduler: String,
    /// Turn classifier-free guidance off after this fraction of the steps (e.g. 0.4): the client
    /// watches every step and, at step int(num_timesteps * RATIO) (from the run's timesteps, the
    /// only step that waits for it), sends guidance 0 and the conditional half of prompt_embeds.
    #[arg(long, env = "STEPSTREAM_CFG_CUTOFF", conflicts_with = "observe")]
    cfg_cutoff: Option<f64>,
    /// Watch every step (progress bar with each step's time) without ever making the server
    /// wait. Without this or --cfg-cutoff the image comes from one GenerateOnce call.
    #[arg(long, env = "STEPSTREAM_OBSERVE")]
    observe: bool,
    /// One guidance scale per timestep, comma-separated, applied by the server (replaces
    /// --guidance).
    #[arg(
        long,
        env = "STEPSTREAM_GUIDANCE_SCHEDULE",
        value_delimiter = ',',
        conflicts_with = "cfg_cutoff"
    )]
    guidance_schedule: Vec<f32>,
    /// A LoRA the server serves for the model: `NAME` (scale 1), `NAME=SCALE`, or
    /// `NAME=S0:S1:...` (one scale per step); repeatable.
    #[arg(long = "lora", env = "STEPSTREAM_GENERATE_LORA")]
    loras: Vec<String>,
    /// Output PNG file (with several images: NAME-1.png, NAME-2.png, ...).
    #[arg(long, env = "STEPSTREAM_OUT", default_value = "out.png")]
    out: PathBuf,
    /// Also save the run's replay record here (its protobuf bytes), for `stepstream replay`.
    #[arg(long, env = "STEPSTREAM_SAVE_REPLAY")]
    save_replay: Option<PathBuf>,
    /// Write step previews into this folder, as `step-III-item-K.png` (or `.jpg`); the run is
    /// then observed step by step (previews never make the server wait).
    #[arg(long, env = "STEPSTREAM_PREVIEW_DIR")]
    preview_dir: Option<PathBuf>,
    /// With --preview-dir: a preview every N-th step.
    #[arg(
        long,
        env = "STEPSTREAM_PREVIEW_EVERY",
        default_value_t = 1,
        requires = "preview_dir"
    )]
    preview_every: u32,
    /// With --preview-dir: what the previews show.
    #[arg(long, env = "STEPSTREAM_PREVIEW_SOURCE", value_enum, default_value_t = PreviewSourceArg::X0, requires = "preview_dir")]
    preview_source: PreviewSourceArg,
    /// With --preview-dir: the decoder (`taesd` where the server lists it for the model).
    #[arg(long, env = "STEPSTREAM_PREVIEW_DECODER", value_enum, default_value_t = PreviewDecoderArg::Linear, requires = "preview_dir")]
    preview_decoder: PreviewDecoderArg,
    /// With --preview-dir: the previews' largest side in pixels (0: the decoder's own size).
    #[arg(
        long,
        env = "STEPSTREAM_PREVIEW_MAX_SIDE",
        default_value_t = 0,
        requires = "preview_dir"
    )]
    preview_max_side: u32,
    /// With --preview-dir: JPEG instead of PNG.
    #[arg(long, env = "STEPSTREAM_PREVIEW_JPEG", requires = "preview_dir")]
    preview_jpeg: bool,
}

#[derive(clap::Args, Debug)]
struct ReplayArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// The record (`generate --save-replay FILE`, or a client's saved `Completed.replay`).
    file: PathBuf,
    /// Output PNG file (with several images: NAME-1.png, NAME-2.png, ...).
    #[arg(long, env = "STEPSTREAM_OUT", default_value = "out.png")]
    out: PathBuf,
}

/// `--preview-source`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PreviewSourceArg {
    /// The sampler's x0 estimate at each step.
    X0,
    /// The latents after each step.
    Latents,
}

/// `--preview-decoder`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PreviewDecoderArg {
    /// The per-family linear map (one pixel per latent).
    Linear,
    /// The server's TAESD (`serve --preview-decoder`).
    Taesd,
}

impl GenerateArgs {
    /// The preview subscription `--preview-*` ask for.
    fn preview(&self) -> Option<proto::PreviewOptions> {
        self.preview_dir.as_ref()?;
        Some(proto::PreviewOptions {
            source: match self.preview_source {
                PreviewSourceArg::X0 => proto::PreviewSource::X0,
                PreviewSourceArg::Latents => proto::PreviewSource::Latents,
            } as i32,
            max_side: self.preview_max_side,
            format: if self.preview_jpeg {
                proto::PreviewFormat::Jpeg
            } else {
                proto::PreviewFormat::Png
            } as i32,
            every: self.preview_every,
            decoder: match self.preview_decoder {
                PreviewDecoderArg::Linear => proto::PreviewDecoder::Linear,
                PreviewDecoderArg::Taesd => proto::PreviewDecoder::Taesd,
            } as i32,
            ..Default::default()
        })
    }
}

/// Writes a step's previews into `dir` (when --preview-dir is set).
fn save_previews(dir: Option<&Path>, s: &client::StepState) -> Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    for p in &s.previews {
        let Some(image) = &p.image else { continue };
        let ext = if image.mime_type == "image/jpeg" {
            "jpg"
        } else {
            "png"
        };
        let path = dir.join(format!("step-{:03}-item-{}.{ext}", s.step_index, p.item));
        std::fs::write(&path, &image.data)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = s
        .strip_prefix("cuda:")
        .or(if s == "cuda" { Some("0") } else { None })
    {
        let ordinal: usize = n.parse().with_context(|| format!("bad device `{s}`"))?;
        let device = Device::new_cuda(ordinal).with_context(|| {
            format!("cannot open `{s}` (is this a build with `--features cuda`?)")
        })?;
        stepstream::devmem::prepare(&device);
        return Ok(device);
    }
    bail!("unknown device `{s}`: use cpu or cuda:N")
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => bail!("unknown dtype `{s}`: use f32, f16 or bf16"),
    })
}

/// Reads one `--lora [MODEL:]NAME=PATH`.
fn read_lora(
    spec: &str,
    default_model: &str,
) -> Result<(String, std::sync::Arc<stepstream::models::lora::LoraFile>)> {
    let Some((left, path)) = spec.split_once('=') else {
        bail!("expected [MODEL:]NAME=PATH");
    };
    let (model, name) = match left.split_once(':') {
        Some((m, n)) => (m.to_string(), n),
        None => (default_model.to_string(), left),
    };
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("LoRA name `{name}`: use letters, digits, `-`, `_` and `.`");
    }
    let file = stepstream::models::lora::LoraFile::read(name, std::path::Path::new(path))?;
    Ok((model, std::sync::Arc::new(file)))
}

async fn serve(args: ServeArgs) -> Result<()> {
    stepstream::kernels::set_mode(args.kernels);
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let models = if args.models.is_empty() {
        tracing::info!("no --model given: serving the embedded tiny model (random weights, its images are noise)");
        vec![(embedded::EMBEDDED_MODEL_ID.to_string(), embedded::source())]
    } else {
        let options = hub::ResolveOptions {
            checkpoint: stepstream::models::checkpoint::CheckpointOptions {
                config_dir: args.model_config.clone(),
                prediction_type: args.prediction_type.clone(),
            },
            variant: args.variant.clone(),
            half: matches!(dtype, DType::F16 | DType::BF16),
        };
        let resolved = args
            .models
            .iter()
            .map(|m| hub::resolve_with(m, &options).with_context(|| format!("--model {m}")))
            .collect::<Result<Vec<_>>>()?;
        let any_checkpoint = resolved
            .iter()
            .any(|(_, s)| matches!(s, stepstream::models::ModelSource::Checkpoint(_)));
        if !any_checkpoint
            && (options.checkpoint.config_dir.is_some()
                || options.checkpoint.prediction_type.is_some())
        {
            bail!(
                "--model-config and --prediction-type apply to single-file checkpoints, and no \
                 --model is one (a diffusers folder or hub id carries its own configs)"
            );
        }
        for (id, source) in &resolved {
            if let stepstream::models::ModelSource::Checkpoint(c) = source {
                tracing::info!(model = %id, file = %c.path().display(), family = c.family().as_str(), configs = c.config_origin(), "single-file checkpoint");
            }
        }
        resolved
    };
    let loras = args
        .loras
        .iter()
        .map(|spec| read_lora(spec, &models[0].0).with_context(|| format!("--lora {spec}")))
        .collect::<Result<Vec<_>>>()?;
    let preview_decoders = args
        .preview_decoders
        .iter()
        .map(|spec| match spec.split_once('=') {
            Some((model, dir)) => (model.to_string(), PathBuf::from(dir)),
            None => (models[0].0.clone(), PathBuf::from(spec)),
        })
        .collect();
    let limits = Limits {
        max_steps: args.max_steps,
        max_side: args.max_side,
        max_pixels: args.max_pixels,
        max_images: args.max_images,
        max_prompt_bytes: args.max_prompt_bytes,
        max_tensor_bytes: args.max_tensor_bytes,
        default_reply_timeout: Duration::from_millis(args.reply_timeout_ms),
        max_reply_timeout: Duration::from_millis(args.max_reply_timeout_ms),
    };
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(server::TlsFiles {
            cert: read(cert)?,
            key: read(key)?,
            client_ca: args.tls_client_ca.as_ref().map(read).transpose()?,
            handshake_timeout: Duration::from_millis(args.tls_handshake_timeout_ms),
        }),
        _ => None,
    };
    let tokens = args
        .auth_token_file
        .as_ref()
        .map(|p| server::Tokens::from_file(p).map_err(anyhow::Error::msg))
        .transpose()?;
    let server_config = ServerConfig {
        limits: limits.clone(),
        max_message_bytes: args.max_message_bytes,
        max_concurrent_streams: Some(args.max_concurrent_streams),
        http2_keepalive: secs(args.http2_keepalive_secs),
        tcp_keepalive: secs(args.tcp_keepalive_secs),
        tokens,
        tls,
        reflection: !args.no_reflection,
        drain_grace: Duration::from_millis(args.drain_grace_ms),
        drain_timeout: Duration::from_millis(args.drain_timeout_ms),
        log_prompts: args.log_prompts,
    };
    let (default_sessions, default_batch) = EngineConfig::default_capacity(&device, dtype);
    let engine = Engine::start(EngineConfig {
        device,
        dtype,
        models,
        max_queue: args.max_queue,
        max_sessions: args.max_sessions.unwrap_or(default_sessions).max(1),
        max_batch: args.max_batch.unwrap_or(default_batch).max(1),
        batch_window_pct: args.batch_window_pct,
        default_reply_timeout: limits.default_reply_timeout,
        max_tensor_bytes: limits.max_tensor_bytes,
        loras,
        preview_decoders,
    })
    .await
    .context("loading models")?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let local = listener.local_addr()?;
    // One plain line on stdout so scripts (and tests) can find the port when --addr ends in :0.
    println!("stepstream listening on {local}");
    tracing::info!(addr = %local, models = ?engine.models().iter().map(|m| &m.id).collect::<Vec<_>>(), "serving");
    if let Some(addr) = args.metrics_addr {
        let metrics_listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --metrics-addr {addr}"))?;
        tracing::info!(addr = %addr, "metrics at /metrics");
        tokio::spawn(stepstream::metrics::serve(
            engine.metrics().clone(),
            metrics_listener,
        ));
    }
    server::serve(engine, server_config, listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

async fn bench(args: BenchArgs) -> Result<()> {
    let sections = stepstream::bench::Sections {
        components: !args.skip_components,
        g2: !args.skip_g2 && !args.components,
        g3: !args.skip_g3 && !args.components,
        concurrency: !args.skip_concurrency && !args.components,
    };
    if !(sections.components || sections.g2 || sections.g3 || sections.concurrency) {
        bail!("every section is skipped: nothing to measure");
    }
    let (model_id, source) = match (&args.random_weights, &args.model) {
        (Some(arch), _) => (
            format!("random-{arch}"),
            stepstream::models::synthetic::source(arch)?,
        ),
        (None, Some(m)) => hub::resolve(m).with_context(|| format!("--model {m}"))?,
        (None, None) => (embedded::EMBEDDED_MODEL_ID.to_string(), embedded::source()),
    };
    let plan = stepstream::bench::BenchPlan {
        model_id,
        source,
        device: parse_device(&args.device)?,
        device_name: args.device.clone(),
        dtype: parse_dtype(&args.dtype)?,
        dtype_name: args.dtype.clone(),
        opts: stepstream::bench::BenchOptions {
            runs: args.runs,
            steps: args.steps,
            size: args.size,
            g3_steps: args.g3_steps,
            g3_size: args.g3_size,
            sessions: args.sessions.clone(),
            thinkers: args.thinkers,
            think_ms: args.think_ms,
            concurrency_rounds: args.concurrency_rounds,
            max_sessions: args.max_sessions,
            max_batch: args.max_batch,
            batch_window_pct: args.batch_window_pct,
        },
        kernels: args.kernels,
        sections,
    };
    let report = stepstream::bench::run(plan, |section| print!("{section}")).await?;
    println!("{}", report.json());
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The progress bar of `generate`: one tick per step, with the server's step time.
#[derive(Default)]
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn step(&mut self, s: &client::StepState) {
        let bar = self.0.get_or_insert_with(|| {
            let a = &s.accepted;
            eprintln!(
                "accepted {} on {} ({}x{}, {} steps, {}, seed {})",
                a.request_id,
                a.model,
                a.width,
                a.height,
                a.timesteps.len(),
                a.scheduler,
                a.seed
            );
            let bar = indicatif::ProgressBar::new(s.num_timesteps as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} steps [{elapsed_precise}] {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        bar.set_position(s.step_index as u64 + 1);
        bar.set_message(format!(
            "t={} cfg={} {:.1} ms/step",
            s.timestep, s.do_classifier_free_guidance, s.step_ms
        ));
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish();
        }
    }
}

/// The connection options `generate`'s TLS flags ask for.
fn connect_options(args: &ConnectArgs) -> Result<client::ConnectOptions> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let wants_tls =
        args.tls || args.tls_ca.is_some() || args.tls_cert.is_some() || args.tls_domain.is_some();
    let tls = if wants_tls {
        let mut tls = match &args.tls_ca {
            Some(p) => client::TlsOptions::ca_pem(read(p)?),
            None => client::TlsOptions::public_roots(),
        };
        if let (Some(c), Some(k)) = (&args.tls_cert, &args.tls_key) {
            tls = tls.identity(read(c)?, read(k)?);
        }
        if let Some(d) = &args.tls_domain {
            tls = tls.domain(d);
        }
        Some(tls)
    } else {
        None
    };
    Ok(client::ConnectOptions {
        tls,
        connect_timeout: Some(Duration::from_secs(10)),
    })
}

/// A client for `generate` and `replay`: TLS, token and retries as the flags say.
async fn connect(args: &ConnectArgs) -> Result<Client> {
    let mut client = Client::connect_with(&args.addr, connect_options(args)?)
        .await?
        .retry(client::RetryPolicy::retries(args.retries))?;
    if let Some(t) = &args.token {
        client = client.with_token(t)?;
    }
    Ok(client)
}

/// One `generate --lora`: `NAME`, `NAME=SCALE` or `NAME=S0:S1:...` (one scale per step).
fn lora_request(spec: &str) -> Result<proto::LoraRequest> {
    let (name, value) = spec.split_once('=').unwrap_or((spec, ""));
    if name.is_empty() {
        bail!("expected NAME, NAME=SCALE or NAME=S0:S1:...");
    }
    let parse = |v: &str| -> Result<f32> {
        v.trim()
            .parse::<f32>()
            .with_context(|| format!("`{v}` is not a number"))
    };
    let mut req = proto::LoraRequest {
        name: name.to_string(),
        ..Default::default()
    };
    if value.contains(':') {
        req.schedule = value.split(':').map(parse).collect::<Result<_>>()?;
    } else if !value.is_empty() {
        req.scale = Some(parse(value)?);
    }
    Ok(req)
}

async fn generate(args: GenerateArgs) -> Result<()> {
    let mut client = connect(&args.conn).await?;
    let preview = args.preview();
    let request = proto::GenerateRequest {
        model: args.model,
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance,
        seed: args.seed,
        scheduler: args.scheduler,
        loras: args
            .loras
            .iter()
            .map(|l| lora_request(l).with_context(|| format!("--lora {l}")))
            .collect::<Result<Vec<_>>>()?,
        guidance_plan: (!args.guidance_schedule.is_empty()).then(|| proto::GuidancePlan {
            schedule: args.guidance_schedule.clone(),
            ..Default::default()
        }),
        output: Some(proto::OutputOptions {
            return_replay: args.save_replay.is_some(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let preview_dir = args.preview_dir.as_deref();
    if let Some(dir) = preview_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut bar = Bar::default();
    let done = if let Some(ratio) = args.cfg_cutoff {
        let cutoff = CfgCutoff::ratio(ratio);
        // The model's CFG-batched tensors (SDXL has three) decide what the cutoff must halve.
        let models = client.list_models().await?;
        let id = if request.model.is_empty() {
            models.default_model.clone()
        } else {
            request.model.clone()
        };
        let model = models
            .models
            .iter()
            .find(|m| m.id == id)
            .with_context(|| format!("the server has no model `{id}`"))?;
        let mut callback = cutoff.subscription_for_model(model);
        callback.preview = preview;
        let request = proto::GenerateRequest {
            callback: Some(callback),
            ..request
        };
        // Every step is observed, so that the progress bar is exact; only the cutoff step,
        // computed from the run's timesteps, waits for this client.
        let select = |a: &proto::Accepted| proto::StepSelection {
            reply_step_indices: cutoff.selection(a).step_indices,
            ..Default::default()
        };
        let done = client
            .generate_with_steps(request, select, |s| -> Result<_, client::BoxError> {
                bar.step(s);
                save_previews(preview_dir, s)?;
                Ok(cutoff.apply(s)?)
            })
            .await;
        bar.finish();
        done?
    } else if args.observe || preview.is_some() {
        let request = proto::GenerateRequest {
            callback: preview.map(|p| proto::CallbackOptions {
                preview: Some(p),
                ..Default::default()
            }),
            ..request
        };
        let mut events = client.observe(request).await?;
        let mut done = None;
        while let Some(ev) = events.next().await {
            match ev? {
                Event::Step(s) => {
                    bar.step(&s);
                    save_previews(preview_dir, &s)?;
                }
                Event::Completed(c) => done = Some(c),
                Event::Accepted(_) => {}
            }
        }
        bar.finish();
        done.context("the server sent no result")?
    } else {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_message("generating (GenerateOnce)");
        spinner.enable_steady_tick(Duration::from_millis(100));
        let done = client.generate_once(request).await;
        spinner.finish_and_clear();
        done?
    };
    if let Some(path) = &args.save_replay {
        let record = done
            .replay
            .as_ref()
            .context("the server sent no replay record (is it older than this client?)")?;
        std::fs::write(path, prost::Message::encode_to_vec(record))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} ({} edits)", path.display(), record.edits.len());
    }
    report(&done, &args.out)
}

/// Runs a saved replay record with GenerateOnce and writes its images.
async fn replay(args: ReplayArgs) -> Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let record = <proto::ReplayRecord as prost::Message>::decode(bytes.as_slice())
        .with_context(|| format!("{} is not a replay record", args.file.display()))?;
    eprintln!(
        "replaying {} edits recorded on {} ({})",
        record.edits.len(),
        record.device,
        record.dtype
    );
    let mut client = connect(&args.conn).await?;
    let done = client.replay(record, None).await?;
    report(&done, &args.out)
}

/// Writes a generation's images to `out` (NAME-1.png, ... for several) and prints its seed and
/// timings.
fn report(done: &proto::Completed, out: &Path) -> Result<()> {
    let n = done.images.len();
    for (i, img) in done.images.iter().enumerate() {
        let path = if n == 1 {
            out.to_path_buf()
        } else {
            let stem = out.file_stem().unwrap_or_default().to_string_lossy();
            out.with_file_name(format!("{stem}-{}.png", i + 1))
        };
        std::fs::write(&path, &img.data).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} ({}x{})", path.display(), img.width, img.height);
    }
    let t = done.timings.unwrap_or_default();
    eprintln!(
        "seed {}{}; encode {:.1} ms, denoise {:.1} ms (callback wait {:.1} ms), decode {:.1} ms",
        done.seed,
        if done.interrupted {
            " (interrupted)"
        } else {
            ""
        },
        t.encode_ms,
        t.denoise_ms,
        t.callback_wait_ms,
        t.decode_ms
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(a) => serve(a).await,
        Command::Generate(a) => generate(a).await,
        Command::Replay(a) => replay(a).await,
        Command::Bench(a) => bench(a).await,
    }
}
