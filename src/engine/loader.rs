//! Loading a GGUF into llama.cpp: the process-wide backend, file checks that turn a bad file
//! into a clear error, the model, its context, and what clients may learn about it.

use std::collections::BTreeSet;
use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;

use super::{policy, ChatTemplate, EngineOptions, KvCacheType, LoadError};

/// Context per slot when none is configured: what Ollama uses, and plenty for chat.
const DEFAULT_CTX_PER_SLOT: u32 = 4096;

/// Facts about a loaded model that handlers need (names, limits, the chat template).
#[derive(Debug)]
pub struct ModelInfo {
    /// The name clients use.
    pub name: String,
    /// The GGUF file.
    pub path: PathBuf,
    /// `general.architecture`, e.g. `llama`, `gemma3`.
    pub architecture: String,
    /// Parameter count.
    pub parameters: u64,
    /// Size of the GGUF file in bytes.
    pub file_size: u64,
    /// Context length the model was trained with.
    pub context_train: u32,
    /// Context tokens each request may use (prompt plus answer).
    pub ctx_per_slot: u32,
    /// Parallel slots.
    pub slots: u32,
    /// Requests that may wait beyond the busy slots.
    pub max_queue: usize,
    /// How chat messages become a prompt.
    pub template: ChatTemplate,
    /// Fill-in-the-middle token texts, if the model has them.
    pub fim: Option<Fim>,
    /// Bytes the KV cache of all slots takes (an estimate from the model's shape).
    pub kv_bytes: u64,
    /// Length of the model's embedding vectors, so the APIs can check a requested
    /// `dimensions` before any work is done.
    pub embedding_length: u32,
    /// Most tokens one embedding input may have (see [`super::EmbedShape`]).
    pub embedding_tokens: u32,
    /// Repeating layers of the model.
    pub layers: u32,
    /// Layers offloaded to a GPU (0 without one).
    pub gpu_layers: u32,
    /// Bytes of GPU memory the model and its KV cache take (an estimate: the offloaded share
    /// of the weights, plus the KV cache when any layer is offloaded).
    pub vram_bytes: u64,
}

/// The special tokens of fill-in-the-middle prompts: `{prefix}code{suffix}code{middle}`.
#[derive(Debug, Clone)]
pub struct Fim {
    /// Comes before the text preceding the gap.
    pub prefix: String,
    /// Comes before the text following the gap.
    pub suffix: String,
    /// Asks for the gap.
    pub middle: String,
}

/// llama.cpp may be initialised once per process; every engine thread shares this.
pub(crate) fn backend() -> Result<&'static LlamaBackend, LoadError> {
    static BACKEND: OnceLock<Option<LlamaBackend>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            let numa = super::numa::chosen();
            if let Some(note) = super::numa::idle_note(numa, Path::new("/sys")) {
                tracing::warn!("{note}");
            }
            let init = match numa.strategy() {
                Some(strategy) => LlamaBackend::init_numa(strategy),
                None => LlamaBackend::init(),
            };
            match init {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::error!(error = %e, "llama.cpp backend failed to initialise");
                    None
                }
            }
        })
        .as_ref()
        .ok_or(LoadError::Thread)
}

