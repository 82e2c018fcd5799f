//! `backstop imatrix MODEL -f TEXT`: an importance matrix for llama.cpp's quantizer, and the
//! reading of one for `backstop quantize --imatrix`.
//!
//! The quantizer weighs each weight's rounding error by how large the activations it
//! multiplies are, when it knows: for every weight matrix, the mean square of each input
//! column over a calibration text. The 1- and 2-bit i-quants (and IQ3_XXS, Q2_K_S) are refused
//! without one, and every low-bit type loses less quality with one. llama.cpp computes it with
//! its `llama-imatrix` tool, which the `llama-cpp-sys-2` crate does not build; this reads the
//! text through the model the way that tool does (chunks of `--chunk` tokens, each from an empty
//! cache, starting with BOS where the model wants one) and watches every matrix product with a
//! weight of a layer (`blk.*`) through llama.cpp's graph callback (`cb_eval`).
//!
//! Files are written in llama.cpp's GGUF imatrix format (tensors `NAME.in_sum2`, the sums of
//! squares, and `NAME.counts`, the rows summed; keys `imatrix.datasets`, `imatrix.chunk_count`,
//! `imatrix.chunk_size`), so llama.cpp's `llama-quantize --imatrix` reads them; both that format
//! and the older `.dat` one (the tool's `--output-format dat`, and most published files before
//! 2025) are read. The facts of both formats are from llama.cpp's `tools/imatrix` and
//! `common/imatrix-loader.cpp`; the code is ours.
//!
//! Written against `llama-cpp-sys-2` directly: `llama-cpp-2` neither exposes the graph callback
//! nor hands out the raw model and context pointers a context with one needs.
//!
//! A mixture of experts' expert tensors are multiplied through `MUL_MAT_ID`: each token's row
//! goes to the sums of each expert its router picked, and each expert counts its own rows (the
//! `counts` tensor then has one per expert), as llama-imatrix keeps them.

use std::collections::BTreeMap;
use std::ffi::{c_void, CStr, CString};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::models::gguf;

/// Why an importance matrix could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
    /// A file given could not be used.
    #[error("{0}")]
    Input(String),
    /// llama.cpp could not load or run the model.
    #[error("{0}")]
    Model(String),
    /// The output could not be written.
    #[error("{0}")]
    Output(String),
    /// Stopped (Ctrl-C) before the first chunk was read.
    #[error("stopped before the first chunk was read; nothing was written")]
    Stopped,
}

/// One weight tensor's statistics, as llama.cpp's GGUF format keeps them.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Per input column of each matrix of the tensor (one for a plain weight), the sum of
    /// the squared activations multiplied with it: `counts.len()` runs of equal length.
    pub sums: Vec<f32>,
    /// Rows (tokens) summed, per matrix.
    pub counts: Vec<f32>,
}

impl Entry {
    /// What the quantizer takes: each column's mean square (1 where a matrix saw no rows,
    /// as llama.cpp's loader does).
    pub fn importance(&self) -> Vec<f32> {
        let n = self.counts.len().max(1);
        let width = self.sums.len() / n;
        let mut out = Vec::with_capacity(self.sums.len());
        for (m, run) in self.sums.chunks(width.max(1)).enumerate() {
            let count = self.counts.get(m).copied().unwrap_or(0.0);
            out.extend(
                run.iter()
                    .map(|&s| if count > 0.0 { s / count } else { 1.0 }),
            );
        }
        out
    }
}

/// An importance matrix: an entry per weight tensor, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Imatrix {
    /// Entries by tensor name (`blk.0.attn_q.weight`).
    pub entries: BTreeMap<String, Entry>,
    /// The calibration texts it was computed on.
    pub datasets: Vec<String>,
    /// Chunks read.
    pub chunk_count: u32,
    /// Tokens per chunk (0 where a legacy file does not say).
    pub chunk_size: u32,
    /// Read from the legacy `.dat` format, whose entries hold means times a call count
    /// rather than sums and rows; [`Imatrix::merge`] scales them back.
    pub legacy: bool,
}

/// Whether a weight tensor's statistics are taken and used: a layer's weights (`blk.*`), and
/// the output layer where it is its own tensor (llama-imatrix's `--process-output`).
pub fn is_weighed(name: &str) -> bool {
    (name.starts_with("blk.") || name == "output.weight") && name.ends_with(".weight")
}

/// How many values statistics for tensor `t` hold: one per input column of each of its
/// matrices (an expert tensor's third dimension).
pub fn columns(t: &gguf::TensorInfo) -> u64 {
    let first = t.dims.first().copied().unwrap_or(0);
    t.dims
        .iter()
        .skip(2)
        .fold(first, |n, &d| n.saturating_mul(d))
}

/// Most entries, and values per entry, a file may hold: far above any real model's.
const MAX_ENTRIES: usize = 1 << 20;
const MAX_VALUES: usize = 1 << 28;

