//! Prometheus metrics: counters, gauges and histograms kept in atomics, rendered in the text
//! exposition format, and served over plain HTTP on `--metrics-addr`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How a request ended, for `stepstream_requests_total{outcome=...}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Completed (interrupted runs included).
    Completed,
    /// Refused or ended as an invalid request (INVALID_ARGUMENT / NOT_FOUND / UNAUTHENTICATED).
    Invalid,
    /// Refused because the queue was full.
    QueueFull,
    /// Ended by a deadline (reply deadline with ABORT, `grpc-timeout`, stalled client).
    Deadline,
    /// Ended because the client left.
    Cancelled,
    /// Ended by the server shutting down.
    Unavailable,
    /// Ended by an internal error.
    Internal,
}

const OUTCOMES: [(Outcome, &str); 7] = [
    (Outcome::Completed, "completed"),
    (Outcome::Invalid, "invalid"),
    (Outcome::QueueFull, "queue_full"),
    (Outcome::Deadline, "deadline"),
    (Outcome::Cancelled, "cancelled"),
    (Outcome::Unavailable, "unavailable"),
    (Outcome::Internal, "internal"),
];

/// Histogram bucket bounds in milliseconds.
const BUCKETS_MS: [f64; 14] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0, 60000.0,
];

/// Bucket bounds of the rows-per-UNet-call histogram.
const BUCKETS_ROWS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A fixed-bucket histogram (milliseconds by default; see [`Histogram::rows`]).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in thousandths (integer, so it can be atomic).
    sum_milli: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::with_bounds(&BUCKETS_MS)
    }
}

