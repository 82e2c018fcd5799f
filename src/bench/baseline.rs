//! `backstop bench --baseline FILE`: this run's figures against an earlier run's, read back
//! from what its `-o json` or `-o jsonl` wrote, as llama.cpp's `compare-llama-bench.py` sets
//! two builds side by side. A figure is compared only with the same figure of the same file,
//! settings and depth, of a prompt or generation of the same length; each comparison is this
//! run's median over the baseline's, with whether the two runs' ranges overlap (a difference
//! within their spread).

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::report::{Figure, Machine, ModelResult};
use super::served::{Latency, ServedResult};

/// Each result parsed as `T`; none is an error.
fn results_of<T: DeserializeOwned>(
    results: Vec<Value>,
    not_ours: &dyn Fn(String) -> String,
) -> Result<Vec<T>, String> {
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            serde_json::from_value(r).map_err(|e| not_ours(format!("result {}: {e}", i + 1)))
        })
        .collect()
}

/// A figure of the baseline, and this run's against it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Versus {
    /// The baseline's median and spread.
    #[serde(flatten)]
    pub figure: Figure,
    /// This run's median over the baseline's: above 1 is faster now.
    pub ratio: f64,
    /// The two runs' ranges (min–max) overlap: the difference is within their spread.
    pub overlaps: bool,
}

impl Versus {
    /// For a speed; `None` when the baseline's median is not one (0: nothing was measured).
    fn new(now: &Figure, then: &Figure) -> Option<Versus> {
        (then.median > 0.0).then(|| Versus::with(now, then, now.median / then.median))
    }

    /// For a time (lower is better): the baseline's median over this run's, so that above 1
    /// is sooner now, as a speed's ratio above 1 is faster.
    fn sooner(now: &Figure, then: &Figure) -> Option<Versus> {
        (now.median > 0.0).then(|| Versus::with(now, then, then.median / now.median))
    }

    fn with(now: &Figure, then: &Figure, ratio: f64) -> Versus {
        Versus {
            figure: *then,
            ratio,
            overlaps: now.min <= then.max && then.min <= now.max,
        }
    }

    /// `1.05x`, or `≈1.01x` within the spread.
    pub(super) fn cell(&self) -> String {
        let within = if self.overlaps { "≈" } else { "" };
        format!("{within}{:.2}x", self.ratio)
    }

    /// Two CSV fields: the baseline's median and the ratio, both empty without one.
    pub(super) fn csv(v: Option<&Versus>) -> String {
        v.map_or_else(
            || ",".to_owned(),
            |v| format!("{:.3},{:.4}", v.figure.median, v.ratio),
        )
    }
}

/// What the `≈` of [`Versus::cell`] means, said under each table of ratios.
pub(super) const WITHIN_SPREAD: &str =
    "≈: the two runs' ranges (min–max) overlap, a difference within their spread";

/// An aggregate figure of the baseline, and this run's against it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct VersusAggregate {
    /// Sequences decoded together.
    pub sequences: usize,
    /// The comparison.
    #[serde(flatten)]
    pub versus: Versus,
}

/// One result's figures against the baseline's same test (`null` where either run has none).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Compared {
    /// Prompt processing.
    pub pp: Option<Versus>,
    /// Single-stream generation.
    pub tg: Option<Versus>,
    /// A prompt and the generation after it.
    pub pg: Option<Versus>,
    /// Aggregate generation, per sequence count both runs measured.
    pub parallel: Vec<VersusAggregate>,
}

/// A `--server` result's figures against the baseline's same model and client count.
#[derive(Debug, Clone, Serialize)]
pub struct ServedVersus {
    /// The baseline's server they are compared with.
    pub server: String,
    /// Time to first token (its median and range: the p50, min and max), with the
    /// baseline's median over this run's: above 1 is sooner now.
    pub ttft_ms: Option<Versus>,
    /// Each stream's decode rate.
    pub decode: Option<Versus>,
    /// All clients' tokens per second together.
    pub aggregate: Option<Versus>,
}

