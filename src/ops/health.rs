//! `GET /health`: 200 once every configured model is loaded, 503 before.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::api::AppState;

/// Liveness plus "the models are loaded": load balancers and the test harness wait on it.
pub(crate) async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.models.all_ready() {
        (StatusCode::OK, Json(json!({"status": "ok"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use crate::api::{router, AppState};
    use crate::config::{ModelConfig, ModelDefaults};
    use crate::engine::EngineOptions;
    use crate::models::Registry;

    #[tokio::test]
    async fn health_is_503_while_a_model_is_still_loading() {
        let model = ModelConfig {
            engine: EngineOptions {
                name: "m".into(),
                path: "/nonexistent.gguf".into(),
                slots: 1,
                ctx_per_slot: None,
                threads: 1,
                batch: 512,
                prefill_chunk: 128,
                max_queue: 1,
                gpu_layers: None,
            },
            defaults: ModelDefaults::default(),
        };
        let state = AppState {
            models: Arc::new(Registry::new(vec![model])),
            metrics: None,
            started_at: 0,
        };
        let app = router(state, 1024);
        let resp = app
            .clone()
            .oneshot(Request::get("/health").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        // A request for the loading model is 503 with Retry-After too, in OpenAI's shape.
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
        assert_eq!(resp.status(), 503);
        assert!(resp.headers().contains_key("retry-after"));
        let body = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "model_loading");
    }
}
