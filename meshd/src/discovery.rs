//! Policy discovery: holds the registry's `WatchPolicy` stream, applies each event atomically to
//! a policy [`Snapshot`], persists it to `<data_dir>/policy.json` and only then publishes it as
//! a `watch` snapshot. At startup the persisted snapshot is loaded first, so the last policy is
//! enforced while the registry is down, also across a restart of meshd (static stability).
//!
//! It fails closed: until a snapshot is in place (`synced_rx`) the inbound refuses callers; a
//! persisted snapshot that does not load is set aside (renamed, never deleted) and the node
//! waits for the registry; an incremental event that does not validate is never applied in
//! part — the node reconnects asking for a full snapshot, which is read resource by resource
//! ([`standin`]: whatever is unreadable is skipped, counted, reported, and never widens access).

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

pub mod parts;
pub mod standin;
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
    /// `meshd_policy_resyncs_total`: full snapshots asked for because an incremental event did
    /// not validate.
    pub resyncs: Counter,
    /// `meshd_policy_unreadable_resources`: resources of the snapshot in force that this node
    /// could not read (skipped, or enforced as a fail-closed stand-in).
    pub unreadable: Gauge,
    /// `meshd_policy_snapshots_set_aside_total`: persisted snapshots that did not load and were
    /// renamed out of the way.
    pub set_aside: Counter,
}

/// What other components read.
#[derive(Clone)]
pub struct Handle {
    /// The policy being enforced; the discovery task owns the sender.
    pub policy_rx: watch::Receiver<Arc<Snapshot>>,
    /// `true` once a snapshot is in place: loaded from disk, or the first event received.
    pub synced_rx: watch::Receiver<bool>,
    /// The resources of the snapshot in force that this node could not read.
    pub unreadable_rx: watch::Receiver<Arc<Vec<standin::Unreadable>>>,
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
    /// Set when an incremental event did not validate: the next stream asks for a full
    /// snapshot (revision 0) instead of the changes since `current`.
    resync: bool,
    unreadable_tx: watch::Sender<Arc<Vec<standin::Unreadable>>>,
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
        reg.register(
            "meshd_policy_resyncs",
            "Full policy snapshots asked for because an incremental event did not validate",
            m.resyncs.clone(),
        );
        reg.register(
            "meshd_policy_unreadable_resources",
            "Resources of the enforced policy this node could not read (skipped or replaced by a fail-closed stand-in)",
            m.unreadable.clone(),
        );
        reg.register(
            "meshd_policy_snapshots_set_aside",
            "Persisted policy snapshots that did not load and were renamed out of the way",
            m.set_aside.clone(),
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
                metrics.set_aside.inc();
                let aside = set_aside(&path);
                error!(error = %e, set_aside_as = %aside, "persisted policy snapshot unusable; set aside, waiting for the registry (the inbound refuses callers until then)");
                (Snapshot::default(), false)
            }
        };
        metrics.revision.set(initial.revision as i64);
        let current = Arc::new(initial);
        let (policy_tx, policy_rx) = watch::channel(current.clone());
        let (synced_tx, synced_rx) = watch::channel(synced);
        let (unreadable_tx, unreadable_rx) = watch::channel(Arc::new(Vec::new()));
        (
            Self {
                path,
                current,
                policy_tx,
                synced_tx,
                persisted: synced,
                resync: false,
                unreadable_tx,
                metrics,
            },
            Handle {
                policy_rx,
                synced_rx,
                unreadable_rx,
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
            // After a rejected event, a full snapshot: never the changes on top of a hole.
            let since = if self.resync {
                0
            } else {
                self.current.revision
            };
            let opened = tokio::select! {
                r = client.watch_policy(since) => r,
                _ = mesh_runtime::drain::until_true(&mut shutdown) => break,
            };
            match opened {
                Ok(mut stream) => {
                    debug!(since_revision = since, "policy watch opened");
                    let mut first_event = true;
                    let mut assembler = parts::Assembler::default();
                    loop {
                        let msg = tokio::select! {
                            m = stream.message() => m,
                            _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
                        };
                        match msg {
                            Ok(Some(part)) => {
                                backoff.reset();
                                let event = match assembler.push(part) {
                                    Ok(Some(event)) => event,
                                    Ok(None) => continue,
                                    Err(e) => {
                                        warn!(error = %e, "policy event parts refused; reconnecting for a full snapshot");
                                        self.resync = true;
                                        self.metrics.resyncs.inc();
                                        break;
                                    }
                                };
                                if let Err(e) = self.handle(&event, first_event).await {
                                    // A failed persist or a rejected incremental event ends the
                                    // stream: reconnecting from the persisted revision (or 0,
                                    // to resync) makes the registry send it again, whole.
                                    error!(error = %e, resync = self.resync, "policy update not applied; reconnecting");
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

    /// Applies one event; an applied snapshot is persisted, then published. An incremental
    /// event that does not validate fails (and asks for a resync); a full one is read
    /// resource by resource. Fails too when persisting fails (nothing is published then).
    async fn handle(&mut self, event: &pb::PolicyEvent, first_event: bool) -> Result<(), Error> {
        let mut unreadable = Vec::new();
        let outcome = match apply_event(&self.current, event, first_event) {
            Ok(o) => o,
            Err(e) if !event.full_snapshot => {
                self.resync = true;
                self.metrics.resyncs.inc();
                return Err(e);
            }
            Err(e) => {
                let (outcome, skipped) = read_with_stand_ins(event, &e);
                unreadable = skipped;
                outcome
            }
        };
        if event.full_snapshot && !matches!(outcome, Outcome::Stale) {
            self.resync = false;
            self.metrics.unreadable.set(unreadable.len() as i64);
            self.unreadable_tx.send_replace(Arc::new(unreadable));
        }
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

/// A full snapshot that does not validate as a whole, read resource by resource: what reads
/// applies, the rest is skipped or enforced as a fail-closed stand-in, each one logged.
fn read_with_stand_ins(event: &pb::PolicyEvent, e: &Error) -> (Outcome, Vec<standin::Unreadable>) {
    let (resources, skipped) = standin::read_full(event);
    for u in &skipped {
        error!(
            resource = %u.resource,
            problems = %u.problems.join("; "),
            stand_in = u.stand_in.unwrap_or("none (skipped)"),
            "policy resource unreadable by this meshd version"
        );
    }
    warn!(error = %e, unreadable = skipped.len(), "full policy snapshot applied without the resources this node cannot read");
    let snapshot = Snapshot {
        revision: event.revision,
        resources,
    };
    (
        Outcome::Applied {
            snapshot,
            full: true,
        },
        skipped,
    )
}

/// Renames an unusable snapshot file out of the way (kept for the operator, never deleted);
/// returns where it went, or why it could not be moved.
fn set_aside(path: &std::path::Path) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = path.with_extension(format!("json.unusable-{secs}"));
    match std::fs::rename(path, &aside) {
        Ok(()) => aside.display().to_string(),
        Err(e) => format!("(not moved: {e})"),
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
        "" if kind.is_mesh_wide() => ROOT_NAMESPACE,
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
