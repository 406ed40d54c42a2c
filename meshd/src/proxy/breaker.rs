//! Circuit breaking: the connections (TCP) or requests (HTTP) this host has in flight to one
//! destination, and admission under the DestinationPolicy's limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The in-flight count of one destination; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Breaker {
    in_flight: Arc<AtomicU64>,
}

/// A slot taken by [`Breaker::admit`]; dropping it gives the slot back.
#[derive(Debug)]
#[must_use = "the slot is held only while the guard lives"]
pub struct Admitted(Arc<AtomicU64>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Breaker {
    /// Admits one more if fewer than `max` are in flight (`None`: unlimited); `None` when the
    /// circuit is open.
    pub fn admit(&self, max: Option<u32>) -> Option<Admitted> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if max.is_some_and(|m| before >= u64::from(m)) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Admitted(Arc::clone(&self.in_flight)))
    }

    /// How many are in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_frees_on_drop() {
        let b = Breaker::default();
        let one = b.admit(Some(2)).unwrap();
        let shared = b.clone();
        let two = shared.admit(Some(2)).unwrap();
        assert!(b.admit(Some(2)).is_none(), "the third is refused");
        assert_eq!(b.in_flight(), 2, "a refusal takes no slot");
        assert_eq!(shared.in_flight(), 2, "clones share the count");
        drop(one);
        let three = b.admit(Some(2)).unwrap();
        assert!(b.admit(Some(0)).is_none(), "0 admits nothing");
        let unlimited: Vec<_> = (0..100).map(|_| b.admit(None).unwrap()).collect();
        assert_eq!(b.in_flight(), 102);
        drop((two, three, unlimited));
        assert_eq!(b.in_flight(), 0);
    }
}
