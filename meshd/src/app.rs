//! Wiring of the meshd process: bind every listener, bootstrap identity, start gossip and the
//! proxy, serve admin, and drain in order on shutdown (not ready → publish draining → stop
//! accepting → wait for connections up to the grace period → force-close → leave gossip).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use mesh_api::ServiceKey;
use mesh_runtime::drain;
use mesh_runtime::lifecycle::{Lifecycle, Phase};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument as _, error, info, info_span, warn};

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::discovery::{self, Discovery};
use crate::gossip_keys::GossipKeys;
use crate::gossip_seal::{SealStats, SealedTransport};
use crate::identity::{self, Manager};
use crate::membership::Membership;
use crate::proxy::{self, listeners};
use crate::reload::{self, Reloader};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// How many gossip intervals to wait after publishing `draining` before refusing new
/// connections, so peers have stopped picking this node.
const DRAIN_PROPAGATION_ROUNDS: u32 = 5;
/// After force-closing, how long tasks get to finish.
const FORCE_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// A running node.
pub struct Bound {
    /// Bound inbound (mTLS) address.
    pub inbound_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// Bound upstream listeners: (source service, upstream service, address).
    pub outbound_addrs: Vec<(ServiceKey, ServiceKey, SocketAddr)>,
    config_rx: watch::Receiver<Arc<Config>>,
    reload: reload::Handle,
    membership: Membership,
    /// The node's phase: readiness, then the drain's steps.
    lifecycle: Arc<Lifecycle>,
    drain: drain::Trigger,
    tasks: JoinSet<()>,
}

