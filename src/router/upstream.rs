//! One cloud upstream: its HTTP client, its breaker, and one exchange with it under the three
//! timeouts, classified into an answer, the caller's own error, or a reason to fail over.
//!
//! A streamed answer is committed only once its first token (or its end) arrived: events
//! before that are held back, so an upstream that fails after its headers but before any
//! token still fails over, and nothing the client saw is ever restarted elsewhere.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use futures_util::stream::{self, BoxStream, StreamExt};
use serde_json::{json, Value};

use super::anthropic::upstream_reply::anthropic_response_to_openai;
use super::anthropic::upstream_request::openai_request_to_anthropic;
use super::anthropic::upstream_stream::AnthropicToOpenAi;
use super::breaker::{Admit, Breaker, State};
use super::failure::FailReason;
use super::reply::{ChunkStream, Forwarded, Reply, StreamFault};
use super::sse::{SseEvent, SseParser};
use crate::config::{BreakerConfig, UpstreamConfig, UpstreamKind};

/// How one exchange ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The upstream answered; the answer is committed.
    Answer(Reply),
    /// The upstream refused the request itself (a 4xx other than 429): the caller's problem,
    /// returned as it is, in OpenAI's error shape.
    Refused {
        /// The upstream's status.
        status: StatusCode,
        /// `{"error": {...}}`.
        body: Value,
    },
    /// The request could not be put in this upstream's terms (an Anthropic upstream and
    /// something its API cannot express): the caller's problem, and no news about the
    /// upstream's health, since nothing was sent.
    Untranslatable {
        /// `{"error": {...}}`, in OpenAI's shape.
        body: Value,
    },
    /// Try the next upstream, or the local model.
    Failed {
        /// The failure class.
        reason: FailReason,
        /// What exactly happened, for the log.
        detail: String,
    },
}

fn failed(reason: FailReason, detail: impl Into<String>) -> Outcome {
    Outcome::Failed {
        reason,
        detail: detail.into(),
    }
}

/// A cloud upstream.
pub(crate) struct Upstream {
    pub(crate) config: UpstreamConfig,
    /// Where chat requests go (`…/chat/completions` or `…/messages`), parsed once: parsing a
    /// URL per request was a measurable share of the router's CPU under load.
    endpoint: reqwest::Url,
    client: reqwest::Client,
    breaker: Mutex<Breaker>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

/// Classifies a transport error.
fn transport(e: &reqwest::Error) -> FailReason {
    // A connect timeout is both; it is a connection failure (the first byte never had a
    // chance), so `connect` is asked first.
    if e.is_connect() {
        FailReason::Connect
    } else if e.is_timeout() {
        FailReason::FirstByteTimeout
    } else {
        FailReason::Broken
    }
}

/// What to do when the client goes away while a probe is still in flight: the breaker must
/// not wait for a verdict that never comes.
pub(crate) struct ProbeGuard<'a> {
    upstream: &'a Upstream,
    armed: bool,
}

impl ProbeGuard<'_> {
    /// The probe reached a verdict.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.upstream.breaker().abandon_probe(Instant::now());
        }
    }
}

