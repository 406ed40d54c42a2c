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
mod tests;
