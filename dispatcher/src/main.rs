//! The `dispatcher` binary: runs the outbox relay, or an operator command.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use entrip_common::{amqp, config::Settings, db, service::Service, telemetry};
use entrip_dispatcher::{
    dlq,
    metrics::RelayMetrics,
    outbox::{self, Redrive},
    redeliver::{self, RedeliverError},
    relay::{self, Relay},
    trace::{self, Target},
};
use uuid::Uuid;

/// Entrip dispatcher: publishes every outbox event to RabbitMQ, confirmed,
/// in order per aggregate. Without a subcommand it runs the relay.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay (the default).
    Run,
    /// Inspect and repair the outbox.
    #[command(subcommand)]
    Outbox(OutboxCmd),
    /// Inspect and replay dead letter queues.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Everything known of one booking or idempotency key: the key's
    /// answer, the booking, its audit trail, its events' publish state and
    /// their webhook deliveries per subscriber. Exit 1 when not found.
    Trace(TraceArgs),
    /// Webhook notifications of one booking.
    #[command(subcommand)]
    Notifications(NotificationsCmd),
}

#[derive(Subcommand)]
enum NotificationsCmd {
    /// Send a booking's notifications again to one subscriber: its pairs
    /// reopen and each published event goes to entrip.notifications once
    /// more; the workers send, sign and record the webhooks.
    Redeliver {
        /// A booking id or code.
        booking: String,
        /// The subscriber's URL, as configured in notifications.webhooks.
        #[arg(long)]
        subscriber: String,
        /// Only the events of this topic pattern (e.g. settlement.recorded,
        /// booking.*).
        #[arg(long)]
        topic: Option<String>,
    },
}

