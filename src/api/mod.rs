//! HTTP surface: shared state, the router, and the parts both APIs use.

pub(crate) mod admin;
pub(crate) mod anthropic;
pub(crate) mod body;
pub(crate) mod guard;
pub(crate) mod ollama;
pub(crate) mod openai;
#[cfg(test)]
mod prop_tests;
pub(crate) mod request;
pub(crate) mod routed;
pub(crate) mod structured;
pub(crate) mod tools;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use crate::config::security::SecurityConfig;
use crate::config::ServerConfig;
use crate::models::Models;
use crate::ops;
use body::BodyLimit;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The servable models and the loaded ones.
    pub models: Arc<Models>,
    /// Renders `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Unix time the server started (the `created` of listed models).
    pub started_at: i64,
    /// Cloud upstreams and failover.
    pub router: Arc<crate::router::Router>,
    /// Keys, limits, audit.
    pub security: Arc<crate::security::Security>,
    /// The compute backend and its devices (`None` if llama.cpp could not say).
    pub compute: Option<Arc<crate::engine::Compute>>,
}

/// The whole application.
pub fn router(state: AppState, server: &ServerConfig, security: &SecurityConfig) -> Router {
    let max_body_bytes = server.max_body_bytes;
    let host_guard = Arc::new(guard::HostGuard::new(server.listen));
    let rules = Arc::clone(&state.security);
    let mut app = Router::new()
        .merge(openai::routes())
        .merge(ollama::routes())
        .route("/health", get(ops::health::health))
        .route("/health/ready", get(ops::health::ready))
        .route("/metrics", get(ops::metrics::render))
        .route(
            "/admin/contingency",
            get(admin::contingency).post(admin::set_contingency),
        )
        .route("/admin/router", get(admin::router))
        .route("/v1/messages", axum::routing::post(anthropic::messages))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(Extension(BodyLimit(max_body_bytes)))
        // Request spans for `BACKSTOP_LOG=tower_http=debug`; the access log itself is
        // `security::access` (one line per request at info). 5xx answers are already
        // explained where they arise (a 503 while loading is expected), so failures here are
        // debug lines too.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::DEBUG)));
    if let Some(t) = security.request_timeout {
        // Until the response starts; a stream then runs on (its length is bounded by
        // max_tokens).
        app = app.layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            t,
        ));
    }
    app.layer(axum::middleware::from_fn_with_state(
        rules,
        crate::security::guard,
    ))
    .layer(guard::cors(server.origins.clone()))
    .layer(axum::middleware::from_fn_with_state(
        host_guard,
        guard::host_guard,
    ))
    .with_state(state)
}

/// Unknown paths answer in the shape of the API they look like.
async fn fallback(uri: Uri) -> Response {
    if uri.path().starts_with("/api/") {
        ollama::OllamaError::not_found(format!("404 page not found: {}", uri.path()))
            .into_response()
    } else {
        openai::fallback(uri).await.into_response()
    }
}
