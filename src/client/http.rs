//! A small HTTP client for the server's API: where it is, JSON calls, NDJSON streams, and
//! errors that say what went wrong in the server's own words.

use futures_util::StreamExt;
use serde_json::Value;

use crate::cli::ClientArgs;

/// Why a CLI command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No server answered.
    #[error("could not reach backstop at {url}: {reason} (start it with `backstop serve`, or point BACKSTOP_HOST/OLLAMA_HOST at it)")]
    Unreachable {
        /// The server address tried.
        url: String,
        /// The connection error.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The server's error message.
        message: String,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// Reading the terminal or a file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A bad command-line value.
    #[error("{0}")]
    Usage(String),
    /// The command ran and its check failed (the report says why).
    #[error("{0}")]
    Failed(String),
}

/// The server's base URL: the flag, else `BACKSTOP_HOST`, else `OLLAMA_HOST`, else the
/// default, in any of the forms `OLLAMA_HOST` accepts.
pub(crate) fn base_url(args: &ClientArgs) -> String {
    let raw = args
        .host
        .clone()
        .or_else(|| std::env::var("BACKSTOP_HOST").ok())
        .or_else(|| std::env::var("OLLAMA_HOST").ok())
        .unwrap_or_default();
    server_url(&raw)
}

/// A server address in any of the forms `OLLAMA_HOST` accepts (`host`, `host:port`, `:port`,
/// with or without a scheme; empty is this machine's default port) as a base URL.
pub(crate) fn server_url(raw: &str) -> String {
    let raw = raw.trim().trim_end_matches('/');
    let (scheme, rest) = match raw.split_once("://") {
        Some((s, r)) => (s, r),
        None => ("http", raw),
    };
    let rest = if rest.is_empty() { "127.0.0.1" } else { rest };
    // A bare host gets the default port; `0.0.0.0` (a bind address) means this machine.
    let has_port = rest.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':')
    });
    let default_port = if scheme == "https" {
        443
    } else {
        crate::config::DEFAULT_PORT
    };
    let mut host = if has_port {
        rest.to_owned()
    } else {
        format!("{rest}:{default_port}")
    };
    if let Some(port) = host.strip_prefix("0.0.0.0:") {
        host = format!("127.0.0.1:{port}");
    }
    if host.starts_with(':') {
        host = format!("127.0.0.1{host}");
    }
    format!("{scheme}://{host}")
}

/// The message of an error body in either API's shape (Ollama's `{"error": "..."}`, OpenAI's
/// `{"error": {"message": "..."}}`), else the body as it is.
pub(crate) fn error_message(body: String) -> String {
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| error_text(&v))
        .unwrap_or(body)
}

/// The message of a JSON value in either API's error shape, `None` when it is not one.
pub(crate) fn error_text(v: &Value) -> Option<String> {
    let e = v.get("error")?;
    e.as_str()
        .or_else(|| e.get("message").and_then(Value::as_str))
        .map(str::to_owned)
}

/// A connection to one server.
pub(crate) struct Client {
    pub(crate) base: String,
    http: reqwest::Client,
    api_key: Option<String>,
}

impl Client {
    pub(crate) fn new(args: &ClientArgs) -> Client {
        Client {
            base: base_url(args),
            http: reqwest::Client::new(),
            api_key: args
                .api_key
                .clone()
                .or_else(|| std::env::var("BACKSTOP_API_KEY").ok())
                .filter(|k| !k.is_empty()),
        }
    }

    /// A request to `path`, with the API key when one is set.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        }
    }

    async fn check(&self, resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        Err(ClientError::Server {
            status: status.as_u16(),
            message: error_message(text),
        })
    }

    /// `GET path` → JSON.
    pub(crate) async fn get(&self, path: &str) -> Result<Value, ClientError> {
        let resp = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.check(resp)
            .await?
            .json()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `GET path` → status and JSON, whatever the status.
    pub(crate) async fn get_any(&self, path: &str) -> Result<(u16, Value), ClientError> {
        let resp = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// `METHOD path` with a JSON body; the answer's body is returned as JSON when it is JSON.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<Value, ClientError> {
        let resp = self
            .request(method, path)
            .json(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let text = self
            .check(resp)
            .await?
            .text()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Like [`Client::send`], also returning the answer's headers.
    pub(crate) async fn send_with_headers(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<(reqwest::header::HeaderMap, Value), ClientError> {
        let resp = self
            .request(method, path)
            .json(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let resp = self.check(resp).await?;
        let headers = resp.headers().clone();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok((headers, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Uploads a file as a blob unless the server already has it.
    pub(crate) async fn upload_blob(
        &self,
        digest: &str,
        path: &std::path::Path,
    ) -> Result<(), ClientError> {
        let url = format!("{}/api/blobs/{digest}", self.base);
        let head = self
            .http
            .head(&url)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if head.status().is_success() {
            return Ok(());
        }
        let file = tokio::fs::File::open(path).await?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let resp = self
            .http
            .post(&url)
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.check(resp).await?;
        Ok(())
    }

    /// `POST path` with a JSON body, calling `each` for every object of the NDJSON answer.
    /// An `{"error": ...}` object ends the stream with that error.
    pub(crate) async fn stream(
        &self,
        path: &str,
        body: &Value,
        mut each: impl FnMut(Value) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let resp = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let mut bytes = self.check(resp).await?.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut handle = |line: &[u8]| -> Result<(), ClientError> {
            if line.iter().all(u8::is_ascii_whitespace) {
                return Ok(());
            }
            let v: Value =
                serde_json::from_slice(line).map_err(|e| ClientError::Protocol(e.to_string()))?;
            if let Some(err) = v.get("error").and_then(Value::as_str) {
                return Err(ClientError::Server {
                    status: 200,
                    message: err.to_owned(),
                });
            }
            each(v)
        };
        while let Some(chunk) = bytes.next().await {
            let chunk = chunk.map_err(|e| ClientError::Protocol(e.to_string()))?;
            buf.extend_from_slice(&chunk);
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                handle(&line)?;
            }
        }
        handle(&buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(host: Option<&str>) -> String {
        base_url(&ClientArgs {
            host: host.map(str::to_owned),
            api_key: None,
        })
    }

    #[test]
    fn server_addresses_are_read_the_way_ollama_host_is() {
        assert_eq!(url(Some("")), "http://127.0.0.1:11434");
        assert_eq!(url(Some("127.0.0.1:8080")), "http://127.0.0.1:8080");
        assert_eq!(url(Some("0.0.0.0")), "http://127.0.0.1:11434");
        assert_eq!(url(Some("https://example.com")), "https://example.com:443");
        assert_eq!(url(Some("http://box:1234/")), "http://box:1234");
        assert_eq!(url(Some(":9000")), "http://127.0.0.1:9000");
    }
}