/// Cheap checks before llama.cpp sees the file, so the common mistakes (wrong path, not a
/// GGUF, a split model's part missing) get a precise message instead of a generic load
/// failure. The model's size on disk, all its parts together, and its header where it reads
/// (as llama.cpp's load will judge the rest).
pub(crate) fn check_file(
    path: &Path,
) -> Result<(u64, Option<crate::models::GgufHeader>), LoadError> {
    let open_err = |source| LoadError::Open {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Err(LoadError::NotGguf {
            path: path.to_owned(),
        });
    }
    // A split model's other parts count in its size, and a part that is missing, or a part
    // given for the first, is said here. Any other header fault is left to llama.cpp's load,
    // whose log says what it found.
    match crate::models::gguf::read(path) {
        Ok(header) => Ok((size.saturating_add(header.parts_bytes), Some(header))),
        Err(e) if e.is_split() => Err(LoadError::Split {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
        Err(_) => Ok((size, None)),
    }
}

/// Loads the model weights, mapped or read as `options.mmap` says, and locked in RAM with
/// `options.mlock`; `parts` are a split model's other files (the header's
/// [`GgufHeader::parts`](crate::models::GgufHeader::parts)). Call [`check_file`] first.
pub(crate) fn load_model(
    backend: &LlamaBackend,
    options: &EngineOptions,
    parts: &[PathBuf],
) -> Result<LlamaModel, LoadError> {
    let locked_before = status_bytes("VmLck");
    let copies = copies_weights();
    let maps_before = if options.mlock && copies {
        std::fs::read_to_string("/proc/self/maps").ok()
    } else {
        None
    };
    // Where llama.cpp copies weights into a layout of its own as it loads (the AMX buffer's
    // conversion), it does so in an OpenMP region started by the loading thread, and libgomp
    // keeps a pool of threads for every thread that starts one. On the engine thread that pool
    // would stay for the model's life beside the graph thread's, and libgomp, counting more
    // threads than cores, would throttle the spin at every barrier of every decode
    // (graphs.rs). So the load runs on a thread of its own, whose pool ends with it.
    let load = || {
        // Made where it is used: the parameters hold raw pointers, which no thread may share.
        let mut params = LlamaModelParams::default()
            .with_use_mmap(options.mmap)
            .with_use_mlock(options.mlock);
        if let Some(n) = options.gpu_layers {
            params = params.with_n_gpu_layers(n);
        }
        LlamaModel::load_from_file(backend, &options.path, &params)
    };
    let loaded = std::thread::scope(|s| {
        match std::thread::Builder::new()
            .name("model-load".to_owned())
            .spawn_scoped(s, load)
        {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(e) => {
                tracing::debug!(error = %e, "no thread to load on: loading on the engine thread");
                load()
            }
        }
    });
    let model = loaded.map_err(|e| {
        tracing::debug!(error = %e, "llama_model_load_from_file failed");
        LoadError::Rejected {
            path: options.path.clone(),
        }
    })?;
    if let Some(crowded) =
        crate::config::cores::too_many(options.threads.max(options.threads_batch))
    {
        tracing::warn!(model = %options.name, "{crowded}");
    }
    if let Some(before) = maps_before {
        lock_copied_weights(&options.name, &before);
    }
    if options.mlock {
        // llama.cpp only logs a failed lock and goes on; said here in the server's own words.
        let locked = status_bytes("VmLck")
            .zip(locked_before)
            .map(|(after, before)| after.saturating_sub(before));
        if let Some(short) = mlock_shortfall(locked, model.size(), memlock_limit()) {
            tracing::warn!(model = %options.name, "{short}");
        }
    }
    let keep = std::env::var_os("BACKSTOP_KEEP_MAPPED_WEIGHTS").is_some_and(|v| v == "1");
    if options.mmap && !options.mlock && copies && !keep {
        let files: Vec<&Path> = std::iter::once(options.path.as_path())
            .chain(parts.iter().map(PathBuf::as_path))
            .collect();
        release_copied_weights(&options.name, &files);
    }
    Ok(model)
}

/// The CPU backend's buffer types that hold weights in a layout of their own, e.g. `AMX` on a
/// Xeon with Intel AMX, `CPU_REPACK` (llama.cpp copies the weights it can multiply faster so
/// into them as it loads); empty where llama.cpp does not say.
fn cpu_weight_layouts() -> Vec<String> {
    use llama_cpp_sys_2 as sys;
    type ExtraBufts =
        unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *mut sys::ggml_backend_buffer_type_t;
    // SAFETY: ggml's registry calls, on the CPU device it always registers; the procedure
    // asked for has the signature of ggml's `ggml_backend_dev_get_extra_bufts_t`, and returns
    // a static array ended by a null entry, each entry a buffer type with a static name.
    unsafe {
        let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
        if dev.is_null() {
            return Vec::new();
        }
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        let proc = sys::ggml_backend_reg_get_proc_address(
            reg,
            c"ggml_backend_dev_get_extra_bufts".as_ptr(),
        );
        if reg.is_null() || proc.is_null() {
            return Vec::new();
        }
        let extra_bufts = std::mem::transmute::<*mut std::ffi::c_void, ExtraBufts>(proc);
        let mut names = Vec::new();
        let mut next = extra_bufts(dev);
        while !next.is_null() && !(*next).is_null() {
            let name = sys::ggml_backend_buft_name(*next);
            if !name.is_null() {
                names.push(
                    std::ffi::CStr::from_ptr(name)
                        .to_string_lossy()
                        .into_owned(),
                );
            }
            next = next.add(1);
        }
        names
    }
}

/// Whether llama.cpp copies the weights it multiplies out of the file as it loads: with Intel
/// AMX it repacks every matrix of a type its kernels take (the Q4, Q5, Q6 and Q8 types) into
/// the AMX buffer. (`CPU_REPACK`, present on every CPU, takes a few types on some CPUs only,
/// so it is not counted.)
fn copies_weights() -> bool {
    cpu_weight_layouts().iter().any(|n| n == "AMX")
}

/// With `--mlock`, locks the copy llama.cpp made of the weights as it loaded: llama.cpp locks
/// the file's mapping, or with `--no-mmap` the host buffers it read the weights into, but not
/// the AMX buffer (which it does not count as host memory), so most of a model's weights
/// could be paged out (SmolLM2 with `--no-mmap --mlock`: 29 of its 94 MiB locked). The copy
/// is in the anonymous memory the process took while loading (`before` is
/// `/proc/self/maps` from before the load), one allocation as large as the weights it holds;
/// the small pieces the load also took (a thread's malloc arena, ...) are left alone. The
/// mlock check after it counts what this locks.
fn lock_copied_weights(name: &str, before: &str) {
    const LEAST: usize = 1 << 20;
    let Ok(after) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let mut locked = 0usize;
    let taken = new_anonymous_ranges(before, &after);
    for (start, end) in taken.into_iter().filter(|(s, e)| e - s >= LEAST) {
        // SAFETY: a range /proc lists as this process's own writable anonymous memory; locking
        // it only keeps its pages in RAM.
        if unsafe { libc::mlock(start as *const libc::c_void, end - start) } == 0 {
            locked += end - start;
        }
    }
    tracing::debug!(model = %name, locked_bytes = locked, "locked the memory the load took");
}

/// Hands back the pages of the model file's mapping once llama.cpp has copied the weights
/// out of it: the pages the copy read stay counted in this process's resident memory beside
/// the copy (SmolLM2 on the 2-core Sapphire Rapids VM: 604 MB resident against 507 without
/// AMX). They are clean pages of a read-only file mapping, so `MADV_DONTNEED` only drops this
/// process's page-table entries: what llama.cpp still reads from the mapping (the rows of the
/// token embeddings, the norms, a type the copy does not take) faults back in from the page
/// cache when read, starting with the warm-up decode.
fn release_copied_weights(name: &str, files: &[&Path]) {
    let files: Vec<PathBuf> = files.iter().filter_map(|f| f.canonicalize().ok()).collect();
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let before = status_bytes("RssFile");
    let mut released = 0usize;
    for (start, end) in mapped_ranges(&maps, &files) {
        // SAFETY: a range /proc lists for a read-only mapping of the model's file (page
        // aligned, whole); dropping its pages from this process's tables loses nothing, as
        // every byte is the file's and is read back from it.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if rc == 0 {
            released += end - start;
        }
    }
    if released == 0 {
        return;
    }
    const MIB: f64 = 1024.0 * 1024.0;
    let freed = before
        .zip(status_bytes("RssFile"))
        .map_or(0.0, |(b, a)| b.saturating_sub(a) as f64 / MIB);
    tracing::info!(
        model = %name,
        mapped_mib = format_args!("{:.1}", released as f64 / MIB),
        resident_freed_mib = format_args!("{freed:.1}"),
        "weights copied into the AMX buffer: the file's mapped pages are handed back (read again from the page cache where still used)"
    );
}

/// One line of `/proc/self/maps`: an address range, its permissions (`r--s`, `rw-p`, ...) and
/// what it maps (a path, which may hold spaces; empty for anonymous memory).
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
}

