//! `stepstream bench`: what a remote callback costs. Runs the server in-process on a chosen model
//! and device, drives it through a real gRPC client on loopback, and reports, per callback mode,
//! the client's wall time and the server's own timings (medians over the runs).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::engine::{Engine, EngineConfig};
use crate::proto::diffusion_client::DiffusionClient;
use crate::proto::{self, client_message, server_message::Kind};
use crate::server::{self, ServerConfig};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Timed runs per mode (after one warm-up run each).
    pub runs: usize,
    /// Denoising steps per generation.
    pub steps: u32,
    /// Image side in pixels (0: the model's native size).
    pub size: u32,
}

/// One measured mode.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// The callback mode.
    pub mode: &'static str,
    /// Median client wall time of a whole generation, ms.
    pub wall_ms: f64,
    /// Median server denoise time, ms (callback waits included).
    pub denoise_ms: f64,
    /// Median server time waiting for replies, ms.
    pub callback_wait_ms: f64,
}

/// Errors of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The server answered with an error.
    #[error("server: {0}")]
    Status(#[from] tonic::Status),
    /// Setting up the in-process server or client failed.
    #[error("setup: {0}")]
    Setup(String),
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One generation; returns (client wall time, server denoise ms, server callback wait ms).
async fn run_once(
    client: &mut DiffusionClient<Channel>,
    request: proto::GenerateRequest,
    echo: &[&str],
) -> Result<(Duration, f64, f64), BenchError> {
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel(4);
    let send = |msg| {
        let tx = tx.clone();
        async move {
            tx.send(msg)
                .await
                .map_err(|_| BenchError::Setup("request stream closed".into()))
        }
    };
    send(proto::ClientMessage {
        kind: Some(client_message::Kind::Start(request)),
    })
    .await?;
    let mut inbound = client.generate(ReceiverStream::new(rx)).await?.into_inner();
    while let Some(msg) = inbound.message().await? {
        match msg.kind {
            Some(Kind::StepEnd(s)) if s.reply_required => {
                let tensors: HashMap<String, proto::Tensor> = echo
                    .iter()
                    .filter_map(|n| s.tensors.get(*n).map(|t| (n.to_string(), t.clone())))
                    .collect();
                send(proto::ClientMessage {
                    kind: Some(client_message::Kind::Reply(proto::StepReply {
                        step_index: s.step_index,
                        tensors,
                        ..Default::default()
                    })),
                })
                .await?;
            }
            Some(Kind::Completed(c)) => {
                let t = c.timings.unwrap_or_default();
                return Ok((t0.elapsed(), t.denoise_ms, t.callback_wait_ms));
            }
            Some(Kind::ReplyRejected(r)) => {
                return Err(BenchError::Setup(format!("reply rejected: {r:?}")))
            }
            _ => {}
        }
    }
    Err(BenchError::Setup("stream ended without Completed".into()))
}

/// Starts `engine` behind a loopback server and measures each callback mode.
pub async fn callback_overhead(
    engine: Engine,
    opts: &BenchOptions,
) -> Result<Vec<BenchRow>, BenchError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let model = engine.models()[0].clone();
    tokio::spawn(server::serve(
        engine,
        ServerConfig::default(),
        listener,
        std::future::pending(),
    ));
    let mut client = DiffusionClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let size = if opts.size == 0 {
        model.default_width
    } else {
        opts.size
    };
    let every = |observe_only: bool, tensors: &[&str]| proto::CallbackOptions {
        observe_only,
        tensor_inputs: tensors.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let modes: Vec<(&'static str, Option<proto::CallbackOptions>, &[&str])> = vec![
        ("no callback", None, &[]),
        (
            "observe-only, every step, latents",
            Some(every(true, &["latents"])),
            &[],
        ),
        (
            "blocking, every step, no tensors",
            Some(every(false, &[])),
            &[],
        ),
        (
            "blocking, every step, latents echoed",
            Some(every(false, &["latents"])),
            &["latents"],
        ),
        (
            "blocking, every step, latents + prompt_embeds echoed",
            Some(every(false, &["latents", "prompt_embeds"])),
            &["latents", "prompt_embeds"],
        ),
    ];
    let mut rows = Vec::new();
    for (mode, callback, echo) in modes {
        let request = proto::GenerateRequest {
            prompt: "a photo of an astronaut riding a horse on mars".into(),
            num_inference_steps: opts.steps,
            width: Some(size),
            height: Some(size),
            seed: Some(1),
            callback,
            ..Default::default()
        };
        run_once(&mut client, request.clone(), echo).await?;
        let (mut wall, mut denoise, mut wait) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..opts.runs.max(1) {
            let (w, d, c) = run_once(&mut client, request.clone(), echo).await?;
            wall.push(w.as_secs_f64() * 1e3);
            denoise.push(d);
            wait.push(c);
        }
        rows.push(BenchRow {
            mode,
            wall_ms: median(wall),
            denoise_ms: median(denoise),
            callback_wait_ms: median(wait),
        });
    }
    Ok(rows)
}

/// Starts an engine from `config` and runs [`callback_overhead`].
pub async fn run(config: EngineConfig, opts: &BenchOptions) -> Result<Vec<BenchRow>, BenchError> {
    let engine = Engine::start(config)
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    callback_overhead(engine, opts).await
}

/// The rows as a Markdown table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| mode | client wall ms | server denoise ms | callback wait ms |\n|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.2} |\n",
            r.mode, r.wall_ms, r.denoise_ms, r.callback_wait_ms
        ));
    }
    out
}

