//! Pooled HTTP/2 connections to other hosts' inbound ports, one per calling service,
//! destination service and endpoint: reused while live and made under the current
//! certificates, at most one connection attempt per key at a time (the others wait and take
//! what it pooled), retired after `max_requests_per_connection`, closed on drain or when the
//! peer's certificate is revoked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_api::ServiceKey;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tracing::{Instrument as _, debug, debug_span, warn};

use super::connect;
use super::http::{Body, H2_KEEPALIVE_INTERVAL, H2_KEEPALIVE_TIMEOUT};
use super::metrics::Direction;
use super::tls::TlsState;

/// A pooled connection's calling service, destination service and endpoint. The destination
/// is part of it because a host's one inbound port serves all its services and picks the
/// service per connection (by SNI): a connection made for one service cannot carry requests
/// for another on the same host.
pub type Key = (ServiceKey, ServiceKey, SocketAddr);

/// Serializes connection attempts to one key; the value is when the last one failed.
type ConnectSlot = Arc<tokio::sync::Mutex<Option<Instant>>>;

/// One pooled connection, with the TLS state it was made under: a connection made before a
/// certificate rotation is not reused after it.
struct Pooled {
    tls: Arc<TlsState>,
    sender: SendRequest<Body>,
    /// Requests given to it so far.
    requests: u32,
}

/// Why [`Pool::checkout`] has no connection for a key.
#[derive(Debug)]
pub enum Miss {
    /// Dialling failed.
    Dial(connect::Error),
    /// Another request's attempt to this endpoint failed while this one waited for it: the
    /// endpoint is not dialled again at once (a dead one would cost each waiter a timeout).
    PeerFailed,
    /// The TLS connection was made but HTTP/2 could not start on it.
    Handshake,
}

/// The pool of one node.
#[derive(Default)]
pub struct Pool {
    peers: Mutex<HashMap<Key, Pooled>>,
    connecting: Mutex<HashMap<Key, ConnectSlot>>,
}

impl Pool {
    /// A ready connection for `key` made under `tls`: pooled, or made now with `dial` (one
    /// attempt per key at a time; requests that waited for it take the one it pooled).
    pub async fn checkout<F, Fut>(
        &self,
        shared: &impl connect::Env,
        key: &Key,
        tls: &Arc<TlsState>,
        max_requests: Option<u32>,
        dial: F,
    ) -> Result<SendRequest<Body>, Miss>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<TlsStream<TcpStream>, connect::Error>>,
    {
        if let Some(sender) = self.ready(key, tls, max_requests).await {
            return Ok(sender);
        }
        // A burst of requests on a cold pool (start, certificate rotation) would otherwise
        // open one TLS connection each, hundreds of handshakes at once, overflowing the
        // peer's accept queue (SYN retries: 1 s stalls).
        let waited_from = Instant::now();
        let mut failed_at = self.slot(key).lock_owned().await;
        if let Some(sender) = self.ready(key, tls, max_requests).await {
            return Ok(sender);
        }
        if failed_at.is_some_and(|t| t >= waited_from) {
            return Err(Miss::PeerFailed);
        }
        let stream = match dial().await {
            Ok(stream) => stream,
            Err(e) => {
                *failed_at = Some(Instant::now());
                return Err(Miss::Dial(e));
            }
        };
        match handshake(shared, stream, key.2).await {
            Some(sender) => {
                self.put(key, Arc::clone(tls), sender.clone(), max_requests);
                *failed_at = None;
                Ok(sender)
            }
            None => {
                *failed_at = Some(Instant::now());
                Err(Miss::Handshake)
            }
        }
    }

    /// The pooled connection for `key`, if live, made under `tls` and ready for a request.
    async fn ready(
        &self,
        key: &Key,
        tls: &Arc<TlsState>,
        max_requests: Option<u32>,
    ) -> Option<SendRequest<Body>> {
        let mut sender = self.take(key, tls, max_requests)?;
        sender.ready().await.ok()?;
        Some(sender)
    }

