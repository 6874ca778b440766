//! The restore rehearsal's driver (`scripts/restore-rehearsal`, the
//! `rehearsal` binary): runs the real fleet on a PostgreSQL cluster of the
//! rehearsal's own, sends bookings, has the cluster backed up while the
//! traffic goes on, then loses it (stop, data directory removed), has it
//! restored and starts the fleet again. The cluster work is the script's:
//! this driver runs its three hooks (`backup`, `lose`, `restore`) as shell
//! commands. Then it checks the restored state against what the client was
//! told, and measures the RPO and the RTO. See docs/operations.md#the-restore-rehearsal.

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::sync::{Semaphore, watch};
use uuid::Uuid;

use crate::{
    Check, Error,
    fleet::{self, Fleet, FleetConfig},
    receiver::{Receiver, Subscriber},
    tap,
};

/// What one rehearsal does.
#[derive(Debug, Clone)]
pub struct RehearsalOptions {
    /// The rehearsal's database as the driver reads it (any role that can
    /// read every table; the script: the test superuser).
    pub database_url: String,
    /// The same database as the services connect (the role entrip).
    pub fleet_database_url: String,
    /// The rehearsal's own vhost.
    pub amqp_url: String,
    pub bin_dir: Option<PathBuf>,
    pub log_dir: PathBuf,
    /// Bookings sent per second.
    pub rate: f64,
    /// Seconds of traffic before the backup starts.
    pub before_backup: Duration,
    /// Seconds of traffic after the backup ended, until the loss.
    pub after_backup: Duration,
    /// The dispatchers are stopped this long before the loss (from before
    /// the backup when it is at least `after_backup`), so that the outbox
    /// holds a backlog at the loss, part of it in the archived WAL: the rows
    /// the restored fleet must publish.
    pub relay_pause: Duration,
    /// Shell commands run with `bash -c`, in the driver's environment.
    pub backup_hook: String,
    pub lose_hook: String,
    pub restore_hook: String,
    /// Run once the restored fleet accepted a booking, with `INGEST` (its
    /// URL) and the binaries first on `PATH` (RUNBOOK.md's restore/verify).
    pub verify_hook: Option<String>,
    /// Restores the cluster to the time in `RESTORE_TO` (the fleet
    /// stopped): the point-in-time check at the end.
    pub pitr_hook: Option<String>,
    pub rpo_target: Duration,
    pub rto_target: Duration,
    /// How long the restored fleet may take to publish the outbox.
    pub publish_patience: Duration,
}

