//! What to pull, parsed once from what the user typed. Repository ids, file names and
//! revisions end up in URLs and in file names under the store, so anything that could climb
//! out of a folder or change a URL's meaning is refused here, before any request is made.

use super::PullError;
use crate::models::name::{self, ModelName};
use crate::models::store::Digest;

/// Ollama's default quantization for a hub repository pulled without a tag.
pub(crate) const DEFAULT_QUANT: &str = "Q4_K_M";

/// Hosts that mean "the Hugging Face hub" in a model name, as Ollama accepts them.
const HUB_HOSTS: &[&str] = &["hf.co", "huggingface.co"];

/// Longest repository owner or name the hub allows.
const MAX_REPO_PART: usize = 96;

/// Longest file path or revision accepted.
const MAX_PATH: usize = 512;

/// A validated request to pull a model into the store: one GGUF file from a Hugging Face
/// repository, or a model from an Ollama registry. Built only through
/// [`PullSpec::from_model`] or [`PullSpec::from_file`], so every spec that reaches
/// [`super::pull`] has already been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSpec {
    source: Source,
    sha256: Option<Digest>,
    name: ModelName,
}

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// A file in a Hugging Face repository.
    Hub(HubFile),
    /// An Ollama registry: the manifest of `name`, pulled as it is.
    Registry,
}

/// Which file of which repository, at which revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HubFile {
    /// `OWNER/REPO`, checked.
    pub(crate) repo: String,
    /// The exact file, when named (`--file`); else chosen by quantization.
    pub(crate) file: Option<String>,
    /// The quantization to choose by; `None` means Q4_K_M (or the only GGUF there is).
    pub(crate) quant: Option<String>,
    /// Branch, tag or commit; `None` means `main`.
    pub(crate) revision: Option<String>,
}

impl PullSpec {
    /// Parses a model reference as `ollama pull` takes it. `hf.co/OWNER/REPO:QUANT`,
    /// `hf.co/OWNER/REPO` (the quantization then defaults to Q4_K_M, as in Ollama) or the same
    /// with `huggingface.co` and an optional `https://` come from Hugging Face; any other
    /// model name (`llama3.2`, `llama3.2:1b`, `team/model:tag`, `host/team/model:tag`) from
    /// that name's Ollama registry. The store name is the reference itself, so
    /// `run hf.co/OWNER/REPO` finds what `pull hf.co/OWNER/REPO` fetched.
    pub fn from_model(model: &str) -> Result<PullSpec, PullError> {
        let invalid = |reason: &str| PullError::InvalidSpec {
            input: model.to_owned(),
            reason: reason.to_owned(),
        };
        let text = model.trim();
        let text = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
            .unwrap_or(text);
        let hub = text
            .split_once('/')
            .filter(|(host, _)| HUB_HOSTS.contains(&host.to_ascii_lowercase().as_str()));
        let Some((host, rest)) = hub else {
            let name = ModelName::parse(text).map_err(|e| invalid(e.reason))?;
            return Ok(PullSpec {
                source: Source::Registry,
                sha256: None,
                name,
            });
        };
        let host = host.to_ascii_lowercase();
        let (repo, tag) = match rest.rsplit_once(':') {
            Some((repo, tag)) => (repo, Some(tag)),
            None => (rest, None),
        };
        check_repo(repo).map_err(|reason| invalid(&reason))?;
        let quant = match tag {
            Some("") => return Err(invalid("the quantization after `:` is empty")),
            Some(t)
                if !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) =>
            {
                return Err(invalid(
                    "a quantization may only use letters, digits, `.`, `_` and `-`",
                ))
            }
            Some(t) if t.eq_ignore_ascii_case("latest") => None,
            Some(t) => Some(t.to_owned()),
            None => None,
        };
        let name = ModelName::parse(&format!("{host}/{repo}:{}", tag.unwrap_or("latest")))
            .map_err(|e| invalid(e.reason))?;
        Ok(PullSpec {
            source: Source::Hub(HubFile {
                repo: repo.to_owned(),
                file: None,
                quant,
                revision: None,
            }),
            sha256: None,
            name,
        })
    }

    /// The spec behind `backstop pull OWNER/REPO --file NAME.gguf [--revision REV]
    /// [--sha256 HEX]`: one exact file, optionally pinned to a revision and a digest (what
    /// `models.toml` records, so air-gapped sites can check what they copy in). The store
    /// name is `hf.co/OWNER/REPO:QUANT`, the quantization read from the file name.
    pub fn from_file(
        repo: &str,
        file: &str,
        revision: Option<&str>,
        sha256: Option<&str>,
    ) -> Result<PullSpec, PullError> {
        let invalid = |input: &str, reason: String| PullError::InvalidSpec {
            input: input.to_owned(),
            reason,
        };
        let repo = name::strip_hub_prefix(repo);
        check_repo(repo).map_err(|r| invalid(repo, r))?;
        check_file(file).map_err(|r| invalid(file, r))?;
        if let Some(rev) = revision {
            check_revision(rev).map_err(|r| invalid(rev, r))?;
        }
        let sha256 = match sha256 {
            Some(hex) => {
                Some(Digest::parse(hex.trim()).map_err(|_| PullError::BadSha256(hex.to_owned()))?)
            }
            None => None,
        };
        let name = ModelName::for_hub_file(repo, file)
            .map_err(|e| invalid(&format!("{repo}/{file}"), e.reason.to_owned()))?;
        Ok(PullSpec {
            source: Source::Hub(HubFile {
                repo: repo.to_owned(),
                file: Some(file.to_owned()),
                quant: None,
                revision: revision.map(str::to_owned),
            }),
            sha256,
            name,
        })
    }

    /// Stores the pulled model under another name (an alias from `models.toml`, say).
    pub fn with_name(mut self, name: ModelName) -> PullSpec {
        self.name = name;
        self
    }

    /// `OWNER/REPO` for a Hugging Face pull; `None` for a registry pull.
    pub fn repo(&self) -> Option<&str> {
        self.hub().map(|h| h.repo.as_str())
    }

    /// The exact file asked for, if one was.
    pub fn file(&self) -> Option<&str> {
        self.hub().and_then(|h| h.file.as_deref())
    }

    /// The quantization asked for; `None` means the default (Q4_K_M) unless a file is named.
    pub fn quant(&self) -> Option<&str> {
        self.hub().and_then(|h| h.quant.as_deref())
    }

    /// The branch, tag or commit; `None` means `main`.
    pub fn revision(&self) -> Option<&str> {
        self.hub().and_then(|h| h.revision.as_deref())
    }

    /// The digest the file must have, when pinned.
    pub fn sha256(&self) -> Option<&Digest> {
        self.sha256.as_ref()
    }

    /// The name the model gets in the store (for a registry pull, also what is asked for).
    pub fn name(&self) -> &ModelName {
        &self.name
    }

    pub(crate) fn source(&self) -> &Source {
        &self.source
    }

    fn hub(&self) -> Option<&HubFile> {
        match &self.source {
            Source::Hub(h) => Some(h),
            Source::Registry => None,
        }
    }

    /// Checks the parts again: a spec is cheap to re-check, and [`super::pull`] must never
    /// send a request built from an unchecked path.
    pub(crate) fn check(&self) -> Result<(), PullError> {
        let invalid = |input: &str, reason: String| PullError::InvalidSpec {
            input: input.to_owned(),
            reason,
        };
        let Some(h) = self.hub() else {
            // Registry names were checked by `ModelName::parse`, which refuses traversal.
            return Ok(());
        };
        check_repo(&h.repo).map_err(|r| invalid(&h.repo, r))?;
        if let Some(f) = &h.file {
            check_file(f).map_err(|r| invalid(f, r))?;
        }
        if let Some(r) = &h.revision {
            check_revision(r).map_err(|e| invalid(r, e))?;
        }
        Ok(())
    }
}

