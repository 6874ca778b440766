//! `dispatcher trace`: everything the fleet knows of one booking (by id or
//! code) or of one idempotency key, in one answer: the key's client,
//! endpoint, hash and stored answer; the booking with its payments,
//! approvals and settlement; the audit trail; each event's publish state;
//! and each event's webhook deliveries per subscriber, the configured
//! subscribers that have none yet included. "Where is the notification for
//! booking X?" is `dispatcher trace X`.
//!
//! It owns no table: each part is read through the module that owns it
//! (docs/architecture.md, "Who owns which table"), and every read is an
//! index lookup, except a key without its client (see
//! [`entrip_ingest::idempotency::records`]).

use std::fmt::Write as _;

use entrip_common::{
    audit::{self, AuditRecord},
    config::WebhookSettings,
    domain::AggregateType,
    store::{self, approvals, bookings, payments},
    views::{ApprovalView, BookingDetail, PaymentView},
};
use entrip_ingest::idempotency::{self, KeyRecord};
use entrip_workers::notifications::deliveries::{self, DeliveryRecord};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::outbox::{self, EventState};

/// What to trace.
#[derive(Debug, Clone)]
pub enum Target {
    /// A booking by its id or its code.
    Booking(String),
    /// An idempotency key, of one client or of any.
    Key { key: String, client: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("no booking with id or code {0:?}")]
    NoBooking(String),
    #[error(
        "no stored idempotency key {0:?} (keys expire after ingest.idempotency_ttl_secs; trace the booking by id or code instead)"
    )]
    NoKey(String),
    #[error("key {key:?} answered for several bookings ({clients}); name the client with --client")]
    Ambiguous { key: String, clients: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl TraceError {
    /// Whether the question is at fault (nothing to trace: exit 1), not
    /// the database (exit 2).
    pub fn is_input(&self) -> bool {
        !matches!(self, Self::Database(_))
    }
}

/// Everything known of one booking or key.
#[derive(Debug, Serialize)]
pub struct Trace {
    /// The idempotency keys: the one asked for, or those the booking's
    /// changes were made under that are still stored.
    pub keys: Vec<KeyRecord>,
    /// The booking with its current payment, approval and settlement; none
    /// when a key's answer names no booking.
    pub booking: Option<BookingDetail>,
    /// Every payment of the booking, failed ones too.
    pub payments: Vec<PaymentView>,
    /// Every approval of the booking, rejected ones too.
    pub approvals: Vec<ApprovalView>,
    /// The audit rows of the booking, its payments, approvals and
    /// settlement, in the order they were written.
    pub audit: Vec<AuditRecord>,
    /// The events of those changes, each with its deliveries.
    pub events: Vec<EventTrace>,
}

/// Where an event is on its way to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Publish {
    /// The broker confirmed it.
    Published,
    /// Not yet: the relay publishes or retries it.
    Pending,
    /// Given up: needs `dispatcher outbox redrive`.
    Dead,
    /// Published, then deleted after `dispatcher.retention_hours`.
    Purged,
}

impl Publish {
    fn of(row: Option<&EventState>) -> Self {
        match row {
            None => Self::Purged,
            Some(s) if s.published_at.is_some() => Self::Published,
            Some(s) if s.dead_at.is_some() => Self::Dead,
            Some(_) => Self::Pending,
        }
    }
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Published => "published",
            Self::Pending => "pending",
            Self::Dead => "dead",
            Self::Purged => "purged",
        })
    }
}

/// One event: its publish state and its webhook deliveries.
#[derive(Debug, Serialize)]
pub struct EventTrace {
    pub id: Uuid,
    /// Unknown once the published row was deleted after retention.
    pub topic: Option<String>,
    pub state: Publish,
    pub outbox: Option<EventState>,
    /// One per subscriber: each recorded pair, then each configured
    /// subscriber of the topic with no record yet.
    pub deliveries: Vec<DeliveryTrace>,
}

/// One (event, subscriber) pair.
#[derive(Debug, Serialize)]
pub struct DeliveryTrace {
    pub subscriber: String,
    /// `DELIVERED`, `PENDING` (being retried), `DEAD`, or `NONE` (no
    /// attempt recorded).
    pub status: String,
    /// Where to look next when it is not delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<&'static str>,
    pub record: Option<DeliveryRecord>,
}

