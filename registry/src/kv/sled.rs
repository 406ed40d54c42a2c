//! [`SledKv`]: the [`Kv`] contract on sled 0.34 for a registry on one machine — tree `kv`
//! (key → mod revision, create revision, value), `kv_log` (big-endian revision → the batch of
//! that transaction, the history watches replay) and `kv_meta` (the revision and the
//! compacted revision). A transaction is one sled transaction over the three trees, flushed
//! (fsync) before it is acknowledged.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use ::sled::Transactional;
use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tokio::sync::watch;

use super::log::{self, READ_BATCHES};
use super::{Batch, Entry, Error, Event, Kv, Revision, Snapshot, Txn, WatchStream, printable};

const BACKEND: &str = "sled store";
const REVISION: &[u8] = b"revision";
const COMPACTED: &[u8] = b"compacted";

/// A [`Kv`] in a sled database.
#[derive(Clone)]
pub struct SledKv {
    db: ::sled::Db,
    kv: ::sled::Tree,
    log: ::sled::Tree,
    meta: ::sled::Tree,
    notify: Arc<watch::Sender<Revision>>,
    /// Transactions write, ranges read: a range sees the keys at exactly its revision (sled
    /// has no snapshot reads outside a transaction, and a scan inside one cannot be had).
    lock: Arc<RwLock<()>>,
}

fn backend(op: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: BACKEND,
        op,
        reason: e.to_string(),
    }
}

fn corrupt(what: &'static str, key: &[u8], reason: &str) -> Error {
    Error::Corrupt {
        backend: BACKEND,
        what,
        key: printable(key),
        reason: reason.to_owned(),
    }
}

/// Big-endian bytes first, so that keys of `kv_log` sort by revision.
fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn encode_entry(entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entry.value.len());
    out.extend_from_slice(&entry.mod_revision.to_be_bytes());
    out.extend_from_slice(&entry.create_revision.to_be_bytes());
    out.extend_from_slice(&entry.value);
    out
}

