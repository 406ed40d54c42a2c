//! A gateway's HTTP listeners: each request from outside is matched to a Route attached to the
//! gateway (by host, then by the Route's entries), given the edge headers, and sent to the
//! chosen mesh service as the gateway's identity, through the same endpoint path, retries and
//! circuit breaker as an app's request; `http` listeners that redirect answer 308 instead.

// `Err` is the gateway's HTTP answer itself, returned at most once per request.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_api::ServiceKey;
use mesh_api::policy::{HttpRoute, normalize_host};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::super::compiled::Destination;
use super::super::http::{
    Body, bad_path, empty, end_span, grpc_status, mesh_response, normalize_path, server_builder,
};
use super::super::metrics::Direction;
use super::super::outbound::http::{fault, to_mesh_request};
use super::super::outbound::send::{self, Caller, Log, Plan};
use super::super::route::GatewayRoute;
use super::super::shared::Shared;
use super::super::{observe, route};
use super::listener::GatewayListener;
use super::terminate::Terminator;
use super::{decide, edge};
use crate::trace::{Kind, attr};

/// The `hop` of the gateway's own answers (`x-mesh-error: gateway ...`).
const HOP: &str = "gateway";

/// What each request of one client connection needs.
struct Conn {
    shared: Shared,
    gl: Arc<GatewayListener>,
    cursor: Arc<AtomicUsize>,
    client: SocketAddr,
    /// `http` or `https`, as the client spoke.
    proto: &'static str,
}

/// Serves one plaintext client connection until it closes or the drain deadline passes.
pub async fn serve(
    tcp: TcpStream,
    client: SocketAddr,
    gl: Arc<GatewayListener>,
    shared: Shared,
    cursor: Arc<AtomicUsize>,
) {
    let _ = tcp.set_nodelay(true);
    serve_io(TokioIo::new(tcp), client, gl, shared, cursor, "http").await;
}

/// Terminates TLS on one client connection, then serves it; a handshake that fails or does not
/// finish within the inbound handshake timeout is counted and dropped.
pub async fn serve_tls(
    tcp: TcpStream,
    client: SocketAddr,
    gl: Arc<GatewayListener>,
    shared: Shared,
    cursor: Arc<AtomicUsize>,
    term: Arc<Terminator>,
) {
    let _ = tcp.set_nodelay(true);
    let limit = shared.config_rx.borrow().inbound.handshake_timeout;
    match tokio::time::timeout(limit, term.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            drop(term);
            serve_io(TokioIo::new(tls), client, gl, shared, cursor, "https").await;
        }
        Ok(Err(e)) => {
            shared
                .metrics
                .reject(Direction::Inbound, "gateway_tls_handshake");
            debug!(src.addr = %client, error = %e, "gateway tls handshake failed");
        }
        Err(_) => {
            shared
                .metrics
                .reject(Direction::Inbound, "handshake_timeout");
            debug!(src.addr = %client, "gateway tls handshake timed out");
        }
    }
}

/// Serves one client connection (plaintext or TLS already terminated).
pub async fn serve_io<I>(
    io: I,
    client: SocketAddr,
    gl: Arc<GatewayListener>,
    shared: Shared,
    cursor: Arc<AtomicUsize>,
    proto: &'static str,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut force = shared.force_rx.clone();
    let conn = Arc::new(Conn {
        shared,
        gl,
        cursor,
        client,
        proto,
    });
    let service = service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&conn, req).await) }
    });
    // Clients from outside: one that trickles its request head or goes idle is cut off.
    let builder = server_builder();
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        r = &mut connection => if let Err(e) = r {
            debug!(src.addr = %client, error = %e, "gateway client connection ended with an error");
        },
        _ = mesh_runtime::drain::until_true(&mut force) => {
            debug!(src.addr = %client, "gateway client connection closed at the end of the drain grace period");
        }
    }
}

