//! The decode loop: one OS thread per model owns the llama.cpp model and context. Each step
//! takes new requests, admits them to free slots, evaluates one batch holding a token of
//! every generating sequence (and the tokens it drafts, with `--speculate`: see
//! [`super::lookup`]), then a chunk of each pending prompt, then samples and streams.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self as std_mpsc, sync_channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{mpsc, oneshot};

use super::depths::{self, DepthSplit};
use super::embed::{self, EmbedJob, EmbedShape, EmbedTask, Embedder, Pooling};
use super::graphs;
use super::loader::{self, ModelInfo};
use super::lookup::{self, Record, RowCosts, Shadow};
use super::metrics::{Charge, EngineMetrics};
use super::persist::{Dir, Meta, Saved};
use super::policy::{
    join_segments, parts_early, place, plan_step, restore, restored_held, segment_starts,
    shared_prefix, Budget, CachedSlot, Grain, Held, Layout, Pace, Placement, Reuse, SlotState,
    StepPlan, Window,
};
use super::request::truncate;
use super::rows::{set_rows, FileRows, SeqRows};
use super::spare::Spare;
use super::stash::{Shared, Tenant};
use super::text::{StopMatcher, StopScan, Utf8Stream};
use super::{
    sampler, EngineError, EngineOptions, FinishReason, GenerateRequest, Job, LoadError, Overflow,
    Timings, TokenEvent, Usage, Work,
};

/// A sequence emits at most three events per step (its token; then, when that token ends
/// the answer, the text held back for stop strings and the final event), and one more per
/// token it drafted; it only runs when its channel has room for three, and drafts no more
/// than the rest of the room, so sends never find the channel full.
const EVENTS_PER_STEP: usize = 3;

/// How long to wait before re-planning when every busy sequence waits on a slow reader.
const STALLED_POLL: Duration = Duration::from_millis(2);

/// How long every model in the process must have been idle ([`graphs::quiet_for`]) before
/// one reads answers again ([`Worker::reread_step`]): a client's next request in a run of
/// them (a benchmark, a batch job) comes sooner and never waits for a chunk; a person
/// reading the answer, or a tool being run, takes longer. Another model's stream is never
/// slowed by it.
const REREAD_AFTER: Duration = Duration::from_millis(100);

/// About how long one chunk of a re-read takes, so work that arrives meanwhile waits at
/// most that long for the decode call in flight.
const REREAD_CHUNK_SECS: f64 = 0.025;

/// Thread entry point: load, report readiness (or the load error), then serve until every
/// handle is dropped and the remaining work is done.
pub(crate) fn engine_worker(
    options: EngineOptions,
    cache: PromptCache,
    jobs: mpsc::UnboundedReceiver<Work>,
    ready: oneshot::Sender<Result<ModelInfo, LoadError>>,
) {
    // Spawned from the HTTP runtime, whose threads run in the batch class.
    crate::sched::foreground();
    let started = Instant::now();
    let loaded = loader::backend().and_then(|backend| {
        // Read once for the probe and the prompt grain; an unreadable header leaves both
        // to llama.cpp's own load and its defaults.
        let (size, header) = loader::check_file(&options.path)?;
        let header = header.unwrap_or_default();
        super::probe::check(
            &options.name,
            &options.path,
            options.gpu_layers,
            &header.odd_tensors,
        )?;
        let model = loader::load_model(backend, &options, &header.parts)?;
        Ok((backend, model, size, header.tensor_types))
    });
    let (backend, model, size, tensor_types) = match loaded {
        Ok(l) => l,
        Err(e) => {
            // The receiver only disappears if the server is already shutting down.
            if ready.send(Err(e)).is_err() {
                tracing::debug!("load result had no receiver");
            }
            return;
        }
    };
    let per_slot = loader::ctx_per_slot(&model, &options);
    // Resolved once here: the grain, the log and every context of the model (serving and
    // embeddings, which must agree) take it.
    let fa = loader::resolve_flash_attention(
        options.flash_attention,
        options.kv_cache_type,
        options.gpu_layers,
    );
    let grain = loader::exact_grain(&options, backend, fa, &tensor_types);
    let mut ctx =
        match loader::new_context(backend, &model, &options, fa, per_slot, grain.least_batch()) {
            Ok(c) => c,
            Err(e) => {
                if ready.send(Err(e)).is_err() {
                    tracing::debug!("load result had no receiver");
                }
                return;
            }
        };
    loader::warm_up(&model, &mut ctx);
    let per_slot = ctx.n_ctx() / options.slots.max(1);
    let info = match loader::describe(&model, &options, per_slot, size) {
        Ok(i) => i,
        Err(e) => {
            if ready.send(Err(e)).is_err() {
                tracing::debug!("load result had no receiver");
            }
            return;
        }
    };
    tracing::info!(
        model = %options.name,
        path = %options.path.display(),
        architecture = %info.architecture,
        slots = options.slots,
        ctx_per_slot = per_slot,
        threads = options.threads,
        threads_batch = options.threads_batch,
        flash_attention = %loader::flash_attention_name(fa),
        mmap = options.mmap,
        mlock = options.mlock,
        speculate = if can_draft(&model) { options.speculate } else { 0 },
        cache_ram_mib = if can_draft(&model) { cache.stash.limit() >> 20 } else { 0 },
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    let bos_text = info.template.bos_token().to_owned();
    if ready.send(Ok(info)).is_err() {
        return;
    }
    // Recurrent and hybrid models keep a state that cannot be cut back to a prefix, so a kept
    // one would serve only the very same conversation; they keep none.
    let stash = cache
        .stash
        .tenant(&family(&options, size, fa, grain, &ctx), can_draft(&model));
    let mut worker = Worker::new(backend, &model, ctx, &options, fa, bos_text, grain, stash);
    worker.dir = cache.dir.clone();
    worker.run(jobs);
    tracing::info!(model = %options.name, "engine stopped");
}

/// What a model's conversations kept in host memory are good for: its file (by path, length
/// and modification time) and every setting that the rows, or what a slot knows of them,
/// depend on. A model that loads again in the same family takes back what it kept before it
/// unloaded; a changed file or setting starts afresh (its old entries age out).
fn family(
    options: &EngineOptions,
    size: u64,
    fa: llama_cpp_sys_2::llama_flash_attn_type,
    grain: Grain,
    ctx: &LlamaContext<'_>,
) -> String {
    let modified = std::fs::metadata(&options.path)
        .and_then(|m| m.modified())
        .ok();
    format!(
        "{path}|{size}|{modified:?}|kv={kv}|swa_full={swa}|threads={threads}|gpu={gpu:?}|fa={fa}|{grain:?}|ctx={ctx_len}/{slots}|batch={batch}/{ubatch}",
        path = options.path.display(),
        kv = options.kv_cache_type.as_str(),
        swa = options.swa_full,
        // Written as before where the two counts are the same, so that what an older build
        // kept in the cache folder still matches.
        threads = if options.threads_batch == options.threads {
            options.threads.to_string()
        } else {
            format!("{}/{}", options.threads, options.threads_batch)
        },
        gpu = options.gpu_layers,
        ctx_len = ctx.n_ctx(),
        slots = options.slots,
        batch = ctx.n_batch(),
        ubatch = ctx.n_ubatch(),
    )
}

/// Whether a model's cache can drop a rejected draft: recurrent and hybrid models keep a
/// state, not positions, and never draft.
fn can_draft(model: &LlamaModel) -> bool {
    !model.is_recurrent() && !model.is_hybrid()
}

/// The prompt cache in host memory (`--cache-ram`, see [`super::stash`]), one for the whole
/// process: every model loaded with it keeps the conversations its slots give up there; with
/// a folder (`--cache-dir`, see [`super::persist`]) they also outlive the process.
#[derive(Clone)]
pub struct PromptCache {
    /// Dropped with the last clone, before the stash (fields are dropped in order): the
    /// process is ending, cleanly or not (an error before it served, a panic), and the
    /// folder's files stay for the next start, whatever drops their entries now.
    _ending: Option<Arc<Ending>>,
    stash: Shared<Stashed>,
    dir: Option<Arc<Dir>>,
}

/// See [`PromptCache`]'s first field.
struct Ending(Arc<Dir>);

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.stopped();
    }
}

impl PromptCache {
    /// A cache that holds at most `bytes` (0: nothing is kept), published as the
    /// `backstop_prompt_cache_limit_bytes` gauge.
    pub fn new(bytes: usize) -> Self {
        metrics::gauge!("backstop_prompt_cache_limit_bytes").set(bytes as f64);
        Self {
            _ending: None,
            stash: Shared::new(bytes),
            dir: None,
        }
    }

    /// [`Self::new`], with the conversations a stopped process wrote into `dir` read back
    /// (the oldest dropped first past `bytes`, their files with them), and the models that
    /// stop with this process writing theirs there. The folder is made if it is missing. With
    /// `bytes` 0 nothing is kept and the folder is not touched.
    pub fn with_dir(bytes: usize, dir: &Path) -> std::io::Result<Self> {
        let mut cache = Self::new(bytes);
        if bytes == 0 {
            tracing::warn!(dir = %dir.display(), "--cache-dir keeps nothing with --cache-ram 0");
            return Ok(cache);
        }
        let opened = Dir::open(dir)?;
        // The cache is empty: what one drops to make room is one read before it.
        let (mut read, mut held) = (0, 0);
        for (meta, saved) in opened.read() {
            read += 1;
            let family = meta.family.clone();
            let (entry, bytes) = Stashed::from_file(meta, saved);
            let outcome = cache.stash.adopt(&family, entry, bytes);
            held = held + usize::from(outcome.kept) - outcome.dropped;
        }
        tracing::info!(dir = %dir.display(), conversations = held, dropped = read - held,
            "prompt cache: conversations written by the last process read back");
        cache._ending = Some(Arc::new(Ending(Arc::clone(&opened))));
        cache.dir = Some(opened);
        Ok(cache)
    }

    /// The process is stopping. With a folder, the models that stop with it write the
    /// conversations they keep there, as an unloading model does; without one they keep
    /// nothing, and so do not copy their slots out.
    pub fn stop(&self) {
        if self.dir.is_none() {
            self.stash.close();
        }
    }

    /// Every model has stopped: the folder's files stay for the next start.
    pub fn stopped(&self) {
        if let Some(dir) = &self.dir {
            dir.stopped();
        }
        self.stash.close();
    }
}

