//! The gRPC front: the Diffusion service, request validation, auth, TLS, health, reflection,
//! graceful shutdown, and the single mapping from errors to `Status`.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use tonic_health::ServingStatus;

use crate::engine::Engine;
use crate::proto;
use crate::proto::diffusion_server::DiffusionServer;
use crate::proto::xds::service::orca::v3::open_rca_service_server::OpenRcaServiceServer;

pub mod auth;
mod error;
pub mod orca;
pub mod service;
pub mod validation;

pub use auth::Tokens;
pub use service::DiffusionService;
pub use validation::Limits;

/// HTTP/2 stream flow-control window the server grants (bytes).
pub const HTTP2_STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 connection flow-control window the server grants (bytes).
pub const HTTP2_CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame a stepstream endpoint accepts (bytes): a 64 KiB latents message travels
/// as one DATA frame instead of five.
pub const HTTP2_MAX_FRAME: u32 = 1 << 20;
/// The default drain grace: above two health-check intervals of the shipped balancer configs
/// (Envoy checks every second, Kubernetes readiness every two).
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(5);
/// The grpc.health.v1 service name that stays SERVING while the process runs (for liveness
/// probes): unlike `""`, it does not turn NOT_SERVING on a drain, so a draining replica is not
/// restarted by its liveness probe.
pub const LIVENESS_SERVICE: &str = "liveness";

/// PEM material for TLS.
#[derive(Clone)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: Vec<u8>,
    /// Server private key (PEM).
    pub key: Vec<u8>,
    /// CA whose client certificates are required (mTLS), when set.
    pub client_ca: Option<Vec<u8>>,
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("key", &"<redacted>")
            .field("mtls", &self.client_ca.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// Server-level settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Request limits.
    pub limits: Limits,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams per connection (`None`: unlimited).
    pub max_concurrent_streams: Option<u32>,
    /// HTTP/2 keepalive ping interval (`None`: off); pings unanswered for 20 s close the connection.
    pub http2_keepalive: Option<Duration>,
    /// TCP keepalive on accepted connections (`None`: off).
    pub tcp_keepalive: Option<Duration>,
    /// Bearer tokens required on Diffusion RPCs (`None`: no auth). Health stays open.
    pub tokens: Option<Tokens>,
    /// TLS (and mTLS) material (`None`: plaintext).
    pub tls: Option<TlsFiles>,
    /// Serve gRPC reflection.
    pub reflection: bool,
    /// On shutdown, how long new streams are still served after health turns NOT_SERVING, so
    /// that balancers see it (at least two of their health-check intervals) before any stream
    /// is refused.
    pub drain_grace: Duration,
    /// After the grace, how long admitted generations (queued ones included) may run before
    /// they end with UNAVAILABLE.
    pub drain_timeout: Duration,
    /// Log prompts at info level.
    pub log_prompts: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_message_bytes: 256 * 1024 * 1024,
            max_concurrent_streams: Some(256),
            http2_keepalive: Some(Duration::from_secs(30)),
            tcp_keepalive: Some(Duration::from_secs(60)),
            tokens: None,
            tls: None,
            reflection: true,
            drain_grace: DEFAULT_DRAIN_GRACE,
            drain_timeout: Duration::from_secs(30),
            log_prompts: false,
        }
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The transport failed (bind, TLS setup, ...).
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// The reflection descriptors could not be built.
    #[error("reflection: {0}")]
    Reflection(String),
}