/// The request lengths of a `--server` run: its figures compare only with the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Lengths {
    /// `-p`.
    pub prompt: usize,
    /// `-n`.
    pub generate: usize,
    /// `--shared-prefix`.
    #[serde(default)]
    pub shared_prefix: usize,
}

/// The results of an earlier run, of either kind.
#[derive(Debug)]
pub(super) enum Runs {
    /// Measured in this process.
    Here(Vec<ModelResult>),
    /// Measured against running servers, with its request lengths.
    Served(Vec<ServedResult>, Lengths),
}

/// An earlier run's results.
#[derive(Debug)]
pub struct Baseline {
    /// The file, as given.
    pub name: String,
    /// The machine it was measured on (the client, for a `--server` run), where the file
    /// says.
    pub machine: Option<Machine>,
    /// A `--server` run's servers, each with what it said it runs.
    pub servers: Vec<String>,
    pub(super) runs: Runs,
}

impl Baseline {
    /// Reads `backstop bench -o json` or `-o jsonl` output of the kind this run is (`served`:
    /// a `--server` run). Anything else (a CSV, the other kind, a file of another program) is
    /// refused, saying what it is not.
    pub fn read(path: &Path, served: bool) -> Result<Baseline, String> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| format!("--baseline {name}: {e}"))?;
        let not_ours = |why: String| {
            format!(
                "--baseline {name} is not what `backstop bench -o json` or `-o jsonl` writes: \
                 {why}"
            )
        };
        // One document (`-o json`), or one result a line (`-o jsonl`, with the run's facts in
        // each: the machine, a `--server` run's lengths).
        let (results, facts) = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(mut doc)) if doc.contains_key("results") => {
                let Some(Value::Array(results)) = doc.remove("results") else {
                    return Err(not_ours("its `results` is not a list".into()));
                };
                (results, Some(Value::Object(doc)))
            }
            Ok(line @ Value::Object(_)) => (vec![line], None),
            Ok(_) => return Err(not_ours("it is not a JSON object".into())),
            Err(whole) => {
                let mut results = Vec::new();
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let value = serde_json::from_str::<Value>(line).map_err(|e| {
                        not_ours(if i == 0 {
                            whole.to_string()
                        } else {
                            format!("line {}: {e}", i + 1)
                        })
                    })?;
                    results.push(value);
                }
                (results, None)
            }
        };
        if results.is_empty() {
            return Err(format!("--baseline {name} holds no results"));
        }
        let facts = facts.unwrap_or_else(|| results[0].clone());
        let was_served = results.iter().any(|r| r.get("server").is_some());
        if was_served != served {
            let (it, this) = if was_served {
                ("a `backstop bench --server` run", "in this process")
            } else {
                ("a run in this process", "against servers")
            };
            return Err(format!(
                "--baseline {name} is {it}, and this run measures {this}: compare a run with \
                 one of its kind"
            ));
        }
        // A `--server` run's servers, with what each said it runs: the report lists them, each
        // JSON line names its own.
        let named = |url: &Value, software: &Value| {
            let url = url.as_str()?;
            Some(match software.as_str() {
                Some(software) => format!("{url} ({software})"),
                None => url.to_owned(),
            })
        };
        let servers = match facts.get("servers").and_then(Value::as_array) {
            Some(list) => list
                .iter()
                .filter_map(|s| named(&s["url"], &s["software"]))
                .collect(),
            None => super::report::distinct(
                results
                    .iter()
                    .filter_map(|r| named(&r["server"], &r["software"])),
            ),
        };
        let runs = if served {
            let lengths = serde_json::from_value::<Lengths>(facts.clone())
                .map_err(|e| not_ours(format!("the run's lengths: {e}")))?;
            Runs::Served(results_of(results, &not_ours)?, lengths)
        } else {
            Runs::Here(results_of(results, &not_ours)?)
        };
        let machine = facts
            .get(if served { "client" } else { "machine" })
            .cloned();
        Ok(Baseline {
            name,
            machine: machine.and_then(|m| serde_json::from_value(m).ok()),
            servers,
            runs,
        })
    }

    /// A `--server` run's request lengths (`None` for an in-process run).
    pub fn lengths(&self) -> Option<Lengths> {
        match &self.runs {
            Runs::Served(_, lengths) => Some(*lengths),
            Runs::Here(_) => None,
        }
    }

    /// A `--server` result's figures against the baseline's of the same model and client
    /// count on the same server, or on its only server where it measured another (the same
    /// service at a new address, or another server set against this one). `None` when the
    /// baseline has none, or asked with other request lengths than `lengths`.
    pub fn compare_served(&self, now: &ServedResult, lengths: Lengths) -> Option<ServedVersus> {
        let Runs::Served(results, then_lengths) = &self.runs else {
            return None;
        };
        if *then_lengths != lengths {
            return None;
        }
        let servers = super::report::distinct(results.iter().map(|r| &r.server));
        let server = match servers.as_slice() {
            _ if servers.contains(&&now.server) => &now.server,
            [only] => *only,
            _ => return None,
        };
        let then = results
            .iter()
            .find(|r| (&r.server, &r.model, r.clients) == (server, &now.model, now.clients))?;
        let ttft = |l: &Latency| Figure {
            median: l.p50,
            min: l.min,
            max: l.max,
        };
        let both = |now: Option<Figure>, then: Option<Figure>, f: fn(&Figure, &Figure) -> _| {
            f(&now?, &then?)
        };
        let compared = ServedVersus {
            server: server.clone(),
            ttft_ms: both(
                now.ttft_ms.map(|l| ttft(&l)),
                then.ttft_ms.map(|l| ttft(&l)),
                Versus::sooner,
            ),
            decode: both(now.decode, then.decode, Versus::new),
            aggregate: both(now.aggregate, then.aggregate, Versus::new),
        };
        let any =
            compared.ttft_ms.is_some() || compared.decode.is_some() || compared.aggregate.is_some();
        any.then_some(compared)
    }

    /// The results of an in-process run (none for a `--server` run's).
    fn here(&self) -> &[ModelResult] {
        match &self.runs {
            Runs::Here(results) => results,
            Runs::Served(..) => &[],
        }
    }

    /// The baseline's figures of the same file, settings and depth as `now`, each from a
    /// test that measured it as `now` did: a prompt of the same length, a generation of the
    /// same length (each timed on its own, so `-p 512 -n 128` and `-p 512,1024 -n 128` share
    /// them), or the same `--pg` pair. `None` when there are none.
    pub fn compare(&self, now: &ModelResult) -> Option<Compared> {
        let same = |b: &&ModelResult| {
            (&b.file, &b.setting, b.depth, b.ctx) == (&now.file, &now.setting, now.depth, now.ctx)
                && b.test.together == now.test.together
        };
        let of = |pick: &dyn Fn(&ModelResult) -> Option<Figure>| {
            self.here().iter().filter(same).find_map(pick)
        };
        let versus =
            |now: &Option<Figure>, then: Option<Figure>| Versus::new(now.as_ref()?, &then?);
        let (prompt, generate) = (now.test.prompt, now.test.generate);
        let compared = Compared {
            pp: versus(&now.pp, of(&|b| b.pp.filter(|_| b.test.prompt == prompt))),
            tg: versus(
                &now.tg,
                of(&|b| b.tg.filter(|_| b.test.generate == generate)),
            ),
            pg: versus(&now.pg, of(&|b| b.pg.filter(|_| b.test == now.test))),
            parallel: now
                .parallel
                .iter()
                .filter_map(|a| {
                    let then = of(&|b| {
                        let same_length = b.test.generate == generate;
                        let k = b.parallel.iter().find(|b| b.sequences == a.sequences);
                        k.filter(|_| same_length).map(|b| b.figure)
                    });
                    Some(VersusAggregate {
                        sequences: a.sequences,
                        versus: Versus::new(&a.figure, &then?)?,
                    })
                })
                .collect(),
        };
        let any = compared.pp.is_some()
            || compared.tg.is_some()
            || compared.pg.is_some()
            || !compared.parallel.is_empty();
        any.then_some(compared)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A result as `-o json` writes it: one figure for each median given, its spread ±1.
    fn result(
        threads: u32,
        prompt: usize,
        generate: usize,
        together: bool,
        medians: &[f64],
    ) -> Value {
        let figure = |m: f64| json!({"median": m, "min": m - 1.0, "max": m + 1.0});
        let (pp, tg, pg) = match (together, medians) {
            (true, [pg]) => (Value::Null, Value::Null, figure(*pg)),
            (false, [pp, tg, _]) => (figure(*pp), figure(*tg), Value::Null),
            _ => unreachable!(),
        };
        let (pp, tg) = (
            if prompt > 0 && !together {
                pp
            } else {
                Value::Null
            },
            if generate > 0 && !together {
                tg
            } else {
                Value::Null
            },
        );
        json!({
            "file": "m.gguf", "size": 1, "quantization": "Q4_0", "parameters": "1M",
            "architecture": "llama", "backend": "CPU", "threads": threads, "gpu_layers": null,
            "flash_attention": null, "kv_cache_type": "f16", "batch": 512, "depth": 0,
            "prompt": prompt, "generate": generate, "together": together,
            "pp": pp, "tg": tg, "pg": pg,
            "parallel": if generate > 0 && !together { tg_x2(medians) } else { json!([]) },
            "cached": 0,
        })
    }

    fn tg_x2(medians: &[f64]) -> Value {
        let x2 = medians.get(2).copied().unwrap_or(0.0);
        json!([{"sequences": 2, "median": x2, "min": x2 - 1.0, "max": x2 + 1.0}])
    }

    fn now(v: Value) -> ModelResult {
        serde_json::from_value(v).unwrap()
    }

    /// A file written for a test, removed when the test is done with it.
    struct Written(std::path::PathBuf);

    impl std::ops::Deref for Written {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Written {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn written(name: &str, text: &str) -> Written {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "backstop-baseline-{}-{n}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        Written(path)
    }

    #[test]
    fn each_figure_is_set_against_the_same_length_measured_alike() {
        let doc = json!({
            "machine": {"cpu": "Old CPU", "cores": 4, "logical": 8, "devices": [], "backstop": "0.0.9"},
            "results": [
                result(2, 512, 128, false, &[100.0, 10.0, 30.0]),
                result(4, 512, 128, false, &[200.0, 20.0, 60.0]),
                result(2, 512, 128, true, &[50.0]),
            ],
        });
        let path = written("doc.json", &doc.to_string());
        let b = Baseline::read(&path, false).unwrap();
        assert_eq!(
            b.machine.as_ref().map(|m| m.line()).unwrap(),
            "Old CPU (4 cores, 8 logical); backstop 0.0.9"
        );

        // The prompt of a test of both lengths is the prompt of a test of the prompt alone.
        let c = b
            .compare(&now(result(2, 512, 0, false, &[150.0, 0.0, 0.0])))
            .unwrap();
        let pp = c.pp.unwrap();
        assert_eq!(
            (pp.figure.median, pp.ratio, pp.overlaps),
            (100.0, 1.5, false)
        );
        assert!(c.tg.is_none() && c.pg.is_none() && c.parallel.is_empty());
        // The generation alone, with its aggregate; a spread that overlaps says so.
        let c = b
            .compare(&now(result(4, 0, 128, false, &[0.0, 21.0, 45.0])))
            .unwrap();
        let (tg, x2) = (c.tg.unwrap(), c.parallel[0]);
        assert_eq!(
            (tg.figure.median, tg.ratio, tg.overlaps),
            (20.0, 1.05, true)
        );
        assert_eq!(
            (x2.sequences, x2.versus.ratio, x2.versus.overlaps),
            (2, 0.75, false)
        );
        assert!(c.pp.is_none());
        // A --pg figure only against the same pair timed as one.
        let c = b.compare(&now(result(2, 512, 128, true, &[40.0]))).unwrap();
        assert_eq!(c.pg.unwrap().ratio, 0.8);
        assert!(c.pp.is_none() && c.tg.is_none());
        assert!(b.compare(&now(result(2, 512, 64, true, &[40.0]))).is_none());
        // Another length, setting, depth or file: nothing to compare with.
        assert!(b
            .compare(&now(result(2, 256, 0, false, &[1.0, 0.0, 0.0])))
            .is_none());
        assert!(b
            .compare(&now(result(8, 512, 128, false, &[1.0, 1.0, 1.0])))
            .is_none());
        let mut deeper = now(result(2, 512, 128, false, &[1.0, 1.0, 1.0]));
        deeper.depth = 1024;
        assert!(b.compare(&deeper).is_none());
        let mut other = now(result(2, 512, 128, false, &[1.0, 1.0, 1.0]));
        other.file = "n.gguf".into();
        assert!(b.compare(&other).is_none());
        // The context `--ctx` set is part of the setting (none given: `null`, or absent in an
        // older file, as here).
        let mut sized = now(result(2, 512, 128, false, &[1.0, 1.0, 1.0]));
        assert!(b.compare(&sized).is_some());
        sized.ctx = Some(4096);
        assert!(b.compare(&sized).is_none());
        // A baseline median of 0 measured nothing: no ratio.
        let zero = written(
            "zero.json",
            &json!({"results": [result(2, 512, 0, false, &[0.0, 0.0, 0.0])]}).to_string(),
        );
        assert!(Baseline::read(&zero, false)
            .unwrap()
            .compare(&now(result(2, 512, 0, false, &[9.0, 0.0, 0.0])))
            .is_none());
    }

    /// A `--server` result as `-o json` writes it.
    fn served(server: &str, clients: usize, ttft: f64, decode: f64, aggregate: f64) -> Value {
        let figure = |m: f64| json!({"median": m, "min": m - 1.0, "max": m + 1.0});
        json!({
            "server": server, "model": "m", "clients": clients, "requests": 3, "errors": 0,
            "prompt_tokens": 48, "tokens": 8,
            "ttft_ms": {"p50": ttft, "p95": ttft + 1.0, "min": ttft - 1.0, "max": ttft + 1.0},
            "decode": figure(decode), "aggregate": figure(aggregate), "relative": null,
        })
    }

    #[test]
    fn a_server_run_is_set_against_the_same_model_and_clients() {
        let lengths = Lengths {
            prompt: 48,
            generate: 8,
            shared_prefix: 0,
        };
        let doc = json!({
            "prompt": 48, "generate": 8, "shared_prefix": 0, "reps": 3,
            "client": {"cpu": "Client CPU", "cores": 2, "logical": 2, "devices": [], "backstop": "0.1.0"},
            "servers": [{"url": "http://a:8080", "software": "backstop 0.0.9"}],
            "results": [served("http://a:8080", 1, 200.0, 50.0, 50.0), served("http://a:8080", 4, 400.0, 30.0, 100.0)],
        });
        let path = written("served.json", &doc.to_string());
        let b = Baseline::read(&path, true).unwrap();
        assert_eq!(b.lengths(), Some(lengths));
        assert_eq!(b.machine.as_ref().unwrap().cpu, "Client CPU");
        assert_eq!(b.servers, ["http://a:8080 (backstop 0.0.9)"]);
        let now = |server: &str, clients: usize| -> ServedResult {
            serde_json::from_value(served(server, clients, 100.0, 55.0, 200.0)).unwrap()
        };
        // Half the time to the first token is twice as soon; rates are this run's over its.
        let c = b.compare_served(&now("http://a:8080", 4), lengths).unwrap();
        assert_eq!(c.server, "http://a:8080");
        let ttft = c.ttft_ms.unwrap();
        assert_eq!(
            (ttft.figure.median, ttft.ratio, ttft.overlaps),
            (400.0, 4.0, false)
        );
        assert_eq!(c.decode.unwrap().ratio, 55.0 / 30.0);
        assert_eq!(c.aggregate.unwrap().ratio, 2.0);
        // Its only server stands for a server it did not measure; not with another model,
        // client count, or request lengths.
        let moved = b.compare_served(&now("http://b:9090", 1), lengths).unwrap();
        assert_eq!(
            (moved.server.as_str(), moved.decode.unwrap().ratio),
            ("http://a:8080", 1.1)
        );
        assert!(b
            .compare_served(&now("http://a:8080", 2), lengths)
            .is_none());
        let mut other = now("http://a:8080", 1);
        other.model = "n".into();
        assert!(b.compare_served(&other, lengths).is_none());
        let longer = Lengths {
            prompt: 512,
            ..lengths
        };
        assert!(b.compare_served(&now("http://a:8080", 1), longer).is_none());
        // With two servers in the baseline, a third has no counterpart.
        // (JSON Lines: the run's lengths are in every line.)
        let line = |server: &str| {
            let mut line = served(server, 1, 1.0, 1.0, 1.0);
            for (key, n) in [("prompt", 48), ("generate", 8), ("shared_prefix", 0)] {
                line[key] = json!(n);
            }
            line
        };
        let two = written(
            "two.jsonl",
            &format!("{}\n{}\n", line("http://a:8080"), line("http://c:7070")),
        );
        let b = Baseline::read(&two, true).unwrap();
        assert_eq!(b.servers, ["http://a:8080", "http://c:7070"]);
        assert!(b
            .compare_served(&now("http://b:9090", 1), lengths)
            .is_none());
        assert!(b
            .compare_served(&now("http://c:7070", 1), lengths)
            .is_some());
        // An in-process run is no baseline for a run against servers, nor the other way.
        let here = written(
            "here.json",
            &json!({"results": [result(2, 16, 4, false, &[1.0, 1.0, 1.0])]}).to_string(),
        );
        let err = Baseline::read(&here, true).unwrap_err();
        assert!(
            err.contains("is a run in this process, and this run measures against servers"),
            "{err}"
        );
        assert!(Baseline::read(&path, false).is_err());
    }

    #[test]
    fn json_lines_are_read_and_other_files_refused() {
        let mut line = result(2, 16, 4, false, &[100.0, 10.0, 30.0]);
        line["machine"] = json!({"cpu": "Line CPU", "cores": 2, "logical": 2, "devices": [], "backstop": "0.1.0"});
        line["reps"] = json!(1);
        let mut second = result(2, 32, 0, false, &[90.0, 0.0, 0.0]);
        second["reps"] = json!(1);
        let lines = written("run.jsonl", &format!("{line}\n\n{second}\n"));
        let b = Baseline::read(&lines, false).unwrap();
        assert_eq!(b.here().len(), 2);
        assert_eq!(b.machine.unwrap().cpu, "Line CPU");
        // One line alone is one JSON document that is a result.
        let one = written("one.jsonl", &format!("{line}\n"));
        assert_eq!(Baseline::read(&one, false).unwrap().here().len(), 1);

        for (name, text, says) in [
            (
                "run.csv",
                "file,quantization\nm.gguf,Q4_0\n",
                "not what `backstop bench -o json`",
            ),
            ("list.json", "[1, 2]", "it is not a JSON object"),
            ("bad.jsonl", &format!("{line}\n{{oops\n"), "line 2:"),
            (
                "results.json",
                r#"{"results": {"a": 1}}"#,
                "`results` is not a list",
            ),
            (
                "other.json",
                r#"{"results": [{"name": "x"}]}"#,
                "result 1: missing field",
            ),
            ("empty.json", "", "holds no results"),
            ("none.json", r#"{"results": []}"#, "holds no results"),
            (
                "served.json",
                r#"{"servers": [], "results": [{"server": "http://127.0.0.1:8080", "model": "m"}]}"#,
                "is a `backstop bench --server` run, and this run measures in this process",
            ),
        ] {
            let path = written(name, text);
            let err = Baseline::read(&path, false).unwrap_err();
            assert!(err.contains(says) && err.contains(name), "{name}: {err}");
        }
        let err = Baseline::read(Path::new("/nonexistent/run.json"), false).unwrap_err();
        assert!(
            err.starts_with("--baseline /nonexistent/run.json: "),
            "{err}"
        );
    }
}
