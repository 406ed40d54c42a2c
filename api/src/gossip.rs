//! The gossip key schema: which chitchat keys a node publishes about itself and how their values
//! are encoded (versioned JSON, so a rolling upgrade can read old and new nodes side by side).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::name::{Label, ServiceKey};

/// Key holding the node's [`NodeInfo`].
pub const KEY_NODE: &str = "node";
/// Prefix of the keys holding one [`ServiceInfo`] per local service: `svc/<ns>/<name>`.
pub const SERVICE_PREFIX: &str = "svc/";
/// Prefix of the keys an east-west gateway publishes in its site's gossip, one
/// [`RemoteService`] per service another site exports: `remote/<site>/<ns>/<name>`.
pub const REMOTE_PREFIX: &str = "remote/";
/// Prefix of the keys an east-west gateway publishes in its site's gossip, one [`SiteDistance`]
/// per other site whose gateways it measured: `rtt/<site>`.
pub const SITE_RTT_PREFIX: &str = "rtt/";
/// WAN gossip (east-west gateways of every site): key holding the gateway's [`WanNode`].
pub const KEY_WAN_NODE: &str = "wan";
/// WAN gossip: prefix of the keys holding one [`ExportedService`] per service the gateway's site
/// exports: `exp/<ns>/<name>`.
pub const EXPORT_PREFIX: &str = "exp/";
/// Value schema version this build writes and reads.
pub const VERSION: u32 = 1;

/// Why a gossip value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Written by a newer (or older, incompatible) meshd.
    #[error("gossip value has schema version {0}, this meshd reads version {VERSION}")]
    UnsupportedVersion(u32),
    /// Not valid JSON of the expected shape.
    #[error("gossip value is malformed: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Whether a node takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Joined, still learning the mesh: peers send it nothing yet (its apps' calls would find
    /// no endpoints). Read by meshd from before this state as unreadable node info, which keeps
    /// the node out of their view until it serves: the same outcome.
    Starting,
    /// Serving normally.
    Serving,
    /// Shutting down: peers stop sending new connections.
    Draining,
    /// Gone (a graceful stop, published in its last gossip rounds): peers drop it from their
    /// view at once instead of waiting for the failure detector. meshd from before this state
    /// reads it as unreadable node info, which also leaves the node out of their view.
    Left,
}

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Schema version ([`VERSION`]).
    pub v: u32,
    /// Where peers reach this node's single mTLS inbound port.
    pub inbound: SocketAddr,
    /// Datacenter of the node.
    pub datacenter: Label,
    /// Zone inside the datacenter.
    pub zone: Label,
    /// Site (one gossip pool and registry); absent from meshd before sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<Label>,
    /// Serving or draining.
    pub state: NodeState,
}

/// What a node says about one of its local services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Schema version ([`VERSION`]).
    pub v: u32,
    /// Application protocol (`tcp`, later `http`, `http2`, `grpc`).
    pub protocol: String,
    /// Labels used for subsets, e.g. `version = "v2"`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether the instance passes its health checks.
    pub healthy: bool,
}

/// Instances of one service that share their subset labels, counted for a summary.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Subset {
    /// The instances' labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How many pass their health checks and are not draining.
    pub healthy: u32,
    /// How many there are.
    pub total: u32,
}

/// What an east-west gateway says in the WAN about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WanNode {
    /// Schema version ([`VERSION`]).
    pub v: u32,
    /// Its site.
    pub site: Label,
    /// Where other sites reach its passthrough listener.
    pub gateway: SocketAddr,
}

/// What an east-west gateway says in the WAN about one service its site exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedService {
    /// Schema version ([`VERSION`]).
    pub v: u32,
    /// Application protocol.
    pub protocol: String,
    /// Its instances in the site, by subset labels.
    pub subsets: Vec<Subset>,
}

/// What an east-west gateway says in its own site about a service of another site: the
/// summary that site's gateways publish in the WAN, and where those gateways are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteService {
    /// Schema version ([`VERSION`]).
    pub v: u32,
    /// Application protocol.
    pub protocol: String,
    /// Its instances in the other site, by subset labels.
    pub subsets: Vec<Subset>,
    /// The other site's east-west gateways that export it (sorted).
    pub gateways: Vec<SocketAddr>,
}

/// The gossip key of a service of another site: `remote/<site>/<ns>/<name>`.
pub fn remote_key(site: &Label, service: &ServiceKey) -> String {
    format!(
        "{REMOTE_PREFIX}{site}/{}/{}",
        service.namespace, service.name
    )
}

/// Reverses [`remote_key`]; `None` for keys outside the schema.
pub fn parse_remote_key(key: &str) -> Option<(Label, ServiceKey)> {
    let rest = key.strip_prefix(REMOTE_PREFIX)?;
    let mut parts = rest.split('/');
    let (site, ns, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let svc = ServiceKey::new(Label::new(ns).ok()?, Label::new(name).ok()?);
    Some((Label::new(site).ok()?, svc))
}

/// How far another site is from an east-west gateway of this one: the round trip of a TCP
/// handshake with that site's nearest gateway (median of the recent probes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteDistance {
    /// Schema version ([`VERSION`]).
    pub v: u32,
    /// Round trip, microseconds.
    pub rtt_us: u32,
}

