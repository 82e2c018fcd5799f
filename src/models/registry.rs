//! Which models exist (the configuration plus the store), which are loaded, and when they
//! come and go: a model loads on its first request, stays while requests use it, and unloads
//! after its keep-alive; when `max_loaded` models are resident, the least recently used idle
//! one makes room. A model with requests in flight is never unloaded under them: every
//! request holds a [`Lease`] for as long as its answer streams.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{watch, Notify};

use super::gguf::{self, GgufHeader};
use super::name::{ModelName, NameError};
use super::store::{Digest, Store, StoredModel};
use crate::config::{Config, EngineDefaults, KeepAlive, Lifecycle, ModelConfig, ModelDefaults};
use crate::engine::{Engine, EngineError, EngineOptions, GenerateRequest, Generation, PromptCache};

/// How long a request waits for a loaded model to become idle so that its own can load.
const CAPACITY_WAIT: Duration = Duration::from_secs(300);

/// Why a model cannot be served.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    /// The name is not a valid model name.
    #[error("{0}")]
    InvalidName(#[from] NameError),
    /// No model of that name exists.
    #[error("model '{0}' not found")]
    Unknown(String),
    /// It exists but failed to load.
    #[error("model '{name}' failed to load: {reason}")]
    Failed {
        /// The model.
        name: String,
        /// The load error.
        reason: String,
    },
    /// Every resident model is busy and no more may be loaded.
    #[error("cannot load model '{name}': all {max_loaded} loaded models are busy; retry shortly or raise max_loaded")]
    Busy {
        /// The model asked for.
        name: String,
        /// The configured bound.
        max_loaded: usize,
    },
}

/// Where a servable model was found.
#[derive(Debug, Clone)]
pub enum Origin {
    /// Named on the command line or in models.toml.
    Config {
        /// The pinned sha256, if the configuration gives one.
        sha256: Option<Digest>,
    },
    /// An entry of the model store.
    Store(Box<StoredModel>),
}

/// A model that can be served: its file and how to run it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Its name.
    pub name: ModelName,
    /// How to load it.
    pub engine: EngineOptions,
    /// Request defaults.
    pub defaults: ModelDefaults,
    /// Where it came from.
    pub origin: Origin,
}

impl ModelSpec {
    fn from_config(c: &ModelConfig) -> ModelSpec {
        ModelSpec {
            name: c.name.clone(),
            engine: c.engine.clone(),
            defaults: c.defaults.clone(),
            origin: Origin::Config {
                sha256: c.sha256.clone(),
            },
        }
    }

    fn from_store(m: StoredModel, engine: &EngineDefaults) -> ModelSpec {
        let p = &m.params;
        ModelSpec {
            name: m.name.clone(),
            engine: engine.options(&m.name, m.model_path.clone(), p.num_ctx),
            defaults: ModelDefaults {
                system: m.system.clone(),
                sampling: p.sampling(),
                max_tokens: p
                    .num_predict
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n > 0),
                stop: p.stop.clone(),
                keep_alive: None,
            },
            origin: Origin::Store(Box::new(m)),
        }
    }

    /// The GGUF file.
    pub fn path(&self) -> &Path {
        &self.engine.path
    }
}

/// How a resident model is being used.
#[derive(Debug)]
struct Activity {
    last_used: Instant,
    keep_alive: KeepAlive,
    /// Set while no request uses the model: the keep-alive counts from here.
    idle_since: Option<Instant>,
}

/// A loaded model.
#[derive(Debug)]
pub struct Loaded {
    /// What was loaded.
    pub spec: Arc<ModelSpec>,
    /// Its engine thread.
    pub engine: Engine,
    /// How long loading took.
    pub load_duration: Duration,
    in_flight: AtomicUsize,
    activity: Mutex<Activity>,
}

impl Loaded {
    fn activity(&self) -> MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests using the model now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// When it will unload if nothing uses it again (`None`: never).
    pub fn expires_at(&self) -> Option<SystemTime> {
        let a = self.activity();
        match a.keep_alive {
            KeepAlive::Forever => None,
            KeepAlive::For(d) => {
                let from = a.idle_since.unwrap_or_else(Instant::now);
                let left = (from + d).saturating_duration_since(Instant::now());
                Some(SystemTime::now() + left)
            }
        }
    }
}

/// A request's hold on a loaded model; the model cannot unload while it exists.
#[derive(Debug)]
pub struct Lease {
    loaded: Arc<Loaded>,
    changed: Arc<Notify>,
    /// Time this request spent waiting for the model to load (zero if it was resident).
    pub load_duration: Duration,
}

