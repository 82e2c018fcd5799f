//! A GGUF that llama.cpp loads but cannot compute. llama.cpp checks a file's shapes, not
//! whether its kernels take each tensor's type, and its CPU kernels abort the process
//! (`GGML_ABORT`) on a type they lack, at the first decode: a norm in F16 or I32 instead of
//! F32 (`binary_op: unsupported types`), an F16 expert bias. One such file, pulled or
//! created by a client, would take `backstop serve` down with every other model it serves.
//!
//! So a file with tensors that llama.cpp's own tools always write as F32 in another type
//! ([`GgufHeader::odd_tensors`], read from the header at no cost) is first loaded and run in a
//! child process (`backstop probe-compute FILE`, hidden): a few prompt rows and one decode
//! step, as the model will be run (its GPU layers too). The model is loaded here only if the
//! child computed them; if llama.cpp aborted there, the load fails with its reason and the
//! server goes on. Files from llama.cpp's converters and quantizer have no such tensors and
//! pay nothing (both test models among them). A file odd in a way the header check does not
//! see can still abort the process: the check mirrors one family of llama.cpp's type rules,
//! the one files met in practice (a converter that wrote vectors in F16) break.
//!
//! [`GgufHeader::odd_tensors`]: crate::models::gguf::GgufHeader::odd_tensors

use std::ffi::{c_char, CStr};
use std::io::Read;
use std::num::NonZeroU32;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;

use super::LoadError;
use crate::models::gguf::{GgufHeader, OddTensor};
use crate::models::ModelCheck;

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "probe-compute";

/// What the child prints once every row is computed.
const COMPUTED: &str = "probe: computed";

/// What the child prints before llama.cpp aborts it, followed by llama.cpp's message.
const ABORTED: &str = "probe: llama.cpp aborted: ";

/// How long the child may take: loading a large model from a cold disk is most of it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(600);

/// Odd tensors named in an error; the rest are counted.
const NAMED: usize = 4;

/// Runs the probe when the file has `odd` tensors (its header's [`GgufHeader::odd_tensors`]);
/// `Err` when llama.cpp cannot compute the model. Anything that stops the probe itself (the
/// child cannot start or fails to load the file) lets the load go on, to fail or succeed on
/// its own.
///
/// [`GgufHeader::odd_tensors`]: crate::models::gguf::GgufHeader::odd_tensors
pub(crate) fn check(
    name: &str,
    path: &Path,
    gpu_layers: Option<u32>,
    odd: &[OddTensor],
) -> Result<(), LoadError> {
    if odd.is_empty() {
        return Ok(());
    }
    let odd = describe(odd);
    tracing::info!(model = %name, tensors = %odd, "running the model once in a child process first: tensors llama.cpp's tools keep in F32 are not");
    let started = Instant::now();
    match run_child(path, gpu_layers) {
        Outcome::Computed => {
            tracing::info!(model = %name, ms = started.elapsed().as_millis() as u64, "probe computed the model");
            Ok(())
        }
        Outcome::Aborted(reason) => Err(LoadError::Uncomputable {
            path: path.to_owned(),
            reason,
            tensors: odd,
        }),
        Outcome::Inconclusive(why) => {
            tracing::warn!(model = %name, why = %why, "could not probe the model; loading it anyway");
            Ok(())
        }
    }
}

/// [`check`] for a file known by its path alone (`backstop bench`, the model store), named
/// in the log by its file name.
pub(crate) fn check_file(
    path: &Path,
    gpu_layers: Option<u32>,
    odd: &[OddTensor],
) -> Result<(), LoadError> {
    let name = path
        .file_name()
        .map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy());
    check(&name, path, gpu_layers, odd)
}