impl Upstream {
    /// An upstream with its own connection pool.
    pub(crate) fn new(config: UpstreamConfig, breaker: BreakerConfig) -> Result<Upstream, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| format!("upstream {}: {e}", config.name))?;
        let path = match config.kind {
            UpstreamKind::OpenAi => "chat/completions",
            UpstreamKind::Anthropic => "messages",
        };
        let endpoint = reqwest::Url::parse(&format!("{}/{path}", config.base_url))
            .map_err(|e| format!("upstream {}: {e}", config.name))?;
        Ok(Upstream {
            config,
            endpoint,
            client,
            breaker: Mutex::new(Breaker::new(breaker)),
        })
    }

    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its breaker's state.
    pub(crate) fn state(&self) -> State {
        self.breaker().state()
    }

    /// Seconds until a probe may run, while the breaker is open.
    pub(crate) fn open_for(&self) -> Option<Duration> {
        self.breaker().open_for(Instant::now())
    }

    /// Whether a request may try this upstream now; a probe comes with a guard.
    pub(crate) fn admit(&self) -> (Admit, Option<ProbeGuard<'_>>) {
        let admit = self.breaker().admit(Instant::now());
        let guard = (admit == Admit::Probe).then_some(ProbeGuard {
            upstream: self,
            armed: true,
        });
        (admit, guard)
    }

    /// The upstream worked; returns whether this closed its breaker.
    pub(crate) fn succeeded(&self) -> bool {
        self.breaker().success()
    }

    /// The upstream failed; returns whether this opened its breaker.
    pub(crate) fn failed(&self) -> bool {
        self.breaker().failure(Instant::now())
    }

    /// One exchange: `body` is an OpenAI chat request as the client sent it.
    pub(crate) async fn chat(&self, body: &Value) -> Outcome {
        let deadline = Instant::now() + self.config.total_timeout;
        match self.config.kind {
            UpstreamKind::OpenAi => self.openai(body, deadline).await,
            UpstreamKind::Anthropic => self.anthropic(body, deadline).await,
        }
    }

    fn left(deadline: Instant) -> Duration {
        deadline.saturating_duration_since(Instant::now())
    }

    /// Sends a request and waits for its headers within the first-byte timeout; a failure
    /// status becomes a failure, another 4xx a refusal.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        deadline: Instant,
        refusal: fn(StatusCode, &[u8]) -> Value,
    ) -> Result<reqwest::Response, Outcome> {
        let wait = self.config.first_byte_timeout.min(Self::left(deadline));
        let resp = match tokio::time::timeout(wait, request.send()).await {
            Err(_) => {
                return Err(failed(
                    FailReason::FirstByteTimeout,
                    format!("no response within {wait:?}"),
                ))
            }
            Ok(Err(e)) => return Err(failed(transport(&e), e.to_string())),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = tokio::time::timeout(
            Self::left(deadline).min(Duration::from_secs(5)),
            resp.bytes(),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
        match FailReason::of_status(status.as_u16()) {
            Some(reason) => Err(failed(
                reason,
                format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ),
            )),
            None => Err(Outcome::Refused {
                status,
                body: refusal(status, &body),
            }),
        }
    }

    async fn openai(&self, body: &Value, deadline: Instant) -> Outcome {
        let mut req = body.clone();
        if let Some(m) = body.get("model").and_then(Value::as_str) {
            req["model"] = json!(self.config.upstream_model(m));
        }
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        if stream {
            // Always ask for the closing usage chunk: token budgets and the audit log need
            // the counts; the router drops it again for a client that did not ask.
            req["stream_options"]["include_usage"] = json!(true);
        }
        let mut request = self.client.post(self.endpoint.clone()).json(&req);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let resp = match self.send(request, deadline, openai_refusal).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        if !stream {
            return match whole_body(resp, deadline).await.map(Forwarded::check) {
                Ok(Ok(answer)) => Outcome::Answer(Reply::Forwarded(answer)),
                Ok(Err(why)) => failed(FailReason::Malformed, why),
                Err(outcome) => outcome,
            };
        }
        if !is_event_stream(&resp) {
            return failed(
                FailReason::Malformed,
                "a stream answered without text/event-stream",
            );
        }
        let mut events = EventStream::new(resp, deadline);
        let mut held: Vec<String> = Vec::new();
        // Hold events back until the first token (or the end): until then, fail over.
        loop {
            match events.next().await {
                Err(fault) => return fault.into_failure(),
                Ok(None) => {
                    if events.done {
                        break;
                    }
                    return failed(FailReason::Broken, "the stream ended before any token");
                }
                Ok(Some(ev)) => {
                    let v: Value = match serde_json::from_str(&ev.data) {
                        Ok(v) => v,
                        Err(_) => {
                            return failed(FailReason::Malformed, "a stream event that is not JSON")
                        }
                    };
                    if let Some(err) = v.get("error") {
                        return failed(
                            FailReason::Malformed,
                            format!("an error event before any token: {err}"),
                        );
                    }
                    let first_token = carries_content(&v);
                    held.push(ev.data);
                    if first_token {
                        break;
                    }
                }
            }
        }
        let rest = stream::unfold(Some(events), |state| async move {
            let mut events = state?;
            match events.next().await {
                Ok(Some(ev)) => {
                    if serde_json::from_str::<Value>(&ev.data).is_ok() {
                        Some((Ok(ev.data), Some(events)))
                    } else {
                        Some((
                            Err(StreamFault::server(
                                "the upstream sent an event that is not JSON",
                            )),
                            None,
                        ))
                    }
                }
                Ok(None) if events.done => None,
                Ok(None) => Some((
                    Err(StreamFault::server(
                        "the upstream's stream ended before its last event",
                    )),
                    None,
                )),
                Err(fault) => Some((Err(fault.into_stream_fault()), None)),
            }
        });
        let chunks: ChunkStream = stream::iter(held.into_iter().map(Ok)).chain(rest).boxed();
        Outcome::Answer(Reply::Stream(chunks))
    }

    /// Anthropic's Messages API: the OpenAI request is translated on the way out, and the
    /// answer (whole or streamed) translated back, so callers never see the difference.
    async fn anthropic(&self, body: &Value, deadline: Instant) -> Outcome {
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let translated = match openai_request_to_anthropic(
            body,
            self.config.upstream_model(model),
            self.config.default_max_tokens,
        ) {
            Ok(t) => t,
            Err(e) => {
                return Outcome::Untranslatable {
                    body: json!({"error": {"message": e.message, "type": "invalid_request_error", "param": e.param, "code": null}}),
                }
            }
        };
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&translated.body);
        if let Some(key) = &self.config.api_key {
            request = request.header("x-api-key", key);
        }
        let resp = match self.send(request, deadline, anthropic_refusal).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        let created = chrono::Utc::now().timestamp();
        if !stream {
            return match whole_json(resp, deadline).await {
                Ok(v) => {
                    match anthropic_response_to_openai(&v, translated.json_tool.as_deref(), created)
                    {
                        Ok(openai) => Outcome::Answer(Reply::Whole(openai)),
                        Err(e) => failed(FailReason::Malformed, e.to_string()),
                    }
                }
                Err(outcome) => outcome,
            };
        }
        if !is_event_stream(&resp) {
            return failed(
                FailReason::Malformed,
                "a stream answered without text/event-stream",
            );
        }
        let mut events = EventStream::new(resp, deadline);
        let mut translator =
            // The usage chunk always comes (see `openai` above).
            AnthropicToOpenAi::new(model, created, translated.json_tool);
        let mut held: Vec<String> = Vec::new();
        // Hold chunks back until the first token (or the end): until then, fail over.
        while !translator.emitted_content() && !translator.is_done() {
            match events.next().await {
                Err(fault) => return fault.into_failure(),
                Ok(None) => {
                    return failed(FailReason::Broken, "the stream ended before any token");
                }
                Ok(Some(ev)) => match translator.push_sse(&ev) {
                    Ok(chunks) => held.extend(chunks.into_iter().map(|c| c.to_string())),
                    Err(e) if e.is_overloaded() => {
                        return failed(FailReason::Overloaded, e.to_string())
                    }
                    Err(e) => return failed(FailReason::Malformed, e.to_string()),
                },
            }
        }
        let rest = stream::unfold(Some((events, translator)), |state| async move {
            let (mut events, mut translator) = state?;
            loop {
                if translator.is_done() {
                    return None;
                }
                match events.next().await {
                    Ok(Some(ev)) => match translator.push_sse(&ev) {
                        Ok(chunks) if chunks.is_empty() => continue,
                        Ok(chunks) => {
                            let items: Vec<Result<String, StreamFault>> =
                                chunks.into_iter().map(|c| Ok(c.to_string())).collect();
                            return Some((stream::iter(items), Some((events, translator))));
                        }
                        Err(e) => {
                            let fault =
                                StreamFault::server(format!("the upstream's stream failed: {e}"));
                            return Some((stream::iter(vec![Err(fault)]), None));
                        }
                    },
                    Ok(None) => {
                        return match translator.finish() {
                            Ok(()) => None,
                            Err(e) => Some((
                                stream::iter(vec![Err(StreamFault::server(e.to_string()))]),
                                None,
                            )),
                        }
                    }
                    Err(fault) => {
                        return Some((stream::iter(vec![Err(fault.into_stream_fault())]), None))
                    }
                }
            }
        })
        .flatten();
        let chunks: ChunkStream = stream::iter(held.into_iter().map(Ok)).chain(rest).boxed();
        Outcome::Answer(Reply::Stream(chunks))
    }
}