impl Lease {
    /// The model.
    pub fn spec(&self) -> &ModelSpec {
        &self.loaded.spec
    }

    /// Its engine.
    pub fn engine(&self) -> &Engine {
        &self.loaded.engine
    }

    /// Submits a generation that keeps this lease until it ends.
    pub fn submit(self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let generation = self.loaded.engine.submit(request)?;
        Ok(generation.holding(Box::new(self)))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut a = self.loaded.activity();
            a.last_used = Instant::now();
            if self.loaded.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
                a.idle_since = Some(Instant::now());
            }
        }
        self.changed.notify_waiters();
    }
}

/// What [`Models::make_room`] found.
enum Room {
    /// Below the bound.
    Free,
    /// This idle model was taken out and must be unloaded first.
    Evicted(Arc<Loaded>),
    /// Every resident model is busy.
    Full,
}

enum Resident {
    /// Being loaded; the value becomes `Some` when loading ends (with the error, if any).
    Loading(watch::Receiver<Option<Result<(), String>>>),
    Ready(Arc<Loaded>),
}

/// A model as `/api/tags` and `/v1/models` list it.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The model.
    pub spec: Arc<ModelSpec>,
    /// File size in bytes (all layers, for store models).
    pub size: u64,
    /// When the file (or store entry) last changed.
    pub modified: SystemTime,
}

/// Facts read from a model file, kept while the file is unchanged.
#[derive(Clone)]
struct FileFacts {
    /// The size and modification time of the file, then of each of a split model's other
    /// parts: the facts hold while these do.
    stamp: Vec<(u64, SystemTime)>,
    header: Option<Arc<GgufHeader>>,
    digest: Option<Digest>,
}

impl FileFacts {
    /// The file's, and a split model's other parts', bytes together.
    fn size(&self) -> u64 {
        self.stamp.iter().map(|(size, _)| size).sum()
    }

    /// When the file, or any part of a split model, last changed.
    fn modified(&self) -> SystemTime {
        self.stamp
            .iter()
            .map(|(_, m)| *m)
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// A model's files: `path`, then a split model's other parts (those its header names).
fn model_files<'a>(path: &'a Path, header: Option<&'a GgufHeader>) -> Vec<&'a Path> {
    std::iter::once(path)
        .chain(
            header
                .into_iter()
                .flat_map(|h| h.parts.iter().map(PathBuf::as_path)),
        )
        .collect()
}

/// The size and modification time of each file; `None` when one cannot be read.
fn stamp(files: &[&Path]) -> Option<Vec<(u64, SystemTime)>> {
    files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f).ok()?;
            Some((
                meta.len(),
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ))
        })
        .collect()
}

/// Why a request fails when its model's load ended without an outcome.
const LOAD_ABANDONED: &str = "loading stopped without a result (see the server log)";

/// Held by a load task for its whole run: if the task ends without an outcome (it panicked,
/// or the runtime dropped it), the waiters are told it failed and the `Loading` entry is taken
/// out. Without this they would wait on a channel that no one sends on, and the next request
/// would find the entry still loading, for ever.
struct LoadGuard {
    models: Arc<Models>,
    key: String,
    done: watch::Sender<Option<Result<(), String>>>,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if self.done.borrow().is_some() {
            return;
        }
        {
            let mut resident = self.models.resident();
            if matches!(resident.get(&self.key), Some(Resident::Loading(_))) {
                resident.remove(&self.key);
            }
        }
        tracing::error!(model = %self.key, "{LOAD_ABANDONED}");
        self.done.send_replace(Some(Err(LOAD_ABANDONED.to_owned())));
        self.models.changed.notify_waiters();
    }
}

/// All servable models and the loaded ones.
pub struct Models {
    configured: Vec<Arc<ModelSpec>>,
    /// Lower-cased name or alias → index in `configured`.
    names: HashMap<String, usize>,
    store: Store,
    engine_defaults: EngineDefaults,
    /// The conversations every model's slots gave up, kept in host memory (`--cache-ram`).
    prompt_cache: PromptCache,
    lifecycle: Lifecycle,
    resident: Mutex<HashMap<String, Resident>>,
    changed: Arc<Notify>,
    facts: Mutex<HashMap<PathBuf, FileFacts>>,
    started: AtomicBool,
}

