//! The prompt cache in host memory (`--cache-ram`): when a slot's KV cache is about to be
//! given to another conversation, its rows are copied out of llama.cpp into RAM, and a later
//! request that continues that conversation has them copied back instead of reading its
//! history again. With more conversations than slots (a team sharing one server, an agent
//! running several threads) each one's next turn then starts from its own cache, as with a
//! slot of its own. llama.cpp's server keeps such a cache too (`--cache-ram`, 8 GiB by
//! default); this one is written for the worker's slots, whose reuse rules (exact reuse, the
//! sliding window) the restored rows must keep.
//!
//! This module holds the bookkeeping only (what is kept, its size, which goes first), so it
//! is tested without a model; the worker copies the rows.

/// Kept caches, the oldest dropped first once they would take more than `limit` bytes.
pub(crate) struct Stash<E> {
    limit: usize,
    used: usize,
    kept: Vec<Kept<E>>,
    clock: u64,
}

struct Kept<E> {
    entry: E,
    bytes: usize,
    /// When it was kept: lower is older.
    stamp: u64,
}

/// What [`Stash::keep`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Whether the entry was kept: not when it alone is larger than the limit.
    pub(crate) kept: bool,
    /// Older entries dropped to make room (those it covers included).
    pub(crate) dropped: usize,
}

impl<E> Stash<E> {
    /// An empty stash that holds at most `limit` bytes (0: it keeps nothing).
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            used: 0,
            kept: Vec::new(),
            clock: 0,
        }
    }

    /// Whether it keeps anything at all.
    pub(crate) fn enabled(&self) -> bool {
        self.limit > 0
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Bytes its entries take.
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// Whether an entry of `bytes` bytes could be kept.
    pub(crate) fn fits(&self, bytes: usize) -> bool {
        bytes <= self.limit
    }

    /// The entries, by index.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &E> {
        self.kept.iter().map(|k| &k.entry)
    }

    /// Keeps `entry`, which takes `bytes`: first the entries it holds all of (`covers(entry,
    /// old)`: an earlier save of the same conversation) are dropped, then the oldest until it
    /// fits. Nothing is dropped when it alone is larger than the limit.
    pub(crate) fn keep(
        &mut self,
        entry: E,
        bytes: usize,
        covers: impl Fn(&E, &E) -> bool,
    ) -> Outcome {
        if !self.fits(bytes) {
            return Outcome {
                kept: false,
                dropped: 0,
            };
        }
        let before = self.kept.len();
        self.kept.retain(|k| !covers(&entry, &k.entry));
        self.used = self.kept.iter().map(|k| k.bytes).sum();
        while self.used + bytes > self.limit {
            let Some(oldest) = (0..self.kept.len()).min_by_key(|&i| self.kept[i].stamp) else {
                break;
            };
            self.used -= self.kept.swap_remove(oldest).bytes;
        }
        let dropped = before - self.kept.len();
        self.clock += 1;
        self.used += bytes;
        self.kept.push(Kept {
            entry,
            bytes,
            stamp: self.clock,
        });
        Outcome {
            kept: true,
            dropped,
        }
    }

    /// Takes entry `index` out (its rows are going back into a slot).
    pub(crate) fn take(&mut self, index: usize) -> Option<E> {
        if index >= self.kept.len() {
            return None;
        }
        let k = self.kept.swap_remove(index);
        self.used -= k.bytes;
        Some(k.entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(stash: &Stash<&'static str>) -> Vec<&'static str> {
        let mut w: Vec<_> = stash.entries().copied().collect();
        w.sort_unstable();
        w
    }

    #[test]
    fn the_oldest_entries_make_room_and_one_larger_than_the_limit_is_not_kept() {
        let mut stash = Stash::new(100);
        assert!(stash.enabled() && stash.is_empty());
        let none = |_: &&str, _: &&str| false;
        assert_eq!(stash.keep("a", 40, none).dropped, 0);
        assert_eq!(stash.keep("b", 40, none).dropped, 0);
        assert_eq!(stash.used(), 80);
        // c needs 30: a, the oldest, goes.
        assert_eq!(
            stash.keep("c", 30, none),
            Outcome {
                kept: true,
                dropped: 1
            }
        );
        assert_eq!(words(&stash), ["b", "c"]);
        assert_eq!(stash.used(), 70);
        // Exactly the limit: both go.
        assert_eq!(stash.keep("d", 100, none).dropped, 2);
        assert_eq!(words(&stash), ["d"]);
        // Over the limit: refused, and d stays.
        assert_eq!(
            stash.keep("e", 101, none),
            Outcome {
                kept: false,
                dropped: 0
            }
        );
        assert_eq!((words(&stash), stash.used()), (vec!["d"], 100));
    }

    #[test]
    fn an_entry_replaces_those_it_covers_and_taking_one_frees_its_bytes() {
        let mut stash = Stash::new(1000);
        stash.keep("ab", 20, |_, _| false);
        stash.keep("xy", 20, |_, _| false);
        // "abc" holds all of "ab": the older save goes even though there is room.
        let kept = stash.keep("abc", 30, |new: &&str, old: &&str| new.starts_with(old));
        assert_eq!(kept.dropped, 1);
        assert_eq!(words(&stash), ["abc", "xy"]);
        assert_eq!(stash.used(), 50);
        let i = stash.entries().position(|e| *e == "xy").unwrap();
        assert_eq!(stash.take(i), Some("xy"));
        assert_eq!(stash.take(5), None);
        assert_eq!((words(&stash), stash.used()), (vec!["abc"], 30));
        // Recency is when an entry was kept: "abc" is now the oldest.
        stash.keep("p", 500, |_, _| false);
        stash.keep("q", 480, |_, _| false);
        assert_eq!(words(&stash), ["p", "q"]);
    }

    #[test]
    fn a_zero_limit_keeps_nothing() {
        let mut stash = Stash::new(0);
        assert!(!stash.enabled());
        assert!(!stash.keep("a", 1, |_, _| false).kept);
        assert!(stash.is_empty());
    }
}
