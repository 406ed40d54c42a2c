//! Replay protection for version-2 datagrams: which counters each sender instance has used,
//! whether a send time is close enough to local time, and which instances may be forgotten.
//!
//! Pure: the caller passes the time, and calls [`Replay::accept`] only for authentic datagrams
//! (after the tag verified), so a forger can neither move a window nor fill the table. Why
//! forgetting is safe is in the `gossip_seal` module docs ("Replay protection").

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use rand::Rng as _;

use super::INSTANCE_ID_LEN;

/// Counters remembered below the highest one heard from a sender instance (as IPsec's and
/// WireGuard's windows): a datagram overtaken by up to 1,023 later ones from the same socket is
/// still accepted; one older than that is dropped as replayed. A socket sends a few datagrams per
/// gossip round, so that is minutes of reordering, far beyond what UDP does.
pub const WINDOW_LEN: u64 = 1024;
/// Largest difference, in seconds, between a datagram's send time and local time that is
/// accepted; further apart it is dropped as stale. This bounds how long a captured datagram can
/// be replayed to a node that never heard it, and what state [`Replay`] must keep; it also means
/// gossiping nodes need clocks within this of each other (NTP keeps them within milliseconds).
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// Most sender instances remembered at once (about 3 MiB of windows and tables). A fleet of
/// 1,000 nodes has 1,000 live instances plus those of nodes restarted in the last
/// [`MAX_CLOCK_SKEW_SECS`]; the bound only binds under a flood from a key holder.
pub const MAX_INSTANCES: usize = 8192;

const WORD_BITS: u64 = u64::BITS as u64;
const WINDOW_WORDS: usize = (WINDOW_LEN / WORD_BITS) as usize;

/// A sender instance: 128 random bits a sealed socket picks when it opens (and again if its
/// 64-bit counter ever ran out). Counters are unique per instance, not per host, so a restarted
/// node needs no state on disk: it is a new instance with a new subkey.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(pub(super) [u8; INSTANCE_ID_LEN]);

/// Why [`Replay::accept`] refused a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The send time is more than [`MAX_CLOCK_SKEW_SECS`] away from local time.
    Stale,
    /// The counter was accepted before, is below the window, or the instance may have been
    /// forgotten with this datagram already accepted.
    Replayed,
}

/// The counters heard from one instance: the highest, and which of the [`WINDOW_LEN`] counters
/// up to it. Bit `c % WINDOW_LEN` stands for counter `c` (RFC 6479's ring, without shifting).
#[derive(Clone, PartialEq, Eq)]
pub struct Window {
    top: u64,
    seen: [u64; WINDOW_WORDS],
}

/// Replay state of one receiving socket: a [`Window`] per sender instance, at most
/// [`MAX_INSTANCES`] of them.
#[derive(Debug, Default)]
pub struct Replay {
    instances: HashMap<InstanceId, Instance>,
    /// `(newest send time, instance)`, oldest first: the order instances are forgotten in.
    by_send_time: BTreeSet<(u64, InstanceId)>,
    /// The newest send time of any instance forgotten so far: an instance heard for the first
    /// time (again) must send later than this.
    floor: u64,
}

#[derive(Debug)]
struct Instance {
    window: Window,
    newest_send_time: u64,
    /// [`Replay::floor`] when this instance was (re)admitted: what it accepted before it was
    /// forgotten has a send time no later than this.
    floor: u64,
}

// === impl InstanceId ===

impl InstanceId {
    /// A new random id (from the thread-local CSPRNG, seeded by the OS).
    pub fn random() -> Self {
        let mut bytes = [0u8; INSTANCE_ID_LEN];
        rand::rng().fill(&mut bytes);
        Self(bytes)
    }

    /// An id from raw bytes (tests, fuzzing).
    pub fn from_bytes(bytes: [u8; INSTANCE_ID_LEN]) -> Self {
        Self(bytes)
    }

