//! Tool calling for both APIs, on any model: the tools are described to the model in a system
//! message, in the Hermes convention most open chat models are trained on (a `<tools>` list
//! of JSON schemas; a call is `<tool_call>{"name": …, "arguments": {…}}</tool_call>`), and
//! calls are parsed back out of the answer. A forced call (`tool_choice` `required` or a named
//! function) is constrained by a grammar built from the tools' parameter schemas, so even a
//! small model produces a call that parses and validates.

use serde_json::{json, Map, Value};

use super::request::Invalid;
use super::structured;

/// How the answer may use the tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Choice {
    /// The model decides (`auto`).
    Auto,
    /// It must call one of them (`required`).
    Required,
    /// It must call this one.
    Named(String),
}

/// Tools offered to a request (after `tool_choice: "none"` there are none).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Toolbox {
    /// The function definitions as sent, `{"type": "function", "function": {…}}`.
    tools: Vec<Value>,
    names: Vec<String>,
    choice: Choice,
}

/// A call parsed from an answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Call {
    pub(crate) name: String,
    pub(crate) arguments: Value,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Reads `tools` (OpenAI's and Ollama's shape are the same) and the choice; `None` when no
/// tools are in play.
pub(crate) fn parse(tools: &Value, choice: &Value) -> Result<Option<Toolbox>, Invalid> {
    let list = match tools {
        Value::Null => return no_tools(choice),
        Value::Array(l) if l.is_empty() => return no_tools(choice),
        Value::Array(l) => l,
        _ => return Err(Invalid::new("tools", "tools must be a list")),
    };
    let mut defs = Vec::with_capacity(list.len());
    let mut names: Vec<String> = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        if tool
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("function")
            != "function"
        {
            return Err(Invalid::new(
                at(".type"),
                "the only tool type is `function`",
            ));
        }
        let f = tool
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| Invalid::new(at(".function"), "a tool needs a `function` object"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| valid_name(n))
            .ok_or_else(|| {
                Invalid::new(
                    at(".function.name"),
                    "a function name must be 1 to 64 letters, digits, underscores or dashes",
                )
            })?;
        if names.iter().any(|n| n == name) {
            return Err(Invalid::new(
                at(".function.name"),
                format!("two tools are named `{name}`"),
            ));
        }
        if let Some(d) = f.get("description") {
            if !d.is_string() && !d.is_null() {
                return Err(Invalid::new(
                    at(".function.description"),
                    "a description must be a string",
                ));
            }
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            // Some clients send the schema as a JSON string.
            Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                Invalid::new(
                    at(".function.parameters"),
                    format!("parameters is not JSON: {e}"),
                )
            })?,
            Some(p) => p.clone(),
        };
        structured::check_schema(&parameters, &at(".function.parameters"))?;
        let mut def = f.clone();
        def.insert("parameters".into(), parameters);
        defs.push(json!({"type": "function", "function": def}));
        names.push(name.to_owned());
    }
    let choice = match choice {
        Value::Null => Choice::Auto,
        Value::String(s) if s == "auto" => Choice::Auto,
        Value::String(s) if s == "none" => return Ok(None),
        Value::String(s) if s == "required" => Choice::Required,
        Value::Object(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Invalid::new(
                        "tool_choice",
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": …}}",
                    )
                })?;
            if !names.iter().any(|n| n == name) {
                return Err(Invalid::new(
                    "tool_choice",
                    format!("tool_choice names `{name}`, which is not among the tools"),
                ));
            }
            Choice::Named(name.to_owned())
        }
        _ => {
            return Err(Invalid::new(
                "tool_choice",
                "tool_choice must be none, auto, required or a named function",
            ))
        }
    };
    Ok(Some(Toolbox {
        tools: defs,
        names,
        choice,
    }))
}

fn no_tools(choice: &Value) -> Result<Option<Toolbox>, Invalid> {
    match choice {
        Value::Null => Ok(None),
        Value::String(s) if s == "none" || s == "auto" => Ok(None),
        _ => Err(Invalid::new(
            "tool_choice",
            "tool_choice needs tools to choose from",
        )),
    }
}

impl Toolbox {
    /// Whether the answer must be a call.
    pub(crate) fn forced(&self) -> bool {
        self.choice != Choice::Auto
    }

    /// The tool definitions, as a template's `tools` variable expects them.
    pub(crate) fn definitions(&self) -> &[Value] {
        &self.tools
    }

