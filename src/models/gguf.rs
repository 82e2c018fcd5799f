//! Reads a GGUF file's header: its metadata keys and the shapes of its tensors, without
//! touching the weights. `/api/tags`, `/api/show` and `backstop list` describe models that
//! are not loaded, so this has to be cheap and must never bring the process down.
//!
//! Hand-rolled rather than going through ggml's `gguf_init_from_file`: the header is a short,
//! documented little-endian format (github.com/ggml-org/ggml/blob/master/docs/gguf.md), and
//! ggml asserts (aborting the process) when a getter is called with the wrong value type,
//! which a corrupt or hostile file could provoke. Here every malformed header is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Longest string accepted in a header; chat templates are the long ones (a few KiB).
const MAX_STRING: u64 = 16 * 1024 * 1024;
/// Arrays longer than this are counted, not kept (token lists have ~10^5 entries).
const KEEP_ARRAY: u64 = 64;
/// More keys or tensors than this means the header is not real.
const MAX_ENTRIES: u64 = 1 << 24;
/// Most dimensions a tensor may have (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("cannot read {0}")]
    Io(#[from] std::io::Error),
    /// Not a GGUF file.
    #[error("not a GGUF file (bad magic bytes)")]
    Magic,
    /// A GGUF version this reader does not know.
    #[error("unsupported GGUF version {0}")]
    Version(u32),
    /// The header contradicts itself (a length or type that cannot be right).
    #[error("corrupt GGUF header: {0}")]
    Corrupt(String),
    /// A part of a split model other than its first, which is the one to give.
    #[error(
        "part {part} of {count} of a model split into several files: give its first part, {}",
        first.display()
    )]
    NotFirstPart {
        /// Which part this is, from 1.
        part: u64,
        /// How many parts the model has.
        count: u64,
        /// Where its first part would be.
        first: PathBuf,
    },
    /// Parts of a split model that are not beside the first.
    #[error(
        "a model split into {count} files, and {} of them {} missing: {}{}",
        missing.len(),
        if missing.len() == 1 { "is" } else { "are" },
        missing.iter().take(5).map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() }
    )]
    MissingParts {
        /// How many parts the model has.
        count: u64,
        /// The parts that are not there.
        missing: Vec<PathBuf>,
    },
    /// A part of a split model whose name does not say which part it is, so the others
    /// cannot be found.
    #[error(
        "part {part} of {count} of a model split into several files, but its name does not \
         end in -{part:05}-of-{count:05}.gguf, so its other parts cannot be found (llama.cpp \
         looks for them by that name)"
    )]
    SplitName {
        /// Which part its header says it is, from 1.
        part: u64,
        /// How many parts its header says the model has.
        count: u64,
    },
    /// Another part of a split model is unreadable or does not belong with the first.
    #[error("{}: {source}", path.display())]
    Part {
        /// The part.
        path: PathBuf,
        /// Why.
        source: Box<GgufError>,
    },
}

