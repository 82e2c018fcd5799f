//! Embeddings: pooled hidden states of the loaded model, computed on the model's own engine
//! thread in a second llama.cpp context (created on the first embedding request, then kept)
//! so that embedding never touches the KV cache of the slots that generate.
//!
//! # Which configurations make llama.cpp abort, and how this module avoids them
//!
//! Read in llama.cpp as vendored by `llama-cpp-sys-2` 0.1.161 and confirmed with a probe
//! against SmolLM2. These abort the whole process (`GGML_ASSERT`), so they must be made
//! unreachable rather than handled:
//!
//! 1. **Mean pooling with `n_ubatch % n_seq_max != 0`.** When a context is created (and
//!    again on the first decode, `sched_reserve`), `llama_context::graph_reserve` builds the
//!    worst-case graph for `n_tokens = min(n_ctx, n_ubatch)` tokens over `n_seq_max`
//!    sequences, rounding `n_tokens` *up* to a multiple of `n_seq_max` but leaving
//!    `n_outputs = n_tokens` as it was. `build_pooling` (src/llama-graph.cpp) then multiplies
//!    the transposed `t_embd` (`n_outputs` rows, cut by `inp_out_ids`) with the `mean`
//!    input (`n_tokens` x `n_seqs`, from `build_inp_mean`): the shapes disagree and
//!    `ggml_mul_mat` fails `GGML_ASSERT(ggml_can_mul_mat(a, b))`. So `n_seq_max = 3` with
//!    `n_ubatch = 512` aborts, 4 with 512 or 3 with 510 do not. CLS and LAST pooling use
//!    `ggml_get_rows` and do not care; RANK with a mean classifier does, like MEAN.
//! 2. **`n_seq_max > n_batch`.** The constructor reserves outputs for `n_seq_max` sequences;
//!    `output_reserve` asserts `n_outputs_max <= cparams.n_outputs_max` (which is `n_batch`,
//!    itself capped at `n_ctx` for causal models).
//! 3. **More tokens in one `llama_decode` than `n_batch`**
//!    (`GGML_ASSERT(n_tokens_all <= cparams.n_batch)`), and, for non-causal models, than
//!    `n_ubatch` (`"non-causal attention requires n_ubatch >= n_tokens"`; models without a KV
//!    cache go through `encode`, which asserts `"encoder requires n_ubatch >= n_tokens"`).
//!
//! Not an abort but silently wrong: pooled outputs are written per micro-batch and the last
//! one wins, so a sequence split over several ubatches gets the mean of its last piece
//! only. With a per-sequence KV cache (`kv_unified = false`, `n_seq_max > 1`) llama.cpp
//! splits with `split_equal`, which takes the same number of tokens from every sequence
//! per ubatch, so inputs of unequal length *are* split (the probe gave a different vector
//! for the longer one). With `kv_unified = true` there is one stream and `split_simple`
//! keeps a batch of at most `n_ubatch` tokens in one ubatch.
//!
//! The configuration chosen here, therefore: `embeddings = true`, `kv_unified = true`,
//! `n_ctx = n_batch = n_ubatch = T` where `T = min(ctx per slot, configured batch)`, and
//! `n_seq_max = S`, the largest divisor of `T` not above [`MAX_SEQS`] (so `T % S == 0` and
//! `S <= T` by construction). Every input is validated before any decode: empty ones are
//! refused, longer ones than `T` truncated or refused; a decode packs whole inputs only, at
//! most `S` of them and at most `T` tokens in all, with sequence ids `0..S`, after clearing
//! the KV cache so positions start at 0. [`Embedder::decode`] re-checks all of this itself.
//!
//! Flash attention is on in this context wherever the operator did not choose, also on a CPU
//! where the generating context leaves it off ([`flash_attention`]).
//!
//! # The output layer is skipped
//!
//! llama.cpp builds a language model's graph with its output layer (the product of the
//! final hidden states with the vocabulary's matrix) and, in an embedding context, marks
//! every token an output, so it computes logits for every input token that nobody reads:
//! pooling takes the hidden states before that layer. For Gemma 3 270M, whose vocabulary
//! of 262,144 tokens makes that matrix 168M of its 268M weights, it was most of an
//! embedding decode's work. No setting of llama.cpp's API leaves it out, so the context's
//! graph callback ([`skip_output_layer`]), asked about each node before the graph is
//! computed, turns the product that reads the final norm's output (`result_norm`) into a
//! no-op; everything pooling reads is computed as before, so the vectors are the same to
//! the bit. `BACKSTOP_EMBED_OUTPUT_LAYER=1` computes it as llama.cpp would, to compare.
//!
//! `T` is the configured batch rather than the whole slot context on purpose: an embedding
//! context of a causal language model still holds logits for every token, so its compute
//! and output buffers grow with `T x n_vocab` (4096 tokens of Gemma 3's 262k vocabulary
//! would be over 4 GB); the batch size is what the operator already sized that cost for in
//! the generating context.

