//! Entrip workers: the settlement and notification consumers (each effect
//! exactly once in effect), their shared runtime, and the integrity checker.

pub mod event;
pub mod inbox;
pub mod integrity;
pub mod metrics;
pub mod notifications;
pub mod runtime;
pub mod settlement;

use std::time::Duration;

use entrip_common::config::IntegritySettings;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::WorkerMetrics;

/// Runs the integrity checks every `interval_secs`, exports them, and posts
/// a report to the alert webhook when one finds violations.
pub async fn integrity_loop(
    pool: PgPool,
    settings: IntegritySettings,
    metrics: WorkerMetrics,
    shutdown: CancellationToken,
) {
    let client = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_secs(settings.interval_secs));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match check_once(&pool, &settings, &metrics, &client).await {
            Ok(report) if report.violations() > 0 => {
                tracing::error!(
                    violations = report.violations(),
                    "integrity check failed:\n{}",
                    report.render()
                );
            }
            Ok(_) => tracing::info!("integrity check passed"),
            Err(err) => tracing::warn!(%err, "integrity check could not run"),
        }
    }
}

/// One integrity run: checks, gauges, alert.
pub async fn check_once(
    pool: &PgPool,
    settings: &IntegritySettings,
    metrics: &WorkerMetrics,
    client: &reqwest::Client,
) -> sqlx::Result<integrity::Report> {
    let report = integrity::run(
        pool,
        Duration::from_secs(settings.settle_grace_secs),
        Duration::from_secs(settings.outbox_max_age_secs),
    )
    .await?;
    integrity::export(&report, metrics);
    if report.violations() > 0
        && let Some(url) = &settings.alert_webhook
        && let Err(err) = client
            .post(url)
            .timeout(Duration::from_secs(10))
            .json(&report)
            .send()
            .await
    {
        tracing::warn!(%err, "cannot post the integrity alert");
    }
    Ok(report)
}

/// Refreshes `entrip_notifications_undelivered` every 5 s.
pub async fn gauges_loop(pool: PgPool, metrics: WorkerMetrics, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match notifications::deliveries::undelivered(&pool).await {
            Ok(n) => metrics.notifications_undelivered.set(n),
            Err(err) => tracing::warn!(%err, "cannot refresh the undelivered gauge"),
        }
    }
}
