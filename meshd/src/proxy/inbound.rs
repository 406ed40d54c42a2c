//! The inbound side: accepts mTLS from other hosts on the single inbound port, requires a
//! workload certificate from the mesh CA, picks the local service by SNI and forwards to the
//! app on its local address.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::{Identity, ServiceKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, debug_span, info, warn};

use super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::{Shared, copy, tls};

/// Accepts until `stop_rx` turns true.
pub async fn serve(listener: TcpListener, shared: Shared, mut stop_rx: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(shared.config.inbound.max_connections));
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = mesh_runtime::drain::until_true(&mut stop_rx) => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.metrics.reject(Direction::Inbound, "max_connections");
            warn!(src.addr = %peer, limit = shared.config.inbound.max_connections, "inbound connection refused: connection limit reached");
            copy::reset(&tcp);
            continue;
        };
        let shared = shared.clone();
        // Tracked by the drain watch it holds; bounded by the handshake timeout and the copy.
        tokio::spawn(
            async move {
                let _permit = permit;
                let _drain = shared.drain.clone();
                handle(tcp, peer, &shared).await;
            }
            .instrument(debug_span!("conn", src.addr = %peer)),
        );
    }
    debug!("inbound listener stopped accepting");
}

fn reject(shared: &Shared, peer: SocketAddr, reason: &'static str, detail: &dyn std::fmt::Display) {
    shared.metrics.reject(Direction::Inbound, reason);
    warn!(src.addr = %peer, reason, error = %detail, "inbound connection rejected");
}

async fn handle(tcp: TcpStream, peer: SocketAddr, shared: &Shared) {
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let state = shared.tls_rx.borrow().clone();
    let acceptor = TlsAcceptor::from(state.server.clone());
    let mut tls_stream = match timeout(
        shared.config.inbound.handshake_timeout,
        acceptor.accept(tcp),
    )
    .await
    {
        Err(_) => {
            return reject(
                shared,
                peer,
                "handshake_timeout",
                &"tls handshake timed out",
            );
        }
        Ok(Err(e)) => return reject(shared, peer, tls::failure_reason(&e), &e),
        Ok(Ok(s)) => s,
    };
    shared
        .metrics
        .handshake_duration
        .observe(started.elapsed().as_secs_f64());
    shared
        .metrics
        .handshakes
        .get_or_create(&super::metrics::DirectionLabels {
            direction: Direction::Inbound,
        })
        .inc();
    let (_, conn) = tls_stream.get_ref();
    let Some(svc) = conn.server_name().and_then(ServiceKey::from_sni) else {
        return reject(
            shared,
            peer,
            "unknown_service",
            &"no mesh service named in SNI",
        );
    };
    let caller = conn
        .peer_certificates()
        .and_then(mesh_runtime::tls::peer_identity);
    let caller = match caller {
        Some(id @ Identity::Workload { .. }) if *id.trust_domain() == state.trust_domain => id,
        other => {
            copy::reset(tls_stream.get_ref().0);
            return reject(
                shared,
                peer,
                "not_workload_identity",
                &format!("caller identity {other:?} is not a workload of this mesh"),
            );
        }
    };
    let Some(local) = shared.config.services.iter().find(|s| s.key == svc) else {
        copy::reset(tls_stream.get_ref().0);
        return reject(
            shared,
            peer,
            "unknown_service",
            &format!("{svc} is not served on this node"),
        );
    };
    let mut app = match timeout(
        shared.config.outbound.connect_timeout,
        TcpStream::connect(local.address),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            copy::reset(tls_stream.get_ref().0);
            return reject(
                shared,
                peer,
                "app_unreachable",
                &format!("connecting to {svc} at {}: {e}", local.address),
            );
        }
        Err(_) => {
            copy::reset(tls_stream.get_ref().0);
            return reject(
                shared,
                peer,
                "app_unreachable",
                &format!("connecting to {svc} at {} timed out", local.address),
            );
        }
    };
    let _ = app.set_nodelay(true);
    let service = svc.to_string();
    shared
        .metrics
        .connections
        .get_or_create(&ServiceLabels {
            direction: Direction::Inbound,
            service: service.clone(),
        })
        .inc();
    let _active = ActiveGuard::new(&shared.metrics, Direction::Inbound);
    let mut force = shared.force_rx.clone();
    let result = tokio::select! {
        r = copy::bidirectional(&mut app, &mut tls_stream, false) => r,
        _ = mesh_runtime::drain::until_true(&mut force) => {
            copy::reset(&app);
            copy::reset(tls_stream.get_ref().0);
            Err(std::io::Error::other("closed at the end of the drain grace period"))
        }
    };
    let (t, error) = match result {
        Ok(t) => (t, None),
        Err(e) => {
            copy::reset(tls_stream.get_ref().0);
            (copy::Transferred::default(), Some(e.to_string()))
        }
    };
    shared
        .metrics
        .record_bytes(Direction::Inbound, &service, t.to_service, t.to_caller);
    info!(
        target: "access",
        direction = "inbound",
        src.addr = %peer,
        src.identity = %caller,
        dst.service = %service,
        dst.addr = %local.address,
        bytes.to_service = t.to_service,
        bytes.to_caller = t.to_caller,
        duration_ms = started.elapsed().as_millis() as u64,
        error = error.as_deref().unwrap_or(""),
        "connection"
    );
}
