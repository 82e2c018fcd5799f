//! A fake Hugging Face hub, in-process on 127.0.0.1, answering the URLs hf-hub calls the way
//! huggingface.co answers them:
//!
//! * `GET /api/models/{owner}/{repo}/revision/{rev}[?blobs=true]`: the listing (`sha`,
//!   `siblings` with `rfilename`, and with `blobs=true` their `size` and `lfs.sha256`);
//! * `GET|HEAD /{owner}/{repo}/resolve/{rev}/{file}`: for an LFS file a 302 to a second
//!   listener (the "CDN", another port, so hf-hub's relative-redirect client stops there as it
//!   does at the real CDN) carrying `x-repo-commit`, `x-linked-etag` (the sha256) and
//!   `x-linked-size`; for a plain git file the bytes themselves with a git-style `etag`;
//! * `GET /cdn/{sha256}`: the bytes, honouring `Range: bytes=a-b` with `206` and
//!   `Content-Range: bytes a-b/len`.
//!
//! It is also a fake Ollama registry (`GET /v2/{ns}/{model}/manifests/{tag}` with
//! `Docker-Content-Digest`, `GET /v2/{ns}/{model}/blobs/{digest}` redirecting with a 307 to the
//! same CDN), for names without a hub host.
//!
//! A test can make it corrupt what it serves, cut connections after N bytes, answer every
//! request with one status, or claim a wrong `x-linked-etag`; it counts requests and body
//! bytes so tests can prove what was (not) downloaded.

#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};

/// The commit every revision of every fake repository resolves to.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Bytes per body chunk the fake writes (so a cut can happen mid-file).
const PIECE: usize = 16 * 1024;

/// A running fake hub; its servers stop when it is dropped.
pub struct FakeHub {
    /// `http://127.0.0.1:PORT`: what `HF_ENDPOINT` would be.
    pub base: String,
    state: Arc<Hub>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
struct FakeFile {
    repo: String,
    path: String,
    bytes: Bytes,
    sha256: String,
    lfs: bool,
}

#[derive(Default)]
struct Faults {
    corrupt: bool,
    /// Serve at most this many more body bytes, then cut every connection.
    drop_after: Option<u64>,
    answer: Option<StatusCode>,
    wrong_etag: bool,
    /// Sent as `x-linked-etag` instead of the digest, verbatim.
    etag_text: Option<String>,
    /// The listing claims every file is this many bytes.
    listed_size: Option<u64>,
    /// The listing gives no sizes, as without `blobs=true`.
    unlisted: bool,
    /// A range answer's `Content-Range` claims the file is this many bytes.
    claimed_size: Option<u64>,
}

struct Hub {
    files: Mutex<Vec<FakeFile>>,
    faults: Mutex<Faults>,
    requests: AtomicU64,
    body_bytes: AtomicU64,
    last_activity: Mutex<Instant>,
    cdn: OnceLock<String>,
    authorization: Mutex<Option<String>>,
    paths: Mutex<Vec<String>>,
    /// Registry manifests by `ns/model:tag`.
    manifests: Mutex<Vec<(String, Bytes)>>,
}

impl Hub {
    fn touch(&self) {
        *self.last_activity.lock().unwrap() = Instant::now();
    }

    fn find_path(&self, repo: &str, path: &str) -> Option<FakeFile> {
        self.files
            .lock()
            .unwrap()
            .iter()
            .find(|f| f.repo == repo && f.path == path)
            .cloned()
    }

    fn find_sha(&self, sha: &str) -> Option<FakeFile> {
        self.files
            .lock()
            .unwrap()
            .iter()
            .find(|f| f.sha256 == sha)
            .cloned()
    }
}

/// The sha256 of bytes, as 64 hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A small valid GGUF (a header naming the `llama` architecture) followed by `padding`
/// deterministic pseudo-random bytes, so files of any size hash differently from each other.
pub fn tiny_gguf(padding: usize) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend(1u64.to_le_bytes());
    let key = "general.architecture";
    out.extend((key.len() as u64).to_le_bytes());
    out.extend(key.as_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend(5u64.to_le_bytes());
    out.extend(b"llama");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ padding as u64;
    out.extend((0..padding).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 24) as u8
    }));
    out
}

