//! The integrity checker against a real database: no violation on
//! consistent data (settled through the store and by the real settlement
//! handler, plus legitimately unsettled bookings), each kind of violation
//! found when one is planted (and only by its check), `workers integrity
//! --once` as a process (exit 0 / exit 1 with a readable report, or with
//! `--json` the ticket), and the alert webhook receiving that ticket.
//!
//! Valid data is written through the store's functions. Raw SQL plants only
//! what the store cannot write: back-dated decisions and outbox rows,
//! settlements with wrong totals or of another booking's payment, a booking
//! back to PENDING, deleted audit rows, non-positive amounts.

use std::{
    process::{Command, Output},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    routing::post,
};
use entrip_common::{
    config::IntegritySettings,
    domain::{AggregateType, ApprovalStatus, EventType, PaymentStatus},
    events::{self, NewEvent, SOURCE_INGEST},
    metrics::new_registry,
    store::{bookings, payments, settlements},
};
use entrip_testkit::{STALL, database_url};
use entrip_workers::{
    integrity::{self, Checker, Finding, Report},
    metrics::WorkerMetrics,
    runtime::{Handler, Message, Outcome},
    settlement::Settlement,
};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::{
    PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_workers");
const GRACE: Duration = Duration::from_secs(300);
const OUTBOX_AGE: Duration = Duration::from_secs(900);
const CHECKS: [&str; 7] = [
    "confirmed_without_settlement",
    "settled_not_confirmed",
    "approved_payment_not_settled",
    "non_positive_amounts",
    "settlement_totals",
    "orphans",
    "outbox_undelivered",
];

// ---------------------------------------------------------------- helpers

async fn check(pool: &PgPool) -> Report {
    integrity::run_checks(pool, GRACE, OUTBOX_AGE)
        .await
        .unwrap()
}

fn finding<'a>(report: &'a Report, name: &str) -> &'a Finding {
    report
        .findings
        .iter()
        .find(|f| f.check == name)
        .unwrap_or_else(|| panic!("no check {name} in\n{}", report.render()))
}

/// Every check ran; `name` found `n` rows and every other check none.
fn assert_only(report: &Report, name: &str, n: i64) {
    let names: Vec<&str> = report.findings.iter().map(|f| f.check).collect();
    assert_eq!(names, CHECKS);
    for f in &report.findings {
        let want = if f.check == name { n } else { 0 };
        assert_eq!(f.violations, want, "{}:\n{}", f.check, report.render());
        assert_eq!(
            f.examples.len(),
            usize::try_from(want.min(10)).unwrap(),
            "{}: up to 10 examples\n{}",
            f.check,
            report.render()
        );
        let lines: Vec<String> = f.rows.iter().map(ToString::to_string).collect();
        assert_eq!(lines, f.examples, "each example is its row");
    }
    assert_eq!(report.violations(), n);
}

fn assert_example(report: &Report, name: &str, needle: &str) {
    let f = finding(report, name);
    assert!(
        f.examples.iter().any(|e| e.contains(needle)),
        "{name} shows {needle:?}:\n{}",
        report.render()
    );
}

/// Plants a change with raw SQL (what the store cannot write).
async fn exec(pool: &PgPool, sql: &str, id: Uuid) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

/// Back-dates a payment's or an approval's decision by an `age` such as
/// `'1 hour'` (raw SQL: the store decides now).
async fn decided_ago(pool: &PgPool, table: &str, id: Uuid, age: &str) {
    exec(
        pool,
        &format!("UPDATE {table} SET decided_at = now() - interval '{age}' WHERE id = $1"),
        id,
    )
    .await;
}

/// Confirms a booking through the store without settling it: the store
/// allows the step (the worker takes it in its settlement's transaction),
/// the checker must object.
async fn confirm_unsettled(pool: &PgPool, booking: Uuid) {
    let mut tx = pool.begin().await.unwrap();
    bookings::confirm(&mut tx, booking).await.unwrap();
    tx.commit().await.unwrap();
}

/// The rest of a settlement as the worker writes it: the booking
/// CONFIRMED and both audit rows.
async fn confirm_settled(conn: &mut PgConnection, booking: Uuid, settlement: Uuid) {
    bookings::confirm(conn, booking).await.unwrap();
    audited(
        conn,
        "settlement.record",
        AggregateType::Settlement,
        settlement,
    )
    .await;
    audited(conn, "booking.confirm", AggregateType::Booking, booking).await;
}

