//! The prompt cache in host memory (`--cache-ram`): when a slot's KV cache is about to be
//! given to another conversation, its rows are copied out of llama.cpp into RAM, and a later
//! request that continues that conversation has them copied back instead of reading its
//! history again. With more conversations than slots (a team sharing one server, an agent
//! running several threads) each one's next turn then starts from its own cache, as with a
//! slot of its own. llama.cpp's server keeps such a cache too (`--cache-ram`, 8 GiB by
//! default); this one is written for the worker's slots, whose reuse rules (exact reuse, the
//! sliding window) the restored rows must keep.
//!
//! One limit holds for the whole process, as llama-server's does for its one model: every
//! loaded model's worker is a [`Tenant`] of one [`Shared`] stash, sees only its own model's
//! entries, and makes room by dropping the oldest of anyone's (host memory is freed on any
//! thread). With a limit per model, three resident models would each keep 8 GiB by default.
//!
//! A model's entries outlive its worker: one that unloads (its keep-alive ran out, or another
//! model needed its place) keeps its slots' conversations here too, and when it loads again
//! with the same file and settings (its *family*, see `worker::family`), its next turns copy
//! them back instead of reading their history again. They take their turn to be dropped like
//! any others.
//!
//! This module holds the bookkeeping only (what is kept, its size, which goes first), so it
//! is tested without a model; the worker copies the rows.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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

    /// Bytes its entries take.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used
    }

    /// The entries, each with its id: ids are never reused, so one read here still names
    /// the same entry (or none) after others come and go.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (u64, &E)> {
        self.kept.iter().map(|k| (k.stamp, &k.entry))
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
        if bytes > self.limit {
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

    /// Takes the entry of id `id` out (its rows are going back into a slot) if `mine` says it
    /// may; `None` if it was dropped meanwhile.
    fn take(&mut self, id: u64, mine: impl Fn(&E) -> bool) -> Option<E> {
        let index = self
            .kept
            .iter()
            .position(|k| k.stamp == id && mine(&k.entry))?;
        let k = self.kept.swap_remove(index);
        self.used -= k.bytes;
        Some(k.entry)
    }
}

/// The process's one stash, which every loaded model's worker holds a [`Tenant`] of.
pub(crate) struct Shared<E> {
    inner: Arc<Mutex<Inner<E>>>,
}

impl<E> Clone for Shared<E> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<E> {
    stash: Stash<Owned<E>>,
    /// The process is stopping: nothing more is kept.
    closed: bool,
}

/// An entry and the family of the model that kept it.
struct Owned<E> {
    family: Arc<str>,
    entry: E,
}

impl<E> Shared<E> {
    /// An empty stash for the process that holds at most `limit` bytes (0: nothing).
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                stash: Stash::new(limit),
                closed: false,
            })),
        }
    }

    /// The bytes it may hold.
    pub(crate) fn limit(&self) -> usize {
        lock(&self.inner).stash.limit
    }

    /// A tenant (a model's worker) that sees the entries of `family`, the model's file and
    /// the settings its rows depend on; one not `enabled` keeps nothing (a model whose cache
    /// cannot be cut back to a prefix).
    pub(crate) fn tenant(&self, family: &str, enabled: bool) -> Tenant<E> {
        let inner = lock(&self.inner);
        Tenant {
            inner: Arc::clone(&self.inner),
            family: family.into(),
            enabled: enabled && inner.stash.enabled(),
        }
    }

    /// Keeps `entry`, which takes `bytes`, as one of `family`'s: a conversation read back
    /// from the folder a stopped process wrote ([`super::persist`]). The oldest of any
    /// family's make room, as for [`Tenant::keep`].
    pub(crate) fn adopt(&self, family: &str, entry: E, bytes: usize) -> Outcome {
        let entry = Owned {
            family: family.into(),
            entry,
        };
        lock(&self.inner).stash.keep(entry, bytes, |_, _| false)
    }

    /// Keeps nothing more: the process is stopping, and the models that stop with it need not
    /// copy their slots out.
    pub(crate) fn close(&self) {
        lock(&self.inner).closed = true;
    }
}

/// The stash as one model's worker sees it: its family's entries only.
pub(crate) struct Tenant<E> {
    inner: Arc<Mutex<Inner<E>>>,
    family: Arc<str>,
    enabled: bool,
}

