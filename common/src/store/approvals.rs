//! Tables `approvals` and `approval_decisions`.

use crate::domain::{ApprovalStatus, Decision, Text};
use crate::views::{ApprovalView, DecisionView};
use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

#[derive(Debug, Clone, FromRow)]
pub struct ApprovalRow {
    pub id: Uuid,
    pub booking_id: Uuid,
    pub requester_id: Uuid,
    pub title: String,
    pub reason: String,
    pub steps: i16,
    pub current_step: i16,
    pub status: ApprovalStatus,
    pub decided_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, FromRow)]
pub struct DecisionRow {
    pub step: i16,
    pub approver_id: Uuid,
    pub decision: Decision,
    pub reason: Option<String>,
    pub decided_at: DateTime<Utc>,
}

impl ApprovalRow {
    pub fn view(&self, decisions: &[DecisionRow]) -> ApprovalView {
        ApprovalView {
            id: self.id,
            booking_id: self.booking_id,
            requester_id: self.requester_id,
            title: self.title.clone(),
            reason: self.reason.clone(),
            steps: self.steps,
            current_step: self.current_step,
            status: self.status,
            decisions: decisions
                .iter()
                .map(|d| DecisionView {
                    step: d.step,
                    approver_id: d.approver_id,
                    decision: d.decision,
                    reason: d.reason.clone(),
                    decided_at: d.decided_at,
                })
                .collect(),
            decided_at: self.decided_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// A validated new approval request.
#[derive(Debug, Clone)]
pub struct NewApproval {
    pub booking_id: Uuid,
    pub requester_id: Uuid,
    pub title: Text,
    pub reason: Text,
    pub steps: i16,
}

pub async fn insert(
    conn: &mut PgConnection,
    id: Uuid,
    a: &NewApproval,
) -> sqlx::Result<ApprovalRow> {
    sqlx::query_as(
        "INSERT INTO approvals (id, booking_id, requester_id, title, reason, steps)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
    )
    .bind(id)
    .bind(a.booking_id)
    .bind(a.requester_id)
    .bind(a.title.as_str())
    .bind(a.reason.as_str())
    .bind(a.steps)
    .fetch_one(conn)
    .await
}

pub async fn get(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<ApprovalRow>> {
    sqlx::query_as("SELECT * FROM approvals WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

pub async fn lock(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<ApprovalRow>> {
    sqlx::query_as("SELECT * FROM approvals WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// The booking's live approval (PENDING or APPROVED), if any.
pub async fn live_for_booking(
    conn: &mut PgConnection,
    booking_id: Uuid,
) -> sqlx::Result<Option<ApprovalRow>> {
    sqlx::query_as("SELECT * FROM approvals WHERE booking_id = $1 AND status <> 'REJECTED'")
        .bind(booking_id)
        .fetch_optional(conn)
        .await
}

/// The booking's current approval: the live one, else the latest rejected.
pub async fn current_for_booking(
    conn: &mut PgConnection,
    booking_id: Uuid,
) -> sqlx::Result<Option<ApprovalRow>> {
    sqlx::query_as(
        "SELECT * FROM approvals WHERE booking_id = $1
          ORDER BY (status <> 'REJECTED') DESC, created_at DESC, id DESC LIMIT 1",
    )
    .bind(booking_id)
    .fetch_optional(conn)
    .await
}

/// Every approval of the booking, oldest first (rejected ones too).
pub async fn all_for_booking(
    conn: &mut PgConnection,
    booking_id: Uuid,
) -> sqlx::Result<Vec<ApprovalRow>> {
    sqlx::query_as("SELECT * FROM approvals WHERE booking_id = $1 ORDER BY created_at, id")
        .bind(booking_id)
        .fetch_all(conn)
        .await
}

pub async fn decisions(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Vec<DecisionRow>> {
    sqlx::query_as(
        "SELECT step, approver_id, decision, reason, decided_at
           FROM approval_decisions WHERE approval_id = $1 ORDER BY step",
    )
    .bind(id)
    .fetch_all(conn)
    .await
}

/// Whether this approver already decided a step of this approval.
pub async fn has_decided(
    conn: &mut PgConnection,
    id: Uuid,
    approver_id: Uuid,
) -> sqlx::Result<bool> {
    let row: Option<(i16,)> = sqlx::query_as(
        "SELECT step FROM approval_decisions WHERE approval_id = $1 AND approver_id = $2",
    )
    .bind(id)
    .bind(approver_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.is_some())
}

/// Records the decision of the current step and moves the approval on:
/// REJECTED at once, APPROVED after the last step, else the next step.
pub async fn decide(
    conn: &mut PgConnection,
    approval: &ApprovalRow,
    approver_id: Uuid,
    decision: Decision,
    reason: Option<&str>,
) -> sqlx::Result<ApprovalRow> {
    sqlx::query(
        "INSERT INTO approval_decisions (approval_id, step, approver_id, decision, reason)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(approval.id)
    .bind(approval.current_step)
    .bind(approver_id)
    .bind(decision)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    let (status, next_step, decided) = match decision {
        Decision::Rejected => (ApprovalStatus::Rejected, approval.current_step, true),
        Decision::Approved if approval.current_step >= approval.steps => {
            (ApprovalStatus::Approved, approval.current_step, true)
        }
        Decision::Approved => (ApprovalStatus::Pending, approval.current_step + 1, false),
    };
    sqlx::query_as(
        "UPDATE approvals SET status = $2, current_step = $3,
                decided_at = CASE WHEN $4 THEN now() ELSE NULL END
          WHERE id = $1 RETURNING *",
    )
    .bind(approval.id)
    .bind(status)
    .bind(next_step)
    .bind(decided)
    .fetch_one(conn)
    .await
}
