//! The other sites in the view: the endpoints this site's east-west gateways republish for
//! another site's services, and the order of those sites by the distance the gateways measure.

use std::collections::BTreeMap;

use mesh_api::gossip::{self, RemoteService};
use serde::Serialize;
use tracing::debug;

use super::{Endpoint, MeshView};
use crate::config::Protocol;

/// Another site, as far as this site's east-west gateways measured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteSite {
    /// Its name.
    pub site: String,
    /// Round trip to its nearest gateway, microseconds: the median of what this site's
    /// gateways say; `None` while none has measured it.
    pub rtt_us: Option<u32>,
}

/// The other sites in `present`, nearest first by the median of the distances this site's
/// gateways report for each (`reports`); sites nobody measured yet come last, by name. Pure.
pub fn rank_sites<'a>(
    present: impl IntoIterator<Item = &'a str>,
    reports: &BTreeMap<String, Vec<u32>>,
) -> Vec<RemoteSite> {
    let present: std::collections::BTreeSet<&str> = present.into_iter().collect();
    let mut sites: Vec<RemoteSite> = (present.into_iter())
        .map(|site| {
            let rtt_us = reports.get(site).and_then(|r| {
                let mut r = r.clone();
                r.sort_unstable();
                // The lower median: one gateway's outlier never moves it alone.
                r.get(r.len().saturating_sub(1) / 2).copied()
            });
            RemoteSite {
                site: site.to_owned(),
                rtt_us,
            }
        })
        .collect();
    sites.sort_by(|a, b| {
        (a.rtt_us.is_none(), a.rtt_us, &a.site).cmp(&(b.rtt_us.is_none(), b.rtt_us, &b.site))
    });
    sites
}

/// Orders the other sites the view has instances of ([`rank_sites`]) and gives each of their
/// endpoints its site's place.
pub(super) fn rank_remote(view: &mut MeshView, distances: &BTreeMap<String, Vec<u32>>) {
    let present: Vec<String> = (view.endpoints.values().flatten())
        .filter(|e| e.sni.is_some())
        .map(|e| e.site.clone())
        .collect();
    view.sites = rank_sites(present.iter().map(String::as_str), distances);
    for ep in view.endpoints.values_mut().flatten() {
        if ep.sni.is_some() {
            let rank = view.sites.iter().position(|s| s.site == ep.site);
            ep.site_rank = u16::try_from(rank.unwrap_or(0)).unwrap_or(u16::MAX);
        }
    }
}

/// Adds the endpoints of another site's service that this site's east-west gateway `node`
/// publishes under `key`: one per remote gateway and subset.
pub(super) fn remote_endpoints(view: &mut MeshView, node: &str, key: &str, value: &str) {
    let Some((site, svc)) = gossip::parse_remote_key(key) else {
        debug!(node, key, "unreadable remote service key");
        return;
    };
    let remote = match gossip::decode::<RemoteService>(value) {
        Ok(r) => r,
        Err(e) => {
            debug!(node, key, error = %e, "unreadable remote service");
            return;
        }
    };
    let Some(protocol) = Protocol::from_name(&remote.protocol) else {
        debug!(
            node,
            key,
            protocol = remote.protocol,
            "remote service of an unknown protocol"
        );
        return;
    };
    let sni = svc.site_sni(&site);
    let eps = view.endpoints.entry(svc).or_default();
    for gateway in remote.gateways.iter().take(MAX_REMOTE_GATEWAYS) {
        for subset in remote.subsets.iter().take(MAX_REMOTE_SUBSETS) {
            eps.push(Endpoint {
                node: format!("{site}@{gateway}"),
                addr: *gateway,
                datacenter: String::new(),
                zone: String::new(),
                site: site.to_string(),
                sni: Some(sni.clone()),
                site_rank: 0,
                labels: subset.labels.clone(),
                protocol,
                healthy: subset.healthy > 0,
                draining: false,
            });
        }
    }
}

/// Most gateways of one remote service used (a site runs a few).
pub const MAX_REMOTE_GATEWAYS: usize = 16;
/// Most subsets of one remote service used.
pub const MAX_REMOTE_SUBSETS: usize = 16;
