//! How far the other sites are from this one: an east-west gateway times a TCP handshake with
//! every other site's gateways each [`PROBE_INTERVAL`] and publishes, per site, the median of
//! the recent round trips to its nearest gateway into its own site's gossip (`rtt/<site>`).
//! Every meshd of the site orders the other sites by it (`membership::rank_sites`), so by
//! default traffic that must leave the site goes to the nearest one that can take it.
//!
//! A handshake's round trip is the network's (the far kernel answers the SYN), costs the far
//! gateway an accept and nothing else (a connection closed before sending a byte is not counted
//! as a refusal there), and needs no protocol of its own.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use mesh_api::Label;
use mesh_api::gossip::{self, SiteDistance};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::membership::Publisher;

/// Time between two probes of a gateway once it is measured.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Time between the first [`SAMPLES`] probes of a gateway just learned, so a site has a
/// distance (a median, not one sample) within a second of its gateway joining the WAN.
pub const FIRST_PROBES_INTERVAL: Duration = Duration::from_millis(200);
/// Samples a gateway needs before it counts: one probe that happened to meet a busy host must
/// not rank a site.
pub const MIN_SAMPLES: usize = 3;
/// A handshake slower than this counts as no answer (no sample).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Round trips kept per gateway; their median is its distance.
pub const SAMPLES: usize = 5;
/// A published distance is replaced only when the measured one differs from it by more than
/// this many percent and more than [`HYSTERESIS_FLOOR_US`], so two sites at about the same
/// distance do not swap places (and traffic) with every probe, and gossip is not rewritten for
/// noise.
pub const HYSTERESIS_PERCENT: u64 = 20;
/// Differences of round trip below this (µs) never move a published distance: a millisecond
/// is noise between datacenters (and everything on one host or LAN is "as near").
pub const HYSTERESIS_FLOOR_US: u64 = 1_000;

/// Recent round trips (µs) per gateway, and the probes made of each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Samples {
    by_gateway: BTreeMap<SocketAddr, VecDeque<u32>>,
    probes: BTreeMap<SocketAddr, (usize, Instant)>,
}

impl Samples {
    /// A probe of `gateway` at `at` gave `rtt_us` (`None`: no answer). Forgets the oldest
    /// sample beyond [`SAMPLES`].
    pub fn record(&mut self, gateway: SocketAddr, at: Instant, rtt_us: Option<u32>) {
        let p = self.probes.entry(gateway).or_insert((0, at));
        *p = (p.0.saturating_add(1), at);
        let Some(rtt_us) = rtt_us else { return };
        let s = self.by_gateway.entry(gateway).or_default();
        if s.len() == SAMPLES {
            s.pop_front();
        }
        s.push_back(rtt_us);
    }

    /// The gateways of `gateways` to probe at `now`: never probed, or last probed
    /// [`FIRST_PROBES_INTERVAL`] ago while probed fewer than [`SAMPLES`] times, or
    /// [`PROBE_INTERVAL`] ago.
    pub fn due(
        &self,
        gateways: &BTreeMap<Label, Vec<SocketAddr>>,
        now: Instant,
    ) -> Vec<SocketAddr> {
        (gateways.values().flatten())
            .filter(|gw| match self.probes.get(gw) {
                None => true,
                Some(&(n, at)) => {
                    let wait = if n < SAMPLES {
                        FIRST_PROBES_INTERVAL
                    } else {
                        PROBE_INTERVAL
                    };
                    now.duration_since(at) >= wait
                }
            })
            .copied()
            .collect()
    }

    /// Forgets the gateways no longer in `gateways`.
    pub fn retain(&mut self, gateways: &BTreeMap<Label, Vec<SocketAddr>>) {
        let known = |gw: &SocketAddr| gateways.values().flatten().any(|g| g == gw);
        self.by_gateway.retain(|gw, _| known(gw));
        self.probes.retain(|gw, _| known(gw));
    }

    /// The lower median of `gateway`'s samples, once it has [`MIN_SAMPLES`].
    fn median(&self, gateway: &SocketAddr) -> Option<u32> {
        let mut s: Vec<u32> = self.by_gateway.get(gateway)?.iter().copied().collect();
        if s.len() < MIN_SAMPLES {
            return None;
        }
        s.sort_unstable();
        s.get((s.len() - 1) / 2).copied()
    }
}

