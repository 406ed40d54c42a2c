//! Protocol V2 in [`Chitchat`] (meshd): scoped digests (`sync.rs`) and SWIM membership
//! (`swim.rs`) in place of a heartbeat per member in every digest.
//!
//! A V2 node's heartbeat is its SWIM incarnation: it changes only when the node refutes a
//! suspicion, so digest entries stay the same round after round and only what changed travels.

use std::collections::HashSet;

use tokio::time::Instant;
use tracing::warn;

use crate::delta::Delta;
use crate::digest::{Digest, NodeDigest};
use crate::message_serialize::updates_len;
use crate::swim::{MAX_UPDATES_PER_MESSAGE, MemberUpdate, UpdateKind};
use crate::{Chitchat, ChitchatId, ChitchatMessage, DIGEST_ENTRY_MAX, Heartbeat, delta_mtu};

/// Bytes of SWIM updates piggybacked on one message.
pub(crate) const PIGGYBACK_BYTES: usize = 600;
/// Silence from every peer after which this node takes itself to be cut off, in gossip
/// intervals (each round it sends three SYNs and a probe, and answers are immediate).
const DEAF_AFTER_ROUNDS: u32 = 3;
/// Longest time a cut-off node holds its suspicions: past it, silence means the others died.
const MAX_DEAF_PAUSE: std::time::Duration = std::time::Duration::from_secs(10);
/// Rounds between full scans of the table for changes (`note_changes`).
const FULL_SCAN_ROUNDS: u32 = 10;
/// Dead members told to a peer on a full exchange (so a node that just joined does not take a
/// long-dead member it learns of from a table for a live one).
const DEAD_ON_FULL: usize = 16;

impl Chitchat {
    pub(crate) fn is_v2(&self) -> bool {
        self.swim.is_some()
    }

    /// The V2 SYN: scoped digest (or the next range of a sweep) and piggybacked updates.
    pub(crate) fn create_syn2(&mut self) -> ChitchatMessage {
        let now = Instant::now();
        let sfd: HashSet<ChitchatId> = self.scheduled_for_deletion_nodes().cloned().collect();
        let sfd_ref: HashSet<&ChitchatId> = sfd.iter().collect();
        self.note_changes(now);
        let sweep = self.sync.next_sweep();
        let (digest, sweep) = if let Some(sweep) = sweep {
            let budget = self.sync.sweep_budget();
            let (digest, covered) = self
                .cluster_state
                .compute_range_digest(&sweep, budget, &sfd_ref);
            (digest, Some(covered))
        } else {
            let mut ids = vec![self.self_chitchat_id().clone()];
            ids.extend(self.sync.recent(now));
            ids.extend(self.sync.window(self.cluster_state.node_states()));
            let ids: Vec<ChitchatId> = ids.into_iter().filter(|id| !sfd.contains(id)).collect();
            (self.cluster_state.compute_digest_of(&ids, &sfd_ref), None)
        };
        ChitchatMessage::Syn2 {
            cluster_id: self.config.cluster_id.clone(),
            from: self.self_chitchat_id().clone(),
            sweep,
            digest,
            updates: self.piggyback(PIGGYBACK_BYTES),
        }
    }

