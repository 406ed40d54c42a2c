//! Locality-aware routing as explicit rules: how far an endpoint is from the caller (its zone,
//! its datacenter, the rest of its site, then other sites — those the policy names, in its
//! order, then the rest nearest first by the round trip this site's east-west gateways
//! measure, each its own tier) and which share of new connections or
//! requests each of those tiers takes. A tier keeps all of its traffic while at least the
//! failover threshold of its endpoints is healthy; below, it keeps `healthy / threshold` of it
//! and the rest spills to the next tier, proportionally (so losing half a zone moves a part of
//! the traffic, not all or nothing). When every tier is below, what is left is spread over them
//! in proportion to what they took. Pure.

use mesh_api::policy::Locality;

use crate::membership::Endpoint;

/// Zone, datacenter, site, and the nearest other site when the policy names none.
pub const TIERS: usize = 4;

/// How many tiers `locality` has for endpoints whose farthest site has place `max_rank` among
/// the other sites: [`TIERS`], plus one per site the policy names, plus one per site after the
/// nearest.
pub fn tiers(locality: &Locality, max_rank: u16) -> usize {
    TIERS + locality.sites.len() + usize::from(max_rank)
}

/// Shares are counted in parts of this.
pub const WHOLE: u32 = 10_000;

/// How far `ep` is from a caller in `datacenter`/`zone`: 0 its zone, 1 its datacenter, 2
/// elsewhere in its site; then another site (reached through that site's east-west gateway):
/// 3 + the site's place in `sites`, or, for a site not named, 3 + `sites.len()` + its place
/// by distance (`ep.site_rank`; the places of named sites stay as empty tiers).
pub fn tier(ep: &Endpoint, datacenter: &str, zone: &str, sites: &[mesh_api::Label]) -> usize {
    if ep.sni.is_some() {
        let named = sites.iter().position(|s| s.as_str() == ep.site);
        return 3 + named.unwrap_or(sites.len() + usize::from(ep.site_rank));
    }
    match (ep.datacenter == datacenter, ep.zone == zone) {
        (true, true) => 0,
        (true, false) => 1,
        (false, _) => 2,
    }
}

/// One tier's endpoints, counted for [`shares`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Endpoints that may be used (healthy, not draining, not ejected).
    pub healthy: u32,
    /// Every endpoint (of the subset asked for).
    pub total: u32,
    /// Whether the tier has a candidate now (a healthy endpoint not known unreachable, or any
    /// healthy one when none is reachable anywhere): a tier without one takes nothing.
    pub available: bool,
}

/// The share of traffic (parts of [`WHOLE`]) each tier of `counts` takes under `locality`. All
/// zero only when no tier is available (or, without failover, the caller's zone is not).
pub fn shares(counts: &[Count], locality: &Locality) -> Vec<u32> {
    let mut out = vec![0u32; counts.len()];
    if counts.is_empty() {
        return out;
    }
    if !locality.enabled {
        // Every tier alike: the balancer sees all candidates (tier 0 stands for them all).
        if counts.iter().any(|c| c.available) {
            out[0] = WHOLE;
        }
        return out;
    }
    if !locality.failover {
        if counts[0].available {
            out[0] = WHOLE;
        }
        return out;
    }
    let mut left = WHOLE;
    for (t, c) in counts.iter().enumerate() {
        if !c.available || c.total == 0 || left == 0 {
            continue;
        }
        let keep = keep(c, locality.failover_threshold);
        let share = left * keep / WHOLE;
        out[t] = share;
        left -= share;
    }
    spread(&mut out, counts, left);
    out
}

/// The part of [`WHOLE`] a tier keeps of what reaches it: all at or above the threshold, else
/// in proportion to its healthy share.
fn keep(c: &Count, threshold: u8) -> u32 {
    if threshold == 0 {
        return WHOLE;
    }
    let scaled = u64::from(c.healthy) * u64::from(WHOLE) * 100;
    let keep = scaled / (u64::from(c.total) * u64::from(threshold)).max(1);
    u32::try_from(keep.min(u64::from(WHOLE))).unwrap_or(WHOLE)
}

/// Gives what no tier kept (every tier below the threshold) to the tiers in proportion to what
/// they took, the rounding remainder to the nearest; to the nearest available tier when none
/// took anything.
fn spread(out: &mut [u32], counts: &[Count], left: u32) {
    if left == 0 {
        return;
    }
    let taken: u32 = out.iter().sum();
    if taken == 0 {
        if let Some(t) = counts.iter().position(|c| c.available) {
            out[t] = WHOLE;
        }
        return;
    }
    let mut given = 0;
    for share in out.iter_mut() {
        let extra =
            u32::try_from(u64::from(left) * u64::from(*share) / u64::from(taken)).unwrap_or(0);
        *share += extra;
        given += extra;
    }
    if let Some(first) = out.iter_mut().find(|s| **s > 0) {
        *first += left - given;
    }
}

/// The tier a new connection or request goes to, by `shares`; `rand(n)` is uniform in `0..n`
/// and is not called when one tier takes everything. `None`: no tier takes anything.
pub fn pick(shares: &[u32], rand: &mut dyn FnMut(usize) -> usize) -> Option<usize> {
    if let Some(t) = shares.iter().position(|&s| s == WHOLE) {
        return Some(t);
    }
    let total: u32 = shares.iter().sum();
    if total == 0 {
        return None;
    }
    // Out-of-range answers are wrapped, never trusted.
    let mut r = u32::try_from(rand(total as usize) % total as usize).unwrap_or(0);
    for (t, &s) in shares.iter().enumerate() {
        if r < s {
            return Some(t);
        }
        r -= s;
    }
    shares.iter().rposition(|&s| s > 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
