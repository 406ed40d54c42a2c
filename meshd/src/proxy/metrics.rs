//! Proxy metrics: connections, bytes, handshakes, rejections by reason, authorization
//! decisions, requests (count, duration, retries), ejections and rate-limited requests.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::{Arc, RwLock};

use mesh_api::ServiceKey;
use mesh_api::policy::ResourceKey;
use mesh_api::policy::authz::Decision;

/// Which side of the proxy.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Connections arriving from other hosts over mTLS.
    Inbound,
    /// Connections from local apps to upstreams.
    Outbound,
}

/// Bytes flow relative to the proxy's peer.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Flow {
    /// Bytes sent towards the destination service.
    ToService,
    /// Bytes returned to the caller.
    ToCaller,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(
            &match self {
                Self::Inbound => "inbound",
                Self::Outbound => "outbound",
            },
            e,
        )
    }
}

impl EncodeLabelValue for Flow {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(
            &match self {
                Self::ToService => "to_service",
                Self::ToCaller => "to_caller",
            },
            e,
        )
    }
}

/// `direction` + `service` (the local service for inbound, the upstream for outbound).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// Side of the proxy.
    pub direction: Direction,
    /// `namespace/name`.
    pub service: String,
}

/// Byte counter labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// Side of the proxy.
    pub direction: Direction,
    /// `namespace/name`.
    pub service: String,
    /// Which way the bytes went.
    pub flow: Flow,
}

/// Labels with a bounded reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Side of the proxy.
    pub direction: Direction,
    /// Bounded reason (`not_tls`, `no_client_cert`, `cert_expired`, ...).
    pub reason: &'static str,
}

/// Labels of `meshd_authz_decisions_total`; bounded: services and policies come from config.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// The local service called, `namespace/name`.
    pub service: String,
    /// `allow`, `deny` or `audit`.
    pub decision: &'static str,
    /// `allow_policy`, `default_allow`, `deny_policy`, `no_allow_match`, `default_deny`,
    /// `mtls_required`, `policy_changed` or `audit_policy`.
    pub reason: &'static str,
    /// The deciding policy (`Kind/ns/name`), empty for a default.
    pub policy: String,
}

/// Labels of the active-connection gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// Side of the proxy.
    pub direction: Direction,
}

/// Labels of the handshake counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// Side of the proxy.
    pub direction: Direction,
    /// `full` or `resumed` (TLS 1.3 session resumption skips certificate verification).
    pub kind: &'static str,
}

/// Labels of `meshd_requests_total`: bounded (services and routes come from config and policy,
/// codes from a small set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Side of the proxy.
    pub direction: Direction,
    /// The calling service (`namespace/name`), or `external` for plaintext callers.
    pub source: String,
    /// The called service.
    pub destination: String,
    /// The matching Route entry (empty: none).
    pub route: String,
    /// HTTP status returned to the caller.
    pub code: u16,
    /// `grpc-status` of a gRPC answer, empty otherwise.
    pub grpc_status: String,
}

/// Labels of `meshd_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    /// Side of the proxy.
    pub direction: Direction,
    /// Caller.
    pub source: String,
    /// Callee.
    pub destination: String,
    /// Route entry.
    pub route: String,
    /// `2xx`, `4xx`, `5xx`, ...
    pub class: &'static str,
}

/// Labels of the per-edge counters (retries).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabels {
    /// Caller.
    pub source: String,
    /// Callee.
    pub destination: String,
    /// Route entry.
    pub route: String,
}

/// Labels of traffic sent to another site.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    /// Callee, `namespace/name`.
    pub destination: String,
    /// The site its instance is in.
    pub site: String,
}

/// Labels naming one service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OneService {
    /// `namespace/name`.
    pub service: String,
}

/// Request duration buckets (seconds): 1 ms to 10 s, the same bounds as the edge reports.
fn duration_histogram() -> Histogram {
    Histogram::new(
        mesh_api::observe::LATENCY_BOUNDS_MS
            .iter()
            .map(|ms| *ms as f64 / 1000.0),
    )
}

/// The labels of one HTTP request, borrowed from the hop that served it.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// Side of the proxy.
    pub direction: Direction,
    /// The calling service; `None` for a plaintext caller.
    pub source: Option<&'a ServiceKey>,
    /// The called service.
    pub destination: &'a ServiceKey,
    /// The matching Route entry (empty: none).
    pub route: &'a str,
    /// HTTP status returned to the caller.
    pub code: u16,
    /// `grpc-status` of a gRPC answer.
    pub grpc_status: Option<u32>,
}

