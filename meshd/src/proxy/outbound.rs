//! The outbound side: accepts an app's connection on an upstream's local port, picks an
//! endpoint of the upstream service from the mesh view, and originates mTLS to that host's
//! inbound port, presenting the calling service's identity and checking the callee's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

use super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::{Blame, Shared, copy, observe, route, tls};
use crate::config::{Service, Upstream};

/// Endpoints tried for one connection before giving up (first choice + fallbacks).
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Why an outbound connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Gossip knows no usable endpoint.
    #[error("no healthy endpoint of {0} is known")]
    NoEndpoints(String),
    /// The calling service has no certificate yet.
    #[error("{0} has no workload certificate yet (is the registry reachable?)")]
    NoCertificate(String),
    /// TCP connect failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// Endpoint.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TCP connect or TLS handshake timed out.
    #[error("{what} with {addr} timed out")]
    Timeout {
        /// Connect or handshake.
        what: &'static str,
        /// Endpoint.
        addr: SocketAddr,
    },
    /// TLS handshake failed (including the server proving the wrong identity).
    #[error("tls handshake with {addr} failed: {source}")]
    Handshake {
        /// Endpoint.
        addr: SocketAddr,
        /// Bounded reason.
        reason: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Bounded reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoEndpoints(_) => "no_endpoints",
            Self::NoCertificate(_) => "no_certificate",
            Self::Connect { .. } => "connect_failed",
            Self::Timeout { .. } => "timeout",
            Self::Handshake { reason, .. } => reason,
        }
    }

    /// Who is at fault.
    pub fn blame(&self) -> Blame {
        match self {
            Self::NoEndpoints(_) | Self::NoCertificate(_) => Blame::Internal,
            Self::Connect { .. } | Self::Timeout { .. } | Self::Handshake { .. } => Blame::Upstream,
        }
    }

    /// Whether another endpoint may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } => true,
            // A wrong identity is a security event: never paper over it with a retry.
            Self::Handshake { reason, .. } => *reason != "identity_mismatch",
            Self::NoEndpoints(_) | Self::NoCertificate(_) => false,
        }
    }
}

/// Whether the app's first bytes on `tcp` (waiting at most
/// [`super::inbound::PROTOCOL_DETECT_TIMEOUT`]) start an HTTP/1 request or the HTTP/2 preface.
async fn looks_like_http(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match timeout(super::inbound::PROTOCOL_DETECT_TIMEOUT, tcp.peek(&mut buf)).await {
        Ok(Ok(n)) => starts_like_http(&buf[..n]),
        _ => false,
    }
}

/// Whether `bytes` begin an HTTP/1 request line (`METHOD ` with a token method) or the
/// HTTP/2 connection preface.
pub fn starts_like_http(bytes: &[u8]) -> bool {
    if bytes.starts_with(b"PRI * HTTP/2") {
        return true;
    }
    let Some(space) = bytes.iter().position(|&b| b == b' ') else {
        return false;
    };
    // RFC 9110 methods are tokens; the common ones are upper-case letters.
    (1..=10).contains(&space) && bytes[..space].iter().all(u8::is_ascii_uppercase)
}

/// Accepts app connections for one upstream until `stop_rx` turns true.
pub async fn serve(
    listener: Arc<TcpListener>,
    source: Service,
    upstream: Upstream,
    shared: Shared,
    stops: super::Stops,
) {
    let cursor = Arc::new(AtomicUsize::new(0));
    let (source, upstream) = (Arc::new(source), Arc::new(upstream));
    let drain = shared.drain.clone();
    super::accept_loop(listener, "outbound", drain, stops, |tcp, peer| {
        let (shared, cursor, source, upstream) = (
            shared.clone(),
            cursor.clone(),
            source.clone(),
            upstream.clone(),
        );
        Some(async move {
            // Decided per connection from what the upstream's instances gossip, so a service
            // that changes protocol is followed without a restart here. With no instance
            // known, the app's first bytes tell: an HTTP client then gets a 503 saying so
            // rather than a reset.
            let http = match super::http::outbound::is_http(&shared, &upstream) {
                Some(http) => http,
                None => looks_like_http(&tcp).await,
            };
            if http {
                super::http::outbound::serve(tcp, peer, source, upstream, shared, cursor).await;
            } else {
                handle(tcp, peer, &source, &upstream, &shared, &cursor).await;
            }
        })
    })
    .await;
}

/// Accepts app connections on a service's `http_proxy` listener until `stop_rx` turns true;
/// each request goes to the mesh service its host names.
pub async fn serve_http_proxy(
    listener: Arc<TcpListener>,
    source: Service,
    shared: Shared,
    stops: super::Stops,
) {
    let cursor = Arc::new(AtomicUsize::new(0));
    let source = Arc::new(source);
    let bind = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let drain = shared.drain.clone();
    super::accept_loop(listener, "http_proxy", drain, stops, |tcp, peer| {
        let (shared, cursor, source) = (shared.clone(), cursor.clone(), source.clone());
        Some(super::http::outbound::serve_by_host(
            tcp, peer, source, bind, shared, cursor,
        ))
    })
    .await;
}