/// Binds everything and starts the node. Fails on bind conflicts, an unusable stored
/// identity, or a join the registry refuses.
pub async fn build(config: Config) -> anyhow::Result<Bound> {
    mesh_runtime::tls::install_default_provider();
    let config = Arc::new(config);
    let (config_tx, config_rx) = watch::channel(config.clone());
    // Every listener first, so a taken port fails the start at once.
    let inbound_listener = proxy::bind_inbound(&config).await?;
    let inbound_addr = inbound_listener.local_addr()?;
    let service_listeners = listeners::Set::default()
        .prepare(&listeners::specs(&config))
        .await?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin.bind)
        .await
        .with_context(|| format!("binding the admin listener on {}", config.admin.bind))?;
    let admin_addr = admin_listener.local_addr()?;

    let mut registry = prometheus_client::registry::Registry::default();
    let id_metrics = identity::Metrics::new(&mut registry);
    let proxy_metrics = proxy::Metrics::new(&mut registry);
    let policy_metrics = discovery::Metrics::new(&mut registry);
    let members_gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    registry.register(
        "meshd_gossip_members",
        "Live members in this node's gossip view",
        members_gauge.clone(),
    );
    let keyring_revision = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    registry.register(
        "meshd_gossip_keyring_revision",
        "Revision of the gossip keyring this node seals and opens with",
        keyring_revision.clone(),
    );
    let seal_dropped = Family::<SealDropLabels, Counter>::default();
    registry.register(
        "meshd_gossip_datagrams_dropped",
        "Gossip datagrams dropped: not sealed with a key of the keyring, tampered, malformed or too large",
        seal_dropped.clone(),
    );
    let states_refused = Counter::default();
    registry.register(
        "meshd_gossip_states_refused",
        "Gossip states of other nodes not used: unsigned, not signed by the node they are about, tampered or over the size caps",
        states_refused.clone(),
    );
    let nodes_refused = Counter::default();
    registry.register(
        "meshd_gossip_nodes_refused",
        "New node ids kept out of the gossip table: not a node name, a removed node, or the table's digest at its bound",
        nodes_refused.clone(),
    );
    let seal_opened = Counter::default();
    registry.register(
        "meshd_gossip_datagrams_opened",
        "Gossip datagrams that were authentic and decoded",
        seal_opened.clone(),
    );
    let reload_metrics = reload::Metrics::new(&mut registry);
    let trace_metrics = crate::trace::Metrics::new(&mut registry);
    // Under the journal, access events are journal entries; otherwise JSON lines on stdout,
    // written in batches. Either way by a task of their own (spawned below).
    let (access_log, access_journal_rx) = if mesh_runtime::telemetry::to_journal() {
        let (sink, rx) = proxy::access_log::JournalSink::new(&mut registry);
        (proxy::access_log::Sink::Journal(sink), Some(rx))
    } else {
        let sink = Arc::new(proxy::access_log::JsonSink::new(&mut registry));
        (proxy::access_log::Sink::Json(sink), None)
    };
    let access_log = Arc::new(access_log);
    let registry = Arc::new(registry);
    let (reload_status_tx, reload_status_rx) = watch::channel(reload::Status::initial());

    let lifecycle = Arc::new(Lifecycle::new());
    // Listeners stop accepting, open connections are closed, background tasks end.
    let stop_rx = lifecycle.reached(Phase::Quiescing);
    let force_rx = lifecycle.reached(Phase::Closing);
    let shutdown_rx = lifecycle.reached(Phase::Stopped);
    let mut tasks = JoinSet::new();
    // Node warnings for `meshctl check`: every component that has some adds a source here.
    let mut warnings = crate::report::Warnings::default();
    tasks.spawn(
        crate::report::watch_listeners(config_rx.clone(), warnings.source(), shutdown_rx.clone())
            .instrument(info_span!("listeners")),
    );

    // The persisted policy first: with the registry down it is what we enforce.
    let (discovery, policy) = Discovery::load(&config.data_dir, policy_metrics);
    tasks.spawn(
        crate::report::watch_unreadable_policy(
            policy.unreadable_rx.clone(),
            warnings.source(),
            shutdown_rx.clone(),
        )
        .instrument(info_span!("policy_warnings")),
    );

    // Admin first, so /live answers (and /ready says 503) while the node is still joining.
    let certs_cell = Arc::new(std::sync::OnceLock::new());
    let view_cell = Arc::new(std::sync::OnceLock::new());
    let liveness_cell = Arc::new(std::sync::OnceLock::new());
    let admin_state = AdminState {
        config_rx: config_rx.clone(),
        reload_rx: reload_status_rx.clone(),
        phase_rx: lifecycle.subscribe(),
        metrics: registry,
        certs_rx: certs_cell.clone(),
        view_rx: view_cell.clone(),
        liveness_rx: liveness_cell.clone(),
        policy_rx: policy.policy_rx.clone(),
        policy_synced_rx: policy.synced_rx.clone(),
        policy_unreadable_rx: policy.unreadable_rx.clone(),
    };
    let mut admin_shutdown = shutdown_rx.clone();
    tasks.spawn(async move {
        let res = axum::serve(admin_listener, admin::router(admin_state))
            .with_graceful_shutdown(async move { drain::until_true(&mut admin_shutdown).await })
            .await;
        if let Err(e) = res {
            warn!(error = %e, "admin server failed");
        }
    });

    // Identity first: nothing can be served without certificates.
    let (manager, certs_rx) = Manager::bootstrap(config.clone(), id_metrics, shutdown_rx.clone())
        .await
        .context("bootstrapping the node identity")?;
    let trust_domain = certs_rx.borrow().trust_domain.clone();
    let _ = certs_cell.set(certs_rx.clone());
    tasks.spawn(
        discovery
            .run(manager.client(), shutdown_rx.clone())
            .instrument(info_span!("discovery")),
    );
    let registry_client = manager.client();
    let gossip_signer = crate::gossip_auth::Signer::new(manager.node_slot());
    tasks.spawn(manager.run(
        config_rx.clone(),
        policy.policy_rx.clone(),
        shutdown_rx.clone(),
    ));

    let mut advertise = config.inbound.advertise;
    if advertise.port() == 0 {
        advertise.set_port(inbound_addr.port());
    }
    let cluster_id = config
        .gossip
        .cluster_id
        .clone()
        .unwrap_or_else(|| trust_domain.to_string());
    // Gossip is sealed with the registry's keyring: persisted from an earlier start, or
    // fetched now (a first start cannot gossip without it).
    let (gossip_keys, keyring_rx) =
        GossipKeys::load_or_fetch(&config.data_dir, &registry_client, keyring_revision.clone())
            .await
            .context("loading the gossip keyring")?;
    tasks.spawn(
        gossip_keys
            .run(registry_client.clone(), shutdown_rx.clone())
            .instrument(info_span!("gossip_keys")),
    );
    let seal_stats = Arc::new(SealStats::default());
    tasks.spawn(export_seal_stats(
        seal_stats.clone(),
        seal_dropped,
        seal_opened,
        config.gossip.interval,
        shutdown_rx.clone(),
    ));
    let transport =
        SealedTransport::new(keyring_rx, seal_stats).legacy_peers(config.gossip.legacy_peers);
    // Compiled once per policy snapshot; gossip leaves removed nodes out of the view, and the
    // proxy refuses (and closes) connections carried by revoked certificates.
    let deny_rx = crate::deny::compile(policy.policy_rx.clone(), shutdown_rx.clone());
    let (membership, view_rx) = Membership::start(
        &config,
        cluster_id,
        advertise,
        &transport,
        crate::membership::Auth {
            signer: gossip_signer,
            certs_rx: certs_rx.clone(),
            refused: states_refused,
            refused_nodes: nodes_refused,
        },
        deny_rx.clone(),
        shutdown_rx.clone(),
    )
    .await?;
    // Admin shows the view the proxy has compiled: a view seen there is one already in use.
    let (compiled_rx, compiled_view_rx) = proxy::compiled::spawn(
        config_rx.clone(),
        policy.policy_rx.clone(),
        view_rx.clone(),
        shutdown_rx.clone(),
    );
    let _ = view_cell.set(compiled_view_rx);
    let _ = liveness_cell.set(membership.liveness());
    {
        let mut rx = view_rx.clone();
        let mut shutdown = shutdown_rx.clone();
        let gauge = members_gauge.clone();
        tasks.spawn(async move {
            loop {
                gauge.set(rx.borrow_and_update().members.len() as i64);
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = drain::until_true(&mut shutdown) => return,
                }
            }
        });
    }

    let tls_rx = proxy::tls_updates(certs_rx.clone(), shutdown_rx.clone())?;
    let (tracer, exporter) = crate::trace::Tracer::new(trace_settings(&config)?, trace_metrics);
    // Ends after the drain (shutdown comes after it), flushing the spans of the last requests.
    tasks.spawn(
        exporter
            .run(shutdown_rx.clone())
            .instrument(info_span!("trace")),
    );
    let (drain_trigger, drain_watch) = drain::channel();
    let shared = proxy::Shared {
        config_rx: config_rx.clone(),
        tls_rx,
        view_rx: view_rx.clone(),
        policy_rx: policy.policy_rx.clone(),
        policy_synced_rx: policy.synced_rx.clone(),
        deny_rx: deny_rx.clone(),
        metrics: proxy_metrics,
        drain: drain_watch,
        force_rx,
        http: Arc::new(proxy::http::State::new(&config)),
        pool: Arc::default(),
        compiled_rx,
        edges: Arc::new(proxy::observe::Edges::default()),
        tracer,
        access_log: access_log.clone(),
    };
    // Both end after the drain, writing the last connections' events.
    match (&*access_log, access_journal_rx) {
        (proxy::access_log::Sink::Json(sink), _) => {
            tasks.spawn(sink.clone().run(shutdown_rx.clone()));
        }
        (proxy::access_log::Sink::Journal(_), Some(rx)) => {
            tasks.spawn(proxy::access_log::JournalSink::run(rx, shutdown_rx.clone()));
        }
        (proxy::access_log::Sink::Journal(_), None) => {}
    }
    proxy::spawn_inbound(
        inbound_listener,
        shared.clone(),
        stop_rx.clone(),
        &mut tasks,
    );
    let edges = shared.edges.clone();
    // The per-service listeners, health checks and service publication belong to the
    // reloader from here on.
    let reloader = Reloader::start(
        config_tx,
        service_listeners,
        shared,
        stop_rx,
        membership.publisher(),
        reload_metrics,
        reload_status_tx,
    );
    let outbound_addrs = (reloader.bound().into_iter())
        .filter_map(|(spec, addr)| match spec {
            listeners::Spec::Upstream(s, u) => Some((s.key, u.service, addr)),
            _ => None,
        })
        .collect();
    tasks.spawn(
        crate::report::run(
            crate::report::Inputs {
                client: registry_client,
                node: config.node_name.to_string(),
                edges,
                certs_rx: certs_rx.clone(),
                view_rx,
                policy_rx: policy.policy_rx.clone(),
                reload_rx: reload_status_rx,
                keyring_revision,
                interval: config.telemetry.report_interval,
            },
            warnings,
            shutdown_rx.clone(),
        )
        .instrument(info_span!("report")),
    );
    let (reload, reload_task) = reloader.spawn(shutdown_rx.clone());
    tasks.spawn(async move {
        let _ = reload_task.await;
    });

    // Listeners are bound and certificates loaded; ready once a policy snapshot is in place
    // (persisted, or the registry's first event). Until then traffic is served under the
    // empty revision-0 snapshot, and /ready says 503.
    {
        let lifecycle = lifecycle.clone();
        let mut synced_rx = policy.synced_rx.clone();
        let node = config.node_name.clone();
        let mut shutdown = shutdown_rx.clone();
        tasks.spawn(async move {
            tokio::select! {
                r = synced_rx.wait_for(|s| *s) => if r.is_err() { return },
                _ = drain::until_true(&mut shutdown) => return,
            }
            // A latch: a drain that began first keeps the node unready.
            if lifecycle.set_ready() {
                info!(node = %node, inbound = %inbound_addr, admin = %admin_addr, "meshd ready");
                // Under systemd (Type=notify): listeners bound, certificates loaded, a policy
                // snapshot in place — units ordered After=meshd.service start now.
                if let Err(e) = mesh_runtime::sd_notify::notify("READY=1\nSTATUS=serving") {
                    warn!(error = %e, "could not tell systemd meshd is ready");
                }
            }
        });
    }
    info!(node = %config.node_name, inbound = %inbound_addr, admin = %admin_addr, "meshd started");
    Ok(Bound {
        inbound_addr,
        admin_addr,
        outbound_addrs,
        config_rx,
        reload,
        membership,
        lifecycle,
        drain: drain_trigger,
        tasks,
    })
}

