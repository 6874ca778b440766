//! SQL for the entity tables, one module per table; each returns rows and
//! renders them as the typed views of `views.rs`.

pub mod approvals;
pub mod bookings;
pub mod payments;
pub mod settlements;
pub mod users;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::views::{ApprovalView, BookingDetail};

/// The booking with its current payment, approval and settlement: the
/// answer of `GET /v1/bookings/{id}` (and part of `dispatcher trace`).
pub async fn booking_detail(
    conn: &mut PgConnection,
    id: Uuid,
) -> sqlx::Result<Option<BookingDetail>> {
    let Some(booking) = bookings::get(conn, id).await? else {
        return Ok(None);
    };
    let payment = payments::current_for_booking(conn, id).await?;
    let approval = match approvals::current_for_booking(conn, id).await? {
        Some(a) => Some(approval_view(conn, &a).await?),
        None => None,
    };
    let settlement = settlements::for_booking(conn, id).await?;
    Ok(Some(BookingDetail {
        booking: booking.view(),
        payment: payment.map(|p| p.view()),
        approval,
        settlement: settlement.map(|s| s.view()),
    }))
}

/// The approval's view, with its decisions.
pub async fn approval_view(
    conn: &mut PgConnection,
    approval: &approvals::ApprovalRow,
) -> sqlx::Result<ApprovalView> {
    let decisions = approvals::decisions(conn, approval.id).await?;
    Ok(approval.view(&decisions))
}
