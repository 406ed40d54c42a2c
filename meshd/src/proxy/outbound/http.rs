//! The outbound side of HTTP-family upstreams: serves the app's HTTP/1.1 or HTTP/2
//! (prior-knowledge) connection on the upstream's local port (or its `http_proxy` listener,
//! where each request's host names the service), applies the destination's Route, and sends
//! each request as a stream on a pooled mTLS HTTP/2 connection to an endpoint picked per
//! request (see [`send`]).

// `Err` is the mesh's HTTP answer itself, returned at most once per request: boxing it would
// add an allocation to every error path and save nothing.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use http::header;
use http::uri::{Scheme, Uri};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_api::policy::OutboundTraffic;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::super::http::{
    Body, bad_path, empty, end_span, grpc_status, mesh_response, normalize_path, strip_hop_by_hop,
    strip_mesh_owned, upgrade,
};
use super::super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::super::shared::Shared;
use super::super::{observe, route};
use super::send::{self, Caller, Log, Plan};
use super::{external, tunnel};
use crate::config::{Service, Upstream};
use crate::trace::{Kind, attr};
use mesh_api::ServiceKey;
use mesh_api::name::Label;

/// What each request of one app connection needs.
#[derive(Clone)]
struct Conn {
    shared: Shared,
    source: Arc<Service>,
    /// The destination: the upstream of the listener, or (on the `http_proxy` listener) the
    /// service named by the request's host, resolved per request.
    upstream: Arc<Upstream>,
    /// The destination is named by each request's host.
    by_host: bool,
    cursor: Arc<AtomicUsize>,
    peer: SocketAddr,
}

/// Serves the app's requests on one connection until it closes or the drain deadline passes.
pub async fn serve(
    app: TcpStream,
    peer: SocketAddr,
    source: Arc<Service>,
    upstream: Arc<Upstream>,
    shared: Shared,
    cursor: Arc<AtomicUsize>,
) {
    let conn = Conn {
        shared,
        source,
        upstream,
        by_host: false,
        cursor,
        peer,
    };
    serve_conn(app, conn).await;
}

/// Serves the app's requests on its `http_proxy` listener: each goes to the mesh service its
/// host names (see [`service_from_host`]).
pub async fn serve_by_host(
    app: TcpStream,
    peer: SocketAddr,
    source: Arc<Service>,
    bind: SocketAddr,
    shared: Shared,
    cursor: Arc<AtomicUsize>,
) {
    // Placeholder destination until a request names one; never used to send.
    let upstream = Arc::new(Upstream {
        service: source.key.clone(),
        bind,
    });
    let conn = Conn {
        shared,
        source,
        upstream,
        by_host: true,
        cursor,
        peer,
    };
    serve_conn(app, conn).await;
}

/// The mesh service a request's host names: `<name>.mesh` (in the caller's namespace),
/// `<name>.<namespace>.mesh` or `<name>.<namespace>.svc.mesh`; a port is ignored.
pub fn service_from_host(host: &str, caller_namespace: &Label) -> Option<ServiceKey> {
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let rest = host.strip_suffix(".mesh")?;
    let rest = rest.strip_suffix(".svc").unwrap_or(rest);
    match rest.split('.').collect::<Vec<_>>().as_slice() {
        [name] => Some(ServiceKey::new(
            caller_namespace.clone(),
            Label::new(name).ok()?,
        )),
        [name, ns] => Some(ServiceKey::new(
            Label::new(ns).ok()?,
            Label::new(name).ok()?,
        )),
        _ => None,
    }
}

async fn serve_conn(app: TcpStream, conn: Conn) {
    let _ = app.set_nodelay(true);
    let labels = ServiceLabels {
        direction: Direction::Outbound,
        service: conn.upstream.service.to_string(),
    };
    conn.shared.metrics.connections.get_or_create(&labels).inc();
    let _active = ActiveGuard::new(&conn.shared.metrics, Direction::Outbound);
    let mut force = conn.shared.force_rx.clone();
    let peer = conn.peer;
    let conn = Arc::new(conn);
    let service = service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&conn, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(app), service);
    tokio::pin!(connection);
    tokio::select! {
        r = &mut connection => if let Err(e) = r {
            debug!(src.addr = %peer, error = %e, "app http connection ended with an error");
        },
        _ = mesh_runtime::drain::until_true(&mut force) => {
            debug!(src.addr = %peer, "app http connection closed at the end of the drain grace period");
        }
    }
}

