//! The end state the checks judge, loaded once after the drain: the rows of
//! the fleet's tables, the broker's queues, what the tap queue, ingest's DLQ
//! and the webhook receiver saw, and `workers integrity --once`. This is the
//! only part of the checks that does I/O; every check is a pure function of
//! an [`EndState`]. Table and column names are those of `migrations/`.

use std::{
    collections::{BTreeMap, HashSet},
    process::Command,
    time::Duration,
};

use sqlx::PgPool;
use uuid::Uuid;

use super::drain::{Depth, queue_depths, wanted_webhooks};
use crate::{
    Error,
    faults::Hit,
    ingest_metrics::IngestCounts,
    load::LoadResult,
    receiver::{Receiver, Snapshot},
    tap::TapLog,
    upstream::IngestDlq,
};

/// A row of `bookings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookingRow {
    pub code: String,
    pub id: Uuid,
    pub status: String,
}

/// A row of `payments` or `approvals`: its id, booking and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityRow {
    pub id: Uuid,
    pub booking: Uuid,
    pub status: String,
}

/// A row of `settlements`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettlementRow {
    pub id: Uuid,
    pub booking: Uuid,
}

/// A row of `outbox`, with what the checks read of its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: Uuid,
    pub seq: i64,
    pub aggregate: Uuid,
    pub topic: String,
    pub published: bool,
    pub dead: bool,
    /// `payload.data.bookingId`, where there is one.
    pub booking: Option<String>,
}

/// A row of `idempotency_keys`: whose key, and the answer it stored.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    pub client: String,
    pub key: String,
    pub status: Option<i16>,
    pub body: Option<serde_json::Value>,
}

/// A row of `audit_log`, with the channel and client of its detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub key: Option<String>,
    pub entity: Uuid,
    pub channel: Option<String>,
    pub client: Option<String>,
}

/// A row of `inbox`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxRow {
    pub consumer: String,
    pub message_id: String,
}

/// How `workers integrity --once` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrityRun {
    pub success: bool,
    /// Its exit status, as printed.
    pub status: String,
    /// Its last three lines of output.
    pub last_lines: Vec<String>,
}

/// Everything the checks read, gathered once (see the module comment).
#[derive(Debug)]
pub struct EndState<'a> {
    /// What the client was told, and what it counted.
    pub load: &'a LoadResult,
    /// The API client the load sent as (its idempotency keys' scope).
    pub api_client: &'a str,
    /// When faults hit the workers' work in flight.
    pub hits: &'a [Hit],
    /// The workers' webhook timeout.
    pub webhook_timeout: Duration,
    pub bookings: Vec<BookingRow>,
    pub payments: Vec<EntityRow>,
    pub approvals: Vec<EntityRow>,
    pub settlements: Vec<SettlementRow>,
    /// In `seq` order.
    pub outbox: Vec<OutboxRow>,
    pub keys: Vec<KeyRow>,
    pub audit: Vec<AuditRow>,
    pub inbox: Vec<InboxRow>,
    /// `notification_deliveries` rows by status.
    pub deliveries: BTreeMap<String, i64>,
    /// Messages in each queue of the vhost, or why they could not be read.
    pub queues: Result<BTreeMap<String, Depth>, String>,
    /// What the chaos-owned tap queue held, or why it could not be read.
    pub tap: Result<&'a TapLog, &'a str>,
    /// What `entrip.ingest.dlq` held, or why it could not be read.
    pub ingest_dlq: Result<&'a IngestDlq, &'a str>,
    /// Ingest's AMQP counters summed over its lives (see
    /// [`crate::ingest_metrics`]).
    pub ingest_counts: &'a IngestCounts,
    /// Lives of ingest whose counters could not be scraped.
    pub ingest_scrape_missing: u64,
    /// The (subscriber, event id) pairs the receiver must have seen.
    pub webhooks_wanted: HashSet<(String, String)>,
    /// What the receiver saw.
    pub webhooks: Snapshot,
    /// `workers integrity --once`, or why it did not run to the end.
    pub integrity: Result<IntegrityRun, String>,
}

