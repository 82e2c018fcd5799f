//! Prompt-lookup speculative decoding, kept pure so it can be tested without a model.
//!
//! An answer often repeats what is already in its context: code being edited, a document
//! being summarised or quoted, names and figures from a retrieved passage. When the last few
//! tokens of a sequence occurred earlier in it, the tokens that followed them then are a
//! guess (a *draft*) for what follows now. The draft goes into the same decode as the
//! sequence's next token, one row per drafted token, and each row's logits are sampled as
//! usual: while the sampled token is the drafted one, the next row's logits are valid too,
//! so one decode can yield several tokens. The first token that differs from the draft is
//! kept as the next token and the rest of the draft is removed from the cache. Every token
//! is still sampled from the model's own distribution, in order, with the request's own
//! sampler: a draft only decides how many rows a decode reads.
//!
//! Extra rows are not free, and what they cost depends on the model and the machine (on the
//! project's 2-core Xeon a 9-row decode costs 3.7x a 1-row one for SmolLM2 135M, whose
//! weights fit the caches, and 1.6x for Gemma 3 270M, whose 262,144-row output layer is read
//! from memory either way). So each decode's draft length is chosen from the step costs
//! measured on this machine ([`RowCosts`]) and each sequence's recent acceptance
//! ([`Acceptance`]), to make the most tokens per second ([`choose`]); where drafting does not
//! pay, nothing is drafted.
//!
//! Written for this project; the method is "prompt lookup decoding" (A. Saxena, 2023), the
//! draft-and-verify scheme of Leviathan et al. (2023) with a draft taken from the context.

/// The longest and shortest n-gram looked up: the longest match is the likeliest to go on
/// the same way, and a single token matches too often to mean anything.
pub(crate) const NGRAM_MAX: usize = 4;
pub(crate) const NGRAM_MIN: usize = 2;

/// Decodes longer than this are not measured or drafted: far past any useful draft.
pub(crate) const MAX_ROWS: usize = 64;

/// The tokens that followed the latest earlier occurrence of `history`'s last n tokens, for
/// the longest n from [`NGRAM_MAX`] down to [`NGRAM_MIN`] that occurred before, at most
/// `max` of them; empty if none did.
pub(crate) fn draft<T: PartialEq>(history: &[T], max: usize) -> &[T] {
    if max == 0 {
        return &[];
    }
    for n in (NGRAM_MIN..=NGRAM_MAX).rev() {
        let Some(start) = history.len().checked_sub(n) else {
            continue;
        };
        let tail = &history[start..];
        // Occurrences that end before the tail does, so at least one token follows.
        if let Some(at) = history[..history.len() - 1]
            .windows(n)
            .rposition(|w| w == tail)
        {
            let from = at + n;
            return &history[from..(from + max).min(history.len())];
        }
    }
    &[]
}

/// How often a sequence's drafted tokens were accepted lately: counts that fade by
/// [`Acceptance::FADE`] per verification, so a sequence that starts or stops copying is
/// followed within a few steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Acceptance {
    accepted: f64,
    rejected: f64,
}

impl Default for Acceptance {
    /// One of each: an even chance before anything is known.
    fn default() -> Self {
        Self {
            accepted: 1.0,
            rejected: 1.0,
        }
    }
}

impl Acceptance {
    const FADE: f64 = 0.7;

    /// Learns from one verification: `accepted` of `drafted` tokens matched (the first
    /// mismatch ends it, so at most one is rejected).
    pub(crate) fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.accepted = self.accepted * Self::FADE + accepted as f64;
        self.rejected = self.rejected * Self::FADE + f64::from(u8::from(accepted < drafted));
    }

    /// The chance that a drafted token is accepted, given the one before it was.
    pub(crate) fn rate(self) -> f64 {
        self.accepted / (self.accepted + self.rejected)
    }
}

/// A draft found but not checked, because drafting did not pay: the tokens the answer then
/// picks tell whether it would have been taken, so a sequence's [`Acceptance`] is learnt at no
/// cost while it does not draft, and drafting starts as soon as the answer starts to copy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shadow<T> {
    draft: Vec<T>,
    hits: usize,
}

impl<T> Default for Shadow<T> {
    fn default() -> Self {
        Self {
            draft: Vec::new(),
            hits: 0,
        }
    }
}

impl<T: PartialEq + Clone> Shadow<T> {
    /// Watches `draft` against the tokens that follow, unless one is being watched.
    pub(crate) fn watch(&mut self, draft: &[T]) {
        if self.draft.is_empty() {
            self.draft.extend_from_slice(draft);
            self.hits = 0;
        }
    }

