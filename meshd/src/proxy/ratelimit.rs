//! Local rate limiting: the token buckets behind RateLimit resources, checked per HTTP request
//! by the destination's inbound meshd, and the `retry-after` of the 429 a refused request gets.
//!
//! Each meshd counts only the requests it handles itself: a limit is per instance of the
//! service, not shared across the mesh (no coordination on the request path).
//!
//! The decisions are pure: [`Bucket`] and [`Limiter::check`] take `now` from the caller, so
//! tests drive time by hand and nothing here reads a clock or sleeps.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use mesh_api::ServiceKey;
use mesh_api::policy::{Kind, Limit, LimitKey, ResourceKey, Snapshot, Spec, Unit};

/// Most buckets one limit keeps: one per caller identity (`source_identity`) or per route name
/// (`route`). Past it the longest-idle bucket is dropped, so a flood of distinct identities
/// cannot grow memory without bound. Dropping an idle bucket loses little: idle long enough,
/// it would have refilled to full anyway.
pub const MAX_BUCKETS_PER_LIMIT: usize = 10_000;

/// Longest wait a refusal reports: one token at the slowest rate a RateLimit can express
/// (1 per hour). Also the answer when the rate is unusable (zero, negative, not finite), so a
/// corrupt limit refuses with a finite `retry-after` instead of overflowing a `Duration`.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Smallest `retry-after` header value, in seconds: `0` would invite an immediate retry that is
/// still refused.
pub const MIN_RETRY_AFTER_SECS: u64 = 1;

/// Float slack when asking "is there a whole token?": `rate × elapsed` for exactly one token's
/// worth of time can land a hair under 1.0 (e.g. 10/s × 0.1 s), which would refuse a request
/// that is on time. A billionth of a token is never noticeable.
const TOKEN_EPSILON: f64 = 1e-9;

// === Bucket ===

/// A token bucket: holds up to `burst` tokens, refills at a steady rate, and each request takes
/// one. The rate and burst are passed on every call (they belong to the limit, not the state),
/// so the same state keeps working when a policy push changes neither.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Tokens at `last`; fractional between refills, never negative, never above the burst.
    tokens: f64,
    /// When `tokens` was last brought up to date; only ever moves forward.
    last: Instant,
}

impl Bucket {
    /// A full bucket at `now`: a fresh caller may burst straight away. A `burst` of 0 counts as
    /// 1, since a bucket that can never hold a token would refuse forever while still
    /// advertising a finite `retry-after`.
    pub fn new(burst: u32, now: Instant) -> Self {
        Self {
            tokens: capacity(burst),
            last: now,
        }
    }

    /// Refills `rate_per_sec × elapsed` (capped at `burst`) and takes one token, or returns how
    /// long from `now` until one token will be there (nothing is taken then).
    pub fn take(&mut self, rate_per_sec: f64, burst: u32, now: Instant) -> Result<(), Duration> {
        self.peek(rate_per_sec, burst, now)?;
        let (tokens, last) = self.refilled(rate_per_sec, burst, now);
        self.tokens = (tokens - 1.0).max(0.0);
        self.last = last;
        Ok(())
    }

    /// What [`Bucket::take`] would answer at `now`, without changing the bucket: lets a caller
    /// check several buckets before taking from any.
    pub fn peek(&self, rate_per_sec: f64, burst: u32, now: Instant) -> Result<(), Duration> {
        let (tokens, last) = self.refilled(rate_per_sec, burst, now);
        if tokens + TOKEN_EPSILON >= 1.0 {
            return Ok(());
        }
        let refill = if usable(rate_per_sec) {
            Duration::try_from_secs_f64((1.0 - tokens) / rate_per_sec).unwrap_or(MAX_WAIT)
        } else {
            MAX_WAIT
        };
        // When `now` is behind `last`, the token comes `refill` after `last`, not after `now`.
        Err(refill
            .saturating_add(last.saturating_duration_since(now))
            .min(MAX_WAIT))
    }

    /// The tokens and timestamp after refilling up to `now`. A `now` earlier than `last` (another
    /// task read the clock first but got the lock later) adds nothing and does not move `last`
    /// back: moving it back would count the same interval twice at the next call and mint tokens.
    fn refilled(&self, rate_per_sec: f64, burst: u32, now: Instant) -> (f64, Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let gained = if usable(rate_per_sec) {
            elapsed.as_secs_f64() * rate_per_sec
        } else {
            0.0
        };
        let tokens = (self.tokens + gained).min(capacity(burst));
        (tokens, self.last.max(now))
    }
}

/// A bucket's size in tokens (see [`Bucket::new`] for why 0 counts as 1).
fn capacity(burst: u32) -> f64 {
    f64::from(burst.max(1))
}

