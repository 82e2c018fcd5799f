//! HTTP surface: shared state, the router, and the parts both APIs use.

pub(crate) mod body;
pub(crate) mod openai;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::{Extension, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use crate::models::Registry;
use crate::ops;
use body::BodyLimit;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The served models.
    pub models: Arc<Registry>,
    /// Renders `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Unix time the server started (the `created` of listed models).
    pub started_at: i64,
}

/// The whole application.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .merge(openai::routes())
        .route("/health", get(ops::health::health))
        .route("/metrics", get(ops::metrics::render))
        .fallback(openai::fallback)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(Extension(BodyLimit(max_body_bytes)))
        // 5xx answers are already explained where they arise (a 503 while loading is
        // expected); the access log proper arrives with the operations work.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::DEBUG)))
        .with_state(state)
}
