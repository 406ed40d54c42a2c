//! [`MemoryKv`]: the [`Kv`] contract in memory behind one mutex, for tests of the layers
//! above. Nothing survives the process.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use super::log::{self, READ_BATCHES};
use super::{Batch, Entry, Error, Event, Kv, Revision, Snapshot, Txn, WatchStream};

const BACKEND: &str = "memory store";

#[derive(Debug, Default)]
struct State {
    revision: Revision,
    entries: BTreeMap<Vec<u8>, Entry>,
    /// Every batch after `compacted`, oldest first.
    history: VecDeque<Batch>,
    compacted: Revision,
}

/// An in-memory [`Kv`].
#[derive(Debug, Clone)]
pub struct MemoryKv {
    state: Arc<Mutex<State>>,
    notify: Arc<watch::Sender<Revision>>,
}

impl Default for MemoryKv {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryKv {
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            notify: Arc::new(watch::channel(0).0),
        }
    }

    /// Every method checks before it mutates: recover from a poisoned lock.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn read_after(state: &State, after: Revision) -> Result<Vec<Batch>, Error> {
    if after < state.compacted {
        return Err(Error::Compacted {
            after,
            compacted: state.compacted,
        });
    }
    Ok(state
        .history
        .iter()
        .filter(|b| b.revision > after)
        .take(READ_BATCHES)
        .cloned()
        .collect())
}

#[tonic::async_trait]
impl Kv for MemoryKv {
    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, Error> {
        Ok(self.state().entries.get(key).cloned())
    }

    async fn range(&self, prefix: &[u8]) -> Result<Snapshot, Error> {
        let state = self.state();
        let entries = state
            .entries
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        Ok(Snapshot {
            revision: state.revision,
            entries,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<Option<Revision>, Error> {
        log::check_size(BACKEND, &txn)?;
        let mut state = self.state();
        let get = |k: &[u8]| Ok::<_, Error>(state.entries.get(k).cloned());
        if !log::compares_hold(&txn.compares, get)? {
            return Ok(None);
        }
        let revision = state.revision + 1;
        let events = log::events_of(&txn.ops, revision, |k: &[u8]| {
            Ok::<_, Error>(state.entries.get(k).cloned())
        })?;
        if events.is_empty() {
            return Ok(Some(state.revision));
        }
        for event in &events {
            match event {
                Event::Put { key, entry } => {
                    state.entries.insert(key.clone(), entry.clone());
                }
                Event::Delete { key, .. } => {
                    state.entries.remove(key);
                }
            }
        }
        state.revision = revision;
        state.history.push_back(Batch { revision, events });
        drop(state);
        self.notify.send_replace(revision);
        Ok(Some(revision))
    }

    async fn revision(&self) -> Result<Revision, Error> {
        Ok(self.state().revision)
    }

    async fn watch(&self, prefix: &[u8], after: Revision) -> Result<WatchStream, Error> {
        read_after(&self.state(), after)?;
        let state = self.state.clone();
        let read: log::ReadAfter = Arc::new(move |after| {
            read_after(&state.lock().unwrap_or_else(PoisonError::into_inner), after)
        });
        Ok(log::follow(
            prefix.to_vec(),
            after,
            read,
            self.notify.subscribe(),
        ))
    }

    async fn compact(&self, revision: Revision) -> Result<(), Error> {
        let mut state = self.state();
        let revision = revision.min(state.revision);
        while state
            .history
            .front()
            .is_some_and(|b| b.revision <= revision)
        {
            state.history.pop_front();
        }
        state.compacted = state.compacted.max(revision);
        Ok(())
    }
}
