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
}

/// `[server]`: process-wide settings and defaults for every model.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub(crate) host: Option<String>,
    pub(crate) parallel: Option<u32>,
    pub(crate) ctx: Option<u32>,
    pub(crate) threads: Option<u32>,
    pub(crate) max_queue: Option<usize>,
    pub(crate) batch: Option<u32>,
    pub(crate) prefill_chunk: Option<u32>,
    pub(crate) max_body_bytes: Option<usize>,
    pub(crate) insecure: Option<bool>,
}

/// `[models.NAME]`: one served model, like an Ollama Modelfile.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub(crate) path: String,
    pub(crate) parallel: Option<u32>,
    pub(crate) ctx: Option<u32>,
    pub(crate) threads: Option<u32>,
    pub(crate) gpu_layers: Option<u32>,
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