impl HttpRequest<'_> {
    fn source_name(&self) -> String {
        self.source.map_or_else(
            || mesh_api::observe::EXTERNAL.to_owned(),
            ToString::to_string,
        )
    }

    fn to_key(self) -> SeriesKey {
        SeriesKey {
            direction: self.direction,
            source: self.source.cloned(),
            destination: self.destination.clone(),
            route: self.route.to_owned(),
            code: self.code,
            grpc_status: self.grpc_status,
        }
    }
}

/// [`HttpRequest`] owned: the key of the series cache.
#[derive(Debug, PartialEq, Eq)]
struct SeriesKey {
    direction: Direction,
    source: Option<ServiceKey>,
    destination: ServiceKey,
    route: String,
    code: u16,
    grpc_status: Option<u32>,
}

// Both forms hash the same tuple, so a borrowed request finds its owned key.
impl std::hash::Hash for SeriesKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let key = (self.direction, self.source.as_ref(), &self.destination);
        (key, self.route.as_str(), self.code, self.grpc_status).hash(h);
    }
}

impl std::hash::Hash for HttpRequest<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let key = (self.direction, self.source, self.destination);
        (key, self.route, self.code, self.grpc_status).hash(h);
    }
}

impl hashbrown::Equivalent<SeriesKey> for HttpRequest<'_> {
    fn equivalent(&self, k: &SeriesKey) -> bool {
        self.direction == k.direction
            && self.source == k.source.as_ref()
            && *self.destination == k.destination
            && self.route == k.route
            && self.code == k.code
            && self.grpc_status == k.grpc_status
    }
}

/// The labels of one authorization decision, borrowed: the key of the decision cache.
#[derive(Debug, Clone, Copy, Hash)]
struct DecisionRef<'a> {
    service: &'a ServiceKey,
    decision: &'static str,
    reason: &'static str,
    policy: Option<&'a ResourceKey>,
}

/// [`DecisionRef`] owned.
#[derive(Debug, PartialEq, Eq)]
struct DecisionKey {
    service: ServiceKey,
    decision: &'static str,
    reason: &'static str,
    policy: Option<ResourceKey>,
}

// Both forms hash the same fields in the same order (derived `Hash` of `DecisionRef`).
impl std::hash::Hash for DecisionKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        DecisionRef {
            service: &self.service,
            decision: self.decision,
            reason: self.reason,
            policy: self.policy.as_ref(),
        }
        .hash(h);
    }
}

impl hashbrown::Equivalent<DecisionKey> for DecisionRef<'_> {
    fn equivalent(&self, k: &DecisionKey) -> bool {
        *self.service == k.service
            && self.decision == k.decision
            && self.reason == k.reason
            && self.policy == k.policy.as_ref()
    }
}

/// One label set's request counter and duration histogram (handles into the families).
#[derive(Debug, Clone)]
struct HttpSeries {
    requests: Counter,
    duration: Histogram,
}

/// Series kept in the cache at most; beyond it requests are still counted, through the
/// families' own (allocating) lookups.
const MAX_CACHED_SERIES: usize = 4096;

