//! The inbound side of HTTP-family services: serves HTTP/2 from another meshd inside the
//! accepted mTLS connection, authorizes every request (method, path and headers included),
//! answers a denied one with 403 naming the policy, and forwards the rest to the app over a
//! pooled client in the app's own protocol.

// `Err` is the mesh's HTTP answer itself, returned at most once per request: boxing it would
// add an allocation to every error path and save nothing.
#![allow(clippy::result_large_err)]

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
use mesh_api::policy::Snapshot;
use mesh_api::policy::authz::{Decision, Http};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::super::authz::{self, Attrs, REASON_NO_POLICY};
use super::super::external::ExternalClient;
use super::super::http::{
    AppClient, AppError, Body, H2_KEEPALIVE_INTERVAL, H2_KEEPALIVE_TIMEOUT, XFCC, bad_path, empty,
    end_span, grpc_status, mesh_response, normalize_path, server_builder, strip_hop_by_hop,
    strip_mesh_owned, upgrade,
};
use super::super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::super::outbound::external;
use super::super::shared::Shared;
use super::super::{observe, ratelimit, route};
use crate::config::Service;
use crate::trace::{Kind, attr};

/// What each request of one connection needs.
#[derive(Clone)]
struct Conn {
    shared: Shared,
    /// The verified caller; `None` for a plaintext caller of a PERMISSIVE service.
    caller: Option<Identity>,
    /// Served by [`serve_http`] (HTTP/1.1 possible), not as meshd-to-meshd HTTP/2.
    direct: bool,
    /// The `x-forwarded-client-cert` every request of the connection carries to the app
    /// (`By` the local service, `URI` the caller); `None` for a plaintext caller, who has no
    /// identity to pass on. Built once: caller and callee are the connection's.
    xfcc: Option<HeaderValue>,
    local: Service,
    peer: SocketAddr,
    /// Set when `local` stands for an ExternalService this host is the egress gateway of:
    /// requests go to it instead of an app.
    egress: Option<Arc<ExternalClient>>,
}

/// Serves the requests of one mTLS connection until it closes or the drain deadline passes.
pub async fn serve(
    tls_stream: TlsStream<TcpStream>,
    caller: Identity,
    local: &Service,
    peer: SocketAddr,
    shared: &Shared,
) {
    let (conn, _active) = open(Some(caller), false, local, peer, shared);
    serve_h2(tls_stream, conn, peer, shared).await;
}

/// Serves the requests of an mTLS connection that names an ExternalService this host is the
/// egress gateway of: each is authorized (the policies selecting the ExternalService by
/// name), then sent to the service on `client`.
pub async fn serve_egress(
    tls_stream: TlsStream<TcpStream>,
    caller: Identity,
    local: &Service,
    client: Arc<ExternalClient>,
    peer: SocketAddr,
    shared: &Shared,
) {
    let (conn, _active) = open(Some(caller), false, local, peer, shared);
    let conn = Arc::new(Conn {
        egress: Some(client),
        xfcc: None,
        ..Conn::clone(&conn)
    });
    serve_h2(tls_stream, conn, peer, shared).await;
}

async fn serve_h2(
    tls_stream: TlsStream<TcpStream>,
    conn: Arc<Conn>,
    peer: SocketAddr,
    shared: &Shared,
) {
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
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .serve_connection(io, service);
    until_done_or_forced(connection, peer, shared).await;
}

/// Serves HTTP/1.1 (with upgrades) or HTTP/2 with prior knowledge on a connection that did
/// not arrive as meshd-to-meshd HTTP/2: a plaintext caller of a PERMISSIVE service on its
/// `listen` address (`caller` = `None`), or a mesh workload whose mTLS connection did not ask
/// for `meshd/h2/1` (a caller meshd that takes the service for TCP, or a client of its own).
/// Either way every request goes through the same normalization, authorization, rate limits,
/// header rules and access log as any other — a byte stream to an HTTP app would let the
/// caller write its own identity header.
pub async fn serve_http<IO>(
    io: IO,
    caller: Option<Identity>,
    local: &Service,
    peer: SocketAddr,
    shared: &Shared,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (conn, _active) = open(caller, true, local, peer, shared);
    let service = service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&conn, req).await) }
    });
    let builder = server_builder();
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    until_done_or_forced(connection, peer, shared).await;
}