impl HubFile {
    /// The revision to ask the hub for.
    pub(crate) fn revision_or_main(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// A path segment the hub (and our file system) can take: letters, digits, `.`, `_`, `-`
/// (and `+` in file names), not `.`/`..`, not hidden.
fn check_segment(part: &str, what: &str, extra: &str) -> Result<(), String> {
    if part.is_empty() {
        return Err(format!("the {what} has an empty path segment"));
    }
    if part == "." || part == ".." || part.contains("..") {
        return Err(format!("`..` is not allowed in the {what}"));
    }
    if part.starts_with(['.', '-']) {
        return Err(format!("a {what} segment may not start with `.` or `-`"));
    }
    if !part
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || extra.contains(c))
    {
        return Err(format!(
            "the {what} may only use letters, digits, `.`, `_`, `-`{}",
            if extra.is_empty() { "" } else { ", `+`" }
        ));
    }
    Ok(())
}

/// `OWNER/REPO`, exactly two segments.
fn check_repo(repo: &str) -> Result<(), String> {
    let parts: Vec<&str> = repo.split('/').collect();
    let [owner, name] = parts.as_slice() else {
        return Err("the repository must be OWNER/REPO".into());
    };
    for part in [owner, name] {
        check_segment(part, "repository", "")?;
        if part.len() > MAX_REPO_PART {
            return Err(format!(
                "a repository owner or name is at most {MAX_REPO_PART} characters"
            ));
        }
    }
    Ok(())
}

/// A relative `.gguf` path inside the repository.
fn check_file(file: &str) -> Result<(), String> {
    if file.len() > MAX_PATH {
        return Err(format!(
            "the file name is longer than {MAX_PATH} characters"
        ));
    }
    if file.starts_with('/') {
        return Err("the file must be a path inside the repository, not an absolute path".into());
    }
    for part in file.split('/') {
        check_segment(part, "file name", "+")?;
    }
    if !file.to_ascii_lowercase().ends_with(".gguf") {
        return Err("only .gguf files can be pulled".into());
    }
    Ok(())
}

/// A branch, tag or commit; branches may contain `/` (`refs/pr/1`).
fn check_revision(rev: &str) -> Result<(), String> {
    if rev.len() > MAX_PATH {
        return Err(format!("the revision is longer than {MAX_PATH} characters"));
    }
    for part in rev.split('/') {
        check_segment(part, "revision", "")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_reference_with_a_quant_names_repo_quant_and_store_name() {
        let s = PullSpec::from_model("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:q4_k_m").unwrap();
        assert_eq!(s.repo(), Some("bartowski/SmolLM2-135M-Instruct-GGUF"));
        assert_eq!(s.quant(), Some("q4_k_m"));
        assert_eq!(s.file(), None);
        assert_eq!(s.revision(), None);
        assert_eq!(
            s.name().to_string(),
            "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:q4_k_m"
        );
    }

    #[test]
    fn a_hub_reference_without_a_tag_means_the_default_quant_stored_as_latest() {
        for text in [
            "hf.co/o/r",
            "hf.co/o/r:latest",
            "https://hf.co/o/r",
            "HF.co/o/r",
        ] {
            let s = PullSpec::from_model(text).unwrap();
            assert_eq!(s.quant(), None, "{text}");
            assert_eq!(s.name().to_string(), "hf.co/o/r:latest", "{text}");
        }
        let s = PullSpec::from_model("huggingface.co/o/r:Q8_0").unwrap();
        assert_eq!(s.name().to_string(), "huggingface.co/o/r:Q8_0");
        assert_eq!(s.quant(), Some("Q8_0"));
    }

    #[test]
    fn other_names_come_from_their_ollama_registry() {
        let s = PullSpec::from_model("llama3.2:1b").unwrap();
        assert_eq!(s.source(), &Source::Registry);
        assert_eq!(s.repo(), None);
        assert_eq!(s.name().to_string(), "llama3.2:1b");
        let s = PullSpec::from_model("example.com:5000/team/m").unwrap();
        assert_eq!(s.source(), &Source::Registry);
        assert_eq!(s.name().parts(), ["example.com:5000", "team", "m"]);
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "../etc/passwd",
            "a/b/c/d",
            "library/../x",
            "hf.co/o",
            "hf.co/o/r/extra",
            "hf.co/o/r:",
            "hf.co/../r",
            "hf.co/o/..",
            "hf.co//r",
            "hf.co/o/r:Q4/../../x",
            "hf.co/.hidden/r",
            "",
        ] {
            assert!(
                matches!(
                    PullSpec::from_model(bad),
                    Err(PullError::InvalidSpec { .. })
                ),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn a_file_spec_is_named_after_its_quantization_and_keeps_its_pins() {
        let hex = "ab".repeat(32);
        let s = PullSpec::from_file(
            "https://huggingface.co/o/r",
            "sub/model-Q5_K_M.gguf",
            Some("refs/pr/1"),
            Some(&format!("sha256:{hex}")),
        )
        .unwrap();
        assert_eq!(s.repo(), Some("o/r"));
        assert_eq!(s.file(), Some("sub/model-Q5_K_M.gguf"));
        assert_eq!(s.revision(), Some("refs/pr/1"));
        assert_eq!(s.sha256().map(Digest::hex), Some(hex.as_str()));
        assert_eq!(s.name().to_string(), "hf.co/o/r:Q5_K_M");
    }

    #[test]
    fn traversal_and_absolute_paths_in_repo_file_or_revision_are_refused() {
        let cases = [
            ("../r", "m.gguf", None),
            ("o/../../r", "m.gguf", None),
            ("/etc/passwd", "m.gguf", None),
            ("o/r", "../m.gguf", None),
            ("o/r", "a/../../m.gguf", None),
            ("o/r", "/abs/m.gguf", None),
            ("o/r", "a//m.gguf", None),
            ("o/r", "m.gguf?x=1", None),
            ("o/r", "m\\..\\x.gguf", None),
            ("o/r", "model.safetensors", None),
            ("o/r", "m.gguf", Some("../main")),
            ("o/r", "m.gguf", Some("a/../../b")),
        ];
        for (repo, file, rev) in cases {
            assert!(
                matches!(
                    PullSpec::from_file(repo, file, rev, None),
                    Err(PullError::InvalidSpec { .. })
                ),
                "{repo} {file} {rev:?} was accepted"
            );
        }
    }

    #[test]
    fn a_malformed_sha256_is_refused() {
        assert!(matches!(
            PullSpec::from_file("o/r", "m.gguf", None, Some("abc")),
            Err(PullError::BadSha256(_))
        ));
    }
}
