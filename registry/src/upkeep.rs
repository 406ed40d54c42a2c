//! Background upkeep of the observability data: makes node reports durable on a timer (they
//! are not flushed one by one; `app` flushes once more after the drain), and deletes traffic
//! older than its retention and the records of certificates long expired.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::store::{self, Store};
use crate::traffic;

/// How often node reports are flushed (fsync): bounds what a crash can lose. sled's own
/// background flush (every 500 ms by default) usually comes first; this bound holds whatever
/// sled is configured to do.
pub const REPORT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// How often traffic past retention is deleted (also once at startup).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3_600);
/// How long the record of an expired certificate is kept (for `meshctl certs` and audits).
pub const CERT_RECORD_RETENTION: Duration = Duration::from_secs(7 * 86_400);

/// The upkeep task.
pub struct Upkeep {
    store: Arc<dyn Store>,
    /// Becomes `true` when the registry drains; the task returns then.
    shutdown: watch::Receiver<bool>,
}

// === impl Upkeep ===

impl Upkeep {
    /// Upkeep of `store` until `shutdown` holds `true`.
    pub fn new(store: Arc<dyn Store>, shutdown: watch::Receiver<bool>) -> Self {
        Self { store, shutdown }
    }

    /// Runs until the registry drains.
    pub async fn run(mut self) {
        let mut flush = tokio::time::interval(REPORT_FLUSH_INTERVAL);
        let mut prune = tokio::time::interval(PRUNE_INTERVAL);
        flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
        prune.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = mesh_runtime::drain::until_true(&mut self.shutdown) => return,
                _ = flush.tick() => self.run_blocking("flush", |s| s.flush()).await,
                _ = prune.tick() => self.run_blocking("prune", prune_now).await,
            }
        }
    }

    async fn run_blocking(
        &self,
        what: &'static str,
        f: impl FnOnce(&dyn Store) -> Result<(), store::Error> + Send + 'static,
    ) {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(task = what, error = %e, "observability upkeep failed"),
            Err(e) => warn!(task = what, error = %e, "observability upkeep task failed"),
        }
    }
}

/// What the periodic prune deletes at `now_unix`: traffic and hour slots that start before the
/// first cutoff (retention), minute slots before the second.
pub fn cutoffs(now_unix: u64) -> (u64, u64) {
    (
        now_unix.saturating_sub(traffic::RETENTION.as_secs()),
        now_unix.saturating_sub(traffic::SERVICE_MINUTE_RETENTION.as_secs()),
    )
}

fn prune_now(store: &dyn Store) -> Result<(), store::Error> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (before, minutes_before) = cutoffs(now);
    let removed = store.prune_traffic(before, minutes_before)?;
    if removed > 0 {
        info!(removed, "deleted traffic past retention");
    }
    let expired_before = now.saturating_sub(CERT_RECORD_RETENTION.as_secs());
    let certs = store.prune_certs(i64::try_from(expired_before).unwrap_or(i64::MAX))?;
    if certs > 0 {
        info!(
            certs,
            "deleted records of certificates expired a week ago or more"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_follow_the_retentions() {
        let now = 100 * 86_400;
        assert_eq!(cutoffs(now), (65 * 86_400, 98 * 86_400));
        assert_eq!(cutoffs(60), (0, 0), "young clocks saturate");
        // A calendar month (31 days) always fits.
        assert!(traffic::RETENTION >= Duration::from_secs(31 * 86_400));
        assert!(
            traffic::SERVICE_MINUTE_RETENTION
                > crate::slo::MINUTE_HISTORY.max(crate::slo::LONGEST_BURN_WINDOW)
        );
    }
}
