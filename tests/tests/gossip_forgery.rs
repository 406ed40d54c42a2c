//! Gossip no insider can poison, on real processes: this test holds the mesh's real gossip key
//! (read from a node's data dir, as a stolen host would) and runs its own chitchat nodes with
//! meshd's sealed transport. It rewrites node b's state under b's exact id (draining, inbound
//! pointed elsewhere, a service b does not run), invents a node serving api, and bloats a third
//! node's state with thousands of keys. The forged states reach node a (they are in its gossip
//! table, and it counts them refused), yet a's view — members, endpoints, their addresses and
//! draining flags — does not change, traffic a → b keeps flowing, and gossip keeps working: a
//! node joining afterwards, and its service, reach a's view within seconds. Invented node ids
//! by the thousand cannot grow anyone's gossip table past one datagram's digest: b's later
//! changes still reach a.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{ChitchatHandle, ChitchatId};
use mesh_api::gossip::{self, NodeInfo, NodeState};
use mesh_e2e::apps::{self, Echo};
use mesh_e2e::{Cluster, Node, NodeSpec, RegistryOpts, ServiceSpec, WAIT, eventually, http_get};
use meshd::gossip_seal::{SealStats, SealedTransport};
use tokio::sync::watch;

/// a's view as compared before and after the forgeries: members with what they publish, and
/// every endpoint with its address, health and draining flag.
async fn view(node: &Node) -> (serde_json::Value, serde_json::Value, Vec<String>) {
    let (code, body) = http_get(&node.admin.to_string(), "/members").await.unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let known = v["liveness"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["node"].as_str().map(str::to_owned))
        .collect();
    (v["members"].clone(), v["endpoints"].clone(), known)
}

/// A chitchat node run by the attacker with the real key, publishing `kvs` as `id`.
async fn forger(
    keys: &[String],
    id: ChitchatId,
    listen: SocketAddr,
    seed: SocketAddr,
    kvs: Vec<(String, String)>,
) -> ChitchatHandle {
    let keyring = meshd::gossip_keys::keyring_from(keys).unwrap();
    let (_tx, rx) = watch::channel(Arc::new(keyring));
    std::mem::forget(_tx);
    let transport = SealedTransport::new(rx, Arc::new(SealStats::default()));
    let config = meshd::membership::chitchat_config(
        id,
        "mesh.test".to_owned(),
        listen,
        vec![seed.to_string()],
        Duration::from_millis(100),
    );
    chitchat::spawn_chitchat(config, kvs, &transport)
        .await
        .unwrap()
}

