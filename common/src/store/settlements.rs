//! Table `settlements`: one per booking, written by the settlement worker.

use crate::domain::{Currency, render_stored};
use crate::views::SettlementView;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

use super::payments::PaymentRow;

#[derive(Debug, Clone, FromRow)]
pub struct SettlementRow {
    pub id: Uuid,
    pub booking_id: Uuid,
    pub payment_id: Uuid,
    pub approval_id: Option<Uuid>,
    pub gross: Decimal,
    pub tax: Decimal,
    pub net: Decimal,
    pub currency: Currency,
    pub settled_at: DateTime<Utc>,
}

impl SettlementRow {
    pub fn view(&self) -> SettlementView {
        SettlementView {
            id: self.id,
            booking_id: self.booking_id,
            payment_id: self.payment_id,
            approval_id: self.approval_id,
            gross: render_stored(self.gross, self.currency),
            tax: render_stored(self.tax, self.currency),
            net: render_stored(self.net, self.currency),
            currency: self.currency,
            settled_at: self.settled_at,
        }
    }
}

pub async fn for_booking(
    conn: &mut PgConnection,
    booking_id: Uuid,
) -> sqlx::Result<Option<SettlementRow>> {
    sqlx::query_as(
        "SELECT id, booking_id, payment_id, approval_id, gross, tax, net, currency, settled_at
           FROM settlements WHERE booking_id = $1",
    )
    .bind(booking_id)
    .fetch_optional(conn)
    .await
}

/// Records the settlement of a payment's booking: gross and tax from the
/// approved payment, net = gross - tax.
pub async fn insert(
    conn: &mut PgConnection,
    id: Uuid,
    payment: &PaymentRow,
    approval_id: Option<Uuid>,
) -> sqlx::Result<SettlementRow> {
    sqlx::query_as(
        "INSERT INTO settlements (id, booking_id, payment_id, approval_id, gross, tax, net, currency)
         VALUES ($1, $2, $3, $4, $5, $6, $5 - $6, $7)
         RETURNING id, booking_id, payment_id, approval_id, gross, tax, net, currency, settled_at",
    )
    .bind(id)
    .bind(payment.booking_id)
    .bind(payment.id)
    .bind(approval_id)
    .bind(payment.amount)
    .bind(payment.tax)
    .bind(payment.currency)
    .fetch_one(conn)
    .await
}
