//! Ollama's native API against the real binary and the real SmolLM2: the same answers as the
//! OpenAI endpoints, NDJSON streaming, the catalogue, the store, and Ollama's bad-input rules.

mod common;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use common::Server;

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn root_and_version_answer_like_ollama() {
    let s = Server::start(&[]).await;
    let r = s.client.get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "Ollama is running");
    let head = s.client.head(s.url("/")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let (status, v) = s.get_json("/api/version").await;
    assert_eq!(status, 200);
    assert!(v["version"].as_str().unwrap().starts_with("0."), "{v}");
}

#[tokio::test]
async fn generate_streams_ndjson_and_matches_the_non_streamed_answer() {
    let s = Server::start(&[]).await;
    let body = json!({"model": "smollm2", "prompt": "Name a color.", "options": {"temperature": 0.7, "seed": 7, "num_predict": 20}});
    let (status, ctype, objects) = s.ndjson("/api/generate", &body).await;
    assert_eq!(status, 200);
    assert_eq!(ctype, "application/x-ndjson");
    let (last, pieces) = objects.split_last().unwrap();
    assert!(pieces
        .iter()
        .all(|o| o["done"] == false && o["model"] == "smollm2"));
    let streamed: String = pieces
        .iter()
        .map(|o| o["response"].as_str().unwrap())
        .collect();
    assert_eq!(last["done"], true);
    for field in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ] {
        assert!(last[field].is_u64(), "{field} missing: {last}");
    }
    assert!(last["eval_duration"].as_u64().unwrap() > 0);
    assert!(last["total_duration"].as_u64().unwrap() >= last["eval_duration"].as_u64().unwrap());

    let mut once = body.clone();
    once["stream"] = json!(false);
    let (status, one) = s.post("/api/generate", &once).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["response"].as_str().unwrap(), streamed);
    assert_eq!(one["done_reason"], last["done_reason"]);
    assert_eq!(one["eval_count"], last["eval_count"]);
    assert_eq!(one["prompt_eval_count"], last["prompt_eval_count"]);
}

