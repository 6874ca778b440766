//! The `workers` binary: runs the consumers and the integrity checker, or
//! one integrity run on demand.

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use entrip_common::{config::Settings, db, metrics::new_registry, shutdown, telemetry};
use entrip_workers::{
    check_once, gauges_loop, integrity_loop, metrics::WorkerMetrics, notifications::Notifications,
    runtime::Consumer, settlement::Settlement,
};

/// Entrip workers: settlement and signed webhook notifications, each effect
/// exactly once, and the integrity checker. Without a subcommand it runs
/// them all.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the consumers and the periodic integrity checker (the default).
    Run,
    /// Check the data's integrity: a readable report; exit 1 on a violation.
    Integrity {
        /// Run the checks once and exit (the only mode; periodic runs are
        /// part of `workers run`).
        #[arg(long)]
        once: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load_or_exit("workers");
    telemetry::init(&settings.log);
    match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Run => run(settings).await,
        Cmd::Integrity { once: _ } => {
            // Exit 1 means "violations found"; 2 means "could not check".
            let report = match integrity_once(&settings).await {
                Ok(report) => report,
                Err(err) => {
                    eprintln!("workers: the integrity check could not run: {err:#}");
                    std::process::exit(2);
                }
            };
            print!("{}", report.render());
            if report.violations() > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn integrity_once(settings: &Settings) -> anyhow::Result<entrip_workers::integrity::Report> {
    let pool = db::connect_and_migrate(&settings.database).await?;
    let metrics = WorkerMetrics::register(&new_registry())?;
    Ok(check_once(
        &pool,
        &settings.integrity,
        &metrics,
        &reqwest::Client::new(),
    )
    .await?)
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let token = shutdown::on_signal();
    let pool = db::connect_and_migrate(&settings.database)
        .await
        .context("database start-up")?;
    let registry = new_registry();
    let metrics = WorkerMetrics::register(&registry)?;
    let listen = settings.workers.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (key `workers.listen`)"))?;
    let http = entrip_common::metrics::spawn_server(listener, registry.clone(), token.clone());
    let settlement = Consumer {
        handler: Arc::new(Settlement { pool: pool.clone() }),
        amqp: settings.amqp.clone(),
        settings: settings.workers.clone(),
        metrics: metrics.clone(),
    };
    let notifications = Consumer {
        handler: Arc::new(Notifications::new(pool.clone(), &settings.notifications)?),
        amqp: settings.amqp.clone(),
        settings: settings.workers.clone(),
        metrics: metrics.clone(),
    };
    let side = [
        tokio::spawn(integrity_loop(
            pool.clone(),
            settings.integrity.clone(),
            metrics.clone(),
            token.clone(),
        )),
        tokio::spawn(gauges_loop(pool.clone(), metrics.clone(), token.clone())),
    ];
    tracing::info!(%listen, webhooks = settings.notifications.webhooks.len(), "workers running");
    tokio::join!(
        settlement.run(token.clone()),
        notifications.run(token.clone())
    );
    for task in side {
        task.abort();
    }
    let _ = http.await;
    pool.close().await;
    tracing::info!("workers stopped");
    Ok(())
}