/// A booking settled consistently through the store: KRW 350000, tax
/// 31818. The settlement id.
async fn settled_booking(pool: &PgPool) -> (Fixture, Uuid) {
    let mut f = booking(pool, false).await;
    let payment = add_payment(pool, &mut f, PaymentStatus::Approved).await;
    let mut tx = pool.begin().await.unwrap();
    let payment = payments::get(&mut tx, payment).await.unwrap().unwrap();
    let settlement = settlements::insert(&mut tx, Uuid::now_v7(), &payment, f.approval)
        .await
        .unwrap();
    confirm_settled(&mut tx, f.booking, settlement.id).await;
    tx.commit().await.unwrap();
    (f, settlement.id)
}

/// Plants a settlement of the fixture's booking paid by `payment` with the
/// given totals (net = gross - tax, as the schema demands), then confirms
/// the booking as the worker would. Raw SQL: the store takes a
/// settlement's booking and totals from its payment, so it cannot write
/// the wrong ones planted here. The settlement id.
async fn plant_settlement(
    pool: &PgPool,
    f: &Fixture,
    payment: Uuid,
    gross: i64,
    tax: i64,
    currency: &str,
) -> Uuid {
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO settlements (id, booking_id, payment_id, approval_id, gross, tax, net, currency)
         VALUES ($1, $2, $3, $4, $5, $6, $5 - $6, $7)",
    )
    .bind(id)
    .bind(f.booking)
    .bind(payment)
    .bind(f.approval)
    .bind(Decimal::from(gross))
    .bind(Decimal::from(tax))
    .bind(currency)
    .execute(&mut *tx)
    .await
    .unwrap();
    confirm_settled(&mut tx, f.booking, id).await;
    tx.commit().await.unwrap();
    id
}

/// What became of an outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Row {
    Pending,
    Published,
    Dead,
}

/// A `booking.created` row of the aggregate, enqueued through the store,
/// then made `age` old (e.g. `'2 hours'`) and marked with raw SQL: the
/// store only enqueues (the dispatcher marks rows, and nobody back-dates
/// them). The row's id.
async fn outbox_row(pool: &PgPool, aggregate: Uuid, age: &str, state: Row) -> Uuid {
    let event = NewEvent::new(
        EventType::BookingCreated,
        AggregateType::Booking,
        aggregate,
        SOURCE_INGEST,
        json!({"id": aggregate}),
    );
    let mut conn = pool.acquire().await.unwrap();
    events::enqueue(&mut conn, &event).await.unwrap();
    sqlx::query(
        "UPDATE outbox SET created_at = now() - $2::interval,
                published_at = CASE WHEN $3 THEN now() END,
                dead_at = CASE WHEN $4 THEN now() END,
                last_error = CASE WHEN $4 THEN 'broker refused' END
          WHERE id = $1",
    )
    .bind(event.id)
    .bind(age)
    .bind(state == Row::Published)
    .bind(state == Row::Dead)
    .execute(&mut *conn)
    .await
    .unwrap();
    event.id
}

/// Consistent data: what the checker must accept.
struct World {
    sql_settled: Fixture,
    worker_settled: Fixture,
}

