//! Pulling from a Hugging Face hub through the `hf-hub` crate.
//!
//! hf-hub downloads into its own cache, which we place inside the store's `blobs/` folder
//! (`blobs/.hf-partial/`), so its files are on the store's file system and the final move is a
//! rename. It downloads in chunks into `<etag>.sync.part` with the committed offset in an
//! 8-byte trailer, and continues from that offset when the same file is downloaded again:
//! that is our resume. Before it starts, we ask for the file's metadata ourselves: the
//! `x-linked-etag` is the hub's sha256 claim, and hf-hub turns the etag and the commit into
//! file names, so both must be plain hex. Once it reports the file complete we hash it (off
//! the async runtime), compare with every digest we know, check the GGUF header, and only then
//! rename it to `blobs/sha256-<hex>`. A model split into several files is fetched part by part
//! the same way and joined into one blob ([`pull_parts`]); the parts an interrupted pull
//! finished stay in hf-hub's cache, and the next pull hashes them instead of downloading them
//! ([`finished_before`]). Nothing is downloaded that the store's disk has no room for.

use std::path::{Path, PathBuf};
use std::time::Instant;

use hf_hub::api::tokio::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

use super::progress::{Counter, Throttle, TICK};
use super::spec::HubFile;
use super::{chain, remove_quietly, room_for, select, PullError, PullEvent, PullSpec, STALL};
use crate::models::gguf;
use crate::models::name::ModelName;
use crate::models::store::{Digest, NewModel, Store, StoreError, StoredModel};

/// The public hub.
pub(crate) const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Ollama's public registry, where plain names (`llama3.2`) come from.
pub(crate) const DEFAULT_REGISTRY: &str = "https://registry.ollama.ai";

/// hf-hub's own chunk size: the granularity of resuming.
const DEFAULT_CHUNK: usize = 10_000_000;

/// The folder inside `blobs/` that holds hf-hub's cache (partial downloads).
const HF_CACHE: &str = ".hf-partial";

/// Where and how to reach the hub. Read from the same variables `huggingface_hub` reads, so a
/// machine already set up for Hugging Face works unchanged.
#[derive(Clone)]
pub struct HubConfig {
    /// The hub's base URL (`HF_ENDPOINT`): a mirror, or a fake one in tests.
    pub endpoint: String,
    /// Bearer token for private and gated repositories (`HF_TOKEN`).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: never touch the network; only what the store has can be "pulled".
    pub offline: bool,
    /// Bytes per ranged request. Resuming restarts at the last whole chunk, so smaller chunks
    /// lose less on a broken connection and cost more requests.
    pub chunk_size: usize,
    /// Base URL of the Ollama registry that names without a host come from
    /// (`BACKSTOP_REGISTRY` or `OLLAMA_REGISTRY`): a mirror, or a fake one in tests.
    pub registry: String,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            token: None,
            offline: false,
            chunk_size: DEFAULT_CHUNK,
            registry: DEFAULT_REGISTRY.to_owned(),
        }
    }
}

/// The token is a secret: never printed.
impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .field("chunk_size", &self.chunk_size)
            .field("registry", &self.registry)
            .finish()
    }
}

impl HubConfig {
    /// From the environment: `HF_ENDPOINT`, `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`, or the
    /// token file `huggingface-cli login` writes), `HF_HUB_OFFLINE` (which also keeps registry
    /// pulls off the network), `BACKSTOP_REGISTRY` / `OLLAMA_REGISTRY`.
    pub fn from_env() -> HubConfig {
        let mut hub = HubConfig::from_vars(|k| std::env::var(k).ok());
        if hub.token.is_none() {
            hub.token = token_file()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|t| {
                    let t = t.trim();
                    (!t.is_empty()).then(|| t.to_owned())
                });
        }
        hub
    }

    /// From a variable lookup (the environment, or a map in tests); no files are read.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubConfig {
        let set = |k: &str| {
            var(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        HubConfig {
            endpoint: set("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
            token: set("HF_TOKEN").or_else(|| set("HUGGING_FACE_HUB_TOKEN")),
            offline: set("HF_HUB_OFFLINE").is_some_and(|v| {
                ["1", "true", "yes", "on"]
                    .iter()
                    .any(|t| v.eq_ignore_ascii_case(t))
            }),
            chunk_size: DEFAULT_CHUNK,
            registry: set("BACKSTOP_REGISTRY")
                .or_else(|| set("OLLAMA_REGISTRY"))
                .map(|e| e.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| DEFAULT_REGISTRY.to_owned()),
        }
    }
}

/// `HF_TOKEN_PATH`, else `$HF_HOME/token`, else `~/.cache/huggingface/token`.
fn token_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_TOKEN_PATH") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(home).join("token"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/token"))
}

