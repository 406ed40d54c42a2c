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
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
/// identity, or a join the registry refuses. The order matters: listeners first (a taken port
/// fails the start at once), admin before identity (so `/live` answers, and `/ready` says 503,
/// while the node joins), identity before gossip and the proxy (nothing is served without
/// certificates).
pub async fn build(config: Config) -> anyhow::Result<Bound> {
    mesh_runtime::tls::install_default_provider();
    let config = Arc::new(config);
    let (config_tx, config_rx) = watch::channel(config.clone());
    let listeners = Listeners::bind(&config).await?;
    let mut metrics = Metrics::new();
    let access_log = AccessLog::new(&mut metrics.registry);
    let registry = Arc::new(std::mem::take(&mut metrics.registry));
    let (reload_tx, reload_rx) = watch::channel(reload::Status::initial());
    let (gateways_tx, gateways_rx) = watch::channel(Default::default());
    let lifecycle = Arc::new(Lifecycle::new());
    let shutdown_rx = lifecycle.reached(Phase::Stopped);
    let mut tasks = JoinSet::new();
    // Node warnings for `meshctl check`: every component that has some adds a source here.
    let mut warnings = crate::report::Warnings::default();
    tasks.spawn(
        crate::report::watch_listeners(config_rx.clone(), warnings.source(), shutdown_rx.clone())
            .instrument(info_span!("listeners")),
    );
    tasks.spawn(crate::report::watch_source(
        gateways_rx.clone(),
        warnings.source(),
        shutdown_rx.clone(),
        crate::report::gateway_warnings,
    ));
    // The persisted policy first: with the registry down it is what we enforce.
    let (discovery, policy) = Discovery::load(&config.data_dir, metrics.policy.clone());
    tasks.spawn(
        crate::report::watch_unreadable_policy(
            policy.unreadable_rx.clone(),
            warnings.source(),
            shutdown_rx.clone(),
        )
        .instrument(info_span!("policy_warnings")),
    );
    let cells = AdminCells::default();
    let admin_state = AdminState {
        config_rx: config_rx.clone(),
        reload_rx: reload_rx.clone(),
        phase_rx: lifecycle.subscribe(),
        metrics: registry,
        certs_rx: cells.certs.clone(),
        view_rx: cells.view.clone(),
        liveness_rx: cells.liveness.clone(),
        policy_rx: policy.policy_rx.clone(),
        policy_synced_rx: policy.synced_rx.clone(),
        policy_unreadable_rx: policy.unreadable_rx.clone(),
        gateways_rx,
    };
    let admin_listener = listeners.admin;
    tasks.spawn(serve_admin(
        admin_listener,
        admin_state,
        shutdown_rx.clone(),
    ));
    let (manager, certs_rx) = Manager::bootstrap(
        config.clone(),
        metrics.identity.clone(),
        shutdown_rx.clone(),
    )
    .await
    .context("bootstrapping the node identity")?;
    let _ = cells.certs.set(certs_rx.clone());
    let client = manager.client();
    tasks.spawn(
        (discovery.run(client.clone(), shutdown_rx.clone())).instrument(info_span!("discovery")),
    );
    let signer = crate::gossip_auth::Signer::new(manager.node_slot());
    tasks.spawn(manager.run(
        config_rx.clone(),
        policy.policy_rx.clone(),
        shutdown_rx.clone(),
    ));
    let node = Node {
        config,
        config_rx,
        config_tx,
        addrs: (listeners.inbound_addr, listeners.admin_addr),
        lifecycle,
        policy,
        certs_rx,
        client,
        signer,
        metrics,
        access_log,
        cells,
        reload: (reload_tx, reload_rx),
        gateways_tx,
        warnings,
        tasks,
    };
    node.start(listeners.inbound, listeners.services, listeners.east_west)
        .await
}

/// Every listener, bound before anything else starts.
struct Listeners {
    inbound: tokio::net::TcpListener,
    inbound_addr: SocketAddr,
    services: listeners::Prepared,
    admin: tokio::net::TcpListener,
    admin_addr: SocketAddr,
    /// The east-west gateway's passthrough listener, on a host with that role.
    east_west: Option<tokio::net::TcpListener>,
}

