//! Table `payments`.

use crate::domain::{Currency, Money, PaymentMethod, PaymentOutcome, PaymentStatus, render_stored};
use crate::views::PaymentView;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

#[derive(Debug, Clone, FromRow)]
pub struct PaymentRow {
    pub id: Uuid,
    pub booking_id: Uuid,
    pub method: PaymentMethod,
    pub amount: Decimal,
    pub tax: Decimal,
    pub currency: Currency,
    pub status: PaymentStatus,
    pub approval_id: Option<String>,
    pub failure_reason: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl PaymentRow {
    pub fn view(&self) -> PaymentView {
        PaymentView {
            id: self.id,
            booking_id: self.booking_id,
            method: self.method,
            amount: render_stored(self.amount, self.currency),
            tax: render_stored(self.tax, self.currency),
            currency: self.currency,
            status: self.status,
            approval_id: self.approval_id.clone(),
            reason: self.failure_reason.clone(),
            decided_at: self.decided_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A validated new payment.
#[derive(Debug, Clone)]
pub struct NewPayment {
    pub booking_id: Uuid,
    pub method: PaymentMethod,
    pub amount: Money,
    pub tax: Money,
}

pub async fn insert(conn: &mut PgConnection, id: Uuid, p: &NewPayment) -> sqlx::Result<PaymentRow> {
    sqlx::query_as(
        "INSERT INTO payments (id, booking_id, method, amount, tax, currency)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
    )
    .bind(id)
    .bind(p.booking_id)
    .bind(p.method)
    .bind(p.amount.amount())
    .bind(p.tax.amount())
    .bind(p.amount.currency())
    .fetch_one(conn)
    .await
}

pub async fn get(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<PaymentRow>> {
    sqlx::query_as("SELECT * FROM payments WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

pub async fn lock(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<PaymentRow>> {
    sqlx::query_as("SELECT * FROM payments WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// The booking's live payment (PENDING or APPROVED), if any.
pub async fn live_for_booking(
    conn: &mut PgConnection,
    booking_id: Uuid,
) -> sqlx::Result<Option<PaymentRow>> {
    sqlx::query_as("SELECT * FROM payments WHERE booking_id = $1 AND status <> 'FAILED'")
        .bind(booking_id)
        .fetch_optional(conn)
        .await
}

/// The booking's current payment: the live one, else the latest failed one.
pub async fn current_for_booking(
    conn: &mut PgConnection,
    booking_id: Uuid,
) -> sqlx::Result<Option<PaymentRow>> {
    sqlx::query_as(
        "SELECT * FROM payments WHERE booking_id = $1
          ORDER BY (status <> 'FAILED') DESC, created_at DESC, id DESC LIMIT 1",
    )
    .bind(booking_id)
    .fetch_optional(conn)
    .await
}

/// Every payment of the booking, oldest first (failed ones too).
pub async fn all_for_booking(
    conn: &mut PgConnection,
    booking_id: Uuid,
) -> sqlx::Result<Vec<PaymentRow>> {
    sqlx::query_as("SELECT * FROM payments WHERE booking_id = $1 ORDER BY created_at, id")
        .bind(booking_id)
        .fetch_all(conn)
        .await
}

pub async fn decide(
    conn: &mut PgConnection,
    id: Uuid,
    outcome: PaymentOutcome,
    approval_id: Option<&str>,
    reason: Option<&str>,
) -> sqlx::Result<PaymentRow> {
    sqlx::query_as(
        "UPDATE payments SET status = $2, approval_id = $3, failure_reason = $4, decided_at = now()
          WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(outcome.as_str())
    .bind(approval_id)
    .bind(reason)
    .fetch_one(conn)
    .await
}
