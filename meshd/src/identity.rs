//! Workload and node identity: joins the mesh once with the token, keeps the node certificate
//! and one workload certificate per local service on disk, renews each at half-life with
//! jittered backoff, and publishes the current set as a `watch` snapshot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::policy::{Snapshot, TrustBundle};
use mesh_api::proto::v1 as pb;
use mesh_api::token::JoinToken;
use mesh_api::{Identity, ServiceKey, TrustDomain};
use mesh_runtime::backoff::Backoff;
use mesh_runtime::tls::{self, CertSlot, RootsSlot};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::control::{self, Auth};

mod renew;
mod store;

/// First retry delay after a failed join or renewal.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest delay between retries.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// Identity errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The node has never joined and the token file cannot be read.
    #[error(
        "this node has no identity yet and the join token file {path} cannot be read; create a token with `meshctl token create` and put it there"
    )]
    NoToken {
        /// The configured token file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The token file does not hold a token.
    #[error("join token file {path} does not hold a usable token")]
    BadToken {
        /// The token file.
        path: PathBuf,
        /// Decoding problem.
        #[source]
        source: mesh_api::token::Error,
    },
    /// The registry refused to let this node join.
    #[error("the registry refused the join")]
    JoinRefused(#[source] control::Error),
    /// The registry's answer was not usable.
    #[error("registry answer unusable: {0}")]
    BadAnswer(String),
    /// Stored identity files are unreadable or corrupt.
    #[error("identity store {path}: {reason}")]
    Store {
        /// File or directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// TLS material problem.
    #[error(transparent)]
    Tls(#[from] tls::Error),
    /// Registry client setup.
    #[error(transparent)]
    Control(#[from] control::Error),
    /// Shut down while still joining.
    #[error("shut down before the node could join")]
    Cancelled,
}

/// One workload certificate in use.
#[derive(Clone)]
pub struct Workload {
    /// The certificate chain and key for rustls.
    pub key: Arc<CertifiedKey>,
    /// Start of validity (backdated by the CA for clock skew).
    pub not_before: SystemTime,
    /// When this node obtained it; renewal is scheduled from here.
    pub obtained: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The identity snapshot every other component reads.
#[derive(Clone)]
pub struct Certs {
    /// The mesh's trust domain.
    pub trust_domain: TrustDomain,
    /// Trust bundle PEM.
    pub bundle_pem: String,
    /// Trust bundle as a rustls root store.
    pub roots: Arc<RootCertStore>,
    /// Node certificate expiry.
    pub node_not_after: SystemTime,
    /// Current certificate of each local service that has one.
    pub workloads: BTreeMap<ServiceKey, Workload>,
}

/// Labels of the expiry gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpiryLabels {
    /// SPIFFE identity.
    pub identity: String,
}

/// Identity metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// `meshd_certificate_expiry_timestamp_seconds{identity}`.
    pub expiry: Family<ExpiryLabels, Gauge>,
    /// `meshd_certificate_renewals_total`.
    pub renewals: prometheus_client::metrics::counter::Counter,
    /// `meshd_certificate_renewal_failures_total`.
    pub renewal_failures: prometheus_client::metrics::counter::Counter,
}

impl Metrics {
    /// Registers identity metrics.
    pub fn new(reg: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        reg.register(
            "meshd_certificate_expiry_timestamp_seconds",
            "Expiry (Unix time) of each certificate this node holds",
            m.expiry.clone(),
        );
        reg.register(
            "meshd_certificate_renewals",
            "Certificates renewed",
            m.renewals.clone(),
        );
        reg.register(
            "meshd_certificate_renewal_failures",
            "Failed certificate renewal attempts (the old certificate keeps serving)",
            m.renewal_failures.clone(),
        );
        m
    }
}

/// Owns identity state: bootstrap, renewal, persistence.
pub struct Manager {
    config: Arc<Config>,
    store: store::Dir,
    client: control::Client,
    node_slot: Arc<CertSlot>,
    /// The roots the registry client verifies the registry with (replaced by a root rotation).
    roots_slot: Arc<RootsSlot>,
    node_obtained: SystemTime,
    node_not_after: SystemTime,
    certs_tx: watch::Sender<Arc<Certs>>,
    metrics: Metrics,
}

/// Never renew the same certificate more often than this, whatever its dates say.
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);

/// The workload identity of a local service.
fn workload_identity(td: &TrustDomain, svc: &ServiceKey) -> Identity {
    Identity::workload(td, svc)
}

impl Manager {
    /// Loads the stored identity or joins with the token (retrying while the registry is
    /// unreachable, failing at once if it refuses), then loads or requests each workload
    /// certificate. Services whose certificate cannot be had yet are retried by [`Manager::run`].
    pub async fn bootstrap(
        config: Arc<Config>,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Self, watch::Receiver<Arc<Certs>>), Error> {
        let store = store::Dir::new(config.data_dir.join("identity"));
        let now = SystemTime::now();
        let node = match store.load_node()? {
            Some(n) if n.not_after > now => {
                info!(node = %config.node_name, not_after = ?n.not_after, "using stored node identity");
                n
            }
            Some(n) => {
                warn!(not_after = ?n.not_after, "stored node certificate expired; joining again with the token");
                join(&config, &store, shutdown.clone()).await?
            }
            None => join(&config, &store, shutdown.clone()).await?,
        };
        let roots = tls::root_store(&node.bundle_pem)?;
        let node_slot = CertSlot::new(Some(tls::certified_key(&node.chain_pem, &node.key_pem)?));
        let roots_slot = RootsSlot::new(roots.clone());
        let client = control::Client::new(
            &config.registry.address,
            Auth::Mesh {
                roots: roots_slot.clone(),
                trust_domain: node.trust_domain.clone(),
                cert: node_slot.clone(),
            },
            config.registry.connect_timeout,
            config.registry.request_timeout,
        )?;
        let mut workloads = BTreeMap::new();
        for key in config.identities() {
            let id = workload_identity(&node.trust_domain, key);
            match store.load_workload(key)? {
                Some(w) if w.not_after > now && w.identity == id => {
                    workloads.insert(
                        key.clone(),
                        Workload {
                            key: tls::certified_key(&w.chain_pem, &w.key_pem)?,
                            not_before: w.not_before,
                            not_after: w.not_after,
                            obtained: w.obtained,
                        },
                    );
                }
                _ => {}
            }
        }
        let certs = Certs {
            trust_domain: node.trust_domain.clone(),
            bundle_pem: node.bundle_pem.clone(),
            roots,
            node_not_after: node.not_after,
            workloads,
        };
        let (certs_tx, certs_rx) = watch::channel(Arc::new(certs));
        let mut mgr = Self {
            config,
            store,
            client,
            node_slot,
            roots_slot,
            node_obtained: node.obtained,
            node_not_after: node.not_after,
            certs_tx,
            metrics,
        };
        // Fetch what is missing now, so a healthy start is ready at once; failures are left to
        // the renewal loop (static stability: stored certificates keep serving meanwhile).
        let missing: Vec<ServiceKey> = (mgr.config.identities().into_iter())
            .filter(|k| !mgr.certs_tx.borrow().workloads.contains_key(*k))
            .cloned()
            .collect();
        for svc in missing {
            if let Err(e) = mgr.renew_workload(&svc).await {
                warn!(service = %svc, error = %e, "could not get a workload certificate yet; will retry");
            }
        }
        mgr.update_metrics();
        Ok((mgr, certs_rx))
    }

    /// The node certificate slot (used by the registry client).
    pub fn node_slot(&self) -> Arc<CertSlot> {
        self.node_slot.clone()
    }

    fn update_metrics(&self) {
        let certs = self.certs_tx.borrow();
        let secs = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        };
        self.metrics
            .expiry
            .get_or_create(&ExpiryLabels {
                identity: Identity::node(&certs.trust_domain, &self.config.node_name).to_string(),
            })
            .set(secs(self.node_not_after));
        for (svc, w) in &certs.workloads {
            self.metrics
                .expiry
                .get_or_create(&ExpiryLabels {
                    identity: workload_identity(&certs.trust_domain, svc).to_string(),
                })
                .set(secs(w.not_after));
        }
    }

    async fn renew_workload(&mut self, svc: &ServiceKey) -> Result<(), Error> {
        let td = self.certs_tx.borrow().trust_domain.clone();
        let id = workload_identity(&td, svc);
        let (key_pem, csr_pem) = tls::new_key_and_csr(&id)?;
        let resp = self
            .client
            .sign_workload(pb::SignWorkloadRequest {
                namespace: svc.namespace.to_string(),
                service: svc.name.to_string(),
                csr_pem,
            })
            .await?;
        let w = self.accept_cert(&resp, &id, &key_pem)?;
        self.store.save_workload(svc, &w)?;
        let key = tls::certified_key(&w.chain_pem, &key_pem)?;
        self.certs_tx.send_modify(|c| {
            let c = Arc::make_mut(c);
            c.workloads.insert(
                svc.clone(),
                Workload {
                    key,
                    not_before: w.not_before,
                    not_after: w.not_after,
                    obtained: w.obtained,
                },
            );
        });
        info!(identity = %id, not_after = ?w.not_after, "workload certificate installed");
        Ok(())
    }

    async fn renew_node(&mut self) -> Result<(), Error> {
        let td = self.certs_tx.borrow().trust_domain.clone();
        let id = Identity::node(&td, &self.config.node_name);
        let (key_pem, csr_pem) = tls::new_key_and_csr(&id)?;
        let resp = self.client.renew_node(csr_pem).await?;
        let w = self.accept_cert(&resp, &id, &key_pem)?;
        let node = store::Node {
            trust_domain: td,
            bundle_pem: resp.trust_bundle_pem,
            chain_pem: w.chain_pem.clone(),
            key_pem: key_pem.clone(),
            not_after: w.not_after,
            obtained: w.obtained,
        };
        self.store.save_node(&node)?;
        self.node_slot
            .set(tls::certified_key(&w.chain_pem, &key_pem)?);
        self.node_obtained = w.obtained;
        self.node_not_after = w.not_after;
        self.certs_tx
            .send_modify(|c| Arc::make_mut(c).node_not_after = w.not_after);
        info!(identity = %id, not_after = ?w.not_after, "node certificate renewed");
        Ok(())
    }

    /// Trusts the roots of the registry's TrustBundle, when it differs from what this node
    /// trusts: TLS configs are rebuilt (new handshakes verify against them), the registry
    /// client reconnects with them, and the node's stored bundle is replaced so a restart
    /// with the registry down starts from them. An unusable bundle is refused (logged); the
    /// current roots stay.
    fn follow_trust_bundle(&mut self, snapshot: &Snapshot) {
        let Some(bundle) = TrustBundle::of(snapshot) else {
            return;
        };
        let pem = bundle.pem();
        if pem == self.certs_tx.borrow().bundle_pem {
            return;
        }
        let roots = match tls::root_store(&pem) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "the registry's trust bundle is unusable; keeping the current roots");
                return;
            }
        };
        self.roots_slot.set(roots.clone());
        self.certs_tx.send_modify(|c| {
            let c = Arc::make_mut(c);
            c.roots = roots;
            c.bundle_pem = pem.clone();
        });
        match self.store.load_node() {
            Ok(Some(mut node)) => {
                node.bundle_pem = pem;
                if let Err(e) = self.store.save_node(&node) {
                    warn!(error = %e, "storing the new trust bundle failed");
                }
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "reading the stored identity failed"),
        }
        info!(roots = bundle.roots.len(), "trust bundle updated");
    }

    /// Checks that a signed certificate is for `id` and matches our key before we use it.
    fn accept_cert(
        &self,
        resp: &pb::CertificateResponse,
        id: &Identity,
        key_pem: &str,
    ) -> Result<store::Workload, Error> {
        let chain = tls::parse_certs(&resp.cert_chain_pem, "issued certificate")?;
        let leaf = chain
            .first()
            .ok_or_else(|| Error::BadAnswer("empty certificate chain".into()))?;
        if tls::peer_identity(&chain).as_ref() != Some(id) {
            return Err(Error::BadAnswer(format!(
                "registry issued a certificate for {:?}, expected {id}",
                tls::uri_sans(leaf)
            )));
        }
        // CertifiedKey::from_der checks that the key matches the certificate.
        tls::certified_key(&resp.cert_chain_pem, key_pem)?;
        let (not_before, not_after) = tls::validity(leaf)?;
        Ok(store::Workload {
            identity: id.clone(),
            chain_pem: resp.cert_chain_pem.clone(),
            key_pem: key_pem.to_owned(),
            not_before,
            not_after,
            obtained: SystemTime::now(),
        })
    }

    /// A registry client authenticated with the node certificate; it presents the renewed
    /// certificate after each renewal without being rebuilt.
    pub fn client(&self) -> control::Client {
        self.client.clone()
    }

    /// Renews certificates at half-life until `shutdown`; failures retry with backoff while
    /// the current certificate keeps serving until it really expires. Follows `config_rx`: a
    /// service added by a reload gets its certificate at once, and a removed one's certificate
    /// leaves the snapshot (it stays on disk, for when the service comes back).
    pub async fn run(
        mut self,
        mut config_rx: watch::Receiver<Arc<Config>>,
        mut policy_rx: watch::Receiver<Arc<Snapshot>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut policy_open = true;
        self.follow_trust_bundle(&policy_rx.borrow_and_update());
        let mut node_due = renew::renew_at_random(self.node_obtained, self.node_not_after);
        let mut due: BTreeMap<ServiceKey, SystemTime> = BTreeMap::new();
        let mut backoff: BTreeMap<Option<ServiceKey>, Backoff> = BTreeMap::new();
        let mut config_open = true;
        // Whether the config changed since the last look; `changed()` marks it seen.
        let mut reconfigure = config_rx.has_changed().unwrap_or(false);
        loop {
            if std::mem::take(&mut reconfigure) {
                self.config = config_rx.borrow_and_update().clone();
                let wanted: std::collections::BTreeSet<&ServiceKey> =
                    self.config.identities().into_iter().collect();
                due.retain(|k, _| wanted.contains(k));
                backoff.retain(|k, _| k.as_ref().is_none_or(|k| wanted.contains(k)));
                self.certs_tx.send_if_modified(|c| {
                    let before = c.workloads.len();
                    Arc::make_mut(c).workloads.retain(|k, _| wanted.contains(k));
                    c.workloads.len() != before
                });
            }
            {
                let certs = self.certs_tx.borrow();
                for key in self.config.identities() {
                    due.entry(key.clone())
                        .or_insert_with(|| match certs.workloads.get(key) {
                            Some(w) => renew::renew_at_random(w.obtained, w.not_after),
                            None => SystemTime::now(),
                        });
                }
            }
            let (next_key, next_at) = due
                .iter()
                .map(|(k, t)| (Some(k.clone()), *t))
                .chain(std::iter::once((None, node_due)))
                .min_by_key(|(_, t)| *t)
                .expect("node renewal is always scheduled");
            let wait = next_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                r = config_rx.changed(), if config_open => {
                    // Closed: the configuration is final (the reloader is gone); keep renewing.
                    config_open = r.is_ok();
                    reconfigure = config_open;
                    continue;
                }
                r = policy_rx.changed(), if policy_open => {
                    // Closed: discovery is gone (shutting down); the roots stay as they are.
                    policy_open = r.is_ok();
                    if policy_open {
                        let snapshot = policy_rx.borrow_and_update().clone();
                        self.follow_trust_bundle(&snapshot);
                    }
                    continue;
                }
                _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
            }
            let result = match &next_key {
                Some(svc) => self.renew_workload(svc).await,
                None => self.renew_node().await,
            };
            let b = backoff
                .entry(next_key.clone())
                .or_insert_with(|| Backoff::new(RETRY_BASE, RETRY_MAX));
            let next = match result {
                Ok(()) => {
                    self.metrics.renewals.inc();
                    b.reset();
                    match &next_key {
                        Some(svc) => {
                            let certs = self.certs_tx.borrow();
                            let w = certs.workloads.get(svc).expect("just installed");
                            renew::renew_at_random(w.obtained, w.not_after)
                        }
                        None => renew::renew_at_random(self.node_obtained, self.node_not_after),
                    }
                    .max(SystemTime::now() + MIN_RENEW_INTERVAL)
                }
                Err(e) => {
                    self.metrics.renewal_failures.inc();
                    let expires = match &next_key {
                        Some(svc) => self
                            .certs_tx
                            .borrow()
                            .workloads
                            .get(svc)
                            .map(|w| w.not_after),
                        None => Some(self.node_not_after),
                    };
                    let left = expires.and_then(|t| t.duration_since(SystemTime::now()).ok());
                    warn!(
                        identity = next_key.as_ref().map(|k| k.to_string()).unwrap_or_else(|| "node".into()),
                        error = %e,
                        expires_in = ?left,
                        "certificate renewal failed; the current certificate keeps serving"
                    );
                    SystemTime::now() + b.next_delay()
                }
            };
            match next_key {
                Some(svc) => {
                    due.insert(svc, next);
                }
                None => node_due = next,
            }
            self.update_metrics();
        }
    }
}

