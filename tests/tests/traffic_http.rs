//! Traffic management on real meshd processes: Route (weighted canary split, header routing,
//! retries within a budget, timeouts, fault injection), DestinationPolicy (outlier ejection and
//! return, locality failover, circuit breaker, EWMA against round robin) and RateLimit (429),
//! measured over hundreds or thousands of requests from a real HTTP client.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mesh_e2e::http_app::{Client, HttpApp, Reply, tally};
use mesh_e2e::{Cluster, Node, NodeSpec, RegistryOpts, ServiceSpec, eventually, next_ip};

/// One api instance: its node name, `version` label and zone.
struct Backend {
    name: &'static str,
    version: &'static str,
    zone: &'static str,
}

const fn backend(name: &'static str, version: &'static str, zone: &'static str) -> Backend {
    Backend {
        name,
        version,
        zone,
    }
}

struct Fleet {
    cluster: Cluster,
    /// One app per backend, in order; `x-app` is the backend's name.
    apps: Vec<HttpApp>,
    /// web's local port for api, on node `a` (zone `z1`).
    upstream: SocketAddr,
    client: Client,
}

/// Every node of these fleets runs one worker, which meshd runs on tokio's single-threaded
/// scheduler (as the benchmark does): the traffic features are proven on it too, while the
/// other suites run the default multi-threaded one.
fn one_worker() -> (String, String) {
    ("TOKIO_WORKER_THREADS".to_owned(), "1".to_owned())
}

