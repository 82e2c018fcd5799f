//! Scheduling policy, kept pure so it can be tested without a model: which waiting request
//! gets which slot, and how one decode step's token budget is split between sequences that
//! generate and prompts that are still being read.

/// A prompt segment still to read: its rows left, and the rows a chunk of it holds unless
/// it is the rest of it.
pub(crate) type Segment = (usize, usize);

/// A slot as the policy sees it at the start of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// No request.
    Free,
    /// Prompt tokens still to be evaluated. `admitted` orders slots: lower came first.
    Prefill {
        /// The prompt's segments not yet wholly in the KV cache (see [`segment_starts`]), in
        /// order: the rows each has left to read, and the rows a chunk of it holds unless it
        /// is the rest of it ([`Grain`]). A chunk never runs into the next segment.
        segments: Vec<Segment>,
        /// Admission sequence number.
        admitted: u64,
    },
    /// Generating one token per step.
    Decode {
        /// False while the client's channel is full: the sequence sits this step out instead
        /// of making every other sequence wait for a slow reader.
        can_emit: bool,
    },
}

/// Token budget of one step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Most tokens one `llama_decode` call may take (the context's `n_batch`).
    pub(crate) batch: usize,
    /// Most prompt tokens per step while other sequences are generating, so a long prompt
    /// is read in chunks between their tokens instead of freezing them.
    pub(crate) prefill_chunk: usize,
    /// How prompt rows are grouped ([`MATMUL_GRAIN`] or [`FLASH_GRAIN`]).
    pub(crate) grain: Grain,
}

/// How prompt rows are grouped so that a warm read computes what a cold read computes:
/// llama.cpp's CPU kernels round differently for a handful of rows than for many. A cold
/// read takes a prompt segment by segment (see [`segment_starts`]), each in chunks that start
/// on multiples of `align` positions from the segment's start; a segment of at least `tile`
/// rows is read with flash attention's query tiles, in chunks of at least `tile` rows, and a
/// shorter one row by row, in chunks of at least `span` rows (or whole). A warm read reuses a
/// cached prefix only where its rows went through the same kernels, in the same groups, and
/// reads the rest as the cold read would: a seeded answer does not depend on what the slot
/// held before. Sampled requests without a seed reuse all they can instead (see [`Reuse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grain {
    /// Repacked weights (Q4_0, Q4_K, IQ4_NL on AVX2, AVX-512 or NEON) multiply rows in groups
    /// counted from a batch's first row: 16 at a time with AVX-512 (`ggml_gemm_q4_K_8x8_q8_K`
    /// on x86), then 4 at a time, the rest one by one. Chunks and reuse keep to multiples of
    /// 16 from a segment's start, so every row lands in the same kind of group.
    pub(crate) align: usize,
    /// Matrix products switch from vector dot products to tiled GEMM at 2 rows
    /// (`llamafile_sgemm` refuses one); a chunk holds at least this many rows.
    pub(crate) span: usize,
    /// Flash attention's CPU kernel switches to query tiles at 64 rows (`GGML_FA_TILE_Q`),
    /// and computes each row alike in either kernel whatever else the chunk holds; `None`
    /// without flash attention, where every other operation works row by row.
    pub(crate) tile: Option<usize>,
    /// No weight is repacked ([`Grain::row_wise`]): beyond the kernel switches above, every
    /// row comes out the same whatever else its chunk holds, so neighbouring segments read
    /// with the same kernels are read as one (see [`join_segments`]) and reuse may end on
    /// any row.
    pub(crate) joins: bool,
}

/// The grain without flash attention. Checked on this project's 2-core AVX-512 machine by
/// comparing 30 random greedy warm answers per model with cold ones: with `align` 4 it matched
/// every one on SmolLM2 (Q4_1) and Gemma 3 (Q4_K, repacked); with `align` 1, 8 of 30 Gemma
/// answers changed. A sampled Gemma follow-up whose reuse ended 4 rows into a segment (rows a
/// 5-row chunk had multiplied 4 at a time, a cold read 16 at a time) did not match its cold
/// answer; with `align` 16 it does.
pub(crate) const MATMUL_GRAIN: Grain = Grain {
    align: 16,
    span: 4,
    tile: None,
    joins: false,
};

/// The grain with flash attention (or when llama.cpp decides whether to use it). The same
/// check, 40 random warm answers per model with flash attention on: all matched when warm
/// chunks kept the cold read's kernel; with a 4-row chunk where the cold read had tiles, 17
/// of 30 Gemma answers and 23 of 30 SmolLM2 answers changed.
pub(crate) const FLASH_GRAIN: Grain = Grain {
    align: 16,
    span: 4,
    tile: Some(64),
    joins: false,
};

/// The shortest segment: a control token closer than this to the previous segment's start
/// starts no new one (a chat turn's end and the next one's start stay together), so a cold
/// read takes few extra passes over the weights. Further in, a segment is at least half as
/// long as the prompt before it: a conversation of 80 short turns (1,692 tokens) is read in
/// 11 segments, not 81, mostly with query tiles (81 made its cold read 47% slower on the
/// 2-core machine), while a system turn and the question after it still get their own.
pub(crate) const MIN_SEGMENT: usize = 16;

/// Where a cold read of a prompt starts a new chunk whatever the budget: position 0 and
/// every control token (a chat template's turn markers, `control[i]` for token `i`) at least
/// [`MIN_SEGMENT`] positions, and half the previous start's position, after the previous
/// start. The starts below any position depend
/// only on the tokens before it, so two prompts agree on them up to where they differ: a
/// follow-up turn, or another question under the same system prompt, reuses the segments
/// before its own, and reads its question in a short segment, row by row, instead of
/// leaving a whole tile to read.
pub(crate) fn segment_starts(control: impl IntoIterator<Item = bool>) -> Vec<usize> {
    let mut starts = vec![0];
    for (i, c) in control.into_iter().enumerate() {
        let last = starts[starts.len() - 1];
        if c && i >= last + MIN_SEGMENT.max(last / 2) {
            starts.push(i);
        }
    }
    starts
}

/// A prompt's segments: their starts (0 first) and the prompt's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout<'a> {
    /// Ascending segment starts, from [`segment_starts`].
    pub(crate) starts: &'a [usize],
    /// Prompt tokens.
    pub(crate) len: usize,
}

impl Layout<'_> {
    /// The segment holding row `r`: its start and end.
    pub(crate) fn segment(&self, r: usize) -> (usize, usize) {
        let i = self.starts.partition_point(|&s| s <= r).max(1) - 1;
        let start = self.starts.get(i).copied().unwrap_or(0);
        let end = self.starts.get(i + 1).copied().unwrap_or(self.len);
        (start, end)
    }

    fn starts_at(&self, r: usize) -> bool {
        self.starts.binary_search(&r).is_ok()
    }

    /// The segments a read that has reached row `at` has left, for [`SlotState::Prefill`]:
    /// the rows each still has to read and the rows a chunk of it holds.
    pub(crate) fn rest(&self, at: usize, grain: Grain) -> Vec<Segment> {
        let first = self.starts.partition_point(|&s| s <= at).max(1) - 1;
        let starts = self.starts.get(first..).unwrap_or_default();
        let ends = starts.iter().skip(1).chain([&self.len]);
        starts
            .iter()
            .zip(ends)
            .map(|(&start, &end)| (end - start.max(at), grain.least(end - start)))
            .collect()
    }
}

/// `n` rounded down to a multiple of the grain's alignment.
fn aligned(n: usize, grain: Grain) -> usize {
    n / grain.align * grain.align
}

/// Where a cold read starts a new chunk once neighbouring segments that the same kernels
/// read are joined ([`Grain::joins`]): a segment of at least `span` rows that is not tiled
/// joins the one before it when that one (with whatever it already joined) is not tiled
/// either and the two together stay shorter than a tile, so no chunk of them is tiled. A
/// chat prompt's last turn marker then goes with its question: on SmolLM2 a bench request
/// (a 77-token prompt) is read in one call after its shared prefix, as llama.cpp's server
/// reads it, instead of two. Whether a start is kept depends only on the segments up to the
/// next one, so two prompts that agree up to a start agree on the joined starts before it.
pub(crate) fn join_segments(starts: Vec<usize>, len: usize, grain: Grain) -> Vec<usize> {
    if !grain.joins {
        return starts;
    }
    let mut out = Vec::with_capacity(starts.len());
    // The start of the group being built, while every segment in it may take another.
    let mut open: Option<usize> = None;
    let ends = starts.iter().skip(1).copied().chain([len]);
    for (&start, end) in starts.iter().zip(ends) {
        let joinable = end - start >= grain.span && !grain.tiled(end - start);
        if joinable && open.is_some_and(|g| !grain.tiled(end - g)) {
            continue;
        }
        out.push(start);
        open = joinable.then_some(start);
    }
    out
}

impl Grain {
    /// The smallest decode that lets a cold read cut every segment into chunks that each
    /// hold its kernel's rows ([`exact_chunk`]): twice a query tile with flash attention, else
    /// twice an aligned group. Below it a segment a little longer than the batch is read as
    /// one tiled chunk and a short tail row by row (124 rows under a batch of 100: 100 and
    /// 24), while a warm read that reuses 60 of them reads the last 64 in one tiled call, so
    /// the two answers differ; the server raises a smaller batch to this. (A batch under one
    /// tile is safe, as every chunk of a tiled segment is then read row by row and never
    /// reused, but the one rule is simpler to state.)
    pub(crate) fn least_batch(self) -> usize {
        2 * self.tile.unwrap_or(0).max(self.align).max(self.span)
    }

    /// This grain for a model none of whose weights are repacked on this machine: reuse and
    /// chunks may start on any row, and segments read with the same kernels join.
    pub(crate) fn row_wise(self) -> Grain {
        Grain {
            align: 1,
            joins: true,
            ..self
        }
    }

    /// A segment of `rows` rows is read with flash attention's query tiles.
    fn tiled(self, rows: usize) -> bool {
        self.tile.is_some_and(|t| rows >= t)
    }