/// Joins with the token, retrying while the registry is unreachable.
async fn join(
    config: &Config,
    store: &store::Dir,
    mut shutdown: watch::Receiver<bool>,
) -> Result<store::Node, Error> {
    let path = &config.registry.join_token_file;
    let text = std::fs::read_to_string(path).map_err(|source| Error::NoToken {
        path: path.clone(),
        source,
    })?;
    let token = JoinToken::decode(&text).map_err(|source| Error::BadToken {
        path: path.clone(),
        source,
    })?;
    let fingerprint = token.ca_fingerprint().map_err(|source| Error::BadToken {
        path: path.clone(),
        source,
    })?;
    let trust_domain = TrustDomain::new(&token.td)
        .map_err(|e| Error::BadAnswer(format!("join token trust domain: {e}")))?;
    let client = control::Client::new(
        &config.registry.address,
        Auth::Pinned(fingerprint),
        config.registry.connect_timeout,
        config.registry.request_timeout,
    )?;
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    loop {
        // A fresh key per attempt is cheap and keeps no half-used key material around.
        let (key_pem, csr_pem) =
            tls::new_key_and_csr(&Identity::node(&trust_domain, &config.node_name))?;
        let req = pb::JoinRequest {
            token: text.trim().to_owned(),
            node_name: config.node_name.to_string(),
            csr_pem,
            datacenter: config.datacenter.to_string(),
            zone: config.zone.to_string(),
        };
        match client.join(req).await {
            Ok(resp) => {
                let node = accept_join(&resp, &key_pem, &fingerprint, config)?;
                store.save_node(&node)?;
                info!(node = %config.node_name, trust_domain = %node.trust_domain, allowed = ?resp.allowed_services, "joined the mesh");
                for key in config.identities() {
                    if !mesh_registry_allows(&resp.allowed_services, key) {
                        warn!(service = %key, allowed = ?resp.allowed_services, "the join token does not allow this service (or gateway); the registry will refuse its certificate");
                    }
                }
                return Ok(node);
            }
            Err(e) if e.is_refusal() => return Err(Error::JoinRefused(e)),
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "registry unreachable; retrying join");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = mesh_runtime::drain::until_true(&mut shutdown) => return Err(Error::Cancelled),
                }
            }
        }
    }
}

