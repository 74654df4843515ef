//! Retrying a call the server refused before admitting it.
//!
//! A draining replica answers a new stream with `UNAVAILABLE` before any response; one whose
//! queue is full answers `RESOURCE_EXHAUSTED` with a `grpc-retry-pushback-ms` hint. No step has
//! run in either case, so the call may be made again (here, or on another replica behind a
//! balancer). A failure after the server sent `Accepted` is never retried: it becomes
//! [`ClientError::FailedAfterSteps`](super::ClientError::FailedAfterSteps).

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use super::ClientError;

/// gRPC's retry pushback: trailing metadata, milliseconds to wait (negative or unparsable: do
/// not retry).
pub const PUSHBACK_KEY: &str = "grpc-retry-pushback-ms";

/// How a [`Client`](super::Client) retries a call the server refused before admitting it:
/// `UNAVAILABLE` or `RESOURCE_EXHAUSTED` before `Accepted` (a `Queued` event before the refusal
/// does not count as admission).
///
/// The wait before retry `n` (1-based) is `min(initial_backoff * multiplier^(n-1), max_backoff)`,
/// less a random part of up to `jitter` of it. A `grpc-retry-pushback-ms` trailer overrides it: a
/// non-negative value is waited exactly (and the exponential backoff starts again), a negative
/// or unparsable one means the server asks not to retry, and the error is returned at once.
/// The same policy as the Python client's `stepstream.RetryPolicy`, with the same defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry).
    pub max_attempts: u32,
    /// The wait before the first retry.
    pub initial_backoff: Duration,
    /// The longest wait between attempts (a pushback may ask for more).
    pub max_backoff: Duration,
    /// How much each wait grows (≥ 1).
    pub multiplier: f64,
    /// The largest fraction of a wait taken off at random, in [0, 1], so that clients refused
    /// together do not come back together.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts, 50 ms doubling up to 2 s, 20 % jitter.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// One attempt: every refusal is returned as it came.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The default policy with `retries` retries after the first attempt.
    pub fn retries(retries: u32) -> Self {
        Self {
            max_attempts: retries.saturating_add(1),
            ..Self::default()
        }
    }

    /// Checks the fields (a policy built field by field may be off).
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |what: String| Err(ClientError::Protocol(format!("retry policy: {what}")));
        if self.max_attempts < 1 {
            return bad("max_attempts must be at least 1".into());
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return bad(format!("multiplier must be >= 1, not {}", self.multiplier));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return bad(format!("jitter must be within [0, 1], not {}", self.jitter));
        }
        Ok(())
    }

    /// The wait before retry `n` (1-based), without jitter.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = self.multiplier.powi(n.saturating_sub(1).min(64) as i32);
        let secs = self.initial_backoff.as_secs_f64() * factor;
        Duration::from_secs_f64(secs.min(self.max_backoff.as_secs_f64()))
    }

    /// The wait before retry `n` (1-based) with `r` in [0, 1) as the random draw.
    pub fn delay(&self, n: u32, r: f64) -> Duration {
        self.backoff(n)
            .mul_f64(1.0 - self.jitter * r.clamp(0.0, 1.0))
    }
}

/// The server's `grpc-retry-pushback-ms`: `Some(Some(d))` wait `d`, `Some(None)` present but
/// negative or unparsable (do not retry), `None` absent.
pub fn pushback(status: &tonic::Status) -> Option<Option<Duration>> {
    let v = status.metadata().get(PUSHBACK_KEY)?;
    Some(
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|ms| *ms >= 0)
            .map(|ms| Duration::from_millis(ms as u64)),
    )
}

/// Whether `status`, received before `Accepted`, is a refusal worth another attempt.
pub fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::ResourceExhausted
    )
}

/// A number in [0, 1) for the jitter; the standard library's per-process random hash keys
/// are random enough to spread clients apart.
fn random_unit() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The attempts of one call under a policy.
pub(super) struct Attempts {
    policy: RetryPolicy,
    /// Attempts made so far.
    made: u32,
    /// The exponential backoff's step; a pushback resets it.
    step: u32,
}

impl Attempts {
    pub(super) fn new(policy: &RetryPolicy) -> Self {
        Self {
            policy: policy.clone(),
            made: 0,
            step: 0,
        }
    }

