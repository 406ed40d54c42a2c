//! Tests of the gossip view: node and service values, remote services.

use super::*;
use mesh_api::gossip::RemoteService;
use mesh_api::name::Label;

fn node(name: &str, kvs: &[(&str, &str)]) -> (ChitchatId, Arc<NodeState>) {
    let id = ChitchatId::new(name.to_owned(), 1, "127.0.0.1:7946".parse().unwrap());
    let mut st = NodeState::for_test();
    for (k, v) in kvs {
        st.set(*k, *v);
    }
    (id, Arc::new(st))
}

#[test]
fn view_from_gossip() {
    let info = |port: u16, state: gossip::NodeState| {
        gossip::encode(&NodeInfo {
            v: gossip::VERSION,
            inbound: SocketAddr::from(([127, 0, 0, 1], port)),
            datacenter: Label::new("dc1").unwrap(),
            zone: Label::new("a").unwrap(),
            site: None,
            state,
        })
    };
    let svc = gossip::encode(&ServiceInfo {
        v: gossip::VERSION,
        protocol: "tcp".into(),
        labels: BTreeMap::new(),
        healthy: true,
    });
    let n1_info = info(1, gossip::NodeState::Serving);
    let n2_info = info(2, gossip::NodeState::Draining);
    let newer = svc.replace("\"v\":1", "\"v\":9");
    let nodes: BTreeMap<_, _> = [
        node(
            "n1",
            &[
                ("node", &n1_info),
                ("svc/default/api", &svc),
                ("svc/default/web", &newer),
            ],
        ),
        node("n2", &[("node", &n2_info), ("svc/default/api", &svc)]),
        // No readable node info: its services cannot be reached, so they are not endpoints.
        node("n3", &[("node", "garbage"), ("svc/default/api", &svc)]),
    ]
    .into_iter()
    .collect();
    let view = build_view(&nodes, &DenyList::default(), None);
    assert_eq!(view.members.len(), 3);
    let api = &view.endpoints[&ServiceKey::parse("api").unwrap()];
    assert_eq!(api.len(), 2);
    assert_eq!(api[0].node, "n1");
    assert!(api[0].is_usable());
    assert_eq!(api[1].node, "n2");
    assert!(!api[1].is_usable(), "a draining node takes no new work");
    assert!(
        !view
            .endpoints
            .contains_key(&ServiceKey::parse("web").unwrap()),
        "unknown schema skipped"
    );
}

#[test]
fn remote_services_become_gateway_endpoints() {
    let info = |port: u16| {
        gossip::encode(&NodeInfo {
            v: gossip::VERSION,
            inbound: SocketAddr::from(([127, 0, 0, 1], port)),
            datacenter: Label::new("dc1").unwrap(),
            zone: Label::new("a").unwrap(),
            site: Some(Label::new("west").unwrap()),
            state: gossip::NodeState::Serving,
        })
    };
    let gw1: SocketAddr = "10.2.0.1:15443".parse().unwrap();
    let gw2: SocketAddr = "10.2.0.2:15443".parse().unwrap();
    let remote = |healthy: u32, gateways: Vec<SocketAddr>| {
        gossip::encode(&RemoteService {
            v: gossip::VERSION,
            protocol: "http".into(),
            subsets: vec![
                gossip::Subset {
                    labels: BTreeMap::new(),
                    healthy,
                    total: 2,
                },
                gossip::Subset {
                    labels: [("version".to_owned(), "v2".to_owned())].into(),
                    healthy: 0,
                    total: 1,
                },
            ],
            gateways,
        })
    };
    // Two gateways of this site publish the same service of site east; one is behind.
    let (a, b) = (info(1), info(2));
    let (fresh, stale) = (remote(2, vec![gw1, gw2]), remote(0, vec![gw1]));
    let nodes: BTreeMap<_, _> = [
        node("gw-a", &[("node", &a), ("remote/east/bank/users", &fresh)]),
        node("gw-b", &[("node", &b), ("remote/east/bank/users", &stale)]),
        // Unreadable entries are skipped, and need readable node info like services.
        node("gw-c", &[("node", &b), ("remote/east/bank", &fresh)]),
        node("gw-d", &[("node", &b), ("remote/east/bank/ledger", "{")]),
        node(
            "gw-e",
            &[("node", "garbage"), ("remote/east/bank/audit", &fresh)],
        ),
    ]
    .into_iter()
    .collect();
    let view = build_view(&nodes, &DenyList::default(), None);
    let users = &view.endpoints[&ServiceKey::parse("bank/users").unwrap()];
    assert_eq!(users.len(), 4, "{users:#?}");
    for ep in users {
        assert_eq!(ep.site, "east");
        assert_eq!(ep.sni.as_deref(), Some("users.bank.east.svc.mesh"));
        assert_eq!(ep.protocol, Protocol::Http);
        assert_eq!(ep.node, format!("east@{}", ep.addr));
        assert_eq!(ep.healthy, ep.labels.is_empty(), "{ep:?}");
    }
    assert_eq!(
        users.iter().map(|e| e.addr).collect::<Vec<_>>(),
        [gw1, gw1, gw2, gw2]
    );
    assert_eq!(view.endpoints.len(), 1, "{:?}", view.endpoints.keys());
}

