//! Pulling from an Ollama registry: `GET /v2/<ns>/<model>/manifests/<tag>`, then every layer
//! and the config from `GET /v2/<ns>/<model>/blobs/<digest>` (the registry redirects to a CDN).
//! The store is Ollama's own layout, so the manifest is written exactly as received and the
//! layers keep their digests: what backstop pulls, Ollama reads, and the reverse.
//!
//! Each layer downloads to `blobs/sha256-<hex>-partial` (the name Ollama gives its own partial
//! files), appending with a `Range` request when a partial file is already there, and is
//! renamed to `blobs/sha256-<hex>` only once it hashes to its digest.

use std::path::{Path, PathBuf};
use std::time::Instant;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::hub::HubConfig;
use super::progress::TICK;
use super::{chain, remove_quietly, room_for, PullError, PullEvent, PullSpec, STALL};
use crate::models::gguf;
use crate::models::name::{ModelName, DEFAULT_HOST};
use crate::models::store::{media, Digest, Manifest, Store, StoreError, StoredModel};

/// Largest manifest accepted (real ones are under 2 KB).
const MANIFEST_LIMIT: usize = 4 << 20;

/// The manifest format Ollama's registry serves (and Ollama's client asks for).
const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// One blob the manifest names.
struct Blob {
    digest: Digest,
    size: u64,
}

/// A manifest as received, and what it names.
struct Received {
    /// The bytes, written to the store unchanged.
    bytes: Vec<u8>,
    /// Every layer and the config.
    blobs: Vec<Blob>,
    /// The GGUF layer.
    model: Digest,
}

/// Pulls a model by name from its registry (see the module docs).
pub(super) async fn pull(
    store: &Store,
    spec: &PullSpec,
    hub: &HubConfig,
    mut on: impl FnMut(PullEvent) + Send,
) -> Result<StoredModel, PullError> {
    let name = spec.name();
    on(PullEvent::Status("pulling manifest".into()));
    if hub.offline {
        return match store.get(name)? {
            Some(m) => {
                on(PullEvent::Status("success".into()));
                Ok(m)
            }
            None => Err(PullError::Offline {
                name: name.to_string(),
            }),
        };
    }
    let remote = Remote::new(name, hub)?;
    let received = remote.manifest().await?;
    // Download everything first (resumable), then verify: a broken connection never costs a
    // layer that already arrived.
    let to_come: u64 = received
        .blobs
        .iter()
        .filter(|b| !store.has_blob(&b.digest))
        .map(|b| {
            let have = store
                .partial_path(b.digest.hex())
                .ok()
                .and_then(|p| std::fs::metadata(p).ok())
                .map_or(0, |m| m.len());
            b.size.saturating_sub(have)
        })
        .fold(0, u64::saturating_add);
    room_for(store, || format!("downloading {name}"), to_come)?;
    let mut pending: Vec<(Digest, PathBuf)> = Vec::new();
    for blob in &received.blobs {
        if store.has_blob(&blob.digest) || pending.iter().any(|(d, _)| *d == blob.digest) {
            on(PullEvent::Progress {
                digest: blob.digest.to_string(),
                total: blob.size,
                completed: blob.size,
            });
            continue;
        }
        let temp = store.partial_path(blob.digest.hex())?;
        if let Err(e) = remote.blob(blob, &temp, &mut on).await {
            if !matches!(e, PullError::Interrupted { .. }) {
                remove_quietly(&temp);
                remove_all(store, &pending, &[]);
            }
            return Err(e);
        }
        pending.push((blob.digest.clone(), temp));
    }
    on(PullEvent::Status("verifying sha256 digest".into()));
    let imported = match verify(store, &pending, &received.model).await {
        Ok(imported) => imported,
        Err((e, imported)) => {
            remove_all(store, &pending, &imported);
            return Err(e);
        }
    };
    on(PullEvent::Status("writing manifest".into()));
    if let Err(e) = store.import_manifest(name, &received.bytes) {
        remove_all(store, &[], &imported);
        return Err(e.into());
    }
    let model = store
        .get(name)?
        .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
    on(PullEvent::Status("success".into()));
    Ok(model)
}

