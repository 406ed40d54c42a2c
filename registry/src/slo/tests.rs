//! Table tests of the SLO arithmetic: counting, windows (rolling, calendar), burn rates, the
//! multiwindow condition and alert transitions.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_api::name::Label;
use mesh_api::observe::{BUCKETS, bucket_of};
use mesh_api::policy::{Alerting, Calendar, Objective, Slo, Window};

use super::*;
use crate::store::{Protocol, ServiceSlot, Traffic};

/// 2024-03-15T12:34:56Z, a Friday.
const NOW: u64 = 1_710_506_096;
const MINUTE: u64 = 60;
const HOUR: u64 = 3_600;

fn slo(objective: Objective, goal: f64, window: Window) -> Slo {
    Slo {
        service: Label::new("web").unwrap(),
        objective,
        threshold: (objective == Objective::Latency).then_some(Duration::from_millis(300)),
        goal,
        window,
        alerting: Alerting {
            fast_burn: 14.4,
            slow_burn: 6.0,
            webhook: None,
        },
    }
}

fn counts(total: f64, bad: f64) -> Counts {
    Counts { total, bad }
}

/// Minute slots `age` minutes before NOW's minute, each with `c`.
fn minutes(slots: &[(u64, Counts)]) -> BTreeMap<u64, Counts> {
    let now_minute = NOW - NOW % MINUTE;
    slots
        .iter()
        .map(|&(age, c)| (now_minute - age * MINUTE, c))
        .collect()
}

fn http(requests: u64, errors: u64, buckets: &[(f64, u64)]) -> Traffic {
    let mut latency_buckets = vec![0; BUCKETS];
    for &(ms, n) in buckets {
        latency_buckets[bucket_of(ms)] += n;
    }
    Traffic {
        requests,
        errors,
        bytes: 0,
        latency_buckets,
    }
}

fn tcp(connections: u64, failed: u64) -> Traffic {
    Traffic {
        requests: connections,
        errors: failed,
        bytes: 0,
        latency_buckets: Vec::new(),
    }
}

#[test]
fn what_a_slot_counts() {
    let latency = Measure::Latency {
        threshold_ms: 300.0,
    };
    let mixed = http(100, 7, &[(20.0, 60), (250.0, 30), (400.0, 10)]);
    for (name, measure, protocol, traffic, want) in [
        (
            "availability: errors are bad",
            Measure::Availability,
            Protocol::Http,
            &mixed,
            counts(100.0, 7.0),
        ),
        (
            "availability: failed connections are bad",
            Measure::Availability,
            Protocol::Tcp,
            &tcp(50, 5),
            counts(50.0, 5.0),
        ),
        (
            "latency: slower than the threshold is bad",
            latency,
            Protocol::Http,
            &mixed,
            counts(100.0, 10.0),
        ),
        (
            "latency: requests without a duration are bad",
            latency,
            Protocol::Http,
            &http(10, 0, &[(20.0, 8)]),
            counts(10.0, 2.0),
        ),
        (
            "latency: TCP has no durations and does not count",
            latency,
            Protocol::Tcp,
            &tcp(50, 5),
            counts(0.0, 0.0),
        ),
        (
            "latency: a threshold inside a bucket counts part of it",
            Measure::Latency {
                threshold_ms: 400.0,
            },
            Protocol::Http,
            &mixed,
            counts(100.0, 5.0),
        ),
    ] {
        assert_eq!(measure.counts(protocol, traffic), want, "{name}");
    }
}

#[test]
fn series_sums_protocols_per_slot() {
    let slots = [
        ServiceSlot {
            start_unix: 60,
            protocol: Protocol::Http,
            traffic: http(10, 1, &[]),
        },
        ServiceSlot {
            start_unix: 60,
            protocol: Protocol::Tcp,
            traffic: tcp(5, 2),
        },
        ServiceSlot {
            start_unix: 120,
            protocol: Protocol::Http,
            traffic: http(4, 0, &[]),
        },
    ];
    let series = Measure::Availability.series(&slots);
    assert_eq!(
        series.into_iter().collect::<Vec<_>>(),
        [(60, counts(15.0, 3.0)), (120, counts(4.0, 0.0))]
    );
}

