//! Pulling GGUF files from a (fake, in-process) Hugging Face hub into the store: what lands in
//! the store, what never does, resuming, offline mode and refusals.

mod common;

use std::path::{Path, PathBuf};

use backstop::models::pull::{pull, HubConfig, PullError, PullEvent, PullSpec};
use backstop::models::{Digest, Store, StoredModel};
use common::fake_hub::{tiny_gguf, FakeHub};
use serde_json::json;

/// Small chunks, so a few hundred kilobytes are enough to resume mid-file.
const CHUNK: usize = 64 * 1024;

fn hub(fake: &FakeHub) -> HubConfig {
    HubConfig {
        endpoint: fake.base.clone(),
        chunk_size: CHUNK,
        registry: fake.base.clone(),
        ..HubConfig::default()
    }
}

/// The layers of a small Ollama model: weights, template, params, system prompt.
fn ollama_layers(weights: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("application/vnd.ollama.image.model", weights.to_vec()),
        (
            "application/vnd.ollama.image.template",
            b"{{ .Prompt }}".to_vec(),
        ),
        (
            "application/vnd.ollama.image.params",
            br#"{"temperature":0.2,"stop":["<end>"]}"#.to_vec(),
        ),
        ("application/vnd.ollama.image.system", b"Be brief.".to_vec()),
    ]
}

fn publish(fake: &FakeHub, name: &str, tag: &str, layers: &[(&'static str, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&str, &[u8])> = layers.iter().map(|(m, b)| (*m, b.as_slice())).collect();
    fake.add_ollama_model(name, tag, &refs)
}

/// An empty store in a fresh folder, removed when dropped.
struct TempStore {
    store: Store,
}

impl TempStore {
    fn new() -> TempStore {
        TempStore {
            store: Store::new(common::temp_dir("pull")),
        }
    }

    fn root(&self) -> &Path {
        self.store.root()
    }

    /// Every file under `dir` (relative to the store), folders not counted.
    fn files_under(&self, dir: &str) -> Vec<String> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if e.file_type().unwrap().is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root().join(dir), &mut out);
        let mut names: Vec<String> = out
            .iter()
            .map(|p| p.strip_prefix(self.root()).unwrap().display().to_string())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        std::fs::remove_dir_all(self.root()).ok();
    }
}

/// Runs a pull, collecting its events.
async fn pull_events(
    store: &Store,
    spec: &PullSpec,
    hub: &HubConfig,
) -> (Result<StoredModel, PullError>, Vec<PullEvent>) {
    let mut events = Vec::new();
    let result = pull(store, spec, hub, |e| events.push(e)).await;
    (result, events)
}

/// What an interrupted hub pull left: its resumable partial file, nothing under a final name,
/// no model. The files under `blobs/`.
fn interrupted_left(tmp: &TempStore) -> Vec<String> {
    let partial = tmp.files_under("blobs");
    assert!(
        partial.iter().any(|f| f.ends_with(".sync.part")),
        "the partial download is kept: {partial:?}"
    );
    assert!(
        !partial.iter().any(|f| f.starts_with("blobs/sha256-")),
        "nothing under a final name: {partial:?}"
    );
    assert!(tmp.store.list().is_empty());
    partial
}

/// The steps a pull went through: each status, and each step with progress once.
fn statuses(events: &[PullEvent]) -> Vec<&str> {
    let mut steps: Vec<&str> = Vec::new();
    for e in events {
        match e {
            PullEvent::Status(s) => steps.push(s),
            PullEvent::Step { status, .. } if steps.last() != Some(&status.as_str()) => {
                steps.push(status)
            }
            PullEvent::Step { .. } | PullEvent::Progress { .. } => {}
        }
    }
    steps
}

#[tokio::test]
async fn pulling_a_quant_from_the_hub_puts_a_verified_model_in_the_store() {
    let fake = FakeHub::start().await;
    let repo = "test-org/SmolLM2-135M-Instruct-GGUF";
    let real = std::fs::read(common::smollm2()).unwrap();
    let size = real.len() as u64;
    let sha = fake.add(repo, "SmolLM2-135M-Instruct.Q4_1.gguf", real);
    fake.add(repo, "SmolLM2-135M-Instruct.Q8_0.gguf", tiny_gguf(1000));
    fake.add_plain(repo, "README.md", "# SmolLM2");
    let tmp = TempStore::new();
    let spec = PullSpec::from_model(&format!("hf.co/{repo}:q4_1")).unwrap();
    let config = HubConfig {
        endpoint: fake.base.clone(),
        ..HubConfig::default()
    };

    // On a task of its own, as the API handler will run it.
    let (store, s, c) = (tmp.store.clone(), spec.clone(), config.clone());
    let (model, events) = tokio::spawn(async move {
        let mut events = Vec::new();
        let model = pull(&store, &s, &c, |e| events.push(e)).await;
        (model, events)
    })
    .await
    .unwrap();
    let model = model.unwrap();

    assert_eq!(
        model.name.to_string(),
        format!("hf.co/{repo}:q4_1"),
        "stored under the name it was pulled by"
    );
    assert_eq!(model.model_digest.hex(), sha);
    assert_eq!(
        model.model_digest,
        Digest::of_file(&common::smollm2()).unwrap()
    );
    assert_eq!(
        model.model_path,
        tmp.root().join(format!("blobs/sha256-{sha}"))
    );
    assert_eq!(model.size, size);
    assert_eq!(
        statuses(&events),
        [
            "pulling manifest",
            "verifying sha256 digest",
            "writing manifest",
            "success"
        ]
    );
    let last = events
        .iter()
        .rev()
        .find(|e| matches!(e, PullEvent::Progress { .. }));
    assert_eq!(
        last,
        Some(&PullEvent::Progress {
            digest: format!("sha256:{sha}"),
            total: size,
            completed: size,
        })
    );
    assert_eq!(
        fake.body_bytes(),
        size + 2,
        "the file once, plus two 1-byte metadata probes (ours and hf-hub's)"
    );
    // Only the weights, the config blob and the manifest: no partial files, no hf-hub cache.
    let blobs = tmp.files_under("blobs");
    assert_eq!(blobs.len(), 2, "{blobs:?}");
    assert!(blobs.contains(&format!("blobs/sha256-{sha}")), "{blobs:?}");
    assert_eq!(
        tmp.files_under("manifests"),
        ["manifests/hf.co/test-org/SmolLM2-135M-Instruct-GGUF/q4_1"]
    );

    // The store entry is a model the server loads and answers with.
    let store_dir = tmp.root().display().to_string();
    let server = common::Server::start_raw(&["--models-dir", &store_dir]).await;
    let reply = server
        .chat(json!({
            "model": format!("hf.co/{repo}:Q4_1"),
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4,
        }))
        .await;
    assert!(!common::answer(&reply).is_empty(), "{reply}");
}

