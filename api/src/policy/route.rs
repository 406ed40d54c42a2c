//! Route: how requests to a service are matched and sent on — weighted splits across subsets,
//! timeouts, retries, fault injection and header edits.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::decode::{self, Cx, Table, choice_enum};
use super::gateway::Hostname;
use super::value::{self, StringMatch, humane};
use crate::name::Label;

/// Retry conditions when a Route's `retries` names none.
pub const DEFAULT_RETRY_ON: &[RetryOn] = &[RetryOn::ConnectFailure, RetryOn::Reset];
/// Share of requests that may be retries, per destination, when `budget_percent` is omitted.
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;
/// Most retry attempts a Route may ask for.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;

/// `kind = "Route"`: how requests to a service (a mesh route) or arriving at gateways (a gateway
/// route) are matched and sent on. Exactly one of `service` and `gateways` is set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    /// Mesh route: the service whose callers it applies to, in the resource's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<Label>,
    /// Gateway route: the Gateways (in the resource's namespace) whose http/https listeners it
    /// serves.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<Label>,
    /// Gateway route: the hosts it serves (within the listener's); empty = the listener's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<Hostname>,
    /// Tried in order; the first entry whose `match` matches handles the request.
    pub http: Vec<HttpRoute>,
}

/// One entry of a Route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpRoute {
    /// Optional name, for metrics and for RateLimit's `route`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Label>,
    /// Any of these matches; empty (omitted) = every request.
    #[serde(rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatch>,
    /// Weighted destinations (weights sum to 100); omitted = the whole service.
    pub route: Vec<Destination>,
    /// Whole-request timeout including retries.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "humane::opt::serialize"
    )]
    pub timeout: Option<Duration>,
    /// Retry policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Fault injection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Edits to the request headers on the way to the destination.
    #[serde(skip_serializing_if = "HeaderOps::is_empty")]
    pub request_headers: HeaderOps,
    /// Edits to the response headers on the way back.
    #[serde(skip_serializing_if = "HeaderOps::is_empty")]
    pub response_headers: HeaderOps,
}

/// Conditions on a request; every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HttpMatch {
    /// The path (without the query string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    /// The method, exactly (`GET`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Lowercase header name → match.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    /// Query parameter → match.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, StringMatch>,
}

/// A share of a Route entry's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destination {
    /// Gateway routes: the service (in the resource's namespace); mesh routes send to their
    /// own `service` and leave it out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<Label>,
    /// A subset of the service defined by its DestinationPolicy; none = every endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<Label>,
    /// Percent of the entry's requests, 0 to 100.
    pub weight: u32,
}

choice_enum! {
    /// When a failed attempt is retried.
    pub enum RetryOn {
        /// The connection could not be established.
        ConnectFailure = "connect-failure",
        /// The connection or stream was reset before a response.
        Reset = "reset",
        /// Any 5xx response.
        Status5xx = "5xx",
        /// 502, 503 or 504.
        GatewayError = "gateway-error",
        /// A status listed in `retriable_status_codes`.
        RetriableStatusCodes = "retriable-status-codes",
        /// gRPC status CANCELLED (1) in the response headers (a trailers-only response: the
        /// call failed before any message, so it is safe to send again).
        GrpcCancelled = "cancelled",
        /// gRPC status DEADLINE_EXCEEDED (4) in the response headers.
        GrpcDeadlineExceeded = "deadline-exceeded",
        /// gRPC status RESOURCE_EXHAUSTED (8) in the response headers.
        GrpcResourceExhausted = "resource-exhausted",
        /// gRPC status INTERNAL (13) in the response headers.
        GrpcInternal = "internal",
        /// gRPC status UNAVAILABLE (14) in the response headers.
        GrpcUnavailable = "unavailable",
    }
}

/// A Route entry's retry policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retries {
    /// Retries after the first attempt (0 disables retries).
    pub attempts: u32,
    /// Timeout of each attempt; none = only the route's `timeout` applies.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "humane::opt::serialize"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Conditions that trigger a retry.
    pub retry_on: Vec<RetryOn>,
    /// Statuses retried under `retriable-status-codes`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    /// At most this percent of requests to the destination may be retries (1 to 100).
    pub budget_percent: u32,
}

