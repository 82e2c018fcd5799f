//! `backstop quantize` and `backstop bench` against the real SmolLM2 model: a small
//! quantization ladder built without any download, then benchmarked in every output format.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::{json, Value};

/// Each test here runs llama.cpp on every core (`bench -t 2`, the quantizer), so the tests take
/// turns: each holds this for its whole run. ggml's threads busy-wait at every barrier, and two
/// such processes on a 2-core machine spin on the cores the other needs: the suite took 742 s
/// with the test harness's two at a time against 205 s one at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static CORES: Mutex<()> = Mutex::new(());
    // A test that failed while holding it leaves nothing behind that the next one needs.
    CORES.lock().unwrap_or_else(PoisonError::into_inner)
}

fn backstop(args: &[&str]) -> Output {
    common::backstop_command()
        .args(args)
        .output()
        .expect("run backstop")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A command line's words (no argument here has a space in it).
fn words(line: &str) -> Vec<&str> {
    line.split(' ').collect()
}

/// `backstop bench ARGS --format json` with llama.cpp's own log at info level, which must
/// succeed: the report, and the log (llama.cpp says there what each context was made with).
fn bench_logged(args: &[&str]) -> (Value, String) {
    let o = common::backstop_command()
        .env("BACKSTOP_LOG", "info,llama-cpp-2=info")
        .args([&["bench", "--format", "json"], args].concat())
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert!(o.status.success(), "{args:?}: {err}");
    (serde_json::from_slice(&o.stdout).expect("bench JSON"), err)
}

/// `backstop bench ARGS` was refused before anything was measured: it failed, printed
/// nothing on stdout, and its error says each of `says`.
fn bench_refused(args: &[&str], says: &[&str]) {
    let o = backstop(&[&["bench"], args].concat());
    let err = text(&o.stderr);
    assert!(!o.status.success(), "{args:?} ran:\n{}", text(&o.stdout));
    assert!(o.stdout.is_empty(), "{args:?}: {}", text(&o.stdout));
    for s in says {
        assert!(err.contains(s), "{args:?}: {err}");
    }
}

/// `backstop bench` on a file llama.cpp loads but cannot compute says why and exits, rather
/// than being aborted by llama.cpp mid-run.
#[test]
fn a_model_llama_cpp_cannot_compute_is_refused_with_its_reason() {
    let odd = common::uncomputable_gguf();
    bench_refused(
        &["-p", "8", "-n", "4", "-r", "1", odd.to_str().unwrap()],
        &[
            "cannot compute it",
            "binary_op: unsupported types",
            "blk.0.attn_norm.weight (i32)",
        ],
    );
}

/// Removes the folder when the test ends, passed or not (quantized models are large).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn quantize(input: &Path, output: &Path, kind: &str) -> Output {
    backstop(&[
        "quantize",
        input.to_str().unwrap(),
        output.to_str().unwrap(),
        kind,
    ])
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_quantization_ladder_is_built_and_benchmarked_in_every_format() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("ladder");
    let _cleanup = Cleanup(dir.clone());
    let source = common::smollm2();
    let q8 = dir.join("smollm2-q8_0.gguf");
    let q4 = dir.join("smollm2-q4_0.gguf");

    for (out, kind) in [(&q8, "Q8_0"), (&q4, "q4_0")] {
        let o = quantize(&source, out, kind);
        assert!(o.status.success(), "quantize {kind}: {}", text(&o.stderr));
        // The source is already Q4_1: requantizing is allowed, and said.
        assert!(
            text(&o.stderr).contains("requantizing"),
            "{}",
            text(&o.stderr)
        );
    }
    // Only the two outputs, no temporary files left beside them.
    assert_eq!(entries(&dir), ["smollm2-q4_0.gguf", "smollm2-q8_0.gguf"]);
    let (q8_size, q4_size) = (
        std::fs::metadata(&q8).unwrap().len(),
        std::fs::metadata(&q4).unwrap().len(),
    );
    // 8.5 bits per weight against 4.5: the Q8_0 file is much larger.
    assert!(q8_size > q4_size * 3 / 2, "{q8_size} vs {q4_size}");

    let files = [q8.to_str().unwrap(), q4.to_str().unwrap()];
    let common_args = [
        "bench",
        "-p",
        "32",
        "-n",
        "8",
        "-t",
        "2",
        "--parallel",
        "1,2,2",
    ];

    let json = backstop(
        &[
            &common_args[..],
            &["-r", "2", "--format", "json"],
            &files[..],
        ]
        .concat(),
    );
    assert!(json.status.success(), "{}", text(&json.stderr));
    let report: Value = serde_json::from_slice(&json.stdout).expect("bench JSON");
    // One -p and one -n value: one test of both, each result saying its lengths.
    assert_eq!(
        report["tests"],
        json!([{"prompt": 32, "generate": 8, "together": false}])
    );
    assert_eq!(report["reps"], 2);
    // The machine the figures are from: its processor, cores and llama.cpp's devices.
    let machine = &report["machine"];
    assert!(!machine["cpu"].as_str().unwrap().is_empty(), "{machine}");
    let cores = machine["cores"].as_u64().unwrap();
    assert!(
        cores >= 1 && machine["logical"].as_u64().unwrap() >= cores,
        "{machine}"
    );
    assert_eq!(machine["backstop"], env!("CARGO_PKG_VERSION"));
    let devices = machine["devices"].as_array().unwrap();
    assert!(
        devices
            .iter()
            .any(|d| d["kind"] == "cpu" && d["memory_total"].as_u64().unwrap() > 0),
        "{machine}"
    );
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, (kind, size)) in results.iter().zip([("Q8_0", q8_size), ("Q4_0", q4_size)]) {
        assert_eq!(r["quantization"], kind, "{r}");
        assert_eq!(r["size"].as_u64(), Some(size), "{r}");
        assert_eq!(r["architecture"], "llama");
        assert_eq!(r["backend"], "CPU");
        // The settings it ran with: those given, and llama.cpp's defaults as `null`.
        assert_eq!(r["threads"], 2, "{r}");
        assert!(
            r["gpu_layers"].is_null() && r["flash_attention"].is_null(),
            "{r}"
        );
        assert_eq!(r["kv_cache_type"], "f16", "{r}");
        assert!(r["prompt"] == 32 && r["generate"] == 8, "{r}");
        assert!(r["parameters"].as_str().unwrap().ends_with('M'), "{r}");
        for fig in [&r["pp"], &r["tg"]] {
            let (min, med, max) = (
                fig["min"].as_f64().unwrap(),
                fig["median"].as_f64().unwrap(),
                fig["max"].as_f64().unwrap(),
            );
            assert!(min > 0.0 && min <= med && med <= max, "{fig}");
        }
        // `1` is the single-stream figure and duplicates collapse: one aggregate, for 2.
        let parallel = r["parallel"].as_array().unwrap();
        assert_eq!(parallel.len(), 1, "{r}");
        assert_eq!(parallel[0]["sequences"], 2);
        assert!(parallel[0]["median"].as_f64().unwrap() > 0.0);
    }

    let csv = backstop(
        &[
            &common_args[..],
            &["-r", "1", "--format", "csv"],
            &files[..],
        ]
        .concat(),
    );
    assert!(csv.status.success(), "{}", text(&csv.stderr));
    let csv = text(&csv.stdout);
    let lines: Vec<&str> = csv.lines().collect();
    // A header, then pp, tg and the x2 aggregate for each model.
    assert_eq!(lines.len(), 7, "{csv}");
    assert!(lines[0].starts_with("file,"), "{csv}");
    assert!(lines[1].starts_with("smollm2-q8_0.gguf,Q8_0,"), "{csv}");
    assert!(lines[1].contains(",pp,32,1,"), "{csv}");
    assert!(lines[3].contains(",tg_aggregate,8,2,"), "{csv}");
    assert!(lines[4].starts_with("smollm2-q4_0.gguf,Q4_0,"), "{csv}");
    let columns = lines[0].split(',').count();
    assert!(
        lines.iter().all(|l| l.split(',').count() == columns),
        "{csv}"
    );

    let table = backstop(&[&common_args[..], &["-r", "1"], &files[..1]].concat());
    assert!(table.status.success(), "{}", text(&table.stderr));
    let table = text(&table.stdout);
    assert!(table.starts_with('|'), "a markdown table:\n{table}");
    assert!(table.contains("pp32") && table.contains("tg8"), "{table}");
    assert!(table.contains("Q8_0"), "{table}");
    // Under it, the machine in one line.
    let last = table.lines().last().unwrap();
    assert!(
        last.contains(" cores, ")
            && last.ends_with(&format!("; backstop {}", env!("CARGO_PKG_VERSION"))),
        "{table}"
    );
}

