use mesh_api::Label;
use mesh_api::policy::{RateLimit, Resource};

use super::*;

const WEB: &str = "spiffe://mesh.test/ns/shop/svc/web";
const CLI: &str = "spiffe://mesh.test/ns/shop/svc/cli";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn label(s: &str) -> Label {
    Label::new(s).unwrap()
}

fn limit(key: LimitKey, route: Option<&str>, rpu: u32, unit: Unit, burst: u32) -> Limit {
    Limit {
        key,
        route: route.map(label),
        requests_per_unit: rpu,
        unit,
        burst,
    }
}

/// `n` per second with burst `n`.
fn per_sec(key: LimitKey, n: u32) -> Limit {
    limit(key, None, n, Unit::Second, n)
}

fn rate_limit(ns: &str, name: &str, service: &str, limits: Vec<Limit>) -> Resource {
    Resource {
        key: ResourceKey::new(Kind::RateLimit, label(ns), label(name)),
        spec: Spec::RateLimit(RateLimit {
            service: label(service),
            limits,
        }),
    }
}

fn api() -> ServiceKey {
    ServiceKey::parse("shop/api").unwrap()
}

fn limiter(resources: Vec<Resource>) -> Limiter {
    Limiter::new(&Snapshot::new(1, resources), &api())
}

/// Admits `n` requests at `now`, asserting each is admitted.
fn admit(l: &Limiter, route: Option<&str>, caller: &str, now: Instant, n: u32) {
    for i in 0..n {
        assert_eq!(l.check(route, caller, now), Ok(()), "request {i}");
    }
}

#[test]
fn bucket_bursts_then_refuses_with_the_wait() {
    let t0 = Instant::now();
    // (rate/s, burst, expected wait after the burst)
    let cases = [
        (1.0, 3, ms(1000)),
        (2.0, 2, ms(500)),
        (10.0, 5, ms(100)),
        (1.0 / 60.0, 1, Duration::from_secs(60)),
    ];
    for (rate, burst, wait) in cases {
        let mut b = Bucket::new(burst, t0);
        for i in 0..burst {
            assert_eq!(b.take(rate, burst, t0), Ok(()), "{rate}/{burst} #{i}");
        }
        let got = b.take(rate, burst, t0).unwrap_err();
        let diff = got.abs_diff(wait);
        assert!(
            diff < ms(1),
            "{rate}/{burst}: waited {got:?}, want {wait:?}"
        );
        assert_eq!(b.tokens, 0.0, "a refusal takes nothing");
    }
}

#[test]
fn bucket_refills_over_time_and_caps_at_burst() {
    let t0 = Instant::now();
    let mut b = Bucket::new(2, t0);
    admit_bucket(&mut b, 10.0, 2, t0, 2);
    assert!(b.take(10.0, 2, t0 + ms(50)).is_err(), "half a token");
    assert_eq!(
        b.take(10.0, 2, t0 + ms(100)),
        Ok(()),
        "one token after 100ms"
    );
    assert!(b.take(10.0, 2, t0 + ms(100)).is_err());
    // A long idle refills only up to the burst.
    let later = t0 + Duration::from_secs(3600);
    admit_bucket(&mut b, 10.0, 2, later, 2);
    assert!(b.take(10.0, 2, later).is_err(), "capped at burst 2");
    // Burst 0 counts as 1.
    let mut z = Bucket::new(0, t0);
    assert_eq!(z.take(1.0, 0, t0), Ok(()));
    assert!(z.take(1.0, 0, t0).is_err());
}

fn admit_bucket(b: &mut Bucket, rate: f64, burst: u32, now: Instant, n: u32) {
    for i in 0..n {
        assert_eq!(b.take(rate, burst, now), Ok(()), "take {i}");
    }
}

#[test]
fn bucket_tolerates_a_clock_going_backwards() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_secs(10);
    let mut b = Bucket::new(1, t1);
    assert_eq!(b.take(1.0, 1, t1), Ok(()));
    // Earlier than `last`: no tokens minted, `last` not moved back, wait counted from now.
    let wait = b.take(1.0, 1, t0).unwrap_err();
    assert_eq!(wait, Duration::from_secs(11));
    assert_eq!(b.last, t1);
    // Back at t1: still nothing; one second after t1: one token, not eleven.
    assert!(b.take(1.0, 1, t1).is_err());
    assert_eq!(b.take(1.0, 1, t1 + Duration::from_secs(1)), Ok(()));
    assert!(b.take(1.0, 1, t1 + Duration::from_secs(1)).is_err());
}

#[test]
fn bucket_with_an_unusable_rate_never_refills_or_panics() {
    let t0 = Instant::now();
    for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let mut b = Bucket::new(1, t0);
        assert_eq!(
            b.take(rate, 1, t0),
            Ok(()),
            "{rate}: the burst is still there"
        );
        let later = t0 + Duration::from_secs(1_000_000);
        assert_eq!(b.take(rate, 1, later), Err(MAX_WAIT), "{rate}");
    }
}

