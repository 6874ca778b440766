//! Checks of the answers the client got, over HTTP and over AMQP: definitive
//! and consistent, no 500s, every request told 201/200 stored once with the
//! answer given, the planted poison in `entrip.ingest.dlq`, and ingest's
//! AMQP counters consistent with the end state.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Tally, check, end_state::EndState, sample};
use crate::{
    load::{Response, Stats, Step, Told, Transport},
    report::Check,
};

/// The client got definitive answers, and replays equal to the first.
pub fn definitive_answers(s: &EndState<'_>) -> Check {
    let st = &s.load.stats;
    let gave_up = Stats::get(&st.gave_up);
    let unexpected = Stats::get(&st.unexpected_answers);
    let mismatches = Stats::get(&st.replay_mismatches);
    check(
        "definitive answers and identical replays",
        gave_up == 0 && unexpected == 0 && mismatches == 0,
        format!(
            "{} requests, {} retries, {} replays: {mismatches} differed; {gave_up} gave up; {unexpected} unexpected answers",
            Stats::get(&st.requests),
            Stats::get(&st.retries),
            Stats::get(&st.replays)
        ),
    )
}

/// The contract: 500 only for a fault of the service itself; a database or
/// broker away is a 503 with Retry-After.
pub fn no_500_answers(s: &EndState<'_>) -> Check {
    let by_status = s.load.stats.by_status();
    let n = |code| by_status.get(&Response::Status(code)).copied().unwrap_or(0);
    check(
        "no 500 answers (infrastructure faults are 503)",
        n(500) == 0,
        format!("{} answers 500, {} answers 503", n(500), n(503)),
    )
}

/// AMQP: every copy of a reply the same answer, none to an unknown
/// request.
pub fn amqp_replies_consistent(s: &EndState<'_>) -> Check {
    let st = &s.load.stats;
    let extra = Stats::get(&st.amqp_extra_replies);
    let mismatches = Stats::get(&st.amqp_reply_mismatches);
    let unknown = Stats::get(&st.amqp_unknown_replies);
    check(
        "AMQP: later replies (to resends, redeliveries) equal the first; none unknown",
        mismatches == 0 && unknown == 0,
        format!(
            "{} logical requests, {} messages published ({} resends after no reply within the patience window), {} replies ({} replayed); {extra} later replies, {mismatches} of them different from the first; {unknown} replies to no request or without a status",
            Stats::get(&st.amqp_requests),
            Stats::get(&st.amqp_published),
            Stats::get(&st.amqp_resends),
            Stats::get(&st.amqp_replies),
            Stats::get(&st.amqp_replies_replayed),
        ),
    )
}

/// Every request told 201/200, over one transport or both.
pub(super) fn told<'j>(s: &EndState<'j>, via: Option<Transport>) -> Vec<&'j Told> {
    s.load
        .journeys
        .iter()
        .flat_map(|j| j.told.iter())
        .filter(|t| via.is_none_or(|v| t.via == v))
        .collect()
}

/// What is wrong with each request told 201/200 over `via`: its stored
/// answer must equal the one given, and it must have one audit row (over
/// `via`, of the API client, naming the entity of the answer). Also the
/// Jepsen-style figures: lost (no stored answer or no audit row),
/// duplicated (several audit rows), unexpected (an answer or audit row
/// that differs).
pub(super) fn told_stored(s: &EndState<'_>, via: Transport) -> (Tally, Vec<String>) {
    let answers: HashMap<&str, (i16, &serde_json::Value)> = s
        .keys
        .iter()
        .filter(|k| k.client == s.api_client)
        .filter_map(|k| Some((k.key.as_str(), (k.status?, k.body.as_ref()?))))
        .collect();
    let mut audit_of: HashMap<&str, Vec<&super::end_state::AuditRow>> = HashMap::new();
    for a in &s.audit {
        if let Some(k) = &a.key {
            audit_of.entry(k.as_str()).or_default().push(a);
        }
    }
    let mut tally = Tally::new(match via {
        Transport::Amqp => "AMQP requests told 201/200",
        Transport::Http => "HTTP requests told 201/200",
    });
    let mut wrong = Vec::new();
    for t in told(s, Some(via)) {
        tally.expected += 1;
        let before = wrong.len();
        let what = format!("{:?} {} {}", t.step, t.key, t.status);
        let rows = audit_of.get(t.key.as_str()).map_or(&[][..], Vec::as_slice);
        match answers.get(t.key.as_str()) {
            None => wrong.push(format!("{what}: no stored answer")),
            Some((status, body))
                if i32::from(*status) != i32::from(t.status) || **body != t.body =>
            {
                wrong.push(format!("{what}: stored {status} {body}, told {}", t.body));
            }
            Some(_) => {}
        }
        match rows {
            [a] => {
                if Some(a.entity) != t.id() {
                    wrong.push(format!(
                        "{what}: audit row of {}, told {:?}",
                        a.entity,
                        t.id()
                    ));
                }
                if a.channel.as_deref() != Some(via.channel()) {
                    wrong.push(format!("{what}: audit row over {:?}", a.channel));
                }
                if a.client.as_deref() != Some(s.api_client) {
                    wrong.push(format!("{what}: audit row of client {:?}", a.client));
                }
            }
            rows => wrong.push(format!("{what}: {} audit rows", rows.len())),
        }
        if !answers.contains_key(t.key.as_str()) || rows.is_empty() {
            tally.lost += 1;
        } else if rows.len() > 1 {
            tally.duplicated += 1;
        } else if wrong.len() > before {
            tally.unexpected += 1;
        } else {
            tally.ok += 1;
        }
    }
    (tally, wrong)
}