async fn consistent(pool: &PgPool) -> World {
    // Settled through the store as the worker writes it.
    let (sql_settled, _) = settled_booking(pool).await;

    // Settled by the real settlement handler (approval required).
    let mut w = booking(pool, true).await;
    add_payment(pool, &mut w, PaymentStatus::Approved).await;
    add_approval(pool, &mut w, ApprovalStatus::Approved).await;
    let event = Uuid::now_v7();
    let body = cloud_event(
        json!(event),
        "approval.decided",
        &approval_data(&w, "APPROVED"),
    );
    let msg = Message::new(
        Some(event.to_string()),
        Some("approval.decided".into()),
        "approval.decided".into(),
        body.to_string().into_bytes(),
    );
    let outcome = Settlement::new(pool.clone()).handle(&msg).await;
    assert_eq!(outcome, Outcome::Processed);
    assert_eq!(
        scalar(pool, "SELECT count(*) FROM settlements").await,
        2,
        "the handler settled its booking"
    );

    // Legitimately not settled (yet):
    let mut pending_payment = booking(pool, false).await;
    add_payment(pool, &mut pending_payment, PaymentStatus::Pending).await;
    let mut fresh = booking(pool, false).await;
    add_payment(pool, &mut fresh, PaymentStatus::Approved).await; // within the grace
    let mut awaiting = booking(pool, true).await;
    let old = add_payment(pool, &mut awaiting, PaymentStatus::Approved).await;
    decided_ago(pool, "payments", old, "2 hours").await;
    add_approval(pool, &mut awaiting, ApprovalStatus::Pending).await; // approval outstanding
    let mut failed = booking(pool, true).await;
    add_payment(pool, &mut failed, PaymentStatus::Failed).await;
    add_approval(pool, &mut failed, ApprovalStatus::Rejected).await;

    // Outbox: an old published row and a fresh undelivered one (plus the
    // handler's two fresh rows).
    outbox_row(pool, sql_settled.booking, "2 hours", Row::Published).await;
    outbox_row(pool, fresh.booking, "1 second", Row::Pending).await;

    World {
        sql_settled,
        worker_settled: w,
    }
}

fn sqlstate(err: &sqlx::Error) -> String {
    err.as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned())
        .unwrap_or_else(|| panic!("a database error: {err}"))
}

/// One POST to the alert webhook: content type and body.
type Post = (Option<String>, String);

/// Records the alert webhook's POSTs.
#[derive(Clone, Default)]
struct Alerts(Arc<Mutex<Vec<Post>>>);