/// The repository listing with `?blobs=true`: file names with their LFS digests.
#[derive(Debug, Deserialize)]
struct Listing {
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// Pulls a hub file into the store (see the module docs).
pub(super) async fn pull(
    store: &Store,
    spec: &PullSpec,
    src: &HubFile,
    hub: &HubConfig,
    mut on: impl FnMut(PullEvent) + Send,
) -> Result<StoredModel, PullError> {
    on(PullEvent::Status("pulling manifest".into()));
    // A pinned blob already in the store needs no network at all.
    if let Some(pin) = spec.sha256().filter(|d| store.has_blob(d)) {
        report_present(store, pin, &mut on);
        return finish(store, spec.name(), pin, false, &mut on).await;
    }
    if hub.offline {
        return match store.get(spec.name())? {
            Some(m) if spec.sha256().is_none_or(|d| *d == m.model_digest) => {
                on(PullEvent::Status("success".into()));
                Ok(m)
            }
            _ => Err(PullError::Offline {
                name: spec.name().to_string(),
            }),
        };
    }
    let cache_dir = store.partial_path("probe")?.with_file_name(HF_CACHE);
    let api = build_api(hub, cache_dir.clone())?;
    let repo = Repo::with_revision(
        src.repo.clone(),
        RepoType::Model,
        src.revision_or_main().to_owned(),
    );
    let listing = list(&api.repo(repo.clone()), src, hub).await?;
    let names: Vec<String> = listing
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .collect();
    let file = select::choose(&src.repo, &names, src.file.as_deref(), src.quant.as_deref())?;
    let parts = select::parts(&src.repo, &names, &file)?;
    let site = Site {
        store,
        api: &api,
        repo: &repo,
        src,
        hub,
        listing: &listing,
        cache_dir: &cache_dir,
    };
    if parts.len() > 1 {
        return pull_parts(store, spec, &site, &parts, &mut on).await;
    }
    // Every digest anyone promised must match: the pin, the listing's LFS digest, and the
    // download's `x-linked-etag`. When they already disagree (a pin that is not what the hub
    // has), nothing is downloaded.
    let mut claims: Vec<Digest> = spec.sha256().into_iter().cloned().collect();
    claims.extend(site.listed(&file));
    agree(&claims, &file)?;
    if let Some(d) = claims.first().filter(|d| store.has_blob(d)) {
        report_present(store, d, &mut on);
        return finish(store, spec.name(), d, false, &mut on).await;
    }
    let (files, blob, digest) = fetch(&site, &file, claims, &mut on).await?;
    if let Err(e) = store.adopt_blob(&blob, &digest) {
        files.remove_all(Some(&blob));
        return Err(e.into());
    }
    files.remove_all(None);
    finish(store, spec.name(), &digest, true, &mut on).await
}

/// Where a pull's files come from: the hub, the repository at its revision, its listing, and
/// hf-hub's cache.
struct Site<'a> {
    store: &'a Store,
    api: &'a Api,
    repo: &'a Repo,
    src: &'a HubFile,
    hub: &'a HubConfig,
    listing: &'a Listing,
    cache_dir: &'a Path,
}

impl Site<'_> {
    /// The sha256 the listing gives a file (files stored with LFS).
    fn listed(&self, file: &str) -> Option<Digest> {
        self.entry(file)
            .and_then(|e| e.lfs.as_ref())
            .and_then(|l| Digest::parse(&l.sha256).ok())
    }

    fn entry(&self, file: &str) -> Option<&Sibling> {
        self.listing.siblings.iter().find(|s| s.rfilename == file)
    }

    /// The file's size, as the listing gives it.
    fn size(&self, file: &str) -> Option<u64> {
        self.entry(file)
            .and_then(|e| e.lfs.as_ref().map(|l| l.size).or(e.size))
    }

    /// Where hf-hub keeps the file whose etag this is once it is downloaded (its partial file
    /// is beside it, with `.sync.part` added).
    fn cached(&self, etag: &str) -> PathBuf {
        Cache::new(self.cache_dir.to_owned())
            .repo(self.repo.clone())
            .blob_path(etag)
    }

    /// Bytes of the file still to download, as the listing sizes it ([`Site::left`]). What
    /// is on disk is found by the listing's sha256, which is the hub's etag for files stored
    /// with LFS; `None` where the listing gives no size.
    fn to_fetch(&self, file: &str) -> Option<u64> {
        let size = self.size(file)?;
        let Some(digest) = self.listed(file) else {
            return Some(size);
        };
        Some(self.left(digest.hex(), size))
    }

    /// Bytes of a `size`-byte file whose etag is `etag` still to download: none once an
    /// earlier pull finished it, less what hf-hub's partial file says it committed (its last
    /// 8 bytes, little-endian, after the file's full length).
    fn left(&self, etag: &str, size: u64) -> u64 {
        let finished = self.cached(etag);
        if finished.is_file() {
            return 0;
        }
        let mut partial = finished.into_os_string();
        partial.push(".sync.part");
        size.saturating_sub(committed(Path::new(&partial), size).unwrap_or(0))
    }
}

