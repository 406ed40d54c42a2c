//! The inbound side: accepts mTLS from other hosts on the single inbound port, requires a
//! workload certificate from the mesh CA, picks the local service by SNI, authorizes the caller
//! against the current policy and forwards to the app on its local address. A service's own
//! `listen` address takes mTLS the same way and, while the service is PERMISSIVE, plaintext
//! from clients not yet in the mesh, told apart by the first byte. Open connections are
//! re-authorized on every policy change and reset when no longer allowed.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::policy::authz::MtlsMode;
use mesh_api::{Identity, ServiceKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::warn;

use super::accept::{Stops, accept_loop};
use super::authz::Attrs;
use super::metrics::Direction;
use super::shared::Shared;
use super::{copy, detect, tls};

pub mod decide;
pub mod egress;
pub mod http;
pub mod tcp;
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
pub async fn serve(listener: Arc<TcpListener>, entry: Entry, shared: Shared, stops: Stops) {
    // A restart-only setting: a reload that changes it is refused.
    let max_connections = shared.config().inbound.max_connections;
    let permits = Arc::new(Semaphore::new(max_connections));
    let drain = shared.drain.clone();
    accept_loop(listener, "inbound", drain, stops, |tcp, peer| {
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
                    return tcp::serve(tcp, None, local, peer, shared, started).await;
                }
            }
        }
    };
    let Some((tls_stream, caller, callee)) =
        accept_tls(tcp, peer, direct, &config, shared, started).await
    else {
        return;
    };
    let serial = crate::deny::peer_serial(tls_stream.get_ref().1);
    let mut deny_rx = shared.deny_rx.clone();
    let local = match callee {
        Callee::Local(local) => local,
        Callee::Egress { service, gateway } => {
            tokio::select! {
                () = egress::serve(tls_stream, caller.clone(), &service, &gateway, peer, shared, started) => {}
                () = crate::deny::until_denied(serial.as_deref(), &mut deny_rx) => {
                    shared.metrics.reject(Direction::Inbound, super::tls::REASON_CERT_REVOKED);
                    warn!(src.identity = %caller, src.addr = %peer, dst.service = %service, reason = super::tls::REASON_CERT_REVOKED, "connection closed: the caller's certificate was revoked");
                }
            }
            return;
        }
    };
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
            tcp::serve(tls_stream, Some(&caller), local, peer, shared, started).await;
        }
        // An HTTP app is never handed a byte stream: the caller could write its own identity
        // header and walk past per-request policy.
        (false, true) => {
            http::serve_http(tls_stream, Some(caller), local, peer, shared).await;
        }
        (true, true) => http::serve(tls_stream, caller, local, peer, shared).await,
        (true, false) => {
            // The caller's view of the service's protocol is out of date (or forged).
            copy::reset(tls_stream.get_ref().0);
            decide::reject(
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
        return http::serve_http(tcp, None, local, peer, shared).await;
    }
    let mode =
        mesh_api::policy::authz::mtls_mode(&shared.policy_rx.borrow(), &attrs.request().workload);
    if mode != MtlsMode::Permissive {
        let mut policy_rx = shared.policy_rx.clone();
        // Counted, logged and answered exactly as a plaintext TCP caller under STRICT.
        let decision = decide::admit(shared, &attrs, peer, &mut policy_rx);
        copy::reset(&tcp);
        let end = decide::End {
            transferred: copy::Transferred::default(),
            decision: &decision,
            error: Some("denied by policy".to_owned()),
        };
        return decide::access_log(shared, &attrs, peer, started, &end);
    }
    http::serve_http(tcp, None, local, peer, shared).await;
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
) -> Option<(TlsStream<TcpStream>, Identity, Callee<'s>)> {
    let state = shared.tls_rx.borrow().clone();
    let tls_stream = handshake(tcp, peer, &state, config, shared, started).await?;
    let (caller, local) = identify(&tls_stream, peer, &state, only, config, shared)?;
    Some((tls_stream, caller, local))
}

/// The TLS handshake under the current server config, within the handshake timeout; a
/// resumed session of an expired certificate, or a revoked one, is refused.
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    state: &tls::TlsState,
    config: &Config,
    shared: &Shared,
    started: Instant,
) -> Option<TlsStream<TcpStream>> {
    let acceptor = TlsAcceptor::from(state.server.clone());
    let tls_stream = match timeout(config.inbound.handshake_timeout, acceptor.accept(tcp)).await {
        Err(_) => {
            decide::reject(
                shared,
                peer,
                "handshake_timeout",
                &"tls handshake timed out",
            );
            return None;
        }
        Ok(Err(e)) => {
            decide::reject(shared, peer, tls::failure_reason(&e), &e);
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
        decide::reject(
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
        decide::reject(
            shared,
            peer,
            super::tls::REASON_CERT_REVOKED,
            &format!("caller certificate {serial} is revoked"),
        );
        return None;
    }
    Some(tls_stream)
}

/// Who is calling which local service: a workload identity of this trust domain, and the
/// service named by SNI (the `listen` address's own service when `only` is set).
fn identify<'s>(
    tls_stream: &TlsStream<TcpStream>,
    peer: SocketAddr,
    state: &tls::TlsState,
    only: Option<&'s Service>,
    config: &'s Config,
    shared: &Shared,
) -> Option<(Identity, Callee<'s>)> {
    let (_, conn) = tls_stream.get_ref();
    let sni = conn.server_name().unwrap_or_default();
    let egress = (only.is_none())
        .then(|| mesh_api::policy::parse_egress_sni(sni))
        .flatten();
    // A caller of another site names this site: its east-west gateway passed the connection on.
    let svc = ServiceKey::from_sni(sni).or_else(|| {
        let (svc, site) = ServiceKey::from_site_sni(sni)?;
        (site == config.site).then_some(svc)
    });
    if svc.is_none() && egress.is_none() {
        decide::reject(
            shared,
            peer,
            "unknown_service",
            &"no mesh service named in SNI",
        );
        return None;
    }
    let caller = conn
        .peer_certificates()
        .and_then(mesh_runtime::tls::peer_identity);
    let caller = match caller {
        Some(id @ Identity::Workload { .. }) if *id.trust_domain() == state.trust_domain => id,
        other => {
            copy::reset(tls_stream.get_ref().0);
            decide::reject(
                shared,
                peer,
                "not_workload_identity",
                &format!("caller identity {other:?} is not a workload of this mesh"),
            );
            return None;
        }
    };
    let Some(svc) = svc else {
        let (service, gateway, namespace) = egress?;
        let callee = Callee::Egress {
            service: ServiceKey::new(namespace.clone(), service),
            gateway: ServiceKey::new(namespace, gateway),
        };
        return Some((caller, callee));
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
        decide::reject(shared, peer, "unknown_service", &why);
        return None;
    };
    Some((caller, Callee::Local(local)))
}

/// What an accepted mTLS caller asked for.
enum Callee<'s> {
    /// A service of this host.
    Local(&'s Service),
    /// An ExternalService through an egress gateway (this host must run it).
    Egress {
        /// The ExternalService.
        service: ServiceKey,
        /// The gateway named.
        gateway: ServiceKey,
    },
}
