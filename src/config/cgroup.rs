//! The control groups that hold this process (Linux): where a container's or a systemd unit's
//! memory limit ([`super::memory`]) and CPU quota ([`cpu_quota`]) are set. `/proc/self/cgroup`
//! names the process's group in each hierarchy mounted under `/sys/fs/cgroup` (v2's unified
//! one, v1's one a controller), and a limit binds from that group and from every group above
//! it, up to the hierarchy's root. The files are a few numbers each, parsed here rather than
//! through a crate that reads all of `/proc` (procfs, sysinfo).

use std::path::{Component, Path, PathBuf};

/// Where the hierarchies are mounted.
pub(crate) const ROOT: &str = "/sys/fs/cgroup";

/// A group that holds this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    /// Its directory.
    pub dir: PathBuf,
    /// Whether it is in the unified hierarchy (v2) rather than a v1 controller's.
    pub v2: bool,
}

/// The groups that hold this process, under the cgroup mount `root`, given
/// `/proc/self/cgroup`'s text (`ID:CONTROLLERS:PATH` a line; v2's line has no controllers):
/// its own group and each above it, in v2 and in the v1 hierarchy of `controller` (mounted
/// at `root/controller`, a link to the shared mount where controllers are mounted together,
/// as `cpu,cpuacct` is). The hierarchies' roots are always among them, first: inside a
/// container the root is the container's group, whatever the path says.
pub(crate) fn holding(root: &Path, own: &str, controller: &str) -> Vec<Group> {
    let v1 = root.join(controller);
    let mut groups = vec![
        Group {
            dir: root.to_owned(),
            v2: true,
        },
        Group {
            dir: v1.clone(),
            v2: false,
        },
    ];
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (mount, v2) = if controllers.is_empty() {
            (root, true)
        } else if controllers.split(',').any(|c| c == controller) {
            (v1.as_path(), false)
        } else {
            continue;
        };
        // Only a path within the hierarchy: no `..` that would climb out of it.
        let relative = Path::new(path.trim_start_matches('/'));
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            continue;
        }
        let mut dir = mount.join(relative);
        while dir != mount {
            groups.push(Group {
                dir: dir.clone(),
                v2,
            });
            if !dir.pop() {
                break;
            }
        }
    }
    groups
}

/// `/proc/self/cgroup`'s text; empty where there is none.
pub(crate) fn own() -> String {
    std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default()
}

/// A CPU quota on this process (`docker --cpus`, a pod's CPU limit, systemd's `CPUQuota=`):
/// the group's processes together may run `cores` CPUs' worth of time a period, however many
/// CPUs are idle.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Quota {
    /// CPUs' worth of time a period.
    pub cores: f64,
    /// The file that counts the CPU time of every process in the group: v2's `cpu.stat`
    /// (`usage_usec`), v1's `cpuacct.usage` (nanoseconds).
    pub usage: PathBuf,
}

impl Quota {
    /// The CPU time the group's processes have taken, in nanoseconds.
    pub(crate) fn used_ns(&self) -> Option<u64> {
        parse_usage(&std::fs::read_to_string(&self.usage).ok()?)
    }
}

/// The tightest CPU quota on this process whose group's CPU time can be read too.
pub(crate) fn cpu_quota() -> Option<Quota> {
    least_quota(Path::new(ROOT), &own())
}

fn least_quota(root: &Path, own: &str) -> Option<Quota> {
    let read = |path: PathBuf| std::fs::read_to_string(path).ok();
    // v1 counts CPU time in cpuacct's hierarchy, at the same place as cpu's where the two are
    // mounted together; on their own, only where cpuacct's groups hold this process too.
    let accounting = holding(root, own, "cpuacct");
    holding(root, own, "cpu")
        .into_iter()
        .filter_map(|group| {
            let (cores, usage) = if group.v2 {
                let cores = quota_v2(&read(group.dir.join("cpu.max"))?)?;
                (cores, group.dir.join("cpu.stat"))
            } else {
                let quota = read(group.dir.join("cpu.cfs_quota_us"))?;
                let period = read(group.dir.join("cpu.cfs_period_us"))?;
                let cores = quota_v1(&quota, &period)?;
                let relative = group.dir.strip_prefix(root.join("cpu")).ok()?;
                let counted = root.join("cpuacct").join(relative);
                accounting.iter().find(|a| !a.v2 && a.dir == counted)?;
                (cores, counted.join("cpuacct.usage"))
            };
            Some(Quota { cores, usage })
        })
        .min_by(|a, b| a.cores.total_cmp(&b.cores))
}

