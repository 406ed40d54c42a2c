//! Network-namespace tier: two hosts, each in its own namespace on a shared bridge, the registry
//! in the root namespace on the bridge address. Traffic crosses real interfaces; a partition
//! (link down) makes new connections fail fast and the cut-off host leave the view; healing
//! brings traffic back.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mesh_e2e::apps;
use mesh_e2e::netns::{self, Net};
use mesh_e2e::{Cluster, Node, NodeSpec, RegistryOpts, ServiceSpec, WAIT, echo_app, eventually};

/// Longest an upstream connection may take to fail while its only endpoint is cut off:
/// meshd's outbound connect timeout (5 s) plus slack.
const FAIL_WITHIN: Duration = Duration::from_secs(8);
/// Longest a connection may take to fail once the cut-off host has left the view.
const FAIL_FAST: Duration = Duration::from_secs(2);
/// Longest failure detection may take.
const DETECT_WITHIN: Duration = Duration::from_secs(10);

/// Round trip of `data`, bounded by `limit`: Ok(true) when it came back intact, Ok(false) when
/// the connection failed (refused, reset, closed, or other bytes), Err when it hung.
async fn attempt(addr: SocketAddr, data: &[u8], limit: Duration) -> Result<bool, Duration> {
    match tokio::time::timeout(limit, apps::round_trip(addr, data)).await {
        Ok(Ok(got)) => Ok(got == data),
        Ok(Err(_)) => Ok(false),
        Err(_) => Err(limit),
    }
}

async fn round_trips(addr: SocketAddr, n: u64, seed: u64) {
    for i in 0..n {
        let data = apps::payload(32 * 1024 + i as usize * 101, seed + i);
        let got = tokio::time::timeout(Duration::from_secs(10), apps::round_trip(addr, &data))
            .await
            .unwrap_or_else(|_| panic!("round trip {i} timed out"))
            .unwrap_or_else(|e| panic!("round trip {i}: {e}"));
        assert_eq!(apps::sha256(&got), apps::sha256(&data), "round trip {i}");
    }
}

/// One connection attempt during the partition: (started at, since the cut; took; outcome;
/// started after b had left a's view).
type Attempt = (Duration, Duration, Result<bool, Duration>, bool);