async fn connect(
    shared: &Shared,
    source: &Service,
    upstream: &Upstream,
    cursor: &AtomicUsize,
) -> Result<(TlsStream<TcpStream>, SocketAddr, String), Error> {
    let dst = upstream.service.to_string();
    let client = shared
        .tls_rx
        .borrow()
        .clients
        .get(&source.key)
        .cloned()
        .ok_or_else(|| Error::NoCertificate(source.key.to_string()))?;
    let view = shared.view_rx.borrow().clone();
    let endpoints = view
        .endpoints
        .get(&upstream.service)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let candidates = route::pick(
        endpoints,
        cursor.fetch_add(1, Ordering::Relaxed),
        MAX_CONNECT_ATTEMPTS,
    );
    if candidates.is_empty() {
        return Err(Error::NoEndpoints(dst));
    }
    let name =
        ServerName::try_from(upstream.service.sni()).expect("service SNI is a valid DNS name");
    let mut last = None;
    for ep in candidates {
        match attempt(shared, &client, false, name.clone(), ep.addr).await {
            Ok(s) => return Ok((s, ep.addr, ep.node.clone())),
            Err(e) => {
                shared.metrics.reject(Direction::Outbound, e.reason());
                debug!(dst.addr = %ep.addr, error = %e, "endpoint failed");
                let retry = e.is_retryable();
                last = Some(e);
                if !retry {
                    break;
                }
            }
        }
    }
    Err(last.expect("at least one candidate was tried"))
}

/// One endpoint: a resumed session that turns out to carry an expired server certificate is
/// refused, that server's tickets are dropped, and the connection is retried with a full
/// handshake (which verifies the server's current certificate and starts a fresh ticket chain).
/// The retry does not offer a ticket at all: connections that resumed before the certificate
/// expired may still be storing tickets of the old chain after the `forget`.
pub(super) async fn attempt(
    shared: &Shared,
    client: &tls::Client,
    h2: bool,
    name: ServerName<'static>,
    addr: SocketAddr,
) -> Result<TlsStream<TcpStream>, Error> {
    let (config, fresh) = if h2 {
        (&client.h2_config, &client.fresh_h2_config)
    } else {
        (&client.config, &client.fresh_config)
    };
    let connector = TlsConnector::from(config.clone());
    match attempt_once(shared, &connector, name.clone(), addr).await {
        Err(Error::Handshake {
            reason: STALE_RESUMPTION,
            ..
        }) => {
            // Counted, not logged: this is the normal cost of a peer's certificate rotation.
            shared.metrics.reject(Direction::Outbound, STALE_RESUMPTION);
            client.tickets.forget(&name);
            let connector = TlsConnector::from(fresh.clone());
            attempt_once(shared, &connector, name, addr).await
        }
        other => other,
    }
}

/// Reason of a refused resumed session (peer certificate expired since the ticket was issued).
const STALE_RESUMPTION: &str = "stale_resumption";

async fn attempt_once(
    shared: &Shared,
    connector: &TlsConnector,
    name: ServerName<'static>,
    addr: SocketAddr,
) -> Result<TlsStream<TcpStream>, Error> {
    let cfg = shared.config();
    let tcp = match timeout(cfg.outbound.connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(Error::Timeout {
                what: "connect",
                addr,
            });
        }
        Ok(Err(source)) => return Err(Error::Connect { addr, source }),
        Ok(Ok(t)) => t,
    };
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let tls = match timeout(cfg.inbound.handshake_timeout, connector.connect(name, tcp)).await {
        Err(_) => {
            return Err(Error::Timeout {
                what: "tls handshake",
                addr,
            });
        }
        Ok(Err(source)) => {
            return Err(Error::Handshake {
                addr,
                reason: tls::failure_reason(&source),
                source,
            });
        }
        Ok(Ok(t)) => t,
    };
    shared
        .metrics
        .handshake_duration
        .observe(started.elapsed().as_secs_f64());
    if tls::resumed_with_stale_cert(tls.get_ref().1) {
        copy::reset(tls.get_ref().0);
        return Err(Error::Handshake {
            addr,
            reason: STALE_RESUMPTION,
            source: std::io::Error::other("resumed session of an expired server certificate"),
        });
    }
    shared
        .metrics
        .handshake(Direction::Outbound, tls.get_ref().1);
    if let Some(serial) = crate::deny::denied_peer(&shared.deny_rx.borrow(), tls.get_ref().1) {
        copy::reset(tls.get_ref().0);
        return Err(Error::Handshake {
            addr,
            reason: super::inbound::REASON_CERT_REVOKED,
            source: std::io::Error::other(format!("server certificate {serial} is revoked")),
        });
    }
    Ok(tls)
}

