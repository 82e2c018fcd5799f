//! Configuration: the TOML catalogue, `BACKSTOP_*` variables and flags merged into one
//! validated [`Config`]. Every error names where the bad value came from, the key, and what
//! was expected, and is reported before any port is bound.

mod raw;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::cli::ServeArgs;
use crate::engine::{self, EngineOptions, SamplingOverrides};
use raw::{RawConfig, RawModel};

/// The port Ollama uses; clients default to it.
pub const DEFAULT_PORT: u16 = 11434;
/// File name of the default model the setup step fetches.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Name the default model is served under.
pub const DEFAULT_MODEL_NAME: &str = "smollm2";

const DEFAULT_PARALLEL: u32 = 4;
const DEFAULT_MAX_QUEUE: usize = 512;
const DEFAULT_BATCH: u32 = 512;
const DEFAULT_PREFILL_CHUNK: u32 = 128;
const DEFAULT_MAX_BODY: usize = 8 * 1024 * 1024;
const MAX_STOP_STRINGS: usize = 16;

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
}

/// One model to serve.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// How to run it.
    pub engine: EngineOptions,
    /// Request defaults.
    pub defaults: ModelDefaults,
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Server settings.
    pub server: ServerConfig,
    /// Models, in name order.
    pub models: Vec<ModelConfig>,
}

/// Where backstop keeps its cache (models, downloads): `BACKSTOP_CACHE` or
/// `~/.cache/backstop`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BACKSTOP_CACHE") {
        return PathBuf::from(dir);
    }
    home().join(".cache").join("backstop")
}

/// Where model files live: `BACKSTOP_MODELS` or `<cache>/models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("BACKSTOP_MODELS")
        .map(PathBuf::from)
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

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-/".contains(c))
}

impl Config {
    /// Builds the configuration for `serve` from flags/environment and the optional file.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let (raw, origin, base) = match &args.config {
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
            None => (
                RawConfig::default(),
                "command line / environment".to_owned(),
                PathBuf::from("."),
            ),
        };
        let flags = "command line / environment";
        let invalid = |origin: &str, key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message,
        };

        let (host_text, host_origin) = match (&args.host, &raw.server.host) {
            (Some(h), _) => (h.clone(), flags),
            (None, Some(h)) => (h.clone(), origin.as_str()),
            (None, None) => (String::new(), flags),
        };
        let listen = parse_host(&host_text).map_err(|m| invalid(host_origin, "host", m))?;
        let insecure = args.insecure || raw.server.insecure.unwrap_or(false);
        if !listen.ip().is_loopback() && !insecure {
            return Err(invalid(
                host_origin,
                "host",
                format!(
                    "refusing to listen on {listen}, which is reachable from other machines, \
                     without authentication; bind a loopback address, or pass --insecure if \
                     this network is trusted"
                ),
            ));
        }
        if !listen.ip().is_loopback() {
            tracing::warn!(%listen, "listening beyond loopback WITHOUT authentication (--insecure)");
        }

        let positive =
            |v: Option<u32>, key: &str, from: &str| -> Result<Option<u32>, ConfigError> {
                match v {
                    Some(0) => Err(invalid(from, key, "must be at least 1".into())),
                    other => Ok(other),
                }
            };
        // Flag/env values override both the [server] section and per-model values.
        let parallel_flag = positive(args.parallel, "parallel", flags)?;
        let ctx_flag = positive(args.ctx, "ctx", flags)?;
        let threads_flag = positive(args.threads, "threads", flags)?;
        let server_parallel = positive(raw.server.parallel, "server.parallel", &origin)?;
        let server_ctx = positive(raw.server.ctx, "server.ctx", &origin)?;
        let server_threads = positive(raw.server.threads, "server.threads", &origin)?;
        let batch = positive(raw.server.batch, "server.batch", &origin)?.unwrap_or(DEFAULT_BATCH);
        let prefill_chunk = positive(args.prefill_chunk, "prefill-chunk", flags)?
            .or(positive(
                raw.server.prefill_chunk,
                "server.prefill_chunk",
                &origin,
            )?)
            .unwrap_or(DEFAULT_PREFILL_CHUNK)
            .min(batch);
        let max_queue = args
            .max_queue
            .or(raw.server.max_queue)
            .unwrap_or(DEFAULT_MAX_QUEUE);
        let max_body_bytes = args
            .max_body_bytes
            .or(raw.server.max_body_bytes)
            .unwrap_or(DEFAULT_MAX_BODY);
        let physical = u32::try_from(num_cpus::get_physical()).unwrap_or(1).max(1);

        let mut entries: Vec<(String, RawModel, String, PathBuf)> = raw
            .models
            .into_iter()
            .map(|(name, m)| {
                let path = resolve_path(&m.path, &base);
                (name, m, origin.clone(), path)
            })
            .collect();
        for flag in &args.models {
            let (name, path) = parse_model_flag(flag).map_err(|m| invalid(flags, "model", m))?;
            entries.retain(|(n, ..)| *n != name);
            let path = resolve_path(&path.to_string_lossy(), Path::new("."));
            entries.push((name, RawModel::default(), flags.to_owned(), path));
        }
        if entries.is_empty() {
            let path = models_dir().join(DEFAULT_MODEL_FILE);
            if !path.exists() {
                return Err(invalid(
                    flags,
                    "model",
                    format!(
                        "no model given and the default model is not at {}; run \
                         `scripts/setup.sh serve` (or `scripts/fetch-models.sh`) to fetch it, \
                         or pass --model NAME=PATH",
                        path.display()
                    ),
                ));
            }
            entries.push((
                DEFAULT_MODEL_NAME.to_owned(),
                RawModel::default(),
                flags.to_owned(),
                path,
            ));
        }

        let mut models = Vec::with_capacity(entries.len());
        for (name, m, from, path) in entries {
            let key = |k: &str| format!("models.{name}.{k}");
            if !valid_name(&name) {
                return Err(invalid(
                    &from,
                    &format!("models.{name}"),
                    "model names may use letters, digits and . _ : - / (at most 128)".into(),
                ));
            }
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
            let slots = parallel_flag
                .or(positive(m.parallel, &key("parallel"), &from)?)
                .or(server_parallel)
                .unwrap_or(DEFAULT_PARALLEL);
            let ctx = ctx_flag
                .or(positive(m.ctx, &key("ctx"), &from)?)
                .or(server_ctx);
            let threads = threads_flag
                .or(positive(m.threads, &key("threads"), &from)?)
                .or(server_threads)
                .unwrap_or(physical);
            models.push(ModelConfig {
                engine: EngineOptions {
                    name: name.clone(),
                    path,
                    slots,
                    ctx_per_slot: ctx,
                    threads,
                    batch,
                    prefill_chunk,
                    max_queue,
                    gpu_layers: m.gpu_layers,
                },
                defaults: ModelDefaults {
                    system: m.system,
                    sampling: m.options,
                    max_tokens: positive(m.max_tokens, &key("max_tokens"), &from)?,
                    stop: m.stop,
                },
            });
        }
        models.sort_by(|a, b| a.engine.name.cmp(&b.engine.name));
        Ok(Config {
            server: ServerConfig {
                listen,
                max_body_bytes,
            },
            models,
        })
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
        let dir = std::env::temp_dir().join(format!("backstop-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.gguf"), b"GGUF\x03\0\0\0").unwrap();
        let file = dir.join("models.toml");
        std::fs::write(&file, text).unwrap();
        let args = ServeArgs {
            config: Some(file),
            ..Default::default()
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
}