    pub(crate) fn process_syn2(
        &mut self,
        from: ChitchatId,
        sweep: Option<crate::Sweep>,
        digest: Digest,
        updates: Vec<MemberUpdate>,
    ) -> ChitchatMessage {
        let now = Instant::now();
        // A sweep digest lists only ids in its range: anything else in it is not ours to take.
        let digest = match &sweep {
            Some(sweep) => in_range(digest, sweep),
            None => digest,
        };
        let mut news = self.observe_digest(&digest, Some(&from), now);
        self.apply_updates(&updates, now);
        let sfd: HashSet<ChitchatId> = self.scheduled_for_deletion_nodes().cloned().collect();
        let sfd_ref: HashSet<&ChitchatId> = sfd.iter().collect();
        let (echo, swept) = if let Some(sweep) = &sweep {
            let budget = self.sync.sweep_budget();
            let (echo, covered) = self
                .cluster_state
                .compute_range_digest(sweep, budget, &sfd_ref);
            (echo, Some(covered))
        } else {
            // Our recent changes too, so the initiator can ask for those it lacks (pull).
            let recent = self.sync.recent(now);
            let ids = digest.node_digests.keys().chain(recent.iter());
            (self.cluster_state.compute_digest_of(ids, &sfd_ref), None)
        };
        if let Some(swim) = self.swim.as_ref() {
            news.extend(swim.news_for(&from));
            if sweep.is_some() {
                news.extend(dead_members(swim, self.self_chitchat_id(), DEAD_ON_FULL));
            }
        }
        news.truncate(MAX_UPDATES_PER_MESSAGE / 2);
        let room = MAX_UPDATES_PER_MESSAGE - news.len();
        let bytes = PIGGYBACK_BYTES.saturating_sub(updates_len(&news));
        let mut updates = news;
        if let Some(swim) = self.swim.as_mut() {
            updates.extend(swim.piggyback_at_most(bytes, room));
        }
        let protocol_version = self.config.protocol_version;
        let reserved = echo.serialized_len(protocol_version) + updates_len(&updates);
        let delta = if let Some(swept) = &swept {
            // Everything of ours in the range we covered that the initiator lacks.
            self.cluster_state.compute_range_delta_respecting_mtu(
                &digest,
                delta_mtu(reserved),
                &sfd_ref,
                swept,
            )
        } else {
            self.cluster_state.compute_scoped_delta_respecting_mtu(
                &digest,
                delta_mtu(reserved),
                &sfd_ref,
            )
        };
        ChitchatMessage::SynAck2 {
            digest: echo,
            delta,
            swept,
            updates,
        }
    }

    pub(crate) fn process_syn_ack2(
        &mut self,
        digest: Digest,
        delta: Delta,
        swept: Option<crate::Sweep>,
        updates: Vec<MemberUpdate>,
    ) -> ChitchatMessage {
        let now = Instant::now();
        if let Some(swept) = &swept {
            self.sync.swept(swept);
        }
        self.observe_digest(&digest, None, now);
        self.apply_updates(&updates, now);
        self.process_delta_v2(delta);
        let sfd: HashSet<ChitchatId> = self.scheduled_for_deletion_nodes().cloned().collect();
        let sfd_ref: HashSet<&ChitchatId> = sfd.iter().collect();
        let request = self.behind_on(&digest, &sfd_ref);
        let updates = self.piggyback(PIGGYBACK_BYTES);
        let reserved = updates_len(&updates) + request.serialized_len(self.config.protocol_version);
        let delta = self.cluster_state.compute_scoped_delta_respecting_mtu(
            &digest,
            delta_mtu(reserved),
            &sfd_ref,
        );
        ChitchatMessage::Ack2 {
            delta,
            request,
            updates,
        }
    }

    /// Our digest of the ids `digest` shows newer than we hold.
    fn behind_on(&self, digest: &Digest, sfd: &HashSet<&ChitchatId>) -> Digest {
        let behind = digest.node_digests.iter().filter(|(id, theirs)| {
            !sfd.contains(id)
                && self
                    .cluster_state
                    .node_state(id)
                    .is_some_and(|ours| ours.max_version() < theirs.max_version)
        });
        self.cluster_state
            .compute_digest_of(behind.map(|(id, _)| id), sfd)
    }

