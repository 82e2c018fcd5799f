//! Parse, don't validate: an OpenAI request body becomes the shared [`Valid`] request, every
//! field checked, with the offending field named.

use serde_json::Value;

use super::error::ApiError;
use super::types::{ChatCompletionRequest, CommonParams, CompletionRequest};
use crate::api::body::JsonBody;
use crate::api::request::{check_stop, Input, Valid};
use crate::api::{structured, tools};
use crate::engine::{ChatMessage, Drafts, Role, SamplingOverrides};

pub(super) fn model_name(model: Option<String>) -> Result<String, ApiError> {
    match model {
        Some(m) if !m.trim().is_empty() => Ok(m),
        _ => Err(ApiError::invalid(
            "model",
            "you must provide a model parameter",
        )),
    }
}

fn role(name: &str, index: usize) -> Result<Role, ApiError> {
    match name {
        "system" | "developer" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        other => Err(ApiError::invalid(
            format!("messages[{index}].role"),
            format!("unknown role `{other}`; expected system, developer, user, assistant or tool"),
        )),
    }
}

/// A message's content: a string, or a list of `{"type": "text", "text": ...}` parts.
fn content(value: &Value, role: Role, index: usize) -> Result<String, ApiError> {
    let param = || format!("messages[{index}].content");
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Null if role == Role::Assistant => Ok(String::new()),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    (Some("text"), _) => {
                        return Err(ApiError::invalid(format!("{}[{j}].text", param()), "a text part needs a string `text`"))
                    }
                    (Some(kind), _) => {
                        return Err(ApiError::invalid(
                            format!("{}[{j}].type", param()),
                            format!("content parts of type `{kind}` are not supported: this server accepts text only"),
                        ))
                    }
                    (None, _) => {
                        return Err(ApiError::invalid(format!("{}[{j}]", param()), "each content part needs a `type`"))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(ApiError::invalid(
            param(),
            "content must be a string or a list of text parts",
        )),
    }
}

fn stop_list(value: &Value) -> Result<Option<Vec<String>>, ApiError> {
    let list = match value {
        Value::Null => return Ok(None),
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid("stop", "stop must be a string or a list of strings")
            })?,
        _ => {
            return Err(ApiError::invalid(
                "stop",
                "stop must be a string or a list of strings",
            ))
        }
    };
    check_stop(&list, "stop")?;
    Ok(Some(list))
}

/// The checked shared fields.
struct Common {
    sampling: SamplingOverrides,
    max_tokens: Option<u32>,
    stop: Option<Vec<String>>,
    ignore_eos: bool,
    cache_prompt: bool,
    speculate: Drafts,
}

fn common(c: CommonParams) -> Result<Common, ApiError> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("only n=1 is supported, got {n}"),
            ));
        }
    }
    let sampling = SamplingOverrides {
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        min_p: c.min_p,
        repeat_penalty: c.repeat_penalty,
        repeat_last_n: None,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        seed: c.seed,
    };
    sampling.validate()?;
    let most = crate::engine::MAX_SPECULATE;
    for (param, n) in [
        ("speculative.n_max", c.speculative_n_max),
        ("speculative.n_min", c.speculative_n_min),
    ] {
        if let Some(n) = n.filter(|&n| n > most) {
            return Err(ApiError::invalid(
                param,
                format!("{param} must be at most {most}, got {n}"),
            ));
        }
    }
    let speculate = Drafts {
        most: c.speculative_n_max,
        least: c.speculative_n_min.unwrap_or(0),
    };
    if let Some(n) = speculate.most.filter(|&n| n < speculate.least) {
        return Err(ApiError::invalid(
            "speculative.n_min",
            format!(
                "speculative.n_min ({}) must not be over speculative.n_max ({n})",
                speculate.least
            ),
        ));
    }
    Ok(Common {
        sampling,
        max_tokens: c.max_tokens,
        stop: stop_list(&c.stop)?,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        cache_prompt: c.cache_prompt.unwrap_or(true),
        speculate,
    })
}

fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::invalid(param, format!("{what} is not supported by this server yet"))
}

