//! Starts the real `backstop` binary on a free loopback port with the real SmolLM2 model,
//! and speaks HTTP to it.

#![allow(dead_code)] // each test binary uses a different subset of these helpers

pub mod fake_cloud;
pub mod fake_hub;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

/// The checkout under test. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test as well as
/// when it builds one; the runtime value wins, because a test binary built in another copy of
/// the checkout sharing the build cache (the setup script keeps it outside the checkout) is
/// not rebuilt, and would otherwise look for files where that copy was.
/// Whether this CPU has Intel AMX tiles (Linux names the flag `amx_tile`), which llama.cpp's
/// CPU backend then multiplies with.
pub fn cpu_has_amx() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "amx_tile"))
    })
}

pub fn checkout() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Where the setup script puts the models.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BACKSTOP_MODELS") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("BACKSTOP_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/backstop"));
    cache.join("models")
}

fn model(file: &str) -> PathBuf {
    let p = models_dir().join(file);
    assert!(
        p.exists(),
        "test model {} is missing: run `scripts/setup.sh test` (or scripts/fetch-models.sh)",
        p.display()
    );
    p
}

/// SmolLM2-135M-Instruct Q4_1.
pub fn smollm2() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Gemma 3 270M Q4_K_M (its GGUF has no chat template).
pub fn gemma3() -> PathBuf {
    model("gemma-3-270m-q4_k_m.gguf")
}

