//! backstop: one binary that serves GGUF models in-process through llama.cpp over the
//! OpenAI API, with a parallel-slot scheduler.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod models;
pub mod ops;
pub(crate) mod router;
pub mod server;

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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs a parsed command line; the returned error is printed by `main`.
pub fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    if let Command::Serve(args) = cli.command {
        let config = config::Config::load(&args)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(server::serve(config))?;
        return Ok(());
    }
    // The client verbs do one thing at a time: a single-threaded runtime is enough.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(_) => Ok(()),
            Command::Run(a) => client::run(a).await,
            Command::List(a) => client::list(a).await,
            Command::Ps(a) => client::ps(a).await,
            Command::Show(a) => client::show(a).await,
            Command::Pull(a) => client::pull(a).await,
            Command::Rm(a) => client::rm(a).await,
            Command::Cp(a) => client::cp(a).await,
            Command::Create(a) => client::create(a).await,
            Command::Stop(a) => client::stop(a).await,
        }
    })?;
    Ok(())
}
