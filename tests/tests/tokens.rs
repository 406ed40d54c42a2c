//! Join tokens on real processes: a second host joining under a registered node's name with an
//! ordinary token is refused (meshd stops with a clear error, the original node keeps serving
//! and its record is unchanged) and joins with a `--replace` token; `meshctl token list` shows
//! every token without its secret, to operators and viewers; a revoked token joins no host.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use mesh_api::token::JoinToken;
use mesh_e2e::Within as _;
use mesh_e2e::apps::{self, Echo};
use mesh_e2e::{Cluster, Node, NodeSpec, Registry, RegistryOpts, ServiceSpec, WAIT, eventually};

const REGISTRY_CALLS: &str = "mesh_registry_calls_total";

/// meshctl with the read-only viewer credentials (`<registry data>/viewer`).
fn viewer(reg: &Registry, args: &[&str]) -> Output {
    Command::new(&reg.bins.meshctl)
        .arg("--credentials")
        .arg(reg.data_dir.join("viewer"))
        .arg("--registry")
        .arg(reg.addr.to_string())
        .args(args)
        .within(mesh_e2e::CLI_TIMEOUT)
        .unwrap()
}

/// `meshctl token create` with extra arguments; returns the token string.
fn token(reg: &Registry, services: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", "--services", services];
    args.extend_from_slice(extra);
    reg.meshctl_ok(&args).unwrap().trim().to_owned()
}

fn id_of(token: &str) -> String {
    JoinToken::decode(token).unwrap().id
}

/// The `meshctl token list` row of token `id`, split at the column gaps.
fn token_row(list: &str, id: &str) -> Vec<String> {
    let line = list
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("token {id} is not listed:\n{list}"));
    line.split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The `meshctl nodes` row of node `name`, whitespace-split.
fn node_row(reg: &Registry, name: &str) -> Vec<String> {
    let out = reg.meshctl_ok(&["nodes"]).unwrap();
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("node {name} is not listed:\n{out}"));
    line.split_whitespace().map(str::to_owned).collect()
}

/// Starts a host that must fail to join; waits for meshd to exit and returns its code and log.
async fn refused_join(reg: &Registry, spec: NodeSpec) -> (Option<i32>, String) {
    let mut node = Node::start(reg, spec).unwrap();
    let code = node.exit_code().await.unwrap();
    (code, node.log())
}

