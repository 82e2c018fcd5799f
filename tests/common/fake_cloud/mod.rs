//! A fake cloud provider, in-process on 127.0.0.1: the outside world the router fails over
//! from. One port plays two providers:
//!
//! * OpenAI-compatible: `POST /v1/chat/completions` (JSON, or SSE `chat.completion.chunk`
//!   events ending with `data: [DONE]`, honouring `stream_options.include_usage`) and
//!   `GET /v1/models`; `Authorization: Bearer KEY` is checked when a key is set.
//! * Anthropic Messages: `POST /v1/messages` (JSON `message`, or the exact SSE event sequence
//!   `message_start`, `content_block_start`, `ping`, `content_block_delta`…,
//!   `content_block_stop`, `message_delta`, `message_stop`); `x-api-key` and
//!   `anthropic-version` must be present. A forced tool (`tool_choice` `tool` or `any`) is
//!   answered with a `tool_use` whose `input` is built from the tool's `input_schema`.
//!
//! The answer is derived from the request so a test can tell the cloud answered and what it
//! received: the text is `cloud says: <last user message>`, cut into [`FakeCloud::set_chunks`]
//! pieces (one SSE delta each; usage counts one output token per piece and one input token
//! per whitespace-separated word of the messages), the model is echoed, ids count requests
//! (`chatcmpl-fake-N`, `msg_fake_N`).
//!
//! A [`Mode`] makes it fail in each way a cloud fails; every request that reaches it is
//! counted and logged (method, path, headers, JSON body), so tests can prove what the cloud
//! received, or that nothing reached it. `/_control` switches modes over HTTP (for the
//! `fake_cloud` example binary): see [`FakeCloud::serve_control`].

#![allow(dead_code)] // each test binary uses a different subset of these helpers

mod control;
pub mod wire;

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use control::{control_any, control_log, control_main, control_state};
use wire::{Api, Asked, Reply};

/// How many requests the log keeps (the newest); the counter counts them all.
pub const LOG_CAPACITY: usize = 1024;

/// How the fake answers. Every mode but `Refuse` counts and logs the request first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answers as the provider would.
    Ok,
    /// Nothing listens on the port: connecting is refused (RST), and open connections are
    /// reset. Back to `Ok` listens on the same port again.
    Refuse,
    /// This status, with a body in the provider's error shape (and `retry-after: 1` for 429,
    /// 503 and 529), whatever the request.
    Status(u16),
    /// Reads the request, then sends nothing at all (not even headers) for this long; then
    /// answers normally.
    StallBeforeFirstByte(Duration),
    /// Sends headers and `after_chunks` text deltas (a non-stream answer: headers and half
    /// its JSON), then nothing for `stall`, then the rest.
    StallMidStream {
        /// Text deltas sent before the stall (the opening frames are always sent).
        after_chunks: usize,
        /// How long nothing is sent.
        stall: Duration,
    },
    /// `200` with the promised content type and a body that is not what it promises.
    Garbage,
    /// Sends headers and `after_chunks` text deltas (a non-stream answer: headers and half
    /// its JSON), then drops the connection.
    CutMidStream {
        /// Text deltas sent before the cut (the opening frames are always sent).
        after_chunks: usize,
    },
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `POST`, `GET`, ...
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// Every header, names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON; `Null` when empty or not JSON.
    pub body: Value,
}

impl RecordedRequest {
    /// The first value of a header (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    fn to_json(&self) -> Value {
        let headers: serde_json::Map<String, Value> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json!({"method": self.method, "path": self.path, "headers": headers, "body": self.body})
    }
}

