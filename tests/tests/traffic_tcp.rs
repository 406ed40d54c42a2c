//! TCP services on the same endpoint path as HTTP: locality (zone, then datacenter, then
//! anywhere), a killed host stepped over at once with no error and no policy, the
//! DestinationPolicy's load balancer, and outlier ejection on resets — on real meshd processes,
//! with a TCP app per host that names itself.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use mesh_e2e::{Cluster, Node, NodeSpec, RegistryOpts, ServiceSpec, next_ip};

/// Longest one connection through the mesh may take here (a bound on waiting, not a claim).
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// One db instance: node name, zone and datacenter.
struct Backend {
    name: &'static str,
    zone: &'static str,
    dc: &'static str,
}

const fn backend(name: &'static str, zone: &'static str, dc: &'static str) -> Backend {
    Backend { name, zone, dc }
}

/// A TCP app that writes its name to every connection and closes it.
fn who_app(listener: TcpListener, name: &'static str) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    })
}

struct Fleet {
    cluster: Cluster,
    /// The app task of each backend, in order (abort one to take the app down).
    apps: Vec<JoinHandle<()>>,
    /// web's local port for db on node `a` (zone z1, datacenter dc1).
    upstream: SocketAddr,
}

async fn fleet(backends: &[Backend]) -> Fleet {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let mut apps = Vec::new();
    for b in backends {
        let ip = next_ip();
        let listener = TcpListener::bind(SocketAddr::new(ip.into(), 0))
            .await
            .unwrap();
        let app_addr = listener.local_addr().unwrap();
        apps.push(who_app(listener, b.name));
        let token = cluster.registry.token(&["db"], 1).unwrap();
        let mut spec = NodeSpec::new(b.name, token);
        spec.ip = ip.into();
        spec.zone = Some(b.zone.to_owned());
        spec.datacenter = Some(b.dc.to_owned());
        spec.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
        spec.services = vec![ServiceSpec::new("db", app_addr)];
        cluster.add_spec(spec).await.unwrap();
    }
    let ip = next_ip();
    let upstream = SocketAddr::new(ip.into(), 15432);
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut a = NodeSpec::new("a", token);
    a.ip = ip.into();
    a.zone = Some("z1".to_owned());
    a.datacenter = Some("dc1".to_owned());
    a.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
    a.services =
        vec![ServiceSpec::new("web", SocketAddr::new(ip.into(), 18080)).upstream("db", upstream)];
    cluster.add_spec(a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster
        .node("a")
        .wait_endpoints("default/db", backends.len())
        .await
        .unwrap();
    Fleet {
        cluster,
        apps,
        upstream,
    }
}

impl Fleet {
    fn a(&self) -> &Node {
        self.cluster.nodes.last().unwrap()
    }

    /// Applies `text` and waits until every node enforces it.
    async fn apply(&self, name: &str, text: &str) {
        let rev = self.cluster.registry.apply(name, text).unwrap();
        for node in &self.cluster.nodes {
            node.wait_policy_revision(rev).await.unwrap();
        }
    }

    /// `n` connections one after another: who answered each (`Err`: what went wrong).
    async fn connect_many(&self, n: usize) -> Vec<Result<String, String>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(who(self.upstream).await);
        }
        out
    }

    async fn metric(&self, name: &str) -> f64 {
        self.a()
            .metric_or_zero(name, &[("service", "default/db")])
            .await
            .unwrap()
    }
}

/// One connection: the name the app wrote, or why there was none.
async fn who(addr: SocketAddr) -> Result<String, String> {
    let once = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut name = String::new();
        s.read_to_string(&mut name)
            .await
            .map_err(|e| e.to_string())?;
        if name.is_empty() {
            return Err("closed without a name".to_owned());
        }
        Ok(name)
    };
    tokio::time::timeout(CONN_TIMEOUT, once)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

/// How many connections each backend answered; failures under "error: …".
fn tally(results: &[Result<String, String>]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for r in results {
        let key = match r {
            Ok(name) => name.clone(),
            Err(e) => format!("error: {e}"),
        };
        *t.entry(key).or_default() += 1;
    }
    t
}

