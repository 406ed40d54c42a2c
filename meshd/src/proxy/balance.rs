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

use mesh_api::policy::{LoadBalancer, Locality, OutlierDetection};
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

/// Narrows `candidates` (already usable and not ejected) to the caller's locality.
///
/// Enabled: the caller's zone (same datacenter *and* zone, since zone names repeat across
/// datacenters) if it has any candidate. Otherwise, with `failover`, the caller's datacenter
/// if it has any, else everything. Without `failover` only same-zone endpoints are ever used,
/// so the result may be empty and the caller answers 503: that is what turning failover off
/// asks for (keep traffic in the zone even when it hurts). Disabled: all candidates.
pub fn by_locality<'a, T: Borrow<Endpoint>>(
    candidates: &[&'a T],
    dc: &str,
    zone: &str,
    locality: &Locality,
) -> Vec<&'a T> {
    if !locality.enabled {
        return candidates.to_vec();
    }
    let same_dc = |ep: &&&T| (**ep).borrow().datacenter == dc;
    let same_zone: Vec<_> = candidates
        .iter()
        .filter(same_dc)
        .filter(|ep| (**ep).borrow().zone == zone)
        .copied()
        .collect();
    if !same_zone.is_empty() || !locality.failover {
        return same_zone;
    }
    let same_dc: Vec<_> = candidates.iter().filter(same_dc).copied().collect();
    if !same_dc.is_empty() {
        return same_dc;
    }
    candidates.to_vec()
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
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn ep(port: u16, dc: &str, zone: &str, labels: &[(&str, &str)]) -> Endpoint {
        Endpoint {
            node: format!("n{port}"),
            addr: std::net::SocketAddr::from(([10, 0, 0, 1], port)),
            datacenter: dc.to_owned(),
            zone: zone.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            protocol: Protocol::Http,
            healthy: true,
            draining: false,
        }
    }

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// A deterministic xorshift64 "uniform" index source.
    fn seeded(mut state: u64) -> impl FnMut(usize) -> usize {
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % n as u64).unwrap()
        }
    }

    /// Answers `rand` calls from a fixed script.
    fn script(answers: &[usize]) -> impl FnMut(usize) -> usize + '_ {
        let mut i = 0;
        move |_| {
            i += 1;
            answers[i - 1]
        }
    }

    fn od(c5xx: u32, gateway: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: c5xx,
            consecutive_gateway_errors: gateway,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }

    #[test]
    fn subset_membership() {
        let e = ep(1, "dc", "z", &[("version", "v2"), ("track", "canary")]);
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], true),
            (&[("version", "v2")], true),
            (&[("version", "v2"), ("track", "canary")], true),
            (&[("version", "v1")], false),
            (&[("version", "v2"), ("region", "eu")], false),
        ];
        for (want, expected) in cases {
            assert_eq!(in_subset(&e, &labels(want)), *expected, "{want:?}");
        }
    }

    #[test]
    fn locality_table() {
        let local = ep(1, "dc1", "a", &[]);
        let same_dc = ep(2, "dc1", "b", &[]);
        let other_dc = ep(3, "dc2", "a", &[]); // same zone *name*, other datacenter
        let on = |failover| Locality {
            enabled: true,
            failover,
        };
        let off = Locality {
            enabled: false,
            failover: true,
        };
        type Case<'a> = (&'a str, Vec<&'a Endpoint>, Locality, Vec<u16>);
        let cases: Vec<Case<'_>> = vec![
            (
                "zone wins",
                vec![&other_dc, &same_dc, &local],
                on(true),
                vec![1],
            ),
            ("dc next", vec![&other_dc, &same_dc], on(true), vec![2]),
            ("then all", vec![&other_dc], on(true), vec![3]),
            ("nothing", vec![], on(true), vec![]),
            (
                "no failover: zone",
                vec![&same_dc, &local],
                on(false),
                vec![1],
            ),
            (
                "no failover: empty",
                vec![&other_dc, &same_dc],
                on(false),
                vec![],
            ),
            (
                "disabled",
                vec![&other_dc, &same_dc, &local],
                off,
                vec![3, 2, 1],
            ),
        ];
        for (name, cands, loc, want) in cases {
            let got: Vec<u16> = by_locality(&cands, "dc1", "a", &loc)
                .iter()
                .map(|e| e.addr.port())
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn empty_picks_none() {
        for lb in [
            LoadBalancer::RoundRobin,
            LoadBalancer::Random,
            LoadBalancer::LeastRequest,
            LoadBalancer::Ewma,
        ] {
            assert_eq!(pick(lb, &[], 3, &mut seeded(1)), None, "{lb:?}");
        }
    }

    #[test]
    fn single_candidate_is_picked() {
        for lb in [
            LoadBalancer::RoundRobin,
            LoadBalancer::Random,
            LoadBalancer::LeastRequest,
            LoadBalancer::Ewma,
        ] {
            let got = pick(lb, &[Cand::default()], 7, &mut seeded(1));
            assert_eq!(got, Some(0), "{lb:?}");
        }
    }

    #[test]
    fn round_robin_cycles() {
        let cands = [Cand::default(); 3];
        let got: Vec<_> = (0..7)
            .map(|c| pick(LoadBalancer::RoundRobin, &cands, c, &mut seeded(1)).unwrap())
            .collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn random_uses_rand_and_wraps() {
        let cands = [Cand::default(); 4];
        let cases = [(0, 0), (3, 3), (5, 1)]; // 5 is out of range: wrapped, not trusted
        for (answer, want) in cases {
            let got = pick(LoadBalancer::Random, &cands, 0, &mut script(&[answer]));
            assert_eq!(got, Some(want), "rand answered {answer}");
        }
    }

    #[test]
    fn random_index_stays_in_range() {
        assert_eq!(random_index(0), 0);
        assert_eq!(random_index(1), 0);
        assert!((0..1000).all(|_| random_index(3) < 3));
        let picked = pick(
            LoadBalancer::Random,
            &[Cand::default(); 2],
            0,
            &mut random_index,
        );
        assert!(matches!(picked, Some(0 | 1)));
    }

    #[test]
    fn least_request_table() {
        let load = |n: &[u64]| -> Vec<Cand> {
            n.iter()
                .map(|&in_flight| Cand {
                    in_flight,
                    ewma_ns: 0.0,
                })
                .collect()
        };
        // (in-flight per endpoint, scripted rand answers, expected pick)
        let cases: &[(&[u64], &[usize], usize)] = &[
            (&[5, 1], &[0, 0], 1),       // draws 0 then 1: the lighter wins
            (&[1, 5], &[1, 0], 0),       // draws 1 then 0
            (&[3, 3], &[1, 0], 1),       // tie: the first drawn
            (&[3, 3], &[0, 0], 0),       // tie: the first drawn
            (&[9, 0, 4], &[0, 1], 2),    // second draw 1 skips 0 → index 2
            (&[9, 0, 4], &[2, 1], 1),    // second draw 1 < 2 → index 1
            (&[0, 9, 9, 9], &[3, 1], 3), // the idle one is not drawn; tie → first
        ];
        for (inflight, answers, want) in cases {
            let got = pick(
                LoadBalancer::LeastRequest,
                &load(inflight),
                0,
                &mut script(answers),
            );
            assert_eq!(got, Some(*want), "{inflight:?} {answers:?}");
        }
    }

    #[test]
    fn p2c_draws_two_distinct() {
        let cands = [Cand::default(); 5];
        let mut seen = Vec::new();
        let mut rand = seeded(7);
        let mut rec = |n: usize| {
            let v = rand(n);
            seen.push((n, v));
            v
        };
        for _ in 0..1000 {
            pick(LoadBalancer::LeastRequest, &cands, 0, &mut rec);
        }
        for pair in seen.chunks(2) {
            let (a, b) = (pair[0].1, pair[1].1);
            let b = if b >= a { b + 1 } else { b };
            assert_ne!(a, b);
            assert!(a < 5 && b < 5);
        }
    }

    #[test]
    fn cost_table() {
        let cases = [
            (0, 1_000_000.0, 1_000_000.0),
            (3, 1_000_000.0, 4_000_000.0),
            (0, 0.0, DEFAULT_EWMA_NS),
            (1, 0.0, 2.0 * DEFAULT_EWMA_NS),
            (0, f64::NAN, DEFAULT_EWMA_NS),
            (0, -5.0, DEFAULT_EWMA_NS),
        ];
        for (in_flight, ewma_ns, want) in cases {
            let got = cost(&Cand { in_flight, ewma_ns });
            assert!((got - want).abs() < 1e-6, "{in_flight} {ewma_ns}: {got}");
        }
    }

    #[test]
    fn ewma_prefers_cheaper_cost() {
        let c = |in_flight, ms: f64| Cand {
            in_flight,
            ewma_ns: ms * 1e6,
        };
        // (candidates, scripted draws, expected)
        let cases: &[(&[Cand], &[usize], usize)] = &[
            (&[c(0, 50.0), c(0, 5.0)], &[0, 0], 1),
            (&[c(0, 5.0), c(20, 5.0)], &[1, 0], 0), // same latency, less load
            (&[c(0, 5.0), c(0, 100.0)], &[0, 0], 0),
            (&[c(9, 5.0), c(0, 100.0)], &[0, 0], 0), // 50ms < 100ms
            (&[c(30, 5.0), c(0, 100.0)], &[0, 0], 1), // 155ms > 100ms
            (&[c(0, 1.0), c(0, 0.0)], &[0, 0], 0),   // unmeasured costs the default
            (&[c(40, 1.0), c(0, 0.0)], &[0, 0], 1),  // but wins against a loaded one
            (&[c(2, 5.0), c(2, 5.0)], &[0, 0], 0),   // tie: the first drawn
            (&[c(2, 5.0), c(2, 5.0)], &[1, 0], 1),   // tie: the first drawn
        ];
        for (cands, answers, want) in cases {
            let got = pick(LoadBalancer::Ewma, cands, 0, &mut script(answers));
            assert_eq!(got, Some(*want), "{cands:?}");
        }
    }

    #[test]
    fn ewma_sends_most_traffic_to_the_fast_endpoint() {
        // One request per simulated millisecond; endpoint 0 answers in 10 ms, endpoint 1 in
        // 100 ms. In-flight counts come from the simulated completions, latencies from Stats.
        let latency = [Duration::from_millis(10), Duration::from_millis(100)];
        let stats = [Stats::new(), Stats::new()];
        let t0 = Instant::now();
        let mut pending: [std::collections::VecDeque<Instant>; 2] = Default::default();
        let mut in_flight = [0_u64; 2];
        let mut counts = [0_u32; 2];
        let mut rand = seeded(42);
        for i in 0..10_000 {
            let now = t0 + Duration::from_millis(i);
            for j in 0..2 {
                while pending[j].front().is_some_and(|&done| done <= now) {
                    pending[j].pop_front();
                    in_flight[j] -= 1;
                    stats[j].observe(latency[j], now);
                }
            }
            let cands: Vec<Cand> = (0..2)
                .map(|j| Cand {
                    in_flight: in_flight[j],
                    ewma_ns: stats[j].cand(now).ewma_ns,
                })
                .collect();
            let p = pick(LoadBalancer::Ewma, &cands, 0, &mut rand).unwrap();
            counts[p] += 1;
            in_flight[p] += 1;
            pending[p].push_back(now + latency[p]);
        }
        assert!(
            counts[1] > 0,
            "the slow endpoint is still tried: {counts:?}"
        );
        assert!(counts[0] > 9 * counts[1], "{counts:?}");
    }

    #[test]
    fn peak_ewma_table() {
        let ms = 1e6;
        // (prior, sample, elapsed, expected)
        let cases = [
            (0.0, 5.0 * ms, Duration::ZERO, 5.0 * ms), // first sample
            (5.0 * ms, 50.0 * ms, Duration::from_secs(60), 50.0 * ms), // peak: jump
            (50.0 * ms, 10.0 * ms, Duration::ZERO, 50.0 * ms), // no time: no move
            (
                50.0 * ms,
                10.0 * ms,
                EWMA_DECAY,
                10.0 * ms + 40.0 * ms / std::f64::consts::E,
            ),
            (50.0 * ms, 10.0 * ms, Duration::from_secs(1000), 10.0 * ms), // long ago: sample
            (f64::NAN, 7.0 * ms, Duration::ZERO, 7.0 * ms), // garbage prior: the sample
            (-1.0, 7.0 * ms, Duration::ZERO, 7.0 * ms),     // negative prior: the sample
        ];
        for (prior, sample, elapsed, want) in cases {
            let got = peak_ewma(prior, sample, elapsed);
            assert!(
                (got - want).abs() < 1.0,
                "{prior} {sample} {elapsed:?}: {got}"
            );
        }
    }

    #[test]
    fn stats_peak_then_decay() {
        let stats = Stats::new();
        let t0 = Instant::now();
        assert_eq!(stats.ewma_ns(), 0.0);
        stats.observe(Duration::from_millis(10), t0);
        assert_eq!(stats.ewma_ns(), 10e6);
        let peak = t0 + Duration::from_millis(1);
        stats.observe(Duration::from_millis(200), peak);
        assert_eq!(stats.ewma_ns(), 200e6, "jumps to the peak");
        let mut prev = stats.ewma_ns();
        for s in 1..=30 {
            stats.observe(Duration::from_millis(10), peak + Duration::from_secs(s));
            let now = stats.ewma_ns();
            assert!(now < prev && now > 10e6, "decays gradually: {prev} → {now}");
            prev = now;
        }
        // 1 s steps compose to one 30 s step: 10 ms + 190 ms × e^-3.
        let want = 10e6 + 190e6 * (-3.0_f64).exp();
        assert!((prev - want).abs() < 1.0, "{prev} vs {want}");
        stats.observe(Duration::ZERO, t0 + Duration::from_secs(1000));
        assert!(
            stats.ewma_ns() > 0.0,
            "a measured endpoint never reads as unmeasured"
        );
    }

    #[test]
    fn stats_cand_relaxes_idle_estimate_to_default() {
        let stats = Stats::new();
        let t0 = Instant::now();
        assert_eq!(stats.cand(t0).ewma_ns, 0.0, "unmeasured stays unmeasured");
        stats.observe(Duration::from_secs(2), t0);
        let cases = [
            (Duration::ZERO, 2e9),
            (Duration::from_secs(600), DEFAULT_EWMA_NS),
        ];
        for (idle, want) in cases {
            let got = stats.cand(t0 + idle).ewma_ns;
            assert!((got - want).abs() < 1.0, "{idle:?}: {got}");
        }
        let mid = stats.cand(t0 + EWMA_DECAY).ewma_ns;
        assert!(mid < 2e9 && mid > DEFAULT_EWMA_NS);
        assert_eq!(stats.ewma_ns(), 2e9, "reading does not store");
    }

    #[test]
    fn in_flight_guard_counts() {
        let stats = Arc::new(Stats::new());
        let a = stats.start();
        let b = Stats::start(&stats);
        assert_eq!(stats.in_flight(), 2);
        assert_eq!(stats.cand(Instant::now()).in_flight, 2);
        drop(a);
        assert_eq!(stats.in_flight(), 1);
        drop(b);
        assert_eq!(stats.in_flight(), 0);
    }

    /// Feeds outcomes; returns the ejection (if any) after each.
    fn run(o: &mut Outlier, cfg: &OutlierDetection, outcomes: &[Outcome]) -> Vec<bool> {
        let t = Instant::now();
        outcomes
            .iter()
            .map(|&x| o.record(x, cfg, t, true).is_some())
            .collect()
    }

    #[test]
    fn outlier_triggers_table() {
        use Outcome::{ConnectFailure as C, Status5xx as S, Success as G};
        let (y, n) = (true, false);
        // (cfg, outcomes, ejected after each)
        let cases: &[(&str, OutlierDetection, &[Outcome], &[bool])] = &[
            ("5xx at 3", od(3, 0), &[S(500), S(503), S(500)], &[n, n, y]),
            (
                "success resets",
                od(3, 0),
                &[S(500), S(500), G, S(500)],
                &[n, n, n, n],
            ),
            (
                "4xx is success",
                od(2, 0),
                &[S(500), S(404), S(500)],
                &[n, n, n],
            ),
            ("connect counts as 5xx", od(2, 0), &[C, S(500)], &[n, y]),
            ("gateway at 2", od(0, 2), &[S(502), S(504)], &[n, y]),
            ("connect is gateway", od(0, 2), &[C, S(503)], &[n, y]),
            (
                "500 breaks gateway run",
                od(0, 2),
                &[S(502), S(500), S(502)],
                &[n, n, n],
            ),
            ("both off", od(0, 0), &[C, C, C, C], &[n, n, n, n]),
            ("first trigger wins", od(5, 2), &[S(502), S(502)], &[n, y]),
            (
                "5xx off, gateway on",
                od(0, 3),
                &[S(500), S(500), S(500)],
                &[n, n, n],
            ),
        ];
        for (name, cfg, outcomes, want) in cases {
            let mut o = Outlier::default();
            assert_eq!(run(&mut o, cfg, outcomes), *want, "{name}");
        }
    }

    #[test]
    fn ejection_resets_counters_and_ignores_late_outcomes() {
        let cfg = od(2, 0);
        let t0 = Instant::now();
        let mut o = Outlier::default();
        assert_eq!(o.record(Outcome::Status5xx(500), &cfg, t0, true), None);
        let d = o.record(Outcome::Status5xx(500), &cfg, t0, true);
        assert_eq!(d, Some(Duration::from_secs(30)));
        assert_eq!((o.consecutive_5xx, o.consecutive_gateway), (0, 0));
        assert!(o.is_ejected(t0 + Duration::from_secs(29)));
        assert!(!o.is_ejected(t0 + Duration::from_secs(30)));
        // Late failures of requests started before the ejection do not count.
        let late = t0 + Duration::from_secs(1);
        assert_eq!(o.record(Outcome::Status5xx(500), &cfg, late, true), None);
        assert_eq!(o.consecutive_5xx, 0);
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let cfg = od(1, 0);
        let mut o = Outlier::default();
        let mut now = Instant::now();
        let mut got = Vec::new();
        for _ in 0..12 {
            let d = o.record(Outcome::ConnectFailure, &cfg, now, true).unwrap();
            got.push(d.as_secs());
            now += d; // fail again the moment it is back: no good behaviour in between
        }
        assert_eq!(
            got,
            [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
        );
    }

    #[test]
    fn ejection_multiplier_decays_per_good_interval() {
        let cfg = od(1, 0); // interval 10s, base 30s
        // (seconds back in service before the next ejection, expected ejection secs)
        let cases = [(0, 90), (9, 90), (10, 60), (25, 30), (1000, 30)];
        for (good, want) in cases {
            let mut o = Outlier::default();
            let mut now = Instant::now();
            for _ in 0..2 {
                now += o.record(Outcome::ConnectFailure, &cfg, now, true).unwrap();
            }
            now += Duration::from_secs(good);
            let d = o.record(Outcome::ConnectFailure, &cfg, now, true).unwrap();
            assert_eq!(d.as_secs(), want, "after {good}s good");
        }
        // A zero interval never decays.
        let cfg = OutlierDetection {
            interval: Duration::ZERO,
            ..od(1, 0)
        };
        let mut o = Outlier::default();
        let mut now = Instant::now();
        now += o.record(Outcome::ConnectFailure, &cfg, now, true).unwrap();
        now += Duration::from_secs(3600);
        let d = o.record(Outcome::ConnectFailure, &cfg, now, true).unwrap();
        assert_eq!(d.as_secs(), 60);
    }

    #[test]
    fn capped_ejection_keeps_counting() {
        let cfg = od(2, 0);
        let t = Instant::now();
        let mut o = Outlier::default();
        let fail = Outcome::Status5xx(500);
        assert_eq!(o.record(fail, &cfg, t, false), None);
        assert_eq!(
            o.record(fail, &cfg, t, false),
            None,
            "at threshold but capped"
        );
        assert!(!o.is_ejected(t));
        assert_eq!(o.consecutive_5xx, 2);
        assert!(
            o.record(fail, &cfg, t, true).is_some(),
            "ejected once there is room"
        );
    }

    #[test]
    fn may_eject_table() {
        // (ejected now, total, max %, expected)
        let cases = [
            (0, 0, 100, false),
            (0, 1, 100, false), // never the last endpoint
            (0, 2, 10, true),   // at least one, even above the percentage
            (1, 2, 100, false), // the other one is the last
            (0, 10, 10, true),
            (1, 10, 10, false), // 2 of 10 > 10%
            (1, 10, 20, true),
            (2, 10, 20, false),
            (0, 3, 1, true),
            (1, 3, 100, true),
            (2, 3, 100, false),
            (4, 100, 5, true),
            (5, 100, 5, false),
        ];
        for (ejected, total, pct, want) in cases {
            assert_eq!(
                may_eject(ejected, total, pct),
                want,
                "{ejected}/{total} @{pct}%"
            );
        }
    }

    #[test]
    fn recording_counts_ejections_and_applies_the_cap() {
        let targets: Vec<Target> = (1..=10)
            .map(|p| Target {
                endpoint: ep(p, "dc", "z", &[]),
                state: Arc::default(),
            })
            .collect();
        let ejected = |t| targets.iter().filter(|x| x.state.is_ejected(t)).count();
        let cfg = od(1, 0); // max 10%: one of ten
        let t = Instant::now();
        let fail = Outcome::ConnectFailure;
        assert!(record(&targets, 0, fail, &cfg, t).is_some());
        assert_eq!(ejected(t), 1);
        assert_eq!(record(&targets, 1, fail, &cfg, t), None, "capped");
        assert_eq!(ejected(t), 1);
        assert_eq!(record(&targets, 2, Outcome::Success, &cfg, t), None);
        let later = t + Duration::from_secs(30);
        assert_eq!(ejected(later), 0, "ejection over");
        assert!(record(&targets, 1, fail, &cfg, later).is_some());
    }

    #[test]
    fn unreachable_skips_double_up_to_the_cap() {
        let s = Duration::from_secs;
        #[rustfmt::skip]
        let cases: &[(u32, Duration)] = &[
            (0, s(1)), (1, s(1)), (2, s(2)), (3, s(4)), (4, s(8)), (5, s(16)), (6, s(30)),
            (7, s(30)), (1000, s(30)), (u32::MAX, s(30)),
        ];
        for (failures, want) in cases {
            assert_eq!(unreachable_for(*failures), *want, "{failures} failures");
        }
    }

    #[test]
    fn reachability_marks_once_per_skip_and_clears_on_connect() {
        let r = Reachability::default();
        let now = Instant::now();
        assert!(!r.is_unreachable(now));
        assert_eq!(r.failed(now), Some(Duration::from_secs(1)));
        assert!(r.is_unreachable(now + Duration::from_millis(999)));
        // A burst of failures during the skip does not lengthen it.
        assert_eq!(r.failed(now + Duration::from_millis(10)), None);
        let later = now + Duration::from_secs(1);
        assert!(!r.is_unreachable(later));
        assert_eq!(r.failed(later), Some(Duration::from_secs(2)));
        assert!(r.is_unreachable(later + Duration::from_millis(1999)));
        r.connected();
        assert!(!r.is_unreachable(later));
        assert_eq!(r.failed(later), Some(Duration::from_secs(1)));
    }

    /// The skip runs on tokio's clock: a test pauses time and walks through it.
    #[tokio::test(start_paused = true)]
    async fn an_unreachable_endpoint_returns_on_tokios_clock() {
        let r = Reachability::default();
        assert_eq!(r.failed(Instant::now()), Some(UNREACHABLE_BASE));
        tokio::time::advance(UNREACHABLE_BASE - Duration::from_millis(1)).await;
        assert!(r.is_unreachable(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!r.is_unreachable(Instant::now()));
        // Failing again doubles the skip, up to the cap: never skipped for longer than that.
        assert_eq!(r.failed(Instant::now()), Some(2 * UNREACHABLE_BASE));
        for _ in 0..10 {
            tokio::time::advance(UNREACHABLE_MAX).await;
            r.failed(Instant::now());
        }
        assert!(r.is_unreachable(Instant::now()));
        tokio::time::advance(UNREACHABLE_MAX).await;
        assert!(
            !r.is_unreachable(Instant::now()),
            "never skipped longer than the cap"
        );
    }

    /// The thread RNG's index is uniform enough to reach every endpoint, and in range.
    #[test]
    fn random_indexes_cover_the_range() {
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            seen[random_index(7)] += 1;
        }
        assert!(seen.iter().all(|n| *n > 700), "{seen:?}");
        assert_eq!(random_index(0), 0);
        assert_eq!(random_index(1), 0);
    }
}
