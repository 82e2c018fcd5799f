//! `backstop quantize IN OUT TYPE`: llama.cpp's own quantizer (`llama_model_quantize`, which
//! the `llama-cpp-sys-2` crate exposes and `llama-cpp-2` does not wrap), so a quantization
//! ladder can be built from one model and benchmarked without any download. The output is
//! written under a temporary name and renamed only when the quantizer succeeded.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::imatrix::{self, Imatrix};
use crate::models::{gguf, GgufHeader};

/// Why quantizing failed.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// A type llama.cpp's quantizer does not offer.
    #[error("`{0}` is not a quantization type; one of: {1}")]
    UnknownType(String, String),
    /// A type llama.cpp's quantizer refuses without an importance matrix, asked for
    /// without one.
    #[error(
        "`{0}` needs an importance matrix: make one with `backstop imatrix MODEL -f TEXT`, then \
         `backstop quantize --imatrix FILE IN OUT {0}` (the smallest types without one are Q2_K \
         and Q3_K_S)"
    )]
    NeedsImatrix(String),
    /// An importance matrix that does not fit the model.
    #[error("{0}")]
    Imatrix(String),
    /// The input is not a readable GGUF.
    #[error("{0}")]
    Input(String),
    /// The quantizer failed.
    #[error("llama.cpp's quantizer failed (code {0}); its log above says why")]
    Failed(u32),
    /// The output could not be written.
    #[error("{0}")]
    Output(String),
}

/// The target types (llama.cpp's `llama_ftype` numbers, include/llama.h).
const TYPES: &[(&str, u32)] = &[
    ("F32", 0),
    ("F16", 1),
    ("Q4_0", 2),
    ("Q4_1", 3),
    ("Q8_0", 7),
    ("Q5_0", 8),
    ("Q5_1", 9),
    ("Q2_K", 10),
    ("Q3_K_S", 11),
    ("Q3_K_M", 12),
    ("Q3_K_L", 13),
    ("Q4_K_S", 14),
    ("Q4_K_M", 15),
    ("Q5_K_S", 16),
    ("Q5_K_M", 17),
    ("Q6_K", 18),
    ("IQ2_XXS", 19),
    ("IQ2_XS", 20),
    ("Q2_K_S", 21),
    ("IQ3_XS", 22),
    ("IQ3_XXS", 23),
    ("IQ1_S", 24),
    ("IQ4_NL", 25),
    ("IQ3_S", 26),
    ("IQ3_M", 27),
    ("IQ2_S", 28),
    ("IQ2_M", 29),
    ("IQ4_XS", 30),
    ("IQ1_M", 31),
    ("BF16", 32),
    // Expert tensors (a mixture of experts' 3-D ones) in MXFP4, the rest in Q8_0: how gpt-oss
    // is published.
    ("MXFP4_MOE", 38),
    // No quantizing: the tensors as they are, with the metadata --override-kv sets, into one
    // file (a split model's parts joined) or, with --keep-split, as many (llama-quantize's COPY).
    (COPY, 0),
];

/// The type that copies rather than quantizes.
pub const COPY: &str = "COPY";

/// Types whose quantizer throws on the first tensor it reaches without an importance matrix
/// (`tensor_requires_imatrix` in llama.cpp's src/llama-quant.cpp): the 1- and 2-bit i-quants
/// (IQ2_M's tensors are mostly IQ2_S), IQ3_XXS, and Q2_K_S, which puts Q2_K in every tensor
/// but the token embeddings under that rule. Without `--imatrix` they are refused by name
/// before the input is read.
const NEED_IMATRIX: &[&str] = &[
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S",
];

/// Whether a type (any case) is refused without an importance matrix.
pub fn needs_imatrix(name: &str) -> bool {
    NEED_IMATRIX
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name.trim()))
}

/// A type's row of [`TYPES`] (any case).
fn entry(name: &str) -> Result<&'static (&'static str, u32), QuantizeError> {
    let name = name.trim();
    TYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            QuantizeError::UnknownType(
                name.to_owned(),
                TYPES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
            )
        })
}

/// The `llama_ftype` of a type name (any case).
pub fn ftype(name: &str) -> Result<u32, QuantizeError> {
    entry(name).map(|e| e.1)
}

/// A type name as llama.cpp spells it (`q4_k_m` is `Q4_K_M`).
pub fn canonical(name: &str) -> Result<&'static str, QuantizeError> {
    entry(name).map(|e| e.0)
}

/// How `quantize` quantizes, beyond the type.
#[derive(Debug, Clone, Default)]
pub struct Options<'a> {
    /// CPU threads (0: llama.cpp's choice, every hardware thread).
    pub threads: u32,
    /// An importance matrix and its file: rounding errors are weighed by it, and the output
    /// names it in the keys llama.cpp's llama-quantize writes (`quantize.imatrix.file`,
    /// `.dataset`, `.entries_count`, `.chunks_count`).
    pub imatrix: Option<(&'a Imatrix, &'a Path)>,
    /// The output layer's ggml type (`output.weight`), instead of the mix's.
    pub output_type: Option<u32>,
    /// The token embeddings' ggml type, instead of the mix's.
    pub embedding_type: Option<u32>,
    /// Leave the output layer as it is.
    pub leave_output: bool,
    /// Every quantized tensor in the type itself, without the mix's per-tensor choices.
    pub pure: bool,
    /// Tensors whose name a pattern (a regular expression) matches get its ggml type; the
    /// first that matches wins.
    pub tensor_types: Vec<(String, u32)>,
    /// Metadata keys set in the output (`--override-kv`), after the importance matrix's.
    pub overrides: Vec<Override>,
    /// A split model is written in as many parts as it has (`--keep-split`), not as one file.
    pub keep_split: bool,
    /// A progress bar on stderr while the quantizer writes (the CLI's; never a server's).
    pub progress: bool,
    /// Layers (`blk.N`, from 0) left out of the output, the ones after them numbered down so
    /// the layers still run from 0 (llama-quantize's `--prune-layers`): sorted, each once.
    pub prune: Vec<u32>,
    /// The importance matrix only for the weights whose name contains one of these
    /// (llama-quantize's `--include-weights`); the others are quantized without it.
    pub imatrix_include: Vec<String>,
    /// No importance matrix for the weights whose name contains one of these
    /// (llama-quantize's `--exclude-weights`).
    pub imatrix_exclude: Vec<String>,
}

