//! The prompt cache across a restart (`--cache-dir`): a model that stops (it unloads, or the
//! process stops) writes the conversations it keeps (its slots' and those in host memory) into
//! a folder, and the next start reads the list back, so a conversation's next turn after a
//! restart (an upgrade, a reboot, a crash once they were written) copies its rows back instead
//! of reading its history again. An unloading model writes too, since once it is unloaded it
//! could not write them as the process stops (only a model's own context can: llama.cpp's
//! rows are opaque); its next load reads them back from the folder. llama.cpp's server saves
//! and restores one slot at a time on request (`--slot-save-path`); Ollama keeps nothing.
//!
//! Each conversation is two files with one name: `NAME.seq`, its rows as llama.cpp writes a
//! sequence out (`llama_state_seq_get_data`; a sliding-window model's put together into one
//! that holds every cell, see `rows`), and `NAME.json`, what the worker knows of them
//! ([`Meta`]: its tokens among them). A file is good only for the build that wrote it
//! (llama.cpp's row format, and what this build's reuse rules say of the rows) and for the
//! model family it names; one for another build, or that cannot be read, is removed when the
//! folder is read. Entries read
//! back stay files until a request takes one (its files go once its rows are back in a slot)
//! or the cache drops it (its files go with it); when the process stops they stay for the
//! next start. Names are the time of writing, so the oldest come first when they are read.
//!
//! One process uses a folder at a time: it holds an exclusive lock on the folder's `lock` file
//! (which names its pid) for as long as it runs, and another server given the same folder
//! refuses to start. Two processes in one folder would each read the other's conversations
//! as their own, remove files the other still counts on (and the half-written files of its
//! stop), and take one conversation back twice. The kernel drops the lock when the process
//! ends, however it ends, so a crash leaves nothing to clean up.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The layout of [`Meta`] and of the rows beside it; a file of another is not read.
const FORMAT: u32 = 2;
/// The rows, as llama.cpp writes them.
const ROWS: &str = "seq";
/// What the worker knows of them.
const META: &str = "json";
/// A file being written: renamed once whole, so a crash leaves no half a file that reads.
const PART: &str = "part";
/// The file a process holds locked while it uses the folder, with its pid in it.
const LOCK: &str = "lock";

/// The folder, shared by every entry read from or written to it.
pub(crate) struct Dir {
    path: PathBuf,
    /// The process has stopped: entries dropped from now on keep their files.
    stopped: AtomicBool,
    /// Names written by this process, after the time.
    written: AtomicU64,
    /// The folder's lock, held while this lives (`None` where the file system has no locks).
    _lock: Option<fs::File>,
}

/// What the worker knows of a conversation's rows, beside them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub(crate) format: u32,
    /// The build that wrote it ([`build`]).
    pub(crate) build: String,
    /// The model family it belongs to (`worker::family`).
    pub(crate) family: String,
    /// The model's name when it was written, for whoever looks into the folder.
    pub(crate) model: String,
    pub(crate) tokens: Vec<i32>,
    /// Leading tokens read as a cold read reads them.
    pub(crate) exact: usize,
    /// Where a cold read's segments start, and how far the layout goes.
    pub(crate) starts: Vec<usize>,
    pub(crate) segments: usize,
    /// What the sequence holds once copied back (`policy::Held`).
    pub(crate) first: usize,
    pub(crate) end: usize,
    pub(crate) ordered: bool,
    /// The rows file's length.
    pub(crate) bytes: u64,
}

/// A conversation in the folder: removed when dropped (taken back into a slot, or dropped by
/// the cache), unless the process has stopped or is ending.
pub(crate) struct Saved {
    dir: Arc<Dir>,
    name: String,
    bytes: u64,
}

/// This build: its version, and the executable's length and modification time, which any
/// rebuild or upgrade changes (and with it llama.cpp's row format, or the reuse rules).
pub(crate) fn build() -> &'static str {
    static BUILD: OnceLock<String> = OnceLock::new();
    BUILD.get_or_init(|| {
        let exe = std::env::current_exe().and_then(fs::metadata).ok();
        format!(
            "{}|{:?}|{:?}",
            env!("CARGO_PKG_VERSION"),
            exe.as_ref().map(fs::Metadata::len),
            exe.and_then(|m| m.modified().ok())
        )
    })
}

