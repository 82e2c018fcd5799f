//! Cloud-first routing against a fake cloud on loopback that fails in each way a real one
//! does: every failure class fails over to the local SmolLM2, streamed or not; the caller's
//! own errors do not; a stream that already sent tokens ends with an error event; the breaker
//! opens, probes and closes; contingency sends everything local.

mod common;

use std::time::Duration;

use common::fake_cloud::{FakeCloud, Mode};
use common::Server;
use serde_json::{json, Value};

/// A server with SmolLM2 and one OpenAI upstream at the fake, serving `gpt-4o-mini`.
async fn routed(
    fake: &FakeCloud,
    breaker_failures: u32,
    extra: &str,
    env: &[(&str, &str)],
) -> Server {
    let cfg = common::models_toml(
        "router",
        &format!(
            r#"
[models.smollm2]
path = "{model}"

[router.breaker]
failures = {breaker_failures}
cooldown = "1s"

[[router.upstreams]]
name = "fakeai"
kind = "openai"
base_url = "{base}/v1"
api_key_env = "FAKE_CLOUD_KEY"
models = ["gpt-4o-mini"]
fallback = "smollm2"
connect_timeout = "500ms"
first_byte_timeout = "400ms"
total_timeout = "1500ms"
model_map = {{ "gpt-4o-mini" = "gpt-4o-mini-2024-07-18" }}
{extra}
"#,
            model = common::smollm2().display(),
            base = fake.base,
        ),
    );
    let mut envs = vec![("FAKE_CLOUD_KEY", "sk-fake")];
    envs.extend_from_slice(env);
    Server::start_with_env(&["--config", cfg.to_str().unwrap()], &envs).await
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, "temperature": 0, "stream": stream})
}

/// Status, the transparency headers, and the answer text (streamed or not).
async fn ask(
    s: &Server,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, [Option<String>; 3], String, Vec<String>) {
    let mut req = s.client.post(s.url("/v1/chat/completions")).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let h = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
    // A whole answer, the cloud's or the local model's, goes out with its length.
    let length = (body["stream"] != true).then(|| h("content-length").expect("Content-Length"));
    let marks = [
        h("x-backstop-backend"),
        h("x-backstop-upstream"),
        h("x-backstop-failover"),
    ];
    let text = r.text().await.unwrap();
    if let Some(length) = length {
        assert_eq!(length, text.len().to_string());
    }
    if body["stream"] == true && status == 200 {
        let events: Vec<String> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
            .collect();
        let content = common::chat_text(&events);
        return (status, marks, content, events);
    }
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, marks, content, vec![text])
}

fn some(v: &str) -> Option<String> {
    Some(v.to_owned())
}

#[tokio::test]
async fn the_cloud_answers_while_it_is_up_and_says_so() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 3, "", &[]).await;
    for stream in [false, true] {
        let (status, marks, text, bodies) = ask(&s, &chat(stream), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(marks, [some("cloud"), some("fakeai"), None]);
        assert_eq!(text, "cloud says: hello there");
        if !stream {
            // The whole answer is passed on as the cloud sent it: pretty-printed, as OpenAI
            // (and the fake) send it, not parsed and written again.
            let sent: Value = serde_json::from_str(&bodies[0]).unwrap();
            assert_eq!(bodies[0], serde_json::to_string_pretty(&sent).unwrap());
        }
    }
    // Both answers' token counts (the fake's usage: 2 in, 4 out) reach the request's record,
    // the whole one's read from the forwarded bytes. The line is written once the body is
    // sent, so it may trail the answer by a moment.
    let counted = "prompt_tokens=2 completion_tokens=4";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.log().matches(counted).count() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.log().matches(counted).count(), 2, "{}", s.log());
    let sent = fake.last_request().unwrap();
    assert_eq!(
        sent.body["model"], "gpt-4o-mini-2024-07-18",
        "model_map renames for the upstream"
    );
    assert_eq!(sent.header("authorization"), Some("Bearer sk-fake"));
    assert!(
        !s.log().contains("sk-fake"),
        "the secret never reaches the log"
    );
    // Models no upstream serves stay local and unmarked.
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-backstop-backend").is_none());
}

