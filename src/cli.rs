//! Command-line interface. Flags win over `BACKSTOP_*` variables, which win over the
//! config file, which wins over built-in defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// backstop: local GGUF models over the OpenAI and Ollama APIs.
#[derive(Debug, Parser)]
#[command(name = "backstop", version, about, long_about = None)]
pub struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, env = "BACKSTOP_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses this process's command line; one that fails and uses llama-bench's spellings
    /// that clap cannot read also says what `backstop bench` calls them.
    pub fn from_env() -> Cli {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        Cli::try_parse_from(&args).unwrap_or_else(|e| {
            let _ = e.print();
            if e.use_stderr() {
                let words: Vec<String> = args
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect();
                for hint in llama_bench_hints(&words) {
                    eprintln!("hint: {hint}");
                }
            }
            std::process::exit(e.exit_code())
        })
    }
}

/// llama-bench's flags that a command line parser of single-letter short flags reads as
/// something else (`-ngl 99` is `-n gl`, `-fa 1` is `-f a 1`), with what `backstop bench`
/// calls them.
const LLAMA_BENCH_FLAGS: [(&str, &str); 7] = [
    ("-ngl", "--gpu-layers (or --n-gpu-layers)"),
    ("-fa", "--flash-attention (or --flash-attn)"),
    (
        "-ctk",
        "--kv-cache-type, which sets the K and V caches together",
    ),
    (
        "-ctv",
        "--kv-cache-type, which sets the K and V caches together",
    ),
    (
        "-ub",
        "-b/--batch, which sets n_batch and n_ubatch together",
    ),
    ("-pg", "--pg P,N (or --prompt-gen)"),
    ("-m", "the GGUF files themselves, without -m"),
];

/// What `backstop bench` calls the llama-bench flags on a `bench` command line.
pub fn llama_bench_hints(args: &[String]) -> Vec<String> {
    // The subcommand: the first word that is neither a flag nor the global flag's value.
    let command = (1..args.len())
        .find(|&i| !args[i].starts_with('-') && args[i - 1] != "--log-format")
        .map(|i| args[i].as_str());
    if command != Some("bench") {
        return Vec::new();
    }
    LLAMA_BENCH_FLAGS
        .iter()
        .filter(|(flag, _)| args.iter().any(|a| a == flag))
        .map(|(flag, ours)| format!("llama-bench's {flag} is {ours} here"))
        .collect()
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The subcommands. All but `serve` talk to a running server, as Ollama's do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve models over HTTP (OpenAI and Ollama APIs).
    Serve(ServeArgs),
    /// Chat with a model: one answer to PROMPT, or an interactive session without one.
    Run(RunArgs),
    /// List the models the server can serve.
    #[command(alias = "ls")]
    List(ClientArgs),
    /// List the models loaded now.
    Ps(ClientArgs),
    /// Show a model's details, parameters, template or Modelfile.
    Show(ShowArgs),
    /// Download a model into the store (Hugging Face: hf.co/OWNER/REPO:QUANT, or OWNER/REPO --file F).
    Pull(PullArgs),
    /// Remove models from the store.
    Rm(RmArgs),
    /// Copy a model under a new name.
    Cp(CpArgs),
    /// Create a model from a Modelfile (FROM a GGUF file or a model, PARAMETER, SYSTEM).
    Create(CreateArgs),
    /// Unload a model now.
    Stop(ModelArgs),
    /// Failover drill against a running server: cloud path off, answers must come from the
    /// local model; cloud path on, the cloud must answer again. Exit 0 only if all held. The
    /// cloud path goes off for at most 60 s + 30 s per request; Ctrl-C switches it back on.
    Drill(DrillArgs),
    /// Tokens per second for prompt processing and generation, per GGUF (quantizations side
    /// by side), in this process with no server; or, with --server, of running servers.
    // Boxed: its options make it far larger than the other commands'.
    Bench(Box<BenchArgs>),
    /// Quantize a GGUF with llama.cpp's quantizer: `backstop quantize IN OUT TYPE`; or work out
    /// what some types would make without quantizing: `backstop quantize --dry-run IN TYPE,...`.
    #[command(
        override_usage = "backstop quantize [OPTIONS] <IN> <OUT> <TYPE>\n       \
                                backstop quantize --dry-run [OPTIONS] <IN> <TYPE>[,TYPE...]"
    )]
    Quantize(QuantizeArgs),
    /// Compute an importance matrix for `backstop quantize --imatrix` from a calibration text:
    /// `backstop imatrix MODEL -f TEXT -o FILE`.
    Imatrix(ImatrixArgs),
    /// Monitor a running server: API up, models present, breakers closed, a real inference
    /// above --min-tps. Exit 0 healthy, 1 degraded, 2 down; --webhook alerts.
    Check(CheckArgs),
    /// API keys: `backstop keys new --name NAME` prints a fresh secret and its TOML.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The configuration: `backstop config check` validates it without serving.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Internal: loads a GGUF and computes a few rows, in a child process, so that a file
    /// llama.cpp cannot compute aborts the child and not the server (see `engine::probe`).
    #[command(name = crate::engine::probe::SUBCOMMAND, hide = true)]
    ProbeCompute(ProbeArgs),
}

