//! The registry's durable state: join tokens, nodes, issued certificates, versioned policy
//! resources, the gossip keyring, node reports with their traffic aggregates and SLO alert
//! states behind the [`Store`] trait, with a sled implementation for production and an
//! in-memory one for tests. Owns the record types, the store error type and the join,
//! policy-apply and traffic-rollup rules both stores share.

use std::collections::BTreeMap;

use mesh_api::gossip_key::KeyMaterial;
use serde::{Deserialize, Serialize};

use crate::slo::Severity;

mod kv;
mod memory;
mod sled;
#[cfg(test)]
pub(crate) mod tests;

pub use kv::KvStore;
pub use memory::MemoryStore;
pub use sled::SledStore;

/// On-disk schema version; written on first open, and a database with another version is
/// refused. Bump it only when the layout of an existing tree changes: the policy trees, the
/// gossip keyring tree and the observability trees (node reports, traffic, SLO alerts) were
/// added without a bump, because a version-1 database simply lacks them (they start empty;
/// the registry creates a missing keyring at startup).
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
    /// The key-value store under [`KvStore`] failed (or refused the transaction).
    #[error("registry store: {op} failed")]
    Kv {
        /// What the store was doing, e.g. `"join"`.
        op: &'static str,
        /// Why.
        #[source]
        source: crate::kv::Error,
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
    /// The join token was revoked.
    #[error("join token was revoked at {revoked_unix} (Unix seconds)")]
    TokenRevoked {
        /// The token's `revoked_unix`.
        revoked_unix: i64,
    },
    /// A node of that name is registered and the token was not created to replace it.
    #[error(
        "node {name} is already registered; to replace it (a reinstalled host), join with a \
         token made by `meshctl token create --replace {name}`"
    )]
    NodeExists {
        /// The node name.
        name: String,
    },
    /// The token was created to replace another node, and joins only under that name.
    #[error("join token was created to replace node {replace_node} and cannot join as {name}")]
    TokenForOtherNode {
        /// The name the token joins as.
        replace_node: String,
        /// The name the join asked for.
        name: String,
    },
    /// One apply named the same resource twice; nothing was written.
    #[error("policy resource {kind} {namespace}/{name} appears more than once in one apply")]
    DuplicatePolicyChange {
        /// Resource kind.
        kind: String,
        /// Resource namespace.
        namespace: String,
        /// Resource name.
        name: String,
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
    /// The node the token was created to replace: it joins only under this name, and may
    /// while a node of that name is registered. `None`: any name not registered yet (and in
    /// records stored before tokens could replace).
    #[serde(default)]
    pub replace_node: Option<String>,
    /// When the token was revoked, Unix seconds; `None` while it is not.
    #[serde(default)]
    pub revoked_unix: Option<i64>,
    /// Identity of the operator who revoked it; empty while it is not revoked.
    #[serde(default)]
    pub revoked_by: String,
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

/// One version of a policy resource. The store keeps the spec as opaque (canonical) JSON so it
/// does not depend on the policy model; the API validates before anything reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Resource kind, e.g. `Route`.
    pub kind: String,
    /// Resource namespace.
    pub namespace: String,
    /// Resource name.
    pub name: String,
    /// The spec as JSON; empty for a deletion.
    pub spec_json: String,
    /// The mesh revision that wrote this version.
    pub revision: u64,
    /// Identity that made the change.
    pub author: String,
    /// When, Unix seconds.
    pub updated_unix: i64,
    /// This version is a deletion (kept in history and for watchers catching up).
    pub deleted: bool,
}

/// The keys that seal and open gossip datagrams, as the registry keeps and hands them out.
/// `Debug` shows key ids only: the keys are secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipKeyring {
    /// Bumped by every change.
    pub revision: u64,
    /// Standard base64 of 32-byte keys; the first (primary) seals, every key opens.
    pub keys: Vec<String>,
}

/// How an edge's traffic was carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP: counts are requests, with durations.
    Http,
    /// TCP: counts are connections, without durations.
    Tcp,
}

