//! [`KvStore`]: the registry's consistent state written once over a revisioned key-value
//! space ([`crate::kv::Kv`]: memory, sled, etcd), every read-modify-write a compare-and-set
//! loop, so several registries on one etcd can serve at once. Telemetry (node reports, traffic)
//! is not consistent state and does not belong in etcd: it goes to a local store each replica
//! keeps (`telemetry`), which is where [`Store::record_report`] and its readers and
//! [`Store::flush`] go.
//!
//! A bridge for now: [`Store`] is synchronous and called from blocking threads, so each method
//! runs its async body on `runtime` (`Handle::block_on`; never call it from an async worker).
//!
//! Keys: `tokens/<id>`, `nodes/<name>`, `certs/<serial>`, `policy/rev` (the mesh policy
//! revision, the guard of every apply), `policy/r/<kind>\0<ns>\0<name>` (latest version,
//! deletions kept), `policy/h/<kind>\0<ns>\0<name>\0<big-endian revision>` (every version),
//! `keyring`, `slo_alerts/<slo>`. Values are JSON, as in sled.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::runtime::Handle;

use super::{
    ApplyOutcome, CertRecord, EdgeKey, EdgeMinute, Error, GossipKeyring, NodeRecord,
    NodeReportRecord, PolicyChange, PolicyRecord, ServiceSlot, SloAlertRecord, Step, Store,
    TokenRecord, Traffic, consume_token, newest_certs, plan_policies, revoked,
};
use crate::kv::{self, Compare, Entry, Kv, Op, Txn};

const TOKENS: &str = "tokens/";
const NODES: &str = "nodes/";
const CERTS: &str = "certs/";
const POLICY_REV: &[u8] = b"policy/rev";
const POLICIES: &str = "policy/r/";
const HISTORY: &str = "policy/h/";
const KEYRING: &[u8] = b"keyring";
const SLO_ALERTS: &str = "slo_alerts/";

/// Consistent state on a [`Kv`], telemetry on a local store.
pub struct KvStore {
    kv: Arc<dyn Kv>,
    telemetry: Arc<dyn Store>,
    runtime: Handle,
}

fn key(prefix: &str, id: &str) -> Vec<u8> {
    [prefix.as_bytes(), id.as_bytes()].concat()
}

fn policy_key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}\0{namespace}\0{name}")
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records of strings, integers and lists always serialize")
}