#[test]
fn availability_and_latency_status() {
    let rolling = Window::Rolling(Duration::from_secs(HOUR));
    // 1000 requests, 5 bad, spread over the last 10 minutes.
    let m = minutes(
        &(0..10)
            .map(|age| (age, counts(100.0, 0.5)))
            .collect::<Vec<_>>(),
    );
    let s = evaluate(
        &slo(Objective::Availability, 99.0, rolling),
        NOW,
        &m,
        &BTreeMap::new(),
    );
    assert_eq!((s.total, s.good), (1000.0, 995.0));
    assert!((s.sli - 99.5).abs() < 1e-9, "{s:?}");
    assert!((s.budget_remaining - 0.5).abs() < 1e-9, "{s:?}");
    // Every burn window sees the same 0.5% bad against 1% allowed.
    for (w, rate) in s.burn.by_window() {
        assert!((rate - 0.5).abs() < 1e-9, "{w}: {rate}");
    }
    assert_eq!(s.condition, Severity::Ok);

    // Overspent: 10% bad against a 99.9% goal burns 100× and leaves a negative budget.
    let m = minutes(&[(0, counts(100.0, 10.0))]);
    let s = evaluate(
        &slo(Objective::Latency, 99.9, rolling),
        NOW,
        &m,
        &BTreeMap::new(),
    );
    assert!((s.burn.m5 - 100.0).abs() < 1e-6, "{s:?}");
    assert!((s.budget_remaining - (1.0 - 100.0)).abs() < 1e-6, "{s:?}");
    assert!((s.sli - 90.0).abs() < 1e-9);
    assert_eq!(s.condition, Severity::FastBurn);
}

