use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::name::Label;
use mesh_api::policy::{Locality, OutlierDetection};
use proptest::prelude::*;

use super::*;
use crate::config::Protocol;
use crate::proxy::balance::EndpointState;

/// An endpoint on port `port` in `dc`/`zone`.
fn target(port: u16, dc: &str, zone: &str) -> Target {
    Target {
        endpoint: Endpoint {
            node: format!("n{port}"),
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            datacenter: dc.to_owned(),
            zone: zone.to_owned(),
            labels: BTreeMap::from([("version".to_owned(), format!("v{}", port % 2))]),
            protocol: Protocol::Tcp,
            healthy: true,
            draining: false,
            site: String::new(),
            sni: None,
            site_rank: 0,
        },
        state: Arc::new(EndpointState::default()),
    }
}

fn policy(lb: LoadBalancer, enabled: bool, failover: bool) -> DestinationPolicy {
    DestinationPolicy {
        service: Label::new("db").unwrap(),
        subsets: Vec::new(),
        load_balancer: lb,
        locality: Locality {
            enabled,
            failover,
            failover_threshold: mesh_api::policy::DEFAULT_FAILOVER_THRESHOLD,
            sites: Vec::new(),
        },
        circuit_breaker: None,
        outlier_detection: None,
    }
}

fn ask<'a>(policy: Option<&'a DestinationPolicy>) -> Ask<'a> {
    Ask {
        subset: None,
        policy,
        default_lb: DEFAULT_HTTP_LOAD_BALANCER,
        datacenter: "dc1",
        zone: "a",
    }
}

/// Ports of the order, for readable assertions.
fn ports(targets: &[Target], order: &[usize]) -> Vec<u16> {
    order
        .iter()
        .map(|&i| targets[i].endpoint.addr.port())
        .collect()
}

/// Ejects `t` by outlier detection until `now + 30 s`.
fn eject(t: &Target, now: Instant) {
    let cfg = OutlierDetection {
        consecutive_5xx: 1,
        consecutive_gateway_errors: 0,
        interval: Duration::from_secs(10),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_percent: 100,
    };
    let mut o = t.state.outlier.lock().unwrap();
    assert!(
        o.record(balance::Outcome::ConnectFailure, &cfg, now, true)
            .is_some()
    );
}

#[test]
fn round_robin_in_the_zone_then_fallbacks() {
    let now = Instant::now();
    let targets = [
        target(1, "dc1", "a"),
        target(2, "dc1", "b"),
        target(3, "dc1", "a"),
        target(4, "dc2", "a"),
        target(5, "dc1", "a"),
    ];
    let rr = policy(LoadBalancer::RoundRobin, true, true);
    let never = &mut |_: usize| unreachable!("round robin draws nothing");
    #[rustfmt::skip]
    let cases: &[(usize, &[u16])] = &[
        (0, &[1, 3, 5]),
        (1, &[3, 1, 5]),
        (2, &[5, 3, 1]),
        (3, &[1, 3, 5]),
    ];
    for (cursor, want) in cases {
        let got = order(&targets, &ask(Some(&rr)), now, *cursor, never);
        assert_eq!(ports(&targets, &got), *want, "cursor {cursor}");
    }
}

#[test]
fn locality_failover_and_its_absence() {
    let now = Instant::now();
    let targets = [
        target(1, "dc2", "a"), // same zone name, other datacenter
        target(2, "dc1", "b"),
        target(3, "dc1", "a"),
    ];
    let rr = |enabled, failover| policy(LoadBalancer::RoundRobin, enabled, failover);
    let never = &mut |_: usize| unreachable!();
    #[rustfmt::skip]
    let cases: &[(&str, DestinationPolicy, &[u16])] = &[
        ("zone, then datacenter, then the rest", rr(true, true), &[3, 2, 1]),
        ("no failover: the zone only", rr(true, false), &[3]),
        ("locality off: every endpoint", rr(false, true), &[1, 2, 3]),
    ];
    for (name, p, want) in cases {
        let got = order(&targets, &ask(Some(p)), now, 0, never);
        assert_eq!(ports(&targets, &got), *want, "{name}");
    }
    // The zone's only endpoint is ejected: with failover the datacenter takes over, without
    // it nothing may be used.
    eject(&targets[2], now);
    let got = order(&targets, &ask(Some(&rr(true, true))), now, 0, never);
    assert_eq!(ports(&targets, &got), [2, 1]);
    let got = order(&targets, &ask(Some(&rr(true, false))), now, 0, never);
    assert!(got.is_empty());
}