/// A metadata key `--override-kv KEY=TYPE:VALUE` sets in the quantized file.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The key, e.g. `general.name`.
    pub key: String,
    /// Its value.
    pub value: OverrideValue,
}

/// An `--override-kv` value, of the types llama.cpp's quantizer writes.
#[derive(Debug, Clone, PartialEq)]
pub enum OverrideValue {
    /// `int:N`, written as an unsigned 32-bit integer, as llama.cpp's quantizer writes it.
    Int(u32),
    /// `float:X`, written as a 32-bit float.
    Float(f64),
    /// `bool:true` or `bool:false`.
    Bool(bool),
    /// `str:TEXT`, at most 127 bytes.
    Str(String),
}

/// Longest key or text value llama.cpp's override holds (its arrays are 128 bytes with the NUL).
const OVERRIDE_MAX: usize = 127;

/// Parses `KEY=TYPE:VALUE` (llama.cpp's `--override-kv` syntax: types `int`, `float`, `bool`,
/// `str`). What llama.cpp would silently change is refused instead: a negative or too large
/// integer (its quantizer writes the absolute value as 32 bits), a key or text it would cut
/// at 127 bytes.
pub fn override_kv(spec: &str) -> Result<Override, QuantizeError> {
    let bad = |why: String| QuantizeError::Input(format!("--override-kv {spec}: {why}"));
    let (key, typed) = spec
        .split_once('=')
        .ok_or_else(|| bad("not KEY=TYPE:VALUE".into()))?;
    let (kind, value) = typed
        .split_once(':')
        .ok_or_else(|| bad("not KEY=TYPE:VALUE".into()))?;
    if key.is_empty() || key.len() > OVERRIDE_MAX || key.contains('\0') {
        return Err(bad(format!("a key of 1 to {OVERRIDE_MAX} bytes")));
    }
    let value = match kind {
        "int" => OverrideValue::Int(value.parse().map_err(|_| {
            bad(format!(
                "`{value}` is not a whole number from 0 to {} (llama.cpp writes integer keys \
                 as unsigned 32-bit)",
                u32::MAX
            ))
        })?),
        "float" => OverrideValue::Float(
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(format!("`{value}` is not a number")))?,
        ),
        "bool" => OverrideValue::Bool(match value {
            "true" => true,
            "false" => false,
            _ => return Err(bad(format!("`{value}` is not true or false"))),
        }),
        "str" if value.len() > OVERRIDE_MAX || value.contains('\0') => {
            return Err(bad(format!(
                "a text of at most {OVERRIDE_MAX} bytes, without NUL"
            )))
        }
        "str" => OverrideValue::Str(value.to_owned()),
        _ => {
            return Err(bad(format!(
                "`{kind}` is not a type; one of int, float, bool, str"
            )))
        }
    };
    Ok(Override {
        key: key.to_owned(),
        value,
    })
}

