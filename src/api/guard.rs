//! Browser-facing protections Ollama has, so that a web page cannot use a local server:
//! the DNS-rebinding guard (a loopback server answers only requests addressed to a local
//! name) and CORS (only local origins plus the configured ones may read answers).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Which `Host` headers a server bound to loopback accepts.
#[derive(Debug, Clone)]
pub(crate) struct HostGuard {
    /// Off when the server listens beyond loopback (then keys and TLS protect it).
    enabled: bool,
    hostname: Option<String>,
}

impl HostGuard {
    /// A guard for a server listening on `listen`.
    pub(crate) fn new(listen: SocketAddr) -> Self {
        HostGuard {
            enabled: listen.ip().is_loopback(),
            hostname: hostname(),
        }
    }

    /// Ollama's rule: no Host, a loopback/private/unspecified IP, `localhost`, this machine's
    /// name, or a name under `.localhost`, `.local` or `.internal`.
    pub(crate) fn allows(&self, host: Option<&str>) -> bool {
        if !self.enabled {
            return true;
        }
        let Some(host) = host else { return true };
        let host = strip_port(host).to_ascii_lowercase();
        if host.is_empty() || host == "localhost" {
            return true;
        }
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return match ip {
                IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_unspecified(),
                IpAddr::V6(v6) => {
                    v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00
                }
            };
        }
        if self.hostname.as_deref() == Some(host.as_str()) {
            return true;
        }
        [".localhost", ".local", ".internal"]
            .iter()
            .any(|tld| host.ends_with(tld))
    }
}

/// `host:port` → `host`, IPv6 brackets kept.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()]);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => h,
        _ => host,
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
}

/// Middleware: 403 for a request whose Host is not local while bound to loopback.
pub(crate) async fn host_guard(
    State(guard): State<Arc<HostGuard>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    if guard.allows(host) {
        return next.run(request).await;
    }
    tracing::warn!(
        host = host.unwrap_or(""),
        "refused a request for a foreign host name (DNS rebinding guard)"
    );
    (
        StatusCode::FORBIDDEN,
        axum::Json(serde_json::json!({"error": "forbidden: this server only answers requests addressed to a local host name"})),
    )
        .into_response()
}

/// Whether a browser origin may call the API: local origins on any port, the schemes local
/// apps and editors use, and the configured list (exact origins, `scheme://*`, or `*`).
pub(crate) fn origin_allowed(origin: &str, configured: &[String]) -> bool {
    for c in configured {
        if c == "*" || c == origin {
            return true;
        }
        if let Some(scheme) = c.strip_suffix("://*") {
            if origin.starts_with(&format!("{scheme}://")) {
                return true;
            }
        }
    }
    for scheme in ["app", "file", "tauri", "vscode-webview", "vscode-file"] {
        if origin.starts_with(&format!("{scheme}://")) {
            return true;
        }
    }
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = strip_port(rest);
    matches!(host, "localhost" | "127.0.0.1" | "0.0.0.0" | "[::1]")
}

/// CORS with [`origin_allowed`]: preflights are answered, and a disallowed origin gets no
/// `Access-Control-Allow-Origin`, so the browser withholds the answer.
pub(crate) fn cors(configured: Vec<String>) -> CorsLayer {
    let configured = Arc::new(configured);
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin
                .to_str()
                .is_ok_and(|o| origin_allowed(o, &configured))
        }))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::USER_AGENT,
            header::HeaderName::from_static("x-requested-with"),
            header::HeaderName::from_static("x-api-key"),
            header::HeaderName::from_static("x-stainless-lang"),
            header::HeaderName::from_static("x-stainless-package-version"),
            header::HeaderName::from_static("x-stainless-os"),
            header::HeaderName::from_static("x-stainless-arch"),
            header::HeaderName::from_static("x-stainless-runtime"),
            header::HeaderName::from_static("x-stainless-runtime-version"),
            header::HeaderName::from_static("x-stainless-retry-count"),
            header::HeaderName::from_static("x-stainless-timeout"),
            header::HeaderName::from_static("openai-organization"),
            header::HeaderName::from_static("openai-project"),
        ])
        .max_age(std::time::Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> HostGuard {
        HostGuard {
            enabled: true,
            hostname: Some("box".into()),
        }
    }

    #[test]
    fn local_host_names_pass_the_rebinding_guard_and_foreign_ones_do_not() {
        let g = guard();
        for ok in [
            None,
            Some("localhost:11434"),
            Some("127.0.0.1:11434"),
            Some("[::1]:11434"),
            Some("10.0.0.5"),
            Some("box"),
            Some("app.localhost"),
            Some("printer.local:80"),
        ] {
            assert!(g.allows(ok), "{ok:?} refused");
        }
        for bad in [
            Some("evil.example.com"),
            Some("8.8.8.8:11434"),
            Some("localhost.evil.com"),
        ] {
            assert!(!g.allows(bad), "{bad:?} allowed");
        }
    }

    #[test]
    fn a_server_bound_beyond_loopback_does_not_check_host() {
        let g = HostGuard::new("0.0.0.0:11434".parse().unwrap());
        assert!(g.allows(Some("backstop.example.com")));
    }

    #[test]
    fn cors_allows_local_origins_and_only_configured_others() {
        assert!(origin_allowed("http://localhost:3000", &[]));
        assert!(origin_allowed("https://127.0.0.1", &[]));
        assert!(origin_allowed("vscode-webview://abc", &[]));
        assert!(!origin_allowed("https://evil.example.com", &[]));
        assert!(!origin_allowed("http://localhost.evil.com", &[]));
        let conf = vec![
            "https://app.example.com".to_string(),
            "chrome-extension://*".to_string(),
        ];
        assert!(origin_allowed("https://app.example.com", &conf));
        assert!(!origin_allowed("https://app.example.com.evil.io", &conf));
        assert!(origin_allowed("chrome-extension://abcdef", &conf));
        assert!(origin_allowed("https://anything", &["*".to_string()]));
    }
}
