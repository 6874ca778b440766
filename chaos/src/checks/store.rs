//! Checks of what the database holds against what the client was told:
//! bookings stored once, nothing stored for what was told failed, each
//! entity in its acknowledged state, and the settlements with their events.

use std::collections::{BTreeMap, HashMap, HashSet};

use uuid::Uuid;

use super::{
    Tally, check,
    end_state::{EndState, EntityRow},
    sample,
};
use crate::{
    load::{BookingOutcome, Journey, Step},
    report::Check,
};

/// The bookings the client was told were created.
pub(super) fn acked<'j>(s: &EndState<'j>) -> impl Iterator<Item = &'j Journey> {
    s.load.journeys.iter().filter(|j| j.booking_id().is_some())
}

fn rows_by_code<'s>(s: &'s EndState<'_>) -> HashMap<&'s str, Vec<Uuid>> {
    let mut by_code: HashMap<&str, Vec<Uuid>> = HashMap::new();
    for b in &s.bookings {
        by_code.entry(b.code.as_str()).or_default().push(b.id);
    }
    by_code
}

/// Acknowledged bookings: lost (no row), duplicated (several rows), and
/// unexpected (one row with another id, or a row the client never heard
/// of).
pub(super) fn bookings_tally(s: &EndState<'_>) -> (Tally, Vec<String>, Vec<String>) {
    let by_code = rows_by_code(s);
    let mut tally = Tally::new("acknowledged bookings");
    let mut wrong = Vec::new();
    for j in acked(s) {
        tally.expected += 1;
        let rows = by_code.get(j.code.as_str()).map_or(&[][..], Vec::as_slice);
        match rows {
            [] => tally.lost += 1,
            [id] if Some(*id) == j.booking_id() => tally.ok += 1,
            [_] => tally.unexpected += 1,
            _ => tally.duplicated += 1,
        }
        if rows.len() != 1 || Some(rows[0]) != j.booking_id() {
            wrong.push(format!("{} ({} rows)", j.code, rows.len()));
        }
    }
    let known: HashSet<&str> = s
        .load
        .journeys
        .iter()
        .filter(|j| j.booking_id().is_some() || j.indeterminate)
        .map(|j| j.code.as_str())
        .collect();
    let strangers: Vec<String> = s
        .bookings
        .iter()
        .map(|b| b.code.clone())
        .filter(|c| !known.contains(c.as_str()))
        .collect();
    tally.unexpected += strangers.len() as u64;
    (tally, wrong, strangers)
}

/// Every acknowledged booking stored exactly once, with its id, and none
/// stored that the client was not told of (or could not know the fate of).
pub fn acknowledged_bookings_stored_once(s: &EndState<'_>) -> Check {
    let (tally, wrong, unexpected) = bookings_tally(s);
    check(
        "acknowledged bookings stored exactly once",
        wrong.is_empty() && unexpected.is_empty(),
        format!(
            "{} acknowledged, {} stored, {} wrong [{}], {} stored without acknowledgement [{}]",
            tally.expected,
            s.bookings.len(),
            wrong.len(),
            sample(&wrong),
            unexpected.len(),
            sample(&unexpected)
        ),
    )
}

/// The keys of the requests the client was told failed, by step.
pub(super) fn told_failed<'j>(s: &EndState<'j>) -> (Vec<&'j str>, BTreeMap<Step, u64>) {
    let mut keys = Vec::new();
    let mut by_step: BTreeMap<Step, u64> = BTreeMap::new();
    for (step, key) in s
        .load
        .journeys
        .iter()
        .filter_map(|j| j.told_failed.as_ref())
    {
        *by_step.entry(*step).or_default() += 1;
        keys.push(key.as_str());
    }
    (keys, by_step)
}

/// The codes of the planted invalid requests (422s), bookings and misuses.
pub(super) fn planted_invalid<'j>(s: &EndState<'j>) -> Vec<&'j str> {
    let journeys = &s.load.journeys;
    journeys
        .iter()
        .filter(|j| j.booking == BookingOutcome::Invalid)
        .map(|j| j.code.as_str())
        .chain(journeys.iter().filter_map(|j| j.misuse_code.as_deref()))
        .collect()
}

