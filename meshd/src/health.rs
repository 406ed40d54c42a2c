//! Health checks of local services (HTTP, TCP, gRPC health protocol, command) and the thresholds that turn results into a health state.
//!
//! A service file declares its checks (`[[checks]]`, validated by `config` into [`Check`]).
//! [`spawn`] runs them in the background and publishes a [`ServiceHealth`] snapshot on a
//! `watch`; the decision itself (thresholds, start state) is the pure [`Tracker`], and
//! [`probe`] runs one check once.
//!
//! A service with checks starts unhealthy and turns healthy on its first passing run, like a
//! Kubernetes readiness probe, so a new instance takes traffic as soon as it answers; after
//! that, `unhealthy_threshold` consecutive failures take it out and `healthy_threshold`
//! consecutive successes bring it back. A service without checks is always healthy.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use mesh_api::name::ServiceKey;
use serde::{Serialize, Serializer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info, info_span, warn};

mod probe;
#[cfg(test)]
mod tests;
mod tracker;

pub use probe::{Error, decode_check_response, grpc_status, probe};
pub use tracker::{Tracker, Update};

/// Largest part of the interval taken off a wait between runs, as a fraction, so services
/// started together do not check in lockstep. Waits only get shorter, so a failure is still
/// noticed within `interval * unhealthy_threshold`.
pub const MAX_JITTER: f64 = 0.1;

/// One health check of a local service, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Unique within the service; defaults to the kind (`http`, `tcp`, `grpc`, `command`).
    pub name: String,
    /// What to run.
    pub kind: CheckKind,
    /// Time from the start of one run to the start of the next (less a random jitter).
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Time one run may take before it counts as failed; shorter than `interval`.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Consecutive failures that turn a healthy check unhealthy.
    pub unhealthy_threshold: NonZeroU32,
    /// Consecutive successes that turn an unhealthy check healthy again.
    pub healthy_threshold: NonZeroU32,
}

/// What a check runs, with every address resolved against the service's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// `GET url` over HTTP/1.1 on a new connection; passes if the status is in `expect_status`.
    Http {
        /// Absolute `http://host:port/path` URL.
        #[serde(serialize_with = "ser_display")]
        url: http::Uri,
        /// Status codes that pass.
        expect_status: StatusRange,
    },
    /// A TCP connect; passes if the connection is established.
    Tcp {
        /// `host:port`, host an IP address or a DNS name.
        address: String,
    },
    /// `grpc.health.v1.Health/Check` over HTTP/2 without TLS; passes if the answer is SERVING.
    Grpc {
        /// The gRPC server.
        address: std::net::SocketAddr,
        /// Service asked about; empty means the server as a whole.
        service: String,
    },
    /// A program; passes if it exits with status 0. Killed when the timeout expires.
    Command {
        /// Program and arguments; not empty.
        argv: Vec<String>,
    },
}

/// An inclusive range of HTTP status codes, written `"200"` or `"200-399"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusRange {
    min: u16,
    max: u16,
}

/// Why a status range did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadStatusRange {
    /// A bound is not a number.
    #[error("{0:?} is not a number; write a code such as \"200\" or a range such as \"200-399\"")]
    NotANumber(String),
    /// A bound is outside 100..=599.
    #[error("{0} is not an HTTP status code (100 to 599)")]
    NotAStatus(u32),
    /// The range is empty.
    #[error("{min} is greater than {max}; write the lower code first")]
    Reversed {
        /// First code written.
        min: u16,
        /// Second code written.
        max: u16,
    },
}

/// The health of one service as last decided, for the proxy and the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceHealth {
    /// The service checked.
    #[serde(serialize_with = "ser_display")]
    pub service: ServiceKey,
    /// True iff every check is healthy (so always true without checks).
    pub healthy: bool,
    /// One entry per check, in declaration order.
    pub checks: Vec<CheckStatus>,
}

