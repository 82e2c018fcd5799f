//! Generating sequences at very different depths decode in two `llama_decode` calls, when
//! that is measured to be faster than one.
//!
//! With a KV cache per sequence (`kv_unified = false`, as the server makes its contexts),
//! llama.cpp builds one attention for every sequence of a call over as many cells as the
//! deepest of them uses: `get_n_kv` in `llama-kv-cache.cpp` (at the pinned version) takes
//! the most any stream of the ubatch uses, padded to 256, and every sequence's query is
//! multiplied by that many keys and values, the cells it does not hold masked after the
//! product. So three short answers decoding beside a 3,000-token conversation each pay for
//! 3,072 cells. On the 2-core EPYC VM (SmolLM2 Q4_1, 2 threads) a step of those four took
//! 56-71 ms in one call; the three short ones alone took 28-31 ms and the long one alone
//! 20 ms, so in two calls a step took about 50.
//!
//! (llama.cpp also decodes sequences whose streams are not consecutive in ubatches of their
//! own, its `split_equal` taking a sequence into a ubatch only after the one before it, so a
//! group of slots 0 and 2 is two passes over the weights: one more reason to measure.)
//!
//! Two calls are not always faster: the second is one more pass over the weights. On the CPU
//! above that costs less than the widened attention; on a GPU a call has a fixed cost of a
//! millisecond or two that a small model's attention rarely makes up, and a model with
//! sliding-window layers (Gemma 3: five layers of six see 512 cells) widens only the others.
//! Rather than model each machine and model, the worker measures: while
//! the same sequences generate with the same deep group, a step is decoded both ways and
//! then the faster way is kept, the other measured again after [`RETRY_EVERY`] steps, as
//! depths move and the machine's load with them; each time it is still the slower, twice as
//! many steps pass before the next (up to [`RETRY_MOST`]), so a way that loses by far (three
//! ubatches on a GPU where one call takes 1.6 ms) costs a step in hundreds, not one in 32.
//!
//! Only steps without drafts (`--speculate`) are compared: a drafted token is one more row
//! at the sequence's depth (a few milliseconds at 3,000 cells on that CPU, as much as a
//! whole step of short answers), so a step that drafts would weigh on one way's time and not
//! the other's. A step that is to be timed, the first of each way or the way not taken
//! measured again, decodes without drafts ([`DepthSplit::measuring`]); another step that
//! drafted teaches nothing ([`DepthSplit::skip`]).
//!
//! `--depth-split on` or `off` ([`SplitMode`]) takes the choice away from the measurement:
//! for a benchmark that compares the two ways, or a machine where one is known to win.

/// llama.cpp's padding of the cells a call attends to (`n_pad_cur` in `get_n_kv`).
const PAD: usize = 256;

/// The share of the cells one call would attend to that two calls must save before they are
/// tried at all: below it, what could be saved is within the noise of a step's time.
const MIN_SAVED: f64 = 0.25;

/// Steps before the way not taken is first measured again.
pub(crate) const RETRY_EVERY: u32 = 32;

/// The most steps between measurements of the way not taken.
pub(crate) const RETRY_MOST: u32 = 512;

/// Weight of the newest step's time in each way's moving average.
const SMOOTHING: f64 = 0.3;

/// The cells llama.cpp attends to for a sequence that holds `used` cells.
fn padded(used: usize) -> usize {
    used.div_ceil(PAD).max(1) * PAD
}

/// The deeper of two groups to decode `seqs` (each a slot and the cells its sequence holds
/// once this step's token is in) in, when two calls would attend to at least
/// [`MIN_SAVED`] fewer cells than one: the cut in depth order that saves the most. `None`
/// when no cut saves that much (sequences of like depth, or a single one).
pub(crate) fn deep_group(seqs: &[(usize, usize)]) -> Option<Vec<usize>> {
    if seqs.len() < 2 {
        return None; // a single stream, each step: nothing to sort
    }
    let mut sorted = seqs.to_vec();
    sorted.sort_by_key(|&(slot, used)| (padded(used), slot));
    let deepest = padded(sorted.last()?.1);
    let one = sorted.len() * deepest;
    // Cutting after the k shallowest: they attend to the k-th's cells, the rest to the deepest's.
    let (cut, two) = (1..sorted.len())
        .map(|k| {
            (
                k,
                k * padded(sorted[k - 1].1) + (sorted.len() - k) * deepest,
            )
        })
        .min_by_key(|&(_, cells)| cells)?;
    if ((one - two) as f64) < MIN_SAVED * one as f64 {
        return None;
    }
    let mut deep: Vec<usize> = sorted[cut..].iter().map(|&(slot, _)| slot).collect();
    deep.sort_unstable();
    Some(deep)
}

