//! What the local backends share: the transaction rules (compares, which ops change anything,
//! the size bound) as pure functions over a view of the keys, and the watch that replays a
//! history of batches after a revision and then follows a notification of new commits.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::watch;

use super::{Batch, Compare, Entry, Error, Event, Op, Revision, Txn, WatchStream};

/// Most bytes of keys and values one transaction may carry, on every backend (etcd refuses
/// requests over 1.5 MiB by default; one limit everywhere keeps behaviour the same).
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// Most operations (and, separately, compares) of one transaction, on every backend (etcd's
/// default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// Most batches one read of the history returns, so a watch far behind catches up in bounded
/// steps.
pub(super) const READ_BATCHES: usize = 256;

/// Refuses a transaction over [`MAX_TXN_BYTES`] or [`MAX_TXN_OPS`], or writing one key twice.
pub(super) fn check_size(backend: &'static str, txn: &Txn) -> Result<(), Error> {
    for (what, len) in [
        ("the operations of a transaction", txn.ops.len()),
        ("the compares of a transaction", txn.compares.len()),
    ] {
        if len > MAX_TXN_OPS {
            return Err(Error::TooLarge {
                backend,
                what,
                len,
                max: MAX_TXN_OPS,
            });
        }
    }
    let len: usize = txn
        .compares
        .iter()
        .map(|c| match c {
            Compare::Absent(k) | Compare::ModRevision(k, _) => k.len(),
        })
        .chain(txn.ops.iter().map(|op| match op {
            Op::Put(k, v) => k.len() + v.len(),
            Op::Delete(k) => k.len(),
        }))
        .sum();
    if len > MAX_TXN_BYTES {
        return Err(Error::TooLarge {
            backend,
            what: "a transaction",
            len,
            max: MAX_TXN_BYTES,
        });
    }
    let mut keys: Vec<&[u8]> = txn
        .ops
        .iter()
        .map(|op| match op {
            Op::Put(k, _) | Op::Delete(k) => k.as_slice(),
        })
        .collect();
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::DuplicateKey {
            key: super::printable(w[0]),
        });
    }
    Ok(())
}

/// Whether every compare holds, `get` reading the current entries.
pub(super) fn compares_hold<E>(
    compares: &[Compare],
    mut get: impl FnMut(&[u8]) -> Result<Option<Entry>, E>,
) -> Result<bool, E> {
    for compare in compares {
        let holds = match compare {
            Compare::Absent(key) => get(key)?.is_none(),
            Compare::ModRevision(key, revision) => {
                get(key)?.is_some_and(|e| e.mod_revision == *revision)
            }
        };
        if !holds {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The events `ops` make at `revision`, in op order, `get` reading the entries as they were
/// before (`check_size` has refused a key written twice; earlier ops are still consulted).
pub(super) fn events_of<E>(
    ops: &[Op],
    revision: Revision,
    mut get: impl FnMut(&[u8]) -> Result<Option<Entry>, E>,
) -> Result<Vec<Event>, E> {
    let mut staged: Vec<(Vec<u8>, Option<Entry>)> = Vec::new();
    let mut events = Vec::new();
    for op in ops {
        let key = match op {
            Op::Put(k, _) | Op::Delete(k) => k,
        };
        let before = match staged.iter().rev().find(|(k, _)| k == key) {
            Some((_, entry)) => entry.clone(),
            None => get(key)?,
        };
        match op {
            Op::Put(key, value) => {
                let create_revision = before.map_or(revision, |e| e.create_revision);
                let entry = Entry {
                    value: value.clone(),
                    mod_revision: revision,
                    create_revision,
                };
                staged.push((key.clone(), Some(entry.clone())));
                events.push(Event::Put {
                    key: key.clone(),
                    entry,
                });
            }
            Op::Delete(key) if before.is_some() => {
                staged.push((key.clone(), None));
                events.push(Event::Delete {
                    key: key.clone(),
                    mod_revision: revision,
                });
            }
            Op::Delete(_) => {}
        }
    }
    Ok(events)
}

/// The events of `batch` under `prefix`, if any.
pub(super) fn filter(batch: &Batch, prefix: &[u8]) -> Option<Batch> {
    let events: Vec<Event> = batch
        .events
        .iter()
        .filter(|e| match e {
            Event::Put { key, .. } | Event::Delete { key, .. } => key.starts_with(prefix),
        })
        .cloned()
        .collect();
    (!events.is_empty()).then_some(Batch {
        revision: batch.revision,
        events,
    })
}

/// Reads up to [`READ_BATCHES`] batches of the whole history after a revision, oldest first;
/// `Error::Compacted` if that history is gone.
pub(super) type ReadAfter = Arc<dyn Fn(Revision) -> Result<Vec<Batch>, Error> + Send + Sync>;

struct Follow {
    prefix: Vec<u8>,
    after: Revision,
    read: ReadAfter,
    /// The backend's last committed revision, sent after each commit.
    notify: watch::Receiver<Revision>,
    pending: VecDeque<Batch>,
    done: bool,
}

/// The watch of a local backend: replay with `read`, then wait for `notify`.
pub(super) fn follow(
    prefix: Vec<u8>,
    after: Revision,
    read: ReadAfter,
    notify: watch::Receiver<Revision>,
) -> WatchStream {
    let state = Follow {
        prefix,
        after,
        read,
        notify,
        pending: VecDeque::new(),
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if let Some(batch) = st.pending.pop_front() {
                return Some((Ok(batch), st));
            }
            // Marked seen before reading: a commit after the read wakes the wait below.
            st.notify.borrow_and_update();
            let read = st.read.clone();
            let after = st.after;
            let batches = tokio::task::spawn_blocking(move || read(after))
                .await
                .unwrap_or_else(|e| {
                    Err(Error::Backend {
                        backend: "local store",
                        op: "watch read",
                        reason: e.to_string(),
                    })
                });
            match batches {
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                Ok(batches) if !batches.is_empty() => {
                    for batch in batches {
                        st.after = batch.revision;
                        st.pending.extend(filter(&batch, &st.prefix));
                    }
                }
                // The backend is gone: the watch ends.
                Ok(_) => st.notify.changed().await.ok()?,
            }
        }
    }))
}