/// One request: redirect, or route, send and log.
async fn handle(conn: &Conn, mut req: Request<Incoming>) -> Response<Body> {
    if let Some(port) = conn.gl.listener.redirect_to_https_port {
        return redirect(&req, port);
    }
    let started = Instant::now();
    let opts = conn.shared.policy_rx.borrow().mesh_config().path_options();
    if let Err(e) = normalize_path(&mut req, opts) {
        conn.shared.metrics.reject(Direction::Outbound, e.reason());
        return bad_path(HOP, e);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut span = (conn.shared.tracer).span_named(req.headers(), Kind::Client, || {
        format!("{method} {}", conn.gl.gateway)
    });
    if span.is_recording() {
        span.attr(attr::HTTP_REQUEST_METHOD, method.as_str());
        span.attr(attr::URL_PATH, path.as_str());
        span.attr(attr::NETWORK_PEER_ADDRESS, conn.client.to_string());
    }
    span.inject(req.headers_mut());
    let mut log = Log::default();
    let mut dst = None;
    let resp = match route_and_send(conn, req, &mut log, &mut dst).await {
        Ok(resp) | Err(resp) => resp,
    };
    let (mesh_error, trace_id) = end_span(span, &resp);
    let rec = observe::Record {
        direction: Direction::Outbound,
        started,
        src_addr: conn.client,
        src_service: Some(conn.gl.gateway.clone()),
        src_identity: None,
        // The client is outside the mesh: TLS at most, never the mesh's mTLS.
        mtls: false,
        // Requests no Route took are counted against the gateway itself.
        dst_service: dst.unwrap_or_else(|| conn.gl.gateway.clone()),
        dst_addr: log.endpoint,
        dst_site: log.site,
        kind: observe::Kind::Http {
            method: method.as_str().to_owned(),
            path,
            status: resp.status().as_u16(),
            grpc_status: grpc_status(resp.headers()),
            route: log.route,
            subset: log.subset,
            attempts: log.attempts,
        },
        decision: None,
        trace_id,
        error: mesh_error,
    };
    observe::finish(&conn.shared, rec);
    resp
}

/// Picks the Route, entry and destination for `req`, then sends it as the gateway.
async fn route_and_send(
    conn: &Conn,
    req: Request<Incoming>,
    log: &mut Log,
    dst_out: &mut Option<ServiceKey>,
) -> Result<Response<Body>, Response<Body>> {
    if req.method() == http::Method::CONNECT {
        let why = "CONNECT is not served by the gateway\n".to_owned();
        return Err(refuse(
            conn,
            StatusCode::METHOD_NOT_ALLOWED,
            "connect_unsupported",
            why,
        ));
    }
    let (mut parts, body) = req.into_parts();
    let compiled = conn.shared.compiled();
    let routes = compiled.routes.gateway_routes(&conn.gl.gateway);
    let (route, i, entry) = choose(conn, routes, &parts)?;
    log.route =
        (entry.name.as_ref()).map_or_else(|| format!("{}[{i}]", route.key), |n| n.to_string());
    let (service, subset) = destination(conn, route, entry, log)?;
    *dst_out = Some(service.clone());
    let dst = compiled.destination(&service);
    let subset = match subset {
        None => None,
        Some(name) => Some(subset_labels(conn, &dst, route, name)?),
    };
    fault(&route.key, entry).await?;
    edge::add(
        &mut parts.headers,
        conn.client,
        conn.proto,
        &edge::new_request_id(),
    );
    route::apply_header_ops(&entry.request_headers, &mut parts.headers);
    to_mesh_request(&mut parts, &service)?;
    let plan = Plan {
        subset,
        dst,
        retries: entry.retries.clone(),
        timeout: entry.timeout,
        response_headers: (entry.response_headers != Default::default())
            .then(|| entry.response_headers.clone()),
    };
    send_planned(conn, &plan, parts, body.boxed(), log).await
}

/// The attached Route that serves the request's host, and its entry that matches the request.
fn choose<'r>(
    conn: &Conn,
    routes: &'r [Arc<GatewayRoute>],
    parts: &http::request::Parts,
) -> Result<(&'r route::CompiledRoute, usize, &'r HttpRoute), Response<Body>> {
    let host = request_host(parts).unwrap_or_default();
    let Some(groute) = decide::select(routes, &conn.gl.listener, &host) else {
        let (listener, gateway) = (&conn.gl.listener.name, &conn.gl.gateway);
        let why =
            format!("no Route attached to listener {listener} of {gateway} serves host {host:?}\n");
        return Err(refuse(conn, StatusCode::NOT_FOUND, "no_route", why));
    };
    let view = route::RequestView {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
    };
    match groute.route.select(&view) {
        Some((i, entry)) => Ok((&groute.route, i, entry)),
        None => {
            let (key, method, path) = (&groute.route.key, &parts.method, parts.uri.path());
            let why = format!("no entry of {key} matches {method} {path}\n");
            Err(refuse(conn, StatusCode::NOT_FOUND, "no_route", why))
        }
    }
}

