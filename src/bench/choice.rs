//! `backstop bench --hellaswag FILE`, `--winogrande FILE` and `--multiple-choice FILE`: how
//! often a model picks the right one of a few ways to go on (HellaSwag, Winogrande, and the
//! multiple-choice sets ARC, MMLU and TruthfulQA), so that what a quantization costs shows in
//! tasks as well as in perplexity.
//!
//! The files are llama.cpp's (`llama-perplexity --hellaswag`, `--winogrande` and
//! `--multiple-choice`), tasks are
//! drawn from them as that tool draws them, and each is scored as it scores it, so that the
//! figures compare with its (README). Each way of going on is one sequence of tokens; the
//! tokens they all begin with are read once, shared by the sequences of one decode; a
//! sequence's score is the mean log-probability of the tokens of it that are scored, and the
//! highest score is the model's pick.
//!
//! - HellaSwag: six lines a task, the context, the number of the right ending (0 to 3), and
//!   four endings. Each ending is read after the context and a space, and all its tokens are
//!   scored (HellaSwag's `acc_norm`).
//! - Winogrande: CSV lines of an index, a sentence with a `_` for a blank, two choices for it
//!   and the right one's number (1 or 2). Each choice is put in the blank; when both sentences
//!   go on for more than three tokens after where they part, only the tokens after the choice
//!   are scored, but the last (the "partial" scoring of the Winogrande paper, as
//!   llama-perplexity does it); otherwise every token from where they part, but the last.
//! - Multiple choice: the tool's binary file (little-endian): the task count, each task's
//!   offset, then each task: a question, and two lists of answers (strings and their 32-bit
//!   labels, 1 for right), of which the first is scored: each answer is read after the
//!   question and a space, all its tokens scored, as in HellaSwag.
//!
//! Beside the accuracy and its 95% interval, each model after the first is compared with the
//! first, task by task: how often they pick the same. Over a few hundred tasks the accuracy's
//! interval is several points wide, wider than most quantizations move it; the share of picks
//! that changed is what a quantization did to these tasks.
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

/// HellaSwag tasks scored when `--hellaswag-tasks` is not given: llama-perplexity's default.
/// (Winogrande's default is every task, as the tool's.)
pub const HELLASWAG_TASKS: usize = 400;

/// HellaSwag's endings per task.
const ENDINGS: usize = 4;

/// Lines per HellaSwag task: the context, the right ending's number, the endings.
const LINES: usize = 2 + ENDINGS;

/// Winogrande scores the tokens after the choice only when both sentences go on for more than
/// this many tokens after where they part (llama-perplexity's `k_min_trailing_ctx`).
const MIN_TRAILING: usize = 3;

/// Which benchmark a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hellaswag,
    Winogrande,
    MultipleChoice,
}

impl Kind {
    /// Every benchmark, in the order the table gives them.
    pub const ALL: [Kind; 3] = [Kind::Hellaswag, Kind::Winogrande, Kind::MultipleChoice];

    /// Its name in the table, JSON and CSV.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hellaswag => "hellaswag",
            Kind::Winogrande => "winogrande",
            Kind::MultipleChoice => "multiple_choice",
        }
    }

    /// Its command-line option.
    pub fn option(self) -> &'static str {
        match self {
            Kind::Hellaswag => "--hellaswag",
            Kind::Winogrande => "--winogrande",
            Kind::MultipleChoice => "--multiple-choice",
        }
    }
}

/// Answers a multiple-choice task may have, at most (llama-perplexity's limit).
const MOST_ANSWERS: usize = 100;

/// One task.
#[derive(Debug, Clone, PartialEq)]
enum Task {
    Hellaswag {
        context: String,
        /// The right ending.
        gold: usize,
        endings: [String; ENDINGS],
    },
    Winogrande {
        /// The sentence before and after its blank.
        first: String,
        second: String,
        choices: [String; 2],
        /// The right choice, from 0.
        gold: usize,
    },
    MultipleChoice {
        question: String,
        answers: Vec<String>,
        /// Which answers are right.
        right: Vec<bool>,
    },
}

impl Task {
    /// Whether the answer numbered `pick` (from 0) is right.
    fn is_right(&self, pick: usize) -> bool {
        match self {
            Task::Hellaswag { gold, .. } | Task::Winogrande { gold, .. } => *gold == pick,
            Task::MultipleChoice { right, .. } => right.get(pick).copied().unwrap_or(false),
        }
    }
}

