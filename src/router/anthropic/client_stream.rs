//! An OpenAI chunk stream (local model or OpenAI-compatible cloud) as the event stream an
//! Anthropic client expects: `message_start`, then per content block `content_block_start`,
//! its deltas and `content_block_stop`, then `message_delta` (stop reason and usage) and
//! `message_stop`.

use serde_json::{json, Value};

use super::{anthropic_usage, message_id, stop_reason, StreamFailure};

/// One Anthropic SSE event: its `event:` name and its `data:` JSON (whose `type` is the name).
pub(crate) type Event = (&'static str, Value);

/// The error types an Anthropic client can get mid-stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// Something failed on the serving side (`api_error`).
    Api,
    /// No backend had capacity (`overloaded_error`); Anthropic's SDKs retry on it.
    Overloaded,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Api => "api_error",
            ErrorKind::Overloaded => "overloaded_error",
        }
    }
}

/// The content block currently open (Anthropic blocks never interleave: one is stopped
/// before the next starts).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Open {
    /// Text, continued by further text deltas.
    Text,
    /// A `tool_use` block, continued by the argument fragments of its call.
    Tool {
        /// OpenAI's index of the call, which its argument fragments refer to.
        call: u64,
        /// The call's id, which some servers repeat on every fragment.
        id: String,
    },
}

/// Turns OpenAI `chat.completion.chunk` values into Anthropic events, in Anthropic's order.
///
/// Nothing is emitted until there is something to say (text, a tool call, or the end), so
/// until [`emitted_content`](Self::emitted_content) the router may still fail over to another
/// backend as if this stream had never started.
#[derive(Debug, Clone)]
pub(crate) struct OpenAiToAnthropic {
    /// The model name to report: the one the client asked for.
    model: String,
    /// Prompt tokens, when the router knows them before the stream's usage chunk.
    input_tokens: Option<u64>,
    /// The message id, from the first chunk's id.
    id: Option<String>,
    /// `message_start` went out.
    started: bool,
    /// The open block and its index.
    open: Option<(usize, Open)>,
    /// Index of the next block.
    next_index: usize,
    /// Set by the chunk carrying `finish_reason`.
    stop_reason: Option<&'static str>,
    /// OpenAI's usage object, from the usage chunk.
    usage: Option<Value>,
    /// `message_stop` or an error went out: nothing may follow.
    done: bool,
}