    /// Stops watching (the sequence drafts for real).
    pub(crate) fn clear(&mut self) {
        self.draft.clear();
        self.hits = 0;
    }

    /// The answer's next token. Once the draft is settled (a token differs, or all matched),
    /// what checking it would have given: tokens drafted and taken.
    pub(crate) fn next(&mut self, token: &T) -> Option<(usize, usize)> {
        let expected = self.draft.get(self.hits)?;
        if expected == token {
            self.hits += 1;
            if self.hits < self.draft.len() {
                return None;
            }
        }
        let settled = (self.draft.len(), self.hits);
        self.clear();
        Some(settled)
    }
}

/// Tokens a draft of `k` is expected to add beyond the one a decode always yields, when
/// each drafted token is accepted with chance `a` once the one before it was:
/// a + a² + … + aᵏ.
pub(crate) fn expected_gain(a: f64, k: usize) -> f64 {
    let mut term = 1.0;
    let mut sum = 0.0;
    for _ in 0..k {
        term *= a;
        sum += term;
    }
    sum
}

/// Seconds a decode of n rows took on this machine, by n: moving averages of the decodes
/// that only generated (no prompt rows), from 1 to [`MAX_ROWS`], each in a run of decodes at
/// least as long.
///
/// A decode right after a longer one costs more than in a run of its own: on the 2-core Xeon
/// a 1-row SmolLM2 decode took 6 ms in a run of 1-row decodes and 8 to 10 ms right after a
/// drafted 5-to-17-row one (those multiply with other kernels). That is a cost of drafting,
/// not of the plain decode drafting is weighed against: counted in, a sequence that drafted
/// made plain decoding look half as dear again as it is, and drafted where it did not pay (a
/// quoted passage came at 0.94x the speed of not drafting, 0.93-1.00 over 5 runs; measured
/// this way, 1.00x, 0.96-1.07).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RowCosts {
    by_rows: Vec<Option<f64>>,
    /// Rows of the latest decode.
    last: usize,
}

impl Default for RowCosts {
    fn default() -> Self {
        Self {
            by_rows: vec![None; MAX_ROWS + 1],
            last: 0,
        }
    }
}

impl RowCosts {
    /// Weight of the newest decode.
    const SMOOTHING: f64 = 0.2;
    /// Until a longer decode has been measured, each extra row is guessed to cost this share
    /// of the longest one measured: low, so that drafting is tried and then measured.
    const GUESS_PER_ROW: f64 = 0.02;

    /// Learns that a decode of `rows` rows took `secs`; `generated` when it held no prompt
    /// rows. Only such a decode that follows one of at most as many rows is measured.
    pub(crate) fn record(&mut self, rows: usize, secs: f64, generated: bool) {
        let after = std::mem::replace(&mut self.last, rows);
        if !generated || rows < after {
            return;
        }
        if let Some(cost) = self.by_rows.get_mut(rows).filter(|_| rows > 0) {
            *cost = Some(cost.map_or(secs, |c| c + Self::SMOOTHING * (secs - c)));
        }
    }

    /// The expected seconds of a decode of `rows` rows: measured, or interpolated between the
    /// nearest measured counts, or beyond the longest one measured, guessed
    /// ([`RowCosts::GUESS_PER_ROW`]). `None` before any decode of at most `rows` was measured.
    pub(crate) fn estimate(&self, rows: usize) -> Option<f64> {
        let rows = rows.min(MAX_ROWS);
        let below = (1..=rows)
            .rev()
            .find_map(|r| self.by_rows[r].map(|c| (r, c)))?;
        if below.0 == rows {
            return Some(below.1);
        }
        let above = (rows + 1..=MAX_ROWS).find_map(|r| self.by_rows[r].map(|c| (r, c)));
        Some(match above {
            Some((r1, c1)) => {
                let (r0, c0) = below;
                c0 + (c1 - c0) * (rows - r0) as f64 / (r1 - r0) as f64
            }
            None => below.1 * (1.0 + Self::GUESS_PER_ROW * (rows - below.0) as f64),
        })
    }
}

