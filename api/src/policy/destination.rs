//! DestinationPolicy: how traffic to a service is spread across its endpoints and protected —
//! subsets, load balancing, locality, circuit breaking and outlier detection.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::decode::{self, Cx, Table, choice_enum};
use super::value::humane;
use crate::name::Label;

/// Consecutive 5xx responses that eject an endpoint when not given (Istio's default).
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
/// How often outlier detection looks at the counters.
pub const DEFAULT_OUTLIER_INTERVAL: Duration = Duration::from_secs(10);
/// How long an ejected endpoint stays out the first time (multiplied on each ejection).
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Largest share of a service's endpoints that may be ejected at once.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

choice_enum! {
    /// How an endpoint is picked among the healthy ones.
    pub enum LoadBalancer {
        /// In turn.
        RoundRobin = "round_robin",
        /// Uniformly at random.
        Random = "random",
        /// The fewer of two random picks' outstanding requests.
        LeastRequest = "least_request",
        /// Peak-EWMA latency of two random picks (the default, as Linkerd).
        Ewma = "ewma",
    }
}

/// `kind = "DestinationPolicy"`: how traffic to a service is spread and protected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationPolicy {
    /// The service, in the resource's namespace.
    pub service: Label,
    /// Named subsets of its endpoints, by labels (Routes split across them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// Endpoint picking (default ewma).
    pub load_balancer: LoadBalancer,
    /// Locality-aware routing.
    pub locality: Locality,
    /// Limits on connections and requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Ejection of failing endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// A named group of a service's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subset {
    /// Name used by Route destinations.
    pub name: Label,
    /// Endpoints carrying all of these labels (at least one).
    pub labels: BTreeMap<String, String>,
}

/// Locality-aware routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Locality {
    /// Prefer endpoints in the caller's zone, then datacenter, then site, then other sites
    /// (default true).
    pub enabled: bool,
    /// Fail over to other localities when the local ones are unhealthy (default true).
    pub failover: bool,
    /// Percent of a locality's endpoints that must be healthy for it to keep all of its
    /// traffic ([`DEFAULT_FAILOVER_THRESHOLD`]); below it, the locality keeps
    /// `healthy% / threshold` of it and the rest spills to the next locality. 0: a locality
    /// keeps everything while any endpoint is usable.
    #[serde(skip_serializing_if = "is_default_threshold")]
    pub failover_threshold: u8,
    /// Other sites in order of preference after this one; sites not listed come after them,
    /// together (default: none listed, every other site alike).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<Label>,
}

/// The failover threshold when none is set: a locality keeps all its traffic while at least half
/// of its endpoints are healthy (Envoy's implicit equivalent is 71.4%, Google Cloud's 70 or 50).
pub const DEFAULT_FAILOVER_THRESHOLD: u8 = 50;

/// Locality when a DestinationPolicy says nothing (and when there is no DestinationPolicy).
pub const DEFAULT_LOCALITY: Locality = Locality {
    enabled: true,
    failover: true,
    failover_threshold: DEFAULT_FAILOVER_THRESHOLD,
    sites: Vec::new(),
};

fn is_default_threshold(t: &u8) -> bool {
    *t == DEFAULT_FAILOVER_THRESHOLD
}

/// Circuit breaker limits per destination; none = unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CircuitBreaker {
    /// Connections to all endpoints together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests per connection before it is closed (1 disables keep-alive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

/// Ejection of endpoints that keep failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint (0 = off; default 5).
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 or connect failures that eject an endpoint (0 = off, default).
    pub consecutive_gateway_errors: u32,
    /// How often endpoints are checked (default 10s).
    #[serde(serialize_with = "humane::serialize")]
    pub interval: Duration,
    /// Ejection time, multiplied by the number of ejections (default 30s).
    #[serde(serialize_with = "humane::serialize")]
    pub base_ejection_time: Duration,
    /// Most endpoints ejected at once, percent (default 10; at least one may always be).
    pub max_ejection_percent: u32,
}

// === impl DestinationPolicy ===

const DESTINATION_KEYS: &[&str] = &[
    "service",
    "subsets",
    "load_balancer",
    "locality",
    "circuit_breaker",
    "outlier_detection",
];

