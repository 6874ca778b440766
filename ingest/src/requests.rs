//! Request bodies as upstream systems send them, and their validation into
//! [`Command`]s: one `TryFrom` per body, shared by every transport. Nothing
//! here knows HTTP; [`Refusal`] says why a body was refused and the
//! transport maps it (see `error.rs`).
//!
//! Every body field is optional so that a missing one is named rather than
//! failing the whole parse. Each field is checked into a [`Checked`] value,
//! and [`AllValid`] turns a tuple of them into the values or into every
//! error at once, so that one answer lists all that is wrong.

use chrono::{DateTime, Utc};
use entrip_common::{
    domain::{
        BookingCode, Currency, Decision, Email, Invalid, Money, PaymentMethod, PaymentOutcome,
        Phone, Text,
    },
    store::{approvals::NewApproval, bookings::NewBooking, payments::NewPayment, users::NewUser},
};
use serde::{
    Deserialize, Serialize,
    de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor},
};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    clients::Scope,
    commands::{ApprovalDecision, Cancellation, Command, PaymentResult},
};

const NAME_MAX: usize = 100;
const PLACE_MAX: usize = 100;
const TITLE_MAX: usize = 200;
const REASON_MAX: usize = 1000;
const GATEWAY_ID_MAX: usize = 100;
const STEPS: std::ops::RangeInclusive<i64> = 1..=5;

/// A field that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub(crate) struct FieldError {
    /// The body field (camelCase, as sent), or `Idempotency-Key` for the
    /// header, `id` for the path id.
    #[schema(examples("amount"))]
    pub(crate) field: String,
    /// Why it was refused.
    #[schema(examples("KRW allows at most 0 decimal places"))]
    pub(crate) message: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a request was refused before any database work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not a JSON object (syntax, encoding, an array, …).
    Malformed(String),
    /// Missing or invalid fields, all of them.
    Fields(Vec<FieldError>),
    /// A rule across fields (e.g. `arriveAt` after `departAt`).
    Rule { field: &'static str, detail: String },
}

impl Refusal {
    pub(crate) fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Fields(vec![FieldError::new(field, message)])
    }

    fn rule(field: &'static str, detail: &str) -> Self {
        Self::Rule {
            field,
            detail: detail.to_owned(),
        }
    }
}

// ------------------------------------------------------------------ parsing

/// Parses a JSON object into `T`, naming every field at fault: duplicated
/// keys, unknown keys (the fields `T` declares are read from serde, not from
/// its error messages), then values of the wrong type. Also returns the body
/// as a `Value`, the canonical form the idempotency fingerprint hashes.
pub(crate) fn parse_json<T: DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, serde_json::Value), Refusal> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Refusal::Malformed(without_position(&e)))?;
    if !value.is_object() {
        return Err(Refusal::Malformed("the body must be a JSON object".into()));
    }
    // The `Value` keeps the last of duplicated keys: read the keys again.
    let TopLevelKeys(keys) =
        serde_json::from_slice(bytes).map_err(|e| Refusal::Malformed(without_position(&e)))?;
    let known = serde_aux::serde_introspection::serde_introspect::<T>();
    let mut errors = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let earlier = keys[..i].iter().filter(|k| *k == key).count();
        if earlier == 1 {
            errors.push(FieldError::new(key.as_str(), "field given more than once"));
        } else if earlier == 0 && !known.contains(&key.as_str()) {
            errors.push(FieldError::new(key.as_str(), "unknown field"));
        }
    }
    if !errors.is_empty() {
        return Err(Refusal::Fields(errors));
    }
    let typed = serde_path_to_error::deserialize(&value).map_err(|err| {
        let field = err.path().to_string();
        Refusal::field(field, without_position(err.inner()))
    })?;
    Ok((typed, value))
}

/// serde_json's message without " at line 1 column 7": the body is one
/// line and the field is named separately.
fn without_position(err: &serde_json::Error) -> String {
    let message = err.to_string();
    match (err.line(), message.rfind(" at line ")) {
        (1.., Some(i)) => message[..i].to_owned(),
        _ => message,
    }
}

