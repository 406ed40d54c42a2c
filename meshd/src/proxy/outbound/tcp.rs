//! The outbound side of TCP upstreams: one mTLS connection per app connection, to an endpoint
//! on the endpoint path (circuit breaker, locality, balancer, failover on a failed connect),
//! relayed byte for byte until both sides close.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::warn;

use super::super::compiled::Destination;
use super::super::connect::{self, Error};
use super::super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::super::shared::Shared;
use super::super::{balance, breaker, copy, endpoints, observe};
use crate::membership::Endpoint;
use mesh_api::ServiceKey;

/// Proxies one connection of `source` (an app's, or a gateway's client's) to `service`;
/// `preamble` (a PROXY protocol header) is sent to the service before the app's bytes.
pub async fn serve(
    mut app: TcpStream,
    peer: SocketAddr,
    source: &ServiceKey,
    service: &ServiceKey,
    shared: &Shared,
    cursor: &AtomicUsize,
    preamble: Option<&[u8]>,
) {
    let _ = app.set_nodelay(true);
    let started = Instant::now();
    // The connection's record, finished on every way out.
    let record =
        |dst: Option<&Endpoint>, t: copy::Transferred, error: Option<String>| observe::Record {
            direction: Direction::Outbound,
            started,
            src_addr: peer,
            src_service: Some(source.clone()),
            src_identity: None,
            mtls: true,
            dst_service: service.clone(),
            dst_addr: dst.map(|e| e.addr),
            dst_site: dst.filter(|e| e.sni.is_some()).map(|e| e.site.clone()),
            kind: observe::Kind::Tcp {
                to_service: t.to_service,
                to_caller: t.to_caller,
                failed: error.is_some(),
            },
            decision: None,
            trace_id: None,
            error: error.unwrap_or_default(),
        };
    let dst = shared.compiled().destination(service);
    let opened = match open(shared, source, &dst, cursor, preamble).await {
        Ok(opened) => opened,
        Err(why) => {
            copy::reset(&app);
            observe::finish(
                shared,
                record(None, copy::Transferred::default(), Some(why)),
            );
            return;
        }
    };
    let index = opened.index;
    let (t, error) = relay(&mut app, opened, source, &dst, shared).await;
    observe::finish(shared, record(Some(&dst.targets[index].endpoint), t, error));
}

/// A connection to an endpoint of the destination, admitted by its circuit breaker.
struct Opened {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// The endpoint (index into the destination's targets).
    index: usize,
    /// The breaker slot, held for the connection's life.
    _slot: breaker::Admitted,
    /// Counts the connection as outstanding on the endpoint (least request, EWMA).
    _in_flight: balance::InFlight,
}

/// Admits one connection of `source` to `dst` (circuit breaker) and dials it; `Err` says why
/// not, already counted and logged.
async fn open(
    shared: &Shared,
    source: &ServiceKey,
    dst: &Destination,
    cursor: &AtomicUsize,
    preamble: Option<&[u8]>,
) -> Result<Opened, String> {
    let max = (dst.policy.as_ref())
        .and_then(|p| p.circuit_breaker.as_ref())
        .and_then(|c| c.max_connections);
    let Some(slot) = dst.breaker.admit(max) else {
        shared.metrics.reject(Direction::Outbound, "overflow");
        warn!(src.service = %source, dst.service = %dst.service, max_connections = max, "outbound connection refused: circuit breaker open");
        return Err("circuit breaker open (max_connections)".to_owned());
    };
    match dial(shared, source, dst, cursor).await {
        Ok((mut stream, index)) => {
            if let Some(p) = preamble
                && let Err(e) = stream.write_all(p).await
            {
                copy::reset(stream.get_ref().0);
                return Err(format!("sending the PROXY header: {e}"));
            }
            Ok(Opened {
                stream,
                index,
                _slot: slot,
                _in_flight: dst.targets[index].state.stats.start(),
            })
        }
        Err(e) => {
            if !matches!(
                e,
                Error::Connect { .. } | Error::Timeout { .. } | Error::Handshake { .. }
            ) {
                shared.metrics.reject(Direction::Outbound, e.reason());
            }
            warn!(src.service = %source, dst.service = %dst.service, reason = e.reason(), error = %e, "outbound connection failed");
            Err(e.to_string())
        }
    }
}

/// Relays between the app and the endpoint until both sides close, the drain's grace period
/// ends or the server's certificate is revoked; a reset by the endpoint feeds its outlier
/// detection. Returns the bytes moved and the error, if any.
async fn relay(
    app: &mut TcpStream,
    opened: Opened,
    source: &ServiceKey,
    dst: &Destination,
    shared: &Shared,
) -> (copy::Transferred, Option<String>) {
    let addr = dst.targets[opened.index].endpoint.addr;
    let labels = ServiceLabels {
        direction: Direction::Outbound,
        service: dst.service.to_string(),
    };
    shared.metrics.connections.get_or_create(&labels).inc();
    let _active = ActiveGuard::new(&shared.metrics, Direction::Outbound);
    let mut force = shared.force_rx.clone();
    let mut deny_rx = shared.deny_rx.clone();
    let serial = crate::deny::peer_serial(opened.stream.get_ref().1);
    // Which side failed, if the copy fails: a reset by the endpoint counts against it.
    let mut stream = copy::Blamed::new(opened.stream);
    let result = tokio::select! {
        r = copy::bidirectional(app, &mut stream, true) => r,
        _ = mesh_runtime::drain::until_true(&mut force) => {
            copy::reset(app);
            Err(std::io::Error::other("closed at the end of the drain grace period"))
        }
        () = crate::deny::until_denied(serial.as_deref(), &mut deny_rx) => {
            copy::reset(app);
            shared.metrics.reject(Direction::Outbound, super::super::tls::REASON_CERT_REVOKED);
            warn!(src.service = %source, dst.service = %dst.service, dst.addr = %addr, "connection closed: the server's certificate was revoked");
            Err(std::io::Error::other("closed: the server's certificate was revoked"))
        }
    };
    match result {
        Ok(t) => (t, None),
        Err(e) => {
            copy::reset(stream.get_ref().get_ref().0);
            if stream.failed() {
                let now = tokio::time::Instant::now();
                connect::record(
                    shared,
                    dst,
                    opened.index,
                    balance::Outcome::ConnectFailure,
                    now,
                );
            }
            (copy::Transferred::default(), Some(e.to_string()))
        }
    }
}

/// Dials `dst` for one connection of `source`: the endpoint path, stepping over failed
/// connects.
async fn dial(
    shared: &Shared,
    source: &ServiceKey,
    dst: &Destination,
    cursor: &AtomicUsize,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, usize), Error> {
    let client = (shared.tls_rx.borrow().clients.get(source).cloned())
        .ok_or_else(|| Error::NoCertificate(source.to_string()))?;
    let cursor = cursor.fetch_add(1, Ordering::Relaxed);
    let order = connect::order(
        shared,
        dst,
        None,
        endpoints::DEFAULT_TCP_LOAD_BALANCER,
        cursor,
    );
    if order.is_empty() {
        return Err(Error::NoEndpoints(dst.service.to_string()));
    }
    connect::dial(shared, &client, dst, &order).await
}
