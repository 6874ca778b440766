//! After the load: waiting for the fleet to drain, then checking the end
//! state (database, broker queues, the chaos-owned tap queue,
//! `entrip.ingest.dlq`, ingest's AMQP counters, webhook receiver, `workers
//! integrity --once`) against what the load generator was told, over HTTP
//! and over AMQP, and what the broker carried. Table and column names are
//! those of `migrations/`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    process::Command,
    time::{Duration, Instant},
};

use lapin::{options::QueueDeclareOptions, types::FieldTable};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    Error,
    faults::{Fault, Hit, rabbitmqctl},
    ingest_metrics::IngestCounts,
    load::{BookingOutcome, Journey, LoadResult, Response, Stats, Step, Told, Transport},
    receiver::{Receiver, Snapshot, topic_matches},
    report::Check,
    tap::TapLog,
    upstream::IngestDlq,
};

/// The settlement consumer's name in table `inbox` (`CONSUMER` in
/// workers/src/settlement.rs). The notifications consumer keeps no inbox rows
/// (it dedupes by `notification_deliveries`), so it has no inbox check.
pub const SETTLEMENT_CONSUMER: &str = "settlement";

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

/// Ingest's DLQ: planted poison belongs there (its own check judges it).
fn is_ingest_dlq(name: &str) -> bool {
    name == entrip_common::amqp::dlq_name(entrip_common::amqp::INGEST_QUEUE)
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

/// Ready messages of some queues, by passive declares over one AMQP
/// connection: cheap enough to poll every few hundred milliseconds, where a
/// `rabbitmqctl` call starts an Erlang VM (over a second of CPU, which a
/// busy machine does not have to spare). It does not count messages
/// delivered and not yet acknowledged, so [`drain`] confirms with
/// [`queue_depths`] before it calls the fleet drained.
struct ReadyProbe {
    url: String,
    conn: Option<lapin::Connection>,
}

impl ReadyProbe {
    async fn ready(&mut self, names: &[String]) -> Result<i64, String> {
        let conn = match self.conn.take() {
            Some(c) if c.status().connected() => c,
            _ => crate::broker_connect(&self.url, "entrip-chaos-drain")
                .await
                .map_err(|e| format!("connect: {e}"))?,
        };
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| format!("channel: {e}"))?;
        let mut total = 0;
        for name in names {
            let q = channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("passive declare of {name}: {e}"))?;
            total += i64::from(q.message_count());
        }
        let _ = channel.close(200, "probed".into()).await;
        self.conn = Some(conn);
        Ok(total)
    }

    async fn close(self) {
        if let Some(c) = self.conn {
            let _ = c.close(200, "drain over".into()).await;
        }
    }
}

/// What the drain saw last.
#[derive(Debug, Default)]
pub struct DrainState {
    pub undelivered: i64,
    /// Messages in the worker and retry queues (ready and unacknowledged,
    /// from the last `rabbitmqctl` confirmation; ready only while polling).
    pub work_messages: i64,
    pub settlements: i64,
    pub webhooks_missing: usize,
    pub drained: bool,
    /// How long nothing moved when the drain ended.
    pub still_for: Duration,
}

/// The figures whose movement is the fleet's progress while it drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DrainFigures {
    undelivered: i64,
    published: i64,
    work_messages: i64,
    settlements: i64,
    webhooks_missing: usize,
    webhooks_received: u64,
}