/// The state of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckStatus {
    /// The check's name.
    pub name: String,
    /// Where the check is in its life cycle.
    pub state: State,
    /// `state == State::Healthy`, spelled out for readers of the admin endpoint.
    pub healthy: bool,
    /// What the last run found ("status 200", "connection refused ..."); `None` before it ran.
    pub reason: Option<String>,
    /// Passing runs in a row, up to and including the last.
    pub consecutive_successes: u32,
    /// Failing runs in a row, up to and including the last.
    pub consecutive_failures: u32,
    /// When the last run ended; `None` before it ran.
    #[serde(serialize_with = "ser_time")]
    pub last_checked: Option<SystemTime>,
}

/// Life cycle of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Has not passed yet: unhealthy, and one pass makes it healthy.
    Starting,
    /// Passing, or failing fewer than `unhealthy_threshold` times in a row.
    Healthy,
    /// Failed `unhealthy_threshold` times in a row and has not yet passed
    /// `healthy_threshold` times in a row.
    Unhealthy,
}

/// The result of one run of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the run passed.
    pub passed: bool,
    /// What it found, for people: the status, the error, the first line of stderr.
    pub reason: String,
}

// === impl CheckKind ===

impl CheckKind {
    /// `http`, `tcp`, `grpc` or `command`: the key that declares this kind in a service file,
    /// and the check's name unless it has one.
    pub fn as_str(&self) -> &'static str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Grpc { .. } => "grpc",
            CheckKind::Command { .. } => "command",
        }
    }
}

// === impl StatusRange ===

impl StatusRange {
    /// `min..=max`, if both are HTTP status codes (100 to 599) and `min <= max`.
    pub const fn new(min: u16, max: u16) -> Option<StatusRange> {
        if min < 100 || max > 599 || min > max {
            return None;
        }
        Some(StatusRange { min, max })
    }

    /// Whether `status` is in the range.
    pub fn contains(self, status: u16) -> bool {
        (self.min..=self.max).contains(&status)
    }
}

impl FromStr for StatusRange {
    type Err = BadStatusRange;

