//! Load balancing and endpoint health: subset and locality filtering, picking one endpoint
//! (round robin, random, least request, peak EWMA), live per-endpoint stats, and outlier
//! detection with its ejection cap. Decisions are pure functions; `Stats`, `Reachability` and
//! `Outlier` only hold the state they read.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use mesh_api::policy::{LoadBalancer, OutlierDetection};
use rand::Rng as _;

use crate::membership::Endpoint;

/// Latency assumed for an endpoint that has never answered, in nanoseconds (30 ms, Linkerd's
/// default RTT estimate). It sits above typical in-datacenter latencies so a fresh (maybe
/// cold) endpoint is not preferred over endpoints known to be fast while they are idle, yet it
/// wins as soon as those are loaded enough to cost more; each request in flight to it adds
/// another 30 ms to its cost, so it cannot swallow a burst before its first answer.
pub const DEFAULT_EWMA_NS: f64 = 30_000_000.0;

/// Time constant of the peak-EWMA decay (Linkerd's): a sample `DECAY` old weighs 1/e.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

/// Largest ejection multiplier: the n-th ejection in a row lasts `base_ejection_time × n`,
/// n at most this (10 × Istio's 30 s base = Envoy's 300 s `max_ejection_time`).
pub const MAX_EJECTION_MULTIPLIER: u32 = 10;

/// Whether `ep` carries every one of `labels` (an empty set selects every endpoint).
pub fn in_subset(ep: &Endpoint, labels: &BTreeMap<String, String>) -> bool {
    labels.iter().all(|(k, v)| ep.labels.get(k) == Some(v))
}

/// What the picker knows about one candidate endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Cand {
    /// Requests (or connections) currently outstanding.
    pub in_flight: u64,
    /// Peak-EWMA latency in nanoseconds; 0 (or anything not positive) = never measured.
    pub ewma_ns: f64,
}

/// Linkerd's peak-EWMA cost of a candidate: latency × (outstanding + 1), with
/// [`DEFAULT_EWMA_NS`] standing in for an endpoint never measured.
pub fn cost(c: &Cand) -> f64 {
    // `> 0.0` is false for NaN too, so garbage never wins by comparing as "cheap".
    let ewma = if c.ewma_ns > 0.0 {
        c.ewma_ns
    } else {
        DEFAULT_EWMA_NS
    };
    // u64 → f64 rounds above 2^53 in-flight requests, which cannot happen.
    let load = c.in_flight as f64 + 1.0;
    ewma * load
}

/// Picks the index of one of `cands`, `None` if there are none.
///
/// `cursor` drives round robin (the caller increments it per pick); `rand(n)` must return a
/// uniform index in `0..n` (out-of-range answers are wrapped, never trusted). Least request
/// and EWMA use the power of two choices: two distinct random candidates, the cheaper wins,
/// a tie goes to the first drawn (so ties stay random rather than favouring low indexes).
pub fn pick(
    lb: LoadBalancer,
    cands: &[Cand],
    cursor: usize,
    rand: &mut dyn FnMut(usize) -> usize,
) -> Option<usize> {
    let len = cands.len();
    if len == 0 {
        return None;
    }
    let mut draw = |n: usize| rand(n) % n;
    let p2c = |draw: &mut dyn FnMut(usize) -> usize, cheaper: fn(&Cand, &Cand) -> bool| {
        if len == 1 {
            return 0;
        }
        let a = draw(len);
        // Drawing from len-1 and skipping `a` gives a uniform second index distinct from it.
        let mut b = draw(len - 1);
        if b >= a {
            b += 1;
        }
        if cheaper(&cands[b], &cands[a]) { b } else { a }
    };
    Some(match lb {
        LoadBalancer::RoundRobin => cursor % len,
        LoadBalancer::Random => draw(len),
        LoadBalancer::LeastRequest => p2c(&mut draw, |b, a| b.in_flight < a.in_flight),
        LoadBalancer::Ewma => p2c(&mut draw, |b, a| cost(b) < cost(a)),
    })
}

/// A uniform index in `0..n` from the thread's RNG (0 when `n` is 0), the `rand` for [`pick`].
pub fn random_index(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    rand::rng().random_range(0..n)
}

