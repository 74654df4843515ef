//! An in-process server on 127.0.0.1:0 and a real generated client, for protocol tests.

use std::net::SocketAddr;
use std::time::Duration;

use candle_core::{DType, Device};
use stepstream::engine::{Engine, EngineConfig};
use stepstream::models::ModelSource;
use stepstream::proto::diffusion_client::DiffusionClient;
use stepstream::server::{self, Limits, ServerConfig};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// How to set up a test server.
#[derive(Clone)]
pub struct Options {
    /// Generations allowed to queue while `max_sessions` are live.
    pub max_queue: usize,
    /// Sessions live at once.
    pub max_sessions: usize,
    /// Rows per UNet call.
    pub max_batch: usize,
    /// Default reply deadline.
    pub reply_timeout: Duration,
    /// Models to serve (default: the tiny SD 1.5 fixture folder).
    pub models: Vec<(String, ModelSource)>,
    /// Server settings (its `limits.default_reply_timeout` is replaced by `reply_timeout`).
    pub config: ServerConfig,
    /// LoRAs to attach, `(model id, file)`.
    pub loras: Vec<(String, std::sync::Arc<stepstream::models::lora::LoraFile>)>,
    /// Preview decoders, `(model id, AutoencoderTiny folder)`.
    pub preview_decoders: Vec<(String, std::path::PathBuf)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_queue: 4,
            max_sessions: 8,
            max_batch: 16,
            config: ServerConfig::default(),
            reply_timeout: Duration::from_secs(20),
            models: vec![(
                "tiny-sd15".into(),
                ModelSource::Dir(super::model_dir("tiny-sd15")),
            )],
            loras: Vec::new(),
            preview_decoders: Vec::new(),
        }
    }
}

/// A running server; shuts down when dropped.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The engine's metrics.
    pub metrics: std::sync::Arc<stepstream::metrics::Metrics>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestServer {
    /// A connected client.
    pub async fn client(&self) -> DiffusionClient<Channel> {
        DiffusionClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    /// A raw channel (for health and reflection clients).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A client connected to a server at `addr`.
pub async fn connect(addr: SocketAddr) -> DiffusionClient<Channel> {
    DiffusionClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

/// A plaintext client for `addr` that connects on first use.
pub fn connect_lazy(addr: SocketAddr) -> DiffusionClient<Channel> {
    DiffusionClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy(),
    )
}

/// Both fixture models, tiny-sd15 first (the default), for `Options.models`.
pub fn both_models() -> Vec<(String, ModelSource)> {
    ["tiny-sd15", "tiny-sdxl"]
        .iter()
        .map(|m| (m.to_string(), ModelSource::Dir(super::model_dir(m))))
        .collect()
}

/// Starts a server with `opts` on an ephemeral loopback port.
pub async fn start(opts: Options) -> TestServer {
    let limits = Limits {
        default_reply_timeout: opts.reply_timeout,
        ..opts.config.limits.clone()
    };
    let engine = Engine::start(EngineConfig {
        device: Device::Cpu,
        dtype: DType::F32,
        models: opts.models,
        max_queue: opts.max_queue,
        max_sessions: opts.max_sessions,
        max_batch: opts.max_batch,
        batch_window_pct: 10,
        default_reply_timeout: limits.default_reply_timeout,
        max_tensor_bytes: limits.max_tensor_bytes,
        loras: opts.loras,
        preview_decoders: opts.preview_decoders,
    })
    .await
    .expect("engine starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = engine.metrics().clone();
    let config = ServerConfig {
        limits,
        ..opts.config
    };
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        server::serve(engine, config, listener, async {
            let _ = rx.await;
        })
        .await
        .expect("server runs");
    });
    TestServer {
        addr,
        metrics,
        shutdown: Some(tx),
    }
}