impl Histogram {
    fn with_bounds(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_milli: AtomicU64::new(0),
        }
    }

    /// A histogram of batch sizes (rows per UNet call).
    pub fn rows() -> Self {
        Self::with_bounds(&BUCKETS_ROWS)
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        for (i, bound) in self.bounds.iter().enumerate() {
            if value <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_milli
            .fetch_add((value.max(0.0) * 1e3) as u64, Ordering::Relaxed);
    }

    /// Records one observation in milliseconds.
    pub fn observe_ms(&self, ms: f64) {
        self.observe(ms)
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations.
    pub fn sum(&self) -> f64 {
        self.sum_milli.load(Ordering::Relaxed) as f64 / 1e3
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, bound) in self.bounds.iter().enumerate() {
            let v = self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {v}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum();
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    requests: [AtomicU64; OUTCOMES.len()],
    /// Generations admitted and waiting for the worker.
    pub queue_depth: AtomicU64,
    /// Time per denoising step (UNet + guidance + scheduler), ms.
    pub step_latency: Histogram,
    /// Time spent waiting for one reply, ms.
    pub callback_wait: Histogram,
    /// Replies answered with ReplyRejected.
    pub reply_rejections: AtomicU64,
    /// Microseconds the device loop spent computing (encode, steps, decode).
    pub busy_us: AtomicU64,
    /// Rows in each UNet call (sessions' images, doubled under CFG).
    pub unet_rows: Histogram,
    /// Sessions live on the device (encoded and not yet finished).
    pub sessions_live: AtomicU64,
    /// Live sessions ready to step at the last tick.
    pub sessions_ready: AtomicU64,
    /// Live sessions waiting for their client's reply (or for it to read events).
    pub sessions_waiting: AtomicU64,
    /// UNet rows the live sessions that are not waiting on their client want at the next tick.
    pub rows_wanted: AtomicU64,
    /// UNet rows of the generations queued for a live place.
    pub rows_queued: AtomicU64,
    /// The device's live-session capacity (`--max-sessions`).
    pub max_sessions: AtomicU64,
    /// The device's rows per UNet call (`--max-batch`).
    pub max_batch: AtomicU64,
    /// Open ORCA load-report streams (one per balancer that reads this replica's load).
    pub orca_streams: AtomicU64,
}

/// A replica's load at the last tick of its device loop, as balancers and autoscalers read it
/// (Prometheus gauges and ORCA reports are both made from this one snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Sessions live on the device.
    pub live: u64,
    /// Live sessions waiting for their client (they hold a place but no compute).
    pub waiting: u64,
    /// Generations admitted and not yet live.
    pub queued: u64,
    /// Live-session capacity.
    pub max_sessions: u64,
    /// Rows per UNet call.
    pub max_batch: u64,
    /// Rows the live, non-waiting sessions want.
    pub rows_wanted: u64,
    /// Rows of the queued generations.
    pub rows_queued: u64,
}

impl Load {
    /// UNet rows still free in the next call: room for more sessions at no extra tick.
    pub fn batch_rows_free(&self) -> u64 {
        self.max_batch.saturating_sub(self.rows_wanted)
    }

    /// Compute demand over capacity: (rows wanted + rows queued) / rows per call. At 1.0 the
    /// device's calls are full; above it generations queue (the autoscaler's target is 1.0).
    pub fn ratio(&self) -> f64 {
        (self.rows_wanted + self.rows_queued) as f64 / self.max_batch.max(1) as f64
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            requests: Default::default(),
            queue_depth: AtomicU64::new(0),
            step_latency: Histogram::default(),
            callback_wait: Histogram::default(),
            reply_rejections: AtomicU64::new(0),
            busy_us: AtomicU64::new(0),
            unet_rows: Histogram::rows(),
            sessions_live: AtomicU64::new(0),
            sessions_ready: AtomicU64::new(0),
            sessions_waiting: AtomicU64::new(0),
            rows_wanted: AtomicU64::new(0),
            rows_queued: AtomicU64::new(0),
            max_sessions: AtomicU64::new(0),
            max_batch: AtomicU64::new(0),
            orca_streams: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// A fresh, shareable set of metrics.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Counts one finished or refused request.
    pub fn request(&self, outcome: Outcome) {
        if let Some(i) = OUTCOMES.iter().position(|(o, _)| *o == outcome) {
            self.requests[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests counted with `outcome` so far.
    pub fn requests(&self, outcome: Outcome) -> u64 {
        OUTCOMES
            .iter()
            .position(|(o, _)| *o == outcome)
            .map(|i| self.requests[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// The load as of the device loop's last tick.
    pub fn load(&self) -> Load {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Load {
            live: get(&self.sessions_live),
            waiting: get(&self.sessions_waiting),
            queued: get(&self.queue_depth),
            max_sessions: get(&self.max_sessions),
            max_batch: get(&self.max_batch),
            rows_wanted: get(&self.rows_wanted),
            rows_queued: get(&self.rows_queued),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP stepstream_requests_total Generation requests by outcome.\n# TYPE stepstream_requests_total counter\n");
        for (i, (_, name)) in OUTCOMES.iter().enumerate() {
            let v = self.requests[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "stepstream_requests_total{{outcome=\"{name}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP stepstream_queue_depth Generations waiting for the worker.\n# TYPE stepstream_queue_depth gauge\nstepstream_queue_depth {}",
            self.queue_depth.load(Ordering::Relaxed)
        );
        self.step_latency.render(
            &mut out,
            "stepstream_step_latency_ms",
            "Time per denoising step in milliseconds.",
        );
        self.callback_wait.render(
            &mut out,
            "stepstream_callback_wait_ms",
            "Time waiting for one client reply in milliseconds.",
        );
        let _ = writeln!(
            out,
            "# HELP stepstream_reply_rejections_total Replies answered with ReplyRejected.\n# TYPE stepstream_reply_rejections_total counter\nstepstream_reply_rejections_total {}",
            self.reply_rejections.load(Ordering::Relaxed)
        );
        let uptime = self.started.elapsed().as_secs_f64().max(1e-9);
        let busy = self.busy_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "# HELP stepstream_worker_busy_seconds_total Time the device loop spent computing (encode, steps, decode).\n# TYPE stepstream_worker_busy_seconds_total counter\nstepstream_worker_busy_seconds_total {busy}\n# HELP stepstream_worker_busy_ratio Busy time over uptime of the device loop.\n# TYPE stepstream_worker_busy_ratio gauge\nstepstream_worker_busy_ratio {}",
            (busy / uptime).min(1.0)
        );
        self.unet_rows.render(
            &mut out,
            "stepstream_unet_batch_rows",
            "Rows per UNet call (each session's images, doubled under CFG).",
        );
        for (name, help, v) in [
            (
                "stepstream_sessions_live",
                "Sessions live on the device.",
                &self.sessions_live,
            ),
            (
                "stepstream_sessions_ready",
                "Live sessions ready to step at the last tick.",
                &self.sessions_ready,
            ),
            (
                "stepstream_sessions_waiting",
                "Live sessions waiting for their client at the last tick.",
                &self.sessions_waiting,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let load = self.load();
        for (name, help, v) in [
            (
                "stepstream_max_sessions",
                "Live-session capacity of the device (--max-sessions).",
                load.max_sessions as f64,
            ),
            (
                "stepstream_batch_rows_free",
                "UNet rows free in the next call (rows per call less those live sessions want).",
                load.batch_rows_free() as f64,
            ),
            (
                "stepstream_load_ratio",
                "Rows wanted by live and queued sessions over rows per call: 1 is a full device, above 1 a queue (the autoscaling target).",
                load.ratio(),
            ),
            (
                "stepstream_orca_streams",
                "Open ORCA out-of-band load-report streams (balancers reading this replica's load).",
                self.orca_streams.load(Ordering::Relaxed) as f64,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

/// Serves `GET /metrics` (any path) over HTTP/1.1 on `listener` until the process ends.
pub async fn serve(metrics: Arc<Metrics>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read the whole request head (bounded in size and time; a GET has no body) before
            // answering: closing with unread request bytes would reset the connection, and the
            // client would lose the answer.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 1024];
                while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            let body = metrics.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::default();
        m.request(Outcome::Completed);
        m.request(Outcome::QueueFull);
        m.step_latency.observe_ms(3.0);
        m.callback_wait.observe_ms(0.4);
        let text = m.render();
        for needle in [
            "stepstream_requests_total{outcome=\"completed\"} 1",
            "stepstream_requests_total{outcome=\"queue_full\"} 1",
            "stepstream_queue_depth 0",
            "stepstream_step_latency_ms_bucket{le=\"5\"} 1",
            "stepstream_step_latency_ms_count 1",
            "stepstream_callback_wait_ms_bucket{le=\"0.5\"} 1",
            "stepstream_reply_rejections_total 0",
            "stepstream_worker_busy_ratio",
            "stepstream_unet_batch_rows_bucket{le=\"1\"} 0",
            "stepstream_sessions_live 0",
            "stepstream_sessions_waiting 0",
            "stepstream_batch_rows_free 0",
            "stepstream_load_ratio 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn the_load_ratio_counts_wanted_and_queued_rows_against_one_call() {
        let load = Load {
            live: 3,
            waiting: 1,
            queued: 2,
            max_sessions: 4,
            max_batch: 8,
            rows_wanted: 4,
            rows_queued: 8,
        };
        assert_eq!(load.batch_rows_free(), 4);
        assert_eq!(load.ratio(), 1.5);
        // More rows wanted than one call holds: none free, never negative.
        let full = Load {
            rows_wanted: 12,
            rows_queued: 0,
            ..load
        };
        assert_eq!(full.batch_rows_free(), 0);
        assert_eq!(full.ratio(), 1.5);
        // An engine not yet started (capacity 0) reads as unloaded, not as a division by zero.
        assert_eq!(Load::default().ratio(), 0.0);
    }
}
