//! The `workers` binary: runs the consumers and the integrity checker, or
//! one integrity run on demand.

use clap::{Parser, Subcommand};
use entrip_common::{config::Settings, db, metrics::new_registry, service::Service, telemetry};
use entrip_workers::{
    integrity::{Checker, ErrorTicket, Report},
    metrics::WorkerMetrics,
    notifications::{Notifications, undelivered_gauge_loop},
    runtime::Consumer,
    settlement::Settlement,
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
    /// Check the data's integrity: a readable report; exit 1 on a violation,
    /// 2 when the checks could not run.
    Integrity {
        /// Run the checks once and exit (the only mode; periodic runs are
        /// part of `workers run`).
        #[arg(long)]
        once: bool,
        /// Print the report as the ticket the alert webhook receives (JSON)
        /// instead of the readable report.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load_or_exit("workers");
    // The report is integrity's stdout: its logs go to stderr.
    if matches!(cli.command, Some(Cmd::Integrity { .. })) {
        telemetry::init_to_stderr(&settings.log, "entrip-workers");
    } else {
        telemetry::init(&settings.log, "entrip-workers");
    }
    let result = match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Run => run(settings).await,
        Cmd::Integrity { once: _, json } => {
            // Exit 1 means "violations found"; 2 means "could not check".
            let report = match integrity_once(&settings).await {
                Ok(report) => report,
                Err(err) => {
                    eprintln!("workers: the integrity check could not run: {err:#}");
                    if json
                        && let Ok(ticket) =
                            serde_json::to_string_pretty(&ErrorTicket::new(format!("{err:#}")))
                    {
                        println!("{ticket}");
                    }
                    std::process::exit(2);
                }
            };
            if json {
                match serde_json::to_string_pretty(&report.ticket()) {
                    Ok(ticket) => println!("{ticket}"),
                    Err(err) => {
                        eprintln!("workers: cannot write the report as JSON: {err}");
                        std::process::exit(2);
                    }
                }
            } else {
                print!("{}", report.render());
            }
            if report.violations() > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
    };
    // Spans of the last moments, when exported.
    telemetry::shutdown();
    result
}

async fn integrity_once(settings: &Settings) -> anyhow::Result<Report> {
    let pool = db::connect_and_migrate(&settings.database).await?;
    let metrics = WorkerMetrics::register(&new_registry())?;
    let checker = Checker::new(pool, settings.integrity.clone(), metrics);
    Ok(checker.check_once().await?)
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let listen = settings.workers.listen;
    let Service {
        shutdown: token,
        pool,
        registry,
        http,
    } = Service::start(&settings.database, listen, "workers.listen")
        .await
        .unwrap_or_else(|e| e.exit("workers"));
    let metrics = WorkerMetrics::register(&registry)?;
    let settlement = Consumer::new(
        Settlement::new(pool.clone()),
        settings.amqp.clone(),
        settings.workers.consumer(),
        metrics.consumer(),
    );
    let notifications = Consumer::new(
        Notifications::new(pool.clone(), &settings.notifications)?,
        settings.amqp.clone(),
        settings.workers.consumer(),
        metrics.consumer(),
    );
    let checker = Checker::new(pool.clone(), settings.integrity.clone(), metrics.clone());
    let side = [
        tokio::spawn(checker.run(token.clone())),
        tokio::spawn(undelivered_gauge_loop(
            pool.clone(),
            metrics.clone(),
            token.clone(),
        )),
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
