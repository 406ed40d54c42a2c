//! The inbound side: accepts mTLS from other hosts on the single inbound port, requires a
//! workload certificate from the mesh CA, picks the local service by SNI, authorizes the caller
//! against the current policy and forwards to the app on its local address. A service's own
//! `listen` address takes mTLS the same way and, while the service is PERMISSIVE, plaintext
//! from clients not yet in the mesh, told apart by the first byte. Open connections are
//! re-authorized on every policy change and reset when no longer allowed.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::policy::Snapshot;
use mesh_api::policy::authz::{Decision, MtlsMode, REASON_MTLS_REQUIRED};
use mesh_api::{Identity, ServiceKey};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

use super::authz::{self, Attrs};
use super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::{Shared, copy, detect, observe, tls};
use crate::config::{Config, Service};

/// Where a listener takes callers from.
#[derive(Debug, Clone)]
pub enum Entry {
    /// The shared inbound port: mTLS only, the service named by SNI.
    Mesh,
    /// A service's `listen` address: mTLS for that service, or plaintext under PERMISSIVE.
    Direct(ServiceKey),
}

/// Accepts until `stop_rx` turns true.
pub async fn serve(listener: Arc<TcpListener>, entry: Entry, shared: Shared, stops: super::Stops) {
    // A restart-only setting: a reload that changes it is refused.
    let max_connections = shared.config().inbound.max_connections;
    let permits = Arc::new(Semaphore::new(max_connections));
    let drain = shared.drain.clone();
    super::accept_loop(listener, "inbound", drain, stops, |tcp, peer| {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            shared.metrics.reject(Direction::Inbound, "max_connections");
            warn!(src.addr = %peer, limit = max_connections, "inbound connection refused: connection limit reached");
            copy::reset(&tcp);
            return None;
        };
        let (shared, entry) = (shared.clone(), entry.clone());
        // Bounded by the handshake timeout and the copy.
        Some(async move {
            let _permit = permit;
            handle(tcp, peer, &entry, &shared).await;
        })
    })
    .await;
}

fn reject(shared: &Shared, peer: SocketAddr, reason: &'static str, detail: &dyn std::fmt::Display) {
    shared.metrics.reject(Direction::Inbound, reason);
    warn!(src.addr = %peer, reason, error = %detail, "inbound connection rejected");
}

async fn handle(tcp: TcpStream, peer: SocketAddr, entry: &Entry, shared: &Shared) {
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let config = shared.config();
    let direct = match entry {
        Entry::Mesh => None,
        Entry::Direct(key) => {
            let Some(local) = config.services.iter().find(|s| s.key == *key) else {
                return;
            };
            match detect::transport(&tcp).await {
                detect::Transport::Gone => return,
                detect::Transport::Tls => Some(local),
                detect::Transport::Plaintext if local.protocol.is_http() => {
                    return serve_plaintext_http(tcp, local, peer, shared, started).await;
                }
                detect::Transport::Plaintext => {
                    return serve_caller(tcp, None, local, peer, shared, started).await;
                }
            }
        }
    };
    let Some((tls_stream, caller, local)) =
        accept_tls(tcp, peer, direct, &config, shared, started).await
    else {
        return;
    };
    let serial = crate::deny::peer_serial(tls_stream.get_ref().1);
    let mut deny_rx = shared.deny_rx.clone();
    tokio::select! {
        () = serve_mtls(tls_stream, caller.clone(), local, peer, shared, started) => {}
        () = crate::deny::until_denied(serial.as_deref(), &mut deny_rx) => {
            // The serving future is dropped here, which closes both sockets (caller and app).
            shared.metrics.reject(Direction::Inbound, super::tls::REASON_CERT_REVOKED);
            warn!(
                src.identity = %caller,
                src.addr = %peer,
                dst.service = %local.key,
                serial = serial.as_deref().unwrap_or_default(),
                reason = super::tls::REASON_CERT_REVOKED,
                "connection closed: the caller's certificate was revoked"
            );
        }
    }
}

/// An accepted mTLS caller: a byte stream, HTTP/1 or meshd's HTTP/2, by ALPN and protocol.
async fn serve_mtls(
    tls_stream: TlsStream<TcpStream>,
    caller: Identity,
    local: &Service,
    peer: SocketAddr,
    shared: &Shared,
    started: Instant,
) {
    let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(mesh_runtime::tls::ALPN_MESH_H2);
    match (h2, local.protocol.is_http()) {
        (false, false) => {
            serve_caller(tls_stream, Some(&caller), local, peer, shared, started).await;
        }
        // An HTTP app is never handed a byte stream: the caller could write its own identity
        // header and walk past per-request policy.
        (false, true) => {
            super::http::inbound::serve_http(tls_stream, Some(caller), local, peer, shared).await;
        }
        (true, true) => super::http::inbound::serve(tls_stream, caller, local, peer, shared).await,
        (true, false) => {
            // The caller's view of the service's protocol is out of date (or forged).
            copy::reset(tls_stream.get_ref().0);
            reject(
                shared,
                peer,
                "protocol_mismatch",
                &format!(
                    "{} is a tcp service; requests over http/2 refused",
                    local.key
                ),
            );
        }
    }
}

