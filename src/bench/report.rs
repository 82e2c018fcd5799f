//! `backstop bench`'s results: median and spread per figure, as a markdown table, JSON or CSV.

use serde::{Deserialize, Serialize};

use super::baseline::{Baseline, Compared, Versus, WITHIN_SPREAD};
use super::choice::{Kind, TaskScore};
use super::measure::{Rep, Setting, Test};
use super::quality::Quality;

/// A figure over the repetitions.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Figure {
    /// Median tokens per second.
    pub median: f64,
    /// Lowest.
    pub min: f64,
    /// Highest.
    pub max: f64,
}

impl Figure {
    /// Median and spread of some samples.
    pub fn of(mut v: Vec<f64>) -> Figure {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Figure {
                median: 0.0,
                min: 0.0,
                max: 0.0,
            };
        }
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Figure {
            median,
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    /// Median and spread of a figure every repetition measured, `None` if none did (or
    /// there were none: a run of quality alone).
    fn over(samples: impl Iterator<Item = Option<f64>>) -> Option<Figure> {
        samples
            .collect::<Option<Vec<f64>>>()
            .filter(|v| !v.is_empty())
            .map(Figure::of)
    }

    fn cell(&self) -> String {
        self.cell_in(1, "")
    }

    /// `median (min–max)` with `digits` decimals, `unit` after the median.
    pub(super) fn cell_in(&self, digits: usize, unit: &str) -> String {
        format!(
            "{:.digits$}{unit} ({:.digits$}–{:.digits$})",
            self.median, self.min, self.max
        )
    }
}

/// One model's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelResult {
    /// The file.
    pub file: String,
    /// File size in bytes.
    pub size: u64,
    /// Quantization (`Q4_K_M`).
    pub quantization: String,
    /// Parameter count, short (`134.52M`).
    pub parameters: String,
    /// Architecture.
    pub architecture: String,
    /// Compute backend.
    pub backend: String,
    /// The settings it was measured with.
    #[serde(flatten)]
    pub setting: Setting,
    /// Tokens in each sequence's cache when each measurement started (`-d`).
    pub depth: usize,
    /// Context cells per sequence, as `--ctx` gave them (`null`: just enough for the test).
    #[serde(default)]
    pub ctx: Option<u32>,
    /// The prompt and generation lengths measured (`prompt` and `generate`; 0 for the one
    /// a test leaves out).
    #[serde(flatten)]
    pub test: Test,
    /// Prompt-processing tokens/s (`null` with `-p 0`).
    pub pp: Option<Figure>,
    /// Single-stream generation tokens/s (`null` with `-n 0`).
    pub tg: Option<Figure>,
    /// A prompt and the generation after it, all their tokens over the time of both (a
    /// `--pg` test's one figure; `null` in the others).
    #[serde(default)]
    pub pg: Option<Figure>,
    /// Aggregate generation tokens/s per sequence count (with `--parallel`, in a test that
    /// generates).
    #[serde(default)]
    pub parallel: Vec<Aggregate>,
    /// Tokens every measurement found in its sequences' cache when it started, as llama.cpp
    /// reported it (the fewest over the repetitions): the depth actually measured at.
    #[serde(default)]
    pub cached: usize,
    /// Output quality, with `--quality`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<Quality>,
    /// HellaSwag's figures, with `--hellaswag`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hellaswag: Option<TaskScore>,
    /// Winogrande's figures, with `--winogrande`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winogrande: Option<TaskScore>,
    /// The multiple-choice file's figures, with `--multiple-choice`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiple_choice: Option<TaskScore>,
    /// With `--baseline`, the same test's figures in the earlier run, each with this run's
    /// median over its median (`null` where the baseline has none). Not read back from a
    /// baseline itself: a run compared with one is compared with its own figures.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Compared>,
}

/// Aggregate generation over several sequences sharing each decode.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Aggregate {
    /// Sequences decoded together.
    pub sequences: usize,
    /// Tokens per second, all sequences together.
    #[serde(flatten)]
    pub figure: Figure,
}

impl ModelResult {
    /// Summarizes the repetitions.
    pub fn new(
        meta: Meta,
        setting: Setting,
        (depth, ctx): (usize, Option<u32>),
        test: Test,
        parallel: &[usize],
        reps: &[Rep],
    ) -> ModelResult {
        ModelResult {
            ctx,
            file: meta.file,
            size: meta.size,
            quantization: meta.quantization,
            parameters: meta.parameters,
            architecture: meta.architecture,
            backend: meta.backend,
            setting,
            depth,
            test,
            pp: Figure::over(reps.iter().map(|r| r.pp)),
            tg: Figure::over(reps.iter().map(|r| r.tg)),
            pg: Figure::over(reps.iter().map(|r| r.pg)),
            parallel: parallel
                .iter()
                .enumerate()
                .map(|(i, &n)| Aggregate {
                    sequences: n,
                    figure: Figure::of(reps.iter().map(|r| r.parallel[i]).collect()),
                })
                .collect(),
            cached: reps.iter().map(|r| r.cached).min().unwrap_or(0),
            quality: None,
            hellaswag: None,
            winogrande: None,
            multiple_choice: None,
            baseline: None,
        }
    }

    /// One benchmark's figures.
    pub fn task(&self, kind: Kind) -> Option<&TaskScore> {
        match kind {
            Kind::Hellaswag => self.hellaswag.as_ref(),
            Kind::Winogrande => self.winogrande.as_ref(),
            Kind::MultipleChoice => self.multiple_choice.as_ref(),
        }
    }

