//! Table tests of report checking and topology aggregation.

use std::time::Duration;

use mesh_api::observe::{BUCKETS, bucket_of};
use mesh_api::proto::v1 as pb;

use super::*;
use crate::store::{EdgeKey, EdgeMinute, Protocol, Traffic};

const RECEIVED_MS: u64 = 1_700_000_000_500;

fn edge(source: &str, destination: &str, protocol: &str) -> pb::EdgeStats {
    pb::EdgeStats {
        source: source.to_owned(),
        destination: destination.to_owned(),
        mtls: true,
        protocol: protocol.to_owned(),
        requests: 10,
        errors: 1,
        latency_buckets: vec![10],
        bytes: 1_000,
        destination_site: String::new(),
    }
}

fn report(edges: Vec<pb::EdgeStats>) -> pb::NodeReport {
    pb::NodeReport {
        sent_unix_ms: RECEIVED_MS + 250,
        period_ms: 10_000,
        policy_revision: 7,
        keyring_revision: 2,
        config_generation: 1,
        members: 3,
        members_digest: "abc".to_owned(),
        certificates: vec![pb::CertExpiry {
            identity: "spiffe://mesh.test/node/n1".to_owned(),
            not_after_unix: 1_700_086_400,
        }],
        edges,
        version: "0.1.0".to_owned(),
        warnings: Vec::new(),
    }
}

fn warning(code: &str, message: &str) -> pb::NodeWarning {
    pb::NodeWarning {
        code: code.to_owned(),
        message: message.to_owned(),
    }
}

#[test]
fn a_good_report_is_kept_with_skew_and_summed_edges() {
    let mut twice = edge("shop/web", "shop/api", "http");
    twice.latency_buckets = vec![1, 2];
    let checked = check(
        "n1",
        &report(vec![
            edge("shop/web", "shop/api", "http"),
            twice,
            edge("external", "shop/web", "tcp"),
        ]),
        RECEIVED_MS,
    )
    .unwrap();
    assert_eq!(checked.record.node, "n1");
    assert_eq!(checked.record.clock_skew_ms, 250);
    assert_eq!(checked.record.received_unix_ms, RECEIVED_MS);
    assert_eq!(
        (checked.record.policy_revision, checked.record.members),
        (7, 3)
    );
    assert_eq!(checked.record.certificates.len(), 1);
    let edges: Vec<_> = checked
        .edges
        .iter()
        .map(|(k, t)| {
            (
                k.source.as_str(),
                k.protocol,
                t.requests,
                t.latency_buckets.clone(),
            )
        })
        .collect();
    assert_eq!(
        edges,
        [
            // TCP carries no durations: the node's bucket is dropped.
            ("external", Protocol::Tcp, 10, vec![]),
            // The same edge twice is one edge, summed bucket by bucket.
            ("shop/web", Protocol::Http, 20, vec![11, 2]),
        ]
    );
    let behind = pb::NodeReport {
        sent_unix_ms: RECEIVED_MS - 5_000,
        ..report(Vec::new())
    };
    assert_eq!(
        check("n1", &behind, RECEIVED_MS)
            .unwrap()
            .record
            .clock_skew_ms,
        -5_000
    );
    let no_clock = pb::NodeReport {
        sent_unix_ms: 0,
        ..report(Vec::new())
    };
    assert_eq!(
        check("n1", &no_clock, RECEIVED_MS)
            .unwrap()
            .record
            .clock_skew_ms,
        0
    );
}

