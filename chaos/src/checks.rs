//! After the load: waiting for the fleet to drain, then checking the end
//! state (database, broker queues, webhook receiver, `workers integrity
//! --once`) against what the load generator was told. Table and column
//! names are those of `migrations/`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    process::Command,
    time::{Duration, Instant},
};

use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    Error,
    faults::rabbitmqctl,
    load::{BookingOutcome, Journey, LoadResult, Stats, Step},
    receiver::{Receiver, Snapshot},
    report::Check,
};

/// Messages in each queue of the vhost (ready + unacknowledged).
pub async fn queue_depths(vhost: &str) -> Result<BTreeMap<String, i64>, String> {
    let out = rabbitmqctl(&[
        "-q",
        "list_queues",
        "-p",
        vhost,
        "--no-table-headers",
        "name",
        "messages",
    ])
    .await?;
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(name), Some(n)) = (parts.next(), parts.next())
            && let Ok(n) = n.parse::<i64>()
        {
            m.insert(name.to_owned(), n);
        }
    }
    Ok(m)
}

fn is_dlq(name: &str) -> bool {
    name.ends_with(".dlq")
}

/// Worker queues and their retry queues: what must drain to zero.
fn is_work_queue(name: &str) -> bool {
    !is_dlq(name) && name != entrip_common::amqp::UNROUTED && name.starts_with("entrip.")
}

/// The (subscriber, event id) pairs that must reach the receiver, from the
/// outbox.
async fn expected_webhooks(
    pool: &PgPool,
    receiver: &Receiver,
) -> Result<HashSet<(String, String)>, Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, topic FROM outbox")
        .fetch_all(pool)
        .await?;
    let mut want = HashSet::new();
    for (id, topic) in rows {
        for s in &receiver.subscribers {
            if s.wants(&topic) {
                want.insert((s.name.clone(), id.to_string()));
            }
        }
    }
    Ok(want)
}