    /// An ACK; one with a request is answered with what was asked for.
    pub(crate) fn process_ack2(
        &mut self,
        delta: Delta,
        request: Digest,
        updates: Vec<MemberUpdate>,
    ) -> Option<ChitchatMessage> {
        self.apply_updates(&updates, Instant::now());
        self.process_delta_v2(delta);
        if request.node_digests.is_empty() {
            return None;
        }
        let sfd: HashSet<ChitchatId> = self.scheduled_for_deletion_nodes().cloned().collect();
        let sfd_ref: HashSet<&ChitchatId> = sfd.iter().collect();
        let updates = self.piggyback(PIGGYBACK_BYTES);
        let delta = self.cluster_state.compute_scoped_delta_respecting_mtu(
            &request,
            delta_mtu(
                updates_len(&updates)
                    + Digest::default().serialized_len(self.config.protocol_version),
            ),
            &sfd_ref,
        );
        Some(ChitchatMessage::Ack2 {
            delta,
            request: Digest::default(),
            updates,
        })
    }

    /// Notes what changed for the recent set: this node's own entry always (cheap), the whole
    /// table once in a while (a safety net for changes that bypass deltas: key GC, resets).
    fn note_changes(&mut self, now: Instant) {
        let self_id = self.self_chitchat_id().clone();
        if let Some(state) = self.cluster_state.node_state(&self_id) {
            self.sync.touch(&self_id, state.monotonic_property(), now);
        }
        let every = self.config.gossip_interval * FULL_SCAN_ROUNDS;
        if now.saturating_duration_since(self.last_scan) >= every {
            self.last_scan = now;
            self.sync.observe(
                self.cluster_state
                    .node_states()
                    .iter()
                    .map(|(id, state)| (id, &**state)),
                now,
            );
        }
    }

    /// Applies a delta; one that touched ids outside what this node held recently means it is
    /// behind, so its next SYN carries every entry.
    fn process_delta_v2(&mut self, delta: Delta) {
        let touched: Vec<ChitchatId> = delta
            .node_deltas
            .iter()
            .map(|node| node.chitchat_id.clone())
            .collect();
        let nodes = delta.node_deltas.len();
        if nodes > 0 && delta_fills_message(&delta) {
            self.sync.catch_up();
        }
        if nodes > 0 {
            // meshd rebuilds its view from the live-nodes watch: publish the change now rather
            // than at the end of the round.
            self.liveness_dirty = true;
        }
        self.process_delta(delta);
        let now = Instant::now();
        for id in &touched {
            if let Some(state) = self.cluster_state.node_state(id) {
                self.sync.touch(id, state.monotonic_property(), now);
            }
        }
    }

    /// Takes in the ids of a peer's digest (within [`crate::Admission`]) and their
    /// incarnations. Returns what to tell `from` when it lists itself under an incarnation this
    /// node already saw die and forgot: so it refutes with a higher one and is taken back.
    pub(crate) fn observe_digest(
        &mut self,
        digest: &Digest,
        from: Option<&ChitchatId>,
        now: Instant,
    ) -> Vec<MemberUpdate> {
        // Computed (O(N)) only if an unknown id shows up.
        let mut room: Option<Option<usize>> = None;
        let mut news = Vec::new();
        for (id, entry) in &digest.node_digests {
            // An empty entry is a peer saying it holds nothing of this id; an earlier life of
            // this node is left to die in the others' views (it answers no probe).
            if id.node_id == self.self_chitchat_id().node_id || *entry == NodeDigest::default() {
                continue;
            }
            if let Some(forgotten) = self.cluster_state.last_heartbeat_if_deleted(id)
                && forgotten >= entry.heartbeat
            {
                if from == Some(id) {
                    news.push(MemberUpdate {
                        kind: UpdateKind::Dead,
                        node: id.clone(),
                        incarnation: forgotten.0,
                        from: self.self_chitchat_id().node_id.clone(),
                    });
                }
                continue;
            }
            if self.cluster_state.node_state(id).is_none() {
                let room = room.get_or_insert_with(|| self.admission_room());
                if !self.admit(room, id) {
                    continue;
                }
                self.sync.touch(id, (0, 0), now);
                self.sync.note_admitted(now);
                self.failure_detector.set_liveness(id, true);
            }
            // Most digests repeat what this node holds: look before writing, as a write copies
            // a state the live-nodes watch shares.
            let newer = self.cluster_state.node_state(id).is_none_or(|state| {
                state.heartbeat().0 == 0 || entry.heartbeat > state.heartbeat()
            });
            if newer {
                self.cluster_state
                    .node_state_mut_or_init(id)
                    .try_set_heartbeat(entry.heartbeat);
            }
            if let Some(swim) = self.swim.as_mut()
                && swim.observe(id, entry.heartbeat.0, now)
            {
                self.liveness_dirty = true;
            }
        }
        news
    }

