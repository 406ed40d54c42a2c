//! meshd configuration: the node file (`/etc/meshd/meshd.toml`) plus one file per local service
//! in `services_dir`, parsed from text into raw form, then validated into typed [`Config`].
//! Parsing never touches the file system; [`Config::load`] and [`load_services`] do the I/O.

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_api::name::{Label, NodeName};
use serde::{Serialize, Serializer};

use crate::health::StatusRange;

mod check;
pub mod east_west;
mod example;
mod health;
mod listeners;
mod node;
mod service;
mod telemetry;
#[cfg(test)]
mod tests;

pub use example::{EXAMPLE_NODE_TOML, EXAMPLE_SERVICE_TOML};
pub use health::{RawCheck, RawTcpTarget};
pub use listeners::{LISTENER_OFF_LOOPBACK, Listener, OffLoopback, is_loopback};
pub use node::{RawAdmin, RawConfig, RawDrain, RawGossip, RawInbound, RawOutbound, RawRegistry};
pub use service::{Candidate, Protocol, RawService, RawUpstream, Service, Upstream};
pub use telemetry::{
    AccessLogConfig, DEFAULT_REPORT_INTERVAL, DEFAULT_TRACE_SAMPLING, RawAccessLog, RawTelemetry,
    RawTracing, TelemetryConfig, TracingConfig,
};

/// Default location of the node file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/meshd/meshd.toml";
/// Datacenter when the node file names none.
pub const DEFAULT_DATACENTER: &str = "dc1";
/// Zone when the node file names none.
pub const DEFAULT_ZONE: &str = "default";
/// Site when the node file names none: a mesh of one site need not name it.
pub const DEFAULT_SITE: &str = "default";
/// Where meshd keeps its identity, certificates and state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/meshd";
/// Directory of per-service files (`*.toml`).
pub const DEFAULT_SERVICES_DIR: &str = "/etc/meshd/services.d";
/// One-time join token, read only on the first join.
pub const DEFAULT_JOIN_TOKEN_FILE: &str = "/etc/meshd/join-token";
/// Time allowed to connect to the registry.
pub const DEFAULT_REGISTRY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one registry request.
pub const DEFAULT_REGISTRY_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Gossip (membership) listener.
pub const DEFAULT_GOSSIP_BIND: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 7946);
/// Time between gossip rounds.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(200);
/// Shortest gossip interval accepted.
pub const MIN_GOSSIP_INTERVAL: Duration = Duration::from_millis(10);
/// Longest gossip interval accepted.
pub const MAX_GOSSIP_INTERVAL: Duration = Duration::from_secs(10);
/// Whether gossip sealed with format version 1 (no replay protection) is accepted.
pub const DEFAULT_GOSSIP_LEGACY_PEERS: bool = false;
/// The gossip protocol spoken: 2 (bounded digests, SWIM failure detection).
pub const DEFAULT_GOSSIP_PROTOCOL: GossipProtocol = GossipProtocol::V2;
/// Inbound (mTLS from other nodes) listener.
pub const DEFAULT_INBOUND_BIND: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15008);
/// Time allowed for an inbound TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most inbound connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Time allowed to connect to a remote node for an upstream.
pub const DEFAULT_OUTBOUND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin (health, metrics, config dump) listener; keep it on loopback.
pub const DEFAULT_ADMIN_BIND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// Whether the admin listener may be bound off loopback: it has no authentication, so an
/// address other hosts can reach must be asked for explicitly.
pub const DEFAULT_ADMIN_ALLOW_REMOTE: bool = false;
/// Time open connections get to finish after shutdown starts.
pub const DEFAULT_DRAIN_GRACE_PERIOD: Duration = Duration::from_secs(15);
/// Time between two runs of a service's health check (Kubernetes' probe period).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Time one run of a health check may take before it counts as failed; a local app that
/// needs longer to answer is in trouble anyway.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Failing runs in a row that take a healthy service out of rotation (Kubernetes' default),
/// so one slow answer does not.
pub const DEFAULT_CHECK_UNHEALTHY_THRESHOLD: u32 = 3;
/// Passing runs in a row that bring an unhealthy service back, so a flapping app is not
/// sent traffic on every lucky answer.
pub const DEFAULT_CHECK_HEALTHY_THRESHOLD: u32 = 2;
/// HTTP statuses that pass an `http` check: success and redirects (as Kubernetes probes).
pub const DEFAULT_CHECK_EXPECT_STATUS: StatusRange =
    StatusRange::new(200, 399).expect("200-399 is a valid status range");

