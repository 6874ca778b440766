//! The notifications consumer through the real broker and real HTTP: signed
//! webhooks reach exactly the subscribers whose topic patterns match, each
//! (event, subscriber) is delivered once however often the event arrives,
//! failing or hanging receivers are retried and finally dead-lettered (and
//! counted as undelivered), and poison messages go to the DLQ at once.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode},
};
use entrip_common::{
    amqp::{self, ERROR_HEADER, NOTIFICATIONS_QUEUE},
    config::{NotificationsSettings, WebhookSettings},
    signing::{decode_secret, verify},
};
use entrip_testkit::{
    Vhost,
    asyncapi::{AmqpMessage, contract},
    eventually, progress,
};
use entrip_workers::notifications::{CONSUMER, deliveries};
use lapin::{Channel, options::BasicGetOptions, types::AMQPValue};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The client timeout of every test: ten times the slow receiver's delay,
/// so that a busy machine does not turn an answer into a timeout; a
/// hanging receiver waits far longer.
const TIMEOUT_MS: u64 = 1000;

// ---------------------------------------------------------------------------
// A webhook receiver in the test process.

/// How a receiver answers.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// 200 at once.
    Ok,
    /// 200 after a while (shorter than the client timeout).
    Slow(Duration),
    /// 500 for the first N requests, then 200.
    FailFirst(usize),
    /// 500 always.
    AlwaysFail,
    /// No answer for much longer than the client timeout.
    Hang,
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Recorded {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    /// Unix seconds when it arrived.
    received_at: i64,
    /// What the receiver answered in time (`None`: it hung).
    status: Option<u16>,
}

impl Recorded {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name} missing in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    fn is_for(&self, event: Uuid) -> bool {
        self.headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == event.to_string())
    }

    fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

struct ReceiverState {
    mode: Mode,
    requests: Mutex<Vec<Recorded>>,
}

struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ReceiverState {
            mode,
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(receive).with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url: format!("http://{addr}/hooks"),
            state,
            task,
        }
    }

    fn hook(&self, topics: &[&str]) -> WebhookSettings {
        WebhookSettings {
            url: self.url.clone(),
            secret: SECRET.into(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Requests carrying this event (`webhook-id`).
    fn requests_for(&self, event: Uuid) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_for(event))
            .collect()
    }

    /// Requests of this event that the receiver answered with a 2xx.
    fn delivered(&self, event: Uuid) -> usize {
        self.requests_for(event)
            .iter()
            .filter(|r| r.succeeded())
            .count()
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let (status, delay) = {
        let mut requests = state.requests.lock().unwrap();
        let (status, delay) = match state.mode {
            Mode::Ok => (Some(200), Duration::ZERO),
            Mode::Slow(d) => (Some(200), d),
            Mode::FailFirst(n) if requests.len() < n => (Some(500), Duration::ZERO),
            Mode::FailFirst(_) => (Some(200), Duration::ZERO),
            Mode::AlwaysFail => (Some(500), Duration::ZERO),
            Mode::Hang => (None, Duration::from_secs(60)),
        };
        requests.push(Recorded {
            method,
            path: uri.path().to_owned(),
            headers,
            body,
            received_at: unix_now(),
            status,
        });
        (status, delay)
    };
    tokio::time::sleep(delay).await;
    StatusCode::from_u16(status.unwrap_or(200)).unwrap()
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------
// Helpers.

fn settings(hooks: Vec<WebhookSettings>) -> NotificationsSettings {
    NotificationsSettings {
        webhooks: hooks,
        timeout_ms: TIMEOUT_MS,
    }
}

fn dlq() -> String {
    amqp::dlq_name(NOTIFICATIONS_QUEUE)
}

/// A CloudEvent as the dispatcher would publish it, pretty-printed so that
/// a receiver getting anything but the published bytes is noticed.
fn pretty_cloud_event(id: Uuid, kind: &str, data: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(&cloud_event(json!(id), kind, data)).unwrap()
}

fn booking_data() -> Value {
    json!({"id": Uuid::now_v7(), "code": "BK-0001", "status": "PENDING"})
}

/// Publishes `pretty_cloud_event(..)` and returns the bytes published.
async fn publish_known(ch: &Channel, id: Uuid, kind: &str) -> Vec<u8> {
    let body = pretty_cloud_event(id, kind, &booking_data());
    publish_raw(
        ch,
        amqp::EVENTS_EXCHANGE,
        kind,
        Some(&id.to_string()),
        Some(kind),
        &body,
    )
    .await;
    body
}

/// Asserts that a request is the signed CloudEvent `body` of `event`.
fn assert_signed(req: &Recorded, event: Uuid, body: &[u8]) {
    assert_eq!(req.method, Method::POST);
    assert_eq!(req.path, "/hooks");
    let id = req.header("webhook-id");
    assert_eq!(id, event.to_string(), "webhook-id is the event id");
    let ts: i64 = req
        .header("webhook-timestamp")
        .parse()
        .expect("webhook-timestamp is unix seconds");
    assert!(
        (req.received_at - ts).abs() <= 5,
        "webhook-timestamp {ts} is close to now ({})",
        req.received_at
    );
    let signature = req.header("webhook-signature");
    assert!(signature.starts_with("v1,"), "{signature}");
    let key = decode_secret(SECRET).unwrap();
    assert!(
        verify(&key, id, ts, &req.body, signature),
        "signature {signature} verifies"
    );
    assert!(
        !verify(&key, id, ts, b"{}", signature),
        "the signature covers the body"
    );
    assert_eq!(
        req.body.as_ref(),
        body,
        "the body is the CloudEvent as published"
    );
}

/// A `notification_deliveries` row (`delivered_at`: whether it is set).
#[derive(Debug, sqlx::FromRow)]
struct Row {
    status: String,
    attempts: i32,
    last_status_code: Option<i16>,
    last_error: Option<String>,
    delivered_at: bool,
    topic: String,
}

async fn row(pool: &PgPool, event: Uuid, subscriber: &str) -> Option<Row> {
    sqlx::query_as(
        "SELECT status, attempts, last_status_code, last_error,
                delivered_at IS NOT NULL AS delivered_at, topic
           FROM notification_deliveries WHERE event_id = $1 AND subscriber = $2",
    )
    .bind(event)
    .bind(subscriber)
    .fetch_optional(pool)
    .await
    .unwrap()
}

async fn row_status(pool: &PgPool, event: Uuid, subscriber: &str) -> Option<String> {
    row(pool, event, subscriber).await.map(|r| r.status)
}

async fn rows(pool: &PgPool) -> i64 {
    scalar(pool, "SELECT count(*) FROM notification_deliveries").await
}

/// Takes one message off a queue: (body, message_id, x-entrip-error).
async fn take(ch: &Channel, queue: &str) -> Option<(Vec<u8>, Option<String>, Option<String>)> {
    let msg = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()?;
    contract().assert_from_queue(queue, &AmqpMessage::of(&msg.delivery));
    let props = &msg.delivery.properties;
    let error = header(props, ERROR_HEADER).map(|v| match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => format!("{other:?}"),
    });
    let message_id = props.message_id().as_ref().map(|s| s.as_str().to_owned());
    Some((msg.delivery.data.clone(), message_id, error))
}

/// Retry queues of the notifications queue (support's delays).
fn retry_queues() -> Vec<String> {
    RETRY_DELAYS_MS
        .iter()
        .map(|d| amqp::retry_queue_name(NOTIFICATIONS_QUEUE, *d))
        .collect()
}

/// No copy of any message is left anywhere on the notifications path.
async fn assert_queues_empty(ch: &Channel) {
    assert_eq!(depth(ch, NOTIFICATIONS_QUEUE).await, 0, "queue");
    for q in retry_queues() {
        assert_eq!(depth(ch, &q).await, 0, "{q}");
    }
}

// ---------------------------------------------------------------------------
// Tests.

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_event_reaches_every_matching_subscriber_signed(pool: PgPool) {
    let vhost = Vhost::new();
    let bookings = Receiver::start(Mode::Ok).await;
    let settlements = Receiver::start(Mode::Ok).await;
    let everything = Receiver::start(Mode::Ok).await;
    let payments = Receiver::start(Mode::Ok).await;
    let (_conn, ch) = channel(&vhost.url()).await;
    let worker = start_notifications(
        &pool,
        &vhost.url(),
        &settings(vec![
            bookings.hook(&["booking.*"]),
            settlements.hook(&["settlement.recorded"]),
            everything.hook(&["#"]),
            payments.hook(&["payment.*", "approval.decided"]),
        ]),
    );

    let created = Uuid::now_v7();
    let created_body = publish_known(&ch, created, "booking.created").await;
    let settled = Uuid::now_v7();
    let settled_body = publish_known(&ch, settled, "settlement.recorded").await;

    until_count("both events handled", 2, || async {
        worker.count(CONSUMER, "processed")
    })
    .await;
    assert_eq!(worker.count(CONSUMER, "processed"), 2);

    // Who got what.
    assert_eq!(
        bookings.requests().len(),
        1,
        "booking.* gets booking.created"
    );
    assert_eq!(bookings.requests_for(created).len(), 1);
    assert_eq!(
        settlements.requests().len(),
        1,
        "settlement.recorded gets settlement.recorded only"
    );
    assert_eq!(settlements.requests_for(settled).len(), 1);
    assert_eq!(everything.requests().len(), 2, "# gets both");
    assert_eq!(everything.requests_for(created).len(), 1);
    assert_eq!(everything.requests_for(settled).len(), 1);
    assert!(
        payments.requests().is_empty(),
        "payment.* / approval.decided get nothing: {:?}",
        payments.requests()
    );

    // What they got.
    assert_signed(&bookings.requests_for(created)[0], created, &created_body);
    assert_signed(&everything.requests_for(created)[0], created, &created_body);
    assert_signed(
        &settlements.requests_for(settled)[0],
        settled,
        &settled_body,
    );
    assert_signed(&everything.requests_for(settled)[0], settled, &settled_body);

    // One DELIVERED row per (event, subscriber), none for the others.
    for (event, sub, topic) in [
        (created, &bookings, "booking.created"),
        (created, &everything, "booking.created"),
        (settled, &settlements, "settlement.recorded"),
        (settled, &everything, "settlement.recorded"),
    ] {
        let r = row(&pool, event, &sub.url)
            .await
            .unwrap_or_else(|| panic!("a row for {} / {event}", sub.url));
        assert_eq!(r.status, "DELIVERED", "{r:?}");
        assert!(r.delivered_at, "{r:?}");
        assert_eq!(r.attempts, 1, "{r:?}");
        assert_eq!(r.last_status_code, Some(200), "{r:?}");
        assert_eq!(r.last_error, None, "{r:?}");
        assert_eq!(r.topic, topic, "{r:?}");
    }
    assert_eq!(rows(&pool).await, 4, "no rows for non-matching subscribers");
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM notification_deliveries WHERE status <> 'DELIVERED' OR delivered_at IS NULL"
        )
        .await,
        0
    );
    assert_eq!(worker.count(CONSUMER, "retried"), 0);
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 0);
    assert_eq!(depth(&ch, &dlq()).await, 0);
    worker.stop().await;
    assert_queues_empty(&ch).await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn redelivered_events_are_sent_once_per_subscriber(pool: PgPool) {
    let vhost = Vhost::new();
    let bookings = Receiver::start(Mode::Ok).await;
    let everything = Receiver::start(Mode::Ok).await;
    let (_conn, ch) = channel(&vhost.url()).await;
    let worker = start_notifications(
        &pool,
        &vhost.url(),
        &settings(vec![bookings.hook(&["booking.*"]), everything.hook(&["#"])]),
    );

    let created = Uuid::now_v7();
    let confirmed = Uuid::now_v7();
    let created_data = booking_data();
    let confirmed_data = booking_data();
    publish_event(&ch, created, "booking.created", created_data.clone()).await;
    publish_event(&ch, confirmed, "booking.confirmed", confirmed_data.clone()).await;
    until_count("the first copies delivered", 2, || async {
        worker.count(CONSUMER, "processed")
    })
    .await;

    // The same events again: `created` twice more, `confirmed` once more.
    publish_event(&ch, created, "booking.created", created_data.clone()).await;
    publish_event(&ch, confirmed, "booking.confirmed", confirmed_data).await;
    publish_event(&ch, created, "booking.created", created_data).await;
    until_count("the repeats handled", 3, || async {
        worker.count(CONSUMER, "duplicate")
    })
    .await;

    for sub in [&bookings, &everything] {
        assert_eq!(sub.requests_for(created).len(), 1, "{}", sub.url);
        assert_eq!(sub.requests_for(confirmed).len(), 1, "{}", sub.url);
        assert_eq!(sub.requests().len(), 2, "{}", sub.url);
        for event in [created, confirmed] {
            let r = row(&pool, event, &sub.url).await.unwrap();
            assert_eq!((r.status.as_str(), r.attempts), ("DELIVERED", 1), "{r:?}");
        }
    }
    assert_eq!(rows(&pool).await, 4);
    assert_eq!(worker.count(CONSUMER, "processed"), 2);
    assert_eq!(worker.count(CONSUMER, "duplicate"), 3, "the repeats");
    assert_eq!(worker.count(CONSUMER, "retried"), 0);
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 0);
    worker.stop().await;
    assert_queues_empty(&ch).await;
    assert_eq!(depth(&ch, &dlq()).await, 0);
}

