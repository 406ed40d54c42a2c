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
/// Most open gRPC connections, TLS handshakes in progress included; more are closed at accept.
/// meshd holds one connection per host; stays well under the unit's `LimitNOFILE=65536`.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
/// Most open connections from one source (an IPv4 address or an IPv6 /64), handshakes in
/// progress included. A host needs one for meshd plus one per running `meshctl`.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u64 = 32;
/// Most open connections whose client presented no certificate (hosts joining with a token);
/// an attacker without credentials can hold no more than this many after the handshake.
pub const DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS: u64 = 256;
/// Most concurrent HTTP/2 streams (calls) per connection; a meshd uses two watches and a few
/// unary calls. Streams beyond it are refused (`REFUSED_STREAM`).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u64 = 32;
/// Longest a unary call may take from its request headers to its response; for the watch
/// streams it bounds only the time until the stream opens. Longer than meshd's own 10 s
/// `registry.request_timeout`, so a well-behaved client's deadline fires first.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a connection may stay silent before the registry pings it (HTTP/2 PING).
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed as dead.
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request message accepted per call, in bytes (tonic's own default, now explicit).
pub const DEFAULT_MAX_REQUEST_MESSAGE_SIZE: u64 = 4 * 1024 * 1024;
/// Largest response message sent per call, in bytes: what meshd and meshctl accept (tonic's
/// client default), so the registry fails the call with a clear status instead of the client.
pub const DEFAULT_MAX_RESPONSE_MESSAGE_SIZE: u64 = 4 * 1024 * 1024;
/// Smallest message size limit accepted (a CSR or a certificate chain must fit).
pub const MIN_MESSAGE_SIZE: u64 = 64 * 1024;
/// Largest message size limit accepted.
pub const MAX_MESSAGE_SIZE: u64 = 256 * 1024 * 1024;
/// Most streams a client may reset before the registry accepted them, per connection, before
/// the connection is closed with `GOAWAY(ENHANCE_YOUR_CALM)`: HTTP/2 rapid reset
/// (CVE-2023-44487). h2's default, now explicit.
pub const DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: u64 = 20;
/// Most streams the registry may reset because the client misbehaved on them, per connection,
/// before the connection is closed with `GOAWAY(ENHANCE_YOUR_CALM)` ("MadeYouReset",
/// CVE-2025-8671). hyper's default, now explicit.
pub const DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: u64 = 1024;
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
    max_connections: u64,
    max_connections_per_ip: u64,
    max_unauthenticated_connections: u64,
    max_concurrent_streams: u64,
    request_timeout: String,
    http2_keepalive_interval: String,
    http2_keepalive_timeout: String,
    max_request_message_size: u64,
    max_response_message_size: u64,
    http2_max_pending_accept_reset_streams: u64,
    http2_max_local_error_reset_streams: u64,
    follow: Option<RawFollow>,
    peers: Vec<RawPeer>,
}

/// `[[peers]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    site: Option<String>,
    address: Option<String>,
    credentials: Option<String>,
}

/// `[[peers]]`: another site's registry whose revocations this site enforces (and whose site
/// the topology keeps edges to).
#[derive(Debug, Clone, Serialize)]
pub struct PeerConfig {
    /// That site's name (a label): its revocations are stored as `Revocation/mesh-system/site-<site>`.
    pub site: mesh_api::Label,
    /// Its registry, `host:port`.
    pub address: String,
    /// Read-only credentials of this mesh (default: this registry's own `viewer/`).
    pub credentials: PathBuf,
}

/// `[follow]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFollow {
    primary: Option<String>,
    credentials: Option<String>,
}

