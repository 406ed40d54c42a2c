//! Policy resources over the registry API: apply (validate every resource, canonicalise, one
//! store transaction, diffs), delete, get and history, and publishing each committed revision
//! to the watch streams (`watch.rs`) once it is durable.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use mesh_api::Identity;
use mesh_api::name::{DEFAULT_NAMESPACE, Label};
use mesh_api::policy::{Kind, ROOT_NAMESPACE, Resource};
use mesh_api::proto::v1 as pb;
use tokio::sync::broadcast;
use tonic::Status;
use tracing::info;

use super::diff::spec_diff;
use super::{Metrics, RegistryApi, Rejected, reject, store_error, unix};
use crate::server::PeerInfo;
use crate::store::{self, ChangeAction, PolicyChange, PolicyRecord, Store};

/// How many committed revisions a watcher may fall behind before it is resynced with a full
/// snapshot.
pub const WATCH_BUFFER: usize = 64;

/// A committed, durable revision as published to watchers: every record it changed.
#[derive(Debug, Clone)]
pub(super) struct Committed {
    pub(super) revision: u64,
    pub(super) records: Arc<Vec<PolicyRecord>>,
}

/// Orders policy writes and fans committed revisions out to watchers.
pub(super) struct PolicyHub {
    /// Held (on a blocking thread) from the store write until the event is published, so
    /// events go out in revision order (a watcher skips anything at or below the revision it
    /// last sent, so an event published late would be lost to it).
    write_lock: Mutex<()>,
    events: broadcast::Sender<Committed>,
}

// === impl PolicyHub ===

impl PolicyHub {
    pub(super) fn new() -> Self {
        Self {
            write_lock: Mutex::new(()),
            events: broadcast::channel(WATCH_BUFFER).0,
        }
    }

    /// A receiver of every revision committed from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<Committed> {
        self.events.subscribe()
    }

    /// Applies `changes` to `store` and, once that returned (durable) with a new revision,
    /// publishes it. Blocks: call from a blocking thread.
    pub(super) fn commit(
        &self,
        store: &dyn Store,
        changes: &[PolicyChange],
        author: &str,
        now_unix: i64,
        dry_run: bool,
        metrics: &Metrics,
    ) -> Result<store::ApplyOutcome, store::Error> {
        let _ordered = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (revision, outcomes) = store.apply_policies(changes, author, now_unix, dry_run)?;
        if dry_run || !outcomes.iter().any(|(action, _)| changed(*action)) {
            return Ok((revision, outcomes));
        }
        let records: Vec<PolicyRecord> = changes
            .iter()
            .zip(&outcomes)
            .filter(|(_, (action, _))| changed(*action))
            .map(|(c, _)| PolicyRecord {
                kind: c.kind.clone(),
                namespace: c.namespace.clone(),
                name: c.name.clone(),
                spec_json: c.spec_json.clone().unwrap_or_default(),
                revision,
                author: author.to_owned(),
                updated_unix: now_unix,
                deleted: c.spec_json.is_none(),
            })
            .collect();
        metrics.policy_revision.set(revision as i64);
        info!(
            revision,
            by = author,
            changed = ?records.iter().map(display_record).collect::<Vec<_>>(),
            "policy revision committed"
        );
        // No receivers is fine: there is nobody to tell.
        let _ = self.events.send(Committed {
            revision,
            records: Arc::new(records),
        });
        Ok((revision, outcomes))
    }
}

// === impl RegistryApi ===

impl RegistryApi {
    /// A secondary site's registry takes policy from its primary only: an apply or delete here
    /// would be undone by the next revision of the primary.
    fn refuse_if_following(&self) -> Result<(), Rejected> {
        match &self.inner.config.follow {
            Some(f) => Err(reject(
                "following",
                Status::failed_precondition(format!(
                    "this registry follows {} for policy; apply and delete there (meshctl --registry {})",
                    f.primary, f.primary
                )),
            )),
            None => Ok(()),
        }
    }

    /// Operators and viewers may read policy.
    pub(super) fn require_reader(&self, peer: &PeerInfo) -> Result<Identity, Rejected> {
        match &peer.identity {
            Some(
                id @ (Identity::Admin { trust_domain, .. } | Identity::Viewer { trust_domain, .. }),
            ) if *trust_domain == self.inner.config.trust_domain => Ok(id.clone()),
            _ => self.require_admin(peer),
        }
    }

