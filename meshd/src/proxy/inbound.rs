//! The inbound side: accepts mTLS from other hosts on the single inbound port, requires a
//! workload certificate from the mesh CA, picks the local service by SNI, authorizes the caller
//! against the current policy and forwards to the app on its local address. Open connections
//! are re-authorized on every policy change and reset when no longer allowed.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::policy::Snapshot;
use mesh_api::policy::authz::Decision;
use mesh_api::{Identity, ServiceKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument as _, debug, debug_span, info, warn};

use super::authz::{self, Attrs};
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
    if tls::resumed_with_stale_cert(tls_stream.get_ref().1) {
        copy::reset(tls_stream.get_ref().0);
        return reject(
            shared,
            peer,
            "cert_expired",
            &"resumed session of an expired client certificate",
        );
    }
    shared
        .metrics
        .handshake(Direction::Inbound, tls_stream.get_ref().1);
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
    let service = svc.to_string();
    let attrs = Attrs {
        caller: &caller,
        source_ip: peer.ip(),
        service: local,
    };
    let mut policy_rx = shared.policy_rx.clone();
    let decision = admit(shared, &attrs, peer, &mut policy_rx);
    if !decision.is_allowed() {
        copy::reset(tls_stream.get_ref().0);
        let end = End {
            transferred: copy::Transferred::default(),
            decision: &decision,
            error: Some("denied by policy".to_owned()),
        };
        return access_log(&attrs, peer, started, &end);
    }
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
    let stopped = relay(
        &mut app,
        &mut tls_stream,
        &attrs,
        &mut policy_rx,
        &mut force,
    )
    .await;
    let mut last = decision;
    let (transferred, error) = match stopped {
        Stopped::Copied(Ok(t)) => (t, None),
        Stopped::Copied(Err(e)) => {
            copy::reset(tls_stream.get_ref().0);
            (copy::Transferred::default(), Some(e.to_string()))
        }
        Stopped::Forced => {
            copy::reset(&app);
            copy::reset(tls_stream.get_ref().0);
            (
                copy::Transferred::default(),
                Some("closed at the end of the drain grace period".to_owned()),
            )
        }
        Stopped::Revoked(now) => {
            copy::reset(&app);
            copy::reset(tls_stream.get_ref().0);
            shared.metrics.record_decision(&service, &now, true);
            warn!(
                src.identity = %caller,
                src.addr = %peer,
                dst.service = %service,
                policy = %authz::policy_of(&now),
                reason = authz::REASON_POLICY_CHANGED,
                "connection closed: no longer allowed by policy"
            );
            last = now;
            (
                copy::Transferred::default(),
                Some("closed: no longer allowed by policy".to_owned()),
            )
        }
    };
    shared.metrics.record_bytes(
        Direction::Inbound,
        &service,
        transferred.to_service,
        transferred.to_caller,
    );
    let end = End {
        transferred,
        decision: &last,
        error,
    };
    access_log(&attrs, peer, started, &end);
}

/// Decides a new connection over the current policy: counts it, logs AUDIT matches at info and
/// denials at warn (the caller resets the connection).
fn admit(
    shared: &Shared,
    attrs: &Attrs<'_>,
    peer: SocketAddr,
    policy_rx: &mut watch::Receiver<Arc<Snapshot>>,
) -> Decision {
    let decision = attrs.decide(&policy_rx.borrow_and_update());
    let service = attrs.service.key.to_string();
    shared.metrics.record_decision(&service, &decision, false);
    if !decision.audit().is_empty() {
        info!(
            src.identity = %attrs.caller,
            src.addr = %peer,
            dst.service = %service,
            allowed = decision.is_allowed(),
            audit = ?decision.audit().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "connection matched an audit policy"
        );
    }
    if !decision.is_allowed() {
        shared
            .metrics
            .reject(Direction::Inbound, "denied_by_policy");
        let (_, reason) = authz::labels(&decision, false);
        warn!(
            src.identity = %attrs.caller,
            src.addr = %peer,
            dst.service = %service,
            policy = %authz::policy_of(&decision),
            reason,
            "connection denied by policy"
        );
    }
    decision
}

/// Copies between the app and the caller until both are done, the drain's grace period ends,
/// or a policy change no longer allows the connection (re-decided on every change).
async fn relay(
    app: &mut TcpStream,
    tls_stream: &mut TlsStream<TcpStream>,
    attrs: &Attrs<'_>,
    policy_rx: &mut watch::Receiver<Arc<Snapshot>>,
    force: &mut watch::Receiver<bool>,
) -> Stopped {
    let copy = copy::bidirectional(app, tls_stream, false);
    tokio::pin!(copy);
    let mut policy_open = true;
    loop {
        tokio::select! {
            r = &mut copy => return Stopped::Copied(r),
            _ = mesh_runtime::drain::until_true(force) => return Stopped::Forced,
            r = policy_rx.changed(), if policy_open => {
                if r.is_err() {
                    // Discovery is gone (shutting down): keep the decision we have.
                    policy_open = false;
                    continue;
                }
                let now = attrs.decide(&policy_rx.borrow_and_update());
                if !now.is_allowed() {
                    return Stopped::Revoked(now);
                }
            }
        }
    }
}

/// Why the copy loop of an allowed connection stopped.
enum Stopped {
    /// Both sides finished, or one failed.
    Copied(std::io::Result<copy::Transferred>),
    /// The drain grace period ended.
    Forced,
    /// A policy change no longer allows the connection.
    Revoked(Decision),
}

/// How a connection that reached authorization ended, for its access log line.
struct End<'a> {
    transferred: copy::Transferred,
    decision: &'a Decision,
    error: Option<String>,
}

/// The access log line (target `access`) of a connection that reached authorization.
fn access_log(attrs: &Attrs<'_>, peer: SocketAddr, started: Instant, end: &End<'_>) {
    info!(
        target: "access",
        parent: None,
        direction = "inbound",
        src.addr = %peer,
        src.identity = %attrs.caller,
        dst.service = %attrs.service.key,
        dst.addr = %attrs.service.address,
        decision = if end.decision.is_allowed() { "allow" } else { "deny" },
        policy = %authz::policy_of(end.decision),
        bytes.to_service = end.transferred.to_service,
        bytes.to_caller = end.transferred.to_caller,
        duration_ms = started.elapsed().as_millis() as u64,
        error = end.error.as_deref().unwrap_or(""),
        "connection"
    );
}
