//! `backstop check`: is the backstop really ready to take over? The API answers, the models
//! that must be there are there and loadable, no upstream's breaker is open, and a real
//! short inference runs at least `--min-tps` tokens per second. Exit 0 healthy, 1 degraded,
//! 2 down, for cron and systemd timers; with `--webhook`, a Slack/Teams-style message on
//! failure (or, with `--on-change`, whenever the state changes, recovery included).

use std::path::PathBuf;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cli::CheckArgs;
use crate::client::http::{Client, ClientError};

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Everything held.
    Healthy,
    /// It serves, but not as it should (slow, a model missing, a breaker open).
    Degraded,
    /// It does not serve.
    Down,
}

impl Status {
    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Healthy => 0,
            Status::Degraded => 1,
            Status::Down => 2,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Status::Healthy => "HEALTHY",
            Status::Degraded => "DEGRADED",
            Status::Down => "DOWN",
        }
    }
}

/// One checked fact.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked.
    pub check: String,
    /// What it means for the verdict.
    pub status: Status,
    /// What was found.
    pub detail: String,
}

/// The whole report (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The verdict: the worst finding.
    pub status: Status,
    /// The server checked.
    pub url: String,
    /// When.
    pub at: String,
    /// The model of the test inference.
    pub model: Option<String>,
    /// Its decode speed.
    pub tokens_per_second: Option<f64>,
    /// Every finding.
    pub findings: Vec<Finding>,
}

impl Report {
    fn add(&mut self, check: &str, status: Status, detail: impl Into<String>) {
        self.findings.push(Finding {
            check: check.to_owned(),
            status,
            detail: detail.into(),
        });
        self.status = self.status.max(status);
    }

    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut out = format!("backstop at {}: {}\n", self.url, self.status.word());
        for f in &self.findings {
            let mark = match f.status {
                Status::Healthy => "ok  ",
                Status::Degraded => "WARN",
                Status::Down => "FAIL",
            };
            out.push_str(&format!("  [{mark}] {}: {}\n", f.check, f.detail));
        }
        out
    }
}

/// Runs the checks.
pub async fn run_checks(args: &CheckArgs) -> Report {
    let client = Client::new(&args.client);
    let mut r = Report {
        status: Status::Healthy,
        url: client.base.clone(),
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        model: None,
        tokens_per_second: None,
        findings: Vec::new(),
    };
    if let Err(e) = client.get("/health").await {
        r.add("api", Status::Down, e.to_string());
        return r;
    }
    r.add("api", Status::Healthy, "answers");
    let ready = match client.get_any("/health/ready").await {
        Ok((200, v)) => {
            r.add("ready", Status::Healthy, "the configured models are loaded");
            v
        }
        Ok((status, v)) => {
            r.add(
                "ready",
                Status::Down,
                format!("not ready (HTTP {status}): {}", v["status"]),
            );
            return r;
        }
        Err(e) => {
            r.add("ready", Status::Down, e.to_string());
            return r;
        }
    };
    let listed: Vec<Value> = ready["models"].as_array().cloned().unwrap_or_default();
    if ready.get("models").is_none() {
        r.add(
            "details",
            Status::Healthy,
            "readiness details need an API key (--api-key)",
        );
    }
    let same = |a: &str, b: &str| {
        let norm = |s: &str| {
            if s.rsplit('/').next().is_some_and(|p| p.contains(':')) {
                s.to_ascii_lowercase()
            } else {
                format!("{}:latest", s.to_ascii_lowercase())
            }
        };
        norm(a) == norm(b)
    };
    for m in &args.models {
        if ready.get("models").is_none() {
            break;
        }
        match listed
            .iter()
            .find(|l| l["name"].as_str().is_some_and(|n| same(n, m)))
        {
            None => r.add(&format!("model {m}"), Status::Degraded, "missing"),
            Some(l) if l["loadable"] != true => r.add(
                &format!("model {m}"),
                Status::Degraded,
                "present but its file cannot be read",
            ),
            Some(l) => r.add(
                &format!("model {m}"),
                Status::Healthy,
                if l["loaded"] == true {
                    "loaded"
                } else {
                    "present, not loaded"
                },
            ),
        }
    }
    for u in ready["upstreams"].as_array().cloned().unwrap_or_default() {
        let name = u["name"].as_str().unwrap_or("?");
        match u["breaker"].as_str() {
            Some("closed") => r.add(
                &format!("upstream {name}"),
                Status::Healthy,
                "breaker closed",
            ),
            Some(state) => r.add(
                &format!("upstream {name}"),
                Status::Degraded,
                format!("breaker {state}: requests go to the local model"),
            ),
            None => {}
        }
    }
    if ready["contingency"]["enabled"] == true {
        r.add(
            "contingency",
            Status::Healthy,
            format!(
                "on since {} (set by {}): everything is answered locally",
                ready["contingency"]["since"],
                ready["contingency"]["source"].as_str().unwrap_or("?")
            ),
        );
    }
    // The test inference, on the first required model that is there, else a loaded one.
    let present = |m: &String| {
        ready.get("models").is_none()
            || listed
                .iter()
                .any(|l| l["name"].as_str().is_some_and(|n| same(n, m)))
    };
    let model = args
        .models
        .iter()
        .find(|m| present(m))
        .cloned()
        .or_else(|| {
            listed
                .iter()
                .find(|l| l["loaded"] == true)
                .or_else(|| listed.first())
                .and_then(|l| l["name"].as_str().map(str::to_owned))
        });
    let model = match model {
        Some(m) => m,
        None => match client.get("/api/tags").await {
            Ok(tags) => match tags["models"][0]["name"].as_str() {
                Some(m) => m.to_owned(),
                None => {
                    r.add("inference", Status::Down, "no model to test");
                    return r;
                }
            },
            Err(e) => {
                r.add("inference", Status::Down, e.to_string());
                return r;
            }
        },
    };
    r.model = Some(model.clone());
    let body = json!({
        "model": model,
        "prompt": "Count from 1 to 30, separated by commas.",
        "stream": false,
        "options": {"num_predict": args.tokens, "temperature": 0}
    });
    match client.send(Method::POST, "/api/generate", &body).await {
        Ok(v) => {
            let count = v["eval_count"].as_u64().unwrap_or(0);
            let ns = v["eval_duration"].as_u64().unwrap_or(0);
            if count < 2 || ns == 0 {
                r.add(
                    "inference",
                    Status::Degraded,
                    format!("the answer had {count} token(s): too few to time"),
                );
                return r;
            }
            // Intervals between tokens: one fewer than the tokens.
            let tps = (count - 1) as f64 / (ns as f64 / 1e9);
            r.tokens_per_second = Some(tps);
            let detail = format!("{model}: {count} tokens at {tps:.1} tokens/s");
            match args.min_tps {
                Some(min) if tps < min => r.add(
                    "inference",
                    Status::Degraded,
                    format!("{detail}, below the floor of {min}"),
                ),
                _ => r.add("inference", Status::Healthy, detail),
            }
        }
        Err(e) => r.add("inference", Status::Down, format!("{model}: {e}")),
    }
    r
}