#[tokio::test]
async fn chat_gives_the_same_answer_as_the_openai_endpoint() {
    let s = Server::start(&[]).await;
    let messages = json!([
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What color is the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"}
    ]);
    let (status, ollama) = s
        .post("/api/chat", &json!({"model": "smollm2", "messages": messages, "stream": false, "options": {"temperature": 0, "num_predict": 16}}))
        .await;
    assert_eq!(status, 200, "{ollama}");
    assert_eq!(ollama["message"]["role"], "assistant");
    let openai = s
        .chat(json!({"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 16}))
        .await;
    assert_eq!(
        ollama["message"]["content"].as_str().unwrap(),
        common::answer(&openai)
    );
    assert_eq!(
        ollama["prompt_eval_count"],
        openai["usage"]["prompt_tokens"]
    );
    assert_eq!(ollama["eval_count"], openai["usage"]["completion_tokens"]);
}

#[tokio::test]
async fn generate_applies_the_chat_template_unless_raw() {
    let s = Server::start(&[]).await;
    let (_, templated) = s
        .post("/api/generate", &json!({"model": "smollm2", "prompt": "Hi", "system": "Be brief.", "stream": false, "options": {"temperature": 0, "num_predict": 12}}))
        .await;
    let rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    let (_, raw) = s
        .post("/api/generate", &json!({"model": "smollm2", "prompt": rendered, "raw": true, "stream": false, "options": {"temperature": 0, "num_predict": 12}}))
        .await;
    assert_eq!(templated["prompt_eval_count"], raw["prompt_eval_count"]);
    assert_eq!(templated["response"], raw["response"]);
}

#[tokio::test]
async fn options_reach_the_sampler() {
    let s = Server::start(&[]).await;
    let gen = |options: Value| json!({"model": "smollm2", "prompt": "Write a long story about a dragon.", "stream": false, "options": options});
    let (_, short) = s
        .post(
            "/api/generate",
            &gen(json!({"num_predict": 5, "temperature": 0})),
        )
        .await;
    assert_eq!(short["eval_count"], 5);
    assert_eq!(short["done_reason"], "length");
    let (_, a) = s
        .post(
            "/api/generate",
            &gen(json!({"num_predict": 24, "temperature": 1.0, "seed": 1})),
        )
        .await;
    let (_, b) = s
        .post(
            "/api/generate",
            &gen(json!({"num_predict": 24, "temperature": 1.0, "seed": 1})),
        )
        .await;
    let (_, c) = s
        .post(
            "/api/generate",
            &gen(json!({"num_predict": 24, "temperature": 1.0, "seed": 2})),
        )
        .await;
    assert_eq!(a["response"], b["response"]);
    assert_ne!(a["response"], c["response"]);
    // A stop string from the greedy answer ends it there and is not part of it.
    let (_, full) = s
        .post(
            "/api/generate",
            &gen(json!({"num_predict": 24, "temperature": 0})),
        )
        .await;
    let text = full["response"].as_str().unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    let stop = words[words.len() / 2];
    let (_, cut) = s
        .post(
            "/api/generate",
            &gen(json!({"num_predict": 24, "temperature": 0, "stop": [stop]})),
        )
        .await;
    assert_eq!(cut["done_reason"], "stop");
    assert_eq!(
        cut["response"].as_str().unwrap(),
        &text[..text.find(stop).unwrap()]
    );
}

#[tokio::test]
async fn a_prompt_longer_than_num_ctx_is_truncated_as_ollama_does() {
    let s = Server::start(&[]).await;
    let long = "tell me more about the river and the mountain ".repeat(40);
    let (status, r) = s
        .post("/api/generate", &json!({"model": "smollm2", "prompt": long, "stream": false, "options": {"num_ctx": 128, "num_predict": 4, "temperature": 0}}))
        .await;
    assert_eq!(status, 200, "{r}");
    assert!(r["prompt_eval_count"].as_u64().unwrap() < 128, "{r}");
    s.wait_log(&["input truncated"]).await;
    // The OpenAI endpoint keeps OpenAI's rule: too long is an error.
    let (status, _) = s
        .post(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": long.repeat(20), "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn tags_show_and_ps_describe_the_models() {
    let s = Server::start(&[]).await;
    let file = std::fs::read(common::smollm2()).unwrap();
    let (status, tags) = s.get_json("/api/tags").await;
    assert_eq!(status, 200);
    let m = &tags["models"][0];
    assert_eq!(m["name"], "smollm2:latest");
    assert_eq!(m["model"], "smollm2:latest");
    assert_eq!(m["size"], file.len() as u64);
    assert_eq!(m["digest"], sha256_hex(&file));
    assert_eq!(m["details"]["format"], "gguf");
    assert_eq!(m["details"]["family"], "llama");
    assert_eq!(m["details"]["quantization_level"], "Q4_1");
    assert_eq!(m["details"]["parameter_size"], "134.52M");
    assert!(chrono::DateTime::parse_from_rfc3339(m["modified_at"].as_str().unwrap()).is_ok());

    let (status, show) = s.post("/api/show", &json!({"model": "smollm2"})).await;
    assert_eq!(status, 200, "{show}");
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    assert_eq!(show["model_info"]["llama.context_length"], 8192);
    assert_eq!(
        show["model_info"]["general.parameter_count"],
        134_515_008u64
    );
    assert!(show["model_info"]["tokenizer.ggml.tokens"].is_null());
    assert!(show["template"].as_str().unwrap().contains("<|im_start|>"));
    assert!(show["modelfile"].as_str().unwrap().contains("FROM "));
    assert!(show["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("completion")));
    assert_eq!(show["details"]["quantization_level"], "Q4_1");

    let (_, ps) = s.get_json("/api/ps").await;
    let p = &ps["models"][0];
    assert_eq!(p["name"], "smollm2:latest");
    assert_eq!(p["context_length"], 4096);
    assert_eq!(p["size_vram"], 0);
    assert!(
        p["size"].as_u64().unwrap() > file.len() as u64,
        "size includes the KV cache"
    );
    let expires = chrono::DateTime::parse_from_rfc3339(p["expires_at"].as_str().unwrap()).unwrap();
    let left = expires
        .signed_duration_since(chrono::Utc::now())
        .num_seconds();
    assert!(
        (200..=300).contains(&left),
        "the default keep-alive is 5 minutes, {left}s left"
    );
}

#[tokio::test]
async fn an_empty_request_loads_and_keep_alive_zero_unloads() {
    let s = Server::start(&[]).await;
    let (_, r) = s
        .post(
            "/api/generate",
            &json!({"model": "smollm2", "keep_alive": 0}),
        )
        .await;
    assert_eq!(r["done_reason"], "unload");
    assert!(s.running().await.is_empty());
    let (_, r) = s
        .post("/api/chat", &json!({"model": "smollm2", "messages": []}))
        .await;
    assert_eq!(r["done"], true);
    assert_eq!(r["done_reason"], "load");
    assert!(r["load_duration"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(s.running().await, ["smollm2:latest"]);
    // keep_alive 0 with a prompt answers, then unloads.
    let (_, r) = s
        .post("/api/generate", &json!({"model": "smollm2", "prompt": "Hi", "stream": false, "keep_alive": 0, "options": {"num_predict": 3}}))
        .await;
    assert_eq!(r["done"], true);
    wait_until(|| async { s.running().await.is_empty() }).await;
    // The next request loads it again, and says how long that took.
    let (_, r) = s
        .post("/api/generate", &json!({"model": "smollm2", "prompt": "Hi", "stream": false, "options": {"num_predict": 3}}))
        .await;
    assert!(r["load_duration"].as_u64().unwrap() > 0, "{r}");
}

async fn wait_until<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "condition never held");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_idle_model_unloads_when_its_keep_alive_runs_out() {
    let s = Server::start(&[]).await;
    let started = std::time::Instant::now();
    let (_, r) = s
        .post("/api/generate", &json!({"model": "smollm2", "prompt": "Hi", "stream": false, "keep_alive": "1s", "options": {"num_predict": 2}}))
        .await;
    assert_eq!(r["done"], true);
    assert_eq!(s.running().await, ["smollm2:latest"]);
    wait_until(|| async { s.running().await.is_empty() }).await;
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    s.wait_log(&["reason=\"keep_alive\""]).await;
}

#[tokio::test]
async fn max_loaded_one_evicts_the_least_recently_used_model() {
    let gemma = format!("gemma3={}", common::gemma3().display());
    let s = Server::start(&["--model", &gemma, "--max-loaded", "1"]).await;
    let ask = |model: &str| json!({"model": model, "prompt": "Hi", "stream": false, "options": {"num_predict": 2}});
    let (status, _) = s.post("/api/generate", &ask("smollm2")).await;
    assert_eq!(status, 200);
    assert_eq!(s.running().await, ["smollm2:latest"]);
    let (status, r) = s.post("/api/generate", &ask("gemma3")).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(s.running().await, ["gemma3:latest"]);
    let (_, r) = s.post("/api/generate", &ask("smollm2")).await;
    assert!(r["load_duration"].as_u64().unwrap() > 0);
    assert_eq!(s.running().await, ["smollm2:latest"]);
    s.wait_log(&["reason=\"max_loaded\""]).await;
}

#[tokio::test]
async fn with_room_for_two_the_least_recently_used_of_three_makes_way() {
    let gemma = format!("gemma3={}", common::gemma3().display());
    let twin = format!("twin={}", common::smollm2().display());
    let s = Server::start(&["--model", &gemma, "--model", &twin, "--max-loaded", "2"]).await;
    let ask = |model: &str| json!({"model": model, "prompt": "Hi", "stream": false, "options": {"num_predict": 2}});
    let running = || async {
        let mut r = s.running().await;
        r.sort();
        r
    };
    for model in ["smollm2", "gemma3", "smollm2"] {
        let (status, r) = s.post("/api/generate", &ask(model)).await;
        assert_eq!(status, 200, "{r}");
    }
    assert_eq!(running().await, ["gemma3:latest", "smollm2:latest"]);
    // gemma3 was used longest ago, so it goes, though smollm2 was loaded first.
    let (status, r) = s.post("/api/generate", &ask("twin")).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(running().await, ["smollm2:latest", "twin:latest"]);
}

#[tokio::test]
async fn a_models_own_keep_alive_applies_and_a_negative_one_keeps_it_loaded() {
    let cfg = common::models_toml(
        "keep-alive",
        &format!(
            "[models.smollm2]\npath = \"{}\"\nkeep_alive = \"1s\"\n",
            common::smollm2().display()
        ),
    );
    let s = Server::start_raw(&["--config", cfg.to_str().unwrap()]).await;
    let ask = |keep_alive: Value| json!({"model": "smollm2", "prompt": "Hi", "stream": false, "keep_alive": keep_alive, "options": {"num_predict": 2}});
    let (_, r) = s.post("/api/generate", &ask(Value::Null)).await;
    assert_eq!(r["done"], true, "{r}");
    let started = std::time::Instant::now();
    wait_until(|| async { s.running().await.is_empty() }).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "the model's 1s, not the 5m default"
    );
    let (_, r) = s.post("/api/generate", &ask(json!(-1))).await;
    assert_eq!(r["done"], true, "{r}");
    let (_, ps) = s.get_json("/api/ps").await;
    let year: u32 = ps["models"][0]["expires_at"].as_str().unwrap()[..4]
        .parse()
        .unwrap();
    assert!(year > 2200, "never expires, as Ollama shows it: {ps}");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(s.running().await, ["smollm2:latest"]);
}

#[tokio::test]
async fn a_model_answering_a_request_is_never_unloaded_under_it() {
    let gemma = format!("gemma3={}", common::gemma3().display());
    let s = Server::start(&["--model", &gemma, "--max-loaded", "1"]).await;
    s.post("/api/generate", &json!({"model": "smollm2"})).await;
    // A long stream holds smollm2 ...
    let stream = s
        .stream(
            "/v1/chat/completions",
            &json!({"model": "smollm2", "messages": [{"role": "user", "content": "Count."}], "stream": true, "max_tokens": 120, "ignore_eos": true, "temperature": 0}),
        )
        .await;
    let streaming = tokio::spawn(async move {
        let chunks = stream.collect().await;
        (chunks, std::time::Instant::now())
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // ... so gemma3 waits for it instead of evicting it mid-answer.
    let (status, r) = s
        .post("/api/generate", &json!({"model": "gemma3", "prompt": "Hi", "stream": false, "options": {"num_predict": 2}}))
        .await;
    let answered = std::time::Instant::now();
    assert_eq!(status, 200, "{r}");
    let (chunks, stream_ended) = streaming.await.unwrap();
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let finish: Vec<Value> = chunks
        .iter()
        .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    assert!(
        stream_ended <= answered,
        "gemma3 was answered before the stream ended"
    );
    assert_eq!(s.running().await, ["gemma3:latest"]);
}

/// A client can put any GGUF into the store. One that llama.cpp loads but cannot compute
/// (its CPU kernels abort the process at the first decode) fails to load with llama.cpp's
/// reason, in each API's error shape, and the server and its other model go on as before.
/// Records `model` in `store` as Ollama itself writes an entry (a store Ollama filled, which
/// backstop serves as it is): the GGUF and a config as blobs, and the manifest naming them.
fn ollama_store_entry(store: &std::path::Path, model: &str, gguf: &[u8]) {
    let blobs = store.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer = |bytes: &[u8], media: &str| {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(format!("sha256-{hex}")), bytes).unwrap();
        json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": bytes.len()})
    };
    let config = json!({"model_format": "gguf", "model_family": "llama", "model_families": ["llama"], "model_type": "135M", "file_type": "Q4_1", "architecture": "amd64", "os": "linux"});
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": layer(config.to_string().as_bytes(), "application/vnd.docker.container.image.v1+json"),
        "layers": [layer(gguf, "application/vnd.ollama.image.model")],
    });
    let dir = store
        .join("manifests/registry.ollama.ai/library")
        .join(model);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("latest"), manifest.to_string()).unwrap();
}

fn greedy(model: &str) -> Value {
    json!({"model": model, "prompt": "Name a colour.", "stream": false, "options": {"temperature": 0, "num_predict": 8}})
}

/// SmolLM2 gives the greedy answer it gave `before` and is still the only model running.
async fn nothing_else_was_disturbed(s: &Server, before: &Value) {
    let (status, after) = s.post("/api/generate", &greedy("smollm2")).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["response"], before["response"]);
    assert_eq!(s.running().await, ["smollm2:latest"]);
}

#[tokio::test]
async fn creating_a_model_llama_cpp_cannot_compute_is_refused_with_its_reason() {
    let s = Server::start(&[]).await;
    let store = s.store.clone().unwrap();
    let file = std::fs::read(common::uncomputable_gguf()).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&file));
    let up = s
        .client
        .post(s.url(&format!("/api/blobs/{digest}")))
        .body(file)
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 201);
    let (status, before) = s.post("/api/generate", &greedy("smollm2")).await;
    assert_eq!(status, 200, "{before}");

    // Streamed (Ollama's default) or not, the refusal comes before any progress line.
    for stream in [false, true] {
        let (status, r) = s
            .post(
                "/api/create",
                &json!({"model": "odd", "files": {"model.gguf": digest}, "stream": stream}),
            )
            .await;
        assert_eq!(status, 400, "{r}");
        let error = r["error"].as_str().unwrap();
        assert!(error.contains("cannot compute it"), "{r}");
        assert!(error.contains("src1: i32"), "{r}");
        assert!(error.contains("blk.0.attn_norm.weight (i32)"), "{r}");
    }
    assert!(!store
        .join("manifests/registry.ollama.ai/library/odd")
        .exists());
    assert_eq!(s.tags().await, ["smollm2:latest"]);
    let (status, r) = s.post("/api/generate", &greedy("odd")).await;
    assert_eq!(status, 404, "{r}");

    nothing_else_was_disturbed(&s, &before).await;
}

#[tokio::test]
async fn a_stored_model_llama_cpp_cannot_compute_fails_to_load_and_nothing_else_is_disturbed() {
    let s = Server::start(&[]).await;
    let odd = std::fs::read(common::uncomputable_gguf()).unwrap();
    ollama_store_entry(s.store.as_ref().unwrap(), "odd", &odd);
    let (status, before) = s.post("/api/generate", &greedy("smollm2")).await;
    assert_eq!(status, 200, "{before}");

    let (status, r) = s.post("/api/generate", &greedy("odd")).await;
    assert_eq!(status, 500, "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("cannot compute it"), "{r}");
    assert!(error.contains("src1: i32"), "{r}");
    let (status, r) = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "odd", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(status, 500, "{r}");
    assert_eq!(r["error"]["code"], "model_load_failed", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("binary_op"),
        "{r}"
    );

    nothing_else_was_disturbed(&s, &before).await;
}

#[tokio::test]
async fn create_copy_and_delete_go_through_the_store() {
    let s = Server::start(&[]).await;
    let store = s.store.clone().unwrap();
    let file = std::fs::read(common::smollm2()).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&file));
    // Half an upload by a server that is gone (no process has an id past 4194304), and one
    // by a process that runs (this test's): the next upload removes the first.
    let blobs = backstop::models::Store::new(store.clone());
    let dead = blobs.partial_path("upload_99999999_0123").unwrap();
    let running = blobs
        .partial_path(&format!("upload_{}_0123", std::process::id()))
        .unwrap();
    // Both untouched long enough to be taken for abandoned.
    let then = std::time::SystemTime::now() - backstop::models::store::ABANDONED * 2;
    for half in [&dead, &running] {
        std::fs::write(half, &file[..1000]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(half)
            .and_then(|f| f.set_modified(then))
            .unwrap();
    }
    let head = s
        .client
        .head(s.url(&format!("/api/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404);
    let up = s
        .client
        .post(s.url(&format!("/api/blobs/{digest}")))
        .body(file.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 201);
    assert!(!dead.exists() && running.exists());
    std::fs::remove_file(&running).unwrap();
    let head = s
        .client
        .head(s.url(&format!("/api/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);

    let (status, r) = s
        .post("/api/create", &json!({"model": "pirate", "files": {"model.gguf": digest}, "system": "You are a pirate.", "parameters": {"temperature": 0, "num_predict": 12}, "stream": false}))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["status"], "success");
    assert!(store
        .join("manifests/registry.ollama.ai/library/pirate/latest")
        .is_file());
    let (_, show) = s.post("/api/show", &json!({"model": "pirate"})).await;
    assert_eq!(show["system"], "You are a pirate.");
    assert!(
        show["parameters"].as_str().unwrap().contains("temperature"),
        "{show}"
    );
    // The stored defaults apply: the same as asking smollm2 with that system prompt.
    let (_, mine) = s
        .post(
            "/api/generate",
            &json!({"model": "pirate", "prompt": "Hello", "stream": false}),
        )
        .await;
    let (_, explicit) = s
        .post("/api/generate", &json!({"model": "smollm2", "prompt": "Hello", "system": "You are a pirate.", "stream": false, "options": {"temperature": 0, "num_predict": 12}}))
        .await;
    assert_eq!(mine["response"], explicit["response"]);

    let (status, _) = s
        .post(
            "/api/copy",
            &json!({"source": "pirate", "destination": "crew/pirate:v2"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        s.tags().await,
        ["crew/pirate:v2", "pirate:latest", "smollm2:latest"]
    );

    let del = s
        .client
        .delete(s.url("/api/delete"))
        .json(&json!({"model": "pirate"}))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let (status, _) = s.post("/api/generate", &json!({"model": "crew/pirate:v2", "prompt": "Hi", "stream": false, "options": {"num_predict": 2}})).await;
    assert_eq!(status, 200, "the copy outlives the original");
    let del = s
        .client
        .delete(s.url("/api/delete"))
        .json(&json!({"model": "crew/pirate:v2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let blobs: Vec<_> = std::fs::read_dir(store.join("blobs"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        blobs.is_empty(),
        "unreferenced blobs are removed: {blobs:?}"
    );

    // `from` an existing model, no upload needed.
    let (status, r) = s
        .post("/api/create", &json!({"model": "terse", "from": "smollm2", "system": "Answer in one word.", "stream": false}))
        .await;
    assert_eq!(status, 200, "{r}");
    let (_, show) = s.post("/api/show", &json!({"model": "terse"})).await;
    assert_eq!(show["system"], "Answer in one word.");
}

#[tokio::test]
async fn bad_input_gets_ollamas_error_shape_and_status() {
    let s = Server::start(&[]).await;
    let err = |v: &Value| v["error"].as_str().unwrap_or_default().to_owned();
    let (status, r) = s
        .post("/api/generate", &json!({"model": "nope", "prompt": "hi"}))
        .await;
    assert_eq!(status, 404);
    assert_eq!(err(&r), "model 'nope' not found");
    let (status, r) = s
        .post(
            "/api/chat",
            &json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(
        (status, err(&r)),
        (404, "model 'nope' not found".to_owned())
    );
    let (status, r) = s.post("/api/generate", &json!({"prompt": "hi"})).await;
    assert_eq!(status, 400, "{r}");
    let (status, r) = s
        .post(
            "/api/generate",
            &json!({"model": "smollm2", "prompt": "hi", "keep_alive": "soon"}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(err(&r).contains("keep_alive"), "{r}");
    let (status, r) = s
        .post(
            "/api/generate",
            &json!({"model": "smollm2", "prompt": "hi", "options": {"temperature": "hot"}}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(err(&r).contains("options.temperature"), "{r}");
    let (status, r) = s.post("/api/chat", &json!({"model": "smollm2", "messages": [{"role": "user", "content": "x", "images": ["aGVsbG8="]}]})).await;
    assert_eq!(status, 400);
    assert!(err(&r).contains("images"), "{r}");
    let (status, _) = s.post_raw("/api/chat", b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    for bad in ["../../etc/passwd", "a/../../b", "/etc/passwd", "x/y/z/w"] {
        let (status, r) = s.post("/api/show", &json!({"model": bad})).await;
        assert_eq!(status, 400, "{bad}: {r}");
        let (status, _) = s
            .post("/api/generate", &json!({"model": bad, "prompt": "x"}))
            .await;
        assert_eq!(status, 400, "{bad}");
        let (status, _) = s
            .post(
                "/api/copy",
                &json!({"source": "smollm2", "destination": bad}),
            )
            .await;
        assert_eq!(status, 400, "{bad}");
        let (status, _) = s
            .post("/api/create", &json!({"model": bad, "from": "smollm2"}))
            .await;
        assert_eq!(status, 400, "{bad}");
        let r = s
            .client
            .delete(s.url("/api/delete"))
            .json(&json!({"model": bad}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let r = s
        .client
        .delete(s.url("/api/delete"))
        .json(&json!({"model": "smollm2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        400,
        "a configured model cannot be deleted through the API"
    );
    let r = s
        .client
        .delete(s.url("/api/delete"))
        .json(&json!({"model": "ghost"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // An upload that does not hash to its name is refused and leaves nothing behind.
    let digest = format!("sha256:{}", sha256_hex(b"the real bytes"));
    let up = s
        .client
        .post(s.url(&format!("/api/blobs/{digest}")))
        .body("other bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 400);
    let blobs = s.store.as_ref().unwrap().join("blobs");
    let left: Vec<_> = std::fs::read_dir(&blobs)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let (status, r) = s
        .post(
            "/api/create",
            &json!({"model": "x", "files": {"m.gguf": digest}}),
        )
        .await;
    assert_eq!(status, 400, "{r}");
    let r = s.client.post(s.url("/api/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Nothing above disturbed the server.
    let (status, _) = s.post("/api/generate", &json!({"model": "smollm2", "prompt": "hi", "stream": false, "options": {"num_predict": 2}})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn foreign_host_names_are_refused_while_bound_to_loopback() {
    let s = Server::start(&[]).await;
    let r = s
        .client
        .get(s.url("/api/tags"))
        .header("host", "evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = s
        .client
        .get(s.url("/api/tags"))
        .header("host", "localhost:11434")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn cors_allows_local_and_configured_origins_only() {
    let s = Server::start(&["--origins", "https://app.example.com"]).await;
    let preflight = |origin: &'static str| {
        s.client
            .request(reqwest::Method::OPTIONS, s.url("/api/chat"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let allow = |r: &reqwest::Response| {
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let r = preflight("http://localhost:3000").await.unwrap();
    assert_eq!(allow(&r).as_deref(), Some("http://localhost:3000"));
    let r = preflight("https://app.example.com").await.unwrap();
    assert_eq!(allow(&r).as_deref(), Some("https://app.example.com"));
    let r = preflight("https://evil.example.com").await.unwrap();
    assert_eq!(allow(&r), None);
}

#[tokio::test]
async fn ollama_variables_are_honoured_and_backstop_ones_win() {
    let model = format!("smollm2={}", common::smollm2().display());
    let s = Server::start_with_env(
        &["--model", &model],
        &[
            ("OLLAMA_CONTEXT_LENGTH", "1024"),
            ("OLLAMA_NUM_PARALLEL", "2"),
            ("BACKSTOP_NUM_PARALLEL", "3"),
            ("OLLAMA_KEEP_ALIVE", "10m"),
        ],
    )
    .await;
    s.post("/api/generate", &json!({"model": "smollm2"})).await;
    let (_, ps) = s.get_json("/api/ps").await;
    assert_eq!(ps["models"][0]["context_length"], 1024);
    let expires =
        chrono::DateTime::parse_from_rfc3339(ps["models"][0]["expires_at"].as_str().unwrap())
            .unwrap();
    let left = expires
        .signed_duration_since(chrono::Utc::now())
        .num_seconds();
    assert!(
        (500..=600).contains(&left),
        "OLLAMA_KEEP_ALIVE=10m: {left}s left"
    );
    assert_eq!(
        s.metric("backstop_slots{model=\"smollm2:latest\"}").await,
        3.0
    );
}

#[tokio::test]
async fn ollama_models_points_at_the_store() {
    let store = common::temp_dir("ollama-models");
    let model = format!("smollm2={}", common::smollm2().display());
    {
        let s = Server::start(&["--models-dir", store.to_str().unwrap()]).await;
        let (status, r) = s
            .post(
                "/api/create",
                &json!({"model": "made-here", "from": "smollm2", "stream": false}),
            )
            .await;
        assert_eq!(status, 200, "{r}");
    }
    let s = Server::start_with_env(
        &["--model", &model],
        &[("OLLAMA_MODELS", store.to_str().unwrap())],
    )
    .await;
    assert_eq!(s.tags().await, ["made-here:latest", "smollm2:latest"]);
    let (status, _) = s.post("/api/generate", &json!({"model": "made-here", "prompt": "Hi", "stream": false, "options": {"num_predict": 2}})).await;
    assert_eq!(status, 200);
    drop(s);
    std::fs::remove_dir_all(&store).ok();
}

/// llama.cpp's own report of a served model's flash attention and KV cache (SmolLM2's unless
/// `path` is given, served as `smollm2`), under Ollama's environment variables.
async fn llama_cpp_context_log(path: Option<std::path::PathBuf>, envs: &[(&str, &str)]) -> String {
    let model = format!("smollm2={}", path.unwrap_or_else(common::smollm2).display());
    let mut envs = envs.to_vec();
    envs.push(("BACKSTOP_LOG", "info,llama-cpp-2=info"));
    let s = Server::start_with_env(&["--model", &model], &envs).await;
    let (status, r) = s
        .post("/api/generate", &json!({"model": "smollm2", "prompt": "Hi", "stream": false, "options": {"num_predict": 4}}))
        .await;
    assert_eq!(status, 200, "{r}");
    // llama.cpp's context lines, then the load's own line.
    s.wait_log(&["flash_attn ", "V (", "flash_attention="])
        .await
}

/// The flash attention llama.cpp made the server's first context with.
fn flash_attn(log: &str) -> &str {
    common::flash_attn_made(log)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no flash_attn line: {log}"))
}

/// On a CPU, flash attention is off unless asked for (Ollama's default), for a model with
/// sliding-window layers too (see `loader::flash_attention` for why); OLLAMA_FLASH_ATTENTION
/// turns it on, and a quantized KV cache (OLLAMA_KV_CACHE_TYPE), which needs it, gets it
/// unasked.
#[tokio::test]
async fn ollama_flash_attention_and_kv_cache_type_reach_llama_cpp() {
    let log = llama_cpp_context_log(None, &[]).await;
    assert_eq!(flash_attn(&log), "disabled", "{log}");
    assert!(log.contains("K (f16)") && log.contains("V (f16)"), "{log}");
    assert!(log.contains("flash_attention=off"), "{log}");

    let log = llama_cpp_context_log(None, &[("OLLAMA_FLASH_ATTENTION", "1")]).await;
    assert_eq!(flash_attn(&log), "enabled", "{log}");
    assert!(log.contains("K (f16)") && log.contains("V (f16)"), "{log}");

    let log = llama_cpp_context_log(None, &[("OLLAMA_KV_CACHE_TYPE", "q8_0")]).await;
    assert_eq!(flash_attn(&log), "enabled", "{log}");
    assert!(
        log.contains("K (q8_0)") && log.contains("V (q8_0)"),
        "{log}"
    );
    assert!(log.contains("flash_attention=on"), "{log}");

    let log = llama_cpp_context_log(Some(common::gemma3()), &[]).await;
    assert_eq!(flash_attn(&log), "disabled", "{log}");
    assert!(log.contains("flash_attention=off"), "{log}");
    let log =
        llama_cpp_context_log(Some(common::gemma3()), &[("OLLAMA_FLASH_ATTENTION", "1")]).await;
    assert_eq!(flash_attn(&log), "enabled", "{log}");
    assert!(log.contains("flash_attention=on"), "{log}");
}

/// `flash_attention` under a model in models.toml sets it for that model alone: the one model
/// that gains from it on a CPU (Gemma 3 270M) gets it beside one that keeps the default.
#[tokio::test]
async fn a_models_own_flash_attention_reaches_llama_cpp_for_that_model_alone() {
    let cfg = common::models_toml(
        "model-flash",
        &format!(
            "[models.smollm2]\npath = \"{}\"\n[models.gemma]\npath = \"{}\"\nflash_attention = true\n",
            common::smollm2().display(),
            common::gemma3().display()
        ),
    );
    let s = Server::start_with_env(
        &["--config", cfg.to_str().unwrap()],
        &[("BACKSTOP_LOG", "info,llama-cpp-2=info")],
    )
    .await;
    for model in ["smollm2", "gemma"] {
        let (status, r) = s
            .post("/api/generate", &json!({"model": model, "prompt": "Hi", "stream": false, "options": {"num_predict": 2}}))
            .await;
        assert_eq!(status, 200, "{r}");
    }
    let loaded_line = |log: &str, model: &str| {
        log.lines()
            .any(|l| l.contains("model loaded") && l.contains(&format!("model={model}:latest ")))
    };
    let log = s
        .wait_log_for(
            |log| loaded_line(log, "gemma") && loaded_line(log, "smollm2"),
            "both models loaded",
        )
        .await;
    let loaded = |model: &str| {
        log.lines()
            .find(|l| l.contains("model loaded") && l.contains(&format!("model={model}:latest ")))
            .unwrap_or_else(|| panic!("{model} not loaded: {log}"))
            .to_owned()
    };
    assert!(loaded("gemma").contains("flash_attention=on"), "{log}");
    assert!(loaded("smollm2").contains("flash_attention=off"), "{log}");
    let mut made = common::flash_attn_made(&log);
    made.sort_unstable();
    assert_eq!(made, ["disabled", "enabled"], "{log}");
}

#[tokio::test]
async fn create_from_a_gguf_path_on_the_server_imports_it() {
    let s = Server::start(&[]).await;
    let path = common::smollm2();
    let (status, r) = s
        .post(
            "/api/create",
            &json!({"model": "local-file", "from": path.to_str().unwrap(), "stream": false}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let (_, tags) = s.get_json("/api/tags").await;
    let entry = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "local-file:latest")
        .cloned()
        .unwrap();
    assert_eq!(entry["size"], std::fs::metadata(&path).unwrap().len());
    let (status, r) = s
        .post(
            "/api/create",
            &json!({"model": "nope", "from": "/etc/hostname"}),
        )
        .await;
    assert_eq!(status, 400, "a file that is not a GGUF is refused: {r}");
}

/// Neither test model has fill-in-the-middle tokens: `suffix` is refused by name, as Ollama
/// does for such models, and the server carries on (the prompt layout for models that have
/// them is unit-tested in src/api/ollama/convert.rs).
#[tokio::test]
async fn suffix_on_a_model_without_fill_in_the_middle_is_a_400() {
    let s = Server::start(&[]).await;
    let (status, r) = s
        .post(
            "/api/generate",
            &json!({"model": "smollm2", "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))", "stream": false}),
        )
        .await;
    assert_eq!(status, 400, "{r}");
    let message = r["error"].as_str().unwrap();
    assert!(
        message.contains("suffix") && message.contains("does not support insert"),
        "{message}"
    );
    let (status, r) = s
        .post(
            "/api/generate",
            &json!({"model": "smollm2", "prompt": "Hi", "stream": false, "options": {"num_predict": 2}}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
}
