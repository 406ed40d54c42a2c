//! Hot reload (SIGHUP, `systemctl reload meshd`) on real meshd processes under continuous
//! traffic: service files added, changed and removed, health checks changed, and reloads that
//! must be refused whole (invalid file, restart-only key, an address already taken) — with
//! not one request lost on the way.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mesh_e2e::http_app::{Client, HttpApp};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, eventually, http_get, next_ip};

/// Requests sent and the ones that did not get the app's 200, with why.
#[derive(Default)]
struct Load {
    sent: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

/// Keeps `conns` keep-alive clients plus one connection-per-request client busy on `addr`
/// until `stop` is set.
fn drive(
    addr: SocketAddr,
    conns: usize,
    stop: Arc<AtomicBool>,
    load: Arc<Load>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (stop, load) = (stop.clone(), load.clone());
        let client = Client::new();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let r = client.get(addr, "/", &[]).await;
                load.sent.fetch_add(1, Ordering::SeqCst);
                match r {
                    Ok(r) if r.status == 200 && r.app == "api" => {}
                    Ok(r) => load.failures.lock().unwrap().push(format!(
                        "keep-alive: {} {} {}",
                        r.status, r.app, r.mesh_error
                    )),
                    Err(e) => load
                        .failures
                        .lock()
                        .unwrap()
                        .push(format!("keep-alive: {e:#}")),
                }
            }
        }));
    }
    // A new TCP connection per request: exercises the accept loops being swapped.
    tasks.push(tokio::spawn(async move {
        let addr = addr.to_string();
        while !stop.load(Ordering::SeqCst) {
            let r = http_get(&addr, "/").await;
            load.sent.fetch_add(1, Ordering::SeqCst);
            match r {
                Ok((200, _)) => {}
                Ok((code, body)) => load
                    .failures
                    .lock()
                    .unwrap()
                    .push(format!("new connection: {code} {body}")),
                Err(e) => load
                    .failures
                    .lock()
                    .unwrap()
                    .push(format!("new connection: {e:#}")),
            }
        }
    }));
    tasks
}

async fn get_ok(addr: SocketAddr, app: &str) -> bool {
    matches!(Client::new().get(addr, "/", &[]).await, Ok(r) if r.status == 200 && r.app == app)
}

