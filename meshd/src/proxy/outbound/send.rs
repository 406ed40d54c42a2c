//! Sending one HTTP request to a destination: the Route's retries (within the budget, with
//! backoff and per-try timeouts), resends after a connection failure that the request cannot
//! have been affected by, and each attempt's connection — pooled, or dialled on the endpoint
//! path, stepping over endpoints that cannot be reached.

// `Err` is the mesh's HTTP answer itself, returned at most once per request: boxing it would
// add an allocation to every error path and save nothing.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::Uri;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::client::conn::http2::SendRequest;
use mesh_api::ServiceKey;
use mesh_api::policy::{HeaderOps, Retries};
use rustls_pki_types::ServerName;
use tracing::{debug, warn};

use super::super::compiled::Destination;
use super::super::connect::{self, Error};
use super::super::http::replay::ReplayBody;
use super::super::http::{Body, empty, mesh_response, strip_hop_by_hop};
use super::super::metrics::Direction;
use super::super::pool::{self, Miss};
use super::super::retry::{self, Attempt};
use super::super::shared::Shared;
use super::super::{balance, endpoints};

/// Where and how one request is sent, decided from the Route and DestinationPolicy.
pub struct Plan {
    /// Endpoints must carry these labels (the chosen subset's).
    pub subset: Option<BTreeMap<String, String>>,
    /// The destination as compiled: policy, route, endpoints, breaker, budget.
    pub dst: Arc<Destination>,
    /// The matched Route entry's retries.
    pub retries: Option<Retries>,
    /// The matched Route entry's timeout for the whole request.
    pub timeout: Option<Duration>,
    /// Edits of the response headers.
    pub response_headers: Option<HeaderOps>,
}

/// Admits one request to `plan`'s destination past its circuit breaker (requests in flight to
/// it from this host, `max_pending_requests`); `Err` is the 503 `hop` answers, counted.
pub fn admit(
    shared: &Shared,
    plan: &Plan,
    hop: &str,
) -> Result<super::super::breaker::Admitted, Response<Body>> {
    let max = (plan.dst.policy.as_ref())
        .and_then(|p| p.circuit_breaker.as_ref())
        .and_then(|c| c.max_pending_requests);
    plan.dst.breaker.admit(max).ok_or_else(|| {
        shared.metrics.reject(Direction::Outbound, "overflow");
        let (dst, max) = (&plan.dst.service, max.unwrap_or_default());
        mesh_response(
            StatusCode::SERVICE_UNAVAILABLE,
            hop,
            "overflow",
            format!("{dst}: circuit breaker open (max_pending_requests {max})\n"),
        )
    })
}

/// Who sends: the node's state, the calling service and its listener's round-robin cursor.
pub struct Caller<'a> {
    /// The node's shared state.
    pub shared: &'a Shared,
    /// The calling service.
    pub source: &'a ServiceKey,
    /// Round-robin position of the listener.
    pub cursor: &'a AtomicUsize,
}

/// What the access log says about how a request was sent.
#[derive(Default)]
pub struct Log {
    /// The endpoint of the last attempt.
    pub endpoint: Option<SocketAddr>,
    /// Its site when that is another one (the edge crossed to it).
    pub site: Option<String>,
    /// The Route entry (name or `route[index]`).
    pub route: String,
    /// The subset the Route chose.
    pub subset: String,
    /// Attempts made (1 without retries).
    pub attempts: u32,
}

impl Log {
    /// The last attempt ended at `plan.dst.targets[index]` (`None`: it reached no endpoint).
    fn ended_at(&mut self, plan: &Plan, index: Option<usize>) {
        let ep = index
            .and_then(|i| plan.dst.targets.get(i))
            .map(|t| &t.endpoint);
        self.endpoint = ep.map(|e| e.addr);
        self.site = ep.filter(|e| e.sni.is_some()).map(|e| e.site.clone());
    }
}

/// How many times one attempt sends a request again because its connection failed before the
/// request was written, or (idempotent requests without a body) before a response came; each
/// time on a fresh pick of connection and endpoint. Independent of Route retries.
const MAX_RESENDS: u32 = 2;

