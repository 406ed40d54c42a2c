//! ExternalServices as this host reaches them itself (no egress gateway in between, or this
//! host is that gateway): the order endpoints are tried in, TLS origination (the server's chain
//! checked against the resource's CA file and its name, never skipped), and the pooled
//! HTTP/1.1 client. Built once per policy change by the compiled proxy state; dialled per connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_api::ServiceKey;
use mesh_api::policy::{ExternalEndpoint, ExternalProtocol, ExternalService, TlsOrigination};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::endpoints::MAX_CONNECT_ATTEMPTS;
use super::http::Body;

/// How long an idle pooled connection to an external service is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long loaded TLS files are used before they are looked at again: a renewed client
/// certificate or CA bundle reaches the next new connection within this.
pub const TLS_FILES_RECHECK: Duration = Duration::from_secs(1);

/// Why a connection to an external service could not be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The TLS settings of the resource cannot be used on this host (a file is unreadable or
    /// holds no usable certificate or key): the operator's to fix on this host.
    #[error("{service}: tls cannot be set up on this host: {reason}")]
    Tls {
        /// The ExternalService.
        service: ServiceKey,
        /// What is wrong, naming the file.
        reason: String,
    },
    /// The first host does not resolve.
    #[error("resolving {host}: {reason}")]
    Resolve {
        /// `host:port`.
        host: String,
        /// The resolver's answer.
        reason: String,
    },
    /// The TCP connect failed.
    #[error("connecting to {addr}: {reason}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// The OS error.
        reason: String,
    },
    /// The TCP connect or the TLS handshake took too long.
    #[error("{what} with {addr} timed out")]
    Timeout {
        /// `connect` or `tls handshake`.
        what: &'static str,
        /// The endpoint.
        addr: SocketAddr,
    },
    /// The TLS handshake failed; a certificate that does not chain to the CA file or does not
    /// name the expected server ends here.
    #[error("tls with {addr} (expecting {name}): {reason}")]
    Handshake {
        /// The endpoint.
        addr: SocketAddr,
        /// The name the certificate must carry.
        name: String,
        /// rustls's reason.
        reason: String,
    },
}

impl Error {
    /// The metrics reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Tls { .. } => "external_tls_config",
            Error::Resolve { .. } => "external_resolve",
            Error::Connect { .. } => "external_connect",
            Error::Timeout { .. } => "external_timeout",
            Error::Handshake { .. } => "external_handshake",
        }
    }
}

/// A connection to an external endpoint: plain, or in TLS the mesh originated.
#[derive(Debug)]
pub enum Io {
    /// Bytes as the app sent them.
    Plain(TcpStream),
    /// TLS originated by this host.
    Tls(Box<TlsStream<TcpStream>>),
}

/// TLS origination as loaded on this host.
struct Origin {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

/// A service's TLS origination and the files it comes from, loaded again when they change.
struct TlsFiles {
    spec: TlsOrigination,
    server_name: String,
    http: bool,
    state: std::sync::Mutex<Loaded>,
}

/// What the files held when last looked at.
struct Loaded {
    /// Modification time and length of each file, to see a change.
    stamps: Vec<Option<(std::time::SystemTime, u64)>>,
    origin: Result<Arc<Origin>, String>,
    checked: tokio::time::Instant,
}

/// Dials one external service: its endpoints in locality order (or its host's DNS
/// addresses), failing over to the next on a failed connect.
pub struct Dialer {
    service: ServiceKey,
    endpoints: Vec<ExternalEndpoint>,
    /// `host:port` when endpoints come from DNS.
    dns: Option<String>,
    tls: Option<TlsFiles>,
    datacenter: String,
    zone: String,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    cursor: AtomicUsize,
}

/// What this host needs to reach one external service itself.
pub struct ExternalClient {
    /// The service.
    pub key: ServiceKey,
    /// Its resource.
    pub spec: Arc<ExternalService>,
    /// Connections for TCP (and under the HTTP client).
    pub dialer: Arc<Dialer>,
    /// HTTP/1.1 with pooled keep-alive connections (HTTP services only).
    http: Option<Client<Connector, Body>>,
    /// `http://<first host>:<port>/`: the pool's key.
    target: Uri,
}

/// The host settings the clients are built with; a change rebuilds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// This host's locality.
    pub datacenter: String,
    /// This host's locality.
    pub zone: String,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// TLS handshake timeout.
    pub handshake_timeout: Duration,
}