/// How the generating sequences of a step choose between one call and two split by depth
/// (`--depth-split`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SplitMode {
    /// Both ways are measured while the same sequences generate, and the faster kept.
    #[default]
    Auto,
    /// Two calls wherever a [`deep_group`] is cut off; nothing is measured.
    On,
    /// Always one call.
    Off,
}

impl SplitMode {
    /// `auto`, `on` or `off` (as `--depth-split` takes them).
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Some(Self::Auto),
            "on" => Some(Self::On),
            "off" => Some(Self::Off),
            _ => None,
        }
    }
}

/// Which way the generating sequences of a step decode, one call or two split by depth,
/// and what each way has cost while the same sequences generate with the same deep group.
#[derive(Debug)]
pub(crate) struct DepthSplit {
    /// Measured, or decided by the server's settings.
    mode: SplitMode,
    /// The generating slots and the deep group measured.
    mix: (Vec<usize>, Vec<usize>),
    /// Seconds a step took in one call, and in two (moving averages).
    one: Option<f64>,
    two: Option<f64>,
    /// Steps since the way not taken was last measured, and how many are to pass before it is
    /// measured again.
    since_other: u32,
    retry_after: u32,
    /// The way of the step being measured (two calls or not) and whether it is the way not
    /// taken, measured again; `None` when there is no choice.
    taken: Option<(bool, bool)>,
}

impl Default for DepthSplit {
    fn default() -> Self {
        Self::new(SplitMode::Auto)
    }
}

impl DepthSplit {
    pub(crate) fn new(mode: SplitMode) -> Self {
        Self {
            mode,
            mix: Default::default(),
            one: None,
            two: None,
            since_other: 0,
            retry_after: RETRY_EVERY,
            taken: None,
        }
    }

    /// The deep group to decode in a second call this step, or `None` for one call.
    /// `decode` are the generating slots (in slot order) and `deep` their [`deep_group`].
    pub(crate) fn choose(
        &mut self,
        decode: &[usize],
        deep: Option<Vec<usize>>,
    ) -> Option<Vec<usize>> {
        self.taken = None;
        let deep = match self.mode {
            SplitMode::Auto => deep?,
            SplitMode::On => return deep,
            SplitMode::Off => return None,
        };
        if self.mix.0 != decode || self.mix.1 != deep {
            *self = Self {
                mix: (decode.to_vec(), deep.clone()),
                ..Self::new(self.mode)
            };
        }
        let (two, retry) = match (self.one, self.two) {
            (None, _) => (false, false),
            (Some(_), None) => (true, false),
            (Some(one), Some(two)) => {
                self.since_other += 1;
                let retry = self.since_other >= self.retry_after;
                if retry {
                    self.since_other = 0;
                }
                ((two < one) != retry, retry)
            }
        };
        self.taken = Some((two, retry));
        two.then_some(deep)
    }

    /// Whether the step [`DepthSplit::choose`] just chose for is to be timed for the choice
    /// (the first of its way, or the way not taken measured again), and so decodes without
    /// drafts.
    pub(crate) fn measuring(&self) -> bool {
        match self.taken {
            Some((_, retry)) => retry || self.one.is_none() || self.two.is_none(),
            None => false,
        }
    }

    /// The step [`DepthSplit::choose`] chose for drafted (or decoded nothing): its time says
    /// nothing of its way. A way not taken that it was to measure again is measured at the
    /// next step instead.
    pub(crate) fn skip(&mut self) {
        if let Some((_, true)) = self.taken.take() {
            self.since_other = self.retry_after;
        }
    }