/// The tasks a run scores.
#[derive(Debug, Clone)]
pub struct Tasks {
    pub kind: Kind,
    /// The file, as the table names it.
    pub name: String,
    /// Tasks in the file.
    pub available: usize,
    tasks: Vec<Task>,
}

impl Tasks {
    /// Reads `path` and chooses `count` of its tasks (`None`: the benchmark's default; all of
    /// them when it has fewer).
    pub fn load(kind: Kind, path: &Path, count: Option<usize>) -> Result<Tasks, String> {
        let name = path.display().to_string();
        let option = format!("{} {name}", kind.option());
        let bytes = std::fs::read(path).map_err(|e| format!("{option}: {e}"))?;
        let read = || -> Result<(usize, Vec<Task>), String> {
            let text = || std::str::from_utf8(&bytes).map_err(|_| "not UTF-8 text".to_owned());
            match kind {
                Kind::Hellaswag => {
                    let all = parse_hellaswag(text()?)?;
                    let count = count.unwrap_or(HELLASWAG_TASKS);
                    Ok((all.len(), draw_hellaswag(all, count)))
                }
                Kind::Winogrande => {
                    let all = parse_winogrande(text()?)?;
                    let count = count.unwrap_or(usize::MAX);
                    Ok((all.len(), draw_winogrande(all, count)))
                }
                Kind::MultipleChoice => parse_multiple_choice(&bytes, count.unwrap_or(usize::MAX)),
            }
        };
        let (available, tasks) = read().map_err(|e| format!("{option}: {e}"))?;
        Ok(Tasks {
            kind,
            name,
            available,
            tasks,
        })
    }

    /// Tasks to score.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }
}

/// HellaSwag tasks in llama.cpp's layout. Lines end with `\n` or `\r\n`.
fn parse_hellaswag(text: &str) -> Result<Vec<Task>, String> {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return Err("no tasks".into());
    }
    if !lines.len().is_multiple_of(LINES) {
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
            Ok(Task::Hellaswag {
                context: lines[0].to_owned(),
                gold,
                endings: [2, 3, 4, 5].map(|l| lines[l].to_owned()),
            })
        })
        .collect()
}

/// Winogrande tasks in llama.cpp's CSV: `index,sentence,choice 1,choice 2,answer`, the
/// sentence in double quotes where it holds a comma, one task a line. The first line may be a
/// header; blank lines are passed over; any other line that is not a task is refused with its
/// number (llama-perplexity passes over it, and scores fewer tasks than the file has).
fn parse_winogrande(text: &str) -> Result<Vec<Task>, String> {
    let mut tasks = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match winogrande_line(line) {
            Ok(task) => tasks.push(task),
            Err(_) if i == 0 => {}
            Err(why) => return Err(format!("line {}: {why}", i + 1)),
        }
    }
    if tasks.is_empty() {
        return Err("no tasks".into());
    }
    Ok(tasks)
}

fn winogrande_line(line: &str) -> Result<Task, String> {
    // The first four commas outside double quotes (ASCII, so byte offsets are char bounds).
    let mut commas = Vec::with_capacity(4);
    let mut quoted = false;
    for (i, b) in line.bytes().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                commas.push(i);
                if commas.len() == 4 {
                    break;
                }
            }
            _ => {}
        }
    }
    let &[a, b, c, d] = commas.as_slice() else {
        return Err("not five fields: index, sentence, choice 1, choice 2, answer".into());
    };
    let sentence = &line[a + 1..b];
    let sentence = sentence
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(sentence);
    let Some((first, second)) = sentence.split_once('_') else {
        return Err(format!("{sentence:?} has no _ for the choice"));
    };
    let answer = line[d + 1..].trim();
    let gold = match answer {
        "1" => 0,
        "2" => 1,
        _ => {
            return Err(format!(
                "{answer:?} is not the right choice's number (1 or 2)"
            ))
        }
    };
    Ok(Task::Winogrande {
        first: first.to_owned(),
        second: second.to_owned(),
        choices: [line[b + 1..c].to_owned(), line[c + 1..d].to_owned()],
        gold,
    })
}

