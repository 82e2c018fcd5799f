//! Secure by default: API keys with scopes and per-key policy, rate limits per key and per
//! client IP, the client allowlist, the audit log, TLS and the listener's limits. One
//! middleware ([`guard`]) applies the per-request rules, in this order: allowlist, key,
//! scope, rate limits, the key's model policy, then the audit ticket.

pub(crate) mod audit;
mod held;
pub mod keys;
pub(crate) mod limits;
pub(crate) mod listener;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::config::security::{Cidr, Scope, SecurityConfig};
use audit::{Auditor, Record, Ticket};
use keys::{AuthError, Key, KeyRing};
use limits::{retry_after_secs, IpLimits};

/// Marks a request whose key may only be answered locally; the router reads it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalOnly;

/// Marks a request that presented a valid key (public endpoints see it too, so readiness
/// can show details to key holders only).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Authenticated;

/// The per-request rules and their state.
pub struct Security {
    keys: KeyRing,
    ip: IpLimits,
    allow: Vec<Cidr>,
    metrics_public: bool,
    auditor: Option<Auditor>,
    max_body_bytes: usize,
    /// Most tokens one local answer may ask for.
    max_tokens: Option<u32>,
    /// Listening beyond loopback without keys was allowed with `--insecure`.
    pub insecure: bool,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("keys", &self.keys.is_enabled())
            .finish_non_exhaustive()
    }
}

impl Security {
    /// The rules of a configuration; starts the audit writer when there is an audit log.
    pub fn new(config: &SecurityConfig, max_body_bytes: usize, insecure: bool) -> Security {
        Security {
            keys: KeyRing::new(&config.keys),
            ip: IpLimits::new(config.ip_rpm),
            allow: config.allow_cidrs.clone(),
            metrics_public: config.metrics_public,
            auditor: config.audit.as_ref().map(Auditor::start),
            max_body_bytes,
            max_tokens: config.max_tokens,
            insecure,
        }
    }

    /// Applies the `max_tokens` cap: a request asking for more is refused, one asking for
    /// nothing gets the cap.
    pub(crate) fn cap_tokens(
        &self,
        asked: &mut Option<u32>,
    ) -> Result<(), crate::api::request::Invalid> {
        let Some(cap) = self.max_tokens else {
            return Ok(());
        };
        match *asked {
            Some(n) if n > cap => Err(crate::api::request::Invalid::new(
                "max_tokens",
                format!("max_tokens may be at most {cap} on this server, got {n}"),
            )),
            Some(_) => Ok(()),
            None => {
                *asked = Some(cap);
                Ok(())
            }
        }
    }

    /// Whether API keys are required.
    pub fn keys_enabled(&self) -> bool {
        self.keys.is_enabled()
    }

    /// Runs until the process ends: forgets idle per-IP buckets once a minute.
    pub async fn housekeeping_task(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            self.ip.prune();
        }
    }
}

/// What a path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Nothing: liveness and Ollama's banner.
    Public,
    Scope(Scope),
}

fn need(method: &Method, path: &str, metrics_public: bool) -> Need {
    let read = method == Method::GET || method == Method::HEAD;
    match path {
        "/" | "/health" | "/health/ready" if read => Need::Public,
        "/metrics" if metrics_public => Need::Public,
        "/metrics" | "/api/pull" | "/api/delete" | "/api/copy" | "/api/create" => {
            Need::Scope(Scope::Admin)
        }
        p if p.starts_with("/admin/") || p.starts_with("/api/blobs/") => Need::Scope(Scope::Admin),
        _ => Need::Scope(Scope::Inference),
    }
}

/// An error in the shape of the API the path belongs to.
pub(crate) fn api_error(
    path: &str,
    status: StatusCode,
    code: &'static str,
    message: &str,
) -> Response {
    let body = if path.starts_with("/api/") || path == "/" {
        json!({"error": message})
    } else if path == "/v1/messages" {
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            _ => "invalid_request_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": message}})
    } else {
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
    };
    (status, axum::Json(body)).into_response()
}

