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
    domain::{ApprovalStatus, BookingStatus, EventType, PaymentStatus},
    events::{self, Change, SOURCE_WORKERS},
    store::{approvals, bookings, payments, settlements},
    views::EntityView,
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
            let booking_id = match event.event_type() {
                Ok(
                    EventType::PaymentApproved
                    | EventType::PaymentFailed
                    | EventType::ApprovalDecided,
                ) => match event.view() {
                    Ok(view) => view.booking_id(),
                    Err(reason) => return Outcome::Poison(reason),
                },
                Ok(other) => {
                    return Outcome::Poison(format!(
                        "unexpected event type {other} for settlement"
                    ));
                }
                Err(reason) => return Outcome::Poison(reason),
            };
            let Some(booking_id) = booking_id else {
                return Outcome::Poison(format!("{}: data names no booking", event.kind));
            };
            // Deduplicated by message_id, as every consumer does; the body's
            // id when a message comes without one.
            let message_id = msg
                .message_id
                .clone()
                .unwrap_or_else(|| event.id.to_string());
            // The events this causes carry on the trace of the one that came in.
            let traceparent = msg.traceparent.as_ref().map(|tp| tp.child().to_string());
            match self.apply(&message_id, booking_id, traceparent).await {
                Ok(outcome) => outcome,
                Err(err) if db::is_unavailable(&err) => Outcome::Retry(format!("database: {err}")),
                Err(err) => Outcome::Retry(format!("settlement failed: {err}")),
            }
        })
    }
}

impl Settlement {
    async fn apply(
        &self,
        message_id: &str,
        booking_id: Uuid,
        traceparent: Option<String>,
    ) -> sqlx::Result<Outcome> {
        let mut tx = self.pool.begin().await?;
        if !inbox::claim(&mut tx, CONSUMER, message_id).await? {
            return Ok(Outcome::Duplicate);
        }
        let outcome = settle_if_due(&mut tx, booking_id, traceparent).await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// Settles the booking when its payment (and approval, if required) are
/// approved; otherwise leaves it as it is.
async fn settle_if_due(
    conn: &mut PgConnection,
    booking_id: Uuid,
    traceparent: Option<String>,
) -> sqlx::Result<Outcome> {
    let Some(booking) = bookings::lock(conn, booking_id).await? else {
        tracing::warn!(%booking_id, "event for an unknown booking; nothing to settle");
        return Ok(Outcome::Processed);
    };
    if booking.status != BookingStatus::Pending {
        return Ok(Outcome::Processed);
    }
    let Some(payment) = payments::live_for_booking(conn, booking_id).await? else {
        return Ok(Outcome::Processed);
    };
    if payment.status != PaymentStatus::Approved {
        return Ok(Outcome::Processed);
    }
    let approval = if booking.requires_approval {
        match approvals::live_for_booking(conn, booking_id).await? {
            Some(a) if a.status == ApprovalStatus::Approved => Some(a),
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
    events::record_change(
        conn,
        Change {
            actor: ACTOR,
            action: "settlement.record",
            id: settlement.id,
            event: EventType::SettlementRecorded,
            source: SOURCE_WORKERS,
            data: EntityView::Settlement(settlement.view()),
            detail: json!({ "bookingId": booking_id, "paymentId": payment.id }),
            idempotency_key: None,
            traceparent: traceparent.clone(),
        },
    )
    .await?;
    events::record_change(
        conn,
        Change {
            actor: ACTOR,
            action: "booking.confirm",
            id: booking_id,
            event: EventType::BookingConfirmed,
            source: SOURCE_WORKERS,
            data: EntityView::Booking(confirmed.view()),
            detail: json!({ "from": booking.status, "to": confirmed.status, "settlementId": settlement.id }),
            idempotency_key: None,
            traceparent,
        },
    )
    .await?;
    tracing::info!(%booking_id, settlement_id = %settlement.id, "booking settled");
    Ok(Outcome::Processed)
}
