//! The `/api/*` handlers: generation (generate, chat), the catalogue (tags, show, ps) and
//! the store (create, copy, delete, blobs).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::convert::{self, Extras};
use super::error::OllamaError;
use super::ndjson::{self, Framer, Kind};
use crate::api::body::{BodyError, JsonBody};
use crate::api::request::{collect, start, Valid};
use crate::api::tools;
use crate::api::AppState;
use crate::config::KeepAlive;
use crate::engine::fallback_for;
use crate::models::{
    Digest, GgufHeader, Loaded, ModelName, ModelSpec, Models, NewModel, Origin, Parameters,
    StoreError,
};

/// The Ollama API level backstop answers to (`/api/version`): clients gate features on it.
pub(crate) const OLLAMA_API_VERSION: &str = "0.12.6";

/// `GET /` and `HEAD /`.
pub(crate) async fn root() -> &'static str {
    "Ollama is running"
}

/// `GET /api/version`.
pub(crate) async fn version() -> Json<Value> {
    Json(json!({"version": OLLAMA_API_VERSION, "backstop": env!("CARGO_PKG_VERSION")}))
}

/// `POST /api/generate`.
pub(crate) async fn generate(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<Response, OllamaError> {
    let started = Instant::now();
    let (valid, extras) = convert::generate(&body?.0)?;
    answer(&state, valid, extras, Kind::Generate, started).await
}

/// `POST /api/chat`.
pub(crate) async fn chat(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<Response, OllamaError> {
    let started = Instant::now();
    let (valid, extras) = convert::chat(&body?.0)?;
    answer(&state, valid, extras, Kind::Chat, started).await
}

async fn answer(
    state: &AppState,
    mut valid: Valid,
    extras: Extras,
    kind: Kind,
    started: Instant,
) -> Result<Response, OllamaError> {
    state.security.cap_tokens(&mut valid.max_tokens)?;
    if extras.load_only {
        // Ollama's idioms: an empty request loads the model; with keep_alive 0 it unloads.
        if valid.keep_alive == Some(KeepAlive::For(Duration::ZERO)) {
            let spec = state.models.resolve(&valid.model)?;
            state.models.unload(&spec.name).await;
            let framer = Framer::new(kind, valid.model, started, Duration::ZERO);
            return Ok(Json(framer.lifecycle("unload")).into_response());
        }
        let lease = state.models.acquire(&valid.model, valid.keep_alive).await?;
        let framer = Framer::new(kind, valid.model, started, lease.load_duration);
        return Ok(Json(framer.lifecycle("load")).into_response());
    }
    let lease = state.models.acquire(&valid.model, valid.keep_alive).await?;
    let load = lease.load_duration;
    let generation = start::<OllamaError>(&valid, lease).await?;
    let framer = Framer::new(kind, valid.model.clone(), started, load);
    if valid.stream && valid.tools.is_none() {
        return Ok(ndjson::stream(generation, framer));
    }
    let c = collect(generation).await?;
    let finish = ndjson::finish_name(c.finish);
    let Some(toolbox) = &valid.tools else {
        let done = framer.done(&c.text, finish, c.usage, c.timings);
        return Ok(Json(done).into_response());
    };
    // With tools the answer is read whole: a call is known to be one only at its end.
    let (text, calls) = tool_message(&c.text, toolbox.forced());
    let text = text.as_str();
    if !valid.stream {
        let mut done = framer.done(text, finish, c.usage, c.timings);
        if !calls.is_empty() {
            done["message"]["tool_calls"] = json!(calls);
        }
        return Ok(Json(done).into_response());
    }
    // As Ollama streams it: the message (text and calls) in one object, then the last one.
    let mut message = framer.text(text);
    if !calls.is_empty() {
        message["message"]["tool_calls"] = json!(calls);
    }
    let done = framer.done("", finish, c.usage, c.timings);
    Ok(ndjson::lines_response(futures_util::stream::iter([
        message.to_string(),
        done.to_string(),
    ])))
}

/// An answer to a request with tools, in Ollama's terms: the text around the calls (all of
/// it when there are none), and the calls with their arguments as objects.
fn tool_message(answer: &str, forced: bool) -> (String, Vec<Value>) {
    let (rest, calls) = tools::extract(answer, forced);
    let text = if calls.is_empty() {
        answer.to_owned()
    } else {
        rest
    };
    let calls = calls
        .iter()
        .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}}))
        .collect();
    (text, calls)
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Ollama's `details` object.
fn details(header: Option<&GgufHeader>) -> Value {
    let family = header.map_or("unknown", GgufHeader::architecture);
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": header.map(GgufHeader::parameter_size).unwrap_or_default(),
        "quantization_level": header.map(GgufHeader::quantization).unwrap_or_default(),
    })
}