    /// Applies SWIM updates from a peer; a refutation of our own becomes our heartbeat.
    pub(crate) fn apply_updates(&mut self, updates: &[MemberUpdate], now: Instant) {
        let Some(swim) = self.swim.as_mut() else {
            return;
        };
        let mut changed = false;
        for update in updates {
            changed |= swim.apply(update, now);
        }
        if changed {
            self.liveness_dirty = true;
        }
        let incarnation = swim.incarnation();
        let self_state = self.self_node_state();
        if self_state.heartbeat().0 < incarnation {
            self_state.try_set_heartbeat(Heartbeat(incarnation));
        }
    }

    /// SWIM updates for one outgoing message.
    pub(crate) fn piggyback(&mut self, max_bytes: usize) -> Vec<MemberUpdate> {
        self.swim
            .as_mut()
            .map(|swim| swim.piggyback(max_bytes))
            .unwrap_or_default()
    }

    /// A peer's message arrived.
    pub(crate) fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// Suspicion timers (held while this node hears no one: see [`crate::swim::Swim::postpone`]),
    /// then the failure detector's live and dead sets from SWIM's statuses.
    /// Returns whether the live set or a live member's state may have changed (else the
    /// live-nodes watch needs no recomputation).
    pub(crate) fn update_liveness_v2(&mut self, now: Instant) -> bool {
        let deaf_after = self.config.gossip_interval * DEAF_AFTER_ROUNDS;
        let Some(swim) = self.swim.as_mut() else {
            return false;
        };
        // With a single peer, silence cannot tell its death from our isolation: SWIM decides.
        let deaf = now.saturating_duration_since(self.last_heard) > deaf_after
            && swim.live().nth(1).is_some();
        let hold = match (deaf, self.deaf_since) {
            (true, None) => {
                self.deaf_since = Some(self.last_heard + deaf_after);
                true
            }
            (true, Some(since)) => now.saturating_duration_since(since) < MAX_DEAF_PAUSE,
            (false, Some(since)) => {
                self.deaf_since = None;
                swim.postpone(now.saturating_duration_since(since).min(MAX_DEAF_PAUSE));
                false
            }
            (false, None) => false,
        };
        if !hold {
            for dead in swim.tick(now) {
                warn!(node_id = %dead.node_id, "declared dead by SWIM");
            }
        }
        // The failure detector's sets follow SWIM's: only the differences are applied (its
        // live set starts each member at admission, `observe_digest`).
        let dead: HashSet<&ChitchatId> = swim.dead().collect();
        let revived: Vec<ChitchatId> = self
            .failure_detector
            .dead_nodes()
            .filter(|id| !dead.contains(id) && swim.status(id).is_some())
            .cloned()
            .collect();
        let died: Vec<ChitchatId> = dead
            .iter()
            .filter(|id| !self.failure_detector.is_dead(id))
            .map(|id| (*id).clone())
            .collect();
        let changed = self.liveness_dirty || !revived.is_empty() || !died.is_empty();
        for id in &revived {
            self.failure_detector.set_liveness(id, true);
        }
        for id in &died {
            self.failure_detector.set_liveness(id, false);
        }
        self.liveness_dirty = false;
        changed
    }

    /// Graceful leave: tell the cluster this node is dead (it stops refuting).
    pub fn announce_leave(&mut self) {
        if let Some(swim) = self.swim.as_mut() {
            swim.leave();
        }
    }

