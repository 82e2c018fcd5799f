//! The listener: accepts TCP connections (TLS through rustls when configured, with client
//! certificates for mTLS), speaks HTTP/1.1 and HTTP/2 on each, and holds the limits that
//! protect the process before any request exists: at most `max_connections` at once (more
//! wait in the kernel's backlog), and `header_timeout` for the request headers and the TLS
//! handshake, so slow-loris clients cannot pin connections; a connection with no request in
//! flight gets the same time to start one, on HTTP/1 and HTTP/2 alike. Each request carries
//! its peer address (`ConnectInfo`) for the allowlist, rate limits and audit log.
//!
//! A loop of our own rather than `axum::serve`, which offers neither TLS nor these limits;
//! the pieces are hyper-util's connection builder, tokio-util's task tracker (to drain) and
//! tokio-rustls.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use futures_util::FutureExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::either::Either;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::security::TlsConfig;

/// How the listener behaves.
pub(crate) struct ListenerConfig {
    /// TLS, if configured.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections served at once.
    pub(crate) max_connections: usize,
    /// Time a client gets for its request headers (and the TLS handshake).
    pub(crate) header_timeout: Duration,
    /// Time in-flight requests get to finish after the shutdown signal.
    pub(crate) drain_timeout: Duration,
}

/// Reads the certificate, key and (for mTLS) client CA into a rustls configuration that
/// offers HTTP/2 and HTTP/1.1.
pub(crate) fn tls_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", tls.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", tls.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| format!("{}: not a PEM private key: {e}", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: not a PEM CA bundle: {e}", ca.display()))?;
            for c in cas {
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} / {}: {e}", tls.cert.display(), tls.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight requests finish
/// within the drain timeout.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    config: ListenerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let connections = TaskTracker::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout);
    // Pings find HTTP/2 peers that went silent mid-request; the stream cap bounds one
    // connection. (hyper has no header timeout for HTTP/2: `Idle` closes idle connections.)
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(config.header_timeout.max(Duration::from_secs(1))))
        .keep_alive_timeout(config.header_timeout.max(Duration::from_secs(1)))
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let idle = Arc::new(Idle::new());
        let service = {
            let (app, idle) = (app.clone(), Arc::clone(&idle));
            TowerToHyperService::new(tower::service_fn(
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    let busy = Busy::new(Arc::clone(&idle));
                    app.clone()
                        .oneshot(req)
                        .map(move |res| res.map(|res| super::held::hold(res, busy)))
                },
            ))
        };
        let builder = Arc::clone(&builder);
        let tls = config.tls.clone();
        let timeout = config.header_timeout;
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let _permit = permit;
            let io = match tls {
                None => Either::Left(stream),
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => Either::Right(s),
                        Ok(Err(e)) => {
                            metrics::counter!("backstop_rejections_total", "reason" => "tls_handshake").increment(1);
                            tracing::info!(%peer, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            tokio::pin!(conn);
            let mut closing = false;
            loop {
                let check = idle.next_check(timeout);
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stop.wait_for(|s| *s), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    () = tokio::time::sleep_until(check.into()), if !closing => {
                        if idle.idle_for().is_some_and(|d| d >= timeout) {
                            tracing::debug!(%peer, "closing a connection with no request for {timeout:?}");
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    if stop_tx.send(true).is_err() {
        tracing::debug!("no connection was open");
    }
    connections.close();
    tokio::select! {
        () = connections.wait() => {}
        () = tokio::time::sleep(config.drain_timeout) => {
            tracing::warn!("requests did not finish within {:?}; closing them", config.drain_timeout);
        }
    }
}

/// When a connection last had a request in flight. A connection without one must bring the
/// next request's headers within the header timeout, or it is closed (HTTP/2: `GOAWAY`).
/// hyper enforces that for HTTP/1 once a request has begun, but not for a connection that
/// sends nothing at all (the version is never detected) nor for HTTP/2, where a client that
/// answers pings could otherwise hold a connection permit forever.
struct Idle {
    /// Requests in flight, and since when there have been none.
    state: Mutex<(usize, Instant)>,
}

impl Idle {
    fn new() -> Self {
        Self {
            state: Mutex::new((0, Instant::now())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (usize, Instant)> {
        // The state is two plain values, valid whatever a panicking holder did.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long the connection has been without a request; `None` while one is in flight.
    fn idle_for(&self) -> Option<Duration> {
        let (busy, since) = *self.lock();
        (busy == 0).then(|| since.elapsed())
    }

    /// When to look again: when the connection will have been idle for `timeout`, or a
    /// `timeout` from now while a request is in flight.
    fn next_check(&self, timeout: Duration) -> Instant {
        let (busy, since) = *self.lock();
        if busy == 0 {
            since + timeout
        } else {
            Instant::now() + timeout
        }
    }
}

/// A request in flight, from the moment the service is called until its response body has
/// been sent (or dropped).
struct Busy(Arc<Idle>);

impl Busy {
    fn new(idle: Arc<Idle>) -> Self {
        idle.lock().0 += 1;
        Self(idle)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.0 = state.0.saturating_sub(1);
        state.1 = Instant::now();
    }
}
