//! The relay side of table `outbox`: the fleet's batch slots, claiming due
//! rows in commit order per aggregate, marking them published or failed,
//! statistics, redrive, retention, and the rows' states for
//! `dispatcher trace`. (Rows are
//! written by `entrip_common::events`.)

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

/// A row to publish.
#[derive(Debug, Clone, FromRow)]
pub struct OutboxRow {
    pub id: Uuid,
    pub(crate) aggregate_id: Uuid,
    pub(crate) topic: String,
    /// The CloudEvents JSON, published as is.
    pub(crate) payload: String,
    pub(crate) traceparent: Option<String>,
    pub(crate) attempts: i32,
    pub(crate) created_at: DateTime<Utc>,
}

/// The claim statement (`$1`: the batch size); public so that a test can
/// check its plan.
pub const CLAIM_SQL: &str = "WITH candidates AS (
             SELECT id, seq, aggregate_id, topic, payload, headers, attempts, created_at
               FROM outbox o
              WHERE published_at IS NULL AND dead_at IS NULL AND next_attempt_at <= now()
                -- Behind an older row waiting for its retry: cannot go now,
                -- and must not fill the window ahead of rows that can.
                -- A probe of the aggregate's index per row, whatever the
                -- statistics say: OFFSET 0 keeps it a subplan, and IS TRUE
                -- keeps the retry index out of it (see below).
                AND NOT EXISTS (
                    SELECT 1 FROM outbox w
                     WHERE w.aggregate_id = o.aggregate_id
                       AND (w.aggregate_id, w.seq) < (o.aggregate_id, o.seq)
                       AND w.published_at IS NULL AND w.dead_at IS NULL
                       AND (w.next_attempt_at > now()) IS TRUE
                    OFFSET 0)
              ORDER BY seq
              LIMIT $1
                FOR UPDATE SKIP LOCKED
         ), ranked AS (
             SELECT *, row_number() OVER (PARTITION BY aggregate_id ORDER BY seq) - 1 AS older_in_batch
               FROM candidates
         )
         -- The locked rows carry every column: no second lookup by id.
         SELECT c.id, c.aggregate_id, c.topic, c.payload::text AS payload,
                c.headers->>'traceparent' AS traceparent, c.attempts, c.created_at
           FROM ranked c
          -- The row comparisons below mean `seq <` within the aggregate,
          -- written so that only the (aggregate_id, seq) index can serve
          -- them: with statistics of a near-empty table, PostgreSQL probed
          -- the seq index instead, scanning every older row per candidate.
          WHERE (SELECT count(*) FROM outbox p
                  WHERE p.aggregate_id = c.aggregate_id
                    AND (p.aggregate_id, p.seq) < (c.aggregate_id, c.seq)
                    AND p.published_at IS NULL AND p.dead_at IS NULL) = c.older_in_batch
          ORDER BY c.seq";

/// Claims up to `limit` due rows with `FOR UPDATE SKIP LOCKED`, in `seq`
/// order, keeping only rows none of whose older undelivered rows of the same
/// aggregate is outside this batch (held by another dispatcher, waiting for
/// a retry, or not yet claimed): a row goes when its aggregate's older
/// undelivered rows (an index probe per row) are exactly its older rows in
/// the batch (a window count). The locks last until the caller's
/// transaction ends, so each row is in at most one batch at a time.
///
/// An anti-join on "older undelivered row not in the batch" looks simpler,
/// but PostgreSQL plans it as a hash over the whole backlog: 98 ms per batch
/// of 500 with 100,000 rows waiting, against 8 ms for this form.
///
/// The retry test must stay a per-row probe too. When many rows start
/// waiting at once (a broker outage makes every row of a batch fail) and
/// the statistics do not know it yet, PostgreSQL planned it as a nested
/// loop over all waiting rows for each candidate: 1.1 s per batch of 2,000
/// with 6,250 waiting, and up to the statement timeout in the chaos suite;
/// 28 ms in this form. And both probes must use the aggregate's index:
/// with the statistics of an empty table and 40,000 rows inserted since,
/// they used the seq index (522 ms for the first batch, statement timeouts
/// later in a benchmark); 14 ms with the row comparisons.
pub async fn claim(conn: &mut PgConnection, limit: u32) -> sqlx::Result<Vec<OutboxRow>> {
    sqlx::query_as(CLAIM_SQL)
        .bind(i64::from(limit))
        .fetch_all(conn)
        .await
}

