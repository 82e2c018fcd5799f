//! Every failure of the OpenAI API, mapped in this one place to OpenAI's status codes and
//! error body `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::api::body::BodyError;
use crate::api::request::Invalid;
use crate::engine::{EngineError, InvalidField};
use crate::models::LookupError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: u64 = 1;

/// An error in OpenAI's shape.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    /// 400 for a bad field value.
    pub(crate) fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// 404 for an unknown route.
    pub(crate) fn no_route(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("unknown path {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// The message.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// OpenAI's error `type`.
    pub(crate) fn kind(&self) -> &'static str {
        self.kind
    }

    /// OpenAI's error `code`.
    pub(crate) fn code(&self) -> Option<&'static str> {
        self.code
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The error body, `{"error": {...}}`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        self.body()
    }

    fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        let (status, param, code) = match &e {
            BodyError::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                Some("request_too_large"),
            ),
            BodyError::Field { path, .. } => (StatusCode::BAD_REQUEST, Some(path.clone()), None),
            _ => (StatusCode::BAD_REQUEST, None, None),
        };
        ApiError {
            status,
            message: e.to_string(),
            kind: "invalid_request_error",
            param,
            code,
        }
    }
}

impl From<InvalidField> for ApiError {
    fn from(e: InvalidField) -> Self {
        ApiError::invalid(e.field, e.to_string())
    }
}

impl From<LookupError> for ApiError {
    fn from(e: LookupError) -> Self {
        let (status, kind, code) = match &e {
            LookupError::InvalidName(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_model_name",
            ),
            LookupError::Unknown(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            LookupError::Failed { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "model_load_failed",
            ),
            LookupError::Busy { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "model_capacity",
            ),
        };
        ApiError {
            status,
            message: e.to_string(),
            kind,
            param: Some("model".into()),
            code: Some(code),
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::invalid(e.param, e.message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let (status, kind, param, code) = match &e {
            EngineError::QueueFull { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("queue_full"),
            ),
            EngineError::PromptTooLong { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                Some("messages"),
                Some("context_length_exceeded"),
            ),
            EngineError::EmptyPrompt => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("prompt"),
                None,
            ),
            EngineError::Grammar(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("response_format"),
                Some("invalid_schema"),
            ),
            EngineError::EmptyInput { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("input"),
                None,
            ),
            // OpenAI answers an over-long embedding input with 400, not 422.
            EngineError::InputTooLong { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("input"),
                Some("context_length_exceeded"),
            ),
            EngineError::Decode(_) | EngineError::Embeddings(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
            EngineError::Stopped => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("shutting_down"),
            ),
        };
        ApiError {
            status,
            message: e.to_string(),
            kind,
            param: param.map(str::to_owned),
            code,
        }
    }
}
