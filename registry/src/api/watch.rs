//! `WatchPolicy`: a first event read from the store (a full snapshot, the changes since the
//! node's revision, or an empty "you are current"), then every revision committed after it,
//! until the node goes away or the registry drains.

use std::pin::Pin;

use futures::{Stream, StreamExt as _, stream};
use mesh_api::Identity;
use mesh_api::proto::v1 as pb;
use prometheus_client::encoding::EncodeLabelSet;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};
use tonic::Status;
use tracing::{debug, info, warn};

use super::policy::{Committed, resource_of};
use super::{RegistryApi, Rejected, reject};
use crate::server::PeerInfo;
use crate::store::PolicyRecord;

/// The response stream of `WatchPolicy`.
pub type PolicyStream = Pin<Box<dyn Stream<Item = Result<pb::PolicyEvent, Status>> + Send>>;

/// Labels of `mesh_registry_policy_watch_starts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchStartLabels {
    /// What the first event was: `full`, `incremental` or `current`.
    pub snapshot: &'static str,
}

/// The state of one watch stream after its first event.
struct Watcher {
    api: RegistryApi,
    events: broadcast::Receiver<Committed>,
    shutdown: watch::Receiver<bool>,
    /// The revision the node has been sent; committed events at or below it are skipped.
    last: u64,
    /// An error was sent; the stream ends.
    done: bool,
}

// === impl RegistryApi ===

impl RegistryApi {
    /// Nodes watch policy; operators and viewers may too (debugging, `meshctl get -w`).
    fn require_watcher(&self, peer: &PeerInfo) -> Result<Identity, Rejected> {
        match &peer.identity {
            Some(
                id @ (Identity::Node { trust_domain, .. }
                | Identity::Admin { trust_domain, .. }
                | Identity::Viewer { trust_domain, .. }),
            ) if *trust_domain == self.inner.config.trust_domain => Ok(id.clone()),
            Some(other) => Err(reject(
                "wrong_identity",
                Status::permission_denied(format!(
                    "{other} may not watch policy: a node, operator or viewer identity of this mesh is required"
                )),
            )),
            None => Err(reject(
                "unauthenticated",
                Status::unauthenticated("a node certificate is required"),
            )),
        }
    }

    pub(super) async fn do_watch_policy(
        &self,
        peer: &PeerInfo,
        req: pb::WatchPolicyRequest,
    ) -> Result<PolicyStream, Rejected> {
        let who = self.require_watcher(peer)?;
        // Subscribe before reading the store: a revision committed in between is then either
        // in the first event or delivered (and anything already sent is skipped by revision).
        let events = self.inner.policy.subscribe();
        let since = req.since_revision;
        let (kind, first) = self
            .blocking(move |s| {
                if since != 0 {
                    let (current, changes) = s.policy_changes_since(since)?;
                    if since == current {
                        return Ok(("current", event(current, false, Vec::new())));
                    }
                    if since < current {
                        return Ok(("incremental", event(current, false, changes)));
                    }
                    // The node is ahead of us (a restored or replaced registry): resync.
                }
                let (current, records) = s.list_policies()?;
                Ok(("full", event(current, true, records)))
            })
            .await?;
        self.inner
            .metrics
            .policy_watch_starts
            .get_or_create(&WatchStartLabels { snapshot: kind })
            .inc();
        info!(
            watcher = %who,
            src.addr = %peer.addr,
            since_revision = since,
            revision = first.revision,
            first_event = kind,
            resources = first.resources.len(),
            "policy watch started"
        );
        let watcher = Watcher {
            api: self.clone(),
            events,
            shutdown: self.inner.shutdown.clone(),
            last: first.revision,
            done: false,
        };
        let rest = stream::unfold(watcher, Watcher::next_event);
        Ok(Box::pin(stream::once(async { Ok(first) }).chain(rest)))
    }
}

// === impl Watcher ===

impl Watcher {
    /// The next event to send, or `None` to end the stream (drain, or the hub is gone).
    async fn next_event(mut self) -> Option<(Result<pb::PolicyEvent, Status>, Self)> {
        if self.done {
            return None;
        }
        loop {
            let received = tokio::select! {
                biased;
                _ = mesh_runtime::drain::until_true(&mut self.shutdown) => {
                    debug!("registry draining; ending policy watch");
                    return None;
                }
                received = self.events.recv() => received,
            };
            match received {
                Ok(committed) if committed.revision <= self.last => continue,
                Ok(committed) => {
                    self.last = committed.revision;
                    let records = committed.records.as_ref().clone();
                    return Some((Ok(event(committed.revision, false, records)), self));
                }
                Err(RecvError::Lagged(missed)) => {
                    warn!(
                        missed,
                        "policy watcher fell behind; sending a full snapshot"
                    );
                    // Start over from the newest event, subscribed before the read as at
                    // the start (the stale backlog would only make us lag again).
                    self.events = self.events.resubscribe();
                    let snapshot = self.api.blocking(|s| s.list_policies()).await;
                    return match snapshot {
                        Ok((revision, records)) => {
                            self.last = revision;
                            Some((Ok(event(revision, true, records)), self))
                        }
                        Err(rejected) => {
                            self.done = true;
                            Some((Err(rejected.status), self))
                        }
                    };
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

fn event(revision: u64, full_snapshot: bool, records: Vec<PolicyRecord>) -> pb::PolicyEvent {
    pb::PolicyEvent {
        revision,
        full_snapshot,
        resources: records.into_iter().map(resource_of).collect(),
    }
}

#[cfg(test)]
mod tests;
