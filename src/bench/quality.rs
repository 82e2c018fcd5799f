//! `backstop bench --quality`: what a quantization (or a quantized KV cache) costs in output
//! quality, beside what it gains in speed.
//!
//! Every model gets the perplexity of one fixed text. Every model after the first of the same
//! vocabulary (the source of a `--quantize` ladder, the first file given, or the first setting
//! of a sweep) is also compared with that first one, its reference, at each scored position:
//! the difference of their log-likelihoods (the perplexity ratio, with its paired error), the
//! KL divergence of its next-token distribution from the reference's, and whether both put the
//! same token first.
//!
//! The method is that of llama.cpp's perplexity tool, and its figures agree with that tool's
//! (README): the text is cut into chunks of [`CHUNK`] tokens, each read from an empty cache
//! (starting with BOS where the model wants one), and only the second half of each chunk is
//! scored, so every scored token has at least half a chunk before it.
//!
//! Written here rather than taken from a crate: what it computes per position is a
//! log-softmax and a top-k over one row of llama.cpp's logits, which no crate offers for them.

use std::num::NonZeroU32;
use std::path::Path;

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};

use super::measure::{llama, BenchError, Setting};

pub mod base;

/// The built-in text: about 1,100 words of plain English prose written for this purpose, so
/// that figures from different runs and machines compare.
const BUILT_IN: &str = include_str!("quality.txt");

/// Tokens per chunk (fewer when the model's training context is shorter).
const CHUNK: usize = 512;

/// The fewest text tokens `--quality` accepts: below this a perplexity says little.
const MIN_TOKENS: usize = 64;

/// Positions scored per decode, at most (fewer with a smaller `--batch`). Each needs a row of
/// logits, and llama.cpp holds the rows of a whole decode at once: 128 rows of Gemma 3's
/// 262,144-token vocabulary are 128 MiB.
const SCORED_PER_DECODE: usize = 128;

/// The reference's likeliest tokens kept per position for the KL divergence, at most: 32 KiB a
/// position, where the whole distribution is 192 KiB for SmolLM2 and 1 MiB for Gemma 3. The
/// rest of its distribution is one more outcome, "any other token", so the figure is the exact
/// divergence over those outcomes: never more than over the whole vocabulary, and close to it.
/// Measured on SmolLM2's built-in text, Q4_0 made from Q4_1, against the whole vocabulary's
/// 0.2497 (llama.cpp's perplexity tool says 0.249965): 0.2484 with 4,096 tokens, 0.2435 with
/// 1,024, 0.1917 with 32. (Spreading the rest like the other model's tail did worse.)
const TOP: usize = 4096;

/// Fewer tokens per position for a long text, so that a reference holds at most this much.
const REFERENCE_BYTES: usize = 256 << 20;

/// Tokens kept per position for `positions` scored positions and a vocabulary of `n_vocab`.
fn kept(positions: usize, n_vocab: usize) -> usize {
    let per_token = std::mem::size_of::<u32>() + std::mem::size_of::<f32>();
    (REFERENCE_BYTES / per_token / positions.max(1))
        .clamp(64, TOP)
        .min(n_vocab)
}

/// The text to score.
#[derive(Debug, Clone)]
pub struct Text {
    /// How the table names it.
    pub name: String,
    text: String,
    /// A saved reference's tokens (`--quality-base`), read instead of the text.
    saved: Option<base::Tokens>,
    /// Tokens per chunk, as asked (`--quality-chunk`; llama-perplexity's `-c`).
    chunk: Option<usize>,
}

impl Text {
    /// The vocabulary size of the model a saved reference (`--quality-base`) came from.
    pub fn saved_vocabulary(&self) -> Option<usize> {
        self.saved.as_ref().map(|s| s.n_vocab)
    }