/// Comma lists of settings are compared side by side, as llama-bench's are: one row per
/// combination, each measured with what its row says (llama.cpp's own log of every context it
/// makes is read back), and a combination llama.cpp cannot run is left out, or refused when
/// nothing else is left.
#[test]
fn settings_given_as_lists_are_each_measured_and_reported() {
    let _cores = one_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let (report, err) = bench_logged(&words(&format!(
        "-p 16 -n 4 -r 1 -t 2,1,2 --flash-attention 0,1 --kv-cache-type f16,q8_0 \
         --gpu-layers 0 {model}"
    )));
    assert!(
        err.contains("skipping --flash-attention 0 with --kv-cache-type q8_0"),
        "{err}"
    );
    let rows: Vec<(u64, bool, &str)> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["gpu_layers"], 0, "{r}");
            assert!(r["tg"]["median"].as_f64().unwrap() > 0.0, "{r}");
            (
                r["threads"].as_u64().unwrap(),
                r["flash_attention"].as_bool().unwrap(),
                r["kv_cache_type"].as_str().unwrap(),
            )
        })
        .collect();
    // Threads innermost, each once; the impossible pair left out.
    assert_eq!(
        rows,
        [
            (2, false, "f16"),
            (1, false, "f16"),
            (2, true, "f16"),
            (1, true, "f16"),
            (2, true, "q8_0"),
            (1, true, "q8_0"),
        ]
    );
    // What llama.cpp says it made, context by context.
    let made: Vec<String> = err
        .lines()
        .filter_map(|l| {
            if l.contains("flash_attn ") && l.contains('=') {
                Some(
                    if l.contains("= enabled") {
                        "fa on"
                    } else {
                        "fa off"
                    }
                    .to_owned(),
                )
            } else {
                l.find(", K (")
                    .map(|i| l[i + 2..].split(')').next().unwrap_or_default().to_owned() + ")")
            }
        })
        .collect();
    assert_eq!(
        made,
        [
            "fa off", "K (f16)", "fa off", "K (f16)", "fa on", "K (f16)", "fa on", "K (f16)",
            "fa on", "K (q8_0)", "fa on", "K (q8_0)"
        ],
        "{err}"
    );

    // In the table, what differs between rows is a column; the rest is said under it.
    let o = backstop(&[
        "bench",
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "1",
        "-t",
        "1,2",
        "--kv-cache-type",
        "q4_0",
        model,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(
        table.contains("| backend | threads | pp16 tok/s | tg4 tok/s |")
            && table.contains("| CPU | 1 |")
            && table.contains("| CPU | 2 |")
            && table.contains("\nq4_0 KV cache, 1 repetition\n"),
        "{table}"
    );

    bench_refused(
        &[
            "-r",
            "1",
            "--flash-attention",
            "off",
            "--kv-cache-type",
            "q8_0",
            model,
        ],
        &["a quantized KV cache needs flash attention"],
    );
}

/// `--quantize` builds a ladder from one model into a folder that keeps it, measures each rung
/// right after the model, and the next run reuses the rungs unless they are stale or broken.
#[test]
fn bench_builds_a_quantization_ladder_and_reuses_it() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("bench-ladder");
    let _cleanup = Cleanup(dir.clone());
    let rungs = dir.join("rungs");
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let run = |model: &str, types: &str| {
        let o = backstop(&[
            "bench",
            "-p",
            "16",
            "-n",
            "4",
            "-r",
            "1",
            "-t",
            "2",
            "--quantize",
            types,
            "--quantize-dir",
            rungs.to_str().unwrap(),
            "--format",
            "json",
            model,
        ]);
        let err = text(&o.stderr);
        assert!(o.status.success(), "{err}");
        let report: Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
        let rows: Vec<(String, String)> = report["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert!(r["tg"]["median"].as_f64().unwrap() > 0.0, "{r}");
                (
                    r["file"].as_str().unwrap().to_owned(),
                    r["quantization"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        (rows, err)
    };
    let q8 = "SmolLM2-135M-Instruct.Q4_1-Q8_0.gguf";
    let k4 = "SmolLM2-135M-Instruct.Q4_1-Q4_K_M.gguf";
    let expected = [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
        (q8, "Q8_0"),
        (k4, "Q4_K_M"),
    ]
    .map(|(f, q)| (f.to_owned(), q.to_owned()));
    let built = |err: &str| err.matches(": built ").count();
    let reused = |err: &str| err.matches(": reusing ").count();
    let listing = [
        k4.to_owned(),
        format!("{k4}.source"),
        q8.to_owned(),
        format!("{q8}.source"),
    ];

    // Any case, each type once; the model's own type is the model itself.
    let (rows, err) = run(model, "q8_0,Q4_1,q4_k_m,Q8_0");
    assert_eq!(rows, expected, "{err}");
    assert!(err.contains("is Q4_1 already"), "{err}");
    assert_eq!(built(&err), 2, "{err}");
    // llama.cpp's per-tensor fallback warnings are summed up in one line, not repeated.
    assert!(
        err.contains("required fallback quantization") && !err.contains("not divisible"),
        "{err}"
    );
    assert_eq!(entries(&rungs), listing);
    // Each rung names the file it was made from.
    let note = std::fs::read_to_string(rungs.join(format!("{q8}.source"))).unwrap();
    let canonical = std::fs::canonicalize(model).unwrap();
    assert!(
        note.starts_with(&format!("{}\n", canonical.display())),
        "{note}"
    );
    let mtime = |f: &str| {
        std::fs::metadata(rungs.join(f))
            .unwrap()
            .modified()
            .unwrap()
    };
    let (q8_built, k4_built) = (mtime(q8), mtime(k4));

    let (rows, err) = run(model, "Q8_0,Q4_K_M");
    assert_eq!(rows, expected[..], "{err}");
    assert_eq!((reused(&err), built(&err)), (2, 0), "{err}");
    assert_eq!((mtime(q8), mtime(k4)), (q8_built, k4_built));

    // A rung that is not a GGUF of its type is built again.
    std::fs::write(rungs.join(k4), b"not a model").unwrap();
    let (rows, err) = run(model, "Q8_0,Q4_K_M");
    assert_eq!(rows, expected[..], "{err}");
    assert_eq!((reused(&err), built(&err)), (1, 1), "{err}");

    // A model of the same file name in another folder shares the stem, not the rungs; and a
    // model changed in place since is another model too.
    let other = dir.join("other");
    std::fs::create_dir(&other).unwrap();
    let copy = other.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::copy(model, &copy).unwrap();
    let (rows, err) = run(copy.to_str().unwrap(), "Q8_0");
    assert_eq!(rows, expected[..2], "{err}");
    assert_eq!((reused(&err), built(&err)), (0, 1), "{err}");
    let (_, err) = run(copy.to_str().unwrap(), "Q8_0");
    assert_eq!((reused(&err), built(&err)), (1, 0), "{err}");
    std::fs::File::options()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60))
        .unwrap();
    let (_, err) = run(copy.to_str().unwrap(), "Q8_0");
    assert_eq!((reused(&err), built(&err)), (0, 1), "{err}");
    assert_eq!(entries(&rungs), listing);

    // An unknown type is refused before anything is quantized or measured.
    let elsewhere = dir.join("unused");
    bench_refused(
        &[
            "-r",
            "1",
            "--quantize",
            "Q8_0,Q9_X",
            "--quantize-dir",
            elsewhere.to_str().unwrap(),
            model,
        ],
        &["Q9_X", "Q6_K"],
    );
    assert!(!elsewhere.exists());
    // A folder that cannot be one.
    let file = dir.join("a-file");
    std::fs::write(&file, b"").unwrap();
    bench_refused(
        &[
            "-r",
            "1",
            "--quantize",
            "Q8_0",
            "--quantize-dir",
            file.to_str().unwrap(),
            model,
        ],
        &["a-file"],
    );
}

/// `backstop imatrix` of SmolLM2 over the README on 2 threads into `out`, with `args`.
fn readme_imatrix_command(out: &Path, args: &[&str]) -> std::process::Command {
    let (model, text) = (common::smollm2(), common::checkout().join("README.md"));
    let mut command = common::backstop_command();
    command
        .args(["imatrix", model.to_str().unwrap(), "-f"])
        .arg(text)
        .args(["-t", "2", "-o", out.to_str().unwrap()])
        .args(args);
    command
}

/// `backstop imatrix` of SmolLM2 over the README in chunks of 64 tokens into `out`, with
/// `extra` arguments, started and left running; its stderr piped.
fn start_imatrix(out: &Path, extra: &[&str]) -> std::process::Child {
    readme_imatrix_command(out, &[&["--chunk", "64", "--no-ppl"][..], extra].concat())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run backstop")
}

/// `backstop imatrix` of SmolLM2 over the README in `chunks` chunks of 256 tokens into `out`,
/// which must succeed: what it printed.
fn readme_imatrix(out: &Path, chunks: u32) -> String {
    let o = readme_imatrix_command(out, &["--chunk", "256", "--chunks", &chunks.to_string()])
        .output()
        .expect("run backstop");
    assert!(o.status.success(), "{}", text(&o.stderr));
    text(&o.stdout)
}

/// Waits until `done` holds or `child` has exited (without a deadline shorter than the
/// test's own); whether `done` held while it still ran.
fn while_running(child: &mut std::process::Child, done: impl Fn() -> bool) -> bool {
    for _ in 0..6000 {
        if done() {
            return child.try_wait().unwrap().is_none();
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

/// Sends `child` a Ctrl-C (SIGINT) and waits for it: how it ended, and its stderr.
fn ctrl_c(mut child: std::process::Child) -> (std::process::ExitStatus, String) {
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut err = String::new();
    if let Some(stderr) = child.stderr.as_mut() {
        std::io::Read::read_to_string(stderr, &mut err).unwrap();
    }
    (child.wait().unwrap(), err)
}

/// Ctrl-C during a quantization removes the file being written (hidden, and as large as the
/// model) before the process ends as Ctrl-C ends it; what a quantizer killed outright left is
/// removed by the next one writing the same file, unless its process still runs.
#[test]
fn an_interrupted_quantizer_leaves_nothing_behind() {
    use std::os::unix::process::ExitStatusExt;
    let _cores = one_at_a_time();
    let dir = common::temp_dir("quantize-interrupted");
    let _cleanup = Cleanup(dir.clone());
    let out = dir.join("out.gguf");
    // No process has an id past the kernel's largest (4194304 at most).
    let dead = dir.join(".out.gguf.partial-99999999-00001-of-00002.gguf");
    let alive = dir.join(format!(".out.gguf.partial-{}", std::process::id()));
    std::fs::write(&dead, b"left by a killed quantizer").unwrap();
    std::fs::write(&alive, b"another quantizer's").unwrap();
    // Gemma 3 to F32: a gigabyte, seconds of writing on the test machine.
    let mut child = common::backstop_command()
        .args([
            "quantize",
            common::gemma3().to_str().unwrap(),
            out.to_str().unwrap(),
            "F32",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run backstop");
    let writing = dir.join(format!(".out.gguf.partial-{}", child.id()));
    let started = while_running(&mut child, || {
        std::fs::metadata(&writing).is_ok_and(|m| m.len() > 0)
    });
    assert!(started, "the quantizer is writing");
    let (status, err) = ctrl_c(child);
    assert_eq!(
        status.signal(),
        Some(2),
        "ended as Ctrl-C ends a program: {err}"
    );
    assert!(
        err.contains("removing what an interrupted quantizer left"),
        "{err}"
    );
    assert_eq!(
        entries(&dir),
        [alive.file_name().unwrap().to_str().unwrap()],
        "neither the file being written nor the dead one's is left"
    );
}

/// A quantization the disk has no room for, as llama.cpp's dry run sizes it, is refused before
/// the quantizer starts, saying how much it needs and how much there is; a ladder checks
/// every rung it will build before it builds the first.
#[test]
fn quantizing_more_than_the_disk_holds_is_refused_before_it_starts() {
    let _cores = one_at_a_time();
    let giant = common::giant_gguf();
    let dir = giant.parent().unwrap().to_owned();
    let _cleanup = Cleanup(dir.clone());
    let out = dir.join("out.gguf");

    let started = std::time::Instant::now();
    let o = quantize(&giant, &out, "Q8_0");
    let err = text(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "{} needs about 2.0 TB free in {}, and there is",
            out.display(),
            dir.display()
        )),
        "{err}"
    );
    assert!(err.contains("nothing was written"), "{err}");
    assert!(!err.contains("requantizing"), "the quantizer ran: {err}");
    assert_eq!(entries(&dir), ["giant.gguf"]);

    let ladder = dir.join("ladder");
    let o = backstop(&[
        "bench",
        "-p",
        "8",
        "-n",
        "4",
        "-r",
        "1",
        "--quantize",
        "Q8_0,Q4_0",
        "--quantize-dir",
        ladder.to_str().unwrap(),
        giant.to_str().unwrap(),
    ]);
    let err = text(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(
            "building 2 rungs of giant needs about 4.0 TB (Q8_0 2.0 TB, Q4_0 2.0 TB) free in"
        ),
        "{err}"
    );
    assert!(
        !err.contains("quantizing giant"),
        "a rung was started: {err}"
    );
    assert!(entries(&ladder).is_empty(), "{:?}", entries(&ladder));
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[test]
fn quantize_refuses_unknown_types_and_bad_inputs_and_leaves_nothing_behind() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("quantize-bad");
    let _cleanup = Cleanup(dir.clone());
    let out = dir.join("out.gguf");

    let o = quantize(&common::smollm2(), &out, "Q9_X");
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("Q9_X") && err.contains("Q4_K_M"), "{err}");
    // A type the quantizer would only refuse tensor by tensor, for want of an importance
    // matrix, is refused by name before it starts.
    let o = quantize(&common::smollm2(), &out, "Q2_K_S");
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("`Q2_K_S` needs an importance matrix"), "{err}");
    assert!(!err.contains("requantizing"), "the quantizer ran: {err}");

    let not_gguf = dir.join("notes.gguf");
    std::fs::write(&not_gguf, b"this is not a model").unwrap();
    let o = quantize(&not_gguf, &out, "Q8_0");
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("notes.gguf"),
        "{}",
        text(&o.stderr)
    );

    let o = quantize(&dir.join("missing.gguf"), &out, "Q8_0");
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("missing.gguf"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(entries(&dir), ["notes.gguf"]);

    // Where the output cannot go is said before the quantizer runs (it takes minutes on a
    // large model), and the model read is never replaced by its own requantized copy.
    let model = common::smollm2();
    let before = std::fs::metadata(&model).unwrap().len();
    let refused = |out: &Path, says: &str| {
        let started = std::time::Instant::now();
        let o = quantize(&model, out, "Q8_0");
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{} was written: {err}", out.display());
        assert!(err.contains(says), "{err}");
        assert!(!err.contains("requantizing"), "the quantizer ran: {err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    };
    refused(
        &dir.join("no-such-folder").join("out.gguf"),
        "does not exist",
    );
    refused(&dir, "a folder");
    let link = dir.join("link.gguf");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    // Through a link, so that a regression replaces the link, not the shared test model.
    refused(&link, "that is the input");
    assert_eq!(std::fs::metadata(&model).unwrap().len(), before);
    assert_eq!(entries(&dir), ["link.gguf", "notes.gguf"]);
    std::fs::remove_file(&link).unwrap();

    let o = backstop(&["bench", "-r", "1", not_gguf.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("notes.gguf"),
        "{}",
        text(&o.stderr)
    );
    // A bad file anywhere in the list is found before any model is loaded (llama.cpp's loader
    // would log each model it reads at this level).
    let o = common::backstop_command()
        .env("BACKSTOP_LOG", "info,llama-cpp-2=info")
        .args([
            "bench",
            "-r",
            "1",
            common::smollm2().to_str().unwrap(),
            not_gguf.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("notes.gguf"), "{err}");
    assert!(
        !err.contains("load_from_file"),
        "a model was loaded first: {err}"
    );
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    let o = backstop(&["bench", "-r", "1", "no-such-model:latest"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("no-such-model"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn many_parallel_sequences_are_measured_and_too_many_are_refused() {
    let _cores = one_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    // 40 sequences start with one decode of 640 tokens: more than llama.cpp's default batch.
    let o = backstop(&[
        "bench",
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "1",
        "-t",
        "2",
        "--parallel",
        "40",
        "--flash-attention",
        "0",
        "--format",
        "json",
        model,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
    let parallel = &report["results"][0]["parallel"][0];
    assert_eq!(parallel["sequences"], 40, "{report}");
    assert!(parallel["median"].as_f64().unwrap() > 0.0, "{report}");

    let o = backstop(&["bench", "-r", "1", "--parallel", "300", model]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("--parallel 300") && err.contains("256"),
        "{err}"
    );
}

/// `-d` measures from that many tokens already in the cache, says so in every format, and a
/// depth the model's context cannot hold is refused before a context is made for it.
#[test]
fn figures_at_a_depth_say_so_and_too_deep_is_refused() {
    let _cores = one_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let run = |format: &str, depth: &str| {
        backstop(&[
            "bench",
            "-p",
            "16",
            "-n",
            "8",
            "-d",
            depth,
            "-r",
            "1",
            "-t",
            "2",
            "--parallel",
            "2",
            "--format",
            format,
            model,
        ])
    };
    let o = run("json", "256");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
    assert_eq!(report["depths"], json!([256]), "{report}");
    let r = &report["results"][0];
    assert_eq!(r["depth"], 256, "{report}");
    // What llama.cpp's cache held when each measurement started, every sequence of it.
    assert_eq!(r["cached"], 256, "{report}");
    for fig in [&r["pp"], &r["tg"], &r["parallel"][0]] {
        assert!(fig["median"].as_f64().unwrap() > 0.0, "{report}");
    }
    let o = run("table", "256");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(
        table.contains("| pp16 @ d256 tok/s | tg8 @ d256 tok/s | tg8 @ d256 x2 aggregate |"),
        "{table}"
    );

    // SmolLM2 was trained on 8,192 tokens: 8,169 + the 8 generated + the 16 each generation
    // starts from is one too many (the 16-token prompt is read at the depth too, but the
    // cache is cut back to the depth before generating).
    let o = run("json", "8169");
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("-d 8169") && err.contains("8193") && err.contains("8192"),
        "{err}"
    );
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    let o = run("json", "8168");
    assert!(o.status.success(), "{}", text(&o.stderr));

    // Several depths, as llama-bench's -d list: a row each, in the order given, each
    // measured from what its row says (read back from llama.cpp's cache).
    let o = run("json", "128,0,128");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
    assert_eq!(report["depths"], json!([128, 0]), "{report}");
    let rows: Vec<(u64, u64)> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["depth"].as_u64().unwrap(), r["cached"].as_u64().unwrap()))
        .collect();
    assert_eq!(rows, [(128, 128), (0, 0)], "{report}");
    let table = text(&run("table", "0,128").stdout);
    assert!(
        table.contains("| backend | depth | pp16 tok/s | tg8 tok/s | tg8 x2 aggregate |")
            && table.contains("| CPU | 0 | ")
            && table.contains("| CPU | 128 | "),
        "{table}"
    );
    let csv = text(&run("csv", "0,128").stdout);
    assert!(
        csv.contains(",pp,16,1,0,") && csv.contains(",tg_aggregate,8,2,128,"),
        "{csv}"
    );
    // One depth too deep refuses the run before the others are measured.
    let o = run("json", "0,8169");
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("-d 8169"), "{}", text(&o.stderr));
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    // Quality is scored once per model and setting, from an empty cache, and given to each
    // depth's row.
    let out = bench_json(&words(&format!(
        "--quality -p 16 -n 4 -r 1 -d 0,64 {model}"
    )));
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{out}");
    assert_eq!(quality(&results[0]), quality(&results[1]), "{out}");
    assert!(quality(&results[1])["reference"].is_null(), "{out}");
    // Quality alone is scored from an empty cache: a depth there would say what is not so.
    bench_refused(
        &["-p", "0", "-n", "0", "-d", "64", "--quality", model],
        &["-d with -p 0 and -n 0"],
    );
}

/// Several `-p` and `-n` values, as llama-bench's lists: each length is a test of its own,
/// measured at each depth, one table row per model and depth with a column per length.
/// Gemma 3's sliding-window layers cache their window (512) and one batch, 1,024 positions
/// here, as in the server and llama-bench. A 1,536-token prompt read at a depth of 1,024
/// writes over the depth's last window, so the next measurement reads the depth again: every
/// one starts from the whole depth, as llama.cpp's cache reports it. Given no choice, bench
/// makes each context as `serve` would: on a CPU, flash attention off, for this windowed
/// model too.
#[test]
fn a_sliding_window_model_starts_every_measurement_from_its_whole_depth() {
    let _cores = one_at_a_time();
    let gemma = common::gemma3();
    let (report, log) = bench_logged(&[
        "-t",
        "2",
        "-r",
        "2",
        "-p",
        "1536",
        "-n",
        "8",
        "--parallel",
        "2",
        "-d",
        "1024",
        gemma.to_str().unwrap(),
    ]);
    assert!(
        log.contains("SWA KV cache, size = 1024 cells"),
        "the sliding-window cache is not the window and a batch: {log}"
    );
    let made = common::flash_attn_made(&log);
    assert!(
        !made.is_empty() && made.iter().all(|&m| m == "disabled"),
        "{made:?}: {log}"
    );
    let r = &report["results"][0];
    assert_eq!(r["cached"], 1024, "{report}");
    for fig in [&r["pp"], &r["tg"], &r["parallel"][0]] {
        assert!(fig["median"].as_f64().unwrap() > 0.0, "{report}");
    }
}

#[test]
fn prompt_and_generation_lengths_given_as_lists_are_each_a_test() {
    let _cores = one_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let args = format!("-p 16,48,16 -n 4,0,8 --parallel 2 -r 1 -d 0,32 {model}");
    let report = bench_json(&words(&args));
    assert_eq!(
        report["tests"],
        json!([
            {"prompt": 16, "generate": 0, "together": false},
            {"prompt": 48, "generate": 0, "together": false},
            {"prompt": 0, "generate": 4, "together": false},
            {"prompt": 0, "generate": 8, "together": false}
        ]),
        "{report}"
    );
    let results = report["results"].as_array().unwrap();
    let got: Vec<(u64, u64, u64, u64)> = results
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap();
            (n("depth"), n("cached"), n("prompt"), n("generate"))
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, 0, 16, 0),
            (0, 0, 48, 0),
            (0, 0, 0, 4),
            (0, 0, 0, 8),
            (32, 32, 16, 0),
            (32, 32, 48, 0),
            (32, 32, 0, 4),
            (32, 32, 0, 8)
        ],
        "{report}"
    );
    // A prompt test has only its prompt figure; a generation test its single-stream and
    // aggregate figures.
    for r in results {
        let measured = |f: &Value| f["median"].as_f64().is_some_and(|m| m > 0.0);
        if r["prompt"] != 0 {
            assert!(measured(&r["pp"]) && r["tg"].is_null(), "{r}");
            assert_eq!(r["parallel"], json!([]), "{r}");
        } else {
            assert!(measured(&r["tg"]) && r["pp"].is_null(), "{r}");
            assert_eq!(r["parallel"][0]["sequences"], 2, "{r}");
            assert!(measured(&r["parallel"][0]), "{r}");
        }
    }

    let o = backstop(&[&["bench", "-t", "2"], &words(&args)[..]].concat());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(
        table.contains(
            "| backend | depth | pp16 tok/s | pp48 tok/s | tg4 tok/s | tg4 x2 aggregate | \
             tg8 tok/s | tg8 x2 aggregate |"
        ),
        "{table}"
    );
    // One row per depth, every cell filled.
    let rows: Vec<&str> = table.lines().filter(|l| l.contains("| CPU |")).collect();
    assert_eq!(rows.len(), 2, "{table}");
    for (row, depth) in rows.iter().zip(["| CPU | 0 |", "| CPU | 32 |"]) {
        assert!(row.contains(depth) && !row.contains("|  |"), "{table}");
        assert_eq!(row.matches('–').count(), 6, "{row}");
    }
    let o = backstop(&[&["bench", "-t", "2", "--format", "csv"], &words(&args)[..]].concat());
    let csv = text(&o.stdout);
    for line in [",pp,48,1,32,", ",tg,8,1,0,", ",tg_aggregate,4,2,32,"] {
        assert!(csv.contains(line), "{line}: {csv}");
    }

    // The longest length is checked against the context before anything is measured.
    bench_refused(
        &words(&format!("-p 16,8200 -n 4 {model}")),
        &["-p 8200", "needs 8200", "8192"],
    );
    bench_refused(
        &words(&format!("-p 16 -n 4,8177 {model}")),
        &["-n 8177", "needs 8193"],
    );
    bench_refused(
        &words(&format!("-p 16,32 -n 0 --parallel 2 {model}")),
        &["--parallel measures generation"],
    );
    // A server is sent one prompt and one answer per request.
    bench_refused(
        &words("-p 16,32 -n 4 --server http://127.0.0.1:9 smollm2"),
        &["with --server, -p and -n take one value each"],
    );
}

/// `--pg P,N` (llama-bench's `-pg`): the generation follows the prompt in one sequence's
/// cache, and one figure times both; each pair is a test of its own, after the `-p` and `-n`
/// tests.
#[test]
fn a_prompt_and_the_generation_after_it_are_timed_as_one() {
    let _cores = one_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let report = bench_json(&words(&format!(
        "-p 16 -n 4 --pg 16,8 --pg 32,4 -d 0,32 -r 2 -t 2 {model}"
    )));
    assert_eq!(
        report["tests"],
        json!([
            {"prompt": 16, "generate": 4, "together": false},
            {"prompt": 16, "generate": 8, "together": true},
            {"prompt": 32, "generate": 4, "together": true}
        ]),
        "{report}"
    );
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 6, "{report}");
    let measured = |f: &Value| f["median"].as_f64().is_some_and(|m| m > 0.0);
    for r in results {
        // Each measurement started from its depth, read back from llama.cpp's cache.
        assert_eq!(r["cached"], r["depth"], "{r}");
        if r["together"] == true {
            assert!(
                measured(&r["pg"]) && r["pp"].is_null() && r["tg"].is_null(),
                "{r}"
            );
            assert_eq!(r["parallel"], json!([]), "{r}");
        } else {
            assert!(
                measured(&r["pp"]) && measured(&r["tg"]) && r["pg"].is_null(),
                "{r}"
            );
        }
    }

    let o = backstop(&words(&format!(
        "bench -p 0 -n 0 --pg 16,8 -r 1 -t 2 -d 32 {model}"
    )));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(
        table.contains("| backend | pp16+tg8 @ d32 tok/s |\n") && table.contains("| CPU | "),
        "{table}"
    );
    let o = backstop(&words(&format!(
        "bench -p 0 -n 0 --pg 16,8 -r 1 -t 2 --format csv {model}"
    )));
    let csv = text(&o.stdout);
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.contains(",pg,16+8,1,0,"), "{csv}");

    // The generation is cached after the prompt: 32 + 16 cells, where a -p 32 -n 16 test
    // cuts back between the two and needs the longer, 32 (16 + the 16 it starts from).
    let o = backstop(&words(&format!(
        "bench -p 32 -n 16 --ctx 40 -r 1 -t 2 --format json {model}"
    )));
    assert!(o.status.success(), "{}", text(&o.stderr));
    bench_refused(
        &words(&format!("-p 0 -n 0 --pg 32,16 --ctx 40 {model}")),
        &["--ctx 40: -d 0 with --pg 32,16 needs 48 cells per sequence"],
    );
    bench_refused(
        &words(&format!("--pg 8000,193 {model}")),
        &["-d 0 with --pg 8000,193 needs 8193 tokens", "8192"],
    );
    bench_refused(
        &words(&format!("-p 0 -n 0 --pg 16,8 --parallel 2 {model}")),
        &["--parallel measures generation"],
    );
    for bad in ["16", "16,0", "x,8"] {
        bench_refused(&["--pg", bad, model], &["--pg <P,N>"]);
    }
    bench_refused(
        &words("--pg 16,8 --server http://127.0.0.1:9 smollm2"),
        &["--pg times one sequence in-process"],
    );
}

/// `--format jsonl` (llama-bench's `-o jsonl`): each result is a line of its own, with the
/// machine and repetitions in it, printed as soon as it is measured, so a sweep that stops part
/// way keeps what it finished; a reader that goes away (`| head -1`) ends the run quietly.
#[test]
fn json_lines_come_out_as_each_result_is_measured() {
    let _cores = one_at_a_time();
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let o = backstop(&words(&format!(
        "bench -o jsonl -p 16 -n 4 -r 1 -t 2 -d 0,64 --quality {model}"
    )));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines = common::json_lines(&text(&o.stdout));
    assert_eq!(lines.len(), 2, "{}", text(&o.stdout));
    for (line, depth) in lines.iter().zip([0, 64]) {
        assert_eq!(
            (&line["depth"], &line["cached"], &line["reps"]),
            (&json!(depth), &json!(depth), &json!(1)),
            "{line}"
        );
        assert_eq!(
            (&line["prompt"], &line["generate"]),
            (&json!(16), &json!(4))
        );
        assert!(line["pp"]["median"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["tg"]["median"].as_f64().unwrap() > 0.0, "{line}");
        assert!(
            !line["machine"]["cpu"].as_str().unwrap().is_empty(),
            "{line}"
        );
        // Quality, scored once, is in each line, with the text it was scored on.
        assert_eq!(line["quality_text"], "the built-in text", "{line}");
        assert!(line["quality"]["ppl"].as_f64().unwrap() > 1.0, "{line}");
    }
    assert_eq!(lines[0]["quality"], lines[1]["quality"]);

    // The second file's header reads, but its tensors were cut off: llama.cpp fails to load
    // it after the first model was measured, and that model's line is already out.
    let dir = common::temp_dir("bench-jsonl");
    let _cleanup = Cleanup(dir.clone());
    let cut = dir.join("cut.gguf");
    let bytes = std::fs::read(model).unwrap();
    std::fs::write(&cut, &bytes[..10_000_000]).unwrap();
    let o = backstop(&words(&format!(
        "bench -o jsonl -p 16 -n 4 -r 1 -t 2 {model} {}",
        cut.display()
    )));
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("llama.cpp could not load"),
        "{}",
        text(&o.stderr)
    );
    let lines = common::json_lines(&text(&o.stdout));
    assert_eq!(lines.len(), 1, "{}", text(&o.stdout));
    assert_eq!(lines[0]["file"], "SmolLM2-135M-Instruct.Q4_1.gguf");

    // The reader leaves after the first line: the run stops at its next line, with no
    // panic and exit status 0, as a pipe's writer does.
    let mut child = common::backstop_command()
        .args(words(&format!(
            "bench -o jsonl -p 16 -n 4 -r 1 -t 2 -d 0,16,32,64 {model}"
        )))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run backstop");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    drop(out);
    let done = child.wait_with_output().unwrap();
    let err = text(&done.stderr);
    assert!(
        done.status.success() && !err.contains("panicked"),
        "{:?}: {err}",
        done.status
    );
}

/// `--baseline` sets a run against what an earlier run wrote (`-o json` or `-o jsonl`): each
/// figure of the same file, settings, depth and length gets this run's median over the
/// earlier one's, in JSON, in a second table and in two more CSV columns; the figures the
/// earlier run did not measure get none, and files that are not a bench run are refused
/// before anything is measured.
#[test]
fn a_run_is_set_against_an_earlier_runs_figures() {
    let _cores = one_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let dir = common::temp_dir("bench-baseline");
    let _cleanup = Cleanup(dir.clone());
    let ran = |line: &str| {
        let o = backstop(&words(line));
        assert!(o.status.success(), "{line}: {}", text(&o.stderr));
        text(&o.stdout)
    };
    // The earlier run: one test of both lengths, at 1 and 2 threads, 2 sequences together.
    let earlier_json = dir.join("earlier.json");
    let out = ran(&format!(
        "bench -o json -p 16 -n 4 -r 1 -t 1,2 --parallel 2 {model}"
    ));
    std::fs::write(&earlier_json, &out).unwrap();
    let earlier: Value = serde_json::from_str(&out).unwrap();
    let at_2 = earlier["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["threads"] == 2)
        .unwrap();

    // This run: the same lengths as tests of their own, one more prompt, 2 threads only.
    let baseline = earlier_json.to_str().unwrap();
    let now = bench_json(&[
        "-p",
        "16,32",
        "-n",
        "4",
        "-r",
        "1",
        "--parallel",
        "2",
        "--baseline",
        baseline,
        model,
    ]);
    assert_eq!(now["baseline_file"], baseline);
    assert_eq!(now["baseline_machine"], earlier["machine"]);
    let results = now["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{now}");
    let ratio_of = |now: &Value, then: &Value, versus: &Value| {
        let (m, b) = (number(now, "median"), number(then, "median"));
        assert_eq!(number(versus, "median"), b, "{versus}");
        assert!((number(versus, "ratio") - m / b).abs() < 1e-12, "{versus}");
        let overlaps =
            number(now, "min") <= number(then, "max") && number(then, "min") <= number(now, "max");
        assert_eq!(versus["overlaps"], overlaps, "{versus}");
    };
    let (pp16, pp32, tg4) = (&results[0], &results[1], &results[2]);
    assert_eq!((&pp16["prompt"], &tg4["generate"]), (&json!(16), &json!(4)));
    ratio_of(&pp16["pp"], &at_2["pp"], &pp16["baseline"]["pp"]);
    ratio_of(&tg4["tg"], &at_2["tg"], &tg4["baseline"]["tg"]);
    let (x2, then_x2) = (&tg4["parallel"][0], &at_2["parallel"][0]);
    assert_eq!(tg4["baseline"]["parallel"][0]["sequences"], 2);
    ratio_of(x2, then_x2, &tg4["baseline"]["parallel"][0]);
    assert!(pp16["baseline"]["tg"].is_null() && tg4["baseline"]["pp"].is_null());
    // The earlier run read no prompt of 32.
    assert!(pp32.get("baseline").is_none(), "{pp32}");

    // JSON Lines as the baseline, and the table: a ratio in each cell the earlier run
    // measured, and its machine.
    let earlier_jsonl = dir.join("earlier.jsonl");
    let out = ran(&format!(
        "bench -o jsonl -p 16 -n 4 -r 1 -t 1 --parallel 2 {model}"
    ));
    std::fs::write(&earlier_jsonl, out).unwrap();
    let table = ran(&format!(
        "bench -p 16 -n 4,8 -r 1 -t 1 --parallel 2 --baseline {} {model}",
        earlier_jsonl.display()
    ));
    let (_, against) = table
        .split_once(&format!("\nagainst {}, ", earlier_jsonl.display()))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        against
            .contains("| model | quant | pp16 | tg4 | tg4 x2 aggregate | tg8 | tg8 x2 aggregate |"),
        "{against}"
    );
    let row = against
        .lines()
        .find(|l| l.starts_with("| SmolLM2-135M-Instruct.Q4_1.gguf | Q4_1 |"))
        .unwrap_or_else(|| panic!("{against}"));
    let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
    let is_ratio = |c: &str| {
        let c = c.trim_start_matches('≈');
        c.ends_with('x')
            && c.trim_end_matches('x')
                .parse::<f64>()
                .is_ok_and(|r| r > 0.0)
    };
    assert!(cells[2..5].iter().all(|c| is_ratio(c)), "{row}");
    assert_eq!(cells[5..], ["", ""], "{row}");
    assert!(
        against.contains("the baseline's machine: ") && against.contains("backstop 0.1.0"),
        "{against}"
    );

    // CSV: the earlier median and the ratio end each figure's row.
    let csv = ran(&format!(
        "bench -o csv -p 16 -n 0 -r 1 -t 2 --baseline {baseline} {model}"
    ));
    assert!(
        csv.starts_with("file,")
            && csv
                .lines()
                .next()
                .unwrap()
                .ends_with(",max,baseline_median,ratio"),
        "{csv}"
    );
    let pp = csv.lines().find(|l| l.contains(",pp,16,")).unwrap();
    let fields: Vec<&str> = pp.split(',').collect();
    let then: f64 = fields[fields.len() - 2].parse().unwrap();
    assert!((then - number(&at_2["pp"], "median")).abs() < 5e-4, "{pp}");

    // Nothing measured alike: said, and the run's own table stands.
    let unmatched = ran(&format!(
        "bench -p 8 -n 0 -r 1 -t 2 --baseline {baseline} {model}"
    ));
    assert!(
        unmatched.contains("| pp8 tok/s |")
            && unmatched.contains(&format!(
                "against {baseline}: nothing in it was measured with the same file, settings, \
                 depth and lengths"
            )),
        "{unmatched}"
    );

    // Refused before measuring: what is not a bench run's JSON.
    let csv_file = dir.join("run.csv");
    std::fs::write(&csv_file, csv).unwrap();
    let served = dir.join("served.json");
    std::fs::write(
        &served,
        json!({"servers": [], "results": [{"server": "http://127.0.0.1:1", "model": "m"}]})
            .to_string(),
    )
    .unwrap();
    let missing = dir.join("missing.json");
    for (file, says) in [
        (
            &csv_file,
            "is not what `backstop bench -o json` or `-o jsonl` writes",
        ),
        (&served, "is a `backstop bench --server` run"),
        (&missing, "No such file"),
    ] {
        let file = file.to_str().unwrap();
        bench_refused(
            &["-p", "8", "-n", "0", "--baseline", file, model],
            &[file, says],
        );
    }
    // A run against servers compares with a run against servers.
    bench_refused(
        &[
            "--server",
            "http://127.0.0.1:1",
            "--baseline",
            baseline,
            "m",
        ],
        &["is a run in this process, and this run measures against servers"],
    );
}

/// llama-bench's long flags and output names are read as its users type them; its
/// multi-letter short flags, which no single-letter parser can read, fail with what
/// `backstop bench` calls them.
#[test]
fn llama_bench_spellings_are_read_or_named() {
    let _cores = one_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let o = backstop(&words(&format!(
        "bench -o md --n-prompt 16 --n-gen 4 --repetitions 1 --n-depth 8 --flash-attn 1 \
         --batch-size 64 -t 2 {model}"
    )));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(
        table.contains("| pp16 @ d8 tok/s | tg4 @ d8 tok/s |")
            && table.contains("2 threads, flash attention on, batch 64, 1 repetition"),
        "{table}"
    );
    let o = backstop(&words(&format!("bench -ngl 99 -fa 1 {model}")));
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(
        err.contains("hint: llama-bench's -ngl is --gpu-layers")
            && err.contains("hint: llama-bench's -fa is --flash-attention"),
        "{err}"
    );
    assert!(o.stdout.is_empty());
}

/// Every number `bench` takes has its limit, said before anything is measured;
/// `-p 0` and `-n 0` leave that figure out (llama-bench's convention) rather than measuring
/// something else under its name, and `--ctx` is never silently raised.
#[test]
fn zero_leaves_a_figure_out_and_every_bench_limit_is_refused() {
    let _cores = one_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let refused = |args: &[&str], says: &[&str]| bench_refused(&[args, &[model]].concat(), says);
    refused(&["-r", "0"], &["-r 0"]);
    refused(&["-p", "0", "-n", "0"], &["nothing to measure"]);
    refused(&["--parallel", "0"], &["--parallel 0"]);
    refused(&["--parallel", "4,0"], &["--parallel 0"]);
    refused(&["-n", "0", "--parallel", "2"], &["--parallel", "-n"]);
    refused(&["-t", "0"], &["--threads"]);
    refused(&["-t", "2,0"], &["--threads"]);
    refused(
        &["--kv-cache-type", "f16,q5_1"],
        &["q5_1", "f16, q8_0 or q4_0"],
    );
    refused(&["--flash-attention", "1,maybe"], &["maybe"]);
    // 64 prompt tokens need 64 cells; 8 generated need 8 + the 16 generation starts from.
    refused(
        &["-p", "64", "-n", "8", "--ctx", "63"],
        &["--ctx 63", "needs 64"],
    );
    refused(
        &["-p", "8", "-n", "8", "--ctx", "23"],
        &["--ctx 23", "needs 24"],
    );

    let run = |args: &[&str]| {
        let o = backstop(&[&["bench", "-r", "1", "-t", "2"], args, &[model]].concat());
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        text(&o.stdout)
    };
    let json = |args: &[&str]| -> Value {
        let out = run(&[args, &["--format", "json"]].concat());
        serde_json::from_str(&out).expect("bench JSON")
    };
    // The context is just enough, rounded the way llama.cpp splits it between sequences, so
    // it has nothing to round down (and no warning to print) for any count of them.
    let o = backstop(&[
        "bench",
        "-r",
        "1",
        "-p",
        "0",
        "-n",
        "4",
        "--parallel",
        "2,3",
        "--format",
        "csv",
        model,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        !text(&o.stderr).contains("divisible"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(text(&o.stdout).lines().count(), 4, "{}", text(&o.stdout));
    let tg_only = json(&["-p", "0", "-n", "8", "--parallel", "2"]);
    let r = &tg_only["results"][0];
    assert!(r["pp"].is_null(), "{tg_only}");
    assert!(r["tg"]["median"].as_f64().unwrap() > 0.0, "{tg_only}");
    assert!(
        r["parallel"][0]["median"].as_f64().unwrap() > 0.0,
        "{tg_only}"
    );
    let pp_only = json(&["-p", "16", "-n", "0", "--ctx", "16"]);
    let r = &pp_only["results"][0];
    assert!(r["tg"].is_null(), "{pp_only}");
    assert!(r["pp"]["median"].as_f64().unwrap() > 0.0, "{pp_only}");
    let table = run(&["-p", "0", "-n", "8", "--ctx", "24"]);
    assert!(
        table.contains("| backend | tg8 tok/s |\n") && !table.contains("pp0"),
        "{table}"
    );
    // `--ctx` is said with the other settings every row shares.
    assert!(
        table.contains("2 threads, 24 context cells per sequence, 1 repetition\n"),
        "{table}"
    );
    let csv = run(&["-p", "16", "-n", "0", "--format", "csv"]);
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.lines().nth(1).unwrap().contains(",pp,16,1,0,"), "{csv}");

    // `quantize` takes threads the same way.
    let dir = common::temp_dir("quantize-threads");
    let _cleanup = Cleanup(dir.clone());
    let o = backstop(&[
        "quantize",
        "-t",
        "0",
        model,
        dir.join("out.gguf").to_str().unwrap(),
        "Q8_0",
    ]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--threads"), "{}", text(&o.stderr));
    assert_eq!(entries(&dir), Vec::<String>::new());
}

/// `backstop bench ARGS --format json`, which must succeed.
fn bench_json(args: &[&str]) -> Value {
    let o = backstop(&[&["bench", "-t", "2", "--format", "json"], args].concat());
    assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("bench JSON")
}

fn quality(result: &Value) -> &Value {
    let q = &result["quality"];
    assert!(q.is_object(), "no quality: {result}");
    q
}

fn number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number: {v}"))
}

#[test]
fn quality_is_scored_and_compared_with_the_first_model_of_each_vocabulary() {
    let _cores = one_at_a_time();
    let smol = common::smollm2();
    let gemma = common::gemma3();
    let (smol, gemma) = (smol.to_str().unwrap(), gemma.to_str().unwrap());
    // Quality alone (-p 0 -n 0): SmolLM2 twice, then a model of another vocabulary.
    let out = bench_json(&["--quality", "-p", "0", "-n", "0", smol, smol, gemma]);
    assert_eq!(out["quality_text"], "the built-in text", "{out}");
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{out}");
    for r in results {
        assert!(
            r["pp"].is_null() && r["tg"].is_null(),
            "nothing but quality: {r}"
        );
    }
    let first = quality(&results[0]);
    // The first of its vocabulary is a reference.
    assert!(
        first["reference"].is_null() && first["kld"].is_null(),
        "{first}"
    );
    assert!(first["same_top"].is_null(), "{first}");
    // The built-in text is about 1,450 SmolLM2 tokens: two whole 512-token chunks, each
    // scored from its middle (positions 256..=510 predict 257..=511).
    assert_eq!(first["chunk"], 512, "{first}");
    assert_eq!(first["scored"], 2 * 255, "{first}");
    assert!(number(first, "text_tokens") >= 1024.0, "{first}");
    // English prose to a small instruction model: far better than chance (a perplexity of
    // 49,152, its vocabulary), far from certain.
    let ppl = number(first, "ppl");
    assert!((5.0..60.0).contains(&ppl), "{first}");
    let error = number(first, "ppl_error");
    assert!(error > 0.0 && error < ppl / 4.0, "{first}");
    // The same model again: the same figures, bit for bit, and no divergence at all.
    let again = quality(&results[1]);
    assert_eq!(again["ppl"], first["ppl"], "{again}");
    assert_eq!(
        again["reference"], "SmolLM2-135M-Instruct.Q4_1.gguf",
        "{again}"
    );
    assert!(number(again, "kld").abs() < 1e-6, "{again}");
    assert!(number(again, "kld_max").abs() < 1e-6, "{again}");
    assert_eq!(number(again, "dp_rms"), 0.0, "{again}");
    assert_eq!(number(again, "same_top"), 1.0, "{again}");
    assert_eq!(number(again, "ppl_ratio"), 1.0, "{again}");
    assert_eq!(number(again, "ppl_ratio_error"), 0.0, "{again}");
    // Over the reference's 4,096 likeliest tokens: the built-in text is short.
    assert_eq!(again["kld_top"], 4096, "{again}");
    // Gemma reads other tokens: it is a reference of its own, not compared with SmolLM2.
    let gemma = quality(&results[2]);
    assert!(
        gemma["reference"].is_null() && gemma["kld"].is_null(),
        "{gemma}"
    );
    assert!((5.0..60.0).contains(&number(gemma, "ppl")), "{gemma}");

    // A text of one's own: the same sentence over and over is easy to predict.
    let dir = common::temp_dir("quality-text");
    let _cleanup = Cleanup(dir.clone());
    let file = dir.join("repeated.txt");
    std::fs::write(
        &file,
        "The bridge over the river has five stone arches. ".repeat(60),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let own = bench_json(&["--quality-text", file, "-p", "0", "-n", "0", smol]);
    assert_eq!(own["quality_text"], file, "{own}");
    let q = quality(&own["results"][0]);
    assert!(number(q, "ppl") < 2.0, "{q}");
    assert!(number(q, "ppl") < ppl / 5.0, "{q}");
}

#[test]
fn a_quantization_ladder_shows_what_each_rung_costs_in_quality() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("quality-ladder");
    let _cleanup = Cleanup(dir.clone());
    let smol = common::smollm2();
    let (dir, smol) = (dir.to_str().unwrap(), smol.to_str().unwrap());
    // Quality alone in JSON and CSV; the table with speed beside it.
    let run = |speed: &str, format: &str| {
        let line = format!(
            "bench --quality -t 2 {speed} -r 1 --quantize Q8_0,Q4_0 --quantize-dir {dir} \
             --format {format} {smol}"
        );
        let o = backstop(&words(&line));
        assert!(o.status.success(), "{line}: {}", text(&o.stderr));
        text(&o.stdout)
    };
    let out: Value = serde_json::from_str(&run("-p 0 -n 0", "json")).expect("bench JSON");
    let results = out["results"].as_array().unwrap();
    let quants: Vec<&str> = results
        .iter()
        .map(|r| r["quantization"].as_str().unwrap())
        .collect();
    assert_eq!(quants, ["Q4_1", "Q8_0", "Q4_0"], "{out}");
    let (source, q8, q4) = (
        quality(&results[0]),
        quality(&results[1]),
        quality(&results[2]),
    );
    assert!(source["reference"].is_null(), "{source}");
    for q in [q8, q4] {
        assert_eq!(q["reference"], "SmolLM2-135M-Instruct.Q4_1.gguf", "{q}");
        assert!(number(q, "kld") > 0.0, "{q}");
    }
    // Q8_0 holds Q4_1's weights almost exactly; Q4_0 loses each block's offset. So Q8_0
    // stays closer, in every figure.
    assert!(number(q8, "kld") < number(q4, "kld") / 10.0, "{q8} {q4}");
    assert!(number(q8, "dp_rms") < number(q4, "dp_rms"), "{q8} {q4}");
    // The worst positions stray far further than the mean, the worst of all further still.
    for q in [q8, q4] {
        let (mean, p99, max) = (number(q, "kld"), number(q, "kld_p99"), number(q, "kld_max"));
        assert!(mean < p99 && p99 <= max, "{q}");
        assert!(
            number(q, "dp_rms") > 0.0 && number(q, "dp_rms") < 1.0,
            "{q}"
        );
    }
    assert!(number(q8, "same_top") > number(q4, "same_top"), "{q8} {q4}");
    assert!(number(q8, "same_top") > 0.85, "{q8}");
    assert!(number(q4, "ppl") > number(source, "ppl"), "{q4} {source}");
    // Paired with the source token by token, Q4_0's loss stands well clear of its error,
    // though the two perplexities' own errors overlap; Q8_0's does not.
    let (ratio, error) = (number(q4, "ppl_ratio"), number(q4, "ppl_ratio_error"));
    assert!(ratio - 1.0 > 2.0 * error && error > 0.0, "{q4}");
    assert!(
        number(q4, "ppl") - number(q4, "ppl_error")
            < number(source, "ppl") + number(source, "ppl_error"),
        "{q4} {source}"
    );
    assert!((number(q8, "ppl_ratio") - 1.0).abs() < 0.01, "{q8}");

    // The table gives each its three cells beside the speed, and says what they are.
    let table = run("-p 16 -n 4", "table");
    assert!(
        table.contains(" | tg4 tok/s | ppl | ppl ratio | kld | kld 99% | same top |\n"),
        "{table}"
    );
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| Sm")).collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(
        rows[0].ends_with(" | (ref) | (ref) | (ref) | (ref) |"),
        "{table}"
    );
    for row in &rows[1..] {
        let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
        // tg4, ppl ± error, ppl ratio ± error, kld, kld 99%, same top.
        let [tg, ppl, ratio, kld, p99, same] = cells[cells.len() - 6..] else {
            panic!("{table}")
        };
        assert!(
            tg.contains('–') && ppl.contains(" ± ") && ratio.contains(" ± "),
            "{row}"
        );
        let kld: f64 = kld.parse().unwrap();
        assert!(kld > 0.0, "{row}");
        assert!(p99.parse::<f64>().is_ok_and(|k| k > kld), "{row}");
        assert!(same.ends_with('%'), "{row}");
    }
    assert!(
        table.contains("ppl: perplexity of the built-in text"),
        "{table}"
    );
    assert!(table.contains("kld: mean KL divergence"), "{table}");
    assert!(
        table.contains("kld 99%: what 99% of the positions"),
        "{table}"
    );
    let csv = run("-p 0 -n 0", "csv");
    for figure in [",ppl,", ",ppl_error,"] {
        assert_eq!(csv.matches(figure).count(), 3, "{csv}");
    }
    for figure in [
        ",ppl_ratio,",
        ",ppl_ratio_error,",
        ",kld,",
        ",kld_p99,",
        ",kld_max,",
        ",same_top,",
        ",dp_rms,",
    ] {
        assert_eq!(csv.matches(figure).count(), 2, "{csv}");
    }
}

#[test]
fn a_quantized_kv_cache_is_compared_with_the_f16_one() {
    let _cores = one_at_a_time();
    let smol = common::smollm2();
    let out = bench_json(&words(&format!(
        "--quality -p 0 -n 0 --kv-cache-type f16,q4_0 --flash-attention 1 {}",
        smol.display()
    )));
    let results = out["results"].as_array().unwrap();
    assert_eq!(results[1]["kv_cache_type"], "q4_0", "{out}");
    let q = quality(&results[1]);
    // The same file under another setting is compared with the first setting, named by it.
    assert_eq!(
        q["reference"], "SmolLM2-135M-Instruct.Q4_1.gguf kv=f16",
        "{q}"
    );
    assert!(number(q, "kld") > 0.0, "{q}");
}

/// `--batch` sweeps the most tokens one decode holds: each context is made with it (llama.cpp's
/// own log of every context is read back), the prompt and the parallel start are read in
/// pieces that size (a decode over it would abort the process), the quality pass too (which
/// moves the figures' last bits), and a batch that cannot hold one step of every parallel
/// sequence is refused. Given no choice, each context is made as `serve` would make it: on a
/// CPU, flash attention off (llama.cpp's own default would turn it on).
#[test]
fn a_batch_sweep_makes_each_context_with_its_batch() {
    let _cores = one_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let (report, err) = bench_logged(&words(&format!(
        "-p 64 -n 4 -r 1 -t 2 --parallel 8 -b 8,64 {model}"
    )));
    let rows: Vec<u64> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(r["pp"]["median"].as_f64().unwrap() > 0.0, "{r}");
            assert_eq!(r["parallel"][0]["sequences"], 8, "{r}");
            assert!(r["parallel"][0]["median"].as_f64().unwrap() > 0.0, "{r}");
            r["batch"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(rows, [8, 64]);
    let made: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("n_batch ") || l.contains("n_ubatch "))
        .filter_map(|l| l.split("= ").nth(1)?.split(' ').next())
        .collect();
    assert_eq!(made, ["8", "8", "64", "64"], "{err}");
    assert_eq!(
        common::flash_attn_made(&err),
        ["disabled", "disabled"],
        "{err}"
    );

    // Quality read 8 tokens a decode against 512: the same model, so only rounding moves,
    // but it does (flash attention sums a batch's queries in tiles; with it off, SmolLM2's
    // figures do not move at all).
    let out = bench_json(&words(&format!(
        "--quality -p 0 -n 0 --flash-attention 1 -b 512,8 {model}"
    )));
    let results = out["results"].as_array().unwrap();
    assert_eq!(results[1]["batch"], 8, "{out}");
    let q = quality(&results[1]);
    assert_eq!(
        q["reference"], "SmolLM2-135M-Instruct.Q4_1.gguf b=512",
        "{q}"
    );
    let kld = number(q, "kld");
    assert!(kld > 0.0 && kld < 0.02, "{q}");
    assert!(number(q, "same_top") > 0.9, "{q}");
    assert!((number(q, "ppl_ratio") - 1.0).abs() < 0.02, "{q}");

    // A batch that is not the default is a column when it varies, else said under the table;
    // CSV gives it on every row.
    let o = backstop(&words(&format!(
        "bench -p 16 -n 0 -r 1 -t 2 -b 4,16 {model}"
    )));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(
        table.contains("| backend | batch | pp16 tok/s |")
            && table.contains("| CPU | 4 |")
            && table.contains("| CPU | 16 |"),
        "{table}"
    );
    let o = backstop(&words(&format!("bench -p 16 -n 0 -r 1 -t 2 -b 64 {model}")));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(
        table.contains("\n2 threads, batch 64, 1 repetition\n"),
        "{table}"
    );
    let o = backstop(&words(&format!(
        "bench -p 16 -n 0 -r 1 -t 2 -b 64 --format csv {model}"
    )));
    let csv = text(&o.stdout);
    assert!(
        csv.starts_with(
            "file,quantization,size,parameters,backend,threads,threads_batch,gpu_layers,\
                         flash_attention,kv_cache_type,batch,figure,"
        ) && csv.lines().nth(1).unwrap().contains(",f16,64,pp,16,1,0,"),
        "{csv}"
    );

    bench_refused(
        &["-r", "1", "--parallel", "8", "-b", "512,4", model],
        &["--batch 4 with --parallel 8", "at least 8"],
    );
    bench_refused(&["-b", "0", model], &["--batch"]);
}

/// `--quality-save` keeps the first model's next-token distributions in the base format of
/// llama.cpp's perplexity tool, and `--quality-base` compares models with them later, without
/// the model that made them: over the same tokens, each model's figures are those of the run
/// that had it (the model itself differing by no more than the file's 16-bit rounding). A file
/// cut short, a file of another kind, a model of another vocabulary and a folder to save in
/// that is not there are each refused before anything is measured.
#[test]
fn a_reference_saved_once_is_compared_with_later_without_its_model() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("quality-base");
    let _cleanup = Cleanup(dir.clone());
    let smol = common::smollm2();
    let smol_s = smol.to_str().unwrap();
    let q4 = dir.join("smol-Q4_0.gguf");
    let q4_s = q4.to_str().unwrap();
    let o = quantize(&smol, &q4, "Q4_0");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let base = dir.join("smol.kld");
    let base_s = base.to_str().unwrap();
    let quality_only = ["-p", "0", "-n", "0"];
    let first = bench_json(
        &[
            &["--quality-save", base_s][..],
            &quality_only,
            &[smol_s, q4_s],
        ]
        .concat(),
    );
    let in_run = quality(&first["results"][1]);
    assert_eq!(
        in_run["reference"], "SmolLM2-135M-Instruct.Q4_1.gguf",
        "{in_run}"
    );

    // The tool's layout: its name, chunks of 512 tokens, SmolLM2's 49,152-token vocabulary,
    // the two chunks of the built-in text and their tokens; then a row for each scored
    // position, two floats and a 16-bit value per token.
    let bytes = std::fs::read(&base).unwrap();
    let int = |at: usize| i32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(&bytes[..8], b"_logits_");
    assert_eq!((int(8), int(12), int(16)), (512, 49152, 2));
    assert_eq!(bytes.len(), 20 + 4 * 2 * 512 + 2 * 255 * 2 * (4 + 49152));
    assert_eq!(number(in_run, "scored"), 2.0 * 255.0);

    let later = bench_json(
        &[
            &["--quality-base", base_s][..],
            &quality_only,
            &[q4_s, smol_s],
        ]
        .concat(),
    );
    assert_eq!(
        later["quality_text"],
        format!("the tokens saved in {base_s}"),
        "{later}"
    );
    let q = quality(&later["results"][0]);
    assert_eq!(q["reference"], "smol.kld", "{q}");
    // The same tokens through the same model: the same perplexity, bit for bit.
    assert_eq!(q["ppl"], in_run["ppl"], "{q}");
    assert_eq!(q["scored"], in_run["scored"], "{q}");
    let near = |key: &str, within: f64| {
        let (a, b) = (number(q, key), number(in_run, key));
        assert!((a - b).abs() <= within, "{key}: {a} saved, {b} in the run");
    };
    near("ppl_ratio", 1e-3);
    near("kld", 1e-3);
    near("kld_p99", 1e-2);
    near("dp_rms", 1e-3);
    // A tie at the top may fall the other way after rounding: a position or two.
    near("same_top", 2.0 / 510.0);
    // The model that saved it, against itself.
    let own = quality(&later["results"][1]);
    assert!(number(own, "kld") < 1e-3, "{own}");
    assert!((number(own, "ppl_ratio") - 1.0).abs() < 1e-3, "{own}");
    assert_eq!(number(own, "same_top"), 1.0, "{own}");

    let cut = dir.join("cut.kld");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let cut_s = cut.to_str().unwrap();
    bench_refused(
        &[&["--quality-base", cut_s][..], &quality_only, &[smol_s]].concat(),
        &["cut short", "2 chunks of 512 tokens, a vocabulary of 49152"],
    );
    bench_refused(
        &[&["--quality-base", smol_s][..], &quality_only, &[smol_s]].concat(),
        &["not a file of saved log-probabilities"],
    );
    let gemma = common::gemma3();
    bench_refused(
        &[
            &["--quality-base", base_s][..],
            &quality_only,
            &[smol_s, gemma.to_str().unwrap()],
        ]
        .concat(),
        &["a vocabulary of 262144 tokens", "from a model of 49152"],
    );
    let nowhere = dir.join("missing").join("smol.kld");
    bench_refused(
        &[
            &["--quality-save", nowhere.to_str().unwrap()][..],
            &quality_only,
            &[smol_s],
        ]
        .concat(),
        &["no such folder"],
    );
    bench_refused(
        &[
            &["--quality-base", base_s, "--quality-text", smol_s][..],
            &quality_only,
            &[smol_s],
        ]
        .concat(),
        &["cannot be used with"],
    );
    // Nothing was left behind by the runs refused or done.
    let mut left = entries(&dir);
    left.sort();
    assert_eq!(left, ["cut.kld", "smol-Q4_0.gguf", "smol.kld"]);
}

#[test]
fn quality_refuses_texts_it_cannot_score() {
    let _cores = one_at_a_time();
    let smol = common::smollm2();
    let model = smol.to_str().unwrap();
    let dir = common::temp_dir("quality-refused");
    let _cleanup = Cleanup(dir.clone());
    let short = dir.join("short.txt");
    std::fs::write(&short, "A few words are not enough.").unwrap();
    let binary = dir.join("binary.txt");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let missing = dir.join("missing.txt");
    for (file, says) in [
        (&short, "needs a text of at least 64 tokens"),
        (&binary, "not UTF-8 text"),
        (&missing, "missing.txt"),
    ] {
        let file = file.to_str().unwrap();
        bench_refused(
            &["--quality-text", file, "-p", "0", "-n", "0", model],
            &[file, says],
        );
    }
    // Quality is scored in this process: not with --server.
    bench_refused(
        &["--server", "http://127.0.0.1:9", "--quality", "m"],
        &["--quality"],
    );

    // Chunks of another length (llama-perplexity's -c): each scored token has less before
    // it, so the perplexity is higher than in chunks of 512 (21.56), as the tool's is (it
    // says 26.0125 with -c 128 -fa off).
    let out = bench_json(&["--quality-chunk", "128", "-p", "0", "-n", "0", model]);
    let q = quality(&out["results"][0]);
    assert_eq!(q["chunk"], 128, "{q}");
    let scored = number(q, "scored") as usize;
    assert!(scored.is_multiple_of(63) && scored / 63 >= 8, "{q}");
    // Within 1%: another machine's kernels round differently.
    assert!((number(q, "ppl") - 26.01).abs() < 0.26, "{q}");
    let quality_only = ["-p", "0", "-n", "0", model];
    for (chunk, says) in [
        (
            "4096",
            "tokens, less than one chunk of 4096 (--quality-chunk)",
        ),
        (
            "16384",
            "--quality-chunk 16384: longer than the model's training context of 8192 tokens",
        ),
        ("8", "8 is not in 16.."),
    ] {
        bench_refused(
            &[&["--quality-chunk", chunk][..], &quality_only].concat(),
            &[says],
        );
    }
    bench_refused(
        &[
            &["--quality-chunk", "128", "--quality-base", model][..],
            &quality_only,
        ]
        .concat(),
        &["cannot be used with"],
    );
}

/// Code words for tasks that any model reading its context gets right.
const CODE_WORDS: [&str; 16] = [
    "amber", "falcon", "river", "copper", "meadow", "lantern", "velvet", "harbor", "orchid",
    "pebble", "thunder", "willow", "cedar", "marble", "violet", "canyon",
];

/// Task `i`'s `j`th code word: three words, no two of the first four sharing one.
fn code_word(i: usize, j: usize) -> String {
    (0..3)
        .map(|k| CODE_WORDS[(i * 5 + (j % 4) * 4 + (j / 4) * 2 + k) % 16])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Twelve HellaSwag tasks: a code word said, then begun again, the endings four code words.
/// The file calls the repeated one right, or (`repeated_is_right` false) the one after it.
fn code_word_hellaswag(path: &Path, repeated_is_right: bool) {
    let mut lines = Vec::new();
    for i in 0..12 {
        let said = i % 4;
        let right = if repeated_is_right {
            said
        } else {
            (said + 1) % 4
        };
        lines.push(format!(
            "Note: the code word is {}. Once more, the code word is",
            code_word(i, said)
        ));
        lines.push(right.to_string());
        lines.extend((0..4).map(|j| format!("{}.", code_word(i, j))));
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Twelve Winogrande tasks, a header first: the blank where a code word is said and its two
/// choices, the sentence saying it again after (scored after the choice: a quoted sentence,
/// with a comma), or the blank where it is said again (scored from the choice on).
fn code_word_winogrande(path: &Path, repeated_is_right: bool) {
    let mut lines = vec!["index,sentence,option1,option2,answer".to_owned()];
    for i in 0..12 {
        let said = i % 2;
        let sentence = if i < 6 {
            format!(
                "\"The code word is _. I repeat, the code word is {} and nothing else.\"",
                code_word(i, said)
            )
        } else {
            format!(
                "The code word is {}. Once more the code word is _.",
                code_word(i, said)
            )
        };
        let right = if repeated_is_right { said } else { 1 - said };
        lines.push(format!(
            "{i},{sentence},{},{},{}",
            code_word(i, 0),
            code_word(i, 1),
            right + 1
        ));
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// llama-perplexity's multiple-choice file (little-endian): the task count, each task's
/// offset, then each task's question and two lists of answers with their labels (1: right).
fn write_multiple_choice(path: &Path, tasks: &[(String, Vec<String>, usize)]) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut body = Vec::new();
    let mut offsets = Vec::new();
    for (question, answers, right) in tasks {
        offsets.push((4 + 4 * tasks.len() + body.len()) as u32);
        string(&mut body, question);
        for _ in 0..2 {
            body.extend((answers.len() as u32).to_le_bytes());
            for a in answers {
                string(&mut body, a);
            }
            for i in 0..answers.len() {
                body.extend(u32::from(i == *right).to_le_bytes());
            }
        }
    }
    let mut out = (tasks.len() as u32).to_le_bytes().to_vec();
    out.extend(offsets.iter().flat_map(|o| o.to_le_bytes()));
    out.extend(body);
    std::fs::write(path, out).unwrap();
}

/// Twelve multiple-choice tasks of two to six answers: a code word said, then begun again.
fn code_word_multiple_choice(path: &Path, repeated_is_right: bool) {
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let n = 2 + i % 5;
            let said = i % n;
            let right = if repeated_is_right {
                said
            } else {
                (said + 1) % n
            };
            let question = format!(
                "Note: the code word is {}. Once more, the code word is",
                code_word(i, said)
            );
            let answers = (0..n).map(|j| format!("{}.", code_word(i, j))).collect();
            (question, answers, right)
        })
        .collect();
    write_multiple_choice(path, &tasks);
}

fn task_score<'v>(result: &'v Value, kind: &str) -> &'v Value {
    let h = &result[kind];
    assert!(h.is_object(), "no {kind}: {result}");
    h
}

/// Winogrande's partial scoring, told apart from scoring every token from where the two
/// sentences part: a count broken off at the blank, whose choices are the count going on
/// (six predictable tokens) or a code word, which the sentence then says again. Scored from
/// the choice on, the count's own tokens win, and SmolLM2 picks it in all six tasks; scored
/// after the choice, as llama-perplexity does when both sentences go on for more than three
/// tokens, only the repeat counts, and it picks the code word in all six, as that tool does.
#[test]
fn winogrande_scores_only_what_follows_the_choice_when_both_sentences_go_on() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("winogrande-partial");
    let _cleanup = Cleanup(dir.clone());
    let words = [
        "zqx", "vlp", "kord", "mibe", "trask", "yoln", "pefk", "gugo",
    ];
    let numbers = "one two three four five six seven eight nine ten eleven twelve thirteen \
                   fourteen fifteen sixteen";
    let numbers: Vec<&str> = numbers.split_whitespace().collect();
    let mut lines = vec!["index,sentence,option1,option2,answer".to_owned()];
    for i in 0..6 {
        let code = format!("{} {}", words[i], words[i + 2]);
        lines.push(format!(
            "{i},\"Count: {} _. I repeat, the code word is {code} and nothing else.\",{},{code},2",
            numbers[i..i + 5].join(" "),
            numbers[i + 5..i + 11].join(" "),
        ));
    }
    let file = dir.join("partial.csv");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let smol = common::smollm2();
    let out = bench_json(&[
        "--winogrande",
        file.to_str().unwrap(),
        "-p",
        "0",
        "-n",
        "0",
        smol.to_str().unwrap(),
    ]);
    let w = task_score(&out["results"][0], "winogrande");
    assert_eq!((&w["tasks"], &w["correct"]), (&json!(6), &json!(6)), "{w}");
}

#[test]
fn tasks_are_scored_and_each_models_picks_set_against_the_first() {
    let _cores = one_at_a_time();
    let smol = common::smollm2();
    let gemma = common::gemma3();
    let (smol, gemma) = (smol.to_str().unwrap(), gemma.to_str().unwrap());
    let dir = common::temp_dir("tasks");
    let _cleanup = Cleanup(dir.clone());
    let files = |right: bool| {
        let (h, w, m) = (
            dir.join(format!("hellaswag-{right}.txt")),
            dir.join(format!("winogrande-{right}.csv")),
            dir.join(format!("multiple-choice-{right}.bin")),
        );
        code_word_hellaswag(&h, right);
        code_word_winogrande(&w, right);
        code_word_multiple_choice(&m, right);
        let s = |p: PathBuf| p.display().to_string();
        (s(h), s(w), s(m))
    };
    let (hellaswag, winogrande, multiple) = files(true);
    let kinds = ["hellaswag", "winogrande", "multiple_choice"];

    // Every task right, by both models, whatever the batch: a batch of 16 reads each task
    // (about 60 tokens) in several decodes.
    let out = bench_json(&[
        "--hellaswag",
        &hellaswag,
        "--winogrande",
        &winogrande,
        "--multiple-choice",
        &multiple,
        "-b",
        "512,16",
        "-p",
        "0",
        "-n",
        "0",
        smol,
        gemma,
    ]);
    assert_eq!(out["hellaswag_file"], hellaswag.as_str(), "{out}");
    assert_eq!(out["winogrande_file"], winogrande.as_str(), "{out}");
    assert_eq!(out["multiple_choice_file"], multiple.as_str(), "{out}");
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "{out}");
    for (i, r) in results.iter().enumerate() {
        assert!(r["pp"].is_null() && r["quality"].is_null(), "{r}");
        for kind in kinds {
            let h = task_score(r, kind);
            assert_eq!(
                (&h["tasks"], &h["correct"]),
                (&json!(12), &json!(12)),
                "{kind}: {h}"
            );
            assert_eq!(number(h, "accuracy"), 1.0, "{h}");
            // Wilson's interval for 12 of 12 at 95%.
            assert!((number(h, "low") - 0.7575).abs() < 1e-4, "{h}");
            assert!((number(h, "high") - 1.0).abs() < 1e-9, "{h}");
            if i == 0 {
                assert!(h["reference"].is_null() && h["same_pick"].is_null(), "{h}");
            } else {
                // SmolLM2's and Gemma's picks set against the first row's, task by task.
                assert_eq!(
                    h["reference"], "SmolLM2-135M-Instruct.Q4_1.gguf b=512",
                    "{h}"
                );
                assert_eq!(number(h, "same_pick"), 1.0, "{h}");
            }
        }
    }

    // The same tasks, the files calling the other answer right: none is the model's pick.
    let (hellaswag, winogrande, multiple) = files(false);
    let out = bench_json(&[
        "--hellaswag",
        &hellaswag,
        "--winogrande",
        &winogrande,
        "--multiple-choice",
        &multiple,
        "-p",
        "0",
        "-n",
        "0",
        smol,
    ]);
    for kind in kinds {
        let h = task_score(&out["results"][0], kind);
        assert_eq!(
            (&h["tasks"], &h["correct"]),
            (&json!(12), &json!(0)),
            "{kind}: {h}"
        );
        assert!(number(h, "high") < 0.25, "{h}");
    }

    // The README's samples: 10 of HellaSwag's 40 tasks and all 30 of Winogrande's, beside a
    // speed figure and quality, in a table and in CSV.
    let sample = |name: &str| common::checkout().join("tests/data").join(name);
    let (hellaswag, winogrande) = (
        sample("hellaswag-sample.txt"),
        sample("winogrande-sample.csv"),
    );
    let (hellaswag, winogrande) = (hellaswag.to_str().unwrap(), winogrande.to_str().unwrap());
    let both = [
        "-t",
        "2",
        "-p",
        "16",
        "-n",
        "0",
        "-r",
        "1",
        "--quality",
        "--hellaswag",
        hellaswag,
        "--hellaswag-tasks",
        "10",
        "--winogrande",
        winogrande,
        smol,
        smol,
    ];
    let o = backstop(&[&["bench"][..], &both].concat());
    let table = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        table.starts_with(
            "| model | quant | size | params | backend | pp16 tok/s | ppl | ppl ratio | kld | \
             kld 99% | same top | hellaswag | hellaswag same | winogrande | winogrande same |"
        ),
        "{table}"
    );
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| SmolLM2"))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    let cell = |row: &str, n: usize| {
        let cell = row.split(" | ").nth(n).unwrap_or_default();
        cell.trim_end_matches(" |").to_owned()
    };
    for n in [12, 14] {
        assert_eq!(cell(rows[0], n), "(ref)", "{table}");
        assert_eq!(cell(rows[1], n), "100.0%", "{table}");
    }
    // The same model: the same accuracy cells, a whole number of tenths and of thirtieths.
    assert_eq!(cell(rows[0], 11), cell(rows[1], 11), "{table}");
    assert_eq!(cell(rows[0], 13), cell(rows[1], 13), "{table}");
    assert!(cell(rows[0], 11).contains("0.00% ["), "{table}");
    let winogrande_right: f64 = cell(rows[0], 13)
        .split('%')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert!(
        (winogrande_right * 0.3 - (winogrande_right * 0.3).round()).abs() < 0.01,
        "{table}"
    );
    assert!(
        table.contains(&format!("over 10 of the 40 tasks of {hellaswag}")),
        "{table}"
    );
    assert!(
        table.contains(&format!("over the 30 tasks of {winogrande}")),
        "{table}"
    );
    let o = backstop(&[&["bench", "--format", "csv"][..], &both].concat());
    let csv = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for kind in ["hellaswag", "winogrande"] {
        for figure in ["", "_low", "_high"] {
            let rows = csv
                .lines()
                .filter(|l| l.contains(&format!(",{kind}{figure},")))
                .count();
            assert_eq!(rows, 2, "{kind}{figure}: {csv}");
        }
        let same: Vec<&str> = csv
            .lines()
            .filter(|l| l.contains(&format!(",{kind}_same_pick,")))
            .collect();
        assert!(same.len() == 1 && same[0].contains(",1.000000,,"), "{csv}");
    }
}