#[tokio::test]
async fn a_corrupted_download_is_rejected_and_leaves_nothing_behind() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "m-Q4_K_M.gguf", tiny_gguf(300_000));
    fake.corrupt(true);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("hf.co/o/r").unwrap();

    let (result, events) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let err = result.unwrap_err();
    assert!(matches!(err, PullError::Sha256Mismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("sha256 mismatch"), "{err}");
    assert!(statuses(&events).contains(&"verifying sha256 digest"));
    assert!(!statuses(&events).contains(&"success"));
    assert_eq!(tmp.files_under("blobs"), Vec::<String>::new());
    assert_eq!(tmp.files_under("manifests"), Vec::<String>::new());
    assert!(tmp.store.list().is_empty());
}

#[tokio::test]
async fn an_interrupted_download_resumes() {
    let fake = FakeHub::start().await;
    let bytes = tiny_gguf(512 * 1024);
    let len = bytes.len() as u64;
    let sha = fake.add("o/r", "m-Q4_K_M.gguf", bytes);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("hf.co/o/r:Q4_K_M").unwrap();
    fake.drop_after(200_000);

    let (first, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let err = first.unwrap_err();
    assert!(matches!(err, PullError::Interrupted { .. }), "{err:?}");
    assert!(err.to_string().contains("resume"), "{err}");
    fake.wait_quiet().await;
    interrupted_left(&tmp);

    fake.heal();
    fake.reset_counters();
    let (second, events) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let model = second.unwrap();
    assert_eq!(model.model_digest.hex(), sha);
    let resent = fake.body_bytes();
    // Three whole chunks arrived before the cut; only the rest is sent again.
    assert!(
        resent <= len - 3 * CHUNK as u64 + 2,
        "{resent} of {len} bytes were sent again"
    );
    let first_progress = events.iter().find_map(|e| match e {
        PullEvent::Progress { completed, .. } => Some(*completed),
        PullEvent::Status(_) | PullEvent::Step { .. } => None,
    });
    assert!(
        first_progress.is_some_and(|c| c >= 3 * CHUNK as u64),
        "progress starts at the resumed offset: {first_progress:?}"
    );
    assert_eq!(
        tmp.files_under("blobs").len(),
        2,
        "no partial files left: {:?}",
        tmp.files_under("blobs")
    );
}

#[tokio::test]
async fn a_missing_quant_names_the_files_that_exist() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "model-Q8_0.gguf", tiny_gguf(10));
    fake.add("o/r", "model-Q4_K.gguf", tiny_gguf(20));
    fake.add_plain("o/r", "README.md", "readme");
    let tmp = TempStore::new();

    for (model, quant) in [("hf.co/o/r:Q2_K", "Q2_K"), ("hf.co/o/r", "Q4_K_M")] {
        let spec = PullSpec::from_model(model).unwrap();
        let (result, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;
        let err = result.unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, PullError::QuantNotFound { .. }),
            "{model}: {err:?}"
        );
        assert!(text.contains(quant), "{text}");
        assert!(text.contains("model-Q8_0.gguf"), "{text}");
        assert!(text.contains("model-Q4_K.gguf"), "{text}");
        assert!(!text.contains("README.md"), "{text}");
    }
    assert!(
        fake.paths().iter().all(|p| p.starts_with("/api/")),
        "nothing was downloaded: {:?}",
        fake.paths()
    );
    assert_eq!(tmp.files_under("blobs"), Vec::<String>::new());
}

