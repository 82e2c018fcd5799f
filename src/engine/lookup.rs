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
//! Extra rows are not free, and what they cost depends on the model, the machine and the day
//! (on the project's 2-core Xeon a 9-row decode has cost 3.7x to 7x a 1-row one for SmolLM2
//! 135M, whose weights fit the caches, and 1.6x to 3.5x for Gemma 3 270M, whose 262,144-row
//! output layer is read from memory either way). So each decode's draft length is chosen from
//! the step costs measured on this machine ([`RowCosts`]) and how often each sequence's
//! guesses were taken lately, by how long a match they came from ([`Record`]), to make the
//! most tokens per second ([`choose`]); where drafting does not pay, nothing is drafted.
//!
//! Written for this project; the method is "prompt lookup decoding" (A. Saxena, 2023), the
//! draft-and-verify scheme of Leviathan et al. (2023) with a draft taken from the context.

/// The shortest match looked up: a single token matches too often to mean anything.
pub(crate) const MATCH_MIN: usize = 2;

/// The longest match measured: past it, a longer one hardly changes a guess's chance
/// ([`Record::rate`]), and no earlier occurrence is compared further.
pub(crate) const MATCH_MAX: usize = 64;

/// Decodes longer than this are not measured or drafted: far past any useful draft.
pub(crate) const MAX_ROWS: usize = 64;

/// A guess at an answer's next tokens, from the context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Guess<'a, T> {
    /// The tokens that followed the earlier occurrence.
    pub tokens: &'a [T],
    /// How many of the history's last tokens that occurrence matches (at most [`MATCH_MAX`]).
    pub matched: usize,
}

/// The tokens that followed the earlier occurrence of `history`'s end that matches the most
/// of its last tokens (the latest of equal ones), at most `max` of them, if that occurrence
/// matches at least [`MATCH_MIN`]; no tokens otherwise.
///
/// The longest match, not the latest occurrence of the last few tokens: where a passage being
/// copied repeats a short phrase ("merge_sorted(left, right)" as a definition and as a call),
/// the last four tokens' latest occurrence can be the other one, whose guess soon fails. In
/// SmolLM2's answer to bench-speculate.py's edit task, the latest 4-gram's guess broke within
/// its first four tokens at 5 of the first 11 steps of the code it copied; the longest match's
/// guess was right for all 16 tokens at each of them.
pub(crate) fn draft<T: PartialEq>(history: &[T], max: usize) -> Guess<'_, T> {
    let none = Guess {
        tokens: &[],
        matched: 0,
    };
    let (Some(last), true) = (history.last(), max > 0) else {
        return none;
    };
    let n = history.len();
    // (matched, end): an occurrence ending before `end`, so at least one token follows it.
    let mut best = (0, 0);
    for end in (1..n).rev() {
        if history[end - 1] != *last {
            continue;
        }
        let before = history[..end - 1].iter().rev();
        let matched = 1 + before
            .zip(history[..n - 1].iter().rev())
            .take(MATCH_MAX - 1)
            .take_while(|(a, b)| a == b)
            .count();
        if matched > best.0 {
            best = (matched, end);
            if matched == MATCH_MAX {
                break;
            }
        }
    }
    let (matched, from) = best;
    if matched < MATCH_MIN {
        return none;
    }
    Guess {
        tokens: &history[from..(from + max).min(n)],
        matched,
    }
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
    /// Nothing known yet, not even an even chance.
    const NONE: Self = Self {
        accepted: 0.0,
        rejected: 0.0,
    };

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

/// What a sequence's guesses gave lately, by the length of the match each came from; the
/// chance a guess's tokens are taken ([`Record::rate`]).
///
/// The longer the answer has followed the earlier text, the likelier it goes on doing so. In
/// SmolLM2's greedy answers to bench-speculate.py's three tasks (backstop's and
/// llama-server's), the first token of the longest match's guess was taken 59-76% of the time
/// after a match of 2 or 3 tokens, 71-94% after 4, 85-89% after 5 to 8, 93-97% after 9 to 16
/// and 96-99% after more (Gemma 3's: 80-100% throughout). A match of m tokens is counted as m
/// taken tokens against one rejected, m/(m+1): 0.67 for 2, 0.8 for 4, 0.9 for 9.
///
/// A short match (under [`Record::LONG`]) gets at most that, and no more than the answer's
/// recent guesses, whatever their matches: once a copy ends, the short matches that follow
/// are not drafted on the strength of the copy before them. For a long match, m/(m+1) is
/// what is expected before anything is known, weighed as four tokens against the answer's own
/// record of long matches, which starts empty: a copy starts paying as soon as it is a few
/// tokens long, not after a watched guess was all taken (16 plain steps, on SmolLM2, where
/// drafting needs a chance of about 0.9), however the answer's first, short guesses went
/// ("```python" matched, then other code); and where long matches keep failing (a story
/// repeating a phrase, then going on otherwise), the record soon outweighs their length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Record {
    recent: Acceptance,
    long: Acceptance,
}

