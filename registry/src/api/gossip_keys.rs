//! Gossip keys over the registry API: nodes watch the keyring and report the revision they
//! hold; operators install, use and remove keys (serialised, durable, then published to the
//! watch streams) and read the status — key ids and what nodes reported, never key material.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use futures::{Stream, StreamExt as _, stream};
use mesh_api::gossip_key::KeyMaterial;
use mesh_api::proto::v1 as pb;
use mesh_api::{Identity, NodeName};
use prometheus_client::encoding::EncodeLabelSet;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};
use tonic::Status;
use tracing::{debug, info};

use super::{Metrics, RegistryApi, Rejected, reject, store_error, unix};
use crate::keyring::{self, Action, ChangeError};
use crate::server::PeerInfo;
use crate::store::{GossipKeyring, Store};

/// How many keyrings a watcher may fall behind before it skips to newer ones. Changes are
/// operator actions, so this is rarely reached; every keyring is complete, so skipping an old
/// one loses nothing.
pub const GOSSIP_WATCH_BUFFER: usize = 16;

/// The response stream of `WatchGossipKeys`.
pub type GossipKeyStream = Pin<Box<dyn Stream<Item = Result<pb::GossipKeyring, Status>> + Send>>;

/// Labels of `mesh_registry_gossip_key_changes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GossipKeyChangeLabels {
    /// `install`, `use` or `remove`.
    pub action: &'static str,
}

/// Orders keyring changes, fans them out to watchers and remembers what nodes reported.
pub(super) struct GossipHub {
    /// Held (on a blocking thread) from reading the keyring until the change is published, so
    /// every change starts from the latest keyring and watchers get revisions in order.
    write_lock: Mutex<()>,
    events: broadcast::Sender<Arc<GossipKeyring>>,
    /// Per node name: its last report and its open watch streams. In memory only: nodes
    /// report again after a registry restart.
    nodes: Arc<Mutex<BTreeMap<String, NodeState>>>,
}

#[derive(Debug, Default)]
struct NodeState {
    /// The last `ReportGossipKeys`: revision and Unix time.
    reported: Option<(u64, i64)>,
    /// How many `WatchGossipKeys` streams the node has open.
    streams: usize,
}

/// Counts one open watch stream of a node while it lives; dropping it (the stream ended or the
/// node went away, so tonic dropped the stream) uncounts it.
struct Connected {
    nodes: Arc<Mutex<BTreeMap<String, NodeState>>>,
    node: String,
}

/// The state of one watch stream after its first keyring.
struct Watcher {
    events: broadcast::Receiver<Arc<GossipKeyring>>,
    shutdown: watch::Receiver<bool>,
    /// The revision the node has been sent; older keyrings are skipped.
    last: u64,
    connected: Connected,
}

// === impl GossipHub ===

impl GossipHub {
    pub(super) fn new() -> Self {
        Self {
            write_lock: Mutex::new(()),
            events: broadcast::channel(GOSSIP_WATCH_BUFFER).0,
            nodes: Arc::default(),
        }
    }