/// The labels of subset `name` of the destination, as its DestinationPolicy defines them.
fn subset_labels(
    conn: &Conn,
    dst: &Destination,
    route: &route::CompiledRoute,
    name: &mesh_api::name::Label,
) -> Result<std::collections::BTreeMap<String, String>, Response<Body>> {
    match route::subset_labels(dst.policy.as_deref(), name.as_str()) {
        Some(labels) => Ok(labels.clone()),
        None => {
            let (key, service) = (&route.key, &dst.service);
            let why = format!(
                "{key} sends to subset {name} of {service}, which no DestinationPolicy defines\n"
            );
            Err(refuse(
                conn,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_subset",
                why,
            ))
        }
    }
}

/// The weighted destination of `entry` for this request: its service (in the gateway's
/// namespace) and subset.
fn destination<'e>(
    conn: &Conn,
    route: &route::CompiledRoute,
    entry: &'e HttpRoute,
    log: &mut Log,
) -> Result<(ServiceKey, Option<&'e mesh_api::name::Label>), Response<Body>> {
    let picked = route::pick_destination(&entry.route, rand::random_range(0..100))
        .and_then(|d| Some((d.service.clone()?, d.subset.as_ref())));
    let Some((name, subset)) = picked else {
        // Validation requires a service in every destination of a gateway route and weights
        // summing to 100; a newer registry's resource this build reads differently ends here.
        let key = &route.key;
        return Err(refuse(
            conn,
            StatusCode::SERVICE_UNAVAILABLE,
            "no_destination",
            format!("{key} names no service for this request\n"),
        ));
    };
    if let Some(s) = subset {
        log.subset = s.to_string();
    }
    Ok((
        ServiceKey::new(conn.gl.gateway.namespace.clone(), name),
        subset,
    ))
}

/// Admits the request past the destination's circuit breaker and sends it.
async fn send_planned(
    conn: &Conn,
    plan: &Plan,
    parts: http::request::Parts,
    body: Body,
    log: &mut Log,
) -> Result<Response<Body>, Response<Body>> {
    let _slot = send::admit(&conn.shared, plan, HOP)?;
    let caller = Caller {
        shared: &conn.shared,
        source: &conn.gl.gateway,
        cursor: &conn.cursor,
    };
    let mut resp = send::send(&caller, plan, parts, body, log).await?;
    if let Some(ops) = &plan.response_headers {
        route::apply_header_ops(ops, resp.headers_mut());
    }
    Ok(resp)
}

/// Counts a request the gateway answers itself and builds the answer.
fn refuse(conn: &Conn, status: StatusCode, reason: &'static str, body: String) -> Response<Body> {
    conn.shared.metrics.reject(Direction::Outbound, reason);
    mesh_response(status, HOP, reason, body)
}

/// The request's host (`:authority`, else `Host`), normalized.
fn request_host(parts: &http::request::Parts) -> Option<String> {
    let raw = match parts.uri.authority() {
        Some(a) => a.as_str().to_owned(),
        None => (parts.headers.get(header::HOST))?.to_str().ok()?.to_owned(),
    };
    normalize_host(&raw)
}

/// 308 to the same host and target on `https` at `port` (308 keeps the method and body).
fn redirect(req: &Request<Incoming>, port: u16) -> Response<Body> {
    let parts_host = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            Some(h.rsplit_once(':').map_or(h, |(h, _)| h).to_owned())
        });
    let Some(host) = parts_host.and_then(|h| normalize_host(&h)) else {
        return mesh_response(
            StatusCode::BAD_REQUEST,
            HOP,
            "no_host",
            "the request names no host to redirect to\n".into(),
        );
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let authority = if port == 443 {
        host
    } else {
        format!("{host}:{port}")
    };
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = http::HeaderValue::try_from(format!("https://{authority}{target}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}
