//! The outbound side's entry: accepts an app's connections on an upstream's local port (or a
//! service's `http_proxy` listener) and hands each to the TCP or the HTTP proxy by the
//! protocol the upstream's instances gossip. Both originate mTLS to the chosen endpoint's
//! inbound port, presenting the calling service's identity and checking the callee's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::net::TcpListener;

use super::accept::{Stops, accept_loop};
use super::detect;
use super::shared::Shared;
use crate::config::{Service, Upstream};

pub mod external;
pub mod http;
pub mod send;
pub mod tcp;
pub mod tunnel;

/// Accepts app connections for one upstream until `stop_rx` turns true.
pub async fn serve(
    listener: Arc<TcpListener>,
    source: Service,
    upstream: Upstream,
    shared: Shared,
    stops: Stops,
) {
    let cursor = Arc::new(AtomicUsize::new(0));
    let (source, upstream) = (Arc::new(source), Arc::new(upstream));
    let drain = shared.drain.clone();
    accept_loop(listener, "outbound", drain, stops, |tcp, peer| {
        let (shared, cursor, source, upstream) = (
            shared.clone(),
            cursor.clone(),
            source.clone(),
            upstream.clone(),
        );
        Some(async move {
            // Decided per connection from what the upstream's instances gossip, so a service
            // that changes protocol is followed without a restart here. With no instance
            // known, the app's first bytes tell: an HTTP client then gets a 503 saying so
            // rather than a reset.
            let http = match http::is_http_service(&shared, &upstream.service) {
                Some(http) => http,
                None => detect::looks_like_http(&tcp).await,
            };
            let direct = shared
                .compiled()
                .destination(&upstream.service)
                .direct
                .clone();
            if http {
                http::serve(tcp, peer, source, upstream, shared, cursor).await;
            } else if let Some(client) = direct {
                external::serve_tcp(tcp, peer, &source.key, &client, &shared).await;
            } else {
                tcp::serve(
                    tcp,
                    peer,
                    &source.key,
                    &upstream.service,
                    &shared,
                    &cursor,
                    None,
                )
                .await;
            }
        })
    })
    .await;
}

/// Accepts app connections on a service's `http_proxy` listener until `stop_rx` turns true;
/// each request goes to the mesh service its host names.
pub async fn serve_http_proxy(
    listener: Arc<TcpListener>,
    source: Service,
    shared: Shared,
    stops: Stops,
) {
    let cursor = Arc::new(AtomicUsize::new(0));
    let source = Arc::new(source);
    let bind = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let drain = shared.drain.clone();
    accept_loop(listener, "http_proxy", drain, stops, |tcp, peer| {
        let (shared, cursor, source) = (shared.clone(), cursor.clone(), source.clone());
        Some(http::serve_by_host(tcp, peer, source, bind, shared, cursor))
    })
    .await;
}
