//! RateLimit: mesh-wide token-bucket limits on requests to a service.

use serde::Serialize;
use serde_json::{Map, Value};

use super::decode::{self, Cx, Table, choice_enum};
use crate::name::Label;

choice_enum! {
    /// What a rate limit counts by.
    pub enum LimitKey {
        /// One bucket for the destination service.
        Destination = "destination",
        /// One bucket per Route entry name.
        Route = "route",
        /// One bucket per calling identity.
        SourceIdentity = "source_identity",
    }
}

choice_enum! {
    /// The period of `requests_per_unit`.
    pub enum Unit {
        /// Per second.
        Second = "second",
        /// Per minute.
        Minute = "minute",
        /// Per hour.
        Hour = "hour",
    }
}

/// `kind = "RateLimit"`: mesh-wide (global) request rate limits for a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    /// The limited service, in the resource's namespace.
    pub service: Label,
    /// Every limit applies; a request over any of them gets 429.
    pub limits: Vec<Limit>,
}

/// One token-bucket limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limit {
    /// What the bucket is keyed by.
    pub key: LimitKey,
    /// Only requests handled by the Route entry of this name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<Label>,
    /// Sustained rate.
    pub requests_per_unit: u32,
    /// Period of the rate.
    pub unit: Unit,
    /// Bucket size: requests allowed in a burst (default `requests_per_unit`).
    pub burst: u32,
}

// === impl RateLimit ===

pub(crate) fn rate_limit(map: &Map<String, Value>, cx: &mut Cx) -> Option<RateLimit> {
    let t = Table::from_map(map, "", &["service", "limits"], cx);
    let service = t.req("service", "the limited service's name", cx, decode::label);
    let limits = t.req(
        "limits",
        "a list of [[resource.limits]] entries",
        cx,
        |v, at, cx| decode::nonempty_list(v, at, cx, "add one [[resource.limits]] entry", limit),
    );
    Some(RateLimit {
        service: service?,
        limits: limits?,
    })
}

fn limit(v: &Value, at: &str, cx: &mut Cx) -> Option<Limit> {
    const KEYS: &[&str] = &["key", "route", "requests_per_unit", "unit", "burst"];
    let t = Table::new(v, at, KEYS, cx)?;
    let key = t.req(
        "key",
        "destination, route or source_identity",
        cx,
        decode::choice,
    );
    let rpu = t.req(
        "requests_per_unit",
        "a positive integer",
        cx,
        |v, at, cx| decode::u32_in(v, at, cx, 1, u32::MAX),
    );
    let unit = t.req("unit", "second, minute or hour", cx, decode::choice);
    let burst = t.opt("burst", cx, |v, at, cx| {
        decode::u32_in(v, at, cx, 1, u32::MAX)
    });
    let route = t.opt("route", cx, decode::label);
    let rpu = rpu?;
    Some(Limit {
        key: key?,
        route,
        requests_per_unit: rpu,
        unit: unit?,
        burst: burst.unwrap_or(rpu),
    })
}
