//! Wiring of the registry process: store, CA, serving certificate, gRPC and admin servers, and
//! shutdown with a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use mesh_api::Identity;
use mesh_api::proto::v1::registry_server::RegistryServer;
use mesh_ca::{Authority, SignRequest};
use mesh_runtime::lifecycle::{Lifecycle, Phase};
use mesh_runtime::tls::{self, CertSlot};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tracing::{Instrument as _, info, info_span, warn};

use crate::alerts::{self, Evaluator};
use crate::api::{self, RegistryApi};
use crate::ca;
use crate::config::Config;
use crate::init;
use crate::keyring;
use crate::store::{SledStore, Store};
use crate::upkeep::Upkeep;
use crate::{admin, server};

/// Retry delay when renewing the serving certificate fails.
const SERVING_RENEW_RETRY: Duration = Duration::from_secs(30);

/// A registry with every listener bound.
pub struct Bound {
    /// The gRPC address actually bound (port 0 resolved).
    pub listen_addr: SocketAddr,
    /// The admin address actually bound.
    pub admin_addr: SocketAddr,
    /// Sending `true` stops the servers; receivers live in each task.
    /// The registry's phase (readiness, then the drain's steps).
    lifecycle: Arc<Lifecycle>,
    tasks: JoinSet<()>,
    grace: Duration,
    /// Flushed once every task has stopped: node reports are not flushed one by one.
    store: Arc<dyn Store>,
}

/// Issues the registry's serving certificate: chain = leaf + intermediate + root, so a joining
/// host can find the root its token pins.
fn serving_cert(
    ca: &Authority,
    config: &Config,
) -> anyhow::Result<(Arc<rustls::sign::CertifiedKey>, SystemTime)> {
    let (issued, key) = ca.issue(&SignRequest {
        identity: Identity::registry(&config.trust_domain),
        dns_names: Vec::new(),
        ttl: config.serving_cert_ttl,
        now: SystemTime::now(),
    })?;
    let chain = format!("{}{}", issued.chain_pem, ca.trust_bundle_pem());
    Ok((tls::certified_key(&chain, &key)?, issued.not_after))
}

