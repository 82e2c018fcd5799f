use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = backstop::cli::Cli::parse();
    backstop::init_logging(cli.log_format);
    match backstop::run(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
