//! Checks of what the broker carried and holds: every outbox event on the
//! chaos tap queue (bound with `#`), first copies in commit order per
//! aggregate, the settlement consumer's inbox equal to the events bound to
//! it, and the worker queues and DLQs empty at the end.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::{
    SETTLEMENT_CONSUMER, Tally, check,
    drain::{is_dlq, is_ingest_dlq, is_work_queue},
    end_state::EndState,
    sample,
};
use crate::{receiver::topic_matches, report::Check, tap::TapLog};

const PUBLISHED: &str = "broker: every outbox event published at least once, none dead";
const ORDERED: &str = "broker: each aggregate's events first published in commit order";

/// The outbox against the tap queue: lost (never on the broker),
/// unexpected (on the broker, not in the outbox, or without an id),
/// duplicated (published more than once: allowed, at least once).
pub(super) fn events_tally(s: &EndState<'_>, tap: &TapLog) -> Tally {
    let ids: HashSet<String> = s.outbox.iter().map(|r| r.id.to_string()).collect();
    let seen = ids.iter().filter(|id| tap.copies.contains_key(*id)).count() as u64;
    Tally {
        expected: ids.len() as u64,
        ok: seen,
        lost: ids.len() as u64 - seen,
        unexpected: tap.copies.keys().filter(|id| !ids.contains(*id)).count() as u64
            + tap.without_id,
        duplicated: tap.copies.values().filter(|n| **n > 1).count() as u64,
        ..Tally::new("events on the broker (at least once)")
    }
}

/// Every outbox event published at least once (the tap queue saw it),
/// none dead, none left unmarked, and nothing on the broker that the outbox
/// does not hold.
pub fn every_event_published(s: &EndState<'_>) -> Check {
    let dead = s.outbox.iter().filter(|r| r.dead).count();
    let unpublished = s.outbox.iter().filter(|r| !r.published && !r.dead).count();
    let events = s.outbox.len();
    let tap = match s.tap {
        Ok(tap) => tap,
        Err(e) => {
            return check(
                PUBLISHED,
                false,
                format!(
                    "the chaos tap queue could not be read: {e}; outbox: {events} rows, {dead} dead, {unpublished} not marked published"
                ),
            );
        }
    };
    let ids: HashSet<String> = s.outbox.iter().map(|r| r.id.to_string()).collect();
    let mut never_seen: Vec<&String> = ids
        .iter()
        .filter(|id| !tap.copies.contains_key(*id))
        .collect();
    never_seen.sort();
    let mut unknown: Vec<&String> = tap.copies.keys().filter(|id| !ids.contains(*id)).collect();
    unknown.sort();
    let mut duplicated: Vec<String> = tap
        .copies
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| format!("{id} x{n}"))
        .collect();
    duplicated.sort();
    let extra_copies: u64 = tap.copies.values().map(|n| n.saturating_sub(1)).sum();
    check(
        PUBLISHED,
        never_seen.is_empty()
            && unknown.is_empty()
            && tap.without_id == 0
            && dead == 0
            && unpublished == 0,
        format!(
            "{events} outbox rows; the chaos tap queue got {} messages, {} distinct ids; {} rows never on the broker [{}]; {} ids published more than once ({extra_copies} extra copies, allowed: at least once) [{}]; {} ids not in the outbox [{}]; {} messages without message_id; outbox: {dead} dead, {unpublished} not marked published",
            tap.messages,
            tap.copies.len(),
            never_seen.len(),
            sample(&never_seen),
            duplicated.len(),
            sample(&duplicated),
            unknown.len(),
            sample(&unknown),
            tap.without_id
        ),
    )
}

/// The first copies that arrived against commit order, from the tap queue.
pub(super) fn order_of(s: &EndState<'_>, tap: &TapLog) -> OrderFindings {
    let mut found = first_arrival_order(
        s.outbox.iter().map(|r| (r.id, r.seq, r.aggregate)),
        &tap.first_at,
    );
    found.out_of_order.sort();
    found
}

/// Each aggregate's events first published in commit order.
pub fn events_in_commit_order(s: &EndState<'_>) -> Check {
    let tap = match s.tap {
        Ok(tap) => tap,
        Err(e) => {
            return check(
                ORDERED,
                false,
                format!("the chaos tap queue could not be read: {e}"),
            );
        }
    };
    let found = order_of(s, tap);
    check(
        ORDERED,
        found.out_of_order.is_empty(),
        format!(
            "{} aggregates, {} of them with more than one event; {} first copies out of seq order [{}]",
            found.aggregates,
            found.with_several,
            found.out_of_order.len(),
            sample(&found.out_of_order)
        ),
    )
}