#[tokio::test]
async fn a_missing_file_names_the_files_that_exist() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "model-Q8_0.gguf", tiny_gguf(10));
    let tmp = TempStore::new();
    let spec = PullSpec::from_file("o/r", "model-Q4_0.gguf", None, None).unwrap();

    let (result, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let err = result.unwrap_err();
    assert!(matches!(err, PullError::FileNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("model-Q8_0.gguf"), "{err}");
}

#[tokio::test]
async fn a_missing_repository_or_revision_is_reported_as_not_found() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "model-Q8_0.gguf", tiny_gguf(10));
    let tmp = TempStore::new();

    for spec in [
        PullSpec::from_model("hf.co/o/nope:Q8_0").unwrap(),
        PullSpec::from_file("o/r", "model-Q8_0.gguf", Some("v9"), None).unwrap(),
    ] {
        let (result, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;
        let err = result.unwrap_err();
        assert!(matches!(err, PullError::RepoNotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("HF_TOKEN"), "{err}");
    }
}

#[tokio::test]
async fn offline_mode_never_touches_the_network() {
    let fake = FakeHub::start().await;
    let bytes = tiny_gguf(50_000);
    let sha = fake.add("o/r", "m-Q8_0.gguf", bytes);
    let tmp = TempStore::new();
    let offline = HubConfig {
        offline: true,
        ..hub(&fake)
    };
    let by_name = PullSpec::from_model("hf.co/o/r:Q8_0").unwrap();
    let pinned = PullSpec::from_file("o/r", "m-Q8_0.gguf", None, Some(&sha)).unwrap();

    // Nothing in the store: a clear error, and not one request.
    for spec in [&by_name, &pinned] {
        let (result, _) = pull_events(&tmp.store, spec, &offline).await;
        let err = result.unwrap_err();
        assert!(matches!(err, PullError::Offline { .. }), "{err:?}");
        assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    }
    assert_eq!(fake.requests(), 0);

    // Once pulled (online), both succeed offline from the store alone.
    pull_events(&tmp.store, &by_name, &hub(&fake))
        .await
        .0
        .unwrap();
    fake.reset_counters();
    for spec in [&by_name, &pinned] {
        let (result, events) = pull_events(&tmp.store, spec, &offline).await;
        let model = result.unwrap();
        assert_eq!(model.model_digest.hex(), sha);
        assert_eq!(statuses(&events).last(), Some(&"success"));
    }
    assert_eq!(fake.requests(), 0);
}

#[tokio::test]
async fn a_pinned_sha256_that_does_not_match_is_refused() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "lfs-Q8_0.gguf", tiny_gguf(40_000));
    fake.add_plain("o/r", "plain-Q4_0.gguf", tiny_gguf(30_000));
    let tmp = TempStore::new();
    let wrong = Digest::of(b"something else").hex().to_owned();

    // Against the hub's LFS digest: refused before a byte is downloaded.
    let spec = PullSpec::from_file("o/r", "lfs-Q8_0.gguf", None, Some(&wrong)).unwrap();
    let (result, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;
    let err = result.unwrap_err();
    assert!(matches!(err, PullError::Sha256Mismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(&wrong), "{err}");
    assert_eq!(fake.body_bytes(), 0);

    // A file the hub has no digest for: downloaded, hashed, refused, removed.
    let spec = PullSpec::from_file("o/r", "plain-Q4_0.gguf", None, Some(&wrong)).unwrap();
    let (result, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;
    let err = result.unwrap_err();
    assert!(matches!(err, PullError::Sha256Mismatch { .. }), "{err:?}");
    assert!(fake.body_bytes() > 0);

    assert_eq!(tmp.files_under("blobs"), Vec::<String>::new());
    assert_eq!(tmp.files_under("manifests"), Vec::<String>::new());
}

#[tokio::test]
async fn a_hub_etag_that_does_not_match_the_bytes_is_refused() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "m-Q8_0.gguf", tiny_gguf(40_000));
    fake.wrong_etag(true);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("hf.co/o/r:Q8_0").unwrap();

    let (result, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let err = result.unwrap_err();
    assert!(matches!(err, PullError::Sha256Mismatch { .. }), "{err:?}");
    assert!(fake.body_bytes() <= 1, "refused before the download");
    assert_eq!(tmp.files_under("blobs"), Vec::<String>::new());
    assert_eq!(tmp.files_under("manifests"), Vec::<String>::new());
}

#[tokio::test]
async fn a_hub_etag_that_is_a_path_is_refused_before_anything_is_written() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "m-Q8_0.gguf", tiny_gguf(40_000));
    fake.etag_text("../../../../escaped");
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("hf.co/o/r:Q8_0").unwrap();

    let (result, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let err = result.unwrap_err();
    assert!(matches!(err, PullError::Network { .. }), "{err:?}");
    assert!(err.to_string().contains("not a hash"), "{err}");
    assert_eq!(fake.body_bytes(), 1, "only the metadata probe");
    assert_eq!(tmp.files_under(""), Vec::<String>::new());
    assert!(!tmp.root().parent().unwrap().join("escaped").exists());
}

#[tokio::test]
async fn a_file_without_any_digest_is_accepted_under_its_computed_digest() {
    let fake = FakeHub::start().await;
    let sha = fake.add_plain("o/r", "weights.gguf", tiny_gguf(20_000));
    let tmp = TempStore::new();
    let spec = PullSpec::from_file("o/r", "weights.gguf", None, None).unwrap();

    let (result, events) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let model = result.unwrap();
    assert_eq!(model.model_digest.hex(), sha);
    assert_eq!(model.name.to_string(), "hf.co/o/r:weights");
    assert!(events
        .iter()
        .any(|e| matches!(e, PullEvent::Progress { digest, .. } if digest == "sha256:pending")));
}

#[tokio::test]
async fn a_model_already_in_the_store_is_not_downloaded_again() {
    let fake = FakeHub::start().await;
    let bytes = tiny_gguf(100_000);
    let size = bytes.len() as u64;
    let sha = fake.add("o/r", "m-Q4_K_M.gguf", bytes);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("hf.co/o/r").unwrap();
    pull_events(&tmp.store, &spec, &hub(&fake)).await.0.unwrap();
    fake.reset_counters();

    let (result, events) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    assert_eq!(result.unwrap().model_digest.hex(), sha);
    assert_eq!(fake.body_bytes(), 0);
    assert!(events.contains(&PullEvent::Progress {
        digest: format!("sha256:{sha}"),
        total: size,
        completed: size,
    }));

    // With the digest pinned, the hub is not even asked.
    fake.reset_counters();
    let pinned = PullSpec::from_file("o/r", "m-Q4_K_M.gguf", None, Some(&sha)).unwrap();
    pull_events(&tmp.store, &pinned, &hub(&fake))
        .await
        .0
        .unwrap();
    assert_eq!(fake.requests(), 0);
}