    /// Sets each benchmark's figures.
    pub fn set_tasks(&mut self, scores: &[(Kind, TaskScore)]) {
        for (kind, score) in scores {
            let slot = match kind {
                Kind::Hellaswag => &mut self.hellaswag,
                Kind::Winogrande => &mut self.winogrande,
                Kind::MultipleChoice => &mut self.multiple_choice,
            };
            *slot = Some(score.clone());
        }
    }
}

/// The machine the figures were measured on, so that figures from different machines (a
/// laptop, a GPU server) can be told apart once they are side by side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// The processor, as the system names it (`/proc/cpuinfo`'s `model name` on Linux), or
    /// the architecture where it does not.
    pub cpu: String,
    /// Physical cores this process could use, as `--threads` counts them by default (all of
    /// the machine's unless a CPU mask or quota held it to fewer, the fast ones alone on a
    /// CPU of two kinds: `crate::config::cores`).
    pub cores: usize,
    /// Logical processors this process could use.
    pub logical: usize,
    /// What llama.cpp can compute on: every CPU and GPU device, with its memory.
    pub devices: Vec<crate::engine::Device>,
    /// This program's version.
    pub backstop: String,
}

impl Machine {
    /// This machine, with the devices llama.cpp reported.
    pub fn here(devices: Vec<crate::engine::Device>) -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, name)| name.trim().to_owned())
            })
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
        let usable = crate::config::cores::usable();
        Machine {
            cpu,
            cores: usable.physical,
            logical: usable.logical,
            devices,
            backstop: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// One line for under the table: the processor, and each GPU with its memory.
    pub fn line(&self) -> String {
        let plural = if self.cores == 1 { "" } else { "s" };
        let mut line = format!(
            "{} ({} core{plural}, {} logical)",
            self.cpu, self.cores, self.logical
        );
        for d in self.devices.iter().filter(|d| d.kind != "cpu") {
            line.push_str(&format!(
                "; {} {} ({:.1} GiB)",
                d.name,
                d.description,
                d.memory_total as f64 / (1u64 << 30) as f64
            ));
        }
        line.push_str(&format!("; backstop {}", self.backstop));
        line
    }
}

/// What is known about a file before measuring it.
#[derive(Debug, Clone)]
pub struct Meta {
    pub(crate) file: String,
    pub(crate) size: u64,
    pub(crate) quantization: String,
    pub(crate) parameters: String,
    pub(crate) architecture: String,
    pub(crate) backend: String,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A setting `backstop bench` can compare: a column when the rows differ in it, else said
/// once under the table.
#[derive(Clone, Copy)]
enum Knob {
    Threads,
    ThreadsBatch,
    GpuLayers,
    FlashAttention,
    KvCache,
    Batch,
}

impl Knob {
    const ALL: [Knob; 6] = [
        Knob::Threads,
        Knob::ThreadsBatch,
        Knob::GpuLayers,
        Knob::FlashAttention,
        Knob::KvCache,
        Knob::Batch,
    ];

    fn head(self) -> &'static str {
        match self {
            Knob::Threads => "threads",
            Knob::ThreadsBatch => "batch threads",
            Knob::GpuLayers => "ngl",
            Knob::FlashAttention => "fa",
            Knob::KvCache => "kv cache",
            Knob::Batch => "batch",
        }
    }

    /// Its short name, llama-bench's where it has one.
    fn key(self) -> &'static str {
        match self {
            Knob::Threads => "t",
            Knob::ThreadsBatch => "tb",
            Knob::GpuLayers => "ngl",
            Knob::FlashAttention => "fa",
            Knob::KvCache => "kv",
            Knob::Batch => "b",
        }
    }

    /// The value in a cell; `None` where llama.cpp's default applies.
    fn cell(self, s: &Setting) -> Option<String> {
        match self {
            Knob::Threads => Some(s.threads.to_string()),
            Knob::ThreadsBatch => s.threads_batch.map(|n| n.to_string()),
            Knob::GpuLayers => s.gpu_layers.map(|n| n.to_string()),
            Knob::FlashAttention => s
                .flash_attention
                .map(|on| if on { "on" } else { "off" }.into()),
            Knob::KvCache => Some(s.kv_cache_type.as_str().into()),
            Knob::Batch => Some(s.batch.to_string()),
        }
    }

    /// The value in the line under the table; `None` for a default not worth saying.
    fn said(self, s: &Setting) -> Option<String> {
        let value = self.cell(s)?;
        match self {
            Knob::Threads if s.threads == 1 => Some("1 thread".into()),
            Knob::Threads => Some(format!("{value} threads")),
            Knob::ThreadsBatch if value == "1" => Some("1 thread for prompts".into()),
            Knob::ThreadsBatch => Some(format!("{value} threads for prompts")),
            Knob::GpuLayers => Some(format!("{value} GPU layers")),
            Knob::FlashAttention => Some(format!("flash attention {value}")),
            Knob::KvCache => (s.kv_cache_type != crate::engine::KvCacheType::F16)
                .then(|| format!("{value} KV cache")),
            Knob::Batch => {
                (s.batch != crate::config::DEFAULT_BATCH).then(|| format!("batch {value}"))
            }
        }
    }

    fn varies<'a>(self, mut settings: impl Iterator<Item = &'a Setting>) -> bool {
        let first = settings.next().map(|s| self.cell(s));
        settings.any(|s| Some(self.cell(s)) != first)
    }
}

