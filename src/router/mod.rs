//! The cloud-first router: requests for models a cloud upstream serves go there first, and
//! fall over to the local model when the cloud is down, slow or refusing. Contingency mode
//! (configuration, `BACKSTOP_CONTINGENCY`, the admin API) sends everything local.

pub(crate) mod anthropic;
pub(crate) mod breaker;
pub(crate) mod failure;
pub(crate) mod reply;
pub(crate) mod sse;
pub(crate) mod upstream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::config::{RouteMode, RouterConfig};
use failure::FailReason;
use upstream::Upstream;

/// What the `x-backstop-route` request header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteOverride {
    /// `local`: answer locally (the fallback model), whatever the cloud's state.
    Local,
    /// `cloud`: the cloud only, with no local fallback (contingency still wins).
    Cloud,
}

impl RouteOverride {
    /// Parses the header's value.
    pub(crate) fn parse(v: &str) -> Option<RouteOverride> {
        match v.trim().to_ascii_lowercase().as_str() {
            "local" => Some(RouteOverride::Local),
            "cloud" => Some(RouteOverride::Cloud),
            _ => None,
        }
    }
}

/// Where one request goes.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Upstreams to try, in order.
    pub(crate) cloud: Vec<Arc<Upstream>>,
    /// The local model that answers when none of them does.
    pub(crate) fallback: Option<String>,
    /// Why the cloud is skipped entirely, when it is.
    pub(crate) skipped: Option<FailReason>,
}

/// Contingency mode: its state and who set it last.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ContingencyState {
    /// Everything goes local.
    pub enabled: bool,
    /// When it last changed (RFC 3339).
    pub since: String,
    /// What set it: `config`, `environment`, `admin`.
    pub source: String,
}

/// One upstream as readiness and the admin API show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamStatus {
    /// Its name.
    pub name: String,
    /// `openai` or `anthropic`.
    pub kind: &'static str,
    /// `closed`, `half_open` or `open`.
    pub breaker: &'static str,
    /// Seconds until a probe may try it again, while open.
    pub retry_in_secs: Option<f64>,
    /// The models it serves.
    pub models: Vec<String>,
    /// Its local fallback.
    pub fallback: Option<String>,
}

/// The router.
pub struct Router {
    upstreams: Vec<Arc<Upstream>>,
    mode: RouteMode,
    contingency: AtomicBool,
    contingency_meta: Mutex<(SystemTime, String)>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("upstreams", &self.upstreams)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router for the configuration.
    pub fn new(config: &RouterConfig) -> Result<Router, String> {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::new(u.clone(), config.breaker).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let (enabled, source) = match (config.mode, config.contingency) {
            (RouteMode::LocalOnly, _) => (true, "config"),
            (_, true) => (true, "environment"),
            _ => (false, "config"),
        };
        let router = Router {
            upstreams,
            mode: config.mode,
            contingency: AtomicBool::new(enabled),
            contingency_meta: Mutex::new((SystemTime::now(), source.to_owned())),
        };
        router.publish();
        Ok(router)
    }

    /// Whether any upstream serves `model` (so requests for it are routed).
    pub fn serves(&self, model: &str) -> bool {
        self.upstreams.iter().any(|u| u.config.serves(model))
    }

    /// Where a request for `model` goes.
    pub(crate) fn plan(&self, model: &str, over: Option<RouteOverride>) -> Plan {
        let chain: Vec<Arc<Upstream>> = self
            .upstreams
            .iter()
            .filter(|u| u.config.serves(model))
            .cloned()
            .collect();
        let fallback = chain.iter().find_map(|u| u.config.fallback.clone());
        if self.contingency.load(Ordering::Acquire) {
            return Plan {
                cloud: vec![],
                fallback,
                skipped: Some(FailReason::Contingency),
            };
        }
        match over {
            Some(RouteOverride::Local) => Plan {
                cloud: vec![],
                fallback,
                skipped: Some(FailReason::Requested),
            },
            Some(RouteOverride::Cloud) => Plan {
                cloud: chain,
                fallback: None,
                skipped: None,
            },
            None => Plan {
                cloud: chain,
                fallback,
                skipped: None,
            },
        }
    }

    /// Contingency mode now.
    pub fn contingency(&self) -> ContingencyState {
        let meta = self
            .contingency_meta
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        ContingencyState {
            enabled: self.contingency.load(Ordering::Acquire),
            since: chrono::DateTime::<chrono::Utc>::from(meta.0)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            source: meta.1,
        }
    }

    /// Switches contingency mode; returns the new state.
    pub fn set_contingency(&self, enabled: bool, source: &str) -> ContingencyState {
        let was = self.contingency.swap(enabled, Ordering::AcqRel);
        if was != enabled {
            *self
                .contingency_meta
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = (SystemTime::now(), source.to_owned());
            tracing::warn!(enabled, source, "contingency mode changed");
        }
        self.publish();
        self.contingency()
    }

    /// Every upstream's state.
    pub fn status(&self) -> Vec<UpstreamStatus> {
        self.upstreams
            .iter()
            .map(|u| UpstreamStatus {
                name: u.config.name.clone(),
                kind: match u.config.kind {
                    crate::config::UpstreamKind::OpenAi => "openai",
                    crate::config::UpstreamKind::Anthropic => "anthropic",
                },
                breaker: u.state().name(),
                retry_in_secs: u.open_for().map(|d| d.as_secs_f64()),
                models: u.config.models.clone(),
                fallback: u.config.fallback.clone(),
            })
            .collect()
    }

    /// Whether routing is configured at all.
    pub fn is_configured(&self) -> bool {
        !self.upstreams.is_empty()
    }

    /// The configured mode.
    pub fn mode(&self) -> RouteMode {
        self.mode
    }

    /// Updates the router's gauges.
    pub(crate) fn publish(&self) {
        metrics::gauge!("backstop_contingency").set(if self.contingency.load(Ordering::Acquire) {
            1.0
        } else {
            0.0
        });
        for u in &self.upstreams {
            metrics::gauge!("backstop_breaker_state", "upstream" => u.config.name.clone())
                .set(u.state().gauge());
        }
    }
}
