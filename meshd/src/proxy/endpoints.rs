//! The one endpoint path of TCP connections and HTTP requests: a destination's targets →
//! usable (healthy, not draining) → subset → not ejected, not unreachable → locality → the
//! balancer's pick, then the order to fall back in when a connect fails. Pure: the caller
//! passes the time, the round-robin cursor and the random source.

use std::collections::BTreeMap;
use tokio::time::Instant;

use mesh_api::policy::{DestinationPolicy, LoadBalancer};

use super::balance::{self, Target};
use super::locality;
use crate::membership::Endpoint;

/// Endpoints tried for one connection or request before its connect fails (the balancer's
/// pick and two fallbacks): enough to step over a dead host and a second one dying with it,
/// few enough that a destination that is down everywhere fails fast.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Locality when no DestinationPolicy says otherwise: prefer the caller's zone, then its
/// datacenter, then its site, then other sites (through their east-west gateways), each keeping
/// its traffic while half its endpoints are healthy (see [`super::locality`]).
pub use mesh_api::policy::DEFAULT_LOCALITY;

/// [`DEFAULT_LOCALITY`] with a `'static` address (a `Vec` in a const is not promoted).
static DEFAULT: mesh_api::policy::Locality = DEFAULT_LOCALITY;

/// Balancer of HTTP requests when no DestinationPolicy says otherwise: peak EWMA of response
/// latency, as Linkerd.
pub const DEFAULT_HTTP_LOAD_BALANCER: LoadBalancer = LoadBalancer::Ewma;

/// Balancer of TCP connections when no DestinationPolicy says otherwise: fewest open
/// connections of two random candidates (Envoy's default). Latency is a poor signal here: a
/// connect takes the same time to a busy database as to an idle one, and peak EWMA would send
/// every short connection to whichever endpoint connected fastest.
pub const DEFAULT_TCP_LOAD_BALANCER: LoadBalancer = LoadBalancer::LeastRequest;

/// What narrows a destination's targets for one connection or request.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// Endpoints must carry these labels (a Route's subset); `None`: any endpoint.
    pub subset: Option<&'a BTreeMap<String, String>>,
    /// The destination's policy: load balancer and locality.
    pub policy: Option<&'a DestinationPolicy>,
    /// The balancer without a policy ([`DEFAULT_HTTP_LOAD_BALANCER`] or
    /// [`DEFAULT_TCP_LOAD_BALANCER`]).
    pub default_lb: LoadBalancer,
    /// The caller's datacenter.
    pub datacenter: &'a str,
    /// The caller's zone.
    pub zone: &'a str,
}

/// A target with its index, so the locality filter can hand indices back.
struct Indexed<'a> {
    index: usize,
    target: &'a Target,
}

impl std::borrow::Borrow<Endpoint> for Indexed<'_> {
    fn borrow(&self) -> &Endpoint {
        &self.target.endpoint
    }
}

/// Indices into `targets` in the order to try them, at most [`MAX_CONNECT_ATTEMPTS`]: the
/// balancer's pick within the preferred locality first, then the rest of that locality, then
/// (if the locality allows failover) the other candidates. Empty: nothing may be used.
///
/// Candidates are usable, in the subset and not ejected by outlier detection. Endpoints whose
/// last connect failed are left out while others remain; when only they remain they are tried
/// anyway (gossip still lists them, and failing without trying helps nobody).
pub fn order(
    targets: &[Target],
    ask: &Ask<'_>,
    now: Instant,
    cursor: usize,
    rand: &mut dyn FnMut(usize) -> usize,
) -> Vec<usize> {
    let in_subset =
        |t: &Target| (ask.subset).is_none_or(|labels| balance::in_subset(&t.endpoint, labels));
    let eligible = |t: &Target| t.endpoint.is_usable() && in_subset(t) && !t.state.is_ejected(now);
    let indexed = |index: usize| Indexed {
        index,
        target: &targets[index],
    };
    let mut candidates: Vec<Indexed<'_>> = (0..targets.len())
        .filter(|&i| eligible(&targets[i]) && !targets[i].state.reachability.is_unreachable(now))
        .map(indexed)
        .collect();
    if candidates.is_empty() {
        candidates = (0..targets.len())
            .filter(|&i| eligible(&targets[i]))
            .map(indexed)
            .collect();
    }
    let locality = ask.policy.map_or(&DEFAULT, |p| &p.locality);
    let tier_of =
        |t: &Target| locality::tier(&t.endpoint, ask.datacenter, ask.zone, &locality.sites);
    // One tier per place the policy or the sites' distance gives; grown as farther sites
    // show up, so no extra pass over the targets. Candidates are in the subset: counted here.
    let mut counts = vec![locality::Count::default(); locality::tiers(locality, 0)];
    for t in targets.iter().filter(|t| in_subset(t)) {
        let tier = tier_of(t);
        if tier >= counts.len() {
            counts.resize(tier + 1, locality::Count::default());
        }
        let c = &mut counts[tier];
        c.total += 1;
        c.healthy += u32::from(eligible(t));
    }
    for c in &candidates {
        counts[tier_of(c.target)].available = true;
    }
    let chosen = locality::pick(&locality::shares(&counts, locality), rand);
    let mut order: Vec<usize> = {
        let group: Vec<&Indexed<'_>> = match chosen {
            None => Vec::new(),
            Some(_) if !locality.enabled => candidates.iter().collect(),
            Some(tier) => (candidates.iter())
                .filter(|c| tier_of(c.target) == tier)
                .collect(),
        };
        let lb = ask.policy.map_or(ask.default_lb, |p| p.load_balancer);
        let cands: Vec<balance::Cand> = group
            .iter()
            .map(|c| c.target.state.stats.cand(now))
            .collect();
        let mut order: Vec<usize> = group.iter().map(|c| c.index).collect();
        if let Some(first) = balance::pick(lb, &cands, cursor, rand) {
            order.swap(0, first);
        }
        order
    };
    order.truncate(MAX_CONNECT_ATTEMPTS);
    if locality.failover {
        // Fallbacks nearest first: the caller's zone, its datacenter, its site, other sites.
        if locality.enabled {
            candidates.sort_by_key(|c| tier_of(c.target));
        }
        for c in &candidates {
            if order.len() == MAX_CONNECT_ATTEMPTS {
                break;
            }
            if !order.contains(&c.index) {
                order.push(c.index);
            }
        }
    }
    order
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