/// Faults injected into a share of requests, to test resilience.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    /// Delay before forwarding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer with an error instead of forwarding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Injected delay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDelay {
    /// How long.
    #[serde(serialize_with = "humane::serialize")]
    pub fixed: Duration,
    /// Percent of requests delayed (default 100).
    pub percent: f64,
}

/// Injected error response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultAbort {
    /// HTTP status to answer with.
    pub status: u16,
    /// Percent of requests aborted (default 100).
    pub percent: f64,
}

/// Header edits: `set` replaces, `add` appends, `remove` deletes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeaderOps {
    /// Lowercase name → value, replacing any existing value.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Lowercase name → value, appended.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Lowercase names to remove.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

// === impl Route ===

pub(crate) fn route(map: &Map<String, Value>, cx: &mut Cx) -> Option<Route> {
    let t = Table::from_map(map, "", &["service", "gateways", "hostnames", "http"], cx);
    let service = t.opt("service", cx, decode::label);
    let gateways = t.opt("gateways", cx, |v, at, cx| {
        let gws =
            decode::nonempty_list(v, at, cx, "name the Gateway(s) to attach to", decode::label)?;
        decode::no_duplicates(&gws, at, cx, "gateway", |g| format!("{:?}", g.as_str()))
            .then_some(gws)
    });
    let hostnames = t.opt("hostnames", cx, |v, at, cx| {
        decode::nonempty_list(
            v,
            at,
            cx,
            "omit `hostnames` to serve the listener's",
            super::gateway::hostname,
        )
    });
    let kind = match (t.has("service"), t.has("gateways")) {
        (true, true) => {
            cx.error(&t.key("gateways"), "a Route is for callers of one `service` or for `gateways`, not both; split it in two");
            return None;
        }
        (false, false) => {
            cx.error(&t.key("service"), "missing; expected the target service's name (or `gateways` = [...] for a gateway route)");
            return None;
        }
        (true, false) => Attach::Mesh,
        (false, true) => Attach::Gateway,
    };
    if kind == Attach::Mesh && t.has("hostnames") {
        cx.error(
            &t.key("hostnames"),
            "only gateway routes match host names; a mesh route matches calls to its `service`",
        );
        return None;
    }
    let http = t.req(
        "http",
        "a list of [[resource.http]] entries",
        cx,
        |v, at, cx| {
            let http = decode::nonempty_list(
                v,
                at,
                cx,
                "add one [[resource.http]] entry",
                |v, at, cx| http_route(v, at, cx, kind),
            )?;
            let named: Vec<_> = http.iter().filter_map(|h| h.name.clone()).collect();
            decode::no_duplicates(&named, at, cx, "route name", |n| {
                format!("{:?}", n.as_str())
            })
            .then_some(http)
        },
    );
    let (service, gateways) = match kind {
        Attach::Mesh => (Some(service?), Vec::new()),
        Attach::Gateway => (None, gateways?),
    };
    Some(Route {
        service,
        gateways,
        hostnames: hostnames.unwrap_or_default(),
        http: http?,
    })
}

/// What a Route attaches to: its destinations differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attach {
    Mesh,
    Gateway,
}

const HTTP_KEYS: &[&str] = &[
    "name",
    "match",
    "route",
    "timeout",
    "retries",
    "fault",
    "request_headers",
    "response_headers",
];