/// What [`EndState::load`] reads besides the database and the broker.
pub struct Sources<'a> {
    pub pool: &'a PgPool,
    pub vhost: &'a str,
    pub receiver: &'a Receiver,
    pub load: &'a LoadResult,
    /// `workers integrity --once`, ready to run.
    pub integrity: Command,
    pub hits: &'a [Hit],
    pub webhook_timeout: Duration,
    pub tap: Result<&'a TapLog, &'a String>,
    pub api_client: &'a str,
    pub ingest_dlq: Result<&'a IngestDlq, &'a String>,
    pub ingest_counts: &'a IngestCounts,
    pub ingest_scrape_missing: u64,
}

impl<'a> EndState<'a> {
    /// Reads the end state. Only a database error stops it: a queue listing
    /// or an integrity run that fails is recorded for its check to report.
    pub async fn load(src: Sources<'a>) -> Result<Self, Error> {
        let pool = src.pool;
        let bookings =
            sqlx::query_as::<_, (String, Uuid, String)>("SELECT code, id, status FROM bookings")
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|(code, id, status)| BookingRow { code, id, status })
                .collect();
        let payments = entities(pool, "SELECT id, booking_id, status FROM payments").await?;
        let approvals = entities(pool, "SELECT id, booking_id, status FROM approvals").await?;
        let settlements =
            sqlx::query_as::<_, (Uuid, Uuid)>("SELECT id, booking_id FROM settlements")
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(|(id, booking)| SettlementRow { id, booking })
                .collect();
        type Outbox = (Uuid, i64, Uuid, String, bool, bool, Option<String>);
        let outbox: Vec<OutboxRow> = sqlx::query_as::<_, Outbox>(
            "SELECT id, seq, aggregate_id, topic, published_at IS NOT NULL,
                    dead_at IS NOT NULL, payload->'data'->>'bookingId'
               FROM outbox ORDER BY seq",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(
            |(id, seq, aggregate, topic, published, dead, booking)| OutboxRow {
                id,
                seq,
                aggregate,
                topic,
                published,
                dead,
                booking,
            },
        )
        .collect();
        type Key = (String, String, Option<i16>, Option<serde_json::Value>);
        let keys = sqlx::query_as::<_, Key>(
            "SELECT client, key, response_status, response_body FROM idempotency_keys",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(client, key, status, body)| KeyRow {
            client,
            key,
            status,
            body,
        })
        .collect();
        type Audit = (Option<String>, Uuid, Option<String>, Option<String>);
        let audit = sqlx::query_as::<_, Audit>(
            "SELECT idempotency_key, entity_id, detail->>'channel', detail->>'client'
               FROM audit_log",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(key, entity, channel, client)| AuditRow {
            key,
            entity,
            channel,
            client,
        })
        .collect();
        let inbox = sqlx::query_as::<_, (String, String)>("SELECT consumer, message_id FROM inbox")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(consumer, message_id)| InboxRow {
                consumer,
                message_id,
            })
            .collect();
        let deliveries = sqlx::query_as::<_, (String, i64)>(
            "SELECT status, count(*) FROM notification_deliveries GROUP BY status",
        )
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        let webhooks_wanted = wanted_webhooks(
            outbox.iter().map(|r| (r.id, r.topic.as_str())),
            &src.receiver.subscribers,
        );
        Ok(Self {
            load: src.load,
            api_client: src.api_client,
            hits: src.hits,
            webhook_timeout: src.webhook_timeout,
            bookings,
            payments,
            approvals,
            settlements,
            outbox,
            keys,
            audit,
            inbox,
            deliveries,
            queues: queue_depths(src.vhost).await,
            tap: src.tap.map_err(String::as_str),
            ingest_dlq: src.ingest_dlq.map_err(String::as_str),
            ingest_counts: src.ingest_counts,
            ingest_scrape_missing: src.ingest_scrape_missing,
            webhooks_wanted,
            webhooks: src.receiver.snapshot(),
            integrity: run_integrity(src.integrity).await,
        })
    }
}