#[derive(Args)]
struct TraceArgs {
    /// A booking id or code.
    #[arg(required_unless_present = "key", conflicts_with = "key")]
    booking: Option<String>,
    /// Trace this idempotency key (and the booking its answer names).
    #[arg(long)]
    key: Option<String>,
    /// The key's client: one indexed lookup (without it, every client's
    /// key of that name).
    #[arg(long, requires = "key")]
    client: Option<String>,
    /// JSON instead of the readable text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum OutboxCmd {
    /// Undelivered and dead rows, oldest age, by topic.
    Stats,
    /// Bring dead rows back to due (attempts reset).
    Redrive(RedriveArgs),
    /// After a restore: publish again the rows published in the last
    /// SECS before the newest publish mark, so that an effect the restore
    /// lost comes back (consumers dedupe the rest). RUNBOOK.md, "A restore".
    Republish {
        /// The window, in seconds before the newest mark: at least the
        /// longest a message waits in a queue (the retry delays; 900 covers
        /// the default 600 s).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=604_800))]
        window_secs: u64,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct RedriveArgs {
    /// Every dead row.
    #[arg(long)]
    all: bool,
    /// These rows (event ids); repeat the flag for several.
    #[arg(long = "id")]
    ids: Vec<Uuid>,
    /// The dead rows of one topic, e.g. booking.created.
    #[arg(long)]
    topic: Option<String>,
}

#[derive(Subcommand)]
enum DlqCmd {
    /// Show messages of a dead letter queue without removing them.
    List {
        /// e.g. entrip.settlement.dlq
        queue: String,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Publish messages of a dead letter queue back to entrip.events with
    /// their original routing key; each leaves the DLQ once confirmed.
    Replay {
        queue: String,
        /// At most this many (default: all).
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load_or_exit("dispatcher");
    // An operator command's stdout is its answer: its logs go to stderr.
    if matches!(cli.command, None | Some(Cmd::Run)) {
        telemetry::init(&settings.log, "entrip-dispatcher");
    } else {
        telemetry::init_to_stderr(&settings.log, "entrip-dispatcher");
    }
    let result = match cli.command.unwrap_or(Cmd::Run) {
        Cmd::Run => run(settings).await,
        Cmd::Notifications(NotificationsCmd::Redeliver {
            booking,
            subscriber,
            topic,
        }) => {
            // Exit 1: the input is wrong (no such booking, subscriber or
            // topic); exit 2: a service failed (nothing was reopened).
            match redeliver_cmd(&settings, &booking, &subscriber, topic.as_deref()).await {
                Ok(()) => {}
                Err(err) if err.is_input() => {
                    eprintln!("dispatcher: {err}");
                    std::process::exit(1);
                }
                Err(err) => {
                    eprintln!("dispatcher: {err}");
                    std::process::exit(2);
                }
            }
            Ok(())
        }
        Cmd::Trace(args) => {
            let target = match (args.booking, args.key) {
                (_, Some(key)) => Target::Key {
                    key,
                    client: args.client,
                },
                (Some(booking), None) => Target::Booking(booking),
                (None, None) => anyhow::bail!("name a booking (id or code) or --key"),
            };
            // Exit 1: nothing to trace; exit 2: the database failed.
            let found = match db::connect_and_migrate(&settings.database).await {
                Ok(pool) => trace::trace(&pool, &target, &settings.notifications.webhooks).await,
                Err(err) => {
                    eprintln!("dispatcher: cannot reach the database: {err:#}");
                    std::process::exit(2);
                }
            };
            match found {
                Ok(found) if args.json => println!("{}", serde_json::to_string_pretty(&found)?),
                Ok(found) => print!("{}", found.render()),
                Err(err) => {
                    eprintln!("dispatcher: {err}");
                    std::process::exit(if err.is_input() { 1 } else { 2 });
                }
            }
            Ok(())
        }
        Cmd::Outbox(OutboxCmd::Stats) => {
            let pool = db::connect_and_migrate(&settings.database).await?;
            let stats = outbox::stats(&pool).await?;
            println!("undelivered: {}", stats.undelivered);
            println!(
                "oldest undelivered age: {:.1} s",
                stats.oldest_undelivered_age_secs
            );
            println!("dead: {}", stats.dead);
            if !stats.by_topic.is_empty() {
                println!("{:<24} {:>12} {:>8}", "topic", "undelivered", "dead");
                for (topic, undelivered, dead) in &stats.by_topic {
                    println!("{topic:<24} {undelivered:>12} {dead:>8}");
                }
            }
            Ok(())
        }
        Cmd::Outbox(OutboxCmd::Republish { window_secs }) => {
            let pool = db::connect_and_migrate(&settings.database).await?;
            let n = outbox::republish_recent(&pool, std::time::Duration::from_secs(window_secs))
                .await?;
            println!(
                "{n} rows published in the last {window_secs} s before the newest mark are due again"
            );
            Ok(())
        }
        Cmd::Outbox(OutboxCmd::Redrive(args)) => {
            let pool = db::connect_and_migrate(&settings.database).await?;
            let which = if args.all {
                Redrive::All
            } else if let Some(topic) = args.topic {
                Redrive::Topic(topic)
            } else {
                Redrive::Ids(args.ids)
            };
            let n = outbox::redrive(&pool, &which).await?;
            println!("{n} dead rows are due again");
            Ok(())
        }
        Cmd::Dlq(cmd) => {
            let conn = amqp::connect_any(&settings.amqp, "entrip-dispatcher-cli")
                .await
                .with_context(|| {
                    format!(
                        "cannot connect to RabbitMQ (key `{}`)",
                        settings.amqp.nodes_key()
                    )
                })?;
            let channel = conn.create_channel().await?;
            match cmd {
                DlqCmd::List { queue, limit } => {
                    let messages = dlq::list(&channel, &queue, limit).await?;
                    println!("{} message(s) shown from {queue}", messages.len());
                    for m in messages {
                        println!(
                            "- id={} routing_key={} deaths={} reason={}\n  {}",
                            m.message_id.as_deref().unwrap_or("-"),
                            m.routing_key.as_deref().unwrap_or("-"),
                            m.deaths,
                            m.reason.as_deref().unwrap_or("-"),
                            m.body
                        );
                    }
                }
                DlqCmd::Replay { queue, limit } => {
                    let own = settings.amqp.user();
                    let n = dlq::replay(&channel, &queue, limit, &own).await?;
                    println!(
                        "{n} message(s) replayed from {queue} to {}",
                        amqp::replay_exchange(&queue)
                    );
                }
            }
            let _ = conn.close(200, "done".into()).await;
            Ok(())
        }
    };
    // Spans of the last moments, when exported.
    telemetry::shutdown();
    result
}

/// `notifications redeliver`: checks and plans from the database first,
/// then connects to the broker and sends.
async fn redeliver_cmd(
    settings: &Settings,
    booking: &str,
    subscriber: &str,
    topic: Option<&str>,
) -> Result<(), RedeliverError> {
    let pool = db::connect_and_migrate(&settings.database).await?;
    let plan = redeliver::plan(
        &pool,
        booking,
        subscriber,
        topic,
        &settings.notifications.webhooks,
    )
    .await?;
    let sent = if plan.events().next().is_some() {
        let conn = amqp::connect_any(&settings.amqp, "entrip-dispatcher-cli").await?;
        let channel = conn.create_channel().await?;
        amqp::declare_topology(&channel, &settings.amqp).await?;
        let sent = redeliver::send(&pool, &channel, &plan).await;
        let _ = conn.close(200, "done".into()).await;
        sent?
    } else {
        0
    };
    println!("{sent} event(s) sent again to {subscriber}");
    for (id, topic) in plan.events() {
        println!("- {id} {topic}");
    }
    for (id, why) in &plan.skipped {
        println!("- {id} not sent: {why}");
    }
    Ok(())
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let listen = settings.dispatcher.listen;
    let Service {
        shutdown: token,
        pool,
        registry,
        http,
    } = Service::start(&settings.database, listen, "dispatcher.listen")
        .await
        .unwrap_or_else(|e| e.exit("dispatcher"));
    let metrics = RelayMetrics::register(&registry)?;
    let housekeeping = tokio::spawn(relay::housekeeping(
        pool.clone(),
        settings.dispatcher.clone(),
        metrics.clone(),
        token.clone(),
    ));
    let relay = Relay {
        pool: pool.clone(),
        amqp: settings.amqp.clone(),
        settings: settings.dispatcher.clone(),
        metrics,
        name: format!("entrip-dispatcher-{}", std::process::id()),
    };
    tracing::info!(%listen, "dispatcher running");
    relay.run(token.clone()).await;
    housekeeping.abort();
    let _ = http.await;
    pool.close().await;
    tracing::info!("dispatcher stopped");
    Ok(())
}
