//! The outbound side: accepts an app's connection on an upstream's local port, picks an
//! endpoint of the upstream service from the mesh view, and originates mTLS to that host's
//! inbound port, presenting the calling service's identity and checking the callee's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use tracing::warn;

use super::connect::{self, Error};
use super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::{Shared, balance, copy, observe};
use crate::config::{Service, Upstream};

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
    let service = &upstream.service;
    let policy = {
        let snapshot = shared.policy_rx.borrow().clone();
        shared.http.table(&snapshot).destination(service).cloned()
    };
    // Circuit breaker: connections open to the destination from this host.
    let max = (policy.as_ref())
        .and_then(|p| p.circuit_breaker.as_ref())
        .and_then(|c| c.max_connections);
    let Some(_slot) = shared.http.admit(service, max) else {
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
    let targets = connect::targets(shared, service);
    let dst_set = connect::Destination {
        service,
        targets: &targets,
        policy: policy.as_deref(),
    };
    let (tls_stream, i) = match dial(shared, source, &dst_set, cursor).await {
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
    let addr = targets[i].endpoint.addr;
    // Least-request and EWMA balancing of TCP count open connections as outstanding.
    let _in_flight = targets[i].state.stats.start();
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
    // Which side failed, if the copy fails: a reset by the endpoint counts against it.
    let mut tls_stream = copy::Blamed::new(tls_stream);
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
            copy::reset(tls_stream.get_ref().get_ref().0);
            if tls_stream.failed() {
                let now = std::time::Instant::now();
                connect::record(shared, &dst_set, i, balance::Outcome::ConnectFailure, now);
            }
            (copy::Transferred::default(), Some(e.to_string()))
        }
    };
    observe::finish(shared, record(Some(addr), t, error));
}

/// Dials `dst` for one connection of `source`: the endpoint path, stepping over failed
/// connects.
async fn dial(
    shared: &Shared,
    source: &Service,
    dst: &connect::Destination<'_>,
    cursor: &AtomicUsize,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, usize), Error> {
    let client = (shared.tls_rx.borrow().clients.get(&source.key).cloned())
        .ok_or_else(|| Error::NoCertificate(source.key.to_string()))?;
    let order = connect::order(shared, dst, None, cursor.fetch_add(1, Ordering::Relaxed));
    if order.is_empty() {
        return Err(Error::NoEndpoints(dst.service.to_string()));
    }
    connect::dial(shared, &client, dst, &order).await
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
