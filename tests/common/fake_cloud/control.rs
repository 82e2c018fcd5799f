//! `/_control`: switching the fake's mode and settings over HTTP, for a fake running as a
//! process of its own (the `fake_cloud` example), and reading its request log.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{Cloud, Mode, RecordedRequest};

/// The control body's mode, in the same shape `POST /_control` takes.
fn mode_json(mode: &Mode) -> Value {
    match mode {
        Mode::Ok => json!({"mode": "ok"}),
        Mode::Refuse => json!({"mode": "refuse"}),
        Mode::Status(s) => json!({"mode": "status", "status": s}),
        Mode::StallBeforeFirstByte(d) => {
            json!({"mode": "stall_before_first_byte", "stall_ms": d.as_millis() as u64})
        }
        Mode::StallMidStream {
            after_chunks,
            stall,
        } => json!({"mode": "stall_mid_stream", "after_chunks": after_chunks,
            "stall_ms": stall.as_millis() as u64}),
        Mode::Garbage => json!({"mode": "garbage"}),
        Mode::CutMidStream { after_chunks } => {
            json!({"mode": "cut_mid_stream", "after_chunks": after_chunks})
        }
    }
}

/// Reads `{"mode": ..., "status" | "stall_ms" | "after_chunks": ...}`.
fn parse_mode(body: &Value) -> Result<Mode, String> {
    let num = |key: &str| {
        body[key]
            .as_u64()
            .ok_or_else(|| format!("`{key}` (a whole number) is required for this mode"))
    };
    let ms = |key: &str| num(key).map(Duration::from_millis);
    Ok(match body["mode"].as_str() {
        Some("ok") => Mode::Ok,
        Some("refuse") => Mode::Refuse,
        Some("status") => Mode::Status(
            u16::try_from(num("status")?)
                .ok()
                .filter(|s| (100..1000).contains(s))
                .ok_or("`status` must be an HTTP status")?,
        ),
        Some("stall_before_first_byte") => Mode::StallBeforeFirstByte(ms("stall_ms")?),
        Some("stall_mid_stream") => Mode::StallMidStream {
            after_chunks: num("after_chunks")? as usize,
            stall: ms("stall_ms")?,
        },
        Some("garbage") => Mode::Garbage,
        Some("cut_mid_stream") => Mode::CutMidStream {
            after_chunks: num("after_chunks")? as usize,
        },
        _ => {
            return Err(
                "`mode` must be one of ok, refuse, status, stall_before_first_byte, \
                         stall_mid_stream, garbage, cut_mid_stream"
                    .to_owned(),
            )
        }
    })
}

fn control_json(cloud: &Cloud) -> Value {
    let s = cloud.settings();
    let mut v = mode_json(&s.mode);
    v["chunks"] = json!(s.chunks);
    v["chunk_delay_ms"] = json!(s.chunk_delay.as_millis() as u64);
    v["answer_delay_ms"] = json!(s.answer_delay.as_millis() as u64);
    v["key"] = json!(s.key.is_some());
    v["requests"] = json!(cloud.requests.load(Ordering::SeqCst));
    v
}

/// `GET /_control`: the current mode and settings, and the request counter.
pub(super) async fn control_state(State(cloud): State<Arc<Cloud>>) -> Response {
    axum::Json(control_json(&cloud)).into_response()
}

/// `GET /_control/log`: the logged requests, oldest first.
pub(super) async fn control_log(State(cloud): State<Arc<Cloud>>) -> Response {
    let log: Vec<Value> = cloud
        .log
        .lock()
        .unwrap()
        .iter()
        .map(RecordedRequest::to_json)
        .collect();
    axum::Json(json!({"requests": log})).into_response()
}

/// `POST /_control` on the provider port: everything but `refuse`, which would close the
/// very port it came through, leaving nothing to switch it back with.
pub(super) async fn control_main(State(cloud): State<Arc<Cloud>>, body: Bytes) -> Response {
    control(&cloud, &body, false)
}

/// `POST /_control` on the control port.
pub(super) async fn control_any(State(cloud): State<Arc<Cloud>>, body: Bytes) -> Response {
    control(&cloud, &body, true)
}

/// Applies `{"mode"?, mode fields, "chunks"?, "chunk_delay_ms"?, "answer_delay_ms"?,
/// "key"? (string or null), "clear_log"? (true)}` and answers the new state.
fn control(cloud: &Cloud, body: &[u8], may_refuse: bool) -> Response {
    let bad =
        |msg: String| (StatusCode::BAD_REQUEST, axum::Json(json!({"error": msg}))).into_response();
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return bad("the body must be a JSON object".to_owned());
    };
    const KNOWN: [&str; 10] = [
        "mode",
        "status",
        "stall_ms",
        "after_chunks",
        "chunks",
        "chunk_delay_ms",
        "answer_delay_ms",
        "key",
        "clear_log",
        "requests",
    ];
    if let Some(k) = fields.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return bad(format!("unknown field `{k}`; known: {}", KNOWN.join(", ")));
    }
    let body = Value::Object(fields);
    let mode = match body.get("mode").map(|_| parse_mode(&body)).transpose() {
        Ok(m) => m,
        Err(e) => return bad(e),
    };
    if mode == Some(Mode::Refuse) && !may_refuse {
        let msg = "switch to `refuse` through the control port (the fake_cloud example's \
                   second stdout line): this port is the one that stops listening";
        return (StatusCode::CONFLICT, axum::Json(json!({"error": msg}))).into_response();
    }
    let ms = |k: &str| body[k].as_u64().map(Duration::from_millis);
    {
        let mut s = cloud.settings.lock().unwrap();
        if let Some(n) = body["chunks"].as_u64() {
            s.chunks = (n as usize).max(1);
        }
        s.chunk_delay = ms("chunk_delay_ms").unwrap_or(s.chunk_delay);
        s.answer_delay = ms("answer_delay_ms").unwrap_or(s.answer_delay);
        match body.get("key") {
            Some(Value::String(k)) => s.key = Some(k.clone()),
            Some(Value::Null) => s.key = None,
            _ => {}
        }
    }
    if body["clear_log"] == true {
        cloud.clear_requests();
    }
    if let Some(mode) = mode {
        if let Err(e) = cloud.set_mode(mode) {
            let msg = format!("could not listen on {} again: {e}", cloud.addr);
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": msg})),
            )
                .into_response();
        }
    }
    axum::Json(control_json(cloud)).into_response()
}
