//! `backstop bench --hellaswag FILE`: how often a model picks the right ending of a sentence
//! among four (the HellaSwag benchmark), so that what a quantization costs shows in a task as
//! well as in perplexity.
//!
//! The file is llama.cpp's (`llama-perplexity --hellaswag`): six lines per task, the context,
//! the number of the right ending (0 to 3), and the four endings. Tasks are chosen as that
//! tool chooses them, and each is scored as it scores it, so that the figures compare with
//! its (README): each ending is read after the context and a space, and the ending whose
//! tokens have the highest mean log-probability is the model's pick (HellaSwag's `acc_norm`,
//! normalized per token). The context is read once for all four: it is shared by four
//! sequences of one decode.
//!
//! Beside the accuracy and its 95% interval, each model after the first is compared with the
//! first, task by task: how often they pick the same ending. Over a few hundred tasks the
//! accuracy's interval is several points wide, wider than most quantizations move it; the
//! share of picks that changed is what a quantization did to these tasks.
//!
//! Written here rather than taken from a crate: no crate scores llama.cpp's decodes, and the
//! task choice must draw the very numbers the tool's C++ draws (below).

use std::num::NonZeroU32;
use std::path::Path;

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};

use super::measure::{llama, BenchError, Setting};
use super::quality::log_sum_exp;

/// Tasks scored when `--hellaswag-tasks` is not given: llama-perplexity's default.
pub const DEFAULT_TASKS: usize = 400;

/// Endings per task.
const ENDINGS: usize = 4;

/// Lines per task in the file: the context, the right ending's number, the endings.
const LINES: usize = 2 + ENDINGS;

/// One task.
#[derive(Debug, Clone, PartialEq)]
struct Task {
    context: String,
    /// The right ending.
    gold: usize,
    endings: [String; ENDINGS],
}

/// The tasks a run scores.
#[derive(Debug, Clone)]
pub struct Tasks {
    /// The file, as the table names it.
    pub name: String,
    /// Tasks in the file.
    pub available: usize,
    tasks: Vec<Task>,
}

impl Tasks {
    /// Reads `path` and chooses `count` of its tasks (all of them when it has fewer).
    pub fn load(path: &Path, count: usize) -> Result<Tasks, String> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| format!("--hellaswag {name}: {e}"))?;
        let text =
            String::from_utf8(bytes).map_err(|_| format!("--hellaswag {name}: not UTF-8 text"))?;
        let all = parse(&text).map_err(|e| format!("--hellaswag {name}: {e}"))?;
        let available = all.len();
        Ok(Tasks {
            name,
            available,
            tasks: choose(all, count),
        })
    }

    /// Tasks to score.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }
}

/// The tasks of a file in llama.cpp's layout. Lines end with `\n` or `\r\n`.
fn parse(text: &str) -> Result<Vec<Task>, String> {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return Err("no tasks".into());
    }
    if lines.len() % LINES != 0 {
        return Err(format!(
            "{} lines, not a whole number of tasks: each is {LINES} lines (the context, the \
             number of the right ending from 0 to 3, and the four endings)",
            lines.len()
        ));
    }
    lines
        .chunks_exact(LINES)
        .enumerate()
        .map(|(i, lines)| {
            let at = i * LINES + 2;
            let gold = lines[1]
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&g| g < ENDINGS)
                .ok_or_else(|| {
                    format!(
                        "line {at}: {:?} is not the number of the right ending (0 to 3)",
                        lines[1]
                    )
                })?;
            Ok(Task {
                context: lines[0].to_owned(),
                gold,
                endings: [2, 3, 4, 5].map(|l| lines[l].to_owned()),
            })
        })
        .collect()
}

/// The first `count` tasks llama-perplexity picks: a Mersenne Twister seeded with 1 draws one
/// of the tasks left, uniformly, until `count` are drawn (all of them, in a drawn order, when
/// the file has no more).
fn choose(mut all: Vec<Task>, count: usize) -> Vec<Task> {
    let mut rng = Mt19937::new(1);
    let mut chosen = Vec::with_capacity(count.min(all.len()));
    while chosen.len() < count && !all.is_empty() {
        // A file of 2^32 tasks would be 4 billion tasks of text: the draw is over u32.
        let left = u32::try_from(all.len()).unwrap_or(u32::MAX);
        chosen.push(all.remove(rng.below(left) as usize));
    }
    chosen
}

