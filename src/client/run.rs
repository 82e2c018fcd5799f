//! `backstop run`: one answer to a prompt, or an interactive chat that keeps its history
//! until `/bye`, streaming each answer to the terminal as it is generated.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use super::http::{Client, ClientError};
use crate::cli::RunArgs;

const HELP: &str = "Available commands:\n  /clear   forget the conversation so far\n  /bye     exit\n  /?       this help\n\nUse \"\"\" to begin and end a message of several lines.\n";

/// Runs `backstop run`.
pub async fn run(args: RunArgs) -> Result<(), ClientError> {
    let client = Client::new(&args.client);
    let keep_alive = match &args.keepalive {
        Some(k) => Some(
            crate::config::KeepAlive::parse(k)
                .map(|_| json!(k))
                .map_err(|e| ClientError::Usage(format!("--keepalive: {e}")))?,
        ),
        None => None,
    };
    // Load the model first, as Ollama does: an unknown model fails here, before any typing.
    let mut load = json!({"model": args.model});
    if let Some(k) = &keep_alive {
        load["keep_alive"] = k.clone();
    }
    client.send(Method::POST, "/api/generate", &load).await?;

    let mut prompt = args.prompt.join(" ");
    let interactive = std::io::stdin().is_terminal();
    if !interactive {
        let mut piped = String::new();
        std::io::stdin().read_to_string(&mut piped)?;
        prompt = match (prompt.is_empty(), piped.trim().is_empty()) {
            (true, _) => piped,
            (false, true) => prompt,
            (false, false) => format!("{prompt}\n\n{piped}"),
        };
    }
    if !prompt.trim().is_empty() || !interactive {
        let messages = vec![json!({"role": "user", "content": prompt})];
        answer(&client, &args, keep_alive.as_ref(), &messages).await?;
        return Ok(());
    }

    let mut history: Vec<Value> = Vec::new();
    loop {
        let Some(message) = read_message().await? else {
            break;
        };
        match message.trim() {
            "" => continue,
            "/bye" | "/exit" => break,
            "/clear" => {
                history.clear();
                println!("Cleared session context");
                continue;
            }
            "/?" | "/help" => {
                print!("{HELP}");
                continue;
            }
            cmd if cmd.starts_with('/') && !cmd.contains(' ') => {
                println!("Unknown command '{cmd}'. Type /? for help");
                continue;
            }
            _ => {}
        }
        history.push(json!({"role": "user", "content": message}));
        match answer(&client, &args, keep_alive.as_ref(), &history).await {
            Ok(reply) => history.push(json!({"role": "assistant", "content": reply})),
            Err(e) => {
                history.pop();
                eprintln!("error: {e}");
            }
        }
        println!();
    }
    Ok(())
}

/// Reads one message from the terminal: a line, or a `"""`-delimited block. `None` at the
/// end of input (Ctrl-D).
async fn read_message() -> Result<Option<String>, ClientError> {
    tokio::task::spawn_blocking(|| -> Result<Option<String>, ClientError> {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        print!(">>> ");
        std::io::stdout().flush()?;
        let Some(first) = lines.next().transpose()? else {
            println!();
            return Ok(None);
        };
        let Some(rest) = first.trim_start().strip_prefix("\"\"\"") else {
            return Ok(Some(first));
        };
        if let Some(done) = rest.strip_suffix("\"\"\"") {
            return Ok(Some(done.to_owned()));
        }
        let mut text = rest.to_owned();
        loop {
            print!("... ");
            std::io::stdout().flush()?;
            let Some(line) = lines.next().transpose()? else {
                return Ok(Some(text));
            };
            if let Some(last) = line.strip_suffix("\"\"\"") {
                text.push('\n');
                text.push_str(last);
                return Ok(Some(text));
            }
            text.push('\n');
            text.push_str(&line);
        }
    })
    .await
    .map_err(|e| ClientError::Protocol(e.to_string()))?
}

/// Streams one answer to stdout and returns its text.
async fn answer(
    client: &Client,
    args: &RunArgs,
    keep_alive: Option<&Value>,
    messages: &[Value],
) -> Result<String, ClientError> {
    let mut body = json!({"model": args.model, "messages": messages, "stream": true});
    if let Some(k) = keep_alive {
        body["keep_alive"] = k.clone();
    }
    let mut reply = String::new();
    let mut last = Value::Null;
    let mut out = std::io::stdout();
    client
        .stream("/api/chat", &body, |v| {
            if let Some(piece) = v["message"]["content"].as_str() {
                reply.push_str(piece);
                print!("{piece}");
                out.flush()?;
            }
            if v["done"].as_bool() == Some(true) {
                last = v;
            }
            Ok(())
        })
        .await?;
    println!();
    if args.verbose {
        eprint!("{}", stats(&last));
    }
    Ok(reply)
}

/// Ollama's `--verbose` block: durations and rates from the final object.
fn stats(done: &Value) -> String {
    let ns = |k: &str| done[k].as_u64().unwrap_or(0);
    let count = |k: &str| done[k].as_u64().unwrap_or(0);
    let dur = |n: u64| {
        if n == 0 {
            "0s".to_owned()
        } else {
            format!("{:.6?}", Duration::from_nanos(n))
        }
    };
    let rate = |c: u64, n: u64| {
        if n == 0 {
            "n/a".to_owned()
        } else {
            format!("{:.2} tokens/s", c as f64 / (n as f64 / 1e9))
        }
    };
    format!(
        "total duration:       {}\nload duration:        {}\nprompt eval count:    {} token(s)\nprompt eval duration: {}\nprompt eval rate:     {}\neval count:           {} token(s)\neval duration:        {}\neval rate:            {}\n",
        dur(ns("total_duration")),
        dur(ns("load_duration")),
        count("prompt_eval_count"),
        dur(ns("prompt_eval_duration")),
        rate(count("prompt_eval_count"), ns("prompt_eval_duration")),
        count("eval_count"),
        dur(ns("eval_duration")),
        rate(count("eval_count"), ns("eval_duration")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_stats_report_tokens_per_second() {
        let s = stats(
            &json!({"eval_count": 50, "eval_duration": 500_000_000u64, "prompt_eval_count": 10, "prompt_eval_duration": 0}),
        );
        assert!(s.contains("eval rate:            100.00 tokens/s"), "{s}");
        assert!(s.contains("prompt eval rate:     n/a"), "{s}");
    }
}
