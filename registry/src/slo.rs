//! SLO arithmetic: which traffic an SLO counts, its indicator, error budget and burn rates over
//! its window, and the multiwindow burn-rate alert decision (Google SRE workbook, ch. 5). Pure:
//! `alerts` runs it over stored traffic on a timer, the API for `GetSloStatus`.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_api::observe;
use mesh_api::policy::{Alerting, Calendar, Objective, Slo, Window, format_duration};
use serde::{Deserialize, Serialize};

use crate::store::{Protocol, ServiceSlot, Step, Traffic};

/// Compliance windows up to this long are summed from minute slots (exact to the minute);
/// longer ones from hour slots, so an evaluation reads hundreds of records, not tens of
/// thousands. Calendar periods start on the hour, so they stay exact; a rolling window of more
/// than a day may include up to one hour before its start.
pub const MINUTE_HISTORY: Duration = Duration::from_secs(86_400);

/// The burn-rate windows, shortest first, with their metric label.
pub const BURN_WINDOWS: [(&str, Duration); 4] = [
    ("5m", Duration::from_secs(300)),
    ("30m", Duration::from_secs(1_800)),
    ("1h", Duration::from_secs(3_600)),
    ("6h", Duration::from_secs(21_600)),
];

/// The longest burn-rate window: minute slots are always read back this far.
pub const LONGEST_BURN_WINDOW: Duration = BURN_WINDOWS[BURN_WINDOWS.len() - 1].1;

const DAY: u64 = 86_400;

/// An SLO's alert condition, and the severity of a firing alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Within budget (or not burning fast enough to alert).
    Ok,
    /// Burning `slow_burn` times faster than allowed over 6 h and 30 min: a ticket.
    SlowBurn,
    /// Burning `fast_burn` times faster than allowed over 1 h and 5 min: a page.
    FastBurn,
}

/// What an SLO counts: requests in total and bad ones. Fractional, because a latency threshold
/// inside a duration bucket counts part of that bucket as good.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    /// Requests (and TCP connections, for availability).
    pub total: f64,
    /// Requests that miss the objective.
    pub bad: f64,
}

/// How a request is judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Measure {
    /// Good unless it failed (HTTP 5xx, failed TCP connection).
    Availability,
    /// Good if answered within the threshold; HTTP only (TCP carries no durations).
    Latency {
        /// The threshold, ms.
        threshold_ms: f64,
    },
}

/// Burn rates per window: how many times faster than the goal allows the budget burns.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BurnRates {
    /// Over the last 5 minutes.
    pub m5: f64,
    /// Over the last 30 minutes.
    pub m30: f64,
    /// Over the last hour.
    pub h1: f64,
    /// Over the last 6 hours.
    pub h6: f64,
}

/// The store reads one evaluation needs for one SLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reads {
    /// The service's minute slots starting at or after this (Unix seconds).
    pub minutes_from: u64,
    /// Its hour slots starting at or after this, when the window is summed from hours.
    pub hours_from: Option<u64>,
}

/// An SLO evaluated at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Status {
    /// Requests counted in the compliance window.
    pub total: f64,
    /// Good ones among them.
    pub good: f64,
    /// Percent good (100 without traffic).
    pub sli: f64,
    /// Share of the error budget left: 1 untouched (or no traffic), negative overspent.
    pub budget_remaining: f64,
    /// Burn rates over the alert windows.
    pub burn: BurnRates,
    /// The multiwindow alert condition now.
    pub condition: Severity,
}

/// A firing alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alert {
    /// `SlowBurn` or `FastBurn`.
    pub severity: Severity,
    /// When this severity began, Unix seconds.
    pub since_unix: i64,
}

/// What an evaluation announces (log, metrics, webhook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An alert started or escalated to `severity` at `since_unix`.
    Firing {
        /// The new severity.
        severity: Severity,
        /// Now.
        since_unix: i64,
    },
    /// The alert of severity `was`, firing since `since_unix`, is over.
    Resolved {
        /// The severity it had.
        was: Severity,
        /// When it began.
        since_unix: i64,
    },
}

// === impl Severity ===

impl Severity {
    /// The wire and label name: `ok`, `slow_burn`, `fast_burn`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::SlowBurn => "slow_burn",
            Self::FastBurn => "fast_burn",
        }
    }
}

