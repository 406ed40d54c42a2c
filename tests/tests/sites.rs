//! Two sites on real processes: each its own registry (site b's intermediate signed under site
//! a's root; b's registry follows a's for policy and refuses applies of its own), its own gossip
//! pool and an east-west gateway; the gateways meet in WAN gossip. A service of site a calls one
//! that only site b has, through b's gateway, which never decrypts: the callee sees the caller's
//! own identity, a DENY for that identity applied at a is enforced in b, and once web's host is
//! removed in a (its certificates revoked), b refuses them too — and still does after a's
//! registry dies, while `meshctl check` at b says it is cut off. A service both sites run is
//! served locally, and when site a drains its instance the requests go, without one failing,
//! to the nearer of sites b and c by the round trip a's gateway measured — all of them, none to
//! the farther. a's topology marks the edge to b as crossing to b. The gateway refuses server
//! names that name a service its site does not export, or another site.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mesh_e2e::curl::{curl, field, status};
use mesh_e2e::http_app::{Client, HttpApp};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, WAIT, eventually, next_ip};

const EAST_WEST_PORT: u16 = 15443;
const WAN_PORT: u16 = 7947;

/// `[east_west]` of a gateway at `ip`, seeding the WAN with `peer`.
fn east_west(ip: IpAddr, peer: IpAddr, key_file: &std::path::Path) -> String {
    format!(
        "[east_west]\nbind = \"{ip}:{EAST_WEST_PORT}\"\nwan_bind = \"{ip}:{WAN_PORT}\"\n\
         wan_seeds = [\"{peer}:{WAN_PORT}\"]\nwan_interval = \"200ms\"\nwan_key_file = \"{}\"\n",
        key_file.display()
    )
}

fn export(services: &str) -> String {
    format!(
        "[[resource]]\nkind = \"ServiceExport\"\nname = \"to-other-sites\"\nservices = {services}\n"
    )
}

