//! Builds llama.cpp's sampler chain from validated [`SamplingParams`].

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;

use super::SamplingParams;

/// llama.cpp reads this seed as "draw a random one".
const RANDOM_SEED: u32 = u32::MAX;

/// The chain, in llama.cpp server's order: penalties, then the truncations (top-k, top-p,
/// min-p), then temperature, then the random draw. Temperature 0 is plain argmax, so the
/// output does not depend on the seed at all.
/// `banned` tokens (end-of-generation ones, for `ignore_eos`) get a logit of minus infinity
/// before anything else runs but the grammar of structured output.
pub(crate) fn build(
    params: &SamplingParams,
    n_vocab: i32,
    prompt: &[LlamaToken],
    banned: &[LlamaToken],
    grammar: Option<LlamaSampler>,
) -> LlamaSampler {
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
        chain.push(LlamaSampler::penalties(
            n_vocab,
            params.repeat_last_n,
            params.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        ));
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
    let mut sampler = LlamaSampler::chain_simple(chain);
    if params.has_penalties() {
        // Like llama.cpp's server, the penalties also see the end of the prompt, so the model
        // is discouraged from parroting it back.
        // A negative window means the whole context, as in llama.cpp.
        let n = usize::try_from(params.repeat_last_n).unwrap_or(prompt.len());
        sampler.accept_many(&prompt[prompt.len().saturating_sub(n)..]);
    }
    sampler
}
