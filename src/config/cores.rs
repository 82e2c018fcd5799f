//! How many cores this process may compute on: what `--threads` defaults to, and what a
//! benchmark's machine line says.
//!
//! A machine's core count is not what a process confined to part of it may use: `taskset`, a
//! container's cpuset (`docker --cpuset-cpus`, Kubernetes' static CPU manager) or a CPU quota
//! (`docker --cpus`, a pod's CPU limit, systemd's `CPUQuota`). llama.cpp's threads spin at
//! every barrier, so more threads than the cores they may run on lose to fewer: on the 2-core
//! machine, held to one CPU by `taskset -c 0` or by a cgroup quota of one CPU, SmolLM2
//! generated 50 tokens a second with 2 threads against 59 with 1, and read prompts 12% slower
//! under the quota. On a large host with a small quota, every thread past the quota spins
//! away time the quota then takes from the others.
//!
//! Counted here: the physical cores among the CPUs this thread may run on (each core once,
//! however many hardware threads it has, as llama.cpp's own default counts), only the fast
//! ones on a CPU of two kinds (as llama.cpp leaves out Intel's E-cores), and no more than the
//! standard library's [`std::thread::available_parallelism`], which reads the CPU mask and
//! the cgroup quota. Each CPU's core and speed class are read from sysfs, a short file each:
//! num_cpus counts every core of the machine, core_affinity lists CPUs without their cores,
//! and hwloc would bring a C library for a few small files.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

/// The cores and hardware threads this process may compute on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cores {
    /// Physical cores (each counted once whatever its hardware threads).
    pub physical: usize,
    /// Logical processors: hardware threads, within the CPU quota.
    pub logical: usize,
}

/// The cores the calling thread (and the threads it starts) may compute on.
pub fn usable() -> Cores {
    let logical = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let physical = physical_in_mask().unwrap_or_else(num_cpus::get_physical);
    Cores {
        physical: physical.clamp(1, logical),
        logical,
    }
}

/// What to say when `threads` are more than the hardware threads this process may use
/// ([`usable`]): those beyond them wait for a CPU while the others spin at each barrier (on
/// the 2-core machine held to one CPU, 2 threads generated 16% slower than 1).
pub fn too_many(threads: u32) -> Option<String> {
    crowded(threads, usable())
}

fn crowded(threads: u32, cores: Cores) -> Option<String> {
    let cpus = cores.logical;
    (threads as usize > cpus).then(|| {
        let (plural, fits) = if cpus == 1 { ("", "it") } else { ("s", "them") };
        format!(
            "{threads} threads on the {cpus} CPU{plural} this process may use: threads beyond \
             {fits} wait their turn while the others spin; {}, the default, is faster",
            cores.physical
        )
    })
}

/// The physical cores among the CPUs the calling thread may run on, where the kernel says
/// which core each CPU is (Linux); `None` elsewhere or when it cannot be read.
fn physical_in_mask() -> Option<usize> {
    fast_cores(Path::new("/sys"), &allowed_cpus()?)
}

/// The CPUs the calling thread (and the threads it starts) may run on, by the kernel's
/// numbers (Linux); `None` elsewhere or when the mask cannot be read.
#[cfg(target_os = "linux")]
pub fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid for writes of the size given; pid 0 names the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return None;
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's size in bits.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    Some(cpus)
}

#[cfg(not(target_os = "linux"))]
pub fn allowed_cpus() -> Option<Vec<usize>> {
    None
}

/// The physical cores of `cpus` built for speed, given the sysfs mount `sys`: on a CPU of two
/// kinds (Intel's P- and E-cores from Alder Lake on, ARM's big.LITTLE) the fast ones alone,
/// as llama.cpp counts on Intel's ([`slow_cpus`]). A thread on a slow core finishes its share of every
/// operation last while the others spin at the barrier after it. Where the mask holds slow
/// cores only, those are counted.
fn fast_cores(sys: &Path, cpus: &[usize]) -> Option<usize> {
    let slow = slow_cpus(sys, cpus);
    let fast: Vec<usize> = cpus.iter().copied().filter(|c| !slow.contains(c)).collect();
    let counted = if fast.is_empty() { cpus } else { &fast };
    count_cores(counted.iter().copied(), |cpu| {
        let topology = sys.join(format!("devices/system/cpu/cpu{cpu}/topology"));
        // `core_cpus_list` since Linux 5.4; `thread_siblings_list`, the same list, before.
        ["core_cpus_list", "thread_siblings_list"]
            .iter()
            .find_map(|file| std::fs::read_to_string(topology.join(file)).ok())
    })
}