pub(crate) fn destination_policy(
    map: &Map<String, Value>,
    cx: &mut Cx,
) -> Option<DestinationPolicy> {
    let t = Table::from_map(map, "", DESTINATION_KEYS, cx);
    let service = t.req("service", "the service's name", cx, decode::label);
    let subsets = t.opt("subsets", cx, |v, at, cx| {
        let list = decode::list(v, at, cx, subset)?;
        decode::no_duplicates(&list, at, cx, "subset name", |s| {
            format!("{:?}", s.name.as_str())
        })
        .then_some(list)
    });
    Some(DestinationPolicy {
        service: service?,
        subsets: subsets.unwrap_or_default(),
        load_balancer: t
            .opt("load_balancer", cx, decode::choice)
            .unwrap_or(LoadBalancer::Ewma),
        locality: t.opt("locality", cx, locality).unwrap_or(DEFAULT_LOCALITY),
        circuit_breaker: t.opt("circuit_breaker", cx, circuit_breaker),
        outlier_detection: t.opt("outlier_detection", cx, outlier_detection),
    })
}

fn subset(v: &Value, at: &str, cx: &mut Cx) -> Option<Subset> {
    let t = Table::new(v, at, &["name", "labels"], cx)?;
    let name = t.req("name", "the subset's name, e.g. \"v2\"", cx, decode::label);
    let labels = t.req(
        "labels",
        "labels selecting the endpoints, e.g. { version = \"v2\" }",
        cx,
        |v, at, cx| {
            let l = decode::labels(v, at, cx)?;
            if l.is_empty() {
                cx.error(
                    at,
                    "must hold at least one label, or every endpoint would be in the subset",
                );
                return None;
            }
            Some(l)
        },
    );
    Some(Subset {
        name: name?,
        labels: labels?,
    })
}

fn locality(v: &Value, at: &str, cx: &mut Cx) -> Option<Locality> {
    let t = Table::new(
        v,
        at,
        &["enabled", "failover", "failover_threshold", "sites"],
        cx,
    )?;
    let threshold = t.opt("failover_threshold", cx, |v, at, cx| {
        decode::uint(v, at, cx, 0, 100).map(|n| u8::try_from(n).unwrap_or(100))
    });
    let sites = t.opt("sites", cx, |v, at, cx| {
        let sites = decode::list(v, at, cx, decode::label)?;
        decode::no_duplicates(&sites, at, cx, "site", |s| format!("{:?}", s.as_str()))
            .then_some(sites)
    });
    if (t.has("failover_threshold") && threshold.is_none()) || (t.has("sites") && sites.is_none()) {
        return None;
    }
    Some(Locality {
        enabled: t.opt("enabled", cx, decode::boolean).unwrap_or(true),
        failover: t.opt("failover", cx, decode::boolean).unwrap_or(true),
        failover_threshold: threshold.unwrap_or(DEFAULT_FAILOVER_THRESHOLD),
        sites: sites.unwrap_or_default(),
    })
}

fn circuit_breaker(v: &Value, at: &str, cx: &mut Cx) -> Option<CircuitBreaker> {
    const KEYS: &[&str] = &[
        "max_connections",
        "max_pending_requests",
        "max_requests_per_connection",
    ];
    let t = Table::new(v, at, KEYS, cx)?;
    let limit =
        |key, cx: &mut Cx| t.opt(key, cx, |v, at, cx| decode::u32_in(v, at, cx, 1, u32::MAX));
    Some(CircuitBreaker {
        max_connections: limit("max_connections", cx),
        max_pending_requests: limit("max_pending_requests", cx),
        max_requests_per_connection: limit("max_requests_per_connection", cx),
    })
}

fn outlier_detection(v: &Value, at: &str, cx: &mut Cx) -> Option<OutlierDetection> {
    const KEYS: &[&str] = &[
        "consecutive_5xx",
        "consecutive_gateway_errors",
        "interval",
        "base_ejection_time",
        "max_ejection_percent",
    ];
    let t = Table::new(v, at, KEYS, cx)?;
    let count =
        |key, cx: &mut Cx| t.opt(key, cx, |v, at, cx| decode::u32_in(v, at, cx, 0, u32::MAX));
    let od = OutlierDetection {
        consecutive_5xx: count("consecutive_5xx", cx).unwrap_or(DEFAULT_CONSECUTIVE_5XX),
        consecutive_gateway_errors: count("consecutive_gateway_errors", cx).unwrap_or(0),
        interval: t
            .opt("interval", cx, decode::duration)
            .unwrap_or(DEFAULT_OUTLIER_INTERVAL),
        base_ejection_time: t
            .opt("base_ejection_time", cx, decode::duration)
            .unwrap_or(DEFAULT_BASE_EJECTION_TIME),
        max_ejection_percent: t
            .opt("max_ejection_percent", cx, |v, at, cx| {
                decode::u32_in(v, at, cx, 1, 100)
            })
            .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT),
    };
    if od.consecutive_5xx == 0 && od.consecutive_gateway_errors == 0 {
        cx.error(
            at,
            "both consecutive_5xx and consecutive_gateway_errors are 0, so nothing is ever \
             ejected; remove outlier_detection or set one of them",
        );
        return None;
    }
    Some(od)
}
