//! `backstop bench` and `backstop quantize`: tokens per second across models and
//! quantizations, measured in-process, and the quantizer that builds the ladder.

mod measure;
pub mod quantize;
mod report;

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

pub use measure::{measure, BenchError, Plan, Rep};
pub use report::{csv, table, Aggregate, Figure, Meta, ModelResult};

use crate::cli::{BenchArgs, BenchFormat};
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

/// Checks the numbers given (as in llama-bench, `-p 0` or `-n 0` leaves that figure out;
/// nothing else is silently raised or dropped) and returns the `--parallel` counts sorted and
/// without 1 (the single-stream figure is always measured).
fn check_args(args: &BenchArgs) -> Result<Vec<usize>, String> {
    if args.reps == 0 {
        return Err("-r 0: at least one repetition is needed".into());
    }
    if args.prompt == 0 && args.generate == 0 {
        return Err("-p 0 and -n 0 leave nothing to measure".into());
    }
    if let Some(n) = args.parallel.iter().find(|&&n| n == 0 || n > MAX_PARALLEL) {
        return Err(format!(
            "--parallel {n}: from 1 to {MAX_PARALLEL} sequences (llama.cpp's most in one context)"
        ));
    }
    if args.generate == 0 && !args.parallel.is_empty() {
        return Err("--parallel measures generation: it needs -n above 0".into());
    }
    let mut parallel: Vec<usize> = args.parallel.iter().copied().filter(|&n| n > 1).collect();
    parallel.sort_unstable();
    parallel.dedup();
    Ok(parallel)
}

/// Runs `backstop bench` and prints its results.
pub fn run(args: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let threads = args.threads.unwrap_or_else(crate::config::default_threads);
    let parallel = check_args(args)?;
    let plan = Plan {
        prompt: args.prompt,
        depth: args.depth,
        generate: args.generate,
        reps: args.reps,
        threads,
        parallel: parallel.clone(),
        gpu_layers: args.gpu_layers,
        ctx: args.ctx,
        flash_attention: args.flash_attention,
    };
    // Every file is found and its header read before any is measured: a typo at the end of
    // a quantization ladder fails at once, not after the models before it were measured.
    let files = args
        .models
        .iter()
        .map(|m| {
            let file = locate(m)?;
            let header = gguf::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            Ok::<_, String>((file, header))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let backend = crate::engine::compute()?.backend;
    let bar = ProgressBar::new((files.len() * (plan.reps + 1)) as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} runs, {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut results = Vec::with_capacity(files.len());
    for (file, header) in &files {
        let name = file.file_name().map_or_else(
            || file.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        );
        bar.set_message(name.clone());
        let reps = measure(file, &plan, || bar.inc(1))?;
        results.push(ModelResult::new(
            Meta {
                file: name,
                size: std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
                quantization: header.quantization(),
                parameters: header.parameter_size(),
                architecture: header.architecture().to_owned(),
                backend: backend.clone(),
            },
            &parallel,
            &reps,
        ));
    }
    bar.finish_and_clear();
    match args.format {
        BenchFormat::Table => {
            print!(
                "{}",
                table(&results, plan.prompt, plan.generate, plan.depth)
            );
            let s = if plan.reps == 1 { "" } else { "s" };
            println!("{threads} threads, {} repetition{s}", plan.reps);
        }
        BenchFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "threads": threads,
                "prompt": plan.prompt,
                "generate": plan.generate,
                "depth": plan.depth,
                "reps": plan.reps,
                "results": results,
            }))?
        ),
        BenchFormat::Csv => print!("{}", csv(&results, plan.depth)),
    }
    Ok(())
}
