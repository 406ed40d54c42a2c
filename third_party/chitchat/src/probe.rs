//! SWIM probes of protocol V2 (meshd): the direct ping of one member per round, the indirect
//! ping through a few others when it goes unanswered, and the pings this node relays for
//! others. The decisions (whom to probe, what a failed probe means) are `swim.rs`'s; this owns
//! the sequence numbers and the clock of each probe in flight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;
use rand::seq::IteratorRandom;
use tokio::time::Instant;

use crate::swim::{MAX_UPDATES_PER_MESSAGE, MemberUpdate};
use crate::v2::PIGGYBACK_BYTES;
use crate::{Chitchat, ChitchatId, ChitchatMessage};

/// Members asked to ping a target that did not answer (SWIM's k).
pub(crate) const INDIRECT_PROBES: usize = 3;
/// Most pings relayed for others at once: a flood of PING-REQs costs a bounded table.
const MAX_RELAYS: usize = 256;
/// Most probes of our own in flight (one per round plus confirmations).
const MAX_PENDING: usize = 64;
/// Longest a probe waits for a direct ack, however slow the member has been.
const MAX_RTO: Duration = Duration::from_secs(2);
/// Failed probes whose late ack still teaches us the member's round trip: how long, how many.
const LATE_ACK_WINDOW: Duration = Duration::from_secs(5);
const MAX_LATE: usize = 256;
/// Members whose round trip is remembered (a bound on a table keyed by what peers say).
const MAX_RTTS: usize = 8192;

/// The direct wait of a probe: two fifths of the protocol period, the rest is for the
/// indirect probes (memberlist waits half a second of its one-second period).
pub(crate) fn probe_timeout(period: Duration) -> Duration {
    period * 2 / 5
}

/// A message to send and where.
pub(crate) type Outgoing = (SocketAddr, ChitchatMessage);

struct Probe {
    target: ChitchatId,
    sent_at: Instant,
    indirect_at: Instant,
    fail_at: Instant,
    indirect_sent: bool,
}

struct Relay {
    requester: SocketAddr,
    seq: u64,
    target: ChitchatId,
    expires: Instant,
}

/// A member's round trip, smoothed as TCP does (RFC 6298).
#[derive(Debug, Clone, Copy)]
struct Rtt {
    srtt: Duration,
    rttvar: Duration,
}

impl Rtt {
    fn first(sample: Duration) -> Self {
        Self {
            srtt: sample,
            rttvar: sample / 2,
        }
    }

    fn update(&mut self, sample: Duration) {
        let diff = self.srtt.abs_diff(sample);
        self.rttvar = (self.rttvar * 3 + diff) / 4;
        self.srtt = (self.srtt * 7 + sample) / 8;
    }

    /// How long an ack may take before it is late.
    fn timeout(&self) -> Duration {
        (self.srtt + self.rttvar * 4).min(MAX_RTO)
    }
}

pub(crate) struct Prober {
    next_seq: u64,
    pending: HashMap<u64, Probe>,
    relays: HashMap<u64, Relay>,
    /// Round trips per member: a member that answers slowly but surely gets probes that wait
    /// for it, instead of a suspicion every round (and a death and a refutation: flapping).
    rtts: HashMap<ChitchatId, Rtt>,
    /// Probes that failed, by seq, while their ack may still arrive.
    late: HashMap<u64, (ChitchatId, Instant)>,
    /// Wait for a direct ack before asking others.
    probe_timeout: Duration,
    /// Wait for any ack before the probe fails (the SWIM protocol period).
    period: Duration,
}

impl Prober {
    pub(crate) fn new(period: Duration, probe_timeout: Duration, first_seq: u64) -> Self {
        Self {
            next_seq: first_seq,
            pending: HashMap::new(),
            relays: HashMap::new(),
            rtts: HashMap::new(),
            late: HashMap::new(),
            probe_timeout,
            period,
        }
    }

    fn seq(&mut self) -> u64 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    /// The periodic probe of a round, and the confirmations SWIM asks for.
    pub(crate) fn round<R: Rng + ?Sized>(
        &mut self,
        chitchat: &mut Chitchat,
        rng: &mut R,
        now: Instant,
    ) -> Vec<Outgoing> {
        let mut out = self.due(chitchat, rng, now);
        let target = chitchat
            .swim
            .as_mut()
            .and_then(|swim| swim.next_probe_target(rng));
        if let Some(target) = target {
            out.extend(self.start(chitchat, target, now));
        }
        out.extend(self.confirmations(chitchat, now));
        out
    }

