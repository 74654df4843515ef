//! The Rust client behind a balancer: a call refused before `Accepted` (UNAVAILABLE,
//! RESOURCE_EXHAUSTED) is retried, honouring `grpc-retry-pushback-ms`; a failure after `Accepted`
//! is never retried and says how many steps had run; TLS and mutual TLS, from the library and
//! from the `generate` CLI.
//!
//! A scripted in-process server plays each attempt exactly (the refusals a real replica gives are
//! checked against the real server too).

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pki::{pki, server_tls};
use common::server::{self, Options};
use common::session::Session;
use stepstream::client::{
    pushback, Client, ClientError, ConnectOptions, Event, RetryPolicy, StepChanges, TlsOptions,
    PUSHBACK_KEY,
};
use stepstream::metrics::Outcome;
use stepstream::proto::diffusion_server::{Diffusion, DiffusionServer};
use stepstream::proto::{self, server_message::Kind};
use stepstream::server::ServerConfig;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status};

/// What the scripted server does with one attempt.
enum Attempt {
    /// Ends the call with this status before any response (a trailers-only refusal).
    Refuse(Status),
    /// Sends these messages, then ends the stream with the status if one is given.
    Send(Vec<Kind>, Option<Status>),
}

/// A server that plays one [`Attempt`] per call, in order, and records when each call came.
#[derive(Clone, Default)]
struct Scripted {
    script: Arc<Mutex<VecDeque<Attempt>>>,
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl Scripted {
    fn next(&self) -> Attempt {
        self.calls.lock().unwrap().push(Instant::now());
        self.script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Attempt::Refuse(Status::internal("the script ran out")))
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

type Events = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<proto::ServerMessage, Status>> + Send>,
>;

#[tonic::async_trait]
impl Diffusion for Scripted {
    type GenerateStream = Events;

    async fn generate(
        &self,
        _request: Request<tonic::Streaming<proto::ClientMessage>>,
    ) -> Result<Response<Events>, Status> {
        match self.next() {
            Attempt::Refuse(s) => Err(s),
            Attempt::Send(kinds, end) => {
                let items: Vec<Result<proto::ServerMessage, Status>> = kinds
                    .into_iter()
                    .map(|k| Ok(proto::ServerMessage { kind: Some(k) }))
                    .chain(end.map(Err))
                    .collect();
                Ok(Response::new(Box::pin(tokio_stream::iter(items))))
            }
        }
    }

    async fn generate_once(
        &self,
        _request: Request<proto::GenerateRequest>,
    ) -> Result<Response<proto::Completed>, Status> {
        match self.next() {
            Attempt::Refuse(s) => Err(s),
            Attempt::Send(kinds, _) => kinds
                .into_iter()
                .find_map(|k| match k {
                    Kind::Completed(c) => Some(Response::new(c)),
                    _ => None,
                })
                .ok_or_else(|| Status::internal("no Completed in the script")),
        }
    }

    async fn list_models(
        &self,
        _request: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
}

/// Serves `scripted` on an ephemeral port until the test ends.
async fn serve(scripted: Scripted, script: Vec<Attempt>) -> SocketAddr {
    scripted.script.lock().unwrap().extend(script);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DiffusionServer::new(scripted))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

fn with_pushback(mut s: Status, ms: &str) -> Status {
    s.metadata_mut().insert(PUSHBACK_KEY, ms.parse().unwrap());
    s
}

fn accepted(steps: usize) -> Kind {
    Kind::Accepted(proto::Accepted {
        request_id: "r".into(),
        timesteps: (0..steps).map(|i| (steps - i) as f64 * 100.0).collect(),
        ..Default::default()
    })
}

fn step(i: u32, of: u32) -> Kind {
    Kind::StepEnd(proto::StepEnd {
        step_index: i,
        num_timesteps: of,
        ..Default::default()
    })
}

fn completed(seed: u64) -> Kind {
    Kind::Completed(proto::Completed {
        seed,
        ..Default::default()
    })
}

/// A quick policy for scripted refusals (1 ms backoff).
fn quick(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(1),
        ..RetryPolicy::default()
    }
}

async fn client(addr: SocketAddr, policy: RetryPolicy) -> Client {
    Client::connect(addr.to_string())
        .await
        .unwrap()
        .retry(policy)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_before_accepted_are_retried_and_the_callback_sees_only_the_admitted_run() {
    let scripted = Scripted::default();
    let addr = serve(
        scripted.clone(),
        vec![
            // A draining replica: UNAVAILABLE before any response.
            Attempt::Refuse(Status::unavailable("draining")),
            // A full queue after a Queued event: still before admission.
            Attempt::Send(
                vec![Kind::Queued(proto::Queued { position: 3 })],
                Some(with_pushback(
                    Status::resource_exhausted("queue full"),
                    "300",
                )),
            ),
            Attempt::Send(
                vec![accepted(2), step(0, 2), step(1, 2), completed(7)],
                None,
            ),
        ],
    )
    .await;
    let mut c = client(addr, RetryPolicy::default()).await;
    let mut seen = vec![];
    let done = c
        .generate(proto::GenerateRequest::default(), |s| {
            seen.push(s.step_index);
            Ok::<_, ClientError>(StepChanges::none())
        })
        .await
        .unwrap();
    assert_eq!(done.seed, 7);
    assert_eq!(
        seen,
        vec![0, 1],
        "the callback runs for the admitted attempt only"
    );
    let calls = scripted.calls();
    assert_eq!(calls.len(), 3);
    // The pushback is waited in full (a lower bound: the client may not come back sooner).
    assert!(
        calls[2] - calls[1] >= Duration::from_millis(300),
        "{:?}",
        calls[2] - calls[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_accepted_is_never_retried_and_says_how_far_it_got() {
    let scripted = Scripted::default();
    let after_three = || {
        Attempt::Send(
            vec![accepted(10), step(0, 10), step(1, 10), step(2, 10)],
            Some(Status::unavailable("the replica went away")),
        )
    };
    let addr = serve(scripted.clone(), vec![after_three(), after_three()]).await;
    let mut c = client(addr, quick(5)).await;
    let err = c
        .generate(proto::GenerateRequest::default(), |_| {
            Ok::<_, ClientError>(StepChanges::none())
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::FailedAfterSteps {
                steps_completed: 3,
                num_steps: 10,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert_eq!(err.steps_completed(), Some(3));
    assert!(
        err.to_string().starts_with("failed after 3 of 10 steps"),
        "{err}"
    );
    assert_eq!(scripted.calls().len(), 1, "not retried");

    // Observe-only: the same, surfaced by the event stream.
    let mut events = c.observe(proto::GenerateRequest::default()).await.unwrap();
    assert!(matches!(events.next().await, Some(Ok(Event::Accepted(_)))));
    let mut last = None;
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Event::Step(s)) => assert_eq!(s.num_timesteps, 10),
            Ok(other) => panic!("{other:?}"),
            Err(e) => last = Some(e),
        }
    }
    let err = last.expect("the stream ends in an error");
    assert_eq!(err.steps_completed(), Some(3), "{err}");
    assert_eq!(scripted.calls().len(), 2, "not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_bounds_the_attempts_and_the_server_can_say_stop() {
    let scripted = Scripted::default();
    let refusals = (0..3)
        .map(|_| Attempt::Refuse(Status::unavailable("no healthy upstream")))
        .collect();
    let addr = serve(scripted.clone(), refusals).await;
    let mut c = client(addr, quick(3)).await;
    let err = c.generate_once(Default::default()).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::GaveUp { attempts: 3, .. }),
        "{err:?}"
    );
    assert_eq!(err.code(), Some(Code::Unavailable));
    assert!(
        err.to_string().contains("gave up after 3 attempts"),
        "{err}"
    );
    assert_eq!(scripted.calls().len(), 3);

    // A negative pushback: the server asks not to retry.
    let scripted = Scripted::default();
    let addr = serve(
        scripted.clone(),
        vec![Attempt::Refuse(with_pushback(
            Status::resource_exhausted("queue full"),
            "-1",
        ))],
    )
    .await;
    let mut c = client(addr, quick(5)).await;
    let err = c
        .observe(proto::GenerateRequest::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("says not to"), "{err}");
    assert_eq!(scripted.calls().len(), 1);

    // Other codes are never retried; `never()` returns the first refusal as it came.
    let scripted = Scripted::default();
    let addr = serve(
        scripted.clone(),
        vec![
            Attempt::Refuse(Status::invalid_argument("start.width")),
            Attempt::Refuse(Status::unavailable("draining")),
        ],
    )
    .await;
    let mut c = client(addr, quick(5)).await;
    let err = c.generate_once(Default::default()).await.unwrap_err();
    assert!(matches!(&err, ClientError::Status(s) if s.code() == Code::InvalidArgument));
    let mut c = c.retry(RetryPolicy::never()).unwrap();
    let err = c.generate_once(Default::default()).await.unwrap_err();
    assert!(matches!(&err, ClientError::Status(s) if s.code() == Code::Unavailable));
    assert_eq!(scripted.calls().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_on_the_real_server_is_retried_once_a_slot_frees() {
    let srv = server::start(Options {
        max_sessions: 1,
        max_queue: 0,
        ..Default::default()
    })
    .await;
    let request = proto::GenerateRequest {
        prompt: "a lighthouse".into(),
        num_inference_steps: 3,
        seed: Some(11),
        ..Default::default()
    };
    // A holds the only slot: it waits for its reply at step 0.
    let mut raw = srv.client().await;
    let mut a = Session::start(
        &mut raw,
        proto::GenerateRequest {
            callback: Some(proto::CallbackOptions {
                step_indices: vec![0],
                ..Default::default()
            }),
            ..request.clone()
        },
    )
    .await
    .unwrap();
    assert!(matches!(a.expect().await, Kind::Accepted(_)));
    assert!(matches!(a.expect().await, Kind::StepEnd(_)));

    // The refusal is RESOURCE_EXHAUSTED with the server's pushback.
    let mut never = client(srv.addr, RetryPolicy::never()).await;
    let err = never.generate_once(request.clone()).await.unwrap_err();
    let status = err.status().expect("a status");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(pushback(status), Some(Some(Duration::from_millis(1000))));

    // B retries; once it has been refused, A finishes and B's retry is admitted.
    let mut b = client(srv.addr, RetryPolicy::default()).await;
    let req = request.clone();
    let b = tokio::spawn(async move { b.generate_once(req).await });
    while srv.metrics.requests(Outcome::QueueFull) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.reply(proto::StepReply {
        step_index: 0,
        ..Default::default()
    })
    .await;
    let a_done = a.until_completed().await;
    let b_done = b.await.unwrap().expect("B is admitted on a retry");
    assert_eq!(b_done.images[0].data, a_done.images[0].data);
}

fn tls_request() -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: "a cat".into(),
        num_inference_steps: 2,
        seed: Some(1),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_from_the_library() {
    let pki = pki();
    let start = |mtls: bool| {
        server::start(Options {
            config: ServerConfig {
                tls: Some(server_tls(&pki, mtls)),
                ..ServerConfig::default()
            },
            ..Default::default()
        })
    };
    let tls = |opts: TlsOptions| ConnectOptions {
        tls: Some(opts),
        connect_timeout: Some(Duration::from_secs(5)),
    };
    let srv = start(false).await;
    // By name, trusting the CA: an https:// address, or a plain one with TLS options.
    for url in [
        format!("https://localhost:{}", srv.addr.port()),
        format!("localhost:{}", srv.addr.port()),
    ] {
        let mut c = Client::connect_with(&url, tls(TlsOptions::ca_pem(pki.ca_pem.clone())))
            .await
            .unwrap();
        let done = c.generate_once(tls_request()).await.unwrap();
        assert_eq!(done.images.len(), 1, "{url}");
    }
    // By IP, naming the certificate's domain.
    let mut c = Client::connect_with(
        srv.addr.to_string(),
        tls(TlsOptions::ca_pem(pki.ca_pem.clone()).domain("localhost")),
    )
    .await
    .unwrap();
    assert_eq!(c.list_models().await.unwrap().default_model, "tiny-sd15");
    // The public roots do not vouch for a private CA; a plaintext client gets no answer.
    let fails = |r: Result<Client, ClientError>| async move {
        match r {
            Err(_) => true,
            Ok(mut c) => c.list_models().await.is_err(),
        }
    };
    let https = format!("https://localhost:{}", srv.addr.port());
    assert!(fails(Client::connect(&https).await).await);
    assert!(fails(Client::connect(srv.addr.to_string()).await).await);

    // Mutual TLS: refused without a client certificate, served with one.
    let srv = start(true).await;
    let https = format!("https://localhost:{}", srv.addr.port());
    let ca = || TlsOptions::ca_pem(pki.ca_pem.clone());
    assert!(fails(Client::connect_with(&https, tls(ca())).await).await);
    let mut c = Client::connect_with(
        &https,
        tls(ca().identity(pki.client_cert.clone(), pki.client_key.clone())),
    )
    .await
    .unwrap();
    assert_eq!(c.list_models().await.unwrap().default_model, "tiny-sd15");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generate_cli_speaks_mutual_tls() {
    let pki = pki();
    let srv = server::start(Options {
        config: ServerConfig {
            tls: Some(server_tls(&pki, true)),
            ..ServerConfig::default()
        },
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let ca = write("ca.pem", &pki.ca_pem);
    let cert = write("client.pem", &pki.client_cert);
    let key = write("client.key", &pki.client_key);
    let out = dir.path().join("out.png");
    let run = |extra: Vec<std::ffi::OsString>| {
        let addr = srv.addr.to_string();
        let out = out.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_stepstream"))
                .args(["generate", "--addr", &addr, "--prompt", "a red fox"])
                .args(["--steps", "2", "--seed", "3", "--retries", "0"])
                .args(extra)
                .arg("--out")
                .arg(&out)
                .output()
                .unwrap()
        })
    };
    let os = |v: &[&std::path::Path]| -> Vec<std::ffi::OsString> {
        v.iter().map(|p| p.as_os_str().to_owned()).collect()
    };
    let mut args: Vec<std::ffi::OsString> = vec!["--tls-ca".into()];
    args.extend(os(&[&ca]));
    args.push("--tls-domain".into());
    args.push("localhost".into());
    // Without a client certificate the server refuses.
    let o = run(args.clone()).await.unwrap();
    assert!(!o.status.success());
    args.push("--tls-cert".into());
    args.extend(os(&[&cert]));
    args.push("--tls-key".into());
    args.extend(os(&[&key]));
    let o = run(args).await.unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
}
