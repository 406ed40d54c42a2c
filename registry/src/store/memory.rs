//! [`MemoryStore`]: the [`Store`] contract held in memory behind one mutex, for unit tests of
//! the layers above the store. Nothing survives a restart.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{
    ApplyOutcome, CertRecord, EdgeKey, EdgeMinute, Error, GossipKeyring, NodeRecord,
    NodeReportRecord, PolicyChange, PolicyRecord, Protocol, ServiceSlot, SloAlertRecord, Step,
    Store, TokenRecord, Traffic, consume_token, newest_certs, plan_policies, revoked,
    service_rollup,
};

/// A policy resource's key: kind, namespace, name (sorts like the sled keys).
type PolicyKey = (String, String, String);

/// An in-memory [`Store`] with the same semantics as [`super::SledStore`], minus durability.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// Tests of the layers above: policy applies fail as a disk would.
    #[cfg(test)]
    fail_policy_writes: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    tokens: BTreeMap<String, TokenRecord>,
    nodes: BTreeMap<String, NodeRecord>,
    certs: BTreeMap<String, CertRecord>,
    policy_revision: u64,
    /// Latest version of every resource, deletion markers included.
    policies: BTreeMap<PolicyKey, PolicyRecord>,
    /// Every version of every resource, oldest first.
    policy_history: BTreeMap<PolicyKey, Vec<PolicyRecord>>,
    gossip_keyring: Option<GossipKeyring>,
    node_reports: BTreeMap<String, NodeReportRecord>,
    /// Edge minutes by (minute, edge), the order of the sled keys.
    edge_minutes: BTreeMap<(u64, EdgeKey), Traffic>,
    /// Service series by (destination, step, slot start, protocol).
    service_slots: BTreeMap<(String, Step, u64, Protocol), Traffic>,
    slo_alerts: BTreeMap<String, SloAlertRecord>,
}

fn key_of(kind: &str, namespace: &str, name: &str) -> PolicyKey {
    (kind.to_owned(), namespace.to_owned(), name.to_owned())
}