/// The offset hf-hub's partial file of a `size`-byte download has committed: its trailer.
fn committed(partial: &Path, size: u64) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(partial).ok()?;
    if f.metadata().ok()?.len() != size.checked_add(8)? {
        return None;
    }
    f.seek(SeekFrom::Start(size)).ok()?;
    let mut trailer = [0u8; 8];
    f.read_exact(&mut trailer).ok()?;
    Some(u64::from_le_bytes(trailer))
}

/// Downloads one file into hf-hub's cache and verifies it against `claims` and every claim
/// the hub makes on the way: hf-hub's files for it, the verified file, and its digest. On an
/// error, what the download left is tidied as a retry needs it (a resumable part is kept).
async fn fetch(
    site: &Site<'_>,
    file: &str,
    mut claims: Vec<Digest>,
    on: &mut (impl FnMut(PullEvent) + Send),
) -> Result<(HfFiles, PathBuf, Digest), PullError> {
    let repo_api = site.api.repo(site.repo.clone());
    let probe = probe(site.api, &repo_api, site.src, site.hub, file).await?;
    claims.extend(probe.sha256.clone());
    agree(&claims, file)?;
    let mut files = HfFiles::new(site.cache_dir, site.repo, &probe.commit, file);
    files.remove_stale_pointer();
    // A listing without sizes (a mirror that ignores `blobs=true`) leaves the size the probe
    // read from the hub's answer to a one-byte range request.
    let probed = (probe.size > 0).then_some(probe.size);
    let size = site.size(file).or(probed);
    let label = claims
        .first()
        .map_or_else(|| "sha256:pending".to_owned(), Digest::to_string);
    if let Some(found) = finished_before(site, &probe, file, &claims, &label, on).await {
        return Ok((files, found.0, found.1));
    }
    let needed = site
        .to_fetch(file)
        .or_else(|| probed.map(|size| site.left(&probe.etag, size)));
    if let Some(needed) = needed {
        room_for(site.store, || format!("downloading {file}"), needed)?;
    }
    let downloaded = download(&repo_api, site.src, site.hub, file, &label, size, on).await;
    let blob = match downloaded {
        Ok(pointer) => {
            let blob = files.blob_of(&pointer).await;
            files.pointer = Some(pointer);
            blob
        }
        Err(e) => {
            if !matches!(e, PullError::Interrupted { .. } | PullError::Busy { .. }) {
                files.prune_dirs();
            }
            return Err(e);
        }
    };
    let blob = match blob {
        Ok(b) => b,
        Err(e) => {
            files.remove_all(None);
            return Err(e);
        }
    };
    on(PullEvent::Status("verifying sha256 digest".into()));
    // hf-hub names the file after the etag it saw, which may differ from the probe's if the
    // hub changed in between: that claim counts too.
    claims.extend(
        blob.file_name()
            .and_then(|n| n.to_str())
            .filter(|n| n.len() == 64)
            .and_then(|n| Digest::parse(n).ok()),
    );
    match verify(&blob, file, claims).await {
        Ok(digest) => Ok((files, blob, digest)),
        Err(e) => {
            files.remove_all(Some(&blob));
            Err(e)
        }
    }
}

/// A file an earlier pull downloaded and verified but did not move into the store (a part of
/// a split model whose pull stopped in a later part) is still in hf-hub's cache under its
/// sha256: hashing it again is all it needs, not a second download. One that no longer hashes
/// to what the hub claims is removed and downloaded again.
async fn finished_before(
    site: &Site<'_>,
    probe: &Probe,
    file: &str,
    claims: &[Digest],
    label: &str,
    on: &mut (impl FnMut(PullEvent) + Send),
) -> Option<(PathBuf, Digest)> {
    probe.sha256.as_ref()?;
    let blob = site.cached(&probe.etag);
    if !blob.is_file() {
        return None;
    }
    on(PullEvent::Status(format!(
        "verifying sha256 digest of {file}, downloaded before"
    )));
    match verify(&blob, file, claims.to_vec()).await {
        Ok(digest) => {
            let total = std::fs::metadata(&blob).map_or(0, |m| m.len());
            on(PullEvent::Progress {
                digest: label.to_owned(),
                total,
                completed: total,
            });
            Some((blob, digest))
        }
        Err(e) => {
            tracing::warn!(%file, error = %e, "a file downloaded before is downloaded again");
            remove_quietly(&blob);
            None
        }
    }
}

