//! Chat requests for models a cloud upstream serves: the cloud first, in the configured
//! order, skipping upstreams whose breaker is open, then the local fallback. Every answer
//! says who gave it (`x-backstop-backend`, `x-backstop-upstream`, and `x-backstop-failover`
//! with the reason when the local model stood in).

use std::borrow::Cow;
use std::time::Instant;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::openai::{self, ApiError};
use super::AppState;
use crate::router::breaker::Admit;
use crate::router::failure::FailReason;
use crate::router::reply::Reply;
use crate::router::upstream::Outcome;
use crate::router::RouteOverride;

/// Which backend answered, for the transparency headers.
#[derive(Debug, Clone)]
pub(crate) enum Served {
    /// A cloud upstream, by name.
    Cloud(String),
    /// The local model, by name.
    Local(String),
}

/// `x-backstop-backend`, `x-backstop-upstream` and, when the local model stood in for the
/// cloud, `x-backstop-failover`.
pub(crate) fn mark(mut resp: Response, served: &Served, failover: Option<FailReason>) -> Response {
    let (backend, name) = match served {
        Served::Cloud(n) => ("cloud", n.as_str()),
        Served::Local(n) => ("local", n.as_str()),
    };
    let h = resp.headers_mut();
    h.insert(
        HeaderName::from_static("x-backstop-backend"),
        HeaderValue::from_static(backend),
    );
    if let Ok(v) = HeaderValue::from_str(name) {
        h.insert(HeaderName::from_static("x-backstop-upstream"), v);
    }
    if let Some(reason) = failover {
        if let Ok(v) = HeaderValue::from_str(&reason.label()) {
            h.insert(HeaderName::from_static("x-backstop-failover"), v);
        }
    }
    resp
}

/// Reads `x-backstop-route`; an unknown value is the caller's mistake.
pub(crate) fn route_override(headers: &HeaderMap) -> Result<Option<RouteOverride>, ApiError> {
    match headers.get("x-backstop-route") {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(RouteOverride::parse)
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid(
                    "x-backstop-route",
                    "the x-backstop-route header must be `local` or `cloud`",
                )
            }),
    }
}

/// The answer to a routed chat request, as a reply (OpenAI's dialect) plus who served it.
/// Errors are in OpenAI's shape with their status.
pub(crate) async fn chat(
    state: &AppState,
    headers: &HeaderMap,
    body: &Value,
    model: &str,
    local_only: bool,
) -> Result<(Reply, Served, Option<FailReason>), (StatusCode, Value, Option<Served>)> {
    let over = route_override(headers).map_err(|e| (e.status(), e.to_json(), None))?;
    // A key that must stay local wins over the header.
    let over = if local_only {
        Some(RouteOverride::Local)
    } else {
        over
    };
    let capped = cap_tokens(state, body).map_err(|e| (e.status(), e.to_json(), None))?;
    let body = capped.as_ref();
    let plan = state.router.plan(model, over);
    let result = serve(state, body, model, plan).await;
    let noted = match &result {
        Ok((_, served, reason)) => Some((served.clone(), *reason)),
        Err((_, _, served)) => served.clone().map(|s| (s, None)),
    };
    if let Some((served, reason)) = noted {
        crate::security::audit::note(|r| {
            let (backend, name) = match &served {
                Served::Cloud(n) => ("cloud", n.clone()),
                Served::Local(n) => ("local", n.clone()),
            };
            r.backend = Some(backend.to_owned());
            r.upstream = Some(name);
            // The local engine names the model it ran; a cloud answer is for the one asked.
            if r.model.is_none() {
                r.model = Some(model.to_owned());
            }
            r.failover = reason.map(|f| f.label());
        });
    }
    match result {
        Ok((Reply::Forwarded(answer), served, reason)) => {
            note_usage(&answer.usage);
            Ok((Reply::Forwarded(answer), served, reason))
        }
        Ok((Reply::Whole(v), served, reason)) if matches!(served, Served::Cloud(_)) => {
            if let Some(usage) = v.get("usage") {
                note_usage(usage);
            }
            Ok((Reply::Whole(v), served, reason))
        }
        Ok((Reply::Stream(chunks), served, reason)) if matches!(served, Served::Cloud(_)) => {
            let wants_usage = body["stream_options"]["include_usage"]
                .as_bool()
                .unwrap_or(false);
            Ok((
                Reply::Stream(watch_usage(chunks, wants_usage)),
                served,
                reason,
            ))
        }
        other => other,
    }
}

