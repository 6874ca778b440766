//! The load generator: journeys (booking → payment → result, and approval →
//! decision for bookings that need one) at a steady rate through ingest,
//! each request over its HTTP API or, for a share of them
//! ([`AmqpLoadSettings::share`]), over AMQP ([`crate::upstream`]), as a
//! careful upstream client would send them. Over HTTP: a timeout longer
//! than the server's own deadline, retries with the same `Idempotency-Key`
//! and body until a definitive answer (after the server's `Retry-After`, or a
//! growing, jittered backoff), some replays of answered requests, a planted
//! fraction of first attempts with a timeout of a few milliseconds, a planted
//! fraction that gives up after a 5xx ("told failed"), and planted invalid
//! requests. Over AMQP: a reply awaited for a patience window
//! ([`AmqpLoadSettings::patience`]; a planted few milliseconds for a share
//! of first sends), and without one the same message again, with the same
//! `message_id` and body, until a reply comes (a replay of the stored answer
//! when the first got through); 5xx are never replied over AMQP (ingest
//! retries them itself), so nothing there is "told failed". Replays of
//! answered requests go over either transport: the key is one request
//! whichever way it comes. A few planted poison messages (not JSON) must be
//! answered 400 and end in `entrip.ingest.dlq`. It records what the client
//! was told, over either transport in the same form, which is what the end
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

use crate::{
    Error,
    fleet::IngestUrl,
    rng::Rng,
    upstream::{AmqpReply, Outgoing, Upstream},
};

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
    /// Ingest's HTTP URL (it moves if its port was taken while it was down).
    pub base: IngestUrl,
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
    /// Requests over AMQP; `None`: HTTP only.
    pub amqp: Option<AmqpLoadSettings>,
}

/// The AMQP side of the load.
#[derive(Debug, Clone)]
pub struct AmqpLoadSettings {
    /// The run's vhost, as the run's broker user: the API client the load
    /// uses was created with `--amqp-user` that user.
    pub url: String,
    /// Share of requests (bookings, payments, their results, approvals,
    /// decisions, and the replays) sent over AMQP.
    pub share: f64,
    /// How long the client waits for a reply before it sends the same
    /// message again (with up to half of it again as jitter, so that the
    /// requests one fault held up do not all come back at once).
    pub patience: Duration,
    /// Share of journeys that also plant a poison message (one is planted at
    /// the start in any case).
    pub poison_fraction: f64,
}

/// How a request travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Transport {
    Http,
    Amqp,
}

impl Transport {
    /// The `channel` ingest records in the audit row's detail.
    pub fn channel(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Amqp => "amqp",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Http => Self::Amqp,
            Self::Amqp => Self::Http,
        }
    }
}

/// A command as the client sends it: its HTTP path, or its AMQP type and
/// the entity it acts on.
#[derive(Debug, Clone, Copy)]
enum Command {
    User,
    Booking,
    Payment,
    PaymentResult(Uuid),
    Approval,
    Decision(Uuid),
}

impl Command {
    fn path(self) -> String {
        match self {
            Self::User => "/v1/users".to_owned(),
            Self::Booking => "/v1/bookings".to_owned(),
            Self::Payment => "/v1/payments".to_owned(),
            Self::PaymentResult(id) => format!("/v1/payments/{id}/result"),
            Self::Approval => "/v1/approvals".to_owned(),
            Self::Decision(id) => format!("/v1/approvals/{id}/decision"),
        }
    }

    /// The AMQP `type` (and routing key).
    fn kind(self) -> &'static str {
        match self {
            Self::User => "user.create",
            Self::Booking => "booking.create",
            Self::Payment => "payment.create",
            Self::PaymentResult(_) => "payment.result",
            Self::Approval => "approval.create",
            Self::Decision(_) => "approval.decision",
        }
    }

    /// `x-entrip-entity-id`: the id in the HTTP path.
    fn entity(self) -> Option<Uuid> {
        match self {
            Self::PaymentResult(id) | Self::Decision(id) => Some(id),
            _ => None,
        }
    }
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
    /// Replays sent over the other transport than the request's first send.
    pub cross_replays: AtomicU64,
    /// AMQP: logical requests (each with its resends).
    pub amqp_requests: AtomicU64,
    /// AMQP: messages the broker confirmed (first sends, resends, replays,
    /// poison).
    pub amqp_published: AtomicU64,
    /// AMQP: the same message sent again after no reply within the patience
    /// window.
    pub amqp_resends: AtomicU64,
    /// AMQP: first sends given a planted patience of a few milliseconds.
    pub amqp_planted_short_patience: AtomicU64,
    /// AMQP: publishes that did not go out (not connected, no confirm in
    /// time, the channel failed); sent again.
    pub amqp_publish_failures: AtomicU64,
    /// AMQP: connections the upstream opened (1 + reconnects).
    pub amqp_connects: AtomicU64,
    /// AMQP: replies read (every copy).
    pub amqp_replies: AtomicU64,
    /// AMQP: of them, marked `x-entrip-replayed`.
    pub amqp_replies_replayed: AtomicU64,
    /// AMQP: replies after the first to one logical request (to its resends,
    /// or to a redelivery of it).
    pub amqp_extra_replies: AtomicU64,
    /// AMQP: of them, those whose status or body differed from the first.
    pub amqp_reply_mismatches: AtomicU64,
    /// AMQP: replies to no request of this run, or without a status.
    pub amqp_unknown_replies: AtomicU64,
    /// AMQP: poison messages planted (not JSON: 400, then the DLQ).
    pub planted_poison: AtomicU64,
    by_status: Mutex<BTreeMap<Response, u64>>,
    amqp_by_status: Mutex<BTreeMap<Response, u64>>,
    problems: Mutex<Vec<String>>,
}

