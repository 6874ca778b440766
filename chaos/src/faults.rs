//! The fault injector: during the load phase, at seeded random moments, it
//! closes the vhost's AMQP connections, SIGKILLs a dispatcher or the workers
//! and restarts them after a short delay (two dispatchers stay the norm),
//! terminates the database's PostgreSQL backends, opens 500 and hang windows
//! on the webhook receiver and, only when asked (never in tests, it is
//! broker-wide), stops and starts the RabbitMQ application. Every injected
//! fault is counted, and the moments a fault could make the workers lose
//! their record of a webhook's 2xx are kept as [`Hit`]s. A service that exits
//! by itself is noted and restarted alone; a stopped broker application is
//! started again if the injector is dropped (Ctrl-C, panic) while it is down.

use std::{
    collections::BTreeMap,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sqlx::{Connection, postgres::PgConnectOptions};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    Error,
    fleet::{self, Fleet},
    receiver::Receiver,
    rng::Rng,
};

/// What the injector may do and how often.
#[derive(Debug, Clone)]
pub struct FaultSettings {
    pub vhost: String,
    pub database_url: String,
    pub database: String,
    /// Pause between two faults: uniform in this range.
    pub interval: (Duration, Duration),
    pub broker_restart: bool,
    /// Planned length of the load phase (places the broker restarts).
    pub load_duration: Duration,
    pub webhook_timeout: Duration,
}

/// A fault that may reach the workers' work in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HitKind {
    /// SIGKILL of the workers process.
    WorkersKill,
    /// `pg_terminate_backend` of every backend of the database.
    BackendsTerminated,
    /// The database refusing connections (its backends terminated first).
    DatabaseOutage,
    /// `rabbitmqctl close_all_connections` on the vhost.
    AmqpClose,
}

impl HitKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::WorkersKill => "workers SIGKILL",
            Self::BackendsTerminated => "backends terminated",
            Self::DatabaseOutage => "database outage",
            Self::AmqpClose => "AMQP connections closed",
        }
    }
}

/// When a fault struck: between `from` and `to` (the moments before and
/// after the action; equal for a SIGKILL, taken once the process is reaped).
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    pub kind: HitKind,
    pub from: Instant,
    pub to: Instant,
}

/// Injected faults by kind, plus what went wrong injecting them.
#[derive(Debug, Default, Clone)]
pub struct FaultLog {
    pub counts: BTreeMap<String, u64>,
    /// Backends `pg_terminate_backend` ended, in all.
    pub backends_terminated: u64,
    /// Faults that may reach the workers' work in flight, for matching
    /// duplicate webhooks against.
    pub hits: Vec<Hit>,
    pub errors: Vec<String>,
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn count(log: &Shared<FaultLog>, kind: &str) {
    *lock(log).counts.entry(kind.to_owned()).or_default() += 1;
}

fn hit(log: &Shared<FaultLog>, kind: HitKind, from: Instant, to: Instant) {
    lock(log).hits.push(Hit { kind, from, to });
}

fn error(log: &Shared<FaultLog>, what: String) {
    tracing::warn!("fault injector: {what}");
    lock(log).errors.push(what);
}

/// Runs `rabbitmqctl` with `args`; `Err` carries its output.
pub async fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("rabbitmqctl {args:?}: {}", text.trim()))
    }
}

/// Terminates every backend of the database but the chaos driver's own;
/// returns how many.
pub async fn terminate_backends(database_url: &str, database: &str) -> Result<i64, Error> {
    let opts = PgConnectOptions::from_str(database_url)?.application_name("entrip-chaos-fault");
    let mut conn = sqlx::PgConnection::connect_with(&opts).await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND pid <> pg_backend_pid()
                AND application_name NOT LIKE 'entrip-chaos%') t",
    )
    .bind(database)
    .fetch_one(&mut conn)
    .await?;
    let _ = conn.close().await;
    Ok(n)
}

