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
//! every CPU line counts; under a CPU quota without a cpuset, `/proc/stat` counts the host's
//! CPUs, and the re-read waits only for a host that is busy all over.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

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

fn read(mask: Option<&[usize]>) -> Option<Counts> {
    let (idle, total, cpus) = parse_stat(&std::fs::read_to_string("/proc/stat").ok()?, mask)?;
    let own = parse_own(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some(Counts {
        idle,
        total,
        cpus,
        own,
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

/// Readings of the machine's idle time, taken as a model waits with work nobody waits for.
#[derive(Debug)]
pub(crate) struct Spare {
    /// The cores the work decodes with.
    threads: f64,
    /// The CPUs this process may run on, read once.
    mask: Option<Vec<usize>>,
    /// Readings of the last two windows at most, oldest first.
    readings: VecDeque<(Instant, Counts)>,
}

impl Spare {
    pub(crate) fn new(threads: u32) -> Self {
        Self {
            threads: f64::from(threads.max(1)),
            mask: crate::config::cores::allowed_cpus(),
            readings: VecDeque::new(),
        }
    }

    /// Takes a reading. `None` when, over the last [`WINDOW`] or a little more, the other
    /// processes left the cores free (or the system does not say); otherwise how long to wait
    /// before asking again.
    pub(crate) fn wait(&mut self) -> Option<Duration> {
        let now = read(self.mask.as_deref())?;
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
                let need = self.threads.min(now.cpus as f64) - SLACK;
                spare_cores(self.readings[0].1, now).map(|spare| spare >= need)
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
}