#[test]
fn no_traffic_is_a_full_budget() {
    for window in [
        Window::Rolling(Duration::from_secs(30 * 86_400)),
        Window::Calendar(Calendar::Month),
    ] {
        let s = evaluate(
            &slo(Objective::Availability, 99.5, window),
            NOW,
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(
            s,
            Status {
                total: 0.0,
                good: 0.0,
                sli: 100.0,
                budget_remaining: 1.0,
                burn: BurnRates::default(),
                condition: Severity::Ok,
            },
            "{window:?}"
        );
    }
}

#[test]
fn calendar_period_starts() {
    for (name, now, calendar, want) in [
        ("day", NOW, Calendar::Day, 1_710_460_800),
        ("week from a Friday", NOW, Calendar::Week, 1_710_115_200),
        ("month", NOW, Calendar::Month, 1_709_251_200),
        ("leap day", 1_709_208_000, Calendar::Month, 1_706_745_600),
        (
            "week of a leap day",
            1_709_208_000,
            Calendar::Week,
            1_708_905_600,
        ),
        (
            "new year: month",
            1_735_689_600,
            Calendar::Month,
            1_735_689_600,
        ),
        (
            "new year: ISO week began in December",
            1_735_689_600,
            Calendar::Week,
            1_735_516_800,
        ),
        (
            "last second of a year",
            1_735_689_599,
            Calendar::Month,
            1_733_011_200,
        ),
        (
            "the epoch's week began before it: clamped",
            0,
            Calendar::Week,
            0,
        ),
    ] {
        let got = window_start(Window::Calendar(calendar), now);
        assert_eq!(got, want, "{name}");
    }
    assert_eq!(
        window_start(Window::Rolling(Duration::from_secs(HOUR)), NOW),
        NOW - HOUR
    );
}

#[test]
fn window_boundaries() {
    let day_start = 1_710_460_800;
    let before = day_start - MINUTE; // 23:59 the day before
    let after = day_start; // 00:00
    let m: BTreeMap<u64, Counts> = [
        (before, counts(100.0, 100.0)),
        (after, counts(100.0, 0.0)),
        (NOW - NOW % MINUTE, counts(100.0, 0.0)),
    ]
    .into();
    // A calendar day starts at 00:00 UTC: the minute before does not count.
    let s = evaluate(
        &slo(
            Objective::Availability,
            99.0,
            Window::Calendar(Calendar::Day),
        ),
        NOW,
        &m,
        &BTreeMap::new(),
    );
    assert_eq!((s.total, s.good), (200.0, 200.0), "calendar day");
    // A rolling 24 h window reaches back past midnight.
    let s = evaluate(
        &slo(
            Objective::Availability,
            99.0,
            Window::Rolling(Duration::from_secs(86_400)),
        ),
        NOW,
        &m,
        &BTreeMap::new(),
    );
    assert_eq!((s.total, s.good), (300.0, 200.0), "rolling day");
    // A rolling hour does not; the slot its start falls in does count, whole.
    let hour: BTreeMap<u64, Counts> = [
        (NOW - NOW % MINUTE - 61 * MINUTE, counts(10.0, 10.0)),
        (NOW - NOW % MINUTE - 60 * MINUTE, counts(20.0, 0.0)),
        (NOW - NOW % MINUTE, counts(30.0, 0.0)),
    ]
    .into();
    let s = evaluate(
        &slo(
            Objective::Availability,
            99.0,
            Window::Rolling(Duration::from_secs(HOUR)),
        ),
        NOW,
        &hour,
        &BTreeMap::new(),
    );
    assert_eq!((s.total, s.good), (50.0, 50.0), "rolling hour");
}

#[test]
fn long_windows_sum_hours_and_burn_rates_use_minutes() {
    let window = Window::Rolling(Duration::from_secs(30 * 86_400));
    assert_eq!(
        reads(window, NOW),
        Reads {
            minutes_from: (NOW - 6 * HOUR) - (NOW - 6 * HOUR) % MINUTE,
            hours_from: Some((NOW - 30 * 86_400) - (NOW - 30 * 86_400) % HOUR),
        }
    );
    let short = Window::Rolling(Duration::from_secs(2 * HOUR));
    assert_eq!(
        reads(short, NOW),
        Reads {
            minutes_from: (NOW - 6 * HOUR) - (NOW - 6 * HOUR) % MINUTE,
            hours_from: None,
        }
    );
    let day = Window::Calendar(Calendar::Day);
    assert_eq!(reads(day, NOW).hours_from, None);
    assert_eq!(
        reads(day, NOW).minutes_from,
        1_710_460_800.min(NOW - 6 * HOUR)
    );

    // Hours: 10 days ago all bad, this hour all good. Minutes hold only the recent part.
    let hour = |ago: u64| NOW - NOW % HOUR - ago * HOUR;
    let hours: BTreeMap<u64, Counts> = [
        (hour(240), counts(100.0, 100.0)),
        (hour(0), counts(100.0, 0.0)),
    ]
    .into();
    let mins = minutes(&[(0, counts(100.0, 0.0))]);
    let s = evaluate(
        &slo(Objective::Availability, 99.0, window),
        NOW,
        &mins,
        &hours,
    );
    assert_eq!((s.total, s.good), (200.0, 100.0));
    assert_eq!(
        s.burn,
        BurnRates::default(),
        "old badness burns nothing now"
    );
}

#[test]
fn burn_rates_per_window() {
    // Goal 99%: 1% allowed. 50% bad in the last 5 minutes, nothing bad before, 100/minute.
    let mut slots: Vec<(u64, Counts)> = (0..360).map(|age| (age, counts(100.0, 0.0))).collect();
    for slot in slots.iter_mut().take(5) {
        slot.1.bad = 50.0;
    }
    let s = evaluate(
        &slo(
            Objective::Availability,
            99.0,
            Window::Rolling(Duration::from_secs(HOUR)),
        ),
        NOW,
        &minutes(&slots),
        &BTreeMap::new(),
    );
    // Each window holds its minutes plus the one its start falls in.
    let rate = |window_minutes: f64| 250.0 / (100.0 * (window_minutes + 1.0)) / 0.01;
    for (got, want, w) in [
        (s.burn.m5, rate(5.0), "5m"),
        (s.burn.m30, rate(30.0), "30m"),
        (s.burn.h1, rate(60.0), "1h"),
        (s.burn.h6, 250.0 / (100.0 * 360.0) / 0.01, "6h"),
    ] {
        assert!((got - want).abs() < 1e-9, "{w}: {got} != {want}");
    }
    // 5m ≈ 41.7 but 1h ≈ 4.1: five bad minutes in an otherwise clean hour do not page.
    assert_eq!(s.condition, Severity::Ok);
}

#[test]
fn multiwindow_condition() {
    let alerting = Alerting {
        fast_burn: 14.4,
        slow_burn: 6.0,
        webhook: None,
    };
    let b = |m5, m30, h1, h6| BurnRates { m5, m30, h1, h6 };
    for (name, burn, want) in [
        ("nothing burns", b(0.0, 0.0, 0.0, 0.0), Severity::Ok),
        (
            "1h and 5m above fast",
            b(20.0, 20.0, 15.0, 3.0),
            Severity::FastBurn,
        ),
        (
            "1h above fast, 5m not: it stopped",
            b(1.0, 20.0, 15.0, 3.0),
            Severity::Ok,
        ),
        (
            "5m above fast, 1h not: a blip",
            b(100.0, 5.0, 10.0, 2.0),
            Severity::Ok,
        ),
        (
            "a blip that is also a slow burn",
            b(100.0, 7.0, 10.0, 7.0),
            Severity::SlowBurn,
        ),
        (
            "6h and 30m above slow",
            b(1.0, 7.0, 5.0, 6.5),
            Severity::SlowBurn,
        ),
        (
            "6h above slow, 30m not",
            b(1.0, 5.0, 5.0, 6.5),
            Severity::Ok,
        ),
        (
            "30m above slow, 6h not",
            b(1.0, 9.0, 5.0, 5.0),
            Severity::Ok,
        ),
        (
            "exactly at the thresholds is not above",
            b(14.4, 6.0, 14.4, 6.0),
            Severity::Ok,
        ),
        (
            "fast wins over slow",
            b(20.0, 20.0, 20.0, 20.0),
            Severity::FastBurn,
        ),
    ] {
        assert_eq!(condition(&alerting, &burn), want, "{name}");
    }
}

#[test]
fn alert_transitions() {
    use Severity::{FastBurn, Ok, SlowBurn};
    let alert = |severity, since_unix| {
        Some(Alert {
            severity,
            since_unix,
        })
    };
    let firing = |severity| {
        Some(Event::Firing {
            severity,
            since_unix: 100,
        })
    };
    for (name, current, cond, want_alert, want_event) in [
        ("ok stays ok", None, Ok, None, None),
        (
            "ok → slow fires",
            None,
            SlowBurn,
            alert(SlowBurn, 100),
            firing(SlowBurn),
        ),
        (
            "ok → fast fires",
            None,
            FastBurn,
            alert(FastBurn, 100),
            firing(FastBurn),
        ),
        (
            "slow → fast escalates",
            alert(SlowBurn, 50),
            FastBurn,
            alert(FastBurn, 100),
            firing(FastBurn),
        ),
        (
            "slow stays slow",
            alert(SlowBurn, 50),
            SlowBurn,
            alert(SlowBurn, 50),
            None,
        ),
        (
            "fast stays fast",
            alert(FastBurn, 50),
            FastBurn,
            alert(FastBurn, 50),
            None,
        ),
        (
            "fast → slow holds fast",
            alert(FastBurn, 50),
            SlowBurn,
            alert(FastBurn, 50),
            None,
        ),
        (
            "fast → ok resolves",
            alert(FastBurn, 50),
            Ok,
            None,
            Some(Event::Resolved {
                was: FastBurn,
                since_unix: 50,
            }),
        ),
        (
            "slow → ok resolves",
            alert(SlowBurn, 70),
            Ok,
            None,
            Some(Event::Resolved {
                was: SlowBurn,
                since_unix: 70,
            }),
        ),
    ] {
        assert_eq!(
            next_alert(current, cond, 100),
            (want_alert, want_event),
            "{name}"
        );
    }
}

#[test]
fn window_names() {
    assert_eq!(
        window_name(Window::Rolling(Duration::from_secs(30 * 86_400))),
        "30d"
    );
    assert_eq!(
        window_name(Window::Calendar(Calendar::Month)),
        "calendar month"
    );
}