/// The result of one attempt: the response, or how it failed and the mesh's answer.
type Tried = Result<Response<Body>, (Attempt, Response<Body>)>;

/// Sends the request (`parts` with `body`) under `plan`, within the Route's timeout; `Err` is
/// the mesh's own error response.
pub async fn send(
    caller: &Caller<'_>,
    plan: &Plan,
    parts: http::request::Parts,
    body: Body,
    log: &mut Log,
) -> Result<Response<Body>, Response<Body>> {
    let attempts = async {
        match plan.retries.as_ref().filter(|r| r.attempts > 0) {
            None => {
                log.attempts = 1;
                let (r, index) = attempt(caller, plan, Request::from_parts(parts, body)).await;
                log.ended_at(plan, index);
                r.map_err(|(_, resp)| resp)
            }
            Some(retries) => with_retries(caller, plan, retries, &parts, body, log).await,
        }
    };
    let Some(t) = plan.timeout else {
        return attempts.await;
    };
    tokio::time::timeout(t, attempts).await.unwrap_or_else(|_| {
        Err(mesh_response(
            StatusCode::GATEWAY_TIMEOUT,
            "outbound",
            "timeout",
            format!(
                "{}: no response within the route timeout of {t:?}\n",
                plan.dst.service
            ),
        ))
    })
}

/// Attempts until one is not retriable, the attempts or the budget run out, or the body can
/// no longer be replayed.
async fn with_retries(
    caller: &Caller<'_>,
    plan: &Plan,
    retries: &Retries,
    parts: &http::request::Parts,
    body: Body,
    log: &mut Log,
) -> Result<Response<Body>, Response<Body>> {
    // The budget is a share of the requests that may be retried.
    plan.dst.budget.request(tokio::time::Instant::now());
    let original = ReplayBody::new(body);
    let mut n = 0;
    loop {
        n += 1;
        log.attempts = n;
        let Some(body) = original.try_clone() else {
            // Not reached: the first clone always exists, and a retry is only planned while
            // the body can still be replayed.
            return Err(mesh_response(
                StatusCode::BAD_GATEWAY,
                "outbound",
                "retry_body_overflow",
                "the request body is too large to retry\n".into(),
            ));
        };
        let req = clone_request(parts, body.boxed());
        let (result, index) = attempt_within(caller, plan, retries.per_try_timeout, req).await;
        log.ended_at(plan, index);
        let outcome = match &result {
            Ok(resp) => retry::response_attempt(resp.status().as_u16(), resp.headers()),
            Err((a, _)) => *a,
        };
        let again = n <= retries.attempts
            && retry::is_retriable(retries, outcome)
            && original.try_clone().is_some()
            && (plan.dst.budget).retry(retries.budget_percent, tokio::time::Instant::now());
        if !again {
            return result.map_err(|(_, resp)| resp);
        }
        debug!(dst.service = %plan.dst.service, attempt = n, ?outcome, "retrying");
        tokio::time::sleep(retry::backoff(n, rand::random::<f64>())).await;
    }
}

/// One attempt, bounded by the per-try timeout if there is one.
async fn attempt_within(
    caller: &Caller<'_>,
    plan: &Plan,
    per_try: Option<Duration>,
    req: Request<Body>,
) -> (Tried, Option<usize>) {
    let Some(t) = per_try else {
        return attempt(caller, plan, req).await;
    };
    match tokio::time::timeout(t, attempt(caller, plan, req)).await {
        Ok(r) => r,
        Err(_) => {
            let dst = &plan.dst.service;
            let resp = mesh_response(
                StatusCode::GATEWAY_TIMEOUT,
                "outbound",
                "per_try_timeout",
                format!("{dst}: no response within {t:?}\n"),
            );
            (Err((Attempt::Reset, resp)), None)
        }
    }
}