/// Reads the trace of `target`. `webhooks` are the configured subscribers
/// (`notifications.webhooks`), to show the deliveries still missing.
pub async fn trace(
    pool: &PgPool,
    target: &Target,
    webhooks: &[WebhookSettings],
) -> Result<Trace, TraceError> {
    // One snapshot: an event and its deliveries as of one moment.
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let conn = &mut *tx;
    let (booking, mut keys) = match target {
        Target::Booking(id_or_code) => {
            let row = match Uuid::parse_str(id_or_code) {
                Ok(id) => bookings::get(conn, id).await?,
                Err(_) => bookings::get_by_code(conn, id_or_code).await?,
            };
            let row = row.ok_or_else(|| TraceError::NoBooking(id_or_code.clone()))?;
            (Some(row.id), Vec::new())
        }
        Target::Key { key, client } => {
            let keys = idempotency::records(conn, key, client.as_deref()).await?;
            if keys.is_empty() {
                return Err(TraceError::NoKey(key.clone()));
            }
            let mut named: Vec<Uuid> = keys.iter().filter_map(booking_of).collect();
            named.sort_unstable();
            named.dedup();
            if named.len() > 1 {
                let clients = keys.iter().map(|k| k.client.as_str()).collect::<Vec<_>>();
                return Err(TraceError::Ambiguous {
                    key: key.clone(),
                    clients: clients.join(", "),
                });
            }
            (named.first().copied(), keys)
        }
    };
    let mut trace = Trace {
        keys: Vec::new(),
        booking: None,
        payments: Vec::new(),
        approvals: Vec::new(),
        audit: Vec::new(),
        events: Vec::new(),
    };
    if let Some(id) = booking {
        trace.booking = store::booking_detail(conn, id).await?;
        let payments = payments::all_for_booking(conn, id).await?;
        let approvals = approvals::all_for_booking(conn, id).await?;
        let mut entities = vec![(AggregateType::Booking, id)];
        entities.extend(payments.iter().map(|p| (AggregateType::Payment, p.id)));
        entities.extend(approvals.iter().map(|a| (AggregateType::Approval, a.id)));
        if let Some(s) = trace.booking.as_ref().and_then(|b| b.settlement.as_ref()) {
            entities.push((AggregateType::Settlement, s.id));
        }
        trace.audit = audit::trail(conn, &entities).await?;
        trace.payments = payments.iter().map(|p| p.view()).collect();
        for a in &approvals {
            trace.approvals.push(store::approval_view(conn, a).await?);
        }
        if matches!(target, Target::Booking(_)) {
            keys = keys_of(conn, &trace.audit).await?;
        }
    }
    trace.keys = keys;
    let event_ids: Vec<Uuid> = trace.audit.iter().filter_map(|a| a.event_id).collect();
    let states = outbox::events(conn, &event_ids).await?;
    let recorded = deliveries::for_events(conn, &event_ids).await?;
    tx.commit().await?;
    trace.events = event_ids
        .iter()
        .map(|id| event_trace(*id, &states, &recorded, webhooks))
        .collect();
    Ok(trace)
}

/// The booking a stored answer names: a booking's `id` (the answers of
/// `/v1/bookings…`), or the `bookingId` of a payment or an approval.
fn booking_of(key: &KeyRecord) -> Option<Uuid> {
    let body = key.response_body.as_ref()?;
    let id = match body.get("bookingId") {
        Some(id) => id,
        None if key.path.starts_with("/v1/bookings") => body.get("id")?,
        None => return None,
    };
    id.as_str().and_then(|s| Uuid::parse_str(s).ok())
}

/// The stored keys the audited changes were made under (`client:<name>`
/// actors; a key of another actor is looked up for every client).
async fn keys_of(
    conn: &mut sqlx::PgConnection,
    audit: &[AuditRecord],
) -> sqlx::Result<Vec<KeyRecord>> {
    let mut asked: Vec<(&str, Option<&str>)> = Vec::new();
    for a in audit {
        if let Some(key) = a.idempotency_key.as_deref() {
            let pair = (key, a.actor.strip_prefix("client:"));
            if !asked.contains(&pair) {
                asked.push(pair);
            }
        }
    }
    let mut keys = Vec::new();
    for (key, client) in asked {
        keys.extend(idempotency::records(conn, key, client).await?);
    }
    Ok(keys)
}

fn event_trace(
    id: Uuid,
    states: &[EventState],
    recorded: &[DeliveryRecord],
    webhooks: &[WebhookSettings],
) -> EventTrace {
    let outbox = states.iter().find(|s| s.id == id).cloned();
    let state = Publish::of(outbox.as_ref());
    let mut deliveries: Vec<DeliveryTrace> = recorded
        .iter()
        .filter(|d| d.event_id == id)
        .map(|d| DeliveryTrace {
            subscriber: d.subscriber.clone(),
            status: d.status.clone(),
            hint: match d.status.as_str() {
                "PENDING" => Some("being retried (entrip.notifications.retry, then its DLQ)"),
                "DEAD" => Some(
                    "given up: dispatcher notifications redeliver <booking> --subscriber <url>",
                ),
                _ => None,
            },
            record: Some(d.clone()),
        })
        .collect();
    let topic = outbox.as_ref().map(|s| s.topic.clone()).or_else(|| {
        recorded
            .iter()
            .find(|d| d.event_id == id)
            .map(|d| d.topic.clone())
    });
    if let Some(topic) = &topic {
        for hook in webhooks {
            if hook.wants(topic) && !deliveries.iter().any(|d| d.subscriber == hook.url) {
                deliveries.push(DeliveryTrace {
                    subscriber: hook.url.clone(),
                    status: "NONE".to_owned(),
                    hint: Some(match state {
                        Publish::Pending => "not sent: the event is not published yet (dispatcher outbox stats)",
                        Publish::Dead => "not sent: the event is dead in the outbox (dispatcher outbox redrive)",
                        Publish::Published | Publish::Purged => "published, no attempt recorded: in entrip.notifications or its DLQ (dispatcher dlq list entrip.notifications.dlq), or the subscriber was added later",
                    }),
                    record: None,
                });
            }
        }
    }
    EventTrace {
        id,
        topic,
        state,
        outbox,
        deliveries,
    }
}

