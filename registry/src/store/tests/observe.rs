//! Observability cases of the [`Store`] contract (both stores): node reports, edge minutes,
//! service series, pruning and SLO alerts; plus sled-only reopen and hard-kill cases.

use std::path::Path;

use super::{CRASH_DIR_ENV, kv_store, reopen, run_aborting_child};
use crate::slo::Severity;
use crate::store::{
    CertExpiryRecord, EdgeKey, MemoryStore, NodeReportRecord, Protocol, ServiceSlot, SledStore,
    SloAlertRecord, Step, Store, Traffic, WarningRecord,
};

contract_suite!(
    last_report_per_node,
    reports_keep_the_last_warnings,
    edges_add_up_per_minute,
    edges_to_another_site_are_their_own,
    service_series_roll_up_callers,
    service_series_do_not_leak_between_similar_names,
    prune_drops_old_traffic_only,
    slo_alerts_put_list_delete,
);

/// 2023-11-14T22:13:00Z, on a minute.
const MINUTE: u64 = 1_699_999_980;

fn report(node: &str, received_unix_ms: u64) -> NodeReportRecord {
    NodeReportRecord {
        node: node.to_owned(),
        received_unix_ms,
        clock_skew_ms: -12,
        sent_unix_ms: received_unix_ms.saturating_sub(12),
        period_ms: 10_000,
        policy_revision: 4,
        keyring_revision: 1,
        config_generation: 2,
        members: 3,
        members_digest: "d".to_owned(),
        certificates: vec![CertExpiryRecord {
            identity: format!("spiffe://mesh.test/node/{node}"),
            not_after_unix: 1,
        }],
        version: "0.1.0".to_owned(),
        warnings: Vec::new(),
    }
}

fn edge(source: &str, destination: &str, mtls: bool, protocol: Protocol) -> EdgeKey {
    EdgeKey {
        source: source.to_owned(),
        destination: destination.to_owned(),
        mtls,
        protocol,
        destination_site: String::new(),
    }
}

fn traffic(requests: u64, errors: u64, buckets: &[u64]) -> Traffic {
    Traffic {
        requests,
        errors,
        bytes: requests * 10,
        latency_buckets: buckets.to_vec(),
    }
}

fn web_to_api() -> EdgeKey {
    edge("shop/web", "shop/api", true, Protocol::Http)
}

// === contract cases ===

fn last_report_per_node(store: &dyn Store) {
    assert!(store.node_reports().unwrap().is_empty());
    store
        .record_report(&report("n2", 1_000), MINUTE, &[])
        .unwrap();
    store
        .record_report(&report("n1", 2_000), MINUTE, &[])
        .unwrap();
    store
        .record_report(&report("n2", 3_000), MINUTE, &[])
        .unwrap();
    assert_eq!(
        store.node_reports().unwrap(),
        [report("n1", 2_000), report("n2", 3_000)]
    );
}

/// A node's warnings are those of its last report: added, changed, and gone once it reports
/// none.
fn reports_keep_the_last_warnings(store: &dyn Store) {
    let warning = |code: &str, message: &str| WarningRecord {
        code: code.to_owned(),
        message: message.to_owned(),
    };
    let with = |received, warnings: Vec<WarningRecord>| NodeReportRecord {
        warnings,
        ..report("n1", received)
    };
    let two = vec![
        warning(
            "listener_off_loopback",
            "web.toml: upstreams[0].bind: 0.0.0.0:9001 — «x»",
        ),
        warning("policy_kind_skipped", "Gateway/shop/edge"),
    ];
    for r in [
        with(1, two),
        with(2, vec![warning("a", "b")]),
        with(3, Vec::new()),
    ] {
        store.record_report(&r, MINUTE, &[]).unwrap();
        assert_eq!(store.node_reports().unwrap(), [r]);
    }
}

/// Records written before reports carried warnings read as reports without any.
#[test]
fn reports_stored_without_warnings_still_read() {
    let mut old = serde_json::to_value(report("n1", 1)).unwrap();
    old.as_object_mut().unwrap().remove("warnings");
    let read: NodeReportRecord = serde_json::from_value(old).unwrap();
    assert_eq!(read, report("n1", 1));
}

fn edges_add_up_per_minute(store: &dyn Store) {
    let next = MINUTE + 60;
    store
        .record_report(
            &report("n1", 1),
            MINUTE,
            &[(web_to_api(), traffic(10, 1, &[5, 5]))],
        )
        .unwrap();
    store
        .record_report(
            &report("n2", 2),
            MINUTE,
            &[
                (web_to_api(), traffic(20, 2, &[1, 1, 18])),
                (
                    edge("external", "shop/web", false, Protocol::Tcp),
                    traffic(3, 0, &[]),
                ),
            ],
        )
        .unwrap();
    store
        .record_report(
            &report("n1", 3),
            next,
            &[(web_to_api(), traffic(1, 0, &[1]))],
        )
        .unwrap();
    let all: Vec<_> = store
        .edge_minutes(MINUTE)
        .unwrap()
        .into_iter()
        .map(|m| (m.minute_unix, m.edge.source, m.traffic))
        .collect();
    assert_eq!(
        all,
        [
            (MINUTE, "external".to_owned(), traffic(3, 0, &[])),
            (MINUTE, "shop/web".to_owned(), traffic(30, 3, &[6, 6, 18])),
            (next, "shop/web".to_owned(), traffic(1, 0, &[1])),
        ]
    );
    let recent = store.edge_minutes(MINUTE + 1).unwrap();
    assert_eq!(recent.len(), 1, "a range starts at a minute");
    assert_eq!(recent[0].minute_unix, next);
}