/// The top-level keys of a JSON object, in order and with repeats.
struct TopLevelKeys(Vec<String>);

impl<'de> Deserialize<'de> for TopLevelKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = TopLevelKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(key);
                }
                Ok(TopLevelKeys(keys))
            }
        }
        d.deserialize_map(Keys)
    }
}

// ------------------------------------------------------------ field checks

/// A field's value, or the errors that kept it from having one (never
/// empty). A field that depends on another (an amount on its currency)
/// carries that field's errors when it cannot be checked; [`AllValid`]
/// reports each error once.
type Checked<T> = Result<T, Vec<FieldError>>;

fn check<T>(field: &str, result: Result<T, Invalid>) -> Checked<T> {
    result.map_err(|Invalid(message)| vec![FieldError::new(field, message)])
}

/// The value, or "is required" when it is missing or null.
fn required<T>(field: &str, value: Option<T>) -> Checked<T> {
    value.ok_or_else(|| vec![FieldError::new(field, "is required")])
}

/// A required text value parsed by `parse`.
fn parse<T>(
    field: &str,
    value: Option<String>,
    parse: impl FnOnce(&str) -> Result<T, Invalid>,
) -> Checked<T> {
    required(field, value).and_then(|raw| check(field, parse(&raw)))
}

/// An optional text value parsed by `parse` when present.
fn parse_optional<T>(
    field: &str,
    value: Option<String>,
    parse: impl FnOnce(&str) -> Result<T, Invalid>,
) -> Checked<Option<T>> {
    value.map(|raw| check(field, parse(&raw))).transpose()
}

fn text(max: usize) -> impl Fn(&str) -> Result<Text, Invalid> {
    move |s| Text::parse(s, max)
}

fn uuid(raw: &str) -> Result<Uuid, Invalid> {
    Uuid::parse_str(raw).map_err(|_| Invalid("must be a UUID".into()))
}

/// An RFC 3339 time (any offset), in UTC.
fn time(raw: &str) -> Result<DateTime<Utc>, Invalid> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| Invalid("must be an RFC 3339 time such as 2026-12-24T09:30:00Z".into()))
}

/// A tuple of checked fields: all their values, or all their errors.
trait AllValid {
    type Values;
    fn all_valid(self) -> Result<Self::Values, Refusal>;
}

macro_rules! all_valid {
    ($($t:ident $v:ident),+) => {
        impl<$($t),+> AllValid for ($(Checked<$t>,)+) {
            type Values = ($($t,)+);

            fn all_valid(self) -> Result<Self::Values, Refusal> {
                let ($($v,)+) = self;
                match ($($v,)+) {
                    ($(Ok($v),)+) => Ok(($($v,)+)),
                    ($($v,)+) => {
                        let mut errors: Vec<FieldError> = Vec::new();
                        $(
                            for e in $v.err().into_iter().flatten() {
                                if !errors.contains(&e) {
                                    errors.push(e);
                                }
                            }
                        )+
                        Err(Refusal::Fields(errors))
                    }
                }
            }
        }
    };
}

all_valid!(A a);
all_valid!(A a, B b);
all_valid!(A a, B b, C c);
all_valid!(A a, B b, C c, D d);
all_valid!(A a, B b, C c, D d, E e);
all_valid!(A a, B b, C c, D d, E e, F f, G g, H h, I i, J j);

// ------------------------------------------------------------------ bodies

/// A new user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CreateUserBody {
    #[schema(schema_with = schemas::user_name, required = true)]
    name: Option<String>,
    #[schema(schema_with = schemas::email, required = true)]
    email: Option<String>,
    #[schema(schema_with = schemas::user_phone, required = true)]
    phone: Option<String>,
}

impl TryFrom<CreateUserBody> for NewUser {
    type Error = Refusal;

    fn try_from(b: CreateUserBody) -> Result<Self, Refusal> {
        let (name, email, phone) = (
            parse("name", b.name, text(NAME_MAX)),
            parse("email", b.email, Email::parse),
            parse("phone", b.phone, Phone::parse),
        )
            .all_valid()?;
        Ok(NewUser { name, email, phone })
    }
}

