//! The registry's admin HTTP endpoint (loopback by default): `/live`, `/ready`, `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// Builds the admin router over the process's metrics registry.
pub fn router(metrics: Arc<prometheus_client::registry::Registry>) -> Router {
    Router::new()
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics_handler))
        .with_state(metrics)
}

async fn metrics_handler(
    State(reg): State<Arc<prometheus_client::registry::Registry>>,
) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &reg) {
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
