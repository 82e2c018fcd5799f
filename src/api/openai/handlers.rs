//! The `/v1/*` handlers: check the body, find the model, submit, then stream or collect.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;

use super::convert;
use super::error::ApiError;
use super::sse::{self, Chunker, Kind, FINGERPRINT};
use super::types::{
    AssistantMessage, ChatChoice, ChatCompletion, ModelList, ModelObject, TextChoice,
    TextCompletion,
};
use crate::api::body::{BodyError, JsonBody};
use crate::api::request::{collect, start, Collected, Valid};
use crate::api::tools;
use crate::api::AppState;
use crate::router::reply::Reply;
use crate::security::LocalOnly;

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The local model's answer, in OpenAI's dialect. `valid.model` is echoed back; the model
/// that answers is `local` (the same, unless the router fell over to a fallback).
pub(crate) async fn local_reply(
    state: &AppState,
    valid: &Valid,
    kind: Kind,
    local: &str,
) -> Result<Reply, ApiError> {
    let mut capped = valid.clone();
    state.security.cap_tokens(&mut capped.max_tokens)?;
    let valid = &capped;
    let lease = state.models.acquire(local, valid.keep_alive).await?;
    let generation = start::<ApiError>(valid, lease).await?;
    let prefix = match kind {
        Kind::Chat => "chatcmpl-",
        Kind::Text => "cmpl-",
    };
    let id = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
    let created = now_secs();
    let chunker = Chunker::new(
        kind,
        id.clone(),
        created,
        valid.model.clone(),
        valid.include_usage,
    );
    if valid.stream && valid.tools.is_none() {
        return Ok(Reply::Stream(sse::chunks(generation, chunker)));
    }
    if valid.stream {
        // With tools, the answer is read whole and then streamed: a call is only known to
        // be one (and its arguments to be complete JSON) at the end.
        let forced = valid.tools.as_ref().is_some_and(tools::Toolbox::forced);
        let collected = collect(generation).await?;
        return Ok(Reply::Stream(sse::tool_chunks(collected, forced, chunker)));
    }
    let Collected {
        text,
        finish,
        usage,
        ..
    } = collect(generation).await?;
    let mut finish_reason = finish.as_str();
    let (content, tool_calls) = match &valid.tools {
        Some(t) => {
            let (rest, calls) = tools::extract(&text, t.forced());
            if calls.is_empty() {
                (Some(text), None)
            } else {
                finish_reason = "tool_calls";
                let content = (!rest.is_empty()).then_some(rest);
                (content, Some(sse::wire_calls(&calls)))
            }
        }
        None => (Some(text), None),
    };
    let model = valid.model.clone();
    let body = match kind {
        Kind::Chat => serde_json::to_value(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            system_fingerprint: FINGERPRINT,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                    tool_calls,
                },
                logprobs: None,
                finish_reason,
            }],
            usage: usage.into(),
        }),
        Kind::Text => serde_json::to_value(TextCompletion {
            id,
            object: "text_completion",
            created,
            model,
            system_fingerprint: FINGERPRINT,
            choices: vec![TextChoice {
                index: 0,
                text: content.unwrap_or_default(),
                logprobs: None,
                finish_reason,
            }],
            usage: usage.into(),
        }),
    };
    body.map(Reply::Whole)
        .map_err(|e| ApiError::from(crate::engine::EngineError::Decode(e.to_string())))
}

/// An answer as an OpenAI response: JSON, or SSE.
pub(crate) fn render(reply: Reply) -> Response {
    match reply {
        Reply::Whole(v) => Json(v).into_response(),
        Reply::Forwarded(answer) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            answer.body,
        )
            .into_response(),
        Reply::Stream(chunks) => sse::render(chunks).into_response(),
    }
}

async fn respond(state: &AppState, valid: Valid, kind: Kind) -> Result<Response, ApiError> {
    let reply = local_reply(state, &valid, kind, &valid.model).await?;
    Ok(render(reply))
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    local_only: Option<Extension<LocalOnly>>,
    body: Result<JsonBody, BodyError>,
) -> Result<Response, ApiError> {
    let body = body?;
    if let Some(model) = body.0.get("model").and_then(serde_json::Value::as_str) {
        if state.router.serves(model) {
            return Ok(crate::api::routed::openai_chat(
                &state,
                &headers,
                &body.0,
                model,
                local_only.is_some(),
            )
            .await);
        }
    }
    let valid = convert::chat(&body)?;
    respond(&state, valid, Kind::Chat).await
}

/// `POST /v1/completions`.
pub(crate) async fn completions(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<Response, ApiError> {
    let valid = convert::completion(&body?)?;
    respond(&state, valid, Kind::Text).await
}

fn model_object(listed: &crate::models::Listed) -> ModelObject {
    let created = listed
        .modified
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    ModelObject {
        id: listed.spec.name.to_string(),
        object: "model",
        created,
        owned_by: "backstop",
    }
}

/// `GET /v1/models`: every servable model, loaded or not.
pub(crate) async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let models = state.models.clone();
    let listed = tokio::task::spawn_blocking(move || models.list())
        .await
        .unwrap_or_default();
    Json(ModelList {
        object: "list",
        data: listed.iter().map(model_object).collect(),
    })
}

/// `GET /v1/models/{id}`.
pub(crate) async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    let spec = state.models.resolve(&id)?;
    let models = state.models.clone();
    let listed = tokio::task::spawn_blocking(move || models.list())
        .await
        .unwrap_or_default();
    listed
        .iter()
        .find(|l| l.spec.name == spec.name)
        .map(|l| Json(model_object(l)))
        .ok_or_else(|| crate::models::LookupError::Unknown(id).into())
}
