//! The registry's admin HTTP endpoint (loopback by default): `/live`, `/ready`, `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use mesh_runtime::lifecycle::Phase;
use tokio::sync::watch;

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    /// The process's metrics.
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// The registry's phase: `/ready` is 200 only while it is ready (not while starting or
    /// draining, so a load balancer takes it out before it stops answering).
    pub phase_rx: watch::Receiver<Phase>,
}

/// Builds the admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

async fn ready_handler(State(s): State<AdminState>) -> impl IntoResponse {
    let phase = *s.phase_rx.borrow();
    if phase == Phase::Ready {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", phase.as_str()),
        )
    }
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    let reg = &s.metrics;
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, reg) {
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