/// `backstop probe-compute` (internal).
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// The GGUF file.
    pub path: PathBuf,
    /// Layers to offload to the GPU, as the server will.
    #[arg(long, value_name = "N")]
    pub gpu_layers: Option<u32>,
}

/// `backstop bench`'s output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchFormat {
    /// A markdown table (`md`, as llama-bench names it, too).
    #[value(alias = "md")]
    Table,
    /// JSON.
    Json,
    /// CSV.
    Csv,
    /// JSON Lines: each result on a line of its own as soon as it is measured, with the
    /// machine in every line, so a long sweep stopped part way keeps what it finished
    /// (llama-bench's `-o jsonl`).
    Jsonl,
}

/// `backstop bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// GGUF files or store model names; with --server, the models as the servers name them.
    #[arg(required = true, value_name = "FILE_OR_MODEL")]
    pub models: Vec<String>,
    /// Measure a running server instead, over the OpenAI API (backstop, Ollama, llama-server,
    /// vLLM, ...): time to first token, each stream's decode rate and the aggregate, with one
    /// client and each --parallel count of concurrent clients. Give it again to compare
    /// servers side by side, each against the first.
    #[arg(long, value_name = "URL", conflicts_with_all = [
        "threads", "threads_batch", "numa", "gpu_layers", "ctx", "flash_attention", "quantize",
        "kv_cache_type", "depth",
        "quality", "quality_text", "quality_save", "quality_base", "quality_chunk", "batch",
        "hellaswag", "hellaswag_tasks", "winogrande", "winogrande_tasks", "multiple_choice",
        "multiple_choice_tasks",
    ])]
    pub server: Vec<String>,
    /// API key for --server [default: BACKSTOP_API_KEY].
    #[arg(long, value_name = "KEY", requires = "server")]
    pub api_key: Option<String>,
    /// With --server, the first N of the -p prompt tokens are a system prompt that every
    /// request shares (an agent's instructions, a RAG template): what a prefix cache saves.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "server")]
    pub shared_prefix: usize,
    /// With --server, a request fails when the server sends nothing for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, requires = "server",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// Prompt tokens for prompt processing (0 leaves the figure out), or several to compare,
    /// e.g. 128,512,2048: with more than one -p or -n value, as in llama-bench, each prompt
    /// and each generation is its own test (--server takes one of each).
    #[arg(short = 'p', long = "prompt", visible_alias = "n-prompt", value_delimiter = ',',
          value_name = "N,...",
          default_values_t = [512])]
    pub prompts: Vec<usize>,
    /// Tokens generated (0 leaves generation out), or several to compare, e.g. 32,128.
    #[arg(short = 'n', long = "gen", visible_alias = "n-gen", value_delimiter = ',',
          value_name = "N,...",
          default_values_t = [128])]
    pub gens: Vec<usize>,
    /// A prompt of P tokens and then N tokens generated from it, timed as one (llama-bench's
    /// -pg): a whole request's tokens per second. Give it again for more, e.g.
    /// --pg 512,128 --pg 4096,256; they are measured after the -p and -n tests.
    #[arg(long = "pg", visible_alias = "prompt-gen", value_name = "P,N",
          value_parser = parse_prompt_gen)]
    pub prompt_gen: Vec<(usize, usize)>,
    /// Tokens already in the cache when each measurement starts (llama-bench's depth), or
    /// several to compare, e.g. 0,1024,4096: speed deep into a conversation [default: 0].
    #[arg(
        short = 'd',
        long,
        visible_alias = "n-depth",
        value_delimiter = ',',
        value_name = "N,..."
    )]
    pub depth: Vec<usize>,
    /// Repetitions after one warm-up.
    #[arg(short = 'r', long, visible_alias = "repetitions", default_value_t = 5)]
    pub reps: usize,
    /// CPU threads, or several to compare, e.g. 1,2,4 [default: the physical cores it may use].
    #[arg(short = 't', long, value_delimiter = ',', value_name = "N,...",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Vec<u32>,
    /// CPU threads that read the prompt (`serve --threads-batch`, llama-server's -tb), or
    /// several to compare, e.g. 2,4 [default: --threads].
    #[arg(long, value_delimiter = ',', value_name = "N,...",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub threads_batch: Vec<u32>,
    /// Most tokens in one decode (llama.cpp's n_batch and n_ubatch, `serve --batch`), or
    /// several to compare, e.g. 64,128,512: the prompt is read in pieces this long, as a
    /// server reads one with --prefill-chunk while others generate [default: 512, as `serve`].
    #[arg(short = 'b', long, visible_alias = "batch-size", value_delimiter = ',',
          value_name = "N,...",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: Vec<u32>,
    /// Also aggregate generation over N sequences sharing each decode, e.g. 1,4,8; with
    /// --server, N concurrent streaming clients.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub parallel: Vec<usize>,
    /// Layers to offload to a GPU, or several to compare, e.g. 0,99: every layer kept on the
    /// CPU against every layer on the GPU [default: llama.cpp's, all with a GPU].
    #[arg(
        long,
        visible_alias = "n-gpu-layers",
        value_delimiter = ',',
        value_name = "N,..."
    )]
    pub gpu_layers: Vec<u32>,
    /// Context cells per sequence [default: just enough]; a server's --ctx compares like
    /// with like.
    #[arg(long)]
    pub ctx: Option<u32>,
    /// Flash attention: 1/true or 0/false, or 0,1 to compare [default: as `serve` decides
    /// for this machine].
    #[arg(long, visible_alias = "flash-attn", value_delimiter = ',', value_name = "BOOL,...",
          value_parser = parse_flag_bool)]
    pub flash_attention: Vec<bool>,
    /// Also measure these quantizations of each model, e.g. Q8_0,Q6_K,Q4_K_M, built with
    /// llama.cpp's quantizer into --quantize-dir (kept there, and reused by a later run on the
    /// same file).
    #[arg(long, value_delimiter = ',', value_name = "TYPE,...")]
    pub quantize: Vec<String>,
    /// Where --quantize writes its files [default: ~/.cache/backstop/ladder].
    #[arg(long, value_name = "DIR", requires = "quantize")]
    pub quantize_dir: Option<PathBuf>,
    /// Build the --quantize rungs with this importance matrix (`backstop imatrix`), as
    /// `<stem>-<TYPE>-imatrix.gguf`; it opens the types that need one (IQ2_XS, ...).
    #[arg(long, value_name = "FILE", requires = "quantize")]
    pub imatrix: Option<PathBuf>,
    /// Also measure output quality on a fixed text: each model's perplexity, and against the
    /// first model of the same vocabulary (the source of a --quantize ladder), the mean KL
    /// divergence of each next-token distribution and how often both put the same token
    /// first. With -p 0 -n 0, only quality.
    #[arg(long)]
    pub quality: bool,
    /// The text --quality scores, plain UTF-8 [default: about 1,100 words of English prose
    /// built in].
    #[arg(long, value_name = "FILE", conflicts_with = "quality_base")]
    pub quality_text: Option<PathBuf>,
    /// Tokens per chunk of the --quality text, each read from an empty cache with its second
    /// half scored (llama-perplexity's -c): longer chunks score each token with more before
    /// it [default: 512, or the model's training context when shorter]. Implies --quality.
    #[arg(long, value_name = "N", conflicts_with = "quality_base",
          value_parser = clap::value_parser!(u32).range(16..))]
    pub quality_chunk: Option<u32>,
    /// Also save the first model's next-token distributions at each scored position to FILE
    /// (what --quality-base reads; llama.cpp's `llama-perplexity --kl-divergence-base` format,
    /// so that tool reads it too): score a large model once, compare its quantizations with
    /// it later without loading it again. Implies --quality.
    #[arg(long, value_name = "FILE", conflicts_with = "quality_base")]
    pub quality_save: Option<PathBuf>,
    /// Compare every model with the distributions saved in FILE (by --quality-save, or by
    /// `llama-perplexity --kl-divergence-base`), over the tokens they were saved from, instead
    /// of with the first model given. Implies --quality.
    #[arg(long, value_name = "FILE")]
    pub quality_base: Option<PathBuf>,
    /// Also score the HellaSwag tasks in FILE (llama.cpp's `llama-perplexity --hellaswag`
    /// layout: six lines a task, the context, the right ending's number from 0 to 3, and four
    /// endings): how often each model picks the right ending, with its 95% interval, and how
    /// often it picks what the first model picked. With -p 0 -n 0, only this.
    #[arg(long, value_name = "FILE")]
    pub hellaswag: Option<PathBuf>,
    /// Tasks --hellaswag scores, drawn from the file as llama-perplexity draws them
    /// [default: 400, or all the file has when fewer].
    #[arg(long, value_name = "N", requires = "hellaswag",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub hellaswag_tasks: Option<u64>,
    /// Also score the Winogrande tasks in FILE (llama.cpp's `llama-perplexity --winogrande`
    /// CSV: index, a sentence with a _ for the blank, two choices for it, the right one's
    /// number, 1 or 2): how often each model fills the blank rightly, with its 95% interval,
    /// and how often it picks what the first model picked. With -p 0 -n 0, only this.
    #[arg(long, value_name = "FILE")]
    pub winogrande: Option<PathBuf>,
    /// Tasks --winogrande scores, drawn from the file as llama-perplexity draws them
    /// [default: all the file has].
    #[arg(long, value_name = "N", requires = "winogrande",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub winogrande_tasks: Option<u64>,
    /// Also score the multiple-choice tasks in FILE (llama.cpp's `llama-perplexity
    /// --multiple-choice` binary file: ARC, MMLU or TruthfulQA as that tool's datasets give
    /// them): how often each model picks the right answer, with its 95% interval, and how often
    /// it picks what the first model picked. With -p 0 -n 0, only this.
    #[arg(long, value_name = "FILE")]
    pub multiple_choice: Option<PathBuf>,
    /// Tasks --multiple-choice scores, drawn from the file as llama-perplexity draws them
    /// [default: all the file has].
    #[arg(long, value_name = "N", requires = "multiple_choice",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub multiple_choice_tasks: Option<u64>,
    /// KV cache element type: f16, q8_0 or q4_0, or several to compare [default: f16].
    #[arg(long, value_delimiter = ',', value_name = "TYPE,...", value_parser = parse_kv_type)]
    pub kv_cache_type: Vec<crate::engine::KvCacheType>,
    /// Where llama.cpp's threads run on a machine of several NUMA nodes, as `serve --numa`
    /// (one placement a run: llama.cpp places its threads once) [default: off].
    #[arg(long, value_name = "off|distribute|isolate|numactl", value_parser = parse_numa)]
    pub numa: Option<crate::engine::numa::Numa>,
    /// Output format.
    #[arg(short = 'o', long, visible_alias = "output", value_enum,
          default_value_t = BenchFormat::Table)]
    pub format: BenchFormat,
    /// Compare with an earlier run, from what its `-o json` or `-o jsonl` wrote: each figure
    /// it measured with the same file, settings, depth and length (pp512, tg128 x4, ...) is
    /// set against this run's as the ratio of their medians (a second table; `baseline` in
    /// JSON; more CSV columns); with --server, an earlier --server run's same model and client
    /// count. A llama.cpp upgrade, another build or another machine, side by side.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
}