impl Imatrix {
    /// Reads a GGUF imatrix, or the older `.dat` format.
    pub fn read(path: &Path) -> Result<Imatrix, ImatrixError> {
        let bad = |e: String| ImatrixError::Input(format!("{}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let mut magic = [0u8; 4];
        let gguf = file.read_exact(&mut magic).is_ok() && &magic == b"GGUF";
        file.seek(SeekFrom::Start(0))
            .map_err(|e| bad(e.to_string()))?;
        let m = if gguf {
            read_gguf(&mut file)
        } else {
            read_legacy(&mut BufReader::new(file))
        }
        .map_err(bad)?;
        if m.entries.is_empty() {
            return Err(bad("no importance data in it".into()));
        }
        for (name, e) in &m.entries {
            if e.counts.is_empty() || e.sums.is_empty() || e.sums.len() % e.counts.len() != 0 {
                return Err(bad(format!(
                    "{name}: {} sums for {} matrices",
                    e.sums.len(),
                    e.counts.len()
                )));
            }
            if !e.sums.iter().chain(&e.counts).all(|v| v.is_finite()) {
                return Err(bad(format!("{name}: a value that is not finite")));
            }
        }
        Ok(m)
    }

    /// Writes it in llama.cpp's GGUF imatrix format, under a temporary name renamed into
    /// place once complete.
    pub fn write(&self, path: &Path) -> Result<(), ImatrixError> {
        let mut bytes = Vec::new();
        self.write_gguf(&mut bytes)
            .map_err(|e| ImatrixError::Output(format!("{}: {e}", path.display())))?;
        crate::models::store::write_atomically(path, &bytes)
            .map_err(|e| ImatrixError::Output(e.to_string()))
    }

    /// Adds `other`'s statistics to these, as llama-imatrix's `--in-file` does: sums and rows
    /// add up, entries only one side has are kept, the datasets are listed in order and the
    /// chunks counted together (a text listed by both, once). A legacy file's means are scaled
    /// back to sums over `chunk` tokens per call, as llama.cpp scales them with its context
    /// size. A tensor whose values differ in number is an error: the two were made for
    /// different models.
    pub fn merge(&mut self, other: Imatrix, chunk: u32) -> Result<(), String> {
        let scale = if other.legacy {
            chunk.max(1) as f32
        } else {
            1.0
        };
        for (name, mut e) in other.entries {
            if scale != 1.0 {
                e.sums.iter_mut().for_each(|v| *v *= scale);
                e.counts.iter_mut().for_each(|v| *v *= scale);
            }
            let Some(have) = self.entries.get_mut(&name) else {
                self.entries.insert(name, e);
                continue;
            };
            if have.sums.len() != e.sums.len() {
                return Err(format!(
                    "{name} has {} values there and {} in the files before it: they were made \
                     for different models",
                    e.sums.len(),
                    have.sums.len()
                ));
            }
            // One count (a legacy file's, or a tensor seen as one matrix) goes to every matrix
            // of a side that counts per expert.
            if have.counts.len() == 1 && e.counts.len() > 1 {
                have.counts = vec![have.counts[0]; e.counts.len()];
            }
            if e.counts.len() == 1 && have.counts.len() > 1 {
                e.counts = vec![e.counts[0]; have.counts.len()];
            }
            if have.counts.len() != e.counts.len() {
                return Err(format!(
                    "{name} has {} matrices there and {} in the files before it",
                    e.counts.len(),
                    have.counts.len()
                ));
            }
            have.sums.iter_mut().zip(&e.sums).for_each(|(a, b)| *a += b);
            have.counts
                .iter_mut()
                .zip(&e.counts)
                .for_each(|(a, b)| *a += b);
        }
        // A text named twice (a run resumed, or two runs over parts of one text) is one text.
        for d in other.datasets {
            if !self.datasets.contains(&d) {
                self.datasets.push(d);
            }
        }
        self.chunk_count = self.chunk_count.saturating_add(other.chunk_count);
        if self.chunk_size == 0 {
            self.chunk_size = other.chunk_size;
        }
        Ok(())
    }

    /// Checks that every entry is statistics for a weight of `model`, of its shape; returns
    /// how many of the model's weighed tensors it covers, and how many there are.
    pub fn check(&self, model: &gguf::GgufHeader) -> Result<(usize, usize), String> {
        let tensors: BTreeMap<&str, &gguf::TensorInfo> = model
            .tensors
            .iter()
            .filter(|t| is_weighed(&t.name) && t.dims.len() >= 2)
            .map(|t| (t.name.as_str(), t))
            .collect();
        for (name, e) in &self.entries {
            match tensors.get(name.as_str()) {
                Some(t) if e.sums.len() as u64 == columns(t) => {}
                Some(t) => {
                    return Err(format!(
                        "it has {} values for {name}, whose rows need {}: it was made for \
                         another model",
                        e.sums.len(),
                        columns(t)
                    ))
                }
                None => {
                    return Err(format!(
                        "it has an entry for {name}, which is not a weight of this model: it \
                         was made for another model"
                    ))
                }
            }
        }
        Ok((self.entries.len(), tensors.len()))
    }

    /// The GGUF bytes (gguf.md, version 3): four keys, then two F32 tensors per entry.
    /// Hand-written: ggml's writer wants every tensor in a ggml context first, and the
    /// format's few value types here are simple.
    fn write_gguf(&self, w: &mut impl Write) -> std::io::Result<()> {
        let align = gguf::DEFAULT_ALIGNMENT as usize;
        let mut tensors: Vec<(String, [u64; 2], &[f32])> = Vec::new();
        for (name, e) in &self.entries {
            let n = e.counts.len() as u64;
            let width = e.sums.len() as u64 / n.max(1);
            tensors.push((format!("{name}.in_sum2"), [width, n], &e.sums));
            tensors.push((format!("{name}.counts"), [1, n], &e.counts));
        }
        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&4u64.to_le_bytes());
        let put = |h: &mut Vec<u8>, s: &str| {
            h.extend_from_slice(&(s.len() as u64).to_le_bytes());
            h.extend_from_slice(s.as_bytes());
        };
        const STRING: u32 = 8;
        const ARRAY: u32 = 9;
        const U32: u32 = 4;
        put(&mut h, "general.type");
        h.extend_from_slice(&STRING.to_le_bytes());
        put(&mut h, "imatrix");
        put(&mut h, "imatrix.datasets");
        h.extend_from_slice(&ARRAY.to_le_bytes());
        h.extend_from_slice(&STRING.to_le_bytes());
        h.extend_from_slice(&(self.datasets.len() as u64).to_le_bytes());
        for d in &self.datasets {
            put(&mut h, d);
        }
        for (key, value) in [
            ("imatrix.chunk_count", self.chunk_count),
            ("imatrix.chunk_size", self.chunk_size),
        ] {
            put(&mut h, key);
            h.extend_from_slice(&U32.to_le_bytes());
            h.extend_from_slice(&value.to_le_bytes());
        }
        let padded = |n: usize| n.div_ceil(align) * align;
        let mut offset = 0usize;
        for (name, dims, data) in &tensors {
            put(&mut h, name);
            h.extend_from_slice(&2u32.to_le_bytes());
            for d in dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&gguf::GGML_TYPE_F32.to_le_bytes());
            h.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += padded(data.len() * 4);
        }
        h.resize(padded(h.len()), 0);
        w.write_all(&h)?;
        for (_, _, data) in &tensors {
            for v in data.iter() {
                w.write_all(&v.to_le_bytes())?;
            }
            w.write_all(&vec![0u8; padded(data.len() * 4) - data.len() * 4])?;
        }
        Ok(())
    }
}

fn read_gguf(file: &mut std::fs::File) -> Result<Imatrix, String> {
    let header = gguf::parse(&mut BufReader::new(&mut *file)).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut m = Imatrix {
        chunk_count: header.uint("imatrix.chunk_count").unwrap_or(0) as u32,
        chunk_size: header.uint("imatrix.chunk_size").unwrap_or(0) as u32,
        ..Imatrix::default()
    };
    if let Some(gguf::GgufValue::Array {
        items: Some(items), ..
    }) = header.metadata.get("imatrix.datasets")
    {
        m.datasets = items
            .iter()
            .filter_map(|v| match v {
                gguf::GgufValue::Str(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
    }
    let mut sums: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut counts: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for t in &header.tensors {
        let (base, into) = if let Some(b) = t.name.strip_suffix(".in_sum2") {
            (b, &mut sums)
        } else if let Some(b) = t.name.strip_suffix(".counts") {
            (b, &mut counts)
        } else {
            continue;
        };
        if t.ggml_type != gguf::GGML_TYPE_F32 {
            return Err(format!("{}: not F32", t.name));
        }
        let n = t.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let n = n
            .filter(|&n| n as usize <= MAX_VALUES)
            .ok_or_else(|| format!("{}: too many values", t.name))? as usize;
        let start = header.data_start.saturating_add(t.offset);
        if start.saturating_add(n as u64 * 4) > len {
            return Err(format!("{}: past the end of the file", t.name));
        }
        file.seek(SeekFrom::Start(start))
            .map_err(|e| e.to_string())?;
        let mut bytes = vec![0u8; n * 4];
        file.read_exact(&mut bytes).map_err(|e| e.to_string())?;
        let values = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        into.insert(base.to_owned(), values);
    }
    for (name, s) in sums {
        let c = counts
            .remove(&name)
            .ok_or_else(|| format!("{name}: sums without counts"))?;
        m.entries.insert(name, Entry { sums: s, counts: c });
    }
    if let Some(name) = counts.keys().next() {
        return Err(format!("{name}: counts without sums"));
    }
    Ok(m)
}

/// The `.dat` format: an i32 entry count; per entry an i32 name length, the name, an i32
/// call count, an i32 value count and the values (mean squares times the call count); then,
/// optionally, an i32 chunk count and an i32-length-prefixed dataset name.
fn read_legacy(r: &mut impl Read) -> Result<Imatrix, String> {
    let not = || "neither a GGUF imatrix nor a legacy .dat one".to_owned();
    let i32_ = |r: &mut dyn Read| -> Option<i32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok().map(|()| i32::from_le_bytes(b))
    };
    let n = i32_(r).ok_or_else(not)?;
    if n < 1 || n as usize > MAX_ENTRIES {
        return Err(not());
    }
    let mut m = Imatrix::default();
    for _ in 0..n {
        let len = i32_(r).ok_or_else(not)?;
        if !(1..=4096).contains(&len) {
            return Err(not());
        }
        let mut name = vec![0u8; len as usize];
        r.read_exact(&mut name).map_err(|_| not())?;
        let name = String::from_utf8(name).map_err(|_| not())?;
        let ncall = i32_(r).ok_or_else(not)?;
        let nval = i32_(r).ok_or_else(not)?;
        if nval < 1 || nval as usize > MAX_VALUES {
            return Err(not());
        }
        let mut bytes = vec![0u8; nval as usize * 4];
        r.read_exact(&mut bytes)
            .map_err(|_| "truncated".to_owned())?;
        let sums = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // The values are already means times `ncall`: dividing by it again gives the means.
        let counts = vec![ncall.max(0) as f32];
        m.entries.insert(name, Entry { sums, counts });
    }
    m.legacy = true;
    if let Some(chunks) = i32_(r) {
        m.chunk_count = chunks.max(0) as u32;
        if let Some(len) = i32_(r).filter(|l| (1..=4096).contains(l)) {
            let mut name = vec![0u8; len as usize];
            if r.read_exact(&mut name).is_ok() {
                m.datasets.push(String::from_utf8_lossy(&name).into_owned());
            }
        }
    }
    Ok(m)
}

/// What `backstop imatrix` reads and how.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// The model (F16/BF16 ideally, as the model to be quantized).
    pub model: &'a Path,
    /// The calibration text.
    pub text: &'a Path,
    /// Tokens per chunk.
    pub chunk: usize,
    /// Chunks of the text to pass over first (llama-imatrix's `--from-chunk`): where an
    /// earlier run stopped.
    pub from_chunk: usize,
    /// Most chunks to read (all the text gives when `None`).
    pub chunks: Option<usize>,
    /// CPU threads.
    pub threads: u32,
    /// Statistics the text's are added to (`--in-file`, merged).
    pub start: Imatrix,
    /// Whether the output layer's inputs are gathered too (`output.weight`, where the model
    /// has its own).
    pub process_output: bool,
    /// Whether the text's perplexity is scored.
    pub perplexity: bool,
    /// Whether special tokens written in the text (`<|im_start|>`) are read as those tokens,
    /// as a chat template makes them, rather than as their letters.
    pub parse_special: bool,
    /// Where the matrix goes; it is also written there every `save_every` chunks.
    pub output: &'a Path,
    /// Chunks between the writes of the matrix so far to `output` (none when 0).
    pub save_every: usize,
    /// Chunks between copies of the matrix so far kept as `OUTPUT.at_N` (none when 0).
    pub keep_every: usize,
    /// Set to stop after the chunk being read (Ctrl-C): the statistics of the chunks read so
    /// far are returned as a whole run's are.
    pub stop: Option<&'a AtomicBool>,
}

/// The statistics of `files`, merged in order, each checked against `model`'s weights where
/// one is given.
pub fn combine(
    model: Option<&Path>,
    files: &[std::path::PathBuf],
    chunk: u32,
) -> Result<Imatrix, ImatrixError> {
    let header = model
        .map(|m| gguf::read(m).map_err(|e| ImatrixError::Input(format!("{}: {e}", m.display()))))
        .transpose()?;
    let mut all = Imatrix::default();
    for f in files {
        let m = Imatrix::read(f)?;
        let bad = |e: String| ImatrixError::Input(format!("{}: {e}", f.display()));
        if let Some(header) = &header {
            let (covered, of) = m.check(header).map_err(bad)?;
            tracing::info!(
                chunks = m.chunk_count,
                "{}: statistics for {covered} of the model's {of} weight matrices",
                f.display()
            );
        }
        all.merge(m, chunk).map_err(bad)?;
    }
    Ok(all)
}

/// A weight's running sums while the text is read.
struct Sums {
    /// Per matrix of the tensor (its third and fourth dimensions, or its experts), per input
    /// column.
    sums: Vec<f64>,
    /// Rows seen: one count for a plain weight, whose every matrix sees every row (as
    /// llama.cpp writes it); one per expert for a mixture's expert tensor.
    rows: Vec<u64>,
}

/// What the graph callback gathers; it is called on the thread that runs `llama_decode`.
#[derive(Default)]
struct Collector {
    /// Whether `output.weight` is gathered too.
    process_output: bool,
    /// Whether the output layer's product is left out (no perplexity wanted, so nothing reads
    /// the logits): [`crate::engine::skip_output_product`].
    skip_output: bool,
    /// Output layers left out.
    skipped: u64,
    weights: BTreeMap<String, Sums>,
    /// Activations copied from a device's memory.
    scratch: Vec<u8>,
    /// The first thing that went wrong in the callback.
    failed: Option<String>,
}

/// The weight's own name in a tensor name the scheduler may have decorated with a backend
/// and a copy number (`CUDA0#blk.0.attn_q.weight#0`).
fn weight_name(name: &str) -> &str {
    match name.split_once('#') {
        Some((_, rest)) => rest.split_once('#').map_or(rest, |(n, _)| n),
        None => name,
    }
}

/// A tensor's shape and strides (ggml's `ne` and `nb`).
#[derive(Debug, Clone, Copy)]
struct Shape {
    ne: [usize; 4],
    nb: [usize; 4],
}

impl Shape {
    fn of(t: &llama_cpp_sys_2::ggml_tensor) -> Shape {
        Shape {
            ne: t.ne.map(|n| n.max(0) as usize),
            nb: t.nb,
        }
    }
}

/// The F32 row of `width` values at byte `at` of `data`.
fn row(data: &[u8], at: usize, width: usize) -> Result<impl Iterator<Item = f32> + '_, String> {
    let bytes = data
        .get(at..at + width * 4)
        .ok_or("a row past the tensor's end")?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])))
}

