//! Retries of HTTP requests, all decisions pure: how an attempt ended, whether a Route's retry
//! policy retries it, the retry budget (a share of the requests of a sliding window, per
//! destination) and the backoff between attempts.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use mesh_api::policy::{Retries, RetryOn};
use tokio::time::Instant;

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// No connection to any endpoint could be made.
    ConnectFailure,
    /// The stream or connection failed before a response (or the per-try timeout passed).
    Reset,
    /// A response with this status.
    Status(u16),
    /// A gRPC call that failed before any message: `grpc-status` (not 0) in the response
    /// headers of a trailers-only response.
    Grpc(u32),
}

/// How a response ended an attempt: a trailers-only gRPC failure (`grpc-status` already in the
/// headers) is [`Attempt::Grpc`]; anything else is its HTTP status. A `grpc-status` that only
/// arrives in trailers comes after messages were streamed to the app, too late to retry.
pub fn response_attempt(status: u16, headers: &http::HeaderMap) -> Attempt {
    match (headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        Some(code) if code != 0 => Attempt::Grpc(code),
        _ => Attempt::Status(status),
    }
}

/// Whether `attempt` is retried under `retries` (budget and attempt count aside).
pub fn is_retriable(retries: &Retries, attempt: Attempt) -> bool {
    retries.retry_on.iter().any(|on| match (on, attempt) {
        (RetryOn::ConnectFailure, Attempt::ConnectFailure) => true,
        (RetryOn::Reset, Attempt::Reset) => true,
        (RetryOn::Status5xx, Attempt::Status(s)) => (500..600).contains(&s),
        // Envoy's gateway-error: 502, 503, 504 — and failures to connect.
        (RetryOn::GatewayError, Attempt::Status(s)) => matches!(s, 502..=504),
        (RetryOn::GatewayError, Attempt::ConnectFailure) => true,
        (RetryOn::RetriableStatusCodes, Attempt::Status(s)) => {
            retries.retriable_status_codes.contains(&s)
        }
        // gRPC status codes (grpc/doc/statuscodes.md).
        (RetryOn::GrpcCancelled, Attempt::Grpc(1)) => true,
        (RetryOn::GrpcDeadlineExceeded, Attempt::Grpc(4)) => true,
        (RetryOn::GrpcResourceExhausted, Attempt::Grpc(8)) => true,
        (RetryOn::GrpcInternal, Attempt::Grpc(13)) => true,
        (RetryOn::GrpcUnavailable, Attempt::Grpc(14)) => true,
        _ => false,
    })
}

/// Retries always allowed per budget window, so a quiet service can still retry (Linkerd's
/// `minRetriesPerSecond`, over the window).
pub const MIN_RETRIES_PER_WINDOW: u64 = 10;

/// Whether one more retry fits the budget: retries may be at most `percent`% of the requests
/// of the window, plus [`MIN_RETRIES_PER_WINDOW`]. Keeps retries from multiplying an outage.
pub fn retry_fits_budget(requests: u64, retries: u64, percent: u32) -> bool {
    let allowed = requests.saturating_mul(u64::from(percent)) / 100 + MIN_RETRIES_PER_WINDOW;
    retries < allowed
}

/// First retry backoff; doubles per retry up to [`RETRY_BACKOFF_MAX`] (Envoy's defaults).
pub const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Longest retry backoff.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Backoff before retry number `n` (1-based), with full jitter: `jitter` uniform in `0..1`
/// scales the exponential ceiling, so synchronized callers spread out.
pub fn backoff(n: u32, jitter: f64) -> Duration {
    let ceiling = RETRY_BACKOFF_BASE
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(RETRY_BACKOFF_MAX);
    ceiling.mul_f64(jitter.clamp(0.0, 1.0))
}

/// Length of a retry-budget window.
pub const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Requests and retries to one destination in the current and previous budget windows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Window {
    start: Option<Instant>,
    requests: u64,
    retries: u64,
    prev_requests: u64,
    prev_retries: u64,
}

impl Window {
    /// Moves the window to `now`: the current window becomes the previous one after
    /// [`RETRY_BUDGET_WINDOW`]; after two, both start empty.
    fn roll(&mut self, now: Instant) {
        match self.start {
            Some(s) if now.duration_since(s) < RETRY_BUDGET_WINDOW => {}
            Some(s) if now.duration_since(s) < 2 * RETRY_BUDGET_WINDOW => {
                self.prev_requests = std::mem::take(&mut self.requests);
                self.prev_retries = std::mem::take(&mut self.retries);
                self.start = Some(s + RETRY_BUDGET_WINDOW);
            }
            _ => {
                *self = Window {
                    start: Some(now),
                    ..Window::default()
                }
            }
        }
    }
}

/// The retry budget of one destination (its own lock: requests to other destinations never
/// wait on it).
#[derive(Debug, Default)]
pub struct Budget {
    window: Mutex<Window>,
}

impl Budget {
    /// Counts a request that may be retried.
    pub fn request(&self, now: Instant) {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        w.roll(now);
        w.requests += 1;
    }

