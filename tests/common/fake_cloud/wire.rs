//! What each provider says, in its own shapes: answers (whole and as SSE frames), errors,
//! listings. Pure functions of the request, so answers are the same every run.

use axum::body::Bytes;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// `created` in every answer: a fixed instant keeps answers byte-for-byte reproducible.
pub const CREATED: u64 = 1_700_000_000;

/// What an answer depends on.
pub(super) struct Asked<'a> {
    /// The request's number (from 1): ids are made of it.
    pub n: u64,
    /// The request body as JSON.
    pub body: &'a Value,
    /// The request headers (keys, `anthropic-version`).
    pub headers: &'a HeaderMap,
    /// The key the caller must send, if any.
    pub key: Option<&'a str>,
    /// How many pieces the answer is cut into.
    pub chunks: usize,
}

/// Which provider's shapes an answer takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
    OpenAi,
    Anthropic,
}

impl Api {
    pub(super) fn of(uri: &Uri, headers: &HeaderMap) -> Api {
        if uri.path() == "/v1/messages" || headers.contains_key("anthropic-version") {
            Api::Anthropic
        } else {
            Api::OpenAi
        }
    }
}

/// What a request gets back, before the mode decides how it travels.
pub(super) enum Reply {
    /// A finished response (errors, listings): sent as is.
    Done(Response),
    Json(Value),
    /// SSE frames: the opening ones, the text deltas (the "chunks" modes count), the closing ones.
    Events {
        open: Vec<Bytes>,
        pieces: Vec<Bytes>,
        close: Vec<Bytes>,
    },
}

pub(super) fn garbage(stream: bool) -> Response {
    let (ctype, body) = if stream {
        (
            "text/event-stream",
            "garbage: this is not an event stream\n\ndata: {\"choices\": [oops\n\n",
        )
    } else {
        (
            "application/json",
            "<html><body><h1>502 Bad Gateway</h1></body></html>\n",
        )
    };
    ([(header::CONTENT_TYPE, ctype)], body).into_response()
}

/// `status` with a body in the provider's error shape; `message` overrides the stock one.
pub(super) fn error(api: Api, status: u16, message: Option<&str>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match api {
        Api::OpenAi => {
            let (kind, code, stock) = match status {
                401 => (
                    "invalid_request_error",
                    json!("invalid_api_key"),
                    "Incorrect API key provided.",
                ),
                404 => (
                    "invalid_request_error",
                    json!("model_not_found"),
                    "The model does not exist.",
                ),
                429 => (
                    "requests",
                    json!("rate_limit_exceeded"),
                    "Rate limit reached for requests.",
                ),
                503 | 529 => (
                    "server_error",
                    Value::Null,
                    "The engine is currently overloaded, please try again later.",
                ),
                s if s >= 500 => (
                    "server_error",
                    Value::Null,
                    "The server had an error while processing your request. Sorry about that!",
                ),
                _ => (
                    "invalid_request_error",
                    Value::Null,
                    "Bad request (fake cloud).",
                ),
            };
            let message = message.unwrap_or(stock);
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        }
        Api::Anthropic => {
            let (kind, stock) = match status {
                401 => ("authentication_error", "invalid x-api-key"),
                403 => (
                    "permission_error",
                    "Your API key does not have permission to use the specified resource.",
                ),
                404 => (
                    "not_found_error",
                    "The requested resource could not be found.",
                ),
                413 => (
                    "request_too_large",
                    "Request exceeds the maximum allowed number of bytes.",
                ),
                429 => (
                    "rate_limit_error",
                    "Number of request tokens has exceeded your per-minute rate limit.",
                ),
                529 => ("overloaded_error", "Overloaded"),
                s if s >= 500 => ("api_error", "Internal server error"),
                _ => ("invalid_request_error", "Bad request (fake cloud)."),
            };
            let message = message.unwrap_or(stock);
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    };
    let mut r = (code, axum::Json(body)).into_response();
    if matches!(status, 429 | 503 | 529) {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

/// `data: JSON` as an OpenAI SSE frame.
pub(super) fn data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// `event: NAME` + `data: JSON`, as Anthropic frames them.
pub(super) fn event(v: &Value) -> Bytes {
    let name = v["type"].as_str().unwrap_or("message");
    Bytes::from(format!("event: {name}\ndata: {v}\n\n"))
}

/// The text of a message's content: a string, or the text of its parts (and of the content
/// nested in them, as in a `tool_result`).
pub(super) fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("text") {
                Some(Value::String(t)) => t.clone(),
                _ => p.get("content").map(text_of).unwrap_or_default(),
            })
            .collect(),
        _ => String::new(),
    }
}

