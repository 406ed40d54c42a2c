//! The gossip layer's metrics: membership, the keyring in use, what the sealed transport sent,
//! opened and dropped (per message kind), and what gossip state was refused. The transport
//! counts in plain atomics on the datagram path; [`GossipMetrics::export`] copies them into the
//! registry once per gossip round.

use std::sync::Arc;

use mesh_runtime::drain;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::gossip_seal::{DropReason, MessageKind, SealStats};

/// The gossip layer's metrics, registered here (its parts are plain atomics or the chitchat
/// fork's counters).
pub struct GossipMetrics {
    /// `meshd_gossip_members`.
    pub members: Gauge<i64>,
    /// `meshd_gossip_keyring_revision`.
    pub keyring_revision: Gauge<i64>,
    /// `meshd_gossip_states_refused_total`.
    pub states_refused: Counter,
    /// `meshd_gossip_nodes_refused_total`.
    pub nodes_refused: Counter,
    seal_dropped: Family<DropLabels, Counter>,
    seal_opened: Counter,
    datagrams: Family<TrafficLabels, Counter>,
    bytes: Family<TrafficLabels, Counter>,
}

/// Labels of `meshd_gossip_datagrams_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// Labels of `meshd_gossip_traffic_*_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct TrafficLabels {
    /// `sent` or `received`.
    direction: &'static str,
    /// [`MessageKind::as_str`].
    kind: &'static str,
}

impl GossipMetrics {
    /// The metrics, registered in `registry`.
    pub fn new(registry: &mut Registry) -> GossipMetrics {
        let m = GossipMetrics {
            members: Gauge::default(),
            keyring_revision: Gauge::default(),
            states_refused: Counter::default(),
            nodes_refused: Counter::default(),
            seal_dropped: Family::default(),
            seal_opened: Counter::default(),
            datagrams: Family::default(),
            bytes: Family::default(),
        };
        registry.register(
            "meshd_gossip_members",
            "Live members in this node's gossip view",
            m.members.clone(),
        );
        registry.register(
            "meshd_gossip_keyring_revision",
            "Revision of the gossip keyring this node seals and opens with",
            m.keyring_revision.clone(),
        );
        registry.register(
            "meshd_gossip_datagrams_dropped",
            "Gossip datagrams dropped: not sealed with a key of the keyring, tampered, malformed or too large",
            m.seal_dropped.clone(),
        );
        registry.register(
            "meshd_gossip_states_refused",
            "Gossip states of other nodes not used: unsigned, not signed by the node they are about, tampered or over the size caps",
            m.states_refused.clone(),
        );
        registry.register(
            "meshd_gossip_nodes_refused",
            "New node ids kept out of the gossip table: not a node name, a removed node, or the table's digest at its bound",
            m.nodes_refused.clone(),
        );
        registry.register(
            "meshd_gossip_datagrams_opened",
            "Gossip datagrams that were authentic and decoded",
            m.seal_opened.clone(),
        );
        registry.register(
            "meshd_gossip_traffic_datagrams",
            "Gossip datagrams sent, and received authentic and decoded, by chitchat message kind",
            m.datagrams.clone(),
        );
        registry.register(
            "meshd_gossip_traffic_bytes",
            "Bytes of those datagrams on the wire (sealed UDP payload; add 28 per datagram for IPv4 and UDP headers)",
            m.bytes.clone(),
        );
        m
    }

    /// Copies `stats` into the registry every `every` (a gossip round) until `shutdown`.
    pub fn export(
        &self,
        stats: Arc<SealStats>,
        every: std::time::Duration,
        shutdown: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let exporter = Exporter {
            dropped: self.seal_dropped.clone(),
            opened: self.seal_opened.clone(),
            datagrams: self.datagrams.clone(),
            bytes: self.bytes.clone(),
            last: Last::default(),
        };
        exporter.run(stats, every, shutdown)
    }
}

/// Datagrams and bytes per message kind.
type ByKind = [(u64, u64); MessageKind::ALL.len()];

/// The counters [`GossipMetrics::export`] feeds, and what it last read.
struct Exporter {
    dropped: Family<DropLabels, Counter>,
    opened: Counter,
    datagrams: Family<TrafficLabels, Counter>,
    bytes: Family<TrafficLabels, Counter>,
    last: Last,
}

/// What the exporter last read of each counter.
#[derive(Default)]
struct Last {
    opened: u64,
    dropped: [u64; DropReason::ALL.len()],
    sent: ByKind,
    received: ByKind,
}

impl Exporter {
    async fn run(
        mut self,
        stats: Arc<SealStats>,
        every: std::time::Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Every label from the first scrape, at zero: "none" is a visible 0, not a gap.
        for reason in DropReason::ALL {
            let _ = self.dropped.get_or_create(&DropLabels {
                reason: reason.as_str(),
            });
        }
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = drain::until_true(&mut shutdown) => return,
            }
            self.copy(&stats);
        }
    }

    /// Adds what `stats` counted since the last call.
    fn copy(&mut self, stats: &SealStats) {
        let opened = stats.opened();
        self.opened.inc_by(opened.saturating_sub(self.last.opened));
        self.last.opened = opened;
        for (i, (reason, n)) in stats.drops().into_iter().enumerate() {
            let d = n.saturating_sub(std::mem::replace(&mut self.last.dropped[i], n));
            if d > 0 {
                let labels = DropLabels {
                    reason: reason.as_str(),
                };
                self.dropped.get_or_create(&labels).inc_by(d);
            }
        }
        let sent = stats.sent_by_kind();
        let received = stats.opened_by_kind();
        for (i, kind) in MessageKind::ALL.into_iter().enumerate() {
            let now = (sent[i].1, sent[i].2);
            let before = std::mem::replace(&mut self.last.sent[i], now);
            self.add("sent", kind, now, before);
            let now = (received[i].1, received[i].2);
            let before = std::mem::replace(&mut self.last.received[i], now);
            self.add("received", kind, now, before);
        }
    }

    fn add(&self, direction: &'static str, kind: MessageKind, now: (u64, u64), before: (u64, u64)) {
        let labels = TrafficLabels {
            direction,
            kind: kind.as_str(),
        };
        (self.datagrams.get_or_create(&labels)).inc_by(now.0.saturating_sub(before.0));
        (self.bytes.get_or_create(&labels)).inc_by(now.1.saturating_sub(before.1));
    }
}
