//! Structured output on both APIs against the real SmolLM2 model: every answer constrained by
//! a schema parses and validates (checked with a JSON-schema validator), streamed or not, and
//! bad schemas are refused with a 400 naming the problem.

mod common;

use common::{answer, chat_text, Server};
use serde_json::{json, Value};

fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "person",
            json!({"type": "object", "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 24},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "address": {"type": "object", "properties": {
                    "city": {"type": "string", "maxLength": 24},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": false}},
                "required": ["name", "age", "address"], "additionalProperties": false}),
        ),
        (
            "order",
            json!({"type": "object", "properties": {
                "status": {"enum": ["pending", "shipped", "delivered"]},
                "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                    "type": "object", "properties": {
                        "sku": {"type": "string", "maxLength": 12},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["sku", "qty"], "additionalProperties": false}}},
                "required": ["status", "items"], "additionalProperties": false}),
        ),
        (
            "tags",
            json!({"type": "array", "items": {"type": "string", "maxLength": 16},
                   "minItems": 2, "maxItems": 4}),
        ),
        (
            "rating",
            json!({"$defs": {"score": {"type": "integer", "minimum": 1, "maximum": 5}},
                   "type": "object", "properties": {
                "score": {"$ref": "#/$defs/score"},
                "ok": {"type": "boolean"},
                "note": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]}},
                "required": ["score", "ok", "note"], "additionalProperties": false}),
        ),
    ]
}

fn assert_valid(schema: &Value, text: &str) -> Value {
    let value: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let validator = jsonschema::validator_for(schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{text} breaks {schema}: {errors:?}");
    value
}

fn openai_body(name: &str, schema: &Value) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": format!("Give me a {name} as JSON.")}],
        "temperature": 0,
        "seed": 1,
        "max_tokens": 300,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": name, "strict": true, "schema": schema}},
    })
}

#[tokio::test]
async fn openai_json_schema_answers_validate_streamed_or_not() {
    let s = Server::start(&[]).await;
    for (name, schema) in schemas() {
        let body = openai_body(name, &schema);
        let whole = s.chat(body.clone()).await;
        assert_eq!(whole["choices"][0]["finish_reason"], "stop", "{whole}");
        let text = answer(&whole);
        assert_valid(&schema, &text);

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let payloads = s
            .stream("/v1/chat/completions", &streamed)
            .await
            .collect()
            .await;
        assert_eq!(chat_text(&payloads), text, "{name}: streamed differs");
    }
}

#[tokio::test]
async fn openai_json_mode_answers_with_an_object() {
    let s = Server::start(&[]).await;
    for question in ["List three fruits.", "Who are you?", "Write a haiku."] {
        let r = s
            .chat(json!({
                "model": "smollm2",
                "messages": [{"role": "user", "content": format!("{question} Answer in JSON.")}],
                "temperature": 0,
                "max_tokens": 200,
                "response_format": {"type": "json_object"},
            }))
            .await;
        if r["choices"][0]["finish_reason"] == "stop" {
            let v: Value = serde_json::from_str(&answer(&r)).unwrap();
            assert!(v.is_object(), "{v}");
        } else {
            // Cut by max_tokens: still the start of an object, never prose.
            assert!(answer(&r).starts_with('{'), "{r}");
        }
    }
}