    /// Learns that the step [`DepthSplit::choose`] chose for took `secs` to decode, with no
    /// drafts. The way not taken, measured again, takes the new time as it is (its old one is
    /// many steps stale, from shallower sequences), and is next measured twice as many steps
    /// later if it is still the slower, or [`RETRY_EVERY`] steps later if it is now the
    /// faster.
    pub(crate) fn record(&mut self, secs: f64) {
        let Some((two, retry)) = self.taken.take() else {
            return;
        };
        let (way, other) = if two {
            (&mut self.two, self.one)
        } else {
            (&mut self.one, self.two)
        };
        *way = Some(match *way {
            Some(old) if !retry => old + SMOOTHING * (secs - old),
            _ => secs,
        });
        if retry {
            self.retry_after = if other.is_some_and(|other| secs >= other) {
                (self.retry_after * 2).min(RETRY_MOST)
            } else {
                RETRY_EVERY
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deep_sequence_beside_shallow_ones_is_cut_off_where_it_saves_the_most_cells() {
        // Three short answers beside a 3,000-token conversation: 4 x 3,072 cells in one call,
        // 3 x 256 + 3,072 in two.
        assert_eq!(
            deep_group(&[(0, 40), (1, 3000), (2, 90), (3, 200)]),
            Some(vec![1])
        );
        // Two deep ones go together; the cut falls at the widest gap.
        assert_eq!(
            deep_group(&[(0, 3000), (1, 40), (2, 2900), (3, 90)]),
            Some(vec![0, 2])
        );
        // A middle depth goes with whichever side saves more.
        assert_eq!(deep_group(&[(0, 100), (1, 600), (2, 4000)]), Some(vec![2]));
        assert_eq!(
            deep_group(&[(0, 100), (1, 3500), (2, 4000)]),
            Some(vec![1, 2])
        );
    }

    #[test]
    fn sequences_of_like_depth_or_one_alone_stay_in_one_call() {
        assert_eq!(deep_group(&[]), None);
        assert_eq!(deep_group(&[(0, 3000)]), None);
        // Within one 256-cell pad every sequence attends to the same cells anyway.
        assert_eq!(deep_group(&[(0, 10), (1, 250)]), None);
        // 2 x 512 against 256 + 512 saves a quarter: just enough; 4 x 512 against
        // 256 + 3 x 512 saves an eighth: not.
        assert_eq!(deep_group(&[(0, 10), (1, 300)]), Some(vec![1]));
        assert_eq!(deep_group(&[(0, 10), (1, 300), (2, 400), (3, 500)]), None);
    }

    /// Runs `steps` steps of one mix whose one call takes `one` seconds and two calls `two`;
    /// how many were decoded in two calls.
    fn run(split: &mut DepthSplit, steps: u32, one: f64, two: f64) -> u32 {
        let mut split_steps = 0;
        for _ in 0..steps {
            let chosen = split.choose(&[0, 1, 2], Some(vec![1]));
            if let Some(deep) = &chosen {
                assert_eq!(deep, &[1]);
                split_steps += 1;
            }
            split.record(if chosen.is_some() { two } else { one });
        }
        split_steps
    }

    #[test]
    fn both_ways_are_measured_and_the_faster_kept_with_the_other_tried_again_ever_less_often() {
        // After the first two steps, the way not taken is measured again after 32, 64, 128,
        // 256, 512, 512, ... steps: 6 times in 2,000.
        let steps = 2 + 2000;
        // Two calls faster (a CPU): all but the first step and the 6 retries of one call.
        let mut split = DepthSplit::default();
        assert_eq!(run(&mut split, steps, 0.060, 0.045), steps - 1 - 6);
        // One call faster (a GPU's fixed cost per call): the one measurement of two calls,
        // and its 6 retries.
        let mut split = DepthSplit::default();
        assert_eq!(run(&mut split, steps, 0.002, 0.0035), 1 + 6);
        // The machine changes its mind: what was faster and is measured slower is left.
        // Two calls until one is measured again (31 steps); then one call, and two measured
        // again 32 steps after that (the interval starts afresh), then 64 steps later.
        let mut split = DepthSplit::default();
        run(&mut split, 2, 0.060, 0.045);
        let later = run(&mut split, 4 * RETRY_EVERY, 0.030, 0.045);
        assert_eq!(later, RETRY_EVERY - 1 + 2);
    }

    #[test]
    fn steps_timed_for_the_choice_decode_without_drafts_and_drafted_steps_teach_nothing() {
        let (slots, deep) = ([0, 1, 2], Some(vec![1]));
        let mut split = DepthSplit::default();
        assert_eq!(split.choose(&slots, deep.clone()), None);
        assert!(split.measuring(), "one call's first step is timed");
        split.record(0.060);
        assert_eq!(split.choose(&slots, deep.clone()), Some(vec![1]));
        assert!(split.measuring(), "two calls' first step is timed");
        split.record(0.045);
        // Two calls kept; their steps may draft, and the drafted ones are not timed: had their
        // 0.2 s counted, one call would have been measured again as the faster.
        for _ in 1..RETRY_EVERY {
            assert_eq!(split.choose(&slots, deep.clone()), Some(vec![1]));
            assert!(!split.measuring());
            split.skip();
        }
        assert_eq!(split.choose(&slots, deep.clone()), None);
        assert!(split.measuring(), "one call measured again is timed");
        // That step decoded nothing (its requests were cancelled): the next one measures.
        split.skip();
        assert_eq!(split.choose(&slots, deep.clone()), None);
        assert!(split.measuring());
        split.record(0.070);
        assert_eq!(split.choose(&slots, deep.clone()), Some(vec![1]));
        assert!(!split.measuring());
        // A first measurement skipped is made at the next step of its way.
        let mut split = DepthSplit::default();
        assert_eq!(split.choose(&slots, deep.clone()), None);
        split.skip();
        assert_eq!(split.choose(&slots, deep.clone()), None);
        assert!(split.measuring());
        // No choice: nothing to time.
        assert_eq!(split.choose(&slots, None), None);
        assert!(!split.measuring());
    }

    #[test]
    fn told_on_or_off_the_split_follows_the_depths_or_never_comes_and_nothing_is_timed() {
        let (slots, deep) = ([0, 1, 2], Some(vec![1]));
        let mut on = DepthSplit::new(SplitMode::On);
        let mut off = DepthSplit::new(SplitMode::Off);
        for _ in 0..2 * RETRY_EVERY {
            assert_eq!(on.choose(&slots, deep.clone()), Some(vec![1]));
            assert!(!on.measuring());
            // Two calls measured slower change nothing.
            on.record(1.0);
            assert_eq!(off.choose(&slots, deep.clone()), None);
            assert!(!off.measuring());
            off.record(1.0);
        }
        assert_eq!(on.choose(&slots, None), None, "like depths: one call");
        assert_eq!(SplitMode::parse("ON"), Some(SplitMode::On));
        assert_eq!(SplitMode::parse("auto"), Some(SplitMode::Auto));
        assert_eq!(SplitMode::parse("off"), Some(SplitMode::Off));
        assert_eq!(SplitMode::parse("sometimes"), None);
    }

    #[test]
    fn a_new_mix_is_measured_afresh_and_no_choice_leaves_nothing_to_learn() {
        let mut split = DepthSplit::default();
        run(&mut split, 10, 0.060, 0.045);
        // A slot joins: one call is measured again first.
        assert_eq!(split.choose(&[0, 1, 2, 3], Some(vec![1])), None);
        split.record(0.070);
        assert_eq!(split.choose(&[0, 1, 2, 3], Some(vec![1])), Some(vec![1]));
        split.record(0.050);
        // Like depths: one call, and its time is not taken for either way.
        assert_eq!(split.choose(&[0, 1, 2, 3], None), None);
        split.record(1.0);
        assert_eq!(split.choose(&[0, 1, 2, 3], Some(vec![1])), Some(vec![1]));
    }
}
