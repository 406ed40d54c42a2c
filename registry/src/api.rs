//! The registry's gRPC service: join with a token, node renewal, workload signing, join tokens
//! (create, list, revoke), inventory, policy resources (apply, get, history, watch), gossip
//! keys (watch, report, change, status) and observability (node reports, topology, SLO status)
//! — each call authorised by the caller's certificate identity.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::proto::v1 as pb;
use mesh_api::token::JoinToken;
use mesh_api::{Identity, NodeName, ServiceKey};
use mesh_ca::{Authority, SignRequest};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::config::Config;
use crate::server::PeerInfo;
use crate::store::{self, CertRecord, NodeRecord, Store};

mod bundle;
mod certs;
mod decide;
mod diff;
pub mod follow;
mod gossip_keys;
mod observe;
mod policy;
mod revoke;
mod token;
mod watch;
pub use certs::{MAX_CERT_PAGE, cert_page};
pub use decide::{allows_service, normalize_services};
pub use diff::spec_diff;
pub use gossip_keys::{GOSSIP_WATCH_BUFFER, GossipKeyChangeLabels, GossipKeyStream, action_of};
pub use policy::{WATCH_BUFFER, action_name, validate_apply};
pub(crate) use revoke::credential_record;
pub use revoke::{
    MAX_CREDENTIAL_TTL, PRUNE_INTERVAL as REVOCATION_PRUNE_INTERVAL, Selector, select,
};
pub use watch::{PolicyStream, WatchStartLabels};

/// Labels of the request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// RPC name.
    pub rpc: &'static str,
    /// `ok` or the rejection reason.
    pub outcome: &'static str,
}

/// Labels of the CA expiry gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaCertLabels {
    /// `root` or `intermediate`.
    pub cert: &'static str,
}

/// Registry API metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Calls by RPC and outcome (`mesh_registry_calls_total`).
    pub calls: Family<CallLabels, Counter>,
    /// Certificates signed (`mesh_registry_certificates_issued_total`).
    pub issued: Counter,
    /// Policy watch streams started, by first event
    /// (`mesh_registry_policy_watch_starts_total`).
    pub policy_watch_starts: Family<WatchStartLabels, Counter>,
    /// The current mesh policy revision (`mesh_registry_policy_revision`).
    pub policy_revision: Gauge,
    /// Gossip keyring changes by action (`mesh_registry_gossip_key_changes_total`).
    pub gossip_key_changes: Family<GossipKeyChangeLabels, Counter>,
    /// The current gossip keyring revision (`mesh_registry_gossip_keyring_revision`).
    pub gossip_keyring_revision: Gauge,
    /// When each CA certificate expires, Unix seconds
    /// (`mesh_registry_ca_not_after_seconds{cert}`).
    pub ca_not_after: Family<CaCertLabels, Gauge>,
    /// Certificates on the deny-list (`mesh_registry_revoked_certificates`).
    pub revoked_certificates: Gauge,
    /// Nodes on the deny-list (`mesh_registry_removed_nodes`).
    pub removed_nodes: Gauge,
    /// Calls refused because the caller's certificate is revoked
    /// (`mesh_registry_revoked_calls_total`).
    pub revoked_calls: Counter,
    /// Report edges dropped because their destination is no known service
    /// (`mesh_registry_report_edges_dropped_total`).
    pub report_edges_dropped: Counter,
}

impl Metrics {
    /// Registers the metrics under `registry`.
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "mesh_registry_calls",
            "Registry API calls by RPC and outcome (ok or rejection reason)",
            m.calls.clone(),
        );
        registry.register(
            "mesh_registry_certificates_issued",
            "Certificates signed by the registry",
            m.issued.clone(),
        );
        registry.register(
            "mesh_registry_policy_watch_starts",
            "Policy watch streams started, by first event: full snapshot, incremental, or current",
            m.policy_watch_starts.clone(),
        );
        registry.register(
            "mesh_registry_policy_revision",
            "The current mesh policy revision",
            m.policy_revision.clone(),
        );
        registry.register(
            "mesh_registry_gossip_key_changes",
            "Gossip keyring changes by action (install, use, remove)",
            m.gossip_key_changes.clone(),
        );
        registry.register(
            "mesh_registry_gossip_keyring_revision",
            "The current gossip keyring revision",
            m.gossip_keyring_revision.clone(),
        );
        registry.register(
            "mesh_registry_ca_not_after_seconds",
            "When each CA certificate (root, intermediate) expires, Unix time",
            m.ca_not_after.clone(),
        );
        registry.register(
            "mesh_registry_revoked_certificates",
            "Unexpired certificates on the deny-list",
            m.revoked_certificates.clone(),
        );
        registry.register(
            "mesh_registry_removed_nodes",
            "Removed nodes on the deny-list",
            m.removed_nodes.clone(),
        );
        registry.register(
            "mesh_registry_revoked_calls",
            "Calls refused because the caller's certificate is revoked",
            m.revoked_calls.clone(),
        );
        registry.register(
            "mesh_registry_report_edges_dropped",
            "Report edges dropped because their destination is no service any node may host",
            m.report_edges_dropped.clone(),
        );
        m
    }

    /// Sets the CA expiry gauges from `ca`.
    pub fn set_ca(&self, ca: &Authority) {
        for (cert, not_after) in ca_expiries(ca) {
            (self.ca_not_after.get_or_create(&CaCertLabels { cert })).set(unix(not_after));
        }
    }
}

