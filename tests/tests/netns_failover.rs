//! Network-namespace tier, under HTTP load: three api hosts, each in its own namespace, and a
//! caller host. A graceful stop of one host drops no request (it publishes `draining`, callers
//! stop picking it, in-flight requests finish); a `kill -9` of another is noticed by gossip
//! within the README's bound and costs the GET callers no error either.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_e2e::http_app::Client;
use mesh_e2e::netns::{self, Net};
use mesh_e2e::{Cluster, Node, NodeSpec, RegistryOpts, ServiceSpec, echo_app, eventually};

/// Longest a wait for the load or the view may take (a bound on waiting, not the claim).
const DETECT_WITHIN: Duration = Duration::from_secs(15);
/// The README's claim for the e2e tests' 100 ms gossip interval: a killed host leaves every
/// table within 1.5 s (SWIM: a failed probe, every survivor confirming, a 100 ms suspicion
/// floor; plus the polling).
const DETECTED_WITHIN: Duration = Duration::from_millis(1500);

/// One request of the load: when it started (since the load began), its status and mesh error.
type Sample = (Duration, u16, String);

/// Runs GETs with `concurrency` workers until `stop` is set, counting completed requests in
/// `done`.
fn load(
    client: Client,
    addr: SocketAddr,
    concurrency: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
            workers.spawn(async move {
                let mut out = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let at = start.elapsed();
                    let r =
                        tokio::time::timeout(Duration::from_secs(10), client.get(addr, "/", &[]))
                            .await;
                    out.push(match r {
                        Ok(Ok(r)) => (at, r.status, r.mesh_error),
                        Ok(Err(e)) => (at, 0, format!("client error: {e}")),
                        Err(_) => (at, 0, "client timeout".to_owned()),
                    });
                    done.fetch_add(1, Ordering::SeqCst);
                }
                out
            });
        }
        let mut all = Vec::new();
        while let Some(r) = workers.join_next().await {
            all.extend(r.unwrap());
        }
        all.sort_by_key(|s| s.0);
        all
    })
}

/// Waits until `more` requests have completed after this call (the load is flowing).
async fn served(done: &AtomicU64, more: u64) {
    let target = done.load(Ordering::SeqCst) + more;
    eventually(DETECT_WITHIN, "the load to make progress", || async {
        (done.load(Ordering::SeqCst) >= target).then_some(())
    })
    .await
    .unwrap();
}

