//! Sealed gossip on real processes: nodes get the keyring from the registry; forged datagrams
//! are dropped and counted; `meshctl gossip-key rotate` replaces the key with every node
//! converged throughout and no authentic datagram refused; a node restarted while the
//! registry is down rejoins with the keyring it persisted.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use mesh_e2e::apps::Echo;
use mesh_e2e::{Cluster, Node, RegistryOpts, ServiceSpec, eventually, next_ip};

/// Drops of datagrams sealed with a key this node does not hold, or failing authentication.
async fn refused(node: &Node) -> f64 {
    let mut n = 0.0;
    for reason in ["unknown_key", "authentication_failed"] {
        n += node
            .metric(
                "meshd_gossip_datagrams_dropped_total",
                &[("reason", reason)],
            )
            .await
            .unwrap();
    }
    n
}

async fn keyring_revision(node: &Node) -> f64 {
    node.metric("meshd_gossip_keyring_revision", &[])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyring_rotation_forgeries_and_restart_without_registry() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let mut apps = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let echo = Echo::start(SocketAddr::new(next_ip().into(), 0))
            .await
            .unwrap();
        cluster
            .add(name, vec![ServiceSpec::new("api", echo.addr)])
            .await
            .unwrap();
        apps.push(echo);
    }
    cluster.converge().await.unwrap();

    // Forgeries: garbage, and well-formed datagrams naming a key nobody holds.
    let target = cluster.nodes[0].spec.gossip_addr();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..20u8 {
        let garbage = vec![i; 40];
        sock.send_to(&garbage, &target).await.unwrap();
        let mut stranger = vec![1u8, 0xde, 0xad, 0xbe, i];
        stranger.extend(rand::random::<[u8; 12]>());
        stranger.extend([7u8; 64]);
        sock.send_to(&stranger, &target).await.unwrap();
    }
    let n1 = &cluster.nodes[0];
    eventually(
        Duration::from_secs(10),
        "forged datagrams counted",
        || async {
            let dropped = n1
                .metric("meshd_gossip_datagrams_dropped_total", &[])
                .await
                .ok()?;
            (dropped >= 40.0).then_some(())
        },
    )
    .await
    .unwrap();
    cluster.converge().await.unwrap();

    // Rotation with every node connected: three steps, each waited for.
    let mut before = Vec::new();
    for n in &cluster.nodes {
        before.push(refused(n).await);
    }
    let reg = &cluster.registry;
    let out = tokio::task::block_in_place(|| {
        reg.meshctl_ok(&["gossip-key", "rotate", "--timeout", "30s"])
    })
    .unwrap();
    assert!(out.contains("keyring revision 4"), "{out}");
    let ids: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_end().ends_with("primary (seals)") || l.trim_end().ends_with("opens"))
        .collect();
    assert_eq!(ids.len(), 1, "one key after the rotation: {out}");
    for n in &cluster.nodes {
        assert_eq!(keyring_revision(n).await, 4.0, "{}", n.spec.name);
    }
    cluster.converge().await.unwrap();
    for (n, b) in cluster.nodes.iter().zip(&before) {
        assert_eq!(
            refused(n).await,
            *b,
            "{}: an authentic datagram was refused during the rotation",
            n.spec.name
        );
    }
    let list = tokio::task::block_in_place(|| reg.meshctl_ok(&["gossip-key", "list"])).unwrap();
    for name in ["n1", "n2", "n3"] {
        let line = list
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_default();
        assert!(line.contains(" 4 ") && line.contains("yes"), "{list}");
    }

    // Registry down: a restarted node rejoins with the keyring it persisted.
    cluster.registry.kill9();
    let n3 = cluster.node("n3");
    tokio::task::block_in_place(|| n3.stop(Duration::from_secs(30))).unwrap();
    n3.run().unwrap();
    let n1 = &cluster.nodes[0];
    eventually(Duration::from_secs(20), "n3 back in n1's view", || async {
        let (members, eps) = n1.view().await.ok()?;
        let api = eps.iter().find(|(s, _)| s == "default/api")?.1;
        (members.len() == 3 && api == 3).then_some(())
    })
    .await
    .unwrap();
}