    /// The id as it appears on the wire.
    pub fn as_bytes(&self) -> &[u8; INSTANCE_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

// === impl Window ===

impl Window {
    /// A window that has heard `counter` and nothing else.
    pub fn new(counter: u64) -> Self {
        let mut window = Self {
            top: counter,
            seen: [0; WINDOW_WORDS],
        };
        window.set(counter);
        window
    }

    /// The highest counter heard.
    pub fn top(&self) -> u64 {
        self.top
    }

    /// Whether `counter` would be accepted: above the top, or within the window and not heard.
    pub fn is_new(&self, counter: u64) -> bool {
        if counter > self.top {
            return true;
        }
        self.top - counter < WINDOW_LEN && !self.is_set(counter)
    }

    /// Records `counter` if it is new; `false` (and no change) if it is not.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.is_new(counter) {
            return false;
        }
        if counter > self.top {
            self.slide_to(counter);
        }
        self.set(counter);
        true
    }

    /// Makes `top` the highest counter; the counters it passes over were not heard.
    fn slide_to(&mut self, top: u64) {
        if top - self.top >= WINDOW_LEN {
            self.seen = [0; WINDOW_WORDS];
        } else {
            // At most WINDOW_LEN - 1 bits; usually one.
            for counter in self.top + 1..=top {
                let (word, bit) = Self::slot(counter);
                self.seen[word] &= !bit;
            }
        }
        self.top = top;
    }

    fn is_set(&self, counter: u64) -> bool {
        let (word, bit) = Self::slot(counter);
        self.seen[word] & bit != 0
    }

    fn set(&mut self, counter: u64) {
        let (word, bit) = Self::slot(counter);
        self.seen[word] |= bit;
    }

    fn slot(counter: u64) -> (usize, u64) {
        let index = counter % WINDOW_LEN;
        // index / WORD_BITS < WINDOW_WORDS, so the cast cannot truncate.
        ((index / WORD_BITS) as usize, 1 << (index % WORD_BITS))
    }
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let heard: u32 = self.seen.iter().map(|word| word.count_ones()).sum();
        f.debug_struct("Window")
            .field("top", &self.top)
            .field("heard", &heard)
            .finish()
    }
}

// === impl Replay ===

impl Replay {
    /// Accepts counter `counter` of `instance`, sent at `send_time`, received at `now` (both
    /// Unix seconds), at most once. Call it only for authentic datagrams.
    pub fn accept(
        &mut self,
        instance: InstanceId,
        counter: u64,
        send_time: u64,
        now: u64,
    ) -> Result<(), Rejection> {
        if send_time.abs_diff(now) > MAX_CLOCK_SKEW_SECS {
            return Err(Rejection::Stale);
        }
        self.forget_expired(now);
        if let Some(known) = self.instances.get_mut(&instance) {
            if send_time <= known.floor || !known.window.accept(counter) {
                return Err(Rejection::Replayed);
            }
            if send_time > known.newest_send_time {
                self.by_send_time
                    .remove(&(known.newest_send_time, instance));
                self.by_send_time.insert((send_time, instance));
                known.newest_send_time = send_time;
            }
            return Ok(());
        }
        // What this instance accepted before it was forgotten (if it was) is at or below the
        // floor now; instances forgotten to make room for it are none of its business.
        let floor = self.floor;
        if send_time <= floor {
            return Err(Rejection::Replayed);
        }
        if self.instances.len() >= MAX_INSTANCES {
            self.forget_oldest();
        }
        self.instances.insert(
            instance,
            Instance {
                window: Window::new(counter),
                newest_send_time: send_time,
                floor,
            },
        );
        self.by_send_time.insert((send_time, instance));
        Ok(())
    }

    /// Instances remembered.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// No instance remembered.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Whether `instance` is remembered.
    pub fn contains(&self, instance: &InstanceId) -> bool {
        self.instances.contains_key(instance)
    }

    /// The window of `instance`, if remembered.
    pub fn window(&self, instance: &InstanceId) -> Option<&Window> {
        self.instances.get(instance).map(|known| &known.window)
    }

    /// The newest send time of any instance forgotten so far (0: none).
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Forgets instances whose every datagram is stale at `now`: those cannot be replayed.
    fn forget_expired(&mut self, now: u64) {
        let horizon = now.saturating_sub(MAX_CLOCK_SKEW_SECS);
        while let Some(&(newest, _)) = self.by_send_time.first()
            && newest < horizon
        {
            self.forget_oldest();
        }
    }

    /// Forgets the least recently heard instance (by its own clock) and raises the floor to its
    /// newest send time, so nothing it sent can be accepted again.
    fn forget_oldest(&mut self) {
        if let Some((newest, instance)) = self.by_send_time.pop_first() {
            self.instances.remove(&instance);
            self.floor = self.floor.max(newest);
        }
    }
}