/// Whether a failed split pull keeps the parts it finished for the next one: when pulling
/// again may succeed (the connection, the disk, another pull), not when the hub's files are
/// wrong.
fn worth_keeping(e: &PullError) -> bool {
    matches!(
        e,
        PullError::Interrupted { .. }
            | PullError::Network { .. }
            | PullError::Busy { .. }
            | PullError::NoSpace { .. }
            | PullError::Io { .. }
    )
}

/// Pulls a model split into several files (`parts`, first first) and joins them into one
/// blob, since the store keeps a model in one file, as Ollama's does (and a blob, named by its
/// digest, could not be found by llama.cpp as a part). Each part is downloaded and verified as
/// a file in one piece is; then llama.cpp's quantizer copies their tensors as they are into one
/// file (its COPY, which leaves the split keys out), and the parts go. A pin is the joined
/// file's digest, the one the store lists. A record of which parts made which blob lets the
/// same pull again find it without downloading.
async fn pull_parts(
    store: &Store,
    spec: &PullSpec,
    site: &Site<'_>,
    parts: &[String],
    on: &mut (impl FnMut(PullEvent) + Send),
) -> Result<StoredModel, PullError> {
    let listed: Option<Vec<Digest>> = parts.iter().map(|p| site.listed(p)).collect();
    let record = listed.map(|l| joined_record(store, &l));
    let known = record
        .as_ref()
        .and_then(|r| std::fs::read_to_string(r).ok())
        .and_then(|t| Digest::parse(t.trim()).ok())
        .filter(|d| store.has_blob(d));
    if let Some(d) = known {
        if let Some(pin) = spec.sha256() {
            agree(&[pin.clone(), d.clone()], &parts[0])?;
        }
        report_present(store, &d, on);
        return finish(store, spec.name(), &d, false, on).await;
    }
    // The parts, and the one file they are joined into, must fit before anything starts.
    let whole: Option<u64> = parts.iter().map(|p| site.size(p)).sum();
    let to_fetch: Option<u64> = parts.iter().map(|p| site.to_fetch(p)).sum();
    let (n, first) = (parts.len(), &parts[0]);
    if let (Some(whole), Some(to_fetch)) = (whole, to_fetch) {
        room_for(
            site.store,
            || format!("downloading the {n} parts of {first} and joining them into one file"),
            to_fetch.saturating_add(whole),
        )?;
    }
    let mut fetched: Vec<(HfFiles, PathBuf)> = Vec::with_capacity(parts.len());
    let tidy = |fetched: &[(HfFiles, PathBuf)]| {
        for (files, blob) in fetched {
            files.remove_all(Some(blob));
        }
    };
    for part in parts {
        match fetch(site, part, site.listed(part).into_iter().collect(), on).await {
            Ok((files, blob, _)) => fetched.push((files, blob)),
            Err(e) => {
                if !worth_keeping(&e) {
                    tidy(&fetched);
                }
                return Err(e);
            }
        }
    }
    // Without sizes in the listing, the parts on disk give them.
    let whole = whole.or_else(|| {
        fetched
            .iter()
            .map(|(_, blob)| std::fs::metadata(blob).ok().map(|m| m.len()))
            .sum()
    });
    if let Some(whole) = whole {
        room_for(
            site.store,
            || format!("joining the {n} parts of {first} into one file"),
            whole,
        )?;
    }
    let blobs: Vec<PathBuf> = fetched.iter().map(|(_, b)| b.clone()).collect();
    let links = store.work_path(LINKS)?;
    let temp = store.partial_path(&format!("{JOINED}{}", uuid::Uuid::new_v4().simple()))?;
    // What a join cut short by a crash left (each join has a name of its own): the file the
    // quantizer was writing, and the folder of links.
    if let Some(blobs) = temp.parent() {
        let joined = format!("sha256-{JOINED}");
        let idle = crate::models::store::ABANDONED;
        crate::bench::quantize::remove_stale(blobs, idle, |stale| stale.starts_with(&joined));
    }
    store.remove_dead_work(LINKS);
    let joined = join(&links, parts, blobs, &temp, on).await;
    if let Err(e) = std::fs::remove_dir_all(&links) {
        tracing::warn!(path = %links.display(), error = %e, "could not remove a download leftover");
    }
    tidy(&fetched);
    let digest = match joined {
        Ok(d) => d,
        Err(e) => {
            remove_quietly(&temp);
            return Err(e);
        }
    };
    if let Some(pin) = spec.sha256().filter(|p| **p != digest) {
        remove_quietly(&temp);
        return Err(PullError::Sha256Mismatch {
            file: format!("{} joined", parts[0]),
            expected: pin.clone(),
            actual: digest,
        });
    }
    store.adopt_blob(&temp, &digest)?;
    if let Some(r) = &record {
        // Only a shortcut for the next pull: without it, the parts are downloaded again.
        let written = r
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(r, digest.to_string()));
        if let Err(e) = written {
            tracing::warn!(path = %r.display(), error = %e, "cannot record the joined model");
        }
    }
    finish(store, spec.name(), &digest, true, on).await
}

