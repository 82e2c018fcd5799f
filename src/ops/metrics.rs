//! Prometheus metrics: the recorder and `GET /metrics`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::api::AppState;

/// Installs the process-wide recorder. Only the first call in a process succeeds.
pub fn install() -> Option<PrometheusHandle> {
    let seconds = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("backstop_decode_batch_sequences".into()),
            &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0],
        )
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full("backstop_request_duration_seconds".into()),
            &seconds,
        )
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full("backstop_time_to_first_token_seconds".into()),
            &seconds,
        )
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full("backstop_model_load_seconds".into()),
            &seconds,
        )
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full("backstop_decode_tokens_per_second".into()),
            &[
                1.0, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0,
            ],
        )
        .ok()?;
    match builder.install_recorder() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    }
}

/// `GET /metrics` in the Prometheus text format.
pub(crate) async fn render(State(state): State<AppState>) -> impl IntoResponse {
    match &state.metrics {
        Some(h) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            String::from("# metrics recorder unavailable\n"),
        ),
    }
}