use std::ffi::{c_void, CStr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};

use llama_cpp_2::context::params::LlamaPoolingType;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use tokio::sync::oneshot;

use super::{loader, EngineError, EngineOptions};

/// Most inputs evaluated together in one decode. More gains little on a CPU and makes the
/// pooling matrix (`n_ubatch x n_seq_max` floats) larger.
pub(crate) const MAX_SEQS: u32 = 8;

/// The result of an embedding request.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One pooled vector per input, in input order; NOT normalized, because the APIs differ
    /// (Ollama's `/api/embed` and OpenAI normalize, Ollama's legacy `/api/embeddings` does not).
    pub vectors: Vec<Vec<f32>>,
    /// Tokens evaluated over all inputs (after any truncation).
    pub prompt_tokens: u32,
}

/// An embedding request on its way to the engine thread.
pub(crate) struct EmbedJob {
    pub(crate) inputs: Vec<String>,
    pub(crate) truncate: bool,
    pub(crate) reply: oneshot::Sender<Result<Embeddings, EngineError>>,
}

/// The size of the embedding context, chosen so that no llama.cpp assertion can fire (see
/// the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedShape {
    /// `n_ctx = n_batch = n_ubatch`: the most tokens of one decode, and so of one input.
    pub tokens: u32,
    /// `n_seq_max`: the most inputs of one decode; always divides `tokens`.
    pub seqs: u32,
}

impl EmbedShape {
    /// The shape for a model with this context per slot and batch size.
    pub fn new(ctx_per_slot: u32, batch: u32) -> EmbedShape {
        let tokens = ctx_per_slot.min(batch).max(1);
        let seqs = (1..=MAX_SEQS.min(tokens))
            .rev()
            .find(|s| tokens.is_multiple_of(*s))
            .unwrap_or(1);
        EmbedShape { tokens, seqs }
    }
}

/// How token states become one vector per input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pooling {
    /// Average over all tokens.
    Mean,
    /// The first token's state (BERT-style models).
    Cls,
    /// The last token's state (decoder embedding models such as Qwen3-Embedding).
    Last,
}

impl Pooling {
    /// The model's own pooling if its GGUF declares a usable one (`<arch>.pooling_type`:
    /// 1 mean, 2 cls, 3 last), else mean. Language models such as SmolLM2 and Gemma 3
    /// declare none; mean pooling over their final hidden states is what Ollama and
    /// llama.cpp's server use for them too. "None" (per-token output) and "rank" (a reranker
    /// score) do not give one vector per input, so they fall back to mean as well.
    pub(crate) fn from_gguf(declared: Option<i64>) -> Pooling {
        match declared {
            Some(2) => Pooling::Cls,
            Some(3) => Pooling::Last,
            _ => Pooling::Mean,
        }
    }

    /// Reads the declaration from the model's metadata.
    pub(crate) fn of(model: &LlamaModel) -> Pooling {
        let declared = model
            .meta_val_str("general.architecture")
            .ok()
            .and_then(|arch| model.meta_val_str(&format!("{arch}.pooling_type")).ok())
            .and_then(|v| v.trim().parse::<i64>().ok());
        Pooling::from_gguf(declared)
    }