/// The settlement consumer's inbox against the events whose topic is bound
/// to its queue: lost (not applied), unexpected (applied, not such an
/// event), duplicated (several inbox rows of one event).
pub(super) fn inbox_tally(s: &EndState<'_>) -> (Tally, Vec<String>, Vec<String>) {
    let bindings = settlement_bindings();
    let bound: HashSet<String> = s
        .outbox
        .iter()
        .filter(|r| bindings.iter().any(|p| topic_matches(p, &r.topic)))
        .map(|r| r.id.to_string())
        .collect();
    let mut rows: HashMap<&str, u64> = HashMap::new();
    for r in s.inbox.iter().filter(|r| r.consumer == SETTLEMENT_CONSUMER) {
        *rows.entry(r.message_id.as_str()).or_default() += 1;
    }
    let mut not_applied: Vec<String> = bound
        .iter()
        .filter(|id| !rows.contains_key(id.as_str()))
        .cloned()
        .collect();
    not_applied.sort();
    let mut extra: Vec<String> = rows
        .keys()
        .filter(|id| !bound.contains(**id))
        .map(|id| (*id).to_owned())
        .collect();
    extra.sort();
    let tally = Tally {
        expected: bound.len() as u64,
        ok: (bound.len() - not_applied.len()) as u64,
        lost: not_applied.len() as u64,
        unexpected: extra.len() as u64,
        duplicated: rows.values().filter(|n| **n > 1).count() as u64,
        ..Tally::new("events applied by the settlement consumer")
    };
    (tally, not_applied, extra)
}

/// The settlement queue's bindings, as the fleet declares them.
fn settlement_bindings() -> &'static [&'static str] {
    entrip_common::amqp::WORKER_QUEUES
        .iter()
        .find(|q| q.name == entrip_common::amqp::SETTLEMENT_QUEUE)
        .map_or(&[], |q| q.bindings)
}

/// The settlement consumer applied exactly the events bound to it,
/// once each.
pub fn inbox_matches_bindings(s: &EndState<'_>) -> Check {
    let (tally, not_applied, extra) = inbox_tally(s);
    let mut by_consumer: std::collections::BTreeMap<&str, u64> = Default::default();
    for r in &s.inbox {
        *by_consumer.entry(r.consumer.as_str()).or_default() += 1;
    }
    check(
        "inbox: the settlement consumer applied exactly the events bound to it",
        tally.lost == 0 && tally.unexpected == 0 && tally.duplicated == 0,
        format!(
            "{} events with a topic bound to {} {:?}; inbox rows of consumer {SETTLEMENT_CONSUMER:?}: {}; {} events not applied [{}]; {} applied that are not such events [{}]; inbox rows by consumer {by_consumer:?}",
            tally.expected,
            entrip_common::amqp::SETTLEMENT_QUEUE,
            settlement_bindings(),
            by_consumer.get(SETTLEMENT_CONSUMER).copied().unwrap_or(0),
            not_applied.len(),
            sample(&not_applied),
            extra.len(),
            sample(&extra)
        ),
    )
}

/// The worker queues, their retry queues and the workers' DLQs empty
/// (`entrip.ingest.dlq` is judged by its own check); and the DLQs exist.
pub fn queues_empty(s: &EndState<'_>) -> Check {
    const NAME: &str = "broker: worker queues and DLQs empty";
    let depths = match &s.queues {
        Ok(d) => d,
        Err(e) => return check(NAME, false, e.clone()),
    };
    let dlq: Vec<String> = depths
        .iter()
        .filter(|(k, v)| is_dlq(k) && !is_ingest_dlq(k) && v.messages != 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let queued: Vec<String> = depths
        .iter()
        .filter(|(k, v)| is_work_queue(k) && v.messages != 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let any_dlq = depths.keys().any(|k| is_dlq(k));
    check(
        NAME,
        dlq.is_empty() && queued.is_empty() && any_dlq,
        format!(
            "{} queues (entrip.ingest and its retry queues among the work queues; entrip.ingest.dlq judged above); non-empty DLQs [{}]; non-empty work queues [{}]",
            depths.len(),
            dlq.join(", "),
            queued.join(", ")
        ),
    )
}

/// The per-aggregate order of first arrivals on the tap queue.
#[derive(Debug, Default)]
pub(super) struct OrderFindings {
    /// Aggregates with at least one event seen on the broker.
    pub(super) aggregates: usize,
    /// Of them, those with more than one.
    pub(super) with_several: usize,
    /// Adjacent events (by `seq`) of one aggregate whose first copies
    /// arrived the other way round.
    pub(super) out_of_order: Vec<Inversion>,
}

/// Two events of one aggregate whose first copies arrived against their
/// commit order: `later` (the higher `seq`) came first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Inversion {
    aggregate: Uuid,
    /// (`seq`, queue position) of the event committed first.
    earlier: (i64, usize),
    /// (`seq`, queue position) of the event committed after it.
    later: (i64, usize),
}

impl std::fmt::Display for Inversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: seq {} (position {}) before seq {} (position {})",
            self.aggregate, self.later.0, self.later.1, self.earlier.0, self.earlier.1
        )
    }
}

