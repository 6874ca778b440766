//! The load generator: journeys (booking → payment → result, and approval →
//! decision for bookings that need one) at a steady rate through ingest's
//! HTTP API, as a careful upstream client would send them: a timeout longer
//! than the server's own deadline, retries with the same `Idempotency-Key`
//! and body until a definitive answer (after the server's `Retry-After`, or a
//! growing, jittered backoff), some replays of answered requests, a planted
//! fraction of first attempts with a timeout of a few milliseconds, a planted
//! fraction that gives up after a 5xx ("told failed"), and planted invalid
//! requests. It records what the client was told, which is what the end
//! state is checked against.
//!
//! The client's patience is what tells a slow machine from a lost request.
//! A per-attempt timeout shorter than the server takes on a busy machine
//! makes every attempt a timeout: the server's work is cancelled and rolled
//! back, the retries keep the machine busy, and nothing completes (a short
//! run once saw 156 requests give up that way after 90 s of retries).
//! So an attempt waits longer than the server's deadline (the server
//! answers 503 by then), the client honours `Retry-After`, and a request
//! counts as lost only when it stays unanswered after the faults are over
//! while the fleet answers others (see [`LoadSettings::give_up_after`]).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use serde::{Serialize, Serializer};
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{Error, rng::Rng};

/// An API key that `Debug` does not print, so that printing the settings
/// (`{:?}`) never shows it.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// How the load runs. It starts journeys until told to stop (see [`run`]).
#[derive(Debug, Clone)]
pub struct LoadSettings {
    pub base: String,
    /// The bearer key every request carries.
    pub api_key: Secret,
    /// Journeys started per second.
    pub rate: f64,
    /// Per-attempt client timeout: longer than the server's own deadline
    /// (ingest's `request_timeout_secs`), so that the server, not the
    /// client, ends a slow request, and a client timeout means the answer
    /// was lost (or planted: a share of first attempts get a few
    /// milliseconds).
    pub client_timeout: Duration,
    /// A request still without a definitive answer this long after the
    /// faults are over (or after it was sent, if later), while the fleet gave
    /// [`LOST_AMONG`] definitive answers to other requests meanwhile, is
    /// lost: given up and counted. Without those answers (the whole fleet
    /// slow, or the machine starved) it waits twice as long. While faults
    /// are injected no request is given up: a run of database outages may
    /// hold one up for as long as they last, and that phase is bounded.
    pub give_up_after: Duration,
    /// Share of journeys that stop at their first 5xx answer.
    pub abandon_fraction: f64,
}

/// Definitive answers to other requests that make an unanswered request
/// lost rather than slow (see [`LoadSettings::give_up_after`]).
pub const LOST_AMONG: u64 = 20;

/// The longest `Retry-After` the client waits (the fleet is told to send 1 s
/// in a chaos run).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// How one attempt ended, for the report's answers by status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Response {
    /// The server answered with this HTTP status.
    Status(u16),
    /// No complete answer within the attempt's timeout.
    Timeout,
    /// The connection failed (refused, reset) before a complete answer.
    ConnectionError,
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(s) => write!(f, "{s}"),
            Self::Timeout => f.write_str("timeout"),
            Self::ConnectionError => f.write_str("connection-error"),
        }
    }
}

/// As its text (`"201"`, `"timeout"`), so that it can key a JSON object.
impl Serialize for Response {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Counters of the client's side.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub timeouts: AtomicU64,
    /// First attempts sent with a timeout of a few milliseconds on purpose.
    pub planted_timeouts: AtomicU64,
    pub server_errors: AtomicU64,
    pub replays: AtomicU64,
    pub replay_mismatches: AtomicU64,
    pub gave_up: AtomicU64,
    pub unexpected_answers: AtomicU64,
    /// Definitive answers (2xx, 4xx) to any request: the fleet is serving.
    pub answered: AtomicU64,
    by_status: Mutex<BTreeMap<Response, u64>>,
    problems: Mutex<Vec<String>>,
}

impl Stats {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn status(&self, r: Response) {
        let mut m = self.by_status.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(r).or_default() += 1;
    }