#[tokio::test]
async fn every_failure_class_fails_over_to_the_local_model_streamed_or_not() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 1000, "", &[]).await;
    let local = {
        let (_, _, text, _) = ask(&s, &chat(false), &[("x-backstop-route", "local")]).await;
        text
    };
    assert!(!local.is_empty() && !local.starts_with("cloud says"));
    let cases = [
        (Mode::Refuse, "connect"),
        (Mode::Status(500), "http_500"),
        (Mode::Status(503), "http_503"),
        (Mode::Status(429), "rate_limited"),
        (Mode::Status(529), "overloaded"),
        (
            Mode::StallBeforeFirstByte(Duration::from_secs(3)),
            "first_byte_timeout",
        ),
        (Mode::Garbage, "malformed"),
        (Mode::CutMidStream { after_chunks: 0 }, "broken"),
    ];
    for (mode, reason) in cases {
        fake.set_mode(mode.clone());
        for stream in [false, true] {
            let (status, marks, text, events) = ask(&s, &chat(stream), &[]).await;
            assert_eq!(status, 200, "{mode:?} stream={stream}");
            assert_eq!(
                marks,
                [some("local"), some("smollm2"), some(reason)],
                "{mode:?} stream={stream}"
            );
            assert_eq!(
                text, local,
                "{mode:?} stream={stream}: the local model's greedy answer"
            );
            if stream {
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            }
        }
    }
    fake.set_mode(Mode::Ok);
    // A stream that stalls after its headers but before any token runs into the total timeout.
    fake.set_mode(Mode::StallMidStream {
        after_chunks: 0,
        stall: Duration::from_secs(5),
    });
    let (_, marks, text, _) = ask(&s, &chat(true), &[]).await;
    assert_eq!(marks[2], some("total_timeout"));
    assert_eq!(text, local);
    // Not streamed: half the JSON, then nothing until the total timeout.
    let (status, marks, text, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        marks,
        [some("local"), some("smollm2"), some("total_timeout")]
    );
    assert_eq!(text, local);
}

#[tokio::test]
async fn upstreams_are_tried_in_order_before_the_local_model() {
    let first = FakeCloud::start().await;
    let backup = FakeCloud::start().await;
    let s = routed(
        &first,
        1000,
        &format!(
            "[[router.upstreams]]\nname = \"backup\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodels = [\"gpt-4o-mini\"]\nfallback = \"smollm2\"\n",
            backup.base
        ),
        &[],
    )
    .await;
    let (_, marks, text, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(marks, [some("cloud"), some("fakeai"), None]);
    assert_eq!(text, "cloud says: hello there");
    assert_eq!(backup.request_count(), 0);
    first.set_mode(Mode::Status(503));
    for stream in [false, true] {
        let (status, marks, text, _) = ask(&s, &chat(stream), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(
            marks,
            [some("cloud"), some("backup"), None],
            "stream={stream}"
        );
        assert_eq!(text, "cloud says: hello there");
    }
    backup.set_mode(Mode::Refuse);
    let (status, marks, text, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(marks, [some("local"), some("smollm2"), some("connect")]);
    assert!(!text.starts_with("cloud says"), "{text}");
}

#[tokio::test]
async fn the_callers_own_errors_come_back_as_they_are() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 1000, "", &[]).await;
    for code in [400u16, 401, 404] {
        fake.set_mode(Mode::Status(code));
        let before = fake.request_count();
        let (status, marks, _, body) = ask(&s, &chat(false), &[]).await;
        assert_eq!(status, code);
        assert_eq!(marks[0], some("cloud"));
        let v: Value = serde_json::from_str(&body[0]).unwrap();
        assert!(
            v["error"]["message"].is_string(),
            "OpenAI's error shape: {v}"
        );
        assert_eq!(fake.request_count(), before + 1);
    }
}

#[tokio::test]
async fn a_stream_that_already_sent_tokens_ends_with_an_error_event_and_is_not_restarted() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 1000, "", &[]).await;
    fake.set_chunks(4);
    for mode in [
        Mode::CutMidStream { after_chunks: 2 },
        Mode::StallMidStream {
            after_chunks: 2,
            stall: Duration::from_secs(5),
        },
    ] {
        fake.set_mode(mode.clone());
        let (status, marks, text, events) = ask(&s, &chat(true), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(marks[0], some("cloud"), "{mode:?}");
        assert!(text.starts_with("cloud says"), "{mode:?}: {text}");
        assert_ne!(text, "cloud says: hello there", "{mode:?}: cut short");
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(
            last["error"]["type"], "server_error",
            "{mode:?}: {events:?}"
        );
        assert!(!events.contains(&"[DONE]".to_owned()));
    }
}

