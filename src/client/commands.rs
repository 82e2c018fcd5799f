//! `list`, `ps`, `show`, `pull`, `rm`, `cp`, `stop`.

use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{json, Value};

use super::format::{relative, size, table};
use super::http::{Client, ClientError};
use crate::cli::{ClientArgs, CpArgs, CreateArgs, ModelArgs, PullArgs, RmArgs, ShowArgs};

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn short_digest(v: &Value) -> String {
    str_of(v, "digest").chars().take(12).collect()
}

/// `backstop list`: NAME, ID, SIZE, MODIFIED.
pub async fn list(args: ClientArgs) -> Result<(), ClientError> {
    let tags = Client::new(&args).get("/api/tags").await?;
    let now = chrono::Utc::now();
    let rows: Vec<Vec<String>> = tags["models"]
        .as_array()
        .map(|m| m.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|m| {
            vec![
                str_of(m, "name").to_owned(),
                short_digest(m),
                size(m["size"].as_u64().unwrap_or(0)),
                relative(str_of(m, "modified_at"), now),
            ]
        })
        .collect();
    print!("{}", table(&["NAME", "ID", "SIZE", "MODIFIED"], &rows));
    Ok(())
}

/// `backstop ps`: NAME, ID, SIZE, PROCESSOR, CONTEXT, UNTIL.
pub async fn ps(args: ClientArgs) -> Result<(), ClientError> {
    let ps = Client::new(&args).get("/api/ps").await?;
    let now = chrono::Utc::now();
    let rows: Vec<Vec<String>> = ps["models"]
        .as_array()
        .map(|m| m.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let total = m["size"].as_u64().unwrap_or(0);
            let vram = m["size_vram"].as_u64().unwrap_or(0);
            let processor = match (vram, total) {
                (0, _) => "100% CPU".to_owned(),
                (v, t) if v >= t => "100% GPU".to_owned(),
                (v, t) => {
                    let gpu = v * 100 / t.max(1);
                    format!("{}%/{gpu}% CPU/GPU", 100 - gpu)
                }
            };
            vec![
                str_of(m, "name").to_owned(),
                short_digest(m),
                size(total),
                processor,
                m["context_length"].as_u64().unwrap_or(0).to_string(),
                relative(str_of(m, "expires_at"), now),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"],
            &rows
        )
    );
    Ok(())
}

