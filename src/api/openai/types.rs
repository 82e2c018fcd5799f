//! OpenAI wire types. Requests ignore fields we do not know (clients send many optional
//! ones) but are strict about the types of the fields we do use.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    /// Send a final chunk with token usage.
    #[serde(default)]
    pub(crate) include_usage: bool,
}

/// One message of `messages`.
#[derive(Debug, Deserialize)]
pub(crate) struct WireMessage {
    pub(crate) role: String,
    /// A string, or a list of content parts; null for assistant turns with tool calls.
    #[serde(default)]
    pub(crate) content: Value,
    /// An assistant turn's calls.
    #[serde(default)]
    pub(crate) tool_calls: Value,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatCompletionRequest {
    pub(crate) model: Option<String>,
    pub(crate) messages: Vec<WireMessage>,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
    pub(crate) stream_options: Option<StreamOptions>,
    pub(crate) max_completion_tokens: Option<u32>,
    pub(crate) logprobs: Option<bool>,
    #[serde(default)]
    pub(crate) response_format: Value,
    #[serde(default)]
    pub(crate) tools: Value,
    #[serde(default)]
    pub(crate) tool_choice: Value,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    pub(crate) model: Option<String>,
    /// A string or a one-element list of strings.
    #[serde(default)]
    pub(crate) prompt: Value,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
    pub(crate) stream_options: Option<StreamOptions>,
    pub(crate) echo: Option<bool>,
    pub(crate) suffix: Option<String>,
    pub(crate) best_of: Option<u32>,
    #[serde(default)]
    pub(crate) logprobs: Value,
}

/// Fields shared by both endpoints, read from the same body as the endpoint's own struct
/// (not `#[serde(flatten)]`, which would lose the field path in type errors). `top_k`,
/// `min_p` and `repeat_penalty` are llama.cpp server extensions that many clients send.
#[derive(Debug, Deserialize)]
pub(crate) struct CommonParams {
    pub(crate) max_tokens: Option<u32>,
    pub(crate) temperature: Option<f32>,
    pub(crate) top_p: Option<f32>,
    pub(crate) top_k: Option<i32>,
    pub(crate) min_p: Option<f32>,
    pub(crate) presence_penalty: Option<f32>,
    pub(crate) frequency_penalty: Option<f32>,
    pub(crate) repeat_penalty: Option<f32>,
    pub(crate) seed: Option<i64>,
    /// A string or a list of strings.
    #[serde(default)]
    pub(crate) stop: Value,
    pub(crate) n: Option<u32>,
    /// llama.cpp server extension: generate exactly `max_tokens` (benchmarks).
    pub(crate) ignore_eos: Option<bool>,
    /// llama.cpp server extension: `false` reads the whole prompt, reusing no cache.
    pub(crate) cache_prompt: Option<bool>,
    /// llama.cpp server extension: most tokens drafted per step for this request (0: none),
    /// over the model's `--speculate`.
    #[serde(rename = "speculative.n_max")]
    pub(crate) speculative_n_max: Option<u32>,
    /// llama.cpp server extension: fewest tokens drafted per step for this request (a
    /// shorter guess is not checked), over the measured costs.
    #[serde(rename = "speculative.n_min")]
    pub(crate) speculative_n_min: Option<u32>,
}

/// Token counts.
#[derive(Debug, Serialize, Clone, Copy)]
pub(crate) struct WireUsage {
    pub(crate) prompt_tokens: u32,
    pub(crate) completion_tokens: u32,
    pub(crate) total_tokens: u32,
    pub(crate) prompt_tokens_details: PromptTokensDetails,
}

/// Cached-prompt detail, as OpenAI reports prompt caching.
#[derive(Debug, Serialize, Clone, Copy)]
pub(crate) struct PromptTokensDetails {
    pub(crate) cached_tokens: u32,
}

impl From<crate::engine::Usage> for WireUsage {
    fn from(u: crate::engine::Usage) -> Self {
        WireUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

/// The assistant's message in a non-streamed answer.
#[derive(Debug, Serialize)]
pub(crate) struct AssistantMessage {
    pub(crate) role: &'static str,
    /// Null when the answer is only tool calls.
    pub(crate) content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tool_calls: Option<Vec<Value>>,
}

/// One choice of a non-streamed chat answer.
#[derive(Debug, Serialize)]
pub(crate) struct ChatChoice {
    pub(crate) index: u32,
    pub(crate) message: AssistantMessage,
    pub(crate) logprobs: Option<()>,
    pub(crate) finish_reason: &'static str,
}

/// A non-streamed chat answer.
#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion {
    pub(crate) id: String,
    pub(crate) object: &'static str,
    pub(crate) created: i64,
    pub(crate) model: String,
    pub(crate) system_fingerprint: &'static str,
    pub(crate) choices: Vec<ChatChoice>,
    pub(crate) usage: WireUsage,
}

/// One choice of a non-streamed text completion.
#[derive(Debug, Serialize)]
pub(crate) struct TextChoice {
    pub(crate) index: u32,
    pub(crate) text: String,
    pub(crate) logprobs: Option<()>,
    pub(crate) finish_reason: &'static str,
}

/// A non-streamed text completion.
#[derive(Debug, Serialize)]
pub(crate) struct TextCompletion {
    pub(crate) id: String,
    pub(crate) object: &'static str,
    pub(crate) created: i64,
    pub(crate) model: String,
    pub(crate) system_fingerprint: &'static str,
    pub(crate) choices: Vec<TextChoice>,
    pub(crate) usage: WireUsage,
}

/// An entry of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub(crate) struct ModelObject {
    pub(crate) id: String,
    pub(crate) object: &'static str,
    pub(crate) created: i64,
    pub(crate) owned_by: &'static str,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub(crate) struct ModelList {
    pub(crate) object: &'static str,
    pub(crate) data: Vec<ModelObject>,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingRequest {
    pub(crate) model: Option<String>,
    /// A string, a list of strings, or token arrays (refused).
    #[serde(default)]
    pub(crate) input: Value,
    /// `float` (default) or `base64`.
    pub(crate) encoding_format: Option<String>,
    /// Signed, so that a negative value gets a range error rather than a type error.
    pub(crate) dimensions: Option<i64>,
    /// An end-user id for abuse monitoring: type-checked, then unused.
    #[serde(rename = "user")]
    pub(crate) _user: Option<String>,
}

/// An embedding as sent: numbers, or little-endian f32 bytes in base64.
#[derive(Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub(crate) enum EmbeddingData {
    Float(Vec<f32>),
    Base64(String),
}

/// One entry of `data`.
#[derive(Debug, Serialize)]
pub(crate) struct EmbeddingObject {
    pub(crate) object: &'static str,
    pub(crate) index: u32,
    pub(crate) embedding: EmbeddingData,
}

/// Token counts of an embedding request (there is no completion).
#[derive(Debug, Serialize)]
pub(crate) struct EmbeddingUsage {
    pub(crate) prompt_tokens: u32,
    pub(crate) total_tokens: u32,
}

/// The answer of `POST /v1/embeddings`.
#[derive(Debug, Serialize)]
pub(crate) struct EmbeddingList {
    pub(crate) object: &'static str,
    pub(crate) data: Vec<EmbeddingObject>,
    pub(crate) model: String,
    pub(crate) usage: EmbeddingUsage,
}