/// Counts the connection and builds what its requests share.
fn open(
    caller: Option<Identity>,
    direct: bool,
    local: &Service,
    peer: SocketAddr,
    shared: &Shared,
) -> (Arc<Conn>, ActiveGuard) {
    let labels = ServiceLabels {
        direction: Direction::Inbound,
        service: local.key.to_string(),
    };
    shared.metrics.connections.get_or_create(&labels).inc();
    if caller.is_none() {
        shared.metrics.plaintext.get_or_create(&labels).inc();
    }
    let active = ActiveGuard::new(&shared.metrics, Direction::Inbound);
    let xfcc = caller.as_ref().and_then(|caller| {
        let td = shared.tls_rx.borrow().trust_domain.clone();
        let callee = Identity::workload(&td, &local.key);
        HeaderValue::from_str(&format!("By={callee};URI={caller}")).ok()
    });
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        caller,
        direct,
        xfcc,
        local: local.clone(),
        peer,
        egress: None,
    });
    (conn, active)
}

/// Runs a server connection until it ends, or closes it at the end of the drain grace period.
async fn until_done_or_forced<F, E>(connection: F, peer: SocketAddr, shared: &Shared)
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(connection);
    let mut force = shared.force_rx.clone();
    tokio::select! {
        r = &mut connection => if let Err(e) = r {
            debug!(src.addr = %peer, error = %e, "inbound http connection ended with an error");
        },
        _ = mesh_runtime::drain::until_true(&mut force) => {
            debug!(src.addr = %peer, "inbound http connection closed at the end of the drain grace period");
        }
    }
}

/// One request: normalize its path, authorize, rate-limit, forward, log.
async fn handle(conn: &Conn, mut req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    // What the caller wrote in the mesh's own headers is never believed (the caller's meshd
    // strips them too; a plaintext caller may have written anything).
    strip_mesh_owned(req.headers_mut());
    let snapshot = conn.shared.policy_rx.borrow().clone();
    // One spelling of the path for policy, rate limits and the app.
    let normalized = normalize_path(&mut req, snapshot.mesh_config().path_options());
    // The SERVER span of this hop, a child of the caller meshd's CLIENT span; the app's own
    // spans become its children.
    let mut span = (conn.shared.tracer).span_named(req.headers(), Kind::Server, || {
        format!("{} {}", req.method(), conn.local.key)
    });
    if span.is_recording() {
        span.attr(attr::HTTP_REQUEST_METHOD, req.method().as_str());
        span.attr(attr::URL_PATH, req.uri().path());
        span.attr(attr::MESH_SERVICE, conn.local.key.to_string());
        span.attr(
            attr::MESH_PEER_IDENTITY,
            authz::caller_text(conn.caller.as_ref()),
        );
        span.attr(attr::NETWORK_PEER_ADDRESS, conn.peer.to_string());
    }
    span.inject(req.headers_mut());
    let upgrade = Upgrade::of(&req, conn.direct);
    // An upgrade is authorized as what the app will see: the GET that asks to switch.
    let method = if upgrade.is_some() {
        "GET".to_owned()
    } else {
        req.method().as_str().to_owned()
    };
    let path = req.uri().path().to_owned();
    let (resp, decision) = match normalized {
        // Fail closed: an empty policy would allow everything.
        _ if !conn.shared.has_policy() => {
            conn.shared
                .metrics
                .reject(Direction::Inbound, REASON_NO_POLICY);
            (no_policy(), None)
        }
        Err(e) => {
            conn.shared.metrics.reject(Direction::Inbound, e.reason());
            debug!(src.identity = %authz::caller_text(conn.caller.as_ref()), src.addr = %conn.peer, dst.service = %conn.local.key, http.path = %path, error = %e, "request path refused");
            (bad_path("inbound", e), None)
        }
        Ok(()) => {
            let decision = decide(conn, &req, &snapshot, &method, &path);
            let resp = if !decision.is_allowed() {
                denied(conn, &decision, &method, &path)
            } else if let Err(limited) = rate_limit(conn, &req) {
                too_many(conn, &limited, &method, &path)
            } else {
                forward(conn, req, upgrade).await
            };
            (resp, Some(decision))
        }
    };
    let (mesh_error, trace_id) = end_span(span, &resp);
    let done = Done {
        started,
        method,
        path,
        decision,
        trace_id,
        mesh_error,
    };
    record(conn, done, &resp);
    resp
}

/// What the access log and metrics need of a finished request besides its response.
struct Done {
    started: Instant,
    method: String,
    path: String,
    /// `None` when the request was refused before authorization.
    decision: Option<Decision>,
    trace_id: Option<crate::trace::TraceId>,
    mesh_error: String,
}