impl Alerts {
    fn take(&self) -> Vec<Post> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

async fn alert_server() -> (String, Alerts) {
    let alerts = Alerts::default();
    let app = Router::new()
        .route(
            "/alerts",
            post(
                |State(a): State<Alerts>, headers: HeaderMap, body: String| async move {
                    let ct = headers
                        .get(CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    a.0.lock().unwrap().push((ct, body));
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(alerts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/alerts"), alerts)
}

/// `workers integrity --once` against the test's database.
async fn run_binary(db_url: &str, alert: &str) -> Output {
    run_binary_with(db_url, alert, &[]).await
}

/// `workers integrity --once ARGS…` against the test's database.
async fn run_binary_with(db_url: &str, alert: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("ENTRIP__LOG__LEVEL", "warn")
        .env("ENTRIP__INTEGRITY__ALERT_WEBHOOK", alert)
        .args(["integrity", "--once"])
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The report posted to the webhook, as JSON.
fn posted_report(post: &Post) -> Value {
    let (ct, body) = post;
    assert!(
        ct.as_deref()
            .is_some_and(|c| c.starts_with("application/json")),
        "content type {ct:?}"
    );
    serde_json::from_str(body).unwrap()
}

fn posted_finding<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .expect("findings is an array")
        .iter()
        .find(|f| f["check"] == name)
        .unwrap_or_else(|| panic!("{name} in {report}"))
}

// ------------------------------------------------------------------ tests

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn consistent_data_has_no_violation(pool: PgPool) {
    let world = consistent(&pool).await;
    let report = check(&pool).await;
    assert_only(&report, "", 0);
    let rendered = report.render();
    for name in CHECKS {
        assert!(
            rendered
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(name)),
            "{name} reported ok:\n{rendered}"
        );
    }
    assert!(rendered.ends_with("0 violation(s)\n"), "{rendered}");
    // The data really is as described.
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM bookings WHERE status = 'CONFIRMED'"
        )
        .await,
        2
    );
    for b in [world.sql_settled.booking, world.worker_settled.booking] {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM settlements WHERE booking_id = $1")
            .bind(b)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )
        .await,
        3
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_confirmed_booking_without_settlement_is_found(pool: PgPool) {
    consistent(&pool).await;
    // Confirmed with an approved payment but no settlement.
    let mut a = booking(&pool, false).await;
    add_payment(&pool, &mut a, PaymentStatus::Approved).await;
    confirm_unsettled(&pool, a.booking).await;
    let report = check(&pool).await;
    assert_only(&report, "confirmed_without_settlement", 1);
    assert_example(
        &report,
        "confirmed_without_settlement",
        &format!("booking {}", a.booking),
    );

    // Confirmed without any payment.
    let b = booking(&pool, false).await;
    confirm_unsettled(&pool, b.booking).await;
    let report = check(&pool).await;
    assert_only(&report, "confirmed_without_settlement", 2);
    assert_example(
        &report,
        "confirmed_without_settlement",
        &format!("booking {}", b.booking),
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_settled_booking_that_is_not_confirmed_is_found(pool: PgPool) {
    consistent(&pool).await;
    let (f, settlement) = settled_booking(&pool).await;
    // Back to PENDING although it has a settlement (raw SQL: the store
    // never takes a booking back).
    exec(
        &pool,
        "UPDATE bookings SET status = 'PENDING', confirmed_at = NULL WHERE id = $1",
        f.booking,
    )
    .await;
    let report = check(&pool).await;
    assert_only(&report, "settled_not_confirmed", 1);
    assert_example(
        &report,
        "settled_not_confirmed",
        &format!("settlement {settlement} of booking {}", f.booking),
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_approved_payment_unsettled_past_the_grace_is_found(pool: PgPool) {
    consistent(&pool).await;
    // Approved an hour ago, nothing else needed, still PENDING.
    let mut a = booking(&pool, false).await;
    let pa = add_payment(&pool, &mut a, PaymentStatus::Approved).await;
    decided_ago(&pool, "payments", pa, "1 hour").await;
    let report = check(&pool).await;
    assert_only(&report, "approved_payment_not_settled", 1);
    assert_example(
        &report,
        "approved_payment_not_settled",
        &format!("payment {pa} of booking {}", a.booking),
    );

    // Approval required and approved an hour ago as well: also overdue.
    let mut b = booking(&pool, true).await;
    let pb = add_payment(&pool, &mut b, PaymentStatus::Approved).await;
    let ab = add_approval(&pool, &mut b, ApprovalStatus::Approved).await;
    decided_ago(&pool, "payments", pb, "1 hour").await;
    decided_ago(&pool, "approvals", ab, "1 hour").await;
    // Approval required, payment old but the approval just decided: the
    // grace runs from the last decision, so not reported.
    let mut c = booking(&pool, true).await;
    let pc = add_payment(&pool, &mut c, PaymentStatus::Approved).await;
    add_approval(&pool, &mut c, ApprovalStatus::Approved).await;
    decided_ago(&pool, "payments", pc, "1 hour").await;
    let report = check(&pool).await;
    assert_only(&report, "approved_payment_not_settled", 2);
    assert_example(
        &report,
        "approved_payment_not_settled",
        &format!("payment {pb} of booking {}", b.booking),
    );

    // Within a longer grace nothing is overdue.
    let report = integrity::run_checks(&pool, Duration::from_secs(7200), OUTBOX_AGE)
        .await
        .unwrap();
    assert_only(&report, "", 0);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn settlement_totals_differing_from_the_payment_are_found(pool: PgPool) {
    consistent(&pool).await;
    let mut expected = Vec::new();
    // (gross, tax, currency) against a payment of KRW 350000, tax 31818.
    for (gross, tax, currency) in [
        (360_000, 31_818, "KRW"),
        (350_000, 30_000, "KRW"),
        (350_000, 31_818, "USD"),
    ] {
        let mut f = booking(&pool, false).await;
        let p = add_payment(&pool, &mut f, PaymentStatus::Approved).await;
        let s = plant_settlement(&pool, &f, p, gross, tax, currency).await;
        expected.push(s);
        let report = check(&pool).await;
        assert_only(&report, "settlement_totals", expected.len() as i64);
        assert_example(&report, "settlement_totals", &format!("settlement {s}"));
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn settlements_of_another_bookings_payment_and_entities_without_audit_are_orphans(
    pool: PgPool,
) {
    consistent(&pool).await;
    // Y is settled with X's payment; Y has an approved payment of its own
    // and X's payment is fresh, so no other check objects.
    let mut x = booking(&pool, false).await;
    let px = add_payment(&pool, &mut x, PaymentStatus::Approved).await;
    let mut y = booking(&pool, false).await;
    add_payment(&pool, &mut y, PaymentStatus::Approved).await;
    let s = plant_settlement(&pool, &y, px, 350_000, 31_818, "KRW").await;
    let report = check(&pool).await;
    assert_only(&report, "orphans", 1);
    assert_example(
        &report,
        "orphans",
        &format!("settlement {s} pays for another booking"),
    );

    // A booking without any audit_log row.
    let b = booking(&pool, false).await;
    exec(
        &pool,
        "DELETE FROM audit_log WHERE entity_type = 'booking' AND entity_id = $1",
        b.booking,
    )
    .await;
    let report = check(&pool).await;
    assert_only(&report, "orphans", 2);
    assert_example(
        &report,
        "orphans",
        &format!("booking {} without audit record", b.booking),
    );

    // A payment without any audit_log row.
    let mut c = booking(&pool, false).await;
    let pc = add_payment(&pool, &mut c, PaymentStatus::Pending).await;
    exec(
        &pool,
        "DELETE FROM audit_log WHERE entity_type = 'payment' AND entity_id = $1",
        pc,
    )
    .await;
    let report = check(&pool).await;
    assert_only(&report, "orphans", 3);
    assert_example(
        &report,
        "orphans",
        &format!("payment {pc} without audit record"),
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn undelivered_and_dead_outbox_rows_are_found(pool: PgPool) {
    let world = consistent(&pool).await;
    let b = world.sql_settled.booking;
    let old = outbox_row(&pool, b, "1 hour", Row::Pending).await;
    let report = check(&pool).await;
    assert_only(&report, "outbox_undelivered", 1);
    assert_example(
        &report,
        "outbox_undelivered",
        &format!("outbox {old} booking.created (undelivered)"),
    );

    let dead = outbox_row(&pool, b, "1 second", Row::Dead).await;
    let report = check(&pool).await;
    assert_only(&report, "outbox_undelivered", 2);
    assert_example(
        &report,
        "outbox_undelivered",
        &format!("outbox {dead} booking.created (dead)"),
    );

    // Under a threshold above the old row's age only the dead row counts.
    let report = integrity::run_checks(&pool, GRACE, Duration::from_secs(7200))
        .await
        .unwrap();
    assert_only(&report, "outbox_undelivered", 1);
    assert_example(&report, "outbox_undelivered", &dead.to_string());

    // The count is complete; the examples stop at 10.
    for _ in 0..11 {
        outbox_row(&pool, b, "20 minutes", Row::Pending).await;
    }
    let report = check(&pool).await;
    assert_only(&report, "outbox_undelivered", 13);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn non_positive_amounts_cannot_be_stored(pool: PgPool) {
    let world = consistent(&pool).await;
    let f = &world.sql_settled;
    let user = f.user;
    let unpaid = booking(&pool, false).await;
    let attempts = [
        (
            "INSERT INTO bookings (id, code, user_id, customer_name, customer_phone, itinerary_from,
                                   itinerary_to, depart_at, arrive_at, currency, amount)
             VALUES (gen_random_uuid(), 'BK-ZERO1', $1, 'Kim', '010 1234 5678', 'ICN', 'NRT',
                     '2026-12-24T00:30:00Z', '2026-12-24T02:45:00Z', 'KRW', 0)",
            user,
        ),
        ("UPDATE bookings SET amount = -1 WHERE id = $1", f.booking),
        (
            "UPDATE payments SET amount = 0, tax = 0 WHERE id = $1",
            f.payment.unwrap(),
        ),
        (
            "INSERT INTO payments (id, booking_id, method, amount, tax, currency)
             VALUES (gen_random_uuid(), $1, 'CARD', -350000, 0, 'KRW')",
            unpaid.booking,
        ),
        (
            "UPDATE settlements SET gross = 0, tax = 0, net = 0 WHERE booking_id = $1",
            f.booking,
        ),
        (
            "UPDATE settlements SET gross = -10, tax = 0, net = -10 WHERE booking_id = $1",
            f.booking,
        ),
    ];
    for (sql, id) in attempts {
        let err = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .bind(id)
            .execute(&pool)
            .await
            .expect_err(sql);
        assert_eq!(sqlstate(&err), "23514", "a CHECK refuses {sql}: {err}");
    }
    let report = check(&pool).await;
    assert_eq!(finding(&report, "non_positive_amounts").violations, 0);
    assert_only(&report, "", 0);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn non_positive_amounts_are_found_if_the_checks_are_ever_dropped(pool: PgPool) {
    let world = consistent(&pool).await;
    for (table, constraint) in [
        ("bookings", "bookings_amount_check"),
        ("payments", "payments_amount_check"),
        ("settlements", "settlements_gross_check"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {table} DROP CONSTRAINT {constraint}"
        )))
        .execute(&pool)
        .await
        .unwrap();
    }
    // An unpaid booking of 0, and a settled booking whose payment and
    // settlement are 0 (so that the totals still agree).
    let unpaid = booking(&pool, false).await;
    exec(
        &pool,
        "UPDATE bookings SET amount = 0 WHERE id = $1",
        unpaid.booking,
    )
    .await;
    let f = &world.sql_settled;
    exec(
        &pool,
        "UPDATE payments SET amount = 0, tax = 0 WHERE id = $1",
        f.payment.unwrap(),
    )
    .await;
    exec(
        &pool,
        "UPDATE settlements SET gross = 0, tax = 0, net = 0 WHERE booking_id = $1",
        f.booking,
    )
    .await;
    let report = check(&pool).await;
    assert_only(&report, "non_positive_amounts", 3);
    for e in [
        format!("booking {}", unpaid.booking),
        format!("payment {}", f.payment.unwrap()),
        "settlement ".to_owned(),
    ] {
        assert_example(&report, "non_positive_amounts", &e);
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn the_binary_exits_0_on_consistent_data_and_1_with_a_report_on_a_violation(
    _opts: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let db_url = database_url(&connect);
    consistent(&pool).await;
    let (alert_url, alerts) = alert_server().await;

    let out = run_binary(&db_url, &alert_url).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in CHECKS {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(name)),
            "{name} reported ok:\n{}",
            text(&out)
        );
    }
    assert!(stdout.contains("0 violation(s)"), "{}", text(&out));
    assert!(alerts.take().is_empty(), "no alert without a violation");

    // Plant a confirmed booking without settlement.
    let mut v = booking(&pool, false).await;
    add_payment(&pool, &mut v, PaymentStatus::Approved).await;
    confirm_unsettled(&pool, v.booking).await;
    let out = run_binary(&db_url, &alert_url).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("confirmed_without_settlement")),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains(&format!("booking {}", v.booking)),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("1 violation(s)"), "{}", text(&out));
    for name in CHECKS
        .iter()
        .filter(|c| **c != "confirmed_without_settlement")
    {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(name)),
            "{name} still ok:\n{}",
            text(&out)
        );
    }
    // The binary posted the report to the alert webhook.
    let posts = alerts.take();
    assert_eq!(posts.len(), 1, "one alert");
    let report = posted_report(&posts[0]);
    let f = posted_finding(&report, "confirmed_without_settlement");
    assert_eq!(f["violations"], 1);
    assert_eq!(f["examples"], json!([format!("booking {}", v.booking)]));
    pool.close().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn json_prints_the_ticket_the_alert_webhook_receives_naming_the_rows(
    _opts: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let db_url = database_url(&connect);
    let database = connect.get_database().unwrap().to_owned();
    consistent(&pool).await;
    let (alert_url, alerts) = alert_server().await;
    let ticket = |out: &Output| -> Value {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is one JSON document ({e}):\n{}", text(out)))
    };

    let out = run_binary_with(&db_url, &alert_url, &["--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ok = ticket(&out);
    assert_eq!(ok["kind"], "entrip.integrity.report");
    assert_eq!(ok["status"], "ok");
    assert_eq!(ok["severity"], "info");
    assert_eq!(ok["violations"], 0);
    assert_eq!(ok["database"], database.as_str());
    assert_eq!(ok["failed_checks"], json!([]));
    assert_eq!(ok["findings"].as_array().unwrap().len(), CHECKS.len());
    assert!(alerts.take().is_empty(), "no alert without a violation");

    // Two offending rows of two kinds.
    let mut v = booking(&pool, false).await;
    add_payment(&pool, &mut v, PaymentStatus::Approved).await;
    confirm_unsettled(&pool, v.booking).await;
    let (s, settlement) = settled_booking(&pool).await;
    exec(
        &pool,
        "UPDATE bookings SET status = 'PENDING', confirmed_at = NULL WHERE id = $1",
        s.booking,
    )
    .await;
    let out = run_binary_with(&db_url, &alert_url, &["--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = ticket(&out);
    assert_eq!(t["status"], "violated");
    assert_eq!(t["severity"], "critical");
    assert_eq!(t["violations"], 2);
    assert_eq!(
        t["failed_checks"],
        json!(["confirmed_without_settlement", "settled_not_confirmed"])
    );
    assert_eq!(
        t["title"],
        format!(
            "Entrip integrity: 2 violation(s) in {database}: \
             confirmed_without_settlement, settled_not_confirmed"
        )
    );
    assert_eq!(
        posted_finding(&t, "confirmed_without_settlement")["rows"],
        json!([{"entity": "booking", "id": v.booking.to_string()}])
    );
    assert_eq!(
        posted_finding(&t, "settled_not_confirmed")["rows"],
        json!([{
            "entity": "settlement",
            "id": settlement.to_string(),
            "detail": format!("of booking {}", s.booking),
        }])
    );
    let body = t["text"].as_str().unwrap();
    for needle in [
        "- confirmed_without_settlement (1): a CONFIRMED booking".to_owned(),
        format!("  - booking {}", v.booking),
        format!("  - settlement {settlement} of booking {}", s.booking),
        format!("Runbook: {}", integrity::RUNBOOK),
    ] {
        assert!(body.contains(&needle), "{needle:?} in\n{body}");
    }
    assert!(body.starts_with(t["title"].as_str().unwrap()), "{body}");
    let fingerprint = t["fingerprint"].as_str().unwrap();
    assert!(
        fingerprint.len() == 64 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()),
        "{fingerprint}"
    );
    assert_ne!(t["fingerprint"], ok["fingerprint"]);
    assert!(
        t["checked_at"].as_str().is_some_and(|c| c.ends_with('Z')),
        "{t}"
    );
    // The alert is the very ticket printed.
    let posts = alerts.take();
    assert_eq!(posts.len(), 1, "one alert");
    assert_eq!(posted_report(&posts[0]), t);

    // An alert that cannot be posted is logged on stderr: stdout stays
    // the ticket alone.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let out = run_binary_with(&db_url, &format!("http://{closed}/alerts"), &["--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        ticket(&out)["fingerprint"],
        t["fingerprint"],
        "same violations, same ticket"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot post the integrity alert"),
        "{}",
        text(&out)
    );
    pool.close().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_ticket_shows_ten_rows_of_many_and_counts_the_rest(pool: PgPool) {
    consistent(&pool).await;
    let mut planted = Vec::new();
    for _ in 0..12 {
        let b = booking(&pool, false).await;
        confirm_unsettled(&pool, b.booking).await;
        planted.push(b.booking.to_string());
    }
    planted.sort();
    let report = check(&pool).await;
    assert_only(&report, "confirmed_without_settlement", 12);
    let ticket = report.ticket();
    assert_eq!(ticket.violations, 12);
    let f = finding(&report, "confirmed_without_settlement");
    // The first ten by id, so the same ones from run to run.
    let shown: Vec<&str> = f.rows.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        shown,
        planted[..10].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(ticket.text.contains("  - and 2 more\n"), "{}", ticket.text);
    assert_eq!(check(&pool).await.ticket().fingerprint, ticket.fingerprint);
}

#[tokio::test]
async fn json_prints_an_error_ticket_when_the_checks_cannot_run() {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("ENTRIP__DATABASE__STARTUP_TIMEOUT_SECS", "1")
        .env("ENTRIP__LOG__LEVEL", "error")
        .args(["integrity", "--once", "--json"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is one JSON document ({e}):\n{}", text(&out)));
    assert_eq!(t["kind"], "entrip.integrity.report");
    assert_eq!(t["status"], "error");
    assert_eq!(t["severity"], "critical");
    let error = t["error"].as_str().unwrap();
    assert!(error.contains("PostgreSQL"), "{t}");
    assert!(t["text"].as_str().unwrap().contains(error), "{t}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not run"),
        "{}",
        text(&out)
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn check_once_posts_the_report_to_the_alert_webhook_and_sets_the_gauges(pool: PgPool) {
    consistent(&pool).await;
    let (alert_url, alerts) = alert_server().await;
    let settings = IntegritySettings {
        alert_webhook: Some(alert_url),
        ..IntegritySettings::default()
    };
    let metrics = WorkerMetrics::register(&new_registry()).unwrap();
    let checker = Checker::new(pool.clone(), settings, metrics.clone());
    let gauge = |name: &str| metrics.integrity_violations(name);

    let report = checker.check_once().await.unwrap();
    assert_eq!(report.violations(), 0);
    assert!(alerts.take().is_empty(), "no alert without a violation");
    for name in CHECKS {
        assert_eq!(gauge(name), 0, "{name}");
    }

    // Two kinds of violation.
    let mut v = booking(&pool, false).await;
    add_payment(&pool, &mut v, PaymentStatus::Approved).await;
    confirm_unsettled(&pool, v.booking).await;
    let dead = outbox_row(&pool, v.booking, "1 second", Row::Dead).await;
    let report = checker.check_once().await.unwrap();
    assert_eq!(report.violations(), 2);
    let posts = alerts.take();
    assert_eq!(posts.len(), 1, "one alert per run");
    let posted = posted_report(&posts[0]);
    assert_eq!(posted, serde_json::to_value(report.ticket()).unwrap());
    assert_eq!(posted["status"], "violated");
    assert_eq!(
        posted["failed_checks"],
        json!(["confirmed_without_settlement", "outbox_undelivered"])
    );
    assert_eq!(
        posted["findings"].as_array().unwrap().len(),
        CHECKS.len(),
        "every check is in the report"
    );
    let f = posted_finding(&posted, "confirmed_without_settlement");
    assert_eq!(f["violations"], 1);
    assert!(f["rule"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(f["examples"], json!([format!("booking {}", v.booking)]));
    let f = posted_finding(&posted, "outbox_undelivered");
    assert_eq!(f["violations"], 1);
    assert_eq!(
        f["examples"],
        json!([format!("outbox {dead} booking.created (dead)")])
    );
    assert_eq!(
        f["rows"],
        json!([{"entity": "outbox", "id": dead.to_string(), "detail": "booking.created (dead)"}])
    );
    assert_eq!(posted_finding(&posted, "orphans")["violations"], 0);
    assert_eq!(gauge("confirmed_without_settlement"), 1);
    assert_eq!(gauge("outbox_undelivered"), 1);
    assert_eq!(gauge("orphans"), 0);
    // The same violations an hour later are the same ticket; one more is
    // another.
    let again = checker.check_once().await.unwrap();
    assert_eq!(again.ticket().fingerprint, posted["fingerprint"]);
    assert_eq!(alerts.take().len(), 1, "still alerted");
    let w = booking(&pool, false).await;
    confirm_unsettled(&pool, w.booking).await;
    let more = checker.check_once().await.unwrap();
    assert_eq!(more.violations(), 3);
    assert_ne!(more.ticket().fingerprint, posted["fingerprint"]);
    alerts.take();

    // An unreachable webhook does not fail the run.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let unreachable = IntegritySettings {
        alert_webhook: Some(format!("http://{closed}/alerts")),
        ..IntegritySettings::default()
    };
    let report = Checker::new(pool.clone(), unreachable, metrics.clone())
        .check_once()
        .await
        .unwrap();
    assert_eq!(report.violations(), 3);
    assert!(alerts.take().is_empty());
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn check_once_returns_even_when_the_alert_receiver_never_answers(pool: PgPool) {
    consistent(&pool).await;
    // A receiver that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let held = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            held.lock().unwrap().push(socket);
        }
    });
    let settings = IntegritySettings {
        alert_webhook: Some(format!("http://{addr}/alerts")),
        ..IntegritySettings::default()
    };
    let metrics = WorkerMetrics::register(&new_registry()).unwrap();
    let mut v = booking(&pool, false).await;
    add_payment(&pool, &mut v, PaymentStatus::Approved).await;
    confirm_unsettled(&pool, v.booking).await;

    // A hung receiver must not hang the checker (the periodic loop would
    // stop checking, `workers integrity --once` would never exit). The
    // checker gives up after its alert timeout, shortened here from 10 s;
    // STALL only bounds a checker that never gives up.
    let checker = Checker::new(pool.clone(), settings, metrics.clone())
        .with_alert_timeout(Duration::from_millis(500));
    let run = tokio::time::timeout(STALL, checker.check_once()).await;
    assert!(
        !accepted.lock().unwrap().is_empty(),
        "the alert was attempted"
    );
    let report = run
        .expect("check_once gives up on an alert receiver that does not answer")
        .unwrap();
    assert_eq!(report.violations(), 1);
    assert_eq!(
        metrics.integrity_violations("confirmed_without_settlement"),
        1
    );
    server.abort();
}
