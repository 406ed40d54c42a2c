//! [`SledStore`]: the production [`Store`] on sled 0.34 — one tree per record kind (`tokens`,
//! `nodes`, `certs`) plus `meta` for the schema version, and three policy trees: `policies`
//! (latest version of every resource, deletions kept as markers so watchers can catch up),
//! `policy_history` (every version, keyed by resource then big-endian revision) and
//! `policy_meta` (the mesh revision), and `gossip_keys` (one record: the gossip keyring). Values
//! are JSON; every write is flushed (fsync) before it is acknowledged.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use ::sled::Transactional;
use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    ApplyOutcome, CertRecord, Error, GossipKeyring, NodeRecord, PolicyChange, PolicyRecord,
    SCHEMA_VERSION, Store, TokenRecord, consume_token, newest_certs, plan_policies,
};

const TOKENS: &str = "tokens";
const NODES: &str = "nodes";
const CERTS: &str = "certs";
const META: &str = "meta";
const SCHEMA_KEY: &str = "schema_version";
const POLICIES: &str = "policies";
const POLICY_HISTORY: &str = "policy_history";
const POLICY_META: &str = "policy_meta";
const REVISION_KEY: &str = "revision";
const GOSSIP_KEYS: &str = "gossip_keys";
const KEYRING_KEY: &str = "keyring";

/// A [`Store`] in a sled database directory. Cloning is cheap and shares the database.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: ::sled::Db,
    tokens: ::sled::Tree,
    nodes: ::sled::Tree,
    certs: ::sled::Tree,
    policies: ::sled::Tree,
    policy_history: ::sled::Tree,
    policy_meta: ::sled::Tree,
    gossip_keys: ::sled::Tree,
    /// Policy applies hold it for writing from their first read until after the flush, and
    /// policy reads for reading, so a reader sees whole revisions and never one that is not
    /// yet durable (a watcher must not be sent a revision a crash could take back).
    policy_lock: Arc<RwLock<()>>,
}

// === impl SledStore ===