impl Listeners {
    async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let inbound = proxy::bind_inbound(config).await?;
        let inbound_addr = inbound.local_addr()?;
        let services = listeners::Set::default()
            .prepare(&listeners::specs(config))
            .await?;
        let admin = tokio::net::TcpListener::bind(config.admin.bind)
            .await
            .with_context(|| format!("binding the admin listener on {}", config.admin.bind))?;
        let admin_addr = admin.local_addr()?;
        let east_west = match &config.east_west {
            Some(e) => Some(proxy::east_west::bind(e).await?),
            None => None,
        };
        Ok(Listeners {
            inbound,
            inbound_addr,
            services,
            admin,
            admin_addr,
            east_west,
        })
    }
}

/// What admin shows of components that start after it.
#[derive(Default)]
struct AdminCells {
    certs: Arc<std::sync::OnceLock<watch::Receiver<Arc<identity::Certs>>>>,
    view: Arc<std::sync::OnceLock<watch::Receiver<Arc<crate::membership::MeshView>>>>,
    liveness: Arc<std::sync::OnceLock<watch::Receiver<Arc<Vec<crate::membership::Liveness>>>>>,
}

/// The node once it has its identity: what gossip, the proxy and the reporters are built on.
struct Node {
    config: Arc<Config>,
    config_rx: watch::Receiver<Arc<Config>>,
    config_tx: watch::Sender<Arc<Config>>,
    /// Inbound and admin addresses, as bound.
    addrs: (SocketAddr, SocketAddr),
    lifecycle: Arc<Lifecycle>,
    policy: discovery::Handle,
    certs_rx: watch::Receiver<Arc<identity::Certs>>,
    client: crate::control::Client,
    signer: crate::gossip_auth::Signer,
    metrics: Metrics,
    access_log: AccessLog,
    cells: AdminCells,
    reload: (
        watch::Sender<reload::Status>,
        watch::Receiver<reload::Status>,
    ),
    /// What this host does for each gateway it runs (served by the admin endpoint).
    gateways_tx: watch::Sender<crate::admin::Gateways>,
    warnings: crate::report::Warnings,
    tasks: JoinSet<()>,
}

impl Node {
    /// Gossip, the proxy, the reloader and the reporters; then waits for a policy snapshot to
    /// call the node ready.
    async fn start(
        mut self,
        inbound: tokio::net::TcpListener,
        services: listeners::Prepared,
        east_west: Option<tokio::net::TcpListener>,
    ) -> anyhow::Result<Bound> {
        let shutdown_rx = self.lifecycle.reached(Phase::Stopped);
        // Compiled once per policy snapshot; gossip leaves removed nodes out of the view, and
        // the proxy refuses (and closes) connections carried by revoked certificates.
        let deny_rx = crate::deny::compile(self.policy.policy_rx.clone(), shutdown_rx.clone());
        let (membership, view_rx) = self.start_gossip(deny_rx.clone()).await?;
        // Admin shows the view the proxy has compiled: a view seen there is one already in use.
        let (compiled_rx, compiled_view_rx) = proxy::compiled::spawn(
            self.config_rx.clone(),
            self.policy.policy_rx.clone(),
            view_rx.clone(),
            shutdown_rx.clone(),
        );
        let _ = self.cells.view.set(compiled_view_rx);
        (self.tasks).spawn(crate::report::watch_source(
            compiled_rx.clone(),
            self.warnings.source(),
            shutdown_rx.clone(),
            crate::report::external_warnings,
        ));
        let _ = self.cells.liveness.set(membership.liveness());
        let members = self.metrics.gossip.members.clone();
        (self.tasks).spawn(count_members(view_rx.clone(), members, shutdown_rx.clone()));
        let trace_metrics = self.metrics.trace.clone();
        let (tracer, exporter) =
            crate::trace::Tracer::new(trace_settings(&self.config)?, trace_metrics);
        // Ends after the drain (shutdown comes after it), flushing the spans of the last requests.
        (self.tasks).spawn(
            exporter
                .run(shutdown_rx.clone())
                .instrument(info_span!("trace")),
        );
        let (drain_trigger, drain_watch) = drain::channel();
        let shared = proxy::Shared {
            config_rx: self.config_rx.clone(),
            tls_rx: proxy::tls_updates(self.certs_rx.clone(), shutdown_rx.clone())?,
            view_rx: view_rx.clone(),
            policy_rx: self.policy.policy_rx.clone(),
            policy_synced_rx: self.policy.synced_rx.clone(),
            deny_rx,
            metrics: self.metrics.proxy.clone(),
            drain: drain_watch,
            force_rx: self.lifecycle.reached(Phase::Closing),
            http: Arc::new(proxy::http::State::new(&self.config)),
            pool: Arc::default(),
            compiled_rx,
            edges: Arc::new(proxy::observe::Edges::default()),
            tracer,
            access_log: self.access_log.sink.clone(),
        };
        let edges = shared.edges.clone();
        if let (Some(listener), Some(cfg)) = (east_west, self.config.east_west.clone()) {
            self.start_east_west(listener, cfg, &shared, &membership, view_rx.clone())
                .await?;
        }
        let (reload, outbound_addrs) = self.start_proxy(shared, &membership, inbound, services);
        let report = self.report(edges, view_rx);
        self.tasks.spawn(report);
        let ready = ready_when_synced(
            self.lifecycle.clone(),
            self.policy.synced_rx.clone(),
            self.config.node_name.to_string(),
            self.addrs,
            shutdown_rx,
        );
        self.tasks.spawn(ready);
        let (inbound_addr, admin_addr) = self.addrs;
        info!(node = %self.config.node_name, inbound = %inbound_addr, admin = %admin_addr, "meshd started");
        Ok(Bound {
            inbound_addr,
            admin_addr,
            outbound_addrs,
            config_rx: self.config_rx,
            reload,
            membership,
            lifecycle: self.lifecycle,
            drain: drain_trigger,
            tasks: self.tasks,
        })
    }

