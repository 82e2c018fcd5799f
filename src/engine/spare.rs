//! Whether the rest of the machine leaves free the cores that work nobody waits for would take
//! (Linux; elsewhere it is taken to).
//!
//! Reading an answer again while idle ([`super::worker`]) waits until no model in this process
//! has decoded for a while, but another process may be using the cores meanwhile: another
//! inference server, a build, a benchmark's peer. llama.cpp's threads spin between operations
//! instead of sleeping, as any OpenMP program's do, and two teams spinning on the same cores
//! stall each other at every barrier. On the project's 2-core machine (SmolLM2, 2 threads) a
//! llama-server stream that began just after backstop answered ran at 3 to 15 tokens a second
//! instead of 84, with gaps of 2.5 s between tokens, while backstop read its answer again. So
//! the re-read also waits until, over the last [`WINDOW`], the other processes on the machine
//! left idle at least the cores it decodes with ([`Spare::wait`]).
//!
//! The kernel's counts in `/proc/stat` say how long the CPUs spent idle, in clock ticks (10 ms);
//! this process's own time (`/proc/self/stat`, in the same ticks) counts as free, since it is
//! this process's to give. Idle, this project's VM shows every tick of a 100 ms window idle.
//! Only the CPUs this process may run on count (its CPU mask: `taskset`, a container's
//! cpuset): a neighbour busy on those stalls the work however idle the rest of the host is,
//! and one busy elsewhere does not. Held to CPU 0 of the 2-core machine, with another program
//! busy on CPU 0 alone, the whole machine's count showed a free core and the re-read went on.
//! The files are parsed here: a crate that reads all of `/proc` (procfs, sysinfo) is far more
//! than a few lines of numbers need. Where `/proc/stat` names none of the mask's CPUs (a
//! container whose `/proc/stat` is rewritten to number its own CPUs from 0, as LXCFS does),
//! every CPU line counts.
//!
//! Under a CPU quota (`docker --cpus`, a pod's CPU limit, systemd's `CPUQuota=`), the
//! processes of the quota's group share its time however idle the CPUs are: another program
//! in the container may take the whole quota while `/proc/stat` shows a CPU free, and the
//! re-read then halves what both get. So where a quota binds ([`cgroup::cpu_quota`]) the
//! group's own count of CPU time is read too, and what the other processes of the group
//! took of the quota must leave the work's threads free as well. Held to a quota of one CPU
//! on the 2-core machine, with a program in the same group busy on one CPU, `/proc/stat`
//! showed the other CPU free and the re-read went on.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::cgroup::{self, Quota};

/// How far back the machine's idle time is read: ten ticks on each CPU, so that another
/// process that has run for the last tenth of it shows.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);

/// How long to wait before asking again while the machine is busy.
const RECHECK: Duration = Duration::from_millis(50);

/// The cores the other processes may take of those the work needs: what the kernel and a
/// light program (a monitoring agent, a shell) take now and then, which the scheduler serves
/// at once whatever else runs. A program that decodes, builds or otherwise computes keeps at
/// least one core busy for the whole window.
const SLACK: f64 = 0.5;

/// The kernel's counts at one moment, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Every CPU's idle time (waiting for I/O, and stolen by the hypervisor, included).
    idle: u64,
    /// Every CPU's time.
    total: u64,
    /// How many CPUs there are.
    cpus: u64,
    /// This process's time, user and system.
    own: u64,
    /// Under a CPU quota, the CPU time of every process of the quota's group and this
    /// process's, in nanoseconds.
    group: Option<(u64, u64)>,
}

/// The idle and total ticks of the CPUs in `mask` (every CPU without one, or where none of
/// its CPUs has a line), and how many CPUs they are, from `/proc/stat`.
fn parse_stat(text: &str, mask: Option<&[usize]>) -> Option<(u64, u64, u64)> {
    let mut lines = text.lines();
    let all = ticks(lines.next()?.strip_prefix("cpu ")?)?;
    let per_cpu: Vec<(usize, (u64, u64))> = lines
        .filter_map(|l| {
            let (n, rest) = l.strip_prefix("cpu")?.split_once(' ')?;
            Some((n.parse().ok()?, ticks(rest)?))
        })
        .collect();
    let masked: Vec<(u64, u64)> = per_cpu
        .iter()
        .filter(|(n, _)| mask.is_some_and(|m| m.contains(n)))
        .map(|&(_, t)| t)
        .collect();
    if masked.is_empty() {
        let cpus = per_cpu.len() as u64;
        (cpus > 0).then_some((all.0, all.1, cpus))
    } else {
        let (idle, total) = masked
            .iter()
            .fold((0, 0), |(i, t), &(idle, total)| (i + idle, t + total));
        Some((idle, total, masked.len() as u64))
    }
}

