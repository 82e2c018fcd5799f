//! The one internal request type every API converts into, and the events a generation
//! streams back. Handlers for the OpenAI and Ollama APIs both build a [`GenerateRequest`]
//! and consume [`TokenEvent`]s; nothing here knows about HTTP.

use std::time::Duration;

use super::EngineError;

/// Sampling settings after validation: every field already holds a usable value, so the
/// engine never re-checks ranges.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); higher flattens the distribution.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: i32,
    /// Nucleus sampling; 1.0 disables.
    pub top_p: f32,
    /// Drop tokens below `min_p` times the best token's probability; 0.0 disables.
    pub min_p: f32,
    /// Multiplicative penalty on recently seen tokens; 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: i32,
    /// OpenAI-style additive penalty for any token already present; 0.0 disables.
    pub presence_penalty: f32,
    /// OpenAI-style additive penalty scaled by a token's count; 0.0 disables.
    pub frequency_penalty: f32,
    /// Fixed seed for reproducible sampling; `None` draws a fresh one per request.
    pub seed: Option<u32>,
}

impl Default for SamplingParams {
    /// The defaults of llama.cpp's own server, which most GGUF users are used to.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Whether the same request must give the same answer: greedy decoding or a fixed seed
    /// (a sampled answer without a seed differs every time anyway).
    pub fn reproducible(&self) -> bool {
        self.seed.is_some() || self.temperature <= 0.0
    }

    /// Whether any penalty is active, so the sampler needs the recent-token history.
    pub fn has_penalties(&self) -> bool {
        self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// A request's own bounds on the tokens drafted per step by prompt lookup (llama.cpp server's
/// `speculative.n_max` and `speculative.n_min`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drafts {
    /// The most; `None`: the model's `--speculate`, or `least` where that is less.
    pub most: Option<u32>,
    /// The fewest: a shorter guess is not checked, and one at least this long is checked at
    /// least this far whatever the measured costs say. 0: as the costs say.
    pub least: u32,
}

impl Drafts {
    /// The most tokens a step may draft, where the model's setting is `model`.
    pub fn most(self, model: u32) -> u32 {
        self.most.unwrap_or(model.max(self.least))
    }
}

/// A generation request in the engine's terms: text in, sampling rules, limits.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The full prompt text, chat template already applied. Special tokens in it
    /// (`<|im_start|>`) are parsed as such.
    pub prompt: String,
    /// How to pick each next token.
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens; `None` runs until end-of-generation or the end
    /// of the slot's context.
    pub max_tokens: Option<u32>,
    /// Strings that end generation; they never appear in the output.
    pub stop: Vec<String>,
    /// Never sample end-of-generation tokens, so exactly `max_tokens` come out (benchmarks).
    pub ignore_eos: bool,
    /// Reuse cached prompt prefixes; false reads the whole prompt as a fresh server would.
    pub cache_prompt: bool,
    /// This request's bounds on the tokens drafted per step by prompt lookup.
    pub speculate: Drafts,
    /// Context tokens this request may use (prompt plus answer), when less than a slot's.
    pub ctx_limit: Option<u32>,
    /// What to do with a prompt that does not fit.
    pub overflow: Overflow,
    /// A llama.cpp grammar (GBNF, root rule `root`) the answer must follow: structured output.
    pub grammar: Option<String>,
    /// When set, the grammar applies only once the answer contains this text (a lazy
    /// grammar: free text until a tool call opens).
    pub grammar_trigger: Option<String>,
}

/// What happens to a prompt longer than the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse the request (OpenAI's behaviour: HTTP 422).
    Refuse,
    /// Keep the first `keep` tokens and as many of the latest as fit, leaving room for the
    /// answer (Ollama's behaviour, its `num_keep`).
    Truncate {
        /// Tokens kept from the start of the prompt.
        keep: usize,
    },
}