/// A ggml tensor type by name (any case: `q8_0`, `Q6_K`, `f16`), for the per-tensor options;
/// an unknown one lists them.
pub fn ggml_type(name: &str) -> Result<u32, QuantizeError> {
    let usable = |t: u32| {
        // SAFETY: a plain query of a type number below GGML_TYPE_COUNT.
        let quantized =
            unsafe { llama_cpp_sys_2::ggml_is_quantized(t as llama_cpp_sys_2::ggml_type) };
        quantized
            || t == llama_cpp_sys_2::GGML_TYPE_F32
            || t == llama_cpp_sys_2::GGML_TYPE_F16
            || t == llama_cpp_sys_2::GGML_TYPE_BF16
    };
    let names: Vec<(u32, String)> = (0..llama_cpp_sys_2::GGML_TYPE_COUNT)
        .filter(|&t| usable(t))
        .map(|t| (t, crate::engine::probe::type_name(t)))
        .filter(|(_, n)| !n.starts_with("type ") && !n.eq_ignore_ascii_case("deprecated"))
        .collect();
    names
        .iter()
        .find(|(_, n)| n.eq_ignore_ascii_case(name.trim()))
        .map(|(t, _)| *t)
        .ok_or_else(|| {
            QuantizeError::UnknownType(
                name.to_owned(),
                names
                    .iter()
                    .map(|(_, n)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })
}

/// A `--tensor-type PATTERN=GGML_TYPE`: the pattern (lower-cased, as llama-quantize takes
/// it) and the type.
pub fn tensor_type(spec: &str) -> Result<(String, u32), QuantizeError> {
    let bad = |why: &str| QuantizeError::Input(format!("--tensor-type {spec}: {why}"));
    let (pattern, kind) = spec
        .rsplit_once('=')
        .ok_or_else(|| bad("not PATTERN=GGML_TYPE"))?;
    if pattern.trim().is_empty() {
        return Err(bad("no pattern"));
    }
    Ok((pattern.trim().to_ascii_lowercase(), ggml_type(kind)?))
}

/// Quantizes `input` to `output` as `kind`, as `options` say; the files written. Requantizing
/// an already quantized model is allowed, with a warning: quality drops more than quantizing
/// from F16. With [`Options::keep_split`], a split model is written in as many parts, named as
/// llama-quantize names them: `output` without `.gguf`, then `-00001-of-00003.gguf` and on.
/// Every file is written under a temporary name and renamed when the quantizer succeeded.
pub fn quantize(
    input: &Path,
    output: &Path,
    kind: &str,
    options: &Options<'_>,
) -> Result<Vec<PathBuf>, QuantizeError> {
    if options.imatrix.is_none() && needs_imatrix(kind) {
        return Err(QuantizeError::NeedsImatrix(canonical(kind)?.to_owned()));
    }
    let dir = check_output(input, output)?;
    let name = output
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("out.gguf");
    let temp = writing(output);
    ftype(kind)?;
    let header = read_input(input)?;
    // Every file read: a split model's parts too.
    let mut inputs = vec![input.to_owned()];
    inputs.extend(header.parts.iter().cloned());
    // The files llama.cpp writes, and the names each is given after.
    let files: Vec<(PathBuf, PathBuf)> = if options.keep_split {
        if inputs.len() == 1 {
            return Err(QuantizeError::Input(format!(
                "{}: a model in one file; --keep-split keeps the parts of a model split into \
                 several files (NAME-00001-of-00003.gguf): without it the output is one file",
                input.display()
            )));
        }
        let count = inputs.len() as u64;
        let stem = match output.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("gguf") => &name[..name.len() - ".gguf".len()],
            _ => name,
        };
        let stem = gguf::split_name(stem).map_or(stem, |(p, _)| p);
        let part = |i| gguf::split_suffix(i, count);
        (0..count)
            .map(|i| {
                let mut from = temp.clone().into_os_string();
                from.push(part(i));
                (
                    from.into(),
                    output.with_file_name(format!("{stem}{}", part(i))),
                )
            })
            .collect()
    } else {
        vec![(temp.clone(), output.to_owned())]
    };
    // No part written over a part read.
    for (_, to) in &files {
        for from in &inputs {
            check_output(from, to)?;
        }
    }
    // What would stop the quantizer is said before the room is counted and the bar drawn.
    check_prune(&header, &options.prune)?;
    if let Some((m, _)) = options.imatrix {
        let (list, weights) = fitted(m, &header, options)?;
        tracing::info!(
            "quantizing with an importance matrix for {} of {weights} weight matrices",
            list.len()
        );
    }
    // A dead quantizer's files first: their room counts as free.
    remove_stale(dir, std::time::Duration::ZERO, |stale| stale == name);
    let size = check_room(
        input,
        &header,
        &[kind],
        options,
        dir,
        &output.display().to_string(),
    )?;
    let remove = || {
        for (from, _) in &files {
            let _ = std::fs::remove_file(from);
        }
    };
    // Said before the bar is drawn, not under it.
    if requantizing(&header) && canonical(kind)? != COPY {
        tracing::warn!(
            from = %header.quantization(),
            to = canonical(kind)?,
            "requantizing an already quantized model: quality drops more than quantizing from F16/BF16"
        );
    }
    let writing = Writing::register(files.iter().map(|(from, _)| from.clone()).collect());
    let quantize = || run(input, &header, Some(&temp), kind, options);
    let ran = if options.progress {
        let source = input
            .file_name()
            .unwrap_or(input.as_os_str())
            .to_string_lossy();
        let bar = progress_bar(size, format!("quantizing {source} to {}", canonical(kind)?));
        watched(&writing.0, &bar, quantize)
    } else {
        quantize()
    };
    if let Err(e) = ran {
        remove();
        return Err(e);
    }
    for (from, to) in &files {
        if let Err(e) = std::fs::rename(from, to) {
            remove();
            return Err(QuantizeError::Output(format!("{}: {e}", to.display())));
        }
    }
    Ok(files.into_iter().map(|(_, to)| to).collect())
}

/// The files the quantizers of this process are writing, for [`remove_unfinished`].
static WRITING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Files in [`WRITING`] while it lives: removed by [`remove_unfinished`] on Ctrl-C.
pub(crate) struct Writing(Vec<PathBuf>);

impl Writing {
    pub(crate) fn register(files: Vec<PathBuf>) -> Writing {
        WRITING
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(files.iter().cloned());
        Writing(files)
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        WRITING
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|f| !self.0.contains(f));
    }
}

/// Removes the files the quantizers of this process are writing: what a Ctrl-C handler does
/// before the process ends, so no half-written model is left behind.
pub fn remove_unfinished() {
    for f in WRITING
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain(..)
    {
        let _ = std::fs::remove_file(f);
    }
}

