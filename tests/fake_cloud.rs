//! The fake cloud itself, seen from a plain HTTP client: each provider answers in its own
//! shapes, and each failure mode looks on the wire the way the router tests rely on.

mod common;

use std::time::{Duration, Instant};

use common::fake_cloud::wire::example_of;
use common::fake_cloud::{FakeCloud, Mode};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn chat(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": text},
    ]})
}

fn message(text: &str) -> Value {
    json!({"model": "claude-3-5-haiku-latest", "max_tokens": 64,
        "messages": [{"role": "user", "content": text}]})
}

fn streamed(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body
}

async fn post_openai(cloud: &FakeCloud, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(cloud.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn post_anthropic(cloud: &FakeCloud, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(cloud.url("/v1/messages"))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// One server-sent event: its `event:` name (if any) and its `data:`.
#[derive(Debug)]
struct Event {
    name: Option<String>,
    data: String,
}

/// Reads SSE events off a response; remembers whether the body ended in an error.
struct Events {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
    failed: bool,
}

impl Events {
    fn new(r: reqwest::Response) -> Events {
        Events {
            body: r.bytes_stream().boxed(),
            buf: String::new(),
            failed: false,
        }
    }

    /// The next event, or None at the end of the body (clean or not).
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let field = |f: &str| {
                    raw.lines()
                        .find_map(|l| l.strip_prefix(f))
                        .map(|v| v.trim_start().to_owned())
                };
                return Some(Event {
                    name: field("event:"),
                    data: field("data:").unwrap_or_default(),
                });
            }
            match self.body.next().await {
                Some(Ok(b)) => self.buf.push_str(std::str::from_utf8(&b).unwrap()),
                Some(Err(_)) => {
                    self.failed = true;
                    return None;
                }
                None => return None,
            }
        }
    }

    async fn all(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }
}

fn json_of(e: &Event) -> Value {
    serde_json::from_str(&e.data).unwrap_or_else(|err| panic!("not JSON: {}: {err}", e.data))
}

/// The concatenated `delta.content` of OpenAI chunks.
fn openai_text(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .filter_map(|e| {
            json_of(e)["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn openai_chat_answers_the_last_user_message_and_echoes_the_model() {
    let cloud = FakeCloud::start().await;
    let r = post_openai(&cloud, &chat("what is the capital of France")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["id"], "chatcmpl-fake-1");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "cloud says: what is the capital of France"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // One input token per word (2 system + 6 user), one output token per chunk (4).
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12})
    );
}

#[tokio::test]
async fn openai_stream_sends_role_then_text_chunks_then_stop_and_done() {
    let cloud = FakeCloud::start().await;
    cloud.set_chunks(3);
    let r = post_openai(&cloud, &streamed(chat("stream me"))).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = Events::new(r).all().await;
    assert_eq!(events.len(), 1 + 3 + 1 + 1, "{events:?}");
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let first = json_of(&events[0]);
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(openai_text(&events), "cloud says: stream me");
    let stop = json_of(&events[4]);
    assert_eq!(stop["choices"][0]["finish_reason"], "stop");
    assert!(stop.get("usage").is_none(), "usage only when asked for");
}

#[tokio::test]
async fn openai_stream_ends_with_a_usage_chunk_when_include_usage_is_set() {
    let cloud = FakeCloud::start().await;
    let mut body = streamed(chat("count me"));
    body["stream_options"] = json!({"include_usage": true});
    let events = Events::new(post_openai(&cloud, &body).await).all().await;
    let n = events.len();
    assert_eq!(events[n - 1].data, "[DONE]");
    let usage = json_of(&events[n - 2]);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(usage["usage"]["prompt_tokens"], 4);
    assert!(json_of(&events[0])["usage"].is_null());
}

