//! Observability over the registry API: nodes report their state and edge traffic (`Report`);
//! operators and viewers read the service graph (`GetTopology`), SLO status (`GetSloStatus`)
//! and every node's last report (`GetNodeReports`). The checks and arithmetic live in
//! `traffic`, `slo` and `alerts`; this module authorises, times and stores.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use mesh_api::policy::{Kind, Resource, Spec};
use mesh_api::proto::v1 as pb;
use tonic::Status;
use tracing::debug;

use super::decide::KnownServices;
use super::{RegistryApi, Rejected, reject};
use crate::alerts;
use crate::server::PeerInfo;
use crate::slo::Severity;
use crate::store::{NodeReportRecord, Step};
use crate::traffic;

/// How long the known services (for report checks) are reused before the nodes and the
/// ServiceExports are read again: a service a node joined with is reportable within this long.
pub const KNOWN_SERVICES_TTL: Duration = Duration::from_secs(5);

/// Per-node report pacing and the cached list of known services.
#[derive(Default)]
pub(super) struct ReportQuota {
    last: Mutex<HashMap<String, super::decide::ReportBucket>>,
    known: Mutex<Option<(Instant, Arc<KnownServices>)>>,
}

impl ReportQuota {
    /// Counts a report of `node` at `now_ms` against its quota (see
    /// [`super::decide::report_quota`]). One entry per registered node that reported.
    fn admit(&self, node: &str, now_ms: u64, interval_ms: u64) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let (ok, bucket) =
            super::decide::report_quota(last.get(node).copied(), now_ms, interval_ms);
        last.insert(node.to_owned(), bucket);
        ok
    }

    fn known(&self, now: Instant) -> Option<Arc<KnownServices>> {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known
            .as_ref()
            .filter(|(at, _)| now.duration_since(*at) < KNOWN_SERVICES_TTL)
            .map(|(_, k)| k.clone())
    }

    fn set_known(&self, known: Arc<KnownServices>, now: Instant) {
        *self.known.lock().unwrap_or_else(PoisonError::into_inner) = Some((now, known));
    }

    /// Forgets a removed node's pace.
    pub(super) fn forget(&self, node: &str) {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(node);
    }
}

// === impl RegistryApi ===

impl RegistryApi {
    /// A node's report: the node is its certificate's, never the message's. The report's edges
    /// land in the minute the registry received it (registry clock, so node clock skew cannot
    /// misplace traffic).
    pub(super) async fn do_report(
        &self,
        peer: &PeerInfo,
        req: pb::NodeReport,
    ) -> Result<pb::ReportResponse, Rejected> {
        let node = self.require_node(peer)?;
        let received_unix_ms = unix_ms(SystemTime::now());
        let checked = traffic::check(node.as_str(), &req, received_unix_ms).map_err(|e| {
            reject(
                "bad_report",
                Status::invalid_argument(format!("report refused, nothing stored: {e}")),
            )
        })?;
        let interval_ms =
            u64::try_from(self.inner.config.report_interval.as_millis()).unwrap_or(u64::MAX);
        if !self
            .inner
            .reports
            .admit(node.as_str(), received_unix_ms, interval_ms)
        {
            return Err(reject(
                "too_frequent",
                Status::resource_exhausted(format!(
                    "report refused, nothing stored: node {node} sends more than {} reports per {interval_ms} ms",
                    super::decide::REPORTS_PER_INTERVAL
                )),
            ));
        }
        let key = node.to_string();
        let record = self.blocking(move |s| s.get_node(&key)).await?;
        let record = record.ok_or_else(|| {
            reject(
                "unknown_node",
                Status::permission_denied(format!("node {node} is not registered")),
            )
        })?;
        // Calls to services no node may host are dropped, the rest kept: a caller whose
        // upstream does not exist yet still reports, and nobody grows the store with invented
        // services.
        let known = self.known_services().await?;
        let mut checked = checked;
        let before = checked.edges.len();
        checked.edges.retain(|(edge, _)| {
            super::decide::is_known_edge(&known, &edge.destination, &edge.destination_site).is_ok()
        });
        let dropped = before - checked.edges.len();
        if dropped > 0 {
            self.inner
                .metrics
                .report_edges_dropped
                .inc_by(dropped as u64);
            debug!(node = %node, dropped, "report edges to unknown services dropped");
        }
        for (i, (edge, _)) in checked.edges.iter().enumerate() {
            super::decide::may_report_edge(
                &record.allowed_services,
                &edge.source,
                &edge.destination,
            )
            .map_err(|e| {
                reject(
                    "edge_not_owned",
                    Status::permission_denied(format!(
                        "report refused, nothing stored: edges[{i}]: {e}"
                    )),
                )
            })?;
        }
        let minute_unix = Step::Minute.slot(received_unix_ms / 1_000);
        let edges = checked.edges.len();
        let skew = checked.record.clock_skew_ms;
        self.blocking(move |s| s.record_report(&checked.record, minute_unix, &checked.edges))
            .await?;
        debug!(node = %node, edges, clock_skew_ms = skew, "node report stored");
        Ok(pb::ReportResponse {
            interval_ms: u64::try_from(self.inner.config.report_interval.as_millis())
                .unwrap_or(u64::MAX),
        })
    }

