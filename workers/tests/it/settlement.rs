//! The settlement consumer against real PostgreSQL and RabbitMQ: every event
//! delivered several times settles its booking exactly once; payment and
//! approval settle in either order; rejected, failed and canceled bookings
//! are not settled; the effect is audited and announced as CloudEvents;
//! poison messages go to `entrip.settlement.dlq` with the reason while the
//! consumer keeps going; transient failures take the retry path and a
//! failure that never heals ends in the DLQ after `max_retries`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use chrono::{DateTime, Utc};
use entrip_common::{
    amqp::{self, ERROR_HEADER, SETTLEMENT_QUEUE},
    config::{AmqpSettings, WorkersSettings},
    domain::{ApprovalStatus, Decision, PaymentOutcome, PaymentStatus, Text},
    store::bookings,
};
use entrip_testkit::{
    Vhost,
    asyncapi::{AmqpMessage, contract},
    eventually, progress,
};
use entrip_workers::{runtime::ATTEMPT_HEADER, settlement::Settlement};
use lapin::{
    Channel,
    options::{BasicAckOptions, BasicGetOptions},
    types::AMQPValue,
};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

const CONSUMER: &str = "settlement";
const OUTCOMES: [&str; 4] = ["processed", "duplicate", "retried", "dead_lettered"];

// ---------------------------------------------------------------- helpers

/// Messages the consumer finished with, whatever the outcome.
fn handled(w: &Running) -> u64 {
    OUTCOMES.iter().map(|o| w.count(CONSUMER, o)).sum()
}

fn dlq() -> String {
    amqp::dlq_name(SETTLEMENT_QUEUE)
}

/// A message read back from a queue with `basic_get`.
#[derive(Debug)]
struct Got {
    message_id: Option<String>,
    kind: Option<String>,
    error: Option<String>,
    attempt: Option<i64>,
    body: Vec<u8>,
}

/// Reads (and acknowledges) every message waiting in `queue`.
async fn drain(ch: &Channel, queue: &str) -> Vec<Got> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        contract().assert_from_queue(queue, &AmqpMessage::of(&m.delivery));
        let props = &m.delivery.properties;
        let error = match header(props, ERROR_HEADER) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            Some(other) => panic!("{ERROR_HEADER} is not a string: {other:?}"),
            None => None,
        };
        let attempt = match header(props, ATTEMPT_HEADER) {
            Some(AMQPValue::LongLongInt(n)) => Some(n),
            Some(AMQPValue::LongInt(n)) => Some(i64::from(n)),
            Some(other) => panic!("{ATTEMPT_HEADER} is not an integer: {other:?}"),
            None => None,
        };
        out.push(Got {
            message_id: props.message_id().as_ref().map(|s| s.as_str().to_owned()),
            kind: props.kind().as_ref().map(|s| s.as_str().to_owned()),
            error,
            attempt,
            body: m.delivery.data.clone(),
        });
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

/// (id, topic, aggregate type, aggregate id, payload, published at).
type OutboxRow = (Uuid, String, String, Uuid, Value, Option<DateTime<Utc>>);

/// (message id, routing key, type property, body, expected reason).
type PoisonCase<'a> = (&'a str, &'a str, Option<&'a str>, Vec<u8>, &'a str);

/// (payment, approval, gross, tax, net, currency) of the booking's settlement.
type SettlementValues = (Uuid, Option<Uuid>, Decimal, Decimal, Decimal, String);

async fn settlement_of(pool: &PgPool, booking: Uuid) -> Option<SettlementValues> {
    sqlx::query_as(
        "SELECT payment_id, approval_id, gross, tax, net, currency FROM settlements WHERE booking_id = $1",
    )
    .bind(booking)
    .fetch_optional(pool)
    .await
    .unwrap()
}

