//! `POST /v1/embeddings`: text in, unit-length vectors out (as OpenAI's are), as JSON
//! numbers or, with `encoding_format: "base64"`, as the little-endian `f32` bytes in base64
//! that the official SDKs ask for by default.

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use serde_json::Value;

use super::convert::model_name;
use super::error::ApiError;
use super::types::{
    EmbeddingData, EmbeddingList, EmbeddingObject, EmbeddingRequest, EmbeddingUsage,
};
use crate::api::body::{BodyError, JsonBody};
use crate::api::AppState;
use crate::engine::{l2_normalize, shorten};

/// Most inputs in one request, OpenAI's own bound.
const MAX_INPUTS: usize = 2048;

/// How the vectors are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// JSON numbers.
    Float,
    /// Base64 of the little-endian `f32` bytes.
    Base64,
}

/// A checked `/v1/embeddings` body.
#[derive(Debug, PartialEq)]
pub(crate) struct ValidEmbedding {
    pub(crate) model: String,
    pub(crate) inputs: Vec<String>,
    pub(crate) encoding: Encoding,
    pub(crate) dimensions: Option<usize>,
}

fn is_token_array(v: &Value) -> bool {
    match v {
        Value::Array(items) => items.first().is_some_and(|i| i.is_number() || i.is_array()),
        _ => false,
    }
}

/// `input`: one non-empty string or a list of 1 to 2048 of them.
fn inputs(value: &Value) -> Result<Vec<String>, ApiError> {
    match value {
        Value::Null => Err(ApiError::invalid("input", "you must provide an input")),
        Value::String(s) if s.is_empty() => {
            Err(ApiError::invalid("input", "input must not be empty"))
        }
        Value::String(s) => Ok(vec![s.clone()]),
        v if is_token_array(v) => Err(ApiError::invalid(
            "input",
            "token arrays are not supported by this server; send the text",
        )),
        Value::Array(items) if items.is_empty() => Err(ApiError::invalid(
            "input",
            "input must contain at least one string",
        )),
        Value::Array(items) if items.len() > MAX_INPUTS => Err(ApiError::invalid(
            "input",
            format!(
                "at most {MAX_INPUTS} inputs are allowed per request, got {}",
                items.len()
            ),
        )),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) if s.is_empty() => Err(ApiError::invalid(
                    "input",
                    format!("input[{i}] must not be empty"),
                )),
                Value::String(s) => Ok(s.clone()),
                _ => Err(ApiError::invalid(
                    "input",
                    format!("input[{i}] must be a string"),
                )),
            })
            .collect(),
        _ => Err(ApiError::invalid(
            "input",
            "input must be a string or a list of strings",
        )),
    }
}

/// Checks a `/v1/embeddings` body.
pub(crate) fn parse(body: &JsonBody) -> Result<ValidEmbedding, ApiError> {
    let req: EmbeddingRequest = body.typed()?;
    let encoding = match req.encoding_format.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be \"float\" or \"base64\", got \"{other}\""),
            ))
        }
    };
    let dimensions = match req.dimensions {
        None => None,
        Some(d) => Some(usize::try_from(d).ok().filter(|&d| d >= 1).ok_or_else(|| {
            ApiError::invalid(
                "dimensions",
                format!("dimensions must be at least 1, got {d}"),
            )
        })?),
    };
    Ok(ValidEmbedding {
        model: model_name(req.model)?,
        inputs: inputs(&req.input)?,
        encoding,
        dimensions,
    })
}

/// The little-endian bytes of the floats, in standard base64: what OpenAI sends and its
/// SDKs decode with `np.frombuffer(base64.b64decode(s), dtype="float32")`.
pub(crate) fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<Json<EmbeddingList>, ApiError> {
    let valid = parse(&body?)?;
    let lease = state.models.acquire(&valid.model, None).await?;
    let length = lease.engine().info().embedding_length as usize;
    if let Some(d) = valid.dimensions.filter(|&d| d > length) {
        return Err(ApiError::invalid(
            "dimensions",
            format!("this model's embeddings have {length} dimensions; dimensions must be between 1 and {length}, got {d}"),
        ));
    }
    // OpenAI refuses over-long inputs rather than cutting them.
    let e = lease.engine().embed(valid.inputs, false).await?;
    let data = e
        .vectors
        .into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            match valid.dimensions {
                Some(d) => shorten(&mut v, d),
                None => l2_normalize(&mut v),
            }
            EmbeddingObject {
                object: "embedding",
                index: i as u32,
                embedding: match valid.encoding {
                    Encoding::Float => EmbeddingData::Float(v),
                    Encoding::Base64 => EmbeddingData::Base64(base64_f32(&v)),
                },
            }
        })
        .collect();
    crate::security::audit::note(|r| r.prompt_tokens = Some(e.prompt_tokens));
    Ok(Json(EmbeddingList {
        object: "list",
        data,
        model: valid.model,
        usage: EmbeddingUsage {
            prompt_tokens: e.prompt_tokens,
            total_tokens: e.prompt_tokens,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(body: Value) -> Result<ValidEmbedding, ApiError> {
        parse(&JsonBody(body))
    }

    fn param_of(body: Value) -> String {
        let e = check(body).unwrap_err();
        let v = e.to_json();
        v["error"]["param"].as_str().unwrap_or_default().to_owned()
    }

    #[test]
    fn input_is_a_string_or_a_list_of_strings() {
        let v = check(json!({"model": "m", "input": "hi"})).unwrap();
        assert_eq!(v.inputs, vec!["hi".to_owned()]);
        assert_eq!(v.encoding, Encoding::Float);
        let v = check(json!({"model": "m", "input": ["a", "b"], "encoding_format": "base64", "dimensions": 8, "user": "u1"})).unwrap();
        assert_eq!(v.inputs.len(), 2);
        assert_eq!(v.encoding, Encoding::Base64);
        assert_eq!(v.dimensions, Some(8));
    }

    #[test]
    fn bad_inputs_and_fields_are_refused_naming_the_field() {
        assert_eq!(param_of(json!({"model": "m", "input": ""})), "input");
        assert_eq!(param_of(json!({"model": "m", "input": []})), "input");
        assert_eq!(param_of(json!({"model": "m"})), "input");
        assert_eq!(param_of(json!({"model": "m", "input": ["a", ""]})), "input");
        assert_eq!(param_of(json!({"model": "m", "input": ["a", 3]})), "input");
        assert_eq!(param_of(json!({"model": "m", "input": [1, 2, 3]})), "input");
        assert_eq!(param_of(json!({"model": "m", "input": [[1, 2]]})), "input");
        assert_eq!(param_of(json!({"model": "m", "input": {"a": 1}})), "input");
        assert_eq!(
            param_of(json!({"model": "m", "input": "a", "encoding_format": "int8"})),
            "encoding_format"
        );
        assert_eq!(
            param_of(json!({"model": "m", "input": "a", "dimensions": 0})),
            "dimensions"
        );
        assert_eq!(
            param_of(json!({"model": "m", "input": "a", "dimensions": "8"})),
            "dimensions"
        );
        assert_eq!(
            param_of(json!({"model": "m", "input": "a", "user": 5})),
            "user"
        );
        assert_eq!(param_of(json!({"input": "a"})), "model");
        let many = vec!["x"; MAX_INPUTS + 1];
        assert_eq!(param_of(json!({"model": "m", "input": many})), "input");
    }

    #[test]
    fn base64_is_the_little_endian_bytes_of_the_floats() {
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        let v = [0.5f32, -2.25, 1e-3];
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(base64_f32(&v))
            .unwrap();
        let back: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, v);
    }
}
