//! Reading a JSON request body for either API: size limit, syntax, then typed fields with
//! the path of the offending field in the message. Each API turns [`BodyError`] into its
//! own error shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a body was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// Over the configured body limit (413).
    #[error("request body is too large: the limit is {0} bytes")]
    TooLarge(usize),
    /// The connection failed while reading.
    #[error("could not read the request body: {0}")]
    Unreadable(String),
    /// Not JSON, or not UTF-8.
    #[error("request body is not valid JSON: {0}")]
    Syntax(String),
    /// JSON, but not an object.
    #[error("request body must be a JSON object")]
    NotObject,
    /// A field has the wrong type.
    #[error("invalid value for `{path}`: {message}")]
    Field {
        /// Dotted path, e.g. `messages[0].role`.
        path: String,
        /// serde's description.
        message: String,
    },
}

/// The body as a JSON object, not yet typed.
pub(crate) struct JsonBody(pub(crate) Value);

/// The configured body limit, stored as a request extension so the rejection can name it.
#[derive(Clone, Copy)]
pub(crate) struct BodyLimit(pub(crate) usize);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = BodyError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                BodyError::TooLarge(limit)
            } else {
                BodyError::Unreadable(e.body_text())
            }
        })?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| BodyError::Syntax(e.to_string()))?;
        if !value.is_object() {
            return Err(BodyError::NotObject);
        }
        Ok(JsonBody(value))
    }
}

impl JsonBody {
    /// Reads the fields of `T` from the body.
    pub(crate) fn typed<T: DeserializeOwned>(&self) -> Result<T, BodyError> {
        serde_path_to_error::deserialize(&self.0).map_err(|e| BodyError::Field {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })
    }
}

/// Only used if a handler takes [`JsonBody`] directly; the APIs take
/// `Result<JsonBody, BodyError>` and answer in their own shape.
impl axum::response::IntoResponse for BodyError {
    fn into_response(self) -> axum::response::Response {
        let status = match self {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        (
            status,
            axum::Json(serde_json::json!({"error": self.to_string()})),
        )
            .into_response()
    }
}