    /// Gossip, sealed with the registry's keyring (persisted from an earlier start, or fetched
    /// now: a first start cannot gossip without it), and the view of the mesh it keeps.
    async fn start_gossip(
        &mut self,
        deny_rx: watch::Receiver<Arc<mesh_api::policy::DenyList>>,
    ) -> anyhow::Result<(
        Membership,
        watch::Receiver<Arc<crate::membership::MeshView>>,
    )> {
        let shutdown_rx = self.lifecycle.reached(Phase::Stopped);
        let config = &self.config;
        let gossip = &self.metrics.gossip;
        let mut advertise = config.inbound.advertise;
        if advertise.port() == 0 {
            advertise.set_port(self.addrs.0.port());
        }
        let trust_domain = self.certs_rx.borrow().trust_domain.clone();
        let cluster_id =
            (config.gossip.cluster_id.clone()).unwrap_or_else(|| trust_domain.to_string());
        let revision = gossip.keyring_revision.clone();
        let (keys, keyring_rx) =
            GossipKeys::load_or_fetch(&config.data_dir, &self.client, revision)
                .await
                .context("loading the gossip keyring")?;
        let keys_task = keys.run(self.client.clone(), shutdown_rx.clone());
        self.tasks
            .spawn(keys_task.instrument(info_span!("gossip_keys")));
        let stats = Arc::new(SealStats::default());
        self.tasks
            .spawn(gossip.export(stats.clone(), config.gossip.interval, shutdown_rx.clone()));
        let transport =
            SealedTransport::new(keyring_rx, stats).legacy_peers(config.gossip.legacy_peers);
        let auth = crate::membership::Auth {
            signer: self.signer.clone(),
            certs_rx: self.certs_rx.clone(),
            refused: gossip.states_refused.clone(),
            refused_nodes: gossip.nodes_refused.clone(),
        };
        let started = Membership::start(
            config,
            cluster_id,
            advertise,
            &transport,
            auth,
            deny_rx,
            shutdown_rx,
        );
        Ok(started.await?)
    }

