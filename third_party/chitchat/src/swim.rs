//! SWIM membership and failure detection, with Lifeguard's suspicion subprotocol.
//!
//! This module owns the *membership view* that SWIM (Das, Gupta, Motivala, "SWIM: Scalable
//! Weakly-consistent Infection-style Process Group Membership Protocol", DSN 2002) maintains:
//! per member an incarnation number and an Alive / Suspect / Dead status, the precedence rules
//! that decide which claim wins, the round-robin probe order, and the queue of membership
//! updates that are piggybacked ("infection-style") on outgoing messages.
//!
//! Suspicion timeouts follow Lifeguard (Dadgar, Phillips, Currey, "Lifeguard: Local Health
//! Awareness for More Accurate Failure Detection", 2018): a suspicion starts with a long
//! timeout that shrinks logarithmically as independent members confirm it. A member that is
//! really down gets confirmed quickly by everyone probing it, while a false suspicion raised
//! by one slow or partitioned node rarely gathers confirmations and leaves the suspect time to
//! refute.
//!
//! Two rules of ours keep a holder of the shared gossip key, who can send claims under any
//! name, from killing a reachable member: another node's `Dead` is only a suspicion here (only
//! this node's own timer declares death), and confirmations shorten a suspicion only once this
//! node's own probe of the suspect failed too (claims in our own name from the wire are
//! ignored). A forged death then costs the member a refutation, not an outage.
//!
//! It is a pure state machine: it performs no I/O and never reads a clock. Every time is
//! passed in as `now`, and the caller does the probing, the sending, and decides which new
//! node ids to admit. That keeps the protocol logic deterministic and testable without
//! sockets or sleeping, and lets the integrator choose transports and timers.

// Some accessors (`len`, `suspicion_deadline`, ...) are not used by the server yet.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use rand::RngExt;
use rand::seq::SliceRandom;
use tokio::time::Instant;

use crate::ChitchatId;
use crate::serialize::{Deserializable, Serializable};

/// Highest incarnation accepted from the wire (an update above it is ignored) so nobody can
/// push a node's incarnation to where it could not refute.
///
/// The one exception is an `Alive` at exactly `MAX_INCARNATION + 1`: that is what a node
/// suspected at `MAX_INCARNATION` refutes with, and rejecting it would make such a
/// suspicion irrefutable, defeating the purpose of the bound.
pub const MAX_INCARNATION: u64 = 1 << 48;

/// Most updates a peer may put in one message; bounds the work a single datagram can cause.
pub const MAX_UPDATES_PER_MESSAGE: usize = 64;

/// Bound on the broadcast queue, so a flood of distinct updates cannot grow memory.
const MAX_QUEUED_UPDATES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpdateKind {
    Alive = 0,
    Suspect = 1,
    Dead = 2,
}

impl TryFrom<u8> for UpdateKind {
    type Error = anyhow::Error;

