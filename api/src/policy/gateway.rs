//! Gateway: listeners on the hosts that run the gateway, through which traffic from outside the
//! mesh reaches mesh services (HTTP and HTTPS routed by attached Routes, TLS passed through by
//! SNI, TCP), and the host-name matching both the listeners and the Routes use.
//!
//! A gateway's identity is the workload identity of the service named like the resource
//! (`spiffe://<td>/ns/<namespace>/svc/<name>`): callers behind it are authorized as "the
//! gateway", and only hosts whose join token allows that service can obtain it.

use std::net::SocketAddr;

use serde::Serialize;
use serde_json::{Map, Value};

use super::decode::{self, Cx, Table, choice_enum};
use crate::name::{Label, NodeName};

/// `kind = "Gateway"`: the listeners of a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gateway {
    /// At least one; names and addresses unique within the gateway.
    pub listeners: Vec<Listener>,
}

/// One address the gateway hosts listen on, and what arrives there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    /// Unique within the gateway; Routes and status refer to it.
    pub name: Label,
    /// Address and port, e.g. `0.0.0.0:8443`.
    pub bind: SocketAddr,
    /// What the listener speaks.
    pub protocol: ListenerProtocol,
    /// Host names served (`Host`/`:authority` for HTTP, SNI for TLS); empty = any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<Hostname>,
    /// TLS termination (`https` only, required there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsTermination>,
    /// The mesh service (in the gateway's namespace) every connection goes to (`tcp`, `tls`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<Label>,
    /// `http` only: answer every request with a permanent redirect to `https` on this port
    /// (308, so methods and bodies are kept) instead of routing it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_to_https_port: Option<u16>,
    /// A PROXY protocol (v1 or v2) header is expected before anything else on each connection
    /// (set when a load balancer in front sends one); its source address is the client's.
    pub proxy_protocol: bool,
    /// `tcp` and `tls` only: each connection to the service starts with a PROXY protocol header
    /// of this version naming the client, which the app reads (HTTP listeners say it in
    /// `x-forwarded-for` and `forwarded`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_proxy_protocol: Option<ProxyVersion>,
}

choice_enum! {
    /// A PROXY protocol version to send.
    pub enum ProxyVersion {
        /// The text line (`PROXY TCP4 ...`).
        V1 = "v1",
        /// The binary header.
        V2 = "v2",
    }
}

choice_enum! {
    /// What a gateway listener speaks.
    pub enum ListenerProtocol {
        /// Plaintext HTTP/1.1 (and h2c prior knowledge), routed by attached Routes.
        Http = "http",
        /// TLS terminated with certificates from files, then HTTP routed by attached Routes.
        Https = "https",
        /// TLS passed through untouched to `service`, chosen by SNI among `hostnames`.
        Tls = "tls",
        /// Bytes relayed to `service`.
        Tcp = "tcp",
    }
}

choice_enum! {
    /// Lowest TLS version a terminating listener accepts.
    pub enum TlsVersion {
        /// TLS 1.2 and 1.3.
        V1_2 = "1.2",
        /// TLS 1.3 only.
        V1_3 = "1.3",
    }
}

/// TLS termination of an `https` listener, from files on the gateway hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsTermination {
    /// Certificate chains and keys (PEM). A client's SNI picks the certificate whose names
    /// cover it; the first is served when none does (or without SNI).
    pub certificates: Vec<CertificateFiles>,
    /// Lowest version accepted.
    pub min_version: TlsVersion,
    /// When set, clients must present a certificate issued by a CA in this PEM file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<String>,
}

/// A certificate chain and its private key, absolute paths on the gateway host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateFiles {
    /// The chain, leaf first.
    pub cert_file: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

/// A host name to match: exact (`shop.example.com`) or a wildcard (`*.example.com`, one or
/// more labels in front of the suffix, as in the Kubernetes Gateway API). Lowercase.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Hostname(String);

/// How well a [`Hostname`] matches a host: higher is more specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Specificity {
    /// A wildcard, by the number of characters of its suffix (longer is more specific).
    Wildcard(usize),
    /// The exact name.
    Exact,
}

// === impl Hostname ===