/// Metrics, access-log event and edge count of one request.
fn record(conn: &Conn, done: Done, resp: &Response<Body>) {
    let rec = observe::Record {
        direction: Direction::Inbound,
        started: done.started,
        src_addr: conn.peer,
        src_service: conn.caller.as_ref().and_then(authz::workload_service),
        src_identity: conn.caller.clone(),
        mtls: conn.caller.is_some(),
        dst_service: conn.local.key.clone(),
        dst_addr: Some(conn.local.address),
        dst_site: None,
        kind: observe::Kind::Http {
            method: done.method,
            path: done.path,
            status: resp.status().as_u16(),
            grpc_status: grpc_status(resp.headers()),
            route: String::new(),
            subset: String::new(),
            attempts: 1,
        },
        decision: done.decision.map(|d| {
            (
                if d.is_allowed() { "allow" } else { "deny" },
                authz::policy_of(&d),
            )
        }),
        trace_id: done.trace_id,
        error: done.mesh_error,
    };
    observe::finish(&conn.shared, rec);
}

/// Authorizes the request over `snapshot` (on its normalized path), counts the decision and
/// logs AUDIT matches.
fn decide(
    conn: &Conn,
    req: &Request<Incoming>,
    snapshot: &Snapshot,
    method: &str,
    path: &str,
) -> Decision {
    let decision = {
        let headers = authz::HeaderView(req.headers());
        let attrs = Attrs {
            caller: conn.caller.as_ref(),
            source_ip: conn.peer.ip(),
            service: &conn.local,
            http: Some(Http {
                method,
                path,
                headers: &headers,
            }),
        };
        attrs.decide(snapshot)
    };
    (conn.shared.metrics).record_decision(&conn.local.key, &decision, false);
    if !decision.audit().is_empty() {
        info!(
            src.identity = %authz::caller_text(conn.caller.as_ref()),
            src.addr = %conn.peer,
            dst.service = %conn.local.key,
            http.method = %method,
            http.path = %path,
            allowed = decision.is_allowed(),
            audit = ?decision.audit().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "request matched an audit policy"
        );
    }
    decision
}