#[test]
fn task_files_that_cannot_be_read_are_refused() {
    let smol = common::smollm2();
    let model = smol.to_str().unwrap();
    let dir = common::temp_dir("tasks-refused");
    let _cleanup = Cleanup(dir.clone());
    let write = |name: &str, text: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let task = "A context\n0\none\ntwo\nthree\nfour\n";
    let row = "0,The cup is _ now.,full,empty,1\n";
    let binary = write("binary.txt", &[0xff, 0xfe, 0x00, 0x41]);
    let choices = |n: usize| (0..n).map(|i| format!("answer {i}")).collect::<Vec<_>>();
    let mc = dir.join("fine.bin");
    write_multiple_choice(&mc, &[("A question?".into(), choices(3), 1)]);
    let mc_bytes = std::fs::read(&mc).unwrap();
    let many = dir.join("many.bin");
    write_multiple_choice(&many, &[("A question?".into(), choices(101), 1)]);
    let missing = dir.join("missing.txt").display().to_string();
    let refusals = [
        (
            "hellaswag",
            write("cut.txt", format!("{task}{task}extra\n").as_bytes()),
            "13 lines, not a whole number of tasks",
        ),
        (
            "hellaswag",
            write(
                "label.txt",
                format!("{task}{}", task.replace("\n0\n", "\n4\n")).as_bytes(),
            ),
            "line 8: \"4\" is not the number of the right ending (0 to 3)",
        ),
        ("hellaswag", write("empty.txt", b""), "no tasks"),
        (
            "winogrande",
            write(
                "blank.csv",
                format!("{row}1,The cup is full.,a,b,1\n").as_bytes(),
            ),
            "line 2: \"The cup is full.\" has no _ for the choice",
        ),
        (
            "winogrande",
            write(
                "answer.csv",
                format!("{row}1,The cup is _.,a,b,3\n").as_bytes(),
            ),
            "line 2: \"3\" is not the right choice's number (1 or 2)",
        ),
        (
            "winogrande",
            write("fields.csv", format!("{row}1,The cup is _.,a\n").as_bytes()),
            "line 2: not five fields",
        ),
        (
            "winogrande",
            write("header.csv", b"index,sentence,option1,option2,answer\n"),
            "no tasks",
        ),
        (
            "multiple-choice",
            write("cut.bin", &mc_bytes[..mc_bytes.len() - 1]),
            "task 1: cut short in the answers' labels",
        ),
        (
            "multiple-choice",
            many.display().to_string(),
            "task 1: 101 answers, more than 100",
        ),
        (
            "multiple-choice",
            write("empty.bin", b""),
            "cut short in the task count",
        ),
    ];
    for (kind, file, says) in refusals {
        bench_refused(
            &[&format!("--{kind}"), &file, "-p", "0", "-n", "0", model],
            &[&format!("--{kind} {file}: "), says],
        );
    }
    for kind in ["hellaswag", "winogrande"] {
        for (file, says) in [(&binary, "not UTF-8 text"), (&missing, "missing.txt")] {
            bench_refused(
                &[&format!("--{kind}"), file, "-p", "0", "-n", "0", model],
                &[&format!("--{kind} {file}: "), says],
            );
        }
    }
    let (task, row) = (
        write("fine.txt", task.as_bytes()),
        write("fine.csv", row.as_bytes()),
    );
    let mc = mc.display().to_string();
    for (kind, file) in [
        ("hellaswag", &task),
        ("winogrande", &row),
        ("multiple-choice", &mc),
    ] {
        let (option, count) = (format!("--{kind}"), format!("--{kind}-tasks"));
        bench_refused(&[&option, file, &count, "0", model], &["0 is not in 1.."]);
        let named = format!("--{kind} <FILE>");
        bench_refused(&[&count, "5", model], &[&named]);
        bench_refused(
            &["--server", "http://127.0.0.1:9", &option, file, "m"],
            &["cannot be used with"],
        );
    }
}

