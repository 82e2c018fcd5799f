//! A reference saved to a file and read back (`bench --quality-save FILE`, `--quality-base
//! FILE`), in the format of llama.cpp's perplexity tool (`llama-perplexity
//! --kl-divergence-base FILE`), so each reads the other's: a large model's F16 is scored once,
//! and its quantizations are compared with it later without loading both.
//!
//! The format, as that tool writes it (tools/perplexity/perplexity.cpp), all little-endian:
//! the 8 bytes `_logits_`; the chunk length `n_ctx` (u32), the vocabulary size `n_vocab` and
//! the chunk count `n_chunk` (i32 each); the text's tokens, `n_ctx * n_chunk` of them (i32,
//! each chunk's first as read from the text: the reader makes it BOS where its model wants
//! one); then for each chunk, for each scored position (the chunk's second half, `n_ctx - 1 -
//! n_ctx / 2` of them) one row of `nv = 2 * ((n_vocab + 1) / 2) + 4` u16s: the scale and the
//! smallest log-probability as two f32s, then each token's log-probability as `scale * q +
//! smallest` (q a u16), over the 16 nats below the likeliest token (anything lower is 0).
//!
//! Written here: a header and rows of u16s, which no crate reads for us.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use llama_cpp_2::token::LlamaToken;

use super::{kept, top_k, Reference, Text};

/// What the file starts with.
const MAGIC: &[u8; 8] = b"_logits_";

/// Bytes before the tokens: the magic, `n_ctx`, `n_vocab`, `n_chunk`.
const HEADER: u64 = 8 + 4 + 4 + 4;

/// The log-probabilities kept per position span this many nats below the likeliest token.
const SPAN: f32 = 16.0;

/// u16s per row for a vocabulary of `n_vocab`: two f32s, then the tokens, padded to even.
fn row_len(n_vocab: usize) -> usize {
    2 * n_vocab.div_ceil(2) + 4
}

/// Scored positions per chunk of `chunk` tokens (its second half, less the last token).
fn positions(chunk: usize) -> usize {
    chunk - 1 - chunk / 2
}

/// Quantizes one row of logits into `row`, as the tool does: each token's log-probability
/// over [`SPAN`] nats in 65,535 steps.
fn quantize_row(logits: &[f32], row: &mut Vec<u16>) {
    let (mut max, mut min) = (f32::NEG_INFINITY, f32::INFINITY);
    for &l in logits {
        max = max.max(l);
        min = min.min(l);
    }
    let min = min.max(max - SPAN);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let lse = sum.ln() as f32;
    let scale = (max - min) / 65535.0;
    let smallest = min - max - lse;
    row.clear();
    for f in [scale, smallest] {
        let b = f.to_le_bytes();
        row.push(u16::from_le_bytes([b[0], b[1]]));
        row.push(u16::from_le_bytes([b[2], b[3]]));
    }
    if scale > 0.0 {
        let inv = 1.0 / scale;
        // Rounded to nearest, ties to even, as the tool's float trick rounds.
        row.extend(logits.iter().map(|&l| {
            if l > min {
                ((l - min) * inv).round_ties_even() as u16
            } else {
                0
            }
        }));
    } else {
        row.extend(std::iter::repeat_n(0, logits.len()));
    }
    row.resize(row_len(logits.len()), 0);
}

/// The log-probabilities a row holds, one per token of the vocabulary.
fn dequantize_row(row: &[u16], n_vocab: usize, out: &mut Vec<f32>) {
    let f = |i: usize| {
        let (a, b) = (row[i].to_le_bytes(), row[i + 1].to_le_bytes());
        f32::from_le_bytes([a[0], a[1], b[0], b[1]])
    };
    let (scale, smallest) = (f(0), f(2));
    out.clear();
    out.extend(
        row[4..4 + n_vocab]
            .iter()
            .map(|&q| scale * f32::from(q) + smallest),
    );
}

/// A reference being written to its file as it is scored: under a temporary name, renamed
/// when every row is in.
pub(crate) struct Saving {
    file: BufWriter<File>,
    temp: PathBuf,
    path: PathBuf,
    row: Vec<u16>,
    bytes: Vec<u8>,
    _unfinished: crate::bench::quantize::Writing,
}