async fn handle(
    mut app: TcpStream,
    peer: SocketAddr,
    source: &Service,
    upstream: &Upstream,
    shared: &Shared,
    cursor: &AtomicUsize,
) {
    let _ = app.set_nodelay(true);
    let started = Instant::now();
    let dst = upstream.service.to_string();
    // The connection's record, finished on every way out.
    let record = |dst_addr: Option<SocketAddr>, t: copy::Transferred, error: Option<String>| {
        observe::Record {
            direction: Direction::Outbound,
            started,
            src_addr: peer,
            src_service: Some(source.key.clone()),
            src_identity: None,
            mtls: true,
            dst_service: upstream.service.clone(),
            dst_addr,
            kind: observe::Kind::Tcp {
                to_service: t.to_service,
                to_caller: t.to_caller,
                failed: error.is_some(),
            },
            decision: None,
            trace_id: None,
            error: error.unwrap_or_default(),
        }
    };
    // Circuit breaker: connections open to the destination from this host.
    let max = {
        let snapshot = shared.policy_rx.borrow().clone();
        let table = shared.http.table(&snapshot);
        (table.destination(&upstream.service))
            .and_then(|p| p.circuit_breaker.as_ref())
            .and_then(|c| c.max_connections)
    };
    let Some(_slot) = shared.http.admit(&upstream.service, max) else {
        shared.metrics.reject(Direction::Outbound, "overflow");
        warn!(src.service = %source.key, dst.service = %dst, max_connections = max, "outbound connection refused: circuit breaker open");
        copy::reset(&app);
        let why = "circuit breaker open (max_connections)".to_owned();
        observe::finish(
            shared,
            record(None, copy::Transferred::default(), Some(why)),
        );
        return;
    };
    let (mut tls_stream, addr, _node) = match connect(shared, source, upstream, cursor).await {
        Ok(c) => c,
        Err(e) => {
            if !matches!(
                e,
                Error::Connect { .. } | Error::Timeout { .. } | Error::Handshake { .. }
            ) {
                shared.metrics.reject(Direction::Outbound, e.reason());
            }
            warn!(src.service = %source.key, dst.service = %dst, reason = e.reason(), error = %e, "outbound connection failed");
            copy::reset(&app);
            let rec = record(None, copy::Transferred::default(), Some(e.to_string()));
            observe::finish(shared, rec);
            return;
        }
    };
    shared
        .metrics
        .connections
        .get_or_create(&ServiceLabels {
            direction: Direction::Outbound,
            service: dst.clone(),
        })
        .inc();
    let _active = ActiveGuard::new(&shared.metrics, Direction::Outbound);
    let mut force = shared.force_rx.clone();
    let mut deny_rx = shared.deny_rx.clone();
    let serial = crate::deny::peer_serial(tls_stream.get_ref().1);
    let result = tokio::select! {
        r = copy::bidirectional(&mut app, &mut tls_stream, true) => r,
        _ = mesh_runtime::drain::until_true(&mut force) => {
            copy::reset(&app);
            Err(std::io::Error::other("closed at the end of the drain grace period"))
        }
        () = crate::deny::until_denied(serial.as_deref(), &mut deny_rx) => {
            copy::reset(&app);
            shared.metrics.reject(Direction::Outbound, super::inbound::REASON_CERT_REVOKED);
            warn!(src.service = %source.key, dst.service = %dst, dst.addr = %addr, "connection closed: the server's certificate was revoked");
            Err(std::io::Error::other("closed: the server's certificate was revoked"))
        }
    };
    let (t, error) = match result {
        Ok(t) => (t, None),
        Err(e) => {
            copy::reset(tls_stream.get_ref().0);
            (copy::Transferred::default(), Some(e.to_string()))
        }
    };
    observe::finish(shared, record(Some(addr), t, error));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_http_apart() {
        #[rustfmt::skip]
        let cases: &[(&[u8], bool)] = &[
            (b"GET / HTTP/1.1\r\n", true),
            (b"POST /x HTTP/1.1", true),
            (b"OPTIONS * HTTP/1.1", true),
            (b"PRI * HTTP/2.0\r\n\r\nSM", true),
            (b"GET", false),            // not yet a request line
            (b"get / HTTP/1.1", false),  // methods are case-sensitive
            (b"\x16\x03\x01\x02\x00", false),
            (b"SSH-2.0-OpenSSH", false),
            (b" / HTTP/1.1", false),
            (b"", false),
            (b"VERYLONGMETHOD / HTTP/1.1", false),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                starts_like_http(bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