async fn scalar(pool: &PgPool, sql: &'static str) -> Result<i64, Error> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

/// What the drain saw last.
#[derive(Debug, Default)]
pub struct DrainState {
    pub undelivered: i64,
    pub work_messages: i64,
    pub settlements: i64,
    pub webhooks_missing: usize,
    pub drained: bool,
}

/// Waits until the outbox is delivered, the worker queues are empty, the
/// expected settlements exist and every expected webhook arrived (twice in a
/// row), or until `deadline`.
pub async fn drain(
    pool: &PgPool,
    vhost: &str,
    receiver: &Receiver,
    expected_settlements: i64,
    deadline: Duration,
) -> DrainState {
    let until = Instant::now() + deadline;
    let mut state = DrainState::default();
    let mut good_in_a_row = 0;
    let mut last_log = Instant::now();
    while Instant::now() < until {
        let undelivered = scalar(
            pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND dead_at IS NULL",
        )
        .await;
        let settlements = scalar(pool, "SELECT count(*) FROM settlements").await;
        let depths = queue_depths(vhost).await;
        let want = expected_webhooks(pool, receiver).await;
        if let (Ok(u), Ok(s), Ok(d), Ok(w)) = (undelivered, settlements, depths, want) {
            let seen = receiver.snapshot();
            state.undelivered = u;
            state.settlements = s;
            state.work_messages = d
                .iter()
                .filter(|(k, _)| is_work_queue(k))
                .map(|(_, v)| *v)
                .sum();
            state.webhooks_missing = w.iter().filter(|k| !seen.counts.contains_key(*k)).count();
            let good = u == 0
                && state.work_messages == 0
                && s >= expected_settlements
                && state.webhooks_missing == 0;
            good_in_a_row = if good { good_in_a_row + 1 } else { 0 };
            if good_in_a_row >= 2 {
                state.drained = true;
                return state;
            }
            if last_log.elapsed() > Duration::from_secs(5) {
                tracing::info!(
                    undelivered = u,
                    queued = state.work_messages,
                    settlements = s,
                    expected_settlements,
                    webhooks_missing = state.webhooks_missing,
                    "draining"
                );
                last_log = Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    state
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

/// Everything the checks read, gathered once.
pub struct Inputs<'a> {
    pub pool: &'a PgPool,
    pub vhost: &'a str,
    pub receiver: &'a Receiver,
    pub load: &'a LoadResult,
    /// `workers integrity --once`, ready to run.
    pub integrity: Command,
    /// When faults hit the workers' work in flight.
    pub worker_hits: &'a [Instant],
}

/// Runs every check; fills `totals` with the figures.
pub async fn run_checks(
    inp: Inputs<'_>,
    totals: &mut BTreeMap<String, u64>,
) -> Result<Vec<Check>, Error> {
    let pool = inp.pool;
    let journeys = &inp.load.journeys;
    let mut checks = Vec::new();

    // ---- what the database holds
    let bookings: Vec<(String, Uuid, String)> =
        sqlx::query_as("SELECT code, id, status FROM bookings")
            .fetch_all(pool)
            .await?;
    let mut by_code: HashMap<&str, Vec<(Uuid, &str)>> = HashMap::new();
    for (code, id, status) in &bookings {
        by_code
            .entry(code.as_str())
            .or_default()
            .push((*id, status.as_str()));
    }
    let payments: Vec<(Uuid, Uuid, String)> =
        sqlx::query_as("SELECT id, booking_id, status FROM payments")
            .fetch_all(pool)
            .await?;
    let approvals: Vec<(Uuid, Uuid, String)> =
        sqlx::query_as("SELECT id, booking_id, status FROM approvals")
            .fetch_all(pool)
            .await?;
    let mut pay_of: HashMap<Uuid, Vec<(Uuid, &str)>> = HashMap::new();
    for (id, b, s) in &payments {
        pay_of.entry(*b).or_default().push((*id, s.as_str()));
    }
    let mut appr_of: HashMap<Uuid, Vec<(Uuid, &str)>> = HashMap::new();
    for (id, b, s) in &approvals {
        appr_of.entry(*b).or_default().push((*id, s.as_str()));
    }
    let settlements: Vec<(Uuid,)> = sqlx::query_as("SELECT booking_id FROM settlements")
        .fetch_all(pool)
        .await?;

    // ---- 1. every acknowledged booking stored exactly once, with its id
    let acked: Vec<&Journey> = journeys
        .iter()
        .filter(|j| j.booking_id().is_some())
        .collect();
    let mut wrong = Vec::new();
    for j in &acked {
        let rows = by_code.get(j.code.as_str()).cloned().unwrap_or_default();
        if rows.len() != 1 || Some(rows[0].0) != j.booking_id() {
            wrong.push(format!("{} ({} rows)", j.code, rows.len()));
        }
    }
    let known: HashSet<&str> = journeys
        .iter()
        .filter(|j| j.booking_id().is_some() || j.indeterminate)
        .map(|j| j.code.as_str())
        .collect();
    let unexpected: Vec<&str> = bookings
        .iter()
        .map(|(c, _, _)| c.as_str())
        .filter(|c| !known.contains(c))
        .collect();
    checks.push(check(
        "acknowledged bookings stored exactly once",
        wrong.is_empty() && unexpected.is_empty(),
        format!(
            "{} acknowledged, {} stored, {} wrong [{}], {} stored without acknowledgement [{}]",
            acked.len(),
            bookings.len(),
            wrong.len(),
            sample(&wrong),
            unexpected.len(),
            sample(&unexpected)
        ),
    ));

    // ---- 2. nothing stored for what the client was told failed or refused
    let mut stored_anyway = Vec::new();
    let mut told_failed_by_step: BTreeMap<String, u64> = BTreeMap::new();
    let mut told_keys = Vec::new();
    for j in journeys {
        let Some((step, key)) = &j.told_failed else {
            continue;
        };
        *told_failed_by_step.entry(format!("{step:?}")).or_default() += 1;
        told_keys.push(key.clone());
        let b = j.booking_id();
        let leaked = match step {
            Step::Booking => by_code.contains_key(j.code.as_str()),
            Step::Payment => b.is_some_and(|b| pay_of.contains_key(&b)),
            Step::PaymentResult => j
                .payment
                .is_some_and(|p| payments.iter().any(|(id, _, s)| *id == p && s != "PENDING")),
            Step::Approval => b.is_some_and(|b| appr_of.contains_key(&b)),
            Step::Decision => j.approval.is_some_and(|a| {
                approvals
                    .iter()
                    .any(|(id, _, s)| *id == a && s != "PENDING")
            }),
        };
        if leaked {
            stored_anyway.push(format!("{} {step:?}", j.code));
        }
    }
    let keys_stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE key = ANY($1)")
            .bind(&told_keys)
            .fetch_one(pool)
            .await?;
    let invalid: Vec<&str> = journeys
        .iter()
        .filter(|j| j.booking == BookingOutcome::Invalid)
        .map(|j| j.code.as_str())
        .chain(journeys.iter().filter_map(|j| j.misuse_code.as_deref()))
        .collect();
    let invalid_stored: Vec<&str> = invalid
        .iter()
        .copied()
        .filter(|c| by_code.contains_key(c))
        .collect();
    checks.push(check(
        "nothing stored for requests told failed (5xx) or refused (422)",
        stored_anyway.is_empty() && keys_stored == 0 && invalid_stored.is_empty(),
        format!(
            "told failed {} {told_failed_by_step:?}: {} stored anyway [{}], {keys_stored} of their keys stored; planted 422s {}: {} stored [{}]",
            told_keys.len(),
            stored_anyway.len(),
            sample(&stored_anyway),
            invalid.len(),
            invalid_stored.len(),
            sample(&invalid_stored)
        ),
    ));

    // ---- 3. the client got definitive, consistent answers
    let st = &inp.load.stats;
    let gave_up = Stats::get(&st.gave_up);
    let unexpected_answers = Stats::get(&st.unexpected_answers);
    let mismatches = Stats::get(&st.replay_mismatches);
    checks.push(check(
        "definitive answers and identical replays",
        gave_up == 0 && unexpected_answers == 0 && mismatches == 0,
        format!(
            "{} requests, {} retries, {} replays: {mismatches} differed; {gave_up} gave up; {unexpected_answers} unexpected answers",
            Stats::get(&st.requests),
            Stats::get(&st.retries),
            Stats::get(&st.replays)
        ),
    ));

    // The contract: 500 only for a fault of the service itself; a database
    // or broker away is a 503 with Retry-After.
    let by_status = st.by_status();
    let internal = by_status.get("500").copied().unwrap_or(0);
    checks.push(check(
        "no 500 answers (infrastructure faults are 503)",
        internal == 0,
        format!(
            "{internal} answers 500, {} answers 503",
            by_status.get("503").copied().unwrap_or(0)
        ),
    ));

    // ---- 4. each journey's entities in the state the client was told
    let mut wrong_state = Vec::new();
    for j in journeys.iter().filter(|j| !j.indeterminate) {
        let Some(b) = j.booking_id() else { continue };
        let status = by_code
            .get(j.code.as_str())
            .and_then(|r| r.first())
            .map(|r| r.1);
        let want_status = if j.expect_settled() {
            "CONFIRMED"
        } else {
            "PENDING"
        };
        if status != Some(want_status) {
            wrong_state.push(format!("{} booking {status:?} not {want_status}", j.code));
        }
        let pays = pay_of.get(&b).cloned().unwrap_or_default();
        match j.payment {
            Some(p) => {
                let want = j.payment_status.as_deref().unwrap_or("PENDING");
                if pays.len() != 1 || pays[0].0 != p || pays[0].1 != want {
                    wrong_state.push(format!("{} payment {pays:?} not {p} {want}", j.code));
                }
            }
            None if !pays.is_empty() => {
                wrong_state.push(format!("{} unexpected payment {pays:?}", j.code));
            }
            None => {}
        }
        let apprs = appr_of.get(&b).cloned().unwrap_or_default();
        match j.approval {
            Some(a) => {
                let want = j.approval_status.as_deref().unwrap_or("PENDING");
                if apprs.len() != 1 || apprs[0].0 != a || apprs[0].1 != want {
                    wrong_state.push(format!("{} approval {apprs:?} not {a} {want}", j.code));
                }
            }
            None if !apprs.is_empty() => {
                wrong_state.push(format!("{} unexpected approval {apprs:?}", j.code));
            }
            None => {}
        }
    }
    checks.push(check(
        "bookings, payments and approvals in the acknowledged state",
        wrong_state.is_empty(),
        format!(
            "{} journeys checked, {} wrong [{}]",
            journeys.iter().filter(|j| !j.indeterminate).count(),
            wrong_state.len(),
            sample(&wrong_state)
        ),
    ));

    // ---- 5. settlements = the approved-and-allowed bookings, once each
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
    let found: Vec<Uuid> = settlements.iter().map(|r| r.0).collect();
    let found_set: HashSet<Uuid> = found.iter().copied().collect();
    let missing: Vec<Uuid> = expected.difference(&found_set).copied().collect();
    let extra: Vec<Uuid> = found_set
        .difference(&expected)
        .filter(|b| !indeterminate.contains(b))
        .copied()
        .collect();
    let recorded = scalar(
        pool,
        "SELECT count(*) FROM outbox WHERE topic = 'settlement.recorded'",
    )
    .await?;
    let recorded_distinct = scalar(
        pool,
        "SELECT count(DISTINCT payload->'data'->>'bookingId') FROM outbox WHERE topic = 'settlement.recorded'",
    )
    .await?;
    let confirmed_events = scalar(
        pool,
        "SELECT count(*) FROM outbox WHERE topic = 'booking.confirmed'",
    )
    .await?;
    let n_found = found.len() as i64;
    checks.push(check(
        "settlements = approved-and-allowed payments, one event each",
        missing.is_empty()
            && extra.is_empty()
            && found.len() == found_set.len()
            && recorded == n_found
            && confirmed_events == n_found,
        format!(
            "expected {}, found {} ({} missing [{}], {} unexpected [{}]); settlement.recorded events {recorded} ({recorded_distinct} distinct bookings), booking.confirmed events {confirmed_events}",
            expected.len(),
            found.len(),
            missing.len(),
            sample(&missing),
            extra.len(),
            sample(&extra)
        ),
    ));

    // ---- 6. outbox: every event published, none dead; inbox without duplicates
    let events = scalar(pool, "SELECT count(*) FROM outbox").await?;
    let unpublished = scalar(
        pool,
        "SELECT count(*) FROM outbox WHERE published_at IS NULL",
    )
    .await?;
    let dead = scalar(
        pool,
        "SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL",
    )
    .await?;
    checks.push(check(
        "outbox: every event published, none dead",
        unpublished == 0 && dead == 0,
        format!("{events} events, {unpublished} unpublished, {dead} dead"),
    ));
    let inbox = scalar(pool, "SELECT count(*) FROM inbox").await?;
    let inbox_distinct = scalar(
        pool,
        "SELECT count(*) FROM (SELECT DISTINCT consumer, message_id FROM inbox) t",
    )
    .await?;
    checks.push(check(
        "inbox: each message applied once",
        inbox == inbox_distinct,
        format!("{inbox} inbox rows, {inbox_distinct} distinct (consumer, message)"),
    ));

    // ---- 7. webhooks: every (event, subscriber) received, duplicates counted
    let want = expected_webhooks(pool, inp.receiver).await?;
    let seen: Snapshot = inp.receiver.snapshot();
    let mut missing_hooks: Vec<String> = want
        .iter()
        .filter(|k| !seen.counts.contains_key(*k))
        .map(|(s, id)| format!("{s}:{id}"))
        .collect();
    missing_hooks.sort();
    let unexpected_hooks: Vec<String> = seen
        .counts
        .keys()
        .filter(|k| !want.contains(*k))
        .map(|(s, id)| format!("{s}:{id}"))
        .collect();
    let received: u64 = seen.counts.values().sum();
    let duplicates: u64 = seen.counts.values().map(|n| n.saturating_sub(1)).sum();
    let pairs_with_dup = seen.counts.values().filter(|n| **n > 1).count();
    checks.push(check(
        "webhooks: every (event, subscriber) received at least once, signed",
        missing_hooks.is_empty() && unexpected_hooks.is_empty() && seen.bad_signatures == 0,
        format!(
            "{} expected, {} received distinct ({received} deliveries, {duplicates} duplicate copies); {} missing [{}]; {} not expected [{}]; {} bad signatures",
            want.len(),
            seen.counts.len(),
            missing_hooks.len(),
            sample(&missing_hooks),
            unexpected_hooks.len(),
            sample(&unexpected_hooks),
            seen.bad_signatures
        ),
    ));
    // A second copy is expected only when the worker lost its record of the
    // 2xx: killed, or its database connection terminated, right after the
    // first copy arrived (the POST takes at most the 2 s webhook timeout).
    let unexplained: Vec<String> = seen
        .counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .filter(|(k, _)| {
            let Some(first) = seen.first_seen.get(*k) else {
                return true;
            };
            !inp.worker_hits.iter().any(|hit| {
                let (a, b) = (*first, *hit);
                let gap = if b >= a { b - a } else { a - b };
                (b >= a && gap <= Duration::from_secs(3))
                    || (b < a && gap <= Duration::from_millis(2500))
            })
        })
        .map(|((s, id), n)| format!("{s}:{id} x{n}"))
        .collect();
    // A worker whose webhook timeout fires after the receiver accepted (a
    // starved machine) also sends a second copy, indistinguishable from
    // here: a few are tolerated, a pattern is not.
    let tolerated = (want.len() / 100).max(3);
    checks.push(check(
        "duplicate webhooks only where a worker lost its record",
        unexplained.len() <= tolerated,
        format!(
            "{duplicates} duplicate copies over {pairs_with_dup} pairs; {} without a workers SIGKILL or terminated connection at that moment (at most {tolerated} tolerated: a webhook timeout after the receiver's 2xx looks the same) [{}]",
            unexplained.len(),
            sample(&unexplained)
        ),
    ));
    let deliveries: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM notification_deliveries GROUP BY status ORDER BY status",
    )
    .fetch_all(pool)
    .await?;
    let delivered = deliveries
        .iter()
        .find(|(s, _)| s == "DELIVERED")
        .map_or(0, |r| r.1);
    let not_delivered: i64 = deliveries
        .iter()
        .filter(|(s, _)| s != "DELIVERED")
        .map(|r| r.1)
        .sum();
    checks.push(check(
        "notification_deliveries: every pair DELIVERED",
        not_delivered == 0 && delivered == want.len() as i64,
        format!("{deliveries:?}; {} expected pairs", want.len()),
    ));

    // ---- 8. broker: worker queues and DLQs empty
    match queue_depths(inp.vhost).await {
        Ok(depths) => {
            let dlq: Vec<String> = depths
                .iter()
                .filter(|(k, v)| is_dlq(k) && **v != 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let queued: Vec<String> = depths
                .iter()
                .filter(|(k, v)| is_work_queue(k) && **v != 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let dlq_names: Vec<&String> = depths.keys().filter(|k| is_dlq(k)).collect();
            checks.push(check(
                "broker: worker queues and DLQs empty",
                dlq.is_empty() && queued.is_empty() && !dlq_names.is_empty(),
                format!(
                    "{} queues; non-empty DLQs [{}]; non-empty work queues [{}]",
                    depths.len(),
                    dlq.join(", "),
                    queued.join(", ")
                ),
            ));
        }
        Err(e) => checks.push(check("broker: worker queues and DLQs empty", false, e)),
    }

    // ---- 9. the fleet's own integrity checker
    let mut integrity = tokio::process::Command::from(inp.integrity);
    integrity.kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(120), integrity.output()).await {
        Ok(Ok(out)) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let last: Vec<&str> = text.lines().rev().take(3).collect();
            checks.push(check(
                "workers integrity --once exits 0",
                out.status.success(),
                format!(
                    "{}: {}",
                    out.status,
                    last.into_iter().rev().collect::<Vec<_>>().join(" / ")
                ),
            ));
        }
        Ok(Err(e)) => checks.push(check(
            "workers integrity --once exits 0",
            false,
            format!("cannot run: {e}"),
        )),
        Err(_) => checks.push(check(
            "workers integrity --once exits 0",
            false,
            "did not finish in 120 s".into(),
        )),
    }

    // ---- figures
    let mut put = |k: &str, v: u64| {
        totals.insert(k.to_owned(), v);
    };
    put("journeys", journeys.len() as u64);
    put("users", inp.load.users.len() as u64);
    put(
        "requests sent (with retries and replays)",
        Stats::get(&st.requests),
    );
    put("retries (same key and body)", Stats::get(&st.retries));
    put(
        "client timeouts and connection errors",
        Stats::get(&st.timeouts),
    );
    put(
        "first attempts with a planted few-ms timeout",
        Stats::get(&st.planted_timeouts),
    );
    put("5xx answers", Stats::get(&st.server_errors));
    put("replays of answered requests", Stats::get(&st.replays));
    put("requests given up", gave_up);
    put("bookings acknowledged", acked.len() as u64);
    put("bookings stored", bookings.len() as u64);
    put(
        "requests told failed (5xx, abandoned)",
        told_keys.len() as u64,
    );
    put(
        "bookings told failed",
        told_failed_by_step.get("Booking").copied().unwrap_or(0),
    );
    put("planted 422 requests", invalid.len() as u64);
    put(
        "journeys indeterminate (gave up / unexpected answer)",
        journeys.iter().filter(|j| j.indeterminate).count() as u64,
    );
    put("settlements expected", expected.len() as u64);
    put("settlements found", found.len() as u64);
    put("events (outbox rows)", events.max(0) as u64);
    put("webhooks expected (event, subscriber)", want.len() as u64);
    put("webhooks received (deliveries)", received);
    put("webhooks duplicate copies", duplicates);
    put(
        "webhook duplicates not at a worker kill or terminated connection",
        unexplained.len() as u64,
    );
    put("webhook answers 500 (fault window)", seen.answered_500);
    put("webhook requests held (hang window)", seen.hung);
    Ok(checks)
}
