//! The integrity checker: SQL checks that prove the data consistent, run
//! periodically and on demand (`workers integrity --once`). Each check
//! counts the rows that break a rule and names a few of them by id; a
//! report with violations becomes a ticket for the alert webhook.

use std::{fmt, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use entrip_common::config::IntegritySettings;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::WorkerMetrics;

/// How long the alert webhook may take to answer: a receiver that hangs
/// must not stop the periodic checks, nor keep `workers integrity --once`
/// from exiting.
const ALERT_TIMEOUT: Duration = Duration::from_secs(10);

/// The integrity checker: runs the checks, sets the gauges, and posts the
/// report as a ticket ([`Report::ticket`]) to the alert webhook when a run
/// finds violations.
pub struct Checker {
    pool: PgPool,
    settings: IntegritySettings,
    metrics: WorkerMetrics,
    client: reqwest::Client,
    alert_timeout: Duration,
}

impl Checker {
    pub fn new(pool: PgPool, settings: IntegritySettings, metrics: WorkerMetrics) -> Self {
        Self {
            pool,
            settings,
            metrics,
            client: reqwest::Client::new(),
            alert_timeout: ALERT_TIMEOUT,
        }
    }

    /// Gives up on the alert webhook after `timeout` (10 s by default).
    pub fn with_alert_timeout(mut self, timeout: Duration) -> Self {
        self.alert_timeout = timeout;
        self
    }

    /// One run: the checks, the gauges, the alert. An alert that cannot be
    /// posted is logged; the report is returned all the same.
    pub async fn check_once(&self) -> sqlx::Result<Report> {
        let report = run_checks(
            &self.pool,
            Duration::from_secs(self.settings.settle_grace_secs),
            Duration::from_secs(self.settings.outbox_max_age_secs),
        )
        .await?;
        set_gauges(&report, &self.metrics);
        if report.violations() > 0
            && let Some(url) = &self.settings.alert_webhook
            && let Err(err) = self
                .client
                .post(url)
                .timeout(self.alert_timeout)
                .json(&report.ticket())
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
        {
            tracing::warn!(%err, "cannot post the integrity alert");
        }
        Ok(report)
    }

    /// Runs [`Self::check_once`] every `integrity.interval_secs` until
    /// `shutdown`, logging each result.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.settings.interval_secs));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.check_once().await {
                Ok(report) if report.violations() > 0 => {
                    tracing::error!(
                        violations = report.violations(),
                        "integrity check failed:\n{}",
                        report.render()
                    );
                }
                Ok(_) => tracing::info!("integrity check passed"),
                Err(err) => tracing::warn!(%err, "integrity check could not run"),
            }
        }
    }
}

/// One rule and the SQL that finds the rows breaking it: three text columns
/// per offending row, its entity (`booking`, `payment`, `settlement`,
/// `outbox`), its id, and an optional detail. Queries may read
/// `params.grace_secs` and `params.outbox_secs`.
struct Check {
    name: &'static str,
    rule: &'static str,
    sql: &'static str,
}

