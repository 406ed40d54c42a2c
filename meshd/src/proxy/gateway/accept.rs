//! A gateway listener's accept loop: each connection goes to its listener protocol's server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use mesh_api::policy::ListenerProtocol;
use tokio::net::TcpListener;

use super::super::accept::{Stops, accept_loop};
use super::super::shared::Shared;
use super::http;
use super::listener::GatewayListener;

/// Accepts connections on a gateway listener until `stops` says so.
pub async fn serve(socket: Arc<TcpListener>, gl: GatewayListener, shared: Shared, stops: Stops) {
    let cursor = Arc::new(AtomicUsize::new(0));
    let gl = Arc::new(gl);
    let drain = shared.drain.clone();
    accept_loop(socket, "gateway", drain, stops, |tcp, peer: SocketAddr| {
        let (shared, cursor, gl) = (shared.clone(), cursor.clone(), gl.clone());
        match gl.listener.protocol {
            ListenerProtocol::Http => Some(http::serve(tcp, peer, gl, shared, cursor)),
            // Accepted by the resource model, served in a later step; the run task does not
            // open such listeners, so nothing is accepted here meanwhile.
            ListenerProtocol::Https | ListenerProtocol::Tls | ListenerProtocol::Tcp => None,
        }
    })
    .await;
}
