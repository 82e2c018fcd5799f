//! `backstop bench`'s results: median and spread per figure, as a markdown table, JSON or CSV.

use serde::Serialize;

use super::measure::{Rep, Setting};
use super::quality::Quality;

/// A figure over the repetitions.
#[derive(Debug, Clone, Copy, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
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
    /// Prompt-processing tokens/s (`null` with `-p 0`).
    pub pp: Option<Figure>,
    /// Single-stream generation tokens/s (`null` with `-n 0`).
    pub tg: Option<Figure>,
    /// Aggregate generation tokens/s per sequence count.
    pub parallel: Vec<Aggregate>,
    /// Tokens every measurement found in its sequences' cache when it started, as llama.cpp
    /// reported it (the fewest over the repetitions): the depth actually measured at.
    pub cached: usize,
    /// Output quality, with `--quality`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality: Option<Quality>,
}

/// Aggregate generation over several sequences sharing each decode.
#[derive(Debug, Clone, Copy, Serialize)]
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
        depth: usize,
        parallel: &[usize],
        reps: &[Rep],
    ) -> ModelResult {
        ModelResult {
            file: meta.file,
            size: meta.size,
            quantization: meta.quantization,
            parameters: meta.parameters,
            architecture: meta.architecture,
            backend: meta.backend,
            setting,
            depth,
            pp: Figure::over(reps.iter().map(|r| r.pp)),
            tg: Figure::over(reps.iter().map(|r| r.tg)),
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
        }
    }
}

/// The machine the figures were measured on, so that figures from different machines (a
/// laptop, a GPU server) can be told apart once they are side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// The processor, as the system names it (`/proc/cpuinfo`'s `model name` on Linux), or
    /// the architecture where it does not.
    pub cpu: String,
    /// Physical cores.
    pub cores: usize,
    /// Logical processors.
    pub logical: usize,
    /// What llama.cpp can compute on: every CPU and GPU device, with its memory.
    pub devices: Vec<crate::engine::Device>,
    /// This program's version.
    pub backstop: &'static str,
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
        Machine {
            cpu,
            cores: num_cpus::get_physical(),
            logical: num_cpus::get(),
            devices,
            backstop: env!("CARGO_PKG_VERSION"),
        }
    }

    /// One line for under the table: the processor, and each GPU with its memory.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} ({} cores, {} logical)",
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
    GpuLayers,
    FlashAttention,
    KvCache,
    Batch,
}

impl Knob {
    const ALL: [Knob; 5] = [
        Knob::Threads,
        Knob::GpuLayers,
        Knob::FlashAttention,
        Knob::KvCache,
        Knob::Batch,
    ];