fn by_booking(rows: &[EntityRow]) -> HashMap<Uuid, Vec<&EntityRow>> {
    let mut m: HashMap<Uuid, Vec<&EntityRow>> = HashMap::new();
    for r in rows {
        m.entry(r.booking).or_default().push(r);
    }
    m
}

/// Nothing stored for a request told failed (5xx, abandoned) or refused
/// (a planted 422), and none of the failed requests' keys kept.
pub fn nothing_stored_for_failed_requests(s: &EndState<'_>) -> Check {
    let by_code = rows_by_code(s);
    let pay_of = by_booking(&s.payments);
    let appr_of = by_booking(&s.approvals);
    let decided =
        |rows: &[EntityRow], id: Uuid| rows.iter().any(|r| r.id == id && r.status != "PENDING");
    let mut stored_anyway = Vec::new();
    for j in &s.load.journeys {
        let Some((step, _)) = &j.told_failed else {
            continue;
        };
        let b = j.booking_id();
        let leaked = match step {
            Step::Booking => by_code.contains_key(j.code.as_str()),
            Step::Payment => b.is_some_and(|b| pay_of.contains_key(&b)),
            Step::PaymentResult => j.payment.is_some_and(|p| decided(&s.payments, p)),
            Step::Approval => b.is_some_and(|b| appr_of.contains_key(&b)),
            Step::Decision => j.approval.is_some_and(|a| decided(&s.approvals, a)),
        };
        if leaked {
            stored_anyway.push(format!("{} {step:?}", j.code));
        }
    }
    let (told_keys, by_step) = told_failed(s);
    let told: HashSet<&str> = told_keys.iter().copied().collect();
    let keys_stored = s
        .keys
        .iter()
        .filter(|k| told.contains(k.key.as_str()))
        .count();
    let invalid = planted_invalid(s);
    let invalid_stored: Vec<&str> = invalid
        .iter()
        .copied()
        .filter(|c| by_code.contains_key(c))
        .collect();
    check(
        "nothing stored for requests told failed (5xx) or refused (422)",
        stored_anyway.is_empty() && keys_stored == 0 && invalid_stored.is_empty(),
        format!(
            "told failed {} {by_step:?}: {} stored anyway [{}], {keys_stored} of their keys stored; planted 422s {}: {} stored [{}]",
            told_keys.len(),
            stored_anyway.len(),
            sample(&stored_anyway),
            invalid.len(),
            invalid_stored.len(),
            sample(&invalid_stored)
        ),
    )
}

/// Each journey's booking, payment and approval in the state the client
/// was told (a booking CONFIRMED exactly when it must settle).
pub fn entities_in_acknowledged_state(s: &EndState<'_>) -> Check {
    let status_of: HashMap<&str, &str> = s
        .bookings
        .iter()
        .map(|b| (b.code.as_str(), b.status.as_str()))
        .collect();
    let pay_of = by_booking(&s.payments);
    let appr_of = by_booking(&s.approvals);
    let one = |rows: Option<&Vec<&EntityRow>>, want: Option<(Uuid, &str)>| -> Option<String> {
        let rows: Vec<(Uuid, &str)> = rows
            .map(|r| r.iter().map(|e| (e.id, e.status.as_str())).collect())
            .unwrap_or_default();
        match want {
            Some((id, status)) if rows != [(id, status)] => {
                Some(format!("{rows:?} not {id} {status}"))
            }
            None if !rows.is_empty() => Some(format!("unexpected {rows:?}")),
            _ => None,
        }
    };
    let mut wrong = Vec::new();
    let determinate: Vec<&Journey> = s
        .load
        .journeys
        .iter()
        .filter(|j| !j.indeterminate)
        .collect();
    for j in &determinate {
        let Some(b) = j.booking_id() else { continue };
        let status = status_of.get(j.code.as_str()).copied();
        let want_status = if j.expect_settled() {
            "CONFIRMED"
        } else {
            "PENDING"
        };
        if status != Some(want_status) {
            wrong.push(format!("{} booking {status:?} not {want_status}", j.code));
        }
        let pay = j
            .payment
            .map(|p| (p, j.payment_status.as_deref().unwrap_or("PENDING")));
        if let Some(w) = one(pay_of.get(&b), pay) {
            wrong.push(format!("{} payment {w}", j.code));
        }
        let appr = j
            .approval
            .map(|a| (a, j.approval_status.as_deref().unwrap_or("PENDING")));
        if let Some(w) = one(appr_of.get(&b), appr) {
            wrong.push(format!("{} approval {w}", j.code));
        }
    }
    check(
        "bookings, payments and approvals in the acknowledged state",
        wrong.is_empty(),
        format!(
            "{} journeys checked, {} wrong [{}]",
            determinate.len(),
            wrong.len(),
            sample(&wrong)
        ),
    )
}

