//! Which file of a repository a pull means: the named one, or the `.gguf` whose name carries
//! the asked-for quantization. Pure, so every rule is unit-tested without a hub.

use super::spec::DEFAULT_QUANT;
use super::PullError;
use crate::models::name::quantization_in;

/// Picks the file to download from a repository's file list.
///
/// * A named file must be in the list (else the error lists the GGUF files there are).
/// * Otherwise the GGUF files whose quantization is `quant` (default Q4_K_M) match,
///   `Q4_K` not matching `Q4_K_M`; vision projectors (`mmproj-*`) and importance matrices
///   never do. Of several matches the shortest name wins, so `model-Q4_K_M.gguf` beats
///   `model-UD-Q4_K_M.gguf`.
/// * With no quantization asked for and no Q4_K_M, a repository with a single GGUF model
///   file gets that file.
/// * A model split into several files (`-00001-of-00003.gguf`) is taken when no file in one
///   piece matches, and named by its first part; [`parts`] gives them all.
pub(crate) fn choose(
    repo: &str,
    files: &[String],
    file: Option<&str>,
    quant: Option<&str>,
) -> Result<String, PullError> {
    let ggufs: Vec<String> = {
        let mut g: Vec<String> = files.iter().filter(|f| is_gguf(f)).cloned().collect();
        g.sort();
        g
    };
    if let Some(file) = file {
        if !files.iter().any(|f| f == file) {
            return Err(PullError::FileNotFound {
                repo: repo.to_owned(),
                file: file.to_owned(),
                available: ggufs,
            });
        }
        return Ok(first_part(file).unwrap_or_else(|| file.to_owned()));
    }
    let models: Vec<&String> = ggufs.iter().filter(|f| is_model(f)).collect();
    let wanted = quant.unwrap_or(DEFAULT_QUANT);
    let matching: Vec<&String> = models
        .iter()
        .copied()
        .filter(|f| has_quant(stem(f), wanted))
        .collect();
    let whole: Vec<&String> = matching.iter().copied().filter(|f| !is_split(f)).collect();
    if let Some(best) = whole
        .iter()
        .min_by(|a, b| base(a).len().cmp(&base(b).len()).then(a.cmp(b)))
    {
        return Ok((*best).clone());
    }
    // Only split models match: the one with the shortest name, by its first part.
    if let Some(best) = matching
        .iter()
        .filter_map(|f| first_part(f))
        .min_by(|a, b| base(a).len().cmp(&base(b).len()).then(a.cmp(b)))
    {
        return Ok(best);
    }
    if quant.is_none() {
        // One model in the repository, in one file or in parts.
        let mut sets: Vec<String> = models
            .iter()
            .map(|f| first_part(f).unwrap_or_else(|| (*f).clone()))
            .collect();
        sets.dedup();
        if let [only] = sets.as_slice() {
            return Ok(only.clone());
        }
    }
    Err(PullError::QuantNotFound {
        repo: repo.to_owned(),
        quant: wanted.to_owned(),
        available: ggufs,
    })
}

fn is_gguf(file: &str) -> bool {
    file.to_ascii_lowercase().ends_with(".gguf")
}

/// The file name without its folders.
fn base(file: &str) -> &str {
    file.rsplit('/').next().unwrap_or(file)
}

/// The file name without folders and `.gguf`.
fn stem(file: &str) -> &str {
    let b = base(file);
    &b[..b.len().saturating_sub(".gguf".len())]
}

/// Weights, not a vision projector or an importance matrix stored as GGUF.
fn is_model(file: &str) -> bool {
    let b = base(file).to_ascii_lowercase();
    !b.starts_with("mmproj") && !b.contains("imatrix")
}

/// `…-00001-of-00003.gguf`: one part of a split model.
pub(crate) fn is_split(file: &str) -> bool {
    split_of(file).is_some()
}

/// A split model's part: its folder and name without the part's number, and how many parts
/// there are (`big/m-00002-of-00003.gguf`: `big/m`, 3).
fn split_of(file: &str) -> Option<(&str, u64)> {
    let (prefix, count) = crate::models::gguf::split_name(stem(file))?;
    let folder = file.len() - base(file).len();
    Some((&file[..folder + prefix.len()], count))
}

/// The first part of the split model that `file` is a part of.
fn first_part(file: &str) -> Option<String> {
    let (whole, count) = split_of(file)?;
    Some(format!(
        "{whole}{}",
        crate::models::gguf::split_suffix(0, count)
    ))
}

/// Every file of the model `file` names (from [`choose`]): itself, or each part of a split
/// model in order, all of which the repository must list.
pub(crate) fn parts(repo: &str, files: &[String], file: &str) -> Result<Vec<String>, PullError> {
    let Some((whole, count)) = split_of(file) else {
        return Ok(vec![file.to_owned()]);
    };
    let all: Vec<String> = (0..count)
        .map(|i| format!("{whole}{}", crate::models::gguf::split_suffix(i, count)))
        .collect();
    let missing: Vec<String> = all.iter().filter(|p| !files.contains(p)).cloned().collect();
    if !missing.is_empty() {
        return Err(PullError::SplitGguf {
            repo: repo.to_owned(),
            count,
            files: missing,
        });
    }
    Ok(all)
}

