//! The node file in raw form (`RawConfig`: what the TOML says, defaults filled in) and its
//! validation into [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mesh_api::ServiceKey;
use mesh_api::name::{Label, NodeName};
use serde::Deserialize;

use super::check::{self, Checker};
use super::{
    AdminConfig, Config, DrainConfig, GatewayConfig, GossipConfig, GossipProtocol, InboundConfig,
    OutboundConfig, Problem, RegistryConfig,
};
use super::{
    DEFAULT_ADMIN_ALLOW_REMOTE, DEFAULT_ADMIN_BIND, DEFAULT_DATA_DIR, DEFAULT_DATACENTER,
    DEFAULT_DRAIN_GRACE_PERIOD, DEFAULT_GOSSIP_BIND, DEFAULT_GOSSIP_INTERVAL,
    DEFAULT_GOSSIP_LEGACY_PEERS, DEFAULT_GOSSIP_PROTOCOL, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_INBOUND_BIND, DEFAULT_JOIN_TOKEN_FILE, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_OUTBOUND_CONNECT_TIMEOUT, DEFAULT_REGISTRY_CONNECT_TIMEOUT,
    DEFAULT_REGISTRY_REQUEST_TIMEOUT, DEFAULT_SERVICES_DIR, DEFAULT_SITE, DEFAULT_ZONE,
    MAX_GOSSIP_INTERVAL, MIN_GOSSIP_INTERVAL,
};

/// The node file as written, with defaults for absent keys; unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Required.
    pub node_name: Option<String>,
    /// A label.
    pub datacenter: String,
    /// A label.
    pub zone: String,
    /// A label: the site (one gossip pool and registry) this host is in.
    pub site: String,
    /// Relative paths are resolved against the node file's directory.
    pub data_dir: String,
    /// Relative paths are resolved against the node file's directory.
    pub services_dir: String,
    /// `[registry]`.
    pub registry: RawRegistry,
    /// `[gossip]`.
    pub gossip: RawGossip,
    /// `[inbound]`.
    pub inbound: RawInbound,
    /// `[outbound]`.
    pub outbound: RawOutbound,
    /// `[admin]`.
    pub admin: RawAdmin,
    /// `[drain]`.
    pub drain: RawDrain,
    /// `[gateway]`.
    pub gateway: RawGateway,
    /// `[east_west]`, on the east-west gateways of a site.
    pub east_west: Option<super::east_west::RawEastWest>,
    /// `[telemetry]`.
    pub telemetry: super::telemetry::RawTelemetry,
    /// `[access_log]`.
    pub access_log: super::telemetry::RawAccessLog,
    /// `[tracing]`.
    pub tracing: super::telemetry::RawTracing,
}

/// `[registry]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRegistry {
    /// Required `host:port`.
    pub address: Option<String>,
    /// Relative paths are resolved against the node file's directory.
    pub join_token_file: String,
    /// Duration such as `"5s"`.
    pub connect_timeout: String,
    /// Duration such as `"10s"`.
    pub request_timeout: String,
}

/// `[gossip]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawGossip {
    /// IP address and port.
    pub bind: String,
    /// IP address and port; required when `bind` is a wildcard address.
    pub advertise: Option<String>,
    /// `host:port` entries.
    pub seeds: Vec<String>,
    /// Duration such as `"200ms"`.
    pub interval: String,
    /// Optional cluster id.
    pub cluster_id: Option<String>,
    /// Gossip with meshd from before replay-protected sealing (format version 2) and signed
    /// state, during a rolling upgrade: open their format-1 datagrams and answer each peer
    /// heard in format 1 in format 1, and use the unsigned state of nodes never seen signed.
    /// Format 1 has no replay protection and unsigned state can be forged by any key holder, so
    /// this reopens both holes while it is on: leave it off (the default) outside an upgrade.
    pub legacy_peers: bool,
    /// Gossip protocol, 1 or 2. Nodes speaking different ones see each other dead, so 1 is only
    /// for a rolling upgrade from a meshd that speaks nothing else: roll the new meshd out with
    /// `protocol = 1` on every node, then remove the line and roll again.
    pub protocol: u8,
}

/// `[inbound]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawInbound {
    /// IP address and port.
    pub bind: String,
    /// IP address and port; required when `bind` is a wildcard address.
    pub advertise: Option<String>,
    /// Duration such as `"10s"`.
    pub handshake_timeout: String,
    /// Greater than zero.
    pub max_connections: u64,
}