/// Joins the downloaded parts (`blobs`, named `parts` on the hub) into `into` with llama.cpp's
/// quantizer (COPY), through links in `links`, and hashes the result, off the async runtime.
/// Joining a large model takes minutes, so how much of it is written is reported as it goes.
async fn join(
    links: &Path,
    parts: &[String],
    blobs: Vec<PathBuf>,
    into: &Path,
    on: &mut (impl FnMut(PullEvent) + Send),
) -> Result<Digest, PullError> {
    use crate::bench::quantize;
    let total = blobs
        .iter()
        .map(|b| std::fs::metadata(b).map_or(0, |m| m.len()))
        .sum();
    let status = format!("joining {} parts into one file", parts.len());
    let step = |completed| PullEvent::Step {
        status: status.clone(),
        total,
        completed,
    };
    on(step(0));
    let (dir, names, out) = (links.to_owned(), parts.to_vec(), into.to_owned());
    let mut task = tokio::task::spawn_blocking(move || -> Result<(), PullError> {
        let first = link_parts(&dir, &names, &blobs)?;
        quantize::quantize(&first, &out, quantize::COPY, &quantize::Options::default())
            .map(drop)
            .map_err(|e| PullError::Internal(format!("joining the parts of {}: {e}", names[0])))
    });
    let writing = quantize::writing(into);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut reported = 0;
    let done = loop {
        tokio::select! {
            done = &mut task => break done,
            _ = tick.tick() => {
                let written = std::fs::metadata(&writing).map_or(0, |m| m.len()).min(total);
                if written > reported {
                    reported = written;
                    on(step(written));
                }
            }
        }
    };
    done.map_err(|e| PullError::Internal(format!("joining task failed: {e}")))??;
    on(step(total));
    on(PullEvent::Status("verifying sha256 digest".into()));
    let out = into.to_owned();
    tokio::task::spawn_blocking(move || Digest::of_file(&out))
        .await
        .map_err(|e| PullError::Internal(format!("hashing task failed: {e}")))?
        .map_err(PullError::from)
}

/// Makes `dir` a folder of links named as the parts (`NAME-00001-of-00003.gguf`, ...), each to
/// its downloaded file, and returns the first: llama.cpp finds a split model's other parts
/// beside its first by name, and hf-hub's own links can sit in different snapshots (a part
/// finished by an earlier pull, before the repository moved on). Symbolic links, so a folder
/// left by a crash holds no space; hard links where there are none.
fn link_parts(dir: &Path, parts: &[String], blobs: &[PathBuf]) -> Result<PathBuf, PullError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PullError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut links = parts.iter().zip(blobs).map(|(part, blob)| {
        let name = Path::new(part).file_name().unwrap_or(part.as_ref());
        let link = dir.join(name);
        #[cfg(unix)]
        let made = std::os::unix::fs::symlink(blob, &link);
        #[cfg(not(unix))]
        let made = std::fs::hard_link(blob, &link);
        made.map(|()| link.clone()).map_err(io(&link))
    });
    let first = links
        .next()
        .ok_or_else(|| PullError::Internal("a split model without parts".into()))??;
    for link in links {
        link?;
    }
    Ok(first)
}

/// How the file a join writes is named in the blob folder, after `sha256-`: then a name of its
/// own and `-partial` ([`Store::partial_path`] keeps letters, digits and `_` of a label).
const JOINED: &str = "joined_";

/// The kind of work ([`Store::work_path`]) a join's folder of links to the parts is.
const LINKS: &str = "parts";

/// Where the blob joined from parts with these digests is recorded:
/// `blobs/.joined/<sha256 of the parts' digests>`.
fn joined_record(store: &Store, parts: &[Digest]) -> PathBuf {
    let key: Vec<String> = parts.iter().map(Digest::to_string).collect();
    let key = Digest::of(key.join("\n").as_bytes());
    store
        .blob_path(&key)
        .with_file_name(".joined")
        .join(key.hex())
}

/// Refuses claims that disagree with each other: at least one of them is wrong.
fn agree(claims: &[Digest], file: &str) -> Result<(), PullError> {
    match claims.iter().find(|c| **c != claims[0]) {
        Some(other) => Err(PullError::Sha256Mismatch {
            file: file.to_owned(),
            expected: claims[0].clone(),
            actual: other.clone(),
        }),
        None => Ok(()),
    }
}

