//! `backstop bench --quantize`: a model's quantization ladder, built with llama.cpp's
//! quantizer into a folder that keeps it, so one download is enough to compare quantizations
//! and a second run measures again without quantizing again. Each rung `<stem>-<TYPE>.gguf`
//! has a note beside it, `<stem>-<TYPE>.gguf.source`, naming the file it was made from. Rungs
//! built with an importance matrix are `<stem>-<TYPE>-imatrix.gguf`, and their note names the
//! matrix too.

use std::path::{Path, PathBuf};
use std::time::{Instant, UNIX_EPOCH};

use super::imatrix::Imatrix;
use super::quantize::{self, QuantizeError};
use crate::models::gguf::{self, GgufHeader};

/// The folder `--quantize` writes to when `--quantize-dir` is not given.
pub fn default_dir() -> PathBuf {
    crate::config::cache_dir().join("ladder")
}

/// The types asked for, as llama.cpp spells them, each once; an unknown one, or one that
/// needs an importance matrix when none is given, is refused before anything is quantized or
/// measured.
pub fn types(given: &[String], imatrix: bool) -> Result<Vec<&'static str>, QuantizeError> {
    let mut out: Vec<&'static str> = Vec::with_capacity(given.len());
    for name in given {
        let t = quantize::canonical(name)?;
        if t == quantize::COPY {
            return Err(QuantizeError::Input(
                "--quantize COPY: a copy of the model measures as the model does; name \
                 quantization types"
                    .into(),
            ));
        }
        if !imatrix && quantize::needs_imatrix(t) {
            return Err(QuantizeError::NeedsImatrix(t.to_owned()));
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// The name a model's quantizations are filed under: its file name without `.gguf` (and
/// without `-00001-of-00003`, a split model's part), or for a store model (found under another
/// path than the one given) its name with `:`, `/` and `\` made `-`.
pub fn stem(arg: &str, file: &Path) -> String {
    if file == Path::new(arg) {
        let name = file
            .file_stem()
            .map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned());
        return gguf::split_name(&name)
            .map_or(&*name, |(p, _)| p)
            .to_owned();
    }
    arg.replace([':', '/', '\\'], "-")
}

/// What identifies the model a rung was made from: its full path, size and modification time.
/// Kept beside the rung (`<rung>.source`), so that a rung is reused only for the very file it
/// was made from: two models with the same file name in different folders share a stem, and a
/// model replaced in place keeps its name.
fn identity(source: &Path) -> Option<String> {
    let meta = std::fs::metadata(source).ok()?;
    let since = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    let path = std::fs::canonicalize(source).ok()?;
    Some(format!(
        "{}\n{} bytes\nmodified {}.{:09}\n",
        path.display(),
        meta.len(),
        since.as_secs(),
        since.subsec_nanos()
    ))
}

fn sidecar(rung: &Path) -> PathBuf {
    let mut name = rung.as_os_str().to_owned();
    name.push(".source");
    PathBuf::from(name)
}

/// A quantization already in the folder is used again when it reads as the type asked for and
/// was made from this very file, as it is now (`source`: its [`identity`]).
fn reusable(path: &Path, kind: &str, source: Option<&str>) -> Option<GgufHeader> {
    let made_from = std::fs::read_to_string(sidecar(path)).ok()?;
    if Some(made_from.as_str()) != source {
        return None;
    }
    let header = gguf::read(path).ok()?;
    (header.quantization() == kind).then_some(header)
}

/// Builds, or finds already built, each of `kinds` of `source` in `dir` (created if need be),
/// saying on stderr what it did; the files in the order of `kinds`. A type the model already
/// is, is left out with a note: the model itself is measured. With `imatrix` (the matrix and
/// its file), each rung is built with it.
pub fn build(
    source: &Path,
    header: &GgufHeader,
    stem: &str,
    kinds: &[&'static str],
    dir: &Path,
    threads: u32,
    imatrix: Option<(&Imatrix, &Path)>,
) -> Result<Vec<(PathBuf, GgufHeader)>, QuantizeError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| QuantizeError::Output(format!("{}: {e}", dir.display())))?;
    // A split model's every part: a part replaced is another model.
    let model = std::iter::once(source)
        .chain(header.parts.iter().map(PathBuf::as_path))
        .map(identity)
        .collect::<Option<String>>();
    let made_from = match imatrix {
        None => model,
        Some((_, file)) => model
            .zip(identity(file))
            .map(|(s, m)| format!("{s}importance matrix {m}")),
    };
    let suffix = if imatrix.is_some() { "-imatrix" } else { "" };
    let rung = |kind: &str| dir.join(format!("{stem}-{kind}{suffix}.gguf"));
    let options = quantize::Options {
        threads,
        imatrix,
        progress: true,
        ..quantize::Options::default()
    };
    // Every rung to build must fit before the first is built, not only each as it comes.
    let to_build: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|&k| {
            header.quantization() != k && reusable(&rung(k), k, made_from.as_deref()).is_none()
        })
        .collect();
    if to_build.len() > 1 {
        let what = format!("building {} rungs of {stem}", to_build.len());
        quantize::check_room(source, header, &to_build, &options, dir, &what)?;
    }
    let mut out = Vec::with_capacity(kinds.len());
    for &kind in kinds {
        if header.quantization() == kind {
            eprintln!("{stem} is {kind} already: measured as it is");
            continue;
        }
        let path = rung(kind);
        if let Some(h) = reusable(&path, kind, made_from.as_deref()) {
            eprintln!("{kind}: reusing {}", path.display());
            out.push((path, h));
            continue;
        }
        let started = Instant::now();
        // The old note goes first: a rung that is half replaced is never taken for the model's.
        let note = sidecar(&path);
        let _ = std::fs::remove_file(&note);
        quantize::quantize(source, &path, kind, &options)?;
        if let Some(made_from) = &made_from {
            std::fs::write(&note, made_from)
                .map_err(|e| QuantizeError::Output(format!("{}: {e}", note.display())))?;
        }
        let h = gguf::read(&path)
            .map_err(|e| QuantizeError::Output(format!("{}: {e}", path.display())))?;
        eprintln!(
            "{kind}: built {} ({:.1} MiB) in {:.1} s",
            path.display(),
            std::fs::metadata(&path).map_or(0.0, |m| m.len() as f64 / 1048576.0),
            started.elapsed().as_secs_f64()
        );
        out.push((path, h));
    }
    Ok(out)
}
