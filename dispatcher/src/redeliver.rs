//! `dispatcher notifications redeliver`: sends one booking's notifications
//! again to one subscriber. The webhooks themselves are still sent by the
//! workers, signed and recorded as always: this reopens the subscriber's
//! (event, subscriber) pairs (`entrip_workers::notifications::deliveries`)
//! and publishes each event again, as the relay did, straight to the queue
//! `entrip.notifications` (the default exchange), so that the settlement
//! consumer and downstream subscribers of `entrip.events` do not see it
//! twice. Subscribers that already have an event are skipped by the
//! workers as ever; one that never got it gets it too (it was owed).

use std::time::Duration;

use entrip_common::{
    amqp::{NOTIFICATIONS_QUEUE, topic_matches},
    config::WebhookSettings,
};
use entrip_workers::notifications::deliveries;
use lapin::{
    Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use sqlx::PgPool;

use crate::{
    outbox, publisher,
    trace::{self, Target, TraceError},
};

/// How long the broker may take to confirm one message.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RedeliverError {
    #[error(
        "{0} is not a configured subscriber (notifications.webhooks): the workers would not send to it"
    )]
    UnknownSubscriber(String),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error("the broker did not confirm the event {0}; its pair stays open: run the command again")]
    NotConfirmed(uuid::Uuid),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

/// What a redelivery did.
#[derive(Debug, Default)]
pub struct Redelivered {
    /// The events published again: (event id, topic).
    pub sent: Vec<(uuid::Uuid, String)>,
    /// Events of the subscriber's topics that could not be: (event id,
    /// why). Not published yet or dead: the relay or a redrive sends them;
    /// deleted after retention: nothing left to send.
    pub skipped: Vec<(uuid::Uuid, String)>,
}

/// Reopens and republishes the events of `booking` (id or code) that
/// `subscriber` wants (and that match `topic`, a pattern, when given).
pub async fn redeliver(
    pool: &PgPool,
    channel: &Channel,
    booking: &str,
    subscriber: &str,
    topic: Option<&str>,
    webhooks: &[WebhookSettings],
) -> Result<Redelivered, RedeliverError> {
    let hook = webhooks
        .iter()
        .find(|h| h.url == subscriber)
        .ok_or_else(|| RedeliverError::UnknownSubscriber(subscriber.to_owned()))?;
    let found = trace::trace(pool, &Target::Booking(booking.to_owned()), webhooks).await?;
    let mut done = Redelivered::default();
    let mut chosen = Vec::new();
    for event in &found.events {
        let Some(kind) = event.topic.as_deref() else {
            continue;
        };
        let wanted = hook.topics.iter().any(|p| topic_matches(p, kind))
            && topic.is_none_or(|t| topic_matches(t, kind));
        if !wanted {
            continue;
        }
        match event.state {
            "published" => chosen.push(event.id),
            state => done.skipped.push((event.id, format!("{kind} is {state}"))),
        }
    }
    let mut conn = pool.acquire().await?;
    let rows = outbox::published_rows(&mut conn, &chosen).await?;
    drop(conn);
    let pairs: Vec<(uuid::Uuid, String)> = rows.iter().map(|r| (r.id, r.topic.clone())).collect();
    // Open first: a copy handled before its pair is open would be skipped
    // as delivered. An open pair without its copy (a crash or a refused
    // publish below) shows as PENDING in `dispatcher trace`; running the
    // command again sends it.
    deliveries::reopen(pool, &pairs, subscriber).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for row in &rows {
        let confirm = channel
            .basic_publish(
                "".into(),
                NOTIFICATIONS_QUEUE.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                row.payload.as_bytes(),
                publisher::properties(row),
            )
            .await?;
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => {}
            Ok(Err(err)) => return Err(err.into()),
            _ => return Err(RedeliverError::NotConfirmed(row.id)),
        }
        tracing::info!(event_id = %row.id, topic = %row.topic, %subscriber, "notification sent again");
        done.sent.push((row.id, row.topic.clone()));
    }
    Ok(done)
}