/// A plaintext caller of an HTTP-family service: refused like any plaintext caller unless the
/// service is PERMISSIVE, then served request by request (each one authorized on its own).
async fn serve_plaintext_http(
    tcp: TcpStream,
    local: &Service,
    peer: SocketAddr,
    shared: &Shared,
    started: Instant,
) {
    let attrs = Attrs {
        caller: None,
        source_ip: peer.ip(),
        service: local,
        http: None,
    };
    if !shared.has_policy() {
        // Answered per request with 503 `inbound/no_policy`, as an mTLS caller is.
        return super::http::inbound::serve_http(tcp, None, local, peer, shared).await;
    }
    let mode =
        mesh_api::policy::authz::mtls_mode(&shared.policy_rx.borrow(), &attrs.request().workload);
    if mode != MtlsMode::Permissive {
        let mut policy_rx = shared.policy_rx.clone();
        // Counted, logged and answered exactly as a plaintext TCP caller under STRICT.
        let decision = admit(shared, &attrs, peer, &mut policy_rx);
        copy::reset(&tcp);
        let end = End {
            transferred: copy::Transferred::default(),
            decision: &decision,
            error: Some("denied by policy".to_owned()),
        };
        return access_log(shared, &attrs, peer, started, &end);
    }
    super::http::inbound::serve_http(tcp, None, local, peer, shared).await;
}

/// The mTLS handshake: a mesh workload identity from this trust domain, for a local service
/// named by SNI (the `listen` address's own service when `only` is set).
async fn accept_tls<'s>(
    tcp: TcpStream,
    peer: SocketAddr,
    only: Option<&'s Service>,
    config: &'s Config,
    shared: &Shared,
    started: Instant,
) -> Option<(TlsStream<TcpStream>, Identity, &'s Service)> {
    let state = shared.tls_rx.borrow().clone();
    let acceptor = TlsAcceptor::from(state.server.clone());
    let tls_stream = match timeout(config.inbound.handshake_timeout, acceptor.accept(tcp)).await {
        Err(_) => {
            reject(
                shared,
                peer,
                "handshake_timeout",
                &"tls handshake timed out",
            );
            return None;
        }
        Ok(Err(e)) => {
            reject(shared, peer, tls::failure_reason(&e), &e);
            return None;
        }
        Ok(Ok(s)) => s,
    };
    shared
        .metrics
        .handshake_duration
        .observe(started.elapsed().as_secs_f64());
    if tls::resumed_with_stale_cert(tls_stream.get_ref().1) {
        copy::reset(tls_stream.get_ref().0);
        reject(
            shared,
            peer,
            "cert_expired",
            &"resumed session of an expired client certificate",
        );
        return None;
    }
    shared
        .metrics
        .handshake(Direction::Inbound, tls_stream.get_ref().1);
    if let Some(serial) = crate::deny::denied_peer(&shared.deny_rx.borrow(), tls_stream.get_ref().1)
    {
        copy::reset(tls_stream.get_ref().0);
        reject(
            shared,
            peer,
            super::tls::REASON_CERT_REVOKED,
            &format!("caller certificate {serial} is revoked"),
        );
        return None;
    }
    let (_, conn) = tls_stream.get_ref();
    let Some(svc) = conn.server_name().and_then(ServiceKey::from_sni) else {
        reject(
            shared,
            peer,
            "unknown_service",
            &"no mesh service named in SNI",
        );
        return None;
    };
    let caller = conn
        .peer_certificates()
        .and_then(mesh_runtime::tls::peer_identity);
    let caller = match caller {
        Some(id @ Identity::Workload { .. }) if *id.trust_domain() == state.trust_domain => id,
        other => {
            copy::reset(tls_stream.get_ref().0);
            reject(
                shared,
                peer,
                "not_workload_identity",
                &format!("caller identity {other:?} is not a workload of this mesh"),
            );
            return None;
        }
    };
    let local = match only {
        Some(s) if s.key == svc => Some(s),
        Some(_) => None,
        None => config.services.iter().find(|s| s.key == svc),
    };
    let Some(local) = local else {
        copy::reset(tls_stream.get_ref().0);
        let why = match only {
            Some(s) => format!("{svc} is not served on {}'s listen address", s.key),
            None => format!("{svc} is not served on this node"),
        };
        reject(shared, peer, "unknown_service", &why);
        return None;
    };
    Some((tls_stream, caller, local))
}

