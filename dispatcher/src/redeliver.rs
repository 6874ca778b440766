//! `dispatcher notifications redeliver`: sends one booking's notifications
//! again to one subscriber. The webhooks themselves are still sent by the
//! workers, signed and recorded as always: this reopens the subscriber's
//! (event, subscriber) pairs (`entrip_workers::notifications::deliveries`)
//! and publishes each event again, as the relay did but with header
//! `x-entrip-subscriber` naming the subscriber, straight to the queue
//! `entrip.notifications` (the default exchange). So the settlement
//! consumer and downstream subscribers of `entrip.events` do not see it
//! twice, and the workers send the copy to that subscriber alone.

use std::time::Duration;

use entrip_common::{
    amqp::{NOTIFICATIONS_QUEUE, SUBSCRIBER_HEADER, topic_matches},
    config::WebhookSettings,
    domain::EventType,
};
use entrip_workers::notifications::deliveries;
use lapin::{
    Channel, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, LongString, ShortString},
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    outbox::{self, OutboxRow},
    publisher,
    trace::{self, Publish, Target, TraceError},
};

/// How long the broker may take to confirm one message.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RedeliverError {
    #[error(
        "{0} is not a configured subscriber (notifications.webhooks): the workers would not send to it"
    )]
    UnknownSubscriber(String),
    #[error("--topic {pattern:?} matches none of the topics {subscriber} subscribes to ({topics})")]
    NoTopic {
        pattern: String,
        subscriber: String,
        topics: String,
    },
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(
        "the broker did not confirm the event {0}; nothing was reopened: run the command again"
    )]
    NotConfirmed(Uuid),
    #[error(transparent)]
    Connect(#[from] entrip_common::db::DbError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("RabbitMQ (key `amqp.url` or `amqp.urls`): {0}")]
    Amqp(#[from] lapin::Error),
}

impl RedeliverError {
    /// Whether the operator's input is at fault (exit 1), not the services
    /// (exit 2).
    pub fn is_input(&self) -> bool {
        match self {
            Self::UnknownSubscriber(_) | Self::NoTopic { .. } => true,
            Self::Trace(err) => err.is_input(),
            _ => false,
        }
    }
}

/// What a redelivery will do, read before anything is changed.
#[derive(Debug)]
pub struct Plan {
    subscriber: String,
    /// The published events to send again, as the relay sent them.
    rows: Vec<OutboxRow>,
    /// Events of the subscriber's topics that cannot be: (event id, why).
    pub skipped: Vec<(Uuid, String)>,
}

impl Plan {
    /// The events it will send: (event id, topic).
    pub fn events(&self) -> impl Iterator<Item = (Uuid, &str)> {
        self.rows.iter().map(|r| (r.id, r.topic.as_str()))
    }
}

/// Checks the subscriber and the topic pattern, and finds the events of
/// `booking` (id or code) that `subscriber` wants (and that match `topic`
/// when given). Reads only.
pub async fn plan(
    pool: &PgPool,
    booking: &str,
    subscriber: &str,
    topic: Option<&str>,
    webhooks: &[WebhookSettings],
) -> Result<Plan, RedeliverError> {
    let hook = webhooks
        .iter()
        .find(|h| h.url == subscriber)
        .ok_or_else(|| RedeliverError::UnknownSubscriber(subscriber.to_owned()))?;
    let wants = |kind: &str| hook.wants(kind) && topic.is_none_or(|t| topic_matches(t, kind));
    if let Some(pattern) = topic
        && !EventType::ALL.iter().any(|t| wants(t.as_str()))
    {
        return Err(RedeliverError::NoTopic {
            pattern: pattern.to_owned(),
            subscriber: subscriber.to_owned(),
            topics: hook.topics.join(", "),
        });
    }
    let found = trace::trace(pool, &Target::Booking(booking.to_owned()), webhooks).await?;
    let mut skipped = Vec::new();
    let mut chosen = Vec::new();
    for event in &found.events {
        match (event.topic.as_deref(), event.state) {
            (Some(kind), Publish::Published) if wants(kind) => chosen.push(event.id),
            (Some(kind), state) if wants(kind) => {
                skipped.push((event.id, format!("{kind} is {state}")));
            }
            (Some(_), _) => {}
            (None, state) => skipped.push((event.id, format!("{state}, its topic unknown"))),
        }
    }
    let mut conn = pool.acquire().await?;
    let rows = outbox::published_rows(&mut conn, &chosen).await?;
    // Deleted by the retention between the two reads.
    for id in chosen
        .iter()
        .filter(|id| !rows.iter().any(|r| r.id == **id))
    {
        skipped.push((*id, "purged".to_owned()));
    }
    Ok(Plan {
        subscriber: subscriber.to_owned(),
        rows,
        skipped,
    })
}

/// Carries out `plan`: in one transaction, reopens the pairs (their rows
/// locked), publishes each copy with a confirm, and commits after the last
/// confirm. A worker handling a copy meanwhile waits on the pair's lock and
/// then sends it; a POST already under way loses its lease, so its answer
/// does not mark the pair DELIVERED and the copy is still sent; a failure
/// or a crash before the commit leaves the pairs as they were (a confirmed
/// copy of a DEAD pair is still sent; one of a DELIVERED pair is skipped),
/// so running the command again is safe.
/// Returns the events sent.
pub async fn send(pool: &PgPool, channel: &Channel, plan: &Plan) -> Result<usize, RedeliverError> {
    let pairs: Vec<(Uuid, String)> = plan.rows.iter().map(|r| (r.id, r.topic.clone())).collect();
    let mut tx = pool.begin().await?;
    deliveries::reopen(&mut tx, &pairs, &plan.subscriber).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for row in &plan.rows {
        let mut props = publisher::properties(row);
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from(SUBSCRIBER_HEADER),
            AMQPValue::LongString(LongString::from(plan.subscriber.as_str())),
        );
        props = props.with_headers(headers);
        let confirm = channel
            .basic_publish(
                "".into(),
                NOTIFICATIONS_QUEUE.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                row.payload.as_bytes(),
                props,
            )
            .await?;
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => {}
            Ok(Err(err)) => return Err(err.into()),
            _ => return Err(RedeliverError::NotConfirmed(row.id)),
        }
        tracing::info!(event_id = %row.id, topic = %row.topic, subscriber = %plan.subscriber, "notification sent again");
    }
    tx.commit().await?;
    Ok(plan.rows.len())
}