/// The 32-bit Mersenne Twister (MT19937, Matsumoto and Nishimura 1998), as C++'s
/// `std::mt19937`: hand-written because the tasks must be the ones llama-perplexity draws,
/// and Rust's random crates do not promise this generator's exact sequence.
struct Mt19937 {
    state: [u32; 624],
    next: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, next: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.next == 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    v ^= 0x9908_b0df;
                }
                self.state[i] = v;
            }
            self.next = 0;
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// A number from 0 to `range - 1` as GCC's `std::uniform_int_distribution` draws it from
    /// this generator (libstdc++ 11 and later: Lemire's multiply-and-shift, redrawing the few
    /// values that would make it uneven), so a Linux build of llama-perplexity picks the
    /// same tasks.
    fn below(&mut self, range: u32) -> u32 {
        let mut product = u64::from(self.next_u32()) * u64::from(range);
        if (product as u32) < range {
            let threshold = range.wrapping_neg() % range;
            while (product as u32) < threshold {
                product = u64::from(self.next_u32()) * u64::from(range);
            }
        }
        (product >> 32) as u32
    }
}

/// One model's figures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hellaswag {
    /// Tasks scored.
    pub tasks: usize,
    /// Tasks whose right ending was the model's pick.
    pub correct: usize,
    /// `correct` over `tasks`, from 0 to 1.
    pub accuracy: f64,
    /// The Wilson score interval's bounds at 95%, as llama-perplexity gives it.
    pub low: f64,
    pub high: f64,
    /// The model whose picks these are set against (`None`: this one is the reference).
    pub reference: Option<String>,
    /// How often this model picked the same ending as the reference, from 0 to 1.
    pub same_pick: Option<f64>,
}

/// A reference's picks, one per task, for the models after it.
pub struct Picks {
    name: String,
    picks: Vec<usize>,
}

/// The Wilson score interval of `correct` successes in `n` at 95%.
fn wilson(correct: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    const Z: f64 = 1.959_963_984_540_054;
    let (n, p) = (n as f64, correct as f64 / n as f64);
    let z2 = Z * Z / n;
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n)).sqrt();
    let centre = p + z2 / 2.0;
    ((centre - half) / (1.0 + z2), (centre + half) / (1.0 + z2))
}

/// A task as tokens: each ending read after the context, the tokens the four share, and the
/// cells they take in the cache together.
struct Tokenized {
    endings: [Vec<LlamaToken>; ENDINGS],
    shared: usize,
}

impl Tokenized {
    fn cells(&self) -> usize {
        self.shared
            + self
                .endings
                .iter()
                .map(|e| e.len() - self.shared)
                .sum::<usize>()
    }
}

fn tokenize(model: &LlamaModel, task: &Task, number: usize) -> Result<Tokenized, String> {
    let vocab = model.vocab();
    let endings = task
        .endings
        .clone()
        .map(|ending| vocab.tokenize(format!("{} {ending}", task.context).as_bytes(), true, false));
    // The tokens all four begin with, but at least one of each ending's own: every ending is
    // scored from the row that predicts its first token (llama-perplexity reads past the end
    // of an ending that is another's beginning).
    let shortest = endings.iter().map(Vec::len).min().unwrap_or(0);
    let shared = (0..shortest.saturating_sub(1))
        .take_while(|&k| endings.iter().all(|e| e[k] == endings[0][k]))
        .count();
    if shared == 0 {
        return Err(format!(
            "task {number}: its endings share no first token (an empty context and no BOS), \
             so nothing before them predicts their first"
        ));
    }
    Ok(Tokenized { endings, shared })
}

/// One token of a task's decode: the sequences it belongs to, and when its row of logits is
/// read, the ending each next token is scored for.
struct Cell {
    token: LlamaToken,
    pos: i32,
    shared: bool,
    ending: usize,
    /// (ending, token) pairs this row predicts.
    targets: Vec<(usize, LlamaToken)>,
}

