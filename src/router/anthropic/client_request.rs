//! An Anthropic client's Messages request (`POST /v1/messages`) as an OpenAI chat request, so
//! the router can send it to the cloud or the local model like any other.
//!
//! Anything that cannot be served the same way by every backend is refused here with a 400
//! naming the field (images and documents, server tools, extended thinking), rather than
//! working in the cloud and failing the day the request falls over to the local model.

use serde_json::{json, Map, Value};

use crate::api::request::{check_stop, Invalid};

/// Translates a Messages request body into a Chat Completions request body.
///
/// When streaming, it asks for `stream_options.include_usage`: Anthropic's closing
/// `message_delta` carries the output token count, and OpenAI streams only report usage when
/// asked. Ignored, as they change nothing about the answer: `metadata`, `service_tier`,
/// `cache_control` marks, and `thinking: {"type": "disabled"}`.
pub(crate) fn anthropic_request_to_openai(body: &Value) -> Result<Value, Invalid> {
    let body = body
        .as_object()
        .ok_or_else(|| Invalid::new("body", "the request body must be a JSON object"))?;
    refuse_unsupported(body)?;
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        _ => return Err(Invalid::new("model", "model: a model name is required")),
    };
    let max_tokens = match body.get("max_tokens").and_then(Value::as_u64) {
        Some(n) if n >= 1 => n,
        _ => {
            return Err(Invalid::new(
                "max_tokens",
                "max_tokens is required and must be a positive integer",
            ))
        }
    };
    let mut messages = Vec::new();
    if let Some(system) = body.get("system") {
        if let Some(content) = system_content(system)? {
            messages.push(json!({"role": "system", "content": content}));
        }
    }
    let list = match body.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        _ => {
            return Err(Invalid::new(
                "messages",
                "messages must be a non-empty list",
            ))
        }
    };
    for (i, message) in list.iter().enumerate() {
        translate_message(message, i, &mut messages)?;
    }

    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(messages));
    out.insert("max_tokens".into(), json!(max_tokens));
    if let Some(stop) = stop_sequences(body.get("stop_sequences"))? {
        out.insert("stop".into(), stop);
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = unit_number(body, key)? {
            out.insert(key.into(), v);
        }
    }
    match body.get("top_k") {
        None | Some(Value::Null) => {}
        Some(v) if v.is_u64() => {
            out.insert("top_k".into(), v.clone());
        }
        Some(_) => {
            return Err(Invalid::new(
                "top_k",
                "top_k must be a non-negative integer",
            ))
        }
    }
    translate_tools(body, &mut out)?;
    match body.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            out.insert("stream".into(), json!(true));
            out.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Some(_) => return Err(Invalid::new("stream", "stream must be a boolean")),
    }
    Ok(Value::Object(out))
}

/// Features whose answer no backend here can give; refused before anything is sent.
fn refuse_unsupported(body: &Map<String, Value>) -> Result<(), Invalid> {
    match body.get("thinking").and_then(|t| t.get("type")).and_then(Value::as_str) {
        None | Some("disabled") => {}
        Some(_) => {
            return Err(Invalid::new(
                "thinking",
                "extended thinking is not supported: omit `thinking` or set it to {\"type\": \"disabled\"}",
            ))
        }
    }
    if body
        .get("mcp_servers")
        .and_then(Value::as_array)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(Invalid::new(
            "mcp_servers",
            "MCP servers are not supported: call the tools yourself and send their results",
        ));
    }
    Ok(())
}

/// Text blocks as OpenAI content: one block as a plain string, several as text parts, so no
/// separator has to be invented between them.
fn text_content(mut texts: Vec<String>) -> Value {
    if texts.len() == 1 {
        return Value::String(texts.remove(0));
    }
    Value::Array(
        texts
            .into_iter()
            .map(|t| json!({"type": "text", "text": t}))
            .collect(),
    )
}