    /// Room left in the table's digest bound, if there is one.
    pub(crate) fn admission_room(&self) -> Option<usize> {
        self.config.admission.as_ref().map(|admission| {
            let used: usize = self
                .cluster_state
                .nodes()
                .map(|id| id.serialized_len() + DIGEST_ENTRY_MAX)
                .sum();
            admission.max_digest_len.saturating_sub(used)
        })
    }

    /// Whether a new id may enter the table (and takes its room).
    pub(crate) fn admit(&mut self, room: &mut Option<usize>, id: &ChitchatId) -> bool {
        let (Some(room), Some(admission)) = (room.as_mut(), self.config.admission.as_ref()) else {
            return true;
        };
        let len = id.serialized_len() + DIGEST_ENTRY_MAX;
        if len > *room || !(admission.accept)(id) {
            self.refused_admissions += 1;
            return false;
        }
        *room -= len;
        true
    }
}

use crate::serialize::Serializable as _;

/// The entries of `digest` inside `range`.
fn in_range(mut digest: Digest, range: &crate::Sweep) -> Digest {
    digest.node_digests.retain(|id, _| range.contains(id));
    digest
}

/// A delta that used most of a datagram: the sender had more than fit.
fn delta_fills_message(delta: &Delta) -> bool {
    delta.serialized_len() > delta_mtu(0) / 2
}

