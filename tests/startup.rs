//! Start-up: bad files and bad config are refused with a clear message and a non-zero exit,
//! and never served; with nothing given, the default model is.

mod common;

use std::time::Duration;

use common::{run_to_exit, temp_dir};

fn serve(args: &[&str]) -> common::Exit {
    let mut all = vec!["serve", "--host", "127.0.0.1:0"];
    all.extend_from_slice(args);
    run_to_exit(&all, Duration::from_secs(60))
}

#[test]
fn a_file_that_is_not_gguf_is_refused_before_binding() {
    let d = temp_dir("notgguf");
    let f = d.join("model.gguf");
    std::fs::write(&f, "this is not a model").unwrap();
    let out = serve(&["--model", &format!("m={}", f.display())]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("not a GGUF"), "{}", out.stderr);
    assert!(out.stderr.contains("models.m.path"), "{}", out.stderr);
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
}

#[test]
fn a_truncated_gguf_is_refused_and_never_served() {
    let d = temp_dir("truncated");
    let f = d.join("half.gguf");
    let full = std::fs::read(common::smollm2()).unwrap();
    std::fs::write(&f, &full[..full.len() / 2]).unwrap();
    let out = serve(&["--model", &format!("half={}", f.display())]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("`half:latest` was not served"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("corrupt, truncated"), "{}", out.stderr);
}

/// llama.cpp loads this file and would abort the process at its first decode; the server
/// tries it in a child process first and refuses it with llama.cpp's reason, exiting as for
/// any bad file (status 1, not killed by SIGABRT).
#[test]
fn a_gguf_llama_cpp_cannot_compute_is_refused_not_a_crash() {
    let f = common::uncomputable_gguf();
    let out = serve(&["--model", &format!("odd={}", f.display())]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    for says in [
        "`odd:latest` was not served",
        "cannot compute it",
        "binary_op: unsupported types: dst: f32, src0: f32, src1: i32",
        "blk.0.attn_norm.weight (i32)",
    ] {
        assert!(out.stderr.contains(says), "{says}: {}", out.stderr);
    }
}

/// The child the server runs for such a file: a model llama.cpp can compute says so and
/// exits 0; the odd one is aborted by llama.cpp after saying why, where the server looks.
#[test]
fn the_probe_computes_a_sound_model_and_reports_an_abort() {
    let probe = |path: &std::path::Path| {
        common::backstop_command()
            .args(["probe-compute", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let sound = probe(&common::smollm2());
    assert!(sound.status.success(), "{sound:?}");
    assert_eq!(String::from_utf8_lossy(&sound.stdout), "probe: computed\n");
    let odd = probe(&common::uncomputable_gguf());
    assert!(!odd.status.success());
    assert!(!String::from_utf8_lossy(&odd.stdout).contains("computed"));
    let err = String::from_utf8_lossy(&odd.stderr);
    assert!(
        err.contains("probe: llama.cpp aborted: ") && err.contains("src1: i32"),
        "{err}"
    );
}

#[test]
fn a_corrupt_gguf_header_is_refused() {
    let d = temp_dir("corrupt");
    let f = d.join("bad.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(std::iter::repeat_n(0xA5u8, 4096));
    std::fs::write(&f, bytes).unwrap();
    let out = serve(&["--model", &format!("bad={}", f.display())]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("`bad:latest` was not served"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_config_error_names_the_file_and_key_and_exits_before_binding() {
    let d = temp_dir("config");
    let cfg = d.join("models.toml");
    std::fs::write(
        &cfg,
        format!(
            "[models.tiny]\npath = \"{}\"\ncontext = 512\n",
            common::smollm2().display()
        ),
    )
    .unwrap();
    let out = serve(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains(cfg.to_str().unwrap()), "{}", out.stderr);
    assert!(
        out.stderr.contains("unknown field `context`"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("expected one of"), "{}", out.stderr);
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);

    std::fs::write(&cfg, "[models.tiny]\npath = \"missing.gguf\"\n").unwrap();
    let out = serve(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("models.tiny.path"), "{}", out.stderr);
    assert!(out.stderr.contains("missing.gguf"), "{}", out.stderr);
}

#[test]
fn listening_beyond_loopback_without_insecure_is_refused() {
    let model = format!("m={}", common::smollm2().display());
    let out = run_to_exit(
        &["serve", "--host", "0.0.0.0:0", "--model", &model],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("--insecure"), "{}", out.stderr);
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
}

#[test]
fn a_bad_flag_value_is_refused() {
    let model = format!("m={}", common::smollm2().display());
    let out = run_to_exit(
        &[
            "serve",
            "--host",
            "127.0.0.1:0",
            "--parallel",
            "0",
            "--model",
            &model,
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("parallel"), "{}", out.stderr);
}

#[test]
fn a_draft_length_over_the_most_is_refused() {
    let model = format!("m={}", common::smollm2().display());
    let out = serve(&["--speculate", "33", "--model", &model]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("speculate") && out.stderr.contains("33 is over the most, 32"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
}

#[test]
fn a_pinned_hub_model_missing_from_the_store_says_how_to_pull_it() {
    let d = temp_dir("pinned");
    let cfg = d.join("models.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nmodels_dir = \"{}\"\n[models.smol]\nrepo = \"HuggingFaceTB/SmolLM2-135M-Instruct-GGUF\"\nfile = \"smollm2-135m-instruct-q4_k_m.gguf\"\nrevision = \"main\"\nsha256 = \"{}\"\n",
            d.join("store").display(),
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let out = serve(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("models.smol.repo"), "{}", out.stderr);
    assert!(
        out.stderr.contains("backstop pull HuggingFaceTB/SmolLM2-135M-Instruct-GGUF --file smollm2-135m-instruct-q4_k_m.gguf --revision main"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
}

#[test]
fn ollama_host_is_honoured_and_backstop_host_wins_over_it() {
    let model = format!("m={}", common::smollm2().display());
    // OLLAMA_HOST alone: a public address, refused without --insecure, proves it was read.
    let out = common::run_to_exit_with_env(
        &["serve", "--model", &model],
        &[("OLLAMA_HOST", "0.0.0.0:0")],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("0.0.0.0"), "{}", out.stderr);
    assert!(
        out.stderr.contains("environment (OLLAMA_*)"),
        "{}",
        out.stderr
    );
    // BACKSTOP_HOST beats it: here a loopback port already taken, so binding fails there.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = common::run_to_exit_with_env(
        &["serve", "--model", &model],
        &[("OLLAMA_HOST", "0.0.0.0:0"), ("BACKSTOP_HOST", &addr)],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("cannot listen on {addr}")),
        "{}",
        out.stderr
    );
}

/// A model split over several files is served from its first part, llama.cpp finding the rest
/// beside it: listed with all its parts' size, answering exactly as the same model in one file.
/// Another part given for the first, or a missing part, is refused before binding, by name.
#[tokio::test]
async fn a_split_model_is_served_from_its_first_part_and_a_wrong_part_is_refused() {
    let smol = common::smollm2();
    let parts = common::split_gguf(&smol, "smol", 3);
    let whole = format!("whole={}", smol.display());
    let split = format!("split={}", parts[0].display());
    let s = common::Server::start_raw(&["--model", &whole, "--model", &split]).await;
    let (status, tags) = s.get_json("/api/tags").await;
    assert_eq!(status, 200);
    let size = |name: &str| {
        tags["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {tags}"))["size"]
            .as_u64()
    };
    let on_disk: u64 = parts
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(size("split:latest"), Some(on_disk), "{tags}");
    assert_eq!(
        size("whole:latest"),
        Some(std::fs::metadata(&smol).unwrap().len())
    );
    // Its digest is of every part's bytes, in order, and follows a change to any of them.
    let digest = |tags: &serde_json::Value| {
        tags["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "split:latest")
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let concatenated: Vec<u8> = parts
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect();
    assert_eq!(digest(&tags), common::fake_hub::sha256_hex(&concatenated));
    let last = std::fs::read(&parts[2]).unwrap();
    let mut changed = last.clone();
    *changed.last_mut().unwrap() ^= 1;
    std::fs::write(&parts[2], &changed).unwrap();
    let (_, after) = s.get_json("/api/tags").await;
    assert_ne!(digest(&after), digest(&tags), "a change to the last part");
    std::fs::write(&parts[2], &last).unwrap();
    let (_, back) = s.get_json("/api/tags").await;
    assert_eq!(digest(&back), digest(&tags));
    let ask = |model: &str| {
        serde_json::json!({"model": model, "max_tokens": 24, "temperature": 0, "seed": 7,
                           "messages": [{"role": "user", "content": "Name three rivers."}]})
    };
    let (a, b) = (s.chat(ask("whole")).await, s.chat(ask("split")).await);
    assert_eq!(a["usage"]["completion_tokens"], 24, "{a}");
    assert_eq!(common::answer(&a), common::answer(&b));
    let (status, show) = s
        .post("/api/show", &serde_json::json!({"model": "split"}))
        .await;
    assert_eq!(status, 200, "{show}");
    assert_eq!(show["model_info"]["split.count"], 3, "{show}");
    drop(s);

    let out = serve(&["--model", &format!("m={}", parts[1].display())]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let first = parts[0].display().to_string();
    for says in [
        "models.m.path",
        "part 2 of 3 of a model split",
        "give its first part",
        &first,
    ] {
        assert!(out.stderr.contains(says), "{says}: {}", out.stderr);
    }
    std::fs::remove_file(&parts[2]).unwrap();
    let out = serve(&["--model", &format!("m={}", parts[0].display())]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    let third = parts[2].display().to_string();
    for says in ["1 of them is missing", &third] {
        assert!(out.stderr.contains(says), "{says}: {}", out.stderr);
    }
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
}

/// A number from a line of /proc/PID/status (`VmLck:  94320 kB`: 94320).
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Whether a process has CAP_IPC_LOCK (bit 14 of CapEff).
fn can_lock_past_limit(pid: &str) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap();
    u64::from_str_radix(hex.trim(), 16).unwrap() >> 14 & 1 == 1
}

/// The model file is mapped by default and read into the process's memory with `--no-mmap`,
/// the answers the same; `--mlock` locks the weights in RAM, and where the process may not
/// lock them, the log says how much it could and how to lift the limit, and it serves on.
#[tokio::test]
async fn model_files_are_mapped_or_read_and_locked_as_asked() {
    let smol = std::fs::canonicalize(common::smollm2()).unwrap();
    let model = format!("smollm2={}", smol.display());
    let file_kib = std::fs::metadata(&smol).unwrap().len() / 1024;
    let mapped = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .contains(&smol.display().to_string())
    };
    let ask = serde_json::json!({"model": "smollm2", "max_tokens": 16, "temperature": 0,
                                 "messages": [{"role": "user", "content": "Name a colour."}]});

    // The load's line may still be in the pipe when the server answers ready, so each server's
    // log is waited for before anything about its loaded model is checked.
    let s = common::Server::start_raw(&["--model", &model]).await;
    s.wait_log(&["model loaded", "mmap=true mlock=false"]).await;
    assert!(mapped(s.pid()));
    assert_eq!(status_kib(s.pid(), "VmLck:"), 0);
    let mapped_answer = common::answer(&s.chat(ask.clone()).await);
    drop(s);

    let s = common::Server::start_raw(&["--model", &model, "--no-mmap", "--mlock"]).await;
    let log = s.wait_log(&["model loaded", "mmap=false mlock=true"]).await;
    assert!(!mapped(s.pid()), "--no-mmap still maps the file");
    assert_eq!(common::answer(&s.chat(ask.clone()).await), mapped_answer);
    // Root may lock past the limit; anyone else up to `ulimit -l`.
    let limit = std::fs::read_to_string("/proc/self/limits").unwrap();
    let unlimited = limit
        .lines()
        .any(|l| l.starts_with("Max locked memory") && l.contains("unlimited"));
    if can_lock_past_limit("self") || unlimited {
        assert!(
            status_kib(s.pid(), "VmLck:") >= file_kib * 9 / 10,
            "locked {} kB of a {file_kib} kB file",
            status_kib(s.pid(), "VmLck:")
        );
        // The warning comes before the load's line, which is in.
        assert!(!log.contains("--mlock locked"), "{log}");
    } else {
        assert!(log.contains("--mlock locked"), "{log}");
    }
    drop(s);

    let s = common::Server::start_locking_at_most(&["--model", &model, "--mlock"], 1 << 20).await;
    assert!(!can_lock_past_limit(&s.pid().to_string()));
    assert!(status_kib(s.pid(), "VmLck:") <= 1024);
    s.wait_log(&[
        "model loaded",
        "--mlock locked 0.0 MiB of the weights' ",
        "(`ulimit -l` allows 1.0 MiB): the rest can be paged out",
        "CAP_IPC_LOCK",
    ])
    .await;
    assert_eq!(common::answer(&s.chat(ask).await), mapped_answer);
}

/// Where llama.cpp copies the weights out of the file's mapping as it loads (into the AMX buffer,
/// on a CPU with Intel AMX), the mapping's pages are handed back: the process keeps the copy
/// resident and not the file beside it, and answers as a server that keeps them
/// (`BACKSTOP_KEEP_MAPPED_WEIGHTS=1`). Elsewhere nothing is handed back.
#[tokio::test]
async fn weights_copied_out_of_the_mapping_leave_its_pages_resident_no_more() {
    let smol = std::fs::canonicalize(common::smollm2()).unwrap();
    let model = format!("smollm2={}", smol.display());
    let file_kib = std::fs::metadata(&smol).unwrap().len() / 1024;
    let ask = serde_json::json!({"model": "smollm2", "max_tokens": 16, "temperature": 0,
                                 "messages": [{"role": "user", "content": "Name a colour."}]});
    let said = "the file's mapped pages are handed back";
    let mut runs = Vec::new();
    for keep in [false, true] {
        let env: &[(&str, &str)] = if keep {
            &[("BACKSTOP_KEEP_MAPPED_WEIGHTS", "1")]
        } else {
            &[]
        };
        let s = common::Server::start_with_env(&["--model", &model], env).await;
        // Said while loading, before the load's own line.
        let log = s.wait_log(&["model loaded"]).await;
        let answer = common::answer(&s.chat(ask.clone()).await);
        runs.push((log, answer, status_kib(s.pid(), "RssFile:")));
    }
    let ((log, answer, file_resident), (kept_log, kept_answer, kept_resident)) =
        (&runs[0], &runs[1]);
    assert_eq!(answer, kept_answer);
    assert!(!kept_log.contains(said), "{kept_log}");
    if common::cpu_has_amx() {
        assert!(log.contains(said), "{log}");
        // The file's pages that the copy replaced are gone from the resident set; those still
        // read (the token embeddings' rows, the norms) came back as the answer was made.
        assert!(
            file_resident + file_kib / 2 <= *kept_resident,
            "{file_resident} kB file-backed resident against {kept_resident} kB kept, of a \
             {file_kib} kB file"
        );
    } else {
        assert!(!log.contains(said), "{log}");
    }
}

/// `--numa` takes one of llama.cpp's placements and refuses any other word before anything
/// binds. Where the machine has one NUMA node, a placement is taken, said to change nothing,
/// and the server answers as it does without one.
#[tokio::test]
async fn a_numa_placement_is_taken_or_refused() {
    let model = format!("m={}", common::smollm2().display());
    let out = serve(&["--numa", "mirror", "--model", &model]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("`mirror` is not one of off, distribute, isolate, numactl"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("listening on"), "{}", out.stderr);
    let ask = serde_json::json!({"model": "smollm2", "max_tokens": 24, "temperature": 0,
                                 "messages": [{"role": "user", "content": "Name three rivers."}]});
    let mut answers = Vec::new();
    for numa in ["off", "distribute"] {
        let s = common::Server::start(&["--numa", numa]).await;
        let r = s.chat(ask.clone()).await;
        answers.push(r["choices"][0]["message"]["content"].clone());
        let one_node = !std::path::Path::new("/sys/devices/system/node/node1").exists();
        if numa == "distribute" && one_node {
            s.wait_log(&["--numa distribute: this machine"]).await;
        } else {
            assert!(!s.log().contains("--numa"), "{}", s.log());
        }
    }
    assert!(
        answers[0].as_str().is_some_and(|a| !a.is_empty()),
        "{answers:?}"
    );
    assert_eq!(answers[0], answers[1]);
}

/// `backstop serve` with nothing given serves the default model the setup step fetched.
#[tokio::test]
async fn with_nothing_given_the_fetched_default_model_is_served() {
    let s = common::Server::start_raw(&[]).await;
    let (status, models) = s.get_json("/v1/models").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["smollm2:latest"], "{models}");
    let r = s
        .chat(serde_json::json!({"model": "smollm2", "max_tokens": 4, "temperature": 0, "ignore_eos": true,
                                 "messages": [{"role": "user", "content": "Hi"}]}))
        .await;
    assert_eq!(r["usage"]["completion_tokens"], 4, "{r}");
}

/// CPU seconds the process has used (user and system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// A server whose log pipe closes (`backstop serve | head`, a log collector that restarts)
/// goes on loading its model and serving, idles without spinning, and stops on SIGTERM. Until
/// tracing's internal errors were silenced, the first log line after the pipe closed panicked
/// (tracing-subscriber reports a failed write with `eprintln!`): here that was the model's
/// load task, and every request then waited on a load that never ended, spinning a core.
#[tokio::test]
async fn a_closed_log_pipe_neither_stops_nor_spins_the_server() {
    // Ready means the model loaded, which it logs after the pipe closed.
    let mut s = common::Server::start_then_close_log(&[]).await;
    let r = s
        .chat(
            serde_json::json!({"model": "smollm2", "max_tokens": 6, "temperature": 0,
                                 "ignore_eos": true,
                                 "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(r["usage"]["completion_tokens"], 6, "{r}");
    // Idle: a second of wall time costs a small fraction of a CPU second (the spin took half
    // of one of two cores).
    let before = cpu_seconds(s.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_seconds(s.pid()) - before;
    assert!(used < 0.5, "{used:.2} CPU seconds in 2 s idle");
    s.terminate();
    assert_eq!(s.wait_exit(Duration::from_secs(20)).await, Some(0));
}