/// The mappings `maps` (`/proc/self/maps`' text) lists.
fn mappings(maps: &str) -> impl Iterator<Item = Mapping<'_>> {
    maps.lines().filter_map(|line| {
        // address perms offset dev inode, then the path
        let mut rest = line;
        let mut fields = [""; 5];
        for field in &mut fields {
            rest = rest.trim_start();
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            *field = &rest[..end];
            rest = &rest[end..];
        }
        let (start, end) = fields[0].split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        (end > start).then_some(Mapping {
            start,
            end,
            perms: fields[1],
            path: rest.trim(),
        })
    })
}

/// The address ranges of `maps` that map one of `files` (a model's file, or each part of a
/// split model) read-only.
fn mapped_ranges(maps: &str, files: &[PathBuf]) -> Vec<(usize, usize)> {
    mappings(maps)
        .filter(|m| {
            files.iter().any(|f| f.as_path() == Path::new(m.path))
                && m.perms.starts_with('r')
                && !m.perms.contains('w')
        })
        .map(|m| (m.start, m.end))
        .collect()
}

/// The writable anonymous ranges of `after` that `before` did not list as they are: memory
/// the process took in between (a range that grew counts whole).
fn new_anonymous_ranges(before: &str, after: &str) -> Vec<(usize, usize)> {
    let old: BTreeSet<(usize, usize)> = mappings(before).map(|m| (m.start, m.end)).collect();
    mappings(after)
        .filter(|m| m.path.is_empty() && m.perms.starts_with("rw"))
        .map(|m| (m.start, m.end))
        .filter(|r| !old.contains(r))
        .collect()
}