/// The idle and total ticks of one line of `/proc/stat`, after its `cpu` or `cpuN` label.
fn ticks(fields: &str) -> Option<(u64, u64)> {
    // user nice system idle iowait irq softirq steal guest guest_nice; the guests are
    // counted in user and nice already. Time stolen by the hypervisor for other machines
    // counts as free: the work would take it from no process here.
    let ticks: Vec<u64> = fields
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let idle = ticks.get(3)? + ticks.get(4)? + ticks.get(7).unwrap_or(&0);
    Some((idle, ticks.iter().sum()))
}

/// This process's user and system ticks, from `/proc/self/stat`: the 14th and 15th fields,
/// counted after the command name in parentheses, which may hold spaces and parentheses.
fn parse_own(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// This process's CPU time in nanoseconds, every thread's (`CLOCK_PROCESS_CPUTIME_ID`).
fn own_cpu_ns() -> Option<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is valid for writes; the clock is one every Linux process has.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u64::try_from(now.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

fn read(mask: Option<&[usize]>, quota: Option<&Quota>) -> Option<Counts> {
    let (idle, total, cpus) = parse_stat(&std::fs::read_to_string("/proc/stat").ok()?, mask)?;
    let own = parse_own(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let group = quota.and_then(|q| Some((q.used_ns()?, own_cpu_ns()?)));
    Some(Counts {
        idle,
        total,
        cpus,
        own,
        group,
    })
}

/// The cores the other processes left free between two readings: the CPUs' idle time and this
/// process's own (all of it spent on those CPUs), over the time that passed on each CPU.
/// `None` if no tick passed.
fn spare_cores(before: Counts, after: Counts) -> Option<f64> {
    let total = after.total.checked_sub(before.total).filter(|&t| t > 0)?;
    let free = after.idle.saturating_sub(before.idle) + after.own.saturating_sub(before.own);
    let per_cpu = total as f64 / after.cpus as f64;
    Some((free as f64 / per_cpu).min(after.cpus as f64))
}

/// The CPUs' worth of a quota of `cores` the group's other processes left over `elapsed`
/// between two readings; `None` where either reading lacks the group's time.
fn spare_quota(cores: f64, before: Counts, after: Counts, elapsed: Duration) -> Option<f64> {
    let ((used_before, own_before), (used_after, own_after)) = (before.group?, after.group?);
    let others = used_after
        .saturating_sub(used_before)
        .saturating_sub(own_after.saturating_sub(own_before));
    let elapsed = elapsed.as_nanos() as f64;
    (elapsed > 0.0).then(|| (cores - others as f64 / elapsed).max(0.0))
}

/// Readings of the machine's idle time, taken as a model waits with work nobody waits for.
#[derive(Debug)]
pub(crate) struct Spare {
    /// The cores the work decodes with.
    threads: f64,
    /// The CPUs this process may run on, read once.
    mask: Option<Vec<usize>>,
    /// The CPU quota on this process, read once.
    quota: Option<Quota>,
    /// Readings of the last two windows at most, oldest first.
    readings: VecDeque<(Instant, Counts)>,
}

impl Spare {
    pub(crate) fn new(threads: u32) -> Self {
        Self {
            threads: f64::from(threads.max(1)),
            mask: crate::config::cores::allowed_cpus(),
            quota: cgroup::cpu_quota(),
            readings: VecDeque::new(),
        }
    }

    /// Takes a reading. `None` when, over the last [`WINDOW`] or a little more, the other
    /// processes left the cores free (or the system does not say); otherwise how long to wait
    /// before asking again.
    pub(crate) fn wait(&mut self) -> Option<Duration> {
        let now = read(self.mask.as_deref(), self.quota.as_ref())?;
        self.verdict(Instant::now(), now)
    }

    fn verdict(&mut self, at: Instant, now: Counts) -> Option<Duration> {
        // The newest reading a whole window old; one older than two windows says too little
        // of the last one.
        let base = self
            .readings
            .iter()
            .rposition(|&(t, _)| at.saturating_duration_since(t) >= WINDOW);
        let verdict = match base {
            Some(k) if at.saturating_duration_since(self.readings[k].0) <= 2 * WINDOW => {
                self.readings.drain(..k);
                let (then, before) = self.readings[0];
                let cores = self.quota.as_ref().map_or(f64::INFINITY, |q| q.cores);
                let work = self.threads.min(now.cpus as f64).min(cores);
                // A quota under one CPU leaves less than SLACK to take from.
                let need = work - SLACK.min(work / 2.0);
                let in_quota = self.quota.as_ref().and_then(|q| {
                    spare_quota(q.cores, before, now, at.saturating_duration_since(then))
                });
                spare_cores(before, now)
                    .map(|spare| spare.min(in_quota.unwrap_or(f64::INFINITY)) >= need)
            }
            Some(_) => {
                self.readings.clear();
                None
            }
            None => None,
        };
        let wait = match verdict {
            Some(true) => None,
            Some(false) => Some(RECHECK),
            // Until the oldest reading (or this one) is a window old.
            None => Some(
                self.readings
                    .front()
                    .map_or(WINDOW, |&(t, _)| {
                        WINDOW.saturating_sub(at.saturating_duration_since(t))
                    })
                    .max(Duration::from_millis(1)),
            ),
        };
        self.readings.push_back((at, now));
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  10132153 290696 3084719 46828483 16683 0 25195 812 175628 0\n\
                        cpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0\n\
                        cpu1 1335992 30233 501519 13369745 3536 0 2384 0 24028 0\n\
                        intr 1462898 27 0 0\n\
                        ctxt 3070393\n";

    #[test]
    fn the_stat_line_gives_idle_and_total_ticks_and_the_cpu_lines_their_count() {
        let (idle, total, cpus) = parse_stat(STAT, None).expect("parsed");
        assert_eq!(
            idle,
            46828483 + 16683 + 812,
            "idle, waiting for I/O, stolen"
        );
        assert_eq!(
            total,
            10132153 + 290696 + 3084719 + 46828483 + 16683 + 25195 + 812,
            "guest time is in user time already"
        );
        assert_eq!(cpus, 2);
        assert_eq!(parse_stat("intr 1 2\n", None), None);
        assert_eq!(
            parse_stat("cpu  1 2 3\ncpu0 1 2 3\n", None),
            None,
            "too few fields"
        );
        assert_eq!(
            parse_stat("cpu  1 2 3 4 5 6 7 8\n", None),
            None,
            "no CPU lines"
        );
    }

    #[test]
    fn only_the_cpus_the_process_may_run_on_count() {
        assert_eq!(
            parse_stat(STAT, Some(&[1])),
            Some((
                13369745 + 3536,
                1335992 + 30233 + 501519 + 13369745 + 3536 + 2384,
                1
            ))
        );
        // A mask of CPUs that /proc/stat does not name (renumbered in a container): all.
        assert_eq!(parse_stat(STAT, Some(&[4, 5])), parse_stat(STAT, None));
    }

    #[test]
    fn the_own_ticks_are_read_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 123 0 0 0 700 35 0 0 20 0 9 0";
        assert_eq!(parse_own(stat), Some(735));
        assert_eq!(parse_own("4242 (x) S 1 2"), None);
    }

    fn counts(idle: u64, total: u64, own: u64) -> Counts {
        Counts {
            idle,
            total,
            cpus: 2,
            own,
            group: None,
        }
    }

    #[test]
    fn what_is_idle_or_this_process_own_counts_as_spare() {
        // 100 ms on 2 CPUs: 20 ticks.
        let before = counts(0, 0, 0);
        assert_eq!(spare_cores(before, counts(20, 20, 0)), Some(2.0));
        assert_eq!(
            spare_cores(before, counts(0, 20, 20)),
            Some(2.0),
            "all ours"
        );
        assert_eq!(spare_cores(before, counts(10, 20, 0)), Some(1.0));
        assert_eq!(spare_cores(before, counts(0, 20, 0)), Some(0.0));
        assert_eq!(spare_cores(before, before), None, "no tick passed");
    }

    #[test]
    fn the_work_waits_while_others_use_the_cores_it_needs_and_goes_once_they_are_free() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut spare = Spare::new(2);
        // The first reading: nothing to compare with, ask again a window later.
        assert_eq!(spare.verdict(t0, counts(0, 0, 0)), Some(WINDOW));
        assert_eq!(
            spare.verdict(ms(40), counts(8, 8, 0)),
            Some(Duration::from_millis(60))
        );
        // A window after the first: all idle.
        assert_eq!(spare.verdict(ms(100), counts(20, 20, 0)), None);
        // Another process took one core for the last window: 2 threads need both.
        assert_eq!(spare.verdict(ms(200), counts(30, 40, 0)), Some(RECHECK));
        // One thread needs only one.
        let mut one = Spare::new(1);
        one.verdict(t0, counts(0, 0, 0));
        assert_eq!(one.verdict(ms(100), counts(10, 20, 0)), None);
        // This process's own decodes count as free.
        assert_eq!(spare.verdict(ms(300), counts(30, 60, 20)), None);
        // A light program's 0.4 of a core (4 of 20 ticks) passes; a busy single-threaded
        // program's whole core does not.
        assert_eq!(spare.verdict(ms(400), counts(45, 80, 21)), None);
        assert_eq!(spare.verdict(ms(500), counts(55, 100, 21)), Some(RECHECK));
        // A reading from long ago says too little about the last window: start again.
        assert_eq!(
            spare.verdict(ms(5_000), counts(900, 1_000, 21)),
            Some(WINDOW)
        );
        assert_eq!(spare.verdict(ms(5_100), counts(920, 1_020, 21)), None);
        // More threads than CPUs: every CPU free is enough.
        let mut many = Spare::new(8);
        many.verdict(t0, counts(0, 0, 0));
        assert_eq!(many.verdict(ms(100), counts(20, 20, 0)), None);
    }

    #[test]
    fn under_a_quota_the_work_waits_while_others_in_its_group_take_the_quota() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // Both CPUs idle by /proc/stat throughout; the group's time and this process's, in ns.
        let at = |n: u64, used: u64, own: u64| Counts {
            group: Some((used, own)),
            ..counts(2 * n / 10, 2 * n / 10, 0)
        };
        let quota = |cores| Quota {
            cores,
            usage: "/nowhere".into(),
        };
        let mut spare = Spare::new(2);
        spare.quota = Some(quota(1.0));
        spare.verdict(t0, at(0, 0, 0));
        // Another process of the group took the whole quota of one CPU for the window.
        assert_eq!(
            spare.verdict(ms(100), at(100, 100_000_000, 0)),
            Some(RECHECK)
        );
        // Then 0.3 of a CPU: enough for the one CPU's worth the two threads may have.
        assert_eq!(spare.verdict(ms(200), at(200, 130_000_000, 0)), None);
        // This process's own time counts as free.
        assert_eq!(
            spare.verdict(ms(300), at(300, 230_000_000, 100_000_000)),
            None
        );
        // Without the group's time, /proc/stat alone decides.
        assert_eq!(spare.verdict(ms(400), counts(80, 80, 0)), None);
        // A quota of half a CPU: others' tenth of a CPU passes, their half does not.
        let mut half = Spare::new(1);
        half.quota = Some(quota(0.5));
        half.verdict(t0, at(0, 0, 0));
        assert_eq!(half.verdict(ms(100), at(100, 10_000_000, 0)), None);
        assert_eq!(half.verdict(ms(200), at(200, 60_000_000, 0)), Some(RECHECK));
        assert_eq!(
            spare_quota(1.0, at(0, 0, 0), at(100, 300_000_000, 0), WINDOW),
            Some(0.0),
            "more than the quota (a late count) leaves nothing, not less"
        );
    }
}