/// One edge of the service graph: who called whom, and how.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EdgeKey {
    /// `namespace/name` of the caller, or `external`.
    pub source: String,
    /// `namespace/name` of the called service.
    pub destination: String,
    /// Mutual TLS carried the traffic.
    pub mtls: bool,
    /// HTTP or TCP.
    pub protocol: Protocol,
    /// The other site the callee's instances were in (reached through its east-west
    /// gateway); empty: the reporting node's own site. Absent from records before sites.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub destination_site: String,
}

/// Traffic counts, summed over reports (saturating: a counter never wraps to small).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Requests (HTTP) or connections (TCP).
    pub requests: u64,
    /// 5xx answers (HTTP) or failed connections (TCP).
    pub errors: u64,
    /// Bytes both ways.
    pub bytes: u64,
    /// Requests per `mesh_api::observe::LATENCY_BOUNDS_MS` bucket; empty for TCP.
    pub latency_buckets: Vec<u64>,
}

/// An edge's traffic in one minute (registry clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeMinute {
    /// Start of the minute, Unix seconds (a multiple of 60).
    pub minute_unix: u64,
    /// The edge.
    pub edge: EdgeKey,
    /// Its traffic in that minute.
    pub traffic: Traffic,
}

/// Resolution of a service's traffic series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// One slot per minute: burn-rate windows and short compliance windows.
    Minute,
    /// One slot per hour: compliance windows of days and weeks.
    Hour,
}

/// A called service's traffic from every caller in one slot, per protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSlot {
    /// Start of the slot, Unix seconds (a multiple of the step).
    pub start_unix: u64,
    /// HTTP or TCP.
    pub protocol: Protocol,
    /// The service's traffic in the slot.
    pub traffic: Traffic,
}

/// A certificate a node holds and when it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertExpiryRecord {
    /// SPIFFE identity.
    pub identity: String,
    /// Expiry, Unix seconds.
    pub not_after_unix: i64,
}

/// A node's last report, without its edges (those are in the traffic aggregates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReportRecord {
    /// The node (from its certificate), the record key.
    pub node: String,
    /// When the registry received it, Unix ms (registry clock).
    pub received_unix_ms: u64,
    /// Node clock minus registry clock when it arrived, ms.
    pub clock_skew_ms: i64,
    /// The node's clock when it sent the report, Unix ms.
    pub sent_unix_ms: u64,
    /// Length of the period the edge counts covered, ms.
    pub period_ms: u64,
    /// Policy revision the node enforces.
    pub policy_revision: u64,
    /// Gossip keyring revision the node seals with.
    pub keyring_revision: u64,
    /// Configuration generation (reloads applied since start).
    pub config_generation: u64,
    /// Live members in its gossip view.
    pub members: u32,
    /// Digest of the member names.
    pub members_digest: String,
    /// Every certificate it holds.
    pub certificates: Vec<CertExpiryRecord>,
    /// meshd's version.
    pub version: String,
    /// What the node's operator should know of, as the node reported it (none in records
    /// stored before warnings were reported).
    #[serde(default)]
    pub warnings: Vec<WarningRecord>,
}

/// One warning of a node's report (`NodeWarning`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarningRecord {
    /// Stable machine-readable code, e.g. `listener_off_loopback`.
    pub code: String,
    /// One line for people.
    pub message: String,
}

/// The alert state of one SLO, kept while it fires so a restart neither loses nor repeats it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SloAlertRecord {
    /// `SLO/namespace/name`, the record key.
    pub slo: String,
    /// The firing severity (never `ok`: a resolved alert is deleted).
    pub severity: Severity,
    /// When the current severity began, Unix seconds.
    pub since_unix: i64,
}

/// One requested change to a policy resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyChange {
    /// Resource kind.
    pub kind: String,
    /// Resource namespace.
    pub namespace: String,
    /// Resource name.
    pub name: String,
    /// The new spec; `None` deletes the resource.
    pub spec_json: Option<String>,
}

/// What an apply did (or, on a dry run, would do) to one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeAction {
    /// The resource did not exist (or had been deleted).
    Created,
    /// The spec changed.
    Updated,
    /// The spec was already the same; nothing written.
    Unchanged,
    /// The resource was removed.
    Deleted,
    /// A deletion of a resource that does not exist; nothing written.
    NotFound,
}

/// The outcome of [`Store::apply_policies`]: the mesh revision after the call, and per change
/// (in request order) what happened and the spec it replaced (for diffs).
pub type ApplyOutcome = (u64, Vec<(ChangeAction, Option<String>)>);