/// Removes what quantizers that were killed before they could tidy up left in `dir`: the
/// `.NAME.partial-PID` files (with `--keep-split`'s part suffixes) of outputs whose NAME
/// `output` accepts, whose process is gone, unchanged for at least `idle` (a folder that
/// servers in other containers share: their process ids are not seen here).
pub fn remove_stale(dir: &Path, idle: std::time::Duration, output: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some((name, pid)) = file
            .to_str()
            .and_then(|f| f.strip_prefix('.'))
            .and_then(|f| f.rsplit_once(".partial-"))
        else {
            continue;
        };
        let pid: String = pid.chars().take_while(char::is_ascii_digit).collect();
        if output(name) && crate::models::store::abandoned(&pid, &entry, idle) {
            tracing::info!(path = %entry.path().display(), "removing what an interrupted quantizer left");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Where [`quantize`] writes `output` until it is complete (beside it, hidden): how far it has
/// got can be watched there.
pub fn writing(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("out.gguf");
    output.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// The input's header, read once for all the quantizer's runs (a split model's every part).
fn read_input(input: &Path) -> Result<GgufHeader, QuantizeError> {
    gguf::read(input).map_err(|e| QuantizeError::Input(format!("{}: {e}", input.display())))
}

/// What quantizing `input` as a type would make, worked out by llama.cpp's quantizer without
/// quantizing (its dry run): the same per-tensor choices, no data read, nothing written.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// The tensors' bytes in the input, in MiB.
    pub input_mib: f64,
    /// Bits per weight of the input.
    pub input_bpw: f64,
    /// The tensors' bytes in the output, in MiB (the file adds its metadata).
    pub mib: f64,
    /// Bits per weight of the output.
    pub bpw: f64,
    /// Tensors whose rows do not fit the type's blocks, put in another type, and all tensors.
    pub fallbacks: Option<(u32, u32)>,
}

/// llama.cpp's dry run of quantizing `input` as `kind`. A type that needs an importance matrix
/// is estimated without one (the quantizer's choices do not depend on it).
pub fn estimate(
    input: &Path,
    header: &GgufHeader,
    kind: &str,
    options: &Options<'_>,
) -> Result<Estimate, QuantizeError> {
    run(input, header, None, kind, options)?.ok_or_else(|| {
        QuantizeError::Output("llama.cpp's dry run did not report the size it would make".into())
    })
}

/// The input's size in MiB, every part counted.
fn input_mib(input: &Path, header: &GgufHeader) -> Result<f64, QuantizeError> {
    let first = std::fs::metadata(input)
        .map_err(|e| QuantizeError::Input(format!("{}: {e}", input.display())))?
        .len();
    Ok(first.saturating_add(header.parts_bytes) as f64 / MIB)
}

/// The size in MiB of the file an estimate is of, out of an input of `file` MiB: its tensors
/// (llama.cpp's dry run) plus what the input holds besides its tensors (metadata, the
/// vocabulary), which the quantizer copies.
fn made_mib(file: f64, e: &Estimate) -> f64 {
    e.mib + (file - e.input_mib).max(0.0)
}

/// Refuses to quantize `input` into each of `kinds` in `dir` when its file system has less
/// room than the files will take, as llama.cpp's dry run works it out: a quantizer that fills
/// the disk fails only at its end, after most of its time. `what` names the files in the
/// message. A type the dry run cannot size is left out of the sum (the quantizer then says
/// what is wrong with it); where free space cannot be asked, nothing is refused. Returns the
/// bytes the files will take, when the dry run sized them all.
pub fn check_room(
    input: &Path,
    header: &GgufHeader,
    kinds: &[&str],
    options: &Options<'_>,
    dir: &Path,
    what: &str,
) -> Result<Option<u64>, QuantizeError> {
    let file = input_mib(input, header)?;
    let mut each = Vec::new();
    for kind in kinds {
        match estimate(input, header, kind, options) {
            Ok(e) => each.push((*kind, (made_mib(file, &e) * MIB) as u64)),
            Err(e) => tracing::debug!(%kind, error = %e, "no size estimate"),
        }
    }
    let needed = each
        .iter()
        .map(|(_, b)| b)
        .fold(0, |a: u64, b| a.saturating_add(*b));
    let free = match crate::models::store::free_space(dir) {
        Some(free) if needed > free => free,
        _ => return Ok((each.len() == kinds.len()).then_some(needed)),
    };
    let size = crate::client::format::size;
    let each = if each.len() > 1 {
        let list: Vec<String> = each
            .iter()
            .map(|(k, b)| format!("{k} {}", size(*b)))
            .collect();
        format!(" ({})", list.join(", "))
    } else {
        String::new()
    };
    Err(QuantizeError::Output(format!(
        "{what} needs about {}{each} free in {}, and there is {}; nothing was written",
        size(needed),
        dir.display(),
        size(free)
    )))
}

/// A bar of bytes done out of `total` (a spinner without one): written, for [`watched`], or
/// read, for a saved quality reference.
pub(crate) fn progress_bar(total: Option<u64>, message: String) -> ProgressBar {
    let (bar, template) = match total {
        Some(total) => (
            ProgressBar::new(total),
            "{msg} {bar:30} {bytes}/{total_bytes} {elapsed} (eta {eta})",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{spinner} {msg} {bytes} {elapsed}",
        ),
    };
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(message);
    bar
}

/// Runs `work` while `bar` follows how many bytes the files in `writing` hold, up to its
/// length: llama.cpp's quantizer has no progress callback, but it writes each tensor to its
/// file as soon as it is done, so the files' growth is its progress.
fn watched<T>(writing: &[PathBuf], bar: &ProgressBar, work: impl FnOnce() -> T) -> T {
    let (finished, wait) = std::sync::mpsc::channel::<()>();
    let out = std::thread::scope(|s| {
        s.spawn(move || {
            let limit = bar.length().unwrap_or(u64::MAX);
            while let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(PROGRESS_TICK) {
                let written: u64 = writing
                    .iter()
                    .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
                    .sum();
                bar.set_position(written.min(limit));
                bar.tick();
            }
        });
        let out = work();
        drop(finished);
        out
    });
    bar.finish_and_clear();
    out
}

/// How often [`watched`] looks at the files.
const PROGRESS_TICK: Duration = Duration::from_millis(200);

/// `backstop quantize --dry-run IN TYPES`: a markdown table of what each type of the
/// comma-separated `kinds` would make of `input` ([`made_mib`]).
pub fn dry_run(input: &Path, kinds: &str, options: &Options<'_>) -> Result<String, QuantizeError> {
    let kinds: Vec<&'static str> = kinds
        .split(',')
        .map(|k| canonical(k.trim()))
        .collect::<Result<_, _>>()?;
    let header = read_input(input)?;
    let file = input_mib(input, &header)?;
    let mut rows = Vec::new();
    for kind in &kinds {
        rows.push((*kind, estimate(input, &header, kind, options)?));
    }
    let Some((_, first)) = rows.first() else {
        return Err(QuantizeError::Input("no type given".into()));
    };
    let mut out = format!(
        "{}: {file:.2} MiB, {:.2} MiB of it tensors at {:.2} bits per weight\n\n",
        input.display(),
        first.input_mib,
        first.input_bpw
    );
    out += "| type | file | bits per weight | of the input | fallback tensors | note |\n";
    out += "| --- | ---: | ---: | ---: | ---: | --- |\n";
    for (kind, e) in &rows {
        let fallbacks = e
            .fallbacks
            .map_or("0".to_owned(), |(n, of)| format!("{n} of {of}"));
        let note = if options.imatrix.is_none() && needs_imatrix(kind) {
            "needs an importance matrix (--imatrix)"
        } else {
            ""
        };
        let made = made_mib(file, e);
        out += &format!(
            "| {kind} | {made:.2} MiB | {:.2} | {:.2}x | {fallbacks} | {note} |\n",
            e.bpw,
            made / file.max(f64::MIN_POSITIVE)
        );
    }
    Ok(out)
}

/// Bytes in a MiB, as llama.cpp's log counts them.
const MIB: f64 = 1024.0 * 1024.0;

/// Whether the model's weights are already quantized (not F32, F16 or BF16).
fn requantizing(header: &GgufHeader) -> bool {
    !matches!(header.uint("general.file_type").unwrap_or(0), 0 | 1 | 32)
}

/// Runs llama.cpp's quantizer into `output`, or as a dry run where there is none; a dry run
/// returns what the quantizer's log said it would make.
fn run(
    input: &Path,
    header: &GgufHeader,
    output: Option<&Path>,
    kind: &str,
    options: &Options<'_>,
) -> Result<Option<Estimate>, QuantizeError> {
    let imatrix = options.imatrix;
    let target = ftype(kind)?;
    check_prune(header, &options.prune)?;
    let importance = imatrix
        .map(|(m, _)| fitted(m, header, options).map(|(list, _)| list))
        .transpose()?;
    let mut keys = Vec::new();
    if let Some((m, file)) = imatrix {
        keys.push(text_key(
            "quantize.imatrix.file",
            &file.display().to_string(),
        ));
        if let Some(d) = m.datasets.first() {
            keys.push(text_key("quantize.imatrix.dataset", d));
        }
        keys.push(int_key(
            "quantize.imatrix.entries_count",
            m.entries.len() as i64,
        ));
        if m.chunk_count > 0 {
            keys.push(int_key(
                "quantize.imatrix.chunks_count",
                i64::from(m.chunk_count),
            ));
        }
    }
    // The user's last, so a key given both ways is the user's (llama.cpp sets them in order).
    keys.extend(options.overrides.iter().map(|o| match &o.value {
        OverrideValue::Int(v) => int_key(&o.key, i64::from(*v)),
        OverrideValue::Float(v) => float_key(&o.key, *v),
        OverrideValue::Bool(v) => bool_key(&o.key, *v),
        OverrideValue::Str(v) => text_key(&o.key, v),
    }));
    // llama.cpp's list ends with an entry whose key is empty.
    keys.push(int_key("", 0));
    let copy = canonical(kind)? == COPY;
    let requantize = requantizing(header);
    crate::engine::backend().map_err(|e| QuantizeError::Input(e.to_string()))?;
    let c = |p: &Path| {
        CString::new(p.to_string_lossy().as_bytes())
            .map_err(|_| QuantizeError::Output(format!("{}: a path with a NUL byte", p.display())))
    };
    // A dry run writes nothing: the quantizer does not open its output.
    let (inp, tmp) = (c(input)?, c(output.unwrap_or(input))?);
    let names: Vec<CString> = importance
        .iter()
        .flatten()
        .map(|(name, _)| CString::new(name.as_bytes()).unwrap_or_default())
        .collect();
    // llama.cpp's list ends with an entry without a name.
    let list: Option<Vec<llama_cpp_sys_2::llama_model_imatrix_data>> =
        importance.as_ref().map(|m| {
            m.iter()
                .zip(&names)
                .map(
                    |((_, values), name)| llama_cpp_sys_2::llama_model_imatrix_data {
                        name: name.as_ptr(),
                        data: values.as_ptr(),
                        size: values.len(),
                    },
                )
                .chain(std::iter::once(llama_cpp_sys_2::llama_model_imatrix_data {
                    name: std::ptr::null(),
                    data: std::ptr::null(),
                    size: 0,
                }))
                .collect()
        });
    let patterns: Vec<CString> = options
        .tensor_types
        .iter()
        .map(|(p, _)| {
            CString::new(p.as_bytes())
                .map_err(|_| QuantizeError::Input(format!("--tensor-type {p}: a NUL byte")))
        })
        .collect::<Result<_, _>>()?;
    // llama.cpp's list ends with an entry without a pattern.
    let overrides: Vec<llama_cpp_sys_2::llama_model_tensor_override> = patterns
        .iter()
        .zip(&options.tensor_types)
        .map(
            |(p, &(_, t))| llama_cpp_sys_2::llama_model_tensor_override {
                pattern: p.as_ptr(),
                type_: t as llama_cpp_sys_2::ggml_type,
            },
        )
        .chain(std::iter::once(
            llama_cpp_sys_2::llama_model_tensor_override {
                pattern: std::ptr::null(),
                type_: llama_cpp_sys_2::GGML_TYPE_COUNT,
            },
        ))
        .collect();
    // llama.cpp's list ends with -1.
    let prune: Vec<i32> = options
        .prune
        .iter()
        .map(|&n| i32::try_from(n).unwrap_or(i32::MAX))
        .chain(std::iter::once(-1))
        .collect();
    let quiet = QuietTensorWarnings::install(output.is_none());
    // SAFETY: both strings are valid NUL-terminated paths (a dry run's output one is not opened) that outlive the call, and the
    // parameters come from llama.cpp's own defaults with plain fields changed; the importance
    // list (names, values, and its nameless end), the keys (NUL-terminated, ending with an
    // empty one), the tensor type patterns (ending without one) and the layers to prune
    // (sorted, ending with -1) outlive the call. The
    // call reads the input file and writes the output file, and touches nothing of ours.
    let code = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.ftype = target as llama_cpp_sys_2::llama_ftype;
        params.nthread = i32::try_from(options.threads).unwrap_or(1);
        params.pure_ = options.pure;
        params.quantize_output_tensor = !options.leave_output;
        if let Some(t) = options.output_type {
            params.output_tensor_type = t as llama_cpp_sys_2::ggml_type;
        }
        if let Some(t) = options.embedding_type {
            params.token_embedding_type = t as llama_cpp_sys_2::ggml_type;
        }
        if !options.tensor_types.is_empty() {
            params.tt_overrides = overrides.as_ptr();
        }
        params.allow_requantize = requantize;
        params.keep_split = options.keep_split;
        params.only_copy = copy;
        params.dry_run = output.is_none();
        if let Some(list) = &list {
            params.imatrix = list.as_ptr();
        }
        if keys.len() > 1 {
            params.kv_overrides = keys.as_ptr();
        }
        if prune.len() > 1 {
            params.prune_layers = prune.as_ptr();
        }
        llama_cpp_sys_2::llama_model_quantize(inp.as_ptr(), tmp.as_ptr(), &params)
    };
    if code != 0 {
        return Err(QuantizeError::Failed(code));
    }
    Ok(output.is_none().then(|| quiet.estimate()).flatten())
}

/// Checks `--prune-layers` against the model: layers it has, not every one, and no metadata
/// given layer by layer (an array as long as the model has layers, as some architectures give
/// each layer's head count or feed-forward width): llama.cpp's quantizer renumbers the tensors
/// and sets the layer count, but leaves such arrays as they are, describing the layers removed.
fn check_prune(header: &GgufHeader, prune: &[u32]) -> Result<(), QuantizeError> {
    if prune.is_empty() {
        return Ok(());
    }
    let bad = |why: String| QuantizeError::Input(format!("--prune-layers: {why}"));
    let arch = header.architecture();
    let key = format!("{arch}.block_count");
    let layers = header.uint(&key).ok_or_else(|| {
        bad(format!(
            "the model does not say how many layers it has ({key})"
        ))
    })?;
    if let Some(n) = prune.iter().find(|&&n| u64::from(n) >= layers) {
        return Err(bad(format!(
            "the model has no layer {n}: it has {layers}, numbered from 0"
        )));
    }
    if prune.len() as u64 >= layers {
        return Err(bad(format!(
            "that is every one of the model's {layers} layers"
        )));
    }
    let per_layer: Vec<&str> = header
        .metadata
        .iter()
        .filter(|(k, v)| {
            k.strip_prefix(arch).is_some_and(|k| k.starts_with('.'))
                && matches!(v, gguf::GgufValue::Array { len, .. } if *len == layers)
        })
        .map(|(k, _)| k.as_str())
        .collect();
    if !per_layer.is_empty() {
        return Err(bad(format!(
            "the model gives {} layer by layer, and llama.cpp's quantizer would leave that \
             as it is, describing the layers removed",
            per_layer.join(", ")
        )));
    }
    Ok(())
}

/// A key or text value for llama.cpp's override list: at most 127 bytes, NUL-terminated.
fn c_text(text: &str) -> [c_char; 128] {
    let mut out = [0 as c_char; 128];
    for (to, &from) in out.iter_mut().zip(text.as_bytes().iter().take(127)) {
        *to = from as c_char;
    }
    out
}

/// A metadata key for the quantized file, its text cut to llama.cpp's 127 bytes.
fn text_key(key: &str, value: &str) -> llama_cpp_sys_2::llama_model_kv_override {
    llama_cpp_sys_2::llama_model_kv_override {
        tag: llama_cpp_sys_2::LLAMA_KV_OVERRIDE_TYPE_STR,
        key: c_text(key),
        __bindgen_anon_1: llama_cpp_sys_2::llama_model_kv_override__bindgen_ty_1 {
            val_str: c_text(value),
        },
    }
}

/// A float metadata key for the quantized file (written as a 32-bit float).
fn float_key(key: &str, value: f64) -> llama_cpp_sys_2::llama_model_kv_override {
    llama_cpp_sys_2::llama_model_kv_override {
        tag: llama_cpp_sys_2::LLAMA_KV_OVERRIDE_TYPE_FLOAT,
        key: c_text(key),
        __bindgen_anon_1: llama_cpp_sys_2::llama_model_kv_override__bindgen_ty_1 { val_f64: value },
    }
}

/// A boolean metadata key for the quantized file.
fn bool_key(key: &str, value: bool) -> llama_cpp_sys_2::llama_model_kv_override {
    llama_cpp_sys_2::llama_model_kv_override {
        tag: llama_cpp_sys_2::LLAMA_KV_OVERRIDE_TYPE_BOOL,
        key: c_text(key),
        __bindgen_anon_1: llama_cpp_sys_2::llama_model_kv_override__bindgen_ty_1 {
            val_bool: value,
        },
    }
}

/// An integer metadata key for the quantized file (`""` ends llama.cpp's list).
fn int_key(key: &str, value: i64) -> llama_cpp_sys_2::llama_model_kv_override {
    llama_cpp_sys_2::llama_model_kv_override {
        tag: llama_cpp_sys_2::LLAMA_KV_OVERRIDE_TYPE_INT,
        key: c_text(key),
        __bindgen_anon_1: llama_cpp_sys_2::llama_model_kv_override__bindgen_ty_1 { val_i64: value },
    }
}

/// Importance values by weight name, as llama.cpp's quantizer takes them.
type Importance = Vec<(String, Vec<f32>)>;

/// The importance data for `model`'s weights: every matrix of a layer (`blk.*.weight`, two or
/// more dimensions), and the output layer where it has its own, that the matrix has an entry
/// for. An entry of the wrong size means the matrix was made for another model (llama.cpp
/// would throw mid-run); none matching at all, the same. Matrices without an entry are
/// quantized without one, as llama.cpp does. Returned with the number of weight matrices,
/// for the log line that says how much of the model the matrix covers.
fn fitted(
    m: &Imatrix,
    model: &GgufHeader,
    options: &Options<'_>,
) -> Result<(Importance, usize), QuantizeError> {
    let weighed = || {
        model
            .tensors
            .iter()
            .filter(|t| imatrix::is_weighed(&t.name) && t.dims.len() >= 2)
    };
    // A name that matches no weight is a typo, not a choice (llama-quantize says nothing).
    let (filter, include) = match (&options.imatrix_include[..], &options.imatrix_exclude[..]) {
        ([], names) => (names, false),
        (names, _) => (names, true),
    };
    let flag = if include { "include" } else { "exclude" };
    if let Some(name) = filter
        .iter()
        .find(|n| !weighed().any(|t| t.name.contains(n.as_str())))
    {
        return Err(QuantizeError::Input(format!(
            "--{flag}-weights {name}: no weight matrix of this model has it in its name \
             (they are named as blk.0.attn_q.weight, blk.0.ffn_down.weight, output.weight)"
        )));
    }
    let chosen = |name: &str| filter.iter().any(|n| name.contains(n.as_str())) == include;
    let mut out = Vec::new();
    let mut weights = 0;
    let mut left_out = 0;
    for t in weighed() {
        weights += 1;
        let Some(entry) = m.entries.get(&t.name) else {
            continue;
        };
        if !filter.is_empty() && !chosen(&t.name) {
            left_out += 1;
            continue;
        }
        if entry.sums.len() as u64 != imatrix::columns(t) {
            return Err(QuantizeError::Imatrix(format!(
                "the importance matrix has {} values for {}, whose rows need {}: it was made \
                 for another model",
                entry.sums.len(),
                t.name,
                imatrix::columns(t)
            )));
        }
        out.push((t.name.clone(), entry.importance()));
    }
    if out.is_empty() && left_out > 0 {
        return Err(QuantizeError::Input(format!(
            "--{flag}-weights leaves none of the {left_out} weight matrices the importance \
             matrix has an entry for to be quantized with it"
        )));
    }
    if out.is_empty() {
        return Err(QuantizeError::Imatrix(format!(
            "the importance matrix has no entry for any of this model's {weights} weight \
             matrices: it was made for another model"
        )));
    }
    Ok((out, weights))
}

/// While it is held, llama.cpp's per-tensor fallback warnings are left out of the log.
///
/// The quantizer warns twice for each tensor whose rows do not fit the target type's blocks
/// and then sums them up in one line (`180 of 272 tensor(s) required fallback quantization`,
/// SmolLM2 to Q5_K_M); through `llama-cpp-2`'s log bridge that is over 500 lines. This keeps
/// the sum and passes every other message on to the log at its own level. llama-cpp-2 has no
/// per-message filter and `tracing`'s filters cannot see a message's text, so the callback is
/// ours; dropping the guard hands llama.cpp's log back to llama-cpp-2's bridge.
struct QuietTensorWarnings;

/// Whether the fragment before was one of the dropped warnings, still without its newline.
static DROPPING: AtomicBool = AtomicBool::new(false);

/// While a dry run's guard is held, the quantizer's summary lines (sizes, fallbacks), which
/// its C API reports nowhere else.
static SUMMARY: Mutex<Option<Vec<String>>> = Mutex::new(None);

impl QuietTensorWarnings {
    /// With `summary`, the quantizer's summary lines are kept for [`Self::estimate`] too.
    fn install(summary: bool) -> QuietTensorWarnings {
        if summary {
            *SUMMARY.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
        }
        // SAFETY: the callback is a plain function that only reads the string it is given,
        // and takes no user data.
        unsafe { llama_cpp_sys_2::llama_log_set(Some(quiet_log), std::ptr::null_mut()) };
        QuietTensorWarnings
    }

    /// What the summary lines kept say the quantized model would be.
    fn estimate(&self) -> Option<Estimate> {
        let lines = SUMMARY.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        summary(&lines)
    }
}

impl Drop for QuietTensorWarnings {
    fn drop(&mut self) {
        DROPPING.store(false, Ordering::Relaxed);
        *SUMMARY.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Re-installs the bridge with the state it made the first time.
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    }
}

/// Reads the quantizer's summary lines (`llama_model_quantize_impl` in llama.cpp's
/// src/llama-quant.cpp): `model size  =    98.34 MiB (5.80 BPW)`, `quant size  = ...`, and
/// `WARNING: 180 of 272 tensor(s) required fallback quantization`.
fn summary(lines: &[String]) -> Option<Estimate> {
    let size = |what: &str| -> Option<(f64, f64)> {
        let line = lines.iter().find(|l| l.contains(what))?;
        let (_, rest) = line.split_once(what)?.1.split_once('=')?;
        let (mib, rest) = rest.trim().split_once("MiB")?;
        let bpw = rest.trim().strip_prefix('(')?.split_whitespace().next()?;
        Some((mib.trim().parse().ok()?, bpw.parse().ok()?))
    };
    let fallbacks = lines
        .iter()
        .find(|l| l.contains("required fallback quantization"))
        .and_then(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let of = words.iter().position(|w| *w == "of")?;
            Some((
                words.get(of.checked_sub(1)?)?.parse().ok()?,
                words.get(of + 1)?.parse().ok()?,
            ))
        });
    let (input_mib, input_bpw) = size("model size")?;
    let (mib, bpw) = size("quant size")?;
    Some(Estimate {
        input_mib,
        input_bpw,
        mib,
        bpw,
        fallbacks,
    })
}