/// Hashes and imports each downloaded blob off the runtime, then checks the model layer is a
/// GGUF the store's check accepts. On failure, returns the blobs imported so far with the
/// error so they can be removed.
async fn verify(
    store: &Store,
    pending: &[(Digest, PathBuf)],
    model: &Digest,
) -> Result<Vec<Digest>, (PullError, Vec<Digest>)> {
    let (s, p, m) = (store.clone(), pending.to_vec(), model.clone());
    let joined = tokio::task::spawn_blocking(move || {
        let mut imported = Vec::new();
        for (digest, temp) in &p {
            match s.import_blob(temp, Some(digest)) {
                Ok(_) => imported.push(digest.clone()),
                Err(StoreError::DigestMismatch { expected, actual }) => {
                    let e = PullError::Sha256Mismatch {
                        file: expected.to_string(),
                        expected,
                        actual,
                    };
                    return Err((e, imported));
                }
                Err(e) => return Err((e.into(), imported)),
            }
        }
        let path = s.blob_path(&m);
        let file = m.to_string();
        let refused = match gguf::read(&path) {
            Err(e) => PullError::NotGguf {
                file,
                reason: e.to_string(),
            },
            Ok(header) => match s.check_model(&path, &header) {
                Ok(()) => return Ok(imported),
                Err(e) => PullError::Unusable {
                    file,
                    reason: e.to_string(),
                },
            },
        };
        Err((refused, imported))
    })
    .await;
    joined.unwrap_or_else(|e| {
        Err((
            PullError::Internal(format!("hashing task failed: {e}")),
            Vec::new(),
        ))
    })
}

/// Removes this pull's partial files and the blobs it imported: a failed pull leaves nothing.
fn remove_all(store: &Store, pending: &[(Digest, PathBuf)], imported: &[Digest]) {
    for (_, temp) in pending {
        remove_quietly(temp);
    }
    for digest in imported {
        remove_quietly(&store.blob_path(digest));
    }
}

/// One model in one registry.
struct Remote {
    client: reqwest::Client,
    /// `https://registry.ollama.ai/v2/library/llama3.2`.
    base: String,
    registry: String,
    name: ModelName,
}