fn cells(t: &Tokenized) -> Vec<Cell> {
    let mut out = Vec::with_capacity(t.cells());
    for (p, &token) in t.endings[0][..t.shared].iter().enumerate() {
        // The last shared token predicts each ending's first.
        let targets = if p + 1 == t.shared {
            (0..ENDINGS).map(|e| (e, t.endings[e][p + 1])).collect()
        } else {
            Vec::new()
        };
        out.push(Cell {
            token,
            pos: p as i32,
            shared: true,
            ending: 0,
            targets,
        });
    }
    for (e, tokens) in t.endings.iter().enumerate() {
        for p in t.shared..tokens.len() {
            out.push(Cell {
                token: tokens[p],
                pos: p as i32,
                shared: false,
                ending: e,
                targets: tokens.get(p + 1).map(|&n| vec![(e, n)]).unwrap_or_default(),
            });
        }
    }
    out
}

/// Scores the tasks with a loaded model, and compares its picks with `reference`'s. Returns
/// its figures and its picks.
pub fn score(
    model: &LlamaModel,
    setting: &Setting,
    tasks: &Tasks,
    reference: Option<&Picks>,
    name: &str,
) -> Result<(Hellaswag, Picks), BenchError> {
    let tokenized = tasks
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| tokenize(model, t, i + 1))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BenchError::Quality(format!("{}: {e}", tasks.name)))?;
    let most = tokenized.iter().map(Tokenized::cells).max().unwrap_or(1);
    let longest = tokenized
        .iter()
        .flat_map(|t| t.endings.iter().map(Vec::len))
        .max()
        .unwrap_or(1);
    let train = usize::try_from(model.n_ctx_train()).unwrap_or(usize::MAX);
    if longest > train {
        return Err(BenchError::Quality(format!(
            "{}: a task of {longest} tokens, longer than {name}'s training context of {train}",
            tasks.name
        )));
    }
    let backend = crate::engine::backend().map_err(llama)?;
    let n_ctx = u32::try_from(most).map_err(llama)?;
    let n_batch = setting.batch.min(n_ctx);
    // One cache for the four sequences, so that the context's cells are theirs together.
    let params = setting
        .context_params()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_seq_max(ENDINGS as u32)
        .with_kv_unified(true);
    let mut ctx = model.new_context(backend, params).map_err(llama)?;
    let mut batch = LlamaBatch::new(n_batch as usize, ENDINGS as i32);
    let all: Vec<i32> = (0..ENDINGS as i32).collect();
    let mut picks = Vec::with_capacity(tokenized.len());
    for t in &tokenized {
        ctx.clear_kv_cache();
        let mut sums = [0.0f64; ENDINGS];
        let cells = cells(t);
        for part in cells.chunks(n_batch as usize) {
            batch.clear();
            for c in part {
                let seqs = if c.shared {
                    &all[..]
                } else {
                    &all[c.ending..=c.ending]
                };
                batch
                    .add(c.token, c.pos, seqs, !c.targets.is_empty())
                    .map_err(llama)?;
            }
            ctx.decode(&mut batch).map_err(llama)?;
            for (i, c) in part.iter().enumerate() {
                if c.targets.is_empty() {
                    continue;
                }
                let logits = ctx.get_logits_ith(i as i32);
                let (lse, _) = log_sum_exp(logits);
                for &(e, target) in &c.targets {
                    let logit = logits.get(target.0 as usize).copied().unwrap_or(f32::MIN);
                    sums[e] += f64::from(logit) - lse;
                }
            }
        }
        // The highest mean log-probability per token; the first of equals.
        let mut pick = 0;
        let mut best = f64::NEG_INFINITY;
        for (e, sum) in sums.iter().enumerate() {
            let mean = sum / (t.endings[e].len() - t.shared) as f64;
            if mean > best {
                (pick, best) = (e, mean);
            }
        }
        picks.push(pick);
    }
    let correct = tasks
        .tasks
        .iter()
        .zip(&picks)
        .filter(|(t, &p)| t.gold == p)
        .count();
    let n = picks.len();
    let (low, high) = wilson(correct, n);
    let same_pick = reference.map(|r| {
        let same = r.picks.iter().zip(&picks).filter(|(a, b)| a == b).count();
        same as f64 / n.max(1) as f64
    });
    let figures = Hellaswag {
        tasks: n,
        correct,
        accuracy: correct as f64 / n.max(1) as f64,
        low,
        high,
        reference: reference.map(|r| r.name.clone()),
        same_pick,
    };
    Ok((
        figures,
        Picks {
            name: name.to_owned(),
            picks,
        },
    ))
}