/// Copies of one event waiting side by side in the queue (a dispatcher that
/// published again after a lost confirm) are handled concurrently; still one
/// webhook per subscriber.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn copies_handled_at_the_same_time_are_sent_once_per_subscriber(pool: PgPool) {
    let vhost = Vhost::new();
    // Answering takes a moment, as real receivers do.
    let bookings = Receiver::start(Mode::Slow(Duration::from_millis(100))).await;
    let everything = Receiver::start(Mode::Slow(Duration::from_millis(100))).await;
    let (_conn, ch) = channel(&vhost.url()).await;

    let created = Uuid::now_v7();
    let confirmed = Uuid::now_v7();
    let created_data = booking_data();
    let confirmed_data = booking_data();
    for _ in 0..3 {
        publish_event(&ch, created, "booking.created", created_data.clone()).await;
    }
    for _ in 0..2 {
        publish_event(&ch, confirmed, "booking.confirmed", confirmed_data.clone()).await;
    }
    assert_eq!(depth(&ch, NOTIFICATIONS_QUEUE).await, 5);

    let worker = start_notifications(
        &pool,
        &vhost.url(),
        &settings(vec![bookings.hook(&["booking.*"]), everything.hook(&["#"])]),
    );
    // Each copy ends processed, duplicate or dead-lettered exactly once.
    let handled = || async {
        worker.count(CONSUMER, "processed")
            + worker.count(CONSUMER, "duplicate")
            + worker.count(CONSUMER, "dead_lettered")
    };
    until_count("all five copies handled", 5, handled).await;
    assert_eq!(handled().await, 5);
    for sub in [&bookings, &everything] {
        assert_eq!(
            sub.requests_for(created).len(),
            1,
            "{} got booking.created once (3 copies)",
            sub.url
        );
        assert_eq!(
            sub.requests_for(confirmed).len(),
            1,
            "{} got booking.confirmed once (2 copies)",
            sub.url
        );
    }
    assert_eq!(rows(&pool).await, 4);
    // Concurrent copies may share the work (one sends to the first
    // subscriber, another to the second), so each may count as processed;
    // what matters is one webhook per pair, asserted above.
    assert_eq!(
        worker.count(CONSUMER, "processed") + worker.count(CONSUMER, "duplicate"),
        5
    );
    assert_eq!(worker.count(CONSUMER, "retried"), 0);
    worker.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_receiver_failing_twice_gets_the_event_once_later(pool: PgPool) {
    let vhost = Vhost::new();
    let flaky = Receiver::start(Mode::FailFirst(2)).await;
    let steady = Receiver::start(Mode::Ok).await;
    let (_conn, ch) = channel(&vhost.url()).await;
    let worker = start_notifications(
        &pool,
        &vhost.url(),
        &settings(vec![flaky.hook(&["booking.*"]), steady.hook(&["#"])]),
    );

    let event = Uuid::now_v7();
    let body = publish_known(&ch, event, "booking.created").await;
    eventually("the flaky receiver got it", || async {
        worker.count(CONSUMER, "processed") >= 1
    })
    .await;
    assert_eq!(worker.count(CONSUMER, "processed"), 1);

    let tries = flaky.requests_for(event);
    assert_eq!(
        tries.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![Some(500), Some(500), Some(200)],
        "two failures, then exactly one 2xx"
    );
    for r in &tries {
        assert_signed(r, event, &body);
    }
    assert_eq!(flaky.delivered(event), 1);
    assert_eq!(
        steady.requests_for(event).len(),
        1,
        "the other subscriber is not sent the event again on retries"
    );
    assert_signed(&steady.requests_for(event)[0], event, &body);

    let r = row(&pool, event, &flaky.url).await.unwrap();
    assert_eq!(r.status, "DELIVERED", "{r:?}");
    assert_eq!(r.attempts, 3, "{r:?}");
    assert!(r.delivered_at, "{r:?}");
    assert_eq!(r.last_status_code, Some(200), "{r:?}");
    let r = row(&pool, event, &steady.url).await.unwrap();
    assert_eq!((r.status.as_str(), r.attempts), ("DELIVERED", 1), "{r:?}");
    assert_eq!(rows(&pool).await, 2);

    assert_eq!(worker.count(CONSUMER, "retried"), 2);
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 0);
    assert_eq!(depth(&ch, &dlq()).await, 0);
    assert_eq!(deliveries::undelivered(&pool).await.unwrap(), 0);
    worker.stop().await;
    assert_queues_empty(&ch).await;
}