/// All proxy metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `meshd_connections_total{direction,service}`: connections proxied (after handshake).
    pub connections: Family<ServiceLabels, Counter>,
    /// `meshd_connections_active{direction}`.
    pub active: Family<DirectionLabels, Gauge>,
    /// `meshd_bytes_total{direction,service,flow}`.
    pub bytes: Family<BytesLabels, Counter>,
    /// `meshd_tls_handshakes_total{direction,kind}` (successful; kind = full | resumed).
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// `meshd_tls_handshake_duration_seconds`.
    pub handshake_duration: Histogram,
    /// `meshd_rejected_connections_total{direction,reason}`: refused or failed connections.
    pub rejected: Family<ReasonLabels, Counter>,
    /// `meshd_authz_decisions_total{service,decision,reason,policy}`: inbound authorization
    /// decisions; an AUDIT match is counted as `audit` besides the allow or deny.
    pub authz_decisions: Family<DecisionLabels, Counter>,
    /// `meshd_plaintext_connections_total{direction,service}`: plaintext connections accepted
    /// on a service's `listen` address under PERMISSIVE; what is left to migrate before STRICT.
    pub plaintext: Family<ServiceLabels, Counter>,
    /// `meshd_requests_total{direction,source,destination,route,code,grpc_status}`: HTTP
    /// requests, by the status returned to the caller (meshd's own errors included).
    pub requests: Family<RequestLabels, Counter>,
    /// `meshd_request_duration_seconds{direction,source,destination,route,class}`.
    pub request_duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
    /// `meshd_retries_total{source,destination,route}`: requests sent again (outbound).
    pub retries: Family<EdgeLabels, Counter>,
    /// `meshd_outlier_ejections_total{service}`: endpoints of an upstream ejected.
    pub ejections: Family<OneService, Counter>,
    /// `meshd_rate_limited_total{service}`: requests refused with 429 (inbound).
    pub rate_limited: Family<OneService, Counter>,
    /// `meshd_endpoint_failovers_total{service}`: connects that failed and were tried again
    /// on another endpoint of the upstream (the app saw nothing).
    pub failovers: Family<OneService, Counter>,
    /// `meshd_unreachable_endpoints_total{service}`: endpoints skipped after a refused or
    /// timed-out connect.
    pub unreachable: Family<OneService, Counter>,
    /// `meshd_east_west_connections_total{service}`: connections from other sites this east-west
    /// gateway passed on (refusals are `rejected` with an `east_west_*` reason).
    pub east_west: Family<OneService, Counter>,
    /// `meshd_cross_site_total{destination,site}`: requests (HTTP) and connections (TCP) this
    /// node sent to an instance in another site, through that site's east-west gateway.
    pub cross_site: Family<SiteLabels, Counter>,
    /// `meshd_requests_resent_total{service}`: requests sent again on another connection
    /// because theirs failed before an answer (the app saw nothing).
    pub resent: Family<OneService, Counter>,
    /// `requests` and `request_duration` handles by label set, so a request's labels are
    /// not rebuilt as strings to count it.
    http_series: Arc<RwLock<hashbrown::HashMap<SeriesKey, HttpSeries>>>,
    /// `authz_decisions` handles by label set (every request is authorized).
    decision_series: Arc<RwLock<hashbrown::HashMap<DecisionKey, Counter>>>,
}

impl Metrics {
    /// Registers the proxy metrics.
    pub fn new(reg: &mut Registry) -> Self {
        let m = Self {
            connections: Family::default(),
            active: Family::default(),
            bytes: Family::default(),
            handshakes: Family::default(),
            handshake_duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            rejected: Family::default(),
            authz_decisions: Family::default(),
            plaintext: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            retries: Family::default(),
            ejections: Family::default(),
            rate_limited: Family::default(),
            failovers: Family::default(),
            unreachable: Family::default(),
            east_west: Family::default(),
            cross_site: Family::default(),
            resent: Family::default(),
            http_series: Arc::default(),
            decision_series: Arc::default(),
        };
        m.zero_series();
        m.register(reg);
        m
    }

    /// Series that exist from the first scrape at zero, so `increase()` and "is it zero?" have
    /// an answer before the first event: every handshake kind and every TLS failure reason, for
    /// both directions.
    fn zero_series(&self) {
        for direction in [Direction::Inbound, Direction::Outbound] {
            for kind in ["full", "resumed"] {
                let _ = self
                    .handshakes
                    .get_or_create(&HandshakeLabels { direction, kind });
            }
            for reason in crate::proxy::tls::FAILURE_REASONS {
                let _ = self
                    .rejected
                    .get_or_create(&ReasonLabels { direction, reason });
            }
        }
    }

