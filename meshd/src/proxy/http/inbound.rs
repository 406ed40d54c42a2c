//! The inbound side of HTTP-family services: serves HTTP/2 from another meshd inside the
//! accepted mTLS connection, authorizes every request (method, path and headers included),
//! answers a denied one with 403 naming the policy, and forwards the rest to the app over a
//! pooled client in the app's own protocol.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::{Scheme, Uri};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_api::Identity;
use mesh_api::policy::authz::{Decision, Http};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::super::authz::{self, Attrs};
use super::super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::super::{Shared, observe, ratelimit, route};
use super::{AppClient, AppError, Body, XFCC, mesh_response, strip_hop_by_hop, upgrade};
use crate::config::Service;
use crate::trace::{Kind, attr};

/// What each request of one connection needs.
struct Conn {
    shared: Shared,
    caller: Identity,
    /// The local service's own identity (the `By` of XFCC).
    callee: String,
    local: Service,
    peer: SocketAddr,
}

/// Serves the requests of one mTLS connection until it closes or the drain deadline passes.
pub async fn serve(
    tls_stream: TlsStream<TcpStream>,
    caller: Identity,
    local: &Service,
    peer: SocketAddr,
    shared: &Shared,
) {
    let labels = ServiceLabels {
        direction: Direction::Inbound,
        service: local.key.to_string(),
    };
    shared.metrics.connections.get_or_create(&labels).inc();
    let _active = ActiveGuard::new(&shared.metrics, Direction::Inbound);
    let callee = {
        let td = shared.tls_rx.borrow().trust_domain.clone();
        Identity::workload(&td, &local.key).to_string()
    };
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        caller,
        callee,
        local: local.clone(),
        peer,
    });
    let service = service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&conn, req).await) }
    });
    let io = TokioIo::new(tls_stream);
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        // Upgrades (WebSocket) arrive as extended CONNECT (RFC 8441).
        .enable_connect_protocol()
        // A caller that vanished without a reset is noticed and its connection closed.
        .timer(TokioTimer::new())
        .keep_alive_interval(super::H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(super::H2_KEEPALIVE_TIMEOUT)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let mut force = shared.force_rx.clone();
    tokio::select! {
        r = &mut connection => if let Err(e) = r {
            debug!(src.addr = %peer, error = %e, "inbound http/2 connection ended with an error");
        },
        _ = mesh_runtime::drain::until_true(&mut force) => {
            debug!(src.addr = %peer, "inbound http/2 connection closed at the end of the drain grace period");
        }
    }
}

/// One request: authorize, forward, log.
async fn handle(conn: &Conn, mut req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    // The SERVER span of this hop, a child of the caller meshd's CLIENT span; the app's own
    // spans become its children.
    let mut span = (conn.shared.tracer).span_named(req.headers(), Kind::Server, || {
        format!("{} {}", req.method(), conn.local.key)
    });
    if span.is_recording() {
        span.attr(attr::HTTP_REQUEST_METHOD, req.method().as_str());
        span.attr(attr::URL_PATH, req.uri().path());
        span.attr(attr::MESH_SERVICE, conn.local.key.to_string());
        span.attr(attr::MESH_PEER_IDENTITY, conn.caller.to_string());
        span.attr(attr::NETWORK_PEER_ADDRESS, conn.peer.to_string());
    }
    span.inject(req.headers_mut());
    // An upgrade is authorized as what the app will see: the GET that asks to switch.
    let method = if upgrade_protocol(&req).is_some() {
        "GET".to_owned()
    } else {
        req.method().as_str().to_owned()
    };
    let path = req.uri().path().to_owned();
    let decision = {
        let headers = authz::HeaderView(req.headers());
        let attrs = Attrs {
            caller: Some(&conn.caller),
            source_ip: conn.peer.ip(),
            service: &conn.local,
            http: Some(Http {
                method: &method,
                path: &path,
                headers: &headers,
            }),
        };
        attrs.decide(&conn.shared.policy_rx.borrow())
    };
    let service = conn.local.key.to_string();
    conn.shared
        .metrics
        .record_decision(&service, &decision, false);
    if !decision.audit().is_empty() {
        info!(
            src.identity = %conn.caller,
            src.addr = %conn.peer,
            dst.service = %service,
            http.method = %method,
            http.path = %path,
            allowed = decision.is_allowed(),
            audit = ?decision.audit().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "request matched an audit policy"
        );
    }
    let resp = if !decision.is_allowed() {
        denied(conn, &decision, &method, &path)
    } else if let Err(limited) = rate_limit(conn, &req) {
        too_many(conn, &limited, &method, &path)
    } else {
        forward(conn, req).await
    };
    let (mesh_error, trace_id) = super::end_span(span, &resp);
    let rec = observe::Record {
        direction: Direction::Inbound,
        started,
        src_addr: conn.peer,
        src_service: super::super::inbound::workload_service(&conn.caller),
        src_identity: Some(conn.caller.clone()),
        mtls: true,
        dst_service: conn.local.key.clone(),
        dst_addr: Some(conn.local.address),
        kind: observe::Kind::Http {
            method,
            path,
            status: resp.status().as_u16(),
            grpc_status: super::grpc_status(resp.headers()),
            route: String::new(),
            subset: String::new(),
            attempts: 1,
        },
        decision: Some((
            if decision.is_allowed() {
                "allow"
            } else {
                "deny"
            },
            authz::policy_of(&decision),
        )),
        trace_id,
        error: mesh_error,
    };
    observe::finish(&conn.shared, rec);
    resp
}

