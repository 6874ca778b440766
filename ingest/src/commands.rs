//! The commands ingest accepts and their business rules. Each command runs
//! inside the request's transaction and writes the change, its audit row and
//! its outbox event together; the caller commits with the idempotency record.
//! Commands are transport-free so that HTTP and AMQP share them: they answer
//! with a [`Reply`] or a [`CommandError`], and each transport maps those (HTTP
//! in `error.rs`, AMQP in `amqp.rs`).

use entrip_common::{
    domain::{
        ApprovalStatus, BookingStatus, Decision, EventType, PaymentOutcome, PaymentStatus, Text,
    },
    events::{self, SOURCE_INGEST},
    views::EntityView,
};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use entrip_common::store::{
    approvals::{self, NewApproval},
    bookings::{self, NewBooking},
    payments::{self, NewPayment},
    users::{self, NewUser},
};

use crate::requests::FieldError;

/// A validated request (see `requests.rs`); commands on an existing entity
/// carry its id, from the HTTP path.
#[derive(Debug, Clone)]
pub(crate) enum Command {
    CreateUser(NewUser),
    CreateBooking(NewBooking),
    CancelBooking(Uuid, Cancellation),
    CreatePayment(NewPayment),
    RecordPaymentResult(Uuid, PaymentResult),
    CreateApproval(NewApproval),
    DecideApproval(Uuid, ApprovalDecision),
}

/// Why a booking is canceled.
#[derive(Debug, Clone)]
pub(crate) struct Cancellation {
    pub(crate) reason: Text,
}

/// What the payment gateway reports about a payment.
#[derive(Debug, Clone)]
pub(crate) struct PaymentResult {
    pub(crate) outcome: PaymentOutcome,
    /// The gateway's approval id; present exactly when APPROVED.
    pub(crate) approval_id: Option<Text>,
    pub(crate) reason: Option<Text>,
}

/// An approver's decision on the current step of an approval.
#[derive(Debug, Clone)]
pub(crate) struct ApprovalDecision {
    pub(crate) approver_id: Uuid,
    pub(crate) decision: Decision,
    pub(crate) reason: Option<Text>,
}

/// Who sent the command and under which key, for audit rows and events.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    /// `http` or `amqp`.
    pub(crate) channel: &'static str,
    /// The API client that sent it (its name).
    pub(crate) client: String,
    pub(crate) idempotency_key: String,
    pub(crate) traceparent: Option<String>,
}

impl Context {
    /// The audit actor of a change the client itself makes (a change a
    /// user makes names the user, with the client in the detail).
    fn actor(&self) -> String {
        format!("client:{}", self.client)
    }
}

/// The answer to a command: the status the HTTP API answers with (201 or
/// 200; the AMQP reply carries it in `x-entrip-status`) and the JSON body.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: EntityView,
}

impl Reply {
    fn created(body: EntityView) -> Self {
        Self { status: 201, body }
    }

    fn ok(body: EntityView) -> Self {
        Self { status: 200, body }
    }
}

/// Why a command was not carried out. Nothing of it is stored: the
/// transaction rolls back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: String },
    /// A state transition that is not allowed, or a duplicate.
    #[error("{0}")]
    Conflict(String),
    /// A rule across fields or entities (e.g. a payment's amount differs
    /// from its booking's).
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// The idempotency key was used for another request.
    #[error("{0}")]
    IdempotencyMisuse(String),
    /// A value the validation let through but the schema refuses: still the
    /// sender's fault.
    #[error("{0}")]
    Refused(String),
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("the idempotency key kept changing under this request")]
    Contended,
    #[error("database error")]
    Database(#[source] sqlx::Error),
    #[error("cannot render the response")]
    Render(#[source] serde_json::Error),
}

impl CommandError {
    pub(crate) fn not_found(entity: &'static str, id: Uuid) -> Self {
        Self::NotFound {
            entity,
            id: id.to_string(),
        }
    }

    /// A rule across fields or entities was broken, at `field`.
    pub(crate) fn rule(field: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        Self::Unprocessable {
            errors: vec![FieldError::new(field, detail.clone())],
            detail,
        }
    }
}

impl From<sqlx::Error> for CommandError {
    fn from(err: sqlx::Error) -> Self {
        if entrip_common::db::is_unavailable(&err) {
            return Self::Unavailable(err);
        }
        if let sqlx::Error::Database(dbe) = &err {
            let code = dbe.code().map(|c| c.into_owned()).unwrap_or_default();
            let constraint = dbe
                .constraint()
                .map(|c| format!(" (constraint {c})"))
                .unwrap_or_default();
            // Safety net: never a 500 for bad input.
            if code == "23514" || code.starts_with("22") {
                return Self::Refused(format!("a value was refused by the database{constraint}"));
            }
            if code == "23505" {
                return Self::Conflict(format!(
                    "the request conflicts with stored data{constraint}"
                ));
            }
        }
        Self::Database(err)
    }
}

/// Writes the audit row and the outbox event of one state change.
struct Change<'a> {
    actor: String,
    action: &'a str,
    id: Uuid,
    event: EventType,
    data: EntityView,
    detail: Value,
}

