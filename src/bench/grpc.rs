//! The gRPC sections: an in-process server on loopback driven by a real client, measuring what
//! each callback mode adds to the loop (G2) and what one callback round trip costs (G3).

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::echo::{tcp_echo_ms, ECHO_ROUND_TRIPS, ECHO_WARMUP};
use super::{median, BenchError, BenchOptions, PROMPT};
use crate::client;
use crate::engine::Engine;
use crate::proto::diffusion_client::DiffusionClient;
use crate::proto::{self, client_message, server_message::Kind};
use crate::server::{self, ServerConfig};

/// The default image side of the G3 generations: 512 pixels give SD-family latents of 1×4×64×64.
pub const G3_SIZE: u32 = 512;
/// The default steps per G3 generation: each is one round-trip sample, and on the CPU each costs
/// a UNet pass at 64×64 latents (seconds with the tiny model), so a few per run.
pub const G3_STEPS: u32 = 5;
/// G3's goal: a callback round trip at most this many times a raw TCP echo of the same bytes.
pub const G3_TARGET_RATIO: f64 = 2.0;

/// A client connected to an in-process server on 127.0.0.1.
pub struct Loopback {
    client: DiffusionClient<Channel>,
    model: proto::ModelInfo,
    addr: std::net::SocketAddr,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// What one generation measured.
#[derive(Clone, Debug, Default)]
struct Sample {
    /// Client wall time, ms.
    wall_ms: f64,
    /// Server denoise time, ms (callback waits included).
    denoise_ms: f64,
    /// Server time inside the callback (encode, send, wait for the reply, decode), ms.
    callback_wait_ms: f64,
    /// StepEnds that waited for a reply.
    waits: u32,
    /// The last `latents` seen in a StepEnd: shape and wire bytes.
    latents: Option<(Vec<i64>, usize)>,
}

impl Loopback {
    /// Serves `engine` on 127.0.0.1 (any free port) and connects a gRPC client to it.
    pub async fn start(engine: Engine) -> Result<Self, BenchError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let model = engine.models()[0].clone();
        let metrics = engine.metrics().clone();
        tokio::spawn(server::serve(
            engine,
            ServerConfig::default(),
            listener,
            std::future::pending(),
        ));
        let client = connect(addr).await?;
        Ok(Self {
            client,
            model,
            addr,
            metrics,
        })
    }

    /// Another client of the same server, on its own connection (as a separate user would be).
    pub async fn another(&self) -> Result<Self, BenchError> {
        Ok(Self {
            client: connect(self.addr).await?,
            model: self.model.clone(),
            addr: self.addr,
            metrics: self.metrics.clone(),
        })
    }

    /// The gRPC client.
    pub(super) fn client_mut(&mut self) -> &mut DiffusionClient<Channel> {
        &mut self.client
    }

    /// The server engine's metrics (device busy time, rows per UNet call).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The served model.
    pub fn model(&self) -> &proto::ModelInfo {
        &self.model
    }

