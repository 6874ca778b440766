//! Dispatcher test support: outbox rows, relays running in-process, a
//! consumer that records what reached the broker, and waits on the outbox's
//! progress.

use std::{collections::HashMap, time::Duration};

use entrip_common::{
    amqp,
    config::{AmqpSettings, DispatcherSettings},
    domain::{AggregateType, EventType},
    events::{self, NewEvent, SOURCE_INGEST},
};
use entrip_dispatcher::{metrics::RelayMetrics, relay::Relay};
use entrip_testkit::{STALL, progress};
use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection,
    options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn amqp_settings(url: &str) -> AmqpSettings {
    AmqpSettings {
        url: url.to_owned(),
        retry_delays_ms: vec![500, 2000],
        ..AmqpSettings::default()
    }
}

pub fn fast_settings() -> DispatcherSettings {
    DispatcherSettings {
        batch_size: 200,
        poll_interval_ms: 200,
        confirm_timeout_ms: 5_000,
        max_attempts: 3,
        backoff_min_ms: 50,
        backoff_max_ms: 200,
        ..DispatcherSettings::default()
    }
}

/// A relay running in this process.
pub struct Running {
    pub token: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
    pub metrics: RelayMetrics,
}

impl Running {
    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("the relay stops")
            .unwrap();
    }
}

pub fn start_relay(pool: &PgPool, url: &str, settings: DispatcherSettings) -> Running {
    start_relay_with(pool, amqp_settings(url), settings)
}

/// A relay with these broker settings (a clone of them shares which node
/// it is connected to).
pub fn start_relay_with(
    pool: &PgPool,
    amqp: AmqpSettings,
    settings: DispatcherSettings,
) -> Running {
    let registry = prometheus::Registry::new();
    let metrics = RelayMetrics::register(&registry).unwrap();
    let relay = Relay {
        pool: pool.clone(),
        amqp,
        settings,
        metrics: metrics.clone(),
        name: format!("test-relay-{}", Uuid::new_v4().simple()),
    };
    let token = CancellationToken::new();
    let handle = tokio::spawn(relay.run(token.clone()));
    Running {
        token,
        handle,
        metrics,
    }
}

/// Inserts `per_aggregate` events for each of `aggregates` aggregates,
/// interleaved, each in its own transaction as ingest would; `data.n` is
/// the event's position within its aggregate. Returns (event id, aggregate, n).
pub async fn insert_events(
    pool: &PgPool,
    aggregates: usize,
    per_aggregate: usize,
    topic: EventType,
) -> Vec<(Uuid, Uuid, usize)> {
    let ids: Vec<Uuid> = (0..aggregates).map(|_| Uuid::now_v7()).collect();
    let mut out = Vec::new();
    for n in 0..per_aggregate {
        let mut tx = pool.begin().await.unwrap();
        for agg in &ids {
            let ev = NewEvent::new(
                topic,
                AggregateType::Booking,
                *agg,
                SOURCE_INGEST,
                json!({ "id": agg, "n": n }),
            );
            events::enqueue(&mut tx, &ev).await.unwrap();
            out.push((ev.id, *agg, n));
        }
        tx.commit().await.unwrap();
    }
    out
}

/// Fast bulk insert for large backlogs (one statement).
pub async fn bulk_insert(pool: &PgPool, aggregates: i64, per_aggregate: i64) -> i64 {
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload)
         SELECT gen_random_uuid(), 'booking', a.id, 'booking.created',
                jsonb_build_object('specversion', '1.0', 'type', 'booking.created',
                                   'subject', a.id, 'data', jsonb_build_object('id', a.id, 'n', n))
           FROM generate_series(0, $2 - 1) AS n,
                (SELECT gen_random_uuid() AS id, i FROM generate_series(1, $1) AS i) AS a
          ORDER BY n, a.i",
    )
    .bind(aggregates)
    .bind(per_aggregate)
    .execute(pool)
    .await
    .unwrap()
    .rows_affected() as i64
}

