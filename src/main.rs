/// mimalloc instead of glibc's malloc: a proxied request makes about 190 small allocations
/// (hyper, reqwest, axum, serde_json, the log line), and glibc's malloc and free were a
/// fifth of the router's instructions per request (callgrind); mimalloc's thread-local
/// free lists make each a few instructions. llama.cpp's own allocations (C++) are not
/// affected.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = backstop::cli::Cli::from_env();
    backstop::init_logging(cli.log_format);
    match backstop::run(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