#[tokio::test]
async fn openai_forced_function_is_answered_with_a_tool_call() {
    let cloud = FakeCloud::start().await;
    let mut body = chat("weather?");
    body["tools"] = json!([{"type": "function", "function": {"name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
        "required": ["city"]}}}]);
    body["tool_choice"] = json!({"type": "function", "function": {"name": "weather"}});
    let v: Value = post_openai(&cloud, &body).await.json().await.unwrap();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "weather");
    assert_eq!(call["function"]["arguments"], r#"{"city":"x"}"#);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn openai_key_is_checked_as_a_bearer_token_when_one_is_set() {
    let cloud = FakeCloud::start().await;
    cloud.set_key(Some("sk-right"));
    let client = reqwest::Client::new();
    for auth in [None, Some("Bearer sk-wrong")] {
        let mut req = client
            .post(cloud.url("/v1/chat/completions"))
            .json(&chat("hi"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let r = client
        .post(cloud.url("/v1/chat/completions"))
        .bearer_auth("sk-right")
        .json(&chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let models = client
        .get(cloud.url("/v1/models"))
        .bearer_auth("sk-right")
        .send()
        .await
        .unwrap();
    let v: Value = models.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "model");
}

#[tokio::test]
async fn anthropic_message_answers_as_a_message_with_usage() {
    let cloud = FakeCloud::start().await;
    let r = post_anthropic(&cloud, &message("hello cloud")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["id"], "msg_fake_1");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-3-5-haiku-latest");
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "cloud says: hello cloud"}])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"], json!({"input_tokens": 2, "output_tokens": 4}));
}

