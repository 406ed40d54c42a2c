//! CONNECT tunnels on the `http_proxy` listener: how an app that does its own TLS (one that
//! honours `HTTPS_PROXY`) reaches a host outside the mesh. The host and port must be those of
//! a `tcp` ExternalService without TLS origination — reached directly or through its egress
//! gateway — or, under `outbound_traffic = "allow_any"`, any host; under `registry_only` any
//! other host is refused. The target is connected before the app gets its `200`, so a failure
//! is an HTTP answer, not a dropped tunnel.

// `Err` is the mesh's HTTP answer itself, returned at most once per request.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_api::ServiceKey;
use mesh_api::policy::{ExternalProtocol, OutboundTraffic};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tracing::{debug, warn};

use super::super::compiled::Destination;
use super::super::http::{Body, empty, mesh_response};
use super::super::metrics::Direction;
use super::super::shared::Shared;
use super::super::{connect, copy, endpoints};
use super::external::{TcpEnd, count_tcp, finish_tcp, passthrough_key};

/// A connected tunnel end, whatever carries it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Where a CONNECT goes, once decided.
enum Target {
    /// An ExternalService (direct, or through its gateway: the destination knows).
    External(Arc<Destination>),
    /// A host outside the registry, under `allow_any`.
    Anywhere(String),
}

/// Answers a CONNECT from `source`'s app on its `http_proxy` listener: `200` and the tunnel,
/// or the mesh's reason not to.
pub async fn connect(
    shared: &Shared,
    source: &ServiceKey,
    cursor: &AtomicUsize,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let target = match decide(shared, source, &req) {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let (dst_service, dialed) = match &target {
        Target::External(dst) => (
            dst.service.clone(),
            dial_external(shared, source, dst, cursor).await,
        ),
        Target::Anywhere(authority) => (passthrough_key(), dial_anywhere(shared, authority).await),
    };
    let (stream, addr) = match dialed {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (shared, source) = (shared.clone(), source.clone());
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            debug!(src.service = %source, "CONNECT: the app went away before the tunnel opened");
            return;
        };
        relay(
            &shared,
            &source,
            &dst_service,
            peer,
            addr,
            started,
            TokioIo::new(upgraded),
            stream,
        )
        .await;
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// Where the CONNECT may go; `Err` is the refusal.
fn decide(
    shared: &Shared,
    source: &ServiceKey,
    req: &Request<Incoming>,
) -> Result<Target, Response<Body>> {
    let refuse = |status, reason: &'static str, why: String| {
        shared.metrics.reject(Direction::Outbound, reason);
        Err(mesh_response(status, "outbound", reason, why))
    };
    let Some(authority) = req.uri().authority() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "CONNECT needs host:port\n".into(),
        );
    };
    let port = authority.port_u16().unwrap_or(443);
    let Some(name) = mesh_api::policy::normalize_host(authority.host()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{authority} is not a host and port\n"),
        );
    };
    if name == "mesh" || name.ends_with(".mesh") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "connect_unsupported",
            format!(
                "{name} is a mesh service: send plain HTTP (http://{name}/), the mesh encrypts it\n"
            ),
        );
    }
    let compiled = shared.compiled();
    let Some(key) = compiled.external_for_host(&name, source.namespace.as_str()) else {
        return match compiled.policy.mesh_config().outbound_traffic {
            OutboundTraffic::AllowAny => Ok(Target::Anywhere(format!("{name}:{port}"))),
            OutboundTraffic::RegistryOnly => refuse(
                StatusCode::FORBIDDEN,
                "registry_only",
                format!(
                    "{name} is neither a mesh service nor an ExternalService, and MeshConfig \
                     outbound_traffic = \"registry_only\" refuses other hosts; apply an \
                     ExternalService with hosts = [\"{name}\"], port = {port}, protocol = \"tcp\"\n"
                ),
            ),
        };
    };
    let dst = compiled.destination(key);
    let Some(ext) = dst.external.as_ref() else {
        return refuse(
            StatusCode::BAD_GATEWAY,
            "no_endpoints",
            format!("{key} has no endpoints\n"),
        );
    };
    if ext.port != port {
        return refuse(
            StatusCode::FORBIDDEN,
            "port_not_served",
            format!(
                "ExternalService {key} serves {name} on port {}, not {port}\n",
                ext.port
            ),
        );
    }
    if ext.protocol == ExternalProtocol::Http || ext.tls.is_some() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "connect_unsupported",
            format!(
                "ExternalService {key} is reached through the mesh's own HTTP{}: send plain HTTP \
                 (http://{name}/) instead of CONNECT\n",
                if ext.tls.is_some() { " and TLS" } else { "" }
            ),
        );
    }
    Ok(Target::External(dst))
}

