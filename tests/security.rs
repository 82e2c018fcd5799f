//! Secure by default, proven against the real binary: keys and scopes, per-key policy, rate
//! limits, the client allowlist, TLS and mTLS, the request limits, the audit log, and a
//! bad-input suite that must not disturb the server.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::fake_cloud::FakeCloud;
use common::Server;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

const USER: &str = "bsk_user_secret_for_tests_0123456789";
const ADMIN: &str = "bsk_admin_secret_for_tests_9876543210";
const SMOL: &str = "bsk_smollm2_only_secret_for_tests_555";

/// A models.toml serving SmolLM2 with `[security]` = `extra` (keys for USER, ADMIN and SMOL
/// unless `extra` brings its own).
fn config(extra: &str) -> std::path::PathBuf {
    let dir = common::temp_dir("security");
    let keys = if extra.contains("[[security.keys]]") {
        String::new()
    } else {
        format!(
            "[[security.keys]]\nname = \"user\"\nsha256 = \"{}\"\n[[security.keys]]\nname = \"ops\"\nsha256 = \"{}\"\nscopes = [\"inference\", \"admin\"]\n[[security.keys]]\nname = \"smol-only\"\nsha256 = \"{}\"\nmodels = [\"smollm2\"]\n",
            sha256_hex(USER),
            sha256_hex(ADMIN),
            sha256_hex(SMOL)
        )
    };
    let path = dir.join("models.toml");
    std::fs::write(
        &path,
        format!(
            "[models.smollm2]\npath = \"{}\"\n[models.gemma3]\npath = \"{}\"\n{extra}\n{keys}",
            common::smollm2().display(),
            common::gemma3().display()
        ),
    )
    .unwrap();
    path
}

async fn serve(extra: &str) -> Server {
    let cfg = config(extra);
    Server::start_raw(&["--config", cfg.to_str().unwrap()]).await
}

async fn call(
    s: &Server,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut r = s.client.request(method, s.url(path));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        headers,
    )
}

/// `POST /v1/chat/completions` with `key`.
async fn post_chat(
    s: &Server,
    key: Option<&str>,
    body: Value,
) -> (u16, Value, reqwest::header::HeaderMap) {
    call(
        s,
        reqwest::Method::POST,
        "/v1/chat/completions",
        key,
        Some(body),
    )
    .await
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
}