/// `backstop imatrix` reads a text through the model and writes llama.cpp's GGUF imatrix;
/// `quantize --imatrix` takes it, opens the types that need one, and loses less quality.
#[test]
fn an_importance_matrix_is_computed_and_makes_low_bit_quantization_lose_less() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("imatrix");
    let _cleanup = Cleanup(dir.clone());
    let smol = common::smollm2();
    let readme = common::checkout().join("README.md");
    let matrix = dir.join("smol.imatrix.gguf");
    let (smol_s, matrix_s) = (smol.to_str().unwrap(), matrix.to_str().unwrap());
    let said = readme_imatrix(&matrix, 4);
    // SmolLM2 has 30 layers of seven matrices (attention q, k, v, output; ffn gate, up, down).
    assert!(
        said.contains("210 weight matrices from 4 chunks of 256 tokens"),
        "{said}"
    );
    // The model's perplexity of the text, scored as llama-imatrix scores it (it printed the
    // same 31.6117 as backstop for this README with 8 chunks of 512 on the day).
    let perplexity = |stdout: &str| -> f64 {
        let (_, rest) = stdout.split_once("(perplexity ").expect("a perplexity");
        rest.trim_end().trim_end_matches(')').parse().unwrap()
    };
    let ppl = perplexity(&said);
    assert!((5.0..200.0).contains(&ppl), "{ppl}");
    let m = backstop::bench::imatrix::Imatrix::read(&matrix).unwrap();
    assert_eq!((m.chunk_count, m.chunk_size), (4, 256));
    assert_eq!(m.entries.len(), 210);
    for (name, e) in &m.entries {
        // Every row of every chunk counted, the last layer's too (whose rows llama.cpp cuts
        // to the outputs asked for, unless every position is one).
        assert_eq!(e.counts, [1024.0], "{name}");
        let width = if name.contains("ffn_down") { 1536 } else { 576 };
        assert_eq!(e.sums.len(), width, "{name}");
        assert!(e.sums.iter().all(|&s| s > 0.0), "{name}");
    }

    // Q2_K_S is refused without one, by name, before the quantizer runs; taken with one.
    let q2ks = dir.join("q2ks.gguf");
    let o = quantize(&smol, &q2ks, "Q2_K_S");
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("backstop imatrix") && err.contains("--imatrix"),
        "{err}"
    );
    let with = |out: &Path, kind: &str, matrix: &str| {
        backstop(&[
            "quantize",
            "--imatrix",
            matrix,
            smol_s,
            out.to_str().unwrap(),
            kind,
        ])
    };
    let o = with(&q2ks, "Q2_K_S", matrix_s);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("importance matrix for 210 of 210 weight matrices"),
        "{}",
        text(&o.stderr)
    );

    // The same type with and without it: with it, the quantized model stays nearer the
    // source on the built-in text (unlike the calibration text). On this machine Q2_K went
    // from a mean KL divergence of 0.38 to 0.24 with 8 chunks of 512.
    let plain = dir.join("q2k.gguf");
    let weighed = dir.join("q2k-imatrix.gguf");
    assert!(quantize(&smol, &plain, "Q2_K").status.success());
    assert!(with(&weighed, "Q2_K", matrix_s).status.success());
    // The file names its matrix in the keys llama-quantize writes.
    let h = backstop::models::gguf::read(&weighed).unwrap();
    assert_eq!(h.str("quantize.imatrix.file"), Some(matrix_s));
    assert_eq!(
        h.str("quantize.imatrix.dataset"),
        Some(readme.to_str().unwrap())
    );
    assert_eq!(h.uint("quantize.imatrix.entries_count"), Some(210));
    assert_eq!(h.uint("quantize.imatrix.chunks_count"), Some(4));
    let h = backstop::models::gguf::read(&plain).unwrap();
    assert!(h.str("quantize.imatrix.file").is_none());
    let out = bench_json(&[
        "--quality",
        "-p",
        "0",
        "-n",
        "0",
        smol_s,
        plain.to_str().unwrap(),
        weighed.to_str().unwrap(),
    ]);
    let (plain_q, weighed_q) = (quality(&out["results"][1]), quality(&out["results"][2]));
    let (a, b) = (number(plain_q, "kld"), number(weighed_q, "kld"));
    assert!(
        b < a * 0.85,
        "KL divergence {b} with the matrix, {a} without"
    );
    assert!(
        number(weighed_q, "ppl_ratio") < number(plain_q, "ppl_ratio"),
        "{plain_q} {weighed_q}"
    );

    // A matrix made for another model is refused before the quantizer runs: one whose
    // entries are all of the wrong width, and a file that is no imatrix at all.
    let mut other = m.clone();
    for e in other.entries.values_mut() {
        e.sums.truncate(512);
    }
    let other_path = dir.join("other.imatrix.gguf");
    other.write(&other_path).unwrap();
    let out = dir.join("never.gguf");
    let o = with(&out, "Q2_K", other_path.to_str().unwrap());
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("made for another model"), "{err}");
    assert!(!err.contains("requantizing"), "the quantizer ran: {err}");
    let o = with(&out, "Q2_K", smol_s);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("no importance data"),
        "{}",
        text(&o.stderr)
    );
    assert!(!out.exists());

    // A ladder built with the matrix: the type that needs one is taken, and its rung is named
    // apart from a plain one. Without the matrix it is refused before anything is built.
    let rungs = dir.join("rungs");
    let ladder = |extra: &[&str]| {
        backstop(
            &[
                &[
                    "bench",
                    "--quality",
                    "-p",
                    "0",
                    "-n",
                    "0",
                    "-t",
                    "2",
                    "--format",
                    "json",
                    "--quantize",
                    "Q2_K_S",
                    "--quantize-dir",
                    rungs.to_str().unwrap(),
                ][..],
                extra,
                &[smol_s],
            ]
            .concat(),
        )
    };
    let o = ladder(&[]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("`Q2_K_S` needs an importance matrix"),
        "{}",
        text(&o.stderr)
    );
    assert!(!rungs.exists());
    let o = ladder(&["--imatrix", matrix_s]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
    let rung = &report["results"][1];
    assert_eq!(
        rung["file"], "SmolLM2-135M-Instruct.Q4_1-Q2_K_S-imatrix.gguf",
        "{rung}"
    );
    assert_eq!(rung["quantization"], "Q2_K_S", "{rung}");
    assert!(number(quality(rung), "kld") > 0.0, "{rung}");

    // A sentence said over and over is easy to predict.
    let repeated = dir.join("repeated.txt");
    std::fs::write(
        &repeated,
        "The bridge over the river has five stone arches. ".repeat(30),
    )
    .unwrap();
    let o = backstop(&[
        "imatrix",
        smol_s,
        "-f",
        repeated.to_str().unwrap(),
        "-o",
        dir.join("repeated.imatrix.gguf").to_str().unwrap(),
        "--chunk",
        "128",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let easy = perplexity(&text(&o.stdout));
    assert!(easy < 2.0 && easy < ppl / 5.0, "{easy} against {ppl}");

    // A text shorter than one chunk, one that is not UTF-8, and one that is not there, say so.
    let short = dir.join("short.txt");
    let binary = dir.join("binary.txt");
    std::fs::write(&short, "A few words only.").unwrap();
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x41].repeat(400)).unwrap();
    for (file, says) in [
        (short, "fewer than one chunk of 512"),
        (binary, "not UTF-8 text"),
        (dir.join("missing.txt"), "missing.txt"),
    ] {
        let file = file.to_str().unwrap();
        let o = backstop(&["imatrix", smol_s, "-f", file, "-o", matrix_s]);
        assert!(!o.status.success(), "{file}");
        assert!(text(&o.stderr).contains(says), "{}", text(&o.stderr));
    }
    // A model llama.cpp loads but cannot compute is refused with its reason, not aborted.
    let odd = common::uncomputable_gguf();
    let o = backstop(&[
        "imatrix",
        odd.to_str().unwrap(),
        "-f",
        readme.to_str().unwrap(),
        "-o",
        matrix_s,
    ]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("cannot compute it") && err.contains("binary_op: unsupported types"),
        "{err}"
    );
}

