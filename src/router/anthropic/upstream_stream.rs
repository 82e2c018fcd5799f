//! An Anthropic upstream's event stream as OpenAI `chat.completion.chunk` values: a role
//! chunk, content and tool-call deltas, the finish chunk, and (when asked) a usage chunk.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::{completion_id, finish_reason, Malformed, StreamFailure, Tokens};
use crate::router::sse::SseEvent;

/// What an Anthropic content block turns into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Text: content deltas.
    Text,
    /// A tool call, at this index of OpenAI's `tool_calls`.
    Tool(u64),
    /// The forced tool standing in for `response_format`: its input is the answer text.
    Structured,
    /// Thinking, or a block type added later: not passed on.
    Skipped,
}

/// Turns Anthropic stream events into OpenAI chunks.
///
/// Nothing is emitted until the first content (the role chunk goes out with it), so while
/// [`emitted_content`](Self::emitted_content) is false the router can fail over to another
/// backend as if this stream had never started.
///
/// The chunks are those of an OpenAI stream asked for `stream_options.include_usage` (a null
/// `usage` on each, and a closing chunk with the counts): the router needs the counts for
/// every answer and drops them again for a client that did not ask.
#[derive(Debug, Clone)]
pub(crate) struct AnthropicToOpenAi {
    /// The model name to report: the one the client asked for.
    model: String,
    /// `created` of every chunk (Unix seconds).
    created: i64,
    /// See [`Translated::json_tool`](super::upstream_request::Translated::json_tool).
    json_tool: Option<String>,
    /// The chunk id, from `message_start`.
    id: Option<String>,
    /// Blocks by Anthropic index.
    blocks: HashMap<u64, Block>,
    /// Tool calls started so far (the next call's OpenAI index).
    calls: u64,
    /// The structured-output tool was used.
    structured: bool,
    /// The role chunk went out (and so something reached, or is about to reach, the client).
    role_sent: bool,
    /// The finish reason, from `message_delta`.
    finish: Option<&'static str>,
    /// Token counts so far (`message_start`, then the totals in `message_delta`).
    tokens: Tokens,
    /// `message_stop` arrived: the answer is complete.
    done: bool,
}

impl AnthropicToOpenAi {
    /// A translator for one answer. `json_tool` comes from the translated request.
    pub(crate) fn new(model: impl Into<String>, created: i64, json_tool: Option<String>) -> Self {
        Self {
            model: model.into(),
            created,
            json_tool,
            id: None,
            blocks: HashMap::new(),
            calls: 0,
            structured: false,
            role_sent: false,
            finish: None,
            tokens: Tokens::default(),
            done: false,
        }
    }

    /// Whether any chunk has been produced. Until then a failure can still fail over.
    pub(crate) fn emitted_content(&self) -> bool {
        self.role_sent
    }

    /// Whether `message_stop` arrived: the answer is complete and `[DONE]` may follow.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Translates one event as the SSE parser gave it (its name, and its data as JSON text).
    pub(crate) fn push_sse(&mut self, event: &SseEvent) -> Result<Vec<Value>, StreamFailure> {
        let data: Value = serde_json::from_str(&event.data)
            .map_err(|e| StreamFailure::malformed(format!("an event's data is not JSON: {e}")))?;
        let name = match event.event.as_deref() {
            Some(name) => name,
            None => data.get("type").and_then(Value::as_str).unwrap_or_default(),
        };
        let name = name.to_owned();
        self.push(&name, &data)
    }

