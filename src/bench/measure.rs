//! The measurements of `backstop bench`, llama-bench style, in this process through
//! `llama-cpp-2` with no HTTP: prompt processing (a prompt of `-p` tokens evaluated in
//! batches), generation (`-n` tokens, one sequence, greedy, each fed back), and with
//! `--parallel`, aggregate generation of N sequences sharing each decode (the continuous
//! batching the server does). With `-d`, every measurement starts from that many tokens
//! already in each sequence's cache (llama-bench's depth): speed deep into a conversation.
//! The same context layout as the server: one context, one sequence of cells per slot.

use std::num::NonZeroU32;
use std::path::Path;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};

use crate::engine::KvCacheType;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Prompt tokens for prompt processing (0: not measured, as llama-bench's `-p 0`).
    pub prompt: usize,
    /// Tokens already in each sequence's cache when a measurement starts.
    pub depth: usize,
    /// Tokens generated per sequence (0: generation not measured).
    pub generate: usize,
    /// The prompt and then the generation from it, timed as one (llama-bench's `-pg`).
    pub together: bool,
    /// Repetitions (after one warm-up, which is not counted).
    pub reps: usize,
    /// Sequence counts for aggregate generation (1 is the single-stream figure).
    pub parallel: Vec<usize>,
    /// Context cells per sequence (`None`: just enough for the run, see [`Plan::needed`]);
    /// the server's `--ctx` compares like with like.
    pub ctx: Option<u32>,
    /// Threads, GPU layers, flash attention and KV cache type.
    pub setting: Setting,
}

/// The engine settings one measurement runs with. `backstop bench` measures each model once
/// per combination of the values given, as llama-bench does, so settings can be compared
/// side by side (`--gpu-layers 0,99`: the CPU against the GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    /// CPU threads.
    pub threads: u32,
    /// CPU threads for prompts and steps of several tokens (`None`: [`Self::threads`]).
    #[serde(default)]
    pub threads_batch: Option<u32>,
    /// Layers to offload to a GPU (`None`: llama.cpp's default, all when there is a GPU).
    pub gpu_layers: Option<u32>,
    /// Flash attention on or off (`None`: the server's default for this machine).
    pub flash_attention: Option<bool>,
    /// The KV cache's element type.
    pub kv_cache_type: KvCacheType,
    /// Most tokens in one decode (llama.cpp's `n_batch` and `n_ubatch`, as `serve --batch`
    /// sets them); at least the most sequences generating together.
    pub batch: u32,
}

impl Setting {
    /// The threads that read prompts.
    pub(crate) fn batch_threads(&self) -> u32 {
        self.threads_batch.unwrap_or(self.threads)
    }

    /// A context's parameters for this setting: threads, KV cache type, and flash attention as
    /// `serve` resolves it (so a default measures what serving runs).
    pub(crate) fn context_params(&self) -> LlamaContextParams {
        crate::engine::context_params(
            self.threads,
            self.batch_threads(),
            crate::engine::resolve_flash_attention(
                self.flash_attention,
                self.kv_cache_type,
                self.gpu_layers,
            ),
            self.kv_cache_type,
        )
    }
}

/// One test of a run: a prompt read, a generation, (with one `-p` and one `-n`) both, each
/// timed on its own, or (`--pg`) a prompt and the generation after it timed as one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Test {
    /// Prompt tokens read (0: not measured).
    pub prompt: usize,
    /// Tokens generated (0: not measured).
    pub generate: usize,
    /// The generation continues from the prompt, and one figure times both (`--pg`).
    #[serde(default)]
    pub together: bool,
}

impl Test {
    /// llama-bench's name for it: `pp512`, `tg128`, both, or `pp512+tg128` for one figure
    /// of both.
    pub(super) fn name(&self) -> String {
        match (self.prompt, self.generate) {
            (p, n) if self.together => format!("pp{p}+tg{n}"),
            (p, 0) => format!("pp{p}"),
            (0, n) => format!("tg{n}"),
            (p, n) => format!("pp{p} tg{n}"),
        }
    }
}