/// Shortens a prompt that does not fit into `limit` context tokens: the first `keep` tokens
/// stay, then the latest ones, so that a quarter of the context (or `max_tokens`, if less;
/// at most half) remains for the answer.
pub(crate) fn truncate<T: Copy>(
    tokens: &[T],
    limit: usize,
    keep: usize,
    max_tokens: Option<u32>,
) -> Vec<T> {
    if tokens.len() < limit {
        return tokens.to_vec();
    }
    let reserve = max_tokens
        .map_or(limit / 4, |m| m as usize)
        .clamp(1, (limit / 2).max(1));
    let room = limit.saturating_sub(reserve).max(1);
    let keep = keep.min(room / 2);
    let tail = room - keep;
    let mut out = Vec::with_capacity(room);
    out.extend_from_slice(&tokens[..keep]);
    out.extend_from_slice(&tokens[tokens.len() - tail..]);
    out
}

/// Why a generation ended, as the APIs report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token or a stop string matched.
    Stop,
    /// `max_tokens` or the slot's context ran out.
    Length,
}

impl FinishReason {
    /// The wire name shared by OpenAI (`finish_reason`) and Ollama (`done_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Exact token counts for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the prompt, including any reused from the slot's cache.
    pub prompt_tokens: u32,
    /// Tokens sampled for the answer (end-of-generation tokens excluded).
    pub completion_tokens: u32,
    /// Prompt tokens whose KV entries were reused instead of recomputed.
    pub cached_tokens: u32,
}

/// Where the time of one request went; Ollama reports these fields verbatim.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Waiting for a free slot.
    pub queued: Duration,
    /// From admission to the first sampled token (prompt processing).
    pub prompt_eval: Duration,
    /// From the first sampled token to the last.
    pub eval: Duration,
}

/// What a generation streams back to its handler, in order: `Queued`, then any number of
/// `Token`s, then exactly one `Done` or `Error`.
#[derive(Debug)]
pub enum TokenEvent {
    /// The prompt was tokenized and fits; the request waits for (or has) a slot.
    Queued {
        /// Prompt length in tokens.
        prompt_tokens: u32,
    },
    /// The next piece of output text: whole UTF-8 characters, never part of a stop string.
    Token(String),
    /// Generation finished normally.
    Done {
        /// Why it ended.
        finish: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Time spent per phase.
        timings: Timings,
    },
    /// Generation could not start or broke off.
    Error(EngineError),
}

/// Sampling settings as a request or a model's defaults give them: any may be missing.
/// Both APIs and `models.toml` use these names (OpenAI's, which Ollama's options share).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingOverrides {
    /// See [`SamplingParams::temperature`].
    pub temperature: Option<f32>,
    /// See [`SamplingParams::top_k`].
    pub top_k: Option<i32>,
    /// See [`SamplingParams::top_p`].
    pub top_p: Option<f32>,
    /// See [`SamplingParams::min_p`].
    pub min_p: Option<f32>,
    /// See [`SamplingParams::repeat_penalty`].
    pub repeat_penalty: Option<f32>,
    /// See [`SamplingParams::repeat_last_n`].
    pub repeat_last_n: Option<i32>,
    /// See [`SamplingParams::presence_penalty`].
    pub presence_penalty: Option<f32>,
    /// See [`SamplingParams::frequency_penalty`].
    pub frequency_penalty: Option<f32>,
    /// Any integer; negative means "random", like Ollama's -1.
    pub seed: Option<i64>,
}

/// A sampling field outside its allowed range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} must be {expected}, got {got}")]
pub struct InvalidField {
    /// The field's name on the wire.
    pub field: &'static str,
    /// The allowed range, in words.
    pub expected: &'static str,
    /// What was given.
    pub got: String,
}

fn check<T: PartialOrd + Copy + std::fmt::Display>(
    field: &'static str,
    value: Option<T>,
    ok: impl Fn(T) -> bool,
    expected: &'static str,
) -> Result<(), InvalidField> {
    match value {
        Some(v) if !ok(v) => Err(InvalidField {
            field,
            expected,
            got: v.to_string(),
        }),
        _ => Ok(()),
    }
}

impl SamplingOverrides {
    /// Field by field: ours where set, otherwise `fallback`'s.
    pub fn or(&self, fallback: &SamplingOverrides) -> SamplingOverrides {
        SamplingOverrides {
            temperature: self.temperature.or(fallback.temperature),
            top_k: self.top_k.or(fallback.top_k),
            top_p: self.top_p.or(fallback.top_p),
            min_p: self.min_p.or(fallback.min_p),
            repeat_penalty: self.repeat_penalty.or(fallback.repeat_penalty),
            repeat_last_n: self.repeat_last_n.or(fallback.repeat_last_n),
            presence_penalty: self.presence_penalty.or(fallback.presence_penalty),
            frequency_penalty: self.frequency_penalty.or(fallback.frequency_penalty),
            seed: self.seed.or(fallback.seed),
        }
    }

