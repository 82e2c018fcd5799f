//! `backstop bench --server URL`: what the clients of a running server see, over the OpenAI
//! API that every server in this field speaks (backstop, Ollama, llama-server, vLLM, LiteLLM's
//! proxy): time to first token, each stream's decode rate and the aggregate of all streams,
//! with one client and with each `--parallel` count of concurrent streaming clients.
//!
//! Every request carries a prompt of its own, so no prefix cache answers for it and the time
//! to first token includes reading it. Several servers are measured in turns within each
//! repetition (the order rotating), so drift on a busy machine falls on all of them alike,
//! and each is set against the first as the median of the per-repetition ratios (BENCH.md).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::baseline::{Baseline, Lengths, ServedVersus, Versus, WITHIN_SPREAD};
use super::report::{distinct, head_lines, Figure, Machine};
use crate::cli::{BenchArgs, BenchFormat};
use crate::client::http::{error_message, error_text, server_url};
use crate::router::sse::SseParser;

/// The most concurrent clients one level may have: each is a connection and a task here, and
/// more than this is a different kind of test than a benchmark of tokens per second.
const MAX_CLIENTS: usize = 1024;

/// A server that accepts no connection within this long is taken to be unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The prompts are made of these: common English words that are one token each, with the
/// space before them, in the vocabularies of the usual model families, so a prompt of N words
/// is about N tokens on any model. The warm-up request then reads the server's own count and
/// the prompts are sized by it.
const WORDS: [&str; 64] = [
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "at", "by", "from",
    "his", "her", "they", "one", "all", "were", "said", "there", "had", "some", "time", "day",
    "sea", "ship", "light", "night", "house", "old", "new", "man", "water", "long", "down", "way",
    "came", "made", "over", "city", "road", "town", "hand", "eye", "land", "home", "good", "small",
    "great", "little", "work", "world", "year", "life", "tree", "sun", "fire", "stone", "wind",
    "rain", "river", "door",
];

/// One server's figures for one model and one number of concurrent clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServedResult {
    /// The server's base URL.
    pub server: String,
    /// The model, as the server names it.
    pub model: String,
    /// Concurrent streaming clients.
    pub clients: usize,
    /// Requests measured (clients × repetitions).
    pub requests: usize,
    /// Requests that failed.
    pub errors: usize,
    /// Prompt tokens per request as the server counted them (the median); `null` when it
    /// does not report usage.
    pub prompt_tokens: Option<usize>,
    /// Tokens generated per request (the median): the server's count, else the deltas.
    pub tokens: Option<usize>,
    /// Time to first token, milliseconds, over every request.
    pub ttft_ms: Option<Latency>,
    /// Decode tokens per second of each stream, after its first token.
    pub decode: Option<Figure>,
    /// Tokens per second of all clients together, from the first request sent to the last
    /// token received, over the repetitions.
    pub aggregate: Option<Figure>,
    /// The aggregate over the first server's in the same repetition (median and spread of
    /// those ratios); only with several servers, and not for the first.
    pub relative: Option<Figure>,
    /// With `--baseline`, the earlier run's figures of the same model and client count, each
    /// with this run's against it (not read back from a baseline itself).
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<ServedVersus>,
}

/// A server measured, and what it says it runs.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    /// Its base URL.
    pub url: String,
    /// Its software and version, as it reports them (`backstop 0.1.0`, `Ollama 0.12.3`,
    /// `llama.cpp b6490-…`), `null` when it reports neither way.
    pub software: Option<String>,
}

/// Percentiles of a latency.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
    /// Lowest.
    pub min: f64,
    /// Highest.
    pub max: f64,
}

impl Latency {
    fn of(mut v: Vec<f64>) -> Option<Latency> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Latency {
            p50: Figure::of(v.clone()).median,
            p95: rank(0.95),
            min: *v.first()?,
            max: *v.last()?,
        })
    }
}

/// What one streamed request gave.
#[derive(Debug, Clone)]
struct Sample {
    /// Seconds from sending the request to the first token.
    ttft: f64,
    /// Tokens generated.
    tokens: usize,
    /// Tokens per second after the first; `None` with fewer than two tokens.
    decode: Option<f64>,
    /// Prompt tokens, as the server counted them.
    prompt_tokens: Option<usize>,
    /// When the last token came.
    end: Instant,
}

/// A server and the way to talk to it.
struct Target<'a> {
    base: String,
    http: &'a reqwest::Client,
    key: Option<&'a str>,
    /// How long the server may send nothing before a request fails (`--timeout`).
    timeout: Duration,
}