impl GgufError {
    /// Whether this is about a split model's parts rather than a header's bytes: a model
    /// llama.cpp cannot load either, for a reason it would say less plainly.
    pub fn is_split(&self) -> bool {
        matches!(
            self,
            Self::NotFirstPart { .. }
                | Self::MissingParts { .. }
                | Self::SplitName { .. }
                | Self::Part { .. }
        )
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// `f32` or `f64`.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string (invalid bytes replaced).
    Str(String),
    /// An array: its length, and its items when it is short enough to keep.
    Array {
        /// Number of elements in the file.
        len: u64,
        /// The elements, if `len` is at most 64.
        items: Option<Vec<GgufValue>>,
    },
}

impl GgufValue {
    /// As JSON, the way Ollama's `model_info` shows values (long arrays as null).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            GgufValue::Uint(v) => Value::from(*v),
            GgufValue::Int(v) => Value::from(*v),
            GgufValue::Float(v) => Value::from(*v),
            GgufValue::Bool(v) => Value::from(*v),
            GgufValue::Str(v) => Value::from(v.as_str()),
            GgufValue::Array {
                items: Some(items), ..
            } => Value::Array(items.iter().map(GgufValue::to_json).collect()),
            GgufValue::Array { items: None, .. } => Value::Null,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::Uint(v) => Some(v),
            GgufValue::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// What a GGUF header says about its model.
#[derive(Debug, Clone, Default)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Every metadata key and value, in key order.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Number of tensors.
    pub tensor_count: u64,
    /// Total elements over all tensors: the parameter count.
    pub parameter_count: u64,
    /// The ggml element types its tensors use (`GGML_TYPE_*`).
    pub tensor_types: BTreeSet<u32>,
    /// Tensors that llama.cpp's converters and quantizer always write as F32 but this file
    /// has in another type: vectors (norms, scales: at most one dimension longer than 1) and
    /// biases. Each is added to or multiplied with F32 activations, and llama.cpp's CPU
    /// kernels for that abort the process on most other types (`binary_op: unsupported
    /// types`), a decode after the file loaded without complaint. In file order.
    pub odd_tensors: Vec<OddTensor>,
    /// Every tensor's name, shape, type and place, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Where the tensors' data starts in the file: the header's end, rounded up to the
    /// file's alignment (`general.alignment`, 32 unless set). A tensor's data starts at
    /// this plus its [`TensorInfo::offset`].
    pub data_start: u64,
    /// A model split over several files, read by [`read`] from its first: the other parts,
    /// in order. Their tensors are in this header's counts and lists (their offsets are in
    /// their own part), and their bytes in [`GgufHeader::parts_bytes`]. Empty for a model in
    /// one file.
    pub parts: Vec<PathBuf>,
    /// The size of [`GgufHeader::parts`] together, in bytes.
    pub parts_bytes: u64,
}

/// A tensor as the header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Its shape, innermost dimension first (ggml's `ne`).
    pub dims: Vec<u64>,
    /// Its ggml element type (`GGML_TYPE_*`).
    pub ggml_type: u32,
    /// Where its data starts, from [`GgufHeader::data_start`].
    pub offset: u64,
}

/// A tensor of [`GgufHeader::odd_tensors`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OddTensor {
    /// Its name, e.g. `blk.0.attn_norm.weight`.
    pub name: String,
    /// Its ggml element type (`GGML_TYPE_*`).
    pub ggml_type: u32,
}

/// ggml's F32 element type.
pub(crate) const GGML_TYPE_F32: u32 = 0;

/// The alignment of a file that does not set `general.alignment` (gguf.md).
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;

/// Whether a tensor of this name and shape is one llama.cpp's own tools keep in F32
/// whatever the file's type (gguf-py writes every 1-D tensor as F32; `llama-quantize`
/// quantizes only matrices and leaves biases alone).
fn kept_in_f32(name: &str, dims: &[u64]) -> bool {
    dims.iter().filter(|&&d| d > 1).count() <= 1 || name.ends_with(".bias")
}

impl GgufHeader {
    /// A string value.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(GgufValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer value.
    pub fn uint(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(GgufValue::as_u64)
    }

    /// `general.architecture`, e.g. `llama` or `gemma3`.
    pub fn architecture(&self) -> &str {
        self.str("general.architecture").unwrap_or("unknown")
    }

    /// The training context length (`<arch>.context_length`).
    pub fn context_length(&self) -> Option<u64> {
        self.uint(&format!("{}.context_length", self.architecture()))
    }

    /// The quantization, named as llama.cpp's quantizer names it (`Q4_K_M`), from
    /// `general.file_type`.
    pub fn quantization(&self) -> String {
        match self.uint("general.file_type") {
            Some(t) => file_type_name(t).map_or_else(|| format!("type {t}"), str::to_owned),
            None => "unknown".to_owned(),
        }
    }

    /// The parameter count in Ollama's short form: `134.52M`, `8.0B`.
    pub fn parameter_size(&self) -> String {
        human_count(self.parameter_count)
    }
}

/// llama.cpp's `llama_ftype` names (include/llama.h).
pub fn file_type_name(t: u64) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// `134515008` → `134.52M`; `8030261248` → `8.0B`; small counts as they are.
pub fn human_count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.2}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

