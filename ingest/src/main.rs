//! The `ingest` binary: runs the HTTP API, or an operator subcommand.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use entrip_common::{config::Settings, db, metrics::new_registry, service, shutdown, telemetry};
use entrip_ingest::{App, idempotency, purge_loop, serve};

/// Entrip ingest: validates upstream requests and stores each accepted
/// change atomically, exactly once.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the HTTP API (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Delete expired idempotency keys now and exit.
    PurgeKeys,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load_or_exit("ingest");
    telemetry::init(&settings.log);
    let pool = db::connect_and_migrate(&settings.database)
        .await
        .context("database start-up")?;
    match cli.command.unwrap_or(Cmd::Serve) {
        Cmd::Migrate => {
            tracing::info!("migrations applied");
            Ok(())
        }
        Cmd::PurgeKeys => {
            let n = idempotency::purge_expired(&pool, 1000).await?;
            println!("purged {n} expired idempotency keys");
            Ok(())
        }
        Cmd::Serve => {
            let token = shutdown::on_signal();
            let listen = settings.ingest.listen;
            let listener = service::bind(listen, "ingest.listen")
                .await
                .unwrap_or_else(|e| e.exit("ingest"));
            let purge = tokio::spawn(purge_loop(
                pool.clone(),
                Duration::from_secs(settings.ingest.purge_interval_secs),
                token.clone(),
            ));
            let app = App::new(pool.clone(), settings.ingest.clone(), new_registry())?;
            tracing::info!(%listen, "ingest listening");
            serve(listener, app, token).await?;
            purge.abort();
            pool.close().await;
            tracing::info!("ingest stopped");
            Ok(())
        }
    }
}