/// The registry's durable state.
///
/// Every method that writes returns only after the write is durable (sled: `flush()`, which
/// fsyncs), so an acknowledged write survives `kill -9` — except the traffic writes
/// ([`Store::record_report`], [`Store::prune_traffic`]), which say so. Puts replace any record with the
/// same key. Lists of tokens and nodes are sorted by key.
pub trait Store: Send + Sync + 'static {
    /// Inserts or replaces a token (key: `id`).
    fn put_token(&self, token: &TokenRecord) -> Result<(), Error>;
    /// The token with this id, if any.
    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, Error>;
    /// All tokens, sorted by id.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, Error>;
    /// Marks the token revoked at `now_unix` by `by`, durable before it returns, so no join
    /// can use it again (one transaction with respect to [`Store::join`]). Returns the token
    /// after the call and whether it had been revoked already (then nothing is written and
    /// the first revocation is kept). Unknown id: [`Error::TokenNotFound`].
    fn revoke_token(&self, id: &str, now_unix: i64, by: &str)
    -> Result<(TokenRecord, bool), Error>;
    /// Atomically (one transaction): the token must exist ([`Error::TokenNotFound`]), not be
    /// revoked ([`Error::TokenRevoked`]), not be expired at `now_unix`
    /// ([`Error::TokenExpired`]), have uses left ([`Error::TokenExhausted`]), and the node
    /// name must suit it ([`check_join_name`]: [`Error::NodeExists`],
    /// [`Error::TokenForOtherNode`]); then `uses += 1`, the node record is inserted (or, with
    /// a replace token, replaced) and the cert record inserted. Returns the updated token. Of
    /// concurrent joins on a single-use token, or under one new name, exactly one wins.
    /// Nothing is written when any check fails.
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
    /// Deletes the node record (durable before it returns); returns it, or `None` if absent.
    fn delete_node(&self, name: &str) -> Result<Option<NodeRecord>, Error>;
    /// Inserts or replaces a cert (key: `serial`).
    fn put_cert(&self, cert: &CertRecord) -> Result<(), Error>;
    /// Newest first (by `issued_unix`, then `serial`, both descending), at most `limit`
    /// (0 = all).
    fn list_certs(&self, limit: usize) -> Result<Vec<CertRecord>, Error>;
    /// Deletes the records of certificates that expired before `before_unix` (durable before
    /// it returns); returns how many went.
    fn prune_certs(&self, before_unix: i64) -> Result<usize, Error>;

    /// The current mesh policy revision (0 before the first change).
    fn policy_revision(&self) -> Result<u64, Error>;
    /// Applies `changes` in one transaction, durable before it returns: every change whose
    /// result differs from the current state is written, the mesh revision is bumped once if
    /// anything changed (every changed record gets that revision), and each changed version is
    /// appended to history (deletions as `deleted` records). A resource named twice is
    /// [`Error::DuplicatePolicyChange`]. With `dry_run` the same outcome is computed and
    /// nothing is written (the revision returned is then the current one). Any error leaves
    /// the store untouched.
    fn apply_policies(
        &self,
        changes: &[PolicyChange],
        author: &str,
        now_unix: i64,
        dry_run: bool,
    ) -> Result<ApplyOutcome, Error>;
    /// The current (non-deleted) resources sorted by kind, namespace, name, and the revision
    /// they were read at (a consistent view).
    fn list_policies(&self) -> Result<(u64, Vec<PolicyRecord>), Error>;
    /// Every version of one resource, oldest first, deletions included.
    fn policy_history(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<PolicyRecord>, Error>;
    /// The latest version (deletions included) of every resource changed after `revision`,
    /// sorted by kind, namespace, name, with the current revision they are consistent with.
    fn policy_changes_since(&self, revision: u64) -> Result<(u64, Vec<PolicyRecord>), Error>;

    /// The gossip keyring; `None` until one is put (a database made by an older registry).
    fn get_gossip_keyring(&self) -> Result<Option<GossipKeyring>, Error>;
    /// Inserts or replaces the gossip keyring, durable before it returns. The store does not
    /// check revisions: the caller serialises read-modify-write cycles.
    fn put_gossip_keyring(&self, keyring: &GossipKeyring) -> Result<(), Error>;

    /// Keeps `report` as its node's last report and adds `edges` into the per-minute edge
    /// aggregates of the minute starting at `minute_unix` and into each destination's minute
    /// and hour series, all in one transaction. **Not flushed**: nodes report every few
    /// seconds, so the registry calls [`Store::flush`] on a timer and at shutdown instead of
    /// paying an fsync per report; a crash loses at most the reports since the last flush.
    fn record_report(
        &self,
        report: &NodeReportRecord,
        minute_unix: u64,
        edges: &[(EdgeKey, Traffic)],
    ) -> Result<(), Error>;
    /// The last report of every node, sorted by node name.
    fn node_reports(&self) -> Result<Vec<NodeReportRecord>, Error>;
    /// Every edge minute starting at or after `from_unix`, sorted by minute, then edge.
    fn edge_minutes(&self, from_unix: u64) -> Result<Vec<EdgeMinute>, Error>;
    /// The `step` series of `destination` from the slot starting at or after `from_unix`,
    /// sorted by slot, then protocol.
    fn service_slots(
        &self,
        destination: &str,
        step: Step,
        from_unix: u64,
    ) -> Result<Vec<ServiceSlot>, Error>;
    /// Deletes edge minutes and hour slots that start before `before_unix`, and minute slots
    /// that start before `minutes_before_unix`; returns how many records went. Not flushed.
    fn prune_traffic(&self, before_unix: u64, minutes_before_unix: u64) -> Result<usize, Error>;
    /// Makes every write so far durable (sled: fsync).
    fn flush(&self) -> Result<(), Error>;

    /// Every firing SLO alert, sorted by SLO.
    fn slo_alerts(&self) -> Result<Vec<SloAlertRecord>, Error>;
    /// Inserts or replaces an SLO's alert (key: `slo`), durable before it returns.
    fn put_slo_alert(&self, alert: &SloAlertRecord) -> Result<(), Error>;
    /// Deletes an SLO's alert (absent is fine), durable before it returns.
    fn delete_slo_alert(&self, slo: &str) -> Result<(), Error>;
}

