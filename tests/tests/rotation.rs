//! Certificate rotation under traffic: short-lived workload certificates renew at half-life
//! while short connections keep succeeding and a long-lived connection streams across several
//! rotations intact.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_e2e::apps::Echo;
use mesh_e2e::{Cluster, Load, Node, PairSpec, RegistryOpts, ServiceSpec, Stream, WAIT, next_ip};

const RENEWALS: &str = "meshd_certificate_renewals_total";
const RENEWAL_FAILURES: &str = "meshd_certificate_renewal_failures_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_rotate_under_traffic_without_a_failed_connection() {
    let ttl = Duration::from_secs(6);
    let run_for = Duration::from_secs(15);
    let mut cluster = Cluster::new(RegistryOpts {
        workload_cert_ttl: ttl,
        ..RegistryOpts::default()
    })
    .await
    .unwrap();
    let b_ip = next_ip();
    let echo = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let upstream = cluster
        .pair(PairSpec::new(b_ip, ServiceSpec::new("api", echo.addr)))
        .await
        .unwrap();

    let mut before = Vec::new();
    for n in &cluster.nodes {
        let na = n.workload_not_after().await.unwrap();
        assert_eq!(
            na.len(),
            1,
            "{}: one workload certificate: {na:?}",
            n.spec.name
        );
        before.push((
            n.metric(RENEWALS, &[]).await.unwrap(),
            n.metric(RENEWAL_FAILURES, &[]).await.unwrap(),
            na,
        ));
    }
    let issued_before = cluster
        .registry
        .metric("mesh_registry_certificates_issued_total", &[])
        .await
        .unwrap();

    // One long-lived connection (64 KiB every 50 ms) and continuous short connections.
    let stream = Stream::start(upstream, 64 * 1024, Duration::from_millis(50))
        .await
        .unwrap();
    let load = Load::start(upstream, 4, 8 * 1024, Duration::from_secs(10));
    let changes = watch_renewals(&cluster.nodes[1], run_for);
    let started = Instant::now();
    // Run for `run_for`, checking that the load keeps making progress all along.
    while started.elapsed() < run_for {
        load.progress(20, WAIT).await.unwrap();
    }
    // When a's certificate changed: renewal starts in [0.5, 0.55) of the life it was received
    // with (identity::renew, unit-tested with an injected draw), and the new one arrives an
    // issuance round trip later. Observed every 50 ms on the node's own /config_dump; under
    // the whole suite's load one observation came 0.24 s late (a gap of 2.76 s for a 6 s
    // certificate), hence 0.5 s of slack below: still far from a renewal at a quarter of the
    // life (1.5 s) or at 95% (5.7 s).
    let seen = changes.await.unwrap();
    let gaps: Vec<f64> = seen.windows(2).map(|w| w[1] - w[0]).collect();
    let (low, high) = (
        0.5 * ttl.as_secs_f64() - 0.5,
        0.55 * ttl.as_secs_f64() + 0.8,
    );
    eprintln!("a's certificate changes {seen:?}: gaps {gaps:?} (allowed {low}..{high} s)");
    assert!(gaps.len() >= 2, "at least two renewals watched: {seen:?}");
    for g in &gaps {
        assert!(
            (low..=high).contains(g),
            "a renewal came {g:.2} s after the previous one: not at half-life of a {ttl:?} certificate"
        );
    }
    let (sent, sent_sha, echoed_sha) = stream.finish(Duration::from_secs(30)).await.unwrap();
    let report = load.stop().await;
    let elapsed = started.elapsed();

    let mut renewed = Vec::new();
    for (n, (r0, f0, na0)) in cluster.nodes.iter().zip(&before) {
        let r = n.metric(RENEWALS, &[]).await.unwrap() - r0;
        let f = n.metric(RENEWAL_FAILURES, &[]).await.unwrap() - f0;
        let na = n.workload_not_after().await.unwrap();
        // The expiry gauge follows the installed certificate.
        let svc = na0[0].0.rsplit('/').next().unwrap().to_owned();
        let identity = format!("spiffe://mesh.test/ns/default/svc/{svc}");
        let gauge = n
            .metric(
                "meshd_certificate_expiry_timestamp_seconds",
                &[("identity", &identity)],
            )
            .await
            .unwrap();
        assert!(
            gauge > na0[0].1 as f64,
            "{}: expiry gauge of {identity} ({gauge}) did not move past {}",
            n.spec.name,
            na0[0].1
        );
        renewed.push((n.spec.name.clone(), r, f, na0.clone(), na));
    }
    let issued = cluster
        .registry
        .metric("mesh_registry_certificates_issued_total", &[])
        .await
        .unwrap()
        - issued_before;
    eprintln!(
        "rotation over {elapsed:?}: {} short connections ({} failed), long stream {} MiB; \
         renewals per node (name, renewed, failures, not_after before, after): {renewed:?}; \
         certificates issued by the registry: {issued}",
        report.ok,
        report.failed,
        sent >> 20
    );

    // Resumed sessions carry the server certificate of their chain's first handshake; after the
    // server rotates, that certificate expires and the client must refuse the resumption and
    // reconnect with a full handshake, invisibly to the app (the zero-failure check below).
    // Whether a run hits that path depends on how the two nodes' renewals interleave (a client
    // rotation starts fresh ticket chains), so it is reported here and proven deterministically
    // in meshd's `proxy::tls` tests.
    let a = &cluster.nodes[1];
    // (Reported, not asserted: a run without a stale resumption has no such series yet.)
    let stale = a
        .metric_or_zero(
            "meshd_rejected_connections_total",
            &[("direction", "outbound"), ("reason", "stale_resumption")],
        )
        .await
        .unwrap();
    let resumed = a
        .metric(
            "meshd_tls_handshakes_total",
            &[("direction", "outbound"), ("kind", "resumed")],
        )
        .await
        .unwrap();
    eprintln!("stale resumptions refused and retried: {stale}; resumed handshakes: {resumed}");
    assert!(
        resumed > 100.0,
        "connections resume between rotations: {resumed}"
    );
    assert_eq!(
        report.failed, 0,
        "failed short connections: {:?}",
        report.errors
    );
    assert!(report.ok > 100, "short connections ran: {}", report.ok);
    assert!(
        sent > 10 << 20,
        "the long connection streamed across the rotations: {sent} bytes"
    );
    assert_eq!(
        echoed_sha, sent_sha,
        "long-lived connection intact across rotations"
    );
    // Renewal at half-life (plus up to 5% jitter): one workload certificate per node renews
    // about every ttl/2 — at least twice in the run, and not in a storm.
    let most = (elapsed.as_secs_f64() / (ttl.as_secs_f64() * 0.5)).ceil() + 1.0;
    for (name, r, f, na0, na) in &renewed {
        assert!(
            *r >= 2.0,
            "{name}: only {r} renewals in {elapsed:?} with a {ttl:?} ttl"
        );
        assert!(
            *r <= most,
            "{name}: {r} renewals in {elapsed:?} with a {ttl:?} ttl (at most {most} expected at half-life)"
        );
        assert_eq!(*f, 0.0, "{name}: renewal failures with the registry up");
        assert_eq!(
            na.len(),
            1,
            "{name}: one workload certificate after: {na:?}"
        );
        assert!(
            na[0].1 > na0[0].1,
            "{name}: workload certificate not_after moved on: {na0:?} → {na:?}"
        );
    }
    assert!(
        issued >= 4.0,
        "the registry issued the renewed certificates: {issued}"
    );
}

/// Seconds (since the watch started) at which `node`'s workload certificate was first seen
/// with a new `not_after`, polled every 50 ms for `duration`.
fn watch_renewals(node: &Node, duration: Duration) -> tokio::task::JoinHandle<Vec<f64>> {
    let admin = node.admin.to_string();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut last = None;
        let mut seen = Vec::new();
        while started.elapsed() < duration {
            if let Ok((200, body)) = mesh_e2e::http_get(&admin, "/config_dump").await {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let na = v["identity"]["workloads"][0]["not_after"].as_u64();
                if na.is_some() && na != last {
                    if last.is_some() {
                        seen.push(started.elapsed().as_secs_f64());
                    }
                    last = na;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    })
}