    /// The system message that describes the tools (appended to the request's own).
    pub(crate) fn system_prompt(&self) -> String {
        let list: Vec<String> = self.tools.iter().map(Value::to_string).collect();
        let must = match &self.choice {
            Choice::Auto => "If a function helps, call it; otherwise answer normally.".to_owned(),
            Choice::Required => "You must call one of these functions.".to_owned(),
            Choice::Named(n) => format!("You must call the function `{n}`."),
        };
        format!(
            "You may call functions. They are described by JSON schemas within <tools></tools>:\n\
             <tools>\n{}\n</tools>\n{must}\nTo call a function, write one line within \
             <tool_call></tool_call> holding a JSON object with its name and arguments:\n\
             {OPEN}\n{{\"name\": <function name>, \"arguments\": <arguments object>}}\n{CLOSE}",
            list.join("\n")
        )
    }

    /// For `auto`: a grammar that applies once the model opens a `<tool_call>` block (the
    /// trigger), so a call it chooses to make is well-formed and its arguments validate.
    /// `None` when some tool's parameters use a keyword a grammar cannot enforce; such calls
    /// are still parsed, just not constrained.
    pub(crate) fn lazy_grammar(&self) -> Option<(String, String)> {
        if self.choice != Choice::Auto {
            return None;
        }
        let any = Toolbox {
            choice: Choice::Required,
            ..self.clone()
        };
        let call = any.grammar().ok()??;
        let renamed: Vec<String> = call
            .lines()
            .map(|l| match l.strip_prefix("root ::=") {
                Some(r) => format!("tool-call ::={r}"),
                None => l.to_owned(),
            })
            .collect();
        let grammar = format!(
            "root ::= \"{OPEN}\" [ \\n]* tool-call [ \\n]* \"{CLOSE}\"\n{}\n",
            renamed.join("\n")
        );
        Some((grammar, OPEN.to_owned()))
    }

    /// The grammar of a forced call: the JSON `{"name", "arguments"}` of an allowed tool,
    /// with arguments that validate against its parameters.
    pub(crate) fn grammar(&self) -> Result<Option<String>, Invalid> {
        let allowed: Vec<Value> = self
            .tools
            .iter()
            .zip(&self.names)
            .filter(|(_, n)| match &self.choice {
                Choice::Auto => false,
                Choice::Required => true,
                Choice::Named(want) => *n == want,
            })
            .map(|(t, n)| {
                json!({"type": "object",
                       "properties": {"name": {"const": n},
                                      "arguments": t["function"]["parameters"]},
                       "required": ["name", "arguments"],
                       "additionalProperties": false})
            })
            .collect();
        match allowed.len() {
            0 => Ok(None),
            1 => structured::json_schema(&allowed[0], "tools").map(Some),
            _ => structured::json_schema(&json!({"anyOf": allowed}), "tools").map(Some),
        }
    }
}

/// Describes the tools to the model: appended to the conversation's system message, or as a
/// system message of its own.
pub(crate) fn describe(messages: &mut Vec<crate::engine::ChatMessage>, toolbox: &Toolbox) {
    use crate::engine::{ChatMessage, Role};
    match messages.first_mut() {
        Some(m) if m.role == Role::System => {
            m.content = format!("{}\n\n{}", m.content, toolbox.system_prompt());
        }
        _ => messages.insert(
            0,
            ChatMessage {
                role: Role::System,
                content: toolbox.system_prompt(),
            },
        ),
    }
}

/// The calls in an answer, and the text around them. A forced answer is the call's JSON
/// itself; otherwise calls are `<tool_call>` blocks (an unterminated last one counts when its
/// JSON is complete). Blocks that are not a JSON call stay text.
pub(crate) fn extract(text: &str, forced: bool) -> (String, Vec<Call>) {
    if forced {
        return match call_of(text) {
            Some(c) => (String::new(), vec![c]),
            None => (text.to_owned(), vec![]),
        };
    }
    let mut calls = Vec::new();
    let mut rest = String::new();
    let mut tail = text;
    while let Some(start) = tail.find(OPEN) {
        let after = &tail[start + OPEN.len()..];
        let (body, block_len) = match after.find(CLOSE) {
            Some(end) => (&after[..end], OPEN.len() + end + CLOSE.len()),
            None => (after, OPEN.len() + after.len()),
        };
        match call_of(body) {
            Some(c) => {
                rest.push_str(&tail[..start]);
                calls.push(c);
            }
            None => rest.push_str(&tail[..start + block_len]),
        }
        tail = &tail[start + block_len..];
    }
    rest.push_str(tail);
    (rest.trim().to_owned(), calls)
}

