//! Revocation: removing nodes, revoking certificates, issuing and listing operator credentials,
//! and the deny-list every call and watch stream is checked against.
//!
//! The deny-list is the policy resource `Revocation/mesh-system/revocations`, written only
//! here, through the same commit as policy (durable, versioned, pushed to every node on the
//! policy watch). [`Revocations`] keeps the registry's compiled copy; edits are serialised by
//! its lock, which signing also takes around "record the certificate, check the node was not
//! removed", so a certificate signed while its node is being removed is either revoked with it
//! or never handed out.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt as _};
use mesh_api::policy::{
    DenyList, Kind, REVOCATION_NAME, ROOT_NAMESPACE, Resource, Revocation, RevokedCert, Spec,
};
use mesh_api::proto::v1 as pb;
use mesh_api::{Identity, Label, NodeName, ServiceKey};
use mesh_ca::SignRequest;
use tokio::sync::watch;
use tonic::Status;
use tracing::{info, warn};

use super::{RegistryApi, Rejected, quoted, reject, unix};
use crate::server::PeerInfo;
use crate::store::{self, CertRecord, PolicyChange, Store};

/// Longest lifetime of operator credentials (also the default, as `mesh-registry init`'s).
pub const MAX_CREDENTIAL_TTL: Duration = crate::init::DEFAULT_ADMIN_CERT_TTL;

/// How often expired certificates are pruned from the deny-list.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3_600);

/// The registry's copy of the deny-list and the lock that orders its edits.
pub(super) struct Revocations {
    edit: Mutex<()>,
    current: watch::Sender<Arc<State>>,
}

/// One version of the deny-list: as stored, and compiled for lookups.
#[derive(Debug, Default)]
pub struct State {
    /// The resource's spec.
    pub spec: Revocation,
    /// Compiled from `spec`.
    pub deny: DenyList,
}

/// Which certificates a `RevokeCertificates` call names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// One serial (canonical hex).
    Serial(String),
    /// Every certificate issued to a node.
    Node(String),
    /// Every workload certificate of a service (its SPIFFE id).
    Service(String),
    /// Every certificate of an operator identity (its SPIFFE id).
    Operator(String),
}

// === impl State ===

impl State {
    fn new(spec: Revocation) -> Self {
        let deny = spec.deny_list();
        Self { spec, deny }
    }
}

// === impl Revocations ===

impl Revocations {
    /// Reads the stored deny-list (empty in a store that never had one).
    pub(super) fn load(store: &dyn Store) -> Result<Self, store::Error> {
        let (_, records) = store.list_policies()?;
        let spec = records
            .iter()
            .find(|r| r.kind == Kind::Revocation.as_str())
            .and_then(|r| {
                match Resource::from_json(&r.kind, &r.namespace, &r.name, &r.spec_json) {
                    Ok(Resource {
                        spec: Spec::Revocation(spec),
                        ..
                    }) => Some(spec),
                    Ok(_) => None,
                    Err(problems) => {
                        // Written by this registry only, so this is disk corruption: refusing
                        // to start would stop renewals mesh-wide; say so loudly instead.
                        warn!(
                            ?problems,
                            "stored deny-list is unreadable; starting without it"
                        );
                        None
                    }
                }
            })
            .unwrap_or_default();
        Ok(Self {
            edit: Mutex::new(()),
            current: watch::channel(Arc::new(State::new(spec))).0,
        })
    }

    /// The current deny-list.
    pub(super) fn current(&self) -> Arc<State> {
        self.current.borrow().clone()
    }

    /// A receiver of every new deny-list.
    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.current.subscribe()
    }

    /// Whether the certificate `serial` is revoked.
    pub(super) fn denies(&self, serial: &str) -> bool {
        self.current.borrow().deny.denies_serial(serial)
    }
}

/// The certificates of `certs` that `selector` names and that are still valid at `now_unix`
/// (an expired certificate is refused by every TLS peer anyway).
pub fn select(certs: &[CertRecord], selector: &Selector, now_unix: i64) -> Vec<RevokedCert> {
    certs
        .iter()
        .filter(|c| c.not_after_unix > now_unix)
        .filter(|c| match selector {
            Selector::Serial(s) => c.serial == *s,
            Selector::Node(n) => c.node == *n,
            Selector::Service(id) | Selector::Operator(id) => c.identity == *id,
        })
        .map(|c| RevokedCert {
            serial: c.serial.clone(),
            not_after: c.not_after_unix,
            identity: c.identity.clone(),
            node: c.node.clone(),
            revoked_unix: now_unix,
        })
        .collect()
}