    /// Checks every given value's range.
    pub fn validate(&self) -> Result<(), InvalidField> {
        let unit = |v: f32| (0.0..=1.0).contains(&v);
        check(
            "temperature",
            self.temperature,
            |v| (0.0..=2.0).contains(&v),
            "between 0 and 2",
        )?;
        check("top_k", self.top_k, |v| v >= 0, "0 (off) or more")?;
        check("top_p", self.top_p, unit, "between 0 and 1")?;
        check("min_p", self.min_p, unit, "between 0 and 1")?;
        check(
            "repeat_penalty",
            self.repeat_penalty,
            |v| v > 0.0 && v <= 10.0,
            "above 0 and at most 10",
        )?;
        check(
            "repeat_last_n",
            self.repeat_last_n,
            |v| v >= -1,
            "-1 (whole context) or more",
        )?;
        let pen = |v: f32| (-2.0..=2.0).contains(&v);
        check(
            "presence_penalty",
            self.presence_penalty,
            pen,
            "between -2 and 2",
        )?;
        check(
            "frequency_penalty",
            self.frequency_penalty,
            pen,
            "between -2 and 2",
        )?;
        Ok(())
    }

    /// Validates and fills the gaps with the engine defaults.
    pub fn resolve(&self) -> Result<SamplingParams, InvalidField> {
        self.validate()?;
        let d = SamplingParams::default();
        Ok(SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(d.repeat_last_n),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            // u32::MAX is llama.cpp's "random" marker, so fold real seeds below it.
            seed: self
                .seed
                .and_then(|s| u64::try_from(s).ok())
                .map(|s| (s % u64::from(u32::MAX)) as u32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_bounds_its_drafts_over_the_model_setting() {
        let asked = |most, least| Drafts { most, least };
        assert_eq!(asked(None, 0).most(8), 8, "the model's");
        assert_eq!(asked(Some(0), 0).most(8), 0, "turned off");
        assert_eq!(asked(Some(4), 0).most(0), 4, "turned on");
        assert_eq!(asked(None, 4).most(0), 4, "a fewest turns it on");
        assert_eq!(asked(None, 4).most(8), 8);
    }

    #[test]
    fn truncation_keeps_the_start_and_the_latest_tokens_and_leaves_room_to_answer() {
        let tokens: Vec<u32> = (0..100).collect();
        let t = truncate(&tokens, 40, 4, None);
        assert_eq!(t.len(), 30, "a quarter of the context stays free");
        assert_eq!(&t[..4], &[0, 1, 2, 3]);
        assert_eq!(*t.last().unwrap(), 99);
        assert_eq!(t[4], 74);
        let t = truncate(&tokens, 40, 4, Some(5));
        assert_eq!(t.len(), 35);
        assert_eq!(
            truncate(&tokens[..10], 40, 4, None).len(),
            10,
            "short prompts are untouched"
        );
    }

    #[test]
    fn request_values_win_over_model_defaults_field_by_field() {
        let model = SamplingOverrides {
            temperature: Some(0.2),
            top_k: Some(5),
            ..Default::default()
        };
        let req = SamplingOverrides {
            temperature: Some(0.0),
            ..Default::default()
        };
        let p = req.or(&model).resolve().unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_k, 5);
        assert_eq!(p.top_p, SamplingParams::default().top_p);
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let err = SamplingOverrides {
            top_p: Some(1.5),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert_eq!(err.field, "top_p");
        assert_eq!(err.to_string(), "top_p must be between 0 and 1, got 1.5");
    }

    #[test]
    fn negative_seed_means_random_and_big_seeds_stay_deterministic() {
        let s = |seed| {
            SamplingOverrides {
                seed: Some(seed),
                ..Default::default()
            }
            .resolve()
            .unwrap()
            .seed
        };
        assert_eq!(s(-1), None);
        assert_eq!(s(42), Some(42));
        assert_eq!(s(i64::MAX), s(i64::MAX));
        assert_ne!(s(i64::from(u32::MAX)), Some(u32::MAX));
    }
}
