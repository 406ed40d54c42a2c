//! The outbound side of HTTP-family upstreams: serves the app's HTTP/1.1 or HTTP/2
//! (prior-knowledge) connection on the upstream's local port and sends each request as a
//! stream on a pooled mTLS HTTP/2 connection to an endpoint picked per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::header;
use http::uri::{Scheme, Uri};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, debug_span, warn};

use super::super::compiled::Destination;
use super::super::connect::{self, Error, attempt};
use super::super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::super::{Shared, balance, endpoints, observe, retry, route};
use super::replay::ReplayBody;
use super::{Body, mesh_response, strip_hop_by_hop, upgrade};
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
    serve_conn(app, peer, source, upstream, false, shared, cursor).await;
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
    serve_conn(app, peer, source, upstream, true, shared, cursor).await;
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

#[allow(clippy::too_many_arguments)]
async fn serve_conn(
    app: TcpStream,
    peer: SocketAddr,
    source: Arc<Service>,
    upstream: Arc<Upstream>,
    by_host: bool,
    shared: Shared,
    cursor: Arc<AtomicUsize>,
) {
    let _ = app.set_nodelay(true);
    let labels = ServiceLabels {
        direction: Direction::Outbound,
        service: upstream.service.to_string(),
    };
    shared.metrics.connections.get_or_create(&labels).inc();
    let _active = ActiveGuard::new(&shared.metrics, Direction::Outbound);
    let mut force = shared.force_rx.clone();
    let conn = Arc::new(Conn {
        shared,
        source,
        upstream,
        by_host,
        cursor,
        peer,
    });
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
    if conn.by_host {
        let host = (req.uri().authority().map(|a| a.as_str().to_owned()))
            .or_else(|| {
                (req.headers().get(header::HOST))
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let Some(dst) = service_from_host(&host, &conn.source.key.namespace) else {
            return mesh_response(
                StatusCode::BAD_REQUEST,
                "outbound",
                "unknown_host",
                format!(
                    "{host:?} names no mesh service; use <name>.mesh or <name>.<namespace>.mesh\n"
                ),
            );
        };
        let is_tcp = {
            let compiled = conn.shared.compiled();
            (compiled.view.endpoints.get(&dst))
                .is_some_and(|eps| !eps.iter().any(|e| e.protocol.is_http()))
        };
        if is_tcp {
            return mesh_response(
                StatusCode::BAD_GATEWAY,
                "outbound",
                "not_http",
                format!("{dst} is a tcp service; declare it as an upstream instead\n"),
            );
        }
        let per_request = Conn {
            upstream: Arc::new(Upstream {
                service: dst,
                bind: conn.upstream.bind,
            }),
            by_host: false,
            ..conn.clone()
        };
        return Box::pin(handle(&per_request, req)).await;
    }
    let started = Instant::now();
    // Routes match, and the callee authorizes, one spelling of the path.
    let opts = conn.shared.policy_rx.borrow().mesh_config().path_options();
    if let Err(e) = super::normalize_path(&mut req, opts) {
        conn.shared.metrics.reject(Direction::Outbound, e.reason());
        return super::bad_path("outbound", e);
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
    let resp = match send(conn, req, &mut log).await {
        Ok(resp) | Err(resp) => resp,
    };
    if let Some(addr) = log.endpoint {
        span.attr(attr::SERVER_ADDRESS, addr.to_string());
    }
    let (mesh_error, trace_id) = super::end_span(span, &resp);
    let rec = observe::Record {
        direction: Direction::Outbound,
        started,
        src_addr: conn.peer,
        src_service: Some(conn.source.key.clone()),
        src_identity: None,
        mtls: true,
        dst_service: conn.upstream.service.clone(),
        dst_addr: log.endpoint,
        kind: observe::Kind::Http {
            method: method.as_str().to_owned(),
            path,
            status: resp.status().as_u16(),
            grpc_status: super::grpc_status(resp.headers()),
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

/// What the access log says about how a request was routed.
#[derive(Default)]
struct Log {
    endpoint: Option<SocketAddr>,
    route: String,
    subset: String,
    attempts: u32,
}

/// Where and how one request is sent, decided from the Route and DestinationPolicy.
struct Plan {
    /// Endpoints must carry these labels (the chosen subset's).
    subset: Option<std::collections::BTreeMap<String, String>>,
    /// The destination as compiled: policy, route, endpoints, breaker, budget.
    dst: Arc<Destination>,
    retries: Option<mesh_api::policy::Retries>,
    timeout: Option<std::time::Duration>,
    response_headers: Option<mesh_api::policy::HeaderOps>,
}

/// Routes and sends `req`; `Err` is the mesh's own error response.
async fn send(
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
    let dst = &conn.upstream.service;
    // Absolute URI for HTTP/2: the Host the app used, else the upstream's mesh name.
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
    super::strip_mesh_owned(&mut parts.headers);
    // :authority replaces Host on HTTP/2.
    parts.headers.remove(header::HOST);

    // Routes match the request as the app sent it (a GET, for an upgrade).
    let mut plan = plan(conn, &mut parts, log).await?;
    let body = match &upgrade {
        // Extended CONNECT (RFC 8441): the peer's meshd turns it back into the app's upgrade.
        Some((protocol, _)) => {
            parts.method = http::Method::CONNECT;
            (parts.extensions).insert(hyper::ext::Protocol::from(protocol.as_str()));
            // The request carries the tunnel (in its extensions), which a copy would lose.
            plan.retries = None;
            super::empty()
        }
        None => body.boxed(),
    };
    // Circuit breaker: requests in flight to the destination, from this host.
    let max = (plan.dst.policy.as_ref())
        .and_then(|p| p.circuit_breaker.as_ref())
        .and_then(|c| c.max_pending_requests);
    let Some(_slot) = plan.dst.breaker.admit(max) else {
        conn.shared.metrics.reject(Direction::Outbound, "overflow");
        return Err(mesh_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbound",
            "overflow",
            format!(
                "{dst}: circuit breaker open (max_pending_requests {})\n",
                max.unwrap_or_default()
            ),
        ));
    };
    let budget_percent = plan.retries.as_ref().map(|r| r.budget_percent);
    // The budget is a share of the requests that may be retried; others need no accounting
    // (and no lock) on the hot path.
    if plan.retries.as_ref().is_some_and(|r| r.attempts > 0) {
        plan.dst.budget.request(tokio::time::Instant::now());
    }
    let attempts = async {
        match plan.retries.as_ref().filter(|r| r.attempts > 0) {
            None => {
                log.attempts = 1;
                let req = Request::from_parts(parts, body);
                let (r, addr) = attempt_once(conn, &plan, req).await;
                log.endpoint = addr;
                r.map_err(|(_, resp)| resp)
            }
            Some(retries) => {
                let original = ReplayBody::new(body);
                let mut n = 0;
                loop {
                    n += 1;
                    log.attempts = n;
                    let Some(body) = original.try_clone() else {
                        // Not reached: the first clone always exists, and a retry is only
                        // planned while the body can still be replayed.
                        return Err(mesh_response(
                            StatusCode::BAD_GATEWAY,
                            "outbound",
                            "retry_body_overflow",
                            "the request body is too large to retry\n".into(),
                        ));
                    };
                    let req = clone_request(&parts, body.boxed());
                    let try_once = attempt_once(conn, &plan, req);
                    let (result, addr) = match retries.per_try_timeout {
                        Some(t) => match tokio::time::timeout(t, try_once).await {
                            Ok(r) => r,
                            Err(_) => (
                                Err((
                                    retry::Attempt::Reset,
                                    mesh_response(
                                        StatusCode::GATEWAY_TIMEOUT,
                                        "outbound",
                                        "per_try_timeout",
                                        format!("{dst}: no response within {t:?}\n"),
                                    ),
                                )),
                                None,
                            ),
                        },
                        None => try_once.await,
                    };
                    log.endpoint = addr;
                    let outcome = match &result {
                        Ok(resp) => retry::response_attempt(resp.status().as_u16(), resp.headers()),
                        Err((a, _)) => *a,
                    };
                    let again = n <= retries.attempts
                        && retry::is_retriable(retries, outcome)
                        && original.try_clone().is_some()
                        && (plan.dst.budget).retry(
                            budget_percent.unwrap_or_default(),
                            tokio::time::Instant::now(),
                        );
                    if !again {
                        return result.map_err(|(_, resp)| resp);
                    }
                    debug!(dst.service = %dst, attempt = n, ?outcome, "retrying");
                    tokio::time::sleep(retry::backoff(n, rand::random::<f64>())).await;
                }
            }
        }
    };
    let result = match plan.timeout {
        None => attempts.await,
        Some(t) => match tokio::time::timeout(t, attempts).await {
            Ok(r) => r,
            Err(_) => Err(mesh_response(
                StatusCode::GATEWAY_TIMEOUT,
                "outbound",
                "timeout",
                format!("{dst}: no response within the route timeout of {t:?}\n"),
            )),
        },
    };
    let mut resp = result?;
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

/// The head of a request or of its parts.
trait Head {
    fn method(&self) -> &http::Method;
    fn uri(&self) -> &Uri;
    fn version(&self) -> http::Version;
    fn headers(&self) -> &http::HeaderMap;
}

impl Head for http::request::Parts {
    fn method(&self) -> &http::Method {
        &self.method
    }
    fn uri(&self) -> &Uri {
        &self.uri
    }
    fn version(&self) -> http::Version {
        self.version
    }
    fn headers(&self) -> &http::HeaderMap {
        &self.headers
    }
}

impl<B> Head for Request<B> {
    fn method(&self) -> &http::Method {
        self.method()
    }
    fn uri(&self) -> &Uri {
        self.uri()
    }
    fn version(&self) -> http::Version {
        self.version()
    }
    fn headers(&self) -> &http::HeaderMap {
        self.headers()
    }
}

/// The same request again, with `body` (extensions are not carried over).
fn clone_request(head: &impl Head, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method().clone();
    *req.uri_mut() = head.uri().clone();
    *req.version_mut() = head.version();
    *req.headers_mut() = head.headers().clone();
    req
}

/// Applies the upstream's Route to the request: picks the entry and the weighted subset,
/// injects faults, edits request headers.
async fn plan(
    conn: &Conn,
    parts: &mut http::request::Parts,
    log: &mut Log,
) -> Result<Plan, Response<Body>> {
    let dst = conn.shared.compiled().destination(&conn.upstream.service);
    let Some(route) = dst.route.clone() else {
        return Ok(Plan {
            subset: None,
            dst,
            retries: None,
            timeout: None,
            response_headers: None,
        });
    };
    let mut plan = Plan {
        subset: None,
        dst,
        retries: None,
        timeout: None,
        response_headers: None,
    };
    let dst = &conn.upstream.service;
    let view = route::RequestView {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
    };
    let Some((i, entry)) = route.select(&view) else {
        conn.shared.metrics.reject(Direction::Outbound, "no_route");
        return Err(mesh_response(
            StatusCode::NOT_FOUND,
            "outbound",
            "no_route",
            format!(
                "no entry of {} matches {} {}\n",
                route.key,
                parts.method,
                parts.uri.path()
            ),
        ));
    };
    log.route = entry
        .name
        .as_ref()
        .map_or_else(|| format!("{}[{i}]", route.key), |n| n.to_string());
    if let Some(d) = route::pick_destination(&entry.route, rand::random_range(0..100))
        && let Some(subset) = &d.subset
    {
        log.subset = subset.to_string();
        match route::subset_labels(plan.dst.policy.as_deref(), subset.as_str()) {
            Some(labels) => plan.subset = Some(labels.clone()),
            None => {
                conn.shared.metrics.reject(Direction::Outbound, "no_subset");
                return Err(mesh_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outbound",
                    "no_subset",
                    format!(
                        "{} sends to subset {subset} of {dst}, which no DestinationPolicy defines\n",
                        route.key
                    ),
                ));
            }
        }
    }
    let fault = route::fault_action(
        entry.fault.as_ref(),
        rand::random_range(0.0..100.0),
        rand::random_range(0.0..100.0),
    );
    if let Some(delay) = fault.delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(status) = fault.abort {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Err(mesh_response(
            status,
            "outbound",
            "fault_abort",
            format!("fault injected by {}\n", route.key),
        ));
    }
    route::apply_header_ops(&entry.request_headers, &mut parts.headers);
    plan.retries = entry.retries.clone();
    plan.timeout = entry.timeout;
    plan.response_headers =
        (entry.response_headers != Default::default()).then(|| entry.response_headers.clone());
    Ok(plan)
}

/// How many times one attempt sends a request again because its connection failed before the
/// request was written, or (idempotent requests without a body) before a response came; each
/// time on a fresh pick of connection and endpoint. Independent of Route retries.
const MAX_RESENDS: u32 = 2;

/// Methods that may be sent again after a connection failure (RFC 9110 §9.2.2).
fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// One attempt: a connection to an endpoint (pooled or new), the request on it. Feeds the
/// endpoint's latency and outlier state. The error carries what kind of failure it was.
async fn attempt_once(
    conn: &Conn,
    plan: &Plan,
    req: Request<Body>,
) -> (
    Result<Response<Body>, (retry::Attempt, Response<Body>)>,
    Option<SocketAddr>,
) {
    let dst = &conn.upstream.service;
    // An idempotent request without a body may be sent again after its connection failed
    // under it (RFC 9110 §9.2.2): a host killed mid-request costs no error. Keep its head.
    let idempotent = is_idempotent(req.method()) && hyper::body::Body::is_end_stream(req.body());
    let head = idempotent.then(|| clone_request(&req, super::empty()));
    let mut req = req;
    let mut resends = 0;
    let (result, index) = loop {
        let (mut sender, index) = match connection(conn, plan).await {
            Ok(c) => c,
            Err((attempt, resp)) => return (Err((attempt, resp)), None),
        };
        let target = &plan.dst.targets[index];
        let (addr, state) = (target.endpoint.addr, &target.state);
        let _in_flight = state.stats.start();
        let started = std::time::Instant::now();
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let now = std::time::Instant::now();
                state.stats.observe(now - started, now);
                break (Ok(resp), index);
            }
            Err(mut e) => match e.take_message() {
                // The connection died before the request left (a pooled connection to a host
                // that just went away): nothing reached the peer, so sending it again on
                // another connection is safe whatever the method, and needs no retry policy.
                Some(unsent) if resends < MAX_RESENDS => {
                    resends += 1;
                    debug!(dst.addr = %addr, error = %e.error(), "connection closed before the request was sent; sending it on another");
                    conn.shared
                        .http
                        .forget_peer(&conn.source.key, &conn.upstream.service, addr);
                    record_outlier(conn, plan, index, balance::Outcome::ConnectFailure);
                    req = unsent;
                }
                None if resends < MAX_RESENDS
                    && let Some(head) = &head
                    && !e.error().is_user() =>
                {
                    resends += 1;
                    debug!(dst.addr = %addr, error = %e.error(), "idempotent request failed with its connection; sending it again");
                    conn.shared
                        .http
                        .forget_peer(&conn.source.key, &conn.upstream.service, addr);
                    record_outlier(conn, plan, index, balance::Outcome::ConnectFailure);
                    req = clone_request(head, super::empty());
                }
                _ => break (Err(e.into_error()), index),
            },
        }
    };
    let outcome = match &result {
        Ok(r) if r.status().is_server_error() => balance::Outcome::Status5xx(r.status().as_u16()),
        Ok(_) => balance::Outcome::Success,
        Err(_) => balance::Outcome::ConnectFailure,
    };
    record_outlier(conn, plan, index, outcome);
    let addr = plan.dst.targets[index].endpoint.addr;
    match result {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            (Ok(Response::from_parts(parts, body.boxed())), Some(addr))
        }
        Err(e) => {
            conn.shared
                .metrics
                .reject(Direction::Outbound, "upstream_reset");
            warn!(src.service = %conn.source.key, dst.service = %dst, dst.addr = %addr, error = %e, "request to the upstream failed");
            let resp = mesh_response(
                StatusCode::BAD_GATEWAY,
                "outbound",
                "upstream_reset",
                format!("{dst} at {addr}: {e}\n"),
            );
            (Err((retry::Attempt::Reset, resp)), Some(addr))
        }
    }
}

/// Feeds outlier detection of `plan.dst.targets[index]`, when the destination has it.
fn record_outlier(conn: &Conn, plan: &Plan, index: usize, outcome: balance::Outcome) {
    connect::record(
        &conn.shared,
        &plan.dst,
        index,
        outcome,
        std::time::Instant::now(),
    );
}

/// A ready HTTP/2 connection to an endpoint of the upstream: pooled, or made now (trying up
/// to [`super::super::endpoints::MAX_CONNECT_ATTEMPTS`] endpoints).
async fn connection(
    conn: &Conn,
    plan: &Plan,
) -> Result<(hyper::client::conn::http2::SendRequest<Body>, usize), (retry::Attempt, Response<Body>)>
{
    let shared = &conn.shared;
    let dst = &conn.upstream.service;
    let tls = shared.tls_rx.borrow().clone();
    let Some(client) = tls.clients.get(&conn.source.key).cloned() else {
        let e = Error::NoCertificate(conn.source.key.to_string());
        shared.metrics.reject(Direction::Outbound, e.reason());
        return Err((
            retry::Attempt::ConnectFailure,
            mesh_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "outbound",
                e.reason(),
                format!("{e}\n"),
            ),
        ));
    };
    let targets = &plan.dst.targets;
    let cursor = conn.cursor.fetch_add(1, Ordering::Relaxed);
    let order = connect::order(
        shared,
        &plan.dst,
        plan.subset.as_ref(),
        endpoints::DEFAULT_HTTP_LOAD_BALANCER,
        cursor,
    );
    if order.is_empty() {
        let e = Error::NoEndpoints(dst.to_string());
        shared.metrics.reject(Direction::Outbound, e.reason());
        warn!(src.service = %conn.source.key, dst.service = %dst, reason = e.reason(), "no endpoint for the request");
        return Err((
            retry::Attempt::ConnectFailure,
            mesh_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "outbound",
                e.reason(),
                format!("{e}\n"),
            ),
        ));
    }
    let max_requests = (plan.dst.policy.as_ref())
        .and_then(|p| p.circuit_breaker.as_ref())
        .and_then(|c| c.max_requests_per_connection);
    let mut last = None;
    for (n, &i) in order.iter().enumerate() {
        let target = &targets[i];
        let ep = &target.endpoint;
        if let Some(mut sender) = (shared.http).peer(
            &conn.source.key,
            &conn.upstream.service,
            ep.addr,
            &tls,
            max_requests,
        ) && sender.ready().await.is_ok()
        {
            return Ok((sender, i));
        }
        // One connection attempt per (source, endpoint) at a time: a burst of requests on a
        // cold pool (start, certificate rotation) would otherwise open one TLS connection each,
        // hundreds of handshakes at once, overflowing the peer's accept queue (SYN retries: 1 s
        // stalls). The others wait for it and take it from the pool.
        let waited_from = std::time::Instant::now();
        let mut failed_at = shared
            .http
            .connecting(&conn.source.key, &conn.upstream.service, ep.addr)
            .await;
        if let Some(mut sender) = (shared.http).peer(
            &conn.source.key,
            &conn.upstream.service,
            ep.addr,
            &tls,
            max_requests,
        ) && sender.ready().await.is_ok()
        {
            return Ok((sender, i));
        }
        if failed_at.is_some_and(|t| t >= waited_from) {
            // The attempt we waited for failed meanwhile: do not repeat it (a dead endpoint
            // would cost every waiter a connect timeout in turn); try the next endpoint.
            continue;
        }
        let name = ServerName::try_from(dst.sni()).expect("service SNI is a valid DNS name");
        let stream = match attempt(shared, &client, true, name, ep.addr).await {
            Ok(s) => {
                target.state.reachability.connected();
                s
            }
            Err(e) => {
                *failed_at = Some(std::time::Instant::now());
                connect::failed(shared, &plan.dst, i, &e, n + 1 < order.len());
                let retry = e.is_retryable();
                last = Some(e);
                if !retry {
                    break;
                }
                continue;
            }
        };
        let serial = crate::deny::peer_serial(stream.get_ref().1);
        // Bounded like the TLS handshake before it: other requests wait on this attempt.
        let handshake = tokio::time::timeout(
            shared.config().outbound.connect_timeout,
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(super::H2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(super::H2_KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .handshake::<_, Body>(TokioIo::new(stream)),
        )
        .await;
        match handshake {
            Ok(Ok((mut sender, driver))) => {
                let addr = ep.addr;
                let mut force = shared.force_rx.clone();
                let mut deny_rx = shared.deny_rx.clone();
                let metrics = shared.metrics.clone();
                // Runs until the last sender is dropped (pool eviction), the peer closes or
                // stops answering keep-alive pings, the drain's grace period is over, or the
                // peer's certificate is revoked (the pool then drops the closed sender).
                tokio::spawn(
                    async move {
                        tokio::select! {
                            r = driver => if let Err(e) = r {
                                debug!(error = %e, "http/2 connection to a peer ended with an error");
                            },
                            _ = mesh_runtime::drain::until_true(&mut force) => {}
                            () = crate::deny::until_denied(serial.as_deref(), &mut deny_rx) => {
                                metrics.reject(Direction::Outbound, crate::proxy::inbound::REASON_CERT_REVOKED);
                                warn!(dst.addr = %addr, "http/2 connection closed: the server's certificate was revoked");
                            }
                        }
                    }
                    .instrument(debug_span!("h2", dst.addr = %addr)),
                );
                if sender.ready().await.is_ok() {
                    shared.http.put_peer(
                        &conn.source.key,
                        &conn.upstream.service,
                        ep.addr,
                        tls.clone(),
                        sender.clone(),
                        max_requests,
                    );
                    *failed_at = None;
                    return Ok((sender, i));
                }
                *failed_at = Some(std::time::Instant::now());
            }
            Ok(Err(e)) => {
                *failed_at = Some(std::time::Instant::now());
                shared
                    .metrics
                    .reject(Direction::Outbound, "http2_handshake_failed");
                debug!(dst.addr = %ep.addr, error = %e, "http/2 handshake failed");
            }
            Err(_) => {
                *failed_at = Some(std::time::Instant::now());
                shared
                    .metrics
                    .reject(Direction::Outbound, "http2_handshake_failed");
                debug!(dst.addr = %ep.addr, "http/2 handshake timed out");
            }
        }
    }
    let (status, reason, text) = match &last {
        Some(e @ Error::Timeout { .. }) => (StatusCode::GATEWAY_TIMEOUT, e.reason(), e.to_string()),
        Some(e) => (StatusCode::BAD_GATEWAY, e.reason(), e.to_string()),
        None => (
            StatusCode::BAD_GATEWAY,
            "http2_handshake_failed",
            format!("no http/2 connection to {dst} could be made"),
        ),
    };
    warn!(src.service = %conn.source.key, dst.service = %dst, reason, error = %text, "outbound request failed");
    Err((
        retry::Attempt::ConnectFailure,
        mesh_response(status, "outbound", reason, format!("{text}\n")),
    ))
}

/// Whether connections to `upstream` are proxied per request: its instances say they speak an
/// HTTP-family protocol. `None` when no instance is known.
pub fn is_http(shared: &Shared, upstream: &Upstream) -> Option<bool> {
    let compiled = shared.compiled();
    (compiled.view.endpoints.get(&upstream.service))
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
