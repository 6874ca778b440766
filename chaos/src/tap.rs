//! The chaos suite's own view of the broker: a durable queue of its own in
//! the run's vhost, bound to `entrip.events` with `#` before the fleet
//! starts, so that it gets a copy of every message the dispatchers publish
//! (publisher confirms cover it like the fleet's own queues). Nobody consumes
//! it during the run; after the drain it is read to the end, in queue order,
//! and deleted. The checks compare what it holds (by `message_id`, the outbox
//! id) with the outbox: evidence from outside the database.

use std::collections::HashMap;

use std::time::Duration;

use entrip_common::amqp::{EVENTS_EXCHANGE, UNROUTED};
use futures::StreamExt as _;
use lapin::{
    BasicProperties, Connection, ExchangeKind,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
        QueuePurgeOptions,
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
    crate::broker_connect(amqp_url, "entrip-chaos-tap")
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

impl TapLog {
    fn record(&mut self, properties: &BasicProperties) {
        let position = usize::try_from(self.messages).unwrap_or(usize::MAX);
        self.messages += 1;
        match properties.message_id() {
            Some(id) => {
                let id = id.as_str().to_owned();
                self.first_at.entry(id.clone()).or_insert(position);
                *self.copies.entry(id).or_default() += 1;
            }
            None => self.without_id += 1,
        }
    }
}

/// Deliveries in flight to the reading consumer, acknowledged in batches.
const READ_BATCH: u16 = 500;

/// Acknowledges a delivery and every one before it on its channel.
async fn ack(delivery: lapin::message::Delivery) -> Result<(), Error> {
    delivery
        .acker
        .ack(BasicAckOptions { multiple: true })
        .await
        .map(|_| ())
        .map_err(|e| broker("basic.ack", e))
}

/// Reads the tap queue to the end, in queue order, then deletes it. The
/// messages it held when the read began come through a consumer (one
/// `basic.get` round trip per message would take minutes for a long run's
/// tens of thousands); any that came later, and any the consumer left
/// unacknowledged, through `basic.get` until the queue is empty.
pub async fn drain(amqp_url: &str) -> Result<TapLog, Error> {
    let conn = connect(amqp_url).await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| broker("channel", e))?;
    let mut log = TapLog::default();
    let held = channel
        .queue_declare(
            TAP_QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker("counting the messages", e))?
        .message_count();
    if held > 0 {
        channel
            .basic_qos(READ_BATCH, BasicQosOptions::default())
            .await
            .map_err(|e| broker("basic.qos", e))?;
        let tag = ShortString::from("entrip-chaos-tap-reader");
        let mut consumer = channel
            .basic_consume(
                TAP_QUEUE.into(),
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| broker("basic.consume", e))?;
        // The last delivery read and not yet acknowledged (with the ones
        // before it: `multiple`).
        let mut unacked: (u16, Option<lapin::message::Delivery>) = (0, None);
        while log.messages < u64::from(held) {
            // Nothing else reads the queue: a pause this long means the
            // broker stopped sending, and `basic.get` below takes over.
            let next = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await;
            let Ok(Some(delivery)) = next else { break };
            let delivery = delivery.map_err(|e| broker("consuming", e))?;
            log.record(&delivery.properties);
            unacked = (unacked.0 + 1, Some(delivery));
            if unacked.0 >= READ_BATCH / 2
                && let (_, Some(last)) = std::mem::take(&mut unacked)
            {
                ack(last).await?;
            }
        }
        // Everything read is acknowledged before the consumer goes: what it
        // was sent beyond that comes again, to `basic.get` below.
        if let (_, Some(last)) = unacked {
            ack(last).await?;
        }
        channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await
            .map_err(|e| broker("basic.cancel", e))?;
    }
    let getter = if held > 0 {
        let _ = channel.close(200, "tap read".into()).await;
        conn.create_channel()
            .await
            .map_err(|e| broker("channel", e))?
    } else {
        channel
    };
    while let Some(msg) = getter
        .basic_get(TAP_QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .map_err(|e| broker("basic.get", e))?
    {
        log.record(&msg.delivery.properties);
    }
    if let Err(e) = getter
        .queue_delete(TAP_QUEUE.into(), QueueDeleteOptions::default())
        .await
    {
        tracing::warn!("cannot delete the tap queue {TAP_QUEUE}: {e}");
    }
    let _ = conn.close(200, "tap drained".into()).await;
    Ok(log)
}
