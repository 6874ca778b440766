//! The HTTP handlers: each POST turns its body into a command and submits
//! it under its idempotency key; the GETs read the store.

use axum::{
    extract::State,
    http::{HeaderValue, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::json;
use tracing::Instrument;
use uuid::Uuid;

use entrip_common::{
    store::{self, approvals, payments, users},
    telemetry,
    trace::TraceParent,
    views::{ApprovalView, BookingDetail, BookingView, PaymentView, UserView},
};

use crate::{
    App,
    error::ApiError,
    extract::{PathId, Post},
    idempotency::Fingerprint,
    requests::{
        CancelBookingBody, CommandType, CreateApprovalBody, CreateBookingBody, CreatePaymentBody,
        CreateUserBody, DecisionBody, PaymentResultBody,
    },
    submit::submit,
};

/// The header that marks a replayed answer.
pub(crate) const REPLAYED: &str = "idempotent-replayed";

/// Validates the body as a command of type `kind` (on entity `id`),
/// submits it under its idempotency key and answers with its outcome; a
/// replay carries `Idempotent-Replayed: true`.
async fn run(
    app: &App,
    kind: CommandType,
    id: Option<Uuid>,
    post: Post,
) -> Result<Response, ApiError> {
    let span = tracing::info_span!(
        "command",
        idempotency_key = %post.key,
        booking_id = tracing::field::Empty
    );
    if telemetry::exporting() {
        let parent = post
            .context
            .traceparent
            .as_deref()
            .and_then(TraceParent::parse);
        telemetry::join_trace(&span, parent.as_ref());
    }
    let (command, body) = kind.command(id, &post.bytes)?;
    let fingerprint = Fingerprint::new("POST", &kind.path(id), &body);
    let outcome = submit(
        &app.pool,
        app.idempotency_ttl(),
        &post.key,
        &fingerprint,
        command,
        &post.context,
    )
    .instrument(span)
    .await?;
    let status =
        StatusCode::from_u16(outcome.status).map_err(|_| ApiError::BadStatus(outcome.status))?;
    let mut response = (status, axum::Json(outcome.body)).into_response();
    if outcome.replayed {
        app.metrics.replays.with_label_values(&[&post.route]).inc();
        response
            .headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Create a user.
#[utoipa::path(
    post,
    path = "/v1/users",
    tag = "users",
    request_body = CreateUserBody,
    responses(
        (status = 201, description = "The user, created (or the one an earlier request with the key created).", body = UserView),
        (status = 409, description = "A user with this email already exists."),
    )
)]
pub(crate) async fn create_user(State(app): State<App>, post: Post) -> Result<Response, ApiError> {
    run(&app, CommandType::UserCreate, None, post).await
}

/// Create a booking (PENDING).
#[utoipa::path(
    post,
    path = "/v1/bookings",
    tag = "bookings",
    request_body = CreateBookingBody,
    responses(
        (status = 201, description = "The booking, PENDING.", body = BookingView),
        (status = 404, description = "No user `userId`."),
        (status = 409, description = "A booking with this code already exists."),
        (status = 422, description = "`arriveAt` is not after `departAt`."),
    )
)]
pub(crate) async fn create_booking(
    State(app): State<App>,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::BookingCreate, None, post).await
}

/// Cancel a PENDING booking.
#[utoipa::path(
    post,
    path = "/v1/bookings/{id}/cancel",
    tag = "bookings",
    request_body = CancelBookingBody,
    responses(
        (status = 200, description = "The booking, CANCELED.", body = BookingView),
        (status = 404, description = "No booking `id`."),
        (status = 409, description = "The booking is not PENDING (already CANCELED, or CONFIRMED)."),
    )
)]
pub(crate) async fn cancel_booking(
    State(app): State<App>,
    PathId(id): PathId,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::BookingCancel, Some(id), post).await
}

/// Request the payment of a PENDING booking.
#[utoipa::path(
    post,
    path = "/v1/payments",
    tag = "payments",
    request_body = CreatePaymentBody,
    responses(
        (status = 201, description = "The payment, PENDING.", body = PaymentView),
        (status = 404, description = "No booking `bookingId`."),
        (status = 409, description = "The booking is not PENDING, or already has a live payment."),
        (status = 422, description = "The amount or the currency differ from the booking's, or the tax exceeds the amount."),
    )
)]
pub(crate) async fn create_payment(
    State(app): State<App>,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::PaymentCreate, None, post).await
}

/// Record the payment gateway's result.
#[utoipa::path(
    post,
    path = "/v1/payments/{id}/result",
    tag = "payments",
    request_body = PaymentResultBody,
    responses(
        (status = 200, description = "The payment, APPROVED or FAILED.", body = PaymentView),
        (status = 404, description = "No payment `id`."),
        (status = 409, description = "The payment is not PENDING: a result is recorded once."),
        (status = 422, description = "`approvalId` is missing with APPROVED, or given with FAILED."),
    )
)]
pub(crate) async fn payment_result(
    State(app): State<App>,
    PathId(id): PathId,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::PaymentResult, Some(id), post).await
}