impl SledStore {
    /// Opens or creates the database in `dir`. A new database gets [`SCHEMA_VERSION`]
    /// (written durably); an existing one must carry that version
    /// ([`Error::UnsupportedSchema`]), and one with data but no version is refused
    /// ([`Error::MissingSchema`]).
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let db = ::sled::Config::new()
            .path(dir)
            .open()
            .map_err(sled_err("open database"))?;
        let tree = |name: &str| db.open_tree(name).map_err(sled_err("open tree"));
        let store = Self {
            tokens: tree(TOKENS)?,
            nodes: tree(NODES)?,
            certs: tree(CERTS)?,
            policies: tree(POLICIES)?,
            policy_history: tree(POLICY_HISTORY)?,
            policy_meta: tree(POLICY_META)?,
            gossip_keys: tree(GOSSIP_KEYS)?,
            policy_lock: Arc::default(),
            db: db.clone(),
        };
        store.check_schema(&tree(META)?, dir)?;
        tracing::debug!(path = %dir.display(), schema_version = SCHEMA_VERSION, "opened registry store");
        Ok(store)
    }

    fn check_schema(&self, meta: &::sled::Tree, dir: &Path) -> Result<(), Error> {
        if let Some(raw) = meta
            .get(SCHEMA_KEY)
            .map_err(sled_err("read schema version"))?
        {
            let found: u32 = decode(META, SCHEMA_KEY.as_bytes(), &raw)?;
            if found != SCHEMA_VERSION {
                return Err(Error::UnsupportedSchema {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            return Ok(());
        }
        let has_data = [
            &*self.db,
            &self.tokens,
            &self.nodes,
            &self.certs,
            &self.policies,
            &self.policy_history,
            &self.policy_meta,
            &self.gossip_keys,
            meta,
        ]
        .iter()
        .any(|tree| !tree.is_empty());
        if has_data {
            return Err(Error::MissingSchema {
                path: dir.display().to_string(),
            });
        }
        meta.insert(SCHEMA_KEY, encode(&SCHEMA_VERSION))
            .map_err(sled_err("write schema version"))?;
        self.flush()
    }

    /// Makes every write so far durable (fsync).
    fn flush(&self) -> Result<(), Error> {
        self.db.flush().map_err(sled_err("flush"))?;
        Ok(())
    }

    fn put<T: Serialize>(
        &self,
        tree: &::sled::Tree,
        op: &'static str,
        key: &str,
        value: &T,
    ) -> Result<(), Error> {
        tree.insert(key, encode(value)).map_err(sled_err(op))?;
        self.flush()
    }

    fn read_revision(&self) -> Result<u64, Error> {
        Ok(get(&self.policy_meta, POLICY_META, REVISION_KEY)?.unwrap_or(0))
    }

    /// Every latest version (deletion markers included) in key order; caller holds the lock.
    fn latest_policies(&self) -> Result<Vec<PolicyRecord>, Error> {
        list(&self.policies, POLICIES)
    }

    fn read_policies(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        // The lock guards no data, so a panicked holder leaves nothing inconsistent.
        self.policy_lock
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Key of a resource in `policies`: `kind \0 namespace \0 name`, so keys sort by kind, then
/// namespace, then name (names never contain NUL; the policy model validates them).
fn policy_key(kind: &str, namespace: &str, name: &str) -> Vec<u8> {
    [kind.as_bytes(), namespace.as_bytes(), name.as_bytes()].join(&0u8)
}

/// Key of one version in `policy_history`: the resource key, NUL, then the big-endian revision
/// so a prefix scan is oldest first.
fn history_key(record: &PolicyRecord) -> Vec<u8> {
    let mut key = policy_key(&record.kind, &record.namespace, &record.name);
    key.push(0);
    key.extend_from_slice(&record.revision.to_be_bytes());
    key
}

impl Store for SledStore {
    fn put_token(&self, token: &TokenRecord) -> Result<(), Error> {
        self.put(&self.tokens, "write token", &token.id, token)
    }

    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, Error> {
        get(&self.tokens, TOKENS, id)
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, Error> {
        list(&self.tokens, TOKENS)
    }

    fn join(
        &self,
        token_id: &str,
        now_unix: i64,
        node: &NodeRecord,
        cert: &CertRecord,
    ) -> Result<TokenRecord, Error> {
        let node_json = encode(node);
        let cert_json = encode(cert);
        // sled serialises transactions (a global lock around the closure and commit), so two
        // joins on a single-use token cannot both see it unused.
        let result = (&self.tokens, &self.nodes, &self.certs).transaction(
            |(tokens, nodes, certs)| -> Result<TokenRecord, ConflictableTransactionError<Error>> {
                let Some(raw) = tokens.get(token_id)? else {
                    return Err(ConflictableTransactionError::Abort(Error::TokenNotFound));
                };
                let used = decode(TOKENS, token_id.as_bytes(), &raw)
                    .and_then(|token: TokenRecord| consume_token(&token, now_unix))
                    .map_err(ConflictableTransactionError::Abort)?;
                tokens.insert(token_id.as_bytes(), encode(&used))?;
                nodes.insert(node.name.as_bytes(), node_json.as_slice())?;
                certs.insert(cert.serial.as_bytes(), cert_json.as_slice())?;
                Ok(used)
            },
        );
        let used = result.map_err(|err| match err {
            TransactionError::Abort(err) => err,
            TransactionError::Storage(source) => Error::Sled {
                op: "join transaction",
                source,
            },
        })?;
        self.flush()?;
        Ok(used)
    }

    fn put_node(&self, node: &NodeRecord) -> Result<(), Error> {
        self.put(&self.nodes, "write node", &node.name, node)
    }

    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, Error> {
        get(&self.nodes, NODES, name)
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, Error> {
        list(&self.nodes, NODES)
    }

    fn put_cert(&self, cert: &CertRecord) -> Result<(), Error> {
        self.put(&self.certs, "write cert", &cert.serial, cert)
    }

    fn list_certs(&self, limit: usize) -> Result<Vec<CertRecord>, Error> {
        // Keyed by serial, so sorted in memory; fine while the cert count stays modest.
        Ok(newest_certs(list(&self.certs, CERTS)?, limit))
    }

    fn policy_revision(&self) -> Result<u64, Error> {
        let _read = self.read_policies();
        self.read_revision()
    }

    fn apply_policies(
        &self,
        changes: &[PolicyChange],
        author: &str,
        now_unix: i64,
        dry_run: bool,
    ) -> Result<ApplyOutcome, Error> {
        let _write = self
            .policy_lock
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let revision = self.read_revision()?;
        let plan = plan_policies(changes, author, now_unix, revision, |c| {
            get(
                &self.policies,
                POLICIES,
                policy_key(&c.kind, &c.namespace, &c.name),
            )
        })?;
        if dry_run || plan.writes.is_empty() {
            return Ok((revision, plan.outcomes));
        }
        let writes: Vec<_> = plan
            .writes
            .iter()
            .map(|r| {
                let key = policy_key(&r.kind, &r.namespace, &r.name);
                (key, history_key(r), encode(r))
            })
            .collect();
        let new_revision = encode(&plan.revision);
        // One transaction over the three trees: after a crash either all of it is there or
        // none of it (sled recovers transactions atomically).
        (&self.policies, &self.policy_history, &self.policy_meta)
            .transaction(|(policies, history, meta)| {
                for (key, history_key, value) in &writes {
                    policies.insert(key.as_slice(), value.as_slice())?;
                    history.insert(history_key.as_slice(), value.as_slice())?;
                }
                meta.insert(REVISION_KEY, new_revision.as_slice())?;
                Ok::<_, ConflictableTransactionError<Error>>(())
            })
            .map_err(|err| match err {
                TransactionError::Abort(err) => err,
                TransactionError::Storage(source) => Error::Sled {
                    op: "policy apply transaction",
                    source,
                },
            })?;
        self.flush()?;
        Ok((plan.revision, plan.outcomes))
    }

    fn list_policies(&self) -> Result<(u64, Vec<PolicyRecord>), Error> {
        let _read = self.read_policies();
        let mut records = self.latest_policies()?;
        records.retain(|r| !r.deleted);
        Ok((self.read_revision()?, records))
    }

    fn policy_history(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<PolicyRecord>, Error> {
        let _read = self.read_policies();
        let mut prefix = policy_key(kind, namespace, name);
        prefix.push(0);
        self.policy_history
            .scan_prefix(prefix)
            .map(|entry| {
                let (key, raw) = entry.map_err(sled_err("scan"))?;
                decode(POLICY_HISTORY, &key, &raw)
            })
            .collect()
    }

    fn policy_changes_since(&self, revision: u64) -> Result<(u64, Vec<PolicyRecord>), Error> {
        let _read = self.read_policies();
        let current = self.read_revision()?;
        let mut records = Vec::new();
        if revision < current {
            // A scan of every resource: policy sets are small, and watchers only catch up on
            // (re)connect.
            records = self.latest_policies()?;
            records.retain(|r| r.revision > revision);
        }
        Ok((current, records))
    }

    fn get_gossip_keyring(&self) -> Result<Option<GossipKeyring>, Error> {
        get(&self.gossip_keys, GOSSIP_KEYS, KEYRING_KEY)
    }

    fn put_gossip_keyring(&self, keyring: &GossipKeyring) -> Result<(), Error> {
        self.put(
            &self.gossip_keys,
            "write gossip keyring",
            KEYRING_KEY,
            keyring,
        )
    }
}

fn sled_err(op: &'static str) -> impl Fn(::sled::Error) -> Error {
    move |source| Error::Sled { op, source }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records of strings, integers and lists always serialize")
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &[u8], raw: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(raw).map_err(|source| Error::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn get<T: DeserializeOwned>(
    tree: &::sled::Tree,
    name: &'static str,
    key: impl AsRef<[u8]>,
) -> Result<Option<T>, Error> {
    let key = key.as_ref();
    match tree.get(key).map_err(sled_err("read"))? {
        Some(raw) => decode(name, key, &raw).map(Some),
        None => Ok(None),
    }
}

/// Every record in `tree`, in key order.
fn list<T: DeserializeOwned>(tree: &::sled::Tree, name: &'static str) -> Result<Vec<T>, Error> {
    tree.iter()
        .map(|entry| {
            let (key, raw) = entry.map_err(sled_err("scan"))?;
            decode(name, &key, &raw)
        })
        .collect()
}