/// Waits until the outbox is delivered, the worker queues are empty, the
/// expected settlements exist and every expected webhook arrived (twice in a
/// row, then confirmed with `rabbitmqctl`, which counts unacknowledged
/// messages too). It gives up only when none of those figures has moved
/// for `stall`: a busy machine drains slowly, a stuck fleet does not drain
/// at all, and a fixed deadline cannot tell the two apart.
pub async fn drain(
    pool: &PgPool,
    vhost: &str,
    amqp_url: &str,
    receiver: &Receiver,
    expected_settlements: i64,
    stall: Duration,
) -> DrainState {
    let mut state = DrainState::default();
    // The queue names from the broker itself (retry queues included).
    let names: Vec<String> = match queue_depths(vhost).await {
        Ok(d) => d.into_keys().filter(|k| is_work_queue(k)).collect(),
        Err(e) => {
            tracing::warn!("drain: cannot list the queues: {e}");
            Vec::new()
        }
    };
    let mut probe = ReadyProbe {
        url: amqp_url.to_owned(),
        conn: None,
    };
    let mut last: Option<DrainFigures> = None;
    // Messages held unacknowledged at the last confirmation.
    let mut last_held: Option<i64> = None;
    let mut moved_at = Instant::now();
    let mut good_in_a_row = 0;
    let mut last_log = Instant::now();
    loop {
        let undelivered = scalar(
            pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND dead_at IS NULL",
        )
        .await;
        let published = scalar(
            pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        )
        .await;
        let settlements = scalar(pool, "SELECT count(*) FROM settlements").await;
        let ready = probe.ready(&names).await;
        let want = expected_webhooks(pool, receiver).await;
        match (undelivered, published, settlements, ready, want) {
            (Ok(u), Ok(p), Ok(s), Ok(r), Ok(w)) => {
                let seen = receiver.snapshot();
                let figures = DrainFigures {
                    undelivered: u,
                    published: p,
                    work_messages: r,
                    settlements: s,
                    webhooks_missing: w.iter().filter(|k| !seen.counts.contains_key(*k)).count(),
                    webhooks_received: seen.counts.values().sum(),
                };
                if last != Some(figures) {
                    moved_at = Instant::now();
                    last = Some(figures);
                }
                state.undelivered = u;
                state.settlements = s;
                state.work_messages = r;
                state.webhooks_missing = figures.webhooks_missing;
                let good =
                    u == 0 && r == 0 && s >= expected_settlements && figures.webhooks_missing == 0;
                good_in_a_row = if good { good_in_a_row + 1 } else { 0 };
            }
            (u, p, s, r, w) => {
                good_in_a_row = 0;
                tracing::warn!(
                    "drain: cannot read the figures: {:?} {:?} {:?} {:?} {:?}",
                    u.err(),
                    p.err(),
                    s.err(),
                    r.err(),
                    w.err()
                );
            }
        }
        if good_in_a_row >= 2 {
            match queue_depths(vhost).await {
                Ok(d) => {
                    let held: i64 = d
                        .iter()
                        .filter(|(k, _)| is_work_queue(k))
                        .map(|(_, v)| *v)
                        .sum();
                    state.work_messages = held;
                    if held == 0 {
                        state.drained = true;
                        break;
                    }
                    // Delivered, not acknowledged yet (redeliveries the
                    // workers find applied move no other figure): keep
                    // polling, and count their acknowledgement as progress.
                    tracing::info!("drain: {held} messages delivered and not acknowledged yet");
                    if last_held != Some(held) {
                        moved_at = Instant::now();
                        last_held = Some(held);
                    }
                    good_in_a_row = 0;
                }
                Err(e) => tracing::warn!("drain: cannot list the queues: {e}"),
            }
        }
        state.still_for = moved_at.elapsed();
        if state.still_for >= stall {
            tracing::warn!(?last, "drain: nothing moved for {stall:?}; giving up");
            break;
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            tracing::info!(?last, expected_settlements, "draining");
            last_log = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    state.still_for = moved_at.elapsed();
    probe.close().await;
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
    pub hits: &'a [Hit],
    /// The workers' webhook timeout.
    pub webhook_timeout: Duration,
    /// What the chaos-owned tap queue held after the drain, or why it could
    /// not be read.
    pub tap: Result<&'a TapLog, &'a String>,
    /// The API client the load sent as (its idempotency keys' scope).
    pub api_client: &'a str,
    /// What `entrip.ingest.dlq` held after the drain, or why it could not
    /// be read.
    pub ingest_dlq: Result<&'a IngestDlq, &'a String>,
    /// Ingest's AMQP counters summed over its lives (see
    /// [`crate::ingest_metrics`]).
    pub ingest_counts: &'a IngestCounts,
    /// Lives of ingest whose counters could not be scraped.
    pub ingest_scrape_missing: u64,
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
    let mut told_failed_by_step: BTreeMap<Step, u64> = BTreeMap::new();
    let mut told_keys = Vec::new();
    for j in journeys {
        let Some((step, key)) = &j.told_failed else {
            continue;
        };
        *told_failed_by_step.entry(*step).or_default() += 1;
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
    let internal = by_status.get(&Response::Status(500)).copied().unwrap_or(0);
    checks.push(check(
        "no 500 answers (infrastructure faults are 503)",
        internal == 0,
        format!(
            "{internal} answers 500, {} answers 503",
            by_status.get(&Response::Status(503)).copied().unwrap_or(0)
        ),
    ));

    // ---- 3b. AMQP: every copy of a reply the same answer
    let extra = Stats::get(&st.amqp_extra_replies);
    let reply_mismatches = Stats::get(&st.amqp_reply_mismatches);
    let unknown_replies = Stats::get(&st.amqp_unknown_replies);
    checks.push(check(
        "AMQP: later replies (to resends, redeliveries) equal the first; none unknown",
        reply_mismatches == 0 && unknown_replies == 0,
        format!(
            "{} logical requests, {} messages published ({} resends after no reply within the patience window), {} replies ({} replayed); {extra} later replies, {reply_mismatches} of them different from the first; {unknown_replies} replies to no request or without a status",
            Stats::get(&st.amqp_requests),
            Stats::get(&st.amqp_published),
            Stats::get(&st.amqp_resends),
            Stats::get(&st.amqp_replies),
            Stats::get(&st.amqp_replies_replayed),
        ),
    ));

    // ---- 3c. every request told 201/200 stored once, over its transport,
    // with the answer the client got
    let told: Vec<&Told> = journeys.iter().flat_map(|j| j.told.iter()).collect();
    let answered_keys: Vec<String> = told.iter().map(|t| t.key.clone()).collect();
    let stored_answers: HashMap<String, (i16, serde_json::Value)> =
        sqlx::query_as::<_, (String, Option<i16>, Option<serde_json::Value>)>(
            "SELECT key, response_status, response_body FROM idempotency_keys
          WHERE client = $1 AND key = ANY($2)",
        )
        .bind(inp.api_client)
        .bind(&answered_keys)
        .fetch_all(pool)
        .await?
        .into_iter()
        .filter_map(|(k, s, b)| Some((k, (s?, b?))))
        .collect();
    // Per key: (entity, channel, client) of each audit row.
    type AuditRow = (Uuid, Option<String>, Option<String>);
    let mut audit_of: HashMap<String, Vec<AuditRow>> = HashMap::new();
    let audit_rows: Vec<(String, Uuid, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT idempotency_key, entity_id, detail->>'channel', detail->>'client'
           FROM audit_log WHERE idempotency_key = ANY($1)",
    )
    .bind(&answered_keys)
    .fetch_all(pool)
    .await?;
    for (key, entity, channel, client) in audit_rows {
        audit_of
            .entry(key)
            .or_default()
            .push((entity, channel, client));
    }
    for via in [Transport::Amqp, Transport::Http] {
        let mine: Vec<&&Told> = told.iter().filter(|t| t.via == via).collect();
        let mut wrong = Vec::new();
        for t in &mine {
            let what = format!("{:?} {} {}", t.step, t.key, t.status);
            match stored_answers.get(&t.key) {
                None => wrong.push(format!("{what}: no stored answer")),
                Some((status, body))
                    if i32::from(*status) != i32::from(t.status) || *body != t.body =>
                {
                    wrong.push(format!("{what}: stored {status} {body}, told {}", t.body));
                }
                Some(_) => {}
            }
            let rows = audit_of.get(&t.key).map(Vec::as_slice).unwrap_or_default();
            match rows {
                [(entity, channel, client)] => {
                    if Some(*entity) != t.id() {
                        wrong.push(format!("{what}: audit row of {entity}, told {:?}", t.id()));
                    }
                    if channel.as_deref() != Some(via.channel()) {
                        wrong.push(format!("{what}: audit row over {channel:?}"));
                    }
                    if client.as_deref() != Some(inp.api_client) {
                        wrong.push(format!("{what}: audit row of client {client:?}"));
                    }
                }
                rows => wrong.push(format!("{what}: {} audit rows", rows.len())),
            }
        }
        let mut by_step: BTreeMap<Step, u64> = BTreeMap::new();
        for t in &mine {
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
        checks.push(check(
            name,
            wrong.is_empty(),
            format!(
                "{} requests {by_step:?}: each must have its stored answer equal to the one {answer} and one audit row (channel {:?}, client {:?}, the entity of the answer); {} wrong [{}]",
                mine.len(),
                via.channel(),
                inp.api_client,
                wrong.len(),
                sample(&wrong)
            ),
        ));
    }

    // ---- 3d. AMQP: entrip.ingest.dlq holds the planted poison, nothing else
    let poison = &inp.load.poison;
    let dlq_name = entrip_common::amqp::dlq_name(entrip_common::amqp::INGEST_QUEUE);
    let mut dlq_messages = 0u64;
    match inp.ingest_dlq {
        Ok(dlq) => {
            dlq_messages = dlq.messages.len() as u64;
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
            checks.push(check(
                "AMQP: entrip.ingest.dlq holds the planted poison (told 400) and nothing else",
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
            ));
        }
        Err(e) => checks.push(check(
            "AMQP: entrip.ingest.dlq holds the planted poison (told 400) and nothing else",
            false,
            format!("{dlq_name} could not be read: {e}"),
        )),
    }

    // ---- 3e. ingest's AMQP counters against the end state. Counts of a
    // life cut short after its last scrape are lost, so the sums are lower
    // bounds: each commit is counted `accepted` at most once, each dead
    // letter is in the DLQ.
    let amqp_commits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE detail->>'channel' = 'amqp' AND detail->>'client' = $1",
    )
    .bind(inp.api_client)
    .fetch_one(pool)
    .await?;
    let amqp_commits = amqp_commits.max(0) as u64;
    let counts = inp.ingest_counts;
    let accepted = counts.outcome("accepted");
    let dead_lettered = counts.outcome("dead_lettered");
    let amqp_stored = told.iter().filter(|t| t.via == Transport::Amqp).count();
    checks.push(check(
        "ingest metrics: AMQP outcomes consistent with the end state",
        accepted <= amqp_commits
            && (accepted > 0 || amqp_stored == 0)
            && (inp.ingest_dlq.is_err() || dead_lettered <= dlq_messages),
        format!(
            "entrip_ingest_messages_total summed over ingest's lives ({} of them not scraped): {:?}; accepted {accepted} ≤ {amqp_commits} AMQP commits (audit rows over amqp), and > 0 when any AMQP request was stored ({amqp_stored}); dead_lettered {dead_lettered} ≤ {dlq_messages} in the DLQ; reply failures {:?}",
            inp.ingest_scrape_missing, counts.messages, counts.reply_failures
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
    // One settlement.recorded event per settlement (its aggregate is the
    // settlement, its data names the booking) and one booking.confirmed
    // event per settled booking (its aggregate is the booking); none for
    // anything else.
    let settled: Vec<(Uuid, Uuid)> = sqlx::query_as("SELECT id, booking_id FROM settlements")
        .fetch_all(pool)
        .await?;
    let settlement_of: HashMap<Uuid, Uuid> = settled.iter().copied().collect();
    let settled_bookings: HashSet<Uuid> = settled.iter().map(|r| r.1).collect();
    let recorded_events: Vec<(Uuid, Option<String>)> = sqlx::query_as(
        "SELECT aggregate_id, payload->'data'->>'bookingId' FROM outbox WHERE topic = 'settlement.recorded'",
    )
    .fetch_all(pool)
    .await?;
    let confirmed_events: Vec<(Uuid,)> =
        sqlx::query_as("SELECT aggregate_id FROM outbox WHERE topic = 'booking.confirmed'")
            .fetch_all(pool)
            .await?;
    let mut recorded_per_settlement: HashMap<Uuid, u64> = HashMap::new();
    let mut recorded_bookings: HashSet<Uuid> = HashSet::new();
    let mut event_problems: Vec<String> = Vec::new();
    for (settlement, booking) in &recorded_events {
        *recorded_per_settlement.entry(*settlement).or_default() += 1;
        let booking = booking.as_deref().and_then(|b| Uuid::parse_str(b).ok());
        if let Some(b) = booking {
            recorded_bookings.insert(b);
        }
        match settlement_of.get(settlement) {
            None => event_problems.push(format!(
                "settlement.recorded for unknown settlement {settlement}"
            )),
            Some(b) if Some(*b) != booking => event_problems.push(format!(
                "settlement.recorded of {settlement} names booking {booking:?}, not {b}"
            )),
            Some(_) => {}
        }
    }
    for (id, booking) in &settled {
        match recorded_per_settlement.get(id).copied().unwrap_or(0) {
            1 => {}
            n => event_problems.push(format!(
                "settlement {id} (booking {booking}): {n} settlement.recorded events"
            )),
        }
    }
    let mut confirmed_per_booking: HashMap<Uuid, u64> = HashMap::new();
    for (b,) in &confirmed_events {
        *confirmed_per_booking.entry(*b).or_default() += 1;
    }
    for b in &settled_bookings {
        match confirmed_per_booking.get(b).copied().unwrap_or(0) {
            1 => {}
            n => event_problems.push(format!("settled booking {b}: {n} booking.confirmed events")),
        }
    }
    for b in confirmed_per_booking.keys() {
        if !settled_bookings.contains(b) {
            event_problems.push(format!("booking.confirmed for unsettled booking {b}"));
        }
    }
    let n_found = found.len();
    checks.push(check(
        "settlements = approved-and-allowed payments, one event each",
        missing.is_empty()
            && extra.is_empty()
            && found.len() == found_set.len()
            && recorded_bookings.len() == n_found
            && recorded_events.len() == n_found
            && confirmed_events.len() == n_found
            && event_problems.is_empty(),
        format!(
            "expected {}, found {n_found} ({} missing [{}], {} unexpected [{}]); settlement.recorded events {} for {} distinct bookings; booking.confirmed events {} for {} distinct bookings; {} event problems [{}]",
            expected.len(),
            missing.len(),
            sample(&missing),
            extra.len(),
            sample(&extra),
            recorded_events.len(),
            recorded_bookings.len(),
            confirmed_events.len(),
            confirmed_per_booking.len(),
            event_problems.len(),
            sample(&event_problems)
        ),
    ));

    // ---- 6. the broker's side: every event carried (a chaos-owned queue
    // bound with `#` saw it), first copies in commit order per aggregate;
    // the settlement consumer applied exactly its events
    let outbox_rows: Vec<(Uuid, i64, Uuid, String, bool, bool)> = sqlx::query_as(
        "SELECT id, seq, aggregate_id, topic, published_at IS NOT NULL, dead_at IS NOT NULL
           FROM outbox ORDER BY seq",
    )
    .fetch_all(pool)
    .await?;
    let events = outbox_rows.len() as i64;
    let dead = outbox_rows.iter().filter(|r| r.5).count();
    let unpublished = outbox_rows.iter().filter(|r| !r.4 && !r.5).count();
    let outbox_ids: HashSet<String> = outbox_rows.iter().map(|r| r.0.to_string()).collect();
    let mut tap_figures = TapFigures::default();
    match inp.tap {
        Ok(tap) => {
            let never_seen: Vec<String> = outbox_rows
                .iter()
                .map(|r| r.0.to_string())
                .filter(|id| !tap.copies.contains_key(id))
                .collect();
            let unknown: Vec<&String> = tap
                .copies
                .keys()
                .filter(|id| !outbox_ids.contains(*id))
                .collect();
            let mut duplicated: Vec<String> = tap
                .copies
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, n)| format!("{id} x{n}"))
                .collect();
            duplicated.sort();
            tap_figures = TapFigures {
                messages: tap.messages,
                distinct: tap.copies.len() as u64,
                ids_duplicated: duplicated.len() as u64,
                extra_copies: tap.copies.values().map(|n| n.saturating_sub(1)).sum(),
                never_seen: never_seen.len() as u64,
                out_of_order: 0,
            };
            let unknown: Vec<String> = unknown.into_iter().cloned().collect();
            checks.push(check(
                "broker: every outbox event published at least once, none dead",
                never_seen.is_empty()
                    && unknown.is_empty()
                    && tap.without_id == 0
                    && dead == 0
                    && unpublished == 0,
                format!(
                    "{events} outbox rows; the chaos tap queue got {} messages, {} distinct ids; {} rows never on the broker [{}]; {} ids published more than once ({} extra copies, allowed: at least once) [{}]; {} ids not in the outbox [{}]; {} messages without message_id; outbox: {dead} dead, {unpublished} not marked published",
                    tap.messages,
                    tap.copies.len(),
                    never_seen.len(),
                    sample(&never_seen),
                    duplicated.len(),
                    tap_figures.extra_copies,
                    sample(&duplicated),
                    unknown.len(),
                    sample(&unknown),
                    tap.without_id
                ),
            ));
            let order =
                first_arrival_order(outbox_rows.iter().map(|r| (r.0, r.1, r.2)), &tap.first_at);
            let OrderFindings {
                aggregates,
                with_several,
                mut out_of_order,
            } = order;
            out_of_order.sort();
            tap_figures.out_of_order = out_of_order.len() as u64;
            checks.push(check(
                "broker: each aggregate's events first published in commit order",
                out_of_order.is_empty(),
                format!(
                    "{aggregates} aggregates, {with_several} of them with more than one event; {} first copies out of seq order [{}]",
                    out_of_order.len(),
                    sample(&out_of_order)
                ),
            ));
        }
        Err(e) => {
            checks.push(check(
                "broker: every outbox event published at least once, none dead",
                false,
                format!("the chaos tap queue could not be read: {e}; outbox: {events} rows, {dead} dead, {unpublished} not marked published"),
            ));
            checks.push(check(
                "broker: each aggregate's events first published in commit order",
                false,
                format!("the chaos tap queue could not be read: {e}"),
            ));
        }
    }
    // The settlement queue's bindings, as the fleet declares them.
    let settlement_bindings: &[&str] = entrip_common::amqp::WORKER_QUEUES
        .iter()
        .find(|q| q.name == entrip_common::amqp::SETTLEMENT_QUEUE)
        .map_or(&[], |q| q.bindings);
    let for_settlement: HashSet<String> = outbox_rows
        .iter()
        .filter(|r| settlement_bindings.iter().any(|p| topic_matches(p, &r.3)))
        .map(|r| r.0.to_string())
        .collect();
    let applied: HashSet<String> =
        sqlx::query_scalar::<_, String>("SELECT message_id FROM inbox WHERE consumer = $1")
            .bind(SETTLEMENT_CONSUMER)
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let inbox_by_consumer: Vec<(String, i64)> =
        sqlx::query_as("SELECT consumer, count(*) FROM inbox GROUP BY consumer ORDER BY consumer")
            .fetch_all(pool)
            .await?;
    let mut not_applied: Vec<&String> = for_settlement.difference(&applied).collect();
    not_applied.sort();
    let mut applied_extra: Vec<&String> = applied.difference(&for_settlement).collect();
    applied_extra.sort();
    checks.push(check(
        "inbox: the settlement consumer applied exactly the events bound to it",
        not_applied.is_empty() && applied_extra.is_empty(),
        format!(
            "{} events with a topic bound to {} {settlement_bindings:?}; inbox rows of consumer {SETTLEMENT_CONSUMER:?}: {}; {} events not applied [{}]; {} applied that are not such events [{}]; inbox rows by consumer {inbox_by_consumer:?}",
            for_settlement.len(),
            entrip_common::amqp::SETTLEMENT_QUEUE,
            applied.len(),
            not_applied.len(),
            sample(&not_applied),
            applied_extra.len(),
            sample(&applied_extra)
        ),
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
    // 2xx (see `explain_duplicate`); every other one is a finding.
    let mut explained_by: BTreeMap<Cause, u64> = BTreeMap::new();
    let mut unexplained: Vec<String> = Vec::new();
    let mut dup_pairs: Vec<(&(String, String), &u64)> =
        seen.counts.iter().filter(|(_, n)| **n > 1).collect();
    dup_pairs.sort();
    for (key, n) in dup_pairs {
        let why = seen.first_seen.get(key).and_then(|first| {
            explain_duplicate(
                *first,
                seen.first_copy.get(key),
                inp.hits,
                inp.webhook_timeout,
            )
        });
        match why {
            Some(why) => *explained_by.entry(why).or_default() += 1,
            None => {
                let (s, id) = key;
                let how = seen.first_copy.get(key).map_or_else(
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
                unexplained.push(format!("{s}:{id} x{n} ({how})"));
            }
        }
    }
    let amqp_closes = inp
        .hits
        .iter()
        .filter(|h| h.fault == Fault::AmqpClose)
        .count();
    checks.push(check(
        "duplicate webhooks only where a worker lost its record",
        unexplained.is_empty(),
        format!(
            "{duplicates} duplicate copies over {pairs_with_dup} pairs; explained by {{{}}}; {} unexplained [{}] (none tolerated; {amqp_closes} AMQP connection closes explain none: the handlers finish and commit before the consumer reconnects, and a redelivery finds the pair DELIVERED)",
            explained_by
                .iter()
                .map(|(why, n)| format!("{}: {n}", why.label()))
                .collect::<Vec<_>>()
                .join(", "),
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
                .filter(|(k, v)| is_dlq(k) && !is_ingest_dlq(k) && **v != 0)
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
                    "{} queues (entrip.ingest and its retry queues among the work queues; entrip.ingest.dlq judged above); non-empty DLQs [{}]; non-empty work queues [{}]",
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
        told_failed_by_step
            .get(&Step::Booking)
            .copied()
            .unwrap_or(0),
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
    for (why, n) in &explained_by {
        put(
            &format!("webhook duplicates explained: {}", why.label()),
            *n,
        );
    }
    put("webhook duplicates unexplained", unexplained.len() as u64);
    put(
        "broker: messages on the chaos tap queue",
        tap_figures.messages,
    );
    put(
        "broker: distinct events on the tap queue",
        tap_figures.distinct,
    );
    put(
        "broker: events published more than once",
        tap_figures.ids_duplicated,
    );
    put(
        "broker: extra copies of events (at least once)",
        tap_figures.extra_copies,
    );
    put(
        "broker: outbox events never published",
        tap_figures.never_seen,
    );
    put(
        "broker: first copies out of commit order",
        tap_figures.out_of_order,
    );
    put(
        "inbox rows of the settlement consumer",
        applied.len() as u64,
    );
    put("AMQP: logical requests", Stats::get(&st.amqp_requests));
    put(
        "AMQP: messages published (with resends, replays, poison)",
        Stats::get(&st.amqp_published),
    );
    put(
        "AMQP: resends (no reply within the patience window)",
        Stats::get(&st.amqp_resends),
    );
    put(
        "AMQP: first sends with a planted few-ms patience",
        Stats::get(&st.amqp_planted_short_patience),
    );
    put(
        "AMQP: publishes failed and sent again",
        Stats::get(&st.amqp_publish_failures),
    );
    put(
        "AMQP: connections opened by the load",
        Stats::get(&st.amqp_connects),
    );
    put("AMQP: replies read", Stats::get(&st.amqp_replies));
    put(
        "AMQP: replies marked replayed",
        Stats::get(&st.amqp_replies_replayed),
    );
    put(
        "AMQP: later replies to one request",
        Stats::get(&st.amqp_extra_replies),
    );
    put("AMQP: requests told 201/200", amqp_stored as u64);
    put(
        "replays over the other transport",
        Stats::get(&st.cross_replays),
    );
    put("AMQP: poison planted", Stats::get(&st.planted_poison));
    put("AMQP: messages in entrip.ingest.dlq", dlq_messages);
    for (outcome, n) in &counts.messages {
        put(&format!("ingest metrics: AMQP {outcome}"), *n);
    }
    for (reason, n) in &counts.reply_failures {
        put(&format!("ingest metrics: reply failures {reason}"), *n);
    }
    put("webhook answers 500 (fault window)", seen.answered_500);
    put("webhook requests held (hang window)", seen.hung);
    Ok(checks)
}

/// The per-aggregate order of first arrivals on the tap queue.
#[derive(Debug, Default)]
struct OrderFindings {
    /// Aggregates with at least one event seen on the broker.
    aggregates: usize,
    /// Of them, those with more than one.
    with_several: usize,
    /// Adjacent events (by `seq`) of one aggregate whose first copies
    /// arrived the other way round.
    out_of_order: Vec<Inversion>,
}

/// Two events of one aggregate whose first copies arrived against their
/// commit order: `later` (the higher `seq`) came first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Inversion {
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

/// What the tap queue showed, for the totals.
#[derive(Debug, Default)]
struct TapFigures {
    messages: u64,
    distinct: u64,
    ids_duplicated: u64,
    extra_copies: u64,
    never_seen: u64,
    out_of_order: u64,
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
///   0.5 s]`: the transaction holding the pair's row lock died before its
///   commit (the request may have been on its way when it did);
/// - the worker's webhook timeout: the first copy's connection dropped before
///   its 2xx was written, or the copy waited and was handled for at least the
///   timeout (less `TIMEOUT_MARGIN`) — the worker recorded a failure and
///   retried.
///
/// An AMQP connection close explains none: the consumer lets its handlers
/// finish (their commits stand, only the acks fail) before it reconnects,
/// and the redelivery finds the pair DELIVERED under its row lock.
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
}