/// Ask for the approval of a PENDING booking.
#[utoipa::path(
    post,
    path = "/v1/approvals",
    tag = "approvals",
    request_body = CreateApprovalBody,
    responses(
        (status = 201, description = "The approval, PENDING at step 1.", body = ApprovalView),
        (status = 404, description = "No booking `bookingId`, or no user `requesterId`."),
        (status = 409, description = "The booking is not PENDING, does not require approval, or already has a live approval."),
    )
)]
pub(crate) async fn create_approval(
    State(app): State<App>,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::ApprovalCreate, None, post).await
}

/// Decide the current step of a PENDING approval.
#[utoipa::path(
    post,
    path = "/v1/approvals/{id}/decision",
    tag = "approvals",
    request_body = DecisionBody,
    responses(
        (status = 200, description = "The approval: REJECTED at once, APPROVED after the last step, else PENDING at the next step.", body = ApprovalView),
        (status = 404, description = "No approval `id`, or no user `approverId`."),
        (status = 409, description = "The approval is not PENDING, its booking is CANCELED, or this approver already decided."),
    )
)]
pub(crate) async fn decide_approval(
    State(app): State<App>,
    PathId(id): PathId,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::ApprovalDecision, Some(id), post).await
}

/// Read a user.
#[utoipa::path(
    get,
    path = "/v1/users/{id}",
    tag = "users",
    responses(
        (status = 200, description = "The user.", body = UserView),
        (status = 404, description = "No user `id`."),
    )
)]
pub(crate) async fn get_user(
    State(app): State<App>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let mut conn = app.pool.acquire().await?;
    let user = users::get(&mut conn, id)
        .await?
        .ok_or(ApiError::not_found("user", id))?;
    Ok(axum::Json(user.view()).into_response())
}

/// Read a booking with its payment, approval and settlement.
#[utoipa::path(
    get,
    path = "/v1/bookings/{id}",
    tag = "bookings",
    responses(
        (status = 200, description = "The booking with its current payment, approval and settlement (each null when there is none).", body = BookingDetail),
        (status = 404, description = "No booking `id`."),
    )
)]
pub(crate) async fn get_booking(
    State(app): State<App>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let mut conn = app.pool.acquire().await?;
    let detail = store::booking_detail(&mut conn, id)
        .await?
        .ok_or(ApiError::not_found("booking", id))?;
    Ok(axum::Json(detail).into_response())
}

/// Read a payment.
#[utoipa::path(
    get,
    path = "/v1/payments/{id}",
    tag = "payments",
    responses(
        (status = 200, description = "The payment.", body = PaymentView),
        (status = 404, description = "No payment `id`."),
    )
)]
pub(crate) async fn get_payment(
    State(app): State<App>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let mut conn = app.pool.acquire().await?;
    let payment = payments::get(&mut conn, id)
        .await?
        .ok_or(ApiError::not_found("payment", id))?;
    Ok(axum::Json(payment.view()).into_response())
}

/// Read an approval with its decisions.
#[utoipa::path(
    get,
    path = "/v1/approvals/{id}",
    tag = "approvals",
    responses(
        (status = 200, description = "The approval with its decisions, in step order.", body = ApprovalView),
        (status = 404, description = "No approval `id`."),
    )
)]
pub(crate) async fn get_approval(
    State(app): State<App>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let mut conn = app.pool.acquire().await?;
    let approval = approvals::get(&mut conn, id)
        .await?
        .ok_or(ApiError::not_found("approval", id))?;
    Ok(axum::Json(store::approval_view(&mut conn, &approval).await?).into_response())
}

/// Readiness: the database answers.
///
/// Never shed, no key needed.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "The database answers.", body = Ready, example = json!({"status": "ready"})),
        (status = 503, description = "The database does not answer."),
    )
)]
pub(crate) async fn readyz(State(app): State<App>) -> Result<Response, ApiError> {
    sqlx::query("SELECT 1").execute(&app.pool).await?;
    Ok(axum::Json(json!({ "status": "ready" })).into_response())
}

/// The answer of `/readyz`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct Ready {
    /// Always `ready`.
    #[schema(examples("ready"))]
    status: String,
}

/// This document: the OpenAPI 3.1 description of the HTTP API.
///
/// Never shed, no key needed; the same as `docs/openapi.json` in the
/// repository.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document.", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi_json(State(app): State<App>) -> Response {
    match app.openapi.get() {
        Some(doc) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            doc.clone(),
        )
            .into_response(),
        None => ApiError::Panicked("the OpenAPI document was not built".into()).into_response(),
    }
}

pub(crate) async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_owned())
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