/// Which of `cpus` the kernel says compute far slower than the fastest of them: those with a
/// `cpu_capacity` under half the largest (ARM's little cores, about 40% of its big ones; the
/// middle tier of a chip of three, at 70-90% of its one prime core, stays in), and those
/// listed under Intel's E-core performance counters (`devices/cpu_atom/cpus`, there on a
/// hybrid Intel CPU whatever the kernel's age).
fn slow_cpus(sys: &Path, cpus: &[usize]) -> HashSet<usize> {
    let read = |path: PathBuf| std::fs::read_to_string(path).ok();
    let mut slow: HashSet<usize> = read(sys.join("devices/cpu_atom/cpus"))
        .and_then(|list| parse_cpu_list(&list))
        .unwrap_or_default()
        .into_iter()
        .collect();
    let capacity: Vec<(usize, u64)> = cpus
        .iter()
        .filter_map(|&cpu| {
            let file = sys.join(format!("devices/system/cpu/cpu{cpu}/cpu_capacity"));
            Some((cpu, read(file)?.trim().parse().ok()?))
        })
        .collect();
    if let Some(most) = capacity.iter().map(|&(_, c)| c).max() {
        slow.extend(
            capacity
                .iter()
                .filter(|&&(_, c)| c.saturating_mul(2) < most)
                .map(|&(cpu, _)| cpu),
        );
    }
    slow
}

