//! Chat and text completions against the real model: determinism, streaming, limits,
//! stop strings and exact usage.

mod common;

use common::{answer, chat_text, Server};
use serde_json::{json, Value};
use std::time::Duration;

fn ask(question: &str) -> Value {
    json!([{"role": "user", "content": question}])
}

#[tokio::test]
async fn stream_and_non_stream_give_identical_text_for_the_same_seed() {
    let s = Server::start(&[]).await;
    let body = json!({
        "model": "smollm2",
        "messages": ask("Tell me about the sea."),
        "temperature": 0.9,
        "seed": 1234,
        "max_tokens": 40,
    });
    let whole = s.chat(body.clone()).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let payloads = s
        .stream("/v1/chat/completions", &streamed)
        .await
        .collect()
        .await;
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    assert_eq!(chat_text(&payloads), answer(&whole));
    let last: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
}

#[tokio::test]
async fn the_same_seed_gives_the_same_text_and_another_seed_does_not() {
    let s = Server::start(&[]).await;
    let run = |seed: u64| {
        let s = &s;
        async move {
            answer(
                &s.chat(json!({
                    "model": "smollm2",
                    "messages": ask("Write a short poem about rain."),
                    "temperature": 1.0,
                    "top_p": 1.0,
                    "top_k": 0,
                    "min_p": 0.0,
                    "seed": seed,
                    "max_tokens": 24,
                }))
                .await,
            )
        }
    };
    let a = run(7).await;
    assert_eq!(a, run(7).await);
    let others = [run(8).await, run(9).await, run(10).await];
    assert!(
        others.iter().any(|o| *o != a),
        "three other seeds all gave {a:?}"
    );
}

#[tokio::test]
async fn temperature_zero_is_greedy_whatever_the_seed() {
    let s = Server::start(&[]).await;
    let run = |seed: u64| {
        let s = &s;
        async move {
            answer(
                &s.chat(json!({"model": "smollm2", "messages": ask("Name a color."), "temperature": 0, "seed": seed, "max_tokens": 16}))
                    .await,
            )
        }
    };
    assert_eq!(run(1).await, run(99999).await);
}

#[tokio::test]
async fn max_tokens_cuts_the_answer_and_says_length() {
    let s = Server::start(&[]).await;
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body =
            json!({"model": "smollm2", "messages": ask("Tell me a long story."), "temperature": 0});
        body[field] = json!(5);
        let r = s.chat(body).await;
        assert_eq!(r["usage"]["completion_tokens"], 5, "{field}");
        assert_eq!(r["choices"][0]["finish_reason"], "length", "{field}");
        assert_eq!(
            r["usage"]["total_tokens"].as_u64().unwrap(),
            r["usage"]["prompt_tokens"].as_u64().unwrap() + 5
        );
    }
}

#[tokio::test]
async fn a_natural_end_says_stop() {
    let s = Server::start(&[]).await;
    let r = s
        .chat(json!({"model": "smollm2", "messages": ask("Say hi."), "temperature": 0, "max_tokens": 200}))
        .await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() < 200);
}

/// Picks a stop string from the middle of the greedy answer: a few words, so it spans
/// several tokens.
fn stop_from(text: &str) -> (String, String) {
    let words: Vec<&str> = text.split(' ').collect();
    assert!(
        words.len() > 6,
        "answer too short to pick a stop from: {text:?}"
    );
    let stop = format!(" {} {}", words[4], words[5]);
    let at = text.find(&stop).unwrap();
    (stop, text[..at].to_owned())
}

#[tokio::test]
async fn a_stop_string_spanning_tokens_ends_the_answer_and_never_leaks() {
    let s = Server::start(&[]).await;
    let base = json!({"model": "smollm2", "messages": ask("Describe a forest in detail."), "temperature": 0, "max_tokens": 40});
    let full = answer(&s.chat(base.clone()).await);
    let (stop, expected) = stop_from(&full);

    let mut body = base.clone();
    body["stop"] = json!([stop.clone(), "never-appears"]);
    let r = s.chat(body.clone()).await;
    assert_eq!(answer(&r), expected);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    body["stream"] = json!(true);
    let payloads = s
        .stream("/v1/chat/completions", &body)
        .await
        .collect()
        .await;
    assert_eq!(chat_text(&payloads), expected);
    assert!(
        payloads.iter().all(|p| !p.contains(stop.trim())),
        "stop text leaked in {payloads:?}"
    );
}