/// Moves `from` toward `toward` by the time-based EWMA weight: after `elapsed`, `from` keeps
/// weight `exp(-elapsed / EWMA_DECAY)`.
pub fn decay(from: f64, toward: f64, elapsed: Duration) -> f64 {
    let w = (-elapsed.as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp();
    from * w + toward * (1.0 - w)
}

/// One peak-EWMA step: a sample above the estimate (or the first sample) replaces it at once,
/// so a slowing endpoint is avoided immediately; a lower one only pulls it down gradually.
pub fn peak_ewma(prior_ns: f64, sample_ns: f64, elapsed: Duration) -> f64 {
    if prior_ns <= 0.0 || prior_ns.is_nan() || sample_ns > prior_ns {
        sample_ns
    } else {
        decay(prior_ns, sample_ns, elapsed)
    }
}

/// Live stats of one endpoint, shared by every task using it. Lock-free: plain atomics.
#[derive(Debug)]
pub struct Stats {
    in_flight: AtomicU64,
    /// f64 bits of the peak-EWMA estimate; 0.0 = never measured.
    ewma_bits: AtomicU64,
    /// When the estimate was last updated, in ns since `epoch`.
    updated_ns: AtomicU64,
    /// Instants cannot live in atomics, so times are kept as offsets from this.
    epoch: Instant,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Fresh stats: nothing in flight, never measured.
    pub fn new() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            ewma_bits: AtomicU64::new(0.0_f64.to_bits()),
            updated_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Counts one request (or connection) as outstanding until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        // Relaxed everywhere: these are load hints, nothing else is ordered by them.
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats: Arc::clone(self),
        }
    }

    /// Requests currently outstanding.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The stored peak-EWMA latency in ns as of the last sample; 0 if never measured.
    pub fn ewma_ns(&self) -> f64 {
        f64::from_bits(self.ewma_bits.load(Ordering::Relaxed))
    }

    /// Feeds one latency sample (see [`peak_ewma`]).
    ///
    /// Load-compute-store without a CAS loop: two racing samples may lose one. That is fine
    /// for a load hint, and it keeps the hot path to a few uncontended atomic operations.
    pub fn observe(&self, latency: Duration, now: Instant) {
        // At least 1 ns so a measured endpoint never reads as "never measured" (0).
        let sample = (latency.as_nanos() as f64).max(1.0);
        let now_ns = self.offset(now);
        let elapsed =
            Duration::from_nanos(now_ns.saturating_sub(self.updated_ns.load(Ordering::Relaxed)));
        let next = peak_ewma(self.ewma_ns(), sample, elapsed);
        self.ewma_bits.store(next.to_bits(), Ordering::Relaxed);
        self.updated_ns.store(now_ns, Ordering::Relaxed);
    }

    /// The candidate as the picker should see it at `now`.
    ///
    /// The estimate relaxes toward [`DEFAULT_EWMA_NS`] while no samples arrive. Without this,
    /// one slow peak would price an endpoint out for good: it gets no traffic, so no sample
    /// ever lowers it. Relaxing to "unknown" (not to 0) lets it be retried without flooding.
    pub fn cand(&self, now: Instant) -> Cand {
        let ewma = self.ewma_ns();
        let ewma_ns = if ewma > 0.0 {
            let idle = self
                .offset(now)
                .saturating_sub(self.updated_ns.load(Ordering::Relaxed));
            decay(ewma, DEFAULT_EWMA_NS, Duration::from_nanos(idle))
        } else {
            0.0
        };
        Cand {
            in_flight: self.in_flight(),
            ewma_ns,
        }
    }

    fn offset(&self, t: Instant) -> u64 {
        // u64 nanoseconds last 584 years of uptime.
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One outstanding request on an endpoint; dropping it ends the request.
#[derive(Debug)]
#[must_use = "the request counts as outstanding only while the guard lives"]
pub struct InFlight {
    stats: Arc<Stats>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one request (or connection attempt) to an endpoint ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Anything that is not a server failure (including 4xx).
    Success,
    /// An HTTP 5xx status (codes outside 500..=599 count as [`Outcome::Success`]).
    Status5xx(u16),
    /// Connecting failed (refused, timed out, TLS/identity failure).
    ConnectFailure,
}

/// Outlier-detection state of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outlier {
    /// 5xx or connect failures in a row.
    pub consecutive_5xx: u32,
    /// 502/503/504 or connect failures in a row.
    pub consecutive_gateway: u32,
    /// Ejections in a row, as of the last ejection (decayed lazily, see [`Outlier::record`]).
    pub ejections: u32,
    /// End of the current or last ejection.
    pub ejected_until: Option<Instant>,
}

