//! Periodic report to the registry: this node's state (clock, policy and keyring revisions,
//! config generation, gossip view, certificate expiries, warnings) and the traffic of each edge
//! since the last report — what `meshctl topology`, SLOs and `meshctl check` are computed from.
//!
//! Warnings: any component publishes its current list on a `watch` registered with
//! [`Warnings`]; each report carries the union (bounded, see [`Warnings::current`]). The
//! listeners bound off loopback are one such source ([`watch_listeners`]).
//!
//! Static stability: a registry that cannot be reached costs nothing but the report; the edge
//! counts of a failed report are merged into the next one (bounded), so a short outage loses
//! no traffic from the SLOs.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::Identity;
use mesh_api::observe::{MAX_WARNING_LEN, MAX_WARNINGS};
use mesh_api::proto::v1 as pb;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::{self, Config};
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

/// The code of the warning that stands for those left out of a full report.
pub const WARNINGS_TRUNCATED: &str = "warnings_truncated";

/// Something about this node its operator should know of (not a failure: the node serves),
/// carried in every report and shown by `meshctl check`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Warning {
    /// Stable, machine-readable: `[a-z0-9_]`, e.g. `listener_off_loopback`
    /// (see [`mesh_api::observe::is_warning_code`]).
    pub code: String,
    /// One line for people naming what it is about (file, key, value) and why it matters.
    pub message: String,
}

/// A warning source: its current list, replaced whole on each change. The component that
/// owns the sender sends a new list whenever its warnings change (an empty one when they are
/// gone); a dropped sender leaves its last list in force.
pub type WarningsRx = watch::Receiver<Arc<Vec<Warning>>>;

/// The merge point of warning sources; the reporter reads the union at each report.
#[derive(Clone, Default)]
pub struct Warnings {
    sources: Vec<WarningsRx>,
}

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

// === impl Warning ===

impl Warning {
    /// A warning with `code` (a `'static` constant of the component that raises it).
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        debug_assert!(
            mesh_api::observe::is_warning_code(code),
            "warning code {code:?} must be [a-z0-9_]"
        );
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The wire form, made acceptable to the registry whatever the message holds: control
    /// characters become spaces and a long message is cut, between characters, with `…`.
    fn to_proto(&self) -> pb::NodeWarning {
        let mut message: String = (self.message.chars())
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if message.len() > MAX_WARNING_LEN {
            const ELLIPSIS: char = '…';
            let mut end = MAX_WARNING_LEN - ELLIPSIS.len_utf8();
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push(ELLIPSIS);
        }
        if message.is_empty() {
            message = self.code.clone();
        }
        pb::NodeWarning {
            code: self.code.clone(),
            message,
        }
    }
}

impl From<&config::OffLoopback> for Warning {
    fn from(w: &config::OffLoopback) -> Self {
        Warning::new(config::LISTENER_OFF_LOOPBACK, w.to_string())
    }
}

// === impl Warnings ===

impl Warnings {
    /// Registers a new source and returns its sender, starting with no warnings.
    pub fn source(&mut self) -> watch::Sender<Arc<Vec<Warning>>> {
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        self.sources.push(rx);
        tx
    }

    /// Registers a source a component already publishes.
    pub fn add(&mut self, rx: WarningsRx) {
        self.sources.push(rx);
    }

    /// Every source's current warnings: sorted, each once, and at most
    /// [`MAX_WARNINGS`] — beyond that the last place says how many more there are (the
    /// node's log has them all).
    pub fn current(&self) -> Vec<Warning> {
        let all: BTreeSet<Warning> = (self.sources.iter())
            .flat_map(|rx| rx.borrow().iter().cloned().collect::<Vec<_>>())
            .collect();
        let mut out: Vec<Warning> = all.into_iter().collect();
        if out.len() > MAX_WARNINGS {
            let more = out.len() - (MAX_WARNINGS - 1);
            out.truncate(MAX_WARNINGS - 1);
            out.push(Warning::new(
                WARNINGS_TRUNCATED,
                format!("{more} more warnings are not reported; see the node's log"),
            ));
        }
        out
    }
}

/// Publishes the listeners bound off loopback of each configuration (the first, then each
/// applied reload) on `warnings_tx`, and logs each at `warn` when it first appears — at start,
/// and when a reload adds one — until `shutdown`.
pub async fn watch_listeners(
    mut config_rx: watch::Receiver<Arc<Config>>,
    warnings_tx: watch::Sender<Arc<Vec<Warning>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut warnings: Vec<Warning> = Vec::new();
    loop {
        let config = config_rx.borrow_and_update().clone();
        let (now, new) = listener_warnings(&config, &warnings);
        for w in new {
            warn!(
                file = %w.file.display(),
                key = %w.key,
                addr = %w.addr,
                risk = %w.risk(),
                "listener bound off loopback"
            );
        }
        warnings = now;
        warnings_tx.send_replace(Arc::new(warnings.clone()));
        tokio::select! {
            r = config_rx.changed() => if r.is_err() { return },
            _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
        }
    }
}