/// A model split into several files is pulled part by part, each verified, and joined into one
/// blob, since the store keeps a model in one file as Ollama's does: tensor for tensor the
/// model in one file, answering the same. Pulled again, nothing is downloaded; a pin is the
/// joined file's digest; a repository that lacks a part is refused before any download.
#[tokio::test]
async fn a_split_model_is_pulled_part_by_part_and_joined_into_one_blob() {
    let fake = FakeHub::start().await;
    let repo = "test-org/SmolLM2-split-GGUF";
    let smol = common::smollm2();
    let parts = common::split_gguf(&smol, "SmolLM2-Q4_1", 3);
    let mut total = 0;
    for p in &parts {
        let bytes = std::fs::read(p).unwrap();
        total += bytes.len() as u64;
        let name = p.file_name().unwrap().to_str().unwrap();
        fake.add(repo, &format!("Q4_1/{name}"), bytes);
    }
    fake.add(repo, "SmolLM2-Q8_0.gguf", tiny_gguf(1000));
    let tmp = TempStore::new();
    let spec = PullSpec::from_model(&format!("hf.co/{repo}:Q4_1")).unwrap();
    // What a join cut short by a crash left, named as a join names it (no process has an id
    // past 4194304): the file it was writing and its folder of links to the parts. Removed.
    let writing =
        backstop::bench::quantize::writing(&tmp.store.partial_path("joined_0123").unwrap());
    let name = writing.file_name().unwrap().to_str().unwrap();
    let own = format!(".partial-{}", std::process::id());
    let half = writing.with_file_name(name.replace(&own, ".partial-99999999"));
    std::fs::write(&half, b"half a model").unwrap();
    // Both untouched long enough to be taken for abandoned (what another container's server
    // writes has a process id not seen here, and is fresh).
    let then = std::time::SystemTime::now() - backstop::models::store::ABANDONED * 2;
    let links = tmp.store.partial_path("parts_99999999_0123").unwrap();
    std::fs::create_dir_all(&links).unwrap();
    std::os::unix::fs::symlink(&parts[0], links.join("SmolLM2-Q4_1-00001-of-00003.gguf")).unwrap();
    for left in [&half, &links] {
        std::fs::File::open(left)
            .and_then(|f| f.set_modified(then))
            .unwrap();
    }

    let (model, events) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let model = model.unwrap();
    assert_eq!(
        statuses(&events),
        [
            "pulling manifest",
            "verifying sha256 digest",
            "verifying sha256 digest",
            "verifying sha256 digest",
            "joining 3 parts into one file",
            "verifying sha256 digest",
            "writing manifest",
            "success"
        ]
    );
    // The join says how far it has got, from nothing to every byte of the parts.
    let joining: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            PullEvent::Step {
                total, completed, ..
            } => Some((*completed, *total)),
            _ => None,
        })
        .collect();
    assert_eq!(joining.first(), Some(&(0, total)), "{joining:?}");
    assert_eq!(joining.last(), Some(&(total, total)), "{joining:?}");
    assert!(joining.windows(2).all(|w| w[0].0 <= w[1].0), "{joining:?}");
    assert_eq!(
        fake.body_bytes(),
        total + 6,
        "each part once, plus two 1-byte probes each"
    );
    let joined = backstop::models::gguf::read(&model.model_path).unwrap();
    let whole = backstop::models::gguf::read(&smol).unwrap();
    assert!(joined.parts.is_empty() && joined.uint("split.count").is_none());
    assert_eq!(joined.tensor_count, whole.tensor_count);
    assert!(common::tensor_bytes(&model.model_path) == common::tensor_bytes(&smol));
    assert!(
        !half.exists() && !links.exists(),
        "the crashed join's leftovers"
    );
    assert!(
        parts[0].exists(),
        "a link's removal leaves what it points to"
    );
    // The joined model, its config and the record of the parts: no parts, no hf-hub cache.
    let blobs = tmp.files_under("blobs");
    assert_eq!(blobs.len(), 3, "{blobs:?}");
    assert!(blobs.contains(&format!("blobs/sha256-{}", model.model_digest.hex())));
    assert!(
        blobs.iter().any(|b| b.starts_with("blobs/.joined/")),
        "{blobs:?}"
    );

    // Again: found by its parts' digests, nothing downloaded.
    fake.reset_counters();
    let (again, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;
    assert_eq!(again.unwrap().model_digest, model.model_digest);
    assert_eq!(fake.body_bytes(), 0);
    // A pin is the joined digest: the hub is not asked; another is refused.
    let pin = model.model_digest.hex().to_owned();
    let first = "Q4_1/SmolLM2-Q4_1-00001-of-00003.gguf";
    fake.reset_counters();
    let pinned = PullSpec::from_file(repo, first, None, Some(&pin)).unwrap();
    pull_events(&tmp.store, &pinned, &hub(&fake))
        .await
        .0
        .unwrap();
    assert_eq!(fake.requests(), 0);
    let wrong = "0".repeat(64);
    let pinned = PullSpec::from_file(repo, first, None, Some(&wrong)).unwrap();
    let err = pull_events(&tmp.store, &pinned, &hub(&fake))
        .await
        .0
        .unwrap_err();
    assert!(matches!(err, PullError::Sha256Mismatch { .. }), "{err:?}");

    // The store's model answers as the file it was split from.
    let store_dir = tmp.root().display().to_string();
    let whole_model = format!("whole={}", smol.display());
    let server =
        common::Server::start_raw(&["--models-dir", &store_dir, "--model", &whole_model]).await;
    let ask = |model: String| {
        json!({"model": model, "max_tokens": 16, "temperature": 0,
               "messages": [{"role": "user", "content": "Say hi."}]})
    };
    let pulled = server.chat(ask(format!("hf.co/{repo}:Q4_1"))).await;
    let original = server.chat(ask("whole".into())).await;
    assert_eq!(pulled["usage"]["completion_tokens"], 16, "{pulled}");
    assert_eq!(common::answer(&pulled), common::answer(&original));
    drop(server);

    // A repository without one of the parts: refused, naming it, before any download.
    let other = "test-org/incomplete";
    for p in [&parts[0], &parts[2]] {
        let name = p.file_name().unwrap().to_str().unwrap();
        fake.add(other, name, std::fs::read(p).unwrap());
    }
    fake.reset_counters();
    let spec = PullSpec::from_model(&format!("hf.co/{other}:Q4_1")).unwrap();
    let err = pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();
    assert!(
        matches!(err, PullError::SplitGguf { count: 3, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("SmolLM2-Q4_1-00002-of-00003.gguf"),
        "{err}"
    );
    assert_eq!(fake.body_bytes(), 0);
}

/// Publishes SmolLM2 split in 3 as `o/r`'s `m-Q4_1-0000k-of-00003.gguf`; returns each part's
/// sha256 and size.
fn publish_split(fake: &FakeHub) -> (Vec<String>, Vec<u64>) {
    let parts = common::split_gguf(&common::smollm2(), "m-Q4_1", 3);
    parts
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).unwrap();
            let size = bytes.len() as u64;
            let name = p.file_name().unwrap().to_str().unwrap();
            (fake.add("o/r", name, bytes), size)
        })
        .unzip()
}

/// A split pull cut in the middle of a part keeps the parts it finished and resumes that part
/// where it stopped, and leaves nothing under a final name meanwhile.
#[tokio::test]
async fn an_interrupted_split_pull_resumes_the_part_it_was_in() {
    let fake = FakeHub::start().await;
    let (shas, sizes) = publish_split(&fake);
    let total: u64 = sizes.iter().sum();
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("hf.co/o/r:Q4_1").unwrap();
    // Each file's two 1-byte probes, the first part, half the second.
    fake.drop_after(2 + sizes[0] + 2 + sizes[1] / 2);

    let err = pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();

    assert!(matches!(err, PullError::Interrupted { .. }), "{err:?}");
    assert!(
        err.to_string().contains("m-Q4_1-00002-of-00003.gguf"),
        "{err}"
    );
    fake.wait_quiet().await;
    let partial = interrupted_left(&tmp);
    assert!(
        partial
            .iter()
            .any(|f| f.ends_with(&format!("/blobs/{}", shas[0]))),
        "the finished first part is kept: {partial:?}"
    );

    fake.heal();
    fake.reset_counters();
    let (model, events) = pull_events(&tmp.store, &spec, &hub(&fake)).await;
    let model = model.unwrap();
    let resent = fake.body_bytes();
    assert!(
        resent <= total - sizes[0] - sizes[1] / 2 + 4 * CHUNK as u64,
        "{resent} of {total} bytes were sent again"
    );
    assert!(statuses(&events)
        .contains(&"verifying sha256 digest of m-Q4_1-00001-of-00003.gguf, downloaded before"));
    assert!(common::tensor_bytes(&model.model_path) == common::tensor_bytes(&common::smollm2()));
    let blobs = tmp.files_under("blobs");
    assert_eq!(blobs.len(), 3, "no partial files left: {blobs:?}");
}

