//! Atomicity and availability: a failure inside the transaction leaves no
//! trace of the request, and a database that goes away yields 503s with
//! `Retry-After` until it comes back, after which the service recovers.

use std::time::Duration;

use crate::support::{Server, booking_body, key, unique_code};
use entrip_testkit::{Proxy, eventually};
use reqwest::StatusCode;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// A real fault at the outbox insert (a trigger that raises) after the
/// booking row was inserted: nothing of the request is stored, the key is
/// free, and the same key succeeds once the fault is gone.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_fault_at_the_outbox_insert_stores_nothing(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let before_outbox = s.count("outbox").await;
    let before_audit = s.count("audit_log").await;
    let before_keys = s.count("idempotency_keys").await;

    sqlx::raw_sql(
        "CREATE FUNCTION fail_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected fault at the outbox insert'; END; $$;
         CREATE TRIGGER fail_outbox BEFORE INSERT ON outbox
             FOR EACH ROW EXECUTE FUNCTION fail_outbox();",
    )
    .execute(&s.pool)
    .await
    .unwrap();

    let k = key();
    let body = booking_body(&user, &unique_code(), false);
    let r = s.post("/v1/bookings", Some(&k), &body).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{:?}", r.body);
    assert!(r.is_problem(), "{:?}", r.body);
    assert!(
        !r.body["detail"].as_str().unwrap().contains("injected"),
        "internals stay in the logs"
    );

    assert_eq!(
        s.count("bookings").await,
        0,
        "the booking insert was rolled back"
    );
    assert_eq!(s.count("outbox").await, before_outbox);
    assert_eq!(s.count("audit_log").await, before_audit);
    assert_eq!(
        s.count("idempotency_keys").await,
        before_keys,
        "the key is free"
    );

    sqlx::raw_sql("DROP TRIGGER fail_outbox ON outbox")
        .execute(&s.pool)
        .await
        .unwrap();
    let r = s.post("/v1/bookings", Some(&k), &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert!(r.headers.get("idempotent-replayed").is_none());
    assert_eq!(s.count("bookings").await, 1);
    assert_eq!(s.count("outbox WHERE topic = 'booking.created'").await, 1);
    assert_eq!(
        s.count("audit_log WHERE action = 'booking.create'").await,
        1
    );
}

/// A fault at the very last step (storing the idempotent response) also
/// rolls back the effect.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_fault_when_storing_the_response_stores_nothing(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    sqlx::raw_sql(
        "CREATE FUNCTION fail_key() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected fault at the key update'; END; $$;
         CREATE TRIGGER fail_key BEFORE UPDATE ON idempotency_keys
             FOR EACH ROW EXECUTE FUNCTION fail_key();",
    )
    .execute(&s.pool)
    .await
    .unwrap();
    let r = s
        .post(
            "/v1/bookings",
            Some(&key()),
            &booking_body(&user, &unique_code(), false),
        )
        .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{:?}", r.body);
    assert_eq!(s.count("bookings").await, 0);
    assert_eq!(s.count("outbox WHERE topic = 'booking.created'").await, 0);
    assert_eq!(
        s.count("audit_log WHERE action = 'booking.create'").await,
        0
    );
}

/// The database behind a proxy that the test cuts: 503 with Retry-After
/// (never a 500), readiness fails, and everything works again once the
/// connection is back — the request that failed is retried with its key.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn database_unreachable_gives_503_and_the_service_recovers(
    _pool_opts: PgPoolOptions,
    connect_opts: PgConnectOptions,
) {
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let opts = connect_opts.host("127.0.0.1").port(proxy.addr.port());
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(800))
        .connect_with(opts)
        .await
        .unwrap();
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    assert_eq!(s.get("/readyz").await.status, StatusCode::OK);

    proxy.cut();
    let k = key();
    let body = booking_body(&user, &unique_code(), false);
    for _ in 0..3 {
        let r = s.post("/v1/bookings", Some(&k), &body).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
        assert!(r.is_problem(), "{:?}", r.body);
        let retry_after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry_after >= 1);
    }
    let r = s.get(&format!("/v1/users/{user}")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = s.get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        s.get("/healthz").await.status,
        StatusCode::OK,
        "liveness is not readiness"
    );

    proxy.restore();
    eventually(
        "the service is ready again once the database is back",
        || async { s.get("/readyz").await.status == StatusCode::OK },
    )
    .await;
    let r = s.post("/v1/bookings", Some(&k), &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert!(r.headers.get("idempotent-replayed").is_none());
    assert_eq!(s.count("bookings").await, 1);
    assert_eq!(s.get("/readyz").await.status, StatusCode::OK);
    let unavailable = s
        .metric(r#"entrip_ingest_requests_total{route="/v1/bookings",status="503"}"#)
        .await;
    assert!(unavailable >= 3.0, "503s are counted");
    s.stop().await;
}

/// A database that refuses connections (`ALLOW_CONNECTIONS false`, FATAL
/// 55000 on connect; found by the chaos suite, which answered 500 here):
/// 503, then recovery with the same key once connections are allowed again.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn database_refusing_connections_gives_503(
    _pool_opts: PgPoolOptions,
    connect_opts: PgConnectOptions,
) {
    let db = connect_opts.get_database().unwrap().to_owned();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_millis(800))
        .connect_with(connect_opts.clone())
        .await
        .unwrap();
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let admin = sqlx::PgPool::connect_with(connect_opts.database("postgres"))
        .await
        .unwrap();
    let set = |allow: bool| {
        sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{db}\" WITH ALLOW_CONNECTIONS {allow}"
        ))
    };
    sqlx::raw_sql(set(false)).execute(&admin).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db)
        .execute(&admin)
        .await
        .unwrap();

    let k = key();
    let body = booking_body(&user, &unique_code(), false);
    let r = s.post("/v1/bookings", Some(&k), &body).await;
    sqlx::raw_sql(set(true)).execute(&admin).await.unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert!(r.headers.contains_key("retry-after"));

    let r = s.post("/v1/bookings", Some(&k), &body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(s.count("bookings").await, 1);
    admin.close().await;
    s.stop().await;
}
