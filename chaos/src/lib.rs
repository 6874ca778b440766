//! The Entrip chaos suite: runs the real fleet (one ingest, two dispatchers,
//! one workers) against a database and a RabbitMQ vhost, drives journeys
//! through it (over ingest's HTTP API and, for a share of the requests, over
//! AMQP: see [`upstream`]) while faults are injected, lets it drain, and
//! checks the end state against what the client was told and against what
//! the broker carried (a queue of the suite's own, see [`tap`]). [`run`] is
//! the whole driver; the `chaos` binary and the short CI run
//! (`tests/it/short.rs`) call it.

pub mod checks;
pub mod faults;
pub mod fleet;
pub mod ingest_metrics;
pub mod load;
pub mod receiver;
pub mod rehearsal;
pub mod report;
pub mod rng;
pub mod tap;
pub mod upstream;

use std::{
    path::PathBuf,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::sync::watch;

pub use report::{Check, Report};

use crate::{
    fleet::{Fleet, FleetConfig},
    receiver::{Receiver, Subscriber},
    rng::Rng,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Setup(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    /// A failure after the fleet started, with the tail of its logs.
    #[error("{message}\nservice logs in {log_dir}\n{tails}")]
    WithLogs {
        message: String,
        log_dir: String,
        tails: String,
    },
}

/// What one run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where `ingest`, `dispatcher` and `workers` are (see
    /// [`fleet::find_bin_dir`]).
    pub bin_dir: Option<PathBuf>,
    /// The run's own database (created beforehand; migrated here), as the
    /// driver connects to it: checks, and faults that need a superuser
    /// (`pg_terminate_backend` of other roles' sessions, `ALTER DATABASE`).
    pub database_url: String,
    /// The same database as the services connect to it: a role without
    /// superuser rights that owns the schema, as in production. `None`:
    /// `database_url`.
    pub fleet_database_url: Option<String>,
    /// The run's own vhost (created beforehand), its name and URL.
    pub vhost: String,
    pub amqp_url: String,
    /// How long journeys are started (at least; see `min_fault_rounds`),
    /// counted from the first journey (the load's users are created before,
    /// and the faults begin with the journeys).
    pub duration: Duration,
    /// Journeys started per second.
    pub rate: f64,
    pub seed: Option<u64>,
    /// Broker-wide `stop_app`/`start_app`: never while other work uses the broker.
    pub broker_restart: bool,
    /// `scripts/rabbit-cluster` of the 3-node cluster the run is on (its
    /// settings in the environment; `amqp_url` lists its nodes): broker
    /// commands go to its nodes, and nodes are killed and started again
    /// ([`faults::Fault::NodeKill`]).
    pub cluster: Option<PathBuf>,
    /// The drain fails when none of its figures (outbox rows undelivered and
    /// published, queued messages, settlements, webhooks) moved for this
    /// long. There is no deadline: a busy machine drains slowly, a stuck
    /// fleet not at all.
    pub drain_stall: Duration,
    /// Pause between two faults (a uniform range).
    pub fault_interval: (Duration, Duration),
    /// The load goes on past `duration` until the injector has completed
    /// this many rounds of the fault mix ([`faults::MIX`]), so that even a
    /// short run sees every kind of fault with work in flight; at most
    /// `duration` longer (a run that still has not is reported with the
    /// counts it has).
    pub min_fault_rounds: u32,
    /// When the client gives a request up as lost (see
    /// [`load::LoadSettings::give_up_after`]).
    pub give_up_after: Duration,
    /// Pool size per service (`database.max_connections`).
    pub max_connections: u32,
    /// Messages each worker consumer handles at once.
    pub worker_concurrency: u32,
    /// Where the service logs go; a fresh temporary directory when `None`.
    pub log_dir: Option<PathBuf>,
    /// Share of the requests sent over AMQP (0 to 1; 0: HTTP only).
    pub amqp_share: f64,
    /// How long an AMQP request waits for its reply before the client sends
    /// it again (see [`load::AmqpLoadSettings::patience`]).
    pub amqp_patience: Duration,
}

/// The services' broker settings for `urls` (one AMQP URL, or the nodes of
/// a cluster comma-separated).
fn broker(urls: &str) -> entrip_common::config::AmqpSettings {
    entrip_common::config::AmqpSettings {
        url: urls.to_owned(),
        ..entrip_common::config::AmqpSettings::default()
    }
}

/// Connects to the first node of `urls` that answers, as the services do.
pub async fn broker_connect(urls: &str, name: &str) -> Result<lapin::Connection, lapin::Error> {
    entrip_common::amqp::connect_any(&broker(urls), name).await
}

/// The broker user of `urls`, as the services find it.
pub fn broker_user(urls: &str) -> String {
    broker(urls).user()
}

impl Options {
    pub fn new(database_url: String, vhost: String, amqp_url: String) -> Self {
        Self {
            bin_dir: None,
            database_url,
            fleet_database_url: None,
            vhost,
            amqp_url,
            duration: Duration::from_secs(60),
            rate: 20.0,
            seed: None,
            broker_restart: false,
            cluster: None,
            drain_stall: Duration::from_secs(60),
            fault_interval: (Duration::from_secs(1), Duration::from_secs(3)),
            min_fault_rounds: 1,
            give_up_after: Duration::from_secs(60),
            max_connections: 16,
            worker_concurrency: 6,
            log_dir: None,
            amqp_share: DEFAULT_AMQP_SHARE,
            amqp_patience: DEFAULT_AMQP_PATIENCE,
        }
    }
}

/// The command-line edge of the `chaos` and `rehearsal` binaries: progress
/// lines on stderr (`RUST_LOG`, default `info`; colour only on a
/// terminal), then `main` run, and its result as the exit code: 0 when every
/// check passed, 1 when one failed, 2 (with the error) when the run could not
/// be carried out.
pub async fn cli_main<F>(name: &str, main: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<bool>>,
{
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match main.await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(err) => {
            eprintln!("{name}: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The database name of a `postgres://…/name?…` URL.
pub fn database_name(url: &str) -> Result<String, Error> {
    let opts = PgConnectOptions::from_str(url)?;
    opts.get_database()
        .map(str::to_owned)
        .ok_or_else(|| Error::Setup(format!("no database name in {url}")))
}

/// The webhook timeout the workers get: the receiver's hang windows hold
/// requests longer than this.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_millis(2000);

/// Ingest's own deadline for a request (`ingest.request_timeout_secs`),
/// after which it answers 503 itself.
pub const INGEST_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The load client's per-attempt timeout: past the server's deadline, so
/// that on a slow machine the server ends a slow request with a 503 and
/// `Retry-After` instead of the client abandoning work that would have
/// committed (see [`load`]).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(INGEST_REQUEST_TIMEOUT.as_secs() + 3);

/// The journey rates a run accepts (journeys per second).
pub const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.1..=10_000.0;

/// The share of requests sent over AMQP unless told otherwise.
pub const DEFAULT_AMQP_SHARE: f64 = 0.3;

/// How long an AMQP request waits for its reply before it is sent again,
/// unless told otherwise: replies take milliseconds, so only a lost reply (or
/// a request held up in ingest's retry path by a database fault) waits
/// this long, and a short run's tail stays short.
pub const DEFAULT_AMQP_PATIENCE: Duration = Duration::from_secs(4);

/// The API client the load sends as, over both transports.
pub const API_CLIENT: &str = "chaos-load";

const SUBSCRIBERS: [(&str, &str, &[&str]); 2] = [
    (
        "bookings",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        &["booking.*", "settlement.recorded"],
    ),
    (
        "payments",
        "whsec_Y2hhb3MtcGF5bWVudHMtc3Vic2NyaWJlci1rZXk=",
        &["payment.*", "approval.decided"],
    ),
];

/// Waits until every service answers its health URL. The URLs are read
/// again each round: a service restarted on a fresh port after a bind
/// failure (see [`fleet`]) moves. A service that exits by itself meanwhile
/// ends the wait at once.
async fn wait_healthy(fleet: &Mutex<Fleet>, deadline: Duration) -> Result<(), Error> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let until = Instant::now() + deadline;
    loop {
        let (urls, down): (Vec<(String, String)>, Vec<String>) = {
            let mut f = fleet.lock().unwrap_or_else(|e| e.into_inner());
            f.reap_exited();
            (
                f.services
                    .iter()
                    .map(|s| (s.name.clone(), s.health_url()))
                    .collect(),
                f.services
                    .iter()
                    .filter(|s| !s.is_running())
                    .map(|s| s.name.clone())
                    .collect(),
            )
        };
        if !down.is_empty() {
            return Err(Error::Setup(format!(
                "{} exited by itself before it was healthy",
                down.join(", ")
            )));
        }
        let mut unhealthy = None;
        for (name, url) in urls {
            let ok = matches!(client.get(&url).send().await, Ok(r) if r.status().is_success());
            if !ok {
                unhealthy = Some((name, url));
                break;
            }
        }
        let Some((name, url)) = unhealthy else {
            return Ok(());
        };
        if Instant::now() > until {
            return Err(Error::Setup(format!(
                "{name} not healthy at {url} within {deadline:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts every service that is not running and waits until all answer.
pub(crate) async fn start_all_healthy(
    fleet: &Mutex<Fleet>,
    deadline: Duration,
) -> Result<(), Error> {
    fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .start_all()?;
    wait_healthy(fleet, deadline).await
}

/// Runs the whole suite; `Ok` carries the report whether or not its checks
/// passed, `Err` means the run itself could not be carried out.
pub async fn run(opts: Options) -> Result<Report, Error> {
    if !(opts.amqp_share.is_finite() && (0.0..=1.0).contains(&opts.amqp_share)) {
        return Err(Error::Setup(format!(
            "AMQP share {} out of range: it must be between 0 and 1",
            opts.amqp_share
        )));
    }
    if !(opts.rate.is_finite() && RATE_RANGE.contains(&opts.rate)) {
        return Err(Error::Setup(format!(
            "rate {} journeys/s out of range: it must be between {} and {}",
            opts.rate,
            RATE_RANGE.start(),
            RATE_RANGE.end()
        )));
    }
    let started_at = chrono::Utc::now();
    let t0 = Instant::now();
    let seed = opts.seed.unwrap_or_else(rng::fresh_seed);
    tracing::info!(seed, "chaos run starting (replay with --seed {seed})");
    let mut rng = Rng::new(seed);
    let bin_dir = fleet::find_bin_dir(opts.bin_dir.as_deref())?;
    let database = database_name(&opts.database_url)?;
    let log_dir = match &opts.log_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "entrip-chaos-{}-{}",
            started_at.format("%Y%m%dT%H%M%SZ"),
            uuid::Uuid::new_v4().simple()
        )),
    };
    std::fs::create_dir_all(&log_dir)?;
    tracing::info!(log_dir = %log_dir.display(), bin_dir = %bin_dir.display(), "service logs");

    let receiver = Arc::new(
        Receiver::start(
            SUBSCRIBERS
                .iter()
                .map(|(name, secret, topics)| Subscriber {
                    name: (*name).to_owned(),
                    secret: (*secret).to_owned(),
                    topics: topics.iter().map(|t| (*t).to_owned()).collect(),
                })
                .collect(),
        )
        .await?,
    );
    let config_file = log_dir.join("entrip-chaos.toml");
    std::fs::write(&config_file, receiver.config_toml())?;

    let env = vec![
        ("ENTRIP__LOG__LEVEL", "info".to_owned()),
        (
            "ENTRIP__DATABASE__MAX_CONNECTIONS",
            opts.max_connections.to_string(),
        ),
        (
            "ENTRIP__WORKERS__CONCURRENCY",
            opts.worker_concurrency.to_string(),
        ),
        // Quick retries, so that the faults' effects heal within the run.
        ("ENTRIP__AMQP__RETRY_DELAYS_MS", "200,1000,3000".to_owned()),
        ("ENTRIP__DISPATCHER__POLL_INTERVAL_MS", "200".to_owned()),
        ("ENTRIP__DISPATCHER__BACKOFF_MIN_MS", "200".to_owned()),
        ("ENTRIP__DISPATCHER__BACKOFF_MAX_MS", "2000".to_owned()),
        (
            "ENTRIP__INGEST__REQUEST_TIMEOUT_SECS",
            INGEST_REQUEST_TIMEOUT.as_secs().to_string(),
        ),
        // The client honours it: a short one keeps the run short.
        ("ENTRIP__INGEST__RETRY_AFTER_SECS", "1".to_owned()),
        (
            "ENTRIP__NOTIFICATIONS__TIMEOUT_MS",
            WEBHOOK_TIMEOUT.as_millis().to_string(),
        ),
    ];
    let fleet = Fleet::new(FleetConfig {
        bin_dir,
        database_url: opts
            .fleet_database_url
            .clone()
            .unwrap_or_else(|| opts.database_url.clone()),
        amqp_url: opts.amqp_url.clone(),
        config_file,
        log_dir: log_dir.clone(),
        env: env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    })?;
    let fleet = Arc::new(Mutex::new(fleet));
    let with_logs = |message: String| {
        let tails = fleet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log_tails(40);
        Error::WithLogs {
            message,
            log_dir: log_dir.display().to_string(),
            tails,
        }
    };

    // The chaos-owned queue on entrip.events, before any event is published.
    tap::declare(&opts.amqp_url).await?;

    // Migrate once up front, then start the fleet.
    let migrate = fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .command("ingest")
        .arg("migrate")
        .output()?;
    if !migrate.status.success() {
        return Err(Error::Setup(format!(
            "ingest migrate failed ({}): {}{}",
            migrate.status,
            String::from_utf8_lossy(&migrate.stdout),
            String::from_utf8_lossy(&migrate.stderr)
        )));
    }
    // The load's API client (`ingest clients create` prints the key alone),
    // also the client of the run's broker user: its AMQP requests share the
    // HTTP requests' idempotency scope.
    let broker_user = broker_user(&opts.amqp_url);
    let issued = fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .command("ingest")
        .args(["clients", "create", API_CLIENT, "--scopes", "*"])
        .args(["--amqp-user", &broker_user])
        .output()?;
    if !issued.status.success() {
        return Err(Error::Setup(format!(
            "ingest clients create failed ({}): {}",
            issued.status,
            String::from_utf8_lossy(&issued.stderr)
        )));
    }
    let api_key = String::from_utf8_lossy(&issued.stdout).trim().to_owned();
    start_all_healthy(&fleet, Duration::from_secs(60))
        .await
        .map_err(|e| with_logs(e.to_string()))?;
    let ingest_url = fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .shared_ingest_url();
    tracing::info!(ingest_url = %ingest_url.get(), "fleet up: 1 ingest, 2 dispatchers, 1 workers");

    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(
            PgConnectOptions::from_str(&opts.database_url)?
                .application_name(faults::DRIVER_APPLICATION_NAME),
        )
        .await?;

    // Faults while journeys are started (from the first one): for
    // `duration`, and on until the injector has completed its rounds. Then
    // the started journeys end with the fleet left alone (every service up
    // again), and the client gives a request up as lost only from then on:
    // while faults go on, any request may be held up for as long as they
    // last.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (calm_tx, calm_rx) = watch::channel(false);
    let (rounds_tx, mut rounds_rx) = watch::channel(0u32);
    // True once the load's users exist and its first journey starts: the
    // faults and the schedule begin then.
    let (journeys_tx, mut journeys_rx) = watch::channel(false);
    let faults = tokio::spawn(faults::run(
        faults::FaultSettings {
            vhost: opts.vhost.clone(),
            database_url: opts.database_url.clone(),
            database,
            interval: opts.fault_interval,
            broker_restart: opts.broker_restart,
            cluster: opts.cluster.is_some(),
            load_duration: opts.duration,
            webhook_timeout: WEBHOOK_TIMEOUT,
        },
        fleet.clone(),
        receiver.clone(),
        rng.fork(1),
        journeys_rx.clone(),
        stop_rx.clone(),
        rounds_tx,
    ));
    let mut load = tokio::spawn(load::run(
        load::LoadSettings {
            base: ingest_url,
            api_key: load::Secret(api_key),
            rate: opts.rate,
            client_timeout: CLIENT_TIMEOUT,
            give_up_after: opts.give_up_after,
            abandon_fraction: 0.25,
            amqp: (opts.amqp_share > 0.0).then(|| load::AmqpLoadSettings {
                url: opts.amqp_url.clone(),
                share: opts.amqp_share,
                patience: opts.amqp_patience,
                poison_fraction: 0.01,
            }),
        },
        rng.fork(2),
        stop_rx,
        calm_rx,
        journeys_tx,
    ));
    let min_rounds = opts.min_fault_rounds;
    let schedule = async {
        // A load that failed before (its sender gone) ends the select below.
        if journeys_rx.wait_for(|j| *j).await.is_ok() {
            tracing::info!("journeys starting; faults begin");
        }
        tokio::time::sleep(opts.duration).await;
        if min_rounds > 0 {
            let rounds = rounds_rx.wait_for(|r| *r >= min_rounds);
            if tokio::time::timeout(opts.duration, rounds).await.is_err() {
                tracing::warn!(
                    "the injector has not completed {min_rounds} rounds of the fault mix after {:?}; stopping the load anyway",
                    opts.duration * 2
                );
            }
        }
    };
    // A load that fails early (no users) ends the schedule at once.
    let early = tokio::select! {
        () = schedule => None,
        result = &mut load => Some(result),
    };
    let _ = stop_tx.send(true);
    let fault_log = faults
        .await
        .map_err(|e| with_logs(format!("fault injector failed: {e}")))?;
    receiver.heal();
    start_all_healthy(&fleet, Duration::from_secs(90))
        .await
        .map_err(|e| with_logs(e.to_string()))?;
    let _ = calm_tx.send(true);
    tracing::info!(
        faults = ?fault_log.counts,
        "faults over, every service up; waiting for the started journeys"
    );
    let load = match early {
        Some(result) => result,
        None => load.await,
    }
    .map_err(|e| with_logs(format!("load task failed: {e}")))?
    .map_err(|e| with_logs(format!("load failed: {e}")))?;
    let load_seconds = load.elapsed.as_secs_f64();
    tracing::info!(journeys = load.journeys.len(), "load over; draining");
    // A service that exited by itself meanwhile is counted and started again.
    start_all_healthy(&fleet, Duration::from_secs(90))
        .await
        .map_err(|e| with_logs(e.to_string()))?;

    let drain_start = Instant::now();
    let expected_settlements = load.journeys.iter().filter(|j| j.expect_settled()).count() as i64;
    let drained = checks::drain(
        &pool,
        &opts.vhost,
        &opts.amqp_url,
        &receiver,
        expected_settlements,
        opts.drain_stall,
    )
    .await;
    let drain_seconds = drain_start.elapsed().as_secs_f64();
    tracing::info!(
        ?drained,
        "drain over after {drain_seconds:.1} s; reading the tap queue"
    );
    let tap_log = tap::drain(&opts.amqp_url).await.map_err(|e| e.to_string());
    // Late replies were compared with the first ones until now.
    if let Some(upstream) = &load.upstream {
        upstream.close().await;
    }
    let ingest_dlq = upstream::read_ingest_dlq(&opts.amqp_url)
        .await
        .map_err(|e| e.to_string());
    // The counters of ingest's last life, added to those scraped before
    // each kill.
    let mut ingest_counts = fault_log.ingest_counts.clone();
    let final_scrape = {
        let url = fleet.lock().unwrap_or_else(|e| e.into_inner()).ingest_url();
        ingest_metrics::scrape(&url, Duration::from_secs(5)).await
    };
    let ingest_scrape_missing = match &final_scrape {
        Ok(c) => {
            ingest_counts.add(c);
            fault_log.ingest_scrapes_failed
        }
        Err(e) => {
            tracing::warn!("scraping ingest after the drain: {e}");
            fault_log.ingest_scrapes_failed + 1
        }
    };
    tracing::info!("checking");

    let integrity = {
        let f = fleet.lock().unwrap_or_else(|e| e.into_inner());
        let mut cmd = f.command("workers");
        cmd.args(["integrity", "--once"]);
        cmd
    };
    let mut totals = std::collections::BTreeMap::new();
    let mut all_checks = vec![Check {
        name: "fleet drained (kept making progress until done)".into(),
        passed: drained.drained,
        detail: format!(
            "{drain_seconds:.1} s ({}; it fails when nothing moves for {:?}): undelivered {}, queued {}, settlements {} of {expected_settlements}, webhooks missing {}",
            if drained.drained {
                "drained".to_owned()
            } else {
                format!("nothing moved for {:.1} s", drained.still_for.as_secs_f64())
            },
            opts.drain_stall,
            drained.undelivered,
            drained.work_messages,
            drained.settlements,
            drained.webhooks_missing
        ),
    }];
    let end_state = checks::EndState::load(checks::Sources {
        pool: &pool,
        vhost: &opts.vhost,
        receiver: &receiver,
        load: &load,
        integrity,
        hits: &fault_log.hits,
        webhook_timeout: WEBHOOK_TIMEOUT,
        tap: tap_log.as_ref(),
        api_client: API_CLIENT,
        ingest_dlq: ingest_dlq.as_ref(),
        ingest_counts: &ingest_counts,
        ingest_scrape_missing,
    })
    .await
    .map_err(|e| with_logs(format!("the end state could not be read: {e}")))?;
    let checked = checks::run_checks(&end_state);
    totals.extend(checks::totals(&end_state));
    let tallies = checks::tallies(&end_state);
    drop(end_state);
    all_checks.extend(checked);

    let service_exits = {
        let mut f = fleet.lock().unwrap_or_else(|e| e.into_inner());
        f.reap_exited();
        totals.insert(
            "services started again on a fresh port (port taken meanwhile)".into(),
            f.services.iter().map(|s| u64::from(s.bind_retries)).sum(),
        );
        f.unexpected_exits.clone()
    };
    all_checks.push(Check {
        name: "no service exited by itself".into(),
        passed: service_exits.is_empty(),
        detail: format!("{} unexpected exits", service_exits.len()),
    });
    // Every kind the run injects, also the ones that did not come up.
    let mut faults_counts: std::collections::BTreeMap<faults::Fault, u64> =
        faults::Fault::injected(opts.broker_restart, opts.cluster.is_some())
            .map(|f| (f, 0))
            .collect();
    faults_counts.extend(fault_log.counts.iter().map(|(f, n)| (*f, *n)));
    let passed = all_checks.iter().all(|c| c.passed);
    let log_tails = (!passed).then(|| {
        fleet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log_tails(40)
    });
    fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stop_all(Duration::from_secs(10));
    pool.close().await;

    let report = Report {
        seed,
        started_at: started_at.to_rfc3339(),
        journeys_seconds: load.started_for.as_secs_f64(),
        load_seconds,
        drain_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
        rate: opts.rate,
        broker_restart: opts.broker_restart,
        cluster: opts.cluster.is_some(),
        faults: faults_counts,
        fault_rounds: fault_log.rounds,
        backends_terminated: fault_log.backends_terminated,
        fault_errors: fault_log.errors,
        totals,
        tallies,
        responses_by_status: load.stats.by_status(),
        amqp_share: opts.amqp_share,
        amqp_patience_seconds: opts.amqp_patience.as_secs_f64(),
        amqp_replies_by_status: load.stats.amqp_by_status(),
        client_problems: load.stats.problems(),
        service_exits,
        checks: all_checks,
        passed,
        log_dir: log_dir.display().to_string(),
        log_tails,
    };
    // Next to the service logs too, so that a failed CI run can be read later.
    if let Err(e) = report.write(&log_dir.join("report")) {
        tracing::warn!("cannot write the report to {}: {e}", log_dir.display());
    }
    Ok(report)
}
