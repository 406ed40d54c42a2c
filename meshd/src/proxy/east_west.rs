//! The east-west gateway's passthrough listener: connections from other sites name a service of
//! this site in their TLS server name (`<svc>.<ns>.<site>.svc.mesh`); the gateway reads that
//! name from the ClientHello without terminating TLS, refuses anything that is not a service
//! this site exports, and relays the untouched bytes to an instance of it. The caller's meshd
//! and the instance's meshd do the mTLS handshake end to end, so the caller verifies the
//! service's identity and the service authorizes the real caller; the gateway holds no
//! certificate for this and can read nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mesh_api::policy::Exports;
use mesh_api::{Label, ServiceKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::accept::{Stops, accept_loop};
use super::balance::Target;
use super::copy;
use super::endpoints::MAX_CONNECT_ATTEMPTS;
use super::gateway::accept::{NoHello, peek_sni};
use super::metrics::{Direction, OneService};
use super::shared::Shared;
use crate::config::east_west::EastWestConfig;

/// Why a connection is refused before it is relayed: the `reason` of
/// `meshd_rejected_connections_total{direction="inbound"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No ClientHello in time, or not TLS.
    NotTls(String),
    /// A ClientHello without a server name.
    NoSni,
    /// A server name that names no service of a site.
    NotSiteName(String),
    /// A service of another site: a gateway passes on only to its own site (no relay chains).
    OtherSite(String),
    /// A service this site does not export.
    NotExported(ServiceKey),
    /// No usable instance of the service in this site.
    NoEndpoints(ServiceKey),
    /// Every instance tried refused or timed out.
    Unreachable(ServiceKey),
    /// `east_west.max_connections` reached.
    MaxConnections,
}

impl Refusal {
    /// The metric reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotTls(_) => "east_west_not_tls",
            Self::NoSni => "east_west_no_sni",
            Self::NotSiteName(_) => "east_west_not_site_name",
            Self::OtherSite(_) => "east_west_other_site",
            Self::NotExported(_) => "east_west_not_exported",
            Self::NoEndpoints(_) => "east_west_no_endpoints",
            Self::Unreachable(_) => "east_west_unreachable",
            Self::MaxConnections => "max_connections",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotTls(why) => write!(f, "not a TLS ClientHello: {why}"),
            Self::NoSni => f.write_str("the ClientHello names no server"),
            Self::NotSiteName(sni) => {
                write!(
                    f,
                    "{sni:?} is not a site server name (<service>.<namespace>.<site>.svc.mesh)"
                )
            }
            Self::OtherSite(sni) => write!(f, "{sni:?} names another site"),
            Self::NotExported(svc) => write!(f, "{svc} is not exported by this site"),
            Self::NoEndpoints(svc) => write!(f, "{svc} has no usable instance in this site"),
            Self::Unreachable(svc) => write!(f, "no instance of {svc} accepted the connection"),
            Self::MaxConnections => f.write_str("east_west.max_connections reached"),
        }
    }
}

/// The service a connection's server name `sni` may be passed to, in site `site`: pure.
pub fn admit(sni: Option<&str>, site: &Label, exports: &Exports) -> Result<ServiceKey, Refusal> {
    let sni = sni.ok_or(Refusal::NoSni)?;
    let (svc, named) =
        ServiceKey::from_site_sni(sni).ok_or_else(|| Refusal::NotSiteName(sni.to_owned()))?;
    if named != *site {
        return Err(Refusal::OtherSite(sni.to_owned()));
    }
    if !exports.exports(&svc) {
        return Err(Refusal::NotExported(svc));
    }
    Ok(svc)
}

/// Indices of `targets` to try, at most [`MAX_CONNECT_ATTEMPTS`]: this site's usable instances
/// only (never another site's gateway), those not known unreachable first; the nearest to the
/// gateway (its zone, its datacenter, the rest) in turn by `cursor`, then the others. Pure.
pub fn candidates(
    targets: &[Target],
    datacenter: &str,
    zone: &str,
    now: tokio::time::Instant,
    cursor: usize,
) -> Vec<usize> {
    let local: Vec<usize> = (0..targets.len())
        .filter(|&i| targets[i].endpoint.sni.is_none() && targets[i].endpoint.is_usable())
        .collect();
    let reachable: Vec<usize> = (local.iter().copied())
        .filter(|&i| !targets[i].state.reachability.is_unreachable(now))
        .collect();
    let mut pool = if reachable.is_empty() {
        local
    } else {
        reachable
    };
    let tier = |i: &usize| {
        let ep = &targets[*i].endpoint;
        match (ep.datacenter == datacenter, ep.zone == zone) {
            (true, true) => 0u8,
            (true, false) => 1,
            (false, _) => 2,
        }
    };
    // Stable: the view's order inside a tier.
    pool.sort_by_key(tier);
    let nearest = pool.first().map(tier);
    let n = pool.iter().take_while(|i| Some(tier(i)) == nearest).count();
    if n > 0 {
        pool[..n].rotate_left(cursor % n);
    }
    pool.truncate(MAX_CONNECT_ATTEMPTS);
    pool
}

