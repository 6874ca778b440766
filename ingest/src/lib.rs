//! Entrip ingest: the HTTP API that validates requests from upstream systems
//! and stores each accepted change with its audit row, its outbox event and
//! its idempotency record in one PostgreSQL transaction.

pub mod commands;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod metrics;
pub mod routes;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    http::StatusCode,
    middleware,
    routing::{get, post},
};
use entrip_common::{config::IngestSettings, domain::IdempotencyKey};
use prometheus::Registry;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{catch_panic::CatchPanicLayer, timeout::TimeoutLayer, trace::TraceLayer};

use crate::{
    commands::{Command, Context},
    error::ApiError,
    idempotency::{Claim, Fingerprint, StoredResponse},
    metrics::IngestMetrics,
};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct App {
    pub pool: PgPool,
    pub settings: Arc<IngestSettings>,
    pub metrics: IngestMetrics,
    pub registry: Registry,
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
}

/// The answer to a submitted command.
#[derive(Debug)]
pub struct Outcome {
    pub status: StatusCode,
    pub body: serde_json::Value,
    /// True when the answer was stored by an earlier request with the key.
    pub replayed: bool,
}

/// Runs `command` exactly once per idempotency key: claim the key, run the
/// effect, store the response, commit — all in one transaction.
pub async fn submit(
    app: &App,
    key: &IdempotencyKey,
    fingerprint: &Fingerprint,
    command: Command,
    ctx: &Context,
) -> Result<Outcome, ApiError> {
    let ttl = Duration::from_secs(app.settings.idempotency_ttl_secs);
    let mut command = Some(command);
    if let Some(claim) = idempotency::replay_committed(&app.pool, key, fingerprint).await?
        && let Some(answer) = settled(claim, key)
    {
        return answer;
    }
    for _ in 0..3 {
        let mut tx = app.pool.begin().await?;
        match idempotency::claim(&mut tx, key, fingerprint, ttl).await? {
            Claim::Claimed => {
                let Some(command) = command.take() else {
                    break;
                };
                let reply = commands::execute(&mut tx, command, ctx).await?;
                let stored = StoredResponse {
                    status: reply.status.as_u16(),
                    body: reply.body,
                };
                idempotency::complete(&mut tx, key, &stored).await?;
                tx.commit().await?;
                return Ok(Outcome {
                    status: reply.status,
                    body: stored.body,
                    replayed: false,
                });
            }
            Claim::Retry => continue,
            claim => {
                if let Some(answer) = settled(claim, key) {
                    return answer;
                }
            }
        }
    }
    Err(ApiError::Unavailable(
        "the idempotency key kept changing under this request".into(),
    ))
}

/// The answer for a key used before: its stored response, or misuse.
fn settled(claim: Claim, key: &IdempotencyKey) -> Option<Result<Outcome, ApiError>> {
    match claim {
        Claim::Replay(stored) => {
            tracing::info!(idempotency_key = %key, "replaying the stored response");
            Some(Ok(Outcome {
                status: StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK),
                body: stored.body,
                replayed: true,
            }))
        }
        Claim::Mismatch(detail) => Some(Err(ApiError::IdempotencyMisuse(detail.to_owned()))),
        Claim::Claimed | Claim::Retry => None,
    }
}

/// The full router: API, health, readiness and metrics.
pub fn router(app: App) -> Router {
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
