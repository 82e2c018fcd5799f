//! The one shape every backend answers in, local engine and cloud upstreams alike: OpenAI's
//! Chat Completions dialect, whole or streamed. Each inbound API renders it its own way
//! (SSE for OpenAI clients, Anthropic's events for `/v1/messages`).

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
    /// Chunks as they come.
    Stream(ChunkStream),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Whole(v) => f.debug_tuple("Whole").field(v).finish(),
            Reply::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}
