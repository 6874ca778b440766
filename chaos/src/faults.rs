//! The fault injector: during the load phase, at seeded random moments, it
//! closes the vhost's AMQP connections, SIGKILLs a dispatcher, the workers or
//! ingest and restarts them after a short delay (two dispatchers stay the
//! norm; ingest's AMQP counters are scraped just before its kill, see
//! [`crate::ingest_metrics`]),
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

use serde::Serialize;
use sqlx::{Connection, postgres::PgConnectOptions};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    Error,
    fleet::{self, Fleet},
    ingest_metrics::{self, IngestCounts},
    receiver::Receiver,
    rng::Rng,
};

/// The `application_name` of the driver's own sessions. Not `entrip-…`,
/// which names the fleet's binaries: the faults spare the driver's
/// sessions (`chaos-%`), and tests count the binaries' (`entrip-%`).
pub const DRIVER_APPLICATION_NAME: &str = "chaos-driver";
const FAULT_APPLICATION_NAME: &str = "chaos-fault";

/// What the injector may do and how often.
#[derive(Debug, Clone)]
pub struct FaultSettings {
    pub vhost: String,
    pub database_url: String,
    pub database: String,
    /// Pause between two faults: uniform in this range.
    pub interval: (Duration, Duration),
    pub broker_restart: bool,
    /// On a 3-node cluster: node kills (see [`Fault::NodeKill`]).
    pub cluster: bool,
    /// Planned length of the load phase (places the broker restarts).
    pub load_duration: Duration,
    pub webhook_timeout: Duration,
}

/// Every kind of fault the injector knows. The report counts them by kind
/// (its JSON keys them by the snake_case name); [`Fault::label`] is only
/// their text for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// `rabbitmqctl close_all_connections` on the run's vhost.
    AmqpClose,
    /// SIGKILL of one of the two dispatchers (only while both run),
    /// restarted 0.3–3 s later.
    KillDispatcher,
    /// SIGKILL of the workers, restarted 0.3–3 s later.
    KillWorkers,
    /// SIGKILL of ingest (only while it runs), restarted 0.3–3 s later on
    /// the same port: HTTP requests in flight see their connection fail and
    /// are retried with the same key; AMQP requests it had not acknowledged
    /// are redelivered to the next ingest.
    KillIngest,
    /// `pg_terminate_backend` of every backend of the run's database.
    TerminateBackends,
    /// The database refusing connections for 0.5–2.5 s
    /// (`ALLOW_CONNECTIONS false`, its backends terminated first).
    DatabaseOutage,
    /// The webhook receiver answering 500 for 2–5 s.
    WebhookFailures,
    /// The webhook receiver holding requests past the workers' webhook
    /// timeout for 2–5 s.
    WebhookHang,
    /// `rabbitmqctl stop_app`, 3–6 s down, `start_app`: broker-wide, so only
    /// with `--broker-restart`, and not part of [`MIX`] but placed at about a
    /// third and two thirds of the load.
    BrokerRestart,
    /// On a 3-node cluster (`--cluster`) only: SIGKILL of one node, started
    /// again 3–6 s later (it rejoins), at about a fifth, two fifths, three
    /// fifths and four fifths of the load, by turns the node leading
    /// `entrip.settlement` and the node most of the fleet's connections are
    /// on.
    NodeKill,
}

impl Fault {
    /// The text of the human report.
    pub fn label(self) -> &'static str {
        match self {
            Self::AmqpClose => "AMQP connections closed (vhost)",
            Self::KillDispatcher => "SIGKILL dispatcher",
            Self::KillWorkers => "SIGKILL workers",
            Self::KillIngest => "SIGKILL ingest",
            Self::TerminateBackends => "pg_terminate_backend rounds",
            Self::DatabaseOutage => "PostgreSQL outage windows (connections refused)",
            Self::WebhookFailures => "webhook 500 windows",
            Self::WebhookHang => "webhook hang windows",
            Self::BrokerRestart => "broker stop_app/start_app",
            Self::NodeKill => "SIGKILL of a cluster node (leader or the fleet's), restarted",
        }
    }

    /// The kinds a run injects: the mix, the broker restart when asked, and
    /// the node kills on a cluster.
    pub fn injected(broker_restart: bool, cluster: bool) -> impl Iterator<Item = Self> {
        MIX.iter()
            .map(|(f, _)| *f)
            .chain(broker_restart.then_some(Self::BrokerRestart))
            .chain(cluster.then_some(Self::NodeKill))
    }
}