async fn booking_state(pool: &PgPool, booking: Uuid) -> (String, Option<DateTime<Utc>>) {
    sqlx::query_as("SELECT status, confirmed_at FROM bookings WHERE id = $1")
        .bind(booking)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn count_where(pool: &PgPool, sql: &str, id: Uuid) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn inbox_ids(pool: &PgPool) -> BTreeSet<String> {
    sqlx::query_scalar("SELECT message_id FROM inbox WHERE consumer = 'settlement'")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

fn krw(n: i64) -> Decimal {
    Decimal::from(n)
}

/// The booking is settled as docs/DESIGN.md says: one settlement of the fixture's
/// payment (and approval), KRW 350000 - 31818 = 318182, the booking
/// CONFIRMED with its time, and exactly one `settlement.recorded` and one
/// `booking.confirmed` in the outbox.
async fn assert_settled(pool: &PgPool, f: &Fixture) {
    let s = settlement_of(pool, f.booking)
        .await
        .expect("the booking is settled");
    assert_eq!(
        s,
        (
            f.payment.unwrap(),
            f.approval,
            krw(350_000),
            krw(31_818),
            krw(318_182),
            "KRW".to_owned()
        )
    );
    let (status, confirmed_at) = booking_state(pool, f.booking).await;
    assert_eq!(status, "CONFIRMED");
    assert!(
        confirmed_at.is_some(),
        "a confirmed booking has confirmed_at"
    );
    assert_eq!(
        count_where(
            pool,
            "SELECT count(*) FROM outbox WHERE topic = 'booking.confirmed' AND aggregate_type = 'booking' AND aggregate_id = $1",
            f.booking
        )
        .await,
        1
    );
    assert_eq!(
        count_where(
            pool,
            "SELECT count(*) FROM outbox o JOIN settlements s ON s.id = o.aggregate_id
              WHERE o.topic = 'settlement.recorded' AND o.aggregate_type = 'settlement' AND s.booking_id = $1",
            f.booking
        )
        .await,
        1
    );
}

/// Nothing was settled or emitted for the booking, which kept `status`.
async fn assert_untouched(pool: &PgPool, booking: Uuid, status: &str) {
    assert_eq!(settlement_of(pool, booking).await, None);
    let (now, confirmed_at) = booking_state(pool, booking).await;
    assert_eq!(now, status);
    assert_eq!(confirmed_at, None);
    assert_eq!(scalar(pool, "SELECT count(*) FROM settlements").await, 0);
    assert_eq!(scalar(pool, "SELECT count(*) FROM outbox").await, 0);
    assert_eq!(
        scalar(
            pool,
            "SELECT count(*) FROM audit_log WHERE actor = 'worker:settlement'"
        )
        .await,
        0
    );
}

async fn wait_processed(w: &Running, n: u64) {
    until_count(&format!("{n} message(s) processed"), n, || async {
        w.count(CONSUMER, "processed")
    })
    .await;
    assert_eq!(w.count(CONSUMER, "processed"), n);
}

// ------------------------------------------------------------------ tests

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn every_event_delivered_two_or_three_times_settles_exactly_once(pool: PgPool) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;

    // (event id, type, data, copies): 12 bookings settled by their payment,
    // 4 that also need an approval (both events, each repeated).
    let mut events: Vec<(Uuid, &str, Value, usize)> = Vec::new();
    let mut bookings = Vec::new();
    for i in 0..12 {
        let mut f = booking(&pool, false).await;
        add_payment(&pool, &mut f, PaymentStatus::Approved).await;
        events.push((
            Uuid::now_v7(),
            "payment.approved",
            payment_data(&f, "APPROVED"),
            2 + i % 2,
        ));
        bookings.push(f.booking);
    }
    for i in 0..4 {
        let mut f = booking(&pool, true).await;
        add_payment(&pool, &mut f, PaymentStatus::Approved).await;
        add_approval(&pool, &mut f, ApprovalStatus::Approved).await;
        events.push((
            Uuid::now_v7(),
            "payment.approved",
            payment_data(&f, "APPROVED"),
            3 - i % 2,
        ));
        events.push((
            Uuid::now_v7(),
            "approval.decided",
            approval_data(&f, "APPROVED"),
            2 + i % 2,
        ));
        bookings.push(f.booking);
    }
    let distinct = events.len() as u64;
    let total: u64 = events.iter().map(|e| e.3 as u64).sum();
    assert!(total > distinct);

    // Before the worker runs: every event, then a second copy of every
    // other one, so that copies wait side by side and are handled at once.
    let mut sent = vec![0usize; events.len()];
    for round in 0..2 {
        for (i, (id, kind, data, _)) in events.iter().enumerate() {
            if round == 0 || i % 2 == 0 {
                publish_event(&ch, *id, kind, data.clone()).await;
                sent[i] += 1;
            }
        }
    }
    let worker = start_settlement(&pool, &vhost.url());
    eventually("the worker is handling messages", || async {
        handled(&worker) >= 1
    })
    .await;
    // While the worker runs: the remaining copies, in reverse order.
    for (i, (id, kind, data, copies)) in events.iter().enumerate().rev() {
        while sent[i] < *copies {
            publish_event(&ch, *id, kind, data.clone()).await;
            sent[i] += 1;
        }
    }
    until_count("every copy handled", total, || async { handled(&worker) }).await;
    // Only lets a stray redelivery surface before counting (one must not
    // come): no progress to wait for.
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(worker.count(CONSUMER, "processed"), distinct);
    assert_eq!(worker.count(CONSUMER, "duplicate"), total - distinct);
    assert_eq!(worker.count(CONSUMER, "retried"), 0);
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 0);

    let n = bookings.len() as i64;
    assert_eq!(scalar(&pool, "SELECT count(*) FROM settlements").await, n);
    for b in &bookings {
        assert_eq!(
            count_where(
                &pool,
                "SELECT count(*) FROM settlements WHERE booking_id = $1",
                *b
            )
            .await,
            1
        );
        assert_eq!(booking_state(&pool, *b).await.0, "CONFIRMED");
        assert_eq!(
            count_where(
                &pool,
                "SELECT count(*) FROM outbox WHERE topic = 'booking.confirmed' AND aggregate_id = $1",
                *b
            )
            .await,
            1
        );
    }
    let by_topic: Vec<(String, i64)> =
        sqlx::query_as("SELECT topic, count(*) FROM outbox GROUP BY topic ORDER BY topic")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        by_topic,
        vec![
            ("booking.confirmed".to_owned(), n),
            ("settlement.recorded".to_owned(), n)
        ]
    );
    // One settlement.recorded per settlement.
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(DISTINCT aggregate_id) FROM outbox WHERE topic = 'settlement.recorded'
               AND aggregate_id IN (SELECT id FROM settlements)"
        )
        .await,
        n
    );
    // One inbox row per distinct message, none for a copy.
    let expected: BTreeSet<String> = events.iter().map(|e| e.0.to_string()).collect();
    assert_eq!(inbox_ids(&pool).await, expected);
    assert_eq!(depth(&ch, SETTLEMENT_QUEUE).await, 0);
    assert_eq!(depth(&ch, &dlq()).await, 0);
    worker.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn payment_approved_before_approval_decided_settles_on_the_approval(pool: PgPool) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    let mut f = booking(&pool, true).await;
    add_payment(&pool, &mut f, PaymentStatus::Approved).await;
    let approval = add_approval(&pool, &mut f, ApprovalStatus::Pending).await;
    let worker = start_settlement(&pool, &vhost.url());

    publish_event(
        &ch,
        Uuid::now_v7(),
        "payment.approved",
        payment_data(&f, "APPROVED"),
    )
    .await;
    wait_processed(&worker, 1).await;
    // Only the payment is approved: not settled yet.
    assert_untouched(&pool, f.booking, "PENDING").await;

    decide_approval(&pool, &f, Decision::Approved).await;
    publish_event(
        &ch,
        Uuid::now_v7(),
        "approval.decided",
        approval_data(&f, "APPROVED"),
    )
    .await;
    wait_processed(&worker, 2).await;
    assert_settled(&pool, &f).await;
    assert_eq!(
        settlement_of(&pool, f.booking).await.unwrap().1,
        Some(approval)
    );
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 0);
    worker.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn approval_decided_before_payment_approved_settles_on_the_payment(pool: PgPool) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    let mut f = booking(&pool, true).await;
    let approval = add_approval(&pool, &mut f, ApprovalStatus::Approved).await;
    let payment = add_payment(&pool, &mut f, PaymentStatus::Pending).await;
    let worker = start_settlement(&pool, &vhost.url());

    publish_event(
        &ch,
        Uuid::now_v7(),
        "approval.decided",
        approval_data(&f, "APPROVED"),
    )
    .await;
    wait_processed(&worker, 1).await;
    // Only the approval is approved: not settled yet.
    assert_untouched(&pool, f.booking, "PENDING").await;

    decide_payment(&pool, payment, PaymentOutcome::Approved).await;
    publish_event(
        &ch,
        Uuid::now_v7(),
        "payment.approved",
        payment_data(&f, "APPROVED"),
    )
    .await;
    wait_processed(&worker, 2).await;
    assert_settled(&pool, &f).await;
    assert_eq!(
        settlement_of(&pool, f.booking).await.unwrap().1,
        Some(approval)
    );
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 0);
    worker.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_rejected_approval_settles_nothing(pool: PgPool) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    let mut f = booking(&pool, true).await;
    add_payment(&pool, &mut f, PaymentStatus::Approved).await;
    add_approval(&pool, &mut f, ApprovalStatus::Rejected).await;
    let worker = start_settlement(&pool, &vhost.url());

    publish_event(
        &ch,
        Uuid::now_v7(),
        "payment.approved",
        payment_data(&f, "APPROVED"),
    )
    .await;
    publish_event(
        &ch,
        Uuid::now_v7(),
        "approval.decided",
        approval_data(&f, "REJECTED"),
    )
    .await;
    wait_processed(&worker, 2).await;
    assert_untouched(&pool, f.booking, "PENDING").await;
    assert_eq!(inbox_ids(&pool).await.len(), 2, "both events were consumed");

    // A new request that is approved settles the booking with that approval.
    let again = add_approval(&pool, &mut f, ApprovalStatus::Approved).await;
    publish_event(
        &ch,
        Uuid::now_v7(),
        "approval.decided",
        approval_data(&f, "APPROVED"),
    )
    .await;
    wait_processed(&worker, 3).await;
    assert_settled(&pool, &f).await;
    assert_eq!(
        settlement_of(&pool, f.booking).await.unwrap().1,
        Some(again)
    );
    worker.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_failed_payment_settles_nothing(pool: PgPool) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    let mut f = booking(&pool, false).await;
    add_payment(&pool, &mut f, PaymentStatus::Failed).await;
    let worker = start_settlement(&pool, &vhost.url());

    publish_event(
        &ch,
        Uuid::now_v7(),
        "payment.failed",
        payment_data(&f, "FAILED"),
    )
    .await;
    wait_processed(&worker, 1).await;
    assert_untouched(&pool, f.booking, "PENDING").await;
    assert_eq!(inbox_ids(&pool).await.len(), 1, "the event was consumed");

    // A new payment that is approved settles the booking with that payment.
    let again = add_payment(&pool, &mut f, PaymentStatus::Approved).await;
    publish_event(
        &ch,
        Uuid::now_v7(),
        "payment.approved",
        payment_data(&f, "APPROVED"),
    )
    .await;
    wait_processed(&worker, 2).await;
    assert_settled(&pool, &f).await;
    assert_eq!(settlement_of(&pool, f.booking).await.unwrap().0, again);
    worker.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_canceled_booking_is_not_settled(pool: PgPool) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    let mut f = booking(&pool, false).await;
    add_payment(&pool, &mut f, PaymentStatus::Approved).await;
    let mut tx = pool.begin().await.unwrap();
    bookings::cancel(
        &mut tx,
        f.booking,
        &Text::parse("Customer request", 200).unwrap(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let worker = start_settlement(&pool, &vhost.url());

    publish_event(
        &ch,
        Uuid::now_v7(),
        "payment.approved",
        payment_data(&f, "APPROVED"),
    )
    .await;
    wait_processed(&worker, 1).await;
    assert_untouched(&pool, f.booking, "CANCELED").await;
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 0);
    worker.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_event_for_an_unknown_booking_is_consumed_without_effect(pool: PgPool) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    let worker = start_settlement(&pool, &vhost.url());
    let id = Uuid::now_v7();
    publish_event(
        &ch,
        id,
        "payment.approved",
        payment_data(
            &Fixture {
                user: Uuid::now_v7(),
                booking: Uuid::now_v7(),
                payment: None,
                approval: None,
            },
            "APPROVED",
        ),
    )
    .await;
    wait_processed(&worker, 1).await;
    assert_eq!(scalar(&pool, "SELECT count(*) FROM settlements").await, 0);
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox").await, 0);
    assert_eq!(inbox_ids(&pool).await, BTreeSet::from([id.to_string()]));
    assert_eq!(depth(&ch, &dlq()).await, 0);
    worker.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn settlement_is_audited_and_announced_as_cloudevents(pool: PgPool) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    let mut f = booking(&pool, true).await;
    add_payment(&pool, &mut f, PaymentStatus::Approved).await;
    add_approval(&pool, &mut f, ApprovalStatus::Approved).await;
    let worker = start_settlement(&pool, &vhost.url());
    publish_event(
        &ch,
        Uuid::now_v7(),
        "approval.decided",
        approval_data(&f, "APPROVED"),
    )
    .await;
    wait_processed(&worker, 1).await;
    assert_settled(&pool, &f).await;
    let settlement: Uuid = sqlx::query_scalar("SELECT id FROM settlements WHERE booking_id = $1")
        .bind(f.booking)
        .fetch_one(&pool)
        .await
        .unwrap();

    // Audit: one row per change, naming the event it announced.
    let audit: Vec<(String, String, String, Uuid, Option<Uuid>, Value)> = sqlx::query_as(
        "SELECT actor, action, entity_type, entity_id, event_id, detail FROM audit_log
          WHERE actor = 'worker:settlement' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(audit.len(), 2, "{audit:?}");
    let by_action: BTreeMap<&str, _> = audit.iter().map(|a| (a.1.as_str(), a)).collect();
    let rec = by_action["settlement.record"];
    assert_eq!((rec.2.as_str(), rec.3), ("settlement", settlement));
    assert_eq!(rec.5["bookingId"], json!(f.booking));
    assert_eq!(rec.5["paymentId"], json!(f.payment.unwrap()));
    let conf = by_action["booking.confirm"];
    assert_eq!((conf.2.as_str(), conf.3), ("booking", f.booking));
    assert_eq!(conf.5["from"], "PENDING");
    assert_eq!(conf.5["to"], "CONFIRMED");
    assert_eq!(conf.5["settlementId"], json!(settlement));

    // Outbox: CloudEvents 1.0 from /entrip/workers, not yet published.
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "SELECT id, topic, aggregate_type, aggregate_id, payload, published_at FROM outbox ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    let by_topic: BTreeMap<&str, _> = rows.iter().map(|r| (r.1.as_str(), r)).collect();
    for (topic, aggregate, aggregate_id, audit_row) in [
        ("settlement.recorded", "settlement", settlement, rec),
        ("booking.confirmed", "booking", f.booking, conf),
    ] {
        let (id, _, agg_type, agg_id, payload, published_at) = by_topic[topic];
        assert_eq!((agg_type.as_str(), *agg_id), (aggregate, aggregate_id));
        assert_eq!(*published_at, None);
        assert_eq!(audit_row.4, Some(*id), "the audit row names the event");
        assert_eq!(payload["specversion"], "1.0");
        assert_eq!(payload["id"], json!(id));
        assert_eq!(payload["source"], "/entrip/workers");
        assert_eq!(payload["type"], topic);
        assert_eq!(payload["subject"], json!(aggregate_id.to_string()));
        assert_eq!(payload["datacontenttype"], "application/json");
        let time = payload["time"].as_str().expect("time is a string");
        DateTime::parse_from_rfc3339(time).expect("time is RFC 3339");
    }
    let data = &by_topic["settlement.recorded"].4["data"];
    assert_eq!(data["id"], json!(settlement));
    assert_eq!(data["bookingId"], json!(f.booking));
    assert_eq!(data["paymentId"], json!(f.payment.unwrap()));
    assert_eq!(data["approvalId"], json!(f.approval.unwrap()));
    assert_eq!(data["gross"], "350000");
    assert_eq!(data["tax"], "31818");
    assert_eq!(data["net"], "318182");
    assert_eq!(data["currency"], "KRW");
    let data = &by_topic["booking.confirmed"].4["data"];
    assert_eq!(data["id"], json!(f.booking));
    assert_eq!(data["status"], "CONFIRMED");
    assert!(data["confirmedAt"].is_string(), "{data}");
    assert_eq!(data["amount"], "350000");
    worker.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn poison_messages_are_dead_lettered_with_the_reason_and_the_consumer_keeps_going(
    pool: PgPool,
) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    // `good` is settled by the last, valid message; `bait` would be settled
    // if any poison message naming it were processed.
    let mut good = booking(&pool, false).await;
    add_payment(&pool, &mut good, PaymentStatus::Approved).await;
    let mut bait = booking(&pool, false).await;
    add_payment(&pool, &mut bait, PaymentStatus::Approved).await;
    let worker = start_settlement(&pool, &vhost.url());

    let envelope =
        |id: Value, kind: &str, data: Value| cloud_event(id, kind, &data).to_string().into_bytes();
    let bait_data = payment_data(&bait, "APPROVED");
    let no_id = {
        let mut v: Value = serde_json::from_slice(&envelope(
            json!(null),
            "payment.approved",
            bait_data.clone(),
        ))
        .unwrap();
        v.as_object_mut().unwrap().remove("id");
        v.to_string().into_bytes()
    };
    let no_type = {
        let mut v: Value = serde_json::from_slice(&envelope(
            json!(Uuid::now_v7()),
            "payment.approved",
            bait_data.clone(),
        ))
        .unwrap();
        v.as_object_mut().unwrap().remove("type");
        v.to_string().into_bytes()
    };
    // (message id, routing key, type property, body, expected reason)
    let cases: Vec<PoisonCase> = vec![
        (
            "poison-not-json",
            "payment.approved",
            Some("payment.approved"),
            b"{this is not json".to_vec(),
            "not a CloudEvents JSON object",
        ),
        (
            "poison-not-an-object",
            "payment.approved",
            Some("payment.approved"),
            b"[1, 2, 3]".to_vec(),
            "not a CloudEvents JSON object",
        ),
        (
            "poison-no-id",
            "payment.approved",
            Some("payment.approved"),
            no_id,
            "missing field `id`",
        ),
        (
            "poison-no-type",
            "payment.approved",
            None,
            no_type,
            "missing field `type`",
        ),
        (
            "poison-id-not-uuid",
            "payment.approved",
            Some("payment.approved"),
            envelope(json!("not-a-uuid"), "payment.approved", bait_data.clone()),
            "not a CloudEvents JSON object",
        ),
        (
            "poison-unknown-type",
            "payment.approved",
            Some("weird.event"),
            envelope(json!(Uuid::now_v7()), "weird.event", bait_data.clone()),
            "unknown event type weird.event",
        ),
        (
            "poison-no-booking",
            "payment.approved",
            Some("payment.approved"),
            envelope(
                json!(Uuid::now_v7()),
                "payment.approved",
                json!({"id": bait.payment, "status": "APPROVED"}),
            ),
            "payment.approved: data is not the payment view of the type: missing field",
        ),
        (
            "poison-booking-not-uuid",
            "approval.decided",
            Some("approval.decided"),
            envelope(
                json!(Uuid::now_v7()),
                "approval.decided",
                json!({"id": Uuid::now_v7(), "bookingId": "BK-1234", "status": "APPROVED"}),
            ),
            "approval.decided: data is not the approval view of the type",
        ),
        (
            "poison-type-mismatch",
            "payment.approved",
            Some("payment.failed"),
            envelope(json!(Uuid::now_v7()), "payment.approved", bait_data.clone()),
            "type property payment.failed differs from the body's payment.approved",
        ),
    ];
    for (id, key, kind, body, _) in &cases {
        publish_raw(&ch, amqp::EVENTS_EXCHANGE, key, Some(id), *kind, body).await;
    }
    let good_event = Uuid::now_v7();
    publish_event(
        &ch,
        good_event,
        "payment.approved",
        payment_data(&good, "APPROVED"),
    )
    .await;

    let poison = cases.len() as u64;
    progress("every message handled", || async {
        let dead = worker.count(CONSUMER, "dead_lettered");
        let processed = worker.count(CONSUMER, "processed");
        ((dead, processed), dead >= poison && processed >= 1)
    })
    .await;
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), poison);
    assert_eq!(worker.count(CONSUMER, "processed"), 1);
    assert_eq!(worker.count(CONSUMER, "retried"), 0);

    // The good message after the poison ones was processed.
    assert_settled(&pool, &good).await;
    // No poison message had an effect.
    assert_eq!(settlement_of(&pool, bait.booking).await, None);
    assert_eq!(booking_state(&pool, bait.booking).await.0, "PENDING");
    assert_eq!(
        inbox_ids(&pool).await,
        BTreeSet::from([good_event.to_string()])
    );

    // Each poison message is in the DLQ, intact, with its reason.
    let dead = drain(&ch, &dlq()).await;
    assert_eq!(dead.len(), cases.len(), "{dead:?}");
    for (id, _, kind, body, reason) in &cases {
        let got = dead
            .iter()
            .find(|d| d.message_id.as_deref() == Some(*id))
            .unwrap_or_else(|| panic!("{id} is in the DLQ: {dead:?}"));
        let error = got.error.as_deref().unwrap_or_else(|| {
            panic!("{id} carries {ERROR_HEADER}: {got:?}");
        });
        assert!(error.contains(reason), "{id}: {error:?} names {reason:?}");
        assert_eq!(&got.body, body, "{id}: the body is kept");
        assert_eq!(got.kind.as_deref(), *kind, "{id}: the type is kept");
        assert_eq!(got.attempt, Some(0), "{id}: poison is not retried");
    }
    assert_eq!(depth(&ch, SETTLEMENT_QUEUE).await, 0);
    worker.stop().await;
}