fn rejected(path: &str, status: StatusCode, code: &'static str, message: &str) -> Response {
    metrics::counter!("backstop_rejections_total", "reason" => code).increment(1);
    api_error(path, status, code, message)
}

fn too_many(path: &str, code: &'static str, message: &str, wait: std::time::Duration) -> Response {
    let mut r = rejected(path, StatusCode::TOO_MANY_REQUESTS, code, message);
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs(wait)),
    );
    r
}

/// The prompt part of a request body, for the audit log: a chat's messages (as JSON, roles
/// included), else the prompt or input text.
fn prompt_of(body: &Value) -> Option<String> {
    for field in ["messages", "prompt", "input", "system"] {
        match body.get(field) {
            Some(Value::String(s)) => return Some(s.clone()),
            Some(v @ (Value::Array(_) | Value::Object(_))) => return Some(v.to_string()),
            _ => {}
        }
    }
    None
}

fn request_id(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}

/// The per-request rules.
pub(crate) async fn guard(
    State(sec): State<Arc<Security>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |c| c.0.ip());
    let id = request_id(request.headers());
    let mut record = Record {
        ts: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        request_id: id.clone(),
        client_ip: ip.to_string(),
        method: method.to_string(),
        path: path.clone(),
        ..Default::default()
    };
    // Liveness probes and public metrics would only fill the audit log with noise.
    let audited = need(&method, &path, sec.metrics_public) != Need::Public;
    let auditor = sec.auditor.clone().filter(|_| audited);
    let response = match check(&sec, request, &path, &method, ip, &mut record).await {
        Ok((request, key)) => {
            let ticket = Ticket::new(record, auditor);
            let route = route_label(&path);
            ticket.on_done(move |r| {
                if let Some(key) = &key {
                    let tokens = r.prompt_tokens.unwrap_or(0) + r.completion_tokens.unwrap_or(0);
                    key.limits.charge(tokens);
                }
                access(route, r);
            });
            let resp = audit::scope(Arc::clone(&ticket), next.run(request)).await;
            ticket.update(|r| r.status = resp.status().as_u16());
            // The ticket is kept until the body has been sent: a stream's record is written
            // after its end, with its token counts.
            held::hold(resp, ticket)
        }
        Err(resp) => {
            record.status = resp.status().as_u16();
            access(route_label(&path), &record);
            if let Some(a) = &auditor {
                a.submit(record);
            }
            resp
        }
    };
    let mut response = response;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// The route a path belongs to, for metrics: a fixed set, so clients cannot make up labels.
fn route_label(path: &str) -> &'static str {
    const ROUTES: &[&str] = &[
        "/",
        "/health",
        "/health/ready",
        "/metrics",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/messages",
        "/api/version",
        "/api/generate",
        "/api/chat",
        "/api/tags",
        "/api/ps",
        "/api/show",
        "/api/embed",
        "/api/embeddings",
        "/api/pull",
        "/api/delete",
        "/api/copy",
        "/api/create",
        "/admin/contingency",
        "/admin/router",
    ];
    if let Some(r) = ROUTES.iter().find(|r| **r == path) {
        return r;
    }
    if path.starts_with("/v1/models/") {
        "/v1/models/{id}"
    } else if path.starts_with("/api/blobs/") {
        "/api/blobs/{digest}"
    } else {
        "other"
    }
}