// === impl GossipKeyring ===

impl std::fmt::Debug for GossipKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self
            .keys
            .iter()
            .map(|k| match KeyMaterial::from_base64(k) {
                Ok(key) => key.id().to_string(),
                Err(_) => "<invalid>".to_owned(),
            })
            .collect();
        f.debug_struct("GossipKeyring")
            .field("revision", &self.revision)
            .field("key_ids", &ids)
            .finish()
    }
}

// === impl Protocol ===

impl Protocol {
    /// The wire name: `http` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Tcp => "tcp",
        }
    }

    /// The protocol a wire name means, if any.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http" => Some(Self::Http),
            "tcp" => Some(Self::Tcp),
            _ => None,
        }
    }
}

// === impl Traffic ===

impl Traffic {
    /// Adds `other` into `self`, bucket by bucket.
    pub fn add(&mut self, other: &Traffic) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.bytes = self.bytes.saturating_add(other.bytes);
        if self.latency_buckets.len() < other.latency_buckets.len() {
            self.latency_buckets.resize(other.latency_buckets.len(), 0);
        }
        for (a, b) in self.latency_buckets.iter_mut().zip(&other.latency_buckets) {
            *a = a.saturating_add(*b);
        }
    }
}

// === impl Step ===

impl Step {
    /// Length of a slot, seconds.
    pub fn secs(self) -> u64 {
        match self {
            Self::Minute => 60,
            Self::Hour => 3_600,
        }
    }

    /// Start of the slot `unix` falls in.
    pub fn slot(self, unix: u64) -> u64 {
        unix - unix % self.secs()
    }
}

/// The rollup rule both stores share: a report's edges summed per destination and protocol
/// (all callers, with and without mTLS), the shape of the service series.
fn service_rollup(edges: &[(EdgeKey, Traffic)]) -> BTreeMap<(&str, Protocol), Traffic> {
    let mut out: BTreeMap<(&str, Protocol), Traffic> = BTreeMap::new();
    for (edge, traffic) in edges {
        out.entry((edge.destination.as_str(), edge.protocol))
            .or_default()
            .add(traffic);
    }
    out
}

