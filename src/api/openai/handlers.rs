//! The `/v1/*` handlers: check the body, find the model, submit, then stream or collect.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::convert::{self, Valid};
use super::error::ApiError;
use super::sse::{self, Chunker, Kind, FINGERPRINT};
use super::types::{
    AssistantMessage, ChatChoice, ChatCompletion, ModelList, ModelObject, TextChoice,
    TextCompletion,
};
use crate::api::body::{BodyError, JsonBody};
use crate::api::AppState;
use crate::engine::{Engine, EngineError, FinishReason, Generation, TokenEvent, Usage};

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Submits and waits until the engine has tokenized and queued the prompt, so that errors
/// such as a too-long prompt still get a real status code, even for streams.
async fn start(
    engine: &Engine,
    valid: &Valid,
    handle: &crate::models::ModelHandle,
) -> Result<Generation, ApiError> {
    let request = convert::generate_request(valid, handle)?;
    let mut generation = engine.submit(request)?;
    match generation.next().await {
        Some(TokenEvent::Queued { .. }) => Ok(generation),
        Some(TokenEvent::Error(e)) => Err(e.into()),
        _ => Err(EngineError::Stopped.into()),
    }
}

/// Reads a generation to its end.
async fn collect(mut generation: Generation) -> Result<(String, FinishReason, Usage), ApiError> {
    let mut text = String::new();
    loop {
        match generation.next().await {
            Some(TokenEvent::Token(t)) => text.push_str(&t),
            Some(TokenEvent::Done { finish, usage, .. }) => return Ok((text, finish, usage)),
            Some(TokenEvent::Error(e)) => return Err(e.into()),
            Some(TokenEvent::Queued { .. }) => {}
            None => return Err(EngineError::Stopped.into()),
        }
    }
}

async fn respond(state: &AppState, valid: Valid, kind: Kind) -> Result<Response, ApiError> {
    let handle = state.models.get(&valid.model)?;
    let generation = start(&handle.engine, &valid, &handle).await?;
    let prefix = match kind {
        Kind::Chat => "chatcmpl-",
        Kind::Text => "cmpl-",
    };
    let id = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
    let created = now_secs();
    if valid.stream {
        let chunker = Chunker::new(kind, id, created, valid.model, valid.include_usage);
        return Ok(sse::sse(generation, chunker).into_response());
    }
    let (text, finish, usage) = collect(generation).await?;
    let finish_reason = finish.as_str();
    let response = match kind {
        Kind::Chat => Json(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model: valid.model,
            system_fingerprint: FINGERPRINT,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: text,
                },
                logprobs: None,
                finish_reason,
            }],
            usage: usage.into(),
        })
        .into_response(),
        Kind::Text => Json(TextCompletion {
            id,
            object: "text_completion",
            created,
            model: valid.model,
            system_fingerprint: FINGERPRINT,
            choices: vec![TextChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason,
            }],
            usage: usage.into(),
        })
        .into_response(),
    };
    Ok(response)
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<Response, ApiError> {
    let valid = convert::chat(&body?)?;
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

fn model_object(name: &str, created: i64) -> ModelObject {
    ModelObject {
        id: name.to_owned(),
        object: "model",
        created,
        owned_by: "backstop",
    }
}

/// `GET /v1/models`.
pub(crate) async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let created = state.started_at;
    Json(ModelList {
        object: "list",
        data: state
            .models
            .names()
            .map(|n| model_object(n, created))
            .collect(),
    })
}

/// `GET /v1/models/{id}`.
pub(crate) async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    match state.models.names().find(|n| *n == id) {
        Some(name) => Ok(Json(model_object(name, state.started_at))),
        None => Err(crate::models::LookupError::Unknown(id).into()),
    }
}