/// The shuffled mix, with each kind's weight: a round holds every kind this
/// many times, shuffled, so that each one comes up in every round (a short
/// run that completes one round has seen them all) while the cheap, frequent
/// faults of real life come up more often. The broker restart is not in it
/// (see [`Fault::BrokerRestart`]).
pub const MIX: [(Fault, usize); 8] = [
    (Fault::AmqpClose, 2),
    (Fault::KillDispatcher, 1),
    (Fault::KillWorkers, 1),
    (Fault::KillIngest, 1),
    (Fault::TerminateBackends, 2),
    (Fault::DatabaseOutage, 1),
    (Fault::WebhookFailures, 1),
    (Fault::WebhookHang, 1),
];

/// One round of [`MIX`], shuffled; drawn from the end.
pub fn round(rng: &mut Rng) -> Vec<Fault> {
    let mut bag: Vec<Fault> = MIX
        .iter()
        .flat_map(|(fault, weight)| std::iter::repeat_n(*fault, *weight))
        .collect();
    for i in (1..bag.len()).rev() {
        bag.swap(i, rng.below(i + 1));
    }
    bag
}

/// When a fault that may reach the workers' work in flight struck: between
/// `from` and `to` (the moments before and after the action; equal for a
/// SIGKILL, taken once the process is reaped). Kept for
/// [`Fault::AmqpClose`], [`Fault::KillWorkers`], [`Fault::TerminateBackends`]
/// and [`Fault::DatabaseOutage`].
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    pub fault: Fault,
    pub from: Instant,
    pub to: Instant,
}

/// Injected faults by kind, plus what went wrong injecting them.
#[derive(Debug, Default, Clone)]
pub struct FaultLog {
    pub counts: BTreeMap<Fault, u64>,
    /// Rounds of [`MIX`] injected to the end.
    pub rounds: u32,
    /// Backends `pg_terminate_backend` ended, in all.
    pub backends_terminated: u64,
    /// Faults that may reach the workers' work in flight, for matching
    /// duplicate webhooks against.
    pub hits: Vec<Hit>,
    /// Ingest's AMQP counters, scraped just before each of its kills and
    /// summed (each process starts from zero).
    pub ingest_counts: IngestCounts,
    /// Kills of ingest whose scrape failed (their counters are lost).
    pub ingest_scrapes_failed: u64,
    pub errors: Vec<String>,
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn count(log: &Shared<FaultLog>, fault: Fault) {
    *lock(log).counts.entry(fault).or_default() += 1;
}

fn hit(log: &Shared<FaultLog>, fault: Fault, from: Instant, to: Instant) {
    lock(log).hits.push(Hit { fault, from, to });
}

fn error(log: &Shared<FaultLog>, what: String) {
    tracing::warn!("fault injector: {what}");
    lock(log).errors.push(what);
}

/// How long a `rabbitmqctl` call may take (it starts an Erlang VM: seconds
/// on a busy machine) before it counts as failed, so that a broker that
/// stopped answering cannot hold the run forever.
const RABBITMQCTL_TIMEOUT: Duration = Duration::from_secs(90);

/// `scripts/rabbit-cluster` when the run is on a 3-node cluster
/// ([`set_cluster`]): `rabbitmqctl` then goes to its nodes.
static CLUSTER: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Runs the broker commands of this process against the cluster that
/// `script` (`scripts/rabbit-cluster`, with the cluster's settings in the
/// environment) manages, from now on.
pub fn set_cluster(script: std::path::PathBuf) {
    let _ = CLUSTER.set(script);
}

/// Whether the run is on a cluster.
pub fn on_cluster() -> bool {
    CLUSTER.get().is_some()
}

/// Runs `rabbitmqctl` with `args`; `Err` carries its output. On a cluster,
/// through `scripts/rabbit-cluster ctl N` on the first node that answers
/// (the others may be down by a fault).
pub async fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let Some(script) = CLUSTER.get() else {
        return rabbitmqctl_on(tokio::process::Command::new("rabbitmqctl"), args).await;
    };
    let mut last = String::new();
    for node in ["1", "2", "3"] {
        match rabbitmqctl_on(cluster_script(script, &["ctl", node]), args).await {
            Ok(out) => return Ok(out),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// `scripts/rabbit-cluster <args>`.
fn cluster_script(script: &std::path::Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(script).args(args);
    cmd
}

async fn rabbitmqctl_on(cmd: tokio::process::Command, args: &[&str]) -> Result<String, String> {
    run_tool("rabbitmqctl", cmd, args, RABBITMQCTL_TIMEOUT).await
}

/// Runs `cmd` with `args` for at most `timeout`: its stdout and stderr,
/// or why it failed (named `what`).
async fn run_tool(
    what: &str,
    mut cmd: tokio::process::Command,
    args: &[&str],
    timeout: Duration,
) -> Result<String, String> {
    let run = cmd.args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("{what} {args:?}: no answer in {timeout:?}"))?
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{what} {args:?}: {}", text.trim()))
    }
}

/// Terminates every backend of the database but the chaos driver's own;
/// returns how many.
pub async fn terminate_backends(database_url: &str, database: &str) -> Result<i64, Error> {
    let opts = PgConnectOptions::from_str(database_url)?.application_name(FAULT_APPLICATION_NAME);
    let mut conn = sqlx::PgConnection::connect_with(&opts).await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND pid <> pg_backend_pid()
                AND application_name NOT LIKE 'chaos-%') t",
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
        .application_name(FAULT_APPLICATION_NAME);
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
              WHERE datname = $1 AND application_name NOT LIKE 'chaos-%') t",
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
        count(log, Fault::BrokerRestart);
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