/// `[follow]`: this registry is a secondary site's, and takes its policy from the primary's.
#[derive(Debug, Clone, Serialize)]
pub struct FollowConfig {
    /// The primary registry, `host:port`.
    pub primary: String,
    /// Credentials the primary issued for this registry (a viewer's: `admin.pem`,
    /// `admin-key.pem`, `ca.pem`), e.g. `meshctl credentials create --role viewer site-b`.
    pub credentials: PathBuf,
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
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_unauthenticated_connections: DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            request_timeout: h(DEFAULT_REQUEST_TIMEOUT),
            http2_keepalive_interval: h(DEFAULT_HTTP2_KEEPALIVE_INTERVAL),
            http2_keepalive_timeout: h(DEFAULT_HTTP2_KEEPALIVE_TIMEOUT),
            max_request_message_size: DEFAULT_MAX_REQUEST_MESSAGE_SIZE,
            max_response_message_size: DEFAULT_MAX_RESPONSE_MESSAGE_SIZE,
            http2_max_pending_accept_reset_streams: DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS,
            http2_max_local_error_reset_streams: DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS,
            follow: None,
            peers: Vec::new(),
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
    /// Most open gRPC connections (handshakes in progress included).
    pub max_connections: usize,
    /// Most open connections per source IPv4 address or IPv6 /64.
    pub max_connections_per_ip: usize,
    /// Most open connections without a client certificate.
    pub max_unauthenticated_connections: usize,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` per connection.
    pub max_concurrent_streams: u32,
    /// Deadline of a unary call (for watches: until the stream opens).
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// HTTP/2 keepalive ping interval.
    #[serde(with = "humantime_serde_compat")]
    pub http2_keepalive_interval: Duration,
    /// HTTP/2 keepalive ping acknowledgement timeout.
    #[serde(with = "humantime_serde_compat")]
    pub http2_keepalive_timeout: Duration,
    /// Largest request message per call, bytes.
    pub max_request_message_size: usize,
    /// Largest response message per call, bytes.
    pub max_response_message_size: usize,
    /// Streams reset by the client before being accepted, per connection, before GOAWAY.
    pub http2_max_pending_accept_reset_streams: usize,
    /// Streams reset by the registry for client errors, per connection, before GOAWAY.
    pub http2_max_local_error_reset_streams: usize,
    /// The primary registry this one follows for policy, if it is a secondary site's.
    pub follow: Option<FollowConfig>,
    /// Other sites' registries whose revocations this site enforces.
    pub peers: Vec<PeerConfig>,
}

mod humantime_serde_compat {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// Validates `[follow]`, each problem naming its key.
fn follow(
    file: &str,
    viewer: &Path,
    base: &Path,
    raw: RawFollow,
    problems: &mut Vec<String>,
) -> Option<FollowConfig> {
    let primary = match raw.primary {
        Some(p) if valid_host_port(&p) => Some(p),
        Some(p) => {
            problems.push(format!("{file}: follow.primary: {p:?} is not host:port"));
            None
        }
        None => {
            problems.push(format!(
                "{file}: follow.primary: required (the primary registry's host:port)"
            ));
            None
        }
    };
    let credentials = credentials(
        file,
        "follow.credentials",
        viewer,
        base,
        raw.credentials,
        problems,
    );
    Some(FollowConfig {
        primary: primary?,
        credentials: credentials?,
    })
}

/// A credentials directory: as written (relative to the file), or this registry's own viewer
/// credentials (any read-only credentials of the mesh are accepted by every site's registry:
/// they chain to the shared root).
fn credentials(
    file: &str,
    key: &str,
    viewer: &Path,
    base: &Path,
    raw: Option<String>,
    problems: &mut Vec<String>,
) -> Option<PathBuf> {
    match raw {
        None => Some(viewer.to_owned()),
        Some(c) if !c.is_empty() => Some(base.join(c)),
        Some(_) => {
            problems.push(format!(
                "{file}: {key}: must not be empty (omit it to use this registry's viewer/ credentials)"
            ));
            None
        }
    }
}

/// Validates `[[peers]]`, each problem naming its key.
fn peers(
    file: &str,
    viewer: &Path,
    base: &Path,
    raw: Vec<RawPeer>,
    problems: &mut Vec<String>,
) -> Vec<PeerConfig> {
    let mut out: Vec<PeerConfig> = Vec::new();
    for (i, p) in raw.into_iter().enumerate() {
        let at = format!("peers[{i}]");
        let site = match p.site.as_deref().map(mesh_api::Label::new) {
            Some(Ok(s)) if out.iter().any(|o| o.site == s) => {
                problems.push(format!("{file}: {at}.site: \"{s}\" is listed twice"));
                None
            }
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                problems.push(format!(
                    "{file}: {at}.site: {e} (a site name such as \"eu-west\")"
                ));
                None
            }
            None => {
                problems.push(format!("{file}: {at}.site: required (that site's name)"));
                None
            }
        };
        let address = match p.address {
            Some(a) if valid_host_port(&a) => Some(a),
            Some(a) => {
                problems.push(format!("{file}: {at}.address: {a:?} is not host:port"));
                None
            }
            None => {
                problems.push(format!(
                    "{file}: {at}.address: required (that site's registry)"
                ));
                None
            }
        };
        let key = format!("{at}.credentials");
        let credentials = credentials(file, &key, viewer, base, p.credentials, problems);
        if let (Some(site), Some(address), Some(credentials)) = (site, address, credentials) {
            out.push(PeerConfig {
                site,
                address,
                credentials,
            });
        }
    }
    out
}

impl Config {
    /// Parses and validates `text`; `path` names the file in messages and anchors a relative
    /// `data_dir`.
    pub fn from_toml_str(path: &Path, text: &str) -> Result<Self, Error> {
        let file = path.display();
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // Name the line (and so the key) a type error is on; toml's message does not.
            let at = e.span().map_or(String::new(), |span| {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let source = text.lines().nth(line - 1).unwrap_or_default().trim();
                format!(" (line {line}: `{source}`)")
            });
            Error::Invalid {
                problems: vec![format!("{file}: {}{at}", e.message().trim())],
            }
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
        let request_timeout = dur("request_timeout", &raw.request_timeout);
        let http2_keepalive_interval =
            dur("http2_keepalive_interval", &raw.http2_keepalive_interval);
        let http2_keepalive_timeout = dur("http2_keepalive_timeout", &raw.http2_keepalive_timeout);
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
        let mut count = |key: &str, v: u64, max: u64| -> u64 {
            if v == 0 {
                problems.push(format!("{file}: {key}: must be greater than zero"));
            } else if v > max {
                problems.push(format!("{file}: {key}: {v} is larger than {max}"));
            }
            v
        };
        // Every count must fit a usize (and u32 for the HTTP/2 setting) on every platform.
        let max_connections = count("max_connections", raw.max_connections, u32::MAX.into());
        let max_connections_per_ip = count(
            "max_connections_per_ip",
            raw.max_connections_per_ip,
            max_connections,
        );
        let max_unauthenticated_connections = count(
            "max_unauthenticated_connections",
            raw.max_unauthenticated_connections,
            max_connections,
        );
        let max_concurrent_streams = count(
            "max_concurrent_streams",
            raw.max_concurrent_streams,
            u32::MAX.into(),
        );
        let http2_max_pending_accept_reset_streams = count(
            "http2_max_pending_accept_reset_streams",
            raw.http2_max_pending_accept_reset_streams,
            u32::MAX.into(),
        );
        let http2_max_local_error_reset_streams = count(
            "http2_max_local_error_reset_streams",
            raw.http2_max_local_error_reset_streams,
            u32::MAX.into(),
        );
        for (key, value) in [
            ("max_request_message_size", raw.max_request_message_size),
            ("max_response_message_size", raw.max_response_message_size),
        ] {
            if !(MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&value) {
                problems.push(format!(
                    "{file}: {key}: {value} is out of range; expected {MIN_MESSAGE_SIZE} to \
                     {MAX_MESSAGE_SIZE} bytes"
                ));
            }
        }
        let viewer = data_dir.join("viewer");
        let follow =
            (raw.follow).and_then(|f| follow(&file.to_string(), &viewer, base, f, &mut problems));
        let peers = peers(&file.to_string(), &viewer, base, raw.peers, &mut problems);
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
                max_connections: to_usize(max_connections),
                max_connections_per_ip: to_usize(max_connections_per_ip),
                max_unauthenticated_connections: to_usize(max_unauthenticated_connections),
                max_concurrent_streams: u32::try_from(max_concurrent_streams)
                    .expect("validated: max_concurrent_streams fits u32"),
                request_timeout,
                http2_keepalive_interval,
                http2_keepalive_timeout,
                max_request_message_size: to_usize(raw.max_request_message_size),
                max_response_message_size: to_usize(raw.max_response_message_size),
                http2_max_pending_accept_reset_streams: to_usize(
                    http2_max_pending_accept_reset_streams,
                ),
                http2_max_local_error_reset_streams: to_usize(http2_max_local_error_reset_streams),
                follow,
                peers,
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

/// A validated count: at most `u32::MAX` (or [`MAX_MESSAGE_SIZE`]), so it fits a `usize`.
fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("validated counts are at most u32::MAX")
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

#[cfg(test)]
mod tests;
