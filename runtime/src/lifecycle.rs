//! A daemon's lifecycle as one primitive: its [`Phase`] in a watch, only ever moving forward
//! (starting → ready → draining → quiescing → closing → stopped), readiness a latch that
//! opens once and that a drain closes for good, and a `watch<bool>` per phase for the many
//! components that only wait until "at least this phase" (stop accepting, close what is left,
//! end).

use tokio::sync::watch;

/// Where a daemon is in its life. Ordered: a later phase implies every earlier one happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Binding, loading, joining: not serving yet (`/ready` answers 503).
    Starting,
    /// Serving (`/ready` answers 200).
    Ready,
    /// Leaving: peers are told (and `/ready` is 503 again) while it still accepts, so they
    /// stop picking it before it stops answering.
    Draining,
    /// No longer accepting; work in flight finishes within the grace period.
    Quiescing,
    /// The grace period is over: what is left is closed.
    Closing,
    /// Background tasks end.
    Stopped,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 6] = [
        Phase::Starting,
        Phase::Ready,
        Phase::Draining,
        Phase::Quiescing,
        Phase::Closing,
        Phase::Stopped,
    ];

    /// Lower-case name (logs, admin JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
            Phase::Quiescing => "quiescing",
            Phase::Closing => "closing",
            Phase::Stopped => "stopped",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The phase of one daemon; share it behind an `Arc`.
#[derive(Debug)]
pub struct Lifecycle {
    phase: watch::Sender<Phase>,
    /// `reached[p]` turns true once the phase is `p` or later (and stays true).
    reached: [watch::Sender<bool>; Phase::ALL.len()],
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Lifecycle {
    /// A daemon that is starting.
    pub fn new() -> Self {
        let reached = Phase::ALL.map(|p| watch::channel(p == Phase::Starting).0);
        Self {
            phase: watch::channel(Phase::Starting).0,
            reached,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Follows the phase.
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// A receiver that holds `true` once the phase is `phase` or later, for
    /// [`crate::drain::until_true`].
    pub fn reached(&self, phase: Phase) -> watch::Receiver<bool> {
        self.reached[phase.index()].subscribe()
    }

    /// The readiness latch: starting → ready. `false`, and no change, if the daemon is ready
    /// already or past it (a drain that began first wins: a late "ready" cannot reopen it).
    pub fn set_ready(&self) -> bool {
        let opened = self.phase.send_if_modified(|p| {
            let open = *p == Phase::Starting;
            if open {
                *p = Phase::Ready;
            }
            open
        });
        if opened {
            self.mark_reached(Phase::Ready);
        }
        opened
    }

    /// Moves forward to `phase`; `false`, and no change, if the daemon is there or past it.
    pub fn advance(&self, phase: Phase) -> bool {
        let moved = self.phase.send_if_modified(|p| {
            let forward = phase > *p;
            if forward {
                *p = phase;
            }
            forward
        });
        if moved {
            self.mark_reached(phase);
        }
        moved
    }

    /// Whether the daemon is serving.
    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Ready
    }

    fn mark_reached(&self, phase: Phase) {
        for p in Phase::ALL.into_iter().filter(|p| *p <= phase) {
            self.reached[p.index()].send_if_modified(|r| !std::mem::replace(r, true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_a_latch_a_drain_closes() {
        let l = Lifecycle::new();
        assert_eq!(l.phase(), Phase::Starting);
        assert!(!l.is_ready());
        assert!(l.set_ready());
        assert!(l.is_ready());
        assert!(!l.set_ready(), "opens once");
        assert!(l.advance(Phase::Draining));
        assert!(!l.is_ready());
        assert!(!l.set_ready(), "a late ready cannot reopen a drain");
        assert_eq!(l.phase(), Phase::Draining);
    }

    #[test]
    fn a_drain_before_ready_keeps_it_unready() {
        let l = Lifecycle::new();
        assert!(l.advance(Phase::Draining));
        assert!(!l.set_ready());
        assert!(
            *l.reached(Phase::Ready).borrow(),
            "draining implies past ready"
        );
    }

    #[test]
    fn phases_only_move_forward_and_mark_every_earlier_one() {
        let l = Lifecycle::new();
        let rx: Vec<_> = Phase::ALL.iter().map(|p| l.reached(*p)).collect();
        let reached =
            |rx: &[watch::Receiver<bool>]| rx.iter().map(|r| *r.borrow()).collect::<Vec<_>>();
        assert_eq!(reached(&rx), [true, false, false, false, false, false]);
        assert!(l.advance(Phase::Closing));
        assert_eq!(reached(&rx), [true, true, true, true, true, false]);
        assert!(!l.advance(Phase::Quiescing), "never back");
        assert!(!l.advance(Phase::Closing), "not twice");
        assert_eq!(l.phase(), Phase::Closing);
        assert!(l.advance(Phase::Stopped));
        assert_eq!(reached(&rx), [true; 6]);
        // A receiver taken late sees the phase reached already.
        assert!(*l.reached(Phase::Quiescing).borrow());
    }

    #[tokio::test]
    async fn waiters_wake_at_their_phase() {
        let l = std::sync::Arc::new(Lifecycle::new());
        let mut closing = l.reached(Phase::Closing);
        let waiter = tokio::spawn(async move {
            crate::drain::until_true(&mut closing).await;
        });
        l.advance(Phase::Quiescing);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        l.advance(Phase::Closing);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken at closing")
            .unwrap();
    }

    #[test]
    fn names() {
        let names: Vec<_> = Phase::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "starting",
                "ready",
                "draining",
                "quiescing",
                "closing",
                "stopped"
            ]
        );
    }
}
