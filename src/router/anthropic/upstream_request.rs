//! An OpenAI chat request as the Messages request an Anthropic upstream accepts.
//!
//! The two APIs disagree on shape more than on meaning: system prompts are a top-level field,
//! turns must alternate, tool results are user content, `max_tokens` is required, and there is
//! no `response_format`. Structured output is carried by a forced tool whose input schema is
//! the requested schema (Anthropic's own advice for JSON output); the reply translation turns
//! that tool's input back into the message text, so the OpenAI client sees the JSON it asked
//! for.

use serde_json::{json, Map, Value};

use crate::api::request::{check_stop, Invalid};

/// The request for the upstream, and what the reply translation needs to know about it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Translated {
    /// The Messages request body.
    pub(crate) body: Value,
    /// The tool standing in for `response_format`: its `tool_use` in the reply is the answer
    /// text, not a tool call. Pass it to the reply translation.
    pub(crate) json_tool: Option<String>,
}

/// Name of the forced tool for `response_format: {"type": "json_object"}`.
const JSON_OBJECT_TOOL: &str = "json_object";

/// Translates a Chat Completions request body for an Anthropic upstream serving
/// `upstream_model`. `default_max_tokens` is used when the request sets no limit, since
/// Anthropic requires one.
///
/// Mappings that are not one-to-one:
/// - `temperature` is clamped to 1.0: OpenAI's range is 0–2, Anthropic's 0–1, and both default
///   to 1, so values up to 1 keep their meaning; scaling would turn a common 0.7 into 0.35.
/// - `top_p` is dropped when `temperature` is set: recent Claude models refuse both at once.
/// - Tool call ids are kept, with characters Anthropic refuses (outside `A-Za-z0-9_-`)
///   replaced by `_`, the same way in calls and results, so they still pair up.
/// - `seed`, penalties, `logit_bias` and `user` have no Anthropic equivalent and are ignored
///   (best effort, like most gateways); `logprobs` is refused because the reply could not
///   carry them, and `n` other than 1 because Anthropic answers once.
pub(crate) fn openai_request_to_anthropic(
    body: &Value,
    upstream_model: &str,
    default_max_tokens: u32,
) -> Result<Translated, Invalid> {
    let body = body
        .as_object()
        .ok_or_else(|| Invalid::new("body", "the request body must be a JSON object"))?;
    if body
        .get("n")
        .is_some_and(|n| !n.is_null() && n.as_u64() != Some(1))
    {
        return Err(Invalid::new(
            "n",
            "only n=1 is supported by an Anthropic upstream",
        ));
    }
    if body.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(Invalid::new(
            "logprobs",
            "logprobs are not available from an Anthropic upstream",
        ));
    }
    let list = match body.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        _ => {
            return Err(Invalid::new(
                "messages",
                "messages must contain at least one message",
            ))
        }
    };
    let (system, turns) = conversation(list)?;

    let mut out = Map::new();
    out.insert("model".into(), json!(upstream_model));
    out.insert(
        "max_tokens".into(),
        json!(max_tokens(body, default_max_tokens)?),
    );
    if !system.is_empty() {
        out.insert("system".into(), system_value(system));
    }
    out.insert("messages".into(), Value::Array(turns));
    if let Some(stop) = stop(body.get("stop"))? {
        out.insert("stop_sequences".into(), stop);
    }
    sampling(body, &mut out)?;
    let json_tool = tools(body, &mut out)?;
    match body.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            out.insert("stream".into(), json!(true));
        }
        Some(_) => return Err(Invalid::new("stream", "stream must be a boolean")),
    }
    Ok(Translated {
        body: Value::Object(out),
        json_tool,
    })
}

fn max_tokens(body: &Map<String, Value>, default: u32) -> Result<u64, Invalid> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match body.get(key) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                return match v.as_u64() {
                    Some(n) if n >= 1 => Ok(n),
                    _ => Err(Invalid::new(
                        key,
                        format!("{key} must be a positive integer"),
                    )),
                }
            }
        }
    }
    Ok(u64::from(default.max(1)))
}

/// One system prompt stays a string; several become text blocks, in order.
fn system_value(mut parts: Vec<String>) -> Value {
    if parts.len() == 1 {
        return Value::String(parts.remove(0));
    }
    Value::Array(
        parts
            .into_iter()
            .map(|t| json!({"type": "text", "text": t}))
            .collect(),
    )
}

