//! Tests of the SWIM state machine: precedence, refutation, Lifeguard timeouts, probe order,
//! piggyback queue, wire format, and property tests of its invariants.
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

fn id(i: u16) -> ChitchatId {
    ChitchatId::new(format!("n{i}"), 1, ([127, 0, 0, 1], 7000 + i).into())
}

fn config() -> SwimConfig {
    SwimConfig {
        suspicion_min: Duration::from_secs(1),
        suspicion_max_mult: 6,
        expected_confirmations: 3,
        retransmit_mult: 4,
    }
}

fn swim() -> Swim {
    Swim::new(id(0), 0, config())
}

fn upd(kind: UpdateKind, node: u16, incarnation: u64, from: u16) -> MemberUpdate {
    MemberUpdate {
        kind,
        node: id(node),
        incarnation,
        from: format!("n{from}").into(),
    }
}

use UpdateKind::{Alive, Dead, Suspect};

/// Suspicion bounds of the small clusters most tests use (N <= 10 members incl. self).
const FLOOR: Duration = Duration::from_secs(1);
const CEILING: Duration = Duration::from_secs(6);

/// A swim that knows n1 at `status`/`incarnation`, with an empty queue: Suspect means
/// suspected by n9 at `now` (so n1 is in the confirmation-probe set); Dead means declared
/// dead by this node's own timer (a Dead from the wire would only suspect it).
fn swim_with(status: Option<Status>, incarnation: u64, now: Instant) -> Swim {
    let mut swim = swim();
    let Some(status) = status else {
        return swim;
    };
    assert!(swim.apply(&upd(Alive, 1, incarnation, 1), now));
    match status {
        Status::Alive => {}
        Status::Suspect => assert!(swim.apply(&upd(Suspect, 1, incarnation, 9), now)),
        Status::Dead => {
            swim.probe_failed(&id(1), now);
            assert_eq!(swim.tick(now + CEILING), vec![id(1)]);
        }
    }
    assert_eq!(swim.status(&id(1)), Some(status));
    swim.queue.clear();
    swim
}

/// Confirmers of `node`'s current suspicion (empty if not suspect).
fn confirmers(swim: &Swim, node: u16) -> Vec<Arc<str>> {
    match swim.members.get(&id(node)).map(|member| &member.state) {
        Some(State::Suspect(suspicion)) => suspicion.confirmers.clone(),
        _ => Vec::new(),
    }
}

fn names(nodes: &[u16]) -> Vec<Arc<str>> {
    nodes.iter().map(|n| format!("n{n}").into()).collect()
}

fn queued(swim: &Swim) -> Vec<MemberUpdate> {
    swim.queue.iter().map(|q| q.update.clone()).collect()
}

#[test]
fn test_precedence_table() {
    use Status as S;
    // Columns: n1's initial status (at incarnation 5), the update, n1's resulting status,
    // incarnation and (if Suspect) confirmers, and whether the update changed anything. A
    // change is queued for re-broadcast as is, except a Dead about a live member, which
    // is only a suspicion here and is forwarded as that Suspect.
    #[rustfmt::skip]
    let rows: &[(Option<S>, MemberUpdate, Option<S>, u64, &[u16], bool)] = &[
        // Unknown node: only Alive admits it.
        (None, upd(Alive, 1, 3, 1), Some(S::Alive), 3, &[], true),
        (None, upd(Suspect, 1, 3, 2), None, 0, &[], false),
        (None, upd(Dead, 1, 3, 2), None, 0, &[], false),
        // Alive at 5.
        (Some(S::Alive), upd(Alive, 1, 4, 1), Some(S::Alive), 5, &[], false),
        (Some(S::Alive), upd(Alive, 1, 5, 1), Some(S::Alive), 5, &[], false),
        (Some(S::Alive), upd(Alive, 1, 6, 1), Some(S::Alive), 6, &[], true),
        (Some(S::Alive), upd(Suspect, 1, 4, 2), Some(S::Alive), 5, &[], false),
        (Some(S::Alive), upd(Suspect, 1, 5, 2), Some(S::Suspect), 5, &[2], true),
        (Some(S::Alive), upd(Suspect, 1, 6, 2), Some(S::Suspect), 6, &[2], true),
        (Some(S::Alive), upd(Dead, 1, 4, 2), Some(S::Alive), 5, &[], false),
        (Some(S::Alive), upd(Dead, 1, 5, 2), Some(S::Suspect), 5, &[2], true),
        (Some(S::Alive), upd(Dead, 1, 6, 2), Some(S::Suspect), 6, &[2], true),
        // Suspect at 5, suspected by n9.
        (Some(S::Suspect), upd(Alive, 1, 5, 1), Some(S::Suspect), 5, &[9], false),
        (Some(S::Suspect), upd(Alive, 1, 6, 1), Some(S::Alive), 6, &[], true),
        (Some(S::Suspect), upd(Suspect, 1, 4, 2), Some(S::Suspect), 5, &[9], false),
        (Some(S::Suspect), upd(Suspect, 1, 5, 9), Some(S::Suspect), 5, &[9], false),
        (Some(S::Suspect), upd(Suspect, 1, 5, 2), Some(S::Suspect), 5, &[9, 2], true),
        (Some(S::Suspect), upd(Suspect, 1, 6, 9), Some(S::Suspect), 6, &[9], true),
        (Some(S::Suspect), upd(Suspect, 1, 6, 2), Some(S::Suspect), 6, &[2], true),
        (Some(S::Suspect), upd(Dead, 1, 4, 2), Some(S::Suspect), 5, &[9], false),
        (Some(S::Suspect), upd(Dead, 1, 5, 9), Some(S::Suspect), 5, &[9], false),
        (Some(S::Suspect), upd(Dead, 1, 5, 2), Some(S::Suspect), 5, &[9, 2], true),
        (Some(S::Suspect), upd(Dead, 1, 6, 9), Some(S::Suspect), 6, &[9], true),
        (Some(S::Suspect), upd(Dead, 1, 6, 2), Some(S::Suspect), 6, &[2], true),
        // Dead at 5 (declared by our own timer): back only with a higher incarnation;
        // another death claim changes nothing, whatever its incarnation.
        (Some(S::Dead), upd(Alive, 1, 5, 1), Some(S::Dead), 5, &[], false),
        (Some(S::Dead), upd(Alive, 1, 6, 1), Some(S::Alive), 6, &[], true),
        (Some(S::Dead), upd(Suspect, 1, 4, 2), Some(S::Dead), 5, &[], false),
        (Some(S::Dead), upd(Suspect, 1, 5, 2), Some(S::Dead), 5, &[], false),
        (Some(S::Dead), upd(Suspect, 1, 6, 2), Some(S::Suspect), 6, &[2], true),
        (Some(S::Dead), upd(Dead, 1, 4, 2), Some(S::Dead), 5, &[], false),
        (Some(S::Dead), upd(Dead, 1, 5, 2), Some(S::Dead), 5, &[], false),
        (Some(S::Dead), upd(Dead, 1, 6, 2), Some(S::Dead), 5, &[], false),
    ];
    let now = Instant::now();
    for (row, (initial, update, status, incarnation, suspecters, changed)) in
        rows.iter().enumerate()
    {
        let mut swim = swim_with(*initial, 5, now);
        let applied = swim.apply(update, now);
        let ctx = format!("row {row}: {initial:?} <- {update:?}");
        assert_eq!(applied, *changed, "{ctx}");
        assert_eq!(swim.status(&id(1)), *status, "{ctx}");
        if status.is_some() {
            assert_eq!(swim.member_incarnation(&id(1)), Some(*incarnation), "{ctx}");
        }
        assert!(swim.dead().count() <= 1, "{ctx}");
        assert_eq!(confirmers(&swim, 1), names(suspecters), "{ctx}");
        let expected_queue = if *changed {
            let kind = if update.kind == Dead {
                Suspect
            } else {
                update.kind
            };
            vec![MemberUpdate {
                kind,
                ..update.clone()
            }]
        } else {
            vec![]
        };
        assert_eq!(queued(&swim), expected_queue, "{ctx}");
        if *status == Some(S::Suspect) {
            // We never confirmed: others' confirmations leave the deadline at the ceiling,
            // and n1 is ours to probe.
            assert_eq!(
                swim.suspicion_deadline(&id(1)),
                Some(now + CEILING),
                "{ctx}"
            );
            assert_eq!(swim.take_confirmation_probes(), vec![id(1)], "{ctx}");
        } else {
            assert_eq!(swim.suspicion_deadline(&id(1)), None, "{ctx}");
            assert!(swim.take_confirmation_probes().is_empty(), "{ctx}");
        }
    }
}

