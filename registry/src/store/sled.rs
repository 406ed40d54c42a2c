//! [`SledStore`]: the production [`Store`] on sled 0.34 — one tree per record kind (`tokens`,
//! `nodes`, `certs`) plus `meta` for the schema version, and three policy trees: `policies`
//! (latest version of every resource, deletions kept as markers so watchers can catch up),
//! `policy_history` (every version, keyed by resource then big-endian revision) and
//! `policy_meta` (the mesh revision), `gossip_keys` (one record: the gossip keyring), and the
//! observability trees: `node_reports` (last report per node), `edge_minutes` (keyed by minute,
//! then edge), `service_slots` (keyed by destination, step, slot, protocol) and `slo_alerts`.
//! Values are JSON; every write is flushed (fsync) before it is acknowledged, except node
//! reports and traffic, which the registry flushes on a timer (see [`Store::record_report`]).

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use ::sled::Transactional;
use ::sled::transaction::{ConflictableTransactionError, TransactionError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    ApplyOutcome, CertRecord, EdgeKey, EdgeMinute, Error, GossipKeyring, NodeRecord,
    NodeReportRecord, PolicyChange, PolicyRecord, Protocol, SCHEMA_VERSION, ServiceSlot,
    SloAlertRecord, Step, Store, TokenRecord, Traffic, consume_token, newest_certs, plan_policies,
    revoked, service_rollup,
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
const NODE_REPORTS: &str = "node_reports";
const EDGE_MINUTES: &str = "edge_minutes";
const SERVICE_SLOTS: &str = "service_slots";
const SLO_ALERTS: &str = "slo_alerts";

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
    node_reports: ::sled::Tree,
    edge_minutes: ::sled::Tree,
    service_slots: ::sled::Tree,
    slo_alerts: ::sled::Tree,
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
            node_reports: tree(NODE_REPORTS)?,
            edge_minutes: tree(EDGE_MINUTES)?,
            service_slots: tree(SERVICE_SLOTS)?,
            slo_alerts: tree(SLO_ALERTS)?,
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
            &self.node_reports,
            &self.edge_minutes,
            &self.service_slots,
            &self.slo_alerts,
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
        Store::flush(self)
    }

    fn put<T: Serialize>(
        &self,
        tree: &::sled::Tree,
        op: &'static str,
        key: &str,
        value: &T,
    ) -> Result<(), Error> {
        tree.insert(key, encode(value)).map_err(sled_err(op))?;
        Store::flush(self)
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

/// Key of an edge minute: the big-endian minute, then `source \0 destination \0 mtls protocol`,
/// and `\0 site` for an edge to another site (keys written before sites stay the same), so keys
/// sort like [`EdgeMinute`]s (minute, then edge) and a range scan starts at a minute.
fn edge_minute_key(minute_unix: u64, edge: &EdgeKey) -> Vec<u8> {
    let mut key = minute_unix.to_be_bytes().to_vec();
    key.extend_from_slice(edge.source.as_bytes());
    key.push(0);
    key.extend_from_slice(edge.destination.as_bytes());
    key.push(0);
    key.push(u8::from(edge.mtls));
    key.push(protocol_byte(edge.protocol));
    if !edge.destination_site.is_empty() {
        key.push(0);
        key.extend_from_slice(edge.destination_site.as_bytes());
    }
    key
}

/// Prefix of a destination's series of one step: `destination \0 step`. Names never contain
/// NUL (the report check accepts only labels), so one destination's prefix is never another's.
fn service_prefix(destination: &str, step: Step) -> Vec<u8> {
    let mut key = destination.as_bytes().to_vec();
    key.push(0);
    key.push(match step {
        Step::Minute => b'm',
        Step::Hour => b'h',
    });
    key
}

/// Key of a service slot: the prefix, the big-endian slot start, the protocol.
fn service_slot_key(destination: &str, step: Step, start_unix: u64, protocol: Protocol) -> Vec<u8> {
    let mut key = service_prefix(destination, step);
    key.extend_from_slice(&start_unix.to_be_bytes());
    key.push(protocol_byte(protocol));
    key
}

/// The step and slot start of a service slot key (see [`service_slot_key`]): read from its
/// end, since the destination before them varies in length.
fn slot_of_key(key: &[u8]) -> Option<(Step, u64)> {
    let (_protocol, rest) = key.split_last()?;
    let (rest, start) = rest.split_at_checked(rest.len().checked_sub(8)?)?;
    let step = match rest.last()? {
        b'm' => Step::Minute,
        b'h' => Step::Hour,
        _ => return None,
    };
    Some((step, u64::from_be_bytes(start.try_into().ok()?)))
}

/// Sorts like [`Protocol`]'s `Ord`.
fn protocol_byte(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Http => b'h',
        Protocol::Tcp => b't',
    }
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

    fn revoke_token(
        &self,
        id: &str,
        now_unix: i64,
        by: &str,
    ) -> Result<(TokenRecord, bool), Error> {
        // A transaction, so a join committing at the same moment either used the token before
        // the revocation (and its use is kept) or sees it revoked.
        let result = self.tokens.transaction(
            |tokens| -> Result<(TokenRecord, bool), ConflictableTransactionError<Error>> {
                let Some(raw) = tokens.get(id)? else {
                    return Err(ConflictableTransactionError::Abort(Error::TokenNotFound));
                };
                let token: TokenRecord = decode(TOKENS, id.as_bytes(), &raw)
                    .map_err(ConflictableTransactionError::Abort)?;
                match revoked(&token, now_unix, by) {
                    Some(token) => {
                        tokens.insert(id.as_bytes(), encode(&token))?;
                        Ok((token, false))
                    }
                    None => Ok((token, true)),
                }
            },
        );
        let (token, already) = result.map_err(|err| match err {
            TransactionError::Abort(err) => err,
            TransactionError::Storage(source) => Error::Sled {
                op: "revoke token transaction",
                source,
            },
        })?;
        if !already {
            Store::flush(self)?;
        }
        Ok((token, already))
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
                // Read in the transaction: two joins under one new name cannot both see it free.
                let registered = nodes.get(node.name.as_bytes())?.is_some();
                let used = decode(TOKENS, token_id.as_bytes(), &raw)
                    .and_then(|token: TokenRecord| {
                        consume_token(&token, now_unix, &node.name, registered)
                    })
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
        Store::flush(self)?;
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

    fn delete_node(&self, name: &str) -> Result<Option<NodeRecord>, Error> {
        let Some(node) = get(&self.nodes, NODES, name)? else {
            return Ok(None);
        };
        self.nodes.remove(name).map_err(sled_err("delete node"))?;
        Store::flush(self)?;
        Ok(Some(node))
    }

    fn put_cert(&self, cert: &CertRecord) -> Result<(), Error> {
        self.put(&self.certs, "write cert", &cert.serial, cert)
    }

    fn prune_certs(&self, before_unix: i64) -> Result<usize, Error> {
        let expired: Vec<CertRecord> = list::<CertRecord>(&self.certs, CERTS)?
            .into_iter()
            .filter(|c| c.not_after_unix < before_unix)
            .collect();
        for c in &expired {
            self.certs
                .remove(c.serial.as_str())
                .map_err(sled_err("delete cert"))?;
        }
        if !expired.is_empty() {
            Store::flush(self)?;
        }
        Ok(expired.len())
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
        Store::flush(self)?;
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

    fn record_report(
        &self,
        report: &NodeReportRecord,
        minute_unix: u64,
        edges: &[(EdgeKey, Traffic)],
    ) -> Result<(), Error> {
        let report_json = encode(report);
        let mut slots = Vec::new();
        for ((destination, protocol), traffic) in service_rollup(edges) {
            for step in [Step::Minute, Step::Hour] {
                let start_unix = step.slot(minute_unix);
                let key = service_slot_key(destination, step, start_unix, protocol);
                slots.push((key, start_unix, protocol, traffic.clone()));
            }
        }
        // One transaction: reports from several nodes add into the same records, and sled
        // serialises transactions, so no addition is lost to a concurrent read-modify-write.
        let result = (&self.node_reports, &self.edge_minutes, &self.service_slots).transaction(
            |(reports, minutes, services)| {
                reports.insert(report.node.as_bytes(), report_json.as_slice())?;
                for (edge, traffic) in edges {
                    let key = edge_minute_key(minute_unix, edge);
                    let mut record = match minutes.get(&key)? {
                        Some(raw) => decode::<EdgeMinute>(EDGE_MINUTES, &key, &raw)
                            .map_err(ConflictableTransactionError::Abort)?,
                        None => EdgeMinute {
                            minute_unix,
                            edge: edge.clone(),
                            traffic: Traffic::default(),
                        },
                    };
                    record.traffic.add(traffic);
                    minutes.insert(key, encode(&record))?;
                }
                for (key, start_unix, protocol, traffic) in &slots {
                    let mut record = match services.get(key)? {
                        Some(raw) => decode::<ServiceSlot>(SERVICE_SLOTS, key, &raw)
                            .map_err(ConflictableTransactionError::Abort)?,
                        None => ServiceSlot {
                            start_unix: *start_unix,
                            protocol: *protocol,
                            traffic: Traffic::default(),
                        },
                    };
                    record.traffic.add(traffic);
                    services.insert(key.as_slice(), encode(&record))?;
                }
                Ok::<_, ConflictableTransactionError<Error>>(())
            },
        );
        result.map_err(|err| match err {
            TransactionError::Abort(err) => err,
            TransactionError::Storage(source) => Error::Sled {
                op: "node report transaction",
                source,
            },
        })
    }

    fn node_reports(&self) -> Result<Vec<NodeReportRecord>, Error> {
        list(&self.node_reports, NODE_REPORTS)
    }

    fn edge_minutes(&self, from_unix: u64) -> Result<Vec<EdgeMinute>, Error> {
        self.edge_minutes
            .range(from_unix.to_be_bytes()..)
            .map(|entry| {
                let (key, raw) = entry.map_err(sled_err("scan"))?;
                decode(EDGE_MINUTES, &key, &raw)
            })
            .collect()
    }

    fn service_slots(
        &self,
        destination: &str,
        step: Step,
        from_unix: u64,
    ) -> Result<Vec<ServiceSlot>, Error> {
        let prefix = service_prefix(destination, step);
        let mut start = prefix.clone();
        start.extend_from_slice(&from_unix.to_be_bytes());
        self.service_slots
            .range(start..)
            .take_while(|entry| entry.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
            .map(|entry| {
                let (key, raw) = entry.map_err(sled_err("scan"))?;
                decode(SERVICE_SLOTS, &key, &raw)
            })
            .collect()
    }

    fn prune_traffic(&self, before_unix: u64, minutes_before_unix: u64) -> Result<usize, Error> {
        let mut removed = 0;
        for entry in self.edge_minutes.range(..before_unix.to_be_bytes()) {
            let (key, _) = entry.map_err(sled_err("scan"))?;
            self.edge_minutes
                .remove(key)
                .map_err(sled_err("prune traffic"))?;
            removed += 1;
        }
        // Keyed by destination first, so every series is visited; there is one per called
        // service and protocol, and this runs rarely.
        for entry in self.service_slots.iter() {
            let (key, raw) = entry.map_err(sled_err("scan"))?;
            // The key says step and start, so values need no decoding; a key that does not
            // parse is decoded to report it as corrupt.
            let (step, start_unix) = match slot_of_key(&key) {
                Some(parsed) => parsed,
                None => {
                    let slot: ServiceSlot = decode(SERVICE_SLOTS, &key, &raw)?;
                    (Step::Minute, slot.start_unix)
                }
            };
            let cutoff = match step {
                Step::Hour => before_unix,
                Step::Minute => minutes_before_unix,
            };
            if start_unix < cutoff {
                self.service_slots
                    .remove(key)
                    .map_err(sled_err("prune traffic"))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn flush(&self) -> Result<(), Error> {
        self.db.flush().map_err(sled_err("flush"))?;
        Ok(())
    }

    fn slo_alerts(&self) -> Result<Vec<SloAlertRecord>, Error> {
        list(&self.slo_alerts, SLO_ALERTS)
    }

    fn put_slo_alert(&self, alert: &SloAlertRecord) -> Result<(), Error> {
        self.put(&self.slo_alerts, "write slo alert", &alert.slo, alert)
    }

    fn delete_slo_alert(&self, slo: &str) -> Result<(), Error> {
        self.slo_alerts
            .remove(slo)
            .map_err(sled_err("delete slo alert"))?;
        Store::flush(self)
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
