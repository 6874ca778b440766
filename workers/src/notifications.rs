//! The notifications consumer (queue `entrip.notifications`, bound to every
//! event): POSTs each event to every configured subscriber whose topic
//! patterns match, signed per Standard Webhooks. Table
//! `notification_deliveries` records each (event, subscriber): a delivered
//! pair is never sent again, and a message is retried until every matching
//! subscriber answered 2xx, then dead-lettered (its undelivered pairs DEAD).

use std::time::Duration;

use chrono::Utc;
use entrip_common::{
    amqp::{NOTIFICATIONS_QUEUE, topic_matches},
    config::{NotificationsSettings, WebhookSettings},
    signing,
};
use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    event::Event,
    runtime::{Handler, Message, Outcome},
};

pub const CONSUMER: &str = "notifications";

/// A subscriber with its key decoded once.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub url: String,
    key: Vec<u8>,
    patterns: Vec<String>,
}

impl Subscriber {
    pub fn new(hook: &WebhookSettings) -> Option<Self> {
        Some(Self {
            url: hook.url.clone(),
            key: signing::decode_secret(&hook.secret)?,
            patterns: hook.topics.clone(),
        })
    }

    pub fn wants(&self, topic: &str) -> bool {
        self.patterns.iter().any(|p| topic_matches(p, topic))
    }
}

pub struct Notifications {
    pub pool: PgPool,
    pub client: reqwest::Client,
    pub subscribers: Vec<Subscriber>,
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
        })
    }

    /// POSTs the event to one subscriber; `Err` says why it was not a 2xx.
    async fn post(
        &self,
        sub: &Subscriber,
        event_id: &str,
        body: &[u8],
    ) -> Result<u16, (Option<u16>, String)> {
        let timestamp = Utc::now().timestamp();
        let signature = signing::sign(&sub.key, event_id, timestamp, body);
        let resp = self
            .client
            .post(&sub.url)
            .header("content-type", "application/json")
            .header("webhook-id", event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| (None, format!("request failed: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            Ok(status.as_u16())
        } else {
            Err((Some(status.as_u16()), format!("answered {status}")))
        }
    }
}

/// What became of one (event, subscriber) pair.
enum Delivery {
    /// Delivered before: not sent again.
    Already,
    Sent,
    Failed(String),
}

impl Notifications {
    /// Delivers the event to one subscriber at most once: the pair's row is
    /// created and locked first, so that copies of the event handled at the
    /// same time (here or in another worker) wait, then see it DELIVERED.
    async fn deliver(
        &self,
        sub: &Subscriber,
        event: &Event,
        body: &[u8],
    ) -> sqlx::Result<Delivery> {
        let mut tx = self.pool.begin().await?;
        if deliveries::lock(&mut tx, event.id, &sub.url, &event.kind).await? {
            return Ok(Delivery::Already);
        }
        let (code, error) = match self.post(sub, &event.id.to_string(), body).await {
            Ok(code) => (Some(code), None),
            Err((code, error)) => (code, Some(error)),
        };
        deliveries::record(&mut tx, event.id, &sub.url, code, error.as_deref()).await?;
        tx.commit().await?;
        Ok(match error {
            None => Delivery::Sent,
            Some(e) => Delivery::Failed(e),
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
            let mut failures = Vec::new();
            let mut matched = 0;
            let mut sent = 0;
            for sub in self.subscribers.iter().filter(|s| s.wants(&event.kind)) {
                matched += 1;
                match self.deliver(sub, &event, &msg.body).await {
                    Ok(Delivery::Already) => {}
                    Ok(Delivery::Sent) => sent += 1,
                    Ok(Delivery::Failed(error)) => {
                        sent += 1;
                        tracing::warn!(subscriber = %sub.url, %error, "webhook not delivered");
                        failures.push(format!("{}: {error}", sub.url));
                    }
                    // The receiver may get this event again: it dedupes by webhook-id.
                    Err(err) => return Outcome::Retry(format!("database: {err}")),
                }
            }
            if !failures.is_empty() {
                Outcome::Retry(failures.join("; "))
            } else if matched > 0 && sent == 0 {
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
            if let Err(err) = deliveries::mark_dead(&self.pool, event.id, reason).await {
                tracing::warn!(%err, "cannot mark the deliveries dead");
            }
        })
    }
}

/// Table `notification_deliveries`.
pub mod deliveries {
    use super::*;

    /// Creates the pair's row if needed and locks it until the caller's
    /// transaction ends; `true` when it was already delivered.
    pub async fn lock(
        conn: &mut PgConnection,
        event_id: Uuid,
        subscriber: &str,
        topic: &str,
    ) -> sqlx::Result<bool> {
        sqlx::query(
            "INSERT INTO notification_deliveries (id, event_id, subscriber, topic)
             VALUES ($1, $2, $3, $4) ON CONFLICT (event_id, subscriber) DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(event_id)
        .bind(subscriber)
        .bind(topic)
        .execute(&mut *conn)
        .await?;
        let (status,): (String,) = sqlx::query_as(
            "SELECT status FROM notification_deliveries WHERE event_id = $1 AND subscriber = $2 FOR UPDATE",
        )
        .bind(event_id)
        .bind(subscriber)
        .fetch_one(conn)
        .await?;
        Ok(status == "DELIVERED")
    }

    /// Counts an attempt on the locked pair: DELIVERED on a 2xx (`error`
    /// none), else PENDING.
    pub async fn record(
        conn: &mut PgConnection,
        event_id: Uuid,
        subscriber: &str,
        status_code: Option<u16>,
        error: Option<&str>,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE notification_deliveries
                SET attempts = attempts + 1,
                    last_status_code = $3,
                    last_error = $4,
                    status = CASE WHEN $4::text IS NULL THEN 'DELIVERED' ELSE 'PENDING' END,
                    delivered_at = CASE WHEN $4::text IS NULL THEN now() END
              WHERE event_id = $1 AND subscriber = $2",
        )
        .bind(event_id)
        .bind(subscriber)
        .bind(status_code.map(|c| i16::try_from(c).unwrap_or(0)))
        .bind(error)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// The event's undelivered pairs failed for good.
    pub async fn mark_dead(pool: &PgPool, event_id: Uuid, reason: &str) -> sqlx::Result<u64> {
        let done = sqlx::query(
            "UPDATE notification_deliveries SET status = 'DEAD', last_error = $2
              WHERE event_id = $1 AND status = 'PENDING'",
        )
        .bind(event_id)
        .bind(reason)
        .execute(pool)
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