    /// Takes one retry if it fits `percent`% of the requests of the last two windows (see
    /// [`retry_fits_budget`]).
    pub fn retry(&self, percent: u32, now: Instant) -> bool {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        w.roll(now);
        let fits = retry_fits_budget(
            w.requests + w.prev_requests,
            w.retries + w.prev_retries,
            percent,
        );
        if fits {
            w.retries += 1;
        }
        fits
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn responses_become_attempt_outcomes() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, http::HeaderValue::from_static(v));
            }
            m
        };
        use Attempt::*;
        #[rustfmt::skip]
        let cases: &[(u16, http::HeaderMap, Attempt)] = &[
            (200, h(&[]), Status(200)),
            (503, h(&[]), Status(503)),
            (200, h(&[("grpc-status", "14")]), Grpc(14)),
            (200, h(&[("grpc-status", "0")]), Status(200)),
            (200, h(&[("grpc-status", "bogus")]), Status(200)),
            (503, h(&[("grpc-status", "14")]), Grpc(14)),
        ];
        for (status, headers, want) in cases {
            assert_eq!(
                response_attempt(*status, headers),
                *want,
                "{status} {headers:?}"
            );
        }
    }

    #[test]
    fn retry_conditions() {
        let r = |on: &[RetryOn], codes: &[u16]| Retries {
            attempts: 2,
            per_try_timeout: None,
            retry_on: on.to_vec(),
            retriable_status_codes: codes.to_vec(),
            budget_percent: 20,
        };
        use Attempt::*;
        #[rustfmt::skip]
        let cases: &[(Retries, Attempt, bool)] = &[
            (r(&[RetryOn::ConnectFailure], &[]), ConnectFailure, true),
            (r(&[RetryOn::ConnectFailure], &[]), Reset, false),
            (r(&[RetryOn::Reset], &[]), Reset, true),
            (r(&[RetryOn::Status5xx], &[]), Status(500), true),
            (r(&[RetryOn::Status5xx], &[]), Status(599), true),
            (r(&[RetryOn::Status5xx], &[]), Status(429), false),
            (r(&[RetryOn::Status5xx], &[]), Reset, false),
            (r(&[RetryOn::GatewayError], &[]), Status(503), true),
            (r(&[RetryOn::GatewayError], &[]), Status(500), false),
            (r(&[RetryOn::GatewayError], &[]), ConnectFailure, true),
            (r(&[RetryOn::RetriableStatusCodes], &[409]), Status(409), true),
            (r(&[RetryOn::RetriableStatusCodes], &[409]), Status(503), false),
            (r(&[], &[]), ConnectFailure, false),
            (r(&[RetryOn::GrpcUnavailable], &[]), Grpc(14), true),
            (r(&[RetryOn::GrpcUnavailable], &[]), Grpc(13), false),
            (r(&[RetryOn::GrpcUnavailable], &[]), Status(503), false),
            (r(&[RetryOn::GrpcCancelled], &[]), Grpc(1), true),
            (r(&[RetryOn::GrpcDeadlineExceeded], &[]), Grpc(4), true),
            (r(&[RetryOn::GrpcResourceExhausted], &[]), Grpc(8), true),
            (r(&[RetryOn::GrpcInternal], &[]), Grpc(13), true),
            // A failed gRPC call is not an HTTP 5xx.
            (r(&[RetryOn::Status5xx], &[]), Grpc(14), false),
        ];
        for (i, (retries, attempt, want)) in cases.iter().enumerate() {
            assert_eq!(
                is_retriable(retries, *attempt),
                *want,
                "case {i}: {attempt:?}"
            );
        }
    }

    #[test]
    fn budget_and_backoff() {
        assert!(retry_fits_budget(0, 0, 20), "a quiet service may retry");
        assert!(retry_fits_budget(0, 9, 20));
        assert!(!retry_fits_budget(0, 10, 20));
        assert!(retry_fits_budget(1000, 209, 20));
        assert!(
            !retry_fits_budget(1000, 210, 20),
            "20% of 1000 plus the minimum"
        );
        assert_eq!(backoff(1, 1.0), Duration::from_millis(25));
        assert_eq!(backoff(2, 1.0), Duration::from_millis(50));
        assert_eq!(backoff(4, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(5, 1.0), Duration::from_millis(250), "capped");
        assert_eq!(backoff(40, 1.0), Duration::from_millis(250), "no overflow");
        assert_eq!(backoff(3, 0.5), Duration::from_millis(50));
        assert_eq!(backoff(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn the_budget_counts_two_windows_then_forgets() {
        let b = Budget::default();
        let t0 = Instant::now();
        for _ in 0..100 {
            b.request(t0);
        }
        // 20% of 100 plus the minimum of 10.
        let granted = (0..40).filter(|_| b.retry(20, t0)).count();
        assert_eq!(granted, 30);
        // In the next window the previous one still counts: nothing more fits.
        let t1 = t0 + RETRY_BUDGET_WINDOW;
        assert!(!b.retry(20, t1));
        // Two windows on, both are forgotten: the minimum is available again.
        let t2 = t0 + 3 * RETRY_BUDGET_WINDOW;
        let granted = (0..40).filter(|_| b.retry(20, t2)).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn windows_roll_at_their_length() {
        let t0 = Instant::now();
        let mut w = Window::default();
        w.roll(t0);
        w.requests = 5;
        w.retries = 1;
        w.roll(t0 + RETRY_BUDGET_WINDOW - Duration::from_nanos(1));
        assert_eq!(
            (w.requests, w.prev_requests),
            (5, 0),
            "still the same window"
        );
        w.roll(t0 + RETRY_BUDGET_WINDOW);
        assert_eq!((w.requests, w.prev_requests, w.prev_retries), (0, 5, 1));
        assert_eq!(w.start, Some(t0 + RETRY_BUDGET_WINDOW));
        w.requests = 7;
        w.roll(t0 + 3 * RETRY_BUDGET_WINDOW - Duration::from_nanos(1));
        assert_eq!((w.requests, w.prev_requests), (0, 7));
        w.roll(t0 + 5 * RETRY_BUDGET_WINDOW);
        assert_eq!((w.requests, w.prev_requests), (0, 0), "both forgotten");
        assert_eq!(w.start, Some(t0 + 5 * RETRY_BUDGET_WINDOW));
    }
}
