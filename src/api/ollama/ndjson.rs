//! Token events to Ollama's streamed objects, one JSON object per line
//! (`application/x-ndjson`): a small pure translator, unit-tested without a model, plus the
//! response body that drives it.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::error::OllamaError;
use crate::engine::{EngineError, FinishReason, Generation, Timings, TokenEvent, Usage};

/// Which endpoint's object shape to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `/api/generate`: text in `response`.
    Generate,
    /// `/api/chat`: text in `message.content`.
    Chat,
}

/// Ollama's timestamp format: RFC 3339 with nanoseconds, in UTC.
pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Builds the objects of one answer.
#[derive(Debug, Clone)]
pub(crate) struct Framer {
    kind: Kind,
    model: String,
    started: Instant,
    load: Duration,
}

impl Framer {
    /// A framer for one response; `started` is when the request arrived.
    pub(crate) fn new(kind: Kind, model: String, started: Instant, load: Duration) -> Self {
        Self {
            kind,
            model,
            started,
            load,
        }
    }

    fn object(&self, text: &str, done: bool) -> Value {
        let mut o = json!({
            "model": self.model,
            "created_at": now_rfc3339(),
        });
        match self.kind {
            Kind::Generate => o["response"] = json!(text),
            Kind::Chat => o["message"] = json!({"role": "assistant", "content": text}),
        }
        o["done"] = json!(done);
        o
    }

    /// An object carrying generated text.
    pub(crate) fn text(&self, text: &str) -> Value {
        self.object(text, false)
    }

    /// The closing object: why it ended and where the time went, in nanoseconds. Carries
    /// `text` too (the whole answer, for `stream: false`).
    pub(crate) fn done(&self, text: &str, finish: &str, usage: Usage, timings: Timings) -> Value {
        let mut o = self.object(text, true);
        o["done_reason"] = json!(finish);
        o["total_duration"] = json!(nanos(self.started.elapsed()));
        o["load_duration"] = json!(nanos(self.load));
        o["prompt_eval_count"] = json!(usage.prompt_tokens);
        o["prompt_eval_duration"] = json!(nanos(timings.prompt_eval));
        o["eval_count"] = json!(usage.completion_tokens);
        o["eval_duration"] = json!(nanos(timings.eval));
        o
    }

    /// The answer to a request that only loaded or unloaded the model.
    pub(crate) fn lifecycle(&self, reason: &str) -> Value {
        let mut o = self.object("", true);
        o["done_reason"] = json!(reason);
        o["total_duration"] = json!(nanos(self.started.elapsed()));
        o["load_duration"] = json!(nanos(self.load));
        o
    }
}

/// The lines one engine event becomes, and whether the stream ends after them.
pub(crate) fn translate(framer: &Framer, event: Option<TokenEvent>) -> (Option<String>, bool) {
    match event {
        Some(TokenEvent::Queued { .. }) => (None, false),
        Some(TokenEvent::Token(t)) => (Some(framer.text(&t).to_string()), false),
        Some(TokenEvent::Done {
            finish,
            usage,
            timings,
        }) => (
            Some(
                framer
                    .done("", finish_name(finish), usage, timings)
                    .to_string(),
            ),
            true,
        ),
        // After the headers went out, an error is an object of its own and ends the stream.
        Some(TokenEvent::Error(e)) => (Some(OllamaError::from(e).line()), true),
        None => (Some(OllamaError::from(EngineError::Stopped).line()), true),
    }
}

/// Ollama's `done_reason`.
pub(crate) fn finish_name(finish: FinishReason) -> &'static str {
    finish.as_str()
}

/// A streamed NDJSON response of any sequence of lines.
pub(crate) fn lines_response(
    lines: impl futures_util::Stream<Item = String> + Send + 'static,
) -> Response {
    let body = Body::from_stream(lines.map(|mut l| {
        l.push('\n');
        Ok::<_, std::convert::Infallible>(l)
    }));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// The streamed response for a generation that has been queued.
pub(crate) fn stream(generation: Generation, framer: Framer) -> Response {
    let lines = stream::unfold(Some((generation, framer)), |state| async move {
        let (mut generation, framer) = state?;
        let (line, end) = translate(&framer, generation.next().await);
        let next = (!end).then_some((generation, framer));
        Some((stream::iter(line), next))
    })
    .flatten();
    lines_response(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framer(kind: Kind) -> Framer {
        Framer::new(kind, "m".into(), Instant::now(), Duration::from_millis(5))
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn generate_objects_carry_text_in_response() {
        let (line, end) = translate(
            &framer(Kind::Generate),
            Some(TokenEvent::Token("Hel".into())),
        );
        assert!(!end);
        let o = parse(&line.unwrap());
        assert_eq!(o["response"], "Hel");
        assert_eq!(o["done"], false);
        assert_eq!(o["model"], "m");
        assert!(o["created_at"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn chat_objects_carry_an_assistant_message() {
        let o = framer(Kind::Chat).text("lo");
        assert_eq!(o["message"], json!({"role": "assistant", "content": "lo"}));
    }

    #[test]
    fn the_last_object_has_the_reason_counts_and_durations_in_nanoseconds() {
        let usage = Usage {
            prompt_tokens: 7,
            completion_tokens: 3,
            cached_tokens: 0,
        };
        let timings = Timings {
            queued: Duration::ZERO,
            prompt_eval: Duration::from_millis(2),
            eval: Duration::from_millis(30),
        };
        let (line, end) = translate(
            &framer(Kind::Chat),
            Some(TokenEvent::Done {
                finish: FinishReason::Length,
                usage,
                timings,
            }),
        );
        assert!(end);
        let o = parse(&line.unwrap());
        assert_eq!(o["done"], true);
        assert_eq!(o["done_reason"], "length");
        assert_eq!(o["prompt_eval_count"], 7);
        assert_eq!(o["eval_count"], 3);
        assert_eq!(o["eval_duration"], 30_000_000);
        assert_eq!(o["prompt_eval_duration"], 2_000_000);
        assert_eq!(o["load_duration"], 5_000_000);
        assert!(o["total_duration"].as_u64().unwrap() > 0);
        assert_eq!(o["message"]["content"], "");
    }

    #[test]
    fn an_error_mid_stream_is_an_error_object_and_ends_the_stream() {
        let (line, end) = translate(
            &framer(Kind::Generate),
            Some(TokenEvent::Error(EngineError::Decode("boom".into()))),
        );
        assert!(end);
        assert!(parse(&line.unwrap())["error"]
            .as_str()
            .unwrap()
            .contains("boom"));
    }

    #[test]
    fn queued_produces_nothing() {
        let (line, end) = translate(
            &framer(Kind::Chat),
            Some(TokenEvent::Queued { prompt_tokens: 1 }),
        );
        assert!(line.is_none());
        assert!(!end);
    }
}
