//! The test suite's fake cloud provider (OpenAI and Anthropic on one port) as a process of its
//! own, for the benchmark scripts: `fake_cloud [--port N] [--key K] [--chunks N]`.
//!
//! It prints its base URL (`http://127.0.0.1:PORT`; OpenAI clients add `/v1`) as the first line
//! of stdout and its control URL (another port, which never refuses) as the second, then runs
//! until killed. It answers at once unless told otherwise.
//!
//! Control: `POST {control}/_control` with a JSON object, for example
//! `{"mode": "status", "status": 503}`, `{"mode": "stall_before_first_byte", "stall_ms": 5000}`,
//! `{"mode": "stall_mid_stream", "after_chunks": 2, "stall_ms": 5000}`,
//! `{"mode": "cut_mid_stream", "after_chunks": 2}`, `{"mode": "garbage"}`, `{"mode": "refuse"}`,
//! `{"mode": "ok"}`; with or without a mode, `"chunks"`, `"chunk_delay_ms"`, `"answer_delay_ms"`,
//! `"key"` (a string, or null for none) and `"clear_log": true`. It answers the new state, as
//! `GET /_control` does; `GET /_control/log` lists the latest requests received. The provider
//! port serves `/_control` too, for everything but `refuse`.

#[path = "../tests/common/fake_cloud/mod.rs"]
mod fake_cloud;

use std::io::Write as _;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut port = 0u16;
    let mut key = None;
    let mut chunks = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--port" => port = value("--port")?.parse()?,
            "--key" => key = Some(value("--key")?),
            "--chunks" => chunks = Some(value("--chunks")?.parse()?),
            "-h" | "--help" => {
                println!("usage: fake_cloud [--port N] [--key K] [--chunks N]");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}`; see --help").into()),
        }
    }
    let cloud = fake_cloud::FakeCloud::start_on(port).await?;
    cloud.set_key(key.as_deref());
    if let Some(n) = chunks {
        cloud.set_chunks(n);
    }
    let control = cloud.serve_control().await;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", cloud.base)?;
    writeln!(out, "{control}")?;
    out.flush()?;
    drop(out);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
