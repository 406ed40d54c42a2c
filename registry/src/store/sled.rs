//! [`SledStore`]: the production [`Store`] on sled 0.34 — one tree per record kind (`tokens`,
//! `nodes`, `certs`) plus `meta` for the schema version. Values are JSON; every write is
//! flushed (fsync) before it is acknowledged.

use std::path::Path;

use ::sled::Transactional;
use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    CertRecord, Error, NodeRecord, SCHEMA_VERSION, Store, TokenRecord, consume_token, newest_certs,
};

const TOKENS: &str = "tokens";
const NODES: &str = "nodes";
const CERTS: &str = "certs";
const META: &str = "meta";
const SCHEMA_KEY: &str = "schema_version";

/// A [`Store`] in a sled database directory. Cloning is cheap and shares the database.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: ::sled::Db,
    tokens: ::sled::Tree,
    nodes: ::sled::Tree,
    certs: ::sled::Tree,
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
        let has_data = [&*self.db, &self.tokens, &self.nodes, &self.certs, meta]
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
    key: &str,
) -> Result<Option<T>, Error> {
    match tree.get(key).map_err(sled_err("read"))? {
        Some(raw) => decode(name, key.as_bytes(), &raw).map(Some),
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