    /// Translates one event. `ping` and event types this code does not know are ignored (the
    /// API may add new ones); an `error` event is [`StreamFailure::Reported`]; events out of
    /// the promised order are malformed. Events after `message_stop` are ignored.
    pub(crate) fn push(&mut self, event: &str, data: &Value) -> Result<Vec<Value>, StreamFailure> {
        let mut out = Vec::new();
        if self.done {
            return Ok(out);
        }
        match event {
            "error" => {
                let field = |key: &str, default: &str| {
                    data.pointer(&format!("/error/{key}"))
                        .and_then(Value::as_str)
                        .unwrap_or(default)
                        .to_owned()
                };
                return Err(StreamFailure::Reported {
                    kind: field("type", "api_error"),
                    message: field("message", "the upstream reported an error"),
                });
            }
            "message_start" => {
                let id = data
                    .pointer("/message/id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        StreamFailure::malformed("message_start without a message id")
                    })?;
                self.id = Some(completion_id(id));
                if let Some(usage) = data.pointer("/message/usage") {
                    self.tokens.update(usage);
                }
                return Ok(out);
            }
            "ping" => return Ok(out),
            _ => {}
        }
        let known = matches!(
            event,
            "content_block_start"
                | "content_block_delta"
                | "content_block_stop"
                | "message_delta"
                | "message_stop"
        );
        if known && self.id.is_none() {
            return Err(StreamFailure::malformed(format!(
                "{event} before message_start"
            )));
        }
        match event {
            "content_block_start" => self.block_start(data, &mut out)?,
            "content_block_delta" => self.block_delta(data, &mut out)?,
            "message_delta" => {
                let stop = data
                    .pointer("/delta/stop_reason")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        StreamFailure::malformed("message_delta without a stop_reason")
                    })?;
                if let Some(usage) = data.get("usage") {
                    self.tokens.update(usage);
                }
                let only_structured = self.structured && self.calls == 0;
                let finish = match stop {
                    "tool_use" if only_structured => "stop",
                    _ => finish_reason(stop),
                };
                self.finish = Some(finish);
                let chunk = self.chunk(json!({}), Some(finish));
                self.emit(chunk, &mut out);
            }
            "message_stop" => {
                if self.finish.is_none() {
                    return Err(StreamFailure::malformed(
                        "message_stop without a message_delta giving the stop reason",
                    ));
                }
                self.done = true;
                let mut chunk = self.chunk(Value::Null, None);
                chunk["choices"] = json!([]);
                chunk["usage"] = self.tokens.openai();
                out.push(chunk);
            }
            // content_block_stop needs nothing; unknown events are ignored.
            _ => {}
        }
        Ok(out)
    }

    /// The stream ended (the connection closed). Before `message_stop` that is a broken
    /// reply: the answer may be cut anywhere, so it is not passed off as complete.
    pub(crate) fn finish(&self) -> Result<(), StreamFailure> {
        if self.done {
            Ok(())
        } else {
            Err(Malformed::new("the stream ended before message_stop").into())
        }
    }

    fn index(data: &Value) -> Result<u64, StreamFailure> {
        data.get("index")
            .and_then(Value::as_u64)
            .ok_or_else(|| StreamFailure::malformed("a content block event without an index"))
    }

    fn block_start(&mut self, data: &Value, out: &mut Vec<Value>) -> Result<(), StreamFailure> {
        let index = Self::index(data)?;
        let block = data
            .get("content_block")
            .ok_or_else(|| StreamFailure::malformed("content_block_start without a block"))?;
        let kind = match block.get("type").and_then(Value::as_str) {
            Some("text") => Block::Text,
            Some("tool_use") => {
                let (Some(id), Some(name)) = (
                    block.get("id").and_then(Value::as_str),
                    block.get("name").and_then(Value::as_str),
                ) else {
                    return Err(StreamFailure::malformed(
                        "a tool_use block without id and name",
                    ));
                };
                if self.json_tool.as_deref() == Some(name) {
                    self.structured = true;
                    Block::Structured
                } else {
                    let call = self.calls;
                    self.calls += 1;
                    let chunk = self.chunk(
                        json!({"tool_calls": [{"index": call, "id": id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}),
                        None,
                    );
                    self.emit(chunk, out);
                    Block::Tool(call)
                }
            }
            _ => Block::Skipped,
        };
        self.blocks.insert(index, kind);
        // A text block may start with text of its own (usually empty).
        if kind == Block::Text {
            if let Some(text) = block
                .get("text")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                let chunk = self.chunk(json!({"content": text}), None);
                self.emit(chunk, out);
            }
        }
        Ok(())
    }

    fn block_delta(&mut self, data: &Value, out: &mut Vec<Value>) -> Result<(), StreamFailure> {
        let index = Self::index(data)?;
        let block = *self.blocks.get(&index).ok_or_else(|| {
            StreamFailure::malformed(format!("a delta for block {index}, which never started"))
        })?;
        let delta = data.get("delta");
        let kind = delta.and_then(|d| d.get("type")).and_then(Value::as_str);
        let field = |key: &str| {
            delta
                .and_then(|d| d.get(key))
                .and_then(Value::as_str)
                .ok_or_else(|| StreamFailure::malformed(format!("a delta without `{key}`")))
        };
        let chunk = match (block, kind) {
            (Block::Text, Some("text_delta")) => Some(json!({"content": field("text")?})),
            (Block::Tool(call), Some("input_json_delta")) => {
                let fragment = field("partial_json")?;
                (!fragment.is_empty()).then(|| {
                    json!({"tool_calls": [{"index": call, "function": {"arguments": fragment}}]})
                })
            }
            (Block::Structured, Some("input_json_delta")) => {
                let fragment = field("partial_json")?;
                (!fragment.is_empty()).then(|| json!({"content": fragment}))
            }
            (Block::Text, Some("input_json_delta"))
            | (Block::Tool(_) | Block::Structured, Some("text_delta")) => {
                return Err(StreamFailure::malformed(format!(
                    "a delta that does not fit block {index}"
                )))
            }
            // Citations, thinking and signatures: nothing an OpenAI client can take.
            _ => None,
        };
        if let Some(delta) = chunk {
            let chunk = self.chunk(delta, None);
            self.emit(chunk, out);
        }
        Ok(())
    }

    /// Queues a chunk, preceded by the role chunk if it is the first.
    fn emit(&mut self, chunk: Value, out: &mut Vec<Value>) {
        if !self.role_sent {
            self.role_sent = true;
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
        }
        out.push(chunk);
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        chunk["usage"] = Value::Null;
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::sse::SseParser;

    /// A real-shaped Anthropic text stream, as the wire carries it.
    const TEXT_STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5-20250929\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    fn run(t: &mut AnthropicToOpenAi, wire: &str) -> Result<Vec<Value>, StreamFailure> {
        let mut out = Vec::new();
        for event in SseParser::new().push(wire.as_bytes())? {
            out.extend(t.push_sse(&event)?);
        }
        Ok(out)
    }

    fn ev(name: &str, data: Value) -> (String, Value) {
        (name.to_owned(), data)
    }

    /// The chunks the events become, but for the closing usage chunk (no choices; see the
    /// first test).
    fn feed(t: &mut AnthropicToOpenAi, events: &[(String, Value)]) -> Vec<Value> {
        let mut out = Vec::new();
        for (name, data) in events {
            out.extend(t.push(name, data).unwrap());
        }
        out.retain(|c| c["choices"] != json!([]));
        out
    }

    fn start() -> (String, Value) {
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_014p7gG3wDgGV9EUtLvnow3U",
                "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 472, "output_tokens": 2}}}),
        )
    }

    fn tool_start(index: u64, id: &str, name: &str) -> (String, Value) {
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                   "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
        )
    }

    fn json_delta(index: u64, partial: &str) -> (String, Value) {
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index,
                   "delta": {"type": "input_json_delta", "partial_json": partial}}),
        )
    }

    fn end(stop: &str, output: u64) -> [(String, Value); 2] {
        [
            ev(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                       "usage": {"output_tokens": output}}),
            ),
            ev("message_stop", json!({"type": "message_stop"})),
        ]
    }

    #[test]
    fn anthropic_stream_events_become_openai_chunks_in_order() {
        let mut t = AnthropicToOpenAi::new("gpt-4o", 1_700_000_000, None);
        let out = run(&mut t, TEXT_STREAM).unwrap();
        let deltas: Vec<&Value> = out.iter().map(|c| &c["choices"][0]["delta"]).collect();
        assert_eq!(
            deltas[..4],
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "Hello"}),
                &json!({"content": "!"}),
                &json!({}),
            ]
        );
        assert_eq!(out[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(out.len(), 5);
        let usage = &out[4];
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
        for chunk in &out {
            assert_eq!(
                chunk["id"],
                "chatcmpl-msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
            );
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "gpt-4o");
            assert_eq!(chunk["created"], 1_700_000_000);
        }
        assert_eq!(out[1]["usage"], Value::Null);
        assert!(t.is_done());
        assert!(t.finish().is_ok());
    }

    #[test]
    fn a_tool_use_stream_becomes_tool_call_deltas() {
        let mut t = AnthropicToOpenAi::new("gpt-4o", 0, None);
        let mut events = vec![
            start(),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "Okay, let me check."}}),
            ),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            tool_start(1, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather"),
            json_delta(1, ""),
            json_delta(1, "{\"location\": \"San Fra"),
            json_delta(1, "ncisco, CA\"}"),
            ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
            tool_start(2, "toolu_02", "get_time"),
            json_delta(2, "{}"),
        ];
        events.extend(end("tool_use", 89));
        let out = feed(&mut t, &events);
        let deltas: Vec<&Value> = out.iter().map(|c| &c["choices"][0]["delta"]).collect();
        assert_eq!(
            deltas,
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "Okay, let me check."}),
                &json!({"tool_calls": [{"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                    "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
                &json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"location\": \"San Fra"}}]}),
                &json!({"tool_calls": [{"index": 0, "function": {"arguments": "ncisco, CA\"}"}}]}),
                &json!({"tool_calls": [{"index": 1, "id": "toolu_02",
                    "type": "function", "function": {"name": "get_time", "arguments": ""}}]}),
                &json!({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
                &json!({}),
            ]
        );
        assert_eq!(out[7]["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn a_structured_output_stream_becomes_content_and_stops_normally() {
        let mut t = AnthropicToOpenAi::new("gpt-4o", 0, Some("person".into()));
        let mut events = vec![
            start(),
            tool_start(0, "toolu_7", "person"),
            json_delta(0, "{\"name\": \"Ada\","),
            json_delta(0, " \"age\": 36}"),
        ];
        events.extend(end("tool_use", 20));
        let out = feed(&mut t, &events);
        let text: String = out
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, json!({"name": "Ada", "age": 36}));
        assert!(out
            .iter()
            .all(|c| c["choices"][0]["delta"].get("tool_calls").is_none()));
        assert_eq!(out.last().unwrap()["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn an_error_event_before_any_text_is_reported_as_a_failure_that_can_fail_over() {
        let mut t = AnthropicToOpenAi::new("gpt-4o", 0, None);
        assert!(t.push(&start().0, &start().1).unwrap().is_empty());
        let e = t
            .push(
                "error",
                &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            )
            .unwrap_err();
        assert!(e.is_overloaded());
        assert!(
            !t.emitted_content(),
            "nothing reached the client: fail over"
        );
    }

    #[test]
    fn an_error_event_after_text_is_reported_once_content_went_out() {
        let mut t = AnthropicToOpenAi::new("gpt-4o", 0, None);
        let wire = TEXT_STREAM.split("event: content_block_stop").next().unwrap().to_owned()
            + "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"Internal server error\"}}\n\n";
        let e = run(&mut t, &wire).unwrap_err();
        assert_eq!(
            e,
            StreamFailure::Reported {
                kind: "api_error".into(),
                message: "Internal server error".into()
            }
        );
        assert!(!e.is_overloaded());
        assert!(
            t.emitted_content(),
            "text already went out: no silent restart"
        );
    }

    #[test]
    fn a_stream_cut_before_message_stop_is_malformed() {
        let mut t = AnthropicToOpenAi::new("gpt-4o", 0, None);
        let cut = TEXT_STREAM.split("event: message_delta").next().unwrap();
        run(&mut t, cut).unwrap();
        assert!(!t.is_done());
        assert!(matches!(t.finish(), Err(StreamFailure::Malformed(_))));
    }

    #[test]
    fn events_out_of_order_or_with_bad_data_are_malformed() {
        let mut t = AnthropicToOpenAi::new("gpt-4o", 0, None);
        let delta = json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": "x"}});
        assert!(
            t.push("content_block_delta", &delta).is_err(),
            "before message_start"
        );
        t.push(&start().0, &start().1).unwrap();
        assert!(
            t.push("content_block_delta", &delta).is_err(),
            "block never started"
        );
        assert!(
            t.push("message_stop", &json!({"type": "message_stop"}))
                .is_err(),
            "no stop reason"
        );
        let garbage = SseEvent {
            event: Some("content_block_delta".into()),
            data: "{not json".into(),
        };
        assert!(t.push_sse(&garbage).is_err());
        t.push(
            &tool_start(0, "toolu_1", "f").0,
            &tool_start(0, "toolu_1", "f").1,
        )
        .unwrap();
        let wrong = json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": "x"}});
        assert!(
            t.push("content_block_delta", &wrong).is_err(),
            "text into a tool block"
        );
    }

    #[test]
    fn pings_unknown_events_and_thinking_are_ignored() {
        let mut t = AnthropicToOpenAi::new("gpt-4o", 0, None);
        let mut events = vec![
            start(),
            ev("ping", json!({"type": "ping"})),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "thinking", "thinking": ""}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Let me think"}}),
            ),
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM"}}),
            ),
            ev("some_future_event", json!({"type": "some_future_event"})),
        ];
        assert!(feed(&mut t, &events).is_empty());
        assert!(!t.emitted_content());
        events = end("max_tokens", 1024).to_vec();
        let out = feed(&mut t, &events);
        assert_eq!(out.last().unwrap()["choices"][0]["finish_reason"], "length");
        assert!(
            t.push("content_block_delta", &json!({}))
                .unwrap()
                .is_empty(),
            "after the end"
        );
    }
}
