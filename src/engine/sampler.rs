//! Builds llama.cpp's sampler chain from validated [`SamplingParams`].

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;

use super::SamplingParams;

/// llama.cpp reads this seed as "draw a random one".
const RANDOM_SEED: u32 = u32::MAX;

/// Plain greedy requests (no penalties, no grammar) pick by [`Sampler::Argmax`]; the rest go
/// through llama.cpp's chain, in llama.cpp server's order: penalties, then the truncations
/// (top-k, top-p, min-p), then temperature, then the random draw. Temperature 0 is plain
/// argmax, so the output does not depend on the seed at all.
/// `banned` tokens (end-of-generation ones, for `ignore_eos`) get a logit of minus infinity
/// before anything else runs but the grammar of structured output; with a grammar the caller
/// bans nothing, since once the grammar is complete an end token is the only one it allows.
/// `context` is the request's context size: a negative `repeat_last_n` means all of it.
pub(crate) fn build(
    params: &SamplingParams,
    n_vocab: i32,
    context: usize,
    prompt: &[LlamaToken],
    banned: &[LlamaToken],
    grammar: Option<LlamaSampler>,
) -> Sampler {
    if params.temperature <= 0.0 && !params.has_penalties() && grammar.is_none() {
        return Sampler::Argmax {
            banned: banned.to_vec(),
        };
    }
    let mut chain = Vec::with_capacity(8);
    // The grammar goes first: tokens it forbids never reach the other samplers.
    chain.extend(grammar);
    if !banned.is_empty() {
        let biases: Vec<LlamaLogitBias> = banned
            .iter()
            .map(|&t| LlamaLogitBias::new(t, f32::NEG_INFINITY))
            .collect();
        chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
    }
    if params.has_penalties() {
        let window = penalty_window(params.repeat_last_n, context);
        let mut penalties = LlamaSampler::penalties(
            n_vocab,
            i32::try_from(window).unwrap_or(i32::MAX),
            params.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        );
        // Like llama.cpp's server, the penalties also see the end of the prompt, so the model
        // is discouraged from parroting it back. Only the penalties: a grammar fed the prompt
        // would have to accept tokens it cannot, and llama.cpp aborts the process then.
        penalties.accept_many(&prompt[prompt.len().saturating_sub(window)..]);
        chain.push(penalties);
    }
    if params.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if params.top_k > 0 {
            chain.push(LlamaSampler::top_k(params.top_k));
        }
        if params.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(params.top_p, 1));
        }
        if params.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(params.min_p, 1));
        }
        chain.push(LlamaSampler::temp(params.temperature));
        chain.push(LlamaSampler::dist(params.seed.unwrap_or(RANDOM_SEED)));
    }
    Sampler::Chain(LlamaSampler::chain_simple(chain))
}

/// How a request picks its tokens.
pub(crate) enum Sampler {
    /// Greedy with nothing before it but banned tokens: the first token with the highest
    /// logit among those not banned, read straight from the logits. llama.cpp's chain (a
    /// logit bias of minus infinity, then its greedy sampler) picks the same token, but first
    /// copies every logit into a candidate array: 77–115 µs a token for SmolLM2's 49,152 on
    /// the 2-core machine, against about 42 µs for this scan.
    Argmax { banned: Vec<LlamaToken> },
    /// llama.cpp's chain, for everything else.
    Chain(LlamaSampler),
}

impl Sampler {
    /// The next token from the logits of batch row `idx` (which the caller asked for).
    pub(crate) fn sample(&mut self, ctx: &LlamaContext<'_>, idx: i32) -> LlamaToken {
        match self {
            Sampler::Argmax { banned } => argmax(ctx.get_logits_ith(idx), banned),
            Sampler::Chain(chain) => chain.sample(ctx, idx),
        }
    }

    /// The next token from logits kept from an earlier decode, as [`Sampler::sample`] would
    /// pick it from a context's: the whole vocabulary, unsorted, through the chain, which then
    /// accepts the token. `None` only if the chain selected nothing (every chain ends in a
    /// sampler that selects one).
    pub(crate) fn sample_logits(&mut self, logits: &[f32]) -> Option<LlamaToken> {
        match self {
            Sampler::Argmax { banned } => Some(argmax(logits, banned)),
            Sampler::Chain(chain) => {
                let mut candidates = LlamaTokenDataArray::from_iter(
                    (0..)
                        .zip(logits)
                        .map(|(id, &logit)| LlamaTokenData::new(LlamaToken(id), logit, 0.0)),
                    false,
                );
                candidates.apply_sampler(chain);
                let token = candidates.selected_token()?;
                chain.accept(token);
                Some(token)
            }
        }
    }
}

