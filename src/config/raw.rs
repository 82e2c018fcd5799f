//! The TOML file exactly as written. Unknown keys are errors, so a typo never silently
//! falls back to a default.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::engine::SamplingOverrides;

/// A whole `models.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) server: RawServer,
    #[serde(default)]
    pub(crate) models: BTreeMap<String, RawModel>,
    #[serde(default)]
    pub(crate) router: super::router::RawRouter,
    #[serde(default)]
    pub(crate) security: super::security::RawSecurity,
}

/// A duration written as a string (`"5m"`) or a number of seconds (`-1`, `300`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawDuration {
    Seconds(f64),
    Text(String),
}

/// `[server]`: process-wide settings and defaults for every model.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub(crate) host: Option<String>,
    pub(crate) parallel: Option<u32>,
    pub(crate) ctx: Option<u32>,
    pub(crate) threads: Option<u32>,
    /// Threads for prompts and steps of several tokens (absent: `threads`).
    pub(crate) threads_batch: Option<u32>,
    /// Layers per model offloaded to the GPU (0: none; absent: all).
    pub(crate) gpu_layers: Option<u32>,
    pub(crate) max_queue: Option<usize>,
    pub(crate) batch: Option<u32>,
    pub(crate) prefill_chunk: Option<u32>,
    pub(crate) max_body_bytes: Option<usize>,
    pub(crate) insecure: Option<bool>,
    /// How long an idle model stays loaded.
    pub(crate) keep_alive: Option<RawDuration>,
    /// Most models resident at once.
    pub(crate) max_loaded: Option<usize>,
    /// The model store (Ollama's layout).
    pub(crate) models_dir: Option<String>,
    /// llama.cpp flash attention: true, false, or absent for the default (off on a CPU;
    /// llama.cpp's choice on a GPU).
    pub(crate) flash_attention: Option<bool>,
    /// KV cache element type: f16, q8_0 or q4_0.
    pub(crate) kv_cache_type: Option<String>,
    /// Sliding-window layers keep the whole context in their cache (llama.cpp's `swa_full`).
    pub(crate) swa_full: Option<bool>,
    /// Model files are mapped (true, the default) or read into memory.
    pub(crate) mmap: Option<bool>,
    /// Model weights are locked in RAM.
    pub(crate) mlock: Option<bool>,
    /// Most tokens drafted by prompt lookup per step (0: off).
    pub(crate) speculate: Option<u32>,
    /// MiB of host memory for conversations the slots gave up, all models together (0: none).
    pub(crate) cache_ram: Option<u32>,
    /// The folder the prompt cache outlives the process in.
    pub(crate) cache_dir: Option<String>,
    /// Greedy and seeded answers are read again while idle, for the next turn to reuse.
    pub(crate) reread_answers: Option<bool>,
    /// Greedy and seeded requests reuse only rows a cold read computes alike.
    pub(crate) exact_reuse: Option<bool>,
    /// Two calls for sequences at very different depths: `auto`, `on` or `off`.
    pub(crate) depth_split: Option<String>,
    /// Where llama.cpp's threads run over NUMA nodes: `distribute`, `isolate`, `numactl`.
    pub(crate) numa: Option<String>,
    /// Extra browser origins allowed by CORS, like OLLAMA_ORIGINS.
    pub(crate) origins: Option<Vec<String>>,
    /// PEM certificate chain for TLS.
    pub(crate) tls_cert: Option<String>,
    /// PEM private key for TLS.
    pub(crate) tls_key: Option<String>,
    /// PEM CA bundle: client certificates required (mTLS).
    pub(crate) client_ca: Option<String>,
}

/// `[models.NAME]`: one served model, like an Ollama Modelfile.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    /// A local GGUF file.
    pub(crate) path: Option<String>,
    /// Or a Hugging Face file, pinned: `repo` + `file`, optionally `revision` and `sha256`.
    pub(crate) repo: Option<String>,
    pub(crate) file: Option<String>,
    pub(crate) revision: Option<String>,
    pub(crate) sha256: Option<String>,
    /// Other names that mean this model (e.g. `gpt-4o-mini`).
    #[serde(default)]
    pub(crate) aliases: Vec<String>,
    pub(crate) parallel: Option<u32>,
    pub(crate) ctx: Option<u32>,
    pub(crate) threads: Option<u32>,
    pub(crate) threads_batch: Option<u32>,
    pub(crate) gpu_layers: Option<u32>,
    /// Flash attention for this model, over `[server]`'s (a flag or variable beats both).
    pub(crate) flash_attention: Option<bool>,
    /// Most tokens drafted by prompt lookup per step for this model, over `[server]`'s.
    pub(crate) speculate: Option<u32>,
    /// Two calls for streams at very different depths, for this model, over `[server]`'s.
    pub(crate) depth_split: Option<String>,
    /// This model's file mapped or read, over `[server]`'s (`--no-mmap` beats both).
    pub(crate) mmap: Option<bool>,
    /// This model's weights locked in RAM, over `[server]`'s (`--mlock` beats both).
    pub(crate) mlock: Option<bool>,
    /// How long this model stays loaded when idle.
    pub(crate) keep_alive: Option<RawDuration>,
    /// System prompt used when a chat request brings none.
    pub(crate) system: Option<String>,
    /// Default answer length limit.
    pub(crate) max_tokens: Option<u32>,
    /// Default stop strings.
    #[serde(default)]
    pub(crate) stop: Vec<String>,
    /// Default sampling options (`[models.NAME.options]`), same names as the APIs.
    #[serde(default)]
    pub(crate) options: SamplingOverrides,
}
