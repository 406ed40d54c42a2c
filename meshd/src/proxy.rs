//! The data plane: one mTLS inbound listener for every local service, a direct listener per
//! service that declares `listen`, and one plain listener per declared upstream. Reads only `watch` snapshots (TLS configs, mesh view); every
//! connection is tracked for drain and can be force-closed at the deadline.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument as _, info, info_span, warn};

use crate::identity::Certs;

pub mod accept;
pub mod access_log;
pub mod authz;
pub mod balance;
pub mod breaker;
pub mod compiled;
pub mod connect;
pub mod copy;
pub mod detect;
pub mod east_west;
pub mod endpoints;
pub mod external;
pub mod gateway;
pub mod http;
pub mod inbound;
pub mod listeners;
pub mod locality;
pub mod metrics;
pub mod observe;
pub mod outbound;
pub mod pool;
pub mod ratelimit;
pub mod retry;
pub mod route;
pub mod shared;
pub mod standalone;
pub mod tls;

pub use accept::{Error, Stops, bind_inbound};
pub use metrics::Metrics;
pub use shared::Shared;

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
