//! The outbound side of ExternalServices this host reaches itself: one HTTP attempt on the
//! service's pooled client (TLS originated there), a TCP connection relayed to it, and — under
//! `MeshConfig.outbound_traffic = "allow_any"` — requests on the `http_proxy` listener for a
//! host the mesh does not know, passed through as they are.

// `Err` is the mesh's HTTP answer itself, returned at most once per request.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http::header::{self, HeaderValue};
use http::uri::{Scheme, Uri};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use mesh_api::ServiceKey;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::warn;

use super::super::external::{self, ExternalClient, SendError};
use super::super::http::{Body, mesh_response, strip_hop_by_hop, strip_mesh_owned};
use super::super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::super::retry::Attempt;
use super::super::shared::Shared;
use super::super::{copy, observe};

/// The result of one attempt: the response, or how it failed and the mesh's answer.
pub type Tried = Result<Response<Body>, (Attempt, Response<Body>)>;

/// The name passed-through traffic is recorded under (metrics, access log, topology): what
/// an operator looks for before turning on `registry_only`.
pub const PASSTHROUGH: (&str, &str) = ("mesh-system", "passthrough");

/// One attempt of a request (already rewritten by `to_mesh_request`) on `client`: HTTP/1.1
/// with the `Host` of the service, on a pooled connection or a new one.
pub async fn attempt(shared: &Shared, client: &ExternalClient, mut req: Request<Body>) -> Tried {
    let app_host = req.uri().authority().map(|a| a.as_str().to_owned());
    let (target, host) = client.request_target(app_host.as_deref());
    let path = (req.uri().path_and_query()).map_or_else(|| "/".to_owned(), ToString::to_string);
    *req.uri_mut() = with_path(&target, &path);
    *req.version_mut() = http::Version::HTTP_11;
    if let Ok(v) = HeaderValue::from_str(&host) {
        req.headers_mut().insert(header::HOST, v);
    }
    match client.send(req).await {
        Ok(resp) => Ok(from_outside(resp)),
        Err(e) => Err(failed(shared, &client.key, &e)),
    }
}

