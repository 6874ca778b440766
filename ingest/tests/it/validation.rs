//! Validation of every request the HTTP API accepts: each refused field of
//! each POST endpoint, rules across fields, missing, null, unknown, mistyped
//! and repeated fields, malformed JSON, the body size limit, the content
//! type, the `Idempotency-Key` header, routing and unknown ids. Every bad
//! input gets an `application/problem+json` answer naming the field at
//! fault, never a 500, and stores nothing.

use crate::support::{Resp, Server, booking_body, key, payment_body, unique_code};
use reqwest::{StatusCode, header::HeaderValue};
use serde_json::{Value, json};
use sqlx::PgPool;

/// The tables a refused request must leave untouched.
const TABLES: [&str; 9] = [
    "users",
    "bookings",
    "payments",
    "approvals",
    "approval_decisions",
    "settlements",
    "outbox",
    "audit_log",
    "idempotency_keys",
];

/// Row counts of every table in `TABLES`.
async fn counts(s: &Server) -> Vec<(&'static str, i64)> {
    let mut out = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        out.push((table, s.count(table).await));
    }
    out
}

/// `base` with `field` set to `value`.
fn set(base: &Value, field: &str, value: Value) -> Value {
    let mut body = base.clone();
    body[field] = value;
    body
}

/// `base` without `field`.
fn without(base: &Value, field: &str) -> Value {
    let mut body = base.clone();
    body.as_object_mut().unwrap().remove(field);
    body
}

/// Asserts that `r` refuses the request of `case` with `status` as
/// problem+json and names every one of `fields` (each with a message).
fn refused(case: &str, r: &Resp, status: StatusCode, fields: &[&str]) {
    assert!(
        r.status.as_u16() < 500,
        "{case}: a bad input must never be a 5xx, got {} {:?}",
        r.status,
        r.body
    );
    assert_eq!(r.status, status, "{case}: status; body {:?}", r.body);
    assert!(
        r.is_problem(),
        "{case}: not problem+json: {:?} {:?}",
        r.headers,
        r.body
    );
    let named = r.error_fields();
    for field in fields {
        assert!(
            named.iter().any(|n| n == field),
            "{case}: field {field:?} not named in errors {named:?}; body {:?}",
            r.body
        );
    }
    if let Some(errors) = r.body["errors"].as_array() {
        for e in errors {
            assert!(
                e["message"].as_str().is_some_and(|m| !m.trim().is_empty()),
                "{case}: an error without a message: {e:?}"
            );
        }
    }
}

/// Posts each `(case, body, field)` to `path` under a fresh key and asserts
/// a `status` naming `field`, with nothing stored.
async fn expect_each(s: &Server, path: &str, status: StatusCode, cases: &[(String, Value, &str)]) {
    let before = counts(s).await;
    for (case, body, field) in cases {
        let r = s.post(path, Some(&key()), body).await;
        refused(&format!("POST {path} {case}"), &r, status, &[field]);
        assert_eq!(
            counts(s).await,
            before,
            "POST {path} {case}: something was stored"
        );
    }
}

fn user_body() -> Value {
    json!({
        "name": "Kim Minji",
        "email": format!("kim-{}@example.com", uuid::Uuid::new_v4().simple()),
        "phone": "+82 10 1234 5678",
    })
}

/// A booking that requires approval, a payment for it and an approval of it.
struct World {
    user: String,
    booking: Value,
    payment: Value,
    approval: Value,
}