/// The validated node configuration plus the local services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// This host's name in the mesh.
    pub node_name: NodeName,
    /// Datacenter this node is in.
    pub datacenter: Label,
    /// Zone within the datacenter.
    pub zone: Label,
    /// Site: the gossip pool and registry this node belongs to.
    pub site: Label,
    /// State directory (absolute, or relative to the working directory if the file path was).
    pub data_dir: PathBuf,
    /// Directory of per-service files.
    pub services_dir: PathBuf,
    /// How to reach the registry.
    pub registry: RegistryConfig,
    /// Membership gossip.
    pub gossip: GossipConfig,
    /// Listener for mTLS connections from other nodes.
    pub inbound: InboundConfig,
    /// Connections to other nodes on behalf of local apps.
    pub outbound: OutboundConfig,
    /// Admin endpoint.
    pub admin: AdminConfig,
    /// Graceful shutdown.
    pub drain: DrainConfig,
    /// Gateways this host runs.
    pub gateway: GatewayConfig,
    /// This host's east-west gateway role, if it has it.
    pub east_west: Option<east_west::EastWestConfig>,
    /// `[telemetry]`, `[access_log]` and `[tracing]`.
    pub telemetry: TelemetryConfig,
    /// Local services, sorted by file name; empty from [`Config::from_toml_str`].
    pub services: Vec<Service>,
    /// The node file this was read from, as given (not a setting: it names the file in
    /// warnings).
    pub node_file: PathBuf,
}

/// `[registry]`: how to reach the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegistryConfig {
    /// `host:port`, host a DNS name or IP address; resolved when connecting.
    pub address: String,
    /// One-time join token, read only on the first join.
    pub join_token_file: PathBuf,
    /// Time allowed to connect.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Time allowed for one request.
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Duration,
}

/// `[gossip]`: membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GossipConfig {
    /// Listen address.
    pub bind: SocketAddr,
    /// Address other nodes use to reach this one; `bind` unless that is a wildcard.
    pub advertise: SocketAddr,
    /// `host:port` of nodes to contact first.
    pub seeds: Vec<String>,
    /// Time between gossip rounds, within [`MIN_GOSSIP_INTERVAL`]..=[`MAX_GOSSIP_INTERVAL`].
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// Separates clusters sharing a network; `None` means the trust domain is used.
    pub cluster_id: Option<String>,
    /// Gossip with older meshd during a rolling upgrade (format-1 datagrams both ways, unsigned
    /// state of nodes never seen signed); off by default; see [`RawGossip::legacy_peers`].
    pub legacy_peers: bool,
    /// `gossip.protocol`: every node of a site (and every gateway of the WAN pool) must speak
    /// the same; see [`RawGossip::protocol`].
    pub protocol: GossipProtocol,
}

/// The membership protocol a node speaks (chitchat's protocol version, our fork).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum GossipProtocol {
    /// Every digest lists the whole table, phi-accrual failure detection: what meshd spoke
    /// before protocol 2. Only for a rolling upgrade from such a meshd.
    V1,
    /// Digests of a bounded scope, sweeps, SWIM failure detection.
    V2,
}

/// `[inbound]`: the mTLS listener other nodes connect to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboundConfig {
    /// Listen address.
    pub bind: SocketAddr,
    /// Address other nodes use to reach this one; `bind` unless that is a wildcard.
    pub advertise: SocketAddr,
    /// Time allowed for the TLS handshake.
    #[serde(serialize_with = "ser_duration")]
    pub handshake_timeout: Duration,
    /// Most connections served at once (greater than zero).
    pub max_connections: usize,
}