/// The server's `max_tokens` cap holds for the cloud too (it bounds cost as much as time):
/// more is refused, and a request that names no limit gets the cap (the body is copied only
/// then).
fn cap_tokens<'b>(state: &AppState, body: &'b Value) -> Result<Cow<'b, Value>, ApiError> {
    let field = ["max_completion_tokens", "max_tokens"]
        .into_iter()
        .find(|f| !body[*f].is_null())
        .unwrap_or("max_tokens");
    let mut asked = match &body[field] {
        Value::Null => None,
        v => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    ApiError::invalid(field, format!("{field} must be a positive integer"))
                })?,
        ),
    };
    let before = asked;
    state.security.cap_tokens(&mut asked)?;
    if asked == before {
        return Ok(Cow::Borrowed(body));
    }
    let mut body = body.clone();
    body[field] = json!(asked);
    Ok(Cow::Owned(body))
}

/// The prompt and completion token counts in a cloud answer's (or chunk's) `usage` object,
/// when it has either.
fn usage_counts(usage: &Value) -> Option<(Option<u32>, Option<u32>)> {
    let count = |k: &str| usage[k].as_u64().and_then(|n| u32::try_from(n).ok());
    let (p, c) = (count("prompt_tokens"), count("completion_tokens"));
    (p.is_some() || c.is_some()).then_some((p, c))
}

/// Puts token counts into the request's record, for the audit log and the key's budget.
fn record_usage(r: &mut crate::security::audit::Record, (p, c): (Option<u32>, Option<u32>)) {
    r.prompt_tokens = p;
    r.completion_tokens = c;
}

/// Token counts of a cloud answer's `usage`, for the audit log and the key's token budget.
fn note_usage(usage: &Value) {
    if let Some(counts) = usage_counts(usage) {
        crate::security::audit::note(|r| record_usage(r, counts));
    }
}

/// Reads the usage of a cloud stream as it passes (upstreams are always asked for it), and
/// drops it again when the client did not ask for it: a chunk with no choices goes, a usage
/// field riding on another chunk is removed.
fn watch_usage(
    chunks: crate::router::reply::ChunkStream,
    wants_usage: bool,
) -> crate::router::reply::ChunkStream {
    use futures_util::StreamExt;
    let ticket = crate::security::audit::current();
    chunks
        .filter_map(move |c| {
            let text = match c {
                Ok(text) if text.contains("\"usage\"") => text,
                other => return std::future::ready(Some(other)),
            };
            let mut v = match serde_json::from_str::<Value>(&text) {
                Ok(v) if v.get("usage").is_some() => v,
                _ => return std::future::ready(Some(Ok(text))),
            };
            if let (Some(ticket), Some(counts)) = (&ticket, usage_counts(&v["usage"])) {
                ticket.update(|r| record_usage(r, counts));
            }
            if wants_usage {
                return std::future::ready(Some(Ok(text)));
            }
            if v["choices"].as_array().is_some_and(Vec::is_empty) {
                return std::future::ready(None);
            }
            if let Some(o) = v.as_object_mut() {
                o.remove("usage");
            }
            std::future::ready(Some(Ok(v.to_string())))
        })
        .boxed()
}