    fn head(self) -> &'static str {
        match self {
            Knob::Threads => "threads",
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
            Knob::Threads => Some(format!("{value} threads")),
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

/// A markdown table, one row per model, setting and depth; figures measured at one depth say
/// so in the header (`pp512 @ d1024`), at several in a `depth` column. Settings that differ
/// between rows get a column, the others are said under the table with the repetitions.
pub fn table(
    results: &[ModelResult],
    prompt: usize,
    generate: usize,
    depths: &[usize],
    reps: usize,
) -> String {
    let (at, depth_column) = match depths {
        [] | [0] => (String::new(), false),
        [d] => (format!(" @ d{d}"), false),
        _ => (String::new(), true),
    };
    let parallel: Vec<usize> = results
        .first()
        .map(|r| r.parallel.iter().map(|p| p.sequences).collect())
        .unwrap_or_default();
    let (columns, fixed): (Vec<Knob>, Vec<Knob>) = Knob::ALL
        .into_iter()
        .partition(|k| k.varies(results.iter().map(|r| &r.setting)));
    let mut head = vec![
        "model".to_owned(),
        "quant".to_owned(),
        "size".to_owned(),
        "params".to_owned(),
        "backend".to_owned(),
    ];
    head.extend(columns.iter().map(|k| k.head().to_owned()));
    if depth_column {
        head.push("depth".to_owned());
    }
    // `-p 0` and `-n 0` leave their column out.
    if prompt > 0 {
        head.push(format!("pp{prompt}{at} tok/s"));
    }
    if generate > 0 {
        head.push(format!("tg{generate}{at} tok/s"));
    }
    head.extend(
        parallel
            .iter()
            .map(|n| format!("tg{generate}{at} x{n} aggregate")),
    );
    let quality = results.iter().any(|r| r.quality.is_some());
    if quality {
        head.extend(["ppl", "ppl ratio", "kld", "same top"].map(String::from));
    }
    let mut out = format!(
        "| {} |\n|{}\n",
        head.join(" | "),
        " --- |".repeat(head.len())
    );
    for r in results {
        let mut row = vec![
            r.file.clone(),
            r.quantization.clone(),
            mib(r.size),
            r.parameters.clone(),
            r.backend.clone(),
        ];
        row.extend(
            columns
                .iter()
                .map(|k| k.cell(&r.setting).unwrap_or_else(|| "default".into())),
        );
        if depth_column {
            row.push(r.depth.to_string());
        }
        row.extend([&r.pp, &r.tg].into_iter().flatten().map(Figure::cell));
        row.extend(r.parallel.iter().map(|a| a.figure.cell()));
        if quality {
            row.extend(quality_cells(r.quality.as_ref()));
        }
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    let speed = prompt > 0 || generate > 0;
    if speed {
        out.push_str(
            "\nmedian (min–max) tokens per second over the repetitions, warm-up excluded\n",
        );
    } else {
        out.push('\n');
    }
    let mut said: Vec<String> = results
        .first()
        .map(|r| fixed.iter().filter_map(|k| k.said(&r.setting)).collect())
        .unwrap_or_default();
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

/// The ppl, ppl ratio, kld and same-top cells; a reference says so in the last three.
fn quality_cells(q: Option<&Quality>) -> [String; 4] {
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
        q.same_top
            .map_or_else(reference, |f| format!("{:.1}%", f * 100.0)),
    ]
}

/// CSV, one row per model and figure, with the depth it was measured at.
pub fn csv(results: &[ModelResult]) -> String {
    let mut out = String::from(
        "file,quantization,size,parameters,backend,threads,gpu_layers,flash_attention,kv_cache_type,\
         batch,figure,sequences,depth,median,min,max\n",
    );
    for r in results {
        // A setting left to llama.cpp's default is an empty field.
        let s = &r.setting;
        let lead = format!(
            "{},{},{},{},{},{},{},{},{},{}",
            r.file,
            r.quantization,
            r.size,
            r.parameters,
            r.backend,
            s.threads,
            s.gpu_layers.map(|n| n.to_string()).unwrap_or_default(),
            s.flash_attention
                .map(|on| on.to_string())
                .unwrap_or_default(),
            s.kv_cache_type.as_str(),
            s.batch,
        );
        let mut row = |figure: &str, n: usize, values: &str| {
            out.push_str(&format!("{lead},{figure},{n},{},{values}\n", r.depth));
        };
        let spread = |f: &Figure| format!("{:.3},{:.3},{:.3}", f.median, f.min, f.max);
        if let Some(f) = &r.pp {
            row("pp", 1, &spread(f));
        }
        if let Some(f) = &r.tg {
            row("tg", 1, &spread(f));
        }
        for a in &r.parallel {
            row("tg_aggregate", a.sequences, &spread(&a.figure));
        }
        // Quality figures are one value each: in the median column, min and max empty.
        if let Some(q) = &r.quality {
            let values = [
                ("ppl", Some(q.ppl)),
                ("ppl_error", Some(q.ppl_error)),
                ("ppl_ratio", q.ppl_ratio),
                ("ppl_ratio_error", q.ppl_ratio_error),
                ("kld", q.kld),
                ("same_top", q.same_top),
            ];
            for (figure, value) in values {
                if let Some(v) = value {
                    row(figure, 1, &format!("{v:.6},,"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::KvCacheType;

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
                gpu_layers: None,
                flash_attention: None,
                kv_cache_type: KvCacheType::F16,
                batch: 512,
            },
            depth: 0,
            pp: Some(Figure::of(vec![100.0])),
            tg: Some(Figure::of(vec![10.0])),
            parallel: vec![Aggregate {
                sequences: 4,
                figure: Figure::of(vec![30.0]),
            }],
            cached: 0,
            quality: None,
        }
    }

    #[test]
    fn the_table_and_csv_carry_every_figure() {
        let t = table(&[result()], 512, 128, &[0], 5);
        assert!(t.contains("| m.gguf | Q4_0 | 1.0 MiB | 1.00M | CPU | 100.0 (100.0–100.0) | 10.0 (10.0–10.0) | 30.0 (30.0–30.0) |"), "{t}");
        assert!(
            t.contains("| pp512 tok/s | tg128 tok/s | tg128 x4 aggregate |"),
            "{t}"
        );
        let mut at_1024 = result();
        at_1024.depth = 1024;
        let deep = table(&[at_1024.clone()], 512, 128, &[1024], 1);
        assert!(
            deep.contains(
                "| pp512 @ d1024 tok/s | tg128 @ d1024 tok/s | tg128 @ d1024 x4 aggregate |"
            ),
            "{deep}"
        );
        // Several depths: a column, and the headers say none.
        let both = table(&[result(), at_1024.clone()], 512, 128, &[0, 1024], 1);
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
        let c = csv(&[at_1024]);
        assert_eq!(c.lines().count(), 4);
        assert!(c.starts_with(
            "file,quantization,size,parameters,backend,threads,gpu_layers,flash_attention,\
             kv_cache_type,batch,figure,sequences,depth,median,min,max\n"
        ));
        assert!(c.contains(
            "m.gguf,Q4_0,1048576,1.00M,CPU,2,,,f16,512,tg_aggregate,4,1024,30.000,30.000,30.000"
        ));
    }

    #[test]
    fn the_machine_line_names_the_processor_and_every_gpu() {
        let device =
            |name: &str, description: &str, kind: &'static str, gib: u64| crate::engine::Device {
                name: name.into(),
                description: description.into(),
                backend: name.trim_end_matches(char::is_numeric).into(),
                kind,
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
            backstop: "9.9.9",
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
        let t = table(&[cpu.clone(), gpu.clone()], 512, 128, &[0], 3);
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
        let t = table(&[base.clone(), gpu.clone()], 512, 128, &[0], 1);
        assert!(
            t.contains("| backend | ngl | fa | kv cache | pp512")
                && t.contains("| CPU | default | default | f16 | 100.0")
                && t.contains("| CUDA | 99 | on | q8_0 | 100.0"),
            "{t}"
        );
        assert!(t.ends_with("\n2 threads, 1 repetition\n"), "{t}");
        let c = csv(&[cpu, gpu]);
        assert!(
            c.contains("\nm.gguf,Q4_0,1048576,1.00M,CUDA,2,0,true,q8_0,512,pp,1,0,"),
            "{c}"
        );
        assert!(
            c.contains("\nm.gguf,Q4_0,1048576,1.00M,CUDA,2,99,true,q8_0,512,pp,1,0,"),
            "{c}"
        );
        let json = serde_json::to_value(&base).unwrap();
        assert!(
            json["threads"] == 2
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
        let t = table(&[only_tg.clone()], 0, 128, &[0], 1);
        assert!(
            t.contains("| backend | tg128 tok/s | tg128 x4 aggregate |")
                && t.contains("| CPU | 10.0 (10.0–10.0) | 30.0 (30.0–30.0) |"),
            "{t}"
        );
        assert!(!csv(&[only_tg.clone()]).contains(",pp,"));
        let json = serde_json::to_value(&only_tg).unwrap();
        assert!(
            json["pp"].is_null() && json["tg"]["median"] == 10.0,
            "{json}"
        );

        let mut only_pp = result();
        only_pp.tg = None;
        only_pp.parallel.clear();
        let t = table(&[only_pp.clone()], 512, 0, &[0], 1);
        assert!(
            t.contains("| backend | pp512 tok/s |\n")
                && t.contains("| CPU | 100.0 (100.0–100.0) |\n"),
            "{t}"
        );
        assert_eq!(csv(&[only_pp]).lines().count(), 2);
    }
}
