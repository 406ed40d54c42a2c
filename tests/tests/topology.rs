//! The mesh seen from the registry, on real processes: nodes report per-edge traffic, and
//! `meshctl topology` shows a three-service mesh with the right edges and which carry mTLS
//! (a PERMISSIVE plaintext caller from outside included); an SLO burns its budget when a
//! fault-injection route makes errors, and the alert fires (webhook, metric, `meshctl slo
//! status`); `meshctl check` passes on the healthy mesh and fails when a node goes silent.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_e2e::apps::{self, Echo};
use mesh_e2e::http_app::{Client, HttpApp};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, eventually, http_get, next_ip};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const FAST: &str = "report_interval = \"200ms\"";

/// Collects the JSON bodies POSTed to it (the SLO webhook).
struct Hook {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Hook {
    async fn start(ip: std::net::IpAddr) -> Hook {
        let l = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let b = bodies.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let b = b.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Headers, then Content-Length bytes of body.
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).into_owned();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())
                                    .flatten()
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            let body = &buf[end + 4..end + 4 + len];
                            if let Ok(v) = serde_json::from_slice(body) {
                                b.lock().unwrap().push(v);
                            }
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .await;
                            return;
                        }
                    }
                });
            }
        });
        Hook { addr, bodies, task }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn meshctl_json(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let out = cluster.registry.meshctl_ok(args).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn edge<'a>(
    topology: &'a serde_json::Value,
    src: &str,
    dst: &str,
) -> Option<&'a serde_json::Value> {
    let edges = topology
        .as_array()
        .or_else(|| topology["edges"].as_array())?;
    edges
        .iter()
        .find(|e| e["source"] == src && e["destination"] == dst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_slo_and_check_from_real_traffic() {
    let opts = RegistryOpts {
        extra: vec![FAST.to_owned(), "slo_eval_interval = \"200ms\"".to_owned()],
        ..RegistryOpts::default()
    };
    let mut cluster = Cluster::new(opts).await.unwrap();
    let telemetry = format!("[telemetry]\n{FAST}\n");

    // c: db (TCP echo).
    let ip_c = next_ip();
    let db = Echo::start(SocketAddr::new(ip_c.into(), 0)).await.unwrap();
    let mut c = NodeSpec::new("c", cluster.registry.token(&["db"], 1).unwrap());
    c.ip = ip_c.into();
    c.services = vec![ServiceSpec::new("db", db.addr)];
    c.extra = telemetry.clone();
    cluster.add_spec(c).await.unwrap();

    // b: api (HTTP, also on `listen` for plaintext callers), which calls db.
    let ip_b = next_ip();
    let api = HttpApp::start(SocketAddr::new(ip_b.into(), 0), "api")
        .await
        .unwrap();
    let listen = SocketAddr::new(ip_b.into(), 18443);
    let api_to_db = SocketAddr::new(ip_b.into(), 19402);
    let mut api_spec = ServiceSpec::new("api", api.addr)
        .protocol("http")
        .upstream("db", api_to_db);
    api_spec.listen = Some(listen);
    let mut b = NodeSpec::new("b", cluster.registry.token(&["api"], 1).unwrap());
    b.ip = ip_b.into();
    b.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    b.services = vec![api_spec];
    b.extra = telemetry.clone();
    cluster.add_spec(b).await.unwrap();

    // a: web, which calls api.
    let ip_a = next_ip();
    let web_to_api = SocketAddr::new(ip_a.into(), 19401);
    let mut a = NodeSpec::new("a", cluster.registry.token(&["web"], 1).unwrap());
    a.ip = ip_a.into();
    a.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    a.services = vec![
        ServiceSpec::new("web", SocketAddr::new(ip_a.into(), 18080))
            .protocol("http")
            .upstream("api", web_to_api),
    ];
    a.extra = telemetry;
    cluster.add_spec(a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster.nodes[2]
        .wait_endpoints("default/api", 1)
        .await
        .unwrap();
    cluster.nodes[1]
        .wait_endpoints("default/db", 1)
        .await
        .unwrap();

    // Traffic: web -> api (HTTP, mTLS), api -> db (TCP, mTLS), an outsider -> api (plaintext,
    // PERMISSIVE).
    let pa = r#"
[[resource]]
kind = "PeerAuthentication"
name = "api-migration"
mode = "PERMISSIVE"
selector = { service = "api" }
"#;
    let rev = cluster.registry.apply("pa.toml", pa).unwrap();
    for n in &cluster.nodes {
        n.wait_policy_revision(rev).await.unwrap();
    }
    let client = Client::new();
    let replies = client.get_many(web_to_api, "/", &[], 100, 4).await.unwrap();
    assert!(replies.iter().all(|r| r.status == 200));
    for i in 0..10 {
        let data = apps::payload(500, i);
        assert_eq!(apps::round_trip(api_to_db, &data).await.unwrap(), data);
    }
    let outsider = next_ip();
    for _ in 0..5 {
        let mut s = apps::connect_from(outsider.into(), listen).await.unwrap();
        s.write_all(b"GET / HTTP/1.0\r\nHost: api\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf).contains(" 200 "));
    }

    // meshctl topology: the three edges, locked or not.
    let topo = eventually(
        Duration::from_secs(15),
        "the topology to show all traffic",
        || async {
            let t = meshctl_json(&cluster, &["topology", "--window", "5m", "-o", "json"]);
            let done = edge(&t, "default/web", "default/api").is_some_and(|e| e["requests"] == 100)
                && edge(&t, "default/api", "default/db").is_some_and(|e| e["requests"] == 10)
                && edge(&t, "external", "default/api").is_some_and(|e| e["requests"] == 5);
            done.then_some(t)
        },
    )
    .await
    .unwrap();
    let web_api = edge(&topo, "default/web", "default/api").unwrap();
    assert_eq!(web_api["mtls"], true, "{web_api}");
    assert_eq!(web_api["protocol"], "http", "{web_api}");
    assert_eq!(web_api["errors"], 0, "{web_api}");
    assert!(web_api["p50_ms"].as_f64().unwrap() > 0.0, "{web_api}");
    let api_db = edge(&topo, "default/api", "default/db").unwrap();
    assert_eq!(
        (api_db["mtls"].clone(), api_db["protocol"].clone()),
        (true.into(), "tcp".into())
    );
    let ext = edge(&topo, "external", "default/api").unwrap();
    assert_eq!(ext["mtls"], false, "plaintext edge: {ext}");
    assert_eq!(topo_len(&topo), 3, "no other edges: {topo}");
    let table = cluster.registry.meshctl_ok(&["topology"]).unwrap();
    let ext_row = table
        .lines()
        .find(|l| l.contains("external") && l.contains("default/api"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(ext_row.contains("PLAINTEXT"), "{table}");
    let dot = cluster
        .registry
        .meshctl_ok(&["topology", "-o", "dot"])
        .unwrap();
    assert!(dot.trim_start().starts_with("digraph"), "{dot}");
    for id in [
        "\"default/web\"",
        "\"default/api\"",
        "\"default/db\"",
        "\"external\"",
    ] {
        assert!(dot.contains(id), "{id} in {dot}");
    }

    // The mesh is healthy.
    // The test registry issues 1 h workload certificates.
    let check = cluster
        .registry
        .meshctl(&["check", "--cert-warn", "10m"])
        .unwrap();
    assert!(
        check.status.success(),
        "meshctl check on a healthy mesh:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // SLO: api 99% available; a route aborts half of web's calls with 503.
    let hook = Hook::start(cluster.registry.opts.ip).await;
    let slo = format!(
        r#"
[[resource]]
kind = "SLO"
name = "api-availability"
service = "api"
objective = "availability"
goal = 99.0
window = "1d"
[resource.alerting]
webhook = "http://{}/hook"
"#,
        hook.addr
    );
    let faults = r#"
[[resource]]
kind = "Route"
name = "api"
service = "api"
[[resource.http]]
name = "flaky"
fault = { abort = { status = 503, percent = 50 } }
"#;
    cluster.registry.apply("slo.toml", &slo).unwrap();
    let rev = cluster.registry.apply("faults.toml", faults).unwrap();
    cluster.nodes[2].wait_policy_revision(rev).await.unwrap();
    let replies = client.get_many(web_to_api, "/", &[], 200, 4).await.unwrap();
    let failed = replies.iter().filter(|r| r.status == 503).count();
    // Binomial(200, 0.5): sd 7; ±4.5 sd.
    assert!((68..=132).contains(&failed), "about half aborted: {failed}");

    let alert = eventually(Duration::from_secs(20), "the fast-burn webhook", || async {
        hook.bodies
            .lock()
            .unwrap()
            .iter()
            .find(|b| b["severity"] == "fast_burn")
            .cloned()
    })
    .await
    .unwrap();
    assert_eq!(alert["slo"], "SLO/default/api-availability", "{alert}");
    assert_eq!(alert["service"], "default/api", "{alert}");
    let status = meshctl_json(&cluster, &["slo", "status", "-o", "json"]);
    let s = status
        .as_array()
        .or_else(|| status["slos"].as_array())
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(s["alert"], "fast_burn", "{s}");
    assert!(
        s["budget_remaining"].as_f64().unwrap() < 0.0,
        "budget overspent: {s}"
    );
    assert!(s["sli"].as_f64().unwrap() < 90.0, "{s}");
    let (_, metrics) = http_get(&cluster.registry.admin.to_string(), "/metrics")
        .await
        .unwrap();
    assert!(
        mesh_e2e::metric_sum(
            &metrics,
            "mesh_registry_slo_alerts_total",
            &[("severity", "fast_burn")]
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );

    // A node that stops reporting fails `meshctl check`.
    cluster.node("c").kill9();
    // (It already fails on the burning SLO; wait for the silent node to be called out too.)
    let failing = eventually(
        Duration::from_secs(20),
        "meshctl check to see c silent",
        || async {
            let out = cluster
                .registry
                .meshctl(&["check", "--cert-warn", "10m"])
                .ok()?;
            let stale = String::from_utf8_lossy(&out.stdout).contains("✗ reports");
            (stale && out.status.code() == Some(1)).then_some(out)
        },
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&failing.stdout);
    let reports = text
        .lines()
        .skip_while(|l| !l.contains("reports"))
        .take(2)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        reports.starts_with("✗ reports")
            && reports
                .lines()
                .nth(1)
                .is_some_and(|l| l.trim_start().starts_with("c:")),
        "names the silent node: {text}"
    );
}

fn topo_len(t: &serde_json::Value) -> usize {
    t.as_array()
        .or_else(|| t["edges"].as_array())
        .map_or(0, Vec::len)
}
