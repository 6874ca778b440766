//! Checks of the webhooks: every (event, subscriber) pair received and
//! signed, a second copy only where a worker can have lost its record of
//! the first 2xx (see [`explain_duplicate`]), and every pair recorded
//! DELIVERED in `notification_deliveries`.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{Tally, check, end_state::EndState, sample};
use crate::{
    faults::{Fault, Hit},
    report::Check,
};

/// The pairs the receiver must have seen against what it saw: lost,
/// unexpected (a pair no event asks for), duplicated (more than one copy;
/// judged by [`duplicates_explained`]).
pub(super) fn webhooks_tally(s: &EndState<'_>) -> (Tally, Vec<String>, Vec<String>) {
    let seen = &s.webhooks.counts;
    let mut missing: Vec<String> = s
        .webhooks_wanted
        .iter()
        .filter(|k| !seen.contains_key(*k))
        .map(|(sub, id)| format!("{sub}:{id}"))
        .collect();
    missing.sort();
    let mut unexpected: Vec<String> = seen
        .keys()
        .filter(|k| !s.webhooks_wanted.contains(*k))
        .map(|(sub, id)| format!("{sub}:{id}"))
        .collect();
    unexpected.sort();
    let tally = Tally {
        expected: s.webhooks_wanted.len() as u64,
        ok: (s.webhooks_wanted.len() - missing.len()) as u64,
        lost: missing.len() as u64,
        unexpected: unexpected.len() as u64,
        duplicated: seen.values().filter(|n| **n > 1).count() as u64,
        ..Tally::new("webhooks (event, subscriber)")
    };
    (tally, missing, unexpected)
}

/// Every (event, subscriber) received at least once, none that was not
/// asked for, every signature good.
pub fn every_webhook_received(s: &EndState<'_>) -> Check {
    let (tally, missing, unexpected) = webhooks_tally(s);
    let seen = &s.webhooks;
    let received: u64 = seen.counts.values().sum();
    let duplicates: u64 = seen.counts.values().map(|n| n.saturating_sub(1)).sum();
    check(
        "webhooks: every (event, subscriber) received at least once, signed",
        missing.is_empty() && unexpected.is_empty() && seen.bad_signatures == 0,
        format!(
            "{} expected, {} received distinct ({received} deliveries, {duplicates} duplicate copies); {} missing [{}]; {} not expected [{}]; {} bad signatures",
            tally.expected,
            seen.counts.len(),
            missing.len(),
            sample(&missing),
            unexpected.len(),
            sample(&unexpected),
            seen.bad_signatures
        ),
    )
}

/// The duplicated pairs, sorted by what explains them, and those nothing
/// explains (with how their first copy was answered).
pub(super) fn duplicate_causes(s: &EndState<'_>) -> (BTreeMap<Cause, u64>, Vec<String>) {
    let seen = &s.webhooks;
    let mut explained_by: BTreeMap<Cause, u64> = BTreeMap::new();
    let mut unexplained = Vec::new();
    let mut pairs: Vec<(&(String, String), &u64)> =
        seen.counts.iter().filter(|(_, n)| **n > 1).collect();
    pairs.sort();
    for (key, n) in pairs {
        let first_copy = seen.first_copy.get(key);
        let why = seen
            .first_seen
            .get(key)
            .and_then(|first| explain_duplicate(*first, first_copy, s.hits, s.webhook_timeout));
        match why {
            Some(why) => *explained_by.entry(why).or_default() += 1,
            None => {
                let how = first_copy.map_or_else(
                    || "answer not recorded".to_owned(),
                    |c| {
                        format!(
                            "first 2xx after {:.0} ms, waited ≥ {:.0} ms{}",
                            c.handling.as_secs_f64() * 1000.0,
                            c.waited_at_least.as_secs_f64() * 1000.0,
                            if c.client_gone { ", client gone" } else { "" }
                        )
                    },
                );
                unexplained.push(format!("{}:{} x{n} ({how})", key.0, key.1));
            }
        }
    }
    (explained_by, unexplained)
}

