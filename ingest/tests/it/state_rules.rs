//! State rules of the HTTP API, over a real server and the test's own
//! database: the happy path of every endpoint with its exact response shape;
//! the audit row and the CloudEvents outbox row that every accepted POST
//! writes in its transaction (with the request's `traceparent`); every
//! refused state transition (404, 409, 422) leaving nothing behind; and
//! simultaneous results for one payment deciding it exactly once.

use std::collections::BTreeSet;

use crate::support::{Resp, Server, booking_body, key, payment_body, unique_code};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// A valid W3C trace context (the example of the recommendation).
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Row counts of every table a request may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    outbox: i64,
    audit: i64,
    keys: i64,
    users: i64,
    bookings: i64,
    payments: i64,
    approvals: i64,
    decisions: i64,
    settlements: i64,
}

async fn snapshot(s: &Server) -> Snapshot {
    let row: (i64, i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox),
                (SELECT count(*) FROM audit_log),
                (SELECT count(*) FROM idempotency_keys),
                (SELECT count(*) FROM users),
                (SELECT count(*) FROM bookings),
                (SELECT count(*) FROM payments),
                (SELECT count(*) FROM approvals),
                (SELECT count(*) FROM approval_decisions),
                (SELECT count(*) FROM settlements)",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    Snapshot {
        outbox: row.0,
        audit: row.1,
        keys: row.2,
        users: row.3,
        bookings: row.4,
        payments: row.5,
        approvals: row.6,
        decisions: row.7,
        settlements: row.8,
    }
}

/// What an accepted POST must have recorded.
struct Effect<'a> {
    topic: &'a str,
    entity_type: &'a str,
    action: &'a str,
    actor: String,
}

impl<'a> Effect<'a> {
    fn new(
        topic: &'a str,
        entity_type: &'a str,
        action: &'a str,
        actor: impl Into<String>,
    ) -> Self {
        Self {
            topic,
            entity_type,
            action,
            actor: actor.into(),
        }
    }
}