/// A new booking (PENDING) of a user; `arriveAt` must be after `departAt`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CreateBookingBody {
    #[schema(schema_with = schemas::code, required = true)]
    code: Option<String>,
    #[schema(schema_with = schemas::customer_name, required = true)]
    customer_name: Option<String>,
    #[schema(schema_with = schemas::customer_phone, required = true)]
    customer_phone: Option<String>,
    #[schema(schema_with = schemas::itinerary_from, required = true)]
    itinerary_from: Option<String>,
    #[schema(schema_with = schemas::itinerary_to, required = true)]
    itinerary_to: Option<String>,
    #[schema(schema_with = schemas::depart_at, required = true)]
    depart_at: Option<String>,
    #[schema(schema_with = schemas::arrive_at, required = true)]
    arrive_at: Option<String>,
    #[schema(schema_with = schemas::booking_currency)]
    currency: Option<String>,
    #[schema(schema_with = schemas::price, required = true)]
    amount: Option<String>,
    #[schema(schema_with = schemas::user_id, required = true)]
    user_id: Option<String>,
    #[schema(schema_with = schemas::requires_approval)]
    requires_approval: Option<bool>,
}

impl TryFrom<CreateBookingBody> for NewBooking {
    type Error = Refusal;

    fn try_from(b: CreateBookingBody) -> Result<Self, Refusal> {
        let currency = match b.currency {
            None => Ok(Currency::KRW),
            Some(c) => check("currency", Currency::parse(&c)),
        };
        let price = required("amount", b.amount)
            .and_then(|a| check("amount", Money::parse(&a, currency.clone()?)));
        let (
            code,
            customer_name,
            customer_phone,
            itinerary_from,
            itinerary_to,
            depart_at,
            arrive_at,
            _,
            price,
            user_id,
        ) = (
            parse("code", b.code, BookingCode::parse),
            parse("customerName", b.customer_name, text(NAME_MAX)),
            parse("customerPhone", b.customer_phone, Phone::parse),
            parse("itineraryFrom", b.itinerary_from, text(PLACE_MAX)),
            parse("itineraryTo", b.itinerary_to, text(PLACE_MAX)),
            parse("departAt", b.depart_at, time),
            parse("arriveAt", b.arrive_at, time),
            currency,
            price,
            parse("userId", b.user_id, uuid),
        )
            .all_valid()?;
        if arrive_at <= depart_at {
            return Err(Refusal::rule("arriveAt", "arriveAt must be after departAt"));
        }
        Ok(NewBooking {
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
        })
    }
}

/// Why a PENDING booking is canceled.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CancelBookingBody {
    #[schema(schema_with = schemas::reason, required = true)]
    reason: Option<String>,
}

impl TryFrom<CancelBookingBody> for Cancellation {
    type Error = Refusal;

    fn try_from(b: CancelBookingBody) -> Result<Self, Refusal> {
        let (reason,) = (parse("reason", b.reason, text(REASON_MAX)),).all_valid()?;
        Ok(Cancellation { reason })
    }
}

/// A payment (PENDING) of a PENDING booking: its amount and currency must
/// be the booking's, the tax at most the amount.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CreatePaymentBody {
    #[schema(schema_with = schemas::booking_id, required = true)]
    booking_id: Option<String>,
    #[schema(value_type = PaymentMethod, required = true)]
    method: Option<String>,
    #[schema(schema_with = schemas::payment_amount, required = true)]
    amount: Option<String>,
    #[schema(schema_with = schemas::payment_currency, required = true)]
    currency: Option<String>,
    #[schema(schema_with = schemas::tax, required = true)]
    tax: Option<String>,
}

impl TryFrom<CreatePaymentBody> for NewPayment {
    type Error = Refusal;

