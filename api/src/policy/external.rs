//! ExternalService: a destination outside the mesh (an API on the internet, a managed database)
//! that mesh apps reach through their meshd like a mesh service — by an upstream port, or by
//! host name on the `http_proxy` listener — with TLS originated by the mesh (the server's
//! certificate checked against a CA file and the expected name, always), Routes and
//! DestinationPolicy applied, and optionally only through the hosts of an egress gateway.
//!
//! The service is named like the resource (`<namespace>/<name>`): an upstream names it,
//! AuthorizationPolicy selects it (`selector.service`) where it is enforced — at its egress
//! gateway — and Routes and DestinationPolicy target it.

use std::net::SocketAddr;

use serde::Serialize;
use serde_json::{Map, Value};

use super::decode::{self, Cx, Table, choice_enum};
use super::gateway::{self, Hostname};
use crate::name::Label;

/// The suffix of the server names a meshd uses to reach an ExternalService through an egress
/// gateway: `<service>.<gateway>.<namespace>.egress.mesh`.
pub const EGRESS_SNI_SUFFIX: &str = "egress.mesh";

/// `kind = "ExternalService"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExternalService {
    /// The names apps use for it (the `Host` on the `http_proxy` listener); the first is the
    /// name dialled when there are no static endpoints, and the name TLS expects by default.
    pub hosts: Vec<Hostname>,
    /// The port on the external endpoints.
    pub port: u16,
    /// What the app speaks to its meshd.
    pub protocol: ExternalProtocol,
    /// Static endpoints; empty: the first host's DNS addresses, resolved per new connection.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<ExternalEndpoint>,
    /// TLS originated by the mesh; absent: bytes leave as the app sent them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsOrigination>,
    /// A Gateway in the same namespace whose hosts alone connect to the service; callers'
    /// meshd send to them over mTLS, and they authorize each caller by its identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_gateway: Option<Label>,
}

choice_enum! {
    /// What an app speaks to an ExternalService through its meshd.
    pub enum ExternalProtocol {
        /// HTTP/1.1 per request (Routes, retries, timeouts apply); sent as HTTP/1.1, in TLS
        /// when `tls` is set.
        Http = "http",
        /// Bytes relayed (in TLS when `tls` is set; an app's own TLS passes untouched without).
        Tcp = "tcp",
    }
}

/// A static endpoint, with its locality for locality-aware load balancing and failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExternalEndpoint {
    /// IP address and port.
    pub address: SocketAddr,
    /// Locality (empty: none).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub datacenter: String,
    /// Locality (empty: none).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone: String,
}

/// TLS the mesh originates to the external service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsOrigination {
    /// The CA certificates (PEM) the server's chain must lead to; an absolute path on every
    /// host that connects (the callers', or the egress gateway's).
    pub ca_file: String,
    /// The SNI sent and the name the certificate must carry (a DNS SAN, or an IP SAN for an
    /// address); default: the first host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// A client certificate chain (PEM) presented when the server asks; with `key_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// The client certificate's private key (PEM); with `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

// === impl ExternalService ===

impl ExternalService {
    /// The name TLS sends and verifies.
    pub fn server_name(&self) -> &str {
        (self.tls.as_ref())
            .and_then(|t| t.server_name.as_deref())
            .unwrap_or_else(|| self.hosts[0].as_str())
    }

    /// Whether `host` (lowercase, without port) is one of its names.
    pub fn has_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h.as_str() == host)
    }
}

/// The server name of `service` reached through `gateway`, both in `namespace`.
pub fn egress_sni(service: &Label, gateway: &Label, namespace: &Label) -> String {
    format!("{service}.{gateway}.{namespace}.{EGRESS_SNI_SUFFIX}")
}

/// Reverses [`egress_sni`]: (service, gateway, namespace).
pub fn parse_egress_sni(sni: &str) -> Option<(Label, Label, Label)> {
    let rest = sni.strip_suffix(EGRESS_SNI_SUFFIX)?.strip_suffix('.')?;
    let mut parts = rest.split('.');
    let (svc, gw, ns) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some((
        Label::new(svc).ok()?,
        Label::new(gw).ok()?,
        Label::new(ns).ok()?,
    ))
}

// === decoding ===

const KEYS: &[&str] = &[
    "hosts",
    "port",
    "protocol",
    "endpoints",
    "tls",
    "egress_gateway",
];

