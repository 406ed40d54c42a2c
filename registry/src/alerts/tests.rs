//! The evaluator's store side over the memory store: SLOs read from the policy, transitions
//! persisted once (fire, hold, resolve), a deleted SLO's alert dropped; the webhook JSON and
//! the exported metrics.

use mesh_api::policy::Resource;

use super::*;
use crate::store::{EdgeKey, MemoryStore, NodeReportRecord, PolicyChange, Protocol, Traffic};

/// On a minute.
const NOW: u64 = 1_700_000_040;

fn apply_slo(store: &dyn Store, name: &str, spec: &str) {
    let r = Resource::from_json("SLO", "shop", name, spec).unwrap();
    store
        .apply_policies(
            &[PolicyChange {
                kind: "SLO".to_owned(),
                namespace: "shop".to_owned(),
                name: name.to_owned(),
                spec_json: Some(r.spec_json()),
            }],
            "test",
            0,
            false,
        )
        .unwrap();
}

fn delete_slo(store: &dyn Store, name: &str) {
    let change = PolicyChange {
        kind: "SLO".to_owned(),
        namespace: "shop".to_owned(),
        name: name.to_owned(),
        spec_json: None,
    };
    store.apply_policies(&[change], "test", 0, false).unwrap();
}

/// `requests` to shop/api in the minute starting at `minute`, `errors` of them 5xx.
fn traffic(store: &dyn Store, minute: u64, requests: u64, errors: u64) {
    let report = NodeReportRecord {
        node: "n1".to_owned(),
        received_unix_ms: minute * 1_000,
        clock_skew_ms: 0,
        sent_unix_ms: minute * 1_000,
        period_ms: 60_000,
        policy_revision: 0,
        keyring_revision: 0,
        config_generation: 0,
        members: 1,
        members_digest: String::new(),
        certificates: Vec::new(),
        version: String::new(),
        warnings: Vec::new(),
    };
    let edge = EdgeKey {
        source: "shop/web".to_owned(),
        destination: "shop/api".to_owned(),
        mtls: true,
        protocol: Protocol::Http,
        destination_site: String::new(),
    };
    let t = Traffic {
        requests,
        errors,
        bytes: 0,
        latency_buckets: Vec::new(),
    };
    store.record_report(&report, minute, &[(edge, t)]).unwrap();
}

const AVAILABILITY: &str = r#"{"service":"api","objective":"availability","goal":99.9,"window":"30d","alerting":{"webhook":"http://127.0.0.1:1/hook"}}"#;

fn events(ticked: &[Ticked]) -> Vec<(&str, Option<Event>)> {
    ticked
        .iter()
        .map(|t| (t.evaluated.resource.name.as_str(), t.event))
        .collect()
}

#[test]
fn slos_come_from_the_current_policy() {
    let store = MemoryStore::new();
    assert!(current_slos(&store).unwrap().is_empty());
    apply_slo(&store, "api", AVAILABILITY);
    let slos = current_slos(&store).unwrap();
    assert_eq!(slos.len(), 1);
    assert_eq!(
        (slos[0].name.as_str(), slos[0].service.as_str()),
        ("SLO/shop/api", "shop/api")
    );
    assert_eq!(
        slos[0].slo.alerting.webhook.as_deref(),
        Some("http://127.0.0.1:1/hook")
    );
}

#[test]
fn fire_hold_resolve_once_each() {
    let store = MemoryStore::new();
    apply_slo(&store, "api", AVAILABILITY);
    let fast = |since_unix| Alert {
        severity: Severity::FastBurn,
        since_unix,
    };

    // No traffic: nothing to say.
    let (ticked, dropped) = tick(&store, NOW).unwrap();
    assert_eq!(events(&ticked), [("SLO/shop/api", None)]);
    assert!(dropped.is_empty());

    // Half the requests fail: fast burn, persisted, announced once.
    traffic(&store, NOW, 100, 50);
    let (ticked, _) = tick(&store, NOW + 5).unwrap();
    let firing = Event::Firing {
        severity: Severity::FastBurn,
        since_unix: (NOW + 5) as i64,
    };
    assert_eq!(events(&ticked), [("SLO/shop/api", Some(firing))]);
    assert_eq!(ticked[0].alert, Some(fast((NOW + 5) as i64)));
    let stored = store.slo_alerts().unwrap();
    assert_eq!(
        (stored[0].severity, stored[0].since_unix),
        (Severity::FastBurn, (NOW + 5) as i64)
    );
    let (ticked, _) = tick(&store, NOW + 10).unwrap();
    assert_eq!(events(&ticked), [("SLO/shop/api", None)], "no repeat");

    // Ten good minutes later the 5-minute window is clean but the 30-minute one is not: the
    // condition drops to a slow burn and the alert holds at fast, silently.
    for m in 1..=10 {
        traffic(&store, NOW + m * 60, 100, 0);
    }
    let (ticked, _) = tick(&store, NOW + 10 * 60).unwrap();
    assert_eq!(ticked[0].evaluated.status.condition, Severity::SlowBurn);
    assert_eq!(events(&ticked), [("SLO/shop/api", None)]);
    assert_eq!(ticked[0].alert, Some(fast((NOW + 5) as i64)));

    // Forty minutes on, the 30-minute window is clean too: resolved, deleted from the store.
    for m in 11..=40 {
        traffic(&store, NOW + m * 60, 100, 0);
    }
    let (ticked, _) = tick(&store, NOW + 40 * 60).unwrap();
    let resolved = Event::Resolved {
        was: Severity::FastBurn,
        since_unix: (NOW + 5) as i64,
    };
    assert_eq!(events(&ticked), [("SLO/shop/api", Some(resolved))]);
    assert!(store.slo_alerts().unwrap().is_empty());
}