/// Opens the store, loads the CA and binds every listener.
pub async fn build(config: Config) -> anyhow::Result<Bound> {
    tls::install_default_provider();
    let layout = ca::Layout::new(&config.data_dir);
    let ca = Arc::new(ca::CaHandle::new(
        layout
            .load(&config.trust_domain, SystemTime::now())
            .context("loading the CA")?,
    ));
    let store_dir = init::store_dir(&config.data_dir);
    let (store, policy_revision) = tokio::task::spawn_blocking(move || {
        let store = SledStore::open(&store_dir)?;
        let revision = store.policy_revision()?;
        Ok::<_, crate::store::Error>((store, revision))
    })
    .await?
    .context("opening the registry store")?;
    let store: Arc<dyn Store> = Arc::new(store);
    let keyring = ensure_keyring(store.clone()).await?;

    let (key, not_after) = serving_cert(&ca.current(), &config)?;
    let slot = CertSlot::new(Some(key));
    let (acceptor_tx, acceptor_rx) = watch::channel(acceptor(&ca.current(), &slot)?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the registry listener on {}", config.listen))?;
    let listen_addr = listener.local_addr()?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin_listen))?;
    let admin_addr = admin_listener.local_addr()?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = api::Metrics::new(&mut registry);
    let server_metrics = server::Metrics::new(&mut registry);
    let slo_metrics = alerts::Metrics::new(&mut registry);
    metrics.policy_revision.set(policy_revision as i64);
    metrics
        .gossip_keyring_revision
        .set(keyring.keyring.revision as i64);
    let registry = Arc::new(registry);
    let lifecycle = Arc::new(Lifecycle::new());
    // Servers stop accepting and finish what is in flight; background tasks end with them.
    let shutdown_rx = lifecycle.reached(Phase::Quiescing);
    let mut tasks = JoinSet::new();

    let incoming = server::incoming(
        listener,
        acceptor_rx,
        server::Tracker::new(server::Limits::from_config(&config), server_metrics),
        shutdown_rx.clone(),
    );
    // It reads the deny-list from the store: blocking work, off the async threads (a store
    // on a key-value space runs its reads on this runtime and must not block a worker).
    let registry_api = {
        let (store, ca, config, shutdown_rx) = (
            store.clone(),
            ca.clone(),
            config.clone(),
            shutdown_rx.clone(),
        );
        tokio::task::spawn_blocking(move || {
            RegistryApi::new(store, ca, config, metrics, shutdown_rx)
        })
        .await
        .context("reading the deny-list from the registry store")?
        .context("reading the deny-list from the registry store")?
    };
    let svc = InterceptedService::new(
        RegistryServer::new(registry_api.clone())
            .max_decoding_message_size(config.max_request_message_size)
            .max_encoding_message_size(config.max_response_message_size),
        registry_api.revocation_check(),
    );
    registry_api
        .publish_trust_bundle()
        .await
        .map_err(|e| anyhow::anyhow!("publishing the trust bundle: {e}"))?;
    tasks.spawn(reload_ca(
        CaReload {
            layout,
            ca: ca.clone(),
            api: registry_api.clone(),
            slot: slot.clone(),
            acceptor: acceptor_tx,
            config: config.clone(),
        },
        shutdown_rx.clone(),
    ));
    if let Some(follow) = config.follow.clone() {
        info!(primary = %follow.primary, "following the primary registry for policy");
        tasks.spawn((registry_api.clone().follow(follow)).instrument(info_span!("follow")));
    }
    for peer in config.peers.clone() {
        info!(site = %peer.site, registry = %peer.address, "importing another site's revocations");
        let span = info_span!("peer", site = %peer.site);
        tasks.spawn((registry_api.clone().import_revocations(peer)).instrument(span));
    }
    let mut rx = shutdown_rx.clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval(crate::api::REVOCATION_PRUNE_INTERVAL);
        loop {
            tokio::select! {
                _ = every.tick() => registry_api.prune_revocations().await,
                _ = mesh_runtime::drain::until_true(&mut rx) => return,
            }
        }
    });
    let mut grpc = server::grpc_server(&config);
    let mut rx = shutdown_rx.clone();
    tasks.spawn(async move {
        let res = grpc
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async move {
                mesh_runtime::drain::until_true(&mut rx).await;
            })
            .await;
        if let Err(e) = res {
            warn!(error = %e, "registry grpc server failed");
        }
    });

    let mut rx = shutdown_rx.clone();
    let state = admin::AdminState {
        metrics: registry,
        phase_rx: lifecycle.subscribe(),
    };
    tasks.spawn(async move {
        let res = axum::serve(admin_listener, admin::router(state))
            .with_graceful_shutdown(async move {
                mesh_runtime::drain::until_true(&mut rx).await;
            })
            .await;
        if let Err(e) = res {
            warn!(error = %e, "registry admin server failed");
        }
    });

    tasks.spawn(
        Evaluator::new(
            store.clone(),
            slo_metrics,
            config.slo_eval_interval,
            shutdown_rx.clone(),
        )
        .run()
        .instrument(info_span!("slo_evaluator")),
    );
    tasks.spawn(
        Upkeep::new(store.clone(), shutdown_rx.clone())
            .run()
            .instrument(info_span!("upkeep")),
    );

    tasks.spawn(renew_serving_cert(
        ca,
        config.clone(),
        slot,
        not_after,
        shutdown_rx,
    ));
    info!(
        addr = %listen_addr,
        trust_domain = %config.trust_domain,
        policy_revision,
        gossip_keyring_revision = keyring.keyring.revision,
        gossip_primary_key_id = %keyring.primary,
        "registry listening"
    );
    info!(
        max_connections = config.max_connections,
        max_connections_per_ip = config.max_connections_per_ip,
        max_unauthenticated_connections = config.max_unauthenticated_connections,
        handshake_timeout = ?config.handshake_timeout,
        max_concurrent_streams = config.max_concurrent_streams,
        request_timeout = ?config.request_timeout,
        http2_keepalive_interval = ?config.http2_keepalive_interval,
        http2_keepalive_timeout = ?config.http2_keepalive_timeout,
        max_request_message_size = config.max_request_message_size,
        max_response_message_size = config.max_response_message_size,
        "registry limits"
    );
    info!(addr = %admin_addr, "admin listening");
    // Under systemd (Type=notify): listeners are bound and the store is open.
    lifecycle.set_ready();
    if let Err(e) = mesh_runtime::sd_notify::notify("READY=1\nSTATUS=serving") {
        warn!(error = %e, "could not tell systemd the registry is ready");
    }
    Ok(Bound {
        listen_addr,
        admin_addr,
        lifecycle,
        tasks,
        grace: config.drain_grace_period,
        store,
    })
}