/// `[outbound]`: connections to other nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboundConfig {
    /// Time allowed to connect to a remote node.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
}

/// `[admin]`: the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    /// Listen address: loopback, unless `allow_remote` (the endpoint has no authentication).
    pub bind: SocketAddr,
    /// `bind` may be an address other hosts can reach (still warned about).
    pub allow_remote: bool,
}

/// `[gateway]`: the Gateway resources this host runs. A host runs a gateway only when it says
/// so here: a policy change can reconfigure a gateway's listeners but never start one on a host
/// that did not opt in. Each gateway's identity (the workload identity of the service named
/// like it) must be allowed by the host's join token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GatewayConfig {
    /// `namespace/name` of each Gateway.
    #[serde(serialize_with = "ser_display_list")]
    pub names: Vec<mesh_api::ServiceKey>,
}

/// `[drain]`: graceful shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DrainConfig {
    /// Time open connections get to finish after shutdown starts.
    #[serde(serialize_with = "ser_duration")]
    pub grace_period: Duration,
}

/// One thing wrong with one key (or, with an empty key, a whole file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}{}", .file.display(), KeyPrefix(.key), .message)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// Dotted key path such as `gossip.advertise` or `upstreams[1].bind`; empty for whole-file
    /// problems such as TOML syntax errors.
    pub key: String,
    /// What is wrong, naming the value.
    pub message: String,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One or more problems in the files' contents; every problem found is listed.
    #[error("{}", ProblemList(.0))]
    Invalid(Vec<Problem>),
    /// A file or directory could not be read.
    #[error("cannot read {}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

struct KeyPrefix<'a>(&'a str);

struct ProblemList<'a>(&'a [Problem]);

// === impl Config ===

impl Config {
    /// Every workload identity this host holds a certificate for: its services', then its
    /// gateways' (a gateway that is also declared as a service is listed once).
    pub fn identities(&self) -> Vec<&mesh_api::ServiceKey> {
        let mut out: Vec<&mesh_api::ServiceKey> = self.services.iter().map(|s| &s.key).collect();
        for g in &self.gateway.names {
            if !out.contains(&g) {
                out.push(g);
            }
        }
        out
    }

    /// Parses and validates the node file only (`services` is empty). `path` names the file in
    /// problems and is the base for relative paths.
    pub fn from_toml_str(path: &Path, text: &str) -> Result<Config, Error> {
        RawConfig::from_toml_str(path, text)
            .and_then(|raw| raw.validate(path))
            .map_err(Error::Invalid)
    }

    /// Reads the node file, then every service file in its `services_dir`, and checks them
    /// against each other; problems from all files are reported together.
    pub fn load(path: &Path) -> Result<Config, Error> {
        Self::load_with(path, None)
    }