    fn try_from(byte: u8) -> anyhow::Result<Self> {
        match byte {
            0 => Ok(UpdateKind::Alive),
            1 => Ok(UpdateKind::Suspect),
            2 => Ok(UpdateKind::Dead),
            _ => bail!("invalid SWIM update kind `{byte}`"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberUpdate {
    pub kind: UpdateKind,
    pub node: ChitchatId,
    pub incarnation: u64,
    /// node_id of who claims it: the suspecter (Suspect), the declarer (Dead: a suspicion to
    /// every node but the declarer), the node itself
    /// (Alive).
    pub from: Arc<str>,
}

impl Serializable for MemberUpdate {
    fn serialize(&self, buf: &mut Vec<u8>) {
        (self.kind as u8).serialize(buf);
        self.node.serialize(buf);
        self.incarnation.serialize(buf);
        self.from.serialize(buf);
    }

    fn serialized_len(&self) -> usize {
        1 + self.node.serialized_len() + 8 + self.from.serialized_len()
    }
}

impl Deserializable for MemberUpdate {
    fn deserialize(buf: &mut &[u8]) -> anyhow::Result<Self> {
        let kind = UpdateKind::try_from(u8::deserialize(buf)?)?;
        let node = ChitchatId::deserialize(buf)?;
        let incarnation = u64::deserialize(buf)?;
        let from = Arc::<str>::deserialize(buf)?;
        Ok(MemberUpdate {
            kind,
            node,
            incarnation,
            from,
        })
    }
}

/// A list of updates: u8 count then the updates (at most 255 are written, extra ones are
/// dropped; `deserialize_updates` refuses more than [`MAX_UPDATES_PER_MESSAGE`], which
/// [`Swim::piggyback`] never exceeds).
pub fn serialize_updates(updates: &[MemberUpdate], buf: &mut Vec<u8>) {
    let count = updates.len().min(u8::MAX as usize);
    (count as u8).serialize(buf);
    for update in &updates[..count] {
        update.serialize(buf);
    }
}

pub fn serialized_updates_len(updates: &[MemberUpdate]) -> usize {
    let count = updates.len().min(u8::MAX as usize);
    1 + updates[..count]
        .iter()
        .map(Serializable::serialized_len)
        .sum::<usize>()
}

pub fn deserialize_updates(buf: &mut &[u8]) -> anyhow::Result<Vec<MemberUpdate>> {
    let count = u8::deserialize(buf)? as usize;
    if count > MAX_UPDATES_PER_MESSAGE {
        bail!("too many SWIM updates in one message ({count} > {MAX_UPDATES_PER_MESSAGE})");
    }
    (0..count).map(|_| MemberUpdate::deserialize(buf)).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Alive,
    Suspect,
    Dead,
}

#[derive(Debug, Clone)]
pub struct SwimConfig {
    /// Suspicion timeout floor per log10(members) unit: the floor is
    /// `suspicion_min * max(1, log10(N))` (N = known members incl. self).
    pub suspicion_min: Duration,
    /// Ceiling = floor * this (Lifeguard: 6).
    pub suspicion_max_mult: u32,
    /// Lifeguard's K: confirmations (distinct suspecters besides the first) at which the
    /// timeout reaches the floor; they count only once this node is one of the suspecters,
    /// and K is lowered to what a cluster smaller than K + 2 can give.
    pub expected_confirmations: u32,
    /// Each update is piggybacked at most retransmit_mult * ceil(log10(N+1)) times
    /// (memberlist's RetransmitMult, 4).
    pub retransmit_mult: u32,
}

#[derive(Debug, Clone)]
struct Suspicion {
    start: Instant,
    // Bounds are frozen when the suspicion starts so that membership churn during the
    // suspicion cannot move its deadline around.
    floor: Duration,
    ceiling: Duration,
    /// Confirmations that bring the timeout to the floor: K, or fewer in a cluster too small to
    /// give K (memberlist does the same), frozen like the bounds.
    k: u32,
    timeout: Duration,
    /// Distinct suspecters' node_ids, the original suspecter first.
    confirmers: Vec<Arc<str>>,
}

#[derive(Debug, Clone)]
enum State {
    Alive,
    Suspect(Suspicion),
    // Who declared it is kept so `news_for` can tell the node whom to refute.
    Dead { by: Arc<str> },
}

#[derive(Debug, Clone)]
struct Member {
    incarnation: u64,
    state: State,
}

impl Member {
    fn status(&self) -> Status {
        match self.state {
            State::Alive => Status::Alive,
            State::Suspect(_) => Status::Suspect,
            State::Dead { .. } => Status::Dead,
        }
    }

    fn is_live(&self) -> bool {
        !matches!(self.state, State::Dead { .. })
    }
}

#[derive(Debug, Clone)]
struct Queued {
    update: MemberUpdate,
    transmits: u32,
    // Insertion order, to send the newest first among equally transmitted updates.
    seq: u64,
}

/// The SWIM membership view of one node. See the module documentation.
#[derive(Debug)]
pub struct Swim {
    self_id: ChitchatId,
    incarnation: u64,
    leaving: bool,
    config: SwimConfig,
    // Ordered so that iteration (and hence a seeded probe order) is deterministic.
    members: BTreeMap<ChitchatId, Member>,
    queue: Vec<Queued>,
    next_seq: u64,
    probe_order: Vec<ChitchatId>,
    probe_pos: usize,
    // Members that became live since the current pass started; slotted into the remaining
    // order on the next `next_probe_target` call, which is the only place with an rng.
    probe_newcomers: Vec<ChitchatId>,
    confirmation_probes: Vec<ChitchatId>,
}

impl Swim {
    /// `incarnation` is clamped to [`MAX_INCARNATION`] so that we can always refute.
    pub fn new(self_id: ChitchatId, incarnation: u64, config: SwimConfig) -> Self {
        Swim {
            self_id,
            incarnation: incarnation.min(MAX_INCARNATION),
            leaving: false,
            config,
            members: BTreeMap::new(),
            queue: Vec::new(),
            next_seq: 0,
            probe_order: Vec::new(),
            probe_pos: 0,
            probe_newcomers: Vec::new(),
            confirmation_probes: Vec::new(),
        }
    }

    pub fn self_id(&self) -> &ChitchatId {
        &self.self_id
    }

    /// This node's own incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Known members excluding self (dead ones included until `remove`d).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A node seen through gossip state (its digest entry says `incarnation`): unknown ->
    /// added Alive at that incarnation (returns true, but nothing is queued since gossip
    /// already spreads it); known with a higher incarnation than ours -> treated like
    /// `apply(Alive(id, incarnation))`. Any id carrying our node_id is ignored.
    pub fn observe(&mut self, id: &ChitchatId, incarnation: u64, now: Instant) -> bool {
        if id.node_id == self.self_id.node_id || incarnation > MAX_INCARNATION + 1 {
            return false;
        }
        if self.members.contains_key(id) {
            return self.apply(&alive_update(id, incarnation), now);
        }
        self.insert_alive(id, incarnation);
        true
    }

    /// Forget a node (garbage-collected by the caller). Also drops its queued updates and
    /// probe-order slot.
    pub fn remove(&mut self, id: &ChitchatId) {
        if self.members.remove(id).is_none() {
            return;
        }
        self.queue.retain(|queued| &queued.update.node != id);
        if let Some(pos) = self.probe_order.iter().position(|probed| probed == id) {
            self.probe_order.remove(pos);
            if pos < self.probe_pos {
                self.probe_pos -= 1;
            }
        }
        self.probe_newcomers.retain(|newcomer| newcomer != id);
        self.confirmation_probes.retain(|suspect| suspect != id);
    }

    pub fn status(&self, id: &ChitchatId) -> Option<Status> {
        self.members.get(id).map(Member::status)
    }

    pub fn member_incarnation(&self, id: &ChitchatId) -> Option<u64> {
        self.members.get(id).map(|member| member.incarnation)
    }

    /// When the current suspicion of `id` expires (`None` if not suspect).
    pub fn suspicion_deadline(&self, id: &ChitchatId) -> Option<Instant> {
        match &self.members.get(id)?.state {
            State::Suspect(suspicion) => suspicion.start.checked_add(suspicion.timeout),
            _ => None,
        }
    }

    /// Members considered live (Alive or Suspect — SWIM keeps routing to a suspect until it
    /// is declared dead).
    pub fn live(&self) -> impl Iterator<Item = &ChitchatId> {
        self.members
            .iter()
            .filter(|(_, member)| member.is_live())
            .map(|(id, _)| id)
    }

    pub fn dead(&self) -> impl Iterator<Item = &ChitchatId> {
        self.members
            .iter()
            .filter(|(_, member)| !member.is_live())
            .map(|(id, _)| id)
    }

    /// Apply an update received from the wire. Returns true if it changed our state; the
    /// update is then queued for re-broadcast (for a claim about ourselves, what is queued
    /// is our refutation instead).
    ///
    /// Precedence (SWIM, with Lifeguard confirmations), X being a known node at status `s`
    /// and incarnation `i`, the update at incarnation `j` claimed by `f`:
    /// - `j > MAX_INCARNATION`: ignored (except `Alive` at `MAX_INCARNATION + 1`, a
    ///   refutation of a suspicion at the maximum).
    /// - About ourselves (whole `ChitchatId`): `Suspect`/`Dead` with `j >=` our incarnation
    ///   bumps it to `j + 1` and queues `Alive(self)`, unless we are leaving. `Alive` about
    ///   ourselves is ignored, and so is anything about another generation of our node_id
    ///   (an older life of us, or an impostor).
    /// - Unknown node: `Alive` adds it; `Suspect`/`Dead` are ignored (admitting new ids is
    ///   the caller's job, and bounded there).
    /// - `Alive(j)`: accepted iff `j > i` (so a dead node comes back only with a higher
    ///   incarnation); clears any suspicion.
    /// - `Suspect(j, f)`: ignored if `j < i`, or if `s` is Dead and `j == i`. Starts a new
    ///   suspicion (confirmers `{f}`, timer started now) if `j > i`, or if `s` is Alive and
    ///   `j == i`. If `s` is Suspect and `j == i`, `f` is a confirmation: a new confirmer
    ///   (up to `expected_confirmations + 1` in total, plus room for our own) is recorded and
    ///   forwarded, and shortens the deadline (recomputed from the suspicion's start) only if
    ///   our own probe confirmed it too ([`Swim::probe_failed`]); a repeated or surplus one
    ///   changes nothing.
    /// - `Dead(j, f)`: ignored if `s` is Dead; otherwise handled exactly as `Suspect(j, f)`
    ///   (and forwarded as that Suspect). Only our own suspicion timers ([`Swim::tick`])
    ///   declare another member Dead.
    pub fn apply(&mut self, update: &MemberUpdate, now: Instant) -> bool {
        if update.incarnation > max_accepted_incarnation(update.kind) {
            return false;
        }
        if update.node.node_id == self.self_id.node_id {
            return self.apply_about_self(update);
        }
        // Our own claims come from our own probes and timers, never from the wire: one in
        // our name there is an echo or a forgery, and counting it would let a forger stand in
        // for the confirmation only our failed probe may give.
        if update.from == self.self_id.node_id && update.kind != UpdateKind::Alive {
            return false;
        }
        if !self.members.contains_key(&update.node) {
            return self.admit(update);
        }
        match update.kind {
            UpdateKind::Alive => self.apply_alive(update),
            UpdateKind::Suspect => self.apply_suspect(update, now),
            // Someone else's word that a member died is a suspicion here: this node probes it
            // itself and declares it dead on its own timer (so a forged death of a reachable
            // member costs a refutation, not an outage).
            UpdateKind::Dead => {
                // A dead member stays dead whatever the incarnation (only an Alive brings it
                // back); without this, a Dead at a higher incarnation would revive it as Suspect.
                if !self.members.get(&update.node).is_some_and(Member::is_live) {
                    return false;
                }
                let claim = MemberUpdate {
                    kind: UpdateKind::Suspect,
                    ..update.clone()
                };
                self.apply_suspect(&claim, now)
            }
        }
    }

    /// Our own probe of `target` (direct and indirect) got no ack: we suspect it (or, if
    /// already suspect at that incarnation, we confirm it).
    pub fn probe_failed(&mut self, target: &ChitchatId, now: Instant) {
        self.forget_confirmation_probe(target);
        let Some(member) = self.members.get(target) else {
            return;
        };
        let update = self.own_claim(UpdateKind::Suspect, target, member.incarnation);
        match member.state {
            State::Alive => self.start_suspicion(&update, now),
            State::Suspect(_) => {
                self.add_confirmer(&update);
            }
            State::Dead { .. } => {}
        }
    }

    /// Suspicions whose deadline passed become Dead (queued as Dead updates from us).
    /// Returns the newly dead.
    pub fn tick(&mut self, now: Instant) -> Vec<ChitchatId> {
        let expired: Vec<ChitchatId> = self
            .members
            .iter()
            .filter(|(_, member)| match &member.state {
                State::Suspect(suspicion) => {
                    now.saturating_duration_since(suspicion.start) >= suspicion.timeout
                }
                _ => false,
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Some(incarnation) = self.member_incarnation(id) {
                self.apply_dead(&self.own_claim(UpdateKind::Dead, id, incarnation));
            }
        }
        expired
    }

    /// Next target of the periodic probe: round robin over live members (Alive+Suspect),
    /// order reshuffled with `rng` at the start of each pass (SWIM's round-robin probe order
    /// bounds time-to-first-detection); members added mid-pass are inserted at a random
    /// position in the remaining order.
    pub fn next_probe_target<R: rand::Rng + ?Sized>(&mut self, rng: &mut R) -> Option<ChitchatId> {
        self.slot_probe_newcomers(rng);
        if let Some(target) = self.advance_probe() {
            return Some(target);
        }
        self.probe_order = self.live().cloned().collect();
        self.probe_order.shuffle(rng);
        self.probe_pos = 0;
        self.probe_newcomers.clear();
        self.advance_probe()
    }

    /// Suspects we learned from others and have neither confirmed nor probed yet: the caller
    /// probes each once (a failure confirms via `probe_failed`; success does nothing here —
    /// the ping carries the suspicion so the node refutes it). Drains.
    pub fn take_confirmation_probes(&mut self) -> Vec<ChitchatId> {
        let mut probes = std::mem::take(&mut self.confirmation_probes);
        probes.retain(|id| self.needs_confirmation(id));
        probes
    }

    /// Updates to piggyback on one outgoing message, at most `max_bytes` serialized (count
    /// prefix included) and at most [`MAX_UPDATES_PER_MESSAGE`]: least-transmitted first
    /// (newest first among ties), each send counted; an update that does not fit is skipped
    /// in favour of smaller ones; an update is dropped from the queue after the retransmit
    /// limit.
    pub fn piggyback(&mut self, max_bytes: usize) -> Vec<MemberUpdate> {
        self.piggyback_at_most(max_bytes, MAX_UPDATES_PER_MESSAGE)
    }

    /// [`Swim::piggyback`] for a message that already carries other updates: at most
    /// `max_updates` (capped at [`MAX_UPDATES_PER_MESSAGE`]), so that the whole list still
    /// deserializes at the receiver.
    pub fn piggyback_at_most(&mut self, max_bytes: usize, max_updates: usize) -> Vec<MemberUpdate> {
        let max_updates = max_updates.min(MAX_UPDATES_PER_MESSAGE);
        let mut candidates: Vec<usize> = (0..self.queue.len()).collect();
        candidates.sort_by_key(|&idx| (self.queue[idx].transmits, Reverse(self.queue[idx].seq)));
        let mut used = 1;
        let mut picked = Vec::new();
        for idx in candidates {
            if picked.len() >= max_updates {
                break;
            }
            let len = self.queue[idx].update.serialized_len();
            if used + len <= max_bytes {
                used += len;
                self.queue[idx].transmits += 1;
                picked.push(self.queue[idx].update.clone());
            }
        }
        let limit = self.retransmit_limit();
        self.queue.retain(|queued| queued.transmits < limit);
        picked
    }

    /// What to tell `id` itself when it talks to us while we hold it Suspect or Dead (so it
    /// can refute): the Suspect/Dead update at its current incarnation, else None.
    pub fn news_for(&self, id: &ChitchatId) -> Option<MemberUpdate> {
        let member = self.members.get(id)?;
        let (kind, from) = match &member.state {
            State::Alive => return None,
            State::Suspect(suspicion) => (UpdateKind::Suspect, suspicion.confirmers.first()?),
            State::Dead { by } => (UpdateKind::Dead, by),
        };
        Some(MemberUpdate {
            kind,
            node: id.clone(),
            incarnation: member.incarnation,
            from: from.clone(),
        })
    }

    /// Time this node could not hear anyone does not count toward its suspicions: every
    /// suspicion's clock is moved forward by `by`. A node cut off from the network fails every
    /// probe it sends and hears no refutation; without this it would declare the whole
    /// cluster dead during an outage shorter than a refutation takes (Lifeguard's local health
    /// awareness answers the same problem by stretching timeouts).
    pub fn postpone(&mut self, by: Duration) {
        for member in self.members.values_mut() {
            if let State::Suspect(suspicion) = &mut member.state {
                suspicion.start += by;
            }
        }
    }

    /// Graceful leave: queue Dead(self) at our incarnation and stop refuting from now on.
    pub fn leave(&mut self) {
        self.leaving = true;
        let update = self.own_claim(UpdateKind::Dead, &self.self_id, self.incarnation);
        self.enqueue(update);
    }

    fn apply_about_self(&mut self, update: &MemberUpdate) -> bool {
        let refutable = update.node == self.self_id
            && update.kind != UpdateKind::Alive
            && update.incarnation >= self.incarnation;
        if !refutable || self.leaving {
            return false;
        }
        self.incarnation = update
            .incarnation
            .saturating_add(1)
            .min(MAX_INCARNATION + 1);
        self.enqueue(alive_update(&self.self_id, self.incarnation));
        true
    }

    fn admit(&mut self, update: &MemberUpdate) -> bool {
        if update.kind != UpdateKind::Alive {
            return false;
        }
        self.insert_alive(&update.node, update.incarnation);
        self.enqueue(update.clone());
        true
    }

    fn insert_alive(&mut self, id: &ChitchatId, incarnation: u64) {
        let member = Member {
            incarnation,
            state: State::Alive,
        };
        self.members.insert(id.clone(), member);
        self.note_probe_newcomer(id);
    }

    fn apply_alive(&mut self, update: &MemberUpdate) -> bool {
        let Some(member) = self.members.get_mut(&update.node) else {
            return false;
        };
        if update.incarnation <= member.incarnation {
            return false;
        }
        let was_live = member.is_live();
        member.incarnation = update.incarnation;
        member.state = State::Alive;
        self.forget_confirmation_probe(&update.node);
        if !was_live {
            self.note_probe_newcomer(&update.node);
        }
        self.enqueue(update.clone());
        true
    }

    fn apply_suspect(&mut self, update: &MemberUpdate, now: Instant) -> bool {
        let Some(member) = self.members.get(&update.node) else {
            return false;
        };
        if update.incarnation < member.incarnation {
            return false;
        }
        match (&member.state, update.incarnation == member.incarnation) {
            (State::Dead { .. }, true) => false,
            (State::Suspect(_), true) => self.add_confirmer(update),
            _ => {
                self.start_suspicion(update, now);
                true
            }
        }
    }

    fn apply_dead(&mut self, update: &MemberUpdate) -> bool {
        let Some(member) = self.members.get_mut(&update.node) else {
            return false;
        };
        if !member.is_live() || update.incarnation < member.incarnation {
            return false;
        }
        member.incarnation = update.incarnation;
        member.state = State::Dead {
            by: update.from.clone(),
        };
        self.forget_confirmation_probe(&update.node);
        self.enqueue(update.clone());
        true
    }

    /// `update` must be about a known member; it becomes Suspect at the update's incarnation.
    fn start_suspicion(&mut self, update: &MemberUpdate, now: Instant) {
        // N is counted before borrowing the member mutably; the member itself is included.
        let n = self.members.len() + 1;
        let (floor, ceiling) = suspicion_bounds(&self.config, n);
        // Besides the suspect and the first suspecter, n - 2 members can confirm.
        let k = self
            .config
            .expected_confirmations
            .min(u32::try_from(n.saturating_sub(2)).unwrap_or(u32::MAX))
            .max(1);
        let Some(member) = self.members.get_mut(&update.node) else {
            return;
        };
        let was_live = member.is_live();
        member.incarnation = update.incarnation;
        member.state = State::Suspect(Suspicion {
            start: now,
            floor,
            ceiling,
            k,
            timeout: lifeguard_timeout(floor, ceiling, 0, k),
            confirmers: vec![update.from.clone()],
        });
        if !was_live {
            self.note_probe_newcomer(&update.node);
        }
        if update.from != self.self_id.node_id {
            self.note_confirmation_probe(&update.node);
        }
        self.enqueue(update.clone());
    }

    /// Records `update.from` as confirming the current suspicion of `update.node`.
    fn add_confirmer(&mut self, update: &MemberUpdate) -> bool {
        let Some(Member {
            state: State::Suspect(suspicion),
            ..
        }) = self.members.get_mut(&update.node)
        else {
            return false;
        };
        let k = suspicion.k;
        // Bounded, but room is always made for this node's own confirmation.
        let full = suspicion.confirmers.len() > k as usize && update.from != self.self_id.node_id;
        if full || suspicion.confirmers.contains(&update.from) {
            return false;
        }
        suspicion.confirmers.push(update.from.clone());
        // Others' confirmations shorten a suspicion only once this node's own probe failed
        // too: claims alone (which a key holder can invent) leave it at the ceiling, time for
        // the member to hear of it and refute.
        let confirmations = if suspicion.confirmers.contains(&self.self_id.node_id) {
            (suspicion.confirmers.len() - 1) as u32
        } else {
            0
        };
        suspicion.timeout = lifeguard_timeout(suspicion.floor, suspicion.ceiling, confirmations, k);
        self.enqueue(update.clone());
        true
    }

    fn needs_confirmation(&self, id: &ChitchatId) -> bool {
        match self.members.get(id).map(|member| &member.state) {
            Some(State::Suspect(suspicion)) => {
                !suspicion.confirmers.contains(&self.self_id.node_id)
            }
            _ => false,
        }
    }

    fn note_confirmation_probe(&mut self, id: &ChitchatId) {
        if !self.confirmation_probes.contains(id) {
            self.confirmation_probes.push(id.clone());
        }
    }

    fn forget_confirmation_probe(&mut self, id: &ChitchatId) {
        self.confirmation_probes.retain(|suspect| suspect != id);
    }

    fn note_probe_newcomer(&mut self, id: &ChitchatId) {
        if !self.probe_newcomers.contains(id) {
            self.probe_newcomers.push(id.clone());
        }
    }

    fn slot_probe_newcomers<R: rand::Rng + ?Sized>(&mut self, rng: &mut R) {
        for id in std::mem::take(&mut self.probe_newcomers) {
            let live = self.members.get(&id).is_some_and(Member::is_live);
            if !live || self.probe_order.contains(&id) {
                continue;
            }
            let at = rng.random_range(self.probe_pos..=self.probe_order.len());
            self.probe_order.insert(at, id);
        }
    }

    fn advance_probe(&mut self) -> Option<ChitchatId> {
        while let Some(id) = self.probe_order.get(self.probe_pos) {
            self.probe_pos += 1;
            if self.members.get(id).is_some_and(Member::is_live) {
                return Some(id.clone());
            }
        }
        None
    }

    fn own_claim(&self, kind: UpdateKind, node: &ChitchatId, incarnation: u64) -> MemberUpdate {
        MemberUpdate {
            kind,
            node: node.clone(),
            incarnation,
            from: self.self_id.node_id.clone(),
        }
    }

    fn enqueue(&mut self, update: MemberUpdate) {
        self.queue
            .retain(|queued| !supersedes(&update, &queued.update));
        if self.queue.len() >= MAX_QUEUED_UPDATES {
            self.evict_most_transmitted();
        }
        self.queue.push(Queued {
            update,
            transmits: 0,
            seq: self.next_seq,
        });
        self.next_seq += 1;
    }

    /// The most transmitted update has already reached the most members, so it is the
    /// cheapest to lose (the oldest among ties).
    fn evict_most_transmitted(&mut self) {
        let victim = self
            .queue
            .iter()
            .enumerate()
            .max_by_key(|(_, queued)| (queued.transmits, Reverse(queued.seq)))
            .map(|(idx, _)| idx);
        if let Some(idx) = victim {
            self.queue.swap_remove(idx);
        }
    }

    fn retransmit_limit(&self) -> u32 {
        let n = (self.members.len() + 2) as f64;
        let scale = n.log10().ceil() as u32;
        self.config.retransmit_mult.saturating_mul(scale).max(1)
    }
}

fn alive_update(id: &ChitchatId, incarnation: u64) -> MemberUpdate {
    MemberUpdate {
        kind: UpdateKind::Alive,
        node: id.clone(),
        incarnation,
        from: id.node_id.clone(),
    }
}

fn max_accepted_incarnation(kind: UpdateKind) -> u64 {
    match kind {
        UpdateKind::Alive => MAX_INCARNATION + 1,
        UpdateKind::Suspect | UpdateKind::Dead => MAX_INCARNATION,
    }
}

/// Whether queuing `new` makes the queued `old` pointless to send.
fn supersedes(new: &MemberUpdate, old: &MemberUpdate) -> bool {
    if new.node != old.node {
        return false;
    }
    match (new.kind, old.kind) {
        (UpdateKind::Alive | UpdateKind::Dead, _) => true,
        // Same incarnation, different suspecter: a confirmation, which Lifeguard needs
        // delivered separately.
        (UpdateKind::Suspect, UpdateKind::Suspect) => {
            old.incarnation < new.incarnation
                || (old.incarnation == new.incarnation && old.from == new.from)
        }
        (UpdateKind::Suspect, UpdateKind::Alive) => old.incarnation <= new.incarnation,
        (UpdateKind::Suspect, UpdateKind::Dead) => old.incarnation < new.incarnation,
    }
}

/// Floor and ceiling of the suspicion timeout in a cluster of `n` members (self included).
fn suspicion_bounds(config: &SwimConfig, n: usize) -> (Duration, Duration) {
    let scale = (n as f64).log10().max(1.0);
    let floor_secs = config.suspicion_min.as_secs_f64() * scale;
    let floor = Duration::try_from_secs_f64(floor_secs).unwrap_or(Duration::MAX);
    (floor, floor.saturating_mul(config.suspicion_max_mult))
}

/// Lifeguard: `max(floor, ceiling - (ceiling - floor) * ln(C+1) / ln(K+1))`, so the first
/// confirmations cut the most, and K of them bring the timeout down to the floor.
fn lifeguard_timeout(floor: Duration, ceiling: Duration, confirmations: u32, k: u32) -> Duration {
    if ceiling <= floor || k == 0 {
        return floor;
    }
    if confirmations == 0 {
        return ceiling;
    }
    let fraction = f64::from(confirmations + 1).ln() / f64::from(k + 1).ln();
    let secs = ceiling.as_secs_f64() - (ceiling - floor).as_secs_f64() * fraction;
    Duration::try_from_secs_f64(secs)
        .map(|timeout| timeout.max(floor))
        .unwrap_or(floor)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn id(i: u16) -> ChitchatId {
        ChitchatId::new(format!("n{i}"), 1, ([127, 0, 0, 1], 7000 + i).into())
    }

    fn config() -> SwimConfig {
        SwimConfig {
            suspicion_min: Duration::from_secs(1),
            suspicion_max_mult: 6,
            expected_confirmations: 3,
            retransmit_mult: 4,
        }
    }

    fn swim() -> Swim {
        Swim::new(id(0), 0, config())
    }

    fn upd(kind: UpdateKind, node: u16, incarnation: u64, from: u16) -> MemberUpdate {
        MemberUpdate {
            kind,
            node: id(node),
            incarnation,
            from: format!("n{from}").into(),
        }
    }

    use UpdateKind::{Alive, Dead, Suspect};

    /// Suspicion bounds of the small clusters most tests use (N <= 10 members incl. self).
    const FLOOR: Duration = Duration::from_secs(1);
    const CEILING: Duration = Duration::from_secs(6);

    /// A swim that knows n1 at `status`/`incarnation`, with an empty queue: Suspect means
    /// suspected by n9 at `now` (so n1 is in the confirmation-probe set); Dead means declared
    /// dead by this node's own timer (a Dead from the wire would only suspect it).
    fn swim_with(status: Option<Status>, incarnation: u64, now: Instant) -> Swim {
        let mut swim = swim();
        let Some(status) = status else {
            return swim;
        };
        assert!(swim.apply(&upd(Alive, 1, incarnation, 1), now));
        match status {
            Status::Alive => {}
            Status::Suspect => assert!(swim.apply(&upd(Suspect, 1, incarnation, 9), now)),
            Status::Dead => {
                swim.probe_failed(&id(1), now);
                assert_eq!(swim.tick(now + CEILING), vec![id(1)]);
            }
        }
        assert_eq!(swim.status(&id(1)), Some(status));
        swim.queue.clear();
        swim
    }

    /// Confirmers of `node`'s current suspicion (empty if not suspect).
    fn confirmers(swim: &Swim, node: u16) -> Vec<Arc<str>> {
        match swim.members.get(&id(node)).map(|member| &member.state) {
            Some(State::Suspect(suspicion)) => suspicion.confirmers.clone(),
            _ => Vec::new(),
        }
    }

    fn names(nodes: &[u16]) -> Vec<Arc<str>> {
        nodes.iter().map(|n| format!("n{n}").into()).collect()
    }

    fn queued(swim: &Swim) -> Vec<MemberUpdate> {
        swim.queue.iter().map(|q| q.update.clone()).collect()
    }

    #[test]
    fn test_precedence_table() {
        use Status as S;
        // Columns: n1's initial status (at incarnation 5), the update, n1's resulting status,
        // incarnation and (if Suspect) confirmers, and whether the update changed anything. A
        // change is queued for re-broadcast as is, except a Dead about a live member, which
        // is only a suspicion here and is forwarded as that Suspect.
        #[rustfmt::skip]
        let rows: &[(Option<S>, MemberUpdate, Option<S>, u64, &[u16], bool)] = &[
            // Unknown node: only Alive admits it.
            (None, upd(Alive, 1, 3, 1), Some(S::Alive), 3, &[], true),
            (None, upd(Suspect, 1, 3, 2), None, 0, &[], false),
            (None, upd(Dead, 1, 3, 2), None, 0, &[], false),
            // Alive at 5.
            (Some(S::Alive), upd(Alive, 1, 4, 1), Some(S::Alive), 5, &[], false),
            (Some(S::Alive), upd(Alive, 1, 5, 1), Some(S::Alive), 5, &[], false),
            (Some(S::Alive), upd(Alive, 1, 6, 1), Some(S::Alive), 6, &[], true),
            (Some(S::Alive), upd(Suspect, 1, 4, 2), Some(S::Alive), 5, &[], false),
            (Some(S::Alive), upd(Suspect, 1, 5, 2), Some(S::Suspect), 5, &[2], true),
            (Some(S::Alive), upd(Suspect, 1, 6, 2), Some(S::Suspect), 6, &[2], true),
            (Some(S::Alive), upd(Dead, 1, 4, 2), Some(S::Alive), 5, &[], false),
            (Some(S::Alive), upd(Dead, 1, 5, 2), Some(S::Suspect), 5, &[2], true),
            (Some(S::Alive), upd(Dead, 1, 6, 2), Some(S::Suspect), 6, &[2], true),
            // Suspect at 5, suspected by n9.
            (Some(S::Suspect), upd(Alive, 1, 5, 1), Some(S::Suspect), 5, &[9], false),
            (Some(S::Suspect), upd(Alive, 1, 6, 1), Some(S::Alive), 6, &[], true),
            (Some(S::Suspect), upd(Suspect, 1, 4, 2), Some(S::Suspect), 5, &[9], false),
            (Some(S::Suspect), upd(Suspect, 1, 5, 9), Some(S::Suspect), 5, &[9], false),
            (Some(S::Suspect), upd(Suspect, 1, 5, 2), Some(S::Suspect), 5, &[9, 2], true),
            (Some(S::Suspect), upd(Suspect, 1, 6, 9), Some(S::Suspect), 6, &[9], true),
            (Some(S::Suspect), upd(Suspect, 1, 6, 2), Some(S::Suspect), 6, &[2], true),
            (Some(S::Suspect), upd(Dead, 1, 4, 2), Some(S::Suspect), 5, &[9], false),
            (Some(S::Suspect), upd(Dead, 1, 5, 9), Some(S::Suspect), 5, &[9], false),
            (Some(S::Suspect), upd(Dead, 1, 5, 2), Some(S::Suspect), 5, &[9, 2], true),
            (Some(S::Suspect), upd(Dead, 1, 6, 9), Some(S::Suspect), 6, &[9], true),
            (Some(S::Suspect), upd(Dead, 1, 6, 2), Some(S::Suspect), 6, &[2], true),
            // Dead at 5 (declared by our own timer): back only with a higher incarnation;
            // another death claim changes nothing, whatever its incarnation.
            (Some(S::Dead), upd(Alive, 1, 5, 1), Some(S::Dead), 5, &[], false),
            (Some(S::Dead), upd(Alive, 1, 6, 1), Some(S::Alive), 6, &[], true),
            (Some(S::Dead), upd(Suspect, 1, 4, 2), Some(S::Dead), 5, &[], false),
            (Some(S::Dead), upd(Suspect, 1, 5, 2), Some(S::Dead), 5, &[], false),
            (Some(S::Dead), upd(Suspect, 1, 6, 2), Some(S::Suspect), 6, &[2], true),
            (Some(S::Dead), upd(Dead, 1, 4, 2), Some(S::Dead), 5, &[], false),
            (Some(S::Dead), upd(Dead, 1, 5, 2), Some(S::Dead), 5, &[], false),
            (Some(S::Dead), upd(Dead, 1, 6, 2), Some(S::Dead), 5, &[], false),
        ];
        let now = Instant::now();
        for (row, (initial, update, status, incarnation, suspecters, changed)) in
            rows.iter().enumerate()
        {
            let mut swim = swim_with(*initial, 5, now);
            let applied = swim.apply(update, now);
            let ctx = format!("row {row}: {initial:?} <- {update:?}");
            assert_eq!(applied, *changed, "{ctx}");
            assert_eq!(swim.status(&id(1)), *status, "{ctx}");
            if status.is_some() {
                assert_eq!(swim.member_incarnation(&id(1)), Some(*incarnation), "{ctx}");
            }
            assert!(swim.dead().count() <= 1, "{ctx}");
            assert_eq!(confirmers(&swim, 1), names(suspecters), "{ctx}");
            let expected_queue = if *changed {
                let kind = if update.kind == Dead {
                    Suspect
                } else {
                    update.kind
                };
                vec![MemberUpdate {
                    kind,
                    ..update.clone()
                }]
            } else {
                vec![]
            };
            assert_eq!(queued(&swim), expected_queue, "{ctx}");
            if *status == Some(S::Suspect) {
                // We never confirmed: others' confirmations leave the deadline at the ceiling,
                // and n1 is ours to probe.
                assert_eq!(
                    swim.suspicion_deadline(&id(1)),
                    Some(now + CEILING),
                    "{ctx}"
                );
                assert_eq!(swim.take_confirmation_probes(), vec![id(1)], "{ctx}");
            } else {
                assert_eq!(swim.suspicion_deadline(&id(1)), None, "{ctx}");
                assert!(swim.take_confirmation_probes().is_empty(), "{ctx}");
            }
        }
    }

    #[test]
    fn test_alive_clears_suspicion() {
        let now = Instant::now();
        let mut swim = swim_with(Some(Status::Suspect), 5, now);
        assert!(swim.apply(&upd(Alive, 1, 6, 1), now));
        assert!(swim.suspicion_deadline(&id(1)).is_none());
        assert!(swim.tick(now + Duration::from_secs(3600)).is_empty());
    }

    #[test]
    fn test_refutation_bumps_incarnation_and_queues_alive() {
        let now = Instant::now();
        let mut swim = Swim::new(id(0), 3, config());
        assert!(!swim.apply(&upd(Suspect, 0, 2, 1), now));
        assert_eq!(swim.incarnation(), 3);
        assert!(swim.apply(&upd(Suspect, 0, 3, 1), now));
        assert_eq!(swim.incarnation(), 4);
        assert!(swim.apply(&upd(Dead, 0, 7, 1), now));
        assert_eq!(swim.incarnation(), 8);
        // The later refutation supersedes the earlier one.
        assert_eq!(swim.piggyback(usize::MAX), vec![upd(Alive, 0, 8, 0)]);
        assert!(!swim.apply(&upd(Alive, 0, 20, 1), now));
        assert_eq!(swim.incarnation(), 8);
        assert!(swim.live().chain(swim.dead()).next().is_none());
    }

    #[test]
    fn test_claims_about_other_generation_of_self_are_ignored() {
        let now = Instant::now();
        let mut swim = swim();
        let older_self = ChitchatId::new("n0", 0, ([127, 0, 0, 1], 7000).into());
        for kind in [Alive, Suspect, Dead] {
            let update = MemberUpdate {
                kind,
                node: older_self.clone(),
                incarnation: 5,
                from: "n1".into(),
            };
            assert!(!swim.apply(&update, now));
        }
        assert!(!swim.observe(&older_self, 5, now));
        assert_eq!(swim.incarnation(), 0);
        assert!(swim.is_empty());
        assert!(swim.piggyback(usize::MAX).is_empty());
    }

    #[test]
    fn test_leave_stops_refutation() {
        let now = Instant::now();
        let mut swim = Swim::new(id(0), 2, config());
        swim.leave();
        assert!(!swim.apply(&upd(Suspect, 0, 2, 1), now));
        assert!(!swim.apply(&upd(Dead, 0, 5, 1), now));
        assert_eq!(swim.incarnation(), 2);
        assert_eq!(swim.piggyback(usize::MAX), vec![upd(Dead, 0, 2, 0)]);
    }

    #[test]
    fn test_max_incarnation_guard() {
        let now = Instant::now();
        let mut swim = swim_with(Some(Status::Alive), 5, now);
        assert!(!swim.apply(&upd(Suspect, 1, MAX_INCARNATION + 1, 2), now));
        assert!(!swim.apply(&upd(Dead, 1, MAX_INCARNATION + 1, 2), now));
        assert!(!swim.apply(&upd(Alive, 1, MAX_INCARNATION + 2, 1), now));
        assert!(!swim.apply(&upd(Alive, 7, u64::MAX, 7), now));
        assert!(!swim.observe(&id(8), u64::MAX, now));
        assert_eq!(swim.member_incarnation(&id(1)), Some(5));
        // A suspicion at the maximum stays refutable, by us and by others.
        assert!(swim.apply(&upd(Suspect, 0, MAX_INCARNATION, 1), now));
        assert_eq!(swim.incarnation(), MAX_INCARNATION + 1);
        assert!(!swim.apply(&upd(Suspect, 0, MAX_INCARNATION + 1, 1), now));
        assert_eq!(swim.incarnation(), MAX_INCARNATION + 1);
        assert!(swim.apply(&upd(Suspect, 1, MAX_INCARNATION, 2), now));
        assert!(swim.apply(&upd(Alive, 1, MAX_INCARNATION + 1, 1), now));
        assert_eq!(swim.status(&id(1)), Some(Status::Alive));
        assert_eq!(
            Swim::new(id(0), u64::MAX, config()).incarnation(),
            MAX_INCARNATION
        );
    }

    #[test]
    fn test_observe() {
        let now = Instant::now();
        let mut swim = swim();
        assert!(swim.observe(&id(1), 4, now));
        assert_eq!(swim.status(&id(1)), Some(Status::Alive));
        assert!(swim.piggyback(usize::MAX).is_empty());
        assert!(!swim.observe(&id(1), 4, now));
        assert!(!swim.observe(&id(0), 4, now));
        // Seen at the same incarnation, a suspect stays suspect and a dead member dead.
        assert!(swim.apply(&upd(Dead, 1, 4, 2), now));
        assert!(!swim.observe(&id(1), 4, now));
        assert_eq!(swim.status(&id(1)), Some(Status::Suspect));
        swim.probe_failed(&id(1), now);
        assert_eq!(swim.tick(now + CEILING), vec![id(1)]);
        assert!(!swim.observe(&id(1), 4, now));
        assert_eq!(swim.status(&id(1)), Some(Status::Dead));
        assert!(swim.observe(&id(1), 5, now));
        assert_eq!(swim.status(&id(1)), Some(Status::Alive));
        assert_eq!(swim.member_incarnation(&id(1)), Some(5));
    }

    #[test]
    fn test_lifeguard_timeout_formula() {
        let floor = Duration::from_secs(2);
        let ceiling = Duration::from_secs(12);
        let k = 3;
        assert_eq!(lifeguard_timeout(floor, ceiling, 0, k), ceiling);
        assert_eq!(lifeguard_timeout(floor, ceiling, k, k), floor);
        assert_eq!(lifeguard_timeout(floor, ceiling, k + 5, k), floor);
        let timeouts: Vec<_> = (0..=k)
            .map(|c| lifeguard_timeout(floor, ceiling, c, k))
            .collect();
        assert!(
            timeouts.windows(2).all(|pair| pair[1] < pair[0]),
            "{timeouts:?}"
        );
        // C = 1, K = 3: 12 - 10 * ln 2 / ln 4 = 7 s.
        let one = lifeguard_timeout(floor, ceiling, 1, k).as_secs_f64();
        assert!((one - 7.0).abs() < 1e-6, "{one}");
        assert_eq!(lifeguard_timeout(floor, ceiling, 0, 0), floor);
        assert_eq!(lifeguard_timeout(floor, floor, 0, k), floor);
    }

    #[test]
    fn test_suspicion_bounds_scale_with_log10_of_members() {
        let config = config();
        let second = Duration::from_secs(1);
        assert_eq!(suspicion_bounds(&config, 1), (second, second * 6));
        assert_eq!(suspicion_bounds(&config, 10), (second, second * 6));
        let (floor, ceiling) = suspicion_bounds(&config, 1000);
        assert!((floor.as_secs_f64() - 3.0).abs() < 1e-9);
        assert!((ceiling.as_secs_f64() - 18.0).abs() < 1e-6);
        let huge = SwimConfig {
            suspicion_min: Duration::MAX,
            suspicion_max_mult: u32::MAX,
            ..config
        };
        assert_eq!(
            suspicion_bounds(&huge, 1000),
            (Duration::MAX, Duration::MAX)
        );
    }

    #[test]
    fn k_for_small_clusters() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(500);
        // Two members with self: K = min(3, 2 - 2).max(1) = 1. Our own suspicion alone runs
        // to the ceiling; one more confirmer brings it to the floor, now that we confirmed.
        let mut swim = swim_with(Some(Status::Alive), 5, t0);
        swim.probe_failed(&id(1), t0);
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
        assert!(swim.apply(&upd(Suspect, 1, 5, 2), t1));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
        // The other way round: another's suspicion stays at the ceiling until our own probe
        // fails, which is then the one confirmation K = 1 asks for.
        let mut swim = swim_with(Some(Status::Alive), 5, t0);
        assert!(swim.apply(&upd(Suspect, 1, 5, 2), t0));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
        swim.probe_failed(&id(1), t1);
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
        // Three members: K = 1 still. Another member's confirmation alone does not shorten
        // the suspicion; ours brings it to the floor (K = 3 would stop at
        // lifeguard_timeout(.., 1, 3) = 3.5 s).
        let mut swim = swim_with(Some(Status::Alive), 5, t0);
        swim.observe(&id(20), 1, t0);
        assert!(swim.apply(&upd(Suspect, 1, 5, 20), t0));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
        swim.probe_failed(&id(1), t1);
        assert_eq!(confirmers(&swim, 1), names(&[20, 0]));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
        // Four members: K = 2. Our confirmation gives lifeguard_timeout(.., 1, 2), a further
        // one the floor.
        let mut swim = swim_with(Some(Status::Alive), 5, t0);
        swim.observe(&id(20), 1, t0);
        swim.observe(&id(21), 1, t0);
        assert!(swim.apply(&upd(Suspect, 1, 5, 20), t0));
        swim.probe_failed(&id(1), t1);
        let one_of_two = lifeguard_timeout(FLOOR, CEILING, 1, 2);
        assert!(FLOOR < one_of_two && one_of_two < lifeguard_timeout(FLOOR, CEILING, 1, 3));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + one_of_two));
        assert!(swim.apply(&upd(Suspect, 1, 5, 21), t1));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
    }

    /// Five members with self, so K = 3 confirmations are possible (a smaller cluster lowers
    /// K: `k_for_small_clusters`).
    fn swim_of_five(t0: Instant) -> Swim {
        let mut swim = swim_with(Some(Status::Alive), 5, t0);
        for i in 20..23 {
            swim.observe(&id(i), 1, t0);
        }
        swim
    }

    #[test]
    fn test_deadline_recomputed_from_start() {
        let t0 = Instant::now();
        let mut swim = swim_of_five(t0);
        assert!(swim.apply(&upd(Suspect, 1, 5, 2), t0));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
        // Our own probe fails later: one confirmation, counted from the start, not from t1.
        let t1 = t0 + Duration::from_millis(1500);
        swim.probe_failed(&id(1), t1);
        let expected = t0 + lifeguard_timeout(FLOOR, CEILING, 1, 3);
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(expected));
        assert!(swim.apply(&upd(Suspect, 1, 5, 3), t1));
        let expected = t0 + lifeguard_timeout(FLOOR, CEILING, 2, 3);
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(expected));
        assert!(expected > t1);
        assert!(swim.tick(t1).is_empty());
        assert!(!swim.apply(&upd(Suspect, 1, 5, 3), t1));
        assert!(swim.apply(&upd(Suspect, 1, 5, 4), t1));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
        assert_eq!(confirmers(&swim, 1), names(&[2, 0, 3, 4]));
        // K + 1 confirmers already: a further one changes nothing and is not forwarded.
        let queue = queued(&swim);
        assert!(!swim.apply(&upd(Suspect, 1, 5, 5), t1));
        assert_eq!(queued(&swim), queue);
        assert_eq!(confirmers(&swim, 1), names(&[2, 0, 3, 4]));
        // The deadline passed while confirming: the next tick declares it dead.
        assert_eq!(swim.tick(t1), vec![id(1)]);
        assert_eq!(swim.news_for(&id(1)), Some(upd(Dead, 1, 5, 0)));
    }