/// `backstop show`: a summary, or one part with a flag.
pub async fn show(args: ShowArgs) -> Result<(), ClientError> {
    let s = Client::new(&args.client)
        .send(Method::POST, "/api/show", &json!({"model": args.model}))
        .await?;
    let part = if args.modelfile {
        Some("modelfile")
    } else if args.parameters {
        Some("parameters")
    } else if args.template {
        Some("template")
    } else if args.system {
        Some("system")
    } else if args.license {
        Some("license")
    } else {
        None
    };
    if let Some(part) = part {
        println!("{}", str_of(&s, part));
        return Ok(());
    }
    let info = &s["model_info"];
    let arch = info["general.architecture"].as_str().unwrap_or("unknown");
    let num = |key: &str| info.get(format!("{arch}.{key}")).and_then(Value::as_u64);
    let mut out = String::from("  Model\n");
    let mut row = |k: &str, v: String| out.push_str(&format!("    {k:<20}{v}\n"));
    row("architecture", arch.to_owned());
    row(
        "parameters",
        str_of(&s["details"], "parameter_size").to_owned(),
    );
    if let Some(c) = num("context_length") {
        row("context length", c.to_string());
    }
    if let Some(e) = num("embedding_length") {
        row("embedding length", e.to_string());
    }
    row(
        "quantization",
        str_of(&s["details"], "quantization_level").to_owned(),
    );
    out.push_str("\n  Capabilities\n");
    for c in s["capabilities"]
        .as_array()
        .map(|c| c.as_slice())
        .unwrap_or_default()
    {
        out.push_str(&format!("    {}\n", c.as_str().unwrap_or("")));
    }
    let params = str_of(&s, "parameters");
    if !params.is_empty() {
        out.push_str("\n  Parameters\n");
        for line in params.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    if let Some(system) = s.get("system").and_then(Value::as_str) {
        out.push_str("\n  System\n");
        for line in system.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    print!("{out}");
    Ok(())
}

/// Draws pull progress: a byte bar while a blob downloads, a line per step.
struct PullView {
    bar: ProgressBar,
    current: Option<String>,
}

impl PullView {
    fn new() -> Self {
        PullView {
            bar: ProgressBar::hidden(),
            current: None,
        }
    }

    /// One progress object of Ollama's pull stream.
    fn event(&mut self, v: &Value) {
        let status = str_of(v, "status");
        let completed = v.get("completed").and_then(Value::as_u64);
        match v.get("total").and_then(Value::as_u64) {
            Some(total) => {
                if self.current.as_deref() != Some(status) {
                    self.current = Some(status.to_owned());
                    self.bar = ProgressBar::new(total);
                    self.bar.set_style(
                        ProgressStyle::with_template(
                            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    self.bar.set_message(status.to_owned());
                }
                self.bar.set_position(completed.unwrap_or(0));
            }
            None => {
                if !self.bar.is_hidden() && !self.bar.is_finished() {
                    self.bar.finish();
                }
                eprintln!("{status}");
            }
        }
    }

    fn done(&self) {
        if !self.bar.is_hidden() && !self.bar.is_finished() {
            self.bar.abandon();
        }
    }
}

/// `backstop pull`, with a progress bar. Through the running server when there is one (so it
/// serves the model at once); with no server, straight into the local store.
pub async fn pull(args: PullArgs) -> Result<(), ClientError> {
    let mut body = json!({"model": args.model, "stream": true});
    if let Some(f) = &args.file {
        body["file"] = json!(f);
    }
    if let Some(r) = &args.revision {
        body["revision"] = json!(r);
    }
    if let Some(s) = &args.sha256 {
        body["sha256"] = json!(s);
    }
    let mut view = PullView::new();
    let result = Client::new(&args.client)
        .stream("/api/pull", &body, |v| {
            view.event(&v);
            Ok(())
        })
        .await;
    view.done();
    match result {
        Err(ClientError::Unreachable { url, .. }) => {
            let dir = args
                .models_dir
                .clone()
                .unwrap_or_else(crate::config::default_store_dir);
            // The server's default GPU layers: a pulled file is probed as `serve` would load it.
            let store =
                crate::models::Store::new(dir).with_check(crate::engine::probe::store_check(None));
            eprintln!(
                "no server at {url}; pulling straight into the store at {}",
                store.root().display()
            );
            pull_direct(&args, &store).await
        }
        other => other,
    }
}

async fn pull_direct(args: &PullArgs, store: &crate::models::Store) -> Result<(), ClientError> {
    use crate::models::pull::{pull, HubConfig, PullSpec};
    let spec = match &args.file {
        Some(file) => PullSpec::from_file(
            &args.model,
            file,
            args.revision.as_deref(),
            args.sha256.as_deref(),
        ),
        None => PullSpec::from_model(&args.model),
    }
    .map_err(|e| ClientError::Usage(e.to_string()))?;
    let mut view = PullView::new();
    let result = pull(store, &spec, &HubConfig::from_env(), |e| {
        view.event(&e.to_json())
    })
    .await;
    view.done();
    result.map(|_| ()).map_err(|e| ClientError::Server {
        status: 0,
        message: e.to_string(),
    })
}

/// `backstop rm`.
pub async fn rm(args: RmArgs) -> Result<(), ClientError> {
    let client = Client::new(&args.client);
    for model in &args.models {
        client
            .send(Method::DELETE, "/api/delete", &json!({"model": model}))
            .await?;
        println!("deleted '{model}'");
    }
    Ok(())
}

/// `backstop cp`.
pub async fn cp(args: CpArgs) -> Result<(), ClientError> {
    Client::new(&args.client)
        .send(
            Method::POST,
            "/api/copy",
            &json!({"source": args.source, "destination": args.destination}),
        )
        .await?;
    println!("copied '{}' to '{}'", args.source, args.destination);
    Ok(())
}

/// `backstop stop`: unloads the model now (Ollama's `keep_alive: 0`).
pub async fn stop(args: ModelArgs) -> Result<(), ClientError> {
    let client = Client::new(&args.client);
    let running = client.get("/api/ps").await?;
    let loaded = running["models"]
        .as_array()
        .is_some_and(|m| m.iter().any(|m| same_model(str_of(m, "name"), &args.model)));
    if !loaded {
        return Err(ClientError::Usage(format!(
            "model '{}' is not running",
            args.model
        )));
    }
    client
        .send(
            Method::POST,
            "/api/generate",
            &json!({"model": args.model, "keep_alive": 0}),
        )
        .await?;
    std::io::stdout().flush()?;
    Ok(())
}

/// `name` and `name:latest` are the same model.
fn same_model(listed: &str, asked: &str) -> bool {
    let norm = |s: &str| {
        let s = s.to_ascii_lowercase();
        if s.rsplit('/').next().is_some_and(|last| last.contains(':')) {
            s
        } else {
            format!("{s}:latest")
        }
    };
    norm(listed) == norm(asked)
}

/// `backstop create NAME -f Modelfile`: a `FROM` file is uploaded as a blob (skipped when the
/// server already has it), a `FROM` model name is used as it is.
pub async fn create(args: CreateArgs) -> Result<(), ClientError> {
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", args.file.display())))?;
    let m = super::modelfile::parse(&text)
        .map_err(|e| ClientError::Usage(format!("{}: {e}", args.file.display())))?;
    let client = Client::new(&args.client);
    let mut body = json!({"model": args.model, "stream": false});
    let base = args.file.parent().unwrap_or(std::path::Path::new("."));
    let from_path = {
        let p = std::path::Path::new(&m.from);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        };
        (m.from.ends_with(".gguf") || p.is_file()).then_some(p)
    };
    match from_path {
        Some(path) => {
            let digest = tokio::task::spawn_blocking({
                let path = path.clone();
                move || crate::models::Digest::of_file(&path)
            })
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .map_err(|e| ClientError::Usage(e.to_string()))?;
            client.upload_blob(&digest.to_string(), &path).await?;
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or("model.gguf");
            body["files"] = json!({ file: digest.to_string() });
        }
        None => body["from"] = json!(m.from),
    }
    if !m.parameters.is_empty() {
        body["parameters"] = Value::Object(m.parameters);
    }
    if let Some(s) = m.system {
        body["system"] = json!(s);
    }
    if let Some(t) = m.template {
        eprintln!("note: backstop renders prompts with the GGUF's own chat template; TEMPLATE is stored for Ollama's sake only");
        body["template"] = json!(t);
    }
    client.send(Method::POST, "/api/create", &body).await?;
    println!("success");
    Ok(())
}
