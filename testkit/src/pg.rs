//! PostgreSQL roles for tests that run the service binaries: the database
//! of a `#[sqlx::test]` handed to a login role of its own without superuser
//! rights, as the services run in production (the role `entrip`), and a
//! look at the binaries' sessions in `pg_stat_activity`.
//!
//! Roles are cluster-wide, so a test must leave none behind:
//! [`ServiceRole::drop_role`] removes the role while the test database
//! still exists, and dropping a [`ServiceRole`] that was not removed (a
//! test that forgot, or panicked) does the same on a thread and runtime of
//! its own.

use std::thread;

use sqlx::{ConnectOptions, Connection, PgPool, postgres::PgConnectOptions};

/// The statements that give schema public and everything in it to the role
/// named by the setting `entrip.new_owner`, shared with `scripts/lib.sh`.
const GIVE_SCHEMA_PUBLIC: &str = include_str!("../../scripts/sql/give-schema-public.sql");

/// A login role `entrip_t_<random hex>` (NOSUPERUSER NOCREATEDB
/// NOCREATEROLE, random password) that owns schema public of one test
/// database and every object in it; [`ServiceRole::url`] is the URL the
/// service binaries get.
pub struct ServiceRole {
    name: String,
    password: String,
    url: String,
    /// The superuser's options for the test database: what the cleanup
    /// connects with.
    admin: PgConnectOptions,
    dropped: bool,
}

impl ServiceRole {
    /// Creates the role and gives it schema public of `pool`'s database and
    /// every table, sequence, view, function and type in it, so call it
    /// after the migrations ran (`#[sqlx::test(migrator = ...)]`). `pool`
    /// must be a superuser's (the one `#[sqlx::test]` connects as).
    pub async fn create(pool: &PgPool) -> sqlx::Result<Self> {
        let admin = (*pool.connect_options()).clone();
        let name = format!("entrip_t_{}", uuid::Uuid::new_v4().simple());
        let password = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let host = admin.get_host();
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let url = format!(
            "postgres://{name}:{password}@{host}:{}/{}",
            admin.get_port(),
            admin.get_database().unwrap_or("postgres")
        );
        let mut conn = pool.acquire().await?;
        // Name and password are hex: nothing to quote.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{password}'"
        )))
        .execute(&mut *conn)
        .await?;
        // From here on, a failure drops the role again (Drop).
        let role = Self {
            name,
            password,
            url,
            admin,
            dropped: false,
        };
        let mut tx = conn.begin().await?;
        sqlx::query("SELECT set_config('entrip.new_owner', $1, true)")
            .bind(&role.name)
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(GIVE_SCHEMA_PUBLIC).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(role)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// `postgres://role:password@host:port/database` of the test database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Ends the role's sessions, gives what it owns back to the superuser
    /// (`REASSIGN OWNED`), drops its privileges (`DROP OWNED`) and the role.
    /// Call it at the end of the test, after the binaries stopped.
    pub async fn drop_role(mut self) -> sqlx::Result<()> {
        self.dropped = true;
        drop_role(&self.admin, &self.name).await
    }
}

async fn drop_role(admin: &PgConnectOptions, name: &str) -> sqlx::Result<()> {
    let mut conn = admin.connect().await?;
    // Waits (up to 5 s each) until the sessions are gone, so that the test
    // database can be dropped after the test.
    sqlx::query(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
          WHERE usename = $1 AND pid <> pg_backend_pid()",
    )
    .bind(name)
    .execute(&mut conn)
    .await?;
    // Giving back takes each table's exclusive lock. A test that panicked
    // may have left a transaction holding row locks (sqlx rolls a dropped
    // one back only when its connection is used again): rather than wait
    // for it forever, end the database's other sessions and try again.
    sqlx::raw_sql("SET lock_timeout = '5s'")
        .execute(&mut conn)
        .await?;
    // One implicit transaction: all of it or nothing.
    let give_back =
        format!("REASSIGN OWNED BY {name} TO CURRENT_USER; DROP OWNED BY {name}; DROP ROLE {name}");
    let first = sqlx::raw_sql(sqlx::AssertSqlSafe(give_back.clone()))
        .execute(&mut conn)
        .await;
    match first {
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
            sqlx::query(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .execute(&mut conn)
            .await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(give_back))
                .execute(&mut conn)
                .await?;
        }
        other => {
            other?;
        }
    }
    conn.close().await
}

impl Drop for ServiceRole {
    /// The fallback of a test that did not call [`ServiceRole::drop_role`]
    /// (or panicked): the same on a thread with a runtime of its own, since
    /// the test's runtime may be the current thread's or gone. It never
    /// panics (a panic while unwinding aborts); a failure is printed.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        self.dropped = true;
        let admin = self.admin.clone();
        let name = self.name.clone();
        let outcome = thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(drop_role(&admin, &name))
                .map_err(|e| e.to_string())
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("entrip_testkit: could not drop role {}: {e}", self.name),
            Err(_) => eprintln!("entrip_testkit: dropping role {} panicked", self.name),
        }
    }
}

/// One session of a service binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub application_name: String,
    pub role: String,
    pub superuser: bool,
}

/// The service binaries' sessions in one database.
#[derive(Debug, Clone)]
pub struct ServiceSessions {
    pub sessions: Vec<Session>,
    /// Whether any of them runs as a superuser.
    pub any_superuser: bool,
}

/// The sessions of the current database (the pool's) whose
/// `application_name` starts with `entrip-` (the service binaries name
/// theirs `entrip-<binary>`), with their roles (`pg_stat_activity` joined
/// with `pg_roles` on `usesysid`). Call it with a superuser's pool: others
/// may not see every session.
pub async fn service_sessions(pool: &PgPool) -> sqlx::Result<ServiceSessions> {
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT a.application_name, r.rolname::text, r.rolsuper
           FROM pg_stat_activity a
           JOIN pg_roles r ON r.oid = a.usesysid
          WHERE a.datname = current_database()
            AND a.application_name LIKE 'entrip-%'
            AND a.pid <> pg_backend_pid()
          ORDER BY a.application_name, a.pid",
    )
    .fetch_all(pool)
    .await?;
    let sessions: Vec<Session> = rows
        .into_iter()
        .map(|(application_name, role, superuser)| Session {
            application_name,
            role,
            superuser,
        })
        .collect();
    let any_superuser = sessions.iter().any(|s| s.superuser);
    Ok(ServiceSessions {
        sessions,
        any_superuser,
    })
}

impl ServiceSessions {
    /// Panics unless there is at least one session of each of `binaries`
    /// (`"ingest"` for `entrip-ingest`, …) and none is a superuser's.
    pub fn assert_least_privilege(&self, binaries: &[&str]) {
        assert!(
            !self.sessions.is_empty(),
            "no session of a service binary in pg_stat_activity"
        );
        for binary in binaries {
            let name = format!("entrip-{binary}");
            assert!(
                self.sessions.iter().any(|s| s.application_name == name),
                "no session named {name}: {:?}",
                self.sessions
            );
        }
        assert!(
            !self.any_superuser,
            "a service binary runs as a superuser: {:?}",
            self.sessions
        );
    }
}
