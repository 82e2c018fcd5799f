//! `POST /api/embed` and the legacy `POST /api/embeddings`, with Ollama's behaviours:
//! `/api/embed` returns unit-length vectors, truncates over-long inputs unless told
//! `truncate: false`, and shortens to `dimensions`; `/api/embeddings` returns the raw pooled
//! vector. No input at all (a missing or empty `input`, an empty list, an empty `prompt`)
//! loads the model and answers with no vectors, as Ollama does.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use super::convert;
use super::error::OllamaError;
use crate::api::body::{BodyError, JsonBody};
use crate::api::request::Invalid;
use crate::api::AppState;
use crate::config::KeepAlive;
use crate::engine::{l2_normalize, shorten};

/// A checked `/api/embed` body.
#[derive(Debug, PartialEq)]
pub(crate) struct EmbedRequest {
    pub(crate) model: String,
    pub(crate) inputs: Vec<String>,
    /// Cut over-long inputs to the model's limit instead of refusing them.
    pub(crate) truncate: bool,
    pub(crate) keep_alive: Option<KeepAlive>,
    /// Shorten each vector to this many components (then renormalize).
    pub(crate) dimensions: Option<usize>,
}

/// A checked legacy `/api/embeddings` body.
#[derive(Debug, PartialEq)]
pub(crate) struct LegacyRequest {
    pub(crate) model: String,
    pub(crate) prompt: String,
    pub(crate) keep_alive: Option<KeepAlive>,
}

fn object(body: &Value) -> Result<&Map<String, Value>, Invalid> {
    body.as_object()
        .ok_or_else(|| Invalid::new("body", "the request body must be a JSON object"))
}

/// `input`: a string or a list of strings. An empty string alone means no input (Ollama's
/// behaviour); an empty string inside a list is refused, since it has no embedding.
fn inputs(value: Option<&Value>) -> Result<Vec<String>, Invalid> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) if s.is_empty() => Err(Invalid::new(
                    format!("input[{i}]"),
                    "an input must not be empty",
                )),
                Value::String(s) => Ok(s.clone()),
                _ => Err(Invalid::new(format!("input[{i}]"), "must be a string")),
            })
            .collect(),
        Some(_) => Err(Invalid::new(
            "input",
            "`input` must be a string or a list of strings",
        )),
    }
}

fn dimensions(value: Option<&Value>) -> Result<Option<usize>, Invalid> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&d| d >= 1)
            .and_then(|d| usize::try_from(d).ok())
            .map(Some)
            .ok_or_else(|| Invalid::new("dimensions", "`dimensions` must be a positive integer")),
    }
}

/// Checks a `/api/embed` body.
pub(crate) fn embed_request(body: &Value) -> Result<EmbedRequest, Invalid> {
    let body = object(body)?;
    let truncate = match body.get("truncate") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Invalid::new("truncate", "`truncate` must be true or false")),
    };
    // Options are checked for their types like everywhere else; none of them changes an
    // embedding (the context size is the server's, see the engine's `embed`).
    convert::options(body.get("options"), "options")?;
    Ok(EmbedRequest {
        model: convert::model(body)?,
        inputs: inputs(body.get("input"))?,
        truncate,
        keep_alive: convert::keep_alive(body)?,
        dimensions: dimensions(body.get("dimensions"))?,
    })
}

