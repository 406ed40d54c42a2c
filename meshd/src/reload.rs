//! Hot reload of the node file and the service files (SIGHUP, `systemctl reload meshd`): what a
//! new configuration changes, whether a running node can take it, and applying it whole or not
//! at all.
//!
//! Reloadable: every service file (services added, removed or changed: listeners, upstreams,
//! routes to the app, labels, health checks), the timeouts (`inbound.handshake_timeout`,
//! `outbound.connect_timeout`, `drain.grace_period`) and `[access_log]`. Everything that names the node or a
//! socket it already holds (node name, locality, data and services directories, registry,
//! gossip, inbound and admin addresses, `inbound.max_connections`) takes effect at start only:
//! a reload that changes one is refused, naming the keys, and nothing is changed.
//!
//! Order of an accepted reload: bind the new addresses (a failure refuses the reload and
//! closes what was bound), unpublish removed services, point the app clients at the new
//! config, publish the config to the proxy, identity and admin, swap listeners (a changed
//! listener keeps its socket), then publish new and changed services and restart the health
//! checks that changed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mesh_api::ServiceKey;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument as _, error, info, info_span, warn};

use crate::config::{self, Config, Service};
use crate::health::ServiceHealth;
use crate::membership::Publisher;
use crate::proxy::{self, listeners};

#[cfg(test)]
mod tests;

/// Reload requests waiting at most; more are refused as busy (a reload takes milliseconds).
const QUEUE: usize = 8;

/// Why a reload was refused. The running configuration is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The files do not validate.
    #[error("the new configuration is invalid:\n{0}")]
    Invalid(#[from] config::Error),
    /// Settings that only take effect at start changed.
    #[error(
        "{} only take{} effect when meshd starts (systemctl restart meshd); the reload changed {}",
        .0.join(", "), if .0.len() == 1 { "s" } else { "" }, if .0.len() == 1 { "it" } else { "them" }
    )]
    RestartOnly(Vec<&'static str>),
    /// A new listener could not be bound.
    #[error(transparent)]
    Bind(#[from] proxy::Error),
    /// The node is shutting down, or too many reloads are queued.
    #[error("meshd is not taking reloads now ({0})")]
    Unavailable(&'static str),
}

/// What an applied reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Services that appeared.
    pub added: Vec<String>,
    /// Services that went away.
    pub removed: Vec<String>,
    /// Services whose file changed.
    pub changed: Vec<String>,
    /// Listeners bound, given new settings (same socket), and closed.
    pub listeners: [usize; 3],
    /// Whether a reloadable node setting (a timeout, the access log) changed.
    pub settings: bool,
}

/// The outcome of the last reload, for `/config_dump`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// Number of reloads applied since start (the running config is generation N).
    pub generation: u64,
    /// Reloads refused since start.
    pub refused: u64,
    /// Unix time of the last reload attempt (0 before any).
    pub last_attempt: u64,
    /// Whether the last attempt was applied (true before any).
    pub last_ok: bool,
    /// Why the last attempt was refused.
    pub last_error: Option<String>,
    /// What the last applied reload changed.
    pub last_applied: Option<Summary>,
}

impl Status {
    /// Before any reload.
    pub fn initial() -> Status {
        Status {
            last_ok: true,
            ..Status::default()
        }
    }
}

/// How services differ between two configurations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceDiff {
    /// In the new configuration only.
    pub added: Vec<ServiceKey>,
    /// In the old configuration only.
    pub removed: Vec<ServiceKey>,
    /// In both, with any difference.
    pub changed: Vec<ServiceKey>,
}

/// The keys whose change needs a restart: those differing between `old` and `new`.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key: &'static str, differs: bool| {
        if differs {
            keys.push(key);
        }
    };
    check("node_name", old.node_name != new.node_name);
    check("datacenter", old.datacenter != new.datacenter);
    check("zone", old.zone != new.zone);
    check("site", old.site != new.site);
    check("east_west", old.east_west != new.east_west);
    check("data_dir", old.data_dir != new.data_dir);
    check("services_dir", old.services_dir != new.services_dir);
    check(
        "registry.address",
        old.registry.address != new.registry.address,
    );
    check(
        "registry.join_token_file",
        old.registry.join_token_file != new.registry.join_token_file,
    );
    check(
        "registry.connect_timeout",
        old.registry.connect_timeout != new.registry.connect_timeout,
    );
    check(
        "registry.request_timeout",
        old.registry.request_timeout != new.registry.request_timeout,
    );
    check("gossip.bind", old.gossip.bind != new.gossip.bind);
    check(
        "gossip.advertise",
        old.gossip.advertise != new.gossip.advertise,
    );
    check("gossip.seeds", old.gossip.seeds != new.gossip.seeds);
    check(
        "gossip.interval",
        old.gossip.interval != new.gossip.interval,
    );
    check(
        "gossip.cluster_id",
        old.gossip.cluster_id != new.gossip.cluster_id,
    );
    check("inbound.bind", old.inbound.bind != new.inbound.bind);
    check(
        "inbound.advertise",
        old.inbound.advertise != new.inbound.advertise,
    );
    check(
        "inbound.max_connections",
        old.inbound.max_connections != new.inbound.max_connections,
    );
    check("admin.bind", old.admin.bind != new.admin.bind);
    check(
        "telemetry.report_interval",
        old.telemetry.report_interval != new.telemetry.report_interval,
    );
    check(
        "tracing.collector",
        old.telemetry.tracing.collector != new.telemetry.tracing.collector,
    );
    check(
        "tracing.sampling",
        old.telemetry.tracing.sampling != new.telemetry.tracing.sampling,
    );
    keys
}

