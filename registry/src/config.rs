//! The registry's configuration file (`registry.toml`, written by `mesh-registry init`): parse,
//! defaults, validation into typed values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_api::TrustDomain;
use serde::{Deserialize, Serialize};

/// Where the registry serves its gRPC API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Where the registry serves `/live`, `/ready` and `/metrics` (loopback).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7701";
/// Lifetime of workload certificates (renewed by meshd at half-life).
pub const DEFAULT_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of node certificates; a host that stays off longer than this needs a new token.
pub const DEFAULT_NODE_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Lifetime of the registry's own serving certificate (renewed in-process at half-life).
pub const DEFAULT_SERVING_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Join token lifetime when `meshctl token create` gives none.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest join token lifetime accepted.
pub const DEFAULT_MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Time allowed for a TLS handshake before the connection is dropped.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace period for in-flight calls on shutdown.
pub const DEFAULT_DRAIN_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// How often nodes should report (answered to every `Report`; meshd adopts it).
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest `report_interval`: meshd accepts nothing shorter (tests use short ones).
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `report_interval`: meshd accepts nothing longer, and the 5-minute burn window
/// needs several reports.
pub const MAX_REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// How often every SLO is evaluated and its alert decided.
pub const DEFAULT_SLO_EVAL_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest `slo_eval_interval` (tests use short ones; each evaluation reads the store).
pub const MIN_SLO_EVAL_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `slo_eval_interval`: a fast burn must page within minutes.
pub const MAX_SLO_EVAL_INTERVAL: Duration = Duration::from_secs(300);

/// A configuration problem, naming the file and key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Syntax, unknown key or bad value.
    #[error("{}", .problems.join("\n"))]
    Invalid {
        /// One line per problem: `file: key: message`.
        problems: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    trust_domain: String,
    data_dir: String,
    listen: String,
    admin_listen: String,
    advertise: Vec<String>,
    workload_cert_ttl: String,
    node_cert_ttl: String,
    serving_cert_ttl: String,
    default_token_ttl: String,
    max_token_ttl: String,
    handshake_timeout: String,
    drain_grace_period: String,
    report_interval: String,
    slo_eval_interval: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        let h = |d: Duration| humantime::format_duration(d).to_string();
        Self {
            trust_domain: String::new(),
            data_dir: String::new(),
            listen: DEFAULT_LISTEN.to_owned(),
            admin_listen: DEFAULT_ADMIN_LISTEN.to_owned(),
            advertise: Vec::new(),
            workload_cert_ttl: h(DEFAULT_WORKLOAD_CERT_TTL),
            node_cert_ttl: h(DEFAULT_NODE_CERT_TTL),
            serving_cert_ttl: h(DEFAULT_SERVING_CERT_TTL),
            default_token_ttl: h(DEFAULT_TOKEN_TTL),
            max_token_ttl: h(DEFAULT_MAX_TOKEN_TTL),
            handshake_timeout: h(DEFAULT_HANDSHAKE_TIMEOUT),
            drain_grace_period: h(DEFAULT_DRAIN_GRACE_PERIOD),
            report_interval: h(DEFAULT_REPORT_INTERVAL),
            slo_eval_interval: h(DEFAULT_SLO_EVAL_INTERVAL),
        }
    }
}

/// The validated registry configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Trust domain of the mesh (fixed at init).
    pub trust_domain: TrustDomain,
    /// Holds `ca/`, `admin/` and the sled `store/`.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Admin HTTP listen address (`/live`, `/ready`, `/metrics`).
    pub admin_listen: SocketAddr,
    /// Addresses written into join tokens (what hosts dial); defaults to `listen`.
    pub advertise: Vec<String>,
    /// Workload certificate lifetime.
    #[serde(with = "humantime_serde_compat")]
    pub workload_cert_ttl: Duration,
    /// Node certificate lifetime.
    #[serde(with = "humantime_serde_compat")]
    pub node_cert_ttl: Duration,
    /// Serving certificate lifetime.
    #[serde(with = "humantime_serde_compat")]
    pub serving_cert_ttl: Duration,
    /// Default join token lifetime.
    #[serde(with = "humantime_serde_compat")]
    pub default_token_ttl: Duration,
    /// Longest join token lifetime.
    #[serde(with = "humantime_serde_compat")]
    pub max_token_ttl: Duration,
    /// TLS handshake timeout.
    #[serde(with = "humantime_serde_compat")]
    pub handshake_timeout: Duration,
    /// Drain grace period.
    #[serde(with = "humantime_serde_compat")]
    pub drain_grace_period: Duration,
    /// How often nodes should report.
    #[serde(with = "humantime_serde_compat")]
    pub report_interval: Duration,
    /// How often SLOs are evaluated.
    #[serde(with = "humantime_serde_compat")]
    pub slo_eval_interval: Duration,
}

