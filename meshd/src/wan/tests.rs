//! The WAN's pure parts: the key file, this site's summary and the other sites' services.

use mesh_api::policy::{Snapshot, parse_file};

use super::*;
use crate::config::Protocol;
use crate::membership::Endpoint;

fn label(s: &str) -> Label {
    Label::new(s).unwrap()
}

#[test]
fn key_file_lines() {
    let a = GossipKey::generate().to_base64();
    let b = GossipKey::generate().to_base64();
    let ring = keyring_from_text(&format!("# WAN keys\n\n{a}\n  {b}  \n")).unwrap();
    assert_eq!(ring.primary().to_base64(), a);
    #[rustfmt::skip]
    let bad: &[(&str, usize, &str)] = &[
        ("", 0, "no key"),
        ("# only a comment\n", 0, "no key"),
        ("not base64!\n", 1, "base64"),
        ("\nc2hvcnQ=\n", 2, "base64"),
    ];
    for (text, line, want) in bad {
        let (got_line, why) = keyring_from_text(text).map(|_| ()).unwrap_err();
        assert_eq!(got_line, *line, "{text:?}: {why}");
        assert!(why.contains(want), "{text:?}: {why}");
    }
    let e = keyring_from_file(Path::new("/nonexistent/wan.key"))
        .map(|_| ())
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("east_west.wan_key_file /nonexistent/wan.key"),
        "{e}"
    );
}

fn ep(node: &str, labels: &[(&str, &str)], healthy: bool, sni: Option<&str>) -> Endpoint {
    Endpoint {
        node: node.to_owned(),
        addr: "10.1.0.1:15008".parse().unwrap(),
        datacenter: "dc1".to_owned(),
        zone: "a".to_owned(),
        site: "east".to_owned(),
        sni: sni.map(str::to_owned),
        site_rank: 0,
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        protocol: Protocol::Http,
        healthy,
        draining: false,
    }
}

#[test]
fn summary_counts_this_sites_instances_of_exported_services() {
    let text = "[[resource]]\nkind = \"ServiceExport\"\nname = \"x\"\nnamespace = \"bank\"\nservices = [\"users\", \"ledger\"]\n";
    let exports = Exports::new(&Snapshot::new(1, parse_file("e.toml", text).unwrap()));
    let view = MeshView {
        members: Vec::new(),
        sites: Vec::new(),
        endpoints: [
            (
                ServiceKey::parse("bank/users").unwrap(),
                vec![
                    ep("n1", &[], true, None),
                    ep("n2", &[], false, None),
                    ep("n3", &[("version", "v2")], true, None),
                    // Known through another site's gateway: never announced again.
                    ep(
                        "west@10.2.0.1:15443",
                        &[],
                        true,
                        Some("users.bank.west.svc.mesh"),
                    ),
                ],
            ),
            // Exported, but only another site has it.
            (
                ServiceKey::parse("bank/ledger").unwrap(),
                vec![ep(
                    "west@10.2.0.1:15443",
                    &[],
                    true,
                    Some("ledger.bank.west.svc.mesh"),
                )],
            ),
            // Not exported.
            (
                ServiceKey::parse("bank/audit").unwrap(),
                vec![ep("n1", &[], true, None)],
            ),
        ]
        .into(),
    };
    let s = summarize(&view, &exports);
    assert_eq!(s.len(), 1, "{s:?}");
    let users = &s[&ServiceKey::parse("bank/users").unwrap()];
    assert_eq!(users.protocol, "http");
    assert_eq!(
        users.subsets,
        [
            Subset {
                labels: BTreeMap::new(),
                healthy: 1,
                total: 2
            },
            Subset {
                labels: [("version".to_owned(), "v2".to_owned())].into(),
                healthy: 1,
                total: 1
            },
        ]
    );
    assert!(summarize(&view, &Exports::default()).is_empty());
}

fn member(site: &str, gateway: &str, services: &[(&str, u32)]) -> Vec<(String, String)> {
    let mut kvs = vec![(
        gossip::KEY_WAN_NODE.to_owned(),
        gossip::encode(&WanNode {
            v: gossip::VERSION,
            site: label(site),
            gateway: gateway.parse().unwrap(),
        }),
    )];
    for (svc, healthy) in services {
        kvs.push((
            gossip::export_key(&ServiceKey::parse(svc).unwrap()),
            gossip::encode(&ExportedService {
                v: gossip::VERSION,
                protocol: "http".to_owned(),
                subsets: vec![Subset {
                    labels: BTreeMap::new(),
                    healthy: *healthy,
                    total: 2,
                }],
            }),
        ));
    }
    kvs
}

