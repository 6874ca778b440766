//! RUNBOOK.md as tested commands: every `sh` block of it runs here, with
//! bash, against a fleet of this test's own (the three binaries, a database
//! and a vhost of its own, two webhook subscribers) where the incidents are
//! planted: a webhook given up on (a subscriber that answered 503), the
//! notification in `entrip.notifications.dlq` that it left, a duplicate
//! booking, an integrity violation (an approved payment whose events are
//! dead in the outbox) and a dead outbox row. For each planted incident the
//! verification must fail first, the diagnosis must run, and after the
//! repair the verification must pass. The incidents with nothing to plant
//! in a shared suite (booking creation failing, the broker or the database
//! down: taking them down would stop every other test) run their blocks on
//! the healthy fleet. The restore blocks are run by
//! `scripts/restore-rehearsal` (`chaos/tests/it/rehearsal.rs`); this test
//! checks that the script runs each of them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use entrip_testkit::{Process, Vhost, free_port, pg::ServiceRole};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

use crate::e2e::{
    Api, DownSubscriber, Fleet, Receiver, create_kim, kim_booking, pay, wait_ready, write_webhooks,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Diagnose,
    Repair,
    Verify,
}

/// One `sh` block: its incident, its phase, its text.
#[derive(Debug, Clone)]
struct Block {
    incident: String,
    phase: Phase,
    text: String,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every `sh` block of RUNBOOK.md; each must start with its step line.
fn blocks() -> Vec<Block> {
    let text = std::fs::read_to_string(repo().join("RUNBOOK.md")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        if info.trim() != "sh" {
            assert!(
                info.trim().is_empty() || info.trim() == "json",
                "a fenced block of RUNBOOK.md that is neither sh nor json: {info}"
            );
            continue;
        }
        let step = body
            .first()
            .and_then(|l| l.strip_prefix("# step: "))
            .unwrap_or_else(|| panic!("an sh block without its step line: {body:?}"));
        let (incident, phase) = step.split_once('/').unwrap();
        let phase = match phase.trim() {
            "diagnose" => Phase::Diagnose,
            "repair" => Phase::Repair,
            "verify" => Phase::Verify,
            other => panic!("unknown phase {other} in {step}"),
        };
        out.push(Block {
            incident: incident.to_owned(),
            phase,
            text: body.join("\n"),
        });
    }
    out
}

/// Runs one block with `bash -euo pipefail` in `env`; its exit code and
/// output.
fn run(env: &BTreeMap<String, String>, text: &str) -> (Option<i32>, String) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", text])
        .current_dir(repo())
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs an incident's blocks: the verification first (it must fail when
/// the incident is planted), each diagnosis, each repair, then the
/// verification until it passes (repairs such as a redelivery or a redrive
/// take effect within seconds, through the fleet).
async fn incident(
    blocks: &[Block],
    env: &BTreeMap<String, String>,
    name: &str,
    planted: bool,
    ran: &mut Vec<String>,
) {
    let of = |phase: Phase| -> Vec<&Block> {
        blocks
            .iter()
            .filter(|b| b.incident == name && b.phase == phase)
            .collect()
    };
    let (diagnose, repair, verify) = (of(Phase::Diagnose), of(Phase::Repair), of(Phase::Verify));
    assert!(
        !diagnose.is_empty() && !repair.is_empty() && !verify.is_empty(),
        "{name}: a diagnosis, a repair and a verification"
    );
    let verify_all = || {
        verify.iter().try_for_each(|b| match run(env, &b.text) {
            (Some(0), _) => Ok(()),
            (code, out) => Err(format!("{code:?}: {out}")),
        })
    };
    if planted {
        assert!(
            verify_all().is_err(),
            "{name}: the verification passes before the repair"
        );
    }
    for b in diagnose.iter().chain(repair.iter()) {
        let (code, out) = run(env, &b.text);
        assert_eq!(code, Some(0), "{name}: {}\n{out}", b.text);
        ran.push(format!("{name}/{:?}", b.phase));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match verify_all() {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("{name}: the verification still fails after the repair: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    ran.push(format!("{name}/Verify"));
}

/// Events of these bookings not yet published: dead, as a dispatcher sets
/// them after its last attempt.
async fn kill_events(pool: &PgPool, bookings: &[&str]) -> u64 {
    let ids: Vec<Uuid> = bookings.iter().map(|b| b.parse().unwrap()).collect();
    sqlx::query(
        "UPDATE outbox SET dead_at = now(), attempts = 10,
                last_error = 'planted: the broker refused the message'
          WHERE published_at IS NULL AND dead_at IS NULL
            AND (aggregate_id = ANY($1)
                 OR aggregate_id IN (SELECT id FROM payments WHERE booking_id = ANY($1)))",
    )
    .bind(&ids)
    .execute(pool)
    .await
    .unwrap()
    .rows_affected()
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn every_runbook_command_diagnoses_repairs_and_verifies_its_incident(
    _opts: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let blocks = blocks();
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let role = ServiceRole::create(&pool).await.unwrap();
    let vhost = Vhost::new();
    let receiver = Receiver::default();
    let hook_url = receiver.start().await;
    let DownSubscriber {
        url: down_url,
        up,
        seen,
    } = DownSubscriber::start().await;
    let fleet = Fleet {
        db_url: role.url().to_owned(),
        amqp_url: vhost.url(),
        config: write_webhooks(&[
            (&down_url, r#"["settlement.recorded"]"#),
            (&hook_url, r#"["booking.*", "settlement.recorded"]"#),
        ]),
    };
    let (ingest_port, dispatcher_port, workers_port) = (free_port(), free_port(), free_port());
    let _ingest = fleet.spawn("ingest", "ENTRIP__INGEST__LISTEN", ingest_port);
    let spawn_dispatcher =
        || fleet.spawn("dispatcher", "ENTRIP__DISPATCHER__LISTEN", dispatcher_port);
    let mut dispatcher = spawn_dispatcher();
    // One retry: the subscriber that is down is given up on within a
    // second; an approved payment is overdue for settlement after 1 s.
    let _workers = Process::spawn(
        fleet
            .command("workers")
            .env(
                "ENTRIP__WORKERS__LISTEN",
                format!("127.0.0.1:{workers_port}"),
            )
            .env("ENTRIP__WORKERS__MAX_RETRIES", "1")
            .env("ENTRIP__INTEGRITY__SETTLE_GRACE_SECS", "1"),
    );
    let ingest = format!("http://127.0.0.1:{ingest_port}");
    let dispatcher_url = format!("http://127.0.0.1:{dispatcher_port}");
    let workers_url = format!("http://127.0.0.1:{workers_port}");
    wait_ready(&format!("{ingest}/readyz")).await;
    wait_ready(&format!("{dispatcher_url}/healthz")).await;
    wait_ready(&format!("{workers_url}/healthz")).await;

    // The operator's key (what the runbook's "Before you start" asks for).
    let out = fleet
        .command("ingest")
        .args([
            "clients",
            "create",
            "ops",
            "--scopes",
            "bookings:write,read",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let ops_key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let api = Api {
        base: ingest.clone(),
        client: fleet.api_client_named("upstream"),
    };
    let user = create_kim(&api).await;
    let booking = |code: &str| kim_booking(code, &user);
    // Planted: a settlement whose webhook the subscriber that is down never
    // got, and its notification in entrip.notifications.dlq.
    let missing = api.post("/v1/bookings", booking("MISS-00001")).await;
    pay(&api, &missing["id"]).await;
    entrip_testkit::eventually("the subscriber that is down given up on", || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from notification_deliveries where subscriber = $1 and status = 'DEAD'",
        )
        .bind(&down_url)
        .fetch_one(&pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    // Planted: the same trip booked twice, under two keys and two codes.
    let original = api.post("/v1/bookings", booking("DUP-00001")).await;
    let duplicate = api.post("/v1/bookings", booking("DUP-00002")).await;

    let mut env: BTreeMap<String, String> = fleet
        .command("dispatcher")
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
        .collect();
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_workers"))
        .parent()
        .unwrap()
        .to_path_buf();
    env.insert(
        "PATH".into(),
        format!(
            "{}:{}:/usr/local/sbin:/usr/sbin:/sbin",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    for key in ["HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "USER", "LANG"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.into(), v);
        }
    }
    for (k, v) in [
        ("INGEST", ingest.clone()),
        ("DISPATCHER", dispatcher_url.clone()),
        ("WORKERS", workers_url.clone()),
        ("ENTRIP_API_KEY", ops_key),
        ("VHOST", vhost.name.clone()),
        ("BOOKING", "MISS-00001".into()),
        ("SUBSCRIBER", down_url.clone()),
        ("ORIGINAL", original["id"].as_str().unwrap().into()),
        ("DUPLICATE", duplicate["id"].as_str().unwrap().into()),
        ("ENTRIP__LOG__LEVEL", "warn".into()),
        // The workers' settings: the operator runs the CLI with them.
        ("ENTRIP__INTEGRITY__SETTLE_GRACE_SECS", "1".into()),
    ] {
        env.insert(k.into(), v);
    }
    let mut ran = Vec::new();

    // The subscriber is fixed, then its notification sent again.
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    incident(&blocks, &env, "missing-notification", true, &mut ran).await;
    assert!(
        !seen.lock().unwrap().is_empty(),
        "the subscriber got the settlement's webhook"
    );
    incident(&blocks, &env, "dlq", true, &mut ran).await;
    incident(&blocks, &env, "duplicate", true, &mut ran).await;

    // Planted: an approved payment whose events a dispatcher gave up on
    // (it is stopped meanwhile, so that they are not published first).
    dispatcher.signal("-KILL");
    dispatcher.wait_exit().await;
    let unsettled = api.post("/v1/bookings", booking("INT-00001")).await;
    pay(&api, &unsettled["id"]).await;
    assert!(kill_events(&pool, &[unsettled["id"].as_str().unwrap()]).await >= 3);
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the grace
    dispatcher = spawn_dispatcher();
    wait_ready(&format!("{dispatcher_url}/healthz")).await;
    incident(&blocks, &env, "integrity", true, &mut ran).await;
    let settled: i64 = sqlx::query_scalar("select count(*) from settlements where booking_id = $1")
        .bind(unsettled["id"].as_str().unwrap().parse::<Uuid>().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(settled, 1, "the redriven payment was settled");

    // Planted: a booking's event dead in the outbox.
    dispatcher.signal("-KILL");
    dispatcher.wait_exit().await;
    let stuck = api.post("/v1/bookings", booking("OUT-00001")).await;
    assert_eq!(
        kill_events(&pool, &[stuck["id"].as_str().unwrap()]).await,
        1
    );
    let _dispatcher = spawn_dispatcher();
    wait_ready(&format!("{dispatcher_url}/healthz")).await;
    incident(&blocks, &env, "outbox", true, &mut ran).await;

    // Nothing to plant in a shared suite: the blocks run on the healthy
    // fleet (their repair, scripts/services, is a no-op then).
    for name in ["creation-failing", "broker-down", "database-down"] {
        incident(&blocks, &env, name, false, &mut ran).await;
    }

    // Every block ran here, or is run by the restore rehearsal.
    let rehearsal = std::fs::read_to_string(repo().join("scripts/restore-rehearsal")).unwrap();
    for b in &blocks {
        let step = format!("{}/{:?}", b.incident, b.phase);
        if b.incident == "restore" {
            let tag = format!("restore/{}", format!("{:?}", b.phase).to_lowercase());
            assert!(
                rehearsal.contains(&format!("runbook_block {tag}")),
                "scripts/restore-rehearsal does not run {tag}"
            );
        } else {
            assert!(ran.contains(&step), "{step} was not run");
        }
    }
}
