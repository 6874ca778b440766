//! Operator access to dead letter queues: list their messages, and replay
//! them to the exchange their queue is fed from (`entrip.events`, or
//! `entrip.ingest` for requests) with their original routing key and properties,
//! removing each from the DLQ only after the broker confirmed the replay.

use entrip_common::{
    amqp::{self, ERROR_HEADER},
    consumer::republished_properties,
};
use lapin::{
    BasicProperties, Channel, Confirmation,
    message::BasicGetMessage,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable},
};

/// A dead-lettered message as an operator sees it.
#[derive(Debug, Clone)]
pub struct DlqMessage {
    pub message_id: Option<String>,
    pub routing_key: Option<String>,
    pub reason: Option<String>,
    pub deaths: i64,
    pub body: String,
}

fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref().and_then(|h| {
        h.inner()
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v)
    })
}

/// The first `x-death` entry, where RabbitMQ records dead-lettering.
fn first_death(props: &BasicProperties) -> Option<&FieldTable> {
    match header(props, "x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        },
        _ => None,
    }
}

/// The routing key the event was first published with: the event type
/// (`type` property), else the one RabbitMQ recorded in `x-death`.
pub(crate) fn original_routing_key(props: &BasicProperties) -> Option<String> {
    if let Some(kind) = props.kind() {
        return Some(kind.as_str().to_owned());
    }
    let death = first_death(props)?;
    let keys = death
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == "routing-keys")?
        .1;
    match keys {
        AMQPValue::FieldArray(a) => a.as_slice().first().and_then(header_text),
        _ => None,
    }
}

fn describe(msg: &BasicGetMessage) -> DlqMessage {
    let props = &msg.delivery.properties;
    let deaths = first_death(props)
        .and_then(|t| {
            t.inner()
                .iter()
                .find(|(k, _)| k.as_str() == "count")
                .map(|(_, v)| v.clone())
        })
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(n),
            AMQPValue::LongInt(n) => Some(i64::from(n)),
            _ => None,
        })
        .unwrap_or(0);
    let reason = header(props, ERROR_HEADER)
        .and_then(header_text)
        .or_else(|| {
            first_death(props)
                .and_then(|t| {
                    t.inner()
                        .iter()
                        .find(|(k, _)| k.as_str() == "reason")
                        .map(|(_, v)| v.clone())
                })
                .and_then(|v| header_text(&v))
        });
    DlqMessage {
        message_id: props.message_id().as_ref().map(|s| s.as_str().to_owned()),
        routing_key: original_routing_key(props),
        reason,
        deaths,
        body: String::from_utf8_lossy(&msg.delivery.data).into_owned(),
    }
}

/// Up to `limit` messages of `queue`, left in the queue (they are fetched
/// unacknowledged and returned when the channel closes).
pub async fn list(
    channel: &Channel,
    queue: &str,
    limit: usize,
) -> Result<Vec<DlqMessage>, lapin::Error> {
    let mut out = Vec::new();
    while out.len() < limit {
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        {
            Some(msg) => out.push(describe(&msg)),
            None => break,
        }
    }
    channel.close(200, "listed".into()).await?;
    Ok(out)
}

/// Why a replay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("message {message_id:?} has no routing key to replay with; left in the DLQ")]
    NoRoutingKey { message_id: Option<String> },
    #[error("the broker did not accept the replay of {message_id:?}; left in the DLQ")]
    NotConfirmed { message_id: Option<String> },
}

/// Moves up to `limit` messages (when `None`, as many as the DLQ holds when
/// the replay starts) from `queue` back to the exchange its queue is fed
/// from, published as broker user `own_user` (the channel's): a message the
/// broker dead-lettered itself (`x-delivery-limit`) still carries its
/// upstream publisher's `user_id`, which moves to `x-entrip-user-id` as on
/// every forward. Returns how many were replayed. The bound is what stops a message
/// that fails again at once (poison not fixed yet) from circling between
/// the DLQ and its queue for as long as the replay runs.
pub async fn replay(
    channel: &Channel,
    queue: &str,
    limit: Option<usize>,
    own_user: &str,
) -> Result<usize, ReplayError> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let exchange = amqp::replay_exchange(queue);
    let held = amqp::queue_depth(channel, queue).await?;
    let held = usize::try_from(held).unwrap_or(usize::MAX);
    let limit = limit.map_or(held, |l| l.min(held));
    let mut replayed = 0;
    while replayed < limit {
        let Some(msg) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let tag = msg.delivery.delivery_tag;
        let props = msg.delivery.properties.clone();
        let message_id = props.message_id().as_ref().map(|s| s.as_str().to_owned());
        // A request of no type was refused by ingest's own forward (no
        // x-death); its queue is bound with `#`, so any key takes it back.
        let fallback = (exchange == amqp::INGEST_EXCHANGE).then(|| "untyped".to_owned());
        let Some(routing_key) = original_routing_key(&props).or(fallback) else {
            requeue(channel, tag).await?;
            return Err(ReplayError::NoRoutingKey { message_id });
        };
        let confirmation = channel
            .basic_publish(
                exchange.into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &msg.delivery.data,
                without_death_headers(republished_properties(&props, own_user)),
            )
            .await?
            .await?;
        if confirmation != Confirmation::Ack(None) {
            requeue(channel, tag).await?;
            return Err(ReplayError::NotConfirmed { message_id });
        }
        channel.basic_ack(tag, BasicAckOptions::default()).await?;
        tracing::info!(?message_id, %routing_key, %exchange, "replayed from {queue}");
        replayed += 1;
    }
    Ok(replayed)
}

/// Leaves a fetched message in its queue.
async fn requeue(channel: &Channel, tag: u64) -> Result<(), lapin::Error> {
    channel
        .basic_nack(
            tag,
            BasicNackOptions {
                multiple: false,
                requeue: true,
            },
        )
        .await
}

/// The original properties without the dead-lettering bookkeeping (a
/// request's own `x-entrip-entity-id` stays).
fn without_death_headers(props: BasicProperties) -> BasicProperties {
    let Some(headers) = props.headers().clone() else {
        return props;
    };
    let mut kept = FieldTable::default();
    for (k, v) in headers.inner() {
        let name = k.as_str();
        if name == "x-death"
            || name.starts_with("x-first-death")
            || name.starts_with("x-last-death")
            || name == ERROR_HEADER
            || name == entrip_common::consumer::ATTEMPT_HEADER
        {
            continue;
        }
        kept.insert(k.clone(), v.clone());
    }
    props.with_headers(kept)
}