/// The boolean spellings `serve` accepts (1/true/yes/on, 0/false/no/off).
fn parse_flag_bool(text: &str) -> Result<bool, String> {
    crate::config::parse_bool(text).ok_or_else(|| format!("`{text}` is not 1/true or 0/false"))
}

/// A KV cache element type, as `serve --kv-cache-type` spells it.
/// `--pg P,N`: both above 0 (one of them alone is -p or -n).
fn parse_prompt_gen(text: &str) -> Result<(usize, usize), String> {
    let pair = text.split_once(',').and_then(|(p, n)| {
        Some((
            p.trim().parse::<usize>().ok()?,
            n.trim().parse::<usize>().ok()?,
        ))
    });
    match pair {
        Some((p, n)) if p > 0 && n > 0 => Ok((p, n)),
        Some(_) => Err("both must be above 0 (-p or -n measures one alone)".into()),
        None => Err(format!(
            "`{text}` is not P,N: prompt tokens, then tokens generated"
        )),
    }
}

fn parse_numa(text: &str) -> Result<crate::engine::numa::Numa, String> {
    crate::engine::numa::Numa::parse(text)
        .ok_or_else(|| format!("`{text}` is not off, distribute, isolate or numactl"))
}

fn parse_kv_type(text: &str) -> Result<crate::engine::KvCacheType, String> {
    crate::engine::KvCacheType::parse(text)
        .ok_or_else(|| format!("`{text}` is not f16, q8_0 or q4_0"))
}