/// Serves the Diffusion service, health (`grpc.health.v1`), ORCA load reports and, unless turned
/// off, reflection (v1 and v1alpha) on `listener` until `shutdown` resolves. Health reports
/// SERVING for `""`, the Diffusion service and [`LIVENESS_SERVICE`]: the engine's models are
/// loaded. On shutdown (a drain that loses nothing behind a balancer):
/// 1. health for `""` and the Diffusion service goes NOT_SERVING at once;
/// 2. new streams are still served for `drain_grace`, while balancers notice;
/// 3. then new streams are refused with UNAVAILABLE before any response (retryable elsewhere);
/// 4. admitted generations, queued ones included, may finish within `drain_timeout`; the rest
///    end with UNAVAILABLE, and the function returns.
pub async fn serve(
    engine: Engine,
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<DiffusionServer<DiffusionService>>()
        .await;
    health_reporter
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    let (reflection_v1, reflection_v1alpha) = if config.reflection {
        // Our contract and health's, served by both reflection versions.
        let builder = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_error =
            |e: tonic_reflection::server::Error| ServeError::Reflection(e.to_string());
        let v1 = builder().build_v1().map_err(reflection_error)?;
        let v1alpha = builder().build_v1alpha().map_err(reflection_error)?;
        (Some(v1), Some(v1alpha))
    } else {
        (None, None)
    };
    let diffusion = DiffusionServer::new(DiffusionService::new(
        engine.clone(),
        config.limits.clone(),
        config.log_prompts,
    ))
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes);
    let tokens = config.tokens.clone();
    let diffusion = InterceptedService::new(diffusion, move |req: Request<()>| {
        if let Some(t) = &tokens {
            t.check(req.metadata()).map_err(Status::from)?;
        }
        Ok(req)
    });

    // Shutdown: NOT_SERVING, a grace while balancers notice, stop admitting, let admitted work
    // drain, then stop it; the transport then closes its connections. A hard bound keeps a
    // stuck connection from holding the process.
    let (hard_stop_tx, hard_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reporter = health_reporter.clone();
    let drain_engine = engine.clone();
    let drain_timeout = config.drain_timeout;
    let drain_grace = config.drain_grace;
    let graceful = async move {
        shutdown.await;
        // Readiness off first: balancers stop choosing this replica at their next check.
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        reporter
            .set_not_serving::<DiffusionServer<DiffusionService>>()
            .await;
        tracing::info!(
            active = drain_engine.active(),
            grace_ms = drain_grace.as_millis() as u64,
            drain_ms = drain_timeout.as_millis() as u64,
            "shutting down: NOT_SERVING, still serving new streams for the grace period"
        );
        // Why serve during the grace: until a balancer has seen NOT_SERVING it still sends new
        // streams here, and refusing them would fail those whose retries are spent or off.
        tokio::time::sleep(drain_grace).await;
        drain_engine.begin_drain();
        tracing::info!(
            active = drain_engine.active(),
            "grace over: refusing new streams, draining admitted ones"
        );
        let deadline = tokio::time::Instant::now() + drain_timeout;
        while drain_engine.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if drain_engine.active() > 0 {
            tracing::warn!(
                active = drain_engine.active(),
                "drain timeout: stopping in-flight generations"
            );
            drain_engine.abort_all();
        }
        let _ = hard_stop_tx.send(());
    };

    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        // Flow-control windows that hold a whole callback tensor (an SDXL prompt_embeds pair is
        // 1.2 MiB in f32), so a StepEnd or StepReply never stalls a round trip on WINDOW_UPDATE.
        .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW))
        .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW))
        .max_frame_size(Some(HTTP2_MAX_FRAME))
        .http2_keepalive_interval(config.http2_keepalive)
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = &config.tls {
        let mut tls_config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&tls.cert, &tls.key))
            .timeout(tls.handshake_timeout);
        if let Some(ca) = &tls.client_ca {
            tls_config = tls_config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(tls_config)?;
    }
    // Load reports stay open like health: balancers read them without the clients' tokens.
    let orca = OpenRcaServiceServer::new(orca::OrcaService::new(engine.metrics().clone()));
    let router = builder
        .add_service(health_service)
        .add_service(orca)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(diffusion);
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(config.tcp_keepalive);
    let serving = router.serve_with_incoming_shutdown(incoming, graceful);
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => r?,
        _ = async {
            // After the drain, give streams a moment to deliver their final status.
            if hard_stop_rx.await.is_ok() {
                tokio::time::sleep(Duration::from_secs(5)).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!("connections still open after the drain; exiting anyway");
        }
    }
    Ok(())
}
