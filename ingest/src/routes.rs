//! HTTP handlers: request bodies as sent (every field optional so that a
//! missing one is named), their validation into commands, and the GETs.

use axum::{
    body::Body,
    extract::{MatchedPath, Path, State},
    http::{HeaderMap, HeaderValue, Method, Uri},
    response::{IntoResponse, Response},
};
use entrip_common::domain::{
    BookingCode, Currency, Decision, Email, Invalid, Money, PaymentMethod, PaymentOutcome, Phone,
    Text,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::json;
use tracing::Instrument;

use entrip_common::store::{
    approvals::{self, NewApproval},
    bookings::{self, NewBooking},
    payments::{self, NewPayment},
    settlements,
    users::{self, NewUser},
};

use crate::{
    App,
    commands::{Command, Context},
    error::ApiError,
    extract::{self, Fields, time_field, uuid_field},
    idempotency::Fingerprint,
};

const NAME_MAX: usize = 100;
const PLACE_MAX: usize = 100;
const TITLE_MAX: usize = 200;
const REASON_MAX: usize = 1000;
const GATEWAY_ID_MAX: usize = 100;

fn text(max: usize) -> impl Fn(&str) -> Result<Text, Invalid> {
    move |s| Text::parse(s, max)
}

/// The common path of every POST: body, key, JSON, validation, then the
/// idempotent transaction.
async fn post<B: DeserializeOwned>(
    app: &App,
    route: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    validate: impl FnOnce(B) -> Result<Command, ApiError>,
) -> Result<Response, ApiError> {
    let bytes = extract::read_body(headers, body, app.settings.body_limit_bytes).await?;
    let key = extract::idempotency_key(headers)?;
    let span =
        tracing::info_span!("command", idempotency_key = %key, booking_id = tracing::field::Empty);
    let (dto, value) = extract::parse_json::<B>(&bytes)?;
    let command = validate(dto)?;
    let fingerprint = Fingerprint::new(method.as_str(), uri.path(), &value);
    let ctx = Context {
        channel: "http",
        idempotency_key: key.as_str().to_owned(),
        traceparent: extract::traceparent(headers),
    };
    let outcome = crate::submit(app, &key, &fingerprint, command, &ctx)
        .instrument(span)
        .await?;
    let mut response = (outcome.status, axum::Json(outcome.body)).into_response();
    if outcome.replayed {
        app.metrics.replays.with_label_values(&[route]).inc();
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateUserBody {
    name: Option<String>,
    email: Option<String>,
    phone: Option<String>,
}

pub async fn create_user(
    State(app): State<App>,
    route: MatchedPath,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    post(
        &app,
        route.as_str(),
        &method,
        &uri,
        &headers,
        body,
        |b: CreateUserBody| {
            let mut f = Fields::default();
            let name = f.parse("name", b.name, text(NAME_MAX));
            let email = f.parse("email", b.email, Email::parse);
            let phone = f.parse("phone", b.phone, Phone::parse);
            f.finish()?;
            match (name, email, phone) {
                (Some(name), Some(email), Some(phone)) => {
                    Ok(Command::CreateUser(NewUser { name, email, phone }))
                }
                _ => Err(ApiError::Internal("validation incomplete".into())),
            }
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateBookingBody {
    code: Option<String>,
    customer_name: Option<String>,
    customer_phone: Option<String>,
    itinerary_from: Option<String>,
    itinerary_to: Option<String>,
    depart_at: Option<String>,
    arrive_at: Option<String>,
    currency: Option<String>,
    amount: Option<String>,
    user_id: Option<String>,
    requires_approval: Option<bool>,
}

pub async fn create_booking(
    State(app): State<App>,
    route: MatchedPath,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    post(
        &app,
        route.as_str(),
        &method,
        &uri,
        &headers,
        body,
        |b: CreateBookingBody| {
            let mut f = Fields::default();
            let code = f.parse("code", b.code, BookingCode::parse);
            let customer_name = f.parse("customerName", b.customer_name, text(NAME_MAX));
            let customer_phone = f.parse("customerPhone", b.customer_phone, Phone::parse);
            let itinerary_from = f.parse("itineraryFrom", b.itinerary_from, text(PLACE_MAX));
            let itinerary_to = f.parse("itineraryTo", b.itinerary_to, text(PLACE_MAX));
            let depart_at = f.parse("departAt", b.depart_at, time_field);
            let arrive_at = f.parse("arriveAt", b.arrive_at, time_field);
            let currency = match b.currency {
                None => Some(Currency::KRW),
                Some(c) => f.check("currency", Currency::parse(&c)),
            };
            let amount = f.required("amount", b.amount);
            let price = match (amount, currency) {
                (Some(a), Some(c)) => f.check("amount", Money::parse(&a, c)),
                _ => None,
            };
            let user_id = f.parse("userId", b.user_id, uuid_field);
            f.finish()?;
            let (
                Some(code),
                Some(customer_name),
                Some(customer_phone),
                Some(itinerary_from),
                Some(itinerary_to),
                Some(depart_at),
                Some(arrive_at),
                Some(price),
                Some(user_id),
            ) = (
                code,
                customer_name,
                customer_phone,
                itinerary_from,
                itinerary_to,
                depart_at,
                arrive_at,
                price,
                user_id,
            )
            else {
                return Err(ApiError::Internal("validation incomplete".into()));
            };
            if arrive_at <= depart_at {
                return Err(ApiError::rule(
                    "arriveAt",
                    "arriveAt must be after departAt",
                ));
            }
            Ok(Command::CreateBooking(NewBooking {
                code,
                user_id,
                customer_name,
                customer_phone,
                itinerary_from,
                itinerary_to,
                depart_at,
                arrive_at,
                price,
                requires_approval: b.requires_approval.unwrap_or(false),
            }))
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CancelBookingBody {
    reason: Option<String>,
}

pub async fn cancel_booking(
    State(app): State<App>,
    Path(id): Path<String>,
    route: MatchedPath,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = extract::path_id(&id)?;
    post(
        &app,
        route.as_str(),
        &method,
        &uri,
        &headers,
        body,
        |b: CancelBookingBody| {
            let mut f = Fields::default();
            let reason = f.parse("reason", b.reason, text(REASON_MAX));
            f.finish()?;
            let reason =
                reason.ok_or_else(|| ApiError::Internal("validation incomplete".into()))?;
            Ok(Command::CancelBooking { id, reason })
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreatePaymentBody {
    booking_id: Option<String>,
    method: Option<String>,
    amount: Option<String>,
    currency: Option<String>,
    tax: Option<String>,
}

pub async fn create_payment(
    State(app): State<App>,
    route: MatchedPath,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    post(
        &app,
        route.as_str(),
        &method,
        &uri,
        &headers,
        body,
        |b: CreatePaymentBody| {
            let mut f = Fields::default();
            let booking_id = f.parse("bookingId", b.booking_id, uuid_field);
            let pay_method = f.parse("method", b.method, PaymentMethod::parse);
            let currency = f.parse("currency", b.currency, Currency::parse);
            let amount = f.required("amount", b.amount);
            let tax = f.required("tax", b.tax);
            let (amount, tax) = match currency {
                Some(c) => (
                    amount.and_then(|a| f.check("amount", Money::parse(&a, c))),
                    tax.and_then(|t| f.check("tax", Money::parse_non_negative(&t, c))),
                ),
                None => (None, None),
            };
            f.finish()?;
            let (Some(booking_id), Some(pay_method), Some(amount), Some(tax)) =
                (booking_id, pay_method, amount, tax)
            else {
                return Err(ApiError::Internal("validation incomplete".into()));
            };
            if tax.amount() > amount.amount() {
                return Err(ApiError::rule("tax", "tax must not exceed the amount"));
            }
            Ok(Command::CreatePayment(NewPayment {
                booking_id,
                method: pay_method,
                amount,
                tax,
            }))
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PaymentResultBody {
    status: Option<String>,
    approval_id: Option<String>,
    reason: Option<String>,
}

pub async fn payment_result(
    State(app): State<App>,
    Path(id): Path<String>,
    route: MatchedPath,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = extract::path_id(&id)?;
    post(
        &app,
        route.as_str(),
        &method,
        &uri,
        &headers,
        body,
        |b: PaymentResultBody| {
            let mut f = Fields::default();
            let outcome = f.parse("status", b.status, PaymentOutcome::parse);
            let approval_id = f.parse_optional("approvalId", b.approval_id, text(GATEWAY_ID_MAX));
            let reason = f.parse_optional("reason", b.reason, text(REASON_MAX));
            f.finish()?;
            let Some(outcome) = outcome else {
                return Err(ApiError::Internal("validation incomplete".into()));
            };
            match (outcome, &approval_id) {
                (PaymentOutcome::Approved, None) => {
                    return Err(ApiError::rule(
                        "approvalId",
                        "approvalId is required when status is APPROVED",
                    ));
                }
                (PaymentOutcome::Failed, Some(_)) => {
                    return Err(ApiError::rule(
                        "approvalId",
                        "approvalId is only allowed when status is APPROVED",
                    ));
                }
                _ => {}
            }
            Ok(Command::RecordPaymentResult {
                id,
                outcome,
                approval_id,
                reason,
            })
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateApprovalBody {
    booking_id: Option<String>,
    requester_id: Option<String>,
    title: Option<String>,
    reason: Option<String>,
    steps: Option<i64>,
}

pub async fn create_approval(
    State(app): State<App>,
    route: MatchedPath,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    post(
        &app,
        route.as_str(),
        &method,
        &uri,
        &headers,
        body,
        |b: CreateApprovalBody| {
            let mut f = Fields::default();
            let booking_id = f.parse("bookingId", b.booking_id, uuid_field);
            let requester_id = f.parse("requesterId", b.requester_id, uuid_field);
            let title = f.parse("title", b.title, text(TITLE_MAX));
            let reason = f.parse("reason", b.reason, text(REASON_MAX));
            let steps = match b.steps {
                None => Some(1),
                Some(n @ 1..=5) => i16::try_from(n).ok(),
                Some(_) => {
                    f.fail("steps", "must be between 1 and 5");
                    None
                }
            };
            f.finish()?;
            let (Some(booking_id), Some(requester_id), Some(title), Some(reason), Some(steps)) =
                (booking_id, requester_id, title, reason, steps)
            else {
                return Err(ApiError::Internal("validation incomplete".into()));
            };
            Ok(Command::CreateApproval(NewApproval {
                booking_id,
                requester_id,
                title,
                reason,
                steps,
            }))
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DecisionBody {
    approver_id: Option<String>,
    decision: Option<String>,
    reason: Option<String>,
}

pub async fn decide_approval(
    State(app): State<App>,
    Path(id): Path<String>,
    route: MatchedPath,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = extract::path_id(&id)?;
    post(
        &app,
        route.as_str(),
        &method,
        &uri,
        &headers,
        body,
        |b: DecisionBody| {
            let mut f = Fields::default();
            let approver_id = f.parse("approverId", b.approver_id, uuid_field);
            let decision = f.parse("decision", b.decision, Decision::parse);
            let reason = f.parse_optional("reason", b.reason, text(REASON_MAX));
            f.finish()?;
            let (Some(approver_id), Some(decision)) = (approver_id, decision) else {
                return Err(ApiError::Internal("validation incomplete".into()));
            };
            Ok(Command::DecideApproval {
                id,
                approver_id,
                decision,
                reason,
            })
        },
    )
    .await
}

pub async fn get_user(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = extract::path_id(&id)?;
    let mut conn = app.pool.acquire().await?;
    let user = users::get(&mut conn, id).await?.ok_or(ApiError::NotFound {
        entity: "user",
        id: id.to_string(),
    })?;
    Ok(axum::Json(user).into_response())
}

pub async fn get_booking(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = extract::path_id(&id)?;
    let mut conn = app.pool.acquire().await?;
    let booking = bookings::get(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound {
            entity: "booking",
            id: id.to_string(),
        })?;
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

pub async fn get_payment(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = extract::path_id(&id)?;
    let mut conn = app.pool.acquire().await?;
    let payment = payments::get(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound {
            entity: "payment",
            id: id.to_string(),
        })?;
    Ok(axum::Json(payment.view()).into_response())
}

pub async fn get_approval(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = extract::path_id(&id)?;
    let mut conn = app.pool.acquire().await?;
    let approval = approvals::get(&mut conn, id)
        .await?
        .ok_or(ApiError::NotFound {
            entity: "approval",
            id: id.to_string(),
        })?;
    let decisions = approvals::decisions(&mut conn, id).await?;
    Ok(axum::Json(approval.view(&decisions)).into_response())
}

/// Readiness: the database answers.
pub async fn readyz(State(app): State<App>) -> Result<Response, ApiError> {
    sqlx::query("SELECT 1").execute(&app.pool).await?;
    Ok(axum::Json(json!({ "status": "ready" })).into_response())
}

pub async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_owned())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
