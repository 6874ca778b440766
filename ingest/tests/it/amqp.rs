//! Requests over AMQP (docs/DESIGN.md "AMQP ingest"): each command stored with
//! its audit row and outbox event and answered as over HTTP, one effect per
//! `message_id` also across transports, refusals replied and acked, poison
//! dead-lettered with its reason, a database outage through the retry path.

use std::time::Duration;

use entrip_common::amqp::{self, INGEST_QUEUE};
use entrip_ingest::clients::{self, ClientName, Scope};
use entrip_testkit::{
    Proxy, Vhost,
    asyncapi::{AmqpMessage, contract},
};
use serde_json::{Value, json};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{
    support::{Server, booking_body, key, payment_body, settings, unique_code},
    upstream::{Reply, ReplyTo, Req, Upstream, amqp_settings},
};

/// Ingest with its consumer on a vhost of the test's own, and an upstream.
async fn start(pool: PgPool) -> (Server, Upstream, Vhost) {
    let vhost = Vhost::new();
    let server = Server::start_with_amqp(pool, settings(), amqp_settings(&vhost.url())).await;
    let upstream = Upstream::connect(&vhost.url()).await;
    (server, upstream, vhost)
}

/// `entrip_ingest_messages_total{outcome, type}` now.
async fn messages(server: &Server, outcome: &str, kind: &str) -> f64 {
    server
        .metric(&format!(
            r#"entrip_ingest_messages_total{{outcome="{outcome}",type="{kind}"}}"#
        ))
        .await
}

/// Asserts that the consumer's counter comes to exactly `want`. It counts a
/// message once the handler is done, after the reply is handed to the
/// broker, so the last reply can arrive before its count.
async fn assert_messages(server: &Server, outcome: &str, kind: &str, want: f64) {
    entrip_testkit::eventually(&format!("{want} {kind} messages {outcome}"), || async {
        messages(server, outcome, kind).await >= want
    })
    .await;
    assert_eq!(messages(server, outcome, kind).await, want);
}

fn user_body() -> Value {
    json!({
        "name": "Kim Minji",
        "email": format!("kim-{}@example.com", uuid::Uuid::new_v4().simple()),
        "phone": "+82 10 1234 5678",
    })
}

/// The rows a command stored, by the key it came with: (audit rows that
/// name the AMQP channel, outbox events of the entity).
async fn stored(server: &Server, key: &str, entity: &str) -> (i64, i64) {
    let audit: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE idempotency_key = $1 AND detail->>'channel' = 'amqp'
            AND detail->>'client' = 'test-all' AND entity_id = $2::uuid",
    )
    .bind(key)
    .bind(entity)
    .fetch_one(&server.pool)
    .await
    .unwrap();
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox o JOIN audit_log a ON a.event_id = o.id
          WHERE a.idempotency_key = $1 AND o.aggregate_id = $2::uuid",
    )
    .bind(key)
    .bind(entity)
    .fetch_one(&server.pool)
    .await
    .unwrap();
    (audit, events)
}

