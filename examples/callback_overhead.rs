//! Measures what a remote callback costs: a 10-step generation on the embedded tiny model
//! through an in-process server on loopback, without a callback, observe-only, and blocking at
//! every step (empty replies, then latents sent back). Run:
//! `cargo run --release --example callback_overhead -- [runs] [cpu|cuda:N] [f32|f16|bf16]`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use stepstream::engine::{Engine, EngineConfig};
use stepstream::models::embedded;
use stepstream::proto::{self, client_message, server_message::Kind};
use stepstream::server::{self, ServerConfig};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn request(cb: Option<proto::CallbackOptions>) -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        num_inference_steps: 10,
        seed: Some(1),
        callback: cb,
        ..Default::default()
    }
}

/// One session; returns (client wall time, server denoise ms, server callback wait ms).
async fn run(
    client: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    cb: Option<proto::CallbackOptions>,
    echo_latents: bool,
) -> (Duration, f64, f64) {
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel(4);
    tx.send(proto::ClientMessage {
        kind: Some(client_message::Kind::Start(request(cb))),
    })
    .await
    .unwrap();
    let mut inbound = client
        .generate(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    while let Some(msg) = inbound.message().await.unwrap() {
        match msg.kind {
            Some(Kind::StepEnd(s)) if s.reply_required => {
                let tensors = if echo_latents {
                    HashMap::from([("latents".to_string(), s.tensors["latents"].clone())])
                } else {
                    HashMap::new()
                };
                let reply = proto::StepReply {
                    step_index: s.step_index,
                    tensors,
                    ..Default::default()
                };
                tx.send(proto::ClientMessage {
                    kind: Some(client_message::Kind::Reply(reply)),
                })
                .await
                .unwrap();
            }
            Some(Kind::Completed(c)) => {
                let t = c.timings.unwrap();
                return (t0.elapsed(), t.denoise_ms, t.callback_wait_ms);
            }
            Some(Kind::ReplyRejected(r)) => panic!("{r:?}"),
            _ => {}
        }
    }
    panic!("no Completed")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(30);
    let device_name = args.get(2).map(String::as_str).unwrap_or("cpu");
    let device = match device_name.strip_prefix("cuda:") {
        Some(n) => Device::new_cuda(n.parse().expect("cuda:N")).expect("a CUDA build and device"),
        None => Device::Cpu,
    };
    let dtype_name = args.get(3).map(String::as_str).unwrap_or("f32");
    let dtype = match dtype_name {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    };
    let engine = Engine::start(EngineConfig {
        device,
        dtype,
        models: vec![(embedded::EMBEDDED_MODEL_ID.into(), embedded::source())],
        max_queue: 4,
        default_reply_timeout: Duration::from_secs(30),
        max_reply_timeout: Duration::from_secs(60),
        max_tensor_bytes: 64 << 20,
    })
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::serve(
        engine,
        ServerConfig::default(),
        listener,
        std::future::pending(),
    ));
    let mut client = proto::diffusion_client::DiffusionClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let every = |observe_only: bool, tensors: &[&str]| proto::CallbackOptions {
        observe_only,
        tensor_inputs: tensors.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let modes: Vec<(&str, Option<proto::CallbackOptions>, bool)> = vec![
        ("no callback", None, false),
        (
            "observe-only, every step, latents",
            Some(every(true, &["latents"])),
            false,
        ),
        (
            "blocking, every step, no tensors",
            Some(every(false, &[])),
            false,
        ),
        (
            "blocking, every step, latents echoed",
            Some(every(false, &["latents"])),
            true,
        ),
        (
            "blocking, every step, latents+prompt_embeds",
            Some(every(false, &["latents", "prompt_embeds"])),
            false,
        ),
    ];
    // Warm-up.
    for (_, cb, echo) in &modes {
        run(&mut client, cb.clone(), *echo).await;
    }
    println!("tiny-sd15, 10 steps, 64x64, {device_name} {dtype_name}, {runs} runs each (medians):");
    println!("| mode | client wall ms | server denoise ms | callback wait ms |");
    println!("|---|---|---|---|");
    for (name, cb, echo) in &modes {
        let mut wall = Vec::new();
        let mut den = Vec::new();
        let mut wait = Vec::new();
        for _ in 0..runs {
            let (w, d, c) = run(&mut client, cb.clone(), *echo).await;
            wall.push(w.as_secs_f64() * 1e3);
            den.push(d);
            wait.push(c);
        }
        println!(
            "| {name} | {:.1} | {:.1} | {:.2} |",
            median(wall),
            median(den),
            median(wait)
        );
    }
}
