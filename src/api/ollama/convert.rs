//! Parse, don't validate: Ollama request bodies become the shared [`Valid`] request. Types
//! are checked field by field (a wrong type is a 400 naming the field); options Ollama knows
//! but a llama.cpp server has no use for per request are accepted and ignored, as Ollama
//! ignores unknown ones.

use serde_json::{Map, Value};

use crate::api::request::{check_stop, Input, Invalid, Valid};
use crate::api::{structured, tools};
use crate::config::KeepAlive;
use crate::engine::{ChatMessage, Overflow, Role, SamplingOverrides};
use crate::models::Parameters;

/// Ollama's default `num_keep`: prompt tokens kept from the start when truncating.
const DEFAULT_NUM_KEEP: usize = 4;

/// The Ollama-specific parts of a generate or chat request.
#[derive(Debug)]
pub(crate) struct Extras {
    /// No prompt and no messages: only load (or, with `keep_alive: 0`, unload) the model.
    pub(crate) load_only: bool,
}

fn type_err(field: &str, expected: &str) -> Invalid {
    Invalid::new(field, format!("`{field}` must be {expected}"))
}

fn string<'a>(body: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, Invalid> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(type_err(field, "a string")),
    }
}

fn boolean(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, Invalid> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(type_err(field, "true or false")),
    }
}

/// The model name, required.
pub(crate) fn model(body: &Map<String, Value>) -> Result<String, Invalid> {
    // `name` is the field's old spelling, still sent by older clients.
    let m = string(body, "model")?.or(string(body, "name")?);
    match m {
        Some(m) if !m.trim().is_empty() => Ok(m.to_owned()),
        _ => Err(Invalid::new("model", "model is required")),
    }
}

/// `keep_alive`: a duration string or a number of seconds.
pub(crate) fn keep_alive(body: &Map<String, Value>) -> Result<Option<KeepAlive>, Invalid> {
    let parsed = match body.get("keep_alive") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .ok_or_else(|| "not a number".to_owned())
            .and_then(KeepAlive::from_seconds),
        Some(Value::String(s)) => KeepAlive::parse(s),
        Some(_) => Err("must be a duration such as \"5m\" or a number of seconds".to_owned()),
    };
    parsed
        .map(Some)
        .map_err(|m| Invalid::new("keep_alive", format!("invalid keep_alive: {m}")))
}

/// Ollama's `options` (and a Modelfile's parameters), checked by type.
#[derive(Debug, Default)]
pub(crate) struct Options {
    pub(crate) sampling: SamplingOverrides,
    pub(crate) num_ctx: Option<u32>,
    pub(crate) num_predict: Option<i64>,
    pub(crate) num_keep: Option<usize>,
    pub(crate) stop: Option<Vec<String>>,
}

impl Options {
    /// As a store entry's parameters.
    pub(crate) fn into_parameters(self) -> Parameters {
        Parameters::from_parts(
            &self.sampling,
            self.num_ctx,
            self.num_predict,
            self.stop.unwrap_or_default(),
        )
    }
}