/// A slot's conversation kept for a later turn: its sequence's rows, and what the slot knew
/// of them.
struct Stashed {
    known: Known,
    /// What its sequence holds once copied back ([`SeqRows::assemble`], or [`restored_held`]
    /// where the cells could not all be put back).
    held: Held,
    rows: Rows,
    /// Its bytes in the model's gauge of where its rows are, while it is kept.
    _charge: Charge,
}

/// Where a kept conversation's rows are.
enum Rows {
    /// In host memory.
    Memory(SeqRows),
    /// In the cache folder.
    File(Saved),
}

/// A kept conversation's rows being read from the cache folder on a thread of their own, so
/// that the model's streams go on decoding meanwhile ([`Worker::rows_at_hand`]).
struct Reading {
    /// The kept conversation's id in the stash.
    entry: u64,
    rows: Receiver<Result<FileRows, String>>,
    /// What the thread read, once it has.
    done: Option<Result<FileRows, String>>,
    /// When it started.
    since: Instant,
    /// The model's decode step when it started.
    step: u64,
}

impl Reading {
    /// Starts reading file `path`, the `bytes` of rows of kept conversation `entry`, on a new
    /// thread (read here if no thread can be made), at decode step `step`.
    fn start(entry: u64, (path, bytes): (PathBuf, u64), step: u64) -> Self {
        let read = move |path: &Path| FileRows::open(path, bytes);
        let (tx, rows) = sync_channel(1);
        let mut done = None;
        let spawned = std::thread::Builder::new()
            .name("backstop-rows".to_owned())
            .spawn({
                let path = path.clone();
                // The worker may have moved on (its request cancelled, the model stopped):
                // nobody then takes the rows.
                move || drop(tx.send(read(&path)))
            });
        if spawned.is_err() {
            done = Some(read(&path));
        }
        Self {
            entry,
            rows,
            done,
            since: Instant::now(),
            step,
        }
    }

    /// Whether the rows are read.
    fn ready(&mut self) -> bool {
        if self.done.is_none() {
            self.done = match self.rows.try_recv() {
                Ok(read) => Some(read),
                Err(std_mpsc::TryRecvError::Empty) => None,
                Err(std_mpsc::TryRecvError::Disconnected) => {
                    Some(Err("the reading thread ended".to_owned()))
                }
            };
        }
        self.done.is_some()
    }
}

/// A digest of every bit of `logits`, for logs that compare two reads of one prompt.
fn digest(logits: &[f32]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    logits.iter().for_each(|l| l.to_bits().hash(&mut h));
    format!("{:016x}", h.finish())
}

/// Bytes a kept conversation takes beside its rows: its tokens and what is known of them.
fn known_bytes(known: &Known) -> usize {
    let logits = known.end.as_ref().map_or(0, |e| e.logits.len());
    (known.cached.len() + logits) * std::mem::size_of::<f32>()
        + known.segments.starts.len() * std::mem::size_of::<usize>()
}

impl Stashed {
    /// A conversation read back from the cache folder, and the bytes it counts for: its
    /// rows' file, so the folder holds at most what the cache may. Its bytes are counted in
    /// the file gauge of the model that wrote it.
    fn from_file(meta: Meta, saved: Saved) -> (Self, usize) {
        let gauge =
            metrics::gauge!("backstop_prompt_cache_file_bytes", "model" => meta.model.clone());
        let known = Known {
            cached: meta.tokens.into_iter().map(LlamaToken::new).collect(),
            exact: meta.exact,
            segments: Segments {
                starts: meta.starts,
                len: meta.segments,
            },
            end: None,
        };
        let bytes = usize::try_from(saved.bytes())
            .unwrap_or(usize::MAX)
            .saturating_add(known_bytes(&known));
        let entry = Stashed {
            held: Held {
                first: meta.first,
                end: meta.end,
                ordered: meta.ordered,
            },
            rows: Rows::File(saved),
            _charge: Charge::new(&gauge, bytes),
            known,
        };
        (entry, bytes)
    }

    /// What is written beside its rows in the cache folder.
    fn meta(&self, family: &str, model: &str) -> Meta {
        Meta {
            format: 0,
            build: String::new(),
            family: family.to_owned(),
            model: model.to_owned(),
            tokens: self.known.cached.iter().map(|t| t.0).collect(),
            exact: self.known.exact,
            starts: self.known.segments.starts.clone(),
            segments: self.known.segments.len,
            first: self.held.first,
            end: self.held.end,
            ordered: self.held.ordered,
            bytes: 0,
        }
    }

    /// Whether it holds all `other` holds, as well read.
    fn covers(&self, other: &Stashed) -> bool {
        let (this, other) = (&self.known, &other.known);
        other.cached.len() <= this.cached.len()
            && other.exact <= this.exact
            && this.cached.starts_with(&other.cached)
    }
}

/// What a slot knows of the rows its sequence holds, which goes with them when they are
/// copied (to another slot, into host memory and back): see [`Slot`]'s fields of these names.
#[derive(Clone)]
struct Known {
    cached: Vec<LlamaToken>,
    exact: usize,
    segments: Segments,
    end: Option<PromptEnd>,
}

/// A request whose prompt is tokenized and waits for a slot.
struct Pending {
    job: Job,
    tokens: Vec<LlamaToken>,
    /// Where a cold read of the prompt starts new chunks.
    segments: Segments,
    /// Context tokens the request may use.
    limit: usize,
    /// The structured-output grammar, checked at intake.
    grammar: Option<LlamaSampler>,
}

/// One parallel sequence of the shared context.
struct Slot {
    /// llama.cpp sequence id.
    seq: i32,
    /// Tokens whose KV entries this sequence holds, in position order.
    cached: Vec<LlamaToken>,
    /// How many leading `cached` tokens were read exactly (`policy::Grain::reads_exactly`).
    /// Only these are reused for a seeded or greedy request, so its answer is
    /// the one a cold read gives; tokens generated one step at a time went through llama.cpp's
    /// matrix-vector kernels, which round differently from the batched ones a cold prompt goes
    /// through.
    exact: usize,
    /// The segments of the prompt whose cold read the `exact` rows match: while a request is
    /// active, its prompt's.
    segments: Segments,
    /// Logits after the last token of the prompt this slot read last, while `cached` still
    /// starts with that prompt: the same prompt again samples its first token from them.
    end: Option<PromptEnd>,
    /// Step number when it was last released (for least-recently-used choice).
    last_used: u64,
    /// Its sliding-window cells hold each position where a cold read puts it: no removal
    /// since the sequence was last emptied freed cells on both sides of the last one (see
    /// [`Window::holds`]).
    ordered: bool,
    /// Its last request was greedy or seeded and left answer rows that a cold read would
    /// read otherwise: worth reading again while idle ([`Worker::reread_step`]).
    reread: bool,
    /// The request it serves, if any.
    active: Option<Active>,
}

/// A slot's conversation being read again while the model is idle.
struct Reread {
    slot: usize,
    /// What the slot held when it began: the request's prompt and answer.
    tokens: Vec<LlamaToken>,
}

/// A prompt's segment starts (`policy::segment_starts`) and length.
#[derive(Clone, Default)]
struct Segments {
    starts: Vec<usize>,
    len: usize,
}

impl Segments {
    fn layout(&self) -> Layout<'_> {
        Layout {
            starts: &self.starts,
            len: self.len,
        }
    }
}

impl Slot {
    fn known(&self) -> Known {
        Known {
            cached: self.cached.clone(),
            exact: self.exact,
            segments: self.segments.clone(),
            end: self.end.clone(),
        }
    }

    /// Takes what is known of rows just copied into its sequence, and whether their
    /// sliding-window cells sit where a cold read puts them.
    fn learn(&mut self, known: Known, ordered: bool) {
        self.cached = known.cached;
        self.exact = known.exact;
        self.segments = known.segments;
        self.end = known.end;
        self.ordered = ordered;
    }

    /// Forgets all but the first `n` cached tokens.
    fn truncate(&mut self, n: usize) {
        self.cached.truncate(n);
        self.exact = self.exact.min(n);
        if self.end.as_ref().is_some_and(|e| e.len > n) {
            self.end = None;
        }
    }
}

/// The logits a prompt's last row produced.
#[derive(Clone)]
struct PromptEnd {
    /// Prompt length: the logits follow `cached[..len]`.
    len: usize,
    logits: Vec<f32>,
    /// Every row of the prompt was read as a cold read reads it (alone, from grain
    /// boundaries), so a reproducible request may start from these logits.
    exact: bool,
}

/// Per-request state inside a slot.
struct Active {
    events: mpsc::Sender<TokenEvent>,
    prompt: Vec<LlamaToken>,
    sampler: sampler::Sampler,
    max_tokens: usize,
    generated: usize,
    /// Sampled but not yet evaluated; it is fed back next step.
    next: Option<LlamaToken>,
    utf8: Utf8Stream,
    stops: StopMatcher,
    /// Context tokens the request may use (prompt plus answer).
    limit: usize,
    admitted: u64,
    reused: usize,
    /// So far the prompt was read exactly as a cold read reads it.
    read_exact: bool,
    submitted: Instant,
    admitted_at: Instant,
    first_token_at: Option<Instant>,
    /// Batch index whose logits belong to this sequence after the current decode.
    logits_at: Option<i32>,
    /// Tokens drafted by prompt lookup into the current decode, after `next`: each has its
    /// row, from `logits_at + 1` on.
    drafts: Vec<LlamaToken>,
    /// The length of the match `drafts` came from.
    draft_matched: usize,
    /// How often its guesses were taken lately, by the length of their match.
    guesses: Record,
    /// A draft found but not checked, watched against the tokens that follow.
    shadow: Shadow<LlamaToken>,
    /// Most tokens it drafts per step.
    speculate: usize,
    /// Fewest (the request's `speculative.n_min`): a shorter guess is not checked, and a
    /// longer one is checked at least this far whatever the costs say.
    draft_least: usize,
    /// It asked for a reproducible answer ([`Reuse::Exact`]).
    reproducible: bool,
}

impl Active {
    fn can_emit(&self) -> bool {
        self.events.capacity() >= EVENTS_PER_STEP
    }

    /// Sends an event; false if the client is gone.
    fn send(&self, event: TokenEvent) -> bool {
        match self.events.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Closed(_)) => false,
            Err(TrySendError::Full(_)) => {
                // Unreachable by construction (see EVENTS_PER_STEP); treat like a gone client
                // rather than block every other sequence.
                tracing::error!("event channel unexpectedly full; dropping the request");
                false
            }
        }
    }
}

/// What to restore if a decode fails: slot, its cache length before, its pending token.
type Undo = (usize, usize, Option<LlamaToken>);