async fn record(
    conn: &mut PgConnection,
    ctx: &Context,
    change: Change<'_>,
) -> Result<(), CommandError> {
    let mut detail = change.detail;
    detail["channel"] = json!(ctx.channel);
    detail["client"] = json!(ctx.client);
    events::record_change(
        conn,
        events::Change {
            actor: &change.actor,
            action: change.action,
            id: change.id,
            event: change.event,
            source: SOURCE_INGEST,
            data: change.data,
            detail,
            idempotency_key: Some(&ctx.idempotency_key),
            traceparent: ctx.traceparent.clone(),
        },
    )
    .await?;
    Ok(())
}

/// Runs the command in the caller's transaction.
pub(crate) async fn execute(
    conn: &mut PgConnection,
    cmd: Command,
    ctx: &Context,
) -> Result<Reply, CommandError> {
    match cmd {
        Command::CreateUser(user) => create_user(conn, user, ctx).await,
        Command::CreateBooking(booking) => create_booking(conn, booking, ctx).await,
        Command::CancelBooking(id, cancel) => cancel_booking(conn, id, cancel, ctx).await,
        Command::CreatePayment(payment) => create_payment(conn, payment, ctx).await,
        Command::RecordPaymentResult(id, result) => {
            record_payment_result(conn, id, result, ctx).await
        }
        Command::CreateApproval(approval) => create_approval(conn, approval, ctx).await,
        Command::DecideApproval(id, decision) => decide_approval(conn, id, decision, ctx).await,
    }
}

/// Maps a unique violation on `constraint` to a 409 with `message`.
fn conflict_on(err: sqlx::Error, constraint: &str, message: &str) -> CommandError {
    match entrip_common::db::unique_violation(&err) {
        Some(c) if c == constraint => CommandError::Conflict(message.to_owned()),
        _ => err.into(),
    }
}

async fn create_user(
    conn: &mut PgConnection,
    user: NewUser,
    ctx: &Context,
) -> Result<Reply, CommandError> {
    let id = Uuid::now_v7();
    let row = users::insert(conn, id, &user).await.map_err(|e| {
        conflict_on(
            e,
            "users_email_key",
            "a user with this email already exists",
        )
    })?;
    let view = EntityView::User(row.view());
    record(
        conn,
        ctx,
        Change {
            actor: ctx.actor(),
            action: "user.create",
            id,
            event: EventType::UserCreated,
            data: view.clone(),
            detail: json!({}),
        },
    )
    .await?;
    Ok(Reply::created(view))
}

async fn create_booking(
    conn: &mut PgConnection,
    booking: NewBooking,
    ctx: &Context,
) -> Result<Reply, CommandError> {
    let id = Uuid::now_v7();
    tracing::Span::current().record("booking_id", tracing::field::display(id));
    // No lookup of the user first: the foreign key checks it (and holds it
    // with `FOR KEY SHARE` until commit), one round trip fewer per booking.
    let user_id = booking.user_id;
    let row = bookings::insert(conn, id, &booking).await.map_err(|e| {
        match entrip_common::db::foreign_key_violation(&e) {
            Some(c) if c == "bookings_user_id_fkey" => CommandError::not_found("user", user_id),
            _ => conflict_on(
                e,
                "bookings_code_key",
                "a booking with this code already exists",
            ),
        }
    })?;
    let view = EntityView::Booking(row.view());
    record(
        conn,
        ctx,
        Change {
            actor: ctx.actor(),
            action: "booking.create",
            id,
            event: EventType::BookingCreated,
            data: view.clone(),
            detail: json!({ "code": row.code }),
        },
    )
    .await?;
    Ok(Reply::created(view))
}

