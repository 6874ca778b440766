//! Idempotency keys (table `idempotency_keys`): the key, the request's hash
//! and the response are stored in the same transaction as the effect. A key
//! belongs to the client that sent it: the same key from two clients is two
//! keys, and no client reads another's stored response.
//!
//! The key row is inserted first in the request's transaction. A second
//! request with the same key blocks on that insert until the first commits
//! (then it replays the stored answer) or rolls back (then it proceeds), so
//! fifty simultaneous requests with one key cause one effect.

use std::time::Duration;

use entrip_common::domain::IdempotencyKey;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, Row};

/// What identifies "the same request": endpoint and body.
#[derive(Debug, Clone)]
pub(crate) struct Fingerprint {
    method: String,
    /// The concrete path, e.g. `/v1/payments/<id>/result`.
    path: String,
    /// SHA-256 of the canonical JSON of the body (keys sorted, no spaces).
    hash: [u8; 32],
}

impl Fingerprint {
    pub(crate) fn new(method: &str, path: &str, body: &serde_json::Value) -> Self {
        // serde_json's map is ordered by key, so this text is canonical.
        let canonical = body.to_string();
        Self {
            method: method.to_owned(),
            path: path.to_owned(),
            hash: Sha256::digest(canonical.as_bytes()).into(),
        }
    }
}

/// A response stored under a key.
#[derive(Debug, Clone)]
pub(crate) struct StoredResponse {
    pub(crate) status: u16,
    pub(crate) body: serde_json::Value,
}

/// The outcome of trying to claim a key.
#[derive(Debug)]
pub(crate) enum Claim {
    /// The key is ours; run the effect in this transaction.
    Claimed,
    /// The same request was answered before.
    Replay(StoredResponse),
    /// The key was used for another endpoint or body.
    Mismatch(&'static str),
    /// Nothing to judge yet: the holder committed while our insert waited
    /// (our read's snapshot predates it), or vanished (purged); claim again.
    Retry,
}

/// Claims `key` inside the caller's transaction, in one statement that also
/// reads an earlier use of the key: no lookup before the transaction, and
/// no write for a replay.
///
/// `ON CONFLICT DO NOTHING` waits for a holder still in flight (the fifty
/// requests with one key queue here) and takes no row lock on a committed
/// key. The statement's own read of the key cannot see a holder that
/// committed while the insert waited (its snapshot is older): that reads
/// nothing and answers `Retry`, and the next statement sees the stored
/// response. An expired key that has not been purged yet is taken over as
/// new, by a second statement (rare).
pub(crate) async fn claim(
    conn: &mut PgConnection,
    client: &str,
    key: &IdempotencyKey,
    fp: &Fingerprint,
    ttl: Duration,
) -> sqlx::Result<Claim> {
    let ttl_secs = ttl.as_secs_f64();
    let row = sqlx::query(
        "WITH claimed AS (
             INSERT INTO idempotency_keys (client, key, method, path, request_hash, expires_at)
             VALUES ($6, $1, $2, $3, $4, now() + make_interval(secs => $5))
             ON CONFLICT (client, key) DO NOTHING
             RETURNING 1)
         SELECT true AS claimed, false AS expired, NULL::text AS method, NULL::text AS path,
                NULL::bytea AS request_hash, NULL::smallint AS response_status,
                NULL::jsonb AS response_body
           FROM claimed
         UNION ALL
         SELECT false, expires_at <= now(), method, path, request_hash, response_status,
                response_body
           FROM idempotency_keys
          WHERE client = $6 AND key = $1 AND NOT EXISTS (SELECT 1 FROM claimed)",
    )
    .bind(key.as_str())
    .bind(&fp.method)
    .bind(&fp.path)
    .bind(&fp.hash[..])
    .bind(ttl_secs)
    .bind(client)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(Claim::Retry);
    };
    if row.try_get::<bool, _>("claimed")? {
        return Ok(Claim::Claimed);
    }
    if row.try_get::<bool, _>("expired")? {
        return take_over_expired(conn, client, key, fp, ttl_secs).await;
    }
    judge(&row, fp)
}