#[test]
fn sites_are_ranked_by_the_median_distance_the_gateways_report() {
    let reports = |v: &[(&str, &[u32])]| -> BTreeMap<String, Vec<u32>> {
        v.iter()
            .map(|(s, r)| ((*s).to_owned(), r.to_vec()))
            .collect()
    };
    let names = |sites: &[RemoteSite]| sites.iter().map(|s| s.site.clone()).collect::<Vec<_>>();
    for (name, present, reported, want) in [
        (
            "nobody measured: by name",
            vec!["b", "a"],
            reports(&[]),
            vec!["a", "b"],
        ),
        (
            "nearest first",
            vec!["far", "near"],
            reports(&[("far", &[9_000]), ("near", &[800])]),
            vec!["near", "far"],
        ),
        (
            "measured before unmeasured",
            vec!["a", "z"],
            reports(&[("z", &[50_000])]),
            vec!["z", "a"],
        ),
        (
            // One gateway's outlier does not move a site: the lower median of 3.
            "median of the gateways",
            vec!["x", "y"],
            reports(&[("x", &[100, 9_000, 120]), ("y", &[500, 400, 600])]),
            vec!["x", "y"],
        ),
        (
            "distances of sites without instances are ignored",
            vec!["a"],
            reports(&[("gone", &[1])]),
            vec!["a"],
        ),
    ] {
        let got = rank_sites(present.iter().copied(), &reported);
        assert_eq!(names(&got), want, "{name}");
    }
    let got = rank_sites(["x"], &reports(&[("x", &[300, 100])]));
    assert_eq!(got[0].rtt_us, Some(100), "lower median of two");
}

#[test]
fn remote_endpoints_carry_their_sites_rank() {
    let info = gossip::encode(&NodeInfo {
        v: gossip::VERSION,
        inbound: SocketAddr::from(([127, 0, 0, 1], 1)),
        datacenter: Label::new("dc1").unwrap(),
        zone: Label::new("a").unwrap(),
        site: Some(Label::new("west").unwrap()),
        state: gossip::NodeState::Serving,
    });
    let remote = |gw: &str| {
        gossip::encode(&RemoteService {
            v: gossip::VERSION,
            protocol: "http".into(),
            subsets: vec![gossip::Subset {
                labels: BTreeMap::new(),
                healthy: 1,
                total: 1,
            }],
            gateways: vec![gw.parse().unwrap()],
        })
    };
    let rtt = |us: u32| {
        gossip::encode(&gossip::SiteDistance {
            v: gossip::VERSION,
            rtt_us: us,
        })
    };
    let (east, north) = (remote("10.2.0.1:15443"), remote("10.3.0.1:15443"));
    let (near, far) = (rtt(900), rtt(40_000));
    let nodes: BTreeMap<_, _> = [
        node(
            "gw-a",
            &[
                ("node", &info),
                ("remote/east/bank/users", &east),
                ("remote/north/bank/users", &north),
                ("rtt/east", &far),
                ("rtt/north", &near),
                ("rtt/Bad", &near),
                ("rtt/south", "{"),
            ],
        ),
        // A node without readable info is not trusted with distances either.
        node("gw-x", &[("node", "garbage"), ("rtt/east", &rtt(1))]),
    ]
    .into_iter()
    .collect();
    let view = build_view(&nodes, &DenyList::default(), None);
    let ranked: Vec<_> = (view.sites.iter())
        .map(|s| (s.site.as_str(), s.rtt_us))
        .collect();
    assert_eq!(ranked, [("north", Some(900)), ("east", Some(40_000))]);
    let users = &view.endpoints[&ServiceKey::parse("bank/users").unwrap()];
    for ep in users {
        let want = if ep.site == "north" { 0 } else { 1 };
        assert_eq!(ep.site_rank, want, "{ep:?}");
    }
}

#[test]
fn a_node_that_left_is_gone_from_the_view_at_once() {
    let info = |state| {
        gossip::encode(&NodeInfo {
            v: gossip::VERSION,
            inbound: SocketAddr::from(([127, 0, 0, 1], 1)),
            datacenter: Label::new("dc1").unwrap(),
            zone: Label::new("a").unwrap(),
            site: None,
            state,
        })
    };
    let svc = gossip::encode(&ServiceInfo {
        v: gossip::VERSION,
        protocol: "http".into(),
        labels: BTreeMap::new(),
        healthy: true,
    });
    let (draining, left) = (
        info(gossip::NodeState::Draining),
        info(gossip::NodeState::Left),
    );
    let nodes: BTreeMap<_, _> = [
        node("a", &[("node", &draining), ("svc/default/api", &svc)]),
        node("b", &[("node", &left), ("svc/default/api", &svc)]),
    ]
    .into_iter()
    .collect();
    let view = build_view(&nodes, &DenyList::default(), None);
    let members: Vec<&str> = view.members.iter().map(|m| m.node.as_str()).collect();
    assert_eq!(members, ["a"], "a draining node stays until it leaves");
    let api = &view.endpoints[&ServiceKey::parse("api").unwrap()];
    assert_eq!(api.len(), 1);
    assert_eq!(api[0].node, "a");
    // The state's spelling: what meshd before it cannot read (and so also leaves out).
    assert!(left.contains("\"left\""), "{left}");
}
