//! The run's figures for people: the totals table of the report, and the
//! Jepsen-style counts of each history ([`Tally`]).

use std::collections::BTreeMap;

use super::{
    Tally, broker, client,
    end_state::EndState,
    store,
    webhooks::{self, Cause},
};
use crate::load::{Stats, Step, Transport};

/// Lost, unexpected and duplicated, per history. The tap queue's history
/// is left out when the queue could not be read (its checks fail then).
pub fn tallies(s: &EndState<'_>) -> Vec<Tally> {
    let mut t = vec![
        store::bookings_tally(s).0,
        client::told_stored(s, Transport::Http).0,
        client::told_stored(s, Transport::Amqp).0,
        store::settlements_tally(s).0,
    ];
    if let Ok(tap) = s.tap {
        t.push(broker::events_tally(s, tap));
    }
    t.push(broker::inbox_tally(s).0);
    t.push(webhooks::webhooks_tally(s).0);
    t
}

/// The totals table of the report.
pub fn totals(s: &EndState<'_>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: u64| {
        m.insert(k.to_owned(), v);
    };
    let st = &s.load.stats;
    let journeys = &s.load.journeys;
    let stat = |c| Stats::get(c);
    put("journeys", journeys.len() as u64);
    put("users", s.load.users.len() as u64);
    put(
        "requests sent (with retries and replays)",
        stat(&st.requests),
    );
    put("retries (same key and body)", stat(&st.retries));
    put("client timeouts and connection errors", stat(&st.timeouts));
    put(
        "first attempts with a planted few-ms timeout",
        stat(&st.planted_timeouts),
    );
    put("5xx answers", stat(&st.server_errors));
    put("replays of answered requests", stat(&st.replays));
    put("requests given up", stat(&st.gave_up));
    put("bookings acknowledged", store::acked(s).count() as u64);
    put("bookings stored", s.bookings.len() as u64);
    let (told_failed, by_step) = store::told_failed(s);
    put(
        "requests told failed (5xx, abandoned)",
        told_failed.len() as u64,
    );
    put(
        "bookings told failed",
        by_step.get(&Step::Booking).copied().unwrap_or(0),
    );
    put(
        "planted 422 requests",
        store::planted_invalid(s).len() as u64,
    );
    put(
        "journeys indeterminate (gave up / unexpected answer)",
        journeys.iter().filter(|j| j.indeterminate).count() as u64,
    );
    put(
        "settlements expected",
        journeys.iter().filter(|j| j.expect_settled()).count() as u64,
    );
    put("settlements found", s.settlements.len() as u64);
    put("events (outbox rows)", s.outbox.len() as u64);
    let hooks = &s.webhooks;
    put(
        "webhooks expected (event, subscriber)",
        s.webhooks_wanted.len() as u64,
    );
    put(
        "webhooks received (deliveries)",
        hooks.counts.values().sum(),
    );
    put(
        "webhooks duplicate copies",
        hooks.counts.values().map(|n| n.saturating_sub(1)).sum(),
    );
    let (explained_by, unexplained) = webhooks::duplicate_causes(s);
    for (why, n) in &explained_by {
        put(
            &format!("webhook duplicates explained: {}", Cause::label(*why)),
            *n,
        );
    }
    put("webhook duplicates unexplained", unexplained.len() as u64);
    if let Ok(tap) = s.tap {
        let events = broker::events_tally(s, tap);
        put("broker: messages on the chaos tap queue", tap.messages);
        put(
            "broker: distinct events on the tap queue",
            tap.copies.len() as u64,
        );
        put("broker: events published more than once", events.duplicated);
        put(
            "broker: extra copies of events (at least once)",
            tap.copies.values().map(|n| n.saturating_sub(1)).sum(),
        );
        put("broker: outbox events never published", events.lost);
        put(
            "broker: first copies out of commit order",
            broker::order_of(s, tap).out_of_order.len() as u64,
        );
    }
    let inbox = broker::inbox_tally(s).0;
    put(
        "inbox rows of the settlement consumer",
        s.inbox
            .iter()
            .filter(|r| r.consumer == super::SETTLEMENT_CONSUMER)
            .count() as u64,
    );
    put("inbox: bound events not applied", inbox.lost);
    put("AMQP: logical requests", stat(&st.amqp_requests));
    put(
        "AMQP: messages published (with resends, replays, poison)",
        stat(&st.amqp_published),
    );
    put(
        "AMQP: resends (no reply within the patience window)",
        stat(&st.amqp_resends),
    );
    put(
        "AMQP: first sends with a planted few-ms patience",
        stat(&st.amqp_planted_short_patience),
    );
    put(
        "AMQP: publishes failed and sent again",
        stat(&st.amqp_publish_failures),
    );
    put(
        "AMQP: connections opened by the load",
        stat(&st.amqp_connects),
    );
    put("AMQP: replies read", stat(&st.amqp_replies));
    put(
        "AMQP: replies marked replayed",
        stat(&st.amqp_replies_replayed),
    );
    put(
        "AMQP: later replies to one request",
        stat(&st.amqp_extra_replies),
    );
    put(
        "AMQP: requests told 201/200",
        client::told(s, Some(Transport::Amqp)).len() as u64,
    );
    put("replays over the other transport", stat(&st.cross_replays));
    put("AMQP: poison planted", stat(&st.planted_poison));
    put(
        "AMQP: messages in entrip.ingest.dlq",
        s.ingest_dlq.map_or(0, |d| d.messages.len() as u64),
    );
    for (outcome, n) in &s.ingest_counts.messages {
        put(&format!("ingest metrics: AMQP {outcome}"), *n);
    }
    for (reason, n) in &s.ingest_counts.reply_failures {
        put(&format!("ingest metrics: reply failures {reason}"), *n);
    }
    put("webhook answers 500 (fault window)", hooks.answered_500);
    put("webhook requests held (hang window)", hooks.hung);
    m
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::super::end_state::fixture::{Fixture, booking, journey};
    use super::*;

    #[test]
    fn every_history_is_tallied_and_the_totals_count_the_rows() {
        let a = Uuid::new_v4();
        let f = Fixture::new(vec![journey(1, a, None), journey(2, Uuid::new_v4(), None)]);
        let mut s = f.state();
        s.bookings = vec![booking("CHAOS-0000001", a, "PENDING")];
        let t = tallies(&s);
        let histories: Vec<&str> = t.iter().map(|t| t.history).collect();
        assert_eq!(
            histories,
            [
                "acknowledged bookings",
                "HTTP requests told 201/200",
                "AMQP requests told 201/200",
                "settlements",
                "events on the broker (at least once)",
                "events applied by the settlement consumer",
                "webhooks (event, subscriber)",
            ]
        );
        assert_eq!((t[0].expected, t[0].ok, t[0].lost), (2, 1, 1));
        let figures = totals(&s);
        assert_eq!(figures["bookings acknowledged"], 2);
        assert_eq!(figures["bookings stored"], 1);
        assert_eq!(figures["journeys"], 2);
        // Without the tap queue, its history and figures are left out.
        s.tap = Err("gone");
        assert_eq!(tallies(&s).len(), 6);
        assert!(!totals(&s).contains_key("broker: outbox events never published"));
    }
}