impl Hostname {
    /// Validates `s`; the error says what would be valid.
    pub fn new(s: &str) -> Result<Self, String> {
        let name = s.strip_prefix("*.").unwrap_or(s);
        if s == "*" {
            return Err("\"*\" is not a host name; omit `hostnames` to serve any host".to_owned());
        }
        if name.contains('*') || NodeName::new(name).is_err() || name != name.to_lowercase() {
            return Err(format!(
                "{s:?} is not a host name; expected e.g. \"shop.example.com\" or \"*.example.com\" (lowercase)"
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a `*.` wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// How this name matches `host` (lowercase, without port or trailing dot), if it does.
    pub fn matches(&self, host: &str) -> Option<Specificity> {
        match self.0.strip_prefix('*') {
            // `*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`.
            Some(suffix) => (host.len() > suffix.len() && host.ends_with(suffix))
                .then_some(Specificity::Wildcard(suffix.len())),
            None => (self.0 == host).then_some(Specificity::Exact),
        }
    }

    /// Whether every host this name matches is also matched by `outer` (a Route's host names
    /// must lie within its listener's).
    pub fn within(&self, outer: &Hostname) -> bool {
        match (self.0.strip_prefix('*'), outer.0.strip_prefix('*')) {
            (None, _) => outer.matches(&self.0).is_some(),
            (Some(mine), Some(theirs)) => mine.ends_with(theirs),
            (Some(_), None) => false,
        }
    }
}

impl std::fmt::Display for Hostname {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The most specific of `names` that matches `host`; `Some(None)` when `names` is empty (any
/// host), `None` when none matches.
pub fn best_match(names: &[Hostname], host: &str) -> Option<Option<Specificity>> {
    if names.is_empty() {
        return Some(None);
    }
    names.iter().filter_map(|n| n.matches(host)).max().map(Some)
}

/// The host part of an HTTP `Host`/`:authority` or an SNI value, lowercased, without port or
/// trailing dot; `None` when what remains is no host name.
pub fn normalize_host(raw: &str) -> Option<String> {
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    NodeName::new(&host).ok().map(|_| host)
}

/// Why a Route does not attach to a listener.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAttached {
    /// Only `http` and `https` listeners route requests.
    #[error("listener {listener} is {protocol}; Routes attach to http and https listeners only")]
    NotHttp {
        /// The listener's name.
        listener: String,
        /// Its protocol.
        protocol: ListenerProtocol,
    },
    /// None of the Route's host names overlaps the listener's.
    #[error(
        "no host name of the route ({route}) overlaps listener {listener}'s ({listener_hosts})"
    )]
    NoCommonHost {
        /// The listener's name.
        listener: String,
        /// The Route's names, comma-separated.
        route: String,
        /// The listener's names, comma-separated.
        listener_hosts: String,
    },
    /// `http` listeners that redirect to https route nothing.
    #[error("listener {listener} redirects every request to https; attach to the https listener")]
    Redirects {
        /// The listener's name.
        listener: String,
    },
}

/// Whether a Route with `route_hosts` attaches to `listener`.
pub fn attaches(route_hosts: &[Hostname], listener: &Listener) -> Result<(), NotAttached> {
    let name = || listener.name.to_string();
    if !matches!(
        listener.protocol,
        ListenerProtocol::Http | ListenerProtocol::Https
    ) {
        return Err(NotAttached::NotHttp {
            listener: name(),
            protocol: listener.protocol,
        });
    }
    if listener.redirect_to_https_port.is_some() {
        return Err(NotAttached::Redirects { listener: name() });
    }
    let overlap = route_hosts.is_empty()
        || listener.hostnames.is_empty()
        || (route_hosts.iter())
            .any(|r| (listener.hostnames.iter()).any(|l| r.within(l) || l.within(r)));
    if overlap {
        return Ok(());
    }
    let list = |hs: &[Hostname]| {
        hs.iter()
            .map(Hostname::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(NotAttached::NoCommonHost {
        listener: name(),
        route: list(route_hosts),
        listener_hosts: list(&listener.hostnames),
    })
}

// === decoding ===

pub(crate) fn gateway(map: &Map<String, Value>, cx: &mut Cx) -> Option<Gateway> {
    let t = Table::from_map(map, "", &["listeners"], cx);
    let listeners = t.req(
        "listeners",
        "a list of [[resource.listeners]] entries",
        cx,
        |v, at, cx| {
            let ls =
                decode::nonempty_list(v, at, cx, "add one [[resource.listeners]] entry", listener)?;
            let names = decode::no_duplicates(&ls, at, cx, "listener name", |l| {
                format!("{:?}", l.name.as_str())
            });
            let binds = decode::no_duplicates(&ls, at, cx, "bind address", |l| l.bind.to_string());
            (names && binds).then_some(ls)
        },
    );
    Some(Gateway {
        listeners: listeners?,
    })
}

const LISTENER_KEYS: &[&str] = &[
    "name",
    "bind",
    "protocol",
    "hostnames",
    "tls",
    "service",
    "redirect_to_https_port",
    "proxy_protocol",
    "send_proxy_protocol",
];

fn listener(v: &Value, at: &str, cx: &mut Cx) -> Option<Listener> {
    let t = Table::new(v, at, LISTENER_KEYS, cx)?;
    let name = t.req("name", "a name such as \"https\"", cx, decode::label);
    let bind = t.req("bind", "an address such as \"0.0.0.0:8443\"", cx, bind);
    let protocol = t.req(
        "protocol",
        "\"http\", \"https\", \"tls\" or \"tcp\"",
        cx,
        decode::choice::<ListenerProtocol>,
    );
    let hostnames = t.opt("hostnames", cx, |v, at, cx| {
        decode::nonempty_list(v, at, cx, "omit `hostnames` to serve any host", hostname)
    });
    let tls = t.opt("tls", cx, tls);
    let service = t.opt("service", cx, decode::label);
    let redirect = t.opt("redirect_to_https_port", cx, |v, at, cx| {
        decode::u16_in(v, at, cx, 1, u16::MAX)
    });
    let proxy_protocol = t.opt("proxy_protocol", cx, decode::boolean);
    let send_proxy_protocol = t.opt("send_proxy_protocol", cx, decode::choice::<ProxyVersion>);
    let l = Listener {
        name: name?,
        bind: bind?,
        protocol: protocol?,
        hostnames: hostnames.unwrap_or_default(),
        tls,
        service,
        redirect_to_https_port: redirect,
        proxy_protocol: proxy_protocol.unwrap_or(false),
        send_proxy_protocol,
    };
    let fields_ok = [
        "hostnames",
        "tls",
        "service",
        "redirect_to_https_port",
        "proxy_protocol",
        "send_proxy_protocol",
    ]
    .iter()
    .all(|k| !t.has(k) || present(&l, k));
    (fields_ok && consistent(&l, &t, cx)).then_some(l)
}

/// Whether an optional key that was given also decoded (its problem is already reported).
fn present(l: &Listener, key: &str) -> bool {
    match key {
        "hostnames" => !l.hostnames.is_empty(),
        "tls" => l.tls.is_some(),
        "service" => l.service.is_some(),
        "redirect_to_https_port" => l.redirect_to_https_port.is_some(),
        "send_proxy_protocol" => l.send_proxy_protocol.is_some(),
        _ => true,
    }
}

/// The protocol decides which fields a listener needs and which it must not have.
fn consistent(l: &Listener, t: &Table<'_>, cx: &mut Cx) -> bool {
    use ListenerProtocol::{Http, Https, Tcp, Tls};
    let p = l.protocol;
    let mut ok = true;
    let mut refuse = |key: &str, why: String| {
        cx.error(&t.key(key), why);
        ok = false;
    };
    match (p, &l.tls) {
        (Https, None) => refuse(
            "tls",
            "missing; an https listener terminates TLS: give [resource.listeners.tls] with certificates".to_owned(),
        ),
        (Http | Tcp | Tls, Some(_)) => refuse(
            "tls",
            format!("only https listeners terminate TLS (this one is {p}; a tls listener passes TLS through)"),
        ),
        _ => {}
    }
    match (p, &l.service) {
        (Tcp | Tls, None) => refuse(
            "service",
            format!("missing; a {p} listener sends every connection to one mesh service: name it"),
        ),
        (Http | Https, Some(_)) => refuse(
            "service",
            format!(
                "{p} listeners send requests where the Routes attached to the gateway say; remove `service` and attach a Route"
            ),
        ),
        _ => {}
    }
    if p == Tcp && !l.hostnames.is_empty() {
        refuse(
            "hostnames",
            "a tcp listener sees no host name; remove `hostnames` (use protocol \"tls\" to select by SNI)".to_owned(),
        );
    }
    if matches!(p, Http | Https) && l.send_proxy_protocol.is_some() {
        refuse(
            "send_proxy_protocol",
            format!(
                "a {p} listener passes the client address in x-forwarded-for and forwarded; send_proxy_protocol is for tcp and tls listeners"
            ),
        );
    }
    if p != Http && l.redirect_to_https_port.is_some() {
        refuse(
            "redirect_to_https_port",
            format!("only http listeners redirect to https (this one is {p})"),
        );
    }
    ok
}

fn bind(v: &Value, at: &str, cx: &mut Cx) -> Option<SocketAddr> {
    let s = decode::string(v, at, cx)?;
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Some(a),
        _ => {
            cx.error(
                at,
                format!("{s:?} is not an address with a port; expected e.g. \"0.0.0.0:8443\" or \"[::]:8443\""),
            );
            None
        }
    }
}

pub(crate) fn hostname(v: &Value, at: &str, cx: &mut Cx) -> Option<Hostname> {
    let s = decode::string(v, at, cx)?;
    Hostname::new(&s).map_err(|e| cx.error(at, e)).ok()
}

fn tls(v: &Value, at: &str, cx: &mut Cx) -> Option<TlsTermination> {
    let t = Table::new(
        v,
        at,
        &["certificates", "min_version", "client_ca_file"],
        cx,
    )?;
    let certificates = t.req(
        "certificates",
        "a list of { cert_file, key_file } entries",
        cx,
        |v, at, cx| {
            let certs = decode::nonempty_list(
                v,
                at,
                cx,
                "add one { cert_file = \"...\", key_file = \"...\" } entry",
                certificate,
            )?;
            decode::no_duplicates(&certs, at, cx, "certificate file", |c| {
                format!("{:?}", c.cert_file)
            })
            .then_some(certs)
        },
    );
    let min_version = t.opt("min_version", cx, decode::choice::<TlsVersion>);
    let client_ca_file = t.opt("client_ca_file", cx, absolute_path);
    if (t.has("min_version") && min_version.is_none())
        || (t.has("client_ca_file") && client_ca_file.is_none())
    {
        return None;
    }
    Some(TlsTermination {
        certificates: certificates?,
        min_version: min_version.unwrap_or(TlsVersion::V1_2),
        client_ca_file,
    })
}

fn certificate(v: &Value, at: &str, cx: &mut Cx) -> Option<CertificateFiles> {
    let t = Table::new(v, at, &["cert_file", "key_file"], cx)?;
    let cert_file = t.req(
        "cert_file",
        "the certificate chain's path",
        cx,
        absolute_path,
    );
    let key_file = t.req("key_file", "the private key's path", cx, absolute_path);
    Some(CertificateFiles {
        cert_file: cert_file?,
        key_file: key_file?,
    })
}

pub(crate) fn absolute_path(v: &Value, at: &str, cx: &mut Cx) -> Option<String> {
    let p = decode::nonempty(v, at, cx)?;
    if !p.starts_with('/') {
        cx.error(
            at,
            format!("{p:?} must be an absolute path, e.g. \"/etc/meshd/gateway/tls.crt\""),
        );
        return None;
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Hostname {
        Hostname::new(s).unwrap()
    }

    #[test]
    fn host_names() {
        for bad in [
            "*",
            "*.",
            "a.*.com",
            "Shop.example.com",
            "",
            "a..b",
            "*.*.a",
        ] {
            assert!(Hostname::new(bad).is_err(), "{bad}");
        }
        use Specificity::*;
        let cases = [
            ("shop.example.com", "shop.example.com", Some(Exact)),
            ("shop.example.com", "x.shop.example.com", None),
            ("*.example.com", "shop.example.com", Some(Wildcard(12))),
            ("*.example.com", "a.b.example.com", Some(Wildcard(12))),
            ("*.example.com", "example.com", None),
            ("*.example.com", "badexample.com", None),
            ("*.com", "example.com", Some(Wildcard(4))),
        ];
        for (name, host, want) in cases {
            assert_eq!(h(name).matches(host), want, "{name} vs {host}");
        }
    }

    #[test]
    fn the_most_specific_name_wins() {
        let names = [h("*.com"), h("*.example.com"), h("shop.example.com")];
        assert_eq!(
            best_match(&names, "shop.example.com"),
            Some(Some(Specificity::Exact))
        );
        assert_eq!(
            best_match(&names, "api.example.com"),
            Some(Some(Specificity::Wildcard(12)))
        );
        assert_eq!(best_match(&names, "example.org"), None);
        assert_eq!(best_match(&[], "anything.org"), Some(None));
        assert!(Specificity::Exact > Specificity::Wildcard(100));
    }

    #[test]
    fn names_within_names() {
        let cases = [
            ("shop.example.com", "*.example.com", true),
            ("*.shop.example.com", "*.example.com", true),
            ("*.example.com", "*.example.com", true),
            ("*.example.com", "shop.example.com", false),
            ("*.example.com", "*.shop.example.com", false),
            ("shop.example.org", "*.example.com", false),
            ("shop.example.com", "shop.example.com", true),
        ];
        for (inner, outer, want) in cases {
            assert_eq!(h(inner).within(&h(outer)), want, "{inner} within {outer}");
        }
    }

    #[test]
    fn hosts_are_normalized() {
        let cases = [
            ("Shop.Example.com", Some("shop.example.com")),
            ("shop.example.com:8443", Some("shop.example.com")),
            ("shop.example.com.", Some("shop.example.com")),
            ("[::1]:8443", None),
            ("shop.example.com:x", None),
            ("", None),
            ("a b", None),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_host(raw).as_deref(), want, "{raw}");
        }
    }
}