async fn world(s: &Server) -> World {
    let user = s.create_user().await;
    let booking = s.create_booking(&user, true).await;
    let payment = s.create_payment(&booking).await;
    let r = s
        .post(
            "/v1/approvals",
            Some(&key()),
            &approval_body(&booking, &user),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    World {
        user,
        booking,
        payment,
        approval: r.body,
    }
}

fn approval_body(booking: &Value, requester: &str) -> Value {
    json!({
        "bookingId": booking["id"],
        "requesterId": requester,
        "title": "Business trip to Tokyo",
        "reason": "Customer meeting",
        "steps": 2,
    })
}

fn decision_body(approver: &str) -> Value {
    json!({ "approverId": approver, "decision": "APPROVED", "reason": "fine" })
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn user_fields_are_validated(pool: PgPool) {
    let s = Server::start(pool).await;
    let base = user_body();
    let c =
        |case: &str, field: &'static str, v: Value| (case.to_owned(), set(&base, field, v), field);
    let cases = vec![
        c("empty name", "name", json!("")),
        c("whitespace name", "name", json!("   \t ")),
        c("name of 101 characters", "name", json!("a".repeat(101))),
        c("name with a NUL", "name", json!("Kim\u{0}Minji")),
        c("email without @", "email", json!("kim.example.com")),
        c("email without domain", "email", json!("kim@")),
        c("email without local part", "email", json!("@example.com")),
        c(
            "email without dot in domain",
            "email",
            json!("kim@localhost"),
        ),
        c(
            "email with a space",
            "email",
            json!("kim minji@example.com"),
        ),
        c("email with two @", "email", json!("kim@minji@example.com")),
        c(
            "email of 255 characters",
            "email",
            json!(format!("{}@example.com", "k".repeat(243))),
        ),
        c("empty email", "email", json!("")),
        c("phone too short", "phone", json!("123456")),
        c("phone too long", "phone", json!("0".repeat(21))),
        c("phone with letters", "phone", json!("010-1234-567a")),
        c("phone of symbols only", "phone", json!("+() -()+")),
        c("empty phone", "phone", json!("")),
    ];
    expect_each(&s, "/v1/users", StatusCode::BAD_REQUEST, &cases).await;

    // The limits themselves are accepted.
    let mut ok = set(&base, "name", json!("a".repeat(100)));
    ok["phone"] = json!("1234567");
    let r = s.post("/v1/users", Some(&key()), &ok).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "100-character name, 7-character phone: {:?}",
        r.body
    );
    let ok = json!({ "name": "  Lee  ", "email": "lee@example.com", "phone": "0".repeat(20) });
    let r = s.post("/v1/users", Some(&key()), &ok).await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "20-character phone: {:?}",
        r.body
    );
    assert_eq!(r.body["name"], "Lee", "names are trimmed");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn booking_fields_are_validated(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let base = booking_body(&user, &unique_code(), false);
    let c =
        |case: &str, field: &'static str, v: Value| (case.to_owned(), set(&base, field, v), field);
    let usd = set(&base, "currency", json!("USD"));
    let jpy = set(&base, "currency", json!("JPY"));
    let cases = vec![
        c("lowercase code", "code", json!("abc-123")),
        c("code of 5", "code", json!("ABCDE")),
        c("code of 33", "code", json!("A".repeat(33))),
        c("code with underscore", "code", json!("ABC_123")),
        c("code with a space", "code", json!("ABC 123")),
        c("code with a non-ASCII letter", "code", json!("ÄBC-123")),
        c("empty customerName", "customerName", json!("")),
        c("whitespace customerName", "customerName", json!("   ")),
        c(
            "customerName of 101",
            "customerName",
            json!("n".repeat(101)),
        ),
        c("empty customerPhone", "customerPhone", json!("")),
        c(
            "customerPhone with letters",
            "customerPhone",
            json!("call me maybe"),
        ),
        c("empty itineraryFrom", "itineraryFrom", json!("")),
        c("whitespace itineraryFrom", "itineraryFrom", json!("  ")),
        c(
            "itineraryFrom of 101",
            "itineraryFrom",
            json!("x".repeat(101)),
        ),
        c("empty itineraryTo", "itineraryTo", json!("")),
        c("whitespace itineraryTo", "itineraryTo", json!(" \n ")),
        c(
            "departAt without offset",
            "departAt",
            json!("2026-12-24T09:30:00"),
        ),
        c(
            "departAt with a space",
            "departAt",
            json!("2026-12-24 09:30"),
        ),
        c("departAt in words", "departAt", json!("tomorrow")),
        c("empty departAt", "departAt", json!("")),
        c(
            "arriveAt month 13",
            "arriveAt",
            json!("2026-13-01T00:00:00Z"),
        ),
        c("arriveAt date only", "arriveAt", json!("2026-12-24")),
        c("arriveAt as a number", "arriveAt", json!(1_798_000_000)),
        c("unknown currency ABC", "currency", json!("ABC")),
        c("lowercase currency krw", "currency", json!("krw")),
        c("currency with 3 minor units BHD", "currency", json!("BHD")),
        c("currency without minor units XAU", "currency", json!("XAU")),
        c("two-letter currency", "currency", json!("KR")),
        c("empty currency", "currency", json!("")),
        c("amount 0", "amount", json!("0")),
        c("amount -5", "amount", json!("-5")),
        c("amount abc", "amount", json!("abc")),
        c("amount empty", "amount", json!("")),
        c("amount in exponent form", "amount", json!("1e5")),
        c("amount .", "amount", json!(".")),
        c("amount 1.2.3", "amount", json!("1.2.3")),
        c("amount --5", "amount", json!("--5")),
        c("amount -0", "amount", json!("-0")),
        c("amount +5", "amount", json!("+5")),
        c("amount with a leading space", "amount", json!(" 10")),
        c(
            "amount with a thousands separator",
            "amount",
            json!("350,000"),
        ),
        c("amount too large", "amount", json!("10000000000000000000")),
        c("amount 100.50 KRW", "amount", json!("100.50")),
        c("amount 1.5 KRW", "amount", json!("1.5")),
        c("amount as a number", "amount", json!(350_000)),
        c("userId not a UUID", "userId", json!("not-a-uuid")),
        c("userId empty", "userId", json!("")),
        c("userId as a number", "userId", json!(42)),
        c(
            "requiresApproval as a string",
            "requiresApproval",
            json!("true"),
        ),
        c("requiresApproval as a number", "requiresApproval", json!(1)),
        (
            "amount 129.901 USD".to_owned(),
            set(&usd, "amount", json!("129.901")),
            "amount",
        ),
        (
            "amount 1.5 JPY".to_owned(),
            set(&jpy, "amount", json!("1.5")),
            "amount",
        ),
    ];
    expect_each(&s, "/v1/bookings", StatusCode::BAD_REQUEST, &cases).await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn money_is_stored_and_rendered_at_the_currency_scale(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;

    let body = set(
        &booking_body(&user, &unique_code(), false),
        "amount",
        json!("120000.00"),
    );
    let r = s.post("/v1/bookings", Some(&key()), &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "120000.00 KRW: {:?}", r.body);
    assert_eq!(
        r.body["amount"], "120000",
        "120000.00 KRW is rendered 120000"
    );
    assert_eq!(r.body["currency"], "KRW");
    let got = s.get(&format!("/v1/bookings/{}", r.id())).await;
    assert_eq!(
        got.body["amount"], "120000",
        "GET renders 120000.00 KRW as 120000"
    );

    let mut body = booking_body(&user, &unique_code(), false);
    body["currency"] = json!("USD");
    body["amount"] = json!("129.9");
    let r = s.post("/v1/bookings", Some(&key()), &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "129.9 USD: {:?}", r.body);
    assert_eq!(r.body["amount"], "129.90", "129.9 USD is rendered 129.90");
    let got = s.get(&format!("/v1/bookings/{}", r.id())).await;
    assert_eq!(
        got.body["amount"], "129.90",
        "GET renders 129.9 USD as 129.90"
    );

    // Currency and requiresApproval have defaults; null is the same as absent.
    let body = without(
        &without(&booking_body(&user, &unique_code(), false), "currency"),
        "requiresApproval",
    );
    let r = s.post("/v1/bookings", Some(&key()), &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "defaults: {:?}", r.body);
    assert_eq!(r.body["currency"], "KRW", "currency defaults to KRW");
    assert_eq!(
        r.body["requiresApproval"], false,
        "requiresApproval defaults to false"
    );
    let mut body = booking_body(&user, &unique_code(), false);
    body["currency"] = Value::Null;
    body["requiresApproval"] = Value::Null;
    let r = s.post("/v1/bookings", Some(&key()), &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "null defaults: {:?}", r.body);
    assert_eq!(r.body["currency"], "KRW");
    assert_eq!(r.body["requiresApproval"], false);

    // The code limits themselves are accepted.
    for code in ["ABC-12", &"Z".repeat(32)] {
        let r = s
            .post(
                "/v1/bookings",
                Some(&key()),
                &booking_body(&user, code, false),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "code {code:?}: {:?}", r.body);
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn payment_fields_are_validated(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;
    let base = payment_body(&booking);
    let c =
        |case: &str, field: &'static str, v: Value| (case.to_owned(), set(&base, field, v), field);
    let cases = vec![
        c("bookingId not a UUID", "bookingId", json!("booking-1")),
        c("bookingId empty", "bookingId", json!("")),
        c("unknown method", "method", json!("CASH")),
        c("lowercase method", "method", json!("card")),
        c("empty method", "method", json!("")),
        c("amount 0", "amount", json!("0")),
        c("amount -5", "amount", json!("-5")),
        c("amount abc", "amount", json!("abc")),
        c("amount 350000.5 KRW", "amount", json!("350000.5")),
        c("amount as a number", "amount", json!(350_000)),
        c("unknown currency", "currency", json!("ABC")),
        c("lowercase currency", "currency", json!("krw")),
        c("currency with 3 minor units", "currency", json!("BHD")),
        c("tax negative", "tax", json!("-1")),
        c("tax abc", "tax", json!("abc")),
        c("tax 0.5 KRW", "tax", json!("0.5")),
        c("tax as a number", "tax", json!(0)),
    ];
    expect_each(&s, "/v1/payments", StatusCode::BAD_REQUEST, &cases).await;

    // A tax of zero is allowed.
    let r = s
        .post("/v1/payments", Some(&key()), &set(&base, "tax", json!("0")))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "tax 0: {:?}", r.body);
    assert_eq!(r.body["tax"], "0");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn payment_result_fields_are_validated(pool: PgPool) {
    let s = Server::start(pool).await;
    let w = world(&s).await;
    let path = format!("/v1/payments/{}/result", w.payment["id"].as_str().unwrap());
    let approved = json!({ "status": "APPROVED", "approvalId": "PG-0001" });
    let failed = json!({ "status": "FAILED", "reason": "card declined" });
    let cases = vec![
        (
            "unknown status".to_owned(),
            set(&approved, "status", json!("OK")),
            "status",
        ),
        (
            "status PENDING".to_owned(),
            set(&approved, "status", json!("PENDING")),
            "status",
        ),
        (
            "lowercase status".to_owned(),
            set(&approved, "status", json!("approved")),
            "status",
        ),
        (
            "empty status".to_owned(),
            set(&approved, "status", json!("")),
            "status",
        ),
        (
            "status as a bool".to_owned(),
            set(&approved, "status", json!(true)),
            "status",
        ),
        (
            "empty approvalId".to_owned(),
            set(&approved, "approvalId", json!("  ")),
            "approvalId",
        ),
        (
            "approvalId of 101".to_owned(),
            set(&approved, "approvalId", json!("p".repeat(101))),
            "approvalId",
        ),
        (
            "approvalId as a number".to_owned(),
            set(&approved, "approvalId", json!(1)),
            "approvalId",
        ),
        (
            "empty reason".to_owned(),
            set(&failed, "reason", json!("")),
            "reason",
        ),
        (
            "reason of 1001".to_owned(),
            set(&failed, "reason", json!("r".repeat(1001))),
            "reason",
        ),
    ];
    expect_each(&s, &path, StatusCode::BAD_REQUEST, &cases).await;
    let r = s
        .get(&format!(
            "/v1/payments/{}",
            w.payment["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.body["status"], "PENDING", "the payment is unchanged");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn approval_fields_are_validated(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, true).await;
    let base = approval_body(&booking, &user);
    let c =
        |case: &str, field: &'static str, v: Value| (case.to_owned(), set(&base, field, v), field);
    let cases = vec![
        c("bookingId not a UUID", "bookingId", json!("nope")),
        c("requesterId not a UUID", "requesterId", json!("nope")),
        c("empty title", "title", json!("")),
        c("whitespace title", "title", json!("   ")),
        c("title of 201", "title", json!("t".repeat(201))),
        c("empty reason", "reason", json!("")),
        c("reason of 1001", "reason", json!("r".repeat(1001))),
        c("steps 0", "steps", json!(0)),
        c("steps 6", "steps", json!(6)),
        c("steps -1", "steps", json!(-1)),
        c("steps huge", "steps", json!(i64::MAX)),
        c("steps beyond i64", "steps", json!(u64::MAX)),
        c("steps as a string", "steps", json!("2")),
        c("steps as a fraction", "steps", json!(2.5)),
        ("title missing".to_owned(), without(&base, "title"), "title"),
        (
            "reason missing".to_owned(),
            without(&base, "reason"),
            "reason",
        ),
    ];
    expect_each(&s, "/v1/approvals", StatusCode::BAD_REQUEST, &cases).await;

    // steps 5 is the most, and steps defaults to 1.
    let r = s
        .post("/v1/approvals", Some(&key()), &without(&base, "steps"))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "steps omitted: {:?}", r.body);
    assert_eq!(r.body["steps"], 1, "steps defaults to 1");
    assert_eq!(r.body["currentStep"], 1);
    let other = s.create_booking(&user, true).await;
    let r = s
        .post(
            "/v1/approvals",
            Some(&key()),
            &set(&approval_body(&other, &user), "steps", json!(5)),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "steps 5: {:?}", r.body);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn decision_and_cancel_fields_are_validated(pool: PgPool) {
    let s = Server::start(pool).await;
    let w = world(&s).await;
    let path = format!(
        "/v1/approvals/{}/decision",
        w.approval["id"].as_str().unwrap()
    );
    let base = decision_body(&w.user);
    let c =
        |case: &str, field: &'static str, v: Value| (case.to_owned(), set(&base, field, v), field);
    let cases = vec![
        c("unknown decision", "decision", json!("MAYBE")),
        c("lowercase decision", "decision", json!("approved")),
        c("decision FAILED", "decision", json!("FAILED")),
        c("approverId not a UUID", "approverId", json!("boss")),
        c("approverId empty", "approverId", json!("")),
        c("empty reason", "reason", json!(" ")),
        c("reason of 1001", "reason", json!("r".repeat(1001))),
        (
            "decision missing".to_owned(),
            without(&base, "decision"),
            "decision",
        ),
        (
            "approverId missing".to_owned(),
            without(&base, "approverId"),
            "approverId",
        ),
    ];
    expect_each(&s, &path, StatusCode::BAD_REQUEST, &cases).await;

    let path = format!("/v1/bookings/{}/cancel", w.booking["id"].as_str().unwrap());
    let cases = vec![
        ("reason missing".to_owned(), json!({}), "reason"),
        (
            "reason null".to_owned(),
            json!({ "reason": null }),
            "reason",
        ),
        ("empty reason".to_owned(), json!({ "reason": "" }), "reason"),
        (
            "whitespace reason".to_owned(),
            json!({ "reason": "  " }),
            "reason",
        ),
        (
            "reason of 1001".to_owned(),
            json!({ "reason": "r".repeat(1001) }),
            "reason",
        ),
        (
            "reason as a number".to_owned(),
            json!({ "reason": 7 }),
            "reason",
        ),
    ];
    expect_each(&s, &path, StatusCode::BAD_REQUEST, &cases).await;
    let r = s
        .get(&format!(
            "/v1/bookings/{}",
            w.booking["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.body["status"], "PENDING", "the booking is unchanged");
    assert_eq!(
        r.body["approval"]["currentStep"], 1,
        "the approval is unchanged"
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn every_bad_field_of_a_request_is_named_at_once(pool: PgPool) {
    let s = Server::start(pool).await;
    let before = counts(&s).await;

    let r = s
        .post(
            "/v1/users",
            Some(&key()),
            &json!({ "name": " ", "email": "nope", "phone": "abc" }),
        )
        .await;
    refused(
        "user with three bad fields",
        &r,
        StatusCode::BAD_REQUEST,
        &["name", "email", "phone"],
    );
    assert_eq!(
        r.error_fields().len(),
        3,
        "one error per field: {:?}",
        r.body
    );

    let r = s.post("/v1/users", Some(&key()), &json!({})).await;
    refused(
        "empty user object",
        &r,
        StatusCode::BAD_REQUEST,
        &["name", "email", "phone"],
    );

    let r = s
        .post(
            "/v1/bookings",
            Some(&key()),
            &json!({
                "code": "bad code",
                "customerName": "",
                "customerPhone": "1",
                "itineraryFrom": " ",
                "itineraryTo": "",
                "departAt": "soon",
                "arriveAt": "later",
                "currency": "KRW",
                "amount": "0",
                "userId": "me",
            }),
        )
        .await;
    refused(
        "booking with ten bad fields",
        &r,
        StatusCode::BAD_REQUEST,
        &[
            "code",
            "customerName",
            "customerPhone",
            "itineraryFrom",
            "itineraryTo",
            "departAt",
            "arriveAt",
            "amount",
            "userId",
        ],
    );

    let r = s
        .post(
            "/v1/payments",
            Some(&key()),
            &json!({ "bookingId": "x", "method": "CASH", "currency": "USD", "amount": "-1", "tax": "-1" }),
        )
        .await;
    refused(
        "payment with four bad fields",
        &r,
        StatusCode::BAD_REQUEST,
        &["bookingId", "method", "amount", "tax"],
    );

    let r = s
        .post(
            "/v1/approvals",
            Some(&key()),
            &json!({ "bookingId": "x", "requesterId": "y", "title": "", "reason": "", "steps": 9 }),
        )
        .await;
    refused(
        "approval with five bad fields",
        &r,
        StatusCode::BAD_REQUEST,
        &["bookingId", "requesterId", "title", "reason", "steps"],
    );

    let id = uuid::Uuid::new_v4();
    let r = s
        .post(
            &format!("/v1/approvals/{id}/decision"),
            Some(&key()),
            &json!({ "approverId": "x", "decision": "x" }),
        )
        .await;
    refused(
        "decision with two bad fields",
        &r,
        StatusCode::BAD_REQUEST,
        &["approverId", "decision"],
    );

    assert_eq!(counts(&s).await, before, "nothing stored");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn rules_across_fields_are_422_naming_the_field(pool: PgPool) {
    let s = Server::start(pool).await;
    let w = world(&s).await;
    let before = counts(&s).await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;

    let base = booking_body(&w.user, &unique_code(), false);
    let mut same = base.clone();
    same["arriveAt"] = same["departAt"].clone();
    let r = s.post("/v1/bookings", Some(&key()), &same).await;
    refused(
        "arriveAt equal to departAt",
        &r,
        unprocessable,
        &["arriveAt"],
    );
    let mut before_depart = base.clone();
    before_depart["arriveAt"] = json!("2026-12-24T09:29:59+09:00");
    let r = s.post("/v1/bookings", Some(&key()), &before_depart).await;
    refused("arriveAt before departAt", &r, unprocessable, &["arriveAt"]);
    // The same instant written with another offset is still not after.
    let mut other_offset = base.clone();
    other_offset["arriveAt"] = json!("2026-12-24T00:30:00Z");
    let r = s.post("/v1/bookings", Some(&key()), &other_offset).await;
    refused(
        "arriveAt equal to departAt in UTC",
        &r,
        unprocessable,
        &["arriveAt"],
    );

    // A payment for a second booking (the first already has one).
    assert_eq!(
        counts(&s).await,
        before,
        "nothing stored by bookings with bad times"
    );
    let booking = s.create_booking(&w.user, false).await;
    let before = counts(&s).await;
    let pay = payment_body(&booking);
    let r = s
        .post(
            "/v1/payments",
            Some(&key()),
            &set(&pay, "tax", json!("350001")),
        )
        .await;
    refused("tax greater than amount", &r, unprocessable, &["tax"]);
    let r = s
        .post(
            "/v1/payments",
            Some(&key()),
            &set(&pay, "amount", json!("350001")),
        )
        .await;
    refused(
        "payment amount differs from the booking's",
        &r,
        unprocessable,
        &["amount"],
    );
    let mut usd = set(&pay, "currency", json!("USD"));
    usd["tax"] = json!("0");
    let r = s.post("/v1/payments", Some(&key()), &usd).await;
    refused(
        "payment currency differs from the booking's",
        &r,
        unprocessable,
        &["currency"],
    );

    let result = format!("/v1/payments/{}/result", w.payment["id"].as_str().unwrap());
    let r = s
        .post(&result, Some(&key()), &json!({ "status": "APPROVED" }))
        .await;
    refused(
        "APPROVED without approvalId",
        &r,
        unprocessable,
        &["approvalId"],
    );
    let r = s
        .post(
            &result,
            Some(&key()),
            &json!({ "status": "APPROVED", "approvalId": null }),
        )
        .await;
    refused(
        "APPROVED with a null approvalId",
        &r,
        unprocessable,
        &["approvalId"],
    );
    let r = s
        .post(
            &result,
            Some(&key()),
            &json!({ "status": "FAILED", "approvalId": "PG-1", "reason": "declined" }),
        )
        .await;
    refused(
        "FAILED with an approvalId",
        &r,
        unprocessable,
        &["approvalId"],
    );

    assert_eq!(
        counts(&s).await,
        before,
        "nothing stored by rule violations"
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn missing_and_null_fields_are_named(pool: PgPool) {
    let s = Server::start(pool).await;
    let w = world(&s).await;
    let before = counts(&s).await;
    let endpoints: Vec<(String, Value, Vec<&str>)> = vec![
        (
            "/v1/users".into(),
            user_body(),
            vec!["name", "email", "phone"],
        ),
        (
            "/v1/bookings".into(),
            booking_body(&w.user, &unique_code(), false),
            vec![
                "code",
                "customerName",
                "customerPhone",
                "itineraryFrom",
                "itineraryTo",
                "departAt",
                "arriveAt",
                "amount",
                "userId",
            ],
        ),
        (
            format!("/v1/bookings/{}/cancel", w.booking["id"].as_str().unwrap()),
            json!({ "reason": "changed plans" }),
            vec!["reason"],
        ),
        (
            "/v1/payments".into(),
            payment_body(&w.booking),
            vec!["bookingId", "method", "amount", "currency", "tax"],
        ),
        (
            format!("/v1/payments/{}/result", w.payment["id"].as_str().unwrap()),
            json!({ "status": "APPROVED", "approvalId": "PG-1" }),
            vec!["status"],
        ),
        (
            "/v1/approvals".into(),
            approval_body(&w.booking, &w.user),
            vec!["bookingId", "requesterId", "title", "reason"],
        ),
        (
            format!(
                "/v1/approvals/{}/decision",
                w.approval["id"].as_str().unwrap()
            ),
            decision_body(&w.user),
            vec!["approverId", "decision"],
        ),
    ];
    for (path, base, required) in &endpoints {
        for field in required {
            let r = s.post(path, Some(&key()), &without(base, field)).await;
            refused(
                &format!("POST {path} without {field}"),
                &r,
                StatusCode::BAD_REQUEST,
                &[field],
            );
            let r = s
                .post(path, Some(&key()), &set(base, field, Value::Null))
                .await;
            refused(
                &format!("POST {path} with {field} null"),
                &r,
                StatusCode::BAD_REQUEST,
                &[field],
            );
        }
    }
    assert_eq!(counts(&s).await, before, "nothing stored");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn unknown_fields_and_wrong_types_are_named(pool: PgPool) {
    let s = Server::start(pool).await;
    let w = world(&s).await;
    let before = counts(&s).await;
    let endpoints: Vec<(String, Value)> = vec![
        ("/v1/users".into(), user_body()),
        (
            "/v1/bookings".into(),
            booking_body(&w.user, &unique_code(), false),
        ),
        (
            format!("/v1/bookings/{}/cancel", w.booking["id"].as_str().unwrap()),
            json!({ "reason": "changed plans" }),
        ),
        ("/v1/payments".into(), payment_body(&w.booking)),
        (
            format!("/v1/payments/{}/result", w.payment["id"].as_str().unwrap()),
            json!({ "status": "APPROVED", "approvalId": "PG-1" }),
        ),
        ("/v1/approvals".into(), approval_body(&w.booking, &w.user)),
        (
            format!(
                "/v1/approvals/{}/decision",
                w.approval["id"].as_str().unwrap()
            ),
            decision_body(&w.user),
        ),
    ];
    for (path, base) in &endpoints {
        let r = s
            .post(path, Some(&key()), &set(base, "foo", json!(1)))
            .await;
        refused(
            &format!("POST {path} with foo"),
            &r,
            StatusCode::BAD_REQUEST,
            &["foo"],
        );
        // snake_case is not the contract's spelling.
        let Some(first) = base
            .as_object()
            .unwrap()
            .keys()
            .find(|k| k.chars().any(|c| c.is_ascii_uppercase()))
            .cloned()
        else {
            continue;
        };
        let snake: String = first
            .chars()
            .flat_map(|c| {
                if c.is_ascii_uppercase() {
                    vec!['_', c.to_ascii_lowercase()]
                } else {
                    vec![c]
                }
            })
            .collect();
        let mut body = without(base, &first);
        body[&snake] = base[&first].clone();
        let r = s.post(path, Some(&key()), &body).await;
        refused(
            &format!("POST {path} with {snake}"),
            &r,
            StatusCode::BAD_REQUEST,
            &[&snake],
        );
    }

    let user = user_body();
    let c =
        |case: &str, field: &'static str, v: Value| (case.to_owned(), set(&user, field, v), field);
    let cases = vec![
        c("name as a number", "name", json!(5)),
        c("name as an object", "name", json!({ "first": "Kim" })),
        c("name as an array", "name", json!(["Kim"])),
        c("email as a bool", "email", json!(false)),
        c("phone as a number", "phone", json!(1_012_345_678)),
    ];
    expect_each(&s, "/v1/users", StatusCode::BAD_REQUEST, &cases).await;
    assert_eq!(counts(&s).await, before, "nothing stored");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_field_given_twice_is_named(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let before = counts(&s).await;

    let raw = br#"{"name":"a","name":"b","email":"dup@example.com","phone":"010-1234-5678"}"#;
    let r = s.post_raw("/v1/users", Some(&key()), raw.to_vec()).await;
    refused("users name twice", &r, StatusCode::BAD_REQUEST, &["name"]);

    let raw = br#"{"name":"a","email":"dup@example.com","phone":"010-1234-5678","phone":"010-1234-5678"}"#;
    let r = s.post_raw("/v1/users", Some(&key()), raw.to_vec()).await;
    refused(
        "users phone twice with the same value",
        &r,
        StatusCode::BAD_REQUEST,
        &["phone"],
    );

    let body = booking_body(&user, &unique_code(), false).to_string();
    let raw = body.replacen('{', r#"{"amount":"1","#, 1);
    let r = s
        .post_raw("/v1/bookings", Some(&key()), raw.into_bytes())
        .await;
    refused(
        "bookings amount twice",
        &r,
        StatusCode::BAD_REQUEST,
        &["amount"],
    );

    assert_eq!(counts(&s).await, before, "nothing stored");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn malformed_bodies_are_400(pool: PgPool) {
    let s = Server::start(pool).await;
    let before = counts(&s).await;
    let valid = user_body().to_string();
    let mut invalid_utf8 = br#"{"name":"Kim "#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    invalid_utf8.extend_from_slice(br#"","email":"kim@example.com","phone":"010-1234-5678"}"#);
    let mut lone_surrogate = br#"{"name":"Kim \ud800","#.to_vec();
    lone_surrogate.extend_from_slice(br#""email":"kim@example.com","phone":"010-1234-5678"}"#);

    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "truncated object",
            valid.as_bytes()[..valid.len() - 5].to_vec(),
            true,
        ),
        (
            "trailing garbage",
            format!("{valid} garbage").into_bytes(),
            true,
        ),
        ("two objects", format!("{valid}{valid}").into_bytes(), true),
        ("single quotes", br#"{'name':'Kim'}"#.to_vec(), true),
        ("trailing comma", br#"{"name":"Kim",}"#.to_vec(), true),
        ("a comment", format!("/* hi */{valid}").into_bytes(), true),
        ("invalid UTF-8 inside a string", invalid_utf8, false),
        ("a lone surrogate escape", lone_surrogate, false),
        ("a JSON array", format!("[{valid}]").into_bytes(), false),
        ("an empty JSON array", b"[]".to_vec(), false),
        ("a bare string", br#""hello""#.to_vec(), false),
        ("a number", b"42".to_vec(), false),
        ("null", b"null".to_vec(), false),
        ("an empty body", Vec::new(), true),
        ("only whitespace", b"  \n ".to_vec(), true),
        // serde accepts a sequence for a struct; the contract wants an object.
        (
            "a JSON array of the field values in order",
            br#"["Kim Minji","kim-array@example.com","010-1234-5678"]"#.to_vec(),
            false,
        ),
    ];
    for (case, bytes, syntax) in cases {
        let r = s.post_raw("/v1/users", Some(&key()), bytes).await;
        refused(case, &r, StatusCode::BAD_REQUEST, &[]);
        if syntax {
            let t = r.body["type"].as_str().unwrap_or_default();
            assert!(t.ends_with("invalid-json"), "{case}: type {t:?}");
        }
        assert_eq!(counts(&s).await, before, "{case}: something was stored");
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_body_over_64_kib_is_413(pool: PgPool) {
    let s = Server::start(pool).await;
    let before = counts(&s).await;

    let mut big = user_body();
    big["name"] = json!("a".repeat(70 * 1024));
    let r = s.post("/v1/users", Some(&key()), &big).await;
    refused("70 KiB body", &r, StatusCode::PAYLOAD_TOO_LARGE, &[]);

    // Without a Content-Length (chunked), the limit still holds.
    let r = post_chunked(&s, "/v1/users", big.to_string().as_bytes()).await;
    refused(
        "70 KiB chunked body",
        &r,
        StatusCode::PAYLOAD_TOO_LARGE,
        &[],
    );

    // Just under the limit the body is read and the long name refused.
    let mut near = user_body();
    near["name"] = json!("");
    let room = 64 * 1024 - near.to_string().len() - 1;
    near["name"] = json!("a".repeat(room));
    assert!(near.to_string().len() < 64 * 1024);
    let r = s.post("/v1/users", Some(&key()), &near).await;
    refused(
        "a body 1 byte under 64 KiB",
        &r,
        StatusCode::BAD_REQUEST,
        &["name"],
    );

    // Exactly at the limit is still accepted as to its size.
    near["name"] = json!("a".repeat(room + 1));
    assert_eq!(near.to_string().len(), 64 * 1024);
    let r = s.post("/v1/users", Some(&key()), &near).await;
    refused(
        "a body of exactly 64 KiB",
        &r,
        StatusCode::BAD_REQUEST,
        &["name"],
    );

    assert_eq!(counts(&s).await, before, "nothing stored");
}

/// POSTs `body` with `Transfer-Encoding: chunked` (no `Content-Length`)
/// over a plain TCP connection.
async fn post_chunked(s: &Server, path: &str, body: &[u8]) -> Resp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = s.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {}\r\nIdempotency-Key: {}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n",
        s.api_key,
        key()
    )
    .into_bytes();
    for chunk in body.chunks(8 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    // The server may answer and close before it has read everything.
    let _ = stream.write_all(&request).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let mut headers = reqwest::header::HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(
                reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
                HeaderValue::from_str(value.trim()).unwrap(),
            );
        }
    }
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    Resp {
        status: StatusCode::from_u16(status).unwrap(),
        headers,
        body,
    }
}

async fn into_resp(resp: reqwest::Response) -> Resp {
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Resp {
        status,
        headers,
        body,
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_body_that_is_not_json_is_415(pool: PgPool) {
    let s = Server::start(pool).await;
    let before = counts(&s).await;
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
        "multipart/form-data; boundary=x",
    ] {
        let resp = s
            .client
            .post(format!("{}/v1/users", s.base))
            .header("content-type", content_type)
            .header("idempotency-key", key())
            .body(user_body().to_string())
            .send()
            .await
            .unwrap();
        let r = into_resp(resp).await;
        refused(
            &format!("content type {content_type}"),
            &r,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &[],
        );
    }
    // A charset parameter and an upper-case type are fine.
    for content_type in ["application/json; charset=utf-8", "Application/JSON"] {
        let resp = s
            .client
            .post(format!("{}/v1/users", s.base))
            .header("content-type", content_type)
            .header("idempotency-key", key())
            .body(user_body().to_string())
            .send()
            .await
            .unwrap();
        let r = into_resp(resp).await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "content type {content_type}: {:?}",
            r.body
        );
    }
    assert_eq!(
        counts(&s).await[0].1,
        before[0].1 + 2,
        "only the two JSON users stored"
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn the_idempotency_key_is_required_and_checked(pool: PgPool) {
    let s = Server::start(pool).await;
    let before = counts(&s).await;

    let r = s.post("/v1/users", None, &user_body()).await;
    refused(
        "no Idempotency-Key",
        &r,
        StatusCode::BAD_REQUEST,
        &["Idempotency-Key"],
    );
    // The key is checked first: a request without one is refused before
    // its body is read, whatever the body (too large, not JSON).
    let mut big = user_body();
    big["name"] = json!("a".repeat(70 * 1024));
    let r = s.post("/v1/users", None, &big).await;
    refused(
        "no key, 70 KiB body",
        &r,
        StatusCode::BAD_REQUEST,
        &["Idempotency-Key"],
    );
    let resp = s
        .client
        .post(format!("{}/v1/users", s.base))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    let r = into_resp(resp).await;
    refused(
        "no key, text/plain body",
        &r,
        StatusCode::BAD_REQUEST,
        &["Idempotency-Key"],
    );

    let bad: Vec<(&str, String)> = vec![
        ("empty key", String::new()),
        ("15-character key", "k".repeat(15)),
        ("256-character key", "k".repeat(256)),
        ("key with a space", "0123456789 abcdef".into()),
        ("key with a tab", "0123456789\tabcdef".into()),
    ];
    for (case, k) in &bad {
        let r = s.post("/v1/users", Some(k), &user_body()).await;
        refused(case, &r, StatusCode::BAD_REQUEST, &["Idempotency-Key"]);
    }
    // Non-ASCII bytes in the header.
    let resp = s
        .client
        .post(format!("{}/v1/users", s.base))
        .header("content-type", "application/json")
        .header(
            "idempotency-key",
            HeaderValue::from_bytes("clé-0123456789abcdef".as_bytes()).unwrap(),
        )
        .body(user_body().to_string())
        .send()
        .await
        .unwrap();
    let r = into_resp(resp).await;
    refused(
        "non-ASCII key",
        &r,
        StatusCode::BAD_REQUEST,
        &["Idempotency-Key"],
    );
    // Every POST endpoint requires it.
    let id = uuid::Uuid::new_v4();
    for path in [
        "/v1/bookings".to_owned(),
        format!("/v1/bookings/{id}/cancel"),
        "/v1/payments".to_owned(),
        format!("/v1/payments/{id}/result"),
        "/v1/approvals".to_owned(),
        format!("/v1/approvals/{id}/decision"),
    ] {
        let r = s.post(&path, None, &json!({})).await;
        refused(
            &format!("POST {path} without a key"),
            &r,
            StatusCode::BAD_REQUEST,
            &["Idempotency-Key"],
        );
    }
    assert_eq!(counts(&s).await, before, "nothing stored");

    // The limits are accepted: 16 and 255 visible ASCII characters.
    let visible: String = (b'!'..=b'~').map(char::from).collect();
    let k16: String = visible.chars().take(16).collect();
    let k255: String = visible.chars().cycle().take(255).collect();
    for k in [&k16, &k255] {
        let r = s.post("/v1/users", Some(k), &user_body()).await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "key of {} characters: {:?}",
            k.len(),
            r.body
        );
    }
    assert_eq!(s.count("idempotency_keys").await, 2);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn routing_errors_and_unknown_ids_are_problems(pool: PgPool) {
    let s = Server::start(pool).await;
    let before = counts(&s).await;
    let id = uuid::Uuid::new_v4();

    for path in ["/v1/nope", "/v2/users", "/", "/v1/bookings/x/y/z"] {
        let r = s.get(path).await;
        refused(&format!("GET {path}"), &r, StatusCode::NOT_FOUND, &[]);
    }
    let r = s.post("/v1/nope", Some(&key()), &json!({})).await;
    refused("POST /v1/nope", &r, StatusCode::NOT_FOUND, &[]);

    let send = |method: reqwest::Method, path: String| {
        let req = s.client.request(method, format!("{}{path}", s.base));
        async move { into_resp(req.send().await.unwrap()).await }
    };
    for (method, path) in [
        (reqwest::Method::DELETE, "/v1/bookings".to_owned()),
        (reqwest::Method::GET, "/v1/bookings".to_owned()),
        (reqwest::Method::PUT, format!("/v1/users/{id}")),
        (reqwest::Method::DELETE, format!("/v1/bookings/{id}")),
        (reqwest::Method::POST, format!("/v1/payments/{id}")),
        (reqwest::Method::GET, format!("/v1/approvals/{id}/decision")),
    ] {
        let r = send(method.clone(), path.clone()).await;
        refused(
            &format!("{method} {path}"),
            &r,
            StatusCode::METHOD_NOT_ALLOWED,
            &[],
        );
    }

    for entity in ["users", "bookings", "payments", "approvals"] {
        let path = format!("/v1/{entity}/not-a-uuid");
        let r = s.get(&path).await;
        refused(&format!("GET {path}"), &r, StatusCode::BAD_REQUEST, &["id"]);
        let path = format!("/v1/{entity}/{id}");
        let r = s.get(&path).await;
        refused(&format!("GET {path}"), &r, StatusCode::NOT_FOUND, &[]);
    }

    let cancel = json!({ "reason": "changed plans" });
    let result = json!({ "status": "FAILED", "reason": "declined" });
    let decision = decision_body(&id.to_string());
    for (path, body) in [
        ("/v1/bookings/not-a-uuid/cancel", &cancel),
        ("/v1/payments/not-a-uuid/result", &result),
        ("/v1/approvals/not-a-uuid/decision", &decision),
    ] {
        let r = s.post(path, Some(&key()), body).await;
        refused(
            &format!("POST {path}"),
            &r,
            StatusCode::BAD_REQUEST,
            &["id"],
        );
    }
    for (path, body) in [
        (format!("/v1/bookings/{id}/cancel"), &cancel),
        (format!("/v1/payments/{id}/result"), &result),
        (format!("/v1/approvals/{id}/decision"), &decision),
    ] {
        let r = s.post(&path, Some(&key()), body).await;
        refused(&format!("POST {path}"), &r, StatusCode::NOT_FOUND, &[]);
    }
    assert_eq!(counts(&s).await, before, "nothing stored");

    // References to unknown entities are 404 too.
    let user = s.create_user().await;
    let booking = s.create_booking(&user, true).await;
    let before = counts(&s).await;
    let r = s
        .post(
            "/v1/bookings",
            Some(&key()),
            &booking_body(&id.to_string(), &unique_code(), false),
        )
        .await;
    refused(
        "booking for an unknown user",
        &r,
        StatusCode::NOT_FOUND,
        &[],
    );
    let mut pay = payment_body(&booking);
    pay["bookingId"] = json!(id);
    let r = s.post("/v1/payments", Some(&key()), &pay).await;
    refused(
        "payment for an unknown booking",
        &r,
        StatusCode::NOT_FOUND,
        &[],
    );
    let r = s
        .post(
            "/v1/approvals",
            Some(&key()),
            &approval_body(&booking, &id.to_string()),
        )
        .await;
    refused(
        "approval by an unknown requester",
        &r,
        StatusCode::NOT_FOUND,
        &[],
    );
    assert_eq!(counts(&s).await, before, "nothing stored");
}