#[tokio::test]
async fn the_breaker_opens_sends_requests_local_at_once_then_probes_and_closes() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 2, "", &[]).await;
    fake.set_mode(Mode::Status(503));
    for _ in 0..2 {
        let (_, marks, _, _) = ask(&s, &chat(false), &[]).await;
        assert_eq!(marks[2], some("http_503"));
    }
    assert_eq!(fake.request_count(), 2);
    let (_, router) = s.get_json("/admin/router").await;
    assert_eq!(router["upstreams"][0]["breaker"], "open");
    // Open: no cloud attempt at all.
    let (_, marks, _, _) = ask(&s, &chat(true), &[]).await;
    assert_eq!(
        marks,
        [some("local"), some("smollm2"), some("breaker_open")]
    );
    assert_eq!(
        fake.request_count(),
        2,
        "the open breaker sends nothing to the cloud"
    );
    assert_eq!(
        s.metric("backstop_breaker_state{upstream=\"fakeai\"}")
            .await,
        2.0
    );
    // After the cooldown one probe goes out; it fails, so the breaker opens again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, marks, _, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(marks[2], some("http_503"));
    assert_eq!(fake.request_count(), 3);
    let (_, marks, _, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(marks[2], some("breaker_open"));
    // The cloud recovers: the next probe succeeds and closes the breaker by itself.
    fake.set_mode(Mode::Ok);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, marks, text, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(marks[0], some("cloud"));
    assert_eq!(text, "cloud says: hello there");
    let (_, router) = s.get_json("/admin/router").await;
    assert_eq!(router["upstreams"][0]["breaker"], "closed");
    assert!(
        s.metric("backstop_failovers_total{upstream=\"fakeai\",reason=\"breaker_open\"}")
            .await
            >= 2.0
    );
}

