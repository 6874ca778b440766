//! After the load: waiting for the fleet to drain ([`drain`]), loading the
//! end state once ([`EndState::load`]), and judging it with small pure
//! checks, one function each, against what the load generator was told over
//! HTTP and over AMQP and what the broker carried. Each history (bookings,
//! requests told 201/200, settlements, events, the settlement inbox,
//! webhooks) also gets Jepsen-style counts: lost, unexpected, duplicated
//! ([`tallies`]).

mod broker;
mod client;
mod drain;
mod end_state;
mod figures;
mod store;
mod webhooks;

use serde::Serialize;

pub use drain::{Depth, DrainState, drain, queue_depths, wanted_webhooks};
pub use end_state::{EndState, IntegrityRun, Sources};
pub use figures::{tallies, totals};
pub use webhooks::{Cause, explain_duplicate};

use crate::{load::Transport, report::Check};

/// The settlement consumer's name in table `inbox` (`CONSUMER` in
/// workers/src/settlement.rs). The notifications consumer keeps no inbox rows
/// (it dedupes by `notification_deliveries`), so it has no inbox check.
pub const SETTLEMENT_CONSUMER: &str = "settlement";

/// Jepsen-style counts of one history: of the `expected` items, how many
/// are there as they should be (`ok`), `lost`, or there more than once
/// (`duplicated`); and items there that nothing asked for, or that differ
/// from what was asked (`unexpected`). Whether a duplicate is a finding
/// depends on the history (events are at least once): its check says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub history: &'static str,
    pub expected: u64,
    pub ok: u64,
    pub lost: u64,
    pub unexpected: u64,
    pub duplicated: u64,
}

impl Tally {
    fn new(history: &'static str) -> Self {
        Self {
            history,
            expected: 0,
            ok: 0,
            lost: 0,
            unexpected: 0,
            duplicated: 0,
        }
    }
}

fn check(name: &str, passed: bool, detail: String) -> Check {
    if !passed {
        tracing::warn!("check {name} FAILED: {detail}");
    }
    Check {
        name: name.to_owned(),
        passed,
        detail,
    }
}

/// The first few items of a list, for a check's detail.
fn sample<T: std::fmt::Display>(items: &[T]) -> String {
    let shown: Vec<String> = items.iter().take(5).map(ToString::to_string).collect();
    if items.len() > 5 {
        format!("{} …", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// The fleet's own integrity checker agrees.
pub fn integrity_passes(s: &EndState<'_>) -> Check {
    const NAME: &str = "workers integrity --once exits 0";
    match &s.integrity {
        Ok(run) => check(
            NAME,
            run.success,
            format!("{}: {}", run.status, run.last_lines.join(" / ")),
        ),
        Err(e) => check(NAME, false, e.clone()),
    }
}

/// Every check, in the report's order.
pub fn run_checks(s: &EndState<'_>) -> Vec<Check> {
    vec![
        store::acknowledged_bookings_stored_once(s),
        store::nothing_stored_for_failed_requests(s),
        client::definitive_answers(s),
        client::no_500_answers(s),
        client::amqp_replies_consistent(s),
        client::told_stored_once(s, Transport::Amqp),
        client::told_stored_once(s, Transport::Http),
        client::ingest_dlq_holds_the_poison(s),
        client::ingest_counters_consistent(s),
        store::entities_in_acknowledged_state(s),
        store::settlements_once_each(s),
        broker::every_event_published(s),
        broker::events_in_commit_order(s),
        broker::inbox_matches_bindings(s),
        webhooks::every_webhook_received(s),
        webhooks::duplicates_explained(s),
        webhooks::deliveries_recorded(s),
        broker::queues_empty(s),
        integrity_passes(s),
    ]
}

#[cfg(test)]
mod tests {
    use super::end_state::fixture::Fixture;
    use super::*;

    #[test]
    fn an_empty_run_passes_every_check() {
        let f = Fixture::new(Vec::new());
        let s = f.state();
        let checks = run_checks(&s);
        assert_eq!(checks.len(), 19);
        let failed: Vec<&Check> = checks.iter().filter(|c| !c.passed).collect();
        assert!(failed.is_empty(), "{failed:?}");
        let names: std::collections::HashSet<&str> =
            checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), checks.len(), "each check has its own name");
    }

    #[test]
    fn a_failed_integrity_run_fails() {
        let f = Fixture::new(Vec::new());
        let mut s = f.state();
        s.integrity = Ok(IntegrityRun {
            success: false,
            status: "exit status: 1".into(),
            last_lines: vec!["3 bookings CONFIRMED without a settlement".into()],
        });
        let c = integrity_passes(&s);
        assert!(
            !c.passed && c.detail.contains("without a settlement"),
            "{}",
            c.detail
        );
        s.integrity = Err("did not finish in 120 s".into());
        assert!(!integrity_passes(&s).passed);
    }
}
