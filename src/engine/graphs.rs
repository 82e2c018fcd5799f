//! The one thread that runs llama.cpp's decode for every model in the process.
//!
//! llama.cpp's CPU backend, built with OpenMP as llama.cpp's own builds are, runs each graph on
//! a team of OpenMP threads, and libgomp gives every thread that starts a parallel region a
//! pool of its own. With the decode called from each model's engine thread, two loaded models
//! made two pools: on the project's 2-core machine, 2 threads each, 4 threads for 2 cores.
//! libgomp then counts more threads than cores and cuts the spin at every barrier from 300,000
//! rounds to 100 (`gomp_throttled_spin_count_var` in its `wait.h`), so its threads sleep and
//! are woken at each of the hundreds of barriers a token takes. SmolLM2 streamed 36 tokens a
//! second instead of 100 whenever a second model was loaded, even one sitting idle.
//!
//! Every decode therefore runs on this one thread, which keeps one pool whatever the number of
//! models; models busy at the same time take turns, in arrival order, instead of spinning
//! against each other for the same cores. The engine threads keep everything else (batches,
//! sampling, streams). A rayon pool of one thread does the hand-over: `install` runs a
//! borrowing closure there and blocks the caller until it returns, so nothing is hand-rolled
//! beyond the `Send` promise below.
//!
//! Work nobody waits for (reading an answer again while idle) runs only once every model has
//! been quiet for a while ([`quiet_for`]): taking turns with another model's stream, each of
//! its chunks would stretch that stream's gap between tokens (on the 2-core machine, Gemma's
//! 20 ms gaps grew to 70 ms while SmolLM2 read an answer again).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::DecodeError;

/// The thread's name; llama.cpp's OpenMP threads inherit it.
const THREAD_NAME: &str = "llama-graphs";

fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| THREAD_NAME.to_owned())
            // The thread is started by whichever engine thread decodes first; it (and the
            // OpenMP threads it starts) belong in the normal scheduling class either way.
            .start_handler(|_| crate::sched::foreground())
            .build()
            .map_err(
                |e| tracing::warn!(error = %e, "no graph thread: each model decodes on its own"),
            )
            .ok()
    })
    .as_ref()
}

/// Decodes someone waits for (a request's step, an embedding, a load's warm-up) now running.
static FOREGROUND_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// When the last of them ended, in nanoseconds since [`epoch`]; 0 before the first.
static FOREGROUND_ENDED: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// How long no model in the process has decoded for anyone: zero while such a decode runs.
/// A model does work nobody waits for only after a while of this, so that it never takes
/// turns with a stream and only a request that comes meanwhile waits, at most for one call.
pub(crate) fn quiet_for() -> Duration {
    if FOREGROUND_RUNNING.load(Ordering::Acquire) > 0 {
        return Duration::ZERO;
    }
    let ended = Duration::from_nanos(FOREGROUND_ENDED.load(Ordering::Acquire));
    epoch().elapsed().saturating_sub(ended)
}

/// Counts a foreground decode as running for as long as it lives.
struct Foreground;

impl Foreground {
    fn start() -> Foreground {
        epoch();
        FOREGROUND_RUNNING.fetch_add(1, Ordering::AcqRel);
        Foreground
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        let now = u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX);
        FOREGROUND_ENDED.fetch_max(now, Ordering::AcqRel);
        FOREGROUND_RUNNING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `ctx.decode(batch)`, on the graph thread.
pub(crate) fn decode(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
) -> Result<(), DecodeError> {
    decode_timed(ctx, batch).0
}

/// [`decode`], and how long the decode itself took: without the wait for another model's
/// turn, which says nothing about this model's step cost.
pub(crate) fn decode_timed(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
) -> (Result<(), DecodeError>, Duration) {
    let _running = Foreground::start();
    decode_in_background(ctx, batch)
}

/// [`decode_timed`] for work nobody waits for: it does not count against [`quiet_for`].
pub(crate) fn decode_in_background(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
) -> (Result<(), DecodeError>, Duration) {
    let call = Call { ctx, batch };
    match pool() {
        Some(pool) => pool.install(move || call.run()),
        None => call.run(),
    }
}

/// One decode's borrowed context and batch, lent to the graph thread.
struct Call<'a, 'c, 'b> {
    ctx: &'a mut LlamaContext<'c>,
    batch: &'a mut LlamaBatch<'b>,
}

// SAFETY: llama.cpp's contexts and batches are plain memory owned by whoever holds them, not
// tied to the thread that made them (GPU backends select their device on every call). The
// borrows are exclusive, and `install` blocks the lending thread until the call has returned,
// so only one thread touches them at any time.
unsafe impl Send for Call<'_, '_, '_> {}

impl Call<'_, '_, '_> {
    // A method taking `self` makes the closure capture the whole `Call` (a closure naming its
    // fields would capture the two non-`Send` borrows on their own).
    fn run(self) -> (Result<(), DecodeError>, Duration) {
        let started = Instant::now();
        let result = self.ctx.decode(self.batch);
        // A GPU backend returns once the work is queued: waiting for it here makes the time
        // the step's own (the pace's measure of a step; on an H200, 0.15 ms queued against
        // 1.6 ms done for four sequences), and this decode the last to hold the graph thread
        // until it is done. On a CPU the work is already done and this returns at once.
        self.ctx.synchronize();
        (result, started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The only test in this binary that makes foreground decodes, so the counts are its own.
    #[test]
    fn the_process_is_quiet_only_once_no_foreground_decode_has_run_for_a_while() {
        drop(Foreground::start());
        let quiet = Duration::from_millis(200);
        std::thread::sleep(quiet);
        assert!(quiet_for() >= quiet, "{:?}", quiet_for());
        let running = Foreground::start();
        assert_eq!(quiet_for(), Duration::ZERO, "a decode is running");
        let another = Foreground::start();
        drop(running);
        assert_eq!(quiet_for(), Duration::ZERO, "one still runs");
        drop(another);
        assert!(quiet_for() < quiet, "from the last end: {:?}", quiet_for());
    }
}
