//! Table `bookings`.

use crate::domain::{BookingCode, BookingStatus, Currency, Money, Phone, Text, render_stored};
use crate::views::BookingView;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

#[derive(Debug, Clone, FromRow)]
pub struct BookingRow {
    pub id: Uuid,
    pub code: String,
    pub user_id: Uuid,
    pub customer_name: String,
    pub customer_phone: String,
    pub itinerary_from: String,
    pub itinerary_to: String,
    pub depart_at: DateTime<Utc>,
    pub arrive_at: DateTime<Utc>,
    pub currency: Currency,
    pub amount: Decimal,
    pub requires_approval: bool,
    pub status: BookingStatus,
    pub cancel_reason: Option<String>,
    pub canceled_at: Option<DateTime<Utc>>,
    pub confirmed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl BookingRow {
    pub fn view(&self) -> BookingView {
        BookingView {
            id: self.id,
            code: self.code.clone(),
            user_id: self.user_id,
            customer_name: self.customer_name.clone(),
            customer_phone: self.customer_phone.clone(),
            itinerary_from: self.itinerary_from.clone(),
            itinerary_to: self.itinerary_to.clone(),
            depart_at: self.depart_at,
            arrive_at: self.arrive_at,
            currency: self.currency,
            amount: render_stored(self.amount, self.currency),
            requires_approval: self.requires_approval,
            status: self.status,
            cancel_reason: self.cancel_reason.clone(),
            canceled_at: self.canceled_at,
            confirmed_at: self.confirmed_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A validated new booking.
#[derive(Debug, Clone)]
pub struct NewBooking {
    pub code: BookingCode,
    pub user_id: Uuid,
    pub customer_name: Text,
    pub customer_phone: Phone,
    pub itinerary_from: Text,
    pub itinerary_to: Text,
    pub depart_at: DateTime<Utc>,
    pub arrive_at: DateTime<Utc>,
    pub price: Money,
    pub requires_approval: bool,
}

pub async fn insert(conn: &mut PgConnection, id: Uuid, b: &NewBooking) -> sqlx::Result<BookingRow> {
    sqlx::query_as(
        "INSERT INTO bookings (id, code, user_id, customer_name, customer_phone, itinerary_from,
                               itinerary_to, depart_at, arrive_at, currency, amount, requires_approval)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         RETURNING *",
    )
    .bind(id)
    .bind(b.code.as_str())
    .bind(b.user_id)
    .bind(b.customer_name.as_str())
    .bind(b.customer_phone.as_str())
    .bind(b.itinerary_from.as_str())
    .bind(b.itinerary_to.as_str())
    .bind(b.depart_at)
    .bind(b.arrive_at)
    .bind(b.price.currency())
    .bind(b.price.amount())
    .bind(b.requires_approval)
    .fetch_one(conn)
    .await
}

pub async fn get(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<BookingRow>> {
    sqlx::query_as("SELECT * FROM bookings WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// The booking with this code (`bookings.code` is unique).
pub async fn get_by_code(conn: &mut PgConnection, code: &str) -> sqlx::Result<Option<BookingRow>> {
    sqlx::query_as("SELECT * FROM bookings WHERE code = $1")
        .bind(code)
        .fetch_optional(conn)
        .await
}

/// Reads and locks the booking until commit: every change to a booking or
/// its payments and approvals is serialised here.
pub async fn lock(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<BookingRow>> {
    sqlx::query_as("SELECT * FROM bookings WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(conn)
        .await
}

pub async fn cancel(conn: &mut PgConnection, id: Uuid, reason: &Text) -> sqlx::Result<BookingRow> {
    sqlx::query_as(
        "UPDATE bookings SET status = 'CANCELED', cancel_reason = $2, canceled_at = now()
          WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(reason.as_str())
    .fetch_one(conn)
    .await
}

/// PENDING → CONFIRMED (the settlement worker, in its transaction).
pub async fn confirm(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<BookingRow> {
    sqlx::query_as(
        "UPDATE bookings SET status = 'CONFIRMED', confirmed_at = now()
          WHERE id = $1 AND status = 'PENDING' RETURNING *",
    )
    .bind(id)
    .fetch_one(conn)
    .await
}