/// `cloud says: <the last user message>`.
pub(super) fn answer_text(messages: &[Value]) -> String {
    let last = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| text_of(&m["content"]))
        .unwrap_or_default();
    format!("cloud says: {last}")
}

/// One input token per whitespace-separated word of the system prompt and the messages.
pub(super) fn input_tokens(system: &Value, messages: &[Value]) -> usize {
    let words = |s: String| s.split_whitespace().count();
    words(text_of(system))
        + messages
            .iter()
            .map(|m| words(text_of(&m["content"])))
            .sum::<usize>()
}

/// `text` cut into `n` pieces of nearly equal length (fewer if it is shorter).
pub(super) fn split(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let n = n.clamp(1, chars.len().max(1));
    (0..n)
        .map(|i| {
            chars[i * chars.len() / n..(i + 1) * chars.len() / n]
                .iter()
                .collect()
        })
        .collect()
}

/// A value that satisfies a JSON schema: enums take their first value, required string
/// properties "x", numbers 1, booleans true, objects recursively.
pub fn example_of(schema: &Value) -> Value {
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema[key].as_array().and_then(|e| e.first()) {
            return example_of(first);
        }
    }
    let ty = match &schema["type"] {
        Value::String(t) => t.as_str(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match ty {
        "object" => {
            let mut out = serde_json::Map::new();
            for name in schema["required"].as_array().into_iter().flatten() {
                if let Some(name) = name.as_str() {
                    out.insert(name.to_owned(), example_of(&schema["properties"][name]));
                }
            }
            Value::Object(out)
        }
        "array" => {
            let n = schema["minItems"].as_u64().unwrap_or(0) as usize;
            Value::Array(vec![example_of(&schema["items"]); n])
        }
        "integer" | "number" => json!(1),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ => json!("x"),
    }
}

/// The forced tool's name and schema: `tool_choice` naming one (OpenAI `function`, Anthropic
/// `tool`), or asking for any (`required` / `any`: the first tool).
pub(super) fn forced_tool(body: &Value, api: Api) -> Option<(String, Value)> {
    let tools = body["tools"].as_array()?;
    let choice = &body["tool_choice"];
    let wanted = match (api, choice["type"].as_str(), choice.as_str()) {
        (Api::OpenAi, Some("function"), _) => Some(choice["function"]["name"].as_str()?),
        (Api::Anthropic, Some("tool"), _) => Some(choice["name"].as_str()?),
        (Api::OpenAi, _, Some("required")) | (Api::Anthropic, Some("any"), _) => None,
        _ => return None,
    };
    let (name, schema) = tools
        .iter()
        .map(|t| match api {
            Api::OpenAi => (&t["function"]["name"], &t["function"]["parameters"]),
            Api::Anthropic => (&t["name"], &t["input_schema"]),
        })
        .find(|(name, _)| wanted.is_none_or(|w| name.as_str() == Some(w)))?;
    Some((name.as_str()?.to_owned(), example_of(schema)))
}

/// The 401 for a request without the OpenAI key as a bearer token, when one is set.
pub(super) fn openai_rejection(a: &Asked) -> Option<Response> {
    let key = a.key?;
    let sent = a
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if sent == Some(format!("Bearer {key}").as_str()) {
        return None;
    }
    let msg = match sent {
        None => "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        Some(_) => "Incorrect API key provided.",
    };
    Some(error(Api::OpenAi, 401, Some(msg)))
}

pub(super) fn openai_reply(a: &Asked) -> Reply {
    if let Some(r) = openai_rejection(a) {
        return Reply::Done(r);
    }
    let body = a.body;
    let Some(model) = body["model"].as_str() else {
        return Reply::Done(error(
            Api::OpenAi,
            400,
            Some("you must provide a model parameter"),
        ));
    };
    let Some(messages) = body["messages"].as_array() else {
        return Reply::Done(error(
            Api::OpenAi,
            400,
            Some("'messages' is a required property"),
        ));
    };
    let id = format!("chatcmpl-fake-{}", a.n);
    let tool = forced_tool(body, Api::OpenAi);
    let text = match &tool {
        Some((_, input)) => input.to_string(),
        None => answer_text(messages),
    };
    let pieces = split(&text, a.chunks);
    let prompt_tokens = input_tokens(&Value::Null, messages);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": pieces.len(),
        "total_tokens": prompt_tokens + pieces.len(),
    });
    let finish = if tool.is_some() { "tool_calls" } else { "stop" };
    let call_id = format!("call_fake_{}", a.n);
    if body["stream"] != true {
        let message = match &tool {
            Some((name, _)) => json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}
            ]}),
            None => json!({"role": "assistant", "content": text, "refusal": null}),
        };
        return Reply::Json(json!({
            "id": id, "object": "chat.completion", "created": CREATED, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        }));
    }
    let with_usage = body["stream_options"]["include_usage"] == true;
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if with_usage {
            c["usage"] = Value::Null;
        }
        data(&c)
    };
    let first = match &tool {
        Some((name, _)) => json!({"role": "assistant", "content": null, "tool_calls": [
            {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        ]}),
        None => json!({"role": "assistant", "content": ""}),
    };
    let pieces = pieces
        .iter()
        .map(|p| match &tool {
            Some(_) => chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}),
                Value::Null,
            ),
            None => chunk(json!({"content": p}), Value::Null),
        })
        .collect();
    let mut close = vec![chunk(json!({}), json!(finish))];
    if with_usage {
        close.push(data(&json!({
            "id": id, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "choices": [], "usage": usage,
        })));
    }
    close.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Reply::Events {
        open: vec![chunk(first, Value::Null)],
        pieces,
        close,
    }
}

