//! The node file's observability sections — `[telemetry]` (reports to the registry),
//! `[access_log]` and `[tracing]` — as written, and their validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::check::Checker;
use super::ser_duration;

/// How often a node reports its state and edge traffic to the registry (topology, SLOs,
/// `meshctl check`); the registry's answer may change it.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest report interval accepted (tests use short ones).
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);
/// Longest report interval accepted: an SLO's 5-minute burn window needs several reports.
pub const MAX_REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// Share of new traces sampled (requests arriving without a sampling decision).
pub const DEFAULT_TRACE_SAMPLING: f64 = 0.01;

/// `[telemetry]`, `[access_log]` and `[tracing]`, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetryConfig {
    /// `telemetry.report_interval`.
    #[serde(serialize_with = "ser_duration")]
    pub report_interval: Duration,
    /// `[access_log]`.
    pub access_log: AccessLogConfig,
    /// `[tracing]`.
    pub tracing: TracingConfig,
}

/// Which requests and connections get an access-log event. Reloadable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessLogConfig {
    /// Off: no events at all (metrics and traces are unaffected).
    pub enabled: bool,
    /// Only failures: HTTP statuses ≥ 400 and TCP connections that failed or were refused.
    pub errors_only: bool,
    /// HTTP paths never logged (exact match), e.g. a load balancer's health checks.
    pub exclude_paths: Vec<String>,
}

/// Where spans go and how many. Restart-only (the exporter is started with the node).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TracingConfig {
    /// OTLP/gRPC collector, `http://host:port`; none: spans are not exported (trace context is
    /// still propagated).
    pub collector: Option<String>,
    /// Share of new traces sampled, 0.0 to 1.0; requests that carry a decision keep it.
    pub sampling: f64,
}

// Eq for Config: sampling is checked to be a finite number, so equality is reflexive.
impl Eq for TelemetryConfig {}
impl Eq for TracingConfig {}

/// `[telemetry]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTelemetry {
    /// Duration such as `"10s"`.
    pub report_interval: String,
}

/// `[access_log]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAccessLog {
    /// Default true.
    pub enabled: bool,
    /// Default false.
    pub errors_only: bool,
    /// Paths starting with `/`.
    pub exclude_paths: Vec<String>,
}

/// `[tracing]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTracing {
    /// `http://host:port`.
    pub collector: Option<String>,
    /// 0.0 to 1.0.
    pub sampling: f64,
}

impl Eq for RawTracing {}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            report_interval: humantime::format_duration(DEFAULT_REPORT_INTERVAL).to_string(),
        }
    }
}

impl Default for RawAccessLog {
    fn default() -> Self {
        Self {
            enabled: true,
            errors_only: false,
            exclude_paths: Vec::new(),
        }
    }
}

impl Default for RawTracing {
    fn default() -> Self {
        Self {
            collector: None,
            sampling: DEFAULT_TRACE_SAMPLING,
        }
    }
}