#[tokio::test]
async fn a_single_stop_string_works_too() {
    let s = Server::start(&[]).await;
    let r = s
        .post(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5,", "temperature": 0, "max_tokens": 30, "stop": " 8"}),
        )
        .await;
    assert_eq!(r.0, 200, "{}", r.1);
    assert_eq!(r.1["choices"][0]["text"], " 6, 7,");
    assert_eq!(r.1["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn include_usage_ends_the_stream_with_exact_counts() {
    let s = Server::start(&[]).await;
    let body = json!({"model": "smollm2", "messages": ask("What is rain?"), "temperature": 0, "max_tokens": 20});
    let whole = s.chat(body.clone()).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let payloads = s
        .stream("/v1/chat/completions", &streamed)
        .await
        .collect()
        .await;
    let usage_chunk: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens"],
        whole["usage"]["prompt_tokens"]
    );
    assert_eq!(
        usage_chunk["usage"]["completion_tokens"],
        whole["usage"]["completion_tokens"]
    );
    // Every chunk before the usage chunk carries "usage": null, as OpenAI does.
    for p in &payloads[..payloads.len() - 2] {
        let v: Value = serde_json::from_str(p).unwrap();
        assert_eq!(v["usage"], Value::Null);
    }
    let mut plain = body.clone();
    plain["stream"] = json!(true);
    let payloads = s
        .stream("/v1/chat/completions", &plain)
        .await
        .collect()
        .await;
    assert!(payloads.iter().all(|p| !p.contains("\"usage\"")));
}

#[tokio::test]
async fn usage_counts_are_exact_token_counts() {
    let s = Server::start(&[]).await;
    // The chat template renders this conversation to exactly this text.
    let rendered = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n";
    let chat = s
        .chat(json!({"model": "smollm2", "messages": ask("Hello"), "temperature": 0, "max_tokens": 12}))
        .await;
    let (status, text) = s
        .post(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": rendered, "temperature": 0, "max_tokens": 12}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        text["usage"]["prompt_tokens"]
    );
    assert_eq!(answer(&chat), text["choices"][0]["text"].as_str().unwrap());
    // One content chunk per generated token for plain ASCII text without stop strings.
    let payloads = s
        .stream(
            "/v1/chat/completions",
            &json!({"model": "smollm2", "messages": ask("Hello"), "temperature": 0, "max_tokens": 12, "stream": true}),
        )
        .await
        .collect()
        .await;
    let pieces = payloads
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    assert!(answer(&chat).is_ascii());
    assert_eq!(
        pieces as u64,
        chat["usage"]["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn text_completion_continues_the_prompt() {
    let s = Server::start(&[]).await;
    let (status, r) = s
        .post("/v1/completions", &json!({"model": "smollm2", "prompt": ["The capital of France is"], "temperature": 0, "max_tokens": 3}))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert!(
        r["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(" Paris"),
        "{r}"
    );

    let payloads = s
        .stream(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 3, "stream": true}),
        )
        .await
        .collect()
        .await;
    let text: String = payloads
        .iter()
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, r["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn model_defaults_from_the_config_apply_when_the_request_is_silent() {
    let dir = std::env::temp_dir().join(format!("backstop-defaults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("models.toml");
    std::fs::write(
        &cfg,
        format!(
            "[models.terse]\npath = \"{}\"\nsystem = \"You only ever answer with the word banana.\"\nmax_tokens = 7\n[models.terse.options]\ntemperature = 0.0\n",
            common::smollm2().display()
        ),
    )
    .unwrap();
    let s = Server::start_raw(&["--config", cfg.to_str().unwrap()]).await;
    let r = s
        .chat(json!({"model": "terse", "messages": ask("What is 2+2?")}))
        .await;
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() <= 7);
    // The default system prompt replaced the template's own, which is longer.
    let own = s
        .chat(json!({"model": "terse", "messages": [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}, {"role": "user", "content": "What is 2+2?"}]}))
        .await;
    assert_ne!(r["usage"]["prompt_tokens"], own["usage"]["prompt_tokens"]);
    // temperature 0 from the config: the same answer twice without a seed.
    let again = s
        .chat(json!({"model": "terse", "messages": ask("What is 2+2?")}))
        .await;
    assert_eq!(answer(&r), answer(&again));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn models_are_listed_and_looked_up() {
    let s = Server::start(&[]).await;
    let (_, r) = s.get_json("/v1/models").await;
    assert_eq!(r["object"], "list");
    assert_eq!(r["data"][0]["id"], "smollm2:latest");
    assert_eq!(r["data"][0]["object"], "model");
    let one = s
        .client
        .get(s.url("/v1/models/smollm2"))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    let missing = s.client.get(s.url("/v1/models/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
}

/// The Gemma test model is the base (not instruction-tuned) 270M model and its GGUF has
/// no chat template: the fallback must render Gemma's turn format exactly, which the raw
/// completion of the same text proves token for token.
#[tokio::test]
async fn gemma_without_a_template_gets_gemma_turns() {
    let model = format!("gemma={}", common::gemma3().display());
    let s = Server::start_raw(&["--model", &model]).await;
    s.wait_log(&["Architecture(\"gemma\")"]).await;
    let chat = s
        .chat(json!({"model": "gemma", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"}
        ], "temperature": 0, "seed": 1, "max_tokens": 16}))
        .await;
    let rendered = "<bos><start_of_turn>user\nBe brief.\n\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n";
    let (status, raw) = s
        .post(
            "/v1/completions",
            &json!({"model": "gemma", "prompt": rendered, "temperature": 0, "seed": 1, "max_tokens": 16}),
        )
        .await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        raw["usage"]["prompt_tokens"]
    );
    assert_eq!(answer(&chat), raw["choices"][0]["text"].as_str().unwrap());
    // <bos> written by the template is not doubled: the same text without it, with the
    // BOS added by the tokenizer, has the same length.
    let (_, no_bos) = s
        .post(
            "/v1/completions",
            &json!({"model": "gemma", "prompt": &rendered[5..], "temperature": 0, "max_tokens": 1}),
        )
        .await;
    assert_eq!(
        no_bos["usage"]["prompt_tokens"],
        raw["usage"]["prompt_tokens"]
    );
}

#[tokio::test]
async fn the_example_catalogue_serves_both_models() {
    let cfg = common::checkout().join("models.toml");
    let s = Server::start_raw(&["--config", &cfg.to_string_lossy()]).await;
    let (_, r) = s.get_json("/v1/models").await;
    let ids: Vec<&str> = r["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gemma3:latest", "smollm2:latest"]);
    for model in ids {
        let r = s
            .chat(json!({"model": model, "messages": ask("Hi"), "max_tokens": 3, "temperature": 0}))
            .await;
        assert_eq!(r["model"], model);
        assert!(r["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
    }
}

/// The next turn of a chat shares its whole history with the slot that answered the
/// previous turn, so only the new suffix is read. (The reused answer tokens were evaluated
/// one at a time while they were generated, which llama.cpp does not guarantee to be
/// bit-identical to evaluating them in one batch, so the answer itself is compared with a
/// cold server only in the shared-system-prompt test below, where both paths batch alike.)
/// A system prompt long enough for its reuse to matter (prefixes are reused only when at
/// least 64 prompt tokens are left to read).
const GARDEN: &str = "You are a meticulous assistant for a botanical garden. You answer questions about \
    plants, flowers, trees and gardening with short, precise, friendly sentences, and you never make \
    things up. If you do not know something, you say so plainly. Visitors come from many countries, \
    so you avoid slang and explain any Latin plant names you use. When asked about opening hours, \
    tickets or events, you tell visitors to check the garden's notice board at the main gate, \
    because those details change with the seasons. You are patient with children and with people \
    who are new to gardening, and you enjoy sharing small, surprising facts about the plants.";

fn garden(turns: &[(&str, &str)]) -> Value {
    let mut messages = vec![json!({"role": "system", "content": GARDEN})];
    for (role, content) in turns {
        messages.push(json!({"role": role, "content": content}));
    }
    Value::Array(messages)
}

/// Serves `name` from `path` with two slots, flash attention as chosen (`None`: the default,
/// off on a CPU).
async fn two_slots(name: &str, path: &std::path::Path, flash: Option<bool>) -> Server {
    let model = format!("{name}={}", path.display());
    let mut args = vec!["--model", &model, "--parallel", "2"];
    match flash {
        Some(true) => args.extend(["--flash-attention", "1"]),
        Some(false) => args.extend(["--flash-attention", "0"]),
        None => {}
    }
    Server::start_raw(&args).await
}

/// A greedy or seeded follow-up turn reuses the first turn's cache, and answers exactly what
/// a server that never saw the first turn answers; a sampled one without a seed (different
/// every time anyway) reuses all it can. Reuse keeps every reused row as a cold read
/// computes it (`policy::Grain`): a multiple of 4 positions into a segment, leaving at least
/// 4 rows of it to read (64 where flash attention reads it with query tiles).
async fn follow_up_answers_as_a_cold_server_does(
    name: &str,
    path: &std::path::Path,
    flash: Option<bool>,
) {
    let s = two_slots(name, path, flash).await;
    let first = garden(&[("user", "Name three fruits.")]);
    let r1 = s
        .chat(json!({"model": name, "messages": first, "temperature": 0, "max_tokens": 24}))
        .await;
    let first_prompt = r1["usage"]["prompt_tokens"].as_u64().unwrap();
    let follow = garden(&[
        ("user", "Name three fruits."),
        ("assistant", &answer(&r1)),
        ("user", "Which one is yellow?"),
    ]);
    for (i, body) in [
        json!({"model": name, "messages": follow, "temperature": 0, "max_tokens": 24}),
        json!({"model": name, "messages": follow, "temperature": 0.8, "seed": 7, "max_tokens": 24}),
    ]
    .into_iter()
    .enumerate()
    {
        let warm = s.chat(body.clone()).await;
        let cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
        if i == 0 {
            if flash != Some(true) {
                // The first turn's prompt is reused up to a multiple of 16, leaving at least
                // 4 rows of this one; what follows it (the answer, the new question) is read.
                // (With `None` this also checks that the CPU's default is off.)
                assert_eq!(cached, first_prompt.min(prompt - 4) / 16 * 16, "{warm}");
            } else {
                // Segments start at the turn markers. A single segment read with query tiles
                // would leave 64 rows to read; the first turn's last segment (its end and the
                // assistant header), continued here by the answer in fewer than 64 rows, is
                // read row by row in both prompts, so reuse reaches into it.
                let one_segment = first_prompt.min(prompt - 64) / 16 * 16;
                assert!(cached > one_segment && cached <= first_prompt, "{warm}");
            }
            assert!(cached >= 64, "{warm}");
        } else {
            // The same conversation again: read exactly just now, nothing is read.
            assert_eq!(cached, prompt, "{warm}");
        }
        // Reading only the new part changes nothing: a server that never saw the first turn
        // answers the same, greedy or seeded.
        let cold = two_slots(name, path, flash).await.chat(body.clone()).await;
        assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(answer(&warm), answer(&cold), "{name}: {body}");
    }
    // Sampling without a seed reuses the whole shared prefix, but for the token that gives
    // fresh logits (here the first turn, which the slot holding the conversation starts with).
    let unseeded = s
        .chat(json!({"model": name, "messages": first, "temperature": 0.8, "max_tokens": 4}))
        .await;
    assert_eq!(
        unseeded["usage"]["prompt_tokens_details"]["cached_tokens"],
        first_prompt - 1,
        "{unseeded}"
    );
}

#[tokio::test]
async fn a_follow_up_turn_reuses_the_conversation_and_answers_as_a_cold_server_does() {
    follow_up_answers_as_a_cold_server_does("smollm2", &common::smollm2(), None).await;
}

#[tokio::test]
async fn with_flash_attention_a_follow_up_turn_still_answers_as_a_cold_server_does() {
    follow_up_answers_as_a_cold_server_does("smollm2", &common::smollm2(), Some(true)).await;
}

/// Gemma's Q4_K weights are repacked for AVX2 and multiplied in groups of 4 rows: reuse
/// aligned to 4 positions keeps those groups as a cold read forms them.
#[tokio::test]
async fn a_follow_up_turn_on_gemma_answers_as_a_cold_server_does() {
    follow_up_answers_as_a_cold_server_does("gemma", &common::gemma3(), Some(true)).await;
}

/// A second conversation's system prompt, sharing nothing with [`GARDEN`] but the template.
const HARBOUR: &str = "You are the harbour master's assistant in a small fishing port. You \
    answer questions about tides, moorings, fuel and the weather at sea, briefly and exactly, and \
    you always remind skippers to check the latest forecast before they sail.";

/// A new conversation takes an empty slot rather than give up a kept one for less than that
/// one would lose. With nothing kept in host memory (`--cache-ram 0`) and three slots: A's
/// first turn (the garden's system prompt and a long message); B's, under another system
/// prompt (sharing only the template's first tokens with A); C's, under A's system prompt
/// (which A's slot would spare, at the cost of the ~250 tokens A holds past it); then A's
/// follow-up, which reuses A's whole first turn where it was left.
#[tokio::test]
async fn a_new_conversation_takes_an_empty_slot_rather_than_give_up_another() {
    let s = Server::start(&["--parallel", "3", "--cache-ram", "0"]).await;
    let chat = |system: &str, turns: &[(&str, &str)]| {
        let mut messages = vec![json!({"role": "system", "content": system})];
        for (role, content) in turns {
            messages.push(json!({"role": role, "content": content}));
        }
        json!({"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 24})
    };
    let notes = format!(
        "{} Which fruit should I plant next?",
        "My garden has apple, pear and plum trees, and a bed of strawberries. ".repeat(12)
    );
    let a1 = s.chat(chat(GARDEN, &[("user", &notes)])).await;
    let b1 = s
        .chat(chat(HARBOUR, &[("user", "When is high tide today?")]))
        .await;
    assert!(cached(&b1) < 8, "B shares only the template's start: {b1}");
    let c1 = s.chat(chat(GARDEN, &[("user", "What is a rose?")])).await;
    assert_eq!(cached(&c1), 0, "C read the system prompt afresh: {c1}");
    let a2 = s
        .chat(chat(
            GARDEN,
            &[
                ("user", &notes),
                ("assistant", &answer(&a1)),
                ("user", "And which one needs the least water?"),
            ],
        ))
        .await;
    let first = a1["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached(&a2) >= first, "A's first turn was given up: {a2}");
}

/// Conversations beyond the slots keep their cache in host memory (`--cache-ram`): with one
/// slot, conversation A's first turn, then B's, then A's follow-up. The follow-up copies A's
/// rows back and reuses as much as it would had A kept a slot of its own (a two-slot server),
/// and answers as a cold read does. Over the memory limit, or with 0, nothing is kept and
/// the follow-up reads A's history again. (The tests' servers read no answer again while
/// idle, so the slots hold the same between the requests however quickly they come.)
async fn conversations_beyond_the_slots_keep_their_cache(
    name: &str,
    path: &std::path::Path,
    flash: bool,
) {
    let model = format!("{name}={}", path.display());
    let fa = if flash { "1" } else { "0" };
    let serve = |slots: &str, extra: &[&str]| {
        let args: Vec<String> = [
            "--model",
            &model,
            "--parallel",
            slots,
            "--flash-attention",
            fa,
        ]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Server::start_raw(&args).await
        }
    };
    let chat = |system: &str, turns: &[(&str, &str)], cache: bool| {
        let mut messages = vec![json!({"role": "system", "content": system})];
        for (role, content) in turns {
            messages.push(json!({"role": role, "content": content}));
        }
        json!({"model": name, "messages": messages, "temperature": 0, "max_tokens": 24,
               "cache_prompt": cache})
    };
    let a1 = chat(GARDEN, &[("user", "Name three fruits.")], true);
    let b1 = chat(HARBOUR, &[("user", "When is high tide today?")], true);
    // A's turn, B's turn, then A's follow-up: what it reused, and its answer.
    let follow_up = |s: Server| {
        let (a1, b1) = (a1.clone(), b1.clone());
        async move {
            let r1 = s.chat(a1).await;
            s.chat(b1).await;
            let said = answer(&r1);
            let turns = [
                ("user", "Name three fruits."),
                ("assistant", said.as_str()),
                ("user", "Which one is yellow?"),
            ];
            let warm = s.chat(chat(GARDEN, &turns, true)).await;
            let cold = s.chat(chat(GARDEN, &turns, false)).await;
            assert_eq!(cached(&cold), 0, "{cold}");
            assert_eq!(answer(&warm), answer(&cold), "{name}: {warm}");
            let first_prompt = r1["usage"]["prompt_tokens"].as_u64().unwrap();
            (s, warm, first_prompt)
        }
    };
    let series =
        |metric: &str| format!("backstop_prompt_cache_{metric}{{model=\"{name}:latest\"}}");

    let (own, own_slot, first_prompt) = follow_up(serve("2", &[]).await).await;
    drop(own);
    assert!(cached(&own_slot) >= 64, "{own_slot}");
    let (s, kept, _) = follow_up(serve("1", &[]).await).await;
    assert_eq!(cached(&kept), cached(&own_slot), "{name}: {kept}");
    // A was kept when B took the slot, and B when A came back (and again for the cold read).
    assert!(s.metric(&series("saves_total")).await >= 2.0);
    let restored = s.metric(&series("restored_tokens_total")).await;
    assert!(restored >= first_prompt as f64, "{restored}");
    assert!(s.metric(&series("bytes")).await > 0.0);
    drop(s);

    // A's rows take more than a MiB (SmolLM2 about 23 KiB a token, Gemma 3 270M 18 KiB).
    for limit in ["0", "1"] {
        let (s, forgot, _) = follow_up(serve("1", &["--cache-ram", limit]).await).await;
        assert!(cached(&forgot) < 16, "--cache-ram {limit}: {forgot}");
        assert_eq!(s.metric(&series("saves_total")).await, 0.0, "{limit}");
        assert_eq!(s.metric(&series("bytes")).await, 0.0, "{limit}");
    }
}

/// Past the limit the oldest conversation is dropped, never the one going back into the
/// slot. One slot and four conversations of one size (A to D), with room for two kept: the
/// limit is what A and B took on a server with room to spare, rounded up to a MiB. D's first
/// turn keeps C and drops A; B's follow-up takes B out before D is kept, and reuses B's rows;
/// A's follow-up reads A again.
#[tokio::test]
async fn the_oldest_kept_conversation_makes_room_and_the_one_going_back_is_kept() {
    let model = format!("smollm2={}", common::smollm2().display());
    let serve = |limit: String| {
        let model = model.clone();
        async move {
            Server::start_raw(&["--model", &model, "--parallel", "1", "--cache-ram", &limit]).await
        }
    };
    // About 300 tokens each (7 MB of SmolLM2's rows), sharing only the template's first.
    let turns = ["Ada", "Bob", "Cyd", "Dee"].map(|name| who_wrote("smollm2", name));
    let bytes = "backstop_prompt_cache_bytes{model=\"smollm2:latest\"}";
    let roomy = serve("8192".into()).await;
    for turn in &turns[..3] {
        roomy.chat(turn.clone()).await;
    }
    let a_and_b = roomy.metric(bytes).await;
    assert!(a_and_b > f64::from(10 << 20), "{a_and_b}");
    drop(roomy);

    let mib = (a_and_b / f64::from(1 << 20)).ceil() as u64;
    let s = serve(mib.to_string()).await;
    let mut answers = Vec::new();
    for turn in &turns {
        answers.push(answer(&s.chat(turn.clone()).await));
    }
    let next = |i: usize, cache: bool| {
        let mut body = continued(turns[i].clone(), &answers[i], "Now give them a title.");
        body["cache_prompt"] = json!(cache);
        body
    };
    let b2 = s.chat(next(1, true)).await;
    assert!(cached(&b2) >= 256, "{b2}");
    assert!(s.metric(bytes).await <= (mib << 20) as f64);
    let a2 = s.chat(next(0, true)).await;
    assert!(cached(&a2) < 16, "A was dropped for C: {a2}");
    let cold = s.chat(next(1, false)).await;
    assert_eq!(cached(&cold), 0);
    assert_eq!(answer(&b2), answer(&cold));
}

/// `--cache-ram` bounds the process, not each model: two models (one file under two names)
/// with room for one conversation between them. Twin's kept conversation drops smollm2's,
/// the older, and the one going back is copied back (with a limit per model, smollm2's
/// would have stayed). A model that unloads keeps its slots' conversations for its next load.
#[tokio::test]
async fn models_share_one_host_memory_limit_and_one_that_unloads_keeps_its_conversations() {
    let (one, two) = twins();
    let serve = |limit: String| {
        let (one, two) = (one.clone(), two.clone());
        async move {
            let args = ["--model", &one, "--model", &two, "--parallel", "1"];
            Server::start_raw(&[&args[..], &["--cache-ram", &limit]].concat()).await
        }
    };
    let short = |model: &str| {
        json!({"model": model, "temperature": 0, "max_tokens": 4,
               "messages": [{"role": "user", "content": "Hi"}]})
    };
    let bytes = |model: &str| format!("backstop_prompt_cache_bytes{{model=\"{model}:latest\"}}");
    let roomy = serve("8192".into()).await;
    roomy.chat(who_wrote("smollm2", "Ada")).await;
    roomy.chat(short("smollm2")).await;
    let one_kept = roomy.metric(&bytes("smollm2")).await;
    assert!(one_kept > f64::from(5 << 20), "{one_kept}");
    drop(roomy);

    // Room for one and a half.
    let mib = (one_kept * 1.5 / f64::from(1 << 20)).ceil() as u64;
    let s = serve(mib.to_string()).await;
    let ada = answer(&s.chat(who_wrote("smollm2", "Ada")).await);
    s.chat(short("smollm2")).await;
    assert!(s.metric(&bytes("smollm2")).await > 0.0);
    let bob = answer(&s.chat(who_wrote("twin", "Bob")).await);
    s.chat(short("twin")).await;
    assert_eq!(
        s.metric(&bytes("smollm2")).await,
        0.0,
        "smollm2's was dropped"
    );
    let twin_kept = s.metric(&bytes("twin")).await;
    assert!(
        twin_kept > 0.0 && twin_kept <= (mib << 20) as f64,
        "{twin_kept}"
    );
    let limit = s.metric("backstop_prompt_cache_limit_bytes").await;
    assert_eq!(limit, (mib << 20) as f64);
    let next = |body: Value, said: &str| continued(body, said, "Now give them a title.");
    let b2 = s.chat(next(who_wrote("twin", "Bob"), &bob)).await;
    assert!(cached(&b2) >= 256, "{b2}");
    let a2 = s.chat(next(who_wrote("smollm2", "Ada"), &ada)).await;
    assert!(cached(&a2) < 16, "Ada's was dropped for Bob's: {a2}");
    // Twin unloads, keeping what its slot held (Bob's, to its title); when it loads again,
    // Bob's next turn copies that back, and answers as a cold read does.
    let (status, r) = s
        .post("/api/generate", &json!({"model": "twin", "keep_alive": 0}))
        .await;
    assert_eq!(
        (status, r["done_reason"].as_str()),
        (200, Some("unload")),
        "{r}"
    );
    assert!(s.running().await.iter().all(|m| !m.starts_with("twin")));
    assert!(s.metric(&bytes("twin")).await > 0.0);
    s.wait_log(&[
        "conversations=1",
        "kept in host memory for the model's next load",
    ])
    .await;
    let third = continued(
        next(who_wrote("twin", "Bob"), &bob),
        &answer(&b2),
        "And a subtitle?",
    );
    reused_and_answered_as_cold(&s, third, &b2).await;
}

/// A greedy chat with `model` whose system prompt is about 300 tokens of notes that `name`
/// wrote, asking who wrote them: conversations of one size whose answers tell them apart.
fn who_wrote(model: &str, name: &str) -> Value {
    who_wrote_notes(model, name, 100)
}

/// [`who_wrote`] with `notes` phrases of notes.
fn who_wrote_notes(model: &str, name: &str, notes: usize) -> Value {
    let notes = format!("{name} wrote this. {}", lighthouse_notes(notes));
    json!({"model": model, "temperature": 0, "max_tokens": 24, "messages": [
        {"role": "system", "content": notes},
        {"role": "user", "content": "Who wrote the notes?"}]})
}

/// SmolLM2's file under two names, `smollm2` and `twin`: two models to the server.
fn twins() -> (String, String) {
    let path = common::smollm2();
    (
        format!("smollm2={}", path.display()),
        format!("twin={}", path.display()),
    )
}

/// `body` with the assistant's `said` and then the user's `ask` added to its messages.
fn continued(mut body: Value, said: &str, ask: &str) -> Value {
    let messages = body["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": said}));
    messages.push(json!({"role": "user", "content": ask}));
    body
}

/// Sends `body`, the turn after `before`, and checks that it reuses at least `before`'s whole
/// prompt and answers as the same request read cold does.
async fn reused_and_answered_as_cold(s: &Server, mut body: Value, before: &Value) {
    let warm = s.chat(body.clone()).await;
    let earlier = before["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached(&warm) >= earlier, "{warm}");
    body["cache_prompt"] = json!(false);
    let cold = s.chat(body).await;
    assert_eq!(cached(&cold), 0);
    assert_eq!(answer(&warm), answer(&cold));
}

/// Sends `body`, a conversation's next turn, and checks that it reads the conversation afresh
/// (reusing at most the chat template's first tokens, which any conversation shares) and
/// answers as the same request read cold does.
async fn read_afresh_and_answered_as_cold(s: &Server, mut body: Value) {
    let warm = s.chat(body.clone()).await;
    assert!(cached(&warm) < 16, "{warm}");
    body["cache_prompt"] = json!(false);
    assert_eq!(answer(&warm), answer(&s.chat(body).await));
}

/// A model unloaded to make room for another (`--max-loaded 1`) keeps its slot's
/// conversation in host memory: when it is loaded again, that conversation's next turn reads
/// only its own part, and answers as a cold read does.
#[tokio::test]
async fn a_model_unloaded_for_another_takes_its_conversations_back_when_it_loads_again() {
    let (one, two) = twins();
    let s = Server::start_raw(&["--model", &one, "--model", &two, "--max-loaded", "1"]).await;
    let body = who_wrote("smollm2", "Ada");
    let first = s.chat(body.clone()).await;
    s.chat(
        json!({"model": "twin", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s.running().await.len(), 1);
    assert!(s.running().await[0].starts_with("twin"));
    let next = continued(body, &answer(&first), "Now give them a title.");
    reused_and_answered_as_cold(&s, next, &first).await;
}

/// The files a server keeps its conversations in, in its cache folder: rows and what is known
/// of them, a pair each.
fn kept_files(dir: &std::path::Path) -> (usize, usize) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|f| f.unwrap().file_name().into_string().unwrap())
        .collect();
    let count = |ext: &str| names.iter().filter(|n| n.ends_with(ext)).count();
    (count(".seq"), count(".json"))
}

/// Stops a server as systemd would and waits for it to exit cleanly.
async fn stop(mut s: Server) -> String {
    s.terminate();
    assert_eq!(
        s.wait_exit(Duration::from_secs(60)).await,
        Some(0),
        "{}",
        s.log()
    );
    s.log()
}

/// With `--cache-dir`, a server that stops writes the conversations it keeps into the folder
/// and the next start reads them back: a conversation's next turn after the restart copies its
/// history back instead of reading it again, and answers as a cold read does. The files go
/// once its rows are back in a slot. They count against `--cache-ram`: started with room for
/// one, the server drops the older conversation, and its files with it.
#[tokio::test]
async fn conversations_outlive_a_restart_in_the_cache_folder_as_far_as_the_cache_has_room() {
    let dir = common::temp_dir("cache-dir").join("kept");
    let folder = dir.to_str().unwrap();
    let s = Server::start(&["--parallel", "2", "--cache-dir", folder]).await;
    let (ada, bob) = (who_wrote("smollm2", "Ada"), who_wrote("smollm2", "Bob"));
    let a1 = s.chat(ada.clone()).await;
    let b1 = s.chat(bob.clone()).await;
    let log = stop(s).await;
    assert!(
        log.contains("written to the cache folder") && log.contains("conversations=2"),
        "{log}"
    );
    assert_eq!(kept_files(&dir), (2, 2));

    // Room for one and a half: Ada's, written first, is dropped.
    let biggest = std::fs::read_dir(&dir)
        .unwrap()
        .map(|f| f.unwrap().metadata().unwrap().len())
        .max()
        .unwrap();
    let room = (biggest * 3 / 2).div_ceil(1 << 20).to_string();
    let s = Server::start(&[
        "--parallel",
        "2",
        "--cache-dir",
        folder,
        "--cache-ram",
        &room,
    ])
    .await;
    s.wait_log(&["read back", "conversations=1 dropped=1"])
        .await;
    assert_eq!(kept_files(&dir), (1, 1));
    let file_bytes = "backstop_prompt_cache_file_bytes{model=\"smollm2:latest\"}";
    assert!(s.metric(file_bytes).await >= (biggest * 9 / 10) as f64);
    let next = continued(bob, &answer(&b1), "Now give them a title.");
    reused_and_answered_as_cold(&s, next, &b1).await;
    assert_eq!(kept_files(&dir), (0, 0), "taken back, its files are gone");
    assert_eq!(s.metric(file_bytes).await, 0.0);
    let next = continued(ada, &answer(&a1), "Now give them a title.");
    read_afresh_and_answered_as_cold(&s, next).await;
}

/// `backstop serve` on SmolLM2 with the cache folder `folder`, run to its exit off the async
/// runtime: for a start that is to be refused.
async fn serve_to_exit_with_folder(folder: &str) -> common::Exit {
    let model = format!("smollm2={}", common::smollm2().display());
    let folder = folder.to_owned();
    tokio::task::spawn_blocking(move || {
        let args = [
            "serve",
            "--host",
            "127.0.0.1:0",
            "--model",
            &model,
            "--cache-dir",
            &folder,
        ];
        common::run_to_exit(&args, Duration::from_secs(60))
    })
    .await
    .unwrap()
}

/// One server uses a cache folder at a time. A second one given the folder of a running server
/// refuses to start, naming the first's pid, before it listens; the first serves on, and the
/// conversation it read back from the folder (its files there the whole time) still comes back
/// into a slot. A server killed outright leaves nothing that keeps the next one out.
#[tokio::test]
async fn a_second_server_is_refused_the_cache_folder_a_running_one_uses() {
    let dir = common::temp_dir("cache-dir-held").join("kept");
    let folder = dir.to_str().unwrap().to_owned();
    let s = Server::start(&["--cache-dir", &folder]).await;
    let ada = who_wrote("smollm2", "Ada");
    let a1 = s.chat(ada.clone()).await;
    stop(s).await;
    let s = Server::start(&["--cache-dir", &folder]).await;
    s.wait_log(&["read back", "conversations=1"]).await;
    assert_eq!(kept_files(&dir), (1, 1));

    let second = serve_to_exit_with_folder(&folder).await;
    assert_eq!(second.code, Some(1), "{}", second.stderr);
    let holder = format!(
        "cache folder {folder}: another backstop (pid {}) is using it",
        s.pid()
    );
    assert!(second.stderr.contains(&holder), "{}", second.stderr);
    assert!(!second.stderr.contains("listening on"), "{}", second.stderr);
    assert_eq!(
        kept_files(&dir),
        (1, 1),
        "the second server removed nothing"
    );

    let next = continued(ada, &answer(&a1), "Now give them a title.");
    reused_and_answered_as_cold(&s, next, &a1).await;
    assert_eq!(
        kept_files(&dir),
        (0, 0),
        "taken back once, its files are gone"
    );
    drop(s);
    let s = Server::start(&["--cache-dir", &folder]).await;
    s.wait_log(&["read back", "conversations=0"]).await;
}

/// A stopping server copies each slot's conversation into the memory of the one it wrote into
/// the folder before it: three conversations, each shorter than the one before, all come back
/// after a restart, each one's next turn reusing its whole history and answering as a cold
/// read does.
#[tokio::test]
async fn conversations_of_every_length_written_as_a_server_stops_all_come_back() {
    let dir = common::temp_dir("cache-dir-lengths").join("kept");
    let args = ["--parallel", "3", "--cache-dir", dir.to_str().unwrap()];
    let s = Server::start(&args).await;
    let mut firsts = Vec::new();
    for (who, notes) in [("Ada", 150), ("Bob", 90), ("Cy", 40)] {
        let body = who_wrote_notes("smollm2", who, notes);
        let r = s.chat(body.clone()).await;
        firsts.push((body, r));
    }
    let lengths: Vec<u64> = firsts
        .iter()
        .map(|(_, r)| r["usage"]["total_tokens"].as_u64().unwrap())
        .collect();
    assert!(lengths.windows(2).all(|w| w[0] > w[1]), "{lengths:?}");
    let log = stop(s).await;
    assert!(log.contains("conversations=3"), "{log}");
    assert_eq!(kept_files(&dir), (3, 3));
    // Each file holds its own conversation's rows and nothing more: the same bytes a token
    // (the files' names sort oldest first, as they were written).
    let mut seqs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seq"))
        .collect();
    seqs.sort();
    let per_token: Vec<f64> = seqs
        .iter()
        .zip(&lengths)
        .map(|(seq, &n)| std::fs::metadata(seq).unwrap().len() as f64 / (n - 1) as f64)
        .collect();
    let (least, most) = per_token
        .iter()
        .fold((f64::MAX, 0.0f64), |(l, m), &b| (l.min(b), m.max(b)));
    assert!(most / least < 1.02, "bytes a token: {per_token:?}");

    let s = Server::start(&args).await;
    s.wait_log(&["read back", "conversations=3"]).await;
    for (body, first) in firsts {
        let next = continued(body, &answer(&first), "Now give them a title.");
        reused_and_answered_as_cold(&s, next, &first).await;
    }
    assert_eq!(kept_files(&dir), (0, 0), "taken back, their files are gone");
}

/// After a restart, a conversation's next turn that comes while another stream decodes waits
/// for its rows to be read from the cache folder on a thread of their own, the stream going on
/// meanwhile: the turn still reuses its whole history and answers as a cold read does, and
/// the stream answers in full.
#[tokio::test]
async fn a_turn_coming_while_a_stream_decodes_has_its_rows_read_back_aside() {
    let dir = common::temp_dir("cache-dir-aside").join("kept");
    let args = ["--parallel", "2", "--cache-dir", dir.to_str().unwrap()];
    let s = Server::start(&args).await;
    let body = who_wrote("smollm2", "Ada");
    let first = s.chat(body.clone()).await;
    stop(s).await;

    let s = Server::start(&args).await;
    s.wait_log(&["read back", "conversations=1"]).await;
    let mut stream = s
        .stream(
            "/v1/chat/completions",
            &json!({"model": "smollm2", "stream": true, "max_tokens": 300, "ignore_eos": true,
                    "temperature": 0, "stream_options": {"include_usage": true},
                    "messages": [{"role": "user", "content": "Tell me a story."}]}),
        )
        .await;
    assert!(stream.first_text().await);
    let next = continued(body, &answer(&first), "Now give them a title.");
    reused_and_answered_as_cold(&s, next, &first).await;
    let log = s
        .wait_log(&["a conversation's rows read back from the cache folder"])
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("rows read back from the cache folder"))
        .unwrap();
    assert!(line.contains("aside=true"), "{line}");
    let rest = stream.collect().await;
    let usage: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 300, "{usage}");
    assert_eq!(kept_files(&dir), (0, 0), "taken back, its files are gone");
}

/// With `--cache-dir`, a model that unloads writes what it keeps into the folder (its host
/// memory freed), and its next load reads it back from there: the conversation's next turn
/// reuses its history and answers as a cold read does.
#[tokio::test]
async fn an_unloading_model_writes_its_conversations_to_the_cache_folder_and_reads_them_back() {
    let dir = common::temp_dir("cache-dir-unload");
    let s = Server::start(&["--parallel", "1", "--cache-dir", dir.to_str().unwrap()]).await;
    let body = who_wrote("smollm2", "Ada");
    let first = s.chat(body.clone()).await;
    let (status, r) = s
        .post(
            "/api/generate",
            &json!({"model": "smollm2", "keep_alive": 0}),
        )
        .await;
    assert_eq!(
        (status, r["done_reason"].as_str()),
        (200, Some("unload")),
        "{r}"
    );
    assert_eq!(kept_files(&dir), (1, 1));
    let gauge = |name: &str| format!("backstop_prompt_cache_{name}{{model=\"smollm2:latest\"}}");
    assert_eq!(
        s.metric(&gauge("bytes")).await,
        0.0,
        "nothing left in host memory"
    );
    assert!(s.metric(&gauge("file_bytes")).await > 0.0);
    let next = continued(body, &answer(&first), "Now give them a title.");
    reused_and_answered_as_cold(&s, next, &first).await;
    assert_eq!(kept_files(&dir), (0, 0), "read back, its files are gone");
    assert_eq!(s.metric(&gauge("file_bytes")).await, 0.0);
}

/// A cache folder that cannot be made stops the server at start, before it serves anything,
/// naming it.
#[tokio::test]
async fn a_cache_folder_that_cannot_be_made_is_refused_at_start() {
    let dir = common::temp_dir("cache-dir-file");
    let file = dir.join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let exit = serve_to_exit_with_folder(file.join("kept").to_str().unwrap()).await;
    assert_ne!(exit.code, Some(0));
    assert!(
        exit.stderr.contains("cache folder") && exit.stderr.contains("a-file/kept"),
        "{}",
        exit.stderr
    );
}

/// Files in the cache folder that cannot be used are removed with a warning, and the
/// conversation is read afresh, answering as a cold read does: rows cut short, and another
/// build's file (the binary after an upgrade). A file the server did not write stays.
#[tokio::test]
async fn cache_folder_files_that_cannot_be_used_are_removed_and_the_turn_read_afresh() {
    let dir = common::temp_dir("cache-dir-bad");
    let args = ["--parallel", "2", "--cache-dir", dir.to_str().unwrap()];
    let s = Server::start(&args).await;
    let ada = who_wrote("smollm2", "Ada");
    let bob = who_wrote("smollm2", "Bob");
    let a1 = s.chat(ada.clone()).await;
    let b1 = s.chat(bob.clone()).await;
    stop(s).await;
    assert_eq!(kept_files(&dir), (2, 2));
    let mut names: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|f| f.unwrap().path())
        .collect();
    names.sort();
    // One's rows are cut short; the other's say another build wrote them.
    let rows = names
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "seq"))
        .unwrap();
    let bytes = std::fs::read(rows).unwrap();
    std::fs::write(rows, &bytes[..bytes.len() / 2]).unwrap();
    let meta = names
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .nth(1)
        .unwrap();
    let mut m: Value = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
    m["build"] = json!("0.0.1|an older backstop");
    std::fs::write(meta, serde_json::to_vec(&m).unwrap()).unwrap();
    std::fs::write(dir.join("notes.txt"), "the operator's own file").unwrap();

    let s = Server::start(&args).await;
    s.wait_log(&["cannot be read removed"]).await;
    assert_eq!(kept_files(&dir), (0, 0));
    assert!(dir.join("notes.txt").exists());
    for (body, first, ask) in [(ada, a1, "A title?"), (bob, b1, "A subtitle?")] {
        read_afresh_and_answered_as_cold(&s, continued(body, &answer(&first), ask)).await;
    }
}

/// The server's log with each prompt's last logits in it (a digest of their bits).
const LOGITS_LOG: (&str, &str) = (
    "BACKSTOP_LOG",
    "info,llama-cpp-2=warn,backstop::engine::worker=debug",
);

/// The digests of the last logits of each prompt of `tokens` tokens in `log`, in order.
fn logits_of(log: &str, tokens: u64) -> Vec<String> {
    let prompt = format!(" prompt={tokens} ");
    log.lines()
        .filter(|l| l.contains("a prompt's last logits") && l.contains(&prompt))
        .filter_map(|l| l.split(" logits=").nth(1))
        .map(|d| d.split_whitespace().next().unwrap_or_default().to_owned())
        .collect()
}

/// The digests [`logits_of`] finds for prompts as long as `answer`'s, once the log holds at
/// least `least` of them: a line may still be in the pipe when the answer arrives.
async fn logged_logits(s: &Server, answer: &Value, least: usize) -> Vec<String> {
    let tokens = answer["usage"]["prompt_tokens"].as_u64().unwrap();
    let log = s
        .wait_log_for(
            |log| logits_of(log, tokens).len() >= least,
            format!("{least} logits lines for a prompt of {tokens}"),
        )
        .await;
    logits_of(&log, tokens)
}

/// A Gemma 3 chat: `who`'s notes of `n` phrases and a request for a summary.
fn gemma_notes(who: &str, n: usize) -> Value {
    let notes = lighthouse_notes(n);
    json!([{"role": "user", "content": format!("{who} wrote this. {notes}\nSummarize my notes.")}])
}

/// `first` (the chat that `r1` answered) with that answer and a question after it.
fn gemma_follow_up(first: &Value, r1: &Value, ask: &str) -> Value {
    json!([first[0], {"role": "assistant", "content": answer(r1)}, {"role": "user", "content": ask}])
}

/// Sends greedy `follow` on Gemma 3, the next turn of the chat `r1` answered, and checks that
/// it reuses that chat (all but the few tokens of its last segment that a cold read of the
/// follow-up reads otherwise) and that its prompt's last logits are, to the bit, those of the
/// same request read cold.
async fn gemma_reused_to_the_bit(s: &Server, follow: &Value, r1: &Value) {
    let warm = s.chat(gemma_chat(follow, 0.0, true, 8)).await;
    let earlier = r1["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached(&warm) + 16 >= earlier, "{warm}");
    let cold = s.chat(gemma_chat(follow, 0.0, false, 8)).await;
    assert_eq!(cached(&cold), 0);
    assert_eq!(answer(&warm), answer(&cold));
    let digests = logged_logits(s, &warm, 2).await;
    let [.., w, c] = &digests[..] else {
        unreachable!("two digests waited for");
    };
    assert_eq!(
        w, c,
        "the reused read's last logits differ from the cold read's"
    );
}

/// A Gemma 3 conversation past its 512-token window comes back from host memory with every
/// cell where a cold read puts it, those the window no longer sees included (llama.cpp leaves
/// them out of a sequence it writes out): a greedy follow-up reuses it and its last logits are
/// a cold read's to the bit, both before the window's 1,024 cells lap (about 760 tokens) and
/// after (about 1,800, its oldest cells written over).
#[tokio::test]
async fn a_gemma_conversation_kept_past_its_window_comes_back_cell_for_cell() {
    let model = format!("gemma={}", common::gemma3().display());
    let s = Server::start_with_env(&["--model", &model, "--parallel", "1"], &[LOGITS_LOG]).await;
    for (notes, least) in [(250, 700), (600, 1_700)] {
        let first = gemma_notes("Ada", notes);
        let r1 = s.chat(gemma_chat(&first, 0.0, true, 8)).await;
        assert!(
            r1["usage"]["prompt_tokens"].as_u64().unwrap() > least,
            "{r1}"
        );
        let other = json!([{"role": "user", "content": "Name three fruits."}]);
        s.chat(gemma_chat(&other, 0.0, true, 8)).await;
        let follow = gemma_follow_up(&first, &r1, "Now give them a title.");
        gemma_reused_to_the_bit(&s, &follow, &r1).await;
    }
}

/// The same after a restart, from the cache folder: both conversations' next turns reuse them
/// with every cell where a cold read puts it.
#[tokio::test]
async fn gemma_conversations_past_their_window_outlive_a_restart_cell_for_cell() {
    let dir = common::temp_dir("cache-dir-gemma");
    let model = format!("gemma={}", common::gemma3().display());
    let args = [
        "--model",
        &model,
        "--parallel",
        "2",
        "--cache-dir",
        dir.to_str().unwrap(),
    ];
    let s = Server::start_with_env(&args, &[LOGITS_LOG]).await;
    let firsts = [gemma_notes("Ada", 250), gemma_notes("Bob", 600)];
    let mut answered = Vec::new();
    for first in &firsts {
        answered.push(s.chat(gemma_chat(first, 0.0, true, 8)).await);
    }
    stop(s).await;
    assert_eq!(kept_files(&dir), (2, 2));
    let s = Server::start_with_env(&args, &[LOGITS_LOG]).await;
    for (first, r1) in firsts.iter().zip(&answered) {
        let follow = gemma_follow_up(first, r1, "Now give them a title.");
        gemma_reused_to_the_bit(&s, &follow, r1).await;
    }
    assert_eq!(kept_files(&dir), (0, 0));
}

/// Greedy `prompt` on Gemma 3 through `/v1/completions`, 8 tokens.
async fn gemma_complete(s: &Server, prompt: &str) -> Value {
    let body = json!({"model": "gemma", "prompt": prompt, "temperature": 0, "max_tokens": 8});
    let (status, r) = s.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{r}");
    r
}

/// A Gemma 3 conversation that lapped its window's 1,024 cells (none free) and is read on
/// from its very end (`--exact-reuse 0` reuses every token the slot holds) goes on, after a
/// round trip through host memory, in the cell it would have gone on in had it kept its slot:
/// llama.cpp continues from a cell with no position in it, so the oldest cell goes back as a
/// stray for that. The follow-up's last logits equal to the bit those of the same follow-up
/// on a server where the conversation never left its slot. The follow-up reads some 35 tokens
/// on: with the stray left out, a follow-up of 2 tokens changed the last bits at 2 of 6
/// lengths tried, and these 35 at each of the three below.
#[tokio::test]
async fn a_lapped_gemma_conversation_read_on_from_its_end_goes_on_in_the_cell_it_left() {
    let model = format!("gemma={}", common::gemma3().display());
    let args = ["--model", &model, "--parallel", "1", "--exact-reuse", "0"];
    let tail = " Then the keeper went down the stairs, counted the ships in the harbour, wrote \
        their names in the log, and slept until the bell rang at dawn. What did the keeper do?";
    for notes in [520, 560, 600] {
        let prompt = format!("Ada wrote this. {}\nSummary:", lighthouse_notes(notes));
        let mut seen = Vec::new();
        for round_trip in [false, true] {
            let s = Server::start_with_env(&args, &[LOGITS_LOG]).await;
            let r1 = gemma_complete(&s, &prompt).await;
            // The prompt and every answer token but the last, which was never read.
            let held = r1["usage"]["total_tokens"].as_u64().unwrap() - 1;
            assert!(
                held > 1_100 && held % 1_024 != 0,
                "lapped, going on mid-lap: {r1}"
            );
            if round_trip {
                gemma_complete(&s, "Name three fruits.").await;
            }
            let text = r1["choices"][0]["text"].as_str().unwrap();
            let warm = gemma_complete(&s, &format!("{prompt}{text}{tail}")).await;
            assert_eq!(cached(&warm), held, "{warm}");
            let digest = logged_logits(&s, &warm, 1)
                .await
                .pop()
                .expect("one digest waited for");
            seen.push((held, digest, warm["choices"][0]["text"].clone()));
        }
        assert_eq!(
            seen[0], seen[1],
            "the follow-up after the round trip differs from the one that kept its slot"
        );
    }
}

#[tokio::test]
async fn conversations_beyond_the_slots_keep_their_cache_in_host_memory() {
    conversations_beyond_the_slots_keep_their_cache("smollm2", &common::smollm2(), false).await;
}

#[tokio::test]
async fn gemma_conversations_beyond_the_slots_keep_their_cache_in_host_memory() {
    conversations_beyond_the_slots_keep_their_cache("gemma", &common::gemma3(), true).await;
}

/// Answer tokens that model `name` (served untagged, so named `name:latest`) has read again
/// so far.
async fn reread_tokens(s: &Server, name: &str) -> f64 {
    s.metric(&format!(
        "backstop_reread_tokens_total{{model=\"{name}:latest\"}}"
    ))
    .await
}

/// Waits until model `name` has read at least `least` more answer tokens again than
/// `before` and then read nothing more for a second: the re-read has ended.
async fn reread_settles(s: &Server, name: &str, before: f64, least: f64) -> f64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = reread_tokens(s, name).await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = reread_tokens(s, name).await;
        if now - before >= least && now == last {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} answer tokens read again, {least} expected",
            now - before
        );
        last = now;
    }
}

