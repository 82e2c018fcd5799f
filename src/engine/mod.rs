//! The llama.cpp engine: one OS thread per loaded model owns the model and its context and
//! runs the decode loop; async handlers talk to it only through channels.

mod compute;
mod depths;
mod embed;
mod error;
mod graphs;
mod loader;
mod lookup;
mod metrics;
pub mod numa;
mod persist;
mod policy;
pub mod probe;
mod request;
mod rows;
mod sampler;
mod spare;
mod stash;
pub(crate) use sampler::greedy;
mod template;
mod text;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

pub use compute::{compute, Compute, Device};
pub use depths::SplitMode;
pub use embed::{l2_normalize, shorten, EmbedShape, Embeddings};
pub(crate) use embed::{output_layer_name, skip_output_product};
pub use error::{EngineError, LoadError};
pub(crate) use loader::{
    backend, context_params, forget_all, resolve_flash_attention, sliding_window,
};
pub use loader::{Fim, ModelInfo};
pub use request::{
    Drafts, FinishReason, GenerateRequest, InvalidField, Overflow, SamplingOverrides,
    SamplingParams, Timings, TokenEvent, Usage,
};
pub use template::{fallback_for, ChatMessage, ChatTemplate, Role, TemplateSource};
pub use worker::PromptCache;

/// Room for this many undelivered events per request. A generating sequence whose client
/// lets this fill up skips decode steps until it reads again.
const EVENT_BUFFER: usize = 64;

/// The most tokens `--speculate` may draft per step: a longer draft is almost never all
/// accepted, and its rows would cost more than they save (see [`lookup`]).
pub const MAX_SPECULATE: u32 = 32;

/// How to load and run one model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The name clients use for the model.
    pub name: String,
    /// The GGUF file.
    pub path: PathBuf,
    /// Parallel sequences (slots) sharing the context.
    pub slots: u32,
    /// Context tokens per slot; `None` uses 4096, capped at the model's training context.
    pub ctx_per_slot: Option<u32>,
    /// CPU threads for steps of one token.
    pub threads: u32,
    /// CPU threads for prompts and steps of several tokens.
    pub threads_batch: u32,
    /// Most tokens evaluated in one step (`n_batch`).
    pub batch: u32,
    /// Most prompt tokens per step while other slots are generating; `None`:
    /// [`crate::config::DEFAULT_PREFILL_CHUNK`] on a CPU, the batch on a GPU.
    pub prefill_chunk: Option<u32>,
    /// Requests that may wait for a slot beyond the busy ones.
    pub max_queue: usize,
    /// Layers to offload to a GPU; `None` lets llama.cpp decide.
    pub gpu_layers: Option<u32>,
    /// Flash attention forced on or off; `None`: off on a CPU, llama.cpp's choice on a GPU
    /// (see [`loader::flash_attention`]).
    pub flash_attention: Option<bool>,
    /// Element type of the KV cache (a quantized one halves or quarters its memory).
    pub kv_cache_type: KvCacheType,
    /// Sliding-window layers (Gemma 2 and 3, gpt-oss, ...) keep every position of the context
    /// in their cache instead of their window and one batch: llama.cpp's `swa_full`, off by
    /// default as in llama.cpp's server.
    pub swa_full: bool,
    /// Most tokens a generating sequence drafts by prompt lookup per step (0: off; see
    /// [`lookup`]).
    pub speculate: u32,
    /// While every model is idle, the answer of a greedy or seeded request is read again as a
    /// cold read of its conversation reads it, so the next turn reuses it (see
    /// `worker::Worker::reread_step`).
    pub reread_answers: bool,
    /// A greedy or seeded request reuses only cache rows read as a cold read reads them, so
    /// its answer is the one a cold server gives; false: it reuses all it shares, as a
    /// sampled one does (`policy::Reuse`).
    pub exact_reuse: bool,
    /// Whether generating sequences at very different depths decode in two calls: as
    /// measured faster, always, or never (see `depths`).
    pub depth_split: SplitMode,
    /// The model file is mapped (llama.cpp's `use_mmap`), not read into memory.
    pub mmap: bool,
    /// The model's weights are locked in RAM (llama.cpp's `use_mlock`).
    pub mlock: bool,
}

/// KV cache element types Ollama's `OLLAMA_KV_CACHE_TYPE` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheType {
    /// 16-bit floats: llama.cpp's default, full quality.
    F16,
    /// 8-bit: half the memory, hardly any quality loss.
    Q8_0,
    /// 4-bit: a quarter of the memory, some quality loss.
    Q4_0,
}

impl KvCacheType {
    /// Parses `f16`, `q8_0` or `q4_0` (any case).
    pub fn parse(text: &str) -> Option<KvCacheType> {
        let text = text.trim();
        [KvCacheType::F16, KvCacheType::Q8_0, KvCacheType::Q4_0]
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(text))
    }

    /// The name [`KvCacheType::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheType::F16 => "f16",
            KvCacheType::Q8_0 => "q8_0",
            KvCacheType::Q4_0 => "q4_0",
        }
    }
}

/// A generation for the engine thread.
pub(crate) struct Job {
    request: GenerateRequest,
    events: mpsc::Sender<TokenEvent>,
    submitted: std::time::Instant,
}

/// What handlers send to the engine thread: both kinds share one channel so that the
/// thread has a single place to wait while idle.
pub(crate) enum Work {
    /// A generation, streamed token by token.
    Generate(Job),
    /// Embedding vectors, answered once.
    Embed(embed::EmbedJob),
}

