//! The notifications consumer (queue `entrip.notifications`, bound to every
//! event): POSTs each event to every configured subscriber whose topic
//! patterns match, signed per Standard Webhooks. Table
//! `notification_deliveries` records each (event, subscriber): a delivered
//! pair is never sent again, and a message is retried until every matching
//! subscriber answered 2xx, then dead-lettered (its undelivered pairs DEAD).
//! A copy with header `x-entrip-subscriber` (a redelivery) is for that
//! subscriber alone.

use std::time::Duration;

use backon::Retryable as _;

use chrono::Utc;
use entrip_common::{
    amqp::{NOTIFICATIONS_QUEUE, SUBSCRIBER_HEADER},
    config::{NotificationsSettings, WebhookSettings},
    signing,
    trace::{TRACEPARENT_HEADER, TraceParent},
};
use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    event::Event,
    metrics::WorkerMetrics,
    runtime::{Handler, Message, Outcome},
};

/// The consumer's name: metrics label.
pub const CONSUMER: &str = "notifications";

/// How often `entrip_notifications_undelivered` is refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// How much longer than the POST's timeout a lease runs: a worker stalled
/// beyond it (not dead, only frozen) may see its pair sent by another.
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// How often a copy waiting for another's lease looks again (a query each).
const LEASE_POLL: Duration = Duration::from_millis(200);

/// Retries of the record after a POST: a record lost after a 2xx sends the
/// webhook again once the lease runs out, so a passing database error is
/// retried first (after 100 ms, 400 ms, 1.6 s).
fn record_backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_factor(4.0)
        .with_max_times(3)
}

/// A subscriber with its key decoded once.
#[derive(Debug, Clone)]
struct Subscriber {
    hook: WebhookSettings,
    key: Vec<u8>,
}

impl Subscriber {
    /// `None` when the secret is not `whsec_` + base64.
    fn new(hook: &WebhookSettings) -> Option<Self> {
        Some(Self {
            key: signing::decode_secret(&hook.secret)?,
            hook: hook.clone(),
        })
    }

    fn url(&self) -> &str {
        &self.hook.url
    }
}

/// The notifications handler.
pub struct Notifications {
    pool: PgPool,
    client: reqwest::Client,
    subscribers: Vec<Subscriber>,
    /// How long a pair is leased for one POST: its timeout + [`LEASE_MARGIN`].
    lease: Duration,
}

/// Why a POST was not a delivery.
struct NotDelivered {
    /// The receiver's status, when it answered.
    status_code: Option<u16>,
    reason: String,
}

/// What became of one (event, subscriber) pair.
enum PairOutcome {
    /// Delivered before: not sent again.
    AlreadyDelivered,
    /// Sent now and answered 2xx.
    Delivered,
    /// Sent now and not answered 2xx: the reason.
    Failed(String),
}