/// A planned apply: the outcome for the caller and the records to write.
struct PolicyPlan {
    revision: u64,
    outcomes: Vec<(ChangeAction, Option<String>)>,
    writes: Vec<PolicyRecord>,
}

/// The apply rules both stores share. `current` looks up the latest stored version of a
/// resource (a deletion marker counts as absent); nothing is written here.
fn plan_policies(
    changes: &[PolicyChange],
    author: &str,
    now_unix: i64,
    revision: u64,
    mut current: impl FnMut(&PolicyChange) -> Result<Option<PolicyRecord>, Error>,
) -> Result<PolicyPlan, Error> {
    let mut seen = std::collections::HashSet::new();
    for c in changes {
        if !seen.insert((&c.kind, &c.namespace, &c.name)) {
            return Err(Error::DuplicatePolicyChange {
                kind: c.kind.clone(),
                namespace: c.namespace.clone(),
                name: c.name.clone(),
            });
        }
    }
    let next = revision + 1;
    let mut outcomes = Vec::with_capacity(changes.len());
    let mut writes = Vec::new();
    for c in changes {
        let previous = current(c)?.filter(|r| !r.deleted).map(|r| r.spec_json);
        let action = match (&previous, &c.spec_json) {
            (None, Some(_)) => ChangeAction::Created,
            (Some(old), Some(new)) if old == new => ChangeAction::Unchanged,
            (Some(_), Some(_)) => ChangeAction::Updated,
            (Some(_), None) => ChangeAction::Deleted,
            (None, None) => ChangeAction::NotFound,
        };
        if matches!(
            action,
            ChangeAction::Created | ChangeAction::Updated | ChangeAction::Deleted
        ) {
            writes.push(PolicyRecord {
                kind: c.kind.clone(),
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                spec_json: c.spec_json.clone().unwrap_or_default(),
                revision: next,
                author: author.to_owned(),
                updated_unix: now_unix,
                deleted: c.spec_json.is_none(),
            });
        }
        outcomes.push((action, previous));
    }
    Ok(PolicyPlan {
        revision: if writes.is_empty() { revision } else { next },
        outcomes,
        writes,
    })
}

/// The naming rule of a join, shared by both stores and the API's early check: a token
/// created to replace a node joins only under that name (registered or not); any other token
/// joins only under a name not registered yet (`registered`), so it cannot take over a node's
/// record.
pub fn check_join_name(token: &TokenRecord, name: &str, registered: bool) -> Result<(), Error> {
    match &token.replace_node {
        Some(replace) if replace != name => Err(Error::TokenForOtherNode {
            replace_node: replace.clone(),
            name: name.to_owned(),
        }),
        Some(_) => Ok(()),
        None if registered => Err(Error::NodeExists {
            name: name.to_owned(),
        }),
        None => Ok(()),
    }
}

/// The join rules both stores share: checks `token` at `now_unix` for a join as `name`
/// (`registered`: a node of that name exists) and returns it with one more use, or the reason
/// it cannot be used.
fn consume_token(
    token: &TokenRecord,
    now_unix: i64,
    name: &str,
    registered: bool,
) -> Result<TokenRecord, Error> {
    if let Some(revoked_unix) = token.revoked_unix {
        return Err(Error::TokenRevoked { revoked_unix });
    }
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
    check_join_name(token, name, registered)?;
    let mut used = token.clone();
    used.uses = used.uses.saturating_add(1);
    Ok(used)
}

/// The revocation rule both stores share: `token` revoked at `now_unix` by `by`, or `None`
/// if it already was (the first revocation stands).
fn revoked(token: &TokenRecord, now_unix: i64, by: &str) -> Option<TokenRecord> {
    if token.revoked_unix.is_some() {
        return None;
    }
    Some(TokenRecord {
        revoked_unix: Some(now_unix),
        revoked_by: by.to_owned(),
        ..token.clone()
    })
}

/// Sorts certs newest first and applies `limit` (0 = all), as [`Store::list_certs`] promises.
fn newest_certs(mut certs: Vec<CertRecord>, limit: usize) -> Vec<CertRecord> {
    certs.sort_by(|a, b| (b.issued_unix, &b.serial).cmp(&(a.issued_unix, &a.serial)));
    if limit != 0 {
        certs.truncate(limit);
    }
    certs
}