fn build_api(hub: &HubConfig, cache_dir: PathBuf) -> Result<Api, PullError> {
    ApiBuilder::from_cache(Cache::new(cache_dir))
        .with_endpoint(hub.endpoint.clone())
        .with_token(hub.token.clone())
        .with_progress(false)
        .with_chunk_size(Some(hub.chunk_size.max(1)))
        .with_user_agent("backstop", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| PullError::Network {
            endpoint: hub.endpoint.clone(),
            message: match e {
                ApiError::InvalidHeaderValue(_) => "HF_TOKEN is not a valid header value".into(),
                other => chain(&other),
            },
        })
}

/// Asks for the repository's file list, with LFS digests.
async fn list(repo: &ApiRepo, src: &HubFile, hub: &HubConfig) -> Result<Listing, PullError> {
    let network = |message: String| PullError::Network {
        endpoint: hub.endpoint.clone(),
        message,
    };
    let request = repo.info_request().query(&[("blobs", "true")]).send();
    let response = tokio::time::timeout(STALL, request)
        .await
        .map_err(|_| network(format!("no answer within {} s", STALL.as_secs())))?
        .map_err(|e| network(chain(&e)))?;
    let status = response.status().as_u16();
    match status {
        200..=299 => {}
        401 | 404 => {
            return Err(PullError::RepoNotFound {
                repo: src.repo.clone(),
                revision: src.revision_or_main().to_owned(),
                endpoint: hub.endpoint.clone(),
            })
        }
        403 => {
            return Err(PullError::Forbidden {
                repo: src.repo.clone(),
                status,
            })
        }
        _ => {
            return Err(network(format!(
                "the repository listing answered HTTP {status}"
            )))
        }
    }
    response.json::<Listing>().await.map_err(|e| {
        network(format!(
            "the repository listing is not what a hub sends: {}",
            chain(&e)
        ))
    })
}

/// Runs hf-hub's download, reporting progress every [`TICK`] and giving up after [`STALL`]
/// without a byte. Returns hf-hub's pointer to the finished file.
async fn download(
    repo: &ApiRepo,
    src: &HubFile,
    hub: &HubConfig,
    file: &str,
    label: &str,
    size: Option<u64>,
    on: &mut (impl FnMut(PullEvent) + Send),
) -> Result<PathBuf, PullError> {
    let counter = Counter::default();
    let transfer = repo.download_with_progress(file, counter.clone());
    tokio::pin!(transfer);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut throttle = Throttle::default();
    let mut last_bytes = (Instant::now(), 0);
    let interrupted = |message: String| PullError::Interrupted {
        repo: src.repo.clone(),
        file: file.to_owned(),
        message,
    };
    let outcome = loop {
        tokio::select! {
            done = &mut transfer => break done,
            _ = tick.tick() => {
                let (total, completed) = counter.get();
                if counter.started() {
                    if let Some((total, completed)) = throttle.next((total, completed)) {
                        on(PullEvent::Progress { digest: label.to_owned(), total, completed });
                    }
                }
                if completed != last_bytes.1 {
                    last_bytes = (Instant::now(), completed);
                } else if last_bytes.0.elapsed() > STALL {
                    let message = format!("no data for {} s", STALL.as_secs());
                    return Err(if counter.started() {
                        interrupted(message)
                    } else {
                        PullError::Network { endpoint: hub.endpoint.clone(), message }
                    });
                }
            }
        }
    };
    match outcome {
        Ok(pointer) => {
            let total = counter.get().0;
            let total = if total == 0 { size.unwrap_or(0) } else { total };
            on(PullEvent::Progress {
                digest: label.to_owned(),
                total,
                completed: total,
            });
            Ok(pointer)
        }
        Err(e) => Err(api_error(e, src, hub, file, counter.started())),
    }
}

/// What the hub says about the file before hf-hub downloads it.
struct Probe {
    /// The commit the revision resolves to (`x-repo-commit`).
    commit: String,
    /// The etag, plain hex: hf-hub's name for the downloaded file.
    etag: String,
    /// The sha256 the hub claims (`x-linked-etag`), for files stored with LFS.
    sha256: Option<Digest>,
    /// The file's size in bytes (the total of the range answer's `Content-Range`).
    size: u64,
}

/// Asks for the file's metadata as hf-hub will, and refuses an etag or commit that is not
/// plain hex: hf-hub uses both as file names in its cache, so a hostile mirror could
/// otherwise make it write outside the store.
async fn probe(
    api: &Api,
    repo: &ApiRepo,
    src: &HubFile,
    hub: &HubConfig,
    file: &str,
) -> Result<Probe, PullError> {
    let url = repo.url(file);
    let meta = tokio::time::timeout(STALL, api.metadata(&url))
        .await
        .map_err(|_| PullError::Network {
            endpoint: hub.endpoint.clone(),
            message: format!("no answer within {} s", STALL.as_secs()),
        })?
        .map_err(|e| api_error(e, src, hub, file, false))?;
    let hex = |t: &str| !t.is_empty() && t.len() <= 128 && t.chars().all(|c| c.is_ascii_hexdigit());
    if !hex(meta.etag()) || !hex(meta.commit_hash()) {
        return Err(PullError::Network {
            endpoint: hub.endpoint.clone(),
            message: format!(
                "the hub sent an etag `{}` or commit `{}` that is not a hash",
                meta.etag().escape_default(),
                meta.commit_hash().escape_default()
            ),
        });
    }
    Ok(Probe {
        commit: meta.commit_hash().to_owned(),
        etag: meta.etag().to_owned(),
        sha256: (meta.etag().len() == 64)
            .then(|| Digest::parse(meta.etag()).ok())
            .flatten(),
        size: u64::try_from(meta.size()).unwrap_or(u64::MAX),
    })
}