#[tokio::test]
async fn ollama_format_json_and_schemas_validate_streamed_or_not() {
    let s = Server::start(&[]).await;
    for (name, schema) in schemas() {
        let body = json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": format!("Give me a {name} as JSON.")}],
            "format": schema,
            "stream": false,
            "options": {"temperature": 0, "seed": 1, "num_predict": 300},
        });
        let (status, whole) = s.post("/api/chat", &body).await;
        assert_eq!(status, 200, "{whole}");
        assert_eq!(whole["done_reason"], "stop", "{whole}");
        let text = whole["message"]["content"].as_str().unwrap().to_owned();
        assert_valid(&schema, &text);

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (status, _, lines) = s.ndjson("/api/chat", &streamed).await;
        assert_eq!(status, 200);
        let joined: String = lines
            .iter()
            .filter_map(|l| l["message"]["content"].as_str())
            .collect();
        assert_eq!(joined, text, "{name}: streamed differs");
    }
    let (status, r) = s
        .post(
            "/api/generate",
            &json!({"model": "smollm2", "prompt": "Describe a dog in JSON.", "format": "json",
                    "stream": false, "options": {"temperature": 0, "num_predict": 200}}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let text = r["response"].as_str().unwrap();
    if r["done_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(text).unwrap().is_object());
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
}

#[tokio::test]
async fn bad_schemas_are_400s_naming_the_problem_and_the_server_carries_on() {
    let s = Server::start(&[]).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}),
            "response_format.json_schema.schema",
            "invalid JSON schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "array", "uniqueItems": true}}}),
            "response_format.json_schema.schema",
            "`uniqueItems` cannot be enforced",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "object", "properties": {"p": {"type": "number", "maximum": 1}}}}}),
            "response_format.json_schema.schema",
            "at `/properties/p`",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "object", "properties": {"mail": {"type": "string", "format": "email"}}}}}),
            "response_format.json_schema.schema",
            "format \"email\" cannot be enforced",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "string", "pattern": "abc"}}}),
            "response_format.json_schema.schema",
            "must be anchored",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"$ref": "https://example.com/s.json"}}}),
            "response_format.json_schema.schema",
            "external references",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}),
            "response_format.json_schema.name",
            "letters, digits",
        ),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
            "needs a `json_schema`",
        ),
        (
            json!({"type": "xml"}),
            "response_format.type",
            "`xml` is not one of",
        ),
        (json!("json"), "response_format.type", "must be an object"),
    ];
    for (format, param, says) in cases {
        let (status, e) = s
            .post(
                "/v1/chat/completions",
                &json!({"model": "smollm2", "messages": msgs, "response_format": format}),
            )
            .await;
        assert_eq!(status, 400, "{format}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{format}: {message}");
    }
    for (format, says) in [
        (json!("xml"), "`xml` is not a format"),
        (
            json!({"type": "object", "not": {}}),
            "`not` cannot be enforced",
        ),
        (json!({"type": 7}), "invalid JSON schema"),
        (json!(["json"]), "must be an object"),
    ] {
        let (status, e) = s
            .post(
                "/api/chat",
                &json!({"model": "smollm2", "messages": msgs, "format": format, "stream": false}),
            )
            .await;
        assert_eq!(status, 400, "{format}: {e}");
        let message = e["error"].as_str().unwrap();
        assert!(
            message.contains("format") && message.contains(says),
            "{message}"
        );
    }
    // Nothing else was disturbed: a plain request still answers.
    let r = s
        .chat(json!({"model": "smollm2", "messages": msgs, "max_tokens": 4}))
        .await;
    assert_eq!(r["object"], "chat.completion");
}

#[tokio::test]
async fn grammars_work_together_with_penalties_and_ignore_eos() {
    // The penalties see the prompt's last tokens; a grammar must never be fed them (llama.cpp
    // aborts the whole process when a grammar accepts a token it cannot take).
    let s = Server::start(&[]).await;
    let schema = &schemas()[0].1;
    let mut body = openai_body("person", schema);
    body["presence_penalty"] = json!(0.5);
    body["frequency_penalty"] = json!(0.3);
    body["repeat_penalty"] = json!(1.1);
    let r = s.chat(body).await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert_valid(schema, &answer(&r));

    let (status, r) = s
        .post(
            "/api/chat",
            &json!({"model": "smollm2", "format": "json", "stream": false,
                    "messages": [{"role": "user", "content": "A cat, as JSON."}],
                    "options": {"temperature": 0, "num_predict": 120,
                                "repeat_penalty": 1.1, "repeat_last_n": -1}}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert!(
        r["message"]["content"].as_str().unwrap().starts_with('{'),
        "{r}"
    );

    // ignore_eos asks to generate past the end; with a grammar the end of the JSON is the end.
    let mut body = openai_body("person", schema);
    body["ignore_eos"] = json!(true);
    let r = s.chat(body).await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert_valid(schema, &answer(&r));
    let (status, _) = s.get_json("/health").await;
    assert_eq!(status, 200, "the server died:\n{}", s.log());
}
