//! The settlement consumer (queue `entrip.settlement`): a booking is settled
//! when its payment is APPROVED and, if it requires approval, its approval
//! is APPROVED — whichever event comes last. Events are only triggers: the
//! state is read again under the booking's lock, so the order and number of
//! deliveries do not matter. One transaction: inbox row, settlement, booking
//! → CONFIRMED, audit rows, outbox `settlement.recorded` and
//! `booking.confirmed`.

use entrip_common::{
    amqp::SETTLEMENT_QUEUE,
    db,
    domain::{AggregateType, ApprovalStatus, BookingStatus, EventType, PaymentStatus},
    events::{self, Change, SOURCE_WORKERS},
    store::{approvals, bookings, payments, settlements},
};
use futures::future::BoxFuture;
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    event::Event,
    inbox,
    runtime::{Handler, Message, Outcome},
};

/// The consumer's name: metrics label and inbox consumer.
pub(crate) const CONSUMER: &str = "settlement";
const ACTOR: &str = "worker:settlement";

/// The settlement handler.
pub struct Settlement {
    pool: PgPool,
}

impl Settlement {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl Handler for Settlement {
    fn name(&self) -> &'static str {
        CONSUMER
    }

    fn queue(&self) -> &'static str {
        SETTLEMENT_QUEUE
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let event = match Event::parse(msg) {
                Ok(e) => e,
                Err(reason) => return Outcome::Poison(reason),
            };
            let booking_id = match event.kind.as_str() {
                "payment.approved" | "payment.failed" | "approval.decided" => {
                    match event.data_uuid("bookingId") {
                        Ok(id) => id,
                        Err(reason) => return Outcome::Poison(reason),
                    }
                }
                other => {
                    return Outcome::Poison(format!("unknown event type {other} for settlement"));
                }
            };
            // Deduplicated by message_id, as every consumer does; the body's
            // id when a message comes without one.
            let message_id = msg
                .message_id
                .clone()
                .unwrap_or_else(|| event.id.to_string());
            match self.apply(&message_id, booking_id).await {
                Ok(outcome) => outcome,
                Err(err) if db::is_unavailable(&err) => Outcome::Retry(format!("database: {err}")),
                Err(err) => Outcome::Retry(format!("settlement failed: {err}")),
            }
        })
    }
}

impl Settlement {
    async fn apply(&self, message_id: &str, booking_id: Uuid) -> sqlx::Result<Outcome> {
        let mut tx = self.pool.begin().await?;
        if !inbox::claim(&mut tx, CONSUMER, message_id).await? {
            return Ok(Outcome::Duplicate);
        }
        let outcome = settle_if_due(&mut tx, booking_id).await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// Settles the booking when its payment (and approval, if required) are
/// approved; otherwise leaves it as it is.
async fn settle_if_due(conn: &mut PgConnection, booking_id: Uuid) -> sqlx::Result<Outcome> {
    let Some(booking) = bookings::lock(conn, booking_id).await? else {
        tracing::warn!(%booking_id, "event for an unknown booking; nothing to settle");
        return Ok(Outcome::Processed);
    };
    if booking.status() != Some(BookingStatus::Pending) {
        return Ok(Outcome::Processed);
    }
    let Some(payment) = payments::live_for_booking(conn, booking_id).await? else {
        return Ok(Outcome::Processed);
    };
    if payment.status() != Some(PaymentStatus::Approved) {
        return Ok(Outcome::Processed);
    }
    let approval = if booking.requires_approval {
        match approvals::live_for_booking(conn, booking_id).await? {
            Some(a) if a.status() == Some(ApprovalStatus::Approved) => Some(a),
            _ => return Ok(Outcome::Processed),
        }
    } else {
        None
    };
    let settlement = settlements::insert(
        conn,
        Uuid::now_v7(),
        &payment,
        approval.as_ref().map(|a| a.id),
    )
    .await?;
    let confirmed = bookings::confirm(conn, booking_id).await?;
    let settlement_view = settlement.view();
    events::record_change(
        conn,
        Change {
            actor: ACTOR,
            action: "settlement.record",
            aggregate: AggregateType::Settlement,
            id: settlement.id,
            event: EventType::SettlementRecorded,
            source: SOURCE_WORKERS,
            data: settlement_view.clone(),
            detail: json!({ "bookingId": booking_id, "paymentId": payment.id }),
            idempotency_key: None,
            traceparent: None,
        },
    )
    .await?;
    events::record_change(
        conn,
        Change {
            actor: ACTOR,
            action: "booking.confirm",
            aggregate: AggregateType::Booking,
            id: booking_id,
            event: EventType::BookingConfirmed,
            source: SOURCE_WORKERS,
            data: confirmed.view(),
            detail: json!({ "from": booking.status, "to": confirmed.status, "settlementId": settlement.id }),
            idempotency_key: None,
            traceparent: None,
        },
    )
    .await?;
    tracing::info!(%booking_id, settlement_id = %settlement.id, "booking settled");
    Ok(Outcome::Processed)
}