/// Adds a plain product's activations (`data`, of shape `x`) to its weight's sums: each row
/// to the matrix (of the weight's `(third, fourth)` dimensions) it is multiplied with.
fn add_dense(
    sums: &mut Sums,
    data: &[u8],
    x: Shape,
    (w2, w3): (usize, usize),
) -> Result<(), String> {
    let width = x.ne[0];
    for i3 in 0..x.ne[3] {
        for i2 in 0..x.ne[2] {
            let m = (i3 % w3) * w2 + (i2 % w2);
            let acc = &mut sums.sums[m * width..(m + 1) * width];
            for r in 0..x.ne[1] {
                let values = row(data, r * x.nb[1] + i2 * x.nb[2] + i3 * x.nb[3], width)?;
                for (s, v) in acc.iter_mut().zip(values) {
                    *s += f64::from(v) * f64::from(v);
                }
            }
        }
    }
    sums.rows[0] += (x.ne[1] * x.ne[2] * x.ne[3] / (w2 * w3)) as u64;
    Ok(())
}

/// Adds a routed product's activations to its expert tensor's sums: for each token (the
/// third dimension of `x`) and each of its picks (`ids`, `[picks, tokens]` of I32, not
/// contiguous), the token's row for that pick (or its one row, shared by all picks) to the
/// picked expert's sums, counting a row for that expert.
fn add_routed(sums: &mut Sums, data: &[u8], x: Shape, ids: &[u8], id: Shape) -> Result<(), String> {
    let (width, experts) = (x.ne[0], sums.rows.len());
    if id.ne[1] != x.ne[2] {
        return Err(format!(
            "{} tokens of picks for {} of activations",
            id.ne[1], x.ne[2]
        ));
    }
    for token in 0..x.ne[2] {
        for pick in 0..id.ne[0] {
            let at = token * id.nb[1] + pick * id.nb[0];
            let b = ids
                .get(at..at + 4)
                .ok_or("an expert id past the ids' end")?;
            let expert = i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            let e = usize::try_from(expert)
                .ok()
                .filter(|&e| e < experts)
                .ok_or_else(|| format!("expert {expert} of {experts}"))?;
            let values = row(
                data,
                (pick % x.ne[1].max(1)) * x.nb[1] + token * x.nb[2],
                width,
            )?;
            for (s, v) in sums.sums[e * width..(e + 1) * width].iter_mut().zip(values) {
                *s += f64::from(v) * f64::from(v);
            }
            sums.rows[e] += 1;
        }
    }
    Ok(())
}

impl Collector {
    /// Whether `t` is a product with a layer's weight whose activations are F32: a plain one
    /// (`MUL_MAT`) or a mixture's product with the experts its router picked (`MUL_MAT_ID`).
    ///
    /// # Safety
    /// `t` must be a live tensor of the graph being computed.
    unsafe fn wants(&self, t: &llama_cpp_sys_2::ggml_tensor) -> Option<String> {
        let routed = t.op == llama_cpp_sys_2::GGML_OP_MUL_MAT_ID;
        if !(t.op == llama_cpp_sys_2::GGML_OP_MUL_MAT || routed)
            || t.src[0].is_null()
            || t.src[1].is_null()
            || (routed && t.src[2].is_null())
        {
            return None;
        }
        // SAFETY: the sources of a live node are live tensors.
        let (w, x) = unsafe { (&*t.src[0], &*t.src[1]) };
        if x.type_ != llama_cpp_sys_2::GGML_TYPE_F32 {
            return None;
        }
        // SAFETY: ggml keeps a tensor's name NUL-terminated within its array.
        let name = unsafe { CStr::from_ptr(w.name.as_ptr()) }.to_string_lossy();
        let name = weight_name(&name);
        (name.starts_with("blk.") || (self.process_output && name == "output.weight"))
            .then(|| name.to_owned())
    }