/// A caller's connection, mTLS or plaintext, with the TCP socket beneath it (to reset).
trait CallerStream: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl CallerStream for TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl CallerStream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// Authorizes the caller (`None` = plaintext), connects to the app and relays until the end.
async fn serve_caller<S: CallerStream>(
    mut stream: S,
    caller: Option<&Identity>,
    local: &Service,
    peer: SocketAddr,
    shared: &Shared,
    started: Instant,
) {
    let svc = &local.key;
    let service = svc.to_string();
    if !shared.has_policy() {
        // Fail closed: an empty policy would allow everything.
        copy::reset(stream.tcp());
        return reject(
            shared,
            peer,
            authz::REASON_NO_POLICY,
            &format!("no policy snapshot yet; {svc} refuses callers until the registry sends one"),
        );
    }
    let attrs = Attrs {
        caller,
        source_ip: peer.ip(),
        service: local,
        http: None,
    };
    let mut policy_rx = shared.policy_rx.clone();
    let decision = admit(shared, &attrs, peer, &mut policy_rx);
    if !decision.is_allowed() {
        copy::reset(stream.tcp());
        let end = End {
            transferred: copy::Transferred::default(),
            decision: &decision,
            error: Some("denied by policy".to_owned()),
        };
        return access_log(shared, &attrs, peer, started, &end);
    }
    let mut app = match timeout(
        shared.config().outbound.connect_timeout,
        TcpStream::connect(local.address),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            copy::reset(stream.tcp());
            return reject(
                shared,
                peer,
                "app_unreachable",
                &format!("connecting to {svc} at {}: {e}", local.address),
            );
        }
        Err(_) => {
            copy::reset(stream.tcp());
            return reject(
                shared,
                peer,
                "app_unreachable",
                &format!("connecting to {svc} at {} timed out", local.address),
            );
        }
    };
    let _ = app.set_nodelay(true);
    let labels = ServiceLabels {
        direction: Direction::Inbound,
        service: service.clone(),
    };
    shared.metrics.connections.get_or_create(&labels).inc();
    if caller.is_none() {
        shared.metrics.plaintext.get_or_create(&labels).inc();
    }
    let _active = ActiveGuard::new(&shared.metrics, Direction::Inbound);
    let mut force = shared.force_rx.clone();
    let stopped = relay(&mut app, &mut stream, &attrs, &mut policy_rx, &mut force).await;
    let mut last = decision;
    let (transferred, error) = match stopped {
        Stopped::Copied(Ok(t)) => (t, None),
        Stopped::Copied(Err(e)) => {
            copy::reset(stream.tcp());
            (copy::Transferred::default(), Some(e.to_string()))
        }
        Stopped::Forced => {
            copy::reset(&app);
            copy::reset(stream.tcp());
            (
                copy::Transferred::default(),
                Some("closed at the end of the drain grace period".to_owned()),
            )
        }
        Stopped::Revoked(now) => {
            copy::reset(&app);
            copy::reset(stream.tcp());
            shared.metrics.record_decision(&service, &now, true);
            warn!(
                src.identity = %authz::caller_text(caller),
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

    let end = End {
        transferred,
        decision: &last,
        error,
    };
    access_log(shared, &attrs, peer, started, &end);
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
            src.identity = %authz::caller_text(attrs.caller),
            src.addr = %peer,
            dst.service = %service,
            allowed = decision.is_allowed(),
            audit = ?decision.audit().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "connection matched an audit policy"
        );
    }
    if !decision.is_allowed() {
        let (_, reason) = authz::labels(&decision, false);
        // Plaintext refused under STRICT is a transport rejection, not a policy denial.
        let rejected = if reason == REASON_MTLS_REQUIRED {
            REASON_MTLS_REQUIRED
        } else {
            "denied_by_policy"
        };
        shared.metrics.reject(Direction::Inbound, rejected);
        warn!(
            src.identity = %authz::caller_text(attrs.caller),
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
async fn relay<S: CallerStream>(
    app: &mut TcpStream,
    caller: &mut S,
    attrs: &Attrs<'_>,
    policy_rx: &mut watch::Receiver<Arc<Snapshot>>,
    force: &mut watch::Receiver<bool>,
) -> Stopped {
    let copy = copy::bidirectional(app, caller, false);
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

/// Metrics, access-log event and edge count of a connection that reached authorization.
fn access_log(
    shared: &Shared,
    attrs: &Attrs<'_>,
    peer: SocketAddr,
    started: Instant,
    end: &End<'_>,
) {
    let rec = observe::Record {
        direction: Direction::Inbound,
        started,
        src_addr: peer,
        src_service: attrs.caller.and_then(workload_service),
        src_identity: attrs.caller.cloned(),
        mtls: attrs.caller.is_some(),
        dst_service: attrs.service.key.clone(),
        dst_addr: Some(attrs.service.address),
        kind: observe::Kind::Tcp {
            to_service: end.transferred.to_service,
            to_caller: end.transferred.to_caller,
            failed: end.error.is_some(),
        },
        decision: Some((
            if end.decision.is_allowed() {
                "allow"
            } else {
                "deny"
            },
            authz::policy_of(end.decision),
        )),
        trace_id: None,
        error: end.error.clone().unwrap_or_default(),
    };
    observe::finish(shared, rec);
}

/// The service of a workload identity (node and operator identities call no service).
pub fn workload_service(id: &Identity) -> Option<mesh_api::ServiceKey> {
    match id {
        Identity::Workload { service, .. } => Some(service.clone()),
        _ => None,
    }
}