async fn usable_api(node: &Node) -> Option<usize> {
    let (_, eps) = node.view().await.ok()?;
    Some(
        eps.iter()
            .find(|(s, _)| s == "default/api")
            .map_or(0, |(_, c)| *c),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_stop_drops_nothing_and_kill9_window_is_measured() {
    if !mesh_e2e::can_run(
        "netns",
        netns::available(),
        "this process may not create network namespaces (run as root)",
    ) {
        return;
    }
    let id = 100 + ((std::process::id() + 37) % 100) as u8;
    let mut net = Net::new(id).unwrap();
    let mut cluster = Cluster::new(RegistryOpts {
        ip: net.gateway().into(),
        ..RegistryOpts::default()
    })
    .await
    .unwrap();
    let mut apps = Vec::new();
    let mut seeds = Vec::new();
    for (i, name) in ["b1", "b2", "b3"].into_iter().enumerate() {
        let host = net.add_host(3 + i as u8).unwrap();
        let app_addr = SocketAddr::new(host.ip.into(), 8080);
        let log = cluster.registry.dir.join(format!("{name}-app.log"));
        apps.push(
            echo_app(&cluster.registry.bins, Some(&host.ns), app_addr, name, &log)
                .await
                .unwrap(),
        );
        let token = cluster.registry.token(&["api"], 1).unwrap();
        let mut spec = NodeSpec::new(name, token);
        spec.ip = host.ip.into();
        spec.netns = Some(host.ns.clone());
        spec.seeds = seeds.clone();
        spec.services = vec![ServiceSpec::new("api", app_addr).protocol("http")];
        cluster.add_spec(spec).await.unwrap();
        seeds.push(cluster.node(name).spec.gossip_addr());
    }
    let a = net.add_host(2).unwrap();
    let upstream = SocketAddr::new(a.ip.into(), 19001);
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut spec_a = NodeSpec::new("a", token);
    spec_a.ip = a.ip.into();
    spec_a.netns = Some(a.ns.clone());
    spec_a.seeds = seeds;
    spec_a.services = vec![
        ServiceSpec::new("web", SocketAddr::new(a.ip.into(), 18080))
            .protocol("http")
            .upstream("api", upstream),
    ];
    cluster.add_spec(spec_a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster
        .node("a")
        .wait_endpoints("default/api", 3)
        .await
        .unwrap();

    let client = Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let running = load(client.clone(), upstream, 4, stop.clone(), done.clone());
    served(&done, 200).await;

    // Graceful stop of b1 under load: SIGTERM, drain, exit 0; no request may fail.
    let t = Instant::now();
    let code =
        tokio::task::block_in_place(|| cluster.node("b1").stop(Duration::from_secs(30))).unwrap();
    assert_eq!(code, Some(0), "b1 exits cleanly");
    eprintln!("graceful stop of b1 took {:?}", t.elapsed());
    let node_a = cluster.node("a");
    eventually(DETECT_WITHIN, "a to drop b1", || async {
        (usable_api(node_a).await? == 2).then_some(())
    })
    .await
    .unwrap();
    served(&done, 200).await;
    stop.store(true, Ordering::SeqCst);
    let graceful = running.await.unwrap();
    let failed: Vec<&Sample> = graceful.iter().filter(|s| s.1 != 200).collect();
    eprintln!(
        "graceful stop: {} requests, {} failed",
        graceful.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "a graceful stop dropped requests: {failed:?}"
    );
    assert!(graceful.len() > 100, "load ran: {}", graceful.len());

    // kill -9 of b2 under load: measure what the client sees. Round robin, so every other
    // request goes to b2 and its death is met (the default, peak EWMA, may be sending the
    // slower of two endpoints almost nothing, and then the kill proves nothing).
    let rev = (cluster.registry)
        .apply(
            "api-rr",
            "[[resource]]\nkind = \"DestinationPolicy\"\nname = \"api\"\nservice = \"api\"\nload_balancer = \"round_robin\"\n",
        )
        .unwrap();
    cluster.node("a").wait_policy_revision(rev).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load_start = Instant::now();
    let running = load(client, upstream, 4, stop.clone(), done.clone());
    served(&done, 200).await;
    let met_the_death_before = met_b2s_death(cluster.node("a")).await;
    let killed_at = load_start.elapsed();
    let killed = Instant::now();
    cluster.node("b2").kill9();
    let node_a = cluster.node("a");
    eventually(DETECT_WITHIN, "a to drop b2", || async {
        (usable_api(node_a).await? == 1).then_some(())
    })
    .await
    .unwrap();
    let detected = killed.elapsed();
    assert!(
        detected < DETECTED_WITHIN,
        "b2 left a's view {detected:?} after the kill (README: within {DETECTED_WITHIN:?})"
    );
    // Keep the load running a second past the detection, so the check below covers it.
    let limit = killed_at + detected + Duration::from_secs(1);
    tokio::time::sleep_until((load_start + limit).into()).await;
    served(&done, 200).await;
    stop.store(true, Ordering::SeqCst);
    let samples = running.await.unwrap();
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.1 != 200).collect();
    let window = match (failed.first(), failed.last()) {
        (Some(f), Some(l)) => format!(
            "failures from {:?} to {:?} after the kill",
            f.0.saturating_sub(killed_at),
            l.0.saturating_sub(killed_at)
        ),
        _ => "no failed request".to_owned(),
    };
    eprintln!(
        "kill -9 of b2: left a's view after {detected:?}; {} requests, {} failed ({window}); reasons: {:?}",
        samples.len(),
        failed.len(),
        failed
            .iter()
            .map(|s| (s.1, s.2.as_str()))
            .collect::<std::collections::BTreeSet<_>>()
    );
    // The README's claim: a killed host costs callers of idempotent, bodiless requests no error
    // (a request on a connection that dies is sent again to another endpoint; a connection
    // refused by the dead host's kernel is a connect failure, tried elsewhere). Measured 0 of
    // 2,100–4,100 requests in each of 10 runs, 4 of them under `stress-ng --cpu 2`.
    assert!(
        failed.is_empty(),
        "a kill -9 cost GET callers {} errors: {failed:?}",
        failed.len()
    );
    // Requests found b2 dead before gossip did: the ones in flight on its connection were sent
    // again to b3, and any that dialled it were refused by its kernel and went on to b3 at once.
    // Which of the two happens depends on timing (after a resend the balancer may never pick b2
    // again); at least one must have, or the failover path was not exercised.
    let met_the_death = met_b2s_death(cluster.node("a")).await;
    assert!(
        met_the_death > met_the_death_before,
        "no request met b2's death (no resend, no refused connect): the failover path was not exercised"
    );
    // After the detection the load is served by b3 alone.
    let after: Vec<&Sample> = samples.iter().filter(|s| s.0 > limit).collect();
    assert!(!after.is_empty() && after.iter().all(|s| s.1 == 200));
}

/// Requests of a's that met a dead api endpoint: resent after their connection failed, or
/// refused on connect (the endpoint then skipped as unreachable).
async fn met_b2s_death(a: &Node) -> f64 {
    let mut n = 0.0;
    for name in [
        "meshd_requests_resent_total",
        "meshd_unreachable_endpoints_total",
    ] {
        n += (a.metric_or_zero(name, &[("service", "default/api")]).await).unwrap();
    }
    n
}