/// `backstop quantize`.
#[derive(Debug, Clone, Args)]
pub struct QuantizeArgs {
    /// The GGUF to read (F16/BF16 ideally; an already quantized one is requantized, with a warning).
    pub input: PathBuf,
    /// The GGUF to write (with --dry-run, the types instead, unless both are given).
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q4_0, Q4_1, Q3_K_M, Q2_K, IQ4_XS, F16, ...;
    /// with --imatrix also IQ3_XXS, IQ2_M, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S, Q2_K_S;
    /// COPY writes the tensors as they are (a split model joined, --override-kv keys set).
    #[arg(value_name = "TYPE", required_unless_present = "dry_run")]
    pub kind: Option<String>,
    /// Write nothing: print the size each TYPE (a comma-separated list) would make, as
    /// llama.cpp's quantizer works it out without quantizing.
    #[arg(long)]
    pub dry_run: bool,
    /// CPU threads [default: the physical cores it may use].
    #[arg(short = 't', long, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// An importance matrix (from `backstop imatrix`, or llama.cpp's llama-imatrix in its GGUF
    /// or .dat format): rounding errors are weighed by how large the activations each weight
    /// multiplies are, so low-bit types lose less quality; the 1- and 2-bit i-quants need one.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// The output layer (output.weight) in this ggml type (q8_0, q6_K, f16, ...) instead of
    /// the mix's.
    #[arg(long, value_name = "GGML_TYPE")]
    pub output_tensor_type: Option<String>,
    /// The token embeddings in this ggml type instead of the mix's.
    #[arg(long, value_name = "GGML_TYPE")]
    pub token_embedding_type: Option<String>,
    /// Leave the output layer as it is in the input.
    #[arg(long, conflicts_with = "output_tensor_type")]
    pub leave_output_tensor: bool,
    /// Every quantized tensor in TYPE itself: no per-tensor mix (a K-quant mix puts some
    /// tensors in larger types).
    #[arg(long)]
    pub pure: bool,
    /// Tensors whose name PATTERN (a regular expression, e.g. ffn_down or blk\.[0-3]\.) matches
    /// in GGML_TYPE; repeatable, the first that matches wins.
    #[arg(long = "tensor-type", value_name = "PATTERN=GGML_TYPE")]
    pub tensor_types: Vec<String>,
    /// Set a metadata key in the output: TYPE is int (0 to 4294967295), float, bool (true or
    /// false) or str (at most 127 bytes); repeatable, e.g. general.name=str:my-model.
    #[arg(long = "override-kv", value_name = "KEY=TYPE:VALUE")]
    pub overrides: Vec<String>,
    /// IN is a model split into several files (NAME-00001-of-00003.gguf, the first given):
    /// write as many parts, each with its input part's tensors, as OUT-00001-of-00003.gguf and
    /// on (OUT without .gguf). Without it a split model is written as one file.
    #[arg(long, conflicts_with = "dry_run")]
    pub keep_split: bool,
    /// Leave these layers (blk.N, numbered from 0; a comma-separated list) out of OUT, the
    /// layers after them numbered down: how much a model loses without some of its layers,
    /// measured with `backstop bench --quality` (llama-quantize's option of the same name).
    /// Not with --keep-split: the parts would no longer hold their input parts' tensors.
    #[arg(
        long,
        value_name = "N,...",
        value_delimiter = ',',
        conflicts_with = "keep_split"
    )]
    pub prune_layers: Vec<u32>,
    /// Use the importance matrix only for the weights whose name contains one of these
    /// (repeatable, or a comma-separated list, e.g. attn_v,ffn_down); the others are quantized
    /// without it.
    #[arg(
        long,
        value_name = "NAME,...",
        value_delimiter = ',',
        requires = "imatrix",
        conflicts_with = "exclude_weights"
    )]
    pub include_weights: Vec<String>,
    /// Use the importance matrix for every weight except those whose name contains one of
    /// these (repeatable, or a comma-separated list, e.g. ffn_down). A name is matched
    /// anywhere in a weight's, as llama-quantize matches it: output.weight is also each
    /// layer's attn_output.weight.
    #[arg(
        long,
        value_name = "NAME,...",
        value_delimiter = ',',
        requires = "imatrix"
    )]
    pub exclude_weights: Vec<String>,
}

