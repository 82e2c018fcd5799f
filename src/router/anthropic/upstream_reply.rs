//! A whole Anthropic upstream answer as the `chat.completion` an OpenAI client expects.
//!
//! Strict on purpose: a 200 that lacks what the Messages API promises is [`Malformed`], which
//! the router treats as a failed upstream and answers locally instead of passing on garbage.

use serde_json::{json, Map, Value};

use super::{completion_id, finish_reason, Malformed, Tokens};

/// Translates an Anthropic `message` into a `chat.completion` created at `created` (Unix
/// seconds; passed in to keep this pure).
///
/// `json_tool` is [`Translated::json_tool`](super::upstream_request::Translated::json_tool) of the request: a
/// `tool_use` of that tool is the structured answer, so its input becomes the message text
/// (any text the model wrote beside it is dropped, as the client asked for JSON only) and the
/// finish reason is `stop`. Thinking blocks and block types added later are skipped.
pub(crate) fn anthropic_response_to_openai(
    message: &Value,
    json_tool: Option<&str>,
    created: i64,
) -> Result<Value, Malformed> {
    let m = message
        .as_object()
        .ok_or_else(|| Malformed::new("the body is not a JSON object"))?;
    if m.get("type").and_then(Value::as_str) != Some("message") {
        let why = m
            .get("error")
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .map_or_else(
                || "the body is not a message (no `type: \"message\"`)".to_owned(),
                |e| format!("the body is an error, not a message: {e}"),
            );
        return Err(Malformed::new(why));
    }
    let field = |key: &str| {
        m.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| Malformed::new(format!("the message has no `{key}`")))
    };
    let id = field("id")?;
    let model = field("model")?;
    let stop = field("stop_reason")?;
    if m.get("role").and_then(Value::as_str) != Some("assistant") {
        return Err(Malformed::new("the message's role is not `assistant`"));
    }
    let blocks = m
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| Malformed::new("the message has no `content` list"))?;
    let usage = m
        .get("usage")
        .filter(|u| u.get("input_tokens").is_some_and(Value::is_u64))
        .filter(|u| u.get("output_tokens").is_some_and(Value::is_u64))
        .ok_or_else(|| Malformed::new("the message has no token `usage`"))?;
    let mut tokens = Tokens::default();
    tokens.update(usage);

    let mut text = String::new();
    let mut structured = None;
    let mut calls = Vec::new();
    for block in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(
                block
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Malformed::new("a text block without text"))?,
            ),
            Some("tool_use") => {
                let (id, name, input) = tool_use(block)?;
                if Some(name) == json_tool {
                    structured = Some(input.to_string());
                } else {
                    calls.push(json!({"id": id, "type": "function",
                        "function": {"name": name, "arguments": input.to_string()}}));
                }
            }
            Some(_) => {}
            None => return Err(Malformed::new("a content block without a `type`")),
        }
    }
    let finish = match (stop, &structured, calls.is_empty()) {
        ("tool_use", Some(_), true) => "stop",
        _ => finish_reason(stop),
    };
    let content = match structured {
        Some(json) => Value::String(json),
        None if text.is_empty() && !calls.is_empty() => Value::Null,
        None => Value::String(text),
    };
    let mut reply = Map::new();
    reply.insert("role".into(), json!("assistant"));
    reply.insert("content".into(), content);
    reply.insert("refusal".into(), Value::Null);
    if !calls.is_empty() {
        reply.insert("tool_calls".into(), Value::Array(calls));
    }
    Ok(json!({
        "id": completion_id(id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": reply, "logprobs": null, "finish_reason": finish}],
        "usage": tokens.openai(),
    }))
}

