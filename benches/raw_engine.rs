//! The ceiling: llama.cpp through `llama-cpp-2` with no HTTP, no channels and no scheduler
//! (the measurements of `backstop bench`, run under `cargo bench`). Prompt processing,
//! single-sequence decode, and aggregate decode of several sequences sharing each batch, with
//! the context layout the server uses.
//!
//! cargo bench --bench raw_engine -- [--model PATH] [--threads 2] [--prompt 128] [--gen 128]
//!                                   [--parallel 4,8] [--reps 5] [--format table|json|csv]
//!
//! The model defaults to the SmolLM2 test model that `scripts/setup.sh` fetches.

use std::path::PathBuf;

use backstop::cli::{BenchArgs, BenchFormat};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// GGUF file [default: the SmolLM2 test model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// CPU threads [default: physical cores].
    #[arg(long)]
    threads: Option<u32>,
    /// Prompt tokens for the prompt-processing figure.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Sequence counts for aggregate decode.
    #[arg(long, value_delimiter = ',', default_values_t = [4])]
    parallel: Vec<usize>,
    /// Repetitions after one warm-up.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    format: BenchFormat,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let model = args.model.unwrap_or_else(|| {
        let cache = std::env::var_os("BACKSTOP_CACHE").map_or_else(
            || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/backstop"),
            PathBuf::from,
        );
        std::env::var_os("BACKSTOP_MODELS")
            .map_or_else(|| cache.join("models"), PathBuf::from)
            .join("SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    backstop::bench::run(&BenchArgs {
        models: vec![model.display().to_string()],
        server: Vec::new(),
        api_key: None,
        timeout: 300,
        shared_prefix: 0,
        prompts: vec![args.prompt],
        depth: Vec::new(),
        gens: vec![args.gen],
        prompt_gen: Vec::new(),
        reps: args.reps,
        threads: args.threads.into_iter().collect(),
        threads_batch: Vec::new(),
        parallel: args.parallel,
        gpu_layers: Vec::new(),
        ctx: None,
        flash_attention: Vec::new(),
        kv_cache_type: Vec::new(),
        numa: None,
        batch: Vec::new(),
        quantize: Vec::new(),
        quantize_dir: None,
        imatrix: None,
        quality: false,
        quality_text: None,
        quality_save: None,
        quality_chunk: None,
        quality_base: None,
        hellaswag: None,
        hellaswag_tasks: None,
        winogrande: None,
        winogrande_tasks: None,
        multiple_choice: None,
        multiple_choice_tasks: None,
        format: args.format,
        baseline: None,
    })
}