/// Makes the database refuse every connection for `d` (existing backends
/// terminated, `ALLOW_CONNECTIONS false`), then allows them again. Run from
/// the maintenance database `postgres`. `terminated_at` is told the moments
/// before and after the backends were terminated. Returns how many were.
pub async fn database_outage(
    database_url: &str,
    database: &str,
    d: Duration,
    terminated_at: impl FnOnce(Instant, Instant),
) -> Result<i64, Error> {
    let opts = PgConnectOptions::from_str(database_url)?
        .database("postgres")
        .application_name("entrip-chaos-fault");
    let mut conn = sqlx::PgConnection::connect_with(&opts).await?;
    let ident = database.replace('"', "\"\"");
    let deny = format!("ALTER DATABASE \"{ident}\" WITH ALLOW_CONNECTIONS false");
    let allow = format!("ALTER DATABASE \"{ident}\" WITH ALLOW_CONNECTIONS true");
    sqlx::raw_sql(sqlx::AssertSqlSafe(deny))
        .execute(&mut conn)
        .await?;
    let before = Instant::now();
    let terminated: Result<i64, sqlx::Error> = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND application_name NOT LIKE 'entrip-chaos%') t",
    )
    .bind(database)
    .fetch_one(&mut conn)
    .await;
    terminated_at(before, Instant::now());
    tokio::time::sleep(d).await;
    // Allow connections again whatever happened above; retried, since the
    // database must not stay closed.
    let mut last = None;
    for _ in 0..10 {
        match sqlx::raw_sql(sqlx::AssertSqlSafe(allow.clone()))
            .execute(&mut conn)
            .await
        {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(c) = sqlx::PgConnection::connect_with(&opts).await {
                    conn = c;
                }
            }
        }
    }
    let _ = conn.close().await;
    if let Some(e) = last {
        return Err(e.into());
    }
    Ok(terminated?)
}

/// Runs `rabbitmqctl start_app` (idempotent) when dropped while armed: a
/// Ctrl-C (the runtime drops the injector's task) or a panic between
/// `stop_app` and `start_app` must not leave the broker stopped.
struct StartAppGuard {
    armed: bool,
}

impl Drop for StartAppGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        eprintln!("chaos: the broker application was left stopped; rabbitmqctl start_app");
        match std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("chaos: rabbitmqctl start_app: {status}"),
            Err(e) => eprintln!("chaos: cannot run rabbitmqctl start_app: {e}"),
        }
    }
}

