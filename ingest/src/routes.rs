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

use entrip_common::store::{approvals, bookings, payments, settlements, users};

use crate::{
    App,
    error::ApiError,
    extract::{PathId, Post},
    idempotency::Fingerprint,
    requests::CommandType,
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

pub(crate) async fn create_user(State(app): State<App>, post: Post) -> Result<Response, ApiError> {
    run(&app, CommandType::UserCreate, None, post).await
}

pub(crate) async fn create_booking(
    State(app): State<App>,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::BookingCreate, None, post).await
}

pub(crate) async fn cancel_booking(
    State(app): State<App>,
    PathId(id): PathId,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::BookingCancel, Some(id), post).await
}

pub(crate) async fn create_payment(
    State(app): State<App>,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::PaymentCreate, None, post).await
}

pub(crate) async fn payment_result(
    State(app): State<App>,
    PathId(id): PathId,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::PaymentResult, Some(id), post).await
}

pub(crate) async fn create_approval(
    State(app): State<App>,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::ApprovalCreate, None, post).await
}

pub(crate) async fn decide_approval(
    State(app): State<App>,
    PathId(id): PathId,
    post: Post,
) -> Result<Response, ApiError> {
    run(&app, CommandType::ApprovalDecision, Some(id), post).await
}

pub(crate) async fn get_user(
    State(app): State<App>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let mut conn = app.pool.acquire().await?;
    let user = users::get(&mut conn, id)
        .await?
        .ok_or(ApiError::not_found("user", id))?;
    Ok(axum::Json(user).into_response())
}

pub(crate) async fn get_booking(
    State(app): State<App>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let mut conn = app.pool.acquire().await?;
    let booking = bookings::get(&mut conn, id)
        .await?
        .ok_or(ApiError::not_found("booking", id))?;
    let payment = payments::current_for_booking(&mut conn, id).await?;
    let approval = match approvals::current_for_booking(&mut conn, id).await? {
        Some(a) => {
            let decisions = approvals::decisions(&mut conn, a.id).await?;
            Some(a.view(&decisions))
        }
        None => None,
    };
    let settlement = settlements::for_booking(&mut conn, id).await?;
    let mut view = booking.view();
    view["payment"] = payment.map_or(json!(null), |p| p.view());
    view["approval"] = approval.unwrap_or(json!(null));
    view["settlement"] = settlement.map_or(json!(null), |s| s.view());
    Ok(axum::Json(view).into_response())
}

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

pub(crate) async fn get_approval(
    State(app): State<App>,
    PathId(id): PathId,
) -> Result<Response, ApiError> {
    let mut conn = app.pool.acquire().await?;
    let approval = approvals::get(&mut conn, id)
        .await?
        .ok_or(ApiError::not_found("approval", id))?;
    let decisions = approvals::decisions(&mut conn, id).await?;
    Ok(axum::Json(approval.view(&decisions)).into_response())
}

/// Readiness: the database answers.
pub(crate) async fn readyz(State(app): State<App>) -> Result<Response, ApiError> {
    sqlx::query("SELECT 1").execute(&app.pool).await?;
    Ok(axum::Json(json!({ "status": "ready" })).into_response())
}

pub(crate) async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_owned())
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
