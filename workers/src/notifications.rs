//! The notifications consumer (queue `entrip.notifications`, bound to every
//! event): POSTs each event to every configured subscriber whose topic
//! patterns match, signed per Standard Webhooks. Table
//! `notification_deliveries` records each (event, subscriber): a delivered
//! pair is never sent again, and a message is retried until every matching
//! subscriber answered 2xx, then dead-lettered (its undelivered pairs DEAD).

use std::time::Duration;

use chrono::Utc;
use entrip_common::{
    amqp::NOTIFICATIONS_QUEUE,
    config::{NotificationsSettings, WebhookSettings},
    signing,
};
use futures::future::BoxFuture;
use sqlx::PgPool;
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

/// AMQP-style topic patterns: `*` is one dot-separated word, `#` zero or more.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    fn go(p: &[&str], t: &[&str]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let t: Vec<&str> = topic.split('.').collect();
    go(&p, &t)
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
            let event_id = event.id.to_string();
            let mut failures = Vec::new();
            let mut matched = 0;
            let mut sent = 0;
            for sub in self.subscribers.iter().filter(|s| s.wants(&event.kind)) {
                matched += 1;
                match deliveries::delivered(&self.pool, event.id, &sub.url).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(err) => return Outcome::Retry(format!("database: {err}")),
                }
                let result = self.post(sub, &event_id, &msg.body).await;
                sent += 1;
                let recorded = match &result {
                    Ok(code) => {
                        deliveries::record(
                            &self.pool,
                            event.id,
                            &sub.url,
                            &event.kind,
                            Some(*code),
                            None,
                        )
                        .await
                    }
                    Err((code, error)) => {
                        tracing::warn!(subscriber = %sub.url, %error, "webhook not delivered");
                        failures.push(format!("{}: {error}", sub.url));
                        deliveries::record(
                            &self.pool,
                            event.id,
                            &sub.url,
                            &event.kind,
                            *code,
                            Some(error),
                        )
                        .await
                    }
                };
                if let Err(err) = recorded {
                    // The receiver may get this event again: it dedupes by webhook-id.
                    return Outcome::Retry(format!("cannot record the delivery: {err}"));
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

    pub async fn delivered(pool: &PgPool, event_id: Uuid, subscriber: &str) -> sqlx::Result<bool> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT status FROM notification_deliveries WHERE event_id = $1 AND subscriber = $2",
        )
        .bind(event_id)
        .bind(subscriber)
        .fetch_optional(pool)
        .await?;
        Ok(row.is_some_and(|(s,)| s == "DELIVERED"))
    }

    /// Counts an attempt: DELIVERED on a 2xx (`error` none), else PENDING.
    pub async fn record(
        pool: &PgPool,
        event_id: Uuid,
        subscriber: &str,
        topic: &str,
        status_code: Option<u16>,
        error: Option<&str>,
    ) -> sqlx::Result<()> {
        let delivered = error.is_none();
        sqlx::query(
            "INSERT INTO notification_deliveries
                    (id, event_id, subscriber, topic, status, attempts, last_status_code, last_error, delivered_at)
             VALUES ($1, $2, $3, $4, CASE WHEN $7 THEN 'DELIVERED' ELSE 'PENDING' END, 1, $5, $6,
                     CASE WHEN $7 THEN now() END)
             ON CONFLICT (event_id, subscriber) DO UPDATE
                SET attempts = notification_deliveries.attempts + 1,
                    last_status_code = EXCLUDED.last_status_code,
                    last_error = EXCLUDED.last_error,
                    status = CASE WHEN notification_deliveries.status = 'DELIVERED' OR $7
                                  THEN 'DELIVERED' ELSE 'PENDING' END,
                    delivered_at = COALESCE(notification_deliveries.delivered_at, EXCLUDED.delivered_at)",
        )
        .bind(Uuid::now_v7())
        .bind(event_id)
        .bind(subscriber)
        .bind(topic)
        .bind(status_code.map(|c| i16::try_from(c).unwrap_or(0)))
        .bind(error)
        .bind(delivered)
        .execute(pool)
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

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn topic_patterns() {
        assert!(topic_matches("booking.*", "booking.created"));
        assert!(!topic_matches("booking.*", "payment.approved"));
        assert!(topic_matches("#", "settlement.recorded"));
        assert!(topic_matches("settlement.recorded", "settlement.recorded"));
        assert!(topic_matches("*.approved", "payment.approved"));
        assert!(!topic_matches("*", "payment.approved"));
        assert!(topic_matches("payment.#", "payment.approved"));
    }
}