impl Bound {
    /// Asks the node to reload its configuration (what SIGHUP does).
    pub fn reload_handle(&self) -> reload::Handle {
        self.reload.clone()
    }

    /// Runs until `shutdown` resolves, then drains in order within the grace period. `Err` if
    /// gossip stopped on its own first: the node drains and exits with a failure so the
    /// service manager restarts it, rather than serve on a frozen view of the mesh.
    pub async fn wait_termination(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        let gossip = self.membership.stopped();
        let outcome = tokio::select! {
            () = shutdown => Ok(()),
            r = gossip => {
                let why = match r {
                    Ok(()) => "gossip stopped".to_owned(),
                    Err(e) => format!("gossip stopped: {e:#}"),
                };
                error!(reason = %why, "gossip is down; draining and exiting so meshd is restarted");
                Err(why)
            }
        };
        self.drain().await;
        outcome
    }

    /// The drain sequence.
    pub async fn drain(mut self) {
        info!("draining");
        let _ = mesh_runtime::sd_notify::notify("STOPPING=1\nSTATUS=draining");
        self.lifecycle.advance(Phase::Draining);
        self.membership.set_draining().await;
        let config = self.config_rx.borrow().clone();
        tokio::time::sleep(config.gossip.interval * DRAIN_PROPAGATION_ROUNDS).await;
        self.lifecycle.advance(Phase::Quiescing);
        let grace = config.drain.grace_period;
        if tokio::time::timeout(grace, self.drain.drain())
            .await
            .is_err()
        {
            warn!(grace = ?grace, "grace period over; closing the remaining connections");
            self.lifecycle.advance(Phase::Closing);
            tokio::time::sleep(FORCE_CLOSE_WAIT).await;
        }
        self.lifecycle.advance(Phase::Stopped);
        self.membership.shutdown().await;
        if tokio::time::timeout(FORCE_CLOSE_WAIT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            self.tasks.abort_all();
        }
        info!("stopped");
    }
}

