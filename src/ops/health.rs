//! `GET /health`: 200 once the configured models are preloaded, 503 before.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::api::AppState;

/// Liveness plus "the models are loaded": load balancers and the test harness wait on it.
pub(crate) async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if state.models.started() {
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
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use crate::api::{router, AppState};
    use crate::config::{
        Config, EngineDefaults, KeepAlive, Lifecycle, ModelConfig, ModelDefaults, ServerConfig,
    };
    use crate::engine::KvCacheType;
    use crate::models::{ModelName, Models};

    fn config(path: &str) -> Config {
        let engine = EngineDefaults {
            slots: 1,
            ctx_per_slot: None,
            threads: 1,
            batch: 512,
            prefill_chunk: 128,
            max_queue: 1,
            flash_attention: None,
            kv_cache_type: KvCacheType::F16,
        };
        let name = ModelName::parse("m").unwrap();
        Config {
            server: ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                max_body_bytes: 1024,
                insecure: false,
                origins: vec![],
            },
            lifecycle: Lifecycle {
                keep_alive: KeepAlive::DEFAULT,
                max_loaded: 1,
            },
            store_dir: std::env::temp_dir().join("backstop-health-test-store"),
            models: vec![ModelConfig {
                engine: engine.options(&name, path.into(), None),
                name,
                aliases: vec![],
                defaults: ModelDefaults::default(),
                sha256: None,
            }],
            engine,
            router: Default::default(),
            security: Default::default(),
        }
    }

    #[tokio::test]
    async fn health_is_503_until_the_models_are_preloaded_and_a_broken_model_is_a_500() {
        let state = AppState {
            models: Models::new(&config("/nonexistent.gguf")),
            metrics: None,
            started_at: 0,
            router: std::sync::Arc::new(crate::router::Router::new(&Default::default()).unwrap()),
            security: std::sync::Arc::new(crate::security::Security::new(
                &Default::default(),
                1024,
                false,
            )),
        };
        let config = config("/nonexistent.gguf");
        let app = router(state, &config.server, &config.security);
        let resp = app
            .clone()
            .oneshot(Request::get("/health").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
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
