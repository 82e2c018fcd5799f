//! `backstop bench`, `backstop quantize` and `backstop imatrix`: tokens per second across
//! models and quantizations, measured in-process or against running servers, the quantizer
//! that builds the ladder, and the importance matrix that the lowest-bit types need.

mod baseline;
mod choice;
pub mod imatrix;
mod ladder;
mod measure;
mod quality;
pub mod quantize;
mod report;
mod served;

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

pub use baseline::{Baseline, Compared, Lengths, ServedVersus, Versus, VersusAggregate};
pub use choice::TaskScore;
pub use measure::{load, measure, BenchError, Plan, Rep, Setting, Test};
pub use quality::Quality;
pub use report::{
    csv, json_line, table, versus_table, Aggregate, Figure, Machine, Meta, ModelResult,
};
use report::{distinct, label};
pub use served::{Latency, ServedResult, ServerInfo};

use crate::cli::{BenchArgs, BenchFormat};
use crate::engine::KvCacheType;
use crate::models::{gguf, ModelName, Store};

/// llama.cpp's `LLAMA_MAX_SEQ`: a context with more sequences is refused.
const MAX_PARALLEL: usize = 256;

/// A file path, or the name of a model in the store.
fn locate(arg: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(arg);
    if path.is_file() {
        return Ok(path);
    }
    let name =
        ModelName::parse(arg).map_err(|_| format!("`{arg}` is neither a file nor a model name"))?;
    let store = Store::new(crate::config::default_store_dir());
    match store.get(&name) {
        Ok(Some(m)) => Ok(m.model_path),
        _ => Err(format!(
            "`{arg}` is neither a file nor a model in the store at {}",
            store.root().display()
        )),
    }
}

/// The tests a run measures, as llama-bench forms them from its lists: one `-p` and one `-n`
/// value are one test of both; with more, each prompt length and each generation length is a
/// test of its own, prompts first, in the order given. A 0 is left out (`-p 0 -n 0`: none,
/// quality alone). Each `--pg` pair follows, as a test of its own.
fn tests(args: &BenchArgs) -> Vec<Test> {
    let (prompts, gens) = (distinct(args.prompts.clone()), distinct(args.gens.clone()));
    let separate = |prompt, generate| Test {
        prompt,
        generate,
        together: false,
    };
    let mut tests: Vec<Test> = match (prompts.as_slice(), gens.as_slice()) {
        (&[prompt], &[generate]) => vec![separate(prompt, generate)],
        _ => prompts
            .iter()
            .map(|&p| separate(p, 0))
            .chain(gens.iter().map(|&n| separate(0, n)))
            .collect(),
    };
    tests.retain(|t| t.prompt + t.generate > 0);
    tests.extend(distinct(args.prompt_gen.iter().copied()).into_iter().map(
        |(prompt, generate)| Test {
            prompt,
            generate,
            together: true,
        },
    ));
    tests
}

/// Checks the numbers given (as in llama-bench, `-p 0` or `-n 0` leaves that figure out;
/// nothing else is silently raised or dropped) and returns the `--parallel` counts sorted and
/// without 1 (the single-stream figure is always measured).
fn check_args(args: &BenchArgs) -> Result<Vec<usize>, String> {
    let tests = tests(args);
    if tests.is_empty()
        && !quality_asked(args)
        && args.hellaswag.is_none()
        && args.winogrande.is_none()
        && args.multiple_choice.is_none()
    {
        return Err("-p 0 and -n 0 leave nothing to measure".into());
    }
    if let Some(n) = args.parallel.iter().find(|&&n| n == 0 || n > MAX_PARALLEL) {
        return Err(format!(
            "--parallel {n}: from 1 to {MAX_PARALLEL} sequences (llama.cpp's most in one context)"
        ));
    }
    if tests.is_empty() && args.depth.iter().any(|&d| d > 0) {
        return Err(
            "-d with -p 0 and -n 0: no speed is measured at a depth (quality and tasks are scored \
             from an empty cache)"
                .into(),
        );
    }
    if tests.iter().all(|t| t.generate == 0 || t.together) && !args.parallel.is_empty() {
        return Err("--parallel measures generation: it needs -n above 0".into());
    }
    let most = args.parallel.iter().copied().max().unwrap_or(1);
    if let Some(b) = args.batch.iter().find(|&&b| (b as usize) < most) {
        return Err(format!(
            "--batch {b} with --parallel {most}: a generation step decodes one token of every \
             sequence at once, so the batch must be at least {most}"
        ));
    }
    let mut parallel: Vec<usize> = args.parallel.iter().copied().filter(|&n| n > 1).collect();
    parallel.sort_unstable();
    parallel.dedup();
    Ok(parallel)
}

