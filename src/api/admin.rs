//! `/admin/*`: run-time switches for operators. `GET`/`POST /admin/contingency` turn
//! contingency mode (everything local) on and off; `GET /admin/router` shows the upstreams
//! and their breakers.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::time::SystemTime;

use super::body::{BodyError, JsonBody};
use super::AppState;
use crate::config::parse_timeout;

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

/// `POST /admin/contingency {"enabled": bool, "for": "30m"}`: `for` (switching on only) ends
/// contingency by itself after that long.
pub(crate) async fn set_contingency(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return bad(e.to_string()),
    };
    let Some(enabled) = body.0.get("enabled").and_then(Value::as_bool) else {
        return bad("expected {\"enabled\": true | false} (and, switching on, \"for\": \"30m\")");
    };
    // `for`, as given and as a deadline.
    let hold = match body.0.get("for") {
        None | Some(Value::Null) => None,
        Some(_) if !enabled => {
            return bad("`for` says how long contingency stays on: it goes with \"enabled\": true")
        }
        Some(Value::String(text)) => match parse_timeout(text) {
            Ok(d) => match SystemTime::now().checked_add(d) {
                Some(t) => Some((text.as_str(), t)),
                None => return bad(format!("`for`: {text} is too long")),
            },
            Err(e) => return bad(format!("`for`: {e}")),
        },
        Some(other) => return bad(format!("`for` is a duration such as \"30m\", not {other}")),
    };
    crate::security::audit::note(|r| {
        r.event = Some("contingency".into());
        r.detail = Some(match hold {
            Some((text, _)) => format!("enabled=true for={text}"),
            None => format!("enabled={enabled}"),
        });
    });
    let until = hold.map(|(_, t)| t);
    Json(json!(state.router.set_contingency(enabled, "admin", until))).into_response()
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