/// Sends a ClientHello naming `sni` to `addr`; the handshake cannot complete either way (this
/// client trusts nothing), what matters is what the gateway does with it.
async fn hello(addr: SocketAddr, sni: &str) {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp)).await;
    assert!(
        matches!(r, Ok(Err(_))),
        "{sni}: the handshake cannot succeed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_another_site_through_gateways_that_never_decrypt() {
    // Each registry imports the other's revocations (its own viewer credentials are good at
    // both: they chain to the shared root).
    let b_reg_ip = IpAddr::V4(next_ip());
    let mut a = Cluster::new(RegistryOpts {
        extra: vec![
            // Nodes report their edges often, for the topology.
            "report_interval = \"200ms\"".to_owned(),
            format!("[[peers]]\nsite = \"b\"\naddress = \"{b_reg_ip}:7700\""),
        ],
        ..RegistryOpts::default()
    })
    .await
    .unwrap();
    // Site b's registry: its own intermediate under a's root, and a's policy, followed with
    // the viewer credentials a's init wrote.
    let join = Some(("b".to_owned(), a.registry.data_dir.join("ca")));
    let follow = format!(
        "[follow]\nprimary = \"{}\"\ncredentials = \"{}\"",
        a.registry.addr,
        a.registry.data_dir.join("viewer").display()
    );
    let mut b = Cluster::new(RegistryOpts {
        join,
        ip: b_reg_ip,
        extra: vec![
            follow,
            format!("[[peers]]\nsite = \"a\"\naddress = \"{}\"", a.registry.addr),
        ],
        ..RegistryOpts::default()
    })
    .await
    .unwrap();
    let key_file = a.registry.dir.join("wan.key");
    // As the README tells an operator to make it.
    let key = std::process::Command::new("sh")
        .args(["-c", "head -c32 /dev/urandom | base64"])
        .output()
        .unwrap();
    let text = String::from_utf8(key.stdout).unwrap();
    std::fs::write(&key_file, format!("# the WAN keyring\n{text}")).unwrap();
    // Policy is applied at the primary only; b refuses it and takes a's.
    a.registry
        .apply("export.toml", &export("[\"users\", \"frontend\"]"))
        .unwrap();
    let refused = b.registry.apply("export.toml", &export("[\"audit\"]"));
    let e = refused.unwrap_err().to_string();
    assert!(e.contains(&format!("follows {}", a.registry.addr)), "{e}");

    let (gw_a_ip, gw_b_ip) = (IpAddr::V4(next_ip()), IpAddr::V4(next_ip()));
    let gateway = |cluster: &Cluster, name: &str, site: &str, ip: IpAddr, peer: IpAddr| {
        let mut spec = NodeSpec::new(name, cluster.registry.token(&["unused"], 1).unwrap());
        spec.ip = ip;
        spec.site = Some(site.to_owned());
        spec.extra = east_west(ip, peer, &key_file);
        spec
    };
    let spec = gateway(&b, "gw-b", "b", gw_b_ip, gw_a_ip);
    b.add_spec(spec).await.unwrap();
    let spec = gateway(&a, "gw-a", "a", gw_a_ip, gw_b_ip);
    a.add_spec(spec).await.unwrap();

    // Site c: a third registry (also under a's root, following a), a gateway, and a frontend:
    // a's meshd must prefer the nearer of b and c, not spread over both.
    let join = Some(("c".to_owned(), a.registry.data_dir.join("ca")));
    let follow = format!(
        "[follow]\nprimary = \"{}\"\ncredentials = \"{}\"",
        a.registry.addr,
        a.registry.data_dir.join("viewer").display()
    );
    let mut c = Cluster::new(RegistryOpts {
        join,
        extra: vec![follow],
        ..RegistryOpts::default()
    })
    .await
    .unwrap();
    let gw_c_ip = IpAddr::V4(next_ip());
    let spec = gateway(&c, "gw-c", "c", gw_c_ip, gw_a_ip);
    c.add_spec(spec).await.unwrap();
    let c_ip = next_ip();
    let front_c = HttpApp::start(SocketAddr::new(c_ip.into(), 0), "front-c")
        .await
        .unwrap();
    let mut spec = NodeSpec::new("apps-c", c.registry.token(&["frontend"], 1).unwrap());
    spec.ip = c_ip.into();
    spec.site = Some("c".to_owned());
    spec.seeds = vec![c.nodes[0].spec.gossip_addr()];
    spec.services = vec![ServiceSpec::new("frontend", front_c.addr).protocol("http")];
    c.add_spec(spec).await.unwrap();

    // Site b: users (only here), frontend, and audit (not exported).
    let b_ip = next_ip();
    let users = HttpApp::start(SocketAddr::new(b_ip.into(), 0), "users-b")
        .await
        .unwrap();
    let front_b = HttpApp::start(SocketAddr::new(b_ip.into(), 0), "front-b")
        .await
        .unwrap();
    let audit = HttpApp::start(SocketAddr::new(b_ip.into(), 0), "audit-b")
        .await
        .unwrap();
    let token = b
        .registry
        .token(&["users", "frontend", "audit"], 1)
        .unwrap();
    let mut spec = NodeSpec::new("apps-b", token);
    spec.ip = b_ip.into();
    spec.site = Some("b".to_owned());
    spec.seeds = vec![b.nodes[0].spec.gossip_addr()];
    spec.services = vec![
        ServiceSpec::new("users", users.addr).protocol("http"),
        ServiceSpec::new("frontend", front_b.addr).protocol("http"),
        ServiceSpec::new("audit", audit.addr).protocol("http"),
    ];
    b.add_spec(spec).await.unwrap();

    // Site a: frontend, and web calling users and frontend.
    let front_ip = next_ip();
    let front_a = HttpApp::start(SocketAddr::new(front_ip.into(), 0), "front-a")
        .await
        .unwrap();
    let mut spec = NodeSpec::new("front-a", a.registry.token(&["frontend"], 1).unwrap());
    spec.ip = front_ip.into();
    spec.site = Some("a".to_owned());
    spec.seeds = vec![a.nodes[0].spec.gossip_addr()];
    spec.services = vec![ServiceSpec::new("frontend", front_a.addr).protocol("http")];
    a.add_spec(spec).await.unwrap();
    let web_ip = next_ip();
    let web = HttpApp::start(SocketAddr::new(web_ip.into(), 0), "web")
        .await
        .unwrap();
    let up = move |port: u16| SocketAddr::new(web_ip.into(), port);
    let mut spec = NodeSpec::new("web-a", a.registry.token(&["web"], 1).unwrap());
    spec.ip = web_ip.into();
    spec.extra = "[telemetry]\nreport_interval = \"200ms\"\n".to_owned();
    spec.site = Some("a".to_owned());
    spec.seeds = vec![a.nodes[0].spec.gossip_addr()];
    spec.services = vec![
        ServiceSpec::new("web", web.addr)
            .protocol("http")
            .upstream("users", up(19201))
            .upstream("frontend", up(19202))
            .upstream("audit", up(19203)),
    ];
    a.add_spec(spec).await.unwrap();
    let web_node = a.node("web-a");
    // users: site b's instance, through b's one gateway; frontend: a's own, b's and c's.
    web_node.wait_endpoints("default/users", 1).await.unwrap();
    web_node
        .wait_endpoints("default/frontend", 3)
        .await
        .unwrap();
    // a's gateway measured how far b and c are; every meshd of a orders them by it.
    let sites = eventually(WAIT, "a's meshd to know how far b and c are", || async {
        let sites = web_node.sites().await.ok()?;
        (sites.len() == 2 && sites.iter().all(|(_, rtt)| rtt.is_some())).then_some(sites)
    })
    .await
    .unwrap();
    let nearest = format!("front-{}", sites[0].0);

    // The callee sees the caller's own identity: the gateway passed the mTLS through.
    let resp = curl(&[&format!("http://{}/who", up(19201))]);
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(field(&resp, "app"), "users-b");
    let xfcc = field(&resp, "xfcc");
    assert!(
        xfcc.contains("spiffe://mesh.test/ns/default/svc/web"),
        "{xfcc}"
    );
    assert!(
        b.node("gw-b")
            .metric(
                "meshd_east_west_connections_total",
                &[("service", "default/users")]
            )
            .await
            .unwrap()
            >= 1.0
    );
    // web's meshd counts what it sent to the other site.
    let crossed = [("destination", "default/users"), ("site", "b")];
    let n = a
        .node("web-a")
        .metric("meshd_cross_site_total", &crossed)
        .await
        .unwrap();
    assert!(n >= 1.0, "{n}");
    // Site a's topology marks the edge as crossing to b.
    let edge = eventually(WAIT, "a's topology to show web -> users in b", || async {
        let out = a.registry.meshctl_ok(&["topology", "-o", "json"]).ok()?;
        let t: serde_json::Value = serde_json::from_str(&out).ok()?;
        let edges = t["edges"].as_array()?.clone();
        edges
            .into_iter()
            .find(|e| e["source"] == "default/web" && e["destination"] == "default/users")
    })
    .await
    .unwrap();
    assert_eq!(edge["destination_site"], "b", "{edge}");
    let table = a.registry.meshctl_ok(&["topology"]).unwrap();
    assert!(
        table.lines().any(|l| l.split_whitespace().take(3).eq([
            "default/web",
            "default/users",
            "b"
        ])),
        "{table}"
    );
    // Nothing of audit crossed: site b does not export it, so site a does not know it.
    let resp = curl(&[&format!("http://{}/", up(19203))]);
    assert_eq!(status(&resp), 503, "{resp}");

    // A service both sites run is served by this site's instance.
    let client = Client::new();
    let replies = client.get_many(up(19202), "/", &[], 20, 2).await.unwrap();
    assert!(
        replies
            .iter()
            .all(|r| r.status == 200 && r.app == "front-a"),
        "{replies:?}"
    );

    // Site a drains its frontend: requests go to the nearest other site only, none fails.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut replies = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match client.get(up(19202), "/", &[]).await {
                    Ok(r) => replies.push((r.status, r.app)),
                    Err(e) => replies.push((0, e.to_string())),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            replies
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| a.node("front-a").stop(Duration::from_secs(15)).unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let replies = load.await.unwrap();
    let failed: Vec<_> = replies.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        replies.len()
    );
    assert!(replies.iter().any(|(_, app)| app == "front-a"));
    // Every request a did not serve went to the nearest site. Should the measured order have
    // changed meanwhile (a loaded host can move a loopback median past the 1 ms floor), to
    // the nearest before, then to the nearest after: never spread over both.
    let after = a.node("web-a").sites().await.unwrap();
    let then = format!("front-{}", after[0].0);
    let away: Vec<&str> = (replies.iter())
        .map(|(_, app)| app.as_str())
        .filter(|app| *app != "front-a")
        .collect();
    let switch = away
        .iter()
        .position(|app| *app != nearest)
        .unwrap_or(away.len());
    assert!(
        !away.is_empty() && away[switch..].iter().all(|app| *app == then),
        "{sites:?} then {after:?}: {away:?}"
    );
    if then != nearest {
        eprintln!("the measured order changed during the drain: {sites:?} then {after:?}");
    }

    // A DENY for web's identity, applied at the primary, is enforced in site b.
    let deny = "[[resource]]\nkind = \"AuthorizationPolicy\"\nname = \"no-web\"\n\
                action = \"DENY\"\nselector = { service = \"users\" }\n\
                [[resource.rules]]\nfrom = [{ principals = [\"spiffe://mesh.test/ns/default/svc/web\"] }]\n";
    a.registry.apply("deny.toml", deny).unwrap();
    eventually(WAIT, "site b to deny web", || async {
        let resp = curl(&[&format!("http://{}/", up(19201))]);
        (status(&resp) == 403).then_some(())
    })
    .await
    .unwrap();
    let check = b.registry.meshctl(&["check"]).unwrap();
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        out.contains(&format!("follows {} for policy", a.registry.addr)),
        "{out}"
    );
    assert!(
        out.contains("imports the revocations of site a: current"),
        "{out}"
    );

    // The gateway passes on only exported services of its own site.
    let gw_b = SocketAddr::new(gw_b_ip, EAST_WEST_PORT);
    hello(gw_b, "audit.default.b.svc.mesh").await;
    hello(gw_b, "users.default.a.svc.mesh").await;
    hello(gw_b, "users.default.svc.mesh").await;
    let gw = b.node("gw-b");
    for reason in [
        "east_west_not_exported",
        "east_west_other_site",
        "east_west_not_site_name",
    ] {
        let labels = [("direction", "inbound"), ("reason", reason)];
        let n = gw.metric_or_zero("meshd_rejected_connections_total", &labels);
        assert_eq!(n.await.unwrap(), 1.0, "{reason}");
    }
    assert_eq!(audit.requests(), 0, "nothing reached audit");

    // web's host removed in site a (its certificates revoked there): site b refuses them too,
    // from a's revocations imported by b's registry.
    a.registry.meshctl_ok(&["node", "remove", "web-a"]).unwrap();
    let revoked = [("direction", "inbound"), ("reason", "cert_revoked")];
    eventually(
        WAIT,
        "site b to refuse web's revoked certificate",
        || async {
            let resp = curl(&[&format!("http://{}/", up(19201))]);
            let n = b.nodes.iter().find(|n| n.spec.name == "apps-b")?;
            let refused = n
                .metric_or_zero("meshd_rejected_connections_total", &revoked)
                .await
                .ok()?;
            (status(&resp) != 200 && status(&resp) != 403 && refused >= 1.0).then_some(())
        },
    )
    .await
    .unwrap();

    // The primary's registry gone: b says how long it has been cut off and keeps enforcing
    // what it has (the DENY, and a's revocations).
    a.registry.kill9();
    let cut = eventually(WAIT, "b to notice the primary is gone", || async {
        let check = b.registry.meshctl(&["check"]).ok()?;
        let out = String::from_utf8_lossy(&check.stdout).into_owned();
        (out.contains("follow") && out.contains("cut off from") && out.contains("site a: cut off"))
            .then_some(out)
    })
    .await
    .unwrap();
    assert!(cut.contains("this site enforces its revision"), "{cut}");
    assert!(
        cut.contains("what it revoked until") && cut.contains("stays refused"),
        "{cut}"
    );
    let before = b
        .node("apps-b")
        .metric_or_zero("meshd_rejected_connections_total", &revoked)
        .await
        .unwrap();
    let resp = curl(&[&format!("http://{}/", up(19201))]);
    assert!(status(&resp) != 200, "{resp}");
    let after = b
        .node("apps-b")
        .metric_or_zero("meshd_rejected_connections_total", &revoked)
        .await
        .unwrap();
    assert!(
        after > before,
        "still refused as revoked: {before} → {after}"
    );
}
