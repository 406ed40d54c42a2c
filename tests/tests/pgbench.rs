//! A database behind the mesh: two PostgreSQL servers, each behind its own meshd as the TCP
//! service `db`, called through a third host's upstream port by `pgbench` (read-only, a new
//! connection per transaction). The load runs clean; then one db host's meshd is killed with
//! `kill -9` and, while gossip still lists it, a second load runs: every connection that picks
//! the dead host is stepped over to the live one, and pgbench sees no error.
//!
//! Connections open through a host at the moment it dies are lost — bytes cannot be replayed
//! into a database session — so the kill falls between the two loads, not inside one.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use mesh_e2e::postgres::{self, Postgres};
use mesh_e2e::{Cluster, NodeSpec, RegistryOpts, ServiceSpec, next_ip};

/// pgbench clients (each a connection per transaction).
const CLIENTS: u32 = 4;
/// Seconds per load.
const SECS: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_the_mesh_survives_a_killed_db_host() {
    if !mesh_e2e::can_run(
        "postgres",
        postgres::available(),
        "PostgreSQL and pgbench are not installed (scripts/setup installs them)",
    ) {
        return;
    }
    let mut cluster = Cluster::new(RegistryOpts::default()).await.unwrap();
    let mut dbs = Vec::new();
    for name in ["b1", "b2"] {
        let ip = next_ip();
        let addr = SocketAddr::new(ip.into(), 25432);
        let log = cluster.registry.dir.join(format!("{name}-postgres.log"));
        let db = Postgres::start(name, addr, &log).await.unwrap();
        tokio::task::block_in_place(|| db.init_pgbench()).unwrap();
        let token = cluster.registry.token(&["db"], 1).unwrap();
        let mut spec = NodeSpec::new(name, token);
        spec.ip = ip.into();
        spec.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
        spec.services = vec![ServiceSpec::new("db", addr)];
        cluster.add_spec(spec).await.unwrap();
        dbs.push(db);
    }
    let ip = next_ip();
    let upstream = SocketAddr::new(ip.into(), 15432);
    let token = cluster.registry.token(&["web"], 1).unwrap();
    let mut a = NodeSpec::new("a", token);
    a.ip = ip.into();
    a.seeds = cluster.nodes.iter().map(|n| n.spec.gossip_addr()).collect();
    a.services =
        vec![ServiceSpec::new("web", SocketAddr::new(ip.into(), 18080)).upstream("db", upstream)];
    cluster.add_spec(a).await.unwrap();
    cluster.converge().await.unwrap();
    cluster
        .node("a")
        .wait_endpoints("default/db", 2)
        .await
        .unwrap();
    let pgbench = dbs[0].pgbench();

    let load = |what: &str| {
        let b = tokio::task::block_in_place(|| {
            postgres::select_load(&pgbench, upstream, CLIENTS, SECS)
        })
        .unwrap();
        eprintln!(
            "{what}: {} transactions, {} failed, {} clients aborted",
            b.processed, b.failed, b.aborted
        );
        b
    };
    let first = load("both db hosts up");
    assert!(
        first.ok && first.failed == 0 && first.processed > 100,
        "{}",
        first.output
    );

    let before = cluster_node_metric(&cluster, "meshd_unreachable_endpoints_total").await;
    cluster.node("b1").kill9();
    let second = load("b1 killed, gossip not yet aware");
    let found_dead =
        cluster_node_metric(&cluster, "meshd_unreachable_endpoints_total").await - before;
    assert!(
        second.ok && second.failed == 0 && second.aborted == 0 && second.processed > 100,
        "a killed db host cost pgbench errors:\n{}",
        second.output
    );
    // The load really met the dead host: connections picked it and were stepped over.
    assert!(found_dead >= 1.0, "no connection ever found b1 dead");
}

async fn cluster_node_metric(cluster: &Cluster, name: &str) -> f64 {
    let a = cluster.nodes.last().unwrap();
    a.metric_or_zero(name, &[("service", "default/db")])
        .await
        .unwrap()
}