impl Target<'_> {
    /// What the server says it runs: backstop and Ollama answer `/api/version`, llama.cpp's
    /// server `/props` (its build), vLLM and others `/version`.
    async fn software(&self) -> Option<String> {
        if let Some(v) = self.get("/api/version").await {
            if let Some(b) = v.get("backstop").and_then(Value::as_str) {
                return Some(format!("backstop {b}"));
            }
            if let Some(o) = v.get("version").and_then(Value::as_str) {
                return Some(format!("Ollama {o}"));
            }
        }
        let props = self.get("/props").await;
        if let Some(build) = props.as_ref().and_then(|v| v.get("build_info")?.as_str()) {
            return Some(format!("llama.cpp {build}"));
        }
        let v = self.get("/version").await?;
        v.get("version")?.as_str().map(|v| format!("version {v}"))
    }

    /// A request to `path` on this server, with the API key when there is one.
    fn to(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// `GET path` as JSON, `None` for anything but a JSON success.
    async fn get(&self, path: &str) -> Option<Value> {
        let request = self.to(reqwest::Method::GET, path).timeout(CONNECT_TIMEOUT);
        let resp = request.send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json().await.ok()
    }

    /// The error of a request the server sent nothing for within `--timeout`.
    fn stalled(&self, what: &str) -> String {
        format!(
            "{what}: nothing came for {} s (--timeout)",
            self.timeout.as_secs()
        )
    }

    /// Sends a request, and the time it was sent. A request that fails before any answer,
    /// on a kept-alive connection the server closed meanwhile (llama-server closes them after
    /// a stream, racing the next request onto it), is sent once more on a new connection.
    async fn send(&self, body: &Value) -> Result<(reqwest::Response, Instant), String> {
        let mut retried = false;
        loop {
            let request = self
                .to(reqwest::Method::POST, "/v1/chat/completions")
                .json(body);
            let sent = Instant::now();
            match request.send().await {
                Ok(resp) => return Ok((resp, sent)),
                Err(e) if e.is_connect() => {
                    return Err(format!("could not reach it: {}", chain(&e)))
                }
                Err(e) if e.is_timeout() => return Err(self.stalled("no answer")),
                Err(e) if e.is_request() && !retried => retried = true,
                Err(e) => return Err(format!("the request failed: {}", chain(&e))),
            }
        }
    }

    /// One streamed chat request of `generate` tokens, timed token by token from when it was
    /// sent.
    async fn request(
        &self,
        model: &str,
        system: &str,
        prompt: String,
        generate: usize,
    ) -> Result<Sample, String> {
        let user = json!({"role": "user", "content": prompt});
        let messages = if system.is_empty() {
            json!([user])
        } else {
            json!([{"role": "system", "content": system}, user])
        };
        let body = json!({
            "model": model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": generate,
            "temperature": 0,
            // Servers that know it (backstop, llama-server, vLLM) generate all `max_tokens`;
            // the others ignore it, and the tokens each request got are reported.
            "ignore_eos": true,
        });
        let (resp, sent) = self.send(&body).await?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(format!("HTTP {}: {}", status.as_u16(), error_message(text)));
        }
        let mut parser = SseParser::new();
        let mut body = resp.bytes_stream();
        let (mut first, mut last, mut deltas, mut usage) = (None, None, 0, None::<Value>);
        let mut done = false;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                if e.is_timeout() {
                    self.stalled("the stream stalled")
                } else {
                    format!("the stream broke: {}", chain(&e))
                }
            })?;
            let events = parser
                .push(&chunk)
                .map_err(|e| format!("the answer is not an event stream: {}", e.0))?;
            for event in events {
                if event.data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(&event.data)
                    .map_err(|e| format!("an event that is not JSON ({e}): {}", event.data))?;
                if v.get("error").is_some() {
                    let message = error_text(&v).unwrap_or_else(|| event.data.clone());
                    return Err(format!("error in the stream: {message}"));
                }
                if v.get("usage").is_some_and(Value::is_object) {
                    usage = v.get("usage").cloned();
                }
                let choices = v.get("choices").and_then(Value::as_array);
                if choices.is_some_and(|cs| cs.iter().any(|c| produced(&c["delta"]))) {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = Some(now);
                    deltas += 1;
                }
            }
        }
        if !done {
            return Err("the stream ended without `data: [DONE]`".into());
        }
        let (Some(first), Some(last)) = (first, last) else {
            return Err("the server streamed no tokens".into());
        };
        let count = |key: &str| {
            usage
                .as_ref()
                .and_then(|u| u.get(key))
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
        };
        let tokens = count("completion_tokens").unwrap_or(deltas).max(1);
        let span = last.duration_since(first).as_secs_f64();
        Ok(Sample {
            ttft: first.duration_since(sent).as_secs_f64(),
            tokens,
            decode: (tokens > 1 && span > 0.0).then(|| (tokens - 1) as f64 / span),
            prompt_tokens: count("prompt_tokens"),
            end: last,
        })
    }
}

