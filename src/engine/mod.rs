//! The llama.cpp engine: one OS thread per loaded model owns the model and its context and
//! runs the decode loop; async handlers talk to it only through channels.

mod error;
mod loader;
mod metrics;
mod policy;
mod request;
mod sampler;
mod template;
mod text;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

pub use error::{EngineError, LoadError};
pub use loader::ModelInfo;
pub use request::{
    FinishReason, GenerateRequest, InvalidField, SamplingOverrides, SamplingParams, Timings,
    TokenEvent, Usage,
};
pub use template::{ChatMessage, ChatTemplate, Role, TemplateSource};

/// Room for this many undelivered events per request. A generating sequence whose client
/// lets this fill up skips decode steps until it reads again.
const EVENT_BUFFER: usize = 64;

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
    /// CPU threads for decoding and prompt processing.
    pub threads: u32,
    /// Most tokens evaluated in one step (`n_batch`).
    pub batch: u32,
    /// Most prompt tokens per step while other slots are generating.
    pub prefill_chunk: u32,
    /// Requests that may wait for a slot beyond the busy ones.
    pub max_queue: usize,
    /// Layers to offload to a GPU; `None` lets llama.cpp decide.
    pub gpu_layers: Option<u32>,
}

/// A job for the engine thread.
pub(crate) struct Job {
    request: GenerateRequest,
    events: mpsc::Sender<TokenEvent>,
    submitted: std::time::Instant,
}

/// Handle to a loaded model's engine thread. Dropping the last handle lets the thread
/// finish the requests it has and exit.
#[derive(Debug)]
pub struct Engine {
    /// Taken (and so closed) by [`Engine::shutdown`].
    jobs: std::sync::Mutex<Option<mpsc::UnboundedSender<Job>>>,
    admission: Arc<Semaphore>,
    info: Arc<ModelInfo>,
    worker: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// A running generation: a stream of [`TokenEvent`]s. Holding it holds a place in the
/// model's admission bound; dropping it cancels the generation within one decode step.
#[derive(Debug)]
pub struct Generation {
    events: mpsc::Receiver<TokenEvent>,
    _permit: OwnedSemaphorePermit,
}

impl Generation {
    /// The next event; `None` only if the engine vanished without a final event.
    pub async fn next(&mut self) -> Option<TokenEvent> {
        self.events.recv().await
    }
}

impl Engine {
    /// Starts the engine thread, loads the model there and waits until it is ready to serve.
    pub async fn load(options: EngineOptions) -> Result<Engine, LoadError> {
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let slots = options.slots as usize;
        let max_queue = options.max_queue;
        let worker = std::thread::Builder::new()
            .name(format!("engine_worker:{}", options.name))
            .spawn(move || worker::engine_worker(options, jobs_rx, ready_tx))
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
        let sent = match self.jobs.lock() {
            Ok(jobs) => jobs.as_ref().is_some_and(|j| j.send(job).is_ok()),
            Err(_) => false,
        };
        if !sent {
            return Err(EngineError::Stopped);
        }
        Ok(Generation {
            events: rx,
            _permit: permit,
        })
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
    loader::check_file(path)
}
