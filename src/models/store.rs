//! The model store, laid out exactly as Ollama lays out its own (`OLLAMA_MODELS`):
//! `manifests/<host>/<namespace>/<model>/<tag>` JSON files whose layers point at
//! content-addressed `blobs/sha256-<hex>` files. So a store Ollama filled is served as it is,
//! and what backstop pulls or creates, Ollama can read.
//!
//! Every write goes to a temporary name and is renamed into place, so a crash never leaves a
//! half-written manifest or blob under its final name.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::gguf;
use super::name::{ModelName, NameError};
use super::params::Parameters;

/// Layer media types Ollama writes (and reads).
pub(crate) mod media {
    /// The GGUF weights.
    pub const MODEL: &str = "application/vnd.ollama.image.model";
    /// Default request options, as JSON.
    pub const PARAMS: &str = "application/vnd.ollama.image.params";
    /// The default system prompt, as text.
    pub const SYSTEM: &str = "application/vnd.ollama.image.system";
    /// Ollama's Go prompt template (kept for Ollama; backstop renders the GGUF's Jinja one).
    pub const TEMPLATE: &str = "application/vnd.ollama.image.template";
    /// The manifest itself.
    pub const MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// The image config blob.
    pub const CONFIG: &str = "application/vnd.docker.container.image.v1+json";
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system error, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A manifest or config that is not what Ollama writes.
    #[error("{path}: not a valid manifest: {message}")]
    BadManifest {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No such model in the store.
    #[error("model '{0}' not found")]
    NotFound(String),
    /// A blob's content does not have the digest it should.
    #[error("sha256 mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was promised.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// A digest written in a bad form.
    #[error("invalid digest `{0}`: expected sha256:<64 hex digits>")]
    BadDigest(String),
    /// A referenced blob is missing.
    #[error("blob {0} is not in the store")]
    MissingBlob(Digest),
    /// The weights are not a readable GGUF.
    #[error("{0}")]
    NotGguf(String),
    /// The weights are a GGUF the engine cannot run (the store's [`ModelCheck`] said why).
    #[error("{0}")]
    Unusable(String),
    /// A name was refused.
    #[error(transparent)]
    Name(#[from] NameError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A sha256 content digest, 64 lower-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<hex>`, `sha256-<hex>` or bare hex.
    pub fn parse(text: &str) -> Result<Digest, StoreError> {
        let hex = text
            .strip_prefix("sha256:")
            .or_else(|| text.strip_prefix("sha256-"))
            .unwrap_or(text);
        if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(Digest(hex.to_ascii_lowercase()))
        } else {
            Err(StoreError::BadDigest(text.to_owned()))
        }
    }

    /// The digest of these bytes.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(hex(&Sha256::digest(bytes)))
    }

    /// Hashes a file (blocking; 1 GB takes a few seconds).
    pub fn of_file(path: &Path) -> Result<Digest, StoreError> {
        Digest::of_files(&[path])
    }

    /// The sha256 of files read one after the other: a model split into parts is named by
    /// the bytes of its parts in order.
    pub fn of_files(paths: &[&Path]) -> Result<Digest, StoreError> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for path in paths {
            let mut file = std::fs::File::open(path).map_err(io_err(path))?;
            loop {
                let n = file.read(&mut buf).map_err(io_err(path))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        Ok(Digest(hex(&hasher.finalize())))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0
    }

    /// Wraps hex digits already known to be a valid digest (from a hasher).
    pub fn from_hasher(hasher: Sha256) -> Digest {
        Digest(hex(&hasher.finalize()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _infallible = write!(s, "{b:02x}");
        s
    })
}

/// One layer of a manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Layer {
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
}

/// An Ollama (OCI-style) manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub(crate) schema_version: u32,
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) config: Layer,
    pub(crate) layers: Vec<Layer>,
}

/// The config blob Ollama writes beside the layers; `ollama show` reads the family and
/// quantization from it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub(crate) model_format: String,
    #[serde(default)]
    pub(crate) model_family: String,
    #[serde(default)]
    pub(crate) model_families: Vec<String>,
    #[serde(default)]
    pub(crate) model_type: String,
    #[serde(default)]
    pub(crate) file_type: String,
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
}