// === impl ExternalClient ===

impl std::fmt::Debug for ExternalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalClient")
            .field("key", &self.key)
            .field("target", &self.target)
            .field("tls_problem", &self.tls_problem())
            .finish_non_exhaustive()
    }
}

impl ExternalClient {
    /// Builds the client of `spec` (reading its TLS files; a problem is kept and answered
    /// on every dial, naming the file).
    pub fn new(key: ServiceKey, spec: Arc<ExternalService>, settings: &Settings) -> Self {
        let http = spec.protocol == ExternalProtocol::Http;
        let tls = (spec.tls.as_ref()).map(|t| TlsFiles::new(t, spec.server_name(), http));
        let authority = format!("{}:{}", spec.hosts[0], spec.port);
        let dialer = Arc::new(Dialer {
            service: key.clone(),
            endpoints: spec.endpoints.clone(),
            dns: spec.endpoints.is_empty().then(|| authority.clone()),
            tls,
            datacenter: settings.datacenter.clone(),
            zone: settings.zone.clone(),
            connect_timeout: settings.connect_timeout,
            handshake_timeout: settings.handshake_timeout,
            cursor: AtomicUsize::new(0),
        });
        let http = http.then(|| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_timer(TokioTimer::new())
                // The Host the request carries is the one sent (see `request_target`).
                .set_host(false)
                .build(Connector(dialer.clone()))
        });
        let target = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query("/")
            .build()
            // Not reached (host names and ports are validated); the URI is only a pool key.
            .unwrap_or_else(|_| Uri::from_static("http://external.invalid/"));
        Self {
            key,
            spec,
            dialer,
            http,
            target,
        }
    }

    /// Why the TLS files cannot be used, if they cannot.
    pub fn tls_problem(&self) -> Option<String> {
        self.dialer.tls.as_ref()?.current().err()
    }

    /// The absolute target a request to this service is sent with (the pool's key), and the
    /// `Host` it carries: the app's own when it names one of the service's hosts, else the
    /// first host.
    pub fn request_target(&self, app_host: Option<&str>) -> (Uri, String) {
        let host = app_host
            .and_then(mesh_api::policy::normalize_host)
            .filter(|h| self.spec.has_host(h))
            .map_or_else(
                || self.spec.hosts[0].to_string(),
                |h| {
                    if self.spec.port == 80 || self.spec.port == 443 {
                        h
                    } else {
                        format!("{h}:{}", self.spec.port)
                    }
                },
            );
        (self.target.clone(), host)
    }

    /// Sends `req` (its URI already this service's [`Self::request_target`] with the path).
    pub async fn send(
        &self,
        req: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, SendError> {
        let Some(client) = &self.http else {
            return Err(SendError::NotHttp);
        };
        client.request(req).await.map_err(|e| {
            // The connector's own error says what failed (TLS, DNS, connect).
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                if let Some(c) = s.downcast_ref::<Error>() {
                    return SendError::Connect(c.clone());
                }
                source = s.source();
            }
            SendError::Exchange(e.to_string())
        })
    }
}

/// Why a request to an external service failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made.
    #[error(transparent)]
    Connect(Error),
    /// The exchange failed on a connection.
    #[error("{0}")]
    Exchange(String),
    /// The service is not an HTTP one.
    #[error("not an http service")]
    NotHttp,
}

