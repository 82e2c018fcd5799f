//! Configuration: the TOML catalogue, `BACKSTOP_*` variables and flags merged into one
//! validated [`Config`]. Every error names where the bad value came from, the key, and what
//! was expected, and is reported before any port is bound.

pub(crate) mod cgroup;
pub mod cores;
mod duration;
mod memory;
mod raw;
pub mod router;
pub mod security;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::cli::ServeArgs;
use crate::engine::numa::Numa;
use crate::engine::{self, EngineOptions, KvCacheType, SamplingOverrides, SplitMode};
use crate::models::{Digest, ModelName};
pub use duration::{parse_go_duration, parse_timeout, KeepAlive};
use raw::{RawConfig, RawDuration, RawModel};
pub use router::{BreakerConfig, RouteMode, RouterConfig, UpstreamConfig, UpstreamKind};

/// The port Ollama uses; clients default to it.
pub const DEFAULT_PORT: u16 = 11434;
/// File name of the default model the setup step fetches.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Name the default model is served under.
pub const DEFAULT_MODEL_NAME: &str = "smollm2";

const DEFAULT_PARALLEL: u32 = 4;
/// Why a quantized KV cache with flash attention turned off is refused.
const NEEDS_FLASH: &str = "a quantized KV cache needs flash attention; do not turn it off";
const DEFAULT_MAX_QUEUE: usize = 512;
/// Most tokens in one decode (llama.cpp's `n_batch` and `n_ubatch`), as llama.cpp's server.
pub const DEFAULT_BATCH: u32 = 512;
/// Most prompt tokens read per step while others generate, on a CPU; on a GPU, the batch
/// (see [`EngineDefaults::prefill_chunk`]).
pub const DEFAULT_PREFILL_CHUNK: u32 = 128;
const DEFAULT_MAX_BODY: usize = 8 * 1024 * 1024;
const MIB: usize = 1024 * 1024;
/// Ollama's default for CPU machines (three models resident).
const DEFAULT_MAX_LOADED: usize = 3;
const MAX_STOP_STRINGS: usize = 16;
const FLAGS: &str = "command line / environment";

/// A configuration problem, reported before serving.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has keys or types we do not know.
    #[error("config error in {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, which names the line and key.
        message: String,
    },
    /// A value is out of range or refers to something missing.
    #[error("config error in {origin}: `{key}`: {message}")]
    Invalid {
        /// The file, or "command line / environment".
        origin: String,
        /// The key, e.g. `models.smollm2.path`.
        key: String,
        /// What was expected.
        message: String,
    },
}

/// Process-wide server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Listening beyond loopback without authentication was explicitly allowed.
    pub insecure: bool,
    /// Browser origins allowed by CORS beyond the loopback ones (OLLAMA_ORIGINS).
    pub origins: Vec<String>,
}

/// How models come and go.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// How long an idle model stays loaded when neither the request nor the model says.
    pub keep_alive: KeepAlive,
    /// Most models resident at once; the least recently used idle one makes room.
    pub max_loaded: usize,
}

/// Engine settings for models that do not set their own (every store model).
#[derive(Debug, Clone)]
pub struct EngineDefaults {
    /// Parallel slots.
    pub slots: u32,
    /// Context per slot; `None` = 4096 capped at the model's training context.
    pub ctx_per_slot: Option<u32>,
    /// CPU threads.
    pub threads: u32,
    /// CPU threads for prompts and steps of several tokens; `None`: [`Self::threads`].
    pub threads_batch: Option<u32>,
    /// Layers offloaded to the GPU; `None` = llama.cpp's default, all of them.
    pub gpu_layers: Option<u32>,
    /// Tokens per decode call.
    pub batch: u32,
    /// Prompt tokens per step while others generate; `None`: [`DEFAULT_PREFILL_CHUNK`] on a
    /// CPU and the whole batch for a model on a GPU, where a decode step takes a millisecond
    /// or two and each chunk is a llama.cpp call of its own: on an H200, 128-token chunks made
    /// four clients arriving together wait 123 ms for their first tokens where llama-server
    /// took 63 (the pace still keeps a chunk to what the measured costs allow).
    pub prefill_chunk: Option<u32>,
    /// Waiting requests beyond the busy slots.
    pub max_queue: usize,
    /// Flash attention: forced on/off, or `None` for the default (off on a CPU; llama.cpp's
    /// choice on a GPU).
    pub flash_attention: Option<bool>,
    /// KV cache element type.
    pub kv_cache_type: KvCacheType,
    /// Sliding-window layers keep the whole context in their cache.
    pub swa_full: bool,
    /// The model file is mapped, not read into memory.
    pub mmap: bool,
    /// The model's weights are locked in RAM.
    pub mlock: bool,
    /// Most tokens a generating sequence drafts by prompt lookup per step (0: off).
    pub speculate: u32,
    /// Bytes of host memory for conversations the slots gave up, shared by every loaded
    /// model (see [`crate::engine::PromptCache`]).
    pub cache_ram: usize,
    /// The folder the prompt cache outlives the process in (`--cache-dir`): a model that stops
    /// (it unloads, or the server stops) writes its kept conversations there, and its next
    /// load or the next start reads them back.
    pub cache_dir: Option<PathBuf>,
    /// Greedy and seeded answers are read again while idle, for the next turn to reuse.
    pub reread_answers: bool,
    /// Greedy and seeded requests reuse only rows a cold read computes alike.
    pub exact_reuse: bool,
    /// Generating sequences at very different depths decode in two calls as measured faster,
    /// always, or never.
    pub depth_split: SplitMode,
    /// Where llama.cpp's threads run over NUMA nodes, for the whole process.
    pub numa: Numa,
}

impl EngineDefaults {
    /// Engine options for a model file, with this model's own overrides.
    pub fn options(&self, name: &ModelName, path: PathBuf, ctx: Option<u32>) -> EngineOptions {
        EngineOptions {
            name: name.to_string(),
            path,
            slots: self.slots,
            ctx_per_slot: ctx.or(self.ctx_per_slot),
            threads: self.threads,
            threads_batch: self.threads_batch.unwrap_or(self.threads),
            batch: self.batch,
            prefill_chunk: self.prefill_chunk,
            max_queue: self.max_queue,
            gpu_layers: self.gpu_layers,
            flash_attention: self.flash_attention,
            kv_cache_type: self.kv_cache_type,
            swa_full: self.swa_full,
            mmap: self.mmap,
            mlock: self.mlock,
            speculate: self.speculate,
            reread_answers: self.reread_answers,
            exact_reuse: self.exact_reuse,
            depth_split: self.depth_split,
        }
    }
}

