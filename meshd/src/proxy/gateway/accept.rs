//! A gateway listener's accept loop: each connection goes to its listener protocol's server
//! (TLS terminated first on `https` listeners).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use mesh_api::policy::ListenerProtocol;
use tokio::net::TcpListener;
use tracing::warn;

use super::super::accept::{Stops, accept_loop};
use super::super::shared::Shared;
use super::listener::GatewayListener;
use super::{http, terminate};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Accepts connections on a gateway listener until `stops` says so.
pub async fn serve(socket: Arc<TcpListener>, gl: GatewayListener, shared: Shared, stops: Stops) {
    let cursor = Arc::new(AtomicUsize::new(0));
    let gl = Arc::new(gl);
    // The run task loaded the certificates before opening the listener, and holds them: this
    // finds the same terminator. Should the files have become unusable in between, the
    // listener accepts nothing rather than serve without TLS.
    let term = match &gl.listener.tls {
        Some(tls) => match terminate::terminator(tls) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(error = %e, "gateway https listener cannot load its certificates; not accepting");
                return;
            }
        },
        None => None,
    };
    let drain = shared.drain.clone();
    accept_loop(socket, "gateway", drain, stops, |tcp, peer: SocketAddr| {
        let (shared, cursor, gl) = (shared.clone(), cursor.clone(), gl.clone());
        let task: Task = match (gl.listener.protocol, &term) {
            (ListenerProtocol::Http, _) => Box::pin(http::serve(tcp, peer, gl, shared, cursor)),
            (ListenerProtocol::Https, Some(term)) => {
                Box::pin(http::serve_tls(tcp, peer, gl, shared, cursor, term.clone()))
            }
            // tls passthrough and tcp: not opened by the run task yet.
            _ => return None,
        };
        Some(task)
    })
    .await;
}