    /// Adds the activations of a computed product to its weight's sums.
    ///
    /// # Safety
    /// `t` must be a computed node of the graph being computed, as the callback is given it.
    unsafe fn gather(
        &mut self,
        t: &llama_cpp_sys_2::ggml_tensor,
        name: String,
    ) -> Result<(), String> {
        // SAFETY: as in `wants`.
        let (w, x) = unsafe { (&*t.src[0], &*t.src[1]) };
        let width = usize::try_from(x.ne[0]).map_err(|_| "a negative shape")?;
        if x.nb[0] != 4 {
            return Err(format!(
                "{name}: activations with a stride of {} bytes",
                x.nb[0]
            ));
        }
        // SAFETY: a computed tensor's bytes are `ggml_nbytes` long, in host memory when its
        // buffer says so, else copied out of the device's.
        let bytes = unsafe { llama_cpp_sys_2::ggml_nbytes(x) };
        let host =
            x.buffer.is_null() || unsafe { llama_cpp_sys_2::ggml_backend_buffer_is_host(x.buffer) };
        let base: *const u8 = if host {
            x.data as *const u8
        } else {
            self.scratch.resize(bytes, 0);
            // SAFETY: the scratch holds `bytes` bytes.
            unsafe {
                llama_cpp_sys_2::ggml_backend_tensor_get(
                    x,
                    self.scratch.as_mut_ptr().cast(),
                    0,
                    bytes,
                )
            };
            self.scratch.as_ptr()
        };
        if base.is_null() {
            return Err(format!("{name}: activations without data"));
        }
        // SAFETY: `base` holds the tensor's `bytes` bytes, read-only while the callback runs.
        let data = unsafe { std::slice::from_raw_parts(base, bytes) };
        let x_shape = Shape::of(x);
        if t.op == llama_cpp_sys_2::GGML_OP_MUL_MAT_ID {
            // SAFETY: a routed product's third source is its router's picks, a live tensor.
            let ids = unsafe { &*t.src[2] };
            if ids.type_ != llama_cpp_sys_2::GGML_TYPE_I32 {
                return Err(format!("{name}: expert ids that are not I32"));
            }
            // Small, and not contiguous: copied whole, wherever it lives.
            // SAFETY: the buffer holds the tensor's `ggml_nbytes` bytes.
            let picks = unsafe {
                let n = llama_cpp_sys_2::ggml_nbytes(ids);
                let mut picks = vec![0u8; n];
                llama_cpp_sys_2::ggml_backend_tensor_get(ids, picks.as_mut_ptr().cast(), 0, n);
                picks
            };
            let experts = w.ne[2].max(1) as usize;
            let sums = self.weights.entry(name.clone()).or_insert_with(|| Sums {
                sums: vec![0.0; width * experts],
                rows: vec![0; experts],
            });
            if sums.sums.len() != width * experts || sums.rows.len() != experts {
                return Err(format!("{name}: activations of another width"));
            }
            return add_routed(sums, data, x_shape, &picks, Shape::of(ids))
                .map_err(|e| format!("{name}: {e}"));
        }
        let (w2, w3) = (w.ne[2].max(1) as usize, w.ne[3].max(1) as usize);
        let sums = self.weights.entry(name.clone()).or_insert_with(|| Sums {
            sums: vec![0.0; width * w2 * w3],
            rows: vec![0],
        });
        if sums.sums.len() != width * w2 * w3 {
            return Err(format!("{name}: activations of another width"));
        }
        add_dense(sums, data, x_shape, (w2, w3)).map_err(|e| format!("{name}: {e}"))
    }

    /// The entries gathered so far.
    fn entries(&self) -> BTreeMap<String, Entry> {
        self.weights
            .iter()
            .map(|(name, s)| {
                let entry = Entry {
                    sums: s.sums.iter().map(|&v| v as f32).collect(),
                    counts: s.rows.iter().map(|&r| r as f32).collect(),
                };
                (name.clone(), entry)
            })
            .collect()
    }
}

/// llama.cpp's graph callback: asked first whether a node is wanted, then given each wanted
/// one once computed. Returning false from the second call stops the graph.
unsafe extern "C" fn observe(
    t: *mut llama_cpp_sys_2::ggml_tensor,
    ask: bool,
    data: *mut c_void,
) -> bool {
    if t.is_null() || data.is_null() {
        return !ask;
    }
    // A panic must not unwind into C.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `data` is the collector `compute` made for this context, used only from
        // the decoding thread, and `t` a node of the graph being computed.
        let (collector, t) = unsafe { (&mut *data.cast::<Collector>(), &mut *t) };
        // SAFETY: asked before `t` is computed.
        if ask && collector.skip_output && unsafe { crate::engine::skip_output_product(t) } {
            collector.skipped += 1;
        }
        let Some(name) = (unsafe { collector.wants(t) }) else {
            return !ask;
        };
        if ask {
            return true;
        }
        // SAFETY: as above; llama.cpp calls with `ask` false only once `t` is computed.
        match unsafe { collector.gather(t, name) } {
            Ok(()) => true,
            Err(e) => {
                collector.failed.get_or_insert(e);
                false
            }
        }
    }))
    .unwrap_or(false)
}

/// Most bytes of logits one decode of `compute` asks for: a row of the vocabulary per token
/// (Gemma 3's 262,144 tokens make 1 MiB a row).
const LOGIT_BYTES: usize = 256 << 20;

/// A `llama_batch` of one sequence with an output at every position, freed on drop.
struct Batch(llama_cpp_sys_2::llama_batch, usize);

impl Batch {
    fn new(capacity: usize) -> Batch {
        // SAFETY: allocates room for `capacity` tokens of one sequence each.
        Batch(
            unsafe { llama_cpp_sys_2::llama_batch_init(capacity as i32, 0, 1) },
            capacity,
        )
    }

    /// Puts `tokens` at positions from `first`, the first replaced by `bos` where given.
    fn fill(&mut self, tokens: &[llama_cpp_sys_2::llama_token], first: usize, bos: Option<i32>) {
        let b = &mut self.0;
        let n = tokens.len().min(self.1);
        for (i, &t) in tokens.iter().take(n).enumerate() {
            let token = if i == 0 { bos.unwrap_or(t) } else { t };
            // SAFETY: `i` is below the capacity `llama_batch_init` allocated each array for,
            // and each `seq_id[i]` holds one sequence id.
            unsafe {
                *b.token.add(i) = token;
                *b.pos.add(i) = (first + i) as i32;
                *b.n_seq_id.add(i) = 1;
                *(*b.seq_id.add(i)) = 0;
                *b.logits.add(i) = 1;
            }
        }
        b.n_tokens = n as i32;
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: made by `llama_batch_init`, freed once.
        unsafe { llama_cpp_sys_2::llama_batch_free(self.0) }
    }
}

/// Frees a model on drop.
struct Model(*mut llama_cpp_sys_2::llama_model);

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: a model loaded by `llama_model_load_from_file`, freed once, after its context.
        unsafe { llama_cpp_sys_2::llama_model_free(self.0) }
    }
}

/// Frees a context on drop.
struct Context(*mut llama_cpp_sys_2::llama_context);

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: a context made by `llama_init_from_model`, freed once.
        unsafe { llama_cpp_sys_2::llama_free(self.0) }
    }
}

/// What `compute` found.
#[derive(Debug, Clone)]
pub struct Computed {
    /// The importance matrix.
    pub imatrix: Imatrix,
    /// The model's perplexity of the text, scored as llama-imatrix scores it (the second half
    /// of each chunk): a check that the text and the model make sense together. `None` where
    /// the plan did not ask for it.
    pub perplexity: Option<f64>,
    /// Chunks of the text read by this run.
    pub chunks: usize,
    /// Whether the run was stopped ([`Plan::stop`]) before the chunks it meant to read.
    pub stopped: bool,
}