/// `backstop imatrix`.
#[derive(Debug, Clone, Args)]
pub struct ImatrixArgs {
    /// The GGUF to read the text through: the model that will be quantized (F16/BF16 ideally).
    /// With --in-file alone, the model the matrices are checked against.
    #[arg(required_unless_present = "show_statistics")]
    pub model: Option<PathBuf>,
    /// The calibration text, plain UTF-8: text like what the model will be asked (prose, code,
    /// chat), some hundred thousand tokens for a real model.
    #[arg(
        short = 'f',
        long = "file",
        value_name = "TEXT",
        required_unless_present = "in_files"
    )]
    pub text: Option<PathBuf>,
    /// Where to write the matrix (llama.cpp's GGUF imatrix format).
    #[arg(short = 'o', long, value_name = "FILE", default_value = "imatrix.gguf")]
    pub output: PathBuf,
    /// A matrix to start from (GGUF, or llama.cpp's legacy .dat); repeatable, or several with
    /// commas as llama-imatrix takes them. The text's statistics are added to theirs; without
    /// -f the files are only combined.
    #[arg(long = "in-file", value_name = "FILE", value_delimiter = ',')]
    pub in_files: Vec<PathBuf>,
    /// Tokens per chunk, each read from an empty cache.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(16..))]
    pub chunk: u32,
    /// Read at most this many chunks [default: all the text gives].
    #[arg(long, requires = "text", value_parser = clap::value_parser!(u32).range(1..))]
    pub chunks: Option<u32>,
    /// Pass over the text's first N chunks: where an earlier run that saved N chunks stopped
    /// (resume with --in-file OUTPUT --from-chunk N).
    #[arg(long, requires = "text", value_name = "N", default_value_t = 0)]
    pub from_chunk: u32,
    /// Write the matrix so far to the output every N chunks, so a long run that stops leaves
    /// them behind (0: only at the end).
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub output_frequency: u32,
    /// Also keep a copy of the matrix so far every N chunks, as OUTPUT.at_CHUNKS (0: none).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub save_frequency: u32,
    /// Gather the output layer's inputs too, where the model has its own (output.weight).
    #[arg(long, requires = "text")]
    pub process_output: bool,
    /// Do not score the text's perplexity (it is a check, not part of the matrix).
    #[arg(long, requires = "text")]
    pub no_ppl: bool,
    /// Read special tokens written in the text (<|im_start|>, <end_of_turn>) as those tokens,
    /// for a text of chats in the model's template; otherwise they are read as their letters.
    #[arg(long, requires = "text")]
    pub parse_special: bool,
    /// Print each tensor's statistics in the --in-file matrices (combined), as llama-imatrix's
    /// --show-statistics does, and write nothing; MODEL, if given, is checked against.
    #[arg(long, requires = "in_files", conflicts_with = "text")]
    pub show_statistics: bool,
    /// CPU threads [default: the physical cores it may use].
    #[arg(short = 't', long, value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
}

/// `backstop check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// A model that must be present (and the one the test inference uses); repeatable.
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    /// Degraded when the test inference decodes slower than this, in tokens per second.
    #[arg(long, value_name = "TPS")]
    pub min_tps: Option<f64>,
    /// Tokens the test inference generates.
    #[arg(long, default_value_t = 24)]
    pub tokens: u32,
    /// POST a Slack/Teams-compatible `{"text": ...}` message here when not healthy.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// Alert only when the state changes (recovery included), remembering it in --state.
    #[arg(long)]
    pub on_change: bool,
    /// Where --on-change keeps the last state [default: ~/.local/state/backstop/check-state.json].
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `backstop keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new key: the secret is printed once, with the `[[security.keys]]` entry (which
    /// holds only its sha256) to paste into models.toml.
    New(NewKeyArgs),
}

/// `backstop keys new`.
#[derive(Debug, Clone, Args)]
pub struct NewKeyArgs {
    /// Its name, shown in the audit log.
    #[arg(long)]
    pub name: String,
    /// `inference` (default) and/or `admin`; repeatable.
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// Models it may use (default all); repeatable.
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    /// Its requests never leave this machine.
    #[arg(long)]
    pub local_only: bool,
    /// Requests per minute.
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Prompt plus completion tokens per minute.
    #[arg(long)]
    pub tpm: Option<u32>,
}

/// `backstop config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration (file, environment, flags) as `serve` would, without
    /// serving; exit 1 with the error otherwise.
    Check(ServeArgs),
}