/// One request: route, send (with retries), pass the response back, log.
async fn handle(conn: &Conn, mut req: Request<Incoming>) -> Response<Body> {
    if conn.by_host && req.method() == http::Method::CONNECT {
        let (shared, source) = (&conn.shared, &conn.source.key);
        return tunnel::connect(shared, source, &conn.cursor, conn.peer, req).await;
    }
    if conn.by_host {
        return match by_host(conn, &req) {
            Ok(ByHost::Service(per_request)) => Box::pin(handle(&per_request, req)).await,
            Ok(ByHost::Passthrough(host)) => passthrough(conn, host, req).await,
            Err(resp) => resp,
        };
    }
    let started = Instant::now();
    // Routes match, and the callee authorizes, one spelling of the path.
    let opts = conn.shared.policy_rx.borrow().mesh_config().path_options();
    if let Err(e) = normalize_path(&mut req, opts) {
        conn.shared.metrics.reject(Direction::Outbound, e.reason());
        return bad_path("outbound", e);
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // The CLIENT span of this hop: continues the app's context, and the peer's meshd continues
    // ours (every attempt of a retried request carries the same context).
    let dst = &conn.upstream.service;
    let mut span =
        (conn.shared.tracer).span_named(req.headers(), Kind::Client, || format!("{method} {dst}"));
    if span.is_recording() {
        span.attr(attr::HTTP_REQUEST_METHOD, method.as_str());
        span.attr(attr::URL_PATH, path.as_str());
        span.attr(attr::MESH_SERVICE, dst.to_string());
        span.attr(attr::NETWORK_PEER_ADDRESS, conn.peer.to_string());
    }
    span.inject(req.headers_mut());
    let mut log = Log::default();
    let resp = match route_and_send(conn, req, &mut log).await {
        Ok(resp) | Err(resp) => resp,
    };
    if let Some(addr) = log.endpoint {
        span.attr(attr::SERVER_ADDRESS, addr.to_string());
    }
    let (mesh_error, trace_id) = end_span(span, &resp);
    let kind = observe::Kind::Http {
        method: method.as_str().to_owned(),
        path,
        status: resp.status().as_u16(),
        grpc_status: grpc_status(resp.headers()),
        route: log.route,
        subset: log.subset,
        attempts: log.attempts,
    };
    let rec = observe::Record {
        direction: Direction::Outbound,
        started,
        src_addr: conn.peer,
        src_service: Some(conn.source.key.clone()),
        src_identity: None,
        mtls: true,
        dst_service: conn.upstream.service.clone(),
        dst_addr: log.endpoint,
        dst_site: log.site,
        kind,
        decision: None,
        trace_id,
        error: mesh_error,
    };
    observe::finish(&conn.shared, rec);
    resp
}

/// Where a request on the `http_proxy` listener goes.
enum ByHost {
    /// A mesh service or an ExternalService: the connection state for it.
    Service(Box<Conn>),
    /// A host the mesh does not know, under `allow_any`: sent there as it is.
    Passthrough(String),
}

/// Where a request on the `http_proxy` listener goes: the mesh service its host names, the
/// ExternalService that has the host, or (under `allow_any`) the host itself; `Err` is the
/// answer when it may go nowhere.
fn by_host(conn: &Conn, req: &Request<Incoming>) -> Result<ByHost, Response<Body>> {
    let host = (req.uri().authority().map(|a| a.as_str().to_owned()))
        .or_else(|| {
            (req.headers().get(header::HOST))
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let ns = &conn.source.key.namespace;
    let Some(dst) = service_from_host(&host, ns) else {
        return outside_mesh(conn, host);
    };
    if is_http_service(&conn.shared, &dst) == Some(false) {
        return Err(mesh_response(
            StatusCode::BAD_GATEWAY,
            "outbound",
            "not_http",
            format!("{dst} is a tcp service; declare it as an upstream instead\n"),
        ));
    }
    Ok(ByHost::Service(Box::new(for_service(conn, dst))))
}

/// The connection state of `conn` for requests to `dst`.
fn for_service(conn: &Conn, dst: ServiceKey) -> Conn {
    Conn {
        upstream: Arc::new(Upstream {
            service: dst,
            bind: conn.upstream.bind,
        }),
        by_host: false,
        ..conn.clone()
    }
}

/// Where a request for `host`, which names no mesh service, goes: the ExternalService that has
/// it, else the host itself under `allow_any`; refused under `registry_only`.
fn outside_mesh(conn: &Conn, host: String) -> Result<ByHost, Response<Body>> {
    let unknown = |why: String| {
        conn.shared
            .metrics
            .reject(Direction::Outbound, "unknown_host");
        mesh_response(StatusCode::BAD_REQUEST, "outbound", "unknown_host", why)
    };
    let Some(name) = mesh_api::policy::normalize_host(&host) else {
        return Err(unknown(format!("{host:?} is not a host name\n")));
    };
    if name == "mesh" || name.ends_with(".mesh") {
        return Err(unknown(format!(
            "{host:?} names no mesh service; use <name>.mesh or <name>.<namespace>.mesh\n"
        )));
    }
    let compiled = conn.shared.compiled();
    let ns = conn.source.key.namespace.as_str();
    if let Some(key) = compiled.external_for_host(&name, ns) {
        return Ok(ByHost::Service(Box::new(for_service(conn, key.clone()))));
    }
    match compiled.policy.mesh_config().outbound_traffic {
        OutboundTraffic::AllowAny => Ok(ByHost::Passthrough(host)),
        OutboundTraffic::RegistryOnly => {
            conn.shared
                .metrics
                .reject(Direction::Outbound, "registry_only");
            warn!(src.service = %conn.source.key, host = %name, "request to a host outside the registry refused (outbound_traffic = registry_only)");
            Err(mesh_response(
                StatusCode::FORBIDDEN,
                "outbound",
                "registry_only",
                format!(
                    "{name} is neither a mesh service nor an ExternalService, and MeshConfig \
                     outbound_traffic = \"registry_only\" refuses other hosts; apply an \
                     ExternalService with hosts = [\"{name}\"] to allow it\n"
                ),
            ))
        }
    }
}

/// A request for a host outside the mesh under `allow_any`: sent there as it is, recorded
/// under [`external::PASSTHROUGH`].
async fn passthrough(conn: &Conn, host: String, mut req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // (CONNECT never comes here: see `tunnel`.)
    strip_mesh_owned(req.headers_mut());
    let (parts, body) = req.into_parts();
    let resp = external::passthrough(
        &conn.shared,
        &host,
        Request::from_parts(parts, body.boxed()),
    )
    .await;
    let rec = observe::Record {
        direction: Direction::Outbound,
        started,
        src_addr: conn.peer,
        src_service: Some(conn.source.key.clone()),
        src_identity: None,
        mtls: false,
        dst_service: external::passthrough_key(),
        dst_addr: None,
        dst_site: None,
        kind: observe::Kind::Http {
            method: method.as_str().to_owned(),
            path,
            status: resp.status().as_u16(),
            grpc_status: None,
            route: String::new(),
            subset: String::new(),
            attempts: 1,
        },
        decision: None,
        trace_id: None,
        error: (resp.headers().get(super::super::http::ERROR_HEADER))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    };
    observe::finish(&conn.shared, rec);
    resp
}

/// Routes and sends `req`; `Err` is the mesh's own error response.
async fn route_and_send(
    conn: &Conn,
    mut req: Request<Incoming>,
    log: &mut Log,
) -> Result<Response<Body>, Response<Body>> {
    if req.method() == http::Method::CONNECT {
        return Err(mesh_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "outbound",
            "connect_unsupported",
            "CONNECT tunnels are not proxied; send plain HTTP to the mesh service\n".into(),
        ));
    }
    // An HTTP/1.1 upgrade (WebSocket): the app's side of the tunnel, and the protocol.
    let upgrade = (req.version() == http::Version::HTTP_11)
        .then(|| upgrade::requested(req.headers()))
        .flatten()
        .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    let (mut parts, body) = req.into_parts();
    to_mesh_request(&mut parts, &conn.upstream.service)?;
    // Routes match the request as the app sent it (a GET, for an upgrade).
    let mut plan = plan(conn, &mut parts, log).await?;
    if upgrade.is_some() && plan.dst.direct.is_some() {
        return Err(mesh_response(
            StatusCode::NOT_IMPLEMENTED,
            "outbound",
            "upgrade_unsupported",
            format!(
                "{}: upgrades to external services are not proxied; declare it with protocol = \"tcp\"\n",
                conn.upstream.service
            ),
        ));
    }
    let body = match &upgrade {
        // Extended CONNECT (RFC 8441): the peer's meshd turns it back into the app's upgrade.
        Some((protocol, _)) => {
            parts.method = http::Method::CONNECT;
            (parts.extensions).insert(hyper::ext::Protocol::from(protocol.as_str()));
            // The request carries the tunnel (in its extensions), which a copy would lose.
            plan.retries = None;
            empty()
        }
        None => body.boxed(),
    };
    let _slot = send::admit(&conn.shared, &plan, "outbound")?;
    let caller = Caller {
        shared: &conn.shared,
        source: &conn.source.key,
        cursor: &conn.cursor,
    };
    let mut resp = send::send(&caller, &plan, parts, body, log).await?;
    if let Some((protocol, app_side)) = upgrade
        && resp.status().is_success()
    {
        // The peer accepted the extended CONNECT: the app sees its 101 and the tunnel opens.
        let peer_side = hyper::upgrade::on(&mut resp);
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        upgrade::mark(resp.headers_mut(), &protocol);
        upgrade::tunnel(&conn.shared, app_side, peer_side, "outbound");
    }
    if let Some(ops) = &plan.response_headers {
        route::apply_header_ops(ops, resp.headers_mut());
    }
    Ok(resp)
}

/// Rewrites the app's request into what the peer's meshd receives: an absolute HTTP/2 URI
/// (the Host the app used, else the destination's mesh name), without hop-by-hop headers or
/// anything only the mesh may say.
pub(crate) fn to_mesh_request(
    parts: &mut http::request::Parts,
    dst: &ServiceKey,
) -> Result<(), Response<Body>> {
    let authority = (parts.headers.get(header::HOST))
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| parts.uri.authority().map(ToString::to_string))
        .unwrap_or_else(|| dst.sni());
    let path_and_query =
        (parts.uri.path_and_query()).map_or_else(|| "/".to_owned(), ToString::to_string);
    parts.uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority.as_str())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| {
            mesh_response(
                StatusCode::BAD_REQUEST,
                "outbound",
                "bad_request",
                format!("request target not usable: {e}\n"),
            )
        })?;
    parts.version = http::Version::HTTP_2;
    strip_hop_by_hop(&mut parts.headers);
    // Only the callee's meshd says who called, and only the mesh writes `x-mesh-*`: an app
    // can neither claim an identity nor pass its errors off as the mesh's.
    strip_mesh_owned(&mut parts.headers);
    // :authority replaces Host on HTTP/2.
    parts.headers.remove(header::HOST);
    Ok(())
}