#[tokio::test]
async fn contingency_by_environment_admin_api_and_header() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 3, "", &[("BACKSTOP_CONTINGENCY", "1")]).await;
    let (_, marks, _, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(marks, [some("local"), some("smollm2"), some("contingency")]);
    assert_eq!(fake.request_count(), 0, "nothing leaves the building");
    let (_, c) = s.get_json("/admin/contingency").await;
    assert_eq!(
        (c["enabled"].clone(), c["source"].clone()),
        (json!(true), json!("environment"))
    );
    // The header cannot override contingency.
    let (_, marks, _, _) = ask(&s, &chat(false), &[("x-backstop-route", "cloud")]).await;
    assert_eq!(marks[0], some("local"));

    let (status, c) = s
        .post("/admin/contingency", &json!({"enabled": false}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (c["enabled"].clone(), c["source"].clone()),
        (json!(false), json!("admin"))
    );
    let (_, marks, _, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(marks[0], some("cloud"));
    let (_, marks, _, _) = ask(&s, &chat(false), &[("x-backstop-route", "local")]).await;
    assert_eq!(marks, [some("local"), some("smollm2"), some("requested")]);
    let (status, _, _, _) = ask(&s, &chat(false), &[("x-backstop-route", "sideways")]).await;
    assert_eq!(status, 400);
    let (status, _) = s
        .post("/admin/contingency", &json!({"enabled": "yes"}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(s.metric("backstop_contingency").await, 0.0);
}

#[tokio::test]
async fn contingency_switched_on_for_a_while_ends_by_itself() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 3, "", &[]).await;
    let (status, c) = s
        .post("/admin/contingency", &json!({"enabled": true, "for": "1s"}))
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(
        (c["enabled"].clone(), c["source"].clone()),
        (json!(true), json!("admin"))
    );
    let until = chrono::DateTime::parse_from_rfc3339(c["until"].as_str().unwrap()).unwrap();
    let ahead = until
        .signed_duration_since(chrono::Utc::now())
        .num_milliseconds();
    assert!(
        (-1000..=1500).contains(&ahead),
        "until is about a second ahead: {ahead} ms"
    );
    let (_, marks, _, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(marks[2], some("contingency"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, c) = s.get_json("/admin/contingency").await;
    assert_eq!(
        (
            c["enabled"].clone(),
            c["source"].clone(),
            c["until"].clone()
        ),
        (json!(false), json!("expiry"), Value::Null)
    );
    let (_, marks, _, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(marks[0], some("cloud"));
    assert_eq!(s.metric("backstop_contingency").await, 0.0);
    // Switched on again without `for`, it stays, whatever time it had before.
    s.post("/admin/contingency", &json!({"enabled": true, "for": "1s"}))
        .await;
    let (_, c) = s
        .post("/admin/contingency", &json!({"enabled": true}))
        .await;
    assert_eq!(
        (c["enabled"].clone(), c["until"].clone()),
        (json!(true), Value::Null)
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, c) = s.get_json("/admin/contingency").await;
    assert_eq!(c["enabled"], true);
    // `for` is a positive duration, and only for switching on.
    for bad in [
        json!({"enabled": false, "for": "1s"}),
        json!({"enabled": true, "for": "soon"}),
        json!({"enabled": true, "for": "-5m"}),
        json!({"enabled": true, "for": "0s"}),
        json!({"enabled": true, "for": 30}),
        json!({"enabled": true, "for": "99999999999999999999h"}),
    ] {
        let (status, v) = s.post("/admin/contingency", &bad).await;
        assert_eq!(status, 400, "{bad} -> {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("for"),
            "{v}"
        );
    }
    let (_, c) = s.get_json("/admin/contingency").await;
    assert_eq!(
        (c["enabled"].clone(), c["until"].clone()),
        (json!(true), Value::Null),
        "a refused switch changes nothing"
    );
}

#[tokio::test]
async fn local_only_mode_and_a_missing_fallback() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 3, "", &[]).await;
    drop(s);
    // mode = "local-only" in the file.
    let cfg = common::models_toml(
        "router-local-only",
        &format!(
            "[models.smollm2]\npath = \"{}\"\n[router]\nmode = \"local-only\"\n[[router.upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodels = [\"gpt-4o-mini\"]\nfallback = \"smollm2\"\n[[router.upstreams]]\nname = \"b\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodels = [\"gpt-4.1\"]\nfirst_byte_timeout = \"300ms\"\n",
            common::smollm2().display(),
            fake.base,
            fake.base
        ),
    );
    let s = Server::start_raw(&["--config", cfg.to_str().unwrap()]).await;
    let (_, marks, _, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(marks[2], some("contingency"));
    s.post("/admin/contingency", &json!({"enabled": false}))
        .await;
    // An upstream without a fallback that fails: a 502 naming why, in OpenAI's shape.
    fake.set_mode(Mode::Status(503));
    let mut body = chat(false);
    body["model"] = json!("gpt-4.1");
    let (status, _, _, text) = ask(&s, &body, &[]).await;
    assert_eq!(status, 502);
    let v: Value = serde_json::from_str(&text[0]).unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("http_503"),
        "{v}"
    );
}

/// `backstop drill` is a blocking child process while the fake cloud lives on this runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_passes_when_failover_and_recovery_work_and_fails_when_they_do_not() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 3, "", &[]).await;
    let drill = |s: &Server| {
        std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
            .args(["drill", "--url", &s.base, "--requests", "2"])
            .output()
            .unwrap()
    };
    let out = drill(&s);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("[pass]").count(), 5, "{text}");
    assert!(text.contains("answered by local (smollm2)"), "{text}");
    assert!(text.contains("answered by cloud (fakeai)"), "{text}");
    let (_, c) = s.get_json("/admin/contingency").await;
    assert_eq!(
        c["enabled"], false,
        "the drill switched the cloud path back on"
    );
    // With the cloud down, recovery cannot be proven: the drill says so and fails.
    fake.set_mode(Mode::Refuse);
    let out = drill(&s);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("[FAIL] the cloud answers again"), "{text}");
    let (_, c) = s.get_json("/admin/contingency").await;
    assert_eq!(c["enabled"], false);
}