/// A booking with an approved payment, and settling it fails until the
/// test renames `settlements_x` back to `settlements`: a transient failure.
async fn unsettleable_booking(pool: &PgPool) -> Fixture {
    let mut f = booking(pool, false).await;
    add_payment(pool, &mut f, PaymentStatus::Approved).await;
    sqlx::query("ALTER TABLE settlements RENAME TO settlements_x")
        .execute(pool)
        .await
        .unwrap();
    f
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_transient_failure_is_retried_and_settles_once(pool: PgPool) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    let f = unsettleable_booking(&pool).await;
    // Retries go 200 ms, then 400 ms apart (support); many more of them
    // than support's 3 leave a busy machine time (about 8 s) to heal before
    // the DLQ. The test heals after the first, so they cost nothing.
    let max_retries = 20;
    let worker = start(
        Settlement::new(pool.clone()),
        &vhost.url(),
        WorkersSettings {
            max_retries,
            ..workers_settings()
        },
    );
    let event = Uuid::now_v7();
    publish_event(&ch, event, "payment.approved", payment_data(&f, "APPROVED")).await;

    // Heal right after the first retry.
    eventually("a first retry", || async {
        worker.count(CONSUMER, "retried") >= 1
    })
    .await;
    assert_eq!(worker.count(CONSUMER, "processed"), 0);
    assert_eq!(booking_state(&pool, f.booking).await.0, "PENDING");
    assert_eq!(
        inbox_ids(&pool).await.len(),
        0,
        "a failed attempt leaves no inbox row"
    );
    sqlx::query("ALTER TABLE settlements_x RENAME TO settlements")
        .execute(&pool)
        .await
        .unwrap();

    wait_processed(&worker, 1).await;
    // Only lets a stray copy surface (one must not come): no progress to
    // wait for. Above the longest retry delay.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(worker.count(CONSUMER, "processed"), 1);
    assert_eq!(worker.count(CONSUMER, "duplicate"), 0);
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 0);
    let retried = worker.count(CONSUMER, "retried");
    assert!(
        (1..=u64::from(max_retries)).contains(&retried),
        "retried {retried} times within max_retries"
    );
    assert_settled(&pool, &f).await;
    assert_eq!(scalar(&pool, "SELECT count(*) FROM settlements").await, 1);
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox").await, 2);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM audit_log WHERE actor = 'worker:settlement'"
        )
        .await,
        2
    );
    assert_eq!(inbox_ids(&pool).await, BTreeSet::from([event.to_string()]));
    assert_eq!(depth(&ch, SETTLEMENT_QUEUE).await, 0);
    assert_eq!(depth(&ch, &dlq()).await, 0);
    for delay in RETRY_DELAYS_MS {
        assert_eq!(
            depth(&ch, &amqp::retry_queue_name(SETTLEMENT_QUEUE, delay)).await,
            0
        );
    }
    worker.stop().await;
}