/// While a server is idle it reads a greedy or seeded answer again as a cold read of the
/// conversation reads it (`--reread-answers`, on outside the tests), so the next turn reuses
/// the answer too, where otherwise it reuses only the first turn's prompt
/// (`follow_up_answers_as_a_cold_server_does`); and it still answers exactly as a server that
/// never saw the conversation does, greedy and seeded, also where flash attention's query
/// tiles set the grain.
async fn an_idle_server_reads_answers_again_for_the_next_turn(
    name: &str,
    path: &std::path::Path,
    flash: bool,
) {
    let model = format!("{name}={}", path.display());
    let flash = if flash { "1" } else { "0" };
    let args = [
        "--model",
        &model,
        "--parallel",
        "2",
        "--flash-attention",
        flash,
    ];
    let s = Server::start_raw(&[&args[..], &["--reread-answers", "1"]].concat()).await;
    let mut turns = vec![(
        "user",
        "Name three fruits and say why you like each.".to_owned(),
    )];
    let body = |turns: &[(&str, String)], extra: Value| {
        let turns: Vec<(&str, &str)> = turns.iter().map(|(r, c)| (*r, c.as_str())).collect();
        let mut b = json!({"model": name, "messages": garden(&turns), "max_tokens": 40,
                           "ignore_eos": true});
        if let Value::Object(extra) = extra {
            b.as_object_mut().unwrap().extend(extra);
        }
        b
    };
    let mut said = s.chat(body(&turns, json!({"temperature": 0}))).await;
    let mut read = 0.0;
    for (question, sampling) in [
        ("Which one is yellow?", json!({"temperature": 0})),
        (
            "Which one grows on trees?",
            json!({"temperature": 0.8, "seed": 7}),
        ),
    ] {
        let prompt = said["usage"]["prompt_tokens"].as_u64().unwrap();
        let answered = said["usage"]["completion_tokens"].as_u64().unwrap();
        assert_eq!(answered, 40, "{said}");
        read = reread_settles(&s, name, read, (answered - 1) as f64).await;
        turns.push(("assistant", answer(&said)));
        turns.push(("user", question.to_owned()));
        let warm = s.chat(body(&turns, sampling.clone())).await;
        let cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        if flash == "0" {
            // All of the previous turn, its answer too, up to an aligned position (16 rows
            // for Gemma's repacked weights) that leaves its kernel's rows of this one to read.
            assert!(
                cached + 16 >= prompt + answered,
                "{name}: reused {cached} of {prompt} + {answered}: {warm}"
            );
        } else {
            // With flash attention a segment of 64 rows or more is read in query tiles and
            // reuse leaves 64 of its rows to read: here the one that holds the answer (from
            // the turn marker before it to the one after it), so reuse cannot reach far
            // into the answer; what is checked is that the rows read again are a cold read's.
            assert!(cached >= 64, "{warm}");
        }
        let cold = Server::start_raw(&args).await;
        let cold = cold.chat(body(&turns, sampling.clone())).await;
        assert_eq!(
            answer(&warm),
            answer(&cold),
            "{name}, flash attention {flash}: {sampling}"
        );
        said = warm;
    }
}