    /// [`Config::load`], with `candidate` read in place of (or in addition to) one file of
    /// `services_dir`: checks a service file in the context of the node and the other services
    /// before it is installed.
    pub fn load_with(path: &Path, candidate: Option<&Candidate>) -> Result<Config, Error> {
        let text = read(path)?;
        let raw = RawConfig::from_toml_str(path, &text).map_err(Error::Invalid)?;
        let services_dir = raw.resolved_services_dir(path);
        let node = raw.validate(path);

        let mut problems = Vec::new();
        let mut services = Vec::new();
        if let Some(dir) = services_dir {
            match service::load_dir(&dir, candidate) {
                Ok((found, service_problems)) => {
                    services = found;
                    problems.extend(service_problems);
                }
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    let message = format!("directory {} does not exist", dir.display());
                    problems.push(Problem::new(path, "services_dir".to_owned(), message));
                }
                Err(e) => return Err(e),
            }
        }
        let mut all = match node {
            Ok(mut config) => {
                problems.extend(service::check_against_node(&config, path, &services));
                if problems.is_empty() {
                    config.services = services;
                    return Ok(config);
                }
                Vec::new()
            }
            Err(node_problems) => node_problems,
        };
        all.extend(problems);
        Err(Error::Invalid(all))
    }

    /// A valid config for tests: every listener on 127.0.0.1 port 0, paths under `data_dir`,
    /// registry at `127.0.0.1:7700` (tests point it at their own), default timers.
    pub fn for_test(data_dir: &Path) -> Config {
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Config {
            node_name: NodeName::new("test-node").expect("test-node is a valid node name"),
            datacenter: Label::new(DEFAULT_DATACENTER).expect("default datacenter is a label"),
            zone: Label::new(DEFAULT_ZONE).expect("default zone is a label"),
            site: Label::new(DEFAULT_SITE).expect("default site is a label"),
            data_dir: data_dir.to_owned(),
            services_dir: data_dir.join("services.d"),
            registry: RegistryConfig {
                address: "127.0.0.1:7700".to_owned(),
                join_token_file: data_dir.join("join-token"),
                connect_timeout: DEFAULT_REGISTRY_CONNECT_TIMEOUT,
                request_timeout: DEFAULT_REGISTRY_REQUEST_TIMEOUT,
            },
            gossip: GossipConfig {
                bind: loopback,
                advertise: loopback,
                seeds: Vec::new(),
                interval: DEFAULT_GOSSIP_INTERVAL,
                cluster_id: None,
                legacy_peers: DEFAULT_GOSSIP_LEGACY_PEERS,
                protocol: DEFAULT_GOSSIP_PROTOCOL,
            },
            inbound: InboundConfig {
                bind: loopback,
                advertise: loopback,
                handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
                max_connections: DEFAULT_MAX_CONNECTIONS,
            },
            outbound: OutboundConfig {
                connect_timeout: DEFAULT_OUTBOUND_CONNECT_TIMEOUT,
            },
            admin: AdminConfig {
                bind: loopback,
                allow_remote: DEFAULT_ADMIN_ALLOW_REMOTE,
            },
            drain: DrainConfig {
                grace_period: DEFAULT_DRAIN_GRACE_PERIOD,
            },
            gateway: GatewayConfig::default(),
            east_west: None,
            telemetry: TelemetryConfig {
                report_interval: DEFAULT_REPORT_INTERVAL,
                access_log: AccessLogConfig {
                    enabled: true,
                    errors_only: false,
                    exclude_paths: Vec::new(),
                },
                tracing: TracingConfig {
                    collector: None,
                    sampling: DEFAULT_TRACE_SAMPLING,
                },
            },
            services: Vec::new(),
            node_file: data_dir.join("meshd.toml"),
        }
    }

    /// Every listener meshd opens for local apps (upstreams, `http_proxy`) or for its admin
    /// endpoint that is bound to an address other hosts can reach: node file first, then the
    /// services in order. Valid, but worth a warning (see [`OffLoopback`]).
    pub fn listeners_off_loopback(&self) -> Vec<OffLoopback> {
        listeners::off_loopback(self)
    }
}

/// Reads every `*.toml` file in `dir` (sorted by name; other files ignored) as a service and
/// checks them against each other (duplicate services, clashing upstream binds).
pub fn load_services(dir: &Path) -> Result<Vec<Service>, Error> {
    let (services, problems) = service::load_dir(dir, None)?;
    if problems.is_empty() {
        Ok(services)
    } else {
        Err(Error::Invalid(problems))
    }
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn ser_display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_display_list<T: fmt::Display, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(ToString::to_string))
}

// === impl Problem ===

impl Problem {
    fn new(file: &Path, key: String, message: String) -> Self {
        Self {
            file: file.to_owned(),
            key,
            message,
        }
    }
}

// === impl Error ===

impl Error {
    /// The problems, if the error is [`Error::Invalid`]; empty otherwise.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Error::Invalid(problems) => problems,
            Error::Io { .. } => &[],
        }
    }
}

// === impl KeyPrefix ===

impl fmt::Display for KeyPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", self.0)
        }
    }
}

// === impl ProblemList ===

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}