/// The gossip key of another site's distance: `rtt/<site>`.
pub fn site_rtt_key(site: &Label) -> String {
    format!("{SITE_RTT_PREFIX}{site}")
}

/// Reverses [`site_rtt_key`]; `None` for keys outside the schema.
pub fn parse_site_rtt_key(key: &str) -> Option<Label> {
    Label::new(key.strip_prefix(SITE_RTT_PREFIX)?).ok()
}

/// The WAN key of an exported service: `exp/<ns>/<name>`.
pub fn export_key(service: &ServiceKey) -> String {
    format!("{EXPORT_PREFIX}{}/{}", service.namespace, service.name)
}

/// Reverses [`export_key`].
pub fn parse_export_key(key: &str) -> Option<ServiceKey> {
    let rest = key.strip_prefix(EXPORT_PREFIX)?;
    let (ns, name) = rest.split_once('/')?;
    Some(ServiceKey::new(
        Label::new(ns).ok()?,
        Label::new(name).ok()?,
    ))
}

/// The gossip key of a local service.
pub fn service_key(service: &ServiceKey) -> String {
    format!("{SERVICE_PREFIX}{}/{}", service.namespace, service.name)
}

/// Reverses [`service_key`]; `None` for keys outside the schema.
pub fn parse_service_key(key: &str) -> Option<ServiceKey> {
    let rest = key.strip_prefix(SERVICE_PREFIX)?;
    let (ns, name) = rest.split_once('/')?;
    Some(ServiceKey::new(
        Label::new(ns).ok()?,
        Label::new(name).ok()?,
    ))
}

/// Encodes a value for publication.
pub fn encode<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("gossip values serialise to JSON")
}

/// Decodes a value, checking the schema version first.
pub fn decode<T: DeserializeOwned>(s: &str) -> Result<T, Error> {
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
    }
    let Versioned { v } = serde_json::from_str(s)?;
    if v != VERSION {
        return Err(Error::UnsupportedVersion(v));
    }
    Ok(serde_json::from_str(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_rtt_keys_round_trip_and_refuse_what_is_not_a_site() {
        let b = Label::new("eu-west").unwrap();
        assert_eq!(site_rtt_key(&b), "rtt/eu-west");
        assert_eq!(parse_site_rtt_key("rtt/eu-west"), Some(b));
        for bad in ["rtt/", "rtt/a/b", "rtt/Eu", "remote/eu", "eu"] {
            assert_eq!(parse_site_rtt_key(bad), None, "{bad}");
        }
        let d = SiteDistance {
            v: VERSION,
            rtt_us: 1_250,
        };
        assert_eq!(decode::<SiteDistance>(&encode(&d)).unwrap(), d);
    }

    #[test]
    fn service_keys_round_trip() {
        let k = ServiceKey::parse("shop/api").unwrap();
        assert_eq!(service_key(&k), "svc/shop/api");
        assert_eq!(parse_service_key("svc/shop/api"), Some(k.clone()));
        assert_eq!(parse_service_key("svc/shop"), None);
        assert_eq!(parse_service_key("node"), None);
        assert_eq!(parse_service_key("svc/Shop/api"), None);
        let east = Label::new("east").unwrap();
        assert_eq!(remote_key(&east, &k), "remote/east/shop/api");
        assert_eq!(
            parse_remote_key("remote/east/shop/api"),
            Some((east, k.clone()))
        );
        for bad in [
            "remote/east/shop",
            "remote/east/shop/api/x",
            "remote/East/shop/api",
        ] {
            assert_eq!(parse_remote_key(bad), None, "{bad}");
        }
        assert_eq!(export_key(&k), "exp/shop/api");
        assert_eq!(parse_export_key("exp/shop/api"), Some(k));
        assert_eq!(parse_export_key("exp/shop/api/x"), None);
    }

    #[test]
    fn values_round_trip_and_check_version() {
        let n = NodeInfo {
            v: VERSION,
            inbound: "127.0.0.2:15008".parse().unwrap(),
            datacenter: Label::new("dc1").unwrap(),
            zone: Label::new("a").unwrap(),
            site: None,
            state: NodeState::Serving,
        };
        let s = encode(&n);
        assert_eq!(decode::<NodeInfo>(&s).unwrap(), n);
        let newer = s.replace("\"v\":1", "\"v\":2");
        assert!(matches!(
            decode::<NodeInfo>(&newer),
            Err(Error::UnsupportedVersion(2))
        ));
        assert!(matches!(decode::<NodeInfo>("{"), Err(Error::Malformed(_))));
        // A node from before sites reads as one without a site, and one with a site writes it.
        assert!(!s.contains("site"));
        let with_site = NodeInfo {
            site: Some(Label::new("east").unwrap()),
            ..n
        };
        assert_eq!(decode::<NodeInfo>(&encode(&with_site)).unwrap(), with_site);
        let svc = ServiceInfo {
            v: VERSION,
            protocol: "tcp".into(),
            labels: [("version".to_owned(), "v1".to_owned())].into(),
            healthy: true,
        };
        assert_eq!(decode::<ServiceInfo>(&encode(&svc)).unwrap(), svc);
    }
}