/// A running fake cloud; its port closes when it is dropped.
pub struct FakeCloud {
    /// `http://127.0.0.1:PORT` (OpenAI clients add `/v1`).
    pub base: String,
    /// The port it listens on, the same through every `Refuse`.
    pub addr: SocketAddr,
    cloud: Arc<Cloud>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

#[derive(Clone)]
struct Settings {
    mode: Mode,
    /// The key callers must send; `None` accepts any (and none, on the OpenAI side).
    key: Option<String>,
    /// Pieces per answer, at least 1.
    chunks: usize,
    /// Before each streamed piece after the first.
    chunk_delay: Duration,
    /// Before every answer.
    answer_delay: Duration,
}

struct Cloud {
    settings: Mutex<Settings>,
    door: Mutex<Door>,
    requests: AtomicU64,
    log: Mutex<VecDeque<RecordedRequest>>,
    addr: SocketAddr,
    /// So the port can be re-opened from a thread outside the runtime.
    runtime: tokio::runtime::Handle,
}

/// The listening socket, or while refusing, the same port bound but not listening (so it
/// stays ours and connecting to it is refused).
enum DoorState {
    Open(TcpListener),
    Shut(TcpSocket),
    Gone,
}

struct Door {
    state: DoorState,
    /// The accept task, waiting for the door to open.
    waker: Option<Waker>,
    /// Cancelled to reset every connection accepted so far.
    generation: CancellationToken,
}

fn bind(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

impl FakeCloud {
    /// Starts on a free loopback port.
    pub async fn start() -> FakeCloud {
        Self::start_on(0).await.expect("bind a loopback port")
    }

    /// Starts on `127.0.0.1:port` (0 for a free one).
    pub async fn start_on(port: u16) -> io::Result<FakeCloud> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], port)))?.listen(1024)?;
        let addr = listener.local_addr()?;
        let cloud = Arc::new(Cloud {
            settings: Mutex::new(Settings {
                mode: Mode::Ok,
                key: None,
                chunks: 4,
                chunk_delay: Duration::ZERO,
                answer_delay: Duration::ZERO,
            }),
            door: Mutex::new(Door {
                state: DoorState::Open(listener),
                waker: None,
                generation: CancellationToken::new(),
            }),
            requests: AtomicU64::new(0),
            log: Mutex::new(VecDeque::new()),
            addr,
            runtime: tokio::runtime::Handle::current(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(openai_chat))
            .route("/v1/models", get(models))
            .route("/v1/messages", post(anthropic_messages))
            .route("/_control", get(control_state).post(control_main))
            .route("/_control/log", get(control_log))
            .fallback(unknown_path)
            .layer(DefaultBodyLimit::max(64 << 20))
            .with_state(Arc::clone(&cloud));
        let listener = DoorListener(Arc::clone(&cloud));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Ok(FakeCloud {
            base: format!("http://{addr}"),
            addr,
            cloud,
            tasks: Mutex::new(vec![task]),
        })
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Opens a second port that serves only `/_control` and never refuses, so a process
    /// outside can switch the fake out of `Refuse` again; returns its base URL.
    pub async fn serve_control(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/_control", get(control_state).post(control_any))
            .route("/_control/log", get(control_log))
            .with_state(Arc::clone(&self.cloud));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        self.tasks.lock().unwrap().push(task);
        base
    }

    /// Switches the failure mode; it holds for every request that starts after this returns.
    /// Panics if the port cannot be listened on again (another process took it).
    pub fn set_mode(&self, mode: Mode) {
        self.cloud
            .set_mode(mode)
            .expect("re-open the fake cloud's port");
    }

    /// The mode now in force.
    pub fn mode(&self) -> Mode {
        self.cloud.settings().mode
    }

    /// The API key both providers must be sent (`None`: any key, or none for OpenAI).
    pub fn set_key(&self, key: Option<&str>) {
        self.cloud.settings.lock().unwrap().key = key.map(str::to_owned);
    }

    /// How many pieces (SSE deltas) the answer is cut into; at least 1.
    pub fn set_chunks(&self, n: usize) {
        self.cloud.settings.lock().unwrap().chunks = n.max(1);
    }

    /// A pause before each streamed piece after the first.
    pub fn set_chunk_delay(&self, delay: Duration) {
        self.cloud.settings.lock().unwrap().chunk_delay = delay;
    }

    /// A pause before every answer, whatever the mode: the cloud's latency.
    pub fn set_answer_delay(&self, delay: Duration) {
        self.cloud.settings.lock().unwrap().answer_delay = delay;
    }

    /// Requests that reached the fake since the start (or [`FakeCloud::clear_requests`]).
    pub fn request_count(&self) -> u64 {
        self.cloud.requests.load(Ordering::SeqCst)
    }

    /// The logged requests, oldest first (at most [`LOG_CAPACITY`]).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.cloud.log.lock().unwrap().iter().cloned().collect()
    }

    /// The newest logged request.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.cloud.log.lock().unwrap().back().cloned()
    }

    /// Empties the log and zeroes the counter.
    pub fn clear_requests(&self) {
        self.cloud.clear_requests();
    }
}

impl Drop for FakeCloud {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().iter() {
            t.abort();
        }
        let mut door = self.cloud.door.lock().unwrap();
        door.state = DoorState::Gone;
        door.generation.cancel();
    }
}