/// Per site, the distance to its nearest gateway with [`MIN_SAMPLES`]; sites without one are
/// left out. Pure.
pub fn site_distances(
    gateways: &BTreeMap<Label, Vec<SocketAddr>>,
    samples: &Samples,
) -> BTreeMap<Label, u32> {
    (gateways.iter())
        .filter_map(|(site, gws)| {
            let nearest = gws.iter().filter_map(|g| samples.median(g)).min()?;
            Some((site.clone(), nearest))
        })
        .collect()
}

/// What to publish after measuring `measured` while `published` is out: the measured sites,
/// each keeping its published distance unless the new one is more than [`HYSTERESIS_PERCENT`]
/// and [`HYSTERESIS_FLOOR_US`] away from it. `None`: nothing changed. Pure.
pub fn next_published(
    published: &BTreeMap<Label, u32>,
    measured: &BTreeMap<Label, u32>,
) -> Option<BTreeMap<Label, u32>> {
    let next: BTreeMap<Label, u32> = (measured.iter())
        .map(|(site, &now)| {
            let kept = published.get(site).copied().filter(|&before| {
                let diff = u64::from(now.abs_diff(before));
                diff <= HYSTERESIS_FLOOR_US || diff * 100 <= u64::from(before) * HYSTERESIS_PERCENT
            });
            (site.clone(), kept.unwrap_or(now))
        })
        .collect();
    (next != *published).then_some(next)
}

/// The gossip key-values of `distances`.
pub fn keys(distances: &BTreeMap<Label, u32>) -> BTreeMap<String, String> {
    (distances.iter())
        .map(|(site, &rtt_us)| {
            let d = SiteDistance {
                v: gossip::VERSION,
                rtt_us,
            };
            (gossip::site_rtt_key(site), gossip::encode(&d))
        })
        .collect()
}

/// Probes the gateways `gateways_rx` names (see [`Samples::due`]) and keeps the site's gossip
/// saying how far each site is, until `shutdown` (then the keys are withdrawn).
pub async fn run(
    mut gateways_rx: watch::Receiver<BTreeMap<Label, Vec<SocketAddr>>>,
    lan: Publisher,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut samples = Samples::default();
    let mut published = BTreeMap::new();
    let mut tick = tokio::time::interval(FIRST_PROBES_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Ok(()) = gateways_rx.changed() => {}
            _ = mesh_runtime::drain::until_true(&mut shutdown) => {
                lan.replace_prefix(gossip::SITE_RTT_PREFIX, &BTreeMap::new()).await;
                return;
            }
        }
        let gateways = gateways_rx.borrow_and_update().clone();
        samples.retain(&gateways);
        let now = Instant::now();
        let due = samples.due(&gateways, now);
        if due.is_empty() {
            continue;
        }
        let rtts = futures::future::join_all(due.iter().map(|&gw| probe(gw))).await;
        for (gw, rtt) in due.into_iter().zip(rtts) {
            samples.record(gw, now, rtt);
        }
        if let Some(next) = next_published(&published, &site_distances(&gateways, &samples)) {
            lan.replace_prefix(gossip::SITE_RTT_PREFIX, &keys(&next))
                .await;
            debug!(?next, "WAN: distances to the other sites published");
            published = next;
        }
    }
}