/// Advisory lock class of the relay's batch slots ("entr"); the slot
/// number is the second key.
pub const SLOT_LOCK_CLASS: i32 = 0x656e_7472;

/// Takes one of `slots` batch slots shared by every dispatcher of the
/// database (`dispatcher.fleet_lanes`), for the caller's transaction: a
/// transaction-level advisory lock, so a crashed or disconnected lane frees
/// its slot with its transaction. False when every slot is taken.
pub async fn take_slot(conn: &mut PgConnection, slots: u32) -> sqlx::Result<bool> {
    // EXISTS stops at the first slot it gets: one lock at most.
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM generate_series(0, $1 - 1) s
                         WHERE pg_try_advisory_xact_lock($2, s))",
    )
    .bind(i32::try_from(slots).unwrap_or(i32::MAX))
    .bind(SLOT_LOCK_CLASS)
    .fetch_one(conn)
    .await
}

/// Marks broker-confirmed rows published, in one statement. The time is
/// the mark's (`clock_timestamp()`, after the confirms), not the start of
/// the relay's transaction (`now()`, before the claim).
pub(crate) async fn mark_published(conn: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "UPDATE outbox SET published_at = clock_timestamp(), last_error = NULL
          WHERE id = ANY($1) AND published_at IS NULL",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// A publish the broker refused (nack, return) or did not confirm in time.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) id: Uuid,
    pub(crate) error: String,
    /// When to try again.
    pub(crate) retry_in: Duration,
}

/// Counts a failed attempt for each row, in one statement; rows that reach
/// `max_attempts` become dead. Returns the ids and topics of the rows that
/// died.
pub(crate) async fn mark_failed(
    conn: &mut PgConnection,
    failures: &[Failure],
    max_attempts: u32,
) -> sqlx::Result<Vec<(Uuid, String)>> {
    if failures.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = failures.iter().map(|f| f.id).collect();
    let errors: Vec<String> = failures.iter().map(|f| f.error.clone()).collect();
    let delays: Vec<f64> = failures.iter().map(|f| f.retry_in.as_secs_f64()).collect();
    let dead: Vec<(Uuid, String, bool)> = sqlx::query_as(
        "UPDATE outbox o
            SET attempts = o.attempts + 1,
                last_error = f.error,
                next_attempt_at = now() + make_interval(secs => f.delay),
                dead_at = CASE WHEN o.attempts + 1 >= $4 THEN now() END
           FROM unnest($1::uuid[], $2::text[], $3::float8[]) AS f(id, error, delay)
          WHERE o.id = f.id AND o.published_at IS NULL
         RETURNING o.id, o.topic, o.dead_at IS NOT NULL",
    )
    .bind(&ids)
    .bind(&errors)
    .bind(&delays)
    .bind(i32::try_from(max_attempts).unwrap_or(i32::MAX))
    .fetch_all(conn)
    .await?;
    Ok(dead
        .into_iter()
        .filter(|(_, _, is_dead)| *is_dead)
        .map(|(id, topic, _)| (id, topic))
        .collect())
}

/// The outbox at a glance.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub undelivered: i64,
    pub oldest_undelivered_age_secs: f64,
    pub dead: i64,
    /// (topic, undelivered, dead)
    pub by_topic: Vec<(String, i64, i64)>,
}

pub async fn stats(pool: &PgPool) -> sqlx::Result<Stats> {
    let by_topic: Vec<(String, i64, i64, Option<f64>)> = sqlx::query_as(
        "SELECT topic,
                count(*) FILTER (WHERE dead_at IS NULL),
                count(*) FILTER (WHERE dead_at IS NOT NULL),
                EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE dead_at IS NULL))::float8
           FROM outbox WHERE published_at IS NULL
          GROUP BY topic ORDER BY topic",
    )
    .fetch_all(pool)
    .await?;
    let mut stats = Stats::default();
    for (topic, undelivered, dead, age) in by_topic {
        stats.undelivered += undelivered;
        stats.dead += dead;
        stats.oldest_undelivered_age_secs =
            stats.oldest_undelivered_age_secs.max(age.unwrap_or(0.0));
        stats.by_topic.push((topic, undelivered, dead));
    }
    Ok(stats)
}

