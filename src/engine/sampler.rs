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
    LlamaSampler::chain_simple(chain)
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

    #[test]
    fn a_negative_penalty_window_is_the_whole_context() {
        assert_eq!(penalty_window(-1, 2048), 2048);
        assert_eq!(penalty_window(0, 2048), 0);
        assert_eq!(penalty_window(64, 2048), 64);
    }
}