#[test]
fn test_alive_clears_suspicion() {
    let now = Instant::now();
    let mut swim = swim_with(Some(Status::Suspect), 5, now);
    assert!(swim.apply(&upd(Alive, 1, 6, 1), now));
    assert!(swim.suspicion_deadline(&id(1)).is_none());
    assert!(swim.tick(now + Duration::from_secs(3600)).is_empty());
}

#[test]
fn test_refutation_bumps_incarnation_and_queues_alive() {
    let now = Instant::now();
    let mut swim = Swim::new(id(0), 3, config());
    assert!(!swim.apply(&upd(Suspect, 0, 2, 1), now));
    assert_eq!(swim.incarnation(), 3);
    assert!(swim.apply(&upd(Suspect, 0, 3, 1), now));
    assert_eq!(swim.incarnation(), 4);
    assert!(swim.apply(&upd(Dead, 0, 7, 1), now));
    assert_eq!(swim.incarnation(), 8);
    // The later refutation supersedes the earlier one.
    assert_eq!(swim.piggyback(usize::MAX), vec![upd(Alive, 0, 8, 0)]);
    assert!(!swim.apply(&upd(Alive, 0, 20, 1), now));
    assert_eq!(swim.incarnation(), 8);
    assert!(swim.live().chain(swim.dead()).next().is_none());
}

#[test]
fn test_claims_about_other_generation_of_self_are_ignored() {
    let now = Instant::now();
    let mut swim = swim();
    let older_self = ChitchatId::new("n0", 0, ([127, 0, 0, 1], 7000).into());
    for kind in [Alive, Suspect, Dead] {
        let update = MemberUpdate {
            kind,
            node: older_self.clone(),
            incarnation: 5,
            from: "n1".into(),
        };
        assert!(!swim.apply(&update, now));
    }
    assert!(!swim.observe(&older_self, 5, now));
    assert_eq!(swim.incarnation(), 0);
    assert!(swim.is_empty());
    assert!(swim.piggyback(usize::MAX).is_empty());
}

#[test]
fn test_leave_stops_refutation() {
    let now = Instant::now();
    let mut swim = Swim::new(id(0), 2, config());
    swim.leave();
    assert!(!swim.apply(&upd(Suspect, 0, 2, 1), now));
    assert!(!swim.apply(&upd(Dead, 0, 5, 1), now));
    assert_eq!(swim.incarnation(), 2);
    assert_eq!(swim.piggyback(usize::MAX), vec![upd(Dead, 0, 2, 0)]);
}

#[test]
fn test_max_incarnation_guard() {
    let now = Instant::now();
    let mut swim = swim_with(Some(Status::Alive), 5, now);
    assert!(!swim.apply(&upd(Suspect, 1, MAX_INCARNATION + 1, 2), now));
    assert!(!swim.apply(&upd(Dead, 1, MAX_INCARNATION + 1, 2), now));
    assert!(!swim.apply(&upd(Alive, 1, MAX_INCARNATION + 2, 1), now));
    assert!(!swim.apply(&upd(Alive, 7, u64::MAX, 7), now));
    assert!(!swim.observe(&id(8), u64::MAX, now));
    assert_eq!(swim.member_incarnation(&id(1)), Some(5));
    // A suspicion at the maximum stays refutable, by us and by others.
    assert!(swim.apply(&upd(Suspect, 0, MAX_INCARNATION, 1), now));
    assert_eq!(swim.incarnation(), MAX_INCARNATION + 1);
    assert!(!swim.apply(&upd(Suspect, 0, MAX_INCARNATION + 1, 1), now));
    assert_eq!(swim.incarnation(), MAX_INCARNATION + 1);
    assert!(swim.apply(&upd(Suspect, 1, MAX_INCARNATION, 2), now));
    assert!(swim.apply(&upd(Alive, 1, MAX_INCARNATION + 1, 1), now));
    assert_eq!(swim.status(&id(1)), Some(Status::Alive));
    assert_eq!(
        Swim::new(id(0), u64::MAX, config()).incarnation(),
        MAX_INCARNATION
    );
}