    /// Rows a chunk of a segment of `rows` rows holds, unless it is the whole segment.
    pub(crate) fn least(self, rows: usize) -> usize {
        match self.tile {
            Some(t) if rows >= t => t,
            _ => self.span,
        }
    }

    /// The longest prefix of the `new` prompt a reproducible request may reuse, when it shares
    /// `shared` tokens with a cache whose first `exact` rows were read as a cold read of the
    /// `cached` prompt reads them: up to a segment start both prompts have, or inside a
    /// segment both start at and read with the same kernel, on an aligned position that
    /// leaves the rest of the segment as many rows as a chunk of it holds. At least one row is
    /// left to read, for fresh logits.
    pub(crate) fn exact_reuse(
        self,
        cached: Layout<'_>,
        new: Layout<'_>,
        shared: usize,
        exact: usize,
    ) -> usize {
        let limit = shared
            .min(exact)
            .min(cached.len)
            .min(new.len.saturating_sub(1));
        if self.joins {
            return self.row_wise_reuse(cached, new, limit);
        }
        let mut best = 0;
        for &s in new.starts.iter().take_while(|&&s| s <= limit) {
            if !cached.starts_at(s) {
                continue;
            }
            // Every segment before `s` ends at `s` in both prompts.
            best = best.max(s);
            let (_, end_new) = new.segment(s);
            let (_, end_cached) = cached.segment(s);
            if self.tiled(end_new - s) != self.tiled(end_cached - s) {
                continue;
            }
            let room = end_new.saturating_sub(self.least(end_new - s));
            let top = limit.min(end_cached).min(room);
            if top > s {
                best = best.max(s + aligned(top - s, self));
            }
        }
        best
    }

    /// [`Grain::exact_reuse`] when rows are independent of their chunk ([`Grain::joins`]): a
    /// row is reused when both prompts' cold reads put it through the same kernels (a tiled
    /// segment or not, a segment of at least `span` rows or not), every row before it too,
    /// and the new prompt's read then goes on as its cold read would: from one of its segment
    /// starts, or inside a segment leaving a chunk's worth of it. So a follow-up turn reuses
    /// everything up to its own turn even where the previous prompt joined its last turn
    /// marker with its question.
    fn row_wise_reuse(self, cached: Layout<'_>, new: Layout<'_>, limit: usize) -> usize {
        let kernel = |layout: Layout<'_>, r: usize| {
            let (s, e) = layout.segment(r);
            (self.tiled(e - s), e - s >= self.span)
        };
        // Kernels only change at segment starts: check the rows from each start of either.
        let mut bounds: Vec<usize> = cached.starts.iter().chain(new.starts).copied().collect();
        bounds.sort_unstable();
        bounds.dedup();
        let same = bounds
            .iter()
            .take_while(|&&r| r < limit)
            .find(|&&r| kernel(cached, r) != kernel(new, r))
            .map_or(limit, |&r| r);
        let (start, end) = new.segment(same);
        let inside = end.saturating_sub(self.least(end - start)).min(same);
        inside.max(start)
    }

    /// Rows `start..end` of a prompt laid out as `layout`, read alone in their step, come out
    /// as a cold read's: the chunk stays in one segment, starts and ends on aligned positions
    /// from the segment's start (or ends with it), and uses the segment's kernel with enough
    /// rows.
    pub(crate) fn reads_exactly(self, layout: Layout<'_>, start: usize, end: usize) -> bool {
        let (s, e) = layout.segment(start);
        let rows = end.saturating_sub(start);
        let whole = start == s && end == e;
        end <= e
            && (start - s).is_multiple_of(self.align)
            && (end == e || (end - s).is_multiple_of(self.align))
            && (rows >= self.least(e - s) || whole)
    }
}

/// How much of a slot's cache a request may reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reuse {
    /// A seeded or greedy request asks for a reproducible answer: only prefix rows read
    /// exactly, up to an aligned boundary that leaves at least a span to read (see [`Grain`]).
    Exact,
    /// A sampled answer without a seed is different every time anyway: it takes the longest
    /// shared prefix, leaving one token to read for fresh logits, as llama.cpp's own server
    /// does, so its first token comes sooner (a shared system prompt or the previous turns are
    /// never read twice).
    Fast,
    /// The client asked for no reuse (llama.cpp server's `cache_prompt: false`): the whole
    /// prompt is read, as a fresh server reads it.
    Cold,
}

/// The cache of a model's sliding-window layers when it keeps their window, not the whole
/// context (llama.cpp's default; `--swa-full` turns it off): each sequence has `cells` cells
/// there, and once it is longer, each new position writes over the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// How many positions back a sliding-window layer attends (the GGUF's
    /// `ARCH.attention.sliding_window`).
    pub(crate) span: usize,
    /// Cells per sequence in those layers' cache.
    pub(crate) cells: usize,
}

/// What a slot's sequence holds in the KV cache, as llama.cpp reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    /// Its oldest position: 0 until a sliding window wrote over the start.
    pub(crate) first: usize,
    /// One past its newest position.
    pub(crate) end: usize,
    /// Every position sits in the sliding-window cell a cold read puts it in (see
    /// [`Window::holds`]).
    pub(crate) ordered: bool,
}

impl Default for Held {
    fn default() -> Self {
        Self {
            first: 0,
            end: 0,
            ordered: true,
        }
    }
}

impl Window {
    /// Whether a sequence trimmed to `keep` positions still holds what reading on from there
    /// needs, under `reuse`. Without a window, or before the window wrote over anything, it
    /// does. After that, a layer reading on at `keep` needs the `span` positions before it,
    /// which is what llama.cpp's server checks, and what an answer sampled without a seed gets.
    ///
    /// A reproducible answer also needs the cells in the order a cold read leaves them, since
    /// attention sums the cells in cell order and another order could change the last bits.
    /// llama.cpp (`find_slot` in `llama-kv-cache.cpp`, at the pinned version) puts each new
    /// position in the next cell that is free or out of every window, from where the last
    /// write ended or from the lowest cell a removal freed. From empty, with batches of at
    /// most `cells - span` rows, that puts position p in cell p mod `cells`, and so does every
    /// later read, unless a removal frees cells on both sides of the last cell: llama.cpp then
    /// goes on from cell 0 instead of the cell of `keep`. The slot remembers
    /// (`Held::ordered`) whether a removal did that since it was last emptied.
    /// `scripts/check-reuse.py` compares warm and cold answers; with this rule relaxed, the
    /// prompt's last logits differed from a cold read's in exactly the turns it refuses.
    pub(crate) fn holds(window: Option<Self>, held: Held, keep: usize, reuse: Reuse) -> bool {
        if held.first == 0 {
            return true;
        }
        let Some(w) = window else {
            return false;
        };
        let spanned = held.first + w.span <= keep;
        match reuse {
            Reuse::Fast => spanned,
            Reuse::Exact => spanned && held.ordered && w.trim_keeps_order(keep, held.end),
            Reuse::Cold => false,
        }
    }

    /// Whether removing positions `keep..end` frees one run of cells, so the next position
    /// goes to its own cell (see [`Window::holds`]).
    pub(crate) fn trim_keeps_order(self, keep: usize, end: usize) -> bool {
        keep >= end || keep / self.cells == (end - 1) / self.cells
    }
}

/// What one step evaluates.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct StepPlan {
    /// Slots that decode their last sampled token.
    pub(crate) decode: Vec<usize>,
    /// Slots that evaluate this many more prompt tokens, oldest admission first; a slot
    /// appears once per segment it reads this step, in order.
    pub(crate) prefill: Vec<(usize, usize)>,
    /// The decoding slots draft nothing (`--speculate`): a step timed to choose how they
    /// decode ([`crate::engine::depths::DepthSplit::measuring`]).
    pub(crate) plain: bool,
}

impl StepPlan {
    /// True when there is nothing to evaluate.
    pub(crate) fn is_empty(&self) -> bool {
        self.decode.is_empty() && self.prefill.is_empty()
    }

    /// Every slot the step touches: generating ones first, then prompts.
    pub(crate) fn slots(&self) -> Vec<usize> {
        self.decode
            .iter()
            .copied()
            .chain(self.prefill.iter().map(|p| p.0))
            .collect()
    }
}

/// Splits one step's budget. Every generating sequence that can emit advances by one token;
/// what is left goes to prompts first-come first-served, so the oldest prompt finishes
/// (and shows its first token) soonest. While anything is generating, prompt tokens are
/// capped at `prefill_chunk` per step.
pub(crate) fn plan_step(slots: &[SlotState], budget: Budget) -> StepPlan {
    let mut plan = StepPlan::default();
    for (i, s) in slots.iter().enumerate() {
        if let SlotState::Decode { can_emit: true } = s {
            plan.decode.push(i);
        }
    }
    let decoding = slots.iter().any(|s| matches!(s, SlotState::Decode { .. }));
    let cap = if decoding {
        budget.prefill_chunk
    } else {
        budget.batch
    };
    let mut left = budget.batch.saturating_sub(plan.decode.len()).min(cap);

    let mut prefilling: Vec<(u64, usize, &[Segment])> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            SlotState::Prefill { segments, admitted } => Some((*admitted, i, segments.as_slice())),
            _ => None,
        })
        .collect();
    prefilling.sort_unstable_by_key(|&(admitted, i, _)| (admitted, i));
    // A prompt goes on into its next segment while the budget lasts, so the oldest one
    // finishes (and shows its first token) before the next starts. Only the step's first
    // chunk is cut to the budget: a later segment that does not fit whole waits for the next
    // step, which it starts, rather than being read in two calls. Every call costs flash
    // attention whole query tiles where a chunk or a head ends mid-tile (and the threads a
    // wait for the slower one), so on the 2-core machine a 1,692-token conversation read in
    // 14 calls took about 20% longer than in the 4 calls of 512 rows it took before segments.
    'prompts: for (_, i, segments) in prefilling {
        for &(remaining, least) in segments.iter().filter(|s| s.0 > 0) {
            if left == 0 || (remaining > left && !plan.prefill.is_empty()) {
                break 'prompts;
            }
            let n = exact_chunk(remaining, remaining.min(left), least, budget.grain);
            plan.prefill.push((i, n));
            left -= n;
            if n < remaining {
                continue 'prompts;
            }
        }
    }
    plan
}