/// Shared by the failing and the hanging receiver: after the retries the
/// message is in the DLQ naming the subscriber, its row is DEAD and counted.
async fn assert_dead_lettered(pool: PgPool, mode: Mode) {
    let vhost = Vhost::new();
    let broken = Receiver::start(mode).await;
    let steady = Receiver::start(Mode::Ok).await;
    let (_conn, ch) = channel(&vhost.url()).await;
    let worker = start_notifications(
        &pool,
        &vhost.url(),
        &settings(vec![broken.hook(&["booking.*"]), steady.hook(&["#"])]),
    );

    let event = Uuid::now_v7();
    let body = publish_known(&ch, event, "booking.created").await;
    // Each try is a request to the broken receiver: the progress.
    progress("dead-lettered", || async {
        let dead = worker.count(CONSUMER, "dead_lettered");
        (broken.requests_for(event).len(), dead >= 1)
    })
    .await;
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 1);
    eventually("the row marked DEAD", || async {
        row_status(&pool, event, &broken.url).await.as_deref() == Some("DEAD")
    })
    .await;

    let max_retries = workers_settings().max_retries;
    let attempts = usize::try_from(max_retries).unwrap() + 1;
    let tries = broken.requests_for(event);
    assert_eq!(tries.len(), attempts, "the first try and every retry");
    assert!(tries.iter().all(|r| !r.succeeded()), "{tries:?}");
    for r in &tries {
        assert_signed(r, event, &body);
    }
    assert_eq!(
        steady.requests_for(event).len(),
        1,
        "the healthy subscriber got it once"
    );
    assert_eq!(worker.count(CONSUMER, "retried"), u64::from(max_retries));
    assert_eq!(worker.count(CONSUMER, "processed"), 0);

    // The DLQ copy.
    assert_eq!(depth(&ch, &dlq()).await, 1);
    let (dead_body, message_id, error) = take(&ch, &dlq()).await.expect("a message in the DLQ");
    assert_eq!(dead_body, body);
    assert_eq!(message_id.as_deref(), Some(event.to_string().as_str()));
    let error = error.expect("x-entrip-error on the DLQ copy");
    assert!(
        error.contains(&broken.url),
        "x-entrip-error names the subscriber: {error}"
    );
    assert!(
        !error.contains(&steady.url),
        "only the failing subscriber: {error}"
    );

    // The rows and the gauge.
    let r = row(&pool, event, &broken.url).await.unwrap();
    assert_eq!(r.status, "DEAD", "{r:?}");
    assert_eq!(r.attempts, i32::try_from(attempts).unwrap(), "{r:?}");
    assert!(!r.delivered_at, "{r:?}");
    assert!(r.last_error.is_some(), "{r:?}");
    let expected_code = match mode {
        Mode::Hang => None,
        _ => Some(500),
    };
    assert_eq!(
        r.last_status_code, expected_code,
        "a hang has no status, a failure its 500: {r:?}"
    );
    let r = row(&pool, event, &steady.url).await.unwrap();
    assert_eq!((r.status.as_str(), r.attempts), ("DELIVERED", 1), "{r:?}");
    assert_eq!(deliveries::undelivered(&pool).await.unwrap(), 1);

    worker.stop().await;
    assert_queues_empty(&ch).await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_always_failing_receiver_ends_in_the_dlq_and_counts_undelivered(pool: PgPool) {
    assert_dead_lettered(pool, Mode::AlwaysFail).await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_receiver_hanging_past_the_timeout_is_a_failure(pool: PgPool) {
    assert_dead_lettered(pool, Mode::Hang).await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn poison_messages_are_dead_lettered_and_the_consumer_keeps_going(pool: PgPool) {
    let vhost = Vhost::new();
    let everything = Receiver::start(Mode::Ok).await;
    let (_conn, ch) = channel(&vhost.url()).await;
    let worker = start_notifications(
        &pool,
        &vhost.url(),
        &settings(vec![everything.hook(&["#"])]),
    );

    let not_json = b"this is not JSON".to_vec();
    let no_id_or_type = br#"{"specversion":"1.0","source":"/entrip/ingest","data":{}}"#.to_vec();
    publish_raw(
        &ch,
        amqp::EVENTS_EXCHANGE,
        "booking.created",
        Some(&Uuid::now_v7().to_string()),
        Some("booking.created"),
        &not_json,
    )
    .await;
    publish_raw(
        &ch,
        amqp::EVENTS_EXCHANGE,
        "booking.created",
        None,
        None,
        &no_id_or_type,
    )
    .await;
    let good = Uuid::now_v7();
    let good_body = publish_known(&ch, good, "booking.created").await;

    eventually("the good event delivered", || async {
        everything.delivered(good) >= 1
    })
    .await;
    let dead_letters = dlq();
    until_count("both poison messages dead-lettered", 2, || {
        depth(&ch, &dead_letters)
    })
    .await;

    let mut dead = Vec::new();
    while let Some(m) = take(&ch, &dlq()).await {
        dead.push(m);
    }
    assert_eq!(dead.len(), 2);
    for (body, _, error) in &dead {
        assert!(
            *body == not_json || *body == no_id_or_type,
            "{}",
            String::from_utf8_lossy(body)
        );
        let error = error.as_deref().unwrap_or_default();
        assert!(!error.trim().is_empty(), "x-entrip-error gives a reason");
    }
    assert!(dead.iter().any(|(b, _, _)| *b == not_json));
    assert!(dead.iter().any(|(b, _, _)| *b == no_id_or_type));

    assert_eq!(
        everything.requests().len(),
        1,
        "only the good event is sent"
    );
    assert_signed(&everything.requests()[0], good, &good_body);
    assert_eq!(rows(&pool).await, 1, "poison leaves no delivery rows");
    assert_eq!(deliveries::undelivered(&pool).await.unwrap(), 0);
    eventually("outcomes counted", || async {
        worker.count(CONSUMER, "dead_lettered") >= 2 && worker.count(CONSUMER, "processed") >= 1
    })
    .await;
    assert_eq!(worker.count(CONSUMER, "dead_lettered"), 2);
    assert_eq!(worker.count(CONSUMER, "processed"), 1);
    assert_eq!(
        worker.count(CONSUMER, "retried"),
        0,
        "poison is not retried"
    );
    worker.stop().await;
    assert_queues_empty(&ch).await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_event_no_subscriber_wants_is_acknowledged_and_not_sent(pool: PgPool) {
    let vhost = Vhost::new();
    let bookings = Receiver::start(Mode::Ok).await;
    let settlements = Receiver::start(Mode::Ok).await;
    let (_conn, ch) = channel(&vhost.url()).await;
    let worker = start_notifications(
        &pool,
        &vhost.url(),
        &settings(vec![
            bookings.hook(&["booking.*"]),
            settlements.hook(&["settlement.recorded"]),
        ]),
    );

    let event = Uuid::now_v7();
    publish_event(
        &ch,
        event,
        "payment.approved",
        json!({"id": Uuid::now_v7(), "status": "APPROVED"}),
    )
    .await;
    eventually("handled", || async {
        worker.count(CONSUMER, "processed") + worker.count(CONSUMER, "duplicate") >= 1
    })
    .await;
    assert_eq!(
        worker.count(CONSUMER, "processed") + worker.count(CONSUMER, "duplicate"),
        1
    );
    worker.stop().await;

    assert!(bookings.requests().is_empty());
    assert!(settlements.requests().is_empty());
    assert_eq!(rows(&pool).await, 0);
    // Acknowledged: after the consumer stopped nothing went back to the queue.
    assert_queues_empty(&ch).await;
    assert_eq!(depth(&ch, &dlq()).await, 0);
    assert_eq!(deliveries::undelivered(&pool).await.unwrap(), 0);
}

/// `duplicate` means "seen before"; a first event nobody subscribed to was
/// not, and must not inflate the duplicate count operators watch.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_event_no_subscriber_wants_counts_as_processed_not_duplicate(pool: PgPool) {
    let vhost = Vhost::new();
    let bookings = Receiver::start(Mode::Ok).await;
    let (_conn, ch) = channel(&vhost.url()).await;
    let worker = start_notifications(
        &pool,
        &vhost.url(),
        &settings(vec![bookings.hook(&["booking.*"])]),
    );
    publish_event(
        &ch,
        Uuid::now_v7(),
        "payment.approved",
        json!({"id": Uuid::now_v7(), "status": "APPROVED"}),
    )
    .await;
    eventually("handled", || async {
        worker.count(CONSUMER, "processed") + worker.count(CONSUMER, "duplicate") >= 1
    })
    .await;
    assert_eq!(
        worker.count(CONSUMER, "processed") + worker.count(CONSUMER, "duplicate"),
        1
    );
    assert!(bookings.requests().is_empty());
    assert_eq!(
        worker.count(CONSUMER, "duplicate"),
        0,
        "a first delivery is not a duplicate"
    );
    assert_eq!(worker.count(CONSUMER, "processed"), 1);
    worker.stop().await;
}

/// A hanging receiver holds consumer slots, not database connections: with
/// twice as many webhook calls hanging as the pool has connections,
/// settlement on the same pool goes on, none of its messages retried for
/// want of a connection, and the pool closes with the calls still hanging
/// (no connection is checked out across a call).
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_hanging_receiver_holds_no_connection_and_settlement_goes_on(pool: PgPool) {
    let vhost = Vhost::new();
    let hang = Receiver::start(Mode::Hang).await;
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let (_conn, ch) = channel(&vhost.url()).await;
    let hooks = NotificationsSettings {
        webhooks: vec![hang.hook(&["booking.created"])],
        // Longer than the receiver hangs for: the calls stay open.
        timeout_ms: 120_000,
    };
    let concurrency = 6;
    let notifications = start(
        entrip_workers::notifications::Notifications::new(small.clone(), &hooks).unwrap(),
        &vhost.url(),
        entrip_common::config::WorkersSettings {
            concurrency,
            ..workers_settings()
        },
    );
    for _ in 0..concurrency {
        publish_known(&ch, Uuid::now_v7(), "booking.created").await;
    }
    until_count("every webhook call open", concurrency, || async {
        hang.requests().len()
    })
    .await;

    let fixtures = approved_bookings(&pool, 20).await;
    let settlement = start(
        entrip_workers::settlement::Settlement::new(small.clone()),
        &vhost.url(),
        workers_settings(),
    );
    publish_approved(&ch, &fixtures).await;
    until_count("20 settlements", 20, || async {
        scalar(&pool, "SELECT count(*) FROM settlements").await
    })
    .await;
    // Settled while every call still hangs.
    assert_eq!(hang.requests().len(), concurrency);
    assert!(hang.requests().iter().all(|r| r.status.is_none()));
    assert_eq!(settlement.count("settlement", "retried"), 0);
    assert_eq!(notifications.count(CONSUMER, "processed"), 0);
    // Each hanging pair is leased, and its row is locked by nobody.
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM notification_deliveries WHERE lease_until > now()"
        )
        .await,
        concurrency as i64
    );
    tokio::time::timeout(Duration::from_secs(10), small.close())
        .await
        .expect("no connection is held across a webhook call");
    settlement.stop().await;
}