fn tool_use(block: &Value) -> Result<(&str, &str, &Value), Malformed> {
    let id = block.get("id").and_then(Value::as_str);
    let name = block.get("name").and_then(Value::as_str);
    let input = block.get("input").filter(|i| i.is_object());
    match (id, name, input) {
        (Some(id), Some(name), Some(input)) => Ok((id, name, input)),
        _ => Err(Malformed::new(
            "a tool_use block without an id, a name and an input object",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(content: Value, stop: &str) -> Value {
        json!({
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": null,
            "usage": {"input_tokens": 2095, "output_tokens": 503,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1000}
        })
    }

    #[test]
    fn a_text_message_becomes_a_chat_completion() {
        let m = message(
            json!([{"type": "text", "text": "Hi! My name is Claude."}]),
            "end_turn",
        );
        let c = anthropic_response_to_openai(&m, None, 1_700_000_000).unwrap();
        assert_eq!(
            c,
            json!({
                "id": "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": "claude-sonnet-4-5-20250929",
                "choices": [{"index": 0, "logprobs": null, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "Hi! My name is Claude.", "refusal": null}}],
                "usage": {"prompt_tokens": 3095, "completion_tokens": 503, "total_tokens": 3598,
                          "prompt_tokens_details": {"cached_tokens": 1000}}
            })
        );
    }

    #[test]
    fn tool_use_blocks_become_tool_calls_and_thinking_is_skipped() {
        let m = message(
            json!([
                {"type": "thinking", "thinking": "They want weather.", "signature": "EqQBCgIYAhIM"},
                {"type": "text", "text": "I'll check."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
                 "input": {"location": "San Francisco, CA", "unit": "celsius"}}
            ]),
            "tool_use",
        );
        let c = anthropic_response_to_openai(&m, None, 0).unwrap();
        let reply = &c["choices"][0]["message"];
        assert_eq!(reply["content"], "I'll check.");
        assert_eq!(
            reply["tool_calls"],
            json!([{"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {
                "name": "get_weather",
                "arguments": "{\"location\":\"San Francisco, CA\",\"unit\":\"celsius\"}"}}])
        );
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn a_structured_output_answer_is_the_forced_tools_input_as_text() {
        let m = message(
            json!([{"type": "tool_use", "id": "toolu_9", "name": "person",
                    "input": {"name": "Ada", "age": 36}}]),
            "tool_use",
        );
        let c = anthropic_response_to_openai(&m, Some("person"), 0).unwrap();
        let reply = &c["choices"][0]["message"];
        let parsed: Value = serde_json::from_str(reply["content"].as_str().unwrap()).unwrap();
        assert_eq!(parsed, json!({"name": "Ada", "age": 36}));
        assert!(reply.get("tool_calls").is_none());
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn stop_reasons_become_finish_reasons() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
        ] {
            let m = message(json!([{"type": "text", "text": "x"}]), stop);
            let c = anthropic_response_to_openai(&m, None, 0).unwrap();
            assert_eq!(c["choices"][0]["finish_reason"], finish, "{stop}");
        }
    }

    #[test]
    fn a_success_without_content_is_malformed() {
        let mut m = message(json!([]), "end_turn");
        m.as_object_mut().unwrap().remove("content");
        assert!(anthropic_response_to_openai(&m, None, 0).is_err());
        let e = anthropic_response_to_openai(&json!({"ok": true}), None, 0).unwrap_err();
        assert!(e.to_string().contains("not a message"), "{e}");
    }

    #[test]
    fn an_error_body_sent_with_success_is_malformed_and_says_why() {
        let body = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        let e = anthropic_response_to_openai(&body, None, 0).unwrap_err();
        assert!(e.to_string().contains("Overloaded"), "{e}");
    }

    #[test]
    fn missing_usage_stop_reason_or_broken_blocks_are_malformed() {
        let mut no_usage = message(json!([]), "end_turn");
        no_usage.as_object_mut().unwrap().remove("usage");
        assert!(anthropic_response_to_openai(&no_usage, None, 0).is_err());
        let mut no_stop = message(json!([]), "end_turn");
        no_stop["stop_reason"] = Value::Null;
        assert!(anthropic_response_to_openai(&no_stop, None, 0).is_err());
        let bad_tool = message(
            json!([{"type": "tool_use", "id": "t", "name": "f"}]),
            "tool_use",
        );
        assert!(anthropic_response_to_openai(&bad_tool, None, 0).is_err());
        let bad_text = message(json!([{"type": "text"}]), "end_turn");
        assert!(anthropic_response_to_openai(&bad_text, None, 0).is_err());
    }
}
