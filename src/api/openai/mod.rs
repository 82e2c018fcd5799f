//! The OpenAI-compatible API under `/v1`.

pub(crate) mod convert;
mod embeddings;
mod error;
pub(crate) mod handlers;
mod sse;
mod types;

use axum::http::Uri;
use axum::routing::{get, post};
use axum::Router;

use super::AppState;
pub(crate) use error::ApiError;
pub(crate) use sse::Kind;

/// Routes for `/v1/*`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{*id}", get(handlers::get_model))
}

/// Unknown paths answer in OpenAI's error shape.
pub(crate) async fn fallback(uri: Uri) -> ApiError {
    ApiError::no_route(uri.path())
}