    /// Probes of suspects others reported, started at once.
    pub(crate) fn confirmations(&mut self, chitchat: &mut Chitchat, now: Instant) -> Vec<Outgoing> {
        let targets = chitchat
            .swim
            .as_mut()
            .map(|swim| swim.take_confirmation_probes())
            .unwrap_or_default();
        targets
            .into_iter()
            .filter_map(|target| self.start(chitchat, target, now))
            .collect()
    }

    fn start(
        &mut self,
        chitchat: &mut Chitchat,
        target: ChitchatId,
        now: Instant,
    ) -> Option<Outgoing> {
        if self.pending.len() >= MAX_PENDING || self.pending.values().any(|p| p.target == target) {
            return None;
        }
        let seq = self.seq();
        let updates = updates_for(chitchat, &target);
        // The direct wait stretches to the member's own round trip; the indirect probes get
        // the rest of a period after it.
        let direct = self.rtts.get(&target).map_or(self.probe_timeout, |rtt| {
            rtt.timeout().max(self.probe_timeout)
        });
        let fail_at = now + (direct + self.period - self.probe_timeout).max(self.period);
        self.pending.insert(
            seq,
            Probe {
                target: target.clone(),
                sent_at: now,
                indirect_at: now + direct,
                fail_at,
                indirect_sent: false,
            },
        );
        let from = chitchat.self_chitchat_id().clone();
        let addr = target.gossip_advertise_addr;
        Some((
            addr,
            ChitchatMessage::Ping {
                seq,
                from,
                target,
                updates,
            },
        ))
    }

    /// When the next probe action is due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|p| {
                if p.indirect_sent {
                    p.fail_at
                } else {
                    p.indirect_at
                }
            })
            .min()
    }

    /// Indirect probes whose direct wait ended, failures whose period ended.
    pub(crate) fn due<R: Rng + ?Sized>(
        &mut self,
        chitchat: &mut Chitchat,
        rng: &mut R,
        now: Instant,
    ) -> Vec<Outgoing> {
        self.relays.retain(|_, relay| relay.expires > now);
        self.late
            .retain(|_, (_, sent_at)| now.saturating_duration_since(*sent_at) < LATE_ACK_WINDOW);
        let mut out = Vec::new();
        let mut failed = Vec::new();
        for (seq, probe) in &mut self.pending {
            if now >= probe.fail_at {
                failed.push(*seq);
            } else if !probe.indirect_sent && now >= probe.indirect_at {
                probe.indirect_sent = true;
                out.extend(indirect(chitchat, rng, *seq, &probe.target));
            }
        }
        for seq in failed {
            let Some(probe) = self.pending.remove(&seq) else {
                continue;
            };
            if let Some(swim) = chitchat.swim.as_mut() {
                swim.probe_failed(&probe.target, now);
            }
            if self.late.len() < MAX_LATE {
                self.late.insert(seq, (probe.target, probe.sent_at));
            }
        }
        out
    }

    /// A probe message from a peer; what to send in answer.
    pub(crate) fn handle(
        &mut self,
        chitchat: &mut Chitchat,
        from_addr: SocketAddr,
        message: ChitchatMessage,
        now: Instant,
    ) -> Vec<Outgoing> {
        match message {
            ChitchatMessage::Ping {
                seq,
                from,
                target,
                updates,
            } => {
                chitchat.apply_updates(&updates, now);
                // A ping for an earlier life of this node (same address) is not ours to answer.
                if &target != chitchat.self_chitchat_id() {
                    return Vec::new();
                }
                let updates = updates_for(chitchat, &from);
                let from = chitchat.self_chitchat_id().clone();
                vec![(from_addr, ChitchatMessage::PingAck { seq, from, updates })]
            }
            ChitchatMessage::PingReq {
                seq,
                from: _,
                target,
                updates,
            } => {
                chitchat.apply_updates(&updates, now);
                if self.relays.len() >= MAX_RELAYS || &target == chitchat.self_chitchat_id() {
                    return Vec::new();
                }
                let relay_seq = self.seq();
                let updates = updates_for(chitchat, &target);
                self.relays.insert(
                    relay_seq,
                    Relay {
                        requester: from_addr,
                        seq,
                        target: target.clone(),
                        // A slow target's ack is still worth relaying while the requester waits.
                        expires: now + MAX_RTO + self.period,
                    },
                );
                let from = chitchat.self_chitchat_id().clone();
                let addr = target.gossip_advertise_addr;
                vec![(
                    addr,
                    ChitchatMessage::Ping {
                        seq: relay_seq,
                        from,
                        target,
                        updates,
                    },
                )]
            }
            ChitchatMessage::PingAck { seq, from, updates } => {
                chitchat.apply_updates(&updates, now);
                self.acked(chitchat, seq, from, now)
            }
            _ => Vec::new(),
        }
    }

    /// An ack counts only from the member probed (not another life at the same address).
    fn acked(
        &mut self,
        chitchat: &mut Chitchat,
        seq: u64,
        from: ChitchatId,
        now: Instant,
    ) -> Vec<Outgoing> {
        if let Some(probe) = self.pending.remove_if(&seq, |p| p.target == from) {
            self.sample(from, now.saturating_duration_since(probe.sent_at));
            return Vec::new();
        }
        if let Some((target, sent_at)) = self.late.remove_if(&seq, |(target, _)| *target == from) {
            self.sample(target, now.saturating_duration_since(sent_at));
            return Vec::new();
        }
        match self.relays.remove(&seq) {
            Some(relay) if relay.target == from => {
                let updates = chitchat.piggyback(PIGGYBACK_BYTES);
                let ack = ChitchatMessage::PingAck {
                    seq: relay.seq,
                    from,
                    updates,
                };
                vec![(relay.requester, ack)]
            }
            Some(relay) => {
                self.relays.insert(seq, relay);
                Vec::new()
            }
            None => Vec::new(),
        }
    }
}

