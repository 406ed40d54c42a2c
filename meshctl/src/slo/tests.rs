//! The SLO status table and JSON, and the alert column.

use super::*;

const NOW: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

fn slo(name: &str, alert: &str, since: i64) -> pb::SloStatus {
    pb::SloStatus {
        slo: format!("SLO/shop/{name}"),
        service: "shop/api".into(),
        objective: "availability".into(),
        goal: 99.5,
        window: "30d".into(),
        total: 100_000,
        good: 99_873,
        sli: 99.873,
        budget_remaining: 0.746,
        burn_5m: 0.2,
        burn_30m: 0.31,
        burn_1h: 0.25,
        burn_6h: 0.4,
        alert: alert.into(),
        alert_since_unix: since,
    }
}

fn sample() -> Vec<pb::SloStatus> {
    let fast = pb::SloStatus {
        objective: "latency".into(),
        goal: 99.0,
        window: "calendar month".into(),
        sli: 95.0,
        budget_remaining: -1.25,
        burn_5m: 18.04,
        burn_1h: 14.4,
        burn_30m: 9.96,
        burn_6h: 6.0,
        ..slo("api-latency", ALERT_FAST_BURN, NOW - 754)
    };
    let slow = pb::SloStatus {
        service: "shop/web".into(),
        sli: 100.0,
        ..slo("web-availability", ALERT_SLOW_BURN, NOW - 3 * 3600)
    };
    vec![slow, slo("api-availability", ALERT_OK, 0), fast]
}

#[test]
fn table_has_one_row_per_slo_in_name_order() {
    let want = [
        "SLO                     SERVICE    OBJECTIVE      GOAL    WINDOW           SLI       \
         BUDGET LEFT   BURN 5M/1H   BURN 30M/6H   ALERT",
        "shop/api-availability   shop/api   availability   99.5%   30d              99.873%   \
         74.6%         0.2/0.2      0.3/0.4       ok",
        "shop/api-latency        shop/api   latency        99%     calendar month   95%       \
         -125.0%       18/14        10/6.0        FAST BURN since 2025-12-31T23:47:26Z (12m34s)",
        "shop/web-availability   shop/web   availability   99.5%   30d              100%      \
         74.6%         0.2/0.2      0.3/0.4       SLOW BURN since 2025-12-31T21:00:00Z (3h)",
    ];
    assert_eq!(table(&sample(), NOW), want.join("\n") + "\n");
    assert_eq!(
        table(&[], NOW),
        "SLO   SERVICE   OBJECTIVE   GOAL   WINDOW   SLI   BUDGET LEFT   BURN 5M/1H   \
         BURN 30M/6H   ALERT\n"
    );
}

#[test]
fn alert_states() {
    for (state, since, want) in [
        (ALERT_OK, 0, "ok"),
        ("", 0, "ok"),
        (ALERT_FAST_BURN, 0, "FAST BURN"),
        (
            ALERT_SLOW_BURN,
            NOW - 45,
            "SLOW BURN since 2025-12-31T23:59:15Z (45s)",
        ),
        // The registry's clock ahead of ours: never a negative age.
        (
            ALERT_FAST_BURN,
            NOW + 5,
            "FAST BURN since 2026-01-01T00:00:05Z (0ms)",
        ),
        ("budget_exhausted", 0, "BUDGET EXHAUSTED"),
    ] {
        assert_eq!(alert(&slo("x", state, since), NOW), want, "{state} {since}");
    }
}

#[test]
fn json_keeps_every_field() {
    let v: Value = serde_json::from_str(&json(&sample())).unwrap();
    let slos = v["slos"].as_array().unwrap();
    assert_eq!(slos.len(), 3);
    assert_eq!(slos[0]["slo"], "SLO/shop/api-availability");
    assert_eq!(slos[1]["alert"], "fast_burn");
    assert_eq!(slos[1]["alert_since_unix"], NOW - 754);
    assert_eq!(slos[0]["good"], 99_873);
    assert_eq!(slos[0]["burn_6h"], 0.4);
    assert_eq!(slos[2]["budget_remaining"], 0.746);
}

#[test]
fn numbers() {
    for (v, want) in [
        (99.5, "99.5%"),
        (99.873_4, "99.873%"),
        (100.0, "100%"),
        (0.0, "0%"),
    ] {
        assert_eq!(percent(v), want, "{v}");
    }
    for (v, want) in [(0.0, "0.0"), (0.96, "1.0"), (9.94, "9.9"), (14.4, "14")] {
        assert_eq!(burn(v), want, "{v}");
    }
    assert_eq!(name("SLO/shop/api"), "shop/api");
    assert_eq!(name("odd"), "odd");
}
