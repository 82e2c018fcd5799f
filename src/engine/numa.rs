//! Where llama.cpp's compute threads run on a machine of several NUMA nodes (`--numa`, as
//! llama-server's flag), chosen once per process before llama.cpp starts.
//!
//! On a server of two or more sockets each socket reaches its own memory faster than the
//! others'. Generation reads every weight once a token, so where the threads run against
//! where the model's pages lie sets its speed. llama.cpp's placements: `distribute` spreads
//! the threads over every node, `isolate` keeps them on the node the process started on, and
//! `numactl` keeps them on the CPUs `numactl` gave the process. With any of them llama.cpp
//! maps the model without reading it ahead, so each page lands on the node of the thread that
//! first touches it. Pages already in the page cache stay where they are: llama.cpp's advice
//! is to drop the page cache once (`echo 3 > /proc/sys/vm/drop_caches`) before the first run
//! with a placement. On one node there is nothing to place, and llama.cpp changes nothing.

use std::sync::OnceLock;

use llama_cpp_2::llama_backend::NumaStrategy;

/// A placement of llama.cpp's threads over NUMA nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Numa {
    /// Wherever the kernel schedules them (llama.cpp's default).
    #[default]
    Off,
    /// Spread over every node.
    Distribute,
    /// On the node the process started on.
    Isolate,
    /// On the CPUs `numactl` gave the process.
    Numactl,
}

impl Numa {
    /// `off`, `distribute`, `isolate` or `numactl`, as `--numa` takes them.
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "off" | "none" | "" => Some(Self::Off),
            "distribute" => Some(Self::Distribute),
            "isolate" => Some(Self::Isolate),
            "numactl" => Some(Self::Numactl),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Distribute => "distribute",
            Self::Isolate => "isolate",
            Self::Numactl => "numactl",
        }
    }

    /// llama.cpp's strategy; `None` for no placement.
    pub(crate) fn strategy(self) -> Option<NumaStrategy> {
        match self {
            Self::Off => None,
            Self::Distribute => Some(NumaStrategy::DISTRIBUTE),
            Self::Isolate => Some(NumaStrategy::ISOLATE),
            Self::Numactl => Some(NumaStrategy::NUMACTL),
        }
    }
}

static CHOSEN: OnceLock<Numa> = OnceLock::new();

/// Sets the placement for this process; before llama.cpp starts (the first model's load),
/// and once: a later choice is ignored, as llama.cpp places its threads once.
pub fn choose(numa: Numa) {
    // Set already: the first choice stays, as llama.cpp's does.
    let _ = CHOSEN.set(numa);
}

/// The placement chosen, `Off` if none was.
pub(crate) fn chosen() -> Numa {
    CHOSEN.get().copied().unwrap_or_default()
}

/// What to say when a placement was asked for where it changes nothing: a machine of one
/// node (or none listed, as in some containers), given the sysfs mount `sys`.
pub(crate) fn idle_note(numa: Numa, sys: &std::path::Path) -> Option<String> {
    if numa == Numa::Off {
        return None;
    }
    let nodes = (0..)
        .take_while(|n| sys.join(format!("devices/system/node/node{n}")).exists())
        .count();
    (nodes < 2).then(|| {
        let listed = match nodes {
            0 => "lists no NUMA node",
            _ => "has one NUMA node",
        };
        format!(
            "--numa {}: this machine {listed}, so the threads stay where the kernel puts them",
            numa.as_str()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_read_as_llama_server_names_them() {
        for numa in [Numa::Off, Numa::Distribute, Numa::Isolate, Numa::Numactl] {
            assert_eq!(Numa::parse(numa.as_str()), Some(numa));
        }
        assert_eq!(Numa::parse("Distribute"), Some(Numa::Distribute));
        assert_eq!(Numa::parse("mirror"), None);
        assert_eq!(Numa::Off.strategy(), None);
        assert_eq!(Numa::Distribute.strategy(), Some(NumaStrategy::DISTRIBUTE));
    }

    #[test]
    fn a_placement_on_one_node_is_said_to_change_nothing() {
        let sys = std::env::temp_dir().join(format!("backstop-numa-{}", std::process::id()));
        let node = |n: usize| sys.join(format!("devices/system/node/node{n}"));
        std::fs::create_dir_all(&sys).unwrap();
        let note = |numa| idle_note(numa, &sys);
        assert_eq!(
            note(Numa::Isolate).as_deref(),
            Some(
                "--numa isolate: this machine lists no NUMA node, so the threads stay where the \
                 kernel puts them"
            )
        );
        std::fs::create_dir_all(node(0)).unwrap();
        assert!(note(Numa::Distribute)
            .unwrap()
            .contains("has one NUMA node"));
        assert_eq!(note(Numa::Off), None, "nothing asked");
        std::fs::create_dir_all(node(1)).unwrap();
        assert_eq!(note(Numa::Distribute), None, "two nodes");
        std::fs::remove_dir_all(&sys).unwrap();
    }
}