/// The settlements against the approved-and-allowed bookings: lost,
/// unexpected (a booking neither expected nor of unknown fate), and
/// duplicated (two settlements of one booking).
pub(super) fn settlements_tally(s: &EndState<'_>) -> (Tally, Vec<Uuid>, Vec<Uuid>) {
    let journeys = &s.load.journeys;
    let expected: HashSet<Uuid> = journeys
        .iter()
        .filter(|j| j.expect_settled())
        .filter_map(Journey::booking_id)
        .collect();
    let indeterminate: HashSet<Uuid> = journeys
        .iter()
        .filter(|j| j.indeterminate)
        .filter_map(Journey::booking_id)
        .collect();
    let found: HashSet<Uuid> = s.settlements.iter().map(|r| r.booking).collect();
    let mut missing: Vec<Uuid> = expected.difference(&found).copied().collect();
    missing.sort();
    let mut extra: Vec<Uuid> = found
        .difference(&expected)
        .filter(|b| !indeterminate.contains(b))
        .copied()
        .collect();
    extra.sort();
    let tally = Tally {
        expected: expected.len() as u64,
        ok: expected.intersection(&found).count() as u64,
        lost: missing.len() as u64,
        unexpected: extra.len() as u64,
        duplicated: (s.settlements.len() - found.len()) as u64,
        ..Tally::new("settlements")
    };
    (tally, missing, extra)
}

/// Problems with the settlements' events: one `settlement.recorded` per
/// settlement (its aggregate the settlement, its data naming the booking)
/// and one `booking.confirmed` per settled booking (its aggregate the
/// booking); none for anything else.
fn settlement_event_problems(s: &EndState<'_>) -> Vec<String> {
    let settlement_of: HashMap<Uuid, Uuid> =
        s.settlements.iter().map(|r| (r.id, r.booking)).collect();
    let settled_bookings: HashSet<Uuid> = s.settlements.iter().map(|r| r.booking).collect();
    let mut problems = Vec::new();
    let mut recorded_per_settlement: HashMap<Uuid, u64> = HashMap::new();
    let mut confirmed_per_booking: HashMap<Uuid, u64> = HashMap::new();
    for e in &s.outbox {
        match e.topic.as_str() {
            "settlement.recorded" => {
                *recorded_per_settlement.entry(e.aggregate).or_default() += 1;
                let booking = e.booking.as_deref().and_then(|b| Uuid::parse_str(b).ok());
                match settlement_of.get(&e.aggregate) {
                    None => problems.push(format!(
                        "settlement.recorded for unknown settlement {}",
                        e.aggregate
                    )),
                    Some(b) if Some(*b) != booking => problems.push(format!(
                        "settlement.recorded of {} names booking {booking:?}, not {b}",
                        e.aggregate
                    )),
                    Some(_) => {}
                }
            }
            "booking.confirmed" => *confirmed_per_booking.entry(e.aggregate).or_default() += 1,
            _ => {}
        }
    }
    for r in &s.settlements {
        match recorded_per_settlement.get(&r.id).copied().unwrap_or(0) {
            1 => {}
            n => problems.push(format!(
                "settlement {} (booking {}): {n} settlement.recorded events",
                r.id, r.booking
            )),
        }
    }
    for b in &settled_bookings {
        match confirmed_per_booking.get(b).copied().unwrap_or(0) {
            1 => {}
            n => problems.push(format!("settled booking {b}: {n} booking.confirmed events")),
        }
    }
    for b in confirmed_per_booking.keys() {
        if !settled_bookings.contains(b) {
            problems.push(format!("booking.confirmed for unsettled booking {b}"));
        }
    }
    problems.sort();
    problems
}