// === impl Measure ===

impl Measure {
    /// How `slo` judges requests.
    pub fn of(slo: &Slo) -> Self {
        match (slo.objective, slo.threshold) {
            (Objective::Latency, Some(t)) => Self::Latency {
                threshold_ms: t.as_secs_f64() * 1_000.0,
            },
            // The policy model refuses a latency SLO without a threshold; were one stored
            // anyway, judging availability is the meaningful fallback.
            (Objective::Latency, None) | (Objective::Availability, _) => Self::Availability,
        }
    }

    /// What one slot of a service's `protocol` traffic counts for.
    pub fn counts(self, protocol: Protocol, traffic: &Traffic) -> Counts {
        let total = traffic.requests as f64;
        match (self, protocol) {
            (Self::Availability, _) => Counts {
                total,
                bad: traffic.errors.min(traffic.requests) as f64,
            },
            (Self::Latency { .. }, Protocol::Tcp) => Counts::default(),
            (Self::Latency { threshold_ms }, Protocol::Http) => {
                // Requests without a duration (none in the buckets) count as bad.
                let good = observe::count_within(&traffic.latency_buckets, threshold_ms);
                Counts {
                    total,
                    bad: total - good.min(total),
                }
            }
        }
    }

    /// A service's slots as counts per slot start.
    pub fn series(self, slots: &[ServiceSlot]) -> BTreeMap<u64, Counts> {
        let mut out: BTreeMap<u64, Counts> = BTreeMap::new();
        for slot in slots {
            let c = self.counts(slot.protocol, &slot.traffic);
            let sum = out.entry(slot.start_unix).or_default();
            sum.total += c.total;
            sum.bad += c.bad;
        }
        out
    }
}

// === impl BurnRates ===

