//! The short chaos run of CI: about 40 s of load at a low rate against the
//! real binaries (found in target/debug: `cargo build --workspace --bins`
//! first when running this test alone), in its own database and vhost, with
//! AMQP connection closes, SIGKILLs of a dispatcher and the workers,
//! `pg_terminate_backend` and webhook 500/hang windows — but no broker-wide
//! stop, since other tests share the broker. Every check must pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use entrip_chaos::{Options, run};
use entrip_testkit::{Vhost, database_url};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[sqlx::test(migrations = false)]
async fn chaos_short_run_keeps_every_guarantee(_opts: PgPoolOptions, connect: PgConnectOptions) {
    // The driver's progress lines, shown with the failure output.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("entrip_chaos=info")
        .try_init();
    let vhost = Vhost::new();
    let mut opts = Options::new(database_url(&connect), vhost.name.clone(), vhost.url());
    opts.duration = Duration::from_secs(40);
    opts.rate = 12.0;
    opts.drain_timeout = Duration::from_secs(90);
    opts.max_connections = 12;
    opts.worker_concurrency = 4;
    opts.seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    // #[sqlx::test] runs on a current-thread runtime; the driver gets its
    // own multi-threaded one so that the webhook receiver never waits on it.
    let report = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(opts))
    })
    .await
    .unwrap();
    let report = match report {
        Ok(r) => r,
        Err(e) => panic!("the chaos run could not be carried out: {e}"),
    };
    if !report.passed {
        eprintln!("{}", report.markdown());
        eprintln!("{}", report.log_tails.as_deref().unwrap_or_default());
        panic!(
            "chaos checks failed (seed {}): {:?}",
            report.seed,
            report
                .failed_checks()
                .iter()
                .map(|c| &c.name)
                .collect::<Vec<_>>()
        );
    }
    println!("{}", report.markdown());
    // The faults really happened.
    for kind in ["SIGKILL", "pg_terminate_backend", "AMQP connections closed"] {
        assert!(
            report.faults.keys().any(|k| k.contains(kind)),
            "no {kind} fault in {:?}",
            report.faults
        );
    }
    drop(vhost);
}