    /// After a failed attempt: how long to wait before the next one, or the error to return
    /// (a refusal after several attempts says how many were made).
    pub(super) fn after(&mut self, err: ClientError, what: &str) -> Result<Duration, ClientError> {
        self.made += 1;
        let ClientError::Status(status) = err else {
            return Err(err);
        };
        let made = self.made;
        let several = (made > 1).then(|| format!("after {made} attempts"));
        // The error to stop with: the status as it came, or with a word on the attempts.
        let stop = |status, why: Option<String>| match why {
            None => ClientError::Status(status),
            Some(why) => ClientError::GaveUp {
                attempts: made,
                why,
                status,
            },
        };
        if !retryable(&status) {
            return Err(stop(status, several));
        }
        let push = pushback(&status);
        if let Some(None) = push {
            let no = format!("not retried: the server's {PUSHBACK_KEY} says not to");
            let why = match several {
                Some(s) => format!("{no}; {s}"),
                None => no,
            };
            return Err(stop(status, Some(why)));
        }
        if made >= self.policy.max_attempts {
            return Err(stop(status, several.map(|s| format!("gave up {s}"))));
        }
        let wait = match push {
            Some(Some(d)) => {
                self.step = 0;
                d
            }
            _ => {
                self.step += 1;
                self.policy.delay(self.step, random_unit())
            }
        };
        tracing::debug!(
            "{what} refused before admission ({:?}: {}), attempt {} of {}; retrying in {:?}",
            status.code(),
            status.message(),
            self.made,
            self.policy.max_attempts,
            wait
        );
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, push: Option<&str>) -> ClientError {
        let mut s = tonic::Status::new(code, "no");
        if let Some(p) = push {
            s.metadata_mut().insert(PUSHBACK_KEY, p.parse().unwrap());
        }
        ClientError::Status(s)
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_only_shortens_it() {
        let p = RetryPolicy::default();
        let ms = |n| p.backoff(n).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(6), ms(7), ms(99)],
            [50, 100, 200, 1600, 2000, 2000]
        );
        assert_eq!(p.delay(2, 0.0), Duration::from_millis(100));
        assert_eq!(p.delay(2, 0.5), Duration::from_millis(90));
        let u = random_unit();
        assert!((0.0..1.0).contains(&u));
        assert!(RetryPolicy::default().validate().is_ok());
        let bad = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert!(bad.validate().is_err());
        assert_eq!(RetryPolicy::retries(3).max_attempts, 4);
    }

    #[test]
    fn refusals_are_retried_until_the_attempts_run_out() {
        let mut a = Attempts::new(&RetryPolicy::retries(2));
        let d1 = a
            .after(status(tonic::Code::Unavailable, None), "t")
            .unwrap();
        assert!(d1 <= Duration::from_millis(50) && d1 >= Duration::from_millis(40));
        a.after(status(tonic::Code::ResourceExhausted, None), "t")
            .unwrap();
        match a.after(status(tonic::Code::Unavailable, None), "t") {
            Err(ClientError::GaveUp { attempts: 3, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pushback_is_waited_exactly_and_a_negative_one_stops() {
        let mut a = Attempts::new(&RetryPolicy::default());
        let d = a
            .after(status(tonic::Code::ResourceExhausted, Some("1234")), "t")
            .unwrap();
        assert_eq!(d, Duration::from_millis(1234));
        for bad in ["-1", "soon"] {
            let mut a = Attempts::new(&RetryPolicy::default());
            let e = a
                .after(status(tonic::Code::ResourceExhausted, Some(bad)), "t")
                .unwrap_err();
            assert!(matches!(e, ClientError::GaveUp { attempts: 1, .. }), "{e}");
            assert!(e.to_string().contains("says not to"), "{e}");
        }
    }

    #[test]
    fn other_errors_are_returned_at_once() {
        let mut a = Attempts::new(&RetryPolicy::default());
        let e = a
            .after(status(tonic::Code::InvalidArgument, None), "t")
            .unwrap_err();
        assert!(matches!(e, ClientError::Status(_)), "{e}");
        let mut a = Attempts::new(&RetryPolicy::default());
        let e = a.after(ClientError::Protocol("x".into()), "t").unwrap_err();
        assert!(matches!(e, ClientError::Protocol(_)));
    }
}