/// Whether a file stem carries this quantization. A known quantization must be the one
/// named in the file (so `Q4_K` does not match `Q4_K_M`); anything else (`UD-IQ1_S`,
/// `f16`) is looked for as a whole `-`/`.`/`_`-delimited part of the name.
fn has_quant(stem: &str, quant: &str) -> bool {
    let q = quant.to_ascii_uppercase();
    if quantization_in(&q).as_deref() == Some(q.as_str()) {
        return quantization_in(stem).as_deref() == Some(q.as_str());
    }
    let upper = stem.to_ascii_uppercase();
    let edge = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric());
    upper.match_indices(&q).any(|(i, _)| {
        edge(upper[..i].chars().next_back()) && edge(upper[i + q.len()..].chars().next())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    const REPO: &[&str] = &[
        ".gitattributes",
        "README.md",
        "model-Q4_K.gguf",
        "model-Q4_K_M.gguf",
        "model-UD-Q4_K_M.gguf",
        "model-Q8_0.gguf",
        "mmproj-model-f16.gguf",
        "big/model-Q6_K-00001-of-00002.gguf",
        "big/model-Q6_K-00002-of-00002.gguf",
    ];

    #[test]
    fn the_quant_is_matched_case_insensitively_and_q4_k_does_not_match_q4_k_m() {
        let f = files(REPO);
        assert_eq!(
            choose("o/r", &f, None, Some("q4_k_m")).unwrap(),
            "model-Q4_K_M.gguf"
        );
        assert_eq!(
            choose("o/r", &f, None, Some("Q4_K")).unwrap(),
            "model-Q4_K.gguf"
        );
        assert_eq!(
            choose("o/r", &f, None, Some("q8_0")).unwrap(),
            "model-Q8_0.gguf"
        );
    }

    #[test]
    fn no_quant_means_q4_k_m() {
        assert_eq!(
            choose("o/r", &files(REPO), None, None).unwrap(),
            "model-Q4_K_M.gguf"
        );
    }

    #[test]
    fn a_missing_quant_lists_the_gguf_files_there_are() {
        let err = choose("o/r", &files(REPO), None, Some("Q2_K")).unwrap_err();
        let PullError::QuantNotFound { available, .. } = &err else {
            panic!("{err:?}");
        };
        assert!(available.contains(&"model-Q8_0.gguf".to_owned()));
        assert!(!available.contains(&"README.md".to_owned()));
        assert!(err.to_string().contains("model-Q8_0.gguf"), "{err}");
    }

    #[test]
    fn a_split_model_is_chosen_by_its_first_part_and_needs_every_part() {
        let f = files(REPO);
        let first = "big/model-Q6_K-00001-of-00002.gguf";
        let both = [first, "big/model-Q6_K-00002-of-00002.gguf"];
        assert_eq!(choose("o/r", &f, None, Some("Q6_K")).unwrap(), first);
        // Any part named means the model.
        assert_eq!(choose("o/r", &f, Some(both[1]), None).unwrap(), first);
        assert_eq!(parts("o/r", &f, first).unwrap(), both);
        assert_eq!(
            parts("o/r", &f, "model-Q8_0.gguf").unwrap(),
            ["model-Q8_0.gguf"]
        );
        // A file in one piece wins over parts of the same quantization.
        let mut g = f.clone();
        g.push("model-Q6_K.gguf".into());
        assert_eq!(
            choose("o/r", &g, None, Some("Q6_K")).unwrap(),
            "model-Q6_K.gguf"
        );
        // A repository of one split model gives it when no quantization was asked for.
        let only = files(&[
            "README.md",
            "w-00001-of-00002.gguf",
            "w-00002-of-00002.gguf",
        ]);
        assert_eq!(
            choose("o/r", &only, None, None).unwrap(),
            "w-00001-of-00002.gguf"
        );
        // A part the repository does not list.
        let err = parts("o/r", &files(&[both[1]]), first).unwrap_err();
        assert!(
            matches!(err, PullError::SplitGguf { count: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(first), "{err}");
        assert!(err.to_string().contains("1 of its 2 parts"), "{err}");
    }

    #[test]
    fn a_named_file_must_exist() {
        let f = files(REPO);
        assert_eq!(
            choose("o/r", &f, Some("model-Q8_0.gguf"), None).unwrap(),
            "model-Q8_0.gguf"
        );
        let err = choose("o/r", &f, Some("nope.gguf"), None).unwrap_err();
        assert!(matches!(err, PullError::FileNotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("model-Q4_K_M.gguf"), "{err}");
    }

    #[test]
    fn a_single_gguf_is_taken_when_no_quant_was_asked_for() {
        let f = files(&["README.md", "weights.gguf", "mmproj-f16.gguf"]);
        assert_eq!(choose("o/r", &f, None, None).unwrap(), "weights.gguf");
        assert!(choose("o/r", &f, None, Some("Q8_0")).is_err());
    }

    #[test]
    fn unknown_quant_names_match_whole_name_parts() {
        let f = files(&["m-UD-IQ1_S.gguf", "m-f16.gguf", "m-bf16.gguf"]);
        assert_eq!(
            choose("o/r", &f, None, Some("ud-iq1_s")).unwrap(),
            "m-UD-IQ1_S.gguf"
        );
        assert_eq!(choose("o/r", &f, None, Some("F16")).unwrap(), "m-f16.gguf");
    }

    #[test]
    fn split_names_are_recognised() {
        assert!(is_split("a/m-Q4_K_M-00001-of-00003.gguf"));
        assert!(!is_split("m-Q4_K_M.gguf"));
        assert!(!is_split("m-of-course.gguf"));
    }
}
