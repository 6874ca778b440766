//! The chaos suite's own view of the broker: a durable queue of its own in
//! the run's vhost, bound to `entrip.events` with `#` before the fleet
//! starts, so that it gets a copy of every message the dispatchers publish
//! (publisher confirms cover it like the fleet's own queues). Nobody consumes
//! it during the run; after the drain it is read to the end, in queue order,
//! and deleted. The checks compare what it holds (by `message_id`, the outbox
//! id) with the outbox: evidence from outside the database.

use std::collections::HashMap;

use entrip_common::amqp::{EVENTS_EXCHANGE, UNROUTED};
use lapin::{
    Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions, QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use crate::Error;

/// The chaos-owned queue. Not `entrip.`-prefixed, so that the drain and the
/// "worker queues empty" check do not count it.
pub const TAP_QUEUE: &str = "chaos.events-tap";

fn broker(what: &str, err: lapin::Error) -> Error {
    Error::Setup(format!("chaos tap queue: {what}: {err}"))
}

async fn connect(amqp_url: &str) -> Result<Connection, Error> {
    Connection::connect(
        amqp_url,
        ConnectionProperties::default().with_connection_name("entrip-chaos-tap".into()),
    )
    .await
    .map_err(|e| broker("connect", e))
}

fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// Declares `entrip.events` exactly as `entrip_common::amqp::declare_topology`
/// does (durable topic exchange, alternate exchange `entrip.unrouted`: equal
/// arguments, so the services' own declarations still succeed), then the
/// tap queue (durable, quorum like the fleet's queues, so that it survives a
/// broker restart) bound with `#`, emptied in case the vhost is reused. Since
/// the tap matches every routing key, nothing the dispatchers publish is
/// unroutable on its account: the alternate exchange plays no part for it.
pub async fn declare(amqp_url: &str) -> Result<(), Error> {
    let conn = connect(amqp_url).await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| broker("channel", e))?;
    let mut exchange_args = FieldTable::default();
    exchange_args.insert(ShortString::from("alternate-exchange"), text(UNROUTED));
    channel
        .exchange_declare(
            EVENTS_EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            exchange_args,
        )
        .await
        .map_err(|e| broker("declaring entrip.events", e))?;
    let mut queue_args = FieldTable::default();
    queue_args.insert(ShortString::from("x-queue-type"), text("quorum"));
    channel
        .queue_declare(
            TAP_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            queue_args,
        )
        .await
        .map_err(|e| broker("declaring the queue", e))?;
    channel
        .queue_bind(
            TAP_QUEUE.into(),
            EVENTS_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker("binding the queue", e))?;
    channel
        .queue_purge(TAP_QUEUE.into(), QueuePurgeOptions::default())
        .await
        .map_err(|e| broker("purging the queue", e))?;
    let _ = conn.close(200, "tap declared".into()).await;
    Ok(())
}

/// What the tap queue held after the drain.
#[derive(Debug, Clone, Default)]
pub struct TapLog {
    /// Copies per `message_id`.
    pub copies: HashMap<String, u64>,
    /// Position (0-based, queue order) of each `message_id`'s first copy.
    pub first_at: HashMap<String, usize>,
    /// Messages read in all.
    pub messages: u64,
    /// Messages without a `message_id` property.
    pub without_id: u64,
}

/// Reads the tap queue to the end (`basic.get`, queue order), then deletes it.
pub async fn drain(amqp_url: &str) -> Result<TapLog, Error> {
    let conn = connect(amqp_url).await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| broker("channel", e))?;
    let mut log = TapLog::default();
    let mut position = 0usize;
    while let Some(msg) = channel
        .basic_get(TAP_QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .map_err(|e| broker("basic.get", e))?
    {
        log.messages += 1;
        match msg.delivery.properties.message_id() {
            Some(id) => {
                let id = id.as_str().to_owned();
                log.first_at.entry(id.clone()).or_insert(position);
                *log.copies.entry(id).or_default() += 1;
            }
            None => log.without_id += 1,
        }
        position += 1;
    }
    if let Err(e) = channel
        .queue_delete(TAP_QUEUE.into(), QueueDeleteOptions::default())
        .await
    {
        tracing::warn!("cannot delete the tap queue {TAP_QUEUE}: {e}");
    }
    let _ = conn.close(200, "tap drained".into()).await;
    Ok(log)
}