/// Checks the service's RateLimits; the route is the name of the entry of the service's own
/// Route that the request matches (what `route` limits refer to).
fn rate_limit(conn: &Conn, req: &Request<Incoming>) -> Result<(), ratelimit::Limited> {
    let snapshot = conn.shared.policy_rx.borrow().clone();
    let limiter = conn.shared.http.limiter(&snapshot, &conn.local.key);
    if limiter.is_empty() {
        return Ok(());
    }
    let table = conn.shared.http.table(&snapshot);
    let route_name = table.route(&conn.local.key).and_then(|r| {
        let view = route::RequestView {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query().unwrap_or(""),
            headers: req.headers(),
        };
        r.select(&view)
            .and_then(|(_, e)| e.name.as_ref().map(ToString::to_string))
    });
    limiter.check(
        route_name.as_deref(),
        &conn.caller.to_string(),
        std::time::Instant::now(),
    )
}

/// 429 with `retry-after`, naming the limit.
fn too_many(conn: &Conn, limited: &ratelimit::Limited, method: &str, path: &str) -> Response<Body> {
    conn.shared
        .metrics
        .reject(Direction::Inbound, "rate_limited");
    conn.shared.metrics.limited(&conn.local.key.to_string());
    debug!(
        src.identity = %conn.caller,
        dst.service = %conn.local.key,
        http.method = %method,
        http.path = %path,
        policy = %limited.policy,
        "request rate limited"
    );
    let secs = ratelimit::retry_after_header(limited.retry_after);
    let mut resp = mesh_response(
        StatusCode::TOO_MANY_REQUESTS,
        "inbound",
        "rate_limited",
        format!("rate limited by {}; retry after {secs}s\n", limited.policy),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// 403 with a body naming what denied the request.
fn denied(conn: &Conn, decision: &Decision, method: &str, path: &str) -> Response<Body> {
    let (_, reason) = authz::labels(decision, false);
    let policy = authz::policy_of(decision);
    warn!(
        src.identity = %conn.caller,
        src.addr = %conn.peer,
        dst.service = %conn.local.key,
        http.method = %method,
        http.path = %path,
        policy = %policy,
        reason,
        "request denied by policy"
    );
    let by = if policy.is_empty() {
        format!("no policy allows it ({reason})")
    } else {
        policy
    };
    let body = format!(
        "RBAC: access denied: {} may not call {} {} on {}: {by}\n",
        conn.caller, method, path, conn.local.key
    );
    mesh_response(StatusCode::FORBIDDEN, "inbound", "denied", body)
}

/// The protocol of an upgrade sent as extended CONNECT by the caller's meshd.
fn upgrade_protocol(req: &Request<Incoming>) -> Option<&str> {
    (req.method() == http::Method::CONNECT)
        .then(|| req.extensions().get::<hyper::ext::Protocol>())
        .flatten()
        .map(hyper::ext::Protocol::as_str)
}

/// Sends the request to the app and passes its response back.
async fn forward(conn: &Conn, mut req: Request<Incoming>) -> Response<Body> {
    let Some((addr, client)) = conn.shared.http.app(&conn.local.key) else {
        // Removed (or made a TCP service) by a reload since this connection was accepted;
        // 503 so the caller can try another instance.
        return mesh_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "inbound",
            "not_served",
            format!(
                "{} is no longer an HTTP service on this node\n",
                conn.local.key
            ),
        );
    };
    let upgrade = match upgrade_protocol(&req).map(str::to_owned) {
        Some(_) if !matches!(*client, AppClient::Http1(_)) => {
            return mesh_response(
                StatusCode::NOT_IMPLEMENTED,
                "inbound",
                "upgrade_unsupported",
                format!(
                    "{} speaks HTTP/2; upgrades are passed to HTTP/1.1 apps only\n",
                    conn.local.key
                ),
            );
        }
        Some(protocol) => Some((protocol, hyper::upgrade::on(&mut req))),
        None if req.method() == http::Method::CONNECT => {
            return mesh_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "inbound",
                "connect_unsupported",
                "CONNECT tunnels are not proxied\n".into(),
            );
        }
        None => None,
    };
    let (mut parts, body) = req.into_parts();
    let authority = parts.uri.authority().cloned();
    let path_and_query =
        (parts.uri.path_and_query()).map_or_else(|| "/".to_owned(), ToString::to_string);
    let h1 = matches!(*client, AppClient::Http1(_));
    // HTTP/1.1: the client connects to the URI's authority, so that is the app's address and
    // the caller's authority travels as Host. HTTP/2: the caller's authority stays :authority
    // (the connection goes to the app's address regardless).
    let target = match (&authority, h1) {
        (Some(a), false) => a.to_string(),
        _ => addr.to_string(),
    };
    parts.uri = match Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(target)
        .path_and_query(path_and_query)
        .build()
    {
        Ok(u) => u,
        Err(e) => {
            return mesh_response(
                StatusCode::BAD_REQUEST,
                "inbound",
                "bad_request",
                format!("request target not usable: {e}\n"),
            );
        }
    };
    // The app sees HTTP/1.1 or HTTP/2 according to its protocol; the client sets the version.
    parts.version = http::Version::default();
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    if h1 {
        if !headers.contains_key(header::HOST)
            && let Some(a) = authority
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            headers.insert(header::HOST, v);
        }
    } else {
        headers.remove(header::HOST);
    }
    headers.remove(XFCC);
    if let Ok(v) = HeaderValue::from_str(&format!("By={};URI={}", conn.callee, conn.caller)) {
        headers.insert(XFCC, v);
    }
    let body = match &upgrade {
        Some((protocol, _)) => {
            parts.method = http::Method::GET;
            upgrade::mark(&mut parts.headers, protocol);
            super::empty()
        }
        None => body.boxed(),
    };
    match client.send(Request::from_parts(parts, body)).await {
        Ok(mut resp) => {
            let tunnel = match upgrade {
                Some((_, caller_side)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    Some((caller_side, hyper::upgrade::on(&mut resp)))
                }
                _ => None,
            };
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if let Some((caller_side, app_side)) = tunnel {
                // The extended CONNECT succeeded: 200 with no body, then the tunnel.
                parts.status = StatusCode::OK;
                parts.headers.remove(header::CONTENT_LENGTH);
                upgrade::tunnel(&conn.shared, caller_side, app_side, "inbound");
                return Response::from_parts(parts, super::empty());
            }
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            let reason = match e {
                AppError::Connect(_) => "app_unreachable",
                AppError::Exchange(_) => "app_error",
            };
            conn.shared.metrics.reject(Direction::Inbound, reason);
            warn!(dst.service = %conn.local.key, dst.addr = %addr, reason, error = %e, "forwarding to the app failed");
            mesh_response(
                StatusCode::BAD_GATEWAY,
                "inbound",
                reason,
                format!("{} at {addr}: {e}\n", conn.local.key),
            )
        }
    }
}