/// Without any policy: the caller's zone, then its datacenter, then another one; a killed
/// host is stepped over on the very connection that finds it dead (before gossip notices),
/// and skipped from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_follows_locality_and_steps_over_a_killed_host_without_an_error() {
    let mut f = fleet(&[
        backend("b1", "z1", "dc1"),
        backend("b2", "z2", "dc1"),
        backend("b3", "z1", "dc2"), // the caller's zone name, another datacenter
    ])
    .await;
    let t = tally(&f.connect_many(20).await);
    assert_eq!(t, BTreeMap::from([("b1".to_owned(), 20)]), "the zone first");

    let (failovers, unreachable) = (
        f.metric("meshd_endpoint_failovers_total").await,
        f.metric("meshd_unreachable_endpoints_total").await,
    );
    f.cluster.node("b1").kill9();
    let t = tally(&f.connect_many(20).await);
    assert_eq!(
        t,
        BTreeMap::from([("b2".to_owned(), 20)]),
        "after b1 died: the datacenter, and no error"
    );
    // The first connection after the kill found b1 dead (gossip had not noticed yet) and went
    // on to b2 at once; b1 was skipped from then on (probed again once a second, at most,
    // until gossip drops it: each probe is one more failover, never an error).
    let unreachable = f.metric("meshd_unreachable_endpoints_total").await - unreachable;
    let failovers = f.metric("meshd_endpoint_failovers_total").await - failovers;
    assert!(unreachable >= 1.0, "b1 was never found unreachable");
    assert_eq!(
        failovers, unreachable,
        "each refused connect went on to another endpoint"
    );

    f.cluster.node("b2").kill9();
    let t = tally(&f.connect_many(20).await);
    assert_eq!(
        t,
        BTreeMap::from([("b3".to_owned(), 20)]),
        "after b2 died: another datacenter, and no error"
    );
}

/// A DestinationPolicy applies to TCP: its load balancer spreads connections, its locality
/// switch turns the zone preference off, and outlier detection ejects an endpoint whose
/// connections are reset (its app went away) after one failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_destination_policy_balances_and_ejects_on_resets() {
    let mut f = fleet(&[
        backend("b1", "z1", "dc1"),
        backend("b2", "z1", "dc1"),
        backend("b3", "z2", "dc1"),
    ])
    .await;
    // Default (least request, zone first): b3, in another zone, gets nothing.
    let t = tally(&f.connect_many(30).await);
    assert!(
        !t.contains_key("b3") && t.values().sum::<usize>() == 30,
        "{t:?}"
    );

    f.apply(
        "db",
        r#"
[[resource]]
kind = "DestinationPolicy"
name = "db"
service = "db"
load_balancer = "round_robin"
locality = { enabled = false }
outlier_detection = { consecutive_5xx = 1, interval = "1s", base_ejection_time = "60s", max_ejection_percent = 50 }
"#,
    )
    .await;
    let t = tally(&f.connect_many(30).await);
    assert_eq!(
        t,
        BTreeMap::from([
            ("b1".to_owned(), 10),
            ("b2".to_owned(), 10),
            ("b3".to_owned(), 10)
        ]),
        "round robin over every zone"
    );

    // b1's app goes away: its meshd resets each connection it cannot hand over. The first one
    // ejects b1; the others go to b2 and b3.
    let ejections = f.metric("meshd_outlier_ejections_total").await;
    let b1_app = f.apps.remove(0);
    b1_app.abort();
    let _ = b1_app.await;
    let results = f.connect_many(30).await;
    let t = tally(&results);
    let failed: usize = (t.iter())
        .filter(|(k, _)| k.starts_with("error"))
        .map(|(_, n)| n)
        .sum();
    assert!(failed <= 1, "one reset ejects b1: {t:?}");
    assert!(!t.contains_key("b1"), "{t:?}");
    assert_eq!(
        t.get("b2").copied().unwrap_or(0) + t.get("b3").copied().unwrap_or(0),
        30 - failed
    );
    assert_eq!(
        f.metric("meshd_outlier_ejections_total").await - ejections,
        1.0
    );
}