/// A part kept from an interrupted pull that no longer hashes to what the hub lists (the disk
/// changed it) is downloaded again, not joined; a part the hub serves wrong ends the pull and
/// takes the kept parts with it.
#[tokio::test]
async fn a_kept_part_is_checked_again_and_a_bad_one_downloaded_again() {
    let fake = FakeHub::start().await;
    let (shas, sizes) = publish_split(&fake);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("hf.co/o/r:Q4_1").unwrap();
    fake.drop_after(2 + sizes[0] + 2 + sizes[1] / 2);
    pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();
    fake.wait_quiet().await;
    let kept = tmp
        .files_under("blobs")
        .into_iter()
        .find(|f| f.ends_with(&shas[0]))
        .expect("the first part is kept");
    let kept = tmp.root().join(kept);
    let mut bytes = std::fs::read(&kept).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&kept, bytes).unwrap();

    fake.heal();
    fake.reset_counters();
    let model = pull_events(&tmp.store, &spec, &hub(&fake)).await.0.unwrap();
    assert!(fake.body_bytes() >= sizes[0], "the first part came again");
    assert!(common::tensor_bytes(&model.model_path) == common::tensor_bytes(&common::smollm2()));

    // Cut in the third part, then the hub serves the third part corrupted: nothing is left.
    let tmp = TempStore::new();
    fake.drop_after(2 + sizes[0] + 2 + sizes[1] + 2 + sizes[2] / 2);
    pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();
    fake.wait_quiet().await;
    fake.heal();
    fake.corrupt(true);
    let err = pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();
    assert!(matches!(err, PullError::Sha256Mismatch { .. }), "{err:?}");
    assert_eq!(tmp.files_under("blobs"), Vec::<String>::new());
}

/// 1 EB: more than any disk the tests run on.
const HUGE: u64 = 1_000_000_000_000_000_000;

/// A listing without sizes (a mirror that ignores `blobs=true`) does not skip the room check:
/// the size comes from the hub's answer to the probe hf-hub makes before downloading. With the
/// file's true size there, the same pull goes through.
#[tokio::test]
async fn a_file_the_listing_gives_no_size_for_is_still_checked_for_room() {
    let fake = FakeHub::start().await;
    let bytes = tiny_gguf(1000);
    let digest = fake.add("o/one", "m-Q4_K_M.gguf", bytes.clone());
    fake.unlist_sizes();
    fake.claim_size(HUGE);
    let tmp = TempStore::new();

    let spec = PullSpec::from_model("hf.co/o/one").unwrap();
    let err = pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();
    assert!(
        matches!(err, PullError::NoSpace { needed, .. } if needed == HUGE),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("downloading m-Q4_K_M.gguf needs 1000000 TB free in"),
        "{err}"
    );
    assert!(
        fake.body_bytes() <= 1,
        "only the probe: {} bytes",
        fake.body_bytes()
    );

    fake.heal();
    fake.unlist_sizes();
    let (result, events) = pull_events(&tmp.store, &spec, &hub(&fake)).await;
    let model = result.unwrap();
    assert_eq!(model.size, bytes.len() as u64);
    assert_eq!(model.model_digest.hex(), digest);
    let last = events.iter().rev().find_map(|e| match e {
        PullEvent::Progress {
            total, completed, ..
        } => Some((*total, *completed)),
        _ => None,
    });
    assert_eq!(
        last,
        Some((bytes.len() as u64, bytes.len() as u64)),
        "the progress is sized by the probe"
    );
}

/// A model the store's disk cannot hold is refused before a byte of it is downloaded, saying
/// how much room it needs; a split model needs room for its parts and for the file they are
/// joined into.
#[tokio::test]
async fn a_model_the_disk_has_no_room_for_is_refused_before_downloading() {
    let fake = FakeHub::start().await;
    publish_split(&fake);
    fake.add("o/one", "m-Q4_K_M.gguf", tiny_gguf(1000));
    fake.list_size(HUGE);
    let tmp = TempStore::new();

    let spec = PullSpec::from_model("hf.co/o/one").unwrap();
    let err = pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();
    let PullError::NoSpace { needed, free, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*needed, HUGE);
    assert!(*free > 0 && *free < HUGE, "{free}");
    let text = err.to_string();
    assert!(
        text.starts_with("downloading m-Q4_K_M.gguf needs 1000000 TB free in"),
        "{text}"
    );

    let spec = PullSpec::from_model("hf.co/o/r:Q4_1").unwrap();
    let err = pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();
    assert!(
        matches!(err, PullError::NoSpace { needed, .. } if needed == 6 * HUGE),
        "three parts and the joined file: {err:?}"
    );
    assert!(
        err.to_string().starts_with(
            "downloading the 3 parts of m-Q4_1-00001-of-00003.gguf and joining them into one file needs"
        ),
        "{err}"
    );
    assert!(
        fake.body_bytes() <= 2,
        "only probes: {} bytes",
        fake.body_bytes()
    );
    // From a registry: every layer counts.
    publish(
        &fake,
        "library/smol",
        "latest",
        &ollama_layers(&tiny_gguf(1000)),
    );
    let spec = PullSpec::from_model("smol").unwrap();
    let err = pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();
    assert!(
        matches!(err, PullError::NoSpace { needed, .. } if needed / HUGE == 4),
        "its four layers (and its small config): {err:?}"
    );
    assert!(
        err.to_string().starts_with("downloading smol:latest needs"),
        "{err}"
    );
    assert!(
        fake.body_bytes() <= 2,
        "only the probes: {}",
        fake.body_bytes()
    );
    assert_eq!(tmp.files_under("manifests"), Vec::<String>::new());
    assert!(
        !tmp.files_under("blobs").iter().any(|f| f.contains("part")),
        "{:?}",
        tmp.files_under("blobs")
    );
}