    /// Keeps the first problems verbatim for the report.
    fn problem(&self, what: String) {
        tracing::warn!("client: {what}");
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < 20 {
            p.push(what);
        }
    }

    pub fn by_status(&self) -> BTreeMap<Response, u64> {
        self.by_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn problems(&self) -> Vec<String> {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The steps of a journey, each one POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Step {
    Booking,
    Payment,
    PaymentResult,
    Approval,
    Decision,
}

/// What the client knows of its booking request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum BookingOutcome {
    /// 201 with this id.
    Acked(Uuid),
    /// A 5xx the client took as final (no ambiguous attempt before it).
    ToldFailed,
    /// A planted invalid request, answered 422.
    Invalid,
    /// Not sent, or no definitive answer.
    Unknown,
}

/// One journey as the client saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Journey {
    pub n: u64,
    pub code: String,
    pub requires_approval: bool,
    pub booking: BookingOutcome,
    pub payment: Option<Uuid>,
    /// The acknowledged payment result (`APPROVED` or `FAILED`).
    pub payment_status: Option<String>,
    pub approval: Option<Uuid>,
    /// The acknowledged decision (`APPROVED` or `REJECTED`).
    pub approval_status: Option<String>,
    /// The step (and its key) the client was told failed and abandoned.
    pub told_failed: Option<(Step, String)>,
    /// The code of a planted key-misuse request (same key, other body: 422).
    pub misuse_code: Option<String>,
    /// A request gave up or got an unexpected answer: the state of that step
    /// is unknown to the client.
    pub indeterminate: bool,
}

impl Journey {
    fn new(n: u64, requires_approval: bool) -> Self {
        Self {
            n,
            code: format!("CHAOS-{n:07}"),
            requires_approval,
            booking: BookingOutcome::Unknown,
            payment: None,
            payment_status: None,
            approval: None,
            approval_status: None,
            told_failed: None,
            misuse_code: None,
            indeterminate: false,
        }
    }

    pub fn booking_id(&self) -> Option<Uuid> {
        match self.booking {
            BookingOutcome::Acked(id) => Some(id),
            _ => None,
        }
    }

    /// Whether the client must find this booking settled.
    pub fn expect_settled(&self) -> bool {
        !self.indeterminate
            && self.booking_id().is_some()
            && self.payment_status.as_deref() == Some("APPROVED")
            && (!self.requires_approval || self.approval_status.as_deref() == Some("APPROVED"))
    }
}

/// The answer to one logical request after its retries.
enum Answer {
    Success(u16, Value),
    Refused(u16, Value),
    ToldFailed(u16),
    GaveUp(String),
}

struct Client {
    http: reqwest::Client,
    settings: LoadSettings,
    stats: Arc<Stats>,
    /// When the faults were over, and the definitive answers given by then.
    calm_since: Arc<std::sync::OnceLock<(Instant, u64)>>,
}

/// One attempt's answer.
struct Reply {
    status: u16,
    body: Value,
    replayed: bool,
    /// The server's `Retry-After` (seconds), when it sent one.
    retry_after: Option<Duration>,
}

/// Where a request's wait for a definitive answer began.
struct Patience {
    started: Instant,
    answered_before: u64,
}

impl Client {
    fn patience(&self) -> Patience {
        Patience {
            started: Instant::now(),
            answered_before: Stats::get(&self.stats.answered),
        }
    }

    /// Whether a request waiting since `p` is lost (see
    /// [`LoadSettings::give_up_after`]).
    fn lost(&self, p: &Patience) -> bool {
        let Some((calm, answered_then)) = self.calm_since.get().copied() else {
            return false;
        };
        let waited = p.started.max(calm).elapsed();
        let others =
            Stats::get(&self.stats.answered).saturating_sub(p.answered_before.max(answered_then));
        let limit = self.settings.give_up_after;
        (waited >= limit && others >= LOST_AMONG) || waited >= limit * 2
    }

