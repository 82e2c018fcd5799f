//! `POST /api/pull`: fetches a model into the store, streaming Ollama's progress objects.
//! backstop also accepts `file`, `revision` and `sha256` to pin one Hugging Face file.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::convert;
use super::error::OllamaError;
use super::ndjson;
use crate::api::body::{BodyError, JsonBody};
use crate::api::AppState;
use crate::models::pull::{pull as pull_model, HubConfig, PullError, PullSpec};

/// Status code of a failed pull answered without streaming.
fn status_of(e: &PullError) -> StatusCode {
    match e {
        PullError::InvalidSpec { .. } | PullError::BadSha256(_) => StatusCode::BAD_REQUEST,
        PullError::RepoNotFound { .. }
        | PullError::FileNotFound { .. }
        | PullError::QuantNotFound { .. }
        | PullError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
        PullError::SplitGguf { .. } | PullError::NotGguf { .. } | PullError::Unusable { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        PullError::Offline { .. } | PullError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        PullError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
        PullError::Forbidden { .. }
        | PullError::RegistryRefused { .. }
        | PullError::BadManifest { .. }
        | PullError::TooLong { .. }
        | PullError::Interrupted { .. }
        | PullError::Network { .. }
        | PullError::Sha256Mismatch { .. } => StatusCode::BAD_GATEWAY,
        PullError::Io { .. } | PullError::Store(_) | PullError::Internal(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

fn text<'a>(map: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, OllamaError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(OllamaError::bad_request(format!(
            "`{field}` must be a string"
        ))),
    }
}

/// Reads the spec from a pull request body.
pub(crate) fn spec_of(map: &Map<String, Value>) -> Result<PullSpec, OllamaError> {
    let model = convert::model(map)?;
    let revision = text(map, "revision")?;
    let sha256 = text(map, "sha256")?;
    let spec = match text(map, "file")? {
        Some(file) => PullSpec::from_file(&model, file, revision, sha256),
        None if revision.is_some() || sha256.is_some() => {
            return Err(OllamaError::bad_request(
                "`revision` and `sha256` pin one file: give `file` too",
            ))
        }
        None => PullSpec::from_model(&model),
    };
    spec.map_err(|e| OllamaError::bad_request(e.to_string()))
}

/// Cancels the pull when the client goes away (the partial file stays, and the next pull
/// resumes it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `POST /api/pull`.
pub(crate) async fn pull(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<Response, OllamaError> {
    let body = body?;
    let map = body
        .0
        .as_object()
        .ok_or_else(|| OllamaError::bad_request("the request body must be a JSON object"))?;
    let spec = spec_of(map)?;
    if state.models.is_configured(spec.name()) {
        return Err(OllamaError::bad_request(format!(
            "model '{}' is defined in the configuration; pull it under another name",
            spec.name()
        )));
    }
    let streamed = map.get("stream").and_then(Value::as_bool).unwrap_or(true);
    crate::security::audit::note(|r| {
        r.event = Some("pull".into());
        r.detail = Some(spec.name().to_string());
    });
    let (tx, rx) = mpsc::unbounded_channel::<Result<Value, (StatusCode, String)>>();
    let models = Arc::clone(&state.models);
    let task = tokio::spawn(async move {
        let store = models.store().clone();
        let name = spec.name().clone();
        tracing::info!(model = %name, "pull started");
        let events = tx.clone();
        let result = pull_model(&store, &spec, &HubConfig::from_env(), move |e| {
            // A failed send means the client went away; the task is aborted with it.
            let _gone = events.send(Ok(e.to_json()));
        })
        .await;
        let last = match result {
            Ok(m) => {
                models.invalidate(&name).await;
                tracing::info!(model = %name, digest = %m.digest, "pull finished");
                None
            }
            Err(e) => {
                tracing::warn!(model = %name, error = %e, "pull failed");
                Some(Err((status_of(&e), e.to_string())))
            }
        };
        if let Some(last) = last {
            let _gone = tx.send(last);
        }
    });
    let guard = AbortOnDrop(task);
    if streamed {
        let lines = stream::unfold((rx, guard), |(mut rx, guard)| async move {
            let item = rx.recv().await?;
            let line = match item {
                Ok(v) => v.to_string(),
                Err((_, message)) => OllamaError::internal(message).line(),
            };
            Some((line, (rx, guard)))
        });
        return Ok(ndjson::lines_response(lines));
    }
    let mut rx = rx;
    let mut outcome = Ok(());
    while let Some(item) = rx.recv().await {
        if let Err((status, message)) = item {
            outcome = Err(OllamaError { status, message });
        }
    }
    drop(guard);
    outcome.map(|()| Json(json!({"status": "success"})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::pull::PullEvent;

    #[test]
    fn progress_reads_like_ollamas() {
        let v = PullEvent::Progress {
            digest: format!("sha256:{}", "ab".repeat(32)),
            total: 100,
            completed: 40,
        }
        .to_json();
        assert_eq!(v["status"], "pulling abababababab");
        assert_eq!(v["total"], 100);
        assert_eq!(v["completed"], 40);
        assert_eq!(
            PullEvent::Status("success".into()).to_json(),
            json!({"status": "success"})
        );
    }

    #[test]
    fn pinning_needs_a_file() {
        let body = json!({"model": "hf.co/o/r", "sha256": "ab"});
        assert!(spec_of(body.as_object().unwrap()).is_err());
        let body = json!({"model": "o/r", "file": "x-Q8_0.gguf", "revision": "main"});
        let spec = spec_of(body.as_object().unwrap()).unwrap();
        assert_eq!(spec.name().to_string(), "hf.co/o/r:Q8_0");
        let body = json!({"model": "../../etc"});
        assert!(spec_of(body.as_object().unwrap()).is_err());
    }
}
