//! The one request both APIs convert into ([`Valid`]), and how it becomes the engine's
//! [`GenerateRequest`] once the model is known: the model's defaults fill what the request
//! left out, and its chat template renders the conversation.

use crate::api::tools::{self, Toolbox};
use crate::config::KeepAlive;
use crate::engine::{
    ChatMessage, Drafts, EngineError, FinishReason, GenerateRequest, Generation, InvalidField,
    Overflow, Role, SamplingOverrides, Timings, TokenEvent, Usage,
};
use crate::models::Lease;

/// Most stop strings per request.
pub(crate) const MAX_STOP: usize = 16;

/// What the model should read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input {
    /// A conversation, rendered by the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text, used as is.
    Text(String),
    /// Fill in the middle: the model writes what goes between `prompt` and `suffix`.
    Infill {
        /// Text before the gap.
        prompt: String,
        /// Text after the gap.
        suffix: String,
    },
}

/// A checked request, independent of the API and endpoint it came from.
#[derive(Debug, Clone)]
pub(crate) struct Valid {
    /// The model name as the client wrote it (echoed back in answers).
    pub(crate) model: String,
    /// Stream the answer.
    pub(crate) stream: bool,
    /// OpenAI: end the stream with a usage chunk.
    pub(crate) include_usage: bool,
    pub(crate) input: Input,
    pub(crate) sampling: SamplingOverrides,
    pub(crate) max_tokens: Option<u32>,
    pub(crate) stop: Option<Vec<String>>,
    pub(crate) ignore_eos: bool,
    /// Reuse cached prompt prefixes (llama.cpp server's `cache_prompt`, default true).
    pub(crate) cache_prompt: bool,
    /// Bounds on the tokens drafted per step (llama.cpp server's `speculative.n_max` and
    /// `speculative.n_min`).
    pub(crate) speculate: Drafts,
    /// How long the model should stay loaded afterwards (Ollama's `keep_alive`).
    pub(crate) keep_alive: Option<KeepAlive>,
    /// Context tokens this request may use, if less than the model's (Ollama's `num_ctx`).
    pub(crate) ctx_limit: Option<u32>,
    /// What to do with a prompt longer than the context.
    pub(crate) overflow: Overflow,
    /// A grammar (GBNF) the answer must follow: structured output.
    pub(crate) grammar: Option<String>,
    /// When set, the grammar applies only from this text on (a lazy grammar).
    pub(crate) grammar_trigger: Option<String>,
    /// Tools were offered: they go into the prompt, and the answer is parsed for calls.
    pub(crate) tools: Option<Toolbox>,
}

impl Valid {
    /// A request with every optional part unset.
    pub(crate) fn new(model: String, input: Input) -> Valid {
        Valid {
            model,
            stream: false,
            include_usage: false,
            input,
            sampling: SamplingOverrides::default(),
            max_tokens: None,
            stop: None,
            ignore_eos: false,
            cache_prompt: true,
            speculate: Drafts::default(),
            keep_alive: None,
            ctx_limit: None,
            overflow: Overflow::Refuse,
            grammar: None,
            grammar_trigger: None,
            tools: None,
        }
    }
}

/// A field with a bad value: each API answers it with a 400 in its own shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// The field, e.g. `messages[0].role` or `options.top_p`.
    pub(crate) param: String,
    /// What is wrong.
    pub(crate) message: String,
}

impl Invalid {
    pub(crate) fn new(param: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            param: param.into(),
            message: message.into(),
        }
    }
}

impl From<InvalidField> for Invalid {
    fn from(e: InvalidField) -> Self {
        Invalid::new(e.field, e.to_string())
    }
}

/// Checks a stop list's length.
pub(crate) fn check_stop(list: &[String], param: &str) -> Result<(), Invalid> {
    if list.len() > MAX_STOP {
        return Err(Invalid::new(
            param,
            format!(
                "at most {MAX_STOP} stop strings are allowed, got {}",
                list.len()
            ),
        ));
    }
    Ok(())
}

