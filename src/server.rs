//! `backstop serve`: bind, load the models in the background, serve until a signal, then
//! drain streams and stop the engine threads.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::engine::PromptCache;
use crate::models::Models;
use crate::ops;
use crate::security::{listener, Security};

/// How long in-flight streams get to finish after SIGTERM/SIGINT.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why serving ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A configured model could not be loaded; it is never served.
    #[error("model `{0}` was not served: {1}")]
    Load(String, String),
    /// The TLS files could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The prompt cache's folder (`--cache-dir`) could not be made or read.
    #[error("cache folder {}: {source}", .dir.display())]
    CacheDir {
        /// The folder.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The router could not be set up.
    #[error("router: {0}")]
    Router(String),
    /// The HTTP server failed.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Serves until a shutdown signal, or until a model fails to load.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let metrics = ops::metrics::install();
    // Before binding: a folder another server holds is refused before anything listens.
    let cache = match &config.engine.cache_dir {
        Some(dir) => PromptCache::with_dir(config.engine.cache_ram, dir).map_err(|source| {
            ServeError::CacheDir {
                dir: dir.clone(),
                source,
            }
        })?,
        None => PromptCache::new(config.engine.cache_ram),
    };
    let addr = config.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let local = listener.local_addr()?;
    let tls = match &config.security.tls {
        Some(t) => Some(listener::tls_config(t).map_err(ServeError::Tls)?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("listening on {scheme}://{local}");
    let security = Arc::new(Security::new(
        &config.security,
        config.server.max_body_bytes,
        config.server.insecure,
    ));
    if !local.ip().is_loopback() && !security.keys_enabled() {
        tracing::warn!(%local, "INSECURE: listening beyond loopback WITHOUT authentication (--insecure); anyone who can reach this address can use and change this server");
    }
    if security.keys_enabled() {
        tracing::info!(keys = config.security.keys.len(), "API keys required");
    }
    let housekeeping = tokio::spawn(Arc::clone(&security).housekeeping_task());

    let models = Models::new(&config, cache);
    tracing::info!(store = %models.store().root().display(), max_loaded = config.lifecycle.max_loaded, "model store");
    let reaper = tokio::spawn(Arc::clone(&models).reaper_task());
    let router = Arc::new(crate::router::Router::new(&config.router).map_err(ServeError::Router)?);
    for u in router.status() {
        tracing::info!(upstream = %u.name, kind = u.kind, models = ?u.models, fallback = ?u.fallback, "cloud upstream");
    }
    if router.contingency().enabled {
        tracing::warn!(source = %router.contingency().source, "contingency mode: every request is answered locally");
    }
    let compute = match tokio::task::spawn_blocking(crate::engine::compute).await {
        Ok(Ok(c)) => {
            for d in &c.devices {
                tracing::info!(
                    device = %d.name,
                    kind = d.kind.as_str(),
                    backend = %d.backend,
                    description = %d.description,
                    memory_mib = d.memory_total / (1024 * 1024),
                    free_mib = d.memory_free / (1024 * 1024),
                    "compute device"
                );
            }
            tracing::info!(backend = %c.backend, gpu_build = c.gpu_build, "compute backend");
            if c.gpu_missing() {
                tracing::warn!("this is a GPU build, but llama.cpp found no GPU: models run on the CPU, much more slowly (check the driver and the device nodes)");
            }
            Some(Arc::new(c))
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "llama.cpp backend unavailable");
            None
        }
        Err(_) => None,
    };
    let state = AppState {
        compute,
        security: Arc::clone(&security),
        router,
        models: Arc::clone(&models),
        metrics,
        started_at: chrono::Utc::now().timestamp(),
    };
    let app = api::router(state, &config.server, &config.security);

    // Stop reasons: a signal, or a model that failed to load.
    let (stop_tx, mut stop_rx) = watch::channel(false);
    // A failed preload is recorded before it stops the server, so the exit status never
    // depends on whether the loader task had returned by the time the listener stopped.
    let load_failure: Arc<std::sync::Mutex<Option<(String, String)>>> = Arc::default();
    let loader = {
        let models = Arc::clone(&models);
        let stop_tx = stop_tx.clone();
        let load_failure = Arc::clone(&load_failure);
        tokio::spawn(async move {
            if let Err(failure) = models.preload().await {
                if let Ok(mut slot) = load_failure.lock() {
                    *slot = Some(failure);
                }
                if stop_tx.send(true).is_err() {
                    tracing::debug!("server already stopped");
                }
            }
        })
    };
    let signalled = {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            signal().await;
            tracing::info!("shutdown requested; finishing in-flight requests");
            if stop_tx.send(true).is_err() {
                tracing::debug!("server already stopped");
            }
        })
    };

    let listener_config = listener::ListenerConfig {
        tls,
        max_connections: config.security.max_connections,
        header_timeout: config.security.header_timeout,
        drain_timeout: DRAIN_TIMEOUT,
    };
    listener::serve(listener, app, listener_config, async move {
        // Err means every sender is gone, which is also a reason to stop.
        let _stopped = stop_rx.wait_for(|s| *s).await;
    })
    .await;
    signalled.abort();
    reaper.abort();
    housekeeping.abort();

    loader.abort();
    let load_result = load_failure.lock().ok().and_then(|mut f| f.take());
    let engines = Arc::clone(&models);
    if tokio::task::spawn_blocking(move || engines.shutdown())
        .await
        .is_err()
    {
        tracing::error!("engine shutdown panicked");
    }
    match load_result {
        Some((name, e)) => Err(ServeError::Load(name, e)),
        None => Ok(()),
    }
}