/// `[outbound]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawOutbound {
    /// Duration such as `"5s"`.
    pub connect_timeout: String,
}

/// `[admin]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawAdmin {
    /// IP address and port; loopback unless `allow_remote`.
    pub bind: String,
    /// Accept a `bind` other hosts can reach.
    pub allow_remote: bool,
}

/// `[gateway]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawGateway {
    /// `namespace/name` of each Gateway resource this host runs.
    pub names: Vec<String>,
}

/// `[drain]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDrain {
    /// Duration such as `"15s"`.
    pub grace_period: String,
}

// === impl RawConfig ===

impl RawConfig {
    /// Parses the node file's text; syntax, type and unknown-key errors become problems.
    pub fn from_toml_str(path: &Path, text: &str) -> Result<RawConfig, Vec<Problem>> {
        check::from_toml(path, text)
    }

    /// Checks every key, reporting all problems; `path` names the file in problems and is the
    /// base for relative paths. The result has no services.
    pub fn validate(self, path: &Path) -> Result<Config, Vec<Problem>> {
        let mut c = Checker::new(path);
        let config = self.check(&mut c, path);
        match config {
            Some(config) if c.is_empty() => Ok(config),
            _ => Err(c.into_problems()),
        }
    }

    /// `services_dir` resolved against the node file's directory, if set.
    pub(super) fn resolved_services_dir(&self, path: &Path) -> Option<PathBuf> {
        (!self.services_dir.is_empty())
            .then(|| check::resolve(check::base_dir(path), &self.services_dir))
    }

    fn check(self, c: &mut Checker<'_>, path: &Path) -> Option<Config> {
        let base = check::base_dir(path);
        let node_name = c
            .required("node_name", self.node_name.as_deref())
            .and_then(|v| {
                let r = NodeName::new(v);
                c.parsed("node_name", v, r)
            });
        let datacenter = c.parsed("datacenter", &self.datacenter, Label::new(&self.datacenter));
        let zone = c.parsed("zone", &self.zone, Label::new(&self.zone));
        let site = c.parsed("site", &self.site, Label::new(&self.site));
        let east_west = self.east_west.map(|e| e.check(c, base));
        let data_dir = c.path("data_dir", &self.data_dir, base);
        let services_dir = c.path("services_dir", &self.services_dir, base);
        let registry = self.registry.check(c, base);
        let gossip = self.gossip.check(c);
        let inbound = self.inbound.check(c);
        let outbound_connect =
            c.timeout("outbound.connect_timeout", &self.outbound.connect_timeout);
        let admin = self.admin.check(c);
        let grace_period = c.duration("drain.grace_period", &self.drain.grace_period);
        let gateway = self.gateway.check(c);
        let telemetry = super::telemetry::check(c, self.telemetry, self.access_log, self.tracing);
        Some(Config {
            node_name: node_name?,
            datacenter: datacenter?,
            zone: zone?,
            site: site?,
            data_dir: data_dir?,
            services_dir: services_dir?,
            registry: registry?,
            gossip: gossip?,
            inbound: inbound?,
            outbound: OutboundConfig {
                connect_timeout: outbound_connect?,
            },
            admin: admin?,
            drain: DrainConfig {
                grace_period: grace_period?,
            },
            gateway: gateway?,
            east_west: match east_west {
                Some(e) => Some(e?),
                None => None,
            },
            telemetry: telemetry?,
            services: Vec::new(),
            node_file: path.to_owned(),
        })
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            node_name: None,
            datacenter: DEFAULT_DATACENTER.to_owned(),
            zone: DEFAULT_ZONE.to_owned(),
            site: DEFAULT_SITE.to_owned(),
            data_dir: DEFAULT_DATA_DIR.to_owned(),
            services_dir: DEFAULT_SERVICES_DIR.to_owned(),
            registry: RawRegistry::default(),
            gossip: RawGossip::default(),
            inbound: RawInbound::default(),
            outbound: RawOutbound::default(),
            admin: RawAdmin::default(),
            drain: RawDrain::default(),
            gateway: RawGateway::default(),
            east_west: None,
            telemetry: Default::default(),
            access_log: Default::default(),
            tracing: Default::default(),
        }
    }
}

// === impl RawGateway ===