#[test]
fn test_observe() {
    let now = Instant::now();
    let mut swim = swim();
    assert!(swim.observe(&id(1), 4, now));
    assert_eq!(swim.status(&id(1)), Some(Status::Alive));
    assert!(swim.piggyback(usize::MAX).is_empty());
    assert!(!swim.observe(&id(1), 4, now));
    assert!(!swim.observe(&id(0), 4, now));
    // Seen at the same incarnation, a suspect stays suspect and a dead member dead.
    assert!(swim.apply(&upd(Dead, 1, 4, 2), now));
    assert!(!swim.observe(&id(1), 4, now));
    assert_eq!(swim.status(&id(1)), Some(Status::Suspect));
    swim.probe_failed(&id(1), now);
    assert_eq!(swim.tick(now + CEILING), vec![id(1)]);
    assert!(!swim.observe(&id(1), 4, now));
    assert_eq!(swim.status(&id(1)), Some(Status::Dead));
    assert!(swim.observe(&id(1), 5, now));
    assert_eq!(swim.status(&id(1)), Some(Status::Alive));
    assert_eq!(swim.member_incarnation(&id(1)), Some(5));
}

#[test]
fn test_lifeguard_timeout_formula() {
    let floor = Duration::from_secs(2);
    let ceiling = Duration::from_secs(12);
    let k = 3;
    assert_eq!(lifeguard_timeout(floor, ceiling, 0, k), ceiling);
    assert_eq!(lifeguard_timeout(floor, ceiling, k, k), floor);
    assert_eq!(lifeguard_timeout(floor, ceiling, k + 5, k), floor);
    let timeouts: Vec<_> = (0..=k)
        .map(|c| lifeguard_timeout(floor, ceiling, c, k))
        .collect();
    assert!(
        timeouts.windows(2).all(|pair| pair[1] < pair[0]),
        "{timeouts:?}"
    );
    // C = 1, K = 3: 12 - 10 * ln 2 / ln 4 = 7 s.
    let one = lifeguard_timeout(floor, ceiling, 1, k).as_secs_f64();
    assert!((one - 7.0).abs() < 1e-6, "{one}");
    assert_eq!(lifeguard_timeout(floor, ceiling, 0, 0), floor);
    assert_eq!(lifeguard_timeout(floor, floor, 0, k), floor);
}

#[test]
fn test_suspicion_bounds_scale_with_log10_of_members() {
    let config = config();
    let second = Duration::from_secs(1);
    assert_eq!(suspicion_bounds(&config, 1), (second, second * 6));
    assert_eq!(suspicion_bounds(&config, 10), (second, second * 6));
    let (floor, ceiling) = suspicion_bounds(&config, 1000);
    assert!((floor.as_secs_f64() - 3.0).abs() < 1e-9);
    assert!((ceiling.as_secs_f64() - 18.0).abs() < 1e-6);
    let huge = SwimConfig {
        suspicion_min: Duration::MAX,
        suspicion_max_mult: u32::MAX,
        ..config
    };
    assert_eq!(
        suspicion_bounds(&huge, 1000),
        (Duration::MAX, Duration::MAX)
    );
}

#[test]
fn k_for_small_clusters() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_millis(500);
    // Two members with self: K = min(3, 2 - 2).max(1) = 1. Our own suspicion alone runs
    // to the ceiling; one more confirmer brings it to the floor, now that we confirmed.
    let mut swim = swim_with(Some(Status::Alive), 5, t0);
    swim.probe_failed(&id(1), t0);
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
    assert!(swim.apply(&upd(Suspect, 1, 5, 2), t1));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
    // The other way round: another's suspicion stays at the ceiling until our own probe
    // fails, which is then the one confirmation K = 1 asks for.
    let mut swim = swim_with(Some(Status::Alive), 5, t0);
    assert!(swim.apply(&upd(Suspect, 1, 5, 2), t0));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
    swim.probe_failed(&id(1), t1);
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
    // Three members: K = 1 still. Another member's confirmation alone does not shorten
    // the suspicion; ours brings it to the floor (K = 3 would stop at
    // lifeguard_timeout(.., 1, 3) = 3.5 s).
    let mut swim = swim_with(Some(Status::Alive), 5, t0);
    swim.observe(&id(20), 1, t0);
    assert!(swim.apply(&upd(Suspect, 1, 5, 20), t0));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
    swim.probe_failed(&id(1), t1);
    assert_eq!(confirmers(&swim, 1), names(&[20, 0]));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
    // Four members: K = 2. Our confirmation gives lifeguard_timeout(.., 1, 2), a further
    // one the floor.
    let mut swim = swim_with(Some(Status::Alive), 5, t0);
    swim.observe(&id(20), 1, t0);
    swim.observe(&id(21), 1, t0);
    assert!(swim.apply(&upd(Suspect, 1, 5, 20), t0));
    swim.probe_failed(&id(1), t1);
    let one_of_two = lifeguard_timeout(FLOOR, CEILING, 1, 2);
    assert!(FLOOR < one_of_two && one_of_two < lifeguard_timeout(FLOOR, CEILING, 1, 3));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + one_of_two));
    assert!(swim.apply(&upd(Suspect, 1, 5, 21), t1));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
}

/// Five members with self, so K = 3 confirmations are possible (a smaller cluster lowers
/// K: `k_for_small_clusters`).
fn swim_of_five(t0: Instant) -> Swim {
    let mut swim = swim_with(Some(Status::Alive), 5, t0);
    for i in 20..23 {
        swim.observe(&id(i), 1, t0);
    }
    swim
}

