//! `GET /health` is liveness: the process answers HTTP. `GET /health/ready` is readiness:
//! 200 when it can serve (the configured models are loaded), 503 otherwise, with the models,
//! the breakers, contingency, the insecure flag and the compute backend. Without a key on a
//! server that requires keys, readiness says only whether it is ready (what a load balancer
//! needs), not what it serves.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::{json, Value};

use crate::api::AppState;
use crate::security::Authenticated;

/// `GET /health`: the process is alive.
pub(crate) async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /health/ready`.
pub(crate) async fn ready(
    State(state): State<AppState>,
    key: Option<Extension<Authenticated>>,
) -> (StatusCode, Json<Value>) {
    let ready = state.models.started();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let summary = if ready { "ready" } else { "loading" };
    if state.security.keys_enabled() && key.is_none() {
        return (status, Json(json!({"status": summary})));
    }
    let models = Arc::clone(&state.models);
    let listed = tokio::task::spawn_blocking(move || {
        let running: Vec<String> = models.running().iter().map(|l| l.spec.name.key()).collect();
        models
            .list()
            .iter()
            .map(|l| {
                json!({
                    "name": l.spec.name.to_string(),
                    "loaded": running.contains(&l.spec.name.key()),
                    "loadable": models.header(l.spec.path()).is_some(),
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    (
        status,
        Json(json!({
            "status": summary,
            "models": listed,
            "upstreams": state.router.status(),
            "contingency": state.router.contingency(),
            "insecure": state.security.insecure,
            "compute": state.compute.as_deref(),
        })),
    )
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use crate::api::{router, AppState};
    use crate::config::for_tests as config;
    use crate::models::Models;

    #[tokio::test]
    async fn readiness_is_503_until_the_models_are_preloaded_and_a_broken_model_is_a_500() {
        let state = AppState {
            models: Models::new(
                &config("/nonexistent.gguf"),
                crate::engine::PromptCache::new(0),
            ),
            metrics: None,
            started_at: 0,
            router: std::sync::Arc::new(crate::router::Router::new(&Default::default()).unwrap()),
            security: std::sync::Arc::new(crate::security::Security::new(
                &Default::default(),
                1024,
                false,
            )),
            compute: None,
        };
        let config = config("/nonexistent.gguf");
        let app = router(state, &config.server, &config.security);
        let resp = app
            .clone()
            .oneshot(Request::get("/health").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "alive");
        let resp = app
            .clone()
            .oneshot(Request::get("/health/ready").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 503, "not ready");
        // A request for a model whose file cannot load is a 500 naming why, in OpenAI's shape.
        let resp = app
            .oneshot(
                Request::post("/v1/chat/completions")
                    .body(Body::from(
                        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
                    ))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 500);
        let body = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "model_load_failed");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("/nonexistent.gguf"),
            "{v}"
        );
    }
}