fn call_of(body: &str) -> Option<Call> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_owned();
    let arguments = match v.get("arguments") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(a) => a.clone(),
    };
    arguments.is_object().then_some(Call { name, arguments })
}

/// An earlier assistant turn's calls, written back the way the model is asked to write them.
pub(crate) fn render_calls(content: &str, calls: &[Call]) -> String {
    let mut out = content.to_owned();
    for c in calls {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!(
            "{OPEN}\n{}\n{CLOSE}",
            json!({"name": c.name, "arguments": c.arguments})
        ));
    }
    out
}

/// The calls of an earlier assistant message (`tool_calls`, OpenAI's or Ollama's shape).
pub(crate) fn calls_of_message(tool_calls: &Value, param: &str) -> Result<Vec<Call>, Invalid> {
    let list = match tool_calls {
        Value::Null => return Ok(vec![]),
        Value::Array(l) => l,
        _ => return Err(Invalid::new(param, "tool_calls must be a list")),
    };
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            let f = c.get("function").unwrap_or(&Value::Null);
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                Invalid::new(format!("{param}[{i}].function.name"), "a call needs a name")
            })?;
            let arguments = match f.get("arguments") {
                None | Some(Value::Null) => json!({}),
                Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                    Invalid::new(
                        format!("{param}[{i}].function.arguments"),
                        format!("arguments is not JSON: {e}"),
                    )
                })?,
                Some(a) => a.clone(),
            };
            Ok(Call {
                name: name.to_owned(),
                arguments,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}}])
    }

    #[test]
    fn tools_and_choices_parse() {
        let t = parse(&weather(), &Value::Null).unwrap().unwrap();
        assert!(!t.forced());
        assert!(t.system_prompt().contains("\"get_weather\""));
        assert!(t.grammar().unwrap().is_none());
        let (lazy, trigger) = t.lazy_grammar().unwrap();
        assert_eq!(trigger, "<tool_call>");
        assert!(lazy.starts_with("root ::= \"<tool_call>\""), "{lazy}");
        assert!(lazy.contains("\ntool-call ::="), "{lazy}");
        let t = parse(&weather(), &json!("required")).unwrap().unwrap();
        assert!(t.lazy_grammar().is_none());
        assert!(t.forced() && t.grammar().unwrap().is_some());
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        assert!(parse(&weather(), &named).unwrap().unwrap().forced());
        assert_eq!(parse(&weather(), &json!("none")).unwrap(), None);
        assert_eq!(parse(&json!([]), &json!("auto")).unwrap(), None);
    }

    #[test]
    fn bad_tools_are_named() {
        for (tools, choice, param) in [
            (json!("x"), Value::Null, "tools"),
            (json!([{"type": "retrieval"}]), Value::Null, "tools[0].type"),
            (
                json!([{"type": "function"}]),
                Value::Null,
                "tools[0].function",
            ),
            (
                json!([{"type": "function", "function": {"name": "bad name"}}]),
                Value::Null,
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": "{not json"}}]),
                Value::Null,
                "tools[0].function.parameters",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]),
                Value::Null,
                "tools[0].function.parameters",
            ),
            (
                weather(),
                json!({"type": "function", "function": {"name": "nope"}}),
                "tool_choice",
            ),
            (weather(), json!("sometimes"), "tool_choice"),
            (json!([]), json!("required"), "tool_choice"),
        ] {
            let e = parse(&tools, &choice).unwrap_err();
            assert_eq!(e.param, param, "{tools} {choice}: {}", e.message);
        }
    }

    #[test]
    fn calls_are_extracted_from_answers() {
        let (text, calls) = extract(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            false,
        );
        assert_eq!(text, "Let me check.");
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, json!({"city": "Paris"}));
        let (text, calls) = extract("<tool_call>not json</tool_call> hi", false);
        assert!(calls.is_empty());
        assert_eq!(text, "<tool_call>not json</tool_call> hi");
        let (_, calls) = extract("{\"name\": \"f\", \"arguments\": {}}", true);
        assert_eq!(calls.len(), 1);
        let (_, calls) = extract(
            "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}",
            false,
        );
        assert_eq!(calls[0].arguments, json!({"a": 1}));
        let back = render_calls("", &calls);
        assert_eq!(extract(&back, false).1, calls);
    }
}