/// One booking the client was told was created.
#[derive(Debug, Clone)]
struct Ack {
    key: String,
    body: Value,
    id: Uuid,
    at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rpo {
    /// Bookings acknowledged (201) before the loss.
    pub acknowledged: u64,
    /// Of those, missing after the restore.
    pub missing: u64,
    /// When the first and the last missing one was acknowledged.
    pub missing_first_ack: Option<String>,
    pub missing_last_ack: Option<String>,
    /// From the first missing acknowledgement to the loss: the span of
    /// acknowledged work lost (0 when nothing is missing).
    pub seconds: f64,
    pub target_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rto {
    /// From the start of the restore until ingest's `/readyz` answered 200.
    pub ready_seconds: f64,
    /// From the start of the restore until a new booking was created.
    pub seconds: f64,
    pub target_seconds: f64,
    /// The restore hook alone (pgBackRest restore, WAL replay, promotion).
    pub restore_hook_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outbox {
    /// Unpublished rows just before the loss.
    pub unpublished_at_loss: u64,
    /// Of those, in the restored database (the others were lost with
    /// their bookings, within the RPO).
    pub unpublished_restored: u64,
    /// Rows in the restored database, all to be published.
    pub restored_rows: u64,
    /// Restored rows published after the restore (unpublished in the
    /// restored state).
    pub published_after_restore: u64,
    /// Restored rows published again after the restore although the lost
    /// database had marked them: the at-least-once copies.
    pub republished: u64,
    /// Events the broker carried whose rows the restore lost (downstream
    /// saw an event of a write inside the RPO window).
    pub published_then_lost: u64,
    /// Restored rows the broker never carried (must be 0).
    pub never_published: u64,
    /// Copies beyond what the restore explains (must be 0).
    pub unexplained_duplicates: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Idempotency {
    /// Restored requests sent again: each must replay its answer.
    pub resent_restored: u64,
    pub replayed: u64,
    /// Acknowledged requests the restore lost, sent again: each must be
    /// created again.
    pub resent_lost: u64,
    pub created_again: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointInTime {
    /// The recovery target (`RESTORE_TO` of the hook).
    pub target: String,
    pub before_kept: bool,
    pub after_kept: bool,
    pub restore_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RehearsalReport {
    pub started_at: String,
    pub backup_started_at: String,
    pub backup_seconds: f64,
    pub loss_at: String,
    pub rate: f64,
    pub requests_sent: u64,
    pub requests_failed: u64,
    pub rpo: Rpo,
    pub rto: Rto,
    pub outbox: Outbox,
    pub idempotency: Idempotency,
    pub point_in_time: Option<PointInTime>,
    pub integrity_exit: Option<i32>,
    pub checks: Vec<Check>,
    pub passed: bool,
    pub log_dir: String,
}

fn setup(msg: impl Into<String>) -> Error {
    Error::Setup(msg.into())
}

/// Runs a hook with `bash -c` and these variables added to the
/// environment (`PATH` with the fleet's binaries first, so that the
/// runbook's commands find them); fails naming it, with its output.
async fn hook_with(name: &str, command: &str, env: &[(&str, String)]) -> Result<Duration, Error> {
    let t = Instant::now();
    tracing::info!(hook = name, command, "running hook");
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await?;
    if !out.status.success() {
        return Err(setup(format!(
            "{name} hook `{command}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(t.elapsed())
}

async fn pool(url: &str) -> Result<PgPool, Error> {
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(PgConnectOptions::from_str(url)?.application_name("entrip-rehearsal"))
        .await?)
}

fn booking_body(user: Uuid, n: u64) -> Value {
    let short = Uuid::new_v4().simple().to_string();
    json!({
        "code": format!("RH-{n:06}-{}", &short[..6]).to_uppercase(),
        "customerName": "Rehearsal Customer",
        "customerPhone": "+82 10 1234 5678",
        "itineraryFrom": "ICN",
        "itineraryTo": "NRT",
        "departAt": "2027-03-01T09:00:00Z",
        "arriveAt": "2027-03-01T11:30:00Z",
        "currency": "KRW",
        "amount": "350000",
        "userId": user,
    })
}

/// One POST; `Ok((status, replayed, body))`.
async fn post(
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    key: &str,
    body: &Value,
) -> Result<(u16, bool, Value), reqwest::Error> {
    let res = http
        .post(url)
        .bearer_auth(api_key)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await?;
    let status = res.status().as_u16();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body = res.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, replayed, body))
}

/// The booking's payment, approved by the gateway; false when either
/// request was not answered as it should (the outage).
async fn pay(http: &reqwest::Client, base: &str, api_key: &str, booking: Uuid) -> bool {
    let payment = json!({"bookingId": booking, "method": "CARD", "amount": "350000", "currency": "KRW", "tax": "31818"});
    let Ok((201, _, answer)) = post(
        http,
        &format!("{base}/v1/payments"),
        api_key,
        &format!("rehearsal-pay-{}", Uuid::new_v4()),
        &payment,
    )
    .await
    else {
        return false;
    };
    let Some(payment_id) = id_of(&answer) else {
        return false;
    };
    matches!(
        post(
            http,
            &format!("{base}/v1/payments/{payment_id}/result"),
            api_key,
            &format!("rehearsal-result-{}", Uuid::new_v4()),
            &json!({"status": "APPROVED", "approvalId": "PG-REHEARSAL"}),
        )
        .await,
        Ok((200, _, _))
    )
}

fn id_of(body: &Value) -> Option<Uuid> {
    body.get("id")?.as_str()?.parse().ok()
}

/// Posts until a 201 (the database may be coming up); gives up after
/// `patience`.
async fn post_until_created(
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    key: &str,
    body: &Value,
    patience: Duration,
) -> Result<(bool, Value), Error> {
    let until = Instant::now() + patience;
    loop {
        match post(http, url, api_key, key, body).await {
            Ok((201, replayed, body)) => return Ok((replayed, body)),
            Ok((status, _, body)) if Instant::now() > until => {
                return Err(setup(format!("POST {url}: {status} {body}")));
            }
            Err(e) if Instant::now() > until => return Err(e.into()),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The traffic: one booking request every `1 / rate` s, each on its own
/// task (at most 32 at once), until `stop`; records every 201 in `acks`
/// and counts the rest in `failed`.
struct Traffic {
    http: reqwest::Client,
    base: String,
    api_key: String,
    user: Uuid,
    rate: f64,
    acks: Arc<Mutex<Vec<Ack>>>,
    failed: Arc<std::sync::atomic::AtomicU64>,
}

/// Runs the traffic until `stop`; the requests sent.
async fn traffic(t: Traffic, mut stop: watch::Receiver<bool>) -> u64 {
    let Traffic {
        http,
        base,
        api_key,
        user,
        rate,
        acks,
        failed,
    } = t;
    let gate = Arc::new(Semaphore::new(32));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0u64;
    let url = format!("{base}/v1/bookings");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let Ok(permit) = gate.clone().acquire_owned().await else {
            break;
        };
        n += 1;
        let (http, url, base, api_key, acks, failed) = (
            http.clone(),
            url.clone(),
            base.clone(),
            api_key.clone(),
            acks.clone(),
            failed.clone(),
        );
        tasks.spawn(async move {
            let key = format!("rehearsal-{}", Uuid::new_v4());
            let body = booking_body(user, n);
            let created = match post(&http, &url, &api_key, &key, &body).await {
                Ok((201, _, answer)) => id_of(&answer),
                _ => None,
            };
            match created {
                Some(id) => {
                    let at = Utc::now();
                    acks.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Ack { key, body, id, at });
                    // Every fourth booking is paid: its settlement is in
                    // flight around the backup and the loss too.
                    if n.is_multiple_of(4) && !pay(&http, &base, &api_key, id).await {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                None => {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
    n
}

fn check(checks: &mut Vec<Check>, name: &str, passed: bool, detail: String) {
    if !passed {
        tracing::error!(check = name, %detail, "check failed");
    }
    checks.push(Check {
        name: name.to_owned(),
        passed,
        detail,
    });
}

async fn start_fleet(fleet: &Mutex<Fleet>, log_dir: &Path) -> Result<(), Error> {
    crate::start_all_healthy(fleet, Duration::from_secs(120))
        .await
        .map_err(|e| Error::WithLogs {
            message: e.to_string(),
            log_dir: log_dir.display().to_string(),
            tails: fleet
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .log_tails(40),
        })
}

/// Unpublished outbox rows (`published_at` and `dead_at` null).
async fn unpublished(db: &PgPool) -> Result<BTreeSet<Uuid>, Error> {
    let ids: Vec<Uuid> =
        sqlx::query_scalar("select id from outbox where published_at is null and dead_at is null")
            .fetch_all(db)
            .await?;
    Ok(ids.into_iter().collect())
}

/// The point-in-time check: a booking, the target time, another booking,
/// their WAL archived; then the fleet stopped, the cluster restored to the
/// target, and which of the two is there.
#[allow(clippy::too_many_arguments)] // one call site, each argument named there
async fn point_in_time(
    path: &str,
    database_url: &str,
    db: &PgPool,
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    user: Uuid,
    command: &str,
    fleet: &Mutex<Fleet>,
) -> Result<PointInTime, Error> {
    let create = |n: u64| async move {
        let (_, body) = post_until_created(
            http,
            url,
            api_key,
            &format!("rehearsal-pitr-{}", Uuid::new_v4()),
            &booking_body(user, n),
            Duration::from_secs(30),
        )
        .await?;
        id_of(&body).ok_or_else(|| setup(format!("no booking id in {body}")))
    };
    let before = create(900_001).await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let target = Utc::now().format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = create(900_002).await?;
    // Both in an archived segment: switch, and wait for the archiver.
    let segment: String = sqlx::query_scalar("select pg_walfile_name(pg_switch_wal())")
        .fetch_one(db)
        .await?;
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let archived: Option<String> =
            sqlx::query_scalar("select last_archived_wal from pg_stat_archiver")
                .fetch_one(db)
                .await?;
        // Segment names of one timeline sort in WAL order.
        if archived.is_some_and(|a| a.get(8..) >= segment.get(8..)) {
            break;
        }
        if Instant::now() > until {
            return Err(setup(format!(
                "WAL segment {segment} not archived within 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stop_all(Duration::from_secs(10));
    db.close().await;
    tracing::info!(%target, "restoring to a point in time");
    let restore_seconds = hook_with(
        "point-in-time restore",
        command,
        &[("RESTORE_TO", target.clone()), ("PATH", path.to_owned())],
    )
    .await?
    .as_secs_f64();
    let restored = pool(database_url).await?;
    let present: Vec<Uuid> = sqlx::query_scalar("select id from bookings where id = any($1)")
        .bind(vec![before, after])
        .fetch_all(&restored)
        .await?;
    restored.close().await;
    Ok(PointInTime {
        target,
        before_kept: present.contains(&before),
        after_kept: present.contains(&after),
        restore_seconds,
    })
}

/// The whole rehearsal; `Ok` carries the report whether or not its checks
/// passed, `Err` means it could not be carried out.
pub async fn run(opts: RehearsalOptions) -> Result<RehearsalReport, Error> {
    if !(opts.rate.is_finite() && (0.5..=500.0).contains(&opts.rate)) {
        return Err(setup(format!(
            "rate {} bookings/s out of range 0.5..500",
            opts.rate
        )));
    }
    let started_at = Utc::now();
    let bin_dir = fleet::find_bin_dir(opts.bin_dir.as_deref())?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::fs::create_dir_all(&opts.log_dir)?;
    // One webhook subscriber of the booking events and settlements: its
    // deliveries are effects the restore can lose too.
    let receiver = Receiver::start(vec![Subscriber {
        name: "bookings".to_owned(),
        secret: "whsec_UmVoZWFyc2FsLXN1YnNjcmliZXIta2V5".to_owned(),
        topics: vec!["booking.*".to_owned(), "settlement.recorded".to_owned()],
    }])
    .await?;
    let subscriber_url = receiver.url("bookings");
    let config_file = opts.log_dir.join("entrip-rehearsal.toml");
    std::fs::write(&config_file, receiver.config_toml())?;
    let env = [
        ("ENTRIP__LOG__LEVEL", "info"),
        ("ENTRIP__DATABASE__MAX_CONNECTIONS", "16"),
        ("ENTRIP__WORKERS__CONCURRENCY", "4"),
        ("ENTRIP__DISPATCHER__POLL_INTERVAL_MS", "200"),
        ("ENTRIP__DISPATCHER__BACKOFF_MIN_MS", "200"),
        ("ENTRIP__DISPATCHER__BACKOFF_MAX_MS", "2000"),
        ("ENTRIP__INGEST__RETRY_AFTER_SECS", "1"),
    ];
    let fleet = Fleet::new(FleetConfig {
        bin_dir: bin_dir.clone(),
        database_url: opts.fleet_database_url.clone(),
        amqp_url: opts.amqp_url.clone(),
        config_file,
        log_dir: opts.log_dir.clone(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    })?;
    let fleet = Arc::new(Mutex::new(fleet));
    let run_bin = |args: &[&str]| -> Result<std::process::Output, Error> {
        let out = fleet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .command(args[0])
            .args(&args[1..])
            .output()?;
        Ok(out)
    };

    tap::declare(&opts.amqp_url).await?;
    let migrate = run_bin(&["ingest", "migrate"])?;
    if !migrate.status.success() {
        return Err(setup(format!(
            "ingest migrate failed: {}",
            String::from_utf8_lossy(&migrate.stderr)
        )));
    }
    let issued = run_bin(&["ingest", "clients", "create", "rehearsal", "--scopes", "*"])?;
    if !issued.status.success() {
        return Err(setup(format!(
            "ingest clients create failed: {}",
            String::from_utf8_lossy(&issued.stderr)
        )));
    }
    let api_key = String::from_utf8_lossy(&issued.stdout).trim().to_owned();
    start_fleet(&fleet, &opts.log_dir).await?;
    let base = fleet.lock().unwrap_or_else(|e| e.into_inner()).ingest_url();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(8))
        .build()?;
    let (_, user) = post_until_created(
        &http,
        &format!("{base}/v1/users"),
        &api_key,
        &format!("rehearsal-user-{}", Uuid::new_v4()),
        &json!({"name": "Rehearsal User", "email": "rehearsal@example.com", "phone": "+82 10 0000 0000"}),
        Duration::from_secs(30),
    )
    .await?;
    let user = id_of(&user).ok_or_else(|| setup(format!("no user id in {user}")))?;

    // Traffic, the backup in the middle of it, the loss.
    let acks = Arc::new(Mutex::new(Vec::<Ack>::new()));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let load = tokio::spawn(traffic(
        Traffic {
            http: http.clone(),
            base: base.clone(),
            api_key: api_key.clone(),
            user,
            rate: opts.rate,
            acks: acks.clone(),
            failed: failed.clone(),
        },
        stop_rx,
    ));
    let pause_relay = || {
        let mut f = fleet.lock().unwrap_or_else(|e| e.into_inner());
        for slot in fleet::DISPATCHERS {
            f.kill(slot);
        }
        tracing::info!("dispatchers stopped: the outbox backs up until the loss");
    };
    tokio::time::sleep(opts.before_backup).await;
    let pause_before_backup = opts.relay_pause >= opts.after_backup;
    if pause_before_backup {
        pause_relay();
    }
    let backup_started_at = Utc::now();
    let backup = hook_with("backup", &opts.backup_hook, &[("PATH", path.clone())]).await;
    let backup_seconds = match backup {
        Ok(d) => d.as_secs_f64(),
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = load.await;
            return Err(e);
        }
    };
    if pause_before_backup {
        tokio::time::sleep(opts.after_backup).await;
    } else {
        tokio::time::sleep(opts.after_backup - opts.relay_pause).await;
        pause_relay();
        tokio::time::sleep(opts.relay_pause).await;
    }
    let db = pool(&opts.database_url).await?;
    let unpublished_at_loss = unpublished(&db).await?;
    db.close().await;
    let loss_at = Utc::now();
    tracing::info!(%loss_at, "losing the cluster");
    let lost = hook_with("lose", &opts.lose_hook, &[("PATH", path.clone())]).await;
    // The cluster is gone by the end of the hook: the RPO is measured to
    // then (an upper bound; `loss_at` is when the loss began).
    let lost_at = Utc::now();
    let _ = stop_tx.send(true);
    let requests_sent = load.await.unwrap_or_default();
    fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stop_all(Duration::from_millis(500));
    lost?;
    let acks: Vec<Ack> = std::mem::take(&mut *acks.lock().unwrap_or_else(|e| e.into_inner()));

    // The restore, then the fleet again: the RTO.
    let restore_start = Instant::now();
    let restore_started_at = Utc::now();
    let restore_hook_seconds = hook_with("restore", &opts.restore_hook, &[("PATH", path.clone())])
        .await?
        .as_secs_f64();
    start_fleet(&fleet, &opts.log_dir).await?;
    let ready_seconds = restore_start.elapsed().as_secs_f64();
    let base = fleet.lock().unwrap_or_else(|e| e.into_inner()).ingest_url();
    let (_, fresh) = post_until_created(
        &http,
        &format!("{base}/v1/bookings"),
        &api_key,
        &format!("rehearsal-after-{}", Uuid::new_v4()),
        &booking_body(user, 999_999),
        Duration::from_secs(60),
    )
    .await?;
    let rto_seconds = restore_start.elapsed().as_secs_f64();
    tracing::info!(rto_seconds, "a new booking was accepted after the restore");
    let verified = match &opts.verify_hook {
        Some(command) => Some(
            hook_with(
                "verify",
                command,
                &[("INGEST", base.clone()), ("PATH", path.clone())],
            )
            .await
            .map(|_| ()),
        ),
        None => None,
    };

    let db = pool(&opts.database_url).await?;
    let mut checks = Vec::new();
    if let Some(verified) = verified {
        check(
            &mut checks,
            "verify_hook_passes",
            verified.is_ok(),
            match verified {
                Ok(()) => "the verification after the restore passed".to_owned(),
                Err(e) => e.to_string(),
            },
        );
    }

    // RPO: which acknowledged bookings are there.
    let ids: Vec<Uuid> = acks.iter().map(|a| a.id).collect();
    let present: BTreeSet<Uuid> =
        sqlx::query_scalar::<_, Uuid>("select id from bookings where id = any($1)")
            .bind(&ids)
            .fetch_all(&db)
            .await?
            .into_iter()
            .collect();
    let missing: Vec<&Ack> = acks.iter().filter(|a| !present.contains(&a.id)).collect();
    let first_missing = missing.iter().map(|a| a.at).min();
    let last_missing = missing.iter().map(|a| a.at).max();
    let rpo_seconds = first_missing
        .map(|t| ((lost_at - t).num_milliseconds().max(0) as f64) / 1000.0)
        .unwrap_or(0.0);
    let cutoff = loss_at
        - chrono::Duration::from_std(opts.rpo_target).unwrap_or_else(|_| chrono::Duration::zero());
    let old_missing = missing.iter().filter(|a| a.at < cutoff).count();
    check(
        &mut checks,
        "acknowledged_before_loss_minus_rpo_present",
        old_missing == 0 && !acks.is_empty(),
        format!(
            "{} bookings acknowledged, {} missing after the restore, {old_missing} of them acknowledged more than {} s before the loss",
            acks.len(),
            missing.len(),
            opts.rpo_target.as_secs()
        ),
    );
    check(
        &mut checks,
        "rpo_within_target",
        rpo_seconds <= opts.rpo_target.as_secs_f64(),
        format!(
            "RPO {rpo_seconds:.1} s (target {} s)",
            opts.rpo_target.as_secs()
        ),
    );
    check(
        &mut checks,
        "rto_within_target",
        rto_seconds <= opts.rto_target.as_secs_f64(),
        format!(
            "RTO {rto_seconds:.1} s to a new booking ({ready_seconds:.1} s to /readyz; target {} s)",
            opts.rto_target.as_secs()
        ),
    );
    check(
        &mut checks,
        "new_booking_accepted",
        id_of(&fresh).is_some(),
        format!("POST /v1/bookings after the restore: {fresh}"),
    );

    // The outbox: everything restored gets published.
    let until = Instant::now() + opts.publish_patience;
    let mut left = unpublished(&db).await?;
    while !left.is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = unpublished(&db).await?;
    }
    // Every restored approved payment is settled: a message consumed
    // before the loss whose settlement the restore lost comes again with
    // the republished window (RUNBOOK.md's restore/repair).
    let unsettled = || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from payments p where p.status = 'APPROVED'
                and not exists (select 1 from settlements s where s.payment_id = p.id)",
        )
        .fetch_one(&db)
        .await
    };
    let mut waiting = unsettled().await?;
    while waiting > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        waiting = unsettled().await?;
    }
    let approved: i64 =
        sqlx::query_scalar("select count(*) from payments where status = 'APPROVED'")
            .fetch_one(&db)
            .await?;
    check(
        &mut checks,
        "approved_payments_settled",
        waiting == 0 && approved > 0,
        format!(
            "{approved} approved payments restored; {waiting} without a settlement after {} s",
            opts.publish_patience.as_secs()
        ),
    );
    // Every restored event the subscriber wants is delivered to it.
    let undelivered = || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from outbox o
              where (o.topic like 'booking.%' or o.topic = 'settlement.recorded')
                and not exists (select 1 from notification_deliveries d
                                 where d.event_id = o.id and d.subscriber = $1
                                   and d.status = 'DELIVERED')",
        )
        .bind(&subscriber_url)
        .fetch_one(&db)
        .await
    };
    let mut not_delivered = undelivered().await?;
    while not_delivered > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        not_delivered = undelivered().await?;
    }
    let seen = receiver.snapshot();
    check(
        &mut checks,
        "webhooks_delivered",
        not_delivered == 0 && !seen.counts.is_empty() && seen.bad_signatures == 0,
        format!(
            "{not_delivered} restored events the subscriber wants not delivered after {} s; {} webhooks received, {} with a bad signature",
            opts.publish_patience.as_secs(),
            seen.counts.values().sum::<u64>(),
            seen.bad_signatures
        ),
    );
    let rows: Vec<(Uuid, Option<DateTime<Utc>>)> =
        sqlx::query_as("select id, published_at from outbox")
            .fetch_all(&db)
            .await?;
    let restored: HashMap<Uuid, Option<DateTime<Utc>>> = rows.into_iter().collect();
    let unpublished_restored = unpublished_at_loss
        .iter()
        .filter(|id| restored.contains_key(id))
        .count();
    let published_after_restore = restored
        .values()
        .filter(|t| t.is_some_and(|t| t >= restore_started_at))
        .count();
    // The relay pause makes a backlog at the loss, and the backup holds
    // part of it: a rehearsal where nothing was left to publish would not
    // show that the restored fleet publishes it.
    check(
        &mut checks,
        "outbox_published_after_restore",
        left.is_empty() && unpublished_restored > 0,
        format!(
            "{} rows unpublished at the loss, {unpublished_restored} of them restored; {published_after_restore} restored rows published after the restore, {} still unpublished after {} s",
            unpublished_at_loss.len(),
            left.len(),
            opts.publish_patience.as_secs()
        ),
    );
    // What the broker carried, from the rehearsal's tap queue.
    fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stop_all(Duration::from_secs(10));
    let carried = tap::drain(&opts.amqp_url).await?;
    let mut republished = 0u64;
    let mut unexplained = 0u64;
    let mut never = 0u64;
    for (id, published_at) in &restored {
        let copies = carried.copies.get(&id.to_string()).copied().unwrap_or(0);
        let after_restore = published_at.is_some_and(|t| t >= restore_started_at);
        match copies {
            0 => never += 1,
            1 => {}
            2 if after_restore => republished += 1,
            n => unexplained += n - 1,
        }
    }
    let published_then_lost = carried
        .copies
        .keys()
        .filter(|id| Uuid::parse_str(id).map_or(true, |id| !restored.contains_key(&id)))
        .count() as u64;
    check(
        &mut checks,
        "no_event_lost",
        never == 0,
        format!(
            "{} restored outbox rows; {never} never reached the broker ({} messages carried)",
            restored.len(),
            carried.messages
        ),
    );
    check(
        &mut checks,
        "duplicates_only_as_at_least_once_allows",
        unexplained == 0,
        format!(
            "{republished} events published again after the restore (their mark was lost with the WAL, or `outbox republish` brought them back); {unexplained} copies beyond that"
        ),
    );

    // Integrity of the restored database.
    let integrity = run_bin(&["workers", "integrity", "--once"])?;
    let integrity_exit = integrity.status.code();
    check(
        &mut checks,
        "integrity_once_exits_0",
        integrity_exit == Some(0),
        format!(
            "workers integrity --once: exit {integrity_exit:?}\n{}",
            String::from_utf8_lossy(&integrity.stdout).trim()
        ),
    );

    // Idempotency after the restore: a restored key replays its answer; a
    // request the restore lost is created again when resent.
    start_fleet(&fleet, &opts.log_dir).await?;
    let base = fleet.lock().unwrap_or_else(|e| e.into_inner()).ingest_url();
    let url = format!("{base}/v1/bookings");
    let mut idem = Idempotency {
        resent_restored: 0,
        replayed: 0,
        resent_lost: 0,
        created_again: 0,
    };
    let mut problems = Vec::new();
    for a in acks.iter().filter(|a| present.contains(&a.id)).take(5) {
        idem.resent_restored += 1;
        match post(&http, &url, &api_key, &a.key, &a.body).await {
            Ok((201, true, body)) if id_of(&body) == Some(a.id) => idem.replayed += 1,
            other => problems.push(format!("restored key {}: {other:?}", a.key)),
        }
    }
    for a in missing.iter().take(5) {
        idem.resent_lost += 1;
        match post(&http, &url, &api_key, &a.key, &a.body).await {
            Ok((201, false, body)) if id_of(&body).is_some() => idem.created_again += 1,
            other => problems.push(format!("lost key {}: {other:?}", a.key)),
        }
    }
    check(
        &mut checks,
        "idempotency_after_restore",
        problems.is_empty() && idem.resent_restored > 0,
        if problems.is_empty() {
            format!(
                "{} restored keys resent, {} replayed; {} lost requests resent, {} created again",
                idem.resent_restored, idem.replayed, idem.resent_lost, idem.created_again
            )
        } else {
            problems.join("; ")
        },
    );

    // A point-in-time restore, as for a mistake to undo: a booking before
    // the target time stays, one after it is gone.
    let pitr = match &opts.pitr_hook {
        Some(command) => {
            let outcome = point_in_time(
                &path,
                &opts.database_url,
                &db,
                &http,
                &url,
                &api_key,
                user,
                command,
                &fleet,
            )
            .await?;
            check(
                &mut checks,
                "point_in_time_restore",
                outcome.before_kept && !outcome.after_kept,
                format!(
                    "restored to {}: the booking created before it {}, the one created after it {}",
                    outcome.target,
                    if outcome.before_kept {
                        "is there"
                    } else {
                        "is MISSING"
                    },
                    if outcome.after_kept {
                        "is STILL THERE"
                    } else {
                        "is gone"
                    },
                ),
            );
            Some(outcome)
        }
        None => None,
    };
    fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stop_all(Duration::from_secs(10));
    db.close().await;

    let passed = checks.iter().all(|c| c.passed);
    Ok(RehearsalReport {
        started_at: started_at.to_rfc3339(),
        backup_started_at: backup_started_at.to_rfc3339(),
        backup_seconds,
        loss_at: loss_at.to_rfc3339(),
        rate: opts.rate,
        requests_sent,
        requests_failed: failed.load(std::sync::atomic::Ordering::Relaxed),
        rpo: Rpo {
            acknowledged: acks.len() as u64,
            missing: missing.len() as u64,
            missing_first_ack: first_missing.map(|t| t.to_rfc3339()),
            missing_last_ack: last_missing.map(|t| t.to_rfc3339()),
            seconds: rpo_seconds,
            target_seconds: opts.rpo_target.as_secs_f64(),
        },
        rto: Rto {
            ready_seconds,
            seconds: rto_seconds,
            target_seconds: opts.rto_target.as_secs_f64(),
            restore_hook_seconds,
        },
        outbox: Outbox {
            unpublished_at_loss: unpublished_at_loss.len() as u64,
            unpublished_restored: unpublished_restored as u64,
            restored_rows: restored.len() as u64,
            published_after_restore: published_after_restore as u64,
            republished,
            published_then_lost,
            never_published: never,
            unexplained_duplicates: unexplained,
        },
        idempotency: idem,
        point_in_time: pitr,
        integrity_exit,
        checks,
        passed,
        log_dir: opts.log_dir.display().to_string(),
    })
}

impl RehearsalReport {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let _ = writeln!(s, "# Entrip restore rehearsal: {verdict}\n");
        let _ = writeln!(
            s,
            "- started {}; {} bookings/s; {} requests sent, {} not acknowledged (the outage)",
            self.started_at, self.rate, self.requests_sent, self.requests_failed
        );
        let _ = writeln!(
            s,
            "- full backup at {} took {:.1} s, the traffic going on",
            self.backup_started_at, self.backup_seconds
        );
        let _ = writeln!(
            s,
            "- cluster lost (stopped, data directory removed) at {}",
            self.loss_at
        );
        let _ = writeln!(s, "- service logs: `{}`\n", self.log_dir);
        let _ = writeln!(s, "| figure | value | target |\n|---|---:|---:|");
        let _ = writeln!(
            s,
            "| RPO: acknowledged bookings missing | {} of {} | |",
            self.rpo.missing, self.rpo.acknowledged
        );
        let _ = writeln!(
            s,
            "| RPO: span of lost acknowledged work | {:.1} s | ≤ {:.0} s |",
            self.rpo.seconds, self.rpo.target_seconds
        );
        let _ = writeln!(
            s,
            "| RTO: restore start → /readyz 200 | {:.1} s | |",
            self.rto.ready_seconds
        );
        let _ = writeln!(
            s,
            "| RTO: restore start → new booking accepted | {:.1} s | ≤ {:.0} s |",
            self.rto.seconds, self.rto.target_seconds
        );
        let _ = writeln!(
            s,
            "| restore hook (pgBackRest restore + WAL replay) | {:.1} s | |",
            self.rto.restore_hook_seconds
        );
        let o = &self.outbox;
        let _ = writeln!(
            s,
            "| outbox rows unpublished at the loss / restored | {} / {} | |",
            o.unpublished_at_loss, o.unpublished_restored
        );
        let _ = writeln!(
            s,
            "| restored rows published after the restore | {} | all unpublished ones |",
            o.published_after_restore
        );
        let _ = writeln!(
            s,
            "| events published again after the restore | {} | at-least-once |",
            o.republished
        );
        let _ = writeln!(
            s,
            "| events carried whose rows the restore lost | {} | within the RPO |",
            o.published_then_lost
        );
        if let Some(p) = &self.point_in_time {
            let _ = writeln!(
                s,
                "| point-in-time restore to {}: booking before kept / after gone | {} / {} ({:.1} s) | yes / yes |",
                p.target,
                if p.before_kept { "yes" } else { "no" },
                if p.after_kept { "no" } else { "yes" },
                p.restore_seconds
            );
        }
        let _ = writeln!(s, "\n## Checks\n");
        for c in &self.checks {
            let mark = if c.passed { "PASS" } else { "FAIL" };
            let _ = writeln!(
                s,
                "- **{mark}** `{}`: {}",
                c.name,
                c.detail.replace('\n', "\n  ")
            );
        }
        s
    }

    /// Writes `<prefix>.md` and `<prefix>.json`.
    pub fn write(&self, prefix: &Path) -> Result<(), Error> {
        if let Some(dir) = prefix.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let path = |ext: &str| PathBuf::from(format!("{}.{ext}", prefix.display()));
        std::fs::write(path("md"), self.markdown())?;
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| setup(format!("report as JSON: {e}")))?;
        std::fs::write(path("json"), json + "\n")?;
        Ok(())
    }
}