#[test]
fn no_policy_means_ewma_and_default_locality() {
    let now = Instant::now();
    let targets = [
        target(1, "dc1", "b"),
        target(2, "dc1", "a"),
        target(3, "dc1", "a"),
    ];
    // A loaded endpoint loses the power-of-two-choices draw to an idle one.
    let _busy = targets[1].state.stats.start();
    let mut draws = [0usize, 0].into_iter(); // a = group[0] (port 2), b = group[1] (port 3)
    let got = order(&targets, &ask(None), now, 0, &mut |_| draws.next().unwrap());
    assert_eq!(ports(&targets, &got), [3, 2, 1]);
}

#[test]
fn unusable_unsubsetted_and_ejected_endpoints_are_left_out() {
    let now = Instant::now();
    let mut targets = vec![
        target(1, "dc1", "a"),
        target(2, "dc1", "a"),
        target(3, "dc1", "a"),
        target(4, "dc1", "a"),
        target(5, "dc1", "a"),
    ];
    targets[0].endpoint.healthy = false;
    targets[1].endpoint.draining = true;
    eject(&targets[2], now);
    let rr = policy(LoadBalancer::RoundRobin, true, true);
    let never = &mut |_: usize| unreachable!();
    let got = order(&targets, &ask(Some(&rr)), now, 0, never);
    assert_eq!(ports(&targets, &got), [4, 5]);
    // Subset version=v1: odd ports.
    let v1 = BTreeMap::from([("version".to_owned(), "v1".to_owned())]);
    let subset = Ask {
        subset: Some(&v1),
        ..ask(Some(&rr))
    };
    assert_eq!(
        ports(&targets, &order(&targets, &subset, now, 0, never)),
        [5]
    );
    // An ejection ends.
    let later = now + Duration::from_secs(31);
    let got = order(&targets, &ask(Some(&rr)), later, 0, never);
    assert_eq!(ports(&targets, &got), [3, 4, 5]);
}

#[test]
fn an_endpoint_whose_connect_failed_is_skipped_until_only_it_remains() {
    let now = Instant::now();
    let targets = [target(1, "dc1", "a"), target(2, "dc1", "a")];
    let rr = policy(LoadBalancer::RoundRobin, true, true);
    let never = &mut |_: usize| unreachable!();
    assert_eq!(
        targets[0].state.reachability.failed(now),
        Some(Duration::from_secs(1))
    );
    for cursor in 0..4 {
        let got = order(&targets, &ask(Some(&rr)), now, cursor, never);
        assert_eq!(ports(&targets, &got), [2], "cursor {cursor}");
    }
    // Both failing: both are tried (gossip still lists them).
    targets[1].state.reachability.failed(now);
    let got = order(&targets, &ask(Some(&rr)), now, 0, never);
    assert_eq!(ports(&targets, &got), [1, 2]);
    // A connect that succeeds clears the mark at once; the other's mark runs out.
    targets[1].state.reachability.connected();
    let got = order(&targets, &ask(Some(&rr)), now, 0, never);
    assert_eq!(ports(&targets, &got), [2]);
    let got = order(
        &targets,
        &ask(Some(&rr)),
        now + Duration::from_secs(1),
        0,
        never,
    );
    assert_eq!(ports(&targets, &got), [1, 2]);
}

#[test]
fn a_zone_whose_endpoints_are_unreachable_fails_over_at_once() {
    let now = Instant::now();
    let targets = [target(1, "dc1", "a"), target(2, "dc1", "b")];
    targets[0].state.reachability.failed(now);
    let got = order(&targets, &ask(None), now, 0, &mut |_| 0);
    assert_eq!(ports(&targets, &got), [2]);
}

#[test]
fn a_degraded_zone_spills_part_of_its_traffic() {
    let now = Instant::now();
    // The zone has 1 healthy endpoint of 4 (25%, below the 50% default): it keeps half of the
    // new connections, the datacenter gets the other half.
    let targets = [
        target(1, "dc1", "a"),
        target(2, "dc1", "a"),
        target(3, "dc1", "a"),
        target(4, "dc1", "a"),
        target(5, "dc1", "b"),
    ];
    for t in &targets[1..4] {
        eject(t, now);
    }
    let rr = policy(LoadBalancer::RoundRobin, true, true);
    let mut seed = 7u64;
    let mut rand = |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        usize::try_from((seed >> 33) % n as u64).unwrap()
    };
    let mut firsts = [0usize; 6];
    for cursor in 0..2000 {
        let got = order(&targets, &ask(Some(&rr)), now, cursor, &mut rand);
        firsts[usize::from(targets[got[0]].endpoint.addr.port())] += 1;
        assert_eq!(got.len(), 2, "the other as fallback");
    }
    assert!(
        (850..1150).contains(&firsts[1]) && firsts[1] + firsts[5] == 2000,
        "{firsts:?}"
    );
    // Threshold 25: the zone is not degraded, it keeps everything.
    let mut strict = rr.clone();
    strict.locality.failover_threshold = 25;
    let got = order(&targets, &ask(Some(&strict)), now, 0, &mut rand);
    assert_eq!(ports(&targets, &got), [1, 5]);
}

