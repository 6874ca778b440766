//! Workers test support: valid state written through the store's own
//! functions (as ingest writes it), consumers running in-process against a
//! test's own database and RabbitMQ vhost, and events published as the
//! dispatcher publishes them.

use chrono::{DateTime, Utc};
use entrip_common::{
    amqp,
    audit::{self, AuditEntry},
    config::{AmqpSettings, NotificationsSettings, WorkersSettings},
    domain::{
        AggregateType, ApprovalStatus, BookingCode, Currency, Decision, Email, Money,
        PaymentMethod, PaymentOutcome, PaymentStatus, Phone, Text,
    },
    metrics::new_registry,
    store::{
        approvals::{self, NewApproval},
        bookings::{self, NewBooking},
        payments::{self, NewPayment},
        users::{self, NewUser},
    },
    views::{ApprovalView, PaymentView},
};
use entrip_testkit::{STALL, progress};
use entrip_workers::{
    metrics::WorkerMetrics,
    notifications::Notifications,
    runtime::{Consumer, Handler},
    settlement::Settlement,
};
use futures::{StreamExt, stream};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The retry path's delays in every test: short, so that retries happen
/// within a test. Services started as processes get the same (the queues'
/// arguments must agree).
pub const RETRY_DELAYS_MS: [u64; 2] = [200, 400];

/// `x-delivery-limit` of the worker queues in every test.
pub const DELIVERY_LIMIT: u32 = 5;

pub fn amqp_settings(url: &str) -> AmqpSettings {
    AmqpSettings {
        url: url.to_owned(),
        retry_delays_ms: RETRY_DELAYS_MS.to_vec(),
        delivery_limit: DELIVERY_LIMIT,
        ..AmqpSettings::default()
    }
}

pub fn workers_settings() -> WorkersSettings {
    WorkersSettings {
        max_retries: 3,
        ..WorkersSettings::default()
    }
}

// ------------------------------------------------------------ consumers

/// A consumer running in this process.
pub struct Running {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    metrics: WorkerMetrics,
}

impl Running {
    /// Shuts the consumer down and waits until it stopped.
    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(STALL, self.handle)
            .await
            .expect("the consumer stops")
            .unwrap();
    }

    /// `entrip_worker_messages_total{consumer, outcome}`.
    pub fn count(&self, consumer: &str, outcome: &str) -> u64 {
        self.metrics.messages_total(consumer, outcome)
    }
}

pub fn start<H: Handler>(handler: H, url: &str, settings: WorkersSettings) -> Running {
    start_with(handler, amqp_settings(url), settings)
}

/// [`start`] with broker settings of the test's own (other retry delays).
pub fn start_with<H: Handler>(
    handler: H,
    broker: AmqpSettings,
    settings: WorkersSettings,
) -> Running {
    let metrics = WorkerMetrics::register(&new_registry()).unwrap();
    let consumer = Consumer::new(handler, broker, settings.consumer(), metrics.consumer());
    let token = CancellationToken::new();
    let handle = tokio::spawn(consumer.run(token.clone()));
    Running {
        token,
        handle,
        metrics,
    }
}

pub fn start_settlement(pool: &PgPool, url: &str) -> Running {
    start(Settlement::new(pool.clone()), url, workers_settings())
}

pub fn start_notifications(pool: &PgPool, url: &str, settings: &NotificationsSettings) -> Running {
    start(
        Notifications::new(pool.clone(), settings).unwrap(),
        url,
        workers_settings(),
    )
}

// --------------------------------------------------------------- broker