/// The Messages API version backstop speaks.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The caller's error from an Anthropic upstream, in OpenAI's error shape.
fn anthropic_refusal(status: StatusCode, body: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = v["error"]["message"]
        .as_str()
        .map_or_else(|| String::from_utf8_lossy(body).into_owned(), str::to_owned);
    let kind = v["error"]["type"]
        .as_str()
        .unwrap_or("invalid_request_error");
    json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16().to_string()}})
}

/// Whether an OpenAI chunk is (or ends) the answer proper: text, a tool call, a finish reason,
/// or the closing usage chunk.
fn carries_content(v: &Value) -> bool {
    let choice = &v["choices"][0];
    choice["delta"]["content"]
        .as_str()
        .is_some_and(|s| !s.is_empty())
        || choice["delta"].get("tool_calls").is_some()
        || !choice["finish_reason"].is_null()
        || v["choices"].as_array().is_some_and(Vec::is_empty)
}

fn is_event_stream(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Reads a whole JSON body before the deadline.
async fn whole_json(resp: reqwest::Response, deadline: Instant) -> Result<Value, Outcome> {
    let bytes = whole_body(resp, deadline).await?;
    serde_json::from_slice(&bytes)
        .map_err(|_| failed(FailReason::Malformed, "a 200 whose body is not JSON"))
}

/// Reads a whole body before the deadline.
async fn whole_body(resp: reqwest::Response, deadline: Instant) -> Result<Bytes, Outcome> {
    let left = Upstream::left(deadline);
    match tokio::time::timeout(left, resp.bytes()).await {
        Err(_) => Err(failed(
            FailReason::TotalTimeout,
            "no whole answer within the total timeout",
        )),
        Ok(Err(e)) => Err(failed(FailReason::Broken, e.to_string())),
        Ok(Ok(b)) => Ok(b),
    }
}

/// The caller's error from an OpenAI-compatible upstream, as it was when it is OpenAI's
/// error shape, else wrapped into it.
fn openai_refusal(status: StatusCode, body: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.get("error").is_some_and(Value::is_object) => v,
        _ => json!({"error": {
            "message": String::from_utf8_lossy(body),
            "type": "invalid_request_error",
            "param": null,
            "code": status.as_u16().to_string(),
        }}),
    }
}