/// [`check`] as the model store asks it of a file before recording a model with it (a
/// create or a pull), with the layers the server would put on the GPU: so a file that would
/// fail at its first load is refused at once, with the same reason.
pub fn store_check(gpu_layers: Option<u32>) -> ModelCheck {
    Arc::new(move |path: &Path, header: &GgufHeader| {
        check_file(path, gpu_layers, &header.odd_tensors).map_err(|e| e.to_string())
    })
}

/// How a probe ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Every row computed.
    Computed,
    /// llama.cpp aborted the child, for this reason.
    Aborted(String),
    /// The probe said nothing either way (the child could not start or load the file).
    Inconclusive(String),
}

fn run_child(path: &Path, gpu_layers: Option<u32>) -> Outcome {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return Outcome::Inconclusive(format!("no path to this program: {e}")),
    };
    let mut cmd = Command::new(exe);
    cmd.arg(SUBCOMMAND);
    if let Some(n) = gpu_layers {
        cmd.arg("--gpu-layers").arg(n.to_string());
    }
    cmd.arg(path)
        .env("BACKSTOP_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Inconclusive(format!("cannot start the probe: {e}")),
    };
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Outcome::Inconclusive(format!(
                    "the probe ran past {} s",
                    PROBE_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Outcome::Inconclusive(format!("cannot wait for the probe: {e}")),
        }
    };
    let text =
        |pipe: Option<JoinHandle<String>>| pipe.and_then(|h| h.join().ok()).unwrap_or_default();
    judge(status.success(), &text(out), &text(err))
}

/// Reads a pipe to its end on a thread of its own, so a chatty child never blocks on a full
/// pipe while the parent waits for it to exit. A read error keeps what came before it, which
/// is all the probe needs.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Reads a finished child's output.
fn judge(success: bool, stdout: &str, stderr: &str) -> Outcome {
    if let Some(reason) = stderr.lines().find_map(|l| l.split_once(ABORTED)) {
        return Outcome::Aborted(strip_source(reason.1.trim()).to_owned());
    }
    if success && stdout.lines().any(|l| l.trim() == COMPUTED) {
        return Outcome::Computed;
    }
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
    Outcome::Inconclusive(
        last.unwrap_or("the probe ended without a word")
            .trim()
            .to_owned(),
    )
}

/// `ggml/src/ggml-cpu/binary-ops.cpp:135: binary_op: ...` → `binary_op: ...`: the source
/// position means nothing to whoever reads the error.
fn strip_source(message: &str) -> &str {
    message
        .split_once(": ")
        .filter(|(at, _)| {
            at.rsplit_once(':')
                .is_some_and(|(file, line)| file.contains('.') && line.parse::<u32>().is_ok())
        })
        .map_or(message, |(_, rest)| rest)
}

/// `blk.0.attn_norm.weight (f16), ... and 58 more`.
fn describe(odd: &[OddTensor]) -> String {
    let mut text = odd
        .iter()
        .take(NAMED)
        .map(|t| format!("{} ({})", t.name, type_name(t.ggml_type)))
        .collect::<Vec<_>>()
        .join(", ");
    if odd.len() > NAMED {
        text.push_str(&format!(" and {} more", odd.len() - NAMED));
    }
    text
}