/// The cluster node (1–3) to kill: the leader of `entrip.settlement`, or
/// the node most of the vhost's connections are on (by the server port
/// each connection came in on: node N listens on the first node's port +
/// N − 1).
async fn node_to_kill(vhost: &str, leader: bool) -> Result<u8, String> {
    if leader {
        let out = rabbitmqctl(&["list_queues", "-p", vhost, "name", "leader"]).await?;
        return out
            .lines()
            .find_map(|l| {
                let (name, node) = l.split_once('\t')?;
                (name.trim() == entrip_common::amqp::SETTLEMENT_QUEUE).then_some(node.trim())
            })
            .and_then(node_number)
            .ok_or_else(|| format!("no leader of entrip.settlement in: {}", out.trim()));
    }
    let out = rabbitmqctl(&["list_connections", "vhost", "port"]).await?;
    let ports: Vec<u16> = out
        .lines()
        .filter_map(|l| {
            let (v, port) = l.split_once('\t')?;
            (v.trim() == vhost).then(|| port.trim().parse().ok())?
        })
        .collect();
    let first = ports
        .iter()
        .min()
        .copied()
        .ok_or("no connection of the vhost")?;
    // Ports of one cluster are consecutive; the lowest seen is not always
    // node 1's, so count by offset from the cluster's own first port.
    let base = std::env::var("ENTRIP_RABBIT_CLUSTER_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(first);
    let mut per_node = [0usize; 3];
    for p in ports {
        if let Some(slot) = p.checked_sub(base).map(usize::from).filter(|i| *i < 3) {
            per_node[slot] += 1;
        }
    }
    let busiest = (0..3).max_by_key(|i| per_node[*i]).unwrap_or(0);
    Ok(u8::try_from(busiest + 1).unwrap_or(1))
}

/// `entrip-rc-2@localhost` → 2.
fn node_number(node: &str) -> Option<u8> {
    let (name, _) = node.split_once('@')?;
    name.rsplit('-')
        .next()?
        .parse()
        .ok()
        .filter(|n| (1..=3).contains(n))
}

/// Kills one node of the cluster, waits `down`, starts it again (it
/// rejoins; `scripts/rabbit-cluster start` waits until it runs).
async fn node_kill(log: &Shared<FaultLog>, vhost: &str, leader: bool, down: Duration) {
    let Some(script) = CLUSTER.get() else {
        return error(log, "a node kill without a cluster".into());
    };
    let node = match node_to_kill(vhost, leader).await {
        Ok(n) => n,
        Err(e) => return error(log, format!("choosing the node to kill: {e}")),
    };
    let what = if leader {
        "the settlement queue's leader"
    } else {
        "the fleet's node"
    };
    let node = node.to_string();
    // `start` waits for the node to boot: longer than a CLI call.
    let run = |action: &'static str| {
        let args = [action, node.as_str()];
        async move {
            run_tool(
                "rabbit-cluster",
                cluster_script(script, &[]),
                &args,
                RABBITMQCTL_TIMEOUT * 2,
            )
            .await
            .map(drop)
        }
    };
    tracing::warn!(
        "fault: SIGKILL of cluster node {node} ({what}), {:.1} s down",
        down.as_secs_f64()
    );
    if let Err(e) = run("kill").await {
        return error(log, e);
    }
    count(log, Fault::NodeKill);
    tokio::time::sleep(down).await;
    for attempt in 0..3 {
        match run("start").await {
            Ok(()) => {
                tracing::warn!("fault: cluster node {node} started again");
                return;
            }
            Err(e) => error(
                log,
                format!("starting node {node} again (attempt {attempt}): {e}"),
            ),
        }
    }
}