#[test]
fn persisted_alert_is_not_fired_again() {
    // As after a restart: the store already holds the alert the traffic still warrants.
    let store = MemoryStore::new();
    apply_slo(&store, "api", AVAILABILITY);
    traffic(&store, NOW, 100, 50);
    store
        .put_slo_alert(&SloAlertRecord {
            slo: "SLO/shop/api".to_owned(),
            severity: Severity::FastBurn,
            since_unix: 1,
        })
        .unwrap();
    let (ticked, _) = tick(&store, NOW + 1).unwrap();
    assert_eq!(events(&ticked), [("SLO/shop/api", None)]);
    assert_eq!(store.slo_alerts().unwrap()[0].since_unix, 1);
}

#[test]
fn deleted_slo_drops_its_alert() {
    let store = MemoryStore::new();
    apply_slo(&store, "api", AVAILABILITY);
    traffic(&store, NOW, 100, 50);
    tick(&store, NOW).unwrap();
    assert_eq!(store.slo_alerts().unwrap().len(), 1);
    delete_slo(&store, "api");
    let (ticked, dropped) = tick(&store, NOW + 1).unwrap();
    assert!(ticked.is_empty());
    assert_eq!(dropped, ["SLO/shop/api"]);
    assert!(store.slo_alerts().unwrap().is_empty());
}

#[test]
fn webhook_json() {
    let store = MemoryStore::new();
    apply_slo(&store, "api", AVAILABILITY);
    traffic(&store, NOW, 100, 50);
    let e = evaluate_all(&store, NOW).unwrap().remove(0);
    let body: serde_json::Value =
        serde_json::from_slice(&webhook_body(&e, "fast_burn", 42)).unwrap();
    assert_eq!(body["slo"], "SLO/shop/api");
    assert_eq!(body["service"], "shop/api");
    assert_eq!(body["severity"], "fast_burn");
    assert_eq!(body["since_unix"], 42);
    assert_eq!(body["sli"], 50.0);
    let burn = body["burn_rates"].as_object().unwrap();
    let mut windows: Vec<&str> = burn.keys().map(String::as_str).collect();
    windows.sort_unstable();
    assert_eq!(windows, ["1h", "30m", "5m", "6h"]);
    assert!((burn["5m"].as_f64().unwrap() - 500.0).abs() < 1e-6);
    assert!(body["budget_remaining"].as_f64().unwrap() < 0.0);
}

#[test]
fn metrics_export_and_forget() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let store = MemoryStore::new();
    apply_slo(&store, "api", AVAILABILITY);
    traffic(&store, NOW, 100, 50);
    let e = evaluate_all(&store, NOW).unwrap().remove(0);
    metrics.export(
        &e,
        Some(Alert {
            severity: Severity::FastBurn,
            since_unix: 1,
        }),
    );
    let text = encode(&registry);
    for line in [
        "mesh_registry_slo_sli{slo=\"SLO/shop/api\"} 50.0",
        "mesh_registry_slo_alerting{slo=\"SLO/shop/api\",severity=\"fast_burn\"} 1",
        "mesh_registry_slo_alerting{slo=\"SLO/shop/api\",severity=\"slow_burn\"} 0",
        "mesh_registry_slo_burn_rate{slo=\"SLO/shop/api\",window=\"5m\"} 500.0",
        "mesh_registry_slo_error_budget_remaining{slo=\"SLO/shop/api\"} -",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    metrics.forget("SLO/shop/api");
    let text = encode(&registry);
    assert!(!text.contains("SLO/shop/api"), "{text}");
}

fn encode(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
    out
}