/// An endpoint of another site, reached through its gateway on port `port`.
fn remote(port: u16) -> Target {
    let mut t = target(port, "", "");
    t.endpoint.site = "east".to_owned();
    t.endpoint.sni = Some("db.default.east.svc.mesh".to_owned());
    t
}

#[test]
fn other_sites_only_after_this_site() {
    let now = Instant::now();
    let targets = [
        remote(1),
        target(2, "dc2", "b"),
        remote(3),
        target(4, "dc1", "a"),
    ];
    let rr = |enabled, failover| policy(LoadBalancer::RoundRobin, enabled, failover);
    let never = &mut |_: usize| unreachable!();
    // The zone first, then the rest of the site, then the other site's gateways.
    let got = order(&targets, &ask(Some(&rr(true, true))), now, 0, never);
    assert_eq!(ports(&targets, &got), [4, 2, 1]);
    // This site scaled to 0 (unhealthy or draining): the other site takes every request.
    let mut gone = [
        remote(1),
        target(2, "dc2", "b"),
        remote(3),
        target(4, "dc1", "a"),
    ];
    gone[1].endpoint.healthy = false;
    gone[3].endpoint.draining = true;
    for cursor in 0..4 {
        let got = order(&gone, &ask(Some(&rr(true, true))), now, cursor, never);
        let first = gone[got[0]].endpoint.addr.port();
        assert!(first == 1 || first == 3, "cursor {cursor}: {got:?}");
        assert_eq!(got.len(), 2);
    }
    // Without failover the zone is all there is, and with locality off every site is equal.
    let got = order(&gone, &ask(Some(&rr(true, false))), now, 0, never);
    assert!(got.is_empty());
    let got = order(&targets, &ask(Some(&rr(false, true))), now, 0, never);
    assert_eq!(ports(&targets, &got), [1, 2, 3]);
}

#[test]
fn named_sites_in_their_order_then_the_others() {
    let now = Instant::now();
    let in_site = |port: u16, site: &str| {
        let mut t = remote(port);
        t.endpoint.site = site.to_owned();
        t
    };
    let targets = [in_site(1, "east"), in_site(2, "west"), in_site(3, "north")];
    let never = &mut |_: usize| unreachable!();
    let mut p = policy(LoadBalancer::RoundRobin, true, true);
    // No site named: every other site alike, in turn.
    let got = order(&targets, &ask(Some(&p)), now, 1, never);
    assert_eq!(ports(&targets, &got), [2, 1, 3]);
    // west, then north, then the rest.
    p.locality.sites = vec![Label::new("west").unwrap(), Label::new("north").unwrap()];
    for cursor in 0..3 {
        let got = order(&targets, &ask(Some(&p)), now, cursor, never);
        assert_eq!(ports(&targets, &got), [2, 3, 1], "cursor {cursor}");
    }
    // west gone: north takes it all.
    let mut down = [in_site(1, "east"), in_site(2, "west"), in_site(3, "north")];
    down[1].endpoint.healthy = false;
    let got = order(&down, &ask(Some(&p)), now, 0, never);
    assert_eq!(ports(&down, &got), [3, 1]);
}

#[test]
fn unnamed_sites_nearest_first() {
    let now = Instant::now();
    // As build_view ranks them: west 0 (nearest), east 1, north 2.
    let in_site = |port: u16, site: &str, rank: u16| {
        let mut t = remote(port);
        t.endpoint.site = site.to_owned();
        t.endpoint.site_rank = rank;
        t
    };
    let targets = || {
        [
            in_site(1, "east", 1),
            in_site(2, "west", 0),
            in_site(3, "north", 2),
            in_site(4, "west", 0),
        ]
    };
    let never = &mut |_: usize| unreachable!();
    let mut p = policy(LoadBalancer::RoundRobin, true, true);
    let all = targets();
    for cursor in 0..4 {
        let got = order(&all, &ask(Some(&p)), now, cursor, never);
        let first = all[got[0]].endpoint.site.as_str();
        assert_eq!(
            first, "west",
            "cursor {cursor}: the nearest site takes it all"
        );
        // Then by distance, up to MAX_CONNECT_ATTEMPTS.
        assert_eq!(ports(&all, &got[2..]), [1]);
    }
    // The nearest gone: the next nearest, not any other.
    let mut down = targets();
    down[1].endpoint.healthy = false;
    down[3].endpoint.draining = true;
    let got = order(&down, &ask(Some(&p)), now, 0, never);
    assert_eq!(ports(&down, &got), [1, 3]);
    // A named site goes before the nearest; the unnamed ones keep their distance order.
    p.locality.sites = vec![Label::new("north").unwrap()];
    let got = order(&all, &ask(Some(&p)), now, 0, never);
    assert_eq!(ports(&all, &got), [3, 2, 4]);
}