#[test]
fn test_deadline_recomputed_from_start() {
    let t0 = Instant::now();
    let mut swim = swim_of_five(t0);
    assert!(swim.apply(&upd(Suspect, 1, 5, 2), t0));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
    // Our own probe fails later: one confirmation, counted from the start, not from t1.
    let t1 = t0 + Duration::from_millis(1500);
    swim.probe_failed(&id(1), t1);
    let expected = t0 + lifeguard_timeout(FLOOR, CEILING, 1, 3);
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(expected));
    assert!(swim.apply(&upd(Suspect, 1, 5, 3), t1));
    let expected = t0 + lifeguard_timeout(FLOOR, CEILING, 2, 3);
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(expected));
    assert!(expected > t1);
    assert!(swim.tick(t1).is_empty());
    assert!(!swim.apply(&upd(Suspect, 1, 5, 3), t1));
    assert!(swim.apply(&upd(Suspect, 1, 5, 4), t1));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
    assert_eq!(confirmers(&swim, 1), names(&[2, 0, 3, 4]));
    // K + 1 confirmers already: a further one changes nothing and is not forwarded.
    let queue = queued(&swim);
    assert!(!swim.apply(&upd(Suspect, 1, 5, 5), t1));
    assert_eq!(queued(&swim), queue);
    assert_eq!(confirmers(&swim, 1), names(&[2, 0, 3, 4]));
    // The deadline passed while confirming: the next tick declares it dead.
    assert_eq!(swim.tick(t1), vec![id(1)]);
    assert_eq!(swim.news_for(&id(1)), Some(upd(Dead, 1, 5, 0)));
}

#[test]
fn test_confirmations_count_only_once_we_confirm() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_secs(2);
    let mut swim = swim_of_five(t0);
    // Others' confirmations alone, up to the K + 1 = 4 confirmers kept: recorded and
    // forwarded, but the deadline stays at start + ceiling.
    for from in 2..=5 {
        assert!(swim.apply(&upd(Suspect, 1, 5, from), t0));
        assert_eq!(
            swim.suspicion_deadline(&id(1)),
            Some(t0 + CEILING),
            "n{from}"
        );
    }
    assert!(!swim.apply(&upd(Dead, 1, 5, 6), t1));
    assert!(!swim.apply(&upd(Suspect, 1, 5, 7), t1));
    assert_eq!(confirmers(&swim, 1), names(&[2, 3, 4, 5]));
    let forwarded: Vec<_> = (2..=5).map(|from| upd(Suspect, 1, 5, from)).collect();
    assert_eq!(queued(&swim), forwarded);
    assert!(
        swim.tick(t0 + CEILING - Duration::from_millis(1))
            .is_empty()
    );
    assert_eq!(swim.status(&id(1)), Some(Status::Suspect));
    // The list is full, but room is made for our own confirmation, which lets the four
    // others count: the floor, from the start, already past at t1.
    assert_eq!(swim.confirmation_probes, vec![id(1)]);
    swim.probe_failed(&id(1), t1);
    assert_eq!(confirmers(&swim, 1), names(&[2, 3, 4, 5, 0]));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
    assert_eq!(queued(&swim).last(), Some(&upd(Suspect, 1, 5, 0)));
    assert!(swim.take_confirmation_probes().is_empty());
    // Still bounded: nobody else gets in after us.
    assert!(!swim.apply(&upd(Suspect, 1, 5, 8), t1));
    assert_eq!(confirmers(&swim, 1).len(), 5);
    assert_eq!(swim.tick(t1), vec![id(1)]);
    assert_eq!(swim.status(&id(1)), Some(Status::Dead));
    // Our Dead supersedes every queued Suspect about n1.
    assert_eq!(queued(&swim), vec![upd(Dead, 1, 5, 0)]);

    // Each step with our confirmation in: we confirm first (no cut by ourselves alone),
    // then every other confirmer cuts per the formula with C = confirmers - 1.
    let mut swim = swim_of_five(t0);
    swim.probe_failed(&id(1), t0);
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
    for (c, from) in (1..=3).zip(2..) {
        assert!(swim.apply(&upd(Suspect, 1, 5, from), t1));
        let expected = t0 + lifeguard_timeout(FLOOR, CEILING, c, 3);
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(expected), "C = {c}");
    }
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
    assert!(!swim.apply(&upd(Suspect, 1, 5, 9), t1));
    assert_eq!(confirmers(&swim, 1), names(&[0, 2, 3, 4]));
}

