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
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, debug_span, info, warn};

use super::super::metrics::{ActiveGuard, Direction, ServiceLabels};
use super::super::outbound::{Error, MAX_CONNECT_ATTEMPTS, attempt};
use super::super::{Shared, route};
use super::{Body, XFCC, mesh_response, strip_hop_by_hop};
use crate::config::{Service, Upstream};

/// What each request of one app connection needs.
struct Conn {
    shared: Shared,
    source: Arc<Service>,
    upstream: Arc<Upstream>,
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
        cursor,
        peer,
    });
    let service = service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&conn, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(app), service);
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

/// One request: pick an endpoint, send, pass the response back, log.
async fn handle(conn: &Conn, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let dst = conn.upstream.service.to_string();
    let (resp, endpoint) = match send(conn, req).await {
        Ok((resp, addr)) => (resp, Some(addr)),
        Err(resp) => (resp, None),
    };
    conn.shared
        .metrics
        .record_request(Direction::Outbound, &dst, resp.status().as_u16());
    info!(
        target: "access",
        direction = "outbound",
        src.addr = %conn.peer,
        src.service = %conn.source.key,
        dst.service = %dst,
        dst.addr = %endpoint.map(|a| a.to_string()).unwrap_or_default(),
        http.method = %method,
        http.path = %path,
        http.status = resp.status().as_u16(),
        duration_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    resp
}

/// Sends `req` to an endpoint of the upstream; `Err` is the mesh's own error response.
async fn send(
    conn: &Conn,
    req: Request<Incoming>,
) -> Result<(Response<Body>, SocketAddr), Response<Body>> {
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
    // Only the callee's meshd says who called; an app cannot claim an identity.
    parts.headers.remove(XFCC);
    // :authority replaces Host on HTTP/2.
    parts.headers.remove(header::HOST);
    let (mut sender, addr) = connection(conn).await?;
    let req = Request::from_parts(parts, body.boxed());
    match sender.send_request(req).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok((Response::from_parts(parts, body.boxed()), addr))
        }
        Err(e) => {
            conn.shared
                .metrics
                .reject(Direction::Outbound, "upstream_reset");
            warn!(src.service = %conn.source.key, dst.service = %dst, dst.addr = %addr, error = %e, "request to the upstream failed");
            Err(mesh_response(
                StatusCode::BAD_GATEWAY,
                "outbound",
                "upstream_reset",
                format!("{dst} at {addr}: {e}\n"),
            ))
        }
    }
}

/// A ready HTTP/2 connection to an endpoint of the upstream: pooled, or made now (trying up
/// to [`MAX_CONNECT_ATTEMPTS`] endpoints).
async fn connection(
    conn: &Conn,
) -> Result<(hyper::client::conn::http2::SendRequest<Body>, SocketAddr), Response<Body>> {
    let shared = &conn.shared;
    let dst = &conn.upstream.service;
    let tls = shared.tls_rx.borrow().clone();
    let Some(client) = tls.clients.get(&conn.source.key).cloned() else {
        let e = Error::NoCertificate(conn.source.key.to_string());
        shared.metrics.reject(Direction::Outbound, e.reason());
        return Err(mesh_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbound",
            e.reason(),
            format!("{e}\n"),
        ));
    };
    let view = shared.view_rx.borrow().clone();
    let endpoints = view.endpoints.get(dst).map(Vec::as_slice).unwrap_or(&[]);
    let candidates = route::pick(
        endpoints,
        conn.cursor.fetch_add(1, Ordering::Relaxed),
        MAX_CONNECT_ATTEMPTS,
    );
    if candidates.is_empty() {
        let e = Error::NoEndpoints(dst.to_string());
        shared.metrics.reject(Direction::Outbound, e.reason());
        warn!(src.service = %conn.source.key, dst.service = %dst, reason = e.reason(), "no endpoint for the request");
        return Err(mesh_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbound",
            e.reason(),
            format!("{e}\n"),
        ));
    }
    let name = ServerName::try_from(dst.sni()).expect("service SNI is a valid DNS name");
    let mut last = None;
    for ep in candidates {
        if let Some(mut sender) = shared.http.peer(&conn.source.key, ep.addr, &tls)
            && sender.ready().await.is_ok()
        {
            return Ok((sender, ep.addr));
        }
        let stream = match attempt(shared, &client, true, name.clone(), ep.addr).await {
            Ok(s) => s,
            Err(e) => {
                shared.metrics.reject(Direction::Outbound, e.reason());
                debug!(dst.addr = %ep.addr, error = %e, "endpoint failed");
                let retry = e.is_retryable();
                last = Some(e);
                if !retry {
                    break;
                }
                continue;
            }
        };
        let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Body>(TokioIo::new(stream))
            .await;
        match handshake {
            Ok((mut sender, driver)) => {
                let addr = ep.addr;
                // Runs until the last sender is dropped (pool eviction) or the peer closes.
                tokio::spawn(
                    async move {
                        if let Err(e) = driver.await {
                            debug!(error = %e, "http/2 connection to a peer ended with an error");
                        }
                    }
                    .instrument(debug_span!("h2", dst.addr = %addr)),
                );
                if sender.ready().await.is_ok() {
                    shared
                        .http
                        .put_peer(&conn.source.key, ep.addr, tls.clone(), sender.clone());
                    return Ok((sender, ep.addr));
                }
            }
            Err(e) => {
                shared
                    .metrics
                    .reject(Direction::Outbound, "http2_handshake_failed");
                debug!(dst.addr = %ep.addr, error = %e, "http/2 handshake failed");
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
    Err(mesh_response(
        status,
        "outbound",
        reason,
        format!("{text}\n"),
    ))
}

/// Whether connections to `upstream` are proxied per request: its instances say they speak an
/// HTTP-family protocol.
pub fn is_http(shared: &Shared, upstream: &Upstream) -> bool {
    let view = shared.view_rx.borrow();
    (view.endpoints.get(&upstream.service))
        .is_some_and(|eps| eps.iter().any(|e| e.protocol.is_http()))
}
