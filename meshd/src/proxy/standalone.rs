//! The proxy on its own, in-process: the inbound port and every service listener of a
//! configuration, over an injected identity, policy and mesh view — no registry, gossip,
//! health checks or admin endpoint. The same pieces the daemon runs (TLS states from
//! certificates, the compiled state, the deny-list, listeners, the drain), driven by watches
//! the caller holds: for in-process tests of proxy behaviour, and for embedding.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::ServiceKey;
use mesh_api::policy::Snapshot;
use mesh_runtime::drain;
use mesh_runtime::lifecycle::{Lifecycle, Phase};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::metrics::Metrics;
use super::shared::Shared;
use super::{access_log, compiled, listeners, observe};
use crate::config::Config;
use crate::identity::Certs;
use crate::membership::MeshView;

/// What the proxy runs on; the caller keeps the senders to change it.
pub struct Inputs {
    /// The node's configuration (listeners, services, timeouts).
    pub config: Config,
    /// Its identity: the trust bundle and a certificate per local service.
    pub certs: Certs,
    /// The policy enforced (`None`: none yet, and the inbound fails closed).
    pub policy: Option<Snapshot>,
    /// Where every service runs.
    pub view: MeshView,
}

/// A running in-process proxy.
pub struct Standalone {
    /// What every connection reads (metrics included).
    pub shared: Shared,
    /// Its metrics, as `/metrics` would show them.
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// The bound inbound (mTLS) port.
    pub inbound: SocketAddr,
    /// The bound upstream listeners: (calling service, upstream service, address).
    pub upstreams: Vec<(ServiceKey, ServiceKey, SocketAddr)>,
    /// Held: the compiled state follows the configuration while this sender lives.
    _config_tx: watch::Sender<Arc<Config>>,
    certs_tx: watch::Sender<Arc<Certs>>,
    policy_tx: watch::Sender<Arc<Snapshot>>,
    synced_tx: watch::Sender<bool>,
    view_tx: watch::Sender<Arc<MeshView>>,
    lifecycle: Arc<Lifecycle>,
    drain: drain::Trigger,
    tasks: JoinSet<()>,
    /// Kept so the listeners' sockets stay open.
    _listeners: listeners::Set,
}

impl Standalone {
    /// Binds the inbound port and the service listeners of `inputs.config` and starts
    /// serving.
    pub async fn start(inputs: Inputs) -> anyhow::Result<Self> {
        mesh_runtime::tls::install_default_provider();
        let lifecycle = Arc::new(Lifecycle::new());
        let (stop_rx, force_rx, shutdown_rx) = (
            lifecycle.reached(Phase::Quiescing),
            lifecycle.reached(Phase::Closing),
            lifecycle.reached(Phase::Stopped),
        );
        let config = Arc::new(inputs.config);
        let (config_tx, config_rx) = watch::channel(config.clone());
        let (certs_tx, certs_rx) = watch::channel(Arc::new(inputs.certs));
        let synced = inputs.policy.is_some();
        let (policy_tx, policy_rx) = watch::channel(Arc::new(inputs.policy.unwrap_or_default()));
        let (synced_tx, policy_synced_rx) = watch::channel(synced);
        let (view_tx, view_rx) = watch::channel(Arc::new(inputs.view));
        let tls_rx = super::tls_updates(certs_rx, shutdown_rx.clone())?;
        let deny_rx = crate::deny::compile(policy_rx.clone(), shutdown_rx.clone());
        let (compiled_rx, _) = compiled::spawn(
            config_rx.clone(),
            policy_rx.clone(),
            view_rx.clone(),
            shutdown_rx.clone(),
        );
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut registry);
        let sink = Arc::new(access_log::JsonSink::new(&mut registry));
        let mut tasks = JoinSet::new();
        tasks.spawn(sink.clone().run(shutdown_rx.clone()));
        let (drain_trigger, drain_watch) = drain::channel();
        let shared = Shared {
            config_rx,
            tls_rx,
            view_rx,
            policy_rx,
            policy_synced_rx,
            deny_rx,
            metrics,
            drain: drain_watch,
            force_rx,
            http: Arc::new(super::http::State::new(&config)),
            pool: Arc::default(),
            compiled_rx,
            edges: Arc::new(observe::Edges::default()),
            tracer: crate::trace::Tracer::disabled(),
            access_log: Arc::new(access_log::Sink::Json(sink)),
        };
        let inbound_listener = super::bind_inbound(&config).await?;
        let inbound = inbound_listener.local_addr()?;
        super::spawn_inbound(
            inbound_listener,
            shared.clone(),
            stop_rx.clone(),
            &mut tasks,
        );
        let mut set = listeners::Set::default();
        let prepared = set.prepare(&listeners::specs(&config)).await?;
        set.apply(prepared, &shared, &stop_rx);
        let upstreams = (set.bound().into_iter())
            .filter_map(|(spec, addr)| match spec {
                listeners::Spec::Upstream(s, u) => Some((s.key, u.service, addr)),
                _ => None,
            })
            .collect();
        lifecycle.set_ready();
        Ok(Self {
            shared,
            registry: Arc::new(registry),
            inbound,
            upstreams,
            _config_tx: config_tx,
            certs_tx,
            policy_tx,
            synced_tx,
            view_tx,
            lifecycle,
            drain: drain_trigger,
            tasks,
            _listeners: set,
        })
    }

    /// The local address of the upstream listener of `source` for `upstream`.
    pub fn upstream(&self, source: &ServiceKey, upstream: &ServiceKey) -> Option<SocketAddr> {
        (self.upstreams.iter())
            .find(|(s, u, _)| s == source && u == upstream)
            .map(|(_, _, addr)| *addr)
    }

    /// Enforces `policy` from now on (open connections are re-decided).
    pub fn set_policy(&self, policy: Snapshot) {
        self.policy_tx.send_replace(Arc::new(policy));
        self.synced_tx.send_replace(true);
    }

    /// Uses `view` from now on.
    pub fn set_view(&self, view: MeshView) {
        self.view_tx.send_replace(Arc::new(view));
    }

    /// Serves with `certs` from now on (a rotation).
    pub fn set_certs(&self, certs: Certs) {
        self.certs_tx.send_replace(Arc::new(certs));
    }

    /// Waits until the compiled state has caught up with the last `set_*` (it is compiled by
    /// a task of its own).
    pub async fn settled(&self) {
        let mut rx = self.shared.compiled_rx.clone();
        let policy = self.policy_tx.borrow().clone();
        let view = self.view_tx.borrow().clone();
        let _ = rx
            .wait_for(|c| Arc::ptr_eq(&c.policy, &policy) && Arc::ptr_eq(&c.view, &view))
            .await;
    }

    /// The daemon's drain without the gossip part: stop accepting, let what is in flight
    /// finish within `grace`, then close the rest and stop.
    pub async fn drain(mut self, grace: Duration) {
        self.lifecycle.advance(Phase::Draining);
        self.lifecycle.advance(Phase::Quiescing);
        if tokio::time::timeout(grace, self.drain.drain())
            .await
            .is_err()
        {
            self.lifecycle.advance(Phase::Closing);
        }
        self.lifecycle.advance(Phase::Stopped);
        while self.tasks.join_next().await.is_some() {}
    }
}
