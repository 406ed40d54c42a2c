//! Following the primary (a secondary site's registry): the primary's policy watch, opened with
//! viewer credentials it issued, assembled into the primary's set of operator resources and
//! applied to this store — one transaction per primary revision, through the same hub as an
//! apply, so this site's nodes get it from here and keep it when the sites are cut apart.
//! Registry-owned resources (Revocation, TrustBundle) stay this site's own; operators apply
//! policy at the primary (an apply here is refused, naming it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use mesh_api::policy::{Kind, Resource, Revocation};
use mesh_api::proto::v1 as pb;
use mesh_runtime::backoff::Backoff;
use tracing::{info, warn};

use super::{RegistryApi, unix};
use crate::config::{FollowConfig, PeerConfig};
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

/// What `GetNodeReports` says about importing the peers' revocations, by site.
#[derive(Debug, Default)]
pub(super) struct PeerStatuses(Mutex<BTreeMap<String, pb::PeerStatus>>);

impl PeerStatuses {
    pub(super) fn get(&self) -> Vec<pb::PeerStatus> {
        let all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.values().cloned().collect()
    }

    fn update(&self, peer: &PeerConfig, f: impl FnOnce(&mut pb::PeerStatus)) {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let s = all
            .entry(peer.site.to_string())
            .or_insert_with(|| pb::PeerStatus {
                site: peer.site.to_string(),
                address: peer.address.clone(),
                ..Default::default()
            });
        f(s);
    }

    /// Records a change between connected and not.
    fn connected(&self, peer: &PeerConfig, connected: bool, error: Option<String>) {
        self.update(peer, |s| {
            if s.connected != connected || s.since_unix == 0 {
                s.since_unix = unix(SystemTime::now());
            }
            s.connected = connected;
            match error {
                Some(e) => s.error = e,
                None => s.error.clear(),
            }
        });
    }
}

/// Waits `backoff`'s next delay before a watch is opened again; `false` when shutdown came
/// first.
async fn pause(shutdown: &mut tokio::sync::watch::Receiver<bool>, backoff: &mut Backoff) -> bool {
    tokio::select! {
        () = tokio::time::sleep(backoff.next_delay()) => true,
        _ = mesh_runtime::drain::until_true(shutdown) => false,
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
            if !pause(&mut shutdown, &mut backoff).await {
                return;
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
        let mut stream = match open(&cfg.primary, &cfg.credentials, mirror.revision).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        let mut pending = None;
        loop {
            let event = match next_event(&mut stream, &mut pending).await {
                Ok(e) => e,
                Err(e) => return e,
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

/// Opens the policy watch of the registry at `address` with the read-only credentials in
/// `credentials`, from `since`.
async fn open(
    address: &str,
    credentials: &Path,
    since: u64,
) -> Result<tonic::Streaming<pb::PolicyEvent>, String> {
    let client = mesh_client::credentials::Credentials::load(credentials)
        .and_then(|c| c.client(Some(address)))
        .map_err(|e| format!("credentials {}: {e:#}", credentials.display()))?;
    client.watch_policy(since).await.map_err(|e| e.to_string())
}

/// The next whole event of `stream`, or why the watch ended.
async fn next_event(
    stream: &mut tonic::Streaming<pb::PolicyEvent>,
    pending: &mut Option<Event>,
) -> Result<Event, String> {
    loop {
        let part = match stream.message().await {
            Ok(Some(p)) => p,
            Ok(None) => return Err("the registry ended the watch".to_owned()),
            Err(e) => return Err(e.to_string()),
        };
        if let Some(event) = assemble(pending, part) {
            return Ok(event);
        }
    }
}

/// A site's own Revocation (its spec JSON) as its watch events tell it; `None` before the
/// first event. Pure.
pub fn peer_revocation(current: Option<&str>, event: &Event) -> Option<String> {
    let own = event.resources.iter().rev().find(|r| {
        r.kind == Kind::Revocation.as_str() && r.name == mesh_api::policy::REVOCATION_NAME
    });
    match own {
        Some(r) if r.deleted => Some(EMPTY_REVOCATION.to_owned()),
        Some(r) => Some(r.spec_json.clone()),
        None if event.full => Some(EMPTY_REVOCATION.to_owned()),
        None => current.map(str::to_owned),
    }
}

/// A Revocation with nothing in it.
const EMPTY_REVOCATION: &str = r#"{"certificates":[],"nodes":[]}"#;

impl RegistryApi {
    /// Imports `peer`'s revocations until shutdown: its own Revocation, stored here as
    /// `Revocation/mesh-system/site-<site>` on every change, so this site's nodes refuse what
    /// that site revoked (and keep refusing it when the sites are cut apart).
    pub async fn import_revocations(self, peer: PeerConfig) {
        let mut shutdown = self.inner.shutdown.clone();
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        let mut imported: Option<String> = None;
        self.inner.peers.update(&peer, |_| {});
        loop {
            let ended = tokio::select! {
                e = self.import_once(&peer, &mut imported, &mut backoff) => e,
                _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
            };
            warn!(site = %peer.site, registry = %peer.address, error = %ended, "importing revocations: watch ended; the last imported stay in force");
            self.inner.peers.connected(&peer, false, Some(ended));
            if !pause(&mut shutdown, &mut backoff).await {
                return;
            }
        }
    }

    async fn import_once(
        &self,
        peer: &PeerConfig,
        imported: &mut Option<String>,
        backoff: &mut Backoff,
    ) -> String {
        let Some(key) = Revocation::site_key(&peer.site) else {
            return format!("site {:?} makes no resource name", peer.site.as_str());
        };
        // Always from a full snapshot: the peer's revision numbers are not this registry's.
        let mut stream = match open(&peer.address, &peer.credentials, 0).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        let mut pending = None;
        loop {
            let event = match next_event(&mut stream, &mut pending).await {
                Ok(e) => e,
                Err(e) => return e,
            };
            backoff.reset();
            let Some(spec) = peer_revocation(imported.as_deref(), &event) else {
                continue;
            };
            if imported.as_deref() == Some(spec.as_str()) {
                self.read_whole(peer);
                continue;
            }
            let name = key.name.to_string();
            if let Err(problems) = Resource::from_json("Revocation", "mesh-system", &name, &spec) {
                let first = problems
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                return format!(
                    "site {}'s Revocation cannot be read here: {first}",
                    peer.site
                );
            }
            let change = PolicyChange {
                kind: Kind::Revocation.as_str().to_owned(),
                namespace: key.namespace.to_string(),
                name,
                spec_json: Some(spec.clone()),
            };
            if let Err(e) = self.commit_as(format!("peer:{}", peer.site), change).await {
                return e;
            }
            info!(site = %peer.site, "imported the site's revocations");
            *imported = Some(spec);
            self.read_whole(peer);
        }
    }

    /// `peer`'s revocations, as this registry holds them, are its current ones.
    fn read_whole(&self, peer: &PeerConfig) {
        self.inner.peers.connected(peer, true, None);
        let now = unix(SystemTime::now());
        self.inner.peers.update(peer, |s| s.imported_unix = now);
    }

    /// Stores one change through the policy hub (watchers notified).
    async fn commit_as(&self, author: String, change: PolicyChange) -> Result<(), String> {
        let inner = self.inner.clone();
        self.blocking(move |store| {
            let now = unix(SystemTime::now());
            inner
                .policy
                .commit(store, &[change], &author, now, false, &inner.metrics)
                .map(|_| ())
        })
        .await
        .map_err(|e| e.status.message().to_owned())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
