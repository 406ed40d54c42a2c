//! Policy discovery: holds the registry's `WatchPolicy` stream, applies each event atomically to
//! a policy [`Snapshot`], persists it to `<data_dir>/policy.json` and only then publishes it as
//! a `watch` snapshot. At startup the persisted snapshot is loaded first, so the last policy is
//! enforced while the registry is down, also across a restart of meshd (static stability).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::ServiceKey;
use mesh_api::name::Label;
use mesh_api::policy::authz::{self, Workload};
use mesh_api::policy::{Kind, Problem, ROOT_NAMESPACE, Resource, ResourceKey, Snapshot, Spec};
use mesh_api::proto::v1 as pb;
use mesh_runtime::backoff::Backoff;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::control;

pub mod store;

/// First reconnect delay after the stream failed or ended.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest delay between reconnects.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// The persisted snapshot, under the data dir.
pub const POLICY_FILE: &str = "policy.json";

/// Discovery errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An event carried a resource this node cannot read; nothing of the event was applied.
    #[error("policy event at revision {revision} is unusable: {}", problems.join("; "))]
    InvalidEvent {
        /// The event's revision.
        revision: u64,
        /// Every problem found.
        problems: Vec<String>,
    },
    /// The persisted snapshot could not be read or written.
    #[error("policy store {path}: {reason}")]
    Store {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// What applying one event to the current snapshot gives.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// A new snapshot to persist and publish.
    Applied {
        /// The new state.
        snapshot: Snapshot,
        /// Whether the event was a full snapshot (else incremental).
        full: bool,
    },
    /// The event confirms what the node has (the registry's "you are current").
    Current,
    /// The event is older than what the node has (out of order); ignored.
    Stale,
}

/// Discovery metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// `meshd_policy_revision`: the revision being enforced.
    pub revision: Gauge,
    /// `meshd_policy_updates_total`: events applied (new snapshots published).
    pub updates: Counter,
    /// `meshd_policy_stream_reconnects_total`: attempts to re-open the watch stream after it
    /// failed or ended (each retry while the registry is down counts).
    pub reconnects: Counter,
}

/// What other components read.
#[derive(Clone)]
pub struct Handle {
    /// The policy being enforced; the discovery task owns the sender.
    pub policy_rx: watch::Receiver<Arc<Snapshot>>,
    /// `true` once a snapshot is in place: loaded from disk, or the first event received.
    pub synced_rx: watch::Receiver<bool>,
}

/// The policy watch client; built with [`Discovery::load`], started with [`Discovery::run`].
pub struct Discovery {
    path: PathBuf,
    current: Arc<Snapshot>,
    /// Published snapshots; receivers are in [`Handle`]. Dropping it ends their `changed()`.
    policy_tx: watch::Sender<Arc<Snapshot>>,
    synced_tx: watch::Sender<bool>,
    /// Whether `current` is on disk (a "you are current" answer to a fresh node persists the
    /// empty snapshot, so a restart with the registry down is ready too).
    persisted: bool,
    metrics: Metrics,
}

// === impl Metrics ===

impl Metrics {
    /// Registers the discovery metrics.
    pub fn new(reg: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        reg.register(
            "meshd_policy_revision",
            "Registry revision of the policy this node enforces (0 = none yet)",
            m.revision.clone(),
        );
        reg.register(
            "meshd_policy_updates",
            "Policy events applied",
            m.updates.clone(),
        );
        reg.register(
            "meshd_policy_stream_reconnects",
            "Attempts to re-open the policy watch stream after it failed or ended",
            m.reconnects.clone(),
        );
        m
    }
}

// === impl Discovery ===

impl Discovery {
    /// Loads `<data_dir>/policy.json` when there is one (a snapshot in place: ready at once);
    /// otherwise starts from an empty revision-0 snapshot and waits for the registry. An
    /// unreadable file is logged and treated as absent: it must not keep the node down.
    pub fn load(data_dir: &std::path::Path, metrics: Metrics) -> (Self, Handle) {
        let path = data_dir.join(POLICY_FILE);
        let (initial, synced) = match store::load(&path) {
            Ok(Some(s)) => {
                info!(
                    revision = s.revision,
                    resources = s.resources.len(),
                    path = %path.display(),
                    "loaded the persisted policy snapshot"
                );
                (s, true)
            }
            Ok(None) => {
                info!(path = %path.display(), "no persisted policy snapshot; waiting for the registry");
                (Snapshot::default(), false)
            }
            Err(e) => {
                error!(error = %e, "persisted policy snapshot unusable; waiting for the registry");
                (Snapshot::default(), false)
            }
        };
        metrics.revision.set(initial.revision as i64);
        let current = Arc::new(initial);
        let (policy_tx, policy_rx) = watch::channel(current.clone());
        let (synced_tx, synced_rx) = watch::channel(synced);
        (
            Self {
                path,
                current,
                policy_tx,
                synced_tx,
                persisted: synced,
                metrics,
            },
            Handle {
                policy_rx,
                synced_rx,
            },
        )
    }