fn decode_entry(key: &[u8], raw: &[u8]) -> Result<Entry, Error> {
    match (u64_at(raw, 0), u64_at(raw, 8)) {
        (Some(mod_revision), Some(create_revision)) => Ok(Entry {
            value: raw[16..].to_vec(),
            mod_revision,
            create_revision,
        }),
        _ => Err(corrupt("entry", key, "shorter than its two revisions")),
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Keys and values are bounded by MAX_TXN_BYTES, far below u32::MAX.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// One batch: per event a tag (1 put, 2 delete), the key, then the entry or the revision.
fn encode_batch(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for event in events {
        match event {
            Event::Put { key, entry } => {
                out.push(1);
                put_bytes(&mut out, key);
                put_bytes(&mut out, &encode_entry(entry));
            }
            Event::Delete { key, mod_revision } => {
                out.push(2);
                put_bytes(&mut out, key);
                out.extend_from_slice(&mod_revision.to_be_bytes());
            }
        }
    }
    out
}

fn decode_batch(revision: Revision, raw: &[u8]) -> Result<Batch, Error> {
    let key = revision.to_be_bytes();
    let bad = |why: &str| corrupt("history batch", &key, why);
    let mut rest = raw;
    let mut take = |n: usize| -> Result<&[u8], Error> {
        if rest.len() < n {
            return Err(bad("truncated"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let mut events = Vec::new();
    while let Ok(tag) = take(1) {
        let tag = tag[0];
        let len = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let event_key = take(len)?.to_vec();
        match tag {
            1 => {
                let len = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
                let entry = decode_entry(&event_key, take(len)?)?;
                events.push(Event::Put {
                    key: event_key,
                    entry,
                });
            }
            2 => {
                let mod_revision = u64_at(take(8)?, 0).expect("8 bytes");
                events.push(Event::Delete {
                    key: event_key,
                    mod_revision,
                });
            }
            _ => return Err(bad("unknown event tag")),
        }
    }
    Ok(Batch { revision, events })
}

fn meta_u64(meta: &::sled::Tree, key: &[u8]) -> Result<Revision, Error> {
    match meta.get(key).map_err(|e| backend("read meta", e))? {
        None => Ok(0),
        Some(raw) => u64_at(&raw, 0).ok_or_else(|| corrupt("meta value", key, "not 8 bytes")),
    }
}

impl SledKv {
    /// Opens (creating) the trees in `db`.
    pub fn new(db: ::sled::Db) -> Result<Self, Error> {
        let open = |name: &str| db.open_tree(name).map_err(|e| backend("open tree", e));
        let (kv, log, meta) = (open("kv")?, open("kv_log")?, open("kv_meta")?);
        let revision = meta_u64(&meta, REVISION)?;
        Ok(Self {
            db,
            kv,
            log,
            meta,
            notify: Arc::new(watch::channel(revision).0),
            lock: Arc::default(),
        })
    }

    /// Opens (creating) a database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        Self::new(::sled::open(dir).map_err(|e| backend("open", e))?)
    }

    fn read_after(&self, after: Revision) -> Result<Vec<Batch>, Error> {
        let compacted = meta_u64(&self.meta, COMPACTED)?;
        if after < compacted {
            return Err(Error::Compacted { after, compacted });
        }
        let start = after.saturating_add(1).to_be_bytes();
        self.log
            .range(start..)
            .take(READ_BATCHES)
            .map(|item| {
                let (k, v) = item.map_err(|e| backend("read history", e))?;
                let revision =
                    u64_at(&k, 0).ok_or_else(|| corrupt("history key", &k, "not 8 bytes"))?;
                decode_batch(revision, &v)
            })
            .collect()
    }

    fn txn_blocking(&self, txn: &Txn) -> Result<Option<Revision>, Error> {
        let _write = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        let outcome = (&self.kv, &self.log, &self.meta).transaction(|(kv, log, meta)| {
            let get = |k: &[u8]| -> Result<Option<Entry>, ConflictableTransactionError<Error>> {
                kv.get(k)?
                    .map(|raw| decode_entry(k, &raw))
                    .transpose()
                    .map_err(ConflictableTransactionError::Abort)
            };
            let current = tx_meta(meta, REVISION)?;
            if !log::compares_hold(&txn.compares, get)? {
                return Ok(None);
            }
            let revision = current + 1;
            let events = log::events_of(&txn.ops, revision, get)?;
            if events.is_empty() {
                return Ok(Some(current));
            }
            for event in &events {
                match event {
                    Event::Put { key, entry } => {
                        kv.insert(key.as_slice(), encode_entry(entry))?;
                    }
                    Event::Delete { key, .. } => {
                        kv.remove(key.as_slice())?;
                    }
                }
            }
            log.insert(&revision.to_be_bytes(), encode_batch(&events))?;
            meta.insert(REVISION, &revision.to_be_bytes())?;
            Ok(Some(revision))
        });
        let outcome = outcome.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => backend("transaction", e),
        })?;
        self.db.flush().map_err(|e| backend("flush", e))?;
        Ok(outcome)
    }
}

fn tx_meta(
    meta: &TransactionalTree,
    key: &[u8],
) -> Result<Revision, ConflictableTransactionError<Error>> {
    match meta.get(key)? {
        None => Ok(0),
        Some(raw) => u64_at(&raw, 0).ok_or_else(|| {
            ConflictableTransactionError::Abort(corrupt("meta value", key, "not 8 bytes"))
        }),
    }
}

/// Runs sled work (which may fsync or read the disk) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(backend("task", e)))
}

#[tonic::async_trait]
impl Kv for SledKv {
    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, Error> {
        let (kv, key) = (self.kv.clone(), key.to_vec());
        blocking(move || {
            kv.get(&key)
                .map_err(|e| backend("get", e))?
                .map(|raw| decode_entry(&key, &raw))
                .transpose()
        })
        .await
    }

    async fn range(&self, prefix: &[u8]) -> Result<Snapshot, Error> {
        let (this, prefix) = (self.clone(), prefix.to_vec());
        blocking(move || {
            let _read = this.lock.read().unwrap_or_else(PoisonError::into_inner);
            let revision = meta_u64(&this.meta, REVISION)?;
            let entries = this
                .kv
                .scan_prefix(&prefix)
                .map(|item| {
                    let (k, v) = item.map_err(|e| backend("range", e))?;
                    Ok((k.to_vec(), decode_entry(&k, &v)?))
                })
                .collect::<Result<_, Error>>()?;
            Ok(Snapshot { revision, entries })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<Option<Revision>, Error> {
        log::check_size(BACKEND, &txn)?;
        let this = self.clone();
        let outcome = blocking(move || this.txn_blocking(&txn)).await?;
        if let Some(revision) = outcome {
            self.notify.send_if_modified(|seen| {
                let newer = revision > *seen;
                *seen = (*seen).max(revision);
                newer
            });
        }
        Ok(outcome)
    }

    async fn revision(&self) -> Result<Revision, Error> {
        let meta = self.meta.clone();
        blocking(move || meta_u64(&meta, REVISION)).await
    }

    async fn watch(&self, prefix: &[u8], after: Revision) -> Result<WatchStream, Error> {
        let this = self.clone();
        let compacted = blocking(move || meta_u64(&this.meta, COMPACTED)).await?;
        if after < compacted {
            return Err(Error::Compacted { after, compacted });
        }
        let this = self.clone();
        let read: log::ReadAfter = Arc::new(move |after| this.read_after(after));
        Ok(log::follow(
            prefix.to_vec(),
            after,
            read,
            self.notify.subscribe(),
        ))
    }

    async fn compact(&self, revision: Revision) -> Result<(), Error> {
        let this = self.clone();
        blocking(move || {
            let current = meta_u64(&this.meta, REVISION)?;
            let revision = revision.min(current);
            if revision <= meta_u64(&this.meta, COMPACTED)? {
                return Ok(());
            }
            // The mark first: a watch reading meanwhile is told "compacted", never handed a
            // history with a hole.
            this.meta
                .insert(COMPACTED, &revision.to_be_bytes())
                .map_err(|e| backend("compact", e))?;
            let end = revision.saturating_add(1).to_be_bytes();
            for key in this.log.range(..end).keys() {
                let key = key.map_err(|e| backend("compact", e))?;
                this.log.remove(key).map_err(|e| backend("compact", e))?;
            }
            this.db.flush().map_err(|e| backend("flush", e))?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod codec {
    use super::*;

    fn events() -> Vec<Event> {
        vec![
            Event::Put {
                key: b"policy/a".to_vec(),
                entry: Entry {
                    value: b"{\"spec\":1}".to_vec(),
                    mod_revision: 7,
                    create_revision: 3,
                },
            },
            Event::Delete {
                key: b"node/\xff".to_vec(),
                mod_revision: 7,
            },
        ]
    }

    #[test]
    fn a_batch_round_trips() {
        let raw = encode_batch(&events());
        assert_eq!(
            decode_batch(7, &raw).unwrap(),
            Batch {
                revision: 7,
                events: events()
            }
        );
    }

    #[test]
    fn a_damaged_batch_is_an_error_never_a_panic() {
        let raw = encode_batch(&events());
        for cut in 0..raw.len() {
            // Cut at an event boundary, fewer events; anywhere else, Corrupt.
            match decode_batch(7, &raw[..cut]) {
                Ok(batch) => assert!(batch.events.len() < 2, "cut {cut}"),
                Err(e) => assert!(matches!(e, Error::Corrupt { .. }), "cut {cut}: {e}"),
            }
        }
        let mut bad_tag = raw;
        bad_tag[0] = 9;
        assert!(matches!(
            decode_batch(7, &bad_tag),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            decode_entry(b"k", &[0; 15]),
            Err(Error::Corrupt { .. })
        ));
    }
}
