//! `[router]`: the cloud upstreams, their timeouts and fallbacks, the circuit breaker and
//! contingency mode, validated into [`RouterConfig`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::duration::parse_timeout;
use super::ConfigError;

/// `[router]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouter {
    pub(crate) mode: Option<String>,
    #[serde(default)]
    pub(crate) breaker: RawBreaker,
    #[serde(default)]
    pub(crate) upstreams: Vec<RawUpstream>,
}

/// `[router.breaker]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    pub(crate) failures: Option<u32>,
    pub(crate) cooldown: Option<String>,
}

/// `[[router.upstreams]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub(crate) name: String,
    pub(crate) kind: String,
    pub(crate) base_url: String,
    pub(crate) api_key_env: Option<String>,
    #[serde(default)]
    pub(crate) models: Vec<String>,
    pub(crate) fallback: Option<String>,
    pub(crate) connect_timeout: Option<String>,
    pub(crate) first_byte_timeout: Option<String>,
    pub(crate) total_timeout: Option<String>,
    #[serde(default)]
    pub(crate) model_map: BTreeMap<String, String>,
    /// Anthropic requires `max_tokens`; used when an OpenAI request leaves it out.
    pub(crate) default_max_tokens: Option<u32>,
}

/// Where requests go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMode {
    /// The cloud upstreams, falling over to the local model.
    CloudFirst,
    /// Everything local (contingency as configuration).
    LocalOnly,
}

/// Which API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// OpenAI's Chat Completions (OpenAI, Azure's OpenAI-compatible endpoint, vLLM, another
    /// backstop).
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
}

/// One cloud upstream.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// Shown in headers, logs and metrics.
    pub name: String,
    /// Its API.
    pub kind: UpstreamKind,
    /// Base URL, e.g. `https://api.openai.com/v1` (requests go to `<base>/chat/completions`
    /// or `<base>/messages`).
    pub base_url: String,
    /// The secret, read from the variable the file names (never from the file itself).
    pub api_key: Option<String>,
    /// Model names this upstream serves; an entry ending in `*` matches a prefix.
    pub models: Vec<String>,
    /// The local model that answers when this upstream cannot.
    pub fallback: Option<String>,
    /// Time to establish the connection (TCP + TLS).
    pub connect_timeout: Duration,
    /// Time from sending the request until the response headers arrive.
    pub first_byte_timeout: Duration,
    /// Time for the whole exchange.
    pub total_timeout: Duration,
    /// Names to use upstream instead of the client's.
    pub model_map: BTreeMap<String, String>,
    /// `max_tokens` for Anthropic when the request sets none.
    pub default_max_tokens: u32,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("models", &self.models)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl UpstreamConfig {
    /// Whether this upstream serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| match m.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => m == model,
        })
    }

    /// The name the upstream knows `model` by.
    pub fn upstream_model<'a>(&'a self, model: &'a str) -> &'a str {
        self.model_map.get(model).map_or(model, String::as_str)
    }
}

/// The circuit breaker's settings, the same for every upstream.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive failures that open it.
    pub failures: u32,
    /// How long it stays open before one probe may try the upstream again.
    pub cooldown: Duration,
}

/// The validated router configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Cloud-first or local-only.
    pub mode: RouteMode,
    /// Contingency switched on at start (`BACKSTOP_CONTINGENCY=1`).
    pub contingency: bool,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
    /// Upstreams in the order they are tried.
    pub upstreams: Vec<UpstreamConfig>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            mode: RouteMode::CloudFirst,
            contingency: false,
            breaker: BreakerConfig {
                failures: 3,
                cooldown: Duration::from_secs(30),
            },
            upstreams: Vec::new(),
        }
    }
}

const DEFAULT_CONNECT: Duration = Duration::from_secs(2);
const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(15);
const DEFAULT_TOTAL: Duration = Duration::from_secs(300);