/// The texts of an OpenAI content value (a string, or parts of which only text translates).
/// Empty texts are dropped: Anthropic refuses empty text blocks.
fn texts(content: Option<&Value>, param: &str) -> Result<Vec<String>, Invalid> {
    let texts = match content {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.clone()),
                    // An earlier refusal, sent back as history: it is what the model said.
                    (Some("refusal"), _) => {
                        if let Some(r) = part.get("refusal").and_then(Value::as_str) {
                            texts.push(r.to_owned());
                        }
                    }
                    (Some(kind), _) => {
                        return Err(Invalid::new(
                            format!("{param}[{j}].type"),
                            format!("content parts of type `{kind}` are not supported: only text is translated for an Anthropic upstream"),
                        ))
                    }
                    (None, _) => {
                        return Err(Invalid::new(
                            format!("{param}[{j}]"),
                            "each content part needs a `type`",
                        ))
                    }
                }
            }
            texts
        }
        Some(_) => {
            return Err(Invalid::new(
                param,
                "content must be a string or a list of content parts",
            ))
        }
    };
    Ok(texts.into_iter().filter(|t| !t.is_empty()).collect())
}

fn text_blocks(texts: Vec<String>) -> Vec<Value> {
    texts
        .into_iter()
        .map(|t| json!({"type": "text", "text": t}))
        .collect()
}

/// A tool call id Anthropic accepts: it allows `A-Za-z0-9_-` only, while OpenAI-compatible
/// servers produce ids like `functions.get_weather:0`.
fn tool_id(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn non_empty_str<'a>(value: &'a Value, pointer: &str, param: &str) -> Result<&'a str, Invalid> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Invalid::new(
                format!("{param}{}", pointer.replace('/', ".")),
                "must be a non-empty string",
            )
        })
}

/// The system prompts and the alternating turns. Consecutive messages of one role are merged
/// (tool results and the user text after them form one user turn); a message with nothing to
/// say (empty text, no calls) is dropped, since Anthropic refuses empty content.
fn conversation(list: &[Value]) -> Result<(Vec<String>, Vec<Value>), Invalid> {
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, message) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let content = message.get("content");
        let content_param = format!("{param}.content");
        let (role, blocks) = match message.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => {
                system.extend(texts(content, &content_param)?);
                continue;
            }
            Some("user") => ("user", text_blocks(texts(content, &content_param)?)),
            Some("assistant") => ("assistant", assistant_blocks(message, &param)?),
            Some("tool") => {
                let id = non_empty_str(message, "/tool_call_id", &param)?;
                let text = texts(content, &content_param)?.join("\n");
                let mut block = json!({"type": "tool_result", "tool_use_id": tool_id(id)});
                if !text.is_empty() {
                    block["content"] = json!(text);
                }
                ("user", vec![block])
            }
            Some(other) => {
                return Err(Invalid::new(
                    format!("{param}.role"),
                    format!("role `{other}` is not supported; expected system, developer, user, assistant or tool"),
                ))
            }
            None => return Err(Invalid::new(format!("{param}.role"), "a role is required")),
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    if turns.is_empty() {
        return Err(Invalid::new(
            "messages",
            "there is no user or assistant message with content to send",
        ));
    }
    let turns = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    Ok((system, turns))
}

/// An assistant message: its text, then its tool calls as `tool_use` blocks.
fn assistant_blocks(message: &Value, param: &str) -> Result<Vec<Value>, Invalid> {
    if message.get("function_call").is_some_and(|f| !f.is_null()) {
        return Err(Invalid::new(
            format!("{param}.function_call"),
            "the legacy function_call is not supported; use tool_calls",
        ));
    }
    let mut blocks = text_blocks(texts(message.get("content"), &format!("{param}.content"))?);
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(calls)) => calls.as_slice(),
        Some(_) => {
            return Err(Invalid::new(
                format!("{param}.tool_calls"),
                "tool_calls must be a list",
            ))
        }
    };
    for (j, call) in calls.iter().enumerate() {
        let call_param = format!("{param}.tool_calls[{j}]");
        let id = non_empty_str(call, "/id", &call_param)?;
        let name = non_empty_str(call, "/function/name", &call_param)?;
        let arguments = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let input = if arguments.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str::<Value>(arguments)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| {
                    Invalid::new(
                        format!("{call_param}.function.arguments"),
                        "arguments must be a JSON object encoded as a string",
                    )
                })?
        };
        blocks.push(json!({"type": "tool_use", "id": tool_id(id), "name": name, "input": input}));
    }
    Ok(blocks)
}

fn stop(value: Option<&Value>) -> Result<Option<Value>, Invalid> {
    let list = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Invalid::new("stop", "stop must be a string or a list of strings"))?,
        Some(_) => {
            return Err(Invalid::new(
                "stop",
                "stop must be a string or a list of strings",
            ))
        }
    };
    check_stop(&list, "stop")?;
    Ok((!list.is_empty()).then(|| json!(list)))
}

