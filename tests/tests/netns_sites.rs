//! The seed scenario on network namespaces: two sites, each a bridge of namespace hosts with its
//! own registry (b's follows a's), joined by a router through which a host reaches the other
//! site only at its east-west gateways' addresses. A Bank-of-Anthos-shaped app: an ingress
//! gateway in a, a frontend in both sites calling a users service in both, which calls a real
//! PostgreSQL only in site b. A load generator outside the mesh goes through a's ingress while,
//! one at a time: (a) a's frontend drains — no request fails; (b) a's frontend host is killed —
//! requests recover within 1 s; (c) one of b's two gateways is killed — a database session
//! open through it at that instant is lost, the path recovers within 1 s; (d) the sites are cut apart — what a has keeps being served, b is
//! unaffected; (e) a's registry is killed for the rest of the test — nothing fails; (f)
//! everything comes back — a's traffic is local again. Errors and recovery times are printed.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mesh_e2e::http_app::Client;
use mesh_e2e::netns::{self, Host, Net, Router};
use mesh_e2e::postgres::{self, Postgres};
use mesh_e2e::proc::Proc;
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, WAIT, eventually};

const APP_PORT: u16 = 8080;
const INGRESS_PORT: u16 = 8088;
const EAST_WEST_PORT: u16 = 15443;
const WAN_PORT: u16 = 7947;
const USERS_UP: u16 = 19001;
const DB_UP: u16 = 19002;
const PG_PORT: u16 = 5432;
/// The issue's bound on a failover after a kill -9.
const RECOVER_WITHIN: Duration = Duration::from_secs(1);

/// One request of the load: when it was sent (since the load began), how long it took, its
/// path, status and answering frontend.
#[derive(Debug, Clone)]
struct Sample {
    at: Duration,
    took: Duration,
    path: &'static str,
    status: u16,
    app: String,
}

/// GETs `/` (half the workers) and `/account` (the other half) against `addr` until `stop`: a
/// request stuck on the database does not hold up the others.
fn load(
    addr: SocketAddr,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let client = Client::new();
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers {
            let (client, stop) = (client.clone(), stop.clone());
            tasks.spawn(async move {
                let mut out = Vec::new();
                let path = if w % 2 == 0 { "/" } else { "/account" };
                while !stop.load(Ordering::SeqCst) {
                    let at = start.elapsed();
                    let r =
                        tokio::time::timeout(Duration::from_secs(10), client.get(addr, path, &[]))
                            .await;
                    let (status, app) = match r {
                        Ok(Ok(r)) => (r.status, r.app),
                        Ok(Err(e)) => (0, format!("client error: {e}")),
                        Err(_) => (0, "client timeout".to_owned()),
                    };
                    out.push(Sample {
                        at,
                        took: start.elapsed() - at,
                        path,
                        status,
                        app,
                    });
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                out
            });
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.extend(r.unwrap());
        }
        all.sort_by_key(|s| s.at);
        all
    })
}

/// A phase's outcome, over the requests of `path` (None: both) that *ended* in
/// `from..until` (a request in flight when a phase's fault strikes belongs to that phase): how
/// many, how many failed, and the time from `from` to the end of the last failure (zero when
/// none failed).
fn judge(
    samples: &[Sample],
    from: Duration,
    until: Duration,
    path: Option<&str>,
) -> (usize, usize, Duration) {
    let end = |s: &Sample| s.at + s.took;
    let mine: Vec<&Sample> = (samples.iter())
        .filter(|s| (from..until).contains(&end(s)) && path.is_none_or(|p| s.path == p))
        .collect();
    let failed: Vec<&&Sample> = mine.iter().filter(|s| s.status != 200).collect();
    let recovered = failed
        .last()
        .map_or(Duration::ZERO, |s| end(s).saturating_sub(from));
    (mine.len(), failed.len(), recovered)
}

struct Site {
    cluster: Cluster,
    net: Net,
    apps: Vec<Proc>,
}

fn chain_app(site: &mut Site, host: &Host, name: &str, args: &[&str]) {
    let bin = mesh_e2e::bins().meshd.with_file_name("chain_app");
    let listen = SocketAddr::new(host.ip.into(), APP_PORT).to_string();
    let mut all = vec!["--listen", &listen, "--name", name];
    all.extend_from_slice(args);
    let log = site.cluster.registry.dir.join(format!("{name}.log"));
    site.apps
        .push(Proc::start(Some(&host.ns), &bin, &all, &log).unwrap());
}