impl Dir {
    /// The folder at `path`, made if it is missing (readable by this user only: the files
    /// hold the conversations' tokens, so their text), and locked for this process: an error
    /// if another process holds it. Files left half written are removed.
    pub(crate) fn open(path: &Path) -> io::Result<Arc<Dir>> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(path)?;
        let lock = lock(&path.join(LOCK))?;
        for file in fs::read_dir(path)? {
            let name = file?.file_name();
            if ours(&name.to_string_lossy()).is_some_and(|(_, ext)| ext.ends_with(PART)) {
                remove(&path.join(name));
            }
        }
        Ok(Arc::new(Dir {
            path: path.to_path_buf(),
            stopped: AtomicBool::new(false),
            written: AtomicU64::new(0),
            _lock: lock,
        }))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The conversations in the folder that this build wrote, oldest first. The rest (another
    /// build's, or files that cannot be read or whose rows are missing or cut short) are
    /// removed, those that are damaged with a warning. Files not named as this module names
    /// them are left alone.
    pub(crate) fn read(self: &Arc<Self>) -> Vec<(Meta, Saved)> {
        let Ok(files) = fs::read_dir(&self.path) else {
            return Vec::new();
        };
        let mut names: Vec<String> = files
            .filter_map(|f| f.ok()?.file_name().into_string().ok())
            .filter(|n| ours(n).is_some())
            .collect();
        names.sort();
        let stems = |ext: &str| -> Vec<&str> {
            names
                .iter()
                .filter_map(|n| ours(n).filter(|&(_, e)| e == ext).map(|(stem, _)| stem))
                .collect()
        };
        let metas = stems(META);
        // Rows without what is known of them: a process that stopped between the two files.
        for stem in stems(ROWS) {
            if !metas.contains(&stem) {
                remove(&self.path.join(format!("{stem}.{ROWS}")));
            }
        }
        let mut found = Vec::new();
        for stem in metas {
            let mut saved = Saved {
                dir: Arc::clone(self),
                name: stem.to_owned(),
                bytes: 0,
            };
            match self.check(&saved) {
                Ok(meta) => {
                    saved.bytes = meta.bytes;
                    found.push((meta, saved));
                }
                // Dropping `saved` removes both files.
                Err(Stale::Build) => {
                    tracing::debug!(file = %saved.meta().display(), "a kept conversation of another build removed");
                }
                Err(Stale::Damaged(why)) => {
                    tracing::warn!(file = %saved.meta().display(), why, "a kept conversation that cannot be read removed");
                }
            }
        }
        found
    }

    fn check(&self, saved: &Saved) -> Result<Meta, Stale> {
        let text = fs::read(saved.meta()).map_err(|e| Stale::Damaged(e.to_string()))?;
        let meta: Meta =
            serde_json::from_slice(&text).map_err(|e| Stale::Damaged(e.to_string()))?;
        if meta.format != FORMAT || meta.build != build() {
            return Err(Stale::Build);
        }
        let rows = fs::metadata(saved.rows()).map_err(|e| Stale::Damaged(e.to_string()))?;
        if rows.len() != meta.bytes {
            return Err(Stale::Damaged(format!(
                "its rows take {} bytes where {} were written",
                rows.len(),
                meta.bytes
            )));
        }
        if meta.end != meta.tokens.len() || meta.exact > meta.tokens.len() {
            return Err(Stale::Damaged("its counts do not match its tokens".into()));
        }
        Ok(meta)
    }

    /// Writes a conversation: `rows` writes its rows to the path given (llama.cpp's sequence
    /// file), then `meta` goes beside them, with the rows' length.
    pub(crate) fn write(
        self: &Arc<Self>,
        mut meta: Meta,
        rows: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<Saved, String> {
        let n = self.written.fetch_add(1, Ordering::Relaxed);
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("{since:024}-{n:06}");
        let mut saved = Saved {
            dir: Arc::clone(self),
            name,
            bytes: 0,
        };
        let part = saved.part(ROWS);
        let wrote = rows(&part).and_then(|()| {
            let bytes = fs::metadata(&part).map_err(|e| e.to_string())?.len();
            fs::rename(&part, saved.rows()).map_err(|e| e.to_string())?;
            Ok(bytes)
        });
        let bytes = match wrote {
            Ok(bytes) => bytes,
            Err(e) => {
                remove(&part);
                return Err(e);
            }
        };
        saved.bytes = bytes;
        meta.format = FORMAT;
        meta.build = build().to_owned();
        meta.bytes = bytes;
        let text = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
        let part = saved.part(META);
        fs::write(&part, text)
            .and_then(|()| fs::rename(&part, saved.meta()))
            .map_err(|e| {
                remove(&part);
                e.to_string()
            })?;
        Ok(saved)
    }

    /// Every model has stopped: what is in the folder now stays for the next start.
    pub(crate) fn stopped(&self) {
        self.stopped.store(true, Ordering::Release);
    }
}

/// Why a file in the folder is not read back.
enum Stale {
    /// Another build wrote it.
    Build,
    Damaged(String),
}

impl Saved {
    /// Its rows file.
    pub(crate) fn rows(&self) -> PathBuf {
        self.dir.path.join(format!("{}.{ROWS}", self.name))
    }

    fn meta(&self) -> PathBuf {
        self.dir.path.join(format!("{}.{META}", self.name))
    }

    /// Where its `ext` file is written before it is whole.
    fn part(&self, ext: &str) -> PathBuf {
        self.dir.path.join(format!("{}.{ext}.{PART}", self.name))
    }

    /// The rows file's length.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Saved {
    fn drop(&mut self) {
        if !self.dir.stopped.load(Ordering::Acquire) {
            remove(&self.rows());
            remove(&self.meta());
        }
    }
}

/// The folder's lock file at `path`, locked for this process and naming its pid; an error
/// naming the other's pid if another process (or another `Dir` of this one) holds it. Where the
/// file system cannot lock, the folder is used unlocked, with a warning.
fn lock(path: &Path) -> io::Result<Option<fs::File>> {
    use std::io::{Read, Seek, Write};
    // Not truncated before the lock is ours: the pid in it may be the holder's.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let holder = match file.read_to_string(&mut pid) {
                Ok(_) if !pid.trim().is_empty() => format!("another backstop (pid {})", pid.trim()),
                _ => "another backstop".to_owned(),
            };
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("{holder} is using it; give each server a folder of its own"),
            ));
        }
        Err(fs::TryLockError::Error(e)) => {
            tracing::warn!(file = %path.display(), error = %e,
                "cannot lock the cache folder: nothing stops another server from using it too");
            return Ok(None);
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(Some(file))
}