    pub(super) async fn do_apply(
        &self,
        peer: &PeerInfo,
        req: pb::ApplyRequest,
    ) -> Result<pb::ApplyResponse, Rejected> {
        let admin = self.require_admin(peer)?;
        self.refuse_if_following()?;
        let changes = validate_apply(&req.resources).map_err(|problems| {
            reject(
                "invalid_policy",
                Status::invalid_argument(format!(
                    "nothing applied: {} problem(s):\n{}",
                    problems.len(),
                    problems.join("\n")
                )),
            )
        })?;
        let (revision, outcomes) = self.commit(changes.clone(), &admin, req.dry_run).await?;
        let resp = pb::ApplyResponse {
            revision,
            changes: changes
                .iter()
                .zip(&outcomes)
                .map(|(c, (action, previous))| change_of(c, *action, previous.as_deref()))
                .collect(),
        };
        Ok(fit_apply_response(
            resp,
            self.inner.config.max_response_message_size,
        ))
    }
}

/// One page of `resources` (sorted by kind, namespace, name): those after `token` (the
/// `kind/namespace/name` of the last one sent) that fit `budget` encoded bytes (at least one),
/// and the token of the next page (empty on the last). Pure.
pub fn resource_page(
    resources: Vec<pb::Resource>,
    token: &str,
    budget: usize,
) -> (Vec<pb::Resource>, String) {
    let key = |r: &pb::Resource| format!("{}/{}/{}", r.kind, r.namespace, r.name);
    let after = |r: &pb::Resource| {
        token.is_empty() || (r.kind.as_str(), r.namespace.as_str(), r.name.as_str()) > split3(token)
    };
    let mut page = Vec::new();
    let mut size = 0usize;
    let mut rest = resources.into_iter().filter(after).peekable();
    while let Some(r) = rest.peek() {
        let len = prost::Message::encoded_len(r) + 8;
        if !page.is_empty() && size + len > budget {
            break;
        }
        size += len;
        page.extend(rest.next());
    }
    let next = match (rest.peek(), page.last()) {
        (Some(_), Some(last)) => key(last),
        _ => String::new(),
    };
    (page, next)
}

/// `kind/namespace/name` split in three (a malformed token sorts before everything).
fn split3(token: &str) -> (&str, &str, &str) {
    let mut it = token.splitn(3, '/');
    (
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
    )
}

/// Placeholder of a diff left out of an apply's answer to keep it within one message.
pub const DIFF_OMITTED: &str =
    "(diff omitted: the whole answer would exceed max_response_message_size)";

/// An apply's answer that fits `limit` bytes: the change is committed by now, so an answer too
/// large to send would tell the operator it failed when it did not. Diffs go first. Pure.
pub fn fit_apply_response(mut resp: pb::ApplyResponse, limit: usize) -> pb::ApplyResponse {
    // Room for the gRPC frame and the status.
    let budget = limit.saturating_sub(1024);
    if prost::Message::encoded_len(&resp) > budget {
        for c in &mut resp.changes {
            if !c.diff.is_empty() {
                c.diff = DIFF_OMITTED.to_owned();
            }
        }
    }
    resp
}

impl RegistryApi {
    pub(super) async fn do_delete_resource(
        &self,
        peer: &PeerInfo,
        req: pb::DeleteResourceRequest,
    ) -> Result<pb::ApplyResponse, Rejected> {
        let admin = self.require_admin(peer)?;
        self.refuse_if_following()?;
        let (kind, namespace, name) = resource_key(&req.kind, &req.namespace, &req.name)
            .map_err(|e| reject("bad_request", Status::invalid_argument(e)))?;
        if kind.parse::<Kind>().is_ok_and(Kind::is_registry_owned) {
            return Err(reject(
                "registry_owned",
                Status::permission_denied(registry_owned(&format!("{kind}/{namespace}/{name}"))),
            ));
        }
        let change = PolicyChange {
            kind,
            namespace,
            name,
            spec_json: None,
        };
        let (revision, outcomes) = self
            .commit(vec![change.clone()], &admin, req.dry_run)
            .await?;
        let (action, previous) = outcomes
            .into_iter()
            .next()
            .expect("the store reports one outcome per change");
        if action == ChangeAction::NotFound {
            return Err(reject(
                "not_found",
                Status::not_found(format!("{} not found", display_key(&change))),
            ));
        }
        Ok(pb::ApplyResponse {
            revision,
            changes: vec![change_of(&change, action, previous.as_deref())],
        })
    }