/// Reads the header of the GGUF file at `path`. The first part of a model split over
/// several files (`NAME-00001-of-00003.gguf`, as llama-gguf-split and llama-quantize's
/// `--keep-split` write them, and as large models are published) is read with its other parts,
/// which must be beside it under the same name, as llama.cpp loads them: the header describes
/// the whole model. Any other part is refused with the first part's name.
pub fn read(path: &Path) -> Result<GgufHeader, GgufError> {
    let mut header = read_file(path)?;
    let count = header.uint(SPLIT_COUNT).unwrap_or(1);
    if count > 1 {
        join_parts(path, &mut header, count)?;
    }
    Ok(header)
}

/// The split keys that llama-gguf-split writes into every part (`LLM_KV_SPLIT_*`).
const SPLIT_NO: &str = "split.no";
const SPLIT_COUNT: &str = "split.count";
const SPLIT_TENSORS: &str = "split.tensors.count";

/// The name llama.cpp gives part `index` (from 0) of `count` (`llama_split_path`).
pub(crate) fn split_suffix(index: u64, count: u64) -> String {
    format!("-{:05}-of-{count:05}.gguf", index + 1)
}

/// A split model's name without its part's number, and how many parts it has:
/// `m-00001-of-00003` gives `m` and 3 (a file name without `.gguf`); `None` where the name is
/// not a part's.
pub fn split_name(stem: &str) -> Option<(&str, u64)> {
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit());
    let (head, total) = stem.rsplit_once("-of-")?;
    let (prefix, part) = head.rsplit_once('-')?;
    if !digits(part) {
        return None;
    }
    Some((prefix, total.parse().ok().filter(|&n| n > 0)?))
}

/// Adds the other parts of the split model whose first part `header` is (read from `path`).
fn join_parts(path: &Path, header: &mut GgufHeader, count: u64) -> Result<(), GgufError> {
    let index = header.uint(SPLIT_NO).unwrap_or(0);
    // llama.cpp keeps both in 16 bits.
    if count > u64::from(u16::MAX) || index >= count {
        return Err(GgufError::Corrupt(format!(
            "{SPLIT_NO} {index} and {SPLIT_COUNT} {count} are no part of a split model"
        )));
    }
    let prefix = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(&split_suffix(index, count)))
        .ok_or(GgufError::SplitName {
            part: index + 1,
            count,
        })?
        .to_owned();
    let part = |i: u64| path.with_file_name(format!("{prefix}{}", split_suffix(i, count)));
    if index != 0 {
        return Err(GgufError::NotFirstPart {
            part: index + 1,
            count,
            first: part(0),
        });
    }
    let missing: Vec<PathBuf> = (1..count).map(part).filter(|p| !p.is_file()).collect();
    if !missing.is_empty() {
        return Err(GgufError::MissingParts { count, missing });
    }
    for i in 1..count {
        let path = part(i);
        let wrap = |source: GgufError| GgufError::Part {
            path: path.clone(),
            source: Box::new(source),
        };
        let p = read_file(&path).map_err(wrap)?;
        if p.uint(SPLIT_NO) != Some(i) || p.uint(SPLIT_COUNT) != Some(count) {
            return Err(wrap(GgufError::Corrupt(format!(
                "it does not say it is part {} of {count}",
                i + 1
            ))));
        }
        header.tensor_count = header.tensor_count.saturating_add(p.tensor_count);
        header.parameter_count = header.parameter_count.saturating_add(p.parameter_count);
        header.tensor_types.extend(p.tensor_types);
        header.odd_tensors.extend(p.odd_tensors);
        header.tensors.extend(p.tensors);
        header.parts_bytes = header
            .parts_bytes
            .saturating_add(std::fs::metadata(&path).map_err(|e| wrap(e.into()))?.len());
        header.parts.push(path);
    }
    match header.uint(SPLIT_TENSORS) {
        Some(n) if n != header.tensor_count => Err(GgufError::Corrupt(format!(
            "the first part says the model has {n} tensors, and its {count} parts hold {}",
            header.tensor_count
        ))),
        _ => Ok(()),
    }
}

/// Reads the header of this one file: a split model's part alone.
pub fn read_file(path: &Path) -> Result<GgufHeader, GgufError> {
    let file = File::open(path)?;
    parse(&mut BufReader::with_capacity(64 * 1024, file))
}

