//! Token events to OpenAI stream chunks: a small pure translator, unit-tested without a
//! model, plus the SSE stream that drives it.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};

use super::error::ApiError;
use super::types::WireUsage;
use crate::api::request::Collected;
use crate::api::tools;
use crate::engine::{EngineError, FinishReason, Generation, TokenEvent, Usage};
use crate::router::reply::{ChunkStream, StreamFault};

/// Which endpoint's chunk shape to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `chat.completion.chunk` with `delta`.
    Chat,
    /// `text_completion` with `text`.
    Text,
}

/// Builds the chunks of one streamed answer.
#[derive(Debug, Clone)]
pub(crate) struct Chunker {
    kind: Kind,
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
}

/// Shown as `system_fingerprint`, so clients can tell which build answered.
pub(crate) const FINGERPRINT: &str = concat!("backstop-", env!("CARGO_PKG_VERSION"));

impl Chunker {
    /// A chunker for one response.
    pub(crate) fn new(
        kind: Kind,
        id: String,
        created: i64,
        model: String,
        include_usage: bool,
    ) -> Self {
        Self {
            kind,
            id,
            created,
            model,
            include_usage,
        }
    }

    fn chunk(&self, choice: Value) -> Value {
        let (object, choices) = match self.kind {
            Kind::Chat => ("chat.completion.chunk", json!([choice])),
            Kind::Text => ("text_completion", json!([choice])),
        };
        let mut c = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn choice(&self, content: Option<&str>, role: bool, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(FinishReason::as_str);
        match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = content {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": content.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        }
    }

    /// The opening chunk: chat streams announce the assistant role with empty content.
    pub(crate) fn start(&self) -> Option<String> {
        (self.kind == Kind::Chat).then(|| self.chunk(self.choice(Some(""), true, None)).to_string())
    }

    /// A chunk carrying generated text.
    pub(crate) fn text(&self, text: &str) -> String {
        self.chunk(self.choice(Some(text), false, None)).to_string()
    }

    /// The closing chunks: the finish reason, then (if asked for) usage with no choices.
    pub(crate) fn finish(&self, finish: FinishReason, usage: Usage) -> Vec<String> {
        let mut out = vec![self
            .chunk(self.choice(None, false, Some(finish)))
            .to_string()];
        if self.include_usage {
            let mut u = self.chunk(Value::Null);
            u["choices"] = json!([]);
            u["usage"] = json!(WireUsage::from(usage));
            out.push(u.to_string());
        }
        out
    }
}

/// The chunks one engine event becomes, and whether the stream ends after them.
pub(crate) fn translate(
    chunker: &Chunker,
    event: Option<TokenEvent>,
) -> (Vec<Result<String, StreamFault>>, bool) {
    match event {
        Some(TokenEvent::Queued { .. }) => (vec![], false),
        Some(TokenEvent::Token(t)) => (vec![Ok(chunker.text(&t))], false),
        Some(TokenEvent::Done { finish, usage, .. }) => (
            chunker.finish(finish, usage).into_iter().map(Ok).collect(),
            true,
        ),
        // An error after the headers went out ends the stream with an error event.
        Some(TokenEvent::Error(e)) => (vec![Err(fault(ApiError::from(e)))], true),
        None => (vec![Err(fault(ApiError::from(EngineError::Stopped)))], true),
    }
}

fn fault(e: ApiError) -> StreamFault {
    StreamFault {
        message: e.message().to_owned(),
        kind: e.kind(),
        code: e.code(),
    }
}

/// The chunks of a generation that has been queued.
pub(crate) fn chunks(generation: Generation, chunker: Chunker) -> ChunkStream {
    let head = stream::iter(chunker.start().map(Ok));
    let body = stream::unfold(Some((generation, chunker)), |state| async move {
        let (mut generation, chunker) = state?;
        let (items, end) = translate(&chunker, generation.next().await);
        let next = (!end).then_some((generation, chunker));
        Some((stream::iter(items), next))
    })
    .flatten();
    head.chain(body).boxed()
}

/// An OpenAI SSE response: one `data:` event per chunk, `data: [DONE]` after a complete
/// answer, or an error event (and no `[DONE]`, so clients cannot mistake it for a complete
/// answer) when the stream broke off.
/// Calls in OpenAI's shape: `{id, type, function: {name, arguments}}`, arguments as a JSON
/// string.
pub(crate) fn wire_calls(calls: &[tools::Call]) -> Vec<Value> {
    calls
        .iter()
        .map(|c| {
            json!({"id": format!("call_{}", uuid::Uuid::new_v4().simple()),
                   "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments.to_string()}})
        })
        .collect()
}

/// A whole answer to a request that offered tools, as stream chunks: the role, the text (if
/// any), each call as a `tool_calls` delta with its index, then the finish and usage.
pub(crate) fn tool_chunks(collected: Collected, forced: bool, chunker: Chunker) -> ChunkStream {
    let (rest, calls) = tools::extract(&collected.text, forced);
    let mut out: Vec<Result<String, StreamFault>> = chunker.start().into_iter().map(Ok).collect();
    let text = if calls.is_empty() {
        collected.text.as_str()
    } else {
        rest.as_str()
    };
    if !text.is_empty() {
        out.push(Ok(chunker.text(text)));
    }
    for (i, call) in wire_calls(&calls).into_iter().enumerate() {
        let mut call = call;
        call["index"] = json!(i);
        let delta = json!({"index": 0, "delta": {"tool_calls": [call]},
                           "logprobs": null, "finish_reason": null});
        out.push(Ok(chunker.chunk(delta).to_string()));
    }
    let finish = chunker.finish(collected.finish, collected.usage);
    for (i, line) in finish.into_iter().enumerate() {
        if i == 0 && !calls.is_empty() {
            let mut v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            v["choices"][0]["finish_reason"] = json!("tool_calls");
            out.push(Ok(v.to_string()));
        } else {
            out.push(Ok(line));
        }
    }
    stream::iter(out).boxed()
}

pub(crate) fn render(chunks: ChunkStream) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = stream::unfold(Some(chunks), |state| async move {
        let mut chunks = state?;
        match chunks.next().await {
            Some(Ok(data)) => Some((data, Some(chunks))),
            Some(Err(f)) => Some((f.to_json().to_string(), None)),
            None => Some(("[DONE]".to_owned(), None)),
        }
    })
    .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(include_usage: bool) -> Chunker {
        Chunker::new(
            Kind::Chat,
            "chatcmpl-1".into(),
            7,
            "m".into(),
            include_usage,
        )
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn chat_stream_opens_with_the_assistant_role() {
        let c = parse(&chat(false).start().unwrap());
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(
            c["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(c["choices"][0]["finish_reason"], Value::Null);
        assert!(c.get("usage").is_none());
    }

    #[test]
    fn text_chunks_carry_only_content() {
        let c = parse(&chat(false).text("Hel"));
        assert_eq!(c["choices"][0]["delta"], json!({"content": "Hel"}));
        assert_eq!(c["id"], "chatcmpl-1");
    }

    #[test]
    fn done_gives_finish_then_usage_then_done_marker() {
        let usage = Usage {
            prompt_tokens: 5,
            completion_tokens: 3,
            cached_tokens: 0,
        };
        let (lines, end) = translate(
            &chat(true),
            Some(TokenEvent::Done {
                finish: FinishReason::Length,
                usage,
                timings: Default::default(),
            }),
        );
        assert!(end);
        let lines: Vec<String> = lines.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            lines.len(),
            2,
            "finish, then usage; [DONE] is the renderer's"
        );
        let fin = parse(&lines[0]);
        assert_eq!(fin["choices"][0]["finish_reason"], "length");
        assert_eq!(fin["choices"][0]["delta"], json!({}));
        assert_eq!(fin["usage"], Value::Null);
        let u = parse(&lines[1]);
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["usage"]["total_tokens"], 8);
    }

    #[test]
    fn without_include_usage_there_is_no_usage_chunk() {
        let (lines, _) = translate(
            &chat(false),
            Some(TokenEvent::Done {
                finish: FinishReason::Stop,
                usage: Usage::default(),
                timings: Default::default(),
            }),
        );
        assert_eq!(lines.len(), 1, "only the finish chunk");
    }

    #[test]
    fn an_error_mid_stream_is_an_error_object_and_ends_without_done() {
        let (lines, end) = translate(
            &chat(false),
            Some(TokenEvent::Error(EngineError::Decode("boom".into()))),
        );
        assert!(end);
        assert_eq!(lines.len(), 1);
        let fault = lines[0].clone().unwrap_err();
        assert_eq!(fault.kind, "server_error");
        assert!(fault.message.contains("boom"));
    }

    #[test]
    fn queued_events_produce_nothing() {
        let (lines, end) = translate(&chat(false), Some(TokenEvent::Queued { prompt_tokens: 3 }));
        assert!(lines.is_empty());
        assert!(!end);
    }

    #[test]
    fn text_completion_chunks_use_text_and_have_no_role_chunk() {
        let t = Chunker::new(Kind::Text, "cmpl-1".into(), 7, "m".into(), false);
        assert!(t.start().is_none());
        let c = parse(&t.text("abc"));
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], "abc");
    }
}
