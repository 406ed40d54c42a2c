//! meshd under systemd's notification protocol (`Type=notify`): `READY=1` reaches the socket in
//! `NOTIFY_SOCKET` only once the node serves (listeners bound, certificates loaded, a policy
//! snapshot in place), `RELOADING=1` then `READY=1` around a SIGHUP reload, and `STOPPING=1`
//! when SIGTERM starts the drain. (No systemd runs as PID 1
//! here: the test plays systemd's part with a datagram socket.)
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use mesh_e2e::apps::Echo;
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, http_get, next_ip};

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_stopping_are_notified() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let dir = cluster.registry.dir.join("notify");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let ip = next_ip();
    let echo = Echo::start(SocketAddr::new(ip.into(), 0)).await.unwrap();
    let token = cluster.registry.token(&["api"], 1).unwrap();
    let mut spec = NodeSpec::new("n1", token);
    spec.ip = ip.into();
    spec.services = vec![ServiceSpec::new("api", echo.addr)];
    spec.env = vec![("NOTIFY_SOCKET".into(), path.to_str().unwrap().into())];
    cluster.add_spec(spec).await.unwrap();

    let first = tokio::task::block_in_place(|| recv(&sock));
    assert_eq!(first, "READY=1\nSTATUS=serving");
    // Ready was notified no earlier than /ready turned 200.
    let admin = cluster.nodes[0].admin.to_string();
    let (code, _) = http_get(&admin, "/ready").await.unwrap();
    assert_eq!(code, 200);

    // `systemctl reload` (SIGHUP): reloading, then ready again once the reload is decided.
    let node = cluster.node("n1");
    node.sighup().unwrap();
    let reloading = tokio::task::block_in_place(|| recv(&sock));
    assert_eq!(reloading, "RELOADING=1\nSTATUS=reloading");
    let reloaded = tokio::task::block_in_place(|| recv(&sock));
    assert_eq!(reloaded, "READY=1\nSTATUS=serving");
    assert_eq!(node.reload_status().await.unwrap()["generation"], 1);

    let code = tokio::task::block_in_place(|| node.stop(Duration::from_secs(30))).unwrap();
    assert_eq!(code, Some(0));
    let stopping = tokio::task::block_in_place(|| recv(&sock));
    assert_eq!(stopping, "STOPPING=1\nSTATUS=draining");
}