#[test]
fn test_dead_from_others_is_only_a_suspicion() {
    let t0 = Instant::now();
    let mut swim = swim_of_five(t0);
    // A forged death of a live member: n1 stays live, as a Suspect at the claimed
    // incarnation, the claim forwarded as a suspicion, and n1 ours to probe.
    assert!(swim.apply(&upd(Dead, 1, 5, 7), t0));
    assert_eq!(swim.status(&id(1)), Some(Status::Suspect));
    assert!(swim.live().any(|live| *live == id(1)));
    assert_eq!(swim.dead().count(), 0);
    assert_eq!(queued(&swim), vec![upd(Suspect, 1, 5, 7)]);
    assert_eq!(swim.news_for(&id(1)), Some(upd(Suspect, 1, 5, 7)));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
    // More invented names only confirm, and without our own failed probe, cut nothing.
    assert!(swim.apply(&upd(Dead, 1, 5, 8), t0));
    assert!(swim.apply(&upd(Dead, 1, 5, 9), t0));
    assert!(swim.apply(&upd(Dead, 1, 5, 10), t0));
    assert_eq!(confirmers(&swim, 1), names(&[7, 8, 9, 10]));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
    assert!(
        queued(&swim)
            .iter()
            .all(|update| update.kind == Suspect && update.node == id(1))
    );
    assert_eq!(swim.take_confirmation_probes(), vec![id(1)]);
    assert!(
        swim.tick(t0 + CEILING - Duration::from_millis(1))
            .is_empty()
    );

    // n1 hears of it (our probe carries `news_for`) and refutes: it was never dead.
    let mut refuted = swim_of_five(t0);
    assert!(refuted.apply(&upd(Dead, 1, 5, 7), t0));
    assert!(refuted.apply(&upd(Alive, 1, 6, 1), t0 + Duration::from_secs(1)));
    assert_eq!(refuted.status(&id(1)), Some(Status::Alive));
    assert!(refuted.tick(t0 + CEILING).is_empty());
    assert_eq!(refuted.status(&id(1)), Some(Status::Alive));
    assert!(refuted.take_confirmation_probes().is_empty());
    // An old death claim at the refuted incarnation is ignored.
    assert!(!refuted.apply(&upd(Dead, 1, 5, 8), t0 + CEILING));

    // Nobody refutes: our own timer declares it dead, and the Dead we queue is ours.
    assert_eq!(swim.tick(t0 + CEILING), vec![id(1)]);
    assert_eq!(swim.status(&id(1)), Some(Status::Dead));
    assert_eq!(swim.member_incarnation(&id(1)), Some(5));
    assert_eq!(queued(&swim), vec![upd(Dead, 1, 5, 0)]);
    assert_eq!(swim.news_for(&id(1)), Some(upd(Dead, 1, 5, 0)));
    // Once dead, further death claims are ignored, at any incarnation.
    for incarnation in [5, 6] {
        assert!(!swim.apply(&upd(Dead, 1, incarnation, 7), t0 + CEILING));
    }
    assert_eq!(swim.status(&id(1)), Some(Status::Dead));
    assert_eq!(swim.member_incarnation(&id(1)), Some(5));
    assert_eq!(queued(&swim), vec![upd(Dead, 1, 5, 0)]);

    // A member that really is down fails our probe too: with the claims as confirmations,
    // it is dead at the floor.
    let mut swim = swim_of_five(t0);
    assert!(swim.apply(&upd(Dead, 1, 5, 7), t0));
    assert!(swim.apply(&upd(Dead, 1, 5, 8), t0));
    assert!(swim.apply(&upd(Dead, 1, 5, 9), t0));
    swim.probe_failed(&id(1), t0);
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
    assert_eq!(swim.tick(t0 + FLOOR), vec![id(1)]);
    assert_eq!(queued(&swim), vec![upd(Dead, 1, 5, 0)]);
}

#[test]
fn test_tick_declares_expired_suspects_dead() {
    let t0 = Instant::now();
    let mut swim = swim();
    for node in 1..=3 {
        swim.apply(&upd(Alive, node, 1, node), t0);
    }
    swim.probe_failed(&id(1), t0);
    swim.probe_failed(&id(2), t0 + Duration::from_secs(1));
    swim.queue.clear();
    let ceiling = Duration::from_secs(6);
    assert!(
        swim.tick(t0 + ceiling - Duration::from_millis(1))
            .is_empty()
    );
    assert_eq!(swim.tick(t0 + ceiling), vec![id(1)]);
    assert_eq!(swim.status(&id(1)), Some(Status::Dead));
    assert_eq!(swim.status(&id(2)), Some(Status::Suspect));
    assert_eq!(swim.piggyback(usize::MAX), vec![upd(Dead, 1, 1, 0)]);
    assert_eq!(swim.news_for(&id(1)), Some(upd(Dead, 1, 1, 0)));
    assert_eq!(swim.news_for(&id(2)), Some(upd(Suspect, 2, 1, 0)));
    assert_eq!(swim.news_for(&id(3)), None);
    assert!(swim.tick(t0 + ceiling).is_empty());
    assert_eq!(swim.dead().cloned().collect::<Vec<_>>(), vec![id(1)]);
    assert_eq!(swim.live().cloned().collect::<Vec<_>>(), vec![id(2), id(3)]);
}

#[test]
fn test_probe_failed() {
    let now = Instant::now();
    let mut swim = swim_with(Some(Status::Alive), 5, now);
    swim.probe_failed(&id(1), now);
    assert_eq!(swim.status(&id(1)), Some(Status::Suspect));
    assert_eq!(confirmers(&swim, 1), names(&[0]));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(now + CEILING));
    assert_eq!(swim.piggyback(usize::MAX), vec![upd(Suspect, 1, 5, 0)]);
    assert!(swim.take_confirmation_probes().is_empty());
    // Already a confirmer: a second failure is not news.
    swim.probe_failed(&id(1), now);
    assert!(swim.queue.iter().all(|q| q.transmits > 0));
    assert_eq!(confirmers(&swim, 1), names(&[0]));
    // Suspected by someone else: our failed probe confirms, which (K = 1 with two
    // members) brings the deadline from the ceiling to the floor, and the suspect no
    // longer needs a confirmation probe.
    let mut swim = swim_with(Some(Status::Suspect), 5, now);
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(now + CEILING));
    swim.probe_failed(&id(1), now + Duration::from_millis(100));
    assert_eq!(confirmers(&swim, 1), names(&[9, 0]));
    assert_eq!(swim.suspicion_deadline(&id(1)), Some(now + FLOOR));
    assert_eq!(swim.piggyback(usize::MAX), vec![upd(Suspect, 1, 5, 0)]);
    assert!(swim.take_confirmation_probes().is_empty());
    let mut swim = swim_with(Some(Status::Dead), 5, now);
    swim.probe_failed(&id(1), now);
    swim.probe_failed(&id(7), now);
    swim.probe_failed(&id(0), now);
    assert_eq!(swim.status(&id(1)), Some(Status::Dead));
    assert!(swim.piggyback(usize::MAX).is_empty());
}