/// The head of a request or of its parts.
pub trait Head {
    /// The method.
    fn method(&self) -> &http::Method;
    /// The target.
    fn uri(&self) -> &Uri;
    /// The version.
    fn version(&self) -> http::Version;
    /// The headers.
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
pub fn clone_request(head: &impl Head, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method().clone();
    *req.uri_mut() = head.uri().clone();
    *req.version_mut() = head.version();
    *req.headers_mut() = head.headers().clone();
    req
}

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

/// One attempt: a connection to an endpoint (pooled or new), the request on it, sent again on
/// another connection if the first failed before the request can have had an effect. Feeds
/// the endpoint's latency and outlier state. With the index of the target it ended at.
async fn attempt(caller: &Caller<'_>, plan: &Plan, req: Request<Body>) -> (Tried, Option<usize>) {
    if let Some(client) = &plan.dst.direct {
        return (
            super::external::attempt(caller.shared, client, req).await,
            None,
        );
    }
    // An idempotent request without a body may be sent again after its connection failed
    // under it (RFC 9110 §9.2.2): a host killed mid-request costs no error. Keep its head.
    let idempotent = is_idempotent(req.method()) && hyper::body::Body::is_end_stream(req.body());
    let head = idempotent.then(|| clone_request(&req, empty()));
    let mut req = req;
    let mut resends = 0;
    let (result, index) = loop {
        let (mut sender, index) = match connection(caller, plan).await {
            Ok(c) => c,
            Err(failed) => return (Err(failed), None),
        };
        let target = &plan.dst.targets[index];
        let _in_flight = target.state.stats.start();
        let started = tokio::time::Instant::now();
        let e = match sender.try_send_request(req).await {
            Ok(resp) => {
                let now = tokio::time::Instant::now();
                target.state.stats.observe(now - started, now);
                break (Ok(resp), index);
            }
            Err(e) => e,
        };
        match resend(caller, plan, index, e, head.as_ref(), &mut resends) {
            Ok(next) => req = next,
            Err(e) => break (Err(e), index),
        }
    };
    let outcome = match &result {
        Ok(r) if r.status().is_server_error() => balance::Outcome::Status5xx(r.status().as_u16()),
        Ok(_) => balance::Outcome::Success,
        Err(_) => balance::Outcome::ConnectFailure,
    };
    let now = tokio::time::Instant::now();
    connect::record(caller.shared, &plan.dst, index, outcome, now);
    let addr = plan.dst.targets[index].endpoint.addr;
    (finish(caller, plan, addr, result), Some(index))
}

/// After a failed send on `plan.dst.targets[index]`: the request to send again on another
/// connection, or the error that ends the attempt.
fn resend(
    caller: &Caller<'_>,
    plan: &Plan,
    index: usize,
    mut e: hyper::client::conn::TrySendError<Request<Body>>,
    head: Option<&Request<Body>>,
    resends: &mut u32,
) -> Result<Request<Body>, hyper::Error> {
    let addr = plan.dst.targets[index].endpoint.addr;
    let next = match e.take_message() {
        // The connection died before the request left (a pooled connection to a host that
        // just went away): nothing reached the peer, so sending it again on another
        // connection is safe whatever the method, and needs no retry policy.
        Some(unsent) if *resends < MAX_RESENDS => {
            debug!(dst.addr = %addr, error = %e.error(), "connection closed before the request was sent; sending it on another");
            unsent
        }
        None if *resends < MAX_RESENDS
            && let Some(head) = head
            && !e.error().is_user() =>
        {
            debug!(dst.addr = %addr, error = %e.error(), "idempotent request failed with its connection; sending it again");
            clone_request(head, empty())
        }
        _ => return Err(e.into_error()),
    };
    *resends += 1;
    (caller.shared.metrics).resent(&plan.dst.service.to_string());
    let key = (caller.source.clone(), plan.dst.service.clone(), addr);
    caller.shared.pool.forget(&key);
    let now = tokio::time::Instant::now();
    let failure = balance::Outcome::ConnectFailure;
    connect::record(caller.shared, &plan.dst, index, failure, now);
    Ok(next)
}

/// The response with hop-by-hop headers removed, or the 502 for a request that failed.
fn finish(
    caller: &Caller<'_>,
    plan: &Plan,
    addr: SocketAddr,
    result: Result<Response<hyper::body::Incoming>, hyper::Error>,
) -> Tried {
    match result {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Err(e) => {
            let dst = &plan.dst.service;
            (caller.shared.metrics).reject(Direction::Outbound, "upstream_reset");
            warn!(src.service = %caller.source, dst.service = %dst, dst.addr = %addr, error = %e, "request to the upstream failed");
            let resp = mesh_response(
                StatusCode::BAD_GATEWAY,
                "outbound",
                "upstream_reset",
                format!("{dst} at {addr}: {e}\n"),
            );
            Err((Attempt::Reset, resp))
        }
    }
}

/// A ready HTTP/2 connection to an endpoint of the destination, pooled or made now (trying up
/// to [`endpoints::MAX_CONNECT_ATTEMPTS`] endpoints), with the endpoint's index.
async fn connection(
    caller: &Caller<'_>,
    plan: &Plan,
) -> Result<(SendRequest<Body>, usize), (Attempt, Response<Body>)> {
    let shared = caller.shared;
    let tls = shared.tls_rx.borrow().clone();
    let Some(client) = tls.clients.get(caller.source).cloned() else {
        return Err(refused(
            shared,
            Error::NoCertificate(caller.source.to_string()),
        ));
    };
    let cursor = caller.cursor.fetch_add(1, Ordering::Relaxed);
    let (dst, subset) = (&plan.dst, plan.subset.as_ref());
    let order = connect::order(
        shared,
        dst,
        subset,
        endpoints::DEFAULT_HTTP_LOAD_BALANCER,
        cursor,
    );
    if order.is_empty() {
        let e = Error::NoEndpoints(dst.service.to_string());
        warn!(src.service = %caller.source, dst.service = %dst.service, reason = e.reason(), "no endpoint for the request");
        return Err(refused(shared, e));
    }
    let max_requests = (dst.policy.as_ref())
        .and_then(|p| p.circuit_breaker.as_ref())
        .and_then(|c| c.max_requests_per_connection);
    let name = ServerName::try_from(dst.sni.clone()).expect("mesh server names are DNS names");
    let mut last = None;
    for (n, &i) in order.iter().enumerate() {
        let target = &dst.targets[i];
        let key: pool::Key = (
            caller.source.clone(),
            dst.service.clone(),
            target.endpoint.addr,
        );
        let dial = || {
            let name = connect::server_name(dst, i, &name);
            connect::attempt(shared, &client, true, name, target.endpoint.addr)
        };
        match shared
            .pool
            .checkout(shared, &key, &tls, max_requests, dial)
            .await
        {
            Ok(sender) => {
                target.state.reachability.connected();
                connect::crossed(&shared.metrics, dst, i);
                return Ok((sender, i));
            }
            Err(Miss::Dial(e)) => {
                connect::failed(shared, dst, i, &e, n + 1 < order.len());
                let retry = e.is_retryable();
                last = Some(e);
                if !retry {
                    break;
                }
            }
            Err(Miss::PeerFailed | Miss::Handshake) => {}
        }
    }
    Err(connect_failed(caller, &dst.service, last))
}

/// The mesh's answer when no endpoint could be connected to.
fn connect_failed(
    caller: &Caller<'_>,
    dst: &ServiceKey,
    last: Option<Error>,
) -> (Attempt, Response<Body>) {
    let (status, reason, text) = match &last {
        Some(e @ Error::Timeout { .. }) => (StatusCode::GATEWAY_TIMEOUT, e.reason(), e.to_string()),
        Some(e) => (StatusCode::BAD_GATEWAY, e.reason(), e.to_string()),
        None => (
            StatusCode::BAD_GATEWAY,
            "http2_handshake_failed",
            format!("no http/2 connection to {dst} could be made"),
        ),
    };
    warn!(src.service = %caller.source, dst.service = %dst, reason, error = %text, "outbound request failed");
    let resp = mesh_response(status, "outbound", reason, format!("{text}\n"));
    (Attempt::ConnectFailure, resp)
}

/// The 503 for a request refused before any endpoint was tried, counted.
fn refused(shared: &Shared, e: Error) -> (Attempt, Response<Body>) {
    shared.metrics.reject(Direction::Outbound, e.reason());
    let resp = mesh_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "outbound",
        e.reason(),
        format!("{e}\n"),
    );
    (Attempt::ConnectFailure, resp)
}