/// The CA's certificates by kind, root first, with their `notAfter`.
fn ca_expiries(ca: &Authority) -> [(&'static str, SystemTime); 2] {
    [
        ("root", ca.root_not_after()),
        ("intermediate", ca.intermediate_not_after()),
    ]
}

/// A refused call: what the caller is told and the bounded reason used in metrics and logs.
#[derive(Debug)]
struct Rejected {
    reason: &'static str,
    status: Status,
}

fn reject(reason: &'static str, status: Status) -> Rejected {
    Rejected { reason, status }
}

/// The tonic service.
#[derive(Clone)]
pub struct RegistryApi {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    ca: Arc<crate::ca::CaHandle>,
    config: Config,
    metrics: Metrics,
    policy: policy::PolicyHub,
    gossip: gossip_keys::GossipHub,
    revocations: revoke::Revocations,
    reports: observe::ReportQuota,
    /// How this registry follows a primary (a secondary site's), for `GetNodeReports`.
    follow: follow::Status,
    /// Importing the `[[peers]]`' revocations.
    peers: follow::PeerStatuses,
    /// Becomes `true` when the registry drains; watch streams end then.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Longest prefix of a caller's value quoted back in a status, characters.
const MAX_QUOTED: usize = 80;

/// `value` quoted for a status or log line: whole if short, else a prefix of whole characters
/// (a caller's bytes are never cut inside a character, and never echoed without bound).
fn quoted(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::rng(), buf.as_mut_slice());
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn store_error(e: store::Error) -> Rejected {
    warn!(error = %e, "registry store failure");
    reject(
        "store_error",
        Status::unavailable(format!("registry storage failed: {e}")),
    )
}

/// A join the store's rules refused: the token (used up, expired, revoked, unknown) or the
/// name (registered, or not the one a replace token is for).
fn join_refused(e: store::Error) -> Rejected {
    let (reason, status): (_, fn(String) -> Status) = match &e {
        store::Error::TokenExhausted { .. } => ("token_used_up", Status::permission_denied),
        store::Error::TokenExpired { .. } => ("token_expired", Status::permission_denied),
        store::Error::TokenRevoked { .. } => ("token_revoked", Status::permission_denied),
        store::Error::TokenNotFound => ("unknown_token", Status::permission_denied),
        store::Error::NodeExists { .. } => ("node_exists", Status::already_exists),
        store::Error::TokenForOtherNode { .. } => {
            ("token_for_other_node", Status::permission_denied)
        }
        _ => return store_error(e),
    };
    reject(reason, status(e.to_string()))
}

impl RegistryApi {
    /// Serves `store` and signs with `ca` (whose expiry it sets in `metrics`); watch streams
    /// end once `shutdown` holds `true`. Reads the deny-list from `store`.
    pub fn new(
        store: Arc<dyn Store>,
        ca: Arc<crate::ca::CaHandle>,
        config: Config,
        metrics: Metrics,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Self, store::Error> {
        metrics.set_ca(&ca.current());
        let revocations = revoke::Revocations::load(store.as_ref())?;
        let (certs, nodes) = revocations.current().deny.len();
        metrics.revoked_certificates.set(certs as i64);
        metrics.removed_nodes.set(nodes as i64);
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                ca,
                config,
                metrics,
                policy: policy::PolicyHub::new(),
                gossip: gossip_keys::GossipHub::new(),
                revocations,
                reports: observe::ReportQuota::default(),
                follow: follow::Status::default(),
                peers: follow::PeerStatuses::default(),
                shutdown,
            }),
        })
    }

    /// Sets the CA expiry gauges after a CA reload.
    pub fn set_ca_metrics(&self, ca: &Authority) {
        self.inner.metrics.set_ca(ca);
    }

    /// The interceptor in front of every call: a caller whose certificate is on the deny-list
    /// is refused, whatever it calls (renew, sign, watch, gossip keys, report, admin calls).
    pub fn revocation_check(
        &self,
    ) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static
    {
        let api = self.clone();
        move |req: Request<()>| {
            let peer = peer_of(&req);
            match &peer.serial {
                Some(serial) if api.inner.revocations.denies(serial) => {
                    api.inner.metrics.revoked_calls.inc();
                    warn!(
                        src.addr = %peer.addr,
                        src.identity = peer.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                        serial = %serial,
                        "call refused: the caller's certificate is revoked"
                    );
                    Err(Status::permission_denied(format!(
                        "certificate {serial} is revoked"
                    )))
                }
                _ => Ok(req),
            }
        }
    }

    /// Runs blocking store work off the async threads (sled fsyncs).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, store::Error> + Send + 'static,
    ) -> Result<T, Rejected> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(inner.store.as_ref()))
            .await
            .map_err(|e| {
                reject(
                    "internal",
                    Status::internal(format!("store task failed: {e}")),
                )
            })?
            .map_err(store_error)
    }

    fn finish<T>(
        &self,
        rpc: &'static str,
        peer: &PeerInfo,
        r: Result<T, Rejected>,
    ) -> Result<Response<T>, Status> {
        match r {
            Ok(v) => {
                self.inner
                    .metrics
                    .calls
                    .get_or_create(&CallLabels { rpc, outcome: "ok" })
                    .inc();
                Ok(Response::new(v))
            }
            Err(rej) => {
                self.inner
                    .metrics
                    .calls
                    .get_or_create(&CallLabels {
                        rpc,
                        outcome: rej.reason,
                    })
                    .inc();
                warn!(
                    rpc,
                    reason = rej.reason,
                    src.addr = %peer.addr,
                    src.identity = peer.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                    message = rej.status.message(),
                    "registry call rejected"
                );
                Err(rej.status)
            }
        }
    }

    fn require_node(&self, peer: &PeerInfo) -> Result<NodeName, Rejected> {
        match &peer.identity {
            Some(Identity::Node { trust_domain, name })
                if *trust_domain == self.inner.config.trust_domain =>
            {
                Ok(name.clone())
            }
            Some(other) => Err(reject(
                "wrong_identity",
                Status::permission_denied(format!("{other} is not a node identity of this mesh")),
            )),
            None => Err(reject(
                "unauthenticated",
                Status::unauthenticated("a node certificate is required"),
            )),
        }
    }

    fn require_admin(&self, peer: &PeerInfo) -> Result<Identity, Rejected> {
        match &peer.identity {
            Some(id @ Identity::Admin { trust_domain, .. })
                if *trust_domain == self.inner.config.trust_domain =>
            {
                Ok(id.clone())
            }
            Some(viewer @ Identity::Viewer { trust_domain, .. })
                if *trust_domain == self.inner.config.trust_domain =>
            {
                Err(reject(
                    "read_only",
                    Status::permission_denied(format!(
                        "{viewer} is a read-only (viewer) identity; this needs operator (admin) credentials"
                    )),
                ))
            }
            Some(other) => Err(reject(
                "not_admin",
                Status::permission_denied(format!("{other} is not an operator identity")),
            )),
            None => Err(reject(
                "unauthenticated",
                Status::unauthenticated(
                    "operator credentials (from mesh-registry init) are required",
                ),
            )),
        }
    }

    fn sign(
        &self,
        csr_pem: &str,
        identity: Identity,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<mesh_ca::Issued, Rejected> {
        let issued = self
            .inner
            .ca
            .current()
            .sign_csr(
                csr_pem,
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
        Ok(issued)
    }

    fn cert_response(&self, issued: &mesh_ca::Issued) -> pb::CertificateResponse {
        pb::CertificateResponse {
            cert_chain_pem: issued.chain_pem.clone(),
            trust_bundle_pem: self.inner.ca.current().trust_bundle_pem(),
            identity: issued.identity.to_string(),
            not_after_unix: unix(issued.not_after),
            serial: issued.serial.clone(),
        }
    }

    async fn do_join(&self, req: pb::JoinRequest) -> Result<pb::JoinResponse, Rejected> {
        let now = SystemTime::now();
        let token = JoinToken::decode(&req.token).map_err(|e| {
            reject(
                "bad_token",
                Status::invalid_argument(format!("join token: {e}")),
            )
        })?;
        let name = NodeName::new(&req.node_name).map_err(|e| {
            reject(
                "bad_request",
                Status::invalid_argument(format!("node_name {}: {e}", quoted(&req.node_name))),
            )
        })?;
        let (id, key) = (token.id.clone(), name.to_string());
        let (record, registered) = self
            .blocking(move |s| Ok((s.get_token(&id)?, s.get_node(&key)?.is_some())))
            .await?;
        let record = record.ok_or_else(|| {
            reject(
                "unknown_token",
                Status::permission_denied("unknown join token"),
            )
        })?;
        decide::check_token(&record, &token.secret, unix(now))
            .map_err(|e| reject(e.reason(), Status::permission_denied(e.to_string())))?;
        // Early, before signing anything; the store decides again atomically with the use.
        store::check_join_name(&record, name.as_str(), registered).map_err(join_refused)?;
        let readmit = self.check_removed_join(&name, record.replace_node.as_deref())?;
        let node_id = Identity::node(&self.inner.config.trust_domain, &name);
        let issued = self.sign(&req.csr_pem, node_id, self.inner.config.node_cert_ttl, now)?;
        let node = NodeRecord {
            name: name.to_string(),
            datacenter: req.datacenter.clone(),
            zone: req.zone.clone(),
            allowed_services: record.services.clone(),
            token_id: record.id.clone(),
            joined_unix: unix(now),
            last_renewed_unix: unix(now),
            cert_serial: issued.serial.clone(),
            cert_not_after_unix: unix(issued.not_after),
        };
        let cert = CertRecord {
            serial: issued.serial.clone(),
            identity: issued.identity.to_string(),
            node: name.to_string(),
            issued_unix: unix(now),
            not_before_unix: unix(issued.not_before),
            not_after_unix: unix(issued.not_after),
        };
        let token_id = record.id.clone();
        let n = node.clone();
        let updated = self
            .blocking(move |s| Ok(s.join(&token_id, unix(now), &n, &cert)))
            .await?
            .map_err(join_refused)?;
        info!(
            node = %name,
            token = %updated.id,
            uses = updated.uses,
            services = ?node.allowed_services,
            replaced = registered,
            readmitted = readmit,
            "node joined"
        );
        if readmit {
            self.readmit(&name).await;
        }
        Ok(pb::JoinResponse {
            trust_domain: self.inner.config.trust_domain.to_string(),
            node_cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: self.inner.ca.current().trust_bundle_pem(),
            allowed_services: node.allowed_services,
        })
    }

    async fn do_renew_node(
        &self,
        peer: &PeerInfo,
        req: pb::RenewNodeRequest,
    ) -> Result<pb::CertificateResponse, Rejected> {
        let now = SystemTime::now();
        let name = self.require_node(peer)?;
        let key = name.to_string();
        let mut node = self
            .blocking(move |s| s.get_node(&key))
            .await?
            .ok_or_else(|| {
                reject(
                    "unknown_node",
                    Status::permission_denied(format!("node {name} is not registered")),
                )
            })?;
        let issued = self.sign(
            &req.csr_pem,
            Identity::node(&self.inner.config.trust_domain, &name),
            self.inner.config.node_cert_ttl,
            now,
        )?;
        node.last_renewed_unix = unix(now);
        node.cert_serial = issued.serial.clone();
        node.cert_not_after_unix = unix(issued.not_after);
        let cert = cert_record(&issued, &name, now);
        self.record_issued(&name, cert).await?;
        self.blocking(move |s| s.put_node(&node)).await?;
        info!(node = %name, not_after = unix(issued.not_after), "node certificate renewed");
        Ok(self.cert_response(&issued))
    }

    async fn do_sign_workload(
        &self,
        peer: &PeerInfo,
        req: pb::SignWorkloadRequest,
    ) -> Result<pb::CertificateResponse, Rejected> {
        let now = SystemTime::now();
        let name = self.require_node(peer)?;
        let svc =
            ServiceKey::parse(&format!("{}/{}", req.namespace, req.service)).map_err(|e| {
                reject(
                    "bad_request",
                    Status::invalid_argument(format!(
                        "service {}/{}: {e}",
                        req.namespace, req.service
                    )),
                )
            })?;
        let key = name.to_string();
        let node = self
            .blocking(move |s| s.get_node(&key))
            .await?
            .ok_or_else(|| {
                reject(
                    "unknown_node",
                    Status::permission_denied(format!("node {name} is not registered")),
                )
            })?;
        if !allows_service(&node.allowed_services, &svc) {
            return Err(reject(
                "service_not_allowed",
                Status::permission_denied(format!(
                    "node {name} may not host {svc}: its join token allows {:?}",
                    node.allowed_services
                )),
            ));
        }
        let issued = self.sign(
            &req.csr_pem,
            Identity::workload(&self.inner.config.trust_domain, &svc),
            self.inner.config.workload_cert_ttl,
            now,
        )?;
        let cert = cert_record(&issued, &name, now);
        self.record_issued(&name, cert).await?;
        info!(node = %name, service = %svc, serial = %issued.serial, "workload certificate issued");
        Ok(self.cert_response(&issued))
    }
}

fn cert_record(issued: &mesh_ca::Issued, node: &NodeName, now: SystemTime) -> CertRecord {
    CertRecord {
        serial: issued.serial.clone(),
        identity: issued.identity.to_string(),
        node: node.to_string(),
        issued_unix: unix(now),
        not_before_unix: unix(issued.not_before),
        not_after_unix: unix(issued.not_after),
    }
}

fn peer_of<T>(req: &Request<T>) -> PeerInfo {
    req.extensions()
        .get::<PeerInfo>()
        .cloned()
        .unwrap_or_default()
}

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryApi {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_join(req.into_inner()).await;
        self.finish("join", &peer, r)
    }

    async fn renew_node(
        &self,
        req: Request<pb::RenewNodeRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_renew_node(&peer, req.into_inner()).await;
        self.finish("renew_node", &peer, r)
    }

    async fn sign_workload(
        &self,
        req: Request<pb::SignWorkloadRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_sign_workload(&peer, req.into_inner()).await;
        self.finish("sign_workload", &peer, r)
    }

    async fn get_trust_bundle(
        &self,
        req: Request<pb::TrustBundleRequest>,
    ) -> Result<Response<pb::TrustBundle>, Status> {
        let peer = peer_of(&req);
        let r = match &peer.identity {
            Some(_) => Ok(pb::TrustBundle {
                trust_domain: self.inner.config.trust_domain.to_string(),
                trust_bundle_pem: self.inner.ca.current().trust_bundle_pem(),
            }),
            None => Err(reject(
                "unauthenticated",
                Status::unauthenticated("a mesh certificate is required"),
            )),
        };
        self.finish("get_trust_bundle", &peer, r)
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_create_token(&peer, req.into_inner()).await;
        self.finish("create_token", &peer, r)
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_list_tokens(&peer).await;
        self.finish("list_tokens", &peer, r)
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_revoke_token(&peer, req.into_inner()).await;
        self.finish("revoke_token", &peer, r)
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let peer = peer_of(&req);
        let r = match self.require_admin(&peer) {
            Ok(_) => self
                .blocking(|s| s.list_nodes())
                .await
                .map(|nodes| pb::ListNodesResponse {
                    nodes: nodes
                        .into_iter()
                        .map(|n| pb::NodeRecord {
                            name: n.name,
                            datacenter: n.datacenter,
                            zone: n.zone,
                            allowed_services: n.allowed_services,
                            joined_unix: n.joined_unix,
                            last_renewed_unix: n.last_renewed_unix,
                            cert_not_after_unix: n.cert_not_after_unix,
                            token_id: n.token_id,
                        })
                        .collect(),
                }),
            Err(e) => Err(e),
        };
        self.finish("list_nodes", &peer, r)
    }

    async fn list_certificates(
        &self,
        req: Request<pb::ListCertificatesRequest>,
    ) -> Result<Response<pb::ListCertificatesResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_list_certificates(&peer, req.into_inner()).await;
        self.finish("list_certificates", &peer, r)
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RevocationResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_remove_node(&peer, req.into_inner()).await;
        self.finish("remove_node", &peer, r)
    }

    async fn revoke_certificates(
        &self,
        req: Request<pb::RevokeCertificatesRequest>,
    ) -> Result<Response<pb::RevocationResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_revoke_certificates(&peer, req.into_inner()).await;
        self.finish("revoke_certificates", &peer, r)
    }

    async fn issue_credentials(
        &self,
        req: Request<pb::IssueCredentialsRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_issue_credentials(&peer, req.into_inner()).await;
        self.finish("issue_credentials", &peer, r)
    }

    async fn list_credentials(
        &self,
        req: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_list_credentials(&peer).await;
        self.finish("list_credentials", &peer, r)
    }

    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_apply(&peer, req.into_inner()).await;
        self.finish("apply", &peer, r)
    }

    async fn get_resources(
        &self,
        req: Request<pb::GetResourcesRequest>,
    ) -> Result<Response<pb::GetResourcesResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_get_resources(&peer, req.into_inner()).await;
        self.finish("get_resources", &peer, r)
    }

    async fn delete_resource(
        &self,
        req: Request<pb::DeleteResourceRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_delete_resource(&peer, req.into_inner()).await;
        self.finish("delete_resource", &peer, r)
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_history(&peer, req.into_inner()).await;
        self.finish("history", &peer, r)
    }

    type WatchPolicyStream = PolicyStream;

    async fn watch_policy(
        &self,
        req: Request<pb::WatchPolicyRequest>,
    ) -> Result<Response<PolicyStream>, Status> {
        let peer = peer_of(&req);
        let r = self.do_watch_policy(&peer, req.into_inner()).await;
        let r = r.map(|s| self.until_revoked(&peer, s));
        self.finish("watch_policy", &peer, r)
    }

    type WatchGossipKeysStream = GossipKeyStream;

    async fn watch_gossip_keys(
        &self,
        req: Request<pb::WatchGossipKeysRequest>,
    ) -> Result<Response<GossipKeyStream>, Status> {
        let peer = peer_of(&req);
        let r = self.do_watch_gossip_keys(&peer).await;
        let r = r.map(|s| self.until_revoked(&peer, s));
        self.finish("watch_gossip_keys", &peer, r)
    }

    async fn report_gossip_keys(
        &self,
        req: Request<pb::ReportGossipKeysRequest>,
    ) -> Result<Response<pb::ReportGossipKeysResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_report_gossip_keys(&peer, req.into_inner());
        self.finish("report_gossip_keys", &peer, r)
    }

    async fn change_gossip_keys(
        &self,
        req: Request<pb::ChangeGossipKeysRequest>,
    ) -> Result<Response<pb::GossipKeyStatus>, Status> {
        let peer = peer_of(&req);
        let r = self.do_change_gossip_keys(&peer, req.into_inner()).await;
        self.finish("change_gossip_keys", &peer, r)
    }

    async fn get_gossip_keys(
        &self,
        req: Request<pb::GetGossipKeysRequest>,
    ) -> Result<Response<pb::GossipKeyStatus>, Status> {
        let peer = peer_of(&req);
        let r = self.do_get_gossip_keys(&peer).await;
        self.finish("get_gossip_keys", &peer, r)
    }

    async fn report(
        &self,
        req: Request<pb::NodeReport>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_report(&peer, req.into_inner()).await;
        self.finish("report", &peer, r)
    }

    async fn get_topology(
        &self,
        req: Request<pb::TopologyRequest>,
    ) -> Result<Response<pb::Topology>, Status> {
        let peer = peer_of(&req);
        let r = self.do_get_topology(&peer, req.into_inner()).await;
        self.finish("get_topology", &peer, r)
    }

    async fn get_slo_status(
        &self,
        req: Request<pb::SloStatusRequest>,
    ) -> Result<Response<pb::SloStatusResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_get_slo_status(&peer).await;
        self.finish("get_slo_status", &peer, r)
    }

    async fn get_node_reports(
        &self,
        req: Request<pb::NodeReportsRequest>,
    ) -> Result<Response<pb::NodeReportsResponse>, Status> {
        let peer = peer_of(&req);
        let r = self.do_get_node_reports(&peer).await;
        self.finish("get_node_reports", &peer, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_bounded_and_cut_between_characters() {
        assert_eq!(quoted("node-1"), "\"node-1\"");
        let long = "é".repeat(MAX_QUOTED + 1);
        assert_eq!(
            quoted(&long),
            format!("{:?}… ({} bytes)", "é".repeat(MAX_QUOTED), long.len())
        );
        for s in ["😀".repeat(500), format!("a{}", "€".repeat(300))] {
            assert!(quoted(&s).chars().count() < MAX_QUOTED + 20);
        }
    }
}
