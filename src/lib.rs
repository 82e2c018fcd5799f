//! backstop: one binary that serves GGUF models in-process through llama.cpp over the
//! OpenAI API, with a parallel-slot scheduler.

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod models;
pub mod ops;
pub mod router;
pub mod sched;
pub mod security;
pub mod server;

use std::sync::atomic::{AtomicBool, Ordering};

use cli::{Cli, Command, LogFormat};

/// Sets up logging. `BACKSTOP_LOG` (or `RUST_LOG`) filters; llama.cpp's own chatter is
/// kept to warnings unless asked for.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("BACKSTOP_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info,llama-cpp-2=warn,tower_http=warn".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A log line that cannot be written is dropped. By default tracing-subscriber reports the
    // failure with `eprintln!`, which panics when stderr itself is what failed: a server whose
    // log pipe closed (`backstop serve | head`, a log collector restarting) would panic in
    // whichever task logged next.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs a parsed command line and returns the process exit code; the returned error is
/// printed by `main` (exit 1).
pub fn run(cli: Cli) -> Result<u8, Box<dyn std::error::Error>> {
    match &cli.command {
        Command::Keys(cli::KeysCommand::New(a)) => return new_key(a).map(|()| 0),
        Command::Bench(a) => {
            tidy_on_ctrl_c();
            return bench::run(a).map(|()| 0);
        }
        Command::ProbeCompute(a) => return Ok(engine::probe::run(&a.path, a.gpu_layers)),
        Command::Quantize(a) => {
            tidy_on_ctrl_c();
            let threads = a.threads.unwrap_or_else(config::default_threads);
            let imatrix = a
                .imatrix
                .as_deref()
                .map(|path| bench::imatrix::Imatrix::read(path).map(|m| (m, path)))
                .transpose()?;
            let ggml =
                |t: &Option<String>| t.as_deref().map(bench::quantize::ggml_type).transpose();
            let tensor_types = a
                .tensor_types
                .iter()
                .map(|spec| bench::quantize::tensor_type(spec))
                .collect::<Result<_, _>>()?;
            let options = bench::quantize::Options {
                threads,
                imatrix: imatrix.as_ref().map(|(m, path)| (m, *path)),
                output_type: ggml(&a.output_tensor_type)?,
                embedding_type: ggml(&a.token_embedding_type)?,
                leave_output: a.leave_output_tensor,
                pure: a.pure,
                tensor_types,
                overrides: a
                    .overrides
                    .iter()
                    .map(|spec| bench::quantize::override_kv(spec))
                    .collect::<Result<_, _>>()?,
                keep_split: a.keep_split,
                progress: true,
                prune: {
                    let mut layers = a.prune_layers.clone();
                    layers.sort_unstable();
                    layers.dedup();
                    layers
                },
                imatrix_include: a.include_weights.clone(),
                imatrix_exclude: a.exclude_weights.clone(),
            };
            if a.dry_run {
                // `IN TYPES`, or `IN OUT TYPES` as llama-quantize takes it (OUT unused).
                let kinds = match &a.kind {
                    Some(k) => k.clone(),
                    None => a.output.to_string_lossy().into_owned(),
                };
                print!("{}", bench::quantize::dry_run(&a.input, &kinds, &options)?);
                return Ok(0);
            }
            let kind = a.kind.as_deref().unwrap_or_default();
            let written = bench::quantize::quantize(&a.input, &a.output, kind, &options)?;
            let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
            println!("wrote {} ({})", names.join(", "), kind.to_ascii_uppercase());
            return Ok(0);
        }
        Command::Imatrix(a) => return imatrix(a),
        Command::Config(cli::ConfigCommand::Check(args)) => {
            let config = config::Config::load(args)?;
            println!(
                "configuration ok: {} model(s), {} upstream(s), {} key(s), listening on {}",
                config.models.len(),
                config.router.upstreams.len(),
                config.security.keys.len(),
                config.server.listen
            );
            return Ok(0);
        }
        _ => {}
    }
    if let Command::Serve(args) = cli.command {
        let config = config::Config::load(&args)?;
        engine::numa::choose(config.engine.numa);
        // HTTP work yields to the engines' threads, which put themselves back (src/sched.rs).
        sched::background();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .on_thread_start(sched::background)
            .build()?;
        runtime.block_on(server::serve(config))?;
        return Ok(0);
    }
    // The client verbs do one thing at a time: a single-threaded runtime is enough.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Command::Check(a) = cli.command {
        return Ok(runtime.block_on(ops::check::check(a))?);
    }
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(_)
            | Command::Keys(_)
            | Command::Config(_)
            | Command::Check(_)
            | Command::Bench(_)
            | Command::ProbeCompute(_)
            | Command::Quantize(_)
            | Command::Imatrix(_) => Ok(()),
            Command::Run(a) => client::run(a).await,
            Command::List(a) => client::list(a).await,
            Command::Ps(a) => client::ps(a).await,
            Command::Show(a) => client::show(a).await,
            Command::Pull(a) => client::pull(a).await,
            Command::Rm(a) => client::rm(a).await,
            Command::Cp(a) => client::cp(a).await,
            Command::Create(a) => client::create(a).await,
            Command::Stop(a) => client::stop(a).await,
            Command::Drill(a) => match client::drill(a).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(client::ClientError::Failed("the drill failed".into())),
                Err(e) => Err(e),
            },
        }
    })?;
    Ok(0)
}

