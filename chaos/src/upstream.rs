//! The load's broker side: an upstream system that sends its requests to
//! ingest over AMQP instead of HTTP (docs/amqp.md). One
//! connection, as the run's broker user (its `user_id`, which RabbitMQ
//! checks, names the API client chaos created with `--amqp-user`), publishes
//! to the exchange `entrip.ingest` with publisher confirms and reads the
//! replies from a queue of its own, [`REPLY_QUEUE`], which outlives the
//! connection: a reply that ingest sends while the load is disconnected (the
//! AMQP-close fault closes every connection of the vhost) waits there.
//!
//! A supervisor task keeps the connection up (again after every close, and
//! after a publisher found its channel broken). Each logical request has a
//! correlation id of its own, so that the replies to its resends and
//! redeliveries come back to it and to nothing else; the first reply is its
//! answer, and every later one must be the same (status and body), or it is
//! counted as a mismatch. The patience window and the resends are the
//! load's (see `load::Client::amqp_exchange`).
//!
//! Also here: reading `entrip.ingest.dlq` after the drain, without taking
//! the messages out of it, for the checks.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use entrip_common::amqp::{self, INGEST_EXCHANGE, INGEST_QUEUE};
use futures::StreamExt as _;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
        BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;
use tokio::{
    sync::{Notify, oneshot, watch},
    task::JoinHandle,
};
use uuid::Uuid;

use crate::{
    Error,
    load::{Response, Stats},
};

/// The load's reply queue: durable, not exclusive, so that it survives the
/// load's reconnects (and a broker restart). Not `entrip.`-prefixed: the
/// drain does not wait for it. Deleted when the upstream closes.
pub const REPLY_QUEUE: &str = "chaos.ingest-replies";

/// Reply headers (ingest/src/amqp.rs).
const STATUS_HEADER: &str = "x-entrip-status";
const REPLAYED_HEADER: &str = "x-entrip-replayed";
const ENTITY_HEADER: &str = "x-entrip-entity-id";

/// How long a publish waits for a connection and then for the broker's
/// confirm before it counts as failed (and is sent again).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Replies read ahead of their acknowledgement.
const REPLY_PREFETCH: u16 = 200;
/// How long connecting (and deleting the reply queue) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One reply as the load reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpReply {
    /// `x-entrip-status`: the HTTP status of the same request.
    pub status: u16,
    pub body: Value,
    /// `x-entrip-replayed: true`.
    pub replayed: bool,
}

/// One request message.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The command type (`type` and the routing key).
    pub kind: &'a str,
    /// The idempotency key (`message_id`).
    pub key: &'a str,
    /// The entity the command acts on (`x-entrip-entity-id`).
    pub entity: Option<Uuid>,
    pub body: &'a [u8],
}

/// A logical request waiting for its replies.
#[derive(Debug, Default)]
struct Slot {
    waiter: Option<oneshot::Sender<AmqpReply>>,
    /// The first reply (status, body), which later ones must equal.
    first: Option<(u16, Value)>,
    /// What the request was, for the report of a mismatch.
    what: String,
}

type Slots = Arc<Mutex<HashMap<String, Slot>>>;

fn slots(s: &Mutex<HashMap<String, Slot>>) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The publishing channel of the current connection and its generation.
type Link = Option<(u64, Channel)>;