impl Stats {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one AMQP reply by its status.
    pub(crate) fn amqp_status(&self, r: Response) {
        let mut m = self
            .amqp_by_status
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *m.entry(r).or_default() += 1;
    }

    pub fn amqp_by_status(&self) -> BTreeMap<Response, u64> {
        self.amqp_by_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn status(&self, r: Response) {
        let mut m = self.by_status.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(r).or_default() += 1;
    }

    /// Keeps the first problems verbatim for the report.
    pub(crate) fn problem(&self, what: String) {
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
    /// Every request of the journey told 201/200, as it was told.
    pub told: Vec<Told>,
}

/// A request the client was told succeeded: over which transport it was
/// first sent, its key, and the answer (status and body).
#[derive(Debug, Clone, Serialize)]
pub struct Told {
    pub step: Step,
    pub via: Transport,
    pub key: String,
    pub status: u16,
    pub body: Value,
}

impl Told {
    /// The entity the answer names.
    pub fn id(&self) -> Option<Uuid> {
        id_of(&self.body)
    }
}

/// A planted poison message and what the client was told (`None`: no
/// reply, given up).
#[derive(Debug, Clone, Serialize)]
pub struct Poison {
    pub key: String,
    pub told: Option<u16>,
}

impl Journey {
    pub(crate) fn new(n: u64, requires_approval: bool) -> Self {
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
            told: Vec::new(),
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
    /// The AMQP side, when the load sends over AMQP.
    upstream: Option<Arc<Upstream>>,
    poison: Mutex<Vec<Poison>>,
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

    /// Sends one request over `via` until a definitive answer, always with
    /// the same key and body; `first_wait` is a planted short timeout (HTTP)
    /// or patience (AMQP) for the first attempt.
    async fn send(
        &self,
        cmd: Command,
        via: Transport,
        key: &str,
        body: &Value,
        abandon_on_5xx: bool,
        first_wait: Option<Duration>,
    ) -> Answer {
        match via {
            Transport::Http => {
                self.post(&cmd.path(), key, body, abandon_on_5xx, first_wait)
                    .await
            }
            Transport::Amqp => self.amqp_send(cmd, key, body, first_wait).await,
        }
    }

    /// The share of requests sent over AMQP (0 without the upstream).
    fn amqp_share(&self) -> f64 {
        match (&self.upstream, &self.settings.amqp) {
            (Some(_), Some(a)) => a.share,
            _ => 0.0,
        }
    }

    /// The patience window, with up to half of it again as jitter.
    fn amqp_patience(&self) -> Duration {
        let base = self
            .settings
            .amqp
            .as_ref()
            .map_or(crate::DEFAULT_AMQP_PATIENCE, |a| a.patience);
        let jitter = f64::from(Uuid::new_v4().as_u128() as u16) / f64::from(u16::MAX);
        base + base.mul_f64(jitter / 2.0)
    }

    /// One logical AMQP request: publishes `out` and waits for its reply;
    /// with no reply within the patience window (`first_wait` the first
    /// time), publishes the same message again. A publish that fails is
    /// retried after the backoff. Gives up only when the request is lost
    /// (see [`LoadSettings::give_up_after`]).
    async fn amqp_exchange(
        &self,
        out: Outgoing<'_>,
        first_wait: Option<Duration>,
    ) -> Result<AmqpReply, String> {
        let Some(up) = &self.upstream else {
            return Err("AMQP is off in this run".into());
        };
        Stats::bump(&self.stats.amqp_requests);
        let (rid, mut reply) = up.expect(format!("{} {}", out.kind, out.key));
        let patience = self.patience();
        let mut backoff = Self::backoff();
        let mut wait = first_wait.unwrap_or_else(|| self.amqp_patience());
        let mut sent = 0u32;
        loop {
            let window = match up.publish(&out, &rid).await {
                Ok(()) => {
                    sent += 1;
                    if sent > 1 {
                        Stats::bump(&self.stats.amqp_resends);
                    }
                    wait
                }
                Err(e) => {
                    Stats::bump(&self.stats.amqp_publish_failures);
                    tracing::debug!("AMQP {} {}: {e}; again", out.kind, out.key);
                    Self::pause(&mut backoff, None)
                }
            };
            // An earlier send's reply may come meanwhile, also while a
            // failed publish waits for its next try.
            match tokio::time::timeout(window, &mut reply).await {
                Ok(Ok(r)) => {
                    if r.status < 500 {
                        Stats::bump(&self.stats.answered);
                    }
                    return Ok(r);
                }
                Ok(Err(_)) => return Err("the upstream closed before a reply".into()),
                Err(_) => {}
            }
            if sent > 0 {
                wait = self.amqp_patience();
            }
            if self.lost(&patience) {
                return Err(format!(
                    "{sent} sends over AMQP in {:?}, no reply",
                    patience.started.elapsed()
                ));
            }
        }
    }

    /// A request over AMQP, answered as over HTTP. Ingest never replies 5xx
    /// (it retries those itself), so a 5xx reply is a refusal the checks
    /// count as unexpected.
    async fn amqp_send(
        &self,
        cmd: Command,
        key: &str,
        body: &Value,
        first_wait: Option<Duration>,
    ) -> Answer {
        let bytes = body.to_string().into_bytes();
        let out = Outgoing {
            kind: cmd.kind(),
            key,
            entity: cmd.entity(),
            body: &bytes,
        };
        match self.amqp_exchange(out, first_wait).await {
            Ok(r) if (200..300).contains(&r.status) => Answer::Success(r.status, r.body),
            Ok(r) => Answer::Refused(r.status, r.body),
            Err(why) => Answer::GaveUp(why),
        }
    }

    /// Plants a poison message: a `booking.create` whose body is not JSON.
    /// It must be answered 400 (and end in `entrip.ingest.dlq`, which the
    /// checks look at).
    async fn plant_poison(&self, n: u64) {
        if self.upstream.is_none() {
            return;
        }
        Stats::bump(&self.stats.planted_poison);
        let key = format!("chaos-poison-{n}-{}", Uuid::new_v4().simple());
        let out = Outgoing {
            kind: Command::Booking.kind(),
            key: &key,
            entity: None,
            body: b"{not json",
        };
        let told = match self.amqp_exchange(out, None).await {
            Ok(r) => {
                if r.status != 400 {
                    Stats::bump(&self.stats.unexpected_answers);
                    self.stats.problem(format!(
                        "poison {key}: answered {} {}, not 400",
                        r.status, r.body
                    ));
                }
                Some(r.status)
            }
            Err(why) => {
                Stats::bump(&self.stats.gave_up);
                self.stats.problem(format!("poison {key}: gave up ({why})"));
                None
            }
        };
        self.poison
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Poison { key, told });
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
            .post(format!("{}{path}", self.settings.base.get()))
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

    /// Sends an answered request again, over `via`: it must come back the
    /// same, marked as a replay, whichever transport the first went over.
    async fn replay(
        &self,
        cmd: Command,
        via: Transport,
        key: &str,
        body: &Value,
        first: &(u16, Value),
    ) {
        Stats::bump(&self.stats.replays);
        match via {
            Transport::Http => self.replay_http(&cmd.path(), key, body, first).await,
            Transport::Amqp => {
                let bytes = body.to_string().into_bytes();
                let out = Outgoing {
                    kind: cmd.kind(),
                    key,
                    entity: cmd.entity(),
                    body: &bytes,
                };
                match self.amqp_exchange(out, None).await {
                    Ok(r) => {
                        if r.status != first.0 || r.body != first.1 || !r.replayed {
                            Stats::bump(&self.stats.replay_mismatches);
                            self.stats.problem(format!(
                                "AMQP replay of {} key {key}: got {} replayed={} {}, first answer {} {}",
                                cmd.kind(),
                                r.status,
                                r.replayed,
                                r.body,
                                first.0,
                                first.1
                            ));
                        }
                    }
                    Err(why) => {
                        Stats::bump(&self.stats.gave_up);
                        self.stats.problem(format!(
                            "AMQP replay of {} key {key}: gave up ({why})",
                            cmd.kind()
                        ));
                    }
                }
            }
        }
    }

    async fn replay_http(&self, path: &str, key: &str, body: &Value, first: &(u16, Value)) {
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
    /// The transport of the next request: AMQP for the configured share.
    fn via(&mut self) -> Transport {
        let share = self.client.amqp_share();
        if share > 0.0 && self.rng.chance(share) {
            Transport::Amqp
        } else {
            Transport::Http
        }
    }

    /// Sends one request of the journey over a drawn transport (a planted
    /// short first wait for a share); a success is recorded as told, and
    /// one in ten is replayed, over either transport.
    async fn request(&mut self, step: Step, cmd: Command, key: &str, body: &Value) -> Answer {
        let via = self.via();
        let first_wait = impatient(&mut self.rng, &self.client.stats, via);
        let answer = self
            .client
            .send(cmd, via, key, body, self.abandon, first_wait)
            .await;
        if let Answer::Success(status, value) = &answer {
            self.j.told.push(Told {
                step,
                via,
                key: key.to_owned(),
                status: *status,
                body: value.clone(),
            });
            if self.rng.chance(0.1) {
                let again = if self.client.amqp_share() > 0.0 && self.rng.chance(0.5) {
                    Stats::bump(&self.client.stats.cross_replays);
                    via.other()
                } else {
                    via
                };
                self.client
                    .replay(cmd, again, key, body, &(*status, value.clone()))
                    .await;
            }
        }
        answer
    }

    /// One step: `Some(body)` on success; on anything else the journey's
    /// record says why and the journey stops.
    async fn step(&mut self, step: Step, cmd: Command, body: Value) -> Option<Value> {
        let key = format!("chaos-{}-{step:?}-{}", self.j.n, Uuid::new_v4().simple());
        match self.request(step, cmd, &key, &body).await {
            Answer::Success(_, value) => Some(value),
            Answer::ToldFailed(status) => {
                tracing::info!(code = %self.j.code, ?step, status, "told failed; abandoning the journey");
                self.j.told_failed = Some((step, key));
                None
            }
            Answer::Refused(status, value) => {
                Stats::bump(&self.client.stats.unexpected_answers);
                self.client.stats.problem(format!(
                    "{} {step:?} {}: unexpected {status} {value}",
                    self.j.code,
                    cmd.kind()
                ));
                self.j.indeterminate = true;
                None
            }
            Answer::GaveUp(why) => {
                Stats::bump(&self.client.stats.gave_up);
                self.client.stats.problem(format!(
                    "{} {step:?} {}: gave up ({why})",
                    self.j.code,
                    cmd.kind()
                ));
                self.j.indeterminate = true;
                None
            }
        }
    }
}

/// For a planted share of requests, a first attempt that cannot wait: over
/// HTTP a timeout of a few milliseconds (the server may well commit it, the
/// client cannot know, and must retry with the same key and get the stored
/// answer); over AMQP a patience of a few milliseconds, so that the same
/// message is sent again before its reply can come.
fn impatient(rng: &mut Rng, stats: &Stats, via: Transport) -> Option<Duration> {
    rng.chance(0.15).then(|| {
        Stats::bump(match via {
            Transport::Http => &stats.planted_timeouts,
            Transport::Amqp => &stats.amqp_planted_short_patience,
        });
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
    let poison = client
        .settings
        .amqp
        .as_ref()
        .is_some_and(|a| rng.chance(a.poison_fraction));
    let mut run = Run {
        client: &client,
        j: Journey::new(n, requires_approval),
        abandon,
        rng: rng.fork(n),
    };
    if poison {
        client.plant_poison(n).await;
    }

    if invalid {
        let key = format!("chaos-{n}-invalid-{}", Uuid::new_v4().simple());
        let body = booking_body(&run.j.code, user, requires_approval, false);
        let via = run.via();
        match client
            .send(Command::Booking, via, &key, &body, false, None)
            .await
        {
            Answer::Refused(422, _) => run.j.booking = BookingOutcome::Invalid,
            Answer::Success(status, v) => {
                Stats::bump(&client.stats.unexpected_answers);
                client.stats.problem(format!(
                    "{}: invalid booking accepted with {status} over {via:?}",
                    run.j.code
                ));
                run.j.booking = id_of(&v).map_or(BookingOutcome::Unknown, BookingOutcome::Acked);
                run.j.indeterminate = true;
            }
            _ => {
                Stats::bump(&client.stats.unexpected_answers);
                client.stats.problem(format!(
                    "{}: invalid booking not answered 422 over {via:?}",
                    run.j.code
                ));
                run.j.indeterminate = true;
            }
        }
        return run.j;
    }

    let body = booking_body(&run.j.code, user, requires_approval, true);
    let key = format!("chaos-{n}-Booking-{}", Uuid::new_v4().simple());
    let booking = match run
        .request(Step::Booking, Command::Booking, &key, &body)
        .await
    {
        Answer::Success(_, v) => v,
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
        // The same key with another body must be refused and store nothing,
        // over either transport whichever the booking came by.
        let other = format!("CHAOSX-{n:07}");
        let body = booking_body(&other, user, requires_approval, true);
        let via = run.via();
        match client
            .send(Command::Booking, via, &key, &body, false, None)
            .await
        {
            Answer::Refused(422, _) => run.j.misuse_code = Some(other),
            _ => {
                Stats::bump(&client.stats.unexpected_answers);
                client.stats.problem(format!(
                    "{other}: key reused with another body over {via:?} not refused 422"
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
                    Command::Approval,
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
                    Command::Decision(approval_id),
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
                    Command::Payment,
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
                    Command::PaymentResult(payment_id),
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
    /// The planted poison messages.
    pub poison: Vec<Poison>,
    /// The AMQP side, still reading replies (late ones are compared with
    /// the first): the driver closes it after the drain.
    pub upstream: Option<Arc<Upstream>>,
}

/// Creates the users, then starts journeys at the set rate until `stop`
/// turns true (the driver decides when: see [`crate::run`]; `journeys`
/// turns true when the first one starts), and waits for the started ones. `calm`
/// turns true when the faults are over: only then may a request be given up
/// (see [`LoadSettings::give_up_after`]).
pub async fn run(
    settings: LoadSettings,
    mut rng: Rng,
    mut stop: watch::Receiver<bool>,
    mut calm: watch::Receiver<bool>,
    journeys: watch::Sender<bool>,
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
    let upstream = settings
        .amqp
        .as_ref()
        .filter(|a| a.share > 0.0)
        .map(|a| Arc::new(Upstream::start(a.url.clone(), stats.clone())));
    let client = Arc::new(Client {
        http,
        settings: settings.clone(),
        stats: stats.clone(),
        calm_since,
        upstream: upstream.clone(),
        poison: Mutex::new(Vec::new()),
    });
    // At once, so that the setup is short.
    let created = futures::future::join_all((0..4).map(|i| {
        let client = &client;
        async move {
            let key = format!("chaos-user-{i}-{}", Uuid::new_v4().simple());
            let body = json!({"name": format!("Chaos User {i}"), "email": format!("chaos-{i}@example.com"), "phone": "010 1234 5678"});
            // The last one over AMQP, when the load uses it.
            let via = if i == 3 && client.amqp_share() > 0.0 {
                Transport::Amqp
            } else {
                Transport::Http
            };
            let answer = client
                .send(Command::User, via, &key, &body, false, None)
                .await;
            (via, answer)
        }
    }))
    .await;
    let mut users = Vec::new();
    for (via, answer) in created {
        match answer {
            Answer::Success(_, v) => users.push(
                id_of(&v).ok_or_else(|| Error::Setup(format!("user answer without id: {v}")))?,
            ),
            Answer::Refused(s, v) => {
                return Err(Error::Setup(format!(
                    "creating a user over {via:?}: {s} {v}"
                )));
            }
            Answer::ToldFailed(s) => {
                return Err(Error::Setup(format!("creating a user over {via:?}: {s}")));
            }
            Answer::GaveUp(why) => {
                return Err(Error::Setup(format!("creating a user over {via:?}: {why}")));
            }
        }
    }
    let users = Arc::new(users);
    // One poison message in any case, so that even a short run sees one.
    let first_poison = {
        let client = client.clone();
        tokio::spawn(async move { client.plant_poison(u64::MAX).await })
    };

    let started = Instant::now();
    journeys.send_replace(true);
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
    let mut ended_journeys = Vec::new();
    let ended = futures::future::join_all(tasks).await;
    if let Err(e) = first_poison.await {
        return Err(Error::Setup(format!("the poison task failed: {e}")));
    }
    watch_calm.abort();
    for t in ended {
        match t {
            Ok(j) => ended_journeys.push(j),
            Err(e) => return Err(Error::Setup(format!("a journey task failed: {e}"))),
        }
    }
    let poison = std::mem::take(&mut *client.poison.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(LoadResult {
        users: users.to_vec(),
        journeys: ended_journeys,
        stats,
        started_for,
        elapsed: started.elapsed(),
        poison,
        upstream,
    })
}
