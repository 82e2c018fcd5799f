//! Download progress: hf-hub reports bytes from its chunk tasks into shared counters, and the
//! pull reads them on a timer, so the caller's callback runs on the pull's own task, at most
//! every [`TICK`], however fast the bytes come.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often progress is reported.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// Counters shared with hf-hub's download tasks.
#[derive(Clone, Default)]
pub(crate) struct Counter(Arc<Shared>);

#[derive(Default)]
struct Shared {
    total: AtomicU64,
    completed: AtomicU64,
    /// Set once hf-hub has opened its partial file and reported where it resumes from: a
    /// failure after that point is an interruption that the next pull resumes, not a failure
    /// to reach the hub.
    started: AtomicBool,
}

impl Counter {
    /// `(total, completed)` so far.
    pub(crate) fn get(&self) -> (u64, u64) {
        (
            self.0.total.load(Ordering::Relaxed),
            self.0.completed.load(Ordering::Relaxed),
        )
    }

    /// Whether the download itself had begun.
    pub(crate) fn started(&self) -> bool {
        self.0.started.load(Ordering::Relaxed)
    }
}

impl hf_hub::api::tokio::Progress for Counter {
    async fn init(&mut self, size: usize, _filename: &str) {
        self.0.total.store(size as u64, Ordering::Relaxed);
    }

    /// hf-hub's first call, right after it opened its partial file, reports the bytes it
    /// resumes from; only from then on is a reading worth showing.
    async fn update(&mut self, size: usize) {
        self.0.completed.fetch_add(size as u64, Ordering::Relaxed);
        self.0.started.store(true, Ordering::Relaxed);
    }

    async fn finish(&mut self) {}
}

/// Decides which readings are worth reporting: a change since the last report.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last: Option<(u64, u64)>,
}

impl Throttle {
    /// The reading to report now, if it differs from the last one reported.
    pub(crate) fn next(&mut self, reading: (u64, u64)) -> Option<(u64, u64)> {
        (self.last != Some(reading)).then(|| {
            self.last = Some(reading);
            reading
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_readings_are_reported() {
        let mut t = Throttle::default();
        assert_eq!(t.next((10, 0)), Some((10, 0)));
        assert_eq!(t.next((10, 0)), None);
        assert_eq!(t.next((10, 5)), Some((10, 5)));
    }
}