/// The tasks of llama-perplexity's multiple-choice file, `count` of them drawn as the tool
/// draws them when it holds more (otherwise all, in its order), and how many it holds.
fn parse_multiple_choice(bytes: &[u8], count: usize) -> Result<(usize, Vec<Task>), String> {
    let mut at = Reader { bytes, at: 0 };
    let n = at.u32("the task count")? as usize;
    if n == 0 {
        return Err("no tasks".into());
    }
    let offsets = (0..n)
        .map(|_| at.u32("the tasks' offsets"))
        .collect::<Result<Vec<_>, _>>()?;
    // All of them are read in turn; fewer, each from its offset.
    let drawn = (count < n).then(|| draw_scaled(n, count));
    let order = drawn.clone().unwrap_or_else(|| (0..n).collect());
    let mut tasks = Vec::with_capacity(order.len());
    for i in order {
        if drawn.is_some() {
            at.at = offsets[i] as usize;
        }
        let task = multiple_choice_task(&mut at).map_err(|e| format!("task {}: {e}", i + 1))?;
        tasks.push(task);
    }
    Ok((n, tasks))
}

/// One multiple-choice task at the reader's place: its question and first list of answers
/// (the second, several of which may be right, is read past: the tool does not score it).
fn multiple_choice_task(at: &mut Reader) -> Result<Task, String> {
    let question = at.string("the question")?;
    let (answers, labels) = at.answers()?;
    at.answers()?;
    if question.is_empty() {
        return Err("an empty question".into());
    }
    if answers.is_empty() || answers.iter().any(String::is_empty) {
        return Err("no answers, or an empty one".into());
    }
    Ok(Task::MultipleChoice {
        question,
        answers,
        right: labels.into_iter().map(|l| l == 1).collect(),
    })
}

/// Reads llama-perplexity's little-endian multiple-choice file.
struct Reader<'b> {
    bytes: &'b [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "cut short in {what} (byte {} of {})",
                self.at,
                self.bytes.len()
            ));
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u32(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8 text"))
    }

    /// A list of answers and their labels.
    fn answers(&mut self) -> Result<(Vec<String>, Vec<i32>), String> {
        let n = self.u32("an answer count")? as usize;
        if n > MOST_ANSWERS {
            return Err(format!("{n} answers, more than {MOST_ANSWERS}"));
        }
        let answers = (0..n)
            .map(|_| self.string("an answer"))
            .collect::<Result<Vec<_>, _>>()?;
        let labels = (0..n)
            .map(|_| self.u32("the answers' labels").map(|l| l as i32))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((answers, labels))
    }
}

/// The first `count` HellaSwag tasks llama-perplexity picks: a Mersenne Twister seeded with 1
/// draws one of the tasks left, uniformly, until `count` are drawn (all of them, in a drawn
/// order, when the file has no more).
fn draw_hellaswag(all: Vec<Task>, count: usize) -> Vec<Task> {
    let mut rng = Mt19937::new(1);
    let mut left: Vec<usize> = (0..all.len()).collect();
    let mut chosen = Vec::with_capacity(count.min(all.len()));
    while chosen.len() < count && !left.is_empty() {
        // A file of 2^32 tasks would be 4 billion tasks of text: the draw is over u32.
        let n = u32::try_from(left.len()).unwrap_or(u32::MAX);
        chosen.push(left.remove(rng.below(n) as usize));
    }
    take(all, &chosen)
}

/// The tasks numbered `chosen`, in its order.
fn take(all: Vec<Task>, chosen: &[usize]) -> Vec<Task> {
    let mut all: Vec<Option<Task>> = all.into_iter().map(Some).collect();
    chosen.iter().filter_map(|&i| all[i].take()).collect()
}

/// The `count` Winogrande tasks llama-perplexity picks when the file has more (otherwise all,
/// in the file's order): the same generator, each draw scaled to the tasks left in single
/// precision as its C++ scales it, the task drawn replaced by the last one left.
fn draw_winogrande(all: Vec<Task>, count: usize) -> Vec<Task> {
    if count >= all.len() {
        return all;
    }
    let chosen = draw_scaled(all.len(), count);
    take(all, &chosen)
}