/// An outbox row's publish state, as `dispatcher trace` shows it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct EventState {
    pub id: Uuid,
    pub topic: String,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
    /// When the relay tries again (while neither published nor dead).
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// When the broker confirmed it.
    pub published_at: Option<DateTime<Utc>>,
    pub dead_at: Option<DateTime<Utc>>,
}

/// These rows' states, in commit order (primary-key lookups). A published
/// row deleted after `dispatcher.retention_hours` is not among them.
pub async fn events(conn: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<Vec<EventState>> {
    sqlx::query_as(
        "SELECT id, topic, aggregate_type, aggregate_id, created_at, attempts, next_attempt_at,
                last_error, published_at, dead_at
           FROM outbox WHERE id = ANY($1) ORDER BY seq",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// These rows as the relay published them (payload and trace context),
/// for the ones that are published and not yet deleted: what
/// `dispatcher notifications redeliver` sends again.
pub async fn published_rows(conn: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<Vec<OutboxRow>> {
    sqlx::query_as(
        "SELECT id, aggregate_id, topic, payload::text AS payload,
                headers->>'traceparent' AS traceparent, attempts, created_at
           FROM outbox WHERE id = ANY($1) AND published_at IS NOT NULL ORDER BY seq",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Which dead rows to bring back.
#[derive(Debug, Clone)]
pub enum Redrive {
    All,
    Ids(Vec<Uuid>),
    Topic(String),
}

/// Dead rows back to due, with their attempts reset. Returns how many.
pub async fn redrive(pool: &PgPool, which: &Redrive) -> sqlx::Result<u64> {
    let base = "UPDATE outbox SET dead_at = NULL, attempts = 0, next_attempt_at = now()
                 WHERE dead_at IS NOT NULL AND published_at IS NULL";
    let done = match which {
        Redrive::All => {
            sqlx::query(sqlx::AssertSqlSafe(base.to_owned()))
                .execute(pool)
                .await?
        }
        Redrive::Ids(ids) => {
            sqlx::query(sqlx::AssertSqlSafe(format!("{base} AND id = ANY($1)")))
                .bind(ids)
                .execute(pool)
                .await?
        }
        Redrive::Topic(topic) => {
            sqlx::query(sqlx::AssertSqlSafe(format!("{base} AND topic = $1")))
                .bind(topic)
                .execute(pool)
                .await?
        }
    };
    Ok(done.rows_affected())
}

/// After a restore: the rows published in the `window` before the newest
/// publish mark are due again (attempts reset). The broker and the
/// consumers kept what happened after the restore point; the database did
/// not. A message consumed before the loss whose effect (a settlement, a
/// webhook record) committed after the restore point is gone from the
/// database but not coming again: publishing the last minutes once more
/// brings it back, and every consumer dedupes by `message_id` what it still
/// has. Per aggregate, the rows published in the window are its latest, so
/// they go out again in their order. Returns how many.
pub async fn republish_recent(pool: &PgPool, window: Duration) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE outbox SET published_at = NULL, attempts = 0, next_attempt_at = now(),
                last_error = 'republished after a restore'
          WHERE published_at >= (SELECT max(published_at) FROM outbox) - make_interval(secs => $1)",
    )
    .bind(window.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Advisory lock key of the retention purge ("entrip-outbox-purge").
const PURGE_LOCK: i64 = 0x656e_7472_6970_7075;

/// Deletes published rows older than `retention`, `batch` rows per
/// transaction, by one dispatcher at a time (a transaction-level advisory
/// lock; the others skip). Returns how many rows were deleted.
pub async fn purge_published(pool: &PgPool, retention: Duration, batch: i64) -> sqlx::Result<u64> {
    let mut total = 0;
    loop {
        let mut tx = pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(PURGE_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(total);
        }
        let deleted = sqlx::query(
            "DELETE FROM outbox WHERE id IN (
                 SELECT id FROM outbox
                  WHERE published_at IS NOT NULL
                    AND published_at < now() - make_interval(secs => $1)
                  LIMIT $2)",
        )
        .bind(retention.as_secs_f64())
        .bind(batch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        total += deleted;
        if deleted < batch as u64 {
            return Ok(total);
        }
    }
}
