//! The ceiling: llama.cpp through `llama-cpp-2` with no HTTP, no channels and no
//! scheduler. Measures prompt processing, single-sequence decode, and aggregate decode of
//! several sequences sharing one batch, with the same context layout backstop uses.
//!
//! cargo bench --bench raw_engine -- --model PATH [--threads 2] [--prompt 128] [--gen 128]
//!                                   [--seqs 4] [--reps 5] [--json]

use std::num::NonZeroU32;
use std::time::Instant;

use clap::Parser;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// GGUF file.
    #[arg(long)]
    model: std::path::PathBuf,
    /// CPU threads.
    #[arg(long, default_value_t = num_cpus::get_physical() as i32)]
    threads: i32,
    /// Prompt tokens for the prompt-processing figure.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Sequences decoded together for the aggregate figure.
    #[arg(long, default_value_t = 4)]
    seqs: usize,
    /// Context cells per sequence [default: just enough for the run]; set it to the
    /// server's `--ctx` to compare like with like.
    #[arg(long)]
    ctx: Option<u32>,
    /// Repetitions after one warm-up.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Run {
    pp: f64,
    tg: f64,
    batched: f64,
}

fn prompt_tokens(model: &LlamaModel, n: usize) -> Vec<LlamaToken> {
    let text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. ";
    let mut tokens = Vec::new();
    while tokens.len() < n {
        tokens.extend(model.vocab().tokenize(text.as_bytes(), false, false));
    }
    tokens.truncate(n);
    tokens
}

/// Evaluates `tokens` for `seq` starting at position `pos`, in n_batch chunks.
fn prefill(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    tokens: &[LlamaToken],
    seq: i32,
    pos: usize,
) {
    let n_batch = ctx.n_batch() as usize;
    for (c, chunk) in tokens.chunks(n_batch).enumerate() {
        batch.clear();
        for (i, &t) in chunk.iter().enumerate() {
            let p = pos + c * n_batch + i;
            let last = p + 1 == pos + tokens.len();
            batch.add(t, p as i32, &[seq], last).expect("batch space");
        }
        ctx.decode(batch).expect("decode");
    }
}

fn one_run(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    prompt: &[LlamaToken],
    args: &Args,
) -> Run {
    ctx.clear_kv_cache();
    let t = Instant::now();
    prefill(ctx, batch, prompt, 0, 0);
    let pp = prompt.len() as f64 / t.elapsed().as_secs_f64();

    // Single sequence: sample greedily, feed back, repeat.
    let mut sampler = LlamaSampler::greedy();
    let mut last = batch.n_tokens() - 1;
    let t = Instant::now();
    for step in 0..args.gen {
        let token = sampler.sample(ctx, last);
        batch.clear();
        batch
            .add(token, (prompt.len() + step) as i32, &[0], true)
            .expect("batch space");
        ctx.decode(batch).expect("decode");
        last = 0;
    }
    let tg = args.gen as f64 / t.elapsed().as_secs_f64();

    // Several sequences advancing together, one token each per decode.
    ctx.clear_kv_cache();
    let short = &prompt[..prompt.len().min(16)];
    batch.clear();
    for s in 0..args.seqs {
        for (i, &t) in short.iter().enumerate() {
            batch
                .add(t, i as i32, &[s as i32], i + 1 == short.len())
                .expect("batch space");
        }
    }
    ctx.decode(batch).expect("decode");
    let mut samplers: Vec<LlamaSampler> = (0..args.seqs).map(|_| LlamaSampler::greedy()).collect();
    let mut idx: Vec<i32> = (0..args.seqs)
        .map(|s| ((s + 1) * short.len() - 1) as i32)
        .collect();
    let t = Instant::now();
    for step in 0..args.gen {
        let tokens: Vec<LlamaToken> = samplers
            .iter_mut()
            .zip(&idx)
            .map(|(sm, &i)| sm.sample(ctx, i))
            .collect();
        batch.clear();
        for (s, &tok) in tokens.iter().enumerate() {
            batch
                .add(tok, (short.len() + step) as i32, &[s as i32], true)
                .expect("batch space");
        }
        ctx.decode(batch).expect("decode");
        idx = (0..args.seqs as i32).collect();
    }
    let batched = (args.seqs * args.gen) as f64 / t.elapsed().as_secs_f64();
    Run { pp, tg, batched }
}

fn median_spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let args = Args::parse();
    let mut backend = LlamaBackend::init().expect("llama.cpp backend");
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, &args.model, &LlamaModelParams::default())
        .expect("load model");
    let per_seq = args.ctx.unwrap_or((args.prompt + args.gen + 16) as u32);
    let seqs = args.seqs.max(1) as u32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(per_seq * seqs))
        .with_n_seq_max(seqs)
        .with_n_batch(512)
        .with_n_ubatch(512)
        .with_n_threads(args.threads)
        .with_n_threads_batch(args.threads)
        .with_kv_unified(false);
    let mut ctx = model.new_context(&backend, params).expect("context");
    let mut batch = LlamaBatch::new(512, 1);
    let prompt = prompt_tokens(&model, args.prompt);

    one_run(
        &mut ctx,
        &mut batch,
        &prompt,
        &Args {
            gen: 8,
            ..Args::parse()
        },
    ); // warm-up
    let runs: Vec<Run> = (0..args.reps)
        .map(|_| one_run(&mut ctx, &mut batch, &prompt, &args))
        .collect();
    let pp = median_spread(runs.iter().map(|r| r.pp).collect());
    let tg = median_spread(runs.iter().map(|r| r.tg).collect());
    let bt = median_spread(runs.iter().map(|r| r.batched).collect());
    if args.json {
        let fig = |m: (f64, f64, f64)| json!({"median": m.0, "min": m.1, "max": m.2});
        println!(
            "{}",
            json!({
                "model": args.model, "threads": args.threads, "prompt": args.prompt, "gen": args.gen,
                "seqs": args.seqs, "reps": args.reps,
                "pp_tps": fig(pp), "tg_tps": fig(tg), "batched_tps": fig(bt),
            })
        );
    } else {
        println!("| measure | tok/s median | min | max |");
        println!("| --- | --- | --- | --- |");
        println!(
            "| pp{} | {:.1} | {:.1} | {:.1} |",
            args.prompt, pp.0, pp.1, pp.2
        );
        println!(
            "| tg{} | {:.1} | {:.1} | {:.1} |",
            args.gen, tg.0, tg.1, tg.2
        );
        println!(
            "| tg{} x {} seqs (aggregate) | {:.1} | {:.1} | {:.1} |",
            args.gen, args.seqs, bt.0, bt.1, bt.2
        );
    }
}
