//! Periodic report to the registry: this node's state (clock, policy and keyring revisions,
//! config generation, gossip view, certificate expiries) and the traffic of each edge since the
//! last report — what `meshctl topology`, SLOs and `meshctl check` are computed from.
//!
//! Static stability: a registry that cannot be reached costs nothing but the report; the edge
//! counts of a failed report are merged into the next one (bounded), so a short outage loses
//! no traffic from the SLOs.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::Identity;
use mesh_api::proto::v1 as pb;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::control;
use crate::identity::Certs;
use crate::membership::MeshView;
use crate::proxy::observe::Edges;

/// Most edges carried over from failed reports; beyond it the oldest counts are dropped (a
/// long registry outage loses their SLO data, not the node's memory).
pub const MAX_PENDING_EDGES: usize = 10_000;
/// Shortest interval the registry may ask for.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interval the registry may ask for.
const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// What the reporter reads.
pub struct Inputs {
    /// Registry client (node identity).
    pub client: control::Client,
    /// This node's name.
    pub node: String,
    /// Edge counts, taken at each report.
    pub edges: Arc<Edges>,
    /// Certificates held.
    pub certs_rx: watch::Receiver<Arc<Certs>>,
    /// Gossip view.
    pub view_rx: watch::Receiver<Arc<MeshView>>,
    /// Policy enforced.
    pub policy_rx: watch::Receiver<Arc<mesh_api::policy::Snapshot>>,
    /// Reload status (config generation).
    pub reload_rx: watch::Receiver<crate::reload::Status>,
    /// Gossip keyring revision in use.
    pub keyring_revision: Gauge<i64>,
    /// Configured interval (the registry's answer may change it).
    pub interval: Duration,
}

/// A digest of the member names: nodes that see the same members report the same digest.
pub fn members_digest(view: &MeshView) -> String {
    let mut names: Vec<&str> = view.members.iter().map(|m| m.node.as_str()).collect();
    names.sort_unstable();
    let digest = ring::digest::digest(&ring::digest::SHA256, names.join("\n").as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The interval to use after the registry answered `asked_ms` (0: keep `current`).
pub fn next_interval(current: Duration, asked_ms: u64) -> Duration {
    if asked_ms == 0 {
        current
    } else {
        Duration::from_millis(asked_ms).clamp(MIN_INTERVAL, MAX_INTERVAL)
    }
}

/// Merges `older` (a failed report's edges) into `newer`, keeping at most `max` edges.
pub fn merge_pending(newer: &mut Vec<pb::EdgeStats>, older: Vec<pb::EdgeStats>, max: usize) {
    for o in older {
        let same = newer.iter().position(|n| {
            (&n.source, &n.destination, n.mtls, &n.protocol)
                == (&o.source, &o.destination, o.mtls, &o.protocol)
        });
        match same {
            Some(i) => {
                let n = &mut newer[i];
                n.requests += o.requests;
                n.errors += o.errors;
                n.bytes += o.bytes;
                mesh_api::observe::add_buckets(&mut n.latency_buckets, &o.latency_buckets);
            }
            None if newer.len() < max => newer.push(o),
            None => {}
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reports every interval until `shutdown`.
pub async fn run(inputs: Inputs, mut shutdown: watch::Receiver<bool>) {
    let mut interval = inputs.interval;
    let mut pending: Vec<pb::EdgeStats> = Vec::new();
    let mut last = SystemTime::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
        }
        let now = SystemTime::now();
        let mut edges = inputs.edges.take();
        merge_pending(&mut edges, std::mem::take(&mut pending), MAX_PENDING_EDGES);
        let report = build(
            &inputs,
            edges,
            now,
            now.duration_since(last).unwrap_or(interval),
        );
        match inputs.client.report(report.clone()).await {
            Ok(resp) => {
                last = now;
                interval = next_interval(interval, resp.interval_ms);
                debug!(edges = report.edges.len(), "reported to the registry");
            }
            Err(e) => {
                // Counted again next time; the period then covers both.
                pending = report.edges;
                warn!(error = %e, pending = pending.len(), "report to the registry failed; its traffic goes with the next one");
            }
        }
    }
}

fn build(
    inputs: &Inputs,
    edges: Vec<pb::EdgeStats>,
    now: SystemTime,
    period: Duration,
) -> pb::NodeReport {
    let certs = inputs.certs_rx.borrow().clone();
    let view = inputs.view_rx.borrow().clone();
    let mut certificates = Vec::with_capacity(certs.workloads.len() + 1);
    if let Ok(node) = mesh_api::name::NodeName::new(&inputs.node) {
        certificates.push(pb::CertExpiry {
            identity: Identity::node(&certs.trust_domain, &node).to_string(),
            not_after_unix: unix_ms(certs.node_not_after) as i64 / 1000,
        });
    }
    for (svc, w) in &certs.workloads {
        certificates.push(pb::CertExpiry {
            identity: Identity::workload(&certs.trust_domain, svc).to_string(),
            not_after_unix: unix_ms(w.not_after) as i64 / 1000,
        });
    }
    pb::NodeReport {
        sent_unix_ms: unix_ms(now),
        period_ms: period.as_millis() as u64,
        policy_revision: inputs.policy_rx.borrow().revision,
        keyring_revision: inputs.keyring_revision.get().max(0) as u64,
        config_generation: inputs.reload_rx.borrow().generation,
        members: view.members.len() as u32,
        members_digest: members_digest(&view),
        certificates,
        edges,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(src: &str, requests: u64) -> pb::EdgeStats {
        pb::EdgeStats {
            source: src.into(),
            destination: "default/api".into(),
            mtls: true,
            protocol: "http".into(),
            requests,
            errors: 1,
            latency_buckets: vec![requests],
            bytes: 0,
        }
    }

    #[test]
    fn pending_merges_and_is_bounded() {
        let mut newer = vec![edge("default/web", 5)];
        merge_pending(
            &mut newer,
            vec![edge("default/web", 3), edge("default/batch", 2)],
            10,
        );
        assert_eq!(newer.len(), 2);
        assert_eq!((newer[0].requests, newer[0].errors), (8, 2));
        assert_eq!(newer[0].latency_buckets, [8]);
        let mut full = vec![edge("a/a", 1)];
        merge_pending(&mut full, vec![edge("b/b", 1)], 1);
        assert_eq!(full.len(), 1, "bounded");
    }

    #[test]
    fn intervals() {
        let ten = Duration::from_secs(10);
        assert_eq!(next_interval(ten, 0), ten);
        assert_eq!(next_interval(ten, 500), Duration::from_millis(500));
        assert_eq!(next_interval(ten, 1), MIN_INTERVAL);
        assert_eq!(next_interval(ten, 3_600_000), MAX_INTERVAL);
    }

    #[test]
    fn digest_ignores_order() {
        use crate::membership::Member;
        let m = |n: &str| Member {
            node: n.into(),
            gossip_addr: "127.0.0.1:1".parse().unwrap(),
            generation: 1,
            info: None,
            services: Vec::new(),
        };
        let a = MeshView {
            members: vec![m("a"), m("b")],
            ..MeshView::default()
        };
        let b = MeshView {
            members: vec![m("b"), m("a")],
            ..MeshView::default()
        };
        let c = MeshView {
            members: vec![m("a")],
            ..MeshView::default()
        };
        assert_eq!(members_digest(&a), members_digest(&b));
        assert_ne!(members_digest(&a), members_digest(&c));
        assert_eq!(members_digest(&a).len(), 16);
    }
}
