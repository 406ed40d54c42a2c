//! HTTP-family services (`http`, `http2`, `grpc`) at L7: the pieces both sides share — body
//! type, hop-by-hop header rules, mesh error responses, per-request metrics — and the state
//! that outlives a connection: pooled clients to local apps and pooled HTTP/2 connections to
//! other hosts. Between hosts every request travels as an HTTP/2 stream inside mTLS
//! (ALPN `meshd/h2/1`), whatever the app speaks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_api::ServiceKey;

use crate::config::{Config, Protocol};

pub mod replay;
pub mod upgrade;

/// Between meshd hosts, an HTTP/2 PING goes out after this long without a frame from the
/// peer, on idle connections too: a host that vanished without a reset is noticed, and its
/// pooled connection dropped, before a request is stuck on it.
pub const H2_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a keep-alive PING may go unanswered before the connection is closed.
pub const H2_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Request and response bodies as meshd passes them on (streamed, never buffered whole).
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Response header naming the mesh hop that produced an error response and why
/// (`outbound/no_endpoints`, `inbound/app_unreachable`, `inbound/denied`, ...), so a user can
/// tell an error of the mesh from one of the app.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-mesh-error");

/// The caller's and the callee's identities, as Istio passes them to apps
/// (`By=<callee>;URI=<caller>`); set by the inbound, never trusted from the app.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Headers that describe one connection, not the request, and never cross a proxy
/// (RFC 9110 §7.6.1). `te: trailers` is kept: gRPC needs it.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, those named by `Connection` too.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Three times per request on the proxy path: names are constants (no parsing per call),
    // and the list of names `Connection` adds is only built when there is one.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes what only the mesh may say — the caller's identity (XFCC) and every `x-mesh-*`
/// header — from headers an app (or a plaintext caller) wrote, on every path in both
/// directions, so no app can forge an identity or pass its error off as the mesh's.
pub fn strip_mesh_owned(headers: &mut HeaderMap) {
    headers.remove(XFCC);
    // Rare: only build the list when such a header is present.
    let owned: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with(MESH_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in owned {
        headers.remove(name);
    }
}

/// The prefix of the headers the mesh owns.
pub const MESH_HEADER_PREFIX: &str = "x-mesh-";

/// Rewrites the request's path to its normalized form (the query is kept byte for byte), so
/// policy, routing and the app all see one spelling. Nothing is copied when the path is
/// already normal.
pub fn normalize_path<B>(
    req: &mut http::Request<B>,
    opts: mesh_api::path::Options,
) -> Result<(), mesh_api::path::Rejected> {
    let uri = req.uri();
    // CONNECT (authority form) has no path to normalize.
    if uri.path_and_query().is_none() {
        return Ok(());
    }
    let normal = match mesh_api::path::normalize(uri.path(), opts)? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(p) => p,
    };
    let pq = match uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    // A normalized path holds only bytes of the original path, so it parses.
    parts.path_and_query = Some(
        http::uri::PathAndQuery::from_maybe_shared(Bytes::from(pq))
            .map_err(|_| mesh_api::path::Rejected::NotOriginForm)?,
    );
    *req.uri_mut() =
        http::Uri::from_parts(parts).map_err(|_| mesh_api::path::Rejected::NotOriginForm)?;
    Ok(())
}

/// The 400 answer to a path that normalization refused.
pub fn bad_path(hop: &str, e: mesh_api::path::Rejected) -> Response<Body> {
    mesh_response(StatusCode::BAD_REQUEST, hop, e.reason(), format!("{e}\n"))
}

/// `grpc-status`, read from every proxied response (a constant: a `&str` name is parsed on
/// each lookup).
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The highest status code gRPC defines (`UNAUTHENTICATED`).
const MAX_GRPC_STATUS: u32 = 16;
/// gRPC's `UNKNOWN`: what the spec says a client makes of a code it does not know.
const GRPC_UNKNOWN: u32 = 2;

/// The `grpc-status` in response headers (a trailers-only gRPC answer); a status sent in
/// trailers after messages is not seen here, so a streamed call's status is not counted.
/// A code outside gRPC's 0–16 reads as `UNKNOWN` (2), as gRPC clients read it: the value is
/// a metric label, and an upstream writing arbitrary numbers must not grow the series
/// without bound.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    let v = headers.get(GRPC_STATUS)?.to_str().ok()?;
    Some(match v.trim().parse::<u32>() {
        Ok(code) if code <= MAX_GRPC_STATUS => code,
        _ => GRPC_UNKNOWN,
    })
}

