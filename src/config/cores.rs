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
//! however many hardware threads it has, as llama.cpp's own default counts), and no more than
//! the standard library's [`std::thread::available_parallelism`], which reads the CPU mask and
//! the cgroup quota. The core of each CPU is read from sysfs, a line per CPU: num_cpus counts
//! every core of the machine and core_affinity lists CPUs without their cores, and hwloc
//! would bring a C library for two small files.

use std::num::NonZeroUsize;

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

/// The physical cores among the CPUs the calling thread may run on, where the kernel says
/// which core each CPU is (Linux); `None` elsewhere or when it cannot be read.
#[cfg(target_os = "linux")]
fn physical_in_mask() -> Option<usize> {
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid for writes of the size given; pid 0 names the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return None;
    }
    let cpus = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's size in bits.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) });
    count_cores(cpus, |cpu| {
        let topology = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        // `core_cpus_list` since Linux 5.4; `thread_siblings_list`, the same list, before.
        ["core_cpus_list", "thread_siblings_list"]
            .iter()
            .find_map(|file| std::fs::read_to_string(format!("{topology}/{file}")).ok())
    })
}

#[cfg(not(target_os = "linux"))]
fn physical_in_mask() -> Option<usize> {
    None
}

/// How many cores `cpus` are on, given each CPU's core as the list of CPUs that share it
/// (the same text for every CPU of one core); `None` if any CPU's core is unknown or there
/// are no CPUs.
fn count_cores(
    cpus: impl Iterator<Item = usize>,
    core_of: impl Fn(usize) -> Option<String>,
) -> Option<usize> {
    let mut cores = std::collections::HashSet::new();
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