/// Starts meshd on `host` of `site` with `services` (and `extra` appended to meshd.toml).
async fn meshd(
    site: &mut Site,
    host: &Host,
    name: &str,
    site_name: &str,
    services: Vec<ServiceSpec>,
    token_for: &[&str],
    extra: String,
) {
    let token = site.cluster.registry.token(token_for, 1).unwrap();
    let mut spec = NodeSpec::new(name, token);
    spec.ip = host.ip.into();
    spec.netns = Some(host.ns.clone());
    spec.site = Some(site_name.to_owned());
    spec.seeds = site
        .cluster
        .nodes
        .iter()
        .map(|n| n.spec.gossip_addr())
        .collect();
    spec.services = services;
    spec.extra = extra;
    site.cluster.add_spec(spec).await.unwrap();
}

fn east_west(ip: Ipv4Addr, seeds: &[Ipv4Addr], key: &std::path::Path) -> String {
    let seeds: Vec<String> = seeds
        .iter()
        .map(|s| format!("\"{s}:{WAN_PORT}\""))
        .collect();
    format!(
        "[east_west]\nbind = \"{ip}:{EAST_WEST_PORT}\"\nwan_bind = \"{ip}:{WAN_PORT}\"\n\
         wan_seeds = [{}]\nwan_interval = \"200ms\"\nwan_key_file = \"{}\"\n",
        seeds.join(", "),
        key.display()
    )
}

fn app_spec(name: &str, host: &Host) -> ServiceSpec {
    ServiceSpec::new(name, SocketAddr::new(host.ip.into(), APP_PORT)).protocol("http")
}

fn up(host: &Host, port: u16) -> SocketAddr {
    SocketAddr::new(host.ip.into(), port)
}

const POLICY: &str = r#"
[[resource]]
kind = "ServiceExport"
name = "to-other-sites"
services = ["frontend", "users", "db"]

[[resource]]
kind = "Gateway"
name = "public"
[[resource.listeners]]
name = "web"
bind = "0.0.0.0:8088"
protocol = "http"

