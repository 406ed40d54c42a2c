//! Per-source pacing of authentic gossip datagrams: a token bucket per source address, so a key
//! holder replaying nothing but sending fresh datagrams with a victim's address as source
//! cannot make this node reflect (larger) replies at the victim faster than gossip itself would,
//! and one chatty peer cannot crowd out the others. Counted after authentication: forged or
//! replayed datagrams never spend a source's tokens (a spoofer without the key cannot starve a
//! real peer).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Datagrams one source may send per gossip interval, sustained. A peer sends a node at most a
/// SYN, an ACK and a SYN-ACK per round of each side; ten leaves room for catch-up rounds.
pub const PER_INTERVAL: f64 = 10.0;
/// Datagrams one source may send at once.
pub const BURST: f64 = 2.0 * PER_INTERVAL;
/// Most sources tracked; past it the least recently heard is forgotten (it starts full again,
/// which only a key holder with that many addresses gains from).
pub const MAX_SOURCES: usize = 8_192;

/// The buckets.
#[derive(Debug)]
pub struct Pace {
    per_ms: f64,
    buckets: HashMap<SocketAddr, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Pace {
    /// Pacing for a gossip round every `interval`.
    pub fn new(interval: Duration) -> Self {
        let interval_ms = interval.as_millis().max(1) as f64;
        Self {
            per_ms: PER_INTERVAL / interval_ms,
            buckets: HashMap::new(),
        }
    }

    /// Whether an authentic datagram from `from` at `now_ms` is within its pace (spending a
    /// token if so). A clock going back refills nothing.
    pub fn admit(&mut self, from: SocketAddr, now_ms: u64) -> bool {
        if !self.buckets.contains_key(&from) && self.buckets.len() >= MAX_SOURCES {
            self.forget_oldest();
        }
        let per_ms = self.per_ms;
        let b = self.buckets.entry(from).or_insert(Bucket {
            tokens: BURST,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.at_ms) as f64;
        b.tokens = (b.tokens + elapsed * per_ms).min(BURST);
        b.at_ms = b.at_ms.max(now_ms);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn forget_oldest(&mut self) {
        if let Some(oldest) = self
            .buckets
            .iter()
            .min_by_key(|(_, b)| b.at_ms)
            .map(|(a, _)| *a)
        {
            self.buckets.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 7946))
    }

    #[test]
    fn a_source_gets_its_burst_then_its_pace() {
        let mut p = Pace::new(Duration::from_millis(100));
        let sent = (0..100).filter(|_| p.admit(addr(1), 1_000)).count();
        assert_eq!(sent, BURST as usize);
        assert!(p.admit(addr(2), 1_000), "another source is not affected");
        assert!(!p.admit(addr(1), 1_005));
        // One interval later: PER_INTERVAL more.
        let later = (0..100).filter(|_| p.admit(addr(1), 1_100)).count();
        assert_eq!(later, PER_INTERVAL as usize);
        assert!(!p.admit(addr(1), 900), "a clock going back is no credit");
    }

    #[test]
    fn normal_gossip_is_never_paced() {
        // A peer sends at most 3 datagrams per round to one node; a second of that passes.
        let mut p = Pace::new(Duration::from_millis(200));
        for round in 0..50u64 {
            for _ in 0..3 {
                assert!(p.admit(addr(1), round * 200));
            }
        }
    }

    #[test]
    fn sources_are_bounded() {
        let mut p = Pace::new(Duration::from_millis(100));
        for i in 0..(MAX_SOURCES as u16 + 10) {
            p.admit(addr(i), u64::from(i));
        }
        assert_eq!(p.buckets.len(), MAX_SOURCES);
        assert!(
            !p.buckets.contains_key(&addr(0)),
            "the least recently heard went first"
        );
    }
}