/// How long the scrape of ingest's counters before its kill may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Kills `slot` (counted as `fault`), waits `down`, starts it again. Before
/// a kill of ingest, its AMQP counters are scraped (the process takes them
/// with it).
fn kill_and_restart(
    fleet: Shared<Fleet>,
    log: Shared<FaultLog>,
    fault: Fault,
    slot: usize,
    down: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if slot == fleet::INGEST {
            let url = lock(&fleet).ingest_url();
            match ingest_metrics::scrape(&url, SCRAPE_TIMEOUT).await {
                Ok(counts) => lock(&log).ingest_counts.add(&counts),
                Err(e) => {
                    lock(&log).ingest_scrapes_failed += 1;
                    tracing::warn!("fault: scraping ingest before its kill: {e}");
                }
            }
        }
        let name = {
            let mut f = lock(&fleet);
            if !f.kill(slot) {
                return;
            }
            f.services[slot].name.clone()
        };
        if fault == Fault::KillWorkers {
            // Taken once the process is reaped: it is dead by then.
            let at = Instant::now();
            hit(&log, fault, at, at);
        }
        tracing::warn!(
            "fault: SIGKILL {name}, restart in {:.1} s",
            down.as_secs_f64()
        );
        count(&log, fault);
        tokio::time::sleep(down).await;
        if let Err(e) = lock(&fleet).start(slot) {
            error(&log, format!("restarting {name}: {e}"));
        }
    })
}