/// The text of a list of blocks that may only be text (`system`, `tool_result.content`).
fn text_blocks(blocks: &[Value], param: &str) -> Result<Vec<String>, Invalid> {
    blocks
        .iter()
        .enumerate()
        .map(
            |(j, block)| match (block.get("type").and_then(Value::as_str), block.get("text")) {
                (Some("text"), Some(Value::String(t))) => Ok(t.clone()),
                (Some("text"), _) => Err(Invalid::new(
                    format!("{param}[{j}].text"),
                    "a text block needs a string `text`",
                )),
                (Some(kind), _) => Err(unsupported_block(&format!("{param}[{j}].type"), kind)),
                (None, _) => Err(Invalid::new(
                    format!("{param}[{j}]"),
                    "each content block needs a `type`",
                )),
            },
        )
        .collect()
}

fn unsupported_block(param: &str, kind: &str) -> Invalid {
    let what = match kind {
        "image" => "images are",
        "document" => "documents are",
        _ => "this block type is",
    };
    Invalid::new(
        param,
        format!(
            "content blocks of type `{kind}` are not supported: {what} not translated, so only text, tool_use and tool_result blocks can be sent"
        ),
    )
}

fn system_content(system: &Value) -> Result<Option<Value>, Invalid> {
    match system {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(json!(s))),
        Value::Array(blocks) => {
            let texts = text_blocks(blocks, "system")?;
            Ok((!texts.is_empty()).then(|| text_content(texts)))
        }
        _ => Err(Invalid::new(
            "system",
            "system must be a string or a list of text blocks",
        )),
    }
}

/// Appends the OpenAI messages for one Anthropic message: a user message with tool results
/// becomes `role: tool` messages (first, as OpenAI wants them right after the assistant's
/// calls; Anthropic already requires tool results to open the user turn) then the user's text.
fn translate_message(message: &Value, i: usize, out: &mut Vec<Value>) -> Result<(), Invalid> {
    let role = match message.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant")) => role,
        _ => {
            return Err(Invalid::new(
                format!("messages[{i}].role"),
                "role must be `user` or `assistant`; a system prompt goes in the top-level `system` field",
            ))
        }
    };
    let blocks = match message.get("content") {
        Some(Value::String(s)) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Some(Value::Array(blocks)) if !blocks.is_empty() => blocks,
        _ => {
            return Err(Invalid::new(
                format!("messages[{i}].content"),
                "content must be a string or a non-empty list of content blocks",
            ))
        }
    };
    let mut texts = Vec::new();
    let mut tool_calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let param = format!("messages[{i}].content[{j}]");
        let kind = block.get("type").and_then(Value::as_str);
        match (role, kind) {
            (_, Some("text")) => match block.get("text") {
                Some(Value::String(t)) => texts.push(t.clone()),
                _ => {
                    return Err(Invalid::new(
                        format!("{param}.text"),
                        "a text block needs a string `text`",
                    ))
                }
            },
            ("user", Some("tool_result")) => out.push(tool_result(block, &param)?),
            ("assistant", Some("tool_use")) => tool_calls.push(tool_use(block, &param)?),
            // Earlier turns' reasoning, sent back by clients that keep it; no backend here
            // reads it, and its signature only means something to Anthropic.
            ("assistant", Some("thinking" | "redacted_thinking")) => {}
            (_, Some(kind @ ("tool_result" | "tool_use"))) => {
                return Err(Invalid::new(
                    format!("{param}.type"),
                    format!("a `{kind}` block cannot appear in a `{role}` message"),
                ))
            }
            (_, Some(kind)) => return Err(unsupported_block(&format!("{param}.type"), kind)),
            (_, None) => return Err(Invalid::new(param, "each content block needs a `type`")),
        }
    }
    if role == "assistant" {
        let content = if texts.is_empty() && !tool_calls.is_empty() {
            Value::Null
        } else if texts.is_empty() {
            json!("")
        } else {
            text_content(texts)
        };
        let mut m = json!({"role": "assistant", "content": content});
        if !tool_calls.is_empty() {
            m["tool_calls"] = Value::Array(tool_calls);
        }
        out.push(m);
    } else if !texts.is_empty() {
        out.push(json!({"role": "user", "content": text_content(texts)}));
    }
    Ok(())
}