/// `backstop imatrix`: reads a text through the model into an importance matrix, added to
/// the `--in-file` ones, or only combines those.
fn imatrix(a: &cli::ImatrixArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let start = bench::imatrix::combine(a.model.as_deref(), &a.in_files, a.chunk)?;
    if a.show_statistics {
        print!("{}", bench::imatrix::statistics_table(&start));
        return Ok(0);
    }
    let (Some(model), Some(text)) = (a.model.as_deref(), a.text.as_deref()) else {
        start.write(&a.output)?;
        let texts = if start.datasets.is_empty() {
            String::new()
        } else {
            format!(" ({})", start.datasets.join(", "))
        };
        println!(
            "wrote {}: {} weight matrices from {} chunks, combining {} files{texts}",
            a.output.display(),
            start.entries.len(),
            start.chunk_count,
            a.in_files.len(),
        );
        return Ok(0);
    };
    static STOP: AtomicBool = AtomicBool::new(false);
    on_ctrl_c(|| {
        STOP.store(true, Ordering::Relaxed);
        eprintln!("stopping after this chunk, saving what was read (Ctrl-C again to stop at once)");
    });
    let plan = bench::imatrix::Plan {
        model,
        text,
        chunk: a.chunk as usize,
        from_chunk: a.from_chunk as usize,
        chunks: a.chunks.map(|n| n as usize),
        threads: a.threads.unwrap_or_else(config::default_threads),
        start,
        process_output: a.process_output,
        perplexity: !a.no_ppl,
        parse_special: a.parse_special,
        output: &a.output,
        save_every: a.output_frequency as usize,
        keep_every: a.save_frequency as usize,
        stop: Some(&STOP),
    };
    let done = bench::imatrix::compute(&plan)?;
    let m = &done.imatrix;
    m.write(&a.output)?;
    let mut line = format!(
        "wrote {}: {} weight matrices from {} chunks of {} tokens of {}",
        a.output.display(),
        m.entries.len(),
        done.chunks,
        m.chunk_size,
        text.display()
    );
    if !a.in_files.is_empty() {
        line += &format!(
            ", added to {} ({} chunks in all)",
            a.in_files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            m.chunk_count
        );
    }
    if let Some(p) = done.perplexity {
        line += &format!(" (perplexity {p:.4})");
    }
    println!("{line}");
    if done.stopped {
        eprintln!(
            "stopped after {} chunks; to go on from there: --in-file {} --from-chunk {}",
            done.chunks,
            a.output.display(),
            a.from_chunk as usize + done.chunks
        );
        // What a shell reports for a program that stopped on SIGINT.
        return Ok(130);
    }
    Ok(0)
}

/// Runs `first` on the first Ctrl-C, and ends the process on the second as Ctrl-C would
/// have. For commands whose work runs outside any async runtime (llama.cpp's quantizer, an
/// imatrix run): a thread of its own waits for the signals.
fn on_ctrl_c(first: impl FnOnce() + Send + 'static) {
    let waiter = std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
                first();
                if tokio::signal::ctrl_c().await.is_ok() {
                    die_of_sigint();
                }
            });
        });
    if let Err(e) = waiter {
        tracing::debug!(error = %e, "Ctrl-C stops at once: no thread to wait for it");
    }
}

/// On Ctrl-C, removes the files a quantizer is writing, then ends the process as Ctrl-C
/// would have: a half-written model, hidden and as large as a model, is never left behind.
fn tidy_on_ctrl_c() {
    on_ctrl_c(|| {
        bench::quantize::remove_unfinished();
        die_of_sigint();
    });
}

/// Ends the process as an unhandled Ctrl-C does (killed by SIGINT, which a shell shows as
/// 130), without running exit handlers: llama.cpp's static destructors must not run while its
/// threads are still at work.
fn die_of_sigint() -> ! {
    #[cfg(target_os = "linux")]
    // SAFETY: setting a signal's default action and raising it take no pointers.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::raise(libc::SIGINT);
    }
    std::process::exit(130)
}

/// `backstop keys new`: a fresh secret, printed once, and its `[[security.keys]]` entry.
fn new_key(a: &cli::NewKeyArgs) -> Result<(), Box<dyn std::error::Error>> {
    for s in &a.scopes {
        if s != "inference" && s != "admin" {
            return Err(format!("--scope `{s}` is not one of inference, admin").into());
        }
    }
    for m in &a.models {
        models::ModelName::parse(m)?;
    }
    let secret = security::keys::new_secret()?;
    let scopes = if a.scopes.is_empty() {
        vec!["inference".to_owned()]
    } else {
        a.scopes.clone()
    };
    let quote = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("Secret for key {:?} (shown only now; give it to the client, keep it out of files you share):\n\n  {secret}\n", a.name);
    println!(
        "Add this to the [security] part of models.toml (only the secret's sha256 is stored):\n"
    );
    println!("[[security.keys]]");
    println!("name = {:?}", a.name);
    println!("sha256 = {:?}", security::keys::digest_of(&secret));
    println!("scopes = [{}]", quote(&scopes));
    if !a.models.is_empty() {
        println!("models = [{}]", quote(&a.models));
    }
    if a.local_only {
        println!("local_only = true");
    }
    if let Some(n) = a.rpm {
        println!("rpm = {n}");
    }
    if let Some(n) = a.tpm {
        println!("tpm = {n}");
    }
    Ok(())
}
