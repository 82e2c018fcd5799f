//! Structured output for both APIs: JSON mode and JSON schemas become a llama.cpp grammar
//! (GBNF), so a constrained answer always parses and validates, whatever the model.
//!
//! A schema is first checked with the `jsonschema` crate (a clear 400 naming the problem for
//! a schema that is not one), then for keywords llama.cpp's converter would silently ignore
//! (it warns on stderr and accepts more than the schema allows, so the answer might not
//! validate), then converted by llama.cpp's own converter; what it cannot express is a 400
//! as well, never a crash. References are resolved only inside the schema: a user's schema
//! never makes the server fetch a URL or read a file.

use serde_json::Value;

use super::request::Invalid;

/// Largest schema accepted, in bytes of JSON: the grammar grows with the schema, and llama.cpp
/// parses the grammar on the engine thread.
const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// The grammar for any JSON object: JSON mode (`json_object`, Ollama's `format: "json"`).
pub(crate) fn json_object() -> Result<String, Invalid> {
    convert(&serde_json::json!({"type": "object"}), "format")
}

/// Checks that `schema` is a JSON schema that refers to nothing outside itself.
pub(crate) fn check_schema(schema: &Value, param: &str) -> Result<(), Invalid> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(Invalid::new(param, "a JSON schema must be an object"));
    }
    if schema.to_string().len() > MAX_SCHEMA_BYTES {
        return Err(Invalid::new(
            param,
            format!("the schema is larger than {MAX_SCHEMA_BYTES} bytes"),
        ));
    }
    jsonschema::meta::validate(schema)
        .map_err(|e| Invalid::new(param, format!("invalid JSON schema: {e}")))?;
    jsonschema::options()
        .with_retriever(NoRemote)
        .build(schema)
        .map_err(|e| Invalid::new(param, format!("invalid JSON schema: {e}")))?;
    Ok(())
}

/// The grammar for answers that validate against `schema`; `param` names the field in errors.
pub(crate) fn json_schema(schema: &Value, param: &str) -> Result<String, Invalid> {
    check_schema(schema, param)?;
    enforceable(schema, "")
        .map_err(|(at, why)| Invalid::new(param, format!("at `{}`: {why}", display(&at))))?;
    convert(schema, param)
}

fn display(path: &str) -> &str {
    if path.is_empty() {
        "#"
    } else {
        path
    }
}

/// Keywords llama.cpp's converter (common/json-schema.cpp) turns into grammar rules.
const ENFORCED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "pattern",
    "format",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
];

/// String formats the converter enforces.
const ENFORCED_FORMATS: &[&str] = &[
    "date",
    "time",
    "date-time",
    "uuid",
    "uuid1",
    "uuid2",
    "uuid3",
    "uuid4",
    "uuid5",
];

/// Keywords that constrain nothing (annotations, definitions to refer to).
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
];