    /// Growing delays with jitter between attempts, so that requests failed
    /// by one fault do not come back all at once.
    fn backoff() -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The pause before the next attempt: the server's `Retry-After` (at
    /// most [`MAX_RETRY_AFTER`]) when it sent one, else the backoff's.
    fn pause(
        backoff: &mut impl Iterator<Item = Duration>,
        retry_after: Option<Duration>,
    ) -> Duration {
        let next = backoff.next().unwrap_or(Duration::from_secs(2));
        retry_after.map_or(next, |r| r.min(MAX_RETRY_AFTER).max(next))
    }

    /// Sends one POST until a definitive answer, always with the same key and
    /// body. With `abandon_on_5xx`, a 5xx is final when no earlier attempt
    /// was ambiguous (a timeout could have committed).
    async fn post(
        &self,
        path: &str,
        key: &str,
        body: &Value,
        abandon_on_5xx: bool,
        first_timeout: Option<Duration>,
    ) -> Answer {
        let patience = self.patience();
        let mut backoff = Self::backoff();
        let mut ambiguous = false;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            Stats::bump(&self.stats.requests);
            if attempt > 1 {
                Stats::bump(&self.stats.retries);
            }
            let timeout = if attempt == 1 { first_timeout } else { None };
            let mut retry_after = None;
            match self.once(path, key, body, timeout).await {
                Ok(r) if (200..300).contains(&r.status) => {
                    return Answer::Success(r.status, r.body);
                }
                Ok(r) if r.status >= 500 => {
                    Stats::bump(&self.stats.server_errors);
                    if abandon_on_5xx && !ambiguous {
                        return Answer::ToldFailed(r.status);
                    }
                    ambiguous = true;
                    retry_after = r.retry_after;
                }
                Ok(r) => return Answer::Refused(r.status, r.body),
                Err(_) => {
                    Stats::bump(&self.stats.timeouts);
                    ambiguous = true;
                }
            }
            if self.lost(&patience) {
                return Answer::GaveUp(format!(
                    "{attempt} attempts in {:?}",
                    patience.started.elapsed()
                ));
            }
            tokio::time::sleep(Self::pause(&mut backoff, retry_after)).await;
        }
    }

    /// One attempt.
    async fn once(
        &self,
        path: &str,
        key: &str,
        body: &Value,
        timeout: Option<Duration>,
    ) -> Result<Reply, reqwest::Error> {
        let failed = |e: reqwest::Error| {
            self.stats.status(if e.is_timeout() {
                Response::Timeout
            } else {
                Response::ConnectionError
            });
            e
        };
        let mut req = self
            .http
            .post(format!("{}{path}", self.settings.base))
            .header("idempotency-key", key)
            .json(body);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(failed)?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let replayed = header("idempotent-replayed").as_deref() == Some("true");
        let retry_after = header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.map_err(failed)?;
        self.stats.status(Response::Status(status));
        if status < 500 {
            Stats::bump(&self.stats.answered);
        }
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply {
            status,
            body,
            replayed,
            retry_after,
        })
    }

    /// Sends an answered request again: it must come back the same, marked
    /// as a replay.
    async fn replay(&self, path: &str, key: &str, body: &Value, first: &(u16, Value)) {
        Stats::bump(&self.stats.replays);
        let patience = self.patience();
        let mut backoff = Self::backoff();
        loop {
            Stats::bump(&self.stats.requests);
            let mut retry_after = None;
            match self.once(path, key, body, None).await {
                Ok(r) if r.status < 500 => {
                    if r.status != first.0 || r.body != first.1 || !r.replayed {
                        Stats::bump(&self.stats.replay_mismatches);
                        self.stats.problem(format!(
                            "replay of {path} key {key}: got {} replayed={} {}, first answer {} {}",
                            r.status, r.replayed, r.body, first.0, first.1
                        ));
                    }
                    return;
                }
                Ok(r) => {
                    Stats::bump(&self.stats.retries);
                    retry_after = r.retry_after;
                }
                Err(_) => Stats::bump(&self.stats.retries),
            }
            if self.lost(&patience) {
                Stats::bump(&self.stats.gave_up);
                self.stats
                    .problem(format!("replay of {path} key {key}: no answer, gave up"));
                return;
            }
            tokio::time::sleep(Self::pause(&mut backoff, retry_after)).await;
        }
    }
}