/// A second copy only where a worker lost its record of the 2xx.
pub fn duplicates_explained(s: &EndState<'_>) -> Check {
    let (explained_by, unexplained) = duplicate_causes(s);
    let counts = &s.webhooks.counts;
    let duplicates: u64 = counts.values().map(|n| n.saturating_sub(1)).sum();
    let pairs = counts.values().filter(|n| **n > 1).count();
    let amqp_closes = s
        .hits
        .iter()
        .filter(|h| h.fault == Fault::AmqpClose)
        .count();
    check(
        "duplicate webhooks only where a worker lost its record",
        unexplained.is_empty(),
        format!(
            "{duplicates} duplicate copies over {pairs} pairs; explained by {{{}}}; {} unexplained [{}] (none tolerated; {amqp_closes} AMQP connection closes explain none: the handlers finish and record before the consumer reconnects, and a redelivery finds the pair DELIVERED or leased)",
            explained_by
                .iter()
                .map(|(why, n)| format!("{}: {n}", why.label()))
                .collect::<Vec<_>>()
                .join(", "),
            unexplained.len(),
            sample(&unexplained)
        ),
    )
}

/// `notification_deliveries`: one DELIVERED row per expected pair, and
/// nothing in any other status.
pub fn deliveries_recorded(s: &EndState<'_>) -> Check {
    let delivered = s.deliveries.get("DELIVERED").copied().unwrap_or(0);
    let not_delivered: i64 = s
        .deliveries
        .iter()
        .filter(|(status, _)| *status != "DELIVERED")
        .map(|(_, n)| n)
        .sum();
    let want = s.webhooks_wanted.len();
    check(
        "notification_deliveries: every pair DELIVERED",
        not_delivered == 0 && delivered == want as i64,
        format!("{:?}; {want} expected pairs", s.deliveries),
    )
}

/// Why a second copy of a webhook was sent (see [`explain_duplicate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    /// A fault that can make the worker lose its record of the first 2xx:
    /// [`Fault::KillWorkers`], [`Fault::TerminateBackends`] or
    /// [`Fault::DatabaseOutage`].
    Fault(Fault),
    /// The worker's webhook timeout fired before it read the first 2xx.
    WebhookTimeout,
}

impl Cause {
    /// The text of the human report.
    pub fn label(self) -> &'static str {
        match self {
            Self::Fault(Fault::KillWorkers) => "workers SIGKILL",
            Self::Fault(Fault::TerminateBackends) => "backends terminated",
            Self::Fault(Fault::DatabaseOutage) => "database outage",
            Self::Fault(other) => other.label(),
            Self::WebhookTimeout => "webhook timeout before the 2xx was read",
        }
    }
}

/// How long after the first copy's arrival the worker may still lose its
/// record of the 2xx: the POST takes at most the webhook timeout, the
/// record and commit follow at once; 0.5 s for a slow machine.
fn record_window(webhook_timeout: Duration) -> Duration {
    webhook_timeout + Duration::from_millis(500)
}

/// How close to the webhook timeout the first copy's answer must have come
/// for the worker's timer to have fired before it read the 2xx.
const TIMEOUT_MARGIN: Duration = Duration::from_millis(100);

