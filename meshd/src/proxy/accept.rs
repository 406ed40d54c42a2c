//! Binding the proxy's listeners and the accept loop they all run: each connection served in a
//! task of its own that holds a drain guard, until the node or the listener stops.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_runtime::drain;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{Instrument as _, warn};

use crate::config::Config;

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

pub(super) async fn bind(addr: SocketAddr, what: String) -> Result<TcpListener, Error> {
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
/// tokio task holding a drain guard, so the drain waits for it. Accept errors are logged and
/// retried: a listener never ends on its own.
pub(super) async fn accept_loop<F, Fut>(
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
        let guard = drain.guard();
        tokio::spawn(
            async move {
                let _guard = guard;
                task.await;
            }
            .instrument(tracing::debug_span!("conn", src.addr = %peer)),
        );
    }
    tracing::debug!(listener = what, "stopped accepting");
}