/// The rows as one JSON line.
pub fn json_line(rows: &[BenchRow]) -> String {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "mode": r.mode,
                "wall_ms": r.wall_ms,
                "denoise_ms": r.denoise_ms,
                "callback_wait_ms": r.callback_wait_ms,
            })
        })
        .collect();
    serde_json::json!({ "callback_overhead": items }).to_string()
}

/// Median time of `f` over `runs` runs after `warmup` runs, synchronising `device` around each.
fn time_ms(
    device: &candle_core::Device,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<(), BenchError>,
) -> Result<f64, BenchError> {
    let sync = || {
        device
            .synchronize()
            .map_err(|e| BenchError::Setup(e.to_string()))
    };
    for _ in 0..warmup {
        f()?;
    }
    sync()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        f()?;
        sync()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// Component timings of a loaded model on its device (medians, ms): one UNet forward at batch 2
/// (CFG), one VAE decode, one text-encoder pass, and a whole `steps`-step generation with decode.
pub fn components(
    model: &crate::models::pipeline_model::StableDiffusionModel,
    size: usize,
    steps: usize,
    runs: usize,
) -> Result<Vec<(String, f64)>, BenchError> {
    use candle_core::Tensor;
    let err = |e: candle_core::Error| BenchError::Setup(e.to_string());
    let dev = &model.device;
    let vsf = model.vae_scale_factor();
    let (h, w) = (size / vsf, size / vsf);
    let c = model.unet_in_channels();
    let sample = Tensor::randn(0f32, 1.0, (2, c, h, w), dev)
        .and_then(|t| t.to_dtype(model.dtype))
        .map_err(err)?;
    let width = model.text_encoder_hidden_size();
    let embeds = Tensor::randn(0f32, 1.0, (2, 77, width), dev)
        .and_then(|t| t.to_dtype(model.dtype))
        .map_err(err)?;
    let mut rows = Vec::new();
    let unet = time_ms(dev, 3, runs, || {
        model
            .unet
            .forward(&sample, 500.0, &embeds, None)
            .map(|_| ())
            .map_err(|e| BenchError::Setup(e.to_string()))
    })?;
    rows.push((format!("UNet forward, batch 2, {size}x{size}"), unet));
    tracing::info!(ms = unet, "UNet forward timed");
    let vae_dtype = model.vae_dtype;
    let latents = Tensor::randn(0f32, 1.0, (1, c, h, w), dev)
        .and_then(|t| t.to_dtype(vae_dtype))
        .map_err(err)?;
    let vae = time_ms(dev, 2, runs, || {
        model
            .vae
            .decode(&latents)
            .map(|_| ())
            .map_err(|e| BenchError::Setup(e.to_string()))
    })?;
    rows.push((format!("VAE decode, 1x{c}x{h}x{w}"), vae));
    tracing::info!(ms = vae, "VAE decode timed");
    let ids = Tensor::from_vec(vec![0u32; 77], (1, 77), dev).map_err(err)?;
    let text = time_ms(dev, 3, runs, || {
        model
            .text_encoder
            .forward(&ids)
            .map(|_| ())
            .map_err(|e| BenchError::Setup(e.to_string()))
    })?;
    rows.push(("text encoder, batch 1".into(), text));
    let params = crate::pipeline::sd::GenerateParams {
        seed: 1,
        scheduler: "ddim".into(),
        ..crate::pipeline::sd::GenerateParams::text(
            "a photo of an astronaut riding a horse on mars",
            steps,
            size,
            size,
        )
    };
    let whole = time_ms(dev, 1, runs.div_ceil(5).max(2), || {
        crate::pipeline::sd::prepare(model, &params)
            .and_then(|p| p.run(&mut crate::pipeline::NoCallback))
            .map(|_| ())
            .map_err(|e| BenchError::Setup(e.to_string()))
    })?;
    rows.push((
        format!("whole generation, {steps} DDIM steps with CFG, decode + PNG"),
        whole,
    ));
    Ok(rows)
}
