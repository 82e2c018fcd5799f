//! The CLI verbs against a running server, as a user types them: `BACKSTOP_HOST` (or
//! `OLLAMA_HOST`) picks the server.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::Server;

/// Runs `backstop ARGS` against `server`, feeding `stdin`.
fn cli(server: &Server, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(args)
        .env_remove("BACKSTOP_HOST")
        .env("OLLAMA_HOST", server.base.trim_start_matches("http://"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn list_ps_show_cp_rm_and_stop_manage_a_running_server() {
    let s = Server::start(&[]).await;
    let out = cli(&s, &["list"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("NAME"), "{text}");
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("smollm2:latest   b179c9523d0e   98.4 MB"),
        "{text}"
    );

    let out = cli(&s, &["show", "smollm2"], "");
    let text = stdout(&out);
    assert!(text.contains("architecture        llama"), "{text}");
    assert!(text.contains("quantization        Q4_1"), "{text}");
    let out = cli(&s, &["show", "smollm2", "--template"], "");
    assert!(stdout(&out).contains("<|im_start|>"));

    let out = cli(&s, &["cp", "smollm2", "mine"], "");
    assert_eq!(
        stdout(&out),
        "copied 'smollm2' to 'mine'\n",
        "{}",
        stderr(&out)
    );
    assert!(stdout(&cli(&s, &["ls"], "")).contains("mine:latest"));
    let out = cli(&s, &["rm", "mine"], "");
    assert_eq!(stdout(&out), "deleted 'mine'\n");
    assert!(!stdout(&cli(&s, &["list"], "")).contains("mine:latest"));

    let ps = stdout(&cli(&s, &["ps"], ""));
    assert!(
        ps.contains("smollm2:latest") && ps.contains("100% CPU") && ps.contains("minutes from now"),
        "{ps}"
    );
    let out = cli(&s, &["stop", "smollm2"], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(s.running().await.is_empty());
    let out = cli(&s, &["stop", "smollm2"], "");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not running"));
}

#[tokio::test]
async fn run_answers_a_prompt_or_piped_input() {
    let s = Server::start(&[]).await;
    // The same answer the API gives with the model's default sampling would differ run to
    // run, so compare shape here and exact text through the API tests.
    let out = cli(&s, &["run", "smollm2", "Say hello."], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).trim().is_empty());

    // Piped input is the prompt; --verbose prints Ollama's timing block with a token rate.
    let out = cli(&s, &["run", "smollm2", "--verbose"], "Say hi.");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("eval rate:"), "{}", stderr(&out));
    assert!(stderr(&out).contains("tokens/s"));
}

#[tokio::test]
async fn errors_are_clear_and_exit_non_zero() {
    let s = Server::start(&[]).await;
    let out = cli(&s, &["run", "nope", "hi"], "");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("model 'nope' not found"),
        "{}",
        stderr(&out)
    );
    let out = cli(&s, &["rm", "smollm2"], "");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("configuration"), "{}", stderr(&out));
    drop(s);
    let out = Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["list"])
        .env("BACKSTOP_HOST", "127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("could not reach backstop at http://127.0.0.1:1"),
        "{}",
        stderr(&out)
    );
}

/// The interactive session needs a terminal: `script` (util-linux, on every Debian) gives the
/// command a pseudo-terminal while the test types into it.
#[tokio::test]
async fn run_without_a_prompt_chats_on_a_terminal_until_bye() {
    let s = Server::start(&[]).await;
    let command = format!("{} run smollm2", env!("CARGO_BIN_EXE_backstop"));
    let mut child = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env_remove("BACKSTOP_HOST")
        .env("OLLAMA_HOST", s.base.trim_start_matches("http://"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Name one fruit.\n/clear\n/wat\n/bye\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.matches(">>> ").count() >= 4,
        "one prompt per message: {text}"
    );
    assert!(text.contains("Cleared session context"), "{text}");
    assert!(text.contains("Unknown command '/wat'"), "{text}");
}

#[tokio::test]
async fn create_builds_a_model_from_a_modelfile() {
    let s = Server::start(&[]).await;
    let dir = common::temp_dir("modelfile");
    // FROM a GGUF file next to the Modelfile: uploaded as a blob, then created.
    std::fs::copy(common::smollm2(), dir.join("weights.gguf")).unwrap();
    std::fs::write(
        dir.join("Modelfile"),
        "FROM ./weights.gguf\nPARAMETER temperature 0\nPARAMETER num_predict 8\nSYSTEM \"\"\"\nYou are a pirate.\n\"\"\"\n",
    )
    .unwrap();
    let out = cli(
        &s,
        &[
            "create",
            "pirate",
            "-f",
            dir.join("Modelfile").to_str().unwrap(),
        ],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, show) = s
        .post("/api/show", &serde_json::json!({"model": "pirate"}))
        .await;
    assert_eq!(show["system"], "You are a pirate.\n");
    assert!(
        show["parameters"].as_str().unwrap().contains("num_predict"),
        "{show}"
    );
    // FROM a model name: no upload, the defaults layered on top.
    std::fs::write(
        dir.join("Modelfile2"),
        "FROM pirate\nPARAMETER num_predict 3\n",
    )
    .unwrap();
    let out = cli(
        &s,
        &[
            "create",
            "short-pirate",
            "-f",
            dir.join("Modelfile2").to_str().unwrap(),
        ],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, r) = s
        .post(
            "/api/generate",
            &serde_json::json!({"model": "short-pirate", "prompt": "Hello", "stream": false}),
        )
        .await;
    assert_eq!(r["eval_count"], 3, "{r}");
    // An instruction backstop cannot honour is refused, not dropped.
    std::fs::write(dir.join("Modelfile3"), "FROM pirate\nADAPTER ./lora.gguf\n").unwrap();
    let out = cli(
        &s,
        &[
            "create",
            "x",
            "-f",
            dir.join("Modelfile3").to_str().unwrap(),
        ],
        "",
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("ADAPTER"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).ok();
}
