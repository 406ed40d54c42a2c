//! meshd's admin endpoint (loopback by default; it exposes topology and config, so keep it off
//! public interfaces): `/live`, `/ready`, `/metrics` (Prometheus text), `/config_dump` (JSON)
//! and `/members` (JSON). Built as a plain axum `Router` so tests can call it directly.

use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;
use tokio::sync::watch;

use crate::config::Config;
use crate::discovery;
use crate::identity::Certs;
use crate::membership::{Liveness, MeshView};

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    /// Node configuration (the one in force: replaced by each applied reload).
    pub config_rx: watch::Receiver<Arc<Config>>,
    /// Outcome of the last reload.
    pub reload_rx: watch::Receiver<crate::reload::Status>,
    /// The node's phase: ready once listeners are bound, certificates loaded and a policy
    /// snapshot is in place; draining and after, not ready again.
    pub phase_rx: watch::Receiver<mesh_runtime::lifecycle::Phase>,
    /// Metrics registry.
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// Identity snapshot, set once the node has joined (the endpoint serves before that).
    pub certs_rx: Arc<OnceLock<watch::Receiver<Arc<Certs>>>>,
    /// Mesh view, set once gossip has started.
    pub view_rx: Arc<OnceLock<watch::Receiver<Arc<MeshView>>>>,
    /// Every known node's liveness (dead ones too), set once gossip has started.
    pub liveness_rx: Arc<OnceLock<watch::Receiver<Arc<Vec<Liveness>>>>>,
    /// The policy being enforced (revision 0 and empty until a snapshot is in place).
    pub policy_rx: watch::Receiver<Arc<mesh_api::policy::Snapshot>>,
    /// `true` once a policy snapshot is in place; owned by discovery.
    pub policy_synced_rx: watch::Receiver<bool>,
    /// Resources of the enforced snapshot this node could not read; owned by discovery.
    pub policy_unreadable_rx: watch::Receiver<Arc<Vec<discovery::standin::Unreadable>>>,
    /// What this host does for each gateway it runs; owned by the gateway task.
    pub gateways_rx: watch::Receiver<Gateways>,
}

/// Status of each gateway this host runs, by `namespace/name`.
pub type Gateways =
    std::collections::BTreeMap<mesh_api::ServiceKey, crate::proxy::gateway::run::Status>;

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/config_dump", get(config_dump))
        .route("/members", get(members))
        .route("/gateways", get(gateways))
        .with_state(state)
}

/// `/gateways`: each gateway this host runs and what it does for it, as JSON.
async fn gateways(State(s): State<AdminState>) -> Response {
    let by_name: std::collections::BTreeMap<String, crate::proxy::gateway::run::Status> =
        (s.gateways_rx.borrow().iter())
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
    axum::Json(by_name).into_response()
}

async fn ready(State(s): State<AdminState>) -> Response {
    if *s.phase_rx.borrow() == mesh_runtime::lifecycle::Phase::Ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        // Say why, so an operator does not have to read the log to learn it.
        let why = if *s.policy_synced_rx.borrow() {
            "starting or draining"
        } else {
            "no policy snapshot yet (none persisted, or the persisted one was unusable): \
             waiting for the registry; the inbound refuses callers until then"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.metrics) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn config_dump(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let identity = s.certs_rx.get().map(|rx| {
        let c = rx.borrow().clone();
        json!({
            "trust_domain": c.trust_domain.to_string(),
            "node_cert_not_after": unix(c.node_not_after),
            "workloads": c.workloads.iter().map(|(k, w)| json!({
                "service": k.to_string(),
                "identity": mesh_api::Identity::workload(&c.trust_domain, k).to_string(),
                "not_before": unix(w.not_before),
                "not_after": unix(w.not_after),
            })).collect::<Vec<_>>(),
        })
    });
    let policy = s.policy_rx.borrow().clone();
    let config = s.config_rx.borrow().clone();
    let effective: serde_json::Map<String, serde_json::Value> = config
        .services
        .iter()
        .map(|svc| {
            let keys = discovery::effective(&policy, &svc.key, &svc.labels);
            (
                svc.key.to_string(),
                keys.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    // The mTLS mode each local service enforces (plaintext accepted on `listen` only when
    // permissive).
    let mtls: serde_json::Map<String, serde_json::Value> = (config.services.iter())
        .map(|svc| {
            let workload = mesh_api::policy::authz::Workload {
                service: &svc.key,
                labels: &svc.labels,
            };
            let mode = mesh_api::policy::authz::mtls_mode(&policy, &workload);
            (svc.key.to_string(), mode.to_string().into())
        })
        .collect();
    Json(json!({
        "config": &*config,
        "reload": &*s.reload_rx.borrow(),
        "identity": identity,
        "policy": {
            "revision": policy.revision,
            "resources": policy.resources.len(),
            "effective": effective,
            "mtls": mtls,
            "in_place": *s.policy_synced_rx.borrow(),
            "unreadable": &*s.policy_unreadable_rx.borrow().clone(),
            "path_normalization": policy.mesh_config().path_normalization.as_str(),
        },
        "ready": *s.phase_rx.borrow() == mesh_runtime::lifecycle::Phase::Ready,
        "phase": s.phase_rx.borrow().as_str(),
    }))
}

async fn members(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let view = s
        .view_rx
        .get()
        .map(|rx| rx.borrow().clone())
        .unwrap_or_default();
    let liveness = (s.liveness_rx.get())
        .map(|rx| rx.borrow().clone())
        .unwrap_or_default();
    Json(json!({
        "liveness": *liveness,
        "members": view.members,
        "endpoints": view.endpoints.iter().map(|(k, v)| (k.to_string(), v)).collect::<std::collections::BTreeMap<_, _>>(),
        // The other sites, nearest first, with the round trip this site's gateways measured.
        "sites": view.sites,
    }))
}
