//! Workers test support: state written as ingest would write it, consumers
//! running in-process against a test's own database and RabbitMQ vhost,
//! publishing events, and polling helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use entrip_common::{
    amqp,
    config::{AmqpSettings, NotificationsSettings, WorkersSettings},
};
use entrip_workers::{
    metrics::WorkerMetrics,
    notifications::Notifications,
    runtime::{Consumer, Handler},
    settlement::Settlement,
};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Short retry delays so that retries happen within a test.
pub fn amqp_settings(url: &str) -> AmqpSettings {
    AmqpSettings {
        url: url.to_owned(),
        retry_delays_ms: vec![200, 400],
        delivery_limit: 5,
    }
}

pub fn workers_settings() -> WorkersSettings {
    WorkersSettings {
        max_retries: 3,
        ..WorkersSettings::default()
    }
}

/// A consumer running in this process.
pub struct Running {
    pub token: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
    pub metrics: WorkerMetrics,
}

impl Running {
    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("the consumer stops")
            .unwrap();
    }

    /// `entrip_worker_messages_total{consumer, outcome}`.
    pub fn count(&self, consumer: &str, outcome: &str) -> u64 {
        self.metrics
            .messages
            .with_label_values(&[consumer, outcome])
            .get()
    }
}

pub fn start<H: Handler>(handler: H, url: &str, settings: WorkersSettings) -> Running {
    let metrics = WorkerMetrics::register(&prometheus::Registry::new()).unwrap();
    let consumer = Consumer {
        handler: Arc::new(handler),
        amqp: amqp_settings(url),
        settings,
        metrics: metrics.clone(),
    };
    let token = CancellationToken::new();
    let handle = tokio::spawn(consumer.run(token.clone()));
    Running {
        token,
        handle,
        metrics,
    }
}

pub fn start_settlement(pool: &PgPool, url: &str) -> Running {
    start(Settlement { pool: pool.clone() }, url, workers_settings())
}

pub fn start_notifications(pool: &PgPool, url: &str, settings: &NotificationsSettings) -> Running {
    start(
        Notifications::new(pool.clone(), settings).unwrap(),
        url,
        workers_settings(),
    )
}

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

/// Publishes a CloudEvent to `entrip.events` as the dispatcher would.
pub async fn publish_event(ch: &Channel, id: Uuid, kind: &str, data: Value) {
    let body = json!({
        "specversion": "1.0", "id": id, "source": "/entrip/ingest", "type": kind,
        "subject": data["id"], "time": "2026-11-26T00:00:00Z",
        "datacontenttype": "application/json", "data": data,
    });
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

#[allow(unused_imports)]
pub use entrip_testkit::eventually;

pub async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The state ingest would have stored: a user and a booking (KRW 350000),
/// with a payment (tax 31818) and an approval when asked. Returns the ids.
pub struct Fixture {
    pub user: Uuid,
    pub booking: Uuid,
    pub payment: Option<Uuid>,
    pub approval: Option<Uuid>,
}

pub async fn booking(pool: &PgPool, requires_approval: bool) -> Fixture {
    let user = Uuid::now_v7();
    let booking = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO users (id, name, email, phone) VALUES ($1, 'Kim', $2, '010 1234 5678')",
    )
    .bind(user)
    .bind(format!("{}@example.com", user.simple()))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO bookings (id, code, user_id, customer_name, customer_phone, itinerary_from, itinerary_to,
                               depart_at, arrive_at, currency, amount, requires_approval)
         VALUES ($1, $2, $3, 'Kim', '010 1234 5678', 'ICN', 'NRT',
                 '2026-12-24T00:30:00Z', '2026-12-24T02:45:00Z', 'KRW', 350000, $4)",
    )
    .bind(booking)
    .bind(format!("BK-{}", &booking.simple().to_string()[20..]).to_uppercase())
    .bind(user)
    .bind(requires_approval)
    .execute(pool)
    .await
    .unwrap();
    for (entity, id) in [("user", user), ("booking", booking)] {
        sqlx::query("INSERT INTO audit_log (actor, action, entity_type, entity_id) VALUES ('test', 'create', $1, $2)")
            .bind(entity)
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    }
    Fixture {
        user,
        booking,
        payment: None,
        approval: None,
    }
}

/// Adds a payment in `status` (PENDING, APPROVED or FAILED).
pub async fn add_payment(pool: &PgPool, f: &mut Fixture, status: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO payments (id, booking_id, method, amount, tax, currency, status, approval_id, decided_at)
         VALUES ($1, $2, 'CARD', 350000, 31818, 'KRW', $3,
                 CASE WHEN $3 = 'APPROVED' THEN 'PG-1' END, CASE WHEN $3 <> 'PENDING' THEN now() END)",
    )
    .bind(id)
    .bind(f.booking)
    .bind(status)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO audit_log (actor, action, entity_type, entity_id) VALUES ('test', 'create', 'payment', $1)")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    f.payment = Some(id);
    id
}

/// Adds an approval in `status` (PENDING, APPROVED or REJECTED).
pub async fn add_approval(pool: &PgPool, f: &mut Fixture, status: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO approvals (id, booking_id, requester_id, title, reason, status, decided_at)
         VALUES ($1, $2, $3, 'Trip', 'Meeting', $4, CASE WHEN $4 <> 'PENDING' THEN now() END)",
    )
    .bind(id)
    .bind(f.booking)
    .bind(f.user)
    .bind(status)
    .execute(pool)
    .await
    .unwrap();
    f.approval = Some(id);
    id
}

/// The `data` of a payment event for this fixture.
pub fn payment_data(f: &Fixture, status: &str) -> Value {
    json!({"id": f.payment, "bookingId": f.booking, "status": status})
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

/// The `data` of an approval.decided event for this fixture.
pub fn approval_data(f: &Fixture, status: &str) -> Value {
    json!({"id": f.approval, "bookingId": f.booking, "status": status})
}
