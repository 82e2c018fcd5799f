//! Anthropic's Messages API translated to and from OpenAI's Chat Completions, both ways,
//! streaming included, on plain JSON values.
//!
//! The router speaks OpenAI inside (every backend answers in the Chat Completions dialect), so
//! Anthropic appears at two edges:
//! - an Anthropic client (`POST /v1/messages`): its request becomes an OpenAI request
//!   ([`client_request`]) and the answer goes back as a Messages reply, whole
//!   ([`client_reply`]) or event by event ([`client_stream`]);
//! - an Anthropic upstream: the OpenAI request goes out as a Messages request
//!   ([`upstream_request`]) and its answer comes back as a Chat Completion, whole
//!   ([`upstream_reply`]) or chunk by chunk ([`upstream_stream`], fed by [`super::sse`]).
//!
//! Everything here is pure: no network, no clock, no randomness. Ids are derived from the ids
//! the other side gave (`chatcmpl-X` ↔ `msg_X`), so one exchange can be followed through the
//! logs of both sides, and `created` timestamps are passed in.

pub(crate) mod client_reply;
pub(crate) mod client_request;
pub(crate) mod client_stream;
pub(crate) mod upstream_reply;
pub(crate) mod upstream_request;
pub(crate) mod upstream_stream;

use serde_json::{json, Value};

/// An upstream answered with success but its body is not what its API promises. The router
/// counts it like a 5xx: the upstream is not working, so the request fails over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the upstream's reply is malformed: {0}")]
pub(crate) struct Malformed(pub(crate) String);

impl Malformed {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Malformed(what.into())
    }
}

/// Why a translated stream cannot go on. Before the translator's `emitted_content()` is true the router may still fail over; after it,
/// the client gets an error event instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StreamFailure {
    /// The stream broke the API's promises (bad JSON, events out of order, cut short).
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// The upstream said it failed, in its own in-stream error event.
    #[error("the upstream failed mid-stream ({kind}): {message}")]
    Reported {
        /// The upstream's error type, e.g. `overloaded_error` or `server_error`.
        kind: String,
        /// The upstream's own words.
        message: String,
    },
}

impl StreamFailure {
    /// Whether the upstream said it is overloaded (Anthropic's in-stream equivalent of a
    /// 529), which the router counts as overload rather than a broken reply.
    pub(crate) fn is_overloaded(&self) -> bool {
        matches!(self, StreamFailure::Reported { kind, .. } if kind == "overloaded_error")
    }

    fn malformed(what: impl Into<String>) -> Self {
        StreamFailure::Malformed(Malformed::new(what))
    }
}

/// OpenAI's `finish_reason` as Anthropic's `stop_reason`.
///
/// `stop` becomes `end_turn` even when a stop string ended the answer: OpenAI does not say
/// which (or whether one) matched, and `end_turn` with `stop_sequence: null` is the answer
/// that never claims something untrue. Unknown reasons (servers add their own) are `end_turn`.
fn stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's `stop_reason` as OpenAI's `finish_reason`. Reasons Anthropic adds later end
/// the answer normally (`stop`) rather than failing it: the text is still good.
fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// The Anthropic message id for an OpenAI completion id: `chatcmpl-X` → `msg_X`.
fn message_id(completion_id: &str) -> String {
    let bare = completion_id
        .strip_prefix("chatcmpl-")
        .unwrap_or(completion_id);
    format!("msg_{bare}")
}

/// The OpenAI completion id for an Anthropic message id, kept whole (`chatcmpl-msg_01…`) so
/// the upstream's own id can be found in its console.
fn completion_id(message_id: &str) -> String {
    format!("chatcmpl-{message_id}")
}

/// OpenAI usage as Anthropic's. Anthropic's `input_tokens` excludes tokens read from the
/// prompt cache (they are `cache_read_input_tokens`); OpenAI's `prompt_tokens` includes them.
fn anthropic_usage(usage: Option<&Value>) -> Value {
    let count = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let prompt = count(usage.and_then(|u| u.get("prompt_tokens")));
    let cached = count(usage.and_then(|u| u.pointer("/prompt_tokens_details/cached_tokens")));
    json!({
        "input_tokens": prompt.saturating_sub(cached),
        "output_tokens": count(usage.and_then(|u| u.get("completion_tokens"))),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    })
}