/// How much of a slot's cache a request may reuse: a reproducible answer must not depend
/// on what the slot held before, unless the server was told `exact_reuse = false`.
fn reuse_for(request: &GenerateRequest, exact_reuse: bool) -> Reuse {
    if !request.cache_prompt {
        Reuse::Cold
    } else if exact_reuse && request.sampling.reproducible() {
        Reuse::Exact
    } else {
        Reuse::Fast
    }
}

struct Worker<'m> {
    backend: &'static LlamaBackend,
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    /// The embedding context, created by the first embedding request.
    embedder: Option<Embedder<'m>>,
    /// Embedding requests in arrival order; the front one advances by one decode per loop.
    embeds: VecDeque<EmbedTask<LlamaToken>>,
    embed_shape: EmbedShape,
    pooling: Pooling,
    options: EngineOptions,
    /// The flash attention every context of the model is made with.
    fa: llama_cpp_sys_2::llama_flash_attn_type,
    batch: LlamaBatch<'static>,
    slots: Vec<Slot>,
    waiting: VecDeque<Pending>,
    budget: Budget,
    /// Measured step costs that size prompt chunks while others generate.
    pace: Pace,
    /// Whether generating sequences decode in one call or two split by depth, as measured.
    depth_split: DepthSplit,
    ctx_per_slot: usize,
    /// Whether the model can draft at all ([`can_draft`]).
    can_draft: bool,
    /// Slots are placed to keep the busy ones together ([`place`]): the model runs on a GPU.
    compact: bool,
    /// Measured decode costs by rows, which size drafts.
    costs: RowCosts,
    /// The cache of the model's sliding-window layers, when it keeps only their window.
    window: Option<Window>,
    n_vocab: i32,
    /// End-of-generation tokens, banned for `ignore_eos` requests.
    eog: Vec<LlamaToken>,
    bos_text: String,
    /// The answer being read again, between chunks.
    reread: Option<Reread>,
    /// Conversations the slots gave up, kept in host memory (`--cache-ram`).
    stash: Tenant<Stashed>,
    /// The cache folder the model writes its kept conversations into when the process stops
    /// (`--cache-dir`).
    dir: Option<Arc<Dir>>,
    /// As the model stops, the memory of the conversation last written into the cache
    /// folder, which the next slot's is copied into ([`Worker::write_out`]).
    written_rows: Option<Vec<u8>>,
    /// The rows of the kept conversation the next request is to continue, being read from
    /// the cache folder while the model's streams decode.
    reading: Option<Reading>,
    /// The model's sliding window, whether or not its cache keeps only the window: llama.cpp
    /// writes a sequence out without what is past it ([`Worker::copy_out`]).
    swa: Option<usize>,
    /// Whether other processes leave the cores free for it.
    spare: Spare,
    admissions: u64,
    step_no: u64,
    piece: Vec<u8>,
    metrics: EngineMetrics,
    name: String,
}

impl<'m> Worker<'m> {
    // What the load resolved, each once (a struct of them would be built only to be taken
    // apart here).
    #[allow(clippy::too_many_arguments)]
    fn new(
        backend: &'static LlamaBackend,
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        options: &EngineOptions,
        fa: llama_cpp_sys_2::llama_flash_attn_type,
        bos_text: String,
        grain: Grain,
        stash: Tenant<Stashed>,
    ) -> Self {
        // What llama.cpp gave each slot (it may round the context it was asked for).
        let ctx_per_slot = ctx.n_ctx() / options.slots.max(1);
        let batch_size = ctx.n_batch() as usize;
        let on_gpu = loader::attends_on_gpu(options.gpu_layers);
        let window = loader::window_cache(model, ctx_per_slot, ctx.n_ubatch(), options.swa_full);
        if let Some(w) = window {
            tracing::info!(
                model = %options.name,
                window = w.span,
                cells = w.cells,
                "sliding-window layers cache each slot's last positions only (--swa-full: the whole context)"
            );
        }
        let slots = (0..options.slots)
            .map(|s| Slot {
                seq: s as i32,
                cached: Vec::new(),
                exact: 0,
                segments: Segments::default(),
                end: None,
                last_used: 0,
                ordered: true,
                reread: false,
                active: None,
            })
            .collect();
        Self {
            backend,
            model,
            ctx,
            embedder: None,
            embeds: VecDeque::new(),
            embed_shape: EmbedShape::new(ctx_per_slot, options.batch),
            pooling: Pooling::of(model),
            options: options.clone(),
            fa,
            batch: LlamaBatch::new(batch_size, 1),
            slots,
            waiting: VecDeque::new(),
            pace: Pace::default(),
            depth_split: DepthSplit::new(options.depth_split),
            budget: Budget {
                batch: batch_size,
                prefill_chunk: prefill_chunk(options.prefill_chunk, on_gpu, batch_size),
                grain,
            },
            ctx_per_slot: ctx_per_slot as usize,
            can_draft: can_draft(model),
            compact: on_gpu,
            costs: RowCosts::default(),
            window,
            n_vocab: model.n_vocab(),
            eog: {
                let vocab = model.vocab();
                vocab.tokens().filter(|&t| vocab.is_eog(t)).collect()
            },
            bos_text,
            reread: None,
            stash,
            dir: None,
            written_rows: None,
            reading: None,
            swa: loader::sliding_window(model),
            // A re-read is a prompt's read, on the batch threads.
            spare: Spare::new(options.threads_batch),
            admissions: 0,
            step_no: 0,
            piece: Vec::with_capacity(32),
            metrics: EngineMetrics::new(&options.name, options.slots),
            name: options.name.clone(),
        }
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty()
            && self.embeds.is_empty()
            && self.slots.iter().all(|s| s.active.is_none())
    }

    fn take(&mut self, work: Work) {
        match work {
            Work::Generate(job) => self.intake(job),
            Work::Embed(job) => self.intake_embed(job),
        }
    }

    fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Work>) {
        let timer = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| {
                tracing::warn!(model = %self.name, error = %e,
                    "no timer on the engine thread: answers are not read again while idle");
            })
            .ok();
        let mut open = true;
        loop {
            if self.is_idle() {
                self.metrics.busy_slots.set(0.0);
                self.metrics.queue_depth.set(0.0);
                if !open {
                    break;
                }
                match self.wait_idle(&mut jobs, timer.as_ref()) {
                    Some(work) => self.take(work),
                    None => break,
                }
            }
            while open {
                match jobs.try_recv() {
                    Ok(work) => self.take(work),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.drop_cancelled();
            self.admit();
            let busy = self.slots.iter().filter(|s| s.active.is_some()).count();
            self.metrics.busy_slots.set(busy as f64);
            self.metrics.queue_depth.set(self.waiting.len() as f64);

            // One embedding decode per loop at most, then a generation step: embedding
            // requests and running streams take turns.
            let embedded = self.embed_step();
            let budget = Budget {
                prefill_chunk: self.pace.chunk(self.budget.prefill_chunk),
                ..self.budget
            };
            let plan = plan_step(&self.slot_states(), budget);
            if plan.is_empty() {
                if !embedded && !self.is_idle() {
                    std::thread::sleep(STALLED_POLL);
                }
                continue;
            }
            self.step(plan);
        }
        // The model unloads, or the process stops: what its slots hold is kept for its next
        // load. With a cache folder, all it keeps goes there, for its next load or the next
        // start (once unloaded, the model could not write its conversations as the process
        // stops). Each slot's is written as soon as it is copied out, so that the next is
        // copied into the same memory: fresh memory faults in a page at a time, which took
        // 50 ms of the 62 ms an 85 MB conversation's copy took on the 2-core VM. The least
        // recently used go first, as into the host-memory cache: where the next load or start
        // has less room, they are the ones left out.
        let dir = self.dir.clone();
        let mut written = dir.as_ref().map_or(0, |dir| self.write_out(dir));
        let mut kept = 0;
        let mut oldest_first: Vec<usize> = (0..self.slots.len()).collect();
        oldest_first.sort_by_key(|&i| self.slots[i].last_used);
        for index in oldest_first {
            kept += usize::from(self.stash_slot(index, &[], 0));
            if let Some(dir) = &dir {
                written += self.write_out(dir);
            }
        }
        if let Some(dir) = dir {
            tracing::info!(model = %self.name, conversations = written, dir = %dir.path().display(), "the model's conversations written to the cache folder, for its next load or the next start");
        } else if kept > 0 {
            tracing::info!(model = %self.name, conversations = kept, "the slots' conversations kept in host memory for the model's next load");
        }
    }

    /// Writes the model's conversations kept in host memory (its slots' among them, as each
    /// is kept) into the cache folder as the model stops, oldest first, since the folder is
    /// read back oldest first. Those written stay in the cache as files; of the memory their
    /// rows were in, the largest buffer is kept for the next slot's copy and the rest freed.
    /// How many were written. The process may go on (the model unloads) or be stopping;
    /// either way the model could not copy its conversations out later.
    fn write_out(&mut self, dir: &Arc<Dir>) -> usize {
        let ids: Vec<u64> = self.stash.with_entries(|entries| {
            entries
                .iter()
                .filter(|(_, e)| matches!(e.rows, Rows::Memory(_)))
                .map(|&(id, _)| id)
                .collect()
        });
        let mut written = 0;
        for id in ids {
            let Some(e) = self.stash.take(id) else {
                continue;
            };
            let meta = e.meta(self.stash.family(), &self.name);
            let Stashed {
                known, held, rows, ..
            } = e;
            let Rows::Memory(rows) = rows else {
                continue;
            };
            let saved = dir.write(meta, |path| rows.write(path).map_err(|e| e.to_string()));
            let memory = rows.into_bytes();
            if self
                .written_rows
                .as_ref()
                .is_none_or(|b| b.capacity() < memory.capacity())
            {
                self.written_rows = Some(memory);
            }
            match saved {
                Ok(saved) => {
                    let known = Known { end: None, ..known };
                    let bytes = usize::try_from(saved.bytes())
                        .unwrap_or(usize::MAX)
                        .saturating_add(known_bytes(&known));
                    let entry = Stashed {
                        known,
                        held,
                        rows: Rows::File(saved),
                        _charge: Charge::new(&self.metrics.cache_file_bytes, bytes),
                    };
                    written += usize::from(self.stash.keep(entry, bytes, Stashed::covers).kept);
                }
                Err(error) => {
                    tracing::warn!(model = %self.name, dir = %dir.path().display(), error, "could not write a conversation into the cache folder");
                }
            }
        }
        written
    }

    /// Tokenizes and checks every input of an embedding request before any of them is
    /// evaluated, answering at once if one is empty or too long (or there are none).
    fn intake_embed(&mut self, job: EmbedJob) {
        let EmbedJob {
            inputs,
            truncate,
            reply,
        } = job;
        let limit = self.embed_shape.tokens as usize;
        let vocab = self.model.vocab();
        let tokens = match inputs.iter().position(|i| i.is_empty()) {
            Some(index) => Err(EngineError::EmptyInput { index }),
            None => embed::fit(
                inputs
                    .iter()
                    .map(|i| vocab.tokenize(i.as_bytes(), true, true))
                    .collect(),
                limit,
                truncate,
            ),
        };
        let task = match tokens {
            Ok(tokens) => EmbedTask {
                vectors: Vec::with_capacity(tokens.len()),
                tokens,
                reply,
            },
            Err(e) => {
                if reply.send(Err(e)).is_err() {
                    tracing::debug!("embedding client gone before its error");
                }
                return;
            }
        };
        self.embeds.extend(task.answer());
    }

    /// Evaluates the next batch of inputs: the oldest embedding request's next ones, and those
    /// of the requests after it where they fit ([`embed::next_batch`]); true if a decode ran.
    /// Requests whose client is gone are dropped first.
    fn embed_step(&mut self) -> bool {
        self.embeds.retain(|t| !t.reply.is_closed());
        if self.embeds.is_empty() {
            return false;
        }
        if self.embedder.is_none() {
            match Embedder::new(
                self.backend,
                self.model,
                &self.options,
                self.fa,
                self.embed_shape,
                self.pooling,
            ) {
                Ok(e) => self.embedder = Some(e),
                Err(e) => {
                    tracing::error!(model = %self.name, error = %e, "no embedding context");
                    self.fail_embeds(1, &e);
                    return false;
                }
            }
        }
        let Some(embedder) = self.embedder.as_mut() else {
            return false;
        };
        // While answers stream, pack no more than a prefill chunk, as for prompts; an input
        // longer than that still goes in one piece (pooling needs it in one ubatch).
        let generating = self.slots.iter().any(|s| s.active.is_some());
        let budget = if generating {
            self.budget.prefill_chunk
        } else {
            self.embed_shape.tokens as usize
        };
        let waiting = || {
            self.embeds
                .iter()
                .flat_map(|t| t.tokens[t.vectors.len()..].iter().map(Vec::as_slice))
        };
        // A decode takes at most `seqs` inputs: the lengths of the rest are not needed.
        let lens: Vec<usize> = waiting()
            .map(<[_]>::len)
            .take(self.embed_shape.seqs as usize)
            .collect();
        let n = embed::next_batch(&lens, self.embed_shape, budget);
        let inputs: Vec<&[llama_cpp_2::token::LlamaToken]> = waiting().take(n).collect();
        // The requests the batch takes inputs from: the oldest, and any after it.
        let mut requests = 0;
        let mut left = n;
        for task in &self.embeds {
            if left == 0 {
                break;
            }
            left = left.saturating_sub(task.tokens.len() - task.vectors.len());
            requests += 1;
        }
        let started = Instant::now();
        let result = embedder.decode(&inputs);
        tracing::trace!(
            inputs = n,
            requests,
            tokens = lens[..n].iter().sum::<usize>(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            output_layer = %embed::output_layer_name(embedder.skipped_output_layer()),
            "embedding step"
        );
        match result {
            Ok(vectors) => {
                let mut vectors = vectors.into_iter();
                for task in self.embeds.iter_mut().take(requests) {
                    let wanted = task.tokens.len() - task.vectors.len();
                    task.vectors.extend(vectors.by_ref().take(wanted));
                }
                let done = self
                    .embeds
                    .iter()
                    .take_while(|t| t.vectors.len() == t.tokens.len())
                    .count();
                for task in self.embeds.drain(..done) {
                    task.answer();
                }
            }
            Err(e) => {
                tracing::error!(model = %self.name, error = %e, "embedding decode failed");
                self.fail_embeds(requests, &e);
            }
        }
        true
    }

    /// Sends the `count` oldest embedding requests `error` and forgets them.
    fn fail_embeds(&mut self, count: usize, error: &EngineError) {
        let count = count.min(self.embeds.len());
        for task in self.embeds.drain(..count) {
            if task.reply.send(Err(error.clone())).is_err() {
                tracing::debug!("embedding client gone before its answer");
            }
        }
    }

    /// Tokenizes a new request and either queues it or answers with its error at once.
    fn intake(&mut self, job: Job) {
        let prompt = job.request.prompt.as_bytes();
        // Add BOS only if the model wants one and the template did not already write it.
        let add_special =
            self.bos_text.is_empty() || !job.request.prompt.starts_with(&self.bos_text);
        let mut tokens = self.model.vocab().tokenize(prompt, add_special, true);
        let limit = job.request.ctx_limit.map_or(self.ctx_per_slot, |c| {
            (c as usize).clamp(2, self.ctx_per_slot)
        });
        if tokens.len() >= limit {
            if let Overflow::Truncate { keep } = job.request.overflow {
                let before = tokens.len();
                tokens = truncate(&tokens, limit, keep, job.request.max_tokens);
                tracing::warn!(model = %self.name, prompt_tokens = before, kept = tokens.len(), limit, "prompt longer than the context: input truncated");
            }
        }
        // A grammar is parsed now, so a bad one is refused before the request waits.
        let grammar = match job.request.grammar.as_deref() {
            None => Ok(None),
            Some(g) => match job.request.grammar_trigger.as_deref() {
                None => LlamaSampler::grammar(self.model, g, "root"),
                Some(trigger) => LlamaSampler::grammar_lazy(self.model, g, "root", [trigger], &[]),
            }
            .map(Some)
            .map_err(|e| EngineError::Grammar(e.to_string())),
        };
        let (grammar, grammar_error) = match grammar {
            Ok(g) => (g, None),
            Err(e) => (None, Some(e)),
        };
        let verdict = if let Some(e) = grammar_error {
            Err(e)
        } else if tokens.is_empty() {
            Err(EngineError::EmptyPrompt)
        } else if tokens.len() >= limit {
            Err(EngineError::PromptTooLong {
                tokens: tokens.len(),
                limit,
            })
        } else {
            Ok(())
        };
        let event = match &verdict {
            Ok(()) => TokenEvent::Queued {
                prompt_tokens: tokens.len() as u32,
            },
            Err(e) => TokenEvent::Error(e.clone()),
        };
        if job.events.try_send(event).is_err() || verdict.is_err() {
            return;
        }
        let segments = self.segments(&tokens);
        self.waiting.push_back(Pending {
            job,
            tokens,
            segments,
            limit,
            grammar,
        });
    }

    /// Where a cold read of `tokens` starts new chunks. Segments matter only where chunk
    /// sizes pick kernels (flash attention).
    fn segments(&self, tokens: &[LlamaToken]) -> Segments {
        let grain = self.budget.grain;
        let starts = if grain.tile.is_some() {
            let vocab = self.model.vocab();
            let starts = segment_starts(tokens.iter().map(|&t| vocab.is_control(t)));
            join_segments(starts, tokens.len(), grain)
        } else {
            vec![0]
        };
        Segments {
            starts,
            len: tokens.len(),
        }
    }

    /// Waits for work while nothing runs. Meanwhile, once every model has been idle for
    /// [`REREAD_AFTER`] and other processes leave free the cores a decode takes ([`Spare`]),
    /// it reads answers again a chunk at a time ([`Worker::reread_step`]), looking for work
    /// (and at the other processes) between chunks; once none is left to read, it sleeps until work
    /// comes. `None` when every sender is gone. `timer` waits on the channel with a timeout
    /// (tokio's receiver has no blocking receive with one); without it nothing is read again.
    fn wait_idle(
        &mut self,
        jobs: &mut mpsc::UnboundedReceiver<Work>,
        timer: Option<&tokio::runtime::Runtime>,
    ) -> Option<Work> {
        while let Some(timer) =
            timer.filter(|_| self.reread.is_some() || self.slots.iter().any(|s| s.reread))
        {
            let quiet = graphs::quiet_for();
            // A reading every time, so that one is a window old when the quiet is long enough.
            let busy = self.spare.wait();
            let wait = REREAD_AFTER
                .checked_sub(quiet)
                .filter(|w| !w.is_zero())
                .or(busy);
            if let Some(wait) = wait {
                // Asleep until every model may have been quiet long enough and other
                // processes may have left the cores free, or work comes: a loop that polled
                // here would wake a thousand times a second for as long as another model
                // streams, and cost that stream 5% of its speed.
                // (The timeout is made inside: its timer needs the runtime's context.)
                let wait = async { tokio::time::timeout(wait, jobs.recv()).await };
                if let Ok(work) = timer.block_on(wait) {
                    return work;
                }
                continue;
            }
            match jobs.try_recv() {
                Ok(work) => return Some(work),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.reread_step(),
            }
        }
        jobs.blocking_recv()
    }

    /// Reads one chunk of an answer again. A greedy or seeded request reuses only rows read
    /// as a cold read of its prompt reads them (see [`Grain`]), and an answer's rows were
    /// computed one step at a time, by other kernels: so the next turn of a conversation
    /// would read the previous answer again before its first token (on the 2-core machine,
    /// 0.6 to 1.1 s for SmolLM2's 200-token answers, where llama.cpp's server, which reuses
    /// them, takes 0.07 s). While the model is idle, the most recently released such slot
    /// reads its conversation again from where exact reuse of it would end, in chunks a
    /// cold read could take (a multiple of the grain, alone in their call), as if the
    /// prompt and answer had come as a prompt: the next turn then reuses all of it, and
    /// its answer is still the one a cold server gives. A request that comes meanwhile
    /// waits at most for the chunk in flight ([`REREAD_CHUNK_SECS`]); if it takes the slot,
    /// the rows read so far serve it and the rest is left.
    fn reread_step(&mut self) {
        let reread = match self.reread.take() {
            Some(r) => r,
            None => match self.begin_reread() {
                Some(r) => r,
                None => return,
            },
        };
        let i = reread.slot;
        let start = self.slots[i].cached.len();
        let grain = self.budget.grain;
        let states: Vec<SlotState> = (0..self.slots.len())
            .map(|j| {
                if j == i {
                    SlotState::Prefill {
                        segments: self.slots[i].segments.layout().rest(start, grain),
                        admitted: 0,
                    }
                } else {
                    SlotState::Free
                }
            })
            .collect();
        // As many rows as take about REREAD_CHUNK_SECS, but enough for the grain's kernels.
        let rows = self
            .pace
            .prompt_rows_in(REREAD_CHUNK_SECS)
            .unwrap_or(0)
            .max(grain.least_batch())
            .min(self.budget.batch);
        let budget = Budget {
            batch: rows,
            ..self.budget
        };
        let Some(&(_, n)) = plan_step(&states, budget).prefill.first() else {
            return;
        };
        let end = (start + n).min(reread.tokens.len());
        if self.read_again(i, &reread.tokens, start, end) && end < reread.tokens.len() {
            self.reread = Some(reread);
        }
    }

    /// Starts reading the most recently released slot's answer again: trims its cache to
    /// what a reproducible request for its whole conversation would reuse.
    fn begin_reread(&mut self) -> Option<Reread> {
        let i = (0..self.slots.len())
            .filter(|&i| self.slots[i].reread && self.slots[i].active.is_none())
            .max_by_key(|&i| self.slots[i].last_used)?;
        self.slots[i].reread = false;
        let tokens = self.slots[i].cached.clone();
        let segments = self.segments(&tokens);
        let slot = &self.slots[i];
        let keep = self.budget.grain.exact_reuse(
            slot.segments.layout(),
            segments.layout(),
            tokens.len(),
            slot.exact,
        );
        let held = self.held(slot);
        if !Window::holds(self.window, held, keep, Reuse::Exact) || !self.trim(i, keep) {
            return None;
        }
        let slot = &mut self.slots[i];
        slot.truncate(keep);
        slot.segments = segments;
        Some(Reread { slot: i, tokens })
    }

    /// Reads `tokens[start..end]` into slot `i` in one decode call of their own; false if the
    /// rows did not come out as a cold read's (nothing more is worth reading) or llama.cpp
    /// failed (the slot is cut back to what it held).
    fn read_again(&mut self, i: usize, tokens: &[LlamaToken], start: usize, end: usize) -> bool {
        self.batch.clear();
        let seq = self.slots[i].seq;
        for (pos, &token) in (start..end).zip(&tokens[start..end]) {
            if self.batch.add(token, pos as i32, &[seq], false).is_err() {
                return false;
            }
        }
        let (result, took) = graphs::decode_in_background(&mut self.ctx, &mut self.batch);
        if let Err(e) = result {
            tracing::warn!(model = %self.name, error = %e, "reading an answer again failed");
            if !self.trim(i, start) {
                self.clear_seq(i);
                self.slots[i].truncate(0);
            }
            self.slots[i].ordered = false;
            return false;
        }
        self.pace.record(0, end - start, took.as_secs_f64());
        self.metrics.reread_tokens.increment((end - start) as u64);
        let grain = self.budget.grain;
        let slot = &mut self.slots[i];
        let exact = grain.reads_exactly(slot.segments.layout(), start, end) && slot.exact == start;
        slot.cached.extend_from_slice(&tokens[start..end]);
        if exact {
            slot.exact = end;
        }
        exact
    }

    /// Frees the slots (and queue places) of clients that went away.
    fn drop_cancelled(&mut self) {
        self.waiting.retain(|p| !p.job.events.is_closed());
        for i in 0..self.slots.len() {
            let gone = self.slots[i]
                .active
                .as_ref()
                .is_some_and(|a| a.events.is_closed());
            if gone {
                self.metrics.cancelled.increment(1);
                self.release(i);
            }
        }
    }

    /// Gives waiting requests free slots, reusing cached prompt prefixes where possible.
    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            let slots: Vec<CachedSlot<'_, LlamaToken>> = self
                .slots
                .iter()
                .enumerate()
                .map(|(index, s)| CachedSlot {
                    index,
                    cached: &s.cached,
                    exact: s.exact,
                    layout: s.segments.layout(),
                    end: s.end.as_ref().map(|e| (e.len, e.exact)),
                    held: self.held(s),
                    last_used: s.last_used,
                    busy: s.active.is_some(),
                    kept: self.stash.enabled(),
                    reading: s
                        .active
                        .as_ref()
                        .filter(|a| s.cached.len() < a.prompt.len() && s.exact == s.cached.len())
                        .map(|a| a.prompt.as_slice()),
                })
                .collect();
            let reuse = reuse_for(&front.job.request, self.options.exact_reuse);
            let layout = front.segments.layout();
            let Some(placement) = place(
                &slots,
                &front.tokens,
                layout,
                reuse,
                self.budget.grain,
                self.window,
                self.compact,
            ) else {
                break;
            };
            let restored = self.stash.with_entries(|entries| {
                let stashed: Vec<CachedSlot<'_, LlamaToken>> = entries
                    .iter()
                    .enumerate()
                    .map(|(index, (_, e))| CachedSlot {
                        index,
                        cached: &e.known.cached,
                        exact: e.known.exact,
                        layout: e.known.segments.layout(),
                        end: e.known.end.as_ref().map(|end| (end.len, end.exact)),
                        held: e.held,
                        last_used: 0,
                        busy: false,
                        kept: true,
                        reading: None,
                    })
                    .collect();
                let (placement, index) = restore(
                    placement,
                    &slots,
                    &stashed,
                    &front.tokens,
                    layout,
                    reuse,
                    self.budget.grain,
                    self.window,
                )?;
                let (id, e) = entries[index];
                let file = match &e.rows {
                    Rows::File(saved) => Some((saved.rows(), saved.bytes())),
                    Rows::Memory(_) => None,
                };
                Some((placement, id, file))
            });
            let (placement, kept, file) = restored
                .map_or((placement, None, None), |(p, entry, file)| {
                    (p, Some(entry), file)
                });
            if kept.is_some_and(|entry| !self.rows_at_hand(entry, file)) {
                // Requests start in arrival order: those behind it wait with it.
                break;
            }
            if let Some(pending) = self.waiting.pop_front() {
                self.start(placement, kept, pending);
            }
        }
        if self.waiting.is_empty() {
            // Its request was cancelled: nobody waits for the rows any more.
            self.reading = None;
        }
    }

    /// Whether kept conversation `entry`'s rows (in `file`, of its length, if in the cache
    /// folder) can be copied back into a slot now. Rows in the cache folder are read on a
    /// thread of their own while any of the model's streams or embeddings decode, so that those
    /// go on while the disk is read (on the 2-core VM, a 76 MB file took 2-4 ms to map from the
    /// page cache but 28-75 ms from the disk, and read in place it would stall every stream for
    /// as long); the request then starts at the first step after the rows are in. With nothing
    /// decoding, nothing waits on the read, so the rows are read as they are copied back.
    fn rows_at_hand(&mut self, entry: u64, file: Option<(PathBuf, u64)>) -> bool {
        if let Some(r) = self.reading.as_mut().filter(|r| r.entry == entry) {
            return r.ready();
        }
        let decoding = self.slots.iter().any(|s| s.active.is_some()) || !self.embeds.is_empty();
        match file {
            Some(file) if decoding => {
                self.reading = Some(Reading::start(entry, file, self.step_no));
                false
            }
            _ => true,
        }
    }

    /// Copies slot `from`'s cache into slot `to` (llama.cpp copies the whole KV buffer at the
    /// next decode); false if it refused.
    fn copy_slot(&mut self, from: usize, to: usize) -> bool {
        let (src, dst) = (self.slots[from].seq, self.slots[to].seq);
        if let Err(e) = self.ctx.kv_cache_seq_cp(src, dst, None, None) {
            tracing::warn!(model = %self.name, src, dst, error = %e, "could not copy KV sequence");
            return false;
        }
        let (known, ordered) = (self.slots[from].known(), self.slots[from].ordered);
        self.slots[to].learn(known, ordered);
        true
    }

    /// Keeps slot `index`'s conversation in host memory before a request that parts from it
    /// early ([`parts_early`]) takes the slot, if the stash is on and a request could reuse
    /// the conversation once it is copied back; whether it was kept.
    /// The request keeps `keep` of the slot's rows (it cuts the slot back to them next).
    fn stash_slot(&mut self, index: usize, prompt: &[LlamaToken], keep: usize) -> bool {
        if !self.stash.enabled() {
            return false;
        }
        let slot = &self.slots[index];
        let shared = shared_prefix(&slot.cached, prompt);
        if !parts_early(slot.cached.len(), shared) {
            return false;
        }
        let held = self.held(slot);
        let out = restored_held(held, self.swa);
        if out.end != slot.cached.len() || !Window::holds(self.window, out, out.end, Reuse::Fast) {
            return false;
        }
        let known = slot.known();
        let (rows, held) = match self.copy_out(index, held, keep) {
            Ok(copied) => copied,
            Err(error) => {
                tracing::warn!(model = %self.name, seq = self.slots[index].seq, error, "could not copy a KV sequence out");
                return false;
            }
        };
        let bytes = rows.byte_len() + known_bytes(&known);
        let entry = Stashed {
            known,
            held,
            rows: Rows::Memory(rows),
            _charge: Charge::new(&self.metrics.cache_ram_bytes, bytes),
        };
        let tokens = entry.known.cached.len();
        let outcome = self.stash.keep(entry, bytes, Stashed::covers);
        if outcome.kept {
            self.metrics.cache_ram_saves.increment(1);
        }
        tracing::debug!(
            model = %self.name,
            tokens,
            bytes,
            kept = outcome.kept,
            dropped = outcome.dropped,
            "a slot's conversation copied into host memory"
        );
        outcome.kept
    }

    /// Slot `index`'s rows, which hold `held`, copied out, and what its sequence holds once
    /// they are copied back. llama.cpp leaves out the cells a sliding window no longer
    /// attends to; the slot is then cut back and written out again, until what those writes
    /// hold together covers every cell ([`SeqRows::assemble`]), as far as the request taking
    /// the slot, which keeps `keep` of its rows, lets it be cut.
    fn copy_out(
        &mut self,
        index: usize,
        held: Held,
        keep: usize,
    ) -> Result<(SeqRows, Held), String> {
        let seq = self.slots[index].seq;
        let whole = SeqRows::get(&self.ctx, seq, self.written_rows.take())?;
        let as_written = restored_held(held, self.swa);
        let Some(span) = self
            .swa
            .filter(|&span| held.ordered && held.end > span + held.first)
        else {
            return Ok((SeqRows::new(whole), as_written));
        };
        let mut parts = vec![whole];
        // Each write holds the `span` positions before the sequence's end: the writes so far
        // hold those from `low` on, and the next cuts back to the highest point from which it
        // reaches the first position, or else to `low`, keeping the most for the request.
        let mut low = held.end - span;
        while low > held.first {
            let cut = (held.first + span).max(low);
            if cut < keep || !self.trim(index, cut) {
                break;
            }
            self.slots[index].truncate(cut);
            match SeqRows::get(&self.ctx, seq, None) {
                Ok(part) => parts.push(part),
                Err(_) => break,
            }
            low = cut.saturating_sub(span).max(held.first);
        }
        let cells = self.window.map(|w| w.cells);
        Ok(
            match SeqRows::assemble(&parts, (held.first, held.end), span, cells) {
                Some(assembled) => assembled,
                None => (SeqRows::new(parts.swap_remove(0)), as_written),
            },
        )
    }

    /// Copies kept conversation `e` back into slot `index`'s sequence (from host memory, or
    /// from its file, which goes once read: `read` if its rows were read while the streams
    /// decoded, else read now); false if llama.cpp refused (the slot is then empty).
    fn restore_slot(&mut self, e: Stashed, index: usize, read: Option<Reading>) -> bool {
        let seq = self.slots[index].seq;
        let end = e.known.cached.len();
        let copied = match &e.rows {
            Rows::Memory(rows) => set_rows(rows.bytes(), &mut self.ctx, seq, end),
            Rows::File(saved) => {
                let (rows, took, aside) = match read {
                    Some(Reading {
                        done: Some(rows),
                        since,
                        step,
                        ..
                    }) => (rows, since.elapsed(), Some(self.step_no - step)),
                    _ => {
                        let started = Instant::now();
                        let rows = FileRows::open(&saved.rows(), saved.bytes());
                        (rows, started.elapsed(), None)
                    }
                };
                let started = Instant::now();
                let copied = rows.and_then(|rows| set_rows(rows.bytes(), &mut self.ctx, seq, end));
                if copied.is_ok() {
                    tracing::info!(
                        model = %self.name,
                        slot = index,
                        tokens = end,
                        bytes = saved.bytes(),
                        read_ms = took.as_millis(),
                        copy_ms = started.elapsed().as_millis(),
                        aside = aside.is_some(),
                        steps_meanwhile = aside.unwrap_or(0),
                        "a conversation's rows read back from the cache folder"
                    );
                }
                copied
            }
        };
        let held = self.held(&self.slots[index]);
        if copied.is_err() || held.end != e.known.cached.len() {
            tracing::warn!(
                model = %self.name,
                seq,
                error = ?copied.err(),
                positions = held.end,
                tokens = e.known.cached.len(),
                "could not copy a KV sequence back"
            );
            self.clear_seq(index);
            self.slots[index].truncate(0);
            return false;
        }
        // Where the cells went is as predicted, or no reproducible request reuses them.
        let ordered = e.held.ordered && (held.first, held.end) == (e.held.first, e.held.end);
        self.metrics
            .cache_ram_restored_tokens
            .increment(e.known.cached.len() as u64);
        self.slots[index].learn(e.known, ordered);
        true
    }

    /// Puts a request into a slot, trimming the slot's KV cache to the reusable prefix (a
    /// busy slot's cache, or one kept in host memory, copied in first, if placement says so;
    /// what the slot held kept in host memory first, if worth it). When the whole prompt is
    /// cached with its last logits, the first token is sampled at once.
    fn start(&mut self, placement: Placement, kept: Option<u64>, pending: Pending) {
        let Placement {
            slot: index,
            reuse,
            copy_from,
        } = placement;
        if self.reread.as_ref().is_some_and(|r| r.slot == index) {
            self.reread = None;
        }
        let mode = reuse_for(&pending.job.request, self.options.exact_reuse);
        let mut keep = reuse;
        // Taken out first: keeping the slot's conversation may drop entries, this one among
        // them.
        let restored = kept.and_then(|entry| self.stash.take(entry));
        // Rows read for this request, the front one; read for another placement, they go.
        let read = self.reading.take().filter(|r| Some(r.entry) == kept);
        let keeps = if kept.is_some() || copy_from.is_some() {
            0
        } else {
            reuse
        };
        self.stash_slot(index, &pending.tokens, keeps);
        if let Some(e) = restored {
            if !self.restore_slot(e, index, read) {
                keep = 0;
            }
        } else if kept.is_some() {
            keep = 0;
        }
        if let Some(from) = copy_from {
            if !self.copy_slot(from, index) {
                keep = 0;
            }
        }
        let shared = shared_prefix(&self.slots[index].cached, &pending.tokens);
        if keep > shared {
            // Placement reuses only what the slot shares with the prompt: rows of other
            // tokens would change the answer, so the prompt is read afresh instead.
            tracing::error!(model = %self.name, keep, shared, "a slot holds other tokens than placement saw");
            keep = 0;
        }
        if keep > 0 {
            let held = self.held(&self.slots[index]);
            if !Window::holds(self.window, held, keep, mode) || !self.trim(index, keep) {
                keep = 0;
            }
        }
        if keep == 0 {
            self.clear_seq(index);
        }
        let slot = &mut self.slots[index];
        slot.truncate(keep);
        let Pending {
            job,
            tokens,
            segments,
            limit,
            grammar,
        } = pending;
        let whole_hit = keep == tokens.len() && slot.end.as_ref().is_some_and(|e| e.len == keep);
        // Reused rows leave the read as a cold one only within what exact reuse allows (a
        // sampled request without a seed may have reused more); the rows that stay exact are
        // now counted against this prompt's segments.
        let read_exact = if whole_hit {
            slot.end.as_ref().is_some_and(|e| e.exact)
        } else {
            let exact = self.budget.grain.exact_reuse(
                slot.segments.layout(),
                segments.layout(),
                keep,
                slot.exact,
            );
            slot.exact = exact;
            exact == keep
        };
        slot.segments = segments;
        let banned: &[LlamaToken] = if job.request.ignore_eos && grammar.is_none() {
            &self.eog
        } else {
            &[]
        };
        let sampler = sampler::build(
            &job.request.sampling,
            self.n_vocab,
            limit,
            &tokens,
            banned,
            grammar,
        );
        let (speculate, draft_least) = if self.can_draft {
            let asked = job.request.speculate;
            let most = asked.most(self.options.speculate) as usize;
            (most, (asked.least as usize).min(most))
        } else {
            (0, 0)
        };
        let mut stops = job.request.stop.clone();
        stops.retain(|s| !s.is_empty());
        self.admissions += 1;
        slot.active = Some(Active {
            events: job.events,
            prompt: tokens,
            sampler,
            max_tokens: job.request.max_tokens.map_or(usize::MAX, |n| n as usize),
            generated: 0,
            next: None,
            utf8: Utf8Stream::default(),
            stops: StopMatcher::new(&stops),
            limit,
            admitted: self.admissions,
            reused: keep,
            read_exact,
            submitted: job.submitted,
            admitted_at: Instant::now(),
            first_token_at: None,
            logits_at: None,
            drafts: Vec::new(),
            guesses: Record::default(),
            draft_matched: 0,
            shadow: Shadow::default(),
            speculate,
            draft_least,
            reproducible: mode == Reuse::Exact,
        });
        if whole_hit {
            self.sample_kept(index);
        }
    }

    /// What slot `s`'s sequence holds in llama.cpp's cache.
    fn held(&self, s: &Slot) -> Held {
        let position = |p: i32| usize::try_from(p).ok();
        Held {
            first: position(self.ctx.kv_cache_seq_pos_min(s.seq)).unwrap_or(0),
            end: position(self.ctx.kv_cache_seq_pos_max(s.seq)).map_or(0, |p| p + 1),
            ordered: s.ordered,
        }
    }

    /// Removes slot `index`'s positions from `keep` on; false if llama.cpp refused.
    fn trim(&mut self, index: usize, keep: usize) -> bool {
        let end = self.held(&self.slots[index]).end;
        let slot = &mut self.slots[index];
        if self
            .ctx
            .kv_cache_seq_rm(slot.seq, Some(keep as u32), None)
            .is_err()
        {
            return false;
        }
        if let Some(w) = self.window {
            slot.ordered &= w.trim_keeps_order(keep, end);
        }
        true
    }

    /// Empties slot `index`'s sequence.
    fn clear_seq(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        match self
            .ctx
            .clear_kv_cache_seq(Some(slot.seq as u32), None, None)
        {
            Ok(_) => slot.ordered = true,
            Err(e) => {
                tracing::warn!(model = %self.name, seq = slot.seq, error = %e, "could not clear KV sequence");
            }
        }
    }

    fn slot_states(&self) -> Vec<SlotState> {
        self.slots
            .iter()
            .map(|s| match &s.active {
                None => SlotState::Free,
                Some(a) if a.next.is_none() => SlotState::Prefill {
                    segments: s.segments.layout().rest(s.cached.len(), self.budget.grain),
                    admitted: a.admitted,
                },
                Some(a) => SlotState::Decode {
                    can_emit: a.can_emit(),
                },
            })
            .collect()
    }

    /// Runs one planned step in parts: the generating sequences' tokens in one `llama_decode`
    /// call, then every prompt chunk in a call of its own, oldest first, each sampled as soon
    /// as it is evaluated. Beside other sequences llama.cpp would split a prompt chunk into
    /// equal per-sequence parts (a non-unified cache takes one row per sequence into the
    /// first), costing as many passes over the weights as separate calls do; alone, a chunk is
    /// read as a cold read reads it, so a reproducible request can reuse it later, and a prompt
    /// that ends shows its first token without waiting for the prompts read after it.
    ///
    /// A step that began with nothing generating reads prompts up to the whole batch budget.
    /// Requests that waited to copy a prefix one of its prompts was reading (see
    /// [`place`]) are placed as soon as it is read, and what they have left to read is read
    /// in the same step, before anything generates: requests arriving together with the same
    /// long system prompt read it once and all start generating together.
    fn step(&mut self, plan: StepPlan) {
        self.step_no += 1;
        let StepPlan {
            decode, prefill, ..
        } = plan;
        let fresh = decode.is_empty();
        let used: usize = prefill.iter().map(|p| p.1).sum();
        if !decode.is_empty() {
            self.decode_generating(decode);
        }
        self.read_chunks(prefill);
        let left = self.budget.batch.saturating_sub(used);
        if !fresh || left == 0 || self.waiting.is_empty() {
            return;
        }
        let admitted = self.admissions;
        self.admit();
        if self.admissions == admitted {
            return;
        }
        // Sequences that got their first token in this step generate from the next one.
        let states: Vec<SlotState> = self
            .slot_states()
            .into_iter()
            .map(|s| match s {
                SlotState::Decode { .. } => SlotState::Free,
                other => other,
            })
            .collect();
        let budget = Budget {
            batch: left,
            ..self.budget
        };
        self.read_chunks(plan_step(&states, budget).prefill);
    }

    /// Decodes the generating sequences' next tokens: in one call, or in two split by depth
    /// (the shallower first) where that has been measured to be faster ([`DepthSplit`]).
    fn decode_generating(&mut self, decode: Vec<usize>) {
        let seqs: Vec<(usize, usize)> = decode
            .iter()
            .map(|&i| (i, self.slots[i].cached.len() + 1))
            .collect();
        let chosen = self.depth_split.choose(&decode, depths::deep_group(&seqs));
        let plain = self.depth_split.measuring();
        let groups = match chosen {
            Some(deep) => {
                self.metrics.split_steps.increment(1);
                let (deep, shallow): (Vec<usize>, Vec<usize>) =
                    decode.into_iter().partition(|i| deep.contains(i));
                vec![shallow, deep]
            }
            None => vec![decode],
        };
        let calls = groups.len();
        let mut step = StepDecode::default();
        for group in groups {
            step.add(self.evaluate_and_sample(&StepPlan {
                decode: group,
                prefill: vec![],
                plain,
            }));
        }
        let StepDecode {
            decoded,
            drafted,
            secs,
        } = step;
        tracing::trace!(
            calls,
            timed = plain,
            decoded,
            drafted,
            ms = secs * 1e3,
            slots_cells = ?seqs,
            "generating step"
        );
        if decoded > 0 && drafted == 0 {
            // Both keep plain decode steps' cost; drafts are paid for by what they yield.
            self.pace.record(decoded, 0, secs);
            self.depth_split.record(secs);
        } else {
            self.depth_split.skip();
        }
    }

    /// Evaluates prompt chunks one `llama_decode` call each, in order.
    fn read_chunks(&mut self, chunks: Vec<(usize, usize)>) {
        for chunk in chunks {
            self.evaluate_and_sample(&StepPlan {
                prefill: vec![chunk],
                ..StepPlan::default()
            });
        }
    }

    /// Evaluates one batch and samples from it. If llama.cpp rejects a batch of several
    /// sequences, each is retried alone so only the one at fault fails. What the calls that
    /// went through decoded of generating sequences ([`Worker::evaluate`]).
    fn evaluate_and_sample(&mut self, plan: &StepPlan) -> StepDecode {
        let mut decoded = StepDecode::default();
        match self.evaluate(plan) {
            Ok(d) => {
                decoded = d;
                self.sample(plan);
            }
            Err(e) if plan.decode.len() + plan.prefill.len() > 1 => {
                tracing::warn!(model = %self.name, error = %e, "batch failed; retrying each sequence alone");
                let singles = plan
                    .decode
                    .iter()
                    .map(|&i| StepPlan {
                        decode: vec![i],
                        prefill: vec![],
                        plain: plan.plain,
                    })
                    .chain(plan.prefill.iter().map(|&p| StepPlan {
                        prefill: vec![p],
                        ..StepPlan::default()
                    }));
                for single in singles.collect::<Vec<_>>() {
                    match self.evaluate(&single) {
                        Ok(d) => {
                            decoded.add(d);
                            self.sample(&single);
                        }
                        Err(e) => self.fail(&single, e),
                    }
                }
            }
            Err(e) => self.fail(plan, e),
        }
        decoded
    }

    /// Fills the batch from the plan and runs `llama_decode`; on failure the slots are left
    /// exactly as before. A call with no prompt rows returns what it decoded and how long it
    /// took, for the step to learn from ([`Worker::decode_generating`]); a prompt call
    /// teaches the pace itself.
    fn evaluate(&mut self, plan: &StepPlan) -> Result<StepDecode, EngineError> {
        self.batch.clear();
        let mut undo: Vec<Undo> = Vec::with_capacity(plan.decode.len() + plan.prefill.len());
        let shared_step = plan.decode.len() + plan.prefill.len() > 1;
        // Rows of the decode and the tokens they are expected to yield, as drafts are chosen.
        let mut rows = plan.decode.len();
        let mut expected = rows as f64;
        let mut drafted = 0;
        for &i in &plan.decode {
            let slot = &mut self.slots[i];
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            let Some(token) = active.next.take() else {
                continue;
            };
            undo.push((i, slot.cached.len(), Some(token)));
            let pos = slot.cached.len() as i32;
            self.batch
                .add(token, pos, &[slot.seq], true)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            slot.cached.push(token);
            active.logits_at = Some(self.batch.n_tokens() - 1);
            let room = if plan.plain {
                0
            } else {
                self.draft_room(i, rows)
            };
            let slot = &mut self.slots[i];
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            // As many of the lookup's tokens as pay ([`lookup::choose`]), and at least as
            // many as the request asked for; a draft that is not checked is watched instead,
            // to learn whether it would have paid.
            let found = lookup::draft(&slot.cached, room);
            let rate = active.guesses.rate(found.matched);
            if !found.tokens.is_empty() {
                match lookup::choose(
                    &self.costs,
                    rows,
                    expected,
                    found.tokens.len(),
                    rate,
                    active.draft_least,
                ) {
                    0 => active.shadow.watch(found),
                    k => {
                        active.shadow.clear();
                        active.drafts.extend_from_slice(&found.tokens[..k]);
                        active.draft_matched = found.matched;
                    }
                }
                tracing::trace!(
                    slot = i,
                    matched = found.matched,
                    found = found.tokens.len(),
                    rate,
                    drafted = active.drafts.len(),
                    "guess"
                );
            }
            for (&d, pos) in active.drafts.iter().zip(pos + 1..) {
                self.batch
                    .add(d, pos, &[slot.seq], true)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
                slot.cached.push(d);
            }
            let k = active.drafts.len();
            rows += k;
            expected += lookup::expected_gain(rate, k);
            drafted += k;
        }
        for &(i, n) in &plan.prefill {
            let slot = &mut self.slots[i];
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            undo.push((i, slot.cached.len(), None));
            let start = slot.cached.len();
            let end = (start + n).min(active.prompt.len());
            // Beside other sequences llama.cpp splits the batch into equal per-sequence parts,
            // so only rows read alone can be as a cold read's.
            let layout = slot.segments.layout();
            let exact = !shared_step && self.budget.grain.reads_exactly(layout, start, end);
            active.read_exact &= exact;
            for (pos, &token) in (start..end).zip(&active.prompt[start..end]) {
                let last = pos + 1 == active.prompt.len();
                self.batch
                    .add(token, pos as i32, &[slot.seq], last)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
                slot.cached.push(token);
            }
            if exact && slot.exact == start {
                slot.exact = slot.cached.len();
            }
            active.logits_at = (end == active.prompt.len()).then(|| self.batch.n_tokens() - 1);
            self.metrics.prompt_tokens.increment((end - start) as u64);
        }
        if self.batch.n_tokens() == 0 {
            return Ok(StepDecode::default()); // every slot of the plan was released meanwhile
        }
        self.metrics.steps.increment(1);
        self.metrics.batch_sequences.record(undo.len() as f64);
        let started = Instant::now();
        // The pace counts the decode alone, not a wait for another model's turn.
        let (result, took) = graphs::decode_timed(&mut self.ctx, &mut self.batch);
        let mut generated = StepDecode::default();
        if result.is_ok() {
            let decoded = undo.iter().filter(|u| u.2.is_some()).count();
            let rows = self.batch.n_tokens() as usize;
            let prompt = rows.saturating_sub(decoded + drafted);
            if prompt == 0 {
                generated = StepDecode {
                    decoded,
                    drafted,
                    secs: took.as_secs_f64(),
                };
            } else {
                self.pace.record(decoded, prompt, took.as_secs_f64());
            }
            if self.can_draft {
                self.costs.record(rows, took.as_secs_f64(), prompt == 0);
            }
        }
        tracing::trace!(
            step = self.step_no,
            decode = plan.decode.len(),
            prefill = ?plan.prefill,
            tokens = self.batch.n_tokens(),
            ms = took.as_secs_f64() * 1e3,
            waited_ms = started.elapsed().saturating_sub(took).as_secs_f64() * 1e3,
            "step"
        );
        match result {
            Ok(()) => Ok(generated),
            Err(e) => {
                self.metrics.decode_errors.increment(1);
                for (i, len, next) in undo {
                    if !self.trim(i, len) {
                        self.clear_seq(i);
                        self.slots[i].truncate(0);
                    }
                    let slot = &mut self.slots[i];
                    // Cells the failed call took may have been left where llama.cpp put them.
                    slot.ordered = false;
                    slot.truncate(len);
                    if let Some(a) = slot.active.as_mut() {
                        a.next = next;
                        a.logits_at = None;
                        a.drafts.clear();
                    }
                }
                Err(EngineError::Decode(e.to_string()))
            }
        }
    }

    /// The most tokens slot `i` may draft by prompt lookup after the token it just put in a
    /// decode of `rows` rows (0 without speculation): every token the draft could yield may
    /// still be sent in this step and counted in the answer, and its positions fit the
    /// request's context and the batch. A sliding-window cache needs no room of its own:
    /// llama.cpp gives a new position a cell whose position is out of the window of the
    /// sequence's first new position (`find_slot` in `llama-kv-cache.cpp`, at the pinned
    /// version), so what a rejected draft overwrote is out of the window of every position
    /// read after it too.
    fn draft_room(&self, i: usize, rows: usize) -> usize {
        let slot = &self.slots[i];
        let Some(active) = slot.active.as_ref() else {
            return 0;
        };
        // The position after the token just added.
        let next_pos = slot.cached.len();
        [
            active.speculate,
            active.events.capacity().saturating_sub(EVENTS_PER_STEP),
            active
                .max_tokens
                .saturating_sub(active.generated)
                .saturating_sub(1),
            active.limit.saturating_sub(next_pos + 1),
            self.budget.batch.saturating_sub(rows),
        ]
        .into_iter()
        .min()
        .unwrap_or(0)
    }

    /// Samples row after row of slot `i`'s decode, from `first` (sampled from the row of the
    /// token it fed) through its drafted tokens: each drafted token the sampler also picks is
    /// taken, already in the cache, and the row after it is sampled in turn; the first that
    /// differs, or the one after the last drafted token, becomes the next token, as in a step
    /// without drafts. The cache then drops the drafted tokens not taken.
    fn verify(&mut self, i: usize, idx: i32, first: LlamaToken, drafts: Vec<LlamaToken>) {
        let fed = self.slots[i].cached.len() - drafts.len();
        self.slots[i].truncate(fed);
        let mut token = first;
        let mut taken = 0;
        for (row, draft) in (idx..).zip(drafts.iter().map(Some).chain([None])) {
            if row > idx {
                let Some(active) = self.slots[i].active.as_mut() else {
                    break;
                };
                token = active.sampler.sample(&self.ctx, row);
            }
            self.on_sampled(i, token);
            let slot = &mut self.slots[i];
            let Some(active) = slot.active.as_mut() else {
                break; // the answer ended with this token
            };
            if draft != Some(&token) {
                break;
            }
            active.next = None;
            slot.cached.push(token);
            taken += 1;
        }
        tracing::trace!(slot = i, drafted = drafts.len(), taken, "checked");
        self.metrics.draft_tokens.increment(drafts.len() as u64);
        self.metrics.draft_accepted.increment(taken as u64);
        let keep = self.slots[i].cached.len();
        if let Some(active) = self.slots[i].active.as_mut() {
            active
                .guesses
                .record(active.draft_matched, drafts.len(), taken);
        }
        if keep < fed + drafts.len() && !self.trim(i, keep) {
            // Unreachable for the models drafting is offered to (see `can_draft`).
            self.clear_seq(i);
            self.slots[i].truncate(0);
            self.fail_one(i, "could not drop a rejected draft");
        }
    }

    /// Ends slot `i`'s request with an engine error that no decode reported.
    fn fail_one(&mut self, i: usize, what: &str) {
        let plan = StepPlan {
            decode: vec![i],
            ..StepPlan::default()
        };
        self.fail(&plan, EngineError::Decode(what.into()));
    }

    /// Ends the requests of a failed plan with the error.
    fn fail(&mut self, plan: &StepPlan, error: EngineError) {
        tracing::error!(model = %self.name, error = %error, "decode failed");
        for i in plan.slots() {
            if let Some(a) = self.slots[i].active.as_ref() {
                if !a.send(TokenEvent::Error(error.clone())) {
                    tracing::debug!("client gone before the error reached it");
                }
            }
            self.release(i);
        }
    }

    /// Samples the next token for every sequence whose logits were computed this step. The
    /// logits of a prompt's last row are kept, for a request with the same prompt.
    fn sample(&mut self, plan: &StepPlan) {
        for i in plan.slots() {
            let slot = &mut self.slots[i];
            let Some(active) = slot.active.as_mut() else {
                continue;
            };
            let Some(idx) = active.logits_at.take() else {
                continue;
            };
            if slot.cached.len() == active.prompt.len() {
                let mut logits = slot.end.take().map(|e| e.logits).unwrap_or_default();
                logits.clear();
                logits.extend_from_slice(self.ctx.get_logits_ith(idx));
                if tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::debug!(model = %self.name, slot = i, prompt = active.prompt.len(), logits = %digest(&logits), "a prompt's last logits");
                }
                slot.end = Some(PromptEnd {
                    len: active.prompt.len(),
                    logits,
                    exact: active.read_exact,
                });
            }
            let token = active.sampler.sample(&self.ctx, idx);
            let drafts = std::mem::take(&mut active.drafts);
            if drafts.is_empty() {
                if let Some((matched, drafted, taken)) = active.shadow.next(&token) {
                    tracing::trace!(slot = i, matched, drafted, taken, "watched");
                    active.guesses.record(matched, drafted, taken);
                }
                self.on_sampled(i, token);
            } else {
                self.verify(i, idx, token, drafts);
            }
        }
    }

    /// Samples a request's first token from the logits its slot kept for the same prompt,
    /// as it would from a context's ([`sampler::Sampler::sample_logits`]).
    fn sample_kept(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let (Some(active), Some(end)) = (slot.active.as_mut(), slot.end.as_ref()) else {
            return;
        };
        match active.sampler.sample_logits(&end.logits) {
            Some(token) => self.on_sampled(i, token),
            None => {
                // Unreachable: every chain ends in a sampler that selects a token.
                self.fail_one(i, "the sampler selected no token");
            }
        }
    }

    /// Records the time to a request's first token, if this is it, and hands the token on.
    fn on_sampled(&mut self, i: usize, token: LlamaToken) {
        if let Some(active) = self.slots[i].active.as_mut() {
            if active.first_token_at.is_none() {
                let now = Instant::now();
                active.first_token_at = Some(now);
                self.metrics.time_to_first_token.record(
                    now.saturating_duration_since(active.submitted)
                        .as_secs_f64(),
                );
            }
        }
        self.on_token(i, token);
    }

    /// Turns a sampled token into output and decides whether the request goes on.
    fn on_token(&mut self, i: usize, token: LlamaToken) {
        let vocab = self.model.vocab();
        if vocab.is_eog(token) {
            self.finish(i, FinishReason::Stop);
            return;
        }
        self.metrics.completion_tokens.increment(1);
        self.piece.clear();
        vocab.token_to_piece_into(token, &mut self.piece, false, None);
        let cached = self.slots[i].cached.len();
        let Some(active) = self.slots[i].active.as_mut() else {
            return;
        };
        // Prompt plus answer may use the whole context: this token is the last if counting
        // it fills the request's share.
        let full_context = cached + 1 >= active.limit;
        active.generated += 1;
        let text = active.utf8.push(&self.piece);
        let (out, stopped) = match active.stops.push(&text) {
            StopScan::Emit(t) => (t, false),
            StopScan::Stopped(t) => (t, true),
        };
        if !out.is_empty() && !active.send(TokenEvent::Token(out)) {
            self.metrics.cancelled.increment(1);
            self.release(i);
            return;
        }
        if stopped {
            self.finish(i, FinishReason::Stop);
        } else if active.generated >= active.max_tokens || full_context {
            self.finish(i, FinishReason::Length);
        } else {
            active.next = Some(token);
        }
    }

    /// Sends the last text and the final event, then frees the slot (keeping its cache).
    fn finish(&mut self, i: usize, mut finish: FinishReason) {
        let Some(active) = self.slots[i].active.as_mut() else {
            return;
        };
        // Text held back for a possible stop string (or a dangling partial character)
        // belongs to the answer after all; it may still complete a stop string.
        let tail = active.utf8.finish();
        let mut out = match active.stops.push(&tail) {
            StopScan::Emit(t) => t,
            StopScan::Stopped(t) => {
                finish = FinishReason::Stop;
                t
            }
        };
        out.push_str(&active.stops.finish());
        let prompt_len = active.prompt.len();
        let now = Instant::now();
        let first = active.first_token_at.unwrap_or(now);
        let decoding = now.saturating_duration_since(first).as_secs_f64();
        if active.generated >= 2 && decoding > 0.0 {
            // Intervals between tokens: one fewer than the tokens.
            self.metrics
                .decode_rate
                .record((active.generated - 1) as f64 / decoding);
        }
        let done = TokenEvent::Done {
            finish,
            usage: Usage {
                prompt_tokens: prompt_len as u32,
                completion_tokens: active.generated as u32,
                cached_tokens: active.reused as u32,
            },
            timings: Timings {
                queued: active
                    .admitted_at
                    .saturating_duration_since(active.submitted),
                prompt_eval: first.saturating_duration_since(active.admitted_at),
                eval: now.saturating_duration_since(first),
            },
        };
        let delivered =
            (out.is_empty() || active.send(TokenEvent::Token(out))) && active.send(done);
        if !delivered {
            self.metrics.cancelled.increment(1);
        }
        self.release(i);
    }

    /// Frees a slot. Its KV cache stays for prefix reuse by a later request.
    fn release(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let answered = slot.active.as_ref().is_some_and(|a| a.reproducible);
        slot.reread = answered && self.options.reread_answers && slot.exact < slot.cached.len();
        slot.active = None;
        slot.last_used = self.step_no;
    }
}