/// Why a model could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// llama.cpp would not load it.
    #[error("llama.cpp could not load {0}")]
    Load(String),
    /// The depth, prompt and generated tokens do not fit the model's context.
    #[error("-d {depth} with {lengths} needs {needed} tokens of context; the model holds {train}")]
    TooDeep {
        depth: usize,
        /// The test's lengths as they were given (`-p 512 and -n 128`, `--pg 512,128`).
        lengths: String,
        needed: usize,
        train: usize,
    },
    /// `--ctx` is smaller than the run needs.
    #[error("--ctx {ctx}: -d {depth} with {lengths} needs {needed} cells per sequence")]
    SmallContext {
        ctx: u32,
        depth: usize,
        lengths: String,
        needed: usize,
    },
    /// `--quality` cannot score its text with this model.
    #[error("{0}")]
    Quality(String),
    /// A context or decode failed.
    #[error("llama.cpp failed: {0}")]
    Llama(String),
    /// llama.cpp would load it but not compute it (`engine::probe`).
    #[error("{0}")]
    Uncomputable(String),
}

/// One repetition's figures, tokens per second.
#[derive(Debug, Clone, Default)]
pub struct Rep {
    /// Prompt processing (`None` with `-p 0`).
    pub pp: Option<f64>,
    /// Single-sequence generation (`None` with `-n 0`).
    pub tg: Option<f64>,
    /// A prompt and the generation after it, every token over the time of both (`--pg`).
    pub pg: Option<f64>,
    /// Aggregate generation per sequence count (same order as `Plan::parallel`).
    pub parallel: Vec<f64>,
    /// The fewest tokens any measurement's sequences held when it started, as llama.cpp's
    /// cache reports them (the depth, when it was read).
    pub cached: usize,
}

impl Plan {
    /// Refuses a `--ctx` below the run's need, which the plan alone shows: before any model
    /// is loaded.
    pub fn check(&self) -> Result<(), BenchError> {
        let needed = self.needed();
        match self.ctx.filter(|&c| (c as usize) < needed) {
            Some(ctx) => Err(BenchError::SmallContext {
                ctx,
                depth: self.depth,
                lengths: self.lengths(),
                needed,
            }),
            None => Ok(()),
        }
    }

    /// Refuses a run the model's training context cannot hold; that context otherwise.
    pub fn fits(&self, model: &LlamaModel) -> Result<usize, BenchError> {
        let needed = self.needed();
        let train = usize::try_from(model.n_ctx_train()).unwrap_or(usize::MAX);
        if needed > train {
            return Err(BenchError::TooDeep {
                depth: self.depth,
                lengths: self.lengths(),
                needed,
                train,
            });
        }
        Ok(train)
    }

    /// The test's lengths, with the flags that gave them.
    fn lengths(&self) -> String {
        if self.together {
            format!("--pg {},{}", self.prompt, self.generate)
        } else {
            format!("-p {} and -n {}", self.prompt, self.generate)
        }
    }

    /// Context cells a sequence needs: the depth, then the longer of the prompt and a
    /// generation (which starts from [`PARALLEL_PROMPT`] tokens); each measurement cuts the
    /// cache back to the depth first, so the two never stand in it together, except in a
    /// test of both together, where the generation follows the prompt.
    pub fn needed(&self) -> usize {
        if self.together {
            return self
                .depth
                .saturating_add(self.prompt)
                .saturating_add(self.generate);
        }
        let generation = if self.generate > 0 {
            self.generate.saturating_add(PARALLEL_PROMPT)
        } else {
            0
        };
        self.depth.saturating_add(self.prompt.max(generation))
    }
}

pub(super) fn llama(e: impl std::fmt::Display) -> BenchError {
    BenchError::Llama(e.to_string())
}

/// A prompt of exactly `n` tokens.
fn prompt_tokens(model: &LlamaModel, n: usize) -> Vec<LlamaToken> {
    let text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. ";
    let piece = model.vocab().tokenize(text.as_bytes(), false, false);
    let mut tokens = Vec::with_capacity(n + piece.len());
    while tokens.len() < n && !piece.is_empty() {
        tokens.extend_from_slice(&piece);
    }
    tokens.truncate(n);
    tokens
}

