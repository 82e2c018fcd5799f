//! Everything that can go wrong between a handler and the engine thread. The APIs turn
//! these into their own error shapes in exactly one place each.

use std::path::PathBuf;

/// Why a model could not be loaded. Reported before the model is ever served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The path does not exist or cannot be opened.
    #[error("cannot open model file {path}: {source}")]
    Open {
        /// The configured path.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The file is not a GGUF file at all.
    #[error("{path} is not a GGUF model file (it does not start with the GGUF magic bytes)")]
    NotGguf {
        /// The configured path.
        path: PathBuf,
    },
    /// A part of a model split over several files other than its first, or a first part
    /// whose other parts are not all beside it.
    #[error("{path}: {reason}")]
    Split {
        /// The configured path.
        path: PathBuf,
        /// Which part it is, or which are missing.
        reason: String,
    },
    /// llama.cpp refused the file: corrupt, truncated, or an unsupported architecture.
    #[error("llama.cpp could not load {path}: the file is corrupt, truncated, or of an unsupported architecture (llama.cpp's own reason is logged just above)")]
    Rejected {
        /// The configured path.
        path: PathBuf,
    },
    /// The model loaded but a context of the requested size could not be created.
    #[error("cannot create a context of {n_ctx} tokens for {slots} slots: {reason}")]
    Context {
        /// Total context cells requested.
        n_ctx: u32,
        /// Parallel sequences requested.
        slots: u32,
        /// llama.cpp's error.
        reason: String,
    },
    /// llama.cpp loads the file but aborted computing it in a probe ([`super::probe`]).
    #[error("llama.cpp loads {path} but cannot compute it: {reason} (tensors that llama.cpp's own tools always write as F32 are not: {tensors})")]
    Uncomputable {
        /// The configured path.
        path: PathBuf,
        /// llama.cpp's message.
        reason: String,
        /// The tensors in an odd type, named and counted.
        tensors: String,
    },
    /// The GGUF's chat template cannot be compiled.
    #[error("chat template: {0}")]
    Template(String),
    /// The engine thread could not be started or died while loading.
    #[error("the engine thread stopped while loading the model")]
    Thread,
}

/// Why a generation could not run or stopped early.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EngineError {
    /// Every slot is busy and the waiting queue is at its bound.
    #[error("server busy: all {slots} slots are in use and {queued} requests are already waiting; retry shortly")]
    QueueFull {
        /// Parallel slots of the model.
        slots: usize,
        /// Requests waiting.
        queued: usize,
    },
    /// The prompt does not fit into one slot's context.
    #[error("the prompt is {tokens} tokens long, but a request to this model may use at most {limit} tokens of context (prompt plus at least one generated token)")]
    PromptTooLong {
        /// Prompt length in tokens.
        tokens: usize,
        /// Context tokens per slot.
        limit: usize,
    },
    /// The prompt tokenized to nothing.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The grammar of a structured-output request could not be used.
    #[error("the output grammar was refused: {0}")]
    Grammar(String),
    /// An embedding input is empty (or tokenized to nothing).
    #[error("input {index} is empty")]
    EmptyInput {
        /// Position of the input in the request (0 for a single one).
        index: usize,
    },
    /// An embedding input is longer than the model embeds, and truncation was not allowed.
    #[error("input {index} is {tokens} tokens long, but this model embeds at most {limit} tokens per input; shorten it or allow truncation")]
    InputTooLong {
        /// Position of the input in the request.
        index: usize,
        /// Its length in tokens.
        tokens: usize,
        /// Most tokens per input.
        limit: usize,
    },
    /// The embedding context could not be created or was asked for something it was not
    /// built for.
    #[error("cannot compute embeddings: {0}")]
    Embeddings(String),
    /// llama.cpp failed to evaluate this request's tokens.
    #[error("llama.cpp failed to evaluate this request: {0}")]
    Decode(String),
    /// The engine thread is gone (shutting down or crashed).
    #[error("the model's engine has stopped")]
    Stopped,
}
