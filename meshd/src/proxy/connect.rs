//! Dialling other hosts: one mTLS connection to one endpoint (connect, handshake, the stale
//! resumption retry, the revocation check), the walk over a destination's endpoints in
//! [`endpoints::order`] that steps over failed connects, and what each attempt teaches the
//! endpoint state (reachability, latency, outlier detection).

use std::net::SocketAddr;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

use super::balance;
use super::compiled::Destination;
use super::metrics::Direction;
use super::metrics::Metrics;
use super::{copy, endpoints, tls};

/// What dialling needs of the node: its metrics, configuration (timeouts, locality, outlier
/// settings), revocation list and drain deadline. The node's `Shared` is one; the seam keeps
/// `connect` and `pool` from depending on all of the node's state (and `Shared`, which holds the
/// pool, from an import cycle with them).
pub trait Env {
    /// The proxy's metrics.
    fn metrics(&self) -> &Metrics;
    /// The current configuration.
    fn config(&self) -> std::sync::Arc<crate::config::Config>;
    /// Revoked certificates, checked after each handshake.
    fn deny_rx(&self) -> &tokio::sync::watch::Receiver<std::sync::Arc<mesh_api::policy::DenyList>>;
    /// Turns `true` when the drain's grace period is over.
    fn force_rx(&self) -> &tokio::sync::watch::Receiver<bool>;
}

/// Who is blamed for a failed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The caller (bad TLS, bad certificate, plaintext).
    Downstream,
    /// The destination (unreachable, refused, wrong identity).
    Upstream,
    /// meshd itself (no certificate yet, no endpoints known).
    Internal,
}

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

    /// Whether the endpoint could not be reached at all (refused, unroutable, or silent): it
    /// is skipped for a while, policy or not. A failed handshake reached a live peer.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Timeout { what, .. } => *what == CONNECT,
            Self::Handshake { .. } | Self::NoEndpoints(_) | Self::NoCertificate(_) => false,
        }
    }
}

/// [`Error::Timeout`]'s `what` for the TCP connect.
const CONNECT: &str = "connect";

/// Reason of a refused resumed session (peer certificate expired since the ticket was issued).
const STALE_RESUMPTION: &str = "stale_resumption";

/// One endpoint: a resumed session that turns out to carry an expired server certificate is
/// refused, that server's tickets are dropped, and the connection is retried with a full
/// handshake (which verifies the server's current certificate and starts a fresh ticket chain).
/// The retry does not offer a ticket at all: connections that resumed before the certificate
/// expired may still be storing tickets of the old chain after the `forget`.
pub async fn attempt(
    shared: &impl Env,
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
            shared
                .metrics()
                .reject(Direction::Outbound, STALE_RESUMPTION);
            client.tickets.forget(&name);
            let connector = TlsConnector::from(fresh.clone());
            attempt_once(shared, &connector, name, addr).await
        }
        other => other,
    }
}