/// An address on which connecting is refused: a port bound and released at once. Nothing
/// else is likely to take it soon, but that is not guaranteed; [`Mode::Refuse`] keeps its
/// port reserved and is the one to use where it matters.
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl Cloud {
    fn settings(&self) -> Settings {
        self.settings.lock().unwrap().clone()
    }

    fn generation(&self) -> CancellationToken {
        self.door.lock().unwrap().generation.clone()
    }

    fn clear_requests(&self) {
        self.log.lock().unwrap().clear();
        self.requests.store(0, Ordering::SeqCst);
    }

    fn set_mode(&self, mode: Mode) -> io::Result<()> {
        let _rt = self.runtime.enter();
        let mut guard = self.door.lock().unwrap();
        let door = &mut *guard;
        let refuse = mode == Mode::Refuse;
        door.state = match std::mem::replace(&mut door.state, DoorState::Gone) {
            DoorState::Open(listener) if refuse => {
                drop(listener);
                door.generation.cancel();
                door.generation = CancellationToken::new();
                // Reserve the port at once; should that fail, nothing listens there anyway.
                bind(self.addr).map_or(DoorState::Gone, DoorState::Shut)
            }
            DoorState::Shut(socket) if !refuse => DoorState::Open(socket.listen(1024)?),
            DoorState::Gone if !refuse => DoorState::Open(bind(self.addr)?.listen(1024)?),
            same => same,
        };
        if let Some(w) = door.waker.take() {
            w.wake();
        }
        drop(guard);
        self.settings.lock().unwrap().mode = mode;
        Ok(())
    }

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Conn, SocketAddr)>> {
        let mut guard = self.door.lock().unwrap();
        let door = &mut *guard;
        if let DoorState::Open(listener) = &door.state {
            if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                return Poll::Ready(accepted.map(|(io, peer)| {
                    io.set_nodelay(true).ok();
                    (Conn::new(io, door.generation.clone()), peer)
                }));
            }
        }
        door.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Counts and logs a request; returns its number (from 1).
    fn record(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Value) -> u64 {
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let headers = headers
            .iter()
            .map(|(k, v)| {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (k.as_str().to_owned(), v)
            })
            .collect();
        let mut log = self.log.lock().unwrap();
        if log.len() == LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(RecordedRequest {
            method: method.to_string(),
            path: uri.path().to_owned(),
            headers,
            body: body.clone(),
        });
        n
    }
}

/// Accepts from whichever socket the door holds, waiting while it is shut.
struct DoorListener(Arc<Cloud>);

impl axum::serve::Listener for DoorListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            match poll_fn(|cx| self.0.poll_accept(cx)).await {
                Ok(accepted) => return accepted,
                // Out of file descriptors and the like: wait, as axum's own listener does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.0.addr)
    }
}

/// A connection that fails every read and write once its generation is cancelled, so
/// `Refuse` also resets connections a client keeps alive in its pool.
struct Conn {
    io: TcpStream,
    generation: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Conn {
    fn new(io: TcpStream, generation: CancellationToken) -> Conn {
        let killed = Box::pin(generation.clone().cancelled_owned());
        Conn {
            io,
            generation,
            killed,
        }
    }

    fn reset() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, "fake cloud: refusing")
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Polling the token here registers the wake-up: hyper always has a read pending.
        if this.generation.is_cancelled() || this.killed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Conn::reset()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.generation.is_cancelled() {
            return Poll::Ready(Err(Conn::reset()));
        }
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.generation.is_cancelled() {
            return Poll::Ready(Err(Conn::reset()));
        }
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.generation.is_cancelled() {
            return Poll::Ready(Err(Conn::reset()));
        }
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A received request, its body parsed, after the mode had its say.
struct Call {
    /// Its number, from 1 (ids are made of it).
    n: u64,
    /// The body as JSON (`Null` when it is not).
    body: Value,
    headers: HeaderMap,
    /// The settings when it arrived: a later switch does not change an answer under way.
    settings: Settings,
    /// Cancelled when `Refuse` resets the connections.
    generation: CancellationToken,
}

/// Counts and logs the request, waits `answer_delay`, and applies the modes that decide
/// before any answer exists; `Err` is the response to send instead.
async fn receive(
    cloud: &Cloud,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Call, Response> {
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let n = cloud.record(&method, &uri, &headers, &parsed);
    let settings = cloud.settings();
    let generation = cloud.generation();
    let api = Api::of(&uri, &headers);
    if !pause(&generation, settings.answer_delay).await {
        return Err(dropped());
    }
    match settings.mode {
        Mode::Refuse => return Err(dropped()),
        Mode::Status(code) => return Err(wire::error(api, code, None)),
        Mode::StallBeforeFirstByte(stall) if !pause(&generation, stall).await => {
            return Err(dropped())
        }
        Mode::Garbage => return Err(wire::garbage(parsed["stream"] == true)),
        _ => {}
    }
    Ok(Call {
        n,
        body: parsed,
        headers,
        settings,
        generation,
    })
}

impl Call {
    fn asked(&self) -> Asked<'_> {
        Asked {
            n: self.n,
            body: &self.body,
            headers: &self.headers,
            key: self.settings.key.as_deref(),
            chunks: self.settings.chunks,
        }
    }
}

/// Sleeps, unless the connection is reset first (then `false`).
async fn pause(generation: &CancellationToken, d: Duration) -> bool {
    if d.is_zero() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = generation.cancelled() => false,
    }
}