    /// Runs one generation, answering every StepEnd that waits by sending back the tensors named
    /// in `echo` unchanged.
    async fn run(
        &mut self,
        request: proto::GenerateRequest,
        echo: &[&str],
    ) -> Result<Sample, BenchError> {
        let t0 = Instant::now();
        let (tx, rx) = mpsc::channel(4);
        let start = client_message::Kind::Start(request);
        send(&tx, start).await?;
        let mut inbound = self
            .client
            .generate(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut sample = Sample::default();
        while let Some(msg) = inbound.message().await? {
            match msg.kind {
                Some(Kind::StepEnd(s)) => {
                    if let Some(t) = s.tensors.get("latents") {
                        sample.latents = Some((t.shape.clone(), t.data.len()));
                    }
                    if s.reply_required {
                        sample.waits += 1;
                        send(&tx, echo_reply(&s, echo)).await?;
                    }
                }
                Some(Kind::Completed(c)) => {
                    let t = c.timings.unwrap_or_default();
                    sample.wall_ms = t0.elapsed().as_secs_f64() * 1e3;
                    sample.denoise_ms = t.denoise_ms;
                    sample.callback_wait_ms = t.callback_wait_ms;
                    return Ok(sample);
                }
                Some(Kind::ReplyRejected(r)) => {
                    return Err(BenchError::Setup(format!("reply rejected: {r:?}")))
                }
                _ => {}
            }
        }
        Err(BenchError::Setup("stream ended without Completed".into()))
    }
}

/// A client of `addr` with the same transport settings as `stepstream::client::Client`.
async fn connect(addr: std::net::SocketAddr) -> Result<DiffusionClient<Channel>, BenchError> {
    let channel = client::channel(&addr.to_string(), &client::ConnectOptions::default())
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(DiffusionClient::new(channel)
        .max_decoding_message_size(client::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(client::MAX_MESSAGE_BYTES))
}

/// Sends one client message on the request stream.
pub(super) async fn send(
    tx: &mpsc::Sender<proto::ClientMessage>,
    kind: client_message::Kind,
) -> Result<(), BenchError> {
    tx.send(proto::ClientMessage { kind: Some(kind) })
        .await
        .map_err(|_| BenchError::Setup("request stream closed".into()))
}

/// The reply to `step` that sends back the tensors named in `echo`, as they arrived.
fn echo_reply(step: &proto::StepEnd, echo: &[&str]) -> client_message::Kind {
    let tensors: HashMap<String, proto::Tensor> = echo
        .iter()
        .filter_map(|n| step.tensors.get(*n).map(|t| (n.to_string(), t.clone())))
        .collect();
    client_message::Kind::Reply(proto::StepReply {
        step_index: step.step_index,
        tensors,
        ..Default::default()
    })
}

/// A generation request for the bench: seed 1, `steps` steps, `size`×`size`.
fn request(
    steps: u32,
    size: u32,
    callback: Option<proto::CallbackOptions>,
) -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: PROMPT.into(),
        num_inference_steps: steps,
        width: Some(size),
        height: Some(size),
        seed: Some(1),
        callback,
        ..Default::default()
    }
}