impl Prober {
    fn sample(&mut self, target: ChitchatId, rtt: Duration) {
        if self.rtts.len() >= MAX_RTTS && !self.rtts.contains_key(&target) {
            self.rtts.clear();
        }
        self.rtts
            .entry(target)
            .and_modify(|known| known.update(rtt))
            .or_insert_with(|| Rtt::first(rtt));
    }
}

/// Removes and returns `map[key]` if `keep` holds for it.
trait RemoveIf<V> {
    fn remove_if(&mut self, key: &u64, pred: impl FnOnce(&V) -> bool) -> Option<V>;
}

impl<V> RemoveIf<V> for HashMap<u64, V> {
    fn remove_if(&mut self, key: &u64, pred: impl FnOnce(&V) -> bool) -> Option<V> {
        if self.get(key).is_some_and(pred) {
            self.remove(key)
        } else {
            None
        }
    }
}

/// What to piggyback on a message to `to`: first what we hold against it (so it refutes).
fn updates_for(chitchat: &mut Chitchat, to: &ChitchatId) -> Vec<MemberUpdate> {
    let mut updates: Vec<MemberUpdate> = chitchat
        .swim
        .as_ref()
        .and_then(|swim| swim.news_for(to))
        .into_iter()
        .collect();
    let used = crate::message_serialize::updates_len(&updates);
    let room = MAX_UPDATES_PER_MESSAGE - updates.len();
    if let Some(swim) = chitchat.swim.as_mut() {
        updates.extend(swim.piggyback_at_most(PIGGYBACK_BYTES.saturating_sub(used), room));
    }
    updates
}

/// PING-REQs to a few live members other than the target.
fn indirect<R: Rng + ?Sized>(
    chitchat: &mut Chitchat,
    rng: &mut R,
    seq: u64,
    target: &ChitchatId,
) -> Vec<Outgoing> {
    let Some(swim) = chitchat.swim.as_ref() else {
        return Vec::new();
    };
    let relays: Vec<SocketAddr> = swim
        .live()
        .filter(|id| *id != target)
        .map(|id| id.gossip_advertise_addr)
        .sample(rng, INDIRECT_PROBES);
    let from = chitchat.self_chitchat_id().clone();
    relays
        .into_iter()
        .map(|addr| {
            let updates = chitchat.piggyback(PIGGYBACK_BYTES);
            let message = ChitchatMessage::PingReq {
                seq,
                from: from.clone(),
                target: target.clone(),
                updates,
            };
            (addr, message)
        })
        .collect()
}