pub async fn count(pool: &PgPool, sql_where: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM outbox WHERE {sql_where}");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until `sql_where` matches at least `n` outbox rows, for as long as
/// the count keeps moving.
pub async fn rows_reach(pool: &PgPool, sql_where: &str, n: i64) {
    progress(&format!("{n} outbox rows with {sql_where}"), || async {
        let now = count(pool, sql_where).await;
        (now, now >= n)
    })
    .await;
}

/// The number of outbox rows matching `sql_where` once it has stood still
/// for `quiet` (e.g. the last batch confirmed before a cut being marked);
/// fails when it keeps changing for `STALL`.
pub async fn count_once_quiet(pool: &PgPool, sql_where: &str, quiet: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + STALL;
    let mut last = count(pool, sql_where).await;
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = count(pool, sql_where).await;
        if now != last {
            last = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= quiet {
            return last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the count of rows with {sql_where} kept changing for {STALL:?}"
        );
    }
}

/// Waits until no outbox row matches `sql_where` (e.g. `published_at IS
/// NULL`: everything published), for as long as the count keeps falling.
pub async fn drained(pool: &PgPool, sql_where: &str) {
    progress(&format!("no outbox row left with {sql_where}"), || async {
        let left = count(pool, sql_where).await;
        (left, left == 0)
    })
    .await;
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Value,
}

impl Received {
    pub fn message_id(&self) -> String {
        self.properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default()
    }
}

/// A queue of the test bound to `entrip.events` that records every message.
pub struct Recorder {
    /// Held so that the connection lives as long as the recorder.
    _conn: Connection,
    pub channel: Channel,
    pub received: std::sync::Arc<tokio::sync::Mutex<Vec<Received>>>,
}

impl Recorder {
    /// Declares the topology and a queue `name` bound with `keys`, then
    /// consumes it.
    pub async fn start(url: &str, name: &str, keys: &[&str]) -> Self {
        let conn = amqp::connect(url, "test-recorder").await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        amqp::declare_topology(&channel, &amqp_settings(url))
            .await
            .unwrap();
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for key in keys {
            channel
                .queue_bind(
                    name.into(),
                    amqp::EVENTS_EXCHANGE.into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        Self::consume(conn, channel, name).await
    }

    /// Consumes an existing queue.
    pub async fn consume(conn: Connection, channel: Channel, name: &str) -> Self {
        let mut consumer = channel
            .basic_consume(
                name.into(),
                format!("recorder-{}", Uuid::new_v4().simple())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let received = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
        tokio::spawn({
            let received = received.clone();
            async move {
                while let Some(Ok(delivery)) = consumer.next().await {
                    let body = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
                    received.lock().await.push(Received {
                        routing_key: delivery.routing_key.as_str().to_owned(),
                        properties: delivery.properties.clone(),
                        body,
                    });
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
            }
        });
        Self {
            _conn: conn,
            channel,
            received,
        }
    }

    pub async fn snapshot(&self) -> Vec<Received> {
        self.received.lock().await.clone()
    }

    /// Waits until exactly `n` distinct messages have arrived, for as long
    /// as messages keep arriving; more than `n` fails at once.
    pub async fn received(&self, n: usize) {
        progress(&format!("{n} distinct messages received"), || async {
            let now = self.distinct().await;
            assert!(now <= n, "{now} distinct messages received, expected {n}");
            (now, now == n)
        })
        .await;
    }

    /// Distinct message ids received so far.
    pub async fn distinct(&self) -> usize {
        let r = self.received.lock().await;
        r.iter()
            .map(Received::message_id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// Asserts that every one of these outbox rows (marked published)
    /// reached the broker: nothing is marked without a confirm.
    pub async fn assert_reached<'a>(&self, marked: impl IntoIterator<Item = &'a Uuid>) {
        let received: std::collections::HashSet<String> = self
            .snapshot()
            .await
            .iter()
            .map(Received::message_id)
            .collect();
        for id in marked {
            assert!(
                received.contains(&id.to_string()),
                "{id} was marked but never reached the broker"
            );
        }
    }

    /// For each aggregate (`subject`), the `data.n` values in arrival order.
    pub async fn sequences(&self) -> HashMap<String, Vec<u64>> {
        let mut out: HashMap<String, Vec<u64>> = HashMap::new();
        for r in self.received.lock().await.iter() {
            let subject = r.body["subject"].as_str().unwrap_or_default().to_owned();
            let n = r.body["data"]["n"].as_u64().unwrap_or(u64::MAX);
            out.entry(subject).or_default().push(n);
        }
        out
    }
}

/// Asserts per-aggregate order: ignoring redeliveries of what was already
/// seen, every aggregate's events arrive as 0, 1, 2, ...
pub fn assert_ordered(sequences: &HashMap<String, Vec<u64>>, per_aggregate: u64) {
    for (subject, seq) in sequences {
        let mut next = 0u64;
        for &n in seq {
            if n < next {
                continue; // a redelivery of an event already seen
            }
            assert_eq!(n, next, "aggregate {subject} out of order: {seq:?}");
            next += 1;
        }
        assert_eq!(
            next, per_aggregate,
            "aggregate {subject} incomplete: {seq:?}"
        );
    }
}