async fn entities(pool: &PgPool, sql: &'static str) -> Result<Vec<EntityRow>, Error> {
    Ok(sqlx::query_as::<_, (Uuid, Uuid, String)>(sql)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|(id, booking, status)| EntityRow {
            id,
            booking,
            status,
        })
        .collect())
}

/// Runs `workers integrity --once`, for at most two minutes.
async fn run_integrity(cmd: Command) -> Result<IntegrityRun, String> {
    let mut integrity = tokio::process::Command::from(cmd);
    integrity.kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(120), integrity.output()).await {
        Ok(Ok(out)) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let mut last_lines: Vec<String> =
                text.lines().rev().take(3).map(str::to_owned).collect();
            last_lines.reverse();
            Ok(IntegrityRun {
                success: out.status.success(),
                status: out.status.to_string(),
                last_lines,
            })
        }
        Ok(Err(e)) => Err(format!("cannot run: {e}")),
        Err(_) => Err("did not finish in 120 s".into()),
    }
}

#[cfg(test)]
pub(super) mod fixture {
    //! An end state built by hand, for the checks' unit tests.

    use std::sync::Arc;

    use super::*;
    use crate::load::{BookingOutcome, Journey, Stats};

    /// What an [`EndState`] borrows, owned by the test.
    pub struct Fixture {
        pub load: LoadResult,
        pub tap: TapLog,
        pub dlq: IngestDlq,
        pub counts: IngestCounts,
        pub hits: Vec<Hit>,
    }

    impl Fixture {
        pub fn new(journeys: Vec<Journey>) -> Self {
            Self {
                load: LoadResult {
                    users: Vec::new(),
                    journeys,
                    stats: Arc::new(Stats::default()),
                    started_for: Duration::ZERO,
                    elapsed: Duration::ZERO,
                    poison: Vec::new(),
                    upstream: None,
                },
                tap: TapLog::default(),
                dlq: IngestDlq::default(),
                counts: IngestCounts::default(),
                hits: Vec::new(),
            }
        }

        /// An empty end state: no rows, empty queues, a clean integrity run.
        pub fn state(&self) -> EndState<'_> {
            EndState {
                load: &self.load,
                api_client: "chaos",
                hits: &self.hits,
                webhook_timeout: Duration::from_secs(2),
                bookings: Vec::new(),
                payments: Vec::new(),
                approvals: Vec::new(),
                settlements: Vec::new(),
                outbox: Vec::new(),
                keys: Vec::new(),
                audit: Vec::new(),
                inbox: Vec::new(),
                deliveries: BTreeMap::new(),
                queues: Ok(BTreeMap::from([(
                    "entrip.settlement.dlq".to_owned(),
                    Depth::default(),
                )])),
                tap: Ok(&self.tap),
                ingest_dlq: Ok(&self.dlq),
                ingest_counts: &self.counts,
                ingest_scrape_missing: 0,
                webhooks_wanted: HashSet::new(),
                webhooks: Snapshot::default(),
                integrity: Ok(IntegrityRun {
                    success: true,
                    status: "exit status: 0".into(),
                    last_lines: Vec::new(),
                }),
            }
        }
    }

    /// A journey the client saw through: booked with `id` and, when given,
    /// paid with `payment` (`APPROVED`).
    pub fn journey(n: u64, id: Uuid, payment: Option<Uuid>) -> Journey {
        let mut j = Journey::new(n, false);
        j.booking = BookingOutcome::Acked(id);
        j.payment = payment;
        j.payment_status = payment.map(|_| "APPROVED".to_owned());
        j
    }

    pub fn booking(code: &str, id: Uuid, status: &str) -> BookingRow {
        BookingRow {
            code: code.into(),
            id,
            status: status.into(),
        }
    }

    pub fn outbox(seq: i64, aggregate: Uuid, topic: &str) -> OutboxRow {
        OutboxRow {
            id: Uuid::new_v4(),
            seq,
            aggregate,
            topic: topic.into(),
            published: true,
            dead: false,
            booking: None,
        }
    }
}