/// Ends a hop's span with its response: the status, and the mesh's own error (`x-mesh-error`,
/// "" when the answer is the app's). Returns that error and the trace id, which the hop's
/// access-log event carries.
pub(crate) fn end_span(
    mut span: crate::trace::Span,
    resp: &Response<Body>,
) -> (String, Option<crate::trace::TraceId>) {
    let mesh_error = (resp.headers().get(ERROR_HEADER))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    span.response_status(resp.status());
    if !mesh_error.is_empty() {
        span.attr(crate::trace::attr::ERROR_TYPE, mesh_error.as_str());
    }
    let trace_id = span.trace_id();
    span.end();
    (mesh_error, trace_id)
}

/// The server side of an HTTP/1.1-or-HTTP/2 connection from a caller that may trickle its
/// request head or go idle: hyper's header read timeout (30 s) and HTTP/2 keep-alive, both of
/// which never fire without a timer.
pub fn server_builder() -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    builder
}

/// A small response generated by meshd itself, marked with [`ERROR_HEADER`].
pub fn mesh_response(status: StatusCode, hop: &str, reason: &str, body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("{hop}/{reason}")) {
        h.insert(ERROR_HEADER, v);
    }
    resp
}

/// A complete body.
pub fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The client of one local app, in its protocol.
pub enum AppClient {
    /// HTTP/1.1 with a pool of keep-alive connections.
    Http1(Client<HttpConnector, Body>),
    /// One multiplexed HTTP/2 connection (prior knowledge), remade when it closes. Not the
    /// pooled legacy client: that one takes `:authority` from the address it connects to,
    /// and the app must see the authority the caller used.
    Http2 {
        /// Where the app listens.
        addr: SocketAddr,
        /// Connect timeout.
        connect_timeout: std::time::Duration,
        /// The live connection, if any.
        conn: tokio::sync::Mutex<Option<SendRequest<Body>>>,
    },
}

/// Why a request could not be given to the app.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No connection to the app.
    #[error("connecting: {0}")]
    Connect(String),
    /// The exchange failed after connecting.
    #[error("{0}")]
    Exchange(String),
}

impl AppClient {
    /// Sends `req` (absolute URI; for HTTP/1.1 its authority is the app's address) to the app.
    pub async fn send(
        &self,
        req: http::Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, AppError> {
        match self {
            AppClient::Http1(client) => client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    AppError::Connect(e.to_string())
                } else {
                    AppError::Exchange(e.to_string())
                }
            }),
            AppClient::Http2 {
                addr,
                connect_timeout,
                conn,
            } => {
                let mut sender = {
                    let mut slot = conn.lock().await;
                    match slot.as_ref() {
                        Some(s) if !s.is_closed() => s.clone(),
                        _ => {
                            let s = connect_h2(*addr, *connect_timeout).await?;
                            *slot = Some(s.clone());
                            s
                        }
                    }
                };
                sender
                    .ready()
                    .await
                    .map_err(|e| AppError::Exchange(e.to_string()))?;
                sender
                    .send_request(req)
                    .await
                    .map_err(|e| AppError::Exchange(e.to_string()))
            }
        }
    }
}

async fn connect_h2(
    addr: SocketAddr,
    connect_timeout: std::time::Duration,
) -> Result<SendRequest<Body>, AppError> {
    let tcp = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| AppError::Connect(format!("{addr}: timed out")))?
        .map_err(|e| AppError::Connect(format!("{addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let (sender, driver) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Body>(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| AppError::Connect(format!("{addr}: http/2 handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(error = %e, "http/2 connection to the app ended with an error");
        }
    });
    Ok(sender)
}

/// HTTP state shared by every connection.
pub struct State {
    /// A client per local HTTP-family service, speaking the app's protocol; replaced on a
    /// reload (clients of unchanged services carried over with their pooled connections).
    apps: Mutex<Arc<AppClients>>,
}

/// What an app client was made for: a change of any of it needs a new client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AppTarget {
    addr: SocketAddr,
    protocol: Protocol,
    connect_timeout: std::time::Duration,
}

/// The app client of each local HTTP-family service, with what it was made for.
type AppClients = BTreeMap<ServiceKey, (AppTarget, Arc<AppClient>)>;

/// Clients for the HTTP-family services of `config`, reusing those of `current` whose target
/// is unchanged.
fn app_clients(config: &Config, current: &AppClients) -> AppClients {
    (config.services.iter())
        .filter(|s| s.protocol.is_http())
        .map(|s| {
            let target = AppTarget {
                addr: s.address,
                protocol: s.protocol,
                connect_timeout: config.outbound.connect_timeout,
            };
            let client = match current.get(&s.key) {
                Some((t, client)) if *t == target => client.clone(),
                _ => Arc::new(AppClient::new(&target)),
            };
            (s.key.clone(), (target, client))
        })
        .collect()
}

