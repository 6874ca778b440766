//! `ServiceRole`: the role owns schema public and every object in it, has
//! no superuser rights, and is gone afterwards whether the test cleaned up,
//! forgot, or panicked; `service_sessions` sees the binaries' sessions and
//! tells a superuser's apart.

use std::str::FromStr;

use entrip_testkit::pg::{ServiceRole, service_sessions};
use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// Objects of every kind the helper gives away, created by the superuser.
const OBJECTS: &str = "
    CREATE TYPE kind AS ENUM ('a', 'b');
    CREATE TYPE pair AS (a int, b int);
    CREATE TYPE span AS RANGE (subtype = int8);
    CREATE DOMAIN positive AS int CHECK (VALUE > 0);
    CREATE TABLE _sqlx_migrations (version bigint PRIMARY KEY);
    CREATE TABLE things (id bigserial PRIMARY KEY, n int GENERATED ALWAYS AS IDENTITY, kind kind);
    CREATE SEQUENCE counter;
    CREATE VIEW thing_ids AS SELECT id FROM things;
    CREATE FUNCTION answer() RETURNS int LANGUAGE sql AS 'SELECT 42';
";

/// What in schema public (the schema included) the role does not own.
async fn not_owned_by(pool: &PgPool, role: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT kind || ' ' || name FROM (
             SELECT 'schema' kind, nspname::text name, nspowner owner FROM pg_namespace WHERE nspname = 'public'
             UNION ALL SELECT 'relation', relname::text, relowner FROM pg_class WHERE relnamespace = 'public'::regnamespace
             UNION ALL SELECT 'function', proname::text, proowner FROM pg_proc WHERE pronamespace = 'public'::regnamespace
             UNION ALL SELECT 'type', typname::text, typowner FROM pg_type WHERE typnamespace = 'public'::regnamespace
         ) o WHERE owner <> (SELECT oid FROM pg_roles WHERE rolname = $1)
         ORDER BY 1",
    )
    .bind(role)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn role_exists(pool: &PgPool, role: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn the_role_owns_everything_has_no_rights_beyond_and_is_dropped(pool: PgPool) {
    sqlx::raw_sql(OBJECTS).execute(&pool).await.unwrap();
    let current: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    // PostgreSQL's own (schema public is pg_database_owner's).
    let before = not_owned_by(&pool, &current).await;
    let role = ServiceRole::create(&pool).await.unwrap();
    let name = role.name().to_owned();
    assert!(name.starts_with("entrip_t_"), "{name}");
    assert_eq!(not_owned_by(&pool, &name).await, Vec::<String>::new());

    let as_role = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(PgConnectOptions::from_str(role.url()).unwrap())
        .await
        .unwrap();
    let (user, sup, createdb, createrole): (String, bool, bool, bool) = sqlx::query_as(
        "SELECT current_user::text, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&as_role)
    .await
    .unwrap();
    assert_eq!(
        (user.as_str(), sup, createdb, createrole),
        (name.as_str(), false, false, false)
    );
    // It may do what a migration does in its schema…
    sqlx::raw_sql(
        "CREATE TABLE more (id int); INSERT INTO things (kind) VALUES ('a');
         ALTER TABLE things ADD COLUMN note text; SELECT answer(), nextval('counter');",
    )
    .execute(&as_role)
    .await
    .unwrap();
    // …but not create databases or roles.
    for sql in ["CREATE DATABASE entrip_t_nope", "CREATE ROLE entrip_t_nope"] {
        let err = sqlx::raw_sql(sql).execute(&as_role).await.unwrap_err();
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .unwrap_or_default();
        assert_eq!(code, "42501", "{sql}: {err}");
    }
    as_role.close().await;

    role.drop_role().await.unwrap();
    assert!(!role_exists(&pool, &name).await);
    // What it owned went back to the superuser, data and all.
    let things: i64 = sqlx::query_scalar("SELECT count(*) FROM things")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(things, 1);
    let left = not_owned_by(&pool, &current).await;
    assert!(
        left.iter().all(|o| before.contains(o)),
        "not given back: {left:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn a_role_the_test_forgot_is_dropped_with_the_value(pool: PgPool) {
    let role = ServiceRole::create(&pool).await.unwrap();
    let name = role.name().to_owned();
    // A session of the role still open, as a binary left running would be.
    let as_role = PgPool::connect(role.url()).await.unwrap();
    sqlx::query("SELECT 1").execute(&as_role).await.unwrap();
    drop(role);
    assert!(!role_exists(&pool, &name).await);
    as_role.close().await;
}

#[sqlx::test(migrations = false)]
async fn a_test_that_panics_leaves_no_role(pool: PgPool) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn({
        let pool = pool.clone();
        async move {
            let role = ServiceRole::create(&pool).await.unwrap();
            tx.send(role.name().to_owned()).unwrap();
            panic!("the test fails with the role in scope");
        }
    });
    assert!(task.await.unwrap_err().is_panic());
    let name = rx.await.unwrap();
    assert!(!role_exists(&pool, &name).await);
}

#[sqlx::test(migrations = false)]
async fn a_panicking_test_s_open_transaction_does_not_hold_up_the_cleanup(pool: PgPool) {
    sqlx::raw_sql(OBJECTS).execute(&pool).await.unwrap();
    sqlx::raw_sql("INSERT INTO things (kind) VALUES ('a')")
        .execute(&pool)
        .await
        .unwrap();
    let role = ServiceRole::create(&pool).await.unwrap();
    let name = role.name().to_owned();
    // Row locks on a table the role owns, held by an open transaction, as
    // a panicking test leaves them (sqlx sends the ROLLBACK of a dropped
    // transaction only when its connection is used again).
    let mut held = PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; SELECT id FROM things FOR UPDATE")
        .execute(&mut held)
        .await
        .unwrap();
    drop(role);
    assert!(!role_exists(&pool, &name).await);
    drop(held);
}

#[sqlx::test(migrations = false)]
async fn service_sessions_sees_the_binaries_and_tells_superusers(pool: PgPool) {
    let role = ServiceRole::create(&pool).await.unwrap();
    let as_role = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            PgConnectOptions::from_str(role.url())
                .unwrap()
                .application_name("entrip-ingest"),
        )
        .await
        .unwrap();
    // Not a service: not counted.
    let other = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            PgConnectOptions::from_str(role.url())
                .unwrap()
                .application_name("psql"),
        )
        .await
        .unwrap();
    let seen = service_sessions(&pool).await.unwrap();
    assert_eq!(seen.sessions.len(), 1, "{seen:?}");
    assert_eq!(seen.sessions[0].application_name, "entrip-ingest");
    assert_eq!(seen.sessions[0].role, role.name());
    assert!(!seen.any_superuser);
    seen.assert_least_privilege(&["ingest"]);

    let superuser = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            (*pool.connect_options())
                .clone()
                .application_name("entrip-workers"),
        )
        .await
        .unwrap();
    let seen = service_sessions(&pool).await.unwrap();
    assert_eq!(seen.sessions.len(), 2, "{seen:?}");
    assert!(seen.any_superuser);
    let caught = std::panic::catch_unwind(|| seen.assert_least_privilege(&["ingest"]));
    assert!(caught.is_err(), "a superuser session must fail the check");
    for p in [as_role, other, superuser] {
        p.close().await;
    }
    role.drop_role().await.unwrap();
}
