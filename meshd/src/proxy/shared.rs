//! What every connection task reads: the node's watches (configuration, TLS, view, policy,
//! revocations, compiled state), metrics, the drain, pools and the observability sinks.

use std::sync::Arc;

use mesh_runtime::drain;
use tokio::sync::watch;

use super::{access_log, compiled, http, metrics::Metrics, observe, pool, tls};
use crate::config::Config;
use crate::membership::MeshView;

/// Inputs every connection task reads.
#[derive(Clone)]
pub struct Shared {
    /// Node configuration, replaced by a reload. Each connection reads it once, when it is
    /// accepted, and keeps that snapshot.
    pub config_rx: watch::Receiver<Arc<Config>>,
    /// Current TLS configs.
    pub tls_rx: watch::Receiver<Arc<tls::TlsState>>,
    /// Current mesh view.
    pub view_rx: watch::Receiver<Arc<MeshView>>,
    /// The policy enforced at the inbound; owned by discovery. Each connection watches it and
    /// is closed when a change no longer allows it.
    pub policy_rx: watch::Receiver<Arc<mesh_api::policy::Snapshot>>,
    /// `true` once a policy snapshot is in place (persisted, or from the registry). Until then
    /// the inbound fails closed: TCP callers are reset, HTTP callers get 503
    /// `inbound/no_policy` — an empty policy would allow everything.
    pub policy_synced_rx: watch::Receiver<bool>,
    /// Revoked certificates (compiled from the policy snapshot): checked after every TLS
    /// handshake, and watched by every open mTLS connection, which is closed on revocation.
    pub deny_rx: watch::Receiver<Arc<mesh_api::policy::DenyList>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Held by each connection; the drain waits for all of them.
    pub drain: drain::Watch,
    /// Turns `true` when the grace period is over: open connections are closed.
    pub force_rx: watch::Receiver<bool>,
    /// HTTP clients of local apps.
    pub http: Arc<http::State>,
    /// HTTP/2 connections to other hosts.
    pub pool: Arc<pool::Pool>,
    /// Derived state (routes, destinations with their endpoints and live state, limiters),
    /// compiled once per change of policy, membership or configuration.
    pub compiled_rx: watch::Receiver<Arc<compiled::Compiled>>,
    /// Per-edge traffic since the last report to the registry.
    pub edges: Arc<observe::Edges>,
    /// Spans of HTTP hops (disabled without a collector: context passes through).
    pub tracer: crate::trace::Tracer,
    /// Where access-log events go: the journal under systemd, JSON lines on stdout otherwise.
    pub access_log: Arc<access_log::Sink>,
}

impl Shared {
    /// Whether a policy snapshot is in place (else the inbound refuses callers).
    pub fn has_policy(&self) -> bool {
        *self.policy_synced_rx.borrow()
    }

    /// The current configuration.
    pub fn config(&self) -> Arc<Config> {
        self.config_rx.borrow().clone()
    }

    /// The current compiled state.
    pub fn compiled(&self) -> Arc<compiled::Compiled> {
        self.compiled_rx.borrow().clone()
    }
}

impl super::connect::Env for Shared {
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn config(&self) -> Arc<Config> {
        Shared::config(self)
    }

    fn deny_rx(&self) -> &watch::Receiver<Arc<mesh_api::policy::DenyList>> {
        &self.deny_rx
    }

    fn force_rx(&self) -> &watch::Receiver<bool> {
        &self.force_rx
    }
}

impl observe::Env for Shared {
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn config(&self) -> Arc<Config> {
        Shared::config(self)
    }

    fn edges(&self) -> &observe::Edges {
        &self.edges
    }

    fn access_log(&self) -> &access_log::Sink {
        &self.access_log
    }
}
