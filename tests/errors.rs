//! Bad input gets OpenAI's error shape and the right status, and disturbs nothing.

mod common;

use common::{answer, Server};
use serde_json::{json, Value};

/// Asserts the OpenAI error shape and returns the error object.
fn error_of(status: u16, body: &Value, expected_status: u16) -> Value {
    assert_eq!(status, expected_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    e.clone()
}

fn chat_body() -> Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
}

#[tokio::test]
async fn malformed_requests_get_400_naming_the_field_and_the_server_keeps_serving() {
    let s = Server::start(&[]).await;
    let baseline = answer(&s.chat(chat_body()).await);

    let (st, b) = s
        .post_raw(
            "/v1/chat/completions",
            b"{\"model\": \"smollm2\", \"messages\": [".to_vec(),
        )
        .await;
    assert!(error_of(st, &b, 400)["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));

    let (st, b) = s.post_raw("/v1/chat/completions", b"[1, 2]".to_vec()).await;
    error_of(st, &b, 400);

    let (st, b) = s.post_raw("/v1/chat/completions", b"{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec()).await;
    error_of(st, &b, 400);

    let cases: Vec<(Value, &str)> = vec![
        (json!({"model": "smollm2", "messages": "hello"}), "messages"),
        (
            json!({"model": "smollm2", "messages": [{"role": 7, "content": "x"}]}),
            "messages[0].role",
        ),
        (json!({"model": "smollm2", "messages": []}), "messages"),
        (
            json!({"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
            "messages[0].content[0].type",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": 5}),
            "temperature",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "top_p": -0.5}),
            "top_p",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}),
            "presence_penalty",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "n": 2}),
            "n",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1_000_000_000u64}),
            "max_tokens",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}),
            "max_tokens",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "stop": 5}),
            "stop",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "stop": vec!["a"; 17]}),
            "stop",
        ),
        (
            json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
            "stream",
        ),
    ];
    for (body, param) in cases {
        let (st, b) = s.post("/v1/chat/completions", &body).await;
        let e = error_of(st, &b, 400);
        assert_eq!(e["param"], param, "for {body}: {b}");
        assert_eq!(e["type"], "invalid_request_error");
    }

    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": 42}),
        )
        .await;
    assert_eq!(error_of(st, &b, 400)["param"], "prompt");
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": ["a", "b"]}),
        )
        .await;
    assert_eq!(error_of(st, &b, 400)["param"], "prompt");
    let (st, b) = s
        .post(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": ""}),
        )
        .await;
    assert_eq!(error_of(st, &b, 400)["param"], "prompt");

    // Nothing was disturbed: the same request gives the same answer as before.
    assert_eq!(answer(&s.chat(chat_body()).await), baseline);
}

#[tokio::test]
async fn unknown_model_is_404_and_unknown_path_is_404() {
    let s = Server::start(&[]).await;
    let mut body = chat_body();
    body["model"] = json!("gpt-9");
    let (st, b) = s.post("/v1/chat/completions", &body).await;
    let e = error_of(st, &b, 404);
    assert_eq!(e["code"], "model_not_found");
    assert!(e["message"].as_str().unwrap().contains("gpt-9"));

    let r = s
        .client
        .get(s.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let b: Value = r.json().await.unwrap();
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/nothing-here"));
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_one_under_it_is_served() {
    let s = Server::start(&["--max-body-bytes", "2048"]).await;
    let mut body = chat_body();
    body["messages"][0]["content"] = json!("x".repeat(4096));
    let (st, b) = s.post("/v1/chat/completions", &body).await;
    let e = error_of(st, &b, 413);
    assert_eq!(e["code"], "request_too_large");
    assert!(e["message"].as_str().unwrap().contains("2048"));
    body["messages"][0]["content"] = json!("x".repeat(100));
    let (st, _) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn a_prompt_longer_than_the_context_is_422_for_streams_too() {
    let s = Server::start(&["--ctx", "256", "--parallel", "1"]).await;
    let long = "the quick brown fox jumps over the lazy dog ".repeat(60);
    let mut body = chat_body();
    body["messages"][0]["content"] = json!(long);
    let (st, b) = s.post("/v1/chat/completions", &body).await;
    let e = error_of(st, &b, 422);
    assert_eq!(e["code"], "context_length_exceeded");
    assert!(e["message"].as_str().unwrap().contains("256"), "{e}");
    body["stream"] = json!(true);
    let (st, b) = s.post("/v1/chat/completions", &body).await;
    error_of(st, &b, 422);
    // max_tokens beyond the context is refused before any work.
    let mut big = chat_body();
    big["max_tokens"] = json!(257);
    let (st, b) = s.post("/v1/chat/completions", &big).await;
    assert_eq!(error_of(st, &b, 400)["param"], "max_tokens");
    // A prompt that fits still works, and generation stops at the end of the context.
    let mut fits = chat_body();
    fits["messages"][0]["content"] =
        json!("the quick brown fox jumps over the lazy dog ".repeat(20));
    fits["max_tokens"] = json!(256);
    let r = s.chat(fits).await;
    let used = r["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used <= 256, "{r}");
    if r["choices"][0]["finish_reason"] == "length" {
        assert_eq!(used, 256, "{r}");
    }
}

#[tokio::test]
async fn unsupported_features_are_refused_clearly() {
    let s = Server::start(&[]).await;
    for (field, value) in [("logprobs", json!(true))] {
        let mut body = chat_body();
        body[field] = value;
        let (st, b) = s.post("/v1/chat/completions", &body).await;
        let e = error_of(st, &b, 400);
        assert_eq!(e["param"], field);
        assert!(e["message"].as_str().unwrap().contains("not supported"));
    }
    // Fields we ignore (OpenAI clients send them) do not break a request.
    let mut body = chat_body();
    body["user"] = json!("someone");
    body["metadata"] = json!({"k": "v"});
    body["response_format"] = json!({"type": "text"});
    body["tools"] = json!([]);
    body["logprobs"] = json!(false);
    let (st, _) = s.post("/v1/chat/completions", &body).await;
    assert_eq!(st, 200);
}
