//! The data plane: one mTLS inbound listener for every local service, a direct listener per
//! service that declares `listen`, and one plain listener per declared upstream. Reads only `watch` snapshots (TLS configs, mesh view); every
//! connection is tracked for drain and can be force-closed at the deadline.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument as _, info, info_span, warn};

use mesh_runtime::drain;

use crate::config::Config;
use crate::identity::Certs;
use crate::membership::MeshView;

pub mod access_log;
pub mod authz;
pub mod balance;
pub mod breaker;
pub mod compiled;
pub mod connect;
pub mod copy;
pub mod detect;
pub mod endpoints;
pub mod http;
pub mod inbound;
pub mod listeners;
pub mod metrics;
pub mod observe;
pub mod outbound;
pub mod pool;
pub mod ratelimit;
pub mod retry;
pub mod route;
pub mod standalone;
pub mod tls;

pub use metrics::Metrics;

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

/// Proxy setup errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// Address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Binds the mesh inbound listener (one per node, for every local service). The per-service
/// listeners are [`listeners::Set`]'s.
pub async fn bind_inbound(config: &Config) -> Result<TcpListener, Error> {
    bind(config.inbound.bind, "the inbound listener".to_owned()).await
}

async fn bind(addr: SocketAddr, what: String) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

/// What ends an accept loop: the node stops accepting (drain), or this listener is retired
/// (a reload removed or replaced it).
pub struct Stops {
    /// The node-wide stop.
    pub node: watch::Receiver<bool>,
    /// This listener's own stop.
    pub listener: watch::Receiver<bool>,
}

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// Accepts on `listener` until `stop_rx` turns true. `on_conn` sees each connection and returns
/// the task that serves it (or `None` when it refused it on the spot); the task runs in its own
/// tokio task holding the drain watch, so the drain waits for it. Accept errors are logged and
/// retried: a listener never ends on its own.
async fn accept_loop<F, Fut>(
    listener: Arc<TcpListener>,
    what: &'static str,
    drain: drain::Watch,
    stops: Stops,
    mut on_conn: F,
) where
    F: FnMut(tokio::net::TcpStream, SocketAddr) -> Option<Fut>,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Stops {
        node: mut node_stop,
        listener: mut listener_stop,
    } = stops;
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            _ = drain::until_true(&mut node_stop) => break,
            _ = drain::until_true(&mut listener_stop) => break,
        };
        let Some(task) = on_conn(tcp, peer) else {
            continue;
        };
        let drain = drain.clone();
        tokio::spawn(
            async move {
                let _drain = drain;
                task.await;
            }
            .instrument(tracing::debug_span!("conn", src.addr = %peer)),
        );
    }
    tracing::debug!(listener = what, "stopped accepting");
}

/// Inputs every connection task reads.
#[derive(Clone)]
pub struct Shared {
    /// Node configuration, replaced by a reload. Each connection reads it once, when it is
    /// accepted, and keeps that snapshot.
    pub config_rx: watch::Receiver<Arc<Config>>,
    /// Current TLS configs.
    pub tls_rx: watch::Receiver<Arc<tls::TlsState>>,
    /// Current mesh view.
    pub view_rx: watch::Receiver<Arc<MeshView>>,
    /// The policy enforced at the inbound; owned by discovery. Each connection watches it and
    /// is closed when a change no longer allows it.
    pub policy_rx: watch::Receiver<Arc<mesh_api::policy::Snapshot>>,
    /// `true` once a policy snapshot is in place (persisted, or from the registry). Until then
    /// the inbound fails closed: TCP callers are reset, HTTP callers get 503
    /// `inbound/no_policy` — an empty policy would allow everything.
    pub policy_synced_rx: watch::Receiver<bool>,
    /// Revoked certificates (compiled from the policy snapshot): checked after every TLS
    /// handshake, and watched by every open mTLS connection, which is closed on revocation.
    pub deny_rx: watch::Receiver<Arc<mesh_api::policy::DenyList>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Held by each connection; the drain waits for all of them.
    pub drain: drain::Watch,
    /// Turns `true` when the grace period is over: open connections are closed.
    pub force_rx: watch::Receiver<bool>,
    /// HTTP clients of local apps.
    pub http: Arc<http::State>,
    /// HTTP/2 connections to other hosts.
    pub pool: Arc<pool::Pool>,
    /// Derived state (routes, destinations with their endpoints and live state, limiters),
    /// compiled once per change of policy, membership or configuration.
    pub compiled_rx: watch::Receiver<Arc<compiled::Compiled>>,
    /// Per-edge traffic since the last report to the registry.
    pub edges: Arc<observe::Edges>,
    /// Spans of HTTP hops (disabled without a collector: context passes through).
    pub tracer: crate::trace::Tracer,
    /// Where access-log events go: the journal under systemd, JSON lines on stdout otherwise.
    pub access_log: Arc<access_log::Sink>,
}

impl Shared {
    /// Whether a policy snapshot is in place (else the inbound refuses callers).
    pub fn has_policy(&self) -> bool {
        *self.policy_synced_rx.borrow()
    }

    /// The current configuration.
    pub fn config(&self) -> Arc<Config> {
        self.config_rx.borrow().clone()
    }

    /// The current compiled state.
    pub fn compiled(&self) -> Arc<compiled::Compiled> {
        self.compiled_rx.borrow().clone()
    }
}

/// Keeps the TLS state in step with the certificates. Returns the receiver of TLS states.
pub fn tls_updates(
    mut certs_rx: watch::Receiver<Arc<Certs>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<watch::Receiver<Arc<tls::TlsState>>, mesh_runtime::tls::Error> {
    let first = tls::build(&certs_rx.borrow_and_update())?;
    let (tx, rx) = watch::channel(Arc::new(first));
    // Fire-and-forget: ends with the identity manager (sender dropped) or on shutdown.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = certs_rx.changed() => if r.is_err() { return },
                _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
            }
            let certs = certs_rx.borrow_and_update().clone();
            match tls::build(&certs) {
                Ok(state) => {
                    tx.send_replace(Arc::new(state));
                    info!(
                        services = certs.workloads.len(),
                        "tls configuration updated"
                    );
                }
                Err(e) => {
                    warn!(error = %e, "new certificates unusable; keeping the previous tls configuration")
                }
            }
        }
    });
    Ok(rx)
}

/// Spawns the accept loop of the mesh inbound listener; it stops accepting when `stop_rx`
/// turns `true`.
pub fn spawn_inbound(
    listener: TcpListener,
    shared: Shared,
    stop_rx: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) {
    let addr = listener.local_addr().ok();
    let stops = Stops {
        node: stop_rx.clone(),
        // Never retired on its own: its address is restart-only.
        listener: stop_rx,
    };
    tasks.spawn(
        inbound::serve(Arc::new(listener), inbound::Entry::Mesh, shared, stops)
            .instrument(info_span!("inbound", addr = ?addr)),
    );
}