/// A size from this process's `/proc/self/status` in bytes, e.g. `VmLck` (memory locked in
/// RAM) or `RssFile` (resident file-backed memory); `None` where /proc does not say.
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| {
        l.strip_prefix(key)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The most bytes this process may lock (`RLIMIT_MEMLOCK`); `None` for no limit or unknown.
fn memlock_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// What to say when `--mlock` locked less than the weights (`locked` of `weights` bytes; a
/// few pages' slack): why, and what to change. `None` when they are locked, or when the
/// process cannot tell (no /proc).
fn mlock_shortfall(locked: Option<u64>, weights: u64, limit: Option<u64>) -> Option<String> {
    let locked = locked?;
    if locked.saturating_add(1 << 20) >= weights {
        return None;
    }
    const MIB: f64 = 1024.0 * 1024.0;
    let limit = limit.map_or_else(String::new, |l| {
        format!(" (`ulimit -l` allows {:.1} MiB)", l as f64 / MIB)
    });
    Some(format!(
        "--mlock locked {:.1} MiB of the weights' {:.1} MiB in RAM{limit}: the rest can be \
         paged out; raise the limit (`ulimit -l unlimited`, LimitMEMLOCK=infinity in a systemd \
         unit, --ulimit memlock=-1 for docker) or grant CAP_IPC_LOCK",
        locked as f64 / MIB,
        weights as f64 / MIB
    ))
}

/// Context tokens per slot: the configured value, or the default capped at what the model
/// was trained for.
pub(crate) fn ctx_per_slot(model: &LlamaModel, options: &EngineOptions) -> u32 {
    let trained = model.n_ctx_train().max(1);
    match options.ctx_per_slot {
        Some(n) => {
            if n > trained {
                tracing::warn!(
                    model = %options.name,
                    requested = n,
                    trained,
                    "context per slot exceeds the model's training context; quality may drop"
                );
            }
            n
        }
        None => DEFAULT_CTX_PER_SLOT.min(trained),
    }
}

/// One context shared by all slots: `n_seq_max` sequences, each with its own
/// `ctx_per_slot` cells (no unified KV cache, so one long conversation cannot starve the
/// others). Its batch is at least `least_batch` ([`policy::Grain::least_batch`]).
pub(crate) fn new_context<'m>(
    backend: &LlamaBackend,
    model: &'m LlamaModel,
    options: &EngineOptions,
    fa: llama_cpp_sys_2::llama_flash_attn_type,
    ctx_per_slot: u32,
    least_batch: usize,
) -> Result<LlamaContext<'m>, LoadError> {
    let n_ctx = ctx_per_slot.saturating_mul(options.slots);
    // Every slot decodes one token per step: a batch smaller than the slots could not hold
    // one step (the scheduler would have to leave sequences out of every step). And a cold
    // read needs room for two of its kernel's chunks, or reproducible answers would depend
    // on what the slot held before.
    let least = u32::try_from(least_batch).unwrap_or(u32::MAX);
    let batch = options.batch.max(options.slots).max(least);
    if batch > options.batch {
        let why = if options.slots >= least {
            "every slot may decode one token in the same step"
        } else {
            "a prompt is read in pieces that each hold its kernel's rows (with flash attention, \
             two query tiles of 64), so that reproducible answers do not depend on the cache"
        };
        tracing::warn!(
            model = %options.name,
            asked = options.batch,
            batch,
            "batch raised: {why}"
        );
    }
    let params = shared_params(options, fa)
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_seq_max(options.slots)
        .with_n_batch(batch)
        .with_n_ubatch(batch)
        .with_kv_unified(false)
        .with_swa_full(options.swa_full);
    model
        .new_context(backend, params)
        .map_err(|e| LoadError::Context {
            n_ctx,
            slots: options.slots,
            reason: e.to_string(),
        })
}

/// The attention window of the model's sliding-window layers, from its GGUF
/// (`ARCH.attention.sliding_window`); `None` without one, and then nothing may rely on it.
/// Unless told `swa_full`, llama.cpp caches those layers' window and one batch, not the whole
/// context, and writes over a sequence's oldest positions once it is longer.
pub(crate) fn sliding_window(model: &LlamaModel) -> Option<usize> {
    let arch = model.meta_val_str("general.architecture").ok()?;
    let window = model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()?;
    window.trim().parse().ok().filter(|&w| w > 0)
}

/// The sliding-window cache of a serving context (one stream per sequence), unless
/// `swa_full` makes it whole: llama.cpp (`llama-kv-cache-iswa.cpp`) gives each sequence the
/// window and one micro-batch of cells, at most its context, rounded up to 256.
pub(crate) fn window_cache(
    model: &LlamaModel,
    ctx_per_slot: u32,
    n_ubatch: u32,
    swa_full: bool,
) -> Option<policy::Window> {
    if swa_full {
        return None;
    }
    let span = sliding_window(model)?;
    let cells = (span + n_ubatch as usize)
        .min(ctx_per_slot as usize)
        .next_multiple_of(256);
    Some(policy::Window { span, cells })
}

/// What every context of a model shares, whatever it is for: threads, the KV cache's element
/// type and the flash-attention policy `fa`, resolved once per model by
/// [`resolve_flash_attention`] (a quantized V cache needs flash attention, so both contexts
/// must agree for the operator's settings to work in either).
pub(crate) fn shared_params(
    options: &EngineOptions,
    fa: llama_cpp_sys_2::llama_flash_attn_type,
) -> LlamaContextParams {
    context_params(
        options.threads,
        options.threads_batch,
        fa,
        options.kv_cache_type,
    )
}

/// [`flash_attention`] for a model's settings (`serve`'s and `bench`'s alike) on this machine:
/// whether its attention runs on a GPU.
pub(crate) fn resolve_flash_attention(
    choice: Option<bool>,
    kv: KvCacheType,
    gpu_layers: Option<u32>,
) -> llama_cpp_sys_2::llama_flash_attn_type {
    flash_attention(choice, kv, attends_on_gpu(gpu_layers))
}

/// How the load log names a flash-attention setting (`auto`: llama.cpp decides).
pub(crate) fn flash_attention_name(fa: llama_cpp_sys_2::llama_flash_attn_type) -> &'static str {
    match fa {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED => "on",
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED => "off",
        _ => "auto",
    }
}