/// `backstop drill`.
#[derive(Debug, Clone, Args)]
pub struct DrillArgs {
    /// Requests to send while the cloud path is off.
    #[arg(long, default_value_t = 3)]
    pub requests: u32,
    /// The cloud model to ask for [default: the first one an upstream serves].
    #[arg(long)]
    pub model: Option<String>,
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Where the server is, and the key to use.
#[derive(Debug, Default, Clone, Args)]
pub struct ClientArgs {
    /// The server [default: BACKSTOP_HOST, else OLLAMA_HOST, else 127.0.0.1:11434].
    #[arg(long, alias = "url", value_name = "URL", global = true)]
    pub host: Option<String>,
    /// API key for a server that requires one [default: BACKSTOP_API_KEY].
    #[arg(long, value_name = "KEY", global = true)]
    pub api_key: Option<String>,
}

/// `backstop run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The model.
    pub model: String,
    /// A prompt: answer it and exit. Without one, chat until `/bye`.
    pub prompt: Vec<String>,
    /// How long the model stays loaded afterwards (e.g. 5m, 0, -1).
    #[arg(long, value_name = "DURATION", allow_hyphen_values = true)]
    pub keepalive: Option<String>,
    /// Print timings and tokens per second after each answer.
    #[arg(long)]
    pub verbose: bool,
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `backstop show`.
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// The model.
    pub model: String,
    /// Print the Modelfile.
    #[arg(long)]
    pub modelfile: bool,
    /// Print the parameters.
    #[arg(long)]
    pub parameters: bool,
    /// Print the chat template.
    #[arg(long)]
    pub template: bool,
    /// Print the system prompt.
    #[arg(long)]
    pub system: bool,
    /// Print the license.
    #[arg(long)]
    pub license: bool,
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `backstop pull`.
#[derive(Debug, Clone, Args)]
pub struct PullArgs {
    /// hf.co/OWNER/REPO[:QUANT], or OWNER/REPO with --file.
    pub model: String,
    /// The .gguf file in the repository.
    #[arg(long)]
    pub file: Option<String>,
    /// A commit, branch or tag of the repository [default: main].
    #[arg(long)]
    pub revision: Option<String>,
    /// The file's expected sha256; the download is refused if it differs.
    #[arg(long)]
    pub sha256: Option<String>,
    /// The store to pull into when no server is running (a running server pulls into its
    /// own) [default: $BACKSTOP_MODELS, $OLLAMA_MODELS, ~/.cache/backstop/models].
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<std::path::PathBuf>,
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `backstop rm`.
#[derive(Debug, Clone, Args)]
pub struct RmArgs {
    /// The models.
    #[arg(required = true)]
    pub models: Vec<String>,
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `backstop cp`.
#[derive(Debug, Clone, Args)]
pub struct CpArgs {
    /// The model to copy.
    pub source: String,
    /// Its new name.
    pub destination: String,
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `backstop create`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// The new model's name.
    pub model: String,
    /// The Modelfile.
    #[arg(short, long, default_value = "Modelfile")]
    pub file: PathBuf,
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// A command that takes one model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// The model.
    pub model: String,
    /// Server.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `backstop serve` options. Each is optional so that the config file can supply it.
#[derive(Debug, Default, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:11434].
    #[arg(long, env = "BACKSTOP_HOST", value_name = "ADDR:PORT")]
    pub host: Option<String>,
    /// A model to serve as NAME=PATH, or a bare PATH named after its file stem. Repeatable.
    #[arg(long = "model", short = 'm', value_name = "NAME=PATH")]
    pub models: Vec<String>,
    /// A models.toml catalogue: `[models.NAME] path = ...` plus per-model defaults.
    #[arg(long, short = 'c', env = "BACKSTOP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Parallel request slots per model [default: 4].
    #[arg(long, env = "BACKSTOP_NUM_PARALLEL", value_name = "N")]
    pub parallel: Option<u32>,
    /// Context tokens per slot (prompt plus answer) [default: 4096, at most the model's].
    #[arg(long, env = "BACKSTOP_CONTEXT_LENGTH", value_name = "N")]
    pub ctx: Option<u32>,
    /// CPU threads per model [default: the physical cores it may use].
    #[arg(long, env = "BACKSTOP_THREADS", value_name = "N")]
    pub threads: Option<u32>,
    /// CPU threads per model for reading prompts and for steps of several tokens (llama.cpp's
    /// n_threads_batch): on a CPU with two hardware threads a core, prompts may read faster
    /// on all of them, where one token a step does not [default: --threads].
    #[arg(long, env = "BACKSTOP_THREADS_BATCH", value_name = "N")]
    pub threads_batch: Option<u32>,
    /// Layers per model to offload to the GPU in a GPU build (0: none) [default: all].
    #[arg(long, env = "BACKSTOP_GPU_LAYERS", value_name = "N")]
    pub gpu_layers: Option<u32>,
    /// Requests that may wait for a slot; beyond that the answer is 503 [default: 512].
    #[arg(long, env = "BACKSTOP_MAX_QUEUE", value_name = "N")]
    pub max_queue: Option<usize>,
    /// Most tokens in one decode (llama.cpp's n_batch and n_ubatch): a prompt read while
    /// nothing else runs goes in pieces this long, and no embedding input may be longer
    /// [default: 512; raised to --parallel, and to 128 with flash attention (8 to 32
    /// without) so that reproducible answers do not depend on the cache].
    #[arg(long, env = "BACKSTOP_BATCH", value_name = "N")]
    pub batch: Option<u32>,
    /// Most prompt tokens read per step while other requests generate; fewer when the
    /// measured costs say a step would keep them waiting too long [default: 128 on a CPU, the
    /// batch for a model on a GPU].
    #[arg(long, env = "BACKSTOP_PREFILL_CHUNK", value_name = "N")]
    pub prefill_chunk: Option<u32>,
    /// Largest accepted request body in bytes; larger ones get 413 [default: 8 MiB].
    #[arg(long, env = "BACKSTOP_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Allow listening on a non-loopback address without authentication.
    #[arg(long, env = "BACKSTOP_INSECURE")]
    pub insecure: bool,
    /// How long an idle model stays loaded: `5m`, `1h`, `0` (unload at once), `-1` (never)
    /// [default: 5m; also OLLAMA_KEEP_ALIVE].
    #[arg(
        long,
        env = "BACKSTOP_KEEP_ALIVE",
        value_name = "DURATION",
        allow_hyphen_values = true
    )]
    pub keep_alive: Option<String>,
    /// Most models loaded at once; the least recently used idle one makes room
    /// [default: 3; also OLLAMA_MAX_LOADED_MODELS].
    #[arg(long, env = "BACKSTOP_MAX_LOADED_MODELS", value_name = "N")]
    pub max_loaded: Option<usize>,
    /// The model store, in Ollama's layout [default: ~/.cache/backstop/models; also OLLAMA_MODELS].
    #[arg(long, env = "BACKSTOP_MODELS", value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// Flash attention: 1/true or 0/false [default: off on a CPU; llama.cpp decides on a
    /// GPU; on for a quantized KV cache; also OLLAMA_FLASH_ATTENTION].
    #[arg(long, env = "BACKSTOP_FLASH_ATTENTION", value_name = "BOOL")]
    pub flash_attention: Option<String>,
    /// KV cache type: f16, q8_0 or q4_0 [default: f16; also OLLAMA_KV_CACHE_TYPE].
    #[arg(long, env = "BACKSTOP_KV_CACHE_TYPE", value_name = "TYPE")]
    pub kv_cache_type: Option<String>,
    /// Sliding-window layers (Gemma 2 and 3, gpt-oss, ...) cache the whole context, not only
    /// their window and one batch: more memory, and a greedy or seeded follow-up past the
    /// window reuses its conversation instead of reading it again (llama-server's --swa-full).
    #[arg(long, env = "BACKSTOP_SWA_FULL")]
    pub swa_full: bool,
    /// Read the model files into memory rather than map them (llama-server's --no-mmap):
    /// loading reads every byte first, and the weights are the process's own memory, not
    /// pages of the file the system may drop and read again. For file systems that map badly
    /// (network shares), or a model offloaded to a GPU, whose host copy is then freed.
    #[arg(long, env = "BACKSTOP_NO_MMAP")]
    pub no_mmap: bool,
    /// Lock the models' weights in RAM (llama-server's --mlock), so the system never pages
    /// them out, however much memory other programs want: no slow first tokens after a quiet
    /// night. Needs `ulimit -l` above the models' size (or CAP_IPC_LOCK); what cannot be
    /// locked is said in the log.
    #[arg(long, env = "BACKSTOP_MLOCK")]
    pub mlock: bool,
    /// Speculative decoding by prompt lookup: when an answer's last tokens occurred earlier
    /// in its context, up to N of the tokens that followed them there are checked in the same
    /// decode as the next one, so text the answer repeats (code being edited, a quoted
    /// document) comes several tokens a step. Each step drafts only as much as the step costs
    /// measured on this machine and the answer's recent hits make worth it [default: 0, off].
    #[arg(long, env = "BACKSTOP_SPECULATE", value_name = "N")]
    pub speculate: Option<u32>,
    /// Host memory for conversations the slots gave up, one limit for all loaded models:
    /// when a request takes a slot from another conversation, that one's KV cache is copied
    /// into RAM, and its next turn copies it back instead of reading its history again, so
    /// more conversations than slots each keep their cache (the oldest of any model's
    /// dropped past this size). 0 turns it off [default: 8192, as llama-server's --cache-ram,
    /// or a quarter of the memory the machine or its container has, where that is less].
    #[arg(long, env = "BACKSTOP_CACHE_RAM", value_name = "MIB")]
    pub cache_ram: Option<u32>,
    /// A folder the prompt cache outlives a restart in: a model that stops (it unloads, or the
    /// server stops) writes the conversations it keeps (its slots' and those in --cache-ram)
    /// there, and its next load or the next start reads them back, so a conversation's next turn copies its history back
    /// instead of reading it again. A file is good for the build that wrote it and the same
    /// model file and settings; they count against --cache-ram, and go once read back. One
    /// server uses a folder at a time: another given it refuses to start
    /// [default: none, nothing outlives the process].
    #[arg(long, env = "BACKSTOP_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// While every model is idle and no other program is using the cores, the answer of a
    /// greedy or seeded request is read again the way a cold read of the whole conversation
    /// reads it, a short chunk at a time, so the next
    /// turn reuses it and its first token comes as soon as a sampled one's, with the answer
    /// still the one a cold server gives: 1/true or 0/false [default: true].
    #[arg(long, env = "BACKSTOP_REREAD_ANSWERS", value_name = "BOOL")]
    pub reread_answers: Option<String>,
    /// A greedy or seeded request reuses only cache rows that a cold read computes alike, so
    /// its answer is the one a server that never saw the conversation gives; 0/false: it
    /// reuses everything it shares, the previous answer too, as a sampled request and
    /// llama.cpp's server do, so a follow-up that comes at once (an agent's) starts sooner,
    /// and its answer may differ from a cold server's where two tokens nearly tie
    /// [default: true].
    #[arg(long, env = "BACKSTOP_EXACT_REUSE", value_name = "BOOL")]
    pub exact_reuse: Option<String>,
    /// Streams at very different depths (short answers beside a long conversation) decode in
    /// two llama.cpp calls, the deep ones apart, so the short ones do not attend over the long
    /// one's cells: `auto` measures both ways while the same streams generate and keeps the
    /// faster; `on` splits wherever it would attend to a quarter fewer cells; `off` never
    /// [default: auto].
    #[arg(long, env = "BACKSTOP_DEPTH_SPLIT", value_name = "auto|on|off")]
    pub depth_split: Option<String>,
    /// Where llama.cpp's threads run on a machine of several NUMA nodes (sockets), as
    /// llama-server's --numa: `distribute` spreads them over every node, `isolate` keeps them
    /// on the node the process started on, `numactl` on the CPUs numactl gave it; drop the
    /// page cache once before the first run with one [default: off].
    #[arg(
        long,
        env = "BACKSTOP_NUMA",
        value_name = "off|distribute|isolate|numactl"
    )]
    pub numa: Option<String>,
    /// Extra browser origins allowed to call the API, comma separated [also OLLAMA_ORIGINS].
    #[arg(long, env = "BACKSTOP_ORIGINS", value_name = "ORIGINS")]
    pub origins: Option<String>,
    /// TLS certificate chain (PEM); with --tls-key, the server speaks HTTPS.
    #[arg(long, env = "BACKSTOP_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// TLS private key (PEM).
    #[arg(long, env = "BACKSTOP_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<String>,
    /// CA bundle (PEM): clients must present a certificate it signed (mTLS).
    #[arg(long, env = "BACKSTOP_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split(' ').map(String::from).collect()
    }

    #[test]
    fn bench_takes_llama_bench_long_flags_and_output_names() {
        let cli = Cli::try_parse_from(words(
            "backstop bench -o md --n-prompt 64,128 --n-gen 8 --n-depth 0,32 --repetitions 2 \
             --batch-size 256 --n-gpu-layers 0,99 --flash-attn 1 m.gguf",
        ));
        let Ok(Cli {
            command: Command::Bench(b),
            ..
        }) = cli
        else {
            panic!("{cli:?}");
        };
        assert_eq!(b.format, BenchFormat::Table);
        assert_eq!(
            (b.prompts, b.gens, b.depth),
            (vec![64, 128], vec![8], vec![0, 32])
        );
        assert_eq!((b.reps, b.batch, b.gpu_layers), (2, vec![256], vec![0, 99]));
        assert_eq!(b.flash_attention, [true]);
        for (flag, format) in [
            ("-o json", BenchFormat::Json),
            ("--output csv", BenchFormat::Csv),
            ("-o jsonl", BenchFormat::Jsonl),
        ] {
            let line = format!("backstop bench {flag} m.gguf");
            match Cli::try_parse_from(words(&line)).map(|c| c.command) {
                Ok(Command::Bench(b)) => assert_eq!(b.format, format, "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn llama_bench_flags_clap_cannot_read_are_named_on_a_bench_line_only() {
        let hints = llama_bench_hints(&words("backstop bench -ngl 99 -fa 1 -ctk q8_0 m.gguf"));
        assert_eq!(
            hints,
            [
                "llama-bench's -ngl is --gpu-layers (or --n-gpu-layers) here",
                "llama-bench's -fa is --flash-attention (or --flash-attn) here",
                "llama-bench's -ctk is --kv-cache-type, which sets the K and V caches together here",
            ]
        );
        // Each of them fails to parse, rather than meaning something else.
        for flag in [
            "-ngl 99",
            "-fa 1",
            "-ctk q8_0",
            "-ctv q8_0",
            "-ub 512",
            "-pg 512,128",
            "-m m",
        ] {
            let line = format!("backstop bench {flag} m.gguf");
            assert!(Cli::try_parse_from(words(&line)).is_err(), "{line}");
            assert_eq!(llama_bench_hints(&words(&line)).len(), 1, "{line}");
        }
        // Not on another command, and not for a model named `bench`.
        assert!(llama_bench_hints(&words("backstop run m -m")).is_empty());
        assert!(llama_bench_hints(&words("backstop run bench -m")).is_empty());
        assert!(llama_bench_hints(&words("bench serve -m x")).is_empty());
        assert_eq!(
            llama_bench_hints(&words("backstop --log-format json bench -m x")).len(),
            1
        );
        assert!(llama_bench_hints(&words("backstop bench -p 64 m.gguf")).is_empty());
    }
}