    /// The built-in text, or the one in `path`, read in chunks of `chunk` tokens where given.
    pub fn load(path: Option<&Path>, chunk: Option<usize>) -> Result<Text, String> {
        let Some(path) = path else {
            return Ok(Text {
                name: "the built-in text".into(),
                text: BUILT_IN.into(),
                saved: None,
                chunk,
            });
        };
        let bytes =
            std::fs::read(path).map_err(|e| format!("--quality-text {}: {e}", path.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("--quality-text {}: not UTF-8 text", path.display()))?;
        Ok(Text {
            name: path.display().to_string(),
            text,
            saved: None,
            chunk,
        })
    }
}

/// One model's quality figures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Quality {
    /// Tokens of the text, in this model's vocabulary.
    pub text_tokens: usize,
    /// Tokens per chunk, BOS included.
    pub chunk: usize,
    /// Positions scored.
    pub scored: usize,
    /// Perplexity: e to the mean negative log-likelihood of each scored token.
    pub ppl: f64,
    /// Its standard error.
    pub ppl_error: f64,
    /// PPL over the reference's PPL on the same positions (`None` for a reference): e to the
    /// mean difference of their log-likelihoods, so its error is the paired one, far smaller
    /// than the two perplexities' own.
    pub ppl_ratio: Option<f64>,
    /// Its standard error.
    pub ppl_ratio_error: Option<f64>,
    /// Mean KL divergence from the reference's next-token distribution, in nats (`None`
    /// for a reference).
    pub kld: Option<f64>,
    /// How often the likeliest token is the reference's, from 0 to 1 (`None` for a
    /// reference).
    pub same_top: Option<f64>,
    /// The model compared with (`None`: this one is a reference).
    pub reference: Option<String>,
    /// The reference's likeliest tokens the divergence was taken over, the rest counted as
    /// one (`None` for a reference).
    pub kld_top: Option<usize>,
    /// The KL divergence that 99% of the scored positions stay at or under: where a
    /// quantization goes badly wrong now and then, which the mean hides (`None` for a
    /// reference).
    #[serde(default)]
    pub kld_p99: Option<f64>,
    /// The largest KL divergence at any scored position (`None` for a reference).
    #[serde(default)]
    pub kld_max: Option<f64>,
    /// The root mean square of the change in the probability of the text's next token, from
    /// the reference's to this model's, from 0 to 1 (llama.cpp's perplexity tool's "RMS Δp";
    /// `None` for a reference).
    #[serde(default)]
    pub dp_rms: Option<f64>,
}

/// What a model predicted at each scored position, kept so that later models of the same
/// vocabulary can be compared with it.
pub struct Reference {
    name: String,
    /// Every chunk's tokens as read, and the chunks' length: a model is compared only when it
    /// read the very same.
    tokens: Vec<LlamaToken>,
    chunk: usize,
    n_vocab: usize,
    /// Token ids kept per position: see [`kept`].
    k: usize,
    /// `k` token ids per scored position, likeliest first.
    top: Vec<u32>,
    /// Their log-probabilities.
    top_logp: Vec<f32>,
    /// The negative log-likelihood of the text's token at each scored position.
    nll: Vec<f64>,
}

/// The lines under the table that say what the quality columns are.
pub fn said<'a>(text: &Text, figures: impl Iterator<Item = &'a Quality>) -> String {
    let mut kept: Vec<usize> = Vec::new();
    for k in figures.filter_map(|q| q.kld_top) {
        if !kept.contains(&k) {
            kept.push(k);
        }
    }
    let chunks = match (&text.saved, text.chunk) {
        (Some(saved), _) => format!("chunks of {} tokens", saved.chunk),
        (None, Some(chunk)) => format!("chunks of {chunk} tokens"),
        (None, None) => format!("chunks of up to {CHUNK} tokens"),
    };
    let mut out = format!(
        "ppl: perplexity of {}, in {chunks} with the second half of each scored (± one \
         standard error)\n",
        text.name
    );
    let who = match &text.saved {
        Some(_) => "saved model's",
        None => "(ref) model's",
    };
    if !kept.is_empty() {
        out.push_str(&format!(
            "ppl ratio: over the {who} on the same tokens, ± the paired error; kld: mean KL \
             divergence in nats of each next-token distribution from the {who}, over its {} \
             likeliest tokens and the rest as one; kld 99%: what 99% of the positions' \
             divergences stay at or under; same top: how often both put the same token first\n",
            kept.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join("/")
        ));
    }
    out
}

/// Chunk length and number of chunks for `n` text tokens, BOS first where the model wants
/// one: whole chunks of `asked` tokens, or by default of [`CHUNK`], or of the training context
/// when shorter, a text shorter than one such chunk being one chunk of itself. A chunk asked
/// for must fit the training context and the text must fill one.
fn layout(
    n: usize,
    bos: bool,
    train: usize,
    asked: Option<usize>,
) -> Result<(usize, usize), String> {
    if n < MIN_TOKENS {
        return Err(format!(
            "{n} tokens: --quality needs a text of at least {MIN_TOKENS} tokens"
        ));
    }
    let all = n + usize::from(bos);
    let len = match asked {
        Some(c) if c > train => {
            return Err(format!(
                "--quality-chunk {c}: longer than the model's training context of {train} tokens"
            ))
        }
        Some(c) if c > all => {
            return Err(format!(
                "{all} tokens, less than one chunk of {c} (--quality-chunk)"
            ))
        }
        Some(c) => c,
        None => CHUNK.min(train).min(all),
    };
    Ok((len, all / len))
}