    #[test]
    fn test_confirmations_count_only_once_we_confirm() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let mut swim = swim_of_five(t0);
        // Others' confirmations alone, up to the K + 1 = 4 confirmers kept: recorded and
        // forwarded, but the deadline stays at start + ceiling.
        for from in 2..=5 {
            assert!(swim.apply(&upd(Suspect, 1, 5, from), t0));
            assert_eq!(
                swim.suspicion_deadline(&id(1)),
                Some(t0 + CEILING),
                "n{from}"
            );
        }
        assert!(!swim.apply(&upd(Dead, 1, 5, 6), t1));
        assert!(!swim.apply(&upd(Suspect, 1, 5, 7), t1));
        assert_eq!(confirmers(&swim, 1), names(&[2, 3, 4, 5]));
        let forwarded: Vec<_> = (2..=5).map(|from| upd(Suspect, 1, 5, from)).collect();
        assert_eq!(queued(&swim), forwarded);
        assert!(
            swim.tick(t0 + CEILING - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(swim.status(&id(1)), Some(Status::Suspect));
        // The list is full, but room is made for our own confirmation, which lets the four
        // others count: the floor, from the start, already past at t1.
        assert_eq!(swim.confirmation_probes, vec![id(1)]);
        swim.probe_failed(&id(1), t1);
        assert_eq!(confirmers(&swim, 1), names(&[2, 3, 4, 5, 0]));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
        assert_eq!(queued(&swim).last(), Some(&upd(Suspect, 1, 5, 0)));
        assert!(swim.take_confirmation_probes().is_empty());
        // Still bounded: nobody else gets in after us.
        assert!(!swim.apply(&upd(Suspect, 1, 5, 8), t1));
        assert_eq!(confirmers(&swim, 1).len(), 5);
        assert_eq!(swim.tick(t1), vec![id(1)]);
        assert_eq!(swim.status(&id(1)), Some(Status::Dead));
        // Our Dead supersedes every queued Suspect about n1.
        assert_eq!(queued(&swim), vec![upd(Dead, 1, 5, 0)]);

        // Each step with our confirmation in: we confirm first (no cut by ourselves alone),
        // then every other confirmer cuts per the formula with C = confirmers - 1.
        let mut swim = swim_of_five(t0);
        swim.probe_failed(&id(1), t0);
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
        for (c, from) in (1..=3).zip(2..) {
            assert!(swim.apply(&upd(Suspect, 1, 5, from), t1));
            let expected = t0 + lifeguard_timeout(FLOOR, CEILING, c, 3);
            assert_eq!(swim.suspicion_deadline(&id(1)), Some(expected), "C = {c}");
        }
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
        assert!(!swim.apply(&upd(Suspect, 1, 5, 9), t1));
        assert_eq!(confirmers(&swim, 1), names(&[0, 2, 3, 4]));
    }

    #[test]
    fn test_dead_from_others_is_only_a_suspicion() {
        let t0 = Instant::now();
        let mut swim = swim_of_five(t0);
        // A forged death of a live member: n1 stays live, as a Suspect at the claimed
        // incarnation, the claim forwarded as a suspicion, and n1 ours to probe.
        assert!(swim.apply(&upd(Dead, 1, 5, 7), t0));
        assert_eq!(swim.status(&id(1)), Some(Status::Suspect));
        assert!(swim.live().any(|live| *live == id(1)));
        assert_eq!(swim.dead().count(), 0);
        assert_eq!(queued(&swim), vec![upd(Suspect, 1, 5, 7)]);
        assert_eq!(swim.news_for(&id(1)), Some(upd(Suspect, 1, 5, 7)));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
        // More invented names only confirm, and without our own failed probe, cut nothing.
        assert!(swim.apply(&upd(Dead, 1, 5, 8), t0));
        assert!(swim.apply(&upd(Dead, 1, 5, 9), t0));
        assert!(swim.apply(&upd(Dead, 1, 5, 10), t0));
        assert_eq!(confirmers(&swim, 1), names(&[7, 8, 9, 10]));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + CEILING));
        assert!(
            queued(&swim)
                .iter()
                .all(|update| update.kind == Suspect && update.node == id(1))
        );
        assert_eq!(swim.take_confirmation_probes(), vec![id(1)]);
        assert!(
            swim.tick(t0 + CEILING - Duration::from_millis(1))
                .is_empty()
        );