impl Saving {
    /// Starts `path` with the header and `tokens`, each chunk's first as read from the text.
    pub(crate) fn start(
        path: &Path,
        chunk: usize,
        n_vocab: usize,
        tokens: &[LlamaToken],
    ) -> Result<Saving, String> {
        let said = |e: std::io::Error| format!("--quality-save {}: {e}", path.display());
        let temp = crate::bench::quantize::writing(path);
        let unfinished = crate::bench::quantize::Writing::register(vec![temp.clone()]);
        let mut file = BufWriter::with_capacity(1 << 20, File::create(&temp).map_err(said)?);
        let int = |n: usize| i32::try_from(n).unwrap_or(i32::MAX).to_le_bytes();
        let mut head = MAGIC.to_vec();
        head.extend(u32::try_from(chunk).unwrap_or(u32::MAX).to_le_bytes());
        head.extend(int(n_vocab));
        head.extend(int(tokens.len() / chunk.max(1)));
        for t in tokens {
            head.extend(t.0.to_le_bytes());
        }
        file.write_all(&head).map_err(said)?;
        Ok(Saving {
            file,
            temp,
            path: path.to_owned(),
            row: Vec::new(),
            bytes: Vec::new(),
            _unfinished: unfinished,
        })
    }

    /// The next scored position's row of logits.
    pub(crate) fn row(&mut self, logits: &[f32]) -> Result<(), String> {
        quantize_row(logits, &mut self.row);
        self.bytes.clear();
        self.bytes
            .extend(self.row.iter().flat_map(|q| q.to_le_bytes()));
        self.file
            .write_all(&self.bytes)
            .map_err(|e| format!("--quality-save {}: {e}", self.path.display()))
    }

    /// Every row is in: the file gets its name.
    pub(crate) fn finish(mut self) -> Result<(), String> {
        let said = |e: std::io::Error| format!("--quality-save {}: {e}", self.path.display());
        self.file.flush().map_err(said)?;
        self.file.get_ref().sync_all().map_err(said)?;
        std::fs::rename(&self.temp, &self.path).map_err(said)
    }
}