    /// Watches policy until `shutdown` turns true: opens the stream with the revision in hand,
    /// applies every event, and on failure or end reconnects with jittered backoff.
    pub async fn run(mut self, client: control::Client, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        let mut first_attempt = true;
        loop {
            if !first_attempt {
                self.metrics.reconnects.inc();
            }
            first_attempt = false;
            let since = self.current.revision;
            let opened = tokio::select! {
                r = client.watch_policy(since) => r,
                _ = mesh_runtime::drain::until_true(&mut shutdown) => break,
            };
            match opened {
                Ok(mut stream) => {
                    debug!(since_revision = since, "policy watch opened");
                    let mut first_event = true;
                    loop {
                        let msg = tokio::select! {
                            m = stream.message() => m,
                            _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
                        };
                        match msg {
                            Ok(Some(event)) => {
                                backoff.reset();
                                if let Err(e) = self.handle(&event, first_event).await {
                                    // Only a failed persist ends the stream: reconnecting from
                                    // the persisted revision makes the registry send it again.
                                    error!(error = %e, "policy update not applied; reconnecting");
                                    break;
                                }
                                first_event = false;
                            }
                            Ok(None) => {
                                info!("policy watch ended by the registry; reconnecting");
                                break;
                            }
                            Err(status) => {
                                warn!(error = %control::Error::from(status), "policy watch failed; reconnecting");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, revision = since, "cannot open the policy watch; enforcing the policy in hand");
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = mesh_runtime::drain::until_true(&mut shutdown) => break,
            }
        }
        debug!("policy discovery stopped");
    }

    /// Applies one event: invalid events are logged and skipped; an applied snapshot is
    /// persisted, then published. Fails only when persisting fails (nothing is published then).
    async fn handle(&mut self, event: &pb::PolicyEvent, first_event: bool) -> Result<(), Error> {
        let outcome = match apply_event(&self.current, event, first_event) {
            Ok(o) => o,
            Err(e) => {
                error!(error = %e, "policy event skipped; keeping the current policy");
                return Ok(());
            }
        };
        match outcome {
            Outcome::Stale => {
                debug!(
                    revision = event.revision,
                    current = self.current.revision,
                    "stale policy event ignored"
                );
            }
            Outcome::Current => {
                debug!(revision = self.current.revision, "policy is current");
                if !self.persisted {
                    self.persist(self.current.clone()).await?;
                }
            }
            Outcome::Applied { snapshot, full } => {
                if snapshot.revision < self.current.revision {
                    warn!(
                        revision = snapshot.revision,
                        previous = self.current.revision,
                        "registry resynced this node to an older revision (restored or replaced registry?)"
                    );
                }
                let snapshot = Arc::new(snapshot);
                self.persist(snapshot.clone()).await?;
                info!(
                    revision = snapshot.revision,
                    resources = snapshot.resources.len(),
                    kind = if full { "full" } else { "incremental" },
                    "policy revision applied"
                );
                self.current = snapshot.clone();
                self.metrics.revision.set(snapshot.revision as i64);
                self.metrics.updates.inc();
                self.policy_tx.send_replace(snapshot);
            }
        }
        self.synced_tx
            .send_if_modified(|synced| !std::mem::replace(synced, true));
        Ok(())
    }
}

impl Discovery {
    /// Writes `snapshot` to disk (off the runtime threads: it fsyncs).
    async fn persist(&mut self, snapshot: Arc<Snapshot>) -> Result<(), Error> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || store::save(&path, &snapshot))
            .await
            .map_err(|e| Error::Store {
                path: self.path.clone(),
                reason: format!("writer task failed: {e}"),
            })??;
        self.persisted = true;
        Ok(())
    }
}

/// Applies `event` to `current` without touching it: all or nothing.
///
/// * Incremental events at or below the current revision are stale (an empty one at exactly
///   the current revision is the registry's "you are current").
/// * Full snapshots replace everything. One older than the current revision is stale, except
///   as the first event of a stream (`first_event`): that is how the registry tells a node that
///   is ahead of it (a restored registry) to resync, and the registry is the source of truth.
/// * Any resource that fails [`Resource::from_json`] (or a deletion with an unreadable key)
///   rejects the whole event.
pub fn apply_event(
    current: &Snapshot,
    event: &pb::PolicyEvent,
    first_event: bool,
) -> Result<Outcome, Error> {
    let rev = event.revision;
    if event.full_snapshot {
        if rev < current.revision && !first_event {
            return Ok(Outcome::Stale);
        }
        let mut problems = Vec::new();
        let mut resources = BTreeMap::new();
        for r in event.resources.iter().filter(|r| !r.deleted) {
            match Resource::from_json(&r.kind, &r.namespace, &r.name, &r.spec_json) {
                Ok(res) => {
                    resources.insert(res.key.clone(), res);
                }
                Err(p) => problems.extend(p.iter().map(Problem::to_string)),
            }
        }
        if !problems.is_empty() {
            return Err(Error::InvalidEvent {
                revision: rev,
                problems,
            });
        }
        let snapshot = Snapshot {
            revision: rev,
            resources,
        };
        if snapshot == *current {
            return Ok(Outcome::Current);
        }
        return Ok(Outcome::Applied {
            snapshot,
            full: true,
        });
    }
    if rev <= current.revision {
        return Ok(if rev == current.revision && event.resources.is_empty() {
            Outcome::Current
        } else {
            Outcome::Stale
        });
    }
    let mut problems = Vec::new();
    let mut next = current.clone();
    next.revision = rev;
    for r in &event.resources {
        if r.deleted {
            match deleted_key(r) {
                Ok(key) => {
                    next.resources.remove(&key);
                }
                Err(p) => problems.push(p),
            }
            continue;
        }
        match Resource::from_json(&r.kind, &r.namespace, &r.name, &r.spec_json) {
            Ok(res) => {
                next.resources.insert(res.key.clone(), res);
            }
            Err(p) => problems.extend(p.iter().map(Problem::to_string)),
        }
    }
    if !problems.is_empty() {
        return Err(Error::InvalidEvent {
            revision: rev,
            problems,
        });
    }
    Ok(Outcome::Applied {
        snapshot: next,
        full: false,
    })
}

/// The key of a deletion record (which carries no spec to validate).
fn deleted_key(r: &pb::Resource) -> Result<ResourceKey, String> {
    let at = format!("{}/{}/{}", r.kind, r.namespace, r.name);
    let kind: Kind = r.kind.parse().map_err(|e| format!("{at}: {e}"))?;
    let ns = match r.namespace.as_str() {
        "" if kind == Kind::MeshConfig => ROOT_NAMESPACE,
        "" => mesh_api::name::DEFAULT_NAMESPACE,
        ns => ns,
    };
    let namespace = Label::new(ns).map_err(|e| format!("{at}: namespace: {e}"))?;
    let name = Label::new(&r.name).map_err(|e| format!("{at}: name: {e}"))?;
    Ok(ResourceKey::new(kind, namespace, name))
}

/// The AuthorizationPolicies and PeerAuthentications of `snapshot` that select the local
/// service `service` with `labels` (its own namespace and the root namespace), in key order.
pub fn effective(
    snapshot: &Snapshot,
    service: &ServiceKey,
    labels: &BTreeMap<String, String>,
) -> Vec<ResourceKey> {
    let workload = Workload { service, labels };
    let mut keys: Vec<ResourceKey> = authz::selecting(snapshot, &workload)
        .map(|(k, _)| k.clone())
        .collect();
    let root = Label::new(ROOT_NAMESPACE).expect("the root namespace is a label");
    for ns in [&service.namespace, &root] {
        for r in snapshot.in_namespace(Kind::PeerAuthentication, ns) {
            if let Spec::PeerAuthentication(pa) = &r.spec {
                let by_name = pa
                    .selector
                    .service
                    .as_ref()
                    .is_none_or(|s| *s == service.name);
                let by_labels = pa
                    .selector
                    .labels
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v));
                if by_name && by_labels {
                    keys.push(r.key.clone());
                }
            }
        }
        if service.namespace == root {
            break;
        }
    }
    keys.sort();
    keys
}

#[cfg(test)]
mod tests;