    /// Every registered node's allowed services, read at most once per
    /// [`KNOWN_SERVICES_TTL`] (a report per node per interval must not scan every node).
    async fn known_services(&self) -> Result<Arc<KnownServices>, Rejected> {
        if let Some(known) = self.inner.reports.known(Instant::now()) {
            return Ok(known);
        }
        let (nodes, (_, policies)) = self
            .blocking(|s| Ok((s.list_nodes()?, s.list_policies()?)))
            .await?;
        let mut local: Vec<String> = nodes.into_iter().flat_map(|n| n.allowed_services).collect();
        local.sort();
        local.dedup();
        let exported = (policies.iter())
            .filter(|r| r.kind == Kind::ServiceExport.as_str())
            .filter_map(|r| {
                match Resource::from_json(&r.kind, &r.namespace, &r.name, &r.spec_json) {
                    Ok(Resource {
                        spec: Spec::ServiceExport(e),
                        ..
                    }) => Some(super::decide::exported_entries(&r.namespace, &e)),
                    _ => None,
                }
            })
            .flatten()
            .collect();
        let sites = (self.inner.config.peers.iter())
            .map(|p| p.site.clone())
            .collect();
        let known = Arc::new(KnownServices {
            local,
            exported,
            sites,
        });
        self.inner.reports.set_known(known.clone(), Instant::now());
        Ok(known)
    }

    pub(super) async fn do_get_topology(
        &self,
        peer: &PeerInfo,
        req: pb::TopologyRequest,
    ) -> Result<pb::Topology, Rejected> {
        self.require_reader(peer)?;
        let window = traffic::topology_window(req.window_seconds);
        let now = unix_ms(SystemTime::now()) / 1_000;
        let from = traffic::first_minute(now, window);
        let minutes = self.blocking(move |s| s.edge_minutes(from)).await?;
        Ok(traffic::topology(&minutes, window))
    }

    pub(super) async fn do_get_slo_status(
        &self,
        peer: &PeerInfo,
    ) -> Result<pb::SloStatusResponse, Rejected> {
        self.require_reader(peer)?;
        let now = unix_ms(SystemTime::now()) / 1_000;
        let (evaluated, alerts) = self
            .blocking(move |s| Ok((alerts::evaluate_all(s, now)?, s.slo_alerts()?)))
            .await?;
        let alerts: BTreeMap<String, _> = alerts.into_iter().map(|a| (a.slo.clone(), a)).collect();
        let slos = evaluated
            .into_iter()
            .map(|e| {
                let alert = alerts.get(&e.resource.name);
                let (r, s) = (e.resource, e.status);
                pb::SloStatus {
                    service: r.service,
                    objective: r.slo.objective.as_str().to_owned(),
                    goal: r.slo.goal,
                    window: crate::slo::window_name(r.slo.window),
                    total: s.total.round() as u64,
                    good: s.good.round() as u64,
                    sli: s.sli,
                    budget_remaining: s.budget_remaining,
                    burn_5m: s.burn.m5,
                    burn_30m: s.burn.m30,
                    burn_1h: s.burn.h1,
                    burn_6h: s.burn.h6,
                    alert: alert
                        .map_or(Severity::Ok, |a| a.severity)
                        .as_str()
                        .to_owned(),
                    alert_since_unix: alert.map_or(0, |a| a.since_unix),
                    slo: r.name,
                }
            })
            .collect();
        Ok(pb::SloStatusResponse { slos })
    }

    pub(super) async fn do_get_node_reports(
        &self,
        peer: &PeerInfo,
    ) -> Result<pb::NodeReportsResponse, Rejected> {
        self.require_reader(peer)?;
        let (reports, policy_revision, keyring) = self
            .blocking(|s| {
                Ok((
                    s.node_reports()?,
                    s.policy_revision()?,
                    s.get_gossip_keyring()?,
                ))
            })
            .await?;
        Ok(pb::NodeReportsResponse {
            now_unix_ms: unix_ms(SystemTime::now()),
            policy_revision,
            keyring_revision: keyring.map_or(0, |k| k.revision),
            nodes: reports.into_iter().map(node_report_state).collect(),
            ca_certificates: (super::ca_expiries(&self.inner.ca.current()).into_iter())
                .map(|(kind, not_after)| pb::CaCertExpiry {
                    kind: kind.to_owned(),
                    not_after_unix: super::unix(not_after),
                })
                .collect(),
            follow: self.inner.follow.get(),
            peers: self.inner.peers.get(),
        })
    }
}

/// The wire form of a kept report; its edges are not kept (they are in the topology).
fn node_report_state(r: NodeReportRecord) -> pb::NodeReportState {
    pb::NodeReportState {
        node: r.node,
        received_unix_ms: r.received_unix_ms,
        clock_skew_ms: r.clock_skew_ms,
        report: Some(pb::NodeReport {
            sent_unix_ms: r.sent_unix_ms,
            period_ms: r.period_ms,
            policy_revision: r.policy_revision,
            keyring_revision: r.keyring_revision,
            config_generation: r.config_generation,
            members: r.members,
            members_digest: r.members_digest,
            certificates: r
                .certificates
                .into_iter()
                .map(|c| pb::CertExpiry {
                    identity: c.identity,
                    not_after_unix: c.not_after_unix,
                })
                .collect(),
            edges: Vec::new(),
            version: r.version,
            warnings: (r.warnings.into_iter())
                .map(|w| pb::NodeWarning {
                    code: w.code,
                    message: w.message,
                })
                .collect(),
        }),
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
