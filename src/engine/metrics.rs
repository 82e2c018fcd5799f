//! The engine's own figures, registered once per model so the decode loop only bumps
//! atomics. Exported by the `/metrics` endpoint.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

/// Handles for one model's metrics.
pub(crate) struct EngineMetrics {
    /// `llama_decode` calls.
    pub(crate) steps: Counter,
    /// Sequences evaluated per decode call: the proof of continuous batching.
    pub(crate) batch_sequences: Histogram,
    /// Steps whose generating sequences decoded in two calls, split by depth
    /// ([`crate::engine::depths`]).
    pub(crate) split_steps: Counter,
    /// Prompt tokens evaluated (reused prefix tokens are not counted).
    pub(crate) prompt_tokens: Counter,
    /// Tokens generated.
    pub(crate) completion_tokens: Counter,
    /// Slots with a request.
    pub(crate) busy_slots: Gauge,
    /// Requests waiting for a slot.
    pub(crate) queue_depth: Gauge,
    /// Requests whose client went away before the end.
    pub(crate) cancelled: Counter,
    /// Decode calls that failed.
    pub(crate) decode_errors: Counter,
    /// From submission to the first generated token, in seconds.
    pub(crate) time_to_first_token: Histogram,
    /// Each answer's decode speed, tokens per second of one stream.
    pub(crate) decode_rate: Histogram,
    /// Tokens drafted by prompt lookup and checked in a decode (`--speculate`).
    pub(crate) draft_tokens: Counter,
    /// Drafted tokens the answer took: each saved a decode step.
    pub(crate) draft_accepted: Counter,
    /// Answer tokens read again while idle, for the next turn to reuse (not in `steps` or
    /// `prompt_tokens`).
    pub(crate) reread_tokens: Counter,
    /// Bytes of the model's conversations kept in host memory (`--cache-ram`): see
    /// [`Charge`].
    pub(crate) cache_ram_bytes: Gauge,
    /// Bytes of the model's conversations kept in the cache folder (`--cache-dir`), read
    /// back at start or written as the process stops: see [`Charge`].
    pub(crate) cache_file_bytes: Gauge,
    /// Conversations a slot gave up that were copied into host memory.
    pub(crate) cache_ram_saves: Counter,
    /// Tokens whose KV rows were copied back from host memory instead of read again.
    pub(crate) cache_ram_restored_tokens: Counter,
}

impl EngineMetrics {
    /// Registers the metrics under the model's name.
    pub(crate) fn new(model: &str, slots: u32) -> Self {
        let labels = [("model", model.to_owned())];
        let labels = &labels[..];
        gauge!("backstop_slots", labels).set(f64::from(slots));
        Self {
            steps: counter!("backstop_decode_steps_total", labels),
            batch_sequences: histogram!("backstop_decode_batch_sequences", labels),
            split_steps: counter!("backstop_decode_split_steps_total", labels),
            prompt_tokens: counter!("backstop_prompt_tokens_evaluated_total", labels),
            completion_tokens: counter!("backstop_completion_tokens_total", labels),
            busy_slots: gauge!("backstop_slots_busy", labels),
            queue_depth: gauge!("backstop_queue_depth", labels),
            cancelled: counter!("backstop_requests_cancelled_total", labels),
            decode_errors: counter!("backstop_decode_errors_total", labels),
            time_to_first_token: histogram!("backstop_time_to_first_token_seconds", labels),
            decode_rate: histogram!("backstop_decode_tokens_per_second", labels),
            draft_tokens: counter!("backstop_draft_tokens_total", labels),
            draft_accepted: counter!("backstop_draft_accepted_tokens_total", labels),
            reread_tokens: counter!("backstop_reread_tokens_total", labels),
            cache_ram_bytes: gauge!("backstop_prompt_cache_bytes", labels),
            cache_file_bytes: gauge!("backstop_prompt_cache_file_bytes", labels),
            cache_ram_saves: counter!("backstop_prompt_cache_saves_total", labels),
            cache_ram_restored_tokens: counter!(
                "backstop_prompt_cache_restored_tokens_total",
                labels
            ),
        }
    }
}

/// Counts an entry's bytes in a gauge for as long as the entry lives: the conversations kept
/// in host memory are one stash for every model, and another model's worker may drop this
/// model's to make room, so the count goes down wherever the entry is dropped.
pub(crate) struct Charge {
    gauge: Gauge,
    bytes: f64,
}

impl Charge {
    pub(crate) fn new(gauge: &Gauge, bytes: usize) -> Self {
        let bytes = bytes as f64;
        gauge.increment(bytes);
        Self {
            gauge: gauge.clone(),
            bytes,
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.gauge.decrement(self.bytes);
    }
}