/// Mirrors the registry's rule (`ns/name` or `ns/*`) for an early warning only.
fn mesh_registry_allows(allowed: &[String], svc: &ServiceKey) -> bool {
    allowed
        .iter()
        .any(|a| *a == svc.to_string() || a.strip_suffix("/*") == Some(svc.namespace.as_str()))
}

fn accept_join(
    resp: &pb::JoinResponse,
    key_pem: &str,
    fingerprint: &[u8; 32],
    config: &Config,
) -> Result<store::Node, Error> {
    let trust_domain = TrustDomain::new(&resp.trust_domain)
        .map_err(|e| Error::BadAnswer(format!("trust domain: {e}")))?;
    let bundle = tls::parse_certs(&resp.trust_bundle_pem, "trust bundle")?;
    if !bundle.iter().any(|c| tls::sha256(c) == *fingerprint) {
        return Err(Error::BadAnswer(
            "trust bundle does not contain the CA pinned by the join token".into(),
        ));
    }
    let chain = tls::parse_certs(&resp.node_cert_chain_pem, "node certificate")?;
    let want = Identity::node(&trust_domain, &config.node_name);
    if tls::peer_identity(&chain).as_ref() != Some(&want) {
        return Err(Error::BadAnswer(format!(
            "node certificate is not for {want}"
        )));
    }
    tls::certified_key(&resp.node_cert_chain_pem, key_pem)?;
    let not_after = tls::not_after(&chain[0])?;
    Ok(store::Node {
        trust_domain,
        bundle_pem: resp.trust_bundle_pem.clone(),
        chain_pem: resp.node_cert_chain_pem.clone(),
        key_pem: key_pem.to_owned(),
        not_after,
        obtained: SystemTime::now(),
    })
}