    fn llama(self) -> LlamaPoolingType {
        match self {
            Pooling::Mean => LlamaPoolingType::Mean,
            Pooling::Cls => LlamaPoolingType::Cls,
            Pooling::Last => LlamaPoolingType::Last,
        }
    }
}

/// Checks tokenized inputs against the most tokens one input may have: an empty one is
/// refused; a longer one keeps its first `limit` tokens when `truncate` is set (Ollama's
/// behaviour) and is refused otherwise (OpenAI's).
pub(crate) fn fit<T>(
    mut inputs: Vec<Vec<T>>,
    limit: usize,
    truncate: bool,
) -> Result<Vec<Vec<T>>, EngineError> {
    for (index, tokens) in inputs.iter_mut().enumerate() {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput { index });
        }
        if tokens.len() > limit {
            if !truncate {
                return Err(EngineError::InputTooLong {
                    index,
                    tokens: tokens.len(),
                    limit,
                });
            }
            tokens.truncate(limit);
        }
    }
    Ok(inputs)
}

/// How many of the waiting inputs, of lengths `lens`, go into the next decode: as many whole
/// inputs as fit in `budget` tokens (at most the shape's) and `seqs` sequences, and always at
/// least one (each input alone fits the shape, see [`fit`]). The worker passes a smaller
/// budget while generations run, so that they wait for one long input at most, never for
/// many. The inputs are those of every waiting request in turn, the oldest's first, so that
/// requests of a few inputs each (one query from each of several clients) share a decode, as
/// llama.cpp's server puts its slots' inputs in one batch; the oldest never waits for a later
/// one.
pub(crate) fn next_batch(lens: &[usize], shape: EmbedShape, budget: usize) -> usize {
    let (max_tokens, max_seqs) = (budget.min(shape.tokens as usize), shape.seqs as usize);
    let mut used = 0;
    let mut n = 0;
    for &len in lens {
        if n == max_seqs || (n > 0 && used + len > max_tokens) {
            break;
        }
        used += len;
        n += 1;
    }
    n
}

/// An embedding request being worked on between decode steps.
pub(crate) struct EmbedTask<T> {
    /// Every input, tokenized and checked.
    pub(crate) tokens: Vec<Vec<T>>,
    /// Vectors of the inputs done so far.
    pub(crate) vectors: Vec<Vec<f32>>,
    pub(crate) reply: oneshot::Sender<Result<Embeddings, EngineError>>,
}

impl<T> EmbedTask<T> {
    /// Sends the result once every input has its vector (a client that has gone is noted);
    /// the task back while inputs are left.
    pub(crate) fn answer(mut self) -> Option<Self> {
        let Some(done) = self.result() else {
            return Some(self);
        };
        if self.reply.send(Ok(done)).is_err() {
            tracing::debug!("embedding client gone before its answer");
        }
        None
    }

    /// The result, once every input has its vector.
    fn result(&mut self) -> Option<Embeddings> {
        (self.vectors.len() == self.tokens.len()).then(|| Embeddings {
            vectors: std::mem::take(&mut self.vectors),
            prompt_tokens: self.tokens.iter().map(Vec::len).sum::<usize>() as u32,
        })
    }
}

/// The embedding context's flash attention, given the operator's `choice` and the model's
/// generating contexts' `fa`: on where they did not choose. On a CPU the generating context
/// leaves it off, because its kernel is slow for the few query rows of a decode step against
/// a deep cache; an embedding decode reads whole inputs from an empty cache, where it is the
/// faster one, as in llama.cpp's server (which turns it on for every model). On the 2-core
/// machine SmolLM2 embedded 100-token paragraphs at 0.88x llama-server's speed without it and
/// 1.03x with it, 18-token queries at 0.93x and 1.07x (`scripts/bench-embeddings.py`); the
/// vectors come within a cosine of 0.999 of those without.
fn flash_attention(
    choice: Option<bool>,
    fa: llama_cpp_sys_2::llama_flash_attn_type,
) -> llama_cpp_sys_2::llama_flash_attn_type {
    match (choice, fa) {
        (None, llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED) => {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
        }
        _ => fa,
    }
}