/// An error with its causes (reqwest's own message names only the URL).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Whether a streamed delta carries output: text, reasoning text, or part of a tool call.
fn produced(delta: &Value) -> bool {
    let text = |k: &str| {
        delta
            .get(k)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    text("content")
        || text("reasoning_content")
        || text("reasoning")
        || delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty())
}

/// The prompts of one run: `words` words drawn from [`WORDS`] for each request, from a
/// generator seeded by the run and the request, and the `--shared-prefix` system prompt every
/// request of the run carries. splitmix64, written out: picking words needs no more than
/// this, and no random-number crate is otherwise needed.
struct Prompts {
    seed: u64,
    next: u64,
    /// The shared system prompt (empty without `--shared-prefix`).
    head: String,
}

impl Prompts {
    fn new(shared: usize) -> Prompts {
        let seed = getrandom::u64().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let mut head = String::new();
        words(seed, &mut head, shared);
        Prompts {
            seed,
            next: 0,
            head: head.trim_start().to_owned(),
        }
    }

    fn next(&mut self, n: usize) -> String {
        self.next += 1;
        let mut text = String::with_capacity(n * 6 + 48);
        text.push_str("Notes:");
        words(
            self.seed ^ self.next.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            &mut text,
            n,
        );
        text.push_str("\nWrite a long story from these notes.");
        text
    }
}

/// Appends `n` words from [`WORDS`], each after a space, drawn by splitmix64 from `seed`.
fn words(seed: u64, text: &mut String, n: usize) {
    let mut x = seed;
    for _ in 0..n {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        text.push(' ');
        text.push_str(WORDS[(z >> 58) as usize]);
    }
}

/// The words that make a prompt of about `prompt` tokens on a server that counted `counted`
/// tokens for a prompt of `words` words: what is not the words (the chat template, the
/// instruction) is taken as fixed, each word as one token. At least one word.
fn calibrated(prompt: usize, words: usize, counted: Option<usize>) -> usize {
    match counted {
        Some(c) => (prompt + words).saturating_sub(c).max(1),
        None => prompt.max(1),
    }
}

/// Everything gathered for one server, model and number of clients.
#[derive(Default)]
struct Level {
    samples: Vec<Sample>,
    /// Aggregate tokens per second of each repetition (`None` when all its requests failed).
    aggregate: Vec<Option<f64>>,
    errors: Vec<String>,
}

/// `clients` requests at once; their samples, the aggregate, and the errors.
async fn burst(
    target: &Target<'_>,
    model: &str,
    system: &str,
    prompts: Vec<String>,
    generate: usize,
) -> (Vec<Sample>, Option<f64>, Vec<String>) {
    let start = Instant::now();
    let results = futures_util::future::join_all(
        prompts
            .into_iter()
            .map(|p| target.request(model, system, p, generate)),
    )
    .await;
    let (mut samples, mut errors) = (Vec::new(), Vec::new());
    for r in results {
        match r {
            Ok(s) => samples.push(s),
            Err(e) => errors.push(e),
        }
    }
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let aggregate = samples
        .iter()
        .map(|s| s.end)
        .max()
        .map(|end| end.duration_since(start).as_secs_f64())
        .filter(|&wall| wall > 0.0)
        .map(|wall| tokens as f64 / wall);
    (samples, aggregate, errors)
}

/// The client counts to measure: 1 and each `--parallel`, sorted, each once.
fn levels(parallel: &[usize]) -> Result<Vec<usize>, String> {
    if let Some(n) = parallel.iter().find(|&&n| n == 0 || n > MAX_CLIENTS) {
        return Err(format!(
            "--parallel {n}: from 1 to {MAX_CLIENTS} concurrent clients"
        ));
    }
    let mut levels = vec![1];
    levels.extend_from_slice(parallel);
    levels.sort_unstable();
    levels.dedup();
    Ok(levels)
}