    pub(super) async fn do_get_resources(
        &self,
        peer: &PeerInfo,
        mut req: pb::GetResourcesRequest,
    ) -> Result<pb::GetResourcesResponse, Rejected> {
        self.require_reader(peer)?;
        if !req.kind.is_empty() {
            req.kind = canonical_kind(&req.kind)
                .map_err(|e| reject("bad_request", Status::invalid_argument(e)))?;
        }
        let (revision, records) = self.blocking(|s| s.list_policies()).await?;
        let matching: Vec<pb::Resource> = records
            .into_iter()
            .filter(|r| matches_filter(&req, r))
            .map(resource_of)
            .collect();
        let budget = self
            .inner
            .config
            .max_response_message_size
            .saturating_sub(64 * 1024)
            .max(16 * 1024);
        let (resources, next_page_token) = resource_page(matching, &req.page_token, budget);
        Ok(pb::GetResourcesResponse {
            revision,
            resources,
            next_page_token,
        })
    }

    pub(super) async fn do_history(
        &self,
        peer: &PeerInfo,
        req: pb::HistoryRequest,
    ) -> Result<pb::HistoryResponse, Rejected> {
        self.require_reader(peer)?;
        let (kind, namespace, name) = resource_key(&req.kind, &req.namespace, &req.name)
            .map_err(|e| reject("bad_request", Status::invalid_argument(e)))?;
        let versions = self
            .blocking(move |s| s.policy_history(&kind, &namespace, &name))
            .await?;
        Ok(pb::HistoryResponse {
            versions: versions.into_iter().map(resource_of).collect(),
        })
    }

    /// Writes `changes` (durably) and then publishes the new revision, if there is one, to
    /// watchers; a dry run only computes the outcome. Write and publish run together on a
    /// blocking thread, so a caller hanging up mid-call cannot leave a committed revision
    /// unpublished (watchers would skip it).
    async fn commit(
        &self,
        changes: Vec<PolicyChange>,
        author: &Identity,
        dry_run: bool,
    ) -> Result<store::ApplyOutcome, Rejected> {
        let inner = self.inner.clone();
        let author = author.to_string();
        let now = unix(SystemTime::now());
        self.blocking(move |store| {
            Ok(inner
                .policy
                .commit(store, &changes, &author, now, dry_run, &inner.metrics))
        })
        .await?
        .map_err(|e| match e {
            store::Error::DuplicatePolicyChange { .. } => {
                reject("invalid_policy", Status::invalid_argument(e.to_string()))
            }
            other => store_error(other),
        })
    }
}

/// Validates every resource of an apply and returns the changes under their canonical keys
/// (kind aliases resolved, empty namespace defaulted) with canonical spec JSON, or every
/// problem found (one line each) so nothing is half-applied.
pub fn validate_apply(resources: &[pb::Resource]) -> Result<Vec<PolicyChange>, Vec<String>> {
    if resources.is_empty() {
        return Err(vec!["the request has no resources to apply".to_owned()]);
    }
    let mut problems = Vec::new();
    let mut changes = Vec::with_capacity(resources.len());
    let mut seen = HashSet::new();
    for r in resources {
        match Resource::from_json(&r.kind, &r.namespace, &r.name, &r.spec_json) {
            Ok(resource) if resource.key.kind.is_registry_owned() => {
                problems.push(registry_owned(&resource.key.to_string()));
            }
            Ok(resource) if !seen.insert(resource.key.clone()) => problems.push(format!(
                "{}: appears more than once in this apply",
                resource.key
            )),
            Ok(resource) => changes.push(PolicyChange {
                kind: resource.key.kind.as_str().to_owned(),
                namespace: resource.key.namespace.to_string(),
                name: resource.key.name.to_string(),
                spec_json: Some(resource.spec_json()),
            }),
            Err(found) => problems.extend(found.iter().map(ToString::to_string)),
        }
    }
    if problems.is_empty() {
        Ok(changes)
    } else {
        Err(problems)
    }
}

/// Why an operator may not write the deny-list directly.
fn registry_owned(key: &str) -> String {
    format!(
        "{key}: written by the registry only (the deny-list: use `meshctl node remove` or `meshctl cert revoke`; the trust bundle: `mesh-registry ca rotate-root`)"
    )
}