/// The certificate record of operator credentials (no node).
pub(crate) fn credential_record(issued: &mesh_ca::Issued, now: SystemTime) -> CertRecord {
    CertRecord {
        serial: issued.serial.clone(),
        identity: issued.identity.to_string(),
        node: String::new(),
        issued_unix: unix(now),
        not_before_unix: unix(issued.not_before),
        not_after_unix: unix(issued.not_after),
    }
}

fn revoked_pb(c: &RevokedCert) -> pb::RevokedCertificate {
    pb::RevokedCertificate {
        serial: c.serial.clone(),
        identity: c.identity.clone(),
        node: c.node.clone(),
        not_after_unix: c.not_after,
    }
}

fn is_operator(identity: &str) -> bool {
    matches!(
        Identity::parse(identity),
        Ok(Identity::Admin { .. } | Identity::Viewer { .. })
    )
}

// === impl RegistryApi ===

impl RegistryApi {
    /// Commits `next` as the deny-list (durable, pushed to watchers) and makes it current.
    /// Call with the edit lock held, on a blocking thread.
    fn commit_revocation(
        &self,
        store: &dyn Store,
        next: Revocation,
        author: &str,
        now_unix: i64,
    ) -> Result<u64, store::Error> {
        let spec_json = Resource {
            key: Revocation::key(),
            spec: Spec::Revocation(next.clone()),
        }
        .spec_json();
        let change = PolicyChange {
            kind: Kind::Revocation.as_str().to_owned(),
            namespace: ROOT_NAMESPACE.to_owned(),
            name: REVOCATION_NAME.to_owned(),
            spec_json: Some(spec_json),
        };
        let (revision, _) = self.inner.policy.commit(
            store,
            &[change],
            author,
            now_unix,
            false,
            &self.inner.metrics,
        )?;
        let (certs, nodes) = (next.certificates.len(), next.nodes.len());
        self.inner
            .revocations
            .current
            .send_replace(Arc::new(State::new(next)));
        self.inner
            .metrics
            .revoked_certificates
            .set(i64::try_from(certs).unwrap_or(i64::MAX));
        self.inner
            .metrics
            .removed_nodes
            .set(i64::try_from(nodes).unwrap_or(i64::MAX));
        Ok(revision)
    }