/// v2's `cpu.max`: `QUOTA PERIOD` in microseconds, or `max PERIOD` for none.
fn quota_v2(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    quota_v1(fields.next()?, fields.next()?)
}

/// v1's `cpu.cfs_quota_us` (-1 for none) and `cpu.cfs_period_us`, as CPUs.
fn quota_v1(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.trim().parse().ok()?;
    let period: f64 = period.trim().parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// A group's CPU time in nanoseconds: v2's `cpu.stat` counts `usage_usec` on a line of its
/// own; v1's `cpuacct.usage` is one number of nanoseconds.
fn parse_usage(text: &str) -> Option<u64> {
    match text.lines().find_map(|l| l.strip_prefix("usage_usec ")) {
        Some(micros) => micros.trim().parse::<u64>().ok()?.checked_mul(1000),
        None => text.trim().parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("backstop-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        root
    }

    fn write(path: PathBuf, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn the_groups_are_the_own_and_those_above_it_in_each_hierarchy() {
        let root = Path::new("/cg");
        let own =
            "12:memory:/user/session\n3:cpu,cpuacct:/docker/abc\n0::/system.slice/b.service\n";
        let dirs = |controller| -> Vec<(String, bool)> {
            holding(root, own, controller)
                .into_iter()
                .map(|g| (g.dir.display().to_string(), g.v2))
                .collect()
        };
        let v = |d: &str, v2| (d.to_owned(), v2);
        assert_eq!(
            dirs("cpu"),
            [
                v("/cg", true),
                v("/cg/cpu", false),
                v("/cg/cpu/docker/abc", false),
                v("/cg/cpu/docker", false),
                v("/cg/system.slice/b.service", true),
                v("/cg/system.slice", true),
            ]
        );
        assert_eq!(
            dirs("memory")[2..4],
            [
                v("/cg/memory/user/session", false),
                v("/cg/memory/user", false)
            ]
        );
        // Nothing outside the hierarchy, whatever the path says.
        let climbing = holding(root, "0::/../../etc\n4:cpu:/a/../..\n", "cpu");
        assert_eq!(climbing.len(), 2, "{climbing:?}");
    }

    #[test]
    fn quotas_are_read_in_both_versions_and_the_tightest_binds() {
        assert_eq!(quota_v2("max 100000\n"), None);
        assert_eq!(quota_v2("150000 100000\n"), Some(1.5));
        assert_eq!(quota_v2("50000\n"), None);
        assert_eq!(quota_v1("-1\n", "100000\n"), None);
        assert_eq!(quota_v1("25000\n", "100000\n"), Some(0.25));
        assert_eq!(quota_v1("25000\n", "0\n"), None);
        assert_eq!(
            parse_usage("usage_usec 1234\nuser_usec 1000\n"),
            Some(1_234_000)
        );
        assert_eq!(parse_usage("987654321\n"), Some(987_654_321));
        assert_eq!(parse_usage("nr_periods 3\n"), None);

        // v2: a pod's limit of 2 CPUs above its container's of 1.5.
        let root = tree("cgroup-v2");
        let pod = root.join("kubepods/pod1");
        write(root.join("cpu.max"), "max 100000\n");
        write(pod.join("cpu.max"), "200000 100000\n");
        write(pod.join("ctr/cpu.max"), "150000 100000\n");
        write(pod.join("ctr/cpu.stat"), "usage_usec 5\n");
        let quota = least_quota(&root, "0::/kubepods/pod1/ctr\n").expect("a quota");
        assert_eq!(quota.cores, 1.5);
        assert_eq!(quota.used_ns(), Some(5_000));
        assert_eq!(least_quota(&root, "0::/\n"), None, "the root has none");
        std::fs::remove_dir_all(&root).unwrap();

        // v1 with cpu and cpuacct mounted apart: the time is counted at the quota's place in
        // cpuacct's hierarchy, where the process is held there too.
        let root = tree("cgroup-v1");
        write(root.join("cpu/cpu.cfs_quota_us"), "-1\n");
        write(root.join("cpu/cpu.cfs_period_us"), "100000\n");
        write(root.join("cpu/box/cpu.cfs_quota_us"), "100000\n");
        write(root.join("cpu/box/cpu.cfs_period_us"), "100000\n");
        write(root.join("cpuacct/box/cpuacct.usage"), "42\n");
        let quota = least_quota(&root, "3:cpuacct:/box\n2:cpu:/box\n").expect("a quota");
        assert_eq!((quota.cores, quota.used_ns()), (1.0, Some(42)));
        assert_eq!(
            least_quota(&root, "3:cpuacct:/\n2:cpu:/box\n"),
            None,
            "cpuacct holds the process elsewhere: the group's time cannot be read"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