    fn register(&self, reg: &mut Registry) {
        reg.register(
            "meshd_connections",
            "Connections proxied, by direction and service",
            self.connections.clone(),
        );
        reg.register(
            "meshd_connections_active",
            "Connections open now",
            self.active.clone(),
        );
        reg.register(
            "meshd_bytes",
            "Bytes proxied, by direction, service and flow",
            self.bytes.clone(),
        );
        reg.register(
            "meshd_tls_handshakes",
            "Successful mTLS handshakes",
            self.handshakes.clone(),
        );
        reg.register(
            "meshd_tls_handshake_duration_seconds",
            "Duration of mTLS handshakes",
            self.handshake_duration.clone(),
        );
        reg.register(
            "meshd_rejected_connections",
            "Connections refused or failed, by direction and reason",
            self.rejected.clone(),
        );
        reg.register(
            "meshd_authz_decisions",
            "Inbound authorization decisions, by service, decision, reason and policy",
            self.authz_decisions.clone(),
        );
        reg.register(
            "meshd_plaintext_connections",
            "Plaintext connections accepted under PERMISSIVE mTLS, by service",
            self.plaintext.clone(),
        );
        reg.register(
            "meshd_requests",
            "HTTP requests, by direction, source and destination service, route, status and gRPC status",
            self.requests.clone(),
        );
        reg.register(
            "meshd_request_duration_seconds",
            "Time from a request's arrival to its response headers, by direction, source, destination, route and class",
            self.request_duration.clone(),
        );
        reg.register(
            "meshd_retries",
            "Requests sent again by an outbound retry policy",
            self.retries.clone(),
        );
        reg.register(
            "meshd_outlier_ejections",
            "Endpoints ejected by outlier detection, by upstream service",
            self.ejections.clone(),
        );
        reg.register(
            "meshd_rate_limited",
            "Requests refused by a RateLimit (429), by local service",
            self.rate_limited.clone(),
        );
        reg.register(
            "meshd_endpoint_failovers",
            "Failed connects tried again at once on another endpoint, by upstream service",
            self.failovers.clone(),
        );
        reg.register(
            "meshd_unreachable_endpoints",
            "Endpoints skipped after a refused or timed-out connect, by upstream service",
            self.unreachable.clone(),
        );
        reg.register(
            "meshd_east_west_connections",
            "Connections from other sites an east-west gateway passed on, by service",
            self.east_west.clone(),
        );
        reg.register(
            "meshd_cross_site",
            "Requests (HTTP) and connections (TCP) sent to another site's instances, by destination and site",
            self.cross_site.clone(),
        );
        reg.register(
            "meshd_requests_resent",
            "Requests sent again on another connection because theirs failed before an answer, by upstream service",
            self.resent.clone(),
        );
    }

    /// Counts one HTTP request: its status, duration and retries. `source` `None` is a
    /// plaintext caller (`external`).
    pub fn record_http(&self, req: &HttpRequest<'_>, elapsed: std::time::Duration, retries: u32) {
        let series = self.http_series(req);
        series.requests.inc();
        series.duration.observe(elapsed.as_secs_f64());
        if retries > 0 {
            self.retries
                .get_or_create(&EdgeLabels {
                    source: req.source_name(),
                    destination: req.destination.to_string(),
                    route: req.route.to_owned(),
                })
                .inc_by(u64::from(retries));
        }
    }

    /// The counter and histogram of `req`'s labels: looked up without allocating once the
    /// series exists (every request but the first of its kind); the label strings are built
    /// only to create it.
    fn http_series(&self, req: &HttpRequest<'_>) -> HttpSeries {
        if let Some(s) = (self.http_series.read())
            .unwrap_or_else(|e| e.into_inner())
            .get(req)
        {
            return s.clone();
        }
        let (source, destination) = (req.source_name(), req.destination.to_string());
        let series = HttpSeries {
            requests: (self.requests)
                .get_or_create(&RequestLabels {
                    direction: req.direction,
                    source: source.clone(),
                    destination: destination.clone(),
                    route: req.route.to_owned(),
                    code: req.code,
                    grpc_status: req.grpc_status.map(|g| g.to_string()).unwrap_or_default(),
                })
                .clone(),
            duration: (self.request_duration)
                .get_or_create(&DurationLabels {
                    direction: req.direction,
                    source,
                    destination,
                    route: req.route.to_owned(),
                    class: class_of(req.code),
                })
                .clone(),
        };
        let mut map = self.http_series.write().unwrap_or_else(|e| e.into_inner());
        // Label sets come from config, policy and a bounded set of codes; the bound only
        // guards memory against something unforeseen (the families themselves are unbounded).
        if map.len() < MAX_CACHED_SERIES {
            map.insert(req.to_key(), series.clone());
        }
        series
    }