impl OpenAiToAnthropic {
    /// A translator for one answer, reporting `model` as the model's name.
    pub(crate) fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            input_tokens: None,
            id: None,
            started: false,
            open: None,
            next_index: 0,
            stop_reason: None,
            usage: None,
            done: false,
        }
    }

    /// Whether any event has gone out. Until then a failed backend can be replaced.
    #[cfg(test)]
    pub(crate) fn emitted_content(&self) -> bool {
        self.started
    }

    /// Translates one chunk. An OpenAI in-stream error object (`{"error": {…}}`) is
    /// [`StreamFailure::Reported`]; a chunk that is not a chunk is malformed. Chunks after
    /// the end are ignored.
    pub(crate) fn push(&mut self, chunk: &Value) -> Result<Vec<Event>, StreamFailure> {
        let mut out = Vec::new();
        if self.done {
            return Ok(out);
        }
        let chunk = chunk
            .as_object()
            .ok_or_else(|| StreamFailure::malformed("a stream chunk that is not a JSON object"))?;
        if let Some(error) = chunk.get("error") {
            return Err(StreamFailure::Reported {
                kind: error
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("server_error")
                    .to_owned(),
                message: error
                    .get("message")
                    .and_then(Value::as_str)
                    .map_or_else(|| error.to_string(), str::to_owned),
            });
        }
        if self.id.is_none() {
            let id = chunk
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| StreamFailure::malformed("a stream chunk without an `id`"))?;
            self.id = Some(message_id(id));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        let choices = chunk
            .get("choices")
            .and_then(Value::as_array)
            .ok_or_else(|| StreamFailure::malformed("a stream chunk without `choices`"))?;
        // One answer per request (n = 1): only the first choice exists.
        if let Some(choice) = choices.first() {
            let delta = choice.get("delta");
            if let Some(text) = delta
                .and_then(|d| d.get("content"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                self.text(text, &mut out);
            }
            if let Some(calls) = delta
                .and_then(|d| d.get("tool_calls"))
                .and_then(Value::as_array)
            {
                for call in calls {
                    self.tool_call(call, &mut out)?;
                }
            }
            if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
                self.stop_reason = Some(stop_reason(finish));
            }
        }
        // The usage chunk follows the finish chunk when the client asked for usage; some
        // servers put usage on the finish chunk itself. Either way the message ends once both
        // are known; without usage it ends at `finish`.
        if self.stop_reason.is_some() && self.usage.is_some() {
            self.close(&mut out);
        }
        Ok(out)
    }

    /// Ends the message: the stream is over (`[DONE]`, or it simply ended). Without a finish
    /// chunk the answer is taken as complete (`end_turn`); whether a stream that ended early
    /// is a failure is the router's call, made before it calls this. Returns nothing if the
    /// message already ended.
    pub(crate) fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if !self.done {
            self.close(&mut out);
        }
        out
    }

    /// Ends the stream with Anthropic's `error` event, after which nothing more is sent.
    pub(crate) fn error(&mut self, kind: ErrorKind, message: &str) -> Vec<Event> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        vec![(
            "error",
            json!({"type": "error", "error": {"type": kind.as_str(), "message": message}}),
        )]
    }

    fn start(&mut self, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        // Every chunk has an id (checked in `push`); only a stream with no chunk at all,
        // ended by `finish`, has none, and it still gets a well-formed empty message.
        let id = self.id.clone().unwrap_or_else(|| "msg_empty".to_owned());
        self.started = true;
        out.push((
            "message_start",
            json!({
                "type": "message_start",
                "message": {
                    "id": id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": {"input_tokens": self.input_tokens.unwrap_or(0), "output_tokens": 0},
                }
            }),
        ));
    }

    fn open_block(&mut self, block: Open, start: Value, out: &mut Vec<Event>) {
        self.close_block(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some((index, block));
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
    }

    fn close_block(&mut self, out: &mut Vec<Event>) {
        if let Some((index, _)) = self.open.take() {
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn delta(&self, delta: Value, out: &mut Vec<Event>) {
        let index = self.open.as_ref().map_or(0, |(i, _)| *i);
        out.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }

    fn text(&mut self, text: &str, out: &mut Vec<Event>) {
        self.start(out);
        if !matches!(self.open, Some((_, Open::Text))) {
            self.open_block(Open::Text, json!({"type": "text", "text": ""}), out);
        }
        self.delta(json!({"type": "text_delta", "text": text}), out);
    }

    /// One entry of a chunk's `tool_calls`: the first for a call carries its id and name and
    /// opens a `tool_use` block; the rest carry argument fragments for the open block.
    fn tool_call(&mut self, call: &Value, out: &mut Vec<Event>) -> Result<(), StreamFailure> {
        let index = call
            .get("index")
            .and_then(Value::as_u64)
            .ok_or_else(|| StreamFailure::malformed("a tool call delta without an `index`"))?;
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .filter(|i| !i.is_empty());
        let continues = match (&self.open, id) {
            (Some((_, Open::Tool { call, id: open_id })), id) => {
                *call == index && id.is_none_or(|id| id == open_id)
            }
            _ => false,
        };
        if !continues {
            let (Some(id), Some(name)) =
                (id, call.pointer("/function/name").and_then(Value::as_str))
            else {
                // Anthropic blocks cannot be reopened, so fragments for a call other than the
                // open one (interleaved calls) cannot be translated.
                return Err(StreamFailure::malformed(
                    "a tool call delta for a call that is not open, or a new call without an id and name",
                ));
            };
            let block = Open::Tool {
                call: index,
                id: id.to_owned(),
            };
            let start = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
            self.start(out);
            self.open_block(block, start, out);
        }
        if let Some(fragment) = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .filter(|f| !f.is_empty())
        {
            self.delta(
                json!({"type": "input_json_delta", "partial_json": fragment}),
                out,
            );
        }
        Ok(())
    }

    /// Closes the open block and the message.
    fn close(&mut self, out: &mut Vec<Event>) {
        self.start(out);
        self.close_block(out);
        let mut usage = anthropic_usage(self.usage.as_ref());
        if self.usage.is_none() {
            // Unknown: say only what is known rather than report zero prompt tokens.
            usage = json!({"output_tokens": 0});
            if let Some(n) = self.input_tokens {
                usage["input_tokens"] = json!(n);
            }
        }
        out.push((
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
                "usage": usage,
            }),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(delta: Value, finish: Value) -> Value {
        json!({
            "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1_694_268_190,
            "model": "gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            "usage": null
        })
    }

    fn usage_chunk() -> Value {
        json!({
            "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1_694_268_190,
            "model": "gpt-4o-mini", "choices": [],
            "usage": {"prompt_tokens": 25, "completion_tokens": 2, "total_tokens": 27}
        })
    }

    fn run(t: &mut OpenAiToAnthropic, chunks: &[Value]) -> Vec<Event> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(t.push(c).unwrap());
        }
        out.extend(t.finish());
        out
    }

    fn names(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn openai_chunks_become_anthropic_events_with_usage() {
        let mut t = OpenAiToAnthropic::new("claude-sonnet-4-5");
        let events = run(
            &mut t,
            &[
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "Hello"}), Value::Null),
                chunk(json!({"content": "!"}), Value::Null),
                chunk(json!({}), json!("stop")),
                usage_chunk(),
            ],
        );
        assert_eq!(
            names(&events),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let start = &events[0].1;
        assert_eq!(start["message"]["id"], "msg_123");
        assert_eq!(start["message"]["model"], "claude-sonnet-4-5");
        assert_eq!(start["message"]["content"], json!([]));
        assert_eq!(start["message"]["usage"]["input_tokens"], 0);
        assert_eq!(
            events[1].1,
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        );
        assert_eq!(
            events[2].1,
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}})
        );
        assert_eq!(
            events[4].1,
            json!({"type": "content_block_stop", "index": 0})
        );
        assert_eq!(
            events[5].1["delta"],
            json!({"stop_reason": "end_turn", "stop_sequence": null})
        );
        assert_eq!(events[5].1["usage"]["output_tokens"], 2);
        assert_eq!(events[5].1["usage"]["input_tokens"], 25);
        assert_eq!(events[6].1, json!({"type": "message_stop"}));
    }

    #[test]
    fn tool_call_deltas_close_the_text_block_and_open_tool_use_blocks() {
        let mut t = OpenAiToAnthropic::new("m");
        let call = |index: u64, id: Option<&str>, name: Option<&str>, args: &str| {
            let mut c = json!({"index": index, "function": {"arguments": args}});
            if let Some(id) = id {
                c["id"] = json!(id);
                c["type"] = json!("function");
            }
            if let Some(name) = name {
                c["function"]["name"] = json!(name);
            }
            chunk(json!({"tool_calls": [c]}), Value::Null)
        };
        let events = run(
            &mut t,
            &[
                chunk(json!({"content": "Checking."}), Value::Null),
                call(0, Some("call_w"), Some("get_weather"), ""),
                call(0, None, None, "{\"city\":"),
                call(0, None, None, "\"Rome\"}"),
                call(1, Some("call_t"), Some("get_time"), "{}"),
                chunk(json!({}), json!("tool_calls")),
            ],
        );
        assert_eq!(
            names(&events),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(
            events[4].1,
            json!({"type": "content_block_start", "index": 1,
                   "content_block": {"type": "tool_use", "id": "call_w", "name": "get_weather", "input": {}}})
        );
        assert_eq!(
            events[5].1["delta"],
            json!({"type": "input_json_delta", "partial_json": "{\"city\":"})
        );
        assert_eq!(events[8].1["index"], 2);
        assert_eq!(events[11].1["delta"]["stop_reason"], "tool_use");
        // Without a usage chunk, nothing is made up about the prompt.
        assert_eq!(events[11].1["usage"], json!({"output_tokens": 0}));
    }

    #[test]
    fn nothing_is_emitted_before_the_first_text_so_the_router_can_still_fail_over() {
        let mut t = OpenAiToAnthropic::new("m");
        let out = t
            .push(&chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ))
            .unwrap();
        assert!(out.is_empty());
        assert!(!t.emitted_content());
        let out = t
            .push(&chunk(json!({"content": "Hi"}), Value::Null))
            .unwrap();
        assert!(t.emitted_content());
        assert_eq!(out[0].0, "message_start");
    }

    #[test]
    fn a_length_finish_stops_for_max_tokens_when_usage_rides_on_the_finish_chunk() {
        let mut t = OpenAiToAnthropic::new("m");
        let mut last = chunk(json!({}), json!("length"));
        last["usage"] = json!({"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19});
        let out = t
            .push(&chunk(json!({"content": "abc"}), Value::Null))
            .unwrap();
        assert_eq!(out.len(), 3);
        let out = t.push(&last).unwrap();
        assert_eq!(
            names(&out),
            ["content_block_stop", "message_delta", "message_stop"]
        );
        assert_eq!(out[1].1["delta"]["stop_reason"], "max_tokens");
        assert!(t.finish().is_empty());
    }

    #[test]
    fn a_stream_that_ends_without_a_finish_chunk_still_closes_cleanly() {
        let mut t = OpenAiToAnthropic::new("m");
        let events = run(&mut t, &[chunk(json!({"content": "partial"}), Value::Null)]);
        assert_eq!(
            names(&events)[3..],
            ["content_block_stop", "message_delta", "message_stop"]
        );
        assert_eq!(events[4].1["delta"]["stop_reason"], "end_turn");
    }

    #[test]
    fn an_empty_stream_is_still_a_well_formed_message() {
        let mut t = OpenAiToAnthropic::new("m");
        assert_eq!(
            names(&t.finish()),
            ["message_start", "message_delta", "message_stop"]
        );
    }

    #[test]
    fn an_error_chunk_is_a_reported_failure_and_the_error_event_ends_the_stream() {
        let mut t = OpenAiToAnthropic::new("m");
        let e = t
            .push(&json!({"error": {"message": "model crashed", "type": "server_error"}}))
            .unwrap_err();
        assert_eq!(
            e,
            StreamFailure::Reported {
                kind: "server_error".into(),
                message: "model crashed".into()
            }
        );
        let out = t.error(ErrorKind::Overloaded, "Overloaded");
        assert_eq!(
            out,
            [(
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            )]
        );
        assert!(t
            .push(&chunk(json!({"content": "late"}), Value::Null))
            .unwrap()
            .is_empty());
        assert!(t.finish().is_empty());
        assert_eq!(
            t.error(ErrorKind::Api, "again"),
            Vec::<Event>::new(),
            "one error event only"
        );
    }

    #[test]
    fn fragments_for_a_call_that_is_not_open_are_malformed() {
        let mut t = OpenAiToAnthropic::new("m");
        let orphan = chunk(
            json!({"tool_calls": [{"index": 3, "function": {"arguments": "{}"}}]}),
            Value::Null,
        );
        assert!(matches!(t.push(&orphan), Err(StreamFailure::Malformed(_))));
        assert!(matches!(
            t.push(&json!({"id": "x", "object": "chat.completion.chunk"})),
            Err(StreamFailure::Malformed(_))
        ));
    }
}