/// Whether every keyword of `schema` (at `path`, a JSON pointer) is one the grammar enforces.
fn enforceable(schema: &Value, path: &str) -> Result<(), (String, String)> {
    let Some(map) = schema.as_object() else {
        return Ok(()); // `true` / `false`
    };
    let fail = |why: String| Err((path.to_owned(), why));
    for key in map.keys() {
        if !ENFORCED.contains(&key.as_str()) && !ANNOTATIONS.contains(&key.as_str()) {
            return fail(format!(
                "`{key}` cannot be enforced by constrained decoding; supported keywords: {}",
                ENFORCED.join(", ")
            ));
        }
    }
    let integer_only = map.get("type").is_some_and(|t| t == "integer");
    for bound in ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"] {
        if map.contains_key(bound) && !integer_only {
            return fail(format!(
                "`{bound}` can be enforced only on `\"type\": \"integer\"`"
            ));
        }
    }
    if let Some(format) = map.get("format") {
        // The formats llama.cpp's converter turns into rules (common/json-schema.cpp); any
        // other would be accepted and silently not enforced.
        let known = format
            .as_str()
            .is_some_and(|f| ENFORCED_FORMATS.contains(&f));
        if !known {
            return fail(format!(
                "format {format} cannot be enforced by constrained decoding; supported formats: {}",
                ENFORCED_FORMATS.join(", ")
            ));
        }
    }
    if let Some(pattern) = map.get("pattern").and_then(Value::as_str) {
        let anchored = pattern.starts_with('^') && pattern.ends_with('$');
        let unsupported = ["(?=", "(?!", "(?<=", "(?<!"]
            .iter()
            .any(|l| pattern.contains(l))
            || (1..=9).any(|d| pattern.contains(&format!("\\{d}")));
        if !anchored || unsupported {
            return fail(format!(
                "pattern `{pattern}` cannot be enforced: it must be anchored with ^ and $, \
                 without lookaround or back-references"
            ));
        }
    }
    for (key, sub) in map {
        let at = format!("{path}/{key}");
        match (key.as_str(), sub) {
            ("properties" | "$defs" | "definitions", Value::Object(subs)) => {
                for (name, s) in subs {
                    enforceable(s, &format!("{at}/{name}"))?;
                }
            }
            ("prefixItems" | "anyOf" | "oneOf" | "allOf", Value::Array(subs)) => {
                for (i, s) in subs.iter().enumerate() {
                    enforceable(s, &format!("{at}/{i}"))?;
                }
            }
            ("items" | "additionalProperties", s) => enforceable(s, &at)?,
            _ => {}
        }
    }
    Ok(())
}

fn convert(schema: &Value, param: &str) -> Result<String, Invalid> {
    llama_cpp_2::json_schema_to_grammar(&schema.to_string()).map_err(|e| {
        Invalid::new(
            param,
            format!("this schema cannot be turned into a grammar for constrained decoding ({e})"),
        )
    })
}

/// Refuses every external reference (`$ref` to a URL or file).
struct NoRemote;

impl jsonschema::Retrieve for NoRemote {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!("external references are not followed: {uri}").into())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_mode_and_schemas_become_grammars() {
        let g = json_object().unwrap();
        assert!(g.contains("root ::="), "{g}");
        let g = json_schema(
            &json!({"type": "object", "properties": {"colour": {"enum": ["red", "green"]}},
                    "required": ["colour"]}),
            "response_format.json_schema.schema",
        )
        .unwrap();
        assert!(g.contains("\"\\\"red\\\"\""), "{g}");
        // Integer bounds, anchored patterns, references inside the schema, annotations.
        json_schema(
            &json!({"$defs": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
                    "title": "person", "type": "object",
                    "properties": {"age": {"$ref": "#/$defs/age"},
                                   "id": {"type": "string", "pattern": "^[a-z]{3}$"}}}),
            "format",
        )
        .unwrap();
    }

    #[test]
    fn bad_schemas_are_named() {
        for (schema, says) in [
            (json!("an object"), "must be an object"),
            (json!({"type": "strnig"}), "invalid JSON schema"),
            (json!({"minimum": "three"}), "invalid JSON schema"),
            (
                json!({"$ref": "https://example.com/schema.json"}),
                "external references",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "number", "minimum": 0}}}),
                "at `/properties/a`: `minimum` can be enforced only on",
            ),
            (
                json!({"type": "array", "items": {"type": "string", "pattern": "abc"}}),
                "at `/items`: pattern `abc` cannot be enforced",
            ),
            (
                json!({"type": "string", "pattern": "^(?!x).*$"}),
                "lookaround",
            ),
            (
                json!({"type": "array", "uniqueItems": true}),
                "`uniqueItems` cannot be enforced",
            ),
            (
                json!({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}),
                "at `/anyOf/1`: `not` cannot be enforced",
            ),
        ] {
            let e = json_schema(&schema, "format").unwrap_err();
            assert_eq!(e.param, "format");
            assert!(e.message.contains(says), "{schema}: {}", e.message);
        }
    }

    #[test]
    fn oversized_schemas_are_refused() {
        let props: serde_json::Map<String, Value> = (0..4000)
            .map(|i| (format!("field_{i}"), json!({"type": "string"})))
            .collect();
        let e = json_schema(&json!({"type": "object", "properties": props}), "format").unwrap_err();
        assert!(e.message.contains("larger than"), "{}", e.message);
    }
}
