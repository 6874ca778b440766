//! The short chaos run of CI, under a minute also on a busy machine: the
//! real binaries (found in target/debug: `cargo build --bins` first when
//! running this test alone) in their own database and vhost, 12 s of
//! journeys at 8 per second while every fault of the mix comes up at least
//! once (AMQP connection closes, SIGKILLs of a dispatcher, of the workers and
//! of ingest, `pg_terminate_backend`, the database refusing connections,
//! webhook 500 and hang windows) — but no broker-wide stop, since other tests
//! share the broker. The default share of the requests (30 %) goes over AMQP
//! instead of HTTP, with resends after lost replies and planted poison.
//! Every check must pass.
//!
//! Why it is short and still proves the guarantees: the checks are the same
//! as the long run's and look at every journey and every event, so what
//! matters is that each kind of fault strikes while work is in flight. The
//! injector draws faults from shuffled rounds holding every kind, one every
//! 0.3–1 s, and the load goes on until one round is complete
//! (`min_fault_rounds`), so every kind comes up during the load however slow
//! the machine; the test asserts that each did. Nothing waits for a
//! deadline sized for an idle machine: the drain fails only when nothing
//! moves for 20 s, and a request counts as lost only when it went unanswered
//! for 15 s while the fleet answered others.
//!
//! The services connect as a role without superuser rights that owns the
//! schema (they migrate it themselves), as the role `entrip` does in
//! production; the driver stays the superuser the database faults need.
//! While the run goes on, `pg_stat_activity` is sampled: every binary's
//! sessions must show up, and none may be a superuser's.

use std::{collections::BTreeSet, time::Duration};

use entrip_chaos::{
    Options,
    faults::{Fault, MIX},
    run,
};
use entrip_testkit::{
    Vhost, database_url,
    pg::{ServiceRole, service_sessions},
};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

#[sqlx::test(migrations = false)]
async fn chaos_short_run_keeps_every_guarantee(_opts: PgPoolOptions, connect: PgConnectOptions) {
    // The driver's progress lines, shown with the failure output.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("entrip_chaos=info")
        .try_init();
    // Named chaos-…: the faults spare it, so the sampling goes on through them.
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(connect.clone().application_name("chaos-test"))
        .await
        .unwrap();
    let role = ServiceRole::create(&admin).await.unwrap();
    let vhost = Vhost::new();
    let mut opts = Options::new(database_url(&connect), vhost.name.clone(), vhost.url());
    opts.fleet_database_url = Some(role.url().to_owned());
    opts.duration = Duration::from_secs(12);
    opts.rate = 8.0;
    opts.fault_interval = (Duration::from_millis(300), Duration::from_millis(1000));
    opts.min_fault_rounds = 1;
    opts.drain_stall = Duration::from_secs(20);
    opts.give_up_after = Duration::from_secs(15);
    opts.max_connections = 12;
    opts.worker_concurrency = 4;
    opts.seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    // #[sqlx::test] runs on a current-thread runtime; the driver gets its
    // own multi-threaded one so that the webhook receiver never waits on it.
    let mut chaos = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(opts))
    });
    // The binaries' sessions seen while it runs, and the superusers' among them.
    let (mut seen, mut superusers) = (BTreeSet::new(), BTreeSet::new());
    let report = loop {
        tokio::select! {
            done = &mut chaos => break done.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(250)) => {
                sample(&admin, &mut seen, &mut superusers).await;
            }
        }
    };
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
    // Every kind of the mix really happened, with work in flight.
    for (fault, _) in MIX {
        let n = report.faults.get(&fault).copied().unwrap_or(0);
        assert!(n >= 1, "no {fault:?} in {:?}", report.faults);
    }
    assert!(report.fault_rounds >= 1, "{} rounds", report.fault_rounds);
    assert!(
        report.backends_terminated > 0,
        "pg_terminate_backend ended no backend"
    );
    // Requests went over AMQP too, and some were sent again.
    let total = |name: &str| report.totals.get(name).copied().unwrap_or(0);
    assert!(
        total("AMQP: requests told 201/200") > 0,
        "no AMQP request stored: {:?}",
        report.totals
    );
    assert!(
        total("AMQP: resends (no reply within the patience window)") > 0,
        "no AMQP resend: {:?}",
        report.totals
    );
    // The Jepsen-style counts cover every history, with something in each
    // of the main ones, nothing lost and nothing unexpected.
    assert_eq!(report.tallies.len(), 7, "{:?}", report.tallies);
    for t in &report.tallies {
        assert_eq!((t.lost, t.unexpected), (0, 0), "{t:?}");
        assert_eq!(t.ok, t.expected, "{t:?}");
    }
    for history in [
        "acknowledged bookings",
        "settlements",
        "webhooks (event, subscriber)",
    ] {
        let t = report.tallies.iter().find(|t| t.history == history);
        assert!(t.is_some_and(|t| t.expected > 0), "{history}: {t:?}");
    }
    assert!(
        !report.faults.contains_key(&Fault::BrokerRestart),
        "the broker-wide stop must not run beside other tests"
    );
    for binary in ["entrip-ingest", "entrip-dispatcher", "entrip-workers"] {
        assert!(seen.contains(binary), "no session of {binary}: {seen:?}");
    }
    assert!(
        superusers.is_empty(),
        "the fleet ran as a superuser: {superusers:?}"
    );
    admin.close().await;
    role.drop_role().await.unwrap();
    drop(vhost);
}

/// Adds the binaries' sessions of the moment to `seen` (application names)
/// and `superusers` (name and role of a superuser's). A sample that fails
/// (the database refusing connections) is skipped.
async fn sample(pool: &PgPool, seen: &mut BTreeSet<String>, superusers: &mut BTreeSet<String>) {
    let Ok(now) = service_sessions(pool).await else {
        return;
    };
    for s in now.sessions {
        if s.superuser {
            superusers.insert(format!("{} as {}", s.application_name, s.role));
        }
        seen.insert(s.application_name);
    }
}