/// A model found in the store, ready to be described or loaded.
#[derive(Debug, Clone)]
pub struct StoredModel {
    /// Its name.
    pub name: ModelName,
    /// The GGUF blob.
    pub model_path: PathBuf,
    /// Digest of the manifest file (what Ollama lists as the model's digest).
    pub digest: Digest,
    /// Digest of the GGUF blob.
    pub model_digest: Digest,
    /// Total size of all layers, in bytes.
    pub size: u64,
    /// When the manifest was written.
    pub modified: SystemTime,
    /// Default request options.
    pub params: Parameters,
    /// Default system prompt.
    pub system: Option<String>,
    /// Ollama's Go template, if the manifest has one (shown, not used).
    pub template: Option<String>,
}

/// What a new store entry is made of, besides its weights.
#[derive(Debug, Clone, Default)]
pub struct NewModel {
    /// Default request options.
    pub params: Parameters,
    /// Default system prompt.
    pub system: Option<String>,
    /// A Go template to keep for Ollama's sake.
    pub template: Option<String>,
}

/// What a store asks of a GGUF before it records a model in it: `Err` with the reason when
/// the engine cannot run the file. The store itself only reads headers; the server and the
/// `pull` command hand it the engine's check ([`crate::engine::probe::store_check`]), so a
/// file that would fail at its first load is refused when it is created or pulled. It is
/// given the header the store has just read, so the file is not read twice.
pub type ModelCheck = Arc<dyn Fn(&Path, &gguf::GgufHeader) -> Result<(), String> + Send + Sync>;

/// The store rooted at one folder.
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    check: Option<ModelCheck>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .field("check", &self.check.is_some())
            .finish()
    }
}

impl Store {
    /// A store at `root` (created on first write).
    pub fn new(root: PathBuf) -> Store {
        Store { root, check: None }
    }

    /// The same store, asking `check` of every GGUF before a model is recorded with it.
    pub fn with_check(self, check: ModelCheck) -> Store {
        Store {
            check: Some(check),
            ..self
        }
    }

    /// Runs the store's [`ModelCheck`] on a GGUF file and its header (nothing without one).
    pub fn check_model(&self, path: &Path, header: &gguf::GgufHeader) -> Result<(), StoreError> {
        match &self.check {
            Some(check) => check(path, header).map_err(StoreError::Unusable),
            None => Ok(()),
        }
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn manifests(&self) -> PathBuf {
        self.root.join("manifests")
    }

    fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// Where a blob lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs().join(format!("sha256-{}", digest.hex()))
    }

    /// A temporary path inside the blob folder (same file system, so the final rename is
    /// atomic). Ollama uses the `-partial` suffix for the same purpose and ignores such files.
    pub fn partial_path(&self, label: &str) -> Result<PathBuf, StoreError> {
        let dir = self.blobs();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let safe: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(80)
            .collect();
        Ok(dir.join(format!("sha256-{safe}-partial")))
    }

    /// A temporary path for work of `kind` (letters and digits) by this process, as
    /// [`Store::partial_path`]: named with the process's id, so that
    /// [`Store::remove_dead_work`] can tell what a process that is gone left (a crash, a kill)
    /// from work in progress, this server's or another's on the same store.
    pub fn work_path(&self, kind: &str) -> Result<PathBuf, StoreError> {
        let id = uuid::Uuid::new_v4().simple();
        self.partial_path(&format!("{kind}_{}_{id}", std::process::id()))
    }