async fn refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::net::TcpStream::connect(addr).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_services_under_traffic_without_losing_a_request() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();

    // b: serves api (HTTP, with a health check) and later api2.
    let ip_b = next_ip();
    let api = HttpApp::start(SocketAddr::new(ip_b.into(), 0), "api")
        .await
        .unwrap();
    let api2 = HttpApp::start(SocketAddr::new(ip_b.into(), 0), "api2")
        .await
        .unwrap();
    let check = |interval: &str| {
        format!(
            "name = \"http\"\nhttp = \"/healthz\"\ninterval = \"{interval}\"\ntimeout = \"150ms\""
        )
    };
    let api_spec = ServiceSpec::new("api", api.addr)
        .protocol("http")
        .label("version", "v1")
        .check(&check("200ms"));
    let mut b = NodeSpec::new("b", cluster.registry.token(&["api", "api2"], 1).unwrap());
    b.ip = ip_b.into();
    b.services = vec![api_spec.clone()];
    cluster.add_spec(b).await.unwrap();

    // a: web calls api on u1.
    let ip_a = next_ip();
    let port = |p: u16| SocketAddr::new(ip_a.into(), p);
    let (u1, u2, u3, u4) = (port(19101), port(19102), port(19103), port(19104));
    let web = |ups: &[(&str, SocketAddr)]| {
        let mut s = ServiceSpec::new("web", port(18080)).protocol("http");
        for (svc, bind) in ups {
            s = s.upstream(svc, *bind);
        }
        s
    };
    let mut a = NodeSpec::new("a", cluster.registry.token(&["web", "batch"], 1).unwrap());
    a.ip = ip_a.into();
    a.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    a.services = vec![web(&[("api", u1)])];
    cluster.add_spec(a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster
        .node("a")
        .wait_endpoints("default/api", 1)
        .await
        .unwrap();
    assert!(get_ok(u1, "api").await);

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let tasks = drive(u1, 3, stop.clone(), load.clone());
    let progress = |load: Arc<Load>| async move {
        // Some traffic between steps, so each reload happens under load.
        let n = load.sent.load(Ordering::SeqCst);
        eventually(Duration::from_secs(10), "traffic to flow", || {
            let load = load.clone();
            async move { (load.sent.load(Ordering::SeqCst) >= n + 200).then_some(()) }
        })
        .await
        .unwrap();
    };
    progress(load.clone()).await;

    let node_a = &cluster.nodes[1];
    let node_b = &cluster.nodes[0];

    // 1. web gains an upstream, and a new service file (batch, with its own upstream) appears.
    node_a
        .write_service_file("web.toml", &web(&[("api", u1), ("api", u2)]).to_toml())
        .unwrap();
    let batch = ServiceSpec::new("batch", port(18090)).upstream("api", u3);
    node_a
        .write_service_file("batch.toml", &batch.to_toml())
        .unwrap();
    let applied = node_a.reload().await.unwrap().unwrap();
    assert_eq!(
        applied["added"],
        serde_json::json!(["default/batch"]),
        "{applied}"
    );
    assert_eq!(
        applied["changed"],
        serde_json::json!(["default/web"]),
        "{applied}"
    );
    assert_eq!(
        applied["listeners"],
        serde_json::json!([2, 0, 0]),
        "{applied}"
    );
    assert!(get_ok(u2, "api").await, "the new upstream of web serves");
    // batch needs its workload certificate first (issued after the reload).
    eventually(
        Duration::from_secs(10),
        "batch's upstream to serve",
        || async { get_ok(u3, "api").await.then_some(()) },
    )
    .await
    .unwrap();
    progress(load.clone()).await;

    // 2. On b: api's label changes and its check runs at another interval. The check restarts
    //    but api stays published healthy (else a's requests would get 503 no_endpoints).
    let mut changed = api_spec.clone();
    changed.labels = vec![("version".into(), "v2".into())];
    changed.checks = vec![check("300ms")];
    node_b
        .write_service_file("api.toml", &changed.to_toml())
        .unwrap();
    let applied = node_b.reload().await.unwrap().unwrap();
    assert_eq!(
        applied["changed"],
        serde_json::json!(["default/api"]),
        "{applied}"
    );
    eventually(
        Duration::from_secs(10),
        "a to see api's new label",
        || async {
            let (_, body) = http_get(&node_a.admin.to_string(), "/members").await.ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["endpoints"]["default/api"][0]["labels"]["version"] == "v2").then_some(())
        },
    )
    .await
    .unwrap();
    progress(load.clone()).await;

    // 3. An invalid service file: refused whole, naming the file and key; all else unchanged.
    node_a
        .write_service_file(
            "batch.toml",
            "name = \"batch\"\naddress = \"127.0.0.1:18090\"\nupstreams = 3\n",
        )
        .unwrap();
    node_a
        .write_service_file(
            "web.toml",
            &web(&[("api", u1), ("api", u2), ("api", u4)]).to_toml(),
        )
        .unwrap();
    let err = node_a.reload().await.unwrap().unwrap_err();
    assert!(
        err.contains("batch.toml") && err.contains("upstreams"),
        "{err}"
    );
    assert!(refused(u4).await, "nothing of a refused reload is applied");
    assert!(get_ok(u3, "api").await, "the running batch is untouched");
    let log = node_a.log();
    assert!(
        log.contains("configuration reload refused") && log.contains("batch.toml"),
        "refusal logged: {log}"
    );
    assert_eq!(
        node_a
            .metric("meshd_config_reloads_total", &[("result", "refused")])
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(
        node_a
            .metric("meshd_config_last_reload_successful", &[])
            .await
            .unwrap(),
        0.0
    );

    // 4. A restart-only key: refused, naming it.
    node_a
        .write_service_file("batch.toml", &batch.to_toml())
        .unwrap();
    let cfg_path = node_a.dir.join("meshd.toml");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        original.replace("interval = \"100ms\"", "interval = \"150ms\""),
    )
    .unwrap();
    let err = node_a.reload().await.unwrap().unwrap_err();
    assert!(
        err.contains("gossip.interval") && err.contains("restart"),
        "{err}"
    );
    assert!(refused(u4).await);
    std::fs::write(&cfg_path, &original).unwrap();

    // 5. An address already taken: the reload is refused and the other new listener of the
    //    same reload is closed again.
    let squatter = std::net::TcpListener::bind(port(19105)).unwrap();
    node_a
        .write_service_file(
            "web.toml",
            &web(&[("api", u1), ("api", u2), ("api", u4), ("api", port(19105))]).to_toml(),
        )
        .unwrap();
    let err = node_a.reload().await.unwrap().unwrap_err();
    assert!(err.contains("19105") && err.contains("in use"), "{err}");
    assert!(
        refused(u4).await,
        "the listener bound for the refused reload was closed"
    );
    drop(squatter);

    // 6. The same change without the taken address applies; then web drops u2.
    node_a
        .write_service_file(
            "web.toml",
            &web(&[("api", u1), ("api", u2), ("api", u4)]).to_toml(),
        )
        .unwrap();
    let applied = node_a.reload().await.unwrap().unwrap();
    assert_eq!(
        applied["listeners"],
        serde_json::json!([1, 0, 0]),
        "{applied}"
    );
    assert!(get_ok(u4, "api").await);
    node_a
        .write_service_file("web.toml", &web(&[("api", u1), ("api", u4)]).to_toml())
        .unwrap();
    let applied = node_a.reload().await.unwrap().unwrap();
    assert_eq!(
        applied["listeners"],
        serde_json::json!([0, 0, 1]),
        "{applied}"
    );
    assert!(refused(u2).await, "a removed upstream stops listening");
    progress(load.clone()).await;

    // u1, under load, moves from web to batch: same socket, a new accept loop started before
    // the old one stops.
    let batch = batch.upstream("api", u1);
    node_a
        .write_service_file("web.toml", &web(&[("api", u4)]).to_toml())
        .unwrap();
    node_a
        .write_service_file("batch.toml", &batch.to_toml())
        .unwrap();
    let applied = node_a.reload().await.unwrap().unwrap();
    assert_eq!(
        applied["listeners"],
        serde_json::json!([0, 1, 0]),
        "{applied}"
    );
    progress(load.clone()).await;

    // 7. b starts serving api2 (new file, new certificate); a's batch calls it; then b removes
    //    it again and a's view drops it.
    node_b
        .write_service_file(
            "api2.toml",
            &ServiceSpec::new("api2", api2.addr)
                .protocol("http")
                .to_toml(),
        )
        .unwrap();
    node_b.reload().await.unwrap().unwrap();
    node_a
        .write_service_file(
            "batch.toml",
            &batch.clone().upstream("api2", port(19106)).to_toml(),
        )
        .unwrap();
    node_a.reload().await.unwrap().unwrap();
    let answered = eventually(
        Duration::from_secs(15),
        "api2 to answer through the mesh",
        || async { get_ok(port(19106), "api2").await.then_some(()) },
    )
    .await;
    if answered.is_err() {
        let r = Client::new().get(port(19106), "/", &[]).await;
        panic!(
            "api2 not reachable: {r:?}\n--- a:\n{}\n--- b:\n{}",
            node_a.log(),
            node_b.log()
        );
    }
    node_b.remove_service_file("api2.toml").unwrap();
    let applied = node_b.reload().await.unwrap().unwrap();
    assert_eq!(
        applied["removed"],
        serde_json::json!(["default/api2"]),
        "{applied}"
    );
    node_a.wait_endpoints("default/api2", 0).await.unwrap();
    let dump = node_b.config_dump().await.unwrap();
    let workloads: Vec<&str> = (dump["identity"]["workloads"].as_array().unwrap().iter())
        .filter_map(|w| w["service"].as_str())
        .collect();
    assert_eq!(
        workloads,
        ["default/api"],
        "api2's certificate is no longer served"
    );
    progress(load.clone()).await;

    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let sent = load.sent.load(Ordering::SeqCst);
    let failures = load.failures.lock().unwrap().clone();
    assert!(sent >= 1_000, "enough traffic to mean something: {sent}");
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {failures:?}",
        failures.len()
    );
    let status = node_a.reload_status().await.unwrap();
    assert_eq!(status["generation"], 5, "{status}");
    assert_eq!(status["refused"], 3, "{status}");
    eprintln!("{sent} requests, none lost, across 9 reloads (3 refused) on a and 3 on b");
}
