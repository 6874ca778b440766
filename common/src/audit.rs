//! The audit log (table `audit_log`): one row for every state change,
//! written in the same transaction as the change.

use serde_json::Value;
use sqlx::PgConnection;
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