/// A kernel CPU list (`0-3,8,10-11`); `None` if it is not one.
fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (usize, usize) = (first.parse().ok()?, last.parse().ok()?);
                if last < first || last - first >= 1 << 16 {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// How many cores `cpus` are on, given each CPU's core as the list of CPUs that share it
/// (the same text for every CPU of one core); `None` if any CPU's core is unknown or there
/// are no CPUs.
fn count_cores(
    cpus: impl Iterator<Item = usize>,
    core_of: impl Fn(usize) -> Option<String>,
) -> Option<usize> {
    let mut cores = HashSet::new();
    for cpu in cpus {
        cores.insert(core_of(cpu)?.trim().to_owned());
    }
    (!cores.is_empty()).then_some(cores.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_threads_of_one_core_count_once() {
        // Two cores with two hardware threads each (CPUs 0 and 2 share one, 1 and 3 the other).
        let core = |cpu: usize| {
            Some(
                if cpu.is_multiple_of(2) {
                    "0,2\n"
                } else {
                    "1,3\n"
                }
                .to_owned(),
            )
        };
        assert_eq!(count_cores(0..4, core), Some(2));
        assert_eq!(count_cores([0, 2].into_iter(), core), Some(1));
        assert_eq!(count_cores([2, 3].into_iter(), core), Some(2));
        assert_eq!(count_cores(std::iter::empty(), core), None);
        // One CPU whose core cannot be read: no count, rather than a short one.
        let unknown = |cpu: usize| (cpu != 3).then(|| format!("{cpu}"));
        assert_eq!(count_cores(0..4, unknown), None);
    }

    #[test]
    fn more_threads_than_cpus_are_named_and_the_faster_count_given() {
        let two = Cores {
            physical: 2,
            logical: 4,
        };
        assert_eq!(crowded(4, two), None);
        assert_eq!(
            crowded(8, two).as_deref(),
            Some(
                "8 threads on the 4 CPUs this process may use: threads beyond them wait their \
                 turn while the others spin; 2, the default, is faster"
            )
        );
        let one = Cores {
            physical: 1,
            logical: 1,
        };
        assert!(
            crowded(2, one).is_some_and(|m| m.starts_with("2 threads on the 1 CPU this")),
            "{:?}",
            crowded(2, one)
        );
    }

    #[test]
    fn cpu_lists_read_as_the_kernel_writes_them() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("\n"), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a-b"), None);
        assert_eq!(parse_cpu_list("0-99999999"), None);
    }

    /// A fake sysfs under a temporary folder: `cores` lists each core's CPUs; `capacity`
    /// gives each CPU's `cpu_capacity` where it has one; `atom`, Intel's E-core list.
    fn sysfs(name: &str, cores: &[&[usize]], capacity: &[u64], atom: Option<&str>) -> PathBuf {
        let sys =
            std::env::temp_dir().join(format!("backstop-sysfs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sys);
        for core in cores {
            let list = core
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",");
            for &cpu in *core {
                let dir = sys.join(format!("devices/system/cpu/cpu{cpu}"));
                std::fs::create_dir_all(dir.join("topology")).unwrap();
                std::fs::write(dir.join("topology/core_cpus_list"), format!("{list}\n")).unwrap();
                if let Some(c) = capacity.get(cpu) {
                    std::fs::write(dir.join("cpu_capacity"), format!("{c}\n")).unwrap();
                }
            }
        }
        if let Some(atom) = atom {
            std::fs::create_dir_all(sys.join("devices/cpu_atom")).unwrap();
            std::fs::write(sys.join("devices/cpu_atom/cpus"), atom).unwrap();
        }
        sys
    }

    #[test]
    fn on_a_cpu_of_two_kinds_only_the_fast_cores_count() {
        // An Intel hybrid on an older kernel: 2 P-cores with two threads each (CPUs 0-3),
        // 4 E-cores (CPUs 4-7), told apart by the E-cores' performance counters.
        let p_and_e: Vec<&[usize]> = vec![&[0, 1], &[2, 3], &[4], &[5], &[6], &[7]];
        let sys = sysfs("atom", &p_and_e, &[], Some("4-7\n"));
        let all: Vec<usize> = (0..8).collect();
        assert_eq!(fast_cores(&sys, &all), Some(2));
        // Held to E-cores alone, those are what it has.
        assert_eq!(fast_cores(&sys, &[5, 6, 7]), Some(3));
        assert_eq!(fast_cores(&sys, &[1, 2, 7]), Some(2));
        std::fs::remove_dir_all(&sys).unwrap();
        // ARM big.LITTLE (or a recent kernel on x86): 4 big cores at 1024, 4 little at 446.
        let big_little: Vec<&[usize]> = (0..8).map(|c| &[0, 1, 2, 3, 4, 5, 6, 7][c..=c]).collect();
        let sys = sysfs(
            "capacity",
            &big_little,
            &[446, 446, 446, 446, 1024, 1024, 1024, 1024],
            None,
        );
        assert_eq!(fast_cores(&sys, &all), Some(4));
        assert_eq!(fast_cores(&sys, &[0, 1, 2]), Some(3));
        std::fs::remove_dir_all(&sys).unwrap();
        // Three tiers: one prime core, three big ones near it, four little ones.
        let tiers = [1024, 870, 870, 870, 400, 400, 400, 400];
        let sys = sysfs("tiers", &big_little, &tiers, None);
        assert_eq!(fast_cores(&sys, &all), Some(4));
        std::fs::remove_dir_all(&sys).unwrap();
        // One kind of core, all at the same capacity: every core counts once.
        let sys = sysfs(
            "alike",
            &[&[0, 4], &[1, 5], &[2, 6], &[3, 7]],
            &[1024; 8],
            None,
        );
        assert_eq!(fast_cores(&sys, &all), Some(4));
        std::fs::remove_dir_all(&sys).unwrap();
    }

    /// A thread held to one CPU, as `taskset -c 0` holds a process, may use one core whatever
    /// the machine has, and so do the threads it starts.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_held_to_one_cpu_counts_one_core() {
        let all = usable();
        assert!(all.physical >= 1 && all.physical <= all.logical, "{all:?}");
        std::thread::spawn(|| {
            // SAFETY: an empty set is all zeroes; CPU 0 is below CPU_SETSIZE; pid 0 is this
            // thread, and the set outlives the call.
            let rc = unsafe {
                let mut one: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut one);
                libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one)
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            let one = Cores {
                physical: 1,
                logical: 1,
            };
            assert_eq!(usable(), one);
            assert_eq!(super::super::default_threads(), 1);
            let child = std::thread::spawn(usable).join().expect("child thread");
            assert_eq!(child, one);
        })
        .join()
        .expect("test thread");
    }
}