#[tokio::test]
async fn a_file_that_is_not_a_gguf_is_refused_and_removed() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "fake-Q4_K_M.gguf", vec![7u8; 5000]);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("hf.co/o/r").unwrap();

    let (result, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let err = result.unwrap_err();
    assert!(matches!(err, PullError::NotGguf { .. }), "{err:?}");
    assert_eq!(tmp.files_under("blobs"), Vec::<String>::new());
    assert_eq!(tmp.files_under("manifests"), Vec::<String>::new());
}

#[tokio::test]
async fn the_token_is_sent_to_the_hub() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "m-Q4_K_M.gguf", tiny_gguf(1000));
    let tmp = TempStore::new();
    let config = HubConfig {
        token: Some("hf_test_token".into()),
        ..hub(&fake)
    };
    let spec = PullSpec::from_model("hf.co/o/r").unwrap();

    pull_events(&tmp.store, &spec, &config).await.0.unwrap();

    assert!(!format!("{config:?}").contains("hf_test_token"));
    // The last request went to the CDN, where the token must not follow; check the listing.
    fake.reset_counters();
    fake.answer_with(404);
    pull_events(&tmp.store, &spec, &config).await.0.unwrap_err();
    assert_eq!(
        fake.last_authorization().as_deref(),
        Some("Bearer hf_test_token")
    );
}

#[tokio::test]
async fn a_hub_that_refuses_access_says_how_to_get_it() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "m-Q4_K_M.gguf", tiny_gguf(1000));
    fake.answer_with(403);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("hf.co/o/r").unwrap();

    let (result, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let err = result.unwrap_err();
    assert!(matches!(err, PullError::Forbidden { .. }), "{err:?}");
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
}

#[tokio::test]
async fn path_traversal_in_repo_or_file_is_refused() {
    let fake = FakeHub::start().await;
    fake.add("o/r", "m-Q4_K_M.gguf", tiny_gguf(1000));
    let tmp = TempStore::new();

    for model in [
        "hf.co/../r",
        "hf.co/o/..",
        "hf.co/o/../../etc:Q4_K_M",
        "hf.co/o/r:Q4_K_M/../../x",
    ] {
        let err = PullSpec::from_model(model).unwrap_err();
        assert!(
            matches!(err, PullError::InvalidSpec { .. }),
            "{model}: {err:?}"
        );
    }
    for (repo, file, rev) in [
        ("../../etc", "m.gguf", None),
        ("/abs/path", "m.gguf", None),
        ("o/r", "../../../etc/passwd.gguf", None),
        ("o/r", "/etc/m.gguf", None),
        ("o/r", "sub/../../m.gguf", None),
        ("o/r", "m-Q4_K_M.gguf", Some("../../refs")),
    ] {
        let err = PullSpec::from_file(repo, file, rev, None).unwrap_err();
        assert!(
            matches!(err, PullError::InvalidSpec { .. }),
            "{repo} {file} {rev:?}: {err:?}"
        );
    }
    assert_eq!(fake.requests(), 0);
    assert_eq!(tmp.files_under(""), Vec::<String>::new());
}

#[tokio::test]
async fn pulling_an_ollama_model_stores_its_manifest_and_every_layer_as_received() {
    let fake = FakeHub::start().await;
    let layers = ollama_layers(&tiny_gguf(200_000));
    let manifest = publish(&fake, "library/smol", "1b", &layers);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("smol:1b").unwrap();

    let (result, events) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let model = result.unwrap();
    assert_eq!(model.name.to_string(), "smol:1b");
    assert_eq!(model.system.as_deref(), Some("Be brief."));
    assert_eq!(model.template.as_deref(), Some("{{ .Prompt }}"));
    assert_eq!(model.params.temperature, Some(0.2));
    assert_eq!(model.model_digest, Digest::of(&layers[0].1));
    let stored = std::fs::read(
        tmp.root()
            .join("manifests/registry.ollama.ai/library/smol/1b"),
    )
    .unwrap();
    assert_eq!(stored, manifest, "the manifest is kept byte for byte");
    assert_eq!(model.digest, Digest::of(&manifest));
    for (_, bytes) in &layers {
        assert!(tmp.store.has_blob(&Digest::of(bytes)));
    }
    assert_eq!(
        tmp.files_under("blobs").len(),
        layers.len() + 1,
        "the layers and the config, no partial files: {:?}",
        tmp.files_under("blobs")
    );
    assert_eq!(
        statuses(&events),
        [
            "pulling manifest",
            "verifying sha256 digest",
            "writing manifest",
            "success"
        ]
    );
    assert!(tmp
        .store
        .list()
        .iter()
        .any(|m| m.name.to_string() == "smol:1b"));

    // Offline, the same name is served from the store without a request.
    fake.reset_counters();
    let offline = HubConfig {
        offline: true,
        ..hub(&fake)
    };
    pull_events(&tmp.store, &spec, &offline).await.0.unwrap();
    let missing = PullSpec::from_model("other").unwrap();
    let err = pull_events(&tmp.store, &missing, &offline)
        .await
        .0
        .unwrap_err();
    assert!(matches!(err, PullError::Offline { .. }), "{err:?}");
    assert_eq!(fake.requests(), 0);
}

#[tokio::test]
async fn a_corrupted_registry_layer_is_rejected_and_leaves_nothing_behind() {
    let fake = FakeHub::start().await;
    publish(
        &fake,
        "library/smol",
        "latest",
        &ollama_layers(&tiny_gguf(200_000)),
    );
    fake.corrupt(true);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("smol").unwrap();

    let (result, _) = pull_events(&tmp.store, &spec, &hub(&fake)).await;

    let err = result.unwrap_err();
    assert!(matches!(err, PullError::Sha256Mismatch { .. }), "{err:?}");
    assert_eq!(tmp.files_under("blobs"), Vec::<String>::new());
    assert_eq!(tmp.files_under("manifests"), Vec::<String>::new());
}

