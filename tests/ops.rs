//! Operations against the real binary: `backstop check` in each outcome and its webhook,
//! metrics that move with requests, readiness before and after a model loads, and the
//! structured logs.

mod common;

use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use common::fake_cloud::{FakeCloud, Mode};
use common::Server;
use serde_json::{json, Value};

fn check(args: &[&str]) -> (Option<i32>, Value, String) {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .arg("check")
        .args(args)
        .arg("--json")
        .env_remove("BACKSTOP_HOST")
        .env_remove("OLLAMA_HOST")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_healthy_degraded_or_down_with_the_matching_exit_code() {
    let s = Server::start(&[]).await;
    let (code, r, err) = check(&["--url", &s.base, "--model", "smollm2"]);
    assert_eq!(code, Some(0), "{r} {err}");
    assert_eq!(r["status"], "healthy");
    assert_eq!(r["model"], "smollm2");
    assert!(r["tokens_per_second"].as_f64().unwrap() > 1.0, "{r}");
    // Too slow for the floor: degraded.
    let (code, r, _) = check(&["--url", &s.base, "--min-tps", "1000000"]);
    assert_eq!(code, Some(1));
    assert_eq!(r["status"], "degraded");
    let slow = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "inference")
        .unwrap();
    assert!(
        slow["detail"].as_str().unwrap().contains("below the floor"),
        "{slow}"
    );
    // A required model that is not there: degraded.
    let (code, r, _) = check(&["--url", &s.base, "--model", "nope"]);
    assert_eq!(code, Some(1));
    assert!(
        r["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["check"] == "model nope" && f["detail"] == "missing"),
        "{r}"
    );
    drop(s);
    // Nothing listening: down.
    let (code, r, _) = check(&["--url", "http://127.0.0.1:1"]);
    assert_eq!(code, Some(2));
    assert_eq!(r["status"], "down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_is_degraded() {
    let fake = FakeCloud::start().await;
    fake.set_mode(Mode::Status(503));
    let cfg = common::models_toml(
        "ops-breaker",
        &format!(
            "[models.smollm2]\npath = \"{}\"\n[router.breaker]\nfailures = 1\ncooldown = \"60s\"\n[[router.upstreams]]\nname = \"cloud\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodels = [\"gpt-4o-mini\"]\nfallback = \"smollm2\"\n",
            common::smollm2().display(),
            fake.base
        ),
    );
    let s = Server::start_raw(&["--config", cfg.to_str().unwrap()]).await;
    let (code, _, _) = check(&["--url", &s.base]);
    assert_eq!(code, Some(0));
    s.chat(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).await;
    let (code, r, _) = check(&["--url", &s.base]);
    assert_eq!(code, Some(1));
    assert!(
        r["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["check"] == "upstream cloud"
                && f["detail"].as_str().unwrap().contains("breaker open")),
        "{r}"
    );
}

/// A webhook receiver on loopback: what it was sent.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let store = Arc::clone(&store);
            async move {
                store.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_hears_about_failures_and_with_on_change_only_about_changes() {
    let s = Server::start(&[]).await;
    let (hook, got) = receiver().await;
    let state = common::temp_dir("check-state").join("state.json");
    let state = state.to_str().unwrap();
    // Without --on-change: every unhealthy run alerts, healthy ones do not.
    check(&[
        "--url",
        &s.base,
        "--min-tps",
        "1000000",
        "--webhook",
        &hook,
        "--state",
        state,
    ]);
    check(&["--url", &s.base, "--webhook", &hook, "--state", state]);
    {
        let msgs = got.lock().unwrap();
        assert_eq!(msgs.len(), 1);
        let text = msgs[0]["text"].as_str().unwrap();
        assert!(
            text.contains("DEGRADED") && text.contains("below the floor"),
            "{text}"
        );
        assert!(text.contains(&s.base));
    }
    // With --on-change: the first change alerts, a repeat does not, recovery does.
    let on_change = |tps: &str| {
        check(&[
            "--url",
            &s.base,
            "--min-tps",
            tps,
            "--webhook",
            &hook,
            "--state",
            state,
            "--on-change",
        ])
        .0
    };
    assert_eq!(on_change("1000000"), Some(1));
    assert_eq!(got.lock().unwrap().len(), 2, "healthy -> degraded");
    on_change("1000000");
    assert_eq!(got.lock().unwrap().len(), 2, "still degraded: no news");
    assert_eq!(on_change("0.1"), Some(0));
    let msgs = got.lock().unwrap();
    assert_eq!(msgs.len(), 3, "recovery is news");
    assert!(msgs[2]["text"].as_str().unwrap().contains("HEALTHY"));
    drop(msgs);
    // A change whose alert could not be delivered is not forgotten: the next run sends it.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let (code, _, err) = check(&[
        "--url",
        &s.base,
        "--min-tps",
        "1000000",
        "--webhook",
        &dead,
        "--state",
        state,
        "--on-change",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not delivered"), "{err}");
    assert_eq!(on_change("1000000"), Some(1));
    let msgs = got.lock().unwrap();
    assert_eq!(msgs.len(), 4, "the lost alert came the second time");
    assert!(msgs[3]["text"].as_str().unwrap().contains("DEGRADED"));
}

#[tokio::test]
async fn metrics_move_with_requests() {
    let s = Server::start(&[]).await;
    let before = s.metrics_text().await;
    let requests = |text: &str| {
        common::metric_value(text, "backstop_requests_total{route=\"/v1/chat/completions\",model=\"smollm2\",backend=\"local\",status=\"200\"}")
    };
    let ttft = |text: &str| {
        common::metric_value(
            text,
            "backstop_time_to_first_token_seconds_count{model=\"smollm2:latest\"}",
        )
    };
    for _ in 0..2 {
        s.chat(json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": true})).await;
    }
    s.post("/api/generate", &json!({"model": "nope", "prompt": "x"}))
        .await;
    let after = s.metrics_text().await;
    assert_eq!(requests(&after) - requests(&before), 2.0, "{after}");
    assert_eq!(ttft(&after) - ttft(&before), 2.0);
    assert!(common::metric_value(&after, "backstop_requests_total{route=\"/api/generate\",model=\"\",backend=\"local\",status=\"404\"}") >= 1.0, "failures are counted, without inventing model labels");
    assert!(
        common::metric_value(
            &after,
            "backstop_request_duration_seconds_count{route=\"/v1/chat/completions\"}"
        ) >= 2.0
    );
    assert!(
        common::metric_value(
            &after,
            "backstop_decode_tokens_per_second_count{model=\"smollm2:latest\"}"
        ) >= 2.0
    );
    assert!(
        common::metric_value(
            &after,
            "backstop_model_loads_total{model=\"smollm2:latest\"}"
        ) >= 1.0
    );
    assert_eq!(common::metric_value(&after, "backstop_models_loaded"), 1.0);
    assert_eq!(
        common::metric_value(&after, "backstop_slots{model=\"smollm2:latest\"}"),
        4.0
    );
}

#[tokio::test]
async fn readiness_shows_models_before_and_after_they_load() {
    let s = Server::start(&[]).await;
    let (status, _) = s
        .post(
            "/api/create",
            &json!({"model": "later", "from": "smollm2", "stream": false}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, r) = s.get_json("/health/ready").await;
    assert_eq!(status, 200);
    assert_eq!(r["status"], "ready");
    let later = |r: &Value| {
        r["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "later:latest")
            .cloned()
            .unwrap()
    };
    assert_eq!(later(&r)["loaded"], false);
    assert_eq!(later(&r)["loadable"], true);
    assert_eq!(r["compute"]["backend"], "CPU");
    assert_eq!(r["insecure"], false);
    assert_eq!(r["contingency"]["enabled"], false);
    s.post(
        "/api/generate",
        &json!({"model": "later", "prompt": "hi", "stream": false, "options": {"num_predict": 1}}),
    )
    .await;
    let (_, r) = s.get_json("/health/ready").await;
    assert_eq!(later(&r)["loaded"], true);
    // Liveness is just that.
    let (status, r) = s.get_json("/health").await;
    assert_eq!((status, r), (200, json!({"status": "ok"})));
}

/// `Content-Length`, where the answer has one; `Transfer-Encoding: chunked` is none.
fn content_length(r: &reqwest::Response) -> Option<usize> {
    assert!(
        r.headers().get("transfer-encoding").is_none(),
        "{:?}",
        r.headers()
    );
    r.headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

#[tokio::test]
async fn json_logs_carry_one_line_per_request_with_its_id_and_never_the_prompt() {
    let model = format!("smollm2={}", common::smollm2().display());
    let s = Server::start_with_env(&["--model", &model], &[("BACKSTOP_LOG_FORMAT", "json")]).await;
    let r = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("x-request-id", "trace-me-42")
        .json(&json!({"model": "smollm2", "messages": [{"role": "user", "content": "my private words"}], "max_tokens": 3, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    // The record is written once the body is sent, and holding it back does not turn a whole
    // answer into a chunked one.
    let length = content_length(&r);
    assert_eq!(length, Some(r.text().await.unwrap().len()));
    for path in ["/v1/models", "/api/tags", "/v1/no-such-route"] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        let length = content_length(&r);
        assert_eq!(length, Some(r.text().await.unwrap().len()), "{path}");
    }
    let log = s.wait_log(&["trace-me-42"]).await;
    let line: Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["request_id"] == "trace-me-42")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(line["fields"]["status"], 200);
    assert_eq!(line["fields"]["model"], "smollm2");
    assert_eq!(line["fields"]["completion_tokens"], 3);
    assert!(line["fields"]["duration_ms"].is_u64());
    assert!(
        log.lines().any(|l| l.contains("model ready")),
        "load events are logged"
    );
    assert!(!log.contains("my private words"));
}