/// A journey in progress: the client, the journey's record and its choices.
struct Run<'a> {
    client: &'a Client,
    j: Journey,
    abandon: bool,
    rng: Rng,
}

impl Run<'_> {
    /// One step: `Some(body)` on success; on anything else the journey's
    /// record says why and the journey stops.
    async fn step(&mut self, step: Step, path: &str, body: Value) -> Option<Value> {
        let key = format!("chaos-{}-{step:?}-{}", self.j.n, Uuid::new_v4().simple());
        let impatient = impatient(&mut self.rng, &self.client.stats);
        match self
            .client
            .post(path, &key, &body, self.abandon, impatient)
            .await
        {
            Answer::Success(status, value) => {
                if self.rng.chance(0.1) {
                    self.client
                        .replay(path, &key, &body, &(status, value.clone()))
                        .await;
                }
                Some(value)
            }
            Answer::ToldFailed(status) => {
                tracing::info!(code = %self.j.code, ?step, status, "told failed; abandoning the journey");
                self.j.told_failed = Some((step, key));
                None
            }
            Answer::Refused(status, value) => {
                Stats::bump(&self.client.stats.unexpected_answers);
                self.client.stats.problem(format!(
                    "{} {step:?} {path}: unexpected {status} {value}",
                    self.j.code
                ));
                self.j.indeterminate = true;
                None
            }
            Answer::GaveUp(why) => {
                Stats::bump(&self.client.stats.gave_up);
                self.client
                    .stats
                    .problem(format!("{} {step:?} {path}: gave up ({why})", self.j.code));
                self.j.indeterminate = true;
                None
            }
        }
    }
}

/// For a planted share of requests, a first attempt with a timeout of a few
/// milliseconds: the server may well commit it, the client cannot know, and
/// must retry with the same key (and get the stored answer).
fn impatient(rng: &mut Rng, stats: &Stats) -> Option<Duration> {
    rng.chance(0.15).then(|| {
        Stats::bump(&stats.planted_timeouts);
        Duration::from_millis(2 + rng.below(40) as u64)
    })
}

fn id_of(v: &Value) -> Option<Uuid> {
    v.get("id")?.as_str()?.parse().ok()
}

fn booking_body(code: &str, user: Uuid, requires_approval: bool, valid: bool) -> Value {
    let (depart, arrive) = if valid {
        ("2026-12-24T09:30:00+09:00", "2026-12-24T11:45:00+09:00")
    } else {
        // Arrives before it departs: a 422 (rule across fields).
        ("2026-12-24T11:45:00+09:00", "2026-12-24T09:30:00+09:00")
    };
    json!({
        "code": code, "customerName": "Chaos Kim", "customerPhone": "010 1234 5678",
        "itineraryFrom": "ICN", "itineraryTo": "NRT", "departAt": depart, "arriveAt": arrive,
        "amount": "350000", "userId": user, "requiresApproval": requires_approval,
    })
}