/// `response_format`: `text` (or none), `json_object`, or `json_schema` with its schema; the
/// grammar that constrains the answer.
fn response_format(format: &Value) -> Result<Option<String>, ApiError> {
    if format.is_null() {
        return Ok(None);
    }
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            "response_format.type",
            "response_format must be an object with a `type`",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(structured::json_object()?)),
        "json_schema" => {
            let spec = format
                .get("json_schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema",
                        "response_format of type json_schema needs a `json_schema` object",
                    )
                })?;
            if let Some(name) = spec.get("name") {
                let ok = name.as_str().is_some_and(|n| {
                    (1..=64).contains(&n.len())
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                });
                if !ok {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.name",
                        "the name must be 1 to 64 letters, digits, underscores or dashes",
                    ));
                }
            }
            match spec.get("schema") {
                None | Some(Value::Null) => Ok(Some(structured::json_object()?)),
                Some(schema) => Ok(Some(structured::json_schema(
                    schema,
                    "response_format.json_schema.schema",
                )?)),
            }
        }
        other => Err(ApiError::invalid(
            "response_format.type",
            format!("`{other}` is not one of text, json_object, json_schema"),
        )),
    }
}

/// Checks a `/v1/chat/completions` body.
pub(crate) fn chat(body: &JsonBody) -> Result<Valid, ApiError> {
    let req: ChatCompletionRequest = body.typed()?;
    let common = common(body.typed()?)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must contain at least one message",
        ));
    }
    if req.logprobs == Some(true) {
        return Err(unsupported("logprobs", "logprobs"));
    }
    let grammar = response_format(&req.response_format)?;
    let toolbox = tools::parse(&req.tools, &req.tool_choice)?;
    let messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = role(&m.role, i)?;
            let mut text = content(&m.content, role, i)?;
            if role == Role::Assistant {
                let calls =
                    tools::calls_of_message(&m.tool_calls, &format!("messages[{i}].tool_calls"))?;
                text = tools::render_calls(&text, &calls);
            }
            Ok(ChatMessage {
                role,
                content: text,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let mut grammar = grammar;
    if let Some(toolbox) = &toolbox {
        if let Some(g) = toolbox.grammar()? {
            if grammar.is_some() {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "a forced tool call cannot be combined with response_format",
                ));
            }
            grammar = Some(g);
        }
    }
    let mut grammar_trigger = None;
    if let Some((lazy, trigger)) = toolbox.as_ref().and_then(tools::Toolbox::lazy_grammar) {
        // A response_format grammar governs the whole answer; it wins over tool calls.
        if grammar.is_none() {
            grammar = Some(lazy);
            grammar_trigger = Some(trigger);
        }
    }
    Ok(Valid {
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        sampling: common.sampling,
        max_tokens: req.max_completion_tokens.or(common.max_tokens),
        stop: common.stop,
        ignore_eos: common.ignore_eos,
        cache_prompt: common.cache_prompt,
        speculate: common.speculate,
        grammar,
        grammar_trigger,
        tools: toolbox,
        ..Valid::new(model_name(req.model)?, Input::Chat(messages))
    })
}

/// Checks a `/v1/completions` body.
pub(crate) fn completion(body: &JsonBody) -> Result<Valid, ApiError> {
    let req: CompletionRequest = body.typed()?;
    let common = common(body.typed()?)?;
    let prompt = match &req.prompt {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_owned()
        }
        Value::Array(items) if items.len() > 1 && items.iter().all(Value::is_string) => {
            return Err(ApiError::invalid(
                "prompt",
                "one prompt per request is supported; send several requests",
            ))
        }
        _ => return Err(ApiError::invalid("prompt", "prompt must be a string")),
    };
    if req.echo == Some(true) {
        return Err(unsupported("echo", "echo"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "suffix (fill-in-the-middle)"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(unsupported("best_of", "best_of other than 1"));
    }
    if !req.logprobs.is_null() {
        return Err(unsupported("logprobs", "logprobs"));
    }
    Ok(Valid {
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        sampling: common.sampling,
        max_tokens: common.max_tokens,
        stop: common.stop,
        ignore_eos: common.ignore_eos,
        cache_prompt: common.cache_prompt,
        speculate: common.speculate,
        ..Valid::new(model_name(req.model)?, Input::Text(prompt))
    })
}