#[test]
fn other_sites_services_with_their_gateways() {
    let east1 = member("east", "10.1.0.1:15443", &[("bank/users", 2)]);
    let east2 = member("east", "10.1.0.2:15443", &[("bank/users", 1)]);
    let west1 = member(
        "west",
        "10.2.0.1:15443",
        &[("bank/users", 2), ("shop/cart", 1)],
    );
    let mut garbage = member("north", "10.3.0.1:15443", &[]);
    garbage.push(("exp/bank/users".to_owned(), "{".to_owned()));
    let no_node = vec![("exp/bank/users".to_owned(), west1[1].1.clone())];
    let members = [
        WanState {
            node: "e1",
            kvs: &east1,
        },
        WanState {
            node: "e2",
            kvs: &east2,
        },
        WanState {
            node: "w1",
            kvs: &west1,
        },
        WanState {
            node: "n1",
            kvs: &garbage,
        },
        WanState {
            node: "x",
            kvs: &no_node,
        },
    ];
    // Seen from west: east's users through both east gateways, with the larger summary.
    let r = remote_services(&members, &label("west"));
    assert_eq!(r.len(), 1, "{r:?}");
    let users = &r[&(label("east"), ServiceKey::parse("bank/users").unwrap())];
    assert_eq!(
        users.gateways,
        [
            "10.1.0.1:15443".parse::<SocketAddr>().unwrap(),
            "10.1.0.2:15443".parse().unwrap()
        ]
    );
    assert_eq!(users.subsets[0].healthy, 2);
    // Seen from east: west's two services, east's own never.
    let r = remote_services(&members, &label("east"));
    let keys: Vec<String> = r.keys().map(|(s, k)| format!("{s}/{k}")).collect();
    assert_eq!(keys, ["west/bank/users", "west/shop/cart"]);
    let lan = remote_keys(&r);
    assert!(lan.contains_key("remote/west/bank/users"), "{lan:?}");
    // The gateways to measure, seen from west: east's two and north's one (a gateway whose
    // site exports nothing is still a gateway); the one without node info is not.
    let g = gateways_by_site(&members, &label("west"));
    let sites: Vec<(String, usize)> = (g.iter()).map(|(s, v)| (s.to_string(), v.len())).collect();
    assert_eq!(sites, [("east".to_owned(), 2), ("north".to_owned(), 1)]);
}

#[test]
fn the_key_file_is_read_again_and_a_bad_one_keeps_the_keyring() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wan.key");
    let (a, b) = (GossipKey::generate(), GossipKey::generate());
    std::fs::write(&path, format!("{}\n", a.to_base64())).unwrap();
    let mut last = std::fs::read_to_string(&path).unwrap();
    let (tx, rx) = watch::channel(Arc::new(keyring_from_file(&path).unwrap()));
    assert_eq!(
        check_key_file(&path, &mut last, &tx),
        KeyFileCheck::Unchanged
    );
    // Rotation, step one: the new key second.
    std::fs::write(&path, format!("{}\n{}\n", a.to_base64(), b.to_base64())).unwrap();
    assert_eq!(check_key_file(&path, &mut last, &tx), KeyFileCheck::Rotated);
    assert_eq!(rx.borrow().primary().to_base64(), a.to_base64());
    // A broken write: refused once, naming the file and line; the keyring stays.
    std::fs::write(&path, "not base64!\n").unwrap();
    let KeyFileCheck::Refused(why) = check_key_file(&path, &mut last, &tx) else {
        panic!("a bad file is refused");
    };
    assert!(why.contains("wan.key") && why.contains("line 1"), "{why}");
    assert_eq!(
        check_key_file(&path, &mut last, &tx),
        KeyFileCheck::Unchanged
    );
    assert_eq!(rx.borrow().primary().to_base64(), a.to_base64());
    // Step two: the new key first.
    std::fs::write(&path, format!("{}\n{}\n", b.to_base64(), a.to_base64())).unwrap();
    assert_eq!(check_key_file(&path, &mut last, &tx), KeyFileCheck::Rotated);
    assert_eq!(rx.borrow().primary().to_base64(), b.to_base64());
    // Gone: said once, the keyring stays.
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        check_key_file(&path, &mut last, &tx),
        KeyFileCheck::Refused(_)
    ));
    assert_eq!(
        check_key_file(&path, &mut last, &tx),
        KeyFileCheck::Unchanged
    );
    assert_eq!(rx.borrow().primary().to_base64(), b.to_base64());
}