    fn try_from(b: CreatePaymentBody) -> Result<Self, Refusal> {
        let currency = parse("currency", b.currency, Currency::parse);
        let amount = required("amount", b.amount)
            .and_then(|a| check("amount", Money::parse(&a, currency.clone()?)));
        let tax = required("tax", b.tax)
            .and_then(|t| check("tax", Money::parse_non_negative(&t, currency.clone()?)));
        let (booking_id, method, _, amount, tax) = (
            parse("bookingId", b.booking_id, uuid),
            parse("method", b.method, PaymentMethod::parse),
            currency,
            amount,
            tax,
        )
            .all_valid()?;
        if tax.amount() > amount.amount() {
            return Err(Refusal::rule("tax", "tax must not exceed the amount"));
        }
        Ok(NewPayment {
            booking_id,
            method,
            amount,
            tax,
        })
    }
}

/// The payment gateway's result for a PENDING payment: `approvalId` is
/// required with APPROVED and refused with FAILED.
// An example of the whole body: without one, schemathesis 4.32 builds the
// examples phase's body from the operation's header example (a body of
// `Idempotency-Key` and `status`), which the server rightly refuses.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({"status": "APPROVED", "approvalId": "PG-20261224-0001"}))]
pub(crate) struct PaymentResultBody {
    #[schema(value_type = PaymentOutcome, required = true)]
    status: Option<String>,
    #[schema(schema_with = schemas::gateway_approval_id)]
    approval_id: Option<String>,
    #[schema(schema_with = schemas::failure_reason)]
    reason: Option<String>,
}

impl TryFrom<PaymentResultBody> for PaymentResult {
    type Error = Refusal;

    fn try_from(b: PaymentResultBody) -> Result<Self, Refusal> {
        let (outcome, approval_id, reason) = (
            parse("status", b.status, PaymentOutcome::parse),
            parse_optional("approvalId", b.approval_id, text(GATEWAY_ID_MAX)),
            parse_optional("reason", b.reason, text(REASON_MAX)),
        )
            .all_valid()?;
        match (outcome, &approval_id) {
            (PaymentOutcome::Approved, None) => Err(Refusal::rule(
                "approvalId",
                "approvalId is required when status is APPROVED",
            )),
            (PaymentOutcome::Failed, Some(_)) => Err(Refusal::rule(
                "approvalId",
                "approvalId is only allowed when status is APPROVED",
            )),
            _ => Ok(PaymentResult {
                outcome,
                approval_id,
                reason,
            }),
        }
    }
}

/// An approval (PENDING, step 1) of a PENDING booking, asked by a user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CreateApprovalBody {
    #[schema(schema_with = schemas::booking_id, required = true)]
    booking_id: Option<String>,
    #[schema(schema_with = schemas::requester_id, required = true)]
    requester_id: Option<String>,
    #[schema(schema_with = schemas::title, required = true)]
    title: Option<String>,
    #[schema(schema_with = schemas::reason, required = true)]
    reason: Option<String>,
    /// Any JSON number: `2.0` is the integer 2 (JSON Schema's `integer`).
    #[schema(schema_with = schemas::steps)]
    steps: Option<serde_json::Number>,
}

impl TryFrom<CreateApprovalBody> for NewApproval {
    type Error = Refusal;

    fn try_from(b: CreateApprovalBody) -> Result<Self, Refusal> {
        let steps = match b.steps {
            None => Ok(1),
            Some(n) => check("steps", step_count(&n)),
        };
        let (booking_id, requester_id, title, reason, steps) = (
            parse("bookingId", b.booking_id, uuid),
            parse("requesterId", b.requester_id, uuid),
            parse("title", b.title, text(TITLE_MAX)),
            parse("reason", b.reason, text(REASON_MAX)),
            steps,
        )
            .all_valid()?;
        Ok(NewApproval {
            booking_id,
            requester_id,
            title,
            reason,
            steps,
        })
    }
}

/// The number of steps: an integer in `STEPS`; JSON does not tell `2`
/// from `2.0`, so an integral number is an integer.
fn step_count(n: &serde_json::Number) -> Result<i16, Invalid> {
    let integral = n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() <= 1e15)
            .map(|f| f as i64)
    });
    match integral {
        Some(n) if STEPS.contains(&n) => i16::try_from(n).map_err(|_| range()),
        Some(_) => Err(range()),
        None => Err(Invalid(format!(
            "must be an integer between {} and {}",
            STEPS.start(),
            STEPS.end()
        ))),
    }
}