/// The greedy pick over a row of logits, as a plain greedy request's [`Sampler::Argmax`]
/// makes it (`backstop bench` generates this way, so it measures what the server does).
pub(crate) fn greedy(logits: &[f32]) -> LlamaToken {
    argmax(logits, &[])
}

/// llama.cpp's greedy pick over the logits with `banned` ones biased by minus infinity: the
/// first index whose logit is greater than every earlier pick's, starting from index 0. The
/// pick over the unmodified logits is that token unless it is banned, since a ban only lowers
/// a logit; only then are the logits copied and biased (as llama.cpp adds a bias: a NaN logit
/// stays NaN) and scanned again.
fn argmax(logits: &[f32], banned: &[LlamaToken]) -> LlamaToken {
    let id = |i: usize| LlamaToken(i32::try_from(i).unwrap_or(i32::MAX));
    let plain = first_max(logits);
    if !banned.contains(&id(plain)) {
        return id(plain);
    }
    let mut biased = logits.to_vec();
    for b in banned {
        if let Some(l) = usize::try_from(b.0).ok().and_then(|i| biased.get_mut(i)) {
            *l += f32::NEG_INFINITY;
        }
    }
    id(first_max(&biased))
}

/// llama.cpp's greedy scan: the first index whose value beats every earlier pick's. That is
/// index 0 when logit 0 is NaN (nothing compares greater than NaN), and otherwise the first
/// index holding the largest value that is not NaN. It is found in two passes that compile to
/// vector instructions (the maximum of 16 lanes, then the first block of 16 holding it), as a
/// one-at-a-time scan, whose every step waits on the last comparison, does not: over Gemma 3's
/// 262,144 logits 45 against 280 µs on the Xeon we measure on, which every greedy token pays,
/// 1.4% of a 20 ms CPU step and more of a GPU's.
fn first_max(logits: &[f32]) -> usize {
    const LANES: usize = 16;
    let Some(&first) = logits.first() else {
        return 0;
    };
    if first.is_nan() {
        return 0;
    }
    let blocks = logits.chunks_exact(LANES);
    let tail = blocks.remainder();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for block in blocks {
        for (lane, &v) in lanes.iter_mut().zip(block) {
            // f32::max passes over a NaN, as the scan's `>` does.
            *lane = lane.max(v);
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let holds_max = |block: &[f32]| block.iter().fold(false, |hit, &v| hit | (v == max));
    let start = LANES * logits.chunks(LANES).position(holds_max).unwrap_or(0);
    start + logits[start..].iter().position(|&v| v == max).unwrap_or(0)
}

/// How many recent tokens the penalties look at. A negative `repeat_last_n` means the whole
/// context, as in llama.cpp and Ollama (llama.cpp's sampler itself would read it as 0 and
/// silently switch the penalties off).
fn penalty_window(repeat_last_n: i32, context: usize) -> usize {
    usize::try_from(repeat_last_n).unwrap_or(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What llama.cpp's logit bias and greedy sampler do, written out plainly.
    fn reference(logits: &[f32], banned: &[LlamaToken]) -> LlamaToken {
        let biased: Vec<f32> = (0..logits.len())
            .map(|i| {
                if banned.contains(&LlamaToken(i as i32)) {
                    logits[i] + f32::NEG_INFINITY
                } else {
                    logits[i]
                }
            })
            .collect();
        let mut selected = 0;
        for i in 1..biased.len() {
            if biased[i] > biased[selected] {
                selected = i;
            }
        }
        LlamaToken(selected as i32)
    }

    #[test]
    fn argmax_picks_what_the_greedy_chain_picks() {
        let t = |i: i32| LlamaToken(i);
        let cases: Vec<(Vec<f32>, Vec<LlamaToken>)> = vec![
            (vec![1.0, 3.0, 2.0], vec![]),
            (vec![1.0, 3.0, 3.0], vec![]),     // ties: the first
            (vec![1.0, 3.0, 3.0], vec![t(1)]), // the first max banned: the next
            (vec![5.0, 3.0, 4.0], vec![t(0)]), // token 0 banned
            (vec![5.0, 3.0, 4.0], vec![t(0), t(2)]),
            (vec![5.0, 3.0], vec![t(0), t(1)]), // everything banned: token 0
            (vec![f32::NAN, 3.0, 4.0], vec![]), // NaN at 0 sticks, as in llama.cpp
            (vec![f32::NAN, 3.0, 4.0], vec![t(0)]),
            (vec![1.0, f32::NAN, 4.0], vec![t(2)]),
            (vec![2.0], vec![]),
            (vec![f32::NEG_INFINITY; 3], vec![]),
            (vec![-1.0, -0.0, 0.0, -0.0], vec![]), // equal zeros: the first
            (vec![f32::NEG_INFINITY, f32::NAN, f32::NAN], vec![]),
        ];
        for (logits, banned) in cases {
            assert_eq!(
                argmax(&logits, &banned),
                reference(&logits, &banned),
                "{logits:?} banned {banned:?}"
            );
            // And llama.cpp's own samplers (logit bias, then greedy) over the same logits.
            let biases: Vec<LlamaLogitBias> = banned
                .iter()
                .map(|&t| LlamaLogitBias::new(t, f32::NEG_INFINITY))
                .collect();
            let mut llama = Sampler::Chain(LlamaSampler::chain_simple([
                LlamaSampler::logit_bias(logits.len() as i32, &biases),
                LlamaSampler::greedy(),
            ]));
            assert_eq!(
                llama.sample_logits(&logits),
                Some(argmax(&logits, &banned)),
                "llama.cpp: {logits:?} banned {banned:?}"
            );
        }
        // A pseudo-random vocabulary with repeated values, bans on its maxima.
        let mut x = 12345u32;
        let logits: Vec<f32> = (0..49_152)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                ((x >> 16) % 200) as f32 / 10.0
            })
            .collect();
        let top: Vec<LlamaToken> = (0..logits.len())
            .filter(|&i| logits[i] == 19.9)
            .map(|i| t(i as i32))
            .collect();
        for n in 0..top.len().min(5) {
            let banned = &top[..n];
            assert_eq!(argmax(&logits, banned), reference(&logits, banned));
        }
    }

    /// The greedy pick reads its logits 16 at a time: a maximum in the first or the last
    /// block, in the part after the last whole block, or in two blocks at once, next to NaNs,
    /// infinities and signed zeros, is picked where the one-at-a-time scan picks it.
    #[test]
    fn argmax_over_blocks_of_logits_picks_the_first_maximum() {
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 7.0];
        for len in [1, 15, 16, 17, 31, 32, 33, 49, 64, 65] {
            for at in [0, len / 2, len - 1] {
                for &special in &specials {
                    for also in [None, Some(len - 1 - at), Some((at + 16) % len)] {
                        let mut logits: Vec<f32> = (0..len).map(|i| (i % 5) as f32).collect();
                        logits[at] = special;
                        if let Some(j) = also {
                            logits[j] = special;
                        }
                        assert_eq!(argmax(&logits, &[]), reference(&logits, &[]), "{logits:?}");
                    }
                }
            }
        }
        use proptest::prelude::*;
        let logit = prop_oneof![
            any::<f32>(),
            proptest::sample::select(specials.to_vec()),
            (0..4i8).prop_map(f32::from),
        ];
        proptest!(|(logits in proptest::collection::vec(logit, 1..100))| {
            prop_assert_eq!(argmax(&logits, &[]), reference(&logits, &[]));
        });
    }

    #[test]
    fn only_plain_greedy_skips_the_chain() {
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let sampled = SamplingParams {
            temperature: 0.7,
            ..SamplingParams::default()
        };
        let penalised = SamplingParams {
            repeat_penalty: 1.3,
            ..greedy.clone()
        };
        let argmax = |s: &Sampler| matches!(s, Sampler::Argmax { .. });
        assert!(argmax(&build(&greedy, 8, 64, &[], &[LlamaToken(1)], None)));
        assert!(!argmax(&build(&sampled, 8, 64, &[], &[], None)));
        assert!(!argmax(&build(&penalised, 8, 64, &[], &[], None)));
    }

    #[test]
    fn a_negative_penalty_window_is_the_whole_context() {
        assert_eq!(penalty_window(-1, 2048), 2048);
        assert_eq!(penalty_window(0, 2048), 0);
        assert_eq!(penalty_window(64, 2048), 64);
    }
}