/// Settlements = the approved-and-allowed bookings, once each, with one
/// event of each kind.
pub fn settlements_once_each(s: &EndState<'_>) -> Check {
    let (tally, missing, extra) = settlements_tally(s);
    let problems = settlement_event_problems(s);
    let count = |topic: &str| s.outbox.iter().filter(|e| e.topic == topic).count();
    check(
        "settlements = approved-and-allowed payments, one event each",
        tally.lost == 0 && tally.unexpected == 0 && tally.duplicated == 0 && problems.is_empty(),
        format!(
            "expected {}, found {} ({} missing [{}], {} unexpected [{}], {} bookings settled twice); settlement.recorded events {}; booking.confirmed events {}; {} event problems [{}]",
            tally.expected,
            s.settlements.len(),
            missing.len(),
            sample(&missing),
            extra.len(),
            sample(&extra),
            tally.duplicated,
            count("settlement.recorded"),
            count("booking.confirmed"),
            problems.len(),
            sample(&problems)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::super::end_state::{
        SettlementRow,
        fixture::{Fixture, booking, journey, outbox},
    };
    use super::*;

    #[test]
    fn a_booking_lost_doubled_or_unknown_fails_and_is_counted() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let f = Fixture::new(vec![
            journey(1, a, None),
            journey(2, b, None),
            journey(3, c, None),
        ]);
        let mut s = f.state();
        s.bookings = vec![
            booking("CHAOS-0000001", a, "PENDING"),
            booking("CHAOS-0000002", b, "PENDING"),
            booking("CHAOS-0000003", c, "PENDING"),
        ];
        assert!(acknowledged_bookings_stored_once(&s).passed);
        assert_eq!(bookings_tally(&s).0.ok, 3);

        // Lost: journey 3's row is gone; doubled: journey 2 twice; a row
        // no journey knows of.
        s.bookings.pop();
        s.bookings
            .push(booking("CHAOS-0000002", Uuid::new_v4(), "PENDING"));
        s.bookings
            .push(booking("CHAOS-9999999", Uuid::new_v4(), "PENDING"));
        let c = acknowledged_bookings_stored_once(&s);
        assert!(!c.passed);
        assert!(c.detail.contains("2 wrong"), "{}", c.detail);
        assert!(c.detail.contains("CHAOS-9999999"), "{}", c.detail);
        let t = bookings_tally(&s).0;
        assert_eq!(
            (t.expected, t.ok, t.lost, t.duplicated, t.unexpected),
            (3, 1, 1, 1, 1)
        );
    }

    #[test]
    fn a_booking_of_unknown_fate_may_exist_or_not() {
        let a = Uuid::new_v4();
        let mut j = journey(1, a, None);
        j.booking = BookingOutcome::Unknown;
        j.indeterminate = true;
        let f = Fixture::new(vec![j]);
        let mut s = f.state();
        assert!(acknowledged_bookings_stored_once(&s).passed);
        s.bookings = vec![booking("CHAOS-0000001", a, "PENDING")];
        assert!(acknowledged_bookings_stored_once(&s).passed);
    }

    #[test]
    fn a_payment_told_failed_must_not_exist_nor_its_key() {
        let (a, p) = (Uuid::new_v4(), Uuid::new_v4());
        let mut j = journey(1, a, None);
        j.told_failed = Some((Step::Payment, "k-pay".into()));
        let f = Fixture::new(vec![j]);
        let mut s = f.state();
        assert!(nothing_stored_for_failed_requests(&s).passed);
        s.payments = vec![EntityRow {
            id: p,
            booking: a,
            status: "PENDING".into(),
        }];
        let c = nothing_stored_for_failed_requests(&s);
        assert!(
            !c.passed && c.detail.contains("CHAOS-0000001 Payment"),
            "{}",
            c.detail
        );
        s.payments.clear();
        s.keys = vec![super::super::end_state::KeyRow {
            client: "chaos".into(),
            key: "k-pay".into(),
            status: None,
            body: None,
        }];
        let c = nothing_stored_for_failed_requests(&s);
        assert!(
            !c.passed && c.detail.contains("1 of their keys"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn a_planted_invalid_booking_must_not_be_stored() {
        let mut j = journey(1, Uuid::new_v4(), None);
        j.booking = BookingOutcome::Invalid;
        let f = Fixture::new(vec![j]);
        let mut s = f.state();
        assert!(nothing_stored_for_failed_requests(&s).passed);
        s.bookings = vec![booking("CHAOS-0000001", Uuid::new_v4(), "PENDING")];
        assert!(!nothing_stored_for_failed_requests(&s).passed);
    }

    #[test]
    fn entity_states_follow_what_the_client_was_told() {
        let (a, p) = (Uuid::new_v4(), Uuid::new_v4());
        let f = Fixture::new(vec![journey(1, a, Some(p))]);
        let mut s = f.state();
        s.bookings = vec![booking("CHAOS-0000001", a, "CONFIRMED")];
        s.payments = vec![EntityRow {
            id: p,
            booking: a,
            status: "APPROVED".into(),
        }];
        assert!(entities_in_acknowledged_state(&s).passed);
        // Paid and approved, so it must be CONFIRMED.
        s.bookings[0].status = "PENDING".into();
        let c = entities_in_acknowledged_state(&s);
        assert!(
            !c.passed && c.detail.contains("not CONFIRMED"),
            "{}",
            c.detail
        );
        s.bookings[0].status = "CONFIRMED".into();
        // An approval nobody asked for.
        s.approvals = vec![EntityRow {
            id: Uuid::new_v4(),
            booking: a,
            status: "PENDING".into(),
        }];
        let c = entities_in_acknowledged_state(&s);
        assert!(
            !c.passed && c.detail.contains("approval unexpected"),
            "{}",
            c.detail
        );
    }

    fn settled(s: &mut EndState<'_>, booking: Uuid) -> Uuid {
        let id = Uuid::new_v4();
        s.settlements.push(SettlementRow { id, booking });
        let seq = s.outbox.len() as i64 + 1;
        let mut recorded = outbox(seq, id, "settlement.recorded");
        recorded.booking = Some(booking.to_string());
        s.outbox.push(recorded);
        s.outbox.push(outbox(seq + 1, booking, "booking.confirmed"));
        id
    }

    #[test]
    fn settlements_once_each_with_their_events() {
        let (a, b, p) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        // a must settle; b was never paid.
        let f = Fixture::new(vec![journey(1, a, Some(p)), journey(2, b, None)]);
        let mut s = f.state();
        settled(&mut s, a);
        assert!(
            settlements_once_each(&s).passed,
            "{}",
            settlements_once_each(&s).detail
        );

        // Settled twice: counted as duplicated, and its events are wrong.
        let mut twice = f.state();
        settled(&mut twice, a);
        settled(&mut twice, a);
        let c = settlements_once_each(&twice);
        assert!(
            !c.passed && c.detail.contains("1 bookings settled twice"),
            "{}",
            c.detail
        );
        assert_eq!(settlements_tally(&twice).0.duplicated, 1);

        // b settled though never paid; a lost.
        let mut wrong = f.state();
        settled(&mut wrong, b);
        let t = settlements_tally(&wrong).0;
        assert_eq!((t.expected, t.ok, t.lost, t.unexpected), (1, 0, 1, 1));
        assert!(!settlements_once_each(&wrong).passed);

        // The event names another booking.
        let mut misnamed = f.state();
        settled(&mut misnamed, a);
        misnamed.outbox[0].booking = Some(b.to_string());
        let c = settlements_once_each(&misnamed);
        assert!(
            !c.passed && c.detail.contains("names booking"),
            "{}",
            c.detail
        );

        // booking.confirmed missing.
        let mut unconfirmed = f.state();
        settled(&mut unconfirmed, a);
        unconfirmed.outbox.pop();
        let c = settlements_once_each(&unconfirmed);
        assert!(
            !c.passed && c.detail.contains("0 booking.confirmed"),
            "{}",
            c.detail
        );
    }
}
