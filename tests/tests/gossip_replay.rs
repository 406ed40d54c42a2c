//! Gossip replay protection on real processes: a sealed datagram captured off the wire (a node
//! gossips to a seed address that is the test's own UDP socket) is accepted once by another
//! node and dropped as `replayed` after that; version-1 datagrams are dropped as `legacy` unless
//! `gossip.legacy_peers` is set.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use mesh_e2e::{Cluster, Node, NodeSpec, RegistryOpts, eventually, next_ip};
use tokio::net::UdpSocket;

/// First byte of a datagram in meshd's current gossip seal format (`gossip_seal::FORMAT_VERSION`).
const FORMAT_VERSION: u8 = 2;
/// First byte of the previous format, without replay protection.
const LEGACY_VERSION: u8 = 1;
/// Where the sender instance id and the counter sit in a version-2 header.
const INSTANCE_AND_COUNTER: std::ops::Range<usize> = 5..29;
const WAIT: Duration = Duration::from_secs(10);

async fn dropped(node: &Node, reason: &str) -> f64 {
    node.metric(
        "meshd_gossip_datagrams_dropped_total",
        &[("reason", reason)],
    )
    .await
    .unwrap()
}

/// The next datagram `tap` receives from `from`; others are skipped.
async fn next_from(tap: &UdpSocket, from: SocketAddr) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    tokio::time::timeout(WAIT, async {
        loop {
            let (len, src) = tap.recv_from(&mut buf).await.unwrap();
            if src == from {
                return buf[..len].to_vec();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no datagram from {from} within {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_gossip_datagram_is_accepted_once() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    cluster.add("n1", vec![]).await.unwrap();
    // The tap: a seed of n2's that is no node, so n2 sends it SYNs like any gossip on the wire.
    let tap = UdpSocket::bind(SocketAddr::new(next_ip().into(), 0))
        .await
        .unwrap();
    let token = cluster.registry.token(&["unused"], 1).unwrap();
    let mut spec = NodeSpec::new("n2", token);
    spec.seeds = vec![
        cluster.nodes[0].spec.gossip_addr(),
        tap.local_addr().unwrap(),
    ];
    cluster.add_spec(spec).await.unwrap();
    cluster.converge().await.unwrap();
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (n1_addr, n2_addr) = (n1.spec.gossip_addr(), n2.spec.gossip_addr());

    let captured = next_from(&tap, n2_addr).await;
    assert_eq!(
        captured[0], FORMAT_VERSION,
        "meshd seals the current format"
    );
    // Normal gossip, reordered or not, is never taken for a replay.
    for node in [n1, n2] {
        for reason in ["replayed", "stale"] {
            assert_eq!(
                dropped(node, reason).await,
                0.0,
                "{} {reason}",
                node.spec.name
            );
        }
    }

    // First copy: n2 sent that counter to the tap only, so it is new to n1, which answers the
    // SYN (to the tap, its apparent sender).
    tap.send_to(&captured, n1_addr).await.unwrap();
    let answer = next_from(&tap, n1_addr).await;
    assert_eq!(answer[0], FORMAT_VERSION);
    assert_ne!(
        answer[INSTANCE_AND_COUNTER], captured[INSTANCE_AND_COUNTER],
        "n1 answers as itself"
    );
    // Second copy: dropped and counted.
    tap.send_to(&captured, n1_addr).await.unwrap();
    eventually(WAIT, "n1 to count the replay", || async {
        (dropped(n1, "replayed").await >= 1.0).then_some(())
    })
    .await
    .unwrap();
    // After more of n2's datagrams reached n1 (directly, and one more through the tap), the
    // captured one is still refused.
    let later = next_from(&tap, n2_addr).await;
    tap.send_to(&later, n1_addr).await.unwrap();
    next_from(&tap, n1_addr).await;
    tap.send_to(&captured, n1_addr).await.unwrap();
    eventually(WAIT, "n1 to count the second replay", || async {
        (dropped(n1, "replayed").await >= 2.0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(dropped(n1, "replayed").await, 2.0);
    assert_eq!(dropped(n2, "replayed").await, 0.0);
    cluster.converge().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_datagrams_are_refused_unless_configured() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    cluster.add("strict", vec![]).await.unwrap();
    cluster.add("upgrading", vec![]).await.unwrap();
    cluster.converge().await.unwrap();
    // Restart "upgrading" with the rolling-upgrade aid on.
    let upgrading = cluster.node("upgrading");
    tokio::task::block_in_place(|| upgrading.stop(Duration::from_secs(30))).unwrap();
    let config = upgrading.dir.join("meshd.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replacen("[gossip]\n", "[gossip]\nlegacy_peers = true\n", 1);
    std::fs::write(&config, text).unwrap();
    upgrading.run().unwrap();
    upgrading.wait_ready().await.unwrap();
    let dump = upgrading.config_dump().await.unwrap();
    assert_eq!(dump["config"]["gossip"]["legacy_peers"], true, "{dump}");
    cluster.converge().await.unwrap();

    // A version-1 datagram naming a key nobody holds.
    let mut legacy = vec![LEGACY_VERSION, 0xde, 0xad, 0xbe, 0xef];
    legacy.extend(rand::random::<[u8; 12]>());
    legacy.extend([7u8; 64]);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for node in &cluster.nodes {
        sock.send_to(&legacy, node.spec.gossip_addr())
            .await
            .unwrap();
    }
    let (strict, upgrading) = (&cluster.nodes[0], &cluster.nodes[1]);
    // Refused unread by default; read (and refused for its key) with the setting.
    eventually(WAIT, "the legacy datagram to be counted", || async {
        let refused = dropped(strict, "legacy").await == 1.0;
        let read = dropped(upgrading, "unknown_key").await == 1.0;
        (refused && read).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(dropped(strict, "unknown_key").await, 0.0);
    assert_eq!(dropped(upgrading, "legacy").await, 0.0);
}