async fn attempt_once(
    shared: &impl Env,
    connector: &TlsConnector,
    name: ServerName<'static>,
    addr: SocketAddr,
) -> Result<TlsStream<TcpStream>, Error> {
    let cfg = shared.config();
    let tcp = match timeout(cfg.outbound.connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(Error::Timeout {
                what: CONNECT,
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
        .metrics()
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
        .metrics()
        .handshake(Direction::Outbound, tls.get_ref().1);
    if let Some(serial) = crate::deny::denied_peer(&shared.deny_rx().borrow(), tls.get_ref().1) {
        copy::reset(tls.get_ref().0);
        return Err(Error::Handshake {
            addr,
            reason: super::tls::REASON_CERT_REVOKED,
            source: std::io::Error::other(format!("server certificate {serial} is revoked")),
        });
    }
    Ok(tls)
}

/// Connects to the first endpoint of `order` (indices into `dst.targets`) that accepts,
/// stepping over failed connects at once. Returns the stream and the index it reached; every
/// attempt feeds the endpoint's state. A failure that another endpoint cannot fix (a wrong
/// identity) ends the walk.
pub async fn dial(
    shared: &impl Env,
    client: &tls::Client,
    dst: &Destination,
    order: &[usize],
) -> Result<(TlsStream<TcpStream>, usize), Error> {
    let name = ServerName::try_from(dst.sni.clone()).expect("mesh server names are DNS names");
    let mut last = None;
    for (n, &i) in order.iter().enumerate() {
        let started = Instant::now();
        match attempt(
            shared,
            client,
            false,
            server_name(dst, i, &name),
            dst.targets[i].endpoint.addr,
        )
        .await
        {
            Ok(stream) => {
                connected(shared, dst, i, started);
                return Ok((stream, i));
            }
            Err(e) => {
                let more = n + 1 < order.len();
                failed(shared, dst, i, &e, more);
                let retry = e.is_retryable();
                last = Some(e);
                if !retry {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::NoEndpoints(dst.service.to_string())))
}

/// The server name to send to `dst.targets[i]`: `name` (the destination's), or for an
/// endpoint of another site the name its east-west gateway routes on (which the destination's
/// certificate answers to like `name`, see [`super::tls::callee`]).
pub fn server_name(dst: &Destination, i: usize, name: &ServerName<'static>) -> ServerName<'static> {
    match &dst.targets[i].endpoint.sni {
        // Built from labels, so always a DNS name; the fallback only avoids a panic path.
        Some(sni) => ServerName::try_from(sni.clone()).unwrap_or_else(|_| name.clone()),
        None => name.clone(),
    }
}

/// A connect to `dst.targets[i]` that began at `started` succeeded: the endpoint is reachable,
/// its latency estimate learns the connect time, and outlier detection counts a success.
pub fn connected(shared: &impl Env, dst: &Destination, i: usize, started: Instant) {
    crossed(shared.metrics(), dst, i);
    let state = &dst.targets[i].state;
    state.reachability.connected();
    let now = Instant::now();
    state.stats.observe(now - started, now);
    record(shared, dst, i, balance::Outcome::Success, now);
}

/// Counts traffic to `dst.targets[i]` when that instance is in another site.
pub fn crossed(metrics: &super::metrics::Metrics, dst: &Destination, i: usize) {
    let ep = &dst.targets[i].endpoint;
    if ep.sni.is_some() {
        metrics.cross_site(&dst.service.to_string(), &ep.site);
    }
}

/// A connect to `dst.targets[i]` failed with `e`: counted, the endpoint skipped if it could not
/// be reached, outlier detection told; `more` says whether another endpoint is tried next.
pub fn failed(shared: &impl Env, dst: &Destination, i: usize, e: &Error, more: bool) {
    let addr = dst.targets[i].endpoint.addr;
    let now = Instant::now();
    shared.metrics().reject(Direction::Outbound, e.reason());
    if e.is_unreachable()
        && let Some(skip) = dst.targets[i].state.reachability.failed(now)
    {
        shared.metrics().unreachable(&dst.service.to_string());
        warn!(dst.service = %dst.service, dst.addr = %addr, skipped_for = ?skip, error = %e, "endpoint unreachable; skipping it");
    } else {
        debug!(dst.service = %dst.service, dst.addr = %addr, error = %e, "endpoint failed");
    }
    if more && e.is_retryable() {
        shared.metrics().failover(&dst.service.to_string());
    }
    record(shared, dst, i, balance::Outcome::ConnectFailure, now);
}

/// Feeds `outcome` of `dst.targets[i]` to outlier detection, when the destination has it.
pub fn record(
    shared: &impl Env,
    dst: &Destination,
    i: usize,
    outcome: balance::Outcome,
    now: Instant,
) {
    let Some(cfg) = dst
        .policy
        .as_ref()
        .and_then(|p| p.outlier_detection.as_ref())
    else {
        return;
    };
    if let Some(d) = balance::record(&dst.targets, i, outcome, cfg, now) {
        shared.metrics().ejected(&dst.service.to_string());
        let addr = dst.targets[i].endpoint.addr;
        warn!(dst.service = %dst.service, dst.addr = %addr, ejected_for = ?d, ?outcome, "endpoint ejected by outlier detection");
    }
}

/// The order in which this node tries `dst`'s endpoints now (see [`endpoints::order`]), for a
/// request restricted to `subset`.
pub fn order(
    shared: &impl Env,
    dst: &Destination,
    subset: Option<&std::collections::BTreeMap<String, String>>,
    default_lb: mesh_api::policy::LoadBalancer,
    cursor: usize,
) -> Vec<usize> {
    let cfg = shared.config();
    let ask = endpoints::Ask {
        subset,
        policy: dst.policy.as_deref(),
        default_lb,
        datacenter: cfg.datacenter.as_str(),
        zone: cfg.zone.as_str(),
    };
    endpoints::order(
        &dst.targets,
        &ask,
        Instant::now(),
        cursor,
        &mut balance::random_index,
    )
}
