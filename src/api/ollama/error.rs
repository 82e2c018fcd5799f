//! Every failure of the Ollama API, mapped in this one place to Ollama's status codes and
//! its error body `{"error": "..."}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::api::body::BodyError;
use crate::api::request::Invalid;
use crate::engine::EngineError;
use crate::models::{LookupError, NameError, StoreError};

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: u64 = 1;

/// An error in Ollama's shape.
#[derive(Debug)]
pub(crate) struct OllamaError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl OllamaError {
    /// 400 with this message.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        OllamaError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// 404 with this message.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        OllamaError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    /// 500 with this message.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        OllamaError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }

    /// The NDJSON line for a stream that already sent its headers.
    pub(crate) fn line(&self) -> String {
        json!({ "error": self.message }).to_string()
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}

impl From<BodyError> for OllamaError {
    fn from(e: BodyError) -> Self {
        let status = match e {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        OllamaError {
            status,
            message: e.to_string(),
        }
    }
}

impl From<Invalid> for OllamaError {
    fn from(e: Invalid) -> Self {
        OllamaError::bad_request(format!("invalid `{}`: {}", e.param, e.message))
    }
}

impl From<NameError> for OllamaError {
    fn from(e: NameError) -> Self {
        OllamaError::bad_request(e.to_string())
    }
}

impl From<LookupError> for OllamaError {
    fn from(e: LookupError) -> Self {
        let status = match &e {
            LookupError::InvalidName(_) => StatusCode::BAD_REQUEST,
            LookupError::Unknown(_) => StatusCode::NOT_FOUND,
            LookupError::Failed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            LookupError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        OllamaError {
            status,
            message: e.to_string(),
        }
    }
}

impl From<StoreError> for OllamaError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::DigestMismatch { .. }
            | StoreError::BadDigest(_)
            | StoreError::MissingBlob(_)
            | StoreError::NotGguf(_)
            | StoreError::Unusable(_)
            | StoreError::Name(_) => StatusCode::BAD_REQUEST,
            StoreError::Io { .. } | StoreError::BadManifest { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        OllamaError {
            status,
            message: e.to_string(),
        }
    }
}

impl From<EngineError> for OllamaError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::QueueFull { .. } | EngineError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::PromptTooLong { .. } => StatusCode::BAD_REQUEST,
            EngineError::EmptyPrompt
            | EngineError::EmptyInput { .. }
            | EngineError::InputTooLong { .. }
            | EngineError::Grammar(_) => StatusCode::BAD_REQUEST,
            EngineError::Decode(_) | EngineError::Embeddings(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        OllamaError {
            status,
            message: e.to_string(),
        }
    }
}