/// A drill interrupted with Ctrl-C switches the cloud path back on before it exits, and one
/// killed outright leaves contingency on only for the drill's bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_drill_switches_the_cloud_path_back_on() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 3, "", &[]).await;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["drill", "--url", &s.base, "--requests", "1000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut on = Value::Null;
    for _ in 0..100 {
        let (_, c) = s.get_json("/admin/contingency").await;
        if c["enabled"] == true {
            on = c;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(on["enabled"], true, "the drill switched contingency on");
    // Bounded: a minute and half a minute per request, so a killed drill cannot leave it on.
    let until = chrono::DateTime::parse_from_rfc3339(on["until"].as_str().unwrap()).unwrap();
    let ahead = until
        .signed_duration_since(chrono::Utc::now())
        .num_seconds();
    assert!((30_000..=30_060).contains(&ahead), "{on}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("drill interrupted"), "{text}");
    assert!(
        text.contains("[pass] cloud path switched back on"),
        "{text}"
    );
    let (_, c) = s.get_json("/admin/contingency").await;
    assert_eq!(
        (c["enabled"].clone(), c["until"].clone()),
        (json!(false), Value::Null)
    );
    let (_, marks, _, _) = ask(&s, &chat(false), &[]).await;
    assert_eq!(marks[0], some("cloud"));
}

/// A server whose upstream speaks Anthropic's Messages API.
async fn routed_anthropic(fake: &FakeCloud) -> Server {
    let cfg = common::models_toml(
        "router-anthropic",
        &format!(
            "[models.smollm2]\npath = \"{}\"\n[router.breaker]\nfailures = 1000\n[[router.upstreams]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{}/v1\"\napi_key_env = \"FAKE_ANTHROPIC_KEY\"\nmodels = [\"claude-sonnet\"]\nfallback = \"smollm2\"\nfirst_byte_timeout = \"400ms\"\ntotal_timeout = \"1500ms\"\nmodel_map = {{ \"claude-sonnet\" = \"claude-sonnet-4-5\" }}\n",
            common::smollm2().display(),
            fake.base
        ),
    );
    Server::start_with_env(
        &["--config", cfg.to_str().unwrap()],
        &[("FAKE_ANTHROPIC_KEY", "ak-fake")],
    )
    .await
}

#[tokio::test]
async fn an_anthropic_upstream_is_spoken_to_in_its_own_api_and_answers_in_openais() {
    let fake = FakeCloud::start().await;
    let s = routed_anthropic(&fake).await;
    let body = |stream: bool| {
        json!({"model": "claude-sonnet", "stream": stream, "temperature": 1.5, "stop": ["END"], "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello there"}
        ]})
    };
    for stream in [false, true] {
        let (status, marks, text, events) = ask(&s, &body(stream), &[]).await;
        assert_eq!(status, 200, "{events:?}");
        assert_eq!(marks, [some("cloud"), some("claude"), None]);
        assert_eq!(text, "cloud says: hello there");
        if stream {
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        }
        let sent = fake.last_request().unwrap();
        assert_eq!(sent.path, "/v1/messages");
        assert_eq!(sent.header("x-api-key"), Some("ak-fake"));
        assert!(sent.header("anthropic-version").is_some());
        assert_eq!(sent.body["model"], "claude-sonnet-4-5");
        assert_eq!(sent.body["system"], "Be brief.");
        assert_eq!(sent.body["stop_sequences"], json!(["END"]));
        assert_eq!(
            sent.body["temperature"], 1.0,
            "OpenAI's 0..2 clamped to Anthropic's 0..1"
        );
        assert!(
            sent.body["max_tokens"].as_u64().unwrap() > 0,
            "Anthropic requires max_tokens"
        );
    }
    // Its failures fail over like any other.
    for (mode, reason) in [
        (Mode::Status(529), "overloaded"),
        (Mode::Garbage, "malformed"),
    ] {
        fake.set_mode(mode);
        for stream in [false, true] {
            // Bounded: at temperature 1.5 and no limit, the local model may not stop before
            // its context is full (over 100 s on the 2-core machine, one run in three).
            let mut failing_over = body(stream);
            failing_over["max_tokens"] = json!(16);
            let (status, marks, _, _) = ask(&s, &failing_over, &[]).await;
            assert_eq!(status, 200);
            assert_eq!(
                marks,
                [some("local"), some("smollm2"), some(reason)],
                "stream={stream}"
            );
        }
    }
}

/// Anthropic's named SSE events of a `/v1/messages` stream: (event, data).
fn anthropic_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                }
                if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).ok();
                }
            }
            Some((name?, data?))
        })
        .collect()
}

