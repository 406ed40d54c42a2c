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
mod tests;