/// What the decode calls of one step did: sequences decoded, tokens drafted, seconds.
#[derive(Debug, Default)]
struct StepDecode {
    decoded: usize,
    drafted: usize,
    secs: f64,
}

impl StepDecode {
    fn add(&mut self, other: StepDecode) {
        self.decoded += other.decoded;
        self.drafted += other.drafted;
        self.secs += other.secs;
    }
}

/// The prompt-chunk cap: the `configured` one, else [`crate::config::DEFAULT_PREFILL_CHUNK`]
/// on a CPU and the whole batch for a model that runs on a GPU; never above the batch.
fn prefill_chunk(configured: Option<u32>, on_gpu: bool, batch_size: usize) -> usize {
    let chunk = match configured {
        Some(n) => n as usize,
        None if on_gpu => batch_size,
        None => crate::config::DEFAULT_PREFILL_CHUNK as usize,
    };
    chunk.clamp(1, batch_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conversation as a stopped process left it in `dir`: `rows` bytes of rows.
    fn written(dir: &Path, tokens: i32, rows: usize) {
        let opened = Dir::open(dir).unwrap();
        let meta = Meta {
            format: 0,
            build: String::new(),
            family: "m.gguf|f16".into(),
            model: "m".into(),
            tokens: (0..tokens).collect(),
            exact: 0,
            starts: vec![0],
            segments: 0,
            first: 0,
            end: tokens as usize,
            ordered: true,
            bytes: 0,
        };
        let saved = opened
            .write(meta, |p| {
                std::fs::write(p, vec![0u8; rows]).map_err(|e| e.to_string())
            })
            .unwrap();
        opened.stopped();
        drop(saved);
    }

    /// The conversations' files in the folder (its lock file aside).
    fn files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|f| f.as_ref().unwrap().file_name() != "lock")
            .count()
    }

    #[test]
    fn a_cache_folder_keeps_its_files_when_the_process_ends_however_it_ends() {
        let dir = std::env::temp_dir().join(format!("backstop-ending-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        written(&dir, 8, 1000);
        written(&dir, 8, 1000);
        assert_eq!(files(&dir), 4);
        // Ended without a clean stop (an error before it served, a panic): the files stay.
        let cache = PromptCache::with_dir(1 << 20, &dir).unwrap();
        let clone = cache.clone();
        drop(cache);
        drop(clone);
        assert_eq!(files(&dir), 4);
        // While it runs, the limit drops the older conversation, and its files with it.
        let cache = PromptCache::with_dir(1500, &dir).unwrap();
        assert_eq!(files(&dir), 2);
        cache.stop();
        cache.stopped();
        drop(cache);
        assert_eq!(files(&dir), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_chunk_cap_is_the_configured_one_else_the_batch_on_a_gpu_and_128_on_a_cpu() {
        assert_eq!(prefill_chunk(None, false, 512), 128);
        assert_eq!(prefill_chunk(None, true, 512), 512);
        assert_eq!(prefill_chunk(Some(64), true, 512), 64, "a setting wins");
        assert_eq!(
            prefill_chunk(Some(1024), false, 512),
            512,
            "never above the batch"
        );
        assert_eq!(prefill_chunk(None, false, 32), 32);
        assert_eq!(prefill_chunk(Some(0), false, 512), 1);
    }
}