pub(crate) fn external_service(map: &Map<String, Value>, cx: &mut Cx) -> Option<ExternalService> {
    let t = Table::from_map(map, "", KEYS, cx);
    let hosts = t.req(
        "hosts",
        "a list of host names such as [\"api.example.com\"]",
        cx,
        |v, at, cx| {
            let hs = decode::nonempty_list(v, at, cx, "name the service's host", host)?;
            decode::no_duplicates(&hs, at, cx, "host", |h| format!("{:?}", h.as_str()))
                .then_some(hs)
        },
    );
    let port = t.req("port", "a port such as 443", cx, |v, at, cx| {
        decode::u16_in(v, at, cx, 1, u16::MAX)
    });
    let protocol = t.req(
        "protocol",
        "\"http\" or \"tcp\"",
        cx,
        decode::choice::<ExternalProtocol>,
    );
    let endpoints = t.opt("endpoints", cx, |v, at, cx| {
        let eps = decode::nonempty_list(
            v,
            at,
            cx,
            "omit `endpoints` to resolve the first host by DNS",
            endpoint,
        )?;
        decode::no_duplicates(&eps, at, cx, "address", |e| e.address.to_string()).then_some(eps)
    });
    let tls = t.opt("tls", cx, tls);
    let egress_gateway = t.opt("egress_gateway", cx, decode::label);
    let given_ok = ["endpoints", "tls", "egress_gateway"]
        .iter()
        .all(|k| !t.has(k) || given(k, &endpoints, &tls, &egress_gateway));
    let svc = ExternalService {
        hosts: hosts?,
        port: port?,
        protocol: protocol?,
        endpoints: endpoints.unwrap_or_default(),
        tls,
        egress_gateway,
    };
    given_ok.then_some(svc)
}

/// Whether an optional key that was given also decoded (its problem is already reported).
fn given(
    key: &str,
    endpoints: &Option<Vec<ExternalEndpoint>>,
    tls: &Option<TlsOrigination>,
    gw: &Option<Label>,
) -> bool {
    match key {
        "endpoints" => endpoints.is_some(),
        "tls" => tls.is_some(),
        _ => gw.is_some(),
    }
}

fn host(v: &Value, at: &str, cx: &mut Cx) -> Option<Hostname> {
    let h = gateway::hostname(v, at, cx)?;
    if h.is_wildcard() {
        cx.error(
            at,
            format!("{h} is a wildcard; an ExternalService is dialled by name, so list each host"),
        );
        return None;
    }
    if h.as_str() == "mesh" || h.as_str().ends_with(".mesh") {
        cx.error(
            at,
            format!("{h} is a mesh service name (*.mesh is reserved); choose the external host's real name"),
        );
        return None;
    }
    Some(h)
}

fn endpoint(v: &Value, at: &str, cx: &mut Cx) -> Option<ExternalEndpoint> {
    let t = Table::new(v, at, &["address", "datacenter", "zone"], cx)?;
    let address = t.req(
        "address",
        "an IP address and port such as \"203.0.113.7:443\"",
        cx,
        |v, at, cx| {
            let s = decode::string(v, at, cx)?;
            match s.parse::<SocketAddr>() {
                Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => Some(a),
                _ => {
                    cx.error(at, format!("{s:?} is not an IP address with a port; expected e.g. \"203.0.113.7:443\" or \"[2001:db8::7]:443\""));
                    None
                }
            }
        },
    );
    let datacenter = t.opt("datacenter", cx, decode::label);
    let zone = t.opt("zone", cx, decode::label);
    if (t.has("datacenter") && datacenter.is_none()) || (t.has("zone") && zone.is_none()) {
        return None;
    }
    Some(ExternalEndpoint {
        address: address?,
        datacenter: datacenter
            .map(|l| l.as_str().to_owned())
            .unwrap_or_default(),
        zone: zone.map(|l| l.as_str().to_owned()).unwrap_or_default(),
    })
}

fn tls(v: &Value, at: &str, cx: &mut Cx) -> Option<TlsOrigination> {
    let t = Table::new(
        v,
        at,
        &["ca_file", "server_name", "cert_file", "key_file"],
        cx,
    )?;
    let ca_file = t.req(
        "ca_file",
        "the path of the CA certificates (PEM) the server's certificate must chain to",
        cx,
        gateway::absolute_path,
    );
    let server_name = t.opt("server_name", cx, server_name);
    let cert_file = t.opt("cert_file", cx, gateway::absolute_path);
    let key_file = t.opt("key_file", cx, gateway::absolute_path);
    let mut ok = ["server_name", "cert_file", "key_file"]
        .iter()
        .zip([
            server_name.is_some(),
            cert_file.is_some(),
            key_file.is_some(),
        ])
        .all(|(k, got)| !t.has(k) || got);
    if t.has("cert_file") != t.has("key_file") {
        let missing = if t.has("cert_file") {
            "key_file"
        } else {
            "cert_file"
        };
        cx.error(
            &t.key(missing),
            "missing; a client certificate needs both cert_file and key_file",
        );
        ok = false;
    }
    let tls = TlsOrigination {
        ca_file: ca_file?,
        server_name,
        cert_file,
        key_file,
    };
    ok.then_some(tls)
}

/// A DNS name or an IP address: what the server's certificate must name.
fn server_name(v: &Value, at: &str, cx: &mut Cx) -> Option<String> {
    let s = decode::nonempty(v, at, cx)?;
    let dns_ok = Hostname::new(&s).is_ok_and(|h| !h.is_wildcard());
    if dns_ok || s.parse::<std::net::IpAddr>().is_ok() {
        return Some(s);
    }
    cx.error(
        at,
        format!("{s:?} is not a server name; expected a lowercase DNS name such as \"api.example.com\" or an IP address"),
    );
    None
}

#[cfg(test)]
mod tests;