impl Notifications {
    pub fn new(pool: PgPool, settings: &NotificationsSettings) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            // A redirect would turn the POST into a GET without the body: a
            // 3xx is a failure, not a delivery.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            pool,
            client,
            subscribers: settings
                .webhooks
                .iter()
                .filter_map(Subscriber::new)
                .collect(),
            lease: Duration::from_millis(settings.timeout_ms) + LEASE_MARGIN,
        })
    }

    /// POSTs the event to one subscriber: its 2xx status, or why not.
    async fn post(
        &self,
        sub: &Subscriber,
        event_id: &str,
        body: &[u8],
        traceparent: Option<&TraceParent>,
    ) -> Result<u16, NotDelivered> {
        let timestamp = Utc::now().timestamp();
        let signature = signing::sign(&sub.key, event_id, timestamp, body);
        let mut request = self
            .client
            .post(sub.url())
            .header("content-type", "application/json")
            .header("webhook-id", event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature);
        // The webhook request is the next hop of the event's trace.
        if let Some(tp) = traceparent {
            request = request.header(TRACEPARENT_HEADER, tp.child().to_string());
        }
        let resp = request
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| NotDelivered {
                status_code: None,
                reason: format!("request failed: {e}"),
            })?;
        let status = resp.status();
        if status.is_success() {
            Ok(status.as_u16())
        } else {
            Err(NotDelivered {
                status_code: Some(status.as_u16()),
                reason: format!("answered {status}"),
            })
        }
    }

    /// Delivers the event to one subscriber, once per 2xx: the pair is
    /// leased first (its own statement, committed), then POSTed with no
    /// database connection held, then the outcome is recorded. A copy of
    /// the event handled at the same time (here or in another worker) finds
    /// the lease and waits for it to end, then sees the pair delivered. A
    /// worker that dies between the receiver's 2xx and the record leaves the
    /// lease to run out: the next copy sends once more (receivers dedupe by
    /// `webhook-id`).
    async fn deliver(
        &self,
        sub: &Subscriber,
        event: &Event,
        msg: &Message,
    ) -> sqlx::Result<PairOutcome> {
        let owner = uuid::Uuid::new_v4();
        loop {
            match deliveries::claim(&self.pool, event, sub.url(), owner, self.lease).await? {
                deliveries::Claim::AlreadyDelivered => return Ok(PairOutcome::AlreadyDelivered),
                deliveries::Claim::Leased => break,
                deliveries::Claim::Busy(left) => {
                    tracing::debug!(subscriber = %sub.url(), ?left, "another copy is being sent; waiting for its outcome");
                    tokio::time::sleep(left.clamp(Duration::from_millis(20), LEASE_POLL)).await;
                }
            }
        }
        let (status_code, failure) = match self
            .post(
                sub,
                &event.id.to_string(),
                &msg.body,
                msg.traceparent.as_ref(),
            )
            .await
        {
            Ok(code) => (Some(code), None),
            Err(not) => (not.status_code, Some(not.reason)),
        };
        (|| {
            deliveries::record_attempt(
                &self.pool,
                event,
                sub.url(),
                owner,
                status_code,
                failure.as_deref(),
            )
        })
        .retry(record_backoff())
        .notify(|err, wait| {
            tracing::warn!(subscriber = %sub.url(), %err, ?wait, "cannot record the webhook's outcome; again");
        })
        .await?;
        Ok(match failure {
            None => PairOutcome::Delivered,
            Some(reason) => PairOutcome::Failed(reason),
        })
    }
}

impl Handler for Notifications {
    fn name(&self) -> &'static str {
        CONSUMER
    }

    fn queue(&self) -> &'static str {
        NOTIFICATIONS_QUEUE
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let event = match Event::parse(msg) {
                Ok(e) => e,
                Err(reason) => return Outcome::Poison(reason),
            };
            // A redelivery is for one subscriber (`dispatcher
            // notifications redeliver`); it must be one of ours.
            let only = msg.header_text(SUBSCRIBER_HEADER);
            if let Some(url) = &only
                && !self.subscribers.iter().any(|s| s.url() == url.as_str())
            {
                return Outcome::Poison(format!(
                    "a redelivery for {url}, which is not a configured subscriber here"
                ));
            }
            let mut failures = Vec::new();
            let mut matched = 0;
            // Pairs sent now, whatever the receiver answered.
            let mut attempted = 0;
            let chosen = self.subscribers.iter().filter(|s| {
                s.hook.wants(&event.kind) && only.as_ref().is_none_or(|url| s.url() == url.as_str())
            });
            for sub in chosen {
                matched += 1;
                match self.deliver(sub, &event, msg).await {
                    Ok(PairOutcome::AlreadyDelivered) => {}
                    Ok(PairOutcome::Delivered) => attempted += 1,
                    Ok(PairOutcome::Failed(reason)) => {
                        attempted += 1;
                        tracing::warn!(subscriber = %sub.url(), %reason, "webhook not delivered");
                        failures.push(format!("{}: {reason}", sub.url()));
                    }
                    // The receiver may get this event again: it dedupes by webhook-id.
                    Err(err) => return Outcome::Retry(format!("database: {err}")),
                }
            }
            if !failures.is_empty() {
                Outcome::Retry(failures.join("; "))
            } else if matched > 0 && attempted == 0 {
                // Every matching subscriber had it already: a redelivery.
                Outcome::Duplicate
            } else {
                Outcome::Processed
            }
        })
    }

    fn dead_lettered<'a>(&'a self, msg: &'a Message, reason: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Ok(event) = Event::parse(msg) else {
                return;
            };
            // A redelivery's copy gives up on its own subscriber only.
            let only = msg.header_text(SUBSCRIBER_HEADER);
            if let Err(err) =
                deliveries::mark_dead(&self.pool, &event, reason, only.as_deref()).await
            {
                tracing::warn!(%err, "cannot mark the deliveries dead");
            }
        })
    }
}