/// A long `backstop imatrix` run can be cut into parts: runs over chunks of the text read from
/// `--from-chunk`, combined with `--in-file` (alone, or under a run that goes on), give the
/// matrix one run over the whole text gives; the matrix so far is saved as the run goes.
#[test]
fn imatrix_runs_resume_combine_and_save_as_they_go() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("imatrix-parts");
    let _cleanup = Cleanup(dir.clone());
    let smol = common::smollm2();
    let readme = common::checkout().join("README.md");
    let (smol_s, readme_s) = (smol.to_str().unwrap(), readme.to_str().unwrap());
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let run_logged = |extra: &[&str]| {
        let o = backstop(&[&["imatrix", smol_s, "--chunk", "128", "-t", "2"][..], extra].concat());
        assert!(o.status.success(), "{extra:?}: {}", text(&o.stderr));
        (text(&o.stdout), text(&o.stderr))
    };
    let run = |extra: &[&str]| run_logged(extra).0;
    let read =
        |name: &str| backstop::bench::imatrix::Imatrix::read(Path::new(&path(name))).unwrap();

    // The whole: four chunks in one run, saved after each, with a copy kept every second,
    // and without the perplexity.
    let whole_s = path("whole.gguf");
    let (said, log) = run_logged(&[
        "-f",
        readme_s,
        "--chunks",
        "4",
        "--no-ppl",
        "--output-frequency",
        "1",
        "--save-frequency",
        "2",
        "-o",
        &whole_s,
    ]);
    assert!(
        said.contains("210 weight matrices from 4 chunks of 128 tokens"),
        "{said}"
    );
    assert!(!said.contains("perplexity"), "{said}");
    // Nothing reads the logits, so the output layer is left out.
    assert!(log.contains("output_layer=skipped"), "{log}");
    let whole = read("whole.gguf");
    assert_eq!((whole.chunk_count, whole.datasets.len()), (4, 1));
    // The copy kept after two chunks holds two chunks' rows; none is kept at the end.
    let at_2 = read("whole.gguf.at_2");
    assert_eq!(at_2.chunk_count, 2);
    assert!(at_2.entries.values().all(|e| e.counts == [256.0]));
    assert!(!dir.join("whole.gguf.at_4").exists());

    // The same chunks as two runs; the second starts where the first stopped.
    let first_s = path("first.gguf");
    let (said, log) = run_logged(&["-f", readme_s, "--chunks", "2", "-o", &first_s]);
    assert!(said.contains("(perplexity "), "{said}");
    assert!(log.contains("output_layer=computed"), "{log}");
    let second_s = path("second.gguf");
    run(&[
        "-f",
        readme_s,
        "--from-chunk",
        "2",
        "--chunks",
        "2",
        "-o",
        &second_s,
    ]);
    // Close enough: sums of squares in another order and precision.
    let same = |m: &backstop::bench::imatrix::Imatrix, what: &str| {
        assert_eq!(m.chunk_count, 4, "{what}");
        assert_eq!(m.datasets, [readme_s], "{what}");
        assert_eq!(m.entries.len(), whole.entries.len(), "{what}");
        for (name, e) in &whole.entries {
            let got = &m.entries[name];
            assert_eq!(got.counts, [512.0], "{what} {name}");
            for (a, b) in got.sums.iter().zip(&e.sums) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs(),
                    "{what} {name}: {a} against {b}"
                );
            }
        }
    };
    // The first run's matrix (its output layer computed, for the perplexity) equals the
    // whole's copy at two chunks (left out).
    assert_eq!(read("first.gguf").entries, at_2.entries);

    // Combined without a text: no model is run, only checked against.
    let combined_s = path("combined.gguf");
    let said = run(&[
        "--in-file",
        &first_s,
        "--in-file",
        &second_s,
        "-o",
        &combined_s,
    ]);
    assert!(
        said.contains("210 weight matrices from 4 chunks, combining 2 files"),
        "{said}"
    );
    same(&read("combined.gguf"), "combined");
    // With a comma, as llama-imatrix takes several: the same file.
    let comma_s = path("comma.gguf");
    run(&[
        "--in-file",
        &format!("{first_s},{second_s}"),
        "-o",
        &comma_s,
    ]);
    assert_eq!(read("comma.gguf"), read("combined.gguf"));

    // Resumed: the part saved so far is read in and the run goes on into the same file.
    let said = run(&[
        "-f",
        readme_s,
        "--in-file",
        &first_s,
        "--from-chunk",
        "2",
        "--chunks",
        "2",
        "-o",
        &first_s,
    ]);
    assert!(said.contains("from 2 chunks of 128 tokens"), "{said}");
    assert!(said.contains("(4 chunks in all)"), "{said}");
    same(&read("first.gguf"), "resumed");

    // SmolLM2's output layer is its token embeddings: --process-output has nothing more to
    // gather, and says so.
    let o = backstop(&[
        "imatrix",
        smol_s,
        "-f",
        readme_s,
        "--chunk",
        "128",
        "--chunks",
        "1",
        "--process-output",
        "-o",
        &path("output.gguf"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("has no output.weight"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(read("output.gguf").entries.len(), 210);

    // A text of chats in SmolLM2's template: with --parse-special each <|im_start|> is one
    // token, as the template makes it, not the seven or so of its letters.
    let chats = dir.join("chats.txt");
    std::fs::write(
        &chats,
        "<|im_start|>user\nWhere is the bridge?<|im_end|>\n<|im_start|>assistant\nDown by \
         the river.<|im_end|>\n"
            .repeat(40),
    )
    .unwrap();
    let chunks = |extra: &[&str]| -> usize {
        let out = path("chats.gguf");
        let said = run(&[&["-f", chats.to_str().unwrap(), "-o", &out][..], extra].concat());
        let (_, rest) = said.split_once("weight matrices from ").unwrap();
        rest.split(' ').next().unwrap().parse().unwrap()
    };
    let (letters, special) = (chunks(&[]), chunks(&["--parse-special"]));
    assert!(
        special * 4 < letters * 3,
        "{special} chunks against {letters}"
    );

    // Statistics of a matrix, as llama-imatrix's --show-statistics: a row per tensor, kinds
    // down the layers, then a row per layer; no model needed, nothing written.
    let never_s = path("never.gguf");
    let o = backstop(&[
        "imatrix",
        "--in-file",
        &whole_s,
        "--show-statistics",
        "-o",
        &never_s,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stats = text(&o.stdout);
    assert!(
        stats.starts_with("210 weight matrices from 4 chunks of 128 tokens"),
        "{stats}"
    );
    let rows: Vec<Vec<&str>> = stats
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| layer") && !l.contains("---"))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    let (tensors, layers): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.len() > 7);
    assert_eq!((tensors.len(), layers.len()), (210, 30), "{stats}");
    let attn_q: Vec<_> = tensors.iter().filter(|r| r[2] == "attn_q").collect();
    assert_eq!(attn_q.len(), 30);
    for (layer, r) in attn_q.iter().enumerate() {
        assert_eq!(r[1], layer.to_string(), "{r:?}");
        // Σ(act²) is the sum of the columns' mean squares in the matrix; N its width.
        let e = &whole.entries[&format!("blk.{layer}.attn_q.weight")];
        let want: f64 = e.sums.iter().map(|&v| f64::from(v)).sum::<f64>() / f64::from(e.counts[0]);
        let total: f64 = r[3].parse().unwrap();
        assert!((total - want).abs() <= 0.005 + 1e-6 * want, "{r:?}: {want}");
        assert_eq!(r[9], "576", "{r:?}");
        // A cosine of sums of squares (all positive) is between 0 and 1; none for layer 0.
        let cos: f64 = r[13].parse().unwrap_or(-1.0);
        assert!(
            if layer == 0 {
                r[13] == "-"
            } else {
                (0.0..=1.0).contains(&cos)
            },
            "{r:?}"
        );
    }
    assert!(!Path::new(&never_s).exists());

    // Refused, with nothing written: a matrix made for another model, a start past the
    // text's end, and neither a text nor a matrix.
    let mut narrow = whole.clone();
    for e in narrow.entries.values_mut() {
        e.sums.truncate(512);
    }
    let narrow_s = path("narrow.gguf");
    narrow.write(Path::new(&narrow_s)).unwrap();
    for (args, says) in [
        (
            vec!["--in-file", &whole_s, "--in-file", &narrow_s],
            &["narrow.gguf", "made for another model"][..],
        ),
        (
            vec!["-f", readme_s, "--from-chunk", "100000"],
            &["leaves none to read"],
        ),
        // clap names the argument that is missing.
        (vec![], &["--file"]),
        (vec!["--in-file", &whole_s, "--no-ppl"], &["--file"]),
        (vec!["--show-statistics"], &["--in-file"]),
    ] {
        let o = backstop(&[&["imatrix", smol_s, "-o", &never_s][..], &args].concat());
        assert!(!o.status.success(), "{args:?}");
        let err = text(&o.stderr);
        assert!(says.iter().all(|s| err.contains(s)), "{args:?}: {err}");
        assert!(!Path::new(&never_s).exists(), "{args:?}");
    }
}

/// Ctrl-C stops an imatrix run after the chunk it is reading and saves every chunk read, even
/// with no periodic saves, and says how to go on from there; going on as it says counts on.
#[test]
fn ctrl_c_stops_an_imatrix_run_and_saves_what_it_had_read() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("imatrix-ctrl-c");
    let _cleanup = Cleanup(dir.clone());
    let out = dir.join("stopped.gguf");
    let mut child = start_imatrix(&out, &["--output-frequency", "0", "--save-frequency", "1"]);
    // The copies kept every chunk say how far it has got; the README is dozens of chunks.
    let second = dir.join("stopped.gguf.at_2");
    assert!(
        while_running(&mut child, || second.exists()),
        "two chunks were read"
    );
    let (status, err) = ctrl_c(child);
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("stopping after this chunk"), "{err}");
    let m = backstop::bench::imatrix::Imatrix::read(&out).unwrap();
    assert!(m.chunk_count >= 2, "{}", m.chunk_count);
    assert!(
        err.contains(&format!(
            "stopped after {n} chunks; to go on from there: --in-file {} --from-chunk {n}",
            out.display(),
            n = m.chunk_count
        )),
        "{err}"
    );
    let rows = 64.0 * m.chunk_count as f32;
    assert!(m.entries.values().all(|e| e.counts == [rows]));

    let on = dir.join("on.gguf");
    let from = m.chunk_count.to_string();
    let o = backstop(&[
        "imatrix",
        common::smollm2().to_str().unwrap(),
        "-f",
        common::checkout().join("README.md").to_str().unwrap(),
        "--chunk",
        "64",
        "--chunks",
        "1",
        "--no-ppl",
        "--in-file",
        out.to_str().unwrap(),
        "--from-chunk",
        &from,
        "-o",
        on.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let went_on = backstop::bench::imatrix::Imatrix::read(&on).unwrap();
    assert_eq!(went_on.chunk_count, m.chunk_count + 1);
}

/// A run that is stopped leaves the matrix it had saved at `-o` (`--output-frequency`): the
/// file appears while the run is still going, and holds whole chunks' rows.
#[test]
fn a_stopped_imatrix_run_leaves_what_it_had_saved() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("imatrix-stopped");
    let _cleanup = Cleanup(dir.clone());
    let out = dir.join("saved.gguf");
    let mut child = start_imatrix(&out, &["--output-frequency", "1"]);
    // The README is dozens of chunks of 64 (eight of 512 at least): the first save comes long
    // before the end.
    let saved_while_running = while_running(&mut child, || out.exists());
    child.kill().ok();
    child.wait().unwrap();
    assert!(
        saved_while_running,
        "no matrix was saved while the run went on"
    );
    let m = backstop::bench::imatrix::Imatrix::read(&out).unwrap();
    assert!(m.chunk_count >= 1, "{}", m.chunk_count);
    assert_eq!(m.entries.len(), 210);
    let rows = 64.0 * m.chunk_count as f32;
    assert!(m.entries.values().all(|e| e.counts == [rows]));
}

/// `--override-kv KEY=TYPE:VALUE` sets metadata in the quantized file, of each type
/// llama.cpp's quantizer writes; what it would silently change (a negative integer, a text
/// over 127 bytes) is refused with nothing written.
#[test]
fn quantize_sets_metadata_keys_and_refuses_what_llama_cpp_would_change() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("quantize-override-kv");
    let _cleanup = Cleanup(dir.clone());
    let smol = common::smollm2();
    let out = dir.join("out.gguf");
    let with = |overrides: &[&str]| {
        let mut args = vec![
            "quantize",
            smol.to_str().unwrap(),
            out.to_str().unwrap(),
            "Q4_0",
        ];
        for o in overrides {
            args.extend(["--override-kv", *o]);
        }
        backstop(&args)
    };
    let o = with(&[
        "general.name=str:renamed smol",
        "backstop.test.count=int:7",
        "backstop.test.scale=float:0.5",
        "tokenizer.ggml.add_bos_token=bool:true",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let h = backstop::models::gguf::read(&out).unwrap();
    use backstop::models::gguf::GgufValue;
    assert_eq!(h.str("general.name"), Some("renamed smol"));
    assert_eq!(
        h.metadata.get("backstop.test.count"),
        Some(&GgufValue::Uint(7))
    );
    assert_eq!(
        h.metadata.get("backstop.test.scale"),
        Some(&GgufValue::Float(0.5))
    );
    assert_eq!(
        h.metadata.get("tokenizer.ggml.add_bos_token"),
        Some(&GgufValue::Bool(true))
    );
    // Before: SmolLM2's own name, and no such keys.
    let source = backstop::models::gguf::read(&smol).unwrap();
    assert_ne!(source.str("general.name"), Some("renamed smol"));
    assert!(!source.metadata.contains_key("backstop.test.count"));
    std::fs::remove_file(&out).unwrap();

    let long = format!("general.name=str:{}", "x".repeat(128));
    let long_key = format!("{}=int:1", "k".repeat(128));
    for (spec, says) in [
        ("general.name", "not KEY=TYPE:VALUE"),
        ("general.name=renamed", "not KEY=TYPE:VALUE"),
        ("general.name=char:x", "`char` is not a type"),
        (
            "backstop.count=int:-1",
            "not a whole number from 0 to 4294967295",
        ),
        ("backstop.count=int:4294967296", "not a whole number"),
        ("backstop.scale=float:fast", "`fast` is not a number"),
        ("backstop.flag=bool:yes", "`yes` is not true or false"),
        (long.as_str(), "at most 127 bytes"),
        (long_key.as_str(), "a key of 1 to 127 bytes"),
    ] {
        let o = with(&[spec]);
        assert!(!o.status.success(), "{spec}");
        assert!(
            text(&o.stderr).contains(says),
            "{spec}: {}",
            text(&o.stderr)
        );
        assert!(!out.exists(), "{spec}");
    }
}

/// `quantize --dry-run` says what each type would make without quantizing: a file's size
/// within a hair of the file the real run writes, and nothing written.
#[test]
fn quantize_dry_run_estimates_each_type_and_writes_nothing() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("quantize-dry-run");
    let _cleanup = Cleanup(dir.clone());
    let smol = common::smollm2();
    let smol_s = smol.to_str().unwrap();
    let o = backstop(&["quantize", "--dry-run", smol_s, "Q8_0,q4_0,IQ2_XS"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(table.starts_with(&format!("{smol_s}: ")), "{table}");
    let row = |kind: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| {kind} |")))
            .unwrap_or_else(|| panic!("no {kind} row: {table}"));
        line.split('|').map(|c| c.trim().to_owned()).collect()
    };
    let mib = |cells: &[String]| -> f64 { cells[2].trim_end_matches(" MiB").parse().unwrap() };
    let (q8, q4, iq2) = (row("Q8_0"), row("Q4_0"), row("IQ2_XS"));
    assert!(mib(&q8) > mib(&q4) && mib(&q4) > mib(&iq2), "{table}");
    // SmolLM2's 576-wide rows fit Q8_0's 32-wide blocks, not IQ2_XS's 256-wide ones: six
    // matrices a layer take them (30 x 6 = 180) and fall back; ffn_down's 1536 fit.
    assert_eq!(q8[5], "0", "{table}");
    assert_eq!(iq2[5], "180 of 272", "{table}");
    assert!(iq2[6].contains("needs an importance matrix"), "{table}");
    assert!(q4[6].is_empty(), "{table}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    // The real Q4_0 is the size the dry run said, to within the rounding of the quantizer's
    // figures (0.01 MiB) and of the tensors' padding (at most 31 bytes each).
    let out = dir.join("q4_0.gguf");
    assert!(quantize(&smol, &out, "Q4_0").status.success());
    let real = std::fs::metadata(&out).unwrap().len() as f64 / (1024.0 * 1024.0);
    assert!((real - mib(&q4)).abs() < 0.05, "{real} MiB against {table}");

    // llama-quantize's `IN OUT TYPE` form: OUT is not written.
    let never = dir.join("never.gguf");
    let o = backstop(&[
        "quantize",
        "--dry-run",
        smol_s,
        never.to_str().unwrap(),
        "Q4_0",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("| Q4_0 |"));
    assert!(!never.exists());
    // An unknown type is refused before anything runs; without --dry-run TYPE is needed.
    let o = backstop(&["quantize", "--dry-run", smol_s, "Q4_0,Q9_X"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("`Q9_X` is not a quantization type"),
        "{}",
        text(&o.stderr)
    );
    let o = backstop(&["quantize", smol_s, never.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("<TYPE>"), "{}", text(&o.stderr));
    assert!(!never.exists());
}

/// llama-quantize's per-tensor options: a type for the token embeddings, types by tensor-name
/// pattern (the first that matches wins), and `--pure` for no per-tensor mix.
#[test]
fn quantize_takes_per_tensor_types_and_a_pure_mix() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("quantize-tensor-types");
    let _cleanup = Cleanup(dir.clone());
    let smol = common::smollm2();
    let smol_s = smol.to_str().unwrap();
    let out = dir.join("out.gguf");
    let out_s = out.to_str().unwrap();
    // ggml's type numbers.
    let (f16, q4_0, q8_0, q4_k, q6_k) = (1, 2, 8, 12, 14);

    let o = backstop(&[
        "quantize",
        smol_s,
        out_s,
        "Q4_0",
        "--token-embedding-type",
        "Q8_0",
        "--tensor-type",
        "ffn_down=q8_0",
        "--tensor-type",
        r"blk\.0\.=f16",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let t = tensor_types(&out);
    assert_eq!(t["token_embd.weight"], q8_0);
    assert_eq!(t["blk.7.ffn_down.weight"], q8_0);
    assert_eq!(t["blk.0.attn_q.weight"], f16);
    // Both patterns match blk.0's ffn_down; the first given wins.
    assert_eq!(t["blk.0.ffn_down.weight"], q8_0);
    assert_eq!(t["blk.1.ffn_up.weight"], q4_0);

    // Q4_K_M's mix puts some tensors in Q6_K (its token embeddings, being SmolLM2's output
    // layer too, in Q8_0 where Q6_K's blocks do not fit); --pure puts none there.
    let o = backstop(&["quantize", smol_s, out_s, "Q4_K_M"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mixed = tensor_types(&out);
    assert!(mixed.values().any(|&v| v == q6_k), "{mixed:?}");
    let o = backstop(&["quantize", smol_s, out_s, "Q4_K_M", "--pure"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let pure = tensor_types(&out);
    assert!(!pure.values().any(|&v| v == q6_k || v == q8_0), "{pure:?}");
    assert!(pure.values().any(|&v| v == q4_k), "{pure:?}");
    std::fs::remove_file(&out).unwrap();

    // Refused, and nothing written: an unknown type (the list says which there are), a
    // --tensor-type without its type, and a pattern that is no regular expression.
    let refused = |args: &[&str], says: &str| {
        let o = backstop(&[&["quantize", smol_s, out_s, "Q4_0"][..], args].concat());
        assert!(!o.status.success(), "{args:?}");
        let err = text(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?}");
    };
    refused(&["--output-tensor-type", "q9_9"], "q6_K");
    refused(&["--tensor-type", "ffn_down"], "not PATTERN=GGML_TYPE");
    refused(&["--tensor-type", "(=q8_0"], "regular expression");
    refused(
        &["--leave-output-tensor", "--output-tensor-type", "q8_0"],
        "cannot be used with",
    );
    assert_eq!(entries(&dir), Vec::<String>::new());
}

/// `--include-weights` and `--exclude-weights` choose the weights an importance matrix weighs:
/// those chosen are quantized as with the whole matrix, bit for bit, the others as without
/// one. `--prune-layers` leaves layers out and numbers the rest down: the pruned model's layer
/// 5 is the whole model's layer 7, quantized the same (its importance matrix entries found
/// under the old number), the layer count says 28, and the model loads and scores worse than
/// the whole one. Each limit is refused, and nothing is written.
#[test]
fn quantize_prunes_layers_and_chooses_the_weights_an_importance_matrix_weighs() {
    let _cores = one_at_a_time();
    let dir = common::temp_dir("quantize-prune");
    let _cleanup = Cleanup(dir.clone());
    let smol = common::smollm2();
    let smol_s = smol.to_str().unwrap();
    let matrix = dir.join("smol.imatrix.gguf");
    let matrix_s = matrix.to_str().unwrap();
    readme_imatrix(&matrix, 2);
    let q4_0 = |name: &str, args: &[&str]| {
        let out = dir.join(name);
        let o = backstop(
            &[
                &["quantize", "-t", "2", smol_s, out.to_str().unwrap(), "Q4_0"][..],
                args,
            ]
            .concat(),
        );
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        (common::tensor_bytes(&out), out)
    };
    let (plain, plain_path) = q4_0("plain.gguf", &[]);
    let (weighed, weighed_path) = q4_0("weighed.gguf", &["--imatrix", matrix_s]);
    // With any importance matrix llama.cpp's mix puts a few tensors (Q4_0's first ffn_down
    // layers) in another type: those are quantized with the matrix's choice of type.
    let (plain_types, weighed_types) = (tensor_types(&plain_path), tensor_types(&weighed_path));
    let retyped: Vec<&String> = plain_types
        .keys()
        .filter(|n| plain_types[*n] != weighed_types[*n])
        .collect();
    assert!(retyped.len() < 10, "{retyped:?}");
    // Q4_0 rounds each block by the matrix where it has one: otherwise nothing here is shown.
    for name in ["blk.3.attn_v.weight", "blk.3.ffn_down.weight"] {
        assert_ne!(plain[name], weighed[name], "{name}");
    }
    let chose = |got: &std::collections::BTreeMap<String, Vec<u8>>,
                 chosen: &dyn Fn(&str) -> bool| {
        assert_eq!(got.len(), plain.len());
        for (name, bytes) in got {
            if chosen(name) {
                assert!(bytes == &weighed[name], "{name}");
            } else if !retyped.contains(&name) {
                assert!(bytes == &plain[name], "{name}");
            }
        }
    };
    let (some, _) = q4_0(
        "some.gguf",
        &["--imatrix", matrix_s, "--include-weights", "attn_v,ffn_up"],
    );
    chose(&some, &|n| n.contains("attn_v") || n.contains("ffn_up"));
    let (but, _) = q4_0(
        "but.gguf",
        &["--imatrix", matrix_s, "--exclude-weights", "attn_v"],
    );
    chose(&but, &|n| !n.contains("attn_v"));

    // Layers 5 and 6 of 30 out (given unsorted and twice, as a list may come).
    let (pruned, pruned_path) = q4_0(
        "pruned.gguf",
        &[
            "--imatrix",
            matrix_s,
            "--prune-layers",
            "6,5",
            "--prune-layers",
            "5",
        ],
    );
    let header = backstop::models::gguf::read(&pruned_path).unwrap();
    assert_eq!(header.uint("llama.block_count"), Some(28));
    // Nine tensors a layer (two norms, seven matrices).
    assert_eq!(pruned.len(), weighed.len() - 2 * 9);
    for (name, bytes) in &pruned {
        let was = match name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
        {
            Some((n, rest)) => {
                let n: u32 = n.parse().unwrap();
                assert!(n < 28, "{name}");
                format!("blk.{}.{rest}", if n < 5 { n } else { n + 2 })
            }
            None => name.clone(),
        };
        assert!(bytes == &weighed[&was], "{name} is not {was}");
    }
    // It loads and reads text, and reads it worse than the whole model.
    let out = bench_json(&[
        "--quality",
        "-p",
        "0",
        "-n",
        "0",
        weighed_path.to_str().unwrap(),
        pruned_path.to_str().unwrap(),
    ]);
    let q = quality(&out["results"][1]);
    assert_eq!(q["reference"], "weighed.gguf", "{q}");
    assert!(number(q, "ppl_ratio") > 1.05, "{q}");
    assert!(number(q, "kld") > 0.01, "{q}");

    // Refused, with the reason, writing nothing.
    let out = dir.join("refused.gguf");
    let out_s = out.to_str().unwrap();
    let refused = |args: &[&str], says: &str| {
        let o = backstop(&[&["quantize", smol_s, out_s, "Q4_0"][..], args].concat());
        assert!(!o.status.success(), "{args:?}");
        let err = text(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?}");
    };
    refused(
        &["--prune-layers", "3,30"],
        "--prune-layers: the model has no layer 30: it has 30, numbered from 0",
    );
    let every: Vec<String> = (0..30).map(|n| n.to_string()).collect();
    refused(
        &["--prune-layers", &every.join(",")],
        "every one of the model's 30 layers",
    );
    refused(
        &["--prune-layers=2,-1"],
        "invalid value '-1' for '--prune-layers",
    );
    refused(
        &["--prune-layers", "1", "--keep-split"],
        "cannot be used with",
    );
    refused(&["--include-weights", "attn_v"], "--imatrix <FILE>");
    refused(
        &["--imatrix", matrix_s, "--include-weights", "attn_vv"],
        "--include-weights attn_vv: no weight matrix of this model has it in its name",
    );
    refused(
        &["--imatrix", matrix_s, "--exclude-weights", "weight"],
        "--exclude-weights leaves none of the 210 weight matrices",
    );
    refused(
        &[
            "--imatrix",
            matrix_s,
            "--include-weights",
            "attn_v",
            "--exclude-weights",
            "ffn_up",
        ],
        "cannot be used with",
    );
}

/// Each tensor's ggml type number in a GGUF, by name.
fn tensor_types(path: &Path) -> std::collections::BTreeMap<String, u32> {
    backstop::models::gguf::read(path)
        .unwrap()
        .tensors
        .into_iter()
        .map(|t| (t.name, t.ggml_type))
        .collect()
}

/// The names of the tensors in one file (of a split model, that part's own).
fn part_tensors(path: &Path) -> Vec<String> {
    let h = backstop::models::gguf::read_file(path).unwrap();
    h.tensors.into_iter().map(|t| t.name).collect()
}

/// A model split over several files, as large models are published, is measured whole from its
/// first part. Quantized, it becomes one file, or with `--keep-split` as many parts, each with
/// its input part's tensors; COPY joins the parts without quantizing, byte for byte. Another
/// part given for the first, a missing part, and a part written over are each refused by name.
#[test]
fn a_split_model_is_measured_whole_and_quantized_into_one_file_or_its_parts() {
    let _cores = one_at_a_time();
    let smol = common::smollm2();
    let parts = common::split_gguf(&smol, "smol", 3);
    let dir = parts[0].parent().unwrap().to_owned();
    let _cleanup = Cleanup(dir.clone());
    let first = parts[0].to_str().unwrap();
    let whole = backstop::models::gguf::read(&smol).unwrap();
    let on_disk: u64 = parts
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(part_tensors(&parts[2]).len() > 10);

    let report = bench_json(&["-p", "16", "-n", "4", "-r", "1", first]);
    let r = &report["results"][0];
    assert_eq!(r["file"], "smol-00001-of-00003.gguf", "{r}");
    assert_eq!(r["size"].as_u64(), Some(on_disk), "{r}");
    assert_eq!(r["parameters"], whole.parameter_size().as_str(), "{r}");
    assert_eq!(r["quantization"], "Q4_1", "{r}");
    assert!(r["tg"]["median"].as_f64().unwrap() > 0.0, "{r}");

    // A ladder's rung is named without the part, and made again when any part changes.
    let ladder = common::temp_dir("split-ladder");
    let _ladder_cleanup = Cleanup(ladder.clone());
    let rung = |says: &str| {
        let mut args = words("bench -t 2 -p 16 -n 4 -r 1 --quantize Q8_0 --quantize-dir");
        args.extend([ladder.to_str().unwrap(), first]);
        let o = backstop(&args);
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains(says),
            "{says}: {}",
            text(&o.stderr)
        );
    };
    rung("Q8_0: built");
    assert_eq!(
        entries(&ladder),
        ["smol-Q8_0.gguf", "smol-Q8_0.gguf.source"]
    );
    rung("Q8_0: reusing");
    let last = std::fs::read(&parts[2]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&parts[2], last).unwrap();
    rung("Q8_0: built");

    // --keep-split: the same three parts, quantized.
    let out = dir.join("out.gguf");
    let o = backstop(&[
        "quantize",
        first,
        out.to_str().unwrap(),
        "Q8_0",
        "--keep-split",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let written: Vec<PathBuf> = (1..=3)
        .map(|i| dir.join(format!("out-{i:05}-of-00003.gguf")))
        .collect();
    let said: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(
        text(&o.stdout).trim(),
        format!("wrote {} (Q8_0)", said.join(", "))
    );
    let mut expected: Vec<String> = (1..=3)
        .flat_map(|i| {
            [
                format!("out-{i:05}-of-00003.gguf"),
                format!("smol-{i:05}-of-00003.gguf"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(entries(&dir), expected, "nothing else left behind");
    let q = backstop::models::gguf::read(&written[0]).unwrap();
    assert_eq!(q.quantization(), "Q8_0");
    assert_eq!(q.parts, written[1..]);
    assert_eq!(q.parameter_count, whole.parameter_count);
    for (from, to) in parts.iter().zip(&written) {
        assert_eq!(part_tensors(from), part_tensors(to), "{}", to.display());
    }

    // Without it, one file; COPY joins the parts as they are.
    for (kind, name) in [("Q8_0", "q8.gguf"), ("COPY", "joined.gguf")] {
        let o = quantize(&parts[0], &dir.join(name), kind);
        assert!(o.status.success(), "{kind}: {}", text(&o.stderr));
        let h = backstop::models::gguf::read(&dir.join(name)).unwrap();
        assert!(
            h.parts.is_empty() && h.uint("split.count").is_none(),
            "{kind}"
        );
        assert_eq!(h.tensor_count, whole.tensor_count, "{kind}");
        assert_eq!(h.parameter_count, whole.parameter_count, "{kind}");
    }
    let joined = dir.join("joined.gguf");
    assert_eq!(
        backstop::models::gguf::read(&joined)
            .unwrap()
            .quantization(),
        "Q4_1"
    );
    assert!(
        common::tensor_bytes(&joined) == common::tensor_bytes(&smol),
        "COPY changed tensor data"
    );

    // Refused, each before anything is measured or written.
    let second = parts[1].to_str().unwrap();
    bench_refused(
        &["-p", "16", "-n", "4", second],
        &[
            "part 2 of 3 of a model split into several files: give its first part",
            first,
        ],
    );
    // `quantize ARGS` fails saying `says`.
    let refused = |args: &[&str], says: &str| {
        let o = backstop(&[&["quantize"], args].concat());
        let err = text(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{args:?}: {err}");
    };
    let (x, smol_out) = (dir.join("x.gguf"), dir.join("smol.gguf"));
    refused(
        &[
            smol.to_str().unwrap(),
            x.to_str().unwrap(),
            "Q8_0",
            "--keep-split",
        ],
        "a model in one file; --keep-split keeps the parts",
    );
    // Parts named as the input's would be written over it, or one file named as a part.
    let before = std::fs::read(&parts[1]).unwrap();
    refused(
        &[first, smol_out.to_str().unwrap(), "COPY", "--keep-split"],
        "that is the input",
    );
    refused(&[first, second, "Q8_0"], "that is the input");
    assert!(std::fs::read(&parts[1]).unwrap() == before);
    bench_refused(&["--quantize", "COPY", first], &["--quantize COPY"]);
    std::fs::remove_file(&parts[2]).unwrap();
    let third = parts[2].display().to_string();
    bench_refused(
        &["-p", "16", "-n", "4", first],
        &[
            "a model split into 3 files, and 1 of them is missing",
            &third,
        ],
    );
    let y = dir.join("y.gguf");
    refused(&[first, y.to_str().unwrap(), "Q8_0"], &third);
    assert!(!y.exists());
}

/// Without `-t`, a process held to one CPU (as `taskset -c 0` or a container's cpuset holds
/// it) computes with one thread, not one per core of the machine, and its machine line says
/// what it could use: more threads than cores spin against each other at every barrier. Told
/// more, it measures them and says so.
#[cfg(target_os = "linux")]
#[test]
fn a_process_held_to_one_cpu_benchmarks_with_one_thread() {
    let _cores = one_at_a_time();
    let model = common::smollm2();
    let model = model.to_str().unwrap().to_owned();
    // A child inherits the CPU mask of the thread that starts it.
    let (o, two, prompts) = std::thread::spawn(move || {
        common::pin_to_cpu(0).expect("held to CPU 0");
        let args = ["bench", "-p", "8", "-n", "4", "-r", "1", "--format", "json"];
        (
            backstop(&[&args[..], &[&model]].concat()),
            backstop(&[&args[..], &["-t", "2", &model]].concat()),
            backstop(&[&args[..], &["--threads-batch", "2", &model]].concat()),
        )
    })
    .join()
    .expect("pinned thread");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        !text(&o.stderr).contains("threads on the"),
        "{}",
        text(&o.stderr)
    );
    // Told two threads there, it measures them, and says that one would be faster.
    assert!(two.status.success(), "{}", text(&two.stderr));
    let two_report: Value = serde_json::from_slice(&two.stdout).expect("bench JSON");
    assert_eq!(two_report["results"][0]["threads"], 2, "{two_report}");
    assert!(
        text(&two.stderr).contains(
            "note: 2 threads on the 1 CPU this process may use: threads beyond it wait their \
             turn while the others spin; 1, the default, is faster"
        ),
        "{}",
        text(&two.stderr)
    );
    let report: Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
    let machine = &report["machine"];
    assert!(
        machine["cores"] == 1 && machine["logical"] == 1,
        "{machine}"
    );
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{report}");
    assert_eq!(results[0]["threads"], 1, "{report}");
    assert!(results[0]["threads_batch"].is_null(), "{report}");
    // Two threads for the prompt only: measured, and said to be more than the CPU.
    assert!(prompts.status.success(), "{}", text(&prompts.stderr));
    let report: Value = serde_json::from_slice(&prompts.stdout).expect("bench JSON");
    let result = &report["results"][0];
    assert!(
        result["threads"] == 1 && result["threads_batch"] == 2,
        "{report}"
    );
    assert!(
        text(&prompts.stderr).contains("note: 2 threads on the 1 CPU"),
        "{}",
        text(&prompts.stderr)
    );
}