/// Labels of `meshd_gossip_datagrams_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SealDropLabels {
    reason: &'static str,
}

/// Copies the sealed transport's counters into the metrics registry once per gossip round
/// (they are plain atomics on the datagram path).
async fn export_seal_stats(
    stats: Arc<SealStats>,
    dropped: Family<SealDropLabels, Counter>,
    opened: Counter,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_opened = 0;
    let mut last_dropped = std::collections::HashMap::new();
    // Every reason from the first scrape, at zero: "none dropped" is a visible 0, not a gap.
    for (reason, _) in stats.drops() {
        let _ = dropped.get_or_create(&SealDropLabels {
            reason: reason.as_str(),
        });
    }
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = drain::until_true(&mut shutdown) => return,
        }
        let now = stats.opened();
        opened.inc_by(now.saturating_sub(last_opened));
        last_opened = now;
        for (reason, n) in stats.drops() {
            let before = last_dropped.insert(reason.as_str(), n).unwrap_or(0);
            if n > before {
                (dropped.get_or_create(&SealDropLabels {
                    reason: reason.as_str(),
                }))
                .inc_by(n - before);
            }
        }
    }
}

/// The tracer's settings from `[tracing]` (validated by the config already).
fn trace_settings(config: &Config) -> anyhow::Result<crate::trace::Settings> {
    let mut settings = crate::trace::Settings::new(config.node_name.to_string());
    settings.sampling = config.telemetry.tracing.sampling;
    settings.collector = match &config.telemetry.tracing.collector {
        Some(uri) => Some(
            uri.parse()
                .with_context(|| format!("tracing.collector {uri:?}"))?,
        ),
        None => None,
    };
    if let Some(e) = settings.problems().into_iter().next() {
        anyhow::bail!("[tracing]: {e}");
    }
    Ok(settings)
}