/// Token counts as an Anthropic upstream reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tokens {
    /// Uncached prompt tokens.
    input: u64,
    /// Prompt tokens written to the cache (billed, and part of the prompt).
    cache_creation: u64,
    /// Prompt tokens read from the cache.
    cache_read: u64,
    /// Generated tokens.
    output: u64,
}

impl Tokens {
    /// Overwrites the counts present in an Anthropic `usage` object; `message_delta` repeats
    /// only some of them, and its counts are totals, not increments.
    fn update(&mut self, usage: &Value) {
        let set = |slot: &mut u64, key: &str| {
            if let Some(n) = usage.get(key).and_then(Value::as_u64) {
                *slot = n;
            }
        };
        set(&mut self.input, "input_tokens");
        set(&mut self.cache_creation, "cache_creation_input_tokens");
        set(&mut self.cache_read, "cache_read_input_tokens");
        set(&mut self.output, "output_tokens");
    }

    /// OpenAI's usage object: the prompt counts every prompt token, cached or not.
    fn openai(self) -> Value {
        let prompt = self.input + self.cache_creation + self.cache_read;
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.output,
            "total_tokens": prompt + self.output,
            "prompt_tokens_details": {"cached_tokens": self.cache_read},
        })
    }
}

#[cfg(test)]
mod tests {
    //! The directions composed: what a client sends or receives survives the trip through
    //! the other API and back.

    use super::client_reply::openai_response_to_anthropic;
    use super::client_request::anthropic_request_to_openai;
    use super::client_stream::OpenAiToAnthropic;
    use super::upstream_reply::anthropic_response_to_openai;
    use super::upstream_request::openai_request_to_anthropic;
    use super::upstream_stream::AnthropicToOpenAi;
    use super::*;