/// An expired key becomes this request's, unless another request took it
/// over first (then `Retry`: the next claim judges that one).
async fn take_over_expired(
    conn: &mut PgConnection,
    client: &str,
    key: &IdempotencyKey,
    fp: &Fingerprint,
    ttl_secs: f64,
) -> sqlx::Result<Claim> {
    let taken = sqlx::query(
        "UPDATE idempotency_keys
            SET method = $2, path = $3, request_hash = $4,
                response_status = NULL, response_body = NULL,
                created_at = now(), expires_at = now() + make_interval(secs => $5)
          WHERE client = $6 AND key = $1 AND expires_at <= now()
         RETURNING 1",
    )
    .bind(key.as_str())
    .bind(&fp.method)
    .bind(&fp.path)
    .bind(&fp.hash[..])
    .bind(ttl_secs)
    .bind(client)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(if taken.is_some() {
        Claim::Claimed
    } else {
        Claim::Retry
    })
}

/// A stored key against this request: replay, misuse, or (no response yet)
/// retry.
fn judge(row: &sqlx::postgres::PgRow, fp: &Fingerprint) -> sqlx::Result<Claim> {
    let method: String = row.try_get("method")?;
    let path: String = row.try_get("path")?;
    let hash: Vec<u8> = row.try_get("request_hash")?;
    if method != fp.method || path != fp.path {
        return Ok(Claim::Mismatch(
            "this Idempotency-Key was already used for another endpoint",
        ));
    }
    if hash != fp.hash {
        return Ok(Claim::Mismatch(
            "this Idempotency-Key was already used with a different request body",
        ));
    }
    let status: Option<i16> = row.try_get("response_status")?;
    let body: Option<serde_json::Value> = row.try_get("response_body")?;
    match (status, body) {
        (Some(status), Some(body)) => Ok(Claim::Replay(StoredResponse {
            status: u16::try_from(status).unwrap_or(200),
            body,
        })),
        // Committed rows always carry a response (see `complete`).
        _ => Ok(Claim::Retry),
    }
}

/// Stores the response under the claimed key, in the effect's transaction.
pub(crate) async fn complete(
    conn: &mut PgConnection,
    client: &str,
    key: &IdempotencyKey,
    response: &StoredResponse,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE idempotency_keys SET response_status = $2, response_body = $3
          WHERE client = $4 AND key = $1",
    )
    .bind(key.as_str())
    .bind(i16::try_from(response.status).unwrap_or(200))
    .bind(&response.body)
    .bind(client)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes expired keys in batches; returns how many were deleted.
pub async fn purge_expired(pool: &sqlx::PgPool, batch: i64) -> sqlx::Result<u64> {
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (client, key) IN (
                SELECT client, key FROM idempotency_keys WHERE expires_at <= now()
                 LIMIT $1 FOR UPDATE SKIP LOCKED)",
        )
        .bind(batch)
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < batch as u64 {
            return Ok(total);
        }
    }
}

/// A stored key as an operator sees it (`dispatcher trace`).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct KeyRecord {
    pub client: String,
    pub key: String,
    pub method: String,
    pub path: String,
    /// SHA-256 of the canonical JSON body, hex.
    pub request_hash: String,
    /// None while the request that claimed it is still running.
    pub response_status: Option<i16>,
    pub response_body: Option<serde_json::Value>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// The stored keys named `key`: the one of `client`, or of every client.
/// With a client this is one primary-key lookup; without one it scans the
/// keys still stored (at most `ingest.idempotency_ttl_secs` of them).
pub async fn records(
    conn: &mut PgConnection,
    key: &str,
    client: Option<&str>,
) -> sqlx::Result<Vec<KeyRecord>> {
    sqlx::query_as(
        "SELECT client, key, method, path, encode(request_hash, 'hex') AS request_hash,
                response_status, response_body, created_at, expires_at
           FROM idempotency_keys
          WHERE key = $1 AND ($2::text IS NULL OR client = $2)
          ORDER BY created_at, client",
    )
    .bind(key)
    .bind(client)
    .fetch_all(conn)
    .await
}