/// Up to `max` dead members as updates from this node.
fn dead_members(swim: &crate::swim::Swim, self_id: &ChitchatId, max: usize) -> Vec<MemberUpdate> {
    swim.dead()
        .take(max)
        .filter_map(|id| {
            Some(MemberUpdate {
                kind: UpdateKind::Dead,
                node: id.clone(),
                incarnation: swim.member_incarnation(id)?,
                from: self_id.node_id.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::sync::watch;

    use super::*;
    use crate::{ChitchatConfig, ChitchatEnvelope, ProtocolVersion};

    fn node(port: u16) -> Chitchat {
        node_with_window(port, crate::SyncConfig::default().window)
    }

    fn node_with_window(port: u16, window: usize) -> Chitchat {
        let mut config = ChitchatConfig::for_test(port);
        config.sync.window = window;
        config.protocol_version = ProtocolVersion::V2;
        config.gossip_interval = Duration::from_millis(200);
        let seeds: watch::Receiver<HashSet<SocketAddr>> = watch::channel(HashSet::new()).1;
        Chitchat::with_chitchat_id_and_seeds(config, seeds, Vec::new())
    }

    /// Runs a V2 exchange initiated by `a`, through the wire codec, and returns the messages'
    /// encoded sizes.
    fn exchange(a: &mut Chitchat, b: &mut Chitchat) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut wire = |message: ChitchatMessage| {
            let envelope = ChitchatEnvelope {
                version: ProtocolVersion::V2,
                message,
            };
            let bytes = envelope.serialize_to_vec();
            sizes.push(bytes.len());
            ChitchatEnvelope::deserialize(&mut &bytes[..])
                .unwrap()
                .message
        };
        let syn = wire(a.create_syn_message());
        let mut reply = b.process_message(syn);
        let mut turn = 0;
        while let Some(message) = reply {
            let message = wire(message);
            reply = if turn % 2 == 0 {
                a.process_message(message)
            } else {
                b.process_message(message)
            };
            turn += 1;
            assert!(turn < 4, "an exchange is at most four messages");
        }
        sizes
    }

    fn value(of: &Chitchat, owner: &Chitchat, key: &str) -> Option<String> {
        of.node_state(owner.self_chitchat_id())?
            .get(key)
            .map(str::to_owned)
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_pushed_and_pulled() {
        // No rotating window: only recent changes are compared, so the pull is what finds it.
        let (mut a, mut b, mut c) = (
            node_with_window(20_001, 0),
            node_with_window(20_002, 0),
            node_with_window(20_003, 0),
        );
        // Everyone meets everyone (first SYNs are full).
        for _ in 0..2 {
            exchange(&mut a, &mut b);
            exchange(&mut b, &mut c);
            exchange(&mut c, &mut a);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        // Push: c changes and initiates.
        c.self_node_state().set("k", "pushed");
        exchange(&mut c, &mut a);
        assert_eq!(value(&a, &c, "k").as_deref(), Some("pushed"));
        // Pull: b initiates with a, which holds c's change as recent; b's own digest does not
        // list it as changed.
        assert_eq!(value(&b, &c, "k"), None);
        let sizes = exchange(&mut b, &mut a);
        assert_eq!(value(&b, &c, "k").as_deref(), Some("pushed"));
        assert_eq!(
            sizes.len(),
            4,
            "SYN, SYN-ACK, ACK with a request, ACK answering it"
        );
    }

    /// Median SYN size of a hub in a settled cluster of `n`, and its full digest's size.
    async fn settled_syn_size(n: u16, base: u16) -> (usize, usize) {
        let mut nodes: Vec<Chitchat> = (0..n).map(|i| node(base + i)).collect();
        let (hub, rest) = nodes.split_first_mut().unwrap();
        for other in rest.iter_mut() {
            exchange(other, hub);
        }
        for other in rest.iter_mut() {
            exchange(hub, other);
        }
        // Long after every entry stopped being recent.
        tokio::time::advance(Duration::from_secs(10)).await;
        let (hub, rest) = nodes.split_first_mut().unwrap();
        let mut sizes: Vec<usize> = (0..20).map(|i| exchange(hub, &mut rest[i])[0]).collect();
        sizes.sort_unstable();
        let full = hub.cluster_state.compute_digest(&HashSet::new());
        (
            sizes[sizes.len() / 2],
            full.serialized_len(ProtocolVersion::V2),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn steady_state_digests_do_not_grow_with_the_table() {
        let (small, small_full) = settled_syn_size(30, 21_000).await;
        let (large, large_full) = settled_syn_size(240, 22_000).await;
        assert!(large_full > 3 * small_full, "{large_full} vs {small_full}");
        // Eight times the members; the SYN keeps its size (own entry and an 8-entry window).
        assert!(
            large * 10 < small * 13,
            "SYN of {large} bytes at 240 members vs {small} at 30"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_node_is_told_and_refutes_back_in() {
        let (mut a, mut b) = (node(23_001), node(23_002));
        exchange(&mut a, &mut b);
        exchange(&mut b, &mut a);
        let b_id = b.self_chitchat_id().clone();
        // a declared b dead and collected it, as after a long partition.
        a.cluster_state.remove_node(&b_id);
        a.swim.as_mut().unwrap().remove(&b_id);
        assert!(a.node_state(&b_id).is_none());
        // b's next SYN lists itself at the incarnation a forgot: a tells b it is dead...
        exchange(&mut b, &mut a);
        assert!(a.node_state(&b_id).is_none());
        assert!(b.swim.as_ref().unwrap().incarnation() > 1, "b refuted");
        // ...and b, at a higher incarnation, is taken back.
        exchange(&mut b, &mut a);
        assert!(a.node_state(&b_id).is_some());
    }

    #[test]
    fn v2_messages_need_a_v2_envelope() {
        let message = ChitchatMessage::PingAck {
            seq: 7,
            from: ChitchatId::for_local_test(1),
            updates: Vec::new(),
        };
        let mut bytes = ChitchatEnvelope {
            version: ProtocolVersion::V2,
            message,
        }
        .serialize_to_vec();
        assert!(ChitchatEnvelope::deserialize(&mut &bytes[..]).is_ok());
        bytes[2] = ProtocolVersion::V1.to_code();
        assert!(ChitchatEnvelope::deserialize(&mut &bytes[..]).is_err());
    }
}