async fn cancel_booking(
    conn: &mut PgConnection,
    id: Uuid,
    Cancellation { reason }: Cancellation,
    ctx: &Context,
) -> Result<Reply, CommandError> {
    tracing::Span::current().record("booking_id", tracing::field::display(id));
    let booking = bookings::lock(conn, id)
        .await?
        .ok_or_else(|| CommandError::not_found("booking", id))?;
    match booking.status {
        BookingStatus::Pending => {}
        BookingStatus::Canceled => {
            return Err(CommandError::Conflict(
                "the booking is already canceled".into(),
            ));
        }
        BookingStatus::Confirmed => {
            return Err(CommandError::Conflict(format!(
                "a {} booking cannot be canceled; only PENDING bookings can",
                booking.status
            )));
        }
    }
    let row = bookings::cancel(conn, id, &reason).await?;
    let view = EntityView::Booking(row.view());
    record(
        conn,
        ctx,
        Change {
            actor: ctx.actor(),
            action: "booking.cancel",
            id,
            event: EventType::BookingCanceled,
            data: view.clone(),
            detail: json!({ "from": booking.status, "to": row.status, "reason": reason.as_str() }),
        },
    )
    .await?;
    Ok(Reply::ok(view))
}

async fn create_payment(
    conn: &mut PgConnection,
    payment: NewPayment,
    ctx: &Context,
) -> Result<Reply, CommandError> {
    tracing::Span::current().record("booking_id", tracing::field::display(payment.booking_id));
    let booking = bookings::lock(conn, payment.booking_id)
        .await?
        .ok_or_else(|| CommandError::not_found("booking", payment.booking_id))?;
    if booking.status != BookingStatus::Pending {
        return Err(CommandError::Conflict(format!(
            "the booking is {}; payments are accepted only for PENDING bookings",
            booking.status
        )));
    }
    if payment.amount.currency() != booking.currency {
        return Err(CommandError::rule(
            "currency",
            format!(
                "payment currency {} differs from the booking's {}",
                payment.amount.currency(),
                booking.currency
            ),
        ));
    }
    if payment.amount.amount() != booking.amount {
        return Err(CommandError::rule(
            "amount",
            format!(
                "payment amount {} differs from the booking's {}",
                payment.amount,
                entrip_common::domain::render_stored(booking.amount, booking.currency)
            ),
        ));
    }
    if let Some(live) = payments::live_for_booking(conn, booking.id).await? {
        return Err(CommandError::Conflict(format!(
            "the booking already has a {} payment {}",
            live.status, live.id
        )));
    }
    let id = Uuid::now_v7();
    let row = payments::insert(conn, id, &payment).await.map_err(|e| {
        conflict_on(
            e,
            "payments_one_live_per_booking",
            "the booking already has a live payment",
        )
    })?;
    let view = EntityView::Payment(row.view());
    record(
        conn,
        ctx,
        Change {
            actor: ctx.actor(),
            action: "payment.create",
            id,
            event: EventType::PaymentRequested,
            data: view.clone(),
            detail: json!({ "bookingId": booking.id }),
        },
    )
    .await?;
    Ok(Reply::created(view))
}

async fn record_payment_result(
    conn: &mut PgConnection,
    id: Uuid,
    PaymentResult {
        outcome,
        approval_id,
        reason,
    }: PaymentResult,
    ctx: &Context,
) -> Result<Reply, CommandError> {
    let payment = payments::lock(conn, id)
        .await?
        .ok_or_else(|| CommandError::not_found("payment", id))?;
    tracing::Span::current().record("booking_id", tracing::field::display(payment.booking_id));
    if payment.status != PaymentStatus::Pending {
        return Err(CommandError::Conflict(format!(
            "the payment is already {}; a result can be recorded only once",
            payment.status
        )));
    }
    let row = payments::decide(
        conn,
        id,
        outcome,
        approval_id.as_ref().map(Text::as_str),
        reason.as_ref().map(Text::as_str),
    )
    .await?;
    let view = EntityView::Payment(row.view());
    let event = match outcome {
        PaymentOutcome::Approved => EventType::PaymentApproved,
        PaymentOutcome::Failed => EventType::PaymentFailed,
    };
    record(
        conn,
        ctx,
        Change {
            actor: ctx.actor(),
            action: "payment.result",
            id,
            event,
            data: view.clone(),
            detail: json!({ "from": payment.status, "to": row.status }),
        },
    )
    .await?;
    Ok(Reply::ok(view))
}

