//! The run's report: seed, duration, faults, totals, the lost / unexpected /
//! duplicated counts of each history, and each named check with its
//! figures; rendered as Markdown for people and JSON for tools.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{Error, checks::Tally, faults::Fault, load::Response};

/// One named check with what it found.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub started_at: String,
    /// Seconds new journeys were started.
    pub journeys_seconds: f64,
    /// Seconds of load: that, and until the started journeys ended.
    pub load_seconds: f64,
    /// Seconds from the end of the load until the fleet was drained.
    pub drain_seconds: f64,
    pub total_seconds: f64,
    /// Journeys started per second.
    pub rate: f64,
    pub broker_restart: bool,
    /// On a 3-node RabbitMQ cluster, with node kills.
    pub cluster: bool,
    /// Injected faults by kind (JSON keys: the kinds' snake_case names),
    /// every kind the run injects, zeros included.
    pub faults: BTreeMap<Fault, u64>,
    /// Rounds of the fault mix injected to the end.
    pub fault_rounds: u32,
    /// PostgreSQL backends that `pg_terminate_backend` and the outages ended.
    pub backends_terminated: u64,
    pub fault_errors: Vec<String>,
    /// Figures for people; no code looks them up.
    pub totals: BTreeMap<String, u64>,
    /// Lost, unexpected and duplicated, per history (Jepsen-style).
    pub tallies: Vec<Tally>,
    /// The client's HTTP attempts by how they ended (JSON keys `"201"`,
    /// `"timeout"`, …).
    pub responses_by_status: BTreeMap<Response, u64>,
    /// Share of the requests sent over AMQP.
    pub amqp_share: f64,
    /// How long an AMQP request waited for a reply before it was sent again.
    pub amqp_patience_seconds: f64,
    /// The AMQP replies the client read, by `x-entrip-status` (every copy).
    pub amqp_replies_by_status: BTreeMap<Response, u64>,
    pub client_problems: Vec<String>,
    pub service_exits: Vec<String>,
    pub checks: Vec<Check>,
    pub passed: bool,
    pub log_dir: String,
    /// The tail of each service's log, kept when a check failed (not in the
    /// JSON: the files are in `log_dir`).
    #[serde(skip)]
    pub log_tails: Option<String>,
}

impl Report {
    pub fn failed_checks(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.passed).collect()
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let _ = writeln!(s, "# Entrip chaos run: {verdict}\n");
        let _ = writeln!(
            s,
            "- seed `{}` (replay the schedule with `--seed {}`)",
            self.seed, self.seed
        );
        let _ = writeln!(s, "- started {}", self.started_at);
        let _ = writeln!(
            s,
            "- journeys started for {:.1} s at {} journeys/s, load over after {:.1} s; drain {:.1} s; total {:.1} s",
            self.journeys_seconds,
            self.rate,
            self.load_seconds,
            self.drain_seconds,
            self.total_seconds
        );
        let _ = writeln!(
            s,
            "- broker-wide stop_app/start_app: {}",
            if self.broker_restart { "yes" } else { "no" }
        );
        let _ = writeln!(
            s,
            "- broker: {}",
            if self.cluster {
                "a 3-node cluster (scripts/rabbit-cluster), nodes killed and started again"
            } else {
                "one node"
            }
        );
        let _ = writeln!(
            s,
            "- requests over AMQP: {:.0} % (a reply awaited {:.1} s before the same message is sent again)",
            self.amqp_share * 100.0,
            self.amqp_patience_seconds
        );
        let _ = writeln!(s, "- service logs: `{}`\n", self.log_dir);

        let _ = writeln!(
            s,
            "## Faults injected ({} full rounds of the mix)\n\n| fault | count |\n|---|---:|",
            self.fault_rounds
        );
        for (fault, n) in &self.faults {
            let _ = writeln!(s, "| {} | {n} |", fault.label());
        }
        let _ = writeln!(
            s,
            "| PostgreSQL backends terminated (total) | {} |",
            self.backends_terminated
        );
        if !self.fault_errors.is_empty() {
            let _ = writeln!(s, "\nFault injection errors:\n");
            for e in &self.fault_errors {
                let _ = writeln!(s, "- {e}");
            }
        }
        let _ = writeln!(
            s,
            "\n## Lost, unexpected, duplicated\n\nPer history, of what had to be there (the checks below judge them: a duplicated event is allowed, at least once; a duplicated webhook only where a worker lost its record).\n\n| history | expected | ok | lost | unexpected | duplicated |\n|---|---:|---:|---:|---:|---:|"
        );
        for t in &self.tallies {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                t.history, t.expected, t.ok, t.lost, t.unexpected, t.duplicated
            );
        }
        let _ = writeln!(s, "\n## Totals\n\n| figure | value |\n|---|---:|");
        for (k, v) in &self.totals {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        let by = |m: &BTreeMap<Response, u64>| {
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            parts.join(", ")
        };
        let _ = writeln!(
            s,
            "\nClient HTTP answers by status: {}",
            by(&self.responses_by_status)
        );
        let _ = writeln!(
            s,
            "\nClient AMQP replies by status: {}",
            by(&self.amqp_replies_by_status)
        );
        let _ = writeln!(
            s,
            "\n## Checks\n\n| check | result | figures |\n|---|---|---|"
        );
        for c in &self.checks {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                c.name,
                if c.passed { "pass" } else { "**FAIL**" },
                c.detail.replace('|', "\\|").replace('\n', " ")
            );
        }
        if !self.service_exits.is_empty() {
            let _ = writeln!(s, "\n## Services that exited by themselves\n");
            for e in &self.service_exits {
                let _ = writeln!(s, "- {e}");
            }
        }
        if !self.client_problems.is_empty() {
            let _ = writeln!(s, "\n## Client problems (first ones)\n");
            for p in &self.client_problems {
                let _ = writeln!(s, "- {p}");
            }
        }
        s
    }

    /// Writes `<prefix>.md` and `<prefix>.json`.
    pub fn write(&self, prefix: &Path) -> Result<(), Error> {
        if let Some(dir) = prefix.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
        let base = prefix.to_string_lossy();
        std::fs::write(format!("{base}.md"), self.markdown())?;
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Setup(format!("report JSON: {e}")))?;
        std::fs::write(format!("{base}.json"), json)?;
        Ok(())
    }
}
