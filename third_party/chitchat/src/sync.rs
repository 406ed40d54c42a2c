//! Which entries a V2 digest carries (meshd): a bounded scope instead of every member.
//!
//! A V1 SYN lists every member, with a heartbeat that changes every round, so each message
//! grows with the cluster and gossip costs every node O(N) bytes per round. In V2 liveness moves
//! to SWIM probes (`swim.rs`) and a SYN lists only:
//!
//! - the sender's own entry (so a peer learns of a new node on first contact);
//! - the entries that changed here recently, newest first, capped: what is spreading now is
//!   pushed by everyone who has it, which is what makes a change reach every node in O(log N)
//!   rounds, as before;
//! - a window that rotates over the whole table, so a difference that is no longer recent
//!   anywhere (a node cut off while it spread) is still found, in N / window SYNs;
//! - instead, on a SYN out of `full_every` and while this node is catching up (it just joined,
//!   or its last delta filled half a datagram): every entry in the next range of a sweep over
//!   the table (`Sweep`, as many entries as `sweep_budget` bytes hold), the responder answering
//!   with every entry of its own in that range. The slow anti-entropy round of Serf's
//!   push-pull, chunked so that no digest outgrows a datagram however large the table.
//!
//! The reply compares versions for exactly the ids of the SYN (scuttlebutt restricted to that
//! scope), so bytes per node stay flat in N at steady state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::message::Sweep;
use crate::{ChitchatId, NodeState, Version};

/// How the scope of V2 digests is chosen.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// An entry counts as recent this long after it last changed here.
    pub recent_window: Duration,
    /// Most recent entries one digest carries.
    pub recent_max: usize,
    /// Entries of the rotating window in each digest.
    pub window: usize,
    /// One SYN in this many is a sweep.
    pub full_every: u32,
    /// Bytes of one sweep digest (an upper bound per entry: its id and 24 bytes).
    pub sweep_budget: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            recent_window: Duration::from_secs(2),
            recent_max: 32,
            window: 8,
            // One sweep SYN every ~10 s at the default interval (3 SYNs a round).
            full_every: 150,
            sweep_budget: 16 * 1024,
        }
    }
}

/// Per-node bookkeeping for digest scopes.
pub(crate) struct Sync {
    config: SyncConfig,
    /// Last seen (last GC version, max version) of each entry and when it changed.
    stamps: HashMap<ChitchatId, ((Version, Version), Instant)>,
    /// The same stamps ordered by time, so the recent ones are read newest first without a
    /// scan (during a large cluster's bootstrap every entry is recent).
    by_time: BTreeSet<(Instant, ChitchatId)>,
    /// Where the rotating window resumes (the last id it covered).
    cursor: Option<ChitchatId>,
    /// SYNs sent since the last sweep.
    since_full: u32,
    /// Sweep until the sweep has gone round: this node just joined or fell behind.
    catching_up: bool,
    /// Where the sweep resumes (after this id; `None`: from the start).
    sweep_after: Option<ChitchatId>,
    /// When this node last took in ids it did not know, within the recent window.
    admitted: VecDeque<Instant>,
    /// Catching up because of newcomers (not because this node is new or behind): every other
    /// SYN sweeps, the others still carry recent changes, so a flood of invented ids cannot
    /// stop real changes from spreading.
    interleave: bool,
    /// Whether the last SYN while interleaving was a sweep.
    swept_last: bool,
}

impl Sync {
    pub(crate) fn new(config: SyncConfig) -> Self {
        Self {
            config,
            stamps: HashMap::new(),
            by_time: BTreeSet::new(),
            cursor: None,
            // The first SYNs of a node are full: it knows nothing yet.
            since_full: u32::MAX,
            catching_up: true,
            sweep_after: None,
            admitted: VecDeque::new(),
            interleave: false,
            swept_last: false,
        }
    }

