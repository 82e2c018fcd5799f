//! `backstop quantize IN OUT TYPE`: llama.cpp's own quantizer (`llama_model_quantize`, which
//! the `llama-cpp-sys-2` crate exposes and `llama-cpp-2` does not wrap), so a quantization
//! ladder can be built from one model and benchmarked without any download. The output is
//! written under a temporary name and renamed only when the quantizer succeeded.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::imatrix::Imatrix;
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
];

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

/// Quantizes `input` to `output` as `kind`, as `options` say. Requantizing an already
/// quantized model is allowed, with a warning: quality drops more than quantizing from F16.
pub fn quantize(
    input: &Path,
    output: &Path,
    kind: &str,
    options: &Options<'_>,
) -> Result<(), QuantizeError> {
    let imatrix = options.imatrix;
    let target = ftype(kind)?;
    if imatrix.is_none() && needs_imatrix(kind) {
        return Err(QuantizeError::NeedsImatrix(canonical(kind)?.to_owned()));
    }
    let header =
        gguf::read(input).map_err(|e| QuantizeError::Input(format!("{}: {e}", input.display())))?;
    let dir = check_output(input, output)?;
    let importance = imatrix.map(|(m, _)| fitted(m, &header)).transpose()?;
    // llama.cpp's list ends with an entry whose key is empty.
    let keys: Option<Vec<llama_cpp_sys_2::llama_model_kv_override>> = imatrix.map(|(m, file)| {
        let mut keys = vec![text_key(
            "quantize.imatrix.file",
            &file.display().to_string(),
        )];
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
        keys.push(int_key("", 0));
        keys
    });
    let source = header.uint("general.file_type").unwrap_or(0);
    let requantize = !matches!(source, 0 | 1 | 32);
    if requantize {
        tracing::warn!(
            from = %header.quantization(),
            to = gguf::file_type_name(u64::from(target)).unwrap_or(kind),
            "requantizing an already quantized model: quality drops more than quantizing from F16/BF16"
        );
    }
    crate::engine::backend().map_err(|e| QuantizeError::Input(e.to_string()))?;
    let temp = dir.join(format!(
        ".{}.partial-{}",
        output
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("out.gguf"),
        std::process::id()
    ));
    let c = |p: &Path| {
        CString::new(p.to_string_lossy().as_bytes())
            .map_err(|_| QuantizeError::Output(format!("{}: a path with a NUL byte", p.display())))
    };
    let (inp, tmp) = (c(input)?, c(&temp)?);
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
    let _quiet = QuietTensorWarnings::install();
    // SAFETY: both strings are valid NUL-terminated paths that outlive the call, and the
    // parameters come from llama.cpp's own defaults with plain fields changed; the importance
    // list (names, values, and its nameless end), the keys (NUL-terminated, ending with an
    // empty one) and the tensor type patterns (ending without one) outlive the call. The
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
        if let Some(list) = &list {
            params.imatrix = list.as_ptr();
        }
        if let Some(keys) = &keys {
            params.kv_overrides = keys.as_ptr();
        }
        llama_cpp_sys_2::llama_model_quantize(inp.as_ptr(), tmp.as_ptr(), &params)
    };
    if code != 0 {
        let _ = std::fs::remove_file(&temp);
        return Err(QuantizeError::Failed(code));
    }
    std::fs::rename(&temp, output).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        QuantizeError::Output(format!("{}: {e}", output.display()))
    })
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

/// An integer metadata key for the quantized file (`""` ends llama.cpp's list).
fn int_key(key: &str, value: i64) -> llama_cpp_sys_2::llama_model_kv_override {
    llama_cpp_sys_2::llama_model_kv_override {
        tag: llama_cpp_sys_2::LLAMA_KV_OVERRIDE_TYPE_INT,
        key: c_text(key),
        __bindgen_anon_1: llama_cpp_sys_2::llama_model_kv_override__bindgen_ty_1 { val_i64: value },
    }
}

/// The importance data for `model`'s weights: every matrix of a layer (`blk.*.weight`, two or
/// more dimensions) the matrix has an entry for. An entry of the wrong size means the matrix
/// was made for another model (llama.cpp would throw mid-run); none matching at all, the same.
/// Matrices without an entry are quantized without one, as llama.cpp does, and counted in the
/// log line that says how much of the model the matrix covers.
fn fitted(m: &Imatrix, model: &GgufHeader) -> Result<Vec<(String, Vec<f32>)>, QuantizeError> {
    let mut out = Vec::new();
    let mut weights = 0;
    for t in &model.tensors {
        if !(t.name.starts_with("blk.") && t.name.ends_with(".weight") && t.dims.len() >= 2) {
            continue;
        }
        weights += 1;
        let Some(entry) = m.entries.get(&t.name) else {
            continue;
        };
        let values = entry.importance();
        let want = t.dims[0].saturating_mul(t.dims.get(2).copied().unwrap_or(1));
        if values.len() as u64 != want {
            return Err(QuantizeError::Imatrix(format!(
                "the importance matrix has {} values for {}, whose rows need {want}: it was made \
                 for another model",
                values.len(),
                t.name
            )));
        }
        out.push((t.name.clone(), values));
    }
    if out.is_empty() {
        return Err(QuantizeError::Imatrix(format!(
            "the importance matrix has no entry for any of this model's {weights} weight \
             matrices: it was made for another model"
        )));
    }
    tracing::info!(
        "quantizing with an importance matrix for {} of {weights} weight matrices",
        out.len()
    );
    Ok(out)
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

impl QuietTensorWarnings {
    fn install() -> QuietTensorWarnings {
        // SAFETY: the callback is a plain function that only reads the string it is given,
        // and takes no user data.
        unsafe { llama_cpp_sys_2::llama_log_set(Some(quiet_log), std::ptr::null_mut()) };
        QuietTensorWarnings
    }
}

impl Drop for QuietTensorWarnings {
    fn drop(&mut self) {
        DROPPING.store(false, Ordering::Relaxed);
        // Re-installs the bridge with the state it made the first time.
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    }
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
        for (n, t) in TYPES {
            assert_eq!(gguf::file_type_name(u64::from(*t)), Some(*n));
        }
    }
}