/// Reads an options object; `path` names it in errors (`options` or `parameters`).
pub(crate) fn options(value: Option<&Value>, path: &str) -> Result<Options, Invalid> {
    let map = match value {
        None | Some(Value::Null) => return Ok(Options::default()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(type_err(path, "an object")),
    };
    let field = |k: &str| format!("{path}.{k}");
    let float = |k: &str, v: &Value| -> Result<f32, Invalid> {
        v.as_f64()
            .map(|f| f as f32)
            .ok_or_else(|| type_err(&field(k), "a number"))
    };
    let int = |k: &str, v: &Value| -> Result<i64, Invalid> {
        match v.as_i64() {
            Some(i) => Ok(i),
            // 42.0 from a client that only has floats.
            None => v
                .as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
                .ok_or_else(|| type_err(&field(k), "an integer")),
        }
    };
    let mut o = Options::default();
    for (k, v) in map {
        if v.is_null() {
            continue;
        }
        match k.as_str() {
            "temperature" => o.sampling.temperature = Some(float(k, v)?),
            "top_p" => o.sampling.top_p = Some(float(k, v)?),
            "min_p" => o.sampling.min_p = Some(float(k, v)?),
            "repeat_penalty" => o.sampling.repeat_penalty = Some(float(k, v)?),
            "presence_penalty" => o.sampling.presence_penalty = Some(float(k, v)?),
            "frequency_penalty" => o.sampling.frequency_penalty = Some(float(k, v)?),
            "top_k" => {
                o.sampling.top_k = Some(
                    i32::try_from(int(k, v)?)
                        .map_err(|_| type_err(&field(k), "a small integer"))?,
                )
            }
            "repeat_last_n" => {
                o.sampling.repeat_last_n = Some(
                    i32::try_from(int(k, v)?)
                        .map_err(|_| type_err(&field(k), "a small integer"))?,
                )
            }
            "seed" => o.sampling.seed = Some(int(k, v)?),
            "num_ctx" => {
                let n = int(k, v)?;
                o.num_ctx = Some(u32::try_from(n).ok().filter(|&n| n >= 2).ok_or_else(|| {
                    Invalid::new(field(k), format!("num_ctx must be at least 2, got {n}"))
                })?);
            }
            "num_predict" => {
                let n = int(k, v)?;
                if n < -2 || n == 0 {
                    return Err(Invalid::new(
                        field(k),
                        format!("num_predict must be positive, -1 (no limit) or -2 (fill the context), got {n}"),
                    ));
                }
                o.num_predict = Some(n);
            }
            "num_keep" => {
                let n = int(k, v)?;
                o.num_keep = Some(usize::try_from(n.max(0)).unwrap_or(0));
            }
            "stop" => {
                let list = match v {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(items) => items
                        .iter()
                        .map(|i| i.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| type_err(&field(k), "a list of strings"))?,
                    _ => return Err(type_err(&field(k), "a list of strings")),
                };
                check_stop(&list, &field(k))?;
                o.stop = Some(list);
            }
            // Load-time options (threads, GPU layers, batch, mmap...) belong to the server's
            // configuration, where every request shares them; sampler variants llama.cpp
            // dropped (tfs_z, mirostat, penalize_newline) have nothing to map to.
            other => tracing::debug!(option = other, "ignoring Ollama option"),
        }
    }
    o.sampling
        .validate()
        .map_err(|e| Invalid::new(field(e.field), e.to_string()))?;
    Ok(o)
}

/// Fields both endpoints share, applied to `valid`.
fn common(body: &Map<String, Value>, valid: &mut Valid) -> Result<(), Invalid> {
    valid.stream = boolean(body, "stream")?.unwrap_or(true);
    valid.keep_alive = keep_alive(body)?;
    let o = options(body.get("options"), "options")?;
    valid.sampling = o.sampling;
    valid.ctx_limit = o.num_ctx;
    valid.max_tokens = o.num_predict.and_then(|n| u32::try_from(n).ok());
    valid.stop = o.stop;
    valid.overflow = Overflow::Truncate {
        keep: o.num_keep.unwrap_or(DEFAULT_NUM_KEEP),
    };
    valid.grammar = match body.get("format") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if s == "json" => Some(structured::json_object()?),
        Some(Value::String(s)) => {
            return Err(Invalid::new(
                "format",
                format!("`{s}` is not a format: use \"json\" or a JSON schema object"),
            ))
        }
        Some(schema) => Some(structured::json_schema(schema, "format")?),
    };
    match body.get("think") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(Invalid::new(
                "think",
                "this model does not support thinking",
            ))
        }
    }
    Ok(())
}

fn no_images(value: Option<&Value>, field: &str) -> Result<(), Invalid> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(_) => Err(Invalid::new(
            field,
            "images are not supported: this server runs text-only models",
        )),
    }
}