async fn create_approval(
    conn: &mut PgConnection,
    approval: NewApproval,
    ctx: &Context,
) -> Result<Reply, CommandError> {
    tracing::Span::current().record("booking_id", tracing::field::display(approval.booking_id));
    let booking = bookings::lock(conn, approval.booking_id)
        .await?
        .ok_or_else(|| CommandError::not_found("booking", approval.booking_id))?;
    if !users::exists(conn, approval.requester_id).await? {
        return Err(CommandError::not_found("user", approval.requester_id));
    }
    if booking.status != BookingStatus::Pending {
        return Err(CommandError::Conflict(format!(
            "the booking is {}; approvals can be requested only for PENDING bookings",
            booking.status
        )));
    }
    if !booking.requires_approval {
        return Err(CommandError::Conflict(
            "the booking does not require approval (requiresApproval is false)".into(),
        ));
    }
    if let Some(live) = approvals::live_for_booking(conn, booking.id).await? {
        return Err(CommandError::Conflict(format!(
            "the booking already has a {} approval {}",
            live.status, live.id
        )));
    }
    let id = Uuid::now_v7();
    let row = approvals::insert(conn, id, &approval).await.map_err(|e| {
        conflict_on(
            e,
            "approvals_one_live_per_booking",
            "the booking already has a live approval",
        )
    })?;
    let view = EntityView::Approval(row.view(&[]));
    record(
        conn,
        ctx,
        Change {
            actor: format!("user:{}", approval.requester_id),
            action: "approval.create",
            id,
            event: EventType::ApprovalRequested,
            data: view.clone(),
            detail: json!({ "bookingId": booking.id, "steps": row.steps }),
        },
    )
    .await?;
    Ok(Reply::created(view))
}

async fn decide_approval(
    conn: &mut PgConnection,
    id: Uuid,
    ApprovalDecision {
        approver_id,
        decision,
        reason,
    }: ApprovalDecision,
    ctx: &Context,
) -> Result<Reply, CommandError> {
    // Lock order everywhere: booking, then its payment or approval.
    let Some(peek) = approvals::get(conn, id).await? else {
        return Err(CommandError::not_found("approval", id));
    };
    tracing::Span::current().record("booking_id", tracing::field::display(peek.booking_id));
    let booking = bookings::lock(conn, peek.booking_id)
        .await?
        .ok_or_else(|| CommandError::not_found("booking", peek.booking_id))?;
    let approval = approvals::lock(conn, id)
        .await?
        .ok_or_else(|| CommandError::not_found("approval", id))?;
    if !users::exists(conn, approver_id).await? {
        return Err(CommandError::not_found("user", approver_id));
    }
    if approval.status != ApprovalStatus::Pending {
        return Err(CommandError::Conflict(format!(
            "the approval is already {}",
            approval.status
        )));
    }
    if booking.status == BookingStatus::Canceled {
        return Err(CommandError::Conflict("the booking is canceled".into()));
    }
    if approvals::has_decided(conn, id, approver_id).await? {
        return Err(CommandError::Conflict(
            "this approver already decided a step of this approval".into(),
        ));
    }
    let row = approvals::decide(
        conn,
        &approval,
        approver_id,
        decision,
        reason.as_ref().map(Text::as_str),
    )
    .await
    .map_err(|e| {
        conflict_on(
            e,
            "approval_decisions_one_per_approver",
            "this approver already decided a step of this approval",
        )
    })?;
    let decisions = approvals::decisions(conn, id).await?;
    let view = EntityView::Approval(row.view(&decisions));
    record(
        conn,
        ctx,
        Change {
            actor: format!("user:{approver_id}"),
            action: "approval.decide",
            id,
            event: EventType::ApprovalDecided,
            data: view.clone(),
            detail: json!({
                "step": approval.current_step,
                "decision": decision.as_str(),
                "from": approval.status,
                "to": row.status,
            }),
        },
    )
    .await?;
    Ok(Reply::ok(view))
}