/// Evaluates `tokens` of sequence `seq` from position `pos`, in `n_batch` chunks.
fn prefill(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    tokens: &[LlamaToken],
    seq: i32,
    pos: usize,
) -> Result<(), BenchError> {
    let n_batch = ctx.n_batch() as usize;
    for (c, chunk) in tokens.chunks(n_batch).enumerate() {
        batch.clear();
        for (i, &t) in chunk.iter().enumerate() {
            let p = pos + c * n_batch + i;
            batch
                .add(t, p as i32, &[seq], p + 1 == pos + tokens.len())
                .map_err(llama)?;
        }
        ctx.decode(batch).map_err(llama)?;
    }
    Ok(())
}

/// Prompt tokens each sequence of the parallel measurement starts from.
const PARALLEL_PROMPT: usize = 16;

/// The cache every measurement starts from: the depth's tokens in each of the first
/// `seqs` sequences.
struct Start<'t> {
    tokens: &'t [LlamaToken],
    seqs: usize,
    /// The model's sliding-window attention span ([`crate::engine::sliding_window`]).
    window: Option<usize>,
}

impl Start<'_> {
    fn depth(&self) -> usize {
        self.tokens.len()
    }
}

/// Fills sequence 0 with the depth's tokens and copies them to the other sequences; later
/// measurements cut back to them with [`rewind`].
fn fill(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    start: &Start<'_>,
) -> Result<(), BenchError> {
    crate::engine::forget_all(ctx);
    if start.tokens.is_empty() {
        return Ok(());
    }
    prefill(ctx, batch, start.tokens, 0, 0)?;
    for s in 1..start.seqs {
        ctx.copy_kv_cache_seq(0, s as i32, None, None)
            .map_err(llama)?;
    }
    Ok(())
}

/// Drops every sequence's cells after the depth; the fewest tokens any of sequences `0..n`
/// then holds, as llama.cpp reports it. A sliding-window layer's cache holds its window and
/// one batch, and a measurement that went further wrote over the depth's oldest positions:
/// when what reading on from the depth needs (its last window) is no longer all there, the
/// depth is read again, untimed, as llama-bench reads it before every measurement.
fn rewind(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    start: &Start<'_>,
    n: usize,
) -> Result<usize, BenchError> {
    let depth = start.depth();
    let p0 = u32::try_from(depth).map_err(llama)?;
    match ctx.clear_kv_cache_seq(None, Some(p0), None) {
        Ok(true) => {}
        Ok(false) => {
            return Err(BenchError::Llama(format!(
                "could not cut the cache back to {depth} tokens"
            )))
        }
        Err(e) => return Err(llama(e)),
    }
    // Without a known window, every position must still be there.
    let needed_from = depth.saturating_sub(start.window.unwrap_or(depth));
    let written_over = (0..start.seqs).any(|s| {
        usize::try_from(ctx.kv_cache_seq_pos_min(s as i32)).map_or(true, |p| p > needed_from)
    });
    if depth > 0 && written_over {
        fill(ctx, batch, start)?;
    }
    // `llama_memory_seq_pos_max` is -1 for an empty sequence.
    Ok((0..n)
        .map(|s| usize::try_from(ctx.kv_cache_seq_pos_max(s as i32) + 1).unwrap_or(0))
        .min()
        .unwrap_or(0))
}