/// Turns an hf-hub error into ours; `started` says whether the partial file already existed.
fn api_error(e: ApiError, src: &HubFile, hub: &HubConfig, file: &str, started: bool) -> PullError {
    if let ApiError::LockAcquisition(_) = e {
        return PullError::Busy {
            file: file.to_owned(),
        };
    }
    match http_status(&e) {
        Some(status @ (401 | 403)) => PullError::Forbidden {
            repo: src.repo.clone(),
            status,
        },
        _ if started => PullError::Interrupted {
            repo: src.repo.clone(),
            file: file.to_owned(),
            message: chain(&e),
        },
        Some(404) => PullError::Network {
            endpoint: hub.endpoint.clone(),
            message: format!("{file} is listed but its download answered HTTP 404"),
        },
        _ => PullError::Network {
            endpoint: hub.endpoint.clone(),
            message: match e {
                ApiError::MissingHeader(h) => format!(
                    "the hub's answer lacks the `{h}` header; is HF_ENDPOINT a Hugging Face hub?"
                ),
                other => chain(&other),
            },
        },
    }
}

/// The HTTP status behind an hf-hub error, if it was one.
fn http_status(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(r) => r.status().map(|s| s.as_u16()),
        ApiError::TooManyRetries(inner) => http_status(inner),
        _ => None,
    }
}

/// Hashes the finished download off the runtime and checks it against every claim and as a
/// GGUF header. The caller removes the file when this fails.
async fn verify(blob: &Path, file: &str, claims: Vec<Digest>) -> Result<Digest, PullError> {
    let blob = blob.to_owned();
    let file = file.to_owned();
    tokio::task::spawn_blocking(move || {
        let actual = Digest::of_file(&blob)?;
        if let Some(expected) = claims.iter().find(|c| **c != actual) {
            return Err(PullError::Sha256Mismatch {
                file,
                expected: expected.clone(),
                actual,
            });
        }
        if claims.is_empty() {
            tracing::warn!(
                %file, digest = %actual,
                "the hub gave no sha256 for this file (not stored with LFS) and none was pinned: \
                 accepting the downloaded bytes as they are"
            );
        }
        // One file's header: a split model's part is checked alone (its blob's name is not
        // a part's), and the whole model when its parts are joined.
        gguf::read_file(&blob).map_err(|e| PullError::NotGguf {
            file,
            reason: e.to_string(),
        })?;
        Ok(actual)
    })
    .await
    .map_err(|e| PullError::Internal(format!("hashing task failed: {e}")))?
}

/// Emits the progress line for a blob the store already has.
fn report_present(store: &Store, digest: &Digest, on: &mut impl FnMut(PullEvent)) {
    let size = std::fs::metadata(store.blob_path(digest)).map_or(0, |m| m.len());
    on(PullEvent::Progress {
        digest: digest.to_string(),
        total: size,
        completed: size,
    });
}

/// Writes the manifest. A blob this pull imported that turns out not to be a GGUF, or to be
/// one the store's check refuses, is removed.
async fn finish(
    store: &Store,
    name: &ModelName,
    digest: &Digest,
    imported: bool,
    on: &mut (impl FnMut(PullEvent) + Send),
) -> Result<StoredModel, PullError> {
    on(PullEvent::Status("writing manifest".into()));
    let (s, n, d) = (store.clone(), name.clone(), digest.clone());
    let created = tokio::task::spawn_blocking(move || s.create(&n, &d, &NewModel::default()))
        .await
        .map_err(|e| PullError::Internal(format!("manifest task failed: {e}")))?;
    let file = name.to_string();
    let refused = match created {
        Ok(model) => {
            on(PullEvent::Status("success".into()));
            return Ok(model);
        }
        Err(StoreError::NotGguf(reason)) => PullError::NotGguf { file, reason },
        Err(StoreError::Unusable(reason)) => PullError::Unusable { file, reason },
        Err(e) => return Err(e.into()),
    };
    if imported {
        remove_quietly(&store.blob_path(digest));
    }
    Err(refused)
}