/// Publishes, as warnings, the resources of the enforced policy this node could not read
/// (discovery skipped them or enforces a fail-closed stand-in), until `shutdown`.
pub async fn watch_unreadable_policy(
    mut unreadable_rx: watch::Receiver<Arc<Vec<crate::discovery::standin::Unreadable>>>,
    warnings_tx: watch::Sender<Arc<Vec<Warning>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let list = unreadable_rx.borrow_and_update().clone();
        let warnings = list.iter().map(unreadable_warning).collect();
        warnings_tx.send_replace(Arc::new(warnings));
        tokio::select! {
            r = unreadable_rx.changed() => if r.is_err() { return },
            _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
        }
    }
}

/// Publishes, as warnings, what `to_warnings` finds in each value of `rx`, until `shutdown`:
/// for components whose state already says what is wrong (gateway status, compiled proxy).
pub async fn watch_source<T>(
    mut rx: watch::Receiver<T>,
    warnings_tx: watch::Sender<Arc<Vec<Warning>>>,
    mut shutdown: watch::Receiver<bool>,
    to_warnings: impl Fn(&T) -> Vec<Warning>,
) {
    loop {
        let warnings = to_warnings(&rx.borrow_and_update());
        if **warnings_tx.borrow() != warnings {
            warnings_tx.send_replace(Arc::new(warnings));
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
        }
    }
}

/// Warning code of a gateway whose latest policy this host refused.
pub const WARNING_GATEWAY_REFUSED: &str = "gateway_refused";

/// The warnings of the gateways this host runs: each refused revision.
pub fn gateway_warnings(statuses: &crate::admin::Gateways) -> Vec<Warning> {
    (statuses.iter())
        .filter_map(|(name, status)| match status {
            crate::proxy::gateway::run::Status::Refused { revision, error } => Some(Warning::new(
                WARNING_GATEWAY_REFUSED,
                format!("gateway {name}: policy revision {revision} refused on this host, the previous listeners stay: {error}"),
            )),
            _ => None,
        })
        .collect()
}

/// Warning code of an ExternalService whose TLS files this host cannot use.
pub const WARNING_EXTERNAL_TLS: &str = "external_tls";

/// The warnings of the ExternalServices this host reaches: TLS files it cannot use.
pub fn external_warnings(compiled: &Arc<crate::proxy::compiled::Compiled>) -> Vec<Warning> {
    let mut out: Vec<Warning> = (compiled.external_clients())
        .filter_map(|c| {
            let problem = c.tls_problem()?;
            Some(Warning::new(
                WARNING_EXTERNAL_TLS,
                format!(
                    "ExternalService {}: {problem}; connections to it fail on this host",
                    c.key
                ),
            ))
        })
        .collect();
    out.sort();
    out
}

/// Warning code of a policy resource this node could not read.
pub const WARNING_POLICY_UNREADABLE: &str = "policy_unreadable";

fn unreadable_warning(u: &crate::discovery::standin::Unreadable) -> Warning {
    let enforced = u.stand_in.map_or_else(
        || "skipped (it never grants access)".to_owned(),
        |s| format!("enforced as a fail-closed stand-in: {s}"),
    );
    Warning::new(
        WARNING_POLICY_UNREADABLE,
        format!(
            "{}: unreadable by this meshd version ({}); {enforced}; upgrade meshd",
            u.resource,
            u.problems.join("; ")
        ),
    )
}

/// The listener warnings of `config`, and the listeners among them that `before` (the
/// previous configuration's warnings) did not have: those are logged.
fn listener_warnings(
    config: &Config,
    before: &[Warning],
) -> (Vec<Warning>, Vec<config::OffLoopback>) {
    let found = config.listeners_off_loopback();
    let now: Vec<Warning> = found.iter().map(Warning::from).collect();
    let new = (found.into_iter().zip(&now))
        .filter(|(_, w)| !before.contains(w))
        .map(|(l, _)| l)
        .collect();
    (now, new)
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

/// Reports every interval until `shutdown`, each report with the current `warnings`.
pub async fn run(inputs: Inputs, warnings: Warnings, mut shutdown: watch::Receiver<bool>) {
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
            &warnings.current(),
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
    warnings: &[Warning],
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
        warnings: warnings.iter().map(Warning::to_proto).collect(),
    }
}

#[cfg(test)]
mod tests;