/// SmolLM2 with its first attention norm typed I32 instead of F32, in a fresh folder:
/// llama.cpp loads it (the shapes are right and the bytes the same size), and its CPU kernels
/// abort the process at the first decode (`binary_op: unsupported types`), as they do for
/// any norm or bias written in a type other than F32.
pub fn uncomputable_gguf() -> PathBuf {
    const NAME: &[u8] = b"blk.0.attn_norm.weight";
    const GGML_TYPE_I32: u32 = 26;
    let mut bytes = std::fs::read(smollm2()).unwrap();
    let mut key = (NAME.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(NAME);
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the tensor's entry in the header");
    // After the name: the number of dimensions (1 here), each dimension, then the type.
    let dims_at = at + key.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    let type_at = dims_at + 4 + 8 * n_dims;
    assert_eq!(
        bytes[type_at..type_at + 4],
        0u32.to_le_bytes(),
        "F32 before"
    );
    bytes[type_at..type_at + 4].copy_from_slice(&GGML_TYPE_I32.to_le_bytes());
    let path = temp_dir("uncomputable").join("odd.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// SmolLM2 with its last tensor made long enough that the file is 2 TB: its outermost
/// dimension multiplied, the file extended to hold the data (sparse: no disk is used). That
/// tensor is one every quantization type keeps as it is, so each quantized copy is 2 TB too:
/// a model no disk the tests run on has room for. Reading its data would take hours, so only
/// what happens before that can be tested with it.
pub fn giant_gguf() -> PathBuf {
    const SIZE: u64 = 2_000_000_000_000;
    let source = smollm2();
    let mut bytes = std::fs::read(&source).unwrap();
    let h = backstop::models::gguf::read(&source).unwrap();
    let last = h.tensors.iter().max_by_key(|t| t.offset).unwrap();
    let data = bytes.len() as u64 - h.data_start - last.offset;
    let times = SIZE / data;
    let mut key = (last.name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(last.name.as_bytes());
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    let n_dims = last.dims.len();
    let outer = at + 4 + 8 * (n_dims - 1);
    let dim = u64::from_le_bytes(bytes[outer..outer + 8].try_into().unwrap());
    assert_eq!(dim, last.dims[n_dims - 1]);
    bytes[outer..outer + 8].copy_from_slice(&(dim * times).to_le_bytes());
    let path = temp_dir("giant").join("giant.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(h.data_start + last.offset + data * times)
        .unwrap();
    path
}

/// `source` (a model in one file with the default alignment) split into `count` files in a
/// fresh folder, as llama-gguf-split writes them: `NAME-00001-of-0000N.gguf` and on, the
/// tensors shared out in file order, the first part with every metadata key and each with
/// `split.no`, `split.count` and `split.tensors.count`. The parts, first first. Written here
/// because the crate's llama.cpp has no llama-gguf-split; the bytes of each tensor are copied.
pub fn split_gguf(source: &Path, name: &str, count: u16) -> Vec<PathBuf> {
    const ALIGN: usize = 32;
    let bytes = std::fs::read(source).unwrap();
    let h = backstop::models::gguf::read(source).unwrap();
    assert!(!h.metadata.contains_key("general.alignment") && h.parts.is_empty());
    // The metadata runs from after the counts (magic, version, tensors, keys) to the first
    // tensor's entry: its name, after its length.
    let first = &h.tensors[0].name;
    let mut entry = (first.len() as u64).to_le_bytes().to_vec();
    entry.extend_from_slice(first.as_bytes());
    let kv_end = bytes.windows(entry.len()).position(|w| w == entry).unwrap();
    let data = tensor_bytes(source);
    let key = |out: &mut Vec<u8>, k: &str, kind: u32| {
        out.extend((k.len() as u64).to_le_bytes());
        out.extend(k.as_bytes());
        out.extend(kind.to_le_bytes());
    };
    let dir = temp_dir(name);
    let per_part = h.tensors.len().div_ceil(usize::from(count));
    let mut paths = Vec::new();
    for (no, tensors) in h.tensors.chunks(per_part).enumerate() {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        let mut kv = Vec::new();
        let mut kv_count = 3u64;
        if no == 0 {
            kv.extend_from_slice(&bytes[24..kv_end]);
            kv_count += u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        }
        key(&mut kv, "split.no", 2);
        kv.extend((no as u16).to_le_bytes());
        key(&mut kv, "split.count", 2);
        kv.extend(count.to_le_bytes());
        key(&mut kv, "split.tensors.count", 5);
        kv.extend((h.tensors.len() as i32).to_le_bytes());
        out.extend(kv_count.to_le_bytes());
        out.extend(kv);
        let mut offset = 0usize;
        let mut blobs = Vec::new();
        for t in tensors {
            out.extend((t.name.len() as u64).to_le_bytes());
            out.extend(t.name.as_bytes());
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ggml_type.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            let blob = &data[&t.name];
            blobs.push(blob);
            offset += blob.len();
        }
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        for b in blobs {
            out.extend_from_slice(b);
        }
        let path = dir.join(format!("{name}-{:05}-of-{count:05}.gguf", no + 1));
        std::fs::write(&path, out).unwrap();
        paths.push(path);
    }
    assert_eq!(
        paths.len(),
        usize::from(count),
        "{count} parts of {} tensors",
        h.tensors.len()
    );
    paths
}

/// Each tensor's bytes in a GGUF file in one piece, by name (with the padding to the next).
pub fn tensor_bytes(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let h = backstop::models::gguf::read(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let data = &bytes[h.data_start as usize..];
    let mut starts: Vec<usize> = h.tensors.iter().map(|t| t.offset as usize).collect();
    starts.sort_unstable();
    h.tensors
        .into_iter()
        .map(|t| {
            let at = t.offset as usize;
            let end = starts
                .get(starts.partition_point(|&s| s <= at))
                .copied()
                .unwrap_or(data.len());
            (t.name, data[at..end].to_vec())
        })
        .collect()
}

/// A running server; killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    log: Arc<Mutex<String>>,
    /// Whether the reader of the log is done: the process closed its stderr (it exited) or
    /// the test closed the pipe.
    log_read: Arc<AtomicBool>,
    pub client: reqwest::Client,
    /// The server's own model store (removed on drop), unless the test gave one.
    pub store: Option<PathBuf>,
}

/// A `models.toml` holding `text`, in a fresh folder of its own (see [`temp_dir`]).
pub fn models_toml(name: &str, text: &str) -> PathBuf {
    let cfg = temp_dir(name).join("models.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// A fresh folder under the system's temporary folder. Test binaries exit without running
/// destructors of what they leave there, so the first call also sweeps the folders of earlier
/// runs whose process is gone (found through /proc; elsewhere nothing is swept).
pub fn temp_dir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SWEEP: std::sync::Once = std::sync::Once::new();
    static N: AtomicU64 = AtomicU64::new(0);
    let root = std::env::temp_dir();
    SWEEP.call_once(|| sweep_earlier_runs(&root));
    let d = root.join(format!(
        "backstop-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sweep_earlier_runs(root: &std::path::Path) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("backstop-test-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The result of running the binary to completion.
pub struct Exit {
    pub code: Option<i32>,
    pub stderr: String,
}

/// The binary, without the developer's own `OLLAMA_*` / `BACKSTOP_*` settings (only where
/// the test models live is kept), so they never leak into a test.
pub fn backstop_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_backstop"));
    for (k, _) in std::env::vars() {
        if k.starts_with("OLLAMA_")
            || (k.starts_with("BACKSTOP_") && k != "BACKSTOP_CACHE" && k != "BACKSTOP_MODELS")
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs `backstop ARGS` and waits for it to exit (for start-up failures).
pub fn run_to_exit(args: &[&str], timeout: Duration) -> Exit {
    run_to_exit_with_env(args, &[], timeout)
}

/// [`run_to_exit`] with extra environment variables (and none of the developer's own
/// `OLLAMA_*` / `BACKSTOP_*` settings).
pub fn run_to_exit_with_env(args: &[&str], envs: &[(&str, &str)], timeout: Duration) -> Exit {
    let mut cmd = backstop_command();
    let mut child = cmd
        .envs(envs.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backstop");
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s).ok();
        s
    });
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("backstop did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Exit {
        code,
        stderr: reader.join().unwrap(),
    }
}

/// Holds the calling thread, and the threads and processes it starts, to CPU `cpu` alone, as
/// `taskset -c` does: one system call on a set on the stack, nothing allocated, so it may run
/// between fork and exec. `cpu` must be below CPU_SETSIZE (one the process may run on is).
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is the empty set; `cpu` is
    // below CPU_SETSIZE, its size in bits; pid 0 names this thread, and the set outlives the
    // call.
    let rc = unsafe {
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A cgroup with a CPU quota, as `docker --cpus` makes one: v2's where the cpu controller can
/// be had, else v1's cpu hierarchy (and cpuacct's, where it is mounted apart, so that the
/// group's CPU time is counted too); removed when dropped.
pub struct CpuQuota {
    /// The group's directories, one a hierarchy.
    dirs: Vec<PathBuf>,
    /// The files a process joins them through.
    procs: Vec<std::ffi::CString>,
}

impl CpuQuota {
    /// A group of its own whose processes together get `cpus` CPUs' worth of time; `None`
    /// where no cgroup file system with the cpu controller is writable (not root).
    pub fn new(cpus: f64) -> Option<CpuQuota> {
        const PERIOD: u64 = 100_000;
        let quota = (cpus * PERIOD as f64) as u64;
        let root = Path::new("/sys/fs/cgroup");
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("backstop-test-{}-{n}", std::process::id());
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers"));
        let mut made = CpuQuota {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        let mut make = |dir: PathBuf, settings: &[(&str, String)]| -> Option<()> {
            std::fs::create_dir(&dir).ok()?;
            made.dirs.push(dir.clone());
            for (file, value) in settings {
                std::fs::write(dir.join(file), value).ok()?;
            }
            let procs = dir
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes();
            made.procs.push(std::ffi::CString::new(procs).ok()?);
            Some(())
        };
        if controllers.is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu")) {
            let subtree = root.join("cgroup.subtree_control");
            let enabled = std::fs::read_to_string(&subtree).ok()?;
            if !enabled.split_whitespace().any(|c| c == "cpu") {
                std::fs::write(&subtree, "+cpu").ok()?;
            }
            make(
                root.join(&name),
                &[("cpu.max", format!("{quota} {PERIOD}"))],
            )?;
        } else {
            let cpu = root.join("cpu");
            make(
                cpu.join(&name),
                &[
                    ("cpu.cfs_period_us", PERIOD.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ],
            )?;
            let cpuacct = root.join("cpuacct");
            let apart = cpuacct.canonicalize().ok()? != cpu.canonicalize().ok()?;
            if apart {
                make(cpuacct.join(&name), &[])?;
            }
        }
        Some(made)
    }

    /// Has `cmd`'s process join the group before it runs.
    pub fn hold(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let procs = self.procs.clone();
        // SAFETY: between fork and exec the child only opens, writes and closes files.
        unsafe {
            cmd.pre_exec(move || join_groups(&procs));
        }
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // A group is removed once its processes have exited, which the kernel may see a
        // moment after they are reaped.
        for dir in self.dirs.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Moves the calling process into the groups whose `cgroup.procs` files are named (writing 0
/// names the writer). Only system calls on memory the caller owns: safe between fork and exec.
fn join_groups(procs: &[std::ffi::CString]) -> std::io::Result<()> {
    for file in procs {
        // SAFETY: `file` is a NUL-terminated path that outlives the calls; the buffer written
        // is one byte long.
        let written = unsafe {
            let fd = libc::open(file.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            n
        };
        if written != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What a test server's process is held to, set between fork and exec.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Confine {
    /// The most bytes it may lock in RAM, without the capability to pass that.
    lock_limit: Option<u64>,
    /// The one CPU it may run on.
    cpu: Option<usize>,
    /// The `cgroup.procs` files of the groups it runs in ([`CpuQuota`]).
    groups: Vec<std::ffi::CString>,
}

impl Server {
    /// `backstop serve --host 127.0.0.1:0 --model smollm2=... EXTRA`, ready to serve.
    pub async fn start(extra: &[&str]) -> Server {
        let model = format!("smollm2={}", smollm2().display());
        let mut args = vec!["--model", model.as_str()];
        args.extend_from_slice(extra);
        Self::start_raw(&args).await
    }

    /// `backstop serve --host 127.0.0.1:0 --threads 1 ARGS`, ready to serve. One thread per
    /// server unless ARGS say otherwise: test binaries run two tests at a time, and llama.cpp's
    /// OpenMP threads spin badly when a machine is oversubscribed.
    pub async fn start_raw(args: &[&str]) -> Server {
        Self::start_with_env(args, &[]).await
    }

    /// Like [`Server::start_raw`], with extra environment variables.
    pub async fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Server {
        Self::spawn(args, envs, false, Confine::default()).await
    }

    /// Like [`Server::start`], but the log pipe is closed as soon as the address is read, as
    /// `backstop serve | head` would: the model loads, and everything after, with no reader.
    pub async fn start_then_close_log(extra: &[&str]) -> Server {
        let model = format!("smollm2={}", smollm2().display());
        let mut args = vec!["--model", model.as_str()];
        args.extend_from_slice(extra);
        Self::spawn(&args, &[], true, Confine::default()).await
    }

    /// Like [`Server::start_raw`], for a process that may lock at most `bytes` in RAM
    /// (`RLIMIT_MEMLOCK`) and cannot pass that limit: without CAP_IPC_LOCK, which root has
    /// (dropped from the bounding set before it runs, so not regained at exec).
    pub async fn start_locking_at_most(args: &[&str], bytes: u64) -> Server {
        let confine = Confine {
            lock_limit: Some(bytes),
            ..Confine::default()
        };
        Self::spawn(args, &[], false, confine).await
    }

    /// Like [`Server::start`], for a process that may run on CPU `cpu` alone (as `taskset -c`
    /// or a container's cpuset holds it).
    pub async fn start_on_cpu(extra: &[&str], cpu: usize) -> Server {
        let confine = Confine {
            cpu: Some(cpu),
            ..Confine::default()
        };
        Self::start_confined(extra, confine).await
    }

    /// Like [`Server::start`], for a process in the group of `quota`.
    pub async fn start_in(extra: &[&str], quota: &CpuQuota) -> Server {
        let confine = Confine {
            groups: quota.procs.clone(),
            ..Confine::default()
        };
        Self::start_confined(extra, confine).await
    }

    /// [`Server::start`] for a process held as `confine` says.
    async fn start_confined(extra: &[&str], confine: Confine) -> Server {
        let model = format!("smollm2={}", smollm2().display());
        let mut args = vec!["--model", model.as_str()];
        args.extend_from_slice(extra);
        Self::spawn(&args, &[], false, confine).await
    }

    async fn spawn(
        args: &[&str],
        envs: &[(&str, &str)],
        close_log: bool,
        confine: Confine,
    ) -> Server {
        let mut cmd = backstop_command();
        if confine != Confine::default() {
            use std::os::unix::process::CommandExt;
            /// linux/capability.h
            const CAP_IPC_LOCK: libc::c_ulong = 14;
            // SAFETY: between fork and exec the child makes system calls on its own memory and
            // allocates nothing. Dropping the capability fails without CAP_SETPCAP, where the
            // process has no CAP_IPC_LOCK to drop; the test checks the child's capabilities.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(bytes) = confine.lock_limit {
                        libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0);
                        let limit = libc::rlimit {
                            rlim_cur: bytes,
                            rlim_max: bytes,
                        };
                        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    join_groups(&confine.groups)?;
                    confine.cpu.map_or(Ok(()), pin_to_cpu)
                });
            }
        }
        cmd.arg("serve");
        if !args.contains(&"--threads") {
            cmd.args(["--threads", "1"]);
        }
        if !args.contains(&"--host") {
            cmd.args(["--host", "127.0.0.1:0"]);
        }
        // Answers are read again while idle only where a test asks (`--reread-answers 1`):
        // whether a re-read begins before a test's next request depends on timing, and what
        // it reads changes what later requests reuse (never their answers), which many tests
        // count. The tests of re-reading turn it on and wait for it.
        if !args.contains(&"--reread-answers")
            && !envs.iter().any(|(k, _)| *k == "BACKSTOP_REREAD_ANSWERS")
        {
            cmd.args(["--reread-answers", "0"]);
        }
        cmd.args(args);
        // Each server gets an empty store of its own unless the test brings one, so what one
        // test pulls or creates never shows up in another's listings.
        let store = if args.contains(&"--models-dir")
            || envs
                .iter()
                .any(|(k, _)| *k == "OLLAMA_MODELS" || *k == "BACKSTOP_MODELS")
        {
            None
        } else {
            let dir = temp_dir("store");
            cmd.arg("--models-dir").arg(&dir);
            Some(dir)
        };
        cmd.env("BACKSTOP_LOG", "info,llama-cpp-2=warn");
        cmd.envs(envs.iter().copied());
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn backstop");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let log_read = Arc::new(AtomicBool::new(false));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        {
            let log = Arc::clone(&log);
            let log_read = Arc::clone(&log_read);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    // `listening on http://ADDR` (or https:// with TLS).
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        if rest.starts_with("http") {
                            // Text logs end the line there; JSON logs close a string.
                            let url = rest.split(['"', ' ']).next().unwrap_or(rest);
                            addr_tx.send(url.trim().to_owned()).ok();
                            if close_log {
                                break; // the reader goes, and the pipe with it
                            }
                        }
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                log_read.store(true, Ordering::Release);
            });
        }
        let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                child.kill().ok();
                panic!("server did not start: {}", log.lock().unwrap());
            }
        };
        let server = Server {
            child,
            base: addr,
            log,
            log_read,
            client: reqwest::Client::new(),
            store,
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        if self.base.starts_with("https://") {
            // The harness has no client certificate for mTLS servers: the log says when the
            // configured models are loaded.
            while !self.log().contains("model ready") {
                assert!(
                    Instant::now() < deadline,
                    "server never became ready:\n{}",
                    self.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return;
        }
        loop {
            if let Ok(r) = self.client.get(self.url("/health/ready")).send().await {
                // 403: a client allowlist that excludes the harness; the log tells instead.
                if r.status() == 200 || (r.status() == 403 && self.log().contains("model ready")) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "server never became ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM, as systemd or Ctrl-C would.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code, and for the log to hold all
    /// the process wrote: its last lines may still be in the pipe when it exits.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code();
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        while !self.log_read.load(Ordering::Acquire) {
            assert!(
                Instant::now() < deadline,
                "the exited server's log was never read to its end:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        code
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log holds every one of `needles` and returns it; see
    /// [`Server::wait_log_for`].
    pub async fn wait_log(&self, needles: &[&str]) -> String {
        self.wait_log_for(|log| needles.iter().all(|n| log.contains(n)), needles)
            .await
    }

    /// Waits until `done` holds for the log and returns it; panics with the log and `what`
    /// after 15 s. A line the server wrote before it answered a request may still be in the
    /// pipe or with the reader thread when the answer arrives (a busy 2-core CI machine showed
    /// it), so a test that asserts a line must wait for it, not look once.
    pub async fn wait_log_for(
        &self,
        done: impl Fn(&str) -> bool,
        what: impl std::fmt::Debug,
    ) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = self.log();
            if done(&log) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "the log never held {what:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// POST a JSON body; returns status and parsed JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, serde_json::to_vec(body).unwrap()).await
    }

    /// POST raw bytes with a JSON content type; returns status and the body, parsed as JSON
    /// where it is JSON.
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json)
    }

    /// POST a JSON body and read an NDJSON answer: status, content type, and every object.
    pub async fn ndjson(&self, path: &str, body: &Value) -> (u16, String, Vec<Value>) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let ctype = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let text = r.text().await.unwrap();
        (status, ctype, json_lines(&text))
    }

    /// Names of the loaded models, from `/api/ps`.
    pub async fn running(&self) -> Vec<String> {
        self.model_names("/api/ps").await
    }

    /// Names of the models `/api/tags` lists (configured and stored).
    pub async fn tags(&self) -> Vec<String> {
        self.model_names("/api/tags").await
    }

    /// The `name` of each of `models` in an Ollama listing at `path`.
    async fn model_names(&self, path: &str) -> Vec<String> {
        let (_, list) = self.get_json(path).await;
        list["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// GET a JSON document; returns status and body.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The names of the server process's threads, sorted.
    pub fn thread_names(&self) -> Vec<String> {
        let tasks = format!("/proc/{}/task", self.child.id());
        let mut names: Vec<String> = std::fs::read_dir(&tasks)
            .expect("the server's threads")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim_end().to_owned())
            .collect();
        names.sort();
        names
    }

    /// A non-streamed chat; panics unless 200.
    pub async fn chat(&self, body: Value) -> Value {
        let (status, json) = self.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{json}");
        json
    }

    /// Opens a stream; panics unless 200.
    pub async fn stream(&self, path: &str, body: &Value) -> SseReader {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        SseReader::new(r)
    }

    /// Current value of a metric line (first series whose name and labels start with
    /// `prefix`), or 0.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_value(&text, prefix)
    }

    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Newline-delimited JSON (Ollama's streams, `bench --format jsonl`): one value per non-blank
/// line; a line that is not JSON fails the test.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// What llama.cpp's log says each context was made with, in order: `enabled`, `disabled` or
/// `auto` per context, from its `flash_attn = …` line.
pub fn flash_attn_made(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("flash_attn ") && l.contains(" = "))
        .filter_map(|l| l.split(" = ").nth(1)?.split_whitespace().next())
        .collect()
}

/// Finds `prefix... VALUE` in Prometheus text.
pub fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        if let Some(d) = &self.store {
            std::fs::remove_dir_all(d).ok();
        }
    }
}

/// Reads an SSE response event by event.
pub struct SseReader {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl SseReader {
    fn new(r: reqwest::Response) -> Self {
        Self {
            stream: r.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next `data:` payload, or None at the end of the body.
    pub async fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Some(data.join("\n"));
            }
            match self.stream.next().await {
                Some(Ok(bytes)) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                _ => return None,
            }
        }
    }

    /// Reads up to the first payload that carries generated text, which comes once the
    /// prompt has been read (a chat stream opens with an empty role chunk before that).
    /// False if the body ended first.
    pub async fn first_text(&mut self) -> bool {
        while let Some(d) = self.next_data().await {
            if chunk_text(&d).is_some_and(|t| !t.is_empty()) {
                return true;
            }
        }
        false
    }

    /// Every payload up to and including `[DONE]` (or the end of the body).
    pub async fn collect(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data().await {
            let done = d == "[DONE]";
            out.push(d);
            if done {
                break;
            }
        }
        out
    }
}

/// Concatenated delta contents of a chat stream's payloads.
pub fn chat_text(payloads: &[String]) -> String {
    payloads.iter().filter_map(|p| chunk_text(p)).collect()
}

/// The text one streamed payload carries: a chat chunk's delta content or a completion
/// chunk's text; None for `[DONE]` and chunks without any.
pub fn chunk_text(payload: &str) -> Option<String> {
    let v: Value = serde_json::from_str(payload).ok()?;
    let choice = &v["choices"][0];
    choice["delta"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .map(str::to_owned)
}

/// The answer text of a non-streamed chat response.
pub fn answer(resp: &Value) -> String {
    resp["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}