/// The log of the sum of `exp` over a row of logits, and the index of its (first) largest.
pub(super) fn log_sum_exp(logits: &[f32]) -> (f64, usize) {
    let (mut best, mut max) = (0, f32::NEG_INFINITY);
    for (i, &l) in logits.iter().enumerate() {
        if l > max {
            (best, max) = (i, l);
        }
    }
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (f64::from(max) + sum.ln(), best)
}

/// The `k` largest logits' indices, largest first, in `scratch` (reused between calls, so
/// no allocation per position).
fn top_k<'s>(logits: &[f32], k: usize, scratch: &'s mut Vec<u32>) -> &'s [u32] {
    scratch.clear();
    scratch.extend(0..logits.len() as u32);
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    let k = k.min(scratch.len());
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k, by_logit);
    }
    let top = &mut scratch[..k];
    top.sort_by(by_logit);
    top
}

/// KL(P‖Q) over the reference's top tokens and "any other token": `p_top` the reference's
/// log-probabilities of `top`, `logits` and `lse` the other model's row.
fn divergence(top: &[u32], p_top: &[f32], logits: &[f32], lse: f64) -> f64 {
    let (mut kl, mut p_in, mut q_in) = (0.0, 0.0, 0.0);
    for (&t, &lp) in top.iter().zip(p_top) {
        let (lp, lq) = (f64::from(lp), f64::from(logits[t as usize]) - lse);
        let p = lp.exp();
        kl += p * (lp - lq);
        p_in += p;
        q_in += lq.exp();
    }
    let p_rest = (1.0 - p_in).max(0.0);
    if p_rest > 0.0 {
        // A model that puts (almost) nothing outside those tokens is charged as if it put
        // e^-30 there, rather than infinitely.
        let q_rest = (1.0 - q_in).max((-30.0f64).exp());
        kl += p_rest * (p_rest.ln() - q_rest.ln());
    }
    kl.max(0.0)
}

/// The value that a `fraction` of `values` is at or under (nearest rank); 0 for none.
fn percentile(values: &mut [f64], fraction: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let rank = ((fraction * values.len() as f64).ceil() as usize).clamp(1, values.len());
    *values.select_nth_unstable_by(rank - 1, f64::total_cmp).1
}

/// Running sums over the scored positions.
#[derive(Default)]
struct Sums {
    n: usize,
    nll: f64,
    nll_sq: f64,
    /// Of the differences from the reference's negative log-likelihoods.
    diff: f64,
    diff_sq: f64,
    same: usize,
    /// Each position's KL divergence: their mean, percentiles and largest.
    kls: Vec<f64>,
    /// Of the squared changes in the next token's probability.
    dp_sq: f64,
}

impl Sums {
    /// One scored position: the row of logits that predicts `target`. Compared with the
    /// reference when there is one; otherwise kept in `mine`, for the models after it.
    fn add(
        &mut self,
        logits: &[f32],
        target: usize,
        reference: Option<&Reference>,
        mine: &mut Reference,
        scratch: &mut Vec<u32>,
    ) {
        let (lse, best) = log_sum_exp(logits);
        let nll = lse - f64::from(logits.get(target).copied().unwrap_or(f32::MIN));
        let at = self.n;
        self.n += 1;
        self.nll += nll;
        self.nll_sq += nll * nll;
        if let Some(r) = reference {
            let diff = nll - r.nll[at];
            self.diff += diff;
            self.diff_sq += diff * diff;
            let (top, p_top) = (
                &r.top[at * r.k..(at + 1) * r.k],
                &r.top_logp[at * r.k..(at + 1) * r.k],
            );
            let kl = divergence(top, p_top, logits, lse);
            self.kls.push(kl);
            self.same += usize::from(top[0] as usize == best);
            let dp = (-nll).exp() - (-r.nll[at]).exp();
            self.dp_sq += dp * dp;
        } else {
            mine.nll.push(nll);
            let top = top_k(logits, mine.k, scratch);
            mine.top.extend_from_slice(top);
            mine.top_logp.extend(
                top.iter()
                    .map(|&t| (f64::from(logits[t as usize]) - lse) as f32),
            );
        }
    }
}

