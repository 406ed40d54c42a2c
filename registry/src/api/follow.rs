//! Following the primary (a secondary site's registry): the primary's policy watch, opened with
//! viewer credentials it issued, assembled into the primary's set of operator resources and
//! applied to this store — one transaction per primary revision, through the same hub as an
//! apply, so this site's nodes get it from here and keep it when the sites are cut apart.
//! Registry-owned resources (Revocation, TrustBundle) stay this site's own; operators apply
//! policy at the primary (an apply here is refused, naming it).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use mesh_api::policy::{Kind, Resource};
use mesh_api::proto::v1 as pb;
use mesh_runtime::backoff::Backoff;
use tracing::{info, warn};

use super::{RegistryApi, unix};
use crate::config::FollowConfig;
use crate::store::{PolicyChange, PolicyRecord};

/// First reconnect delay to the primary.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest reconnect delay to the primary.
pub const RETRY_MAX: Duration = Duration::from_secs(15);

/// A resource's key: kind, namespace, name.
pub type Key = (String, String, String);

/// The primary's operator resources as of `revision`, built from its watch events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// The primary's revision (0: nothing received).
    pub revision: u64,
    /// Spec JSON by key.
    pub resources: BTreeMap<Key, String>,
}

/// One whole watch event (its parts joined).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Event {
    /// The primary's revision.
    pub revision: u64,
    /// Replaces everything.
    pub full: bool,
    /// The resources (changes, or the whole set).
    pub resources: Vec<pb::Resource>,
}

/// Joins the parts of an event: `Some` once its last part arrived. A part of another revision
/// than the ones before starts over (the stream ended an event early). Pure.
pub fn assemble(pending: &mut Option<Event>, part: pb::PolicyEvent) -> Option<Event> {
    let same = pending
        .as_ref()
        .is_some_and(|p| p.revision == part.revision && p.full == part.full_snapshot);
    if !same {
        *pending = Some(Event {
            revision: part.revision,
            full: part.full_snapshot,
            resources: Vec::new(),
        });
    }
    let event = pending.as_mut()?;
    event.resources.extend(part.resources);
    if part.more { None } else { pending.take() }
}

impl Mirror {
    /// The mirror after `event`, or why the event cannot be taken (a resource this registry
    /// cannot read: the whole revision is refused and the previous one kept). Pure.
    pub fn apply(&self, event: &Event) -> Result<Mirror, String> {
        let mut next = if event.full {
            Mirror::default()
        } else {
            self.clone()
        };
        for r in &event.resources {
            let key = (r.kind.clone(), r.namespace.clone(), r.name.clone());
            if registry_owned(&r.kind) {
                continue;
            }
            if r.deleted {
                next.resources.remove(&key);
                continue;
            }
            if let Err(problems) = Resource::from_json(&r.kind, &r.namespace, &r.name, &r.spec_json)
            {
                let first = problems
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                return Err(format!(
                    "primary revision {}: {}/{}/{} cannot be read here ({first}); keeping revision {}",
                    event.revision, r.kind, r.namespace, r.name, self.revision
                ));
            }
            next.resources.insert(key, r.spec_json.clone());
        }
        next.revision = event.revision;
        Ok(next)
    }
}

fn registry_owned(kind: &str) -> bool {
    kind.parse::<Kind>().is_ok_and(Kind::is_registry_owned)
}

/// The changes that make this store's operator resources (`local`, current records) the
/// primary's (`mirror`): puts of what differs, deletions of what the primary does not have.
/// Registry-owned resources are never touched. Pure.
pub fn plan(local: &[PolicyRecord], mirror: &BTreeMap<Key, String>) -> Vec<PolicyChange> {
    let mut changes = Vec::new();
    let mut here: BTreeMap<Key, &str> = BTreeMap::new();
    for r in local
        .iter()
        .filter(|r| !r.deleted && !registry_owned(&r.kind))
    {
        here.insert(
            (r.kind.clone(), r.namespace.clone(), r.name.clone()),
            &r.spec_json,
        );
    }
    for (key, spec) in mirror {
        if here.get(key) != Some(&spec.as_str()) {
            changes.push(change(key, Some(spec.clone())));
        }
    }
    for key in here.keys().filter(|k| !mirror.contains_key(*k)) {
        changes.push(change(key, None));
    }
    changes
}

