//! `backstop pull` and `POST /api/pull`: fetch a model into the store, either one GGUF file
//! from Hugging Face (`hf.co/OWNER/REPO:QUANT`, through the `hf-hub` crate) or a model from an
//! Ollama registry (`llama3.2:1b`, its manifest and every layer, kept exactly as received,
//! since the store is Ollama's own layout).
//!
//! The guarantees, whatever goes wrong:
//! * bytes land under a temporary name inside the store's `blobs/` folder and are renamed to
//!   `blobs/sha256-<hex>` only after their sha256 matched every digest known for them (the
//!   pinned one, the hub's LFS digest from the listing and from the download's `x-linked-etag`;
//!   a registry layer's own digest);
//! * a refused download leaves no file behind; an interrupted one leaves only its resumable
//!   partial file (and, from a registry, the layers already verified; from a hub, the parts of
//!   a split model already finished), and the next pull continues from there;
//! * a pull the store's file system has no room for is refused before its download starts;
//! * offline (`HF_HUB_OFFLINE=1`) nothing touches the network.

mod hub;
mod progress;
mod registry;
mod select;
mod spec;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use hub::HubConfig;
pub use spec::PullSpec;

use spec::Source;

use super::store::{Digest, Store, StoreError, StoredModel};

/// What a pull reports as it goes, in Ollama's `/api/pull` vocabulary, so the API can stream
/// it as is and the CLI can draw a progress bar from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// A step: `pulling manifest`, `verifying sha256 digest`, `writing manifest`, `success`.
    Status(String),
    /// Download progress of one blob, at most every 100 ms.
    Progress {
        /// `sha256:<hex>` when the digest is known before the download, else `sha256:pending`.
        digest: String,
        /// The file's size in bytes.
        total: u64,
        /// Bytes downloaded so far (resumed bytes included).
        completed: u64,
    },
    /// How far a long step that downloads nothing has got (joining a split model's parts),
    /// at most every 100 ms: Ollama's progress object without a digest.
    Step {
        /// What the step is: `joining 3 parts into one file`.
        status: String,
        /// Bytes the step will write.
        total: u64,
        /// Bytes written so far.
        completed: u64,
    },
}

impl PullEvent {
    /// The event as Ollama's `/api/pull` streams it: `{"status"}`, for a download
    /// `{"status": "pulling <12 hex>", "digest", "total", "completed"}`, for another step
    /// `{"status", "total", "completed"}`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            PullEvent::Status(s) => serde_json::json!({ "status": s }),
            PullEvent::Step {
                status,
                total,
                completed,
            } => serde_json::json!({ "status": status, "total": total, "completed": completed }),
            PullEvent::Progress {
                digest,
                total,
                completed,
            } => {
                let short: String = digest
                    .trim_start_matches("sha256:")
                    .chars()
                    .take(12)
                    .collect();
                serde_json::json!({
                    "status": format!("pulling {short}"),
                    "digest": digest,
                    "total": total,
                    "completed": completed,
                })
            }
        }
    }
}