/// The name and extension of a file this module names: `NAME.seq`, `NAME.json`, or either
/// with `.part`, where NAME is the time it was written, in nanoseconds (24 digits), and a
/// count (6).
fn ours(file: &str) -> Option<(&str, &str)> {
    let (stem, ext) = file.split_once('.')?;
    let (time, count) = stem.split_once('-')?;
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    let known = [ROWS, META]
        .iter()
        .any(|e| ext == *e || ext.strip_prefix(e).and_then(|p| p.strip_prefix('.')) == Some(PART));
    (digits(time, 24) && digits(count, 6) && known).then_some((stem, ext))
}

/// Removes a file of the folder's; one already gone is no matter, and another failure is only
/// logged (the next start reads the folder again).
fn remove(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(file = %path.display(), error = %e, "could not remove a kept conversation's file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(tokens: &[i32]) -> Meta {
        Meta {
            format: 0,
            build: String::new(),
            family: "smollm2.gguf|1|f16".into(),
            model: "smollm2".into(),
            tokens: tokens.to_vec(),
            exact: tokens.len(),
            starts: vec![0],
            segments: tokens.len(),
            first: 0,
            end: tokens.len(),
            ordered: true,
            bytes: 0,
        }
    }

    fn folder(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("backstop-persist-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        path
    }

    fn files(path: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(path)
            .unwrap()
            .map(|f| f.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn rows(bytes: &'static [u8]) -> impl FnOnce(&Path) -> Result<(), String> {
        move |p: &Path| fs::write(p, bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn conversations_written_by_a_stopped_process_are_read_back_oldest_first() {
        let path = folder("round");
        let dir = Dir::open(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        }
        let a = dir.write(meta(&[1, 2, 3]), rows(b"rows of a")).unwrap();
        let b = dir.write(meta(&[4, 5]), rows(b"b")).unwrap();
        assert_eq!((a.bytes(), b.bytes()), (9, 1));
        assert_eq!(fs::read(a.rows()).unwrap(), b"rows of a");
        dir.stopped();
        drop((a, b, dir));
        assert_eq!(files(&path).len(), 5, "a stopped process leaves its files");

        let again = Dir::open(&path).unwrap();
        let read = again.read();
        let tokens: Vec<&[i32]> = read.iter().map(|(m, _)| &m.tokens[..]).collect();
        assert_eq!(tokens, [&[1, 2, 3][..], &[4, 5][..]]);
        assert_eq!(read[0].0.build, build());
        assert_eq!(read[0].1.bytes(), 9);
        // Taken (or dropped by the cache) while the process runs: its files go.
        drop(read);
        assert_eq!(files(&path), ["lock"]);
        fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn files_of_another_build_or_damaged_or_half_written_are_removed_not_read() {
        let path = folder("stale");
        let dir = Dir::open(&path).unwrap();
        let good = dir.write(meta(&[1, 2]), rows(b"good")).unwrap();
        let short = dir.write(meta(&[3]), rows(b"cut short")).unwrap();
        let other = dir.write(meta(&[4]), rows(b"x")).unwrap();
        let lying = dir.write(meta(&[5, 6]), rows(b"y")).unwrap();
        dir.stopped();
        fs::write(short.rows(), b"cut").unwrap();
        let mut m: Meta = serde_json::from_slice(&fs::read(other.meta()).unwrap()).unwrap();
        m.build = "0.0.0|another".into();
        fs::write(other.meta(), serde_json::to_vec(&m).unwrap()).unwrap();
        let mut m: Meta = serde_json::from_slice(&fs::read(lying.meta()).unwrap()).unwrap();
        m.end = 7;
        fs::write(lying.meta(), serde_json::to_vec(&m).unwrap()).unwrap();
        let named = |n: u32, ext: &str| path.join(format!("{n:024}-000000.{ext}"));
        fs::write(named(1, "json"), b"{not json").unwrap();
        fs::write(named(2, "seq"), b"rows alone").unwrap();
        fs::write(named(3, "seq.part"), b"half").unwrap();
        fs::write(named(4, "json.part"), b"half").unwrap();
        fs::write(path.join("notes.json"), b"a file of the user's").unwrap();
        let good_name = good.name.clone();
        drop((good, short, other, lying, dir));

        let again = Dir::open(&path).unwrap();
        let read = again.read();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].0.tokens, [1, 2]);
        assert_eq!(
            files(&path),
            [
                format!("{good_name}.json"),
                format!("{good_name}.seq"),
                "lock".into(),
                "notes.json".into()
            ]
        );
        fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn only_files_named_as_the_folder_names_them_are_its_own() {
        let stem = format!("{:024}-{:06}", 1_796_552_686_000_000_000u64, 7);
        for ext in ["seq", "json", "seq.part", "json.part"] {
            assert_eq!(
                ours(&format!("{stem}.{ext}")),
                Some((&stem[..], ext)),
                "{ext}"
            );
        }
        for name in [
            format!("{stem}.txt"),
            format!("{stem}.seq.bak"),
            stem.clone(),
            "notes.json".into(),
            format!("x{}.seq", &stem[1..]),
            format!("{:023}-{:06}.seq", 1, 7),
            format!("{:024}-{:05}.json", 1, 7),
        ] {
            assert_eq!(ours(&name), None, "{name}");
        }
    }

    #[test]
    fn rows_that_fail_to_write_leave_nothing_behind() {
        let path = folder("fail");
        let dir = Dir::open(&path).unwrap();
        let err = dir
            .write(meta(&[1]), |p: &Path| {
                fs::write(p, b"some").unwrap();
                Err("llama.cpp could not write the sequence".into())
            })
            .err()
            .unwrap();
        assert!(err.contains("could not write"), "{err}");
        assert_eq!(files(&path), ["lock"]);
        fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn one_user_of_a_folder_at_a_time_and_its_half_written_files_are_left_to_it() {
        let path = folder("locked");
        let dir = Dir::open(&path).unwrap();
        let pid = std::process::id().to_string();
        assert_eq!(fs::read_to_string(path.join(LOCK)).unwrap().trim(), pid);
        let half = path.join(format!("{:024}-000000.seq.part", 1));
        fs::write(&half, b"being written").unwrap();

        let err = Dir::open(&path).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("another backstop (pid {pid}) is using it")),
            "{msg}"
        );
        assert!(
            half.exists(),
            "the holder's half-written file is left alone"
        );
        assert_eq!(fs::read_to_string(path.join(LOCK)).unwrap().trim(), pid);

        // Its holder gone (a process that ends, however it ends, drops its lock), it opens.
        drop(dir);
        let again = Dir::open(&path).unwrap();
        assert!(
            !half.exists(),
            "left half written by a process that has ended"
        );
        assert!(again.read().is_empty());
        drop(again);
        fs::remove_dir_all(&path).unwrap();
    }
}
