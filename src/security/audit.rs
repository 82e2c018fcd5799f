//! The audit log: one JSON line per request (and per admin change) with who, from where,
//! what model, which backend, the prompt's sha256 and length, token counts, status and
//! duration, but never the prompt text unless `audit_prompts` says so, and never a secret.
//!
//! Records go through a bounded channel to one writer task that appends, flushes each line
//! and rotates by size, so a slow disk never blocks a request. A record that cannot be
//! queued or written is logged and counted (`backstop_audit_failures_total`), never dropped
//! silently.
//!
//! A request's record is a shared [`Ticket`]: the middleware opens it, the code that learns
//! something (the model, the backend, the token counts at the end of a stream) adds to it
//! through [`note`], and it is written when the last holder lets go (after a stream's end).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::security::AuditConfig;

/// Records waiting for the writer; beyond this, new ones are counted as lost.
const QUEUE: usize = 4096;

/// One audit line.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Record {
    pub(crate) ts: String,
    pub(crate) request_id: String,
    /// What happened, for admin changes (`contingency`, `pull`, `delete`, ...); absent for
    /// plain requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) event: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) key_id: Option<String>,
    pub(crate) client_ip: String,
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) model: Option<String>,
    /// `local` or `cloud`.
    pub(crate) backend: Option<String>,
    /// The cloud upstream, or the local model that answered.
    pub(crate) upstream: Option<String>,
    pub(crate) failover: Option<String>,
    pub(crate) prompt_sha256: Option<String>,
    pub(crate) prompt_chars: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) prompt: Option<String>,
    pub(crate) prompt_tokens: Option<u32>,
    pub(crate) completion_tokens: Option<u32>,
    pub(crate) status: u16,
    pub(crate) duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) detail: Option<String>,
}

/// Where records go.
#[derive(Debug, Clone)]
pub(crate) struct Auditor {
    tx: mpsc::Sender<Record>,
    /// Record prompt text too.
    pub(crate) prompts: bool,
}

impl Auditor {
    /// Starts the writer task for `config`.
    pub(crate) fn start(config: &AuditConfig) -> Auditor {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer_task(config.clone(), rx));
        Auditor {
            tx,
            prompts: config.prompts,
        }
    }

    /// Queues a record without waiting.
    pub(crate) fn submit(&self, record: Record) {
        if let Err(e) = self.tx.try_send(record) {
            metrics::counter!("backstop_audit_failures_total", "stage" => "queue").increment(1);
            tracing::error!(error = %e, "audit record lost: the audit writer is not keeping up");
        }
    }
}

/// What runs when a request's record is complete.
type OnDone = Box<dyn FnOnce(&Record) + Send>;

/// A request's record while the request runs. When the last holder lets go, the key's
/// token budget is charged and the record is written (when the audit log is on).
pub(crate) struct Ticket {
    record: Mutex<Record>,
    started: Instant,
    auditor: Option<Auditor>,
    on_done: Mutex<Option<OnDone>>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").finish_non_exhaustive()
    }
}

impl Ticket {
    pub(crate) fn new(record: Record, auditor: Option<Auditor>) -> Arc<Ticket> {
        Arc::new(Ticket {
            record: Mutex::new(record),
            started: Instant::now(),
            auditor,
            on_done: Mutex::new(None),
        })
    }

    /// Runs `f` with the finished record, before it is written.
    pub(crate) fn on_done(&self, f: impl FnOnce(&Record) + Send + 'static) {
        *self.on_done.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
    }

    /// Changes the record.
    pub(crate) fn update(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.record.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut record =
            std::mem::take(&mut *self.record.lock().unwrap_or_else(|p| p.into_inner()));
        record.duration_ms = self.started.elapsed().as_millis() as u64;
        if let Some(f) = self
            .on_done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            f(&record);
        }
        if let Some(a) = &self.auditor {
            a.submit(record);
        }
    }
}

tokio::task_local! {
    /// The ticket of the request this task is answering, if the audit log is on.
    static CURRENT: Arc<Ticket>;
}