/// Binds the passthrough listener.
pub async fn bind(config: &EastWestConfig) -> Result<TcpListener, super::accept::Error> {
    super::accept::bind(config.bind, "the east-west listener".to_owned()).await
}

/// What every connection shares.
struct Serving {
    shared: Shared,
    config: EastWestConfig,
    site: Label,
    exports: tokio::sync::watch::Receiver<Arc<Exports>>,
    cursor: AtomicUsize,
}

/// Accepts connections until `stops` says so.
pub async fn serve(
    socket: Arc<TcpListener>,
    config: EastWestConfig,
    shared: Shared,
    exports: tokio::sync::watch::Receiver<Arc<Exports>>,
    stops: Stops,
) {
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let site = shared.config().site.clone();
    let drain = shared.drain.clone();
    let serving = Arc::new(Serving {
        shared,
        config,
        site,
        exports,
        cursor: AtomicUsize::new(0),
    });
    accept_loop(
        socket,
        "east-west",
        drain,
        stops,
        |tcp, peer: SocketAddr| {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                refuse(&serving.shared, &tcp, peer, &Refusal::MaxConnections);
                return None;
            };
            let serving = serving.clone();
            Some(async move {
                let _permit = permit;
                connection(&serving, tcp, peer).await;
            })
        },
    )
    .await;
}

/// Reads the server name, checks it, connects to an instance and relays.
async fn connection(s: &Serving, mut tcp: TcpStream, peer: SocketAddr) {
    let sni = match peek_sni(&tcp, s.config.hello_timeout).await {
        Ok(sni) => sni,
        // Another site's gateway timing the handshake (wan::distance): nothing to refuse.
        Err(NoHello::Closed) => {
            return debug!(src.addr = %peer, "east-west: closed before a ClientHello (a probe)");
        }
        Err(why) => return refuse(&s.shared, &tcp, peer, &Refusal::NotTls(why.to_string())),
    };
    let exports = s.exports.borrow().clone();
    let svc = match admit(sni.as_deref(), &s.site, &exports) {
        Ok(svc) => svc,
        Err(r) => return refuse(&s.shared, &tcp, peer, &r),
    };
    // Both sides relay TLS records as they come: a record split across two reads must not
    // wait for the first half's ACK (Nagle), which cost ~0.9 ms per request in bench/run.sh.
    let _ = tcp.set_nodelay(true);
    let mut upstream = match dial(s, &svc).await {
        Ok(u) => u,
        Err(r) => return refuse(&s.shared, &tcp, peer, &r),
    };
    let labels = OneService {
        service: svc.to_string(),
    };
    s.shared.metrics.east_west.get_or_create(&labels).inc();
    let mut force = s.shared.force_rx.clone();
    let result = tokio::select! {
        r = copy::bidirectional(&mut tcp, &mut upstream, true) => r.map(|_| ()),
        _ = mesh_runtime::drain::until_true(&mut force) => {
            copy::reset(&tcp);
            copy::reset(&upstream);
            Ok(())
        }
    };
    if let Err(e) = result {
        copy::reset(&upstream);
        debug!(src.addr = %peer, dst.service = %svc, error = %e, "east-west relay ended with an error");
    }
}

/// Connects to an instance of `svc` in this site, stepping over the ones that fail.
async fn dial(s: &Serving, svc: &ServiceKey) -> Result<TcpStream, Refusal> {
    let dst = s.shared.compiled().destination(svc);
    let config = s.shared.config();
    let now = tokio::time::Instant::now();
    let cursor = s.cursor.fetch_add(1, Ordering::Relaxed);
    let order = candidates(
        &dst.targets,
        config.datacenter.as_str(),
        config.zone.as_str(),
        now,
        cursor,
    );
    if order.is_empty() {
        return Err(Refusal::NoEndpoints(svc.clone()));
    }
    let limit: Duration = config.outbound.connect_timeout;
    for i in order {
        let target = &dst.targets[i];
        let addr = target.endpoint.addr;
        match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                target.state.reachability.connected();
                return Ok(tcp);
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {limit:?}"),
                };
                target
                    .state
                    .reachability
                    .failed(tokio::time::Instant::now());
                warn!(dst.service = %svc, dst.addr = %addr, error = why, "east-west: instance unreachable; trying the next");
            }
        }
    }
    Err(Refusal::Unreachable(svc.clone()))
}

/// Counts a refused connection and resets it.
fn refuse(shared: &Shared, tcp: &TcpStream, peer: SocketAddr, why: &Refusal) {
    shared.metrics.reject(Direction::Inbound, why.reason());
    debug!(src.addr = %peer, reason = why.reason(), error = %why, "east-west connection refused");
    copy::reset(tcp);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
