//! Out-of-band ORCA load reports (`xds.service.orca.v3.OpenRcaService`): a balancer opens one
//! stream per replica and gets the replica's load at the interval it asks for. Out of band,
//! because a stepstream stream is one whole session: a report in its trailers would arrive when
//! the session is over, long after the placement it should have informed.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::wrappers::IntervalStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::metrics::{Load, Metrics, Outcome};
use crate::proto::xds::data::orca::v3::OrcaLoadReport;
use crate::proto::xds::service::orca::v3::open_rca_service_server::OpenRcaService;
use crate::proto::xds::service::orca::v3::OrcaLoadReportRequest;

/// The interval used when a request asks for none.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest interval served: shorter requests get this (reports are cheap, but a
/// misconfigured balancer must not turn them into a busy loop).
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);
/// The longest interval served.
pub const MAX_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Outcomes a balancer should count as errors: the replica failed or refused the request.
const ERROR_OUTCOMES: [Outcome; 3] = [Outcome::Internal, Outcome::Unavailable, Outcome::QueueFull];

/// The ORCA service over one engine's metrics.
#[derive(Clone)]
pub struct OrcaService {
    metrics: Arc<Metrics>,
}

impl OrcaService {
    /// A service that reports from `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

/// The counters a report's rates are differences of.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    busy_us: u64,
    completed: u64,
    errors: u64,
}

impl Sample {
    fn take(metrics: &Metrics) -> Sample {
        Sample {
            at: Instant::now(),
            busy_us: metrics.busy_us.load(Ordering::Relaxed),
            completed: metrics.requests(Outcome::Completed),
            errors: ERROR_OUTCOMES.iter().map(|&o| metrics.requests(o)).sum(),
        }
    }
}

/// Per-second rates between two samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// Fraction of the time the device loop computed.
    pub busy: f64,
    /// Generations completed per second.
    pub completed: f64,
    /// Generations failed or refused by the replica per second.
    pub errors: f64,
}

impl Rates {
    fn between(a: Sample, b: Sample) -> Rates {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        if secs < 1e-3 {
            // The first report of a stream comes at once: no interval to measure over yet.
            return Rates::default();
        }
        let per_sec = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
        Rates {
            busy: (per_sec(a.busy_us, b.busy_us) / 1e6).min(1.0),
            completed: per_sec(a.completed, b.completed),
            errors: per_sec(a.errors, b.errors),
        }
    }
}

/// The ORCA report of `load` and `rates`. `application_utilization` is the load ratio (compute
/// demand over one call's rows: 1.0 is a full device), `cpu_utilization` the device loop's busy
/// fraction, `rps_fractional`/`eps` completed and failed generations per second; the
/// stepstream-specific figures are in `named_metrics` and, as fractions, `utilization`.
pub fn report(load: &Load, rates: Rates) -> OrcaLoadReport {
    let fraction = |x: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            (x as f64 / of as f64).min(1.0)
        }
    };
    let named = [
        ("sessions_live", load.live as f64),
        ("sessions_waiting", load.waiting as f64),
        ("sessions_queued", load.queued as f64),
        ("max_sessions", load.max_sessions as f64),
        ("batch_rows_free", load.batch_rows_free() as f64),
        ("max_batch", load.max_batch as f64),
        ("load_ratio", load.ratio()),
    ];
    let utilization = [
        ("sessions", fraction(load.live, load.max_sessions)),
        ("batch_rows", fraction(load.rows_wanted, load.max_batch)),
    ];
    OrcaLoadReport {
        cpu_utilization: rates.busy,
        application_utilization: load.ratio(),
        rps_fractional: rates.completed,
        eps: rates.errors,
        named_metrics: named.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        utilization: utilization
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        ..Default::default()
    }
}

/// The interval a request asks for, clamped to what is served.
fn interval(request: &OrcaLoadReportRequest) -> Duration {
    let asked = request
        .report_interval
        .as_ref()
        .and_then(|d| Duration::try_from(*d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_REPORT_INTERVAL);
    asked.clamp(MIN_REPORT_INTERVAL, MAX_REPORT_INTERVAL)
}

/// Counts an open report stream for `stepstream_orca_streams` while it lives.
struct Subscriber(Arc<Metrics>);

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.0.orca_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

type ReportStream = Pin<Box<dyn Stream<Item = Result<OrcaLoadReport, Status>> + Send>>;

#[tonic::async_trait]
impl OpenRcaService for OrcaService {
    type StreamCoreMetricsStream = ReportStream;

    async fn stream_core_metrics(
        &self,
        request: Request<OrcaLoadReportRequest>,
    ) -> Result<Response<Self::StreamCoreMetricsStream>, Status> {
        let every = interval(request.get_ref());
        let metrics = self.metrics.clone();
        metrics.orca_streams.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber(metrics.clone());
        let mut last = Sample::take(&metrics);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Reading atomics only: nothing here waits on the device loop.
        let reports = IntervalStream::new(ticks).map(move |_| {
            let _held = &subscriber;
            let now = Sample::take(&metrics);
            let rates = Rates::between(last, now);
            last = now;
            Ok(report(&metrics.load(), rates))
        });
        Ok(Response::new(Box::pin(reports)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_carries_the_load_and_the_rates() {
        let load = Load {
            live: 3,
            waiting: 1,
            queued: 2,
            max_sessions: 4,
            max_batch: 8,
            rows_wanted: 4,
            rows_queued: 4,
        };
        let rates = Rates {
            busy: 0.5,
            completed: 2.0,
            errors: 0.25,
        };
        let r = report(&load, rates);
        assert_eq!(r.application_utilization, 1.0);
        assert_eq!(r.cpu_utilization, 0.5);
        assert_eq!(r.rps_fractional, 2.0);
        assert_eq!(r.eps, 0.25);
        assert_eq!(r.named_metrics["sessions_waiting"], 1.0);
        assert_eq!(r.named_metrics["sessions_queued"], 2.0);
        assert_eq!(r.named_metrics["batch_rows_free"], 4.0);
        assert_eq!(r.utilization["sessions"], 0.75);
        assert_eq!(r.utilization["batch_rows"], 0.5);
    }

    #[test]
    fn intervals_are_clamped_and_default_to_one_second() {
        let ask = |d: Option<Duration>| OrcaLoadReportRequest {
            report_interval: d.map(|d| d.try_into().unwrap()),
            request_cost_names: vec![],
        };
        assert_eq!(interval(&ask(None)), DEFAULT_REPORT_INTERVAL);
        assert_eq!(
            interval(&ask(Some(Duration::ZERO))),
            DEFAULT_REPORT_INTERVAL
        );
        assert_eq!(
            interval(&ask(Some(Duration::from_millis(1)))),
            MIN_REPORT_INTERVAL
        );
        assert_eq!(
            interval(&ask(Some(Duration::from_millis(250)))),
            Duration::from_millis(250)
        );
        assert_eq!(
            interval(&ask(Some(Duration::from_secs(3600)))),
            MAX_REPORT_INTERVAL
        );
    }
}