    /// Edits the deny-list with `f` (which sees the store) under the edit lock and commits it
    /// when `f` changed it. Returns `f`'s value and the revision carrying the result.
    async fn edit_revocation<T: Send + 'static>(
        &self,
        author: String,
        f: impl FnOnce(&dyn Store, &mut Revocation) -> Result<T, store::Error> + Send + 'static,
    ) -> Result<(T, u64), Rejected> {
        self.edit_revocation_then(author, f, |_, out| Ok(out)).await
    }

    /// As [`Self::edit_revocation`], then `then` under the same lock once the deny-list is
    /// durable: what must not happen unless the denial did (a failed commit leaves it undone).
    async fn edit_revocation_then<T: Send + 'static, U: Send + 'static>(
        &self,
        author: String,
        f: impl FnOnce(&dyn Store, &mut Revocation) -> Result<T, store::Error> + Send + 'static,
        then: impl FnOnce(&dyn Store, T) -> Result<U, store::Error> + Send + 'static,
    ) -> Result<(U, u64), Rejected> {
        let api = self.clone();
        let now = unix(SystemTime::now());
        self.blocking(move |store| {
            let hub = &api.inner.revocations;
            let _g = hub.edit.lock().unwrap_or_else(PoisonError::into_inner);
            let before = hub.current().spec.clone();
            let mut next = before.clone();
            let out = f(store, &mut next)?;
            let revision = if next == before {
                store.policy_revision()?
            } else {
                api.commit_revocation(store, next, &author, now)?
            };
            Ok((then(store, out)?, revision))
        })
        .await
    }

    pub(super) async fn do_remove_node(
        &self,
        peer: &PeerInfo,
        req: pb::RemoveNodeRequest,
    ) -> Result<pb::RevocationResponse, Rejected> {
        let admin = self.require_admin(peer)?;
        let name = NodeName::new(&req.name).map_err(|e| {
            reject(
                "bad_request",
                Status::invalid_argument(format!("node name {}: {e}", quoted(&req.name))),
            )
        })?;
        let now = unix(SystemTime::now());
        let (key, node) = (name.to_string(), name.clone());
        let name_key = key.clone();
        let ((revoked, registered), revision) = self
            .edit_revocation_then(
                admin.to_string(),
                move |store, next| {
                    let certs = store.list_certs(0)?;
                    let revoked = select(&certs, &Selector::Node(key.clone()), now);
                    next.add_certs(revoked.clone());
                    next.add_node(node, now);
                    Ok(revoked)
                },
                // Deleted under the lock, after the deny-list is durable: from here renewals
                // fail on both counts. A failed commit leaves the node registered and its
                // certificates valid, as the operator's error says, for a retry to finish.
                move |store, revoked| {
                    let registered = store.delete_node(&name_key)?.is_some();
                    Ok((revoked, registered))
                },
            )
            .await?;
        self.inner.reports.forget(name.as_str());
        info!(
            node = %name,
            by = %admin,
            revoked = revoked.len(),
            registered,
            revision,
            "node removed"
        );
        Ok(pb::RevocationResponse {
            revision,
            revoked: revoked.iter().map(revoked_pb).collect(),
            node_removed: registered,
        })
    }

    pub(super) async fn do_revoke_certificates(
        &self,
        peer: &PeerInfo,
        req: pb::RevokeCertificatesRequest,
    ) -> Result<pb::RevocationResponse, Rejected> {
        let admin = self.require_admin(peer)?;
        let selector = self.selector(&req)?;
        let now = unix(SystemTime::now());
        let own = peer.serial.clone();
        let sel = selector.clone();
        let (revoked, revision) = self
            .edit_revocation(admin.to_string(), move |store, next| {
                let found = select(&store.list_certs(0)?, &sel, now);
                if own
                    .as_ref()
                    .is_some_and(|s| found.iter().any(|c| c.serial == *s))
                {
                    return Ok(Err(()));
                }
                let listed = next.deny_list();
                let fresh: Vec<RevokedCert> = found
                    .into_iter()
                    .filter(|c| !listed.denies_serial(&c.serial))
                    .collect();
                next.add_certs(fresh.clone());
                Ok(Ok(fresh))
            })
            .await?;
        let revoked = revoked.map_err(|()| {
            reject(
                "own_credentials",
                Status::failed_precondition(
                    "that would revoke the credentials making this call; revoke them with other operator credentials",
                ),
            )
        })?;
        if let Selector::Serial(serial) = &selector
            && revoked.is_empty()
            && !self.inner.revocations.denies(serial)
        {
            return Err(reject(
                "not_found",
                Status::not_found(format!(
                    "no unexpired certificate with serial {serial} was issued by this registry"
                )),
            ));
        }
        info!(by = %admin, ?selector, revoked = revoked.len(), revision, "certificates revoked");
        Ok(pb::RevocationResponse {
            revision,
            revoked: revoked.iter().map(revoked_pb).collect(),
            node_removed: false,
        })
    }

    /// The one selector a `RevokeCertificates` request sets, validated.
    fn selector(&self, req: &pb::RevokeCertificatesRequest) -> Result<Selector, Rejected> {
        let bad = |msg: String| reject("bad_request", Status::invalid_argument(msg));
        let set = [&req.serial, &req.node, &req.service, &req.identity]
            .iter()
            .filter(|s| !s.is_empty())
            .count();
        if set != 1 {
            return Err(bad(format!(
                "name exactly one of serial, node, service, identity ({set} given)"
            )));
        }
        let td = &self.inner.config.trust_domain;
        if !req.serial.is_empty() {
            return mesh_api::policy::revocation::canonical_serial(&req.serial)
                .map(Selector::Serial)
                .ok_or_else(|| {
                    bad(format!(
                        "serial {}: expected hex digits (colons allowed), at most 40",
                        quoted(&req.serial)
                    ))
                });
        }
        if !req.node.is_empty() {
            return NodeName::new(&req.node)
                .map(|n| Selector::Node(n.to_string()))
                .map_err(|e| bad(format!("node {}: {e}", quoted(&req.node))));
        }
        if !req.service.is_empty() {
            return ServiceKey::parse(&req.service)
                .map(|s| Selector::Service(Identity::workload(td, &s).to_string()))
                .map_err(|e| {
                    bad(format!(
                        "service {}: {e} (expected namespace/name)",
                        quoted(&req.service)
                    ))
                });
        }
        operator_identity(td, &req.identity)
            .map(|id| Selector::Operator(id.to_string()))
            .map_err(bad)
    }

    pub(super) async fn do_issue_credentials(
        &self,
        peer: &PeerInfo,
        req: pb::IssueCredentialsRequest,
    ) -> Result<pb::CertificateResponse, Rejected> {
        let admin = self.require_admin(peer)?;
        let bad = |msg: String| reject("bad_request", Status::invalid_argument(msg));
        let td = &self.inner.config.trust_domain;
        let identity = operator_identity(td, &format!("{}/{}", req.role, req.name)).map_err(bad)?;
        let ttl = match req.ttl_seconds {
            0 => MAX_CREDENTIAL_TTL,
            s if Duration::from_secs(s) > MAX_CREDENTIAL_TTL => {
                return Err(bad(format!(
                    "ttl_seconds {s} is longer than the limit of {} (one year)",
                    MAX_CREDENTIAL_TTL.as_secs()
                )));
            }
            s => Duration::from_secs(s.max(60)),
        };
        let now = SystemTime::now();
        let issued = self
            .inner
            .ca
            .current()
            .sign_csr(
                &req.csr_pem,
                &SignRequest {
                    identity,
                    dns_names: Vec::new(),
                    ttl,
                    now,
                },
            )
            .map_err(|e| {
                reject(
                    "bad_csr",
                    Status::invalid_argument(format!("certificate request refused: {e}")),
                )
            })?;
        self.inner.metrics.issued.inc();
        let record = credential_record(&issued, now);
        self.blocking(move |s| s.put_cert(&record)).await?;
        info!(by = %admin, identity = %issued.identity, serial = %issued.serial, "operator credentials issued");
        Ok(self.cert_response(&issued))
    }

    pub(super) async fn do_list_credentials(
        &self,
        peer: &PeerInfo,
    ) -> Result<pb::ListCredentialsResponse, Rejected> {
        self.require_reader(peer)?;
        let certs = self.blocking(|s| s.list_certs(0)).await?;
        let deny = self.inner.revocations.current();
        Ok(pb::ListCredentialsResponse {
            credentials: certs
                .into_iter()
                .filter(|c| is_operator(&c.identity))
                .map(|c| pb::Credential {
                    revoked: deny.deny.denies_serial(&c.serial),
                    serial: c.serial,
                    identity: c.identity,
                    not_before_unix: c.not_before_unix,
                    not_after_unix: c.not_after_unix,
                })
                .collect(),
        })
    }

    /// Drops expired certificates from the deny-list (a new revision only when any expired).
    pub async fn prune_revocations(&self) {
        self.prune_revocations_at(unix(SystemTime::now())).await;
    }

    /// [`RegistryApi::prune_revocations`] as of `now` (Unix seconds).
    pub(super) async fn prune_revocations_at(&self, now: i64) {
        let r = self
            .edit_revocation("registry".to_owned(), move |_, next| Ok(next.prune(now)))
            .await;
        match r {
            Ok((0, _)) => {}
            Ok((pruned, revision)) => info!(
                pruned,
                revision, "expired certificates pruned from the deny-list"
            ),
            Err(e) => warn!(error = %e.status.message(), "pruning the deny-list failed"),
        }
    }

    /// After a certificate for node `name` was recorded: refuses it (and revokes it) if the
    /// node was removed meanwhile. Runs under the edit lock, so a removal either listed the
    /// record or is visible here.
    pub(super) async fn record_issued(
        &self,
        name: &NodeName,
        cert: CertRecord,
    ) -> Result<(), Rejected> {
        let key = name.to_string();
        let removed = self
            .edit_revocation("registry".to_owned(), move |store, next| {
                store.put_cert(&cert)?;
                if !next.is_removed(&key) && store.get_node(&key)?.is_some() {
                    return Ok(false);
                }
                let serial = Selector::Serial(cert.serial.clone());
                next.add_certs(select(std::slice::from_ref(&cert), &serial, 0));
                Ok(true)
            })
            .await?
            .0;
        if removed {
            return Err(reject(
                "node_removed",
                Status::permission_denied(format!("node {name} was removed from the mesh")),
            ));
        }
        Ok(())
    }

    /// A join under `name` is allowed to lift its removal only with a token made to replace
    /// it; a successful one readmits the name.
    pub(super) fn check_removed_join(
        &self,
        name: &NodeName,
        replace: Option<&str>,
    ) -> Result<bool, Rejected> {
        if !self
            .inner
            .revocations
            .current()
            .spec
            .is_removed(name.as_str())
        {
            return Ok(false);
        }
        if replace == Some(name.as_str()) {
            return Ok(true);
        }
        Err(reject(
            "node_removed",
            Status::permission_denied(format!(
                "node {name} was removed from the mesh; to join under that name again (a reinstalled host), use a token made by `meshctl token create --replace {name}`"
            )),
        ))
    }

    /// Lifts the removal of `name` after it joined again with a replace token.
    pub(super) async fn readmit(&self, name: &NodeName) {
        let key = name.to_string();
        let r = self
            .edit_revocation("registry".to_owned(), move |_, next| {
                Ok(next.readmit_node(&key))
            })
            .await;
        if let Err(e) = r {
            warn!(node = %name, error = %e.status.message(), "readmitting a removed node failed");
        }
    }

    /// Ends `stream` (cleanly; the client reconnects and is refused) once the caller's
    /// certificate is revoked.
    pub(super) fn until_revoked<S, T>(
        &self,
        peer: &PeerInfo,
        stream: S,
    ) -> std::pin::Pin<Box<dyn Stream<Item = T> + Send>>
    where
        S: Stream<Item = T> + Send + 'static,
    {
        let Some(serial) = peer.serial.clone() else {
            return Box::pin(stream);
        };
        let mut rx = self.inner.revocations.subscribe();
        let revoked = async move {
            while !rx.borrow_and_update().deny.denies_serial(&serial) {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        Box::pin(stream.take_until(revoked))
    }
}

/// An operator identity from `admin/NAME`, `viewer/NAME` or a full SPIFFE id of `td`.
fn operator_identity(td: &mesh_api::TrustDomain, text: &str) -> Result<Identity, String> {
    let id = if text.starts_with("spiffe://") {
        Identity::parse(text).map_err(|e| format!("identity {}: {e}", quoted(text)))?
    } else {
        let (role, name) = text.split_once('/').unwrap_or(("", text));
        let name = Label::new(name).map_err(|e| format!("identity name {}: {e}", quoted(name)))?;
        match role {
            "admin" => Identity::Admin {
                trust_domain: td.clone(),
                name,
            },
            "viewer" => Identity::Viewer {
                trust_domain: td.clone(),
                name,
            },
            other => {
                return Err(format!(
                    "role {}: expected admin or viewer (identity as admin/NAME or viewer/NAME)",
                    quoted(other)
                ));
            }
        }
    };
    match &id {
        Identity::Admin { trust_domain, .. } | Identity::Viewer { trust_domain, .. }
            if trust_domain == td =>
        {
            Ok(id)
        }
        _ => Err(format!(
            "{id} is not an operator identity of trust domain {td}"
        )),
    }
}

#[cfg(test)]
mod flows;

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(serial: &str, identity: &str, node: &str, not_after: i64) -> CertRecord {
        CertRecord {
            serial: serial.into(),
            identity: identity.into(),
            node: node.into(),
            issued_unix: 0,
            not_before_unix: 0,
            not_after_unix: not_after,
        }
    }

    #[test]
    fn selection_names_only_live_matching_certificates() {
        let certs = [
            rec("01", "spiffe://t/node/a", "a", 100),
            rec("02", "spiffe://t/ns/shop/sa/api", "a", 100),
            rec("03", "spiffe://t/ns/shop/sa/api", "b", 100),
            rec("04", "spiffe://t/node/a", "a", 10),
            rec("05", "spiffe://t/admin/ops", "", 100),
        ];
        let serials = |sel: Selector, now| -> Vec<String> {
            select(&certs, &sel, now)
                .into_iter()
                .map(|c| c.serial)
                .collect()
        };
        assert_eq!(
            serials(Selector::Node("a".into()), 50),
            ["01", "02"],
            "expired 04 left out"
        );
        assert_eq!(serials(Selector::Node("a".into()), 5), ["01", "02", "04"]);
        assert_eq!(serials(Selector::Serial("03".into()), 50), ["03"]);
        assert_eq!(
            serials(Selector::Serial("09".into()), 50),
            Vec::<String>::new()
        );
        assert_eq!(
            serials(Selector::Service("spiffe://t/ns/shop/sa/api".into()), 50),
            ["02", "03"]
        );
        assert_eq!(
            serials(Selector::Operator("spiffe://t/admin/ops".into()), 50),
            ["05"]
        );
        assert_eq!(
            serials(Selector::Node("a".into()), 100),
            Vec::<String>::new(),
            "not_after is exclusive"
        );
    }

    #[test]
    fn operator_identities_are_checked() {
        let td = mesh_api::TrustDomain::new("mesh.test").unwrap();
        assert_eq!(
            operator_identity(&td, "admin/ops").unwrap().to_string(),
            "spiffe://mesh.test/admin/ops"
        );
        assert_eq!(
            operator_identity(&td, "spiffe://mesh.test/viewer/v")
                .unwrap()
                .to_string(),
            "spiffe://mesh.test/viewer/v"
        );
        for bad in [
            "ops",
            "root/ops",
            "admin/Bad Name",
            "spiffe://other/admin/ops",
            "spiffe://mesh.test/node/a",
        ] {
            assert!(operator_identity(&td, bad).is_err(), "{bad}");
        }
    }
}