    fn nodes(&self) -> MutexGuard<'_, BTreeMap<String, NodeState>> {
        // Every update is a single assignment, so a panicked holder leaves nothing half-done.
        lock(&self.nodes)
    }

    /// Counts an open watch stream of `node` until the returned guard drops.
    fn connect(&self, node: &NodeName) -> Connected {
        let node = node.to_string();
        self.nodes().entry(node.clone()).or_default().streams += 1;
        Connected {
            nodes: self.nodes.clone(),
            node,
        }
    }

    fn report(&self, node: &NodeName, revision: u64, now_unix: i64) {
        let mut nodes = self.nodes();
        nodes.entry(node.to_string()).or_default().reported = Some((revision, now_unix));
    }

    /// The status of `keyring`: ids and every node that reported.
    fn status(&self, keyring: &GossipKeyring) -> Result<pb::GossipKeyStatus, Rejected> {
        let ids = keyring::key_ids(keyring).map_err(|e| change_rejected(e.into()))?;
        let nodes = self
            .nodes()
            .iter()
            .filter_map(|(name, state)| {
                let (revision, reported_unix) = state.reported?;
                Some(pb::NodeGossipKeys {
                    node: name.clone(),
                    revision,
                    reported_unix,
                    connected: state.streams > 0,
                })
            })
            .collect();
        Ok(pb::GossipKeyStatus {
            revision: keyring.revision,
            key_ids: ids.iter().map(ToString::to_string).collect(),
            nodes,
        })
    }

    /// Applies `action` on `key` to the stored keyring and, once the new keyring is durable,
    /// publishes it. Blocks: call from a blocking thread.
    fn commit(
        &self,
        store: &dyn Store,
        action: Action,
        key: &str,
        by: &Identity,
        metrics: &Metrics,
    ) -> Result<GossipKeyring, Rejected> {
        let _ordered = lock(&self.write_lock);
        let current = read_keyring(store)?;
        let outcome = keyring::change(&current, action, key, KeyMaterial::generate)
            .map_err(change_rejected)?;
        let ids = keyring::key_ids(&outcome.keyring).map_err(|e| change_rejected(e.into()))?;
        if !outcome.changed {
            info!(
                by = %by,
                action = action.as_str(),
                key_id = %outcome.key_id,
                revision = current.revision,
                "gossip keyring unchanged: the key is already the primary"
            );
            return Ok(outcome.keyring);
        }
        store
            .put_gossip_keyring(&outcome.keyring)
            .map_err(store_error)?;
        let revision = outcome.keyring.revision;
        metrics
            .gossip_key_changes
            .get_or_create(&GossipKeyChangeLabels {
                action: action.as_str(),
            })
            .inc();
        metrics.gossip_keyring_revision.set(revision as i64);
        info!(
            by = %by,
            action = action.as_str(),
            key_id = %outcome.key_id,
            revision,
            key_ids = ?ids,
            "gossip keyring changed"
        );
        // No receivers is fine: no node is watching.
        let _ = self.events.send(Arc::new(outcome.keyring.clone()));
        Ok(outcome.keyring)
    }
}

// === impl Connected ===

impl Drop for Connected {
    fn drop(&mut self) {
        let mut nodes = lock(&self.nodes);
        if let Some(state) = nodes.get_mut(&self.node) {
            state.streams = state.streams.saturating_sub(1);
            // Forget a node that never reported once it is gone, so the table stays bounded
            // by the nodes that matter to the status.
            if state.streams == 0 && state.reported.is_none() {
                nodes.remove(&self.node);
            }
        }
    }
}

// === impl RegistryApi ===

impl RegistryApi {
    /// Key material is for nodes of this mesh only; operators and viewers see key ids through
    /// `GetGossipKeys`.
    fn require_key_holder(&self, peer: &PeerInfo) -> Result<NodeName, Rejected> {
        match &peer.identity {
            Some(Identity::Node { trust_domain, name })
                if *trust_domain == self.inner.config.trust_domain =>
            {
                Ok(name.clone())
            }
            Some(other) => Err(reject(
                "wrong_identity",
                Status::permission_denied(format!(
                    "{other} may not hold gossip keys: they are only for node identities of \
                     this mesh (operators and viewers see key ids with GetGossipKeys)"
                )),
            )),
            None => Err(reject(
                "unauthenticated",
                Status::unauthenticated("a node certificate is required"),
            )),
        }
    }

    pub(super) async fn do_watch_gossip_keys(
        &self,
        peer: &PeerInfo,
    ) -> Result<GossipKeyStream, Rejected> {
        let node = self.require_key_holder(peer)?;
        // Subscribe before reading the store: a change committed in between is then either in
        // the first keyring or delivered (and anything already sent is skipped by revision).
        let events = self.inner.gossip.events.subscribe();
        let first = self.blocking(|s| Ok(read_keyring(s))).await??;
        info!(
            node = %node,
            src.addr = %peer.addr,
            revision = first.revision,
            "gossip key watch started"
        );
        let watcher = Watcher {
            events,
            shutdown: self.inner.shutdown.clone(),
            last: first.revision,
            connected: self.inner.gossip.connect(&node),
        };
        let first = Ok(to_proto(&first));
        let rest = stream::unfold(watcher, Watcher::next_keyring);
        Ok(Box::pin(stream::once(async { first }).chain(rest)))
    }

    pub(super) fn do_report_gossip_keys(
        &self,
        peer: &PeerInfo,
        req: pb::ReportGossipKeysRequest,
    ) -> Result<pb::ReportGossipKeysResponse, Rejected> {
        let node = self.require_key_holder(peer)?;
        self.inner
            .gossip
            .report(&node, req.revision, unix(SystemTime::now()));
        debug!(node = %node, revision = req.revision, "gossip keyring revision reported");
        Ok(pb::ReportGossipKeysResponse {})
    }