#[test]
fn a_public_address_needs_keys_or_an_explicit_insecure() {
    let model = format!("m={}", common::smollm2().display());
    let out = common::run_to_exit(
        &["serve", "--host", "0.0.0.0:0", "--model", &model],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("configure API keys") && out.stderr.contains("--insecure"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("listening on"));
}

#[tokio::test]
async fn with_keys_a_public_address_serves_and_insecure_is_loud() {
    let cfg = config("");
    let s = Server::start_raw(&["--config", cfg.to_str().unwrap(), "--host", "0.0.0.0:0"]).await;
    let (status, _, _) = call(&s, reqwest::Method::GET, "/api/tags", Some(USER), None).await;
    assert_eq!(status, 200);
    drop(s);
    let model = format!("smollm2={}", common::smollm2().display());
    let s = Server::start_raw(&["--model", &model, "--host", "0.0.0.0:0", "--insecure"]).await;
    s.wait_log(&["INSECURE"]).await;
    let (status, ready) = s.get_json("/health/ready").await;
    assert_eq!(status, 200);
    assert_eq!(ready["insecure"], true, "{ready}");
}

/// `backstop keys new` prints a secret once and the entry to paste; pasted as printed, the
/// secret opens what its scopes and models allow, and nothing else.
#[tokio::test]
async fn a_key_made_by_keys_new_and_pasted_as_printed_works() {
    let out = common::backstop_command()
        .args([
            "keys",
            "new",
            "--name",
            "ci",
            "--scope",
            "admin",
            "--scope",
            "inference",
        ])
        .args(["--model", "smollm2", "--rpm", "100"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let secret = printed
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("bsk_"))
        .unwrap_or_else(|| panic!("no secret in:\n{printed}"))
        .to_owned();
    assert!(secret.len() >= 40, "{secret}");
    let entry = &printed[printed.find("[[security.keys]]").unwrap()..];
    assert!(
        !entry.contains(&secret),
        "only the digest goes into the file"
    );
    assert!(entry.contains(&sha256_hex(&secret)), "{entry}");
    let cfg = config(entry);
    let s = Server::start_raw(&["--config", cfg.to_str().unwrap()]).await;
    let (status, _, _) = post_chat(&s, Some(&secret), chat("smollm2")).await;
    assert_eq!(status, 200);
    let (status, _, _) = call(
        &s,
        reqwest::Method::GET,
        "/admin/router",
        Some(&secret),
        None,
    )
    .await;
    assert_eq!(status, 200, "the admin scope");
    let (status, _, _) = post_chat(&s, Some(&secret), chat("gemma3")).await;
    assert_eq!(status, 403, "not its model");
    let (status, _, _) = post_chat(&s, Some(&secret[..secret.len() - 1]), chat("smollm2")).await;
    assert_eq!(status, 401);
    // Two keys never come out the same.
    let again = common::backstop_command()
        .args(["keys", "new", "--name", "ci"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&again.stdout).contains(&secret));
}

#[tokio::test]
async fn every_endpoint_but_health_and_root_needs_a_valid_key_in_each_apis_shape() {
    let s = serve("").await;
    for path in ["/health", "/"] {
        let (status, _, _) = call(&s, reqwest::Method::GET, path, None, None).await;
        assert_eq!(status, 200, "{path}");
    }
    let (status, body, _) = post_chat(&s, None, chat("smollm2")).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "missing_api_key");
    let (status, body, _) = call(
        &s,
        reqwest::Method::POST,
        "/api/chat",
        Some("bsk_wrong"),
        Some(chat("smollm2")),
    )
    .await;
    assert_eq!(status, 401);
    assert!(body["error"].is_string(), "Ollama's shape: {body}");
    let (status, body, _) = call(
        &s,
        reqwest::Method::POST,
        "/v1/messages",
        None,
        Some(chat("smollm2")),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "authentication_error");
    for path in [
        "/api/tags",
        "/v1/models",
        "/api/ps",
        "/metrics",
        "/admin/router",
    ] {
        let (status, _, _) = call(&s, reqwest::Method::GET, path, None, None).await;
        assert_eq!(status, 401, "{path}");
    }
    // Bearer and x-api-key both work; a near miss does not.
    let (status, _, _) = post_chat(&s, Some(USER), chat("smollm2")).await;
    assert_eq!(status, 200);
    let r = s
        .client
        .get(s.url("/api/tags"))
        .header("x-api-key", USER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .get(s.url("/api/tags"))
        .header("x-api-key", &USER[..USER.len() - 1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Scopes: inference keys cannot administer.
    for (method, path, body) in [
        (reqwest::Method::GET, "/metrics", None),
        (reqwest::Method::GET, "/admin/router", None),
        (
            reqwest::Method::POST,
            "/admin/contingency",
            Some(json!({"enabled": true})),
        ),
        (
            reqwest::Method::POST,
            "/api/pull",
            Some(json!({"model": "hf.co/a/b"})),
        ),
        (
            reqwest::Method::DELETE,
            "/api/delete",
            Some(json!({"model": "x"})),
        ),
        (
            reqwest::Method::POST,
            "/api/copy",
            Some(json!({"source": "smollm2", "destination": "x"})),
        ),
        (
            reqwest::Method::POST,
            "/api/create",
            Some(json!({"model": "x", "from": "smollm2"})),
        ),
    ] {
        let (status, body, _) = call(&s, method.clone(), path, Some(USER), body.clone()).await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    let (status, _, _) = call(&s, reqwest::Method::GET, "/metrics", Some(ADMIN), None).await;
    assert_eq!(status, 200);
    let (status, _, _) = call(&s, reqwest::Method::GET, "/admin/router", Some(ADMIN), None).await;
    assert_eq!(status, 200);
    // A key limited to one model gets 403 for another, whichever API asks.
    let (status, body, _) = post_chat(&s, Some(SMOL), chat("gemma3")).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "model_not_allowed");
    let (status, _, _) = call(
        &s,
        reqwest::Method::POST,
        "/api/generate",
        Some(SMOL),
        Some(json!({"model": "gemma3", "prompt": "hi"})),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = call(&s, reqwest::Method::POST, "/api/generate", Some(SMOL), Some(json!({"model": "smollm2", "prompt": "hi", "stream": false, "options": {"num_predict": 2}}))).await;
    assert_eq!(status, 200);
    // Secrets never reach the log.
    let log = s.log();
    for secret in [USER, ADMIN, SMOL, "bsk_wrong"] {
        assert!(!log.contains(secret), "a secret leaked into the log");
    }
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_per_key_per_token_and_per_ip() {
    let s = serve(&format!(
        "[security]\nip_rpm = 6\nmetrics_public = true\n[[security.keys]]\nname = \"slow\"\nsha256 = \"{}\"\nrpm = 2\n[[security.keys]]\nname = \"thrifty\"\nsha256 = \"{}\"\ntpm = 40\n",
        sha256_hex(USER),
        sha256_hex(SMOL)
    ))
    .await;
    for _ in 0..2 {
        let (status, _, _) = call(&s, reqwest::Method::GET, "/api/tags", Some(USER), None).await;
        assert_eq!(status, 200);
    }
    let (status, body, headers) =
        call(&s, reqwest::Method::GET, "/api/tags", Some(USER), None).await;
    assert_eq!(status, 429);
    assert!(
        body["error"].as_str().unwrap().contains("rate limit"),
        "{body}"
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    // Tokens: one answer of ~30 prompt + 16 completion tokens uses up a 40-token minute.
    let (status, _, _) = post_chat(&s, Some(SMOL), json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "ignore_eos": true})).await;
    assert_eq!(status, 200);
    let (status, body, _) = post_chat(&s, Some(SMOL), chat("smollm2")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "key_rate_limited");
    // Per client IP, across keys: 6 per minute in all (2 + 1 + 1 + 1 so far, then 1 more).
    let (status, _, _) = call(&s, reqwest::Method::GET, "/health", None, None).await;
    assert_eq!(status, 200, "public endpoints are not counted");
    let mut last = 0;
    for _ in 0..3 {
        last = call(&s, reqwest::Method::GET, "/api/tags", Some(SMOL), None)
            .await
            .0;
    }
    assert_eq!(last, 429);
    assert!(
        s.metric("backstop_rejections_total{reason=\"ip_rate_limited\"}")
            .await
            >= 1.0
    );
}

/// One OpenAI upstream at the fake cloud, serving `gpt-4o-mini` with SmolLM2 as fallback.
fn cloud_upstream(fake: &FakeCloud) -> String {
    format!(
        "[[router.upstreams]]\nname = \"cloud\"\nkind = \"openai\"\nbase_url = \"{}/v1\"\nmodels = [\"gpt-4o-mini\"]\nfallback = \"smollm2\"\n",
        fake.base
    )
}

#[tokio::test]
async fn a_local_only_key_never_reaches_the_cloud() {
    let fake = FakeCloud::start().await;
    let s = serve(&format!(
        "{}[[security.keys]]\nname = \"inside\"\nsha256 = \"{}\"\nlocal_only = true\n[[security.keys]]\nname = \"outside\"\nsha256 = \"{}\"\n",
        cloud_upstream(&fake),
        sha256_hex(SMOL),
        sha256_hex(USER)
    ))
    .await;
    let (status, _, headers) = post_chat(&s, Some(SMOL), chat("gpt-4o-mini")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-backstop-backend"], "local");
    assert_eq!(fake.request_count(), 0);
    let (_, _, headers) = post_chat(&s, Some(USER), chat("gpt-4o-mini")).await;
    assert_eq!(headers["x-backstop-backend"], "cloud");
}

/// The cloud path obeys the same budget as the local one: the max_tokens cap, token counts
/// charged to the key's tpm even when the client did not ask for usage, and the model in
/// the request metrics.
#[tokio::test]
async fn cloud_answers_are_capped_counted_and_charged_like_local_ones() {
    let fake = FakeCloud::start().await;
    let s = serve(&format!(
        "[security]\nmax_tokens = 50\nmetrics_public = true\n{}[[security.keys]]\nname = \"thrifty\"\nsha256 = \"{}\"\ntpm = 20\n",
        cloud_upstream(&fake),
        sha256_hex(SMOL),
    ))
    .await;
    let words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen \
                 fifteen sixteen seventeen eighteen nineteen twenty twenty-one twenty-two";
    let over = json!({"model": "gpt-4o-mini", "max_tokens": 51,
                      "messages": [{"role": "user", "content": "hi"}]});
    let (status, body, _) = post_chat(&s, Some(SMOL), over).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "max_tokens", "{body}");
    assert_eq!(fake.request_count(), 0, "refused before the cloud");

    let streamed = json!({"model": "gpt-4o-mini", "stream": true,
                          "messages": [{"role": "user", "content": words}]});
    let (status, body, headers) = post_chat(&s, Some(SMOL), streamed).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-backstop-backend"], "cloud");
    let text = body.as_str().unwrap();
    assert!(text.contains("cloud says: one two"), "{text}");
    assert!(
        !text.contains("usage"),
        "the client did not ask for usage: {text}"
    );
    let sent = fake.last_request().unwrap().body;
    assert_eq!(sent["max_tokens"], 50, "the cap goes to the cloud: {sent}");
    assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
    // The 22 prompt words and the answer went over the 20-token minute.
    let (status, body, _) = post_chat(&s, Some(SMOL), chat("gpt-4o-mini")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(fake.request_count(), 1);
    assert!(
        s.metric("backstop_requests_total{route=\"/v1/chat/completions\",model=\"gpt-4o-mini\",backend=\"cloud\",status=\"200\"}")
            .await
            >= 1.0,
        "{}",
        s.metrics_text().await
    );
}

#[tokio::test]
async fn clients_outside_the_allowlist_get_403() {
    let s = serve("[security]\nallow_cidrs = [\"10.0.0.0/8\"]\n").await;
    let (status, _, _) = call(&s, reqwest::Method::GET, "/health", None, None).await;
    assert_eq!(status, 403);
    let (status, _, _) = call(&s, reqwest::Method::GET, "/api/tags", Some(USER), None).await;
    assert_eq!(status, 403);
    drop(s);
    let s = serve("[security]\nallow_cidrs = [\"10.0.0.0/8\", \"127.0.0.1\"]\n").await;
    let (status, _, _) = call(&s, reqwest::Method::GET, "/api/tags", Some(USER), None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_max_tokens_cap_and_the_request_timeout_hold() {
    let s = serve("[security]\nmax_tokens = 5\n").await;
    let (status, body, _) = post_chat(&s, Some(USER), json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 6})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 5"),
        "{body}"
    );
    let (status, body, _) = post_chat(&s, Some(USER), json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell a long story."}], "ignore_eos": true})).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["usage"]["completion_tokens"], 5,
        "an answer without max_tokens gets the cap"
    );
    let (_, body, _) = call(
        &s,
        reqwest::Method::POST,
        "/api/generate",
        Some(USER),
        Some(json!({"model": "smollm2", "prompt": "Tell a long story.", "stream": false})),
    )
    .await;
    assert!(body["eval_count"].as_u64().unwrap() <= 5, "{body}");
    drop(s);
    let s = serve("[security]\nrequest_timeout = \"50ms\"\n").await;
    let (status, _, _) = post_chat(&s, Some(USER), json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 200, "ignore_eos": true})).await;
    assert_eq!(status, 408);
    let (status, _, _) = call(&s, reqwest::Method::GET, "/api/version", Some(USER), None).await;
    assert_eq!(status, 200, "the server carries on");
}

/// Writes a partial request and leaves it hanging.
fn slow_client(addr: &str) -> std::net::TcpStream {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_bounded() {
    let s = serve("[security]\nheader_timeout = \"1s\"\nmax_connections = 2\n").await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    // A client that never finishes its headers is disconnected after the header timeout.
    let mut slow = slow_client(&addr);
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // Two hanging clients take both connections: a third waits until one goes.
    let a = slow_client(&addr);
    let _b = slow_client(&addr);
    std::thread::sleep(Duration::from_millis(100));
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    assert!(
        quick.get(s.url("/health")).send().await.is_err(),
        "a third connection is not served while two are held"
    );
    drop(a);
    let r = reqwest::Client::new()
        .get(s.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Reads until the server closes the connection (or `limit` passes); how long that took.
fn time_to_close(c: &mut std::net::TcpStream, limit: Duration) -> Duration {
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    started.elapsed()
}

/// An HTTP/2 client (prior knowledge, no TLS) that opens no stream but answers every ping,
/// as a live but idle peer does; returns how long until the server closed the connection and
/// whether it said `GOAWAY` first.
fn idle_http2_client(addr: &str, limit: Duration) -> (Duration, bool) {
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    c.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).unwrap(); // empty SETTINGS
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = std::time::Instant::now();
    let (mut pending, mut goaway) = (Vec::new(), false);
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        }
        // Whole frames: 3-byte length, type, flags, 4-byte stream id, payload.
        while pending.len() >= 9 {
            let len = (usize::from(pending[0]) << 16)
                | (usize::from(pending[1]) << 8)
                | usize::from(pending[2]);
            if pending.len() < 9 + len {
                break;
            }
            let (kind, flags) = (pending[3], pending[4]);
            if kind == PING && flags & 0x1 == 0 {
                let mut ack = vec![0, 0, 8, PING, 0x1, 0, 0, 0, 0];
                ack.extend_from_slice(&pending[9..17]);
                let _ = c.write_all(&ack);
            }
            goaway |= kind == GOAWAY;
            pending.drain(..9 + len);
        }
    }
    (started.elapsed(), goaway)
}

/// Streams a long answer, reading it slowly (a pause longer than the header timeout after the
/// first chunk); the whole answer's text.
async fn slow_reader(client: &reqwest::Client, s: &Server) -> String {
    use futures_util::StreamExt;
    let r = client
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(USER)
        .json(&json!({"model": "smollm2", "stream": true, "max_tokens": 40, "ignore_eos": true, "temperature": 0,
                      "messages": [{"role": "user", "content": "Tell a long story."}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_request_are_closed_but_slow_answers_are_not() {
    let s = serve("[security]\nheader_timeout = \"1s\"\nmax_connections = 2\n").await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    // A client that connects and sends nothing (so not even its HTTP version is known).
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    let took = time_to_close(&mut silent, Duration::from_secs(5));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // Two silent clients take both connections only until the header timeout.
    let _a = std::net::TcpStream::connect(&addr).unwrap();
    let _b = std::net::TcpStream::connect(&addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let patient = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let r = patient.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}: served while both connections were held",
        started.elapsed()
    );
    // An HTTP/2 connection that answers pings but never asks anything is told GOAWAY.
    let (took, goaway) = idle_http2_client(&addr, Duration::from_secs(5));
    assert!(goaway, "no GOAWAY");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // A request in flight keeps its connection, however long its answer takes to read, on
    // HTTP/1.1 and on HTTP/2.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for client in [&s.client, &h2] {
        let text = slow_reader(client, &s).await;
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        // The role chunk, then the 40 tokens.
        assert_eq!(text.matches("\"content\":").count(), 41, "{text}");
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    dir: std::path::PathBuf,
    ca: String,
    client: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = common::temp_dir("pki");
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client".to_owned()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca: ca.pem(),
        client: format!("{}{}", client.pem(), client_key.serialize_pem()),
    }
}

fn https_client(pki: &Pki, with_cert: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca.as_bytes()).unwrap());
    if with_cert {
        b = b.identity(reqwest::Identity::from_pem(pki.client.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test]
async fn tls_serves_http2_and_http1_and_mtls_needs_a_client_certificate() {
    let pki = pki();
    let cert = pki.dir.join("server.pem");
    let key = pki.dir.join("server.key");
    let model = format!("smollm2={}", common::smollm2().display());
    let s = Server::start_raw(&[
        "--model",
        &model,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .await;
    assert!(s.base.starts_with("https://"), "{}", s.base);
    let r = https_client(&pki, false)
        .get(s.url("/api/tags"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN offers h2");
    let r = reqwest::Client::builder()
        .use_rustls_tls()
        .http1_only()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca.as_bytes()).unwrap())
        .build()
        .unwrap()
        .get(s.url("/api/tags"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    let plain = s.url("/api/tags").replace("https://", "http://");
    assert!(
        !reqwest::get(&plain)
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false),
        "plain HTTP is not served on the TLS port"
    );
    drop(s);

    let ca = pki.dir.join("ca.pem");
    let s = Server::start_raw(&[
        "--model",
        &model,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--client-ca",
        ca.to_str().unwrap(),
    ])
    .await;
    assert!(
        https_client(&pki, false)
            .get(s.url("/api/tags"))
            .send()
            .await
            .is_err(),
        "no client certificate, no connection"
    );
    let r = https_client(&pki, true)
        .get(s.url("/api/tags"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    std::fs::remove_dir_all(&pki.dir).ok();
}

async fn wait_for_lines(path: &std::path::Path, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(path) {
            let lines: Vec<Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            if lines.len() >= n {
                return lines;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the audit log never reached {n} lines");
}

#[tokio::test]
async fn the_audit_log_records_who_what_and_how_much_but_never_prompts_or_secrets() {
    let dir = common::temp_dir("audit");
    let log = dir.join("audit.jsonl");
    let s = serve(&format!("[security]\naudit_log = \"{}\"\n", log.display())).await;
    let messages = json!([{"role": "user", "content": "The secret plan is blue."}]);
    let (status, _, headers) = post_chat(
        &s,
        Some(USER),
        json!({"model": "smollm2", "messages": messages, "max_tokens": 4, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200);
    let id = headers["x-request-id"].to_str().unwrap().to_owned();
    let stream = s
        .client
        .post(s.url("/api/chat"))
        .bearer_auth(ADMIN)
        .json(&json!({"model": "smollm2", "messages": messages, "options": {"num_predict": 3}}))
        .send()
        .await
        .unwrap();
    let _ = stream.text().await.unwrap();
    call(
        &s,
        reqwest::Method::GET,
        "/api/tags",
        Some("bsk_wrong"),
        None,
    )
    .await;
    call(
        &s,
        reqwest::Method::POST,
        "/admin/contingency",
        Some(ADMIN),
        Some(json!({"enabled": false})),
    )
    .await;
    let lines = wait_for_lines(&log, 4).await;
    let first = lines
        .iter()
        .find(|l| l["request_id"] == id.as_str())
        .unwrap();
    assert_eq!(first["key"], "user");
    assert_eq!(first["key_id"], &sha256_hex(USER)[..8]);
    assert_eq!(first["client_ip"], "127.0.0.1");
    assert_eq!(first["model"], "smollm2");
    assert_eq!(first["status"], 200);
    assert_eq!(first["prompt_sha256"], sha256_hex(&messages.to_string()));
    assert_eq!(first["completion_tokens"], 4);
    assert!(first["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(first.get("prompt").is_none());
    let streamed = lines.iter().find(|l| l["path"] == "/api/chat").unwrap();
    assert_eq!(
        streamed["completion_tokens"], 3,
        "a stream's counts are known at its end: {streamed}"
    );
    assert_eq!(streamed["key"], "ops");
    let refused = lines
        .iter()
        .find(|l| l["status"] == 401)
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(refused["key"].is_null());
    let admin = lines
        .iter()
        .find(|l| l["event"] == "contingency")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(admin["detail"], "enabled=false");
    let text = std::fs::read_to_string(&log).unwrap() + &s.log();
    assert!(
        !text.contains("secret plan"),
        "no prompt text in the audit log or the log"
    );
    assert!(!text.contains(USER) && !text.contains(ADMIN), "no secrets");
    drop(s);
    // Prompt text only when asked for.
    let s = serve(&format!(
        "[security]\naudit_log = \"{}\"\naudit_prompts = true\n",
        log.display()
    ))
    .await;
    call(&s, reqwest::Method::POST, "/api/generate", Some(USER), Some(json!({"model": "smollm2", "prompt": "The secret plan is green.", "stream": false, "options": {"num_predict": 1}}))).await;
    let lines = wait_for_lines(&log, 5).await;
    assert!(lines
        .iter()
        .any(|l| l["prompt"] == "The secret plan is green."));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn bad_input_never_disturbs_the_server() {
    let s = serve("[security]\n").await;
    // A fresh connection each time: after refusing a body unread (413), the server closes the
    // connection, and a pooled client could pick that dead connection for the next request.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let send = |body: Vec<u8>, ctype: &'static str| {
        fresh
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(USER)
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(
            send(b"{\"model\": ".to_vec(), "application/json")
                .await
                .unwrap()
        ),
        400
    );
    assert_eq!(
        status(
            send(
                b"{\"model\": \"smollm2\", \"messages\": \"\xff\xfe\"}".to_vec(),
                "application/json"
            )
            .await
            .unwrap()
        ),
        400
    );
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(
        status(send(nested.into_bytes(), "application/json").await.unwrap()),
        400
    );
    assert_eq!(
        status(
            send(vec![b' '; 9 * 1024 * 1024], "application/json")
                .await
                .unwrap()
        ),
        413
    );
    assert_eq!(
        status(
            send(
                b"model=smollm2&prompt=hi".to_vec(),
                "application/x-www-form-urlencoded"
            )
            .await
            .unwrap()
        ),
        400
    );
    assert_eq!(
        status(
            send(b"\0\0\0\0".to_vec(), "application/octet-stream")
                .await
                .unwrap()
        ),
        400
    );
    // A flood of headers is refused by the HTTP layer.
    let mut r = s.client.get(s.url("/api/tags")).bearer_auth(USER);
    for i in 0..200 {
        r = r.header(format!("x-flood-{i}"), "x");
    }
    let flooded = r.send().await;
    assert!(
        flooded.map(|r| r.status().as_u16() == 431).unwrap_or(true),
        "too many headers: 431 or closed"
    );
    // After all that, a normal request is answered.
    let (status, body, _) = post_chat(&s, Some(USER), chat("smollm2")).await;
    assert_eq!(status, 200, "{body}");
}