/// Reads a header from any byte stream positioned at the start of a GGUF file.
pub fn parse(r: &mut impl Read) -> Result<GgufHeader, GgufError> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).map_err(|_| GgufError::Magic)?;
    if &magic != b"GGUF" {
        return Err(GgufError::Magic);
    }
    let mut counted = Counted { r, read: 4 };
    let mut h = Header { r: &mut counted };
    let version = h.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let tensor_count = h.count("tensor count")?;
    let kv_count = h.count("metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = h.string()?;
        let kind = h.u32()?;
        let value = h.value(kind, 0)?;
        metadata.insert(key, value);
    }
    let mut parameter_count: u64 = 0;
    let mut tensor_types = BTreeSet::new();
    let mut odd_tensors = Vec::new();
    let mut tensors = Vec::new();
    for _ in 0..tensor_count {
        let name = h.string()?;
        let n_dims = h.u32()?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::Corrupt(format!(
                "a tensor with {n_dims} dimensions"
            )));
        }
        let mut dims = [0u64; MAX_DIMS as usize];
        for d in dims.iter_mut().take(n_dims as usize) {
            *d = h.u64()?;
        }
        let dims = &dims[..n_dims as usize];
        let ggml_type = h.u32()?;
        tensor_types.insert(ggml_type);
        if ggml_type != GGML_TYPE_F32 && kept_in_f32(&name, dims) {
            odd_tensors.push(OddTensor {
                name: name.clone(),
                ggml_type,
            });
        }
        let offset = h.u64()?;
        let elements = dims.iter().fold(1u64, |n, &d| n.saturating_mul(d));
        parameter_count = parameter_count.saturating_add(elements);
        tensors.push(TensorInfo {
            name,
            dims: dims.to_vec(),
            ggml_type,
            offset,
        });
    }
    let alignment = match metadata.get("general.alignment") {
        Some(GgufValue::Uint(a)) if *a > 0 => *a,
        _ => DEFAULT_ALIGNMENT,
    };
    let data_start = counted.read.div_ceil(alignment).saturating_mul(alignment);
    Ok(GgufHeader {
        version,
        metadata,
        tensor_count,
        parameter_count,
        tensor_types,
        odd_tensors,
        tensors,
        data_start,
        parts: Vec::new(),
        parts_bytes: 0,
    })
}

/// A reader that counts the bytes read through it: where the header ends.
struct Counted<'a, R: Read> {
    r: &'a mut R,
    read: u64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// The little-endian primitives of the header.
struct Header<'a, R: Read> {
    r: &'a mut R,
}

impl<R: Read> Header<'_, R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(truncated)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn count(&mut self, what: &str) -> Result<u64, GgufError> {
        let n = self.u64()?;
        if n > MAX_ENTRIES {
            return Err(GgufError::Corrupt(format!("{what} of {n}")));
        }
        Ok(n)
    }

    fn string_len(&mut self) -> Result<u64, GgufError> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(GgufError::Corrupt(format!("a string of {len} bytes")));
        }
        Ok(len)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.string_len()?;
        let mut buf = Vec::with_capacity(len as usize);
        self.r
            .by_ref()
            .take(len)
            .read_to_end(&mut buf)
            .map_err(truncated)?;
        if buf.len() as u64 != len {
            return Err(truncated_err());
        }
        Ok(String::from_utf8(buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        let skipped =
            std::io::copy(&mut self.r.by_ref().take(n), &mut std::io::sink()).map_err(truncated)?;
        if skipped != n {
            return Err(truncated_err());
        }
        Ok(())
    }

    /// Reads a value of GGUF type `kind`. `depth` guards against nested arrays without end.
    fn value(&mut self, kind: u32, depth: u8) -> Result<GgufValue, GgufError> {
        Ok(match kind {
            0 => GgufValue::Uint(u64::from(u8::from_le_bytes(self.bytes()?))),
            1 => GgufValue::Int(i64::from(i8::from_le_bytes(self.bytes()?))),
            2 => GgufValue::Uint(u64::from(u16::from_le_bytes(self.bytes()?))),
            3 => GgufValue::Int(i64::from(i16::from_le_bytes(self.bytes()?))),
            4 => GgufValue::Uint(u64::from(self.u32()?)),
            5 => GgufValue::Int(i64::from(i32::from_le_bytes(self.bytes()?))),
            6 => GgufValue::Float(f64::from(f32::from_le_bytes(self.bytes()?))),
            7 => GgufValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(GgufError::Corrupt("arrays nested too deeply".into()));
                }
                let item = self.u32()?;
                let len = self.count("array length")?;
                if len <= KEEP_ARRAY {
                    let items = (0..len)
                        .map(|_| self.value(item, depth + 1))
                        .collect::<Result<Vec<_>, _>>()?;
                    GgufValue::Array {
                        len,
                        items: Some(items),
                    }
                } else {
                    match fixed_size(item) {
                        Some(size) => self.skip(len.saturating_mul(size))?,
                        None => {
                            for _ in 0..len {
                                self.value(item, depth + 1)?;
                            }
                        }
                    }
                    GgufValue::Array { len, items: None }
                }
            }
            10 => GgufValue::Uint(self.u64()?),
            11 => GgufValue::Int(i64::from_le_bytes(self.bytes()?)),
            12 => GgufValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(GgufError::Corrupt(format!("unknown value type {other}"))),
        })
    }
}