#[test]
fn test_confirmation_probes() {
    let now = Instant::now();
    let mut swim = swim();
    for node in 1..=4 {
        swim.apply(&upd(Alive, node, 1, node), now);
    }
    swim.apply(&upd(Suspect, 1, 1, 8), now);
    swim.apply(&upd(Suspect, 1, 1, 9), now);
    swim.apply(&upd(Suspect, 2, 1, 8), now);
    // Another's death claim is a suspicion we probe too.
    assert!(swim.apply(&upd(Dead, 3, 1, 8), now));
    swim.apply(&upd(Suspect, 4, 1, 8), now);
    swim.probe_failed(&id(4), now);
    // Once we confirmed, a further claim (death or suspicion) does not ask us again.
    assert!(swim.apply(&upd(Dead, 4, 1, 9), now));
    swim.apply(&upd(Alive, 2, 2, 2), now);
    assert_eq!(swim.take_confirmation_probes(), vec![id(1), id(3)]);
    assert!(swim.take_confirmation_probes().is_empty());
    // A suspicion (or death claim) at a higher incarnation needs a fresh confirmation.
    swim.apply(&upd(Suspect, 4, 2, 8), now);
    swim.apply(&upd(Dead, 1, 2, 8), now);
    swim.remove(&id(1));
    assert_eq!(swim.take_confirmation_probes(), vec![id(4)]);
    // A claim in our own name from the wire (an echo, or a forgery) is ignored: no
    // suspicion, no probe, no confirmation.
    swim.apply(&upd(Alive, 5, 1, 5), now);
    assert!(!swim.apply(&upd(Suspect, 5, 1, 0), now));
    assert!(!swim.apply(&upd(Dead, 5, 1, 0), now));
    assert_eq!(swim.status(&id(5)), Some(Status::Alive));
    assert!(swim.take_confirmation_probes().is_empty());
    // A suspect our own timer declared dead is no longer probed.
    assert!(swim.apply(&upd(Suspect, 3, 2, 8), now));
    assert_eq!(swim.confirmation_probes, vec![id(3)]);
    assert!(swim.tick(now + CEILING).contains(&id(3)));
    assert_eq!(swim.status(&id(3)), Some(Status::Dead));
    assert!(swim.take_confirmation_probes().is_empty());
}

fn probe_pass(swim: &mut Swim, rng: &mut StdRng, len: usize) -> Vec<ChitchatId> {
    let mut pass: Vec<_> = (0..len)
        .filter_map(|_| swim.next_probe_target(rng))
        .collect();
    pass.sort();
    pass
}

#[test]
fn test_round_robin_visits_each_live_member_once_per_pass() {
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(7);
    let mut swim = swim();
    assert_eq!(swim.next_probe_target(&mut rng), None);
    for node in 1..=6 {
        swim.apply(&upd(Alive, node, 1, node), now);
    }
    // n6 dead (our own timer), n5 suspected by us, n4 claimed dead by another (only a
    // suspicion here): suspects are still probed, the dead are not.
    swim.probe_failed(&id(6), now);
    assert_eq!(swim.tick(now + CEILING), vec![id(6)]);
    swim.probe_failed(&id(5), now + CEILING);
    assert!(swim.apply(&upd(Dead, 4, 1, 9), now + CEILING));
    let expected: Vec<_> = (1..=5).map(id).collect();
    let mut orders = Vec::new();
    for _ in 0..4 {
        let mut pass = Vec::new();
        for _ in 0..5 {
            pass.push(swim.next_probe_target(&mut rng).unwrap());
        }
        orders.push(pass.clone());
        pass.sort();
        assert_eq!(pass, expected);
    }
    assert!(
        orders.windows(2).any(|pair| pair[0] != pair[1]),
        "never reshuffled"
    );
}

#[test]
fn test_round_robin_membership_changes_mid_pass() {
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(3);
    let mut swim = swim();
    for node in 1..=4 {
        swim.apply(&upd(Alive, node, 1, node), now);
    }
    let first = swim.next_probe_target(&mut rng).unwrap();
    let mut seen = vec![first.clone()];
    let victim = (1..=4).find(|&node| id(node) != first).unwrap();
    swim.probe_failed(&id(victim), now);
    assert_eq!(swim.tick(now + CEILING), vec![id(victim)]);
    swim.apply(&upd(Alive, 5, 1, 5), now);
    swim.remove(&first);
    seen.extend(probe_pass(&mut swim, &mut rng, 3));
    seen.sort();
    let mut expected: Vec<_> = (1..=5).filter(|&n| n != victim).map(id).collect();
    expected.sort();
    assert_eq!(seen, expected);
    // Next pass: only the current live members.
    let next = probe_pass(&mut swim, &mut rng, 3);
    let live: Vec<_> = swim.live().cloned().collect();
    assert_eq!(next, live);
    assert_eq!(live.len(), 3);
}

#[test]
fn test_piggyback_orders_by_fewest_transmits_then_newest() {
    let now = Instant::now();
    let mut swim = swim();
    swim.apply(&upd(Alive, 1, 1, 1), now);
    swim.apply(&upd(Alive, 2, 1, 2), now);
    let one = upd(Alive, 1, 1, 1).serialized_len();
    assert_eq!(swim.piggyback(1 + one), vec![upd(Alive, 2, 1, 2)]);
    assert_eq!(swim.piggyback(1 + one), vec![upd(Alive, 1, 1, 1)]);
    swim.apply(&upd(Alive, 3, 1, 3), now);
    assert_eq!(
        swim.piggyback(usize::MAX),
        vec![
            upd(Alive, 3, 1, 3),
            upd(Alive, 2, 1, 2),
            upd(Alive, 1, 1, 1)
        ]
    );
}

#[test]
fn test_piggyback_respects_byte_budget_and_count() {
    let now = Instant::now();
    let mut swim = swim();
    for node in 1..=100 {
        swim.apply(&upd(Alive, node, 1, node), now);
    }
    for budget in [0, 1, 10, 40, 41, 100, 1000, 1400] {
        let picked = swim.piggyback(budget);
        assert!(serialized_updates_len(&picked) <= budget.max(1), "{budget}");
        let mut buf = Vec::new();
        serialize_updates(&picked, &mut buf);
        assert_eq!(buf.len(), serialized_updates_len(&picked));
    }
    let picked = swim.piggyback(usize::MAX);
    assert_eq!(picked.len(), MAX_UPDATES_PER_MESSAGE);
    // A big update that does not fit is skipped, smaller ones still go.
    let mut swim = swim_with(Some(Status::Alive), 1, now);
    let big = ChitchatId::new("x".repeat(200), 1, ([127, 0, 0, 1], 1).into());
    swim.apply(&alive_update(&big, 1), now);
    swim.apply(&upd(Alive, 2, 1, 2), now);
    let small = upd(Alive, 2, 1, 2).serialized_len();
    let picked = swim.piggyback(1 + 2 * small);
    assert_eq!(picked, vec![upd(Alive, 2, 1, 2)]);
}