/// A confirm-mode channel on the vhost with the topology declared.
pub async fn channel(url: &str) -> (Connection, Channel) {
    let conn = amqp::connect(url, "test-publisher").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    amqp::declare_topology(&ch, &amqp_settings(url))
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

/// A CloudEvents envelope as the dispatcher publishes it; `id` is any JSON
/// so that poison messages can carry a broken one.
pub fn cloud_event(id: Value, kind: &str, data: &Value) -> Value {
    json!({
        "specversion": "1.0", "id": id, "source": "/entrip/ingest", "type": kind,
        "subject": data["id"], "time": "2026-11-26T00:00:00Z",
        "datacontenttype": "application/json", "data": data,
    })
}

/// Publishes a CloudEvent to `entrip.events` as the dispatcher would.
pub async fn publish_event(ch: &Channel, id: Uuid, kind: &str, data: Value) {
    let body = cloud_event(json!(id), kind, &data);
    publish_raw(
        ch,
        amqp::EVENTS_EXCHANGE,
        kind,
        Some(&id.to_string()),
        Some(kind),
        body.to_string().as_bytes(),
    )
    .await;
}

/// Publishes any bytes, for poison messages.
pub async fn publish_raw(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    message_id: Option<&str>,
    kind: Option<&str>,
    body: &[u8],
) {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/cloudevents+json".into());
    if let Some(id) = message_id {
        props = props.with_message_id(id.into());
    }
    if let Some(k) = kind {
        props = props.with_type(k.into());
    }
    let c = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(c, Confirmation::Ack(None));
}

/// A header of a message read back from a queue.
pub fn header(props: &BasicProperties, name: &str) -> Option<AMQPValue> {
    props
        .headers()
        .as_ref()?
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .map(|(_, v)| v.clone())
}

/// Messages waiting in a queue.
pub async fn depth(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// Waits until `count()` reaches `target`: fails only when the count stands
/// still for `entrip_testkit::STALL`, so a slow machine passes and a stuck
/// consumer fails.
pub async fn until_count<T, F, Fut>(what: &str, target: T, mut count: F)
where
    T: PartialOrd + Copy + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    progress(what, || {
        let now = count();
        async move {
            let n = now.await;
            (n, n >= target)
        }
    })
    .await;
}

/// A count from SQL.
pub async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

// ------------------------------------------------------------- fixtures

/// The state ingest would have stored, written through the store: a user
/// and a booking (KRW 350000), with a payment (tax 31818) and an approval
/// when added. The ids.
pub struct Fixture {
    pub user: Uuid,
    pub booking: Uuid,
    pub payment: Option<Uuid>,
    pub approval: Option<Uuid>,
}

fn text(s: &str) -> Text {
    Text::parse(s, 200).unwrap()
}

fn krw(amount: &str) -> Money {
    Money::parse_non_negative(amount, Currency::KRW).unwrap()
}

fn at(time: &str) -> DateTime<Utc> {
    time.parse().unwrap()
}

/// The audit row of a change made by the test's upstream.
pub async fn audited(conn: &mut PgConnection, action: &str, entity_type: AggregateType, id: Uuid) {
    audit::record(
        conn,
        &AuditEntry {
            actor: "test",
            action,
            entity_type,
            entity_id: id,
            detail: json!({}),
            idempotency_key: None,
            event_id: None,
        },
    )
    .await
    .unwrap();
}

/// A user and a PENDING booking of theirs, with their audit rows.
pub async fn booking(pool: &PgPool, requires_approval: bool) -> Fixture {
    let mut tx = pool.begin().await.unwrap();
    let f = insert_booking(&mut tx, requires_approval).await;
    tx.commit().await.unwrap();
    f
}

/// `n` bookings without approval, each with an APPROVED payment: one
/// transaction each, a few at a time.
pub async fn approved_bookings(pool: &PgPool, n: usize) -> Vec<Fixture> {
    stream::iter(0..n)
        .map(|_| async {
            let mut tx = pool.begin().await.unwrap();
            let mut f = insert_booking(&mut tx, false).await;
            insert_payment(&mut tx, &mut f, PaymentStatus::Approved).await;
            tx.commit().await.unwrap();
            f
        })
        .buffered(8)
        .collect()
        .await
}

async fn insert_booking(conn: &mut PgConnection, requires_approval: bool) -> Fixture {
    let user = Uuid::now_v7();
    users::insert(
        conn,
        user,
        &NewUser {
            name: text("Kim"),
            email: Email::parse(&format!("{}@example.com", user.simple())).unwrap(),
            phone: Phone::parse("010 1234 5678").unwrap(),
        },
    )
    .await
    .unwrap();
    audited(conn, "user.create", AggregateType::User, user).await;
    let booking = Uuid::now_v7();
    // The random end of the UUIDv7: unique within a test.
    let code = format!("BK-{}", &booking.simple().to_string()[20..]).to_uppercase();
    bookings::insert(
        conn,
        booking,
        &NewBooking {
            code: BookingCode::parse(&code).unwrap(),
            user_id: user,
            customer_name: text("Kim"),
            customer_phone: Phone::parse("010 1234 5678").unwrap(),
            itinerary_from: text("ICN"),
            itinerary_to: text("NRT"),
            depart_at: at("2026-12-24T00:30:00Z"),
            arrive_at: at("2026-12-24T02:45:00Z"),
            price: krw("350000"),
            requires_approval,
        },
    )
    .await
    .unwrap();
    audited(conn, "booking.create", AggregateType::Booking, booking).await;
    Fixture {
        user,
        booking,
        payment: None,
        approval: None,
    }
}

/// Adds a payment of the booking's amount (tax 31818) and takes it to
/// `status`; it becomes the fixture's payment.
pub async fn add_payment(pool: &PgPool, f: &mut Fixture, status: PaymentStatus) -> Uuid {
    let mut tx = pool.begin().await.unwrap();
    let id = insert_payment(&mut tx, f, status).await;
    tx.commit().await.unwrap();
    id
}

async fn insert_payment(conn: &mut PgConnection, f: &mut Fixture, status: PaymentStatus) -> Uuid {
    let id = Uuid::now_v7();
    payments::insert(
        conn,
        id,
        &NewPayment {
            booking_id: f.booking,
            method: PaymentMethod::Card,
            amount: krw("350000"),
            tax: krw("31818"),
        },
    )
    .await
    .unwrap();
    audited(conn, "payment.create", AggregateType::Payment, id).await;
    match status {
        PaymentStatus::Pending => {}
        PaymentStatus::Approved => payment_result(conn, id, PaymentOutcome::Approved).await,
        PaymentStatus::Failed => payment_result(conn, id, PaymentOutcome::Failed).await,
    }
    f.payment = Some(id);
    id
}

/// The payment gateway's result for a PENDING payment.
pub async fn decide_payment(pool: &PgPool, payment: Uuid, outcome: PaymentOutcome) {
    let mut tx = pool.begin().await.unwrap();
    payment_result(&mut tx, payment, outcome).await;
    tx.commit().await.unwrap();
}

async fn payment_result(conn: &mut PgConnection, payment: Uuid, outcome: PaymentOutcome) {
    let (approval_id, reason) = match outcome {
        PaymentOutcome::Approved => (Some("PG-1"), None),
        PaymentOutcome::Failed => (None, Some("card declined")),
    };
    payments::decide(conn, payment, outcome, approval_id, reason)
        .await
        .unwrap();
    audited(conn, "payment.result", AggregateType::Payment, payment).await;
}

/// Adds a one-step approval requested by the fixture's user and takes it
/// to `status`; it becomes the fixture's approval.
pub async fn add_approval(pool: &PgPool, f: &mut Fixture, status: ApprovalStatus) -> Uuid {
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await.unwrap();
    approvals::insert(
        &mut tx,
        id,
        &NewApproval {
            booking_id: f.booking,
            requester_id: f.user,
            title: text("Trip"),
            reason: text("Meeting"),
            steps: 1,
        },
    )
    .await
    .unwrap();
    audited(&mut tx, "approval.create", AggregateType::Approval, id).await;
    f.approval = Some(id);
    match status {
        ApprovalStatus::Pending => {}
        ApprovalStatus::Approved => approval_decision(&mut tx, f, Decision::Approved).await,
        ApprovalStatus::Rejected => approval_decision(&mut tx, f, Decision::Rejected).await,
    }
    tx.commit().await.unwrap();
    id
}

/// The fixture's user decides the fixture's (one-step) approval.
pub async fn decide_approval(pool: &PgPool, f: &Fixture, decision: Decision) {
    let mut tx = pool.begin().await.unwrap();
    approval_decision(&mut tx, f, decision).await;
    tx.commit().await.unwrap();
}

async fn approval_decision(conn: &mut PgConnection, f: &Fixture, decision: Decision) {
    let id = f.approval.expect("the fixture has an approval");
    let approval = approvals::lock(conn, id).await.unwrap().unwrap();
    approvals::decide(conn, &approval, f.user, decision, None)
        .await
        .unwrap();
    audited(conn, "approval.decide", AggregateType::Approval, id).await;
}

/// The `data` of a payment event for this fixture: a whole payment view, as
/// ingest emits it (the worker reads it as one).
pub fn payment_data(f: &Fixture, status: &str) -> Value {
    let now = Utc::now();
    let status = PaymentStatus::parse(status).unwrap();
    serde_json::to_value(PaymentView {
        id: f.payment.unwrap_or_else(Uuid::now_v7),
        booking_id: f.booking,
        method: PaymentMethod::Card,
        amount: "350000".into(),
        tax: "0".into(),
        currency: Currency::KRW,
        status,
        approval_id: (status == PaymentStatus::Approved).then(|| "PG-1".into()),
        reason: None,
        decided_at: (status != PaymentStatus::Pending).then_some(now),
        created_at: now,
        updated_at: now,
    })
    .unwrap()
}

/// One `payment.approved` event, with a fresh event id, per fixture.
pub async fn publish_approved<'a>(ch: &Channel, fixtures: impl IntoIterator<Item = &'a Fixture>) {
    for f in fixtures {
        publish_event(
            ch,
            Uuid::now_v7(),
            "payment.approved",
            payment_data(f, "APPROVED"),
        )
        .await;
    }
}

/// The `data` of an approval.decided event for this fixture: a whole
/// approval view, as ingest emits it.
pub fn approval_data(f: &Fixture, status: &str) -> Value {
    let now = Utc::now();
    let status = ApprovalStatus::parse(status).unwrap();
    serde_json::to_value(ApprovalView {
        id: f.approval.unwrap_or_else(Uuid::now_v7),
        booking_id: f.booking,
        requester_id: f.user,
        title: "Trip".into(),
        reason: "Meeting".into(),
        steps: 1,
        current_step: 1,
        status,
        decisions: Vec::new(),
        decided_at: (status != ApprovalStatus::Pending).then_some(now),
        created_at: now,
        updated_at: now,
    })
    .unwrap()
}