async fn sees(node: &Node, member: &str) -> Option<bool> {
    let (members, _) = node.view().await.ok()?;
    Some(members.iter().any(|m| m == member))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_fails_fast_and_heals_between_namespaced_hosts() {
    if !mesh_e2e::can_run(
        "netns",
        netns::available(),
        "this process may not create network namespaces (run as root)",
    ) {
        return;
    }
    // Declared first so it is dropped last: processes die before their namespaces go.
    let id = 100 + (std::process::id() % 100) as u8;
    let mut net = Net::new(id).unwrap();
    let a = net.add_host(2).unwrap();
    let b = net.add_host(3).unwrap();
    let mut cluster = Cluster::new(RegistryOpts {
        ip: net.gateway().into(),
        ..RegistryOpts::default()
    })
    .await
    .unwrap();

    // The api app runs inside b's namespace.
    let app_addr = SocketAddr::new(b.ip.into(), 8080);
    let log = cluster.registry.dir.join("api-app.log");
    let _app = echo_app(&cluster.registry.bins, Some(&b.ns), app_addr, "api", &log)
        .await
        .unwrap();

    let token = cluster.registry.token(&["api"], 1).unwrap();
    let mut spec_b = NodeSpec::new("b", token);
    spec_b.ip = b.ip.into();
    spec_b.netns = Some(b.ns.clone());
    spec_b.services = vec![ServiceSpec::new("api", app_addr)];
    cluster.add_spec(spec_b).await.unwrap();

    let upstream = SocketAddr::new(a.ip.into(), 19001);
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut spec_a = NodeSpec::new("a", token);
    spec_a.ip = a.ip.into();
    spec_a.netns = Some(a.ns.clone());
    spec_a.seeds = vec![cluster.node("b").spec.gossip_addr()];
    spec_a.services = vec![
        ServiceSpec::new("web", SocketAddr::new(a.ip.into(), 18080)).upstream("api", upstream),
    ];
    cluster.add_spec(spec_a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster
        .node("a")
        .wait_endpoints("default/api", 1)
        .await
        .unwrap();

    // The test process (root namespace) → a's upstream bind (over the bridge) → mTLS to b's
    // namespace → the app.
    round_trips(upstream, 10, 1).await;
    let big = apps::payload(8 << 20, 77);
    let got = apps::round_trip(upstream, &big).await.unwrap();
    assert_eq!(
        apps::sha256(&got),
        apps::sha256(&big),
        "8 MiB across namespaces"
    );

    // Partition b. Meanwhile: a detector polls a's view; new connections keep being attempted,
    // and each must fail within a bound (not hang).
    let node_a = cluster.node("a");
    net.set_link(&b, false).unwrap();
    let cut = Instant::now();
    let detected = AtomicBool::new(false);
    let attempts: Mutex<Vec<Attempt>> = Mutex::default();
    let detect = async {
        let res = eventually(
            DETECT_WITHIN,
            "a to drop the cut-off b from its members",
            || async { (sees(node_a, "b").await == Some(false)).then_some(()) },
        )
        .await;
        detected.store(true, Ordering::SeqCst);
        res.map(|()| cut.elapsed())
    };
    let probe = async {
        let data = apps::payload(4096, 9);
        let mut after_detection = 0;
        let mut i = 0u64;
        while after_detection < 3 {
            i += 1;
            let was_detected = detected.load(Ordering::SeqCst);
            let started = Instant::now();
            let limit = if was_detected { FAIL_FAST } else { FAIL_WITHIN };
            let res = attempt(upstream, &data, limit).await;
            attempts
                .lock()
                .unwrap()
                .push((cut.elapsed(), started.elapsed(), res, was_detected));
            if was_detected {
                after_detection += 1;
            }
            if res.is_err() || i > 100 {
                break;
            }
        }
    };
    let (detection, ()) = tokio::join!(detect, probe);
    let attempts = attempts.into_inner().unwrap();
    let detection = detection.unwrap_or_else(|e| panic!("{e}; a's log:\n{}", node_a.log()));
    eprintln!("partition: b left a's members after {detection:?}");
    for (at, took, res, after) in &attempts {
        eprintln!(
            "  attempt at +{at:?}: {res:?} in {took:?} ({} detection)",
            if *after { "after" } else { "before" }
        );
    }
    for (at, _, res, after) in &attempts {
        match res {
            Ok(ok) => assert!(!ok, "a round trip reached the cut-off host (at +{at:?})"),
            Err(limit) => panic!(
                "a new connection hung for {limit:?} at +{at:?} ({} detection) instead of failing",
                if *after { "after" } else { "before" }
            ),
        }
    }
    assert!(
        attempts.iter().filter(|a| a.3).count() >= 3,
        "attempts after detection: {attempts:?}"
    );
    assert!(
        detection < DETECT_WITHIN,
        "failure detection took {detection:?}"
    );
    assert!(
        cluster.node("b").is_running(),
        "b keeps running while cut off"
    );

    // Heal: b comes back into a's view and traffic flows again.
    net.set_link(&b, true).unwrap();
    let healed = Instant::now();
    let node_a = cluster.node("a");
    node_a.wait_members(2).await.unwrap();
    node_a.wait_endpoints("default/api", 1).await.unwrap();
    let rejoined = healed.elapsed();
    let data = apps::payload(4096, 10);
    eventually(WAIT, "traffic to flow again after the heal", || async {
        attempt(upstream, &data, FAIL_WITHIN)
            .await
            .ok()
            .filter(|ok| *ok)
    })
    .await
    .unwrap();
    let flowing = healed.elapsed();
    eprintln!("heal: b back in a's view after {rejoined:?}, traffic flowing after {flowing:?}");
    round_trips(upstream, 20, 1000).await;
}