/// Reads the text through the model and returns its importance matrix.
pub fn compute(plan: &Plan<'_>) -> Result<Computed, ImatrixError> {
    let header = gguf::read(plan.model)
        .map_err(|e| ImatrixError::Input(format!("{}: {e}", plan.model.display())))?;
    let text = std::fs::read(plan.text)
        .map_err(|e| ImatrixError::Input(format!("{}: {e}", plan.text.display())))?;
    let text = String::from_utf8(text)
        .map_err(|_| ImatrixError::Input(format!("{}: not UTF-8 text", plan.text.display())))?;
    if plan.process_output && !header.tensors.iter().any(|t| t.name == "output.weight") {
        tracing::warn!(
            "--process-output: this model has no output.weight; its output layer is its token \
             embeddings (token_embd.weight), which llama-imatrix does not gather either"
        );
    }
    if plan.chunk < 16 {
        return Err(ImatrixError::Input(
            "--chunk must be at least 16 tokens".into(),
        ));
    }
    crate::engine::backend().map_err(|e| ImatrixError::Model(e.to_string()))?;
    // A file llama.cpp loads but cannot compute is refused with its reason, as `bench` does,
    // rather than aborting the process at the first decode.
    crate::engine::probe::check_file(plan.model, Some(0), &header.odd_tensors)
        .map_err(|e| ImatrixError::Model(e.to_string()))?;
    let path = CString::new(plan.model.to_string_lossy().as_bytes())
        .map_err(|_| ImatrixError::Input("a model path with a NUL byte".into()))?;
    // SAFETY: default parameters with plain fields changed; the path outlives the call.
    let model = Model(unsafe {
        let mut p = llama_cpp_sys_2::llama_model_default_params();
        // The weights stay in host memory, where every product's inputs can be read.
        p.n_gpu_layers = 0;
        llama_cpp_sys_2::llama_model_load_from_file(path.as_ptr(), p)
    });
    if model.0.is_null() {
        return Err(ImatrixError::Model(format!(
            "llama.cpp could not load {} (its log above says why)",
            plan.model.display()
        )));
    }
    // SAFETY: a loaded model's vocabulary lives as long as the model.
    let vocab = unsafe { llama_cpp_sys_2::llama_model_get_vocab(model.0) };
    let tokens = tokenize(vocab, &text, plan.parse_special)?;
    let chunk = plan.chunk;
    let available = tokens.len() / chunk;
    if available == 0 {
        return Err(ImatrixError::Input(format!(
            "{}: {} tokens, fewer than one chunk of {chunk}; give a longer text or a smaller --chunk",
            plan.text.display(),
            tokens.len()
        )));
    }
    let left = available.saturating_sub(plan.from_chunk);
    if left == 0 {
        return Err(ImatrixError::Input(format!(
            "{}: {available} chunks of {chunk} tokens; --from-chunk {} leaves none to read",
            plan.text.display(),
            plan.from_chunk
        )));
    }
    let chunks = plan.chunks.map_or(left, |n| n.min(left));
    // Without the perplexity nothing reads the logits, and the output layer's product is
    // left out (for Gemma 3's 262,144-token vocabulary, most of a chunk's work); kept where
    // its input is gathered, which the product's no-op would leave as it is, but which no test
    // model can show (theirs is their token embeddings).
    let collector = Box::into_raw(Box::new(Collector {
        process_output: plan.process_output,
        skip_output: !plan.perplexity && !plan.process_output,
        ..Collector::default()
    }));
    // Owned again whatever happens below, and only after the context is gone.
    struct Owned(*mut Collector);
    impl Drop for Owned {
        fn drop(&mut self) {
            // SAFETY: made by `Box::into_raw` above, taken back once.
            drop(unsafe { Box::from_raw(self.0) });
        }
    }
    let owned = Owned(collector);
    let threads = i32::try_from(plan.threads).unwrap_or(1);
    let n = u32::try_from(chunk).map_err(|_| ImatrixError::Input("--chunk is too large".into()))?;
    // SAFETY: a plain query of a live vocabulary.
    let n_vocab = usize::try_from(unsafe { llama_cpp_sys_2::llama_vocab_n_tokens(vocab) })
        .map_err(|_| ImatrixError::Model("a vocabulary of negative size".into()))?;
    // Every position is an output, as llama-imatrix asks: otherwise the last layer multiplies
    // only the rows whose logits are wanted. A chunk is read in one decode where its logits
    // fit `LOGIT_BYTES` (SmolLM2's 512 rows: 96 MiB), else in parts of whole multiples of 64
    // rows that do (Gemma 3's: 256 rows). Read in halves, SmolLM2's text took llama-imatrix
    // 0.94x-0.98x as long as backstop; read whole, 1.01x-1.03x.
    let fit = (LOGIT_BYTES / (n_vocab.max(1) * 4)) / 64 * 64;
    let part = n.min(u32::try_from(fit.max(64)).unwrap_or(u32::MAX));
    // SAFETY: default parameters with plain fields changed; the callback's data outlives the
    // context (`owned` is dropped after `ctx`, being declared before it).
    let ctx = Context(unsafe {
        let mut p = llama_cpp_sys_2::llama_context_default_params();
        p.n_ctx = n;
        p.n_batch = part;
        p.n_ubatch = part;
        p.n_seq_max = 1;
        p.n_threads = threads;
        p.n_threads_batch = threads;
        p.no_perf = true;
        p.cb_eval = Some(observe);
        p.cb_eval_user_data = owned.0.cast();
        llama_cpp_sys_2::llama_init_from_model(model.0, p)
    });
    if ctx.0.is_null() {
        return Err(ImatrixError::Model(format!(
            "llama.cpp could not make a context of {chunk} tokens for {} (its log above says why)",
            plan.model.display()
        )));
    }
    // SAFETY: plain queries of a live vocabulary.
    let (bos, add_bos) = unsafe {
        (
            llama_cpp_sys_2::llama_vocab_bos(vocab),
            llama_cpp_sys_2::llama_vocab_get_add_bos(vocab),
        )
    };
    let mut batch = Batch::new(part as usize);
    let (mut nll, mut scored) = (0f64, 0usize);
    let bar = ProgressBar::new(chunks as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} chunks of {msg} tokens, {elapsed} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(chunk.to_string());
    bar.enable_steady_tick(Duration::from_millis(250));
    // The statistics so far, added to the ones the run started from.
    let so_far = |c: &Collector, done: usize| -> Result<Imatrix, ImatrixError> {
        let mut m = plan.start.clone();
        let read = Imatrix {
            entries: c.entries(),
            datasets: vec![plan.text.display().to_string()],
            chunk_count: done as u32,
            chunk_size: n,
            legacy: false,
        };
        m.merge(read, n).map_err(ImatrixError::Input)?;
        Ok(m)
    };
    let started = Instant::now();
    let texts = tokens
        .chunks_exact(chunk)
        .skip(plan.from_chunk)
        .take(chunks);
    let stopping = || plan.stop.is_some_and(|s| s.load(Ordering::Relaxed));
    let mut read = 0;
    for (done, tokens) in (1..).zip(texts) {
        if stopping() {
            break;
        }
        // SAFETY: a live context.
        unsafe {
            llama_cpp_sys_2::llama_memory_clear(llama_cpp_sys_2::llama_get_memory(ctx.0), true)
        };
        for (i, rows) in tokens.chunks(part as usize).enumerate() {
            let first = i * part as usize;
            batch.fill(rows, first, (add_bos && first == 0).then_some(bos));
            // SAFETY: a live context, and a batch filled within its capacity.
            let rc = unsafe { llama_cpp_sys_2::llama_decode(ctx.0, batch.0) };
            // SAFETY: the decode has returned; nothing else touches the collector now.
            if let Some(e) = unsafe { (*owned.0).failed.take() } {
                bar.finish_and_clear();
                return Err(ImatrixError::Model(e));
            }
            if rc != 0 {
                bar.finish_and_clear();
                return Err(ImatrixError::Model(format!(
                    "llama_decode failed (code {rc})"
                )));
            }
            if !plan.perplexity {
                continue;
            }
            // The positions from the chunk's middle on predict the token after them.
            let mut scoring: Vec<(&[f32], f32)> = Vec::with_capacity(rows.len());
            for (i, p) in (first..first + rows.len()).enumerate() {
                let Some(&next) = tokens.get(p + 1).filter(|_| p >= chunk / 2) else {
                    continue;
                };
                // SAFETY: every row of the batch is an output, and its logits (a score per
                // token of the vocabulary) stay until the next decode, after the scoring.
                let logits = unsafe {
                    let row = llama_cpp_sys_2::llama_get_logits_ith(ctx.0, i as i32);
                    if row.is_null() {
                        continue;
                    }
                    std::slice::from_raw_parts(row, n_vocab)
                };
                let Some(&target) = usize::try_from(next).ok().and_then(|t| logits.get(t)) else {
                    continue;
                };
                scoring.push((logits, target));
            }
            // A row of the vocabulary per position (SmolLM2's 256 scored rows of 49,152 are a
            // fifth of the chunk's time on one thread), shared among the threads.
            nll += score(&scoring, threads.max(1) as usize)?;
            scored += scoring.len();
        }
        bar.inc(1);
        read = done;
        // A long run leaves what it has read so far behind it, to be merged into a run that
        // goes on from there (`--in-file OUTPUT --from-chunk N`).
        let due = |every: usize| every > 0 && done % every == 0 && done < chunks && !stopping();
        if due(plan.save_every) || due(plan.keep_every) {
            // SAFETY: between decodes nothing else touches the collector.
            let m = so_far(unsafe { &*owned.0 }, done)?;
            let mut copy = plan.output.as_os_str().to_owned();
            copy.push(format!(".at_{}", m.chunk_count));
            let copy = std::path::PathBuf::from(copy);
            for (every, path) in [(plan.save_every, plan.output), (plan.keep_every, &copy)] {
                if due(every) {
                    m.write(path)?;
                    bar.suspend(|| {
                        tracing::info!(
                            chunks = m.chunk_count,
                            "saved the matrix so far to {}",
                            path.display()
                        )
                    });
                }
            }
        }
    }
    bar.finish_and_clear();
    drop(ctx);
    let seconds = started.elapsed().as_secs_f64();
    // SAFETY: the context is gone, so the callback is too: the collector is ours alone.
    let gathered = std::mem::take(unsafe { &mut *owned.0 });
    tracing::info!(
        chunks = read,
        tokens = read * chunk,
        tok_s = (read * chunk) as f64 / seconds.max(1e-9),
        output_layer = %crate::engine::output_layer_name(gathered.skipped > 0),
        "read the calibration text"
    );
    if read == 0 && stopping() {
        return Err(ImatrixError::Stopped);
    }
    if gathered.weights.is_empty() {
        return Err(ImatrixError::Model(
            "no product with a layer's weight was seen: the model's layers are not named blk.N"
                .into(),
        ));
    }
    Ok(Computed {
        imatrix: so_far(&gathered, read)?,
        perplexity: plan.perplexity.then(|| (nll / scored.max(1) as f64).exp()),
        chunks: read,
        stopped: read < chunks,
    })
}