/// Loads the TLS origination of a service: the CA file, the optional client certificate,
/// the expected name; ALPN offers `http/1.1` for HTTP services.
fn origin(t: &TlsOrigination, server_name: &str, http: bool) -> Result<Origin, String> {
    let read =
        |path: &str| std::fs::read_to_string(path).map_err(|e| format!("{path}: cannot read: {e}"));
    let roots = mesh_runtime::tls::root_store(&read(&t.ca_file)?)
        .map_err(|e| format!("ca_file {}: {e}", t.ca_file))?;
    let builder = ClientConfig::builder_with_provider(mesh_runtime::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match (&t.cert_file, &t.key_file) {
        (Some(cert), Some(key)) => {
            let chain = mesh_runtime::tls::parse_certs(&read(cert)?, "client certificate")
                .map_err(|e| format!("cert_file {cert}: {e}"))?;
            let key_der = mesh_runtime::tls::parse_key(&read(key)?, "client key")
                .map_err(|e| format!("key_file {key}: {e}"))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("cert_file {cert} with key_file {key}: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    if http {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| format!("server name {server_name:?}: {e}"))?;
    Ok(Origin {
        config: Arc::new(config),
        name,
    })
}

// === impl TlsFiles ===

impl TlsFiles {
    fn new(spec: &TlsOrigination, server_name: &str, http: bool) -> Self {
        let state = Loaded {
            stamps: stamps(spec),
            origin: origin(spec, server_name, http).map(Arc::new),
            checked: tokio::time::Instant::now(),
        };
        Self {
            spec: spec.clone(),
            server_name: server_name.to_owned(),
            http,
            state: std::sync::Mutex::new(state),
        }
    }

    /// The origination to use now: the files are looked at again at most every
    /// [`TLS_FILES_RECHECK`] and read again when they changed. A change that does not load
    /// (a certificate written before its key) keeps the previous origination in use.
    fn current(&self) -> Result<Arc<Origin>, String> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        if now.duration_since(st.checked) >= TLS_FILES_RECHECK {
            st.checked = now;
            let stamps = stamps(&self.spec);
            if stamps != st.stamps {
                // Small files, read once per change.
                match origin(&self.spec, &self.server_name, self.http) {
                    Ok(o) => st.origin = Ok(Arc::new(o)),
                    Err(e) if st.origin.is_err() => st.origin = Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "changed TLS files of an external service do not load; the previous ones stay in use")
                    }
                }
                st.stamps = stamps;
            }
        }
        st.origin.clone()
    }
}

/// Modification time and length of each of the origination's files (`None`: unreadable).
fn stamps(t: &TlsOrigination) -> Vec<Option<(std::time::SystemTime, u64)>> {
    [Some(&t.ca_file), t.cert_file.as_ref(), t.key_file.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

// === impl Dialer ===

impl Dialer {
    /// A connection to the service: endpoints tried in order until one connects (at most
    /// [`MAX_CONNECT_ATTEMPTS`]), TLS originated if the service asks for it. Returns the
    /// endpoint reached.
    pub async fn dial(&self) -> Result<(Io, SocketAddr), Error> {
        let origin = match self.tls.as_ref().map(TlsFiles::current) {
            Some(Err(reason)) => {
                return Err(Error::Tls {
                    service: self.service.clone(),
                    reason,
                });
            }
            Some(Ok(o)) => Some(o),
            None => None,
        };
        let origin = origin.as_deref();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let addrs = match &self.dns {
            // The resolver is the OS's: bounded here, it could otherwise hold the app's
            // request for its own retries.
            Some(host) => match timeout(self.connect_timeout, resolve(host, start)).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::Resolve {
                        host: host.clone(),
                        reason: format!("no answer within {:?}", self.connect_timeout),
                    });
                }
            },
            None => order(&self.endpoints, &self.datacenter, &self.zone, start),
        };
        let mut last = None;
        for addr in addrs.into_iter().take(MAX_CONNECT_ATTEMPTS) {
            match self.dial_one(addr, origin).await {
                Ok(io) => return Ok((io, addr)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Resolve {
            host: self.dns.clone().unwrap_or_default(),
            reason: "no address".to_owned(),
        }))
    }

    async fn dial_one(&self, addr: SocketAddr, origin: Option<&Origin>) -> Result<Io, Error> {
        let tcp = match timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(Error::Timeout {
                    what: "connect",
                    addr,
                });
            }
            Ok(Err(e)) => {
                return Err(Error::Connect {
                    addr,
                    reason: e.to_string(),
                });
            }
            Ok(Ok(t)) => t,
        };
        let _ = tcp.set_nodelay(true);
        let Some(o) = origin else {
            return Ok(Io::Plain(tcp));
        };
        let connector = TlsConnector::from(o.config.clone());
        match timeout(
            self.handshake_timeout,
            connector.connect(o.name.clone(), tcp),
        )
        .await
        {
            Err(_) => Err(Error::Timeout {
                what: "tls handshake",
                addr,
            }),
            Ok(Err(e)) => Err(Error::Handshake {
                addr,
                name: o.name.to_str().into_owned(),
                reason: e.to_string(),
            }),
            Ok(Ok(s)) => Ok(Io::Tls(Box::new(s))),
        }
    }
}