impl RawGateway {
    fn check(self, c: &mut Checker<'_>) -> Option<GatewayConfig> {
        let mut names = Vec::with_capacity(self.names.len());
        let mut ok = true;
        for (i, raw) in self.names.iter().enumerate() {
            let key = format!("gateway.names[{i}]");
            match ServiceKey::parse(raw) {
                Ok(k) if raw.contains('/') => {
                    if names.contains(&k) {
                        c.push(key, format!("{raw:?} is listed twice"));
                        ok = false;
                    }
                    names.push(k);
                }
                Ok(_) => {
                    c.push(key, format!("{raw:?} is invalid: expected the Gateway's \"namespace/name\", e.g. \"shop/public\""));
                    ok = false;
                }
                Err(e) => {
                    c.push(key, format!("{raw:?} is invalid: {e}; expected the Gateway's \"namespace/name\", e.g. \"shop/public\""));
                    ok = false;
                }
            }
        }
        ok.then_some(GatewayConfig { names })
    }
}

// === impl RawRegistry ===

impl RawRegistry {
    fn check(self, c: &mut Checker<'_>, base: &Path) -> Option<RegistryConfig> {
        let address = c
            .required("registry.address", self.address.as_deref())
            .and_then(|v| c.host_port("registry.address", v));
        let join_token_file = c.path("registry.join_token_file", &self.join_token_file, base);
        let connect_timeout = c.timeout("registry.connect_timeout", &self.connect_timeout);
        let request_timeout = c.timeout("registry.request_timeout", &self.request_timeout);
        Some(RegistryConfig {
            address: address?,
            join_token_file: join_token_file?,
            connect_timeout: connect_timeout?,
            request_timeout: request_timeout?,
        })
    }
}

impl Default for RawRegistry {
    fn default() -> Self {
        Self {
            address: None,
            join_token_file: DEFAULT_JOIN_TOKEN_FILE.to_owned(),
            connect_timeout: humane(DEFAULT_REGISTRY_CONNECT_TIMEOUT),
            request_timeout: humane(DEFAULT_REGISTRY_REQUEST_TIMEOUT),
        }
    }
}

// === impl RawGossip ===

impl RawGossip {
    fn check(self, c: &mut Checker<'_>) -> Option<GossipConfig> {
        let bind = c.socket_addr("gossip.bind", &self.bind);
        let advertise = advertise(c, "gossip", bind, self.advertise.as_deref());
        // Check every seed before giving up on any, so all bad seeds are reported.
        let seeds: Vec<Option<String>> = (self.seeds.iter().enumerate())
            .map(|(i, seed)| c.host_port(&format!("gossip.seeds[{i}]"), seed))
            .collect();
        let interval = c.duration("gossip.interval", &self.interval).and_then(|d| {
            if (MIN_GOSSIP_INTERVAL..=MAX_GOSSIP_INTERVAL).contains(&d) {
                Some(d)
            } else {
                let message = format!(
                    "{:?} is out of range: must be between {} and {}",
                    self.interval,
                    humane(MIN_GOSSIP_INTERVAL),
                    humane(MAX_GOSSIP_INTERVAL),
                );
                c.push("gossip.interval", message);
                None
            }
        });
        let cluster_id = match self.cluster_id {
            Some(id) if id.is_empty() => {
                c.push(
                    "gossip.cluster_id",
                    "must not be empty (omit it to use the trust domain)",
                );
                None
            }
            id => Some(id),
        };
        let protocol = gossip_protocol(c, self.protocol);
        Some(GossipConfig {
            bind: bind?,
            advertise: advertise?,
            seeds: seeds.into_iter().collect::<Option<_>>()?,
            interval: interval?,
            cluster_id: cluster_id?,
            legacy_peers: self.legacy_peers,
            protocol: protocol?,
        })
    }
}

impl Default for RawGossip {
    fn default() -> Self {
        Self {
            bind: DEFAULT_GOSSIP_BIND.to_string(),
            advertise: None,
            seeds: Vec::new(),
            interval: humane(DEFAULT_GOSSIP_INTERVAL),
            cluster_id: None,
            legacy_peers: DEFAULT_GOSSIP_LEGACY_PEERS,
            protocol: match DEFAULT_GOSSIP_PROTOCOL {
                GossipProtocol::V1 => 1,
                GossipProtocol::V2 => 2,
            },
        }
    }
}