#[test]
fn bad_reports_name_the_field() {
    let with = |f: fn(&mut pb::EdgeStats)| {
        let mut e = edge("shop/web", "shop/api", "http");
        f(&mut e);
        report(vec![edge("shop/a", "shop/b", "tcp"), e])
    };
    let many_edges = report(vec![
        edge("shop/web", "shop/api", "http");
        MAX_EDGES_PER_REPORT + 1
    ]);
    let many_certs = pb::NodeReport {
        certificates: vec![pb::CertExpiry::default(); MAX_CERTIFICATES_PER_REPORT + 1],
        ..report(Vec::new())
    };
    let long_version = pb::NodeReport {
        version: "v".repeat(MAX_TEXT_LEN + 1),
        ..report(Vec::new())
    };
    let with_warning = |code: &str, message: &str| pb::NodeReport {
        warnings: vec![warning("ok", "fine"), warning(code, message)],
        ..report(Vec::new())
    };
    let many_warnings = pb::NodeReport {
        warnings: vec![warning("w", "m"); observe::MAX_WARNINGS + 1],
        ..report(Vec::new())
    };
    for (name, r, want) in [
        (
            "unknown protocol",
            with(|e| e.protocol = "udp".to_owned()),
            "edges[1].protocol: \"udp\" is not \"http\" or \"tcp\"",
        ),
        (
            "protocol is case-sensitive",
            with(|e| e.protocol = "HTTP".to_owned()),
            "edges[1].protocol",
        ),
        (
            "source without namespace",
            with(|e| e.source = "web".to_owned()),
            "edges[1].source: \"web\" is not `namespace/name` or \"external\"",
        ),
        (
            "destination external",
            with(|e| e.destination = "external".to_owned()),
            "edges[1].destination: \"external\" is not `namespace/name`",
        ),
        (
            "three parts",
            with(|e| e.destination = "a/b/c".to_owned()),
            "edges[1].destination",
        ),
        (
            "bad label",
            with(|e| e.source = "Shop/web".to_owned()),
            "edges[1].source",
        ),
        (
            "NUL in a name",
            with(|e| e.source = "shop/w\0b".to_owned()),
            "edges[1].source",
        ),
        (
            "empty name",
            with(|e| e.destination = "shop/".to_owned()),
            "edges[1].destination",
        ),
        (
            "too many buckets",
            with(|e| e.latency_buckets = vec![0; BUCKETS + 1]),
            "edges[1].latency_buckets: 18 buckets, more than the 17",
        ),
        (
            "a site that is not a label",
            with(|e| e.destination_site = "Site B".to_owned()),
            "edges[1].destination_site: \"Site B\" is not a site name",
        ),
        (
            "more errors than requests",
            with(|e| e.errors = 11),
            "edges[1].errors: 11 errors, more than the 10 requests",
        ),
        (
            "too many edges",
            many_edges,
            "edges: 4097 edges in one report",
        ),
        (
            "too many certificates",
            many_certs,
            "certificates: 1025 certificates",
        ),
        ("long version", long_version, "version: 513 bytes"),
        (
            "too many warnings",
            many_warnings,
            "warnings: 65 warnings in one report, more than the 64 allowed",
        ),
        (
            "a code with capitals",
            with_warning("Listener", "m"),
            "warnings[1].code: \"Listener\" is not a warning code",
        ),
        ("an empty code", with_warning("", "m"), "warnings[1].code"),
        (
            "a multi-byte code",
            with_warning(&"é".repeat(100), "m"),
            "warnings[1].code",
        ),
        (
            "an empty message",
            with_warning("w", ""),
            "warnings[1].message: empty",
        ),
        (
            "a long message",
            with_warning("w", &"é".repeat(257)),
            "warnings[1].message: 514 bytes, longer than the 512 allowed",
        ),
        (
            "a terminal escape in a message",
            with_warning("w", "ok\u{1b}[2J"),
            "warnings[1].message: holds the control character '\\u{1b}'",
        ),
        (
            "a newline in a message",
            with_warning("w", "two\nlines"),
            "warnings[1].message: holds the control character '\\n'",
        ),
    ] {
        let err = check("n1", &r, RECEIVED_MS).unwrap_err().to_string();
        assert!(err.contains(want), "{name}: {err}");
    }
    // Exactly the limits is fine.
    let full = with(|e| e.latency_buckets = vec![1; BUCKETS]);
    assert!(check("n1", &full, RECEIVED_MS).is_ok());
    let full = pb::NodeReport {
        warnings: vec![
            warning(
                &"a".repeat(observe::MAX_WARNING_CODE_LEN),
                &"é".repeat(observe::MAX_WARNING_LEN / 2)
            );
            observe::MAX_WARNINGS
        ],
        ..report(Vec::new())
    };
    assert!(check("n1", &full, RECEIVED_MS).is_ok());
}

#[test]
fn warnings_are_kept_as_reported() {
    let r = pb::NodeReport {
        warnings: vec![
            warning(
                "listener_off_loopback",
                "/etc/meshd/services.d/web.toml: upstreams[0].bind: 0.0.0.0:9001 is not loopback",
            ),
            warning(
                "policy_kind_skipped",
                "Gateway/shop/x: kind unknown to this meshd — «skipped»",
            ),
        ],
        ..report(Vec::new())
    };
    let kept = check("n1", &r, RECEIVED_MS).unwrap().record.warnings;
    let got: Vec<(&str, &str)> = kept
        .iter()
        .map(|w| (w.code.as_str(), w.message.as_str()))
        .collect();
    let want: Vec<(&str, &str)> = r
        .warnings
        .iter()
        .map(|w| (w.code.as_str(), w.message.as_str()))
        .collect();
    assert_eq!(got, want);
}