/// Refreshes `entrip_notifications_undelivered` every 5 s until `shutdown`.
pub async fn undelivered_gauge_loop(
    pool: PgPool,
    metrics: WorkerMetrics,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match deliveries::undelivered(&pool).await {
            Ok(n) => metrics.notifications_undelivered.set(n),
            Err(err) => tracing::warn!(%err, "cannot refresh the undelivered gauge"),
        }
    }
}

/// Table `notification_deliveries`: one row per (event, subscriber).
pub mod deliveries {
    use std::time::Duration;

    use chrono::{DateTime, Utc};
    use sqlx::{PgConnection, PgPool};
    use uuid::Uuid;

    use crate::event::Event;

    /// An (event, subscriber) pair as [`claim`] found it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Claim {
        /// Delivered before: nothing to send.
        AlreadyDelivered,
        /// Leased to the caller: send it, then [`record_attempt`].
        Leased,
        /// Another copy holds the lease for this much longer.
        Busy(Duration),
    }

    /// Creates the pair's row if needed and leases it to `owner` for
    /// `lease`, unless it was delivered or another lease still runs. One
    /// statement, committed at once: nothing stays locked.
    pub(crate) async fn claim(
        pool: &PgPool,
        event: &Event,
        subscriber: &str,
        owner: Uuid,
        lease: Duration,
    ) -> sqlx::Result<Claim> {
        let leased = sqlx::query(
            "INSERT INTO notification_deliveries
                    (id, event_id, subscriber, topic, lease_owner, lease_until)
             VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
             ON CONFLICT (event_id, subscriber) DO UPDATE
                SET lease_owner = EXCLUDED.lease_owner, lease_until = EXCLUDED.lease_until
              WHERE notification_deliveries.status <> 'DELIVERED'
                AND (notification_deliveries.lease_until IS NULL
                     OR notification_deliveries.lease_until <= now())",
        )
        .bind(Uuid::now_v7())
        .bind(event.id)
        .bind(subscriber)
        .bind(&event.kind)
        .bind(owner)
        .bind(lease.as_secs_f64())
        .execute(pool)
        .await?
        .rows_affected()
            == 1;
        if leased {
            return Ok(Claim::Leased);
        }
        let (delivered, left): (bool, Option<f64>) = sqlx::query_as(
            "SELECT status = 'DELIVERED',
                    extract(epoch FROM lease_until - now())::float8
               FROM notification_deliveries WHERE event_id = $1 AND subscriber = $2",
        )
        .bind(event.id)
        .bind(subscriber)
        .fetch_one(pool)
        .await?;
        Ok(if delivered {
            Claim::AlreadyDelivered
        } else {
            // A lease that ended between the two statements: claim again.
            Claim::Busy(Duration::from_secs_f64(left.unwrap_or(0.0).max(0.0)))
        })
    }

    /// Counts an attempt and ends `owner`'s lease: DELIVERED on a 2xx
    /// (`failure` none) while the lease is still `owner`'s, else PENDING
    /// (a DEAD pair sent again by a DLQ replay is being retried), never
    /// undoing a delivery. A lease taken away meanwhile (by [`reopen`], or
    /// by another copy after it ran out) leaves the pair to that one: a
    /// redelivery the operator asked for during this POST still goes out.
    pub(crate) async fn record_attempt(
        pool: &PgPool,
        event: &Event,
        subscriber: &str,
        owner: Uuid,
        status_code: Option<u16>,
        failure: Option<&str>,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE notification_deliveries
                SET attempts = attempts + 1,
                    last_status_code = $4,
                    last_error = $5,
                    status = CASE WHEN $5::text IS NULL AND lease_owner = $3 THEN 'DELIVERED'
                                  WHEN status = 'DELIVERED' THEN 'DELIVERED'
                                  ELSE 'PENDING' END,
                    delivered_at = CASE WHEN $5::text IS NULL AND lease_owner = $3
                                        THEN coalesce(delivered_at, now())
                                        ELSE delivered_at END,
                    lease_owner = CASE WHEN lease_owner = $3 THEN NULL ELSE lease_owner END,
                    lease_until = CASE WHEN lease_owner = $3 THEN NULL ELSE lease_until END
              WHERE event_id = $1 AND subscriber = $2",
        )
        .bind(event.id)
        .bind(subscriber)
        .bind(owner)
        .bind(status_code.map(|c| i16::try_from(c).unwrap_or(0)))
        .bind(failure)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The event's undelivered pairs (of subscriber `only`, when given)
    /// failed for good: DEAD, with `reason`.
    pub(crate) async fn mark_dead(
        pool: &PgPool,
        event: &Event,
        reason: &str,
        only: Option<&str>,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE notification_deliveries SET status = 'DEAD', last_error = $2
              WHERE event_id = $1 AND status = 'PENDING' AND ($3::text IS NULL OR subscriber = $3)",
        )
        .bind(event.id)
        .bind(reason)
        .bind(only)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// One (event, subscriber) pair as an operator sees it.
    #[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
    pub struct DeliveryRecord {
        pub event_id: Uuid,
        pub subscriber: String,
        pub topic: String,
        /// `PENDING` (being retried), `DELIVERED` or `DEAD`.
        pub status: String,
        pub attempts: i32,
        pub last_status_code: Option<i16>,
        pub last_error: Option<String>,
        pub delivered_at: Option<DateTime<Utc>>,
        pub updated_at: DateTime<Utc>,
    }

    /// The recorded pairs of these events (`dispatcher trace`), by event
    /// then subscriber: one index lookup per event.
    pub async fn for_events(
        conn: &mut PgConnection,
        events: &[Uuid],
    ) -> sqlx::Result<Vec<DeliveryRecord>> {
        sqlx::query_as(
            "SELECT event_id, subscriber, topic, status, attempts, last_status_code, last_error,
                    delivered_at, updated_at
               FROM notification_deliveries WHERE event_id = ANY($1)
              ORDER BY created_at, subscriber",
        )
        .bind(events)
        .fetch_all(conn)
        .await
    }

    /// Reopens the pairs of these events for one subscriber, delivered or
    /// dead, so that the next copy of the event the consumer handles sends
    /// them again (`dispatcher notifications redeliver`); a pair never
    /// tried is created PENDING. In the caller's transaction: the rows stay
    /// locked until it ends, so a worker handling a copy waits for the
    /// commit (and a rollback leaves the pairs as they were). Returns how
    /// many pairs are open.
    pub async fn reopen(
        conn: &mut PgConnection,
        events: &[(Uuid, String)],
        subscriber: &str,
    ) -> sqlx::Result<u64> {
        let (ids, topics): (Vec<Uuid>, Vec<&str>) = events
            .iter()
            .map(|(id, topic)| (*id, topic.as_str()))
            .unzip();
        let done = sqlx::query(
            "INSERT INTO notification_deliveries (id, event_id, subscriber, topic, last_error)
             SELECT gen_random_uuid(), e.id, $3, e.topic, 'redelivery requested'
               FROM unnest($1::uuid[], $2::text[]) AS e(id, topic)
             ON CONFLICT (event_id, subscriber) DO UPDATE
                SET status = 'PENDING', delivered_at = NULL, lease_owner = NULL,
                    lease_until = NULL, last_error = 'redelivery requested',
                    updated_at = now()",
        )
        .bind(ids)
        .bind(topics)
        .bind(subscriber)
        .execute(conn)
        .await?;
        Ok(done.rows_affected())
    }

    /// Pairs that failed for good: `entrip_notifications_undelivered`.
    pub async fn undelivered(pool: &PgPool) -> sqlx::Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM notification_deliveries WHERE status = 'DEAD'")
            .fetch_one(pool)
            .await
    }
}
