//! The inbound side of TCP services: an authorized caller's byte stream relayed to the app,
//! re-authorized on every policy change (and reset when no longer allowed), closed at the end
//! of the drain's grace period.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_api::Identity;
use mesh_api::policy::Snapshot;
use mesh_api::policy::authz::Decision;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tokio_rustls::server::TlsStream;
use tracing::warn;

use super::super::authz::{self, Attrs};
use super::super::copy;
use super::super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::super::shared::Shared;
use super::decide::{End, access_log, admit, reject};
use crate::config::Service;

/// A caller's connection, mTLS or plaintext, with the TCP socket beneath it (to reset).
pub trait CallerStream: AsyncRead + AsyncWrite + Unpin {
    /// The TCP socket beneath.
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

impl CallerStream for super::super::external::Io {
    fn tcp(&self) -> &TcpStream {
        super::super::external::Io::tcp(self)
    }
}

/// Authorizes the caller (`None` = plaintext), connects to the app and relays until the end.
pub async fn serve<S: CallerStream>(
    stream: S,
    caller: Option<&Identity>,
    local: &Service,
    peer: SocketAddr,
    shared: &Shared,
    started: Instant,
) {
    let connect = || connect_app(local, shared);
    serve_to(stream, caller, local, peer, shared, started, connect).await;
}

/// [`serve`] with the connection to what `local` stands for made by `connect` (the app's
/// address, or an ExternalService this host is the egress gateway of); `Err` is the reason
/// label and the detail of a failed connect.
pub async fn serve_to<S, A, F, Fut>(
    mut stream: S,
    caller: Option<&Identity>,
    local: &Service,
    peer: SocketAddr,
    shared: &Shared,
    started: Instant,
    connect: F,
) where
    S: CallerStream,
    A: CallerStream,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<A, (&'static str, String)>>,
{
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
    let mut app = match connect().await {
        Ok(app) => app,
        Err((reason, why)) => {
            copy::reset(stream.tcp());
            return reject(shared, peer, reason, &why);
        }
    };
    let _ = app.tcp().set_nodelay(true);
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
    let (transferred, error, last) =
        ended(stopped, &app, &stream, caller, decision, shared, peer, svc);
    let end = End {
        transferred,
        decision: &last,
        error,
    };
    access_log(shared, &attrs, peer, started, &end);
}

/// Connects to the app of `local`.
async fn connect_app(
    local: &Service,
    shared: &Shared,
) -> Result<TcpStream, (&'static str, String)> {
    let svc = &local.key;
    let connecting = TcpStream::connect(local.address);
    let why = match timeout(shared.config().outbound.connect_timeout, connecting).await {
        Ok(Ok(s)) => return Ok(s),
        Ok(Err(e)) => format!("connecting to {svc} at {}: {e}", local.address),
        Err(_) => format!("connecting to {svc} at {} timed out", local.address),
    };
    Err(("app_unreachable", why))
}

/// How a relay that stopped ended: bytes moved, the error if any, and the decision in force
/// at the end (a revoking one when a policy change closed it). Resets what must be reset.
#[allow(clippy::too_many_arguments)] // one call site, each argument at hand
fn ended<S: CallerStream, A: CallerStream>(
    stopped: Stopped,
    app: &A,
    stream: &S,
    caller: Option<&Identity>,
    decision: Decision,
    shared: &Shared,
    peer: SocketAddr,
    service: &mesh_api::ServiceKey,
) -> (copy::Transferred, Option<String>, Decision) {
    let none = copy::Transferred::default();
    match stopped {
        Stopped::Copied(Ok(t)) => (t, None, decision),
        Stopped::Copied(Err(e)) => {
            copy::reset(app.tcp());
            copy::reset(stream.tcp());
            (none, Some(e.to_string()), decision)
        }
        Stopped::Forced => {
            copy::reset(app.tcp());
            copy::reset(stream.tcp());
            let why = "closed at the end of the drain grace period".to_owned();
            (none, Some(why), decision)
        }
        Stopped::Revoked(now) => {
            copy::reset(app.tcp());
            copy::reset(stream.tcp());
            shared.metrics.record_decision(service, &now, true);
            warn!(
                src.identity = %authz::caller_text(caller),
                src.addr = %peer,
                dst.service = %service,
                policy = %authz::policy_of(&now),
                reason = authz::REASON_POLICY_CHANGED,
                "connection closed: no longer allowed by policy"
            );
            let why = "closed: no longer allowed by policy".to_owned();
            (none, Some(why), now)
        }
    }
}

/// Copies between the app and the caller until both are done, the drain's grace period ends,
/// or a policy change no longer allows the connection (re-decided on every change).
async fn relay<S: CallerStream, A: CallerStream>(
    app: &mut A,
    caller: &mut S,
    attrs: &Attrs<'_>,
    policy_rx: &mut watch::Receiver<Arc<Snapshot>>,
    force: &mut watch::Receiver<bool>,
) -> Stopped {
    let copy = async {
        let sizes = (copy::BUF_SIZE, copy::BUF_SIZE);
        match tokio::io::copy_bidirectional_with_sizes(app, caller, sizes.0, sizes.1).await {
            Ok((to_caller, to_service)) => Ok(copy::Transferred {
                to_service,
                to_caller,
            }),
            Err(e) => Err(e),
        }
    };
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
