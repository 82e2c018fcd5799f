//! How much memory this process may use, for the prompt cache's default size: the machine's
//! (`MemTotal` in `/proc/meminfo`), or less where a memory controller says so (cgroup v2's
//! `memory.max`, v1's `memory.limit_in_bytes`): a container's, seen at the root of its
//! hierarchy, or a systemd unit's `MemoryMax=`, in the unit's own group, which
//! `/proc/self/cgroup` names (and every group above it, whose limit holds it too:
//! [`super::cgroup`]). Linux only; elsewhere unknown.

use std::path::{Path, PathBuf};

/// llama-server's `--cache-ram` default, in MiB.
const LLAMA_SERVER_CACHE_RAM_MIB: u32 = 8192;

/// The share of the process's memory the prompt cache takes at most by default.
const CACHE_SHARE: u64 = 4;

/// The prompt cache's default size in MiB: llama-server's 8 GiB, but at most a quarter of
/// the memory the process may use, so that conversations piling up on a small machine (a
/// 4 GiB board, a container limited to 2 GiB) leave the model and its KV cache room rather
/// than bring the out-of-memory killer. Unknown memory: llama-server's.
pub(crate) fn default_cache_ram_mib(memory: Option<u64>) -> u32 {
    let quarter = memory.map_or(u64::MAX, |bytes| (bytes / CACHE_SHARE) >> 20);
    u32::try_from(quarter.min(u64::from(LLAMA_SERVER_CACHE_RAM_MIB)))
        .unwrap_or(LLAMA_SERVER_CACHE_RAM_MIB)
}

/// The bytes of memory this process may use, if known.
pub(crate) fn usable() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(Path::new(path)).ok();
    let total = read("/proc/meminfo").as_deref().and_then(mem_total);
    let limit = least_limit(Path::new(super::cgroup::ROOT), &super::cgroup::own());
    match (total, limit) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// The least of the memory limits [`limit_files`] names that are set.
fn least_limit(root: &Path, own: &str) -> Option<u64> {
    limit_files(root, own)
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .filter_map(|text| cgroup_limit(&text))
        .min()
}

/// The files that may hold a memory limit on this process, under the cgroup mount `root`,
/// given `/proc/self/cgroup`'s text: the limit of each group that holds it
/// ([`super::cgroup::holding`]), in v2 (`memory.max`) and in v1's memory hierarchy
/// (`memory.limit_in_bytes`).
fn limit_files(root: &Path, own: &str) -> Vec<PathBuf> {
    super::cgroup::holding(root, own, "memory")
        .into_iter()
        .map(|group| {
            let file = if group.v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            group.dir.join(file)
        })
        .collect()
}

/// `MemTotal` of `/proc/meminfo`'s text, in bytes (the file counts kB, of 1024 bytes).
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A cgroup memory limit file's bytes; `None` for v2's `max` (no limit) or anything else
/// that is not a number. v1 writes a number near 2^63 for no limit, which the machine's own
/// total then undercuts.
fn cgroup_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_cache_takes_8_gib_or_a_quarter_of_the_memory_whichever_is_less() {
        assert_eq!(default_cache_ram_mib(None), 8192);
        assert_eq!(default_cache_ram_mib(Some(64 * GIB)), 8192);
        assert_eq!(default_cache_ram_mib(Some(32 * GIB)), 8192);
        assert_eq!(default_cache_ram_mib(Some(24 * GIB)), 6144);
        assert_eq!(default_cache_ram_mib(Some(2 * GIB)), 512);
        assert_eq!(default_cache_ram_mib(Some(1 << 20)), 0);
        assert_eq!(default_cache_ram_mib(Some(u64::MAX)), 8192);
    }

    #[test]
    fn memory_is_read_from_meminfo_and_the_cgroup_limits() {
        let meminfo = "MemTotal:       24567892 kB\nMemFree:         1234 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_567_892 * 1024));
        assert_eq!(mem_total("MemFree: 12 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(cgroup_limit("2147483648\n"), Some(2 * GIB));
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(
            cgroup_limit("9223372036854771712\n"),
            Some(9_223_372_036_854_771_712)
        );
        // A systemd unit's group, with a limit on its slice too, in v2 on a hybrid machine
        // whose v1 memory hierarchy puts the process elsewhere.
        let root = std::env::temp_dir().join(format!("backstop-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let unit = root.join("system.slice/backstop.service");
        let v1 = root.join("memory/user/session");
        std::fs::create_dir_all(&unit).unwrap();
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(unit.join("memory.max"), "max\n").unwrap();
        std::fs::write(
            root.join("system.slice/memory.max"),
            format!("{}\n", 3 * GIB),
        )
        .unwrap();
        std::fs::write(root.join("memory.max"), "max\n").unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), format!("{}\n", 5 * GIB)).unwrap();
        let own = "12:memory:/user/session\n3:cpu,cpuacct:/\n0::/system.slice/backstop.service\n";
        let limits: Vec<u64> = limit_files(&root, own)
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter_map(|t| cgroup_limit(&t))
            .collect();
        assert_eq!(limits.iter().min(), Some(&(3 * GIB)), "{limits:?}");
        assert!(limits.contains(&(5 * GIB)), "{limits:?}");
        // Nothing outside the hierarchy is read, whatever the path says.
        let files = limit_files(&root, "0::/../../etc\n");
        assert!(files.iter().all(|f| f.starts_with(&root)), "{files:?}");
        std::fs::remove_dir_all(&root).unwrap();
        // This machine's, whatever it is: Linux has a /proc/meminfo.
        let here = usable().expect("the memory of a Linux machine");
        assert!(here > 64 << 20, "{here}");
    }
}