/// The access log line and the request metrics of a finished request. Never the prompt.
fn access(route: &'static str, r: &Record) {
    let ok = (200..400).contains(&r.status);
    // Only names that were served become labels: a client cannot invent series.
    let model = if ok {
        r.model.clone().unwrap_or_default()
    } else {
        String::new()
    };
    let backend = r.backend.clone().unwrap_or_else(|| "local".to_owned());
    metrics::counter!(
        "backstop_requests_total",
        "route" => route,
        "model" => model,
        "backend" => backend,
        "status" => r.status.to_string()
    )
    .increment(1);
    metrics::histogram!("backstop_request_duration_seconds", "route" => route)
        .record(r.duration_ms as f64 / 1e3);
    if let Some(t) = r.prompt_tokens {
        metrics::counter!("backstop_request_prompt_tokens_total", "route" => route)
            .increment(u64::from(t));
    }
    if let Some(t) = r.completion_tokens {
        metrics::counter!("backstop_request_completion_tokens_total", "route" => route)
            .increment(u64::from(t));
    }
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                target: "backstop::access",
                request_id = %r.request_id,
                method = %r.method,
                path = %r.path,
                status = r.status,
                duration_ms = r.duration_ms,
                model = r.model.as_deref().unwrap_or(""),
                backend = r.backend.as_deref().unwrap_or(""),
                upstream = r.upstream.as_deref().unwrap_or(""),
                failover = r.failover.as_deref().unwrap_or(""),
                prompt_tokens = r.prompt_tokens.unwrap_or(0),
                completion_tokens = r.completion_tokens.unwrap_or(0),
                key = r.key.as_deref().unwrap_or(""),
                client_ip = %r.client_ip,
                "request"
            )
        };
    }
    // Probes poll every few seconds: their lines only at debug level.
    if route == "/health" || route == "/health/ready" || route == "/metrics" {
        line!(debug);
    } else {
        line!(info);
    }
}