/// `--quality`, or a text for it.
fn quality_asked(args: &BenchArgs) -> bool {
    args.quality
        || args.quality_text.is_some()
        || args.quality_save.is_some()
        || args.quality_chunk.is_some()
        || args.quality_base.is_some()
}

/// The values given, each once, in the order given; `[None]` when none were (the default).
fn each<T: PartialEq + Copy>(given: &[T]) -> Vec<Option<T>> {
    let mut out = distinct(given.iter().copied().map(Some));
    if out.is_empty() {
        out.push(None);
    }
    out
}

/// Every combination of the settings given, as llama-bench sweeps its comma lists (GPU
/// layers outermost, threads innermost), less those llama.cpp cannot run: a quantized KV
/// cache needs flash attention. Those are named in the second list; when nothing is left
/// the whole run is refused.
fn settings(args: &BenchArgs) -> Result<(Vec<Setting>, Vec<String>), String> {
    let threads: Vec<u32> = each(&args.threads)
        .into_iter()
        .map(|t| t.unwrap_or_else(crate::config::default_threads))
        .collect();
    let batches: Vec<u32> = each(&args.batch)
        .into_iter()
        .map(|b| b.unwrap_or(crate::config::DEFAULT_BATCH))
        .collect();
    let kv: Vec<KvCacheType> = each(&args.kv_cache_type)
        .into_iter()
        .map(|k| k.unwrap_or(KvCacheType::F16))
        .collect();
    let (gpu_layers, flash) = (each(&args.gpu_layers), each(&args.flash_attention));
    let threads_batch = each(&args.threads_batch);
    let mut runnable = Vec::new();
    let mut skipped = Vec::new();
    for &gpu_layers in &gpu_layers {
        for &flash_attention in &flash {
            for &kv_cache_type in &kv {
                if kv_cache_type != KvCacheType::F16 && flash_attention == Some(false) {
                    let pair = format!(
                        "--flash-attention 0 with --kv-cache-type {}",
                        kv_cache_type.as_str()
                    );
                    if !skipped.contains(&pair) {
                        skipped.push(pair);
                    }
                    continue;
                }
                for &batch in &batches {
                    for &threads_batch in &threads_batch {
                        runnable.extend(threads.iter().map(|&threads| Setting {
                            threads,
                            threads_batch,
                            gpu_layers,
                            flash_attention,
                            kv_cache_type,
                            batch,
                        }));
                    }
                }
            }
        }
    }
    if runnable.is_empty() {
        return Err(format!(
            "{}: a quantized KV cache needs flash attention",
            skipped.join("; ")
        ));
    }
    Ok((runnable, skipped))
}

