//! Revocation on real processes: `meshctl node remove` cuts a host off everywhere within
//! seconds — its new connections are refused, its open ones closed, callers stop routing to it,
//! gossip drops it — and that holds with the registry killed right after the command; the
//! removed host's calls to the registry are refused once it is back, and its name joins again
//! only with a replace token. Operator credentials: created, listed, revoked and then refused;
//! nobody can revoke the credentials they are calling with; the deny-list cannot be applied
//! by hand.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_e2e::Within as _;
use mesh_e2e::apps::{self, Echo};
use mesh_e2e::{Cluster, Load, NodeSpec, RegistryOpts, ServiceSpec, WAIT, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The aim: a removed node reaches no service anywhere within this long of the command.
const CUT_OFF: Duration = Duration::from_secs(5);

/// One checksummed round trip through `addr` on a new connection, bounded.
async fn works(addr: SocketAddr, seed: u64) -> bool {
    let data = apps::payload(2048, seed);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), apps::round_trip(addr, &data)).await,
        Ok(Ok(got)) if got == data
    )
}

/// A connection through `addr` that has carried one echo round trip and stays open.
async fn open_connection(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo within 5s")
        .unwrap();
    assert_eq!(&buf, b"hello");
    s
}

/// Whether an open echo connection still carries bytes (a closed one reads EOF or fails).
async fn still_open(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"ping"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_cut_off_everywhere_within_seconds_with_the_registry_down() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    // b serves api. x (to be removed) serves db and calls api; a calls api and db.
    let b_ip = mesh_e2e::next_ip();
    let api = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let mut spec_b = NodeSpec::new("b", cluster.registry.token(&["api"], 1).unwrap());
    spec_b.ip = b_ip.into();
    spec_b.services = vec![ServiceSpec::new("api", api.addr)];
    cluster.add_spec(spec_b).await.unwrap();

    let x_ip = mesh_e2e::next_ip();
    let db = Echo::start(SocketAddr::new(x_ip.into(), 0)).await.unwrap();
    let x_up = SocketAddr::new(x_ip.into(), 19101);
    let mut spec_x = NodeSpec::new("x", cluster.registry.token(&["db", "web"], 1).unwrap());
    spec_x.ip = x_ip.into();
    spec_x.seeds = vec![cluster.node("b").spec.gossip_addr()];
    spec_x.services = vec![
        ServiceSpec::new("db", db.addr),
        ServiceSpec::new("web", SocketAddr::new(x_ip.into(), 18080)).upstream("api", x_up),
    ];
    cluster.add_spec(spec_x).await.unwrap();

    let a_ip = mesh_e2e::next_ip();
    let (a_api, a_db) = (
        SocketAddr::new(a_ip.into(), 19201),
        SocketAddr::new(a_ip.into(), 19202),
    );
    let mut spec_a = NodeSpec::new("a", cluster.registry.token(&["front"], 1).unwrap());
    spec_a.ip = a_ip.into();
    spec_a.seeds = vec![cluster.node("b").spec.gossip_addr()];
    spec_a.services = vec![
        ServiceSpec::new("front", SocketAddr::new(a_ip.into(), 18081))
            .upstream("api", a_api)
            .upstream("db", a_db),
    ];
    cluster.add_spec(spec_a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster
        .node("a")
        .wait_endpoints("default/db", 1)
        .await
        .unwrap();
    cluster
        .node("x")
        .wait_endpoints("default/api", 1)
        .await
        .unwrap();
    assert!(works(x_up, 1).await, "x reaches api before the removal");
    assert!(works(a_db, 2).await, "a reaches db on x before the removal");
    let mut x_open = open_connection(x_up).await;
    let mut a_open = open_connection(a_db).await;
    // Traffic nobody revoked: a → api on b, throughout.
    let load = Load::start(a_api, 2, 1024, Duration::from_secs(5));
    load.progress(20, WAIT).await.unwrap();

    let out = cluster
        .registry
        .meshctl_ok(&["node", "remove", "x"])
        .unwrap();
    let removed_at = Instant::now();
    // The registry dies right after the command: the nodes enforce what they were pushed.
    cluster.registry.kill9();
    assert!(out.contains("node x removed"), "{out}");
    assert!(out.contains("certificate(s) revoked"), "{out}");

    let cut = eventually(CUT_OFF, "x cut off everywhere", || async {
        let x_refused = !works(x_up, 3).await;
        let a_refused = !works(a_db, 4).await;
        (x_refused && a_refused).then_some(())
    })
    .await;
    let elapsed = removed_at.elapsed();
    assert!(
        cut.is_ok(),
        "{cut:?}\nx log:\n{}\nb log:\n{}",
        cluster.node("x").log(),
        cluster.node("b").log()
    );
    assert!(
        !still_open(&mut x_open).await,
        "x's open connection to api was closed"
    );
    assert!(
        !still_open(&mut a_open).await,
        "a's open connection to db on x was closed"
    );
    eprintln!("removed node cut off everywhere {elapsed:?} after the command");
    // It stays cut off: every new attempt fails, on both sides.
    for i in 0..5 {
        assert!(
            !works(x_up, 10 + i).await,
            "x reached api again (attempt {i})"
        );
        assert!(
            !works(a_db, 20 + i).await,
            "a reached db on x again (attempt {i})"
        );
    }
    // a's view leaves x out: no endpoint for db, x not a member.
    let a = &cluster.nodes[2];
    eventually(WAIT, "x out of a's view", || async {
        let (members, endpoints) = a.view().await.ok()?;
        let db_usable = endpoints
            .iter()
            .find(|(s, _)| s == "default/db")
            .map_or(0, |(_, n)| *n);
        (!members.iter().any(|m| m == "x") && db_usable == 0).then_some(())
    })
    .await
    .unwrap();
    let b_refused = cluster
        .node("b")
        .metric(
            "meshd_rejected_connections_total",
            &[("direction", "inbound"), ("reason", "cert_revoked")],
        )
        .await
        .unwrap();
    assert!(
        b_refused >= 1.0,
        "b counted refused handshakes of x: {b_refused}"
    );
    // Unrelated traffic never noticed.
    load.progress(20, WAIT).await.unwrap();
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "a → api failed: {:?}", report.errors);

    // The registry comes back: x's calls (renewal, policy watch, reports) are refused.
    cluster.registry.run().await.unwrap();
    eventually(WAIT, "x's calls refused by the registry", || async {
        let n = (cluster.registry)
            .metric("mesh_registry_revoked_calls_total", &[])
            .await
            .ok()?;
        (n >= 1.0).then_some(())
    })
    .await
    .unwrap();
    let nodes = cluster.registry.meshctl_ok(&["nodes"]).unwrap();
    assert!(
        !nodes
            .lines()
            .any(|l| l.split_whitespace().next() == Some("x")),
        "x is no longer registered:\n{nodes}"
    );
    let deny = cluster
        .registry
        .meshctl_ok(&["get", "revocations", "-o", "json"])
        .unwrap();
    assert!(deny.contains("\"x\""), "the deny-list names x:\n{deny}");

    // Its name joins again only with a replace token.
    let again = cluster.registry.token(&["db"], 1).unwrap();
    let mut spec = NodeSpec::new("x", again);
    spec.dir_name = Some("x-again".to_owned());
    let mut node = mesh_e2e::Node::start(&cluster.registry, spec).unwrap();
    let code = node.exit_code().await.unwrap();
    let log = node.log();
    assert_eq!(code, Some(1), "the refused rejoin exits 1: {log}");
    assert!(
        log.contains("node x was removed") && log.contains("--replace x"),
        "the refused host's log says why and how:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_operator_credentials_are_refused() {
    let cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let reg = &cluster.registry;
    let dir = reg.dir.join("ops-creds");
    let out = reg
        .meshctl_ok(&[
            "credentials",
            "create",
            "--role",
            "admin",
            "ops",
            "--out",
            dir.to_str().unwrap(),
        ])
        .unwrap();
    assert!(out.contains("spiffe://mesh.test/admin/ops"), "{out}");
    let ops = |args: &[&str]| {
        std::process::Command::new(&reg.bins.meshctl)
            .arg("--credentials")
            .arg(&dir)
            .args(args)
            .within(mesh_e2e::CLI_TIMEOUT)
            .unwrap()
    };
    assert!(ops(&["nodes"]).status.success(), "the new credentials work");
    let list = reg.meshctl_ok(&["credentials", "list"]).unwrap();
    for id in ["admin/operator", "viewer/viewer", "admin/ops"] {
        let row = list
            .lines()
            .find(|l| l.contains(&format!("spiffe://mesh.test/{id} ")))
            .unwrap_or_else(|| panic!("{id} not listed:\n{list}"));
        assert!(row.contains("valid"), "{row}");
    }
    // Nobody revokes the credentials they call with.
    let own = ops(&["credentials", "revoke", "admin/ops"]);
    assert!(!own.status.success());
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("credentials making this call"),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let out = reg
        .meshctl_ok(&["credentials", "revoke", "admin/ops"])
        .unwrap();
    assert!(out.contains("1 certificate(s) revoked"), "{out}");
    let refused = ops(&["nodes"]);
    assert!(!refused.status.success(), "revoked credentials still work");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("revoked"), "{err}");
    let list = reg.meshctl_ok(&["credentials", "list"]).unwrap();
    assert!(
        list.lines()
            .any(|l| l.contains("spiffe://mesh.test/admin/ops ") && l.contains("revoked")),
        "{list}"
    );
    // The deny-list is the registry's: applying or deleting it by hand is refused.
    let file = reg.dir.join("deny.toml");
    std::fs::write(
        &file,
        "[[resource]]\nkind = \"Revocation\"\nname = \"revocations\"\n",
    )
    .unwrap();
    let applied = reg
        .meshctl(&["apply", "-f", file.to_str().unwrap()])
        .unwrap();
    assert!(!applied.status.success());
    assert!(
        String::from_utf8_lossy(&applied.stderr).contains("written by the registry only"),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let deleted = reg
        .meshctl(&["delete", "revocations", "revocations", "-n", "mesh-system"])
        .unwrap();
    assert!(!deleted.status.success());
    // Unknown serials are named, not silently accepted.
    let unknown = reg.meshctl(&["cert", "revoke", "abcdef"]).unwrap();
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no unexpired certificate"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}