impl Models {
    /// The catalogue of a configuration, whose models keep their conversations in
    /// `prompt_cache`; nothing is loaded yet.
    pub fn new(config: &Config, prompt_cache: PromptCache) -> Arc<Models> {
        let mut configured = Vec::with_capacity(config.models.len());
        let mut names = HashMap::new();
        for (i, m) in config.models.iter().enumerate() {
            configured.push(Arc::new(ModelSpec::from_config(m)));
            names.insert(m.name.key(), i);
            for a in &m.aliases {
                names.insert(a.key(), i);
            }
        }
        Arc::new(Models {
            configured,
            names,
            store: Store::new(config.store_dir.clone())
                .with_check(crate::engine::probe::store_check(config.engine.gpu_layers)),
            engine_defaults: config.engine.clone(),
            prompt_cache,
            lifecycle: config.lifecycle.clone(),
            resident: Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
            facts: Mutex::new(HashMap::new()),
            started: AtomicBool::new(false),
        })
    }

    fn resident(&self) -> MutexGuard<'_, HashMap<String, Resident>> {
        self.resident.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The model store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The lifecycle settings.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// True once the configured models have been preloaded.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// The canonical key of a name (aliases resolved).
    fn key_of(&self, name: &ModelName) -> String {
        let key = name.key();
        match self.names.get(&key) {
            Some(&i) => self.configured[i].name.key(),
            None => key,
        }
    }

    /// Finds a model by name or alias: the configuration first, then the store.
    pub fn resolve(&self, text: &str) -> Result<Arc<ModelSpec>, LookupError> {
        let name = ModelName::parse(text)?;
        if let Some(&i) = self.names.get(&name.key()) {
            return Ok(Arc::clone(&self.configured[i]));
        }
        match self.store.get(&name) {
            Ok(Some(m)) => Ok(Arc::new(ModelSpec::from_store(m, &self.engine_defaults))),
            Ok(None) => Err(LookupError::Unknown(text.to_owned())),
            Err(e) => {
                tracing::warn!(model = %name, error = %e, "store entry unreadable");
                Err(LookupError::Unknown(text.to_owned()))
            }
        }
    }

    /// Whether a name is defined by the configuration (and so cannot be changed through the
    /// API).
    pub fn is_configured(&self, name: &ModelName) -> bool {
        self.names.contains_key(&name.key())
    }