/// `count` of `n` task numbers as llama-perplexity draws Winogrande's and multiple-choice
/// tasks: each number from the generator scaled to the numbers left in single precision, as
/// its C++ scales it, the number drawn replaced by the last one left.
fn draw_scaled(n: usize, count: usize) -> Vec<usize> {
    let mut rng = Mt19937::new(1);
    // 1 / (1 + 2^32 - 1) in f32 is 2^-32.
    let scale = 1.0f32 / (1.0f32 + u32::MAX as f32);
    let mut index: Vec<usize> = (0..n).collect();
    let mut chosen = Vec::with_capacity(count.min(n));
    while chosen.len() < count && !index.is_empty() {
        let j = (scale * rng.next_u32() as f32 * index.len() as f32) as usize;
        // A draw within 128 of 2^32 rounds to 1.0 in f32 (where the tool reads past its list).
        let j = j.min(index.len() - 1);
        chosen.push(index.swap_remove(j));
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

/// One model's figures on one benchmark.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskScore {
    /// Tasks scored.
    pub tasks: usize,
    /// Tasks whose right answer was the model's pick.
    pub correct: usize,
    /// `correct` over `tasks`, from 0 to 1.
    pub accuracy: f64,
    /// The Wilson score interval's bounds at 95%, as llama-perplexity gives it for HellaSwag.
    pub low: f64,
    pub high: f64,
    /// The model whose picks these are set against (`None`: this one is the reference).
    pub reference: Option<String>,
    /// How often this model picked what the reference picked, from 0 to 1.
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

/// A task as tokens: one sequence for each way of going on, the tokens they all begin with,
/// and the tokens of each that are scored (`from..to`).
struct Scored {
    seqs: Vec<Vec<LlamaToken>>,
    shared: usize,
    from: Vec<usize>,
    to: Vec<usize>,
}

impl Scored {
    /// Cells the task takes in the cache: the shared tokens once, and each sequence's own.
    fn cells(&self) -> usize {
        self.shared
            + self
                .seqs
                .iter()
                .map(|s| s.len() - self.shared)
                .sum::<usize>()
    }

    /// The sequences and what they share, every token of each after that scored. What they
    /// share is capped so that each has a token of its own after it, and every token scored
    /// has its predicting row in the decode.
    fn of(seqs: Vec<Vec<LlamaToken>>, number: usize) -> Result<Scored, String> {
        let shortest = seqs.iter().map(Vec::len).min().unwrap_or(0);
        let shared = (0..shortest.saturating_sub(1))
            .take_while(|&k| seqs.iter().all(|s| s[k] == seqs[0][k]))
            .count();
        if shared == 0 {
            return Err(format!(
                "task {number}: its texts share no first token (nothing before them and no \
                 BOS), so nothing predicts their first"
            ));
        }
        let from = vec![shared; seqs.len()];
        let to = seqs.iter().map(Vec::len).collect();
        Ok(Scored {
            seqs,
            shared,
            from,
            to,
        })
    }
}

fn tokenize(model: &LlamaModel, task: &Task, number: usize) -> Result<Scored, String> {
    let vocab = model.vocab();
    let tokens = |text: String| vocab.tokenize(text.as_bytes(), true, false);
    // Each ending (or answer) read after the context and a space, every token of it scored.
    let whole = |context: &str, endings: &[String]| {
        let seqs = endings
            .iter()
            .map(|e| tokens(format!("{context} {e}")))
            .collect();
        Scored::of(seqs, number)
    };
    match task {
        Task::Hellaswag {
            context, endings, ..
        } => whole(context, endings),
        Task::MultipleChoice {
            question, answers, ..
        } => whole(question, answers),
        Task::Winogrande {
            first,
            second,
            choices,
            ..
        } => {
            let seqs: Vec<_> = choices
                .iter()
                .map(|c| tokens(format!("{first}{c}{second}")))
                .collect();
            // Where each sentence's choice ends.
            let bases: Vec<usize> = choices
                .iter()
                .map(|c| tokens(format!("{first}{c}")).len())
                .collect();
            let mut scored = Scored::of(seqs, number)?;
            let shared = scored.shared;
            // Each sentence's length, which `of` scores to.
            let lens = scored.to.clone();
            let after = lens.iter().all(|&n| n - shared > MIN_TRAILING);
            for k in 0..lens.len() {
                // The tokens after the choice when both go on long enough; otherwise from
                // where the sentences part. Never the last when more than one is left.
                let from = if after {
                    bases[k].clamp(shared, lens[k] - 1)
                } else {
                    shared
                };
                scored.from[k] = from;
                scored.to[k] = lens[k] - usize::from(lens[k] - from > 1);
            }
            Ok(scored)
        }
    }
}

/// One token of a task's decode: the sequences it belongs to (all of them, or one), and what
/// its row of logits predicts: (sequence, token) pairs scored.
struct Cell {
    token: LlamaToken,
    pos: i32,
    seq: Option<usize>,
    targets: Vec<(usize, LlamaToken)>,
}

fn cells(t: &Scored) -> Vec<Cell> {
    let mut out = Vec::with_capacity(t.cells());
    // Whether sequence k's token at `next` is scored.
    let scored = |k: usize, next: usize| (t.from[k]..t.to[k]).contains(&next);
    for (p, &token) in t.seqs[0][..t.shared].iter().enumerate() {
        let targets: Vec<_> = (0..t.seqs.len())
            .filter(|&k| scored(k, p + 1))
            .map(|k| (k, t.seqs[k][p + 1]))
            .collect();
        out.push(Cell {
            token,
            pos: p as i32,
            seq: None,
            targets,
        });
    }
    for (k, tokens) in t.seqs.iter().enumerate() {
        for p in t.shared..tokens.len() {
            let targets: Vec<_> = tokens
                .get(p + 1)
                .filter(|_| scored(k, p + 1))
                .map(|&n| (k, n))
                .into_iter()
                .collect();
            out.push(Cell {
                token: tokens[p],
                pos: p as i32,
                seq: Some(k),
                targets,
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
) -> Result<(TaskScore, Picks), BenchError> {
    let scored = tasks
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| tokenize(model, t, i + 1))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BenchError::Quality(format!("{}: {e}", tasks.name)))?;
    let most = scored.iter().map(Scored::cells).max().unwrap_or(1);
    let longest = scored
        .iter()
        .flat_map(|t| t.seqs.iter().map(Vec::len))
        .max()
        .unwrap_or(1);
    let train = usize::try_from(model.n_ctx_train()).unwrap_or(usize::MAX);
    if longest > train {
        return Err(BenchError::Quality(format!(
            "{}: a task of {longest} tokens, longer than {name}'s training context of {train}",
            tasks.name
        )));
    }
    let n_seqs = scored.iter().map(|t| t.seqs.len()).max().unwrap_or(1);
    let backend = crate::engine::backend().map_err(llama)?;
    let n_ctx = u32::try_from(most).map_err(llama)?;
    let n_batch = setting.batch.min(n_ctx);
    // One cache for the sequences, so that the tokens they share are in it once.
    let params = setting
        .context_params()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch)
        .with_n_seq_max(n_seqs as u32)
        .with_kv_unified(true);
    let mut ctx = model.new_context(backend, params).map_err(llama)?;
    let mut batch = LlamaBatch::new(n_batch as usize, n_seqs as i32);
    let all: Vec<i32> = (0..n_seqs as i32).collect();
    let mut picks = Vec::with_capacity(scored.len());
    for t in &scored {
        crate::engine::forget_all(&mut ctx);
        let mut sums = vec![0.0f64; t.seqs.len()];
        let cells = cells(t);
        for part in cells.chunks(n_batch as usize) {
            batch.clear();
            for c in part {
                let seqs = match c.seq {
                    None => &all[..t.seqs.len()],
                    Some(k) => &all[k..=k],
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
                for &(k, target) in &c.targets {
                    let logit = logits.get(target.0 as usize).copied().unwrap_or(f32::MIN);
                    sums[k] += f64::from(logit) - lse;
                }
            }
        }
        // The highest mean log-probability per scored token; the first of equals.
        let mut pick = 0;
        let mut best = f64::NEG_INFINITY;
        for (k, sum) in sums.iter().enumerate() {
            let mean = sum / (t.to[k] - t.from[k]).max(1) as f64;
            if mean > best {
                (pick, best) = (k, mean);
            }
        }
        picks.push(pick);
    }
    let correct = tasks
        .tasks
        .iter()
        .zip(&picks)
        .filter(|(t, &p)| t.is_right(p))
        .count();
    let n = picks.len();
    let (low, high) = wilson(correct, n);
    let same_pick = reference.map(|r| {
        let same = r.picks.iter().zip(&picks).filter(|(a, b)| a == b).count();
        same as f64 / n.max(1) as f64
    });
    let figures = TaskScore {
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

/// The line under the table that says what a benchmark's columns are.
pub fn said(tasks: &Tasks) -> String {
    let of = if tasks.len() < tasks.available {
        format!("{} of the {} tasks", tasks.len(), tasks.available)
    } else {
        format!("the {} tasks", tasks.len())
    };
    let kind = tasks.kind.name();
    format!(
        "{kind}: how often the model picked the right answer, over {of} of {} (drawn as \
         llama-perplexity draws them), [its 95% interval]; {kind} same: how often it picked \
         what the (ref) model picked\n",
        tasks.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(n: usize) -> String {
        format!("context {n}\n{}\na {n}\nb {n}\nc {n}\nd {n}\n", n % 4)
    }

    fn contexts(tasks: &[Task]) -> Vec<String> {
        tasks
            .iter()
            .map(|t| match t {
                Task::Hellaswag { context, .. } => context.clone(),
                Task::Winogrande { first, .. } => first.clone(),
                Task::MultipleChoice { question, .. } => question.clone(),
            })
            .collect()
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
    fn hellaswag_files_are_read_six_lines_a_task() {
        let text: String = (0..3).map(task).collect();
        let tasks = parse_hellaswag(&text).unwrap();
        assert_eq!(tasks.len(), 3);
        assert_eq!(
            tasks[2],
            Task::Hellaswag {
                context: "context 2".into(),
                gold: 2,
                endings: ["a 2", "b 2", "c 2", "d 2"].map(String::from),
            }
        );
        // Windows line ends read alike.
        assert_eq!(parse_hellaswag(&text.replace('\n', "\r\n")).unwrap(), tasks);

        let cut = parse_hellaswag(&text[..text.len() - 4]).unwrap_err();
        assert!(cut.starts_with("17 lines, not a whole number"), "{cut}");
        let bad = parse_hellaswag(&text.replacen("\n1\n", "\n4\n", 1)).unwrap_err();
        assert_eq!(
            bad,
            "line 8: \"4\" is not the number of the right ending (0 to 3)"
        );
        assert!(parse_hellaswag(&text.replacen("\n0\n", "\nzero\n", 1)).is_err());
        assert_eq!(parse_hellaswag("").unwrap_err(), "no tasks");
    }

    #[test]
    fn winogrande_files_are_read_a_line_a_task() {
        let text = "index,sentence,option1,option2,answer\n\
                    0,Sam lent Alex a pen because _ had two.,Sam,Alex,1\n\
                    \n\
                    1,\"Ana thanked Bea, as _ had helped.\",Ana,Bea,2\r\n";
        let tasks = parse_winogrande(text).unwrap();
        assert_eq!(
            tasks,
            [
                Task::Winogrande {
                    first: "Sam lent Alex a pen because ".into(),
                    second: " had two.".into(),
                    choices: ["Sam".into(), "Alex".into()],
                    gold: 0,
                },
                Task::Winogrande {
                    first: "Ana thanked Bea, as ".into(),
                    second: " had helped.".into(),
                    choices: ["Ana".into(), "Bea".into()],
                    gold: 1,
                },
            ]
        );
        // Without a header alike; a line that is not a task, after the first, is refused.
        assert_eq!(
            parse_winogrande(text.split_once('\n').unwrap().1).unwrap(),
            tasks
        );
        let refused = |text: &str| parse_winogrande(text).unwrap_err();
        assert_eq!(
            refused("0,A _ b.,x,y,1\n1,A b.,x,y,1\n"),
            "line 2: \"A b.\" has no _ for the choice"
        );
        assert_eq!(
            refused("0,A _ b.,x,y,1\n1,A _ b.,x,y,3\n"),
            "line 2: \"3\" is not the right choice's number (1 or 2)"
        );
        assert!(refused("0,A _ b.,x,y,1\n1,A _ b.,x\n").starts_with("line 2: not five fields"));
        assert_eq!(
            refused("index,sentence,option1,option2,answer\n"),
            "no tasks"
        );
        assert_eq!(refused(""), "no tasks");
    }

    #[test]
    fn tasks_are_drawn_as_llama_perplexity_draws_them() {
        let all = parse_hellaswag(&(0..10).map(task).collect::<String>()).unwrap();
        let chosen = draw_hellaswag(all.clone(), 3);
        assert_eq!(chosen.len(), 3);
        // The first draw is 4 of 10 (above); then one of the 9 left, and so on.
        assert_eq!(contexts(&chosen)[0], "context 4");
        // More than the file has: every task once.
        let mut every = contexts(&draw_hellaswag(all.clone(), 100));
        every.sort();
        let mut want = contexts(&all);
        want.sort();
        assert_eq!(every, want);
        // The same draw each time.
        assert_eq!(draw_hellaswag(all, 3), chosen);

        let line = |n: usize| format!("{n},Task {n} _ here.,a,b,1\n");
        let all = parse_winogrande(&(0..10).map(line).collect::<String>()).unwrap();
        // All of them: the file's order.
        assert_eq!(draw_winogrande(all.clone(), 10), all);
        // Fewer: 1791095845 / 2^32 * 10 is 4.17, so task 4 first; task 9 takes its place.
        let some = draw_winogrande(all.clone(), 4);
        assert_eq!(contexts(&some)[0], "Task 4 ");
        let mut distinct = contexts(&some);
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 4);
        assert_eq!(draw_winogrande(all, 4), some);
    }

    /// llama-perplexity's multiple-choice file of `tasks`: (question, answers, right answer).
    pub(super) fn multiple_choice_file(tasks: &[(&str, &[&str], usize)]) -> Vec<u8> {
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend((s.len() as u32).to_le_bytes());
            out.extend(s.as_bytes());
        };
        let mut body = Vec::new();
        let mut offsets = Vec::new();
        let head = 4 + 4 * tasks.len();
        for (question, answers, right) in tasks {
            offsets.push((head + body.len()) as u32);
            string(&mut body, question);
            for list in [*answers, &answers[..1]] {
                body.extend((list.len() as u32).to_le_bytes());
                for a in list {
                    string(&mut body, a);
                }
                for i in 0..list.len() {
                    body.extend(u32::from(i == *right).to_le_bytes());
                }
            }
        }
        let mut out = (tasks.len() as u32).to_le_bytes().to_vec();
        for o in offsets {
            out.extend(o.to_le_bytes());
        }
        out.extend(body);
        out
    }

    #[test]
    fn multiple_choice_files_are_read_and_drawn_as_the_tool_reads_them() {
        let tasks: Vec<(String, Vec<&str>, usize)> = (0..10)
            .map(|i| (format!("Question {i}?"), vec!["yes", "no", "maybe"], i % 3))
            .collect();
        let borrowed: Vec<(&str, &[&str], usize)> = tasks
            .iter()
            .map(|(q, a, r)| (q.as_str(), a.as_slice(), *r))
            .collect();
        let file = multiple_choice_file(&borrowed);
        let (n, all) = parse_multiple_choice(&file, usize::MAX).unwrap();
        assert_eq!((n, all.len()), (10, 10));
        assert_eq!(
            all[4],
            Task::MultipleChoice {
                question: "Question 4?".into(),
                answers: vec!["yes".into(), "no".into(), "maybe".into()],
                right: vec![false, true, false],
            }
        );
        assert!(all[4].is_right(1) && !all[4].is_right(0) && !all[4].is_right(7));
        // Fewer: drawn by offset, as Winogrande's are drawn (task 4 first).
        let (n, some) = parse_multiple_choice(&file, 3).unwrap();
        assert_eq!((n, contexts(&some)[0].as_str()), (10, "Question 4?"));
        assert_eq!(some.len(), 3);

        let refused = |bytes: &[u8]| parse_multiple_choice(bytes, usize::MAX).unwrap_err();
        assert_eq!(refused(&[]), "cut short in the task count (byte 0 of 0)");
        assert_eq!(refused(&0u32.to_le_bytes()), "no tasks");
        let cut = refused(&file[..file.len() - 3]);
        assert!(cut.starts_with("task 10: cut short in "), "{cut}");
        let empty = multiple_choice_file(&[("", &["a", "b"], 0)]);
        assert_eq!(refused(&empty), "task 1: an empty question");
        let none = multiple_choice_file(&[("Q?", &["a", ""], 0)]);
        assert_eq!(refused(&none), "task 1: no answers, or an empty one");
        let many: Vec<String> = (0..101).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let many = multiple_choice_file(&[("Q?", &many, 0)]);
        assert_eq!(refused(&many), "task 1: 101 answers, more than 100");
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