/// `n` sequences advancing together for `generate` tokens from `depth` cached tokens;
/// tokens per second in all.
fn generate_together(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    prompt: &[LlamaToken],
    start: &Start<'_>,
    n: usize,
    generate: usize,
) -> Result<(f64, usize), BenchError> {
    let cached = rewind(ctx, batch, start, n)?;
    let depth = start.depth();
    let short = &prompt[..prompt.len().clamp(1, PARALLEL_PROMPT)];
    // Every sequence's start but its last token, in as many decodes as the batch needs;
    // then the last tokens in one decode (n fits a batch), so that every sequence's logits
    // come from the same call: a later decode replaces an earlier one's.
    let (head, last) = short.split_at(short.len() - 1);
    let n_batch = ctx.n_batch() as usize;
    let rows: Vec<(LlamaToken, usize, usize)> = (0..n)
        .flat_map(|s| {
            head.iter()
                .enumerate()
                .map(move |(i, &t)| (t, depth + i, s))
        })
        .collect();
    for piece in rows.chunks(n_batch) {
        batch.clear();
        for &(t, p, s) in piece {
            batch.add(t, p as i32, &[s as i32], false).map_err(llama)?;
        }
        ctx.decode(batch).map_err(llama)?;
    }
    batch.clear();
    for s in 0..n {
        batch
            .add(last[0], (depth + head.len()) as i32, &[s as i32], true)
            .map_err(llama)?;
    }
    ctx.decode(batch).map_err(llama)?;
    let started = Instant::now();
    greedy_steps(ctx, batch, n, 0, depth + short.len(), generate)?;
    Ok((
        (n * generate) as f64 / started.elapsed().as_secs_f64(),
        cached,
    ))
}

/// `steps` tokens for each of sequences `0..n`, the first at position `pos`; the last decode
/// left sequence `s`'s logits in row `first_row + s`, and each step's in row `s`. Each next
/// token is the server's greedy pick, read straight from its row of logits into the next
/// batch (llama.cpp's greedy sampler would first copy the whole vocabulary into a candidate
/// array: 262,144 entries for Gemma).
fn greedy_steps(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    n: usize,
    mut first_row: i32,
    pos: usize,
    steps: usize,
) -> Result<(), BenchError> {
    for step in 0..steps {
        batch.clear();
        for s in 0..n as i32 {
            let tok = crate::engine::greedy(ctx.get_logits_ith(first_row + s));
            batch
                .add(tok, (pos + step) as i32, &[s], true)
                .map_err(llama)?;
        }
        ctx.decode(batch).map_err(llama)?;
        first_row = 0;
    }
    Ok(())
}

/// The prompt read from `depth` and `generate` tokens greedily generated after it, as one
/// request is served; tokens per second over both, and the tokens cached at the start.
fn prompt_then_generate(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    prompt: &[LlamaToken],
    start: &Start<'_>,
    generate: usize,
) -> Result<(f64, usize), BenchError> {
    let cached = rewind(ctx, batch, start, 1)?;
    let depth = start.depth();
    let started = Instant::now();
    prefill(ctx, batch, prompt, 0, depth)?;
    // The prompt's last decode left its logits in the batch's last row.
    let last = batch.n_tokens() - 1;
    greedy_steps(ctx, batch, 1, last, depth + prompt.len(), generate)?;
    Ok((
        (prompt.len() + generate) as f64 / started.elapsed().as_secs_f64(),
        cached,
    ))
}

fn one(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    prompt: &[LlamaToken],
    plan: &Plan,
    start: &Start<'_>,
) -> Result<Rep, BenchError> {
    if plan.together {
        let (pg, cached) =
            prompt_then_generate(ctx, batch, &prompt[..plan.prompt], start, plan.generate)?;
        return Ok(Rep {
            pg: Some(pg),
            cached,
            ..Rep::default()
        });
    }
    let mut cached = rewind(ctx, batch, start, 1)?;
    let mut pp = None;
    if plan.prompt > 0 {
        let started = Instant::now();
        prefill(ctx, batch, &prompt[..plan.prompt], 0, plan.depth)?;
        pp = Some(plan.prompt as f64 / started.elapsed().as_secs_f64());
    }
    if plan.generate == 0 {
        return Ok(Rep {
            pp,
            cached,
            ..Rep::default()
        });
    }
    let (tg, held) = generate_together(ctx, batch, prompt, start, 1, plan.generate)?;
    cached = cached.min(held);
    let mut parallel = Vec::with_capacity(plan.parallel.len());
    for &n in &plan.parallel {
        let (aggregate, held) = generate_together(ctx, batch, prompt, start, n, plan.generate)?;
        parallel.push(aggregate);
        cached = cached.min(held);
    }
    Ok(Rep {
        pp,
        tg: Some(tg),
        pg: None,
        parallel,
        cached,
    })
}