/// Runs `f` (a request's handling) with `ticket` as the current ticket.
pub(crate) async fn scope<F: std::future::Future>(ticket: Arc<Ticket>, f: F) -> F::Output {
    CURRENT.scope(ticket, f).await
}

/// The current request's ticket, to keep (a stream holds it until its end).
pub(crate) fn current() -> Option<Arc<Ticket>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// Adds to the current request's record, if there is one.
pub(crate) fn note(f: impl FnOnce(&mut Record)) {
    let _none = CURRENT.try_with(|t| t.update(f));
}

/// The writer: one task, appending lines, flushing each, rotating by size.
async fn writer_task(config: AuditConfig, mut rx: mpsc::Receiver<Record>) {
    let mut file: Option<tokio::fs::File> = None;
    let mut size: u64 = 0;
    while let Some(record) = rx.recv().await {
        let mut line = match serde_json::to_vec(&record) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "audit record could not be encoded");
                continue;
            }
        };
        line.push(b'\n');
        if file.is_none() || size >= config.max_bytes {
            if file.is_some() {
                file = None;
                rotate(&config.path, config.keep).await;
            }
            match open(&config.path).await {
                Ok((f, s)) => {
                    file = Some(f);
                    size = s;
                }
                Err(e) => {
                    failed(&config.path, &e);
                    continue;
                }
            }
        }
        let Some(f) = file.as_mut() else { continue };
        let written = async {
            f.write_all(&line).await?;
            f.flush().await
        }
        .await;
        match written {
            Ok(()) => size += line.len() as u64,
            Err(e) => {
                failed(&config.path, &e);
                file = None;
            }
        }
    }
}

fn failed(path: &Path, e: &std::io::Error) {
    metrics::counter!("backstop_audit_failures_total", "stage" => "write").increment(1);
    tracing::error!(path = %path.display(), error = %e, "audit record not written");
}

async fn open(path: &Path) -> std::io::Result<(tokio::fs::File, u64)> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    let size = f.metadata().await?.len();
    Ok((f, size))
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// `audit.jsonl` → `.1`, `.1` → `.2`, …; the oldest beyond `keep` is deleted.
async fn rotate(path: &Path, keep: u32) {
    if keep == 0 {
        let _gone = tokio::fs::remove_file(path).await;
        return;
    }
    let _gone = tokio::fs::remove_file(rotated(path, keep)).await;
    for n in (1..keep).rev() {
        let _missing = tokio::fs::rename(rotated(path, n), rotated(path, n + 1)).await;
    }
    if let Err(e) = tokio::fs::rename(path, rotated(path, 1)).await {
        tracing::error!(path = %path.display(), error = %e, "audit log not rotated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_are_appended_as_json_lines_and_rotated_by_size() {
        let dir = std::env::temp_dir().join(format!("backstop-audit-{}", uuid::Uuid::new_v4()));
        let path = dir.join("audit.jsonl");
        let a = Auditor::start(&AuditConfig {
            path: path.clone(),
            prompts: false,
            max_bytes: 600,
            keep: 2,
        });
        for i in 0..12 {
            let t = Ticket::new(
                Record {
                    request_id: format!("r{i}"),
                    path: "/v1/chat/completions".into(),
                    status: 200,
                    ..Default::default()
                },
                Some(a.clone()),
            );
            scope(Arc::clone(&t), async {
                note(|r| r.model = Some("smollm2".into()))
            })
            .await;
            drop(t);
        }
        drop(a);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let current = std::fs::read_to_string(&path).unwrap();
        let first = current.lines().next().unwrap();
        let v: serde_json::Value = serde_json::from_str(first).unwrap();
        assert_eq!(v["model"], "smollm2");
        assert!(v.get("prompt").is_none(), "no prompt text unless asked");
        assert!(rotated(&path, 1).is_file() && rotated(&path, 2).is_file());
        assert!(!rotated(&path, 3).exists(), "only `keep` rotated files");
        let total: usize = [path.clone(), rotated(&path, 1), rotated(&path, 2)]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
            .sum();
        assert!((6..=12).contains(&total), "{total}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
