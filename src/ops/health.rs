//! `GET /health`: 200 once every configured model is loaded, 503 before.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::api::AppState;

/// Liveness plus "the models are loaded": load balancers and the test harness wait on it.
pub(crate) async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.models.all_ready() {
        (StatusCode::OK, Json(json!({"status": "ok"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
    }
}