/// Loads a GGUF file with a setting's GPU layers.
pub fn load(path: &Path, setting: &Setting) -> Result<LlamaModel, BenchError> {
    let backend = crate::engine::backend().map_err(llama)?;
    let odd = crate::models::gguf::read(path)
        .map(|h| h.odd_tensors)
        .unwrap_or_default();
    crate::engine::probe::check_file(path, setting.gpu_layers, &odd)
        .map_err(|e| BenchError::Uncomputable(e.to_string()))?;
    let mut params = LlamaModelParams::default();
    if let Some(n) = setting.gpu_layers {
        params = params.with_n_gpu_layers(n);
    }
    LlamaModel::load_from_file(backend, path, &params)
        .map_err(|_| BenchError::Load(path.display().to_string()))
}

/// Measures a loaded model (after [`Plan::check`]): a warm-up, then `plan.reps`
/// repetitions; `tick` after each.
pub fn measure(
    model: &LlamaModel,
    plan: &Plan,
    mut tick: impl FnMut(),
) -> Result<Vec<Rep>, BenchError> {
    let backend = crate::engine::backend().map_err(llama)?;
    let setting = plan.setting;
    let needed = plan.needed();
    let seqs = plan.parallel.iter().copied().max().unwrap_or(1).max(1);
    let train = plan.fits(model)?;
    let per_seq = match plan.ctx {
        Some(c) => c,
        // Just enough, rounded up to llama.cpp's 256-cell padding (within the training
        // context): it pads the whole context to that and splits it evenly between the
        // sequences, warning when an odd total does not divide.
        None => {
            u32::try_from(needed.next_multiple_of(256).min(train.max(needed))).unwrap_or(u32::MAX)
        }
    };
    // llama.cpp aborts the process when a decode holds more tokens than `n_batch`: `bench`
    // refuses a batch below the sequences that generate together, and this keeps the
    // library call safe too.
    let n_batch_u32 = setting.batch.max(seqs as u32);
    let ctx_params = setting
        .context_params()
        .with_n_ctx(NonZeroU32::new(per_seq * seqs as u32))
        .with_n_seq_max(seqs as u32)
        .with_n_batch(n_batch_u32)
        .with_n_ubatch(n_batch_u32)
        .with_kv_unified(false)
        // Sliding-window layers cache their window and one batch, as the server and llama-bench
        // keep them ([`rewind`] reads the depth again when a measurement wrote over it).
        .with_swa_full(false);
    let mut ctx = model.new_context(backend, ctx_params).map_err(llama)?;
    // llama.cpp cuts `n_batch` to the context's cells: the batch buffer takes what it kept.
    let mut batch = LlamaBatch::new(ctx.n_batch() as usize, 1);
    // Generation starts from the prompt's first tokens (at least PARALLEL_PROMPT of them, so
    // `-p 0` and a short `-p` start it the same way).
    let prompt = prompt_tokens(model, plan.prompt.max(PARALLEL_PROMPT));
    // The depth is read once; every measurement cuts back to it.
    let context = prompt_tokens(model, plan.depth);
    let start = Start {
        tokens: &context,
        seqs,
        window: crate::engine::sliding_window(model),
    };
    fill(&mut ctx, &mut batch, &start)?;
    let warm = Plan {
        generate: plan.generate.min(8),
        ..plan.clone()
    };
    one(&mut ctx, &mut batch, &prompt, &warm, &start)?;
    tick();
    let mut reps = Vec::with_capacity(plan.reps);
    for _ in 0..plan.reps {
        reps.push(one(&mut ctx, &mut batch, &prompt, plan, &start)?);
        tick();
    }
    Ok(reps)
}