/// A response from outside the mesh as the app gets it: without hop-by-hop headers, and
/// without `x-mesh-*` ones — a server outside cannot speak for the mesh (no meshd of the
/// callee's strips them here).
fn from_outside(resp: Response<hyper::body::Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    strip_mesh_owned(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

/// The answer for a request whose attempt failed, counted and logged.
fn failed(shared: &Shared, service: &ServiceKey, e: &SendError) -> (Attempt, Response<Body>) {
    let (attempt, status, reason) = match e {
        SendError::Connect(c @ external::Error::Timeout { .. }) => (
            Attempt::ConnectFailure,
            StatusCode::GATEWAY_TIMEOUT,
            c.reason(),
        ),
        SendError::Connect(c @ external::Error::Tls { .. }) => (
            Attempt::ConnectFailure,
            StatusCode::SERVICE_UNAVAILABLE,
            c.reason(),
        ),
        SendError::Connect(c) => (Attempt::ConnectFailure, StatusCode::BAD_GATEWAY, c.reason()),
        SendError::Exchange(_) => (Attempt::Reset, StatusCode::BAD_GATEWAY, "upstream_reset"),
        SendError::NotHttp => (Attempt::ConnectFailure, StatusCode::BAD_GATEWAY, "not_http"),
    };
    shared.metrics.reject(Direction::Outbound, reason);
    warn!(dst.service = %service, reason, error = %e, "request to an external service failed");
    let resp = mesh_response(status, "outbound", reason, format!("{service}: {e}\n"));
    (attempt, resp)
}

/// `target` (scheme and authority) with `path`.
fn with_path(target: &Uri, path: &str) -> Uri {
    let mut parts = target.clone().into_parts();
    parts.path_and_query = path.parse().ok();
    Uri::from_parts(parts).unwrap_or_else(|_| target.clone())
}

/// Relays one app connection to an external service this host reaches itself.
pub async fn serve_tcp(
    mut app: TcpStream,
    peer: SocketAddr,
    source: &ServiceKey,
    client: &Arc<ExternalClient>,
    shared: &Shared,
) {
    let _ = app.set_nodelay(true);
    let started = Instant::now();
    let _active = count_tcp(shared, &client.key);
    let (addr, transferred, error) = match client.dialer.dial().await {
        Err(e) => {
            copy::reset(&app);
            shared.metrics.reject(Direction::Outbound, e.reason());
            warn!(src.service = %source, dst.service = %client.key, reason = e.reason(), error = %e, "connection to an external service failed");
            (None, copy::Transferred::default(), Some(e.to_string()))
        }
        Ok((mut io, addr)) => {
            let mut force = shared.force_rx.clone();
            let r = tokio::select! {
                r = copy::bidirectional(&mut app, &mut io, true) => r,
                _ = mesh_runtime::drain::until_true(&mut force) => {
                    copy::reset(&app);
                    Err(std::io::Error::other("closed at the end of the drain grace period"))
                }
            };
            match r {
                Ok(t) => (Some(addr), t, None),
                Err(e) => {
                    copy::reset(io.tcp());
                    (
                        Some(addr),
                        copy::Transferred::default(),
                        Some(e.to_string()),
                    )
                }
            }
        }
    };
    let end = TcpEnd {
        started,
        peer,
        addr,
        transferred,
        error,
    };
    finish_tcp(shared, source, &client.key, end);
}

/// An app's connection to `dst` counted as open (metrics) until the guard drops.
pub(super) fn count_tcp(shared: &Shared, dst: &ServiceKey) -> ActiveGuard {
    let labels = ServiceLabels {
        direction: Direction::Outbound,
        service: dst.to_string(),
    };
    shared.metrics.connections.get_or_create(&labels).inc();
    ActiveGuard::new(&shared.metrics, Direction::Outbound)
}

/// How an app's TCP connection (a relay or a CONNECT tunnel) to a destination outside the
/// mesh ended.
pub(super) struct TcpEnd {
    pub started: Instant,
    pub peer: SocketAddr,
    pub addr: Option<SocketAddr>,
    pub transferred: copy::Transferred,
    pub error: Option<String>,
}

/// The access-log record and edge of such a connection (no mTLS: it left the mesh).
pub(super) fn finish_tcp(shared: &Shared, source: &ServiceKey, dst: &ServiceKey, end: TcpEnd) {
    let rec = observe::Record {
        direction: Direction::Outbound,
        started: end.started,
        src_addr: end.peer,
        src_service: Some(source.clone()),
        src_identity: None,
        mtls: false,
        dst_service: dst.clone(),
        dst_addr: end.addr,
        dst_site: None,
        kind: observe::Kind::Tcp {
            to_service: end.transferred.to_service,
            to_caller: end.transferred.to_caller,
            failed: end.error.is_some(),
        },
        decision: None,
        trace_id: None,
        error: end.error.unwrap_or_default(),
    };
    observe::finish(shared, rec);
}

/// Sends a request for a host the mesh does not know as it is, to that host (`allow_any`).
pub async fn passthrough(shared: &Shared, host: &str, req: Request<Body>) -> Response<Body> {
    static CLIENT: OnceLock<Client<HttpConnector, Body>> = OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(shared.config().outbound.connect_timeout));
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(external::POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .set_host(false)
            .build(connector)
    });
    let (mut parts, body) = req.into_parts();
    let path = (parts.uri.path_and_query()).map_or_else(|| "/".to_owned(), ToString::to_string);
    let target = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(host)
        .path_and_query(path)
        .build();
    let Ok(target) = target else {
        return mesh_response(
            StatusCode::BAD_REQUEST,
            "outbound",
            "bad_request",
            format!("{host:?} is not a usable host\n"),
        );
    };
    parts.uri = target;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(host) {
        parts.headers.insert(header::HOST, v);
    }
    match client.request(Request::from_parts(parts, body)).await {
        Ok(resp) => from_outside(resp),
        Err(e) => {
            let reason = if e.is_connect() {
                "passthrough_connect"
            } else {
                "upstream_reset"
            };
            shared.metrics.reject(Direction::Outbound, reason);
            mesh_response(
                StatusCode::BAD_GATEWAY,
                "outbound",
                reason,
                format!("{host}: {e}\n"),
            )
        }
    }
}

/// The key passed-through traffic is recorded under.
pub fn passthrough_key() -> ServiceKey {
    static KEY: OnceLock<ServiceKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let (ns, name) = PASSTHROUGH;
        ServiceKey::new(ns.parse().expect("a label"), name.parse().expect("a label"))
    })
    .clone()
}
