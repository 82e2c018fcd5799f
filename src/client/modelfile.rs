//! Ollama's Modelfile (`FROM`, `PARAMETER`, `SYSTEM`, `TEMPLATE`), read into the body of an
//! `/api/create` request, as `ollama create -f Modelfile` does.

use serde_json::{json, Map, Value};

/// What a Modelfile asks for.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Modelfile {
    /// A model name or a path to a GGUF file.
    pub(crate) from: String,
    /// `PARAMETER` lines; repeated `stop` lines become a list.
    pub(crate) parameters: Map<String, Value>,
    pub(crate) system: Option<String>,
    pub(crate) template: Option<String>,
}

/// Reads a value: `"""multi\nline"""`, `"quoted"`, or the rest of the line.
fn value(rest: &str, lines: &mut std::str::Lines<'_>) -> Result<String, String> {
    let rest = rest.trim();
    if let Some(body) = rest.strip_prefix("\"\"\"") {
        if let Some(done) = body.strip_suffix("\"\"\"") {
            return Ok(done.to_owned());
        }
        let mut text = body.to_owned();
        for line in lines.by_ref() {
            if let Some(last) = line.strip_suffix("\"\"\"") {
                text.push('\n');
                text.push_str(last);
                return Ok(text.trim_start_matches('\n').to_owned());
            }
            text.push('\n');
            text.push_str(line);
        }
        return Err("a \"\"\" block is not closed".to_owned());
    }
    if rest.len() >= 2 && rest.starts_with('"') && rest.ends_with('"') {
        return serde_json::from_str::<String>(rest)
            .or_else(|_| Ok(rest[1..rest.len() - 1].to_owned()));
    }
    Ok(rest.to_owned())
}

/// Parses a Modelfile. Instructions backstop cannot honour are errors, not silently dropped.
pub(crate) fn parse(text: &str) -> Result<Modelfile, String> {
    let mut m = Modelfile::default();
    let mut lines = text.lines();
    let mut n = 0;
    while let Some(line) = lines.next() {
        n += 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        match word.to_ascii_uppercase().as_str() {
            "FROM" => m.from = value(rest, &mut lines)?,
            "SYSTEM" => m.system = Some(value(rest, &mut lines)?),
            "TEMPLATE" => m.template = Some(value(rest, &mut lines)?),
            "PARAMETER" => {
                let (key, v) = rest
                    .trim()
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| format!("line {n}: PARAMETER needs a name and a value"))?;
                let v = value(v, &mut lines)?;
                let parsed = serde_json::from_str::<Value>(&v)
                    .ok()
                    .filter(|p| p.is_number() || p.is_boolean())
                    .unwrap_or(Value::String(v));
                if key == "stop" {
                    let entry = m.parameters.entry("stop").or_insert_with(|| json!([]));
                    if let Value::Array(list) = entry {
                        list.push(parsed);
                    }
                } else {
                    m.parameters.insert(key.to_owned(), parsed);
                }
            }
            "LICENSE" => {
                value(rest, &mut lines)?;
            }
            other => return Err(format!("line {n}: `{other}` is not supported by backstop")),
        }
    }
    if m.from.is_empty() {
        return Err("the Modelfile has no FROM line".to_owned());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_modelfile_becomes_a_create_request() {
        let m = parse(
            "# comment\nFROM ./model.gguf\nPARAMETER temperature 0.2\nPARAMETER stop \"<|im_end|>\"\nPARAMETER stop END\nPARAMETER num_ctx 2048\nSYSTEM \"\"\"\nYou are terse.\nVery terse.\n\"\"\"\n",
        )
        .unwrap();
        assert_eq!(m.from, "./model.gguf");
        assert_eq!(m.parameters["temperature"], 0.2);
        assert_eq!(m.parameters["num_ctx"], 2048);
        assert_eq!(m.parameters["stop"], json!(["<|im_end|>", "END"]));
        assert_eq!(m.system.as_deref(), Some("You are terse.\nVery terse.\n"));
    }

    #[test]
    fn unsupported_or_incomplete_modelfiles_are_errors() {
        assert!(parse("PARAMETER temperature 1")
            .unwrap_err()
            .contains("FROM"));
        assert!(parse("FROM x\nADAPTER ./lora.gguf")
            .unwrap_err()
            .contains("ADAPTER"));
        assert!(parse("FROM x\nSYSTEM \"\"\"open")
            .unwrap_err()
            .contains("not closed"));
    }
}