/// Stops the broker's application, waits, starts it and waits for it.
async fn broker_restart(log: &Shared<FaultLog>, down: Duration) {
    tracing::warn!(
        "fault: rabbitmqctl stop_app (broker-wide), {:.1} s down",
        down.as_secs_f64()
    );
    // Armed before stop_app: if that call is interrupted, the broker may be
    // stopping already.
    let mut guard = StartAppGuard { armed: true };
    if let Err(e) = rabbitmqctl(&["stop_app"]).await {
        error(log, e);
    } else {
        count(log, "broker stop_app/start_app");
    }
    tokio::time::sleep(down).await;
    for attempt in 0..5 {
        match rabbitmqctl(&["start_app"]).await {
            Ok(_) => {
                guard.armed = false;
                break;
            }
            Err(e) => {
                error(log, format!("start_app attempt {attempt}: {e}"));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    if let Err(e) = rabbitmqctl(&["await_startup", "--timeout", "60"]).await {
        error(log, e);
    }
    tracing::warn!("fault: broker application started again");
}

/// Kills `slot`, waits `down`, starts it again.
fn kill_and_restart(
    fleet: Shared<Fleet>,
    log: Shared<FaultLog>,
    slot: usize,
    down: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let (name, binary) = {
            let mut f = lock(&fleet);
            if !f.kill(slot) {
                return;
            }
            (f.services[slot].name.clone(), f.services[slot].binary)
        };
        if slot == fleet::WORKERS {
            // Taken once the process is reaped: it is dead by then.
            let at = Instant::now();
            hit(&log, HitKind::WorkersKill, at, at);
        }
        tracing::warn!(
            "fault: SIGKILL {name}, restart in {:.1} s",
            down.as_secs_f64()
        );
        count(&log, &format!("SIGKILL {binary}"));
        tokio::time::sleep(down).await;
        if let Err(e) = lock(&fleet).start(slot) {
            error(&log, format!("restarting {name}: {e}"));
        }
    })
}

/// Injects faults until `stop` turns true; returns what it did once every
/// restart it began is done.
pub async fn run(
    settings: FaultSettings,
    fleet: Shared<Fleet>,
    receiver: Arc<Receiver>,
    mut rng: Rng,
    mut stop: watch::Receiver<bool>,
) -> FaultLog {
    let log: Shared<FaultLog> = Arc::default();
    let mut pending: Vec<JoinHandle<()>> = Vec::new();
    let mut bag: Vec<u8> = Vec::new();
    let started = tokio::time::Instant::now();
    // Broker restarts at about a third and two thirds of the load.
    let mut broker_at: Vec<Duration> = if settings.broker_restart {
        vec![
            settings.load_duration.mul_f64(0.3 + 0.1 * rng.unit()),
            settings.load_duration.mul_f64(0.6 + 0.1 * rng.unit()),
        ]
    } else {
        Vec::new()
    };
    loop {
        let pause = rng.between(settings.interval.0, settings.interval.1);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        // A service that died by itself is noted (a finding) and restarted,
        // alone: the slots the injector killed stay down for their planned
        // time (their own task restarts them).
        {
            let mut f = lock(&fleet);
            for slot in f.reap_exited() {
                if let Err(e) = f.start(slot) {
                    error(&log, format!("restarting after an exit: {e}"));
                }
            }
        }
        if let Some(at) = broker_at.first()
            && started.elapsed() >= *at
        {
            broker_at.remove(0);
            let down = rng.between(Duration::from_secs(3), Duration::from_secs(6));
            broker_restart(&log, down).await;
            continue;
        }
        if bag.is_empty() {
            // A shuffled round of every kind: each one comes up in every round.
            bag = vec![0, 0, 1, 2, 3, 3, 4, 5, 6];
            for i in (1..bag.len()).rev() {
                bag.swap(i, rng.below(i + 1));
            }
        }
        let kind = bag.pop().unwrap_or(3);
        match kind {
            0 => {
                let reason = format!("chaos: closing connections after {:?}", started.elapsed());
                let from = Instant::now();
                match rabbitmqctl(&["close_all_connections", "-p", &settings.vhost, &reason]).await
                {
                    Ok(out) => {
                        hit(&log, HitKind::AmqpClose, from, Instant::now());
                        tracing::warn!("fault: {}", out.trim().replace('\n', " "));
                        count(&log, "AMQP connections closed (vhost)");
                    }
                    Err(e) => error(&log, e),
                }
            }
            1 => {
                // Kill one dispatcher only while both run: two stay the norm.
                let both = fleet::DISPATCHERS
                    .iter()
                    .all(|s| lock(&fleet).services[*s].is_running());
                if both {
                    let slot = fleet::DISPATCHERS[rng.below(2)];
                    let down = rng.between(Duration::from_millis(300), Duration::from_secs(3));
                    pending.push(kill_and_restart(fleet.clone(), log.clone(), slot, down));
                }
            }
            2 => {
                let down = rng.between(Duration::from_millis(300), Duration::from_secs(3));
                pending.push(kill_and_restart(
                    fleet.clone(),
                    log.clone(),
                    fleet::WORKERS,
                    down,
                ));
            }
            3 => {
                let from = Instant::now();
                match terminate_backends(&settings.database_url, &settings.database).await {
                    Ok(n) => {
                        hit(&log, HitKind::BackendsTerminated, from, Instant::now());
                        tracing::warn!("fault: pg_terminate_backend ended {n} backends");
                        count(&log, "pg_terminate_backend rounds");
                        lock(&log).backends_terminated += n.max(0) as u64;
                    }
                    Err(e) => error(&log, format!("pg_terminate_backend: {e}")),
                }
            }
            6 => {
                let d = rng.between(Duration::from_millis(500), Duration::from_millis(2500));
                tracing::warn!(
                    "fault: PostgreSQL refuses connections to the database for {:.1} s",
                    d.as_secs_f64()
                );
                let outage_log = log.clone();
                let mark = move |from, to| hit(&outage_log, HitKind::DatabaseOutage, from, to);
                match database_outage(&settings.database_url, &settings.database, d, mark).await {
                    Ok(n) => {
                        count(&log, "PostgreSQL outage windows (connections refused)");
                        lock(&log).backends_terminated += n.max(0) as u64;
                    }
                    Err(e) => error(&log, format!("database outage: {e}")),
                }
            }
            4 => {
                let d = rng.between(Duration::from_secs(2), Duration::from_secs(5));
                tracing::warn!(
                    "fault: webhook receiver answers 500 for {:.1} s",
                    d.as_secs_f64()
                );
                receiver.fail_for(d);
                count(&log, "webhook 500 windows");
            }
            _ => {
                let d = rng.between(Duration::from_secs(2), Duration::from_secs(5));
                tracing::warn!("fault: webhook receiver hangs for {:.1} s", d.as_secs_f64());
                receiver.hang_for(d, settings.webhook_timeout + Duration::from_millis(1500));
                count(&log, "webhook hang windows");
            }
        }
        pending.retain(|h| !h.is_finished());
    }
    for h in pending {
        let _ = h.await;
    }
    receiver.heal();
    lock(&log).clone()
}