/// Everything before the handler; `Err` is the refusal to send.
async fn check(
    sec: &Security,
    request: Request,
    path: &str,
    method: &Method,
    ip: IpAddr,
    record: &mut Record,
) -> Result<(Request, Option<Arc<Key>>), Response> {
    if !sec.allow.is_empty() && !sec.allow.iter().any(|c| c.contains(ip)) {
        tracing::warn!(client_ip = %ip, "refused a client outside allow_cidrs");
        return Err(rejected(
            path,
            StatusCode::FORBIDDEN,
            "ip_not_allowed",
            "forbidden: this client address is not allowed",
        ));
    }
    let need = need(method, path, sec.metrics_public);
    let mut key = None;
    if sec.keys.is_enabled() && need == Need::Public {
        // Not required here, but a valid key still identifies the caller.
        key = sec.keys.authenticate(request.headers()).ok();
    }
    if sec.keys.is_enabled() && need != Need::Public {
        match sec.keys.authenticate(request.headers()) {
            Ok(k) => key = Some(k),
            Err(AuthError::Missing) => {
                return Err(rejected(path, StatusCode::UNAUTHORIZED, "missing_api_key", "an API key is required: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`"))
            }
            Err(AuthError::Wrong) => {
                return Err(rejected(path, StatusCode::UNAUTHORIZED, "invalid_api_key", "the API key is not valid"))
            }
        }
    }
    if let Some(k) = &key {
        record.key = Some(k.name.clone());
        record.key_id = Some(k.id.clone());
        if let Need::Scope(scope) = need {
            if !k.has(scope) {
                let msg = match scope {
                    Scope::Admin => "this key lacks the `admin` scope this endpoint needs",
                    Scope::Inference => "this key lacks the `inference` scope this endpoint needs",
                };
                return Err(rejected(
                    path,
                    StatusCode::FORBIDDEN,
                    "insufficient_scope",
                    msg,
                ));
            }
        }
    }
    if need != Need::Public {
        if let Err(wait) = sec.ip.admit(ip) {
            return Err(too_many(
                path,
                "ip_rate_limited",
                "too many requests from this address; retry later",
                wait,
            ));
        }
        if let Some(k) = &key {
            if let Err(wait) = k.limits.admit() {
                return Err(too_many(
                    path,
                    "key_rate_limited",
                    "this key's rate limit is reached; retry later",
                    wait,
                ));
            }
        }
    }
    // The body: read once (it is small: the body limit applies) to learn the model for the
    // key's policy and the prompt for the audit log, then handed on unchanged.
    let wants_body = method == Method::POST
        && !path.starts_with("/api/blobs/")
        && (key.as_ref().is_some_and(|k| !k.models.is_empty()) || sec.auditor.is_some());
    let mut request = request;
    if wants_body {
        let (parts, body) = request.into_parts();
        let bytes: Bytes = match axum::body::to_bytes(body, sec.max_body_bytes).await {
            Ok(b) => b,
            Err(_) => {
                return Err(rejected(
                    path,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    &format!(
                        "request body is too large: the limit is {} bytes",
                        sec.max_body_bytes
                    ),
                ))
            }
        };
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            let models: Vec<&str> = ["model", "name", "source"]
                .iter()
                .filter_map(|f| v.get(*f).and_then(Value::as_str))
                .collect();
            record.model = models.first().map(|m| (*m).to_owned());
            if let Some(k) = &key {
                if let Some(m) = models.iter().find(|m| !k.may_use(m)) {
                    return Err(rejected(
                        path,
                        StatusCode::FORBIDDEN,
                        "model_not_allowed",
                        &format!("this key may not use model '{m}'"),
                    ));
                }
            }
            if let Some(p) = prompt_of(&v) {
                record.prompt_sha256 =
                    Some(crate::models::Digest::of(p.as_bytes()).hex().to_owned());
                record.prompt_chars = Some(p.chars().count());
                if sec.auditor.as_ref().is_some_and(|a| a.prompts) {
                    record.prompt = Some(p);
                }
            }
        }
        request = Request::from_parts(parts, Body::from(bytes));
    }
    if key.as_ref().is_some_and(|k| k.local_only) {
        request.extensions_mut().insert(LocalOnly);
    }
    if key.is_some() {
        request.extensions_mut().insert(Authenticated);
    }
    Ok((request, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_need_the_scopes_the_issue_lists() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(need(&get, "/health", false), Need::Public);
        assert_eq!(need(&get, "/", false), Need::Public);
        assert_eq!(need(&post, "/", false), Need::Scope(Scope::Inference));
        assert_eq!(need(&get, "/metrics", false), Need::Scope(Scope::Admin));
        assert_eq!(need(&get, "/metrics", true), Need::Public);
        for admin in [
            "/admin/contingency",
            "/api/pull",
            "/api/delete",
            "/api/copy",
            "/api/create",
            "/api/blobs/sha256:ab",
        ] {
            assert_eq!(
                need(&post, admin, false),
                Need::Scope(Scope::Admin),
                "{admin}"
            );
        }
        for inference in [
            "/v1/chat/completions",
            "/api/chat",
            "/api/tags",
            "/v1/models",
            "/health/ready",
        ] {
            assert_eq!(
                need(&post, inference, false),
                Need::Scope(Scope::Inference),
                "{inference}"
            );
        }
    }

    async fn body(r: Response) -> Value {
        let (_, b) = r.into_parts();
        serde_json::from_slice(&axum::body::to_bytes(b, 10_000).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn errors_take_the_shape_of_the_api_asked() {
        let ollama = body(api_error("/api/chat", StatusCode::UNAUTHORIZED, "x", "no")).await;
        assert_eq!(ollama, json!({"error": "no"}));
        let openai = body(api_error(
            "/v1/chat/completions",
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "no",
        ))
        .await;
        assert_eq!(openai["error"]["code"], "invalid_api_key");
        let anthropic = body(api_error("/v1/messages", StatusCode::FORBIDDEN, "x", "no")).await;
        assert_eq!(anthropic["error"]["type"], "permission_error");
    }

    #[test]
    fn the_prompt_is_the_messages_or_the_prompt_text() {
        assert_eq!(prompt_of(&json!({"prompt": "hi"})).as_deref(), Some("hi"));
        let m = prompt_of(&json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert!(m.contains("\"user\""));
        assert_eq!(prompt_of(&json!({"model": "m"})), None);
    }
}