/// A subscription to every step.
fn every_step(observe_only: bool, tensors: &[&str]) -> proto::CallbackOptions {
    proto::CallbackOptions {
        observe_only,
        tensor_inputs: tensors.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// One G2 callback mode.
struct Mode {
    name: &'static str,
    callback: Option<proto::CallbackOptions>,
    echo: &'static [&'static str],
    target_pct: Option<f64>,
}

/// The G2 modes, "no callback" (the baseline) first, with the overhead goals.
fn g2_modes() -> Vec<Mode> {
    let mode = |name, callback, echo, target_pct| Mode {
        name,
        callback,
        echo,
        target_pct,
    };
    vec![
        mode("no callback", None, &[], None),
        mode(
            "observe-only, every step, latents",
            Some(every_step(true, &["latents"])),
            &[],
            None,
        ),
        mode(
            "blocking, every step, no tensors",
            Some(every_step(false, &[])),
            &[],
            None,
        ),
        mode(
            "blocking, every step, latents echoed",
            Some(every_step(false, &["latents"])),
            &["latents"],
            Some(2.0),
        ),
        mode(
            "blocking, every step, latents + prompt_embeds echoed",
            Some(every_step(false, &["latents", "prompt_embeds"])),
            &["latents", "prompt_embeds"],
            Some(4.0),
        ),
    ]
}

/// One G2 mode's medians and its overhead against "no callback".
#[derive(Clone, Debug, Serialize)]
pub struct G2Row {
    /// The callback mode.
    pub mode: &'static str,
    /// Median client wall time of a whole generation, ms.
    pub wall_ms: f64,
    /// Median server denoise time, ms (callback waits included).
    pub denoise_ms: f64,
    /// Median server time inside the callback, ms.
    pub callback_wait_ms: f64,
    /// Denoise time over "no callback", in % of its denoise time.
    pub overhead_denoise_pct: f64,
    /// Client wall time over "no callback", in % of its wall time.
    pub overhead_wall_pct: f64,
    /// The goal for `overhead_denoise_pct`, where it sets one.
    pub target_pct: Option<f64>,
    /// Whether `overhead_denoise_pct` is within `target_pct` (null without a goal).
    pub meets_target: Option<bool>,
}

/// G2: each callback mode at `opts.size` (0: the model's native size) and `opts.steps`, one
/// warm-up per mode, then `opts.runs` rounds that run every mode once each (so drift in the
/// machine's load spreads over all modes); medians, and overheads against "no callback".
pub async fn g2(lb: &mut Loopback, opts: &BenchOptions) -> Result<Vec<G2Row>, BenchError> {
    let size = if opts.size == 0 {
        lb.model.default_width
    } else {
        opts.size
    };
    let modes = g2_modes();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    for round in 0..=opts.runs.max(1) {
        for (mode, got) in modes.iter().zip(samples.iter_mut()) {
            let req = request(opts.steps, size, mode.callback.clone());
            let sample = lb.run(req, mode.echo).await?;
            if round > 0 {
                got.push(sample);
            }
        }
    }
    let mut rows: Vec<G2Row> = modes
        .iter()
        .zip(samples)
        .map(|(mode, got)| g2_row(mode, &got))
        .collect();
    add_overheads(&mut rows);
    Ok(rows)
}

/// A mode's medians (overheads left at 0).
fn g2_row(mode: &Mode, samples: &[Sample]) -> G2Row {
    let med = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    G2Row {
        mode: mode.name,
        wall_ms: med(|s| s.wall_ms),
        denoise_ms: med(|s| s.denoise_ms),
        callback_wait_ms: med(|s| s.callback_wait_ms),
        overhead_denoise_pct: 0.0,
        overhead_wall_pct: 0.0,
        target_pct: mode.target_pct,
        meets_target: None,
    }
}

/// Fills each row's overheads against the first row (the baseline) and checks them.
fn add_overheads(rows: &mut [G2Row]) {
    let Some(base) = rows.first().cloned() else {
        return;
    };
    for r in rows.iter_mut() {
        r.overhead_denoise_pct = pct_over(r.denoise_ms, base.denoise_ms);
        r.overhead_wall_pct = pct_over(r.wall_ms, base.wall_ms);
        r.meets_target = r.target_pct.map(|t| r.overhead_denoise_pct <= t);
    }
}

/// How much `x` exceeds `base`, in % of `base` (0 when `base` is not positive).
fn pct_over(x: f64, base: f64) -> f64 {
    if base > 0.0 {
        (x - base) / base * 100.0
    } else {
        0.0
    }
}

/// One wire dtype's G3 figures.
#[derive(Clone, Debug, Serialize)]
pub struct G3Row {
    /// The wire dtype of the latents: `f32` or `f16`.
    pub wire: &'static str,
    /// Bytes of the latents tensor on the wire (the echo's message size).
    pub bytes: usize,
    /// Median over runs of callback_wait_ms / waits: one StepEnd → StepReply round trip, ms.
    pub round_trip_ms: f64,
    /// Median raw TCP echo of `bytes` bytes on loopback, ms.
    pub tcp_echo_ms: f64,
    /// `round_trip_ms / tcp_echo_ms`.
    pub ratio: f64,
    /// Whether `ratio` is within [`G3_TARGET_RATIO`].
    pub meets_target: bool,
}

/// G3's figures and how they were taken.
#[derive(Clone, Debug, Serialize)]
pub struct G3Report {
    /// Image side of the G3 generations, pixels.
    pub size: u32,
    /// Denoising steps per G3 generation.
    pub steps: u32,
    /// StepEnds that waited for a reply per generation.
    pub waits_per_run: u32,
    /// Timed generations per wire dtype (after a 1-step warm-up).
    pub runs: usize,
    /// Shape of the latents that travelled.
    pub latents_shape: Vec<i64>,
    /// Timed round trips of each TCP echo (after untimed warm-up ones).
    pub echo_round_trips: usize,
    /// The goal for `ratio`.
    pub target_ratio: f64,
    /// One row per wire dtype (f32, then f16).
    pub rows: Vec<G3Row>,
}

/// G3: for f32 and f16 wire, generations of `opts.g3_steps` steps at `opts.g3_size`² (512²:
/// 1×4×64×64 latents) with latents subscribed and echoed back at every step (no CFG and no
/// decode: the model's own cost is not what is measured here), one 1-step warm-up and
/// `opts.runs` timed runs each; then a raw TCP echo of the latents' wire bytes in the same
/// process, and the ratio of the two.
pub async fn g3(lb: &mut Loopback, opts: &BenchOptions) -> Result<G3Report, BenchError> {
    let wires = [
        ("f32", proto::DType::DtypeF32),
        ("f16", proto::DType::DtypeF16),
    ];
    let mut rows = Vec::new();
    let (mut shape, mut waits) = (Vec::new(), 0);
    for (wire, dtype) in wires {
        let rt = callback_round_trip(lb, dtype, opts).await?;
        let echo = tcp_echo_ms(rt.bytes, ECHO_WARMUP, ECHO_ROUND_TRIPS).await?;
        let ratio = rt.ms / echo;
        rows.push(G3Row {
            wire,
            bytes: rt.bytes,
            round_trip_ms: rt.ms,
            tcp_echo_ms: echo,
            ratio,
            meets_target: ratio <= G3_TARGET_RATIO,
        });
        (shape, waits) = (rt.shape, rt.waits);
    }
    Ok(G3Report {
        size: opts.g3_size,
        steps: opts.g3_steps,
        waits_per_run: waits,
        runs: opts.runs.max(1),
        latents_shape: shape,
        echo_round_trips: ECHO_ROUND_TRIPS,
        target_ratio: G3_TARGET_RATIO,
        rows,
    })
}

/// The callback round trip of one wire dtype.
struct RoundTrip {
    /// Median per-step round trip, ms.
    ms: f64,
    /// Wire bytes of the latents.
    bytes: usize,
    /// Their shape.
    shape: Vec<i64>,
    /// StepEnds that waited, per generation.
    waits: u32,
}

/// Times the per-step round trip with latents in `wire` dtype echoed at every step.
async fn callback_round_trip(
    lb: &mut Loopback,
    wire: proto::DType,
    opts: &BenchOptions,
) -> Result<RoundTrip, BenchError> {
    let callback = proto::CallbackOptions {
        wire_dtype: wire as i32,
        ..every_step(false, &["latents"])
    };
    let req = proto::GenerateRequest {
        guidance_scale: Some(0.0),
        output: Some(proto::OutputOptions {
            format: proto::ImageFormat::None as i32,
            ..Default::default()
        }),
        ..request(opts.g3_steps, opts.g3_size, Some(callback))
    };
    let warm_up = proto::GenerateRequest {
        num_inference_steps: 1,
        ..req.clone()
    };
    lb.run(warm_up, &["latents"]).await?;
    let mut per_step = Vec::new();
    let mut last = Sample::default();
    for _ in 0..opts.runs.max(1) {
        last = lb.run(req.clone(), &["latents"]).await?;
        per_step.push(last.callback_wait_ms / f64::from(last.waits.max(1)));
    }
    let (shape, bytes) = last
        .latents
        .ok_or_else(|| BenchError::Setup("no latents arrived in a StepEnd".into()))?;
    Ok(RoundTrip {
        ms: median(per_step),
        bytes,
        shape,
        waits: last.waits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mode: &'static str, denoise_ms: f64, target_pct: Option<f64>) -> G2Row {
        G2Row {
            mode,
            wall_ms: denoise_ms * 2.0,
            denoise_ms,
            callback_wait_ms: 0.0,
            overhead_denoise_pct: 0.0,
            overhead_wall_pct: 0.0,
            target_pct,
            meets_target: None,
        }
    }

    #[test]
    fn overheads_are_percent_of_the_first_row_and_checked_against_their_goal() {
        let mut rows = vec![
            row("base", 100.0, None),
            row("a", 101.5, Some(2.0)),
            row("b", 105.0, Some(4.0)),
        ];
        add_overheads(&mut rows);
        assert_eq!(rows[0].overhead_denoise_pct, 0.0);
        assert!((rows[1].overhead_denoise_pct - 1.5).abs() < 1e-9);
        assert!((rows[2].overhead_wall_pct - 5.0).abs() < 1e-9);
        assert_eq!(rows[0].meets_target, None);
        assert_eq!(rows[1].meets_target, Some(true));
        assert_eq!(rows[2].meets_target, Some(false));
    }
}