/// One tensor's statistics, as llama-imatrix's `--show-statistics` defines them: over the
/// mean squares (sums over rows) of each input column of the matrices that saw rows.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorStats {
    /// The layer (`blk.N`), if it is in one.
    pub layer: Option<u32>,
    /// The tensor's kind within its layer (`attn_q`, `ffn_down_exps`), or its whole name.
    pub kind: String,
    /// Sum, least, greatest and mean of the mean squares, and their standard deviation.
    pub total: f64,
    /// The least mean square.
    pub min: f64,
    /// The greatest mean square.
    pub max: f64,
    /// The mean of the mean squares.
    pub mean: f64,
    /// Their standard deviation.
    pub stddev: f64,
    /// The share of columns whose mean square is above 1e-5.
    pub active: f64,
    /// Columns counted (over every matrix that saw rows).
    pub elements: usize,
    /// The entropy of the mean squares as a distribution, in bits.
    pub entropy: f64,
    /// The share of columns more than one standard deviation above the mean.
    pub zd: f64,
    /// The cosine similarity of the sums with the same tensor's in the layer before.
    pub cossim: Option<f64>,
    /// Matrices (experts) that saw no rows, and all of them.
    pub unseen: (usize, usize),
}

/// The statistics of every entry that saw rows, by kind and then layer, so each kind's
/// course through the layers reads down the table.
pub fn statistics(m: &Imatrix) -> Vec<TensorStats> {
    let place = |name: &str| -> (Option<u32>, String) {
        let parts: Vec<&str> = name.split('.').collect();
        let layer = parts
            .iter()
            .position(|p| *p == "blk")
            .and_then(|i| parts.get(i + 1)?.parse().ok());
        let kind = parts
            .iter()
            .position(|p| *p == "weight")
            .filter(|&i| i > 0)
            .map_or(name.to_owned(), |i| parts[i - 1].to_owned());
        (layer, kind)
    };
    let mut out = Vec::new();
    for (name, e) in &m.entries {
        let n = e.counts.len().max(1);
        let width = e.sums.len() / n;
        let means: Vec<f64> = e
            .sums
            .chunks(width.max(1))
            .zip(&e.counts)
            .filter(|(_, &c)| c > 0.0)
            .flat_map(|(run, &c)| run.iter().map(move |&s| f64::from(s) / f64::from(c)))
            .collect();
        if means.is_empty() {
            continue;
        }
        let total: f64 = means.iter().sum();
        let len = means.len() as f64;
        let mean = total / len;
        let var = means.iter().map(|v| v * v).sum::<f64>() / len - mean * mean;
        let stddev = var.max(0.0).sqrt();
        let entropy = if total > 0.0 {
            -means
                .iter()
                .map(|v| v / total)
                .filter(|&p| p > 0.0)
                .map(|p| p * p.log2())
                .sum::<f64>()
        } else {
            0.0
        };
        let above = |f: &dyn Fn(f64) -> bool| means.iter().filter(|&&v| f(v)).count() as f64 / len;
        let (layer, kind) = place(name);
        out.push(TensorStats {
            layer,
            kind,
            total,
            min: means.iter().copied().fold(f64::INFINITY, f64::min),
            max: means.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            mean,
            stddev,
            active: above(&|v| v.abs() > 1e-5),
            elements: means.len(),
            entropy,
            zd: if stddev > 0.0 {
                above(&|v| (v - mean) / stddev > 1.0)
            } else {
                0.0
            },
            cossim: None,
            unseen: (
                e.counts.iter().filter(|&&c| c <= 0.0).count(),
                e.counts.len(),
            ),
        });
    }
    // Cosine similarity of the raw sums with the layer before's, as llama-imatrix takes it.
    for t in &mut out {
        let Some(layer) = t.layer.filter(|&l| l > 0) else {
            continue;
        };
        let name = |l: u32| format!("blk.{l}.{}.weight", t.kind);
        let (Some(a), Some(b)) = (m.entries.get(&name(layer)), m.entries.get(&name(layer - 1)))
        else {
            continue;
        };
        if a.sums.len() != b.sums.len() {
            continue;
        }
        let dot = |x: &[f32], y: &[f32]| -> f64 {
            x.iter()
                .zip(y)
                .map(|(&p, &q)| f64::from(p) * f64::from(q))
                .sum()
        };
        let norms = (dot(&a.sums, &a.sums) * dot(&b.sums, &b.sums)).sqrt();
        t.cossim = (norms > 0.0).then(|| dot(&a.sums, &b.sums) / norms);
    }
    out.sort_by(|a, b| (&a.kind, a.layer).cmp(&(&b.kind, b.layer)));
    out
}

/// `backstop imatrix --show-statistics`: a markdown table of each tensor's statistics, then
/// each layer's averages weighted by columns, as llama-imatrix prints them.
pub fn statistics_table(m: &Imatrix) -> String {
    let stats = statistics(m);
    let mut out = format!(
        "{} weight matrices from {} chunks of {} tokens ({})\n\n",
        m.entries.len(),
        m.chunk_count,
        m.chunk_size,
        m.datasets.join(", ")
    );
    out += "| layer | tensor | Σ(act²) | min | max | μ | σ | % active | N | entropy | E (norm) | ZD | cos sim | no rows |\n";
    out += "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    let layer = |l: Option<u32>| l.map_or("-".to_owned(), |l| l.to_string());
    for t in &stats {
        let norm = if t.elements > 1 {
            100.0 * t.entropy / (t.elements as f64).log2()
        } else {
            0.0
        };
        let unseen = if t.unseen.0 > 0 {
            format!("{} of {}", t.unseen.0, t.unseen.1)
        } else {
            String::new()
        };
        out += &format!(
            "| {} | {} | {:.2} | {:.4} | {:.4} | {:.2} | {:.2} | {:.2}% | {} | {:.4} | {:.2}% | {:.2}% | {} | {unseen} |\n",
            layer(t.layer),
            t.kind,
            t.total,
            t.min,
            t.max,
            t.mean,
            t.stddev,
            100.0 * t.active,
            t.elements,
            t.entropy,
            norm,
            100.0 * t.zd,
            t.cossim.map_or("-".to_owned(), |c| format!("{c:.4}")),
        );
    }
    // Per layer: Σ(act²), ZD and cos sim averaged with each tensor weighted by its columns.
    let mut layers: BTreeMap<u32, [f64; 5]> = BTreeMap::new();
    for t in &stats {
        let Some(l) = t.layer else { continue };
        let w = t.elements as f64;
        let acc = layers.entry(l).or_default();
        acc[0] += w * t.total;
        acc[1] += w * t.zd;
        acc[2] += w;
        if let Some(c) = t.cossim {
            acc[3] += w * c;
            acc[4] += w;
        }
    }
    out += "\n| layer | μΣ(act²) | μZD | μ cos sim |\n| ---: | ---: | ---: | ---: |\n";
    for (l, [bias, zd, w, cos, cw]) in layers {
        let cos = if cw > 0.0 {
            format!("{:.4}", cos / cw)
        } else {
            "-".to_owned()
        };
        out += &format!(
            "| {l} | {:.2} | {:.4}% | {cos} |\n",
            bias / w,
            100.0 * zd / w
        );
    }
    out
}

/// The summed negative log-likelihood of each row's target logit, over `threads` threads.
fn score(rows: &[(&[f32], f32)], threads: usize) -> Result<f64, ImatrixError> {
    let nll = |part: &[(&[f32], f32)]| -> f64 {
        part.iter()
            .map(|(logits, target)| super::quality::log_sum_exp(logits).0 - f64::from(*target))
            .sum()
    };
    if threads < 2 || rows.len() < 2 {
        return Ok(nll(rows));
    }
    std::thread::scope(|s| {
        let parts: Vec<_> = rows
            .chunks(rows.len().div_ceil(threads))
            .map(|part| s.spawn(move || nll(part)))
            .collect();
        parts
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| ImatrixError::Model("scoring the text failed".into()))
            })
            .sum()
    })
}

