//! Auth, TLS, mTLS, metrics and graceful shutdown: tokens required on Diffusion RPCs (health
//! stays open), throwaway certificates made at run time, Prometheus text over HTTP, and SIGTERM
//! with a stream open ending in UNAVAILABLE within the drain bound.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::pki::{pki, server_tls, Pki};
use common::server::{self, Options};
use common::session::Session;
use stepstream::proto::diffusion_client::DiffusionClient;
use stepstream::proto::{self, server_message::Kind};
use stepstream::server::{ServerConfig, Tokens};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

fn request(steps: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: "a cat".into(),
        num_inference_steps: steps,
        seed: Some(1),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffusion_rpcs_need_a_listed_bearer_token_and_health_stays_open() {
    let srv = server::start(Options {
        config: ServerConfig {
            tokens: Some(Tokens::new(["s3cret".to_string(), "other".into()]).unwrap()),
            ..ServerConfig::default()
        },
        ..Default::default()
    })
    .await;
    let mut c = srv.client().await;
    let err = c
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    for bad in ["Bearer wrong", "Bearer s3cre", "s3cret"] {
        let mut r = tonic::Request::new(request(1));
        r.metadata_mut()
            .insert("authorization", bad.parse().unwrap());
        let err = c.generate_once(r).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{bad}");
    }
    let mut r = tonic::Request::new(request(1));
    r.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let done = c.generate_once(r).await.unwrap().into_inner();
    assert_eq!(done.images.len(), 1);

    // Health needs no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(srv.channel().await);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        r.into_inner().status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

async fn tls_client(
    addr: std::net::SocketAddr,
    pki: &Pki,
    with_identity: bool,
) -> Result<DiffusionClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if with_identity {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(DiffusionClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_round_trips() {
    let pki = pki();
    let tls = |mtls: bool| server_tls(&pki, mtls);
    // TLS: a client that trusts the CA generates an image.
    let srv = server::start(Options {
        config: ServerConfig {
            tls: Some(tls(false)),
            ..ServerConfig::default()
        },
        ..Default::default()
    })
    .await;
    let mut c = tls_client(srv.addr, &pki, false).await.unwrap();
    let done = c.generate_once(request(1)).await.unwrap().into_inner();
    assert_eq!(done.images.len(), 1);
    // Plaintext to a TLS port fails.
    let mut plain = server::connect_lazy(srv.addr);
    assert!(plain
        .list_models(proto::ListModelsRequest {})
        .await
        .is_err());

    // mTLS: without a client certificate the call fails; with one signed by the CA it works.
    let srv = server::start(Options {
        config: ServerConfig {
            tls: Some(tls(true)),
            ..ServerConfig::default()
        },
        ..Default::default()
    })
    .await;
    let refused = match tls_client(srv.addr, &pki, false).await {
        Err(_) => true,
        Ok(mut c) => c.list_models(proto::ListModelsRequest {}).await.is_err(),
    };
    assert!(refused, "mTLS must refuse a client without a certificate");
    let mut c = tls_client(srv.addr, &pki, true).await.unwrap();
    let list = c
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.default_model, "tiny-sd15");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_prometheus_text() {
    let srv = server::start(Default::default()).await;
    let mut c = srv.client().await;
    c.generate_once(request(2)).await.unwrap();
    let _ = c
        .generate_once(proto::GenerateRequest {
            width: Some(7),
            ..request(2)
        })
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(stepstream::metrics::serve(srv.metrics.clone(), listener));
    let body = tokio::task::spawn_blocking(move || {
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        sock.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    for needle in [
        "stepstream_requests_total{outcome=\"completed\"} 1",
        "stepstream_requests_total{outcome=\"invalid\"} 1",
        "stepstream_step_latency_ms_count 2",
        "stepstream_queue_depth 0",
        "stepstream_worker_busy_ratio",
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
}

/// SIGTERM with a stream open: the blocked generation is ended with UNAVAILABLE after the drain
/// bound, and the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_ends_open_streams_with_unavailable_and_exits() {
    let drain_ms = 500;
    // No grace (tests/replica.rs covers it): this is about the drain bound.
    let mut server = common::process::spawn_serve([
        "--drain-grace-ms",
        "0",
        "--drain-timeout-ms",
        &drain_ms.to_string(),
    ]);
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    let mut c = server::connect(addr).await;
    let mut s = Session::start(
        &mut c,
        proto::GenerateRequest {
            callback: Some(proto::CallbackOptions::default()),
            ..request(10)
        },
    )
    .await
    .unwrap();
    loop {
        if let Kind::StepEnd(_) = s.expect().await {
            break;
        }
    }
    let t0 = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The client never replies: after the drain bound the stream ends with UNAVAILABLE.
    let err = s.next().await.unwrap_err();
    let ended_after = t0.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        ended_after >= Duration::from_millis(drain_ms - 50),
        "{ended_after:?}"
    );
    // The process exits within the drain bound plus the transport's grace.
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    println!(
        "SIGTERM: stream ended UNAVAILABLE after {:?}, process exited after {:?}",
        ended_after,
        t0.elapsed()
    );
}
