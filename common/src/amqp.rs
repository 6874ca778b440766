//! RabbitMQ: connections (to the first node of a cluster that answers) and
//! the fleet's topology, declared idempotently by every service that
//! publishes or consumes, so that no event published before a worker starts
//! is lost.
//!
//! ```text
//! entrip.events (topic, alternate exchange entrip.unrouted)
//!   ├─ payment.approved, payment.failed, approval.decided ─▶ entrip.settlement (quorum)
//!   └─ #                                                   ─▶ entrip.notifications (quorum)
//! entrip.unrouted (fanout) ─▶ entrip.unrouted (queue)
//! entrip.ingest (topic) ─ # ─▶ entrip.ingest (quorum): upstream requests
//! <queue>.retry.<delay>ms: TTL queues that dead-letter back to <queue>
//! <queue>.dlq: messages that failed for good (x-delivery-limit, poison)
//! ```

use std::{sync::atomic::Ordering, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::{
    Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio_util::sync::CancellationToken;

use crate::config::AmqpSettings;

/// The topic exchange every event is published to; routing key = event type.
pub const EVENTS_EXCHANGE: &str = "entrip.events";
/// Alternate exchange and queue of events no queue is bound for.
pub const UNROUTED: &str = "entrip.unrouted";
pub const SETTLEMENT_QUEUE: &str = "entrip.settlement";
pub const NOTIFICATIONS_QUEUE: &str = "entrip.notifications";
/// The topic exchange upstream systems publish requests to (routing key =
/// the command type), and the queue ingest consumes them from.
pub const INGEST_EXCHANGE: &str = "entrip.ingest";
pub const INGEST_QUEUE: &str = "entrip.ingest";
/// Header carrying why a message was dead-lettered by a consumer.
pub const ERROR_HEADER: &str = "x-entrip-error";
/// Header of an event copy that `dispatcher notifications redeliver`
/// publishes to `entrip.notifications`: the one subscriber (its URL) the
/// copy is for.
pub const SUBSCRIBER_HEADER: &str = "x-entrip-subscriber";

/// A consumed queue (with its retry path and DLQ), the exchange it is
/// bound to and the routing keys.
#[derive(Debug, Clone, Copy)]
pub struct WorkerQueue {
    pub name: &'static str,
    pub exchange: &'static str,
    pub bindings: &'static [&'static str],
}

pub const WORKER_QUEUES: [WorkerQueue; 2] = [
    WorkerQueue {
        name: SETTLEMENT_QUEUE,
        exchange: EVENTS_EXCHANGE,
        bindings: &["payment.approved", "payment.failed", "approval.decided"],
    },
    WorkerQueue {
        name: NOTIFICATIONS_QUEUE,
        exchange: EVENTS_EXCHANGE,
        bindings: &["#"],
    },
];

/// Ingest's request queue. Bound with `#`: a message with an unknown
/// command type reaches the consumer, which dead-letters it with the
/// reason, instead of vanishing at the exchange.
pub const INGEST: WorkerQueue = WorkerQueue {
    name: INGEST_QUEUE,
    exchange: INGEST_EXCHANGE,
    bindings: &["#"],
};

/// Every queue with a retry path and a DLQ.
pub const CONSUMED_QUEUES: [WorkerQueue; 3] = [WORKER_QUEUES[0], WORKER_QUEUES[1], INGEST];

/// The exchange a message of `dlq` goes back to when replayed.
pub fn replay_exchange(dlq: &str) -> &'static str {
    CONSUMED_QUEUES
        .iter()
        .find(|q| dlq_name(q.name) == dlq)
        .map_or(EVENTS_EXCHANGE, |q| q.exchange)
}

pub fn dlq_name(queue: &str) -> String {
    format!("{queue}.dlq")
}

pub fn retry_queue_name(queue: &str, delay_ms: u64) -> String {
    format!("{queue}.retry.{delay_ms}ms")
}

fn s(text: &str) -> ShortString {
    text.into()
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(s(k), v.clone());
    }
    t
}

fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// The broker user of an AMQP URL (`guest` when it names none, as lapin
/// connects then).
pub fn user_of(url: &str) -> String {
    url.parse::<lapin::uri::AMQPUri>()
        .map(|uri| uri.authority.userinfo.username)
        .unwrap_or_else(|_| "guest".to_owned())
}

/// Opens a connection named after the service (shown by `rabbitmqctl`).
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
}

/// Connects to the first of the settings' nodes that answers, trying the
/// node this process last connected to first and then the next ones in
/// order: a service whose node is lost moves on to the next, and every
/// connection of a process follows it there. A node counts as answering only
/// once the AMQP handshake is done within `connect_timeout_ms`, so a node
/// that is booting or hangs is passed over too. The error is the last
/// node's.
pub async fn connect_any(settings: &AmqpSettings, name: &str) -> Result<Connection, lapin::Error> {
    let nodes = settings.nodes();
    let start = settings.last_node.load(Ordering::Relaxed) % nodes.len().max(1);
    let timeout = Duration::from_millis(settings.connect_timeout_ms);
    let mut last = None;
    for i in (0..nodes.len()).map(|k| (start + k) % nodes.len()) {
        let attempt = tokio::time::timeout(timeout, connect(nodes[i], name)).await;
        let err = match attempt {
            Ok(Ok(conn)) => {
                if nodes.len() > 1 {
                    tracing::info!(node = %node_address(nodes[i]), "connected to RabbitMQ");
                }
                settings.last_node.store(i, Ordering::Relaxed);
                return Ok(conn);
            }
            Ok(Err(err)) => err,
            Err(_) => lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            )),
        };
        if nodes.len() > 1 {
            tracing::warn!(node = %node_address(nodes[i]), %err, "RabbitMQ node not reachable; trying the next");
        }
        last = Some(err);
    }
    Err(last
        .unwrap_or_else(|| lapin::Error::from(std::io::Error::other("no broker node configured"))))
}