#[tokio::test]
async fn an_idle_server_reads_answers_again_on_smollm2() {
    an_idle_server_reads_answers_again_for_the_next_turn("smollm2", &common::smollm2(), false)
        .await;
}

#[tokio::test]
async fn an_idle_server_reads_answers_again_on_gemma() {
    an_idle_server_reads_answers_again_for_the_next_turn("gemma", &common::gemma3(), false).await;
}

#[tokio::test]
async fn an_idle_server_reads_answers_again_on_gemma_with_flash_attention() {
    an_idle_server_reads_answers_again_for_the_next_turn("gemma", &common::gemma3(), true).await;
}

/// Reading an answer again waits until every model is idle, not only its own: while another
/// model streams, it would take turns with that stream's steps and stretch its gaps between
/// tokens. Once the stream has ended, the answer is read again.
#[tokio::test]
async fn an_answer_is_read_again_only_once_every_model_is_idle() {
    let smollm2 = format!("smollm2={}", common::smollm2().display());
    let gemma = format!("gemma={}", common::gemma3().display());
    let s = Server::start_raw(&[
        "--model",
        &smollm2,
        "--model",
        &gemma,
        "--reread-answers",
        "1",
    ])
    .await;
    let question = |model: &str, extra: Value| {
        let mut b = json!({"model": model, "max_tokens": 40, "ignore_eos": true,
                           "messages": garden(&[("user", "Name three fruits.")])});
        if let Value::Object(extra) = extra {
            b.as_object_mut().unwrap().extend(extra);
        }
        b
    };
    // Gemma first, so that it is loaded and its stream starts at once; sampled without a
    // seed, its own answers are never read again.
    s.chat(question("gemma", json!({"max_tokens": 1}))).await;
    let said = s.chat(question("smollm2", json!({"temperature": 0}))).await;
    assert_eq!(said["usage"]["completion_tokens"], 40, "{said}");
    let mut stream = s
        .stream(
            "/v1/chat/completions",
            &question("gemma", json!({"stream": true, "max_tokens": 100})),
        )
        .await;
    assert!(stream.first_text().await);
    // What was read before Gemma's first step (the test may have been slow to ask).
    let before = reread_tokens(&s, "smollm2").await;
    let mut streamed = 1;
    while streamed < 60 {
        let payload = stream.next_data().await.expect("the stream ended early");
        streamed += usize::from(common::chunk_text(&payload).is_some_and(|t| !t.is_empty()));
    }
    assert_eq!(
        reread_tokens(&s, "smollm2").await,
        before,
        "SmolLM2 read its answer again while Gemma streamed"
    );
    let rest = stream.collect().await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    reread_settles(&s, "smollm2", 0.0, 39.0).await;
}