/// Checks that, for each aggregate, the first copies of its events arrived
/// in `seq` order. `rows` are (id, seq, aggregate) in any order; `first_at`
/// the queue position of each id's first copy. A later copy (a republish
/// after a lost confirm or mark) may come after anything: only first
/// arrivals are compared. Events never seen are left out (the "published
/// at least once" check names them).
fn first_arrival_order(
    rows: impl Iterator<Item = (Uuid, i64, Uuid)>,
    first_at: &HashMap<String, usize>,
) -> OrderFindings {
    let mut by_aggregate: HashMap<Uuid, Vec<(i64, usize)>> = HashMap::new();
    for (id, seq, aggregate) in rows {
        if let Some(at) = first_at.get(&id.to_string()) {
            by_aggregate.entry(aggregate).or_default().push((seq, *at));
        }
    }
    let mut out_of_order = Vec::new();
    for (aggregate, events) in &mut by_aggregate {
        events.sort_unstable();
        // Any inversion shows in some adjacent pair.
        for pair in events.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            if later.1 < earlier.1 {
                out_of_order.push(Inversion {
                    aggregate: *aggregate,
                    earlier,
                    later,
                });
            }
        }
    }
    OrderFindings {
        aggregates: by_aggregate.len(),
        with_several: by_aggregate.values().filter(|e| e.len() > 1).count(),
        out_of_order,
    }
}

#[cfg(test)]
mod tests {
    use super::super::drain::Depth;
    use super::super::end_state::{InboxRow, fixture::Fixture, fixture::outbox};
    use super::*;