fn http_route(v: &Value, at: &str, cx: &mut Cx, kind: Attach) -> Option<HttpRoute> {
    let t = Table::new(v, at, HTTP_KEYS, cx)?;
    let name = t.opt("name", cx, decode::label);
    let matches = t.opt("match", cx, |v, at, cx| {
        decode::nonempty_list(v, at, cx, "omit `match` to match every request", http_match)
    });
    let route = t.opt("route", cx, |v, at, cx| destinations(v, at, cx, kind));
    let timeout = t.opt("timeout", cx, decode::duration);
    let retries = t.opt("retries", cx, retries);
    let fault = t.opt("fault", cx, fault);
    let request_headers = t.opt("request_headers", cx, header_ops);
    let response_headers = t.opt("response_headers", cx, header_ops);
    let route = match route {
        Some(r) => r,
        None if t.has("route") => return None,
        None if kind == Attach::Gateway => {
            cx.error(
                &t.key("route"),
                "missing; a gateway route names where requests go: route = [{ service = \"...\" }]",
            );
            return None;
        }
        None => vec![Destination {
            service: None,
            subset: None,
            weight: 100,
        }],
    };
    Some(HttpRoute {
        name,
        matches: matches.unwrap_or_default(),
        route,
        timeout,
        retries,
        fault,
        request_headers: request_headers.unwrap_or_default(),
        response_headers: response_headers.unwrap_or_default(),
    })
}

fn http_match(v: &Value, at: &str, cx: &mut Cx) -> Option<HttpMatch> {
    let t = Table::new(v, at, &["path", "method", "headers", "query"], cx)?;
    let path = t.opt("path", cx, |v, at, cx| {
        let m = value::string_match(v, at, cx)?;
        if let StringMatch::Exact(p) | StringMatch::Prefix(p) = &m
            && !p.starts_with('/')
        {
            cx.error(at, format!("path {p:?} must start with '/'"));
            return None;
        }
        Some(m)
    });
    let no_check = |_: &str| Ok(());
    Some(HttpMatch {
        path,
        method: t.opt("method", cx, super::security::method),
        headers: t
            .opt("headers", cx, |v, at, cx| {
                decode::map(v, at, cx, value::check_header_name, value::string_match)
            })
            .unwrap_or_default(),
        query: t
            .opt("query", cx, |v, at, cx| {
                decode::map(v, at, cx, no_check, value::string_match)
            })
            .unwrap_or_default(),
    })
}

fn destinations(v: &Value, at: &str, cx: &mut Cx, kind: Attach) -> Option<Vec<Destination>> {
    let several = v.as_array().is_some_and(|a| a.len() > 1);
    let list = decode::nonempty_list(
        v,
        at,
        cx,
        "omit `route` to send to the whole service",
        |v, at, cx| {
            let t = Table::new(v, at, &["service", "subset", "weight"], cx)?;
            let service = match (kind, t.has("service")) {
                (Attach::Gateway, _) => {
                    Some(t.req("service", "the mesh service to send to", cx, decode::label)?)
                }
                (Attach::Mesh, true) => {
                    cx.error(
                        &t.key("service"),
                        "a mesh route sends to subsets of its own `service`; remove it (destinations name services only in gateway routes)",
                    );
                    return None;
                }
                (Attach::Mesh, false) => None,
            };
            let subset = t.opt("subset", cx, decode::label);
            let weight = if several {
                t.req(
                    "weight",
                    "a percent (weights of the entry sum to 100)",
                    cx,
                    |v, at, cx| decode::u32_in(v, at, cx, 0, 100),
                )?
            } else {
                t.opt("weight", cx, |v, at, cx| decode::u32_in(v, at, cx, 0, 100))
                    .unwrap_or(100)
            };
            Some(Destination {
                service,
                subset,
                weight,
            })
        },
    )?;
    let sum: u32 = list.iter().map(|d| d.weight).sum();
    if sum != 100 {
        let weights: Vec<String> = list.iter().map(|d| d.weight.to_string()).collect();
        cx.error(
            at,
            format!(
                "weights must sum to 100, these sum to {sum} ({})",
                weights.join(" + ")
            ),
        );
        return None;
    }
    decode::no_duplicates(&list, at, cx, "destination", |d| {
        let subset = (d.subset.as_ref())
            .map_or_else(|| "(none)".to_owned(), |s| format!("{:?}", s.as_str()));
        match &d.service {
            Some(svc) => format!("service {:?} subset {subset}", svc.as_str()),
            None => format!("subset {subset}"),
        }
    })
    .then_some(list)
}

