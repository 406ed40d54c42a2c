//! CA rotation on real processes under steady traffic: `mesh-registry ca rotate-intermediate`,
//! then a whole root rotation (`ca rotate-root prepare`, `activate`, `finish`), picked up by
//! the running registry and pushed to every node without a restart — and not one failed
//! round trip throughout. Certificates are short-lived here, so every leaf is reissued under
//! each new CA while the test watches.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mesh_api::policy::TrustBundle;
use mesh_e2e::Within as _;
use mesh_e2e::apps::Echo;
use mesh_e2e::{Cluster, Load, Node, NodeSpec, Registry, RegistryOpts, ServiceSpec, eventually};

/// Long enough for every short-lived leaf to be reissued (they renew at half-life).
const REISSUE: Duration = Duration::from_secs(60);

/// The PEM certificate blocks of a file, trimmed (empty when it does not exist).
fn certs(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    TrustBundle::from_pem(&text)
        .roots
        .into_iter()
        .map(|c| c.trim().to_owned())
        .collect()
}

fn ca_file(reg: &Registry, name: &str) -> String {
    certs(&reg.data_dir.join("ca").join(name)).remove(0)
}

/// The intermediates in a node's stored node and workload chains.
fn node_intermediates(node: &Node) -> Vec<String> {
    let id = node.dir.join("data/identity");
    let mut files = vec![id.join("node.pem")];
    for e in std::fs::read_dir(id.join("workloads")).unwrap() {
        files.push(e.unwrap().path());
    }
    files.iter().map(|f| certs(f)[1].clone()).collect()
}

fn registry_ca(reg: &Registry, args: &[&str]) -> String {
    let out = Command::new(&reg.bins.registry)
        .arg("ca")
        .args(args)
        .arg("--config")
        .arg(reg.data_dir.join("registry.toml"))
        .within(mesh_e2e::CLI_TIMEOUT)
        .unwrap();
    assert!(
        out.status.success(),
        "mesh-registry ca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until every leaf of every node was issued by the registry's current intermediate.
async fn all_reissued(cluster: &Cluster, what: &str) {
    let want = ca_file(&cluster.registry, "intermediate.pem");
    eventually(REISSUE, what, || async {
        cluster
            .nodes
            .iter()
            .all(|n| node_intermediates(n).iter().all(|i| *i == want))
            .then_some(())
    })
    .await
    .unwrap();
}

/// Waits until every node stores a trust bundle of exactly `roots`.
async fn bundles_are(cluster: &Cluster, roots: &[String], what: &str) {
    eventually(Duration::from_secs(10), what, || async {
        cluster
            .nodes
            .iter()
            .all(|n| {
                let mut have = certs(&n.dir.join("data/identity/bundle.pem"));
                let mut want = roots.to_vec();
                have.sort();
                want.sort();
                have == want
            })
            .then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_and_root_rotations_under_traffic_fail_no_request() {
    let opts = RegistryOpts {
        workload_cert_ttl: Duration::from_secs(16),
        node_cert_ttl: Duration::from_secs(20),
        ..RegistryOpts::default()
    };
    let mut cluster = Cluster::new(opts).await.unwrap();
    let b_ip = mesh_e2e::next_ip();
    let api = Echo::start(SocketAddr::new(b_ip.into(), 0)).await.unwrap();
    let mut spec_b = NodeSpec::new("b", cluster.registry.token(&["api"], 1).unwrap());
    spec_b.ip = b_ip.into();
    spec_b.services = vec![ServiceSpec::new("api", api.addr)];
    cluster.add_spec(spec_b).await.unwrap();
    let a_ip = mesh_e2e::next_ip();
    let up = SocketAddr::new(a_ip.into(), 19301);
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
    // A new connection (a new mTLS handshake a → b) per round trip, for the whole test.
    let load = Load::start(up, 2, 2048, Duration::from_secs(5));
    load.progress(20, REISSUE).await.unwrap();
    let old_root = ca_file(&cluster.registry, "root.pem");

    // Intermediate: one step; every leaf is reissued under it, the root stays.
    let out = registry_ca(&cluster.registry, &["rotate-intermediate"]);
    assert!(out.contains("new intermediate written"), "{out}");
    all_reissued(&cluster, "every leaf under the new intermediate").await;
    load.progress(20, REISSUE).await.unwrap();

    // Root, step 1: both roots trusted everywhere before anything is signed under the new one.
    registry_ca(&cluster.registry, &["rotate-root", "prepare"]);
    let next_root = certs(&cluster.registry.data_dir.join("ca/next/root.pem")).remove(0);
    let both = [old_root.clone(), next_root.clone()];
    bundles_are(&cluster, &both, "every node trusting both roots").await;
    load.progress(20, REISSUE).await.unwrap();

    // Step 2: signing under the new root; old and new leaves meet while they are reissued.
    registry_ca(&cluster.registry, &["rotate-root", "activate"]);
    assert_eq!(ca_file(&cluster.registry, "root.pem"), next_root);
    all_reissued(&cluster, "every leaf under the new root").await;
    load.progress(20, REISSUE).await.unwrap();
    // Operators get credentials under the new root before the old one goes.
    let creds = cluster.registry.dir.join("new-admin");
    cluster
        .registry
        .meshctl_ok(&[
            "credentials",
            "create",
            "--role",
            "admin",
            "ops",
            "--out",
            creds.to_str().unwrap(),
        ])
        .unwrap();

    // Step 3: only the new root. (--force: the test does not wait a node certificate lifetime;
    // every leaf was reissued above.)
    registry_ca(&cluster.registry, &["rotate-root", "finish", "--force"]);
    bundles_are(
        &cluster,
        std::slice::from_ref(&next_root),
        "every node trusting only the new root",
    )
    .await;
    load.progress(20, REISSUE).await.unwrap();
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "round trips failed: {:?}", report.errors);
    assert!(report.ok > 100, "{report:?}");
    eprintln!("{} round trips across both rotations, 0 failed", report.ok);

    // The new credentials reach the registry; the init ones chain to the retired root.
    let with = |dir: &Path| {
        Command::new(&cluster.registry.bins.meshctl)
            .arg("--credentials")
            .arg(dir)
            .arg("--registry")
            .arg(cluster.registry.addr.to_string())
            .arg("nodes")
            .within(mesh_e2e::CLI_TIMEOUT)
            .unwrap()
    };
    let new = with(&creds);
    assert!(
        new.status.success(),
        "{}",
        String::from_utf8_lossy(&new.stderr)
    );
    assert!(!with(&cluster.registry.creds).status.success());
    // Nodes kept renewing against the registry throughout (node certificates under the new root).
    for node in &cluster.nodes {
        let node_chain = certs(&node.dir.join("data/identity/node.pem"));
        assert_eq!(
            node_chain[1],
            ca_file(&cluster.registry, "intermediate.pem")
        );
    }
}