fn change((kind, namespace, name): &Key, spec_json: Option<String>) -> PolicyChange {
    PolicyChange {
        kind: kind.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
        spec_json,
    }
}

/// What `GetNodeReports` says about following.
#[derive(Debug, Default)]
pub(super) struct Status(Mutex<Option<pb::FollowStatus>>);

impl Status {
    pub(super) fn get(&self) -> Option<pb::FollowStatus> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut pb::FollowStatus)) {
        let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(s.get_or_insert_with(Default::default));
    }

    /// Records a change between connected and not.
    fn connected(&self, connected: bool, error: Option<String>) {
        self.update(|s| {
            if s.connected != connected || s.since_unix == 0 {
                s.since_unix = unix(SystemTime::now());
            }
            s.connected = connected;
            if let Some(e) = error {
                s.error = e;
            }
        });
    }
}

impl RegistryApi {
    /// Follows `cfg.primary` until shutdown: watch, apply each revision, reconnect with backoff.
    pub async fn follow(self, cfg: FollowConfig) {
        let status = &self.inner.follow;
        status.update(|s| s.primary = cfg.primary.clone());
        let mut shutdown = self.inner.shutdown.clone();
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        let mut mirror = Mirror::default();
        loop {
            let ended = tokio::select! {
                e = self.follow_once(&cfg, &mut mirror, &mut backoff) => e,
                _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
            };
            warn!(primary = %cfg.primary, error = %ended, revision = mirror.revision, "following the primary: watch ended; this site keeps enforcing what it has");
            status.connected(false, Some(ended));
            let delay = backoff.next_delay();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
            }
        }
    }

    /// One watch of the primary, until it ends; returns why.
    async fn follow_once(
        &self,
        cfg: &FollowConfig,
        mirror: &mut Mirror,
        backoff: &mut Backoff,
    ) -> String {
        let client = match mesh_client::credentials::Credentials::load(&cfg.credentials)
            .and_then(|c| c.client(Some(&cfg.primary)))
        {
            Ok(c) => c,
            Err(e) => return format!("follow.credentials {}: {e:#}", cfg.credentials.display()),
        };
        let mut stream = match client.watch_policy(mirror.revision).await {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        let mut pending = None;
        loop {
            let part = match stream.message().await {
                Ok(Some(p)) => p,
                Ok(None) => return "the primary ended the watch".to_owned(),
                Err(e) => return e.to_string(),
            };
            let Some(event) = assemble(&mut pending, part) else {
                continue;
            };
            let next = match mirror.apply(&event) {
                Ok(next) => next,
                Err(why) => return why,
            };
            if let Err(e) = self.take(&cfg.primary, &next).await {
                return e;
            }
            *mirror = next;
            backoff.reset();
            self.inner.follow.connected(true, None);
            self.inner.follow.update(|s| {
                s.primary_revision = mirror.revision;
                s.error.clear();
            });
        }
    }

    /// Makes this store hold `mirror`'s resources (one transaction, published to watchers).
    async fn take(&self, primary: &str, mirror: &Mirror) -> Result<(), String> {
        let inner = self.inner.clone();
        let resources = mirror.resources.clone();
        let author = format!("follow:{primary}@{}", mirror.revision);
        let revision = mirror.revision;
        let applied = self
            .blocking(move |store| {
                let (_, local) = store.list_policies()?;
                let changes = plan(&local, &resources);
                if changes.is_empty() {
                    return Ok(0);
                }
                let now = unix(SystemTime::now());
                let n = changes.len();
                inner
                    .policy
                    .commit(store, &changes, &author, now, false, &inner.metrics)?;
                Ok(n)
            })
            .await
            .map_err(|e| {
                format!(
                    "storing primary revision {revision}: {}",
                    e.status.message()
                )
            })?;
        if applied > 0 {
            info!(
                primary,
                primary_revision = revision,
                changed = applied,
                "following the primary: revision taken"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