impl FakeHub {
    /// Starts the hub and its CDN on free loopback ports.
    pub async fn start() -> FakeHub {
        let state = Arc::new(Hub {
            files: Mutex::new(Vec::new()),
            faults: Mutex::new(Faults::default()),
            requests: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            last_activity: Mutex::new(Instant::now()),
            cdn: OnceLock::new(),
            authorization: Mutex::new(None),
            paths: Mutex::new(Vec::new()),
            manifests: Mutex::new(Vec::new()),
        });
        let hub_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cdn_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", hub_listener.local_addr().unwrap());
        let cdn = format!("http://{}", cdn_listener.local_addr().unwrap());
        state.cdn.set(cdn).unwrap();
        let count = middleware::from_fn_with_state(Arc::clone(&state), count_requests);
        let hub_app = Router::new()
            .route("/api/models/{owner}/{name}/revision/{rev}", get(listing))
            .route("/{owner}/{name}/resolve/{rev}/{*path}", get(resolve))
            .route("/v2/{ns}/{model}/manifests/{tag}", get(registry_manifest))
            .route("/v2/{ns}/{model}/blobs/{digest}", get(registry_blob))
            .layer(count.clone())
            .with_state(Arc::clone(&state));
        let cdn_app = Router::new()
            .route("/cdn/{sha}", get(cdn_file))
            .layer(count)
            .with_state(Arc::clone(&state));
        let tasks = vec![
            tokio::spawn(async move {
                axum::serve(hub_listener, hub_app).await.ok();
            }),
            tokio::spawn(async move {
                axum::serve(cdn_listener, cdn_app).await.ok();
            }),
        ];
        FakeHub { base, state, tasks }
    }

    fn add_file(&self, repo: &str, path: &str, bytes: Bytes, lfs: bool) -> String {
        let sha256 = sha256_hex(&bytes);
        self.state.files.lock().unwrap().push(FakeFile {
            repo: repo.to_owned(),
            path: path.to_owned(),
            bytes,
            sha256: sha256.clone(),
            lfs,
        });
        sha256
    }

    /// Adds a file stored with LFS (how the hub stores every GGUF); returns its sha256.
    pub fn add(&self, repo: &str, path: &str, bytes: impl Into<Bytes>) -> String {
        self.add_file(repo, path, bytes.into(), true)
    }

    /// Adds a plain git file: no LFS digest anywhere, a git-style etag.
    pub fn add_plain(&self, repo: &str, path: &str, bytes: impl Into<Bytes>) -> String {
        self.add_file(repo, path, bytes.into(), false)
    }