/// Validates the three sections together, reporting every problem.
pub(super) fn check(
    c: &mut Checker<'_>,
    telemetry: RawTelemetry,
    access_log: RawAccessLog,
    tracing: RawTracing,
) -> Option<TelemetryConfig> {
    let key = "telemetry.report_interval";
    let report_interval = c.duration(key, &telemetry.report_interval).and_then(|d| {
        if (MIN_REPORT_INTERVAL..=MAX_REPORT_INTERVAL).contains(&d) {
            Some(d)
        } else {
            let message = format!(
                "{:?} is out of range: must be between {} and {}",
                telemetry.report_interval,
                humantime::format_duration(MIN_REPORT_INTERVAL),
                humantime::format_duration(MAX_REPORT_INTERVAL),
            );
            c.push(key, message);
            None
        }
    });
    let mut paths_ok = true;
    for (i, p) in access_log.exclude_paths.iter().enumerate() {
        if !p.starts_with('/') {
            c.push(
                format!("access_log.exclude_paths[{i}]"),
                format!("{p:?} is not a path: paths start with /, e.g. \"/healthz\""),
            );
            paths_ok = false;
        }
    }
    let collector = match tracing.collector {
        Some(uri) => match check_collector(&uri) {
            Ok(()) => Some(Some(uri)),
            Err(why) => {
                c.push("tracing.collector", why);
                None
            }
        },
        None => Some(None),
    };
    let sampling = if tracing.sampling.is_finite() && (0.0..=1.0).contains(&tracing.sampling) {
        Some(tracing.sampling)
    } else {
        c.push(
            "tracing.sampling",
            format!(
                "{} is out of range: a share between 0.0 (no new traces) and 1.0 (every request)",
                tracing.sampling
            ),
        );
        None
    };
    Some(TelemetryConfig {
        report_interval: report_interval?,
        access_log: paths_ok.then_some(AccessLogConfig {
            enabled: access_log.enabled,
            errors_only: access_log.errors_only,
            exclude_paths: access_log.exclude_paths,
        })?,
        tracing: TracingConfig {
            collector: collector?,
            sampling: sampling?,
        },
    })
}

/// An OTLP/gRPC collector address: `http://host:port` (TLS to the collector is not supported).
fn check_collector(uri: &str) -> Result<(), String> {
    let parsed: http::Uri = uri
        .parse()
        .map_err(|e| format!("{uri:?} is not a URI ({e}); expected http://host:4317"))?;
    match (parsed.scheme_str(), parsed.authority()) {
        (Some("http"), Some(a)) if a.port_u16().is_some() => {
            if parsed.path() != "/" && !parsed.path().is_empty() {
                return Err(format!(
                    "{uri:?} has a path; OTLP/gRPC collectors are named by http://host:port only"
                ));
            }
            Ok(())
        }
        (Some("https"), _) => Err(format!(
            "{uri:?}: TLS to the collector is not supported; run the collector (or an agent) on a trusted network and use http://host:port"
        )),
        _ => Err(format!(
            "{uri:?} must be http://host:port, e.g. http://127.0.0.1:4317"
        )),
    }
}

impl AccessLogConfig {
    /// Whether an HTTP request with this outcome gets an event.
    pub fn logs_request(&self, path: &str, status: u16) -> bool {
        self.enabled
            && (!self.errors_only || status >= 400)
            && !self.exclude_paths.iter().any(|p| p == path)
    }

    /// Whether a TCP connection with this outcome gets an event.
    pub fn logs_connection(&self, failed: bool) -> bool {
        self.enabled && (!self.errors_only || failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_filter() {
        let mut a = AccessLogConfig {
            enabled: true,
            errors_only: false,
            exclude_paths: vec!["/healthz".into()],
        };
        // (path, status, logged)
        let cases = [
            ("/", 200, true),
            ("/healthz", 200, false),
            ("/healthz", 503, false),
            ("/x", 503, true),
        ];
        for (path, status, want) in cases {
            assert_eq!(a.logs_request(path, status), want, "{path} {status}");
        }
        a.errors_only = true;
        assert!(!a.logs_request("/", 200));
        assert!(!a.logs_request("/", 399));
        assert!(a.logs_request("/", 400));
        assert!(a.logs_connection(true));
        assert!(!a.logs_connection(false));
        a.enabled = false;
        assert!(!a.logs_request("/", 500));
        assert!(!a.logs_connection(true));
    }

    #[test]
    fn collectors() {
        assert!(check_collector("http://127.0.0.1:4317").is_ok());
        assert!(check_collector("http://otel.internal:4317/").is_ok());
        for (bad, says) in [
            ("127.0.0.1:4317", "must be http://host:port"),
            ("http://127.0.0.1", "must be http://host:port"),
            ("https://otel:4317", "TLS to the collector is not supported"),
            ("http://otel:4317/v1/traces", "has a path"),
            ("http://", "not a URI"),
        ] {
            let e = check_collector(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
