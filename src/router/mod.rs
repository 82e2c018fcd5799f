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
    /// What set it: `config`, `environment`, `admin`, or `expiry` when it ended by itself.
    pub source: String,
    /// When it switches itself off (RFC 3339); `null` when it stays until switched.
    pub until: Option<String>,
}

/// Who last switched contingency mode, when, and until when it holds.
#[derive(Debug, Clone)]
struct Switch {
    since: SystemTime,
    source: String,
    until: Option<SystemTime>,
}

/// The `backstop_contingency` gauge: 1 while everything goes local.
fn publish_contingency(enabled: bool) {
    metrics::gauge!("backstop_contingency").set(if enabled { 1.0 } else { 0.0 });
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
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
    switch: Mutex<Switch>,
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
            switch: Mutex::new(Switch {
                since: SystemTime::now(),
                source: source.to_owned(),
                until: None,
            }),
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
        if self.in_contingency() {
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
        let enabled = self.in_contingency();
        let switch = self.switch().clone();
        ContingencyState {
            enabled,
            since: rfc3339(switch.since),
            source: switch.source,
            until: switch.until.filter(|_| enabled).map(rfc3339),
        }
    }

    fn switch(&self) -> std::sync::MutexGuard<'_, Switch> {
        // Plain values, valid whatever a panicking holder did.
        self.switch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether everything goes local now; a contingency whose time is up ends here.
    fn in_contingency(&self) -> bool {
        if !self.contingency.load(Ordering::Acquire) {
            return false;
        }
        let mut switch = self.switch();
        match switch.until {
            Some(until) if SystemTime::now() >= until => {
                // Under the lock, so it ends once, however many requests see it end.
                if self.contingency.swap(false, Ordering::AcqRel) {
                    *switch = Switch {
                        since: until,
                        source: "expiry".into(),
                        until: None,
                    };
                    tracing::warn!("contingency mode ended: its time was up");
                    publish_contingency(false);
                }
                false
            }
            _ => true,
        }
    }

    /// Switches contingency mode; returns the new state. Switched on with `until`, it switches
    /// itself off then (so an operator or a drill that goes away cannot leave the cloud path
    /// off); switched on without, it stays until switched off, whatever `until` it had.
    pub fn set_contingency(
        &self,
        enabled: bool,
        source: &str,
        until: Option<SystemTime>,
    ) -> ContingencyState {
        {
            let mut switch = self.switch();
            let was = self.contingency.swap(enabled, Ordering::AcqRel);
            if was != enabled {
                switch.since = SystemTime::now();
                switch.source = source.to_owned();
                tracing::warn!(enabled, source, until = ?until.map(rfc3339), "contingency mode changed");
            }
            switch.until = until.filter(|_| enabled);
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
        publish_contingency(self.in_contingency());
        for u in &self.upstreams {
            metrics::gauge!("backstop_breaker_state", "upstream" => u.config.name.clone())
                .set(u.state().gauge());
        }
    }
}