/// The load's AMQP client; see the module comment.
pub struct Upstream {
    user: String,
    link: watch::Receiver<Link>,
    /// The generation a publisher found broken (0: none), and the
    /// supervisor's wake-up.
    broken: Arc<(AtomicU64, Notify)>,
    slots: Slots,
    stats: Arc<Stats>,
    /// `true`: stop. Dropped with the `Upstream` (a run that failed before
    /// [`Upstream::close`]), it stops the supervisor too.
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("user", &self.user)
            .field("pending", &slots(&self.slots).len())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Starts the supervisor, which connects to `url` (and again whenever
    /// the connection is lost) until [`Upstream::close`]. Publishing waits
    /// for the connection.
    pub fn start(url: String, stats: Arc<Stats>) -> Self {
        let user = crate::broker_user(&url);
        let (link_tx, link) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let broken = Arc::new((AtomicU64::new(0), Notify::new()));
        let slots: Slots = Arc::default();
        let task = tokio::spawn(supervise(
            url,
            link_tx,
            stop_rx,
            broken.clone(),
            slots.clone(),
            stats.clone(),
        ));
        Self {
            user,
            link,
            broken,
            slots,
            stats,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    /// The broker user the requests are published as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// A new logical request: its correlation id, and where its first reply
    /// will come. `what` names it in the report of a mismatch.
    pub fn expect(&self, what: String) -> (String, oneshot::Receiver<AmqpReply>) {
        let rid = Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        slots(&self.slots).insert(
            rid.clone(),
            Slot {
                waiter: Some(tx),
                first: None,
                what,
            },
        );
        (rid, rx)
    }

    /// Publishes `out` with correlation id `rid` and waits for the broker's
    /// confirm; `Err` says why it did not go out (not connected, nack, no
    /// confirm in time, the channel failed).
    pub async fn publish(&self, out: &Outgoing<'_>, rid: &str) -> Result<(), String> {
        let mut link = self.link.clone();
        // The watch's guard is not kept across the publish below.
        let current: Result<(u64, Channel), String> =
            match tokio::time::timeout(PUBLISH_TIMEOUT, link.wait_for(Option::is_some)).await {
                Ok(Ok(l)) => l
                    .as_ref()
                    .map(|(g, c)| (*g, c.clone()))
                    .ok_or_else(|| "not connected".to_owned()),
                Ok(Err(_)) => Err("the upstream is closed".into()),
                Err(_) => Err(format!("not connected within {PUBLISH_TIMEOUT:?}")),
            };
        let (generation, channel) = current?;
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_type(out.kind.into())
            .with_message_id(out.key.into())
            .with_user_id(self.user.as_str().into())
            .with_content_type("application/json".into())
            .with_reply_to(REPLY_QUEUE.into())
            .with_correlation_id(rid.into());
        if let Some(id) = out.entity {
            let mut headers = FieldTable::default();
            headers.insert(
                ENTITY_HEADER.into(),
                AMQPValue::LongString(id.to_string().as_str().into()),
            );
            props = props.with_headers(headers);
        }
        let sent = tokio::time::timeout(PUBLISH_TIMEOUT, async {
            channel
                .basic_publish(
                    INGEST_EXCHANGE.into(),
                    out.kind.into(),
                    BasicPublishOptions::default(),
                    out.body,
                    props,
                )
                .await?
                .await
        })
        .await;
        match sent {
            Ok(Ok(Confirmation::Ack(_))) => {
                Stats::bump(&self.stats.amqp_published);
                Ok(())
            }
            Ok(Ok(other)) => Err(format!("not confirmed: {other:?}")),
            Ok(Err(e)) => {
                self.broken(generation);
                Err(format!("publish: {e}"))
            }
            Err(_) => {
                self.broken(generation);
                Err(format!("no confirm within {PUBLISH_TIMEOUT:?}"))
            }
        }
    }

    /// Tells the supervisor that the connection of `generation` failed a
    /// publisher (its channel may be closed while the consumer's lives).
    fn broken(&self, generation: u64) {
        self.broken.0.store(generation, Ordering::Relaxed);
        self.broken.1.notify_one();
    }

    /// Stops the supervisor, which deletes the reply queue if it is
    /// connected; waiting requests get no more replies.
    pub async fn close(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task
            && tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .is_err()
        {
            tracing::warn!("upstream: the supervisor did not stop in 15 s");
        }
    }
}

/// An integer header as a status.
fn status_of(v: &AMQPValue) -> Option<u16> {
    let n: i64 = match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    };
    u16::try_from(n).ok()
}

fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props
        .headers()
        .as_ref()?
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .map(|(_, v)| v)
}

/// Hands a reply to its request (the first) or compares it with the first.
fn on_reply(delivery: &Delivery, pending: &Mutex<HashMap<String, Slot>>, stats: &Stats) {
    let props = &delivery.properties;
    Stats::bump(&stats.amqp_replies);
    let Some(status) = header(props, STATUS_HEADER).and_then(status_of) else {
        Stats::bump(&stats.amqp_unknown_replies);
        stats.problem(format!(
            "AMQP reply without a valid {STATUS_HEADER}: {:?}",
            props.headers()
        ));
        return;
    };
    stats.amqp_status(Response::Status(status));
    let replayed = matches!(
        header(props, REPLAYED_HEADER),
        Some(AMQPValue::Boolean(true))
    );
    if replayed {
        Stats::bump(&stats.amqp_replies_replayed);
    }
    let body = serde_json::from_slice(&delivery.data)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&delivery.data).into_owned()));
    let rid = props
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_owned())
        .unwrap_or_default();
    let mut pending = slots(pending);
    let Some(slot) = pending.get_mut(&rid) else {
        Stats::bump(&stats.amqp_unknown_replies);
        stats.problem(format!(
            "AMQP reply {status} to no request of this run (correlation id {rid:?})"
        ));
        return;
    };
    match &slot.first {
        None => {
            slot.first = Some((status, body.clone()));
            if let Some(waiter) = slot.waiter.take() {
                let _ = waiter.send(AmqpReply {
                    status,
                    body,
                    replayed,
                });
            }
        }
        Some((first_status, first_body)) => {
            Stats::bump(&stats.amqp_extra_replies);
            if *first_status != status || *first_body != body {
                Stats::bump(&stats.amqp_reply_mismatches);
                stats.problem(format!(
                    "{}: a later AMQP reply {status} {body} differs from the first, {first_status} {first_body}",
                    slot.what
                ));
            }
        }
    }
}