impl Outlier {
    /// Counts `outcome`; returns how long the endpoint is now ejected for, if it just was.
    ///
    /// Following Envoy/Istio: any 5xx and connect failures count toward `consecutive_5xx`
    /// (so TCP services are covered by the default trigger); 502/503/504 and connect failures
    /// toward `consecutive_gateway_errors`, which another 5xx interrupts; a success resets
    /// both. A threshold of 0 is off. Reaching a threshold ejects only if `may_eject` (the
    /// cap, see [`may_eject`]); if not, the counters keep counting so the next failure tries
    /// again once there is room. Ejecting resets the counters and lasts `base_ejection_time ×
    /// n`, n the ejections in a row (at most [`MAX_EJECTION_MULTIPLIER`]). As Envoy's backoff,
    /// n drops by one per `interval` spent back in service (applied when the next ejection
    /// happens; an `interval` of 0 never decays it). Outcomes arriving while ejected (requests
    /// started before) are ignored so the endpoint returns with a clean slate.
    pub fn record(
        &mut self,
        outcome: Outcome,
        cfg: &OutlierDetection,
        now: Instant,
        may_eject: bool,
    ) -> Option<Duration> {
        if self.is_ejected(now) {
            return None;
        }
        match outcome {
            Outcome::Status5xx(code @ 500..=599) => {
                self.consecutive_5xx = self.consecutive_5xx.saturating_add(1);
                if matches!(code, 502..=504) {
                    self.consecutive_gateway = self.consecutive_gateway.saturating_add(1);
                } else {
                    self.consecutive_gateway = 0;
                }
            }
            Outcome::ConnectFailure => {
                self.consecutive_5xx = self.consecutive_5xx.saturating_add(1);
                self.consecutive_gateway = self.consecutive_gateway.saturating_add(1);
            }
            Outcome::Success | Outcome::Status5xx(_) => {
                self.consecutive_5xx = 0;
                self.consecutive_gateway = 0;
                return None;
            }
        }
        let tripped = |count: u32, threshold: u32| threshold > 0 && count >= threshold;
        let trip = tripped(self.consecutive_5xx, cfg.consecutive_5xx)
            || tripped(self.consecutive_gateway, cfg.consecutive_gateway_errors);
        if !trip || !may_eject {
            return None;
        }
        if let Some(back_at) = self.ejected_until
            && !cfg.interval.is_zero()
        {
            let good = now.saturating_duration_since(back_at).as_nanos() / cfg.interval.as_nanos();
            let good = u32::try_from(good).unwrap_or(u32::MAX);
            self.ejections = self.ejections.saturating_sub(good);
        }
        self.ejections = self
            .ejections
            .saturating_add(1)
            .min(MAX_EJECTION_MULTIPLIER);
        let time = cfg.base_ejection_time.saturating_mul(self.ejections);
        self.ejected_until = Some(now + time);
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        Some(time)
    }

    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// The ejection cap: whether one more of `total` endpoints may be ejected when `ejected_now`
/// already are, keeping ejected ≤ `max_percent`% of `total`. At least one endpoint may always
/// be ejected (Envoy/Istio), but never the last one standing: with fewer than two endpoints,
/// or when every other one is already out, ejecting could only turn errors into 503s.
pub fn may_eject(ejected_now: usize, total: usize, max_percent: u32) -> bool {
    if ejected_now.saturating_add(1) >= total {
        return false;
    }
    if ejected_now == 0 {
        return true;
    }
    // usize → u128 is lossless on every platform; u128 cannot overflow here.
    (ejected_now as u128 + 1) * 100 <= u128::from(max_percent) * total as u128
}

/// How long an endpoint is skipped after the `failures`-th refused or timed-out connect in a
/// row (counting from 1): [`UNREACHABLE_BASE`], doubling, at most [`UNREACHABLE_MAX`].
pub fn unreachable_for(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(UNREACHABLE_MAX_DOUBLINGS);
    UNREACHABLE_BASE
        .saturating_mul(1 << doublings)
        .min(UNREACHABLE_MAX)
}

/// First skip of an endpoint whose connect failed: long enough that a burst of requests does
/// not each pay for the same dead endpoint, short enough that a restarted host (same address)
/// is used again within a second. Gossip removes a dead host within seconds anyway; this only
/// covers the time until it does, with no policy needed.
pub const UNREACHABLE_BASE: Duration = Duration::from_secs(1);
/// Longest skip: an endpoint gossip still lists but nobody can connect to (a firewall, a
/// crashed meshd whose host still gossips) is probed by one connect this often.
pub const UNREACHABLE_MAX: Duration = Duration::from_secs(30);
/// 1 s × 2^5 = 32 s ≥ [`UNREACHABLE_MAX`]: more doublings cannot change the result.
const UNREACHABLE_MAX_DOUBLINGS: u32 = 5;

/// Whether connects to an endpoint are failing: set by a refused or timed-out connect, cleared
/// by a successful one. Lock-free, as it is read for every candidate of every pick.
#[derive(Debug)]
pub struct Reachability {
    /// Connect failures in a row that marked the endpoint (failures while it was already
    /// marked do not count, so a burst of requests does not stretch the skip).
    failures: AtomicU64,
    /// End of the skip, in ns since `epoch`; 0 = not marked.
    until_ns: AtomicU64,
    epoch: Instant,
}

impl Default for Reachability {
    fn default() -> Self {
        Self {
            failures: AtomicU64::new(0),
            until_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Reachability {
    /// Counts a failed connect at `now`; returns how long the endpoint is now skipped, or
    /// `None` if it was already being skipped (another request's connect failed first).
    pub fn failed(&self, now: Instant) -> Option<Duration> {
        if self.is_unreachable(now) {
            return None;
        }
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let skip = unreachable_for(u32::try_from(n).unwrap_or(u32::MAX));
        let until = self.offset(now + skip);
        self.until_ns.store(until, Ordering::Relaxed);
        Some(skip)
    }

    /// Counts a successful connect: the endpoint is reachable again.
    pub fn connected(&self) {
        // Two relaxed stores; checking first keeps the common case (never failed) read-only.
        if self.until_ns.load(Ordering::Relaxed) != 0 {
            self.until_ns.store(0, Ordering::Relaxed);
        }
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the endpoint is being skipped at `now`.
    pub fn is_unreachable(&self, now: Instant) -> bool {
        self.offset(now) < self.until_ns.load(Ordering::Relaxed)
    }

    fn offset(&self, t: Instant) -> u64 {
        // At least 1: 0 means "not marked", and a mark made at the epoch must still count.
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// Everything kept about one endpoint of one service.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Load and latency (lock-free). In an `Arc` so [`Stats::start`] guards can outlive a
    /// borrow of this state.
    pub stats: Arc<Stats>,
    /// Outlier detection. Never hold this lock while calling [`record`].
    pub outlier: Mutex<Outlier>,
    /// Whether connects to it are failing (no policy needed).
    pub reachability: Reachability,
}

impl EndpointState {
    /// Whether outlier detection has ejected the endpoint at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        (self.outlier.lock())
            .map(|o| o.is_ejected(now))
            .unwrap_or_else(|poisoned| poisoned.into_inner().is_ejected(now))
    }
}

/// One endpoint of a service with its load and health state, as a request's pick reads them.
#[derive(Debug)]
pub struct Target {
    /// What gossip says about the endpoint.
    pub endpoint: Endpoint,
    /// Its state on this node.
    pub state: Arc<EndpointState>,
}

impl Borrow<Endpoint> for Target {
    fn borrow(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// Records `outcome` for `targets[i]`, applying the ejection cap over all of `targets` (the
/// destination's endpoints); returns the ejection time if it was just ejected.
pub fn record(
    targets: &[Target],
    i: usize,
    outcome: Outcome,
    cfg: &OutlierDetection,
    now: Instant,
) -> Option<Duration> {
    // Successes never eject, so they skip the O(endpoints) count. The count locks each
    // outlier in turn, never two at once, and before `targets[i]`'s is held.
    let may = outcome != Outcome::Success
        && may_eject(
            targets.iter().filter(|t| t.state.is_ejected(now)).count(),
            targets.len(),
            cfg.max_ejection_percent,
        );
    let mut outlier = (targets[i].state.outlier.lock()).unwrap_or_else(PoisonError::into_inner);
    outlier.record(outcome, cfg, now, may)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