fn sampling(body: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), Invalid> {
    let number = |key: &str, max: f64| -> Result<Option<f64>, Invalid> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if (0.0..=max).contains(&x) => Ok(Some(x)),
                _ => Err(Invalid::new(
                    key,
                    format!("{key} must be a number between 0 and {max}"),
                )),
            },
        }
    };
    let temperature = number("temperature", 2.0)?;
    let top_p = number("top_p", 1.0)?;
    if let Some(t) = temperature {
        out.insert("temperature".into(), json!(t.min(1.0)));
    } else if let Some(p) = top_p {
        out.insert("top_p".into(), json!(p));
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
    Ok(())
}

/// `tools`, `tool_choice`, `parallel_tool_calls` and `response_format`. Returns the name of
/// the tool standing in for `response_format`, if any.
fn tools(
    body: &Map<String, Value>,
    out: &mut Map<String, Value>,
) -> Result<Option<String>, Invalid> {
    let listed = match body.get("tools") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(tools)) => tools.as_slice(),
        Some(_) => return Err(Invalid::new("tools", "tools must be a list")),
    };
    let mut tools = Vec::with_capacity(listed.len() + 1);
    for (i, tool) in listed.iter().enumerate() {
        let param = format!("tools[{i}]");
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(Invalid::new(
                format!("{param}.type"),
                "only tools of type `function` can be sent to an Anthropic upstream",
            ));
        }
        let name = non_empty_str(tool, "/function/name", &param)?;
        let schema = match tool.pointer("/function/parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(s @ Value::Object(_)) => s.clone(),
            Some(_) => {
                return Err(Invalid::new(
                    format!("{param}.function.parameters"),
                    "parameters must be a JSON schema object",
                ))
            }
        };
        let mut t = json!({"name": name});
        if let Some(d) = tool
            .pointer("/function/description")
            .and_then(Value::as_str)
        {
            t["description"] = json!(d);
        }
        t["input_schema"] = schema;
        tools.push(t);
    }
    let user_tools = !tools.is_empty();

    let mut choice = tool_choice(body.get("tool_choice"))?;
    if !user_tools {
        // A choice among no tools says nothing; Anthropic would refuse it.
        choice = None;
    }

    let json_tool = json_tool(body.get("response_format"))?;
    if let Some((name, tool)) = &json_tool {
        if tools.iter().any(|t| t["name"] == json!(name)) {
            return Err(Invalid::new(
                "response_format.json_schema.name",
                format!("the schema name `{name}` is also the name of a tool; rename one of them"),
            ));
        }
        tools.push(tool.clone());
        let forced = json!({"type": "tool", "name": name});
        choice = match choice
            .as_ref()
            .and_then(|c| c.get("type"))
            .and_then(Value::as_str)
        {
            // Only the format: its tool is forced.
            _ if !user_tools => Some(forced),
            // The model may call one of the client's tools or answer in the format: it must
            // use some tool, and the format is one of them.
            None | Some("auto" | "any") => Some(json!({"type": "any"})),
            // No tool calls allowed: only the answer in the format remains.
            Some("none") => Some(forced),
            // A specific function was demanded; the format has no say.
            Some(_) => choice,
        };
    }

    if body.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false) && user_tools {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = json!(true);
        }
    }
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    Ok(json_tool.map(|(name, _)| name))
}

/// OpenAI's `tool_choice` as Anthropic's.
fn tool_choice(value: Option<&Value>) -> Result<Option<Value>, Invalid> {
    let refused = || {
        Invalid::new(
            "tool_choice",
            "tool_choice must be auto, required, none or a function",
        )
    };
    Ok(match value {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            _ => return Err(refused()),
        },
        Some(c @ Value::Object(_)) => {
            let name = non_empty_str(c, "/function/name", "tool_choice")?;
            Some(json!({"type": "tool", "name": name}))
        }
        Some(_) => return Err(refused()),
    })
}