/// The line under the table that says what the columns are.
pub fn said(tasks: &Tasks) -> String {
    let of = if tasks.len() < tasks.available {
        format!("{} of the {} tasks", tasks.len(), tasks.available)
    } else {
        format!("the {} tasks", tasks.len())
    };
    format!(
        "hellaswag: how often the model picked the right ending, over {of} of {} (drawn as \
         llama-perplexity draws them), [its 95% interval]; same pick: how often it picked what \
         the (ref) model picked\n",
        tasks.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(n: usize) -> String {
        format!("context {n}\n{}\na {n}\nb {n}\nc {n}\nd {n}\n", n % 4)
    }

    #[test]
    fn the_mersenne_twister_draws_cpps_numbers() {
        // The C++ standard's check: the 10,000th number of a default-seeded std::mt19937.
        let mut rng = Mt19937::new(5489);
        let last = (0..10_000).map(|_| rng.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
        // Seeded with 1, as llama-perplexity seeds it.
        let mut rng = Mt19937::new(1);
        assert_eq!(
            [rng.next_u32(), rng.next_u32(), rng.next_u32()],
            [1_791_095_845, 4_282_876_139, 3_093_770_124]
        );
    }

    #[test]
    fn draws_below_a_range_are_in_it_and_even() {
        let mut rng = Mt19937::new(7);
        let mut seen = [0usize; 6];
        for _ in 0..60_000 {
            seen[rng.below(6) as usize] += 1;
        }
        assert!(
            seen.iter().all(|&n| (9_000..11_000).contains(&n)),
            "{seen:?}"
        );
        assert_eq!(Mt19937::new(1).below(1), 0);
        // The multiply-and-shift: the first number seeded with 1 is 1791095845, and
        // 1791095845 * 10 >> 32 is 4.
        assert_eq!(Mt19937::new(1).below(10), 4);
    }

    #[test]
    fn files_are_read_six_lines_a_task() {
        let text: String = (0..3).map(task).collect();
        let tasks = parse(&text).unwrap();
        assert_eq!(tasks.len(), 3);
        assert_eq!(tasks[2].context, "context 2");
        assert_eq!(tasks[2].gold, 2);
        assert_eq!(tasks[2].endings[3], "d 2");
        // Windows line ends read alike.
        assert_eq!(parse(&text.replace('\n', "\r\n")).unwrap(), tasks);

        let cut = parse(&text[..text.len() - 4]).unwrap_err();
        assert!(cut.starts_with("17 lines, not a whole number"), "{cut}");
        let bad = parse(&text.replacen("\n1\n", "\n4\n", 1)).unwrap_err();
        assert_eq!(
            bad,
            "line 8: \"4\" is not the number of the right ending (0 to 3)"
        );
        assert!(parse(&text.replacen("\n0\n", "\nzero\n", 1)).is_err());
        assert_eq!(parse("").unwrap_err(), "no tasks");
    }

    #[test]
    fn tasks_are_chosen_as_llama_perplexity_chooses_them() {
        let all = parse(&(0..10).map(task).collect::<String>()).unwrap();
        let chosen = choose(all.clone(), 3);
        assert_eq!(chosen.len(), 3);
        // The first draw is 4 of 10 (above); then one of the 9 left, and so on.
        assert_eq!(chosen[0].context, "context 4");
        // More than the file has: every task once.
        let every = choose(all.clone(), 100);
        let mut names: Vec<_> = every.iter().map(|t| t.context.clone()).collect();
        names.sort();
        let mut want: Vec<_> = all.iter().map(|t| t.context.clone()).collect();
        want.sort();
        assert_eq!(names, want);
        // The same draw each time.
        assert_eq!(choose(all, 3), chosen);
    }

    #[test]
    fn wilson_intervals_match_llama_perplexity() {
        // llama-perplexity prints 50.00000000% [23.6593%, 76.3407%] after 10 tasks, 5 right.
        let (low, high) = wilson(5, 10);
        assert!((low - 0.236593).abs() < 1e-6 && (high - 0.763407).abs() < 1e-6);
        let (low, high) = wilson(10, 10);
        assert!(high > 0.999_999 && (low - 0.722467).abs() < 1e-5, "{low}");
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }
}