/// ggml's name for an element type (`f16`, `q4_K`, ...).
pub(crate) fn type_name(ggml_type: u32) -> String {
    // SAFETY: ggml_type_name returns a pointer to a static string, or null for a number it
    // does not know (checked before it is read).
    let name = unsafe { llama_cpp_sys_2::ggml_type_name(ggml_type as llama_cpp_sys_2::ggml_type) };
    if name.is_null() {
        return format!("type {ggml_type}");
    }
    // SAFETY: non-null, NUL-terminated and static, per above.
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

/// Prints llama.cpp's reason where the parent looks for it; ggml aborts the process as
/// this returns (and prints no backtrace, which would only be noise here).
unsafe extern "C" fn say_abort(message: *const c_char) {
    if message.is_null() {
        eprintln!("{ABORTED}(no message)");
        return;
    }
    // SAFETY: ggml passes its NUL-terminated message buffer, alive during the call.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    eprintln!("{ABORTED}{text}");
}

/// The child: loads the file with `gpu_layers` as the server would, computes a few prompt
/// rows in one call and one more row alone (the batched and the one-row kernels), and says
/// so. Exit code 0 when computed; 3 when llama.cpp would not load it (the parent's own
/// load then says why). An abort kills it by SIGABRT after [`say_abort`].
pub fn run(path: &Path, gpu_layers: Option<u32>) -> u8 {
    // An abort is an answer here, not a crash to debug: no core file of a model's size.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct it is given; failing leaves the limit as it was.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) } != 0 {
        tracing::debug!("core files stay on for the probe");
    }
    // SAFETY: sets a process-wide function pointer before any llama.cpp work starts.
    unsafe { llama_cpp_sys_2::ggml_set_abort_callback(Some(say_abort)) };
    let Ok(backend) = super::loader::backend() else {
        return 3;
    };
    let mut params = LlamaModelParams::default();
    if let Some(n) = gpu_layers {
        params = params.with_n_gpu_layers(n);
    }
    let Ok(model) = LlamaModel::load_from_file(backend, path, &params) else {
        return 3;
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(64))
        .with_n_batch(8)
        .with_n_ubatch(8)
        .with_n_seq_max(1)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let Ok(mut ctx) = model.new_context(backend, ctx_params) else {
        return 3;
    };
    let vocab = model.vocab();
    let token = if vocab.should_add_bos() {
        vocab.bos()
    } else {
        vocab.eos()
    };
    let rows = [(0..4, 4), (4..5, 1)];
    for (positions, n) in rows {
        let mut batch = LlamaBatch::new(n, 1);
        for pos in positions.clone() {
            if batch
                .add(token, pos, &[0], pos + 1 == positions.end)
                .is_err()
            {
                return 3;
            }
        }
        if ctx.decode(&mut batch).is_err() {
            return 3;
        }
    }
    println!("{COMPUTED}");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_is_told_apart_from_a_probe_that_could_not_run() {
        let aborted = format!(
            "noise\n{ABORTED}/src/ggml/src/ggml-cpu/binary-ops.cpp:135: binary_op: unsupported types: dst: f32, src0: f32, src1: i32\n"
        );
        assert_eq!(
            judge(false, "", &aborted),
            Outcome::Aborted("binary_op: unsupported types: dst: f32, src0: f32, src1: i32".into())
        );
        assert_eq!(judge(true, &format!("{COMPUTED}\n"), ""), Outcome::Computed);
        // Exit 0 without the word is not a pass (another program behind current_exe).
        assert!(matches!(
            judge(true, "usage: ...", ""),
            Outcome::Inconclusive(_)
        ));
        assert_eq!(
            judge(false, "", "error: unrecognized subcommand\n\n"),
            Outcome::Inconclusive("error: unrecognized subcommand".into())
        );
    }

    #[test]
    fn a_source_position_is_dropped_and_nothing_else() {
        assert_eq!(strip_source("a/b.cpp:12: binary_op: bad"), "binary_op: bad");
        assert_eq!(
            strip_source("binary_op: bad: worse"),
            "binary_op: bad: worse"
        );
        assert_eq!(
            strip_source("GGML_ASSERT(x) failed"),
            "GGML_ASSERT(x) failed"
        );
    }

    #[test]
    fn odd_tensors_are_named_then_counted() {
        let odd: Vec<OddTensor> = (0..6)
            .map(|i| OddTensor {
                name: format!("blk.{i}.attn_norm.weight"),
                ggml_type: 1,
            })
            .collect();
        assert_eq!(
            describe(&odd),
            "blk.0.attn_norm.weight (f16), blk.1.attn_norm.weight (f16), \
             blk.2.attn_norm.weight (f16), blk.3.attn_norm.weight (f16) and 2 more"
        );
    }
}