    /// The east-west gateway role: the passthrough listener, and WAN gossip announcing this
    /// site's exports and republishing the other sites'.
    async fn start_east_west(
        &mut self,
        listener: tokio::net::TcpListener,
        cfg: crate::config::east_west::EastWestConfig,
        shared: &proxy::Shared,
        membership: &Membership,
        view_rx: watch::Receiver<Arc<crate::membership::MeshView>>,
    ) -> anyhow::Result<()> {
        let shutdown_rx = self.lifecycle.reached(Phase::Stopped);
        let stop_rx = self.lifecycle.reached(Phase::Quiescing);
        let exports_rx = compile_exports(self.policy.policy_rx.clone(), shutdown_rx.clone());
        let keyring = crate::wan::keyring_from_file(&cfg.wan_key_file)?;
        let (keys_tx, keys_rx) = watch::channel(Arc::new(keyring));
        self.tasks.spawn(crate::wan::watch_key_file(
            cfg.wan_key_file.clone(),
            keys_tx,
            shutdown_rx.clone(),
        ));
        let transport = SealedTransport::new(keys_rx, Arc::new(SealStats::default()));
        let trust_domain = self.certs_rx.borrow().trust_domain.clone();
        let inputs = crate::wan::Inputs {
            config: cfg.clone(),
            node_name: self.config.node_name.to_string(),
            site: self.config.site.clone(),
            cluster_id: format!("{trust_domain}/wan"),
            signer: self.signer.clone(),
            certs_rx: self.certs_rx.clone(),
            deny_rx: shared.deny_rx.clone(),
            view_rx,
            exports_rx: exports_rx.clone(),
            lan: membership.publisher(),
            refused: self.metrics.gossip.states_refused.clone(),
            protocol: self.config.gossip.protocol,
        };
        let wan = crate::wan::Wan::start(inputs, &transport, shutdown_rx.clone()).await?;
        let mut stopped = shutdown_rx;
        self.tasks.spawn(async move {
            drain::until_true(&mut stopped).await;
            wan.shutdown().await;
        });
        let addr = listener.local_addr().ok();
        let stops = proxy::accept::Stops {
            node: stop_rx.clone(),
            listener: stop_rx,
        };
        self.tasks.spawn(
            proxy::east_west::serve(Arc::new(listener), cfg, shared.clone(), exports_rx, stops)
                .instrument(info_span!("east_west", addr = ?addr)),
        );
        Ok(())
    }

    /// The inbound listener, the access log's writer and the reloader, which owns the
    /// per-service listeners, health checks and service publication from here on. Returns the
    /// reload handle and the bound upstream listeners.
    fn start_proxy(
        &mut self,
        shared: proxy::Shared,
        membership: &Membership,
        inbound: tokio::net::TcpListener,
        services: listeners::Prepared,
    ) -> (reload::Handle, Vec<(ServiceKey, ServiceKey, SocketAddr)>) {
        let shutdown_rx = self.lifecycle.reached(Phase::Stopped);
        let stop_rx = self.lifecycle.reached(Phase::Quiescing);
        self.access_log
            .spawn_writer(&mut self.tasks, shutdown_rx.clone());
        proxy::spawn_inbound(inbound, shared.clone(), stop_rx.clone(), &mut self.tasks);
        self.tasks.spawn(proxy::gateway::run::run(
            shared.clone(),
            self.config_tx.subscribe(),
            shared.policy_rx.clone(),
            stop_rx.clone(),
            self.gateways_tx.clone(),
        ));
        let reloader = Reloader::start(
            self.config_tx.clone(),
            services,
            shared,
            stop_rx,
            membership.publisher(),
            self.metrics.reload.clone(),
            self.reload.0.clone(),
        );
        let outbound_addrs = (reloader.bound().into_iter())
            .filter_map(|(spec, addr)| match spec {
                listeners::Spec::Upstream(s, u) => Some((s.key, u.service, addr)),
                _ => None,
            })
            .collect();
        let (reload, reload_task) = reloader.spawn(shutdown_rx);
        self.tasks.spawn(async move {
            let _ = reload_task.await;
        });
        (reload, outbound_addrs)
    }

    /// Reports this node's edges, certificates and state to the registry.
    fn report(
        &mut self,
        edges: Arc<proxy::observe::Edges>,
        view_rx: watch::Receiver<Arc<crate::membership::MeshView>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let inputs = crate::report::Inputs {
            client: self.client.clone(),
            node: self.config.node_name.to_string(),
            edges,
            certs_rx: self.certs_rx.clone(),
            view_rx,
            policy_rx: self.policy.policy_rx.clone(),
            reload_rx: self.reload.1.clone(),
            keyring_revision: self.metrics.gossip.keyring_revision.clone(),
            interval: self.config.telemetry.report_interval,
        };
        let warnings = std::mem::take(&mut self.warnings);
        let shutdown_rx = self.lifecycle.reached(Phase::Stopped);
        crate::report::run(inputs, warnings, shutdown_rx).instrument(info_span!("report"))
    }
}

/// Serves the admin endpoint until shutdown.
async fn serve_admin(
    listener: tokio::net::TcpListener,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) {
    let res = axum::serve(listener, admin::router(state))
        .with_graceful_shutdown(async move { drain::until_true(&mut shutdown).await })
        .await;
    if let Err(e) = res {
        warn!(error = %e, "admin server failed");
    }
}