fn node_info(inbound: SocketAddr, state: NodeState) -> String {
    gossip::encode(&NodeInfo {
        v: gossip::VERSION,
        inbound,
        datacenter: mesh_api::Label::new("dc1").unwrap(),
        zone: mesh_api::Label::new("zone-x").unwrap(),
        site: None,
        state,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gossip_changes_nothing_and_bloat_stops_nobody() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let b_ip = mesh_e2e::next_ip();
    let api = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let mut spec_b = NodeSpec::new("b", cluster.registry.token(&["api"], 1).unwrap());
    spec_b.ip = b_ip.into();
    spec_b.services = vec![ServiceSpec::new("api", api.addr)];
    cluster.add_spec(spec_b).await.unwrap();
    let a_ip = mesh_e2e::next_ip();
    let up = SocketAddr::new(a_ip.into(), 19401);
    let mut spec_a = NodeSpec::new("a", cluster.registry.token(&["web"], 1).unwrap());
    spec_a.ip = a_ip.into();
    spec_a.seeds = vec![cluster.node("b").spec.gossip_addr()];
    spec_a.services =
        vec![ServiceSpec::new("web", SocketAddr::new(a_ip.into(), 18080)).upstream("api", up)];
    cluster.add_spec(spec_a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster
        .node("a")
        .wait_endpoints("default/api", 1)
        .await
        .unwrap();
    // Both nodes past their start (a node joins as `starting`), so the view is settled.
    let before = eventually(WAIT, "a to see both nodes serving", || async {
        let v = view(&cluster.nodes[1]).await;
        let members = v.0.as_array()?;
        (members.len() == 2 && members.iter().all(|m| m["info"]["state"] == "serving")).then_some(v)
    })
    .await
    .unwrap();

    // The attacker's loot: the gossip key from a's disk, b's gossip identity from a's view.
    let persisted: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cluster.nodes[1].dir.join("data/gossip-keys.json")).unwrap(),
    )
    .unwrap();
    let keys: Vec<String> = serde_json::from_value(persisted["keys"].clone()).unwrap();
    let b_member = before
        .0
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["node"] == "b")
        .unwrap()
        .clone();
    let b_id = ChitchatId::new(
        "b".to_owned(),
        b_member["generation"].as_u64().unwrap(),
        b_member["gossip_addr"].as_str().unwrap().parse().unwrap(),
    );
    let seed = cluster.nodes[1].spec.gossip_addr();
    let evil_ip = mesh_e2e::next_ip();
    let evil = SocketAddr::new(evil_ip.into(), 15008);
    let listen = |port| SocketAddr::new(evil_ip.into(), port);

    // 1. b's exact id: many keys first so the forged versions outrank b's own.
    let mut kvs: Vec<(String, String)> = (0..64)
        .map(|i| (format!("pad/{i:02}"), "x".to_owned()))
        .collect();
    kvs.push((
        gossip::KEY_NODE.to_owned(),
        node_info(evil, NodeState::Draining),
    ));
    kvs.push((
        "svc/default/db".to_owned(),
        r#"{"v":1,"protocol":"tcp","labels":{},"healthy":true}"#.to_owned(),
    ));
    let f1 = forger(&keys, b_id, listen(17001), seed, kvs).await;
    // 2. An invented node serving api at the attacker's address.
    let ghost = vec![
        (
            gossip::KEY_NODE.to_owned(),
            node_info(evil, NodeState::Serving),
        ),
        (
            "svc/default/api".to_owned(),
            r#"{"v":1,"protocol":"tcp","labels":{},"healthy":true}"#.to_owned(),
        ),
    ];
    let ghost_id = ChitchatId::new("ghost".to_owned(), 1, listen(17002));
    let f2 = forger(&keys, ghost_id, listen(17002), seed, ghost).await;
    // 3. A node bloating its state: 3,000 keys of 1 KiB.
    let bloat: Vec<(String, String)> = (0..3_000)
        .map(|i| (format!("k/{i:05}"), "y".repeat(1024)))
        .collect();
    let bloat_id = ChitchatId::new("bloat".to_owned(), 1, listen(17003));
    let f3 = forger(&keys, bloat_id, listen(17003), seed, bloat).await;

    // The forgeries reached a: the invented nodes are in its gossip table, and it refused
    // states it was sent.
    let a = &cluster.nodes[1];
    eventually(WAIT, "forged nodes in a's gossip table", || async {
        let (_, _, known) = view(a).await;
        (known.iter().any(|n| n == "ghost") && known.iter().any(|n| n == "bloat")).then_some(())
    })
    .await
    .unwrap();
    eventually(WAIT, "a refusing forged states", || async {
        let n = a
            .metric("meshd_gossip_states_refused_total", &[])
            .await
            .ok()?;
        (n >= 3.0).then_some(())
    })
    .await
    .unwrap();
    // For two seconds (20 gossip rounds) a's view is exactly what it was, and a → b works.
    for i in 0..10 {
        let now = view(a).await;
        assert_eq!(now.0, before.0, "members changed after {i} checks");
        assert_eq!(now.1, before.1, "endpoints changed after {i} checks");
        let data = apps::payload(512, i);
        let got = tokio::time::timeout(Duration::from_secs(2), apps::round_trip(up, &data))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, data);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Gossip still works: a node that joins now, and its service, reach a. (b's own later
    // changes do not: the forged versions outrank them until b restarts with a new
    // generation. Forged state is never used, but it can freeze its victim's; see
    // meshd/src/gossip_auth.rs.)
    let c_ip = mesh_e2e::next_ip();
    let db = Echo::start(SocketAddr::new(c_ip.into(), 0)).await.unwrap();
    let mut spec_c = NodeSpec::new("c", cluster.registry.token(&["db"], 1).unwrap());
    spec_c.ip = c_ip.into();
    spec_c.seeds = vec![seed];
    spec_c.services = vec![ServiceSpec::new("db", db.addr)];
    cluster.add_spec(spec_c).await.unwrap();
    cluster.nodes[1]
        .wait_endpoints("default/db", 1)
        .await
        .unwrap();
    for n in &mut cluster.nodes {
        assert!(n.is_running(), "{} stopped", n.spec.name);
    }
    for f in [f1, f2, f3] {
        let _ = f.shutdown().await;
    }
}

/// An attacker's chitchat node whose table holds `count` invented nodes (ids `prefix-NNNN`),
/// so its digests list them all.
async fn inventor(
    keys: &[String],
    listen: SocketAddr,
    seed: SocketAddr,
    prefix: &str,
    count: usize,
) -> ChitchatHandle {
    let id = ChitchatId::new(format!("{prefix}-self"), 1, listen);
    let handle = forger(keys, id, listen, seed, Vec::new()).await;
    let chitchat = handle.chitchat();
    let mut c = chitchat.lock().await;
    for i in 0..count {
        // Valid node names of ~100 bytes: each costs a digest entry of ~130.
        let fake = ChitchatId::new(
            format!("{prefix}-{i:04}.{}.{}", "a".repeat(50), "b".repeat(35)),
            1,
            listen,
        );
        let kv = chitchat::VersionedValue {
            value: "x".to_owned(),
            version: 1,
            status: chitchat::DeletionStatus::Set,
        };
        c.reset_node_state_if_update(&fake, std::iter::once(("k".to_owned(), kv)), 1, 0);
    }
    drop(c);
    handle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_node_ids_cannot_grow_digests_past_a_datagram() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let b_ip = mesh_e2e::next_ip();
    let api = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let mut spec_b = NodeSpec::new("b", cluster.registry.token(&["api", "db"], 1).unwrap());
    spec_b.ip = b_ip.into();
    spec_b.services = vec![ServiceSpec::new("api", api.addr)];
    cluster.add_spec(spec_b).await.unwrap();
    let a_ip = mesh_e2e::next_ip();
    let mut spec_a = NodeSpec::new("a", cluster.registry.token(&["web"], 1).unwrap());
    spec_a.ip = a_ip.into();
    spec_a.seeds = vec![cluster.node("b").spec.gossip_addr()];
    spec_a.services = vec![ServiceSpec::new("web", SocketAddr::new(a_ip.into(), 18080))];
    cluster.add_spec(spec_a).await.unwrap();
    cluster.converge().await.unwrap();
    let persisted: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cluster.nodes[1].dir.join("data/gossip-keys.json")).unwrap(),
    )
    .unwrap();
    let keys: Vec<String> = serde_json::from_value(persisted["keys"].clone()).unwrap();
    let seed = cluster.nodes[1].spec.gossip_addr();
    let evil_ip = mesh_e2e::next_ip();
    // Four inventors, 1,200 long ids (140 bytes of table each) apiece: together past a's
    // bound on its table's ids (`MAX_DIGEST_LEN`, 512 KiB, ~3,700 of these).
    let mut inventors = Vec::new();
    for (n, prefix) in ["ghost-a", "ghost-b", "ghost-c", "ghost-d"]
        .iter()
        .enumerate()
    {
        let listen = SocketAddr::new(evil_ip.into(), 17101 + n as u16);
        inventors.push(inventor(&keys, listen, seed, prefix, 1_200).await);
    }
    let a = &cluster.nodes[1];
    // Sweeps carry 16 KiB of ids per SYN, so filling a's table takes the inventors a while.
    eventually(
        Duration::from_secs(60),
        "a keeping invented ids out",
        || async {
            let n = a
                .metric("meshd_gossip_nodes_refused_total", &[])
                .await
                .ok()?;
            (n >= 1.0).then_some(())
        },
    )
    .await
    .unwrap();
    let (_, _, known) = view(a).await;
    // 140 bytes per invented id; the few real and inventor ids have short names and count less.
    let bound = meshd::membership::MAX_DIGEST_LEN / 140 + 10;
    assert!(known.len() <= bound, "a's table holds {} ids", known.len());
    assert!(
        known.iter().any(|n| n.starts_with("ghost-")),
        "the inventions reached a"
    );

    // Gossip still carries real changes: a service b adds now reaches a.
    let db = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let b = cluster.node("b");
    b.write_service_file("db.toml", &ServiceSpec::new("db", db.addr).to_toml())
        .unwrap();
    b.sighup().unwrap();
    cluster.nodes[1]
        .wait_endpoints("default/db", 1)
        .await
        .unwrap();
    for n in &mut cluster.nodes {
        assert!(n.is_running(), "{} stopped", n.spec.name);
    }
    for f in inventors {
        let _ = f.shutdown().await;
    }
}