/// Checks a legacy `/api/embeddings` body.
pub(crate) fn legacy_request(body: &Value) -> Result<LegacyRequest, Invalid> {
    let body = object(body)?;
    let prompt = match body.get("prompt") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(Invalid::new("prompt", "`prompt` must be a string")),
    };
    convert::options(body.get("options"), "options")?;
    Ok(LegacyRequest {
        model: convert::model(body)?,
        prompt,
        keep_alive: convert::keep_alive(body)?,
    })
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `POST /api/embed`.
pub(crate) async fn embed(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<Json<Value>, OllamaError> {
    let started = Instant::now();
    let req = embed_request(&body?.0)?;
    let lease = state.models.acquire(&req.model, req.keep_alive).await?;
    let length = lease.engine().info().embedding_length as usize;
    if let Some(d) = req.dimensions.filter(|&d| d > length) {
        return Err(OllamaError::bad_request(format!(
            "invalid `dimensions`: this model's embeddings have {length} dimensions, got {d}"
        )));
    }
    let (vectors, tokens) = if req.inputs.is_empty() {
        (Vec::new(), 0)
    } else {
        let e = lease.engine().embed(req.inputs, req.truncate).await?;
        crate::security::audit::note(|r| r.prompt_tokens = Some(e.prompt_tokens));
        (e.vectors, e.prompt_tokens)
    };
    let vectors: Vec<Vec<f32>> = vectors
        .into_iter()
        .map(|mut v| {
            match req.dimensions {
                Some(d) => shorten(&mut v, d),
                None => l2_normalize(&mut v),
            }
            v
        })
        .collect();
    Ok(Json(json!({
        "model": req.model,
        "embeddings": vectors,
        "total_duration": nanos(started.elapsed()),
        "load_duration": nanos(lease.load_duration),
        "prompt_eval_count": tokens,
    })))
}

/// `POST /api/embeddings` (legacy): one prompt, the raw vector.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<Json<Value>, OllamaError> {
    let req = legacy_request(&body?.0)?;
    let lease = state.models.acquire(&req.model, req.keep_alive).await?;
    if req.prompt.is_empty() {
        return Ok(Json(json!({ "embedding": [] })));
    }
    let mut e = lease.engine().embed(vec![req.prompt], true).await?;
    let vector = e.vectors.pop().unwrap_or_default();
    Ok(Json(json!({ "embedding": vector })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_may_be_a_string_or_a_list_and_empty_means_none() {
        let r = embed_request(&json!({"model": "m", "input": "hi"})).unwrap();
        assert_eq!(r.inputs, vec!["hi".to_owned()]);
        assert!(r.truncate, "Ollama truncates unless told not to");
        let r =
            embed_request(&json!({"model": "m", "input": ["a", "b"], "truncate": false})).unwrap();
        assert_eq!(r.inputs, vec!["a".to_owned(), "b".to_owned()]);
        assert!(!r.truncate);
        for none in [json!(""), json!([]), json!(null)] {
            let r = embed_request(&json!({"model": "m", "input": none})).unwrap();
            assert!(r.inputs.is_empty());
        }
        assert!(embed_request(&json!({"model": "m"}))
            .unwrap()
            .inputs
            .is_empty());
    }

    #[test]
    fn wrong_types_and_bad_values_name_the_field() {
        let param = |body: Value| embed_request(&body).unwrap_err().param;
        assert_eq!(param(json!({"model": "m", "input": 5})), "input");
        assert_eq!(param(json!({"model": "m", "input": ["a", 5]})), "input[1]");
        assert_eq!(param(json!({"model": "m", "input": ["a", ""]})), "input[1]");
        assert_eq!(
            param(json!({"model": "m", "input": "a", "truncate": "yes"})),
            "truncate"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "a", "dimensions": 0})),
            "dimensions"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "a", "dimensions": -3})),
            "dimensions"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "a", "dimensions": "8"})),
            "dimensions"
        );
        assert_eq!(
            param(json!({"model": "m", "input": "a", "options": {"temperature": "x"}})),
            "options.temperature"
        );
        assert_eq!(param(json!({"input": "a"})), "model");
        assert_eq!(
            embed_request(&json!({"model": "m", "input": "a", "dimensions": 16}))
                .unwrap()
                .dimensions,
            Some(16)
        );
    }

    #[test]
    fn the_legacy_body_takes_one_prompt() {
        let r = legacy_request(&json!({"model": "m", "prompt": "hi", "keep_alive": "1m"})).unwrap();
        assert_eq!(r.prompt, "hi");
        assert!(r.keep_alive.is_some());
        assert_eq!(legacy_request(&json!({"model": "m"})).unwrap().prompt, "");
        assert_eq!(
            legacy_request(&json!({"model": "m", "prompt": ["a"]}))
                .unwrap_err()
                .param,
            "prompt"
        );
    }
}