/// Runs `backstop bench` and prints its results.
pub fn run(args: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.reps == 0 {
        return Err("-r 0: at least one repetition is needed".into());
    }
    if !args.server.is_empty() {
        return served::run(args);
    }
    let parallel = check_args(args)?;
    let (settings, skipped) = settings(args)?;
    crate::engine::numa::choose(args.numa.unwrap_or_default());
    let imatrix = args
        .imatrix
        .as_deref()
        .map(|path| imatrix::Imatrix::read(path).map(|m| (m, path)))
        .transpose()?;
    let ladder = ladder::types(&args.quantize, imatrix.is_some())?;
    let baseline = args
        .baseline
        .as_deref()
        .map(|path| Baseline::read(path, false))
        .transpose()?;
    let (text, saved) = match &args.quality_base {
        Some(path) => {
            let (text, reference) = quality::base::read(path).map_err(BenchError::Quality)?;
            (Some(text), Some(reference))
        }
        None => (
            quality_asked(args)
                .then(|| {
                    quality::Text::load(
                        args.quality_text.as_deref(),
                        args.quality_chunk.map(|c| c as usize),
                    )
                })
                .transpose()?,
            None,
        ),
    };
    let count = |n: Option<u64>| n.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let tasks = [
        (
            choice::Kind::Hellaswag,
            &args.hellaswag,
            args.hellaswag_tasks,
        ),
        (
            choice::Kind::Winogrande,
            &args.winogrande,
            args.winogrande_tasks,
        ),
        (
            choice::Kind::MultipleChoice,
            &args.multiple_choice,
            args.multiple_choice_tasks,
        ),
    ]
    .into_iter()
    .filter_map(|(kind, path, n)| Some(choice::Tasks::load(kind, path.as_deref()?, count(n))))
    .collect::<Result<Vec<_>, _>>()?;
    if let Some(path) = &args.quality_save {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if path.is_dir() || !dir.is_dir() {
            let why = if path.is_dir() {
                "a folder"
            } else {
                "no such folder"
            };
            return Err(format!("--quality-save {}: {why}", path.display()).into());
        }
    }
    for pair in &skipped {
        eprintln!("skipping {pair}: a quantized KV cache needs flash attention");
    }
    let threads: Vec<u32> = distinct(settings.iter().map(|s| s.threads.max(s.batch_threads())));
    for crowded in threads
        .into_iter()
        .filter_map(crate::config::cores::too_many)
    {
        eprintln!("note: {crowded}");
    }
    let depths: Vec<usize> = each(&args.depth)
        .into_iter()
        .map(|d| d.unwrap_or(0))
        .collect();
    let deepest = depths.iter().copied().max().unwrap_or(0);
    let tests = tests(args);
    // Aggregate generation is measured with each generation length.
    let plan = |setting: Setting, depth: usize, test: Test| Plan {
        prompt: test.prompt,
        depth,
        generate: test.generate,
        together: test.together,
        reps: args.reps,
        parallel: if test.generate > 0 && !test.together {
            parallel.clone()
        } else {
            Vec::new()
        },
        ctx: args.ctx,
        setting,
    };
    // A `--ctx` too small for the run is known from the numbers alone (the same for every
    // setting; the deepest measurements need the most): refused before anything is
    // quantized or loaded.
    for &test in &tests {
        plan(settings[0], deepest, test).check()?;
    }
    // Every file is found and its header read before any is measured: a typo at the end of
    // a quantization ladder fails at once, not after the models before it were measured.
    let files = args
        .models
        .iter()
        .map(|m| {
            let file = locate(m)?;
            let header = gguf::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            Ok::<_, String>((m, file, header))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A model of another vocabulary cannot be set against a saved reference.
    if let Some((n, text)) = text.as_ref().and_then(|t| Some((t.saved_vocabulary()?, t))) {
        for (_, file, header) in &files {
            if let Some(gguf::GgufValue::Array { len, .. }) =
                header.metadata.get("tokenizer.ggml.tokens")
            {
                if *len != n as u64 {
                    return Err(format!(
                        "{}: a vocabulary of {len} tokens, and {} come from a model of {n}: \
                         only a model of the same vocabulary compares with them",
                        file.display(),
                        text.name
                    )
                    .into());
                }
            }
        }
    }
    // Each model's quantizations are measured right after it.
    let mut files_and_rungs = Vec::with_capacity(files.len() * (ladder.len() + 1));
    for (arg, file, header) in files {
        let rungs = if ladder.is_empty() {
            Vec::new()
        } else {
            let dir = args
                .quantize_dir
                .clone()
                .unwrap_or_else(ladder::default_dir);
            let stem = ladder::stem(arg, &file);
            let weights = imatrix.as_ref().map(|(m, path)| (m, *path));
            ladder::build(
                &file,
                &header,
                &stem,
                &ladder,
                &dir,
                settings[0].threads,
                weights,
            )?
        };
        files_and_rungs.push((file, header));
        files_and_rungs.extend(rungs);
    }
    let files = files_and_rungs;
    let compute = crate::engine::compute()?;
    if !compute.gpu_build && args.gpu_layers.iter().any(|&n| n > 0) {
        eprintln!("note: this build has no GPU backend, so --gpu-layers changes nothing");
    }
    let backend = compute.backend;
    let machine = Machine::here(compute.devices);
    // `--format jsonl` prints each result as it is measured (false once the reader has
    // gone); the bar is drawn on stderr, and steps aside while a line goes to stdout, where
    // both are one terminal.
    let mut line_facts = vec![
        ("reps", serde_json::json!(args.reps)),
        ("machine", serde_json::to_value(&machine)?),
    ];
    if let Some(text) = &text {
        line_facts.push(("quality_text", serde_json::json!(text.name)));
    }
    let task_files: Vec<(String, serde_json::Value)> = tasks
        .iter()
        .map(|t| (format!("{}_file", t.kind.name()), serde_json::json!(t.name)))
        .collect();
    line_facts.extend(task_files.iter().map(|(k, v)| (k.as_str(), v.clone())));
    if let Some(b) = &baseline {
        line_facts.push(("baseline_file", serde_json::json!(b.name)));
    }
    let emit =
        |bar: &ProgressBar, result: &ModelResult| -> Result<bool, Box<dyn std::error::Error>> {
            if args.format != BenchFormat::Jsonl {
                return Ok(true);
            }
            let line = json_line(result, &line_facts)?;
            Ok(bar.suspend(|| output(&format!("{line}\n")))?)
        };
    let runs = files.len() * settings.len();
    // A warm-up and the repetitions of each test at each depth (`-p 0 -n 0` measures only
    // quality), and the quality and task passes.
    let per_run =
        tests.len() * depths.len() * (args.reps + 1) + usize::from(text.is_some()) + tasks.len();
    let bar = ProgressBar::new((runs * per_run) as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} runs, {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut results = Vec::with_capacity(runs * depths.len() * tests.len().max(1));
    let mut references: Vec<quality::Reference> = saved.into_iter().collect();
    // The first model's picks in each benchmark, which the others' are set against.
    let mut picks: Vec<Option<choice::Picks>> = tasks.iter().map(|_| None).collect();
    // Only the first reference of the run is saved.
    let mut save = args.quality_save.as_deref();
    for (file, header) in &files {
        let name = file.file_name().map_or_else(
            || file.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        let meta = Meta {
            file: name.clone(),
            size: std::fs::metadata(file)
                .map(|m| m.len().saturating_add(header.parts_bytes))
                .unwrap_or(0),
            quantization: header.quantization(),
            parameters: header.parameter_size(),
            architecture: header.architecture().to_owned(),
            backend: backend.clone(),
        };
        for &setting in &settings {
            let tag = label(&setting, &settings);
            bar.set_message(format!("{name}{tag}"));
            let model = load(file, &setting)?;
            // The deepest measurements are refused before the shallower ones are measured.
            for &test in &tests {
                plan(setting, deepest, test).fits(&model)?;
            }
            // Quality is scored once, from an empty cache, whatever the depths.
            let quality = match &text {
                Some(text) => {
                    bar.set_message(format!("{name}{tag} quality"));
                    let (figures, reference) = quality::score(
                        &model,
                        &setting,
                        text,
                        &references,
                        &format!("{name}{tag}"),
                        save,
                    )?;
                    if reference.is_some() {
                        save = None;
                    }
                    references.extend(reference);
                    bar.inc(1);
                    Some(figures)
                }
                None => None,
            };
            let mut scores = Vec::with_capacity(tasks.len());
            for (set, first) in tasks.iter().zip(&mut picks) {
                bar.set_message(format!("{name}{tag} {}", set.kind.name()));
                let (figures, mine) = choice::score(
                    &model,
                    &setting,
                    set,
                    first.as_ref(),
                    &format!("{name}{tag}"),
                )?;
                first.get_or_insert(mine);
                bar.inc(1);
                scores.push((set.kind, figures));
            }
            for &depth in &depths {
                // The depth and the context cells a result was measured with.
                let cells = (depth, args.ctx);
                if tests.is_empty() {
                    let mut result =
                        ModelResult::new(meta.clone(), setting, cells, Test::default(), &[], &[]);
                    result.quality.clone_from(&quality);
                    result.set_tasks(&scores);
                    if !emit(&bar, &result)? {
                        return Ok(());
                    }
                    results.push(result);
                }
                for &test in &tests {
                    let at = if depths.len() > 1 {
                        format!(" d{depth}")
                    } else {
                        String::new()
                    };
                    if tests.len() > 1 || depths.len() > 1 {
                        bar.set_message(format!("{name}{tag}{at} {}", test.name()));
                    }
                    let plan = plan(setting, depth, test);
                    let reps = measure(&model, &plan, || bar.inc(1))?;
                    let mut result =
                        ModelResult::new(meta.clone(), setting, cells, test, &plan.parallel, &reps);
                    result.quality.clone_from(&quality);
                    result.set_tasks(&scores);
                    result.baseline = baseline.as_ref().and_then(|b| b.compare(&result));
                    if !emit(&bar, &result)? {
                        return Ok(());
                    }
                    results.push(result);
                }
            }
        }
    }
    bar.finish_and_clear();
    let task_file = |kind| tasks.iter().find(|t| t.kind == kind).map(|t| &t.name);
    let report = match args.format {
        BenchFormat::Table => format!(
            "{}{}{}{}\n{}",
            table(&results, &depths, args.reps),
            text.as_ref()
                .map(|t| quality::said(t, results.iter().filter_map(|r| r.quality.as_ref())))
                .unwrap_or_default(),
            tasks.iter().map(choice::said).collect::<String>(),
            machine.line(),
            baseline
                .as_ref()
                .map(|b| versus_table(&results, &depths, b))
                .unwrap_or_default()
        ),
        BenchFormat::Json => {
            let json = serde_json::to_string_pretty(&serde_json::json!({
                "tests": tests,
                "depths": depths,
                "reps": args.reps,
                "quality_text": text.as_ref().map(|t| &t.name),
                "hellaswag_file": task_file(choice::Kind::Hellaswag),
                "winogrande_file": task_file(choice::Kind::Winogrande),
                "multiple_choice_file": task_file(choice::Kind::MultipleChoice),
                "machine": machine,
                "baseline_file": baseline.as_ref().map(|b| &b.name),
                "baseline_machine": baseline.as_ref().and_then(|b| b.machine.as_ref()),
                "results": results,
            }))?;
            json + "\n"
        }
        BenchFormat::Csv => csv(&results, baseline.is_some()),
        // Each line went out as it was measured.
        BenchFormat::Jsonl => String::new(),
    };
    output(&report)?;
    Ok(())
}

/// Writes to stdout; `Ok(false)` when its reader has gone (`| head -1`): the run then ends
/// quietly, as a pipe's writer does, where `println!` would panic.
pub(crate) fn output(text: &str) -> std::io::Result<bool> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(flags: &[&str]) -> BenchArgs {
        let argv = [&["backstop", "bench"], flags, &["m.gguf"]].concat();
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Bench(a)) => *a,
            other => panic!("{flags:?}: {other:?}"),
        }
    }

    fn row(threads: u32, gpu: Option<u32>, fa: Option<bool>, kv: KvCacheType) -> Setting {
        Setting {
            threads,
            threads_batch: None,
            gpu_layers: gpu,
            flash_attention: fa,
            kv_cache_type: kv,
            batch: crate::config::DEFAULT_BATCH,
        }
    }

    #[test]
    fn every_combination_is_measured_once_in_llama_bench_order() {
        let (all, skipped) = settings(&args(&[
            "-t",
            "1,2,1",
            "--gpu-layers",
            "0,99",
            "--flash-attention",
            "on",
        ]))
        .unwrap();
        let on = Some(true);
        let f16 = KvCacheType::F16;
        assert_eq!(
            all,
            [
                row(1, Some(0), on, f16),
                row(2, Some(0), on, f16),
                row(1, Some(99), on, f16),
                row(2, Some(99), on, f16),
            ]
        );
        assert!(skipped.is_empty());
        // Nothing given: one setting, llama.cpp's defaults and the machine's threads.
        let (one, _) = settings(&args(&[])).unwrap();
        assert_eq!(
            one,
            [row(crate::config::default_threads(), None, None, f16)]
        );
    }

    #[test]
    fn threads_for_prompts_are_swept_outside_the_threads() {
        let (all, _) = settings(&args(&["-t", "1,2", "--threads-batch", "2,4"])).unwrap();
        let tb = |threads, batch| Setting {
            threads_batch: Some(batch),
            ..row(threads, None, None, KvCacheType::F16)
        };
        assert_eq!(all, [tb(1, 2), tb(2, 2), tb(1, 4), tb(2, 4)]);
        assert!(
            Cli::try_parse_from(["backstop", "bench", "--threads-batch", "0", "m.gguf"]).is_err()
        );
        // A running server's threads and placement are its own.
        for flag in [["--threads-batch", "2"], ["--numa", "isolate"]] {
            let argv = [
                &["backstop", "bench", "--server", "http://127.0.0.1:1"],
                &flag[..],
                &["m"],
            ];
            assert!(Cli::try_parse_from(argv.concat()).is_err(), "{flag:?}");
        }
    }

    #[test]
    fn a_quantized_cache_without_flash_attention_is_left_out_or_refused() {
        let (all, skipped) = settings(&args(&[
            "-t",
            "2",
            "--flash-attention",
            "0,1",
            "--kv-cache-type",
            "f16,q8_0,Q4_0",
        ]))
        .unwrap();
        let (off, on) = (Some(false), Some(true));
        assert_eq!(
            all,
            [
                row(2, None, off, KvCacheType::F16),
                row(2, None, on, KvCacheType::F16),
                row(2, None, on, KvCacheType::Q8_0),
                row(2, None, on, KvCacheType::Q4_0),
            ]
        );
        assert_eq!(
            skipped,
            [
                "--flash-attention 0 with --kv-cache-type q8_0",
                "--flash-attention 0 with --kv-cache-type q4_0"
            ]
        );
        // Batches between KV cache types and threads, as llama-bench sweeps n_batch; one too
        // small for a generation step of every --parallel sequence is refused.
        let (all, _) = settings(&args(&["-t", "1,2", "-b", "64,8", "--parallel", "4,8"])).unwrap();
        let batches: Vec<(u32, u32)> = all.iter().map(|s| (s.batch, s.threads)).collect();
        assert_eq!(batches, [(64, 1), (64, 2), (8, 1), (8, 2)]);
        let small = check_args(&args(&["-b", "512,4", "--parallel", "1,8"]));
        assert!(small
            .is_err_and(|e| e.contains("--batch 4 with --parallel 8") && e.contains("at least 8")),);
        let refused = settings(&args(&[
            "--flash-attention",
            "off",
            "--kv-cache-type",
            "q4_0",
        ]));
        assert!(refused.is_err_and(|e| e.contains("needs flash attention") && e.contains("q4_0")),);
        for bad in [
            &["--kv-cache-type", "q5_1"][..],
            &["-t", "2,0"],
            &["--flash-attention", "maybe"],
            &["-b", "0"],
            &["--server", "http://127.0.0.1:1", "--batch", "64"],
        ] {
            let argv = [&["backstop", "bench"], bad, &["m.gguf"]].concat();
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lists_of_lengths_are_tests_of_their_own_as_in_llama_bench() {
        let of = |flags: &[&str]| -> Vec<(usize, usize)> {
            tests(&args(flags))
                .iter()
                .map(|t| (t.prompt, t.generate))
                .collect()
        };
        // One of each: one test of both, a row with both figures, as before lists.
        assert_eq!(of(&[]), [(512, 128)]);
        assert_eq!(of(&["-p", "64", "-n", "0"]), [(64, 0)]);
        assert_eq!(of(&["-p", "512,512", "-n", "16"]), [(512, 16)]);
        assert_eq!(of(&["-p", "0", "-n", "0"]), []);
        // More: prompts first, then generations, in the order given, zeros left out.
        assert_eq!(
            of(&["-p", "512,128,0", "-n", "32"]),
            [(512, 0), (128, 0), (0, 32)]
        );
        assert_eq!(of(&["-p", "0", "-n", "64,16"]), [(0, 64), (0, 16)]);
        assert_eq!(of(&["-p", "0,0", "-n", "0,0"]), []);
        for (flags, refusal) in [
            (&["-p", "0,0", "-n", "0"][..], "leave nothing to measure"),
            (
                &["-p", "64,128", "-n", "0", "--parallel", "4"],
                "--parallel measures generation",
            ),
            (
                &["-p", "0,0", "-n", "0", "-d", "64", "--quality"],
                "-d with -p 0 and -n 0",
            ),
        ] {
            assert!(
                check_args(&args(flags)).is_err_and(|e| e.contains(refusal)),
                "{flags:?}"
            );
        }
        assert_eq!(
            check_args(&args(&["-p", "64,128", "-n", "0,8", "--parallel", "4"])),
            Ok(vec![4])
        );
    }

    #[test]
    fn each_prompt_gen_pair_is_one_test_after_the_others() {
        let of = |flags: &[&str]| -> Vec<(usize, usize, bool)> {
            tests(&args(flags))
                .iter()
                .map(|t| (t.prompt, t.generate, t.together))
                .collect()
        };
        assert_eq!(
            of(&[
                "--pg",
                "512,128",
                "--prompt-gen",
                "64,16",
                "--pg",
                "512,128"
            ]),
            [(512, 128, false), (512, 128, true), (64, 16, true)]
        );
        assert_eq!(of(&["-p", "0", "-n", "0", "--pg", "32,8"]), [(32, 8, true)]);
        assert_eq!(
            of(&["-p", "64,128", "-n", "0", "--pg", "32,8"]),
            [(64, 0, false), (128, 0, false), (32, 8, true)]
        );
        assert_eq!(
            tests(&args(&["-p", "0", "-n", "0", "--pg", "512,128"]))[0].name(),
            "pp512+tg128"
        );
        // A --pg test alone measures; it generates one sequence, so --parallel needs -n.
        assert_eq!(
            check_args(&args(&["-p", "0", "-n", "0", "--pg", "32,8"])),
            Ok(vec![])
        );
        assert!(check_args(&args(&[
            "-p",
            "0",
            "-n",
            "0",
            "--pg",
            "32,8",
            "--parallel",
            "4"
        ]))
        .is_err_and(|e| e.contains("--parallel measures generation")));
        for bad in ["512", "512,0", "0,128", "a,1", "512,128,4", ""] {
            let argv = ["backstop", "bench", "--pg", bad, "m.gguf"];
            assert!(Cli::try_parse_from(argv).is_err(), "--pg {bad}");
        }
    }
}
