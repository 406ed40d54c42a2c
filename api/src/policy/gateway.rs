//! Gateway: a listener that lets traffic from outside the mesh reach mesh services by host name.

use std::net::SocketAddr;

use serde::Serialize;
use serde_json::{Map, Value};

use super::decode::{self, Cx, Table};
use crate::name::{Label, NodeName};

/// `kind = "Gateway"`: an ingress listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gateway {
    /// Address the gateway listens on, e.g. `0.0.0.0:8443`.
    pub bind: SocketAddr,
    /// Which host names go where; a host may appear in one server only.
    pub servers: Vec<Server>,
}

/// A set of host names served the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Server {
    /// Host names: `api.example.com`, `*.example.com` or `*`.
    pub hosts: Vec<String>,
    /// TLS termination; none = plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// The mesh service (in the resource's namespace) requests are sent to.
    pub routes_to: Label,
}

/// Certificate and key files on the gateway host (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tls {
    /// Absolute path of the certificate chain.
    pub cert_file: String,
    /// Absolute path of the private key.
    pub key_file: String,
}

// === impl Gateway ===

pub(crate) fn gateway(map: &Map<String, Value>, cx: &mut Cx) -> Option<Gateway> {
    let t = Table::from_map(map, "", &["bind", "servers"], cx);
    let bind = t.req("bind", "an address such as \"0.0.0.0:8443\"", cx, |v, at, cx| {
        let s = decode::string(v, at, cx)?;
        match s.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Some(a),
            _ => {
                cx.error(at, format!("{s:?} is not an address with a port; expected e.g. \"0.0.0.0:8443\" or \"[::]:8443\""));
                None
            }
        }
    });
    let servers = t.req(
        "servers",
        "a list of [[resource.servers]] entries",
        cx,
        |v, at, cx| {
            let servers =
                decode::nonempty_list(v, at, cx, "add one [[resource.servers]] entry", server)?;
            let hosts: Vec<(usize, usize, &String)> = servers
                .iter()
                .enumerate()
                .flat_map(|(i, s)| s.hosts.iter().enumerate().map(move |(j, h)| (i, j, h)))
                .collect();
            let mut ok = true;
            for (n, (i, j, h)) in hosts.iter().enumerate() {
                if let Some((fi, _, _)) = hosts[..n].iter().find(|(_, _, x)| x == h) {
                    cx.error(
                        &format!("{at}[{i}].hosts[{j}]"),
                        format!(
                            "host {h:?} is already served by {at}[{fi}]; each host may appear once"
                        ),
                    );
                    ok = false;
                }
            }
            ok.then_some(servers)
        },
    );
    Some(Gateway {
        bind: bind?,
        servers: servers?,
    })
}

fn server(v: &Value, at: &str, cx: &mut Cx) -> Option<Server> {
    let t = Table::new(v, at, &["hosts", "tls", "routes_to"], cx)?;
    let hosts = t.req(
        "hosts",
        "host names such as [\"api.example.com\"]",
        cx,
        |v, at, cx| decode::nonempty_list(v, at, cx, "use [\"*\"] for any host", host),
    );
    let tls = t.opt("tls", cx, tls);
    let routes_to = t.req(
        "routes_to",
        "the name of the mesh service to send requests to",
        cx,
        decode::label,
    );
    Some(Server {
        hosts: hosts?,
        tls,
        routes_to: routes_to?,
    })
}

fn host(v: &Value, at: &str, cx: &mut Cx) -> Option<String> {
    let h = decode::string(v, at, cx)?;
    let name = h.strip_prefix("*.").unwrap_or(&h);
    if h != "*" && NodeName::new(name).is_err() {
        cx.error(
            at,
            format!("{h:?} is not a host name; expected e.g. \"api.example.com\", \"*.example.com\" or \"*\" (lowercase)"),
        );
        return None;
    }
    Some(h)
}

fn tls(v: &Value, at: &str, cx: &mut Cx) -> Option<Tls> {
    let t = Table::new(v, at, &["cert_file", "key_file"], cx)?;
    let file = |v: &Value, at: &str, cx: &mut Cx| {
        let p = decode::nonempty(v, at, cx)?;
        if !p.starts_with('/') {
            cx.error(
                at,
                format!("{p:?} must be an absolute path, e.g. \"/etc/meshd/gateway/tls.crt\""),
            );
            return None;
        }
        Some(p)
    };
    let cert_file = t.req("cert_file", "the certificate chain's path", cx, file);
    let key_file = t.req("key_file", "the private key's path", cx, file);
    Some(Tls {
        cert_file: cert_file?,
        key_file: key_file?,
    })
}
