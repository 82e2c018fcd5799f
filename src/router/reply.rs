//! The one shape every backend answers in, local engine and cloud upstreams alike: OpenAI's
//! Chat Completions dialect, whole or streamed. Each inbound API renders it its own way
//! (SSE for OpenAI clients, Anthropic's events for `/v1/messages`).

use axum::body::Bytes;
use futures_util::stream::BoxStream;
use serde_json::Value;

/// Why a stream that already reached the client broke off. It is not restarted elsewhere:
/// the client gets a clean error event instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StreamFault {
    /// What happened, for the error event.
    pub(crate) message: String,
    /// OpenAI's error `type` for it.
    pub(crate) kind: &'static str,
    /// OpenAI's error `code`, if any.
    pub(crate) code: Option<&'static str>,
}

impl StreamFault {
    /// A fault of the serving side.
    pub(crate) fn server(message: impl Into<String>) -> Self {
        StreamFault {
            message: message.into(),
            kind: "server_error",
            code: None,
        }
    }

    /// The error event's JSON, in OpenAI's error shape.
    pub(crate) fn to_json(&self) -> Value {
        serde_json::json!({
            "error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}
        })
    }
}

/// `chat.completion.chunk` payloads (JSON text, without `data:` or `[DONE]`); an `Err` item is
/// the last one.
pub(crate) type ChunkStream = BoxStream<'static, Result<String, StreamFault>>;

/// An answer.
pub(crate) enum Reply {
    /// The whole `chat.completion` (or `text_completion`) object.
    Whole(Value),
    /// A cloud's whole `chat.completion`, the bytes it sent: checked to be a JSON object with
    /// a `choices` array, and passed on as they came (re-serializing a parsed copy cost the
    /// router a tenth of its CPU per request, and would reorder the upstream's fields).
    Forwarded(Forwarded),
    /// Chunks as they come.
    Stream(ChunkStream),
}

/// A cloud's whole answer and the one part of it the router reads.
pub(crate) struct Forwarded {
    /// The JSON text.
    pub(crate) body: Bytes,
    /// Its `usage` object (`null` when it had none).
    pub(crate) usage: Value,
}

impl Forwarded {
    /// `body` when it is a JSON object with a `choices` array; else why not.
    pub(crate) fn check(body: Bytes) -> Result<Forwarded, &'static str> {
        /// Only what the check needs: the choices are skipped over, not built.
        #[derive(serde::Deserialize)]
        struct Shape {
            #[allow(dead_code)]
            choices: Vec<serde::de::IgnoredAny>,
            #[serde(default)]
            usage: Value,
        }
        match serde_json::from_slice::<Shape>(&body) {
            Ok(shape) => Ok(Forwarded {
                body,
                usage: shape.usage,
            }),
            Err(_) if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() => {
                Err("a 200 without `choices`")
            }
            Err(_) => Err("a 200 whose body is not JSON"),
        }
    }

    /// The answer as a JSON value, for a caller that reshapes it.
    pub(crate) fn value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Whole(v) => f.debug_tuple("Whole").field(v).finish(),
            Reply::Forwarded(w) => f
                .debug_tuple("Forwarded")
                .field(&String::from_utf8_lossy(&w.body))
                .finish(),
            Reply::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_answer_is_checked_and_its_usage_read_but_its_bytes_kept() {
        let text = "{\n  \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 2},\n  \"choices\": [{\"index\": 0}]\n}";
        let answer = Forwarded::check(Bytes::from(text)).unwrap();
        assert_eq!(answer.body, text.as_bytes());
        assert_eq!(answer.usage["prompt_tokens"], 3);
        assert_eq!(answer.value().unwrap()["choices"][0]["index"], 0);
        let no_usage = Forwarded::check(Bytes::from_static(b"{\"choices\": []}")).unwrap();
        assert!(no_usage.usage.is_null());
        for (body, why) in [
            (&b"{\"id\": \"x\"}"[..], "a 200 without `choices`"),
            (b"{\"choices\": null}", "a 200 without `choices`"),
            (b"{\"choices\": {}}", "a 200 without `choices`"),
            (b"[1, 2]", "a 200 without `choices`"),
            (b"<html>502</html>", "a 200 whose body is not JSON"),
            (b"{\"choices\": [", "a 200 whose body is not JSON"),
        ] {
            assert_eq!(
                Forwarded::check(Bytes::from_static(body)).err(),
                Some(why),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