#[tokio::test]
async fn anthropic_stream_sends_the_exact_event_sequence() {
    let cloud = FakeCloud::start().await;
    cloud.set_chunks(2);
    let r = post_anthropic(&cloud, &streamed(message("hi there"))).await;
    assert_eq!(r.status(), 200);
    let events = Events::new(r).all().await;
    let names: Vec<&str> = events.iter().map(|e| e.name.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    for e in &events {
        assert_eq!(json_of(e)["type"], e.name.as_deref().unwrap());
    }
    let text: String = events[3..5]
        .iter()
        .map(|e| {
            let d = json_of(e);
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, "cloud says: hi there");
    let delta = json_of(&events[6]);
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 2);
    assert_eq!(json_of(&events[0])["message"]["usage"]["input_tokens"], 2);
}

#[tokio::test]
async fn anthropic_requires_the_api_key_and_version_headers() {
    let cloud = FakeCloud::start().await;
    let client = reqwest::Client::new();
    let no_key = client
        .post(cloud.url("/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .json(&message("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let v: Value = no_key.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    let no_version = client
        .post(cloud.url("/v1/messages"))
        .header("x-api-key", "k")
        .json(&message("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_version.status(), 400);
    let v: Value = no_version.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

fn weather_tool() -> Value {
    json!({"name": "weather", "description": "the weather", "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"},
            "hourly": {"type": "boolean"},
            "where": {"type": "object", "properties": {"lat": {"type": "number"},
                "note": {"type": "string"}}, "required": ["lat"]},
            "optional": {"type": "string"}
        },
        "required": ["city", "unit", "days", "hourly", "where"]
    }})
}

fn forced_tool_input() -> Value {
    json!({"city": "x", "unit": "celsius", "days": 1, "hourly": true, "where": {"lat": 1}})
}

#[tokio::test]
async fn anthropic_forced_tool_gets_a_tool_use_built_from_its_schema() {
    assert_eq!(
        example_of(&weather_tool()["input_schema"]),
        forced_tool_input()
    );
    let cloud = FakeCloud::start().await;
    let mut body = message("weather in Paris?");
    body["tools"] = json!([{"name": "other", "input_schema": {"type": "object"}}, weather_tool()]);
    body["tool_choice"] = json!({"type": "tool", "name": "weather"});
    let v: Value = post_anthropic(&cloud, &body).await.json().await.unwrap();
    assert_eq!(v["stop_reason"], "tool_use");
    let block = &v["content"][0];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["name"], "weather");
    assert_eq!(block["id"], "toolu_fake_1");
    assert_eq!(block["input"], forced_tool_input());
}

#[tokio::test]
async fn anthropic_forced_tool_streams_input_json_deltas_that_join_to_the_input() {
    let cloud = FakeCloud::start().await;
    let mut body = streamed(message("weather?"));
    body["tools"] = json!([weather_tool()]);
    body["tool_choice"] = json!({"type": "tool", "name": "weather"});
    let events = Events::new(post_anthropic(&cloud, &body).await).all().await;
    let start = json_of(&events[1]);
    assert_eq!(start["content_block"]["type"], "tool_use");
    assert_eq!(start["content_block"]["name"], "weather");
    assert_eq!(start["content_block"]["input"], json!({}));
    let joined: String = events
        .iter()
        .filter(|e| e.name.as_deref() == Some("content_block_delta"))
        .map(|e| {
            let d = json_of(e);
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&joined).unwrap(),
        forced_tool_input()
    );
    let delta = events
        .iter()
        .find(|e| e.name.as_deref() == Some("message_delta"))
        .unwrap();
    assert_eq!(json_of(delta)["delta"]["stop_reason"], "tool_use");
}

#[tokio::test]
async fn refused_cloud_is_a_connect_error_and_ok_listens_on_the_same_port_again() {
    let cloud = FakeCloud::start().await;
    // A client with a kept-alive connection must not get through on it either.
    let pooled = reqwest::Client::new();
    let ok = pooled.get(cloud.url("/v1/models")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    ok.bytes().await.unwrap();

    cloud.set_mode(Mode::Refuse);
    let fresh = reqwest::Client::new()
        .get(cloud.url("/v1/models"))
        .send()
        .await
        .unwrap_err();
    assert!(fresh.is_connect(), "{fresh:?}");
    let again = pooled.get(cloud.url("/v1/models")).send().await;
    assert!(again.is_err(), "{again:?}");
    assert!(tokio::net::TcpStream::connect(cloud.addr).await.is_err());
    assert_eq!(
        cloud.request_count(),
        1,
        "nothing reached the refusing cloud"
    );

    cloud.set_mode(Mode::Ok);
    let back = pooled.get(cloud.url("/v1/models")).send().await.unwrap();
    assert_eq!(back.status(), 200);
    assert_eq!(cloud.request_count(), 2);
}

#[tokio::test]
async fn refusing_resets_a_request_already_in_flight() {
    let cloud = FakeCloud::start().await;
    cloud.set_mode(Mode::StallBeforeFirstByte(Duration::from_secs(30)));
    let url = cloud.url("/v1/chat/completions");
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&chat("hi"))
            .send()
            .await
    });
    while cloud.request_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cloud.set_mode(Mode::Refuse);
    let outcome = tokio::time::timeout(Duration::from_secs(2), in_flight)
        .await
        .expect("the stalled request is reset at once, not left hanging")
        .unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
}

#[tokio::test]
async fn status_modes_answer_in_each_providers_error_shape() {
    let cloud = FakeCloud::start().await;
    for (status, openai_type, anthropic_type, retry_after) in [
        (500, "server_error", "api_error", false),
        (503, "server_error", "api_error", true),
        (429, "requests", "rate_limit_error", true),
        (529, "server_error", "overloaded_error", true),
        (400, "invalid_request_error", "invalid_request_error", false),
        (401, "invalid_request_error", "authentication_error", false),
    ] {
        cloud.set_mode(Mode::Status(status));
        for stream in [false, true] {
            let mut body = chat("hi");
            body["stream"] = json!(stream);
            let r = post_openai(&cloud, &body).await;
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers().contains_key("retry-after"), retry_after);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["type"], openai_type, "{status}: {v}");
            assert!(v["error"]["message"].is_string());

            let mut body = message("hi");
            body["stream"] = json!(stream);
            let r = post_anthropic(&cloud, &body).await;
            assert_eq!(r.status().as_u16(), status);
            assert_eq!(r.headers().contains_key("retry-after"), retry_after);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], anthropic_type, "{status}: {v}");
        }
    }
    assert_eq!(cloud.request_count(), 24, "failing requests still reach it");
}

