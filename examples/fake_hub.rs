//! The test suite's fake Hugging Face hub as a process of its own, for the Python client tests
//! (CI has no internet): `fake_hub REPO=FILE=PATH...` serves each local file as FILE in REPO,
//! prints its base URL on the first line of stdout, and runs until killed.

#[path = "../tests/common/fake_hub.rs"]
mod fake_hub;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hub = fake_hub::FakeHub::start().await;
    for arg in std::env::args().skip(1) {
        let mut parts = arg.splitn(3, '=');
        let (Some(repo), Some(file), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("expected REPO=FILE=PATH, got `{arg}`").into());
        };
        hub.add(repo, file, std::fs::read(path)?);
    }
    println!("{}", hub.base);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