fn decode<T: DeserializeOwned>(what: &'static str, key: &[u8], raw: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(raw).map_err(|source| Error::Corrupt {
        tree: what,
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn backend(op: &'static str) -> impl FnOnce(kv::Error) -> Error {
    move |source| Error::Kv { op, source }
}

impl KvStore {
    /// Consistent state on `kv`, telemetry on `telemetry` (its other records are not used),
    /// async work on `runtime`.
    pub fn new(kv: Arc<dyn Kv>, telemetry: Arc<dyn Store>, runtime: Handle) -> Self {
        Self {
            kv,
            telemetry,
            runtime,
        }
    }

    fn run<T>(&self, f: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        self.runtime.block_on(f)
    }

    async fn get<T: DeserializeOwned>(
        &self,
        what: &'static str,
        key: &[u8],
    ) -> Result<Option<(T, Entry)>, Error> {
        let Some(entry) = self.kv.get(key).await.map_err(backend("read"))? else {
            return Ok(None);
        };
        Ok(Some((decode(what, key, &entry.value)?, entry)))
    }

    async fn list<T: DeserializeOwned>(
        &self,
        what: &'static str,
        prefix: &str,
    ) -> Result<(u64, Vec<T>), Error> {
        let snapshot = self
            .kv
            .range(prefix.as_bytes())
            .await
            .map_err(backend("list"))?;
        let values = snapshot
            .entries
            .iter()
            .map(|(k, e)| decode(what, k, &e.value))
            .collect::<Result<_, _>>()?;
        Ok((snapshot.revision, values))
    }

    async fn txn(&self, op: &'static str, txn: Txn) -> Result<bool, Error> {
        Ok(self.kv.txn(txn).await.map_err(backend(op))?.is_some())
    }

    async fn put(&self, op: &'static str, key: Vec<u8>, value: Vec<u8>) -> Result<(), Error> {
        self.txn(
            op,
            Txn {
                compares: Vec::new(),
                ops: vec![Op::Put(key, value)],
            },
        )
        .await
        .map(drop)
    }

    /// `key`'s guard: it still holds what was read (or is still absent).
    fn unchanged(key: Vec<u8>, read: Option<&Entry>) -> Compare {
        match read {
            Some(entry) => Compare::ModRevision(key, entry.mod_revision),
            None => Compare::Absent(key),
        }
    }

    async fn join_async(
        &self,
        token_id: &str,
        now_unix: i64,
        node: &NodeRecord,
        cert: &CertRecord,
    ) -> Result<TokenRecord, Error> {
        let (token_key, node_key) = (key(TOKENS, token_id), key(NODES, &node.name));
        loop {
            let Some((token, token_entry)) = self.get::<TokenRecord>(TOKENS, &token_key).await?
            else {
                return Err(Error::TokenNotFound);
            };
            let registered = self.kv.get(&node_key).await.map_err(backend("read"))?;
            let used = consume_token(&token, now_unix, &node.name, registered.is_some())?;
            let txn = Txn {
                // Of concurrent joins on one token, or under one new name, one commits; the
                // others read again and decide again.
                compares: vec![
                    Compare::ModRevision(token_key.clone(), token_entry.mod_revision),
                    Self::unchanged(node_key.clone(), registered.as_ref()),
                ],
                ops: vec![
                    Op::Put(token_key.clone(), encode(&used)),
                    Op::Put(node_key.clone(), encode(node)),
                    Op::Put(key(CERTS, &cert.serial), encode(cert)),
                ],
            };
            if self.txn("join", txn).await? {
                return Ok(used);
            }
        }
    }

    async fn revoke_token_async(
        &self,
        id: &str,
        now_unix: i64,
        by: &str,
    ) -> Result<(TokenRecord, bool), Error> {
        let token_key = key(TOKENS, id);
        loop {
            let Some((token, entry)) = self.get::<TokenRecord>(TOKENS, &token_key).await? else {
                return Err(Error::TokenNotFound);
            };
            let Some(next) = revoked(&token, now_unix, by) else {
                return Ok((token, true));
            };
            let txn = Txn {
                compares: vec![Compare::ModRevision(token_key.clone(), entry.mod_revision)],
                ops: vec![Op::Put(token_key.clone(), encode(&next))],
            };
            if self.txn("revoke token", txn).await? {
                return Ok((next, false));
            }
        }
    }

    async fn apply_policies_async(
        &self,
        changes: &[PolicyChange],
        author: &str,
        now_unix: i64,
        dry_run: bool,
    ) -> Result<ApplyOutcome, Error> {
        loop {
            let rev = self.get::<u64>("policy revision", POLICY_REV).await?;
            let revision = rev.as_ref().map_or(0, |(r, _)| *r);
            let mut current = Vec::with_capacity(changes.len());
            for c in changes {
                let k = key(POLICIES, &policy_key(&c.kind, &c.namespace, &c.name));
                current.push(
                    self.get::<PolicyRecord>(POLICIES, &k)
                        .await?
                        .map(|(r, _)| r),
                );
            }
            let mut lookups = current.into_iter();
            let plan = plan_policies(changes, author, now_unix, revision, |_| {
                Ok(lookups.next().flatten())
            })?;
            // A dry run reports the revision it read, as nothing was written.
            if dry_run {
                return Ok((revision, plan.outcomes));
            }
            if plan.writes.is_empty() {
                return Ok((plan.revision, plan.outcomes));
            }
            let mut ops = vec![Op::Put(POLICY_REV.to_vec(), encode(&plan.revision))];
            for record in &plan.writes {
                let id = policy_key(&record.kind, &record.namespace, &record.name);
                ops.push(Op::Put(key(POLICIES, &id), encode(record)));
                let mut history = key(HISTORY, &id);
                history.push(0);
                history.extend_from_slice(&record.revision.to_be_bytes());
                ops.push(Op::Put(history, encode(record)));
            }
            // Every apply is guarded by the revision it planned from: another replica's apply
            // in between makes this one plan again from what that one wrote.
            let txn = Txn {
                compares: vec![Self::unchanged(
                    POLICY_REV.to_vec(),
                    rev.as_ref().map(|(_, e)| e),
                )],
                ops,
            };
            if self.txn("apply policies", txn).await? {
                return Ok((plan.revision, plan.outcomes));
            }
        }
    }

    /// Latest versions (deletions included) and the policy revision they are at: the highest
    /// revision among them (every apply that bumps it writes at least one).
    async fn latest_policies(&self) -> Result<(u64, Vec<PolicyRecord>), Error> {
        let (_, records) = self.list::<PolicyRecord>(POLICIES, POLICIES).await?;
        let revision = records.iter().map(|r| r.revision).max().unwrap_or(0);
        Ok((revision, records))
    }

    async fn prune_certs_async(&self, before_unix: i64) -> Result<usize, Error> {
        let (_, certs) = self.list::<CertRecord>(CERTS, CERTS).await?;
        let expired: Vec<Op> = certs
            .iter()
            .filter(|c| c.not_after_unix < before_unix)
            .map(|c| Op::Delete(key(CERTS, &c.serial)))
            .collect();
        let count = expired.len();
        for chunk in expired.chunks(kv::MAX_TXN_OPS) {
            self.txn(
                "prune certificates",
                Txn {
                    compares: Vec::new(),
                    ops: chunk.to_vec(),
                },
            )
            .await?;
        }
        Ok(count)
    }
}

impl Store for KvStore {
    fn put_token(&self, token: &TokenRecord) -> Result<(), Error> {
        self.run(self.put("write token", key(TOKENS, &token.id), encode(token)))
    }

    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, Error> {
        self.run(async { Ok(self.get(TOKENS, &key(TOKENS, id)).await?.map(|(t, _)| t)) })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, Error> {
        self.run(async { Ok(self.list(TOKENS, TOKENS).await?.1) })
    }

    fn revoke_token(
        &self,
        id: &str,
        now_unix: i64,
        by: &str,
    ) -> Result<(TokenRecord, bool), Error> {
        self.run(self.revoke_token_async(id, now_unix, by))
    }

    fn join(
        &self,
        token_id: &str,
        now_unix: i64,
        node: &NodeRecord,
        cert: &CertRecord,
    ) -> Result<TokenRecord, Error> {
        self.run(self.join_async(token_id, now_unix, node, cert))
    }

    fn put_node(&self, node: &NodeRecord) -> Result<(), Error> {
        self.run(self.put("write node", key(NODES, &node.name), encode(node)))
    }

    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, Error> {
        self.run(async { Ok(self.get(NODES, &key(NODES, name)).await?.map(|(n, _)| n)) })
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, Error> {
        self.run(async { Ok(self.list(NODES, NODES).await?.1) })
    }

    fn delete_node(&self, name: &str) -> Result<Option<NodeRecord>, Error> {
        let node_key = key(NODES, name);
        self.run(async {
            loop {
                let Some((node, entry)) = self.get::<NodeRecord>(NODES, &node_key).await? else {
                    return Ok(None);
                };
                let txn = Txn {
                    compares: vec![Compare::ModRevision(node_key.clone(), entry.mod_revision)],
                    ops: vec![Op::Delete(node_key.clone())],
                };
                if self.txn("delete node", txn).await? {
                    return Ok(Some(node));
                }
            }
        })
    }

    fn put_cert(&self, cert: &CertRecord) -> Result<(), Error> {
        self.run(self.put("write certificate", key(CERTS, &cert.serial), encode(cert)))
    }

    fn list_certs(&self, limit: usize) -> Result<Vec<CertRecord>, Error> {
        self.run(async { Ok(newest_certs(self.list(CERTS, CERTS).await?.1, limit)) })
    }

    fn prune_certs(&self, before_unix: i64) -> Result<usize, Error> {
        self.run(self.prune_certs_async(before_unix))
    }

    fn policy_revision(&self) -> Result<u64, Error> {
        self.run(async {
            let rev = self.get::<u64>("policy revision", POLICY_REV).await?;
            Ok(rev.map_or(0, |(r, _)| r))
        })
    }

    fn apply_policies(
        &self,
        changes: &[PolicyChange],
        author: &str,
        now_unix: i64,
        dry_run: bool,
    ) -> Result<ApplyOutcome, Error> {
        self.run(self.apply_policies_async(changes, author, now_unix, dry_run))
    }

    fn list_policies(&self) -> Result<(u64, Vec<PolicyRecord>), Error> {
        self.run(async {
            let (revision, records) = self.latest_policies().await?;
            Ok((
                revision,
                records.into_iter().filter(|r| !r.deleted).collect(),
            ))
        })
    }

    fn policy_history(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<PolicyRecord>, Error> {
        let mut prefix = String::from(HISTORY);
        prefix.push_str(&policy_key(kind, namespace, name));
        prefix.push('\0');
        // Big-endian revisions after the prefix: the range comes back oldest first.
        self.run(async { Ok(self.list(HISTORY, &prefix).await?.1) })
    }

    fn policy_changes_since(&self, revision: u64) -> Result<(u64, Vec<PolicyRecord>), Error> {
        self.run(async {
            let (current, records) = self.latest_policies().await?;
            let changed = records.into_iter().filter(|r| r.revision > revision);
            Ok((current, changed.collect()))
        })
    }

    fn get_gossip_keyring(&self) -> Result<Option<GossipKeyring>, Error> {
        self.run(async { Ok(self.get("keyring", KEYRING).await?.map(|(k, _)| k)) })
    }

    fn put_gossip_keyring(&self, keyring: &GossipKeyring) -> Result<(), Error> {
        self.run(self.put("write keyring", KEYRING.to_vec(), encode(keyring)))
    }

    fn record_report(
        &self,
        report: &NodeReportRecord,
        minute_unix: u64,
        edges: &[(EdgeKey, Traffic)],
    ) -> Result<(), Error> {
        self.telemetry.record_report(report, minute_unix, edges)
    }

    fn node_reports(&self) -> Result<Vec<NodeReportRecord>, Error> {
        self.telemetry.node_reports()
    }

    fn edge_minutes(&self, from_unix: u64) -> Result<Vec<EdgeMinute>, Error> {
        self.telemetry.edge_minutes(from_unix)
    }

    fn service_slots(
        &self,
        destination: &str,
        step: Step,
        from_unix: u64,
    ) -> Result<Vec<ServiceSlot>, Error> {
        self.telemetry.service_slots(destination, step, from_unix)
    }

    fn prune_traffic(&self, before_unix: u64, minutes_before_unix: u64) -> Result<usize, Error> {
        self.telemetry
            .prune_traffic(before_unix, minutes_before_unix)
    }

    fn flush(&self) -> Result<(), Error> {
        self.telemetry.flush()
    }

    fn slo_alerts(&self) -> Result<Vec<SloAlertRecord>, Error> {
        self.run(async { Ok(self.list(SLO_ALERTS, SLO_ALERTS).await?.1) })
    }

    fn put_slo_alert(&self, alert: &SloAlertRecord) -> Result<(), Error> {
        self.run(self.put(
            "write SLO alert",
            key(SLO_ALERTS, &alert.slo),
            encode(alert),
        ))
    }

    fn delete_slo_alert(&self, slo: &str) -> Result<(), Error> {
        let txn = Txn {
            compares: Vec::new(),
            ops: vec![Op::Delete(key(SLO_ALERTS, slo))],
        };
        self.run(async { self.txn("delete SLO alert", txn).await.map(drop) })
    }
}