fn minute(
    minute_unix: u64,
    source: &str,
    mtls: bool,
    requests: u64,
    errors: u64,
    ms: f64,
) -> EdgeMinute {
    let mut latency_buckets = vec![0; BUCKETS];
    latency_buckets[bucket_of(ms)] = requests;
    EdgeMinute {
        minute_unix,
        edge: EdgeKey {
            source: source.to_owned(),
            destination: "shop/api".to_owned(),
            mtls,
            protocol: Protocol::Http,
            destination_site: String::new(),
        },
        traffic: Traffic {
            requests,
            errors,
            bytes: requests * 100,
            latency_buckets,
        },
    }
}

#[test]
fn topology_merges_minutes_per_edge() {
    // Two reports (two minutes, two nodes' worth) of the same edge, one plaintext edge and one
    // TCP edge.
    let tcp = EdgeMinute {
        minute_unix: 120,
        edge: EdgeKey {
            source: "external".to_owned(),
            destination: "shop/db".to_owned(),
            mtls: false,
            protocol: Protocol::Tcp,
            destination_site: String::new(),
        },
        traffic: Traffic {
            requests: 6,
            errors: 0,
            bytes: 10,
            latency_buckets: Vec::new(),
        },
    };
    let minutes = [
        minute(60, "shop/web", true, 100, 10, 40.0),
        minute(120, "shop/web", true, 100, 0, 40.0),
        minute(120, "shop/web", false, 30, 3, 400.0),
        tcp,
    ];
    let topo = topology(&minutes, Duration::from_secs(300));
    assert_eq!(topo.window_seconds, 300);
    let rows: Vec<_> = topo
        .edges
        .iter()
        .map(|e| {
            (
                e.source.as_str(),
                e.destination.as_str(),
                e.mtls,
                e.protocol.as_str(),
                e.requests,
                e.errors,
                e.bytes,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("external", "shop/db", false, "tcp", 6, 0, 10),
            ("shop/web", "shop/api", false, "http", 30, 3, 3_000),
            ("shop/web", "shop/api", true, "http", 200, 10, 20_000),
        ]
    );
    let merged = &topo.edges[2];
    assert!((merged.requests_per_second - 200.0 / 300.0).abs() < 1e-12);
    assert!((merged.error_rate - 0.05).abs() < 1e-12);
    // All 200 in (25, 50]: p50 halfway, p99 near the top.
    assert_eq!((merged.p50_ms, merged.p99_ms), (37.5, 49.75));
    let tcp = &topo.edges[0];
    assert_eq!((tcp.p50_ms, tcp.p99_ms, tcp.error_rate), (0.0, 0.0, 0.0));
}

#[test]
fn topology_keeps_an_edge_to_another_site_apart() {
    let mut to_b = minute(120, "shop/web", true, 7, 1, 40.0);
    to_b.edge.destination_site = "b".to_owned();
    let minutes = [
        minute(60, "shop/web", true, 100, 0, 4.0),
        to_b,
        minute(120, "shop/web", true, 100, 0, 4.0),
    ];
    let topo = topology(&minutes, Duration::from_secs(300));
    let rows: Vec<_> = (topo.edges.iter())
        .map(|e| (e.destination_site.as_str(), e.requests, e.errors))
        .collect();
    assert_eq!(rows, [("", 200, 0), ("b", 7, 1)]);
    let checked = check(
        "n1",
        &report(vec![pb::EdgeStats {
            destination_site: "b".to_owned(),
            ..edge("shop/web", "shop/api", "http")
        }]),
        RECEIVED_MS,
    )
    .unwrap();
    assert_eq!(checked.edges[0].0.destination_site, "b");
}

#[test]
fn windows_and_first_minute() {
    for (requested, want) in [
        (0, DEFAULT_TOPOLOGY_WINDOW),
        (60, Duration::from_secs(60)),
        (u64::MAX, RETENTION),
    ] {
        assert_eq!(topology_window(requested), want, "{requested}");
    }
    // The minute its start falls in, through the minute in progress.
    for (now, window, want) in [(1_000, 300, 660), (1_020, 300, 720), (30, 300, 0)] {
        assert_eq!(
            first_minute(now, Duration::from_secs(window)),
            want,
            "{now} {window}"
        );
    }
    assert_eq!(topology(&[], Duration::from_secs(60)).edges, []);
}