/// The text's tokens, with the specials the model adds (a BOS first), as llama-imatrix
/// tokenizes it: the chunks then hold the same tokens as that tool's, and each chunk's first
/// is made a BOS as it is read.
fn tokenize(
    vocab: *const llama_cpp_sys_2::llama_vocab,
    text: &str,
    special: bool,
) -> Result<Vec<llama_cpp_sys_2::llama_token>, ImatrixError> {
    let len = i32::try_from(text.len())
        .map_err(|_| ImatrixError::Input("a text of 2 GiB or more".into()))?;
    // A token is at least one byte of text, besides a BOS and an EOS.
    let mut tokens = vec![0; text.len() + 2];
    // SAFETY: the text and the buffer are valid for the lengths given.
    let n = unsafe {
        llama_cpp_sys_2::llama_tokenize(
            vocab,
            text.as_ptr().cast(),
            len,
            tokens.as_mut_ptr(),
            i32::try_from(tokens.len()).unwrap_or(i32::MAX),
            true,
            special,
        )
    };
    let n = usize::try_from(n)
        .map_err(|_| ImatrixError::Model("llama.cpp could not tokenize the text".into()))?;
    tokens.truncate(n);
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_shared_among_threads_sums_every_row_once() {
        // Seven rows of a vocabulary of five, each with its own target logit.
        let rows: Vec<Vec<f32>> = (0..7)
            .map(|r| {
                (0..5)
                    .map(|t| ((r * 5 + t) % 11) as f32 * 0.3 - 1.0)
                    .collect()
            })
            .collect();
        let scored: Vec<(&[f32], f32)> = rows
            .iter()
            .enumerate()
            .map(|(r, row)| (row.as_slice(), row[r % 5]))
            .collect();
        let direct: f64 = scored
            .iter()
            .map(|(row, target)| {
                let sum: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
                sum.ln() - f64::from(*target)
            })
            .sum();
        // One thread scores every row (to log_sum_exp's own precision); threads that split
        // the rows unevenly, and more threads than rows, give the same sum but for its order.
        let one = score(&scored, 1).unwrap();
        assert!((one - direct).abs() < 1e-7, "{one} against {direct}");
        for threads in [2, 3, 4, 16] {
            let nll = score(&scored, threads).unwrap();
            assert!(
                (nll - one).abs() < 1e-12,
                "{threads} threads: {nll} against {one}"
            );
        }
        assert_eq!(score(&[], 4).unwrap(), 0.0);
    }

    fn sample() -> Imatrix {
        let mut entries = BTreeMap::new();
        entries.insert(
            "blk.0.attn_q.weight".to_owned(),
            Entry {
                sums: vec![2.0, 4.0, 6.0],
                counts: vec![2.0],
            },
        );
        entries.insert(
            "blk.0.ffn_down_exps.weight".to_owned(),
            Entry {
                sums: vec![3.0, 6.0, 5.0, 5.0],
                counts: vec![3.0, 0.0],
            },
        );
        Imatrix {
            entries,
            datasets: vec!["calibration.txt".into()],
            chunk_count: 3,
            chunk_size: 512,
            legacy: false,
        }
    }

    fn entry(sums: &[f32], counts: &[f32]) -> Entry {
        Entry {
            sums: sums.to_vec(),
            counts: counts.to_vec(),
        }
    }

    #[test]
    fn merged_matrices_add_their_sums_and_rows_and_keep_what_only_one_has() {
        let mut m = sample();
        let mut other = Imatrix {
            datasets: vec!["code.txt".into()],
            chunk_count: 2,
            chunk_size: 512,
            ..Imatrix::default()
        };
        other.entries.insert(
            "blk.0.attn_q.weight".into(),
            entry(&[1.0, 1.0, 1.0], &[1.0]),
        );
        // One count for an expert tensor counted per expert here: it goes to each expert.
        other.entries.insert(
            "blk.0.ffn_down_exps.weight".into(),
            entry(&[1.0, 1.0, 3.0, 3.0], &[1.0]),
        );
        other
            .entries
            .insert("blk.1.attn_q.weight".into(), entry(&[4.0], &[2.0]));
        m.merge(other, 512).unwrap();
        assert_eq!(
            m.entries["blk.0.attn_q.weight"],
            entry(&[3.0, 5.0, 7.0], &[3.0])
        );
        assert_eq!(
            m.entries["blk.0.ffn_down_exps.weight"],
            entry(&[4.0, 7.0, 8.0, 8.0], &[4.0, 1.0])
        );
        assert_eq!(m.entries["blk.1.attn_q.weight"].importance(), [2.0]);
        assert_eq!(m.datasets, ["calibration.txt", "code.txt"]);
        assert_eq!((m.chunk_count, m.chunk_size), (5, 512));

        // A legacy file's means times calls become sums over `chunk` rows per call: its
        // means keep their weight against rows counted one by one.
        let mut legacy = Imatrix {
            legacy: true,
            chunk_count: 1,
            ..Imatrix::default()
        };
        // A mean square of 6 over one call.
        legacy
            .entries
            .insert("blk.1.attn_q.weight".into(), entry(&[6.0], &[1.0]));
        m.merge(legacy, 2).unwrap();
        // (4 + 6 * 2) / (2 + 1 * 2)
        assert_eq!(m.entries["blk.1.attn_q.weight"].importance(), [4.0]);

        // Another width is another model.
        let mut wrong = Imatrix::default();
        wrong
            .entries
            .insert("blk.0.attn_q.weight".into(), entry(&[1.0; 4], &[1.0]));
        let e = m.merge(wrong, 512).unwrap_err();
        assert!(e.contains("blk.0.attn_q.weight has 4 values"), "{e}");
    }

    #[test]
    fn statistics_are_llama_imatrix_s_over_the_matrices_that_saw_rows() {
        let mut m = Imatrix {
            chunk_count: 1,
            chunk_size: 4,
            ..Imatrix::default()
        };
        m.entries.insert(
            "blk.0.attn_q.weight".into(),
            entry(&[1.0, 2.0, 3.0, 4.0], &[1.0]),
        );
        m.entries.insert(
            "blk.1.attn_q.weight".into(),
            entry(&[2.0, 4.0, 6.0, 8.0], &[2.0]),
        );
        m.entries.insert(
            "blk.0.ffn_down_exps.weight".into(),
            entry(&[2.0, 2.0, 9.0, 9.0], &[2.0, 0.0]),
        );
        let s = statistics(&m);
        let kinds: Vec<_> = s.iter().map(|t| (t.kind.as_str(), t.layer)).collect();
        assert_eq!(
            kinds,
            [
                ("attn_q", Some(0)),
                ("attn_q", Some(1)),
                ("ffn_down_exps", Some(0))
            ]
        );
        let q = &s[0];
        assert_eq!((q.total, q.min, q.max, q.mean), (10.0, 1.0, 4.0, 2.5));
        assert!((q.stddev - 1.25f64.sqrt()).abs() < 1e-12);
        let h = -[0.1f64, 0.2, 0.3, 0.4]
            .iter()
            .map(|p| p * p.log2())
            .sum::<f64>();
        assert!((q.entropy - h).abs() < 1e-12);
        // Only 4 is more than a standard deviation above the mean.
        assert_eq!((q.active, q.elements, q.zd), (1.0, 4, 0.25));
        // No layer before the first; the second's sums point the same way.
        assert_eq!(q.cossim, None);
        assert!((s[1].cossim.unwrap() - 1.0).abs() < 1e-12);
        // The expert without rows is left out of the figures and counted apart.
        let x = &s[2];
        assert_eq!((x.elements, x.total, x.zd, x.unseen), (2, 2.0, 0.0, (1, 2)));

        let table = statistics_table(&m);
        assert!(
            table.contains("| 1 | attn_q | 10.00 | 1.0000 | 4.0000 | 2.50 |"),
            "{table}"
        );
        assert!(table.contains("| 0 | ffn_down_exps | 2.00 |"), "{table}");
        assert!(table.contains("| 1 of 2 |"), "{table}");
        // Layer 1's averages: its one tensor's.
        assert!(
            table.contains("| 1 | 10.00 | 25.0000% | 1.0000 |"),
            "{table}"
        );
    }

    #[test]
    fn a_matrix_is_checked_against_the_model_s_weights() {
        let tensor = |name: &str, dims: &[u64]| gguf::TensorInfo {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type: gguf::GGML_TYPE_F32,
            offset: 0,
        };
        let model = gguf::GgufHeader {
            tensors: vec![
                tensor("token_embd.weight", &[3, 100]),
                tensor("blk.0.attn_q.weight", &[3, 3]),
                tensor("blk.0.attn_norm.weight", &[3]),
                tensor("blk.0.ffn_down_exps.weight", &[2, 3, 2]),
                tensor("output.weight", &[3, 100]),
            ],
            ..gguf::GgufHeader::default()
        };
        // Two of the three matrices it could weigh (the norm is a vector, the embeddings are
        // looked up, not multiplied).
        assert_eq!(sample().check(&model), Ok((2, 3)));
        let mut other = sample();
        other
            .entries
            .insert("blk.9.attn_q.weight".into(), entry(&[1.0; 3], &[1.0]));
        let e = other.check(&model).unwrap_err();
        assert!(
            e.contains("blk.9.attn_q.weight, which is not a weight"),
            "{e}"
        );
        let mut narrow = sample();
        narrow
            .entries
            .insert("output.weight".into(), entry(&[1.0; 2], &[1.0]));
        let e = narrow.check(&model).unwrap_err();
        assert!(
            e.contains("2 values for output.weight, whose rows need 3"),
            "{e}"
        );
    }

    #[test]
    fn importance_is_the_mean_square_per_matrix_and_one_where_a_matrix_saw_nothing() {
        let m = sample();
        let got = |name: &str| m.entries[name].importance();
        assert_eq!(got("blk.0.attn_q.weight"), [1.0, 2.0, 3.0]);
        assert_eq!(got("blk.0.ffn_down_exps.weight"), [1.0, 2.0, 1.0, 1.0]);
    }

    #[test]
    fn a_gguf_imatrix_reads_back_as_written() {
        let dir = std::env::temp_dir().join(format!("imatrix-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.imatrix.gguf");
        let m = sample();
        m.write(&path).unwrap();
        let back = Imatrix::read(&path).unwrap();
        assert_eq!(back, m);
        // The header is a GGUF one our reader (and llama.cpp's) accepts, with the keys
        // llama-quantize needs before it takes a GGUF imatrix.
        let h = gguf::read(&path).unwrap();
        assert_eq!(h.str("general.type"), Some("imatrix"));
        assert_eq!(h.uint("imatrix.chunk_size"), Some(512));
        assert_eq!(h.tensor_count, 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn legacy_bytes() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&1i32.to_le_bytes());
        let name = b"blk.3.ffn_up.weight";
        b.extend_from_slice(&(name.len() as i32).to_le_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&10i32.to_le_bytes()); // calls
        b.extend_from_slice(&2i32.to_le_bytes()); // values
        b.extend_from_slice(&5.0f32.to_le_bytes());
        b.extend_from_slice(&20.0f32.to_le_bytes());
        b.extend_from_slice(&10i32.to_le_bytes()); // chunks
        b.extend_from_slice(&(8i32).to_le_bytes());
        b.extend_from_slice(b"wiki.txt");
        b
    }

    #[test]
    fn a_legacy_dat_imatrix_is_read_as_llama_cpp_reads_it() {
        let dir = std::env::temp_dir().join(format!("imatrix-dat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.dat");
        std::fs::write(&path, legacy_bytes()).unwrap();
        let m = Imatrix::read(&path).unwrap();
        assert_eq!(m.chunk_count, 10);
        assert_eq!(m.datasets, ["wiki.txt"]);
        // Stored as means times the call count; the quantizer gets the means.
        assert_eq!(m.entries.len(), 1);
        assert_eq!(m.entries["blk.3.ffn_up.weight"].importance(), [0.5, 2.0]);

        // Cut short, or not an imatrix at all: refused with the file's name.
        let mut cut = legacy_bytes();
        cut.truncate(30);
        std::fs::write(&path, &cut).unwrap();
        let e = Imatrix::read(&path).unwrap_err().to_string();
        assert!(e.contains("old.dat"), "{e}");
        std::fs::write(&path, b"hello world, this is text").unwrap();
        let e = Imatrix::read(&path).unwrap_err().to_string();
        assert!(e.contains("neither a GGUF imatrix nor a legacy"), "{e}");
        // A GGUF that is a model, not an imatrix, has no importance data.
        let mut model = Vec::new();
        model.extend_from_slice(b"GGUF");
        model.extend_from_slice(&3u32.to_le_bytes());
        model.extend_from_slice(&0u64.to_le_bytes());
        model.extend_from_slice(&0u64.to_le_bytes());
        std::fs::write(&path, &model).unwrap();
        let e = Imatrix::read(&path).unwrap_err().to_string();
        assert!(e.contains("no importance data"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_decorated_tensor_name_gives_the_weight_s() {
        assert_eq!(weight_name("blk.0.attn_q.weight"), "blk.0.attn_q.weight");
        assert_eq!(
            weight_name("CUDA0#blk.0.attn_q.weight#0"),
            "blk.0.attn_q.weight"
        );
        assert_eq!(
            weight_name("CPU#blk.1.ffn_up.weight"),
            "blk.1.ffn_up.weight"
        );
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    #[test]
    fn a_plain_product_adds_every_row_to_its_matrix_and_counts_the_rows() {
        // Three tokens of two columns, contiguous.
        let x = f32_bytes(&[1.0, 2.0, 3.0, -1.0, 0.5, 0.0]);
        let shape = Shape {
            ne: [2, 3, 1, 1],
            nb: [4, 8, 24, 24],
        };
        let mut sums = Sums {
            sums: vec![0.0; 2],
            rows: vec![0],
        };
        add_dense(&mut sums, &x, shape, (1, 1)).unwrap();
        assert_eq!(sums.sums, [1.0 + 9.0 + 0.25, 4.0 + 1.0]);
        assert_eq!(sums.rows, [3]);
        // A shape that runs past the data is an error, not a read out of bounds.
        let long = Shape {
            ne: [2, 4, 1, 1],
            ..shape
        };
        assert!(add_dense(&mut sums, &x, long, (1, 1)).is_err());
    }

    #[test]
    fn a_routed_product_adds_each_token_s_row_to_the_experts_it_picked() {
        // Two tokens, two picks each among three experts; one activation row per pick
        // (`[width 2, picks 2, tokens 2]`), as a mixture's up and gate products have.
        let x = f32_bytes(&[
            1.0, 0.0, // token 0, pick 0
            0.0, 2.0, // token 0, pick 1
            3.0, 3.0, // token 1, pick 0
            1.0, 1.0, // token 1, pick 1
        ]);
        let shape = Shape {
            ne: [2, 2, 2, 1],
            nb: [4, 8, 16, 32],
        };
        // The ids `[picks 2, tokens 2]`, not contiguous: each token's picks 16 bytes apart.
        let mut ids = vec![0u8; 32];
        for (token, picks) in [[2i32, 0], [2, 1]].iter().enumerate() {
            for (pick, e) in picks.iter().enumerate() {
                ids[token * 16 + pick * 4..][..4].copy_from_slice(&e.to_ne_bytes());
            }
        }
        let id = Shape {
            ne: [2, 2, 1, 1],
            nb: [4, 16, 32, 32],
        };
        let mut sums = Sums {
            sums: vec![0.0; 6],
            rows: vec![0; 3],
        };
        add_routed(&mut sums, &x, shape, &ids, id).unwrap();
        // Expert 0: token 0's second row; expert 1: token 1's second; expert 2: both firsts.
        assert_eq!(sums.sums, [0.0, 4.0, 1.0, 1.0, 1.0 + 9.0, 9.0]);
        assert_eq!(sums.rows, [1, 1, 2]);

        // One row per token shared by its picks (the down product's input is per pick, the
        // others' may be one broadcast row): the pick index wraps.
        let one = Shape {
            ne: [2, 1, 2, 1],
            nb: [4, 8, 8, 16],
        };
        let x1 = f32_bytes(&[1.0, 1.0, 2.0, 0.0]);
        let mut shared = Sums {
            sums: vec![0.0; 6],
            rows: vec![0; 3],
        };
        add_routed(&mut shared, &x1, one, &ids, id).unwrap();
        assert_eq!(shared.sums, [1.0, 1.0, 4.0, 0.0, 1.0 + 4.0, 1.0]);
        assert_eq!(shared.rows, [1, 1, 2]);

        // An expert the tensor does not have, and ids for other tokens, are errors.
        ids[0..4].copy_from_slice(&7i32.to_ne_bytes());
        assert!(add_routed(&mut sums, &x, shape, &ids, id)
            .unwrap_err()
            .contains("expert 7 of 3"));
        let fewer = Shape {
            ne: [2, 1, 1, 1],
            ..id
        };
        assert!(add_routed(&mut sums, &x, shape, &ids, fewer).is_err());
    }
}