/// A context's threads, KV cache element type and flash-attention policy (from
/// [`flash_attention`]), as the server sets them; `backstop bench` builds its contexts from the
/// same, so it measures what serving runs.
pub(crate) fn context_params(
    threads: u32,
    threads_batch: u32,
    flash: llama_cpp_sys_2::llama_flash_attn_type,
    kv_cache_type: KvCacheType,
) -> LlamaContextParams {
    let threads = i32::try_from(threads).unwrap_or(i32::MAX);
    let threads_batch = i32::try_from(threads_batch).unwrap_or(i32::MAX);
    let kv = match kv_cache_type {
        KvCacheType::F16 => llama_cpp_2::context::params::KvCacheType::F16,
        KvCacheType::Q8_0 => llama_cpp_2::context::params::KvCacheType::Q8_0,
        KvCacheType::Q4_0 => llama_cpp_2::context::params::KvCacheType::Q4_0,
    };
    LlamaContextParams::default()
        .with_flash_attention_policy(flash)
        .with_type_k(kv)
        .with_type_v(kv)
        .with_n_threads(threads)
        .with_n_threads_batch(threads_batch)
}

/// `params` with llama.cpp's graph callback (`cb_eval`) set, which the crate's wrapper has no
/// setter for: the wrapper holds the raw parameters as its only field, so the two have one
/// layout (the sizes are checked here when built, the fields by a test).
///
/// # Safety
/// `data` must stay valid, and `callback` safe to call with it from the decoding thread, for
/// as long as a context made from the result lives.
pub(crate) unsafe fn with_eval_callback(
    params: LlamaContextParams,
    callback: llama_cpp_sys_2::ggml_backend_sched_eval_callback,
    data: *mut std::ffi::c_void,
) -> LlamaContextParams {
    // SAFETY: the same bytes, per the layout above; the transmute refuses a size change.
    let mut raw: llama_cpp_sys_2::llama_context_params = unsafe { std::mem::transmute(params) };
    raw.cb_eval = callback;
    raw.cb_eval_user_data = data;
    // SAFETY: as above, back again.
    unsafe { std::mem::transmute::<llama_cpp_sys_2::llama_context_params, LlamaContextParams>(raw) }
}

/// Whether a GPU is there for llama.cpp to use, as [`super::Compute::has_gpu`] reports it (a
/// CUDA build on a machine without one, or with `CUDA_VISIBLE_DEVICES=` empty, has none).
pub(crate) fn has_gpu() -> bool {
    super::compute().is_ok_and(|c| c.has_gpu())
}

/// Whether a context's attention runs on a GPU: there is one and the layers, whose KV cache
/// goes with them, are not all kept on the CPU (`--gpu-layers 0`).
pub(crate) fn attends_on_gpu(gpu_layers: Option<u32>) -> bool {
    gpu_layers != Some(0) && has_gpu()
}

/// llama.cpp's flash-attention setting for the operator's choice. A quantized KV cache needs
/// flash attention and always gets it. Otherwise, when they did not choose, llama.cpp decides
/// where attention runs on a GPU (it turns it on where the GPU's backend has the kernel), and
/// on a CPU it is off, as Ollama has it; llama-server turns it on for every model.
///
/// On a CPU, ggml's flash-attention kernel is faster near the start of a context, but fewer
/// than 64 query rows (every decode, a short follow-up) take its row-by-row kernel, whose
/// cost per cached cell is high. `backstop bench -p 32 -n 32 -d 0,1024,3072 --flash-attention
/// 0,1 -r 3 --ctx 4096`, 2 threads, 2-core Sapphire Rapids VM, tg32 / pp32 with it over
/// without it, at depths 0, 1,024 and 3,072:
/// - SmolLM2 Q4_1 (every layer sees the whole context; 9 query and 3 key/value heads, 64
///   wide): 1.18 / 1.00, 0.52 / 0.28, 0.41 / 0.17. Served, a second chat turn on a
///   1,000-token history waited 476 ms for its first token with it against 148 without.
///   Made with heads 128 or 256 wide (`scripts/stand-in-model.py --head-size N`) it still
///   decodes at 0.89 / 0.77 at 3,072.
/// - Models with sliding-window layers, made in their published shapes with random weights
///   (`scripts/stand-in-model.py --like SHAPE [--layers N]`, then `backstop quantize` to
///   Q4_K_M, gpt-oss to MXFP4_MOE). Made so, Gemma 3 270M measures as the real model does
///   (1.05 / 1.14, 1.00 / 1.05, 1.09 / 0.98 against 1.03 / 1.15, 1.07 / 1.11, 1.02 / 0.94).
///   - Gemma 3 270M (4 query heads, 1 key/value head, 256 wide, window 512 on 5 layers of
///     6) is the only one that gains throughout: decode 1.02-1.09.
///   - Gemma 3 1B (its attention in a wider model): 0.95-1.04 decode and 1.00-1.05 prompts
///     over two runs, no difference.
///   - Gemma 3 4B (8 and 4 heads, window 1,024; 6 layers): 1.01 / 1.05, 0.99 / 0.82,
///     0.95 / 0.75.
///   - Gemma 2 2B (8 and 4 heads, window 4,096 on every other layer; 6 layers): 0.99 / 1.09,
///     0.94 / 0.77, 0.77 / 0.55.
///   - gpt-oss 20B (64 and 8 heads, 64 wide, window 128 on every other layer; 4 layers):
///     1.02 / 1.02, 0.86 / 0.70, 0.69 / 0.44.
///
/// So on a CPU a model risks a little without it and a lot with it. (On 2 cores of a Zen 4,
/// SmolLM2 decoded ~10% faster with it up to 1,000 tokens: `backstop bench` with
/// `--flash-attention 0,1` tells which a machine wants.) Either way a seeded answer does not
/// depend on the slot's cache (see [`exact_grain`]).
pub(crate) fn flash_attention(
    choice: Option<bool>,
    kv: KvCacheType,
    on_gpu: bool,
) -> llama_cpp_sys_2::llama_flash_attn_type {
    match choice.or((kv != KvCacheType::F16).then_some(true)) {
        None if on_gpu => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
        Some(true) => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        _ => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }
}

