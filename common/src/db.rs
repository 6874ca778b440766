//! The PostgreSQL pool: creates the database when missing, applies the
//! migrations (sqlx holds an advisory lock, so concurrent starts are safe),
//! and classifies errors so that callers can tell "database away" (retry
//! later) from "this request is wrong".

use std::{str::FromStr, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use sqlx::{
    PgPool, Postgres,
    migrate::{MigrateDatabase, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::DatabaseSettings;

/// The workspace's migrations, also used by `#[sqlx::test(migrator = ...)]`.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("key `database.url`: {0}")]
    Url(#[source] sqlx::Error),
    #[error("cannot reach PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Pool options shared by every service and by tests that build their own pool.
pub fn pool_options(settings: &DatabaseSettings) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .test_before_acquire(true)
}

/// Connect options with the statement timeout applied.
pub fn connect_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, DbError> {
    let opts = PgConnectOptions::from_str(&settings.url).map_err(DbError::Url)?;
    Ok(opts
        .options([(
            "statement_timeout",
            settings.statement_timeout_ms.to_string(),
        )])
        .application_name("entrip"))
}

/// Creates the database if needed, connects (retrying with backoff for up
/// to `startup_timeout_secs`), and applies the migrations.
pub async fn connect_and_migrate(settings: &DatabaseSettings) -> Result<PgPool, DbError> {
    let opts = connect_options(settings)?;
    let deadline = Duration::from_secs(settings.startup_timeout_secs);
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .with_total_delay(Some(deadline))
        .without_max_times();
    let url = settings.url.clone();
    let pool = (|| async {
        ensure_database(&url).await?;
        pool_options(settings).connect_with(opts.clone()).await
    })
    .retry(backoff)
    .when(is_unavailable)
    .notify(|err, wait| tracing::warn!(%err, ?wait, "PostgreSQL not reachable yet; retrying"))
    .await
    .map_err(DbError::Connect)?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

async fn ensure_database(url: &str) -> Result<(), sqlx::Error> {
    if Postgres::database_exists(url).await? {
        return Ok(());
    }
    match Postgres::create_database(url).await {
        Ok(()) => {
            tracing::info!("created the database");
            Ok(())
        }
        // Another service created it at the same moment.
        Err(err) if Postgres::database_exists(url).await.unwrap_or(false) => {
            tracing::debug!(%err, "database created concurrently");
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// True when the error means "the database is not there right now" rather
/// than "this statement is wrong": callers answer 503 and retry.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| is_transient_sqlstate(&c)) || refuses_connections(db.as_ref())
        }
        _ => false,
    }
}

/// FATAL 55000 when connecting: "database … is not currently accepting
/// connections" (`ALTER DATABASE … ALLOW_CONNECTIONS false`, e.g. during
/// maintenance). The database is away, not the request wrong. Only the
/// FATAL form: an ERROR 55000 is a statement's fault.
fn refuses_connections(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some_and(|e| {
            e.code() == "55000" && matches!(e.severity(), sqlx::postgres::PgSeverity::Fatal)
        })
}

/// SQLSTATEs after which the same request may succeed when retried:
/// connection exceptions, serialization failures and deadlocks, operator
/// intervention (terminated backends, shutdown), insufficient resources,
/// and lock or statement timeouts.
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || matches!(code, "40001" | "40P01" | "55P03" | "57014")
}

/// The constraint named by a unique violation (SQLSTATE 23505), if that is
/// what the error is.
pub fn unique_violation(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            Some(db.constraint().unwrap_or_default().to_owned())
        }
        _ => None,
    }
}
