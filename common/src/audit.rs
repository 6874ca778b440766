//! The audit log (table `audit_log`): one row for every state change,
//! written in the same transaction as the change, and read back as an
//! entity's trail (`dispatcher trace`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

use crate::domain::AggregateType;

/// One audit row: who did what to which entity.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub entity_type: AggregateType,
    pub entity_id: Uuid,
    pub detail: Value,
    pub idempotency_key: Option<&'a str>,
    pub event_id: Option<Uuid>,
}

/// Appends the entry inside the caller's transaction.
pub async fn record(conn: &mut PgConnection, entry: &AuditEntry<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity_type, entity_id, detail, idempotency_key, event_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.entity_type.as_str())
    .bind(entry.entity_id)
    .bind(&entry.detail)
    .bind(entry.idempotency_key)
    .bind(entry.event_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// An audit row as stored.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct AuditRecord {
    pub id: i64,
    pub occurred_at: DateTime<Utc>,
    /// `client:<name>` for a request, `worker:<consumer>` for a worker.
    pub actor: String,
    pub action: String,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub detail: Value,
    pub idempotency_key: Option<String>,
    /// The outbox event written with the change.
    pub event_id: Option<Uuid>,
}

/// The trail of these entities, in the order it was written: one indexed
/// lookup per entity (`audit_log_entity_idx`).
pub async fn trail(
    conn: &mut PgConnection,
    entities: &[(AggregateType, Uuid)],
) -> sqlx::Result<Vec<AuditRecord>> {
    let (types, ids): (Vec<&str>, Vec<Uuid>) =
        entities.iter().map(|(t, id)| (t.as_str(), *id)).unzip();
    sqlx::query_as(
        "SELECT id, occurred_at, actor, action, entity_type, entity_id, detail, idempotency_key, event_id
           FROM audit_log
          WHERE (entity_type, entity_id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))
          ORDER BY id",
    )
    .bind(types)
    .bind(ids)
    .fetch_all(conn)
    .await
}