fn edges_to_another_site_are_their_own(store: &dyn Store) {
    let to_b = EdgeKey {
        destination_site: "b".to_owned(),
        ..web_to_api()
    };
    store
        .record_report(
            &report("n1", 1),
            MINUTE,
            &[
                (web_to_api(), traffic(10, 0, &[10])),
                (to_b.clone(), traffic(4, 1, &[0, 4])),
            ],
        )
        .unwrap();
    store
        .record_report(&report("n2", 2), MINUTE, &[(to_b, traffic(1, 0, &[1]))])
        .unwrap();
    let all: Vec<_> = (store.edge_minutes(MINUTE).unwrap().into_iter())
        .map(|m| (m.edge.destination_site, m.traffic))
        .collect();
    assert_eq!(
        all,
        [
            (String::new(), traffic(10, 0, &[10])),
            ("b".to_owned(), traffic(5, 1, &[1, 4])),
        ]
    );
    // A record written before sites (no field) reads as this site's edge.
    let mut old = serde_json::to_value(web_to_api()).unwrap();
    assert!(old.get("destination_site").is_none(), "{old}");
    old.as_object_mut().unwrap().remove("destination_site");
    assert_eq!(
        serde_json::from_value::<EdgeKey>(old).unwrap(),
        web_to_api()
    );
}

fn service_series_roll_up_callers(store: &dyn Store) {
    let hour = MINUTE - MINUTE % 3_600;
    store
        .record_report(
            &report("n1", 1),
            MINUTE,
            &[
                (web_to_api(), traffic(10, 1, &[10])),
                (
                    edge("shop/cron", "shop/api", false, Protocol::Http),
                    traffic(5, 5, &[0, 5]),
                ),
                (
                    edge("shop/web", "shop/api", true, Protocol::Tcp),
                    traffic(2, 1, &[]),
                ),
                (
                    edge("shop/api", "shop/db", true, Protocol::Tcp),
                    traffic(7, 0, &[]),
                ),
            ],
        )
        .unwrap();
    store
        .record_report(
            &report("n2", 2),
            MINUTE + 60,
            &[(web_to_api(), traffic(1, 0, &[1]))],
        )
        .unwrap();
    let slot = |start_unix, protocol, traffic| ServiceSlot {
        start_unix,
        protocol,
        traffic,
    };
    assert_eq!(
        store.service_slots("shop/api", Step::Minute, 0).unwrap(),
        [
            slot(MINUTE, Protocol::Http, traffic(15, 6, &[10, 5])),
            slot(MINUTE, Protocol::Tcp, traffic(2, 1, &[])),
            slot(MINUTE + 60, Protocol::Http, traffic(1, 0, &[1])),
        ]
    );
    assert_eq!(
        store
            .service_slots("shop/api", Step::Minute, MINUTE + 1)
            .unwrap(),
        [slot(MINUTE + 60, Protocol::Http, traffic(1, 0, &[1]))]
    );
    // Both minutes fall in one hour.
    assert_eq!(
        store.service_slots("shop/api", Step::Hour, 0).unwrap(),
        [
            slot(hour, Protocol::Http, traffic(16, 6, &[11, 5])),
            slot(hour, Protocol::Tcp, traffic(2, 1, &[])),
        ]
    );
    assert_eq!(
        store.service_slots("shop/db", Step::Hour, hour).unwrap(),
        [slot(hour, Protocol::Tcp, traffic(7, 0, &[]))]
    );
    assert!(
        store
            .service_slots("shop/none", Step::Minute, 0)
            .unwrap()
            .is_empty()
    );
}

fn service_series_do_not_leak_between_similar_names(store: &dyn Store) {
    store
        .record_report(
            &report("n1", 1),
            MINUTE,
            &[
                (
                    edge("shop/web", "shop/api2", true, Protocol::Http),
                    traffic(1, 0, &[]),
                ),
                (
                    edge("shop/web", "shop/ap", true, Protocol::Http),
                    traffic(2, 0, &[]),
                ),
            ],
        )
        .unwrap();
    for (service, want) in [("shop/api", 0), ("shop/api2", 1), ("shop/ap", 2)] {
        let got: u64 = store
            .service_slots(service, Step::Minute, 0)
            .unwrap()
            .iter()
            .map(|s| s.traffic.requests)
            .sum();
        assert_eq!(got, want, "{service}");
    }
}

