use std::collections::BTreeMap;
use std::net::SocketAddr;

use mesh_api::policy::parse_file;

use super::*;
use crate::config::Protocol;

fn key(name: &str) -> ServiceKey {
    ServiceKey::new(
        mesh_api::name::Label::new("default").unwrap(),
        mesh_api::name::Label::new(name).unwrap(),
    )
}

fn ep(port: u16) -> Endpoint {
    Endpoint {
        node: format!("n{port}"),
        addr: SocketAddr::from(([10, 0, 0, 1], port)),
        datacenter: "dc1".to_owned(),
        zone: "a".to_owned(),
        labels: BTreeMap::new(),
        protocol: Protocol::Tcp,
        healthy: true,
        draining: false,
        site: String::new(),
        sni: None,
        site_rank: 0,
    }
}

fn view(services: &[(&str, &[u16])]) -> Arc<MeshView> {
    Arc::new(MeshView {
        members: Vec::new(),
        sites: Vec::new(),
        endpoints: (services.iter())
            .map(|(name, ports)| (key(name), ports.iter().map(|p| ep(*p)).collect()))
            .collect(),
    })
}

fn policy(revision: u64, text: &str) -> Arc<Snapshot> {
    let resources = if text.is_empty() {
        Vec::new()
    } else {
        parse_file("t.toml", text).unwrap()
    };
    Arc::new(Snapshot::new(revision, resources))
}

const DB_POLICY: &str = r#"
[[resource]]
kind = "DestinationPolicy"
name = "db"
service = "db"
load_balancer = "round_robin"
"#;

fn config() -> Config {
    Config::for_test(std::path::Path::new("/nonexistent"))
}

#[test]
fn endpoint_state_survives_a_view_change_by_address() {
    let cfg = config();
    let p = policy(1, DB_POLICY);
    let c1 = Compiled::new(None, p.clone(), view(&[("db", &[1, 2])]), &cfg);
    let db1 = c1.destination(&key("db"));
    let _busy = db1.targets[1].state.stats.start();
    let _slot = db1.breaker.admit(None).unwrap();
    // Endpoint 1 leaves, 3 joins; 2 keeps its state (one request in flight).
    let c2 = Compiled::new(Some(&c1), p, view(&[("db", &[2, 3])]), &cfg);
    let db2 = c2.destination(&key("db"));
    let ports: Vec<u16> = db2.targets.iter().map(|t| t.endpoint.addr.port()).collect();
    assert_eq!(ports, [2, 3]);
    assert!(Arc::ptr_eq(&db2.targets[0].state, &db1.targets[1].state));
    assert_eq!(db2.targets[0].state.stats.in_flight(), 1);
    assert_eq!(db2.targets[1].state.stats.in_flight(), 0);
    assert_eq!(db2.breaker.in_flight(), 1, "the breaker count carries over");
    assert!(Arc::ptr_eq(&db2.budget, &db1.budget));
    assert!(
        Arc::ptr_eq(&c2.routes, &c1.routes),
        "same policy: not recompiled"
    );
}

#[test]
fn a_policy_change_recompiles_routes_and_keeps_targets() {
    let cfg = config();
    let v = view(&[("db", &[1])]);
    let c1 = Compiled::new(None, policy(1, ""), v.clone(), &cfg);
    assert!(c1.destination(&key("db")).policy.is_none());
    let c2 = Compiled::new(Some(&c1), policy(2, DB_POLICY), v, &cfg);
    let db = c2.destination(&key("db"));
    let lb = db.policy.as_ref().map(|p| p.load_balancer);
    assert_eq!(lb, Some(mesh_api::policy::LoadBalancer::RoundRobin));
    assert!(Arc::ptr_eq(
        &db.targets,
        &c1.destination(&key("db")).targets
    ));
}

#[test]
fn an_unknown_destination_is_empty_but_keeps_its_policy() {
    let c = Compiled::new(None, policy(1, DB_POLICY), view(&[]), &config());
    let db = c.destination(&key("db"));
    assert!(db.targets.is_empty());
    assert!(db.policy.is_some());
    assert!(c.destination(&key("other")).policy.is_none());
}

#[test]
fn many_endpoints_carry_over_through_the_index() {
    let cfg = config();
    let p = policy(1, "");
    let ports: Vec<u16> = (1..=40).collect();
    let c1 = Compiled::new(None, p.clone(), view(&[("db", &ports)]), &cfg);
    let fewer: Vec<u16> = (5..=44).collect();
    let c2 = Compiled::new(Some(&c1), p, view(&[("db", &fewer)]), &cfg);
    let (old, new) = (c1.destination(&key("db")), c2.destination(&key("db")));
    for t in new.targets.iter() {
        let port = t.endpoint.addr.port();
        let before = old.targets.iter().find(|o| o.endpoint.addr.port() == port);
        match before {
            Some(o) => assert!(
                Arc::ptr_eq(&o.state, &t.state),
                "port {port} lost its state"
            ),
            None => assert!(port > 40),
        }
    }
}

