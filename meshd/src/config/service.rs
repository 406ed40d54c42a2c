//! Service files (`services_dir/*.toml`, one local service each): parsing, validation, and the
//! checks across files and against the node file (duplicate services, clashing binds).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mesh_api::name::{DEFAULT_NAMESPACE, Label, ServiceKey};
use serde::{Deserialize, Serialize};

use super::check::{self, Checker};
use super::health::{self, RawCheck};
use super::{Config, Error, Problem};
use crate::health::Check;

/// A local service: the app listening on this host and the upstreams it may call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// `namespace/name`.
    #[serde(serialize_with = "super::ser_display")]
    pub key: ServiceKey,
    /// Where the app listens on this host; meshd forwards inbound connections here.
    pub address: SocketAddr,
    /// An extra address where meshd accepts this service's callers directly: mesh clients over
    /// mTLS and, while PeerAuthentication is PERMISSIVE for the service, plaintext clients not
    /// yet in the mesh (told apart by their first byte). Typically the address the app used to
    /// listen on before it moved behind meshd.
    pub listen: Option<SocketAddr>,
    /// Application protocol.
    pub protocol: Protocol,
    /// Free-form labels (`[A-Za-z0-9._-]`, at most 63 characters each).
    pub labels: BTreeMap<String, String>,
    /// Local listeners meshd opens for the app to reach other services.
    pub upstreams: Vec<Upstream>,
    /// A local HTTP listener where the app reaches any HTTP-family mesh service by host name
    /// (`http://api.mesh/`, e.g. as its `HTTP_PROXY`), without declaring an upstream port.
    pub http_proxy: Option<SocketAddr>,
    /// Health checks of the app; the service is healthy iff every check is, so always
    /// without checks.
    pub checks: Vec<Check>,
    /// The file the service was declared in.
    pub file: PathBuf,
}

/// A service the app calls through a local listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upstream {
    /// The service called.
    #[serde(serialize_with = "super::ser_display")]
    pub service: ServiceKey,
    /// Local address the app connects to.
    pub bind: SocketAddr,
}

/// Application protocol of a service: how meshd talks to the app and whether requests are
/// seen one by one (L7) or as a byte stream (L4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Bytes are proxied as they are.
    Tcp,
    /// The app speaks HTTP/1.1 (keep-alive).
    Http,
    /// The app speaks HTTP/2 without TLS (prior knowledge).
    Http2,
    /// gRPC: HTTP/2 to the app, with gRPC status codes and trailers.
    Grpc,
}

/// A service file as written; unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawService {
    /// Required label.
    pub name: Option<String>,
    /// Label, `default` unless set.
    pub namespace: String,
    /// Required IP address and port.
    pub address: Option<String>,
    /// Optional IP address and port.
    pub listen: Option<String>,
    /// `tcp`.
    pub protocol: String,
    /// `[labels]`.
    pub labels: BTreeMap<String, String>,
    /// `[[upstreams]]`.
    pub upstreams: Vec<RawUpstream>,
    /// Optional IP address and port.
    pub http_proxy: Option<String>,
    /// `[[checks]]`.
    pub checks: Vec<RawCheck>,
}

/// One `[[upstreams]]` entry as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawUpstream {
    /// Required `name` or `namespace/name`.
    pub service: Option<String>,
    /// Required IP address and port.
    pub bind: Option<String>,
}

// === impl Service ===

impl Service {
    /// Parses and validates one service file; `path` names the file in problems.
    pub fn from_toml_str(path: &Path, text: &str) -> Result<Service, Vec<Problem>> {
        let raw: RawService = check::from_toml(path, text)?;
        raw.validate(path)
    }
}

// === impl Protocol ===

impl Protocol {
    /// Every protocol.
    pub const ALL: &[Protocol] = &[
        Protocol::Tcp,
        Protocol::Http,
        Protocol::Http2,
        Protocol::Grpc,
    ];

    /// The name used in service files and gossip.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }

