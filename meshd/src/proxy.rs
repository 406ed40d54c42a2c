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

use crate::config::{Config, Service, Upstream};
use crate::identity::Certs;
use crate::membership::MeshView;

pub mod authz;
pub mod balance;
pub mod copy;
pub mod http;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod ratelimit;
pub mod route;
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

/// Every proxy listener, bound.
pub struct Listeners {
    /// The mTLS inbound listener.
    pub inbound: TcpListener,
    /// Each service's `listen` listener (mTLS, or plaintext under PERMISSIVE).
    pub direct: Vec<(Service, TcpListener)>,
    /// One listener per upstream, with the service that declared it.
    pub outbound: Vec<(Service, Upstream, TcpListener)>,
    /// Each service's `http_proxy` listener (destination named by each request's host).
    pub http_proxy: Vec<(Service, TcpListener)>,
}

impl Listeners {
    /// Binds the inbound and every upstream listener; any failure fails startup.
    pub async fn bind(config: &Config) -> Result<Self, Error> {
        let inbound = bind(config.inbound.bind, "the inbound listener".to_owned()).await?;
        let mut direct = Vec::new();
        for svc in &config.services {
            if let Some(addr) = svc.listen {
                let l = bind(addr, format!("the listen address of {}", svc.key)).await?;
                direct.push((svc.clone(), l));
            }
        }
        let mut http_proxy = Vec::new();
        for svc in &config.services {
            if let Some(addr) = svc.http_proxy {
                let l = bind(addr, format!("the http_proxy of {}", svc.key)).await?;
                http_proxy.push((svc.clone(), l));
            }
        }
        let mut outbound = Vec::new();
        for svc in &config.services {
            for up in &svc.upstreams {
                let l = bind(up.bind, format!("upstream {} of {}", up.service, svc.key)).await?;
                outbound.push((svc.clone(), up.clone(), l));
            }
        }
        Ok(Self {
            inbound,
            direct,
            outbound,
            http_proxy,
        })
    }
}

async fn bind(addr: SocketAddr, what: String) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// Accepts on `listener` until `stop_rx` turns true. `on_conn` sees each connection and returns
/// the task that serves it (or `None` when it refused it on the spot); the task runs in its own
/// tokio task holding the drain watch, so the drain waits for it. Accept errors are logged and
/// retried: a listener never ends on its own.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    drain: drain::Watch,
    mut stop_rx: watch::Receiver<bool>,
    mut on_conn: F,
) where
    F: FnMut(tokio::net::TcpStream, SocketAddr) -> Option<Fut>,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
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
            _ = drain::until_true(&mut stop_rx) => break,
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
    /// Node configuration.
    pub config: Arc<Config>,
    /// Current TLS configs.
    pub tls_rx: watch::Receiver<Arc<tls::TlsState>>,
    /// Current mesh view.
    pub view_rx: watch::Receiver<Arc<MeshView>>,
    /// The policy enforced at the inbound; owned by discovery. Each connection watches it and
    /// is closed when a change no longer allows it.
    pub policy_rx: watch::Receiver<Arc<mesh_api::policy::Snapshot>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Held by each connection; the drain waits for all of them.
    pub drain: drain::Watch,
    /// Turns `true` when the grace period is over: open connections are closed.
    pub force_rx: watch::Receiver<bool>,
    /// Pooled HTTP clients (to local apps and to other hosts).
    pub http: Arc<http::State>,
    /// Per-endpoint load and health (latency, in-flight requests, outlier ejections).
    pub balance: Arc<balance::Table>,
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

/// Spawns the accept loops; they stop accepting when `stop_rx` turns `true`.
pub fn spawn(
    listeners: Listeners,
    shared: Shared,
    stop_rx: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) {
    let addr = listeners.inbound.local_addr().ok();
    tasks.spawn(
        inbound::serve(
            listeners.inbound,
            inbound::Entry::Mesh,
            shared.clone(),
            stop_rx.clone(),
        )
        .instrument(info_span!("inbound", addr = ?addr)),
    );
    for (svc, l) in listeners.direct {
        let span = info_span!("direct", service = %svc.key, addr = ?l.local_addr().ok());
        let entry = inbound::Entry::Direct(svc.key.clone());
        tasks.spawn(inbound::serve(l, entry, shared.clone(), stop_rx.clone()).instrument(span));
    }
    for (svc, l) in listeners.http_proxy {
        let span = info_span!("http_proxy", src = %svc.key);
        tasks.spawn(
            outbound::serve_http_proxy(l, svc, shared.clone(), stop_rx.clone()).instrument(span),
        );
    }
    for (svc, up, l) in listeners.outbound {
        let span = info_span!("outbound", src = %svc.key, dst = %up.service);
        tasks.spawn(outbound::serve(l, svc, up, shared.clone(), stop_rx.clone()).instrument(span));
    }
}