[[resource]]
kind = "Route"
name = "edge"
gateways = ["public"]
[[resource.http]]
route = [{ service = "frontend" }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_distributed_service_survives_losing_a_site() {
    if !mesh_e2e::can_run(
        "netns",
        netns::available(),
        "this process may not create network namespaces (run as root)",
    ) {
        return;
    }
    if !mesh_e2e::can_run(
        "postgres",
        postgres::available(),
        "no PostgreSQL server installed (scripts/setup installs it)",
    ) {
        return;
    }
    let id = 10 + ((std::process::id() % 40) * 2) as u8;
    let (net_a, net_b) = (Net::new(id).unwrap(), Net::new(id + 1).unwrap());
    let router = Router::new(&[&net_a, &net_b]).unwrap();
    let cluster_a = Cluster::new(RegistryOpts {
        ip: net_a.gateway().into(),
        ..RegistryOpts::default()
    })
    .await
    .unwrap();
    let follow = format!(
        "[follow]\nprimary = \"{}\"\ncredentials = \"{}\"",
        cluster_a.registry.addr,
        cluster_a.registry.data_dir.join("viewer").display()
    );
    let cluster_b = Cluster::new(RegistryOpts {
        ip: net_b.gateway().into(),
        join: Some(("b".to_owned(), cluster_a.registry.data_dir.join("ca"))),
        extra: vec![follow],
        ..RegistryOpts::default()
    })
    .await
    .unwrap();
    let mut a = Site {
        cluster: cluster_a,
        net: net_a,
        apps: Vec::new(),
    };
    let mut b = Site {
        cluster: cluster_b,
        net: net_b,
        apps: Vec::new(),
    };
    a.cluster.registry.apply("sites.toml", POLICY).unwrap();
    let key = a.cluster.registry.dir.join("wan.key");
    let text = std::process::Command::new("sh")
        .args(["-c", "head -c32 /dev/urandom | base64"])
        .output()
        .unwrap();
    std::fs::write(&key, text.stdout).unwrap();

    // Hosts, and who reaches what: the gateways reach the other site, the rest only its gateways.
    let (a_gw, a_in, a_front, a_users) = (
        a.net.add_host(2).unwrap(),
        a.net.add_host(3).unwrap(),
        a.net.add_host(4).unwrap(),
        a.net.add_host(5).unwrap(),
    );
    let (b_gw1, b_gw2, b_front, b_users, b_db) = (
        b.net.add_host(2).unwrap(),
        b.net.add_host(3).unwrap(),
        b.net.add_host(4).unwrap(),
        b.net.add_host(5).unwrap(),
        b.net.add_host(6).unwrap(),
    );
    let (via_a, via_b) = (router.addr_on(&a.net), router.addr_on(&b.net));
    netns::route(&a_gw, &format!("10.213.{}.0/24", b.net.subnet), via_a).unwrap();
    for gw in [&b_gw1, &b_gw2] {
        netns::route(gw, &format!("10.213.{}.0/24", a.net.subnet), via_b).unwrap();
        for h in [&a_in, &a_front, &a_users] {
            netns::route(h, &format!("{}/32", gw.ip), via_a).unwrap();
        }
    }
    for h in [&b_front, &b_users, &b_db] {
        netns::route(h, &format!("{}/32", a_gw.ip), via_b).unwrap();
    }

    // Site b: two gateways, frontend, users, and the database.
    let pg_log = b.cluster.registry.dir.join("postgres.log");
    let pg = Postgres::start_in(Some(&b_db.ns), "sites", up(&b_db, PG_PORT), &pg_log)
        .await
        .unwrap();
    let ew = east_west(b_gw1.ip, &[a_gw.ip], &key);
    meshd(&mut b, &b_gw1, "b-gw1", "b", Vec::new(), &["unused"], ew).await;
    let ew = east_west(b_gw2.ip, &[a_gw.ip, b_gw1.ip], &key);
    meshd(&mut b, &b_gw2, "b-gw2", "b", Vec::new(), &["unused"], ew).await;
    let db = ServiceSpec::new("db", pg.addr);
    meshd(&mut b, &b_db, "b-db", "b", vec![db], &["db"], String::new()).await;
    chain_app(
        &mut b,
        &b_users,
        "users-b",
        &["--postgres", &up(&b_users, DB_UP).to_string()],
    );
    let users = app_spec("users", &b_users).upstream("db", up(&b_users, DB_UP));
    meshd(
        &mut b,
        &b_users,
        "b-users",
        "b",
        vec![users],
        &["users"],
        String::new(),
    )
    .await;
    chain_app(
        &mut b,
        &b_front,
        "front-b",
        &["--call", &up(&b_front, USERS_UP).to_string()],
    );
    let front = app_spec("frontend", &b_front).upstream("users", up(&b_front, USERS_UP));
    meshd(
        &mut b,
        &b_front,
        "b-front",
        "b",
        vec![front],
        &["frontend"],
        String::new(),
    )
    .await;

    // Site a: a gateway, the ingress, frontend and users (no database).
    let ew = east_west(a_gw.ip, &[b_gw1.ip, b_gw2.ip], &key);
    meshd(&mut a, &a_gw, "a-gw", "a", Vec::new(), &["unused"], ew).await;
    chain_app(
        &mut a,
        &a_users,
        "users-a",
        &["--postgres", &up(&a_users, DB_UP).to_string()],
    );
    let users = app_spec("users", &a_users).upstream("db", up(&a_users, DB_UP));
    meshd(
        &mut a,
        &a_users,
        "a-users",
        "a",
        vec![users],
        &["users"],
        String::new(),
    )
    .await;
    chain_app(
        &mut a,
        &a_front,
        "front-a",
        &["--call", &up(&a_front, USERS_UP).to_string()],
    );
    let front = app_spec("frontend", &a_front).upstream("users", up(&a_front, USERS_UP));
    meshd(
        &mut a,
        &a_front,
        "a-front",
        "a",
        vec![front],
        &["frontend"],
        String::new(),
    )
    .await;
    let ingress = "[gateway]\nnames = [\"default/public\"]\n".to_owned();
    meshd(
        &mut a,
        &a_in,
        "a-ingress",
        "a",
        Vec::new(),
        &["public"],
        ingress,
    )
    .await;
    // a's users sees b's database through b's two gateways; the ingress sees both frontends.
    a.cluster
        .node("a-users")
        .wait_endpoints("default/db", 2)
        .await
        .unwrap();
    a.cluster
        .node("a-ingress")
        .wait_endpoints("default/frontend", 3)
        .await
        .unwrap();

    let entry = SocketAddr::new(a_in.ip.into(), INGRESS_PORT);
    let client = Client::new();
    eventually(WAIT, "the ingress to serve /account", || async {
        let r = client.get(entry, "/account", &[]).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        for app in ["front-a", "users-a"] {
            let log = std::fs::read_to_string(a.cluster.registry.dir.join(format!("{app}.log")));
            eprintln!("--- {app} ---\n{}", log.unwrap_or_default());
        }
        panic!("{e}")
    });
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(entry, 4, stop.clone());
    let begin = Instant::now();
    let settle = || tokio::time::sleep(Duration::from_millis(1500));
    settle().await;

    // (a) a's frontend drains (scaled to 0).
    let t_a = begin.elapsed();
    tokio::task::block_in_place(|| {
        a.cluster
            .node("a-front")
            .stop(Duration::from_secs(15))
            .unwrap()
    });
    settle().await;
    let t_a_end = begin.elapsed();
    a.cluster.node("a-front").run().unwrap();
    a.cluster.node("a-front").wait_ready().await.unwrap();
    a.cluster
        .node("a-ingress")
        .wait_endpoints("default/frontend", 3)
        .await
        .unwrap();
    settle().await;

    // (b) a's frontend host killed.
    let t_b = begin.elapsed();
    a.cluster.node("a-front").kill9();
    settle().await;
    settle().await;
    a.cluster.node("a-front").run().unwrap();
    a.cluster.node("a-front").wait_ready().await.unwrap();
    a.cluster
        .node("a-ingress")
        .wait_endpoints("default/frontend", 3)
        .await
        .unwrap();
    settle().await;

    // (c) one of b's gateways killed.
    let t_c = begin.elapsed();
    b.cluster.node("b-gw1").kill9();
    settle().await;
    settle().await;

    // (d) the sites cut apart: a serves what a has; b, called directly, is unaffected.
    let t_d = begin.elapsed();
    router.set_link(&a.net, false).unwrap();
    let b_direct = SocketAddr::new(b_front.ip.into(), APP_PORT);
    let mut b_ok = 0;
    for _ in 0..20 {
        let r = client.get(b_direct, "/account", &[]).await.unwrap();
        assert_eq!(
            (r.status, r.app.as_str()),
            (200, "front-b"),
            "b while cut off"
        );
        b_ok += 1;
    }
    settle().await;
    let t_d_end = begin.elapsed();
    router.set_link(&a.net, true).unwrap();
    settle().await;
    settle().await;

    // (e) a's registry gone for the rest of the test.
    let t_e = begin.elapsed();
    a.cluster.registry.kill9();
    settle().await;

    // (f) everything back: b's gateway, and a's traffic is local again.
    let t_f = begin.elapsed();
    b.cluster.node("b-gw1").run().unwrap();
    b.cluster.node("b-gw1").wait_ready().await.unwrap();
    settle().await;
    stop.store(true, Ordering::SeqCst);
    let samples = running.await.unwrap();

    let (n_a, f_a_all, _) = judge(&samples, t_a, t_a_end, None);
    let (n_b, f_b, r_b) = judge(&samples, t_b, t_c, None);
    let (n_c, f_c, r_c) = judge(&samples, t_c, t_d, None);
    let (n_d, f_d_local, _) = judge(&samples, t_d, t_d_end, Some("/"));
    let (n_d_db, f_d_db, _) = judge(&samples, t_d, t_d_end, Some("/account"));
    let (n_e, f_e, _) = judge(&samples, t_e, t_f, None);
    for s in samples.iter().filter(|s| s.status != 200) {
        eprintln!("failed: {s:?}");
    }
    eprintln!(
        "phases at: a {t_a:?} b {t_b:?} c {t_c:?} d {t_d:?}..{t_d_end:?} e {t_e:?} f {t_f:?}"
    );
    let tail: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= t_f + Duration::from_millis(1000))
        .collect();
    eprintln!(
        "sites scenario ({} requests): (a) drain: {f_a_all} of {n_a} failed; (b) kill -9 frontend: {f_b} of {n_b} failed, recovered after {r_b:?}; \
         (c) kill -9 a b gateway: {f_c} of {n_c} failed, recovered after {r_c:?}; (d) cut: {f_d_local} of {n_d} local requests failed, \
         {f_d_db} of {n_d_db} needing b's database failed, b answered {b_ok}/20 directly; (e) a's registry down: {f_e} of {n_e} failed",
        samples.len()
    );
    assert_eq!(f_a_all, 0, "(a) a drain loses no request");
    assert!(r_b <= RECOVER_WITHIN, "(b) recovered after {r_b:?}");
    assert!(r_c <= RECOVER_WITHIN, "(c) recovered after {r_c:?}");
    assert!(
        n_d > 0 && f_d_local == 0,
        "(d) a keeps serving what it has: {f_d_local} of {n_d} failed"
    );
    assert_eq!(f_e, 0, "(e) nothing fails without a's registry");
    // Served from b while a's frontend was down, from a again at the end.
    let drained: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > t_a + Duration::from_millis(500) && s.at < t_a_end)
        .collect();
    assert!(
        !drained.is_empty() && drained.iter().all(|s| s.app == "front-b"),
        "{drained:?}"
    );
    assert!(
        !tail.is_empty() && tail.iter().all(|s| s.status == 200 && s.app == "front-a"),
        "(f) {tail:?}"
    );
    drop(pg);
}