    /// Whether meshd proxies requests (L7) rather than bytes.
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }

    /// Reads the name a service file or gossip uses.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|p| p.as_str() == s)
    }

    fn parse(s: &str) -> Result<Self, String> {
        Self::from_name(s).ok_or_else(|| {
            let valid = Self::ALL
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            format!("unknown protocol {s:?} (valid: {valid})")
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl RawService ===

impl RawService {
    /// Checks every key, reporting all problems; `path` names the file in problems.
    pub fn validate(self, path: &Path) -> Result<Service, Vec<Problem>> {
        let mut c = Checker::new(path);
        let service = self.check(&mut c, path);
        match service {
            Some(service) if c.is_empty() => Ok(service),
            _ => Err(c.into_problems()),
        }
    }

    fn check(self, c: &mut Checker<'_>, path: &Path) -> Option<Service> {
        let name = c.required("name", self.name.as_deref()).and_then(|v| {
            let r = Label::new(v);
            c.parsed("name", v, r)
        });
        let namespace = c.parsed("namespace", &self.namespace, Label::new(&self.namespace));
        let address = c
            .required("address", self.address.as_deref())
            .and_then(|v| app_address(c, v));
        let listen = match self.listen.as_deref() {
            None => Some(None),
            Some(v) => listen_address(c, v).map(Some),
        };
        let http_proxy = match self.http_proxy.as_deref() {
            None => Some(None),
            Some(v) => local_bind(c, "http_proxy", v).map(Some),
        };
        let protocol = match Protocol::parse(&self.protocol) {
            Ok(p) => Some(p),
            Err(message) => {
                c.push("protocol", message);
                None
            }
        };
        let labels_ok = check_labels(c, &self.labels);
        // Check every upstream before giving up on any, so all problems are reported.
        let upstreams: Vec<Option<Upstream>> = (self.upstreams.iter().enumerate())
            .map(|(i, u)| u.check(c, i))
            .collect();
        let checks = health::check_all(c, &self.checks, address);
        Some(Service {
            key: ServiceKey::new(namespace?, name?),
            address: address?,
            listen: listen?,
            protocol: protocol?,
            labels: labels_ok.then_some(self.labels)?,
            upstreams: upstreams.into_iter().collect::<Option<_>>()?,
            http_proxy: http_proxy?,
            checks: checks?,
            file: path.to_owned(),
        })
    }
}

impl Default for RawService {
    fn default() -> Self {
        Self {
            name: None,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            address: None,
            listen: None,
            protocol: Protocol::Tcp.as_str().to_owned(),
            labels: BTreeMap::new(),
            upstreams: Vec::new(),
            http_proxy: None,
            checks: Vec::new(),
        }
    }
}

// === impl RawUpstream ===

impl RawUpstream {
    fn check(&self, c: &mut Checker<'_>, i: usize) -> Option<Upstream> {
        let service_key = format!("upstreams[{i}].service");
        let service = c
            .required(&service_key, self.service.as_deref())
            .and_then(|v| c.parsed(&service_key, v, ServiceKey::parse(v)));
        let bind_key = format!("upstreams[{i}].bind");
        let bind = c
            .required(&bind_key, self.bind.as_deref())
            .and_then(|v| c.socket_addr(&bind_key, v));
        let bind = bind.and_then(|b| {
            if b.port() == 0 {
                c.push(
                    bind_key,
                    format!("{b}: port 0 is not allowed; the app needs a fixed port"),
                );
                return None;
            }
            Some(b)
        });
        Some(Upstream {
            service: service?,
            bind: bind?,
        })
    }
}

/// The app's address: a concrete IP (meshd connects to it) and a non-zero port.
fn app_address(c: &mut Checker<'_>, value: &str) -> Option<SocketAddr> {
    let addr = c.socket_addr("address", value)?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        let message = format!(
            "{value:?} is not an address meshd can connect to; \
             give the IP and port the app listens on, e.g. \"127.0.0.1:8080\""
        );
        c.push("address", message);
        return None;
    }
    Some(addr)
}

/// A listener the app connects to: an IP and a fixed port.
fn local_bind(c: &mut Checker<'_>, key: &str, value: &str) -> Option<SocketAddr> {
    let addr = c.socket_addr(key, value)?;
    if addr.port() == 0 {
        c.push(
            key,
            format!("{addr}: port 0 is not allowed; the app needs a fixed port, e.g. \"127.0.0.1:15001\""),
        );
        return None;
    }
    Some(addr)
}

/// The direct listener: any IP meshd can bind (the unspecified address too) and a fixed port.
fn listen_address(c: &mut Checker<'_>, value: &str) -> Option<SocketAddr> {
    let addr = c.socket_addr("listen", value)?;
    if addr.port() == 0 {
        let message = format!(
            "{addr}: port 0 is not allowed; callers need a fixed port, e.g. \"10.0.0.5:8080\""
        );
        c.push("listen", message);
        return None;
    }
    Some(addr)
}

fn check_labels(c: &mut Checker<'_>, labels: &BTreeMap<String, String>) -> bool {
    let mut ok = true;
    for (name, value) in labels {
        if let Err(why) = check::check_label_text(name) {
            c.push("labels", format!("label name {name:?} is invalid: {why}"));
            ok = false;
        }
        if let Err(why) = check::check_label_text(value) {
            c.push(label_key(name), format!("{value:?} is invalid: {why}"));
            ok = false;
        }
    }
    ok
}

/// `labels.<name>`, with the name quoted unless it is a bare TOML key.
fn label_key(name: &str) -> String {
    let bare = !name.is_empty()
        && (name.chars()).all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        format!("labels.{name}")
    } else {
        format!("labels.{name:?}")
    }
}

/// Parses every `*.toml` file in `dir`, sorted by name, and checks them against each other.
/// Returns the valid services and every problem; `Err` only when a file cannot be read.
/// A service file checked before it is installed: `source` is read as if it were
/// `services_dir/as_name`, replacing the file of that name if there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The file to check (e.g. Ansible's temporary copy).
    pub source: PathBuf,
    /// Its name once installed: a `*.toml` file name, no directories.
    pub as_name: std::ffi::OsString,
}