fn digest_hex(models: &Models, spec: &ModelSpec) -> String {
    models
        .digest(spec)
        .map(|d| d.hex().to_owned())
        .unwrap_or_default()
}

/// `GET /api/tags`: every servable model, loaded or not.
pub(crate) async fn tags(State(state): State<AppState>) -> Result<Json<Value>, OllamaError> {
    let models = Arc::clone(&state.models);
    // Hashing a model file the first time is slow (seconds per GB): off the runtime.
    let list = tokio::task::spawn_blocking(move || {
        models
            .list()
            .into_iter()
            .map(|l| {
                let header = models.header(l.spec.path());
                json!({
                    "name": l.spec.name.to_string(),
                    "model": l.spec.name.to_string(),
                    "modified_at": rfc3339(l.modified),
                    "size": l.size,
                    "digest": digest_hex(&models, &l.spec),
                    "details": details(header.as_deref()),
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| OllamaError::internal(e.to_string()))?;
    Ok(Json(json!({ "models": list })))
}

/// `GET /api/ps`: the loaded models.
pub(crate) async fn ps(State(state): State<AppState>) -> Result<Json<Value>, OllamaError> {
    let models = Arc::clone(&state.models);
    let list = tokio::task::spawn_blocking(move || {
        models
            .running()
            .iter()
            .map(|l| running_entry(&models, l))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| OllamaError::internal(e.to_string()))?;
    Ok(Json(json!({ "models": list })))
}

fn running_entry(models: &Models, l: &Loaded) -> Value {
    let info = l.engine.info();
    let header = models.header(l.spec.path());
    // "Forever" is shown the way Ollama shows it: a date centuries away.
    let expires = l
        .expires_at()
        .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(292 * 365 * 24 * 3600));
    json!({
        "name": l.spec.name.to_string(),
        "model": l.spec.name.to_string(),
        "size": info.file_size + info.kv_bytes,
        "digest": digest_hex(models, &l.spec),
        "details": details(header.as_deref()),
        "expires_at": rfc3339(expires),
        "size_vram": info.vram_bytes,
        "context_length": info.ctx_per_slot,
    })
}

fn object(body: &Value) -> Result<&Map<String, Value>, OllamaError> {
    body.as_object()
        .ok_or_else(|| OllamaError::bad_request("the request body must be a JSON object"))
}

/// `POST /api/show`.
pub(crate) async fn show(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<Json<Value>, OllamaError> {
    let body = body?;
    let map = object(&body.0)?;
    let name = convert::model(map)?;
    let verbose = map.get("verbose").and_then(Value::as_bool).unwrap_or(false);
    let spec = state.models.resolve(&name)?;
    let loaded_fim = state
        .models
        .running()
        .into_iter()
        .find(|l| l.spec.name == spec.name)
        .map(|l| l.engine.info().fim.is_some());
    let models = Arc::clone(&state.models);
    let out = tokio::task::spawn_blocking(move || show_model(&models, &spec, verbose, loaded_fim))
        .await
        .map_err(|e| OllamaError::internal(e.to_string()))??;
    Ok(Json(out))
}

fn show_model(
    models: &Models,
    spec: &ModelSpec,
    verbose: bool,
    loaded_fim: Option<bool>,
) -> Result<Value, OllamaError> {
    let path = spec.path();
    let header = models.header(path).ok_or_else(|| {
        OllamaError::internal(format!("cannot read the GGUF header of {}", path.display()))
    })?;
    let arch = header.architecture().to_owned();
    let mut info = Map::new();
    for (k, v) in &header.metadata {
        // Tokenizer tables are huge; Ollama leaves them out unless asked.
        if !verbose
            && k.starts_with("tokenizer.ggml.")
            && matches!(v, crate::models::gguf::GgufValue::Array { .. })
        {
            info.insert(k.clone(), Value::Null);
            continue;
        }
        if k == "tokenizer.chat_template" {
            continue;
        }
        info.insert(k.clone(), v.to_json());
    }
    info.insert(
        "general.parameter_count".into(),
        json!(header.parameter_count),
    );
    let template = header
        .str("tokenizer.chat_template")
        .map(str::to_owned)
        .unwrap_or_else(|| fallback_for(&arch).1.to_owned());
    let d = &spec.defaults;
    let params = Parameters::from_parts(
        &d.sampling,
        spec.engine.ctx_per_slot,
        d.max_tokens.map(i64::from),
        d.stop.clone(),
    );
    let mut modelfile = format!(
        "# Modelfile generated by \"backstop show\"\n# To build a new Modelfile based on this, replace FROM with:\n# FROM {}\n\nFROM {}\nTEMPLATE \"\"\"{}\"\"\"\n",
        spec.name,
        path.display(),
        template
    );
    if let Some(system) = &d.system {
        modelfile.push_str(&format!("SYSTEM \"\"\"{system}\"\"\"\n"));
    }
    for line in params.to_text().lines() {
        modelfile.push_str(&format!("PARAMETER {line}\n"));
    }
    let fim_in_header = header
        .metadata
        .contains_key("tokenizer.ggml.fim_pre_token_id");
    let mut capabilities = vec!["completion"];
    if loaded_fim.unwrap_or(fim_in_header) {
        capabilities.push("insert");
    }
    let modified = match &spec.origin {
        Origin::Store(m) => m.modified,
        Origin::Config { .. } => std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH),
    };
    let mut out = json!({
        "license": header.str("general.license").unwrap_or(""),
        "modelfile": modelfile,
        "parameters": params.to_text(),
        "template": template,
        "details": details(Some(&header)),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": rfc3339(modified),
    });
    if let Some(system) = &d.system {
        out["system"] = json!(system);
    }
    Ok(out)
}

/// The name a store operation targets; names of configured models are refused, since the
/// configuration file, not the API, owns them.
fn store_name(models: &Models, text: &str, field: &str) -> Result<ModelName, OllamaError> {
    let name = ModelName::parse(text)
        .map_err(|e| OllamaError::bad_request(format!("invalid `{field}`: {e}")))?;
    if models.is_configured(&name) {
        return Err(OllamaError::bad_request(format!(
            "model '{name}' is defined in the configuration; change it there"
        )));
    }
    Ok(name)
}

fn string_field<'a>(
    map: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, OllamaError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(OllamaError::bad_request(format!(
            "`{field}` must be a string"
        ))),
    }
}

/// `DELETE /api/delete`.
pub(crate) async fn delete(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<StatusCode, OllamaError> {
    let body = body?;
    let text = convert::model(object(&body.0)?)?;
    let name = store_name(&state.models, &text, "model")?;
    let models = Arc::clone(&state.models);
    let target = name.clone();
    tokio::task::spawn_blocking(move || models.store().delete(&target))
        .await
        .map_err(|e| OllamaError::internal(e.to_string()))?
        .map_err(|e| match e {
            StoreError::NotFound(_) => OllamaError::not_found(format!("model '{text}' not found")),
            other => other.into(),
        })?;
    state.models.invalidate(&name).await;
    tracing::info!(model = %name, "model deleted");
    crate::security::audit::note(|r| r.event = Some("delete".into()));
    Ok(StatusCode::OK)
}

/// Makes sure a model's weights are a blob of the store (a configured model's file is copied
/// in) and returns the blob's digest.
fn blob_of(models: &Models, spec: &ModelSpec) -> Result<Digest, OllamaError> {
    if let Origin::Store(m) = &spec.origin {
        return Ok(m.model_digest.clone());
    }
    let store = models.store();
    if let Origin::Config { sha256: Some(d) } = &spec.origin {
        if store.has_blob(d) {
            return Ok(d.clone());
        }
    }
    import_file(store, spec.path())
}

/// The kinds of work ([`crate::models::Store::work_path`]) a GGUF file copied into the store
/// and an upload are: what one cut short leaves is removed before the next.
const IMPORT: &str = "import";
const UPLOAD: &str = "upload";

/// Copies a GGUF file into the store as a blob (temporary name, hashed, renamed).
fn import_file(
    store: &crate::models::Store,
    path: &std::path::Path,
) -> Result<Digest, OllamaError> {
    store.remove_dead_work(IMPORT);
    let temp = store.work_path(IMPORT)?;
    if let Err(e) = std::fs::copy(path, &temp) {
        std::fs::remove_file(&temp).ok();
        return Err(OllamaError::bad_request(format!(
            "cannot copy {}: {e}",
            path.display()
        )));
    }
    Ok(store.import_blob(&temp, None)?)
}

/// `POST /api/copy`.
pub(crate) async fn copy(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<StatusCode, OllamaError> {
    let body = body?;
    let map = object(&body.0)?;
    let source = string_field(map, "source")?
        .ok_or_else(|| OllamaError::bad_request("`source` is required"))?
        .to_owned();
    let destination = string_field(map, "destination")?
        .ok_or_else(|| OllamaError::bad_request("`destination` is required"))?;
    let to = store_name(&state.models, destination, "destination")?;
    let spec = state.models.resolve(&source)?;
    let models = Arc::clone(&state.models);
    let target = to.clone();
    tokio::task::spawn_blocking(move || -> Result<(), OllamaError> {
        match &spec.origin {
            Origin::Store(m) => Ok(models.store().copy(&m.name, &target)?),
            Origin::Config { .. } => {
                let digest = blob_of(&models, &spec)?;
                let d = &spec.defaults;
                let extra = NewModel {
                    params: Parameters::from_parts(
                        &d.sampling,
                        spec.engine.ctx_per_slot,
                        d.max_tokens.map(i64::from),
                        d.stop.clone(),
                    ),
                    system: d.system.clone(),
                    template: None,
                };
                models.store().create(&target, &digest, &extra)?;
                Ok(())
            }
        }
    })
    .await
    .map_err(|e| OllamaError::internal(e.to_string()))??;
    state.models.invalidate(&to).await;
    tracing::info!(from = %source, to = %to, "model copied");
    crate::security::audit::note(|r| {
        r.event = Some("copy".into());
        r.detail = Some(format!("{source} -> {to}"));
    });
    Ok(StatusCode::OK)
}

/// `POST /api/create`: a new store entry from an existing model (`from`) or an uploaded GGUF
/// blob (`files`), with its own parameters and system prompt, like a Modelfile.
pub(crate) async fn create(
    State(state): State<AppState>,
    body: Result<JsonBody, BodyError>,
) -> Result<Response, OllamaError> {
    let body = body?;
    let map = object(&body.0)?;
    let text = convert::model(map)?;
    let name = store_name(&state.models, &text, "model")?;
    let stream = map.get("stream").and_then(Value::as_bool).unwrap_or(true);
    for unsupported in ["adapters", "messages"] {
        if map.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(OllamaError::bad_request(format!(
                "`{unsupported}` is not supported by this server"
            )));
        }
    }
    if string_field(map, "quantize")?.is_some() {
        return Err(OllamaError::bad_request(
            "`quantize` is not supported by /api/create yet; use `backstop quantize`",
        ));
    }
    let system = string_field(map, "system")?.map(str::to_owned);
    let template = string_field(map, "template")?.map(str::to_owned);
    let options = convert::options(map.get("parameters"), "parameters")?;
    let from = string_field(map, "from")?.map(str::to_owned);
    let files: Vec<(String, String)> = match map.get("files") {
        None | Some(Value::Null) => vec![],
        Some(Value::Object(f)) => f
            .iter()
            .map(|(k, v)| v.as_str().map(|d| (k.clone(), d.to_owned())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                OllamaError::bad_request("`files` maps file names to digests (strings)")
            })?,
        Some(_) => return Err(OllamaError::bad_request("`files` must be an object")),
    };
    // `from` names a model, or (a backstop extension, for admins on the server's own
    // machine) an absolute path to a GGUF file, which is copied into the store.
    let local_file = from
        .as_deref()
        .filter(|f| f.starts_with('/'))
        .map(std::path::PathBuf::from);
    let base = match (&from, &local_file) {
        (Some(_), Some(path)) => {
            crate::engine::check_model_file(path)
                .map_err(|e| OllamaError::bad_request(e.to_string()))?;
            None
        }
        (Some(f), None) => Some(state.models.resolve(f)?),
        (None, _) => None,
    };
    if base.is_none() && files.is_empty() && local_file.is_none() {
        return Err(OllamaError::bad_request(
            "neither 'from' or 'files' was specified",
        ));
    }
    let ggufs: Vec<&(String, String)> =
        files.iter().filter(|(n, _)| n.ends_with(".gguf")).collect();
    if ggufs.len() > 1 || files.len() > ggufs.len() {
        return Err(OllamaError::bad_request("`files` must hold exactly one .gguf file (split models and adapters are not supported)"));
    }
    let upload = match ggufs.first() {
        Some((_, d)) => Some(Digest::parse(d)?),
        None => None,
    };
    let models = Arc::clone(&state.models);
    let target = name.clone();
    let created = tokio::task::spawn_blocking(move || -> Result<(), OllamaError> {
        let store = models.store();
        let digest = match (&upload, &base, &local_file) {
            (Some(d), _, _) => {
                if !store.has_blob(d) {
                    return Err(OllamaError::bad_request(format!(
                        "blob {d} was not uploaded (POST /api/blobs/{d} first)"
                    )));
                }
                d.clone()
            }
            (None, Some(spec), _) => blob_of(&models, spec)?,
            (None, None, Some(path)) => import_file(store, path)?,
            (None, None, None) => return Err(OllamaError::bad_request("nothing to create from")),
        };
        // What the base model has, the new one inherits unless the request says otherwise.
        let (mut params, mut base_system) = (Parameters::default(), None);
        if let Some(spec) = &base {
            let d = &spec.defaults;
            params = Parameters::from_parts(
                &d.sampling,
                spec.engine.ctx_per_slot,
                d.max_tokens.map(i64::from),
                d.stop.clone(),
            );
            base_system = d.system.clone();
        }
        let given = options.into_parameters();
        let params = merge(params, given);
        store.create(
            &target,
            &digest,
            &NewModel {
                params,
                system: system.or(base_system),
                template,
            },
        )?;
        Ok(())
    })
    .await
    .map_err(|e| OllamaError::internal(e.to_string()))?;
    created?;
    state.models.invalidate(&name).await;
    tracing::info!(model = %name, "model created");
    crate::security::audit::note(|r| r.event = Some("create".into()));
    let statuses = vec![
        json!({"status": "using existing layer"}).to_string(),
        json!({"status": "writing manifest"}).to_string(),
        json!({"status": "success"}).to_string(),
    ];
    if stream {
        return Ok(ndjson::lines_response(futures_util::stream::iter(statuses)));
    }
    Ok(Json(json!({"status": "success"})).into_response())
}

/// Field by field: `over`'s values where set, else `base`'s.
fn merge(base: Parameters, over: Parameters) -> Parameters {
    let s = over.sampling().or(&base.sampling());
    let stop = if over.stop.is_empty() {
        base.stop
    } else {
        over.stop
    };
    let mut out = Parameters::from_parts(
        &s,
        over.num_ctx.or(base.num_ctx),
        over.num_predict.or(base.num_predict),
        stop,
    );
    out.other = base.other;
    out.other.extend(over.other);
    out
}

/// `HEAD /api/blobs/{digest}`: 200 if the store has it.
pub(crate) async fn blob_exists(
    State(state): State<AppState>,
    Path(digest): Path<String>,
) -> Result<StatusCode, OllamaError> {
    let d = Digest::parse(&digest)?;
    if state.models.store().has_blob(&d) {
        Ok(StatusCode::OK)
    } else {
        Err(OllamaError::not_found(format!("blob {d} not found")))
    }
}

/// `POST /api/blobs/{digest}`: stores an upload under its digest, after checking that the
/// bytes hash to it (a mismatch leaves nothing behind).
pub(crate) async fn blob_upload(
    State(state): State<AppState>,
    Path(digest): Path<String>,
    body: Body,
) -> Result<StatusCode, OllamaError> {
    let expected = Digest::parse(&digest)?;
    let store = state.models.store().clone();
    if store.has_blob(&expected) {
        return Ok(StatusCode::OK);
    }
    let sweep = store.clone();
    let _ = tokio::task::spawn_blocking(move || sweep.remove_dead_work(UPLOAD)).await;
    let temp = store.work_path(UPLOAD)?;
    let result = async {
        let mut file = tokio::fs::File::create(&temp)
            .await
            .map_err(|e| OllamaError::internal(format!("cannot write {}: {e}", temp.display())))?;
        let mut hasher = Sha256::new();
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| OllamaError::bad_request(format!("upload interrupted: {e}")))?;
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| {
                OllamaError::internal(format!("cannot write {}: {e}", temp.display()))
            })?;
        }
        file.sync_all().await.ok();
        let actual = Digest::from_hasher(hasher);
        if actual != expected {
            return Err(OllamaError::bad_request(format!(
                "digest mismatch: the upload hashes to {actual}, not {expected}"
            )));
        }
        store.adopt_blob(&temp, &expected)?;
        Ok(StatusCode::CREATED)
    }
    .await;
    if result.is_err() {
        tokio::fs::remove_file(&temp).await.ok();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_come_back_in_ollamas_shape_with_object_arguments() {
        let answer = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>";
        let (text, calls) = tool_message(answer, false);
        assert_eq!(text, "Let me check.");
        assert_eq!(
            calls,
            vec![json!({"function": {"name": "get_weather",
                                     "arguments": {"city": "Paris", "unit": "celsius"}}})]
        );
        // A forced answer is the call's JSON itself.
        let (text, calls) = tool_message(r#"{"name": "add", "arguments": {"a": 2, "b": 3}}"#, true);
        assert_eq!(text, "");
        assert_eq!(calls[0]["function"]["arguments"], json!({"a": 2, "b": 3}));
        // No call: the text is the answer, untouched.
        let (text, calls) = tool_message("  It is sunny.  ", false);
        assert_eq!(text, "  It is sunny.  ");
        assert!(calls.is_empty());
    }
}