async fn journey(client: Arc<Client>, users: Arc<Vec<Uuid>>, n: u64, mut rng: Rng) -> Journey {
    let user = users[rng.below(users.len())];
    let requires_approval = rng.chance(0.35);
    let payment_fails = rng.chance(0.12);
    let rejected = requires_approval && rng.chance(0.25);
    let abandon = rng.chance(client.settings.abandon_fraction);
    let invalid = rng.chance(0.03);
    let misuse = !invalid && rng.chance(0.02);
    let approval_first = rng.chance(0.5);
    let mut run = Run {
        client: &client,
        j: Journey::new(n, requires_approval),
        abandon,
        rng: rng.fork(n),
    };

    if invalid {
        let key = format!("chaos-{n}-invalid-{}", Uuid::new_v4().simple());
        let body = booking_body(&run.j.code, user, requires_approval, false);
        match client.post("/v1/bookings", &key, &body, false, None).await {
            Answer::Refused(422, _) => run.j.booking = BookingOutcome::Invalid,
            Answer::Success(status, v) => {
                Stats::bump(&client.stats.unexpected_answers);
                client.stats.problem(format!(
                    "{}: invalid booking accepted with {status}",
                    run.j.code
                ));
                run.j.booking = id_of(&v).map_or(BookingOutcome::Unknown, BookingOutcome::Acked);
                run.j.indeterminate = true;
            }
            _ => {
                Stats::bump(&client.stats.unexpected_answers);
                client
                    .stats
                    .problem(format!("{}: invalid booking not answered 422", run.j.code));
                run.j.indeterminate = true;
            }
        }
        return run.j;
    }

    let body = booking_body(&run.j.code, user, requires_approval, true);
    let key = format!("chaos-{n}-Booking-{}", Uuid::new_v4().simple());
    let impatient = impatient(&mut run.rng, &client.stats);
    let booking = match client
        .post("/v1/bookings", &key, &body, abandon, impatient)
        .await
    {
        Answer::Success(status, v) => {
            if run.rng.chance(0.1) {
                client
                    .replay("/v1/bookings", &key, &body, &(status, v.clone()))
                    .await;
            }
            v
        }
        Answer::ToldFailed(_) => {
            run.j.booking = BookingOutcome::ToldFailed;
            run.j.told_failed = Some((Step::Booking, key));
            return run.j;
        }
        Answer::Refused(status, v) => {
            Stats::bump(&client.stats.unexpected_answers);
            client
                .stats
                .problem(format!("{}: booking refused {status} {v}", run.j.code));
            run.j.indeterminate = true;
            return run.j;
        }
        Answer::GaveUp(why) => {
            Stats::bump(&client.stats.gave_up);
            client
                .stats
                .problem(format!("{}: booking gave up ({why})", run.j.code));
            run.j.indeterminate = true;
            return run.j;
        }
    };
    let Some(booking_id) = id_of(&booking) else {
        Stats::bump(&client.stats.unexpected_answers);
        client.stats.problem(format!(
            "{}: booking answer without id: {booking}",
            run.j.code
        ));
        run.j.indeterminate = true;
        return run.j;
    };
    run.j.booking = BookingOutcome::Acked(booking_id);

    if misuse {
        // The same key with another body must be refused and store nothing.
        let other = format!("CHAOSX-{n:07}");
        let body = booking_body(&other, user, requires_approval, true);
        match client.post("/v1/bookings", &key, &body, false, None).await {
            Answer::Refused(422, _) => run.j.misuse_code = Some(other),
            _ => {
                Stats::bump(&client.stats.unexpected_answers);
                client.stats.problem(format!(
                    "{other}: key reused with another body not refused 422"
                ));
                run.j.misuse_code = Some(other);
            }
        }
    }

    let mut approval_done = !requires_approval;
    let mut payment_done = false;
    let mut approval_turn = approval_first;
    while !(approval_done && payment_done) {
        if approval_turn && !approval_done {
            approval_done = true;
            let Some(a) = run
                .step(
                    Step::Approval,
                    "/v1/approvals",
                    json!({"bookingId": booking_id, "requesterId": user, "title": "Trip", "reason": "Meeting"}),
                )
                .await
            else {
                return run.j;
            };
            let Some(approval_id) = id_of(&a) else {
                run.j.indeterminate = true;
                return run.j;
            };
            run.j.approval = Some(approval_id);
            let decision = if rejected { "REJECTED" } else { "APPROVED" };
            let Some(d) = run
                .step(
                    Step::Decision,
                    &format!("/v1/approvals/{approval_id}/decision"),
                    json!({"approverId": user, "decision": decision}),
                )
                .await
            else {
                return run.j;
            };
            run.j.approval_status = d.get("status").and_then(Value::as_str).map(str::to_owned);
        } else if !payment_done {
            payment_done = true;
            let Some(p) = run
                .step(
                    Step::Payment,
                    "/v1/payments",
                    json!({"bookingId": booking_id, "method": "CARD", "amount": "350000", "currency": "KRW", "tax": "31818"}),
                )
                .await
            else {
                return run.j;
            };
            let Some(payment_id) = id_of(&p) else {
                run.j.indeterminate = true;
                return run.j;
            };
            run.j.payment = Some(payment_id);
            let result = if payment_fails {
                json!({"status": "FAILED", "reason": "card declined"})
            } else {
                json!({"status": "APPROVED", "approvalId": format!("PG-{n}")})
            };
            let Some(r) = run
                .step(
                    Step::PaymentResult,
                    &format!("/v1/payments/{payment_id}/result"),
                    result,
                )
                .await
            else {
                return run.j;
            };
            run.j.payment_status = r.get("status").and_then(Value::as_str).map(str::to_owned);
        }
        approval_turn = !approval_turn;
    }
    run.j
}