#[test]
fn test_retransmit_limit_drops_entries() {
    let now = Instant::now();
    let mut swim = swim();
    swim.apply(&upd(Alive, 1, 1, 1), now);
    // N = 2 members incl. self: 4 * ceil(log10(3)) = 4 sends.
    assert_eq!(swim.retransmit_limit(), 4);
    for _ in 0..4 {
        assert_eq!(swim.piggyback(usize::MAX).len(), 1);
    }
    assert!(swim.piggyback(usize::MAX).is_empty());
    for node in 2..=10 {
        swim.observe(&id(node), 1, now);
    }
    // N = 11: ceil(log10(12)) = 2.
    assert_eq!(swim.retransmit_limit(), 8);
    let zero = Swim::new(
        id(0),
        0,
        SwimConfig {
            retransmit_mult: 0,
            ..config()
        },
    );
    assert_eq!(zero.retransmit_limit(), 1);
}

#[test]
fn test_supersession() {
    let now = Instant::now();
    let mut swim = swim_with(Some(Status::Alive), 1, now);
    swim.apply(&upd(Alive, 2, 1, 2), now);
    swim.apply(&upd(Suspect, 1, 1, 8), now);
    // Confirmations at the same incarnation are kept side by side, a death claim from
    // another being one (forwarded as a Suspect).
    assert!(swim.apply(&upd(Dead, 1, 1, 9), now));
    assert_eq!(
        queued(&swim),
        vec![
            upd(Alive, 2, 1, 2),
            upd(Suspect, 1, 1, 8),
            upd(Suspect, 1, 1, 9)
        ]
    );
    swim.apply(&upd(Suspect, 1, 2, 7), now);
    assert_eq!(
        queued(&swim),
        vec![upd(Alive, 2, 1, 2), upd(Suspect, 1, 2, 7)]
    );
    swim.apply(&upd(Alive, 1, 3, 1), now);
    assert_eq!(
        queued(&swim),
        vec![upd(Alive, 2, 1, 2), upd(Alive, 1, 3, 1)]
    );
    swim.apply(&upd(Suspect, 1, 3, 7), now);
    assert_eq!(
        queued(&swim),
        vec![upd(Alive, 2, 1, 2), upd(Suspect, 1, 3, 7)]
    );
    // Our own Dead (the only kind there is now) supersedes every queued update about n1,
    // our own confirmation included.
    swim.probe_failed(&id(1), now);
    assert_eq!(
        queued(&swim),
        vec![
            upd(Alive, 2, 1, 2),
            upd(Suspect, 1, 3, 7),
            upd(Suspect, 1, 3, 0)
        ]
    );
    assert_eq!(swim.tick(now + CEILING), vec![id(1)]);
    assert_eq!(queued(&swim), vec![upd(Alive, 2, 1, 2), upd(Dead, 1, 3, 0)]);
    swim.apply(&upd(Suspect, 1, 4, 7), now);
    assert_eq!(
        queued(&swim),
        vec![upd(Alive, 2, 1, 2), upd(Suspect, 1, 4, 7)]
    );
    swim.remove(&id(1));
    assert_eq!(queued(&swim), vec![upd(Alive, 2, 1, 2)]);
    assert_eq!(swim.status(&id(1)), None);
}

#[test]
fn test_queue_is_bounded() {
    let now = Instant::now();
    let mut swim = swim();
    swim.apply(&upd(Alive, 1, 1, 1), now);
    swim.piggyback(usize::MAX);
    for node in 2..(MAX_QUEUED_UPDATES as u16 + 10) {
        swim.apply(&upd(Alive, node, 1, node), now);
    }
    assert_eq!(swim.queue.len(), MAX_QUEUED_UPDATES);
    // The already-sent update went first.
    assert!(swim.queue.iter().all(|q| q.update.node != id(1)));
}

#[test]
fn test_serialization_round_trip() {
    let updates = vec![
        upd(Alive, 1, 0, 1),
        upd(Suspect, 2, 7, 3),
        MemberUpdate {
            kind: Dead,
            node: ChitchatId::new("é", u64::MAX, "[::1]:9".parse().unwrap()),
            incarnation: MAX_INCARNATION,
            from: "".into(),
        },
    ];
    let mut buf = Vec::new();
    serialize_updates(&updates, &mut buf);
    assert_eq!(buf.len(), serialized_updates_len(&updates));
    let mut cursor = &buf[..];
    assert_eq!(deserialize_updates(&mut cursor).unwrap(), updates);
    assert!(cursor.is_empty());
}

#[test]
fn test_deserialize_rejects_bad_input() {
    let mut buf = Vec::new();
    upd(Alive, 1, 0, 1).serialize(&mut buf);
    buf[0] = 3;
    assert!(MemberUpdate::deserialize(&mut &buf[..]).is_err());
    let too_many = vec![upd(Alive, 1, 0, 1); MAX_UPDATES_PER_MESSAGE + 1];
    let mut buf = Vec::new();
    serialize_updates(&too_many, &mut buf);
    assert!(deserialize_updates(&mut &buf[..]).is_err());
    let max = vec![upd(Alive, 1, 0, 1); MAX_UPDATES_PER_MESSAGE];
    let mut buf = Vec::new();
    serialize_updates(&max, &mut buf);
    assert!(deserialize_updates(&mut &buf[..buf.len() - 1]).is_err());
    assert_eq!(deserialize_updates(&mut &buf[..]).unwrap().len(), 64);
    let overlong = vec![upd(Alive, 1, 0, 1); 300];
    let mut buf = Vec::new();
    serialize_updates(&overlong, &mut buf);
    assert_eq!(buf[0], 255);
    assert_eq!(buf.len(), serialized_updates_len(&overlong));
}