/// Applies the destination's Route to the request: picks the entry and the weighted subset,
/// injects faults, edits request headers.
async fn plan(
    conn: &Conn,
    parts: &mut http::request::Parts,
    log: &mut Log,
) -> Result<Plan, Response<Body>> {
    let dst = conn.shared.compiled().destination(&conn.upstream.service);
    let mut plan = Plan {
        subset: None,
        dst,
        retries: None,
        timeout: None,
        response_headers: None,
    };
    let Some(route) = plan.dst.route.clone() else {
        return Ok(plan);
    };
    let view = route::RequestView {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
    };
    let Some((i, entry)) = route.select(&view) else {
        conn.shared.metrics.reject(Direction::Outbound, "no_route");
        let (key, method, path) = (&route.key, &parts.method, parts.uri.path());
        return Err(mesh_response(
            StatusCode::NOT_FOUND,
            "outbound",
            "no_route",
            format!("no entry of {key} matches {method} {path}\n"),
        ));
    };
    log.route =
        (entry.name.as_ref()).map_or_else(|| format!("{}[{i}]", route.key), |n| n.to_string());
    plan.subset = subset(conn, &plan, &route, entry, log)?;
    fault(&route.key, entry).await?;
    route::apply_header_ops(&entry.request_headers, &mut parts.headers);
    plan.retries = entry.retries.clone();
    plan.timeout = entry.timeout;
    plan.response_headers =
        (entry.response_headers != Default::default()).then(|| entry.response_headers.clone());
    Ok(plan)
}