// === impl MemoryStore ===

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every operation checks before it mutates, so the state is consistent even if a
    /// holder panicked; recover from poisoning rather than fail every later call.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From now on (`on`) every applied (not dry-run) policy change fails with an I/O error.
    #[cfg(test)]
    pub(crate) fn fail_policy_writes(&self, on: bool) {
        self.fail_policy_writes
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Store for MemoryStore {
    fn put_token(&self, token: &TokenRecord) -> Result<(), Error> {
        self.state().tokens.insert(token.id.clone(), token.clone());
        Ok(())
    }

    fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, Error> {
        Ok(self.state().tokens.get(id).cloned())
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, Error> {
        Ok(self.state().tokens.values().cloned().collect())
    }

    fn revoke_token(
        &self,
        id: &str,
        now_unix: i64,
        by: &str,
    ) -> Result<(TokenRecord, bool), Error> {
        let mut state = self.state();
        let token = state.tokens.get(id).ok_or(Error::TokenNotFound)?;
        match revoked(token, now_unix, by) {
            Some(token) => {
                state.tokens.insert(id.to_owned(), token.clone());
                Ok((token, false))
            }
            None => Ok((token.clone(), true)),
        }
    }

    fn join(
        &self,
        token_id: &str,
        now_unix: i64,
        node: &NodeRecord,
        cert: &CertRecord,
    ) -> Result<TokenRecord, Error> {
        let mut state = self.state();
        let registered = state.nodes.contains_key(&node.name);
        let token = state.tokens.get(token_id).ok_or(Error::TokenNotFound)?;
        let used = consume_token(token, now_unix, &node.name, registered)?;
        state.tokens.insert(token_id.to_owned(), used.clone());
        state.nodes.insert(node.name.clone(), node.clone());
        state.certs.insert(cert.serial.clone(), cert.clone());
        Ok(used)
    }

    fn put_node(&self, node: &NodeRecord) -> Result<(), Error> {
        self.state().nodes.insert(node.name.clone(), node.clone());
        Ok(())
    }

    fn get_node(&self, name: &str) -> Result<Option<NodeRecord>, Error> {
        Ok(self.state().nodes.get(name).cloned())
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, Error> {
        Ok(self.state().nodes.values().cloned().collect())
    }

    fn delete_node(&self, name: &str) -> Result<Option<NodeRecord>, Error> {
        Ok(self.state().nodes.remove(name))
    }

    fn put_cert(&self, cert: &CertRecord) -> Result<(), Error> {
        self.state().certs.insert(cert.serial.clone(), cert.clone());
        Ok(())
    }

    fn prune_certs(&self, before_unix: i64) -> Result<usize, Error> {
        let mut state = self.state();
        let before = state.certs.len();
        state.certs.retain(|_, c| c.not_after_unix >= before_unix);
        Ok(before - state.certs.len())
    }

    fn list_certs(&self, limit: usize) -> Result<Vec<CertRecord>, Error> {
        let certs = self.state().certs.values().cloned().collect();
        Ok(newest_certs(certs, limit))
    }

    fn policy_revision(&self) -> Result<u64, Error> {
        Ok(self.state().policy_revision)
    }

    fn apply_policies(
        &self,
        changes: &[PolicyChange],
        author: &str,
        now_unix: i64,
        dry_run: bool,
    ) -> Result<ApplyOutcome, Error> {
        #[cfg(test)]
        if !dry_run
            && self
                .fail_policy_writes
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(Error::Sled {
                op: "apply policies",
                source: ::sled::Error::Io(std::io::Error::other("injected by a test")),
            });
        }
        let mut state = self.state();
        let plan = plan_policies(changes, author, now_unix, state.policy_revision, |c| {
            Ok(state
                .policies
                .get(&key_of(&c.kind, &c.namespace, &c.name))
                .cloned())
        })?;
        if dry_run || plan.writes.is_empty() {
            return Ok((state.policy_revision, plan.outcomes));
        }
        for record in plan.writes {
            let key = key_of(&record.kind, &record.namespace, &record.name);
            state
                .policy_history
                .entry(key.clone())
                .or_default()
                .push(record.clone());
            state.policies.insert(key, record);
        }
        state.policy_revision = plan.revision;
        Ok((plan.revision, plan.outcomes))
    }

    fn list_policies(&self) -> Result<(u64, Vec<PolicyRecord>), Error> {
        let state = self.state();
        let records = state.policies.values().filter(|r| !r.deleted).cloned();
        Ok((state.policy_revision, records.collect()))
    }

    fn policy_history(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Vec<PolicyRecord>, Error> {
        let state = self.state();
        let versions = state.policy_history.get(&key_of(kind, namespace, name));
        Ok(versions.cloned().unwrap_or_default())
    }

    fn policy_changes_since(&self, revision: u64) -> Result<(u64, Vec<PolicyRecord>), Error> {
        let state = self.state();
        let records = state.policies.values().filter(|r| r.revision > revision);
        Ok((state.policy_revision, records.cloned().collect()))
    }

    fn get_gossip_keyring(&self) -> Result<Option<GossipKeyring>, Error> {
        Ok(self.state().gossip_keyring.clone())
    }

    fn put_gossip_keyring(&self, keyring: &GossipKeyring) -> Result<(), Error> {
        self.state().gossip_keyring = Some(keyring.clone());
        Ok(())
    }

    fn record_report(
        &self,
        report: &NodeReportRecord,
        minute_unix: u64,
        edges: &[(EdgeKey, Traffic)],
    ) -> Result<(), Error> {
        let mut state = self.state();
        state
            .node_reports
            .insert(report.node.clone(), report.clone());
        for (edge, traffic) in edges {
            state
                .edge_minutes
                .entry((minute_unix, edge.clone()))
                .or_default()
                .add(traffic);
        }
        for ((destination, protocol), traffic) in service_rollup(edges) {
            for step in [Step::Minute, Step::Hour] {
                let key = (
                    destination.to_owned(),
                    step,
                    step.slot(minute_unix),
                    protocol,
                );
                state.service_slots.entry(key).or_default().add(&traffic);
            }
        }
        Ok(())
    }

    fn node_reports(&self) -> Result<Vec<NodeReportRecord>, Error> {
        Ok(self.state().node_reports.values().cloned().collect())
    }

    fn edge_minutes(&self, from_unix: u64) -> Result<Vec<EdgeMinute>, Error> {
        let state = self.state();
        let minutes = state
            .edge_minutes
            .iter()
            .filter(|((minute, _), _)| *minute >= from_unix)
            .map(|((minute_unix, edge), traffic)| EdgeMinute {
                minute_unix: *minute_unix,
                edge: edge.clone(),
                traffic: traffic.clone(),
            });
        Ok(minutes.collect())
    }

    fn service_slots(
        &self,
        destination: &str,
        step: Step,
        from_unix: u64,
    ) -> Result<Vec<ServiceSlot>, Error> {
        let state = self.state();
        let slots = state
            .service_slots
            .iter()
            .filter(|((d, s, start, _), _)| d == destination && *s == step && *start >= from_unix)
            .map(|((_, _, start_unix, protocol), traffic)| ServiceSlot {
                start_unix: *start_unix,
                protocol: *protocol,
                traffic: traffic.clone(),
            });
        Ok(slots.collect())
    }

    fn prune_traffic(&self, before_unix: u64, minutes_before_unix: u64) -> Result<usize, Error> {
        let mut state = self.state();
        let before = state.edge_minutes.len() + state.service_slots.len();
        state
            .edge_minutes
            .retain(|(minute, _), _| *minute >= before_unix);
        state
            .service_slots
            .retain(|(_, step, start, _), _| match step {
                Step::Minute => *start >= minutes_before_unix,
                Step::Hour => *start >= before_unix,
            });
        Ok(before - state.edge_minutes.len() - state.service_slots.len())
    }

    fn flush(&self) -> Result<(), Error> {
        Ok(())
    }

    fn slo_alerts(&self) -> Result<Vec<SloAlertRecord>, Error> {
        Ok(self.state().slo_alerts.values().cloned().collect())
    }

    fn put_slo_alert(&self, alert: &SloAlertRecord) -> Result<(), Error> {
        self.state()
            .slo_alerts
            .insert(alert.slo.clone(), alert.clone());
        Ok(())
    }

    fn delete_slo_alert(&self, slo: &str) -> Result<(), Error> {
        self.state().slo_alerts.remove(slo);
        Ok(())
    }
}