/// The name llama.cpp's graphs give the final norm's output, the hidden states that pooling
/// reads and the output layer multiplies.
const FINAL_NORM: &[u8] = b"result_norm";

/// Makes `t` a no-op if it is the output layer's product (a matrix product whose second
/// operand is the final norm's output), for a graph callback to call on each node before the
/// graph is computed; whether it was. Its operand is computed as before, so a callback that
/// reads the product's input still can.
///
/// # Safety
/// `t` must be a node of the graph about to be computed, not yet computed, on the thread
/// that computes it.
pub(crate) unsafe fn skip_output_product(t: &mut llama_cpp_sys_2::ggml_tensor) -> bool {
    let product = t.op == llama_cpp_sys_2::GGML_OP_MUL_MAT
        // A graph llama.cpp reuses keeps the no-op made at its first decode.
        || t.op == llama_cpp_sys_2::GGML_OP_NONE;
    // SAFETY: the sources of a live node are live tensors with NUL-terminated names.
    let skip = product
        && !t.src[1].is_null()
        && unsafe { CStr::from_ptr((*t.src[1]).name.as_ptr()) }.to_bytes() == FINAL_NORM;
    if skip {
        t.op = llama_cpp_sys_2::GGML_OP_NONE;
    }
    skip
}

/// How the logs name whether the output layer was left out (`output_layer=...`).
pub(crate) fn output_layer_name(skipped: bool) -> &'static str {
    if skipped {
        "skipped"
    } else {
        "computed"
    }
}

/// The embedding context's graph callback (see the module documentation): asked about each
/// node before the graph is computed, it skips the output layer's product
/// ([`skip_output_product`]) and counts it in `skipped` (an [`AtomicU32`]). It never asks to
/// see a node, so llama.cpp computes the graph in one piece as without a callback.
unsafe extern "C" fn skip_output_layer(
    t: *mut llama_cpp_sys_2::ggml_tensor,
    ask: bool,
    skipped: *mut c_void,
) -> bool {
    if !ask || t.is_null() {
        return true;
    }
    // SAFETY: a node of the graph about to be computed, on the thread that computes it and
    // before it does.
    if unsafe { skip_output_product(&mut *t) } && !skipped.is_null() {
        // SAFETY: the embedder's counter, which outlives its context.
        unsafe { &*skipped.cast::<AtomicU32>() }.fetch_add(1, Ordering::Relaxed);
    }
    false
}

/// The embedding context of one model.
pub(crate) struct Embedder<'m> {
    // Declared before `skipped`, so dropped before the counter its callback writes.
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    shape: EmbedShape,
    /// Output layers [`skip_output_layer`] made no-ops; `None` where it is not set.
    skipped: Option<Box<AtomicU32>>,
    /// Whether the last decode skipped its output layer.
    skipped_last: bool,
}