/// The keys of a JSON object.
fn keys_of(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// A UTC RFC 3339 time as the API renders it.
fn assert_utc_time(v: &Value, what: &str) {
    let text = v
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    assert!(text.ends_with('Z'), "{what} is not in UTC: {text}");
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{what} is not RFC 3339 ({e}): {text}"));
}

fn assert_uuid(v: &Value, what: &str) -> Uuid {
    let text = v
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    Uuid::parse_str(text).unwrap_or_else(|e| panic!("{what} is not a UUID ({e}): {text}"))
}

/// Checks that the POST answered by `r` under `key` wrote exactly one audit
/// row, one outbox row (a CloudEvents 1.0 envelope of the response body) and
/// one idempotency key, and nothing else to those tables. Returns the outbox
/// row's headers.
async fn assert_recorded(
    s: &Server,
    key: &str,
    r: &Resp,
    before: Snapshot,
    effect: &Effect<'_>,
) -> Value {
    let after = snapshot(s).await;
    assert_eq!(after.outbox, before.outbox + 1, "one outbox row per change");
    assert_eq!(after.audit, before.audit + 1, "one audit row per change");
    assert_eq!(after.keys, before.keys + 1, "the idempotency key is stored");
    let id = assert_uuid(&r.body["id"], "id");

    let audit: Vec<(String, String, String, Uuid, Option<Uuid>)> = sqlx::query_as(
        "SELECT actor, action, entity_type, entity_id, event_id
           FROM audit_log WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_all(&s.pool)
    .await
    .unwrap();
    assert_eq!(audit.len(), 1, "exactly one audit row under key {key}");
    let (actor, action, entity_type, entity_id, event_id) = audit.into_iter().next().unwrap();
    assert_eq!(actor, effect.actor, "audit actor");
    assert_eq!(action, effect.action, "audit action");
    assert_eq!(entity_type, effect.entity_type, "audit entity_type");
    assert_eq!(entity_id, id, "audit entity_id");

    // The request wrote exactly one outbox row: the newest one.
    let (outbox_id, topic, aggregate_type, aggregate_id, payload, headers): (
        Uuid,
        String,
        String,
        Uuid,
        Value,
        Value,
    ) = sqlx::query_as(
        "SELECT id, topic, aggregate_type, aggregate_id, payload, headers
           FROM outbox ORDER BY seq DESC LIMIT 1",
    )
    .fetch_one(&s.pool)
    .await
    .unwrap();
    if let Some(event_id) = event_id {
        assert_eq!(
            event_id, outbox_id,
            "the audit row names the event it caused"
        );
    }
    assert_eq!(topic, effect.topic, "outbox topic");
    assert_eq!(aggregate_type, effect.entity_type, "outbox aggregate_type");
    assert_eq!(aggregate_id, id, "outbox aggregate_id");

    assert_eq!(payload["specversion"], "1.0", "{payload}");
    assert_eq!(payload["id"], json!(outbox_id.to_string()), "{payload}");
    assert_eq!(payload["source"], "/entrip/ingest", "{payload}");
    assert_eq!(payload["type"], effect.topic, "{payload}");
    assert_eq!(payload["subject"], json!(id.to_string()), "{payload}");
    assert_utc_time(&payload["time"], "event time");
    assert!(
        payload["datacontenttype"]
            .as_str()
            .is_some_and(|t| t.starts_with("application/json")),
        "{payload}"
    );
    assert_eq!(
        payload["data"], r.body,
        "the event's data is the entity as answered"
    );
    headers
}

/// POSTs `body` under a fresh key, expects `status`, and checks what the
/// request recorded.
async fn post_ok(
    s: &Server,
    path: &str,
    body: &Value,
    status: StatusCode,
    effect: Effect<'_>,
) -> Resp {
    let k = key();
    let before = snapshot(s).await;
    let r = s.post(path, Some(&k), body).await;
    assert_eq!(r.status, status, "POST {path}: {:?}", r.body);
    assert!(r.headers.get("idempotent-replayed").is_none());
    assert!(
        r.headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("application/json")),
        "{:?}",
        r.headers
    );
    assert_recorded(s, &k, &r, before, &effect).await;
    r
}

/// POSTs `body` under a fresh key and expects a refusal: a problem+json
/// answer with `status`, a detail containing every word of `words`
/// (case-insensitive), `field` named in `errors` when given, and no row
/// written anywhere.
async fn refused(
    s: &Server,
    path: &str,
    body: &Value,
    status: StatusCode,
    words: &[&str],
    field: Option<&str>,
) -> Resp {
    let before = snapshot(s).await;
    let r = s.post(path, Some(&key()), body).await;
    assert_eq!(r.status, status, "POST {path} {body}: {:?}", r.body);
    assert!(
        r.is_problem(),
        "not problem+json: {:?} {:?}",
        r.headers,
        r.body
    );
    let detail = r.body["detail"].as_str().unwrap().to_lowercase();
    assert!(!detail.trim().is_empty(), "empty detail");
    for w in words {
        assert!(
            detail.contains(&w.to_lowercase()),
            "detail {detail:?} should mention {w:?}"
        );
    }
    if let Some(field) = field {
        assert!(
            r.error_fields().iter().any(|f| f == field),
            "errors should name {field}: {:?}",
            r.body
        );
    }
    assert_eq!(
        snapshot(s).await,
        before,
        "a refused request stores nothing"
    );
    r
}

/// POST with extra headers (a fresh key is added).
async fn post_with_headers(s: &Server, path: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
    let mut req = s
        .client
        .post(format!("{}{}", s.base, path))
        .header("content-type", "application/json")
        .header("idempotency-key", key())
        .body(body.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    Resp {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn user_body() -> Value {
    json!({
        "name": "Park Jisoo",
        "email": format!("park-{}@example.com", Uuid::new_v4().simple()),
        "phone": "010-9876-5432",
    })
}

fn result_approved(approval_id: &str) -> Value {
    json!({ "status": "APPROVED", "approvalId": approval_id })
}

fn result_failed(reason: &str) -> Value {
    json!({ "status": "FAILED", "reason": reason })
}

fn approval_body(booking: &Value, requester: &str, steps: Option<i64>) -> Value {
    let mut body = json!({
        "bookingId": booking["id"],
        "requesterId": requester,
        "title": "Year-end trip to Tokyo",
        "reason": "Client meeting in Tokyo",
    });
    if let Some(n) = steps {
        body["steps"] = json!(n);
    }
    body
}

fn decision_body(approver: &str, decision: &str) -> Value {
    json!({ "approverId": approver, "decision": decision, "reason": format!("{decision} by {approver}") })
}

fn result_path(payment: &Value) -> String {
    format!("/v1/payments/{}/result", payment["id"].as_str().unwrap())
}

fn decision_path(approval: &Value) -> String {
    format!(
        "/v1/approvals/{}/decision",
        approval["id"].as_str().unwrap()
    )
}

fn cancel_path(booking: &Value) -> String {
    format!("/v1/bookings/{}/cancel", booking["id"].as_str().unwrap())
}

/// Records a payment result and expects 200.
async fn decide_payment(s: &Server, payment: &Value, body: &Value) -> Value {
    let r = s.post(&result_path(payment), Some(&key()), body).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body
}

/// Creates an approval and expects 201.
async fn create_approval(
    s: &Server,
    booking: &Value,
    requester: &str,
    steps: Option<i64>,
) -> Value {
    let r = s
        .post(
            "/v1/approvals",
            Some(&key()),
            &approval_body(booking, requester, steps),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    r.body
}

/// Decides the current step and expects 200.
async fn decide(s: &Server, approval: &Value, approver: &str, decision: &str) -> Value {
    let r = s
        .post(
            &decision_path(approval),
            Some(&key()),
            &decision_body(approver, decision),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body
}

async fn cancel(s: &Server, booking: &Value) -> Value {
    let r = s
        .post(
            &cancel_path(booking),
            Some(&key()),
            &json!({ "reason": "plans changed" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.body
}

async fn get_ok(s: &Server, path: &str) -> Value {
    let r = s.get(path).await;
    assert_eq!(r.status, StatusCode::OK, "GET {path}: {:?}", r.body);
    r.body
}

const BOOKING_FIELDS: &[&str] = &[
    "id",
    "code",
    "userId",
    "customerName",
    "customerPhone",
    "itineraryFrom",
    "itineraryTo",
    "departAt",
    "arriveAt",
    "currency",
    "amount",
    "requiresApproval",
    "status",
    "cancelReason",
    "canceledAt",
    "confirmedAt",
    "createdAt",
    "updatedAt",
];

const PAYMENT_FIELDS: &[&str] = &[
    "id",
    "bookingId",
    "method",
    "amount",
    "tax",
    "currency",
    "status",
    "approvalId",
    "reason",
    "decidedAt",
    "createdAt",
    "updatedAt",
];

const APPROVAL_FIELDS: &[&str] = &[
    "id",
    "bookingId",
    "requesterId",
    "title",
    "reason",
    "steps",
    "currentStep",
    "status",
    "decisions",
    "decidedAt",
    "createdAt",
    "updatedAt",
];

// ---------------------------------------------------------------------------
// Happy paths, response shapes, audit and outbox
// ---------------------------------------------------------------------------

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn creating_a_user_answers_201_with_its_fields_and_records_it(pool: PgPool) {
    let s = Server::start(pool).await;
    let body = user_body();
    let r = post_ok(
        &s,
        "/v1/users",
        &body,
        StatusCode::CREATED,
        Effect::new("user.created", "user", "user.create", "client:test-all"),
    )
    .await;
    assert_eq!(
        keys_of(&r.body),
        set(&["id", "name", "email", "phone", "createdAt", "updatedAt"])
    );
    assert_uuid(&r.body["id"], "id");
    assert_eq!(r.body["name"], body["name"]);
    assert_eq!(r.body["email"], body["email"]);
    assert_eq!(r.body["phone"], body["phone"]);
    assert_utc_time(&r.body["createdAt"], "createdAt");
    assert_utc_time(&r.body["updatedAt"], "updatedAt");

    let got = get_ok(&s, &format!("/v1/users/{}", r.id())).await;
    assert_eq!(got, r.body);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_booking_is_pending_with_krw_money_utc_times_and_defaults(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let code = unique_code();
    let mut body = booking_body(&user, &code, false);
    let obj = body.as_object_mut().unwrap();
    obj.remove("currency");
    obj.remove("requiresApproval");

    let r = post_ok(
        &s,
        "/v1/bookings",
        &body,
        StatusCode::CREATED,
        Effect::new(
            "booking.created",
            "booking",
            "booking.create",
            "client:test-all",
        ),
    )
    .await;
    let b = &r.body;
    assert_eq!(keys_of(b), set(BOOKING_FIELDS));
    assert_uuid(&b["id"], "id");
    assert_eq!(b["code"], json!(code));
    assert_eq!(b["userId"], json!(user));
    assert_eq!(b["customerName"], "Kim Minji");
    assert_eq!(b["customerPhone"], "+82 10 1234 5678");
    assert_eq!(b["itineraryFrom"], "ICN");
    assert_eq!(b["itineraryTo"], "NRT");
    assert_eq!(b["departAt"], "2026-12-24T00:30:00Z", "rendered in UTC");
    assert_eq!(b["arriveAt"], "2026-12-24T02:45:00Z", "rendered in UTC");
    assert_eq!(b["currency"], "KRW", "currency defaults to KRW");
    assert_eq!(b["amount"], "350000", "KRW has no minor unit");
    assert_eq!(
        b["requiresApproval"], false,
        "requiresApproval defaults to false"
    );
    assert_eq!(b["status"], "PENDING");
    assert_eq!(b["cancelReason"], Value::Null);
    assert_eq!(b["canceledAt"], Value::Null);
    assert_eq!(b["confirmedAt"], Value::Null);
    assert_utc_time(&b["createdAt"], "createdAt");
    assert_utc_time(&b["updatedAt"], "updatedAt");

    // GET: the same booking plus its (absent) payment, approval, settlement.
    let got = get_ok(&s, &format!("/v1/bookings/{}", r.id())).await;
    let mut expected = b.clone();
    expected["payment"] = Value::Null;
    expected["approval"] = Value::Null;
    expected["settlement"] = Value::Null;
    assert_eq!(got, expected);

    // "120000.00" KRW is 120000.
    let mut body = booking_body(&user, &unique_code(), false);
    body["amount"] = json!("120000.00");
    let r = s.post("/v1/bookings", Some(&key()), &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["amount"], "120000");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_usd_booking_and_its_payment_render_two_decimals(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let mut body = booking_body(&user, &unique_code(), true);
    body["currency"] = json!("USD");
    body["amount"] = json!("129.9");
    let booking = post_ok(
        &s,
        "/v1/bookings",
        &body,
        StatusCode::CREATED,
        Effect::new(
            "booking.created",
            "booking",
            "booking.create",
            "client:test-all",
        ),
    )
    .await
    .body;
    assert_eq!(booking["currency"], "USD");
    assert_eq!(booking["amount"], "129.90");
    assert_eq!(booking["requiresApproval"], true);

    let payment = post_ok(
        &s,
        "/v1/payments",
        &json!({
            "bookingId": booking["id"],
            "method": "CARD",
            "amount": "129.90",
            "currency": "USD",
            "tax": "11.8",
        }),
        StatusCode::CREATED,
        Effect::new(
            "payment.requested",
            "payment",
            "payment.create",
            "client:test-all",
        ),
    )
    .await
    .body;
    assert_eq!(payment["amount"], "129.90");
    assert_eq!(payment["tax"], "11.80");
    assert_eq!(payment["currency"], "USD");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_payment_is_created_pending_and_approved_with_an_approval_id(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;

    let created = post_ok(
        &s,
        "/v1/payments",
        &payment_body(&booking),
        StatusCode::CREATED,
        Effect::new(
            "payment.requested",
            "payment",
            "payment.create",
            "client:test-all",
        ),
    )
    .await
    .body;
    assert_eq!(keys_of(&created), set(PAYMENT_FIELDS));
    assert_uuid(&created["id"], "id");
    assert_eq!(created["bookingId"], booking["id"]);
    assert_eq!(created["method"], "CARD");
    assert_eq!(created["amount"], "350000");
    assert_eq!(created["tax"], "31818");
    assert_eq!(created["currency"], "KRW");
    assert_eq!(created["status"], "PENDING");
    assert_eq!(created["approvalId"], Value::Null);
    assert_eq!(created["reason"], Value::Null);
    assert_eq!(created["decidedAt"], Value::Null);
    assert_utc_time(&created["createdAt"], "createdAt");
    assert_eq!(
        get_ok(
            &s,
            &format!("/v1/payments/{}", created["id"].as_str().unwrap())
        )
        .await,
        created
    );

    let approved = post_ok(
        &s,
        &result_path(&created),
        &result_approved("PG-APPROVAL-0001"),
        StatusCode::OK,
        Effect::new(
            "payment.approved",
            "payment",
            "payment.result",
            "client:test-all",
        ),
    )
    .await
    .body;
    assert_eq!(keys_of(&approved), set(PAYMENT_FIELDS));
    assert_eq!(approved["id"], created["id"]);
    assert_eq!(approved["status"], "APPROVED");
    assert_eq!(approved["approvalId"], "PG-APPROVAL-0001");
    assert_eq!(approved["amount"], "350000");
    assert_utc_time(&approved["decidedAt"], "decidedAt");

    let got = get_ok(
        &s,
        &format!("/v1/payments/{}", created["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(got, approved);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_failed_payment_result_keeps_its_reason(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;
    let payment = s.create_payment(&booking).await;

    let failed = post_ok(
        &s,
        &result_path(&payment),
        &result_failed("card declined"),
        StatusCode::OK,
        Effect::new(
            "payment.failed",
            "payment",
            "payment.result",
            "client:test-all",
        ),
    )
    .await
    .body;
    assert_eq!(keys_of(&failed), set(PAYMENT_FIELDS));
    assert_eq!(failed["id"], payment["id"]);
    assert_eq!(failed["status"], "FAILED");
    assert_eq!(failed["reason"], "card declined");
    assert_eq!(failed["approvalId"], Value::Null);
    assert_utc_time(&failed["decidedAt"], "decidedAt");

    // The booking shows the failed payment as its current one.
    let got = get_ok(
        &s,
        &format!("/v1/bookings/{}", booking["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(got["payment"], failed);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_approval_starts_pending_at_step_one_and_a_rejection_ends_it(pool: PgPool) {
    let s = Server::start(pool).await;
    let requester = s.create_user().await;
    let approver = s.create_user().await;
    let booking = s.create_booking(&requester, true).await;

    let created = post_ok(
        &s,
        "/v1/approvals",
        &approval_body(&booking, &requester, None),
        StatusCode::CREATED,
        Effect::new(
            "approval.requested",
            "approval",
            "approval.create",
            format!("user:{requester}"),
        ),
    )
    .await
    .body;
    assert_eq!(keys_of(&created), set(APPROVAL_FIELDS));
    assert_uuid(&created["id"], "id");
    assert_eq!(created["bookingId"], booking["id"]);
    assert_eq!(created["requesterId"], json!(requester));
    assert_eq!(created["title"], "Year-end trip to Tokyo");
    assert_eq!(created["reason"], "Client meeting in Tokyo");
    assert_eq!(created["steps"], 1, "steps default to 1");
    assert_eq!(created["currentStep"], 1);
    assert_eq!(created["status"], "PENDING");
    assert_eq!(created["decisions"], json!([]));
    assert_eq!(created["decidedAt"], Value::Null);
    assert_utc_time(&created["createdAt"], "createdAt");
    let approval_path = format!("/v1/approvals/{}", created["id"].as_str().unwrap());
    assert_eq!(get_ok(&s, &approval_path).await, created);

    let rejected = post_ok(
        &s,
        &decision_path(&created),
        &json!({ "approverId": approver, "decision": "REJECTED", "reason": "over budget" }),
        StatusCode::OK,
        Effect::new(
            "approval.decided",
            "approval",
            "approval.decide",
            format!("user:{approver}"),
        ),
    )
    .await
    .body;
    assert_eq!(keys_of(&rejected), set(APPROVAL_FIELDS));
    assert_eq!(rejected["id"], created["id"]);
    assert_eq!(rejected["status"], "REJECTED");
    assert_eq!(rejected["currentStep"], 1);
    assert_utc_time(&rejected["decidedAt"], "decidedAt");
    let decisions = rejected["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0]["step"], 1);
    assert_eq!(decisions[0]["approverId"], json!(approver));
    assert_eq!(decisions[0]["decision"], "REJECTED");
    assert_eq!(decisions[0]["reason"], "over budget");
    assert_utc_time(&decisions[0]["decidedAt"], "decision decidedAt");
    assert_eq!(get_ok(&s, &approval_path).await, rejected);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_one_step_approval_is_approved_by_one_decision(pool: PgPool) {
    let s = Server::start(pool).await;
    let requester = s.create_user().await;
    let approver = s.create_user().await;
    let booking = s.create_booking(&requester, true).await;
    let approval = create_approval(&s, &booking, &requester, Some(1)).await;
    let approved = post_ok(
        &s,
        &decision_path(&approval),
        &decision_body(&approver, "APPROVED"),
        StatusCode::OK,
        Effect::new(
            "approval.decided",
            "approval",
            "approval.decide",
            format!("user:{approver}"),
        ),
    )
    .await
    .body;
    assert_eq!(approved["status"], "APPROVED");
    assert_eq!(approved["currentStep"], 1);
    assert_utc_time(&approved["decidedAt"], "decidedAt");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_three_step_approval_needs_three_approvers_in_turn(pool: PgPool) {
    let s = Server::start(pool).await;
    let requester = s.create_user().await;
    let (a, b, c) = (
        s.create_user().await,
        s.create_user().await,
        s.create_user().await,
    );
    let booking = s.create_booking(&requester, true).await;
    let approval = create_approval(&s, &booking, &requester, Some(3)).await;
    assert_eq!(approval["steps"], 3);
    assert_eq!(approval["currentStep"], 1);

    let mut last = Value::Null;
    for (i, approver) in [&a, &b, &c].into_iter().enumerate() {
        last = post_ok(
            &s,
            &decision_path(&approval),
            &decision_body(approver, "APPROVED"),
            StatusCode::OK,
            Effect::new(
                "approval.decided",
                "approval",
                "approval.decide",
                format!("user:{approver}"),
            ),
        )
        .await
        .body;
        let decisions = last["decisions"].as_array().unwrap();
        assert_eq!(decisions.len(), i + 1, "{last}");
        assert_eq!(decisions[i]["step"], json!(i + 1));
        assert_eq!(decisions[i]["approverId"], json!(approver));
        assert_eq!(decisions[i]["decision"], "APPROVED");
        if i < 2 {
            assert_eq!(last["status"], "PENDING", "after approver {i}: {last}");
            assert_eq!(
                last["currentStep"],
                json!(i + 2),
                "after approver {i}: {last}"
            );
            assert_eq!(last["decidedAt"], Value::Null);
        }
    }
    assert_eq!(last["status"], "APPROVED", "{last}");
    assert_eq!(last["currentStep"], 3);
    assert_utc_time(&last["decidedAt"], "decidedAt");
    assert_eq!(
        get_ok(
            &s,
            &format!("/v1/approvals/{}", approval["id"].as_str().unwrap())
        )
        .await,
        last
    );
    assert_eq!(
        s.count(&format!(
            "outbox WHERE topic = 'approval.decided' AND aggregate_id = '{}'",
            approval["id"].as_str().unwrap()
        ))
        .await,
        3
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn canceling_a_booking_answers_it_canceled_with_the_reason(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;
    let canceled = post_ok(
        &s,
        &cancel_path(&booking),
        &json!({ "reason": "customer asked to cancel" }),
        StatusCode::OK,
        Effect::new(
            "booking.canceled",
            "booking",
            "booking.cancel",
            "client:test-all",
        ),
    )
    .await
    .body;
    assert_eq!(keys_of(&canceled), set(BOOKING_FIELDS));
    assert_eq!(canceled["id"], booking["id"]);
    assert_eq!(canceled["code"], booking["code"]);
    assert_eq!(canceled["amount"], "350000");
    assert_eq!(canceled["status"], "CANCELED");
    assert_eq!(canceled["cancelReason"], "customer asked to cancel");
    assert_utc_time(&canceled["canceledAt"], "canceledAt");
    assert_eq!(canceled["confirmedAt"], Value::Null);

    let got = get_ok(
        &s,
        &format!("/v1/bookings/{}", booking["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(got["status"], "CANCELED");
    assert_eq!(got["cancelReason"], "customer asked to cancel");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn get_booking_shows_its_payment_approval_and_settlement(pool: PgPool) {
    let s = Server::start(pool).await;
    let requester = s.create_user().await;
    let approver = s.create_user().await;
    let booking = s.create_booking(&requester, true).await;
    let booking_path = format!("/v1/bookings/{}", booking["id"].as_str().unwrap());

    let payment = s.create_payment(&booking).await;
    let approval = create_approval(&s, &booking, &requester, None).await;
    let got = get_ok(&s, &booking_path).await;
    assert_eq!(got["payment"], payment);
    assert_eq!(got["approval"], approval);
    assert_eq!(got["settlement"], Value::Null);

    let payment = decide_payment(&s, &payment, &result_approved("PG-1")).await;
    let approval = decide(&s, &approval, &approver, "APPROVED").await;

    // The settlement worker writes settlements; stand in for it.
    let settlement_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO settlements (id, booking_id, payment_id, approval_id, gross, tax, net, currency)
         VALUES ($1, $2, $3, $4, 350000, 31818, 318182, 'KRW')",
    )
    .bind(settlement_id)
    .bind(Uuid::parse_str(booking["id"].as_str().unwrap()).unwrap())
    .bind(Uuid::parse_str(payment["id"].as_str().unwrap()).unwrap())
    .bind(Uuid::parse_str(approval["id"].as_str().unwrap()).unwrap())
    .execute(&s.pool)
    .await
    .unwrap();

    let got = get_ok(&s, &booking_path).await;
    assert_eq!(keys_of(&got), {
        let mut k = set(BOOKING_FIELDS);
        k.extend(set(&["payment", "approval", "settlement"]));
        k
    });
    assert_eq!(got["id"], booking["id"]);
    assert_eq!(got["payment"], payment);
    assert_eq!(
        got["payment"],
        get_ok(
            &s,
            &format!("/v1/payments/{}", payment["id"].as_str().unwrap())
        )
        .await
    );
    assert_eq!(got["approval"], approval);
    assert_eq!(got["approval"]["status"], "APPROVED");
    let st = &got["settlement"];
    assert_eq!(st["id"], json!(settlement_id.to_string()));
    assert_eq!(st["bookingId"], booking["id"]);
    assert_eq!(st["paymentId"], payment["id"]);
    assert_eq!(st["approvalId"], approval["id"]);
    assert_eq!(st["gross"], "350000");
    assert_eq!(st["tax"], "31818");
    assert_eq!(st["net"], "318182");
    assert_eq!(st["currency"], "KRW");
    assert_utc_time(&st["settledAt"], "settledAt");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn gets_of_unknown_ids_are_404(pool: PgPool) {
    let s = Server::start(pool).await;
    for entity in ["users", "bookings", "payments", "approvals"] {
        let r = s.get(&format!("/v1/{entity}/{}", Uuid::new_v4())).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{entity}: {:?}", r.body);
        assert!(r.is_problem(), "{:?}", r.body);
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_valid_traceparent_is_stored_with_the_event_and_an_invalid_one_is_ignored(pool: PgPool) {
    let s = Server::start(pool).await;
    let newest_traceparent = |pool: PgPool| async move {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT headers->>'traceparent' FROM outbox ORDER BY seq DESC LIMIT 1",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };

    let r = post_with_headers(
        &s,
        "/v1/users",
        &user_body(),
        &[("traceparent", TRACEPARENT)],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(
        newest_traceparent(s.pool.clone()).await.as_deref(),
        Some(TRACEPARENT)
    );

    let user = r.id();
    let booking = booking_body(&user, &unique_code(), false);
    let r = post_with_headers(
        &s,
        "/v1/bookings",
        &booking,
        &[("traceparent", TRACEPARENT)],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(
        newest_traceparent(s.pool.clone()).await.as_deref(),
        Some(TRACEPARENT)
    );

    // Without the header: none stored.
    let r = post_with_headers(&s, "/v1/users", &user_body(), &[]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(newest_traceparent(s.pool.clone()).await, None);

    for invalid in [
        "garbage",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    ] {
        let r = post_with_headers(&s, "/v1/users", &user_body(), &[("traceparent", invalid)]).await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "an invalid traceparent {invalid:?} must not refuse the request: {:?}",
            r.body
        );
        assert_eq!(
            newest_traceparent(s.pool.clone()).await,
            None,
            "invalid traceparent {invalid:?} must be ignored"
        );
    }
}

// ---------------------------------------------------------------------------
// Payment rules
// ---------------------------------------------------------------------------

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_result_for_an_unknown_payment_is_404(pool: PgPool) {
    let s = Server::start(pool).await;
    let missing = Uuid::new_v4();
    refused(
        &s,
        &format!("/v1/payments/{missing}/result"),
        &result_approved("PG-1"),
        StatusCode::NOT_FOUND,
        &["payment", &missing.to_string(), "not found"],
        None,
    )
    .await;
    refused(
        &s,
        &format!("/v1/payments/{missing}/result"),
        &result_failed("declined"),
        StatusCode::NOT_FOUND,
        &["payment", "not found"],
        None,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_decided_payment_takes_no_second_result(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;

    // APPROVED, then FAILED.
    let booking = s.create_booking(&user, false).await;
    let payment = s.create_payment(&booking).await;
    let approved = decide_payment(&s, &payment, &result_approved("PG-A")).await;
    refused(
        &s,
        &result_path(&payment),
        &result_failed("too late"),
        StatusCode::CONFLICT,
        &["already APPROVED"],
        None,
    )
    .await;
    // APPROVED again under a new key.
    refused(
        &s,
        &result_path(&payment),
        &result_approved("PG-B"),
        StatusCode::CONFLICT,
        &["already APPROVED"],
        None,
    )
    .await;
    refused(
        &s,
        &result_path(&payment),
        &result_approved("PG-A"),
        StatusCode::CONFLICT,
        &["already APPROVED"],
        None,
    )
    .await;
    let got = get_ok(
        &s,
        &format!("/v1/payments/{}", payment["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(got, approved, "the payment is unchanged");

    // FAILED, then APPROVED.
    let booking = s.create_booking(&user, false).await;
    let payment = s.create_payment(&booking).await;
    let failed = decide_payment(&s, &payment, &result_failed("declined")).await;
    refused(
        &s,
        &result_path(&payment),
        &result_approved("PG-C"),
        StatusCode::CONFLICT,
        &["already FAILED"],
        None,
    )
    .await;
    refused(
        &s,
        &result_path(&payment),
        &result_failed("declined again"),
        StatusCode::CONFLICT,
        &["already FAILED"],
        None,
    )
    .await;
    let got = get_ok(
        &s,
        &format!("/v1/payments/{}", payment["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(got, failed, "the payment is unchanged");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_payment_for_a_canceled_or_unknown_booking_is_refused(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;
    cancel(&s, &booking).await;
    refused(
        &s,
        "/v1/payments",
        &payment_body(&booking),
        StatusCode::CONFLICT,
        &["CANCELED"],
        None,
    )
    .await;

    let mut unknown = payment_body(&booking);
    let missing = Uuid::new_v4();
    unknown["bookingId"] = json!(missing);
    refused(
        &s,
        "/v1/payments",
        &unknown,
        StatusCode::NOT_FOUND,
        &["booking", &missing.to_string(), "not found"],
        None,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_second_payment_while_one_is_pending_or_approved_is_409(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;
    let payment = s.create_payment(&booking).await;
    let payment_id = payment["id"].as_str().unwrap();

    refused(
        &s,
        "/v1/payments",
        &payment_body(&booking),
        StatusCode::CONFLICT,
        &["PENDING", payment_id],
        None,
    )
    .await;

    decide_payment(&s, &payment, &result_approved("PG-1")).await;
    refused(
        &s,
        "/v1/payments",
        &payment_body(&booking),
        StatusCode::CONFLICT,
        &["APPROVED", payment_id],
        None,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_new_payment_after_a_failed_one_is_accepted_and_becomes_current(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;
    let booking_path = format!("/v1/bookings/{}", booking["id"].as_str().unwrap());
    let first = s.create_payment(&booking).await;
    decide_payment(&s, &first, &result_failed("declined")).await;

    let second = post_ok(
        &s,
        "/v1/payments",
        &payment_body(&booking),
        StatusCode::CREATED,
        Effect::new(
            "payment.requested",
            "payment",
            "payment.create",
            "client:test-all",
        ),
    )
    .await
    .body;
    assert_ne!(second["id"], first["id"]);
    assert_eq!(second["status"], "PENDING");
    let got = get_ok(&s, &booking_path).await;
    assert_eq!(
        got["payment"], second,
        "the live payment, not the failed one"
    );

    let second = decide_payment(&s, &second, &result_approved("PG-2")).await;
    let got = get_ok(&s, &booking_path).await;
    assert_eq!(got["payment"], second);
    assert_eq!(s.count("payments").await, 2);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_payment_whose_amount_or_currency_differs_from_the_booking_is_422(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;

    let mut body = payment_body(&booking);
    body["amount"] = json!("350001");
    let r = refused(
        &s,
        "/v1/payments",
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        &["amount", "350001", "350000"],
        Some("amount"),
    )
    .await;
    assert!(!r.error_fields().iter().any(|f| f == "currency"));

    let mut body = payment_body(&booking);
    body["amount"] = json!("300000");
    refused(
        &s,
        "/v1/payments",
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        &["amount"],
        Some("amount"),
    )
    .await;

    for currency in ["USD", "JPY"] {
        let mut body = payment_body(&booking);
        body["currency"] = json!(currency);
        let r = refused(
            &s,
            "/v1/payments",
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            &["currency", currency, "KRW"],
            Some("currency"),
        )
        .await;
        assert!(!r.error_fields().iter().any(|f| f == "amount"));
    }

    // The same amount written with decimals is the same amount.
    let mut body = payment_body(&booking);
    body["amount"] = json!("350000.00");
    let r = s.post("/v1/payments", Some(&key()), &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["amount"], "350000");
}

// ---------------------------------------------------------------------------
// Booking rules
// ---------------------------------------------------------------------------

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn canceling_a_canceled_or_unknown_booking_is_refused(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;
    let canceled = cancel(&s, &booking).await;

    refused(
        &s,
        &cancel_path(&booking),
        &json!({ "reason": "again" }),
        StatusCode::CONFLICT,
        &["already canceled"],
        None,
    )
    .await;
    let got = get_ok(
        &s,
        &format!("/v1/bookings/{}", booking["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(
        got["cancelReason"], canceled["cancelReason"],
        "first reason kept"
    );
    assert_eq!(got["canceledAt"], canceled["canceledAt"]);

    let missing = Uuid::new_v4();
    refused(
        &s,
        &format!("/v1/bookings/{missing}/cancel"),
        &json!({ "reason": "no such booking" }),
        StatusCode::NOT_FOUND,
        &["booking", &missing.to_string(), "not found"],
        None,
    )
    .await;
}

// ---------------------------------------------------------------------------
// Approval rules
// ---------------------------------------------------------------------------

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_approval_for_a_booking_that_needs_none_is_409(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;
    refused(
        &s,
        "/v1/approvals",
        &approval_body(&booking, &user, None),
        StatusCode::CONFLICT,
        &["requiresApproval"],
        None,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_approval_for_an_unknown_booking_or_requester_is_404(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, true).await;

    let missing = Uuid::new_v4();
    let mut body = approval_body(&booking, &user, None);
    body["bookingId"] = json!(missing);
    refused(
        &s,
        "/v1/approvals",
        &body,
        StatusCode::NOT_FOUND,
        &["booking", &missing.to_string(), "not found"],
        None,
    )
    .await;

    let missing = Uuid::new_v4();
    refused(
        &s,
        "/v1/approvals",
        &approval_body(&booking, &missing.to_string(), None),
        StatusCode::NOT_FOUND,
        &["user", &missing.to_string(), "not found"],
        None,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_second_live_approval_is_409_and_a_rejected_one_may_be_requested_again(pool: PgPool) {
    let s = Server::start(pool).await;
    let requester = s.create_user().await;
    let approver = s.create_user().await;
    let booking = s.create_booking(&requester, true).await;
    let booking_path = format!("/v1/bookings/{}", booking["id"].as_str().unwrap());

    // PENDING blocks a second request.
    let first = create_approval(&s, &booking, &requester, Some(2)).await;
    let first_id = first["id"].as_str().unwrap();
    refused(
        &s,
        "/v1/approvals",
        &approval_body(&booking, &requester, None),
        StatusCode::CONFLICT,
        &["PENDING", first_id],
        None,
    )
    .await;

    // A rejected approval may be requested again; the new one is current.
    decide(&s, &first, &approver, "REJECTED").await;
    let second = create_approval(&s, &booking, &requester, None).await;
    assert_eq!(get_ok(&s, &booking_path).await["approval"], second);

    // APPROVED blocks a further request too.
    decide(&s, &second, &approver, "APPROVED").await;
    refused(
        &s,
        "/v1/approvals",
        &approval_body(&booking, &requester, None),
        StatusCode::CONFLICT,
        &["APPROVED", second["id"].as_str().unwrap()],
        None,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_approval_for_a_canceled_booking_is_409(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, true).await;
    cancel(&s, &booking).await;
    refused(
        &s,
        "/v1/approvals",
        &approval_body(&booking, &user, None),
        StatusCode::CONFLICT,
        &["CANCELED"],
        None,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_decision_on_a_decided_approval_is_409(pool: PgPool) {
    let s = Server::start(pool).await;
    let requester = s.create_user().await;
    let (a, b) = (s.create_user().await, s.create_user().await);

    for (first, status) in [("APPROVED", "APPROVED"), ("REJECTED", "REJECTED")] {
        let booking = s.create_booking(&requester, true).await;
        let approval = create_approval(&s, &booking, &requester, None).await;
        let decided = decide(&s, &approval, &a, first).await;
        assert_eq!(decided["status"], status);
        for decision in ["APPROVED", "REJECTED"] {
            refused(
                &s,
                &decision_path(&approval),
                &decision_body(&b, decision),
                StatusCode::CONFLICT,
                &[&format!("already {status}")],
                None,
            )
            .await;
        }
        let got = get_ok(
            &s,
            &format!("/v1/approvals/{}", approval["id"].as_str().unwrap()),
        )
        .await;
        assert_eq!(got, decided, "the approval is unchanged");
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn one_approver_cannot_decide_two_steps(pool: PgPool) {
    let s = Server::start(pool).await;
    let requester = s.create_user().await;
    let a = s.create_user().await;
    let booking = s.create_booking(&requester, true).await;
    let approval = create_approval(&s, &booking, &requester, Some(3)).await;
    let after_a = decide(&s, &approval, &a, "APPROVED").await;
    assert_eq!(after_a["currentStep"], 2);

    for decision in ["APPROVED", "REJECTED"] {
        refused(
            &s,
            &decision_path(&approval),
            &decision_body(&a, decision),
            StatusCode::CONFLICT,
            &["approver", "already decided"],
            None,
        )
        .await;
    }
    let got = get_ok(
        &s,
        &format!("/v1/approvals/{}", approval["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(got, after_a, "still PENDING at step 2");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_decision_by_an_unknown_approver_or_on_an_unknown_approval_is_404(pool: PgPool) {
    let s = Server::start(pool).await;
    let requester = s.create_user().await;
    let approver = s.create_user().await;
    let booking = s.create_booking(&requester, true).await;
    let approval = create_approval(&s, &booking, &requester, None).await;

    let missing = Uuid::new_v4();
    refused(
        &s,
        &decision_path(&approval),
        &decision_body(&missing.to_string(), "APPROVED"),
        StatusCode::NOT_FOUND,
        &["user", &missing.to_string(), "not found"],
        None,
    )
    .await;

    let missing = Uuid::new_v4();
    refused(
        &s,
        &format!("/v1/approvals/{missing}/decision"),
        &decision_body(&approver, "APPROVED"),
        StatusCode::NOT_FOUND,
        &["approval", &missing.to_string(), "not found"],
        None,
    )
    .await;

    let got = get_ok(
        &s,
        &format!("/v1/approvals/{}", approval["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(got, approval, "the approval is unchanged");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_decision_on_an_approval_of_a_canceled_booking_is_409(pool: PgPool) {
    let s = Server::start(pool).await;
    let requester = s.create_user().await;
    let (a, b) = (s.create_user().await, s.create_user().await);
    let booking = s.create_booking(&requester, true).await;
    let approval = create_approval(&s, &booking, &requester, Some(2)).await;
    let after_a = decide(&s, &approval, &a, "APPROVED").await;
    cancel(&s, &booking).await;

    for decision in ["APPROVED", "REJECTED"] {
        refused(
            &s,
            &decision_path(&approval),
            &decision_body(&b, decision),
            StatusCode::CONFLICT,
            &["booking", "canceled"],
            None,
        )
        .await;
    }
    let got = get_ok(
        &s,
        &format!("/v1/approvals/{}", approval["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(got, after_a, "the approval is unchanged");
}

// ---------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn twenty_simultaneous_results_for_one_payment_decide_it_once(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;
    let payment = s.create_payment(&booking).await;
    let path = result_path(&payment);
    let before = snapshot(&s).await;

    let requests: Vec<(String, Value)> = (0..20)
        .map(|i| {
            let body = if i % 2 == 0 {
                result_approved(&format!("PG-RACE-{i}"))
            } else {
                result_failed(&format!("declined #{i}"))
            };
            (key(), body)
        })
        .collect();
    let answers = join_all(
        requests
            .iter()
            .map(|(k, body)| s.post(&path, Some(k), body)),
    )
    .await;

    let statuses: Vec<StatusCode> = answers.iter().map(|a| a.status).collect();
    let winners: Vec<&Resp> = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one result wins: {statuses:?}");
    let conflicts = answers
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT)
        .count();
    assert_eq!(conflicts, 19, "the rest are 409: {statuses:?}");
    for a in answers.iter().filter(|a| a.status == StatusCode::CONFLICT) {
        assert!(a.is_problem(), "{:?}", a.body);
        assert!(
            a.body["detail"].as_str().unwrap().contains("already"),
            "{:?}",
            a.body
        );
    }

    let winner = winners[0];
    let status = winner.body["status"].as_str().unwrap();
    assert!(
        status == "APPROVED" || status == "FAILED",
        "{:?}",
        winner.body
    );
    let got = get_ok(
        &s,
        &format!("/v1/payments/{}", payment["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(got, winner.body, "the stored payment is the winner's");

    let events: Vec<(String, Value)> = sqlx::query_as(
        "SELECT topic, payload FROM outbox
          WHERE topic IN ('payment.approved', 'payment.failed')",
    )
    .fetch_all(&s.pool)
    .await
    .unwrap();
    assert_eq!(events.len(), 1, "exactly one decided event");
    assert_eq!(
        events[0].0,
        if status == "APPROVED" {
            "payment.approved"
        } else {
            "payment.failed"
        }
    );
    assert_eq!(events[0].1["data"], winner.body);

    let after = snapshot(&s).await;
    assert_eq!(after.outbox, before.outbox + 1);
    assert_eq!(after.audit, before.audit + 1);
    assert_eq!(
        after.keys,
        before.keys + 1,
        "only the winner's key is stored"
    );
    assert_eq!(
        s.count("audit_log WHERE action = 'payment.result'").await,
        1
    );
}