/// An event on its retry path is the contract's `forwardedEvent`: the body
/// and properties as published, with the attempt and the reason. A retry
/// delay far longer than the test keeps it in the retry queue to look at.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_event_on_its_retry_path_is_as_the_contract_says(pool: PgPool) {
    const DELAY_MS: u64 = 600_000;
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    let f = unsettleable_booking(&pool).await;
    let worker = start_with(
        Settlement::new(pool.clone()),
        AmqpSettings {
            retry_delays_ms: vec![DELAY_MS],
            ..amqp_settings(&vhost.url())
        },
        workers_settings(),
    );
    let event = Uuid::now_v7();
    let data = payment_data(&f, "APPROVED");
    publish_event(&ch, event, "payment.approved", data.clone()).await;
    eventually("a first retry", || async {
        worker.count(CONSUMER, "retried") >= 1
    })
    .await;
    let queue = amqp::retry_queue_name(SETTLEMENT_QUEUE, DELAY_MS);
    let got = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the event waits in its retry queue");
    let msg = AmqpMessage::of(&got.delivery);
    assert_eq!(contract().assert_from_queue(&queue, &msg), "forwardedEvent");
    let body: Value = serde_json::from_slice(&got.delivery.data).unwrap();
    assert_eq!(body, cloud_event(json!(event), "payment.approved", &data));
    assert_eq!(msg.properties["message_id"], event.to_string());
    assert_eq!(msg.properties["type"], "payment.approved");
    assert_eq!(msg.headers[ATTEMPT_HEADER], 1);
    let error = msg.headers[ERROR_HEADER].as_str().unwrap_or_default();
    assert!(error.contains("settlements"), "the reason: {error:?}");
    worker.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_failure_that_never_heals_is_dead_lettered_after_max_retries(pool: PgPool) {
    let vhost = Vhost::new();
    let (_conn, ch) = channel(&vhost.url()).await;
    let f = unsettleable_booking(&pool).await;
    let worker = start_settlement(&pool, &vhost.url());
    let event = Uuid::now_v7();
    publish_event(&ch, event, "payment.approved", payment_data(&f, "APPROVED")).await;

    eventually("the message dead-lettered", || async {
        worker.count(CONSUMER, "dead_lettered") >= 1
    })
    .await;
    let max_retries = u64::from(workers_settings().max_retries);
    assert_eq!(max_retries, 3);
    assert_eq!(worker.count(CONSUMER, "retried"), max_retries);
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 1);
    assert_eq!(worker.count(CONSUMER, "processed"), 0);

    let dead = drain(&ch, &dlq()).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let got = &dead[0];
    assert_eq!(got.message_id.as_deref(), Some(event.to_string().as_str()));
    assert_eq!(got.kind.as_deref(), Some("payment.approved"));
    assert_eq!(got.attempt, Some(i64::from(workers_settings().max_retries)));
    let error = got.error.as_deref().expect("the reason is in the header");
    assert!(
        error.contains("settlements") && error.contains("does not exist"),
        "{ERROR_HEADER} names the error: {error:?}"
    );
    let body: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["id"], json!(event));

    sqlx::query("ALTER TABLE settlements_x RENAME TO settlements")
        .execute(&pool)
        .await
        .unwrap();
    assert_untouched(&pool, f.booking, "PENDING").await;
    assert!(inbox_ids(&pool).await.is_empty());
    assert_eq!(depth(&ch, SETTLEMENT_QUEUE).await, 0);
    worker.stop().await;
}