impl<'m> Embedder<'m> {
    /// Creates the context; an error (out of memory, say) fails this request only, and the
    /// next one tries again.
    pub(crate) fn new(
        backend: &LlamaBackend,
        model: &'m LlamaModel,
        options: &EngineOptions,
        fa: llama_cpp_sys_2::llama_flash_attn_type,
        shape: EmbedShape,
        pooling: Pooling,
    ) -> Result<Embedder<'m>, EngineError> {
        let fa = flash_attention(options.flash_attention, fa);
        let mut params = loader::shared_params(options, fa)
            .with_embeddings(true)
            .with_pooling_type(pooling.llama())
            .with_n_ctx(NonZeroU32::new(shape.tokens))
            .with_n_batch(shape.tokens)
            .with_n_ubatch(shape.tokens)
            .with_n_seq_max(shape.seqs)
            .with_kv_unified(true);
        let skipped = (std::env::var_os("BACKSTOP_EMBED_OUTPUT_LAYER").as_deref()
            != Some("1".as_ref()))
        .then(|| Box::new(AtomicU32::new(0)));
        if let Some(counter) = &skipped {
            // SAFETY: the callback reads nothing but its node and the counter, which the
            // embedder keeps (boxed, so it does not move) until after the context.
            params = unsafe {
                loader::with_eval_callback(
                    params,
                    Some(skip_output_layer),
                    std::ptr::from_ref::<AtomicU32>(counter).cast_mut().cast(),
                )
            };
        }
        let ctx = model
            .new_context(backend, params)
            .map_err(|e| EngineError::Embeddings(format!("cannot create the context: {e}")))?;
        tracing::info!(
            model = %options.name,
            tokens = shape.tokens,
            seqs = shape.seqs,
            ?pooling,
            flash_attention = %loader::flash_attention_name(fa),
            output_layer = %output_layer_name(skipped.is_some()),
            "embedding context created"
        );
        Ok(Embedder {
            ctx,
            batch: LlamaBatch::new(shape.tokens as usize, 1),
            shape,
            skipped,
            skipped_last: false,
        })
    }

    /// Whether the last decode left out the output layer (see the module documentation).
    pub(crate) fn skipped_output_layer(&self) -> bool {
        self.skipped_last
    }

    /// Evaluates `inputs` as one batch of separate sequences and returns their pooled
    /// vectors in order. Refuses, before calling llama.cpp, anything outside the shape the
    /// context was built for, so no caller can reach one of llama.cpp's assertions.
    pub(crate) fn decode(
        &mut self,
        inputs: &[&[llama_cpp_2::token::LlamaToken]],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let total: usize = inputs.iter().map(|i| i.len()).sum();
        if inputs.is_empty()
            || inputs.len() > self.shape.seqs as usize
            || total > self.shape.tokens as usize
            || inputs.iter().any(|i| i.is_empty())
        {
            return Err(EngineError::Embeddings(format!(
                "refusing a batch of {} inputs and {total} tokens outside the context's shape {:?}",
                inputs.len(),
                self.shape
            )));
        }
        // Positions restart at 0 for every input: llama.cpp requires each sequence's
        // positions to follow on from what its cache holds.
        loader::forget_all(&mut self.ctx);
        self.batch.clear();
        let decode_err = |e: &dyn std::fmt::Display| EngineError::Decode(e.to_string());
        for (seq, tokens) in inputs.iter().enumerate() {
            for (pos, &token) in tokens.iter().enumerate() {
                self.batch
                    .add(token, pos as i32, &[seq as i32], true)
                    .map_err(|e| decode_err(&e))?;
            }
        }
        let before = self.skipped.as_ref().map(|c| c.load(Ordering::Relaxed));
        let decoded =
            super::graphs::decode(&mut self.ctx, &mut self.batch).map_err(|e| decode_err(&e));
        self.skipped_last = before != self.skipped.as_ref().map(|c| c.load(Ordering::Relaxed));
        let vectors = decoded.and_then(|()| {
            (0..inputs.len())
                .map(|seq| {
                    self.ctx
                        .embeddings_seq_ith(seq as i32)
                        .map(<[f32]>::to_vec)
                        .map_err(|e| decode_err(&e))
                })
                .collect()
        });
        vectors
    }
}