/// Up to 8 targets across two datacenters and two zones of this site and another site, each possibly unhealthy, draining,
/// ejected or unreachable.
fn arb_targets() -> impl Strategy<Value = Vec<Target>> {
    proptest::collection::vec(
        (
            0u8..3,
            0u8..2,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
        0..8,
    )
    .prop_map(|specs| {
        let now = Instant::now();
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (dc, zone, healthy, draining, ejected, unreachable))| {
                let port = u16::try_from(i).unwrap() + 1;
                let mut t = match dc {
                    2 => remote(port),
                    _ => target(port, ["dc1", "dc2"][dc as usize], ["a", "b"][zone as usize]),
                };
                t.endpoint.healthy = healthy;
                t.endpoint.draining = draining;
                if ejected {
                    eject(&t, now);
                }
                if unreachable {
                    t.state.reachability.failed(now);
                }
                t
            })
            .collect()
    })
}

fn arb_lb() -> impl Strategy<Value = LoadBalancer> {
    prop_oneof![
        Just(LoadBalancer::RoundRobin),
        Just(LoadBalancer::Random),
        Just(LoadBalancer::LeastRequest),
        Just(LoadBalancer::Ewma),
    ]
}

proptest! {
    /// Whatever the state: distinct indices, at most MAX_CONNECT_ATTEMPTS, each usable and
    /// not ejected; reachable ones whenever any exists; nothing only when nothing is eligible
    /// (or, without failover, nothing eligible is in the caller's zone).
    #[test]
    fn order_only_names_eligible_endpoints(
        targets in arb_targets(),
        lb in arb_lb(),
        enabled in any::<bool>(),
        failover in any::<bool>(),
        cursor in any::<usize>(),
        seed in any::<u64>(),
    ) {
        let now = Instant::now();
        // Threshold 0 (all or nothing) for the tier property below; the threshold's spill is
        // `a_degraded_zone_spills_part_of_its_traffic`'s and `locality::tests`'.
        let mut p = policy(lb, enabled, failover);
        p.locality.failover_threshold = 0;
        let mut state = seed | 1;
        let mut rand = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % n as u64).unwrap()
        };
        let got = order(&targets, &ask(Some(&p)), now, cursor, &mut rand);
        prop_assert!(got.len() <= MAX_CONNECT_ATTEMPTS);
        let mut seen = got.clone();
        seen.sort_unstable();
        seen.dedup();
        prop_assert_eq!(seen.len(), got.len(), "an endpoint twice");
        let eligible = |t: &Target| t.endpoint.is_usable() && !t.state.is_ejected(now);
        let reachable = |t: &Target| !t.state.reachability.is_unreachable(now);
        for &i in &got {
            prop_assert!(eligible(&targets[i]));
        }
        if targets.iter().any(|t| eligible(t) && reachable(t)) {
            for &i in &got {
                prop_assert!(reachable(&targets[i]), "an unreachable endpoint while others are not");
            }
        }
        let local = |t: &Target| t.endpoint.datacenter == "dc1" && t.endpoint.zone == "a";
        // Another site is picked first only when this site has nothing eligible and reachable
        // (or, when all are unreachable, nothing eligible).
        let this_site = |t: &Target| t.endpoint.sni.is_none();
        if enabled && let Some(&first) = got.first() && !this_site(&targets[first]) {
            let pool: Vec<&Target> = if targets.iter().any(|t| eligible(t) && reachable(t)) {
                targets.iter().filter(|t| eligible(t) && reachable(t)).collect()
            } else {
                targets.iter().filter(|t| eligible(t)).collect()
            };
            prop_assert!(!pool.iter().any(|t| this_site(t)), "another site before this one");
        }
        if enabled && !failover {
            for &i in &got {
                prop_assert!(local(&targets[i]), "left the zone without failover");
            }
        } else {
            prop_assert_eq!(got.is_empty(), !targets.iter().any(eligible));
        }
    }
}

#[test]
fn without_a_policy_the_callers_default_balancer_picks() {
    let now = Instant::now();
    let targets = [target(1, "dc1", "a"), target(2, "dc1", "a")];
    let rr = Ask {
        default_lb: LoadBalancer::RoundRobin,
        ..ask(None)
    };
    let never = &mut |_: usize| unreachable!("round robin draws nothing");
    assert_eq!(
        ports(&targets, &order(&targets, &rr, now, 1, never)),
        [2, 1]
    );
    // A policy's balancer wins over the default.
    let random = policy(LoadBalancer::Random, true, true);
    let with_policy = Ask {
        policy: Some(&random),
        ..rr
    };
    let got = order(&targets, &with_policy, now, 1, &mut |_| 0);
    assert_eq!(ports(&targets, &got), [1, 2]);
}