/// Opens a connection, declares the reply queue, and starts consuming it;
/// returns the connection, a publishing channel with confirms, and the
/// consumer.
async fn connect(url: &str) -> Result<(Connection, Channel, lapin::Consumer), lapin::Error> {
    let conn = crate::broker_connect(url, "entrip-chaos-upstream").await?;
    let replies = conn.create_channel().await?;
    // A quorum queue, as the fleet's: on a cluster it outlives the death of
    // the node it was declared on.
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    replies
        .queue_declare(
            REPLY_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    replies
        .basic_qos(REPLY_PREFETCH, BasicQosOptions::default())
        .await?;
    let consumer = replies
        .basic_consume(
            REPLY_QUEUE.into(),
            "entrip-chaos-replies".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((conn, publish, consumer))
}

/// Keeps the connection up and reads the replies until `stop`; see the
/// module comment.
async fn supervise(
    url: String,
    link: watch::Sender<Link>,
    mut stop: watch::Receiver<bool>,
    broken: Arc<(AtomicU64, Notify)>,
    slots: Slots,
    stats: Arc<Stats>,
) {
    // Told to stop, or the `Upstream` is gone.
    let stopping = |stop: &watch::Receiver<bool>| *stop.borrow() || stop.has_changed().is_err();
    let mut generation = 0u64;
    let mut pause = Duration::from_millis(100);
    while !stopping(&stop) {
        let connected = tokio::select! {
            c = tokio::time::timeout(CONNECT_TIMEOUT, connect(&url)) => c,
            _ = stop.changed() => continue,
        };
        let (conn, channel, mut consumer) = match connected {
            Ok(Ok(c)) => c,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no connection within {CONNECT_TIMEOUT:?}"),
                };
                tracing::warn!("upstream: cannot connect ({why}); again in {pause:?}");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        pause = Duration::from_millis(100);
        generation += 1;
        Stats::bump(&stats.amqp_connects);
        link.send_replace(Some((generation, channel.clone())));
        let stopped = loop {
            tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        on_reply(&delivery, &slots, &stats);
                        if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                            // Read, not acknowledged: it comes again, as a
                            // later reply.
                            tracing::warn!("upstream: ack of a reply: {e}");
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!("upstream: the reply consumer failed ({e}); reconnecting");
                        break false;
                    }
                    None => {
                        tracing::warn!("upstream: the reply consumer ended; reconnecting");
                        break false;
                    }
                },
                () = broken.1.notified() => {
                    if broken.0.load(Ordering::Relaxed) == generation {
                        tracing::warn!("upstream: a publish failed on this connection; reconnecting");
                        break false;
                    }
                }
                _ = stop.changed() => break true,
            }
        };
        link.send_replace(None);
        if stopped {
            let delete = channel.queue_delete(REPLY_QUEUE.into(), QueueDeleteOptions::default());
            match tokio::time::timeout(CONNECT_TIMEOUT, delete).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("upstream: cannot delete {REPLY_QUEUE}: {e}"),
                Err(_) => tracing::warn!("upstream: no answer deleting {REPLY_QUEUE}"),
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "chaos".into())).await;
        if stopped {
            return;
        }
    }
}

/// What `entrip.ingest.dlq` held after the drain.
#[derive(Debug, Clone, Default)]
pub struct IngestDlq {
    /// Each message's `message_id` (empty when it had none) and
    /// `x-entrip-error`.
    pub messages: Vec<(String, String)>,
}

/// Reads `entrip.ingest.dlq` to the end without taking anything out of it
/// (`basic.get` without acknowledgement; closing the channel returns the
/// messages to the queue), so that it can still be looked into after the run.
pub async fn read_ingest_dlq(amqp_url: &str) -> Result<IngestDlq, Error> {
    let broker =
        |what: &str, e: lapin::Error| Error::Setup(format!("{INGEST_QUEUE}.dlq: {what}: {e}"));
    let dlq = amqp::dlq_name(INGEST_QUEUE);
    let conn = crate::broker_connect(amqp_url, "entrip-chaos-dlq-reader")
        .await
        .map_err(|e| broker("connect", e))?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| broker("channel", e))?;
    let held = channel
        .queue_declare(
            dlq.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| broker("passive declare", e))?
        .message_count();
    let mut out = IngestDlq::default();
    while out.messages.len() < held as usize {
        let Some(msg) = channel
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| broker("basic.get", e))?
        else {
            break;
        };
        let props = &msg.delivery.properties;
        let reason = match header(props, amqp::ERROR_HEADER) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
            other => format!("{other:?}"),
        };
        let id = props
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default();
        out.messages.push((id, reason));
    }
    let _ = channel.close(200, "dlq read".into()).await;
    let _ = conn.close(200, "dlq read".into()).await;
    Ok(out)
}