/// Keeps `meshd_gossip_members` at the size of the view.
async fn count_members(
    mut view_rx: watch::Receiver<Arc<crate::membership::MeshView>>,
    gauge: Gauge<i64>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        gauge.set(view_rx.borrow_and_update().members.len() as i64);
        tokio::select! {
            r = view_rx.changed() => if r.is_err() { return },
            _ = drain::until_true(&mut shutdown) => return,
        }
    }
}

/// Listeners are bound and certificates loaded; the node is ready once a policy snapshot is in
/// place (persisted, or the registry's first event). Until then traffic is served under the
/// empty revision-0 snapshot, and /ready says 503.
async fn ready_when_synced(
    lifecycle: Arc<Lifecycle>,
    mut synced_rx: watch::Receiver<bool>,
    node: String,
    (inbound, admin): (SocketAddr, SocketAddr),
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::select! {
        r = synced_rx.wait_for(|s| *s) => if r.is_err() { return },
        _ = drain::until_true(&mut shutdown) => return,
    }
    // A latch: a drain that began first keeps the node unready.
    if lifecycle.set_ready() {
        info!(node = %node, inbound = %inbound, admin = %admin, "meshd ready");
        // Under systemd (Type=notify): listeners bound, certificates loaded, a policy snapshot
        // in place — units ordered After=meshd.service start now.
        if let Err(e) = mesh_runtime::sd_notify::notify("READY=1\nSTATUS=serving") {
            warn!(error = %e, "could not tell systemd meshd is ready");
        }
    }
}

/// Every component's metrics, registered in one registry.
struct Metrics {
    registry: Registry,
    identity: identity::Metrics,
    proxy: proxy::Metrics,
    policy: discovery::Metrics,
    reload: reload::Metrics,
    trace: crate::trace::Metrics,
    gossip: crate::gossip_metrics::GossipMetrics,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        Metrics {
            identity: identity::Metrics::new(&mut registry),
            proxy: proxy::Metrics::new(&mut registry),
            policy: discovery::Metrics::new(&mut registry),
            gossip: crate::gossip_metrics::GossipMetrics::new(&mut registry),
            reload: reload::Metrics::new(&mut registry),
            trace: crate::trace::Metrics::new(&mut registry),
            registry,
        }
    }
}

/// The access log's sink and, under the journal, its queue.
struct AccessLog {
    sink: Arc<proxy::access_log::Sink>,
    journal_rx: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
}

impl AccessLog {
    /// Under the journal, access events are journal entries; otherwise JSON lines on stdout,
    /// written in batches.
    fn new(registry: &mut Registry) -> AccessLog {
        use proxy::access_log::{JournalSink, JsonSink, Sink};
        if mesh_runtime::telemetry::to_journal() {
            let (sink, rx) = JournalSink::new(registry);
            AccessLog {
                sink: Arc::new(Sink::Journal(sink)),
                journal_rx: Some(rx),
            }
        } else {
            AccessLog {
                sink: Arc::new(Sink::Json(Arc::new(JsonSink::new(registry)))),
                journal_rx: None,
            }
        }
    }

    /// The task that does the sink's I/O; it ends after the drain, writing the last
    /// connections' events.
    fn spawn_writer(&mut self, tasks: &mut JoinSet<()>, shutdown_rx: watch::Receiver<bool>) {
        use proxy::access_log::{JournalSink, Sink};
        match (&*self.sink, self.journal_rx.take()) {
            (Sink::Json(sink), _) => {
                tasks.spawn(sink.clone().run(shutdown_rx));
            }
            (Sink::Journal(_), Some(rx)) => {
                tasks.spawn(JournalSink::run(rx, shutdown_rx));
            }
            (Sink::Journal(_), None) => {}
        }
    }
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
        self.membership.leave(config.gossip.interval).await;
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

/// What this site exports, compiled once per policy snapshot.
fn compile_exports(
    mut policy_rx: watch::Receiver<Arc<mesh_api::policy::Snapshot>>,
    mut shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Arc<mesh_api::policy::Exports>> {
    let first = mesh_api::policy::Exports::new(&policy_rx.borrow_and_update());
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = policy_rx.changed() => if r.is_err() { return },
                _ = drain::until_true(&mut shutdown) => return,
            }
            let exports = mesh_api::policy::Exports::new(&policy_rx.borrow_and_update());
            tx.send_if_modified(|cur| {
                let changed = **cur != exports;
                if changed {
                    *cur = Arc::new(exports);
                }
                changed
            });
        }
    });
    rx
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