fn required_str<'a>(block: &'a Value, key: &str, param: &str) -> Result<&'a str, Invalid> {
    match block.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(Invalid::new(
            format!("{param}.{key}"),
            format!("`{key}` must be a non-empty string"),
        )),
    }
}

/// A `tool_use` block as an OpenAI tool call, whose arguments are a JSON string.
fn tool_use(block: &Value, param: &str) -> Result<Value, Invalid> {
    let id = required_str(block, "id", param)?;
    let name = required_str(block, "name", param)?;
    let input = match block.get("input") {
        Some(input @ Value::Object(_)) => input.to_string(),
        _ => {
            return Err(Invalid::new(
                format!("{param}.input"),
                "`input` must be an object",
            ))
        }
    };
    Ok(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input}}))
}

/// A `tool_result` block as a `role: tool` message. OpenAI has no error flag for tool
/// results, so `is_error: true` is said in the text itself ("Error: …"), which is how the
/// model would read it either way.
fn tool_result(block: &Value, param: &str) -> Result<Value, Invalid> {
    let id = required_str(block, "tool_use_id", param)?;
    let mut texts = match block.get("content") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(blocks)) => text_blocks(blocks, &format!("{param}.content"))?,
        Some(_) => {
            return Err(Invalid::new(
                format!("{param}.content"),
                "tool result content must be a string or a list of text blocks",
            ))
        }
    };
    if block.get("is_error").and_then(Value::as_bool) == Some(true) {
        match texts.first_mut() {
            Some(first) => first.insert_str(0, "Error: "),
            None => texts.push("Error".into()),
        }
    }
    let content = if texts.is_empty() {
        json!("")
    } else {
        text_content(texts)
    };
    Ok(json!({"role": "tool", "tool_call_id": id, "content": content}))
}

fn stop_sequences(value: Option<&Value>) -> Result<Option<Value>, Invalid> {
    let list = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                Invalid::new("stop_sequences", "stop_sequences must be a list of strings")
            })?,
        Some(_) => {
            return Err(Invalid::new(
                "stop_sequences",
                "stop_sequences must be a list of strings",
            ))
        }
    };
    check_stop(&list, "stop_sequences")?;
    Ok((!list.is_empty()).then(|| json!(list)))
}

/// A sampling number in Anthropic's range (both `temperature` and `top_p` are 0 to 1).
fn unit_number(body: &Map<String, Value>, key: &str) -> Result<Option<Value>, Invalid> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => Ok(Some(v.clone())),
            _ => Err(Invalid::new(
                key,
                format!("{key} must be a number between 0 and 1"),
            )),
        },
    }
}