/// Why reading an event stream stopped.
pub(crate) enum EventFault {
    Timeout,
    Broken(String),
    Malformed(String),
}

impl EventFault {
    fn into_failure(self) -> Outcome {
        match self {
            EventFault::Timeout => failed(
                FailReason::TotalTimeout,
                "the stream ran past the total timeout before any token",
            ),
            EventFault::Broken(e) => failed(FailReason::Broken, e),
            EventFault::Malformed(e) => failed(FailReason::Malformed, e),
        }
    }

    fn into_stream_fault(self) -> StreamFault {
        match self {
            EventFault::Timeout => StreamFault {
                message: "the upstream ran past its total timeout".into(),
                kind: "server_error",
                code: Some("upstream_timeout"),
            },
            EventFault::Broken(e) => StreamFault {
                message: format!("the upstream's stream broke off: {e}"),
                kind: "server_error",
                code: Some("upstream_broken"),
            },
            EventFault::Malformed(e) => StreamFault {
                message: format!("the upstream's stream is malformed: {e}"),
                kind: "server_error",
                code: Some("upstream_malformed"),
            },
        }
    }
}

/// An upstream's SSE body, event by event, under the exchange's deadline.
pub(crate) struct EventStream {
    bytes: BoxStream<'static, reqwest::Result<Bytes>>,
    parser: SseParser,
    pending: std::collections::VecDeque<SseEvent>,
    deadline: Instant,
    /// `data: [DONE]` was seen (OpenAI's end); the stream ends there.
    pub(crate) done: bool,
}

impl EventStream {
    pub(crate) fn new(resp: reqwest::Response, deadline: Instant) -> Self {
        EventStream {
            bytes: resp.bytes_stream().boxed(),
            parser: SseParser::new(),
            pending: Default::default(),
            deadline,
            done: false,
        }
    }

    /// The next event; `Ok(None)` at the end of the body (or after `[DONE]`).
    pub(crate) async fn next(&mut self) -> Result<Option<SseEvent>, EventFault> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(ev) = self.pending.pop_front() {
                if ev.data == "[DONE]" {
                    self.done = true;
                    return Ok(None);
                }
                return Ok(Some(ev));
            }
            let left = Upstream::left(self.deadline);
            match tokio::time::timeout(left, self.bytes.next()).await {
                Err(_) => return Err(EventFault::Timeout),
                Ok(None) => {
                    if self.parser.has_partial() {
                        return Err(EventFault::Broken("the stream was cut mid-event".into()));
                    }
                    return Ok(None);
                }
                Ok(Some(Err(e))) => return Err(EventFault::Broken(e.to_string())),
                Ok(Some(Ok(bytes))) => {
                    let events = self
                        .parser
                        .push(&bytes)
                        .map_err(|e| EventFault::Malformed(e.to_string()))?;
                    self.pending.extend(events);
                }
            }
        }
    }
}