/// The one `-p` value `--server` takes (checked in [`run`]).
fn one_prompt(args: &BenchArgs) -> usize {
    args.prompts.first().copied().unwrap_or(0)
}

/// The one `-n` value `--server` takes (checked in [`run`]).
fn one_gen(args: &BenchArgs) -> usize {
    args.gens.first().copied().unwrap_or(0)
}

/// Runs `backstop bench --server ...` and prints its results.
pub fn run(args: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.prompts.len() > 1 || args.gens.len() > 1 {
        return Err(
            "with --server, -p and -n take one value each: every request has one \
                    prompt and one answer"
                .into(),
        );
    }
    if !args.prompt_gen.is_empty() {
        return Err(
            "--pg times one sequence in-process: with --server, -p and -n already \
                    make each request a prompt and its answer, timed to the first token and \
                    to the last"
                .into(),
        );
    }
    if one_prompt(args) == 0 || one_gen(args) == 0 {
        return Err("with --server, -p and -n must be above 0: each request has a prompt and streams tokens".into());
    }
    if args.shared_prefix >= one_prompt(args) {
        return Err(format!(
            "--shared-prefix {} must be below -p {}: the rest of each prompt is its own",
            args.shared_prefix,
            one_prompt(args)
        )
        .into());
    }
    let levels = levels(&args.parallel)?;
    let lengths = Lengths {
        prompt: one_prompt(args),
        generate: one_gen(args),
        shared_prefix: args.shared_prefix,
    };
    let baseline = args
        .baseline
        .as_deref()
        .map(|path| Baseline::read(path, true))
        .transpose()?;
    let servers: Vec<String> = args.server.iter().map(|s| server_url(s)).collect();
    for (i, s) in servers.iter().enumerate() {
        if servers[..i].contains(s) {
            return Err(format!("--server {s} is given twice").into());
        }
    }
    let key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("BACKSTOP_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (servers, mut results) =
        runtime.block_on(measure(args, &servers, key.as_deref(), &levels))?;
    if let Some(b) = &baseline {
        for r in &mut results {
            r.baseline = b.compare_served(r, lengths);
        }
    }
    let failed: usize = results.iter().map(|r| r.errors).sum();
    let requests: usize = results.iter().map(|r| r.requests).sum();
    let machine = Machine::here(Vec::new());
    let report = match args.format {
        BenchFormat::Table => format!(
            "{}\n{}",
            table(&servers, &results, args, &machine),
            baseline
                .as_ref()
                .map(|b| versus_table(&results, b, lengths))
                .unwrap_or_default()
        ),
        BenchFormat::Json => {
            let json = serde_json::to_string_pretty(&json!({
                "servers": servers,
                "prompt": one_prompt(args),
                "shared_prefix": args.shared_prefix,
                "generate": one_gen(args),
                "reps": args.reps,
                "client": machine,
                "baseline_file": baseline.as_ref().map(|b| &b.name),
                "baseline_client": baseline.as_ref().and_then(|b| b.machine.as_ref()),
                "results": results,
            }))?;
            json + "\n"
        }
        BenchFormat::Csv => csv(&results, baseline.is_some()),
        // The same lines as in-process runs give, at the end: a run against servers is
        // measured level by level in one go.
        BenchFormat::Jsonl => {
            let mut facts = vec![
                ("prompt", json!(one_prompt(args))),
                ("shared_prefix", json!(args.shared_prefix)),
                ("generate", json!(one_gen(args))),
                ("reps", json!(args.reps)),
                ("client", serde_json::to_value(&machine)?),
            ];
            if let Some(b) = &baseline {
                facts.push(("baseline_file", json!(b.name)));
            }
            let mut lines = String::new();
            for r in &results {
                let software = servers
                    .iter()
                    .find(|s| s.url == r.server)
                    .and_then(|s| s.software.clone());
                let facts = [&facts[..], &[("software", json!(software))]].concat();
                lines += &super::json_line(r, &facts)?;
                lines.push('\n');
            }
            lines
        }
    };
    super::output(&report)?;
    if failed > 0 {
        return Err(format!("{failed} of {requests} requests failed (said above)").into());
    }
    Ok(())
}

/// One request that loads the model where the server loads on demand, reads how many tokens
/// the server counts for a prompt, and leaves the shared system prompt in its cache, as a
/// server in use would have it. Returns how many fresh words make a prompt of `-p` tokens
/// there, and a note when the prompts cannot be that short.
async fn warm_up(
    target: &Target<'_>,
    model: &str,
    prompts: &mut Prompts,
    args: &BenchArgs,
) -> Result<(usize, Option<String>), String> {
    let shared = args.shared_prefix;
    let first = one_prompt(args).saturating_sub(shared).max(1);
    let prompt = prompts.next(first);
    let sample = target
        .request(model, &prompts.head, prompt, one_gen(args).min(8))
        .await?;
    let words = calibrated(one_prompt(args), shared + first, sample.prompt_tokens)
        .saturating_sub(shared)
        .max(1);
    let note = sample.prompt_tokens.and_then(|counted| {
        let overhead = counted.saturating_sub(shared + first);
        (overhead + shared >= one_prompt(args)).then(|| {
            format!(
                "the chat template and the instruction alone take about {overhead} tokens, so its prompts are longer than -p {}",
                one_prompt(args)
            )
        })
    });
    Ok((words, note))
}

/// Warms every server and model up, then measures every level of each in turns.
async fn measure(
    args: &BenchArgs,
    servers: &[String],
    key: Option<&str>,
    levels: &[usize],
) -> Result<(Vec<ServerInfo>, Vec<ServedResult>), String> {
    let timeout = Duration::from_secs(args.timeout);
    let http = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(timeout)
        .build()
        .map_err(|e| format!("no HTTP client: {e}"))?;
    let targets: Vec<Target<'_>> = servers
        .iter()
        .map(|base| Target {
            base: base.clone(),
            http: &http,
            key,
            timeout,
        })
        .collect();
    let models = &args.models;
    let bursts = args.reps * targets.len() * models.len() * levels.len();
    let bar = ProgressBar::new((targets.len() * models.len() + bursts) as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} rounds, {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut infos = Vec::with_capacity(targets.len());
    for target in &targets {
        infos.push(ServerInfo {
            url: target.base.clone(),
            software: target.software().await,
        });
    }
    let mut prompts = Prompts::new(args.shared_prefix);
    let mut words = vec![vec![0; models.len()]; targets.len()];
    for (t, target) in targets.iter().enumerate() {
        for (m, model) in models.iter().enumerate() {
            bar.set_message(format!("warming up {model} on {}", target.base));
            let (n, note) = warm_up(target, model, &mut prompts, args)
                .await
                .map_err(|e| format!("{}: {model}: {e}", target.base))?;
            if let Some(note) = note {
                bar.suspend(|| eprintln!("note: {model} on {}: {note}", target.base));
            }
            words[t][m] = n;
            bar.inc(1);
        }
    }
    let mut gathered: Vec<Level> = (0..targets.len() * models.len() * levels.len())
        .map(|_| Level::default())
        .collect();
    let at = |t: usize, m: usize, l: usize| (t * models.len() + m) * levels.len() + l;
    for rep in 0..args.reps {
        for k in 0..targets.len() {
            let t = (rep + k) % targets.len();
            for (m, model) in models.iter().enumerate() {
                for (l, &n) in levels.iter().enumerate() {
                    bar.set_message(format!("{model} on {}, {}", targets[t].base, clients(n)));
                    let texts = (0..n).map(|_| prompts.next(words[t][m])).collect();
                    let (samples, aggregate, errors) =
                        burst(&targets[t], model, &prompts.head, texts, one_gen(args)).await;
                    let level = &mut gathered[at(t, m, l)];
                    level.samples.extend(samples);
                    level.aggregate.push(aggregate);
                    level.errors.extend(errors);
                    bar.inc(1);
                }
            }
        }
    }
    bar.finish_and_clear();
    let mut results = Vec::with_capacity(gathered.len());
    for (t, target) in targets.iter().enumerate() {
        for (m, model) in models.iter().enumerate() {
            for (l, &n) in levels.iter().enumerate() {
                let level = &gathered[at(t, m, l)];
                report_errors(&target.base, model, n, level, args.reps);
                let relative = (t > 0).then(|| {
                    let first = &gathered[at(0, m, l)].aggregate;
                    let ratios: Vec<f64> = level
                        .aggregate
                        .iter()
                        .zip(first)
                        .filter_map(|(a, b)| Some(a.as_ref()? / b.as_ref()?))
                        .collect();
                    (!ratios.is_empty()).then(|| Figure::of(ratios))
                });
                results.push(summarize(
                    target.base.clone(),
                    model,
                    n,
                    level,
                    relative.flatten(),
                ));
            }
        }
    }
    Ok((infos, results))
}

/// Says on stderr how many requests of a level failed, each distinct reason once.
fn report_errors(server: &str, model: &str, n_clients: usize, level: &Level, reps: usize) {
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for e in &level.errors {
        match seen.iter_mut().find(|(m, _)| *m == e) {
            Some((_, n)) => *n += 1,
            None => seen.push((e, 1)),
        }
    }
    for (message, n) in seen {
        eprintln!(
            "{server}: {model}, {}: {n} of {} requests failed: {message}",
            clients(n_clients),
            n_clients * reps
        );
    }
}

fn median_count(v: impl Iterator<Item = usize>) -> Option<usize> {
    let mut v: Vec<usize> = v.collect();
    v.sort_unstable();
    v.get(v.len().checked_sub(1)? / 2).copied()
}

fn summarize(
    server: String,
    model: &str,
    clients: usize,
    level: &Level,
    relative: Option<Figure>,
) -> ServedResult {
    let s = &level.samples;
    let decode: Vec<f64> = s.iter().filter_map(|s| s.decode).collect();
    let aggregate: Vec<f64> = level.aggregate.iter().flatten().copied().collect();
    ServedResult {
        server,
        model: model.to_owned(),
        clients,
        requests: s.len() + level.errors.len(),
        errors: level.errors.len(),
        prompt_tokens: median_count(s.iter().filter_map(|s| s.prompt_tokens)),
        tokens: median_count(s.iter().map(|s| s.tokens)),
        ttft_ms: Latency::of(s.iter().map(|s| s.ttft * 1e3).collect()),
        decode: (!decode.is_empty()).then(|| Figure::of(decode)),
        aggregate: (!aggregate.is_empty()).then(|| Figure::of(aggregate)),
        relative,
        baseline: None,
    }
}

/// A figure's cell with `digits` decimals, or a dash.
fn cell(f: Option<Figure>, digits: usize, unit: &str) -> String {
    f.map_or_else(|| "—".into(), |f| f.cell_in(digits, unit))
}

/// "1 client", "4 clients".
fn clients(n: usize) -> String {
    format!("{n} client{}", if n == 1 { "" } else { "s" })
}

/// A count that is the same in every row goes under the table; one that is not, in a column.
fn uniform(
    results: &[ServedResult],
    f: impl Fn(&ServedResult) -> Option<usize>,
) -> Option<Option<usize>> {
    let first = f(results.first()?);
    results.iter().all(|r| f(r) == first).then_some(first)
}

fn count_cell(n: Option<usize>) -> String {
    n.map_or_else(|| "—".into(), |n| n.to_string())
}

/// The markdown table, and what every row shares in lines under it.
fn table(
    servers: &[ServerInfo],
    results: &[ServedResult],
    args: &BenchArgs,
    machine: &Machine,
) -> String {
    let several = servers.len() > 1;
    let first = servers.first().map_or("", |s| s.url.as_str());
    let prompt = uniform(results, |r| r.prompt_tokens);
    let tokens = uniform(results, |r| r.tokens);
    let errors = results.iter().any(|r| r.errors > 0);
    let mut head: Vec<String> = Vec::new();
    if several {
        head.push("server".into());
    }
    head.extend(["model".into(), "clients".into()]);
    if prompt.is_none() {
        head.push("prompt tokens".into());
    }
    if tokens.is_none() {
        head.push("generated".into());
    }
    head.extend([
        "TTFT p50 ms".into(),
        "TTFT p95 ms".into(),
        "tg tok/s per stream".into(),
        "aggregate tok/s".into(),
    ]);
    if several {
        head.push(format!("vs {first}"));
    }
    if errors {
        head.push("failed".into());
    }
    let mut out = head_lines(&head);
    for r in results {
        let mut row: Vec<String> = Vec::new();
        if several {
            row.push(r.server.clone());
        }
        row.extend([r.model.clone(), r.clients.to_string()]);
        if prompt.is_none() {
            row.push(count_cell(r.prompt_tokens));
        }
        if tokens.is_none() {
            row.push(count_cell(r.tokens));
        }
        let ms = |f: fn(&Latency) -> f64| {
            r.ttft_ms
                .as_ref()
                .map_or("—".into(), |l| format!("{:.0}", f(l)))
        };
        row.extend([
            ms(|l| l.p50),
            ms(|l| l.p95),
            cell(r.decode, 1, ""),
            cell(r.aggregate, 1, ""),
        ]);
        if several {
            row.push(if r.server == first {
                "1.00x".into()
            } else {
                cell(r.relative, 2, "x")
            });
        }
        if errors {
            row.push(format!("{} of {}", r.errors, r.requests));
        }
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    let mut shared = Vec::new();
    match prompt {
        Some(Some(n)) => shared.push(format!("{n} prompt tokens (as the server counted them)")),
        Some(None) => shared.push(format!(
            "about {} prompt tokens (the server reports no usage)",
            one_prompt(args)
        )),
        None => {}
    }
    if let Some(n) = tokens {
        shared.push(format!("{} tokens generated per request", count_cell(n)));
    }
    shared.push(format!(
        "{} repetition{}, {}",
        args.reps,
        if args.reps == 1 { "" } else { "s" },
        if args.shared_prefix > 0 {
            format!(
                "a system prompt of about {} tokens shared by every request, the rest fresh",
                args.shared_prefix
            )
        } else {
            "a fresh prompt for every request".into()
        }
    ));
    let named = |s: &ServerInfo| match &s.software {
        Some(software) => format!("{} ({software})", s.url),
        None => s.url.clone(),
    };
    let servers: Vec<String> = servers.iter().map(named).collect();
    out.push_str(&format!(
        "\n{}\n{}: {}\nclient: {}",
        shared.join(", "),
        if several { "servers" } else { "server" },
        servers.join("; "),
        machine.line()
    ));
    out
}

/// The run against `--baseline`: a row per server, model and client count the baseline
/// measured, each cell the ratio (above 1: faster, or sooner, now), and what it was measured
/// with and on.
fn versus_table(results: &[ServedResult], baseline: &Baseline, lengths: Lengths) -> String {
    let name = &baseline.name;
    let mut out = format!("\nagainst {name}");
    let asked = |l: Lengths| {
        let mut said = format!("-p {} -n {}", l.prompt, l.generate);
        if l.shared_prefix > 0 {
            said.push_str(&format!(" --shared-prefix {}", l.shared_prefix));
        }
        said
    };
    match baseline.lengths() {
        Some(then) if then != lengths => out.push_str(&format!(
            ": it asked {}, this run {}: nothing is compared\n",
            asked(then),
            asked(lengths)
        )),
        _ if !results.iter().any(|r| r.baseline.is_some()) => out.push_str(
            ": nothing in it was measured with the same model and number of clients on this \
             run's servers\n",
        ),
        _ => {
            out.push_str(", this run over the baseline:\n\n");
            let several = distinct(results.iter().map(|r| &r.server)).len() > 1;
            let mut head: Vec<&str> = Vec::new();
            // The baseline's server, where it is not the row's own.
            let moved = results
                .iter()
                .any(|r| r.baseline.as_ref().is_some_and(|b| b.server != r.server));
            if several {
                head.push("server");
            }
            head.extend(["model", "clients"]);
            if moved {
                head.push("baseline server");
            }
            head.extend(["TTFT p50", "tg per stream", "aggregate"]);
            out.push_str(&head_lines(&head));
            for r in results {
                let Some(b) = &r.baseline else { continue };
                let mut row = Vec::new();
                if several {
                    row.push(r.server.clone());
                }
                let cell = |v: &Option<Versus>| v.as_ref().map_or_else(|| "—".into(), Versus::cell);
                row.extend([r.model.clone(), r.clients.to_string()]);
                if moved {
                    row.push(b.server.clone());
                }
                row.extend([cell(&b.ttft_ms), cell(&b.decode), cell(&b.aggregate)]);
                out.push_str(&format!("| {} |\n", row.join(" | ")));
            }
            out.push_str(&format!(
                "\nabove 1 is faster now (for TTFT: the baseline's median time over this run's); \
                 {WITHIN_SPREAD}\n"
            ));
        }
    }
    if !baseline.servers.is_empty() {
        let (s, list) = (baseline.servers.len() > 1, baseline.servers.join("; "));
        out.push_str(&format!(
            "the baseline's server{}: {list}\n",
            if s { "s" } else { "" }
        ));
    }
    if let Some(m) = &baseline.machine {
        out.push_str(&format!("the baseline's client: {}\n", m.line()));
    }
    out
}

/// One CSV row per server, model and client count; against a `--baseline` (`compared`), with
/// the baseline's TTFT p50, decode and aggregate medians, each followed by the ratio.
fn csv(results: &[ServedResult], compared: bool) -> String {
    let mut out = String::from(
        "server,model,clients,requests,errors,prompt_tokens,tokens,ttft_p50_ms,ttft_p95_ms,\
         tg_median,tg_min,tg_max,aggregate_median,aggregate_min,aggregate_max,\
         relative_median,relative_min,relative_max",
    );
    out.push_str(if compared {
        ",baseline_ttft_p50_ms,ttft_ratio,baseline_tg_median,tg_ratio,\
         baseline_aggregate_median,aggregate_ratio\n"
    } else {
        "\n"
    });
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    let fig = |f: Option<Figure>| {
        format!(
            "{},{},{}",
            opt(f.map(|f| f.median)),
            opt(f.map(|f| f.min)),
            opt(f.map(|f| f.max))
        )
    };
    let n = |v: Option<usize>| v.map_or(String::new(), |v| v.to_string());
    for r in results {
        let versus = if compared {
            let b = r.baseline.as_ref();
            format!(
                ",{},{},{}",
                Versus::csv(b.and_then(|b| b.ttft_ms.as_ref())),
                Versus::csv(b.and_then(|b| b.decode.as_ref())),
                Versus::csv(b.and_then(|b| b.aggregate.as_ref()))
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}{versus}\n",
            r.server,
            r.model.replace(',', " "),
            r.clients,
            r.requests,
            r.errors,
            n(r.prompt_tokens),
            n(r.tokens),
            opt(r.ttft_ms.map(|l| l.p50)),
            opt(r.ttft_ms.map(|l| l.p95)),
            fig(r.decode),
            fig(r.aggregate),
            fig(r.relative),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_differ_from_their_first_words_and_have_the_words_asked() {
        let mut p = Prompts::new(0);
        let (a, b) = (p.next(40), p.next(40));
        assert_ne!(a, b);
        let words = |s: &str| s.split_whitespace().count();
        // "Notes:", the words, and the seven-word instruction.
        assert_eq!(words(&a), 1 + 40 + 7);
        assert_eq!(words(&b), 48);
        // Requests differ from their first word on (so no prefix cache answers for them), in
        // most cases: one word in 64 is the same by chance.
        let firsts: std::collections::BTreeSet<String> = (0..200)
            .map(|_| {
                p.next(3)
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert!(firsts.len() > 40, "{firsts:?}");
        // Another run draws other prompts.
        assert_ne!(Prompts::new(0).next(40), Prompts::new(0).next(40));
        assert!(p.head.is_empty());
        // The shared system prompt: the words asked, the same for every request of a run.
        let shared = Prompts::new(30);
        assert_eq!(shared.head.split_whitespace().count(), 30);
        assert_ne!(shared.head, Prompts::new(30).head);
    }

    #[test]
    fn prompts_are_sized_by_the_servers_count() {
        // 512 words counted as 545 tokens: 33 are the template and instruction.
        assert_eq!(calibrated(512, 512, Some(545)), 479);
        // A server that counts fewer (words merged into one token) gets more words.
        assert_eq!(calibrated(100, 100, Some(90)), 110);
        // A prompt smaller than the template alone still has one word.
        assert_eq!(calibrated(8, 8, Some(40)), 1);
        // No usage reported: a word per token asked.
        assert_eq!(calibrated(64, 64, None), 64);
    }

    #[test]
    fn levels_are_one_client_and_each_parallel_once() {
        assert_eq!(levels(&[]).unwrap(), [1]);
        assert_eq!(levels(&[8, 4, 1, 4]).unwrap(), [1, 4, 8]);
        assert!(levels(&[0]).is_err());
        assert!(levels(&[MAX_CLIENTS + 1]).is_err_and(|e| e.contains("1024")));
    }

    #[test]
    fn latency_percentiles_are_nearest_rank() {
        let l = Latency::of((1..=20).map(f64::from).collect()).unwrap();
        assert_eq!((l.p50, l.p95, l.min, l.max), (10.5, 19.0, 1.0, 20.0));
        let one = Latency::of(vec![7.0]).unwrap();
        assert_eq!((one.p50, one.p95), (7.0, 7.0));
        assert!(Latency::of(Vec::new()).is_none());
    }

    #[test]
    fn output_is_text_reasoning_or_a_tool_call() {
        assert!(produced(&json!({"content": "a"})));
        assert!(produced(&json!({"reasoning_content": "hm"})));
        assert!(produced(&json!({"tool_calls": [{"index": 0}]})));
        assert!(!produced(&json!({"role": "assistant", "content": ""})));
        assert!(!produced(&json!({})));
        assert!(!produced(&Value::Null));
    }
}
