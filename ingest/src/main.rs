//! The `ingest` binary: runs the HTTP API, or an operator subcommand.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use entrip_common::{config::Settings, db, metrics::new_registry, service, shutdown, telemetry};
use entrip_ingest::{
    App, amqp,
    clients::{self, ClientName, Scope},
    idempotency, purge_loop, serve,
};

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
    /// Run the HTTP API and the AMQP request consumer (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Delete expired idempotency keys now and exit.
    PurgeKeys,
    /// Manage API clients and their keys (README "API keys").
    #[command(subcommand)]
    Clients(ClientsCmd),
}

#[derive(Subcommand)]
enum ClientsCmd {
    /// Issue the first key of a new client; prints the key (once) on stdout.
    Create {
        /// 1-63 of a-z, 0-9, '.', '_', '-'; never reused, even once revoked.
        name: String,
        /// Comma-separated: users:write, bookings:write, payments:write,
        /// payments:result, approvals:write, approvals:decide, read, *.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// The broker user whose AMQP requests act as this client.
        #[arg(long)]
        amqp_user: Option<String>,
    },
    /// Every key of every client (prefixes only; keys are never shown again).
    List,
    /// Issue a new key for a client; its old keys keep working until revoked.
    Rotate { name: String },
    /// Revoke one key of a client (--key PREFIX), or all of them.
    Revoke {
        name: String,
        /// The prefix of the key to revoke, as `clients list` shows it.
        #[arg(long)]
        key: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load_or_exit("ingest");
    // The clients commands answer on stdout (a key for a script to keep).
    if matches!(cli.command, Some(Cmd::Clients(_))) {
        telemetry::init_to_stderr(&settings.log, "entrip-ingest");
    } else {
        telemetry::init(&settings.log, "entrip-ingest");
    }
    let pool = db::connect_and_migrate(&settings.database)
        .await
        .context("database start-up")?;
    let result = match cli.command.unwrap_or(Cmd::Serve) {
        Cmd::Migrate => {
            tracing::info!("migrations applied");
            Ok(())
        }
        Cmd::Clients(cmd) => manage_clients(&pool, cmd).await,
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
            // Requests through the broker, beside HTTP; on shutdown it
            // finishes the messages in flight.
            let consumer = settings.ingest.amqp.enabled.then(|| {
                tokio::spawn(amqp::consumer(&app, settings.amqp.clone()).run(token.clone()))
            });
            tracing::info!(%listen, amqp = settings.ingest.amqp.enabled, "ingest listening");
            serve(listener, app, token).await?;
            if let Some(consumer) = consumer
                && let Err(err) = consumer.await
            {
                tracing::error!(%err, "the AMQP consumer failed");
            }
            purge.abort();
            pool.close().await;
            tracing::info!("ingest stopped");
            Ok(())
        }
    };
    // Spans of the last moments, when exported.
    telemetry::shutdown();
    result
}

/// `ingest clients …`: a key goes to stdout alone (so a script can capture
/// it), everything else to stderr.
async fn manage_clients(pool: &sqlx::PgPool, cmd: ClientsCmd) -> anyhow::Result<()> {
    match cmd {
        ClientsCmd::Create {
            name,
            scopes,
            amqp_user,
        } => {
            let name = ClientName::parse(&name)?;
            let scopes = scopes
                .iter()
                .map(|s| s.parse::<Scope>())
                .collect::<Result<Vec<_>, _>>()?;
            let key = clients::create(pool, &name, &scopes, amqp_user.as_deref()).await?;
            eprintln!(
                "client {name} created (key prefix {}); the key below is shown only now:",
                key.prefix()
            );
            println!("{}", key.reveal());
        }
        ClientsCmd::List => {
            println!(
                "{:<24} {:<14} {:<8} {:<25} {:<20} scopes",
                "name", "prefix", "state", "created", "amqp user"
            );
            for k in clients::list(pool).await? {
                let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
                let state = if k.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<24} {:<14} {:<8} {:<25} {:<20} {}",
                    k.name,
                    k.prefix,
                    state,
                    k.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    k.amqp_user.as_deref().unwrap_or("-"),
                    scopes.join(",")
                );
            }
        }
        ClientsCmd::Rotate { name } => {
            let name = ClientName::parse(&name)?;
            let (key, old) = clients::rotate(pool, &name).await?;
            eprintln!(
                "new key for {name} (prefix {}); the old key(s) {} keep working until `ingest clients revoke {name} --key PREFIX`; the key below is shown only now:",
                key.prefix(),
                old.join(", ")
            );
            println!("{}", key.reveal());
        }
        ClientsCmd::Revoke { name, key } => {
            let name = ClientName::parse(&name)?;
            let n = clients::revoke(pool, &name, key.as_deref()).await?;
            eprintln!(
                "{n} key(s) of {name} revoked; ingest stops accepting them within ingest.auth_cache_secs"
            );
        }
    }
    Ok(())
}
