//! The `chaos` binary: the command-line edge of the chaos suite. Parses the
//! options, runs the driver, writes the report and exits non-zero when a
//! check failed (1) or the run could not be carried out (2).

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use entrip_chaos::{Options, run};

/// Drives bookings through the real fleet (1 ingest, 2 dispatchers, 1
/// workers), over ingest's HTTP API and, for a share of the requests, over
/// AMQP, while injecting faults, lets it drain, and checks the end state
/// against what the client was told.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The run's own database (it is migrated; use an empty one), as the
    /// driver connects: a superuser, for the database faults.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The same database as the services connect: a role without superuser
    /// rights that owns it (scripts/chaos: the role entrip). Default: the
    /// driver's URL.
    #[arg(long, env = "CHAOS_FLEET_DATABASE_URL")]
    fleet_database_url: Option<String>,
    /// The run's own RabbitMQ vhost (it must exist; guest needs permissions).
    #[arg(long)]
    vhost: String,
    /// The AMQP URL of that vhost; default: guest on 127.0.0.1:5672.
    #[arg(long)]
    amqp_url: Option<String>,
    /// Seconds of load (longer if the fault mix has not come up in full by
    /// then; see --min-fault-rounds).
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Journeys started per second (0.1 to 10000).
    #[arg(long, default_value_t = 30.0, value_parser = parse_rate)]
    rate: f64,
    /// Seed of the random schedule (printed at the start of every run).
    #[arg(long)]
    seed: Option<u64>,
    /// Also stop and start the whole broker application (`rabbitmqctl
    /// stop_app`/`start_app`): disturbs everything else using the broker.
    #[arg(long)]
    broker_restart: bool,
    /// The run is on a 3-node cluster managed by this `scripts/rabbit-cluster`
    /// (its settings in the environment; --amqp-url lists the nodes):
    /// broker commands go to its nodes, and nodes are SIGKILLed and started
    /// again during the load.
    #[arg(long)]
    cluster: Option<std::path::PathBuf>,
    /// The drain fails when nothing moves (outbox, queues, settlements,
    /// webhooks) for this many seconds; there is no overall deadline.
    #[arg(long, default_value_t = 60)]
    drain_stall: u64,
    /// Seconds after which the client gives a request up as lost (while
    /// others are answered; twice that if none are).
    #[arg(long, default_value_t = 60)]
    give_up_after: u64,
    /// Rounds of the fault mix that must be injected before the load ends
    /// (each round holds every kind; at most --seconds more).
    #[arg(long, default_value_t = 1)]
    min_fault_rounds: u32,
    /// Where ingest, dispatcher and workers are; default: next to this
    /// executable or in its parent directory.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory for the service logs; default: a new temporary directory.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Pool size per service (database.max_connections).
    #[arg(long, default_value_t = 32)]
    max_connections: u32,
    /// Messages each worker consumer handles at once.
    #[arg(long, default_value_t = 12)]
    worker_concurrency: u32,
    /// Share of the requests sent over AMQP (to `entrip.ingest`, as the
    /// vhost's broker user) instead of HTTP, 0 to 1; 0: HTTP only.
    #[arg(long, default_value_t = entrip_chaos::DEFAULT_AMQP_SHARE, value_parser = parse_share)]
    amqp_share: f64,
    /// Milliseconds an AMQP request waits for its reply before the client
    /// sends the same message again.
    #[arg(long, default_value_t = entrip_chaos::DEFAULT_AMQP_PATIENCE.as_millis() as u64)]
    amqp_patience_ms: u64,
    /// Write the report to REPORT.md and REPORT.json.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// A share between 0 and 1.
fn parse_share(text: &str) -> Result<f64, String> {
    let share: f64 = text
        .parse()
        .map_err(|e| format!("not a number between 0 and 1: {e}"))?;
    if share.is_finite() && (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err("must be between 0 and 1".into())
    }
}

/// A journey rate within `entrip_chaos::RATE_RANGE` (not `inf`, not `NaN`).
fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .parse()
        .map_err(|e| format!("not a number of journeys per second: {e}"))?;
    let range = entrip_chaos::RATE_RANGE;
    if rate.is_finite() && range.contains(&rate) {
        Ok(rate)
    } else {
        Err(format!(
            "must be between {} and {} journeys per second",
            range.start(),
            range.end()
        ))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    entrip_chaos::cli_main("chaos", main_inner()).await
}

async fn main_inner() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    let amqp_url = cli
        .amqp_url
        .clone()
        .unwrap_or_else(|| format!("amqp://guest:guest@127.0.0.1:5672/{}", cli.vhost));
    let mut opts = Options::new(cli.database_url.clone(), cli.vhost.clone(), amqp_url);
    opts.fleet_database_url = cli.fleet_database_url;
    opts.bin_dir = cli.bin_dir;
    opts.duration = Duration::from_secs(cli.seconds);
    opts.rate = cli.rate;
    opts.seed = cli.seed;
    opts.broker_restart = cli.broker_restart;
    if cli.cluster.is_some() && cli.broker_restart {
        anyhow::bail!(
            "--cluster and --broker-restart do not go together: the broker restart stops the broker on 5672"
        );
    }
    if let Some(script) = &cli.cluster {
        entrip_chaos::faults::set_cluster(script.clone());
    }
    opts.cluster = cli.cluster;
    opts.drain_stall = Duration::from_secs(cli.drain_stall);
    opts.give_up_after = Duration::from_secs(cli.give_up_after);
    opts.min_fault_rounds = cli.min_fault_rounds;
    opts.log_dir = cli.log_dir;
    opts.max_connections = cli.max_connections;
    opts.worker_concurrency = cli.worker_concurrency;
    opts.amqp_share = cli.amqp_share;
    opts.amqp_patience = Duration::from_millis(cli.amqp_patience_ms.max(1));
    let report = tokio::select! {
        r = run(opts) => r.context("chaos run")?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the fleet's processes were stopped"),
    };
    println!("{}", report.markdown());
    if let Some(prefix) = &cli.report {
        report
            .write(prefix)
            .with_context(|| format!("writing the report to {}", prefix.display()))?;
        eprintln!(
            "chaos: report written to {0}.md and {0}.json",
            prefix.display()
        );
    }
    if !report.passed {
        eprintln!("chaos: FAILED; service logs in {}", report.log_dir);
        if let Some(tails) = &report.log_tails {
            eprintln!("{tails}");
        }
    }
    Ok(report.passed)
}