#[tokio::test]
async fn anthropic_clients_get_anthropic_answers_from_the_cloud_the_local_model_and_a_failover() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 1000, "", &[]).await;
    let message = |model: &str, stream: bool| json!({"model": model, "max_tokens": 8, "stream": stream, "temperature": 0, "system": "Be brief.", "messages": [{"role": "user", "content": "hello there"}]});
    let post = |body: Value| {
        let s = &s;
        async move {
            let r = s
                .client
                .post(s.url("/v1/messages"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let backend = r
                .headers()
                .get("x-backstop-backend")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), backend, r.text().await.unwrap())
        }
    };
    // A cloud (OpenAI) upstream, answered in Anthropic's shape.
    let (status, backend, text) = post(message("gpt-4o-mini", false)).await;
    assert_eq!((status, backend.as_deref()), (200, Some("cloud")));
    let m: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["content"][0]["text"], "cloud says: hello there");
    assert_eq!(m["stop_reason"], "end_turn");
    assert!(m["usage"]["output_tokens"].as_u64().unwrap() > 0);
    // The local model directly, streamed: Anthropic's events in Anthropic's order.
    let (status, backend, text) = post(message("smollm2", true)).await;
    assert_eq!((status, backend), (200, None));
    let events = anthropic_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{names:?}");
    assert_eq!(names.last(), Some(&"message_stop"), "{names:?}");
    assert!(names.contains(&"content_block_delta") && names.contains(&"message_delta"));
    let streamed: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap_or_default())
        .collect();
    let (_, _, whole) = post(message("smollm2", false)).await;
    let whole: Value = serde_json::from_str(&whole).unwrap();
    assert_eq!(
        streamed,
        whole["content"][0]["text"].as_str().unwrap(),
        "streamed and whole agree"
    );
    // The cloud down: the same request is answered locally, still in Anthropic's shape.
    fake.set_mode(Mode::Status(503));
    let (status, backend, text) = post(message("gpt-4o-mini", true)).await;
    assert_eq!((status, backend.as_deref()), (200, Some("local")));
    let names: Vec<String> = anthropic_events(&text)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    // Bad requests get Anthropic's error shape.
    let (status, _, text) =
        post(json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(status, 400, "max_tokens is required");
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let (status, _, text) = post(message("nope", false)).await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["type"],
        "not_found_error"
    );
}

#[tokio::test]
async fn structured_output_reaches_the_cloud_intact_and_the_local_model_honours_it_on_failover() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 1000, "", &[]).await;
    let schema = json!({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000}},
        "required": ["city", "population"], "additionalProperties": false});
    let format = json!({"type": "json_schema",
                        "json_schema": {"name": "city", "strict": true, "schema": schema}});
    let body = |stream: bool| {
        json!({"model": "gpt-4o-mini", "stream": stream, "temperature": 0, "max_tokens": 120,
               "messages": [{"role": "user", "content": "Name a big city, as JSON."}],
               "response_format": format})
    };
    let (status, marks, _, _) = ask(&s, &body(false), &[]).await;
    assert_eq!((status, &marks[0]), (200, &some("cloud")));
    assert_eq!(
        fake.last_request().unwrap().body["response_format"],
        format,
        "the cloud sees the request's own response_format"
    );
    fake.set_mode(Mode::Status(503));
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut answers = Vec::new();
    for stream in [false, true] {
        let (status, marks, text, _) = ask(&s, &body(stream), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(marks, [some("local"), some("smollm2"), some("http_503")]);
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(validator.is_valid(&value), "{text}");
        answers.push(text);
    }
    assert_eq!(answers[0], answers[1]);
}

#[tokio::test]
async fn tools_reach_the_cloud_intact_and_a_forced_call_survives_failover() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 1000, "", &[]).await;
    let tools = json!([{"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                       "required": ["zone"], "additionalProperties": false}}}]);
    let choice = json!({"type": "function", "function": {"name": "get_time"}});
    let body = |stream: bool| {
        json!({"model": "gpt-4o-mini", "stream": stream, "temperature": 0, "max_tokens": 60,
               "messages": [{"role": "user", "content": "What time is it in Berlin?"}],
               "tools": tools, "tool_choice": choice})
    };
    let (status, marks, _, _) = ask(&s, &body(false), &[]).await;
    assert_eq!((status, &marks[0]), (200, &some("cloud")));
    let sent = fake.last_request().unwrap().body;
    assert_eq!((&sent["tools"], &sent["tool_choice"]), (&tools, &choice));
    fake.set_mode(Mode::Status(503));
    let (status, marks, _, raw) = ask(&s, &body(false), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(marks, [some("local"), some("smollm2"), some("http_503")]);
    let v: Value = serde_json::from_str(&raw[0]).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_time");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args["zone"] == "UTC" || args["zone"] == "CET", "{args}");
    let (status, marks, _, events) = ask(&s, &body(true), &[]).await;
    assert_eq!((status, &marks[0]), (200, &some("local")));
    assert!(
        events.iter().any(|e| e.contains("\"tool_calls\"")),
        "{events:?}"
    );
}