/// The round trip of a TCP handshake with `gateway` (µs), closed at once; `None` when it did
/// not answer within [`PROBE_TIMEOUT`].
async fn probe(gateway: SocketAddr) -> Option<u32> {
    let started = Instant::now();
    match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(gateway)).await {
        Ok(Ok(_tcp)) => Some(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX)),
        Ok(Err(e)) => {
            debug!(%gateway, error = %e, "WAN: distance probe refused");
            None
        }
        Err(_) => {
            debug!(%gateway, "WAN: distance probe timed out");
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn site(s: &str) -> Label {
        Label::new(s).unwrap()
    }

    fn gw(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 15443))
    }

    #[test]
    fn a_site_is_as_far_as_its_nearest_gateways_median() {
        let gateways = BTreeMap::from([
            (site("b"), vec![gw(1), gw(2)]),
            (site("c"), vec![gw(3)]),
            (site("d"), vec![gw(4)]),
        ]);
        let t = Instant::now();
        let mut s = Samples::default();
        for us in [900, 5_000, 1_000, 1_100, 950] {
            s.record(gw(1), t, Some(us));
        }
        for _ in 0..MIN_SAMPLES {
            s.record(gw(2), t, Some(2_000));
            s.record(gw(3), t, Some(30_000));
            s.record(gw(4), t, None); // never answers
        }
        let d = site_distances(&gateways, &s);
        assert_eq!(d, BTreeMap::from([(site("b"), 1_000), (site("c"), 30_000)]));
        // Only the last SAMPLES count: five slow ones push the old out.
        for _ in 0..SAMPLES {
            s.record(gw(1), t, Some(9_000));
        }
        assert_eq!(site_distances(&gateways, &s)[&site("b")], 2_000);
        // Too few samples rank nothing: a lone slow probe of a new gateway does not count.
        let mut fresh = Samples::default();
        fresh.record(gw(3), t, Some(50));
        assert!(site_distances(&gateways, &fresh).is_empty());
        // A gateway gone from the WAN is forgotten.
        s.retain(&BTreeMap::from([(site("c"), vec![gw(3)])]));
        assert_eq!(
            site_distances(&gateways, &s),
            BTreeMap::from([(site("c"), 30_000)])
        );
    }

    #[test]
    fn published_distances_move_only_past_the_hysteresis() {
        let m = |v: &[(&str, u32)]| -> BTreeMap<Label, u32> {
            v.iter().map(|(s, d)| (site(s), *d)).collect()
        };
        let published = m(&[("b", 10_000), ("c", 11_000)]);
        // Noise within 20%: nothing to publish (b and c keep their order).
        assert_eq!(
            next_published(&published, &m(&[("b", 11_500), ("c", 9_500)])),
            None
        );
        // Past it: that site moves, the other keeps its published value.
        assert_eq!(
            next_published(&published, &m(&[("b", 13_000), ("c", 10_000)])),
            Some(m(&[("b", 13_000), ("c", 11_000)]))
        );
        // Under a millisecond apart is noise whatever the ratio (one host, one LAN).
        let near = m(&[("b", 100)]);
        assert_eq!(next_published(&near, &m(&[("b", 900)])), None);
        assert_eq!(
            next_published(&near, &m(&[("b", 1_200)])),
            Some(m(&[("b", 1_200)]))
        );
        // A site no longer measured is withdrawn; a new one is published as measured.
        assert_eq!(
            next_published(&published, &m(&[("b", 1_000), ("d", 7)])),
            Some(m(&[("b", 1_000), ("d", 7)]))
        );
        assert_eq!(next_published(&BTreeMap::new(), &BTreeMap::new()), None);
        let kv = keys(&m(&[("b", 1_000)]));
        let got = gossip::decode::<SiteDistance>(&kv["rtt/b"]).unwrap();
        assert_eq!(got.rtt_us, 1_000);
    }

    #[test]
    fn new_gateways_are_probed_quickly_then_every_interval() {
        let gateways = BTreeMap::from([(site("b"), vec![gw(1), gw(2)])]);
        let t = Instant::now();
        let mut s = Samples::default();
        assert_eq!(s.due(&gateways, t), [gw(1), gw(2)]);
        s.record(gw(1), t, Some(100));
        s.record(gw(2), t, None);
        assert!(s.due(&gateways, t + FIRST_PROBES_INTERVAL / 2).is_empty());
        let mut at = t;
        for _ in 1..SAMPLES {
            at += FIRST_PROBES_INTERVAL;
            assert_eq!(s.due(&gateways, at), [gw(1), gw(2)]);
            s.record(gw(1), at, Some(100));
            s.record(gw(2), at, None);
        }
        // SAMPLES probes each (answered or not): now at the slow pace.
        assert!(s.due(&gateways, at + FIRST_PROBES_INTERVAL).is_empty());
        assert_eq!(s.due(&gateways, at + PROBE_INTERVAL), [gw(1), gw(2)]);
    }

    #[tokio::test]
    async fn a_probe_times_a_handshake_and_a_closed_port_gives_none() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rtt = probe(addr).await.unwrap();
        assert!(rtt < 1_000_000, "{rtt} µs on loopback");
        drop(listener);
        assert_eq!(probe(addr).await, None);
    }
}
