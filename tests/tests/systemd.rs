//! meshd under systemd's notification protocol (`Type=notify`): `READY=1` reaches the socket in
//! `NOTIFY_SOCKET` only once the node serves (listeners bound, certificates loaded, a policy
//! snapshot in place) — checked the moment the datagram arrives, not after the harness waited
//! for `/ready` — and never while the node has no identity and no policy (registry down,
//! nothing persisted); `RELOADING=1` then `READY=1` around a SIGHUP reload, and `STOPPING=1`
//! when SIGTERM starts the drain. (No systemd runs as PID 1 here: the test plays systemd's part
//! with a datagram socket.)
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use mesh_e2e::apps::Echo;
use mesh_e2e::{Cluster, Node, NodeSpec, RegistryOpts, ServiceSpec, http_get, next_ip};

/// The next notification, or `None` after `timeout`.
fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A notification socket under the cluster's scratch dir.
fn notify_socket(cluster: &Cluster) -> (UnixDatagram, PathBuf) {
    let dir = cluster.registry.dir.join("notify");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    (UnixDatagram::bind(&path).unwrap(), path)
}

/// A policy in force from the start, so "a snapshot in place" is visible as its revision.
const POLICY: &str = r#"
[[resource]]
kind = "PeerAuthentication"
name = "api-strict"
mode = "STRICT"
selector = { service = "api" }
"#;

/// What must hold the moment READY=1 arrives: every listener accepts, `/ready` is 200, the
/// workload certificate is installed and the policy revision `rev` is enforced.
async fn serving_now(node: &Node, upstream: SocketAddr, rev: u64) {
    for (what, addr) in [("inbound", node.inbound), ("upstream", upstream)] {
        // Bound is what is asked: a connection the listener accepts and then resets (the
        // upstream's endpoints may still be starting) proves it as well as one it keeps.
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("READY=1 before the {what} listener {addr} was bound: {e}"),
        }
    }
    let (code, _) = http_get(&node.admin.to_string(), "/ready").await.unwrap();
    assert_eq!(code, 200, "READY=1 before /ready turned 200");
    let certs = node.workload_not_after().await.unwrap();
    assert_eq!(
        certs.len(),
        2,
        "READY=1 before both workload certificates: {certs:?}"
    );
    let held = node.metric("meshd_policy_revision", &[]).await.unwrap() as u64;
    assert!(
        held >= rev,
        "READY=1 with policy revision {held}, {rev} applied before start"
    );
}

async fn spec(cluster: &Cluster, sock: &std::path::Path) -> (NodeSpec, SocketAddr, Echo) {
    let ip = next_ip();
    let echo = Echo::start(SocketAddr::new(ip.into(), 0)).await.unwrap();
    let token = cluster.registry.token(&["api", "web"], 1).unwrap();
    let mut spec = NodeSpec::new("n1", token);
    spec.ip = ip.into();
    let upstream = SocketAddr::new(ip.into(), 19001);
    spec.services = vec![
        ServiceSpec::new("api", echo.addr),
        ServiceSpec::new("web", SocketAddr::new(ip.into(), 18080)).upstream("api", upstream),
    ];
    spec.env = vec![("NOTIFY_SOCKET".into(), sock.to_str().unwrap().into())];
    (spec, upstream, echo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_sent_only_once_the_node_serves_and_stopping_on_sigterm() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let rev = cluster.registry.apply("strict.toml", POLICY).unwrap();
    let (sock, path) = notify_socket(&cluster);
    let (spec, upstream, _echo) = spec(&cluster, &path).await;
    // Started without waiting for /ready: the notification is the first thing the test sees.
    cluster
        .nodes
        .push(Node::start(&cluster.registry, spec).unwrap());

    let first =
        tokio::task::block_in_place(|| recv(&sock, mesh_e2e::scaled(Duration::from_secs(30))));
    assert_eq!(first.as_deref(), Some("READY=1\nSTATUS=serving"));
    serving_now(&cluster.nodes[0], upstream, rev).await;

    // `systemctl reload` (SIGHUP): reloading, then ready again once the reload is decided.
    let node = cluster.node("n1");
    node.sighup().unwrap();
    let wait = mesh_e2e::scaled(Duration::from_secs(30));
    let reloading = tokio::task::block_in_place(|| recv(&sock, wait));
    assert_eq!(reloading.as_deref(), Some("RELOADING=1\nSTATUS=reloading"));
    let reloaded = tokio::task::block_in_place(|| recv(&sock, wait));
    assert_eq!(reloaded.as_deref(), Some("READY=1\nSTATUS=serving"));
    assert_eq!(node.reload_status().await.unwrap()["generation"], 1);

    let code = tokio::task::block_in_place(|| node.stop(Duration::from_secs(30))).unwrap();
    assert_eq!(code, Some(0));
    let stopping = tokio::task::block_in_place(|| recv(&sock, wait));
    assert_eq!(stopping.as_deref(), Some("STOPPING=1\nSTATUS=draining"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ready_without_an_identity_and_a_policy() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let rev = cluster.registry.apply("strict.toml", POLICY).unwrap();
    let (sock, path) = notify_socket(&cluster);
    let (spec, upstream, _echo) = spec(&cluster, &path).await;
    // Registry down, nothing persisted: the node cannot join, so it must not claim readiness.
    cluster.registry.kill9();
    cluster
        .nodes
        .push(Node::start(&cluster.registry, spec).unwrap());
    let early = tokio::task::block_in_place(|| recv(&sock, Duration::from_secs(4)));
    assert_eq!(
        early, None,
        "notified with the registry down and nothing persisted"
    );
    assert!(
        cluster.nodes[0].is_running(),
        "meshd waits for the registry, it does not exit"
    );

    cluster.registry.run().await.unwrap();
    let ready =
        tokio::task::block_in_place(|| recv(&sock, mesh_e2e::scaled(Duration::from_secs(60))));
    assert_eq!(ready.as_deref(), Some("READY=1\nSTATUS=serving"));
    serving_now(&cluster.nodes[0], upstream, rev).await;
}
