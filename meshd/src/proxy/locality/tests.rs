//! The failover rules: a table of tier counts and the shares they give, the properties every
//! share vector has, and the tier draw.

use proptest::prelude::*;

use super::*;

fn loc(threshold: u8) -> Locality {
    Locality {
        enabled: true,
        failover: true,
        failover_threshold: threshold,
        sites: Vec::new(),
    }
}

/// (healthy, total) per tier; a tier is available when it has a healthy endpoint.
fn counts(tiers: [(u32, u32); TIERS]) -> Vec<Count> {
    tiers
        .map(|(healthy, total)| Count {
            healthy,
            total,
            available: healthy > 0,
        })
        .to_vec()
}

/// (name, (healthy, total) per tier, threshold, shares wanted).
type Case = (&'static str, [(u32, u32); TIERS], u8, [u32; TIERS]);

#[test]
fn shares_table() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("all healthy: the zone takes all", [(3, 3), (2, 2), (4, 4), (2, 2)], 50, [WHOLE, 0, 0, 0]),
        ("half of the zone healthy: still all (at the threshold)", [(2, 4), (2, 2), (0, 0), (0, 0)], 50, [WHOLE, 0, 0, 0]),
        ("a quarter healthy: half stays, half spills to the dc", [(1, 4), (2, 2), (0, 0), (0, 0)], 50, [5_000, 5_000, 0, 0]),
        ("zone gone: the datacenter", [(0, 3), (2, 2), (0, 0), (2, 2)], 50, [0, WHOLE, 0, 0]),
        ("the whole site gone: the other site", [(0, 2), (0, 1), (0, 0), (2, 2)], 50, [0, 0, 0, WHOLE]),
        ("site scaled to 0 (no endpoints left): the other site", [(0, 0), (0, 0), (0, 0), (1, 1)], 50, [0, 0, 0, WHOLE]),
        ("one of three at threshold 70: 47.6% stays", [(1, 3), (0, 0), (0, 0), (3, 3)], 70, [4_761, 0, 0, 5_239]),
        ("threshold 0: all or nothing", [(1, 10), (5, 5), (0, 0), (0, 0)], 0, [WHOLE, 0, 0, 0]),
        ("threshold 100: any loss spills", [(9, 10), (5, 5), (0, 0), (0, 0)], 100, [9_000, 1_000, 0, 0]),
        // Every tier below the threshold: what is left goes back in proportion.
        ("all degraded", [(1, 4), (0, 0), (0, 0), (1, 4)], 50, [6_667, 0, 0, 3_333]),
        ("nothing available", [(0, 2), (0, 0), (0, 0), (0, 1)], 50, [0, 0, 0, 0]),
    ];
    for (name, tiers, threshold, want) in cases {
        assert_eq!(
            shares(&counts(*tiers), &loc(*threshold)),
            want.to_vec(),
            "{name}"
        );
    }
}

#[test]
fn locality_off_and_failover_off() {
    let c = counts([(0, 2), (2, 2), (0, 0), (1, 1)]);
    let off = Locality {
        enabled: false,
        ..loc(50)
    };
    // Off: one group of every candidate, whichever tier they are in.
    assert_eq!(shares(&c, &off), [WHOLE, 0, 0, 0]);
    let pinned = Locality {
        failover: false,
        ..loc(50)
    };
    assert_eq!(shares(&c, &pinned), [0, 0, 0, 0], "the zone or nothing");
    let healthy_zone = counts([(1, 2), (2, 2), (0, 0), (0, 0)]);
    assert_eq!(shares(&healthy_zone, &pinned), [WHOLE, 0, 0, 0]);
}

#[test]
fn pick_draws_only_when_traffic_is_split() {
    let never = &mut |_: usize| unreachable!("one tier takes everything");
    assert_eq!(pick(&[0, WHOLE, 0, 0], never), Some(1));
    assert_eq!(pick(&[0, 0, 0, 0], never), None);
    let split = [5_000, 0, 0, 5_000];
    assert_eq!(pick(&split, &mut |_| 0), Some(0));
    assert_eq!(pick(&split, &mut |_| 4_999), Some(0));
    assert_eq!(pick(&split, &mut |_| 5_000), Some(3));
    assert_eq!(pick(&split, &mut |_| 9_999), Some(3));
    assert_eq!(
        pick(&split, &mut |n| n + 7),
        Some(0),
        "out-of-range answers are wrapped"
    );
}

proptest! {
    /// Shares sum to WHOLE exactly when some tier is available (else to 0); an unavailable
    /// tier takes nothing; a tier at or above the threshold takes all that reaches it, so no
    /// farther tier takes anything; and the caller's zone never takes less than it would alone.
    #[test]
    fn shares_are_a_split_of_the_whole(
        tiers in proptest::array::uniform4((0u32..6, 0u32..6, any::<bool>())),
        threshold in 0u8..=100,
    ) {
        let c: Vec<Count> = tiers.map(|(h, extra, reachable)| Count {
            healthy: h,
            total: h + extra,
            available: h > 0 && reachable,
        }).to_vec();
        let s = shares(&c, &loc(threshold));
        let any = c.iter().any(|c| c.available);
        prop_assert_eq!(s.iter().sum::<u32>(), if any { WHOLE } else { 0 });
        for t in 0..TIERS {
            if !c[t].available {
                prop_assert_eq!(s[t], 0);
            }
            let full = threshold == 0 || u64::from(c[t].healthy) * 100 >= u64::from(c[t].total) * u64::from(threshold);
            if c[t].available && full {
                prop_assert!(s[t + 1..].iter().all(|&x| x == 0), "{c:?} {s:?}");
            }
        }
    }
}
