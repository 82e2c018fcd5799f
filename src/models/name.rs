//! Model names as Ollama writes them: `[host/][namespace/]model[:tag]`, the tag defaulting to
//! `latest`. Names reach file paths (the store's manifests), so anything that could climb out
//! of a folder is refused here, once, before any file is touched.

use std::fmt;

/// Longest accepted name, tag included.
const MAX_LEN: usize = 256;
/// The registry host Ollama assumes when a name has none.
pub const DEFAULT_HOST: &str = "registry.ollama.ai";
/// The namespace Ollama assumes when a name has none.
pub const DEFAULT_NAMESPACE: &str = "library";

/// Why a model name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model name `{name}`: {reason}")]
pub struct NameError {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A checked model name. Equality ignores case, as Ollama's lookups do; display keeps the
/// case it was written in.
#[derive(Debug, Clone)]
pub struct ModelName {
    path: String,
    tag: String,
}

impl ModelName {
    /// Parses and checks a name; a missing tag means `latest`.
    pub fn parse(text: &str) -> Result<ModelName, NameError> {
        let err = |reason| NameError {
            name: text.to_owned(),
            reason,
        };
        let t = text.trim();
        if t.is_empty() {
            return Err(err("the name is empty"));
        }
        if t.len() > MAX_LEN {
            return Err(err("the name is longer than 256 characters"));
        }
        // The tag follows the last ':' after the last '/', so `host:port/model` keeps its port.
        let last_slash = t.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match t[last_slash..].rfind(':') {
            Some(i) => (&t[..last_slash + i], &t[last_slash + i + 1..]),
            None => (t, "latest"),
        };
        if tag.is_empty() {
            return Err(err("the tag after `:` is empty"));
        }
        if !tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            || tag.starts_with(['.', '-'])
        {
            return Err(err(
                "a tag may use letters, digits, `.`, `_` and `-`, and starts with a letter or digit",
            ));
        }
        if path.split('/').count() > 3 {
            return Err(err("a name has at most three parts: host/namespace/model"));
        }
        for (i, part) in path.split('/').enumerate() {
            if part.is_empty() {
                return Err(err("the name has an empty path segment"));
            }
            if part == "." || part == ".." {
                return Err(err("`.` and `..` are not allowed in a name"));
            }
            // The first segment may be a registry host with a port (`localhost:5000`).
            let part = match part.split_once(':') {
                Some((host, port))
                    if i == 0 && !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) =>
                {
                    host
                }
                _ => part,
            };
            let ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
            if part.is_empty() || !part.chars().all(ok) {
                return Err(err(
                    "a name may use letters, digits, `.`, `_`, `-` and `/` between parts",
                ));
            }
            if part.starts_with(['.', '-']) {
                return Err(err("a name part may not start with `.` or `-`"));
            }
        }
        Ok(ModelName {
            path: path.to_owned(),
            tag: tag.to_owned(),
        })
    }

    /// The part before the tag: `hf.co/owner/repo`, `smollm2`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Registry host, namespace and model, with Ollama's defaults filled in
    /// (`registry.ollama.ai`, `library`): the folders of the name's manifest in the store.
    pub fn parts(&self) -> [&str; 3] {
        let mut it = self.path.rsplit('/');
        let model = it.next().unwrap_or_default();
        let namespace = it.next().unwrap_or(DEFAULT_NAMESPACE);
        let host = it.next().unwrap_or(DEFAULT_HOST);
        [host, namespace, model]
    }

    /// Builds a name from its manifest folders, dropping Ollama's default host and namespace
    /// as Ollama's own listings do.
    pub fn from_parts(
        host: &str,
        namespace: &str,
        model: &str,
        tag: &str,
    ) -> Result<ModelName, NameError> {
        let text = match (host, namespace) {
            (DEFAULT_HOST, DEFAULT_NAMESPACE) => format!("{model}:{tag}"),
            (DEFAULT_HOST, ns) => format!("{ns}/{model}:{tag}"),
            (h, ns) => format!("{h}/{ns}/{model}:{tag}"),
        };
        ModelName::parse(&text)
    }

    /// The tag: `latest`, `Q4_K_M`.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The store name of a GGUF file from a Hugging Face repository, as Ollama names
    /// hub models: `hf.co/OWNER/REPO:QUANT`, the tag being the quantization found in the file
    /// name (`Q4_K_M`), else the file's stem.
    pub fn for_hub_file(repo: &str, file: &str) -> Result<ModelName, NameError> {
        let repo = strip_hub_prefix(repo);
        let stem = file
            .rsplit('/')
            .next()
            .unwrap_or(file)
            .trim_end_matches(".gguf");
        let tag = quantization_in(stem).unwrap_or_else(|| {
            stem.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        });
        ModelName::parse(&format!("hf.co/{repo}:{tag}"))
    }

    /// Lower-cased `path:tag`, for lookups and file names.
    pub fn key(&self) -> String {
        format!("{}:{}", self.path, self.tag).to_ascii_lowercase()
    }
}

