//! Graceful shutdown: one trigger, many cloneable watchers. Components watch for the signal,
//! finish their work, and drop their watcher; the trigger's owner waits until every watcher is
//! gone (always under a deadline the caller chooses).

use tokio::sync::{mpsc, watch};

/// Starts the drain and waits for every [`Watch`] to be dropped.
#[derive(Debug)]
pub struct Trigger {
    signal_tx: watch::Sender<bool>,
    /// Never receives a value: it completes when the last watcher's sender is dropped.
    released_rx: mpsc::Receiver<()>,
}

/// Held by every component that must finish before the process exits.
#[derive(Debug, Clone)]
pub struct Watch {
    signal_rx: watch::Receiver<bool>,
    /// Dropping the last clone tells the trigger that everyone has finished.
    _released_tx: mpsc::Sender<()>,
}

/// A new trigger and its first watcher.
pub fn channel() -> (Trigger, Watch) {
    let (signal_tx, signal_rx) = watch::channel(false);
    let (released_tx, released_rx) = mpsc::channel(1);
    (
        Trigger {
            signal_tx,
            released_rx,
        },
        Watch {
            signal_rx,
            _released_tx: released_tx,
        },
    )
}

impl Trigger {
    /// Signals every watcher without waiting (for a second, forced phase use [`Trigger::drain`]).
    pub fn start(&self) {
        self.signal_tx.send_replace(true);
    }

    /// Signals the drain and waits until all watchers have been dropped. Callers wrap this in
    /// `tokio::time::timeout` with their grace period.
    pub async fn drain(mut self) {
        self.signal_tx.send_replace(true);
        // recv() returns None once every sender (one per watcher) is gone.
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
    async fn waits_for_every_watcher() {
        let (trigger, watch) = channel();
        let w2 = watch.clone();
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            w2.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(w2);
            drop(done_tx);
        });
        assert!(!watch.is_draining());
        let w1 = watch;
        let drain = tokio::spawn(trigger.drain());
        w1.signaled().await;
        assert!(w1.is_draining());
        drop(w1);
        tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .expect("drain completes once all watchers are dropped")
            .unwrap();
        assert!(done_rx.recv().await.is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn drain_blocks_while_a_watcher_lives() {
        let (trigger, watch) = channel();
        let res = tokio::time::timeout(Duration::from_millis(50), trigger.drain()).await;
        assert!(
            res.is_err(),
            "drain must not finish while a watcher is held"
        );
        drop(watch);
    }
}