/// Whether a rate can refill a bucket; anything else (0, negative, NaN, infinite) refills nothing
/// rather than minting tokens or panicking in `Duration` arithmetic.
fn usable(rate_per_sec: f64) -> bool {
    rate_per_sec.is_finite() && rate_per_sec > 0.0
}

/// A limit's sustained rate in tokens per second.
pub fn rate_per_sec(limit: &Limit) -> f64 {
    let unit_secs = match limit.unit {
        Unit::Second => 1.0,
        Unit::Minute => 60.0,
        Unit::Hour => 3600.0,
    };
    f64::from(limit.requests_per_unit) / unit_secs
}

/// The `retry-after` header value for a wait: whole seconds rounded up (retrying at the floor
/// would come back too early and be refused again), at least [`MIN_RETRY_AFTER_SECS`].
pub fn retry_after_header(d: Duration) -> u64 {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    secs.max(MIN_RETRY_AFTER_SECS)
}

// === Limiter ===

/// A refused request: answer 429 with `retry-after: retry_after_header(retry_after)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// The longest wait among the limits that refused: retrying sooner is refused again.
    pub retry_after: Duration,
    /// The resource of the limit with that wait, as `RateLimit/namespace/name`.
    pub policy: String,
}

impl fmt::Display for Limited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limited by {}; retry after {:?}",
            self.policy, self.retry_after
        )
    }
}

/// Every rate limit of one local service, with its buckets.
///
/// All buckets sit behind one `Mutex`, so [`Limiter::check`] can look at every applicable limit
/// and then take from all of them or from none: a request refused by one limit must not spend
/// tokens of another. A single lock is acceptable on the request path because it is held only
/// for a few hash lookups and float operations per limit (no I/O, no `await`, no allocation
/// except for a caller's or route's first bucket), and it is per service, not global.
#[derive(Debug)]
pub struct Limiter {
    /// The limits, in snapshot order (resource key, then position in `limits`).
    rules: Vec<Rule>,
    /// `buckets[i]` holds the buckets of `rules[i]`.
    buckets: Mutex<Vec<Keyed>>,
}

/// One limit and where it came from.
#[derive(Debug)]
struct Rule {
    /// The RateLimit resource holding the limit.
    policy: ResourceKey,
    /// The limit's position in the resource's `limits`.
    index: usize,
    /// The limit itself.
    limit: Limit,
    /// `rate_per_sec(&limit)`, computed once.
    rate: f64,
    /// `policy` as text, for [`Limited::policy`] without formatting on every refusal.
    name: String,
}

impl Limiter {
    /// The limits of every RateLimit in `service`'s namespace whose `service` is its name, with
    /// all buckets full.
    pub fn new(snapshot: &Snapshot, service: &ServiceKey) -> Limiter {
        let mut rules = Vec::new();
        for resource in snapshot.in_namespace(Kind::RateLimit, &service.namespace) {
            let Spec::RateLimit(rl) = &resource.spec else {
                continue;
            };
            if rl.service != service.name {
                continue;
            }
            for (index, limit) in rl.limits.iter().enumerate() {
                rules.push(Rule {
                    policy: resource.key.clone(),
                    index,
                    limit: limit.clone(),
                    rate: rate_per_sec(limit),
                    name: resource.key.to_string(),
                });
            }
        }
        let buckets = rules
            .iter()
            .map(|_| Keyed::new(MAX_BUCKETS_PER_LIMIT))
            .collect();
        Limiter {
            rules,
            buckets: Mutex::new(buckets),
        }
    }

    /// Whether no limit applies to the service: the caller may skip [`Limiter::check`].
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides one request: `route` is the name of the Route entry that matched (if any),
    /// `caller` the caller's verified SPIFFE ID. Admitted only when every applicable limit has a
    /// token, and then one is taken from each; refused otherwise, with nothing taken.
    ///
    /// A limit with `route` set applies only to requests of that route. A `route`-keyed limit
    /// counts per route name and skips requests without one; a `source_identity` limit counts
    /// per caller; a `destination` limit counts all requests together.
    pub fn check(&self, route: Option<&str>, caller: &str, now: Instant) -> Result<(), Limited> {
        if self.rules.is_empty() {
            return Ok(());
        }
        // The state is valid after any panic (each update is a few plain field writes), so a
        // poisoned lock is used as is rather than disabling rate limiting.
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let mut refused: Option<(Duration, &Rule)> = None;
        for (rule, keyed) in self.rules.iter().zip(buckets.iter()) {
            let Some(key) = rule.bucket(route, caller) else {
                continue;
            };
            if let Err(wait) = keyed.peek(key, rule.rate, rule.limit.burst, now)
                && refused.is_none_or(|(longest, _)| wait > longest)
            {
                refused = Some((wait, rule));
            }
        }
        let admit = refused.is_none();
        for (rule, keyed) in self.rules.iter().zip(buckets.iter_mut()) {
            let Some(key) = rule.bucket(route, caller) else {
                continue;
            };
            if admit {
                keyed.take(key, rule.rate, rule.limit.burst, now);
            } else {
                keyed.touch(key, now);
            }
        }
        drop(buckets);
        match refused {
            None => Ok(()),
            Some((retry_after, rule)) => Err(Limited {
                retry_after,
                policy: rule.name.clone(),
            }),
        }
    }

