//! The east-west gateway's decisions: which server names pass, and which instances are tried.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use mesh_api::policy::{Snapshot, parse_file};
use proptest::prelude::*;
use tokio::time::Instant;

use super::*;
use crate::config::Protocol;
use crate::membership::Endpoint;

fn exports(text: &str) -> Exports {
    Exports::new(&Snapshot::new(1, parse_file("e.toml", text).unwrap()))
}

const BANK_USERS: &str = r#"
[[resource]]
kind = "ServiceExport"
name = "out"
namespace = "bank"
services = ["users"]
"#;

#[test]
fn only_exported_services_of_this_site_pass() {
    let site = Label::new("east").unwrap();
    let e = exports(BANK_USERS);
    let users = ServiceKey::parse("bank/users").unwrap();
    #[rustfmt::skip]
    let cases: &[(Option<&str>, Result<ServiceKey, &str>)] = &[
        (Some("users.bank.east.svc.mesh"), Ok(users.clone())),
        (None, Err("east_west_no_sni")),
        (Some("users.bank.svc.mesh"), Err("east_west_not_site_name")),
        (Some("example.com"), Err("east_west_not_site_name")),
        (Some("users.bank.west.svc.mesh"), Err("east_west_other_site")),
        (Some("ledger.bank.east.svc.mesh"), Err("east_west_not_exported")),
        (Some("users.shop.east.svc.mesh"), Err("east_west_not_exported")),
        (Some("users.bank.east.egress.mesh"), Err("east_west_not_site_name")),
    ];
    for (sni, want) in cases {
        let got = admit(*sni, &site, &e).map_err(|r| r.reason());
        assert_eq!(got, want.clone(), "{sni:?}");
    }
    // Nothing is exported without a ServiceExport.
    let none = admit(Some("users.bank.east.svc.mesh"), &site, &Exports::default());
    assert_eq!(none, Err(Refusal::NotExported(users)));
}

fn target(port: u16, dc: &str, zone: &str) -> Target {
    Target {
        endpoint: Endpoint {
            node: format!("n{port}"),
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            datacenter: dc.to_owned(),
            zone: zone.to_owned(),
            site: "east".to_owned(),
            sni: None,
            site_rank: 0,
            labels: BTreeMap::new(),
            protocol: Protocol::Tcp,
            healthy: true,
            draining: false,
        },
        state: Default::default(),
    }
}

fn remote(port: u16) -> Target {
    let mut t = target(port, "", "");
    t.endpoint.sni = Some("users.bank.west.svc.mesh".to_owned());
    t
}

fn ports(targets: &[Target], order: &[usize]) -> Vec<u16> {
    order
        .iter()
        .map(|&i| targets[i].endpoint.addr.port())
        .collect()
}

#[test]
fn instances_nearest_first_in_turn_never_another_site() {
    let now = Instant::now();
    let targets = [
        remote(1),
        target(2, "dc2", "a"),
        target(3, "dc1", "a"),
        target(4, "dc1", "b"),
        target(5, "dc1", "a"),
    ];
    let got = |cursor| ports(&targets, &candidates(&targets, "dc1", "a", now, cursor));
    assert_eq!(got(0), [3, 5, 4]);
    assert_eq!(got(1), [5, 3, 4]);
    assert_eq!(got(2), [3, 5, 4]);
    // The zone's instances unreachable: the others first, the unreachable never while others are.
    targets[2].state.reachability.failed(now);
    targets[4].state.reachability.failed(now);
    assert_eq!(got(0), [4, 2]);
    // Only the other site's gateway: nothing (no chains of gateways).
    let only_remote = [remote(1)];
    assert!(candidates(&only_remote, "dc1", "a", now, 0).is_empty());
}

proptest! {
    /// Whatever the state: at most MAX_CONNECT_ATTEMPTS distinct indices, each a usable
    /// instance of this site; empty only when this site has no usable instance.
    #[test]
    fn candidates_are_usable_local_instances(
        specs in proptest::collection::vec((0u8..3, 0u8..2, any::<bool>(), any::<bool>(), any::<bool>()), 0..8),
        cursor in any::<usize>(),
    ) {
        let now = Instant::now();
        let targets: Vec<Target> = specs.iter().enumerate().map(|(i, &(dc, zone, healthy, draining, unreachable))| {
            let port = u16::try_from(i).unwrap() + 1;
            let mut t = match dc {
                2 => remote(port),
                _ => target(port, ["dc1", "dc2"][dc as usize], ["a", "b"][zone as usize]),
            };
            t.endpoint.healthy = healthy;
            t.endpoint.draining = draining;
            if unreachable {
                t.state.reachability.failed(now);
            }
            t
        }).collect();
        let got = candidates(&targets, "dc1", "a", now, cursor);
        prop_assert!(got.len() <= MAX_CONNECT_ATTEMPTS);
        let mut seen = got.clone();
        seen.sort_unstable();
        seen.dedup();
        prop_assert_eq!(seen.len(), got.len());
        let ok = |t: &Target| t.endpoint.sni.is_none() && t.endpoint.is_usable();
        for &i in &got {
            prop_assert!(ok(&targets[i]));
        }
        prop_assert_eq!(got.is_empty(), !targets.iter().any(ok));
    }
}