/// Byte size of a fixed-size GGUF value type.
fn fixed_size(kind: u32) -> Option<u64> {
    match kind {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn truncated_err() -> GgufError {
    GgufError::Corrupt("the header ends early (truncated file)".into())
}

fn truncated(e: std::io::Error) -> GgufError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        truncated_err()
    } else {
        GgufError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a small GGUF header in memory.
    struct Builder {
        kv: Vec<u8>,
        kv_count: u64,
        tensors: Vec<u8>,
        tensor_count: u64,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                kv: vec![],
                kv_count: 0,
                tensors: vec![],
                tensor_count: 0,
            }
        }
        fn str_bytes(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        fn key(&mut self, k: &str, kind: u32) {
            Self::str_bytes(&mut self.kv, k);
            self.kv.extend(kind.to_le_bytes());
            self.kv_count += 1;
        }
        fn string(mut self, k: &str, v: &str) -> Self {
            self.key(k, 8);
            Self::str_bytes(&mut self.kv, v);
            self
        }
        fn u32(mut self, k: &str, v: u32) -> Self {
            self.key(k, 4);
            self.kv.extend(v.to_le_bytes());
            self
        }
        fn u16(mut self, k: &str, v: u16) -> Self {
            self.key(k, 2);
            self.kv.extend(v.to_le_bytes());
            self
        }
        fn i32(mut self, k: &str, v: i32) -> Self {
            self.key(k, 5);
            self.kv.extend(v.to_le_bytes());
            self
        }
        fn f32(mut self, k: &str, v: f32) -> Self {
            self.key(k, 6);
            self.kv.extend(v.to_le_bytes());
            self
        }
        fn str_array(mut self, k: &str, items: &[&str]) -> Self {
            self.key(k, 9);
            self.kv.extend(8u32.to_le_bytes());
            self.kv.extend((items.len() as u64).to_le_bytes());
            for i in items {
                Self::str_bytes(&mut self.kv, i);
            }
            self
        }
        fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32) -> Self {
            Self::str_bytes(&mut self.tensors, name);
            self.tensors.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.tensors.extend(d.to_le_bytes());
            }
            self.tensors.extend(ggml_type.to_le_bytes());
            self.tensors.extend(0u64.to_le_bytes());
            self.tensor_count += 1;
            self
        }
        fn build(self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(3u32.to_le_bytes());
            out.extend(self.tensor_count.to_le_bytes());
            out.extend(self.kv_count.to_le_bytes());
            out.extend(self.kv);
            out.extend(self.tensors);
            out
        }
    }

    #[test]
    fn metadata_and_parameter_count_are_read() {
        let bytes = Builder::new()
            .string("general.architecture", "llama")
            .u32("general.file_type", 3)
            .u32("llama.context_length", 8192)
            .f32("llama.rope.freq_base", 10000.0)
            .tensor("token_embd.weight", &[576, 49152], 8)
            .tensor("blk.0.attn_q.weight", &[576, 576], 3)
            .tensor("output_norm.weight", &[576], 0)
            .build();
        let h = parse(&mut bytes.as_slice()).unwrap();
        assert_eq!(h.architecture(), "llama");
        assert_eq!(h.quantization(), "Q4_1");
        assert_eq!(h.context_length(), Some(8192));
        assert_eq!(h.parameter_count, 576 * 49152 + 576 * 576 + 576);
        assert_eq!(h.parameter_size(), "28.64M");
        assert_eq!(h.tensor_types, BTreeSet::from([0, 3, 8]));
        assert_eq!(h.metadata["llama.rope.freq_base"].to_json(), 10000.0);
        assert!(h.odd_tensors.is_empty());
    }

    #[test]
    fn vectors_and_biases_in_a_type_other_than_f32_are_odd() {
        let bytes = Builder::new()
            .tensor("token_embd.weight", &[576, 49152], 8)
            .tensor("blk.0.attn_norm.weight", &[576], 1)
            .tensor("blk.0.attn_q.weight", &[576, 576], 1)
            .tensor("blk.0.attn_q.bias", &[576], 0)
            .tensor("blk.0.ffn_up_exps.bias", &[2880, 32], 30)
            .tensor("blk.0.time_mix_lerp_x", &[576, 1, 1], 26)
            .tensor("output_norm.weight", &[576], 0)
            .build();
        let h = parse(&mut bytes.as_slice()).unwrap();
        let odd: Vec<(&str, u32)> = h
            .odd_tensors
            .iter()
            .map(|t| (t.name.as_str(), t.ggml_type))
            .collect();
        // A matrix in F16 is ordinary; an F32 vector or bias is too.
        assert_eq!(
            odd,
            [
                ("blk.0.attn_norm.weight", 1),
                ("blk.0.ffn_up_exps.bias", 30),
                ("blk.0.time_mix_lerp_x", 26)
            ]
        );
    }

    #[test]
    fn long_arrays_are_counted_not_kept() {
        let many: Vec<String> = (0..100).map(|i| format!("tok{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let bytes = Builder::new()
            .str_array("tokenizer.ggml.tokens", &many)
            .str_array("general.tags", &["a", "b"])
            .u32("after", 7)
            .build();
        let h = parse(&mut bytes.as_slice()).unwrap();
        assert_eq!(
            h.metadata["tokenizer.ggml.tokens"],
            GgufValue::Array {
                len: 100,
                items: None
            }
        );
        assert_eq!(
            h.metadata["general.tags"].to_json(),
            serde_json::json!(["a", "b"])
        );
        assert_eq!(h.uint("after"), Some(7));
    }

    #[test]
    fn a_truncated_header_is_an_error_not_a_panic() {
        let bytes = Builder::new()
            .string("general.architecture", "llama")
            .tensor("t", &[4, 4], 0)
            .build();
        for cut in 0..bytes.len() {
            assert!(parse(&mut &bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn absurd_lengths_are_refused_without_allocating() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        bytes.extend(1u64.to_le_bytes());
        bytes.extend(u64::MAX.to_le_bytes()); // key length
        let err = parse(&mut bytes.as_slice()).unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn wrong_magic_and_version_are_named() {
        assert!(matches!(
            parse(&mut &b"GGML...."[..]),
            Err(GgufError::Magic)
        ));
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(9u32.to_le_bytes());
        assert!(matches!(
            parse(&mut bytes.as_slice()),
            Err(GgufError::Version(9))
        ));
    }

    /// Part `index` (from 0) of a model split into `count` files, with one tensor of `rows`
    /// rows and `tensors` (the model's total) in the first.
    fn part(index: u16, count: u16, rows: u64, tensors: i32) -> Vec<u8> {
        let b = Builder::new();
        let b = if index == 0 {
            b.string("general.architecture", "llama")
                .u32("general.file_type", 3)
        } else {
            b
        };
        b.u16("split.no", index)
            .u16("split.count", count)
            .i32("split.tensors.count", tensors)
            .tensor(&format!("blk.{index}.ffn_up.weight"), &[8, rows], 3)
            .build()
    }

    #[test]
    fn a_split_model_is_read_whole_from_its_first_part() {
        let dir =
            std::env::temp_dir().join(format!("backstop-gguf-split-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let name = |i: u64| dir.join(format!("m-{:05}-of-00003.gguf", i));
        let parts = [part(0, 3, 1, 3), part(1, 3, 2, 3), part(2, 3, 4, 3)];
        for (i, bytes) in parts.iter().enumerate() {
            std::fs::write(name(i as u64 + 1), bytes).unwrap();
        }
        let h = read(&name(1)).unwrap();
        assert_eq!(h.quantization(), "Q4_1");
        assert_eq!(h.tensor_count, 3);
        assert_eq!(h.parameter_count, 8 * (1 + 2 + 4));
        assert_eq!(h.tensors.len(), 3);
        assert_eq!(h.tensors[2].name, "blk.2.ffn_up.weight");
        assert_eq!(h.parts, [name(2), name(3)]);
        assert_eq!(h.parts_bytes, (parts[1].len() + parts[2].len()) as u64);

        // Another part names the first.
        let e = read(&name(2)).unwrap_err();
        assert!(
            matches!(&e, GgufError::NotFirstPart { part: 2, count: 3, first } if *first == name(1)),
            "{e}"
        );
        assert!(e.is_split());
        // A part that does not say it is the part its name says.
        std::fs::write(name(3), part(1, 3, 4, 3)).unwrap();
        let e = read(&name(1)).unwrap_err();
        assert!(
            e.to_string().contains("does not say it is part 3 of 3"),
            "{e}"
        );
        assert!(
            e.to_string().starts_with(&name(3).display().to_string()),
            "{e}"
        );
        // Tensors other than the first part counts.
        std::fs::write(name(3), part(2, 3, 4, 3)).unwrap();
        std::fs::write(name(1), part(0, 3, 1, 4)).unwrap();
        let e = read(&name(1)).unwrap_err();
        assert!(
            e.to_string()
                .contains("says the model has 4 tensors, and its 3 parts hold 3"),
            "{e}"
        );
        std::fs::write(name(1), part(0, 3, 1, 3)).unwrap();
        // A missing part is named.
        std::fs::remove_file(name(3)).unwrap();
        let e = read(&name(1)).unwrap_err();
        assert!(
            matches!(&e, GgufError::MissingParts { count: 3, missing } if *missing == [name(3)]),
            "{e}"
        );
        assert!(e.to_string().contains("1 of them is missing"), "{e}");
        // Many missing: the first few are named.
        let lone = dir.join("t-00001-of-00010.gguf");
        std::fs::write(&lone, part(0, 10, 1, 10)).unwrap();
        let e = read(&lone).unwrap_err().to_string();
        assert!(e.contains("9 of them are missing"), "{e}");
        assert!(e.contains("t-00006-of-00010.gguf and 4 more"), "{e}");
        // Split keys that cannot be right.
        let odd = dir.join("odd-00001-of-00003.gguf");
        for (no, count) in [(3, 3), (0, u64::from(u16::MAX) + 1)] {
            let bytes = Builder::new()
                .u32("split.no", no as u32)
                .u32("split.count", count as u32)
                .build();
            std::fs::write(&odd, bytes).unwrap();
            let e = read(&odd).unwrap_err();
            assert!(
                e.to_string().contains(&format!(
                    "split.no {no} and split.count {count} are no part"
                )),
                "{e}"
            );
        }
        // A first part renamed: the others cannot be found.
        let renamed = dir.join("m.gguf");
        std::fs::rename(name(1), &renamed).unwrap();
        let e = read(&renamed).unwrap_err();
        assert!(
            matches!(e, GgufError::SplitName { part: 1, count: 3 }),
            "{e}"
        );
        assert!(e.to_string().contains("-00001-of-00003.gguf"), "{e}");
        // A model in one file has no parts.
        std::fs::write(&renamed, Builder::new().u32("general.file_type", 3).build()).unwrap();
        let h = read(&renamed).unwrap();
        assert!(h.parts.is_empty() && h.parts_bytes == 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn human_counts_match_ollamas_style() {
        assert_eq!(human_count(134_515_008), "134.52M");
        assert_eq!(human_count(8_030_261_248), "8.0B");
        assert_eq!(human_count(999), "999");
    }
}