/// The 401 or 400 for a request without `x-api-key` (the configured one, if any) or without
/// `anthropic-version`.
pub(super) fn anthropic_rejection(a: &Asked) -> Option<Response> {
    let sent = a.headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let (status, msg) = match (sent, a.key) {
        (None, _) => (401, Some("x-api-key header is required")),
        (Some(s), Some(k)) if s != k => (401, None),
        _ if !a.headers.contains_key("anthropic-version") => {
            (400, Some("anthropic-version: header is required"))
        }
        _ => return None,
    };
    Some(error(Api::Anthropic, status, msg))
}

pub(super) fn anthropic_reply(a: &Asked) -> Reply {
    if let Some(r) = anthropic_rejection(a) {
        return Reply::Done(r);
    }
    let body = a.body;
    let bad = |msg: &str| Reply::Done(error(Api::Anthropic, 400, Some(msg)));
    let Some(model) = body["model"].as_str() else {
        return bad("model: Field required");
    };
    let Some(messages) = body["messages"].as_array() else {
        return bad("messages: Field required");
    };
    if !body["max_tokens"].is_u64() {
        return bad("max_tokens: Field required");
    }
    let id = format!("msg_fake_{}", a.n);
    let tool = forced_tool(body, Api::Anthropic);
    let input_tokens = input_tokens(&body["system"], messages);
    let (text, stop_reason) = match &tool {
        Some((_, input)) => (input.to_string(), "tool_use"),
        None => (answer_text(messages), "end_turn"),
    };
    let pieces = split(&text, a.chunks);
    let tool_id = format!("toolu_fake_{}", a.n);
    if body["stream"] != true {
        let block = match &tool {
            Some((name, input)) => {
                json!({"type": "tool_use", "id": tool_id, "name": name, "input": input})
            }
            None => json!({"type": "text", "text": text}),
        };
        return Reply::Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [block], "stop_reason": stop_reason, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": pieces.len()},
        }));
    }
    let start_block = match &tool {
        Some((name, _)) => json!({"type": "tool_use", "id": tool_id, "name": name, "input": {}}),
        None => json!({"type": "text", "text": ""}),
    };
    let open = vec![
        event(&json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }})),
        event(&json!({"type": "content_block_start", "index": 0, "content_block": start_block})),
        event(&json!({"type": "ping"})),
    ];
    let pieces = pieces
        .iter()
        .map(|p| {
            let delta = match &tool {
                Some(_) => json!({"type": "input_json_delta", "partial_json": p}),
                None => json!({"type": "text_delta", "text": p}),
            };
            event(&json!({"type": "content_block_delta", "index": 0, "delta": delta}))
        })
        .collect::<Vec<_>>();
    let close = vec![
        event(&json!({"type": "content_block_stop", "index": 0})),
        event(&json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": pieces.len()}})),
        event(&json!({"type": "message_stop"})),
    ];
    Reply::Events {
        open,
        pieces,
        close,
    }
}

/// `GET /v1/models`, in Anthropic's shape when `anthropic-version` is sent.
pub(super) fn listing(api: Api) -> Value {
    let ids = ["gpt-4o-mini", "claude-3-5-haiku-20241022"];
    match api {
        Api::OpenAi => json!({"object": "list", "data": ids.map(|id| json!(
            {"id": id, "object": "model", "created": CREATED, "owned_by": "fake-cloud"}))}),
        Api::Anthropic => json!({"data": ids.map(|id| json!(
            {"type": "model", "id": id, "display_name": id, "created_at": "2024-10-22T00:00:00Z"})),
            "has_more": false, "first_id": ids[0], "last_id": ids[1]}),
    }
}
