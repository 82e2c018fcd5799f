//! Ollama's native API under `/api`, so Ollama's clients and tools work unchanged.

pub(crate) mod convert;
mod embed;
mod error;
mod handlers;
mod ndjson;
mod pull;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, head, post};
use axum::Router;

use super::AppState;
pub(crate) use error::OllamaError;

/// Routes for `/` and `/api/*`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(handlers::root))
        .route("/api/version", get(handlers::version))
        .route("/api/generate", post(handlers::generate))
        .route("/api/chat", post(handlers::chat))
        .route("/api/tags", get(handlers::tags))
        .route("/api/ps", get(handlers::ps))
        .route("/api/show", post(handlers::show))
        .route("/api/embed", post(embed::embed))
        .route("/api/embeddings", post(embed::embeddings))
        .route("/api/delete", delete(handlers::delete))
        .route("/api/copy", post(handlers::copy))
        .route("/api/create", post(handlers::create))
        .route("/api/pull", post(pull::pull))
        .route(
            "/api/blobs/{digest}",
            head(handlers::blob_exists)
                // Model files are gigabytes: streamed to disk, never held in memory, so the
                // request body limit does not apply here.
                .post(handlers::blob_upload)
                .layer(DefaultBodyLimit::disable()),
        )
}