/// Tries the plan: the cloud in order, then the local fallback.
async fn serve(
    state: &AppState,
    body: &Value,
    model: &str,
    plan: crate::router::Plan,
) -> Result<(Reply, Served, Option<FailReason>), (StatusCode, Value, Option<Served>)> {
    let started = Instant::now();
    let mut reason = plan.skipped;
    if let Some(r) = plan.skipped {
        metrics::counter!("backstop_failovers_total", "upstream" => "-", "reason" => r.label())
            .increment(1);
    }
    for up in &plan.cloud {
        let name = up.config.name.clone();
        let (admit, probe) = up.admit();
        if admit == Admit::Skip {
            reason = Some(FailReason::BreakerOpen);
            metrics::counter!("backstop_failovers_total", "upstream" => name, "reason" => "breaker_open").increment(1);
            continue;
        }
        let outcome = up.chat(body).await;
        // When nothing was sent, a probe stays undecided: its guard, dropped armed, gives it
        // back.
        if !matches!(outcome, Outcome::Untranslatable { .. }) {
            if let Some(p) = probe {
                p.disarm();
            }
        }
        match outcome {
            Outcome::Answer(reply) => {
                if up.succeeded() {
                    tracing::info!(upstream = %name, "circuit breaker closed: the upstream answered again");
                }
                state.router.publish();
                metrics::counter!("backstop_routed_requests_total", "backend" => "cloud", "upstream" => name.clone()).increment(1);
                return Ok((reply, Served::Cloud(name), None));
            }
            Outcome::Refused { status, body } => {
                // The upstream is up; the request was the caller's problem.
                up.succeeded();
                state.router.publish();
                return Err((status, body, Some(Served::Cloud(name))));
            }
            Outcome::Untranslatable { body } => {
                return Err((StatusCode::BAD_REQUEST, body, Some(Served::Cloud(name))))
            }
            Outcome::Failed { reason: r, detail } => {
                let opened = up.failed();
                state.router.publish();
                tracing::warn!(upstream = %name, reason = %r, detail = %detail, elapsed_ms = started.elapsed().as_millis() as u64, "upstream failed; failing over");
                if opened {
                    tracing::warn!(upstream = %name, "circuit breaker opened: requests skip this upstream until a probe succeeds");
                }
                metrics::counter!("backstop_failovers_total", "upstream" => name, "reason" => r.label()).increment(1);
                reason = Some(r);
            }
        }
    }
    let Some(local) = plan.fallback else {
        let why = reason.map_or_else(|| "no upstream".to_owned(), |r| r.label());
        let e = json!({"error": {
            "message": format!("no upstream could answer for model `{model}` ({why}) and it has no local fallback"),
            "type": "server_error",
            "param": "model",
            "code": "upstream_unavailable",
        }});
        return Err((StatusCode::BAD_GATEWAY, e, None));
    };
    let served = Served::Local(local.clone());
    let valid = openai::convert::chat(&crate::api::body::JsonBody(body.clone()))
        .map_err(|e| (e.status(), e.to_json(), Some(served.clone())))?;
    let reply = openai::handlers::local_reply(state, &valid, openai::Kind::Chat, &local)
        .await
        .map_err(|e| (e.status(), e.to_json(), Some(served.clone())))?;
    metrics::counter!("backstop_routed_requests_total", "backend" => "local", "upstream" => local)
        .increment(1);
    Ok((reply, served, reason))
}

/// `POST /v1/chat/completions` for a routed model, answered in OpenAI's shape.
pub(crate) async fn openai_chat(
    state: &AppState,
    headers: &HeaderMap,
    body: &Value,
    model: &str,
    local_only: bool,
) -> Response {
    match chat(state, headers, body, model, local_only).await {
        Ok((reply, served, reason)) => mark(openai::handlers::render(reply), &served, reason),
        Err((status, body, served)) => {
            let resp = (status, Json(body)).into_response();
            match served {
                Some(s) => mark(resp, &s, None),
                None => resp,
            }
        }
    }
}