/// How a setting reads beside the file name in the progress bar: what differs between the
/// settings measured (`ngl=99 fa=on`).
pub(crate) fn label(setting: &Setting, all: &[Setting]) -> String {
    Knob::ALL
        .into_iter()
        .filter(|k| k.varies(all.iter()))
        .map(|k| {
            let value = k.cell(setting).unwrap_or_else(|| "default".into());
            format!(" {}={value}", k.key())
        })
        .collect()
}

/// The results that share a table row: one model, setting and depth, each test once (with
/// one `-p` and one `-n` value, one result; with lists, one per prompt and generation length).
fn rows(results: &[ModelResult]) -> Vec<Vec<&ModelResult>> {
    let mut rows: Vec<Vec<&ModelResult>> = Vec::new();
    for r in results {
        match rows.last_mut() {
            Some(row)
                if row.iter().all(|o| {
                    (&o.file, &o.setting, o.depth) == (&r.file, &r.setting, r.depth)
                        && o.test != r.test
                }) =>
            {
                row.push(r);
            }
            _ => rows.push(vec![r]),
        }
    }
    rows
}

/// Each value once, in the order first seen.
pub(super) fn distinct<T: PartialEq>(values: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for v in values {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// A figure column of the table.
#[derive(Clone, Copy, PartialEq)]
enum Column {
    /// Prompt processing of this many tokens.
    Pp(usize),
    /// Single-stream generation of this many tokens.
    Tg(usize),
    /// Aggregate generation of this many tokens, by this many sequences.
    Aggregate(usize, usize),
    /// A `--pg` test.
    Pg(Test),
}

impl Column {
    /// Its header, `@ dN` after the test where one depth was measured; `tok/s` after a
    /// figure's own, where `unit`.
    fn head(self, at: &str, unit: bool) -> String {
        let unit = if unit { " tok/s" } else { "" };
        match self {
            Column::Pp(p) => format!("pp{p}{at}{unit}"),
            Column::Tg(n) => format!("tg{n}{at}{unit}"),
            Column::Aggregate(n, k) => format!("tg{n}{at} x{k} aggregate"),
            Column::Pg(t) => format!("{}{at}{unit}", t.name()),
        }
    }

    /// The result of a row that measured this column's figure (none for a test the row did
    /// not run: a model given twice with other lengths).
    fn pick<'a>(self, row: &[&'a ModelResult]) -> Option<&'a ModelResult> {
        row.iter().copied().find(|o| match self {
            Column::Pp(p) => o.test.prompt == p && o.pp.is_some(),
            Column::Tg(n) | Column::Aggregate(n, _) => o.test.generate == n && o.tg.is_some(),
            Column::Pg(t) => o.test == t,
        })
    }

    fn figure(self, r: &ModelResult) -> Option<&Figure> {
        match self {
            Column::Pp(_) => r.pp.as_ref(),
            Column::Tg(_) => r.tg.as_ref(),
            Column::Aggregate(_, k) => r
                .parallel
                .iter()
                .find(|a| a.sequences == k)
                .map(|a| &a.figure),
            Column::Pg(_) => r.pg.as_ref(),
        }
    }

    fn versus(self, c: &Compared) -> Option<&Versus> {
        match self {
            Column::Pp(_) => c.pp.as_ref(),
            Column::Tg(_) => c.tg.as_ref(),
            Column::Aggregate(_, k) => c
                .parallel
                .iter()
                .find(|a| a.sequences == k)
                .map(|a| &a.versus),
            Column::Pg(_) => c.pg.as_ref(),
        }
    }
}

/// The columns of a run's tables: the settings that differ between rows (the others are said
/// under the table), the depth where several were measured, and the figures.
struct Layout {
    /// ` @ dN` where one depth other than 0 was measured.
    at: String,
    depth_column: bool,
    knobs: Vec<Knob>,
    fixed: Vec<Knob>,
    figures: Vec<Column>,
}

impl Layout {
    fn of(results: &[ModelResult], depths: &[usize]) -> Layout {
        let (at, depth_column) = match depths {
            [] | [0] => (String::new(), false),
            [d] => (format!(" @ d{d}"), false),
            _ => (String::new(), true),
        };
        // `-p 0` and `-n 0` leave their columns out.
        let prompts = distinct(
            results
                .iter()
                .filter(|r| r.pp.is_some())
                .map(|r| r.test.prompt),
        );
        let gens = distinct(
            results
                .iter()
                .filter(|r| r.tg.is_some())
                .map(|r| r.test.generate),
        );
        let parallel = distinct(
            results
                .iter()
                .flat_map(|r| r.parallel.iter().map(|a| a.sequences)),
        );
        let together = distinct(results.iter().filter(|r| r.pg.is_some()).map(|r| r.test));
        let mut figures: Vec<Column> = prompts.into_iter().map(Column::Pp).collect();
        for n in gens {
            figures.push(Column::Tg(n));
            figures.extend(parallel.iter().map(|&k| Column::Aggregate(n, k)));
        }
        figures.extend(together.into_iter().map(Column::Pg));
        let (knobs, fixed) = Knob::ALL
            .into_iter()
            .partition(|k| k.varies(results.iter().map(|r| &r.setting)));
        Layout {
            at,
            depth_column,
            knobs,
            fixed,
            figures,
        }
    }

    /// The headers before the figures': the model's, with its size, parameters and backend
    /// where `whole`, then the settings that differ and the depth.
    fn lead_head(&self, whole: bool) -> Vec<String> {
        let mut head = vec!["model".to_owned(), "quant".to_owned()];
        if whole {
            head.extend(["size", "params", "backend"].map(String::from));
        }
        head.extend(self.knobs.iter().map(|k| k.head().to_owned()));
        if self.depth_column {
            head.push("depth".to_owned());
        }
        head
    }