    /// Every servable model: the configured ones, then the store's (a store entry with the
    /// name of a configured model is hidden by it).
    pub fn list(&self) -> Vec<Listed> {
        let mut out: Vec<Listed> = self
            .configured
            .iter()
            .map(|spec| {
                let facts = self.facts(spec.path(), false);
                Listed {
                    spec: Arc::clone(spec),
                    // A split model's other parts count too.
                    size: facts.as_ref().map_or(0, FileFacts::size),
                    modified: facts.map_or(SystemTime::UNIX_EPOCH, |f| f.modified()),
                }
            })
            .collect();
        for m in self.store.list() {
            if self.names.contains_key(&m.name.key()) {
                continue;
            }
            let (size, modified) = (m.size, m.modified);
            out.push(Listed {
                spec: Arc::new(ModelSpec::from_store(m, &self.engine_defaults)),
                size,
                modified,
            });
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        out
    }

    /// The GGUF header of a model file (cached while the file is unchanged).
    pub fn header(&self, path: &Path) -> Option<Arc<GgufHeader>> {
        self.facts(path, false).and_then(|f| f.header)
    }

    /// The sha256 of a model: the store's or the configuration's pin, else the file's, a
    /// split model's parts hashed one after the other (hashed once and cached; call from a
    /// blocking context).
    pub fn digest(&self, spec: &ModelSpec) -> Option<Digest> {
        match &spec.origin {
            Origin::Store(m) => Some(m.digest.clone()),
            Origin::Config { sha256: Some(d) } => Some(d.clone()),
            Origin::Config { sha256: None } => self.facts(spec.path(), true).and_then(|f| f.digest),
        }
    }

    /// What is known of a model file, read again when it, or any other part of a split
    /// model, changed.
    fn facts(&self, path: &Path, with_digest: bool) -> Option<FileFacts> {
        let cached = self
            .facts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .cloned();
        let fresh = cached.filter(|f| {
            stamp(&model_files(path, f.header.as_deref())).is_some_and(|now| now == f.stamp)
        });
        let mut facts = match fresh {
            Some(f) => f,
            None => {
                let header = match gguf::read(path) {
                    Ok(h) => Some(Arc::new(h)),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the GGUF header");
                        None
                    }
                };
                let stamp =
                    stamp(&model_files(path, header.as_deref())).or_else(|| stamp(&[path]))?;
                FileFacts {
                    stamp,
                    header,
                    digest: None,
                }
            }
        };
        if with_digest && facts.digest.is_none() {
            facts.digest = Digest::of_files(&model_files(path, facts.header.as_deref())).ok();
        }
        self.facts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_owned(), facts.clone());
        Some(facts)
    }

    /// The keep-alive a request gets: its own, else the model's, else the server's.
    fn keep_alive_for(&self, spec: &ModelSpec, requested: Option<KeepAlive>) -> KeepAlive {
        requested
            .or(spec.defaults.keep_alive)
            .unwrap_or(self.lifecycle.keep_alive)
    }

    /// A lease on the model, loading it first if needed. Waits while it loads, or while
    /// every resident model is busy and no more may be loaded.
    pub async fn acquire(
        self: &Arc<Self>,
        text: &str,
        keep_alive: Option<KeepAlive>,
    ) -> Result<Lease, LookupError> {
        let name = ModelName::parse(text)?;
        let key = self.key_of(&name);
        let started = Instant::now();
        let mut spec: Option<Arc<ModelSpec>> = None;
        let mut waited = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Resolving reads the store, so it happens once, and only when the model is not
            // already resident.
            if spec.is_none() && !matches!(self.resident().get(&key), Some(Resident::Ready(_))) {
                spec = Some(self.resolve(text)?);
            }
            let wait = {
                let mut resident = self.resident();
                match resident.get(&key) {
                    Some(Resident::Ready(loaded)) => {
                        let loaded = Arc::clone(loaded);
                        loaded.in_flight.fetch_add(1, Ordering::AcqRel);
                        {
                            let mut a = loaded.activity();
                            a.keep_alive = self.keep_alive_for(&loaded.spec, keep_alive);
                            a.idle_since = None;
                            a.last_used = Instant::now();
                        }
                        return Ok(Lease {
                            loaded,
                            changed: Arc::clone(&self.changed),
                            load_duration: if waited {
                                started.elapsed()
                            } else {
                                Duration::ZERO
                            },
                        });
                    }
                    Some(Resident::Loading(rx)) => Some(rx.clone()),
                    None => {
                        let Some(spec) = spec.clone() else { continue };
                        match self.make_room(&mut resident) {
                            Room::Full => None,
                            room => {
                                let victim = match room {
                                    Room::Evicted(v) => Some(v),
                                    _ => None,
                                };
                                let (tx, rx) = watch::channel(None);
                                resident.insert(key.clone(), Resident::Loading(rx.clone()));
                                let keep = self.keep_alive_for(&spec, keep_alive);
                                tokio::spawn(Arc::clone(self).load_task(
                                    key.clone(),
                                    spec,
                                    keep,
                                    victim,
                                    tx,
                                ));
                                Some(rx)
                            }
                        }
                    }
                }
            };
            match wait {
                Some(mut rx) => {
                    waited = true;
                    let outcome = rx.wait_for(Option::is_some).await.map(|v| v.clone());
                    match outcome {
                        Ok(Some(Ok(()))) => {}
                        Ok(Some(Err(reason))) => {
                            return Err(LookupError::Failed {
                                name: text.to_owned(),
                                reason,
                            })
                        }
                        // The load ended without a word (`LoadGuard` makes that unlikely):
                        // waiting on the same channel again would return at once, forever.
                        Ok(None) | Err(_) => {
                            return Err(LookupError::Failed {
                                name: text.to_owned(),
                                reason: LOAD_ABANDONED.to_owned(),
                            })
                        }
                    }
                }
                None => {
                    let left = CAPACITY_WAIT.saturating_sub(started.elapsed());
                    if left.is_zero() || tokio::time::timeout(left, notified).await.is_err() {
                        return Err(LookupError::Busy {
                            name: text.to_owned(),
                            max_loaded: self.lifecycle.max_loaded,
                        });
                    }
                }
            }
        }
    }

    /// Makes room for one more model, taking the least recently used idle one out if the
    /// bound is reached.
    fn make_room(&self, resident: &mut HashMap<String, Resident>) -> Room {
        if resident.len() < self.lifecycle.max_loaded {
            return Room::Free;
        }
        // Models pinned by their configuration (`keep_alive = -1`, the router's fallbacks)
        // are never evicted to make room.
        let victim = resident
            .iter()
            .filter_map(|(k, r)| match r {
                Resident::Ready(l)
                    if l.in_flight() == 0
                        && l.spec.defaults.keep_alive != Some(KeepAlive::Forever) =>
                {
                    Some((k.clone(), l.activity().last_used))
                }
                _ => None,
            })
            .min_by_key(|(_, used)| *used)
            .map(|(k, _)| k);
        match victim.and_then(|v| resident.remove(&v)) {
            Some(Resident::Ready(l)) => Room::Evicted(l),
            _ => Room::Full,
        }
    }

    async fn load_task(
        self: Arc<Self>,
        key: String,
        spec: Arc<ModelSpec>,
        keep_alive: KeepAlive,
        victim: Option<Arc<Loaded>>,
        done: watch::Sender<Option<Result<(), String>>>,
    ) {
        let guard = LoadGuard {
            models: Arc::clone(&self),
            key: key.clone(),
            done,
        };
        if let Some(v) = victim {
            tracing::info!(model = %v.spec.name, reason = "max_loaded", "unloading model to make room");
            unload(v).await;
        }
        let started = Instant::now();
        let result = Engine::load(spec.engine.clone(), self.prompt_cache.clone()).await;
        let outcome = {
            let mut resident = self.resident();
            match result {
                Ok(engine) => {
                    let load_duration = started.elapsed();
                    let label = spec.name.to_string();
                    metrics::counter!("backstop_model_loads_total", "model" => label.clone())
                        .increment(1);
                    metrics::histogram!("backstop_model_load_seconds", "model" => label)
                        .record(load_duration.as_secs_f64());
                    tracing::info!(model = %spec.name, load_ms = load_duration.as_millis() as u64, "model ready");
                    let now = Instant::now();
                    resident.insert(
                        key,
                        Resident::Ready(Arc::new(Loaded {
                            spec,
                            engine,
                            load_duration,
                            in_flight: AtomicUsize::new(0),
                            // Idle until the requester takes its lease, so a model whose
                            // requester went away still unloads after its keep-alive.
                            activity: Mutex::new(Activity {
                                last_used: now,
                                keep_alive,
                                idle_since: Some(now),
                            }),
                        })),
                    );
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(model = %spec.name, error = %e, "model failed to load");
                    resident.remove(&key);
                    Err(e.to_string())
                }
            }
        };
        guard.done.send_replace(Some(outcome));
        self.publish();
        self.changed.notify_waiters();
    }

    /// Loads the configured models at start (as many as `max_loaded` allows), so the first
    /// requests do not wait and a broken file is found before anyone relies on it.
    pub async fn preload(self: &Arc<Self>) -> Result<(), (String, String)> {
        for spec in self.configured.iter().take(self.lifecycle.max_loaded) {
            let name = spec.name.to_string();
            match self.acquire(&name, None).await {
                Ok(lease) => drop(lease),
                Err(LookupError::Failed { reason, .. }) => return Err((name, reason)),
                Err(e) => return Err((name, e.to_string())),
            }
        }
        self.started.store(true, Ordering::Release);
        Ok(())
    }

    /// Updates the gauge of loaded models.
    fn publish(&self) {
        let loaded = self
            .resident()
            .values()
            .filter(|r| matches!(r, Resident::Ready(_)))
            .count();
        metrics::gauge!("backstop_models_loaded").set(loaded as f64);
    }

    /// The loaded models, most recently used first.
    pub fn running(&self) -> Vec<Arc<Loaded>> {
        let mut out: Vec<Arc<Loaded>> = self
            .resident()
            .values()
            .filter_map(|r| match r {
                Resident::Ready(l) => Some(Arc::clone(l)),
                Resident::Loading(_) => None,
            })
            .collect();
        out.sort_by_key(|l| std::cmp::Reverse(l.activity().last_used));
        out
    }

    /// Whether a model of this name is loaded now.
    pub fn is_loaded(&self, text: &str) -> bool {
        ModelName::parse(text).is_ok_and(|n| {
            matches!(
                self.resident().get(&self.key_of(&n)),
                Some(Resident::Ready(_))
            )
        })
    }

    /// Unloads a model as soon as it is idle (at once if it already is); Ollama's
    /// `keep_alive: 0` and `ollama stop`. Returns whether it was loaded.
    pub async fn unload(&self, name: &ModelName) -> bool {
        let key = self.key_of(name);
        let idle = {
            let mut resident = self.resident();
            match resident.get(&key) {
                Some(Resident::Ready(l)) if l.in_flight() == 0 => match resident.remove(&key) {
                    Some(Resident::Ready(l)) => Some(l),
                    _ => None,
                },
                Some(Resident::Ready(l)) => {
                    l.activity().keep_alive = KeepAlive::For(Duration::ZERO);
                    return true;
                }
                _ => return false,
            }
        };
        if let Some(l) = idle {
            tracing::info!(model = %l.spec.name, reason = "requested", "unloading model");
            unload(l).await;
            self.publish();
        }
        self.changed.notify_waiters();
        true
    }

    /// Runs until the process ends: unloads models whose keep-alive ran out.
    pub async fn reaper_task(self: Arc<Self>) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (expired, next) = self.take_expired();
            let any = !expired.is_empty();
            for l in expired {
                tracing::info!(model = %l.spec.name, reason = "keep_alive", "unloading idle model");
                unload(l).await;
            }
            if any {
                self.publish();
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => {}
                        () = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Removes the idle models whose keep-alive has run out; returns them and the next
    /// moment another one will.
    fn take_expired(&self) -> (Vec<Arc<Loaded>>, Option<Instant>) {
        let now = Instant::now();
        let mut resident = self.resident();
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        let keys: Vec<String> = resident.keys().cloned().collect();
        for key in keys {
            let deadline = match resident.get(&key) {
                Some(Resident::Ready(l)) if l.in_flight() == 0 => {
                    let a = l.activity();
                    match (a.keep_alive, a.idle_since) {
                        (KeepAlive::For(d), Some(since)) => Some(since + d),
                        _ => None,
                    }
                }
                _ => None,
            };
            match deadline {
                Some(at) if at <= now => {
                    if let Some(Resident::Ready(l)) = resident.remove(&key) {
                        expired.push(l);
                    }
                }
                Some(at) => next = Some(next.map_or(at, |n| n.min(at))),
                None => {}
            }
        }
        (expired, next)
    }

    /// Forgets a model whose store entry changed, so the next request loads the new one.
    pub async fn invalidate(&self, name: &ModelName) {
        self.unload(name).await;
    }

    /// Stops every engine, letting each finish its work. Blocks: call from a blocking context.
    pub fn shutdown(&self) {
        self.prompt_cache.stop();
        let all: Vec<Arc<Loaded>> = self
            .resident()
            .drain()
            .filter_map(|(_, r)| match r {
                Resident::Ready(l) => Some(l),
                Resident::Loading(_) => None,
            })
            .collect();
        for l in all {
            l.engine.shutdown();
        }
        self.prompt_cache.stopped();
    }
}