    /// Takes over the bucket state of `old` (the limiter of the previous policy snapshot) for
    /// every limit that is unchanged: same resource, same position in `limits`, equal value.
    /// Without it every policy push would refill every bucket. Changed, moved and new limits
    /// start full.
    ///
    /// Call it just before replacing `old`: requests `old` admits after the copy are not seen
    /// by `self`, a window of at most the requests of one swap.
    pub fn carry_over(&mut self, old: &Limiter) {
        let old_buckets = old.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let new_buckets = self
            .buckets
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (rule, keyed) in self.rules.iter().zip(new_buckets.iter_mut()) {
            let same = old.rules.iter().zip(old_buckets.iter()).find(|(o, _)| {
                o.policy == rule.policy && o.index == rule.index && o.limit == rule.limit
            });
            if let Some((_, state)) = same {
                keyed.clone_from(state);
            }
        }
    }
}

impl Rule {
    /// Which of this limit's buckets a request counts against, or `None` when the limit does not
    /// apply to it. Destination limits have one bucket, under the empty key.
    fn bucket<'a>(&self, route: Option<&'a str>, caller: &'a str) -> Option<&'a str> {
        if let Some(only) = &self.limit.route
            && route != Some(only.as_str())
        {
            return None;
        }
        match self.limit.key {
            LimitKey::Destination => Some(""),
            LimitKey::Route => route,
            LimitKey::SourceIdentity => Some(caller),
        }
    }
}

// === Keyed ===

/// One limit's buckets by key (caller, route name, or `""`), at most `cap` of them. A missing
/// bucket is a full one: it is created only when a request is admitted, so refused requests and
/// the limits they never reached allocate nothing.
#[derive(Debug, Clone)]
struct Keyed {
    /// Most entries kept; at least 1.
    cap: usize,
    /// The buckets, with when each key was last seen.
    entries: HashMap<Arc<str>, Entry>,
    /// Every `(seen, key)` of `entries`, oldest first: finds the longest-idle bucket in
    /// O(log n) instead of scanning up to `cap` entries under the lock on every new caller.
    idle: BTreeSet<(Instant, Arc<str>)>,
}

/// One bucket and its last request.
#[derive(Debug, Clone)]
struct Entry {
    /// The bucket.
    bucket: Bucket,
    /// The latest request for this key, admitted or refused: a caller being refused is active,
    /// and evicting it would hand it a full bucket.
    seen: Instant,
}

impl Keyed {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            entries: HashMap::new(),
            idle: BTreeSet::new(),
        }
    }

    /// [`Bucket::peek`] on the bucket of `key`.
    fn peek(&self, key: &str, rate: f64, burst: u32, now: Instant) -> Result<(), Duration> {
        match self.entries.get(key) {
            Some(entry) => entry.bucket.peek(rate, burst, now),
            // A full bucket holds at least one token.
            None => Ok(()),
        }
    }

    /// Takes a token from the bucket of `key`, creating it (and evicting the longest-idle one
    /// when full) if needed. Only called after [`Keyed::peek`] at the same `now` said yes.
    fn take(&mut self, key: &str, rate: f64, burst: u32, now: Instant) {
        if let Some(entry) = self.entries.get_mut(key) {
            // Cannot fail: peek at the same `now` saw a token, and nothing ran in between.
            let _ = entry.bucket.take(rate, burst, now);
            self.touch(key, now);
            return;
        }
        while self.entries.len() >= self.cap {
            let Some((_, oldest)) = self.idle.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        let mut bucket = Bucket::new(burst, now);
        // Cannot fail: a new bucket is full.
        let _ = bucket.take(rate, burst, now);
        let key: Arc<str> = Arc::from(key);
        self.idle.insert((now, Arc::clone(&key)));
        self.entries.insert(key, Entry { bucket, seen: now });
    }

    /// Records a request for `key` at `now` (if it has a bucket), moving it to the young end.
    fn touch(&mut self, key: &str, now: Instant) {
        let Some((key, entry)) = self.entries.get_key_value(key) else {
            return;
        };
        let (key, old) = (Arc::clone(key), entry.seen);
        if now <= old {
            return;
        }
        self.idle.remove(&(old, Arc::clone(&key)));
        self.idle.insert((now, Arc::clone(&key)));
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.seen = now;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
        for ((rule, keyed), (name, index, drained)) in
            new.rules.iter().zip(buckets.iter()).zip(want)
        {
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
}
