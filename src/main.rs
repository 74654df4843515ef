//! The `stepstream` binary: `serve` runs the gRPC server, `generate` is a command-line client.

use std::net::SocketAddr;
use std::path::PathBuf;
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
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Model to serve: a diffusers folder or a hub id `org/name[@revision]`; repeat for more
    /// (the first is the default). Default: the embedded tiny model (random weights: noise images).
    #[arg(long = "model", env = "STEPSTREAM_MODEL", value_delimiter = ',')]
    models: Vec<String>,
    /// Address to listen on.
    #[arg(long, env = "STEPSTREAM_ADDR", default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// Device: `cpu` or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, env = "STEPSTREAM_DEVICE", default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, f16 or bf16 (f16/bf16 are for GPUs).
    #[arg(long, env = "STEPSTREAM_DTYPE", default_value = "f32")]
    dtype: String,
    /// Reply deadline in milliseconds when a request sets none.
    #[arg(long, env = "STEPSTREAM_REPLY_TIMEOUT_MS", default_value_t = 30_000)]
    reply_timeout_ms: u64,
    /// Generations that may wait behind the running one; more are refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "STEPSTREAM_MAX_QUEUE", default_value_t = 16)]
    max_queue: usize,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Server address (`host:port` or `http://host:port`).
    #[arg(long, env = "STEPSTREAM_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// Bearer token sent as `authorization` metadata.
    #[arg(long, env = "STEPSTREAM_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
    /// answers every step and, at step int(num_timesteps * RATIO), sends guidance 0 and the
    /// conditional half of prompt_embeds.
    #[arg(long, env = "STEPSTREAM_CFG_CUTOFF", conflicts_with = "observe")]
    cfg_cutoff: Option<f64>,
    /// Watch every step (progress bar with each step's time) without ever making the server
    /// wait. Without this or --cfg-cutoff the image comes from one GenerateOnce call.
    #[arg(long, env = "STEPSTREAM_OBSERVE")]
    observe: bool,
    /// Output PNG file (with several images: NAME-1.png, NAME-2.png, ...).
    #[arg(long, env = "STEPSTREAM_OUT", default_value = "out.png")]
    out: PathBuf,
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
        return Device::new_cuda(ordinal).with_context(|| {
            format!("cannot open `{s}` (is this a build with `--features cuda`?)")
        });
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

async fn serve(args: ServeArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let models = if args.models.is_empty() {
        tracing::info!("no --model given: serving the embedded tiny model (random weights, its images are noise)");
        vec![(embedded::EMBEDDED_MODEL_ID.to_string(), embedded::source())]
    } else {
        args.models
            .iter()
            .map(|m| hub::resolve(m).with_context(|| format!("--model {m}")))
            .collect::<Result<Vec<_>>>()?
    };
    let limits = Limits {
        default_reply_timeout: Duration::from_millis(args.reply_timeout_ms),
        ..Limits::default()
    };
    let engine = Engine::start(EngineConfig {
        device,
        dtype,
        models,
        max_queue: args.max_queue,
        default_reply_timeout: limits.default_reply_timeout,
        max_reply_timeout: limits.max_reply_timeout,
        max_tensor_bytes: limits.max_tensor_bytes,
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
    server::serve(
        engine,
        ServerConfig {
            limits,
            ..ServerConfig::default()
        },
        listener,
        shutdown_signal(),
    )
    .await?;
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

async fn generate(args: GenerateArgs) -> Result<()> {
    let mut client = Client::connect(&args.addr).await?;
    if let Some(t) = &args.token {
        client = client.with_token(t)?;
    }
    let request = proto::GenerateRequest {
        model: args.model,
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        num_inference_steps: args.steps,
        guidance_scale: args.guidance,
        seed: args.seed,
        scheduler: args.scheduler,
        ..Default::default()
    };
    let mut bar = Bar::default();
    let done = if let Some(ratio) = args.cfg_cutoff {
        let cutoff = CfgCutoff::ratio(ratio);
        let request = proto::GenerateRequest {
            // Every step, so that the progress bar is exact; only the cutoff step changes anything.
            callback: Some(cutoff.subscription()),
            ..request
        };
        let done = client
            .generate(request, |s| {
                bar.step(s);
                cutoff.apply(s)
            })
            .await;
        bar.finish();
        done?
    } else if args.observe {
        let mut events = client.observe(request).await?;
        let mut done = None;
        while let Some(ev) = events.next().await {
            match ev? {
                Event::Step(s) => bar.step(&s),
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
    let n = done.images.len();
    for (i, img) in done.images.iter().enumerate() {
        let path = if n == 1 {
            args.out.clone()
        } else {
            let stem = args.out.file_stem().unwrap_or_default().to_string_lossy();
            args.out.with_file_name(format!("{stem}-{}.png", i + 1))
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
    }
}