impl Default for Record {
    fn default() -> Self {
        Self {
            recent: Acceptance::default(),
            long: Acceptance::NONE,
        }
    }
}

impl Record {
    /// The shortest long match: the longest the lookup looked for before it measured matches.
    pub(crate) const LONG: usize = 4;
    /// How many taken or rejected tokens a long match's m/(m+1) weighs against the answer's
    /// record of long matches.
    const PRIOR_WEIGHT: f64 = 4.0;

    /// Learns from one verification of a guess from a `matched`-token match: `accepted` of
    /// `drafted` tokens taken.
    ///
    /// A guess's j-th token is checked after the j before it were taken, so it follows a match
    /// of `matched` + j tokens: the tokens that followed a long match count in the long record
    /// whatever match the guess started from. A story that went on to repeat 29 tokens of
    /// itself was watched from a 3-token match, all 16 of the watched guess's tokens taken;
    /// counted as a short match's, that taught the long record nothing, and the 19- to
    /// 29-token matches that followed were not drafted (their chance stayed at 0.75, from two
    /// earlier failures).
    pub(crate) fn record(&mut self, matched: usize, drafted: usize, accepted: usize) {
        self.recent.record(drafted, accepted);
        let short = Self::LONG.saturating_sub(matched);
        if accepted >= short && drafted > short {
            self.long.record(drafted - short, accepted - short);
        }
    }

    /// The chance that a token of a guess from a `matched`-token match is taken, given the
    /// one before it was.
    pub(crate) fn rate(&self, matched: usize) -> f64 {
        let m = matched as f64;
        if matched < Self::LONG {
            return self.recent.rate().min(m / (m + 1.0));
        }
        let Acceptance { accepted, rejected } = self.long;
        let prior = Self::PRIOR_WEIGHT;
        (accepted + prior * m / (m + 1.0)) / (accepted + rejected + prior)
    }
}

/// A draft found but not checked, because drafting did not pay: the tokens the answer then
/// picks tell whether it would have been taken, so a sequence's [`Acceptance`] is learnt at no
/// cost while it does not draft, and drafting starts as soon as the answer starts to copy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shadow<T> {
    draft: Vec<T>,
    hits: usize,
    /// The length of the match the draft came from.
    matched: usize,
}

impl<T> Default for Shadow<T> {
    fn default() -> Self {
        Self {
            draft: Vec::new(),
            hits: 0,
            matched: 0,
        }
    }
}

impl<T: PartialEq + Clone> Shadow<T> {
    /// Watches `guess` against the tokens that follow, unless one is being watched.
    pub(crate) fn watch(&mut self, guess: Guess<'_, T>) {
        if self.draft.is_empty() {
            self.draft.extend_from_slice(guess.tokens);
            self.hits = 0;
            self.matched = guess.matched;
        }
    }

    /// Stops watching (the sequence drafts for real).
    pub(crate) fn clear(&mut self) {
        self.draft.clear();
        self.hits = 0;
    }

