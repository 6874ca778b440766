//! Table `bookings`.

use crate::domain::{BookingCode, BookingStatus, Money, Phone, Text, render_stored};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Value, json};
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
    pub currency: String,
    pub amount: Decimal,
    pub requires_approval: bool,
    pub status: String,
    pub cancel_reason: Option<String>,
    pub canceled_at: Option<DateTime<Utc>>,
    pub confirmed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl BookingRow {
    pub fn status(&self) -> Option<BookingStatus> {
        BookingStatus::parse(&self.status).ok()
    }

    pub fn view(&self) -> Value {
        json!({
            "id": self.id,
            "code": self.code,
            "userId": self.user_id,
            "customerName": self.customer_name,
            "customerPhone": self.customer_phone,
            "itineraryFrom": self.itinerary_from,
            "itineraryTo": self.itinerary_to,
            "departAt": self.depart_at,
            "arriveAt": self.arrive_at,
            "currency": self.currency,
            "amount": render_stored(self.amount, &self.currency),
            "requiresApproval": self.requires_approval,
            "status": self.status,
            "cancelReason": self.cancel_reason,
            "canceledAt": self.canceled_at,
            "confirmedAt": self.confirmed_at,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        })
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
    .bind(b.price.currency().code())
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