fn object(body: &Value) -> Result<&Map<String, Value>, Invalid> {
    body.as_object()
        .ok_or_else(|| Invalid::new("body", "the request body must be a JSON object"))
}

/// Checks a `/api/generate` body.
pub(crate) fn generate(body: &Value) -> Result<(Valid, Extras), Invalid> {
    let body = object(body)?;
    let model = model(body)?;
    let prompt = string(body, "prompt")?.unwrap_or("");
    let system = string(body, "system")?;
    let suffix = string(body, "suffix")?.unwrap_or("");
    let raw = boolean(body, "raw")?.unwrap_or(false);
    no_images(body.get("images"), "images")?;
    if string(body, "template")?.is_some_and(|t| !t.is_empty()) {
        return Err(Invalid::new(
            "template",
            "custom Go templates are not supported: backstop renders the model's own chat template",
        ));
    }
    match body.get("context") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => {
            return Err(Invalid::new(
                "context",
                "the deprecated `context` token list is not supported; send the conversation to /api/chat",
            ))
        }
    }
    let input = if !suffix.is_empty() {
        Input::Infill {
            prompt: prompt.to_owned(),
            suffix: suffix.to_owned(),
        }
    } else if raw {
        Input::Text(prompt.to_owned())
    } else {
        let mut messages = Vec::with_capacity(2);
        if let Some(s) = system.filter(|s| !s.is_empty()) {
            messages.push(ChatMessage {
                role: Role::System,
                content: s.to_owned(),
            });
        }
        messages.push(ChatMessage {
            role: Role::User,
            content: prompt.to_owned(),
        });
        Input::Chat(messages)
    };
    let mut valid = Valid::new(model, input);
    common(body, &mut valid)?;
    Ok((
        valid,
        Extras {
            load_only: prompt.is_empty() && suffix.is_empty(),
        },
    ))
}