/// A panic on another engine thread while it held the lock leaves the bookkeeping whole
/// (each change is made under the lock in full), so the poison is ignored.
fn lock<E>(inner: &Mutex<Inner<E>>) -> MutexGuard<'_, Inner<E>> {
    inner.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<E> Tenant<E> {
    /// The family whose entries it sees.
    pub(crate) fn family(&self) -> &str {
        &self.family
    }

    /// Whether it keeps anything: it may, and the process is not stopping.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled && !lock(&self.inner).closed
    }

    /// Bytes its family's entries take.
    #[cfg(test)]
    fn used(&self) -> usize {
        let inner = lock(&self.inner);
        inner
            .stash
            .kept
            .iter()
            .filter(|k| k.entry.family == self.family)
            .map(|k| k.bytes)
            .sum()
    }

    /// `f` of its family's entries with their ids ([`Stash::entries`]), read under the lock.
    pub(crate) fn with_entries<R>(&self, f: impl FnOnce(&[(u64, &E)]) -> R) -> R {
        let inner = lock(&self.inner);
        let own: Vec<(u64, &E)> = inner
            .stash
            .entries()
            .filter(|(_, o)| o.family == self.family)
            .map(|(id, o)| (id, &o.entry))
            .collect();
        f(&own)
    }

    /// [`Stash::keep`], where `covers` is asked of its family's entries only, and the oldest
    /// of any family's make room.
    pub(crate) fn keep(&self, entry: E, bytes: usize, covers: impl Fn(&E, &E) -> bool) -> Outcome {
        let mut inner = lock(&self.inner);
        if !self.enabled || inner.closed {
            return Outcome {
                kept: false,
                dropped: 0,
            };
        }
        let entry = Owned {
            family: Arc::clone(&self.family),
            entry,
        };
        inner.stash.keep(entry, bytes, |new, old| {
            old.family == new.family && covers(&new.entry, &old.entry)
        })
    }

    /// [`Stash::take`] of one of its family's entries.
    pub(crate) fn take(&self, id: u64) -> Option<E> {
        lock(&self.inner)
            .stash
            .take(id, |o| o.family == self.family)
            .map(|o| o.entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(stash: &Stash<&'static str>) -> Vec<&'static str> {
        let mut w: Vec<_> = stash.entries().map(|(_, e)| *e).collect();
        w.sort_unstable();
        w
    }

    fn own(tenant: &Tenant<&'static str>) -> Vec<&'static str> {
        let mut w = tenant.with_entries(|e| e.iter().map(|(_, e)| **e).collect::<Vec<_>>());
        w.sort_unstable();
        w
    }

    #[test]
    fn the_oldest_entries_make_room_and_one_larger_than_the_limit_is_not_kept() {
        let mut stash = Stash::new(100);
        assert!(stash.enabled() && stash.entries().next().is_none());
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
        let id = |stash: &Stash<&str>, word| stash.entries().find(|e| *e.1 == word).unwrap().0;
        let (abc, xy) = (id(&stash, "abc"), id(&stash, "xy"));
        assert_eq!(stash.take(xy, |_| true), Some("xy"));
        assert_eq!(stash.take(xy, |_| true), None);
        // Ids stay with their entries whatever moves.
        assert_eq!(id(&stash, "abc"), abc);
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
        assert_eq!(stash.entries().count(), 0);
    }

    #[test]
    fn models_share_one_limit_and_see_only_their_own_entries() {
        let shared = Shared::new(100);
        assert_eq!(shared.limit(), 100);
        let (a, b) = (shared.tenant("a", true), shared.tenant("b", true));
        let none = |_: &&str, _: &&str| false;
        a.keep("a1", 40, none);
        a.keep("a2", 30, none);
        b.keep("b1", 20, none);
        assert_eq!((own(&a), own(&b)), (vec!["a1", "a2"], vec!["b1"]));
        assert_eq!((a.used(), b.used()), (70, 20));
        // b's 30 more make room by dropping a1, the oldest of either's.
        assert_eq!(b.keep("b2", 30, none).dropped, 1);
        assert_eq!((own(&a), own(&b)), (vec!["a2"], vec!["b1", "b2"]));
        // An entry of b covers only b's: a's of the same word stays.
        a.keep("x", 10, none);
        let same = |new: &&str, old: &&str| new == old;
        assert_eq!(b.keep("x", 10, same).dropped, 0);
        assert_eq!(b.keep("x", 10, same).dropped, 1);
        assert_eq!((own(&a), own(&b)), (vec!["a2", "x"], vec!["b1", "b2", "x"]));
        // Neither takes the other's.
        let a2 = a.with_entries(|e| e.iter().find(|e| *e.1 == "a2").unwrap().0);
        assert_eq!(b.take(a2), None);
        assert_eq!(a.take(a2), Some("a2"));
        // A model that unloads leaves its entries to the next load of its family.
        drop(b);
        let again = shared.tenant("b", true);
        assert_eq!(own(&again), ["b1", "b2", "x"]);
        // A tenant that keeps nothing, and a stash of no bytes.
        let off = shared.tenant("c", false);
        assert!(!off.enabled() && !off.keep("d", 1, none).kept);
        let nothing = Shared::<&str>::new(0).tenant("a", true);
        assert!(!nothing.enabled() && !nothing.keep("e", 1, none).kept);
        // A stopping process keeps nothing more, and still serves what it has.
        shared.close();
        assert!(!a.enabled() && !a.keep("f", 1, none).kept);
        assert_eq!(own(&a), ["x"]);
    }
}