mod humantime_serde_compat {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

impl Config {
    /// Parses and validates `text`; `path` names the file in messages and anchors a relative
    /// `data_dir`.
    pub fn from_toml_str(path: &Path, text: &str) -> Result<Self, Error> {
        let file = path.display();
        let raw: RawConfig = toml::from_str(text).map_err(|e| Error::Invalid {
            problems: vec![format!("{file}: {}", e.message().trim())],
        })?;
        let mut problems = Vec::new();
        let trust_domain = match TrustDomain::new(&raw.trust_domain) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(format!("{file}: trust_domain: {e}"));
                None
            }
        };
        if raw.data_dir.is_empty() {
            problems.push(format!(
                "{file}: data_dir: required (the directory `mesh-registry init` created)"
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let data_dir = base.join(&raw.data_dir);
        let listen = raw
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| {
                problems.push(format!(
                    "{file}: listen: {:?} is not ip:port ({e})",
                    raw.listen
                ))
            })
            .ok();
        let admin_listen = raw
            .admin_listen
            .parse::<SocketAddr>()
            .map_err(|e| {
                problems.push(format!(
                    "{file}: admin_listen: {:?} is not ip:port ({e})",
                    raw.admin_listen
                ))
            })
            .ok();
        for (i, a) in raw.advertise.iter().enumerate() {
            if !valid_host_port(a) {
                problems.push(format!("{file}: advertise[{i}]: {a:?} is not host:port"));
            }
        }
        let mut dur = |key: &str, v: &str| -> Duration {
            match humantime::parse_duration(v) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    problems.push(format!("{file}: {key}: must be greater than zero"));
                    Duration::ZERO
                }
                Err(e) => {
                    problems.push(format!(
                        "{file}: {key}: {v:?} is not a duration like \"24h\" ({e})"
                    ));
                    Duration::ZERO
                }
            }
        };
        let workload_cert_ttl = dur("workload_cert_ttl", &raw.workload_cert_ttl);
        let node_cert_ttl = dur("node_cert_ttl", &raw.node_cert_ttl);
        let serving_cert_ttl = dur("serving_cert_ttl", &raw.serving_cert_ttl);
        let default_token_ttl = dur("default_token_ttl", &raw.default_token_ttl);
        let max_token_ttl = dur("max_token_ttl", &raw.max_token_ttl);
        let handshake_timeout = dur("handshake_timeout", &raw.handshake_timeout);
        let drain_grace_period = dur("drain_grace_period", &raw.drain_grace_period);
        let report_interval = dur("report_interval", &raw.report_interval);
        let slo_eval_interval = dur("slo_eval_interval", &raw.slo_eval_interval);
        for (key, value, min, max) in [
            (
                "report_interval",
                report_interval,
                MIN_REPORT_INTERVAL,
                MAX_REPORT_INTERVAL,
            ),
            (
                "slo_eval_interval",
                slo_eval_interval,
                MIN_SLO_EVAL_INTERVAL,
                MAX_SLO_EVAL_INTERVAL,
            ),
        ] {
            // Zero and unparsable values were reported above.
            if !value.is_zero() && !(min..=max).contains(&value) {
                problems.push(format!(
                    "{file}: {key}: {} is out of range; expected {} to {}",
                    humantime::format_duration(value),
                    humantime::format_duration(min),
                    humantime::format_duration(max),
                ));
            }
        }
        if default_token_ttl > max_token_ttl {
            problems.push(format!(
                "{file}: default_token_ttl: longer than max_token_ttl"
            ));
        }
        match (trust_domain, listen, admin_listen, problems.is_empty()) {
            (Some(trust_domain), Some(listen), Some(admin_listen), true) => Ok(Self {
                admin_listen,
                trust_domain,
                data_dir,
                advertise: if raw.advertise.is_empty() {
                    vec![listen.to_string()]
                } else {
                    raw.advertise
                },
                listen,
                workload_cert_ttl,
                node_cert_ttl,
                serving_cert_ttl,
                default_token_ttl,
                max_token_ttl,
                handshake_timeout,
                drain_grace_period,
                report_interval,
                slo_eval_interval,
            }),
            _ => Err(Error::Invalid { problems }),
        }
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(path, &text)
    }

    /// The config file `init` writes.
    pub fn render(
        trust_domain: &TrustDomain,
        data_dir: &Path,
        listen: SocketAddr,
        admin_listen: SocketAddr,
    ) -> String {
        format!(
            "# mesh-registry configuration, written by `mesh-registry init`.\n\
             trust_domain = \"{trust_domain}\"\n\
             data_dir = \"{}\"\n\
             listen = \"{listen}\"\n\
             admin_listen = \"{admin_listen}\"\n\
             # Addresses written into join tokens (what hosts dial); defaults to listen.\n\
             # advertise = [\"10.0.0.1:7700\"]\n\
             workload_cert_ttl = \"{}\"\n\
             node_cert_ttl = \"{}\"\n",
            data_dir.display(),
            humantime::format_duration(DEFAULT_WORKLOAD_CERT_TTL),
            humantime::format_duration(DEFAULT_NODE_CERT_TTL),
        )
    }
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_config_parses() {
        let td = TrustDomain::new("mesh.internal").unwrap();
        let text = Config::render(
            &td,
            Path::new("/var/lib/mesh-registry"),
            DEFAULT_LISTEN.parse().unwrap(),
            DEFAULT_ADMIN_LISTEN.parse().unwrap(),
        );
        let c = Config::from_toml_str(Path::new("/etc/mesh/registry.toml"), &text).unwrap();
        assert_eq!(c.trust_domain, td);
        assert_eq!(c.workload_cert_ttl, DEFAULT_WORKLOAD_CERT_TTL);
        assert_eq!(c.advertise, vec![DEFAULT_LISTEN.to_owned()]);
        assert_eq!(c.report_interval, DEFAULT_REPORT_INTERVAL);
        assert_eq!(c.slo_eval_interval, DEFAULT_SLO_EVAL_INTERVAL);
    }

    #[test]
    fn observability_intervals() {
        let base = "trust_domain = \"mesh.test\"\ndata_dir = \"d\"\n";
        let parse =
            |extra: &str| Config::from_toml_str(Path::new("r.toml"), &format!("{base}{extra}"));
        let c = parse("report_interval = \"500ms\"\nslo_eval_interval = \"1s\"\n").unwrap();
        assert_eq!(c.report_interval, Duration::from_millis(500));
        assert_eq!(c.slo_eval_interval, Duration::from_secs(1));
        for (extra, want) in [
            (
                "report_interval = \"10ms\"",
                "r.toml: report_interval: 10ms is out of range; expected 100ms to 1m",
            ),
            (
                "report_interval = \"2m\"",
                "r.toml: report_interval: 2m is out of range",
            ),
            (
                "slo_eval_interval = \"0s\"",
                "r.toml: slo_eval_interval: must be greater than zero",
            ),
            (
                "slo_eval_interval = \"1h\"",
                "r.toml: slo_eval_interval: 1h is out of range; expected 100ms to 5m",
            ),
            (
                "slo_eval_interval = \"often\"",
                "r.toml: slo_eval_interval: \"often\" is not a duration",
            ),
        ] {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.contains(want), "{extra}: {err}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_file_and_key() {
        let text = "trust_domain = \"Bad\"\nlisten = \"nope\"\nworkload_cert_ttl = \"soon\"\nadvertise = [\"x\"]\n";
        let err = Config::from_toml_str(Path::new("r.toml"), text)
            .unwrap_err()
            .to_string();
        for want in [
            "r.toml: trust_domain",
            "r.toml: listen",
            "r.toml: workload_cert_ttl",
            "r.toml: data_dir",
            "r.toml: advertise[0]",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
        let err = Config::from_toml_str(Path::new("r.toml"), "trust_domian = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown field") && err.contains("trust_domian"),
            "{err}"
        );
    }
}