fn retries(v: &Value, at: &str, cx: &mut Cx) -> Option<Retries> {
    const KEYS: &[&str] = &[
        "attempts",
        "per_try_timeout",
        "retry_on",
        "retriable_status_codes",
        "budget_percent",
    ];
    let t = Table::new(v, at, KEYS, cx)?;
    let attempts = t.req("attempts", "the number of retries", cx, |v, at, cx| {
        decode::u32_in(v, at, cx, 0, MAX_RETRY_ATTEMPTS)
    });
    let retry_on = t
        .opt("retry_on", cx, |v, at, cx| {
            decode::nonempty_list(v, at, cx, "omit `retry_on` for the default", decode::choice)
        })
        .unwrap_or_else(|| DEFAULT_RETRY_ON.to_vec());
    let codes = t
        .opt("retriable_status_codes", cx, |v, at, cx| {
            decode::list(v, at, cx, |v, at, cx| decode::u16_in(v, at, cx, 100, 599))
        })
        .unwrap_or_default();
    let per_try_timeout = t.opt("per_try_timeout", cx, decode::duration);
    let budget_percent = t
        .opt("budget_percent", cx, |v, at, cx| {
            decode::u32_in(v, at, cx, 1, 100)
        })
        .unwrap_or(DEFAULT_RETRY_BUDGET_PERCENT);
    let wants_codes = retry_on.contains(&RetryOn::RetriableStatusCodes);
    if wants_codes && codes.is_empty() {
        cx.error(
            &t.key("retriable_status_codes"),
            "required by retry_on \"retriable-status-codes\": list the statuses, e.g. [503]",
        );
    } else if !wants_codes && !codes.is_empty() {
        cx.error(
            &t.key("retriable_status_codes"),
            "has no effect unless retry_on includes \"retriable-status-codes\"",
        );
    }
    Some(Retries {
        attempts: attempts?,
        per_try_timeout,
        retry_on,
        retriable_status_codes: codes,
        budget_percent,
    })
}

fn fault(v: &Value, at: &str, cx: &mut Cx) -> Option<Fault> {
    let t = Table::new(v, at, &["delay", "abort"], cx)?;
    let percent = |t: &Table<'_>, cx: &mut Cx| {
        t.opt("percent", cx, |v, at, cx| {
            decode::number_in(v, at, cx, 0.0, 100.0)
        })
        .unwrap_or(100.0)
    };
    let delay = t.opt("delay", cx, |v, at, cx| {
        let d = Table::new(v, at, &["fixed", "percent"], cx)?;
        let fixed = d.req(
            "fixed",
            "a duration such as \"100ms\"",
            cx,
            decode::duration,
        );
        let percent = percent(&d, cx);
        Some(FaultDelay {
            fixed: fixed?,
            percent,
        })
    });
    let abort = t.opt("abort", cx, |v, at, cx| {
        let a = Table::new(v, at, &["status", "percent"], cx)?;
        let status = a.req(
            "status",
            "an HTTP status from 200 to 599",
            cx,
            |v, at, cx| decode::u16_in(v, at, cx, 200, 599),
        );
        let percent = percent(&a, cx);
        Some(FaultAbort {
            status: status?,
            percent,
        })
    });
    if !t.has("delay") && !t.has("abort") {
        cx.error(at, "give `delay`, `abort` or both");
        return None;
    }
    Some(Fault { delay, abort })
}

fn header_ops(v: &Value, at: &str, cx: &mut Cx) -> Option<HeaderOps> {
    let t = Table::new(v, at, &["set", "add", "remove"], cx)?;
    let values = |key, cx: &mut Cx| {
        t.opt(key, cx, |v, at, cx| {
            decode::map(v, at, cx, value::check_header_name, decode::string)
        })
        .unwrap_or_default()
    };
    Some(HeaderOps {
        set: values("set", cx),
        add: values("add", cx),
        remove: t
            .opt("remove", cx, |v, at, cx| {
                decode::list(v, at, cx, value::header_name)
            })
            .unwrap_or_default(),
    })
}

impl HeaderOps {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}