/// `tools` and `tool_choice`. Only client tools (the kind with an `input_schema`) translate;
/// Anthropic's server tools (web search, code execution, …) run on Anthropic's side.
fn translate_tools(body: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), Invalid> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(tools)) => tools.as_slice(),
        Some(_) => return Err(Invalid::new("tools", "tools must be a list")),
    };
    let mut translated = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        match tool.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(kind) => {
                return Err(Invalid::new(
                    format!("{param}.type"),
                    format!("server tool `{kind}` is not supported: only tools with an input_schema can be used"),
                ))
            }
        }
        let name = required_str(tool, "name", &param)?;
        let schema = match tool.get("input_schema") {
            Some(s @ Value::Object(_)) => s.clone(),
            _ => {
                return Err(Invalid::new(
                    format!("{param}.input_schema"),
                    "input_schema must be a JSON schema object",
                ))
            }
        };
        let mut function = json!({"name": name, "parameters": schema});
        if let Some(d) = tool.get("description").and_then(Value::as_str) {
            function["description"] = json!(d);
        }
        translated.push(json!({"type": "function", "function": function}));
    }
    if !translated.is_empty() {
        out.insert("tools".into(), Value::Array(translated));
    }
    let Some(choice) = body.get("tool_choice").filter(|c| !c.is_null()) else {
        return Ok(());
    };
    let translated = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = required_str(choice, "name", "tool_choice")?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(Invalid::new(
                "tool_choice.type",
                "tool_choice.type must be one of auto, any, tool or none",
            ))
        }
    };
    out.insert("tool_choice".into(), translated);
    if choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        == Some(true)
    {
        out.insert("parallel_tool_calls".into(), json!(false));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Value {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 256,
            "messages": [{"role": "user", "content": "Hello, Claude"}]
        })
    }

    fn with(key: &str, value: Value) -> Value {
        let mut body = minimal();
        body[key] = value;
        body
    }

    fn refused(body: Value) -> Invalid {
        anthropic_request_to_openai(&body).unwrap_err()
    }

    #[test]
    fn a_plain_request_becomes_a_chat_request_with_the_same_model_and_limit() {
        let out = anthropic_request_to_openai(&minimal()).unwrap();
        assert_eq!(
            out,
            json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 256,
                "messages": [{"role": "user", "content": "Hello, Claude"}]
            })
        );
    }

    #[test]
    fn a_system_string_or_system_blocks_become_a_leading_system_message() {
        let out = anthropic_request_to_openai(&with("system", json!("Be brief."))).unwrap();
        assert_eq!(
            out["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        let blocks = json!([
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Answer in French."}
        ]);
        let out = anthropic_request_to_openai(&with("system", blocks)).unwrap();
        assert_eq!(
            out["messages"][0]["content"],
            json!([{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in French."}])
        );
        assert_eq!(out["messages"][1]["role"], "user");
    }

    #[test]
    fn a_tool_exchange_becomes_tool_calls_and_tool_messages() {
        let body = with(
            "messages",
            json!([
                {"role": "user", "content": "What's 2+2? Use the calculator."},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "easy", "signature": "EqQB"},
                    {"type": "tool_use", "id": "toolu_01", "name": "calc", "input": {"expr": "2+2"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01",
                     "content": [{"type": "text", "text": "4"}]},
                    {"type": "text", "text": "And now explain."}
                ]}
            ]),
        );
        let out = anthropic_request_to_openai(&body).unwrap();
        let m = out["messages"].as_array().unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[1]["content"], Value::Null);
        assert_eq!(
            m[1]["tool_calls"],
            json!([{"id": "toolu_01", "type": "function",
                    "function": {"name": "calc", "arguments": "{\"expr\":\"2+2\"}"}}])
        );
        assert_eq!(
            m[2],
            json!({"role": "tool", "tool_call_id": "toolu_01", "content": "4"})
        );
        assert_eq!(m[3], json!({"role": "user", "content": "And now explain."}));
    }

    #[test]
    fn a_failed_tool_result_says_so_in_its_text() {
        let body = with(
            "messages",
            json!([{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_9", "is_error": true,
                 "content": "city not found"}
            ]}]),
        );
        let out = anthropic_request_to_openai(&body).unwrap();
        assert_eq!(out["messages"][0]["content"], "Error: city not found");
        assert_eq!(out["messages"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn tools_and_each_tool_choice_translate() {
        let mut body = with(
            "tools",
            json!([{"name": "get_weather", "description": "Weather by city",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]),
        );
        let out = anthropic_request_to_openai(&body).unwrap();
        assert_eq!(
            out["tools"],
            json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
        );
        for (choice, expected) in [
            (json!({"type": "auto"}), json!("auto")),
            (json!({"type": "any"}), json!("required")),
            (json!({"type": "none"}), json!("none")),
            (
                json!({"type": "tool", "name": "get_weather"}),
                json!({"type": "function", "function": {"name": "get_weather"}}),
            ),
        ] {
            body["tool_choice"] = choice;
            let out = anthropic_request_to_openai(&body).unwrap();
            assert_eq!(out["tool_choice"], expected);
            assert!(out.get("parallel_tool_calls").is_none());
        }
        body["tool_choice"] = json!({"type": "any", "disable_parallel_tool_use": true});
        let out = anthropic_request_to_openai(&body).unwrap();
        assert_eq!(out["parallel_tool_calls"], false);
    }

    #[test]
    fn sampling_stop_sequences_and_streaming_carry_over() {
        let mut body = minimal();
        body["temperature"] = json!(0.2);
        body["top_p"] = json!(0.9);
        body["top_k"] = json!(40);
        body["stop_sequences"] = json!(["END"]);
        body["stream"] = json!(true);
        body["metadata"] = json!({"user_id": "u-42"});
        let out = anthropic_request_to_openai(&body).unwrap();
        assert_eq!(out["temperature"], 0.2);
        assert_eq!(out["top_p"], 0.9);
        assert_eq!(out["top_k"], 40);
        assert_eq!(out["stop"], json!(["END"]));
        assert_eq!(out["stream"], true);
        assert_eq!(out["stream_options"], json!({"include_usage": true}));
        assert!(out.get("metadata").is_none());
    }

    #[test]
    fn missing_model_max_tokens_or_messages_are_refused_naming_the_field() {
        let mut no_model = minimal();
        no_model.as_object_mut().unwrap().remove("model");
        assert_eq!(refused(no_model).param, "model");
        let mut no_max = minimal();
        no_max.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(refused(no_max).param, "max_tokens");
        assert_eq!(refused(with("max_tokens", json!(0))).param, "max_tokens");
        assert_eq!(refused(with("messages", json!([]))).param, "messages");
        assert_eq!(refused(json!("hi")).param, "body");
    }

    #[test]
    fn a_system_role_inside_messages_is_refused() {
        let body = with("messages", json!([{"role": "system", "content": "x"}]));
        let e = refused(body);
        assert_eq!(e.param, "messages[0].role");
        assert!(e.message.contains("system"));
    }

    #[test]
    fn images_and_documents_are_refused_with_a_clear_message() {
        let body = with(
            "messages",
            json!([{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}
            ]}]),
        );
        let e = refused(body);
        assert_eq!(e.param, "messages[0].content[1].type");
        assert!(
            e.message.contains("images are not translated"),
            "{}",
            e.message
        );
        let body = with(
            "messages",
            json!([{"role": "user", "content": [
                {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
            ]}]),
        );
        assert!(refused(body).message.contains("documents"));
    }

    #[test]
    fn thinking_server_tools_and_out_of_range_sampling_are_refused() {
        let e = refused(with(
            "thinking",
            json!({"type": "enabled", "budget_tokens": 2048}),
        ));
        assert_eq!(e.param, "thinking");
        assert!(
            anthropic_request_to_openai(&with("thinking", json!({"type": "disabled"}))).is_ok()
        );
        let e = refused(with(
            "tools",
            json!([{"type": "web_search_20250305", "name": "web_search"}]),
        ));
        assert_eq!(e.param, "tools[0].type");
        assert_eq!(
            refused(with("temperature", json!(1.5))).param,
            "temperature"
        );
        assert_eq!(refused(with("top_k", json!(-1))).param, "top_k");
        assert_eq!(
            refused(with("stop_sequences", json!("END"))).param,
            "stop_sequences"
        );
        assert_eq!(
            refused(with("tool_choice", json!({"type": "sometimes"}))).param,
            "tool_choice.type"
        );
    }

    #[test]
    fn a_tool_use_in_a_user_message_or_without_an_input_object_is_refused() {
        let body = with(
            "messages",
            json!([{"role": "user", "content": [
                {"type": "tool_use", "id": "t", "name": "n", "input": {}}
            ]}]),
        );
        assert_eq!(refused(body).param, "messages[0].content[0].type");
        let body = with(
            "messages",
            json!([{"role": "assistant", "content": [
                {"type": "tool_use", "id": "t", "name": "n", "input": "2+2"}
            ]}]),
        );
        assert_eq!(refused(body).param, "messages[0].content[0].input");
    }
}
