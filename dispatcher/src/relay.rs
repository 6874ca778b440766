//! The relay loop: woken by NOTIFY (or the polling interval), it claims a
//! batch of due outbox rows, publishes it with confirms, and marks the
//! confirmed rows published in the same transaction that holds their locks.
//! A crash at any point leaves the rows unpublished, to be sent again.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use entrip_common::{
    amqp,
    config::{AmqpSettings, DispatcherSettings},
};
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::RelayMetrics,
    outbox::{self, Failure},
    publisher::{Outcome, Publisher},
};

/// The NOTIFY channel that outbox inserts signal (see the migrations).
const CHANNEL: &str = "entrip_outbox";

#[derive(Clone)]
pub struct Relay {
    pub pool: PgPool,
    pub amqp: AmqpSettings,
    pub settings: DispatcherSettings,
    pub metrics: RelayMetrics,
    /// Names the broker connection (several dispatchers may run).
    pub name: String,
}

/// What one turn of a lane did.
enum Batch {
    /// Claimed (and relayed) this many rows.
    Relayed(usize),
    /// Every batch slot of the fleet was taken (`dispatcher.fleet_lanes`).
    Standby,
}

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(String),
}

impl Relay {
    /// Runs `lanes` relay loops until `shutdown`; the batches in flight are
    /// finished first. Lanes order themselves like separate dispatchers do:
    /// the claim skips locked rows and rows behind them.
    pub async fn run(self, shutdown: CancellationToken) {
        let wakes: Vec<Arc<Notify>> = (0..self.settings.lanes.max(1))
            .map(|_| Arc::new(Notify::new()))
            .collect();
        let listener = tokio::spawn(listen(self.pool.clone(), wakes.clone(), shutdown.clone()));
        let lanes = wakes.into_iter().enumerate().map(|(i, wake)| {
            let lane = Relay {
                name: format!("{}-lane{i}", self.name),
                ..self.clone()
            };
            supervise(lane, wake, shutdown.clone())
        });
        futures::future::join_all(lanes).await;
        listener.abort();
        tracing::info!("relay stopped");
    }

    async fn run_lane(self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let mut publisher: Option<Publisher> = None;
        let mut db_backoff = retry_backoff().build();
        while !shutdown.is_cancelled() {
            let Some(current) = publisher.as_ref() else {
                let Some(conn) = amqp::connect_with_retry(&self.amqp, &self.name, &shutdown).await
                else {
                    break;
                };
                match Publisher::connect(conn, &self.amqp).await {
                    Ok(p) => {
                        tracing::info!("connected to RabbitMQ; topology declared");
                        publisher = Some(p);
                    }
                    Err(err) => {
                        amqp::log_setup_error(&err, "cannot set up the publishing channel");
                        sleep_or_shutdown(Duration::from_secs(1), &shutdown).await;
                    }
                }
                continue;
            };
            match self.relay_batch(current).await {
                Ok(Batch::Standby) => {
                    db_backoff = retry_backoff().build();
                    // Not woken by NOTIFY: the lanes holding the slots
                    // relay what it announces.
                    sleep_or_shutdown(poll, &shutdown).await;
                }
                Ok(Batch::Relayed(claimed)) => {
                    db_backoff = retry_backoff().build();
                    if claimed == 0 {
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = wake.notified() => {}
                            _ = tokio::time::sleep(poll) => {}
                        }
                    }
                }
                Err(BatchError::Broker(reason)) => {
                    tracing::warn!(%reason, "broker connection lost; reconnecting");
                    if let Some(p) = publisher.take() {
                        p.close().await;
                    }
                }
                Err(BatchError::Database(err)) => {
                    let wait = db_backoff.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(%err, ?wait, "database error in the relay; retrying");
                    sleep_or_shutdown(wait, &shutdown).await;
                }
            }
        }
        if let Some(p) = publisher {
            p.close().await;
        }
    }

    /// One batch: take a slot, claim, publish, await confirms, mark — in
    /// one transaction.
    async fn relay_batch(&self, publisher: &Publisher) -> Result<Batch, BatchError> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        if !outbox::take_slot(&mut tx, self.settings.fleet_lanes).await? {
            tx.commit().await?;
            tracing::debug!(
                fleet_lanes = self.settings.fleet_lanes,
                "every batch slot is taken; standing by"
            );
            return Ok(Batch::Standby);
        }
        let rows = outbox::claim(&mut tx, self.settings.batch_size).await?;
        let claimed_at = started.elapsed();
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Batch::Relayed(0));
        }
        let timeout = Duration::from_millis(self.settings.confirm_timeout_ms);
        let report = publisher.publish(&rows, timeout).await;
        let published_at = started.elapsed();

        let mut confirmed = Vec::new();
        let mut failures = Vec::new();
        for (row, outcome) in rows.iter().zip(&report.outcomes) {
            match outcome {
                Outcome::Confirmed => confirmed.push(row.id),
                Outcome::Refused(error) => {
                    tracing::warn!(event_id = %row.id, topic = %row.topic, attempt = row.attempts + 1, %error, "publish refused");
                    failures.push(Failure {
                        id: row.id,
                        error: error.clone(),
                        retry_in: self.retry_delay(row.attempts),
                    });
                }
                Outcome::Unknown => {}
            }
        }
        outbox::mark_published(&mut tx, &confirmed).await?;
        let dead = outbox::mark_failed(&mut tx, &failures, self.settings.max_attempts).await?;
        let marked_at = started.elapsed();
        tx.commit().await?;
        let committed_at = started.elapsed();

        let now = Utc::now();
        for (row, outcome) in rows.iter().zip(&report.outcomes) {
            if *outcome == Outcome::Confirmed {
                self.metrics
                    .published
                    .with_label_values(&[row.topic.as_str()])
                    .inc();
                let age = (now - row.created_at).num_microseconds().unwrap_or(0);
                self.metrics.latency.observe(age as f64 / 1e6);
            }
        }
        self.metrics.failures.inc_by(failures.len() as u64);
        for (id, topic) in &dead {
            tracing::error!(event_id = %id, %topic, "outbox row is dead after {} attempts; `dispatcher outbox redrive` brings it back", self.settings.max_attempts);
        }
        tracing::debug!(
            claimed = rows.len(),
            confirmed = confirmed.len(),
            refused = failures.len(),
            claim_ms = claimed_at.as_millis() as u64,
            publish_ms = (published_at - claimed_at).as_millis() as u64,
            mark_ms = (marked_at - published_at).as_millis() as u64,
            commit_ms = (committed_at - marked_at).as_millis() as u64,
            "batch relayed"
        );
        match report.reset {
            Some(reason) => Err(BatchError::Broker(reason)),
            None => Ok(Batch::Relayed(rows.len())),
        }
    }

    /// Exponential backoff with jitter for the `attempts`-th failure.
    fn retry_delay(&self, attempts: i32) -> Duration {
        let n = usize::try_from(attempts).unwrap_or(0);
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.settings.backoff_min_ms))
            .with_max_delay(Duration::from_millis(self.settings.backoff_max_ms))
            .with_jitter()
            .without_max_times()
            .build()
            .nth(n)
            .unwrap_or(Duration::from_millis(self.settings.backoff_max_ms))
    }
}

