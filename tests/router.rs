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
    let dir = common::temp_dir("router");
    let cfg = dir.join("models.toml");
    std::fs::write(
        &cfg,
        format!(
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
    )
    .unwrap();
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
    let marks = [
        h("x-backstop-backend"),
        h("x-backstop-upstream"),
        h("x-backstop-failover"),
    ];
    let text = r.text().await.unwrap();
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
        let (status, marks, text, _) = ask(&s, &chat(stream), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(marks, [some("cloud"), some("fakeai"), None]);
        assert_eq!(text, "cloud says: hello there");
    }
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
async fn local_only_mode_and_a_missing_fallback() {
    let fake = FakeCloud::start().await;
    let s = routed(&fake, 3, "", &[]).await;
    drop(s);
    // mode = "local-only" in the file.
    let dir = common::temp_dir("router-local-only");
    let cfg = dir.join("models.toml");
    std::fs::write(
        &cfg,
        format!(
            "[models.smollm2]\npath = \"{}\"\n[router]\nmode = \"local-only\"\n[[router.upstreams]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodels = [\"gpt-4o-mini\"]\nfallback = \"smollm2\"\n[[router.upstreams]]\nname = \"b\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodels = [\"gpt-4.1\"]\nfirst_byte_timeout = \"300ms\"\n",
            common::smollm2().display(),
            fake.base,
            fake.base
        ),
    )
    .unwrap();
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
