//! `/admin/*`: run-time switches for operators. `GET`/`POST /admin/contingency` turn
//! contingency mode (everything local) on and off; `GET /admin/router` shows the upstreams
//! and their breakers.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::body::{BodyError, JsonBody};
use super::AppState;

fn bad(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"message": message.into(), "type": "invalid_request_error", "param": null, "code": null}})),
    )
        .into_response()
}

/// `GET /admin/contingency`.
pub(crate) async fn contingency(State(state): State<AppState>) -> Json<Value> {
    Json(json!(state.router.contingency()))
}

/// `POST /admin/contingency {"enabled": bool}`.
pub(crate) async fn set_contingency(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return bad(e.to_string()),
    };
    match body.0.get("enabled").and_then(Value::as_bool) {
        Some(enabled) => {
            crate::security::audit::note(|r| {
                r.event = Some("contingency".into());
                r.detail = Some(format!("enabled={enabled}"));
            });
            Json(json!(state.router.set_contingency(enabled, "admin"))).into_response()
        }
        None => bad("expected {\"enabled\": true | false}"),
    }
}

/// `GET /admin/router`: the mode, contingency and every upstream's breaker.
pub(crate) async fn router(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "mode": match state.router.mode() {
            crate::config::RouteMode::CloudFirst => "cloud-first",
            crate::config::RouteMode::LocalOnly => "local-only",
        },
        "contingency": state.router.contingency(),
        "upstreams": state.router.status(),
    }))
}
