//! A model's default request options, as Ollama's Modelfile `PARAMETER` lines and its
//! params layer write them (`{"temperature": 0.7, "stop": ["<|im_end|>"], "num_ctx": 4096}`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::SamplingOverrides;

/// Default options of one model. Keys Ollama knows but backstop does not use (mirostat,
/// num_gpu, ...) are kept as they are, so a store entry round-trips unchanged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Top-k truncation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Min-p truncation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Repetition penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
    /// Window of the penalties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_last_n: Option<i32>,
    /// Presence penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Context tokens per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_ctx: Option<u32>,
    /// Answer length limit; -1 means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_predict: Option<i64>,
    /// Stop strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Everything else, untouched.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Parameters {
    /// True when no option is set (no params layer needed).
    pub fn is_empty(&self) -> bool {
        *self == Parameters::default()
    }

    /// The sampling part.
    pub fn sampling(&self) -> SamplingOverrides {
        SamplingOverrides {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        }
    }

    /// Builds parameters from sampling defaults plus the other fields.
    pub fn from_parts(
        sampling: &SamplingOverrides,
        num_ctx: Option<u32>,
        num_predict: Option<i64>,
        stop: Vec<String>,
    ) -> Parameters {
        Parameters {
            temperature: sampling.temperature,
            top_k: sampling.top_k,
            top_p: sampling.top_p,
            min_p: sampling.min_p,
            repeat_penalty: sampling.repeat_penalty,
            repeat_last_n: sampling.repeat_last_n,
            presence_penalty: sampling.presence_penalty,
            frequency_penalty: sampling.frequency_penalty,
            seed: sampling.seed,
            num_ctx,
            num_predict,
            stop,
            other: BTreeMap::new(),
        }
    }

    /// The `parameters` text of `/api/show`: one `name value` line per option, strings
    /// quoted, a line per stop string, as Ollama prints them.
    pub fn to_text(&self) -> String {
        let mut lines = Vec::new();
        // Through text, so f32 values print as written (0.7, not 0.699999988).
        let value = serde_json::to_string(self)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        if let Value::Object(map) = value {
            for (k, v) in map {
                match v {
                    Value::Array(items) => {
                        for item in items {
                            lines.push(format!("{k:<30} {item}"));
                        }
                    }
                    other => lines.push(format!("{k:<30} {other}")),
                }
            }
        }
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_params_json_round_trips_including_unknown_keys() {
        let text = r#"{"stop":["<|im_end|>","<|im_start|>"],"temperature":0.7,"num_ctx":2048,"mirostat":1}"#;
        let p: Parameters = serde_json::from_str(text).unwrap();
        assert_eq!(p.temperature, Some(0.7));
        assert_eq!(p.num_ctx, Some(2048));
        assert_eq!(p.stop.len(), 2);
        assert_eq!(p.other["mirostat"], 1);
        let back: Value = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn parameters_text_lists_each_stop_string_on_its_own_line() {
        let p = Parameters {
            temperature: Some(0.5),
            stop: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        let text = p.to_text();
        assert!(text.contains("temperature"), "{text}");
        assert!(text.contains(" 0.5"), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("stop")).count(), 2);
        assert!(text.contains("\"a\""));
    }
}