fn prune_drops_old_traffic_only(store: &dyn Store) {
    let day = 86_400;
    let (old, mid, new) = (MINUTE - 40 * day, MINUTE - 3 * day, MINUTE);
    for t in [old, mid, new] {
        store
            .record_report(
                &report("n1", t * 1_000),
                t,
                &[(web_to_api(), traffic(1, 0, &[]))],
            )
            .unwrap();
    }
    // Traffic and hour slots older than 35 days go; minute slots older than 2 days go.
    let removed = store
        .prune_traffic(MINUTE - 35 * day, MINUTE - 2 * day)
        .unwrap();
    // old: edge minute, minute slot, hour slot; mid: minute slot.
    assert_eq!(removed, 4);
    let minutes: Vec<u64> = store
        .edge_minutes(0)
        .unwrap()
        .iter()
        .map(|m| m.minute_unix)
        .collect();
    assert_eq!(minutes, [mid, new]);
    let starts = |step| -> Vec<u64> {
        store
            .service_slots("shop/api", step, 0)
            .unwrap()
            .iter()
            .map(|s| s.start_unix)
            .collect()
    };
    assert_eq!(starts(Step::Minute), [new]);
    assert_eq!(starts(Step::Hour), [mid - mid % 3_600, new - new % 3_600]);
    assert_eq!(
        store.node_reports().unwrap().len(),
        1,
        "reports are not traffic"
    );
}

fn slo_alerts_put_list_delete(store: &dyn Store) {
    let alert = |slo: &str, severity, since_unix| SloAlertRecord {
        slo: slo.to_owned(),
        severity,
        since_unix,
    };
    assert!(store.slo_alerts().unwrap().is_empty());
    store
        .put_slo_alert(&alert("SLO/shop/b", Severity::SlowBurn, 1))
        .unwrap();
    store
        .put_slo_alert(&alert("SLO/shop/a", Severity::FastBurn, 2))
        .unwrap();
    store
        .put_slo_alert(&alert("SLO/shop/b", Severity::FastBurn, 3))
        .unwrap();
    assert_eq!(
        store.slo_alerts().unwrap(),
        [
            alert("SLO/shop/a", Severity::FastBurn, 2),
            alert("SLO/shop/b", Severity::FastBurn, 3)
        ]
    );
    store.delete_slo_alert("SLO/shop/a").unwrap();
    store.delete_slo_alert("SLO/shop/none").unwrap();
    assert_eq!(
        store.slo_alerts().unwrap(),
        [alert("SLO/shop/b", Severity::FastBurn, 3)]
    );
}

// === sled only ===

#[test]
fn sled_observability_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let alert = SloAlertRecord {
        slo: "SLO/shop/api".to_owned(),
        severity: Severity::FastBurn,
        since_unix: 7,
    };
    {
        let store = reopen(dir.path()).unwrap();
        store
            .record_report(
                &report("n1", 5),
                MINUTE,
                &[(web_to_api(), traffic(4, 1, &[4]))],
            )
            .unwrap();
        store.put_slo_alert(&alert).unwrap();
    }
    let store = reopen(dir.path()).unwrap();
    assert_eq!(store.node_reports().unwrap(), [report("n1", 5)]);
    assert_eq!(store.edge_minutes(0).unwrap().len(), 1);
    assert_eq!(
        store
            .service_slots("shop/api", Step::Hour, 0)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.slo_alerts().unwrap(), [alert]);
}

const CRASH_REPORTS: u64 = 10;

/// Child half of [`sled_flushed_reports_and_alerts_survive_abort`]: records reports, flushes,
/// puts an alert, then aborts straight after. Does nothing unless the parent set
/// [`CRASH_DIR_ENV`].
#[test]
#[ignore = "run as a child process by sled_flushed_reports_and_alerts_survive_abort"]
fn sled_observe_crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let store = SledStore::open(Path::new(&dir)).unwrap();
    for i in 0..CRASH_REPORTS {
        store
            .record_report(
                &report("n1", i),
                MINUTE,
                &[(web_to_api(), traffic(1, 0, &[1]))],
            )
            .unwrap();
    }
    store.flush().unwrap();
    store
        .put_slo_alert(&SloAlertRecord {
            slo: "SLO/shop/api".to_owned(),
            severity: Severity::SlowBurn,
            since_unix: 9,
        })
        .unwrap();
    eprintln!("crash child: all writes acknowledged, aborting");
    std::process::abort();
}

#[test]
fn sled_flushed_reports_and_alerts_survive_abort() {
    let dir = tempfile::tempdir().unwrap();
    run_aborting_child(
        concat!(module_path!(), "::sled_observe_crash_child"),
        dir.path(),
    );
    let store = reopen(dir.path()).unwrap();
    assert_eq!(
        store.node_reports().unwrap(),
        [report("n1", CRASH_REPORTS - 1)]
    );
    let minutes = store.edge_minutes(0).unwrap();
    assert_eq!(minutes[0].traffic.requests, CRASH_REPORTS);
    assert_eq!(store.slo_alerts().unwrap().len(), 1);
}

#[test]
fn memory_store_flush_is_a_no_op() {
    MemoryStore::new().flush().unwrap();
}
