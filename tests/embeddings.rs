//! Embeddings through both APIs against the real model: determinism, unit length, meaning,
//! batching, encodings, the legacy endpoint, limits, and that embedding leaves running
//! generations alone.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use common::{chat_text, Server};
use serde_json::{json, Value};

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a vector: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    dot / (norm(a) * norm(b))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `/api/embed` vectors of `input`; panics unless 200.
async fn ollama_embed(s: &Server, input: Value) -> Vec<Vec<f32>> {
    ollama_embed_with(s, "smollm2", input).await
}

/// `/api/embed` vectors of `input` from `model`; panics unless 200.
async fn ollama_embed_with(s: &Server, model: &str, input: Value) -> Vec<Vec<f32>> {
    let (status, body) = s
        .post("/api/embed", &json!({"model": model, "input": input}))
        .await;
    assert_eq!(status, 200, "{body}");
    body["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect()
}

/// `/v1/embeddings` answer; panics unless 200.
async fn openai_embed(s: &Server, body: Value) -> Value {
    let (status, out) = s.post("/v1/embeddings", &body).await;
    assert_eq!(status, 200, "{out}");
    out
}

/// The context length the loaded model reports in `/api/ps`.
async fn context_length(s: &Server) -> u64 {
    let (_, ps) = s.get_json("/api/ps").await;
    ps["models"][0]["context_length"].as_u64().unwrap()
}

#[tokio::test]
async fn embeddings_are_deterministic_and_unit_length() {
    let s = Server::start(&[]).await;
    let (status, body) = s
        .post(
            "/api/embed",
            &json!({"model": "smollm2", "input": "The quick brown fox"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "smollm2");
    assert!(body["prompt_eval_count"].as_u64().unwrap() >= 4);
    assert!(body["total_duration"].as_u64().unwrap() > 0);
    assert!(body["load_duration"].is_u64());
    let first = floats(&body["embeddings"][0]);
    assert_eq!(first.len(), 576, "SmolLM2-135M's hidden size");
    assert!((norm(&first) - 1.0).abs() < 1e-4, "norm {}", norm(&first));

    let again = ollama_embed(&s, json!(["The quick brown fox"])).await;
    assert_eq!(again[0], first, "the same text gives the same vector");

    let out = openai_embed(
        &s,
        json!({"model": "smollm2", "input": "The quick brown fox"}),
    )
    .await;
    assert_eq!(out["object"], "list");
    assert_eq!(out["model"], "smollm2");
    assert_eq!(out["data"][0]["object"], "embedding");
    assert_eq!(out["data"][0]["index"], 0);
    let tokens = out["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(tokens, body["prompt_eval_count"].as_u64().unwrap());
    assert_eq!(out["usage"]["total_tokens"].as_u64().unwrap(), tokens);
    let openai = floats(&out["data"][0]["embedding"]);
    assert!(max_diff(&openai, &first) < 1e-6, "both APIs agree");
}

/// On a CPU the generating context leaves flash attention off by default, and the embedding
/// context turns it on (an empty cache and whole inputs: where its kernel is the faster one);
/// an operator's `--flash-attention 0` holds for both. Either way the vectors are the same
/// but for rounding.
#[tokio::test]
async fn embeddings_take_flash_attention_unless_the_operator_turned_it_off() {
    let mut vectors = Vec::new();
    for (args, embedding) in [
        (&[][..], "flash_attention=on"),
        (&["--flash-attention", "0"][..], "flash_attention=off"),
    ] {
        let s = Server::start(args).await;
        let v = ollama_embed(&s, json!(["The quick brown fox"])).await;
        let log = s.wait_log(&["embedding context created", embedding]).await;
        let loaded = log
            .lines()
            .find(|l| l.contains("model loaded"))
            .expect("a load line");
        assert!(loaded.contains("flash_attention=off"), "{loaded}");
        vectors.extend(v);
    }
    let same = cosine(&vectors[0], &vectors[1]);
    assert!(same > 0.999, "cosine {same}");
    assert!(
        max_diff(&vectors[0], &vectors[1]) > 0.0,
        "two kernels, two roundings"
    );
}

#[tokio::test]
async fn similar_texts_are_closer_than_unrelated_ones() {
    let s = Server::start(&[]).await;
    let v = ollama_embed(
        &s,
        json!([
            "The cat sat on the mat",
            "A cat is sitting on a mat",
            "Quarterly revenue grew 5%"
        ]),
    )
    .await;
    let similar = cosine(&v[0], &v[1]);
    let unrelated = cosine(&v[0], &v[2]);
    assert!(
        similar > unrelated,
        "cat/cat {similar} should exceed cat/revenue {unrelated}"
    );
}

/// Requests of one input each from several clients at once share a decode, as llama.cpp's
/// server puts its slots' inputs in one batch, and each still gets its own text's vector.
#[tokio::test]
async fn concurrent_requests_share_a_decode_and_keep_their_own_vectors() {
    let s = Server::start_with_env(
        &[
            "--model",
            &format!("smollm2={}", common::smollm2().display()),
        ],
        &[("BACKSTOP_LOG", "info,backstop::engine::worker=trace")],
    )
    .await;
    let texts: Vec<String> = (0..4)
        .map(|i| {
            format!(
                "Query {i}: where does the river {} meet the sea?",
                "slowly ".repeat(i)
            )
        })
        .collect();
    let mut alone = Vec::new();
    for text in &texts {
        alone.push(ollama_embed(&s, json!(text)).await.remove(0));
    }
    // Four at once; the first may be decoded before the others arrive, so this is asked
    // again until a decode has taken inputs of two requests or more.
    let shared = |log: &str| {
        log.lines()
            .filter(|l| l.contains("embedding step"))
            .any(|l| !l.contains(" requests=1 "))
    };
    for round in 0.. {
        let together =
            futures_util::future::join_all(texts.iter().map(|t| ollama_embed(&s, json!(t)))).await;
        for (i, (mut got, own)) in together.into_iter().zip(&alone).enumerate() {
            let same = cosine(&got.remove(0), own);
            assert!(same > 0.9999, "round {round}, query {i}: cosine {same}");
        }
        if shared(&s.log()) {
            break;
        }
        assert!(
            round < 20,
            "no decode took two requests' inputs:\n{}",
            s.log()
        );
    }
}

/// An embedding decode leaves out the model's output layer, whose logits pooling never reads
/// (for Gemma 3's 262,144-token vocabulary, most of the work): every decode's trace says
/// so, and the vectors are those of a decode that computes it, to the bit, for both test
/// models' architectures. `BACKSTOP_EMBED_OUTPUT_LAYER=1` computes it, as llama.cpp does.
#[tokio::test]
async fn embeddings_skip_the_output_layer_and_keep_their_vectors_to_the_bit() {
    let texts = json!([
        "a cat",
        "The quick brown fox jumps over the lazy dog.",
        "Rivers carry water from the hills to the sea, and the sea gives it back as rain."
    ]);
    for (name, path) in [("smollm2", common::smollm2()), ("gemma", common::gemma3())] {
        let mut vectors = Vec::new();
        for (env, said) in [
            (&[][..], "output_layer=skipped"),
            (
                &[("BACKSTOP_EMBED_OUTPUT_LAYER", "1")][..],
                "output_layer=computed",
            ),
        ] {
            let mut envs = vec![("BACKSTOP_LOG", "info,backstop::engine::worker=trace")];
            envs.extend_from_slice(env);
            let model = format!("{name}={}", path.display());
            let s = Server::start_with_env(&["--model", &model], &envs).await;
            let got = ollama_embed_with(&s, name, texts.clone()).await;
            assert_eq!(got.len(), 3);
            // The step's line may still be on its way when the answer arrives.
            let step = |l: &str| l.contains("embedding step");
            let log = s
                .wait_log_for(
                    |log| log.contains("embedding context created") && log.lines().any(step),
                    "the context and an embedding step",
                )
                .await;
            let created = log
                .lines()
                .find(|l| l.contains("embedding context created"))
                .unwrap_or_default();
            assert!(created.contains(said), "{name}: {created}");
            for step in log.lines().filter(|l| step(l)) {
                assert!(step.contains(said), "{name}: {step}");
            }
            vectors.push(got);
        }
        assert_eq!(vectors[0], vectors[1], "{name}: the same vectors");
    }
}

#[tokio::test]
async fn a_batch_gives_the_same_vectors_as_one_by_one() {
    let s = Server::start(&[]).await;
    // More inputs than one decode takes (8), of different lengths, so the batch is split
    // over several decodes and packs sequences of unequal length together.
    let texts: Vec<String> = (0..11)
        .map(|i| format!("Sentence number {i} is {}.", "rather long ".repeat(i)))
        .collect();
    let batch = ollama_embed(&s, json!(texts)).await;
    assert_eq!(batch.len(), texts.len());
    let mut alone = Vec::new();
    for text in &texts {
        alone.push(ollama_embed(&s, json!(text)).await.remove(0));
    }
    // Not bit for bit: llama.cpp's CPU kernels change their summation order once a batch
    // passes about 64 tokens (measured: largest difference 0.006 in a component, cosine
    // 0.99993). The same vector up to that rounding, and its own, not a neighbour's.
    for i in 0..texts.len() {
        let own = cosine(&batch[i], &alone[i]);
        assert!(own > 0.9995, "input {i}: cosine {own} with its own vector");
        for (j, other) in alone.iter().enumerate().filter(|(j, _)| *j != i) {
            let c = cosine(&batch[i], other);
            assert!(
                own > c,
                "input {i} is closer to input {j} ({c}) than to itself ({own})"
            );
        }
    }
    // Few tokens in all: the kernels are the same, and so are the vectors.
    let small = ollama_embed(&s, json!(["a cat", "a dog", "a bird"])).await;
    for (i, text) in ["a cat", "a dog", "a bird"].iter().enumerate() {
        let one = ollama_embed(&s, json!(text)).await;
        assert!(max_diff(&small[i], &one[0]) < 1e-5, "input {i}");
    }
}

#[tokio::test]
async fn base64_decodes_to_the_float_vectors() {
    let s = Server::start(&[]).await;
    let input = json!(["first text", "second, longer text"]);
    let plain = openai_embed(&s, json!({"model": "smollm2", "input": input})).await;
    let packed = openai_embed(
        &s,
        json!({"model": "smollm2", "input": input, "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(packed["data"].as_array().unwrap().len(), 2);
    for i in 0..2 {
        let text = packed["data"][i]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let floats = floats(&plain["data"][i]["embedding"]);
        assert_eq!(decoded.len(), floats.len());
        assert!(max_diff(&decoded, &floats) < 1e-7);
        assert_eq!(packed["data"][i]["index"], i);
    }
}

#[tokio::test]
async fn legacy_embeddings_are_not_normalized_but_point_the_same_way() {
    let s = Server::start(&[]).await;
    let (status, body) = s
        .post(
            "/api/embeddings",
            &json!({"model": "smollm2", "prompt": "Why is the sky blue?"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let raw = floats(&body["embedding"]);
    assert!(
        (norm(&raw) - 1.0).abs() > 0.01,
        "legacy vectors keep their length, got norm {}",
        norm(&raw)
    );
    let unit = ollama_embed(&s, json!("Why is the sky blue?")).await;
    let scaled: Vec<f32> = raw
        .iter()
        .map(|x| (f64::from(*x) / norm(&raw)) as f32)
        .collect();
    assert!(max_diff(&scaled, &unit[0]) < 1e-5);

    let (status, body) = s
        .post(
            "/api/embeddings",
            &json!({"model": "smollm2", "prompt": ""}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["embedding"], json!([]));
}

#[tokio::test]
async fn dimensions_shorten_and_renormalize() {
    let s = Server::start(&[]).await;
    let full = ollama_embed(&s, json!("shorter please")).await;
    let (status, body) = s
        .post(
            "/api/embed",
            &json!({"model": "smollm2", "input": "shorter please", "dimensions": 64}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let short = floats(&body["embeddings"][0]);
    assert_eq!(short.len(), 64);
    assert!((norm(&short) - 1.0).abs() < 1e-4);
    let prefix = &full[0][..64];
    let rescaled: Vec<f32> = prefix
        .iter()
        .map(|x| (f64::from(*x) / norm(prefix)) as f32)
        .collect();
    assert!(max_diff(&short, &rescaled) < 1e-5);

    let out = openai_embed(
        &s,
        json!({"model": "smollm2", "input": "shorter please", "dimensions": 64}),
    )
    .await;
    assert!(max_diff(&floats(&out["data"][0]["embedding"]), &short) < 1e-6);
}

#[tokio::test]
async fn an_input_longer_than_the_context_is_truncated_or_refused_as_asked() {
    // llama.cpp rounds a slot's context up to 256 tokens: the smallest there is, and the
    // most tokens one embedding input may have on this server.
    let s = Server::start(&["--ctx", "256", "--parallel", "1"]).await;
    ollama_embed(&s, json!("load the model")).await;
    let limit = context_length(&s).await;
    assert_eq!(limit, 256);
    let long = "one two three four five six seven eight nine ten ".repeat(40);
    let (status, body) = s
        .post("/api/embed", &json!({"model": "smollm2", "input": long}))
        .await;
    assert_eq!(status, 200, "Ollama truncates by default: {body}");
    assert_eq!(body["prompt_eval_count"].as_u64().unwrap(), limit);
    assert_eq!(floats(&body["embeddings"][0]).len(), 576);

    let (status, body) = s
        .post(
            "/api/embed",
            &json!({"model": "smollm2", "input": ["short", long], "truncate": false}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("input 1") && message.contains("256"),
        "{message}"
    );

    let (status, body) = s
        .post(
            "/v1/embeddings",
            &json!({"model": "smollm2", "input": long}),
        )
        .await;
    assert_eq!(status, 400, "OpenAI refuses over-long inputs: {body}");
    assert_eq!(body["error"]["param"], "input");
    assert_eq!(body["error"]["code"], "context_length_exceeded");

    // An input of exactly the limit is fine, and the server is unharmed by all of this.
    let out = openai_embed(&s, json!({"model": "smollm2", "input": "word ".repeat(40)})).await;
    assert!(out["usage"]["prompt_tokens"].as_u64().unwrap() <= limit);
    let (status, _) = s.get_json("/health").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn serve_batch_bounds_one_decode_and_so_an_embedding_input() {
    let s = Server::start(&["--ctx", "256", "--parallel", "1", "--batch", "64"]).await;
    let long = "one two three four five six seven eight nine ten ".repeat(40);
    let (status, body) = s
        .post("/api/embed", &json!({"model": "smollm2", "input": long}))
        .await;
    assert_eq!(status, 200, "{body}");
    // Truncated to the batch, not to the slot's 256 tokens.
    assert_eq!(body["prompt_eval_count"], 64, "{body}");
    assert_eq!(context_length(&s).await, 256);
    // A chat prompt longer than the generating context's batch (64, raised to 128 for exact
    // prompt reads) is read whole, a batch per decode (a decode over it would abort llama.cpp).
    let (status, body) = s
        .post(
            "/api/chat",
            &json!({"model": "smollm2", "stream": false,
                    "messages": [{"role": "user", "content": format!("{long}\nCount on.")}],
                    "options": {"num_predict": 4, "temperature": 0}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["prompt_eval_count"].as_u64().unwrap() > 3 * 64,
        "{body}"
    );
    assert_eq!(body["eval_count"], 4, "{body}");
}

#[tokio::test]
async fn a_slot_count_that_would_crash_llama_cpp_does_not_shape_the_embedding_context() {
    // Three slots: an embedding context with mean pooling and as many sequences as slots
    // would abort the process inside llama.cpp, since its batch (256 tokens here) is not a
    // multiple of 3. The engine picks a sequence count that divides the batch instead, so
    // a batch of many inputs is served.
    let s = Server::start(&["--ctx", "100", "--parallel", "3"]).await;
    let texts: Vec<String> = (0..13)
        .map(|i| format!("text {i} {}", "x ".repeat(i * 5)))
        .collect();
    let v = ollama_embed(&s, json!(texts)).await;
    assert_eq!(v.len(), 13);
    assert!(v.iter().all(|e| (norm(e) - 1.0).abs() < 1e-4));
    let (status, _) = s.get_json("/health").await;
    assert_eq!(status, 200);
    s.wait_log(&["embedding context created", "seqs=8"]).await;
}

#[tokio::test]
async fn embedding_while_a_stream_generates_does_not_disturb_it() {
    let s = Server::start(&["--parallel", "1"]).await;
    let chat = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
        "temperature": 0,
        "seed": 42,
        "max_tokens": 64,
        "stream": true,
    });
    // Twice alone: the second run reuses the cached prompt, as the run under load will.
    s.stream("/v1/chat/completions", &chat)
        .await
        .collect()
        .await;
    let alone = chat_text(
        &s.stream("/v1/chat/completions", &chat)
            .await
            .collect()
            .await,
    );
    assert!(!alone.is_empty());
    let reference = ollama_embed(&s, json!("an embedding during a stream")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let background = {
        let (client, url) = (s.client.clone(), s.url("/api/embed"));
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let body = json!({"model": "smollm2", "input": ["an embedding during a stream", "and another"]});
                let r = client.post(&url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let out: Value = r.json().await.unwrap();
                let first = floats(&out["embeddings"][0]);
                assert!(
                    max_diff(&first, &reference[0]) < 1e-6,
                    "the stream did not disturb the embedding"
                );
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // Let the embedding requests get going first, so they overlap the whole stream.
    while done.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before = done.load(Ordering::SeqCst);
    let under_load = chat_text(
        &s.stream("/v1/chat/completions", &chat)
            .await
            .collect()
            .await,
    );
    let during = done.load(Ordering::SeqCst) - before;
    stop.store(true, Ordering::SeqCst);
    background.await.unwrap();
    assert_eq!(under_load, alone);
    assert!(
        during > 0,
        "no embedding request finished while the stream ran"
    );
}

#[tokio::test]
async fn bad_embedding_requests_get_400_in_each_apis_shape() {
    let s = Server::start(&[]).await;
    let openai_error = |body: &Value| {
        assert!(body["error"]["message"].is_string(), "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        body["error"]["param"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    for (request, param) in [
        (json!({"model": "smollm2", "input": ""}), "input"),
        (json!({"model": "smollm2", "input": []}), "input"),
        (json!({"model": "smollm2", "input": ["a", ""]}), "input"),
        (json!({"model": "smollm2"}), "input"),
        (json!({"model": "smollm2", "input": 42}), "input"),
        (json!({"model": "smollm2", "input": [1, 2, 3]}), "input"),
        (
            json!({"model": "smollm2", "input": "a", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (
            json!({"model": "smollm2", "input": "a", "encoding_format": 1}),
            "encoding_format",
        ),
        (
            json!({"model": "smollm2", "input": "a", "dimensions": 0}),
            "dimensions",
        ),
        (
            json!({"model": "smollm2", "input": "a", "dimensions": 577}),
            "dimensions",
        ),
        (
            json!({"model": "smollm2", "input": "a", "dimensions": "64"}),
            "dimensions",
        ),
        (json!({"input": "a"}), "model"),
    ] {
        let (status, body) = s.post("/v1/embeddings", &request).await;
        assert_eq!(status, 400, "{request} -> {body}");
        assert_eq!(openai_error(&body), param, "{request} -> {body}");
    }
    let (status, body) = s
        .post("/v1/embeddings", &json!({"model": "nope", "input": "a"}))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");

    for request in [
        json!({"model": "smollm2", "input": ["a", ""]}),
        json!({"model": "smollm2", "input": 42}),
        json!({"model": "smollm2", "input": ["a", 7]}),
        json!({"model": "smollm2", "input": "a", "truncate": "yes"}),
        json!({"model": "smollm2", "input": "a", "dimensions": 0}),
        json!({"model": "smollm2", "input": "a", "dimensions": 577}),
        json!({"model": "smollm2", "input": "a", "options": {"temperature": "hot"}}),
        json!({"model": "smollm2", "input": "a", "keep_alive": "soon"}),
        json!({"input": "a"}),
    ] {
        let (status, body) = s.post("/api/embed", &request).await;
        assert_eq!(status, 400, "{request} -> {body}");
        assert!(body["error"].is_string(), "{request} -> {body}");
    }
    let (status, body) = s
        .post("/api/embeddings", &json!({"model": "smollm2", "prompt": 3}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("prompt"));
    for path in ["/api/embed", "/api/embeddings"] {
        let (status, body) = s
            .post(path, &json!({"model": "x", "input": "a", "prompt": "a"}))
            .await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body, json!({"error": "model 'x' not found"}));
    }

    // No input at all is not an error for Ollama: the model loads and no vectors come back.
    let (status, body) = s
        .post("/api/embed", &json!({"model": "smollm2", "input": []}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["embeddings"], json!([]));
    assert_eq!(body["prompt_eval_count"], 0);
}