impl BurnRates {
    /// `(label, rate)` per window, in [`BURN_WINDOWS`] order.
    pub fn by_window(&self) -> [(&'static str, f64); 4] {
        [
            (BURN_WINDOWS[0].0, self.m5),
            (BURN_WINDOWS[1].0, self.m30),
            (BURN_WINDOWS[2].0, self.h1),
            (BURN_WINDOWS[3].0, self.h6),
        ]
    }
}

/// How an SLO's window is written: `30d` or `calendar month`.
pub fn window_name(window: Window) -> String {
    match window {
        Window::Rolling(d) => format_duration(d),
        Window::Calendar(c) => format!("calendar {}", c.as_str()),
    }
}

/// Start of the compliance window at `now_unix`: `now − d` for a rolling window, the start of
/// the current UTC day, ISO week (Monday) or month for a calendar one.
pub fn window_start(window: Window, now_unix: u64) -> u64 {
    match window {
        Window::Rolling(d) => now_unix.saturating_sub(d.as_secs()),
        Window::Calendar(c) => {
            let days = now_unix / DAY;
            let first = match c {
                Calendar::Day => days,
                // 1970-01-01 was a Thursday: three days after a Monday. (The epoch's own
                // week began before it; saturating keeps that one at the epoch.)
                Calendar::Week => days.saturating_sub((days + 3) % 7),
                Calendar::Month => days - (day_of_month(days) - 1),
            };
            first * DAY
        }
    }
}

/// What to read for an evaluation of `window` at `now_unix`.
pub fn reads(window: Window, now_unix: u64) -> Reads {
    let start = window_start(window, now_unix);
    let burn_from = now_unix.saturating_sub(LONGEST_BURN_WINDOW.as_secs());
    if minute_window(start, now_unix) {
        Reads {
            minutes_from: Step::Minute.slot(start.min(burn_from)),
            hours_from: None,
        }
    } else {
        Reads {
            minutes_from: Step::Minute.slot(burn_from),
            hours_from: Some(Step::Hour.slot(start)),
        }
    }
}

/// Evaluates `slo` at `now_unix` over its service's counts per minute and per hour slot (as
/// [`reads`] asked for; other slots are ignored).
pub fn evaluate(
    slo: &Slo,
    now_unix: u64,
    minutes: &BTreeMap<u64, Counts>,
    hours: &BTreeMap<u64, Counts>,
) -> Status {
    let start = window_start(slo.window, now_unix);
    let window = if minute_window(start, now_unix) {
        sum(minutes, Step::Minute, start, now_unix)
    } else {
        sum(hours, Step::Hour, start, now_unix)
    };
    // The goal is validated to lie strictly between 0 and 100, so some budget exists.
    let allowed = 1.0 - slo.goal / 100.0;
    let burn = |d: Duration| {
        let c = sum(
            minutes,
            Step::Minute,
            now_unix.saturating_sub(d.as_secs()),
            now_unix,
        );
        bad_fraction(c).map_or(0.0, |f| f / allowed)
    };
    let burn = BurnRates {
        m5: burn(BURN_WINDOWS[0].1),
        m30: burn(BURN_WINDOWS[1].1),
        h1: burn(BURN_WINDOWS[2].1),
        h6: burn(BURN_WINDOWS[3].1),
    };
    let good = window.total - window.bad;
    Status {
        total: window.total,
        good,
        sli: bad_fraction(window).map_or(100.0, |f| 100.0 * (1.0 - f)),
        budget_remaining: bad_fraction(window).map_or(1.0, |f| 1.0 - f / allowed),
        burn,
        condition: condition(&slo.alerting, &burn),
    }
}

/// The multiwindow condition: a fast burn needs both the 1 h and the 5 min rate above
/// `fast_burn` (the long window proves it matters, the short one that it is still happening,
/// so the alert resolves within minutes of a fix); a slow burn the 6 h and 30 min rates above
/// `slow_burn`.
pub fn condition(alerting: &Alerting, burn: &BurnRates) -> Severity {
    if burn.h1 > alerting.fast_burn && burn.m5 > alerting.fast_burn {
        Severity::FastBurn
    } else if burn.h6 > alerting.slow_burn && burn.m30 > alerting.slow_burn {
        Severity::SlowBurn
    } else {
        Severity::Ok
    }
}

/// The alert after an evaluation whose condition is `condition`, given the firing alert
/// `current` (`None`: ok), and the event to announce. ok → slow or fast fires; slow → fast
/// fires again (an escalation); any → ok resolves. fast → slow is no event and the alert stays
/// fast: an alert holds its highest severity until it resolves, so a burn hovering around the
/// fast threshold pages once rather than at every crossing.
pub fn next_alert(
    current: Option<Alert>,
    condition: Severity,
    now_unix: i64,
) -> (Option<Alert>, Option<Event>) {
    match (current, condition) {
        (None, Severity::Ok) => (None, None),
        (None, severity) => (
            Some(Alert {
                severity,
                since_unix: now_unix,
            }),
            Some(Event::Firing {
                severity,
                since_unix: now_unix,
            }),
        ),
        (Some(alert), Severity::Ok) => (
            None,
            Some(Event::Resolved {
                was: alert.severity,
                since_unix: alert.since_unix,
            }),
        ),
        (Some(alert), severity) if severity > alert.severity => (
            Some(Alert {
                severity,
                since_unix: now_unix,
            }),
            Some(Event::Firing {
                severity,
                since_unix: now_unix,
            }),
        ),
        (Some(alert), _) => (Some(alert), None),
    }
}

/// Whether a window starting at `start` is summed from minute slots.
fn minute_window(start: u64, now_unix: u64) -> bool {
    now_unix.saturating_sub(start) <= MINUTE_HISTORY.as_secs()
}

/// The counts of every `step` slot overlapping `[from, now]`: a rolling window includes the
/// whole slot its start falls in, and the slot in progress.
fn sum(slots: &BTreeMap<u64, Counts>, step: Step, from: u64, now: u64) -> Counts {
    slots
        .range(step.slot(from)..=now)
        .fold(Counts::default(), |acc, (_, c)| Counts {
            total: acc.total + c.total,
            bad: acc.bad + c.bad,
        })
}

/// Share of bad requests; `None` without traffic.
fn bad_fraction(c: Counts) -> Option<f64> {
    (c.total > 0.0).then(|| c.bad / c.total)
}

/// Day of the month (1..=31) of the day `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn day_of_month(days: u64) -> u64 {
    let z = days + 719_468;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    doy - (153 * mp + 2) / 5 + 1
}

#[cfg(test)]
mod tests;
