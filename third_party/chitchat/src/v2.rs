//! Protocol V2 in [`Chitchat`] (meshd): scoped digests (`sync.rs`) and SWIM membership
//! (`swim.rs`) in place of a heartbeat per member in every digest.
//!
//! A V2 node's heartbeat is its SWIM incarnation: it changes only when the node refutes a
//! suspicion, so digest entries stay the same round after round and only what changed travels.

use std::collections::HashSet;

use tokio::time::Instant;
use tracing::warn;

use crate::delta::Delta;
use crate::digest::Digest;
use crate::message_serialize::updates_len;
use crate::swim::{MAX_UPDATES_PER_MESSAGE, MemberUpdate, Status, UpdateKind};
use crate::{Chitchat, ChitchatId, ChitchatMessage, DIGEST_ENTRY_MAX, Heartbeat, delta_mtu};

/// Bytes of SWIM updates piggybacked on one message.
pub(crate) const PIGGYBACK_BYTES: usize = 600;
/// Silence from every peer after which this node takes itself to be cut off, in gossip
/// intervals (each round it sends three SYNs and a probe, and answers are immediate).
const DEAF_AFTER_ROUNDS: u32 = 3;
/// Longest time a cut-off node holds its suspicions: past it, silence means the others died.
const MAX_DEAF_PAUSE: std::time::Duration = std::time::Duration::from_secs(10);
/// Dead members told to a peer on a full exchange (so a node that just joined does not take a
/// long-dead member it learns of from a table for a live one).
const DEAD_ON_FULL: usize = 16;

impl Chitchat {
    pub(crate) fn is_v2(&self) -> bool {
        self.swim.is_some()
    }

    /// The V2 SYN: scoped (or full) digest and piggybacked updates.
    pub(crate) fn create_syn2(&mut self) -> ChitchatMessage {
        let now = Instant::now();
        let sfd: HashSet<ChitchatId> = self.scheduled_for_deletion_nodes().cloned().collect();
        let sfd_ref: HashSet<&ChitchatId> = sfd.iter().collect();
        self.sync
            .observe(self.cluster_state.node_states().iter(), now);
        let full = self.sync.next_is_full();
        let digest = if full {
            self.cluster_state.compute_digest(&sfd_ref)
        } else {
            let mut ids = vec![self.self_chitchat_id().clone()];
            ids.extend(self.sync.recent(now));
            ids.extend(self.sync.window(self.cluster_state.node_states()));
            let ids: Vec<ChitchatId> = ids.into_iter().filter(|id| !sfd.contains(id)).collect();
            self.cluster_state.compute_digest_of(&ids, &sfd_ref)
        };
        ChitchatMessage::Syn2 {
            cluster_id: self.config.cluster_id.clone(),
            from: self.self_chitchat_id().clone(),
            full,
            digest,
            updates: self.piggyback(PIGGYBACK_BYTES),
        }
    }

    pub(crate) fn process_syn2(
        &mut self,
        from: ChitchatId,
        full: bool,
        digest: Digest,
        updates: Vec<MemberUpdate>,
    ) -> ChitchatMessage {
        let now = Instant::now();
        let mut news = self.observe_digest(&digest, Some(&from), now);
        self.apply_updates(&updates, now);
        let sfd: HashSet<ChitchatId> = self.scheduled_for_deletion_nodes().cloned().collect();
        let sfd_ref: HashSet<&ChitchatId> = sfd.iter().collect();
        let echo = if full {
            self.cluster_state.compute_digest(&sfd_ref)
        } else {
            self.cluster_state
                .compute_digest_of(digest.node_digests.keys(), &sfd_ref)
        };
        if let Some(swim) = self.swim.as_ref() {
            news.extend(swim.news_for(&from));
            if full {
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
        let delta = if full {
            self.cluster_state.compute_partial_delta_respecting_mtu(
                &digest,
                delta_mtu(reserved),
                &sfd_ref,
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
            updates,
        }
    }

    pub(crate) fn process_syn_ack2(
        &mut self,
        digest: Digest,
        delta: Delta,
        updates: Vec<MemberUpdate>,
    ) -> ChitchatMessage {
        let now = Instant::now();
        self.observe_digest(&digest, None, now);
        self.apply_updates(&updates, now);
        self.process_delta_v2(delta);
        let sfd: HashSet<ChitchatId> = self.scheduled_for_deletion_nodes().cloned().collect();
        let sfd_ref: HashSet<&ChitchatId> = sfd.iter().collect();
        let updates = self.piggyback(PIGGYBACK_BYTES);
        let delta = self.cluster_state.compute_scoped_delta_respecting_mtu(
            &digest,
            delta_mtu(updates_len(&updates)),
            &sfd_ref,
        );
        ChitchatMessage::Ack2 { delta, updates }
    }

    pub(crate) fn process_ack2(&mut self, delta: Delta, updates: Vec<MemberUpdate>) {
        self.apply_updates(&updates, Instant::now());
        self.process_delta_v2(delta);
    }

    /// Applies a delta; one that touched ids outside what this node held recently means it is
    /// behind, so its next SYN carries every entry.
    fn process_delta_v2(&mut self, delta: Delta) {
        let nodes = delta.node_deltas.len();
        if nodes > 0 && delta_fills_message(&delta) {
            self.sync.catch_up();
        }
        self.process_delta(delta);
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
        let mut room = self.admission_room();
        let mut news = Vec::new();
        for (id, entry) in &digest.node_digests {
            // An empty entry is a peer saying it holds nothing of this id.
            if id == self.self_chitchat_id() || entry.heartbeat.0 == 0 {
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
            if self.cluster_state.node_state(id).is_none() && !self.admit(&mut room, id) {
                continue;
            }
            self.cluster_state
                .node_state_mut_or_init(id)
                .try_set_heartbeat(entry.heartbeat);
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
    pub(crate) fn update_liveness_v2(&mut self, now: Instant) {
        let self_id = self.self_chitchat_id().clone();
        let deaf_after = self.config.gossip_interval * DEAF_AFTER_ROUNDS;
        let Some(swim) = self.swim.as_mut() else {
            return;
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
        for id in self.cluster_state.nodes() {
            if *id == self_id {
                continue;
            }
            let live = !matches!(swim.status(id), Some(Status::Dead));
            self.failure_detector.set_liveness(id, live);
        }
        self.liveness_dirty = false;
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
