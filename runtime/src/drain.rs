//! Graceful shutdown: one trigger, many cloneable watchers, and guards. Components watch for the
//! signal; each piece of work that must finish before the process exits (a connection, a tunnel)
//! holds a [`Guard`] and drops it when done; the trigger's owner waits until every guard is gone
//! (always under a deadline the caller chooses).
//!
//! A watcher does not hold the drain up: long-lived holders of one (the proxy's shared state,
//! the reloader) live until the very end, and an idle node must not wait out its whole grace
//! period for them.

use tokio::sync::{mpsc, watch};

/// Starts the drain and waits for every [`Guard`] to be dropped.
#[derive(Debug)]
pub struct Trigger {
    signal_tx: watch::Sender<bool>,
    /// Never receives a value: it completes when the last guard's sender is dropped.
    released_rx: mpsc::Receiver<()>,
    /// Keeps the channel open (so guards can be taken) until the drain starts waiting.
    open: Option<mpsc::Sender<()>>,
}

/// Sees the drain's signal and hands out guards; cheap to clone, holds nothing up.
#[derive(Debug, Clone)]
pub struct Watch {
    signal_rx: watch::Receiver<bool>,
    released: mpsc::WeakSender<()>,
}

/// Held by a piece of work the drain waits for; dropping it says the work is over.
#[derive(Debug)]
pub struct Guard {
    _released_tx: Option<mpsc::Sender<()>>,
}

/// A new trigger and its first watcher.
pub fn channel() -> (Trigger, Watch) {
    let (signal_tx, signal_rx) = watch::channel(false);
    let (released_tx, released_rx) = mpsc::channel(1);
    (
        Trigger {
            signal_tx,
            released_rx,
            open: Some(released_tx.clone()),
        },
        Watch {
            signal_rx,
            released: released_tx.downgrade(),
        },
    )
}

impl Trigger {
    /// Signals every watcher without waiting (for a second, forced phase use [`Trigger::drain`]).
    pub fn start(&self) {
        self.signal_tx.send_replace(true);
    }

    /// Signals the drain and waits until all guards have been dropped. Callers wrap this in
    /// `tokio::time::timeout` with their grace period.
    pub async fn drain(mut self) {
        self.signal_tx.send_replace(true);
        self.open = None;
        // recv() returns None once every sender (one per guard) is gone.
        while self.released_rx.recv().await.is_some() {}
    }
}

impl Watch {
    /// Resolves once the drain has started (immediately if it already has).
    pub async fn signaled(&self) {
        let mut rx = self.signal_rx.clone();
        // An Err means the trigger was dropped: treat that as a drain too.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal_rx.borrow()
    }

    /// A guard the drain waits for. Taken once the drain has finished waiting, it holds
    /// nothing up (there is nothing left to wait for).
    pub fn guard(&self) -> Guard {
        Guard {
            _released_tx: self.released.upgrade(),
        }
    }
}

/// Resolves once `rx` holds `true` (or its sender is gone). Unlike `wait_for`, the future is
/// `Send` across `select!` because it holds no borrow of the value.
pub async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn waits_for_every_guard() {
        let (trigger, watch) = channel();
        let g2 = watch.guard();
        let w2 = watch.clone();
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            w2.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(g2);
            drop(done_tx);
        });
        assert!(!watch.is_draining());
        let g1 = watch.guard();
        let drain = tokio::spawn(trigger.drain());
        watch.signaled().await;
        assert!(watch.is_draining());
        drop(g1);
        tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .expect("drain completes once all guards are dropped")
            .unwrap();
        assert!(done_rx.recv().await.is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn drain_blocks_while_a_guard_lives() {
        let (trigger, watch) = channel();
        let guard = watch.guard();
        let res = tokio::time::timeout(Duration::from_millis(50), trigger.drain()).await;
        assert!(res.is_err(), "drain must not finish while a guard is held");
        drop(guard);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn watchers_alone_hold_nothing_up() {
        let (trigger, watch) = channel();
        let kept = watch.clone();
        tokio::time::timeout(Duration::from_millis(500), trigger.drain())
            .await
            .expect("an idle node drains at once, whoever watches");
        assert!(kept.is_draining());
        // A guard taken after the drain is over waits for nothing.
        drop(kept.guard());
    }
}