#[test]
fn rate_per_sec_by_unit() {
    let cases = [
        (10, Unit::Second, 10.0),
        (120, Unit::Minute, 2.0),
        (3600, Unit::Hour, 1.0),
        (1, Unit::Hour, 1.0 / 3600.0),
    ];
    for (rpu, unit, want) in cases {
        let l = limit(LimitKey::Destination, None, rpu, unit, 1);
        assert_eq!(rate_per_sec(&l), want, "{rpu}/{unit:?}");
    }
}

#[test]
fn retry_after_header_rounds_up_to_at_least_one() {
    let cases = [
        (Duration::ZERO, 1),
        (ms(1), 1),
        (ms(1000), 1),
        (ms(1001), 2),
        (ms(2500), 3),
        (Duration::from_secs(60), 60),
        (Duration::MAX, u64::MAX),
    ];
    for (d, want) in cases {
        assert_eq!(retry_after_header(d), want, "{d:?}");
    }
}

#[test]
fn limiter_picks_only_the_service_in_its_namespace() {
    let l = limiter(vec![
        rate_limit(
            "shop",
            "mine",
            "api",
            vec![per_sec(LimitKey::Destination, 1)],
        ),
        rate_limit(
            "shop",
            "other-svc",
            "web",
            vec![per_sec(LimitKey::Destination, 1)],
        ),
        rate_limit(
            "prod",
            "other-ns",
            "api",
            vec![per_sec(LimitKey::Destination, 1)],
        ),
    ]);
    assert!(!l.is_empty());
    assert_eq!(l.rules.len(), 1);
    assert_eq!(l.rules[0].name, "RateLimit/shop/mine");
    let none = limiter(vec![rate_limit(
        "prod",
        "x",
        "api",
        vec![per_sec(LimitKey::Destination, 1)],
    )]);
    assert!(none.is_empty());
    assert_eq!(none.check(None, WEB, Instant::now()), Ok(()));
}

#[test]
fn limiter_keys() {
    let t0 = Instant::now();
    // (key, requests after the first one, whether each is admitted)
    type Req = (Option<&'static str>, &'static str);
    let cases: [(LimitKey, [(Req, bool); 4]); 3] = [
        (
            LimitKey::Destination,
            [
                ((Some("a"), CLI), false),
                ((Some("b"), WEB), false),
                ((None, WEB), false),
                ((None, CLI), false),
            ],
        ),
        (
            LimitKey::Route,
            [
                ((Some("a"), CLI), false),
                ((Some("b"), WEB), true),
                // No route: a route-keyed limit does not apply.
                ((None, WEB), true),
                ((None, CLI), true),
            ],
        ),
        (
            LimitKey::SourceIdentity,
            [
                ((Some("a"), WEB), false),
                ((Some("b"), WEB), false),
                ((None, CLI), true),
                ((Some("a"), CLI), false),
            ],
        ),
    ];
    for (key, reqs) in cases {
        let l = limiter(vec![rate_limit("shop", "rl", "api", vec![per_sec(key, 1)])]);
        assert_eq!(l.check(Some("a"), WEB, t0), Ok(()), "{key:?} first");
        for ((route, caller), ok) in reqs {
            let got = l.check(route, caller, t0);
            assert_eq!(got.is_ok(), ok, "{key:?} {route:?} {caller}: {got:?}");
        }
    }
}

#[test]
fn limiter_route_filter() {
    let t0 = Instant::now();
    for key in [
        LimitKey::Destination,
        LimitKey::Route,
        LimitKey::SourceIdentity,
    ] {
        let only = limit(key, Some("canary"), 1, Unit::Second, 1);
        let l = limiter(vec![rate_limit("shop", "rl", "api", vec![only])]);
        admit(&l, Some("canary"), WEB, t0, 1);
        assert!(l.check(Some("canary"), WEB, t0).is_err(), "{key:?}");
        // Other routes and route-less requests are not limited.
        admit(&l, Some("stable"), WEB, t0, 5);
        admit(&l, None, WEB, t0, 5);
    }
}

#[test]
fn limiter_takes_from_all_limits_or_none() {
    let t0 = Instant::now();
    let l = limiter(vec![rate_limit(
        "shop",
        "rl",
        "api",
        vec![
            per_sec(LimitKey::Destination, 3),
            per_sec(LimitKey::SourceIdentity, 1),
        ],
    )]);
    admit(&l, None, WEB, t0, 1);
    // WEB's own limit refuses: the shared destination bucket must keep its 2 tokens.
    for _ in 0..5 {
        assert!(l.check(None, WEB, t0).is_err());
    }
    admit(&l, None, CLI, t0, 1);
    admit(&l, None, "spiffe://mesh.test/ns/shop/svc/third", t0, 1);
    // Now the destination limit is spent too.
    let refused = l.check(None, "spiffe://mesh.test/ns/shop/svc/fourth", t0);
    assert_eq!(refused.unwrap_err().policy, "RateLimit/shop/rl");
}