    fn lead(&self, r: &ModelResult, whole: bool) -> Vec<String> {
        let mut row = vec![r.file.clone(), r.quantization.clone()];
        if whole {
            row.extend([mib(r.size), r.parameters.clone(), r.backend.clone()]);
        }
        row.extend(
            self.knobs
                .iter()
                .map(|k| k.cell(&r.setting).unwrap_or_else(|| "default".into())),
        );
        if self.depth_column {
            row.push(r.depth.to_string());
        }
        row
    }
}

/// A markdown table's header and rule.
pub(super) fn head_lines<S: AsRef<str>>(head: &[S]) -> String {
    let head: Vec<&str> = head.iter().map(AsRef::as_ref).collect();
    format!(
        "| {} |\n|{}\n",
        head.join(" | "),
        " --- |".repeat(head.len())
    )
}

/// A markdown table, one row per model, setting and depth, with a column per prompt length,
/// per generation length and per sequence count generating together; figures measured at
/// one depth say so in the header (`pp512 @ d1024`), at several in a `depth` column. Settings
/// that differ between rows get a column, the others are said under the table with the
/// repetitions.
pub fn table(results: &[ModelResult], depths: &[usize], reps: usize) -> String {
    let layout = Layout::of(results, depths);
    let mut head = layout.lead_head(true);
    head.extend(layout.figures.iter().map(|c| c.head(&layout.at, true)));
    let quality = results.iter().any(|r| r.quality.is_some());
    if quality {
        head.extend(["ppl", "ppl ratio", "kld", "kld 99%", "same top"].map(String::from));
    }
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|&k| results.iter().any(|r| r.task(k).is_some()))
        .collect();
    for kind in &kinds {
        head.extend([kind.name().to_owned(), format!("{} same", kind.name())]);
    }
    let mut out = head_lines(&head);
    for group in rows(results) {
        let mut row = layout.lead(group[0], true);
        for &c in &layout.figures {
            let figure = c.pick(&group).and_then(|o| c.figure(o));
            row.push(figure.map(Figure::cell).unwrap_or_default());
        }
        if quality {
            row.extend(quality_cells(group.iter().find_map(|o| o.quality.as_ref())));
        }
        for &kind in &kinds {
            row.extend(task_cells(group.iter().find_map(|o| o.task(kind))));
        }
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    let speed = !layout.figures.is_empty();
    if speed {
        out.push_str(
            "\nmedian (min–max) tokens per second over the repetitions, warm-up excluded\n",
        );
    } else {
        out.push('\n');
    }
    let mut said: Vec<String> = results
        .first()
        .map(|r| {
            layout
                .fixed
                .iter()
                .filter_map(|k| k.said(&r.setting))
                .collect()
        })
        .unwrap_or_default();
    // `--ctx`, the same for the whole run.
    if let Some(n) = results.first().and_then(|r| r.ctx) {
        said.push(format!("{n} context cells per sequence"));
    }
    if speed {
        said.push(format!(
            "{reps} repetition{}",
            if reps == 1 { "" } else { "s" }
        ));
    }
    if !said.is_empty() {
        out.push_str(&said.join(", "));
        out.push('\n');
    }
    out
}

/// The run against `--baseline`: the table's rows and figure columns, each cell this run's
/// median over the baseline's (empty where the baseline has no such figure), and the machine
/// the baseline was measured on.
pub fn versus_table(results: &[ModelResult], depths: &[usize], baseline: &Baseline) -> String {
    let name = &baseline.name;
    let mut out = format!("\nagainst {name}");
    if !results.iter().any(|r| r.baseline.is_some()) {
        out.push_str(
            ": nothing in it was measured with the same file, settings, depth and lengths\n",
        );
    } else {
        out.push_str(", this run's median over the baseline's:\n\n");
        let layout = Layout::of(results, depths);
        let mut head = layout.lead_head(false);
        head.extend(layout.figures.iter().map(|c| c.head(&layout.at, false)));
        out.push_str(&head_lines(&head));
        let mut unmatched = 0;
        for group in rows(results) {
            let mut row = layout.lead(group[0], false);
            let mut any = false;
            for &c in &layout.figures {
                let versus = c
                    .pick(&group)
                    .and_then(|o| o.baseline.as_ref())
                    .and_then(|b| c.versus(b));
                any |= versus.is_some();
                row.push(versus.map(Versus::cell).unwrap_or_default());
            }
            if any {
                out.push_str(&format!("| {} |\n", row.join(" | ")));
            } else {
                unmatched += 1;
            }
        }
        out.push_str(&format!("\nabove 1 is faster now; {WITHIN_SPREAD}\n"));
        if unmatched > 0 {
            out.push_str(&format!(
                "{unmatched} row{} of this run had no counterpart in the baseline\n",
                if unmatched == 1 { "" } else { "s" }
            ));
        }
    }
    if let Some(m) = &baseline.machine {
        out.push_str(&format!("the baseline's machine: {}\n", m.line()));
    }
    out
}

/// The ppl, ppl ratio, kld, kld 99% and same-top cells; a reference says so in the last four.
fn quality_cells(q: Option<&Quality>) -> [String; 5] {
    let Some(q) = q else {
        return Default::default();
    };
    let reference = || "(ref)".to_owned();
    [
        format!("{:.2} ± {:.2}", q.ppl, q.ppl_error),
        q.ppl_ratio
            .zip(q.ppl_ratio_error)
            .map_or_else(reference, |(r, e)| format!("{r:.4} ± {e:.4}")),
        q.kld.map_or_else(reference, |k| format!("{k:.4}")),
        q.kld_p99.map_or_else(reference, |k| format!("{k:.4}")),
        q.same_top
            .map_or_else(reference, |f| format!("{:.1}%", f * 100.0)),
    ]
}

