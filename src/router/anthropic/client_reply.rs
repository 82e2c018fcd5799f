//! A whole OpenAI answer (from the local model or an OpenAI-compatible cloud) as the Messages
//! reply an Anthropic client expects.

use serde_json::{json, Value};

use super::{anthropic_usage, message_id, stop_reason, Malformed};

/// Translates a `chat.completion` object into an Anthropic `message`.
///
/// `model` is the answering model's name as the OpenAI side gave it; the router replaces it
/// with the client's own model name when it prefers to hide which backend answered.
/// `stop_sequence` is always null: OpenAI does not say which stop string matched (see
/// [`stop_reason`]). An answer Anthropic cannot carry (no choices, tool arguments that are not
/// a JSON object) is [`Malformed`], so the router can treat it as a broken reply.
pub(crate) fn openai_response_to_anthropic(completion: &Value) -> Result<Value, Malformed> {
    let id = completion
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| Malformed::new("a chat completion without an `id`"))?;
    let choice = completion
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| Malformed::new("a chat completion without choices"))?;
    let message = choice
        .get("message")
        .filter(|m| m.is_object())
        .ok_or_else(|| Malformed::new("a chat completion choice without a `message`"))?;

    let mut content = Vec::new();
    let text = message_text(message.get("content"))?;
    let refusal = message
        .get("refusal")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty());
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    } else if let Some(r) = refusal {
        content.push(json!({"type": "text", "text": r}));
    }
    match message.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(calls)) => {
            for call in calls {
                content.push(tool_use(call)?);
            }
        }
        Some(_) => return Err(Malformed::new("`tool_calls` is not a list")),
    }

    let finish = choice.get("finish_reason").and_then(Value::as_str);
    let stop = match finish {
        _ if text.is_empty() && refusal.is_some() => "refusal",
        Some(f) => stop_reason(f),
        None => "end_turn",
    };
    Ok(json!({
        "id": message_id(id),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model").and_then(Value::as_str).unwrap_or_default(),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": anthropic_usage(completion.get("usage")),
    }))
}

/// The assistant's text: a string, null, or (from some compatible servers) text parts.
fn message_text(content: Option<&Value>) -> Result<String, Malformed> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| {
                p.get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Malformed::new("a content part without text"))
            })
            .collect(),
        Some(_) => Err(Malformed::new("message content is neither text nor null")),
    }
}

/// An OpenAI tool call as a `tool_use` block. The id is kept as it is: Anthropic clients only
/// echo it back as `tool_use_id`, which becomes the `tool_call_id` the OpenAI side expects.
fn tool_use(call: &Value) -> Result<Value, Malformed> {
    let field = |pointer: &str| {
        call.pointer(pointer)
            .and_then(Value::as_str)
            .ok_or_else(|| Malformed::new(format!("a tool call without `{}`", &pointer[1..])))
    };
    let id = field("/id")?;
    let name = field("/function/name")?;
    let arguments = field("/function/arguments")?;
    let input = if arguments.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str::<Value>(arguments)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                Malformed::new(format!(
                    "the arguments of tool call `{name}` are not a JSON object"
                ))
            })?
    };
    Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(message: Value, finish: &str) -> Value {
        json!({
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "object": "chat.completion",
            "created": 1_741_570_283,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
                      "prompt_tokens_details": {"cached_tokens": 1024}}
        })
    }

    #[test]
    fn a_text_answer_becomes_an_anthropic_message() {
        let c = completion(
            json!({"role": "assistant", "content": "Paris.", "refusal": null}),
            "stop",
        );
        let m = openai_response_to_anthropic(&c).unwrap();
        assert_eq!(
            m,
            json!({
                "id": "msg_B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
                "type": "message",
                "role": "assistant",
                "model": "gpt-4o-2024-08-06",
                "content": [{"type": "text", "text": "Paris."}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": {"input_tokens": 93, "output_tokens": 46,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1024}
            })
        );
    }

    #[test]
    fn tool_calls_become_tool_use_blocks_with_parsed_input() {
        let c = completion(
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}
            ]}),
            "tool_calls",
        );
        let m = openai_response_to_anthropic(&c).unwrap();
        assert_eq!(
            m["content"],
            json!([
                {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Lyon"}},
                {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}}
            ])
        );
        assert_eq!(m["stop_reason"], "tool_use");
    }

    #[test]
    fn a_length_cut_answer_stops_for_max_tokens() {
        let c = completion(
            json!({"role": "assistant", "content": "Once upon"}),
            "length",
        );
        assert_eq!(
            openai_response_to_anthropic(&c).unwrap()["stop_reason"],
            "max_tokens"
        );
    }

    #[test]
    fn a_refusal_is_the_text_and_the_stop_reason() {
        let c = completion(
            json!({"role": "assistant", "content": null, "refusal": "I can't help with that."}),
            "stop",
        );
        let m = openai_response_to_anthropic(&c).unwrap();
        assert_eq!(m["content"][0]["text"], "I can't help with that.");
        assert_eq!(m["stop_reason"], "refusal");
    }

    #[test]
    fn an_empty_answer_has_no_content_blocks_and_missing_usage_counts_zero() {
        let mut c = completion(json!({"role": "assistant", "content": ""}), "stop");
        c.as_object_mut().unwrap().remove("usage");
        let m = openai_response_to_anthropic(&c).unwrap();
        assert_eq!(m["content"], json!([]));
        assert_eq!(m["usage"]["output_tokens"], 0);
    }

    #[test]
    fn an_answer_without_choices_or_with_broken_tool_arguments_is_malformed() {
        let mut c = completion(json!({"role": "assistant", "content": "x"}), "stop");
        c["choices"] = json!([]);
        assert!(openai_response_to_anthropic(&c).is_err());
        let c = completion(
            json!({"role": "assistant", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"city\": "}}
            ]}),
            "tool_calls",
        );
        let e = openai_response_to_anthropic(&c).unwrap_err();
        assert!(e.to_string().contains("not a JSON object"), "{e}");
        assert!(openai_response_to_anthropic(&json!({"error": {"message": "boom"}})).is_err());
    }
}