/// What the injector works with while it runs.
struct Injector {
    settings: FaultSettings,
    fleet: Shared<Fleet>,
    receiver: Arc<Receiver>,
    log: Shared<FaultLog>,
    /// Faults still under way, with the round they belong to: restarts
    /// (their tasks sleep out the planned downtime) and AMQP closes.
    pending: Vec<(u32, JoinHandle<()>)>,
    /// The round being drawn (0-based).
    round: u32,
    started: tokio::time::Instant,
    /// Node kills so far (they alternate their target).
    node_kills: u32,
    node_kill_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Injector {
    /// Injects one fault of the mix; `false` when it could not be injected
    /// now (a dispatcher is down already) and should come again later in
    /// the round.
    async fn inject(&mut self, fault: Fault, rng: &mut Rng) -> bool {
        let log = &self.log;
        match fault {
            Fault::AmqpClose => {
                // In a task of its own: `rabbitmqctl` starts an Erlang VM,
                // which takes seconds on a busy machine, and the next faults
                // need not wait for it.
                let reason = format!(
                    "chaos: closing connections after {:?}",
                    self.started.elapsed()
                );
                let vhost = self.settings.vhost.clone();
                let log = log.clone();
                let close = tokio::spawn(async move {
                    let from = Instant::now();
                    match rabbitmqctl(&["close_all_connections", "-p", &vhost, &reason]).await {
                        Ok(out) => {
                            hit(&log, fault, from, Instant::now());
                            tracing::warn!("fault: {}", out.trim().replace('\n', " "));
                            count(&log, fault);
                        }
                        Err(e) => error(&log, e),
                    }
                });
                self.pending.push((self.round, close));
            }
            Fault::KillDispatcher => {
                // Kill one dispatcher only while both run: two stay the norm.
                let both = {
                    let f = lock(&self.fleet);
                    fleet::DISPATCHERS
                        .iter()
                        .all(|s| f.services[*s].is_running())
                };
                if !both {
                    return false;
                }
                let slot = fleet::DISPATCHERS[rng.below(2)];
                let down = rng.between(Duration::from_millis(300), Duration::from_secs(3));
                let kill = kill_and_restart(self.fleet.clone(), log.clone(), fault, slot, down);
                self.pending.push((self.round, kill));
            }
            Fault::KillWorkers => {
                let down = rng.between(Duration::from_millis(300), Duration::from_secs(3));
                let kill =
                    kill_and_restart(self.fleet.clone(), log.clone(), fault, fleet::WORKERS, down);
                self.pending.push((self.round, kill));
            }
            Fault::KillIngest => {
                // Only while it runs (it may be restarting after an exit of
                // its own): a kill that finds it down would not count.
                if !lock(&self.fleet).services[fleet::INGEST].is_running() {
                    return false;
                }
                let down = rng.between(Duration::from_millis(300), Duration::from_secs(3));
                let kill =
                    kill_and_restart(self.fleet.clone(), log.clone(), fault, fleet::INGEST, down);
                self.pending.push((self.round, kill));
            }
            Fault::TerminateBackends => {
                let from = Instant::now();
                let s = &self.settings;
                match terminate_backends(&s.database_url, &s.database).await {
                    Ok(n) => {
                        hit(log, fault, from, Instant::now());
                        tracing::warn!("fault: pg_terminate_backend ended {n} backends");
                        count(log, fault);
                        lock(log).backends_terminated += n.max(0) as u64;
                    }
                    Err(e) => error(log, format!("pg_terminate_backend: {e}")),
                }
            }
            Fault::DatabaseOutage => {
                let d = rng.between(Duration::from_millis(500), Duration::from_millis(2500));
                tracing::warn!(
                    "fault: PostgreSQL refuses connections to the database for {:.1} s",
                    d.as_secs_f64()
                );
                let outage_log = log.clone();
                let mark = move |from, to| hit(&outage_log, fault, from, to);
                let s = &self.settings;
                match database_outage(&s.database_url, &s.database, d, mark).await {
                    Ok(n) => {
                        count(log, fault);
                        lock(log).backends_terminated += n.max(0) as u64;
                    }
                    Err(e) => error(log, format!("database outage: {e}")),
                }
            }
            Fault::WebhookFailures => {
                let d = rng.between(Duration::from_secs(2), Duration::from_secs(5));
                tracing::warn!(
                    "fault: webhook receiver answers 500 for {:.1} s",
                    d.as_secs_f64()
                );
                self.receiver.fail_for(d);
                count(log, fault);
            }
            Fault::WebhookHang => {
                let d = rng.between(Duration::from_secs(2), Duration::from_secs(5));
                tracing::warn!("fault: webhook receiver hangs for {:.1} s", d.as_secs_f64());
                let hold = self.settings.webhook_timeout + Duration::from_millis(1500);
                self.receiver.hang_for(d, hold);
                count(log, fault);
            }
            Fault::BrokerRestart => {
                let down = rng.between(Duration::from_secs(3), Duration::from_secs(6));
                broker_restart(log, down).await;
            }
            Fault::NodeKill => {
                let down = rng.between(Duration::from_secs(3), Duration::from_secs(6));
                let leader = self.node_kills.is_multiple_of(2);
                self.node_kills += 1;
                let vhost = self.settings.vhost.clone();
                let log = log.clone();
                // One node down at a time: a kill waits for the previous
                // node to be back (with pause_minority, two down would
                // pause the third: an outage, not a node loss).
                let one_at_a_time = self.node_kill_lock.clone();
                let kill = tokio::spawn(async move {
                    let _turn = one_at_a_time.lock().await;
                    node_kill(&log, &vhost, leader, down).await;
                });
                self.pending.push((self.round, kill));
            }
        }
        true
    }
}

/// Injects faults from when `begin` turns true (the load's first journey)
/// until `stop` turns true; returns what it did once every restart it began
/// is done. `rounds` is told how many rounds of [`MIX`] were injected to the
/// end, so that the load can go on until every kind came up.
pub async fn run(
    settings: FaultSettings,
    fleet: Shared<Fleet>,
    receiver: Arc<Receiver>,
    mut rng: Rng,
    mut begin: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    rounds: watch::Sender<u32>,
) -> FaultLog {
    // A load that ended before its first journey (its sender gone) leaves
    // the stop to end this.
    tokio::select! {
        _ = begin.wait_for(|b| *b) => {}
        _ = stop.wait_for(|s| *s) => return FaultLog::default(),
    }
    // Broker restarts at about a third and two thirds of the load.
    let mut broker_at: Vec<Duration> = if settings.broker_restart {
        vec![
            settings.load_duration.mul_f64(0.3 + 0.1 * rng.unit()),
            settings.load_duration.mul_f64(0.6 + 0.1 * rng.unit()),
        ]
    } else {
        Vec::new()
    };
    // Node kills at about a fifth, two, three and four fifths of the load.
    let mut node_kill_at: Vec<Duration> = if settings.cluster {
        (1..=4)
            .map(|i| {
                settings
                    .load_duration
                    .mul_f64(0.2 * f64::from(i) - 0.05 + 0.1 * rng.unit())
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut injector = Injector {
        settings,
        fleet,
        receiver,
        log: Arc::default(),
        pending: Vec::new(),
        round: 0,
        started: tokio::time::Instant::now(),
        node_kills: 0,
        node_kill_lock: Arc::default(),
    };
    let mut bag = round(&mut rng);
    loop {
        let pause = rng.between(injector.settings.interval.0, injector.settings.interval.1);
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
            let mut f = lock(&injector.fleet);
            for slot in f.reap_exited() {
                if let Err(e) = f.start(slot) {
                    error(&injector.log, format!("restarting after an exit: {e}"));
                }
            }
        }
        if let Some(at) = broker_at.first()
            && injector.started.elapsed() >= *at
        {
            broker_at.remove(0);
            injector.inject(Fault::BrokerRestart, &mut rng).await;
            continue;
        }
        if let Some(at) = node_kill_at.first()
            && injector.started.elapsed() >= *at
        {
            node_kill_at.remove(0);
            injector.inject(Fault::NodeKill, &mut rng).await;
            continue;
        }
        if let Some(fault) = bag.pop()
            && !injector.inject(fault, &mut rng).await
        {
            // Again later in this round (at once if it was the last).
            let at = rng.below(bag.len() + 1);
            bag.insert(at, fault);
        }
        if bag.is_empty() {
            injector.round += 1;
            bag = round(&mut rng);
        }
        // A round is complete once it is drawn and its faults are over.
        injector.pending.retain(|(_, h)| !h.is_finished());
        let done = injector
            .pending
            .iter()
            .map(|(r, _)| *r)
            .min()
            .unwrap_or(injector.round)
            .min(injector.round);
        let newly = {
            let mut log = lock(&injector.log);
            let newly = done > log.rounds;
            log.rounds = log.rounds.max(done);
            newly
        };
        if newly {
            rounds.send_replace(done);
        }
    }
    for (_, h) in injector.pending {
        let _ = h.await;
    }
    injector.receiver.heal();
    lock(&injector.log).clone()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_round_holds_every_kind_of_the_mix_its_weight_times() {
        let mut rng = Rng::new(7);
        for _ in 0..20 {
            let bag = round(&mut rng);
            assert_eq!(bag.len(), MIX.iter().map(|(_, w)| w).sum::<usize>());
            for (fault, weight) in MIX {
                assert!(weight >= 1, "{fault:?} would never come up");
                assert_eq!(bag.iter().filter(|f| **f == fault).count(), weight);
            }
            assert!(!bag.contains(&Fault::BrokerRestart));
        }
    }

    #[test]
    fn the_json_names_are_stable() {
        let counts: BTreeMap<Fault, u64> = Fault::injected(true, true).map(|f| (f, 1)).collect();
        let json = serde_json::to_value(&counts).unwrap();
        let mut names: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "amqp_close",
                "broker_restart",
                "database_outage",
                "kill_dispatcher",
                "kill_ingest",
                "kill_workers",
                "node_kill",
                "terminate_backends",
                "webhook_failures",
                "webhook_hang",
            ]
        );
        assert_eq!(Fault::injected(false, false).count(), MIX.len());
        assert_eq!(node_number("entrip-rc-2@localhost"), Some(2));
        assert_eq!(node_number("entrip-cc123-3@localhost"), Some(3));
        assert_eq!(node_number("rabbit@localhost"), None);
    }
}