/// What the load phase produced.
#[derive(Debug)]
pub struct LoadResult {
    pub users: Vec<Uuid>,
    pub journeys: Vec<Journey>,
    pub stats: Arc<Stats>,
    /// How long journeys were started.
    pub started_for: Duration,
    /// That, and the wait for the started ones to end.
    pub elapsed: Duration,
}

/// Creates the users, then starts journeys at the set rate until `stop`
/// turns true (the driver decides when: see [`crate::run`]), and waits for
/// the started ones. `calm` turns true when the faults are over: only then
/// may a request be given up (see [`LoadSettings::give_up_after`]).
pub async fn run(
    settings: LoadSettings,
    mut rng: Rng,
    mut stop: watch::Receiver<bool>,
    mut calm: watch::Receiver<bool>,
) -> Result<LoadResult, Error> {
    let mut headers = reqwest::header::HeaderMap::new();
    let bearer = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", settings.api_key.0))
        .map_err(|e| Error::Setup(format!("the API key is not a header value: {e}")))?;
    headers.insert(reqwest::header::AUTHORIZATION, bearer);
    let http = reqwest::Client::builder()
        .timeout(settings.client_timeout)
        .default_headers(headers)
        .build()?;
    let stats = Arc::new(Stats::default());
    let calm_since = Arc::new(std::sync::OnceLock::new());
    let watch_calm = {
        let (calm_since, stats) = (calm_since.clone(), stats.clone());
        tokio::spawn(async move {
            if calm.wait_for(|c| *c).await.is_ok() {
                let _ = calm_since.set((Instant::now(), Stats::get(&stats.answered)));
            }
        })
    };
    let client = Arc::new(Client {
        http,
        settings: settings.clone(),
        stats: stats.clone(),
        calm_since,
    });
    let mut users = Vec::new();
    for i in 0..4 {
        let key = format!("chaos-user-{i}-{}", Uuid::new_v4().simple());
        let body = json!({"name": format!("Chaos User {i}"), "email": format!("chaos-{i}@example.com"), "phone": "010 1234 5678"});
        match client.post("/v1/users", &key, &body, false, None).await {
            Answer::Success(_, v) => users.push(
                id_of(&v).ok_or_else(|| Error::Setup(format!("user answer without id: {v}")))?,
            ),
            Answer::Refused(s, v) => {
                return Err(Error::Setup(format!("creating a user: {s} {v}")));
            }
            Answer::ToldFailed(s) => return Err(Error::Setup(format!("creating a user: {s}"))),
            Answer::GaveUp(why) => return Err(Error::Setup(format!("creating a user: {why}"))),
        }
    }
    let users = Arc::new(users);

    let started = Instant::now();
    // `run` accepts rates in `RATE_RANGE` only; whatever the caller, the
    // period stays positive (a zero period panics).
    let period = Duration::try_from_secs_f64(1.0 / settings.rate.clamp(0.1, 10_000.0))
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_micros(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = Vec::new();
    let mut n = 0u64;
    while !*stop.borrow() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        tasks.push(tokio::spawn(journey(
            client.clone(),
            users.clone(),
            n,
            rng.fork(n),
        )));
        n += 1;
    }
    let started_for = started.elapsed();
    tracing::info!(
        journeys = n,
        "load: no new journeys after {:.1} s; waiting for the started ones",
        started_for.as_secs_f64()
    );
    let mut journeys = Vec::new();
    let ended = futures::future::join_all(tasks).await;
    watch_calm.abort();
    for t in ended {
        match t {
            Ok(j) => journeys.push(j),
            Err(e) => return Err(Error::Setup(format!("a journey task failed: {e}"))),
        }
    }
    Ok(LoadResult {
        users: users.to_vec(),
        journeys,
        stats,
        started_for,
        elapsed: started.elapsed(),
    })
}