/// Sends `req`, checks the reply is a first answer with `status`, that
/// the same key over HTTP (same client) replays exactly that answer, and
/// that the effect is stored once with its audit row and event.
async fn accepted(
    server: &Server,
    upstream: &mut Upstream,
    req: &Req,
    path: &str,
    status: i64,
) -> Value {
    let reply = upstream.request(req).await;
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert!(!reply.replayed);
    assert_eq!(reply.content_type, "application/json");
    assert_eq!(
        reply.correlation_id, req.key,
        "correlation id defaults to the key"
    );
    let key = req.key.as_deref().unwrap();
    let body: Value = serde_json::from_slice(&req.body).unwrap();
    let http = server.post(path, Some(key), &body).await;
    assert_eq!(i64::from(http.status.as_u16()), status);
    assert_eq!(
        http.headers.get("idempotent-replayed").unwrap(),
        "true",
        "HTTP replays the AMQP answer"
    );
    assert_eq!(
        http.body, reply.body,
        "the same answer over both transports"
    );
    let entity = req
        .entity
        .clone()
        .unwrap_or_else(|| reply.body["id"].as_str().unwrap().to_owned());
    assert_eq!(stored(server, key, &entity).await, (1, 1), "{path}");
    reply.body
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn every_command_over_amqp_is_stored_once_and_answered_as_over_http(pool: PgPool) {
    let (server, mut up, _vhost) = start(pool).await;

    let user = accepted(
        &server,
        &mut up,
        &Req::new("user.create", &key(), &user_body()),
        "/v1/users",
        201,
    )
    .await;
    let user_id = user["id"].as_str().unwrap().to_owned();

    let booking_json = booking_body(&user_id, &unique_code(), true);
    let booking = accepted(
        &server,
        &mut up,
        &Req::new("booking.create", &key(), &booking_json),
        "/v1/bookings",
        201,
    )
    .await;
    assert_eq!(booking["status"], "PENDING");
    let booking_id = booking["id"].as_str().unwrap().to_owned();

    let payment = accepted(
        &server,
        &mut up,
        &Req::new("payment.create", &key(), &payment_body(&booking)),
        "/v1/payments",
        201,
    )
    .await;
    let payment_id = payment["id"].as_str().unwrap().to_owned();
    let result = accepted(
        &server,
        &mut up,
        &Req::new(
            "payment.result",
            &key(),
            &json!({"status": "APPROVED", "approvalId": "GW-1"}),
        )
        .on(&payment_id),
        &format!("/v1/payments/{payment_id}/result"),
        200,
    )
    .await;
    assert_eq!(result["status"], "APPROVED");

    let approval = accepted(
        &server,
        &mut up,
        &Req::new(
            "approval.create",
            &key(),
            &json!({"bookingId": booking_id, "requesterId": user_id, "title": "Trip", "reason": "Meeting"}),
        ),
        "/v1/approvals",
        201,
    )
    .await;
    let approval_id = approval["id"].as_str().unwrap().to_owned();
    let decided = accepted(
        &server,
        &mut up,
        &Req::new(
            "approval.decision",
            &key(),
            &json!({"approverId": user_id, "decision": "APPROVED"}),
        )
        .on(&approval_id),
        &format!("/v1/approvals/{approval_id}/decision"),
        200,
    )
    .await;
    assert_eq!(decided["status"], "APPROVED");

    let other = server.create_booking(&user_id, false).await;
    let other_id = other["id"].as_str().unwrap().to_owned();
    let canceled = accepted(
        &server,
        &mut up,
        &Req::new(
            "booking.cancel",
            &key(),
            &json!({"reason": "plans changed"}),
        )
        .on(&other_id),
        &format!("/v1/bookings/{other_id}/cancel"),
        200,
    )
    .await;
    assert_eq!(canceled["status"], "CANCELED");

    assert_messages(&server, "accepted", "booking.create", 1.0).await;
    assert!(
        server
            .metric(r#"entrip_ingest_message_duration_seconds_count{type="payment.result"}"#)
            .await
            >= 1.0
    );
    server.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_message_delivered_again_or_fifty_times_at_once_has_one_effect(pool: PgPool) {
    let (server, mut up, _vhost) = start(pool).await;
    let user_id = server.create_user().await;

    // The same message three times, one after the other.
    let req = Req::new(
        "booking.create",
        &key(),
        &booking_body(&user_id, &unique_code(), false),
    );
    let first = up.request(&req).await;
    assert_eq!((first.status, first.replayed), (201, false));
    for _ in 0..2 {
        let again = up.request(&req).await;
        assert_eq!((again.status, again.replayed), (201, true));
        assert_eq!(again.body, first.body);
    }

    // Fifty copies of another one, published at once.
    let req = Req::new(
        "booking.create",
        &key(),
        &booking_body(&user_id, &unique_code(), false),
    );
    for _ in 0..50 {
        up.publish(&req).await;
    }
    let mut replies: Vec<Reply> = Vec::new();
    for _ in 0..50 {
        replies.push(up.reply().await);
    }
    assert!(replies.iter().all(|r| r.status == 201), "{replies:?}");
    assert_eq!(replies.iter().filter(|r| !r.replayed).count(), 1);
    assert!(replies.iter().all(|r| r.body == replies[0].body));
    assert_eq!(server.count("bookings").await, 2);
    assert_messages(&server, "replayed", "booking.create", 51.0).await;
    // Counted with the HTTP replays, under the command's route.
    assert_eq!(
        server
            .metric(r#"entrip_idempotency_replays_total{route="/v1/bookings"}"#)
            .await,
        51.0
    );
    server.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn one_key_over_http_and_amqp_is_one_request_either_way(pool: PgPool) {
    let (server, mut up, _vhost) = start(pool).await;
    let user_id = server.create_user().await;

    // HTTP first, then the same over AMQP.
    let body = booking_body(&user_id, &unique_code(), false);
    let k = key();
    let http = server.post("/v1/bookings", Some(&k), &body).await;
    assert_eq!(http.status.as_u16(), 201);
    let reply = up.request(&Req::new("booking.create", &k, &body)).await;
    assert_eq!((reply.status, reply.replayed), (201, true));
    assert_eq!(reply.body, http.body);

    // AMQP first, then HTTP: `accepted` checks the HTTP replay.
    let body = booking_body(&user_id, &unique_code(), false);
    accepted(
        &server,
        &mut up,
        &Req::new("booking.create", &key(), &body),
        "/v1/bookings",
        201,
    )
    .await;

    // A command on an entity: the id in the header is the one in the path.
    let booking = server.create_booking(&user_id, false).await;
    let id = booking["id"].as_str().unwrap();
    let k = key();
    let cancel = json!({"reason": "plans changed"});
    let http = server
        .post(&format!("/v1/bookings/{id}/cancel"), Some(&k), &cancel)
        .await;
    assert_eq!(http.status.as_u16(), 200);
    let reply = up
        .request(&Req::new("booking.cancel", &k, &cancel).on(id))
        .await;
    assert_eq!((reply.status, reply.replayed), (200, true));
    assert_eq!(reply.body, http.body);
    assert_eq!(server.count("bookings").await, 3);
    server.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_message_id_reused_for_another_request_is_answered_422_and_stores_nothing(pool: PgPool) {
    let (server, mut up, _vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let k = key();
    let first = up
        .request(&Req::new(
            "booking.create",
            &k,
            &booking_body(&user_id, &unique_code(), false),
        ))
        .await;
    assert_eq!(first.status, 201);
    let audit_before = server.count("audit_log").await;
    let outbox_before = server.count("outbox").await;

    // Another body, then another command, under the same key.
    let other_body = up
        .request(&Req::new(
            "booking.create",
            &k,
            &booking_body(&user_id, &unique_code(), false),
        ))
        .await;
    let other_command = up.request(&Req::new("user.create", &k, &user_body())).await;
    for reply in [&other_body, &other_command] {
        assert_eq!(reply.status, 422, "{:?}", reply.body);
        assert_eq!(reply.content_type, "application/problem+json");
        assert_eq!(reply.body["status"], 422);
    }
    assert_eq!(server.count("bookings").await, 1);
    assert_eq!(server.count("audit_log").await, audit_before);
    assert_eq!(server.count("outbox").await, outbox_before);
    // Answered, not poison: acked, nothing in the DLQ.
    assert_eq!(up.depth("entrip.ingest.dlq").await, 0);
    assert_messages(&server, "rejected", "booking.create", 1.0).await;
    server.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn answers_404_409_422_are_replied_and_acked_not_dead_lettered(pool: PgPool) {
    let (server, mut up, _vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let missing = up
        .request(&Req::new("booking.cancel", &key(), &json!({"reason": "x"})).on(&unknown))
        .await;
    assert_eq!(missing.status, 404, "{:?}", missing.body);

    let booking = server.create_booking(&user_id, false).await;
    let id = booking["id"].as_str().unwrap();
    let cancel =
        |k: &str| Req::new("booking.cancel", k, &json!({"reason": "plans changed"})).on(id);
    assert_eq!(up.request(&cancel(&key())).await.status, 200);
    let again = up.request(&cancel(&key())).await;
    assert_eq!(again.status, 409, "{:?}", again.body);

    // A rule across fields: arriveAt before departAt.
    let mut body = booking_body(&user_id, &unique_code(), false);
    body["arriveAt"] = json!("2026-12-24T08:00:00+09:00");
    let rule = up.request(&Req::new("booking.create", &key(), &body)).await;
    assert_eq!(rule.status, 422, "{:?}", rule.body);
    assert_eq!(rule.body["errors"][0]["field"], "arriveAt");

    for reply in [&missing, &again, &rule] {
        assert_eq!(reply.content_type, "application/problem+json");
    }
    assert_eq!(up.depth("entrip.ingest.dlq").await, 0);
    assert_eq!(up.depth(INGEST_QUEUE).await, 0);
    server.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn poison_goes_to_the_dlq_with_its_reason_and_the_consumer_keeps_going(pool: PgPool) {
    let (server, mut up, _vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let booking = |k: &str| {
        Req::new(
            "booking.create",
            k,
            &booking_body(&user_id, &unique_code(), false),
        )
    };
    // A valid booking with one thing changed.
    let changed = |change: fn(&mut Req)| {
        let mut r = booking(&key());
        change(&mut r);
        r
    };
    let big = json!({"reason": "x".repeat(70 * 1024)});
    let cases: Vec<(&str, Req, i64, &str)> = vec![
        (
            "not JSON",
            changed(|r| r.body = b"{not json".to_vec()),
            400,
            "JSON",
        ),
        (
            "bad UTF-8",
            changed(|r| r.body = vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}']),
            400,
            "JSON",
        ),
        (
            "unknown type",
            changed(|r| r.kind = Some("booking.teleport".into())),
            400,
            "booking.teleport",
        ),
        (
            "no type",
            changed(|r| r.kind = None),
            400,
            "unknown command type",
        ),
        (
            "no message_id",
            changed(|r| r.key = None),
            400,
            "message_id",
        ),
        ("short message_id", booking("too-short"), 400, "message_id"),
        (
            "invalid field",
            {
                let mut body = booking_body(&user_id, &unique_code(), false);
                body["amount"] = json!("-5");
                Req::new("booking.create", &key(), &body)
            },
            400,
            "amount",
        ),
        (
            "unknown field",
            {
                let mut body = booking_body(&user_id, &unique_code(), false);
                body["colour"] = json!("red");
                Req::new("booking.create", &key(), &body)
            },
            400,
            "colour",
        ),
        (
            "no entity id",
            Req::new("booking.cancel", &key(), &json!({"reason": "x"})),
            400,
            "x-entrip-entity-id",
        ),
        (
            "entity id not a UUID",
            Req::new("booking.cancel", &key(), &json!({"reason": "x"})).on("12"),
            400,
            "x-entrip-entity-id",
        ),
        (
            "body over the limit",
            Req::new("booking.cancel", &key(), &big).on(&uuid::Uuid::now_v7().to_string()),
            413,
            "larger than",
        ),
        (
            "not JSON content",
            changed(|r| r.content_type = Some("text/plain".into())),
            415,
            "text/plain",
        ),
        ("no user_id", changed(|r| r.user = None), 401, "user_id"),
    ];
    let bookings_before = server.count("bookings").await;
    for (what, req, status, _) in &cases {
        let reply = up.request(req).await;
        assert_eq!(reply.status, *status, "{what}: {:?}", reply.body);
        assert_eq!(reply.content_type, "application/problem+json", "{what}");
        assert_eq!(reply.body["status"], json!(status), "{what}");
    }
    let dead = up.dead(cases.len()).await;
    for ((what, req, status, needle), dead) in cases.iter().zip(&dead) {
        assert_eq!(dead.message_id, req.key, "{what}: in publish order");
        assert!(
            dead.reason.starts_with(&status.to_string()) && dead.reason.contains(needle),
            "{what}: {}",
            dead.reason
        );
    }
    assert_eq!(server.count("bookings").await, bookings_before);
    // And it keeps going.
    let ok = up.request(&booking(&key())).await;
    assert_eq!(ok.status, 201, "{:?}", ok.body);
    assert_eq!(
        server
            .metric(
                r#"entrip_ingest_messages_total{outcome="dead_lettered",type="booking.create"}"#
            )
            .await
            + server
                .metric(
                    r#"entrip_ingest_messages_total{outcome="dead_lettered",type="booking.cancel"}"#
                )
                .await
            + messages(&server, "dead_lettered", "unknown").await,
        cases.len() as f64
    );
    assert_eq!(
        server
            .metric(r#"entrip_ingest_auth_failures_total{reason="missing"}"#)
            .await,
        1.0
    );
    server.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_thousand_requests_mixed_with_a_hundred_poison_ones_are_all_stored(pool: PgPool) {
    let (server, up, _vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let mut codes = Vec::new();
    for i in 0..1100 {
        if i % 11 == 5 {
            let mut r = Req::new("booking.create", &key(), &json!({}));
            r.body = b"\x00poison".to_vec();
            r.reply_to = ReplyTo::None;
            up.publish(&r).await;
        } else {
            let code = unique_code();
            let mut r = Req::new(
                "booking.create",
                &key(),
                &booking_body(&user_id, &code, false),
            );
            r.reply_to = ReplyTo::None;
            up.publish(&r).await;
            codes.push(code);
        }
    }
    assert_eq!(codes.len(), 1000);
    let dead = up.dead(100).await;
    assert!(dead.iter().all(|d| d.reason.starts_with("400")));
    entrip_testkit::eventually("all 1,000 bookings stored", || async {
        server.count("bookings").await == 1000
    })
    .await;
    let stored: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT code) FROM bookings WHERE code = ANY($1)")
            .bind(&codes)
            .fetch_one(&server.pool)
            .await
            .unwrap();
    assert_eq!(stored, 1000);
    server.stop().await;
}

/// A booking of `user_id` whose reply goes to a queue that does not exist.
fn to_missing_queue(user_id: &str) -> Req {
    let mut req = Req::new(
        "booking.create",
        &key(),
        &booking_body(user_id, &unique_code(), false),
    );
    req.reply_to = ReplyTo::Queue("no-such-queue".into());
    req
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_reply_to_a_missing_queue_is_counted_and_the_request_stands(pool: PgPool) {
    let (server, mut up, _vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let mut req = to_missing_queue(&user_id);
    up.publish(&req).await;
    entrip_testkit::eventually("the reply failure counted", || async {
        server
            .metric(r#"entrip_ingest_reply_failures_total{reason="unroutable"}"#)
            .await
            == 1.0
    })
    .await;
    assert_eq!(server.count("bookings").await, 1);
    assert_eq!(up.depth(INGEST_QUEUE).await, 0, "acked");
    // A resend with a reply queue that exists gets the stored answer.
    req.reply_to = ReplyTo::Own;
    req.correlation_id = Some("corr-1".into());
    let reply = up.request(&req).await;
    assert_eq!((reply.status, reply.replayed), (201, true));
    assert_eq!(reply.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(server.count("bookings").await, 1);
    server.stop().await;
}

/// RabbitMQ returns a `mandatory` publish to a direct reply-to address as
/// unroutable even when it delivered it; such a reply must arrive and count
/// no failure (each one did, before replies to it went without `mandatory`).
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_direct_reply_to_reply_arrives_and_counts_no_failure(pool: PgPool) {
    let (server, up, _vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let reply = direct_booking(&up.conn, "guest", &user_id).await;
    assert_eq!(reply["status"], "PENDING", "{reply}");

    // Then a reply to a missing queue, on the same reply channel: by the
    // time it is counted, the broker's answer to the first (confirms come in
    // order) has been handled too, bar a task's scheduling.
    up.publish(&to_missing_queue(&user_id)).await;
    let unroutable = r#"entrip_ingest_reply_failures_total{reason="unroutable"}"#;
    entrip_testkit::eventually("the missing queue's reply counted", || async {
        server.metric(unroutable).await >= 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        server.metric(unroutable).await,
        1.0,
        "only the reply to the missing queue is unroutable"
    );
    assert_eq!(
        server
            .metric(r#"entrip_ingest_reply_failures_total{reason="broker"}"#)
            .await,
        0.0
    );
    assert_eq!(server.count("bookings").await, 2);
    server.stop().await;
}

/// A request whose direct reply-to consumer has left before ingest answers:
/// the broker drops the reply unseen (docs/amqp.md), and the request stands,
/// acked, with the reply channel and the consumer going on.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_reply_to_a_direct_reply_to_consumer_that_left_is_dropped_and_the_request_stands(
    pool: PgPool,
) {
    let vhost = Vhost::new();
    let mut up = Upstream::connect(&vhost.url()).await;
    // Published, then its requester gone, before ingest consumes it.
    let requester = entrip_common::amqp::connect(&vhost.url(), "test-gone-requester")
        .await
        .unwrap();
    let (channel, _replies) = direct_reply_channel(&requester).await;
    let body = user_body().to_string();
    try_publish_as(
        &channel,
        "user.create",
        "entrip.ingest",
        "user.create",
        "guest",
        body.as_bytes(),
    )
    .await
    .unwrap();
    requester.close(200, "gone".into()).await.unwrap();
    assert_eq!(up.depth(INGEST_QUEUE).await, 1);

    let server = Server::start_with_amqp(pool, settings(), amqp_settings(&vhost.url())).await;
    assert_messages(&server, "accepted", "user.create", 1.0).await;
    assert_eq!(server.count("users").await, 1);
    assert_eq!(up.depth(INGEST_QUEUE).await, 0, "acked");
    // The reply channel outlived the dropped reply.
    let reply = up
        .request(&Req::new("user.create", &key(), &user_body()))
        .await;
    assert_eq!((reply.status, reply.replayed), (201, false));
    assert_eq!(server.count("users").await, 2);
    for reason in ["unroutable", "broker"] {
        assert_eq!(
            server
                .metric(&format!(
                    r#"entrip_ingest_reply_failures_total{{reason="{reason}"}}"#
                ))
                .await,
            0.0,
            "{reason}"
        );
    }
    server.stop().await;
}

/// Publishes `n` bookings of `user_id` without reply queues, as broker
/// user `guest`; their codes.
async fn publish_bookings(up: &Upstream, user_id: &str, n: usize) -> Vec<String> {
    publish_bookings_as(up, "guest", user_id, n).await
}

async fn publish_bookings_as(
    up: &Upstream,
    broker_user: &str,
    user_id: &str,
    n: usize,
) -> Vec<String> {
    let mut codes = Vec::new();
    for _ in 0..n {
        let code = unique_code();
        let mut r = Req::new(
            "booking.create",
            &key(),
            &booking_body(user_id, &code, false),
        );
        r.reply_to = ReplyTo::None;
        r.user = Some(broker_user.to_owned());
        up.publish(&r).await;
        codes.push(code);
    }
    codes
}

/// How many of `codes` are stored, each once (the code is unique).
async fn stored_codes(pool: &PgPool, codes: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM bookings WHERE code = ANY($1)")
        .bind(codes)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_database_outage_sends_requests_through_the_retry_path_not_to_the_dlq(
    _pool_opts: PgPoolOptions,
    connect_opts: PgConnectOptions,
) {
    let direct = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(connect_opts.clone())
        .await
        .unwrap();
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_millis(500))
        .connect_with(connect_opts.host("127.0.0.1").port(proxy.addr.port()))
        .await
        .unwrap();
    let vhost = Vhost::new();
    let mut ingest = settings();
    // The outage outlasts the test's short retry delays many times over.
    ingest.amqp.max_retries = 10_000;
    let server = Server::start_with_amqp(pool, ingest, amqp_settings(&vhost.url())).await;
    // Published by a broker user other than ingest's own: through the retry
    // path (forwards by ingest's user) the request keeps its client.
    let publisher = BrokerUser::new(&vhost, [".*", ".*", ".*"]);
    client_of(&server, "booking-front", Scope::BookingsWrite, &publisher).await;
    let up = Upstream::connect(&publisher.url(&vhost)).await;
    let user_id = server.create_user().await;

    proxy.cut();
    let codes = publish_bookings_as(&up, &publisher.name, &user_id, 500).await;
    entrip_testkit::eventually("requests retried during the outage", || async {
        messages(&server, "retried", "booking.create").await >= 50.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stored_codes(&direct, &codes).await, 0);
    proxy.restore();
    entrip_testkit::progress("all 500 stored after the outage", || async {
        let n = stored_codes(&direct, &codes).await;
        (n, n == 500)
    })
    .await;
    assert_eq!(stored_codes(&direct, &codes).await, 500);
    let actors: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT actor FROM audit_log WHERE action = 'booking.create'")
            .fetch_all(&direct)
            .await
            .unwrap();
    assert_eq!(actors, ["client:booking-front"]);
    assert_eq!(up.depth("entrip.ingest.dlq").await, 0, "none dead-lettered");
    assert_eq!(
        server
            .metric(
                r#"entrip_ingest_messages_total{outcome="dead_lettered",type="booking.create"}"#
            )
            .await,
        0.0
    );
    server.stop().await;
}

/// A command on its retry path is the contract's `forwardedCommand`: the
/// body and properties as published, ingest's broker user in `user_id` and
/// the publisher's in `x-entrip-user-id`, the attempt and the reason. A
/// retry delay far longer than the test keeps it in the retry queue to look
/// at (the delays' other tests see it flow back).
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_command_on_its_retry_path_is_as_the_contract_says(
    _pool_opts: PgPoolOptions,
    connect_opts: PgConnectOptions,
) {
    const DELAY_MS: u64 = 600_000;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500))
        .connect_with(connect_opts.host("127.0.0.1").port(proxy.addr.port()))
        .await
        .unwrap();
    let vhost = Vhost::new();
    let broker = entrip_common::config::AmqpSettings {
        retry_delays_ms: vec![DELAY_MS],
        ..amqp_settings(&vhost.url())
    };
    let server = Server::start_with_amqp(pool, settings(), broker).await;
    let publisher = BrokerUser::new(&vhost, [".*", ".*", ".*"]);
    client_of(&server, "booking-front", Scope::BookingsWrite, &publisher).await;
    let up = Upstream::connect(&publisher.url(&vhost)).await;
    let user_id = server.create_user().await;

    proxy.cut();
    let mut req = booking_as(&publisher, &user_id);
    req.correlation_id = Some("corr-1".into());
    req.key = Some(key());
    up.publish(&req).await;
    entrip_testkit::eventually("the request retried", || async {
        messages(&server, "retried", "booking.create").await >= 1.0
    })
    .await;
    let queue = amqp::retry_queue_name(INGEST_QUEUE, DELAY_MS);
    let channel = up.conn.create_channel().await.unwrap();
    let got = channel
        .basic_get(
            queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the request waits in its retry queue");
    let msg = AmqpMessage::of(&got.delivery);
    assert_eq!(
        contract().assert_from_queue(&queue, &msg),
        "forwardedCommand"
    );
    assert_eq!(got.delivery.data, req.body, "the body as published");
    assert_eq!(msg.properties["message_id"], json!(req.key));
    assert_eq!(msg.properties["type"], "booking.create");
    assert_eq!(msg.properties["correlation_id"], "corr-1");
    assert_eq!(msg.properties["user_id"], "guest", "ingest's broker user");
    assert_eq!(msg.headers["x-entrip-user-id"], json!(publisher.name));
    assert_eq!(msg.headers["x-entrip-attempt"], 1);
    let error = msg.headers["x-entrip-error"].as_str().unwrap_or_default();
    assert!(error.starts_with("503 "), "the reason: {error:?}");
    proxy.restore();
    server.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_cut_broker_connection_loses_and_doubles_nothing(pool: PgPool) {
    let vhost = Vhost::new();
    let proxy = Proxy::start(entrip_testkit::amqp_addr()).await;
    let server = Server::start_with_amqp(
        pool.clone(),
        settings(),
        amqp_settings(&vhost.url_via(proxy.addr)),
    )
    .await;
    // The upstream publishes straight to the broker.
    let up = Upstream::connect(&vhost.url()).await;
    let user_id = server.create_user().await;
    let mut codes = publish_bookings(&up, &user_id, 250).await;
    entrip_testkit::eventually("some stored before the cut", || async {
        stored_codes(&pool, &codes).await > 0
    })
    .await;
    proxy.cut();
    codes.extend(publish_bookings(&up, &user_id, 250).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    entrip_testkit::progress("all 500 stored after the cut", || async {
        let n = stored_codes(&pool, &codes).await;
        (n, n == 500)
    })
    .await;
    assert_eq!(stored_codes(&pool, &codes).await, 500);
    assert_eq!(server.count("bookings").await, 500, "none twice");
    let outbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = 'booking.created'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(outbox, 500);
    assert_eq!(up.depth("entrip.ingest.dlq").await, 0);
    entrip_testkit::eventually("the queue drained", || async {
        up.depth(INGEST_QUEUE).await == 0
    })
    .await;
    server.stop().await;
}

/// Creates API client `name` with `scope`, acting for broker user `user`.
async fn client_of(server: &Server, name: &str, scope: Scope, user: &BrokerUser) {
    clients::create(
        &server.pool,
        &ClientName::parse(name).unwrap(),
        &[scope],
        Some(&user.name),
    )
    .await
    .unwrap();
}

/// A broker user of the test's own on `vhost`, deleted when dropped.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    /// With permissions (configure, write, read) on `vhost`.
    fn new(vhost: &Vhost, perms: [&str; 3]) -> Self {
        let name = format!("upstream-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_user", &name, "secret-password"]);
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &name,
            perms[0],
            perms[1],
            perms[2],
        ]);
        Self { name }
    }

    fn url(&self, vhost: &Vhost) -> String {
        format!(
            "amqp://{}:secret-password@{}/{}",
            self.name,
            entrip_testkit::amqp_addr(),
            vhost.name
        )
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_user", &self.name]);
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}

/// The permission set docs/amqp.md documents for an upstream publisher:
/// write on the `entrip.ingest` exchange, nothing else (direct reply-to
/// needs no permission).
const PUBLISHER: [&str; 3] = ["^$", r"^entrip\.ingest$", "^$"];

/// Publishes `body` as `booking.create` on `channel` and waits for the
/// broker's answer: `Ok` when it took it, `Err` when it refused.
async fn try_publish(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    user: &str,
    body: &[u8],
) -> Result<(), lapin::Error> {
    try_publish_as(channel, "booking.create", exchange, routing_key, user, body).await
}

/// [`try_publish`] of a request of type `kind`, with direct reply-to.
async fn try_publish_as(
    channel: &lapin::Channel,
    kind: &str,
    exchange: &str,
    routing_key: &str,
    user: &str,
    body: &[u8],
) -> Result<(), lapin::Error> {
    let props = lapin::BasicProperties::default()
        .with_type(kind.into())
        .with_message_id(key().as_str().into())
        .with_user_id(user.into())
        .with_content_type("application/json".into())
        .with_reply_to("amq.rabbitmq.reply-to".into());
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            props,
        )
        .await?
        .await?;
    Ok(())
}

/// A new channel of `conn` with confirms, consuming its direct reply-to
/// pseudo-queue (a request naming it must go out on the same channel).
async fn direct_reply_channel(conn: &lapin::Connection) -> (lapin::Channel, lapin::Consumer) {
    use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};

    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let replies = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    (channel, replies)
}

/// Publishes a booking of `user_id` as broker user `user` on a new channel
/// of `conn` with direct reply-to, and returns the reply's body.
async fn direct_booking(conn: &lapin::Connection, user: &str, user_id: &str) -> Value {
    use futures::StreamExt;

    let (channel, mut replies) = direct_reply_channel(conn).await;
    let body = booking_body(user_id, &unique_code(), false).to_string();
    try_publish(
        &channel,
        "entrip.ingest",
        "booking.create",
        user,
        body.as_bytes(),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(30), replies.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    serde_json::from_slice(&reply.data).unwrap()
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_upstream_with_the_documented_permissions_publishes_requests_and_nothing_else(
    pool: PgPool,
) {
    use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};

    let (server, up, vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let publisher = BrokerUser::new(&vhost, PUBLISHER);
    client_of(&server, "booking-front", Scope::BookingsWrite, &publisher).await;
    let conn = entrip_common::amqp::connect(&publisher.url(&vhost), "test-publisher")
        .await
        .unwrap();
    let reply = direct_booking(&conn, &publisher.name, &user_id).await;
    assert_eq!(reply["status"], "PENDING", "{reply}");
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM audit_log WHERE entity_id = $1::uuid AND action = 'booking.create'",
    )
    .bind(reply["id"].as_str().unwrap())
    .fetch_one(&server.pool)
    .await
    .unwrap();
    assert_eq!(actor, "client:booking-front");

    // Refused by the broker: the events exchange, the default exchange (to
    // a worker queue, or to the ingest queue past its exchange).
    for (exchange, routing_key) in [
        ("entrip.events", "payment.approved"),
        ("", "entrip.settlement"),
        ("", "entrip.ingest"),
    ] {
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let err = try_publish(&channel, exchange, routing_key, &publisher.name, b"{}")
            .await
            .expect_err(&format!("publishing to {exchange:?} is refused"));
        assert!(
            err.to_string().contains("ACCESS_REFUSED") || err.to_string().contains("access"),
            "{err}"
        );
    }
    // Nor may it read a worker queue.
    let channel = conn.create_channel().await.unwrap();
    let err = channel
        .basic_consume(
            "entrip.settlement".into(),
            "peek".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .expect_err("reading a worker queue is refused");
    assert!(
        err.to_string().contains("ACCESS_REFUSED") || err.to_string().contains("access"),
        "{err}"
    );
    assert_eq!(up.depth("entrip.settlement").await, 0);
    server.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_broker_user_of_no_client_or_without_the_scope_is_dead_lettered(pool: PgPool) {
    let (server, up, vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let stranger = BrokerUser::new(&vhost, [".*", ".*", ".*"]);
    let reader = BrokerUser::new(&vhost, [".*", ".*", ".*"]);
    client_of(&server, "dashboard", Scope::Read, &reader).await;
    let gone = BrokerUser::new(&vhost, [".*", ".*", ".*"]);
    client_of(&server, "old-importer", Scope::BookingsWrite, &gone).await;
    let revoked = clients::revoke(
        &server.pool,
        &ClientName::parse("old-importer").unwrap(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(revoked, 1);
    for (user, status, needle) in [
        (&stranger, 401, "belongs to no API client"),
        (&gone, 401, "is revoked"),
        (&reader, 403, "bookings:write"),
    ] {
        let mut other = Upstream::connect(&user.url(&vhost)).await;
        let req = booking_as(user, &user_id);
        let reply = other.request(&req).await;
        assert_eq!(reply.status, status, "{:?}", reply.body);
        let dead = up.dead(1).await;
        assert_eq!(dead[0].message_id, req.key);
        assert!(
            dead[0].reason.starts_with(&status.to_string()),
            "{}",
            dead[0].reason
        );
        assert!(dead[0].reason.contains(needle), "{}", dead[0].reason);
    }
    assert_eq!(server.count("bookings").await, 0);
    for reason in ["unknown", "revoked", "scope"] {
        assert_eq!(
            server
                .metric(&format!(
                    r#"entrip_ingest_auth_failures_total{{reason="{reason}"}}"#
                ))
                .await,
            1.0,
            "{reason}"
        );
    }
    // A user_id that is not the connection's own is refused by the broker.
    let req = booking_as(&reader, &user_id);
    let channel = up.conn.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let err = try_publish(
        &channel,
        "entrip.ingest",
        "booking.create",
        &reader.name,
        &req.body,
    )
    .await
    .expect_err("a forged user_id is refused");
    assert!(
        err.to_string().contains("PRECONDITION_FAILED") || err.to_string().contains("user_id"),
        "{err}"
    );
    server.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_refused_request_replayed_from_the_dlq_goes_back_to_ingest_and_keeps_its_publisher(
    pool: PgPool,
) {
    let (server, up, vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let front = BrokerUser::new(&vhost, [".*", ".*", ".*"]);
    let mut other = Upstream::connect(&front.url(&vhost)).await;
    let req = booking_as(&front, &user_id);
    // Sent before its client exists: 401, dead-lettered.
    assert_eq!(other.request(&req).await.status, 401);
    entrip_testkit::eventually("the request in the DLQ", || async {
        up.depth("entrip.ingest.dlq").await == 1
    })
    .await;
    let listed = entrip_dispatcher::dlq::list(
        &up.conn.create_channel().await.unwrap(),
        "entrip.ingest.dlq",
        10,
    )
    .await
    .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].routing_key.as_deref(), Some("booking.create"));
    assert!(
        listed[0]
            .reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("401")
    );

    // Listing fetched it unacknowledged; it is back once the broker has it.
    entrip_testkit::eventually("the listed request back in the DLQ", || async {
        up.depth("entrip.ingest.dlq").await == 1
    })
    .await;
    // Replayed before the cause is fixed, it fails again, and the replay
    // stops: it takes what the DLQ held when it began, not its own returns.
    let replayed = replay_ingest_dlq(&up, &vhost).await;
    assert_eq!(replayed, 1);
    assert_eq!(other.reply().await.status, 401);
    entrip_testkit::eventually("the request back in the DLQ", || async {
        up.depth("entrip.ingest.dlq").await == 1
    })
    .await;

    // The operator fixes the cause, then replays: as the client's request.
    client_of(&server, "booking-front", Scope::BookingsWrite, &front).await;
    let replayed = replay_ingest_dlq(&up, &vhost).await;
    assert_eq!(replayed, 1);
    let reply = other.reply().await;
    assert_eq!(
        (reply.status, reply.replayed),
        (201, false),
        "{:?}",
        reply.body
    );
    assert_eq!(creator(&server, &reply).await, "client:booking-front");
    assert_eq!(up.depth("entrip.ingest.dlq").await, 0);
    // Nothing went to the events exchange's queues.
    assert_eq!(up.depth("entrip.settlement").await, 0);
    server.stop().await;
}

/// A new booking published as broker user `user`.
fn booking_as(user: &BrokerUser, user_id: &str) -> Req {
    let mut req = Req::new(
        "booking.create",
        &key(),
        &booking_body(user_id, &unique_code(), false),
    );
    req.user = Some(user.name.clone());
    req
}

/// `dispatcher dlq replay entrip.ingest.dlq`, as the fleet's broker user.
async fn replay_ingest_dlq(up: &Upstream, vhost: &Vhost) -> usize {
    entrip_dispatcher::dlq::replay(
        &up.conn.create_channel().await.unwrap(),
        "entrip.ingest.dlq",
        None,
        &amqp::user_of(&vhost.url()),
    )
    .await
    .unwrap()
}

/// The audit actor of the booking a reply names.
async fn creator(server: &Server, reply: &Reply) -> String {
    sqlx::query_scalar(
        "SELECT actor FROM audit_log WHERE entity_id = $1::uuid AND action = 'booking.create'",
    )
    .bind(reply.body["id"].as_str().unwrap())
    .fetch_one(&server.pool)
    .await
    .unwrap()
}

/// A message the broker dead-lettered itself (`x-delivery-limit`, after
/// ingest crashed on it again and again) keeps its upstream's `user_id`;
/// RabbitMQ would refuse that `user_id` from the replaying operator, so
/// the replay moves it to `x-entrip-user-id`, and ingest stores the request
/// as its client's.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_request_the_broker_dead_lettered_replays_as_its_publishers(pool: PgPool) {
    let (server, up, vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let front = BrokerUser::new(&vhost, [".*", ".*", ".*"]);
    client_of(&server, "booking-front", Scope::BookingsWrite, &front).await;
    let mut other = Upstream::connect(&front.url(&vhost)).await;
    let req = booking_as(&front, &user_id);
    // As the broker leaves it: the publisher's own properties, in the DLQ.
    other.publish_to("", "entrip.ingest.dlq", &req).await;
    entrip_testkit::eventually("the request in the DLQ", || async {
        up.depth("entrip.ingest.dlq").await == 1
    })
    .await;
    let replayed = replay_ingest_dlq(&up, &vhost).await;
    assert_eq!(replayed, 1);
    let reply = other.reply().await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(creator(&server, &reply).await, "client:booking-front");
    assert_eq!(up.depth("entrip.ingest.dlq").await, 0);
    server.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_reply_to_one_of_the_fleets_queues_is_refused_and_not_sent_there(pool: PgPool) {
    let (server, up, vhost) = start(pool).await;
    let user_id = server.create_user().await;
    let mut req = Req::new(
        "booking.create",
        &key(),
        &booking_body(&user_id, &unique_code(), false),
    );
    req.reply_to = ReplyTo::Queue("entrip.settlement".into());
    up.publish(&req).await;
    let dead = up.dead(1).await;
    assert_eq!(dead[0].message_id, req.key);
    assert!(
        dead[0].reason.starts_with("400") && dead[0].reason.contains("reply_to"),
        "{}",
        dead[0].reason
    );
    assert_eq!(up.depth("entrip.settlement").await, 0, "nothing sent there");
    assert_eq!(server.count("bookings").await, 0);
    // A request of no type, dead-lettered by ingest itself, replays too.
    let mut untyped = Req::new("booking.create", &key(), &json!({}));
    untyped.kind = None;
    untyped.reply_to = ReplyTo::None;
    up.publish(&untyped).await;
    assert_eq!(up.dead(1).await[0].message_id, untyped.key);
    up.publish(&untyped).await;
    entrip_testkit::eventually("the untyped request in the DLQ", || async {
        up.depth("entrip.ingest.dlq").await == 1
    })
    .await;
    let replayed = replay_ingest_dlq(&up, &vhost).await;
    assert_eq!(replayed, 1);
    server.stop().await;
}