impl Drop for Saving {
    fn drop(&mut self) {
        // Gone already when `finish` renamed it; otherwise the half-written file goes.
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// The tokens of a saved reference, and their chunk length: the text the models with it read.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Each chunk's first as read from the text (made BOS where a model wants one).
    pub tokens: Vec<LlamaToken>,
    /// Tokens per chunk.
    pub chunk: usize,
    /// The vocabulary size of the model that saved it.
    pub n_vocab: usize,
}

/// Reads a saved reference: the text to score (its tokens) and what its model predicted.
pub fn read(path: &Path) -> Result<(Text, Reference), String> {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let bad = |why: String| format!("--quality-base {}: {why}", path.display());
    let io = |e: std::io::Error| bad(e.to_string());
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; 8];
    let mut word = [0u8; 4];
    let not_one = || {
        bad(
            "not a file of saved log-probabilities (from `bench --quality-save` or \
             `llama-perplexity --kl-divergence-base`)"
                .into(),
        )
    };
    r.read_exact(&mut magic).map_err(|_| not_one())?;
    if &magic != MAGIC {
        return Err(not_one());
    }
    let mut int = |r: &mut BufReader<File>| -> Result<i64, String> {
        r.read_exact(&mut word).map_err(|_| not_one())?;
        Ok(i64::from(i32::from_le_bytes(word)))
    };
    let chunk = u32::try_from(int(&mut r)?).unwrap_or(0) as usize;
    let n_vocab = usize::try_from(int(&mut r)?).unwrap_or(0);
    let n_chunk = usize::try_from(int(&mut r)?).unwrap_or(0);
    if chunk < 4 || n_vocab < 2 || n_chunk < 1 {
        return Err(bad(format!(
            "a header of chunks of {chunk} tokens, {n_chunk} chunks and a vocabulary of \
             {n_vocab}: none of the file's own"
        )));
    }
    let n_tokens = chunk as u64 * n_chunk as u64;
    let rows = positions(chunk) as u64 * n_chunk as u64;
    let expected = HEADER + 4 * n_tokens + 2 * row_len(n_vocab) as u64 * rows;
    if size != expected {
        return Err(bad(format!(
            "{size} bytes, where its header ({n_chunk} chunks of {chunk} tokens, a vocabulary \
             of {n_vocab}) makes {expected}: {}",
            if size < expected {
                "cut short"
            } else {
                "more than it says"
            }
        )));
    }
    let mut tokens = Vec::with_capacity(n_tokens as usize);
    for _ in 0..n_tokens {
        let t = int(&mut r)?;
        if !(0..n_vocab as i64).contains(&t) {
            return Err(bad(format!(
                "token {t} is not in its own vocabulary of {n_vocab}"
            )));
        }
        tokens.push(LlamaToken(t as i32));
    }
    let per_chunk = positions(chunk);
    let k = kept(rows as usize, n_vocab);
    let mut reference = Reference {
        name,
        tokens: Vec::new(),
        chunk,
        n_vocab,
        k,
        top: Vec::with_capacity(rows as usize * k),
        top_logp: Vec::with_capacity(rows as usize * k),
        nll: Vec::with_capacity(rows as usize),
    };
    let mut raw = vec![0u8; 2 * row_len(n_vocab)];
    let mut row = vec![0u16; row_len(n_vocab)];
    let (mut logp, mut scratch) = (Vec::new(), Vec::new());
    // A large model's file on a long text is tens of GB: minutes to read.
    let bar = crate::bench::quantize::progress_bar(
        Some(size),
        format!("reading the saved reference {}", path.display()),
    );
    bar.set_position(size - 2 * row_len(n_vocab) as u64 * rows);
    let mut r = bar.wrap_read(r);
    for c in 0..n_chunk {
        for i in 0..per_chunk {
            if let Err(e) = r.read_exact(&mut raw) {
                bar.finish_and_clear();
                return Err(io(e));
            }
            for (q, b) in row.iter_mut().zip(raw.chunks_exact(2)) {
                *q = u16::from_le_bytes([b[0], b[1]]);
            }
            dequantize_row(&row, n_vocab, &mut logp);
            let target = tokens[c * chunk + chunk / 2 + i + 1].0 as usize;
            reference.nll.push(-f64::from(logp[target]));
            let top = top_k(&logp, k, &mut scratch);
            reference.top.extend_from_slice(top);
            reference
                .top_logp
                .extend(top.iter().map(|&t| logp[t as usize]));
        }
    }
    bar.finish_and_clear();
    let text = Text {
        name: format!("the tokens saved in {}", path.display()),
        text: String::new(),
        saved: Some(Tokens {
            tokens,
            chunk,
            n_vocab,
        }),
        chunk: Some(chunk),
    };
    Ok((text, reference))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_keeps_each_log_probability_to_within_its_step() {
        let logits = [3.0f32, -1.5, 0.25, -40.0, 2.75];
        let mut row = Vec::new();
        quantize_row(&logits, &mut row);
        // Two floats, five tokens, padded to six.
        assert_eq!(row.len(), 4 + 6);
        let mut logp = Vec::new();
        dequantize_row(&row, logits.len(), &mut logp);
        let lse = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        let step = f64::from((3.0 - (3.0 - SPAN)) / 65535.0);
        for (i, (&l, &p)) in logits.iter().zip(&logp).enumerate() {
            let exact = f64::from(l) - lse;
            if exact > -SPAN as f64 + 1.0 {
                assert!((exact - f64::from(p)).abs() <= step, "{i}: {exact} {p}");
            } else {
                // More than the span below the likeliest: the floor of the span.
                assert!(
                    (f64::from(p) - (3.0 - f64::from(SPAN) - lse)).abs() < 1e-4,
                    "{p}"
                );
            }
        }
        // A flat row: every token the same, and the scale 0.
        quantize_row(&[1.0; 3], &mut row);
        dequantize_row(&row, 3, &mut logp);
        for p in &logp {
            assert!((f64::from(*p) + 3f64.ln()).abs() < 1e-6, "{p}");
        }
    }
}