    #[test]
    fn first_arrivals_compared_per_aggregate() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        // a: seq 1, 3, 5; b: seq 2, 4.
        let rows = [
            (ids[0], 1, a),
            (ids[1], 2, b),
            (ids[2], 3, a),
            (ids[3], 4, b),
            (ids[4], 5, a),
        ];
        let positions = |p: [usize; 5]| -> HashMap<String, usize> {
            ids.iter().map(ToString::to_string).zip(p).collect()
        };
        // Interleaved across aggregates but in order within each: fine.
        let ok = first_arrival_order(rows.iter().copied(), &positions([3, 0, 4, 1, 9]));
        assert_eq!((ok.aggregates, ok.with_several), (2, 2));
        assert!(ok.out_of_order.is_empty(), "{:?}", ok.out_of_order);
        // a's seq 5 first arrived before its seq 3.
        let bad = first_arrival_order(rows.iter().copied(), &positions([0, 1, 6, 3, 5]));
        assert_eq!(bad.out_of_order.len(), 1, "{:?}", bad.out_of_order);
        let inv = bad.out_of_order[0];
        assert_eq!((inv.aggregate, inv.earlier, inv.later), (a, (3, 6), (5, 5)));
        // An event never seen is left out.
        let mut seen = positions([0, 1, 6, 3, 5]);
        seen.remove(&ids[4].to_string());
        assert!(
            first_arrival_order(rows.iter().copied(), &seen)
                .out_of_order
                .is_empty()
        );
    }

    /// A tap that saw each of `ids` `n` times, in order.
    fn tap_of(ids: &[(Uuid, u64)]) -> TapLog {
        let mut tap = TapLog::default();
        for (at, (id, n)) in ids.iter().enumerate() {
            tap.copies.insert(id.to_string(), *n);
            tap.first_at.insert(id.to_string(), at);
            tap.messages += n;
        }
        tap
    }

    #[test]
    fn an_event_never_on_the_broker_or_unknown_to_the_outbox_fails() {
        let a = Uuid::new_v4();
        let rows = vec![
            outbox(1, a, "booking.created"),
            outbox(2, a, "payment.created"),
        ];
        let mut f = Fixture::new(Vec::new());
        f.tap = tap_of(&[(rows[0].id, 1), (rows[1].id, 2)]);
        let mut s = f.state();
        s.outbox = rows.clone();
        let c = every_event_published(&s);
        assert!(c.passed, "{}", c.detail);
        // Duplicated is allowed, and counted.
        let t = events_tally(&s, &f.tap);
        assert_eq!((t.expected, t.ok, t.lost, t.duplicated), (2, 2, 0, 1));

        f.tap = tap_of(&[(rows[0].id, 1), (Uuid::new_v4(), 1)]);
        let mut s = f.state();
        s.outbox = rows.clone();
        let c = every_event_published(&s);
        assert!(
            !c.passed && c.detail.contains("1 rows never on the broker"),
            "{}",
            c.detail
        );
        let t = events_tally(&s, &f.tap);
        assert_eq!((t.lost, t.unexpected), (1, 1));

        // A dead row fails even when it was seen.
        f.tap = tap_of(&[(rows[0].id, 1), (rows[1].id, 1)]);
        let mut s = f.state();
        s.outbox = rows.clone();
        s.outbox[1].dead = true;
        assert!(!every_event_published(&s).passed);
        // So does an unreadable tap queue.
        let mut s = f.state();
        s.tap = Err("no such queue");
        assert!(!every_event_published(&s).passed);
        assert!(!events_in_commit_order(&s).passed);
    }

    #[test]
    fn commit_order_is_judged_on_the_tap_queue() {
        let a = Uuid::new_v4();
        let rows = vec![
            outbox(1, a, "booking.created"),
            outbox(2, a, "payment.created"),
        ];
        let mut f = Fixture::new(Vec::new());
        f.tap = tap_of(&[(rows[0].id, 1), (rows[1].id, 1)]);
        let mut s = f.state();
        s.outbox = rows.clone();
        assert!(events_in_commit_order(&s).passed);
        f.tap = tap_of(&[(rows[1].id, 1), (rows[0].id, 1)]);
        let mut s = f.state();
        s.outbox = rows;
        let c = events_in_commit_order(&s);
        assert!(
            !c.passed && c.detail.contains("1 first copies out of seq order"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn the_inbox_holds_exactly_the_bound_events() {
        let p = Uuid::new_v4();
        // payment.approved is bound to the settlement queue; booking.created
        // is not.
        let bound = outbox(1, p, "payment.approved");
        let other = outbox(2, p, "booking.created");
        let f = Fixture::new(Vec::new());
        let mut s = f.state();
        s.outbox = vec![bound.clone(), other.clone()];
        let row = |id: Uuid| InboxRow {
            consumer: SETTLEMENT_CONSUMER.into(),
            message_id: id.to_string(),
        };
        s.inbox = vec![row(bound.id)];
        assert!(
            inbox_matches_bindings(&s).passed,
            "{}",
            inbox_matches_bindings(&s).detail
        );
        s.inbox.push(row(other.id));
        let t = inbox_tally(&s).0;
        assert_eq!((t.expected, t.ok, t.unexpected), (1, 1, 1));
        assert!(!inbox_matches_bindings(&s).passed);
        s.inbox = Vec::new();
        assert_eq!(inbox_tally(&s).0.lost, 1);
        assert!(!inbox_matches_bindings(&s).passed);
    }

    #[test]
    fn a_message_left_in_a_work_queue_or_dlq_fails() {
        let f = Fixture::new(Vec::new());
        let mut s = f.state();
        let depths = |pairs: &[(&str, i64)]| {
            Ok(pairs
                .iter()
                .map(|(k, v)| {
                    let d = Depth {
                        messages: *v,
                        ready: 0,
                        unacked: 0,
                    };
                    ((*k).to_owned(), d)
                })
                .collect())
        };
        s.queues = depths(&[
            ("entrip.settlement", 0),
            ("entrip.settlement.dlq", 0),
            ("entrip.ingest.dlq", 3),
        ]);
        assert!(queues_empty(&s).passed, "the ingest DLQ has its own check");
        s.queues = depths(&[
            ("entrip.notifications.retry.3000ms", 8),
            ("entrip.settlement.dlq", 0),
        ]);
        let c = queues_empty(&s);
        assert!(
            !c.passed
                && c.detail
                    .contains("retry.3000ms=8 (0 ready, 0 unacked, 8 dead-lettered"),
            "{}",
            c.detail
        );
        s.queues = depths(&[("entrip.settlement.dlq", 1)]);
        assert!(!queues_empty(&s).passed);
        // No DLQ at all: the topology is not there.
        s.queues = depths(&[("entrip.settlement", 0)]);
        assert!(!queues_empty(&s).passed);
        s.queues = Err("rabbitmqctl failed".into());
        assert!(!queues_empty(&s).passed);
    }
}