    /// The answer's next token. Once the draft is settled (a token differs, or all matched),
    /// what checking it would have given: the match it came from, tokens drafted and taken.
    pub(crate) fn next(&mut self, token: &T) -> Option<(usize, usize, usize)> {
        let expected = self.draft.get(self.hits)?;
        if expected == token {
            self.hits += 1;
            if self.hits < self.draft.len() {
                return None;
            }
        }
        let settled = (self.matched, self.draft.len(), self.hits);
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
    /// Until a decode of more rows has been measured, each extra row is guessed to cost this
    /// share of the nearest count below measured: low, so that drafting is tried and then
    /// measured.
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

    /// The expected seconds of a decode of `rows` rows: measured, or else guessed from the
    /// nearest count below measured ([`RowCosts::GUESS_PER_ROW`]), but no dearer than the
    /// line to the nearest count above measured. `None` before any decode of at most `rows`
    /// was measured.
    ///
    /// Guessed low, not interpolated: a count that is never drafted is never measured, and
    /// the kernels' cost is not a line between counts. On Gemma 3 (2-core Xeon) a decode of
    /// 12 rows took 70 ms, 16 rows 87 ms and 17 rows 114 ms; with 12 and 17 measured, the
    /// line put 16 at 105 ms, so every long draft stopped at 11 tokens (5.8 ms a token
    /// against 5.4), and a quoted passage came 5% slower than with 16 measured.
    pub(crate) fn estimate(&self, rows: usize) -> Option<f64> {
        let rows = rows.min(MAX_ROWS);
        let below = (1..=rows)
            .rev()
            .find_map(|r| self.by_rows[r].map(|c| (r, c)))?;
        if below.0 == rows {
            return Some(below.1);
        }
        let guess = below.1 * (1.0 + Self::GUESS_PER_ROW * (rows - below.0) as f64);
        let above = (rows + 1..=MAX_ROWS).find_map(|r| self.by_rows[r].map(|c| (r, c)));
        Some(match above {
            Some((r1, c1)) => {
                let (r0, c0) = below;
                guess.min(c0 + (c1 - c0) * (rows - r0) as f64 / (r1 - r0) as f64)
            }
            None => guess,
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

    fn guess(history: &[i32], max: usize) -> (&[i32], usize) {
        let g = draft(history, max);
        (g.tokens, g.matched)
    }

    #[test]
    fn the_occurrence_matching_the_most_gives_the_draft() {
        // "1 2 3 4" occurs at 0 and at 6 (followed by 8 9 there); the history ends in it, and
        // both earlier ones match 4 tokens: the latest gives the guess.
        let h = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 8, 9, 1, 2, 3, 4];
        assert_eq!(guess(&h, 3), (&[8, 9, 1][..], 4));
        assert_eq!(
            guess(&h, 10),
            (&[8, 9, 1, 2, 3, 4][..], 4),
            "up to the end of the history"
        );
        assert_eq!(guess(&h, 0), (&[][..], 0));
        // Only the last two tokens (7 3) occurred before.
        let h = [7, 3, 5, 5, 9, 7, 3];
        assert_eq!(guess(&h, 4), (&[5, 5, 9, 7][..], 2));
        // A longer match wins over a later, shorter one: 1 2 3 at 0 against 2 3 at 5.
        let h = [1, 2, 3, 6, 0, 2, 3, 7, 1, 2, 3];
        assert_eq!(guess(&h, 1), (&[6][..], 3));
        // However far back the longer match goes: 9 1 2 3 4 (then 5) against a later
        // 1 2 3 4 (then 7), as a copied definition against a later call of it.
        let h = [9, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 7, 0, 9, 1, 2, 3, 4];
        assert_eq!(guess(&h, 2), (&[5, 0][..], 5));
        // The tail itself is no match; nothing occurred before; too short to match; a single
        // token is too short a match.
        assert_eq!(guess(&[1, 2, 3, 4], 4), (&[][..], 0));
        assert_eq!(guess(&[5], 4), (&[][..], 0));
        assert_eq!(guess(&[], 4), (&[][..], 0));
        assert_eq!(guess(&[4, 8, 1, 4], 4), (&[][..], 0));
        // A repeated token: the tail 5 5 5 5 last occurred one position back.
        assert_eq!(guess(&[5, 5, 5, 5, 5], 3), (&[5][..], 4));
    }

    #[test]
    fn a_match_is_measured_up_to_its_cap() {
        // A 100-token stretch, then the same stretch again: the match stops at the cap, and
        // the first of the matching occurrences (the latest) gives the guess.
        let stretch: Vec<i32> = (0..100).collect();
        let h: Vec<i32> = [&stretch[..], &[-1], &stretch[..]].concat();
        let (tokens, matched) = guess(&h, 3);
        assert_eq!((tokens, matched), (&[-1, 0, 1][..], MATCH_MAX));
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
    fn a_guess_s_chance_follows_its_match_and_the_answer_s_record() {
        let fresh = Record::default();
        // A short match: at most m/(m+1), and no more than the recent record (even, at first).
        assert!((fresh.rate(2) - 0.5).abs() < 1e-12);
        assert_eq!(fresh.rate(0), 0.0);
        // A long one, with no long guess checked yet: m/(m+1).
        assert!((fresh.rate(4) - 0.8).abs() < 1e-12);
        assert!((fresh.rate(9) - 0.9).abs() < 1e-12);
        // The answer's first guess failed at once, from a short match ("```python", then
        // other code): its long matches are trusted as before.
        let mut start = Record::default();
        start.record(2, 7, 0);
        assert!(start.rate(2) < 0.3, "{}", start.rate(2));
        assert!((start.rate(9) - 0.9).abs() < 1e-12);
        // Copying: long guesses all taken. Right after the copy ends, a short match is not
        // drafted on the strength of it; a long one is.
        let mut copying = Record::default();
        for _ in 0..5 {
            copying.record(30, 8, 8);
        }
        copying.record(64, 8, 3);
        assert!((copying.rate(2) - 2.0 / 3.0).abs() < 1e-12);
        assert!((copying.rate(3) - 0.75).abs() < 1e-12);
        assert!(copying.rate(4) > 0.9, "{}", copying.rate(4));
        // Long matches that keep failing (a story repeating a phrase, then going on
        // otherwise) outweigh what their length alone says.
        let mut story = Record::default();
        for _ in 0..3 {
            story.record(4, 3, 3);
            story.record(8, 3, 0);
        }
        assert!(story.rate(4) < 0.75, "{} against 0.8", story.rate(4));
        assert!(story.rate(8) < 0.82, "{} against 0.89", story.rate(8));
        // A guess from a short match that goes on being taken is a long match from its
        // second or third token on: the story starts to repeat a passage, watched from a
        // 3-token match, all 16 taken.
        let mut repeat = story;
        repeat.record(3, 16, 16);
        assert!(repeat.rate(19) > 0.9, "{}", repeat.rate(19));
        // Where it broke before the match grew long, the long record learns nothing; where it
        // broke after, the failure is a long match's.
        let mut broke = story;
        broke.record(2, 16, 1);
        assert_eq!(broke.rate(8), story.rate(8));
        broke.record(2, 16, 2);
        assert!(broke.rate(8) < story.rate(8), "{}", broke.rate(8));
    }

    #[test]
    fn a_shadow_draft_settles_as_checking_it_would_have() {
        let guess = |tokens, matched| Guess { tokens, matched };
        let mut s = Shadow::default();
        assert_eq!(s.next(&1), None, "nothing watched");
        s.watch(guess(&[1, 2, 3], 2));
        s.watch(guess(&[9, 9], 5)); // one at a time
        assert_eq!((s.next(&1), s.next(&2)), (None, None));
        assert_eq!(s.next(&3), Some((2, 3, 3)), "all taken");
        assert_eq!(s.next(&4), None, "settled: no longer watched");
        s.watch(guess(&[5, 6, 7], 7));
        assert_eq!(s.next(&5), None);
        assert_eq!(s.next(&0), Some((7, 3, 1)), "broken at the second");
        s.watch(guess(&[8], 2));
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

    /// Every count from the first point's to the last measured, on the lines between them.
    fn measured(points: &[(usize, f64)]) -> RowCosts {
        let mut every = Vec::new();
        for w in points.windows(2) {
            let ((r0, c0), (r1, c1)) = (w[0], w[1]);
            every
                .extend((r0..r1).map(|r| (r, c0 + (c1 - c0) * (r - r0) as f64 / (r1 - r0) as f64)));
        }
        every.extend(points.last());
        costs(&every)
    }

    #[test]
    fn costs_are_measured_or_guessed_low() {
        let c = costs(&[(1, 0.010), (9, 0.030)]);
        assert_eq!(c.estimate(1), Some(0.010));
        // Between two measured counts: 2% a row over the one below, until tried.
        assert!((c.estimate(5).unwrap_or(0.0) - 0.0108).abs() < 1e-12);
        // No dearer than the line to the one above.
        let c = costs(&[(1, 0.010), (3, 0.010)]);
        assert!((c.estimate(2).unwrap_or(0.0) - 0.010).abs() < 1e-12);
        let c = costs(&[(1, 0.010), (9, 0.030)]);
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
        // Measured on the 2-core Xeon at depth 512 (`backstop bench -p 1,2,3,5,9,17 -n 0`), and
        // the counts between taken as on the line.
        let smollm2 = measured(&[
            (1, 0.0111),
            (2, 0.0168),
            (3, 0.0189),
            (5, 0.0269),
            (9, 0.0414),
            (17, 0.0718),
        ]);
        let gemma = measured(&[
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
        // So is a count between two measured ones, until it has been measured itself: up to 12
        // and 17 rows measured (Gemma 3, 70 and 114 ms), 16 is tried, and kept when it costs less
        // a token than 12 (87 ms).
        let mut gemma = measured(&[(1, 0.020), (12, 0.070)]);
        gemma.record(17, 0.114, true);
        assert_eq!(choose(&gemma, 1, 1.0, 15, 0.99, 0), 15);
        gemma.record(16, 0.087, true);
        assert_eq!(choose(&gemma, 1, 1.0, 15, 0.99, 0), 15);
        gemma.record(16, 0.2, true);
        gemma.record(16, 0.2, true);
        // Measured dear, 16 is dropped, and the untried counts below it are tried in turn.
        assert_eq!(choose(&gemma, 1, 1.0, 15, 0.99, 0), 14);
    }

    #[test]
    fn a_request_s_fewest_skips_shorter_guesses_and_floors_longer_ones() {
        let smollm2 = measured(&[(1, 0.006), (9, 0.042), (17, 0.072)]);
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