/// How prompt rows are grouped for exact reuse under these settings and the context's flash
/// attention `fa`: [`policy::MATMUL_GRAIN`] when it is off, else [`policy::FLASH_GRAIN`] (also
/// when llama.cpp decides, on a GPU); row by row ([`policy::Grain::row_wise`]) when
/// [`rows_stand_alone`].
pub(crate) fn exact_grain(
    options: &EngineOptions,
    backend: &LlamaBackend,
    fa: llama_cpp_sys_2::llama_flash_attn_type,
    tensor_types: &BTreeSet<u32>,
) -> policy::Grain {
    let grain = if fa == llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED {
        policy::MATMUL_GRAIN
    } else {
        policy::FLASH_GRAIN
    };
    let cpu_only = !backend.supports_gpu_offload();
    let row_wise =
        cpu_only && options.kv_cache_type == KvCacheType::F16 && rows_stand_alone(tensor_types);
    tracing::debug!(model = %options.name, ?tensor_types, row_wise, "prompt row grouping");
    if row_wise {
        grain.row_wise()
    } else {
        grain
    }
}

/// Weight types llama.cpp's CPU backend repacks on x86 (`ggml_repack_get_optimal_repack_type`:
/// Q4_0, Q4_K, IQ4_NL and MXFP4 with AVX2, Q2_K with AVX-512), whose products take rows in
/// groups counted from a batch's first row.
const REPACKED_ON_X86: [u32; 5] = [
    llama_cpp_sys_2::GGML_TYPE_Q4_0,
    llama_cpp_sys_2::GGML_TYPE_Q4_K,
    llama_cpp_sys_2::GGML_TYPE_IQ4_NL,
    llama_cpp_sys_2::GGML_TYPE_MXFP4,
    llama_cpp_sys_2::GGML_TYPE_Q2_K,
];

/// On an x86 CPU, a model with none of those weights computes each prompt row alike whatever
/// chunk it is read in, as long as the chunk picks the same kernels (the others multiply a
/// row by vector dot products, or by `llamafile_sgemm`, whose tiles add up each element in
/// the same order whatever their shape). Elsewhere (ARM repacks Q5_K, Q6_K and Q8_0 too, and
/// multiplies two rows at once) rows stay grouped as on repacked weights.
pub(crate) fn rows_stand_alone(tensor_types: &BTreeSet<u32>) -> bool {
    cfg!(target_arch = "x86_64")
        && !tensor_types.is_empty()
        && tensor_types.iter().all(|t| !REPACKED_ON_X86.contains(t))
}

/// Empties a context's KV cache: every sequence's cells are freed, and the memory behind them
/// is left as it is, as llama.cpp's server leaves it between requests. The crate's
/// `clear_kv_cache` also writes zeroes over the whole cache, which nothing reads again: in an
/// embedding context of 512 cells that was 12 MB for SmolLM2 before and after every decode,
/// 5 of the 50 ms a 12-token query took on the 2-core machine.
pub(crate) fn forget_all(ctx: &mut LlamaContext<'_>) {
    // Without a sequence or positions nothing is converted, so this cannot fail.
    let _ = ctx.clear_kv_cache_seq(None, None, None);
}

/// Evaluates one token and forgets it, as llama.cpp's own server does at start: the weights
/// are paged in and the compute buffers allocated now, so the first request does not pay
/// for it. A failure here is harmless (the first request will simply be slower).
pub(crate) fn warm_up(model: &LlamaModel, ctx: &mut LlamaContext<'_>) {
    let vocab = model.vocab();
    let token = if vocab.should_add_bos() {
        vocab.bos()
    } else {
        vocab.eos()
    };
    let mut batch = LlamaBatch::new(1, 1);
    let ok =
        batch.add(token, 0, &[0], true).is_ok() && super::graphs::decode(ctx, &mut batch).is_ok();
    if !ok {
        tracing::debug!("warm-up decode failed");
    }
    forget_all(ctx);
}

