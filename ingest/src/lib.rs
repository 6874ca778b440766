//! Entrip ingest: the HTTP API that validates requests from upstream systems
//! and stores each accepted change with its audit row, its outbox event and
//! its idempotency record in one PostgreSQL transaction.

mod commands;
mod error;
mod extract;
pub mod idempotency;
mod metrics;
mod requests;
mod routes;
mod submit;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    http::StatusCode,
    middleware,
    routing::{get, post},
};
use entrip_common::config::IngestSettings;
use prometheus::Registry;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{catch_panic::CatchPanicLayer, timeout::TimeoutLayer, trace::TraceLayer};

use crate::{error::ApiError, metrics::IngestMetrics};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct App {
    pool: PgPool,
    settings: Arc<IngestSettings>,
    metrics: IngestMetrics,
    registry: Registry,
}

impl App {
    pub fn new(
        pool: PgPool,
        settings: IngestSettings,
        registry: Registry,
    ) -> Result<Self, prometheus::Error> {
        error::set_retry_after(settings.retry_after_secs);
        let metrics = IngestMetrics::register(&registry)?;
        Ok(Self {
            pool,
            settings: Arc::new(settings),
            metrics,
            registry,
        })
    }

    /// How long a stored idempotency key answers replays.
    fn idempotency_ttl(&self) -> Duration {
        Duration::from_secs(self.settings.idempotency_ttl_secs)
    }
}

/// The full router: API, health, readiness and metrics.
fn router(app: App) -> Router {
    let timeout = Duration::from_secs(app.settings.request_timeout_secs);
    let api = Router::new()
        .route("/v1/users", post(routes::create_user))
        .route("/v1/users/{id}", get(routes::get_user))
        .route("/v1/bookings", post(routes::create_booking))
        .route("/v1/bookings/{id}", get(routes::get_booking))
        .route("/v1/bookings/{id}/cancel", post(routes::cancel_booking))
        .route("/v1/payments", post(routes::create_payment))
        .route("/v1/payments/{id}", get(routes::get_payment))
        .route("/v1/payments/{id}/result", post(routes::payment_result))
        .route("/v1/approvals", post(routes::create_approval))
        .route("/v1/approvals/{id}", get(routes::get_approval))
        .route("/v1/approvals/{id}/decision", post(routes::decide_approval))
        .route("/readyz", get(routes::readyz))
        .method_not_allowed_fallback(routes::method_not_allowed)
        .fallback(routes::no_route)
        .with_state(app.clone());
    api.merge(entrip_common::metrics::router(app.registry.clone()))
        .layer(middleware::from_fn_with_state(
            app.metrics.clone(),
            metrics::track,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::Internal(
                "handler panicked".into(),
            ))
        }))
        .layer(TraceLayer::new_for_http())
}

/// Serves until `shutdown` is cancelled, then finishes requests in flight.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Purges expired idempotency keys every `interval` until `shutdown`.
pub async fn purge_loop(pool: PgPool, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match idempotency::purge_expired(&pool, 1000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired idempotency keys purged"),
            Err(err) => tracing::warn!(%err, "idempotency key purge failed; will retry"),
        }
    }
}