/// Per-model request defaults, like an Ollama Modelfile's PARAMETER and SYSTEM lines.
#[derive(Debug, Clone, Default)]
pub struct ModelDefaults {
    /// System prompt for chats that bring none.
    pub system: Option<String>,
    /// Sampling defaults.
    pub sampling: SamplingOverrides,
    /// Answer length limit when a request sets none.
    pub max_tokens: Option<u32>,
    /// Stop strings when a request sets none.
    pub stop: Vec<String>,
    /// How long the model stays loaded when idle, unless the request says.
    pub keep_alive: Option<KeepAlive>,
}

/// One model named in the configuration (flags or models.toml).
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Its name.
    pub name: ModelName,
    /// Other names that mean it.
    pub aliases: Vec<ModelName>,
    /// How to run it.
    pub engine: EngineOptions,
    /// Request defaults.
    pub defaults: ModelDefaults,
    /// The pinned sha256 of the file, if the configuration gives one.
    pub sha256: Option<Digest>,
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Server settings.
    pub server: ServerConfig,
    /// Model lifecycle.
    pub lifecycle: Lifecycle,
    /// Engine settings for store models.
    pub engine: EngineDefaults,
    /// The model store (Ollama's layout).
    pub store_dir: PathBuf,
    /// Configured models, in the order they are preloaded (fallbacks of the router first,
    /// then name order).
    pub models: Vec<ModelConfig>,
    /// Cloud upstreams and failover.
    pub router: RouterConfig,
    /// Keys, limits, TLS, audit.
    pub security: security::SecurityConfig,
}

/// Where backstop keeps its cache (models, downloads): `BACKSTOP_CACHE` or
/// `~/.cache/backstop`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BACKSTOP_CACHE") {
        return PathBuf::from(dir);
    }
    home().join(".cache").join("backstop")
}

/// Where the setup step puts the test models: `BACKSTOP_MODELS` or `<cache>/models`.
pub fn fetched_models_dir() -> PathBuf {
    std::env::var_os("BACKSTOP_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models"))
}

/// llama.cpp threads when none are asked for: the physical cores this process may use, within
/// its CPU mask and quota ([`cores`]; llama.cpp's own default is 4 whatever the machine).
pub fn default_threads() -> u32 {
    u32::try_from(cores::usable().physical).unwrap_or(1).max(1)
}