/// A node's `host:port/vhost`, for logs: never its password.
pub fn node_address(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!(
            "{}:{}/{}",
            uri.authority.host, uri.authority.port, uri.vhost
        ),
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

/// Connects to one of the nodes ([`connect_any`]), retrying every node with
/// exponential backoff and jitter until one answers or `shutdown` is
/// cancelled (then `None`).
pub async fn connect_with_retry(
    settings: &AmqpSettings,
    name: &str,
    shutdown: &CancellationToken,
) -> Option<Connection> {
    let mut delays = reconnect_backoff().build();
    loop {
        match connect_any(settings, name).await {
            Ok(conn) => return Some(conn),
            Err(err) => {
                let wait = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(%err, ?wait, "RabbitMQ not reachable; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Backoff between broker reconnects: 200 ms growing to 10 s, with jitter,
/// without end.
pub fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
}

/// How many messages wait (ready, not unacknowledged) in `queue` now.
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let q = channel
        .queue_declare(
            s(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// Declares the whole topology; safe to call concurrently and repeatedly.
pub async fn declare_topology(
    channel: &Channel,
    settings: &AmqpSettings,
) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let quorum = text("quorum");

    channel
        .exchange_declare(
            s(UNROUTED),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            s(UNROUTED),
            durable_queue,
            table(&[("x-queue-type", quorum.clone())]),
        )
        .await?;
    channel
        .queue_bind(
            s(UNROUTED),
            s(UNROUTED),
            s(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            s(EVENTS_EXCHANGE),
            ExchangeKind::Topic,
            durable,
            table(&[("alternate-exchange", text(UNROUTED))]),
        )
        .await?;
    channel
        .exchange_declare(
            s(INGEST_EXCHANGE),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;

    for queue in CONSUMED_QUEUES {
        let dlq = dlq_name(queue.name);
        channel
            .queue_declare(
                s(&dlq),
                durable_queue,
                table(&[("x-queue-type", quorum.clone())]),
            )
            .await?;
        channel
            .queue_declare(
                s(queue.name),
                durable_queue,
                table(&[
                    ("x-queue-type", quorum.clone()),
                    (
                        "x-delivery-limit",
                        AMQPValue::LongLongInt(i64::from(settings.delivery_limit)),
                    ),
                    ("x-dead-letter-exchange", text("")),
                    ("x-dead-letter-routing-key", text(&dlq)),
                    ("x-dead-letter-strategy", text("at-least-once")),
                    ("x-overflow", text("reject-publish")),
                ]),
            )
            .await?;
        for delay in &settings.retry_delays_ms {
            let ttl = i64::try_from(*delay).unwrap_or(i64::MAX);
            channel
                .queue_declare(
                    s(&retry_queue_name(queue.name, *delay)),
                    durable_queue,
                    table(&[
                        ("x-queue-type", quorum.clone()),
                        ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
                        ("x-dead-letter-exchange", text("")),
                        ("x-dead-letter-routing-key", text(queue.name)),
                        ("x-dead-letter-strategy", text("at-least-once")),
                        ("x-overflow", text("reject-publish")),
                    ]),
                )
                .await?;
        }
        for key in queue.bindings {
            channel
                .queue_bind(
                    s(queue.name),
                    s(queue.exchange),
                    s(key),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    Ok(())
}

/// Whether the broker refused a declaration because the queue or exchange
/// exists with other arguments (channel error 406 PRECONDITION_FAILED).
fn is_topology_mismatch(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

/// Logs a failed channel set-up; a topology that differs from the broker's
/// is a configuration error that retrying cannot fix.
pub fn log_setup_error(err: &lapin::Error, what: &str) {
    if is_topology_mismatch(err) {
        tracing::error!(%err, "{what}: the broker's queues were declared with other arguments; every service must use the same amqp.delivery_limit and amqp.retry_delays_ms");
    } else {
        tracing::warn!(%err, "{what}; reconnecting");
    }
}

/// AMQP topic patterns: `*` is one dot-separated word, `#` zero or more.
/// The syntax of bindings and of the webhook subscribers' `topics`.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A service started with another `amqp.delivery_limit` than the
    /// broker's queues were declared with is told so, from the error's
    /// code (this pins lapin's error kinds: an upgrade that changes them
    /// fails here).
    #[tokio::test]
    async fn a_topology_declared_with_other_arguments_is_a_mismatch() {
        let vhost = entrip_testkit::Vhost::new();
        let settings = AmqpSettings {
            url: vhost.url(),
            ..AmqpSettings::default()
        };
        let conn = connect(&vhost.url(), "test").await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        declare_topology(&channel, &settings).await.unwrap();
        declare_topology(&channel, &settings).await.unwrap();
        let other = AmqpSettings {
            delivery_limit: settings.delivery_limit + 1,
            ..settings
        };
        let channel = conn.create_channel().await.unwrap();
        let err = declare_topology(&channel, &other).await.unwrap_err();
        assert!(is_topology_mismatch(&err), "{err:?}");
        // A lost connection is not one.
        conn.close(200, "done".into()).await.unwrap();
        let err = conn.create_channel().await.unwrap_err();
        assert!(!is_topology_mismatch(&err), "{err:?}");
    }

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