    fn from_str(s: &str) -> Result<Self, BadStatusRange> {
        fn code(s: &str) -> Result<u16, BadStatusRange> {
            let n: u32 =
                (s.trim().parse()).map_err(|_| BadStatusRange::NotANumber(s.to_owned()))?;
            match u16::try_from(n) {
                Ok(n) if (100..=599).contains(&n) => Ok(n),
                _ => Err(BadStatusRange::NotAStatus(n)),
            }
        }
        let (min, max) = match s.split_once('-') {
            Some((min, max)) => (code(min)?, code(max)?),
            None => {
                let n = code(s)?;
                (n, n)
            }
        };
        StatusRange::new(min, max).ok_or(BadStatusRange::Reversed { min, max })
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

impl Serialize for StatusRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// === impl Outcome ===

impl Outcome {
    /// A passing run.
    pub fn pass(reason: impl Into<String>) -> Outcome {
        Outcome {
            passed: true,
            reason: reason.into(),
        }
    }

    /// A failing run.
    pub fn fail(reason: impl Into<String>) -> Outcome {
        Outcome {
            passed: false,
            reason: reason.into(),
        }
    }
}

impl From<Result<String, Error>> for Outcome {
    fn from(result: Result<String, Error>) -> Outcome {
        match result {
            Ok(reason) => Outcome::pass(reason),
            Err(e) => Outcome::fail(probe::error_chain(&e)),
        }
    }
}

/// Runs `checks` for `service` in the background until `shutdown_rx` turns true (or its sender
/// is dropped) and returns the service's health. The first run of each check starts at once.
///
/// The receiver is notified only when something a reader acts on changes: a check or the
/// service turns healthy or unhealthy, or a check's reason changes. Counters and times are
/// updated in place without a notification, so `borrow()` always shows the latest.
///
/// The sender is dropped when checking stops (so `changed()` then returns an error and the
/// last snapshot stays readable): at shutdown, where running checks are abandoned and a running
/// command is killed, and at once for a service without checks, whose health never changes.
/// Must be called within a Tokio runtime.
pub fn spawn(
    service: ServiceKey,
    checks: Vec<Check>,
    shutdown_rx: watch::Receiver<bool>,
) -> watch::Receiver<ServiceHealth> {
    let tracker = Tracker::new(service.clone(), &checks);
    let (health_tx, health_rx) = watch::channel(tracker.health().clone());
    if checks.is_empty() {
        return health_rx;
    }
    // Fire-and-forget: the task ends on shutdown and owns nothing that needs a flush; callers
    // that want to wait for it wait for `health_rx.changed()` to fail.
    let span = info_span!("health", service = %service);
    tokio::spawn(run(tracker, checks, health_tx, shutdown_rx).instrument(span));
    health_rx
}

/// The wait between the starts of two runs: `interval` shortened by `r * MAX_JITTER` of
/// itself, for `r` in `0.0..1.0` (out-of-range values are clamped).
pub fn next_delay(interval: Duration, r: f64) -> Duration {
    interval.mul_f64(1.0 - MAX_JITTER * r.clamp(0.0, 1.0))
}

/// Owns the tracker and the sender; one probe task per check feeds it results.
async fn run(
    mut tracker: Tracker,
    checks: Vec<Check>,
    health_tx: watch::Sender<ServiceHealth>,
    mut shutdown_rx: watch::Receiver<bool>,
) {
    let (result_tx, mut result_rx) = mpsc::channel(checks.len());
    // Dropping the set (when this task ends) aborts the probe tasks; a command they run is
    // killed because it was spawned with `kill_on_drop`.
    let mut probes = JoinSet::new();
    for (index, check) in checks.into_iter().enumerate() {
        let span = info_span!("check", check = %check.name);
        probes.spawn(probe_loop(index, check, result_tx.clone()).instrument(span));
    }
    drop(result_tx);

    let shutdown = async move {
        // An error means the sender is gone, which is as final as `true`.
        let _ = shutdown_rx.wait_for(|stop| *stop).await;
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            result = result_rx.recv() => {
                let Some((index, outcome, at)) = result else { break };
                let update = tracker.record(index, outcome, at);
                log_update(&tracker, index, &update);
                health_tx.send_if_modified(|health| {
                    health.clone_from(tracker.health());
                    update.is_notable()
                });
            }
        }
    }
    debug!("health checks stopped");
}

/// Runs one check every interval, forever; ends when the receiver is gone.
async fn probe_loop(
    index: usize,
    check: Check,
    result_tx: mpsc::Sender<(usize, Outcome, SystemTime)>,
) {
    loop {
        let started = Instant::now();
        let outcome = Outcome::from(probe(&check).await);
        if result_tx
            .send((index, outcome, SystemTime::now()))
            .await
            .is_err()
        {
            return;
        }
        let delay = next_delay(check.interval, rand::random::<f64>());
        tokio::time::sleep_until(started + delay).await;
    }
}

fn log_update(tracker: &Tracker, index: usize, update: &Update) {
    let health = tracker.health();
    let Some(status) = health.checks.get(index) else {
        return;
    };
    let check = status.name.as_str();
    let reason = status.reason.as_deref().unwrap_or_default();
    match update.check {
        Some((State::Starting, State::Healthy)) => info!(check, reason, "health check passed"),
        Some((_, State::Healthy)) => info!(check, reason, "health check recovered"),
        Some((_, State::Unhealthy)) => warn!(
            check,
            reason,
            failures = status.consecutive_failures,
            "health check failing"
        ),
        // Seen once per distinct reason, so a service that never comes up says why at info.
        _ if update.reason_changed && status.state == State::Starting => {
            info!(check, reason, "health check not passing yet");
        }
        _ if update.reason_changed => debug!(check, reason, "health check reason changed"),
        _ => {}
    }
    match update.service {
        Some(true) => info!("service healthy"),
        Some(false) => warn!(check, reason, "service unhealthy"),
        None => {}
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn ser_display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_time<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(&humantime::format_rfc3339_millis(*t)),
        None => s.serialize_none(),
    }
}