        // n1 hears of it (our probe carries `news_for`) and refutes: it was never dead.
        let mut refuted = swim_of_five(t0);
        assert!(refuted.apply(&upd(Dead, 1, 5, 7), t0));
        assert!(refuted.apply(&upd(Alive, 1, 6, 1), t0 + Duration::from_secs(1)));
        assert_eq!(refuted.status(&id(1)), Some(Status::Alive));
        assert!(refuted.tick(t0 + CEILING).is_empty());
        assert_eq!(refuted.status(&id(1)), Some(Status::Alive));
        assert!(refuted.take_confirmation_probes().is_empty());
        // An old death claim at the refuted incarnation is ignored.
        assert!(!refuted.apply(&upd(Dead, 1, 5, 8), t0 + CEILING));

        // Nobody refutes: our own timer declares it dead, and the Dead we queue is ours.
        assert_eq!(swim.tick(t0 + CEILING), vec![id(1)]);
        assert_eq!(swim.status(&id(1)), Some(Status::Dead));
        assert_eq!(swim.member_incarnation(&id(1)), Some(5));
        assert_eq!(queued(&swim), vec![upd(Dead, 1, 5, 0)]);
        assert_eq!(swim.news_for(&id(1)), Some(upd(Dead, 1, 5, 0)));
        // Once dead, further death claims are ignored, at any incarnation.
        for incarnation in [5, 6] {
            assert!(!swim.apply(&upd(Dead, 1, incarnation, 7), t0 + CEILING));
        }
        assert_eq!(swim.status(&id(1)), Some(Status::Dead));
        assert_eq!(swim.member_incarnation(&id(1)), Some(5));
        assert_eq!(queued(&swim), vec![upd(Dead, 1, 5, 0)]);