/// Every request told 201/200 over `via` stored exactly once, over that
/// transport, with the answer the client got.
pub fn told_stored_once(s: &EndState<'_>, via: Transport) -> Check {
    let (tally, wrong) = told_stored(s, via);
    let mut by_step: BTreeMap<Step, u64> = BTreeMap::new();
    for t in told(s, Some(via)) {
        *by_step.entry(t.step).or_default() += 1;
    }
    let (name, answer) = match via {
        Transport::Amqp => (
            "AMQP requests told 201/200 stored exactly once, over AMQP, as replied",
            "replied",
        ),
        Transport::Http => (
            "HTTP requests told 201/200 stored exactly once, over HTTP, as answered",
            "answered",
        ),
    };
    check(
        name,
        wrong.is_empty(),
        format!(
            "{} requests {by_step:?}: each must have its stored answer equal to the one {answer} and one audit row (channel {:?}, client {:?}, the entity of the answer); {} wrong [{}]",
            tally.expected,
            via.channel(),
            s.api_client,
            wrong.len(),
            sample(&wrong)
        ),
    )
}

const DLQ_CHECK: &str =
    "AMQP: entrip.ingest.dlq holds the planted poison (told 400) and nothing else";

/// `entrip.ingest.dlq` holds every planted poison message (told 400,
/// dead-lettered with a 400 reason), and nothing else. Extra copies of
/// poison are allowed: a redelivery dead-letters again.
pub fn ingest_dlq_holds_the_poison(s: &EndState<'_>) -> Check {
    let dlq_name = entrip_common::amqp::dlq_name(entrip_common::amqp::INGEST_QUEUE);
    let dlq = match s.ingest_dlq {
        Ok(dlq) => dlq,
        Err(e) => {
            return check(
                DLQ_CHECK,
                false,
                format!("{dlq_name} could not be read: {e}"),
            );
        }
    };
    let poison = &s.load.poison;
    let planted: HashSet<&str> = poison.iter().map(|p| p.key.as_str()).collect();
    let mut copies: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut strangers = Vec::new();
    for (id, reason) in &dlq.messages {
        if planted.contains(id.as_str()) {
            copies.entry(id.as_str()).or_default().push(reason.as_str());
        } else {
            strangers.push(format!("{id:?}: {reason}"));
        }
    }
    let mut wrong = Vec::new();
    for p in poison {
        if p.told != Some(400) {
            wrong.push(format!("{} told {:?}, not 400", p.key, p.told));
        }
        match copies.get(p.key.as_str()) {
            None => wrong.push(format!("{} not in the DLQ", p.key)),
            Some(reasons) => {
                if let Some(r) = reasons.iter().find(|r| !r.starts_with("400 ")) {
                    wrong.push(format!("{}: x-entrip-error {r:?}", p.key));
                }
            }
        }
    }
    let extra_copies: usize = copies.values().map(|c| c.len().saturating_sub(1)).sum();
    check(
        DLQ_CHECK,
        wrong.is_empty() && strangers.is_empty(),
        format!(
            "{} poison messages planted; {dlq_name} holds {} messages ({extra_copies} extra copies of poison, allowed: a redelivery dead-letters again); {} poison wrong [{}]; {} other messages [{}]",
            poison.len(),
            dlq.messages.len(),
            wrong.len(),
            sample(&wrong),
            strangers.len(),
            sample(&strangers)
        ),
    )
}