/// Stops an engine thread (it has no work: the model is idle) without blocking the runtime.
async fn unload(loaded: Arc<Loaded>) {
    let name = loaded.spec.name.to_string();
    metrics::counter!("backstop_model_unloads_total", "model" => name.clone()).increment(1);
    if tokio::task::spawn_blocking(move || loaded.engine.shutdown())
        .await
        .is_err()
    {
        tracing::error!(model = %name, "engine shutdown panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Loading` entry for `m` and the guard its load task would hold.
    fn loading(models: &Arc<Models>) -> (LoadGuard, watch::Receiver<Option<Result<(), String>>>) {
        let (tx, rx) = watch::channel(None);
        models
            .resident()
            .insert("m".to_owned(), Resident::Loading(rx.clone()));
        let guard = LoadGuard {
            models: Arc::clone(models),
            key: "m".to_owned(),
            done: tx,
        };
        (guard, rx)
    }

    /// A load task that panics (or is dropped) before its outcome: whoever waits is told it
    /// failed, and the name is free for the next request to load again.
    #[tokio::test]
    async fn a_load_that_ends_without_an_outcome_fails_its_waiters_and_frees_the_name() {
        let models = Models::new(
            &crate::config::for_tests("/nonexistent.gguf"),
            PromptCache::new(0),
        );
        let (guard, mut rx) = loading(&models);
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("a load that panics");
        });
        assert!(task.await.is_err_and(|e| e.is_panic()));
        let outcome = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        assert_eq!(outcome.ok(), Some(Some(Err(LOAD_ABANDONED.to_owned()))));
        assert!(models.resident().get("m").is_none());

        // A load that reports is left alone when the guard goes.
        let (guard, rx) = loading(&models);
        guard.done.send_replace(Some(Ok(())));
        drop(guard);
        assert_eq!(*rx.borrow(), Some(Ok(())));
        assert!(matches!(
            models.resident().get("m"),
            Some(Resident::Loading(_))
        ));
    }
}