/// Whether a reloadable node setting changed.
pub fn settings_changed(old: &Config, new: &Config) -> bool {
    old.inbound.handshake_timeout != new.inbound.handshake_timeout
        || old.outbound.connect_timeout != new.outbound.connect_timeout
        || old.drain.grace_period != new.drain.grace_period
        || old.telemetry.access_log != new.telemetry.access_log
}

/// Services added, removed and changed from `old` to `new`, each in key order.
pub fn diff_services(old: &[Service], new: &[Service]) -> ServiceDiff {
    let old: BTreeMap<&ServiceKey, &Service> = old.iter().map(|s| (&s.key, s)).collect();
    let new: BTreeMap<&ServiceKey, &Service> = new.iter().map(|s| (&s.key, s)).collect();
    let mut d = ServiceDiff::default();
    for (k, n) in &new {
        match old.get(k) {
            None => d.added.push((*k).clone()),
            Some(o) if o != n => d.changed.push((*k).clone()),
            Some(_) => {}
        }
    }
    d.removed = (old.keys())
        .filter(|k| !new.contains_key(*k))
        .map(|k| (*k).clone())
        .collect();
    d
}

/// Asks the running node to reload.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
}

struct Request {
    source: Source,
    reply: oneshot::Sender<Result<Summary, String>>,
}

enum Source {
    /// Read the node file (and the services directory it names) again.
    File(PathBuf),
    /// A configuration loaded by the caller.
    Config(Box<Config>),
}

impl Handle {
    /// Reloads from the node file at `path`: `Ok` with what changed, or `Err` with why
    /// nothing did (also logged and counted by the node).
    pub async fn reload_file(&self, path: PathBuf) -> Result<Summary, String> {
        self.send(Source::File(path)).await
    }

    /// Applies `config` as a reload.
    pub async fn apply(&self, config: Config) -> Result<Summary, String> {
        self.send(Source::Config(Box::new(config))).await
    }

    async fn send(&self, source: Source) -> Result<Summary, String> {
        let (reply, rx) = oneshot::channel();
        let req = Request { source, reply };
        if let Err(e) = self.tx.try_send(req) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "too many reloads queued",
                mpsc::error::TrySendError::Closed(_) => "shutting down",
            };
            return Err(Refusal::Unavailable(why).to_string());
        }
        rx.await
            .unwrap_or_else(|_| Err(Refusal::Unavailable("shutting down").to_string()))
    }
}

/// Reload metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    reloads: Family<ResultLabels, Counter>,
    last_ok: Gauge,
    last_success: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