/// Reads the gossip keyring, creating the first one for a data dir made before registries had
/// one (an upgrade), so every API call can rely on it existing.
async fn ensure_keyring(store: Arc<dyn Store>) -> anyhow::Result<keyring::Ensured> {
    let ensured = tokio::task::spawn_blocking(move || keyring::ensure(store.as_ref()))
        .await?
        .context("reading the gossip keyring")?;
    if ensured.created {
        info!(
            revision = ensured.keyring.revision,
            key_id = %ensured.primary,
            "created a gossip keyring for a data dir from an older registry"
        );
    }
    Ok(ensured)
}

/// The TLS acceptor for `ca`: client certificates verified against its trust bundle.
fn acceptor(ca: &Authority, slot: &Arc<CertSlot>) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let roots = tls::root_store(&ca.trust_bundle_pem())?;
    let cfg = tls::server_config(roots, slot.clone(), true, &[b"h2"])?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// What a CA reload replaces.
struct CaReload {
    layout: ca::Layout,
    ca: Arc<ca::CaHandle>,
    api: RegistryApi,
    slot: Arc<CertSlot>,
    acceptor: watch::Sender<tokio_rustls::TlsAcceptor>,
    config: Config,
}

/// Picks up changed CA files (a rotation) without a restart: the new authority signs, the
/// serving certificate is reissued under it, clients are verified against the new bundle and
/// the bundle is published to every node. Files that do not load are skipped (a rotation
/// midway between two renames), and reported once if they stay that way.
async fn reload_ca(r: CaReload, mut shutdown: watch::Receiver<bool>) {
    let mut seen = r.layout.fingerprint();
    let mut reported = String::new();
    let mut tick = tokio::time::interval(ca::RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
        }
        let now = r.layout.fingerprint();
        if now == seen {
            continue;
        }
        let loaded = r.layout.load(&r.config.trust_domain, SystemTime::now());
        let authority = match loaded {
            Ok(a) => a,
            Err(e) => {
                let text = e.to_string();
                if text == reported {
                    warn!(error = %e, "changed CA files do not load; still signing with the previous CA");
                }
                reported = text;
                continue;
            }
        };
        let applied = serving_cert(&authority, &r.config).and_then(|(key, _)| {
            r.slot.set(key);
            acceptor(&authority, &r.slot)
        });
        match applied {
            Ok(a) => {
                r.acceptor.send_replace(a);
            }
            Err(e) => {
                warn!(error = %e, "the new CA cannot serve; still signing with the previous CA");
                seen = now;
                continue;
            }
        }
        r.api.set_ca_metrics(&authority);
        info!(root = %authority.root_fingerprint(), "CA files changed: signing with the new CA");
        r.ca.set(authority);
        seen = now;
        reported.clear();
        if let Err(e) = r.api.publish_trust_bundle().await {
            warn!(error = %e, "publishing the new trust bundle failed");
        }
    }
}

/// Renews the serving certificate at half-life; existing connections keep the old one.
async fn renew_serving_cert(
    ca: Arc<ca::CaHandle>,
    config: Config,
    slot: Arc<CertSlot>,
    mut not_after: SystemTime,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(left / 2) => {}
            _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
        }
        match serving_cert(&ca.current(), &config) {
            Ok((key, na)) => {
                slot.set(key);
                not_after = na;
                info!("registry serving certificate renewed");
            }
            Err(e) => {
                warn!(error = %e, "renewing the registry serving certificate failed");
                tokio::select! {
                    _ = tokio::time::sleep(SERVING_RENEW_RETRY) => {}
                    _ = mesh_runtime::drain::until_true(&mut shutdown) => return,
                }
            }
        }
    }
}

impl Bound {
    /// Runs until `shutdown` resolves, then stops the servers within the grace period.
    pub async fn wait_termination(mut self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
        info!("draining");
        let _ = mesh_runtime::sd_notify::notify("STOPPING=1\nSTATUS=draining");
        self.lifecycle.advance(Phase::Draining);
        self.lifecycle.advance(Phase::Quiescing);
        let drained = tokio::time::timeout(self.grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("grace period elapsed; aborting remaining tasks");
            self.lifecycle.advance(Phase::Closing);
            self.tasks.abort_all();
        }
        // Last, so reports stored by calls that finished during the drain are durable too.
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "flushing the store at shutdown failed"),
            Err(e) => warn!(error = %e, "flushing the store at shutdown failed"),
        }
        self.lifecycle.advance(Phase::Stopped);
        info!("stopped");
    }
}