    /// Counts a failed connect to `service` tried again on another endpoint.
    pub fn failover(&self, service: &str) {
        self.failovers
            .get_or_create(&OneService {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Counts one request or connection to `destination`'s instance in `site`, another site.
    pub fn cross_site(&self, destination: &str, site: &str) {
        self.cross_site
            .get_or_create(&SiteLabels {
                destination: destination.to_owned(),
                site: site.to_owned(),
            })
            .inc();
    }

    /// Counts an endpoint of `service` skipped as unreachable.
    pub fn unreachable(&self, service: &str) {
        self.unreachable
            .get_or_create(&OneService {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Counts a request to `service` sent again after its connection failed.
    pub fn resent(&self, service: &str) {
        self.resent
            .get_or_create(&OneService {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Counts an ejected endpoint of `service`.
    pub fn ejected(&self, service: &str) {
        self.ejections
            .get_or_create(&OneService {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Counts a request of local `service` refused by a rate limit.
    pub fn limited(&self, service: &str) {
        self.rate_limited
            .get_or_create(&OneService {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Counts an authorization decision for `service`, and one `audit` per AUDIT policy that
    /// matched; `revoked` when a policy change closes an open connection.
    pub fn record_decision(&self, service: &ServiceKey, d: &Decision, revoked: bool) {
        let (decision, reason) = super::authz::labels(d, revoked);
        let key = DecisionRef {
            service,
            decision,
            reason,
            policy: match d {
                Decision::Allow { policy, .. } | Decision::Deny { policy, .. } => policy.as_ref(),
            },
        };
        self.decision_series(&key).inc();
        // A revocation re-evaluates a connection already counted; its audits were counted then.
        for key in d.audit().iter().filter(|_| !revoked) {
            self.authz_decisions
                .get_or_create(&DecisionLabels {
                    service: service.to_string(),
                    decision: "audit",
                    reason: super::authz::REASON_AUDIT_POLICY,
                    policy: key.to_string(),
                })
                .inc();
        }
    }

    /// The decision counter of `key`'s labels, found without allocating once it exists (as
    /// [`Metrics::http_series`]).
    fn decision_series(&self, key: &DecisionRef<'_>) -> Counter {
        if let Some(c) = (self.decision_series.read())
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            return c.clone();
        }
        let counter = (self.authz_decisions)
            .get_or_create(&DecisionLabels {
                service: key.service.to_string(),
                decision: key.decision,
                reason: key.reason,
                policy: key.policy.map(ToString::to_string).unwrap_or_default(),
            })
            .clone();
        let mut map = self
            .decision_series
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if map.len() < MAX_CACHED_SERIES {
            map.insert(
                DecisionKey {
                    service: key.service.clone(),
                    decision: key.decision,
                    reason: key.reason,
                    policy: key.policy.cloned(),
                },
                counter.clone(),
            );
        }
        counter
    }

    /// Counts a refused or failed connection.
    pub fn reject(&self, direction: Direction, reason: &'static str) {
        self.rejected
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    /// Counts a completed handshake of `conn`.
    pub fn handshake(&self, direction: Direction, conn: &rustls::CommonState) {
        let kind = match conn.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            _ => "full",
        };
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, kind })
            .inc();
    }

    /// Records the bytes of a finished connection.
    pub fn record_bytes(
        &self,
        direction: Direction,
        service: &str,
        to_service: u64,
        to_caller: u64,
    ) {
        let labels = |flow| BytesLabels {
            direction,
            service: service.to_owned(),
            flow,
        };
        self.bytes
            .get_or_create(&labels(Flow::ToService))
            .inc_by(to_service);
        self.bytes
            .get_or_create(&labels(Flow::ToCaller))
            .inc_by(to_caller);
    }
}

/// Holds one active-connection slot; decrements the gauge when dropped.
pub struct ActiveGuard(Gauge);

impl ActiveGuard {
    /// Increments the gauge for `direction`.
    pub fn new(m: &Metrics, direction: Direction) -> Self {
        let g = m
            .active
            .get_or_create(&DirectionLabels { direction })
            .clone();
        g.inc();
        Self(g)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The response class of a status, for the duration histogram (`2xx` .. `5xx`).
pub fn class_of(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        for (s, c) in [
            (101, "1xx"),
            (200, "2xx"),
            (304, "3xx"),
            (429, "4xx"),
            (503, "5xx"),
            (0, "5xx"),
        ] {
            assert_eq!(class_of(s), c);
        }
    }
}