    fn anthropic_request() -> Value {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": "You are a terse weather assistant.",
            "temperature": 0.3,
            "stop_sequences": ["\n\nHuman:"],
            "tools": [{
                "name": "get_weather",
                "description": "Current weather for a city",
                "input_schema": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"]
                }
            }],
            "tool_choice": {"type": "auto"},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9",
                     "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                     "content": "15°C, light rain"},
                    {"type": "text", "text": "Thanks. Umbrella?"}
                ]}
            ]
        })
    }

    #[test]
    fn a_system_prompt_and_tool_round_trip_survive_both_translations() {
        let original = anthropic_request();
        let openai = anthropic_request_to_openai(&original).unwrap();
        let back = openai_request_to_anthropic(&openai, "claude-sonnet-4-5", 4096).unwrap();
        assert_eq!(back.json_tool, None);
        let body = back.body;
        assert_eq!(body["system"], original["system"]);
        assert_eq!(body["max_tokens"], 1024);
        assert_eq!(body["stop_sequences"], original["stop_sequences"]);
        assert_eq!(body["temperature"], 0.3);
        assert_eq!(body["tools"], original["tools"]);
        assert_eq!(body["tool_choice"], json!({"type": "auto"}));
        assert_eq!(
            body["messages"][0],
            json!({"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]})
        );
        assert_eq!(
            body["messages"][1]["content"],
            original["messages"][1]["content"]
        );
        assert_eq!(
            body["messages"][2]["content"],
            json!([
                {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                 "content": "15°C, light rain"},
                {"type": "text", "text": "Thanks. Umbrella?"}
            ])
        );
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(3));
    }

    #[test]
    fn an_answer_with_a_tool_call_survives_both_reply_translations() {
        let openai = json!({
            "id": "chatcmpl-9xYz",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "qwen2.5-7b-instruct",
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Checking the forecast.",
                    "tool_calls": [{"id": "call_abc", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]
                },
                "finish_reason": "tool_calls"
            }],
            "usage": {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}
        });
        let anthropic = openai_response_to_anthropic(&openai).unwrap();
        let back = anthropic_response_to_openai(&anthropic, None, 1_700_000_000).unwrap();
        assert_eq!(back["id"], "chatcmpl-msg_9xYz");
        assert_eq!(
            back["choices"][0]["message"]["content"],
            "Checking the forecast."
        );
        assert_eq!(
            back["choices"][0]["message"]["tool_calls"],
            openai["choices"][0]["message"]["tool_calls"]
        );
        assert_eq!(back["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(back["usage"]["prompt_tokens"], 40);
        assert_eq!(back["usage"]["completion_tokens"], 12);
        assert_eq!(back["usage"]["total_tokens"], 52);
    }

    #[test]
    fn a_stream_translated_to_anthropic_and_back_carries_the_same_text_and_arguments() {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1,
                   "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let chunks = [
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(json!({"content": "Let me "}), Value::Null),
            chunk(json!({"content": "look."}), Value::Null),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}),
                Value::Null,
            ),
            chunk(json!({}), json!("tool_calls")),
            json!({"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1,
                   "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}}),
        ];
        let mut to_anthropic = OpenAiToAnthropic::new("claude-haiku-4-5");
        let mut to_openai = AnthropicToOpenAi::new("gpt-4o-mini", 5, None);
        let mut out = Vec::new();
        for c in &chunks {
            for (name, data) in to_anthropic.push(c).unwrap() {
                out.extend(to_openai.push(name, &data).unwrap());
            }
        }
        for (name, data) in to_anthropic.finish() {
            out.extend(to_openai.push(name, &data).unwrap());
        }
        assert!(to_openai.is_done());
        let text: String = out
            .iter()
            .filter_map(|c| {
                c.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
            })
            .collect();
        assert_eq!(text, "Let me look.");
        let args: String = out
            .iter()
            .filter_map(|c| {
                c.pointer("/choices/0/delta/tool_calls/0/function/arguments")
                    .and_then(Value::as_str)
            })
            .collect();
        assert_eq!(args, "{\"city\":\"Oslo\"}");
        let finish: Vec<&Value> = out
            .iter()
            .filter_map(|c| c.pointer("/choices/0/finish_reason"))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&json!("tool_calls")]);
        let usage = out.last().and_then(|c| c.get("usage")).cloned();
        assert_eq!(usage.map(|u| u["total_tokens"].clone()), Some(json!(16)));
    }

    #[test]
    fn finish_and_stop_reasons_map_both_ways() {
        assert_eq!(stop_reason("stop"), "end_turn");
        assert_eq!(stop_reason("length"), "max_tokens");
        assert_eq!(stop_reason("tool_calls"), "tool_use");
        assert_eq!(stop_reason("content_filter"), "refusal");
        assert_eq!(finish_reason("end_turn"), "stop");
        assert_eq!(finish_reason("stop_sequence"), "stop");
        assert_eq!(finish_reason("max_tokens"), "length");
        assert_eq!(finish_reason("tool_use"), "tool_calls");
        assert_eq!(finish_reason("refusal"), "content_filter");
        assert_eq!(finish_reason("a_reason_added_next_year"), "stop");
    }

    #[test]
    fn ids_are_derived_so_one_exchange_can_be_followed_across_both_apis() {
        assert_eq!(message_id("chatcmpl-abc123"), "msg_abc123");
        assert_eq!(message_id("cmpl-7"), "msg_cmpl-7");
        assert_eq!(
            completion_id("msg_01XFDUDYJgAACzvnptvVoYEL"),
            "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL"
        );
    }

    #[test]
    fn cached_prompt_tokens_are_split_out_for_anthropic_and_counted_back_in_for_openai() {
        let openai = json!({"prompt_tokens": 100, "completion_tokens": 5,
                            "prompt_tokens_details": {"cached_tokens": 60}});
        let a = anthropic_usage(Some(&openai));
        assert_eq!(a["input_tokens"], 40);
        assert_eq!(a["cache_read_input_tokens"], 60);
        let mut t = Tokens::default();
        t.update(&a);
        assert_eq!(t.openai()["prompt_tokens"], 100);
        assert_eq!(t.openai()["total_tokens"], 105);
        assert_eq!(t.openai()["prompt_tokens_details"]["cached_tokens"], 60);
    }

    #[test]
    fn only_an_overloaded_error_event_counts_as_overload() {
        let over = StreamFailure::Reported {
            kind: "overloaded_error".into(),
            message: "Overloaded".into(),
        };
        assert!(over.is_overloaded());
        assert!(!StreamFailure::malformed("cut short").is_overloaded());
    }
}