/// What the last run found, kept for `--on-change`.
#[derive(Debug, Serialize, Deserialize)]
struct Remembered {
    url: String,
    status: Status,
}

fn state_file(args: &CheckArgs) -> PathBuf {
    if let Some(p) = &args.state {
        return p.clone();
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("backstop").join("check-state.json")
}

/// Decides whether to alert: on every failure, or with `--on-change` when the status
/// differs from the one last delivered.
fn should_alert(args: &CheckArgs, report: &Report) -> bool {
    let before: Option<Remembered> = std::fs::read(state_file(args))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|r: &Remembered| r.url == report.url);
    if args.on_change {
        // The first run alerts only if something is wrong.
        before.map_or(report.status != Status::Healthy, |b| {
            b.status != report.status
        })
    } else {
        report.status != Status::Healthy
    }
}

/// Remembers the status for `--on-change`; only once any alert for it was delivered, so a
/// lost alert is sent again by the next run.
fn remember(args: &CheckArgs, report: &Report) {
    let path = state_file(args);
    let now = Remembered {
        url: report.url.clone(),
        status: report.status,
    };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&path, serde_json::to_vec(&now).unwrap_or_default()) {
        eprintln!(
            "warning: cannot keep the check state in {}: {e}",
            path.display()
        );
    }
}

/// Posts the report as `{"text": ...}`, which Slack and Microsoft Teams incoming webhooks
/// both accept.
async fn alert(webhook: &str, report: &Report) -> Result<(), String> {
    let body = json!({ "text": report.text() });
    let resp = reqwest::Client::new()
        .post(webhook)
        .json(&body)
        .timeout(std::time::Duration::from_secs(15))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the webhook answered HTTP {}", resp.status()))
    }
}

/// `backstop check`: prints the report and returns the exit code.
pub async fn check(args: CheckArgs) -> Result<u8, ClientError> {
    let report = run_checks(&args).await;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", report.text());
    }
    if let Some(webhook) = &args.webhook {
        let delivered = if should_alert(&args, &report) {
            match alert(webhook, &report).await {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("error: the alert was not delivered: {e}");
                    false
                }
            }
        } else {
            true
        };
        if delivered {
            remember(&args, &report);
        }
    }
    Ok(report.status.exit_code())
}
