//! The reliability suite: malformed input, killed clients, memory over many generations,
//! stalled clients, queue overflow and a concurrent load run, against one in-process server.
//! Bounded in time (about a minute on 2 cores). It prints its figures as a table at the end;
//! the README keeps them. One test function, so nothing else in this binary disturbs the
//! memory figures.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::server::{self, Options, TestServer};
use common::session::{ok_reply, Session};
use common::{rel_diff, unwire, wire, Case};
use stepstream::proto::{self, server_message::Kind};
use tonic::Code;

/// Figures collected along the way, printed as a table at the end.
#[derive(Default)]
struct Figures(Vec<(String, String)>);

impl Figures {
    fn add(&mut self, what: impl Into<String>, value: impl Into<String>) {
        self.0.push((what.into(), value.into()));
    }
    fn print(&self) {
        println!("\n| reliability figure | value |\n|---|---|");
        for (k, v) in &self.0 {
            println!("| {k} | {v} |");
        }
    }
}

fn request(steps: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: "a photo of an astronaut riding a horse on mars".into(),
        num_inference_steps: steps,
        seed: Some(11),
        ..Default::default()
    }
}

fn blocking(steps: u32, tensors: &[&str]) -> proto::GenerateRequest {
    proto::GenerateRequest {
        callback: Some(proto::CallbackOptions {
            tensor_inputs: tensors.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..request(steps)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Resident set size of this process, in bytes (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The recorded diffusers case ddim-10, run through the server; returns the final latents'
/// relative difference from diffusers'.
async fn golden_run(addr: std::net::SocketAddr) -> f32 {
    let case = Case::load("tiny-sd15", "ddim-10");
    let mut c = server::connect(addr).await;
    let req = proto::GenerateRequest {
        prompt: case.json["prompt"].as_str().unwrap().into(),
        negative_prompt: Some(String::new()),
        num_inference_steps: 10,
        guidance_scale: Some(7.5),
        scheduler: "ddim".into(),
        latents: Some(wire(&case.tensor("init_latents"))),
        callback: Some(proto::CallbackOptions {
            tensor_inputs: vec!["latents".into()],
            ..Default::default()
        }),
        output: Some(proto::OutputOptions {
            format: proto::ImageFormat::None as i32,
            return_latents: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut s = Session::start(&mut c, req).await.unwrap();
    loop {
        match s.expect().await {
            Kind::StepEnd(e) => s.reply(ok_reply(e.step_index)).await,
            Kind::Completed(done) => {
                return rel_diff(
                    &unwire(done.latents.as_ref().unwrap()),
                    &case.tensor("final.latents"),
                )
            }
            _ => {}
        }
    }
}

/// Runs a request over the `Generate` stream to its end: Ok when it completed, else the status.
async fn outcome(
    c: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
    req: proto::GenerateRequest,
) -> Result<(), tonic::Status> {
    let mut s = Session::start(c, req).await?;
    loop {
        match s.next().await? {
            Some(Kind::Completed(_)) => return Ok(()),
            Some(Kind::StepEnd(e)) if e.reply_required => s.reply(ok_reply(e.step_index)).await,
            Some(_) => {}
            None => return Err(tonic::Status::unknown("stream ended without Completed")),
        }
    }
}

/// Malformed requests: each must be answered with an error status (never OK, never INTERNAL).
fn malformed_requests() -> Vec<(&'static str, proto::GenerateRequest)> {
    let latents = |shape: Vec<i64>, dtype: i32, bytes: usize| proto::Tensor {
        dtype,
        shape,
        data: vec![0; bytes],
    };
    let f32t = proto::DType::DtypeF32 as i32;
    let nan_latents = {
        let mut data = Vec::new();
        for _ in 0..256 {
            data.extend_from_slice(&f32::NAN.to_le_bytes());
        }
        proto::Tensor {
            dtype: f32t,
            shape: vec![1, 4, 8, 8],
            data,
        }
    };
    let inf_latents = proto::Tensor {
        data: f32::INFINITY.to_le_bytes().repeat(256),
        ..nan_latents.clone()
    };
    let base = request(1);
    vec![
        (
            "wrong dtype",
            proto::GenerateRequest {
                latents: Some(latents(vec![1, 4, 8, 8], 0, 1024)),
                ..base.clone()
            },
        ),
        (
            "unknown dtype",
            proto::GenerateRequest {
                latents: Some(latents(vec![1, 4, 8, 8], 42, 1024)),
                ..base.clone()
            },
        ),
        (
            "wrong shape",
            proto::GenerateRequest {
                latents: Some(latents(vec![1, 4, 4, 4], f32t, 256)),
                ..base.clone()
            },
        ),
        (
            "wrong byte length",
            proto::GenerateRequest {
                latents: Some(latents(vec![1, 4, 8, 8], f32t, 1023)),
                ..base.clone()
            },
        ),
        (
            "NaN latents",
            proto::GenerateRequest {
                latents: Some(nan_latents),
                ..base.clone()
            },
        ),
        (
            "inf latents",
            proto::GenerateRequest {
                latents: Some(inf_latents),
                ..base.clone()
            },
        ),
        (
            "absurd tensor size",
            proto::GenerateRequest {
                latents: Some(latents(vec![i64::MAX, i64::MAX, 8, 8], f32t, 0)),
                ..base.clone()
            },
        ),
        (
            "negative dimension",
            proto::GenerateRequest {
                latents: Some(latents(vec![1, -4, 8, 8], f32t, 0)),
                ..base.clone()
            },
        ),
        (
            "rank 9",
            proto::GenerateRequest {
                latents: Some(latents(vec![1; 9], f32t, 4)),
                ..base.clone()
            },
        ),
        (
            "unknown model",
            proto::GenerateRequest {
                model: "nope".into(),
                ..base.clone()
            },
        ),
        (
            "unknown scheduler",
            proto::GenerateRequest {
                scheduler: "warp-drive".into(),
                ..base.clone()
            },
        ),
        (
            "width 0",
            proto::GenerateRequest {
                width: Some(0),
                ..base.clone()
            },
        ),
        (
            "width not /8",
            proto::GenerateRequest {
                width: Some(63),
                ..base.clone()
            },
        ),
        (
            "huge height",
            proto::GenerateRequest {
                height: Some(u32::MAX),
                ..base.clone()
            },
        ),
        (
            "huge steps",
            proto::GenerateRequest {
                num_inference_steps: u32::MAX,
                ..base.clone()
            },
        ),
        (
            "huge image count",
            proto::GenerateRequest {
                num_images_per_prompt: u32::MAX,
                ..base.clone()
            },
        ),
        (
            "huge prompt",
            proto::GenerateRequest {
                prompt: "x".repeat(100_000),
                ..base.clone()
            },
        ),
        (
            "NaN guidance",
            proto::GenerateRequest {
                guidance_scale: Some(f32::NAN),
                ..base.clone()
            },
        ),
        (
            "inf guidance",
            proto::GenerateRequest {
                guidance_scale: Some(f32::INFINITY),
                ..base.clone()
            },
        ),
        (
            "negative eta",
            proto::GenerateRequest {
                eta: Some(-1.0),
                ..base.clone()
            },
        ),
        (
            "guidance_rescale 2",
            proto::GenerateRequest {
                guidance_rescale: Some(2.0),
                ..base.clone()
            },
        ),
        (
            "prompt and prompt_embeds",
            proto::GenerateRequest {
                prompt_embeds: Some(latents(vec![1, 77, 32], f32t, 77 * 32 * 4)),
                ..base.clone()
            },
        ),
        (
            "prompt_embeds wrong width",
            proto::GenerateRequest {
                prompt: String::new(),
                prompt_embeds: Some(latents(vec![1, 77, 31], f32t, 77 * 31 * 4)),
                ..base.clone()
            },
        ),
        (
            "unknown callback tensor",
            proto::GenerateRequest {
                callback: Some(proto::CallbackOptions {
                    tensor_inputs: vec!["add_time_ids".into()],
                    ..Default::default()
                }),
                ..base.clone()
            },
        ),
        (
            "step index out of range",
            proto::GenerateRequest {
                callback: Some(proto::CallbackOptions {
                    step_indices: vec![5],
                    ..Default::default()
                }),
                ..base.clone()
            },
        ),
        (
            "reply timeout too long",
            proto::GenerateRequest {
                callback: Some(proto::CallbackOptions {
                    reply_timeout_ms: u32::MAX,
                    ..Default::default()
                }),
                ..base.clone()
            },
        ),
        (
            "unknown wire dtype",
            proto::GenerateRequest {
                callback: Some(proto::CallbackOptions {
                    wire_dtype: 9,
                    ..Default::default()
                }),
                ..base.clone()
            },
        ),
        (
            "unknown output format",
            proto::GenerateRequest {
                output: Some(proto::OutputOptions {
                    format: 7,
                    return_latents: false,
                    ..Default::default()
                }),
                ..base
            },
        ),
    ]
}

/// Malformed replies to a step waiting on `latents` and `prompt_embeds`: each must be answered
/// with ReplyRejected.
fn malformed_replies(step: &proto::StepEnd) -> Vec<(&'static str, proto::StepReply)> {
    let latents = step.tensors["latents"].clone();
    let embeds = step.tensors["prompt_embeds"].clone();
    let with = |name: &str, t: proto::Tensor| proto::StepReply {
        step_index: step.step_index,
        tensors: HashMap::from([(name.to_string(), t)]),
        ..Default::default()
    };
    let mut nan = latents.clone();
    nan.data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut inf = latents.clone();
    inf.data[4..8].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
    vec![
        ("wrong step index", ok_reply(step.step_index + 1)),
        ("unknown name", with("bogus", latents.clone())),
        (
            "unsubscribed name",
            with("negative_prompt_embeds", embeds.clone()),
        ),
        (
            "wrong dtype",
            with(
                "latents",
                proto::Tensor {
                    dtype: 0,
                    ..latents.clone()
                },
            ),
        ),
        (
            "wrong shape",
            with(
                "latents",
                proto::Tensor {
                    shape: vec![1, 4, 16, 4],
                    ..latents.clone()
                },
            ),
        ),
        (
            "wrong byte length",
            with(
                "latents",
                proto::Tensor {
                    data: latents.data[..100].to_vec(),
                    ..latents.clone()
                },
            ),
        ),
        ("NaN", with("latents", nan)),
        ("inf", with("latents", inf)),
        (
            "absurd size",
            with(
                "latents",
                proto::Tensor {
                    shape: vec![i64::MAX, 2],
                    ..latents.clone()
                },
            ),
        ),
        (
            "guidance off without halving",
            proto::StepReply {
                step_index: step.step_index,
                guidance_scale: Some(0.0),
                ..Default::default()
            },
        ),
        (
            "halved without guidance off",
            with(
                "prompt_embeds",
                stepstream::client::conditional_half(&embeds).unwrap(),
            ),
        ),
        (
            "NaN guidance",
            proto::StepReply {
                step_index: step.step_index,
                guidance_scale: Some(f32::NAN),
                ..Default::default()
            },
        ),
    ]
}

async fn malformed_input(srv: &TestServer, fig: &mut Figures) {
    let reference = {
        let mut c = srv.client().await;
        let done = c
            .generate_once(proto::GenerateRequest {
                output: Some(proto::OutputOptions {
                    format: proto::ImageFormat::None as i32,
                    return_latents: true,
                    ..Default::default()
                }),
                ..request(3)
            })
            .await
            .unwrap()
            .into_inner();
        unwire(done.latents.as_ref().unwrap())
    };
    // A well-formed golden generation runs beside the garbage.
    let golden = tokio::spawn(golden_run(srv.addr));

    let mut statuses: HashMap<Code, usize> = HashMap::new();
    let requests = malformed_requests();
    let kinds = requests.len();
    let mut c = srv.client().await;
    let rounds = 25;
    for _ in 0..rounds {
        for (what, req) in &requests {
            match outcome(&mut c, req.clone()).await {
                Ok(()) => panic!("malformed request `{what}` was accepted"),
                Err(e) => {
                    assert!(
                        !matches!(e.code(), Code::Internal | Code::Unknown | Code::Ok),
                        "{what}: {e}"
                    );
                    *statuses.entry(e.code()).or_default() += 1;
                }
            }
        }
    }
    let bad_requests = rounds * kinds;

    // Malformed replies, all to one waiting step; then the run finishes unchanged.
    let mut s = Session::start(&mut c, blocking(3, &["latents", "prompt_embeds"]))
        .await
        .unwrap();
    let step = loop {
        if let Kind::StepEnd(e) = s.expect().await {
            break e;
        }
    };
    let replies = malformed_replies(&step);
    let reply_rounds = 50;
    for _ in 0..reply_rounds {
        for (what, r) in &replies {
            s.reply(r.clone()).await;
            match s.expect().await {
                Kind::ReplyRejected(rej) => assert!(!rej.field.is_empty(), "{what}"),
                other => panic!("`{what}` was not rejected: {other:?}"),
            }
        }
    }
    let bad_replies = reply_rounds * replies.len();
    s.reply(ok_reply(step.step_index)).await;
    let done = loop {
        match s.expect().await {
            Kind::StepEnd(e) => s.reply(ok_reply(e.step_index)).await,
            Kind::Completed(done) => break done,
            other => panic!("{other:?}"),
        }
    };
    assert!(done.latents.is_none(), "no latents were asked for");
    let golden_diff = golden.await.unwrap();
    assert!(
        golden_diff <= 1e-5,
        "golden run beside the garbage: {golden_diff}"
    );
    // The server still answers, and a plain generation is unchanged.
    let after = c
        .generate_once(proto::GenerateRequest {
            output: Some(proto::OutputOptions {
                format: proto::ImageFormat::None as i32,
                return_latents: true,
                ..Default::default()
            }),
            ..request(3)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        common::max_abs_diff(&unwire(after.latents.as_ref().unwrap()), &reference),
        0.0
    );
    let mut codes: Vec<String> = statuses.iter().map(|(c, n)| format!("{c:?} {n}")).collect();
    codes.sort();
    fig.add(
        "malformed requests answered with a status (kinds × rounds)",
        format!("{bad_requests} ({kinds} × {rounds}): {}", codes.join(", ")),
    );
    fig.add(
        "malformed replies answered with ReplyRejected (kinds × rounds)",
        format!("{bad_replies} ({} × {reply_rounds})", replies.len()),
    );
    fig.add("crashes / INTERNAL statuses", "0 / 0");
    fig.add(
        "golden ddim-10 run beside them (final latents rel. diff)",
        format!("{golden_diff:.2e}"),
    );
}

/// ≥ 100 clients killed mid-step: each time the queued client behind starts at once (on a
/// server with one live place, so that B queues behind A).
async fn killed_clients(srv: &TestServer, fig: &mut Figures) {
    let kills = 100;
    let mut latencies = Vec::with_capacity(kills);
    // A runs and waits for its reply at step 0; B waits in the queue.
    let mut a_client = srv.client().await;
    let mut a = Session::start(&mut a_client, blocking(50, &[]))
        .await
        .unwrap();
    loop {
        if let Kind::StepEnd(_) = a.expect().await {
            break;
        }
    }
    for _ in 0..kills {
        let mut b_client = srv.client().await;
        let mut b = Session::start(&mut b_client, blocking(50, &[]))
            .await
            .unwrap();
        match b.expect().await {
            Kind::Queued(q) => assert_eq!(q.position, 1),
            other => panic!("expected Queued, got {other:?}"),
        }
        // Kill A: its stream and its connection go away mid-step.
        let t0 = Instant::now();
        drop(a);
        drop(a_client);
        loop {
            match b.expect().await {
                Kind::StepEnd(_) => break,
                Kind::Accepted(_) => {}
                other => panic!("{other:?}"),
            }
        }
        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
        a = b;
        a_client = b_client;
    }
    drop(a);
    drop(a_client);
    latencies.sort_by(f64::total_cmp);
    let max = *latencies.last().unwrap();
    assert!(max < 2000.0, "a slot took {max} ms to free");
    fig.add(
        "clients killed mid-step; next queued client's first step after the kill",
        format!(
            "{kills} killed; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            max
        ),
    );
}

/// Resident memory after 500 generations stays within 5% of after the first 50.
async fn memory_over_generations(srv: &TestServer, fig: &mut Figures) {
    let mut c = srv.client().await;
    // Every tenth generation is decoded to PNG; the rest return latents only (faster).
    let run = |c: &mut proto::diffusion_client::DiffusionClient<tonic::transport::Channel>,
               i: usize| {
        let mut c = c.clone();
        let format = if i % 10 == 0 {
            proto::ImageFormat::Png
        } else {
            proto::ImageFormat::None
        };
        async move {
            c.generate_once(proto::GenerateRequest {
                output: Some(proto::OutputOptions {
                    format: format as i32,
                    return_latents: false,
                    ..Default::default()
                }),
                ..request(2)
            })
            .await
            .unwrap();
        }
    };
    let t0 = Instant::now();
    for i in 0..50 {
        run(&mut c, i).await;
    }
    let after_50 = rss_bytes();
    for i in 50..500 {
        run(&mut c, i).await;
    }
    let after_500 = rss_bytes();
    let growth = after_500 as f64 / after_50 as f64 - 1.0;
    assert!(
        growth <= 0.05,
        "RSS grew {:.1}% from {after_50} to {after_500} bytes",
        growth * 100.0
    );
    fig.add(
        "resident memory after 50 → 500 generations",
        format!(
            "{:.1} MiB → {:.1} MiB ({:+.2}%), 500 generations in {:.1} s",
            after_50 as f64 / 1048576.0,
            after_500 as f64 / 1048576.0,
            growth * 100.0,
            t0.elapsed().as_secs_f64()
        ),
    );
}

/// A client that never replies is dropped at its reply deadline; the next one starts.
async fn stalled_client(srv: &TestServer, fig: &mut Figures) {
    let mut c = srv.client().await;
    let stalled = proto::GenerateRequest {
        callback: Some(proto::CallbackOptions {
            reply_timeout_ms: 300,
            on_timeout: proto::TimeoutAction::Abort as i32,
            ..Default::default()
        }),
        ..request(10)
    };
    let mut s = Session::start(&mut c, stalled).await.unwrap();
    loop {
        if let Kind::StepEnd(_) = s.expect().await {
            break;
        }
    }
    let t0 = Instant::now();
    let mut next = Session::start(&mut c, request(2)).await.unwrap();
    let err = s.next().await.unwrap_err();
    let freed_after = t0.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    let done = next.until_completed().await;
    assert!(!done.images.is_empty());
    fig.add(
        "stalled client (300 ms reply deadline) ended and its slot reused",
        format!(
            "DEADLINE_EXCEEDED after {:.0} ms",
            freed_after.as_secs_f64() * 1e3
        ),
    );
}

/// Beyond live sessions + queue (`capacity` in all): RESOURCE_EXHAUSTED with a retry hint.
async fn queue_overflow(srv: &TestServer, capacity: usize, fig: &mut Figures) {
    let mut c = srv.client().await;
    let mut held = Vec::new();
    for _ in 0..capacity {
        held.push(Session::start(&mut c, blocking(3, &[])).await.unwrap());
    }
    let err = Session::start(&mut c, request(2))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.metadata().get("grpc-retry-pushback-ms").is_some());
    drop(held);
    // Everything drains; the server admits again.
    let t0 = Instant::now();
    loop {
        match c.generate_once(request(1)).await {
            Ok(_) => break,
            Err(e)
                if e.code() == Code::ResourceExhausted && t0.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    fig.add(
        "queue overflow",
        format!("{capacity} admitted, next RESOURCE_EXHAUSTED (grpc-retry-pushback-ms set)"),
    );
}

/// ≥ 32 concurrent clients, half observe-only and half blocking, for a bounded time.
async fn load_run(srv: &TestServer, fig: &mut Figures) {
    let clients = 32;
    let run_for = Duration::from_secs(8);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = server::connect(addr).await;
            let mut step_ms = Vec::new();
            let mut round_trips = Vec::new();
            let mut generations = 0usize;
            while t0.elapsed() < run_for {
                let observe = i % 2 == 0;
                let req = proto::GenerateRequest {
                    callback: Some(proto::CallbackOptions {
                        observe_only: observe,
                        tensor_inputs: vec!["latents".into()],
                        ..Default::default()
                    }),
                    ..request(4)
                };
                let mut s = Session::start(&mut c, req).await?;
                loop {
                    match s.next().await? {
                        Some(Kind::StepEnd(e)) => {
                            step_ms.push(e.step_ms);
                            if e.reply_required {
                                let sent = Instant::now();
                                s.reply(ok_reply(e.step_index)).await;
                                round_trips.push(sent);
                            }
                        }
                        Some(Kind::Completed(_)) => break,
                        Some(_) => {}
                        None => return Err(tonic::Status::internal("stream ended early")),
                    }
                }
                generations += 1;
            }
            Ok::<_, tonic::Status>((generations, step_ms))
        }));
    }
    let mut failures = 0;
    let mut generations = 0;
    let mut steps = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok((g, s)) => {
                generations += g;
                steps.extend(s);
            }
            Err(e) => {
                eprintln!("load client failed: {e}");
                failures += 1;
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    assert_eq!(failures, 0);
    steps.sort_by(f64::total_cmp);
    fig.add(
        "load run: 32 clients (16 observe-only, 16 blocking), 4 steps, 64×64",
        format!(
            "{failures} failures; {generations} generations in {elapsed:.1} s = {:.2} gen/s, {:.1} steps/s; step latency p50 {:.1} ms, p99 {:.1} ms",
            generations as f64 / elapsed,
            steps.len() as f64 / elapsed,
            percentile(&steps, 0.5),
            percentile(&steps, 0.99)
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reliability_suite() {
    let started = Instant::now();
    let (max_sessions, max_queue) = (8, 40);
    let srv = server::start(Options {
        max_queue,
        max_sessions,
        reply_timeout: Duration::from_secs(20),
        ..Default::default()
    })
    .await;
    let mut fig = Figures::default();
    malformed_input(&srv, &mut fig).await;
    let one_place = server::start(Options {
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    killed_clients(&one_place, &mut fig).await;
    drop(one_place);
    stalled_client(&srv, &mut fig).await;
    queue_overflow(&srv, max_sessions + max_queue, &mut fig).await;
    memory_over_generations(&srv, &mut fig).await;
    load_run(&srv, &mut fig).await;
    let m = &srv.metrics;
    fig.add(
        "server metrics afterwards",
        format!(
            "{} completed, {} invalid, {} cancelled, {} deadline, {} queue-full, {} internal; {} reply rejections",
            m.requests(stepstream::metrics::Outcome::Completed),
            m.requests(stepstream::metrics::Outcome::Invalid),
            m.requests(stepstream::metrics::Outcome::Cancelled),
            m.requests(stepstream::metrics::Outcome::Deadline),
            m.requests(stepstream::metrics::Outcome::QueueFull),
            m.requests(stepstream::metrics::Outcome::Internal),
            m.reply_rejections.load(std::sync::atomic::Ordering::Relaxed)
        ),
    );
    assert_eq!(m.requests(stepstream::metrics::Outcome::Internal), 0);
    fig.add(
        "suite wall time",
        format!("{:.1} s", started.elapsed().as_secs_f64()),
    );
    fig.print();
}