/// Why a webhook whose first copy arrived at `first` was sent again, if a
/// recorded fault or the first answer explains it:
///
/// - a SIGKILL of the workers at `k`, with `first` in `[k − (timeout +
///   0.5 s), k]`: killed between the 2xx and the commit of its record;
/// - backends terminated, or a database outage (its backends terminated),
///   over `[from, to]`, with `first` in `[from − (timeout + 0.5 s), to +
///   0.5 s]`: the statement recording the 2xx died before its commit (the
///   request may have been on its way when it did), and the pair's lease
///   ran out;
/// - the worker's webhook timeout: the first copy's connection dropped before
///   its 2xx was written, or the copy waited and was handled for at least the
///   timeout (less `TIMEOUT_MARGIN`) — the worker recorded a failure and
///   retried.
///
/// An AMQP connection close explains none: the consumer lets its handlers
/// finish (their records stand, only the acks fail) before it reconnects,
/// and the redelivery finds the pair DELIVERED, or leased and waits.
pub fn explain_duplicate(
    first: Instant,
    first_copy: Option<&crate::receiver::FirstCopy>,
    hits: &[Hit],
    webhook_timeout: Duration,
) -> Option<Cause> {
    let window = record_window(webhook_timeout);
    let slack = Duration::from_millis(500);
    let within = |from: Instant, to: Instant, before: Duration, after: Duration| {
        first + before >= from && first <= to + after
    };
    let mut kinds: Vec<&Hit> = hits
        .iter()
        .filter(|h| match h.fault {
            Fault::KillWorkers => within(h.from, h.to, window, Duration::ZERO),
            Fault::TerminateBackends | Fault::DatabaseOutage => within(h.from, h.to, window, slack),
            // None of these can lose the worker's record of a 2xx: the AMQP
            // close (see above), and the rest reach no worker transaction
            // (ingest's kill ends its own transactions, which write the
            // outbox, never a delivery record).
            Fault::AmqpClose
            | Fault::KillDispatcher
            | Fault::KillIngest
            | Fault::WebhookFailures
            | Fault::WebhookHang
            | Fault::BrokerRestart
            | Fault::NodeKill => false,
        })
        .collect();
    // When several overlap, the most direct cause is named: the process
    // killed, then its backends terminated, then the database closed.
    let rank = |f: Fault| match f {
        Fault::KillWorkers => 0,
        Fault::TerminateBackends => 1,
        _ => 2,
    };
    kinds.sort_by_key(|h| rank(h.fault));
    if let Some(h) = kinds.first() {
        return Some(Cause::Fault(h.fault));
    }
    if first_copy.is_some_and(|c| c.timed_out(webhook_timeout, TIMEOUT_MARGIN)) {
        return Some(Cause::WebhookTimeout);
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use uuid::Uuid;

    use super::super::end_state::fixture::Fixture;
    use super::*;
    use crate::receiver::FirstCopy;

    fn at(base: Instant, ms: i64) -> Instant {
        if ms >= 0 {
            base + Duration::from_millis(ms.unsigned_abs())
        } else {
            base - Duration::from_millis(ms.unsigned_abs())
        }
    }

    #[test]
    fn duplicate_windows_per_fault_kind() {
        let base = Instant::now() + Duration::from_secs(60);
        let t = Duration::from_secs(2);
        let kill = |ms| Hit {
            fault: Fault::KillWorkers,
            from: at(base, ms),
            to: at(base, ms),
        };
        let term = |from, to| Hit {
            fault: Fault::TerminateBackends,
            from: at(base, from),
            to: at(base, to),
        };
        let outage = |from, to| Hit {
            fault: Fault::DatabaseOutage,
            from: at(base, from),
            to: at(base, to),
        };
        let close = Hit {
            fault: Fault::AmqpClose,
            from: base,
            to: base,
        };
        let why = |first_ms, hits: &[Hit]| explain_duplicate(at(base, first_ms), None, hits, t);
        let killed = Some(Cause::Fault(Fault::KillWorkers));
        let terminated = Some(Cause::Fault(Fault::TerminateBackends));
        // SIGKILL: the first copy at most 2.5 s before, never after.
        assert_eq!(why(-2500, &[kill(0)]), killed);
        assert_eq!(why(0, &[kill(0)]), killed);
        assert_eq!(why(-2501, &[kill(0)]), None);
        assert_eq!(why(1, &[kill(0)]), None);
        // Terminated backends over [0, 20 ms]: 2.5 s before to 0.5 s after.
        assert_eq!(why(-2500, &[term(0, 20)]), terminated);
        assert_eq!(why(520, &[term(0, 20)]), terminated);
        assert_eq!(why(521, &[term(0, 20)]), None);
        assert_eq!(why(-2501, &[term(0, 20)]), None);
        // An outage's termination, the same window.
        assert_eq!(
            why(300, &[outage(0, 20)]),
            Some(Cause::Fault(Fault::DatabaseOutage))
        );
        // Where several explain it, the SIGKILL is named.
        assert_eq!(why(0, &[outage(0, 20), term(0, 20), kill(0)]), killed);
        // An AMQP close explains nothing.
        assert_eq!(why(0, &[close]), None);
        // A timeout, only with the receiver's evidence.
        let slow = FirstCopy {
            handling: Duration::from_millis(1950),
            ..FirstCopy::default()
        };
        assert_eq!(
            explain_duplicate(base, Some(&slow), &[], t),
            Some(Cause::WebhookTimeout)
        );
        let quick = FirstCopy {
            handling: Duration::from_millis(5),
            ..FirstCopy::default()
        };
        assert_eq!(explain_duplicate(base, Some(&quick), &[close], t), None);
    }

    fn pair(sub: &str) -> (String, String) {
        (sub.to_owned(), Uuid::new_v4().to_string())
    }

    #[test]
    fn a_missing_unasked_or_unsigned_webhook_fails() {
        let f = Fixture::new(Vec::new());
        let (a, b) = (pair("ops"), pair("ops"));
        let mut s = f.state();
        s.webhooks_wanted = HashSet::from([a.clone(), b.clone()]);
        s.webhooks.counts.insert(a.clone(), 1);
        s.webhooks.counts.insert(b.clone(), 2);
        assert!(every_webhook_received(&s).passed);
        let t = webhooks_tally(&s).0;
        assert_eq!((t.expected, t.ok, t.lost, t.duplicated), (2, 2, 0, 1));
        s.webhooks.counts.remove(&b);
        s.webhooks.counts.insert(pair("finance"), 1);
        let c = every_webhook_received(&s);
        assert!(
            !c.passed && c.detail.contains("1 missing") && c.detail.contains("1 not expected"),
            "{}",
            c.detail
        );
        s.webhooks.counts = [(a.clone(), 1), (b.clone(), 1)].into();
        s.webhooks.bad_signatures = 1;
        assert!(!every_webhook_received(&s).passed);
    }

    #[test]
    fn an_unexplained_duplicate_fails_and_a_killed_worker_explains_one() {
        let mut f = Fixture::new(Vec::new());
        let a = pair("ops");
        let first = Instant::now();
        let mut s = f.state();
        s.webhooks.counts.insert(a.clone(), 2);
        s.webhooks.first_seen.insert(a.clone(), first);
        let c = duplicates_explained(&s);
        assert!(
            !c.passed && c.detail.contains("1 unexplained"),
            "{}",
            c.detail
        );
        assert!(c.detail.contains("answer not recorded"), "{}", c.detail);
        f.hits.push(Hit {
            fault: Fault::KillWorkers,
            from: first + Duration::from_millis(10),
            to: first + Duration::from_millis(10),
        });
        let mut s = f.state();
        s.webhooks.counts.insert(a.clone(), 2);
        s.webhooks.first_seen.insert(a, first);
        let c = duplicates_explained(&s);
        assert!(c.passed, "{}", c.detail);
        assert_eq!(
            duplicate_causes(&s).0,
            BTreeMap::from([(Cause::Fault(Fault::KillWorkers), 1)])
        );
    }

    #[test]
    fn every_pair_recorded_delivered() {
        let f = Fixture::new(Vec::new());
        let mut s = f.state();
        s.webhooks_wanted = HashSet::from([pair("ops"), pair("ops")]);
        s.deliveries = BTreeMap::from([("DELIVERED".to_owned(), 2)]);
        assert!(deliveries_recorded(&s).passed);
        s.deliveries.insert("PENDING".into(), 1);
        assert!(!deliveries_recorded(&s).passed);
        s.deliveries = BTreeMap::from([("DELIVERED".to_owned(), 1)]);
        assert!(!deliveries_recorded(&s).passed);
    }
}