/// Why a pull failed. Each message says what to do next, because the CLI and the API show it
/// to the user as it is.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The model reference, repository, file or revision was refused before any request.
    #[error("invalid model reference `{input}`: {reason}")]
    InvalidSpec {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A pinned digest that is not `sha256:<64 hex digits>`.
    #[error("invalid sha256 `{0}`: expected 64 hex digits, optionally prefixed with `sha256:`")]
    BadSha256(String),
    /// The hub does not know the repository or revision (or hides a private one).
    #[error(
        "repository {repo} (revision {revision}) was not found on {endpoint}; \
         if it is private, set HF_TOKEN"
    )]
    RepoNotFound {
        /// `OWNER/REPO`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The hub asked.
        endpoint: String,
    },
    /// The hub refused access (a gated model whose terms were not accepted, a bad token).
    #[error(
        "the hub refused access to {repo} (HTTP {status}); for a gated model, accept its \
         terms on the hub and set HF_TOKEN"
    )]
    Forbidden {
        /// `OWNER/REPO`.
        repo: String,
        /// The HTTP status.
        status: u16,
    },
    /// The named file is not in the repository.
    #[error("{repo} has no file `{file}`; {}", list_ggufs(available))]
    FileNotFound {
        /// `OWNER/REPO`.
        repo: String,
        /// The file asked for.
        file: String,
        /// The GGUF files the repository does have.
        available: Vec<String>,
    },
    /// No GGUF file in the repository carries the quantization.
    #[error(
        "{repo} has no GGUF file for quantization {quant}; {}",
        list_ggufs(available)
    )]
    QuantNotFound {
        /// `OWNER/REPO`.
        repo: String,
        /// The quantization asked for (Q4_K_M when none was).
        quant: String,
        /// The GGUF files the repository does have.
        available: Vec<String>,
    },
    /// A model split over several GGUF files whose parts the repository does not all list.
    #[error(
        "{repo} does not list {} of its {count} parts of a model split into several files: {}",
        files.len(),
        files.join(", ")
    )]
    SplitGguf {
        /// `OWNER/REPO`.
        repo: String,
        /// How many parts the model has.
        count: u64,
        /// The parts missing.
        files: Vec<String>,
    },
    /// Offline, and the model (or its pinned blob) is not in the store.
    #[error(
        "offline (HF_HUB_OFFLINE is set) and {name} is not in the model store; pull it \
         where the hub is reachable and copy the store over, or unset HF_HUB_OFFLINE"
    )]
    Offline {
        /// The model's store name.
        name: String,
    },
    /// The registry has no such model or tag.
    #[error("{name} was not found in the registry at {registry}")]
    ModelNotFound {
        /// The model asked for.
        name: String,
        /// The registry asked.
        registry: String,
    },
    /// The registry wants credentials backstop does not have.
    #[error(
        "the registry refused {name} (HTTP {status}); pulling private models from an \
         Ollama registry is not supported"
    )]
    RegistryRefused {
        /// The model asked for.
        name: String,
        /// The HTTP status.
        status: u16,
    },
    /// A registry manifest backstop cannot use.
    #[error("the manifest of {name} is not usable: {reason}")]
    BadManifest {
        /// The model asked for.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// More bytes arrived than the manifest announced; nothing was kept.
    #[error("{file}: expected {expected} bytes, got more; nothing was kept")]
    TooLong {
        /// The blob.
        file: String,
        /// The size the manifest gave.
        expected: u64,
    },
    /// The connection broke during the download; what arrived is kept for the next pull.
    #[error(
        "download of {file} from {repo} was interrupted ({message}); pull again to resume \
         where it stopped"
    )]
    Interrupted {
        /// `OWNER/REPO`.
        repo: String,
        /// The file.
        file: String,
        /// What broke.
        message: String,
    },
    /// The hub could not be asked, or answered something unusable.
    #[error("could not reach the hub at {endpoint}: {message}")]
    Network {
        /// The hub.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// The store's file system has no room for what the pull still has to write; checked
    /// before each download and before a split model's parts are joined. What was downloaded
    /// is kept.
    #[error(
        "{what} needs {} free in {}, and there is {}; free some space and pull again \
         (what was downloaded is kept)",
        crate::client::format::size(*.needed),
        .dir.display(),
        crate::client::format::size(*.free)
    )]
    NoSpace {
        /// What needs the room: `downloading F`, `joining the 3 parts of F`.
        what: String,
        /// The folder written to.
        dir: PathBuf,
        /// Bytes still to write.
        needed: u64,
        /// Bytes free there.
        free: u64,
    },
    /// Another pull of the same file holds its partial file.
    #[error("another pull of {file} is already in progress")]
    Busy {
        /// The file.
        file: String,
    },
    /// The bytes do not hash to the digest they should have; nothing was kept.
    #[error("sha256 mismatch for {file}: expected {expected}, got {actual}; nothing was kept")]
    Sha256Mismatch {
        /// The file.
        file: String,
        /// What the pin or the hub promised.
        expected: Digest,
        /// What the bytes hash to (or what the hub lists, when a pin disagrees with it).
        actual: Digest,
    },
    /// The file is not a GGUF model; nothing was kept.
    #[error("{file} is not a GGUF model ({reason}); nothing was kept")]
    NotGguf {
        /// The file.
        file: String,
        /// What the header check said.
        reason: String,
    },
    /// The file is a GGUF the engine cannot run ([`crate::models::ModelCheck`]); nothing
    /// was kept.
    #[error("{file} cannot be served: {reason}; nothing was kept")]
    Unusable {
        /// The file.
        file: String,
        /// What the check said.
        reason: String,
    },
    /// A file system error on the download's temporary files.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store refused the blob or the manifest.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A background hashing task died.
    #[error("internal error: {0}")]
    Internal(String),
}

/// `the GGUF files there are: a, b` (at most 30 named), or that there are none.
fn list_ggufs(files: &[String]) -> String {
    const SHOWN: usize = 30;
    if files.is_empty() {
        return "the repository has no .gguf files".into();
    }
    let mut text = format!(
        "the GGUF files there are: {}",
        files[..files.len().min(SHOWN)].join(", ")
    );
    if files.len() > SHOWN {
        text.push_str(&format!(" and {} more", files.len() - SHOWN));
    }
    text
}

/// A download that receives nothing for this long is abandoned (neither hf-hub nor the
/// registry client would ever time out on a silent connection); what arrived is kept for the
/// next pull.
const STALL: Duration = Duration::from_secs(60);

/// An error with its causes, `a: b: c`, for messages shown to users.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Refuses to go on when the store's file system has less than `needed` bytes free (`what`
/// says what needs them).
fn room_for(store: &Store, what: impl FnOnce() -> String, needed: u64) -> Result<(), PullError> {
    match store.free_space() {
        Some(free) if free < needed => Err(PullError::NoSpace {
            what: what(),
            dir: store.root().to_owned(),
            needed,
            free,
        }),
        _ => Ok(()),
    }
}

/// Removes a download leftover; one already gone is fine.
fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a download leftover");
        }
    }
}

/// Pulls `spec` into `store` and records it under `spec.name()`, reporting progress through
/// `progress`. Returns the new store entry. See the module docs for what is guaranteed when
/// it fails.
pub async fn pull(
    store: &Store,
    spec: &PullSpec,
    hub: &HubConfig,
    progress: impl FnMut(PullEvent) + Send,
) -> Result<StoredModel, PullError> {
    spec.check()?;
    match spec.source() {
        Source::Hub(file) => hub::pull(store, spec, file, hub, progress).await,
        Source::Registry => registry::pull(store, spec, hub, progress).await,
    }
}