/// Scales a vector to unit length (a zero vector stays zero), as Ollama's `/api/embed` and
/// OpenAI return them.
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in v.iter_mut() {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

/// Keeps the first `dimensions` components and scales the rest back to unit length: what
/// Ollama and OpenAI do for a requested `dimensions` (Matryoshka-style shortening).
pub fn shorten(v: &mut Vec<f32>, dimensions: usize) {
    v.truncate(dimensions);
    l2_normalize(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_take_flash_attention_unless_the_operator_chose() {
        use llama_cpp_sys_2::{
            LLAMA_FLASH_ATTN_TYPE_AUTO as AUTO, LLAMA_FLASH_ATTN_TYPE_DISABLED as OFF,
            LLAMA_FLASH_ATTN_TYPE_ENABLED as ON,
        };
        assert_eq!(flash_attention(None, OFF), ON, "a CPU's default");
        assert_eq!(
            flash_attention(None, AUTO),
            AUTO,
            "a GPU's: llama.cpp decides"
        );
        assert_eq!(flash_attention(Some(false), OFF), OFF);
        assert_eq!(flash_attention(Some(true), ON), ON);
        assert_eq!(flash_attention(None, ON), ON, "a quantized KV cache");
    }

    #[test]
    fn the_shape_never_has_more_sequences_than_tokens_nor_a_remainder() {
        for tokens in 1..=4100 {
            for batch in [1, 3, 7, 64, 100, 512, 4096] {
                let s = EmbedShape::new(tokens, batch);
                assert!(s.seqs >= 1 && s.seqs <= MAX_SEQS && s.seqs <= s.tokens);
                assert_eq!(s.tokens % s.seqs, 0, "{s:?}");
                assert_eq!(s.tokens, tokens.min(batch));
            }
        }
        assert_eq!(
            EmbedShape::new(4096, 512),
            EmbedShape {
                tokens: 512,
                seqs: 8
            }
        );
        // The slot count does not matter: 170 tokens (3 slots of a 512 context) get 5.
        assert_eq!(
            EmbedShape::new(170, 512),
            EmbedShape {
                tokens: 170,
                seqs: 5
            }
        );
        assert_eq!(EmbedShape::new(0, 512).tokens, 1);
    }

    #[test]
    fn pooling_follows_the_gguf_and_falls_back_to_mean() {
        assert_eq!(Pooling::from_gguf(None), Pooling::Mean);
        assert_eq!(Pooling::from_gguf(Some(0)), Pooling::Mean);
        assert_eq!(Pooling::from_gguf(Some(1)), Pooling::Mean);
        assert_eq!(Pooling::from_gguf(Some(2)), Pooling::Cls);
        assert_eq!(Pooling::from_gguf(Some(3)), Pooling::Last);
        assert_eq!(Pooling::from_gguf(Some(4)), Pooling::Mean);
    }

    #[test]
    fn inputs_are_refused_when_empty_and_truncated_or_refused_when_too_long() {
        let ok = fit(vec![vec![1, 2], vec![3]], 2, false).unwrap();
        assert_eq!(ok, vec![vec![1, 2], vec![3]]);
        assert_eq!(
            fit(vec![vec![1], Vec::<i32>::new()], 4, true),
            Err(EngineError::EmptyInput { index: 1 })
        );
        assert_eq!(
            fit(vec![vec![1], vec![1, 2, 3]], 2, false),
            Err(EngineError::InputTooLong {
                index: 1,
                tokens: 3,
                limit: 2
            })
        );
        assert_eq!(fit(vec![vec![1, 2, 3]], 2, true).unwrap(), vec![vec![1, 2]]);
    }

    #[test]
    fn batches_take_whole_inputs_within_the_token_and_sequence_bounds() {
        let shape = EmbedShape {
            tokens: 10,
            seqs: 2,
        };
        let lens = [4, 4, 4, 10, 1];
        assert_eq!(next_batch(&lens, shape, 10), 2);
        assert_eq!(
            next_batch(&lens[2..], shape, 10),
            1,
            "4 + 10 exceeds 10 tokens"
        );
        assert_eq!(next_batch(&lens[3..], shape, 10), 1);
        assert_eq!(next_batch(&lens[4..], shape, 10), 1);
        assert_eq!(next_batch(&lens[5..], shape, 10), 0);
        let one = EmbedShape {
            tokens: 10,
            seqs: 1,
        };
        assert_eq!(next_batch(&[1, 1, 1], one, 10), 1);
        // A smaller budget packs fewer inputs but still takes one that exceeds it alone;
        // a larger one cannot stretch the shape.
        assert_eq!(next_batch(&lens, shape, 5), 1);
        assert_eq!(next_batch(&lens[3..], shape, 5), 1);
        assert_eq!(next_batch(&[6, 6], shape, 100), 1);
    }

    #[test]
    fn normalized_vectors_have_unit_length_and_keep_their_direction() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut zero = vec![0.0, 0.0];
        l2_normalize(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
        let mut long = vec![3.0, 4.0, 12.0];
        shorten(&mut long, 2);
        assert_eq!(long, vec![0.6, 0.8]);
    }
}