/// The forced tool standing in for `response_format`, with its name.
fn json_tool(format: Option<&Value>) -> Result<Option<(String, Value)>, Invalid> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some((
            JSON_OBJECT_TOOL.to_owned(),
            json!({
                "name": JSON_OBJECT_TOOL,
                "description": "Give your answer as a JSON object.",
                "input_schema": {"type": "object"},
            }),
        ))),
        Some("json_schema") => {
            let name = non_empty_str(format, "/json_schema/name", "response_format")?;
            let schema = match format.pointer("/json_schema/schema") {
                None | Some(Value::Null) => json!({"type": "object"}),
                Some(s @ Value::Object(_)) => s.clone(),
                Some(_) => {
                    return Err(Invalid::new(
                        "response_format.json_schema.schema",
                        "schema must be a JSON schema object",
                    ))
                }
            };
            if schema.get("type").is_some_and(|t| t != "object") {
                return Err(Invalid::new(
                    "response_format.json_schema.schema",
                    "an Anthropic upstream can only be asked for a JSON object: the schema's root type must be `object`",
                ));
            }
            let description = format
                .pointer("/json_schema/description")
                .and_then(Value::as_str)
                .unwrap_or("Give your answer as a JSON object matching this schema.");
            Ok(Some((
                name.to_owned(),
                json!({"name": name, "description": description, "input_schema": schema}),
            )))
        }
        _ => Err(Invalid::new(
            "response_format.type",
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(body: Value) -> Translated {
        openai_request_to_anthropic(&body, "claude-sonnet-4-5-20250929", 4096).unwrap()
    }

    fn refused(body: Value) -> Invalid {
        openai_request_to_anthropic(&body, "claude-sonnet-4-5-20250929", 4096).unwrap_err()
    }

    fn chat(messages: Value) -> Value {
        json!({"model": "gpt-4o", "messages": messages})
    }

    #[test]
    fn system_and_developer_messages_become_the_top_level_system() {
        let t = translate(chat(json!([
            {"role": "system", "content": "You are helpful."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Bonjour"}
        ])));
        assert_eq!(
            t.body,
            json!({
                "model": "claude-sonnet-4-5-20250929",
                "max_tokens": 4096,
                "system": [{"type": "text", "text": "You are helpful."},
                           {"type": "text", "text": "Answer in French."}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Bonjour"}]}]
            })
        );
        assert_eq!(t.json_tool, None);
        let one = translate(chat(json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}
        ])));
        assert_eq!(one.body["system"], "Be brief.");
    }

    #[test]
    fn consecutive_messages_of_one_role_are_merged_and_empty_ones_dropped() {
        let t = translate(chat(json!([
            {"role": "user", "content": "First."},
            {"role": "user", "content": [{"type": "text", "text": "Second."}]},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Third."}
        ])));
        assert_eq!(
            t.body["messages"],
            json!([{"role": "user", "content": [
                {"type": "text", "text": "First."},
                {"type": "text", "text": "Second."},
                {"type": "text", "text": "Third."}
            ]}])
        );
    }

    #[test]
    fn tool_calls_and_tool_results_become_tool_use_and_tool_result_blocks() {
        let t = translate(chat(json!([
            {"role": "user", "content": "Weather in Oslo and Bergen?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
                {"id": "functions.get_weather:1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Bergen\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3°C"},
            {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": [{"type": "text", "text": "2°C"}]},
            {"role": "user", "content": "Which is warmer?"}
        ])));
        let m = t.body["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[1]["content"],
            json!([
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "functions_get_weather_1", "name": "get_weather", "input": {"city": "Bergen"}}
            ])
        );
        assert_eq!(
            m[2],
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "-3°C"},
                {"type": "tool_result", "tool_use_id": "functions_get_weather_1", "content": "2°C"},
                {"type": "text", "text": "Which is warmer?"}
            ]})
        );
    }

    #[test]
    fn unparsable_tool_arguments_are_refused() {
        let e = refused(chat(json!([
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
            ]}
        ])));
        assert_eq!(e.param, "messages[1].tool_calls[0].function.arguments");
    }

    #[test]
    fn limits_stops_and_sampling_translate_with_temperature_clamped() {
        let mut body = chat(json!([{"role": "user", "content": "Hi"}]));
        body["max_completion_tokens"] = json!(300);
        body["max_tokens"] = json!(100);
        body["stop"] = json!("END");
        body["temperature"] = json!(1.6);
        body["top_p"] = json!(0.9);
        body["stream"] = json!(true);
        body["seed"] = json!(7);
        let b = translate(body).body;
        assert_eq!(b["max_tokens"], 300);
        assert_eq!(b["stop_sequences"], json!(["END"]));
        assert_eq!(b["temperature"], 1.0);
        assert!(
            b.get("top_p").is_none(),
            "top_p is dropped beside temperature"
        );
        assert_eq!(b["stream"], true);
        assert!(b.get("seed").is_none());
        let mut body = chat(json!([{"role": "user", "content": "Hi"}]));
        body["top_p"] = json!(0.5);
        body["max_tokens"] = json!(64);
        let b = translate(body).body;
        assert_eq!(b["top_p"], 0.5);
        assert_eq!(b["max_tokens"], 64);
    }

    #[test]
    fn tools_and_tool_choices_translate() {
        let mut body = chat(json!([{"role": "user", "content": "Hi"}]));
        body["tools"] = json!([{"type": "function", "function": {
            "name": "lookup", "description": "Find a record",
            "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}}}}]);
        let b = translate(body.clone()).body;
        assert_eq!(
            b["tools"],
            json!([{"name": "lookup", "description": "Find a record",
                    "input_schema": {"type": "object", "properties": {"id": {"type": "integer"}}}}])
        );
        assert!(b.get("tool_choice").is_none());
        for (choice, expected) in [
            (json!("auto"), json!({"type": "auto"})),
            (json!("required"), json!({"type": "any"})),
            (json!("none"), json!({"type": "none"})),
            (
                json!({"type": "function", "function": {"name": "lookup"}}),
                json!({"type": "tool", "name": "lookup"}),
            ),
        ] {
            body["tool_choice"] = choice;
            assert_eq!(translate(body.clone()).body["tool_choice"], expected);
        }
        body["tool_choice"] = json!("required");
        body["parallel_tool_calls"] = json!(false);
        assert_eq!(
            translate(body).body["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn a_structured_output_request_becomes_a_forced_tool() {
        let mut body = chat(json!([{"role": "user", "content": "Extract: Ada, 36"}]));
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"},
            "age": {"type": "integer"}}, "required": ["name", "age"], "additionalProperties": false});
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "person", "strict": true, "schema": schema}});
        let t = translate(body.clone());
        assert_eq!(t.json_tool.as_deref(), Some("person"));
        assert_eq!(t.body["tools"][0]["name"], "person");
        assert_eq!(t.body["tools"][0]["input_schema"], schema);
        assert_eq!(
            t.body["tool_choice"],
            json!({"type": "tool", "name": "person"})
        );

        // Beside the client's own tools, the model must call one of them or answer in format.
        body["tools"] = json!([{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]);
        let t = translate(body.clone());
        assert_eq!(t.body["tools"].as_array().map(Vec::len), Some(2));
        assert_eq!(t.body["tool_choice"], json!({"type": "any"}));
        body["tool_choice"] = json!("none");
        assert_eq!(
            translate(body).body["tool_choice"],
            json!({"type": "tool", "name": "person"})
        );

        let mut body = chat(json!([{"role": "user", "content": "JSON please"}]));
        body["response_format"] = json!({"type": "json_object"});
        let t = translate(body);
        assert_eq!(t.json_tool.as_deref(), Some("json_object"));
        assert_eq!(
            t.body["tools"][0]["input_schema"],
            json!({"type": "object"})
        );
    }

    #[test]
    fn a_structured_output_that_is_not_an_object_or_clashes_with_a_tool_is_refused() {
        let mut body = chat(json!([{"role": "user", "content": "x"}]));
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "list", "schema": {"type": "array"}}});
        assert_eq!(
            refused(body.clone()).param,
            "response_format.json_schema.schema"
        );
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "search", "schema": {"type": "object"}}});
        body["tools"] = json!([{"type": "function", "function": {"name": "search"}}]);
        assert_eq!(refused(body).param, "response_format.json_schema.name");
    }

    #[test]
    fn what_anthropic_cannot_do_is_refused_naming_the_field() {
        let base = chat(json!([{"role": "user", "content": "x"}]));
        let mut n = base.clone();
        n["n"] = json!(2);
        assert_eq!(refused(n).param, "n");
        let mut lp = base.clone();
        lp["logprobs"] = json!(true);
        assert_eq!(refused(lp).param, "logprobs");
        let mut hot = base.clone();
        hot["temperature"] = json!(3);
        assert_eq!(refused(hot).param, "temperature");
        let mut zero = base.clone();
        zero["max_tokens"] = json!(0);
        assert_eq!(refused(zero).param, "max_tokens");
        let image = chat(json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
        ]}]));
        assert_eq!(refused(image).param, "messages[0].content[0].type");
        assert_eq!(refused(chat(json!([]))).param, "messages");
        let only_system = chat(json!([{"role": "system", "content": "x"}]));
        assert_eq!(refused(only_system).param, "messages");
        assert_eq!(
            refused(chat(
                json!([{"role": "function", "name": "f", "content": "x"}])
            ))
            .param,
            "messages[0].role"
        );
        let mut web = base;
        web["tools"] = json!([{"type": "web_search"}]);
        assert_eq!(refused(web).param, "tools[0].type");
    }
}
