//! `backstop drill`: proves, on demand, that failover and recovery work on a running server.
//! It switches contingency on (the cloud path off), checks that requests for a cloud model are
//! answered locally, switches it back, checks that the cloud answers again, and reports.
//! Contingency is switched on for a bounded time ([`hold`]), and Ctrl-C switches it back at
//! once: a drill that is interrupted or killed cannot leave the cloud path off.

use std::time::Instant;

use reqwest::Method;
use serde_json::{json, Value};

use super::http::{Client, ClientError};
use crate::cli::DrillArgs;

/// One checked step.
struct Step {
    what: String,
    ok: bool,
    detail: String,
}

/// Runs the drill; `Ok(true)` when every step held.
pub async fn drill(args: DrillArgs) -> Result<bool, ClientError> {
    let client = Client::new(&args.client);
    let router = client.get("/admin/router").await?;
    let upstreams = router["upstreams"].as_array().cloned().unwrap_or_default();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => upstreams
            .iter()
            .flat_map(|u| u["models"].as_array().cloned().unwrap_or_default())
            .filter_map(|m| m.as_str().map(str::to_owned))
            .find(|m| !m.ends_with('*'))
            .ok_or_else(|| {
                ClientError::Usage(
                    "no cloud upstream is configured: there is no failover to drill".into(),
                )
            })?,
    };
    if router["contingency"]["enabled"] == true {
        return Err(ClientError::Usage(format!(
            "contingency mode is already on (since {}, set by {}); a drill needs the cloud path on to start",
            router["contingency"]["since"].as_str().unwrap_or("?"),
            router["contingency"]["source"].as_str().unwrap_or("?")
        )));
    }
    let mut steps = Vec::new();
    println!(
        "drill: model `{model}`, {} request(s), server {}",
        args.requests, client.base
    );

    let hold = hold(args.requests);
    let switched = client
        .send(
            Method::POST,
            "/admin/contingency",
            &json!({"enabled": true, "for": format!("{}s", hold.as_secs())}),
        )
        .await;
    steps.push(Step {
        what: "cloud path switched off (contingency on)".into(),
        ok: switched.as_ref().is_ok_and(|v| v["enabled"] == true),
        detail: match &switched {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        },
    });
    let mut interrupted = false;
    if switched.is_ok() {
        let local = async {
            for i in 1..=args.requests {
                let (ok, detail) = match ask(&client, &model).await {
                    Ok((backend, upstream, ms)) => (
                        backend == "local",
                        format!("answered by {backend} ({upstream}) in {ms} ms"),
                    ),
                    Err(e) => (false, e.to_string()),
                };
                steps.push(Step {
                    what: format!("request {i} answered locally"),
                    ok,
                    detail,
                });
            }
        };
        tokio::select! {
            () = local => {}
            _ = tokio::signal::ctrl_c() => interrupted = true,
        }
    }
    // Whatever happened above, the cloud path is switched back on.
    let restored = client
        .send(
            Method::POST,
            "/admin/contingency",
            &json!({"enabled": false}),
        )
        .await;
    steps.push(Step {
        what: "cloud path switched back on".into(),
        ok: restored.as_ref().is_ok_and(|v| v["enabled"] == false),
        detail: match &restored {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        },
    });
    if interrupted {
        report(&steps);
        println!("drill interrupted");
        return Ok(false);
    }
    let (ok, detail) = match ask(&client, &model).await {
        Ok((backend, upstream, ms)) => {
            let mut d = format!("answered by {backend} ({upstream}) in {ms} ms");
            if backend != "cloud" {
                let now = client.get("/admin/router").await.unwrap_or(Value::Null);
                d.push_str(&format!("; upstreams: {}", now["upstreams"]));
            }
            (backend == "cloud", d)
        }
        Err(e) => (false, e.to_string()),
    };
    steps.push(Step {
        what: "the cloud answers again".into(),
        ok,
        detail,
    });

    let all = report(&steps);
    println!("drill {}", if all { "passed" } else { "FAILED" });
    Ok(all)
}

/// How long the drill switches contingency on for: enough for its requests to a slow local
/// model (a minute, and half a minute each), after which the server switches it off by itself
/// should the drill be killed.
fn hold(requests: u32) -> std::time::Duration {
    std::time::Duration::from_secs(60 + 30 * u64::from(requests))
}

/// Prints the steps; whether every one held.
fn report(steps: &[Step]) -> bool {
    for s in steps {
        println!(
            "  [{}] {}{}",
            if s.ok { "pass" } else { "FAIL" },
            s.what,
            if s.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", s.detail)
            }
        );
    }
    steps.iter().all(|s| s.ok)
}

/// One short chat; returns who answered and how long it took.
async fn ask(client: &Client, model: &str) -> Result<(String, String, u128), ClientError> {
    let started = Instant::now();
    let (headers, _) = client
        .send_with_headers(
            Method::POST,
            "/v1/chat/completions",
            &json!({
                "model": model,
                "messages": [{"role": "user", "content": "backstop drill: reply with OK"}],
                "max_tokens": 8,
                "temperature": 0
            }),
        )
        .await?;
    let get = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned()
    };
    Ok((
        get("x-backstop-backend"),
        get("x-backstop-upstream"),
        started.elapsed().as_millis(),
    ))
}
