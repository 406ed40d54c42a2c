//! Proxy metrics: connections, bytes, handshakes, rejections by reason, authorization
//! decisions.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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

/// Labels of the HTTP request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Side of the proxy.
    pub direction: Direction,
    /// The local service (inbound) or the upstream (outbound), `namespace/name`.
    pub service: String,
    /// Response status code.
    pub status: u16,
}

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
    /// `meshd_http_requests_total{direction,service,status}`: requests of HTTP-family
    /// services, by the status returned to the caller (meshd's own errors included).
    pub requests: Family<RequestLabels, Counter>,
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
        };
        reg.register(
            "meshd_connections",
            "Connections proxied, by direction and service",
            m.connections.clone(),
        );
        reg.register(
            "meshd_connections_active",
            "Connections open now",
            m.active.clone(),
        );
        reg.register(
            "meshd_bytes",
            "Bytes proxied, by direction, service and flow",
            m.bytes.clone(),
        );
        reg.register(
            "meshd_tls_handshakes",
            "Successful mTLS handshakes",
            m.handshakes.clone(),
        );
        reg.register(
            "meshd_tls_handshake_duration_seconds",
            "Duration of mTLS handshakes",
            m.handshake_duration.clone(),
        );
        reg.register(
            "meshd_rejected_connections",
            "Connections refused or failed, by direction and reason",
            m.rejected.clone(),
        );
        reg.register(
            "meshd_authz_decisions",
            "Inbound authorization decisions, by service, decision, reason and policy",
            m.authz_decisions.clone(),
        );
        reg.register(
            "meshd_plaintext_connections",
            "Plaintext connections accepted under PERMISSIVE mTLS, by service",
            m.plaintext.clone(),
        );
        reg.register(
            "meshd_http_requests",
            "HTTP requests proxied, by direction, service and status",
            m.requests.clone(),
        );
        m
    }

    /// Counts one HTTP request and the status it got.
    pub fn record_request(&self, direction: Direction, service: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                service: service.to_owned(),
                status,
            })
            .inc();
    }

    /// Counts an authorization decision for `service`, and one `audit` per AUDIT policy that
    /// matched; `revoked` when a policy change closes an open connection.
    pub fn record_decision(
        &self,
        service: &str,
        d: &mesh_api::policy::authz::Decision,
        revoked: bool,
    ) {
        let (decision, reason) = super::authz::labels(d, revoked);
        self.authz_decisions
            .get_or_create(&DecisionLabels {
                service: service.to_owned(),
                decision,
                reason,
                policy: super::authz::policy_of(d),
            })
            .inc();
        // A revocation re-evaluates a connection already counted; its audits were counted then.
        for key in d.audit().iter().filter(|_| !revoked) {
            self.authz_decisions
                .get_or_create(&DecisionLabels {
                    service: service.to_owned(),
                    decision: "audit",
                    reason: super::authz::REASON_AUDIT_POLICY,
                    policy: key.to_string(),
                })
                .inc();
        }
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
