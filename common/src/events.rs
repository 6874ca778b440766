//! The outbox writer (table `outbox`) and the CloudEvents envelope: every
//! state change enqueues its event in the same transaction as the change;
//! the dispatcher publishes it later.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    domain::{AggregateType, EventType},
    views::EntityView,
};

/// `source` of events that ingest emits.
pub const SOURCE_INGEST: &str = "/entrip/ingest";
/// `source` of events that the workers emit.
pub const SOURCE_WORKERS: &str = "/entrip/workers";
/// `content_type` of every published message.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// A CloudEvents 1.0 JSON envelope; stored as the outbox payload and
/// published as is.
#[derive(Debug, Clone, Serialize)]
pub struct CloudEvent<'a> {
    pub specversion: &'static str,
    pub id: Uuid,
    pub source: &'a str,
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub subject: String,
    pub time: DateTime<Utc>,
    pub datacontenttype: &'static str,
    pub data: &'a Value,
}

/// An event to enqueue. Its `data` is already JSON: the services go through
/// [`Change`], which takes the typed view.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: Uuid,
    pub event_type: EventType,
    pub aggregate_type: AggregateType,
    pub aggregate_id: Uuid,
    pub source: &'static str,
    /// The entity after the change.
    pub data: Value,
    /// W3C trace context of the request that caused the event, when known.
    pub traceparent: Option<String>,
}

impl NewEvent {
    pub fn new(
        event_type: EventType,
        aggregate_type: AggregateType,
        aggregate_id: Uuid,
        source: &'static str,
        data: Value,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            event_type,
            aggregate_type,
            aggregate_id,
            source,
            data,
            traceparent: None,
        }
    }

    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// The CloudEvents envelope of this event at `time`.
    pub fn envelope(&self, time: DateTime<Utc>) -> CloudEvent<'_> {
        CloudEvent {
            specversion: "1.0",
            id: self.id,
            source: self.source,
            event_type: self.event_type.as_str(),
            subject: self.aggregate_id.to_string(),
            time,
            datacontenttype: "application/json",
            data: &self.data,
        }
    }
}

/// Enqueues the event inside the caller's transaction. The caller must hold
/// a lock on the aggregate's row so that `seq` follows commit order.
pub async fn enqueue(conn: &mut PgConnection, event: &NewEvent) -> sqlx::Result<()> {
    let (payload, headers) = event.stored()?;
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload, headers)
         VALUES ($1, $2, $3, $4, $5::json, $6)",
    )
    .bind(event.id)
    .bind(event.aggregate_type.as_str())
    .bind(event.aggregate_id)
    .bind(event.event_type.as_str())
    .bind(payload)
    .bind(headers)
    .execute(conn)
    .await?;
    Ok(())
}

impl NewEvent {
    /// The outbox row's payload (the CloudEvents envelope, as text: it is
    /// sent as text and stored as json, see the migrations, so no
    /// conversion) and headers.
    fn stored(&self) -> sqlx::Result<(String, Value)> {
        let payload = serde_json::to_string(&self.envelope(Utc::now()))
            .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let headers = match &self.traceparent {
            Some(tp) => serde_json::json!({ "traceparent": tp }),
            None => serde_json::json!({}),
        };
        Ok((payload, headers))
    }
}

/// One state change: its audit row and its event, written together.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub id: Uuid,
    pub event: EventType,
    pub source: &'static str,
    /// The entity after the change (its kind is the audit row's and the
    /// event's aggregate); it must be the kind `event` carries.
    pub data: EntityView,
    pub detail: Value,
    pub idempotency_key: Option<&'a str>,
    pub traceparent: Option<String>,
}

/// The audit row and the outbox row of one change in one statement: one
/// round trip instead of two on every command (docs/decisions.md). The
/// audit half is `audit::record`'s insert; the outbox half is `enqueue`'s.
/// A data-modifying CTE always runs to completion, read or not.
const RECORD_CHANGE_SQL: &str = "WITH audit AS (
         INSERT INTO audit_log (actor, action, entity_type, entity_id, detail, idempotency_key, event_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7))
     INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload, headers)
     VALUES ($7, $3, $4, $8, $9::json, $10)";

/// Writes the audit row and enqueues the event of `change` in the caller's
/// transaction (the caller holds the aggregate's lock, as for `enqueue`);
/// returns the event id.
pub async fn record_change(conn: &mut PgConnection, change: Change<'_>) -> sqlx::Result<Uuid> {
    let aggregate = change.data.aggregate();
    debug_assert_eq!(aggregate, change.event.aggregate());
    let data = serde_json::to_value(&change.data).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let event = NewEvent::new(change.event, aggregate, change.id, change.source, data)
        .with_traceparent(change.traceparent);
    let (payload, headers) = event.stored()?;
    sqlx::query(RECORD_CHANGE_SQL)
        .bind(change.actor)
        .bind(change.action)
        .bind(aggregate.as_str())
        .bind(change.id)
        .bind(&change.detail)
        .bind(change.idempotency_key)
        .bind(event.id)
        .bind(change.event.as_str())
        .bind(payload)
        .bind(headers)
        .execute(conn)
        .await?;
    tracing::debug!(event_id = %event.id, topic = %change.event, "event enqueued");
    Ok(event.id)
}