/// `hf.co/`, `huggingface.co/` and their `https://` forms, removed from a repository id.
pub fn strip_hub_prefix(repo: &str) -> &str {
    let r = repo.trim().trim_end_matches('/');
    let r = r
        .strip_prefix("https://")
        .or_else(|| r.strip_prefix("http://"))
        .unwrap_or(r);
    r.strip_prefix("hf.co/")
        .or_else(|| r.strip_prefix("huggingface.co/"))
        .unwrap_or(r)
}

/// The quantization named in a GGUF file name (`model-Q4_K_M` → `Q4_K_M`), matched case
/// insensitively; the longest match wins, so `Q4_K_M` beats `Q4_K`.
pub fn quantization_in(stem: &str) -> Option<String> {
    const QUANTS: &[&str] = &[
        "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S",
        "IQ3_M", "IQ4_NL", "IQ4_XS", "Q2_K_S", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q3_K",
        "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q4_K", "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q5_K",
        "Q6_K", "Q8_0", "F16", "BF16", "F32", "TQ1_0", "TQ2_0", "MXFP4",
    ];
    let upper = stem.to_ascii_uppercase();
    // `_` may come before a quantization (`model_Q8_0`) but not after one, so `Q4_K` is not
    // found inside `Q4_K_M`.
    let before = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric());
    let after = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
    QUANTS
        .iter()
        .filter(|q| {
            upper.match_indices(*q).any(|(i, _)| {
                before(upper[..i].chars().next_back()) && after(upper[i + q.len()..].chars().next())
            })
        })
        .max_by_key(|q| q.len())
        .map(|q| (*q).to_owned())
}

impl PartialEq for ModelName {
    fn eq(&self, other: &Self) -> bool {
        self.path.eq_ignore_ascii_case(&other.path) && self.tag.eq_ignore_ascii_case(&other.tag)
    }
}

impl Eq for ModelName {}

impl std::hash::Hash for ModelName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialOrd for ModelName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ModelName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ModelName {
        ModelName::parse(s).unwrap()
    }

    #[test]
    fn a_missing_tag_means_latest_and_case_is_ignored_for_equality() {
        assert_eq!(name("smollm2").to_string(), "smollm2:latest");
        assert_eq!(name("SmolLM2"), name("smollm2:latest"));
        assert_eq!(name("SmolLM2").to_string(), "SmolLM2:latest");
    }

    #[test]
    fn hub_names_keep_their_quantization_tag() {
        let n = name("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M");
        assert_eq!(n.path(), "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF");
        assert_eq!(n.tag(), "Q4_K_M");
    }

    #[test]
    fn a_registry_port_is_not_a_tag() {
        let n = name("localhost:5000/team/model");
        assert_eq!(n.path(), "localhost:5000/team/model");
        assert_eq!(n.tag(), "latest");
    }

    #[test]
    fn path_traversal_and_odd_characters_are_refused() {
        for bad in [
            "../etc/passwd",
            "a/../../b",
            "/abs",
            "a//b",
            "a\\b",
            "a b",
            "a:",
            "a:b/c:..",
            ".hidden",
            "x:ta/g",
            "",
            "m\0",
        ] {
            assert!(ModelName::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn parts_fill_in_ollamas_defaults_and_round_trip() {
        assert_eq!(
            name("smollm2").parts(),
            ["registry.ollama.ai", "library", "smollm2"]
        );
        assert_eq!(
            name("team/m:v1").parts(),
            ["registry.ollama.ai", "team", "m"]
        );
        let n = name("hf.co/Owner/Repo:Q4_K_M");
        assert_eq!(n.parts(), ["hf.co", "Owner", "Repo"]);
        let [h, ns, m] = n.parts();
        assert_eq!(
            ModelName::from_parts(h, ns, m, n.tag())
                .unwrap()
                .to_string(),
            "hf.co/Owner/Repo:Q4_K_M"
        );
        assert_eq!(
            ModelName::from_parts("registry.ollama.ai", "library", "x", "latest")
                .unwrap()
                .to_string(),
            "x:latest"
        );
    }

    #[test]
    fn hub_files_are_named_after_their_quantization() {
        let n = ModelName::for_hub_file(
            "bartowski/SmolLM2-135M-Instruct-GGUF",
            "SmolLM2-135M-Instruct-Q4_K_M.gguf",
        )
        .unwrap();
        assert_eq!(
            n.to_string(),
            "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"
        );
        let n = ModelName::for_hub_file("https://huggingface.co/o/r/", "model.q8_0.gguf").unwrap();
        assert_eq!(n.to_string(), "hf.co/o/r:Q8_0");
        let n = ModelName::for_hub_file("o/r", "weights.gguf").unwrap();
        assert_eq!(n.tag(), "weights");
        assert_eq!(quantization_in("x-Q4_K"), Some("Q4_K".into()));
        assert_eq!(quantization_in("Q4_K_MX"), None);
    }

    #[test]
    fn more_than_three_parts_is_refused() {
        assert!(ModelName::parse("a/b/c/d").is_err());
    }
}