    /// Removes what work of `kind` ([`Store::work_path`]) by processes now gone left in the
    /// blob folder: a half-copied file, or a folder and what it holds (links are removed,
    /// never what they point to). Only what has not changed for [`ABANDONED`]: a server in
    /// another container sharing the store has process ids this one cannot see, and its
    /// work in progress is being written.
    pub fn remove_dead_work(&self, kind: &str) {
        let Ok(entries) = std::fs::read_dir(self.blobs()) else {
            return;
        };
        let prefix = format!("sha256-{kind}_");
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some((pid, _)) = name
                .to_str()
                .filter(|n| n.ends_with("-partial"))
                .and_then(|n| n.strip_prefix(&prefix)?.split_once('_'))
            else {
                continue;
            };
            if !abandoned(pid, &entry, ABANDONED) {
                continue;
            }
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing what work cut short left");
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "could not remove what work cut short left");
            }
        }
    }

    fn manifest_path(&self, name: &ModelName) -> PathBuf {
        let [host, namespace, model] = name.parts();
        self.manifests()
            .join(host)
            .join(namespace)
            .join(model)
            .join(name.tag())
    }

    /// Every model in the store, in name order. A manifest that cannot be read is logged and
    /// skipped, so one broken entry never hides the others.
    pub fn list(&self) -> Vec<StoredModel> {
        let mut out = Vec::new();
        for path in self.manifest_files() {
            match self.read_entry(&path) {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!(error = %e, "skipping a store entry"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The entry for `name`, if the store has it. Names match without regard to case.
    pub fn get(&self, name: &ModelName) -> Result<Option<StoredModel>, StoreError> {
        let exact = self.manifest_path(name);
        if exact.is_file() {
            return self.read_entry(&exact).map(Some);
        }
        Ok(self.list().into_iter().find(|m| m.name == *name))
    }

    /// Paths of all manifest files: exactly four folders deep, as Ollama writes them.
    fn manifest_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut level = vec![self.manifests()];
        for depth in 0..4 {
            let mut next = Vec::new();
            for dir in level {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let path = entry.path();
                    let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                    if depth < 3 && is_dir {
                        next.push(path);
                    } else if depth == 3 && !is_dir {
                        files.push(path);
                    }
                }
            }
            level = next;
        }
        files
    }

    fn name_of(&self, path: &Path) -> Result<ModelName, StoreError> {
        let rel = path.strip_prefix(self.manifests()).unwrap_or(path);
        let parts: Vec<&str> = rel.iter().filter_map(|p| p.to_str()).collect();
        match parts.as_slice() {
            [host, ns, model, tag] => Ok(ModelName::from_parts(host, ns, model, tag)?),
            _ => Err(StoreError::BadManifest {
                path: path.to_owned(),
                message: "not at manifests/<host>/<namespace>/<model>/<tag>".into(),
            }),
        }
    }

    fn read_entry(&self, path: &Path) -> Result<StoredModel, StoreError> {
        let name = self.name_of(path)?;
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let bad = |message: String| StoreError::BadManifest {
            path: path.to_owned(),
            message,
        };
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut model = None;
        let mut params = Parameters::default();
        let mut system = None;
        let mut template = None;
        for layer in &manifest.layers {
            let digest = Digest::parse(&layer.digest)?;
            match layer.media_type.as_str() {
                media::MODEL => model = Some(digest),
                media::PARAMS => {
                    let text = self.read_small_blob(&digest)?;
                    params = serde_json::from_str(&text)
                        .map_err(|e| bad(format!("params layer: {e}")))?;
                }
                media::SYSTEM => system = Some(self.read_small_blob(&digest)?),
                media::TEMPLATE => template = Some(self.read_small_blob(&digest)?),
                _ => {}
            }
        }
        let model_digest = model.ok_or_else(|| bad("no model layer".into()))?;
        let model_path = self.blob_path(&model_digest);
        if !model_path.is_file() {
            return Err(StoreError::MissingBlob(model_digest));
        }
        Ok(StoredModel {
            name,
            model_path,
            digest: Digest::of(&bytes),
            model_digest,
            size: manifest.layers.iter().map(|l| l.size).sum(),
            modified,
            params,
            system,
            template,
        })
    }

    fn read_small_blob(&self, digest: &Digest) -> Result<String, StoreError> {
        let path = self.blob_path(digest);
        let mut text = String::new();
        std::fs::File::open(&path)
            .map_err(io_err(&path))?
            .take(1 << 20)
            .read_to_string(&mut text)
            .map_err(io_err(&path))?;
        Ok(text)
    }

    /// Writes `bytes` as a blob (if not already there) and returns its layer.
    fn put_blob(&self, media_type: &str, bytes: &[u8]) -> Result<Layer, StoreError> {
        let digest = Digest::of(bytes);
        let path = self.blob_path(&digest);
        if !path.is_file() {
            write_atomically(&path, bytes)?;
        }
        Ok(Layer {
            media_type: media_type.to_owned(),
            digest: digest.to_string(),
            size: bytes.len() as u64,
        })
    }

    /// Moves a fully written temporary file into the store as a blob, after checking that it
    /// hashes to `expected` (when given). On a mismatch the file is deleted: nothing is left.
    pub fn import_blob(
        &self,
        temp: &Path,
        expected: Option<&Digest>,
    ) -> Result<Digest, StoreError> {
        let actual = match Digest::of_file(temp) {
            Ok(d) => d,
            Err(e) => {
                remove_quietly(temp);
                return Err(e);
            }
        };
        if let Some(expected) = expected {
            if *expected != actual {
                remove_quietly(temp);
                return Err(StoreError::DigestMismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        self.adopt_blob(temp, &actual)?;
        Ok(actual)
    }

    /// Renames a file already known to hash to `digest` into place.
    pub fn adopt_blob(&self, temp: &Path, digest: &Digest) -> Result<(), StoreError> {
        let dest = self.blob_path(digest);
        let dir = self.blobs();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        std::fs::rename(temp, &dest).map_err(io_err(&dest))
    }

    /// Bytes an unprivileged writer may still put on the file system that holds the blobs
    /// (None where that cannot be asked: outside Linux, or a folder that cannot be made).
    pub fn free_space(&self) -> Option<u64> {
        let dir = self.blobs();
        std::fs::create_dir_all(&dir).ok()?;
        free_space(&dir)
    }

    /// Whether a blob is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Records `name` as the model in blob `model`, with its defaults. Replaces an existing
    /// entry of that name.
    pub fn create(
        &self,
        name: &ModelName,
        model: &Digest,
        extra: &NewModel,
    ) -> Result<StoredModel, StoreError> {
        let model_path = self.blob_path(model);
        let size = std::fs::metadata(&model_path)
            .map_err(|_| StoreError::MissingBlob(model.clone()))?
            .len();
        let header = gguf::read(&model_path).map_err(|e| match e {
            // A blob is named by its digest, so llama.cpp could never find the other parts.
            gguf::GgufError::SplitName { part, count } => StoreError::Unusable(format!(
                "{model} is part {part} of {count} of a model split into several files, and \
                 the store keeps a model in one file: join the parts with `backstop quantize \
                 FIRST-PART OUT.gguf COPY` and create the model from OUT.gguf, or serve the \
                 first part where it is (`--model NAME=PATH`)"
            )),
            e => StoreError::NotGguf(format!("{model}: {e}")),
        })?;
        self.check_model(&model_path, &header)?;
        let mut layers = vec![Layer {
            media_type: media::MODEL.to_owned(),
            digest: model.to_string(),
            size,
        }];
        if let Some(t) = &extra.template {
            layers.push(self.put_blob(media::TEMPLATE, t.as_bytes())?);
        }
        if let Some(s) = &extra.system {
            layers.push(self.put_blob(media::SYSTEM, s.as_bytes())?);
        }
        if !extra.params.is_empty() {
            let json = serde_json::to_vec(&extra.params).unwrap_or_default();
            layers.push(self.put_blob(media::PARAMS, &json)?);
        }
        let family = header.architecture().to_owned();
        let config = ImageConfig {
            model_format: "gguf".into(),
            model_families: vec![family.clone()],
            model_family: family,
            model_type: header.parameter_size(),
            file_type: header.quantization(),
            architecture: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
        };
        let config = self.put_blob(
            media::CONFIG,
            &serde_json::to_vec(&config).unwrap_or_default(),
        )?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: media::MANIFEST.to_owned(),
            config,
            layers,
        };
        self.write_manifest(name, &manifest)?;
        self.get(name)?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))
    }

    fn write_manifest(&self, name: &ModelName, manifest: &Manifest) -> Result<(), StoreError> {
        self.import_manifest(name, &serde_json::to_vec(manifest).unwrap_or_default())
    }

    /// Writes a manifest exactly as received (a registry's bytes, so its digest is kept),
    /// replacing an entry of the same name spelled with other capitals.
    pub fn import_manifest(&self, name: &ModelName, bytes: &[u8]) -> Result<(), StoreError> {
        if let Some(old) = self.find_manifest(name) {
            if old != self.manifest_path(name) {
                remove_quietly(&old);
            }
        }
        write_atomically(&self.manifest_path(name), bytes)
    }

    fn find_manifest(&self, name: &ModelName) -> Option<PathBuf> {
        let exact = self.manifest_path(name);
        if exact.is_file() {
            return Some(exact);
        }
        self.manifest_files()
            .into_iter()
            .find(|p| self.name_of(p).is_ok_and(|n| n == *name))
    }

    /// Gives the model `from` a second name `to` (the blobs are shared).
    pub fn copy(&self, from: &ModelName, to: &ModelName) -> Result<(), StoreError> {
        let src = self
            .find_manifest(from)
            .ok_or_else(|| StoreError::NotFound(from.to_string()))?;
        let bytes = std::fs::read(&src).map_err(io_err(&src))?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::BadManifest {
                path: src.clone(),
                message: e.to_string(),
            })?;
        self.write_manifest(to, &manifest)
    }

    /// Removes a name, then every blob no remaining manifest refers to.
    pub fn delete(&self, name: &ModelName) -> Result<(), StoreError> {
        let path = self
            .find_manifest(name)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        // Tidy the now-empty folders (best effort; a folder still in use stays).
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == self.manifests() || std::fs::remove_dir(&d).is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        self.prune_blobs();
        Ok(())
    }

    /// Deletes blobs that no manifest refers to (never partial downloads in progress).
    fn prune_blobs(&self) {
        let mut used = BTreeSet::new();
        for path in self.manifest_files() {
            let Ok(bytes) = std::fs::read(&path) else {
                // Unreadable manifest: keep everything rather than guess.
                return;
            };
            let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
                return;
            };
            for layer in m.layers.iter().chain(std::iter::once(&m.config)) {
                if let Ok(d) = Digest::parse(&layer.digest) {
                    used.insert(d);
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(self.blobs()) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            if file.ends_with("-partial") {
                continue;
            }
            if let Ok(d) = Digest::parse(file) {
                if !used.contains(&d) {
                    remove_quietly(&entry.path());
                }
            }
        }
    }
}

/// How long work's files must have gone unchanged before [`Store::remove_dead_work`] takes
/// them for abandoned.
pub const ABANDONED: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Whether `entry`, left by the process whose id is `pid`, is abandoned: `pid` is a process
/// id, that process is gone, and the entry has gone unchanged for at least `idle` (zero: it
/// need not have). What the store's and the quantizer's sweeps remove.
pub(crate) fn abandoned(pid: &str, entry: &std::fs::DirEntry, idle: std::time::Duration) -> bool {
    let id = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    id && !running(pid)
        && (idle.is_zero()
            || entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|unchanged| unchanged >= idle))
}