fn gossip_protocol(c: &mut Checker<'_>, protocol: u8) -> Option<GossipProtocol> {
    match protocol {
        1 => Some(GossipProtocol::V1),
        2 => Some(GossipProtocol::V2),
        other => {
            c.push(
                "gossip.protocol",
                format!(
                    "{other} is not a gossip protocol: 2 (the default), or 1 only while \
                     upgrading from a meshd that speaks nothing else"
                ),
            );
            None
        }
    }
}

// === impl RawInbound ===

impl RawInbound {
    fn check(self, c: &mut Checker<'_>) -> Option<InboundConfig> {
        let bind = c.socket_addr("inbound.bind", &self.bind);
        let advertise = advertise(c, "inbound", bind, self.advertise.as_deref());
        let handshake_timeout = c.timeout("inbound.handshake_timeout", &self.handshake_timeout);
        let max_connections = match usize::try_from(self.max_connections) {
            Ok(0) => {
                c.push("inbound.max_connections", "must be greater than 0");
                None
            }
            Ok(n) => Some(n),
            Err(_) => {
                let message = format!("{} is too large for this platform", self.max_connections);
                c.push("inbound.max_connections", message);
                None
            }
        };
        Some(InboundConfig {
            bind: bind?,
            advertise: advertise?,
            handshake_timeout: handshake_timeout?,
            max_connections: max_connections?,
        })
    }
}

impl Default for RawInbound {
    fn default() -> Self {
        Self {
            bind: DEFAULT_INBOUND_BIND.to_string(),
            advertise: None,
            handshake_timeout: humane(DEFAULT_HANDSHAKE_TIMEOUT),
            max_connections: DEFAULT_MAX_CONNECTIONS as u64,
        }
    }
}

// === impl RawOutbound ===

impl Default for RawOutbound {
    fn default() -> Self {
        Self {
            connect_timeout: humane(DEFAULT_OUTBOUND_CONNECT_TIMEOUT),
        }
    }
}

// === impl RawAdmin ===

impl RawAdmin {
    /// The endpoint has no authentication: off loopback only when asked for explicitly.
    fn check(self, c: &mut Checker<'_>) -> Option<AdminConfig> {
        let bind = c.socket_addr("admin.bind", &self.bind)?;
        if !self.allow_remote && !super::is_loopback(bind.ip()) {
            let message = format!(
                "{bind} is not a loopback address, and the admin endpoint has no \
                 authentication: any host that can reach it could read this node's \
                 configuration, metrics and members; bind it to 127.0.0.1 or [::1], or set \
                 admin.allow_remote = true to accept that"
            );
            c.push("admin.bind", message);
            return None;
        }
        Some(AdminConfig {
            bind,
            allow_remote: self.allow_remote,
        })
    }
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            bind: DEFAULT_ADMIN_BIND.to_string(),
            allow_remote: DEFAULT_ADMIN_ALLOW_REMOTE,
        }
    }
}

// === impl RawDrain ===

impl Default for RawDrain {
    fn default() -> Self {
        Self {
            grace_period: humane(DEFAULT_DRAIN_GRACE_PERIOD),
        }
    }
}

/// `<section>.advertise`: as written if set (and not a wildcard), else `bind` unless that is a
/// wildcard, in which case it is required.
fn advertise(
    c: &mut Checker<'_>,
    section: &str,
    bind: Option<SocketAddr>,
    value: Option<&str>,
) -> Option<SocketAddr> {
    advertise_of(c, section, "bind", "advertise", bind, value)
}

/// `<section>.<key>`, the address other hosts reach `<section>.<bind_key>` at: as written if
/// set (and not a wildcard), else the bound address unless that is a wildcard, in which case
/// it is required.
pub(super) fn advertise_of(
    c: &mut Checker<'_>,
    section: &str,
    bind_key: &str,
    key: &str,
    bind: Option<SocketAddr>,
    value: Option<&str>,
) -> Option<SocketAddr> {
    let key = format!("{section}.{key}");
    let Some(value) = value else {
        let bind = bind?;
        if bind.ip().is_unspecified() {
            let message = format!(
                "missing: required because {section}.{bind_key} is the wildcard address {bind}; \
                 set it to this host's address that other nodes can reach"
            );
            c.push(key, message);
            return None;
        }
        return Some(bind);
    };
    let addr = c.socket_addr(&key, value)?;
    if addr.ip().is_unspecified() {
        let message = format!(
            "{value:?} is a wildcard address other nodes cannot connect to; \
             use this host's reachable address"
        );
        c.push(key, message);
        return None;
    }
    Some(addr)
}

fn humane(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}