async fn fleet(backends: &[Backend]) -> Fleet {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let mut apps = Vec::new();
    for b in backends {
        let ip = next_ip();
        let app = HttpApp::start(SocketAddr::new(ip.into(), 0), b.name)
            .await
            .unwrap();
        let token = cluster.registry.token(&["api"], 1).unwrap();
        let mut spec = NodeSpec::new(b.name, token);
        spec.ip = ip.into();
        spec.zone = Some(b.zone.to_owned());
        spec.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
        let mut api = ServiceSpec::new("api", app.addr).protocol("http");
        api.labels = vec![("version".to_owned(), b.version.to_owned())];
        spec.services = vec![api];
        spec.env = vec![one_worker()];
        cluster.add_spec(spec).await.unwrap();
        apps.push(app);
    }
    let ip = next_ip();
    let upstream = SocketAddr::new(ip.into(), 19001);
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut a = NodeSpec::new("a", token);
    a.ip = ip.into();
    a.zone = Some("z1".to_owned());
    a.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
    a.env = vec![one_worker()];
    a.services = vec![
        ServiceSpec::new("web", SocketAddr::new(ip.into(), 18080))
            .protocol("http")
            .upstream("api", upstream),
    ];
    cluster.add_spec(a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster
        .node("a")
        .wait_endpoints("default/api", backends.len())
        .await
        .unwrap();
    Fleet {
        cluster,
        apps,
        upstream,
        client: Client::new(),
    }
}

impl Fleet {
    fn a(&self) -> &Node {
        self.cluster.nodes.last().unwrap()
    }

    /// Applies `text` and waits until node a enforces it.
    async fn apply(&self, name: &str, text: &str) {
        let rev = self.cluster.registry.apply(name, text).unwrap();
        for node in &self.cluster.nodes {
            node.wait_policy_revision(rev).await.unwrap();
        }
    }

    async fn get_many(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        n: usize,
        c: usize,
    ) -> Vec<Reply> {
        self.client
            .get_many(self.upstream, path, headers, n, c)
            .await
            .unwrap()
    }

    async fn retries(&self) -> f64 {
        self.a()
            .metric_or_zero("meshd_retries_total", &[("destination", "default/api")])
            .await
            .unwrap()
    }
}

fn share(replies: &[Reply], app: &str) -> f64 {
    replies.iter().filter(|r| r.app == app).count() as f64 / replies.len() as f64
}

const SUBSETS: &str = r#"
[[resource]]
kind = "DestinationPolicy"
name = "api"
service = "api"
load_balancer = "round_robin"
subsets = [{ name = "v1", labels = { version = "v1" } }, { name = "v2", labels = { version = "v2" } }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_and_header_routing() {
    let f = fleet(&[backend("b1", "v1", "z1"), backend("b2", "v2", "z1")]).await;
    let route = r#"
[[resource]]
kind = "Route"
name = "api"
service = "api"
[[resource.http]]
name = "canary-testers"
match = [{ headers = { "x-canary" = { exact = "1" } } }]
route = [{ subset = "v2" }]
[[resource.http]]
name = "split"
route = [{ subset = "v1", weight = 90 }, { subset = "v2", weight = 10 }]
"#;
    f.apply("split.toml", &format!("{SUBSETS}{route}")).await;

    let replies = f.get_many("/", &[], 3000, 8).await;
    let t = tally(&replies);
    let v2 = share(&replies, "b2");
    eprintln!("90/10 split over 3000 requests: {t:?} (v2 share {v2:.4})");
    assert_eq!(
        replies.iter().filter(|r| r.status == 200).count(),
        3000,
        "{t:?}"
    );
    // Binomial(3000, 0.1): standard deviation 0.55 points; ±2 points is over 3.5 sd.
    assert!(
        (0.08..=0.12).contains(&v2),
        "v2 got {v2:.4} of the traffic: {t:?}"
    );

    let replies = f.get_many("/", &[("x-canary", "1")], 300, 4).await;
    assert_eq!(
        share(&replies, "b2"),
        1.0,
        "header routing: {:?}",
        tally(&replies)
    );
    let replies = f.get_many("/", &[("x-canary", "0")], 300, 4).await;
    assert!(share(&replies, "b2") < 0.25, "{:?}", tally(&replies));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_flaky_backend_within_the_budget() {
    let f = fleet(&[backend("b1", "v1", "z1")]).await;
    // Every second request fails with 503.
    f.apps[0].behavior.fail_every.store(2, Ordering::SeqCst);
    let replies = f.get_many("/", &[], 200, 4).await;
    let failed = replies.iter().filter(|r| r.status == 503).count();
    assert!(
        (80..=120).contains(&failed),
        "without retries about half fail: {failed}"
    );

    let route = |budget: u32| {
        format!(
            r#"
[[resource]]
kind = "Route"
name = "api"
service = "api"
[[resource.http]]
retries = {{ attempts = 2, retry_on = ["5xx"], budget_percent = {budget} }}
"#
        )
    };
    // A 20% budget: retries stop at 20% of the window's retriable requests (plus a small
    // floor), so some failures show. The 200 requests above had no retry policy: not counted.
    f.apply("retry.toml", &route(20)).await;
    let retried_before = f.retries().await;
    let before = f.apps[0].requests();
    let replies = f.get_many("/", &[], 1000, 4).await;
    let sent = f.apps[0].requests() - before;
    let retried = f.retries().await - retried_before;
    let failed = replies.iter().filter(|r| r.status == 503).count();
    eprintln!(
        "budget 20%: 1000 requests, {retried} retries, {failed} failed, {sent} reached the app"
    );
    assert!(
        retried <= 1000.0 * 0.2 + MIN_RETRIES_PER_WINDOW,
        "retries over budget: {retried}"
    );
    assert!(retried >= 150.0, "the budget was used: {retried}");
    assert!(
        failed > 200,
        "without enough budget, failures show: {failed}"
    );
    assert_eq!(sent, 1000 + retried as u64);

    // A 100% budget: every failure is retried and hidden (one request at a time, so the
    // app's every-second-request failure cannot hit a retry too).
    f.apply("retry.toml", &route(100)).await;
    let before = f.apps[0].requests();
    let replies = f.get_many("/", &[], 500, 1).await;
    let t = tally(&replies);
    assert_eq!(
        replies.iter().filter(|r| r.status == 200).count(),
        500,
        "retries hide every failure with a 100% budget: {t:?}"
    );
    let sent = f.apps[0].requests() - before;
    eprintln!("budget 100%: 500 requests, {sent} reached the app");
    // One at a time against every-second-request failures, each request after the first
    // failure fails once and succeeds on its retry: never a second retry.
    assert!(
        (750..=1000).contains(&sent),
        "one retry per failure: {sent}"
    );
}

/// Retries always allowed per budget window (meshd's `route::MIN_RETRIES_PER_WINDOW`).
const MIN_RETRIES_PER_WINDOW: f64 = 10.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_fault_injection() {
    let f = fleet(&[backend("b1", "v1", "z1")]).await;
    let route = r#"
[[resource]]
kind = "Route"
name = "api"
service = "api"
[[resource.http]]
name = "slow"
match = [{ path = { prefix = "/slow" } }]
timeout = "150ms"
[[resource.http]]
name = "delayed"
match = [{ path = { prefix = "/delayed" } }]
fault = { delay = { fixed = "200ms", percent = 100 } }
[[resource.http]]
name = "flaky"
fault = { abort = { status = 503, percent = 30 } }
"#;
    f.apply("faults.toml", route).await;

    // Timeout: the app takes 1 s, the route allows 150 ms.
    f.apps[0].behavior.delay_ms.store(1000, Ordering::SeqCst);
    let r = f.client.get(f.upstream, "/slow", &[]).await.unwrap();
    assert_eq!(
        (r.status, r.mesh_error.as_str()),
        (504, "outbound/timeout"),
        "{r:?}"
    );
    assert!(
        r.elapsed < Duration::from_millis(800),
        "answered after {:?}",
        r.elapsed
    );
    f.apps[0].behavior.delay_ms.store(0, Ordering::SeqCst);

    // Injected delay.
    let r = f.client.get(f.upstream, "/delayed", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.elapsed >= Duration::from_millis(200), "{:?}", r.elapsed);

    // Injected aborts on 30% of requests, answered by the mesh without reaching the app.
    let before = f.apps[0].requests();
    let replies = f.get_many("/x", &[], 2000, 8).await;
    let aborted = replies
        .iter()
        .filter(|r| r.status == 503 && r.mesh_error == "outbound/fault_abort")
        .count();
    let reached = f.apps[0].requests() - before;
    eprintln!("fault abort 30%: {aborted} of 2000 aborted, {reached} reached the app");
    // Binomial(2000, 0.3): sd 1 point; ±4 points.
    assert!((520..=680).contains(&aborted), "{aborted}");
    assert_eq!(reached as usize + aborted, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_ejection_and_return() {
    let f = fleet(&[
        backend("b1", "v1", "z1"),
        backend("b2", "v1", "z1"),
        backend("b3", "v1", "z1"),
    ])
    .await;
    let policy = r#"
[[resource]]
kind = "DestinationPolicy"
name = "api"
service = "api"
load_balancer = "round_robin"
outlier_detection = { consecutive_5xx = 3, interval = "1s", base_ejection_time = "2s", max_ejection_percent = 50 }
"#;
    f.apply("outlier.toml", policy).await;
    f.apps[0].behavior.status.store(500, Ordering::SeqCst);
    // One request at a time until b1 has answered three 500s in a row: the third ejects it.
    let mut errors = 0;
    for _ in 0..30 {
        let r = f.client.get(f.upstream, "/", &[]).await.unwrap();
        errors += usize::from(r.status == 500);
        if errors == 3 {
            break;
        }
    }
    assert_eq!(errors, 3, "b1's 500s reach the caller until it is ejected");
    let ejected = Instant::now();
    // For the next 1.5 s (inside the 2 s base ejection time, however slow the machine: the
    // window is measured, not assumed) b1 gets nothing.
    let mut during = Vec::new();
    while ejected.elapsed() < Duration::from_millis(1500) {
        during.push(f.client.get(f.upstream, "/", &[]).await.unwrap());
    }
    assert!(
        during.len() >= 10,
        "requests while ejected: {}",
        during.len()
    );
    assert_eq!(share(&during, "b1"), 0.0, "{:?}", tally(&during));
    let ejections = f
        .a()
        .metric(
            "meshd_outlier_ejections_total",
            &[("service", "default/api")],
        )
        .await
        .unwrap();
    assert!(ejections >= 1.0, "{ejections}");
    // b1 recovers; once its ejection ends it is used again.
    f.apps[0].behavior.status.store(0, Ordering::SeqCst);
    let back = Instant::now();
    eventually(
        Duration::from_secs(10),
        "b1 to take requests again",
        || async {
            let r = f.client.get(f.upstream, "/", &[]).await.ok()?;
            (r.app == "b1").then_some(())
        },
    )
    .await
    .unwrap();
    eprintln!("b1 back after {:?} (base ejection time 2s)", back.elapsed());
    let after = f.get_many("/", &[], 150, 2).await;
    let b1 = share(&after, "b1");
    assert!(b1 > 0.2, "b1 back in rotation: {:?}", tally(&after));
    assert!(after.iter().all(|r| r.status == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_preference_and_failover() {
    let mut f = fleet(&[backend("near", "v1", "z1"), backend("far", "v1", "z2")]).await;
    // The default DestinationPolicy (none applied): same zone first.
    let replies = f.get_many("/", &[], 200, 4).await;
    assert_eq!(share(&replies, "near"), 1.0, "{:?}", tally(&replies));
    // The local instance's host dies: requests fail over to the other zone, none lost.
    f.cluster.node("near").kill9();
    let replies = f.get_many("/", &[], 200, 4).await;
    let t = tally(&replies);
    assert!(
        replies.iter().all(|r| r.status == 200 && r.app == "far"),
        "failover: {t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_limits_requests_in_flight() {
    let f = fleet(&[backend("b1", "v1", "z1")]).await;
    let policy = r#"
[[resource]]
kind = "DestinationPolicy"
name = "api"
service = "api"
circuit_breaker = { max_pending_requests = 2 }
"#;
    f.apply("cb.toml", policy).await;
    f.apps[0].behavior.delay_ms.store(300, Ordering::SeqCst);
    let replies = f.get_many("/", &[], 10, 10).await;
    let t = tally(&replies);
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let overflow = replies
        .iter()
        .filter(|r| r.status == 503 && r.mesh_error == "outbound/overflow")
        .count();
    assert_eq!(ok + overflow, 10, "{t:?}");
    assert!((2..=4).contains(&ok), "at most 2 in flight at once: {t:?}");

    // max_requests_per_connection: the pooled HTTP/2 connection to b1 is replaced after every
    // 10 requests (one at a time, so each connection carries exactly 10).
    let policy = r#"
[[resource]]
kind = "DestinationPolicy"
name = "api"
service = "api"
circuit_breaker = { max_requests_per_connection = 10 }
"#;
    f.apply("cb.toml", policy).await;
    f.apps[0].behavior.delay_ms.store(0, Ordering::SeqCst);
    let b1 = &f.cluster.nodes[0];
    let inbound = || async {
        b1.metric(
            "meshd_connections_total",
            &[("direction", "inbound"), ("service", "default/api")],
        )
        .await
        .unwrap()
    };
    let before = inbound().await;
    let replies = f.get_many("/", &[], 100, 1).await;
    assert!(
        replies.iter().all(|r| r.status == 200),
        "{:?}",
        tally(&replies)
    );
    let made = inbound().await - before;
    assert!(
        (10.0..=11.0).contains(&made),
        "100 requests at 10 per connection: {made} connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after() {
    let f = fleet(&[backend("b1", "v1", "z1")]).await;
    let policy = r#"
[[resource]]
kind = "RateLimit"
name = "api"
service = "api"
limits = [{ key = "destination", requests_per_unit = 1, unit = "second", burst = 5 }]
"#;
    f.apply("rl.toml", policy).await;
    let before = f.apps[0].requests();
    let started = Instant::now();
    let replies = f.get_many("/", &[], 20, 1).await;
    let took = started.elapsed();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    eprintln!("rate limit 1/s burst 5: {:?} in {took:?}", tally(&replies));
    // The burst, plus one token per whole second the 20 requests took (measured, so a slow
    // machine widens the bound only as much as it was slow).
    let most = 5 + took.as_secs() as usize + 1;
    assert!(
        (5..=most).contains(&ok),
        "{:?} in {took:?}",
        tally(&replies)
    );
    assert_eq!(ok + limited.len(), 20);
    assert!(
        limited
            .iter()
            .all(|r| r.mesh_error == "inbound/rate_limited")
    );
    assert!(
        limited
            .iter()
            .all(|r| r.retry_after.as_deref() == Some("1")),
        "{limited:?}"
    );
    assert_eq!(
        f.apps[0].requests() - before,
        ok as u64,
        "limited requests never reach the app"
    );
    // The bucket refills (one token per second).
    eventually(Duration::from_secs(5), "the bucket to refill", || async {
        let r = f.client.get(f.upstream, "/", &[]).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ewma_sends_less_to_a_slow_endpoint_than_round_robin() {
    let f = fleet(&[backend("fast", "v1", "z1"), backend("slow", "v1", "z1")]).await;
    f.apps[1].behavior.delay_ms.store(40, Ordering::SeqCst);
    let lb = |name: &str| {
        format!(
            "[[resource]]\nkind = \"DestinationPolicy\"\nname = \"api\"\nservice = \"api\"\nload_balancer = \"{name}\"\n"
        )
    };
    f.apply("lb.toml", &lb("round_robin")).await;
    let started = Instant::now();
    let rr = f.get_many("/", &[], 300, 4).await;
    let rr_time = started.elapsed();
    f.apply("lb.toml", &lb("ewma")).await;
    // Warm the latency estimates, then measure.
    f.get_many("/", &[], 50, 4).await;
    let started = Instant::now();
    let ewma = f.get_many("/", &[], 300, 4).await;
    let ewma_time = started.elapsed();
    let (rr_slow, ewma_slow) = (share(&rr, "slow"), share(&ewma, "slow"));
    eprintln!(
        "slow endpoint share: round robin {rr_slow:.3} ({rr_time:?}), ewma {ewma_slow:.3} ({ewma_time:?})"
    );
    assert!(
        (0.4..=0.6).contains(&rr_slow),
        "round robin: {:?}",
        tally(&rr)
    );
    assert!(ewma_slow < 0.2, "ewma: {:?}", tally(&ewma));
    assert!(ewma_time < rr_time, "ewma finished faster");
}