/// Handle to a loaded model's engine thread. Dropping the last handle lets the thread
/// finish the requests it has and exit.
#[derive(Debug)]
pub struct Engine {
    /// Taken (and so closed) by [`Engine::shutdown`].
    jobs: std::sync::Mutex<Option<mpsc::UnboundedSender<Work>>>,
    admission: Arc<Semaphore>,
    info: Arc<ModelInfo>,
    worker: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// A running generation: a stream of [`TokenEvent`]s. Holding it holds a place in the
/// model's admission bound; dropping it cancels the generation within one decode step.
pub struct Generation {
    events: mpsc::Receiver<TokenEvent>,
    _permit: OwnedSemaphorePermit,
    /// Whatever must live exactly as long as the generation (the model's lease, which
    /// keeps it from being unloaded under a running answer).
    _guard: Option<Box<dyn Send>>,
    /// Sees every event as it is read (the audit log learns the token counts this way).
    observer: Option<Observer>,
}

/// A function that sees a generation's events as they are read.
type Observer = Box<dyn FnMut(&TokenEvent) + Send>;

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation").finish_non_exhaustive()
    }
}

impl Generation {
    /// The next event; `None` only if the engine vanished without a final event.
    pub async fn next(&mut self) -> Option<TokenEvent> {
        let event = self.events.recv().await;
        if let (Some(e), Some(o)) = (&event, self.observer.as_mut()) {
            o(e);
        }
        event
    }

    /// Lets `f` see every event as it is read.
    pub fn observe(mut self, f: impl FnMut(&TokenEvent) + Send + 'static) -> Generation {
        self.observer = Some(Box::new(f));
        self
    }

    /// Keeps `guard` alive until the generation is dropped.
    pub fn holding(mut self, guard: Box<dyn Send>) -> Generation {
        self._guard = Some(guard);
        self
    }
}

impl Engine {
    /// Starts the engine thread, loads the model there and waits until it is ready to serve.
    /// The conversations its slots give up are kept in `cache`, which every model shares.
    pub async fn load(options: EngineOptions, cache: PromptCache) -> Result<Engine, LoadError> {
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let slots = options.slots as usize;
        let max_queue = options.max_queue;
        let worker = std::thread::Builder::new()
            .name(format!("engine_worker:{}", options.name))
            .spawn(move || worker::engine_worker(options, cache, jobs_rx, ready_tx))
            .map_err(|_| LoadError::Thread)?;
        let info = ready_rx.await.map_err(|_| LoadError::Thread)??;
        Ok(Engine {
            jobs: std::sync::Mutex::new(Some(jobs_tx)),
            admission: Arc::new(Semaphore::new(slots + max_queue)),
            info: Arc::new(info),
            worker: std::sync::Mutex::new(Some(worker)),
        })
    }

    /// What was loaded.
    pub fn info(&self) -> &Arc<ModelInfo> {
        &self.info
    }

    /// Queues a generation. Fails at once with [`EngineError::QueueFull`] when every slot is
    /// busy and the waiting queue is at its bound, so callers can answer 503 immediately.
    pub fn submit(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let permit = Arc::clone(&self.admission)
            .try_acquire_owned()
            .map_err(|_| EngineError::QueueFull {
                slots: self.info.slots as usize,
                queued: self.info.max_queue,
            })?;
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let job = Job {
            request,
            events: tx,
            submitted: std::time::Instant::now(),
        };
        self.send(Work::Generate(job))?;
        Ok(Generation {
            events: rx,
            _permit: permit,
            _guard: None,
            observer: None,
        })
    }

    /// Pooled embedding vectors (not normalized) of `inputs`, computed on the engine thread
    /// between decode steps, so running generations keep streaming. Each input must be
    /// non-empty; one longer than [`ModelInfo::embedding_tokens`] is cut to that length when
    /// `truncate` is set and refused otherwise. An embedding request takes a place in the
    /// same admission bound as a generation ([`EngineError::QueueFull`] when it is full);
    /// dropping the future abandons the work.
    pub async fn embed(
        &self,
        inputs: Vec<String>,
        truncate: bool,
    ) -> Result<Embeddings, EngineError> {
        let _permit = Arc::clone(&self.admission)
            .try_acquire_owned()
            .map_err(|_| EngineError::QueueFull {
                slots: self.info.slots as usize,
                queued: self.info.max_queue,
            })?;
        let (reply, answer) = oneshot::channel();
        self.send(Work::Embed(embed::EmbedJob {
            inputs,
            truncate,
            reply,
        }))?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    fn send(&self, work: Work) -> Result<(), EngineError> {
        let sent = match self.jobs.lock() {
            Ok(jobs) => jobs.as_ref().is_some_and(|j| j.send(work).is_ok()),
            Err(_) => false,
        };
        if sent {
            Ok(())
        } else {
            Err(EngineError::Stopped)
        }
    }

    /// Stops accepting work and waits for the thread to finish what it has. Blocks: call it
    /// from a blocking context.
    pub fn shutdown(&self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        let handle = self.worker.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("engine thread panicked during shutdown");
            }
        }
    }
}

/// Checks that a file exists and is a GGUF, returning its size; used by config validation
/// so a wrong path fails before the server binds.
pub fn check_model_file(path: &std::path::Path) -> Result<u64, LoadError> {
    loader::check_file(path).map(|(size, _)| size)
}