/// Ingest's AMQP counters against the end state. Counts of a life cut
/// short after its last scrape are lost, so the sums are lower bounds: each
/// commit is counted `accepted` at most once, each dead letter is in the
/// DLQ.
pub fn ingest_counters_consistent(s: &EndState<'_>) -> Check {
    let amqp_commits = s
        .audit
        .iter()
        .filter(|a| {
            a.channel.as_deref() == Some("amqp") && a.client.as_deref() == Some(s.api_client)
        })
        .count() as u64;
    let counts = s.ingest_counts;
    let accepted = counts.outcome("accepted");
    let dead_lettered = counts.outcome("dead_lettered");
    let amqp_stored = told(s, Some(Transport::Amqp)).len();
    let dlq_messages = s.ingest_dlq.map_or(0, |d| d.messages.len() as u64);
    check(
        "ingest metrics: AMQP outcomes consistent with the end state",
        accepted <= amqp_commits
            && (accepted > 0 || amqp_stored == 0)
            && (s.ingest_dlq.is_err() || dead_lettered <= dlq_messages),
        format!(
            "entrip_ingest_messages_total summed over ingest's lives ({} of them not scraped): {:?}; accepted {accepted} ≤ {amqp_commits} AMQP commits (audit rows over amqp), and > 0 when any AMQP request was stored ({amqp_stored}); dead_lettered {dead_lettered} ≤ {dlq_messages} in the DLQ; reply failures {:?}",
            s.ingest_scrape_missing, counts.messages, counts.reply_failures
        ),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::super::end_state::{AuditRow, KeyRow, fixture::Fixture, fixture::journey};
    use super::*;
    use crate::load::Poison;

    fn told_booking(key: &str, id: Uuid, via: Transport) -> Told {
        Told {
            step: Step::Booking,
            via,
            key: key.into(),
            status: 201,
            body: json!({ "id": id.to_string() }),
        }
    }

    fn key_row(key: &str, id: Uuid) -> KeyRow {
        KeyRow {
            client: "chaos".into(),
            key: key.into(),
            status: Some(201),
            body: Some(json!({ "id": id.to_string() })),
        }
    }

    fn audit(key: &str, id: Uuid, channel: &str) -> AuditRow {
        AuditRow {
            key: Some(key.into()),
            entity: id,
            channel: Some(channel.into()),
            client: Some("chaos".into()),
        }
    }

    #[test]
    fn gave_up_and_mismatched_replays_fail() {
        let f = Fixture::new(Vec::new());
        assert!(definitive_answers(&f.state()).passed);
        Stats::bump(&f.load.stats.replay_mismatches);
        assert!(!definitive_answers(&f.state()).passed);
        let g = Fixture::new(Vec::new());
        Stats::bump(&g.load.stats.gave_up);
        assert!(!definitive_answers(&g.state()).passed);
    }

    #[test]
    fn a_500_fails_and_a_503_does_not() {
        let f = Fixture::new(Vec::new());
        f.load.stats.status(Response::Status(503));
        assert!(no_500_answers(&f.state()).passed);
        f.load.stats.status(Response::Status(500));
        let c = no_500_answers(&f.state());
        assert!(
            !c.passed && c.detail.starts_with("1 answers 500, 1 answers 503"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn an_amqp_reply_that_differs_fails() {
        let f = Fixture::new(Vec::new());
        Stats::bump(&f.load.stats.amqp_extra_replies);
        assert!(amqp_replies_consistent(&f.state()).passed);
        Stats::bump(&f.load.stats.amqp_reply_mismatches);
        assert!(!amqp_replies_consistent(&f.state()).passed);
    }

    #[test]
    fn told_requests_need_their_answer_and_one_audit_row_over_their_transport() {
        let id = Uuid::new_v4();
        let mut j = journey(1, id, None);
        j.told = vec![told_booking("k1", id, Transport::Amqp)];
        let f = Fixture::new(vec![j]);
        let mut s = f.state();
        s.keys = vec![key_row("k1", id)];
        s.audit = vec![audit("k1", id, "amqp")];
        assert!(told_stored_once(&s, Transport::Amqp).passed);
        assert_eq!(told_stored(&s, Transport::Amqp).0.ok, 1);
        // Nothing told over HTTP: nothing to check there.
        assert_eq!(told_stored(&s, Transport::Http).0.expected, 0);

        // Recorded as if it came over HTTP.
        s.audit = vec![audit("k1", id, "http")];
        let c = told_stored_once(&s, Transport::Amqp);
        assert!(
            !c.passed && c.detail.contains("audit row over"),
            "{}",
            c.detail
        );
        assert_eq!(told_stored(&s, Transport::Amqp).0.unexpected, 1);

        // Two audit rows: applied twice.
        s.audit = vec![audit("k1", id, "amqp"), audit("k1", id, "amqp")];
        assert!(!told_stored_once(&s, Transport::Amqp).passed);
        assert_eq!(told_stored(&s, Transport::Amqp).0.duplicated, 1);

        // The stored answer differs from the reply.
        s.audit = vec![audit("k1", id, "amqp")];
        s.keys[0].body = Some(json!({ "id": Uuid::new_v4().to_string() }));
        let c = told_stored_once(&s, Transport::Amqp);
        assert!(!c.passed && c.detail.contains("stored 201"), "{}", c.detail);

        // Lost: no key row; another client's key does not count.
        s.keys[0].client = "someone-else".into();
        let (t, wrong) = told_stored(&s, Transport::Amqp);
        assert_eq!(t.lost, 1);
        assert!(wrong[0].contains("no stored answer"), "{wrong:?}");
    }

    #[test]
    fn the_dlq_holds_each_poison_and_nothing_else() {
        let mut f = Fixture::new(Vec::new());
        f.load.poison = vec![Poison {
            key: "p1".into(),
            told: Some(400),
        }];
        f.dlq.messages = vec![("p1".into(), "400 not JSON".into())];
        assert!(ingest_dlq_holds_the_poison(&f.state()).passed);
        // A second copy of the poison is allowed.
        f.dlq.messages.push(("p1".into(), "400 not JSON".into()));
        assert!(ingest_dlq_holds_the_poison(&f.state()).passed);
        // A stranger is not.
        f.dlq.messages.push(("k9".into(), "503 database".into()));
        let c = ingest_dlq_holds_the_poison(&f.state());
        assert!(
            !c.passed && c.detail.contains("1 other messages"),
            "{}",
            c.detail
        );
        // Nor poison dead-lettered for another reason, nor poison missing.
        f.dlq.messages = vec![("p1".into(), "500 oops".into())];
        assert!(!ingest_dlq_holds_the_poison(&f.state()).passed);
        f.dlq.messages.clear();
        assert!(!ingest_dlq_holds_the_poison(&f.state()).passed);
        // An unreadable DLQ fails.
        let mut s = f.state();
        s.ingest_dlq = Err("channel closed");
        assert!(!ingest_dlq_holds_the_poison(&s).passed);
    }

    #[test]
    fn ingest_cannot_have_accepted_more_than_was_committed() {
        let id = Uuid::new_v4();
        let mut j = journey(1, id, None);
        j.told = vec![told_booking("k1", id, Transport::Amqp)];
        let mut f = Fixture::new(vec![j]);
        f.counts.messages.insert("accepted".into(), 1);
        let mut s = f.state();
        s.audit = vec![audit("k1", id, "amqp")];
        assert!(ingest_counters_consistent(&s).passed);
        f.counts.messages.insert("accepted".into(), 2);
        let mut s = f.state();
        s.audit = vec![audit("k1", id, "amqp")];
        assert!(!ingest_counters_consistent(&s).passed);
        // Stored over AMQP, yet nothing counted accepted.
        f.counts.messages.clear();
        let mut s = f.state();
        s.audit = vec![audit("k1", id, "amqp")];
        assert!(!ingest_counters_consistent(&s).passed);
        // More dead-lettered than the DLQ holds.
        f.counts.messages.insert("accepted".into(), 1);
        f.counts.messages.insert("dead_lettered".into(), 1);
        let mut s = f.state();
        s.audit = vec![audit("k1", id, "amqp")];
        assert!(!ingest_counters_consistent(&s).passed);
    }
}