    /// This node took in an id it did not know. More newcomers within one recent window than
    /// a digest's recent list carries means the others' recent lists overflowed (a mass start):
    /// the ids that fell off them would otherwise be found only by windows and the slow
    /// sweeps, so sweep until a pass has gone round. A join or two in a running site stays
    /// well under it and costs no sweep.
    pub(crate) fn note_admitted(&mut self, now: Instant) {
        while self
            .admitted
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) > self.config.recent_window)
        {
            self.admitted.pop_front();
        }
        self.admitted.push_back(now);
        if self.admitted.len() > self.config.recent_max {
            // A node already sweeping every SYN (new, or behind) keeps doing so.
            if !self.catching_up {
                self.catching_up = true;
                self.interleave = true;
            }
            self.admitted.clear();
        }
    }

    /// Notes which entries changed since the last call (once per round: O(N) but no
    /// allocation for entries that did not change). Entries leave through [`Self::forget`].
    pub(crate) fn observe<'a>(
        &mut self,
        states: impl Iterator<Item = (&'a ChitchatId, &'a NodeState)>,
        now: Instant,
    ) {
        for (id, state) in states {
            self.touch(id, state.monotonic_property(), now);
        }
    }

    /// Notes one entry's versions now (after a delta touched it, or when it was admitted):
    /// O(1), where [`Self::observe`] scans the table.
    pub(crate) fn touch(&mut self, id: &ChitchatId, versions: (Version, Version), now: Instant) {
        match self.stamps.get_mut(id) {
            Some((known, at)) if *known != versions => {
                self.by_time.remove(&(*at, id.clone()));
                *known = versions;
                *at = now;
                self.by_time.insert((now, id.clone()));
            }
            Some(_) => {}
            None => {
                self.stamps.insert(id.clone(), (versions, now));
                self.by_time.insert((now, id.clone()));
            }
        }
    }

    /// Forgets an entry removed from the table.
    pub(crate) fn forget(&mut self, id: &ChitchatId) {
        if let Some((_, at)) = self.stamps.remove(id) {
            self.by_time.remove(&(at, id.clone()));
        }
    }

    /// Ids changed within the recent window, newest first, at most `recent_max`.
    pub(crate) fn recent(&self, now: Instant) -> Vec<ChitchatId> {
        let horizon = now.checked_sub(self.config.recent_window);
        self.by_time
            .iter()
            .rev()
            .take_while(|(at, _)| horizon.is_none_or(|horizon| *at > horizon))
            .take(self.config.recent_max)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// The next `window` ids of the table after the cursor, wrapping around; moves the cursor.
    pub(crate) fn window<V>(&mut self, table: &BTreeMap<ChitchatId, V>) -> Vec<ChitchatId> {
        let take = self.config.window.min(table.len());
        let after = match &self.cursor {
            Some(cursor) => table
                .range::<ChitchatId, _>((
                    std::ops::Bound::Excluded(cursor),
                    std::ops::Bound::Unbounded,
                ))
                .map(|(id, _)| id)
                .chain(table.keys())
                .take(take)
                .cloned()
                .collect::<Vec<_>>(),
            None => table.keys().take(take).cloned().collect(),
        };
        self.cursor = after.last().cloned();
        after
    }

    /// The range the next SYN sweeps, if it is a sweep (and counts it): from where the sweep
    /// stands to the end; the digest then says how far it got.
    pub(crate) fn next_sweep(&mut self) -> Option<Sweep> {
        let mut catching_up = self.catching_up;
        if catching_up && self.interleave {
            self.swept_last = !self.swept_last;
            catching_up = self.swept_last;
        }
        if !catching_up && self.since_full < self.config.full_every {
            self.since_full = self.since_full.saturating_add(1);
            return None;
        }
        self.since_full = 0;
        Some(Sweep {
            after: self.sweep_after.clone(),
            until: None,
        })
    }

    /// A responder covered `swept`: the sweep resumes after it, or, when it reached the end of
    /// the table, starts over (and a node catching up has caught up).
    pub(crate) fn swept(&mut self, swept: &Sweep) {
        self.sweep_after = swept.until.clone();
        if swept.until.is_none() {
            self.catching_up = false;
            self.interleave = false;
        }
    }

    /// This node fell behind (a delta filled half a datagram): sweep until it has gone round.
    pub(crate) fn catch_up(&mut self) {
        self.catching_up = true;
        self.interleave = false;
    }

    /// Bytes of one sweep digest.
    pub(crate) fn sweep_budget(&self) -> usize {
        self.config.sweep_budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u16) -> ChitchatId {
        ChitchatId::for_local_test(10_000 + i)
    }

    fn table(n: u16) -> BTreeMap<ChitchatId, ()> {
        (0..n).map(|i| (id(i), ())).collect()
    }

    fn sync(window: usize) -> Sync {
        Sync::new(SyncConfig {
            recent_window: Duration::from_secs(2),
            recent_max: 3,
            window,
            full_every: 4,
            sweep_budget: 1024,
        })
    }

    #[test]
    fn more_newcomers_than_a_recent_list_carries_start_a_sweep_pass() {
        let mut sync = sync(2);
        let t0 = Instant::now();
        // Caught up after its first pass, as a running node is.
        sync.swept(&Sweep {
            after: None,
            until: None,
        });
        // A join now and then (recent_max = 3 per 2 s window): no sweep.
        for i in 0..6 {
            sync.note_admitted(t0 + Duration::from_secs(3 * i));
        }
        assert!(!sync.catching_up);
        // Four within one window: the recent lists overflowed somewhere; sweep.
        let t1 = t0 + Duration::from_secs(100);
        for i in 0..4 {
            sync.note_admitted(t1 + Duration::from_millis(100 * i));
        }
        assert!(sync.catching_up);
        // Every other SYN sweeps; the others carry recent changes.
        let kinds: Vec<bool> = (0..4).map(|_| sync.next_sweep().is_some()).collect();
        assert_eq!(kinds, [true, false, true, false]);
    }

    #[test]
    fn window_rotates_over_the_whole_table() {
        let table = table(5);
        let mut sync = sync(2);
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.extend(sync.window(&table));
        }
        // 10 picks over 5 ids: each id exactly twice, in order, wrapping.
        let expected: Vec<_> = (0..10).map(|i| id(i % 5)).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn window_never_repeats_an_id_within_one_digest() {
        let table = table(2);
        let mut sync = sync(8);
        assert_eq!(sync.window(&table), vec![id(0), id(1)]);
        assert_eq!(sync.window(&table), vec![id(0), id(1)]);
        assert!(sync.window(&BTreeMap::<ChitchatId, ()>::new()).is_empty());
    }

    #[test]
    fn sweeps_first_until_round_then_one_in_full_every() {
        let mut sync = sync(2);
        // A new node sweeps every SYN until a sweep reaches the end of a table.
        let first = sync.next_sweep().expect("a new node sweeps");
        assert_eq!(first, Sweep::default());
        sync.swept(&Sweep {
            after: None,
            until: Some(id(3)),
        });
        let second = sync.next_sweep().expect("still catching up");
        assert_eq!(second.after, Some(id(3)));
        sync.swept(&Sweep {
            after: Some(id(3)),
            until: None,
        });
        // Caught up: one SYN in `full_every` (4) sweeps, from the start again.
        let pattern: Vec<bool> = (0..10).map(|_| sync.next_sweep().is_some()).collect();
        assert_eq!(
            pattern,
            vec![
                false, false, false, false, true, false, false, false, false, true
            ]
        );
        sync.catch_up();
        assert!(sync.next_sweep().is_some());
        assert!(sync.next_sweep().is_some(), "until a sweep goes round");
    }

    #[tokio::test(start_paused = true)]
    async fn recent_is_newest_first_capped_and_expires() {
        let mut states: BTreeMap<ChitchatId, NodeState> = BTreeMap::new();
        for i in 0..5 {
            states.insert(id(i), NodeState::for_test());
        }
        let mut sync = sync(2);
        let t0 = Instant::now();
        sync.observe(states.iter(), t0);
        // Everything is new at first sight; the cap keeps three.
        assert_eq!(sync.recent(t0).len(), 3);
        let t1 = t0 + Duration::from_secs(3);
        assert!(sync.recent(t1).is_empty(), "first sight expired");
        states.get_mut(&id(4)).unwrap().set("k", "v");
        sync.observe(states.iter(), t1);
        let t2 = t1 + Duration::from_millis(100);
        states.get_mut(&id(1)).unwrap().set("k", "v");
        sync.observe(states.iter(), t2);
        assert_eq!(sync.recent(t2), vec![id(1), id(4)]);
        assert_eq!(
            sync.recent(t2 + Duration::from_secs(2)),
            Vec::<ChitchatId>::new()
        );
        sync.forget(&id(1));
        assert_eq!(sync.recent(t2), vec![id(4)]);
    }
}
