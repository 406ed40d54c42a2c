//! Health checks on real meshd processes: an instance whose HTTP check fails leaves every
//! caller's load-balancing set (by gossip) and comes back when it passes again; with every
//! instance down a caller gets a fast, clear 503 instead of a hang.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mesh_e2e::http_app::{Client, HttpApp, tally};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, next_ip};

/// Checked every second; two failures make an instance unhealthy, one pass brings it back.
// A generous timeout: under a loaded CI machine a 150 ms one timed out twice in a row and took
// a healthy instance out mid-test.
const CHECK: &str = r#"http = "/healthz"
interval = "1s"
timeout = "900ms"
unhealthy_threshold = 2
healthy_threshold = 1"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_checks_take_an_instance_out_and_back() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let mut apps = Vec::new();
    for name in ["b1", "b2"] {
        let ip = next_ip();
        let app = HttpApp::start(SocketAddr::new(ip.into(), 0), name)
            .await
            .unwrap();
        let token = cluster.registry.token(&["api"], 1).unwrap();
        let mut spec = NodeSpec::new(name, token);
        spec.ip = ip.into();
        spec.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
        spec.services = vec![
            ServiceSpec::new("api", app.addr)
                .protocol("http")
                .check(CHECK),
        ];
        cluster.add_spec(spec).await.unwrap();
        apps.push(app);
    }
    let ip = next_ip();
    let upstream = SocketAddr::new(ip.into(), 19001);
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut a = NodeSpec::new("a", token);
    a.ip = ip.into();
    a.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
    a.services = vec![
        ServiceSpec::new("web", SocketAddr::new(ip.into(), 18080))
            .protocol("http")
            .upstream("api", upstream),
    ];
    cluster.add_spec(a).await.unwrap();
    cluster.converge().await.unwrap();
    // Round robin, so "both serve" below is certain: the default peak-EWMA balancer rightly
    // keeps a light load on whichever instance answered first.
    let rev = cluster
        .registry
        .apply(
            "rr.toml",
            "[[resource]]\nkind = \"DestinationPolicy\"\nname = \"api\"\nservice = \"api\"\nload_balancer = \"round_robin\"\n",
        )
        .unwrap();
    let a = cluster.node("a");
    a.wait_policy_revision(rev).await.unwrap();
    // Both instances pass their first check and are published healthy.
    a.wait_endpoints("default/api", 2).await.unwrap();
    let client = Client::new();
    let replies = client.get_many(upstream, "/", &[], 200, 4).await.unwrap();
    let t = tally(&replies);
    assert!(replies.iter().all(|r| r.status == 200), "{t:?}");
    assert!(
        replies.iter().any(|r| r.app == "b1") && replies.iter().any(|r| r.app == "b2"),
        "both serve: {t:?}"
    );

    // b1 fails its check: it leaves a's set and every request goes to b2.
    apps[0].behavior.status.store(503, Ordering::SeqCst);
    let flipped = std::time::Instant::now();
    a.wait_endpoints("default/api", 1).await.unwrap();
    // README: out of every caller's set within a round or two of the second failed check —
    // at most 2 intervals after the flip, plus gossip rounds, a check's duration and polling.
    let out = flipped.elapsed();
    assert!(
        out < Duration::from_secs(3),
        "b1 left a's set {out:?} after failing (2 checks at 1 s, then a gossip round or two)"
    );
    let replies = client.get_many(upstream, "/", &[], 200, 4).await.unwrap();
    let t = tally(&replies);
    assert!(
        replies.iter().all(|r| r.status == 200 && r.app == "b2"),
        "only b2 while b1 is unhealthy: {t:?}"
    );

    // Both fail: callers get a fast 503 saying there is no healthy endpoint, not a hang.
    apps[1].behavior.status.store(503, Ordering::SeqCst);
    a.wait_endpoints("default/api", 0).await.unwrap();
    let replies = client.get_many(upstream, "/", &[], 20, 2).await.unwrap();
    let t = tally(&replies);
    assert!(
        replies
            .iter()
            .all(|r| r.status == 503 && r.mesh_error == "outbound/no_endpoints"),
        "{t:?}"
    );
    let slowest = replies.iter().map(|r| r.elapsed).max().unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "fast failure: {slowest:?}"
    );

    // b1 recovers: one passing check brings it back.
    apps[0].behavior.status.store(0, Ordering::SeqCst);
    a.wait_endpoints("default/api", 1).await.unwrap();
    let replies = client.get_many(upstream, "/", &[], 100, 4).await.unwrap();
    let t = tally(&replies);
    assert!(
        replies.iter().all(|r| r.status == 200 && r.app == "b1"),
        "b1 is back: {t:?}"
    );
}
