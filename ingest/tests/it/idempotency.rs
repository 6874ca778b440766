//! Idempotency: replays, misuse, simultaneous requests with one key,
//! simultaneous requests for one booking code, and key expiry.

use crate::support::{Resp, Server, booking_body, key, unique_code};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_replay_returns_the_stored_answer_and_stores_nothing_new(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let body = booking_body(&user, &unique_code(), false);
    let k = key();

    let first = s.post("/v1/bookings", Some(&k), &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    assert!(first.headers.get("idempotent-replayed").is_none());

    let second = s.post("/v1/bookings", Some(&k), &body).await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(second.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(second.body, first.body);

    assert_eq!(s.count("bookings").await, 1);
    let audit: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE entity_type = 'booking'")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!(audit, 1);
    let outbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = 'booking.created'")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!(outbox, 1);
    let replays = s
        .metric(r#"entrip_idempotency_replays_total{route="/v1/bookings"}"#)
        .await;
    assert_eq!(replays, 1.0);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn the_same_body_with_other_whitespace_or_key_order_is_a_replay(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let k = key();
    let compact = format!(
        r#"{{"name":"Lee","email":"lee-{}@example.com","phone":"010-1234-5678"}}"#,
        uuid::Uuid::new_v4().simple()
    );
    let v: serde_json::Value = serde_json::from_str(&compact).unwrap();
    let reordered = format!(
        "{{ \"phone\": \"010-1234-5678\",\n \"email\": {},\n \"name\": \"Lee\" }}",
        v["email"]
    );
    let a = s
        .post_raw("/v1/users", Some(&k), compact.into_bytes())
        .await;
    let b = s
        .post_raw("/v1/users", Some(&k), reordered.into_bytes())
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(b.status, StatusCode::CREATED);
    assert_eq!(b.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(a.body, b.body);
    let _ = user;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn the_same_key_with_another_body_or_endpoint_is_422(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let k = key();
    let body = booking_body(&user, &unique_code(), false);
    assert_eq!(
        s.post("/v1/bookings", Some(&k), &body).await.status,
        StatusCode::CREATED
    );

    let mut other = body.clone();
    other["amount"] = json!("350001");
    let r = s.post("/v1/bookings", Some(&k), &other).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.is_problem(), "{:?}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("different request body")
    );

    let r = s
        .post(
            "/v1/users",
            Some(&k),
            &json!({"name": "X", "email": "x@example.com", "phone": "0101234567"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("another endpoint")
    );

    assert_eq!(s.count("bookings").await, 1);
    assert_eq!(s.count("users").await, 1);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn fifty_simultaneous_requests_with_one_key_cause_one_effect(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let body = booking_body(&user, &unique_code(), false);
    let k = key();
    let answers = join_all((0..50).map(|_| s.post("/v1/bookings", Some(&k), &body))).await;

    let first = &answers[0];
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    for a in &answers {
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        assert_eq!(a.body, first.body);
    }
    let replayed = replayed(&answers);
    assert_eq!(replayed, 49, "exactly one request did the work");
    assert_eq!(s.count("bookings").await, 1);
    let outbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = 'booking.created'")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!(outbox, 1);
    let audit: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'booking.create'")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!(audit, 1);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn fifty_simultaneous_keys_for_one_booking_code_store_one_booking(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let body = booking_body(&user, &unique_code(), false);
    let keys: Vec<String> = (0..50).map(|_| key()).collect();
    let answers = join_all(keys.iter().map(|k| s.post("/v1/bookings", Some(k), &body))).await;

    let created = answers
        .iter()
        .filter(|a| a.status == StatusCode::CREATED)
        .count();
    let conflicts = answers
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT)
        .count();
    assert_eq!(
        created,
        1,
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert_eq!(conflicts, 49);
    for a in answers.iter().filter(|a| a.status == StatusCode::CONFLICT) {
        assert!(a.is_problem());
        assert!(
            a.body["detail"]
                .as_str()
                .unwrap()
                .contains("code already exists")
        );
    }
    assert_eq!(s.count("bookings").await, 1);
    assert_eq!(s.count("outbox WHERE topic = 'booking.created'").await, 1);
    assert_eq!(s.count("audit_log WHERE entity_type = 'booking'").await, 1);
    // Only the winner's key is stored; the losers may retry their keys.
    assert_eq!(
        s.count("idempotency_keys").await,
        2,
        "the user's key and the winner's"
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_expired_key_is_purged_and_may_be_used_again(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let k = key();
    let body = booking_body(&user, &unique_code(), false);
    assert_eq!(
        s.post("/v1/bookings", Some(&k), &body).await.status,
        StatusCode::CREATED
    );

    // Age the key past its expiry.
    expire_keys(&s.pool, Some(&k)).await;

    // An expired key that is not purged yet is taken over as new: the new
    // request is executed (here: a different booking).
    let body2 = booking_body(&user, &unique_code(), false);
    let r = s.post("/v1/bookings", Some(&k), &body2).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert!(r.headers.get("idempotent-replayed").is_none());
    assert_eq!(s.count("bookings").await, 2);

    expire_keys(&s.pool, None).await;
    let purged = entrip_ingest::idempotency::purge_expired(&s.pool, 1)
        .await
        .unwrap();
    assert_eq!(
        purged, 2,
        "the user key and the taken-over booking key, one per batch"
    );
    assert_eq!(s.count("idempotency_keys").await, 0);
    // Effects stay.
    assert_eq!(s.count("bookings").await, 2);
}

/// Simultaneous requests on an expired key that is not purged yet: one
/// takes it over (`take_over_expired`), the others wait for it and then
/// replay its answer, so the takeover causes one effect too.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn simultaneous_requests_on_an_expired_key_cause_one_effect(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let k = key();
    let first = s
        .post(
            "/v1/bookings",
            Some(&k),
            &booking_body(&user, &unique_code(), false),
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    expire_keys(&s.pool, Some(&k)).await;

    let body = booking_body(&user, &unique_code(), false);
    let answers = join_all((0..20).map(|_| s.post("/v1/bookings", Some(&k), &body))).await;
    for a in &answers {
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        assert_eq!(a.body, answers[0].body);
    }
    assert_ne!(answers[0].body["id"], first.body["id"], "a new booking");
    let replayed = replayed(&answers);
    assert_eq!(replayed, 19, "exactly one request took the key over");
    assert_eq!(s.count("bookings").await, 2);
    assert_eq!(
        s.count("idempotency_keys").await,
        2,
        "the user's key and this one"
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_refused_request_stores_no_key(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let k = key();
    let mut body = booking_body(&user, &unique_code(), false);
    let stranger = uuid::Uuid::new_v4();
    body["userId"] = json!(stranger);
    let r = s.post("/v1/bookings", Some(&k), &body).await;
    // The booking's foreign key finds the user missing (no lookup first):
    // the same 404 naming the user, and nothing of the request stays.
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    assert!(r.is_problem(), "{:?}", r.body);
    let detail = r.body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("user") && detail.contains(&stranger.to_string()),
        "{detail}"
    );
    assert_eq!(s.count("bookings").await, 0);
    assert_eq!(s.count("audit_log WHERE entity_type = 'booking'").await, 0);
    assert_eq!(s.count("outbox WHERE topic = 'booking.created'").await, 0);
    // The same key, corrected, now works: nothing was stored under it.
    body["userId"] = json!(user);
    let r = s.post("/v1/bookings", Some(&k), &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert!(r.headers.get("idempotent-replayed").is_none());
}

/// A replay of a committed answer reads the key without locking it (the
/// claim's `ON CONFLICT DO NOTHING` and its read: no write), so it is
/// answered even while another transaction holds the key's row lock.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_replay_of_a_committed_answer_takes_no_row_lock(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let body = booking_body(&user, &unique_code(), false);
    let k = key();
    let first = s.post("/v1/bookings", Some(&k), &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);

    let mut holder = s.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM idempotency_keys WHERE key = $1 FOR UPDATE")
        .bind(&k)
        .execute(&mut *holder)
        .await
        .unwrap();
    let replay = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.post("/v1/bookings", Some(&k), &body),
    )
    .await
    .expect("the replay waited for the row lock");
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(replay.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(replay.body, first.body);

    // Misuse of the key is answered on the same path.
    let other = booking_body(&user, &unique_code(), false);
    let misuse = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.post("/v1/bookings", Some(&k), &other),
    )
    .await
    .expect("the misuse answer waited for the row lock");
    assert_eq!(
        misuse.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        misuse.body
    );
    holder.rollback().await.unwrap();
    assert_eq!(s.count("bookings").await, 1);
}

/// Ages `key` (every key when `None`) a day past its expiry.
async fn expire_keys(pool: &PgPool, key: Option<&str>) {
    sqlx::query(
        "UPDATE idempotency_keys
            SET created_at = now() - interval '2 days', expires_at = now() - interval '1 day'
          WHERE $1::text IS NULL OR key = $1",
    )
    .bind(key)
    .execute(pool)
    .await
    .unwrap();
}

/// How many of `answers` say they replay a stored answer.
fn replayed(answers: &[Resp]) -> usize {
    answers
        .iter()
        .filter(|a| a.headers.get("idempotent-replayed").is_some())
        .count()
}