    /// Publishes an Ollama model (`library/smol`, `latest`) made of these `(media type,
    /// bytes)` layers plus a config blob; returns the manifest bytes as served.
    pub fn add_ollama_model(&self, name: &str, tag: &str, layers: &[(&str, &[u8])]) -> Vec<u8> {
        let entry = |bytes: &[u8], media_type: &str| {
            let sha = self.add_file(
                "",
                &format!("blob-{}", sha256_hex(bytes)),
                Bytes::copy_from_slice(bytes),
                true,
            );
            serde_json::json!({
                "mediaType": media_type,
                "digest": format!("sha256:{sha}"),
                "size": bytes.len(),
            })
        };
        let config = br#"{"model_format":"gguf","model_family":"llama","model_type":"1M","file_type":"Q8_0"}"#;
        let config = entry(config, "application/vnd.docker.container.image.v1+json");
        let layers: Vec<serde_json::Value> = layers.iter().map(|(m, b)| entry(b, m)).collect();
        let manifest = serde_json::to_vec_pretty(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": config,
            "layers": layers,
        }))
        .unwrap();
        self.state
            .manifests
            .lock()
            .unwrap()
            .push((format!("{name}:{tag}"), Bytes::from(manifest.clone())));
        manifest
    }

    /// Flips a byte in the middle of every file served.
    pub fn corrupt(&self, on: bool) {
        self.state.faults.lock().unwrap().corrupt = on;
    }

    /// Serves `n` more body bytes, then cuts the connection and every later one.
    pub fn drop_after(&self, n: u64) {
        self.state.faults.lock().unwrap().drop_after = Some(n);
    }

    /// Claims a wrong sha256 in `x-linked-etag` (the listing stays right).
    pub fn wrong_etag(&self, on: bool) {
        self.state.faults.lock().unwrap().wrong_etag = on;
    }

    /// Sends this text as `x-linked-etag` (a hostile mirror's path, say).
    pub fn etag_text(&self, text: &str) {
        self.state.faults.lock().unwrap().etag_text = Some(text.to_owned());
    }

    /// Lists every file, and every layer in a registry manifest, as this many bytes (a model
    /// larger than any disk); the bytes served stay what they are.
    pub fn list_size(&self, bytes: u64) {
        self.state.faults.lock().unwrap().listed_size = Some(bytes);
    }

    /// Lists files without their sizes or sha256, as a mirror that ignores `blobs=true` does.
    pub fn unlist_sizes(&self) {
        self.state.faults.lock().unwrap().unlisted = true;
    }

    /// Says in every range answer's `Content-Range` that the file is this many bytes (a file
    /// larger than any disk); the bytes served stay what they are.
    pub fn claim_size(&self, bytes: u64) {
        self.state.faults.lock().unwrap().claimed_size = Some(bytes);
    }

    /// Answers every request with this status.
    pub fn answer_with(&self, status: u16) {
        self.state.faults.lock().unwrap().answer = Some(StatusCode::from_u16(status).unwrap());
    }

    /// Clears every fault.
    pub fn heal(&self) {
        *self.state.faults.lock().unwrap() = Faults::default();
    }

    /// Requests received, both listeners.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// File bytes sent in response bodies.
    pub fn body_bytes(&self) -> u64 {
        self.state.body_bytes.load(Ordering::SeqCst)
    }

    /// The paths requested so far, in order.
    pub fn paths(&self) -> Vec<String> {
        self.state.paths.lock().unwrap().clone()
    }

    /// Zeroes the counters.
    pub fn reset_counters(&self) {
        self.state.requests.store(0, Ordering::SeqCst);
        self.state.body_bytes.store(0, Ordering::SeqCst);
        self.state.paths.lock().unwrap().clear();
    }

    /// The `Authorization` header of the last request.
    pub fn last_authorization(&self) -> Option<String> {
        self.state.authorization.lock().unwrap().clone()
    }

    /// Waits until nothing has reached the fake for a while: a failed download's leftover
    /// chunk requests (hf-hub does not cancel them) have run their course.
    pub async fn wait_quiet(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let idle = self.state.last_activity.lock().unwrap().elapsed();
            if idle > Duration::from_millis(400) {
                return;
            }
            assert!(Instant::now() < deadline, "the fake hub never went quiet");
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn count_requests(State(hub): State<Arc<Hub>>, request: Request, next: Next) -> Response {
    hub.requests.fetch_add(1, Ordering::SeqCst);
    hub.paths
        .lock()
        .unwrap()
        .push(request.uri().path().to_owned());
    *hub.authorization.lock().unwrap() = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    hub.touch();
    if let Some(status) = hub.faults.lock().unwrap().answer {
        return (status, "fault injected").into_response();
    }
    next.run(request).await
}

fn not_found(code: &'static str, message: &str) -> Response {
    let mut r = (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response();
    r.headers_mut()
        .insert("x-error-code", HeaderValue::from_static(code));
    r
}

fn known_revision(rev: &str) -> bool {
    rev == "main" || rev == COMMIT
}

async fn listing(
    State(hub): State<Arc<Hub>>,
    Path((owner, name, rev)): Path<(String, String, String)>,
    uri: Uri,
) -> Response {
    let repo = format!("{owner}/{name}");
    let files: Vec<FakeFile> = hub
        .files
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.repo == repo)
        .cloned()
        .collect();
    if files.is_empty() {
        return not_found("RepoNotFound", "Repository not found");
    }
    if !known_revision(&rev) {
        return not_found("RevisionNotFound", &format!("Invalid rev id: {rev}"));
    }
    let blobs = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "blobs=true"));
    let (listed_size, unlisted) = {
        let faults = hub.faults.lock().unwrap();
        (faults.listed_size, faults.unlisted)
    };
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .map(|f| {
            if !blobs || unlisted {
                return serde_json::json!({ "rfilename": f.path });
            }
            let size = listed_size.unwrap_or(f.bytes.len() as u64);
            let mut s = serde_json::json!({
                "rfilename": f.path,
                "size": size,
                "blobId": &f.sha256[..40],
            });
            if f.lfs {
                s["lfs"] = serde_json::json!({
                    "sha256": f.sha256,
                    "size": size,
                    "pointerSize": 134,
                });
            }
            s
        })
        .collect();
    axum::Json(serde_json::json!({
        "_id": "0000",
        "id": repo,
        "modelId": repo,
        "sha": COMMIT,
        "private": false,
        "siblings": siblings,
    }))
    .into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    Path((owner, name, rev, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !known_revision(&rev) {
        return not_found("RevisionNotFound", &format!("Invalid rev id: {rev}"));
    }
    let Some(file) = hub.find_path(&format!("{owner}/{name}"), &path) else {
        return not_found("EntryNotFound", &format!("{path} does not exist"));
    };
    if !file.lfs {
        let mut r = serve(&hub, &file, &headers);
        let h = r.headers_mut();
        h.insert("x-repo-commit", HeaderValue::from_static(COMMIT));
        h.insert(
            header::ETAG,
            HeaderValue::from_str(&format!("\"{}\"", &file.sha256[..40])).unwrap(),
        );
        return r;
    }
    let etag = {
        let faults = hub.faults.lock().unwrap();
        match (&faults.etag_text, faults.wrong_etag) {
            (Some(text), _) => text.clone(),
            (None, true) => sha256_hex(b"not the file"),
            (None, false) => file.sha256.clone(),
        }
    };
    let location = format!("{}/cdn/{}", hub.cdn.get().unwrap(), file.sha256);
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, location)
        .header("x-repo-commit", COMMIT)
        .header("x-linked-etag", format!("\"{etag}\""))
        .header("x-linked-size", file.bytes.len())
        .header(header::ETAG, format!("\"{}\"", &file.sha256[..40]))
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .unwrap()
}