/// Checks the service's RateLimits; the route is the name of the entry of the service's own
/// Route that the request matches (what `route` limits refer to).
fn rate_limit(conn: &Conn, req: &Request<Incoming>) -> Result<(), ratelimit::Limited> {
    let compiled = conn.shared.compiled();
    let Some(limiter) = compiled.limiter(&conn.local.key) else {
        return Ok(());
    };
    if limiter.is_empty() {
        return Ok(());
    }
    let route_name = compiled.routes.route(&conn.local.key).and_then(|r| {
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
        &authz::caller_text(conn.caller.as_ref()),
        tokio::time::Instant::now(),
    )
}

/// 429 with `retry-after`, naming the limit.
fn too_many(conn: &Conn, limited: &ratelimit::Limited, method: &str, path: &str) -> Response<Body> {
    conn.shared
        .metrics
        .reject(Direction::Inbound, "rate_limited");
    conn.shared.metrics.limited(&conn.local.key.to_string());
    debug!(
        src.identity = %authz::caller_text(conn.caller.as_ref()),
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

/// 503 while the node holds no policy snapshot: the caller's meshd tries another instance.
fn no_policy() -> Response<Body> {
    mesh_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "inbound",
        REASON_NO_POLICY,
        "this node has no policy snapshot yet and refuses requests until the registry sends one\n"
            .into(),
    )
}

/// 403 with a body naming what denied the request.
fn denied(conn: &Conn, decision: &Decision, method: &str, path: &str) -> Response<Body> {
    let (_, reason) = authz::labels(decision, false);
    let policy = authz::policy_of(decision);
    let caller = authz::caller_text(conn.caller.as_ref());
    warn!(
        src.identity = %caller,
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
        "RBAC: access denied: {caller} may not call {method} {path} on {}: {by}\n",
        conn.local.key
    );
    mesh_response(StatusCode::FORBIDDEN, "inbound", "denied", body)
}

/// An upgrade a request asks for, and how the caller asked for it.
enum Upgrade {
    /// Extended CONNECT from the caller's meshd (RFC 8441): answered 200, then the tunnel.
    Connect(String),
    /// HTTP/1.1 `Upgrade:` from a caller served by [`serve_http`]: answered with the app's 101.
    Http1(String),
}

// === impl Upgrade ===

impl Upgrade {
    /// `http1`: the connection is served by [`serve_http`] (a meshd peer never sends an
    /// HTTP/1.1 upgrade: it turns one into extended CONNECT).
    fn of(req: &Request<Incoming>, http1: bool) -> Option<Self> {
        if req.method() == http::Method::CONNECT {
            return (req.extensions().get::<hyper::ext::Protocol>())
                .map(|p| Self::Connect(p.as_str().to_owned()));
        }
        (http1 && req.version() == http::Version::HTTP_11)
            .then(|| upgrade::requested(req.headers()).map(Self::Http1))
            .flatten()
    }

    fn protocol(&self) -> &str {
        match self {
            Self::Connect(p) | Self::Http1(p) => p,
        }
    }
}

/// Sends the request to the app and passes its response back.
async fn forward(
    conn: &Conn,
    mut req: Request<Incoming>,
    upgrade: Option<Upgrade>,
) -> Response<Body> {
    if let Some(client) = &conn.egress {
        return forward_external(conn, client, req, upgrade).await;
    }
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
    let upgrade = match accept_upgrade(conn, &client, &mut req, upgrade) {
        Ok(upgrade) => upgrade,
        Err(resp) => return resp,
    };
    let (mut parts, body) = req.into_parts();
    if let Err(resp) = to_app_request(conn, &mut parts, addr, &client) {
        return resp;
    }
    let body = match &upgrade {
        Some((u, _)) => {
            parts.method = http::Method::GET;
            upgrade::mark(&mut parts.headers, u.protocol());
            empty()
        }
        None => body.boxed(),
    };
    match client.send(Request::from_parts(parts, body)).await {
        Ok(resp) => from_app(conn, resp, upgrade),
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

/// Sends the request to the ExternalService this host is the egress gateway of; what the
/// service answers cannot speak for the mesh.
async fn forward_external(
    conn: &Conn,
    client: &ExternalClient,
    req: Request<Incoming>,
    upgrade: Option<Upgrade>,
) -> Response<Body> {
    if upgrade.is_some() || req.method() == http::Method::CONNECT {
        return mesh_response(
            StatusCode::NOT_IMPLEMENTED,
            "inbound",
            "upgrade_unsupported",
            format!(
                "{}: upgrades to external services are not proxied\n",
                conn.local.key
            ),
        );
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let req = Request::from_parts(parts, body.boxed());
    // What the service answers was already kept from speaking for the mesh.
    match external::attempt(&conn.shared, client, req).await {
        Ok(resp) | Err((_, resp)) => resp,
    }
}

/// The upgrade to pass to the app with the caller's side of its tunnel, if one was asked for
/// and the app can take it; `Err` answers requests that cannot be proxied.
fn accept_upgrade(
    conn: &Conn,
    client: &AppClient,
    req: &mut Request<Incoming>,
    upgrade: Option<Upgrade>,
) -> Result<Option<(Upgrade, hyper::upgrade::OnUpgrade)>, Response<Body>> {
    match upgrade {
        Some(_) if !matches!(*client, AppClient::Http1(_)) => Err(mesh_response(
            StatusCode::NOT_IMPLEMENTED,
            "inbound",
            "upgrade_unsupported",
            format!(
                "{} speaks HTTP/2; upgrades are passed to HTTP/1.1 apps only\n",
                conn.local.key
            ),
        )),
        Some(u) => Ok(Some((u, hyper::upgrade::on(req)))),
        None if req.method() == http::Method::CONNECT => Err(mesh_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "inbound",
            "connect_unsupported",
            "CONNECT tunnels are not proxied\n".into(),
        )),
        None => Ok(None),
    }
}

/// Rewrites the caller's request for the app at `addr`: the target its client needs, its
/// protocol's Host/:authority, no hop-by-hop headers, and the verified caller in XFCC.
fn to_app_request(
    conn: &Conn,
    parts: &mut http::request::Parts,
    addr: SocketAddr,
    client: &AppClient,
) -> Result<(), Response<Body>> {
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
    parts.uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(target)
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| {
            mesh_response(
                StatusCode::BAD_REQUEST,
                "inbound",
                "bad_request",
                format!("request target not usable: {e}\n"),
            )
        })?;
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
    // Only a verified caller has an identity to pass on (what a caller sent under the name
    // was stripped with the other mesh-owned headers).
    if let Some(v) = &conn.xfcc {
        headers.insert(XFCC, v.clone());
    }
    Ok(())
}

/// The app's response as the caller gets it; an accepted upgrade opens the tunnel.
fn from_app(
    conn: &Conn,
    mut resp: Response<Incoming>,
    upgrade: Option<(Upgrade, hyper::upgrade::OnUpgrade)>,
) -> Response<Body> {
    let tunnel = match upgrade {
        Some((u, caller_side)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            Some((u, caller_side, hyper::upgrade::on(&mut resp)))
        }
        _ => None,
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // An app cannot speak for the mesh (x-mesh-error) or name a caller.
    strip_mesh_owned(&mut parts.headers);
    let Some((u, caller_side, app_side)) = tunnel else {
        return Response::from_parts(parts, body.boxed());
    };
    match &u {
        // The extended CONNECT succeeded: 200 with no body, then the tunnel.
        Upgrade::Connect(_) => parts.status = StatusCode::OK,
        // The plaintext caller gets the app's 101 with the upgrade it asked for.
        Upgrade::Http1(protocol) => upgrade::mark(&mut parts.headers, protocol),
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    upgrade::tunnel(&conn.shared, caller_side, app_side, "inbound");
    Response::from_parts(parts, empty())
}