        // A member that really is down fails our probe too: with the claims as confirmations,
        // it is dead at the floor.
        let mut swim = swim_of_five(t0);
        assert!(swim.apply(&upd(Dead, 1, 5, 7), t0));
        assert!(swim.apply(&upd(Dead, 1, 5, 8), t0));
        assert!(swim.apply(&upd(Dead, 1, 5, 9), t0));
        swim.probe_failed(&id(1), t0);
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(t0 + FLOOR));
        assert_eq!(swim.tick(t0 + FLOOR), vec![id(1)]);
        assert_eq!(queued(&swim), vec![upd(Dead, 1, 5, 0)]);
    }

    #[test]
    fn test_tick_declares_expired_suspects_dead() {
        let t0 = Instant::now();
        let mut swim = swim();
        for node in 1..=3 {
            swim.apply(&upd(Alive, node, 1, node), t0);
        }
        swim.probe_failed(&id(1), t0);
        swim.probe_failed(&id(2), t0 + Duration::from_secs(1));
        swim.queue.clear();
        let ceiling = Duration::from_secs(6);
        assert!(
            swim.tick(t0 + ceiling - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(swim.tick(t0 + ceiling), vec![id(1)]);
        assert_eq!(swim.status(&id(1)), Some(Status::Dead));
        assert_eq!(swim.status(&id(2)), Some(Status::Suspect));
        assert_eq!(swim.piggyback(usize::MAX), vec![upd(Dead, 1, 1, 0)]);
        assert_eq!(swim.news_for(&id(1)), Some(upd(Dead, 1, 1, 0)));
        assert_eq!(swim.news_for(&id(2)), Some(upd(Suspect, 2, 1, 0)));
        assert_eq!(swim.news_for(&id(3)), None);
        assert!(swim.tick(t0 + ceiling).is_empty());
        assert_eq!(swim.dead().cloned().collect::<Vec<_>>(), vec![id(1)]);
        assert_eq!(swim.live().cloned().collect::<Vec<_>>(), vec![id(2), id(3)]);
    }

    #[test]
    fn test_probe_failed() {
        let now = Instant::now();
        let mut swim = swim_with(Some(Status::Alive), 5, now);
        swim.probe_failed(&id(1), now);
        assert_eq!(swim.status(&id(1)), Some(Status::Suspect));
        assert_eq!(confirmers(&swim, 1), names(&[0]));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(now + CEILING));
        assert_eq!(swim.piggyback(usize::MAX), vec![upd(Suspect, 1, 5, 0)]);
        assert!(swim.take_confirmation_probes().is_empty());
        // Already a confirmer: a second failure is not news.
        swim.probe_failed(&id(1), now);
        assert!(swim.queue.iter().all(|q| q.transmits > 0));
        assert_eq!(confirmers(&swim, 1), names(&[0]));
        // Suspected by someone else: our failed probe confirms, which (K = 1 with two
        // members) brings the deadline from the ceiling to the floor, and the suspect no
        // longer needs a confirmation probe.
        let mut swim = swim_with(Some(Status::Suspect), 5, now);
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(now + CEILING));
        swim.probe_failed(&id(1), now + Duration::from_millis(100));
        assert_eq!(confirmers(&swim, 1), names(&[9, 0]));
        assert_eq!(swim.suspicion_deadline(&id(1)), Some(now + FLOOR));
        assert_eq!(swim.piggyback(usize::MAX), vec![upd(Suspect, 1, 5, 0)]);
        assert!(swim.take_confirmation_probes().is_empty());
        let mut swim = swim_with(Some(Status::Dead), 5, now);
        swim.probe_failed(&id(1), now);
        swim.probe_failed(&id(7), now);
        swim.probe_failed(&id(0), now);
        assert_eq!(swim.status(&id(1)), Some(Status::Dead));
        assert!(swim.piggyback(usize::MAX).is_empty());
    }

    #[test]
    fn test_confirmation_probes() {
        let now = Instant::now();
        let mut swim = swim();
        for node in 1..=4 {
            swim.apply(&upd(Alive, node, 1, node), now);
        }
        swim.apply(&upd(Suspect, 1, 1, 8), now);
        swim.apply(&upd(Suspect, 1, 1, 9), now);
        swim.apply(&upd(Suspect, 2, 1, 8), now);
        // Another's death claim is a suspicion we probe too.
        assert!(swim.apply(&upd(Dead, 3, 1, 8), now));
        swim.apply(&upd(Suspect, 4, 1, 8), now);
        swim.probe_failed(&id(4), now);
        // Once we confirmed, a further claim (death or suspicion) does not ask us again.
        assert!(swim.apply(&upd(Dead, 4, 1, 9), now));
        swim.apply(&upd(Alive, 2, 2, 2), now);
        assert_eq!(swim.take_confirmation_probes(), vec![id(1), id(3)]);
        assert!(swim.take_confirmation_probes().is_empty());
        // A suspicion (or death claim) at a higher incarnation needs a fresh confirmation.
        swim.apply(&upd(Suspect, 4, 2, 8), now);
        swim.apply(&upd(Dead, 1, 2, 8), now);
        swim.remove(&id(1));
        assert_eq!(swim.take_confirmation_probes(), vec![id(4)]);
        // A claim in our own name from the wire (an echo, or a forgery) is ignored: no
        // suspicion, no probe, no confirmation.
        swim.apply(&upd(Alive, 5, 1, 5), now);
        assert!(!swim.apply(&upd(Suspect, 5, 1, 0), now));
        assert!(!swim.apply(&upd(Dead, 5, 1, 0), now));
        assert_eq!(swim.status(&id(5)), Some(Status::Alive));
        assert!(swim.take_confirmation_probes().is_empty());
        // A suspect our own timer declared dead is no longer probed.
        assert!(swim.apply(&upd(Suspect, 3, 2, 8), now));
        assert_eq!(swim.confirmation_probes, vec![id(3)]);
        assert!(swim.tick(now + CEILING).contains(&id(3)));
        assert_eq!(swim.status(&id(3)), Some(Status::Dead));
        assert!(swim.take_confirmation_probes().is_empty());
    }

    fn probe_pass(swim: &mut Swim, rng: &mut StdRng, len: usize) -> Vec<ChitchatId> {
        let mut pass: Vec<_> = (0..len)
            .filter_map(|_| swim.next_probe_target(rng))
            .collect();
        pass.sort();
        pass
    }

    #[test]
    fn test_round_robin_visits_each_live_member_once_per_pass() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(7);
        let mut swim = swim();
        assert_eq!(swim.next_probe_target(&mut rng), None);
        for node in 1..=6 {
            swim.apply(&upd(Alive, node, 1, node), now);
        }
        // n6 dead (our own timer), n5 suspected by us, n4 claimed dead by another (only a
        // suspicion here): suspects are still probed, the dead are not.
        swim.probe_failed(&id(6), now);
        assert_eq!(swim.tick(now + CEILING), vec![id(6)]);
        swim.probe_failed(&id(5), now + CEILING);
        assert!(swim.apply(&upd(Dead, 4, 1, 9), now + CEILING));
        let expected: Vec<_> = (1..=5).map(id).collect();
        let mut orders = Vec::new();
        for _ in 0..4 {
            let mut pass = Vec::new();
            for _ in 0..5 {
                pass.push(swim.next_probe_target(&mut rng).unwrap());
            }
            orders.push(pass.clone());
            pass.sort();
            assert_eq!(pass, expected);
        }
        assert!(
            orders.windows(2).any(|pair| pair[0] != pair[1]),
            "never reshuffled"
        );
    }

    #[test]
    fn test_round_robin_membership_changes_mid_pass() {
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(3);
        let mut swim = swim();
        for node in 1..=4 {
            swim.apply(&upd(Alive, node, 1, node), now);
        }
        let first = swim.next_probe_target(&mut rng).unwrap();
        let mut seen = vec![first.clone()];
        let victim = (1..=4).find(|&node| id(node) != first).unwrap();
        swim.probe_failed(&id(victim), now);
        assert_eq!(swim.tick(now + CEILING), vec![id(victim)]);
        swim.apply(&upd(Alive, 5, 1, 5), now);
        swim.remove(&first);
        seen.extend(probe_pass(&mut swim, &mut rng, 3));
        seen.sort();
        let mut expected: Vec<_> = (1..=5).filter(|&n| n != victim).map(id).collect();
        expected.sort();
        assert_eq!(seen, expected);
        // Next pass: only the current live members.
        let next = probe_pass(&mut swim, &mut rng, 3);
        let live: Vec<_> = swim.live().cloned().collect();
        assert_eq!(next, live);
        assert_eq!(live.len(), 3);
    }

    #[test]
    fn test_piggyback_orders_by_fewest_transmits_then_newest() {
        let now = Instant::now();
        let mut swim = swim();
        swim.apply(&upd(Alive, 1, 1, 1), now);
        swim.apply(&upd(Alive, 2, 1, 2), now);
        let one = upd(Alive, 1, 1, 1).serialized_len();
        assert_eq!(swim.piggyback(1 + one), vec![upd(Alive, 2, 1, 2)]);
        assert_eq!(swim.piggyback(1 + one), vec![upd(Alive, 1, 1, 1)]);
        swim.apply(&upd(Alive, 3, 1, 3), now);
        assert_eq!(
            swim.piggyback(usize::MAX),
            vec![
                upd(Alive, 3, 1, 3),
                upd(Alive, 2, 1, 2),
                upd(Alive, 1, 1, 1)
            ]
        );
    }

    #[test]
    fn test_piggyback_respects_byte_budget_and_count() {
        let now = Instant::now();
        let mut swim = swim();
        for node in 1..=100 {
            swim.apply(&upd(Alive, node, 1, node), now);
        }
        for budget in [0, 1, 10, 40, 41, 100, 1000, 1400] {
            let picked = swim.piggyback(budget);
            assert!(serialized_updates_len(&picked) <= budget.max(1), "{budget}");
            let mut buf = Vec::new();
            serialize_updates(&picked, &mut buf);
            assert_eq!(buf.len(), serialized_updates_len(&picked));
        }
        let picked = swim.piggyback(usize::MAX);
        assert_eq!(picked.len(), MAX_UPDATES_PER_MESSAGE);
        // A big update that does not fit is skipped, smaller ones still go.
        let mut swim = swim_with(Some(Status::Alive), 1, now);
        let big = ChitchatId::new("x".repeat(200), 1, ([127, 0, 0, 1], 1).into());
        swim.apply(&alive_update(&big, 1), now);
        swim.apply(&upd(Alive, 2, 1, 2), now);
        let small = upd(Alive, 2, 1, 2).serialized_len();
        let picked = swim.piggyback(1 + 2 * small);
        assert_eq!(picked, vec![upd(Alive, 2, 1, 2)]);
    }

    #[test]
    fn test_retransmit_limit_drops_entries() {
        let now = Instant::now();
        let mut swim = swim();
        swim.apply(&upd(Alive, 1, 1, 1), now);
        // N = 2 members incl. self: 4 * ceil(log10(3)) = 4 sends.
        assert_eq!(swim.retransmit_limit(), 4);
        for _ in 0..4 {
            assert_eq!(swim.piggyback(usize::MAX).len(), 1);
        }
        assert!(swim.piggyback(usize::MAX).is_empty());
        for node in 2..=10 {
            swim.observe(&id(node), 1, now);
        }
        // N = 11: ceil(log10(12)) = 2.
        assert_eq!(swim.retransmit_limit(), 8);
        let zero = Swim::new(
            id(0),
            0,
            SwimConfig {
                retransmit_mult: 0,
                ..config()
            },
        );
        assert_eq!(zero.retransmit_limit(), 1);
    }

    #[test]
    fn test_supersession() {
        let now = Instant::now();
        let mut swim = swim_with(Some(Status::Alive), 1, now);
        swim.apply(&upd(Alive, 2, 1, 2), now);
        swim.apply(&upd(Suspect, 1, 1, 8), now);
        // Confirmations at the same incarnation are kept side by side, a death claim from
        // another being one (forwarded as a Suspect).
        assert!(swim.apply(&upd(Dead, 1, 1, 9), now));
        assert_eq!(
            queued(&swim),
            vec![
                upd(Alive, 2, 1, 2),
                upd(Suspect, 1, 1, 8),
                upd(Suspect, 1, 1, 9)
            ]
        );
        swim.apply(&upd(Suspect, 1, 2, 7), now);
        assert_eq!(
            queued(&swim),
            vec![upd(Alive, 2, 1, 2), upd(Suspect, 1, 2, 7)]
        );
        swim.apply(&upd(Alive, 1, 3, 1), now);
        assert_eq!(
            queued(&swim),
            vec![upd(Alive, 2, 1, 2), upd(Alive, 1, 3, 1)]
        );
        swim.apply(&upd(Suspect, 1, 3, 7), now);
        assert_eq!(
            queued(&swim),
            vec![upd(Alive, 2, 1, 2), upd(Suspect, 1, 3, 7)]
        );
        // Our own Dead (the only kind there is now) supersedes every queued update about n1,
        // our own confirmation included.
        swim.probe_failed(&id(1), now);
        assert_eq!(
            queued(&swim),
            vec![
                upd(Alive, 2, 1, 2),
                upd(Suspect, 1, 3, 7),
                upd(Suspect, 1, 3, 0)
            ]
        );
        assert_eq!(swim.tick(now + CEILING), vec![id(1)]);
        assert_eq!(queued(&swim), vec![upd(Alive, 2, 1, 2), upd(Dead, 1, 3, 0)]);
        swim.apply(&upd(Suspect, 1, 4, 7), now);
        assert_eq!(
            queued(&swim),
            vec![upd(Alive, 2, 1, 2), upd(Suspect, 1, 4, 7)]
        );
        swim.remove(&id(1));
        assert_eq!(queued(&swim), vec![upd(Alive, 2, 1, 2)]);
        assert_eq!(swim.status(&id(1)), None);
    }

    #[test]
    fn test_queue_is_bounded() {
        let now = Instant::now();
        let mut swim = swim();
        swim.apply(&upd(Alive, 1, 1, 1), now);
        swim.piggyback(usize::MAX);
        for node in 2..(MAX_QUEUED_UPDATES as u16 + 10) {
            swim.apply(&upd(Alive, node, 1, node), now);
        }
        assert_eq!(swim.queue.len(), MAX_QUEUED_UPDATES);
        // The already-sent update went first.
        assert!(swim.queue.iter().all(|q| q.update.node != id(1)));
    }

    #[test]
    fn test_serialization_round_trip() {
        let updates = vec![
            upd(Alive, 1, 0, 1),
            upd(Suspect, 2, 7, 3),
            MemberUpdate {
                kind: Dead,
                node: ChitchatId::new("é", u64::MAX, "[::1]:9".parse().unwrap()),
                incarnation: MAX_INCARNATION,
                from: "".into(),
            },
        ];
        let mut buf = Vec::new();
        serialize_updates(&updates, &mut buf);
        assert_eq!(buf.len(), serialized_updates_len(&updates));
        let mut cursor = &buf[..];
        assert_eq!(deserialize_updates(&mut cursor).unwrap(), updates);
        assert!(cursor.is_empty());
    }

    #[test]
    fn test_deserialize_rejects_bad_input() {
        let mut buf = Vec::new();
        upd(Alive, 1, 0, 1).serialize(&mut buf);
        buf[0] = 3;
        assert!(MemberUpdate::deserialize(&mut &buf[..]).is_err());
        let too_many = vec![upd(Alive, 1, 0, 1); MAX_UPDATES_PER_MESSAGE + 1];
        let mut buf = Vec::new();
        serialize_updates(&too_many, &mut buf);
        assert!(deserialize_updates(&mut &buf[..]).is_err());
        let max = vec![upd(Alive, 1, 0, 1); MAX_UPDATES_PER_MESSAGE];
        let mut buf = Vec::new();
        serialize_updates(&max, &mut buf);
        assert!(deserialize_updates(&mut &buf[..buf.len() - 1]).is_err());
        assert_eq!(deserialize_updates(&mut &buf[..]).unwrap().len(), 64);
        let overlong = vec![upd(Alive, 1, 0, 1); 300];
        let mut buf = Vec::new();
        serialize_updates(&overlong, &mut buf);
        assert_eq!(buf[0], 255);
        assert_eq!(buf.len(), serialized_updates_len(&overlong));
    }

    fn arb_update() -> impl Strategy<Value = MemberUpdate> {
        let addr = prop_oneof![
            any::<([u8; 4], u16)>().prop_map(|(ip, port)| (ip, port).into()),
            any::<([u8; 16], u16)>().prop_map(|(ip, port)| (ip, port).into()),
        ];
        (
            0u8..3,
            ".{0,20}",
            any::<u64>(),
            addr,
            any::<u64>(),
            ".{0,20}",
        )
            .prop_map(|(kind, node_id, generation, addr, incarnation, from)| {
                MemberUpdate {
                    kind: UpdateKind::try_from(kind).unwrap(),
                    node: ChitchatId::new(node_id, generation, addr),
                    incarnation,
                    from: from.into(),
                }
            })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Apply(u8, u16, u64, u16),
        Observe(u16, u64),
        ProbeFailed(u16),
        Tick(u64),
        Probe,
        Confirm,
        Piggyback(usize),
        Remove(u16),
        Leave,
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let inc = prop_oneof![0u64..4, Just(MAX_INCARNATION), Just(MAX_INCARNATION + 1)];
        prop_oneof![
            4 => (0u8..3, 0u16..6, inc.clone(), 0u16..6)
                .prop_map(|(k, n, i, f)| Op::Apply(k, n, i, f)),
            1 => (0u16..6, inc).prop_map(|(n, i)| Op::Observe(n, i)),
            1 => (0u16..6).prop_map(Op::ProbeFailed),
            1 => (0u64..20_000).prop_map(Op::Tick),
            1 => Just(Op::Probe),
            1 => Just(Op::Confirm),
            1 => (0usize..300).prop_map(Op::Piggyback),
            1 => (0u16..6).prop_map(Op::Remove),
            1 => Just(Op::Leave),
        ]
    }

    fn run_op(swim: &mut Swim, rng: &mut StdRng, op: Op, t0: Instant) {
        match op {
            Op::Apply(kind, node, incarnation, from) => {
                let kind = UpdateKind::try_from(kind).unwrap();
                swim.apply(&upd(kind, node, incarnation, from), t0);
            }
            Op::Observe(node, incarnation) => {
                swim.observe(&id(node), incarnation, t0);
            }
            Op::ProbeFailed(node) => swim.probe_failed(&id(node), t0),
            Op::Tick(ms) => {
                swim.tick(t0 + Duration::from_millis(ms));
            }
            Op::Probe => {
                if let Some(target) = swim.next_probe_target(rng) {
                    assert!(swim.live().any(|live| *live == target));
                }
            }
            Op::Confirm => {
                for suspect in swim.take_confirmation_probes() {
                    assert_eq!(swim.status(&suspect), Some(Status::Suspect));
                }
            }
            Op::Piggyback(budget) => {
                let picked = swim.piggyback(budget);
                assert!(serialized_updates_len(&picked) <= budget.max(1));
            }
            Op::Remove(node) => swim.remove(&id(node)),
            Op::Leave => swim.leave(),
        }
    }

    proptest! {
        #[test]
        fn proptest_deserialize_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = deserialize_updates(&mut &bytes[..]);
            let _ = MemberUpdate::deserialize(&mut &bytes[..]);
        }

        #[test]
        fn proptest_updates_round_trip(
            updates in proptest::collection::vec(arb_update(), 0..=MAX_UPDATES_PER_MESSAGE)
        ) {
            let mut buf = Vec::new();
            serialize_updates(&updates, &mut buf);
            prop_assert_eq!(buf.len(), serialized_updates_len(&updates));
            let mut cursor = &buf[..];
            prop_assert_eq!(deserialize_updates(&mut cursor).unwrap(), updates);
            prop_assert!(cursor.is_empty());
        }

        #[test]
        fn proptest_state_machine_invariants(
            ops in proptest::collection::vec(arb_op(), 0..200),
            seed in any::<u64>(),
        ) {
            let t0 = Instant::now();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut swim = swim();
            let me = swim.self_id().node_id.clone();
            for op in ops {
                let live_before: Vec<ChitchatId> = swim.live().cloned().collect();
                let is_tick = matches!(op, Op::Tick(_));
                run_op(&mut swim, &mut rng, op, t0);
                prop_assert!(swim.live().chain(swim.dead()).all(|n| n.node_id != id(0).node_id));
                prop_assert!(swim.incarnation() <= MAX_INCARNATION + 1);
                prop_assert!(swim.queue.len() <= MAX_QUEUED_UPDATES);
                prop_assert_eq!(swim.live().count() + swim.dead().count(), swim.len());
                // Only our own suspicion timers declare a member dead, and the only Dead
                // updates we send are ours (never a forwarded claim).
                if !is_tick {
                    for member in &live_before {
                        prop_assert_ne!(swim.status(member), Some(Status::Dead));
                    }
                }
                for member in swim.members.values() {
                    if let State::Dead { by } = &member.state {
                        prop_assert_eq!(by, &me);
                    }
                }
                prop_assert!(swim.queue.iter().all(|q| q.update.kind != Dead || q.update.from == me));
                // Others' confirmations cut a suspicion only once we are among the confirmers;
                // the list holds at most K + 1 others, plus us.
                for member in swim.members.values() {
                    let State::Suspect(suspicion) = &member.state else {
                        continue;
                    };
                    let confirmed = suspicion.confirmers.contains(&me);
                    let expected = if confirmed {
                        let confirmations = (suspicion.confirmers.len() - 1) as u32;
                        lifeguard_timeout(suspicion.floor, suspicion.ceiling, confirmations, suspicion.k)
                    } else {
                        suspicion.ceiling
                    };
                    prop_assert_eq!(suspicion.timeout, expected);
                    let others = suspicion.confirmers.len() - usize::from(confirmed);
                    prop_assert!(others <= suspicion.k as usize + 1);
                    let mut distinct = suspicion.confirmers.clone();
                    distinct.sort();
                    distinct.dedup();
                    prop_assert_eq!(distinct.len(), suspicion.confirmers.len());
                }
            }
        }
    }
}