/// Whether a llama.cpp log fragment is part of a per-tensor fallback warning.
fn per_tensor_fallback(text: &str) -> bool {
    text.contains("not divisible by") || text.contains("falling back to")
}

unsafe extern "C" fn quiet_log(
    level: llama_cpp_sys_2::ggml_log_level,
    text: *const c_char,
    _: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that lives for the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let continues = level == llama_cpp_sys_2::GGML_LOG_LEVEL_CONT;
    if per_tensor_fallback(&text) || (continues && DROPPING.load(Ordering::Relaxed)) {
        DROPPING.store(!text.ends_with('\n'), Ordering::Relaxed);
        return;
    }
    DROPPING.store(false, Ordering::Relaxed);
    let message = text.trim();
    if message.is_empty() {
        return;
    }
    if message.contains(" size  = ") || message.contains("required fallback") {
        if let Some(kept) = SUMMARY.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            kept.push(message.to_owned());
        }
    }
    match level {
        llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR => {
            tracing::error!(target: "llama-cpp-2", "{message}")
        }
        llama_cpp_sys_2::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama-cpp-2", "{message}"),
        llama_cpp_sys_2::GGML_LOG_LEVEL_INFO => tracing::info!(target: "llama-cpp-2", "{message}"),
        _ => tracing::debug!(target: "llama-cpp-2", "{message}"),
    }
}