/// The accuracy (with its interval) and same-pick cells; a reference says so in the last.
fn task_cells(h: Option<&TaskScore>) -> [String; 2] {
    let Some(h) = h else {
        return Default::default();
    };
    [
        format!(
            "{:.2}% [{:.1}, {:.1}]",
            h.accuracy * 100.0,
            h.low * 100.0,
            h.high * 100.0
        ),
        h.same_pick
            .map_or_else(|| "(ref)".to_owned(), |f| format!("{:.1}%", f * 100.0)),
    ]
}

/// One result as a line of JSON (`--format jsonl`), with the run's facts that a line read
/// alone needs added to it (`reps`, the machine).
pub fn json_line(
    result: &impl Serialize,
    with: &[(&str, serde_json::Value)],
) -> Result<String, serde_json::Error> {
    let mut line = serde_json::to_value(result)?;
    if let Some(fields) = line.as_object_mut() {
        for (key, value) in with {
            fields.insert((*key).to_owned(), value.clone());
        }
    }
    serde_json::to_string(&line)
}

/// CSV, one row per model and figure, with the tokens read or generated (`512+128` for a
/// `--pg` figure: read, then generated) and the depth it was measured at; quality once per
/// model, setting and depth. Against a `--baseline` (`compared`), each figure's row ends
/// with the baseline's median and this run's over it (empty where the baseline has none).
pub fn csv(results: &[ModelResult], compared: bool) -> String {
    let mut out = String::from(
        "file,quantization,size,parameters,backend,threads,threads_batch,gpu_layers,flash_attention,\
         kv_cache_type,batch,figure,tokens,sequences,depth,median,min,max",
    );
    out.push_str(if compared {
        ",baseline_median,ratio\n"
    } else {
        "\n"
    });
    let tests = rows(results)
        .into_iter()
        .flat_map(|row| row.into_iter().enumerate());
    for (i, r) in tests {
        // A setting left to llama.cpp's default is an empty field.
        let s = &r.setting;
        let lead = format!(
            "{},{},{},{},{},{},{},{},{},{},{}",
            r.file,
            r.quantization,
            r.size,
            r.parameters,
            r.backend,
            s.threads,
            s.batch_threads(),
            s.gpu_layers.map(|n| n.to_string()).unwrap_or_default(),
            s.flash_attention
                .map(|on| on.to_string())
                .unwrap_or_default(),
            s.kv_cache_type.as_str(),
            s.batch,
        );
        let mut row = |figure: &str,
                       tokens: Option<String>,
                       n: usize,
                       values: &str,
                       versus: Option<&Versus>| {
            let tokens = tokens.unwrap_or_default();
            let versus = if compared {
                format!(",{}", Versus::csv(versus))
            } else {
                String::new()
            };
            out.push_str(&format!(
                "{lead},{figure},{tokens},{n},{},{values}{versus}\n",
                r.depth
            ));
        };
        let versus = |c: Column| r.baseline.as_ref().and_then(|b| c.versus(b));
        let spread = |f: &Figure| format!("{:.3},{:.3},{:.3}", f.median, f.min, f.max);
        let (prompt, generate) = (r.test.prompt.to_string(), r.test.generate.to_string());
        if let Some(f) = &r.pp {
            let versus = versus(Column::Pp(r.test.prompt));
            row("pp", Some(prompt.clone()), 1, &spread(f), versus);
        }
        if let Some(f) = &r.tg {
            let versus = versus(Column::Tg(r.test.generate));
            row("tg", Some(generate.clone()), 1, &spread(f), versus);
        }
        for a in &r.parallel {
            row(
                "tg_aggregate",
                Some(generate.clone()),
                a.sequences,
                &spread(&a.figure),
                versus(Column::Aggregate(r.test.generate, a.sequences)),
            );
        }
        if let Some(f) = &r.pg {
            let (tokens, versus) = (format!("{prompt}+{generate}"), versus(Column::Pg(r.test)));
            row("pg", Some(tokens), 1, &spread(f), versus);
        }
        // Quality and task figures are one value each: in the median column, min and max
        // empty; said with a row's first test (every test of it carries the same).
        let mut values: Vec<(String, Option<f64>)> = Vec::new();
        if let (Some(q), 0) = (&r.quality, i) {
            let quality = [
                ("ppl", Some(q.ppl)),
                ("ppl_error", Some(q.ppl_error)),
                ("ppl_ratio", q.ppl_ratio),
                ("ppl_ratio_error", q.ppl_ratio_error),
                ("kld", q.kld),
                ("kld_p99", q.kld_p99),
                ("kld_max", q.kld_max),
                ("same_top", q.same_top),
                ("dp_rms", q.dp_rms),
            ];
            values.extend(quality.map(|(name, v)| (name.to_owned(), v)));
        }
        for kind in Kind::ALL {
            if let (Some(h), 0) = (r.task(kind), i) {
                let figures = [
                    ("", Some(h.accuracy)),
                    ("_low", Some(h.low)),
                    ("_high", Some(h.high)),
                    ("_same_pick", h.same_pick),
                ];
                values.extend(figures.map(|(s, v)| (format!("{}{s}", kind.name()), v)));
            }
        }
        for (figure, value) in values {
            if let Some(v) = value {
                row(&figure, None, 1, &format!("{v:.6},,"), None);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::KvCacheType;

    fn csv_of(results: &[ModelResult]) -> String {
        csv(results, false)
    }

    #[test]
    fn medians_and_spreads() {
        let f = Figure::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((f.median, f.min, f.max), (2.0, 1.0, 3.0));
        assert_eq!(Figure::of(vec![1.0, 2.0, 3.0, 10.0]).median, 2.5);
    }

    fn result() -> ModelResult {
        ModelResult {
            file: "m.gguf".into(),
            size: 1024 * 1024,
            quantization: "Q4_0".into(),
            parameters: "1.00M".into(),
            architecture: "llama".into(),
            backend: "CPU".into(),
            setting: Setting {
                threads: 2,
                threads_batch: None,
                gpu_layers: None,
                flash_attention: None,
                kv_cache_type: KvCacheType::F16,
                batch: 512,
            },
            depth: 0,
            ctx: None,
            test: Test {
                prompt: 512,
                generate: 128,
                together: false,
            },
            pp: Some(Figure::of(vec![100.0])),
            tg: Some(Figure::of(vec![10.0])),
            pg: None,
            parallel: vec![Aggregate {
                sequences: 4,
                figure: Figure::of(vec![30.0]),
            }],
            cached: 0,
            quality: None,
            hellaswag: None,
            winogrande: None,
            multiple_choice: None,
            baseline: None,
        }
    }

    #[test]
    fn the_table_and_csv_carry_every_figure() {
        let t = table(&[result()], &[0], 5);
        assert!(t.contains("| m.gguf | Q4_0 | 1.0 MiB | 1.00M | CPU | 100.0 (100.0–100.0) | 10.0 (10.0–10.0) | 30.0 (30.0–30.0) |"), "{t}");
        assert!(
            t.contains("| pp512 tok/s | tg128 tok/s | tg128 x4 aggregate |"),
            "{t}"
        );
        let mut at_1024 = result();
        at_1024.depth = 1024;
        let deep = table(&[at_1024.clone()], &[1024], 1);
        assert!(
            deep.contains(
                "| pp512 @ d1024 tok/s | tg128 @ d1024 tok/s | tg128 @ d1024 x4 aggregate |"
            ),
            "{deep}"
        );
        // Several depths: a column, and the headers say none.
        let both = table(&[result(), at_1024.clone()], &[0, 1024], 1);
        assert!(
            both.contains("| backend | depth | pp512 tok/s | tg128 tok/s | tg128 x4 aggregate |")
                && both.contains("| CPU | 0 | 100.0")
                && both.contains("| CPU | 1024 | 100.0"),
            "{both}"
        );
        // One setting throughout: said under the table, no column for it.
        assert!(
            t.ends_with("warm-up excluded\n2 threads, 5 repetitions\n"),
            "{t}"
        );
        assert!(deep.ends_with("\n2 threads, 1 repetition\n"), "{deep}");
        let mut sized = result();
        sized.ctx = Some(8192);
        let t = table(&[sized.clone()], &[0], 5);
        assert!(
            t.ends_with("\n2 threads, 8192 context cells per sequence, 5 repetitions\n"),
            "{t}"
        );
        assert_eq!(serde_json::to_value(&sized).unwrap()["ctx"], 8192);
        let c = csv_of(&[at_1024]);
        assert_eq!(c.lines().count(), 4);
        assert!(c.starts_with(
            "file,quantization,size,parameters,backend,threads,threads_batch,gpu_layers,\
             flash_attention,kv_cache_type,batch,figure,tokens,sequences,depth,median,min,max\n"
        ));
        assert!(c.contains(
            "m.gguf,Q4_0,1048576,1.00M,CPU,2,2,,,f16,512,tg_aggregate,128,4,1024,30.000,30.000,\
             30.000"
        ));
    }

    #[test]
    fn a_run_against_a_baseline_is_a_table_of_ratios_and_two_csv_columns() {
        use crate::bench::baseline::VersusAggregate;

        let versus = |median: f64, ratio: f64, overlaps: bool| Versus {
            figure: Figure::of(vec![median]),
            ratio,
            overlaps,
        };
        let mut matched = result();
        matched.baseline = Some(Compared {
            pp: Some(versus(80.0, 1.25, false)),
            tg: Some(versus(10.2, 0.98, true)),
            pg: None,
            parallel: vec![VersusAggregate {
                sequences: 4,
                versus: versus(30.0, 1.0, true),
            }],
        });
        let mut other = result();
        other.setting.threads = 1;
        let baseline = Baseline {
            name: "old.json".into(),
            machine: None,
            servers: Vec::new(),
            runs: crate::bench::baseline::Runs::Here(Vec::new()),
        };
        let t = versus_table(&[matched.clone(), other.clone()], &[0], &baseline);
        assert_eq!(
            t,
            "\nagainst old.json, this run's median over the baseline's:\n\n\
             | model | quant | threads | pp512 | tg128 | tg128 x4 aggregate |\n\
             | --- | --- | --- | --- | --- | --- |\n\
             | m.gguf | Q4_0 | 2 | 1.25x | ≈0.98x | ≈1.00x |\n\
             \nabove 1 is faster now; ≈: the two runs' ranges (min–max) overlap, a difference \
             within their spread\n\
             1 row of this run had no counterpart in the baseline\n"
        );
        let none = versus_table(&[other.clone()], &[0], &baseline);
        assert_eq!(
            none,
            "\nagainst old.json: nothing in it was measured with the same file, settings, depth \
             and lengths\n"
        );
        let c = csv(&[matched, other], true);
        assert!(c
            .lines()
            .next()
            .unwrap()
            .ends_with(",median,min,max,baseline_median,ratio"));
        for line in [
            ",2,,,f16,512,pp,512,1,0,100.000,100.000,100.000,80.000,1.2500\n",
            ",2,,,f16,512,tg,128,1,0,10.000,10.000,10.000,10.200,0.9800\n",
            ",2,,,f16,512,tg_aggregate,128,4,0,30.000,30.000,30.000,30.000,1.0000\n",
            ",1,,,f16,512,pp,512,1,0,100.000,100.000,100.000,,\n",
        ] {
            assert!(c.contains(line), "{line}: {c}");
        }
    }

    #[test]
    fn the_machine_line_names_the_processor_and_every_gpu() {
        let device =
            |name: &str, description: &str, kind: &'static str, gib: u64| crate::engine::Device {
                name: name.into(),
                description: description.into(),
                backend: name.trim_end_matches(char::is_numeric).into(),
                kind: kind.into(),
                memory_total: gib << 30,
                memory_free: gib << 29,
            };
        let machine = Machine {
            cpu: "AMD EPYC 9654".into(),
            cores: 16,
            logical: 32,
            devices: vec![
                device("CPU", "AMD EPYC 9654", "cpu", 128),
                device("CUDA0", "NVIDIA H200", "gpu", 140),
            ],
            backstop: "9.9.9".into(),
        };
        assert_eq!(
            machine.line(),
            "AMD EPYC 9654 (16 cores, 32 logical); CUDA0 NVIDIA H200 (140.0 GiB); backstop 9.9.9"
        );
        let json = serde_json::to_value(&machine).unwrap();
        assert_eq!(json["devices"][1]["memory_total"], 140u64 << 30, "{json}");
    }

    #[test]
    fn settings_that_differ_get_a_column_and_the_rest_are_said_once() {
        let base = result();
        let mut gpu = result();
        gpu.setting.gpu_layers = Some(99);
        gpu.backend = "CUDA".into();
        let mut cpu = result();
        cpu.setting.gpu_layers = Some(0);
        cpu.backend = "CUDA".into();
        for r in [&mut gpu, &mut cpu] {
            r.setting.flash_attention = Some(true);
            r.setting.kv_cache_type = KvCacheType::Q8_0;
        }
        let t = table(&[cpu.clone(), gpu.clone()], &[0], 3);
        assert!(
            t.contains("| backend | ngl | pp512 tok/s |")
                && t.contains("| CUDA | 0 | 100.0 (100.0–100.0) |")
                && t.contains("| CUDA | 99 | 100.0 (100.0–100.0) |"),
            "{t}"
        );
        assert!(
            t.ends_with("\n2 threads, flash attention on, q8_0 KV cache, 3 repetitions\n"),
            "{t}"
        );
        // Left to llama.cpp in one row and set in another: the first reads `default`.
        let t = table(&[base.clone(), gpu.clone()], &[0], 1);
        assert!(
            t.contains("| backend | ngl | fa | kv cache | pp512")
                && t.contains("| CPU | default | default | f16 | 100.0")
                && t.contains("| CUDA | 99 | on | q8_0 | 100.0"),
            "{t}"
        );
        assert!(t.ends_with("\n2 threads, 1 repetition\n"), "{t}");
        let mut one = base.clone();
        one.setting.threads = 1;
        let t = table(&[one.clone()], &[0], 1);
        assert!(t.ends_with("\n1 thread, 1 repetition\n"), "{t}");
        // Threads for prompts: said where set, a column where they differ.
        one.setting.threads_batch = Some(2);
        let t = table(&[one.clone()], &[0], 1);
        assert!(
            t.ends_with("\n1 thread, 2 threads for prompts, 1 repetition\n"),
            "{t}"
        );
        let mut four = one.clone();
        four.setting.threads_batch = Some(4);
        let t = table(&[one, four], &[0], 1);
        assert!(
            t.contains("| backend | batch threads | pp512 tok/s |")
                && t.contains("| CPU | 2 | 100.0")
                && t.contains("| CPU | 4 | 100.0")
                && t.ends_with("\n1 thread, 1 repetition\n"),
            "{t}"
        );
        let c = csv_of(&[cpu, gpu]);
        assert!(
            c.contains("\nm.gguf,Q4_0,1048576,1.00M,CUDA,2,2,0,true,q8_0,512,pp,512,1,0,"),
            "{c}"
        );
        assert!(
            c.contains("\nm.gguf,Q4_0,1048576,1.00M,CUDA,2,2,99,true,q8_0,512,pp,512,1,0,"),
            "{c}"
        );
        let json = serde_json::to_value(&base).unwrap();
        assert!(
            json["threads"] == 2
                && json["threads_batch"].is_null()
                && json["gpu_layers"].is_null()
                && json["flash_attention"].is_null()
                && json["kv_cache_type"] == "f16"
                && json["batch"] == 512,
            "{json}"
        );
    }

    #[test]
    fn a_figure_left_out_has_no_column_row_or_value() {
        let mut only_tg = result();
        only_tg.pp = None;
        only_tg.test.prompt = 0;
        let t = table(&[only_tg.clone()], &[0], 1);
        assert!(
            t.contains("| backend | tg128 tok/s | tg128 x4 aggregate |")
                && t.contains("| CPU | 10.0 (10.0–10.0) | 30.0 (30.0–30.0) |"),
            "{t}"
        );
        assert!(!csv_of(&[only_tg.clone()]).contains(",pp,"));
        let json = serde_json::to_value(&only_tg).unwrap();
        assert!(
            json["pp"].is_null() && json["tg"]["median"] == 10.0,
            "{json}"
        );

        let mut only_pp = result();
        only_pp.tg = None;
        only_pp.test.generate = 0;
        only_pp.parallel.clear();
        let t = table(&[only_pp.clone()], &[0], 1);
        assert!(
            t.contains("| backend | pp512 tok/s |\n")
                && t.contains("| CPU | 100.0 (100.0–100.0) |\n"),
            "{t}"
        );
        assert_eq!(csv_of(&[only_pp]).lines().count(), 2);
    }

    #[test]
    fn a_prompt_gen_test_is_a_column_after_the_others_and_a_pg_csv_row() {
        let mut pg = result();
        pg.test.together = true;
        (pg.pp, pg.tg, pg.parallel) = (None, None, Vec::new());
        pg.pg = Some(Figure::of(vec![50.0, 40.0, 60.0]));
        let t = table(&[result(), pg.clone()], &[0], 3);
        assert!(
            t.contains("| pp512 tok/s | tg128 tok/s | tg128 x4 aggregate | pp512+tg128 tok/s |")
                && t.contains(
                    "| 100.0 (100.0–100.0) | 10.0 (10.0–10.0) | 30.0 (30.0–30.0) | \
                     50.0 (40.0–60.0) |"
                ),
            "{t}"
        );
        // Alone, it is the only figure column, and the only CSV row.
        let t = table(&[pg.clone()], &[4096], 3);
        assert!(
            t.contains("| backend | pp512+tg128 @ d4096 tok/s |\n")
                && t.contains("| CPU | 50.0 (40.0–60.0) |\n"),
            "{t}"
        );
        assert!(t.contains("median (min–max) tokens per second"), "{t}");
        let lines: Vec<String> = csv_of(&[pg.clone()]).lines().map(String::from).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[1].ends_with(",pg,512+128,1,0,50.000,40.000,60.000"),
            "{}",
            lines[1]
        );
        let json = serde_json::to_value(&pg).unwrap();
        assert!(
            json["together"] == true
                && json["pg"]["median"] == 50.0
                && json["pp"].is_null()
                && json["tg"].is_null(),
            "{json}"
        );
    }

    #[test]
    fn lists_of_lengths_make_a_column_each_in_one_row_per_model() {
        let test = |prompt: usize, generate: usize, figure: f64| {
            let mut r = result();
            r.test = Test {
                prompt,
                generate,
                together: false,
            };
            r.pp = (prompt > 0).then(|| Figure::of(vec![figure]));
            r.tg = (generate > 0).then(|| Figure::of(vec![figure]));
            r.parallel = if generate > 0 {
                vec![Aggregate {
                    sequences: 4,
                    figure: Figure::of(vec![figure * 2.0]),
                }]
            } else {
                Vec::new()
            };
            r.quality = Some(Quality {
                text_tokens: 1000,
                chunk: 128,
                scored: 500,
                ppl: 9.5,
                ppl_error: 0.1,
                ppl_ratio: None,
                ppl_ratio_error: None,
                kld: None,
                same_top: None,
                reference: None,
                kld_top: None,
                kld_p99: None,
                kld_max: None,
                dp_rms: None,
            });
            r
        };
        let one = [
            test(64, 0, 1.0),
            test(256, 0, 2.0),
            test(0, 16, 3.0),
            test(0, 32, 4.0),
        ];
        // The same file given twice: a row each, not one row with the tests overwritten.
        let twice = [one.clone(), one.clone()].concat();
        let t = table(&twice, &[0], 1);
        assert!(
            t.contains(
                "| backend | pp64 tok/s | pp256 tok/s | tg16 tok/s | tg16 x4 aggregate | \
                 tg32 tok/s | tg32 x4 aggregate | ppl |"
            ),
            "{t}"
        );
        let row = "| m.gguf | Q4_0 | 1.0 MiB | 1.00M | CPU | 1.0 (1.0–1.0) | 2.0 (2.0–2.0) | \
                   3.0 (3.0–3.0) | 6.0 (6.0–6.0) | 4.0 (4.0–4.0) | 8.0 (8.0–8.0) | 9.50 ± 0.10 |";
        assert_eq!(t.matches(row).count(), 2, "{t}");
        // A row that did not run a test has its cells empty.
        let mixed = [
            one[0].clone(),
            one[2].clone(),
            one[0].clone(),
            one[1].clone(),
        ];
        let t = table(&mixed, &[0], 1);
        assert!(
            t.contains("| CPU | 1.0 (1.0–1.0) |  | 3.0 (3.0–3.0) | 6.0 (6.0–6.0) |")
                && t.contains("| CPU | 1.0 (1.0–1.0) | 2.0 (2.0–2.0) |  |  |"),
            "{t}"
        );
        let c = csv_of(&one);
        for line in [
            ",pp,64,1,0,1.000,",
            ",pp,256,1,0,2.000,",
            ",tg,16,1,0,3.000,",
            ",tg_aggregate,16,4,0,6.000,",
            ",tg_aggregate,32,4,0,8.000,",
            ",ppl,,1,0,9.500000,,",
        ] {
            assert!(c.contains(line), "{line}: {c}");
        }
        // Quality is said once for the row, not once per test.
        assert_eq!(c.matches(",ppl,").count(), 1, "{c}");
        let json = serde_json::to_value(&one[2]).unwrap();
        assert!(
            json["prompt"] == 0 && json["generate"] == 16 && json["pp"].is_null(),
            "{json}"
        );
    }
}
