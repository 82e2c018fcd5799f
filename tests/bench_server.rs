//! `backstop bench --server`: the real binary measuring the real server with SmolLM2, and
//! fake OpenAI-compatible servers (tests/common/fake_cloud) whose timing is set, to check
//! the figures' arithmetic, the prompts sent, the comparison of servers, and every failure.

mod common;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use common::fake_cloud::{refused_addr, FakeCloud, Mode};
use common::Server;
use serde_json::{json, Value};

/// `backstop bench ARGS` with extra environment variables, run to its end without blocking
/// the runtime the fakes answer on.
async fn bench_env(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = common::backstop_command();
    cmd.arg("bench").args(args).envs(envs.iter().copied());
    tokio::task::spawn_blocking(move || cmd.output().expect("run backstop bench"))
        .await
        .expect("the bench thread")
}

async fn bench(args: &[&str]) -> Output {
    bench_env(args, &[]).await
}

/// `backstop bench` with the arguments of a command line, split at spaces.
async fn bench_line(line: &str) -> Output {
    bench(&line.split_whitespace().collect::<Vec<_>>()).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The JSON report of a run that succeeded.
fn report(o: &Output) -> Value {
    assert!(o.status.success(), "bench failed: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o.stdout)))
}

/// The run failed before measuring anything, printed nothing on stdout, and said each of
/// `says`.
fn refused(o: &Output, says: &[&str]) {
    let err = text(&o.stderr);
    assert!(!o.status.success(), "it ran: {}", text(&o.stdout));
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    for s in says {
        assert!(err.contains(s), "wanted {s:?} in: {err}");
    }
}

/// The paths of the fake's other requests, and its chat requests.
fn chats(fake: &FakeCloud) -> (Vec<String>, Vec<common::fake_cloud::RecordedRequest>) {
    let (chats, others): (Vec<_>, Vec<_>) = fake
        .requests()
        .into_iter()
        .partition(|r| r.method == "POST" && r.path == "/v1/chat/completions");
    (others.into_iter().map(|r| r.path).collect(), chats)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_a_running_server_at_each_client_count() {
    let s = Server::start(&["--parallel", "2"]).await;
    let url = s.url("");
    let o = bench_line(&format!(
        "--server {url} -p 48 -n 8 -r 2 --parallel 2 --format json smollm2"
    ))
    .await;
    let r = report(&o);
    // The server says what it runs.
    let software = format!("backstop {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(r["servers"], json!([{"url": url, "software": software}]));
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{r:#}");
    for (row, clients) in rows.iter().zip([1, 2]) {
        assert_eq!(row["clients"], clients);
        assert_eq!(row["requests"], 2 * clients, "{row}");
        assert_eq!(row["errors"], 0);
        // The server generated every token asked for (ignore_eos) and counted the prompt the
        // warm-up sized: SmolLM2 reads each prompt word as one token.
        assert_eq!(row["tokens"], 8, "{row}");
        assert_eq!(row["prompt_tokens"], 48, "{row}");
        let ttft = &row["ttft_ms"];
        assert!(
            f(&ttft["min"]) > 0.0 && f(&ttft["p50"]) <= f(&ttft["p95"]),
            "{row}"
        );
        assert!(f(&ttft["p95"]) <= f(&ttft["max"]), "{row}");
        for figure in ["decode", "aggregate"] {
            let x = &row[figure];
            assert!(f(&x["min"]) > 0.0, "{row}");
            assert!(f(&x["min"]) <= f(&x["median"]) && f(&x["median"]) <= f(&x["max"]));
        }
        assert!(
            row["relative"].is_null(),
            "one server has nothing to compare with"
        );
        // Every stream decodes faster than the aggregate of a single client, which also
        // waits for the prompt to be read.
        if clients == 1 {
            assert!(
                f(&row["decode"]["median"]) > f(&row["aggregate"]["median"]),
                "{row}"
            );
        }
    }

    // JSON Lines: a line per client count, each with what the report says once.
    let o = bench_line(&format!(
        "--server {url} -p 48 -n 8 -r 1 --parallel 2 --format jsonl smollm2"
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines = common::json_lines(&text(&o.stdout));
    assert_eq!(lines.len(), 2, "{}", text(&o.stdout));
    for (line, clients) in lines.iter().zip([1, 2]) {
        assert_eq!(
            (&line["clients"], &line["requests"], &line["tokens"]),
            (&json!(clients), &json!(clients), &json!(8)),
            "{line}"
        );
        assert_eq!(
            (&line["server"], &line["software"], &line["prompt_tokens"]),
            (&json!(url), &json!(software), &json!(48)),
            "{line}"
        );
        assert_eq!(
            (&line["prompt"], &line["generate"]),
            (&json!(48), &json!(8))
        );
        assert!(
            !line["client"]["cpu"].as_str().unwrap().is_empty(),
            "{line}"
        );
    }

    // The table says what every row shares under it.
    let o = bench_line(&format!("--server {url} -p 48 -n 4 -r 1 smollm2")).await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(
        table.starts_with("| model | clients | TTFT p50 ms | TTFT p95 ms | tg tok/s per stream | aggregate tok/s |"),
        "{table}"
    );
    assert!(table.contains("| smollm2 | 1 |"), "{table}");
    assert!(
        table.contains("48 prompt tokens (as the server counted them), 4 tokens generated per request, 1 repetition"),
        "{table}"
    );
    assert!(
        table.contains(&format!("\nserver: {url} ({software})\n")),
        "{table}"
    );

    // A prompt shorter than SmolLM2's chat template (its default system prompt) cannot be
    // had: the prompts come out longer, and a note says why.
    let o = bench_line(&format!(
        "--server {url} -p 8 -n 2 -r 1 --format json smollm2"
    ))
    .await;
    let r = report(&o);
    assert!(
        r["results"][0]["prompt_tokens"].as_u64().unwrap() > 8,
        "{r}"
    );
    let err = text(&o.stderr);
    assert!(
        err.contains("the chat template and the instruction alone take about")
            && err.contains("so its prompts are longer than -p 8"),
        "{err}"
    );

    // A model the server does not have fails at the warm-up, in the server's words.
    let o = bench_line(&format!("--server {url} -p 8 -n 2 -r 1 no-such-model")).await;
    refused(&o, &[&url, "no-such-model", "HTTP 404"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_a_full_queue_turns_away_are_counted_and_fail_the_run() {
    let s = Server::start(&["--parallel", "1", "--max-queue", "1"]).await;
    let o = bench_line(&format!(
        "--server {} -p 16 -n 24 -r 1 --parallel 4 --format json smollm2",
        s.url("")
    ))
    .await;
    let err = text(&o.stderr);
    assert!(!o.status.success(), "{err}");
    // The results are still printed, with the failures counted.
    let r: Value = serde_json::from_slice(&o.stdout).expect("the report is printed");
    let four = &r["results"][1];
    assert_eq!(four["clients"], 4);
    assert_eq!(four["requests"], 4);
    // One slot and one queue place: at least two of four arriving together are turned away,
    // and the one in the slot is served.
    let failed = four["errors"].as_u64().unwrap();
    assert!((2..=3).contains(&failed), "{four}");
    assert_eq!(four["tokens"], 24);
    assert_eq!(r["results"][0]["errors"], 0);
    assert!(
        err.contains(&format!(
            "smollm2, 4 clients: {failed} of 4 requests failed: HTTP 503"
        )),
        "{err}"
    );
    // Four and the one alone were measured (the warm-up is not counted).
    assert!(
        err.contains(&format!("{failed} of 5 requests failed")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_are_timed_from_the_stream_and_every_prompt_is_fresh() {
    let fake = FakeCloud::start().await;
    // Every answer: five tokens, the first 200 ms after the request, then one every 40 ms.
    fake.set_chunks(5);
    fake.set_answer_delay(Duration::from_millis(200));
    fake.set_chunk_delay(Duration::from_millis(40));
    let o = bench_line(&format!(
        "--server {} -p 20 -n 5 -r 2 --parallel 3 --format json fake-model",
        fake.base
    ))
    .await;
    let r = report(&o);
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        // The fake counts a token per word: the warm-up's count sized the prompts exactly.
        assert_eq!(row["prompt_tokens"], 20, "{row}");
        assert_eq!(row["tokens"], 5, "{row}");
        assert!(f(&row["ttft_ms"]["min"]) >= 200.0, "{row}");
        // Four tokens after the first in at least 160 ms: 25 tok/s at most. Counting the
        // wait for the first token too would give under 14.
        let decode = &row["decode"];
        assert!(f(&decode["max"]) <= 25.01, "{row}");
        assert!(f(&decode["median"]) > 15.0, "{row}");
        // All clients' tokens over the time from sending to the last token (at least 360 ms).
        let clients = f(&row["clients"]);
        let aggregate = f(&row["aggregate"]["max"]);
        assert!(aggregate <= clients * 5.0 / 0.36 + 0.01, "{row}");
        assert!(aggregate > clients * 5.0 / 0.36 / 4.0, "{row}");
    }
    // First the questions of what it runs (GETs the fake does not know), then one warm-up,
    // then per repetition one request alone and three together.
    let (asked, sent) = chats(&fake);
    assert_eq!(asked, ["/api/version", "/props", "/version"]);
    assert_eq!(sent.len(), 1 + 2 * (1 + 3));
    let mut prompts = BTreeSet::new();
    for req in &sent {
        let b = &req.body;
        assert_eq!(req.path, "/v1/chat/completions");
        assert_eq!(b["model"], "fake-model");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["max_tokens"], 5);
        assert_eq!(b["temperature"], 0);
        assert_eq!(b["ignore_eos"], true);
        prompts.insert(b["messages"][0]["content"].as_str().unwrap().to_owned());
    }
    assert_eq!(prompts.len(), sent.len(), "a prompt was sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_is_one_system_prompt_ahead_of_fresh_messages() {
    let fake = FakeCloud::start().await;
    fake.set_chunks(2);
    let o = bench_line(&format!(
        "--server {} -p 40 --shared-prefix 25 -n 2 -r 2 --parallel 2 --format json m",
        fake.base
    ))
    .await;
    let r = report(&o);
    assert_eq!(r["shared_prefix"], 25);
    for row in r["results"].as_array().unwrap() {
        assert_eq!(row["prompt_tokens"], 40, "{row}");
    }
    let (_, sent) = chats(&fake);
    assert_eq!(sent.len(), 1 + 2 * (1 + 2));
    let system = &sent[0].body["messages"][0];
    assert_eq!(system["role"], "system");
    assert_eq!(
        system["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        25
    );
    let mut users = BTreeSet::new();
    for req in &sent {
        let messages = req.body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(
            &messages[0], system,
            "every request shares the system prompt"
        );
        assert_eq!(messages[1]["role"], "user");
        users.insert(messages[1]["content"].as_str().unwrap().to_owned());
    }
    assert_eq!(users.len(), sent.len(), "a user message was sent twice");

    // The table says so; a prefix that leaves nothing of the prompt fresh is refused.
    let o = bench_line(&format!(
        "--server {} -p 40 --shared-prefix 25 -n 2 -r 1 m",
        fake.base
    ))
    .await;
    assert!(
        text(&o.stdout).contains("a system prompt of about 25 tokens shared by every request"),
        "{}",
        text(&o.stdout)
    );
    let o = bench_line(&format!(
        "--server {} -p 40 --shared-prefix 40 m",
        fake.base
    ))
    .await;
    refused(&o, &["--shared-prefix 40 must be below -p 40"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_measured_side_by_side_against_the_first() {
    let (fast, slow) = (FakeCloud::start().await, FakeCloud::start().await);
    for (fake, ms) in [(&fast, 5), (&slow, 50)] {
        fake.set_chunks(5);
        fake.set_chunk_delay(Duration::from_millis(ms));
    }
    let o = bench_line(&format!(
        "--server {} --server {} -p 10 -n 5 -r 3 --parallel 2 --format json m",
        fast.base, slow.base
    ))
    .await;
    let r = report(&o);
    let rows = r["results"].as_array().unwrap();
    let servers: Vec<(&str, u64)> = rows
        .iter()
        .map(|row| {
            (
                row["server"].as_str().unwrap(),
                row["clients"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        servers,
        [
            (&*fast.base, 1),
            (&*fast.base, 2),
            (&*slow.base, 1),
            (&*slow.base, 2)
        ]
    );
    for row in &rows[..2] {
        assert!(row["relative"].is_null(), "{row}");
    }
    // 200 ms of tokens against 20: the slow one's aggregate is a fraction of the fast one's.
    for row in &rows[2..] {
        assert!(f(&row["relative"]["max"]) < 0.7, "{row}");
        assert!(f(&row["relative"]["min"]) > 0.0, "{row}");
    }
    assert_eq!(chats(&fast).1.len(), 1 + 3 * 3);
    assert_eq!(chats(&slow).1.len(), 1 + 3 * 3);

    let o = bench_line(&format!(
        "--server {} --server {} -p 10 -n 5 -r 1 m",
        fast.base, slow.base
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(table.starts_with("| server | model | clients |"), "{table}");
    assert!(table.contains(&format!("| vs {} |", fast.base)), "{table}");
    assert!(
        table.contains(&format!("| {} | m | 1 |", fast.base)),
        "{table}"
    );
    assert!(table.contains("| 1.00x |"), "{table}");
    // The fakes say nothing of what they run.
    assert!(
        table.contains(&format!("\nservers: {}; {}\n", fast.base, slow.base)),
        "{table}"
    );
    assert_eq!(
        r["servers"],
        serde_json::json!([{"url": fast.base, "software": null}, {"url": slow.base, "software": null}])
    );
}

/// `--baseline` with `--server`: an earlier run's figures of the same model and client count,
/// set against this run's, TTFT as the earlier time over this one (above 1 is sooner now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_run_is_set_against_an_earlier_one() {
    let fake = FakeCloud::start().await;
    fake.set_chunks(5);
    // Before: the first token after 200 ms, then one every 40 ms; now four times as fast.
    fake.set_answer_delay(Duration::from_millis(200));
    fake.set_chunk_delay(Duration::from_millis(40));
    let dir = common::temp_dir("bench-server-baseline");
    let before = dir.join("before.json");
    let o = bench_line(&format!(
        "--server {} -p 20 -n 5 -r 2 --parallel 2 --format json m",
        fake.base
    ))
    .await;
    let earlier = report(&o);
    std::fs::write(&before, &o.stdout).unwrap();
    fake.set_answer_delay(Duration::from_millis(50));
    fake.set_chunk_delay(Duration::from_millis(10));
    let path = before.to_str().unwrap();
    let o = bench_line(&format!(
        "--server {} -p 20 -n 5 -r 2 --parallel 2 --format json --baseline {path} m",
        fake.base
    ))
    .await;
    let r = report(&o);
    assert_eq!(r["baseline_file"], path);
    assert_eq!(r["baseline_client"], earlier["client"]);
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, then) in rows.iter().zip(earlier["results"].as_array().unwrap()) {
        let b = &row["baseline"];
        assert_eq!(b["server"], fake.base, "{row}");
        // The earlier figures, and the ratios of the medians.
        assert_eq!(b["ttft_ms"]["median"], then["ttft_ms"]["p50"], "{row}");
        let ttft = f(&then["ttft_ms"]["p50"]) / f(&row["ttft_ms"]["p50"]);
        assert!((f(&b["ttft_ms"]["ratio"]) - ttft).abs() < 1e-9, "{row}");
        for key in ["decode", "aggregate"] {
            assert_eq!(b[key]["median"], then[key]["median"], "{row}");
            let ratio = f(&row[key]["median"]) / f(&then[key]["median"]);
            assert!((f(&b[key]["ratio"]) - ratio).abs() < 1e-9, "{row}");
        }
        // 200 ms against 50 to the first token, 40 against 10 between tokens: each about 4x.
        for v in [&b["ttft_ms"], &b["decode"]] {
            let ratio = f(&v["ratio"]);
            assert!((2.5..4.5).contains(&ratio), "{row}");
            assert_eq!(v["overlaps"], false, "{row}");
        }
    }

    // The table: a second one, a ratio in each cell; CSV: two columns per figure.
    let o = bench_line(&format!(
        "--server {} -p 20 -n 5 -r 1 --baseline {path} m",
        fake.base
    ))
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    let (_, against) = table
        .split_once(&format!("\nagainst {path}, this run over the baseline:\n"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        against.contains("| model | clients | TTFT p50 | tg per stream | aggregate |"),
        "{against}"
    );
    let row = against
        .lines()
        .find(|l| l.starts_with("| m | 1 | "))
        .unwrap_or_else(|| panic!("{against}"));
    let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
    assert_eq!(cells.len(), 5, "{row}");
    assert!(cells[2..].iter().all(|c| c.ends_with('x')), "{row}");
    assert!(
        against.contains(&format!("\nthe baseline's server: {}\n", fake.base))
            && against.contains("\nthe baseline's client: "),
        "{against}"
    );
    let o = bench_line(&format!(
        "--server {} -p 20 -n 5 -r 1 --format csv --baseline {path} m",
        fake.base
    ))
    .await;
    let csv = text(&o.stdout);
    assert!(
        csv.lines().next().unwrap().ends_with(
            ",baseline_ttft_p50_ms,ttft_ratio,baseline_tg_median,tg_ratio,\
             baseline_aggregate_median,aggregate_ratio"
        ),
        "{csv}"
    );
    let fields: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(fields.len(), 24, "{csv}");
    assert!(
        fields[18..].iter().all(|v| v.parse::<f64>().is_ok()),
        "{csv}"
    );

    // Other request lengths: said, and nothing compared.
    let o = bench_line(&format!(
        "--server {} -p 30 -n 5 -r 1 --baseline {path} m",
        fake.base
    ))
    .await;
    assert!(
        text(&o.stdout).contains(&format!(
            "against {path}: it asked -p 20 -n 5, this run -p 30 -n 5: nothing is compared"
        )),
        "{}",
        text(&o.stdout)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_take_turns_going_first_in_each_repetition() {
    // One fake under two names: the Host header says which name each request went to.
    let fake = FakeCloud::start().await;
    fake.set_chunks(2);
    let port = fake.addr.port();
    let o = bench_line(&format!(
        "--server 127.0.0.1:{port} --server localhost:{port} -p 8 -n 2 -r 3 --parallel 2 --format json m"
    ))
    .await;
    report(&o);
    let hosts: Vec<String> = chats(&fake)
        .1
        .iter()
        .map(|r| {
            r.header("host")
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    // Both warm-ups, then in each repetition one server's 1 and 2 clients, then the other's;
    // the first server leads the first and third repetitions, the second the second.
    let (a, b) = (["127.0.0.1"; 3], ["localhost"; 3]);
    let expected: Vec<&str> = [&["127.0.0.1", "localhost"][..], &a, &b, &b, &a, &a, &b].concat();
    assert_eq!(hosts, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_went_wrong_with_a_server_is_said_and_bad_flags_are_refused() {
    let args = |url: &str| -> Vec<String> {
        ["--server", url, "-p", "8", "-n", "3", "-r", "1", "m"]
            .map(str::to_owned)
            .to_vec()
    };
    let run = |a: Vec<String>| async move {
        bench(&a.iter().map(String::as_str).collect::<Vec<_>>()).await
    };
    let nobody = format!("http://{}", refused_addr());
    refused(&run(args(&nobody)).await, &[&nobody, "could not reach it"]);

    let fake = FakeCloud::start().await;
    fake.set_chunks(3);
    fake.set_mode(Mode::Status(503));
    refused(&run(args(&fake.base)).await, &[&fake.base, ": m: HTTP 503"]);
    fake.set_mode(Mode::CutMidStream { after_chunks: 1 });
    refused(&run(args(&fake.base)).await, &["the stream broke"]);
    fake.set_mode(Mode::Garbage);
    refused(&run(args(&fake.base)).await, &[&fake.base, ": m: "]);

    // A server that sends nothing for --timeout seconds, before its answer or within it.
    let mut quick = args(&fake.base);
    quick.extend(["--timeout".into(), "1".into()]);
    fake.set_mode(Mode::StallBeforeFirstByte(Duration::from_secs(3)));
    refused(
        &run(quick.clone()).await,
        &[": m: no answer: nothing came for 1 s (--timeout)"],
    );
    fake.set_mode(Mode::StallMidStream {
        after_chunks: 1,
        stall: Duration::from_secs(3),
    });
    refused(
        &run(quick).await,
        &[": m: the stream stalled: nothing came for 1 s"],
    );

    // A server that wants a key: refused without it, measured with it, from the flag or
    // from BACKSTOP_API_KEY.
    fake.set_mode(Mode::Ok);
    fake.set_key(Some("sk-bench"));
    refused(&run(args(&fake.base)).await, &["HTTP 401"]);
    let mut keyed = args(&fake.base);
    keyed.extend(["--api-key".into(), "sk-bench".into()]);
    let o = run(keyed).await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let a = args(&fake.base);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = bench_env(&a, &[("BACKSTOP_API_KEY", "sk-bench")]).await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        fake.last_request().unwrap().header("authorization"),
        Some("Bearer sk-bench")
    );
    fake.set_key(None);

    // Flags that mean nothing against a server, and limits: refused before anything is sent.
    let before = fake.request_count();
    let base = fake.base.as_str();
    for (flags, says) in [
        (&["--threads", "2"][..], "cannot be used with"),
        (&["--gpu-layers", "99"], "cannot be used with"),
        (&["--quantize", "Q8_0"], "cannot be used with"),
        (&["-d", "64"], "cannot be used with"),
        (&["-p", "0"], "-p and -n must be above 0"),
        (&["-n", "0"], "-p and -n must be above 0"),
        (&["-r", "0"], "at least one repetition"),
        (&["--parallel", "0"], "from 1 to 1024 concurrent clients"),
        (&["--parallel", "4,1025"], "--parallel 1025"),
        (&["--server", base], "given twice"),
        (&["--timeout", "0"], "--timeout"),
    ] {
        let o = bench(&[&["--server", base, "m"][..], flags].concat()).await;
        refused(&o, &[says]);
    }
    for flags in [
        ["--api-key", "k"],
        ["--timeout", "5"],
        ["--shared-prefix", "8"],
    ] {
        let o = bench(&[&flags[..], &["m.gguf"]].concat()).await;
        refused(&o, &["--server"]);
    }
    assert_eq!(fake.request_count(), before, "a refused run sent a request");
}
