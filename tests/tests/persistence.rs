//! Persistence and static stability: the registry loses no acknowledged record across kill -9,
//! meshd restarts and serves from its stored identity while the registry is down (even without
//! its token file), and a registry outage causes no failed request.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_e2e::apps::{self, Echo};
use mesh_e2e::{
    Cluster, Load, Node, NodeSpec, PairSpec, RegistryOpts, ServiceSpec, WAIT, eventually, next_ip,
};

struct Pair {
    cluster: Cluster,
    upstream: SocketAddr,
    _echo: Echo,
}

/// web (node a) → api (node b, echo app in the test process); `upstream` is a's bind for api.
async fn pair() -> Pair {
    pair_with(RegistryOpts::default()).await
}

async fn pair_with(opts: RegistryOpts) -> Pair {
    let mut cluster = Cluster::new(opts).await.unwrap();
    let b_ip = next_ip();
    let echo = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let upstream = cluster
        .pair(PairSpec::new(b_ip, ServiceSpec::new("api", echo.addr)))
        .await
        .unwrap();
    Pair {
        cluster,
        upstream,
        _echo: echo,
    }
}

/// `n` checksummed round trips of distinct payloads; every one must succeed.
async fn round_trips(addr: SocketAddr, n: u64, seed: u64) {
    for i in 0..n {
        let data = apps::payload(64 * 1024 + i as usize * 7, seed + i);
        let got = tokio::time::timeout(Duration::from_secs(10), apps::round_trip(addr, &data))
            .await
            .unwrap_or_else(|_| panic!("round trip {i} timed out"))
            .unwrap_or_else(|e| panic!("round trip {i}: {e}"));
        assert_eq!(apps::sha256(&got), apps::sha256(&data), "round trip {i}");
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_kill9_loses_no_acknowledged_record() {
    let mut c = Cluster::new(RegistryOpts::default()).await.unwrap();
    // Two joined nodes: node records, node certificates and workload certificates.
    let api = SocketAddr::new(next_ip().into(), 18080);
    let web = SocketAddr::new(next_ip().into(), 18081);
    c.add("n1", vec![ServiceSpec::new("api", api)])
        .await
        .unwrap();
    c.add("n2", vec![ServiceSpec::new("web", web)])
        .await
        .unwrap();
    for n in &c.nodes {
        let w = n.workload_not_after().await.unwrap();
        assert_eq!(
            w.len(),
            1,
            "{} holds its workload certificate: {w:?}",
            n.spec.name
        );
    }
    let used_token = c.nodes[0].spec.token.clone();
    let certs_before = c.registry.cert_records().unwrap();
    assert!(
        certs_before.len() >= 4,
        "two node and two workload certificates listed: {certs_before:?}"
    );

    // Many tokens, created concurrently right before the kill: each printed token is acknowledged.
    const TOKENS: usize = 30;
    let reg = &c.registry;
    let tokens: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..TOKENS)
            .map(|_| s.spawn(move || reg.token(&["default/*"], 1)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    assert_eq!(
        tokens.iter().collect::<BTreeSet<_>>().len(),
        TOKENS,
        "distinct tokens"
    );
    c.registry.kill9();
    c.registry.run().await.unwrap();

    // Nodes and certificate records survived.
    let names = c.registry.node_names().unwrap();
    for n in ["n1", "n2"] {
        assert!(
            names.iter().any(|x| x == n),
            "node {n} lost after kill -9: {names:?}"
        );
    }
    let certs_after: BTreeSet<_> = c.registry.cert_records().unwrap().into_iter().collect();
    for cert in &certs_before {
        assert!(
            certs_after.contains(cert),
            "certificate record {cert:?} lost after kill -9"
        );
    }

    // The consumed single-use token stays consumed: a replay is refused.
    let mut replay = NodeSpec::new("replay", used_token);
    replay.services = Vec::new();
    let mut replay = Node::start(&c.registry, replay).unwrap();
    eventually(WAIT, "the replayed single-use token to be refused", || {
        let running = replay.is_running();
        async move { (!running).then_some(()) }
    })
    .await
    .unwrap();
    let log = replay.log();
    // Refused because it is used up — not because the token record is gone.
    assert!(
        !log.contains("joined the mesh")
            && log.contains("refused the join")
            && log.contains("used")
            && !log.contains("not found"),
        "a consumed single-use token must be refused as used up after kill -9:\n{log}"
    );

    // Every acknowledged token is still there and redeemable: one host joins with each.
    let mut joiners = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        joiners
            .push(Node::start(&c.registry, NodeSpec::new(&format!("t{i:02}"), t.clone())).unwrap());
    }
    for j in &joiners {
        j.wait_ready().await.unwrap();
    }
    let names = c.registry.node_names().unwrap();
    for j in &joiners {
        assert!(
            names.contains(&j.spec.name),
            "{} missing from meshctl nodes: {names:?}",
            j.spec.name
        );
    }
    // Their certificates were recorded too.
    let certs = c.registry.cert_records().unwrap();
    assert!(
        certs.len() >= certs_before.len() + TOKENS,
        "{} certificate records after {TOKENS} joins (had {})",
        certs.len(),
        certs_before.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meshd_restarts_and_serves_with_the_registry_down() {
    let mut p = pair().await;
    round_trips(p.upstream, 5, 1).await;
    p.cluster.registry.kill9();
    // a loses its token file: it must never need it again after the join.
    std::fs::remove_file(p.cluster.node("a").dir.join("token")).unwrap();
    for name in ["a", "b"] {
        let n = p.cluster.node(name);
        let code = n.stop(Duration::from_secs(15)).unwrap();
        assert_eq!(code, Some(0), "{name} exits cleanly on SIGTERM");
    }
    for name in ["b", "a"] {
        let n = p.cluster.node(name);
        n.run().unwrap();
        n.wait_ready().await.unwrap();
    }
    p.cluster.converge().await.unwrap();
    p.cluster
        .node("a")
        .wait_endpoints("default/api", 1)
        .await
        .unwrap();
    round_trips(p.upstream, 20, 100).await;
    for name in ["a", "b"] {
        let log = p.cluster.node(name).log();
        assert_eq!(
            count(&log, "joined the mesh"),
            1,
            "{name} joined only once:\n{log}"
        );
        assert_eq!(
            count(&log, "using stored node identity"),
            1,
            "{name} restarted from its stored identity:\n{log}"
        );
        assert_eq!(
            count(&log, "workload certificate installed"),
            1,
            "{name} reused its stored workload certificate:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_outage_causes_no_failed_request() {
    // Workload certificates live 20 s, so renewals come due (and fail) during the outage; the
    // current certificates must keep serving.
    let mut p = pair_with(RegistryOpts {
        workload_cert_ttl: Duration::from_secs(20),
        ..RegistryOpts::default()
    })
    .await;
    let load = Load::start(p.upstream, 4, 16 * 1024, Duration::from_secs(10));
    load.progress(50, WAIT).await.unwrap();

    p.cluster.registry.kill9();
    let killed = std::time::Instant::now();
    let at_kill = load.ok();
    let mut failures = Vec::new();
    for name in ["a", "b"] {
        failures.push(
            p.cluster
                .node(name)
                .metric("meshd_certificate_renewal_failures_total", &[])
                .await
                .unwrap(),
        );
    }
    // Keep the registry down until both nodes have felt it (a failed renewal each) and the
    // traffic has gone on meanwhile.
    for (name, f0) in ["a", "b"].into_iter().zip(&failures) {
        let node = p.cluster.node(name);
        eventually(
            WAIT,
            &format!("{name} to fail a renewal against the dead registry"),
            || async {
                let f = node
                    .metric("meshd_certificate_renewal_failures_total", &[])
                    .await
                    .ok()?;
                (f > *f0).then_some(())
            },
        )
        .await
        .unwrap();
    }
    load.progress(300, WAIT).await.unwrap();
    let down = load.ok() - at_kill;
    let outage = killed.elapsed();

    let mut renewals = Vec::new();
    for name in ["a", "b"] {
        renewals.push(
            p.cluster
                .node(name)
                .metric("meshd_certificate_renewals_total", &[])
                .await
                .unwrap(),
        );
    }
    p.cluster.registry.run().await.unwrap();
    // Renewal recovers once the registry is back, still under traffic.
    for (name, r0) in ["a", "b"].into_iter().zip(&renewals) {
        let node = p.cluster.node(name);
        eventually(
            WAIT,
            &format!("{name} to renew again after the outage"),
            || async {
                let r = node
                    .metric("meshd_certificate_renewals_total", &[])
                    .await
                    .ok()?;
                (r > *r0).then_some(())
            },
        )
        .await
        .unwrap();
    }
    load.progress(100, WAIT).await.unwrap();
    let report = load.stop().await;
    eprintln!(
        "registry outage of {outage:?}: {} round trips ({down} while the registry was down), {} failed",
        report.ok, report.failed
    );
    assert_eq!(report.failed, 0, "failed round trips: {:?}", report.errors);
    for name in ["a", "b"] {
        assert!(p.cluster.node(name).is_running(), "{name} still running");
    }
}