impl Trace {
    /// The trace for a person: one section per part.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let ts = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string();
        let _ = writeln!(out, "idempotency keys ({})", self.keys.len());
        for k in &self.keys {
            let answer = match k.response_status {
                Some(status) => status.to_string(),
                None => "no answer yet".to_owned(),
            };
            let _ = writeln!(
                out,
                "  client {} key {}: {} {} -> {answer}; hash {}; stored {}, expires {}",
                k.client,
                k.key,
                k.method,
                k.path,
                k.request_hash,
                ts(&k.created_at),
                ts(&k.expires_at)
            );
            if let Some(body) = &k.response_body {
                let _ = writeln!(out, "    answer {body}");
            }
        }
        match &self.booking {
            None => out.push_str("booking: none named\n"),
            Some(d) => {
                let b = &d.booking;
                let _ = writeln!(
                    out,
                    "booking {} code {} {}: {} {}, user {}, created {}",
                    b.id,
                    b.code,
                    b.status,
                    b.amount,
                    b.currency,
                    b.user_id,
                    ts(&b.created_at)
                );
                for p in &self.payments {
                    let _ = writeln!(
                        out,
                        "  payment {} {} {} {} {}{}",
                        p.id,
                        p.status,
                        p.method,
                        p.amount,
                        p.currency,
                        p.reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    );
                }
                for a in &self.approvals {
                    let _ = writeln!(out, "  approval {} {}", a.id, a.status);
                }
                match &d.settlement {
                    Some(s) => {
                        let _ = writeln!(
                            out,
                            "  settlement {} gross {} tax {} net {} {}, settled {}",
                            s.id,
                            s.gross,
                            s.tax,
                            s.net,
                            s.currency,
                            ts(&s.settled_at)
                        );
                    }
                    None => out.push_str("  settlement: none\n"),
                }
            }
        }
        let _ = writeln!(out, "audit trail ({})", self.audit.len());
        for a in &self.audit {
            let _ = writeln!(
                out,
                "  {} {} {} {} {}{}",
                ts(&a.occurred_at),
                a.actor,
                a.action,
                a.entity_type,
                a.entity_id,
                a.idempotency_key
                    .as_deref()
                    .map(|k| format!(" key {k}"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(out, "events ({})", self.events.len());
        for e in &self.events {
            let topic = e.topic.as_deref().unwrap_or("?");
            let state = match &e.outbox {
                Some(o) => match (&o.published_at, &o.dead_at) {
                    (Some(at), _) if o.attempts > 0 => format!(
                        "published {} after {} failed attempt(s)",
                        ts(at),
                        o.attempts
                    ),
                    (Some(at), _) => format!("published {}", ts(at)),
                    (None, Some(at)) => format!(
                        "DEAD since {} after {} attempt(s): {}",
                        ts(at),
                        o.attempts,
                        o.last_error.as_deref().unwrap_or("-")
                    ),
                    (None, None) => format!(
                        "PENDING, {} failed attempt(s), next {}{}",
                        o.attempts,
                        ts(&o.next_attempt_at),
                        o.last_error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                },
                None => "purged from the outbox after its retention (published)".to_owned(),
            };
            let _ = writeln!(out, "  {} {topic}: {state}", e.id);
            if e.deliveries.is_empty() && e.topic.is_some() {
                out.push_str("    -> no subscriber wants this topic\n");
            }
            for d in &e.deliveries {
                let detail = match &d.record {
                    Some(r) => format!(
                        " after {} attempt(s){}{}{}",
                        r.attempts,
                        r.last_status_code
                            .map(|c| format!(", last answer {c}"))
                            .unwrap_or_default(),
                        r.delivered_at
                            .as_ref()
                            .map(|t| format!(", delivered {}", ts(t)))
                            .unwrap_or_default(),
                        r.last_error
                            .as_deref()
                            .map(|e| format!(", last error: {e}"))
                            .unwrap_or_default()
                    ),
                    None => String::new(),
                };
                let hint = d.hint.map(|h| format!(" [{h}]")).unwrap_or_default();
                let _ = writeln!(out, "    -> {} {}{detail}{hint}", d.subscriber, d.status);
            }
        }
        out
    }
}