impl Metrics {
    /// Registers the reload metrics.
    pub fn new(reg: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        reg.register(
            "meshd_config_reloads",
            "Configuration reloads, by result (applied, refused)",
            m.reloads.clone(),
        );
        reg.register(
            "meshd_config_last_reload_successful",
            "1 if the last reload was applied (or none was tried), 0 if it was refused",
            m.last_ok.clone(),
        );
        reg.register(
            "meshd_config_last_reload_success_timestamp_seconds",
            "Unix time the running configuration was loaded (start or last applied reload)",
            m.last_success.clone(),
        );
        m.last_ok.set(1);
        m.last_success.set(unix_now() as i64);
        m
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One local service as published, with its health checks.
struct Published {
    svc: Service,
    /// Present for a service with checks.
    health: Option<Health>,
}

struct Health {
    rx: watch::Receiver<ServiceHealth>,
    /// Stops the checks.
    stop: watch::Sender<bool>,
    /// Publishes the health by gossip.
    publisher: (watch::Sender<bool>, JoinHandle<()>),
}

/// Owns everything a reload changes; runs as one task, so reloads apply one at a time.
pub struct Reloader {
    config_tx: watch::Sender<Arc<Config>>,
    listeners: listeners::Set,
    shared: proxy::Shared,
    stop_rx: watch::Receiver<bool>,
    publisher: Publisher,
    services: BTreeMap<ServiceKey, Published>,
    status_tx: watch::Sender<Status>,
    metrics: Metrics,
}

impl Reloader {
    /// Starts the listeners of `prepared` and the health checks of the configured services.
    /// `publisher` has already published every service (healthy iff it has no checks).
    pub fn start(
        config_tx: watch::Sender<Arc<Config>>,
        prepared: listeners::Prepared,
        shared: proxy::Shared,
        stop_rx: watch::Receiver<bool>,
        publisher: Publisher,
        metrics: Metrics,
        status_tx: watch::Sender<Status>,
    ) -> Reloader {
        let mut set = listeners::Set::default();
        set.apply(prepared, &shared, &stop_rx);
        let config = config_tx.borrow().clone();
        let mut services = BTreeMap::new();
        for svc in &config.services {
            let health = start_health(&publisher, svc, None);
            services.insert(
                svc.key.clone(),
                Published {
                    svc: svc.clone(),
                    health,
                },
            );
        }
        Reloader {
            config_tx,
            listeners: set,
            shared,
            stop_rx,
            publisher,
            services,
            status_tx,
            metrics,
        }
    }

    /// The bound per-service listeners.
    pub fn bound(&self) -> Vec<(listeners::Spec, std::net::SocketAddr)> {
        self.listeners.bound()
    }

    /// Serves reload requests until `shutdown`; then stops the health checks.
    pub fn spawn(self, mut shutdown: watch::Receiver<bool>) -> (Handle, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Request>(QUEUE);
        let mut me = self;
        let task = tokio::spawn(
            async move {
                loop {
                    let req = tokio::select! {
                        r = rx.recv() => match r { Some(r) => r, None => break },
                        _ = mesh_runtime::drain::until_true(&mut shutdown) => break,
                    };
                    let outcome = me.handle(req.source).await;
                    let _ = req.reply.send(outcome);
                }
                for (_, p) in std::mem::take(&mut me.services) {
                    if let Some(h) = p.health {
                        stop_health(h).await;
                    }
                }
            }
            .instrument(info_span!("reload")),
        );
        (Handle { tx }, task)
    }

    async fn handle(&mut self, source: Source) -> Result<Summary, String> {
        // systemd (Type=notify) shows the unit as reloading until READY=1. MONOTONIC_USEC is
        // only required by Type=notify-reload, which Debian 12's systemd 252 lacks.
        let _ = mesh_runtime::sd_notify::notify("RELOADING=1\nSTATUS=reloading");
        let new = match source {
            Source::File(path) => {
                // Small files; read off the runtime's workers all the same.
                let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
                match loaded {
                    Ok(r) => r.map_err(Refusal::from),
                    Err(_) => Err(Refusal::Unavailable("config loader failed")),
                }
            }
            Source::Config(c) => Ok(*c),
        };
        let outcome = match new {
            Ok(new) => self.apply(new).await,
            Err(e) => Err(e),
        };
        let now = unix_now();
        let status = match &outcome {
            Ok(summary) => {
                self.metrics
                    .reloads
                    .get_or_create(&ResultLabels { result: "applied" })
                    .inc();
                self.metrics.last_ok.set(1);
                self.metrics.last_success.set(now as i64);
                info!(reload.result = "applied", %summary, "configuration reloaded");
                let summary = summary.clone();
                self.status_tx.send_modify(|s| {
                    s.generation += 1;
                    s.last_attempt = now;
                    s.last_ok = true;
                    s.last_error = None;
                    s.last_applied = Some(summary);
                });
                "STATUS=serving".to_owned()
            }
            Err(e) => {
                self.metrics
                    .reloads
                    .get_or_create(&ResultLabels { result: "refused" })
                    .inc();
                self.metrics.last_ok.set(0);
                error!(reload.result = "refused", error = %e, "configuration reload refused; the running configuration is unchanged");
                let text = e.to_string();
                self.status_tx.send_modify(|s| {
                    s.refused += 1;
                    s.last_attempt = now;
                    s.last_ok = false;
                    s.last_error = Some(text);
                });
                "STATUS=serving (last reload refused: see the log)".to_owned()
            }
        };
        let _ = mesh_runtime::sd_notify::notify(&format!("READY=1\n{status}"));
        outcome.map_err(|e| e.to_string())
    }

    async fn apply(&mut self, new: Config) -> Result<Summary, Refusal> {
        let old = self.config_tx.borrow().clone();
        let restart = restart_only_changes(&old, &new);
        if !restart.is_empty() {
            return Err(Refusal::RestartOnly(restart));
        }
        let diff = diff_services(&old.services, &new.services);
        // The only fallible step, first: nothing has changed if it fails.
        let prepared = self.listeners.prepare(&listeners::specs(&new)).await?;
        let ldiff = prepared.diff().clone();
        let summary = Summary {
            added: diff.added.iter().map(ToString::to_string).collect(),
            removed: diff.removed.iter().map(ToString::to_string).collect(),
            changed: diff.changed.iter().map(ToString::to_string).collect(),
            listeners: [ldiff.bind.len(), ldiff.replace.len(), ldiff.stop.len()],
            settings: settings_changed(&old, &new),
        };

        // Removed services leave gossip first, so peers stop choosing this node for them.
        for key in &diff.removed {
            self.publisher.remove_service(key).await;
            if let Some(p) = self.services.remove(key)
                && let Some(h) = p.health
            {
                stop_health(h).await;
            }
        }
        self.shared.http.reconfigure(&new);
        let new = Arc::new(new);
        self.config_tx.send_replace(new.clone());
        self.listeners.apply(prepared, &self.shared, &self.stop_rx);

        self.publish_gateways(&old, &new).await;
        for svc in new.services.iter().filter(|s| diff.added.contains(&s.key)) {
            self.publisher.set_service(svc, svc.checks.is_empty()).await;
            let health = start_health(&self.publisher, svc, None);
            self.services.insert(
                svc.key.clone(),
                Published {
                    svc: svc.clone(),
                    health,
                },
            );
        }
        for svc in new
            .services
            .iter()
            .filter(|s| diff.changed.contains(&s.key))
        {
            let Some(old) = self.services.remove(&svc.key) else {
                continue;
            };
            let health = self.change_service(old, svc).await;
            self.services.insert(
                svc.key.clone(),
                Published {
                    svc: svc.clone(),
                    health,
                },
            );
        }
        Ok(summary)
    }

    /// Follows the gateways this node runs in gossip: gateways dropped (and not now declared
    /// as services) leave, new ones join.
    async fn publish_gateways(&self, old: &Config, new: &Config) {
        let before: Vec<_> = crate::membership::gateways_to_publish(old).collect();
        let after: Vec<_> = crate::membership::gateways_to_publish(new).collect();
        for gw in before.iter().filter(|g| !after.contains(g)) {
            if !new.services.iter().any(|s| s.key == **gw) {
                self.publisher.remove_service(gw).await;
            }
        }
        for gw in after.iter().filter(|g| !before.contains(g)) {
            self.publisher.set_gateway(gw).await;
        }
    }

    /// Republishes a changed service; its checks keep running when they did not change, and
    /// otherwise restart with the old health published until every new check has run.
    async fn change_service(&self, old: Published, svc: &Service) -> Option<Health> {
        let healthy = old.health.as_ref().is_none_or(|h| h.rx.borrow().healthy);
        match old.health {
            Some(h) if old.svc.checks == svc.checks => {
                let (stop, task) = h.publisher;
                stop.send_replace(true);
                let _ = task.await;
                self.publisher.set_service(svc, healthy).await;
                let publisher = spawn_publisher(&self.publisher, svc, h.rx.clone(), Some(healthy));
                Some(Health {
                    rx: h.rx,
                    stop: h.stop,
                    publisher,
                })
            }
            h => {
                if let Some(h) = h {
                    stop_health(h).await;
                }
                // Without checks a service is always healthy; with new ones, the old health
                // stands until they have all run.
                let healthy = healthy || svc.checks.is_empty();
                self.publisher.set_service(svc, healthy).await;
                start_health(&self.publisher, svc, Some(healthy))
            }
        }
    }
}

/// Starts the checks of `svc` (if it has any) and the task publishing their outcome.
fn start_health(publisher: &Publisher, svc: &Service, published: Option<bool>) -> Option<Health> {
    if svc.checks.is_empty() {
        return None;
    }
    let (stop, stop_rx) = watch::channel(false);
    let rx = crate::health::spawn(svc.key.clone(), svc.checks.clone(), stop_rx);
    let publisher = spawn_publisher(publisher, svc, rx.clone(), published);
    Some(Health {
        rx,
        stop,
        publisher,
    })
}

fn spawn_publisher(
    publisher: &Publisher,
    svc: &Service,
    rx: watch::Receiver<ServiceHealth>,
    published: Option<bool>,
) -> (watch::Sender<bool>, JoinHandle<()>) {
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(publisher.publish_health(svc, rx, published, stop_rx));
    (stop, task)
}

async fn stop_health(h: Health) {
    h.stop.send_replace(true);
    let (stop, task) = h.publisher;
    stop.send_replace(true);
    if let Err(e) = task.await {
        warn!(error = %e, "health publisher ended badly");
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(" ")
            }
        };
        let [bound, replaced, closed] = self.listeners;
        write!(
            f,
            "services added: {}; removed: {}; changed: {}; listeners bound {bound}, updated {replaced}, closed {closed}{}",
            list(&self.added),
            list(&self.removed),
            list(&self.changed),
            if self.settings {
                "; settings changed"
            } else {
                ""
            }
        )
    }
}