const CHECKS: &[Check] = &[
    Check {
        name: "confirmed_without_settlement",
        rule: "a CONFIRMED booking has an APPROVED payment and a settlement",
        sql: "SELECT 'booking', b.id::text, NULL FROM bookings b
               WHERE b.status = 'CONFIRMED'
                 AND (NOT EXISTS (SELECT 1 FROM settlements s WHERE s.booking_id = b.id)
                      OR NOT EXISTS (SELECT 1 FROM payments p WHERE p.booking_id = b.id AND p.status = 'APPROVED'))",
    },
    Check {
        name: "settled_not_confirmed",
        rule: "a settled booking is CONFIRMED",
        sql: "SELECT 'settlement', s.id::text, 'of booking ' || b.id FROM settlements s
                JOIN bookings b ON b.id = s.booking_id WHERE b.status <> 'CONFIRMED'",
    },
    Check {
        name: "approved_payment_not_settled",
        rule: "an APPROVED payment whose booking needs nothing else is settled within the grace period",
        sql: "SELECT 'payment', p.id::text, 'of booking ' || b.id FROM payments p JOIN bookings b ON b.id = p.booking_id
               WHERE p.status = 'APPROVED' AND b.status = 'PENDING'
                 AND p.decided_at < now() - make_interval(secs => (SELECT grace_secs FROM params))
                 AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.booking_id = b.id)
                 AND (NOT b.requires_approval OR EXISTS (
                      SELECT 1 FROM approvals a WHERE a.booking_id = b.id AND a.status = 'APPROVED'
                         AND a.decided_at < now() - make_interval(secs => (SELECT grace_secs FROM params))))",
    },
    Check {
        name: "non_positive_amounts",
        rule: "every amount is greater than 0",
        sql: "SELECT 'booking', id::text, NULL FROM bookings WHERE amount <= 0
              UNION ALL SELECT 'payment', id::text, NULL FROM payments WHERE amount <= 0
              UNION ALL SELECT 'settlement', id::text, NULL FROM settlements WHERE gross <= 0",
    },
    Check {
        name: "settlement_totals",
        rule: "a settlement's gross, tax and currency are its payment's, and net = gross - tax",
        sql: "SELECT 'settlement', s.id::text, NULL FROM settlements s JOIN payments p ON p.id = s.payment_id
               WHERE s.gross <> p.amount OR s.tax <> p.tax OR s.currency <> p.currency
                  OR s.net <> s.gross - s.tax OR p.status <> 'APPROVED'",
    },
    Check {
        name: "orphans",
        rule: "a settlement's payment belongs to its booking, and every entity has its audit record",
        sql: "SELECT 'settlement', s.id::text, 'pays for another booking' FROM settlements s
                JOIN payments p ON p.id = s.payment_id WHERE p.booking_id <> s.booking_id
              UNION ALL
              SELECT 'booking', b.id::text, 'without audit record' FROM bookings b
               WHERE NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.entity_type = 'booking' AND a.entity_id = b.id)
              UNION ALL
              SELECT 'payment', p.id::text, 'without audit record' FROM payments p
               WHERE NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.entity_type = 'payment' AND a.entity_id = p.id)",
    },
    Check {
        name: "outbox_undelivered",
        rule: "every outbox row is published within the threshold, and none is dead",
        sql: "SELECT 'outbox', id::text, topic || CASE WHEN dead_at IS NOT NULL THEN ' (dead)' ELSE ' (undelivered)' END
                FROM outbox
               WHERE published_at IS NULL
                 AND (dead_at IS NOT NULL OR created_at < now() - make_interval(secs => (SELECT outbox_secs FROM params)))",
    },
];

/// How many offending rows a finding shows.
const SHOWN: i64 = 10;

/// The `kind` of every ticket: lets a receiver route it.
const TICKET_KIND: &str = "entrip.integrity.report";

/// Where the runbook section for an integrity alert is, named in tickets.
pub const RUNBOOK: &str = "docs/operations.md#an-integrity-alert";

/// One offending row: what a ticket needs to find it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Offender {
    /// `booking`, `payment`, `settlement` or `outbox`.
    pub entity: String,
    /// Its primary key (a UUID).
    pub id: String,
    /// What is wrong with it, where the check alone does not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl fmt::Display for Offender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.entity, self.id)?;
        if let Some(detail) = &self.detail {
            write!(f, " {detail}")?;
        }
        Ok(())
    }
}

/// The result of one check.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub(crate) rule: &'static str,
    pub violations: i64,
    /// Up to 10 offending rows, by entity and id.
    pub rows: Vec<Offender>,
    /// The same rows as readable lines (`booking <id>`).
    pub examples: Vec<String>,
}

/// The report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The database checked (`current_database()`).
    pub database: String,
    /// When the checks ran (the database's clock).
    pub checked_at: DateTime<Utc>,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn violations(&self) -> i64 {
        self.findings.iter().map(|f| f.violations).sum()
    }

    fn failed(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.violations > 0)
    }

    /// A readable report, one line per check plus examples.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let mark = if f.violations == 0 { "ok  " } else { "FAIL" };
            out.push_str(&format!(
                "{mark} {:<30} {:>6}  {}\n",
                f.check, f.violations, f.rule
            ));
            for e in &f.examples {
                out.push_str(&format!("       - {e}\n"));
            }
        }
        out.push_str(&format!("{} violation(s)\n", self.violations()));
        out
    }

    /// The report as a ticket: what `workers integrity --once --json`
    /// prints and the alert webhook receives (docs/operations.md).
    pub fn ticket(&self) -> Ticket<'_> {
        let violations = self.violations();
        let failed: Vec<&'static str> = self.failed().map(|f| f.check).collect();
        let title = if violations == 0 {
            format!("Entrip integrity: no violation in {}", self.database)
        } else {
            format!(
                "Entrip integrity: {violations} violation(s) in {}: {}",
                self.database,
                failed.join(", ")
            )
        };
        let mut text = format!("{title}\n");
        for f in self.failed() {
            text.push_str(&format!("- {} ({}): {}\n", f.check, f.violations, f.rule));
            for e in &f.examples {
                text.push_str(&format!("  - {e}\n"));
            }
            let hidden = f.violations - i64::try_from(f.examples.len()).unwrap_or(i64::MAX);
            if hidden > 0 {
                text.push_str(&format!("  - and {hidden} more\n"));
            }
        }
        if violations > 0 {
            text.push_str(&format!(
                "Checked at {}. Runbook: {RUNBOOK}\n",
                self.checked_at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ));
        }
        Ticket {
            kind: TICKET_KIND,
            status: if violations == 0 { "ok" } else { "violated" },
            severity: if violations == 0 { "info" } else { "critical" },
            title,
            text,
            fingerprint: self.fingerprint(),
            database: &self.database,
            checked_at: self.checked_at,
            violations,
            failed_checks: failed,
            runbook: RUNBOOK,
            findings: &self.findings,
        }
    }

    /// The same database, failing checks and shown rows give the same
    /// fingerprint: a ticket system can update one ticket each hour
    /// instead of opening another.
    fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(self.database.as_bytes());
        for f in self.failed() {
            hash.update(format!("\n{}", f.check));
            for row in &f.rows {
                hash.update(format!("\n {} {}", row.entity, row.id));
            }
        }
        hex::encode(hash.finalize())
    }
}