/// A sequence's draft length in a decode that already holds `rows` rows expected to yield
/// `tokens` tokens: the k of at most `available` drafted tokens that makes the most tokens per
/// second, each accepted with chance `rate`, by the measured `costs`; 0 if drafting does not
/// pay (or nothing is measured yet). A request's fewest (`least`, its `speculative.n_min`)
/// overrides the costs: fewer `available` than that are not drafted, and otherwise at least
/// that many are.
pub(crate) fn choose(
    costs: &RowCosts,
    rows: usize,
    tokens: f64,
    available: usize,
    rate: f64,
    least: usize,
) -> usize {
    if available < least {
        return 0;
    }
    let Some(base) = costs.estimate(rows) else {
        return least;
    };
    let mut best = (0, tokens / base);
    for k in 1..=available.min(MAX_ROWS.saturating_sub(rows)) {
        let Some(cost) = costs.estimate(rows + k) else {
            break;
        };
        let speed = (tokens + expected_gain(rate, k)) / cost;
        if speed > best.1 {
            best = (k, speed);
        }
    }
    best.0.max(least)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_occurrence_of_the_longest_tail_gives_the_draft() {
        // "1 2 3 4" occurs at 0 and at 6 (followed by 8 9 there); the history ends in 1 2 3 4.
        let h = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 8, 9, 1, 2, 3, 4];
        assert_eq!(draft(&h, 3), &[8, 9, 1]);
        assert_eq!(
            draft(&h, 10),
            &[8, 9, 1, 2, 3, 4],
            "up to the end of the history"
        );
        assert_eq!(draft(&h, 0), &[] as &[i32]);
        // Only the last two tokens (7 3) occurred before: the 2-gram gives it.
        let h = [7, 3, 5, 5, 9, 7, 3];
        assert_eq!(draft(&h, 4), &[5, 5, 9, 7]);
        // A longer match wins over a later, shorter one: 1 2 3 at 0 against 2 3 at 5.
        let h = [1, 2, 3, 6, 0, 2, 3, 7, 1, 2, 3];
        assert_eq!(draft(&h, 1), &[6]);
        // The tail itself is no match; nothing occurred before; too short to match.
        assert_eq!(draft(&[1, 2, 3, 4], 4), &[] as &[i32]);
        assert_eq!(draft(&[5], 4), &[] as &[i32]);
        assert_eq!(draft(&[] as &[i32], 4), &[] as &[i32]);
        // A repeated token: the tail 5 5 5 5 last occurred one position back.
        assert_eq!(draft(&[5, 5, 5, 5, 5], 3), &[5]);
    }

    #[test]
    fn acceptance_follows_recent_verifications() {
        let mut a = Acceptance::default();
        assert!((a.rate() - 0.5).abs() < 1e-9);
        for _ in 0..5 {
            a.record(4, 4);
        }
        assert!(a.rate() > 0.95, "{}", a.rate());
        for _ in 0..10 {
            a.record(4, 0);
        }
        assert!(a.rate() < 0.1, "{}", a.rate());
        let before = a;
        a.record(0, 0);
        assert_eq!(a, before, "nothing drafted, nothing learnt");
    }

    #[test]
    fn a_shadow_draft_settles_as_checking_it_would_have() {
        let mut s = Shadow::default();
        assert_eq!(s.next(&1), None, "nothing watched");
        s.watch(&[1, 2, 3]);
        s.watch(&[9, 9]); // one at a time
        assert_eq!((s.next(&1), s.next(&2)), (None, None));
        assert_eq!(s.next(&3), Some((3, 3)), "all taken");
        assert_eq!(s.next(&4), None, "settled: no longer watched");
        s.watch(&[5, 6, 7]);
        assert_eq!(s.next(&5), None);
        assert_eq!(s.next(&0), Some((3, 1)), "broken at the second");
        s.watch(&[8]);
        s.clear();
        assert_eq!(s.next(&8), None);
    }

    #[test]
    fn the_expected_gain_sums_the_chances_of_each_drafted_token() {
        assert_eq!(expected_gain(0.5, 0), 0.0);
        assert!((expected_gain(0.5, 3) - 0.875).abs() < 1e-12);
        assert!((expected_gain(1.0, 4) - 4.0).abs() < 1e-12);
    }

    fn costs(points: &[(usize, f64)]) -> RowCosts {
        let mut c = RowCosts::default();
        for &(rows, secs) in points {
            c.record(rows, secs, true);
            c.last = 0;
        }
        c
    }

    #[test]
    fn costs_are_measured_interpolated_or_guessed() {
        let c = costs(&[(1, 0.010), (9, 0.030)]);
        assert_eq!(c.estimate(1), Some(0.010));
        assert!((c.estimate(5).unwrap_or(0.0) - 0.020).abs() < 1e-12);
        // Beyond the longest measured: 2% of it per row.
        assert!((c.estimate(11).unwrap_or(0.0) - 0.0312).abs() < 1e-12);
        assert_eq!(RowCosts::default().estimate(3), None);
        assert_eq!(costs(&[(4, 0.02)]).estimate(2), None, "nothing at or below");
        // A moving average.
        let c = costs(&[(1, 0.010), (1, 0.020)]);
        assert!((c.estimate(1).unwrap_or(0.0) - 0.012).abs() < 1e-12);
        // Zero rows and rows past the table are not recorded.
        assert_eq!(costs(&[(0, 1.0), (MAX_ROWS + 1, 1.0)]), RowCosts::default());
    }

    #[test]
    fn only_generating_decodes_in_a_run_at_least_as_long_are_measured() {
        let mut c = RowCosts::default();
        c.record(1, 0.006, true);
        c.record(6, 0.029, true);
        c.record(1, 0.009, true); // right after a drafted decode
        assert_eq!((c.estimate(1), c.estimate(6)), (Some(0.006), Some(0.029)));
        c.record(1, 0.016, true); // in a run of 1-row decodes
        assert!((c.estimate(1).unwrap_or(0.0) - 0.008).abs() < 1e-12);
        c.record(40, 0.1, false); // a prompt read, then the decode after it
        c.record(1, 0.5, true);
        c.record(6, 0.5, false); // prompt rows beside a decode
        assert!((c.estimate(1).unwrap_or(0.0) - 0.008).abs() < 1e-12);
        assert_eq!(c.estimate(6), Some(0.029), "nothing of 40 rows either");
        assert!((c.estimate(40).unwrap_or(0.0) - 0.029 * 1.68).abs() < 1e-12);
    }

    #[test]
    fn a_draft_is_as_long_as_pays_on_the_measured_costs() {
        // Measured on the 2-core Xeon at depth 512 (`backstop bench -p 1,2,3,5,9,17 -n 0`).
        let smollm2 = costs(&[
            (1, 0.0111),
            (2, 0.0168),
            (3, 0.0189),
            (5, 0.0269),
            (9, 0.0414),
            (17, 0.0718),
        ]);
        let gemma = costs(&[
            (1, 0.0220),
            (2, 0.0229),
            (3, 0.0244),
            (5, 0.0279),
            (9, 0.0349),
            (17, 0.0480),
        ]);
        // A 40% chance: Gemma drafts, SmolLM2 does not (two rows cost it 1.5x one).
        assert_eq!(choose(&smollm2, 1, 1.0, 8, 0.4, 0), 0);
        let k = choose(&gemma, 1, 1.0, 8, 0.4, 0);
        assert!((1..=4).contains(&k), "{k}");
        // Copying: both draft all they have.
        assert_eq!(choose(&smollm2, 1, 1.0, 8, 0.98, 0), 8);
        assert_eq!(choose(&gemma, 1, 1.0, 8, 0.98, 0), 8);
        // Almost never right: neither.
        assert_eq!(choose(&gemma, 1, 1.0, 8, 0.02, 0), 0);
        // No draft to check, or nothing measured yet.
        assert_eq!(choose(&gemma, 1, 1.0, 0, 0.98, 0), 0);
        assert_eq!(choose(&RowCosts::default(), 1, 1.0, 8, 0.98, 0), 0);
        // Beside three other sequences a draft must pay for the whole step's delay.
        let beside = choose(&smollm2, 4, 4.0, 8, 0.6, 0);
        assert_eq!(beside, 0);
        // Only single rows measured: longer decodes are guessed cheap, so drafting is tried.
        assert_eq!(choose(&costs(&[(1, 0.01)]), 1, 1.0, 4, 0.5, 0), 4);
    }

    #[test]
    fn a_request_s_fewest_skips_shorter_guesses_and_floors_longer_ones() {
        let smollm2 = costs(&[(1, 0.006), (9, 0.042), (17, 0.072)]);
        // The costs alone would draft none of these.
        assert_eq!(choose(&smollm2, 1, 1.0, 16, 0.3, 0), 0);
        assert_eq!(choose(&smollm2, 1, 1.0, 16, 0.3, 8), 8);
        assert_eq!(choose(&smollm2, 1, 1.0, 7, 0.3, 8), 0, "too short a guess");
        assert_eq!(
            choose(&RowCosts::default(), 1, 1.0, 8, 0.3, 8),
            8,
            "nothing measured"
        );
        // Where the costs want more, they get it.
        assert_eq!(choose(&smollm2, 1, 1.0, 16, 0.999, 4), 16);
    }
}
