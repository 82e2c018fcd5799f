//! Property tests: the request parsers of every API, and the other parsers that read what
//! clients and files send, never panic, whatever the input. Each runs a few hundred random
//! cases per test run (a brief fuzz in CI); shapes close to real requests reach past the
//! first checks.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use crate::api::body::JsonBody;

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A request-shaped object: the keys the APIs read, with any values.
fn request_like() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "model",
        "messages",
        "prompt",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "n",
        "tools",
        "response_format",
        "options",
        "system",
        "keep_alive",
        "format",
        "images",
        "raw",
        "suffix",
        "input",
        "max_completion_tokens",
        "tool_choice",
        "stop_sequences",
        "think",
        "template",
        "context",
        "encoding_format",
        "dimensions",
        "truncate",
    ]);
    prop::collection::btree_map(keys, any_json(), 0..10).prop_map(|m| {
        let mut o: Map<String, Value> = m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        // Often a plausible model and messages, so validation goes deeper.
        o.entry("model").or_insert(json!("smollm2"));
        Value::Object(o)
    })
}

fn messages_like() -> impl Strategy<Value = Value> {
    let role = prop::sample::select(vec![
        "system",
        "user",
        "assistant",
        "tool",
        "developer",
        "x",
    ]);
    prop::collection::vec((role, any_json()), 0..5).prop_map(|ms| {
        Value::Array(
            ms.into_iter()
                .map(|(r, c)| json!({"role": r, "content": c}))
                .collect(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn openai_parsers_never_panic(body in request_like(), messages in messages_like()) {
        let mut with_messages = body.clone();
        with_messages["messages"] = messages;
        for b in [body, with_messages] {
            let _ = crate::api::openai::convert::chat(&JsonBody(b.clone()));
            let _ = crate::api::openai::convert::completion(&JsonBody(b));
        }
    }

    #[test]
    fn ollama_parsers_never_panic(body in request_like(), messages in messages_like(), options in any_json()) {
        let mut b = body;
        b["messages"] = messages;
        let _ = crate::api::ollama::convert::generate(&b);
        let _ = crate::api::ollama::convert::chat(&b);
        let _ = crate::api::ollama::convert::options(Some(&options), "options");
        b["options"] = options;
        let _ = crate::api::ollama::convert::generate(&b);
    }

    #[test]
    fn anthropic_translation_never_panics(body in request_like(), messages in messages_like()) {
        let mut b = body;
        b["messages"] = messages;
        if let Ok(openai) = crate::router::anthropic::client_request::anthropic_request_to_openai(&b) {
            let _ = crate::router::anthropic::upstream_request::openai_request_to_anthropic(&openai, "m", 64);
        }
    }

    #[test]
    fn names_digests_and_durations_never_panic(text in ".{0,64}") {
        let _ = crate::models::ModelName::parse(&text);
        let _ = crate::models::Digest::parse(&text);
        let _ = crate::config::KeepAlive::parse(&text);
        let _ = crate::config::parse_go_duration(&text);
        let _ = crate::config::security::Cidr::parse(&text);
    }

    #[test]
    fn gguf_headers_and_event_streams_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut with_magic = b"GGUF\x03\0\0\0".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = crate::models::gguf::parse(&mut bytes.as_slice());
        let _ = crate::models::gguf::parse(&mut with_magic.as_slice());
        let mut sse = crate::router::sse::SseParser::new();
        let _ = sse.push(&bytes);
    }
}
