//! The `dispatcher` binary as a process: SIGKILL in the middle of a backlog
//! and a restart lose nothing; SIGTERM finishes the batch in flight and
//! exits 0; the operator commands work against a real outbox and DLQ.

use std::process::{Command, Output};

use entrip_common::domain::EventType;
use entrip_testkit::{Process, Vhost, database_url, eventually, free_port, progress};
use sqlx::{PgPool, postgres::PgConnectOptions};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_dispatcher");

fn command(db_url: &str, amqp_url: &str) -> Command {
    command_on(db_url, amqp_url, free_port())
}

fn command_on(db_url: &str, amqp_url: &str, port: u16) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("AMQP_URL", amqp_url)
        .env("ENTRIP__DISPATCHER__LISTEN", format!("127.0.0.1:{port}"))
        .env("ENTRIP__DISPATCHER__BATCH_SIZE", "200")
        .env("ENTRIP__DISPATCHER__POLL_INTERVAL_MS", "200")
        .env("ENTRIP__AMQP__RETRY_DELAYS_MS", "500,2000")
        .env("ENTRIP__LOG__FORMAT", "json");
    cmd
}

fn spawn(db_url: &str, amqp_url: &str) -> Process {
    Process::spawn(&mut command(db_url, amqp_url))
}

fn run(db_url: &str, amqp_url: &str, args: &[&str]) -> Output {
    command(db_url, amqp_url).args(args).output().unwrap()
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn sigkill_mid_backlog_then_restart_delivers_everything(
    _opts: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let db_url = database_url(&connect);
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    let total = bulk_insert(&pool, 100, 100).await;

    let mut first = spawn(&db_url, &vhost.url());
    rows_reach(&pool, "published_at IS NOT NULL", 1000).await;
    first.signal("-KILL");
    let status = first.wait_exit().await;
    assert!(!status.success(), "killed, not exited: {status:?}");
    let done_at_kill = count(&pool, "published_at IS NOT NULL").await;
    assert!(done_at_kill < total, "killed mid-backlog");

    let mut second = spawn(&db_url, &vhost.url());
    drained(&pool, "published_at IS NULL").await;
    rec.received(total as usize).await;
    assert_ordered(&rec.sequences().await, 100);

    // SIGTERM: exits 0 after the batch in flight.
    second.signal("-TERM");
    let status = second.wait_exit().await;
    assert!(status.success(), "{status:?}");
    pool.close().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn sigterm_mid_backlog_leaves_no_claimed_row_behind(
    _opts: sqlx::postgres::PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let db_url = database_url(&connect);
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    // One row waiting for a retry an hour away stays undelivered throughout,
    // so that the gauge has a known value to show; then the backlog.
    let waiting = insert_events(&pool, 1, 1, EventType::BookingCreated).await;
    sqlx::query(
        "UPDATE outbox SET attempts = 1, next_attempt_at = now() + interval '1 hour' WHERE id = $1",
    )
    .bind(waiting[0].0)
    .execute(&pool)
    .await
    .unwrap();
    let backlog = bulk_insert(&pool, 100, 100).await;

    let mut child = spawn(&db_url, &vhost.url());
    rows_reach(&pool, "published_at IS NOT NULL", 500).await;
    child.signal("-TERM");
    let status = child.wait_exit().await;
    assert!(status.success(), "{status:?}");
    let published = count(&pool, "published_at IS NOT NULL").await;
    assert!(published < backlog, "stopped mid-backlog");
    // Everything marked published reached the broker, and no row of the
    // batches in flight counts a failed attempt.
    progress("every published row received", || async {
        let got = rec.distinct().await as i64;
        (got, got >= published)
    })
    .await;
    assert_eq!(
        count(&pool, "attempts > 0").await,
        1,
        "only the waiting row"
    );

    // Started again, it drains the rest and exports the outbox metrics of
    // docs/DESIGN.md; the waiting row is the one undelivered.
    let port = free_port();
    let mut child = Process::spawn(
        command_on(&db_url, &vhost.url(), port).env("ENTRIP__DISPATCHER__STATS_INTERVAL_SECS", "1"),
    );
    drained(&pool, "published_at IS NULL AND attempts = 0").await;
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let metrics = || async {
        reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    eventually("the undelivered gauge shows the waiting row", || async {
        metrics()
            .await
            .lines()
            .any(|l| l == "entrip_outbox_undelivered 1")
    })
    .await;
    let text = metrics().await;
    for name in [
        "entrip_outbox_oldest_undelivered_age_seconds",
        "entrip_outbox_published_total{topic=\"booking.created\"}",
        "entrip_outbox_publish_failures_total",
        "entrip_outbox_dead 0",
        "entrip_outbox_publish_latency_seconds_bucket",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    entrip_testkit::promtool_check(&text).unwrap();
    rec.received(backlog as usize).await;
    child.signal("-TERM");
    assert!(child.wait_exit().await.success());
    pool.close().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn operator_commands(_opts: sqlx::postgres::PgPoolOptions, connect: PgConnectOptions) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let db_url = database_url(&connect);
    let vhost = Vhost::new();
    let rows = insert_events(&pool, 2, 2, EventType::BookingCreated).await;
    sqlx::query("UPDATE outbox SET dead_at = now(), attempts = 10 WHERE id = $1")
        .bind(rows[0].0)
        .execute(&pool)
        .await
        .unwrap();

    let out = run(&db_url, &vhost.url(), &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["run", "outbox", "dlq"] {
        assert!(help.contains(word), "{help}");
    }

    let out = run(&db_url, &vhost.url(), &["outbox", "stats"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("undelivered: 3"), "{text}");
    assert!(text.contains("dead: 1"), "{text}");
    assert!(text.contains("booking.created"), "{text}");

    let out = run(&db_url, &vhost.url(), &["outbox", "redrive"]);
    assert!(
        !out.status.success(),
        "redrive needs --all, --id or --topic"
    );

    let id = rows[0].0.to_string();
    let out = run(&db_url, &vhost.url(), &["outbox", "redrive", "--id", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 dead rows are due again"));
    assert_eq!(count(&pool, "dead_at IS NOT NULL").await, 0);

    // DLQ commands against the real topology (the relay declares it).
    let out = run(
        &db_url,
        &vhost.url(),
        &["dlq", "list", "entrip.settlement.dlq"],
    );
    assert!(!out.status.success(), "the queue does not exist yet");
    let conn = entrip_common::amqp::connect(&vhost.url(), "t")
        .await
        .unwrap();
    entrip_common::amqp::declare_topology(
        &conn.create_channel().await.unwrap(),
        &amqp_settings(&vhost.url()),
    )
    .await
    .unwrap();
    let out = run(
        &db_url,
        &vhost.url(),
        &["dlq", "list", "entrip.settlement.dlq"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 message(s)"));
    let out = run(
        &db_url,
        &vhost.url(),
        &["dlq", "replay", "entrip.settlement.dlq", "--limit", "5"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 message(s) replayed"));
    pool.close().await;
}