fn range() -> Invalid {
    Invalid(format!(
        "must be between {} and {}",
        STEPS.start(),
        STEPS.end()
    ))
}

/// An approver's decision on the current step of a PENDING approval:
/// REJECTED ends it, APPROVED moves it to the next step or, after the last,
/// approves it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct DecisionBody {
    #[schema(schema_with = schemas::approver_id, required = true)]
    approver_id: Option<String>,
    #[schema(value_type = Decision, required = true)]
    decision: Option<String>,
    #[schema(schema_with = schemas::decision_reason)]
    reason: Option<String>,
}

impl TryFrom<DecisionBody> for ApprovalDecision {
    type Error = Refusal;

    fn try_from(b: DecisionBody) -> Result<Self, Refusal> {
        let (approver_id, decision, reason) = (
            parse("approverId", b.approver_id, uuid),
            parse("decision", b.decision, Decision::parse),
            parse_optional("reason", b.reason, text(REASON_MAX)),
        )
            .all_valid()?;
        Ok(ApprovalDecision {
            approver_id,
            decision,
            reason,
        })
    }
}

/// The schema of each body field (`#[schema(schema_with = …)]`), from the
/// limits above and the domain types' rules (`openapi::fields`).
mod schemas {
    use utoipa::openapi::{RefOr, schema::Schema};

    use super::{GATEWAY_ID_MAX, NAME_MAX, PLACE_MAX, REASON_MAX, STEPS, TITLE_MAX};
    use crate::openapi::fields;