#[tokio::test]
async fn an_interrupted_registry_pull_resumes() {
    let fake = FakeHub::start().await;
    let layers = ollama_layers(&tiny_gguf(400_000));
    let total: u64 = layers.iter().map(|(_, b)| b.len() as u64).sum();
    publish(&fake, "library/smol", "latest", &layers);
    fake.drop_after(150_000);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("smol").unwrap();

    let err = pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();

    assert!(matches!(err, PullError::Interrupted { .. }), "{err:?}");
    let partial = tmp.files_under("blobs");
    assert!(
        partial.iter().all(|f| f.ends_with("-partial")),
        "only partial files: {partial:?}"
    );
    assert_eq!(tmp.files_under("manifests"), Vec::<String>::new());
    fake.wait_quiet().await;
    fake.heal();
    fake.reset_counters();

    let model = pull_events(&tmp.store, &spec, &hub(&fake)).await.0.unwrap();

    assert_eq!(model.model_digest, Digest::of(&layers[0].1));
    let resent = fake.body_bytes();
    assert!(
        resent + 150_000 <= total + 1000,
        "{resent} bytes sent again of {total}"
    );
    assert!(
        !tmp.files_under("blobs")
            .iter()
            .any(|f| f.ends_with("-partial")),
        "{:?}",
        tmp.files_under("blobs")
    );
}