/// The labels of the subset the Route entry sends this request to (a weighted draw), if any.
fn subset(
    conn: &Conn,
    plan: &Plan,
    route: &route::CompiledRoute,
    entry: &mesh_api::policy::HttpRoute,
    log: &mut Log,
) -> Result<Option<std::collections::BTreeMap<String, String>>, Response<Body>> {
    let Some(d) = route::pick_destination(&entry.route, rand::random_range(0..100)) else {
        return Ok(None);
    };
    let Some(subset) = &d.subset else {
        return Ok(None);
    };
    log.subset = subset.to_string();
    match route::subset_labels(plan.dst.policy.as_deref(), subset.as_str()) {
        Some(labels) => Ok(Some(labels.clone())),
        None => {
            conn.shared.metrics.reject(Direction::Outbound, "no_subset");
            let (key, dst) = (&route.key, &plan.dst.service);
            Err(mesh_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "outbound",
                "no_subset",
                format!(
                    "{key} sends to subset {subset} of {dst}, which no DestinationPolicy defines\n"
                ),
            ))
        }
    }
}

/// Injects the Route entry's faults: a delay, then maybe an abort (the answer).
pub(crate) async fn fault(
    route: &mesh_api::policy::ResourceKey,
    entry: &mesh_api::policy::HttpRoute,
) -> Result<(), Response<Body>> {
    let fault = route::fault_action(
        entry.fault.as_ref(),
        rand::random_range(0.0..100.0),
        rand::random_range(0.0..100.0),
    );
    if let Some(delay) = fault.delay {
        tokio::time::sleep(delay).await;
    }
    let Some(status) = fault.abort else {
        return Ok(());
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    Err(mesh_response(
        status,
        "outbound",
        "fault_abort",
        format!("fault injected by {route}\n"),
    ))
}

/// Whether `service` is proxied per request: its instances say they speak an HTTP-family
/// protocol. `None` when no instance is known.
pub fn is_http_service(shared: &Shared, service: &ServiceKey) -> Option<bool> {
    let compiled = shared.compiled();
    if let Some(ext) = compiled.external(service) {
        return Some(ext.protocol == mesh_api::policy::ExternalProtocol::Http);
    }
    (compiled.view.endpoints.get(service))
        .filter(|eps| !eps.is_empty())
        .map(|eps| eps.iter().any(|e| e.protocol.is_http()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hosts_name_mesh_services() {
        let shop = Label::new("shop").unwrap();
        #[rustfmt::skip]
        let cases: &[(&str, Option<&str>)] = &[
            ("api.mesh", Some("shop/api")),
            ("api.mesh:80", Some("shop/api")),
            ("API.Mesh.", Some("shop/api")),
            ("api.default.mesh", Some("default/api")),
            ("api.default.svc.mesh", Some("default/api")),
            ("api.default.svc.mesh:8080", Some("default/api")),
            ("api.svc.mesh", Some("shop/api")),
            ("api", None),
            ("api.example.com", None),
            ("a.b.c.mesh", None),
            ("Bad_Name.mesh", None),
            (".mesh", None),
            ("", None),
        ];
        for (host, want) in cases {
            let got = service_from_host(host, &shop).map(|k| k.to_string());
            assert_eq!(got.as_deref(), *want, "{host:?}");
        }
    }
}