/// Runs a lane until `shutdown`, starting it again if it panics: its
/// transaction rolled back, so its rows go again.
async fn supervise(lane: Relay, wake: Arc<Notify>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let run = tokio::spawn(lane.clone().run_lane(wake.clone(), shutdown.clone()));
        match run.await {
            Ok(()) => return,
            Err(err) => {
                tracing::error!(lane = %lane.name, %err, "relay lane failed; starting it again");
                sleep_or_shutdown(Duration::from_secs(1), &shutdown).await;
            }
        }
    }
}

fn retry_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

async fn sleep_or_shutdown(wait: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}

/// Wakes the relay on every NOTIFY. Only a hint: notifications sent while
/// the listener reconnects are lost, and polling covers them.
async fn listen(pool: PgPool, wakes: Vec<Arc<Notify>>, shutdown: CancellationToken) {
    let wake_all = || wakes.iter().for_each(|w| w.notify_one());
    let mut backoff = retry_backoff().build();
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(err) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::debug!(%err, "LISTEN connection failed; polling meanwhile");
                sleep_or_shutdown(wait, &shutdown).await;
                continue;
            }
        };
        if let Err(err) = listener.listen(CHANNEL).await {
            tracing::debug!(%err, "LISTEN failed; polling meanwhile");
            sleep_or_shutdown(Duration::from_secs(1), &shutdown).await;
            continue;
        }
        backoff = retry_backoff().build();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(_)) => wake_all(),
                    // Reconnected: wake in case something was missed.
                    Ok(None) => wake_all(),
                    Err(err) => {
                        tracing::debug!(%err, "LISTEN connection lost");
                        break;
                    }
                }
            }
        }
    }
}

/// Refreshes the outbox gauges and purges old published rows until `shutdown`.
pub async fn housekeeping(
    pool: PgPool,
    settings: DispatcherSettings,
    metrics: RelayMetrics,
    shutdown: CancellationToken,
) {
    let mut stats_tick = tokio::time::interval(Duration::from_secs(settings.stats_interval_secs));
    let mut purge_tick =
        tokio::time::interval(Duration::from_secs(settings.purge_interval_secs.max(1)));
    let retention = Duration::from_secs(settings.retention_hours * 3600);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = stats_tick.tick() => match outbox::stats(&pool).await {
                Ok(stats) => metrics.set_stats(&stats),
                Err(err) => tracing::warn!(%err, "cannot refresh outbox gauges"),
            },
            _ = purge_tick.tick() => match outbox::purge_published(&pool, retention, 1000).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "published outbox rows past retention deleted"),
                Err(err) => tracing::warn!(%err, "outbox retention purge failed"),
            },
        }
    }
}
