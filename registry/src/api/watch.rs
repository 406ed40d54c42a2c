//! `WatchPolicy`: a first event read from the store (a full snapshot, the changes since the
//! node's revision, or an empty "you are current"), then every revision committed after it,
//! until the node goes away or the registry drains.

use std::collections::VecDeque;
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
    /// Parts of an event not sent yet.
    pending: VecDeque<pb::PolicyEvent>,
    /// Most resource bytes per part.
    budget: usize,
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
                        return Ok(("current", (current, false, Vec::new())));
                    }
                    if since < current {
                        return Ok(("incremental", (current, false, changes)));
                    }
                    // The node is ahead of us (a restored or replaced registry): resync.
                }
                let (current, records) = s.list_policies()?;
                Ok(("full", (current, true, records)))
            })
            .await?;
        let budget = self.part_budget();
        let (revision, full, records) = first;
        let first = parts(revision, full, records, budget);
        self.inner
            .metrics
            .policy_watch_starts
            .get_or_create(&WatchStartLabels { snapshot: kind })
            .inc();
        info!(
            watcher = %who,
            src.addr = %peer.addr,
            since_revision = since,
            revision,
            first_event = kind,
            resources = first.iter().map(|p| p.resources.len()).sum::<usize>(),
            parts = first.len(),
            "policy watch started"
        );
        let watcher = Watcher {
            api: self.clone(),
            events,
            shutdown: self.inner.shutdown.clone(),
            last: revision,
            done: false,
            pending: VecDeque::new(),
            budget,
        };
        let rest = stream::unfold(watcher, Watcher::next_event);
        Ok(Box::pin(
            stream::iter(first.into_iter().map(Ok)).chain(rest),
        ))
    }

    /// Most bytes of resources in one event part: the response limit less room for the rest.
    fn part_budget(&self) -> usize {
        self.inner
            .config
            .max_response_message_size
            .saturating_sub(PART_MARGIN)
            .max(MIN_PART_BUDGET)
    }
}

/// Room left in a message for everything but the resources (field tags, revision, gRPC frame).
const PART_MARGIN: usize = 64 * 1024;
/// Smallest part budget, whatever the configured limit.
const MIN_PART_BUDGET: usize = 16 * 1024;

/// An event as the parts that carry it: consecutive runs of `records` of at most `budget`
/// encoded bytes each (a single larger resource gets a part of its own), `more` set on all
/// but the last. Always at least one part. Pure.
pub fn parts(
    revision: u64,
    full_snapshot: bool,
    records: Vec<PolicyRecord>,
    budget: usize,
) -> Vec<pb::PolicyEvent> {
    let part = |resources| pb::PolicyEvent {
        revision,
        full_snapshot,
        resources,
        more: true,
    };
    let mut out = Vec::new();
    let mut current: Vec<pb::Resource> = Vec::new();
    let mut size = 0usize;
    for r in records.into_iter().map(resource_of) {
        let len = prost::Message::encoded_len(&r) + 8;
        if !current.is_empty() && size + len > budget {
            out.push(part(std::mem::take(&mut current)));
            size = 0;
        }
        size += len;
        current.push(r);
    }
    out.push(part(current));
    if let Some(last) = out.last_mut() {
        last.more = false;
    }
    out
}

// === impl Watcher ===

impl Watcher {
    /// The next event to send, or `None` to end the stream (drain, or the hub is gone).
    async fn next_event(mut self) -> Option<(Result<pb::PolicyEvent, Status>, Self)> {
        if let Some(part) = self.pending.pop_front() {
            return Some((Ok(part), self));
        }
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
                    let parts = parts(committed.revision, false, records, self.budget);
                    return self.send(parts);
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
                            let parts = parts(revision, true, records, self.budget);
                            self.send(parts)
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

impl Watcher {
    /// Sends the first part now and queues the rest.
    fn send(
        mut self,
        parts: Vec<pb::PolicyEvent>,
    ) -> Option<(Result<pb::PolicyEvent, Status>, Self)> {
        self.pending.extend(parts);
        let first = self.pending.pop_front()?;
        Some((Ok(first), self))
    }
}

#[cfg(test)]
mod tests;