/// Validates `[router]`. `env` reads a variable (the real environment in production), and
/// `local_model` says whether a name is a configured local model.
pub(crate) fn load(
    raw: RawRouter,
    origin: &str,
    env: impl Fn(&str) -> Option<String>,
    local_model: impl Fn(&str) -> bool,
) -> Result<RouterConfig, ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid {
        origin: origin.to_owned(),
        key,
        message,
    };
    let mode = match raw.mode.as_deref() {
        None | Some("cloud-first") => RouteMode::CloudFirst,
        Some("local-only") => RouteMode::LocalOnly,
        Some(other) => {
            return Err(invalid(
                "router.mode".into(),
                format!("`{other}` is not one of \"cloud-first\", \"local-only\""),
            ))
        }
    };
    let contingency = match env("BACKSTOP_CONTINGENCY") {
        None => false,
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "" | "0" | "false" | "no" | "off" => false,
            _ => {
                return Err(ConfigError::Invalid {
                    origin: "environment".into(),
                    key: "BACKSTOP_CONTINGENCY".into(),
                    message: format!("`{v}` is not a boolean (1/0, true/false)"),
                })
            }
        },
    };
    let failures = raw.breaker.failures.unwrap_or(3);
    if failures == 0 {
        return Err(invalid(
            "router.breaker.failures".into(),
            "must be at least 1".into(),
        ));
    }
    let cooldown = match &raw.breaker.cooldown {
        Some(c) => parse_timeout(c).map_err(|m| invalid("router.breaker.cooldown".into(), m))?,
        None => Duration::from_secs(30),
    };
    let mut upstreams: Vec<UpstreamConfig> = Vec::with_capacity(raw.upstreams.len());
    for (i, u) in raw.upstreams.into_iter().enumerate() {
        let key = |k: &str| format!("router.upstreams[{i}].{k}");
        if u.name.trim().is_empty()
            || !u
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(invalid(
                key("name"),
                "a name of letters, digits, `.`, `_` and `-`".into(),
            ));
        }
        if upstreams.iter().any(|o| o.name == u.name) {
            return Err(invalid(key("name"), format!("`{}` is used twice", u.name)));
        }
        let kind = match u.kind.as_str() {
            "openai" => UpstreamKind::OpenAi,
            "anthropic" => UpstreamKind::Anthropic,
            other => {
                return Err(invalid(
                    key("kind"),
                    format!("`{other}` is not one of \"openai\", \"anthropic\""),
                ))
            }
        };
        let base = u.base_url.trim().trim_end_matches('/').to_owned();
        match reqwest::Url::parse(&base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => {
                return Err(invalid(
                    key("base_url"),
                    format!("`{base}` is not an http(s) URL"),
                ))
            }
        }
        let api_key = match &u.api_key_env {
            None => None,
            Some(var) => Some(env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                invalid(
                    key("api_key_env"),
                    format!("the environment variable `{var}` is not set (it holds this upstream's API key)"),
                )
            })?),
        };
        if u.models.is_empty() {
            return Err(invalid(
                key("models"),
                "list the model names this upstream serves".into(),
            ));
        }
        if let Some(f) = &u.fallback {
            if !local_model(f) {
                return Err(invalid(
                    key("fallback"),
                    format!("`{f}` is not a configured local model (add it under [models.{f}])"),
                ));
            }
        }
        let timeout = |v: &Option<String>, k: &str, default: Duration| match v {
            Some(t) => parse_timeout(t).map_err(|m| invalid(key(k), m)),
            None => Ok(default),
        };
        let connect_timeout = timeout(&u.connect_timeout, "connect_timeout", DEFAULT_CONNECT)?;
        let first_byte_timeout = timeout(
            &u.first_byte_timeout,
            "first_byte_timeout",
            DEFAULT_FIRST_BYTE,
        )?;
        let total_timeout = timeout(&u.total_timeout, "total_timeout", DEFAULT_TOTAL)?;
        if total_timeout < first_byte_timeout {
            return Err(invalid(
                key("total_timeout"),
                "must not be shorter than first_byte_timeout".into(),
            ));
        }
        upstreams.push(UpstreamConfig {
            name: u.name,
            kind,
            base_url: base,
            api_key,
            models: u.models,
            fallback: u.fallback,
            connect_timeout,
            first_byte_timeout,
            total_timeout,
            model_map: u.model_map,
            default_max_tokens: u.default_max_tokens.unwrap_or(4096),
        });
    }
    Ok(RouterConfig {
        mode,
        contingency,
        breaker: BreakerConfig { failures, cooldown },
        upstreams,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<RouterConfig, ConfigError> {
        #[derive(Deserialize)]
        struct Wrap {
            router: RawRouter,
        }
        let w: Wrap = toml::from_str(text).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load(
            w.router,
            "models.toml",
            |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            |m| m == "smollm2",
        )
    }

    const ONE: &str = r#"
[router]
mode = "cloud-first"
[router.breaker]
failures = 2
cooldown = "5s"
[[router.upstreams]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1/"
api_key_env = "OPENAI_API_KEY"
models = ["gpt-4o-mini", "gpt-4.1*"]
fallback = "smollm2"
connect_timeout = "1s"
first_byte_timeout = "3s"
total_timeout = "30s"
model_map = { "gpt-4o-mini" = "gpt-4o-mini-2024-07-18" }
"#;

    #[test]
    fn an_upstream_is_read_with_its_secret_from_the_environment() {
        let r = parse(ONE, &[("OPENAI_API_KEY", "sk-test")]).unwrap();
        let u = &r.upstreams[0];
        assert_eq!(u.base_url, "https://api.openai.com/v1");
        assert_eq!(u.api_key.as_deref(), Some("sk-test"));
        assert_eq!(u.kind, UpstreamKind::OpenAi);
        assert!(u.serves("gpt-4o-mini") && u.serves("gpt-4.1-nano") && !u.serves("gpt-4o"));
        assert_eq!(u.upstream_model("gpt-4o-mini"), "gpt-4o-mini-2024-07-18");
        assert_eq!(u.first_byte_timeout, Duration::from_secs(3));
        assert_eq!(r.breaker.failures, 2);
        assert!(
            !format!("{u:?}").contains("sk-test"),
            "secrets never reach logs"
        );
    }

    #[test]
    fn a_missing_secret_or_unknown_fallback_names_the_key() {
        let e = parse(ONE, &[]).unwrap_err().to_string();
        assert!(
            e.contains("router.upstreams[0].api_key_env") && e.contains("OPENAI_API_KEY"),
            "{e}"
        );
        let e = parse(
            &ONE.replace("fallback = \"smollm2\"", "fallback = \"nope\""),
            &[("OPENAI_API_KEY", "k")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fallback") && e.contains("nope"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        let k = [("OPENAI_API_KEY", "k")];
        assert!(parse(&ONE.replace("kind = \"openai\"", "kind = \"gemini\""), &k).is_err());
        assert!(
            parse(&ONE.replace("\"30s\"", "\"1s\""), &k).is_err(),
            "total shorter than first byte"
        );
        assert!(parse(&ONE.replace("https://api.openai.com/v1/", "ftp://x"), &k).is_err());
        assert!(parse(&ONE.replace("cloud-first", "cloudy"), &k).is_err());
        assert!(parse(
            ONE,
            &[("OPENAI_API_KEY", "k"), ("BACKSTOP_CONTINGENCY", "maybe")]
        )
        .is_err());
        assert!(
            parse(
                ONE,
                &[("OPENAI_API_KEY", "k"), ("BACKSTOP_CONTINGENCY", "1")]
            )
            .unwrap()
            .contingency
        );
    }
}