/// Threads of this process that keep every core busy until the flag is lowered: another
/// program using the machine, as backstop sees it.
fn burn_cores(
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (0..cores).map(|_| burn(stop, None)).collect()
}

/// A thread of this process that keeps a core busy (CPU `cpu`, or any) until the flag is
/// lowered.
fn burn(
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    cpu: Option<usize>,
) -> std::thread::JoinHandle<()> {
    let stop = std::sync::Arc::clone(stop);
    std::thread::spawn(move || {
        if let Some(cpu) = cpu {
            common::pin_to_cpu(cpu).expect("held to one CPU");
        }
        let mut x = 1u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    })
}

/// The first CPU this process may run on.
fn first_cpu() -> usize {
    backstop::config::cores::allowed_cpus()
        .and_then(|cpus| cpus.first().copied())
        .expect("a CPU to run on")
}

/// Reading an answer again also waits while other processes keep the cores busy: llama.cpp's
/// threads and theirs would spin against each other, and on a 2-core machine another server's
/// stream ran at a tenth of its speed. Once the cores are free, the answer is read again.
#[tokio::test]
async fn an_answer_is_read_again_only_once_other_processes_leave_the_cores_free() {
    let s = Server::start(&["--reread-answers", "1"]).await;
    read_again_once_burners_stop(&s, burn_cores, "every core").await;
}