#[tokio::test]
async fn stall_before_first_byte_sends_nothing_and_times_out_a_200ms_client() {
    let cloud = FakeCloud::start().await;
    cloud.set_mode(Mode::StallBeforeFirstByte(Duration::from_secs(5)));
    let started = Instant::now();
    let err = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap()
        .post(cloud.url("/v1/chat/completions"))
        .json(&chat("hi"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // Not even the status line: a raw socket reads nothing.
    let mut tcp = tokio::net::TcpStream::connect(cloud.addr).await.unwrap();
    let body = serde_json::to_string(&chat("hi")).unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf)).await;
    assert!(read.is_err(), "got bytes: {read:?}");
    assert_eq!(cloud.request_count(), 2, "the request was read and logged");
}

#[tokio::test]
async fn stall_mid_stream_sends_headers_and_n_chunks_then_nothing() {
    let cloud = FakeCloud::start().await;
    cloud.set_mode(Mode::StallMidStream {
        after_chunks: 2,
        stall: Duration::from_secs(5),
    });
    let r = post_openai(&cloud, &streamed(chat("one two three"))).await;
    assert_eq!(r.status(), 200);
    let mut events = Events::new(r);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(events.next().await.unwrap());
    }
    assert_eq!(openai_text(&got), "cloud says: ");
    let next = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
    assert!(next.is_err(), "expected a stall, got {next:?}");

    // A whole JSON answer: headers and half the body, then nothing.
    let r = post_anthropic(&cloud, &message("hi")).await;
    assert_eq!(r.status(), 200);
    let declared: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert_eq!(first.len(), declared / 2);
    let next = tokio::time::timeout(Duration::from_millis(300), body.next()).await;
    assert!(next.is_err(), "expected a stall");
}

#[tokio::test]
async fn stall_mid_stream_finishes_the_answer_after_the_stall() {
    let cloud = FakeCloud::start().await;
    cloud.set_mode(Mode::StallMidStream {
        after_chunks: 1,
        stall: Duration::from_millis(100),
    });
    let r = post_anthropic(&cloud, &streamed(message("later"))).await;
    let events = Events::new(r).all().await;
    assert_eq!(events.last().unwrap().name.as_deref(), Some("message_stop"));
}

#[tokio::test]
async fn cut_mid_stream_drops_the_connection_after_n_chunks() {
    let cloud = FakeCloud::start().await;
    cloud.set_mode(Mode::CutMidStream { after_chunks: 2 });
    let r = post_openai(&cloud, &streamed(chat("one two three"))).await;
    assert_eq!(r.status(), 200);
    let mut events = Events::new(r);
    let got = events.all().await;
    assert!(events.failed, "the body must end in an error, not cleanly");
    assert_eq!(got.len(), 3, "role chunk and two text chunks: {got:?}");
    assert_eq!(openai_text(&got), "cloud says: ");

    let r = post_anthropic(&cloud, &streamed(message("hi"))).await;
    let mut events = Events::new(r);
    let names: Vec<String> = events
        .all()
        .await
        .into_iter()
        .filter_map(|e| e.name)
        .collect();
    assert!(events.failed);
    assert_eq!(names.last().unwrap(), "content_block_delta");
    assert!(!names.iter().any(|n| n == "message_stop"));

    // A whole JSON answer: half the promised bytes, then the connection goes.
    let r = post_openai(&cloud, &chat("hi")).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err());
}