/// The folder `output` goes in, once it is clear the quantizer's work can be kept: the
/// folder exists, `output` is not a folder, and it is not `input` itself (the quantizer
/// would otherwise run for minutes before the rename fails, or replace the model it read
/// with a lossier copy).
fn check_output<'a>(input: &Path, output: &'a Path) -> Result<&'a Path, QuantizeError> {
    let dir = output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let refuse = |why: &str| {
        Err(QuantizeError::Output(format!(
            "{}: {why}",
            output.display()
        )))
    };
    if !dir.is_dir() {
        return refuse(&format!("the folder {} does not exist", dir.display()));
    }
    if output.is_dir() {
        return refuse("a folder; name the file to write");
    }
    let same = match (std::fs::canonicalize(input), std::fs::canonicalize(output)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return refuse("that is the input; write the quantized model to a new file");
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_takes_layers_the_model_has_and_not_every_one_nor_per_layer_metadata() {
        use gguf::GgufValue;
        let mut h = GgufHeader::default();
        h.metadata.insert(
            "general.architecture".into(),
            GgufValue::Str("llama".into()),
        );
        h.metadata
            .insert("llama.block_count".into(), GgufValue::Uint(4));
        // An array of another length (a rope section list) is not per layer.
        let array = |len| GgufValue::Array { len, items: None };
        h.metadata.insert("llama.rope.sections".into(), array(3));
        let says = |h: &GgufHeader, prune: &[u32]| match check_prune(h, prune) {
            Err(QuantizeError::Input(why)) => why,
            other => panic!("{prune:?}: {other:?}"),
        };
        assert!(check_prune(&h, &[]).is_ok());
        assert!(check_prune(&h, &[0, 3]).is_ok());
        assert_eq!(
            says(&h, &[1, 4]),
            "--prune-layers: the model has no layer 4: it has 4, numbered from 0"
        );
        assert!(says(&h, &[0, 1, 2, 3]).contains("every one of the model's 4 layers"));
        h.metadata
            .insert("llama.attention.head_count".into(), array(4));
        // Another architecture's key of that length is not this model's.
        h.metadata.insert("llamax.sizes".into(), array(4));
        assert_eq!(
            says(&h, &[1]),
            "--prune-layers: the model gives llama.attention.head_count layer by layer, and \
             llama.cpp's quantizer would leave that as it is, describing the layers removed"
        );
        h.metadata.remove("llama.block_count");
        assert!(says(&h, &[1]).contains("how many layers it has (llama.block_count)"));
    }

    #[test]
    fn the_bar_follows_the_files_being_written_up_to_its_length() {
        let dir = std::env::temp_dir().join(format!("backstop-watched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = [dir.join("part-1"), dir.join("part-2")];
        let bar = ProgressBar::hidden();
        bar.set_length(1000);
        let seen = watched(&files, &bar, || {
            std::fs::write(&files[0], [0u8; 300]).unwrap();
            std::fs::write(&files[1], [0u8; 200]).unwrap();
            std::thread::sleep(PROGRESS_TICK * 3);
            let both = bar.position();
            std::fs::write(&files[1], [0u8; 900]).unwrap();
            std::thread::sleep(PROGRESS_TICK * 3);
            (both, bar.position())
        });
        assert_eq!(
            seen,
            (500, 1000),
            "both files, then no more than the length"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_quantizer_s_summary_lines_give_the_estimate() {
        let lines: Vec<String> = [
            "llama_model_quantize_impl: model size  =    98.34 MiB (5.80 BPW)",
            "llama_model_quantize_impl: quant size  =    61.01 MiB (3.80 BPW)",
            "llama_model_quantize_impl: WARNING: 180 of 272 tensor(s) required fallback quantization",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            summary(&lines),
            Some(Estimate {
                input_mib: 98.34,
                input_bpw: 5.80,
                mib: 61.01,
                bpw: 3.80,
                fallbacks: Some((180, 272)),
            })
        );
        // No fallback line: none fell back. No size line: no estimate.
        assert_eq!(summary(&lines[..2]).and_then(|e| e.fallbacks), None);
        assert!(summary(&lines[..2]).is_some());
        assert_eq!(summary(&lines[1..]), None);
    }

    #[test]
    fn override_specs_parse_as_llama_cpp_s_and_refuse_what_it_would_change() {
        let value = |spec: &str| override_kv(spec).map(|o| o.value);
        assert_eq!(
            override_kv("general.name=str:a=b:c").unwrap(),
            Override {
                key: "general.name".into(),
                value: OverrideValue::Str("a=b:c".into()),
            }
        );
        assert_eq!(
            value("k=int:4294967295").unwrap(),
            OverrideValue::Int(u32::MAX)
        );
        assert_eq!(value("k=float:-0.25").unwrap(), OverrideValue::Float(-0.25));
        assert_eq!(value("k=bool:false").unwrap(), OverrideValue::Bool(false));
        assert_eq!(value("k=str:").unwrap(), OverrideValue::Str(String::new()));
        for bad in [
            "k",
            "=int:1",
            "k=int",
            "k=int:-1",
            "k=float:inf",
            "k=bool:1",
            "k=u8:1",
        ] {
            assert!(override_kv(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn type_names_map_to_llama_cpps_numbers() {
        assert_eq!(ftype("Q4_K_M").unwrap(), 15);
        assert_eq!(ftype("q8_0").unwrap(), 7);
        assert_eq!(ftype("mxfp4_moe").unwrap(), 38);
        let e = ftype("Q9_X").unwrap_err().to_string();
        assert!(e.contains("Q6_K"), "{e}");
        // The types that need an importance matrix are types; which they are is apart.
        assert_eq!(ftype("q2_k_s").unwrap(), 21);
        assert_eq!(ftype("IQ2_XXS").unwrap(), 19);
        for t in ["q2_k_s", "IQ2_XXS", "iq2_m", "IQ3_XXS", "IQ1_S"] {
            assert!(needs_imatrix(t), "{t}");
        }
        for t in ["Q2_K", "Q3_K_S", "IQ3_XS", "IQ3_S", "IQ4_XS", "Q4_K_M"] {
            assert!(!needs_imatrix(t), "{t}");
        }
        let e = QuantizeError::NeedsImatrix("Q2_K_S".into()).to_string();
        assert!(e.contains("`Q2_K_S` needs an importance matrix"), "{e}");
        assert!(e.contains("backstop imatrix MODEL -f TEXT"), "{e}");
        // Every name here is one the GGUF reader reports back the same way.
        for (n, t) in TYPES.iter().filter(|(n, _)| *n != COPY) {
            assert_eq!(gguf::file_type_name(u64::from(*t)), Some(*n));
        }
    }
}