impl Candidate {
    /// A candidate for `services_dir/as_name`; `as_name` must be a plain `*.toml` file name,
    /// since anything else would not be loaded from the directory.
    pub fn new(source: PathBuf, as_name: std::ffi::OsString) -> Result<Candidate, String> {
        let p = Path::new(&as_name);
        let plain = p.file_name() == Some(as_name.as_os_str());
        if !plain || p.extension().is_none_or(|e| e != "toml") {
            return Err(format!(
                "{}: the name a service file is installed under must be a file name ending in .toml, such as web.toml",
                p.display()
            ));
        }
        Ok(Candidate { source, as_name })
    }
}

pub(super) fn load_dir(
    dir: &Path,
    candidate: Option<&Candidate>,
) -> Result<(Vec<Service>, Vec<Problem>), Error> {
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    // (the path problems name, the file actually read)
    let mut files: Vec<(PathBuf, PathBuf)> = files.into_iter().map(|f| (f.clone(), f)).collect();
    if let Some(c) = candidate {
        // The candidate stands in for its destination: problems name the file it will become.
        let dest = dir.join(&c.as_name);
        files.retain(|(named, _)| *named != dest);
        files.push((dest, c.source.clone()));
    }
    files.sort();

    let mut services = Vec::new();
    let mut problems = Vec::new();
    for (file, source) in files {
        let text = fs::read_to_string(&source).map_err(io_error(&source))?;
        match Service::from_toml_str(&file, &text) {
            Ok(service) => services.push(service),
            Err(p) => problems.extend(p),
        }
    }
    problems.extend(check_across(&services));
    Ok((services, problems))
}

/// Services declared twice, and direct listeners or upstream binds that clash with each other
/// or with an app.
fn check_across(services: &[Service]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut seen: BTreeMap<&ServiceKey, &Path> = BTreeMap::new();
    for service in services {
        if let Some(first) = seen.insert(&service.key, &service.file) {
            let message = format!(
                "service {} is also declared in {}",
                service.key,
                first.display()
            );
            problems.push(Problem::new(&service.file, "name".to_owned(), message));
            // Keep pointing at the first declaration.
            seen.insert(&service.key, first);
        }
    }

    let mut taken: Vec<(SocketAddr, String, &Path)> = services
        .iter()
        .map(|s| (s.address, "address".to_owned(), s.file.as_path()))
        .collect();
    for service in services {
        for (key, bind) in meshd_binds(service) {
            let clash = taken.iter().find(|(b, ..)| check::binds_overlap(*b, bind));
            if let Some((_, other_key, other_file)) = clash {
                let message = format!(
                    "{bind} is already used by {other_key} in {}",
                    other_file.display()
                );
                problems.push(Problem::new(&service.file, key.clone(), message));
            }
            taken.push((bind, key, &service.file));
        }
    }
    problems
}

/// The addresses meshd binds for `service` (its direct listener, then its upstreams), with
/// their keys.
fn meshd_binds(service: &Service) -> Vec<(String, SocketAddr)> {
    let listen = service.listen.map(|l| ("listen".to_owned(), l));
    let proxy = service.http_proxy.map(|l| ("http_proxy".to_owned(), l));
    let upstreams = (service.upstreams.iter().enumerate())
        .map(|(i, u)| (format!("upstreams[{i}].bind"), u.bind));
    listen.into_iter().chain(proxy).chain(upstreams).collect()
}

/// Direct listeners and upstream binds that clash with the node's own listeners.
pub(super) fn check_against_node(
    config: &Config,
    node_file: &Path,
    services: &[Service],
) -> Vec<Problem> {
    let node_binds = [
        ("inbound.bind", config.inbound.bind),
        ("admin.bind", config.admin.bind),
        ("gossip.bind", config.gossip.bind),
    ];
    let mut problems = Vec::new();
    for service in services {
        for (key, bind) in meshd_binds(service) {
            let clash = (node_binds.iter()).find(|(_, b)| check::binds_overlap(*b, bind));
            if let Some((node_key, _)) = clash {
                let message = format!(
                    "{bind} is already used by {node_key} in {}",
                    node_file.display()
                );
                problems.push(Problem::new(&service.file, key, message));
            }
        }
    }
    problems
}
