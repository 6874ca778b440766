//! The `dispatcher` binary as a process: SIGKILL in the middle of a backlog
//! and a restart lose nothing; SIGTERM finishes the batch in flight and
//! exits 0; the operator commands work against a real outbox and DLQ.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::TcpListener,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use entrip_common::domain::EventType;
use entrip_testkit::{Vhost, database_url};
use sqlx::{PgPool, postgres::PgConnectOptions};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_dispatcher");

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

fn spawn(db_url: &str, amqp_url: &str) -> Guard {
    Guard(
        command(db_url, amqp_url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn run(db_url: &str, amqp_url: &str, args: &[&str]) -> Output {
    command(db_url, amqp_url).args(args).output().unwrap()
}

fn signal(child: &Child, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}

async fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the dispatcher did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    eventually(120, "the first dispatcher is publishing", || async {
        count(&pool, "published_at IS NOT NULL").await >= 1000
    })
    .await;
    signal(&first.0, "-KILL");
    let status = wait_exit(&mut first.0, 10).await;
    assert!(!status.success(), "killed, not exited: {status:?}");
    let done_at_kill = count(&pool, "published_at IS NOT NULL").await;
    assert!(done_at_kill < total, "killed mid-backlog");

    let mut second = spawn(&db_url, &vhost.url());
    eventually(240, "everything published after the restart", || async {
        count(&pool, "published_at IS NULL").await == 0
    })
    .await;
    eventually(60, "everything received", || async {
        rec.distinct().await == total as usize
    })
    .await;
    assert_ordered(&rec.sequences().await, 100);

    // SIGTERM: exits 0 after the batch in flight.
    signal(&second.0, "-TERM");
    let status = wait_exit(&mut second.0, 30).await;
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
    let total = bulk_insert(&pool, 100, 100).await;
    let port = free_port();
    let mut child = Guard(
        command_on(&db_url, &vhost.url(), port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually(120, "publishing", || async {
        count(&pool, "published_at IS NOT NULL").await >= 500
    })
    .await;
    // The metrics of DESIGN.md, refreshed while the backlog drains.
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    eventually(30, "outbox gauges exported", || async {
        let text = reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .any(|l| l.starts_with("entrip_outbox_undelivered ") && !l.ends_with(" 0"))
    })
    .await;
    let text = reqwest::get(&metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "entrip_outbox_undelivered",
        "entrip_outbox_oldest_undelivered_age_seconds",
        "entrip_outbox_published_total{topic=\"booking.created\"}",
        "entrip_outbox_publish_failures_total",
        "entrip_outbox_dead",
        "entrip_outbox_publish_latency_seconds_bucket",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    entrip_testkit::promtool_check(&text).unwrap();
    signal(&child.0, "-TERM");
    let status = wait_exit(&mut child.0, 30).await;
    assert!(status.success(), "{status:?}");
    let published = count(&pool, "published_at IS NOT NULL").await;
    assert!(published < total, "stopped mid-backlog");
    // Everything marked published reached the broker.
    eventually(30, "every published row received", || async {
        rec.distinct().await as i64 >= published
    })
    .await;
    assert_eq!(count(&pool, "attempts > 0").await, 0);
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