/// The addresses `host:port` resolves to, rotated by `start` so connections spread.
async fn resolve(host: &str, start: usize) -> Result<Vec<SocketAddr>, Error> {
    let err = |reason: String| Error::Resolve {
        host: host.to_owned(),
        reason,
    };
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(host)
        .await
        .map_err(|e| err(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(err("no address".to_owned()));
    }
    let n = addrs.len();
    addrs.rotate_left(start % n);
    Ok(addrs)
}

/// The order static endpoints are tried in from a host in `datacenter`/`zone`: the same zone
/// first, then the same datacenter, then the rest; round robin (by `start`) within each.
pub fn order(
    endpoints: &[ExternalEndpoint],
    datacenter: &str,
    zone: &str,
    start: usize,
) -> Vec<SocketAddr> {
    let tier = |e: &ExternalEndpoint| match (e.datacenter == datacenter, e.zone == zone) {
        _ if e.datacenter.is_empty() => 2,
        (true, true) if !e.zone.is_empty() => 0,
        (true, _) => 1,
        _ => 2,
    };
    let mut out = Vec::with_capacity(endpoints.len());
    for t in 0..3 {
        let mut tier_eps: Vec<SocketAddr> = (endpoints.iter())
            .filter(|e| tier(e) == t)
            .map(|e| e.address)
            .collect();
        if !tier_eps.is_empty() {
            let n = tier_eps.len();
            tier_eps.rotate_left(start % n);
            out.extend(tier_eps);
        }
    }
    out
}

// === the HTTP client's connector ===

/// Dials the service whatever the URI says (the URI is only the pool's key).
#[derive(Clone)]
struct Connector(Arc<Dialer>);

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Io>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let dialer = self.0.clone();
        Box::pin(async move { dialer.dial().await.map(|(io, _)| TokioIo::new(io)) })
    }
}

// === impl Io ===

impl Io {
    /// The TCP socket beneath (to reset).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(t) => t,
            Io::Tls(t) => t.get_ref().0,
        }
    }
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_read(cx, buf),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_write(cx, buf),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_flush(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(t) => Pin::new(t).poll_shutdown(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, dc: &str, zone: &str) -> ExternalEndpoint {
        ExternalEndpoint {
            address: addr.parse().unwrap(),
            datacenter: dc.to_owned(),
            zone: zone.to_owned(),
        }
    }

    #[test]
    fn locality_order() {
        let eps = [
            ep("10.0.0.1:443", "dc2", "a"),
            ep("10.0.0.2:443", "dc1", "b"),
            ep("10.0.0.3:443", "dc1", "a"),
            ep("10.0.0.4:443", "", ""),
            ep("10.0.0.5:443", "dc1", "a"),
        ];
        let ports = |v: Vec<SocketAddr>| -> Vec<u8> {
            v.iter()
                .map(|a| match a.ip() {
                    std::net::IpAddr::V4(v4) => v4.octets()[3],
                    std::net::IpAddr::V6(_) => 0,
                })
                .collect()
        };
        // (dc, zone, start, order)
        #[rustfmt::skip]
        let cases: &[(&str, &str, usize, &[u8])] = &[
            ("dc1", "a", 0, &[3, 5, 2, 1, 4]),
            ("dc1", "a", 1, &[5, 3, 2, 4, 1]),
            ("dc1", "b", 0, &[2, 3, 5, 1, 4]),
            ("dc2", "z", 0, &[1, 2, 3, 4, 5]),
            ("dc9", "a", 0, &[1, 2, 3, 4, 5]),
            ("dc9", "a", 2, &[3, 4, 5, 1, 2]),
            ("", "", 0, &[1, 2, 3, 4, 5]),
        ];
        for (dc, zone, start, want) in cases {
            assert_eq!(
                ports(order(&eps, dc, zone, *start)),
                *want,
                "{dc}/{zone} start {start}"
            );
        }
        assert!(order(&[], "dc1", "a", 3).is_empty());
    }

    #[test]
    fn every_endpoint_once_whatever_the_start() {
        let eps: Vec<ExternalEndpoint> = (1..=7)
            .map(|i| {
                ep(
                    &format!("10.0.0.{i}:1"),
                    if i % 2 == 0 { "dc1" } else { "dc2" },
                    "a",
                )
            })
            .collect();
        for start in 0..20 {
            let mut got = order(&eps, "dc1", "a", start);
            got.sort();
            let mut want: Vec<SocketAddr> = eps.iter().map(|e| e.address).collect();
            want.sort();
            assert_eq!(got, want, "start {start}");
        }
    }
}