#[tokio::test]
async fn the_task_recompiles_on_every_input_and_mirrors_the_view() {
    let (config_tx, config_rx) = watch::channel(Arc::new(config()));
    let (policy_tx, policy_rx) = watch::channel(policy(1, ""));
    let (view_tx, view_rx) = watch::channel(view(&[("db", &[1])]));
    let (_stop_tx, stop_rx) = watch::channel(false);
    let (mut compiled_rx, mut mirror_rx) = spawn(config_rx, policy_rx, view_rx, stop_rx);
    assert_eq!(
        compiled_rx
            .borrow_and_update()
            .destination(&key("db"))
            .targets
            .len(),
        1
    );
    view_tx.send_replace(view(&[("db", &[1, 2])]));
    compiled_rx.changed().await.unwrap();
    mirror_rx.changed().await.unwrap();
    assert_eq!(
        compiled_rx
            .borrow_and_update()
            .destination(&key("db"))
            .targets
            .len(),
        2
    );
    assert_eq!(mirror_rx.borrow_and_update().endpoints[&key("db")].len(), 2);
    // A gone input keeps its last value; the others are still followed.
    drop(config_tx);
    policy_tx.send_replace(policy(2, DB_POLICY));
    compiled_rx.changed().await.unwrap();
    assert_eq!(compiled_rx.borrow().policy.revision, 2);
    assert!(
        compiled_rx
            .borrow()
            .destination(&key("db"))
            .policy
            .is_some()
    );
}

const EXTERNALS: &str = r#"
[[resource]]
kind = "ExternalService"
name = "pay"
hosts = ["api.pay.example"]
port = 443
protocol = "http"
endpoints = [{ address = "203.0.113.7:443" }]

[[resource]]
kind = "ExternalService"
name = "ledger"
hosts = ["ledger.example"]
port = 5432
protocol = "tcp"
egress_gateway = "egress"

[[resource]]
kind = "ExternalService"
name = "pay"
namespace = "other"
hosts = ["api.pay.example"]
port = 443
protocol = "http"
"#;

#[test]
fn external_services_are_reached_directly_or_through_their_gateway() {
    let mut cfg = config();
    let p = policy(1, EXTERNALS);
    let v = view(&[("egress", &[7, 8])]);
    let c = Compiled::new(None, p.clone(), v.clone(), &cfg);
    // No gateway: this host's own client, no mesh endpoints.
    let pay = c.destination(&key("pay"));
    assert!(pay.direct.is_some() && pay.targets.is_empty());
    assert_eq!(pay.sni, key("pay").sni());
    // Behind a gateway this host does not run: the gateway's hosts, named by the egress SNI.
    let ledger = c.destination(&key("ledger"));
    assert!(ledger.direct.is_none() && c.external_client(&key("ledger")).is_none());
    assert_eq!(ledger.sni, "ledger.egress.default.egress.mesh");
    let ports: Vec<u16> = (ledger.targets.iter())
        .map(|t| t.endpoint.addr.port())
        .collect();
    assert_eq!(ports, [7, 8]);
    assert_eq!(
        ledger.external.as_ref().map(|e| e.protocol),
        Some(mesh_api::policy::ExternalProtocol::Tcp)
    );
    // The host running the gateway reaches it itself.
    cfg.gateway.names = vec![key("egress")];
    let g = Compiled::new(Some(&c), p.clone(), v.clone(), &cfg);
    let ledger = g.destination(&key("ledger"));
    assert!(ledger.direct.is_some() && ledger.targets.is_empty());
    // Same policy and settings: the clients (and their pools) are kept.
    let again = Compiled::new(Some(&g), p, v, &cfg);
    assert!(Arc::ptr_eq(
        again.external_client(&key("pay")).unwrap(),
        g.external_client(&key("pay")).unwrap()
    ));
    // Host names: the caller's namespace first.
    let host = |ns: &str| {
        c.external_for_host("api.pay.example", ns)
            .map(ToString::to_string)
    };
    assert_eq!(host("other").as_deref(), Some("other/pay"));
    assert_eq!(host("default").as_deref(), Some("default/pay"));
    assert_eq!(host("third").as_deref(), Some("default/pay"));
    assert_eq!(c.external_for_host("unknown.example", "default"), None);
    assert!(c.external(&key("db")).is_none());
}