    pub(super) fn user_name() -> RefOr<Schema> {
        fields::text(NAME_MAX, false, "The user's name")
    }
    pub(super) fn email() -> RefOr<Schema> {
        fields::email()
    }
    pub(super) fn user_phone() -> RefOr<Schema> {
        fields::phone("The user's phone number")
    }
    pub(super) fn code() -> RefOr<Schema> {
        fields::booking_code()
    }
    pub(super) fn customer_name() -> RefOr<Schema> {
        fields::text(NAME_MAX, false, "The traveller's name")
    }
    pub(super) fn customer_phone() -> RefOr<Schema> {
        fields::phone("The traveller's phone number")
    }
    pub(super) fn itinerary_from() -> RefOr<Schema> {
        fields::text(PLACE_MAX, false, "Where the trip starts")
    }
    pub(super) fn itinerary_to() -> RefOr<Schema> {
        fields::text(PLACE_MAX, false, "Where the trip ends")
    }
    pub(super) fn depart_at() -> RefOr<Schema> {
        fields::time("When the trip starts")
    }
    pub(super) fn arrive_at() -> RefOr<Schema> {
        fields::time("When the trip ends, after departAt")
    }
    pub(super) fn booking_currency() -> RefOr<Schema> {
        fields::currency(Some("KRW"))
    }
    pub(super) fn price() -> RefOr<Schema> {
        fields::amount("The price")
    }
    pub(super) fn user_id() -> RefOr<Schema> {
        fields::uuid(false, "The user who books")
    }
    pub(super) fn requires_approval() -> RefOr<Schema> {
        fields::flag("Whether the booking needs an approval before it is confirmed")
    }
    pub(super) fn reason() -> RefOr<Schema> {
        fields::text(REASON_MAX, false, "Why")
    }
    pub(super) fn booking_id() -> RefOr<Schema> {
        fields::uuid(false, "The booking")
    }
    pub(super) fn payment_amount() -> RefOr<Schema> {
        fields::amount("The amount, the booking's")
    }
    pub(super) fn payment_currency() -> RefOr<Schema> {
        fields::currency(None)
    }
    pub(super) fn tax() -> RefOr<Schema> {
        fields::tax("The tax included in the amount")
    }
    pub(super) fn gateway_approval_id() -> RefOr<Schema> {
        fields::text(
            GATEWAY_ID_MAX,
            true,
            "The gateway's approval id, required with APPROVED and refused with FAILED",
        )
    }
    pub(super) fn failure_reason() -> RefOr<Schema> {
        fields::text(REASON_MAX, true, "Why the payment failed (optional)")
    }
    pub(super) fn requester_id() -> RefOr<Schema> {
        fields::uuid(false, "The user who asks for the approval")
    }
    pub(super) fn title() -> RefOr<Schema> {
        fields::text(TITLE_MAX, false, "What is to be approved")
    }
    pub(super) fn steps() -> RefOr<Schema> {
        fields::integer(STEPS, 1, "How many approvers must approve, one step each")
    }
    pub(super) fn approver_id() -> RefOr<Schema> {
        fields::uuid(false, "The user who decides")
    }
    pub(super) fn decision_reason() -> RefOr<Schema> {
        fields::text(REASON_MAX, true, "Why (optional)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(refusal: Refusal) -> Vec<(String, String)> {
        match refusal {
            Refusal::Fields(errors) => errors.into_iter().map(|e| (e.field, e.message)).collect(),
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    /// Pins what the JSON layer reports, so that a serde or serde_json
    /// upgrade that changes it fails here rather than in production.
    #[test]
    fn duplicate_and_unknown_keys_are_named_by_their_key() {
        let err = parse_json::<CreateUserBody>(br#"{"name":"a","name":"b","nick":1,"nick":2}"#)
            .unwrap_err();
        assert_eq!(
            fields(err),
            vec![
                ("name".into(), "field given more than once".into()),
                ("nick".into(), "unknown field".into()),
                ("nick".into(), "field given more than once".into()),
            ]
        );
        let err = parse_json::<CreateUserBody>(br#"{"name": 5}"#).unwrap_err();
        let f = fields(err);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0, "name", "{f:?}");
        assert!(!f[0].1.contains("line"), "position stripped: {f:?}");
    }

    #[test]
    fn bodies_that_are_not_objects_are_malformed() {
        for body in [&b"[1,2]"[..], b"\"x\"", b"{\"a\":", b"\xff", b""] {
            assert!(
                matches!(
                    parse_json::<CreateUserBody>(body),
                    Err(Refusal::Malformed(_))
                ),
                "{body:?}"
            );
        }
    }

    #[test]
    fn every_error_is_reported_once_in_field_order() {
        let body = CreatePaymentBody {
            booking_id: Some("nope".into()),
            method: None,
            amount: Some("10".into()),
            currency: Some("usd".into()),
            tax: None,
        };
        let got: Vec<String> = fields(NewPayment::try_from(body).unwrap_err())
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        // The amount cannot be checked without a currency: not reported
        // twice, and not on its own.
        assert_eq!(got, ["bookingId", "method", "currency", "tax"]);
    }
}

// ---------------------------------------------------------- command types

/// The commands by name: the AMQP `type` property, the HTTP route that
/// carries the same command, and the scope it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommandType {
    UserCreate,
    BookingCreate,
    BookingCancel,
    PaymentCreate,
    PaymentResult,
    ApprovalCreate,
    ApprovalDecision,
}

impl CommandType {
    pub(crate) const EVERY: [CommandType; 7] = [
        Self::UserCreate,
        Self::BookingCreate,
        Self::BookingCancel,
        Self::PaymentCreate,
        Self::PaymentResult,
        Self::ApprovalCreate,
        Self::ApprovalDecision,
    ];

    pub(crate) fn parse(name: &str) -> Option<Self> {
        Self::EVERY.into_iter().find(|t| t.as_str() == name)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::UserCreate => "user.create",
            Self::BookingCreate => "booking.create",
            Self::BookingCancel => "booking.cancel",
            Self::PaymentCreate => "payment.create",
            Self::PaymentResult => "payment.result",
            Self::ApprovalCreate => "approval.create",
            Self::ApprovalDecision => "approval.decision",
        }
    }

    pub(crate) fn scope(self) -> Scope {
        match self {
            Self::UserCreate => Scope::UsersWrite,
            Self::BookingCreate | Self::BookingCancel => Scope::BookingsWrite,
            Self::PaymentCreate => Scope::PaymentsWrite,
            Self::PaymentResult => Scope::PaymentsResult,
            Self::ApprovalCreate => Scope::ApprovalsWrite,
            Self::ApprovalDecision => Scope::ApprovalsDecide,
        }
    }

    /// Whether the command acts on an existing entity (named in the HTTP
    /// path, or in the AMQP header `x-entrip-entity-id`).
    pub(crate) fn on_entity(self) -> bool {
        matches!(
            self,
            Self::BookingCancel | Self::PaymentResult | Self::ApprovalDecision
        )
    }

    /// The HTTP path of the same request; with the body, what tells a
    /// replay from a misuse of the key, whichever transport it came by.
    pub(crate) fn path(self, id: Option<Uuid>) -> String {
        let id = id.map(|id| id.to_string()).unwrap_or_default();
        self.route().replace("{id}", &id)
    }

    /// The HTTP route template of the command (the `route` label of the
    /// ingest metrics).
    pub(crate) fn route(self) -> &'static str {
        match self {
            Self::UserCreate => "/v1/users",
            Self::BookingCreate => "/v1/bookings",
            Self::BookingCancel => "/v1/bookings/{id}/cancel",
            Self::PaymentCreate => "/v1/payments",
            Self::PaymentResult => "/v1/payments/{id}/result",
            Self::ApprovalCreate => "/v1/approvals",
            Self::ApprovalDecision => "/v1/approvals/{id}/decision",
        }
    }

    /// The name of the schema of this command's body (the OpenAPI
    /// component; `docs/schemas/requests/<type>.json` is the same, alone).
    pub(crate) fn body_schema(self) -> String {
        match self {
            Self::UserCreate => CreateUserBody::name(),
            Self::BookingCreate => CreateBookingBody::name(),
            Self::BookingCancel => CancelBookingBody::name(),
            Self::PaymentCreate => CreatePaymentBody::name(),
            Self::PaymentResult => PaymentResultBody::name(),
            Self::ApprovalCreate => CreateApprovalBody::name(),
            Self::ApprovalDecision => DecisionBody::name(),
        }
        .into_owned()
    }

    /// Parses and validates a body of this type into its command (`id` is
    /// the entity's, for the commands on one); also returns the body as the
    /// canonical `Value` the fingerprint hashes.
    pub(crate) fn command(
        self,
        id: Option<Uuid>,
        bytes: &[u8],
    ) -> Result<(Command, serde_json::Value), Refusal> {
        fn parsed<B: DeserializeOwned, C: TryFrom<B, Error = Refusal>>(
            bytes: &[u8],
        ) -> Result<(C, serde_json::Value), Refusal> {
            let (body, value) = parse_json::<B>(bytes)?;
            Ok((C::try_from(body)?, value))
        }
        let entity = || id.ok_or_else(|| Refusal::field("id", "the entity's id is required"));
        Ok(match self {
            Self::UserCreate => {
                let (c, v) = parsed::<CreateUserBody, _>(bytes)?;
                (Command::CreateUser(c), v)
            }
            Self::BookingCreate => {
                let (c, v) = parsed::<CreateBookingBody, _>(bytes)?;
                (Command::CreateBooking(c), v)
            }
            Self::BookingCancel => {
                let (c, v) = parsed::<CancelBookingBody, _>(bytes)?;
                (Command::CancelBooking(entity()?, c), v)
            }
            Self::PaymentCreate => {
                let (c, v) = parsed::<CreatePaymentBody, _>(bytes)?;
                (Command::CreatePayment(c), v)
            }
            Self::PaymentResult => {
                let (c, v) = parsed::<PaymentResultBody, _>(bytes)?;
                (Command::RecordPaymentResult(entity()?, c), v)
            }
            Self::ApprovalCreate => {
                let (c, v) = parsed::<CreateApprovalBody, _>(bytes)?;
                (Command::CreateApproval(c), v)
            }
            Self::ApprovalDecision => {
                let (c, v) = parsed::<DecisionBody, _>(bytes)?;
                (Command::DecideApproval(entity()?, c), v)
            }
        })
    }
}