#[tokio::test]
async fn garbage_is_not_what_the_content_type_promises() {
    let cloud = FakeCloud::start().await;
    cloud.set_mode(Mode::Garbage);
    let r = post_openai(&cloud, &chat("hi")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let text = r.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    let r = post_anthropic(&cloud, &streamed(message("hi"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    assert!(!text.is_empty());
    for line in text.lines().filter(|l| !l.is_empty()) {
        let payload = line.strip_prefix("data: ");
        assert!(
            payload.is_none_or(|p| serde_json::from_str::<Value>(p).is_err()),
            "{line}"
        );
    }
}

#[tokio::test]
async fn chunk_delay_spaces_the_chunks_and_answer_delay_holds_the_answer() {
    let cloud = FakeCloud::start().await;
    cloud.set_chunks(3);
    cloud.set_chunk_delay(Duration::from_millis(60));
    let started = Instant::now();
    let events = Events::new(post_openai(&cloud, &streamed(chat("slow"))).await)
        .all()
        .await;
    assert_eq!(openai_text(&events), "cloud says: slow");
    assert!(started.elapsed() >= Duration::from_millis(120));

    cloud.set_chunk_delay(Duration::ZERO);
    cloud.set_answer_delay(Duration::from_millis(150));
    let started = Instant::now();
    let r = post_openai(&cloud, &chat("late")).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn request_log_shows_what_the_cloud_received() {
    let cloud = FakeCloud::start().await;
    post_anthropic(&cloud, &message("first")).await;
    post_openai(&cloud, &chat("second")).await;
    assert_eq!(cloud.request_count(), 2);
    let log = cloud.requests();
    assert_eq!(log[0].path, "/v1/messages");
    assert_eq!(log[0].method, "POST");
    assert_eq!(log[0].header("X-Api-Key"), Some("sk-ant-test"));
    assert_eq!(log[0].body["messages"][0]["content"], "first");
    let last = cloud.last_request().unwrap();
    assert_eq!(last.path, "/v1/chat/completions");
    assert_eq!(last.body["model"], "gpt-4o-mini");
    cloud.clear_requests();
    assert_eq!(cloud.request_count(), 0);
    assert!(cloud.requests().is_empty());
    let v: Value = post_openai(&cloud, &chat("third"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["id"], "chatcmpl-fake-1", "ids count from the last clear");
}

#[tokio::test]
async fn control_endpoint_switches_modes() {
    let cloud = FakeCloud::start().await;
    let control = cloud.serve_control().await;
    let client = reqwest::Client::new();
    let set = |base: String, body: Value| {
        let client = client.clone();
        async move {
            client
                .post(format!("{base}/_control"))
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };

    let r = set(cloud.base.clone(), json!({"mode": "status", "status": 503})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(cloud.mode(), Mode::Status(503));
    assert_eq!(post_openai(&cloud, &chat("hi")).await.status(), 503);

    let r = set(
        control.clone(),
        json!({"mode": "stall_mid_stream", "after_chunks": 1, "stall_ms": 250}),
    )
    .await;
    let state: Value = r.json().await.unwrap();
    assert_eq!(state["mode"], "stall_mid_stream");
    assert_eq!(state["requests"], 1);
    assert_eq!(
        cloud.mode(),
        Mode::StallMidStream {
            after_chunks: 1,
            stall: Duration::from_millis(250)
        }
    );

    // `refuse` through the port that would stop listening is turned down...
    let r = set(cloud.base.clone(), json!({"mode": "refuse"})).await;
    assert_eq!(r.status(), 409);
    // ...and works through the control port, which also brings the cloud back.
    set(control.clone(), json!({"mode": "refuse"})).await;
    let err = reqwest::Client::new()
        .get(cloud.url("/v1/models"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    set(
        control.clone(),
        json!({"mode": "ok", "chunks": 1, "key": "k2"}),
    )
    .await;
    let r = client
        .post(cloud.url("/v1/chat/completions"))
        .bearer_auth("k2")
        .json(&streamed(chat("back")))
        .send()
        .await
        .unwrap();
    let events = Events::new(r).all().await;
    assert_eq!(events.len(), 1 + 1 + 1 + 1, "one text chunk: {events:?}");

    let log: Value = client
        .get(format!("{control}/_control/log"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths: Vec<&str> = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/v1/chat/completions", "/v1/chat/completions"]);

    let r = set(control.clone(), json!({"mode": "sideways"})).await;
    assert_eq!(r.status(), 400);
    let r = set(control, json!({"mode": "ok", "colour": "red"})).await;
    assert_eq!(r.status(), 400);
}