/// Asks `s` for a greedy answer while the threads `burners` starts keep cores busy (from
/// before the answer ends, so that every window the server reads after it is busy), checks
/// that none of it is read again meanwhile, then stops them and waits for the re-read.
async fn read_again_once_burners_stop(
    s: &Server,
    burners: impl FnOnce(
        &std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Vec<std::thread::JoinHandle<()>>,
    busy: &str,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burners = burners(&stop);
    let said = s
        .chat(
            json!({"model": "smollm2", "max_tokens": 40, "ignore_eos": true, "temperature": 0,
                     "messages": garden(&[("user", "Name three fruits.")])}),
        )
        .await;
    assert_eq!(said["usage"]["completion_tokens"], 40, "{said}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = reread_tokens(s, "smollm2").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in burners {
        b.join().expect("burner thread");
    }
    assert_eq!(
        during, 0.0,
        "the answer was read again while other work kept {busy} busy"
    );
    reread_settles(s, "smollm2", 0.0, 39.0).await;
}

/// What counts is the CPUs the server may run on, not the whole machine: held to one CPU
/// (`taskset`, a container's cpuset), with another program busy on that CPU alone, the
/// answer is not read again though the machine's other CPUs are free; once that CPU is free,
/// it is.
#[tokio::test]
async fn an_answer_is_read_again_only_once_the_cpus_the_server_may_use_are_free() {
    let cpu = first_cpu();
    let s = Server::start_on_cpu(&["--reread-answers", "1"], cpu).await;
    let one = |stop: &_| vec![burn(stop, Some(cpu))];
    read_again_once_burners_stop(&s, one, "the server's one CPU").await;
}

/// Under a CPU quota (`docker --cpus 1`) what counts is the quota, not the idle CPUs: with
/// another program of the server's group taking the whole quota, the answer is not read
/// again though a CPU of the machine is free; once the program stops, it is. Needs a
/// writable cgroup file system (root), as CI's has.
#[tokio::test]
async fn an_answer_is_read_again_only_once_the_cpu_quota_of_its_group_is_free() {
    let Some(quota) = common::CpuQuota::new(1.0).map(std::sync::Arc::new) else {
        eprintln!("skipped: no writable cgroup file system with the cpu controller (not root)");
        return;
    };
    // Declared after the group, so the server has exited when the group is removed.
    let s = Server::start_in(&["--reread-answers", "1"], &quota).await;
    let in_group = |stop: &std::sync::Arc<std::sync::atomic::AtomicBool>| {
        let stop = std::sync::Arc::clone(stop);
        let quota = std::sync::Arc::clone(&quota);
        vec![std::thread::spawn(move || {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", "while :; do :; done"]);
            quota.hold(&mut cmd);
            let mut busy = cmd.spawn().expect("a busy shell in the group");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            busy.kill().expect("stop the busy shell");
            busy.wait().expect("reap the busy shell");
        })]
    };
    read_again_once_burners_stop(&s, in_group, "the server's CPU quota").await;
}

/// With `--exact-reuse 0` a greedy follow-up that comes at once reuses the whole
/// conversation, the answer's rows as they were computed, as a sampled request (and
/// llama.cpp's server) does: all but the token that gives fresh logits.
#[tokio::test]
async fn without_exact_reuse_a_greedy_follow_up_reuses_the_answer_as_computed() {
    for exact in ["1", "0"] {
        let s = Server::start(&["--parallel", "2", "--exact-reuse", exact]).await;
        let body = |turns: &[(&str, &str)]| {
            json!({"model": "smollm2", "messages": garden(turns), "temperature": 0,
                   "max_tokens": 40, "ignore_eos": true})
        };
        let first = s.chat(body(&[("user", "Name three fruits.")])).await;
        let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
        let said = answer(&first);
        let follow = s
            .chat(body(&[
                ("user", "Name three fruits."),
                ("assistant", &said),
                ("user", "Which one is yellow?"),
            ]))
            .await;
        let cached = follow["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        if exact == "1" {
            // Exact reuse stops before the answer, whose rows are read again.
            assert!(
                cached <= prompt,
                "reused {cached} of {prompt} + 40: {follow}"
            );
        } else {
            // The 39 answer rows fed back are reused as they are.
            assert!(
                cached >= prompt + 39,
                "reused {cached} of {prompt} + 40: {follow}"
            );
        }
    }
}

/// Gemma 3's sliding-window layers (a 512-token window) cache their window and one batch,
/// 1,024 cells a sequence here, not the whole context, as llama.cpp's server does;
/// `--swa-full` caches the whole context. A conversation longer than that writes over its
/// oldest positions. A follow-up still reuses it, since reading on needs only the window
/// before its new part: sampled without a seed, up to where the prompts part; greedy, as far as
/// exact reuse goes, and it answers as a cold read does. With `--swa-full` the server holds
/// more memory.
#[tokio::test]
async fn a_gemma_conversation_past_its_sliding_window_is_reused_as_far_as_the_cache_allows() {
    let model = format!("gemma={}", common::gemma3().display());
    let notes = lighthouse_notes(400);
    let mut resident = Vec::new();
    for full in [false, true] {
        let mut args = vec!["--model", &model, "--parallel", "2"];
        if full {
            args.push("--swa-full");
        }
        let s = Server::start_raw(&args).await;
        resident.push(rss_anon(s.pid()));
        let first = json!([{"role": "user", "content": format!("{notes}\nSummarize my notes.")}]);
        let r1 = s.chat(gemma_chat(&first, 0.8, true, 8)).await;
        let first_prompt = r1["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(first_prompt > 1100, "{r1}");
        let follow = json!([
            first[0],
            {"role": "assistant", "content": answer(&r1)},
            {"role": "user", "content": "Now give them a title."}
        ]);
        // Sampled without a seed: the conversation is reused but for its last few tokens
        // (the answer's end, read back from text, and the new turn).
        let sampled = s.chat(gemma_chat(&follow, 0.8, true, 8)).await;
        assert!(
            cached(&sampled) + 16 >= first_prompt,
            "full {full}: {sampled}"
        );
        let greedy = s.chat(gemma_chat(&follow, 0.0, true, 8)).await;
        assert!(cached(&greedy) >= 1024, "full {full}: {greedy}");
        let cold = s.chat(gemma_chat(&follow, 0.0, false, 8)).await;
        assert_eq!(cached(&cold), 0, "{cold}");
        assert_eq!(answer(&greedy), answer(&cold), "full {full}");
    }
    // Two slots of 4,096 positions: 15 sliding-window layers of 1 KiB a position keep 3,072
    // positions less each, 90 MiB in all.
    let saved = resident[1].saturating_sub(resident[0]);
    assert!(saved > 80 << 20, "{resident:?}");
}

/// A greedy follow-up does not reuse a sliding-window cache whose cells no longer sit where a
/// cold read puts them. Each sequence's 1,024 cells take position p in cell p mod 1,024, as a
/// cold read does, until a removal frees cells on both sides of cell 1,023. Here the first
/// answer runs from below position 1,024 to above it, so a follow-up that reuses less than
/// 1,024 positions removes both: a greedy one reads the conversation afresh instead, and
/// answers as a cold read does; a sampled one reuses it, and from then on the slot's order is
/// not a cold read's, so a greedy turn after it reads afresh too.
#[tokio::test]
async fn a_greedy_follow_up_reads_afresh_where_reuse_would_put_a_sliding_window_out_of_order() {
    let s = Server::start_with_env(
        &[
            "--model",
            &format!("gemma={}", common::gemma3().display()),
            "--parallel",
            "2",
        ],
        &[("BACKSTOP_LOG", "info,llama-cpp-2=info")],
    )
    .await;
    // What the rule assumes is what llama.cpp made.
    s.wait_log(&["SWA KV cache, size = 1024 cells", "cells=1024"])
        .await;
    let first = json!([{"role": "user",
                        "content": format!("{}\nSummarize my notes.", lighthouse_notes(280))}]);
    let probe = s.chat(gemma_chat(&first, 0.0, false, 1)).await;
    let first_prompt = probe["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((700..1000).contains(&first_prompt), "{probe}");
    // The answer's tokens but the last are read into the cache: up to position 1,099. Asked
    // again, the turn is read afresh into the same slot (it shares the most with it), and
    // the slot is as it was.
    let first_turn = || async {
        let mut body = gemma_chat(&first, 0.0, true, 1100 - first_prompt);
        body["ignore_eos"] = json!(true);
        let r1 = s.chat(body).await;
        assert_eq!(
            r1["usage"]["completion_tokens"].as_u64(),
            Some(1100 - first_prompt)
        );
        answer(&r1)
    };
    let said = first_turn().await;
    let follow = json!([
        first[0],
        {"role": "assistant", "content": said},
        {"role": "user", "content": "Now give them a title."}
    ]);
    let greedy = s.chat(gemma_chat(&follow, 0.0, true, 8)).await;
    assert_eq!(cached(&greedy), 0, "{greedy}");
    let cold = s.chat(gemma_chat(&follow, 0.0, false, 8)).await;
    assert_eq!(answer(&greedy), answer(&cold));

    assert_eq!(first_turn().await, said);
    let other = json!([
        first[0],
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Now give them a title."}
    ]);
    let sampled = s.chat(gemma_chat(&other, 0.8, true, 8)).await;
    assert!(
        (first_prompt - 8..1024).contains(&cached(&sampled)),
        "{sampled}"
    );
    let next = json!([
        other[0], other[1], other[2],
        {"role": "assistant", "content": answer(&sampled)},
        {"role": "user", "content": "Shorter."}
    ]);
    let greedy = s.chat(gemma_chat(&next, 0.0, true, 8)).await;
    assert_eq!(cached(&greedy), 0, "{greedy}");
    let cold = s.chat(gemma_chat(&next, 0.0, false, 8)).await;
    assert_eq!(answer(&greedy), answer(&cold));
}

/// `n` phrases of notes, about 3.2 Gemma tokens each.
fn lighthouse_notes(n: usize) -> String {
    let phrases = [
        "the keeper",
        "climbed the stairs",
        "of the old lighthouse",
        "and wrote down",
        "which ships had passed",
    ];
    let notes: Vec<&str> = (0..n).map(|i| phrases[i % phrases.len()]).collect();
    format!("My notes: {}.", notes.join(" "))
}

fn gemma_chat(messages: &Value, temperature: f64, cache: bool, max_tokens: u64) -> Value {
    json!({"model": "gemma", "messages": messages, "temperature": temperature,
           "max_tokens": max_tokens, "cache_prompt": cache})
}

fn cached(r: &Value) -> u64 {
    r["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("usage.prompt_tokens_details.cached_tokens")
}

/// Anonymous resident memory of a process (its KV cache and buffers, not the mapped model).
fn rss_anon(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib << 10
}

/// A prompt read while another request generates is read in calls of its own, as a cold read
/// reads it: a greedy follow-up turn reuses it, and answers as a server that never saw the
/// first turn. (Without flash attention: its grain lets the paced 16-token chunks of a busy
/// 2-core machine be exact too; with it, a segment of 64 rows or more needs 64-row chunks.)
#[tokio::test]
async fn a_prompt_read_beside_a_running_stream_is_reused_by_a_greedy_follow_up() {
    let path = common::smollm2();
    let s = two_slots("smollm2", &path, Some(false)).await;
    let mut running = s
        .stream(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": "Once upon a time,", "max_tokens": 3000,
                    "ignore_eos": true, "temperature": 0, "stream": true}),
        )
        .await;
    // Keep reading, so the running stream takes part in every step.
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let received = std::sync::Arc::clone(&received);
        tokio::spawn(async move {
            while running.next_data().await.is_some() {
                received.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    while received.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let before = received.load(std::sync::atomic::Ordering::SeqCst);

    let first = garden(&[("user", "Name three fruits.")]);
    let greedy = |messages: &Value| json!({"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 24});
    let r1 = s.chat(greedy(&first)).await;
    let first_prompt = r1["usage"]["prompt_tokens"].as_u64().unwrap();
    let follow = garden(&[
        ("user", "Name three fruits."),
        ("assistant", &answer(&r1)),
        ("user", "Which one is yellow?"),
    ]);
    let warm = s.chat(greedy(&follow)).await;
    let during = received.load(std::sync::atomic::Ordering::SeqCst) - before;
    // It kept going: the prompts were read beside its tokens.
    assert!(
        during >= 4,
        "the other stream got only {during} tokens meanwhile"
    );
    let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(cached, first_prompt.min(prompt - 4) / 16 * 16, "{warm}");
    assert!(cached >= 64, "{warm}");
    reader.abort();

    let cold = two_slots("smollm2", &path, Some(false))
        .await
        .chat(greedy(&follow))
        .await;
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(answer(&warm), answer(&cold));
}

/// Requests sharing a long system prompt reuse its KV entries, and the answer is exactly
/// what a server that never saw the first request gives, greedy or seeded.
#[tokio::test]
async fn a_shared_system_prompt_is_reused_and_the_answer_matches_a_cold_server() {
    let asking = |q: &str, temperature: f64| {
        json!({"model": "smollm2", "temperature": temperature, "seed": 11, "max_tokens": 24,
               "messages": garden(&[("user", q)])})
    };
    let s = Server::start(&["--parallel", "2"]).await;
    s.chat(asking("What is a rose?", 0.0)).await;
    for temperature in [0.0, 0.9] {
        let warm = s
            .chat(asking("How tall do oak trees grow?", temperature))
            .await;
        let cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(cached >= 60, "only {cached} tokens reused: {warm}");

        let cold_server = Server::start(&["--parallel", "2"]).await;
        let cold = cold_server
            .chat(asking("How tall do oak trees grow?", temperature))
            .await;
        assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(answer(&warm), answer(&cold));
    }
}

/// Warm answers are cold answers, on both models, for prompts that share prefixes of every
/// length: a follow-up under the same system prompt reuses its cache as `policy::Grain`
/// allows, and `cache_prompt: false` (llama.cpp server's switch) reads the same prompt
/// afresh. Gemma's repacked Q4_K weights make about a quarter of such answers differ when the
/// reuse is not aligned to 4 positions; flash attention, most when fewer than 64 rows are
/// left to read. One test per model and setting, so the harness runs them beside others.
#[tokio::test]
async fn warm_answers_match_cold_reads_for_prefixes_of_every_length_on_smollm2() {
    warm_answers_match_cold_reads("smollm2", &common::smollm2(), Some(true), 0x2545_f491).await;
}

#[tokio::test]
async fn warm_answers_match_cold_reads_for_prefixes_of_every_length_on_gemma() {
    warm_answers_match_cold_reads(
        "gemma",
        &common::gemma3(),
        Some(true),
        0x2a74_a25a_6704_2dc4,
    )
    .await;
}

#[tokio::test]
async fn warm_answers_match_cold_reads_for_prefixes_of_every_length_on_gemma_without_flash_attention(
) {
    warm_answers_match_cold_reads(
        "gemma",
        &common::gemma3(),
        Some(false),
        0xf8cc_b7a4_cf3a_63b3,
    )
    .await;
}

/// Eight cases of a system prompt and questions of pseudo-random words (from `seed`), each
/// asked warm and cold, greedy and seeded: the answers must match, and at least seven of
/// the warm reads must reuse a prefix. (The Gemma tests' seeds are where the smollm2 test's
/// words, then the first Gemma test's, leave the generator: the prompts of the single test
/// these three were.)
async fn warm_answers_match_cold_reads(
    name: &str,
    path: &std::path::Path,
    flash: Option<bool>,
    seed: u64,
) {
    const WORDS: [&str; 16] = [
        "roses",
        "tulips",
        "oak",
        "pond",
        "ducks",
        "paths",
        "ferns",
        "orchids",
        "the",
        "and",
        "old",
        "greenhouse",
        "children",
        "near",
        "cacti",
        "water",
    ];
    let mut state = seed;
    let mut words = |n: u64| {
        let mut out = Vec::new();
        for _ in 0..n {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            out.push(WORDS[(state >> 60) as usize]);
        }
        out.join(" ")
    };
    let s = two_slots(name, path, flash).await;
    let mut reused = 0;
    for case in 0..8u64 {
        let system = words(3 + case * 13);
        let ask = |q: &str, cache: bool| {
            json!({"model": name, "temperature": 0, "max_tokens": 16, "cache_prompt": cache,
                   "messages": [{"role": "system", "content": system},
                                {"role": "user", "content": q}]})
        };
        // Both questions are long enough to be read with flash attention's tiled kernel (64
        // rows or more), like the cold read; only rows read that way are reused.
        s.chat(ask(&words(60 + case % 5), true)).await;
        let question = words(60 + case * 7 % 30);
        let warm = s.chat(ask(&question, true)).await;
        let cold = s.chat(ask(&question, false)).await;
        if warm["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(0) {
            reused += 1;
        }
        assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(
            answer(&warm),
            answer(&cold),
            "{name} {flash:?}, case {case}: {warm}"
        );
        // Sampling notices what a greedy answer may not: logits a hair apart. The same
        // prompt again starts from the kept logits of the warm read.
        let seeded = |mut body: Value| {
            body["temperature"] = json!(1.0);
            body["seed"] = json!(case);
            body
        };
        let warm = s.chat(seeded(ask(&question, true))).await;
        let cold = s.chat(seeded(ask(&question, false))).await;
        assert_eq!(
            answer(&warm),
            answer(&cold),
            "{name} {flash:?}, case {case}, seeded: {warm}"
        );
    }
    assert!(
        reused >= 7,
        "{name} {flash:?}: only {reused} of 8 reused a prefix"
    );
}

/// A batch under two flash-attention tiles (`serve --batch 100`) would cut a 124-row system
/// turn into 100 rows read with query tiles and 24 read row by row, where a warm read takes the
/// last 64 rows in one tiled call: the server raises such a batch (with a warning), so warm
/// answers stay cold answers.
#[tokio::test]
async fn a_small_batch_keeps_warm_answers_cold_answers() {
    let s = Server::start(&[
        "--parallel",
        "2",
        "--batch",
        "100",
        "--flash-attention",
        "1",
    ])
    .await;
    let system = "You are a careful assistant for a hardware store. ".repeat(12);
    let ask = |q: &str, cache: bool| {
        json!({"model": "smollm2", "temperature": 0, "max_tokens": 24, "cache_prompt": cache,
               "messages": [{"role": "system", "content": system},
                            {"role": "user", "content": q}]})
    };
    let questions = [
        "What glue should I use for wood?",
        "How do I fix a leaking tap?",
        "Which screws hold drywall?",
    ];
    let mut cold = Vec::new();
    for q in questions {
        cold.push(answer(&s.chat(ask(q, false)).await));
    }
    for (q, cold) in questions.iter().zip(&cold) {
        let warm = s.chat(ask(q, true)).await;
        assert!(
            warm["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(0),
            "{warm}"
        );
        assert_eq!(&answer(&warm), cold, "{q}: {warm}");
    }
    // The batch asked for was raised, and said so: with `--batch` ignored (512) this test
    // would pass without the raise.
    s.wait_log(&["batch raised", "asked=100", "batch=128"])
        .await;
}

/// A prompt the server has just read is not read again: its first token comes from the
/// logits kept from that read, and the answer is the one a cold read gives, greedy, seeded
/// or (whole-prompt hits serve it too) sampled without a seed.
#[tokio::test]
async fn the_same_prompt_again_reads_nothing_and_answers_the_same() {
    let s = Server::start(&["--parallel", "2"]).await;
    let body = |temperature: f64, seed: Option<u64>| {
        let mut b = json!({"model": "smollm2", "temperature": temperature, "max_tokens": 24,
                           "messages": garden(&[("user", "Which flowers smell sweetest?")])});
        if let Some(seed) = seed {
            b["seed"] = json!(seed);
        }
        b
    };
    let prompt_read = "backstop_prompt_tokens_evaluated_total";
    for (temperature, seed) in [(0.0, None), (0.9, Some(5))] {
        let cold = Server::start(&[]).await.chat(body(temperature, seed)).await;
        let first = s.chat(body(temperature, seed)).await;
        assert_eq!(answer(&first), answer(&cold));
        let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
        let read_before = s.metric(prompt_read).await;
        let again = s.chat(body(temperature, seed)).await;
        assert_eq!(
            again["usage"]["prompt_tokens_details"]["cached_tokens"], prompt,
            "{again}"
        );
        assert_eq!(
            s.metric(prompt_read).await,
            read_before,
            "the prompt was read again"
        );
        assert_eq!(answer(&again), answer(&cold), "temperature {temperature}");
    }
    let unseeded = s.chat(body(0.9, None)).await;
    assert_eq!(
        unseeded["usage"]["prompt_tokens_details"]["cached_tokens"],
        unseeded["usage"]["prompt_tokens"],
        "{unseeded}"
    );
}

/// A request whose prompt a busy slot holds gets a copy of that slot's cache instead of
/// reading the prompt: concurrent requests with the same system prompt or question. The
/// copy is the very KV entries, so the answer is still a cold read's.
#[tokio::test]
async fn a_prompt_held_by_a_busy_slot_is_copied_not_read() {
    let s = Server::start(&["--parallel", "2"]).await;
    let body = |max_tokens: u32, stream: bool| {
        json!({"model": "smollm2", "temperature": 0, "max_tokens": max_tokens, "stream": stream,
               "messages": garden(&[("user", "Describe a walk through the rose garden.")])})
    };
    let cold = s.chat(body(24, false)).await;
    let prompt = cold["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // The same prompt, streaming a long answer, takes the slot that read it; the other slot
    // has held nothing yet.
    let mut busy = s.stream("/v1/chat/completions", &body(400, true)).await;
    assert!(busy.first_text().await);
    // A different question under the same long system prompt goes to the empty slot, which
    // copies the busy one's system prompt (up to an aligned position) and reads the rest.
    let other = s
        .chat(
            json!({"model": "smollm2", "temperature": 0, "max_tokens": 8,
                     "messages": garden(&[("user", "Is the cafe open?")])}),
        )
        .await;
    let cached = other["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 64, "{other}");
    // That slot now holds most of the first prompt too (the question's segment differs);
    // something unrelated takes its place, so only the busy slot holds the first prompt.
    s.chat(
        json!({"model": "smollm2", "temperature": 0, "max_tokens": 2,
                  "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    // The first prompt again: the free slot shares a few tokens, the busy one the whole
    // prompt with its logits, so that is copied and nothing is read.
    let read_before = s.metric("backstop_prompt_tokens_evaluated_total").await;
    let copied = s.chat(body(24, false)).await;
    assert_eq!(
        copied["usage"]["prompt_tokens_details"]["cached_tokens"], prompt,
        "{copied}"
    );
    assert_eq!(
        s.metric("backstop_prompt_tokens_evaluated_total").await,
        read_before,
        "the prompt was read again"
    );
    assert_eq!(answer(&copied), answer(&cold));
    drop(busy);
}

/// Requests that arrive together with the same long system prompt read it once: the first
/// reads it, the others wait until it has and copy it, and every answer is still the one a
/// cold read gives.
#[tokio::test]
async fn requests_arriving_together_read_a_shared_system_prompt_once() {
    let s = Server::start(&["--parallel", "2"]).await;
    let ask = |question: &str, cache: bool| {
        json!({"model": "smollm2", "temperature": 0, "max_tokens": 12, "cache_prompt": cache,
               "messages": garden(&[("user", question)])})
    };
    let questions = ["Is the cafe open on Mondays?", "Where do the tulips grow?"];
    let mut cold = Vec::new();
    for q in questions {
        cold.push(answer(&s.chat(ask(q, false)).await));
    }
    // Both slots generate long unrelated answers, so the two requests queue together.
    let hold = |i: usize| {
        json!({"model": "smollm2", "temperature": 0, "max_tokens": 2000, "stream": true,
               "ignore_eos": true,
               "messages": [{"role": "user", "content": format!("Count from {i} to a million.")}]})
    };
    let mut held = Vec::new();
    for i in 0..2 {
        // Its prompt is read once it shows text, so nothing below counts it.
        let mut h = s.stream("/v1/chat/completions", &hold(i)).await;
        assert!(h.first_text().await);
        held.push(h);
    }
    let burst: Vec<_> = questions
        .iter()
        .map(|q| {
            let (client, url, body) = (
                reqwest::Client::new(),
                s.url("/v1/chat/completions"),
                ask(q, true),
            );
            tokio::spawn(async move {
                let resp = client.post(url).json(&body).send().await.unwrap();
                resp.json::<Value>().await.unwrap()
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.metric("backstop_queue_depth").await < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the requests never queued"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let read_before = s.metric("backstop_prompt_tokens_evaluated_total").await;
    drop(held);
    let mut answers = Vec::new();
    for task in burst {
        answers.push(task.await.unwrap());
    }
    let prompt: u64 = answers
        .iter()
        .map(|a| a["usage"]["prompt_tokens"].as_u64().unwrap())
        .sum();
    let cached: Vec<u64> = answers
        .iter()
        .map(|a| {
            a["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
        })
        .collect();
    // The garden's system prompt is over 100 tokens; one request read it, the other copied
    // it (up to an aligned position).
    assert!(cached.iter().any(|&c| c >= 96), "{answers:?}");
    let read = s.metric("backstop_prompt_tokens_evaluated_total").await - read_before;
    assert!(
        read <= (prompt - 96) as f64,
        "read {read} of {prompt} prompt tokens, cached {cached:?}"
    );
    for (a, c) in answers.iter().zip(&cold) {
        assert_eq!(&answer(a), c, "{a}");
    }
}

/// SmolLM2's weights are not repacked, so each of its rows comes out alike whatever else its
/// chunk holds (`policy::Grain::row_wise`): a question that shares the start of the previous
/// one reuses every shared row, not a multiple of 16, reads the rest of itself and the
/// closing turn markers in one `llama_decode` call, and still answers as a cold read does,
/// greedy and seeded.
#[tokio::test]
async fn a_model_read_row_by_row_reuses_every_shared_row_and_reads_the_rest_in_one_call() {
    let s = Server::start(&["--parallel", "1"]).await;
    let ask = |q: &str, cache: bool, temperature: f64| {
        json!({"model": "smollm2", "temperature": temperature, "seed": 7, "max_tokens": 16,
               "ignore_eos": true, "cache_prompt": cache,
               "messages": [{"role": "user", "content": q}]})
    };
    let head = "Tell me about the old greenhouse near the pond";
    for temperature in [0.0, 1.0] {
        s.chat(ask(&format!("{head} and the ducks?"), true, temperature))
            .await;
        let question = format!("{head} where the children feed the fish?");
        let steps = s.metric("backstop_decode_steps_total").await;
        let read = s.metric("backstop_prompt_tokens_evaluated_total").await;
        let warm = s.chat(ask(&question, true, temperature)).await;
        let steps = s.metric("backstop_decode_steps_total").await - steps;
        let read = s.metric("backstop_prompt_tokens_evaluated_total").await - read;
        let usage = &warm["usage"];
        let prompt = usage["prompt_tokens"].as_u64().unwrap();
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        // The default system turn (19 tokens) and the 14 the two questions share (16-row
        // grouping would reuse only the 19).
        assert_eq!(cached, 33, "{warm}");
        assert_eq!(read, (prompt - cached) as f64);
        // One call reads the prompt and gives the first token; 15 more give the rest.
        assert_eq!(steps, 16.0, "{warm}");
        let cold = s.chat(ask(&question, false, temperature)).await;
        assert_eq!(answer(&warm), answer(&cold), "temperature {temperature}");
    }
}

/// Each penalty really reaches the sampler: a greedy answer that repeats itself changes.
#[tokio::test]
async fn penalties_change_a_repetitive_greedy_answer() {
    let s = Server::start(&[]).await;
    let question = "Write the word apple twenty times, separated by spaces.";
    let base =
        json!({"model": "smollm2", "messages": ask(question), "temperature": 0, "max_tokens": 40});
    let plain = answer(&s.chat(base.clone()).await);
    for field in ["repeat_penalty", "presence_penalty", "frequency_penalty"] {
        let mut b = base.clone();
        b[field] = json!(1.5);
        let penalised = answer(&s.chat(b).await);
        assert_ne!(penalised, plain, "{field} changed nothing");
    }
    // Ollama's window: 0 switches the penalty off, -1 is the whole context (not "off").
    let ollama = |last_n: i64, penalty: f64| {
        json!({"model": "smollm2", "messages": ask(question), "stream": false,
               "options": {"temperature": 0, "num_predict": 40,
                           "repeat_penalty": penalty, "repeat_last_n": last_n}})
    };
    let text = |r: Value| r["message"]["content"].as_str().unwrap().to_owned();
    let (_, off) = s.post("/api/chat", &ollama(64, 1.0)).await;
    let (_, window_zero) = s.post("/api/chat", &ollama(0, 1.5)).await;
    let (_, whole) = s.post("/api/chat", &ollama(-1, 1.5)).await;
    let off = text(off);
    assert_eq!(off, plain);
    assert_eq!(text(window_zero), off);
    assert_ne!(
        text(whole),
        off,
        "repeat_last_n -1 switched the penalty off"
    );
}

/// The scheduling policy of each of a process's threads, by thread name (Linux's
/// `/proc/PID/task/TID/stat`: the name is in parentheses, the policy is field 41).
#[cfg(target_os = "linux")]
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
        let name = stat[open + 1..close].to_owned();
        // Fields after the name start at 3 (state); the policy is the 41st.
        let policy = stat[close + 2..].split(' ').nth(41 - 3).unwrap();
        out.push((name, policy.parse().unwrap()));
    }
    out
}

/// HTTP threads run in SCHED_BATCH (3), so waking them for each token does not preempt the
/// engine; the engine thread (and so llama.cpp's threads, which it spawns: tests use one
/// thread, so there are none here) is back in SCHED_OTHER (0).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn http_threads_yield_to_the_engine_threads() {
    let s = Server::start(&[]).await;
    let body = json!({"model": "smollm2", "messages": ask("Hi"), "max_tokens": 2});
    s.chat(body).await;
    let threads = thread_policies(s.pid());
    let engine: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("engine_worker"))
        .collect();
    let http: Vec<_> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("tokio-rt-worker"))
        .collect();
    assert!(!engine.is_empty(), "{threads:?}");
    assert!(!http.is_empty(), "{threads:?}");
    assert!(engine.iter().all(|t| t.1 == 0), "{threads:?}");
    assert!(http.iter().all(|t| t.1 == 3), "{threads:?}");
}

/// `ignore_eos` on a greedy request bans the end token exactly where it would have won: the
/// answer is the natural one, then goes on (the next best token) up to `max_tokens`.
#[tokio::test]
async fn a_greedy_answer_with_ignore_eos_goes_on_where_it_would_have_stopped() {
    let s = Server::start(&[]).await;
    let body = |extra: Value| {
        let mut b = json!({"model": "smollm2", "messages": ask("Say hello."),
                           "temperature": 0, "max_tokens": 200});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let natural = s.chat(body(json!({}))).await;
    assert_eq!(natural["choices"][0]["finish_reason"], "stop", "{natural}");
    let n = natural["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n < 180, "{natural}");
    let longer = s
        .chat(body(json!({"ignore_eos": true, "max_tokens": n + 20})))
        .await;
    assert_eq!(longer["choices"][0]["finish_reason"], "length", "{longer}");
    assert_eq!(longer["usage"]["completion_tokens"], n + 20, "{longer}");
    let (natural, longer) = (answer(&natural), answer(&longer));
    assert!(
        longer.starts_with(&natural) && longer.len() > natural.len(),
        "{natural:?} then {longer:?}"
    );
}