/// `n` checksummed round trips through `addr`; every one must succeed.
async fn round_trips(addr: SocketAddr, n: u64, seed: u64) {
    for i in 0..n {
        let data = apps::payload(4096 + i as usize, seed + i);
        let got = tokio::time::timeout(Duration::from_secs(10), apps::round_trip(addr, &data))
            .await
            .unwrap_or_else(|_| panic!("round trip {i} timed out"))
            .unwrap_or_else(|e| panic!("round trip {i}: {e}"));
        assert_eq!(apps::sha256(&got), apps::sha256(&data), "round trip {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_name_is_taken_over_only_with_a_replace_token() {
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    // b serves api (an echo app in this process); web on a calls it through `upstream`.
    let b_ip = mesh_e2e::next_ip();
    let echo = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let b_token = token(&cluster.registry, "api", &[]);
    let mut spec_b = NodeSpec::new("b", b_token.clone());
    spec_b.ip = b_ip.into();
    spec_b.zone = Some("zone-b".to_owned());
    spec_b.services = vec![ServiceSpec::new("api", echo.addr)];
    cluster.add_spec(spec_b).await.unwrap();
    let a_ip = mesh_e2e::next_ip();
    let upstream = SocketAddr::new(a_ip.into(), 19001);
    let mut spec_a = NodeSpec::new("a", token(&cluster.registry, "web", &[]));
    spec_a.ip = a_ip.into();
    spec_a.seeds = vec![cluster.nodes[0].spec.gossip_addr()];
    spec_a.services = vec![
        ServiceSpec::new("web", SocketAddr::new(a_ip.into(), 18080)).upstream("api", upstream),
    ];
    cluster.add_spec(spec_a).await.unwrap();
    cluster.converge().await.unwrap();
    let a = cluster.node("a");
    a.wait_endpoints("default/api", 1).await.unwrap();
    round_trips(upstream, 3, 1).await;
    let reg = &cluster.registry;
    let b_record = node_row(reg, "b");
    let certs_before = reg.cert_records().unwrap();

    // Another host claims the name b with an ordinary token that has uses left.
    let ordinary = token(reg, "api", &["--uses", "3"]);
    let mut impostor = NodeSpec::new("b", ordinary.clone());
    impostor.dir_name = Some("b-impostor".to_owned());
    impostor.zone = Some("zone-x".to_owned());
    impostor.services = vec![ServiceSpec::new("api", SocketAddr::new(impostor.ip, 18081))];
    let (code, log) = refused_join(reg, impostor).await;
    assert_eq!(code, Some(1), "exit {code:?}\n{log}");
    assert!(
        log.contains("node b is already registered")
            && log.contains("meshctl token create --replace b"),
        "the impostor's log says why and how to replace:\n{log}"
    );
    assert_eq!(
        reg.metric(
            REGISTRY_CALLS,
            &[("rpc", "join"), ("outcome", "node_exists")]
        )
        .await
        .unwrap(),
        1.0
    );
    // The original keeps its record (zone, certificates) and keeps serving.
    assert_eq!(node_row(reg, "b")[..3], b_record[..3]);
    assert_eq!(b_record[2], "zone-b");
    assert_eq!(reg.cert_records().unwrap(), certs_before);
    assert!(cluster.node("b").is_running());
    round_trips(upstream, 3, 2).await;
    let list = cluster.registry.meshctl_ok(&["token", "list"]).unwrap();
    assert_eq!(token_row(&list, &id_of(&ordinary))[4], "0/3", "{list}");

    // The host is reinstalled: the old b is gone, the new one joins with a replace token.
    cluster.node("b").stop(WAIT).unwrap();
    let replace = token(&cluster.registry, "api", &["--replace", "b"]);
    let b2_ip = mesh_e2e::next_ip();
    let echo2 = Echo::start(SocketAddr::new(b2_ip.into(), 0)).await.unwrap();
    let mut spec_b2 = NodeSpec::new("b", replace.clone());
    spec_b2.dir_name = Some("b-reinstalled".to_owned());
    spec_b2.ip = b2_ip.into();
    spec_b2.zone = Some("zone-x".to_owned());
    spec_b2.seeds = vec![cluster.node("a").spec.gossip_addr()];
    spec_b2.services = vec![ServiceSpec::new("api", echo2.addr)];
    cluster.add_spec(spec_b2).await.unwrap();
    let reg = &cluster.registry;
    assert_eq!(node_row(reg, "b")[2], "zone-x", "the record was replaced");
    // web reaches api on the new host.
    eventually(WAIT, "api reachable on the reinstalled b", || async {
        let data = apps::payload(1024, 9);
        let got = tokio::time::timeout(Duration::from_secs(2), apps::round_trip(upstream, &data))
            .await
            .ok()?
            .ok()?;
        (got == data).then_some(())
    })
    .await
    .unwrap();
    round_trips(upstream, 3, 3).await;

    // Every token is listed, to operators and viewers, with its uses and replacement, never
    // its secret.
    let list = reg.meshctl_ok(&["token", "list"]).unwrap();
    let viewed = viewer(reg, &["token", "list"]);
    assert!(
        viewed.status.success(),
        "viewer list: {}",
        String::from_utf8_lossy(&viewed.stderr)
    );
    let ids = |text: &str| -> Vec<String> {
        (text.lines().skip(1))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    };
    assert_eq!(ids(&String::from_utf8_lossy(&viewed.stdout)), ids(&list));
    assert!(list.starts_with("ID "), "{list}");
    assert_eq!(ids(&list).len(), 4, "{list}");
    let row = token_row(&list, &id_of(&b_token));
    assert_eq!((row[4].as_str(), row[5].as_str()), ("1/1", "-"), "{list}");
    assert_eq!(row.last().unwrap(), "used up", "{list}");
    let row = token_row(&list, &id_of(&replace));
    assert_eq!((row[4].as_str(), row[5].as_str()), ("1/1", "b"), "{list}");
    for t in [&b_token, &ordinary, &replace] {
        let secret = JoinToken::decode(t).unwrap().secret;
        assert!(!list.contains(&secret), "a secret is listed:\n{list}");
    }
    drop((echo, echo2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_joins_no_host() {
    let cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let reg = &cluster.registry;
    let t = token(reg, "api", &["--uses", "0"]);
    let id = id_of(&t);

    let o = viewer(reg, &["token", "revoke", &id]);
    assert!(!o.status.success(), "the viewer cannot revoke");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("read-only"), "{err}");
    let o = reg
        .meshctl(&["token", "revoke", "00000000deadbeef"])
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not found"), "{err}");

    let out = reg.meshctl_ok(&["token", "revoke", &id]).unwrap();
    assert!(out.contains(&format!("token {id} revoked")), "{out}");
    let out = reg.meshctl_ok(&["token", "revoke", &t]).unwrap();
    assert!(out.contains("already revoked"), "{out}");
    let list = reg.meshctl_ok(&["token", "list"]).unwrap();
    let row = token_row(&list, &id);
    assert_eq!(row[4], "0/unlimited", "{list}");
    assert_eq!(row.last().unwrap(), "revoked", "{list}");

    let mut spec = NodeSpec::new("c", t);
    spec.services = vec![ServiceSpec::new("api", SocketAddr::new(spec.ip, 18080))];
    let (code, log) = refused_join(reg, spec).await;
    assert_eq!(code, Some(1), "exit {code:?}\n{log}");
    assert!(
        log.contains("revoked"),
        "the log says the token was revoked:\n{log}"
    );
    assert_eq!(
        reg.metric(
            REGISTRY_CALLS,
            &[("rpc", "join"), ("outcome", "token_revoked")]
        )
        .await
        .unwrap(),
        1.0
    );
    assert!(reg.node_names().unwrap().is_empty());
}
