//! The registry's durable state: join tokens, nodes and issued certificates behind the
//! [`Store`] trait, with a sled implementation for production and an in-memory one for tests.
//! Owns the record types, the store error type and the join rules both stores share.

use serde::{Deserialize, Serialize};

mod memory;
mod sled;
#[cfg(test)]
mod tests;

pub use memory::MemoryStore;
pub use sled::SledStore;

/// On-disk schema version; written on first open, and a database with another version is
/// refused.
pub const SCHEMA_VERSION: u32 = 1;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage engine failed; `op` names what the store was doing.
    #[error("registry database: {op} failed")]
    Sled {
        /// What the store was doing, e.g. `"flush"`.
        op: &'static str,
        /// The engine's error.
        #[source]
        source: ::sled::Error,
    },
    /// A stored value could not be decoded.
    #[error(
        "registry database: record {key:?} in tree {tree} is corrupt, \
         maybe the database was written by something other than mesh-registry"
    )]
    Corrupt {
        /// The tree the value was read from.
        tree: &'static str,
        /// The record's key (lossy UTF-8).
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The database holds data but no schema version key.
    #[error(
        "registry database at {path} has data but no schema version, \
         so it is corrupt or not a mesh-registry database"
    )]
    MissingSchema {
        /// The database directory.
        path: String,
    },
    /// The database was written with a schema this build does not read.
    #[error(
        "registry database schema version {found} is not supported (this build reads {supported}), \
         run a mesh-registry version that matches the database"
    )]
    UnsupportedSchema {
        /// The version found in the database.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// No join token with that id.
    #[error("join token not found")]
    TokenNotFound,
    /// The join token expired.
    #[error("join token expired at {expired_unix} (Unix seconds)")]
    TokenExpired {
        /// The token's `expires_unix`.
        expired_unix: i64,
    },
    /// The join token has no uses left.
    #[error("join token has been used its maximum of {max_uses} times")]
    TokenExhausted {
        /// The token's `max_uses`.
        max_uses: u32,
    },
}

/// A join token as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id (16 hex chars), the record key; safe to log.
    pub id: String,
    /// Hex of SHA-256(secret); the secret itself is never stored.
    pub secret_sha256: String,
    /// Services the joining host may run: `namespace/name` or `namespace/*`.
    pub services: Vec<String>,
    /// Creation time, Unix seconds.
    pub created_unix: i64,
    /// The token is valid while `now < expires_unix` (Unix seconds).
    pub expires_unix: i64,
    /// How many joins the token allows; 0 = unlimited until expiry.
    pub max_uses: u32,
    /// How many joins have used the token.
    pub uses: u32,
    /// Identity of the operator who created the token.
    pub created_by: String,
}

/// A node that has joined the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name, the record key.
    pub name: String,
    /// Datacenter the node runs in.
    pub datacenter: String,
    /// Zone within the datacenter.
    pub zone: String,
    /// Services the node may run: `namespace/name` or `namespace/*`.
    pub allowed_services: Vec<String>,
    /// Id of the token the node joined with.
    pub token_id: String,
    /// Join time, Unix seconds.
    pub joined_unix: i64,
    /// Last certificate renewal, Unix seconds.
    pub last_renewed_unix: i64,
    /// Serial of the node's current certificate.
    pub cert_serial: String,
    /// Expiry of the node's current certificate, Unix seconds.
    pub cert_not_after_unix: i64,
}

/// A certificate the registry issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// Certificate serial, the record key.
    pub serial: String,
    /// Identity (SPIFFE id) in the certificate.
    pub identity: String,
    /// Node the certificate was issued to.
    pub node: String,
    /// Issue time, Unix seconds.
    pub issued_unix: i64,
    /// Start of validity, Unix seconds.
    pub not_before_unix: i64,
    /// End of validity, Unix seconds.
    pub not_after_unix: i64,
}

/// The registry's durable state.
///
/// Every method that writes returns only after the write is durable (sled: `flush()`, which
/// fsyncs), so an acknowledged write survives `kill -9`. Puts replace any record with the
/// same key. Lists of tokens and nodes are sorted by key.
pub trait Store: Send + Sync + 'static {
    /// Inserts or replaces a token (key: `id`).
    fn put_token(&self, token: &TokenRecord) -> Result<(), Error>;
    /// The token with this id, if any.
    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, Error>;
    /// All tokens, sorted by id.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, Error>;
    /// Atomically (one transaction): the token must exist ([`Error::TokenNotFound`]), not be
    /// expired at `now_unix` ([`Error::TokenExpired`]), and have uses left
    /// ([`Error::TokenExhausted`]); then `uses += 1`, the node record is inserted or replaced
    /// and the cert record inserted. Returns the updated token. Of concurrent joins on a
    /// single-use token exactly one wins. Nothing is written when any check fails.
    fn join(
        &self,
        token_id: &str,
        now_unix: i64,
        node: &NodeRecord,
        cert: &CertRecord,
    ) -> Result<TokenRecord, Error>;
    /// Inserts or replaces a node (key: `name`).
    fn put_node(&self, node: &NodeRecord) -> Result<(), Error>;
    /// The node with this name, if any.
    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, Error>;
    /// All nodes, sorted by name.
    fn list_nodes(&self) -> Result<Vec<NodeRecord>, Error>;
    /// Inserts or replaces a cert (key: `serial`).
    fn put_cert(&self, cert: &CertRecord) -> Result<(), Error>;
    /// Newest first (by `issued_unix`, then `serial`, both descending), at most `limit`
    /// (0 = all).
    fn list_certs(&self, limit: usize) -> Result<Vec<CertRecord>, Error>;
}

/// The join rules both stores share: checks `token` at `now_unix` and returns it with one
/// more use, or the reason it cannot be used.
fn consume_token(token: &TokenRecord, now_unix: i64) -> Result<TokenRecord, Error> {
    if now_unix >= token.expires_unix {
        return Err(Error::TokenExpired {
            expired_unix: token.expires_unix,
        });
    }
    if token.max_uses != 0 && token.uses >= token.max_uses {
        return Err(Error::TokenExhausted {
            max_uses: token.max_uses,
        });
    }
    let mut used = token.clone();
    used.uses = used.uses.saturating_add(1);
    Ok(used)
}

/// Sorts certs newest first and applies `limit` (0 = all), as [`Store::list_certs`] promises.
fn newest_certs(mut certs: Vec<CertRecord>, limit: usize) -> Vec<CertRecord> {
    certs.sort_by(|a, b| (b.issued_unix, &b.serial).cmp(&(a.issued_unix, &a.serial)));
    if limit != 0 {
        certs.truncate(limit);
    }
    certs
}
