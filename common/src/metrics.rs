//! The Prometheus registry of a service and the HTTP router that exports it
//! with `/metrics` and `/healthz`.

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus::{Encoder, Registry, TextEncoder};

/// A registry with the process collector (CPU, RSS, open fds) registered.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    {
        let process = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(err) = registry.register(Box::new(process)) {
            tracing::warn!(%err, "process metrics unavailable");
        }
    }
    registry
}

/// Renders the registry in the text exposition format.
pub fn render(registry: &Registry) -> Result<String, prometheus::Error> {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

async fn metrics_handler(State(registry): State<Registry>) -> impl IntoResponse {
    match render(&registry) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(%err, "cannot encode metrics");
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode metrics",
            )
                .into_response()
        }
    }
}

/// `GET /metrics` and `GET /healthz` (liveness: the process answers).
pub fn router<S>(registry: Registry) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(registry)
        .route("/healthz", get(|| async { "ok" }))
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`; for the
/// services whose only HTTP is their metrics.
pub fn spawn_server(
    listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, router(registry))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    })
}