/// The files hf-hub writes for one download, so a pull can tidy them away.
struct HfFiles {
    /// `models--OWNER--REPO` inside the hf-hub cache.
    repo_dir: PathBuf,
    /// `refs/<revision>`: the commit the revision pointed at.
    refs: PathBuf,
    /// `snapshots/<commit>/<file>`: hf-hub's symlink to the downloaded file.
    pointer: Option<PathBuf>,
}

impl HfFiles {
    fn new(cache_dir: &Path, repo: &Repo, commit: &str, file: &str) -> HfFiles {
        let repo_dir = cache_dir.join(repo.folder_name());
        HfFiles {
            refs: repo_dir.join("refs").join(repo.revision()),
            pointer: Some(repo_dir.join("snapshots").join(commit).join(file)),
            repo_dir,
        }
    }

    /// A pointer left by an earlier pull whose file has since moved into the store dangles,
    /// and hf-hub fails when it tries to create it again; remove it first.
    fn remove_stale_pointer(&self) {
        if let Some(p) = &self.pointer {
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
                remove_quietly(p);
            }
        }
    }

    /// The downloaded file behind hf-hub's pointer (a symlink; the file itself on systems
    /// without symlinks).
    async fn blob_of(&self, pointer: &Path) -> Result<PathBuf, PullError> {
        tokio::fs::canonicalize(pointer)
            .await
            .map_err(|source| PullError::Io {
                path: pointer.to_owned(),
                source,
            })
    }

    /// Removes what hf-hub left for this file (and `blob`, when given), then empty folders.
    fn remove_all(&self, blob: Option<&Path>) {
        if let Some(b) = blob {
            remove_quietly(b);
            let mut lock = b.to_owned();
            lock.set_extension("lock");
            remove_quietly(&lock);
        }
        if let Some(p) = &self.pointer {
            if std::fs::symlink_metadata(p).is_ok() {
                remove_quietly(p);
            }
        }
        remove_quietly(&self.refs);
        self.remove_locks();
        self.prune_dirs();
    }

    /// hf-hub never deletes its `<etag>.lock` files; drop those of finished downloads (a lock
    /// beside a `.sync.part` still belongs to a resumable download).
    fn remove_locks(&self) {
        let blobs = self.repo_dir.join("blobs");
        let Ok(entries) = std::fs::read_dir(&blobs) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "lock")
                && !path.with_extension("sync.part").exists()
            {
                remove_quietly(&path);
            }
        }
    }

    /// Removes the repository's empty folders (never a file).
    fn prune_dirs(&self) {
        remove_empty_dirs(&self.repo_dir);
    }
}

/// Removes `dir` and its subfolders, deepest first, where they are empty.
fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    // Fails, as it should, while anything is left inside.
    let _still_in_use = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> HubConfig {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        HubConfig::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn a_partial_files_committed_offset_is_read_from_its_trailer() {
        let dir = std::env::temp_dir().join(format!("backstop-committed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let partial = dir.join("x.sync.part");
        let mut bytes = vec![0u8; 100];
        bytes.extend(40u64.to_le_bytes());
        std::fs::write(&partial, &bytes).unwrap();
        assert_eq!(committed(&partial, 100), Some(40));
        // Another size: hf-hub starts that download afresh, and so do we count it.
        assert_eq!(committed(&partial, 99), None);
        assert_eq!(committed(&dir.join("none"), 100), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_hub_settings_follow_huggingface_hubs_variables() {
        let h = vars(&[]);
        assert_eq!(h.endpoint, "https://huggingface.co");
        assert_eq!(h.token, None);
        assert!(!h.offline);
        assert_eq!(h.registry, "https://registry.ollama.ai");
        assert_eq!(
            vars(&[("OLLAMA_REGISTRY", "http://127.0.0.1:5000/")]).registry,
            "http://127.0.0.1:5000"
        );
        let h = vars(&[
            ("HF_ENDPOINT", "http://mirror.local:8080/"),
            ("HUGGING_FACE_HUB_TOKEN", "old"),
            ("HF_HUB_OFFLINE", "1"),
        ]);
        assert_eq!(h.endpoint, "http://mirror.local:8080");
        assert_eq!(h.token.as_deref(), Some("old"));
        assert!(h.offline);
        let h = vars(&[("HF_TOKEN", "new"), ("HUGGING_FACE_HUB_TOKEN", "old")]);
        assert_eq!(h.token.as_deref(), Some("new"));
        assert!(vars(&[("HF_HUB_OFFLINE", "TRUE")]).offline);
        assert!(!vars(&[("HF_HUB_OFFLINE", "0")]).offline);
    }

    #[test]
    fn the_token_never_appears_in_debug_output() {
        let h = vars(&[("HF_TOKEN", "hf_secret")]);
        assert!(!format!("{h:?}").contains("hf_secret"));
    }
}