/// The model store: `BACKSTOP_MODELS`, else `OLLAMA_MODELS` (so an existing Ollama store is
/// served as it is), else `<cache>/models`.
pub fn default_store_dir() -> PathBuf {
    std::env::var_os("BACKSTOP_MODELS")
        .or_else(|| std::env::var_os("OLLAMA_MODELS"))
        .map(|d| resolve_path(&d.to_string_lossy(), Path::new(".")))
        .unwrap_or_else(|| cache_dir().join("models"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Expands a leading `~/` and resolves relative paths against `base`.
fn resolve_path(raw: &str, base: &Path) -> PathBuf {
    if let Some(rest) = raw.strip_prefix("~/") {
        return home().join(rest);
    }
    let p = PathBuf::from(raw);
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

/// Parses a listen address the way `OLLAMA_HOST` is written: `ADDR:PORT`, `ADDR`, `:PORT`,
/// optionally with an `http://` prefix; `localhost` means 127.0.0.1.
pub fn parse_host(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    let t = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
        .unwrap_or(t)
        .trim_end_matches('/');
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if t.is_empty() {
        return Ok(SocketAddr::new(loopback, DEFAULT_PORT));
    }
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = t.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let (host, port) = match t.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{p}` is not a port number"))?,
        ),
        None => (t, DEFAULT_PORT),
    };
    match host {
        "" | "localhost" => Ok(SocketAddr::new(loopback, port)),
        _ => Err(format!(
            "expected ADDR:PORT with an IP address (e.g. 127.0.0.1:11434), got `{text}`"
        )),
    }
}

/// `NAME=PATH`, or a bare `PATH` named after its file stem.
fn parse_model_flag(flag: &str) -> Result<(String, PathBuf), String> {
    if let Some((name, path)) = flag.split_once('=') {
        return Ok((name.to_owned(), PathBuf::from(path)));
    }
    let path = PathBuf::from(flag);
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("cannot take a model name from `{flag}`; write NAME=PATH"))?;
    Ok((stem.to_owned(), path))
}

/// An `OLLAMA_*` variable, the fallback below flags and `BACKSTOP_*` variables.
fn ollama_env(name: &str) -> Option<(String, String)> {
    let key = format!("OLLAMA_{name}");
    std::env::var(&key)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| (v, key))
}

fn parse_env<T: std::str::FromStr>(name: &str) -> Result<Option<T>, ConfigError> {
    match ollama_env(name) {
        None => Ok(None),
        Some((v, key)) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ConfigError::Invalid {
                origin: "environment".into(),
                key,
                message: format!("`{v}` is not a valid number"),
            }),
    }
}

/// Ollama's boolean spelling: 1/true/yes/on and 0/false/no/off.
pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn keep_alive_of(raw: &RawDuration) -> Result<KeepAlive, String> {
    match raw {
        RawDuration::Seconds(s) => KeepAlive::from_seconds(*s),
        RawDuration::Text(t) => KeepAlive::parse(t),
    }
}

/// A flag or `BACKSTOP_*` value, else the `OLLAMA_*` one, else the file's, with where it came from.
fn layered<T>(
    flag: Option<T>,
    ollama: Option<T>,
    file: Option<T>,
    origin: &str,
) -> (Option<T>, String) {
    match (flag, ollama, file) {
        (Some(v), _, _) => (Some(v), FLAGS.to_owned()),
        (None, Some(v), _) => (Some(v), "environment (OLLAMA_*)".to_owned()),
        (None, None, v) => (v, origin.to_owned()),
    }
}

/// `text` as `parse` reads it, or the error naming where it was given (`from`, `key`) and the
/// `words` it may be.
fn one_of<T>(
    text: &str,
    parse: fn(&str) -> Option<T>,
    words: &str,
    from: &str,
    key: &str,
) -> Result<T, ConfigError> {
    parse(text).ok_or_else(|| ConfigError::Invalid {
        origin: from.to_owned(),
        key: key.to_owned(),
        message: format!("`{text}` is not one of {words}"),
    })
}

impl Config {
    /// Builds the configuration for `serve` from flags/environment and the optional file.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let (mut raw, origin, base) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                let base = path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."));
                (raw, path.display().to_string(), base)
            }
            None => (RawConfig::default(), FLAGS.to_owned(), PathBuf::from(".")),
        };
        let security_origins = raw.security.cors_origins.take();
        let invalid = |origin: &str, key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        let positive =
            |v: Option<u32>, key: &str, from: &str| -> Result<Option<u32>, ConfigError> {
                match v {
                    Some(0) => Err(invalid(from, key, "must be at least 1".into())),
                    other => Ok(other),
                }
            };

        // Listening address and the safety rule that goes with it.
        let (host_text, host_origin) = layered(
            args.host.clone(),
            ollama_env("HOST").map(|v| v.0),
            raw.server.host.clone(),
            &origin,
        );
        let listen = parse_host(host_text.as_deref().unwrap_or(""))
            .map_err(|m| invalid(&host_origin, "host", m))?;
        let insecure = args.insecure || raw.server.insecure.unwrap_or(false);

        // Engine defaults: flag/BACKSTOP_* > OLLAMA_* > [server] > built-in.
        let (parallel, from) = layered(
            args.parallel,
            parse_env("NUM_PARALLEL")?,
            raw.server.parallel,
            &origin,
        );
        let slots = positive(parallel, "parallel", &from)?;
        let (ctx, from) = layered(
            args.ctx,
            parse_env("CONTEXT_LENGTH")?,
            raw.server.ctx,
            &origin,
        );
        let ctx = positive(ctx, "ctx", &from)?;
        let threads = positive(args.threads, "threads", FLAGS)?.or(positive(
            raw.server.threads,
            "server.threads",
            &origin,
        )?);
        let threads_batch = positive(args.threads_batch, "threads-batch", FLAGS)?.or(positive(
            raw.server.threads_batch,
            "server.threads_batch",
            &origin,
        )?);
        // 0 is a setting here (no layer on the GPU), so not `positive`.
        let gpu_layers = args.gpu_layers.or(raw.server.gpu_layers);
        let batch = positive(args.batch, "batch", FLAGS)?
            .or(positive(raw.server.batch, "server.batch", &origin)?)
            .unwrap_or(DEFAULT_BATCH);
        let prefill_chunk = positive(args.prefill_chunk, "prefill-chunk", FLAGS)?
            .or(positive(
                raw.server.prefill_chunk,
                "server.prefill_chunk",
                &origin,
            )?)
            .map(|chunk| chunk.min(batch));
        let (max_queue, _) = layered(
            args.max_queue,
            parse_env("MAX_QUEUE")?,
            raw.server.max_queue,
            &origin,
        );
        let max_body_bytes = args
            .max_body_bytes
            .or(raw.server.max_body_bytes)
            .unwrap_or(DEFAULT_MAX_BODY);
        // A boolean given as text (a flag or a variable), refused naming where it came from.
        let switch = |text: Option<&str>, from: &str, key: &str| match text {
            Some(v) => parse_bool(v).map(Some).ok_or_else(|| {
                invalid(
                    from,
                    key,
                    format!("`{v}` is not a boolean (1/0, true/false)"),
                )
            }),
            None => Ok(None),
        };
        let fa_env = match ollama_env("FLASH_ATTENTION") {
            Some((v, key)) => switch(Some(&v), "environment", &key)?,
            None => None,
        };
        let fa_flag = switch(args.flash_attention.as_deref(), FLAGS, "flash-attention")?;
        let fa_forced = fa_flag.is_some() || fa_env.is_some();
        let (flash_attention, _) = layered(fa_flag, fa_env, raw.server.flash_attention, &origin);
        let (kv_text, kv_from) = layered(
            args.kv_cache_type.clone(),
            ollama_env("KV_CACHE_TYPE").map(|v| v.0),
            raw.server.kv_cache_type.clone(),
            &origin,
        );
        let kv_cache_type = match kv_text {
            Some(t) => KvCacheType::parse(&t).ok_or_else(|| {
                invalid(
                    &kv_from,
                    "kv_cache_type",
                    format!("`{t}` is not one of f16, q8_0, q4_0"),
                )
            })?,
            None => KvCacheType::F16,
        };
        if kv_cache_type != KvCacheType::F16 && flash_attention == Some(false) {
            return Err(invalid(&kv_from, "kv_cache_type", NEEDS_FLASH.into()));
        }
        let draft_most = |n: Option<u32>, key: &str, from: &str| match n {
            Some(n) if n > engine::MAX_SPECULATE => {
                let most = engine::MAX_SPECULATE;
                Err(invalid(from, key, format!("{n} is over the most, {most}")))
            }
            n => Ok(n),
        };
        let speculate = match args.speculate {
            Some(n) => draft_most(Some(n), "speculate", FLAGS)?,
            None => draft_most(raw.server.speculate, "server.speculate", &origin)?,
        }
        .unwrap_or(0);
        let cache_ram_mib = args
            .cache_ram
            .or(raw.server.cache_ram)
            // Host memory for conversations the slots gave up: only used as they outnumber
            // the slots.
            .unwrap_or_else(|| memory::default_cache_ram_mib(memory::usable()));
        let reread_answers = switch(args.reread_answers.as_deref(), FLAGS, "reread-answers")?
            .or(raw.server.reread_answers)
            .unwrap_or(true);
        let exact_reuse = switch(args.exact_reuse.as_deref(), FLAGS, "exact-reuse")?
            .or(raw.server.exact_reuse)
            .unwrap_or(true);
        let split_mode = |text: &str, from: &str, key: &str| {
            one_of(text, SplitMode::parse, "auto, on, off", from, key)
        };
        let depth_split = match (&args.depth_split, &raw.server.depth_split) {
            (Some(text), _) => split_mode(text, FLAGS, "depth-split")?,
            (None, Some(text)) => split_mode(text, &origin, "server.depth_split")?,
            (None, None) => SplitMode::Auto,
        };
        let numa = |text: &str, from: &str, key: &str| {
            one_of(
                text,
                Numa::parse,
                "off, distribute, isolate, numactl",
                from,
                key,
            )
        };
        let numa = match (&args.numa, &raw.server.numa) {
            (Some(text), _) => numa(text, FLAGS, "numa")?,
            (None, Some(text)) => numa(text, &origin, "server.numa")?,
            (None, None) => Numa::Off,
        };
        let engine_defaults = EngineDefaults {
            slots: slots.unwrap_or(DEFAULT_PARALLEL),
            ctx_per_slot: ctx,
            threads: threads.unwrap_or_else(default_threads),
            threads_batch,
            gpu_layers,
            batch,
            prefill_chunk,
            max_queue: max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
            flash_attention,
            kv_cache_type,
            swa_full: args.swa_full || raw.server.swa_full.unwrap_or(false),
            mmap: !args.no_mmap && raw.server.mmap.unwrap_or(true),
            mlock: args.mlock || raw.server.mlock.unwrap_or(false),
            speculate,
            cache_ram: (cache_ram_mib as usize).saturating_mul(MIB),
            cache_dir: match (&args.cache_dir, &raw.server.cache_dir) {
                (Some(d), _) => Some(resolve_path(&d.to_string_lossy(), Path::new("."))),
                (None, Some(d)) => Some(resolve_path(d, &base)),
                (None, None) => None,
            },
            reread_answers,
            exact_reuse,
            depth_split,
            numa,
        };

        // Lifecycle.
        let ka_env = match ollama_env("KEEP_ALIVE") {
            Some((v, key)) => {
                Some(KeepAlive::parse(&v).map_err(|m| invalid("environment", &key, m))?)
            }
            None => None,
        };
        let ka_flag = match &args.keep_alive {
            Some(v) => Some(KeepAlive::parse(v).map_err(|m| invalid(FLAGS, "keep-alive", m))?),
            None => None,
        };
        let ka_file = match &raw.server.keep_alive {
            Some(r) => {
                Some(keep_alive_of(r).map_err(|m| invalid(&origin, "server.keep_alive", m))?)
            }
            None => None,
        };
        let (keep_alive, _) = layered(ka_flag, ka_env, ka_file, &origin);
        let (max_loaded, from) = layered(
            args.max_loaded,
            parse_env("MAX_LOADED_MODELS")?,
            raw.server.max_loaded,
            &origin,
        );
        if max_loaded == Some(0) {
            return Err(invalid(&from, "max_loaded", "must be at least 1".into()));
        }
        let lifecycle = Lifecycle {
            keep_alive: keep_alive.unwrap_or(KeepAlive::DEFAULT),
            max_loaded: max_loaded.unwrap_or(DEFAULT_MAX_LOADED),
        };

        let store_dir = match (&args.models_dir, &raw.server.models_dir) {
            (Some(d), _) => resolve_path(&d.to_string_lossy(), Path::new(".")),
            (None, Some(d)) if std::env::var_os("OLLAMA_MODELS").is_none() => {
                resolve_path(d, &base)
            }
            _ => default_store_dir(),
        };

        let security = security::load(
            raw.security,
            (
                args.tls_cert.clone().or(raw.server.tls_cert.clone()),
                args.tls_key.clone().or(raw.server.tls_key.clone()),
                args.client_ca.clone().or(raw.server.client_ca.clone()),
            ),
            &origin,
            &base,
            resolve_path,
        )?;
        if !listen.ip().is_loopback() && security.keys.is_empty() && !insecure {
            return Err(invalid(
                &host_origin,
                "host",
                format!(
                    "refusing to listen on {listen}, which is reachable from other machines, \
                     without authentication; configure API keys ([[security.keys]], see \
                     `backstop keys new`), bind a loopback address, or pass --insecure if this \
                     network is trusted"
                ),
            ));
        }
        let mut origins: Vec<String> = raw
            .server
            .origins
            .clone()
            .or_else(|| security_origins.clone())
            .unwrap_or_default();
        if let Some(list) = args
            .origins
            .clone()
            .or_else(|| ollama_env("ORIGINS").map(|v| v.0))
        {
            origins = list
                .split(',')
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect();
        }

        // The models: the file's, then the flags' (which replace a file entry of the same name).
        let mut entries: Vec<(String, RawModel, String, Option<PathBuf>)> = Vec::new();
        for (name, m) in raw.models {
            let path = m.path.as_deref().map(|p| resolve_path(p, &base));
            entries.push((name, m, origin.clone(), path));
        }
        for flag in &args.models {
            let (name, path) = parse_model_flag(flag).map_err(|m| invalid(FLAGS, "model", m))?;
            entries.retain(|(n, ..)| *n != name);
            let path = resolve_path(&path.to_string_lossy(), Path::new("."));
            entries.push((name, RawModel::default(), FLAGS.to_owned(), Some(path)));
        }
        let store = crate::models::Store::new(store_dir.clone());
        if entries.is_empty() && args.config.is_none() {
            let path = fetched_models_dir().join(DEFAULT_MODEL_FILE);
            if path.exists() {
                entries.push((
                    DEFAULT_MODEL_NAME.to_owned(),
                    RawModel::default(),
                    FLAGS.to_owned(),
                    Some(path),
                ));
            } else if store.list().is_empty() {
                return Err(invalid(
                    FLAGS,
                    "model",
                    format!(
                        "no model given, the store at {} is empty, and the default model is not \
                         at {}; run `scripts/setup.sh serve` (or `scripts/fetch-models.sh`) to \
                         fetch it, pull one with `backstop pull`, or pass --model NAME=PATH",
                        store_dir.display(),
                        path.display()
                    ),
                ));
            }
        }

        let mut models: Vec<ModelConfig> = Vec::with_capacity(entries.len());
        for (name_text, m, from, path) in entries {
            let key = |k: &str| format!("models.{name_text}.{k}");
            let name = ModelName::parse(&name_text)
                .map_err(|e| invalid(&from, &format!("models.{name_text}"), e.reason.to_owned()))?;
            let sha256 = match &m.sha256 {
                Some(s) => Some(
                    Digest::parse(s).map_err(|e| invalid(&from, &key("sha256"), e.to_string()))?,
                ),
                None => None,
            };
            let path = match (path, &m.repo) {
                (Some(p), None) => p,
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        &from,
                        &key("repo"),
                        "give either `path` or `repo` + `file`, not both".into(),
                    ))
                }
                (None, Some(repo)) => hub_path(&store, repo, &m, sha256.as_ref())
                    .map_err(|msg| invalid(&from, &key("repo"), msg))?,
                (None, None) => {
                    return Err(invalid(
                        &from,
                        &key("path"),
                        "each model needs `path`, or `repo` + `file`".into(),
                    ))
                }
            };
            engine::check_model_file(&path)
                .map_err(|e| invalid(&from, &key("path"), e.to_string()))?;
            m.options.validate().map_err(|e| {
                invalid(&from, &key(&format!("options.{}", e.field)), e.to_string())
            })?;
            if m.stop.len() > MAX_STOP_STRINGS {
                return Err(invalid(
                    &from,
                    &key("stop"),
                    format!("at most {MAX_STOP_STRINGS} stop strings"),
                ));
            }
            let keep_alive = match &m.keep_alive {
                Some(r) => {
                    Some(keep_alive_of(r).map_err(|msg| invalid(&from, &key("keep_alive"), msg))?)
                }
                None => None,
            };
            let mut aliases = Vec::with_capacity(m.aliases.len());
            for a in &m.aliases {
                aliases.push(
                    ModelName::parse(a)
                        .map_err(|e| invalid(&from, &key("aliases"), e.to_string()))?,
                );
            }
            let mut engine = engine_defaults.options(&name, path, None);
            // A flag or variable beats the model's own value, which beats [server].
            if args.parallel.is_none() {
                if let Some(p) = positive(m.parallel, &key("parallel"), &from)? {
                    engine.slots = p;
                }
            }
            if args.ctx.is_none() {
                if let Some(c) = positive(m.ctx, &key("ctx"), &from)? {
                    engine.ctx_per_slot = Some(c);
                }
            }
            if args.threads.is_none() {
                if let Some(t) = positive(m.threads, &key("threads"), &from)? {
                    engine.threads = t;
                    // Batch threads follow unless set somewhere.
                    if engine_defaults.threads_batch.is_none() {
                        engine.threads_batch = t;
                    }
                }
            }
            if args.threads_batch.is_none() {
                if let Some(t) = positive(m.threads_batch, &key("threads_batch"), &from)? {
                    engine.threads_batch = t;
                }
            }
            if args.gpu_layers.is_none() {
                engine.gpu_layers = m.gpu_layers.or(engine.gpu_layers);
            }
            if !fa_forced {
                engine.flash_attention = m.flash_attention.or(engine.flash_attention);
            }
            if !args.no_mmap {
                engine.mmap = m.mmap.unwrap_or(engine.mmap);
            }
            if !args.mlock {
                engine.mlock = m.mlock.unwrap_or(engine.mlock);
            }
            if args.speculate.is_none() {
                if let Some(n) = draft_most(m.speculate, &key("speculate"), &from)? {
                    engine.speculate = n;
                }
            }
            if let (None, Some(text)) = (&args.depth_split, &m.depth_split) {
                engine.depth_split = split_mode(text, &from, &key("depth_split"))?;
            }
            if engine.kv_cache_type != KvCacheType::F16 && engine.flash_attention == Some(false) {
                return Err(invalid(&from, &key("flash_attention"), NEEDS_FLASH.into()));
            }
            models.push(ModelConfig {
                name,
                aliases,
                engine,
                defaults: ModelDefaults {
                    system: m.system,
                    sampling: m.options,
                    max_tokens: positive(m.max_tokens, &key("max_tokens"), &from)?,
                    stop: m.stop,
                    keep_alive,
                },
                sha256,
            });
        }
        models.sort_by(|a, b| a.name.cmp(&b.name));
        for (i, m) in models.iter().enumerate() {
            for other in &models[i + 1..] {
                let clash = std::iter::once(&m.name)
                    .chain(&m.aliases)
                    .any(|n| *n == other.name || other.aliases.contains(n));
                if clash {
                    return Err(invalid(
                        &origin,
                        &format!("models.{}", other.name),
                        format!("its name or an alias is also used by `{}`", m.name),
                    ));
                }
            }
        }
        let router = router::load(
            raw.router,
            &origin,
            |k| std::env::var(k).ok(),
            |name| {
                ModelName::parse(name)
                    .is_ok_and(|n| models.iter().any(|m| m.name == n || m.aliases.contains(&n)))
            },
        )?;
        // The models the cloud falls over to are the reason backstop exists: they load first
        // and stay loaded unless their configuration says otherwise.
        let fallbacks: Vec<ModelName> = router
            .upstreams
            .iter()
            .filter_map(|u| u.fallback.as_deref())
            .filter_map(|f| ModelName::parse(f).ok())
            .collect();
        let is_fallback = |m: &ModelConfig| {
            fallbacks
                .iter()
                .any(|f| *f == m.name || m.aliases.contains(f))
        };
        for m in &mut models {
            if is_fallback(m) && m.defaults.keep_alive.is_none() {
                m.defaults.keep_alive = Some(KeepAlive::Forever);
            }
        }
        models.sort_by_key(|m| !is_fallback(m));
        Ok(Config {
            server: ServerConfig {
                listen,
                max_body_bytes,
                insecure,
                origins,
            },
            lifecycle,
            engine: engine_defaults,
            store_dir,
            models,
            router,
            security,
        })
    }
}

/// Where a pinned Hugging Face file lives in the store, or how to get it there.
fn hub_path(
    store: &crate::models::Store,
    repo: &str,
    m: &RawModel,
    sha256: Option<&Digest>,
) -> Result<PathBuf, String> {
    let file = m
        .file
        .as_deref()
        .ok_or("a `repo` entry also needs `file` (the .gguf file in that repository)")?;
    let name = ModelName::for_hub_file(repo, file).map_err(|e| e.to_string())?;
    let found = match sha256 {
        Some(d) => Some(store.blob_path(d)).filter(|p| p.is_file()),
        None => store.get(&name).ok().flatten().map(|s| s.model_path),
    };
    found.ok_or_else(|| {
        let mut flags = String::new();
        if let Some(r) = &m.revision {
            flags.push_str(&format!(" --revision {r}"));
        }
        if let Some(d) = sha256 {
            flags.push_str(&format!(" --sha256 {}", d.hex()));
        }
        if store.root() != default_store_dir() {
            flags.push_str(&format!(" --models-dir {}", store.root().display()));
        }
        format!(
            "{repo}/{file} is not in the model store at {}; fetch it with `backstop pull {repo} --file {file}{flags}`",
            store.root().display()
        )
    })
}

/// A configuration for unit tests: one model `m` at `path` (never loaded unless a test asks),
/// one slot, one thread, loopback.
#[cfg(test)]
pub(crate) fn for_tests(path: &str) -> Config {
    let engine = EngineDefaults {
        slots: 1,
        ctx_per_slot: None,
        threads: 1,
        threads_batch: None,
        gpu_layers: None,
        batch: 512,
        prefill_chunk: None,
        max_queue: 1,
        flash_attention: None,
        kv_cache_type: KvCacheType::F16,
        swa_full: false,
        mmap: true,
        mlock: false,
        speculate: 0,
        cache_ram: 0,
        cache_dir: None,
        reread_answers: true,
        exact_reuse: true,
        depth_split: SplitMode::Auto,
        numa: Numa::Off,
    };
    let name = ModelName::parse("m").unwrap();
    Config {
        server: ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            max_body_bytes: 1024,
            insecure: false,
            origins: vec![],
        },
        lifecycle: Lifecycle {
            keep_alive: KeepAlive::DEFAULT,
            max_loaded: 1,
        },
        store_dir: std::env::temp_dir().join("backstop-unit-test-store"),
        models: vec![ModelConfig {
            engine: engine.options(&name, path.into(), None),
            name,
            aliases: vec![],
            defaults: ModelDefaults::default(),
            sha256: None,
        }],
        engine,
        router: Default::default(),
        security: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_accepts_the_forms_ollama_host_takes() {
        assert_eq!(parse_host("").unwrap().to_string(), "127.0.0.1:11434");
        assert_eq!(parse_host("0.0.0.0").unwrap().to_string(), "0.0.0.0:11434");
        assert_eq!(
            parse_host("http://127.0.0.1:8080/").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(parse_host(":9000").unwrap().to_string(), "127.0.0.1:9000");
        assert_eq!(
            parse_host("localhost:1234").unwrap().to_string(),
            "127.0.0.1:1234"
        );
        assert_eq!(parse_host("[::1]:5").unwrap().to_string(), "[::1]:5");
        assert!(parse_host("example.com:80").is_err());
        assert!(parse_host("127.0.0.1:99999").is_err());
    }

    #[test]
    fn model_flag_without_name_takes_the_file_stem() {
        let (n, p) = parse_model_flag("/m/SmolLM2.Q4.gguf").unwrap();
        assert_eq!(n, "SmolLM2.Q4");
        assert_eq!(p, PathBuf::from("/m/SmolLM2.Q4.gguf"));
        let (n, _) = parse_model_flag("tiny=/m/x.gguf").unwrap();
        assert_eq!(n, "tiny");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_file() {
        assert_eq!(
            resolve_path("m.gguf", Path::new("/etc/backstop")),
            PathBuf::from("/etc/backstop/m.gguf")
        );
        assert_eq!(
            resolve_path("/abs.gguf", Path::new("/x")),
            PathBuf::from("/abs.gguf")
        );
    }

    fn load_toml(text: &str) -> Result<Config, ConfigError> {
        load_toml_with(text, ServeArgs::default())
    }

    /// `text` as models.toml (beside an empty `model.gguf`), with these flags.
    fn load_toml_with(text: &str, flags: ServeArgs) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("backstop-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.gguf"), b"GGUF\x03\0\0\0").unwrap();
        let file = dir.join("models.toml");
        std::fs::write(&file, text).unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..flags
        };
        let out = Config::load(&args);
        std::fs::remove_dir_all(&dir).ok();
        out
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        let err = load_toml("[models.a]\npath = \"model.gguf\"\ntemprature = 0.5\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("models.toml"), "{msg}");
        assert!(msg.contains("temprature"), "{msg}");
    }

    #[test]
    fn out_of_range_option_names_the_key() {
        let err = load_toml("[models.a]\npath = \"model.gguf\"\n[models.a.options]\ntop_p = 3.0\n")
            .unwrap_err();
        assert!(err.to_string().contains("models.a.options.top_p"), "{err}");
    }

    #[test]
    fn missing_model_file_is_a_config_error_naming_the_key() {
        let err = load_toml("[models.a]\npath = \"nope.gguf\"\n").unwrap_err();
        assert!(err.to_string().contains("models.a.path"), "{err}");
    }

    #[test]
    fn public_bind_without_insecure_is_refused() {
        let err =
            load_toml("[server]\nhost = \"0.0.0.0:8080\"\n[models.a]\npath = \"model.gguf\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("--insecure"), "{err}");
    }

    #[test]
    fn per_model_settings_and_defaults_are_read() {
        let cfg = load_toml(
            "[server]\nparallel = 2\n[models.a]\npath = \"model.gguf\"\nctx = 1024\nsystem = \"Be brief.\"\n[models.a.options]\ntemperature = 0.1\n",
        )
        .unwrap();
        let m = &cfg.models[0];
        assert_eq!(m.engine.slots, 2);
        assert_eq!(m.engine.ctx_per_slot, Some(1024));
        assert_eq!(m.defaults.system.as_deref(), Some("Be brief."));
        assert_eq!(m.defaults.sampling.temperature, Some(0.1));
    }

    #[test]
    fn speculate_comes_from_the_flag_then_the_model_then_the_server_and_has_a_most() {
        let model = "[models.a]\npath = \"model.gguf\"\n";
        assert_eq!(
            load_toml(model).unwrap().engine.speculate,
            0,
            "off by default"
        );
        let toml = format!("[server]\nspeculate = 8\n{model}");
        let cfg = load_toml(&toml).unwrap();
        assert_eq!(
            (cfg.engine.speculate, cfg.models[0].engine.speculate),
            (8, 8)
        );
        let flag = |n| ServeArgs {
            speculate: Some(n),
            ..Default::default()
        };
        assert_eq!(load_toml_with(&toml, flag(0)).unwrap().engine.speculate, 0);
        let most = engine::MAX_SPECULATE;
        assert_eq!(
            load_toml_with(&toml, flag(most)).unwrap().engine.speculate,
            most
        );
        // Refused, naming the key: over the most from the flag, [server] and a model.
        let refused = |r: Result<Config, ConfigError>, key: &str, said: &str| {
            let err = r.unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(said), "{err}");
        };
        let over = flag(most + 1);
        refused(
            load_toml_with(&toml, over),
            "speculate",
            "33 is over the most, 32",
        );
        let server = format!("[server]\nspeculate = 100\n{model}");
        refused(load_toml(&server), "server.speculate", "100");
        // A model's own value beats [server]'s; the flag beats both.
        let toml = format!("{toml}speculate = 16\n[models.b]\npath = \"model.gguf\"\n");
        let each = |cfg: Config| {
            cfg.models
                .iter()
                .map(|m| m.engine.speculate)
                .collect::<Vec<_>>()
        };
        assert_eq!(each(load_toml(&toml).unwrap()), [16, 8]);
        assert_eq!(each(load_toml_with(&toml, flag(4)).unwrap()), [4, 4]);
        refused(
            load_toml(&format!("{model}speculate = 40\n")),
            "models.a.speculate",
            "40",
        );
    }

    #[test]
    fn batch_comes_from_the_flag_then_the_server_and_bounds_the_prefill_chunk() {
        let toml =
            "[server]\nbatch = 256\nprefill_chunk = 200\n[models.a]\npath = \"model.gguf\"\n";
        let cfg = load_toml(toml).unwrap();
        assert_eq!(
            (cfg.engine.batch, cfg.engine.prefill_chunk),
            (256, Some(200))
        );
        let flag = ServeArgs {
            batch: Some(64),
            ..Default::default()
        };
        let cfg = load_toml_with(toml, flag).unwrap();
        // A chunk read beside running streams is one decode too: never more than the batch.
        assert_eq!((cfg.engine.batch, cfg.engine.prefill_chunk), (64, Some(64)));
        let cfg = load_toml("[models.a]\npath = \"model.gguf\"\n").unwrap();
        assert_eq!(cfg.engine.batch, DEFAULT_BATCH);
        assert_eq!(
            cfg.engine.prefill_chunk, None,
            "decided by the engine, CPU or GPU"
        );
        let zero = ServeArgs {
            batch: Some(0),
            ..Default::default()
        };
        let err = load_toml_with(toml, zero).unwrap_err().to_string();
        assert!(err.contains("batch") && err.contains("at least 1"), "{err}");
    }

    #[test]
    fn host_memory_for_given_up_conversations_is_8_gib_at_most_unless_the_flag_or_the_server_says()
    {
        let model = "[models.a]\npath = \"model.gguf\"\n";
        // One limit for the process: the models' own options hold none.
        let bytes = |cfg: Config| cfg.engine.cache_ram;
        // 8 GiB, or a quarter of the memory where that is less (the rule's own test).
        let default = memory::default_cache_ram_mib(memory::usable()) as usize;
        assert!(default > 0 && default <= 8192, "{default}");
        assert_eq!(bytes(load_toml(model).unwrap()), default << 20);
        let file = format!("[server]\ncache_ram = 512\n{model}");
        assert_eq!(bytes(load_toml(&file).unwrap()), 512 << 20);
        let off = ServeArgs {
            cache_ram: Some(0),
            ..Default::default()
        };
        assert_eq!(bytes(load_toml_with(&file, off).unwrap()), 0);
        let err = load_toml(&format!("[server]\ncache_ram = -1\n{model}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache_ram"), "{err}");
    }

    #[test]
    fn the_cache_folder_is_none_unless_named_and_resolves_as_other_paths_do() {
        let model = "[models.a]\npath = \"model.gguf\"\n";
        let folder = |cfg: Config| cfg.engine.cache_dir;
        assert_eq!(folder(load_toml(model).unwrap()), None);
        // Relative to models.toml, which the test writes into a folder of its own.
        let file = format!("[server]\ncache_dir = \"prompts\"\n{model}");
        let dir = folder(load_toml(&file).unwrap()).unwrap();
        assert!(
            dir.is_absolute() && dir.ends_with("prompts"),
            "{}",
            dir.display()
        );
        assert!(dir
            .parent()
            .unwrap()
            .to_string_lossy()
            .contains("backstop-cfg-"));
        let flag = ServeArgs {
            cache_dir: Some("/var/cache/backstop".into()),
            ..Default::default()
        };
        assert_eq!(
            folder(load_toml_with(&file, flag).unwrap()),
            Some(PathBuf::from("/var/cache/backstop"))
        );
        let err = load_toml(&format!("[server]\ncache_dir = 3\n{model}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache_dir"), "{err}");
    }

    #[test]
    fn the_depth_split_is_measured_unless_the_flag_or_the_server_says_on_or_off() {
        let model = "[models.a]\npath = \"model.gguf\"\n";
        let mode = |cfg: Config| cfg.models[0].engine.depth_split;
        let flag = |v: &str| ServeArgs {
            depth_split: Some(v.into()),
            ..Default::default()
        };
        assert_eq!(mode(load_toml(model).unwrap()), SplitMode::Auto);
        let on = format!("[server]\ndepth_split = \"on\"\n{model}");
        assert_eq!(mode(load_toml(&on).unwrap()), SplitMode::On);
        assert_eq!(
            mode(load_toml_with(&on, flag("off")).unwrap()),
            SplitMode::Off
        );
        // A model's own entry over the server's; the flag over both.
        let own = format!("{on}depth_split = \"off\"\n");
        assert_eq!(mode(load_toml(&own).unwrap()), SplitMode::Off);
        assert_eq!(
            mode(load_toml_with(&own, flag("auto")).unwrap()),
            SplitMode::Auto
        );
        let err = load_toml(&format!("{model}depth_split = \"half\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("depth_split") && err.contains("half"), "{err}");
        let err = load_toml_with(model, flag("sometimes"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("depth-split") && err.contains("`sometimes` is not one of auto, on, off"),
            "{err}"
        );
        let err = load_toml(&format!("[server]\ndepth_split = \"both\"\n{model}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.depth_split") && err.contains("both"),
            "{err}"
        );
    }

    #[test]
    fn the_numa_placement_is_off_unless_the_flag_or_the_server_names_one() {
        let model = "[models.a]\npath = \"model.gguf\"\n";
        let numa = |cfg: Config| cfg.engine.numa;
        let flag = |v: &str| ServeArgs {
            numa: Some(v.into()),
            ..Default::default()
        };
        assert_eq!(numa(load_toml(model).unwrap()), Numa::Off);
        let server = format!("[server]\nnuma = \"distribute\"\n{model}");
        assert_eq!(numa(load_toml(&server).unwrap()), Numa::Distribute);
        assert_eq!(
            numa(load_toml_with(&server, flag("isolate")).unwrap()),
            Numa::Isolate
        );
        let err = load_toml_with(model, flag("mirror"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("numa")
                && err.contains("`mirror` is not one of off, distribute, isolate, numactl"),
            "{err}"
        );
        let err = load_toml(&format!("[server]\nnuma = \"spread\"\n{model}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.numa") && err.contains("spread"),
            "{err}"
        );
    }

    #[test]
    fn answer_reuse_switches_are_on_unless_the_flag_or_the_server_says_not() {
        type Get = fn(&EngineOptions) -> bool;
        type Set = fn(&mut ServeArgs, String);
        let switches: [(&str, &str, Get, Set); 2] = [
            (
                "reread_answers",
                "reread-answers",
                |e| e.reread_answers,
                |a, v| a.reread_answers = Some(v),
            ),
            (
                "exact_reuse",
                "exact-reuse",
                |e| e.exact_reuse,
                |a, v| a.exact_reuse = Some(v),
            ),
        ];
        let model = "[models.a]\npath = \"model.gguf\"\n";
        for (key, flag_name, get, set) in switches {
            let on = |cfg: &Config| (get(&cfg.models[0].engine), cfg.models.len());
            let flag = |v: &str| {
                let mut args = ServeArgs::default();
                set(&mut args, v.into());
                args
            };
            assert_eq!(on(&load_toml(model).unwrap()), (true, 1), "{key}");
            let off = format!("[server]\n{key} = false\n{model}");
            assert_eq!(on(&load_toml(&off).unwrap()), (false, 1), "{key}");
            assert_eq!(
                on(&load_toml_with(&off, flag("1")).unwrap()),
                (true, 1),
                "{key}"
            );
            assert_eq!(
                on(&load_toml_with(model, flag("false")).unwrap()),
                (false, 1),
                "{key}"
            );
            let err = load_toml_with(model, flag("maybe"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(flag_name) && err.contains("maybe"), "{err}");
            let err = load_toml(&format!("[server]\n{key} = 1\n{model}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn sliding_window_caches_hold_their_window_unless_the_flag_or_the_server_says_full() {
        let model = "[models.a]\npath = \"model.gguf\"\n";
        let full = |cfg: &Config| (cfg.engine.swa_full, cfg.models[0].engine.swa_full);
        assert_eq!(full(&load_toml(model).unwrap()), (false, false));
        let toml = format!("[server]\nswa_full = true\n{model}");
        assert_eq!(full(&load_toml(&toml).unwrap()), (true, true));
        let flag = ServeArgs {
            swa_full: true,
            ..Default::default()
        };
        assert_eq!(full(&load_toml_with(model, flag).unwrap()), (true, true));
        let err = load_toml(&format!("[server]\nswa_full = \"yes\"\n{model}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("swa_full"), "{err}");
    }

    #[test]
    fn mapping_and_locking_come_from_the_flag_then_the_model_then_the_server() {
        let toml = "[server]\nmlock = true\n[models.a]\npath = \"model.gguf\"\nmmap = false\nmlock = false\n[models.b]\npath = \"model.gguf\"\n";
        let each = |cfg: &Config| -> Vec<(bool, bool)> {
            cfg.models
                .iter()
                .map(|m| (m.engine.mmap, m.engine.mlock))
                .collect()
        };
        assert_eq!(
            each(&load_toml(toml).unwrap()),
            [(false, false), (true, true)]
        );
        let flags = ServeArgs {
            no_mmap: true,
            mlock: true,
            ..Default::default()
        };
        assert_eq!(
            each(&load_toml_with(toml, flags).unwrap()),
            [(false, true), (false, true)]
        );
        // Unset everywhere: mapped, not locked, as llama.cpp and Ollama have it.
        let cfg = load_toml("[models.a]\npath = \"model.gguf\"\n").unwrap();
        assert_eq!(each(&cfg), [(true, false)]);
        let err = load_toml("[models.a]\npath = \"model.gguf\"\nmlock = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mlock"), "{err}");
    }

    #[test]
    fn flash_attention_comes_from_the_flag_then_the_model_then_the_server() {
        let toml = "[server]\nflash_attention = false\n[models.a]\npath = \"model.gguf\"\nflash_attention = true\n[models.b]\npath = \"model.gguf\"\n";
        let fa = |cfg: &Config| -> Vec<Option<bool>> {
            cfg.models
                .iter()
                .map(|m| m.engine.flash_attention)
                .collect()
        };
        let cfg = load_toml(toml).unwrap();
        assert_eq!(fa(&cfg), [Some(true), Some(false)]);
        let flag = ServeArgs {
            flash_attention: Some("0".into()),
            ..Default::default()
        };
        let cfg = load_toml_with(toml, flag).unwrap();
        assert_eq!(fa(&cfg), [Some(false), Some(false)]);
        // Unset everywhere: the default (off on a CPU, llama.cpp's choice on a GPU).
        let cfg = load_toml("[models.a]\npath = \"model.gguf\"\n").unwrap();
        assert_eq!(fa(&cfg), [None]);
        // A model may not turn it off under a quantized KV cache, which needs it.
        let err = load_toml(
            "[server]\nkv_cache_type = \"q8_0\"\n[models.a]\npath = \"model.gguf\"\nflash_attention = false\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("models.a.flash_attention") && err.contains("needs flash attention"),
            "{err}"
        );
    }

    #[test]
    fn batch_threads_follow_the_threads_unless_the_flag_the_model_or_the_server_says() {
        let both = |cfg: &Config| -> Vec<(u32, u32)> {
            cfg.models
                .iter()
                .map(|m| (m.engine.threads, m.engine.threads_batch))
                .collect()
        };
        let models = "[models.a]\npath = \"model.gguf\"\n[models.b]\npath = \"model.gguf\"\n";
        let t = default_threads();
        assert_eq!(both(&load_toml(models).unwrap()), [(t, t), (t, t)]);
        // A model's own threads carry its batch threads with them.
        let toml = format!("[server]\nthreads = 3\n{models}")
            .replace("[models.b]", "threads = 5\n[models.b]");
        assert_eq!(both(&load_toml(&toml).unwrap()), [(5, 5), (3, 3)]);
        // Batch threads set for every model stay set whatever a model's threads.
        let server = toml.replace("threads = 3\n", "threads = 3\nthreads_batch = 4\n");
        assert_eq!(both(&load_toml(&server).unwrap()), [(5, 4), (3, 4)]);
        let own = server.replace("threads = 5\n", "threads = 5\nthreads_batch = 6\n");
        assert_eq!(both(&load_toml(&own).unwrap()), [(5, 6), (3, 4)]);
        let flag = |threads, threads_batch| ServeArgs {
            threads,
            threads_batch,
            ..Default::default()
        };
        assert_eq!(
            both(&load_toml_with(&own, flag(None, Some(8))).unwrap()),
            [(5, 8), (3, 8)]
        );
        assert_eq!(
            both(&load_toml_with(&toml, flag(Some(2), None)).unwrap()),
            [(2, 2), (2, 2)]
        );
        // Zero is refused wherever it is set, naming where.
        let refused = |r: Result<Config, ConfigError>, key: &str| {
            let err = r.unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("at least 1"), "{err}");
        };
        refused(load_toml_with(models, flag(None, Some(0))), "threads-batch");
        refused(
            load_toml(&format!("[server]\nthreads_batch = 0\n{models}")),
            "server.threads_batch",
        );
        refused(
            load_toml(&own.replace("threads_batch = 6", "threads_batch = 0")),
            "models.a.threads_batch",
        );
    }

    #[test]
    fn gpu_layers_come_from_the_flag_then_the_model_then_the_server() {
        let toml = "[server]\ngpu_layers = 10\n[models.a]\npath = \"model.gguf\"\ngpu_layers = 0\n[models.b]\npath = \"model.gguf\"\n";
        let layers = |cfg: &Config| -> Vec<Option<u32>> {
            cfg.models.iter().map(|m| m.engine.gpu_layers).collect()
        };
        let cfg = load_toml(toml).unwrap();
        // The model's own 0 (CPU only) is kept; the other model takes [server]'s.
        assert_eq!(layers(&cfg), [Some(0), Some(10)]);
        assert_eq!(cfg.engine.gpu_layers, Some(10));
        let flag = ServeArgs {
            gpu_layers: Some(5),
            ..Default::default()
        };
        let cfg = load_toml_with(toml, flag).unwrap();
        assert_eq!(layers(&cfg), [Some(5), Some(5)]);
        assert_eq!(cfg.engine.gpu_layers, Some(5));
        // Nothing set anywhere: llama.cpp's default (every layer on a GPU when there is one).
        let cfg = load_toml("[models.a]\npath = \"model.gguf\"\n").unwrap();
        assert_eq!(layers(&cfg), [None]);
    }
}