/// Checks a `/api/chat` body.
pub(crate) fn chat(body: &Value) -> Result<(Valid, Extras), Invalid> {
    let body = object(body)?;
    let model = model(body)?;
    let raw_messages = match body.get("messages") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(m)) => m.as_slice(),
        Some(_) => return Err(type_err("messages", "a list of messages")),
    };
    // Ollama has no tool_choice: the model decides.
    let toolbox = tools::parse(body.get("tools").unwrap_or(&Value::Null), &Value::Null)?;
    let mut messages = Vec::with_capacity(raw_messages.len());
    for (i, m) in raw_messages.iter().enumerate() {
        let path = |f: &str| format!("messages[{i}].{f}");
        let m = m
            .as_object()
            .ok_or_else(|| type_err(&format!("messages[{i}]"), "an object"))?;
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("tool") => Role::Tool,
            Some(other) => {
                return Err(Invalid::new(
                    path("role"),
                    format!("unknown role `{other}`; expected system, user, assistant or tool"),
                ))
            }
            None => return Err(type_err(&path("role"), "a string")),
        };
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(type_err(&path("content"), "a string")),
        };
        no_images(m.get("images"), &path("images"))?;
        let content = if role == Role::Assistant {
            let calls = tools::calls_of_message(
                m.get("tool_calls").unwrap_or(&Value::Null),
                &path("tool_calls"),
            )?;
            tools::render_calls(&content, &calls)
        } else {
            content
        };
        messages.push(ChatMessage { role, content });
    }
    let load_only = messages.is_empty();
    let mut valid = Valid::new(model, Input::Chat(messages));
    common(body, &mut valid)?;
    if let Some((lazy, trigger)) = toolbox.as_ref().and_then(tools::Toolbox::lazy_grammar) {
        // A `format` grammar governs the whole answer; it wins over tool calls.
        if valid.grammar.is_none() {
            valid.grammar = Some(lazy);
            valid.grammar_trigger = Some(trigger);
        }
    }
    valid.tools = toolbox;
    Ok((valid, Extras { load_only }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_map_onto_the_sampler_and_limits() {
        let body = json!({"model": "m", "prompt": "hi", "options": {
            "temperature": 0, "top_k": 5, "seed": 42, "num_ctx": 512, "num_predict": 16,
            "stop": ["\n"], "num_thread": 8, "mirostat": 1, "num_keep": 2
        }});
        let (v, extras) = generate(&body).unwrap();
        assert!(!extras.load_only);
        assert!(v.stream, "Ollama streams unless told not to");
        assert_eq!(v.sampling.temperature, Some(0.0));
        assert_eq!(v.sampling.top_k, Some(5));
        assert_eq!(v.sampling.seed, Some(42));
        assert_eq!(v.ctx_limit, Some(512));
        assert_eq!(v.max_tokens, Some(16));
        assert_eq!(v.stop, Some(vec!["\n".to_string()]));
        assert_eq!(v.overflow, Overflow::Truncate { keep: 2 });
    }

    #[test]
    fn wrong_option_types_name_the_option() {
        let body = json!({"model": "m", "prompt": "hi", "options": {"temperature": "hot"}});
        let err = generate(&body).unwrap_err();
        assert_eq!(err.param, "options.temperature");
        let body = json!({"model": "m", "prompt": "hi", "options": {"top_p": 7}});
        assert_eq!(generate(&body).unwrap_err().param, "options.top_p");
    }

    #[test]
    fn keep_alive_takes_durations_and_seconds_and_refuses_nonsense() {
        let ka = |v: Value| keep_alive(json!({ "keep_alive": v }).as_object().unwrap());
        assert_eq!(
            ka(json!("10m")).unwrap(),
            Some(KeepAlive::parse("10m").unwrap())
        );
        assert_eq!(ka(json!(0)).unwrap(), Some(KeepAlive::parse("0").unwrap()));
        assert_eq!(ka(json!(-1)).unwrap(), Some(KeepAlive::Forever));
        assert!(ka(json!("soon")).is_err());
        assert!(ka(json!(true)).is_err());
    }

    #[test]
    fn an_empty_request_only_loads_the_model() {
        let (_, e) = generate(&json!({"model": "m"})).unwrap();
        assert!(e.load_only);
        let (_, e) = chat(&json!({"model": "m", "messages": []})).unwrap();
        assert!(e.load_only);
    }

    #[test]
    fn generate_renders_system_and_prompt_as_a_chat_unless_raw() {
        let (v, _) =
            generate(&json!({"model": "m", "prompt": "Hi", "system": "Be brief."})).unwrap();
        assert_eq!(
            v.input,
            Input::Chat(vec![
                ChatMessage {
                    role: Role::System,
                    content: "Be brief.".into()
                },
                ChatMessage {
                    role: Role::User,
                    content: "Hi".into()
                },
            ])
        );
        let (v, _) = generate(&json!({"model": "m", "prompt": "<raw>", "raw": true})).unwrap();
        assert_eq!(v.input, Input::Text("<raw>".into()));
    }

    #[test]
    fn a_suffix_asks_for_fill_in_the_middle() {
        let body = json!({"model": "m", "prompt": "def f(", "suffix": "return x"});
        let (v, _) = generate(&body).unwrap();
        assert_eq!(
            v.input,
            Input::Infill {
                prompt: "def f(".into(),
                suffix: "return x".into()
            }
        );
    }

    #[test]
    fn images_and_bad_roles_are_refused_clearly() {
        let err = chat(&json!({"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]})).unwrap_err();
        assert_eq!(err.param, "messages[0].images");
        let err = chat(&json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}))
            .unwrap_err();
        assert_eq!(err.param, "messages[0].role");
        let err = generate(&json!({"model": "m", "prompt": "x", "images": ["aGk="]})).unwrap_err();
        assert_eq!(err.param, "images");
    }
}