/// Reads the template and metadata clients will see.
pub(crate) fn describe(
    model: &LlamaModel,
    options: &EngineOptions,
    ctx_per_slot: u32,
    file_size: u64,
) -> Result<ModelInfo, LoadError> {
    let architecture = model
        .meta_val_str("general.architecture")
        .unwrap_or_else(|_| "unknown".to_owned());
    let vocab = model.vocab();
    let piece = |t| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    let gguf_template = model
        .chat_template(None)
        .ok()
        .and_then(|t| t.to_string().ok());
    let template = ChatTemplate::new(
        gguf_template,
        &architecture,
        piece(vocab.bos()),
        piece(vocab.eos()),
    )
    .map_err(|e| LoadError::Template(e.to_string()))?;
    tracing::info!(
        model = %options.name,
        source = ?template.source(),
        "chat template"
    );
    let fim = {
        let (p, s, m) = (vocab.fim_pre(), vocab.fim_suf(), vocab.fim_mid());
        (p.0 >= 0 && s.0 >= 0 && m.0 >= 0).then(|| Fim {
            prefix: piece(p),
            suffix: piece(s),
            middle: piece(m),
        })
    };
    // K and V per layer per cell: n_head_kv * head_dim elements each.
    let head_dim = u64::from(model.n_embd().unsigned_abs()) / u64::from(model.n_head().max(1));
    let per_cell = 2 * u64::from(model.n_layer()) * u64::from(model.n_head_kv()) * head_dim;
    let (num, den) = match options.kv_cache_type {
        KvCacheType::F16 => (2, 1),
        KvCacheType::Q8_0 => (34, 32),
        KvCacheType::Q4_0 => (18, 32),
    };
    let kv_bytes = per_cell * u64::from(ctx_per_slot) * u64::from(options.slots) * num / den;
    let layers = model.n_layer();
    // llama.cpp offloads every layer (and the output layer) unless told fewer.
    let gpu_layers = if has_gpu() {
        options.gpu_layers.map_or(layers, |n| n.min(layers))
    } else {
        0
    };
    let vram_bytes = if gpu_layers == 0 {
        0
    } else {
        file_size * u64::from(gpu_layers) / u64::from(layers.max(1)) + kv_bytes
    };
    tracing::info!(
        model = %options.name,
        gpu_layers,
        layers,
        vram_mib = vram_bytes / (1024 * 1024),
        "layers offloaded to the GPU"
    );
    Ok(ModelInfo {
        fim,
        kv_bytes,
        layers,
        gpu_layers,
        vram_bytes,
        embedding_length: u32::try_from(model.n_embd_out()).unwrap_or(0),
        embedding_tokens: super::embed::EmbedShape::new(ctx_per_slot, options.batch).tokens,
        name: options.name.clone(),
        path: options.path.clone(),
        architecture,
        parameters: model.n_params(),
        file_size,
        context_train: model.n_ctx_train(),
        ctx_per_slot,
        slots: options.slots,
        max_queue: options.max_queue,
        template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_cpp_sys_2::{GGML_TYPE_F32, GGML_TYPE_Q4_1, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K};

    #[test]
    fn the_model_files_read_only_mappings_are_found_split_parts_and_spaces_included() {
        let maps = "\
55d0c0a00000-55d0c0a21000 r--p 00000000 fd:01 1048 /usr/bin/backstop
7f0000000000-7f0005dc6000 r--s 00000000 fd:01 2050 /models/my model.gguf
7f0006000000-7f0006001000 rw-p 00000000 fd:01 2050 /models/my model.gguf
7f0007000000-7f0007800000 r--s 00000000 fd:01 2051 /models/other.gguf
7f0008000000-7f0008400000 r--s 00000000 fd:01 3001 /m/big-00001-of-00002.gguf
7f0009000000-7f0009200000 r--s 00000000 fd:01 3002 /m/big-00002-of-00002.gguf
7f000a000000-7f000a100000 r--s 00000000 fd:01 3003 /m/big-00001-of-00003.gguf
7f000b000000-7f000b100000 r--s 00000000 fd:01 3004 /n/big-00002-of-00002.gguf
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
        let files = |names: &[&str]| names.iter().map(PathBuf::from).collect::<Vec<_>>();
        // Read-only only (a writable range may hold private copies), a path with a space whole.
        assert_eq!(
            mapped_ranges(maps, &files(&["/models/my model.gguf"])),
            [(0x7f00_0000_0000, 0x7f00_05dc_6000)]
        );
        // Every part of the split model given, not another count or folder.
        assert_eq!(
            mapped_ranges(
                maps,
                &files(&["/m/big-00001-of-00002.gguf", "/m/big-00002-of-00002.gguf"])
            ),
            [
                (0x7f00_0800_0000, 0x7f00_0840_0000),
                (0x7f00_0900_0000, 0x7f00_0920_0000)
            ]
        );
        assert!(mapped_ranges(maps, &files(&["/models/absent.gguf"])).is_empty());
    }

    #[test]
    fn memory_taken_between_two_readings_of_the_maps_is_found() {
        let before = "\
55d0c0a00000-55d0c0a21000 r--p 00000000 fd:01 1048 /usr/bin/backstop
55d0c1000000-55d0c1100000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0001000000-7f0001100000 rw-p 00000000 00:00 0
";
        let after = "\
55d0c0a00000-55d0c0a21000 r--p 00000000 fd:01 1048 /usr/bin/backstop
55d0c1000000-55d0c1900000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0001000000-7f0001300000 rw-p 00000000 00:00 0
7f0002000000-7f0007f00000 rw-p 00000000 00:00 0
7f0008000000-7f0008100000 r--s 00000000 fd:01 2050 /models/m.gguf
7f0009000000-7f0009001000 ---p 00000000 00:00 0
";
        // New or grown anonymous memory that may be written; not the heap, a file or a guard.
        assert_eq!(
            new_anonymous_ranges(before, after),
            [
                (0x7f00_0100_0000, 0x7f00_0130_0000),
                (0x7f00_0200_0000, 0x7f00_07f0_0000)
            ]
        );
        assert!(new_anonymous_ranges(after, after).is_empty());
    }

    #[test]
    fn an_eval_callback_joins_the_parameters_and_leaves_the_others_alone() {
        unsafe extern "C" fn callback(
            _: *mut llama_cpp_sys_2::ggml_tensor,
            _: bool,
            _: *mut std::ffi::c_void,
        ) -> bool {
            false
        }
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(1234))
            .with_n_batch(77)
            .with_n_threads(3)
            .with_embeddings(true);
        let mut data = 5u8;
        // SAFETY: the parameters make no context here.
        let params = unsafe {
            with_eval_callback(params, Some(callback), std::ptr::from_mut(&mut data).cast())
        };
        assert_eq!(params.n_ctx(), NonZeroU32::new(1234));
        assert_eq!(params.n_batch(), 77);
        assert_eq!(params.n_threads(), 3);
        assert!(params.embeddings());
        // SAFETY: the layout `with_eval_callback` relies on, read back.
        let raw: llama_cpp_sys_2::llama_context_params = unsafe { std::mem::transmute(params) };
        assert!(raw.cb_eval.is_some());
        assert_eq!(raw.cb_eval_user_data, std::ptr::from_mut(&mut data).cast());
        assert_eq!((raw.n_ctx, raw.n_batch, raw.n_threads), (1234, 77, 3));
    }

    #[test]
    fn a_lock_short_of_the_weights_says_so_and_how_to_lift_the_limit() {
        const MIB: u64 = 1 << 20;
        assert_eq!(mlock_shortfall(Some(94 * MIB), 94 * MIB, None), None);
        // A few pages short is a lock (llama.cpp rounds to pages; /proc counts KiB).
        assert_eq!(mlock_shortfall(Some(93 * MIB + 512), 94 * MIB, None), None);
        assert_eq!(mlock_shortfall(None, 94 * MIB, None), None);
        let said = mlock_shortfall(Some(8 * MIB), 94 * MIB, Some(8 * MIB)).unwrap();
        assert!(
            said.starts_with("--mlock locked 8.0 MiB of the weights' 94.0 MiB in RAM (`ulimit -l` allows 8.0 MiB)"),
            "{said}"
        );
        assert!(
            said.contains("CAP_IPC_LOCK") && said.contains("LimitMEMLOCK=infinity"),
            "{said}"
        );
        let said = mlock_shortfall(Some(0), 94 * MIB, None).unwrap();
        assert!(
            said.starts_with("--mlock locked 0.0 MiB of the weights' 94.0 MiB in RAM: "),
            "{said}"
        );
    }

    #[test]
    fn only_models_without_repacked_weights_read_rows_alone() {
        // SmolLM2's Q4_1 file and Gemma 3's Q4_K_M one.
        let smollm2 = BTreeSet::from([GGML_TYPE_F32, GGML_TYPE_Q4_1]);
        assert_eq!(rows_stand_alone(&smollm2), cfg!(target_arch = "x86_64"));
        let gemma = BTreeSet::from([GGML_TYPE_F32, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K]);
        assert!(!rows_stand_alone(&gemma));
        assert!(!rows_stand_alone(&BTreeSet::new()), "types unknown");
    }

    #[test]
    fn flash_attention_defaults_by_device_and_obeys_the_operator() {
        use llama_cpp_sys_2::{
            LLAMA_FLASH_ATTN_TYPE_AUTO as AUTO, LLAMA_FLASH_ATTN_TYPE_DISABLED as OFF,
            LLAMA_FLASH_ATTN_TYPE_ENABLED as ON,
        };
        let f16 = KvCacheType::F16;
        // Unasked: llama.cpp's choice on a GPU, off on a CPU.
        assert_eq!(flash_attention(None, f16, true), AUTO);
        assert_eq!(flash_attention(None, f16, false), OFF);
        // Asked, whatever the device.
        for gpu in [false, true] {
            assert_eq!(flash_attention(Some(true), f16, gpu), ON);
            assert_eq!(flash_attention(Some(false), f16, gpu), OFF);
            // A quantized cache needs it (the configuration refuses it turned off).
            assert_eq!(flash_attention(None, KvCacheType::Q8_0, gpu), ON);
            assert_eq!(flash_attention(None, KvCacheType::Q4_0, gpu), ON);
        }
    }
}
