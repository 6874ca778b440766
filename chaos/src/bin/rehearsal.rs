//! The `rehearsal` binary: the command-line edge of the restore rehearsal's
//! driver (`entrip_chaos::rehearsal`), which `scripts/restore-rehearsal`
//! runs with the hooks that back up, lose and restore its cluster. Exits 0
//! when every check passed, 1 when one failed, 2 when the rehearsal could
//! not be carried out.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use entrip_chaos::rehearsal::{RehearsalOptions, run};

/// Runs the fleet on a cluster of its own with booking traffic, has it
/// backed up, lost and restored (the hooks), and checks the restored state:
/// the acknowledged bookings, the outbox, idempotency, integrity; measures
/// the RPO and the RTO.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The rehearsal's database as the driver reads it.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The same database as the services connect (the role entrip).
    #[arg(long, env = "REHEARSAL_FLEET_DATABASE_URL")]
    fleet_database_url: String,
    /// The AMQP URL of the rehearsal's own vhost.
    #[arg(long)]
    amqp_url: String,
    /// Where ingest, dispatcher and workers are; default: next to this
    /// executable.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory for the service logs.
    #[arg(long)]
    log_dir: PathBuf,
    /// Bookings sent per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds of traffic before the backup.
    #[arg(long, default_value_t = 10)]
    before_backup: u64,
    /// Seconds of traffic after the backup, until the loss.
    #[arg(long, default_value_t = 90)]
    after_backup: u64,
    /// Seconds before the loss the dispatchers are stopped (from before the
    /// backup when at least --after-backup), so that the outbox has a
    /// backlog to publish after the restore.
    #[arg(long, default_value_t = 40)]
    relay_pause: u64,
    /// Shell command that takes the full backup.
    #[arg(long)]
    backup_hook: String,
    /// Shell command that loses the cluster (stop it, remove its data).
    #[arg(long)]
    lose_hook: String,
    /// Shell command that restores the cluster and starts it.
    #[arg(long)]
    restore_hook: String,
    /// Shell command run once the restored fleet accepted a booking, with
    /// INGEST set to its URL and the binaries first on PATH.
    #[arg(long)]
    verify_hook: Option<String>,
    /// Shell command that restores the cluster to the time in RESTORE_TO
    /// (the point-in-time check at the end).
    #[arg(long)]
    pitr_hook: Option<String>,
    /// RPO target in seconds.
    #[arg(long, default_value_t = 60)]
    rpo_target: u64,
    /// RTO target in seconds.
    #[arg(long, default_value_t = 300)]
    rto_target: u64,
    /// Seconds the restored fleet may take to publish the outbox.
    #[arg(long, default_value_t = 120)]
    publish_patience: u64,
    /// Write the report to REPORT.md and REPORT.json.
    #[arg(long)]
    report: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    entrip_chaos::cli_main("rehearsal", main_inner()).await
}

async fn main_inner() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    let opts = RehearsalOptions {
        database_url: cli.database_url,
        fleet_database_url: cli.fleet_database_url,
        amqp_url: cli.amqp_url,
        bin_dir: cli.bin_dir,
        log_dir: cli.log_dir,
        rate: cli.rate,
        before_backup: Duration::from_secs(cli.before_backup),
        after_backup: Duration::from_secs(cli.after_backup),
        relay_pause: Duration::from_secs(cli.relay_pause),
        backup_hook: cli.backup_hook,
        lose_hook: cli.lose_hook,
        restore_hook: cli.restore_hook,
        verify_hook: cli.verify_hook,
        pitr_hook: cli.pitr_hook,
        rpo_target: Duration::from_secs(cli.rpo_target),
        rto_target: Duration::from_secs(cli.rto_target),
        publish_patience: Duration::from_secs(cli.publish_patience),
    };
    let report = tokio::select! {
        r = run(opts) => r.context("restore rehearsal")?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the fleet's processes were stopped"),
    };
    println!("{}", report.markdown());
    report
        .write(&cli.report)
        .with_context(|| format!("writing the report to {}", cli.report.display()))?;
    eprintln!(
        "rehearsal: report written to {0}.md and {0}.json",
        cli.report.display()
    );
    Ok(report.passed)
}
