//! Exponential backoff with full jitter, for reconnects and certificate renewal retries, so a
//! fleet that lost its registry does not come back in lockstep.

use std::time::Duration;

use rand::Rng as _;

/// Exponential backoff state: each failure doubles the ceiling up to `max`; the delay is drawn
/// uniformly from `[ceiling/2, ceiling]` so retries spread out but never collapse to zero.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base`, never waiting longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; advances the state.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let lo = ceiling / 2;
        let span = ceiling.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(rand::rng().random_range(0..=span))
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(2));
        }
        let late = b.next_delay();
        assert!(
            late >= Duration::from_secs(1),
            "late delay {late:?} should be near the cap"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