/// Whether a process with this id runs (true where that cannot be told: nothing is removed).
fn running(pid: &str) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid).exists()
    } else {
        true
    }
}

/// Writes a whole file under a temporary name in the same folder, then renames it.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|f| f.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        remove_quietly(&tmp);
        return Err(io_err(&tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        remove_quietly(&tmp);
        io_err(path)(e)
    })
}

/// `statvfs`'s blocks available to unprivileged users times its fragment size: what `df`
/// shows as available. Asked through libc directly, as `sched.rs` does; a crate for one call
/// would add nothing.
#[cfg(target_os = "linux")]
pub(crate) fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all zeroes is a valid value, overwritten on success.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `stats` is a valid out-pointer.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
    (rc == 0).then(|| (stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn free_space(_dir: &Path) -> Option<u64> {
    None
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a temporary file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> Store {
        let dir = std::env::temp_dir().join(format!("backstop-store-{}", uuid::Uuid::new_v4()));
        Store::new(dir)
    }

    /// A tiny valid GGUF (header only).
    fn tiny_gguf() -> Vec<u8> {
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
        out
    }

    fn add_blob(store: &Store, bytes: &[u8]) -> Digest {
        let tmp = store.partial_path("test").unwrap();
        std::fs::write(&tmp, bytes).unwrap();
        store.import_blob(&tmp, None).unwrap()
    }

    fn name(s: &str) -> ModelName {
        ModelName::parse(s).unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn what_dead_work_left_is_removed_and_work_in_progress_kept() {
        let store = temp_store();
        let part = store.partial_path("part").unwrap();
        std::fs::write(&part, b"a part").unwrap();
        // Beyond the largest process id Linux gives (2^22): never a running process.
        let dead = |kind: &str| {
            store
                .partial_path(&format!("{kind}_99999999_0123"))
                .unwrap()
        };
        let (dead_file, dead_folder, other_kind) = (dead("copy"), dead("links"), dead("other"));
        std::fs::write(&dead_file, b"half a copy").unwrap();
        std::fs::write(&other_kind, b"half of something else").unwrap();
        std::fs::create_dir(&dead_folder).unwrap();
        std::os::unix::fs::symlink(&part, dead_folder.join("part.gguf")).unwrap();
        let mine = store.work_path("copy").unwrap();
        std::fs::write(&mine, b"a copy at work").unwrap();
        let named = mine.file_name().unwrap().to_str().unwrap();
        assert!(
            named.starts_with(&format!("sha256-copy_{}_", std::process::id()))
                && named.ends_with("-partial"),
            "{named}"
        );
        let no_id = store.partial_path("copy_x1_0123").unwrap();
        std::fs::write(&no_id, b"not work's").unwrap();
        let abandoned = SystemTime::now() - ABANDONED - std::time::Duration::from_secs(60);
        for path in [&dead_file, &dead_folder, &other_kind, &mine, &no_id] {
            std::fs::File::open(path)
                .and_then(|f| f.set_modified(abandoned))
                .unwrap();
        }
        // Written a moment ago by a process not seen here (another container's server on the
        // same store): at work, kept.
        let unseen = store.partial_path("copy_99999998_0123").unwrap();
        std::fs::write(&unseen, b"a copy elsewhere").unwrap();

        store.remove_dead_work("copy");
        assert!(!dead_file.exists(), "a dead process's copy");
        assert!(mine.exists() && no_id.exists() && dead_folder.exists() && unseen.exists());
        store.remove_dead_work("links");
        assert!(!dead_folder.exists(), "a dead process's folder of links");
        assert_eq!(
            std::fs::read(&part).unwrap(),
            b"a part",
            "what a link points to stays"
        );
        assert!(other_kind.exists(), "another kind of work is not swept");
        std::fs::remove_dir_all(store.root()).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_free_space_is_asked_of_the_stores_file_system() {
        let store = temp_store();
        let free = store.free_space().expect("statvfs answers on Linux");
        assert!(free > 0 && free < u64::MAX / 2, "{free}");
    }

    #[test]
    fn created_models_are_listed_with_their_defaults_in_ollamas_layout() {
        let store = temp_store();
        let d = add_blob(&store, &tiny_gguf());
        let extra = NewModel {
            system: Some("Be brief.".into()),
            params: Parameters {
                temperature: Some(0.1),
                stop: vec!["END".into()],
                ..Default::default()
            },
            template: None,
        };
        store.create(&name("tiny"), &d, &extra).unwrap();
        assert!(store
            .root()
            .join("manifests/registry.ollama.ai/library/tiny/latest")
            .is_file());
        let list = store.list();
        assert_eq!(list.len(), 1);
        let m = &list[0];
        assert_eq!(m.name.to_string(), "tiny:latest");
        assert_eq!(m.system.as_deref(), Some("Be brief."));
        assert_eq!(m.params.temperature, Some(0.1));
        assert_eq!(m.params.stop, vec!["END".to_string()]);
        assert_eq!(m.model_digest, d);
        std::fs::remove_dir_all(store.root()).ok();
    }

    #[test]
    fn a_model_the_check_refuses_is_not_recorded() {
        let plain = temp_store();
        let d = add_blob(&plain, &tiny_gguf());
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&asked);
        let store = plain
            .clone()
            .with_check(Arc::new(move |path: &Path, _: &_| {
                seen.lock().unwrap().push(path.to_owned());
                Err("cannot compute it: binary_op".into())
            }));
        let err = store
            .create(&name("odd"), &d, &NewModel::default())
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Unusable(r) if r == "cannot compute it: binary_op"),
            "{err:?}"
        );
        assert_eq!(*asked.lock().unwrap(), [store.blob_path(&d)]);
        assert!(store.list().is_empty());
        assert!(store.has_blob(&d), "the blob stays for whoever uploaded it");
        // The same store without a check records it.
        plain
            .create(&name("odd"), &d, &NewModel::default())
            .unwrap();
        assert_eq!(store.list().len(), 1);
        std::fs::remove_dir_all(store.root()).ok();
    }

    #[test]
    fn a_part_of_a_split_model_is_refused_saying_how_to_join_it() {
        let store = temp_store();
        let mut part = tiny_gguf();
        part[16..24].copy_from_slice(&3u64.to_le_bytes());
        for (key, value) in [("split.no", 0u16), ("split.count", 3)] {
            part.extend((key.len() as u64).to_le_bytes());
            part.extend(key.as_bytes());
            part.extend(2u32.to_le_bytes());
            part.extend(value.to_le_bytes());
        }
        let d = add_blob(&store, &part);
        let err = store
            .create(&name("split"), &d, &NewModel::default())
            .unwrap_err();
        let StoreError::Unusable(said) = &err else {
            panic!("{err:?}");
        };
        assert!(said.contains("part 1 of 3 of a model split"), "{said}");
        assert!(
            said.contains("backstop quantize FIRST-PART OUT.gguf COPY"),
            "{said}"
        );
        assert!(store.list().is_empty());
        std::fs::remove_dir_all(store.root()).ok();
    }

    #[test]
    fn copy_shares_blobs_and_delete_keeps_them_until_the_last_name_goes() {
        let store = temp_store();
        let d = add_blob(&store, &tiny_gguf());
        store.create(&name("a"), &d, &NewModel::default()).unwrap();
        store.copy(&name("A:latest"), &name("team/b:v1")).unwrap();
        assert_eq!(store.list().len(), 2);
        store.delete(&name("a")).unwrap();
        assert!(store.has_blob(&d), "blob still used by team/b:v1");
        assert!(store.get(&name("a")).unwrap().is_none());
        store.delete(&name("team/b:v1")).unwrap();
        assert!(!store.has_blob(&d), "unused blob removed");
        assert!(matches!(
            store.delete(&name("a")),
            Err(StoreError::NotFound(_))
        ));
        std::fs::remove_dir_all(store.root()).ok();
    }

    #[test]
    fn a_blob_with_the_wrong_digest_is_refused_and_nothing_is_left() {
        let store = temp_store();
        let tmp = store.partial_path("x").unwrap();
        std::fs::write(&tmp, b"corrupted").unwrap();
        let wanted = Digest::of(b"the real thing");
        let err = store.import_blob(&tmp, Some(&wanted)).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }));
        assert!(!tmp.exists());
        assert!(!store.has_blob(&Digest::of(b"corrupted")));
        std::fs::remove_dir_all(store.root()).ok();
    }

    #[test]
    fn a_manifest_with_a_missing_blob_is_skipped_not_fatal() {
        let store = temp_store();
        let d = add_blob(&store, &tiny_gguf());
        store
            .create(&name("good"), &d, &NewModel::default())
            .unwrap();
        let bad = Manifest {
            schema_version: 2,
            media_type: media::MANIFEST.into(),
            config: Layer {
                media_type: media::CONFIG.into(),
                digest: Digest::of(b"x").to_string(),
                size: 1,
            },
            layers: vec![Layer {
                media_type: media::MODEL.into(),
                digest: Digest::of(b"gone").to_string(),
                size: 4,
            }],
        };
        store.write_manifest(&name("broken"), &bad).unwrap();
        let names: Vec<String> = store.list().iter().map(|m| m.name.to_string()).collect();
        assert_eq!(names, vec!["good:latest"]);
        std::fs::remove_dir_all(store.root()).ok();
    }

    #[test]
    fn digests_parse_in_every_spelling() {
        let hex = "a".repeat(64);
        assert_eq!(Digest::parse(&format!("sha256:{hex}")).unwrap().hex(), hex);
        assert_eq!(Digest::parse(&format!("sha256-{hex}")).unwrap().hex(), hex);
        assert!(Digest::parse("sha256:xyz").is_err());
        assert!(Digest::parse("../../etc/passwd").is_err());
    }
}