/// Scores `text` with a loaded model, and compares it with the first of `references` that
/// read the same tokens. Returns its figures, and when none matched, what it predicted: a
/// reference for the models after it, saved to `save` as well when given.
pub fn score(
    model: &LlamaModel,
    setting: &Setting,
    text: &Text,
    references: &[Reference],
    name: &str,
    save: Option<&Path>,
) -> Result<(Quality, Option<Reference>), BenchError> {
    let vocab = model.vocab();
    let bos = vocab.should_add_bos();
    let n_vocab = usize::try_from(model.n_vocab()).unwrap_or(0);
    // As llama.cpp's perplexity tool cuts it, so that the figures compare: BOS and the text
    // in whole chunks (each chunk's first token is made BOS below: it has nothing before it).
    let (read, len, text_tokens) = match &text.saved {
        Some(saved) if saved.n_vocab != n_vocab => {
            return Err(BenchError::Quality(format!(
                "{name} has a vocabulary of {n_vocab} tokens, and {} was saved by a model of \
                 {}: only a model of the same vocabulary compares with it",
                text.name, saved.n_vocab
            )))
        }
        Some(saved) => (saved.tokens.clone(), saved.chunk, saved.tokens.len()),
        None => {
            let words = vocab.tokenize(text.text.as_bytes(), false, false);
            let train = usize::try_from(model.n_ctx_train()).unwrap_or(usize::MAX);
            let (len, chunks) = layout(words.len(), bos, train, text.chunk)
                .map_err(|e| BenchError::Quality(format!("{}: {e}", text.name)))?;
            let mut tokens = Vec::with_capacity(len * chunks);
            if bos {
                tokens.push(vocab.bos());
            }
            tokens.extend_from_slice(&words);
            tokens.truncate(len * chunks);
            (tokens, len, words.len())
        }
    };
    let mut tokens = read.clone();
    if bos {
        for chunk in tokens.chunks_exact_mut(len) {
            chunk[0] = vocab.bos();
        }
    }
    // A saved reference read the file's tokens, as this model does now.
    let reference = references.iter().find(|r| {
        r.n_vocab == n_vocab && r.chunk == len && (text.saved.is_some() || r.tokens == tokens)
    });
    let mut saving = match save {
        Some(path) if reference.is_none() => {
            Some(base::Saving::start(path, len, n_vocab, &read).map_err(BenchError::Quality)?)
        }
        _ => None,
    };

    let backend = crate::engine::backend().map_err(llama)?;
    let len_u32 = u32::try_from(len).map_err(llama)?;
    // No decode holds more than `--batch` tokens: the batch shapes how llama.cpp's kernels
    // tile their sums (flash attention's query tiles, repacked weights' row tiles), and so
    // the figures' last bits.
    let n_batch = setting.batch.min(len_u32);
    let params = setting
        .context_params()
        .with_n_ctx(NonZeroU32::new(len_u32))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_seq_max(1);
    let mut ctx = model.new_context(backend, params).map_err(llama)?;
    let n_batch = n_batch as usize;
    let mut batch = LlamaBatch::new(n_batch, 1);
    let per_decode = SCORED_PER_DECODE.min(n_batch);
    let first = len / 2;
    let mut sums = Sums::default();
    let mut mine = Reference {
        name: name.to_owned(),
        tokens: Vec::new(),
        chunk: len,
        n_vocab,
        k: kept(tokens.len() / len * (len - 1 - first), n_vocab),
        top: Vec::new(),
        top_logp: Vec::new(),
        nll: Vec::new(),
    };
    let mut scratch = Vec::new();
    for chunk in tokens.chunks_exact(len) {
        crate::engine::forget_all(&mut ctx);
        // The first half is context only; then the positions whose next token is scored,
        // each with its row of logits.
        let spans = (0..first)
            .step_by(n_batch)
            .map(|s| (s, (s + n_batch).min(first), false))
            .chain(
                (first..len - 1)
                    .step_by(per_decode)
                    .map(|s| (s, (s + per_decode).min(len - 1), true)),
            );
        for (start, end, scored) in spans {
            batch.clear();
            for (p, &t) in chunk.iter().enumerate().take(end).skip(start) {
                batch.add(t, p as i32, &[0], scored).map_err(llama)?;
            }
            ctx.decode(&mut batch).map_err(llama)?;
            if !scored {
                continue;
            }
            for (i, p) in (start..end).enumerate() {
                let target = chunk[p + 1].0 as usize;
                let logits = ctx.get_logits_ith(i as i32);
                sums.add(logits, target, reference, &mut mine, &mut scratch);
                if let Some(s) = &mut saving {
                    s.row(logits).map_err(BenchError::Quality)?;
                }
            }
        }
    }
    mine.tokens = tokens;
    if let Some(s) = saving {
        s.finish().map_err(BenchError::Quality)?;
    }
    let n = sums.n.max(1) as f64;
    // The mean of some values and its standard error, from their sum and sum of squares.
    let mean_and_error = |sum: f64, sum_sq: f64| {
        let mean = sum / n;
        let variance = (sum_sq / n - mean * mean).max(0.0);
        (mean, (variance / (n - 1.0).max(1.0)).sqrt())
    };
    // e to a mean, and its error carried through exp (the delta method).
    let exp_and_error = |(mean, error): (f64, f64)| (mean.exp(), mean.exp() * error);
    let (ppl, ppl_error) = exp_and_error(mean_and_error(sums.nll, sums.nll_sq));
    let ratio = reference.map(|_| exp_and_error(mean_and_error(sums.diff, sums.diff_sq)));
    let quality = Quality {
        text_tokens,
        chunk: len,
        scored: sums.n,
        ppl,
        ppl_error,
        ppl_ratio: ratio.map(|r| r.0),
        ppl_ratio_error: ratio.map(|r| r.1),
        kld: reference.map(|_| sums.kls.iter().sum::<f64>() / n),
        same_top: reference.map(|_| sums.same as f64 / n),
        reference: reference.map(|r| r.name.clone()),
        kld_top: reference.map(|r| r.k),
        kld_p99: reference.map(|_| percentile(&mut sums.kls, 0.99)),
        kld_max: reference.map(|_| sums.kls.iter().copied().fold(0.0, f64::max)),
        dp_rms: reference.map(|_| (sums.dp_sq / n).sqrt()),
    };
    Ok((quality, reference.is_none().then_some(mine)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact KL divergence over the whole vocabulary.
    fn exact(p: &[f32], q: &[f32]) -> f64 {
        let (lp, lq) = (log_sum_exp(p).0, log_sum_exp(q).0);
        p.iter()
            .zip(q)
            .map(|(&a, &b)| {
                let (la, lb) = (f64::from(a) - lp, f64::from(b) - lq);
                la.exp() * (la - lb)
            })
            .sum()
    }

    fn reference_row(p: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
        let lse = log_sum_exp(p).0;
        let top = top_k(p, k, &mut Vec::new()).to_vec();
        let logp = top
            .iter()
            .map(|&t| (f64::from(p[t as usize]) - lse) as f32)
            .collect();
        (top, logp)
    }

    /// Two made-up rows of logits over a 1,000-token vocabulary: a peaked one, and one
    /// nudged from it as a quantization nudges a model.
    fn rows() -> (Vec<f32>, Vec<f32>) {
        let p: Vec<f32> = (0..1000)
            .map(|i| 12.0 * (-(i as f32) / 40.0).exp() + ((i * 7919) % 13) as f32 * 0.05)
            .collect();
        let q: Vec<f32> = p
            .iter()
            .enumerate()
            .map(|(i, &l)| l + ((i * 104_729) % 17) as f32 * 0.03 - 0.25)
            .collect();
        (p, q)
    }

    #[test]
    fn log_sum_exp_and_argmax_match_the_definitions() {
        let row = [1.0f32, 3.0, 3.0, -2.0];
        let (lse, best) = log_sum_exp(&row);
        let direct = row.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        assert!((lse - direct).abs() < 1e-12, "{lse} {direct}");
        assert_eq!(best, 1, "the first of equal maxima");
        // Large logits do not overflow.
        let (lse, _) = log_sum_exp(&[1000.0, 1000.0]);
        assert!((lse - (1000.0 + 2f64.ln())).abs() < 1e-9);
    }

    #[test]
    fn percentiles_are_nearest_ranks() {
        let mut v: Vec<f64> = (1..=200).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.99), 198.0);
        assert_eq!(percentile(&mut v, 0.5), 100.0);
        assert_eq!(percentile(&mut v, 1.0), 200.0);
        assert_eq!(percentile(&mut [3.0], 0.99), 3.0);
        assert_eq!(percentile(&mut [], 0.99), 0.0);
    }

    #[test]
    fn top_k_is_the_largest_in_order() {
        let row = [0.5f32, 9.0, -1.0, 7.0, 8.0, 7.5];
        let mut scratch = Vec::new();
        assert_eq!(top_k(&row, 3, &mut scratch), [1, 4, 5]);
        assert_eq!(top_k(&row, 10, &mut scratch), [1, 4, 5, 3, 0, 2]);
    }

    #[test]
    fn divergence_is_zero_for_the_same_model_and_close_to_the_exact_figure() {
        let (p, q) = rows();
        let (top, logp) = reference_row(&p, 32);
        let same = divergence(&top, &logp, &p, log_sum_exp(&p).0);
        assert!(same.abs() < 1e-6, "{same}");

        let full = exact(&p, &q);
        let bucketed = divergence(&top, &logp, &q, log_sum_exp(&q).0);
        assert!(full > 1e-3, "the rows differ: {full}");
        // Grouping outcomes never raises a divergence, and the top tokens hold most of it.
        assert!(bucketed <= full + 1e-9, "{bucketed} > {full}");
        assert!(bucketed > 0.8 * full, "{bucketed} vs {full}");
        // Over the whole vocabulary it is the exact figure.
        let (all, all_logp) = reference_row(&p, p.len());
        let whole = divergence(&all, &all_logp, &q, log_sum_exp(&q).0);
        assert!((whole - full).abs() < 1e-6, "{whole} vs {full}");
    }

    #[test]
    fn a_model_that_rules_out_the_rest_is_charged_finitely() {
        // The reference keeps 2 tokens of 3 in its top and puts mass on the third; the
        // other model puts none there.
        let p = [2.0f32, 1.5, 1.0];
        let q = [5.0f32, 4.0, -1.0e9];
        let (top, logp) = reference_row(&p, 2);
        let kl = divergence(&top, &logp, &q, log_sum_exp(&q).0);
        assert!(kl.is_finite() && kl > 1.0, "{kl}");
    }

    #[test]
    fn a_long_text_keeps_fewer_tokens_per_position() {
        // The built-in text: 510 positions, 4,096 tokens each (16 MiB).
        assert_eq!(kept(510, 49_152), TOP);
        // A vocabulary smaller than that is kept whole.
        assert_eq!(kept(510, 1000), 1000);
        // 140,000 positions (a long corpus) would be 4.3 GiB at 4,096: 239 keep it to 256 MiB.
        assert_eq!(kept(140_000, 262_144), 239);
        assert!(kept(140_000, 262_144) * 8 * 140_000 <= REFERENCE_BYTES);
        assert_eq!(kept(usize::MAX / 2, 262_144), 64);
    }

    #[test]
    fn texts_are_cut_into_whole_chunks_or_refused_when_short() {
        assert_eq!(layout(1100, true, 8192, None), Ok((512, 2)));
        assert_eq!(layout(1100, false, 8192, None), Ok((512, 2)));
        // BOS counts in the first chunk.
        assert_eq!(layout(1023, true, 8192, None), Ok((512, 2)));
        assert_eq!(layout(1022, true, 8192, None), Ok((512, 1)));
        assert_eq!(layout(1023, false, 8192, None), Ok((512, 1)));
        // A short training context makes the chunks shorter.
        assert_eq!(layout(1100, false, 256, None), Ok((256, 4)));
        // A text shorter than a chunk is one chunk of itself.
        assert_eq!(layout(300, true, 8192, None), Ok((301, 1)));
        assert_eq!(layout(64, false, 8192, None), Ok((64, 1)));
        assert_eq!(layout(64, true, 8192, None), Ok((65, 1)));
        let short = layout(63, false, 8192, None).unwrap_err();
        assert!(
            short.contains("63 tokens") && short.contains("at least 64"),
            "{short}"
        );
        // Chunks of the length asked for: within the training context, the text filling one.
        assert_eq!(layout(1100, true, 8192, Some(128)), Ok((128, 8)));
        assert_eq!(layout(1100, true, 8192, Some(1024)), Ok((1024, 1)));
        let long = layout(1100, true, 8192, Some(2048)).unwrap_err();
        assert_eq!(
            long,
            "1101 tokens, less than one chunk of 2048 (--quality-chunk)"
        );
        let beyond = layout(100_000, true, 8192, Some(16384)).unwrap_err();
        assert!(beyond.contains("training context of 8192"), "{beyond}");
    }
}