/// For a connection already reset: nothing of it reaches the wire.
fn dropped() -> Response {
    StatusCode::SERVICE_UNAVAILABLE.into_response()
}

/// Sends a reply the way the mode says: whole, stalled or cut after some chunks.
fn deliver(reply: Reply, call: &Call) -> Response {
    let (ctype, open, pieces, close, split_json) = match reply {
        Reply::Done(r) => return r,
        Reply::Json(v) => {
            // Pretty-printed, as OpenAI's API sends a whole answer.
            let bytes = Bytes::from(serde_json::to_vec_pretty(&v).unwrap());
            let half = bytes.slice(..bytes.len() / 2);
            let rest = bytes.slice(bytes.len() / 2..);
            ("application/json", vec![], vec![half, rest], vec![], true)
        }
        Reply::Events {
            open,
            pieces,
            close,
        } => ("text/event-stream", open, pieces, close, false),
    };
    let after = match call.settings.mode {
        Mode::StallMidStream { after_chunks, .. } | Mode::CutMidStream { after_chunks } => {
            Some(if split_json { 1 } else { after_chunks })
        }
        _ => None,
    };
    let delay = if split_json {
        Duration::ZERO
    } else {
        call.settings.chunk_delay
    };
    let mut builder = Response::builder().header(header::CONTENT_TYPE, ctype);
    if split_json {
        builder = builder.header(header::CONTENT_LENGTH, pieces[0].len() + pieces[1].len());
    } else {
        builder = builder.header(header::CACHE_CONTROL, "no-cache");
    }
    if after.is_none() && delay.is_zero() {
        // The fast path: the whole answer in one write.
        let all: Vec<u8> = open
            .iter()
            .chain(&pieces)
            .chain(&close)
            .flatten()
            .copied()
            .collect();
        return builder.body(Body::from(all)).unwrap();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
    let mode = call.settings.mode.clone();
    let generation = call.generation.clone();
    tokio::spawn(async move {
        for frame in open {
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
        let count = pieces.len();
        for (i, piece) in pieces.into_iter().chain(close).enumerate() {
            if Some(i) == after.map(|a| a.min(count)) {
                match mode {
                    Mode::StallMidStream { stall, .. } => {
                        if !pause(&generation, stall).await {
                            return;
                        }
                    }
                    _ => {
                        cut(&tx).await;
                        return;
                    }
                }
            }
            if i > 0 && i < count && !pause(&generation, delay).await {
                return;
            }
            if tx.send(Ok(piece)).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    builder.body(Body::from_stream(stream)).unwrap()
}

/// Ends a body with an error, so the server drops the connection, once what was sent
/// before has been taken off the channel and written out.
async fn cut(tx: &tokio::sync::mpsc::Sender<io::Result<Bytes>>) {
    while tx.capacity() < tx.max_capacity() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let err = io::Error::new(io::ErrorKind::ConnectionReset, "fake cloud: cut mid-stream");
    tx.send(Err(err)).await.ok();
}

async fn openai_chat(
    State(cloud): State<Arc<Cloud>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match receive(&cloud, method, uri, headers, body).await {
        Ok(call) => {
            let reply = wire::openai_reply(&call.asked());
            deliver(reply, &call)
        }
        Err(r) => r,
    }
}

async fn anthropic_messages(
    State(cloud): State<Arc<Cloud>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match receive(&cloud, method, uri, headers, body).await {
        Ok(call) => {
            let reply = wire::anthropic_reply(&call.asked());
            deliver(reply, &call)
        }
        Err(r) => r,
    }
}

/// `GET /v1/models`, in Anthropic's shape when `anthropic-version` is sent.
async fn models(
    State(cloud): State<Arc<Cloud>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let api = Api::of(&uri, &headers);
    let call = match receive(&cloud, method, uri, headers, Bytes::new()).await {
        Ok(call) => call,
        Err(r) => return r,
    };
    let rejection = match api {
        Api::OpenAi => wire::openai_rejection(&call.asked()),
        Api::Anthropic => wire::anthropic_rejection(&call.asked()),
    };
    match rejection {
        Some(r) => r,
        None => deliver(Reply::Json(wire::listing(api)), &call),
    }
}

/// Any other path: counted and logged (a test may want to see a wrong path), then 404.
async fn unknown_path(
    State(cloud): State<Arc<Cloud>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let api = Api::of(&uri, &headers);
    let path = uri.path().to_owned();
    match receive(&cloud, method, uri, headers, body).await {
        Ok(_) => wire::error(api, 404, Some(&format!("Unknown path {path} (fake cloud)"))),
        Err(r) => r,
    }
}