#[test]
fn limiter_retry_after_is_the_longest_wait() {
    let t0 = Instant::now();
    let l = limiter(vec![
        rate_limit(
            "shop",
            "fast",
            "api",
            vec![per_sec(LimitKey::Destination, 1)],
        ),
        rate_limit(
            "shop",
            "slow",
            "api",
            vec![limit(LimitKey::SourceIdentity, None, 1, Unit::Minute, 1)],
        ),
    ]);
    admit(&l, None, WEB, t0, 1);
    let refused = l.check(None, WEB, t0).unwrap_err();
    assert_eq!(refused.policy, "RateLimit/shop/slow");
    assert!(refused.retry_after.abs_diff(Duration::from_secs(60)) < ms(1));
    assert_eq!(retry_after_header(refused.retry_after), 60);
    // Only the fast limit refuses: its wait is reported.
    let refused = l.check(None, CLI, t0 + ms(500)).unwrap_err();
    assert_eq!(refused.policy, "RateLimit/shop/fast");
    assert!(refused.retry_after.abs_diff(ms(500)) < ms(1));
}

#[test]
fn keyed_evicts_the_longest_idle_bucket() {
    let t0 = Instant::now();
    let mut k = Keyed::new(2);
    k.take("a", 1.0, 1, t0);
    k.take("b", 1.0, 1, t0 + ms(1));
    // "a" is refused later, which still counts as activity: "b" is now the idlest.
    assert!(k.peek("a", 1.0, 1, t0 + ms(2)).is_err());
    k.touch("a", t0 + ms(2));
    k.take("c", 1.0, 1, t0 + ms(3));
    assert_eq!(k.entries.len(), 2);
    assert_eq!(k.idle.len(), 2);
    assert!(
        k.peek("a", 1.0, 1, t0 + ms(3)).is_err(),
        "a kept, still drained"
    );
    assert_eq!(
        k.peek("b", 1.0, 1, t0 + ms(3)),
        Ok(()),
        "b evicted: full again"
    );
    assert!(!k.entries.contains_key("b"));
    // A touch with an older `now` does not reorder.
    k.touch("a", t0);
    assert_eq!(k.idle.first().map(|(t, _)| *t), Some(t0 + ms(2)));
}

#[test]
fn limiter_caps_per_caller_buckets() {
    let t0 = Instant::now();
    let l = limiter(vec![rate_limit(
        "shop",
        "rl",
        "api",
        vec![per_sec(LimitKey::SourceIdentity, 1)],
    )]);
    admit(&l, None, WEB, t0, 1);
    let flood = MAX_BUCKETS_PER_LIMIT + 10;
    for i in 0..flood {
        let now = t0 + Duration::from_nanos(u64::try_from(i).unwrap() + 1);
        admit(
            &l,
            None,
            &format!("spiffe://mesh.test/ns/x/svc/s{i}"),
            now,
            1,
        );
    }
    let buckets = l.buckets.lock().unwrap();
    assert_eq!(buckets[0].entries.len(), MAX_BUCKETS_PER_LIMIT);
    assert_eq!(buckets[0].idle.len(), MAX_BUCKETS_PER_LIMIT);
    assert!(
        !buckets[0].entries.contains_key(WEB),
        "the idlest went first"
    );
    assert!(
        buckets[0]
            .entries
            .contains_key("spiffe://mesh.test/ns/x/svc/s10009")
    );
}

#[test]
fn carry_over_keeps_unchanged_limits_only() {
    let t0 = Instant::now();
    let dest = per_sec(LimitKey::Destination, 1);
    let caller = per_sec(LimitKey::SourceIdentity, 1);
    let old = limiter(vec![
        rate_limit("shop", "a", "api", vec![dest.clone(), caller.clone()]),
        rate_limit("shop", "b", "api", vec![dest.clone()]),
        rate_limit("shop", "c", "api", vec![dest.clone()]),
    ]);
    admit(&old, None, WEB, t0, 1);
    assert!(old.check(None, WEB, t0).is_err());
    let changed = limit(LimitKey::Destination, None, 2, Unit::Second, 1);
    let mut new = limiter(vec![
        // Unchanged.
        rate_limit("shop", "a", "api", vec![dest.clone(), caller.clone()]),
        // Value changed.
        rate_limit("shop", "b", "api", vec![changed]),
        // Same value, different position.
        rate_limit("shop", "c", "api", vec![caller, dest]),
    ]);
    new.carry_over(&old);
    // (policy, limit index, drained?)
    let want = [
        ("a", 0, true),
        ("a", 1, true),
        ("b", 0, false),
        ("c", 0, false),
        ("c", 1, false),
    ];
    let buckets = new.buckets.lock().unwrap();
    for ((rule, keyed), (name, index, drained)) in new.rules.iter().zip(buckets.iter()).zip(want) {
        assert_eq!((rule.policy.name.as_str(), rule.index), (name, index));
        let key = rule.bucket(None, WEB).unwrap();
        let got = keyed.peek(key, rule.rate, rule.limit.burst, t0).is_err();
        assert_eq!(got, drained, "{name}[{index}]");
    }
    drop(buckets);
    assert_eq!(
        new.check(None, WEB, t0).unwrap_err().policy,
        "RateLimit/shop/a"
    );
}