impl AppClient {
    fn new(target: &AppTarget) -> AppClient {
        if matches!(target.protocol, Protocol::Http2 | Protocol::Grpc) {
            AppClient::Http2 {
                addr: target.addr,
                connect_timeout: target.connect_timeout,
                conn: tokio::sync::Mutex::new(None),
            }
        } else {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(target.connect_timeout));
            AppClient::Http1(Client::builder(TokioExecutor::new()).build(connector))
        }
    }
}

impl State {
    /// Clients for the HTTP-family services of `config`.
    pub fn new(config: &Config) -> Self {
        let apps = app_clients(config, &AppClients::new());
        Self {
            apps: Mutex::new(Arc::new(apps)),
        }
    }

    /// The client for the local service `key` and the app's address, as currently configured
    /// (a connection from a peer outlives reloads; each request goes where the config says now).
    pub fn app(&self, key: &ServiceKey) -> Option<(SocketAddr, Arc<AppClient>)> {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        apps.get(key).map(|(t, client)| (t.addr, client.clone()))
    }

    /// Follows a reloaded configuration: clients for new services, none for removed ones,
    /// and the same client (and its connections to the app) for a service whose app address,
    /// protocol and connect timeout did not change.
    pub fn reconfigure(&self, config: &Config) {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        *apps = Arc::new(app_clients(config, &apps));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_is_bounded_to_grpc_codes() {
        for (value, want) in [
            (Some("0"), Some(0)),
            (Some("14"), Some(14)),
            (Some("16"), Some(16)),
            (Some("17"), Some(GRPC_UNKNOWN)),
            (Some("4294967295"), Some(GRPC_UNKNOWN)),
            (Some("99999999999"), Some(GRPC_UNKNOWN)),
            (Some("-1"), Some(GRPC_UNKNOWN)),
            (Some("ok"), Some(GRPC_UNKNOWN)),
            (None, None),
        ] {
            let mut h = HeaderMap::new();
            if let Some(v) = value {
                h.insert(GRPC_STATUS, HeaderValue::from_static(v));
            }
            assert_eq!(grpc_status(&h), want, "{value:?}");
        }
    }

    #[test]
    fn hop_by_hop_headers_do_not_cross() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers, deflate"),
            ("x-kept", "yes"),
            ("content-type", "application/grpc"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ("content-type".to_owned(), "application/grpc".to_owned()),
                ("te".to_owned(), "trailers".to_owned()),
                ("x-kept".to_owned(), "yes".to_owned()),
            ]
        );

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "te without trailers is dropped");
    }

    #[test]
    fn mesh_responses_name_the_hop() {
        let r = mesh_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbound",
            "no_endpoints",
            "no endpoint\n".into(),
        );
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[ERROR_HEADER], "outbound/no_endpoints");
    }

    #[test]
    fn only_the_mesh_writes_its_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            (
                "x-forwarded-client-cert",
                "By=x;URI=spiffe://t/ns/a/svc/admin",
            ),
            ("x-mesh-error", "inbound/denied"),
            ("X-Mesh-Anything", "1"),
            ("x-meshy", "kept: not the mesh's prefix"),
            ("x-app", "kept"),
        ] {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        strip_mesh_owned(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-app", "x-meshy"]);
    }

    #[test]
    fn paths_are_rewritten_in_place_and_queries_kept() {
        let opts = mesh_api::path::Options::default();
        let req = |uri: &str| http::Request::builder().uri(uri).body(()).unwrap();
        #[rustfmt::skip]
        let cases: &[(&str, Result<&str, mesh_api::path::Rejected>)] = &[
            ("/a//b/../c?x=%2F..&y", Ok("/a/c?x=%2F..&y")),
            ("http://api.mesh/./%61dmin", Ok("http://api.mesh/admin")),
            ("/normal?q", Ok("/normal?q")),
            ("/a%2Fb", Err(mesh_api::path::Rejected::EscapedSlash)),
            // Authority form (CONNECT) has no path.
            ("api.mesh:443", Ok("api.mesh:443")),
        ];
        for (uri, want) in cases {
            let mut r = req(uri);
            let got = normalize_path(&mut r, opts).map(|()| r.uri().to_string());
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{uri}");
        }
    }
}
