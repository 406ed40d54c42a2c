//! SLO: a service level objective on a service's availability or latency, measured over a rolling
//! or calendar window, with multi-window burn-rate alerting.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::decode::{self, Cx, Table, choice_enum};
use super::value::humane;
use crate::name::Label;

/// The window when neither `window` nor `calendar` is given.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30 * 86_400);
/// Shortest rolling window.
pub const MIN_WINDOW: Duration = Duration::from_secs(3_600);
/// Longest rolling window.
pub const MAX_WINDOW: Duration = Duration::from_secs(365 * 86_400);
/// Burn rate that pages (2% of a 30-day budget in one hour, as in the Google SRE workbook).
pub const DEFAULT_FAST_BURN: f64 = 14.4;
/// Burn rate that opens a ticket (5% of a 30-day budget in six hours).
pub const DEFAULT_SLOW_BURN: f64 = 6.0;

choice_enum! {
    /// What is measured.
    pub enum Objective {
        /// Share of requests that succeed (not 5xx, not reset).
        Availability = "availability",
        /// Share of requests answered within `threshold`.
        Latency = "latency",
    }
}

choice_enum! {
    /// A calendar window, reset at the start of each period (UTC).
    pub enum Calendar {
        /// Each day.
        Day = "day",
        /// Each ISO week.
        Week = "week",
        /// Each month.
        Month = "month",
    }
}

/// `kind = "SLO"`: an objective for a service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Slo {
    /// The measured service, in the resource's namespace.
    pub service: Label,
    /// availability or latency.
    pub objective: Objective,
    /// For latency: a request is good if answered within this.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "humane::opt::serialize"
    )]
    pub threshold: Option<Duration>,
    /// Percent of good requests, strictly between 0 and 100 (e.g. 99.5).
    pub goal: f64,
    /// The compliance window (`window = "30d"` or `calendar = "month"`).
    #[serde(flatten)]
    pub window: Window,
    /// Burn-rate alerting.
    pub alerting: Alerting,
}

/// The window an SLO is measured over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Window {
    /// `window = "30d"`: the last N.
    #[serde(rename = "window", serialize_with = "humane::serialize")]
    Rolling(Duration),
    /// `calendar = "month"`: the current calendar period.
    #[serde(rename = "calendar")]
    Calendar(Calendar),
}

/// When to alert: the error budget burns `fast_burn` (or `slow_burn`) times faster than allowed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alerting {
    /// Page-worthy burn rate (default 14.4).
    pub fast_burn: f64,
    /// Ticket-worthy burn rate (default 6), below `fast_burn`.
    pub slow_burn: f64,
    /// Where alerts are POSTed, besides the metrics (`http://` or `https://`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

// === impl Slo ===

const KEYS: &[&str] = &[
    "service",
    "objective",
    "threshold",
    "goal",
    "window",
    "calendar",
    "alerting",
];

pub(crate) fn slo(map: &Map<String, Value>, cx: &mut Cx) -> Option<Slo> {
    let t = Table::from_map(map, "", KEYS, cx);
    let service = t.req("service", "the measured service's name", cx, decode::label);
    let objective = t.req("objective", "availability or latency", cx, decode::choice);
    let threshold = t.opt("threshold", cx, decode::duration);
    match objective {
        Some(Objective::Latency) if threshold.is_none() && !t.has("threshold") => cx.error(
            &t.key("threshold"),
            "missing; a latency objective needs the threshold a good request is answered within, e.g. \"300ms\"",
        ),
        Some(Objective::Availability) if t.has("threshold") => cx.error(
            &t.key("threshold"),
            "only a latency objective has a threshold; remove it or set objective = \"latency\"",
        ),
        _ => {}
    }
    let goal = t.req("goal", "a percent such as 99.5", cx, |v, at, cx| {
        let g = decode::number(v, at, cx)?;
        if !(g > 0.0 && g < 100.0) {
            cx.error(at, format!("{g} is out of range; expected a percent strictly between 0 and 100, such as 99.5"));
            return None;
        }
        Some(g)
    });
    let window = window(&t, cx);
    let alerting = t.opt("alerting", cx, alerting);
    let alerting = if t.has("alerting") {
        alerting?
    } else {
        Alerting {
            fast_burn: DEFAULT_FAST_BURN,
            slow_burn: DEFAULT_SLOW_BURN,
            webhook: None,
        }
    };
    Some(Slo {
        service: service?,
        objective: objective?,
        threshold,
        goal: goal?,
        window: window?,
        alerting,
    })
}

fn window(t: &Table<'_>, cx: &mut Cx) -> Option<Window> {
    if t.has("window") && t.has("calendar") {
        cx.error(
            &t.key("calendar"),
            "give either `window` (rolling) or `calendar`, not both",
        );
        return None;
    }
    if t.has("calendar") {
        return t.opt("calendar", cx, decode::choice).map(Window::Calendar);
    }
    let rolling = t.opt("window", cx, |v, at, cx| {
        let d = decode::duration(v, at, cx)?;
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&d) {
            cx.error(at, "a rolling window must be from 1h to 365d, e.g. \"30d\"");
            return None;
        }
        Some(d)
    });
    match rolling {
        Some(d) => Some(Window::Rolling(d)),
        None if t.has("window") => None,
        None => Some(Window::Rolling(DEFAULT_WINDOW)),
    }
}

fn alerting(v: &Value, at: &str, cx: &mut Cx) -> Option<Alerting> {
    let t = Table::new(v, at, &["fast_burn", "slow_burn", "webhook"], cx)?;
    let burn = |key, default, cx: &mut Cx| {
        t.opt(key, cx, |v, at, cx| {
            let b = decode::number(v, at, cx)?;
            if b <= 1.0 {
                cx.error(at, format!("{b} is too low; a burn rate above 1 means the budget runs out before the window ends"));
                return None;
            }
            Some(b)
        })
        .unwrap_or(default)
    };
    let fast_burn = burn("fast_burn", DEFAULT_FAST_BURN, cx);
    let slow_burn = burn("slow_burn", DEFAULT_SLOW_BURN, cx);
    if slow_burn >= fast_burn {
        cx.error(
            at,
            format!("slow_burn ({slow_burn}) must be below fast_burn ({fast_burn})"),
        );
    }
    let webhook = t.opt("webhook", cx, |v, at, cx| {
        let url = decode::string(v, at, cx)?;
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
            cx.error(
                at,
                format!("{url:?} is not a URL; expected e.g. \"https://alerts.example.com/hook\""),
            );
            return None;
        }
        Some(url)
    });
    Some(Alerting {
        fast_burn,
        slow_burn,
        webhook,
    })
}