type Dialed = Result<(Box<dyn Stream>, Option<SocketAddr>), Response<Body>>;

/// Connects to an ExternalService: itself, or its egress gateway over mTLS as `source`.
async fn dial_external(
    shared: &Shared,
    source: &ServiceKey,
    dst: &Destination,
    cursor: &AtomicUsize,
) -> Dialed {
    let failed = |reason: &'static str, why: String| {
        shared.metrics.reject(Direction::Outbound, reason);
        warn!(src.service = %source, dst.service = %dst.service, reason, error = %why, "CONNECT tunnel not opened");
        Err(mesh_response(
            StatusCode::BAD_GATEWAY,
            "outbound",
            reason,
            format!("{why}\n"),
        ))
    };
    if let Some(client) = &dst.direct {
        return match client.dialer.dial().await {
            Ok((io, addr)) => Ok((Box::new(io), Some(addr))),
            Err(e) => failed(e.reason(), e.to_string()),
        };
    }
    let Some(tls) = shared.tls_rx.borrow().clients.get(source).cloned() else {
        return failed("no_certificate", format!("{source} has no certificate yet"));
    };
    let at = cursor.fetch_add(1, Ordering::Relaxed);
    let lb = endpoints::DEFAULT_TCP_LOAD_BALANCER;
    let order = connect::order(shared, dst, None, lb, at);
    if order.is_empty() {
        let e = connect::Error::NoEndpoints(dst.service.to_string());
        return failed(e.reason(), e.to_string());
    }
    match connect::dial(shared, &tls, dst, &order).await {
        Ok((stream, i)) => Ok((Box::new(stream), Some(dst.targets[i].endpoint.addr))),
        Err(e) => failed(e.reason(), e.to_string()),
    }
}

/// Connects to `authority` (host:port) as it is.
async fn dial_anywhere(shared: &Shared, authority: &str) -> Dialed {
    let limit = shared.config().outbound.connect_timeout;
    let why = match timeout(limit, TcpStream::connect(authority)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            let addr = tcp.peer_addr().ok();
            return Ok((Box::new(tcp), addr));
        }
        Ok(Err(e)) => format!("{authority}: {e}"),
        Err(_) => format!("{authority}: no connection within {limit:?}"),
    };
    shared
        .metrics
        .reject(Direction::Outbound, "passthrough_connect");
    Err(mesh_response(
        StatusCode::BAD_GATEWAY,
        "outbound",
        "passthrough_connect",
        format!("{why}\n"),
    ))
}

/// Copies between the app and the target until both are done or the drain ends; recorded as
/// a TCP connection to `dst`.
#[allow(clippy::too_many_arguments)] // one call site, each argument at hand
async fn relay(
    shared: &Shared,
    source: &ServiceKey,
    dst: &ServiceKey,
    peer: SocketAddr,
    addr: Option<SocketAddr>,
    started: Instant,
    mut app: TokioIo<hyper::upgrade::Upgraded>,
    mut target: Box<dyn Stream>,
) {
    let _active = count_tcp(shared, dst);
    let mut force = shared.force_rx.clone();
    let sizes = (copy::BUF_SIZE, copy::BUF_SIZE);
    let r = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut app, &mut target, sizes.0, sizes.1) => r,
        _ = mesh_runtime::drain::until_true(&mut force) => {
            Err(std::io::Error::other("closed at the end of the drain grace period"))
        }
    };
    let (t, error) = match r {
        Ok((to_service, to_caller)) => (
            copy::Transferred {
                to_service,
                to_caller,
            },
            None,
        ),
        Err(e) => (copy::Transferred::default(), Some(e.to_string())),
    };
    let end = TcpEnd {
        started,
        peer,
        addr,
        transferred: t,
        error,
    };
    finish_tcp(shared, source, dst, end);
}
