//! A gateway listener's accept loop: each connection first gives up its PROXY header (when the
//! listener expects one), then goes to its listener protocol's server: HTTP, HTTPS (TLS
//! terminated here), TLS passed through by SNI, or TCP relayed, all to the mesh as the gateway.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use mesh_api::ServiceKey;
use mesh_api::policy::{ListenerProtocol, best_match};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::super::accept::{Stops, accept_loop};
use super::super::copy;
use super::super::metrics::Direction;
use super::super::outbound::tcp;
use super::super::shared::Shared;
use super::listener::GatewayListener;
use super::sni::{self, Hello};
use super::terminate::{self, Terminator};
use super::{http, proxy_protocol};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What every connection of one listener shares.
struct Listening {
    gl: Arc<GatewayListener>,
    shared: Shared,
    cursor: Arc<AtomicUsize>,
    /// `https` only.
    term: Option<Arc<Terminator>>,
}

/// Accepts connections on a gateway listener until `stops` says so.
pub async fn serve(socket: Arc<TcpListener>, gl: GatewayListener, shared: Shared, stops: Stops) {
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
    // Each listener takes at most as many connections as the host's inbound listener
    // (`inbound.max_connections`): beyond it, new clients are reset and counted, not queued.
    let limit = shared.config().inbound.max_connections;
    let permits = Arc::new(Semaphore::new(limit));
    let listening = Arc::new(Listening {
        gl: Arc::new(gl),
        shared,
        cursor: Arc::new(AtomicUsize::new(0)),
        term,
    });
    accept_loop(socket, "gateway", drain, stops, |tcp, peer: SocketAddr| {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let why = format!("connection limit ({limit}) reached");
            refuse(&listening.shared, &tcp, peer, "max_connections", &why);
            return None;
        };
        let listening = listening.clone();
        let task: Task = Box::pin(async move {
            let _permit = permit;
            connection(listening, tcp, peer).await;
        });
        Some(task)
    })
    .await;
}

/// Serves one connection by the listener's protocol.
async fn connection(l: Arc<Listening>, mut tcp: TcpStream, peer: SocketAddr) {
    let limit = l.shared.config_rx.borrow().inbound.handshake_timeout;
    let client = if l.gl.listener.proxy_protocol {
        match proxy_protocol::read(&mut tcp, peer, limit).await {
            Ok(client) => client,
            Err(e) => {
                refuse(&l.shared, &tcp, peer, "proxy_protocol", &e);
                return;
            }
        }
    } else {
        peer
    };
    let (gl, shared, cursor) = (l.gl.clone(), l.shared.clone(), l.cursor.clone());
    match (gl.listener.protocol, &l.term) {
        (ListenerProtocol::Http, _) => http::serve(tcp, client, gl, shared, cursor).await,
        (ListenerProtocol::Https, Some(term)) => {
            http::serve_tls(tcp, client, gl, shared, cursor, term.clone()).await;
        }
        (ListenerProtocol::Tls, _) => passthrough(tcp, client, &l, limit).await,
        (ListenerProtocol::Tcp, _) => relay(tcp, client, &l).await,
        // An https listener always has its terminator (checked above).
        (ListenerProtocol::Https, None) => {}
    }
}

/// Relays a TLS connection untouched to the listener's service, once its ClientHello names a
/// host the listener serves.
async fn passthrough(tcp: TcpStream, client: SocketAddr, l: &Listening, limit: Duration) {
    match peek_sni(&tcp, limit).await {
        Ok(host) => {
            let hosts = &l.gl.listener.hostnames;
            let served = match &host {
                Some(h) => best_match(hosts, h).is_some(),
                None => hosts.is_empty(),
            };
            if !served {
                let why = format!("SNI {host:?} is not a host this listener serves");
                refuse(&l.shared, &tcp, client, "sni_not_served", &why);
                return;
            }
            relay(tcp, client, l).await;
        }
        Err(why) => refuse(&l.shared, &tcp, client, "not_tls", &why),
    }
}

/// Relays the connection to the listener's service as the gateway.
async fn relay(tcp: TcpStream, client: SocketAddr, l: &Listening) {
    let Some(name) = &l.gl.listener.service else {
        return; // validation requires it for tls and tcp listeners
    };
    let gateway = &l.gl.gateway;
    let service = ServiceKey::new(gateway.namespace.clone(), name.clone());
    // The address the client reached: the listener's, as this socket has it.
    let preamble = (l.gl.listener.send_proxy_protocol)
        .map(|v| proxy_protocol::encode(v, client, tcp.local_addr().unwrap_or(l.gl.listener.bind)));
    let preamble = preamble.as_deref();
    tcp::serve(
        tcp, client, gateway, &service, &l.shared, &l.cursor, preamble,
    )
    .await;
}

/// Why a connection gave no server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NoHello {
    /// Closed before sending a byte: a TCP health check, or another site's distance probe.
    Closed,
    /// Not TLS, too slow, or an I/O error.
    Bad(String),
}

impl std::fmt::Display for NoHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("closed before a ClientHello"),
            Self::Bad(why) => f.write_str(why),
        }
    }
}

/// The SNI of the connection's ClientHello, read without consuming it, within `limit`.
pub(crate) async fn peek_sni(tcp: &TcpStream, limit: Duration) -> Result<Option<String>, NoHello> {
    let read = async {
        let mut buf = vec![0u8; sni::MAX_HELLO];
        let mut seen = 0;
        loop {
            let n = (tcp.peek(&mut buf).await).map_err(|e| NoHello::Bad(e.to_string()))?;
            match sni::client_hello(&buf[..n]) {
                Hello::Sni(host) => return Ok(host),
                Hello::NotTls(why) => return Err(NoHello::Bad(why.to_owned())),
                Hello::Incomplete if n == 0 => return Err(NoHello::Closed),
                Hello::Incomplete if n == seen => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Hello::Incomplete => seen = n,
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| Err(NoHello::Bad(format!("no ClientHello within {limit:?}"))))
}

/// Counts a connection the gateway refuses and resets it.
fn refuse(
    shared: &Shared,
    tcp: &TcpStream,
    client: SocketAddr,
    reason: &'static str,
    why: &dyn std::fmt::Display,
) {
    shared.metrics.reject(Direction::Inbound, reason);
    debug!(src.addr = %client, reason, error = %why, "gateway connection refused");
    copy::reset(tcp);
}
