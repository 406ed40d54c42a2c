//! The registry's consistent state as a revisioned key-value space, the shape etcd gives it:
//! every committed transaction gets the next store-wide revision, writes can be conditioned on
//! a key's absence or on the revision it was last modified at (compare-and-set), and a watch
//! replays every change after a revision, in order, then follows new ones. The config store
//! is written once over [`Kv`]; backends (memory for tests, sled on one machine, etcd for
//! replicas) only provide this contract, which `kv/tests.rs` runs against each of them.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;

pub mod etcd;
mod log;
mod memory;
mod sled;
#[cfg(test)]
mod tests;

pub use etcd::EtcdKv;
pub use log::{MAX_TXN_BYTES, MAX_TXN_OPS};
pub use memory::MemoryKv;
pub use sled::SledKv;

/// A store-wide revision: 0 before the first commit, +1 per committed transaction.
pub type Revision = u64;

/// A key's current value and the revisions that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    /// The revision of the transaction that last wrote it.
    pub mod_revision: Revision,
    /// The revision of the transaction that created it (since its last deletion).
    pub create_revision: Revision,
}

/// Every key under a prefix at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: Revision,
    /// Sorted by key.
    pub entries: Vec<(Vec<u8>, Entry)>,
}

/// A condition of a [`Txn`]: all must hold for its operations to be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(Vec<u8>),
    /// The key exists and was last written at exactly this revision.
    ModRevision(Vec<u8>, Revision),
}

/// A write of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    /// Deleting an absent key is not a change (no event).
    Delete(Vec<u8>),
}

/// Compare-then-write, atomically: either every compare holds and every op is applied under
/// one new revision, or nothing is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

/// What a watch sees change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put {
        key: Vec<u8>,
        entry: Entry,
    },
    Delete {
        key: Vec<u8>,
        mod_revision: Revision,
    },
}

/// The changes one transaction made under the watched prefix (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// Batches in revision order; ends with an error when the watch cannot go on.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Batch, Error>> + Send>>;

/// Why a [`Kv`] operation failed. `Compacted` is the caller's cue to list again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The history a watch asked for is gone: list the prefix and watch from that revision.
    #[error(
        "revisions up to {compacted} were compacted: a watch after revision {after} cannot \
         replay them (list again and watch from the listed revision)"
    )]
    Compacted {
        after: Revision,
        compacted: Revision,
    },
    /// The backend failed (disk, network, a stopped server): the operation may be retried.
    #[error("{backend} {op} failed: {reason}")]
    Backend {
        backend: &'static str,
        op: &'static str,
        reason: String,
    },
    /// Stored bytes this version cannot read (a bug or a damaged disk: an operator's problem).
    #[error("{backend} holds an unreadable {what} at {key}: {reason}")]
    Corrupt {
        backend: &'static str,
        what: &'static str,
        key: String,
        reason: String,
    },
    /// A transaction that writes one key twice (etcd refuses it; so does every backend).
    #[error("a transaction writes {key} twice")]
    DuplicateKey { key: String },
    /// A transaction larger than every backend takes (bytes or operations).
    #[error("{what}: {len}; {backend} takes at most {max}")]
    TooLarge {
        backend: &'static str,
        what: &'static str,
        len: usize,
        max: usize,
    },
}

/// A revisioned key-value space (see the module docs).
#[tonic::async_trait]
pub trait Kv: Send + Sync + 'static {
    /// The key's entry, if it exists.
    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, Error>;
    /// Every key starting with `prefix`, at one revision.
    async fn range(&self, prefix: &[u8]) -> Result<Snapshot, Error>;
    /// Applies `txn` if its compares hold: `Some(revision)` it was committed at (durable
    /// before this returns), `None` if a compare failed (nothing written). A transaction with
    /// no op that changes anything commits nothing and returns the current revision.
    async fn txn(&self, txn: Txn) -> Result<Option<Revision>, Error>;
    /// The current revision.
    async fn revision(&self) -> Result<Revision, Error>;
    /// Every change under `prefix` after revision `after`, in order, each transaction's once,
    /// then the changes to come. `Error::Compacted` (first or later) if that history is gone.
    async fn watch(&self, prefix: &[u8], after: Revision) -> Result<WatchStream, Error>;
    /// Forgets the history up to and including `revision` (watches after it still work).
    async fn compact(&self, revision: Revision) -> Result<(), Error>;
}

/// The shared handle the registry passes around.
pub type SharedKv = Arc<dyn Kv>;

/// A key for messages: printable bytes as they are, others escaped.
pub(crate) fn printable(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}