    pub(super) async fn do_change_gossip_keys(
        &self,
        peer: &PeerInfo,
        req: pb::ChangeGossipKeysRequest,
    ) -> Result<pb::GossipKeyStatus, Rejected> {
        let admin = self.require_admin(peer)?;
        let action = action_of(req.action).map_err(change_rejected)?;
        let inner = self.inner.clone();
        // Read, decide, write and publish together on one blocking thread, so a caller
        // hanging up mid-call cannot leave a durable change unpublished.
        let keyring = self
            .blocking(move |store| {
                Ok(inner
                    .gossip
                    .commit(store, action, &req.key, &admin, &inner.metrics))
            })
            .await??;
        self.inner.gossip.status(&keyring)
    }

    pub(super) async fn do_get_gossip_keys(
        &self,
        peer: &PeerInfo,
    ) -> Result<pb::GossipKeyStatus, Rejected> {
        self.require_reader(peer)?;
        let keyring = self.blocking(|s| Ok(read_keyring(s))).await??;
        self.inner.gossip.status(&keyring)
    }
}

// === impl Watcher ===

impl Watcher {
    /// The next keyring to send, or `None` to end the stream (drain, or the hub is gone).
    async fn next_keyring(mut self) -> Option<(Result<pb::GossipKeyring, Status>, Self)> {
        loop {
            let received = tokio::select! {
                biased;
                _ = mesh_runtime::drain::until_true(&mut self.shutdown) => {
                    debug!(
                        node = %self.connected.node,
                        "registry draining; ending gossip key watch"
                    );
                    return None;
                }
                received = self.events.recv() => received,
            };
            match received {
                Ok(keyring) if keyring.revision <= self.last => continue,
                Ok(keyring) => {
                    self.last = keyring.revision;
                    return Some((Ok(to_proto(&keyring)), self));
                }
                // The keyrings still buffered are newer and complete: carry on with them.
                Err(RecvError::Lagged(missed)) => {
                    debug!(
                        missed,
                        "gossip key watcher fell behind; skipping older keyrings"
                    );
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// The action a request names.
pub fn action_of(action: i32) -> Result<Action, ChangeError> {
    use pb::change_gossip_keys_request::Action as Wire;
    match Wire::try_from(action) {
        Ok(Wire::Install) => Ok(Action::Install),
        Ok(Wire::Use) => Ok(Action::Use),
        Ok(Wire::Remove) => Ok(Action::Remove),
        Ok(Wire::Unspecified) | Err(_) => Err(ChangeError::UnknownAction),
    }
}

/// The stored keyring; the registry creates it at startup, so its absence is a broken setup.
fn read_keyring(store: &dyn Store) -> Result<GossipKeyring, Rejected> {
    store
        .get_gossip_keyring()
        .map_err(store_error)?
        .ok_or_else(|| {
            reject(
                "no_keyring",
                Status::failed_precondition(
                    "the registry has no gossip keyring; restart it to have one created",
                ),
            )
        })
}

/// How a refused change is reported: bad input is the caller's to fix, a conflict with the
/// current keyring names the step to take first.
fn change_rejected(e: ChangeError) -> Rejected {
    let message = e.to_string();
    match e {
        ChangeError::UnknownAction | ChangeError::BadKey(_) | ChangeError::BadKeyId(_) => {
            reject("bad_request", Status::invalid_argument(message))
        }
        ChangeError::AlreadyInstalled(_) => {
            reject("already_installed", Status::failed_precondition(message))
        }
        ChangeError::IdTaken(_) => reject("key_id_taken", Status::failed_precondition(message)),
        ChangeError::KeyringFull => reject("keyring_full", Status::failed_precondition(message)),
        ChangeError::RemovePrimary(_) => {
            reject("remove_primary", Status::failed_precondition(message))
        }
        ChangeError::UnknownKey { .. } => reject("unknown_key", Status::not_found(message)),
        ChangeError::Generate(_) | ChangeError::Corrupt(_) => {
            reject("internal", Status::internal(message))
        }
    }
}

fn to_proto(keyring: &GossipKeyring) -> pb::GossipKeyring {
    pb::GossipKeyring {
        revision: keyring.revision,
        keys: keyring.keys.clone(),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