async fn cdn_file(
    State(hub): State<Arc<Hub>>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Response {
    match hub.find_sha(&sha) {
        Some(file) => {
            let mut r = serve(&hub, &file, &headers);
            r.headers_mut().insert(
                header::ETAG,
                HeaderValue::from_str(&format!("\"{sha}\"")).unwrap(),
            );
            r
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn registry_manifest(
    State(hub): State<Arc<Hub>>,
    Path((ns, model, tag)): Path<(String, String, String)>,
) -> Response {
    let key = format!("{ns}/{model}:{tag}");
    let found = hub
        .manifests
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, b)| b.clone());
    let listed_size = hub.faults.lock().unwrap().listed_size;
    let found = match (found, listed_size) {
        (Some(bytes), Some(size)) => {
            let mut m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            for layer in m["layers"].as_array_mut().unwrap() {
                layer["size"] = size.into();
            }
            Some(Bytes::from(serde_json::to_vec(&m).unwrap()))
        }
        (found, _) => found,
    };
    match found {
        Some(bytes) => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/vnd.docker.distribution.manifest.v2+json",
            )
            .header(
                "docker-content-digest",
                format!("sha256:{}", sha256_hex(&bytes)),
            )
            .body(Body::from(bytes))
            .unwrap(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]})),
        )
            .into_response(),
    }
}

async fn registry_blob(
    State(hub): State<Arc<Hub>>,
    Path((_ns, _model, digest)): Path<(String, String, String)>,
) -> Response {
    let Some(sha) = digest.strip_prefix("sha256:") else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if hub.find_sha(sha).is_none() {
        return StatusCode::NOT_FOUND.into_response();
    }
    Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header(
            header::LOCATION,
            format!("{}/cdn/{sha}", hub.cdn.get().unwrap()),
        )
        .body(Body::empty())
        .unwrap()
}

/// `bytes=a-b` / `bytes=a-`, clamped to the file; `Err` when unsatisfiable.
fn range(headers: &HeaderMap, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = headers
        .get(header::RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.parse().ok()?;
    let end: u64 = if b.is_empty() {
        len.saturating_sub(1)
    } else {
        b.parse::<u64>().ok()?.min(len.saturating_sub(1))
    };
    Some(if start >= len || start > end {
        Err(())
    } else {
        Ok((start, end))
    })
}

/// The file's bytes (or the asked-for range), cut or corrupted as the faults say.
fn serve(hub: &Arc<Hub>, file: &FakeFile, headers: &HeaderMap) -> Response {
    let len = file.bytes.len() as u64;
    let (status, start, end) = match range(headers, len) {
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(Err(())) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .unwrap()
        }
    };
    let (claimed, corrupt) = {
        let faults = hub.faults.lock().unwrap();
        (faults.claimed_size, faults.corrupt)
    };
    let mut slice = file.bytes.slice(start as usize..=end as usize);
    if corrupt {
        let middle = len / 2;
        if (start..=end).contains(&middle) {
            let mut v = slice.to_vec();
            v[(middle - start) as usize] ^= 0xff;
            slice = Bytes::from(v);
        }
    }
    let body_len = slice.len();
    let hub = Arc::clone(hub);
    let pieces = futures_util::stream::unfold((slice, false), move |(rest, cut)| {
        let hub = Arc::clone(&hub);
        async move {
            if cut {
                return None;
            }
            if rest.is_empty() {
                return None;
            }
            let mut n = rest.len().min(PIECE);
            {
                let mut faults = hub.faults.lock().unwrap();
                if let Some(left) = faults.drop_after.as_mut() {
                    n = n.min(*left as usize);
                    *left -= n as u64;
                }
            }
            hub.touch();
            if n == 0 {
                // Give the server a moment to flush what it buffered, as a real connection
                // would have delivered it, before cutting.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let cut: Result<Bytes, std::io::Error> = Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "fault injected: connection cut",
                ));
                return Some((cut, (Bytes::new(), true)));
            }
            hub.body_bytes.fetch_add(n as u64, Ordering::SeqCst);
            let piece = rest.slice(..n);
            let rest = rest.slice(n..);
            Some((Ok(piece), (rest, false)))
        }
    });
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, body_len)
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        let total = claimed.unwrap_or(len);
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{total}"),
        );
    }
    builder.body(Body::from_stream(pieces)).unwrap()
}
