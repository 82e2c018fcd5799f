//! `POST /v1/messages`: Anthropic-SDK clients. The request is translated to the OpenAI
//! dialect every backend speaks, routed like any chat (cloud first for models an upstream
//! serves, else the local model), and the answer goes back in Anthropic's shape, whole or as
//! Anthropic's event stream. Errors use Anthropic's `{"type": "error", "error": {...}}`.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::body::{BodyError, JsonBody};
use super::openai;
use super::routed::{self, Served};
use super::AppState;
use crate::router::anthropic::client_reply::openai_response_to_anthropic;
use crate::router::anthropic::client_request::anthropic_request_to_openai;
use crate::router::anthropic::client_stream::{ErrorKind, OpenAiToAnthropic};
use crate::router::reply::{ChunkStream, Reply};

/// Anthropic's error `type` for an HTTP status.
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error response in Anthropic's shape.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"type": "error", "error": {"type": error_type(status), "message": message.into()}})),
    )
        .into_response()
}

/// An OpenAI-shaped error (from a backend) in Anthropic's shape.
fn from_openai(status: StatusCode, body: &Value) -> Response {
    let message = body["error"]["message"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_owned);
    error(status, message)
}

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    local_only: Option<axum::Extension<crate::security::LocalOnly>>,
    body: Result<JsonBody, BodyError>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e @ BodyError::TooLarge(_)) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let request = match anthropic_request_to_openai(&body.0) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{}: {}", e.param, e.message),
            )
        }
    };
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    let answer = if state.router.serves(&model) {
        routed::chat(&state, &headers, &request, &model, local_only.is_some())
            .await
            .map_err(|(status, body, served)| (from_openai(status, &body), served))
    } else {
        local(&state, &request, &model).await.map_err(|r| (r, None))
    };
    match answer {
        Ok((reply, served, reason)) => {
            let routed = matches!(served, Served::Cloud(_)) || reason.is_some();
            let resp = render(reply, &model);
            if routed {
                routed::mark(resp, &served, reason)
            } else {
                resp
            }
        }
        Err((resp, Some(served))) => routed::mark(resp, &served, None),
        Err((resp, None)) => resp,
    }
}

/// The local model's answer for a model no upstream serves.
async fn local(
    state: &AppState,
    request: &Value,
    model: &str,
) -> Result<(Reply, Served, Option<crate::router::failure::FailReason>), Response> {
    let err = |e: openai::ApiError| from_openai(e.status(), &e.to_json());
    let valid = openai::convert::chat(&JsonBody(request.clone())).map_err(err)?;
    let reply = openai::handlers::local_reply(state, &valid, openai::Kind::Chat, model)
        .await
        .map_err(err)?;
    Ok((reply, Served::Local(model.to_owned()), None))
}

/// An answer in Anthropic's shape: a `message` object, or its event stream.
fn render(reply: Reply, model: &str) -> Response {
    match reply {
        Reply::Whole(v) => whole(&v),
        Reply::Forwarded(answer) => answer.value().map_or_else(
            |e| error(StatusCode::BAD_GATEWAY, e.to_string()),
            |v| whole(&v),
        ),
        Reply::Stream(chunks) => stream_events(chunks, model).into_response(),
    }
}

/// A whole OpenAI answer as an Anthropic `message`.
fn whole(v: &Value) -> Response {
    match openai_response_to_anthropic(v) {
        Ok(message) => Json(message).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// Anthropic's named SSE events from OpenAI chunks.
fn stream_events(
    chunks: ChunkStream,
    model: &str,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let translator = OpenAiToAnthropic::new(model.to_owned());
    let events = stream::unfold(Some((chunks, translator)), |state| async move {
        let (mut chunks, mut t) = state?;
        loop {
            let (events, more) = match chunks.next().await {
                Some(Ok(text)) => match serde_json::from_str::<Value>(&text) {
                    Ok(chunk) => match t.push(&chunk) {
                        Ok(events) => (events, true),
                        Err(e) => (t.error(ErrorKind::Api, &e.to_string()), false),
                    },
                    Err(e) => (t.error(ErrorKind::Api, &e.to_string()), false),
                },
                Some(Err(fault)) => {
                    let kind = if fault.code == Some("queue_full") {
                        ErrorKind::Overloaded
                    } else {
                        ErrorKind::Api
                    };
                    (t.error(kind, &fault.message), false)
                }
                None => (t.finish(), false),
            };
            if events.is_empty() && more {
                continue;
            }
            let next = more.then_some((chunks, t));
            return Some((stream::iter(events), next));
        }
    })
    .flatten()
    .map(|(name, data)| Ok::<_, Infallible>(Event::default().event(name).data(data.to_string())));
    Sse::new(events).keep_alive(KeepAlive::default())
}