fn arb_update() -> impl Strategy<Value = MemberUpdate> {
    let addr = prop_oneof![
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| (ip, port).into()),
        any::<([u8; 16], u16)>().prop_map(|(ip, port)| (ip, port).into()),
    ];
    (
        0u8..3,
        ".{0,20}",
        any::<u64>(),
        addr,
        any::<u64>(),
        ".{0,20}",
    )
        .prop_map(
            |(kind, node_id, generation, addr, incarnation, from)| MemberUpdate {
                kind: UpdateKind::try_from(kind).unwrap(),
                node: ChitchatId::new(node_id, generation, addr),
                incarnation,
                from: from.into(),
            },
        )
}

#[derive(Debug, Clone)]
enum Op {
    Apply(u8, u16, u64, u16),
    Observe(u16, u64),
    ProbeFailed(u16),
    Tick(u64),
    Probe,
    Confirm,
    Piggyback(usize),
    Remove(u16),
    Leave,
}

fn arb_op() -> impl Strategy<Value = Op> {
    let inc = prop_oneof![0u64..4, Just(MAX_INCARNATION), Just(MAX_INCARNATION + 1)];
    prop_oneof![
        4 => (0u8..3, 0u16..6, inc.clone(), 0u16..6)
            .prop_map(|(k, n, i, f)| Op::Apply(k, n, i, f)),
        1 => (0u16..6, inc).prop_map(|(n, i)| Op::Observe(n, i)),
        1 => (0u16..6).prop_map(Op::ProbeFailed),
        1 => (0u64..20_000).prop_map(Op::Tick),
        1 => Just(Op::Probe),
        1 => Just(Op::Confirm),
        1 => (0usize..300).prop_map(Op::Piggyback),
        1 => (0u16..6).prop_map(Op::Remove),
        1 => Just(Op::Leave),
    ]
}

fn run_op(swim: &mut Swim, rng: &mut StdRng, op: Op, t0: Instant) {
    match op {
        Op::Apply(kind, node, incarnation, from) => {
            let kind = UpdateKind::try_from(kind).unwrap();
            swim.apply(&upd(kind, node, incarnation, from), t0);
        }
        Op::Observe(node, incarnation) => {
            swim.observe(&id(node), incarnation, t0);
        }
        Op::ProbeFailed(node) => swim.probe_failed(&id(node), t0),
        Op::Tick(ms) => {
            swim.tick(t0 + Duration::from_millis(ms));
        }
        Op::Probe => {
            if let Some(target) = swim.next_probe_target(rng) {
                assert!(swim.live().any(|live| *live == target));
            }
        }
        Op::Confirm => {
            for suspect in swim.take_confirmation_probes() {
                assert_eq!(swim.status(&suspect), Some(Status::Suspect));
            }
        }
        Op::Piggyback(budget) => {
            let picked = swim.piggyback(budget);
            assert!(serialized_updates_len(&picked) <= budget.max(1));
        }
        Op::Remove(node) => swim.remove(&id(node)),
        Op::Leave => swim.leave(),
    }
}

proptest! {
    #[test]
    fn proptest_deserialize_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = deserialize_updates(&mut &bytes[..]);
        let _ = MemberUpdate::deserialize(&mut &bytes[..]);
    }

    #[test]
    fn proptest_updates_round_trip(
        updates in proptest::collection::vec(arb_update(), 0..=MAX_UPDATES_PER_MESSAGE)
    ) {
        let mut buf = Vec::new();
        serialize_updates(&updates, &mut buf);
        prop_assert_eq!(buf.len(), serialized_updates_len(&updates));
        let mut cursor = &buf[..];
        prop_assert_eq!(deserialize_updates(&mut cursor).unwrap(), updates);
        prop_assert!(cursor.is_empty());
    }

    #[test]
    fn proptest_state_machine_invariants(
        ops in proptest::collection::vec(arb_op(), 0..200),
        seed in any::<u64>(),
    ) {
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut swim = swim();
        let me = swim.self_id().node_id.clone();
        for op in ops {
            let live_before: Vec<ChitchatId> = swim.live().cloned().collect();
            let is_tick = matches!(op, Op::Tick(_));
            run_op(&mut swim, &mut rng, op, t0);
            prop_assert!(swim.live().chain(swim.dead()).all(|n| n.node_id != id(0).node_id));
            prop_assert!(swim.incarnation() <= MAX_INCARNATION + 1);
            prop_assert!(swim.queue.len() <= MAX_QUEUED_UPDATES);
            prop_assert_eq!(swim.live().count() + swim.dead().count(), swim.len());
            // Only our own suspicion timers declare a member dead, and the only Dead
            // updates we send are ours (never a forwarded claim).
            if !is_tick {
                for member in &live_before {
                    prop_assert_ne!(swim.status(member), Some(Status::Dead));
                }
            }
            for member in swim.members.values() {
                if let State::Dead { by } = &member.state {
                    prop_assert_eq!(by, &me);
                }
            }
            prop_assert!(swim.queue.iter().all(|q| q.update.kind != Dead || q.update.from == me));
            // Others' confirmations cut a suspicion only once we are among the confirmers;
            // the list holds at most K + 1 others, plus us.
            for member in swim.members.values() {
                let State::Suspect(suspicion) = &member.state else {
                    continue;
                };
                let confirmed = suspicion.confirmers.contains(&me);
                let expected = if confirmed {
                    let confirmations = (suspicion.confirmers.len() - 1) as u32;
                    lifeguard_timeout(suspicion.floor, suspicion.ceiling, confirmations, suspicion.k)
                } else {
                    suspicion.ceiling
                };
                prop_assert_eq!(suspicion.timeout, expected);
                let others = suspicion.confirmers.len() - usize::from(confirmed);
                prop_assert!(others <= suspicion.k as usize + 1);
                let mut distinct = suspicion.confirmers.clone();
                distinct.sort();
                distinct.dedup();
                prop_assert_eq!(distinct.len(), suspicion.confirmers.len());
            }
        }
    }
}