    /// A live pooled connection for `key` made under `tls`, counting the request about to be
    /// sent on it: the one that reaches `max_requests` is its last, and it leaves the pool.
    fn take(
        &self,
        key: &Key,
        tls: &Arc<TlsState>,
        max_requests: Option<u32>,
    ) -> Option<SendRequest<Body>> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let p = peers.get_mut(key)?;
        if p.sender.is_closed() || !Arc::ptr_eq(&p.tls, tls) {
            // Closed, or made with certificates since rotated: let in-flight requests
            // finish on it, use a fresh one from now on.
            peers.remove(key);
            return None;
        }
        let sender = p.sender.clone();
        p.requests += 1;
        if !keeps_serving(p.requests, max_requests) {
            peers.remove(key);
        }
        Some(sender)
    }

    /// Pools a new connection that is about to carry its first request (unless that is
    /// already all `max_requests` allows).
    fn put(
        &self,
        key: &Key,
        tls: Arc<TlsState>,
        sender: SendRequest<Body>,
        max_requests: Option<u32>,
    ) {
        if !keeps_serving(1, max_requests) {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let pooled = Pooled {
            tls,
            sender,
            requests: 1,
        };
        peers.insert(key.clone(), pooled);
    }

    /// Drops the pooled connection for `key` if it has closed (a request just failed on it);
    /// a newer live one, pooled meanwhile by another request, stays.
    pub fn forget(&self, key: &Key) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.get(key).is_some_and(|p| p.sender.is_closed()) {
            peers.remove(key);
        }
    }

    fn slot(&self, key: &Key) -> ConnectSlot {
        let mut m = self
            .connecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(m.entry(key.clone()).or_default())
    }
}

/// Starts HTTP/2 on `stream` (bounded like the TLS handshake before it: other requests wait
/// on this attempt) and spawns its driver; `None` if it could not start.
async fn handshake(
    shared: &impl connect::Env,
    stream: TlsStream<TcpStream>,
    addr: SocketAddr,
) -> Option<SendRequest<Body>> {
    let serial = crate::deny::peer_serial(stream.get_ref().1);
    let handshake = tokio::time::timeout(
        shared.config().outbound.connect_timeout,
        hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake::<_, Body>(TokioIo::new(stream)),
    )
    .await;
    let (mut sender, driver) = match handshake {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => {
            shared
                .metrics()
                .reject(Direction::Outbound, "http2_handshake_failed");
            debug!(dst.addr = %addr, error = %e, "http/2 handshake failed");
            return None;
        }
        Err(_) => {
            shared
                .metrics()
                .reject(Direction::Outbound, "http2_handshake_failed");
            debug!(dst.addr = %addr, "http/2 handshake timed out");
            return None;
        }
    };
    let mut force = shared.force_rx().clone();
    let mut deny_rx = shared.deny_rx().clone();
    let metrics = shared.metrics().clone();
    // Runs until the last sender is dropped (pool eviction), the peer closes or stops
    // answering keep-alive pings, the drain's grace period is over, or the peer's certificate
    // is revoked (the pool then drops the closed sender).
    tokio::spawn(
        async move {
            tokio::select! {
                r = driver => if let Err(e) = r {
                    debug!(error = %e, "http/2 connection to a peer ended with an error");
                },
                _ = mesh_runtime::drain::until_true(&mut force) => {}
                () = crate::deny::until_denied(serial.as_deref(), &mut deny_rx) => {
                    metrics.reject(Direction::Outbound, super::tls::REASON_CERT_REVOKED);
                    warn!(dst.addr = %addr, "http/2 connection closed: the server's certificate was revoked");
                }
            }
        }
        .instrument(debug_span!("h2", dst.addr = %addr)),
    );
    sender.ready().await.ok()?;
    Some(sender)
}

/// Whether a connection that has been given `requests` requests may take more under
/// `max_requests_per_connection` (`None` or 0: no limit).
pub fn keeps_serving(requests: u32, max_requests: Option<u32>) -> bool {
    match max_requests {
        None | Some(0) => true,
        Some(max) => requests < max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_serve_up_to_max_requests() {
        #[rustfmt::skip]
        let cases: &[(u32, Option<u32>, bool)] = &[
            (1, None, true),
            (1_000_000, None, true),
            (5, Some(0), true),
            (1, Some(1), false),
            (1, Some(2), true),
            (2, Some(2), false),
            (9, Some(10), true),
            (10, Some(10), false),
        ];
        for (requests, max, want) in cases {
            assert_eq!(
                keeps_serving(*requests, *max),
                *want,
                "{requests} of {max:?}"
            );
        }
    }
}