/// Shapes a chunk of `n` prompt rows out of the `remaining` rows of a segment whose chunks
/// hold at least `least`: unless it is the last, it ends on an aligned position, and it does
/// not leave fewer than `least` behind, as long as it keeps that many itself; the last chunk
/// of a long segment is then as exact as the others.
fn exact_chunk(remaining: usize, n: usize, least: usize, grain: Grain) -> usize {
    if n >= remaining {
        return n;
    }
    let shorter = aligned(remaining.saturating_sub(least), grain);
    if remaining - n < least && shorter >= least {
        return shorter;
    }
    match aligned(n, grain) {
        0 => n,
        a => a,
    }
}

/// Paces prompt chunks by measured cost: while sequences generate, a step may hold only as
/// many prompt tokens as keep it within [`GAP_FACTOR`] times a plain decode step, so their
/// inter-token gaps stay bounded whatever the hardware (on a 2-core CPU a 128-token chunk
/// costs ten decode steps; on a GPU hundreds of tokens cost almost nothing). The configured
/// `prefill_chunk` stays the upper bound, and until both costs have been seen it is the chunk.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Pace {
    /// Seconds per step that only decodes (moving average).
    decode_step: Option<f64>,
    /// Seconds spent on prompt rows beyond the decode work of the same steps, and those rows,
    /// both decaying by [`SMOOTHING`] per step: their ratio is the cost of a row, weighted by
    /// rows, so that a call's fixed cost spread over a few rows does not pass for the cost of
    /// every row. On an H200 the first 19-row call of a run took 19.5 ms and later 487-row
    /// calls 12-16 ms; averaged per call, the first made rows look 30 times dearer for a
    /// dozen calls, and prompts went in 48-row pieces.
    prompt_secs: f64,
    prompt_rows: f64,
}

/// How much longer than a plain decode step a step with a prompt chunk may take.
pub(crate) const GAP_FACTOR: f64 = 3.0;
/// How long a step with a prompt chunk may take however fast plain decode steps are, in
/// seconds. On a GPU a decode step takes a millisecond or two, and three of them let a
/// prompt in a few dozen tokens at a time, each piece its own llama.cpp call of a few
/// milliseconds: on an H200, four clients arriving at once waited 230 ms for their first
/// tokens (llama-server: 90) and their aggregate came to 0.3x llama-server's. A stream that
/// pauses this long at 500 tokens a second loses nothing a reader sees; on a CPU, where a
/// decode step takes 8 ms or more, three of them come to about this anyway.
pub(crate) const MIN_GAP: f64 = 0.025;
/// The smallest chunk, so a long prompt always makes headway.
pub(crate) const MIN_CHUNK: usize = 16;
/// Weight of the newest sample in the moving averages.
const SMOOTHING: f64 = 0.2;

fn blend(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o + SMOOTHING * (new - o))
}

impl Pace {
    /// Learns from one step: `decoded` generating sequences and `prompt` prompt tokens took
    /// `secs`.
    pub(crate) fn record(&mut self, decoded: usize, prompt: usize, secs: f64) {
        if prompt == 0 && decoded > 0 {
            self.decode_step = Some(blend(self.decode_step, secs));
        } else if prompt >= MIN_CHUNK {
            let decode_part = if decoded > 0 {
                self.decode_step.unwrap_or(0.0)
            } else {
                0.0
            };
            let rows = prompt as f64;
            let keep = 1.0 - SMOOTHING;
            self.prompt_secs = keep * self.prompt_secs + (secs - decode_part).max(1e-7 * rows);
            self.prompt_rows = keep * self.prompt_rows + rows;
        }
    }

    /// Seconds per prompt row beyond a decode step's work, once one was measured.
    fn prompt_token(&self) -> Option<f64> {
        (self.prompt_rows > 0.0).then(|| self.prompt_secs / self.prompt_rows)
    }

    /// How many prompt rows take about `secs` at the measured cost, once one was measured.
    pub(crate) fn prompt_rows_in(&self, secs: f64) -> Option<usize> {
        self.prompt_token().map(|p| (secs / p) as usize)
    }

    /// The prompt-chunk cap for a step while sequences generate, at most `max`.
    pub(crate) fn chunk(&self, max: usize) -> usize {
        match (self.decode_step, self.prompt_token()) {
            (Some(d), Some(p)) => {
                let extra = ((GAP_FACTOR - 1.0) * d).max(MIN_GAP - d);
                let fit = (extra / p) as usize;
                fit.clamp(MIN_CHUNK.min(max), max)
            }
            _ => max,
        }
    }
}

/// A slot as placement sees it: what its KV cache holds and when it was last used.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachedSlot<'a, T> {
    /// Slot index.
    pub(crate) index: usize,
    /// Tokens whose KV entries the slot holds, in position order.
    pub(crate) cached: &'a [T],
    /// How many of those were read as a cold read of the prompt laid out as `layout` reads
    /// them (see [`Grain`]).
    pub(crate) exact: usize,
    /// The segments of the prompt the `exact` rows belong to.
    pub(crate) layout: Layout<'a>,
    /// The prompt whose last logits the slot kept, if `cached` still starts with it: its
    /// length, and whether every row of it was read as a cold read reads them.
    pub(crate) end: Option<(usize, bool)>,
    /// Step counter value when the slot was last released; lower is older.
    pub(crate) last_used: u64,
    /// What its sequence holds in llama.cpp's cache (a sliding window may have written over
    /// the start).
    pub(crate) held: Held,
    /// Serving a request: not a place for a new one, but its cache can still be copied.
    pub(crate) busy: bool,
    /// Its conversation, given up to a request, is kept in host memory (`--cache-ram`)
    /// rather than lost. The server sets it alike for every slot (whether the stash is on);
    /// a field rather than an argument of [`place`] so the tests can mix the two.
    pub(crate) kept: bool,
    /// The whole prompt a busy slot is still reading, while every row it has read so far
    /// was read as a cold read reads it (so, chunk by chunk, the rest will be too).
    pub(crate) reading: Option<&'a [T]>,
}

/// Where a waiting request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    /// The free slot that takes the request.
    pub(crate) slot: usize,
    /// Prompt tokens whose KV entries are reused; all of them when the slot kept the
    /// prompt's last logits (nothing is read: the first token is sampled from them).
    pub(crate) reuse: usize,
    /// A busy slot whose cache is copied into `slot` first, because it shares more of the
    /// prompt than any free slot.
    pub(crate) copy_from: Option<usize>,
}

/// The least a copy from a busy slot must save, in prompt tokens. llama.cpp copies a slot's
/// whole KV buffer: 94 MB for SmolLM2 with a 4,096-token slot, about 8 ms on this project's
/// 2-core machine, where reading 32 prompt tokens takes about 100 ms; a few tokens are
/// cheaper to read again.
pub(crate) const COPY_GAIN: usize = 32;

/// How many prompt tokens a slot's cache spares under `reuse`: none where a sliding window
/// no longer holds what reading on needs (see [`Window::holds`]), since the slot would be
/// emptied when the request starts.
fn reusable<T: PartialEq>(
    s: &CachedSlot<'_, T>,
    prompt: &[T],
    layout: Layout<'_>,
    reuse: Reuse,
    grain: Grain,
    window: Option<Window>,
) -> (usize, usize) {
    let shared = shared_prefix(s.cached, prompt);
    // The very prompt the slot read last, with its logits kept: nothing to read at all.
    let whole = s.end.is_some_and(|(len, exact)| {
        len == prompt.len()
            && shared >= len
            && match reuse {
                Reuse::Exact => exact,
                Reuse::Fast => true,
                Reuse::Cold => false,
            }
    });
    let n = if whole {
        prompt.len()
    } else {
        match reuse {
            Reuse::Cold => 0,
            Reuse::Fast => shared.min(prompt.len().saturating_sub(1)),
            Reuse::Exact => grain.exact_reuse(s.layout, layout, shared, s.exact),
        }
    };
    let n = if Window::holds(window, s.held, n, reuse) {
        n
    } else {
        0
    };
    (n, shared)
}

/// Whether a prompt sharing `shared` leading tokens with a slot's `cached` ones parts from
/// them [`COPY_GAIN`] or more tokens before their end: a request taking the slot would give
/// up another conversation, not read on from its own.
pub(crate) fn parts_early(cached: usize, shared: usize) -> bool {
    cached >= shared + COPY_GAIN
}

/// How many leading tokens `a` and `b` have in common.
pub(crate) fn shared_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(a, b)| a == b).count()
}