impl Remote {
    fn new(name: &ModelName, hub: &HubConfig) -> Result<Remote, PullError> {
        let [host, namespace, model] = name.parts();
        // The default host is the configurable registry; any other is the name's own host.
        let registry = if host == DEFAULT_HOST {
            hub.registry.clone()
        } else {
            format!("https://{host}")
        };
        let client = reqwest::Client::builder()
            .user_agent(concat!("backstop/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(STALL)
            .build()
            .map_err(|e| PullError::Network {
                endpoint: registry.clone(),
                message: chain(&e),
            })?;
        Ok(Remote {
            client,
            base: format!("{registry}/v2/{namespace}/{model}"),
            registry,
            name: name.clone(),
        })
    }

    fn network(&self, message: String) -> PullError {
        PullError::Network {
            endpoint: self.registry.clone(),
            message,
        }
    }

    fn refused(&self, status: u16) -> PullError {
        match status {
            401 | 403 => PullError::RegistryRefused {
                name: self.name.to_string(),
                status,
            },
            _ => self.network(format!("the registry answered HTTP {status}")),
        }
    }

    fn bad_manifest(&self, reason: impl Into<String>) -> PullError {
        PullError::BadManifest {
            name: self.name.to_string(),
            reason: reason.into(),
        }
    }

    /// Fetches and checks the manifest: every digest well formed, exactly one GGUF layer.
    async fn manifest(&self) -> Result<Received, PullError> {
        let url = format!("{}/manifests/{}", self.base, self.name.tag());
        let request = self.client.get(&url).header("accept", ACCEPT).send();
        let response = tokio::time::timeout(STALL, request)
            .await
            .map_err(|_| self.network(format!("no answer within {} s", STALL.as_secs())))?
            .map_err(|e| self.network(chain(&e)))?;
        match response.status().as_u16() {
            200 => {}
            404 => {
                return Err(PullError::ModelNotFound {
                    name: self.name.to_string(),
                    registry: self.registry.clone(),
                })
            }
            s => return Err(self.refused(s)),
        }
        if response
            .content_length()
            .is_some_and(|n| n > MANIFEST_LIMIT as u64)
        {
            return Err(self.bad_manifest("larger than 4 MB"));
        }
        let promised = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let bytes = tokio::time::timeout(STALL, response.bytes())
            .await
            .map_err(|_| self.network(format!("no data for {} s", STALL.as_secs())))?
            .map_err(|e| self.network(chain(&e)))?
            .to_vec();
        if bytes.len() > MANIFEST_LIMIT {
            return Err(self.bad_manifest("larger than 4 MB"));
        }
        if let Some(expected) = promised {
            let actual = Digest::of(&bytes);
            if actual != expected {
                return Err(PullError::Sha256Mismatch {
                    file: format!("the manifest of {}", self.name),
                    expected,
                    actual,
                });
            }
        }
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| self.bad_manifest(e.to_string()))?;
        let mut blobs = Vec::with_capacity(manifest.layers.len() + 1);
        let mut models = Vec::new();
        for layer in manifest
            .layers
            .iter()
            .chain(std::iter::once(&manifest.config))
        {
            let digest = Digest::parse(&layer.digest)
                .map_err(|_| self.bad_manifest(format!("bad digest `{}`", layer.digest)))?;
            if layer.media_type == media::MODEL {
                models.push(digest.clone());
            }
            blobs.push(Blob {
                digest,
                size: layer.size,
            });
        }
        let [model] = models.as_slice() else {
            return Err(self.bad_manifest(format!(
                "expected one GGUF layer ({}), found {}",
                media::MODEL,
                models.len()
            )));
        };
        Ok(Received {
            model: model.clone(),
            bytes,
            blobs,
        })
    }

    /// Downloads one blob into `temp`, continuing a partial file with a `Range` request.
    /// Verification is the caller's; this only makes sure exactly `size` bytes arrived.
    async fn blob(
        &self,
        blob: &Blob,
        temp: &Path,
        on: &mut (impl FnMut(PullEvent) + Send),
    ) -> Result<(), PullError> {
        let label = blob.digest.to_string();
        let io = |source| PullError::Io {
            path: temp.to_owned(),
            source,
        };
        let interrupted = |message: String| PullError::Interrupted {
            repo: self.name.to_string(),
            file: label.clone(),
            message,
        };
        let mut have = tokio::fs::metadata(temp).await.map_or(0, |m| m.len());
        if have > blob.size {
            have = 0;
        }
        if have < blob.size {
            let mut request = self
                .client
                .get(format!("{}/blobs/{}", self.base, blob.digest));
            if have > 0 {
                request = request.header("range", format!("bytes={have}-"));
            }
            let response = tokio::time::timeout(STALL, request.send())
                .await
                .map_err(|_| self.network(format!("no answer within {} s", STALL.as_secs())))?
                .map_err(|e| self.network(chain(&e)))?;
            let resumed = match response.status().as_u16() {
                206 if range_start(&response) == Some(have) => true,
                // The server ignored the range, or there was nothing to resume: start over.
                200 => false,
                404 => return Err(self.bad_manifest(format!("the registry has no blob {label}"))),
                s => return Err(self.refused(s)),
            };
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(resumed)
                .truncate(!resumed)
                .open(temp)
                .await
                .map_err(io)?;
            have = if resumed { have } else { 0 };
            let mut stream = response.bytes_stream();
            let mut last_report = Instant::now();
            on(PullEvent::Progress {
                digest: label.clone(),
                total: blob.size,
                completed: have,
            });
            loop {
                let next = tokio::time::timeout(STALL, stream.next())
                    .await
                    .map_err(|_| interrupted(format!("no data for {} s", STALL.as_secs())))?;
                let chunk = match next {
                    None => break,
                    Some(Ok(chunk)) => chunk,
                    Some(Err(e)) => {
                        file.flush().await.map_err(io)?;
                        return Err(interrupted(chain(&e)));
                    }
                };
                if have + chunk.len() as u64 > blob.size {
                    drop(file);
                    remove_quietly(temp);
                    return Err(PullError::TooLong {
                        file: label,
                        expected: blob.size,
                    });
                }
                file.write_all(&chunk).await.map_err(io)?;
                have += chunk.len() as u64;
                if last_report.elapsed() >= TICK {
                    last_report = Instant::now();
                    on(PullEvent::Progress {
                        digest: label.clone(),
                        total: blob.size,
                        completed: have,
                    });
                }
            }
            file.flush().await.map_err(io)?;
            file.sync_all().await.map_err(io)?;
            if have < blob.size {
                return Err(interrupted(format!(
                    "the connection closed after {have} of {} bytes",
                    blob.size
                )));
            }
        }
        on(PullEvent::Progress {
            digest: label,
            total: blob.size,
            completed: blob.size,
        });
        Ok(())
    }
}

/// The first byte of a `Content-Range: bytes a-b/len` answer.
fn range_start(response: &reqwest::Response) -> Option<u64> {
    let value = response.headers().get("content-range")?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}