/// The ticket of a run whose checks could not run (`workers integrity
/// --once --json`, exit 2): the same kind of ticket, with the reason.
#[derive(Debug, Serialize)]
pub struct ErrorTicket {
    pub kind: &'static str,
    /// Always `error`.
    pub status: &'static str,
    pub severity: &'static str,
    pub title: &'static str,
    pub text: String,
    /// Why the checks could not run.
    pub error: String,
    pub checked_at: DateTime<Utc>,
    pub runbook: &'static str,
}

impl ErrorTicket {
    pub fn new(error: String) -> Self {
        let title = "Entrip integrity: the checks could not run";
        Self {
            kind: TICKET_KIND,
            status: "error",
            severity: "critical",
            title,
            text: format!("{title}: {error}\nRunbook: {RUNBOOK}\n"),
            error,
            checked_at: Utc::now(),
            runbook: RUNBOOK,
        }
    }
}

/// A report in the shape of a ticket (and of a chat message: `text`).
#[derive(Debug, Serialize)]
pub struct Ticket<'a> {
    /// Always `entrip.integrity.report`: lets a receiver route it.
    pub kind: &'static str,
    /// `ok` or `violated`.
    pub status: &'static str,
    /// `info` when all is well, `critical` on any violation.
    pub severity: &'static str,
    /// One line naming the database and the failing checks.
    pub title: String,
    /// The title, each failing check with its rows, and the runbook: what a
    /// chat incoming webhook shows.
    pub text: String,
    /// SHA-256 (hex) of the database, the failing checks and their rows.
    pub fingerprint: String,
    pub database: &'a str,
    pub checked_at: DateTime<Utc>,
    pub violations: i64,
    pub failed_checks: Vec<&'static str>,
    /// The runbook section, a path in this repository.
    pub runbook: &'static str,
    /// Every check, passing ones too.
    pub findings: &'a [Finding],
}

/// Runs every check (no gauges, no alert: see [`Checker::check_once`]).
pub async fn run_checks(
    pool: &PgPool,
    settle_grace: Duration,
    outbox_max_age: Duration,
) -> sqlx::Result<Report> {
    let (database, checked_at): (String, DateTime<Utc>) =
        sqlx::query_as("SELECT current_database(), now()")
            .fetch_one(pool)
            .await?;
    let mut findings = Vec::new();
    for check in CHECKS {
        // Ordered, so that the rows shown (and the fingerprint) are the same
        // from one run to the next while the violations are.
        let counted = format!(
            "WITH params AS (SELECT $1::float8 AS grace_secs, $2::float8 AS outbox_secs)
             SELECT count(*) OVER (), entity, id, detail
               FROM ({}) AS found(entity, id, detail)
              ORDER BY entity, id LIMIT {SHOWN}",
            check.sql
        );
        let rows: Vec<(i64, String, String, Option<String>)> =
            sqlx::query_as(sqlx::AssertSqlSafe(counted))
                .bind(settle_grace.as_secs_f64())
                .bind(outbox_max_age.as_secs_f64())
                .fetch_all(pool)
                .await?;
        let violations = rows.first().map_or(0, |(n, ..)| *n);
        let rows: Vec<Offender> = rows
            .into_iter()
            .map(|(_, entity, id, detail)| Offender { entity, id, detail })
            .collect();
        findings.push(Finding {
            check: check.name,
            rule: check.rule,
            violations,
            examples: rows.iter().map(Offender::to_string).collect(),
            rows,
        });
    }
    Ok(Report {
        database,
        checked_at,
        findings,
    })
}

/// Sets `entrip_integrity_violations{check}` from a report.
fn set_gauges(report: &Report, metrics: &WorkerMetrics) {
    for f in &report.findings {
        metrics
            .violations
            .with_label_values(&[f.check])
            .set(f.violations);
    }
}