#[tokio::test]
async fn an_unknown_registry_model_is_reported_as_not_found() {
    let fake = FakeHub::start().await;
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("nosuchmodel:7b").unwrap();

    let err = pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();

    assert!(matches!(err, PullError::ModelNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("nosuchmodel:7b"), "{err}");
}

#[tokio::test]
async fn a_registry_model_without_gguf_weights_is_refused_and_removed() {
    let fake = FakeHub::start().await;
    let mut layers = ollama_layers(b"not a gguf at all");
    layers.truncate(2);
    publish(&fake, "library/bad", "latest", &layers);
    let tmp = TempStore::new();
    let spec = PullSpec::from_model("bad").unwrap();

    let err = pull_events(&tmp.store, &spec, &hub(&fake))
        .await
        .0
        .unwrap_err();

    assert!(matches!(err, PullError::NotGguf { .. }), "{err:?}");
    assert_eq!(tmp.files_under("blobs"), Vec::<String>::new());
    assert_eq!(tmp.files_under("manifests"), Vec::<String>::new());
}

// Through the server: `POST /api/pull` and `backstop pull`, as Ollama's clients use them.

async fn serve_with_hub(fake: &FakeHub) -> common::Server {
    let model = format!("smollm2={}", common::smollm2().display());
    common::Server::start_with_env(
        &["--model", &model],
        &[
            ("HF_ENDPOINT", fake.base.as_str()),
            ("BACKSTOP_REGISTRY", fake.base.as_str()),
        ],
    )
    .await
}

#[tokio::test]
async fn api_pull_streams_progress_and_the_model_is_served_at_once() {
    let fake = FakeHub::start().await;
    let weights = std::fs::read(common::smollm2()).unwrap();
    let sha = fake.add("team/smol-GGUF", "smol-Q4_1.gguf", weights.clone());
    let s = serve_with_hub(&fake).await;
    let (status, ctype, objects) = s
        .ndjson("/api/pull", &json!({"model": "hf.co/team/smol-GGUF:Q4_1"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(ctype, "application/x-ndjson");
    let statuses: Vec<&str> = objects
        .iter()
        .map(|o| o["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses.first(), Some(&"pulling manifest"), "{objects:?}");
    assert_eq!(statuses.last(), Some(&"success"), "{objects:?}");
    assert!(statuses.contains(&"verifying sha256 digest"));
    let progress: Vec<&serde_json::Value> = objects
        .iter()
        .filter(|o| o.get("total").is_some())
        .collect();
    assert!(!progress.is_empty());
    let last = progress.last().unwrap();
    assert_eq!(last["total"], weights.len() as u64);
    assert_eq!(last["completed"], weights.len() as u64);
    assert!(last["status"].as_str().unwrap().starts_with("pulling "));
    // Listed with the file's digest, and it answers.
    let (_, tags) = s.get_json("/api/tags").await;
    let entry = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "hf.co/team/smol-GGUF:Q4_1")
        .cloned();
    assert!(entry.is_some(), "{tags}");
    let (status, r) = s
        .post("/api/generate", &json!({"model": "hf.co/team/smol-GGUF:Q4_1", "prompt": "Hi", "stream": false, "options": {"num_predict": 3}}))
        .await;
    assert_eq!(status, 200, "{r}");
    let store = s.store.clone().unwrap();
    assert!(store.join(format!("blobs/sha256-{sha}")).is_file());
}

#[tokio::test]
async fn a_failed_api_pull_ends_with_an_error_object_and_leaves_nothing() {
    let fake = FakeHub::start().await;
    fake.add("team/bad-GGUF", "bad-Q8_0.gguf", tiny_gguf(300_000));
    fake.corrupt(true);
    let s = serve_with_hub(&fake).await;
    let (status, _, objects) = s
        .ndjson("/api/pull", &json!({"model": "hf.co/team/bad-GGUF:Q8_0"}))
        .await;
    assert_eq!(status, 200, "the stream had started");
    let last = objects.last().unwrap();
    assert!(last["error"].as_str().unwrap().contains("sha256"), "{last}");
    let store = s.store.clone().unwrap();
    assert!(
        files_under(&store.join("blobs"))
            .iter()
            .all(|p| p.to_string_lossy().contains(".hf-partial") && p.is_dir()),
        "{:?}",
        files_under(&store.join("blobs"))
    );
    assert!(!store.join("manifests").exists() || files_under(&store.join("manifests")).is_empty());
    // Without streaming, the failure is the answer's status, in Ollama's shape.
    let (status, r) = s
        .post(
            "/api/pull",
            &json!({"model": "hf.co/team/bad-GGUF:Q2_K", "stream": false}),
        )
        .await;
    assert_eq!(status, 404, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("bad-Q8_0.gguf"),
        "names what exists: {r}"
    );
    let (status, _) = s
        .post(
            "/api/pull",
            &json!({"model": "../../etc/passwd", "stream": false}),
        )
        .await;
    assert_eq!(status, 400);
    // A model larger than the disk: 507, saying how much room it needs.
    fake.heal();
    fake.list_size(1 << 62);
    let (status, r) = s
        .post(
            "/api/pull",
            &json!({"model": "hf.co/team/bad-GGUF:Q8_0", "stream": false}),
        )
        .await;
    assert_eq!(status, 507, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("free some space"),
        "{r}"
    );
}

#[tokio::test]
async fn a_pulled_model_llama_cpp_cannot_compute_is_refused_and_leaves_nothing() {
    let fake = FakeHub::start().await;
    let odd = std::fs::read(common::uncomputable_gguf()).unwrap();
    fake.add("team/odd-GGUF", "odd-Q4_1.gguf", odd.clone());
    publish(&fake, "library/odd", "latest", &ollama_layers(&odd));
    let s = serve_with_hub(&fake).await;
    let greedy = json!({"model": "smollm2", "prompt": "Name a colour.", "stream": false, "options": {"temperature": 0, "num_predict": 8}});
    let (_, before) = s.post("/api/generate", &greedy).await;

    // From the hub and from a registry, as Ollama's clients ask, streamed or not.
    for model in ["hf.co/team/odd-GGUF:Q4_1", "odd"] {
        let (status, r) = s
            .post("/api/pull", &json!({"model": model, "stream": false}))
            .await;
        assert_eq!(status, 422, "{model}: {r}");
        let error = r["error"].as_str().unwrap();
        assert!(error.contains("cannot compute it"), "{r}");
        assert!(error.contains("src1: i32"), "{r}");
        let (status, _, objects) = s.ndjson("/api/pull", &json!({"model": model})).await;
        assert_eq!(status, 200, "the stream had started");
        let last = objects.last().unwrap();
        assert!(
            last["error"].as_str().unwrap().contains("binary_op"),
            "{last}"
        );
        assert!(
            objects.iter().all(|o| o["status"] != "success"),
            "{objects:?}"
        );
    }
    let store = s.store.clone().unwrap();
    // No blob kept (the weights, nor the registry model's other layers): only empty folders.
    for dir in ["blobs", "manifests"] {
        let left = files_under(&store.join(dir));
        assert!(left.iter().all(|p| p.is_dir()), "{dir}: {left:?}");
    }
    let (status, after) = s.post("/api/generate", &greedy).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["response"], before["response"]);
}

/// Every file and folder below `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            let inner = files_under(&p);
            if inner.is_empty() {
                out.push(p);
            } else {
                out.extend(inner);
            }
        } else {
            out.push(p);
        }
    }
    out
}

/// `backstop pull ARGS` with no server to reach: straight into `store`, from `fake`.
fn pull_without_server(store: &Path, fake: &FakeHub, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .arg("pull")
        .args(args)
        .env("BACKSTOP_HOST", "127.0.0.1:1")
        .env("BACKSTOP_MODELS", store)
        .env("HF_ENDPOINT", &fake.base)
        .output()
        .unwrap()
}

// The CLI runs as a blocking child process while the fake hub lives on this runtime: the
// hub needs threads of its own meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pulls_through_the_server_or_straight_into_the_store() {
    let fake = FakeHub::start().await;
    fake.add("team/tiny-GGUF", "tiny-Q8_0.gguf", tiny_gguf(200_000));
    fake.add("team/tiny-GGUF", "tiny-Q4_0.gguf", tiny_gguf(100_000));
    let s = serve_with_hub(&fake).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_backstop"))
        .args(["pull", "hf.co/team/tiny-GGUF:Q8_0"])
        .env("BACKSTOP_HOST", s.base.trim_start_matches("http://"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("pulling manifest") && err.contains("success"),
        "{err}"
    );
    assert!(s
        .store
        .as_ref()
        .unwrap()
        .join("manifests/hf.co/team/tiny-GGUF/Q8_0")
        .is_file());

    // No server: the CLI pulls into the store itself (BACKSTOP_MODELS), pinned to one file.
    let store = common::temp_dir("cli-pull");
    let out = pull_without_server(
        &store,
        &fake,
        &[
            "team/tiny-GGUF",
            "--file",
            "tiny-Q4_0.gguf",
            "--revision",
            "main",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no server at"), "{err}");
    assert!(store.join("manifests/hf.co/team/tiny-GGUF/Q4_0").is_file());

    // Straight into the store, a file llama.cpp cannot compute is refused as the server would.
    fake.add(
        "team/odd-GGUF",
        "odd-Q4_1.gguf",
        std::fs::read(common::uncomputable_gguf()).unwrap(),
    );
    let out = pull_without_server(&store, &fake, &["hf.co/team/odd-GGUF:Q4_1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot compute it") && err.contains("src1: i32"),
        "{err}"
    );
    assert!(
        !store.join("manifests/hf.co/team/odd-GGUF").exists(),
        "{err}"
    );
    std::fs::remove_dir_all(&store).ok();
}

/// `serve` refuses a pinned model missing from the configured store and says which command
/// fetches it; that command, run as printed with no server up, puts it where the config
/// looks, pinned hash and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pull_command_a_missing_pinned_model_suggests_fetches_it_into_the_configured_store() {
    use sha2::{Digest as _, Sha256};
    let fake = FakeHub::start().await;
    let weights = tiny_gguf(100_000);
    let sha: String = Sha256::digest(&weights)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fake.add("team/tiny-GGUF", "tiny-Q4_0.gguf", weights);
    let dir = common::temp_dir("pinned-pull");
    let store = dir.join("store");
    let cfg = dir.join("models.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nmodels_dir = \"{}\"\n[models.tiny]\nrepo = \"team/tiny-GGUF\"\nfile = \"tiny-Q4_0.gguf\"\nrevision = \"main\"\nsha256 = \"{sha}\"\n",
            store.display()
        ),
    )
    .unwrap();
    let config_check = || {
        common::backstop_command()
            .args(["config", "check", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let refused = config_check();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr).into_owned();
    let hint = err
        .split("fetch it with `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_else(|| panic!("no command in: {err}"));
    assert!(hint.contains(&format!("--sha256 {sha}")), "{hint}");
    assert!(hint.contains("--models-dir"), "{hint}");
    let words: Vec<&str> = hint.split_whitespace().collect();
    assert_eq!(words[..2], ["backstop", "pull"]);
    let out = common::backstop_command()
        .args(&words[1..])
        .env("BACKSTOP_HOST", "127.0.0.1:1")
        .env("HF_ENDPOINT", &fake.base)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = config_check();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