/// Applies the model's defaults and renders the prompt.
pub(crate) fn generate_request(valid: &Valid, lease: &Lease) -> Result<GenerateRequest, Invalid> {
    let defaults = &lease.spec().defaults;
    let info = lease.engine().info();
    let ctx = valid
        .ctx_limit
        .map_or(info.ctx_per_slot, |c| c.min(info.ctx_per_slot));
    let max_tokens = valid.max_tokens.or(defaults.max_tokens);
    if let Some(n) = max_tokens {
        if n == 0 || n > ctx {
            return Err(Invalid::new(
                "max_tokens",
                format!(
                    "max_tokens must be between 1 and {ctx} (this model's context per request), got {n}"
                ),
            ));
        }
    }
    let prompt = match &valid.input {
        Input::Text(t) => t.clone(),
        Input::Infill { prompt, suffix } => match &info.fim {
            Some(f) => format!("{}{prompt}{}{suffix}{}", f.prefix, f.suffix, f.middle),
            None => {
                return Err(Invalid::new(
                    "suffix",
                    format!(
                        "model '{}' does not support insert (fill-in-the-middle)",
                        valid.model
                    ),
                ))
            }
        },
        Input::Chat(messages) => {
            let mut with_system;
            let messages = match &defaults.system {
                Some(system) if !messages.iter().any(|m| m.role == Role::System) => {
                    with_system = Vec::with_capacity(messages.len() + 1);
                    with_system.push(ChatMessage {
                        role: Role::System,
                        content: system.clone(),
                    });
                    with_system.extend_from_slice(messages);
                    &with_system
                }
                _ => messages,
            };
            // A template that knows about tools renders them itself (Qwen, Hermes, ...);
            // for the others they are described in a system message.
            let described;
            let (messages, tools): (&[ChatMessage], _) = match &valid.tools {
                Some(t) if info.template.handles_tools() => (messages, Some(t.definitions())),
                Some(t) => {
                    described = {
                        let mut m = messages.to_vec();
                        tools::describe(&mut m, t);
                        m
                    };
                    (&described[..], None)
                }
                None => (messages, None),
            };
            info.template.render(messages, tools, true).map_err(|e| {
                Invalid::new(
                    "messages",
                    format!("the model's chat template rejected these messages: {e}"),
                )
            })?
        }
    };
    Ok(GenerateRequest {
        prompt,
        sampling: valid.sampling.or(&defaults.sampling).resolve()?,
        max_tokens,
        stop: valid.stop.clone().unwrap_or_else(|| defaults.stop.clone()),
        ignore_eos: valid.ignore_eos,
        cache_prompt: valid.cache_prompt,
        speculate: valid.speculate,
        ctx_limit: valid.ctx_limit,
        overflow: valid.overflow,
        grammar: valid.grammar.clone(),
        grammar_trigger: valid.grammar_trigger.clone(),
    })
}

/// A whole answer, read to its end.
#[derive(Debug)]
pub(crate) struct Collected {
    pub(crate) text: String,
    pub(crate) finish: FinishReason,
    pub(crate) usage: Usage,
    pub(crate) timings: Timings,
}

/// Submits on the lease and waits until the engine has tokenized and queued the prompt, so
/// that errors such as a too-long prompt still get a real status code, even for streams.
pub(crate) async fn start<E>(valid: &Valid, lease: Lease) -> Result<Generation, E>
where
    E: From<Invalid> + From<EngineError>,
{
    let request = generate_request(valid, &lease)?;
    let mut generation = lease.submit(request)?;
    if let Some(ticket) = crate::security::audit::current() {
        let model = valid.model.clone();
        ticket.update(|r| r.model = Some(model));
        generation = generation.observe(move |e| {
            if let TokenEvent::Done { usage, .. } = e {
                ticket.update(|r| {
                    r.prompt_tokens = Some(usage.prompt_tokens);
                    r.completion_tokens = Some(usage.completion_tokens);
                });
            }
        });
    }
    match generation.next().await {
        Some(TokenEvent::Queued { .. }) => Ok(generation),
        Some(TokenEvent::Error(e)) => Err(e.into()),
        _ => Err(EngineError::Stopped.into()),
    }
}

/// Reads a generation to its end.
pub(crate) async fn collect(mut generation: Generation) -> Result<Collected, EngineError> {
    let mut text = String::new();
    loop {
        match generation.next().await {
            Some(TokenEvent::Token(t)) => text.push_str(&t),
            Some(TokenEvent::Done {
                finish,
                usage,
                timings,
            }) => {
                return Ok(Collected {
                    text,
                    finish,
                    usage,
                    timings,
                })
            }
            Some(TokenEvent::Error(e)) => return Err(e),
            Some(TokenEvent::Queued { .. }) => {}
            None => return Err(EngineError::Stopped),
        }
    }
}