/// Places a prompt. Among free slots, the one whose cache spares the most of it (multi-turn
/// chats and shared system prompts skip re-reading that prefix); without any, the least
/// recently used, so recent conversations keep their cache. Without host memory to keep it,
/// a slot whose conversation the prompt [`parts_early`] from spares only what it spares
/// beyond the rows that conversation loses; a slot that gives up nothing comes before one
/// that spares as much and does. If a busy slot spares at least [`COPY_GAIN`] more
/// (concurrent requests with the same system prompt or the same question), its cache is
/// copied into the free slot whose cache is worth least ([`worth`]).
/// Without a whole-prompt hit at least one prompt token is left to read, for fresh logits.
///
/// `None` when no slot is free, and also while a busy slot is still reading a prompt that
/// will spare at least [`COPY_GAIN`] more than any placement now: requests that arrive
/// together with the same long system prompt wait until the first has read it, then copy
/// it, instead of each reading it again. The wait costs them nothing, since prompts get the
/// step's budget in arrival order and the one being read came first; it ends once the
/// shared rows are read, or when that slot's read stops being exact or it is released.
///
/// With `compact`, among free slots that spare as much, the one that keeps the busy slots'
/// numbers closest together comes before the least recently used. llama.cpp's
/// cache (one stream per slot) attends over every stream from the lowest sequence of a batch
/// to the highest: on an H200, four sequences in slots 0, 1, 3 and 7 took 8.3 ms a decode
/// step where four in slots 3 to 6 took 1.4, and four clients came to 0.3x llama-server's
/// aggregate, whose least-recently-used turn happened to keep them together. A model on a
/// GPU places compactly; on a CPU the attention is a small part of a step, and the least
/// recently used choice keeps the most recent conversations' caches.
pub(crate) fn place<T: PartialEq>(
    slots: &[CachedSlot<'_, T>],
    prompt: &[T],
    layout: Layout<'_>,
    reuse: Reuse,
    grain: Grain,
    window: Option<Window>,
    compact: bool,
) -> Option<Placement> {
    // The lowest and highest busy slot, and how far apart they would be with a candidate.
    let (lo, hi) = slots
        .iter()
        .filter(|s| s.busy)
        .fold((usize::MAX, 0), |(lo, hi), s| {
            (lo.min(s.index), hi.max(s.index))
        });
    let span = |candidate: usize| hi.max(candidate) - lo.min(candidate);
    let scored: Vec<(&CachedSlot<'_, T>, usize, usize)> = slots
        .iter()
        .map(|s| {
            let (n, shared) = reusable(s, prompt, layout, reuse, grain, window);
            (s, n, shared)
        })
        .collect();
    let free = || scored.iter().filter(|(s, _, _)| !s.busy);
    // Taking a slot whose conversation the prompt parts early from gives that conversation
    // up. Host memory (`--cache-ram`) keeps it: copying it out and back costs less than
    // reading even a few tokens. Without, every row it holds past the shared prefix is lost
    // (its next turn reads them again), and what the slot spares counts only beyond that.
    // Between slots that spare as much, one that gives up nothing comes first, the one
    // holding more of the prompt first among those; what a conversation that would be given
    // up shares beyond what it spares is no reason to take it over the least recently used.
    let net = |(s, n, shared): &(&CachedSlot<'_, T>, usize, usize)| {
        let gives_up = parts_early(s.cached.len(), *shared);
        let loses = if gives_up && !s.kept {
            s.cached.len() - shared
        } else {
            0
        };
        (
            n.saturating_sub(loses),
            !gives_up,
            if gives_up { 0 } else { *shared },
        )
    };
    let (best_free, n_free, _) = free().max_by(|a, b| {
        let closer = if compact {
            span(b.0.index).cmp(&span(a.0.index))
        } else {
            std::cmp::Ordering::Equal
        };
        net(a)
            .cmp(&net(b))
            .then(closer)
            .then(b.0.last_used.cmp(&a.0.last_used))
    })?;
    let busy = scored
        .iter()
        .filter(|(s, _, _)| s.busy)
        .max_by_key(|(_, n, _)| *n);
    let copy = busy.filter(|(_, n, _)| *n >= n_free + COPY_GAIN);
    let now = copy.map_or(*n_free, |(_, n, _)| *n);
    let ahead = slots
        .iter()
        .filter_map(|s| {
            let whole = s.reading?;
            let read = CachedSlot {
                cached: whole,
                exact: whole.len(),
                end: None,
                held: Held {
                    end: whole.len(),
                    ..s.held
                },
                ..*s
            };
            Some(reusable(&read, prompt, layout, reuse, grain, window).0)
        })
        .max()
        .unwrap_or(0);
    if ahead >= now + COPY_GAIN {
        return None;
    }
    if let Some((source, n, _)) = copy {
        let (victim, _, _) = free().min_by_key(|(s, n, shared)| worth(s, *n, *shared))?;
        return Some(Placement {
            slot: victim.index,
            reuse: *n,
            copy_from: Some(source.index),
        });
    }
    Some(Placement {
        slot: best_free.index,
        reuse: *n_free,
        copy_from: None,
    })
}

/// What a free slot is worth when another's cache is copied over it, lowest first: one whose
/// conversation the prompt does not part early from (an empty slot, one holding a prefix of
/// the prompt) gives nothing up, so it goes before one whose conversation would be given up
/// (lost without host memory, copied out with it); then the one that spares the least of
/// the prompt, then the least recently used, as [`place`] ranks conversations it gives up.
fn worth<T>(s: &CachedSlot<'_, T>, spared: usize, shared: usize) -> (bool, usize, u64) {
    (parts_early(s.cached.len(), shared), spared, s.last_used)
}

/// Where a waiting request goes when a cache kept in host memory (`--cache-ram`, see
/// `stash`) spares at least [`COPY_GAIN`] more of its prompt than `placed`, the placement
/// among the slots: that cache's index in `stashed`, and the placement that copies it back
/// into the free slot whose cache is worth least ([`worth`]). Copying a cache back costs
/// about what copying a slot does. `stashed` are seen as free slots whose `held` is what
/// their sequence will hold once restored ([`restored_held`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn restore<T: PartialEq>(
    placed: Placement,
    slots: &[CachedSlot<'_, T>],
    stashed: &[CachedSlot<'_, T>],
    prompt: &[T],
    layout: Layout<'_>,
    reuse: Reuse,
    grain: Grain,
    window: Option<Window>,
) -> Option<(Placement, usize)> {
    let read = |s: &CachedSlot<'_, T>| reusable(s, prompt, layout, reuse, grain, window);
    let (entry, n) = stashed
        .iter()
        .map(|s| (s.index, read(s).0))
        .filter(|&(_, n)| n >= placed.reuse + COPY_GAIN)
        .max_by_key(|&(index, n)| (n, std::cmp::Reverse(index)))?;
    let victim = slots.iter().filter(|s| !s.busy).min_by_key(|s| {
        let (n, shared) = read(s);
        worth(s, n, shared)
    })?;
    Some((
        Placement {
            slot: victim.index,
            reuse: n,
            copy_from: None,
        },
        entry,
    ))
}

/// What a sequence of `held` holds once copied out and back in as llama.cpp writes it out
/// (where `rows::SeqRows::assemble` cannot put every cell back). llama.cpp
/// (`state_write` in `llama-kv-cache.cpp`, at the pinned version) leaves out the cells a
/// sliding window of `swa` positions no longer attends to (those `swa` or more before the
/// newest) and puts the rest back into the lowest cells in order: past the window the
/// sequence starts later, and its cells no longer sit where a cold read puts them, so only a
/// request that reuses it all as it is can use it ([`Window::holds`]). `swa` is the model's
/// window whether or not the cache keeps only the window (`--swa-full`).
pub(crate) fn restored_held(held: Held, swa: Option<usize>) -> Held {
    match swa {
        Some(span) if held.end > span => Held {
            first: held.first.max(held.end - span),
            end: held.end,
            ordered: false,
        },
        _ => held,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunks_are_paced_to_keep_decode_gaps_bounded() {
        let mut pace = Pace::default();
        assert_eq!(pace.chunk(128), 128, "nothing measured yet");
        // A 2-core CPU: 40 ms to decode four sequences, 3.3 ms per prompt token.
        pace.record(4, 0, 0.040);
        pace.record(4, 128, 0.040 + 128.0 * 0.0033);
        let n = pace.chunk(128);
        assert!((20..=26).contains(&n), "{n}");
        assert!(0.040 + n as f64 * 0.0033 <= GAP_FACTOR * 0.040 + 1e-9);
        // A GPU: prompt tokens are nearly free, so the configured cap holds.
        let mut gpu = Pace::default();
        gpu.record(4, 0, 0.010);
        gpu.record(0, 512, 0.020);
        assert_eq!(gpu.chunk(128), 128);
        // An H200: four sequences decode in 1.6 ms and a prompt row costs 20 us; three decode
        // steps would admit 160 rows a step, MIN_GAP admits the configured 512.
        let mut h200 = Pace::default();
        h200.record(4, 0, 0.0016);
        h200.record(0, 487, 487.0 * 0.000_02);
        assert_eq!(h200.chunk(512), 512);
        let n = h200.chunk(4096);
        assert!((1150..=1170).contains(&n), "{n}: (25 ms - 1.6 ms) / 20 us");
        // A first small call's fixed cost is weighed by its rows: 19 rows in 19.5 ms, then
        // 487 in 16 ms, come to 63 us a row (an average per call said 800).
        let mut first = Pace::default();
        first.record(4, 0, 0.0016);
        first.record(0, 19, 0.0195);
        first.record(0, 487, 0.016);
        let n = first.chunk(4096);
        assert!((360..=380).contains(&n), "{n}");
        // A very slow prompt still makes headway.
        let mut slow = Pace::default();
        slow.record(1, 0, 0.010);
        slow.record(0, 64, 64.0);
        assert_eq!(slow.chunk(128), MIN_CHUNK);
        assert_eq!(slow.chunk(4), 4, "never above the configured cap");
    }

    use super::*;

    const BUDGET: Budget = Budget {
        batch: 512,
        prefill_chunk: 64,
        grain: FLASH_GRAIN,
    };

    fn decode() -> SlotState {
        SlotState::Decode { can_emit: true }
    }

    /// A prompt (or its last segment) of `remaining` rows, with flash attention.
    fn prefill(remaining: usize, admitted: u64) -> SlotState {
        prefill_in(FLASH_GRAIN, remaining, admitted)
    }

    fn prefill_in(grain: Grain, remaining: usize, admitted: u64) -> SlotState {
        SlotState::Prefill {
            segments: vec![(remaining, grain.least(remaining))],
            admitted,
        }
    }

    #[test]
    fn all_generating_slots_advance_together_in_one_step() {
        let plan = plan_step(&[decode(), decode(), SlotState::Free, decode()], BUDGET);
        assert_eq!(plan.decode, vec![0, 1, 3]);
        assert!(plan.prefill.is_empty());
    }

    #[test]
    fn a_lone_prompt_gets_the_whole_batch() {
        let plan = plan_step(&[prefill(2000, 1), SlotState::Free], BUDGET);
        assert_eq!(plan.prefill, vec![(0, 512)]);
    }

    #[test]
    fn a_long_prompt_is_chunked_while_others_generate() {
        let plan = plan_step(&[decode(), prefill(2000, 7), decode()], BUDGET);
        assert_eq!(plan.decode, vec![0, 2]);
        assert_eq!(plan.prefill, vec![(1, 64)]);
    }

    #[test]
    fn the_oldest_prompt_is_read_first() {
        let plan = plan_step(&[prefill(300, 9), prefill(400, 3)], BUDGET);
        assert_eq!(plan.prefill, vec![(1, 400)]);
        let plan = plan_step(&[prefill(100, 9), prefill(400, 3)], BUDGET);
        assert_eq!(plan.prefill, vec![(1, 400), (0, 100)]);
    }

    #[test]
    fn only_the_first_chunk_of_a_step_is_cut_to_the_budget() {
        // The 80-turn conversation's segments: 14 calls when the step's budget cut them
        // (112 + 76, 160 + 258, 240 + 216), 11 when a segment that does not fit waits.
        let mut segments: Vec<Segment> = [19, 18, 22, 40, 58, 80, 120, 188, 273, 418, 456]
            .iter()
            .map(|&r| (r, FLASH_GRAIN.least(r)))
            .collect();
        let mut calls = Vec::new();
        while segments.iter().any(|s| s.0 > 0) {
            let slot = SlotState::Prefill {
                segments: segments.clone(),
                admitted: 1,
            };
            for (_, n) in plan_step(&[slot], BUDGET).prefill {
                let s = segments.iter_mut().find(|s| s.0 > 0).unwrap();
                s.0 -= n;
                calls.push(n);
            }
        }
        assert_eq!(calls, [19, 18, 22, 40, 58, 80, 120, 188, 273, 418, 456]);
        // A segment longer than the batch is still cut, when it is the first thing read.
        let slot = SlotState::Prefill {
            segments: vec![(10, 4), (2000, 64)],
            admitted: 1,
        };
        assert_eq!(plan_step(&[slot], BUDGET).prefill, vec![(0, 10)]);
        let slot = SlotState::Prefill {
            segments: vec![(2000, 64)],
            admitted: 1,
        };
        assert_eq!(plan_step(&[slot], BUDGET).prefill, vec![(0, 512)]);
    }

    #[test]
    fn a_slot_whose_client_is_not_reading_sits_out() {
        let plan = plan_step(&[SlotState::Decode { can_emit: false }, decode()], BUDGET);
        assert_eq!(plan.decode, vec![1]);
    }

    #[test]
    fn a_stalled_reader_still_counts_as_generating_for_the_chunk_cap() {
        let plan = plan_step(
            &[SlotState::Decode { can_emit: false }, prefill(1000, 1)],
            BUDGET,
        );
        assert_eq!(plan.prefill, vec![(1, 64)]);
    }

    #[test]
    fn decode_tokens_never_exceed_the_batch() {
        let slots = vec![decode(); 8];
        let plan = plan_step(
            &slots,
            Budget {
                batch: 8,
                prefill_chunk: 4,
                grain: MATMUL_GRAIN,
            },
        );
        assert_eq!(plan.decode.len(), 8);
        assert!(plan.prefill.is_empty());
    }

    #[test]
    fn nothing_to_do_is_an_empty_plan() {
        assert!(plan_step(&[SlotState::Free, SlotState::Free], BUDGET).is_empty());
    }

    #[test]
    fn a_long_prompt_never_leaves_a_short_last_chunk() {
        // Alone: 512 then 18 would read the last 18 rows with other kernels; 464 then 66.
        assert_eq!(
            plan_step(&[prefill(530, 1)], BUDGET).prefill,
            vec![(0, 464)]
        );
        assert_eq!(plan_step(&[prefill(64, 1)], BUDGET).prefill, vec![(0, 64)]);
        // A chunk that cannot keep 64 rows itself is left as the budget made it.
        let plan = plan_step(&[decode(), prefill(100, 1)], BUDGET);
        assert_eq!(plan.prefill, vec![(1, 64)]);
        for remaining in 1..200 {
            let plan = plan_step(&[decode(), prefill(remaining, 1)], BUDGET);
            let n = plan.prefill[0].1;
            assert!(n >= 1 && n <= remaining.min(64), "{remaining}: {n}");
        }
        // Without flash attention a chunk holds 4 rows: 512 then 18 is fine, 512 then 2 is not
        // (496 then 18 instead, ending on a multiple of 16).
        let matmul = Budget {
            grain: MATMUL_GRAIN,
            ..BUDGET
        };
        assert_eq!(
            plan_step(&[prefill_in(MATMUL_GRAIN, 530, 1)], matmul).prefill,
            vec![(0, 512)]
        );
        assert_eq!(
            plan_step(&[prefill_in(MATMUL_GRAIN, 514, 1)], matmul).prefill,
            vec![(0, 496)]
        );
    }

    fn tokens(range: std::ops::RangeInclusive<i32>) -> Vec<i32> {
        range.collect()
    }

    fn whole(prompt: &[i32]) -> Layout<'static> {
        one(prompt.len())
    }

    /// A prompt of `len` rows in one segment.
    fn one(len: usize) -> Layout<'static> {
        Layout { starts: WHOLE, len }
    }

    /// One segment, the whole of `cached`.
    const WHOLE: &[usize] = &[0];

    fn slot(index: usize, cached: &[i32], exact: usize, last_used: u64) -> CachedSlot<'_, i32> {
        CachedSlot {
            index,
            cached,
            exact,
            layout: Layout {
                starts: WHOLE,
                len: cached.len(),
            },
            end: None,
            held: Held::default(),
            last_used,
            busy: false,
            kept: true,
            reading: None,
        }
    }

    #[test]
    fn on_a_gpu_a_prompt_goes_next_to_the_busy_slots_before_the_least_recently_used() {
        // Slots 2 to 4 generate; every free slot spares as little (nothing) of the prompt,
        // and slot 0 was used longest ago, slot 7 most recently.
        let empty: &[i32] = &[];
        let slots: Vec<CachedSlot<'_, i32>> = (0..8)
            .map(|i| CachedSlot {
                busy: (2..=4).contains(&i),
                ..slot(i, empty, 0, 10 + i as u64)
            })
            .collect();
        let prompt = [1, 2, 3];
        let placed = |compact| {
            place(
                &slots,
                &prompt,
                whole(&prompt),
                Reuse::Exact,
                FLASH_GRAIN,
                None,
                compact,
            )
            .map(|p| p.slot)
        };
        assert_eq!(placed(false), Some(0), "least recently used");
        // 1 and 5 both keep the span to 3; 1 was used longer ago.
        assert_eq!(placed(true), Some(1), "next to the busy ones");
        // A slot that spares more of the prompt still wins wherever it is.
        let cached = [1, 2];
        let mut slots = slots.clone();
        slots[7] = slot(7, &cached, 2, 17);
        let placed = place(
            &slots,
            &prompt,
            whole(&prompt),
            Reuse::Fast,
            FLASH_GRAIN,
            None,
            true,
        );
        assert_eq!(placed.map(|p| (p.slot, p.reuse)), Some((7, 2)));
    }

    /// Slot and reuse of a placement without a copy.
    fn at(slots: &[CachedSlot<'_, i32>], prompt: &[i32], reuse: Reuse) -> Option<(usize, usize)> {
        place(
            slots,
            prompt,
            whole(prompt),
            reuse,
            FLASH_GRAIN,
            None,
            false,
        )
        .map(|p| {
            assert_eq!(p.copy_from, None);
            (p.slot, p.reuse)
        })
    }

    /// Gemma 3 270M's layers attend 512 positions back; with 512-row batches llama.cpp gives
    /// each sequence 1,024 cells of them.
    const GEMMA: Window = Window {
        span: 512,
        cells: 1024,
    };

    fn held(first: usize, end: usize, ordered: bool) -> Held {
        Held {
            first,
            end,
            ordered,
        }
    }

    #[test]
    fn a_sliding_window_holds_what_reading_on_needs_and_in_cold_order_for_exact_reuse() {
        let holds = |h: Held, keep: usize, reuse: Reuse| Window::holds(Some(GEMMA), h, keep, reuse);
        // Nothing written over yet: any reuse, window or not.
        for reuse in [Reuse::Exact, Reuse::Fast] {
            assert!(holds(held(0, 900, true), 700, reuse));
            assert!(Window::holds(None, held(0, 900, true), 700, reuse));
        }
        // Without a window, a sequence that lost its start holds nothing to read on from.
        assert!(!Window::holds(None, held(5, 900, true), 700, Reuse::Fast));
        // Reading on at `keep` needs the 512 positions before it.
        assert!(!holds(held(600, 1300, true), 1111, Reuse::Fast));
        assert!(holds(held(600, 1300, true), 1112, Reuse::Fast));
        assert!(!holds(held(600, 1300, true), 1111, Reuse::Exact));
        // Exact reuse also needs the removal of `keep..end` to free one run of cells.
        assert!(holds(held(276, 1300, true), 1088, Reuse::Exact));
        assert!(
            holds(held(1100, 2048, true), 2000, Reuse::Exact),
            "up to the last cell"
        );
        assert!(
            holds(held(76, 1100, true), 1100, Reuse::Exact),
            "nothing to remove"
        );
        assert!(
            !holds(held(76, 1100, true), 1008, Reuse::Exact),
            "cells 1008-1023 and 0-75"
        );
        assert!(holds(held(76, 1100, true), 1008, Reuse::Fast));
        // Nor once a removal did that since the sequence was last emptied.
        assert!(!holds(held(276, 1300, false), 1088, Reuse::Exact));
        assert!(holds(held(276, 1300, false), 1088, Reuse::Fast));
        assert!(!holds(held(276, 1300, true), 1088, Reuse::Cold));
    }

    #[test]
    fn a_removal_keeps_cold_order_unless_it_frees_cells_on_both_sides_of_the_last() {
        assert!(GEMMA.trim_keeps_order(500, 900));
        assert!(GEMMA.trim_keeps_order(900, 900), "nothing removed");
        assert!(GEMMA.trim_keeps_order(1000, 1024), "cells 1000-1023");
        assert!(!GEMMA.trim_keeps_order(1000, 1025), "cells 1000-1023 and 0");
        assert!(GEMMA.trim_keeps_order(1024, 1100), "cells 0-75");
        assert!(!GEMMA.trim_keeps_order(1500, 2100));
        assert!(
            !GEMMA.trim_keeps_order(100, 1200),
            "more than the cells hold"
        );
    }

    #[test]
    fn a_slot_whose_window_lost_what_a_prompt_needs_spares_none_of_it() {
        // A conversation of 1,100 tokens; the window wrote over its first 76 positions.
        let conversation = tokens(1..=1100);
        let mut prompt = tokens(1..=1020);
        prompt.extend(tokens(5001..=5100));
        let wrapped = CachedSlot {
            held: held(76, 1100, true),
            ..slot(0, &conversation, 1100, 2)
        };
        // Another slot holds only the first 256 tokens.
        let start = tokens(1..=256);
        let short = slot(1, &start, 256, 1);
        let placed = |slots: &[CachedSlot<'_, i32>], reuse| {
            place(
                slots,
                &prompt,
                whole(&prompt),
                reuse,
                MATMUL_GRAIN,
                Some(GEMMA),
                false,
            )
            .map(|p| (p.slot, p.reuse))
        };
        // Sampled without a seed, it reads on where the prompts part: the 512 positions
        // before it are there.
        assert_eq!(placed(&[wrapped, short], Reuse::Fast), Some((0, 1020)));
        // Reproducible, it would reuse 1,008 rows, but removing 1,008-1,099 frees cells
        // 1,008-1,023 and 0-75: the other slot's 256 are worth more.
        assert_eq!(placed(&[wrapped, short], Reuse::Exact), Some((1, 256)));
        // With the whole context cached, the conversation's slot reuses 1,008.
        let whole_context = |slots: &[CachedSlot<'_, i32>]| {
            place(
                slots,
                &prompt,
                whole(&prompt),
                Reuse::Exact,
                MATMUL_GRAIN,
                None,
                false,
            )
            .map(|p| (p.slot, p.reuse))
        };
        let kept = CachedSlot {
            held: Held::default(),
            ..wrapped
        };
        assert_eq!(whole_context(&[kept, short]), Some((0, 1008)));
        // Where the removal stays within the last lap of cells, it is reused.
        let longer = tokens(1..=1300);
        let mut next = tokens(1..=1100);
        next.extend(tokens(5001..=5100));
        let lapped = |ordered| CachedSlot {
            held: held(276, 1300, ordered),
            ..slot(0, &longer, 1300, 2)
        };
        let at_next = |s: CachedSlot<'_, i32>| {
            place(
                &[s, short],
                &next,
                whole(&next),
                Reuse::Exact,
                MATMUL_GRAIN,
                Some(GEMMA),
                false,
            )
            .map(|p| (p.slot, p.reuse))
        };
        assert_eq!(at_next(lapped(true)), Some((0, 1088)));
        assert_eq!(at_next(lapped(false)), Some((1, 256)));
    }

    #[test]
    fn the_slot_sharing_the_longest_prefix_is_chosen() {
        let mut a = tokens(1..=100);
        a.push(999);
        let b = tokens(1..=150);
        let free = [slot(0, &a, a.len(), 1), slot(1, &b, b.len(), 5)];
        let exact = |p: &[i32]| at(&free, p, Reuse::Exact);
        let fast = |p: &[i32]| at(&free, p, Reuse::Fast);
        // With flash attention (the grain `at` uses):
        // Exact reuse ends on an aligned position and leaves at least a span to read.
        assert_eq!(exact(&tokens(1..=300)), Some((1, 144)));
        assert_eq!(exact(&tokens(1..=200)), Some((1, 128)));
        assert_eq!(exact(&tokens(1..=180)), Some((1, 112)));
        assert_eq!(exact(&tokens(1..=120)), Some((1, 48)));
        assert_eq!(exact(&tokens(1..=66)), Some((0, 0)));
        // Sampling without a seed reuses all but the last token.
        assert_eq!(fast(&tokens(1..=120)), Some((1, 119)));
        assert_eq!(fast(&tokens(1..=300)), Some((1, 150)));
        let mut short = tokens(1..=60);
        short[59] = 77;
        assert_eq!(exact(&short), Some((0, 0)));
        assert_eq!(fast(&short), Some((0, 59)));
    }

    #[test]
    fn a_conversation_is_given_up_only_for_more_than_it_loses() {
        // Slot 0 holds a conversation, slot 1 nothing (and was used more recently). Given up,
        // the conversation is kept in host memory (`slot`'s default, the server's): it is
        // given up for any reuse, but not for none.
        let conv = tokens(1..=200);
        let empty: &[i32] = &[];
        let free = [slot(0, &conv, conv.len(), 1), slot(1, empty, 0, 5)];
        let prompt =
            |shared: i32| -> Vec<i32> { tokens(1..=shared).into_iter().chain(500..540).collect() };
        assert_eq!(at(&free, &prompt(3), Reuse::Fast), Some((0, 3)));
        // Exact reuse spares nothing of 3 shared tokens: the empty slot.
        assert_eq!(at(&free, &prompt(3), Reuse::Exact), Some((1, 0)));
        // Its own next turn gives nothing up, nor does a prompt it parts from near its end.
        let next: Vec<i32> = conv.iter().copied().chain(600..610).collect();
        assert_eq!(at(&free, &next, Reuse::Fast), Some((0, 200)));
        assert_eq!(at(&free, &prompt(180), Reuse::Fast), Some((0, 180)));
        // Nothing kept in host memory (`--cache-ram 0`): a conversation is given up only for
        // more tokens than it loses: 197 past 3 shared ones, 100 past 100, 99 past 101.
        let lost = [
            CachedSlot {
                kept: false,
                ..slot(0, &conv, conv.len(), 1)
            },
            slot(1, empty, 0, 5),
        ];
        assert_eq!(at(&lost, &prompt(3), Reuse::Fast), Some((1, 0)));
        assert_eq!(at(&lost, &prompt(100), Reuse::Fast), Some((1, 0)));
        assert_eq!(at(&lost, &prompt(101), Reuse::Fast), Some((0, 101)));
        // Every free slot gives a conversation up that nothing keeps. Sharing the template's
        // first tokens with the more recent one (slot 0) spares nothing on balance: the least
        // recently used is taken, as with nothing shared.
        let other = tokens(300..=400);
        let full = [
            CachedSlot {
                kept: false,
                ..slot(0, &conv, conv.len(), 5)
            },
            CachedSlot {
                kept: false,
                ..slot(1, &other, other.len(), 1)
            },
        ];
        assert_eq!(at(&full, &prompt(3), Reuse::Fast), Some((1, 0)));
    }

    #[test]
    fn without_shared_prefix_the_least_recently_used_slot_is_chosen() {
        let free = [slot(0, &[7, 7], 0, 9), slot(1, &[8, 8], 0, 2)];
        assert_eq!(at(&free, &[1, 2, 3], Reuse::Fast), Some((1, 0)));
    }

    #[test]
    fn an_identical_prompt_still_evaluates_its_last_rows() {
        let a = tokens(1..=200);
        let free = [slot(0, &a, 192, 0)];
        assert_eq!(at(&free, &a, Reuse::Exact), Some((0, 128)));
        assert_eq!(at(&free, &a, Reuse::Fast), Some((0, 199)));
        // Only rows read exactly count for an exact request.
        let partly = [slot(0, &a, 100, 0)];
        assert_eq!(at(&partly, &a, Reuse::Exact), Some((0, 96)));
    }

    #[test]
    fn without_flash_attention_prefixes_are_reused_in_grains_of_sixteen() {
        let b = tokens(1..=150);
        let free = [slot(0, &b, b.len(), 0)];
        let exact = |p: &[i32]| {
            place(&free, p, whole(p), Reuse::Exact, MATMUL_GRAIN, None, false).map(|p| p.reuse)
        };
        assert_eq!(exact(&tokens(1..=300)), Some(144));
        assert_eq!(exact(&tokens(1..=40)), Some(32));
        assert_eq!(exact(&tokens(1..=7)), Some(0));
        let mut diverging = tokens(1..=100);
        diverging[30] = 0;
        assert_eq!(exact(&diverging), Some(16));
    }

    #[test]
    fn the_very_prompt_read_last_is_not_read_again() {
        let mut a = tokens(1..=50);
        a.extend(tokens(500..=520)); // the answer after it
        let read = |exact| CachedSlot {
            end: Some((50, exact)),
            ..slot(0, &a, 0, 0)
        };
        let prompt = tokens(1..=50);
        assert_eq!(at(&[read(true)], &prompt, Reuse::Exact), Some((0, 50)));
        assert_eq!(at(&[read(true)], &prompt, Reuse::Fast), Some((0, 50)));
        // Logits from a read a cold one would not match serve only unseeded sampling.
        assert_eq!(at(&[read(false)], &prompt, Reuse::Exact), Some((0, 0)));
        assert_eq!(at(&[read(false)], &prompt, Reuse::Fast), Some((0, 50)));
        // Asked not to, nothing is reused.
        assert_eq!(at(&[read(true)], &prompt, Reuse::Cold), Some((0, 0)));
        // A longer or shorter prompt gets no whole hit.
        assert_eq!(
            at(&[read(true)], &tokens(1..=49), Reuse::Fast),
            Some((0, 48))
        );
        assert_eq!(
            at(&[read(true)], &tokens(1..=51), Reuse::Fast),
            Some((0, 50))
        );
    }

    #[test]
    fn a_busy_slot_sharing_much_more_is_copied_into_the_least_valuable_free_one() {
        let prompt = tokens(1..=300);
        let busy = CachedSlot {
            busy: true,
            ..slot(2, &prompt[..260], 256, 0)
        };
        let some = slot(0, &prompt[..70], 64, 1);
        let none = slot(1, &[9], 0, 7);
        assert_eq!(
            place(
                &[some, none, busy],
                &prompt,
                whole(&prompt),
                Reuse::Exact,
                FLASH_GRAIN,
                None,
                false
            ),
            Some(Placement {
                slot: 1,
                reuse: 224,
                copy_from: Some(2)
            })
        );
        // A free slot within COPY_GAIN of it is used as it is.
        let close = slot(0, &prompt[..220], 216, 1);
        assert_eq!(
            at(&[close, none, busy], &prompt, Reuse::Exact),
            Some((0, 208))
        );
        // The busy slot's whole prompt, logits kept, serves a concurrent identical request.
        let same = tokens(1..=40);
        let twin = CachedSlot {
            end: Some((40, true)),
            busy: true,
            ..slot(2, &same, 0, 0)
        };
        assert_eq!(
            place(
                &[none, twin],
                &same,
                whole(&same),
                Reuse::Exact,
                FLASH_GRAIN,
                None,
                false
            ),
            Some(Placement {
                slot: 1,
                reuse: 40,
                copy_from: Some(2)
            })
        );
        // Busy slots alone are no place.
        assert_eq!(
            place(
                &[twin],
                &same,
                whole(&same),
                Reuse::Exact,
                FLASH_GRAIN,
                None,
                false
            ),
            None
        );
    }

    #[test]
    fn a_copy_goes_into_an_emptied_slot_rather_than_over_another_conversation() {
        // Slot 0 held a conversation long ago; slot 1 was emptied since (its request
        // failed). A busy slot shares much of the prompt: its rows go into the empty slot,
        // and the old conversation stays (or, kept in host memory, is not copied out).
        let prompt = tokens(1..=300);
        let old = tokens(500..=700);
        let busy = CachedSlot {
            busy: true,
            ..slot(2, &prompt[..260], 256, 0)
        };
        for kept in [false, true] {
            let conversation = CachedSlot {
                kept,
                ..slot(0, &old, 201, 1)
            };
            let emptied = CachedSlot {
                kept,
                ..slot(1, &[], 0, 9)
            };
            let placed = place(
                &[conversation, emptied, busy],
                &prompt,
                whole(&prompt),
                Reuse::Exact,
                FLASH_GRAIN,
                None,
                false,
            );
            assert_eq!(
                placed,
                Some(Placement {
                    slot: 1,
                    reuse: 224,
                    copy_from: Some(2)
                }),
                "kept in host memory: {kept}"
            );
            // Likewise for a conversation copied back from host memory.
            let stashed = [slot(0, &prompt[..200], 200, 0)];
            assert_eq!(
                restored(
                    &[conversation, emptied],
                    &stashed,
                    &prompt,
                    Reuse::Fast,
                    None
                )
                .map(|(p, _)| p.slot),
                Some(1),
                "kept in host memory: {kept}"
            );
        }
    }

    #[test]
    fn a_prompt_waits_for_a_busy_slot_still_reading_what_it_shares_then_copies_it() {
        // Two requests arrive together on an idle server; both start with the same 60
        // tokens. The first is being read: 10 rows so far, all exact.
        let first = tokens(1..=100);
        let mut second = tokens(1..=60);
        second.extend(tokens(500..=539));
        let reading = |read: usize, exact: usize| CachedSlot {
            busy: true,
            reading: (exact == read).then_some(first.as_slice()),
            layout: whole(&first),
            ..slot(0, &first[..read], exact, 0)
        };
        let empty = slot(1, &[], 0, 0);
        let placed = |busy: CachedSlot<'_, i32>, reuse: Reuse| {
            place(
                &[busy, empty],
                &second,
                whole(&second),
                reuse,
                MATMUL_GRAIN,
                None,
                false,
            )
        };
        // It would spare 48 rows (60 shared, aligned), 10 now: the second waits.
        assert_eq!(placed(reading(10, 10), Reuse::Exact), None);
        assert_eq!(placed(reading(10, 10), Reuse::Fast), None);
        // Once the first has read the shared rows, the second copies them.
        let copy = Some(Placement {
            slot: 1,
            reuse: 48,
            copy_from: Some(0),
        });
        assert_eq!(placed(reading(64, 64), Reuse::Exact), copy);
        assert_eq!(placed(reading(100, 100), Reuse::Exact), copy);
        // A read that is no longer exact is not waited for; nor by a request that wants
        // nothing reused.
        let plain = Some(Placement {
            slot: 1,
            reuse: 0,
            copy_from: None,
        });
        assert_eq!(placed(reading(10, 0), Reuse::Exact), plain);
        assert_eq!(placed(reading(10, 10), Reuse::Cold), plain);
        // Nor when a free slot already spares within COPY_GAIN of it (32 of its 40 rows).
        let warm = slot(1, &first[..40], 40, 0);
        assert_eq!(
            place(
                &[reading(10, 10), warm],
                &second,
                whole(&second),
                Reuse::Exact,
                MATMUL_GRAIN,
                None,
                false
            ),
            Some(Placement {
                slot: 1,
                reuse: 32,
                copy_from: None
            })
        );
    }

    #[test]
    fn segments_start_at_control_tokens_at_least_min_segment_apart() {
        fn marks(at: &[usize], len: usize) -> Vec<bool> {
            (0..len).map(|i| at.contains(&i)).collect()
        }
        // SmolLM2's chat template with its default system prompt: <|im_start|> at 0,
        // <|im_end|> at 19, <|im_start|> at 21, and the same again around the question.
        assert_eq!(
            segment_starts(marks(&[0, 19, 21, 77, 79], 82)),
            vec![0, 19, 77]
        );
        assert_eq!(segment_starts(marks(&[], 40)), vec![0]);
        assert_eq!(segment_starts(marks(&[15], 40)), vec![0]);
        assert_eq!(segment_starts(marks(&[16, 31, 32], 40)), vec![0, 16, 32]);
        // The starts below a position depend only on the tokens before it.
        let long = segment_starts(marks(&[0, 19, 21, 77, 79, 130], 140));
        assert_eq!(&long[..3], &[0, 19, 77]);
        // Further in, a segment is at least half as long as what precedes it: 80 short turns
        // make a handful of segments, not 80.
        let turns: Vec<usize> = (0..80).map(|t| t * 21).collect();
        let starts = segment_starts(marks(&turns, 1692));
        assert_eq!(
            starts,
            vec![0, 21, 42, 63, 105, 168, 252, 378, 567, 861, 1302]
        );
    }

    #[test]
    fn a_question_under_a_shared_head_reads_only_its_own_segment() {
        // The last request, and a new one sharing its first 36 tokens (the system turn and
        // the start of the question).
        let cached = Layout {
            starts: &[0, 19, 77],
            len: 82,
        };
        let new = Layout {
            starts: &[0, 19, 75],
            len: 80,
        };
        // Inside the question's segment (56 rows, read row by row): aligned from its start.
        assert_eq!(FLASH_GRAIN.exact_reuse(cached, new, 36, 82), 35);
        // Only the system turn shared: up to its end, unaligned as it is.
        assert_eq!(FLASH_GRAIN.exact_reuse(cached, new, 21, 82), 19);
        // Rows not read exactly are not reused.
        assert_eq!(FLASH_GRAIN.exact_reuse(cached, new, 36, 10), 0);
        // Without segments the 80 rows are one tile-read segment: 64 are left to read.
        assert_eq!(FLASH_GRAIN.exact_reuse(one(82), one(80), 36, 82), 16);
        // Without flash attention a chunk's kernel does not depend on its length.
        assert_eq!(MATMUL_GRAIN.exact_reuse(one(82), one(80), 36, 82), 32);
        // A short prompt read row by row reuses rows of another read row by row...
        assert_eq!(FLASH_GRAIN.exact_reuse(one(50), one(60), 50, 50), 48);
        // ...but not rows read with tiles, nor the other way round.
        assert_eq!(FLASH_GRAIN.exact_reuse(one(70), one(60), 58, 70), 0);
        assert_eq!(FLASH_GRAIN.exact_reuse(one(60), one(200), 60, 60), 0);
        // A segment the cached prompt does not have (it runs on past it) is no boundary.
        let split = Layout {
            starts: &[0, 30],
            len: 100,
        };
        assert_eq!(FLASH_GRAIN.exact_reuse(one(100), split, 100, 100), 0);
        // A follow-up turn: the first turn's segments, then its answer and a new question.
        let first = Layout {
            starts: &[0, 19, 1017],
            len: 1022,
        };
        let second = Layout {
            starts: &[0, 19, 1017, 1150, 1190],
            len: 1195,
        };
        // The answer joined the last segment of the first turn (now 133 rows, read with
        // tiles where those 5 rows were read one by one): reuse ends where it starts.
        assert_eq!(FLASH_GRAIN.exact_reuse(first, second, 1100, 1022), 1017);
    }

    #[test]
    fn row_wise_segments_join_and_reuse_ends_on_any_row() {
        let g = FLASH_GRAIN.row_wise();
        // A bench request on SmolLM2: the system turn (19 rows), the question (52), then the
        // turn markers (6), which join the question (58 rows, under a tile); the system turn
        // does not (71 would be).
        assert_eq!(join_segments(vec![0, 19, 71], 77, g), vec![0, 19]);
        assert_eq!(
            join_segments(vec![0, 19, 71], 77, FLASH_GRAIN),
            vec![0, 19, 71]
        );
        // A segment shorter than a span (read with another kernel) stays alone, as does a
        // tiled one; a group takes segments as long as it stays under a tile.
        assert_eq!(join_segments(vec![0, 19, 71], 73, g), vec![0, 19, 71]);
        assert_eq!(join_segments(vec![0, 20, 40, 60], 130, g), vec![0, 60]);
        assert_eq!(join_segments(vec![0, 20, 40, 60], 70, g), vec![0, 60]);
        assert_eq!(join_segments(vec![0], 10, g), vec![0]);
        // The joined question is read in one chunk from wherever reuse ended.
        let first = Layout {
            starts: &[0, 19],
            len: 77,
        };
        assert!(g.reads_exactly(first, 40, 77));
        assert!(!FLASH_GRAIN.reads_exactly(first, 40, 77));
        // The next request shares 40 rows: all are reused (16-aligned grouping reuses 35).
        assert_eq!(g.exact_reuse(first, first, 40, 77), 40);
        assert_eq!(FLASH_GRAIN.exact_reuse(first, first, 40, 77), 35);
        // A follow-up turn whose new segment is tiled: reuse ends where its kernel changes,
        // at its own turn, though the first turn had joined its markers with its question.
        let tiled = Layout {
            starts: &[0, 19, 71],
            len: 140,
        };
        assert_eq!(g.exact_reuse(first, tiled, 100, 77), 71);
        // One whose new segment is not: the whole first prompt is reused.
        let short = Layout {
            starts: &[0, 19, 71],
            len: 100,
        };
        assert_eq!(g.exact_reuse(first, short, 100, 77), 77);
        // Rows read with another kernel are not reused, and a chunk's worth is left to read.
        assert_eq!(g.exact_reuse(one(70), one(60), 58, 70), 0);
        assert_eq!(g.exact_reuse(one(60), one(70), 60, 60), 0);
        assert_eq!(g.exact_reuse(one(50), one(60), 50, 50), 50);
        assert_eq!(g.exact_reuse(one(60), one(60), 58, 60), 56);
        assert_eq!(g.exact_reuse(first, first, 77, 30), 30);
    }

    /// How a cold read alone cuts one segment of `len` rows, `batch` rows a call at most.
    fn cold_chunks(len: usize, batch: usize, g: Grain) -> Vec<(usize, usize)> {
        let mut chunks = Vec::new();
        let mut at = 0;
        while at < len {
            let left = len - at;
            let n = exact_chunk(left, left.min(batch), g.least(len), g);
            chunks.push((at, at + n));
            at += n;
        }
        chunks
    }

    #[test]
    fn from_the_least_batch_up_every_cold_chunk_is_exact() {
        let grains = [
            FLASH_GRAIN,
            MATMUL_GRAIN,
            FLASH_GRAIN.row_wise(),
            MATMUL_GRAIN.row_wise(),
        ];
        for g in grains {
            let least = g.least_batch();
            for batch in (least..least + 70).chain([256, 512]) {
                for len in 1..=700 {
                    for (start, end) in cold_chunks(len, batch, g) {
                        assert!(
                            g.reads_exactly(one(len), start, end),
                            "{g:?}, batch {batch}, {len} rows: {start}..{end}"
                        );
                    }
                }
            }
        }
        assert_eq!(FLASH_GRAIN.least_batch(), 128);
        assert_eq!(MATMUL_GRAIN.least_batch(), 32);
        // Why: under 100 rows a call, 124 tiled rows are read as 100 with tiles and 24 row by
        // row, which no warm read that starts inside the segment reproduces.
        assert_eq!(cold_chunks(124, 100, FLASH_GRAIN), [(0, 96), (96, 124)]);
        assert!(!FLASH_GRAIN.reads_exactly(one(124), 96, 124));
    }

    #[test]
    fn chunks_keep_to_their_segment_and_its_kernel() {
        let layout = Layout {
            starts: &[0, 19, 77],
            len: 82,
        };
        let g = FLASH_GRAIN;
        assert!(g.reads_exactly(layout, 0, 19), "a whole segment");
        assert!(g.reads_exactly(layout, 19, 77));
        assert!(
            g.reads_exactly(layout, 35, 77),
            "aligned from its start, 42 rows"
        );
        assert!(g.reads_exactly(layout, 77, 82));
        assert!(
            !g.reads_exactly(layout, 0, 40),
            "runs into the next segment"
        );
        assert!(!g.reads_exactly(layout, 20, 77), "not aligned from 19");
        assert!(!g.reads_exactly(layout, 19, 30), "ends unaligned inside it");
        assert!(!g.reads_exactly(layout, 75, 77), "not aligned, and 2 rows");
        assert!(g.reads_exactly(layout, 67, 77), "48 rows in, 10 rows");
        let long = Layout {
            starts: &[0],
            len: 300,
        };
        assert!(g.reads_exactly(long, 0, 64));
        assert!(g.reads_exactly(long, 64, 300));
        assert!(
            !g.reads_exactly(long, 64, 80),
            "16 rows where a cold read uses tiles"
        );
        assert!(MATMUL_GRAIN.reads_exactly(long, 64, 80));
        // The plan reads a segment's rest, not past it, then the next segments while the
        // budget lasts, before another prompt.
        let plan = plan_step(&[prefill(58, 1)], BUDGET);
        assert_eq!(plan.prefill, vec![(0, 58)]);
        let question = SlotState::Prefill {
            segments: vec![(19, 4), (58, 4), (5, 4)],
            admitted: 2,
        };
        let plan = plan_step(&[prefill(600, 3), question.clone()], BUDGET);
        assert_eq!(plan.prefill, vec![(1, 19), (1, 58), (1, 5)]);
        let plan = plan_step(&[prefill(400, 3), question.clone()], BUDGET);
        assert_eq!(plan.prefill, vec![(1, 19), (1, 58), (1, 5), (0, 400)]);
        // While others generate, the chunk cap still bounds the step.
        let plan = plan_step(&[decode(), question], BUDGET);
        assert_eq!(plan.prefill, vec![(1, 19)]);
        let head = SlotState::Prefill {
            segments: vec![(100, 64), (5, 4)],
            admitted: 2,
        };
        assert_eq!(plan_step(&[decode(), head], BUDGET).prefill, vec![(1, 64)]);
    }

    #[test]
    fn no_free_slot_means_no_choice() {
        let free: [CachedSlot<'_, i32>; 0] = [];
        assert_eq!(
            place(
                &free,
                &[1],
                whole(&[1]),
                Reuse::Exact,
                FLASH_GRAIN,
                None,
                false
            ),
            None
        );
    }

    /// What a request of `prompt` (one segment) gets back from `stashed` after its placement
    /// among `slots`: the placement and the entry.
    fn restored(
        slots: &[CachedSlot<'_, i32>],
        stashed: &[CachedSlot<'_, i32>],
        prompt: &[i32],
        reuse: Reuse,
        window: Option<Window>,
    ) -> Option<(Placement, usize)> {
        let layout = whole(prompt);
        let placed = place(slots, prompt, layout, reuse, FLASH_GRAIN, window, false)?;
        restore(
            placed,
            slots,
            stashed,
            prompt,
            layout,
            reuse,
            FLASH_GRAIN,
            window,
        )
    }

    #[test]
    fn a_kept_cache_sharing_much_more_goes_back_into_the_least_valuable_free_slot() {
        let prompt = tokens(1..=300);
        let other = tokens(500..=700);
        let slots = [
            slot(0, &prompt[..70], 70, 5),
            slot(1, &other, 201, 1),
            CachedSlot {
                busy: true,
                ..slot(2, &[7], 1, 0)
            },
        ];
        assert_eq!(at(&slots, &prompt, Reuse::Fast), Some((0, 70)));
        let fast =
            |stashed: &[CachedSlot<'_, i32>]| restored(&slots, stashed, &prompt, Reuse::Fast, None);
        // The conversation's 260 tokens are kept: they go back into slot 0, whose 70 they
        // hold again, rather than give up slot 1's other conversation.
        let kept = [
            slot(0, &other[..50], 50, 0),
            slot(1, &prompt[..260], 260, 0),
        ];
        let back = Placement {
            slot: 0,
            reuse: 260,
            copy_from: None,
        };
        assert_eq!(fast(&kept), Some((back, 1)));
        // Between slots that would both be given up, the one sparing less goes: slot 1
        // (nothing) rather than slot 0, whose 40 tokens of the prompt precede 100 others.
        let branch: Vec<i32> = (1..=40).chain(900..=999).collect();
        let given_up = [slot(0, &branch, 140, 5), slot(1, &other, 201, 1), slots[2]];
        assert_eq!(
            restored(&given_up, &kept, &prompt, Reuse::Fast, None).map(|(p, _)| p.slot),
            Some(1)
        );
        // 31 tokens more than the slot is not worth the copy; 32 is.
        assert_eq!(fast(&[slot(0, &prompt[..101], 101, 0)]), None);
        let gain = fast(&[slot(0, &prompt[..102], 102, 0)]);
        assert_eq!(gain.map(|(p, i)| (p.reuse, i)), Some((102, 0)));
        // Nothing kept, or nothing shared.
        assert_eq!(fast(&[]), None);
        assert_eq!(fast(&[slot(0, &other, 201, 0)]), None);
        // A cold request reuses nothing, kept or not.
        assert_eq!(restored(&slots, &kept, &prompt, Reuse::Cold, None), None);
    }

    #[test]
    fn a_sequence_copied_back_past_its_window_is_reused_only_whole_and_not_exactly() {
        let saved = Held {
            first: 0,
            end: 1000,
            ordered: true,
        };
        assert_eq!(restored_held(saved, None), saved, "no sliding window");
        let short = Held { end: 400, ..saved };
        assert_eq!(
            restored_held(short, Some(512)),
            short,
            "all within the window"
        );
        let back = restored_held(saved, Some(512));
        assert_eq!(
            back,
            Held {
                first: 488,
                end: 1000,
                ordered: false
            }
        );
        let window = Some(Window {
            span: 512,
            cells: 1024,
        });
        let history = tokens(1..=1000);
        let kept = [CachedSlot {
            held: back,
            ..slot(0, &history, 1000, 0)
        }];
        let empty = [slot(0, &[], 0, 0)];
        let spared = |prompt: &[i32], reuse| {
            restored(&empty, &kept, prompt, reuse, window).map(|(p, _)| p.reuse)
        };
        // The next turn reads on from the whole history.
        let next = tokens(1..=1050);
        assert_eq!(spared(&next, Reuse::Fast), Some(1000));
        // Not a reproducible request: the cells are not where a cold read puts them.
        assert_eq!(spared(&next, Reuse::Exact), None);
        // Nor one that parts from the history inside the window.
        let edited: Vec<i32> = (1..=900).chain(5000..=5100).collect();
        assert_eq!(spared(&edited, Reuse::Fast), None);
        // With --swa-full (no window kept), the window's cells are still left out.
        assert_eq!(restored(&empty, &kept, &next, Reuse::Fast, None), None);
    }
}