/// The canonical key of a named resource (for delete and history), as [`validate_apply`]
/// stores it: the kind's canonical name and an empty namespace defaulted the same way.
pub fn resource_key(
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<(String, String, String), String> {
    let kind = canonical_kind(kind)?;
    let namespace = match namespace {
        "" if kind.parse::<Kind>().is_ok_and(Kind::is_mesh_wide) => ROOT_NAMESPACE,
        "" => DEFAULT_NAMESPACE,
        ns => ns,
    };
    let label = |what: &str, value: &str| {
        Label::new(value)
            .map(|l| l.to_string())
            .map_err(|e| format!("{what} {value:?}: {e}"))
    };
    Ok((kind, label("namespace", namespace)?, label("name", name)?))
}

/// A kind's canonical name (`routes` → `Route`), or why it is not a kind.
fn canonical_kind(kind: &str) -> Result<String, String> {
    kind.parse::<Kind>()
        .map(|k| k.as_str().to_owned())
        .map_err(|e| e.to_string())
}

fn changed(action: ChangeAction) -> bool {
    matches!(
        action,
        ChangeAction::Created | ChangeAction::Updated | ChangeAction::Deleted
    )
}

/// The wire name of an action.
pub fn action_name(action: ChangeAction) -> &'static str {
    match action {
        ChangeAction::Created => "created",
        ChangeAction::Updated => "updated",
        ChangeAction::Unchanged => "unchanged",
        ChangeAction::Deleted => "deleted",
        ChangeAction::NotFound => "not_found",
    }
}

fn change_of(c: &PolicyChange, action: ChangeAction, previous: Option<&str>) -> pb::Change {
    let new = match action {
        ChangeAction::Deleted | ChangeAction::NotFound => None,
        _ => c.spec_json.as_deref(),
    };
    pb::Change {
        kind: c.kind.clone(),
        namespace: c.namespace.clone(),
        name: c.name.clone(),
        action: action_name(action).to_owned(),
        diff: spec_diff(previous, new),
    }
}

/// Whether `r` passes a get filter (an empty field matches everything).
fn matches_filter(req: &pb::GetResourcesRequest, r: &PolicyRecord) -> bool {
    let matches = |want: &str, have: &str| want.is_empty() || want == have;
    matches(&req.kind, &r.kind)
        && matches(&req.namespace, &r.namespace)
        && matches(&req.name, &r.name)
}

pub(super) fn resource_of(r: PolicyRecord) -> pb::Resource {
    pb::Resource {
        kind: r.kind,
        namespace: r.namespace,
        name: r.name,
        spec_json: r.spec_json,
        revision: r.revision,
        author: r.author,
        updated_unix: r.updated_unix,
        deleted: r.deleted,
    }
}

/// `Kind/namespace/name`, as the policy model displays a resource key.
fn display_key(c: &PolicyChange) -> String {
    format!("{}/{}/{}", c.kind, c.namespace, c.name)
}

fn display_record(r: &PolicyRecord) -> String {
    format!("{}/{}/{}", r.kind, r.namespace, r.name)
}

#[cfg(test)]
mod fit_tests {
    use super::*;

    #[test]
    fn resource_pages_cover_every_resource_once() {
        let all: Vec<pb::Resource> = (0..60)
            .map(|i| pb::Resource {
                kind: if i < 30 {
                    "AuthorizationPolicy"
                } else {
                    "Route"
                }
                .into(),
                namespace: format!("ns{}", i % 3),
                name: format!("r{i:02}"),
                spec_json: "x".repeat(500),
                ..Default::default()
            })
            .collect();
        let mut sorted = all;
        sorted.sort_by(|a, b| {
            (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name))
        });
        let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let (page, next) = resource_page(sorted.clone(), &token, 4_000);
            assert!(!page.is_empty());
            pages += 1;
            seen.extend(page.into_iter().map(|r| r.name));
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert!(pages > 5, "{pages}");
        assert_eq!(
            seen,
            sorted.iter().map(|r| r.name.clone()).collect::<Vec<_>>()
        );
        let (one, next) = resource_page(sorted.clone(), "", usize::MAX);
        assert_eq!((one.len(), next.as_str()), (60, ""));
    }

    #[test]
    fn an_answer_too_large_loses_its_diffs_not_its_changes() {
        let change = |i: usize| pb::Change {
            kind: "Route".into(),
            namespace: "shop".into(),
            name: format!("r{i}"),
            action: "updated".into(),
            diff: "x".repeat(2_000),
        };
        let resp = pb::ApplyResponse {
            revision: 9,
            changes: (0..100).map(change).collect(),
        };
        let small = fit_apply_response(resp.clone(), 4 * 1024 * 1024);
        assert_eq!(small, resp, "what fits is untouched");
        let fitted = fit_apply_response(resp, 64 * 1024);
        assert_eq!(fitted.changes.len(), 100);
        assert!(fitted.changes.iter().all(|c| c.diff == DIFF_OMITTED));
        assert!(prost::Message::encoded_len(&fitted) < 64 * 1024);
    }
}

#[cfg(test)]
mod tests;
