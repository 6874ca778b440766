//! End to end with the three binaries as processes: 60 bookings through
//! payment (some failed), approval (some rejected) and settlement, in every
//! combination and both orders; then settlements equal the
//! approved-and-allowed set, each webhook arrived once, and `workers
//! integrity --once` exits 0, and each journey's webhooks carry the trace
//! of its requests (`traceparent`, through outbox, relay, settlement and
//! notifications), and every event the fleet published validates against
//! its JSON Schema in docs/schemas/events/ (the AsyncAPI contract's). Also: the workers killed with SIGKILL
//! mid-stream and restarted apply every effect once. The binaries connect
//! as a role without superuser rights that owns the schema (as the role
//! `entrip` does in production), and `pg_stat_activity` shows their
//! sessions, none of them a superuser's.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, http::HeaderMap, routing::post};
use entrip_testkit::asyncapi::{AmqpMessage, contract};
use entrip_testkit::{
    Process, Vhost, eventually, free_port,
    pg::{ServiceRole, service_sessions},
    progress,
};
use futures::{StreamExt, stream};
use serde_json::{Value, json};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

use crate::support::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_workers")).with_file_name(name)
}

/// The environment every service of one test shares.
pub(crate) struct Fleet {
    pub(crate) db_url: String,
    pub(crate) amqp_url: String,
    pub(crate) config: PathBuf,
}

impl Fleet {
    pub(crate) fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(bin(name));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db_url)
            .env("AMQP_URL", &self.amqp_url)
            .env("ENTRIP_CONFIG", &self.config)
            // The same topology arguments as the test's own declarations.
            .env(
                "ENTRIP__AMQP__RETRY_DELAYS_MS",
                RETRY_DELAYS_MS.map(|d| d.to_string()).join(","),
            )
            .env("ENTRIP__AMQP__DELIVERY_LIMIT", DELIVERY_LIMIT.to_string())
            .env("ENTRIP__DISPATCHER__POLL_INTERVAL_MS", "200")
            .env("ENTRIP__LOG__LEVEL", "warn")
            .env("ENTRIP__LOG__FORMAT", "json");
        cmd
    }

    /// An HTTP client with the key of a new API client (scope `*`), issued
    /// by `ingest clients create`, which prints the key alone on stdout.
    fn api_client(&self) -> reqwest::Client {
        self.api_client_named("e2e")
    }

    /// The same for a client of this name.
    pub(crate) fn api_client_named(&self, name: &str) -> reqwest::Client {
        let out = self
            .command("ingest")
            .args(["clients", "create", name, "--scopes", "*"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = String::from_utf8(out.stdout).unwrap();
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", key.trim()).parse().unwrap(),
        );
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap()
    }

    pub(crate) fn spawn(&self, name: &str, listen_key: &str, port: u16) -> Process {
        Process::spawn(
            self.command(name)
                .env(listen_key, format!("127.0.0.1:{port}")),
        )
    }
}

/// A delivery's `traceparent` header and its event.
type Traced = (Option<String>, Value);

/// A webhook receiver that records every delivery's webhook-id, and its
/// `traceparent` with the event.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    seen: Arc<Mutex<HashMap<String, usize>>>,
    traced: Arc<Mutex<Vec<Traced>>>,
}

impl Receiver {
    pub(crate) async fn start(&self) -> String {
        let (seen, traced) = (self.seen.clone(), self.traced.clone());
        let app = Router::new().route(
            "/hooks",
            post(move |headers: HeaderMap, body: Bytes| {
                let (seen, traced) = (seen.clone(), traced.clone());
                async move {
                    let text = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let id = text("webhook-id").unwrap_or_default();
                    *seen.lock().unwrap().entry(id).or_default() += 1;
                    let event = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    traced.lock().unwrap().push((text("traceparent"), event));
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/hooks")
    }

    /// Deliveries by webhook-id.
    fn counts(&self) -> HashMap<String, usize> {
        self.seen.lock().unwrap().clone()
    }

    /// Deliveries received, copies included.
    fn received(&self) -> usize {
        self.seen.lock().unwrap().values().sum()
    }

    /// Each delivery's `traceparent` header and event.
    fn traced(&self) -> Vec<Traced> {
        self.traced.lock().unwrap().clone()
    }
}

/// A subscriber that answers 503 until it is `up` (its owner fixed it);
/// what it took afterwards, by webhook-id.
pub(crate) struct DownSubscriber {
    pub(crate) url: String,
    pub(crate) up: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) seen: Arc<Mutex<HashMap<String, usize>>>,
}

impl DownSubscriber {
    pub(crate) async fn start() -> Self {
        let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let url = {
            let (up, seen) = (up.clone(), seen.clone());
            let app = Router::new().route(
                "/down",
                post(move |headers: HeaderMap| {
                    let (up, seen) = (up.clone(), seen.clone());
                    async move {
                        if !up.load(std::sync::atomic::Ordering::SeqCst) {
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        let id = headers
                            .get("webhook-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        *seen.lock().unwrap().entry(id).or_default() += 1;
                        axum::http::StatusCode::OK
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            format!("http://{addr}/down")
        };
        Self { url, up, seen }
    }
}

/// A queue bound to every event on `entrip.events`: what a downstream
/// subscriber sees. Declared after the topology, before the first request.
async fn tap(amqp_url: &str) -> (lapin::Connection, lapin::Channel, String) {
    let (conn, ch) = channel(amqp_url).await;
    let queue = ch
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let name = queue.name().as_str().to_owned();
    ch.queue_bind(
        name.as_str().into(),
        entrip_common::amqp::EVENTS_EXCHANGE.into(),
        "#".into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    (conn, ch, name)
}

/// Checks every message in the tap against the contract's messages of
/// `entrip.events` (docs/asyncapi.yaml: its AMQP properties, its headers and
/// its body, by docs/schemas/events/<type>.json) and that it is the message
/// of its own type; adds their ids to `seen` (publishing is at least once: a
/// republished copy is checked too, and counted once).
async fn assert_events_match_their_schemas(
    ch: &lapin::Channel,
    queue: &str,
    seen: &mut HashSet<String>,
) {
    let contract = contract();
    while let Some(m) = ch
        .basic_get(queue.into(), lapin::options::BasicGetOptions::default())
        .await
        .unwrap()
    {
        let props = &m.delivery.properties;
        let kind = props
            .kind()
            .as_ref()
            .map(|k| k.as_str().to_owned())
            .unwrap();
        let matched = contract.assert("events", &AmqpMessage::of(&m.delivery));
        assert_eq!(
            contract.message_name(&matched),
            Some(kind.as_str()),
            "a {kind} matches the contract's {matched}"
        );
        assert_eq!(m.delivery.routing_key.as_str(), kind, "routing key = type");
        let event: Value = serde_json::from_slice(&m.delivery.data).unwrap();
        assert_eq!(event["type"], kind.as_str());
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            event["id"].as_str(),
            "message_id is the event id"
        );
        m.delivery
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .unwrap();
        seen.insert(event["id"].as_str().unwrap().to_owned());
    }
}

/// The trace id journey `i`'s requests carry.
fn trace_id(i: usize) -> String {
    format!("{:032x}", 0xe2e0_0000 + i)
}

/// A `traceparent` of journey `i`'s trace, with the span id of the client.
fn traceparent(i: usize) -> String {
    format!("00-{}-{:016x}-01", trace_id(i), 0xc1)
}

fn write_config(url: &str) -> PathBuf {
    write_webhooks(&[(url, r#"["booking.*", "settlement.recorded"]"#)])
}

/// A config file with these subscribers: (url, topics as a TOML array).
pub(crate) fn write_webhooks(hooks: &[(&str, &str)]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("entrip-e2e-{}.toml", Uuid::new_v4().simple()));
    let config: String = hooks
        .iter()
        .map(|(url, topics)| {
            format!(
                "[[notifications.webhooks]]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\ntopics = {topics}\n"
            )
        })
        .collect();
    std::fs::write(&path, config).unwrap();
    path
}

pub(crate) struct Api {
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
}

impl Api {
    pub(crate) async fn post(&self, path: &str, body: Value) -> Value {
        self.post_traced(path, body, None).await
    }

    async fn post_traced(&self, path: &str, body: Value, traceparent: Option<&str>) -> Value {
        let key = format!("e2e-{}", Uuid::new_v4().simple());
        self.post_keyed(path, body, &key, traceparent).await
    }

    pub(crate) async fn post_keyed(
        &self,
        path: &str,
        body: Value,
        key: &str,
        traceparent: Option<&str>,
    ) -> Value {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("idempotency-key", key);
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        let resp = req.json(&body).send().await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }
}

/// The user Kim, created through the API.
pub(crate) async fn create_kim(api: &Api) -> Value {
    api.post(
        "/v1/users",
        json!({"name": "Kim", "email": "kim@example.com", "phone": "010 1234 5678"}),
    )
    .await
}

/// A booking of Kim's with this code: ICN to NRT, 350000 KRW, no approval.
pub(crate) fn kim_booking(code: &str, user: &Value) -> Value {
    json!({
        "code": code, "customerName": "Kim", "customerPhone": "010 1234 5678",
        "itineraryFrom": "ICN", "itineraryTo": "NRT",
        "departAt": "2026-12-24T09:30:00+09:00", "arriveAt": "2026-12-24T11:45:00+09:00",
        "amount": "350000", "userId": user["id"], "requiresApproval": false,
    })
}

/// The booking's payment (by card, its whole amount), approved by the
/// gateway: the booking is settled next.
pub(crate) async fn pay(api: &Api, booking_id: &Value) {
    let payment = api
        .post(
            "/v1/payments",
            json!({"bookingId": booking_id, "method": "CARD", "amount": "350000", "currency": "KRW", "tax": "31818"}),
        )
        .await;
    api.post(
        &format!("/v1/payments/{}/result", payment["id"].as_str().unwrap()),
        json!({"status": "APPROVED", "approvalId": "PG-1"}),
    )
    .await;
}

pub(crate) async fn wait_ready(url: &str) {
    eventually(&format!("{url} answers 2xx"), || async {
        reqwest::get(url)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
}

/// Bookings taken through their journey, 20 at a time: five rounds of the
/// twelve plans.
const JOURNEYS: usize = 60;

/// What one booking's journey does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Plan {
    requires_approval: bool,
    approval_rejected: bool,
    payment_fails: bool,
    /// The approval before the payment, or after it: order must not matter.
    approval_first: bool,
}

impl Plan {
    /// Journey `i`'s plan: each of the 6 kinds of outcome comes up in every
    /// 12 journeys, and the order flips every 12, so 24 journeys hold all 12
    /// plans.
    fn of(i: usize) -> Self {
        let k = i % 12;
        Self {
            requires_approval: k.is_multiple_of(2),
            approval_rejected: k.is_multiple_of(4),
            payment_fails: k.is_multiple_of(3),
            approval_first: (i / 12).is_multiple_of(2),
        }
    }

    /// Whether the booking must end settled.
    fn settles(self) -> bool {
        !self.payment_fails && (!self.requires_approval || !self.approval_rejected)
    }
}

/// Journey `i` of one booking, as its plan says, every request in trace
/// [`trace_id`]`(i)`; returns `i` and the booking's id.
async fn journey(api: &Api, user: &str, i: usize) -> (usize, String) {
    let Plan {
        requires_approval,
        approval_rejected,
        payment_fails,
        approval_first,
    } = Plan::of(i);
    let tp = traceparent(i);
    let api = &InTrace(api, &tp);
    let booking = api
        .post(
            "/v1/bookings",
            json!({
                "code": format!("E2E-{i:05}"), "customerName": "Kim", "customerPhone": "010 1234 5678",
                "itineraryFrom": "ICN", "itineraryTo": "NRT",
                "departAt": "2026-12-24T09:30:00+09:00", "arriveAt": "2026-12-24T11:45:00+09:00",
                "amount": "350000", "userId": user, "requiresApproval": requires_approval,
            }),
        )
        .await;
    let booking_id = booking["id"].as_str().unwrap();
    let approve = async {
        if requires_approval {
            let approval = api
                .post(
                    "/v1/approvals",
                    json!({"bookingId": booking_id, "requesterId": user, "title": "Trip", "reason": "Meeting"}),
                )
                .await;
            let decision = if approval_rejected {
                "REJECTED"
            } else {
                "APPROVED"
            };
            api.post(
                &format!(
                    "/v1/approvals/{}/decision",
                    approval["id"].as_str().unwrap()
                ),
                json!({"approverId": user, "decision": decision}),
            )
            .await;
        }
    };
    let pay = async {
        let payment = api
            .post(
                "/v1/payments",
                json!({"bookingId": booking_id, "method": "CARD", "amount": "350000", "currency": "KRW", "tax": "31818"}),
            )
            .await;
        let result = if payment_fails {
            json!({"status": "FAILED", "reason": "card declined"})
        } else {
            json!({"status": "APPROVED", "approvalId": format!("PG-{i}")})
        };
        api.post(
            &format!("/v1/payments/{}/result", payment["id"].as_str().unwrap()),
            result,
        )
        .await;
    };
    if approval_first {
        approve.await;
        pay.await;
    } else {
        pay.await;
        approve.await;
    }
    (i, booking_id.to_owned())
}

/// The API with every request in one trace.
struct InTrace<'a>(&'a Api, &'a str);

impl InTrace<'_> {
    pub(crate) async fn post(&self, path: &str, body: Value) -> Value {
        self.0.post_traced(path, body, Some(self.1)).await
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn bookings_of_every_plan_end_to_end(_opts: PgPoolOptions, connect: PgConnectOptions) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    // Before the processes: dropped after them if the test fails.
    let role = ServiceRole::create(&pool).await.unwrap();
    let vhost = Vhost::new();
    let receiver = Receiver::default();
    let hook_url = receiver.start().await;
    let fleet = Fleet {
        db_url: role.url().to_owned(),
        amqp_url: vhost.url(),
        config: write_config(&hook_url),
    };
    let (ingest_port, dispatcher_port, workers_port) = (free_port(), free_port(), free_port());
    let mut ingest = fleet.spawn("ingest", "ENTRIP__INGEST__LISTEN", ingest_port);
    let mut dispatcher = fleet.spawn("dispatcher", "ENTRIP__DISPATCHER__LISTEN", dispatcher_port);
    let mut workers = fleet.spawn("workers", "ENTRIP__WORKERS__LISTEN", workers_port);
    let base = format!("http://127.0.0.1:{ingest_port}");
    wait_ready(&format!("{base}/readyz")).await;
    wait_ready(&format!("http://127.0.0.1:{workers_port}/healthz")).await;
    let (_tap_conn, tap_ch, tap_queue) = tap(&fleet.amqp_url).await;

    let api = Api {
        base,
        client: fleet.api_client(),
    };
    let user = api
        .post(
            "/v1/users",
            json!({"name": "Kim", "email": "kim@example.com", "phone": "010 1234 5678"}),
        )
        .await;
    let user = user["id"].as_str().unwrap().to_owned();
    let plans: HashSet<Plan> = (0..JOURNEYS).map(Plan::of).collect();
    assert_eq!(plans.len(), 12, "every plan, in both orders: {plans:?}");
    let journeys: HashMap<String, usize> = stream::iter(0..JOURNEYS)
        .map(|i| journey(&api, &user, i))
        .buffer_unordered(20)
        .map(|(i, booking)| (booking, i))
        .collect()
        .await;
    let expected = (0..JOURNEYS).filter(|i| Plan::of(*i).settles()).count() as i64;
    assert!(
        expected > 0 && expected < JOURNEYS as i64,
        "a mix of outcomes: {expected}"
    );

    let settled = || scalar(&pool, "SELECT count(*) FROM settlements");
    until_count("every allowed booking settled", expected, settled).await;
    assert_eq!(settled().await, expected);
    // Settlements are exactly the approved-and-allowed set.
    let wrong = scalar(
        &pool,
        "SELECT count(*) FROM bookings b
          WHERE (b.status = 'CONFIRMED') <> (
                EXISTS (SELECT 1 FROM payments p WHERE p.booking_id = b.id AND p.status = 'APPROVED')
            AND (NOT b.requires_approval
                 OR EXISTS (SELECT 1 FROM approvals a WHERE a.booking_id = b.id AND a.status = 'APPROVED')))",
    )
    .await;
    assert_eq!(wrong, 0);
    progress("outbox drained", || async {
        let undelivered = scalar(
            &pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
        )
        .await;
        (undelivered, undelivered == 0)
    })
    .await;
    // Every event published is what the contract says (docs/asyncapi.yaml).
    let published: HashSet<String> = sqlx::query_scalar("SELECT id::text FROM outbox")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let tapped = std::cell::RefCell::new(HashSet::new());
    progress("every event in the tap, checked", || async {
        let mut seen = tapped.take();
        assert_events_match_their_schemas(&tap_ch, &tap_queue, &mut seen).await;
        let n = seen.len();
        tapped.replace(seen);
        (n, n >= published.len())
    })
    .await;
    assert_eq!(tapped.into_inner(), published, "every event in the tap");
    let hooked = scalar(
        &pool,
        "SELECT count(*) FROM outbox WHERE topic LIKE 'booking.%' OR topic = 'settlement.recorded'",
    )
    .await;
    until_count("every webhook received", hooked, || async {
        receiver.counts().len() as i64
    })
    .await;
    // Only lets a stray copy arrive (none must): no progress to wait for.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.counts().len() as i64, hooked);
    assert_eq!(receiver.received() as i64, hooked, "no copies");
    let counts = receiver.counts();
    assert!(
        counts.values().all(|n| *n == 1),
        "each webhook exactly once"
    );
    // One trace from request to webhook: each webhook (booking.* from
    // ingest, booking.confirmed and settlement.recorded from the
    // settlement worker) carries its journey's trace id, and a span id of
    // the fleet's own, not the client's.
    let traced = receiver.traced();
    assert_eq!(traced.len() as i64, hooked);
    let mut from_workers = 0;
    for (tp, event) in &traced {
        let data = &event["data"];
        let booking = match event["type"].as_str() {
            Some("settlement.recorded") => &data["bookingId"],
            _ => &data["id"],
        };
        let i = journeys[booking.as_str().unwrap()];
        let tp = tp
            .as_deref()
            .unwrap_or_else(|| panic!("no traceparent: {event}"));
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(parts[1], trace_id(i), "{event}");
        assert_ne!(tp, traceparent(i), "the webhook is a span of its own");
        if event["source"] == "/entrip/workers" {
            from_workers += 1;
        }
    }
    let settled_events = expected * 2;
    assert_eq!(
        from_workers, settled_events,
        "booking.confirmed and settlement.recorded"
    );
    // All three did their work through sessions of the role.
    service_sessions(&pool)
        .await
        .unwrap()
        .assert_least_privilege(&["ingest", "dispatcher", "workers"]);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM notification_deliveries WHERE status = 'DELIVERED'"
        )
        .await,
        hooked
    );

    let out = fleet
        .command("workers")
        .args(["integrity", "--once"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "integrity: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for p in [&ingest, &dispatcher, &workers] {
        p.signal("-TERM");
    }
    for p in [&mut ingest, &mut dispatcher, &mut workers] {
        assert!(p.wait_exit().await.success());
    }
    let _ = std::fs::remove_file(&fleet.config);
    role.drop_role().await.unwrap();
    pool.close().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn workers_killed_mid_stream_apply_every_effect_once(
    _opts: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    // Before the row locks below, which its ALTERs would wait for.
    let role = ServiceRole::create(&pool).await.unwrap();
    let vhost = Vhost::new();
    let receiver = Receiver::default();
    let hook_url = receiver.start().await;
    let fleet = Fleet {
        db_url: role.url().to_owned(),
        amqp_url: vhost.url(),
        config: write_config(&hook_url),
    };
    let (_conn, ch) = channel(&vhost.url()).await;
    let ids = approved_bookings(&pool, 300).await;
    let settled = || scalar(&pool, "SELECT count(*) FROM settlements");
    // The last 50 bookings stay locked until the kill, so the stream cannot
    // end before it however the machine schedules this test; their
    // handlers wait on the lock inside their transactions, and are killed
    // there.
    let mut held = pool.begin().await.unwrap();
    let last: Vec<Uuid> = ids[250..].iter().map(|f| f.booking).collect();
    sqlx::query("SELECT id FROM bookings WHERE id = ANY($1) FOR UPDATE")
        .bind(&last)
        .fetch_all(&mut *held)
        .await
        .unwrap();
    let mut workers = fleet.spawn("workers", "ENTRIP__WORKERS__LISTEN", free_port());
    publish_approved(&ch, &ids).await;
    until_count("some settled", 30, settled).await;
    service_sessions(&pool)
        .await
        .unwrap()
        .assert_least_privilege(&["workers"]);
    workers.signal("-KILL");
    assert!(!workers.wait_exit().await.success());
    let at_kill = settled().await;
    held.rollback().await.unwrap();
    // Redeliver everything once more on top, as a relay restart would.
    publish_approved(&ch, ids.iter().take(50)).await;
    let mut again = fleet.spawn("workers", "ENTRIP__WORKERS__LISTEN", free_port());
    until_count("all 300 settled", 300, settled).await;
    assert_eq!(settled().await, 300);
    assert!(at_kill < 300, "killed mid-stream");
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM outbox WHERE topic = 'settlement.recorded'"
        )
        .await,
        300
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM outbox WHERE topic = 'booking.confirmed'"
        )
        .await,
        300
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM audit_log WHERE action = 'settlement.record'"
        )
        .await,
        300
    );
    service_sessions(&pool)
        .await
        .unwrap()
        .assert_least_privilege(&["workers"]);
    again.signal("-TERM");
    assert!(again.wait_exit().await.success());
    let _ = std::fs::remove_file(&fleet.config);
    role.drop_role().await.unwrap();
    pool.close().await;
}

/// `dispatcher trace` answers "where is the notification of booking X?"
/// from a real fleet: the booking's stored key, its payment and
/// settlement, the audit trail, each event published, and per subscriber a
/// delivery (DELIVERED to the receiver, DEAD to a subscriber that is down);
/// `dispatcher notifications redeliver` sends the dead one again once the
/// subscriber is back, and a delivered one again by topic, each to the
/// subscriber named alone; for a booking whose event the stopped relay has
/// not published, the subscriber's notification is NONE with where to look
/// (and nothing is redelivered); an unknown booking exits 1.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn trace_answers_where_the_notification_of_a_booking_is(
    _opts: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let role = ServiceRole::create(&pool).await.unwrap();
    let vhost = Vhost::new();
    let receiver = Receiver::default();
    let hook_url = receiver.start().await;
    let DownSubscriber {
        url: down_url,
        up,
        seen: down_seen,
    } = DownSubscriber::start().await;
    let fleet = Fleet {
        db_url: role.url().to_owned(),
        amqp_url: vhost.url(),
        // The one that is down first: the workers try subscribers in this
        // order, so a copy sent to both has met it before the receiver.
        config: write_webhooks(&[
            (&down_url, r#"["settlement.recorded"]"#),
            (&hook_url, r#"["booking.*", "settlement.recorded"]"#),
        ]),
    };
    let (ingest_port, dispatcher_port, workers_port) = (free_port(), free_port(), free_port());
    let mut ingest = fleet.spawn("ingest", "ENTRIP__INGEST__LISTEN", ingest_port);
    let mut dispatcher = fleet.spawn("dispatcher", "ENTRIP__DISPATCHER__LISTEN", dispatcher_port);
    // One retry: the subscriber that is down is DEAD within a second.
    let mut workers = Process::spawn(
        fleet
            .command("workers")
            .env(
                "ENTRIP__WORKERS__LISTEN",
                format!("127.0.0.1:{workers_port}"),
            )
            .env("ENTRIP__WORKERS__MAX_RETRIES", "1"),
    );
    let base = format!("http://127.0.0.1:{ingest_port}");
    wait_ready(&format!("{base}/readyz")).await;
    wait_ready(&format!("http://127.0.0.1:{workers_port}/healthz")).await;
    let api = Api {
        base,
        client: fleet.api_client(),
    };
    let user = create_kim(&api).await;
    let booking_body = |code: &str| kim_booking(code, &user);
    let key = format!("trace-{}", Uuid::new_v4().simple());
    let booking = api
        .post_keyed("/v1/bookings", booking_body("TRACE-00001"), &key, None)
        .await;
    let booking_id = booking["id"].as_str().unwrap().to_owned();
    pay(&api, &booking["id"]).await;

    let trace = |args: &[&str]| {
        let out = fleet
            .command("dispatcher")
            .arg("trace")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let json_trace = |args: &[&str]| -> Value {
        let (code, stdout, stderr) = trace(args);
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    let delivery = |t: &Value, topic: &str, subscriber: &str| -> Value {
        t["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["topic"] == topic)
            .flat_map(|e| e["deliveries"].as_array().unwrap().clone())
            .find(|d| d["subscriber"] == subscriber)
            .unwrap_or(Value::Null)
    };
    // Settled, and the subscriber that is down given up on.
    eventually("the settlement's webhooks delivered and dead", || async {
        let t = json_trace(&["TRACE-00001", "--json"]);
        delivery(&t, "settlement.recorded", &hook_url)["status"] == "DELIVERED"
            && delivery(&t, "settlement.recorded", &down_url)["status"] == "DEAD"
    })
    .await;
    let t = json_trace(&["TRACE-00001", "--json"]);
    assert_eq!(t["booking"]["id"], booking_id.as_str());
    assert_eq!(t["booking"]["status"], "CONFIRMED");
    assert_eq!(t["booking"]["settlement"]["bookingId"], booking_id.as_str());
    assert_eq!(t["payments"].as_array().unwrap().len(), 1);
    assert_eq!(t["payments"][0]["status"], "APPROVED");
    // The key the booking was created under, with its stored answer.
    let keys = t["keys"].as_array().unwrap();
    let stored = keys
        .iter()
        .find(|k| k["key"] == key.as_str())
        .unwrap_or_else(|| panic!("{key} in {t}"));
    assert_eq!(stored["client"], "e2e");
    assert_eq!(stored["method"], "POST");
    assert_eq!(stored["path"], "/v1/bookings");
    assert_eq!(stored["response_status"], 201);
    assert_eq!(stored["response_body"]["id"], booking_id.as_str());
    assert_eq!(stored["request_hash"].as_str().unwrap().len(), 64);
    assert_eq!(keys.len(), 3, "booking, payment and its result: {t}");
    // The trail: the booking created by the client, then paid, then settled
    // and confirmed by the worker.
    let actions: Vec<(String, String)> = t["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["actor"].as_str().unwrap().to_owned(),
                a["entity_type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        actions.first().unwrap(),
        &("client:e2e".to_owned(), "booking".to_owned()),
        "{t}"
    );
    assert!(
        actions.contains(&("worker:settlement".to_owned(), "settlement".to_owned())),
        "{actions:?}"
    );
    let events = t["events"].as_array().unwrap();
    assert_eq!(
        events.len(),
        t["audit"].as_array().unwrap().len(),
        "an event per change"
    );
    for e in events {
        assert_eq!(e["state"], "published", "{e}");
        assert!(e["outbox"]["published_at"].is_string(), "{e}");
    }
    let topics: Vec<&str> = events
        .iter()
        .map(|e| e["topic"].as_str().unwrap())
        .collect();
    for topic in [
        "booking.created",
        "payment.requested",
        "payment.approved",
        "settlement.recorded",
        "booking.confirmed",
    ] {
        assert!(topics.contains(&topic), "{topic} in {topics:?}");
    }
    // Per subscriber: the receiver got the booking's events, the subscriber
    // that is down only wanted the settlement, and it is dead with a hint.
    for topic in [
        "booking.created",
        "booking.confirmed",
        "settlement.recorded",
    ] {
        let d = delivery(&t, topic, &hook_url);
        assert_eq!(d["status"], "DELIVERED", "{topic}: {d}");
        assert_eq!(d["record"]["last_status_code"], 200, "{d}");
    }
    assert_eq!(
        delivery(&t, "booking.created", &down_url),
        Value::Null,
        "not subscribed"
    );
    assert_eq!(
        delivery(&t, "payment.approved", &hook_url),
        Value::Null,
        "not subscribed"
    );
    let dead = delivery(&t, "settlement.recorded", &down_url);
    assert_eq!(dead["record"]["attempts"], 2, "{dead}");
    assert!(
        dead["hint"]
            .as_str()
            .unwrap()
            .contains("dispatcher notifications redeliver"),
        "{dead}"
    );
    // The webhook the trace calls delivered did arrive, once.
    let settlement_event = events
        .iter()
        .find(|e| e["topic"] == "settlement.recorded")
        .unwrap();
    assert_eq!(
        receiver
            .counts()
            .get(settlement_event["id"].as_str().unwrap()),
        Some(&1)
    );
    // By id, the same trace; read as text, the same answer.
    let by_id = json_trace(&[&booking_id, "--json"]);
    assert_eq!(by_id["events"], t["events"]);
    let (code, text, stderr) = trace(&["TRACE-00001"]);
    assert_eq!(code, Some(0), "{stderr}");
    for needle in [
        format!("booking {booking_id} code TRACE-00001 CONFIRMED"),
        format!("client e2e key {key}: POST /v1/bookings -> 201"),
        format!("-> {hook_url} DELIVERED after 1 attempt(s), last answer 200"),
        format!("-> {down_url} DEAD after 2 attempt(s)"),
        "payment.requested: published ".to_owned(),
        "-> no subscriber wants this topic".to_owned(),
    ] {
        assert!(text.contains(&needle), "{needle:?} in\n{text}");
    }

    let settlement_id = settlement_event["id"].as_str().unwrap().to_owned();
    let redeliver = |args: &[&str]| {
        let out = fleet
            .command("dispatcher")
            .args(["notifications", "redeliver"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Sent again to the receiver while the other subscriber is still down
    // and DEAD: the copy is for the receiver alone.
    let (code, stdout, stderr) = redeliver(&[
        "TRACE-00001",
        "--subscriber",
        &hook_url,
        "--topic",
        "settlement.*",
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("1 event(s) sent again"), "{stdout}");
    eventually("the settlement sent again to the receiver", || async {
        receiver.counts().get(&settlement_id) == Some(&2)
            && delivery(
                &json_trace(&["TRACE-00001", "--json"]),
                "settlement.recorded",
                &hook_url,
            )["record"]["attempts"]
                == 2
    })
    .await;
    let t = json_trace(&["TRACE-00001", "--json"]);
    let still = delivery(&t, "settlement.recorded", &down_url);
    assert_eq!(still["status"], "DEAD", "{still}");
    assert_eq!(
        still["record"]["attempts"], 2,
        "not tried by the copy: {still}"
    );

    // The subscriber is back: its notification is sent again, to it alone.
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, stdout, stderr) = redeliver(&["TRACE-00001", "--subscriber", &down_url]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with(&format!(
            "1 event(s) sent again to {down_url}\n- {settlement_id} settlement.recorded\n"
        )),
        "{stdout}"
    );
    eventually("the dead notification delivered on redelivery", || async {
        down_seen.lock().unwrap().get(&settlement_id) == Some(&1)
    })
    .await;
    let t = json_trace(&["TRACE-00001", "--json"]);
    let again = delivery(&t, "settlement.recorded", &down_url);
    assert_eq!(again["status"], "DELIVERED", "{again}");
    assert_eq!(again["record"]["attempts"], 3, "{again}");
    // A delivered one, by topic, to the other subscriber: sent once more.
    let created_id = t["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["topic"] == "booking.created")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, stdout, stderr) = redeliver(&[
        "TRACE-00001",
        "--subscriber",
        &hook_url,
        "--topic",
        "booking.created",
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("1 event(s) sent again"), "{stdout}");
    eventually("booking.created sent again", || async {
        receiver.counts().get(&created_id) == Some(&2)
    })
    .await;
    // Each to the subscriber asked for only.
    assert_eq!(receiver.counts().get(&settlement_id), Some(&2));
    assert_eq!(down_seen.lock().unwrap().len(), 1, "only the settlement");
    let (code, _, stderr) =
        redeliver(&["TRACE-00001", "--subscriber", "http://127.0.0.1:9/nobody"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("is not a configured subscriber"),
        "{stderr}"
    );
    // A pattern of none of the subscriber's topics (or none at all).
    for pattern in ["payment.*", "settlement"] {
        let (code, _, stderr) =
            redeliver(&["TRACE-00001", "--subscriber", &down_url, "--topic", pattern]);
        assert_eq!(code, Some(1), "{pattern}: {stderr}");
        assert!(
            stderr.contains(&format!("--topic {pattern:?} matches none")),
            "{stderr}"
        );
    }
    // A database that cannot be reached is not "not found": exit 2.
    let out = fleet
        .command("dispatcher")
        .args(["trace", "TRACE-00001"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("ENTRIP__DATABASE__STARTUP_TIMEOUT_SECS", "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The relay stopped: a new booking's event waits in the outbox, and its
    // notification is not sent, with where to look.
    dispatcher.signal("-TERM");
    assert!(dispatcher.wait_exit().await.success());
    // A redelivery the broker refuses (the dispatcher's user may no longer
    // publish to the default exchange) leaves the pairs as they were: exit
    // 2, the receiver's pair still DELIVERED with its attempts, nothing sent.
    let before = delivery(
        &json_trace(&["TRACE-00001", "--json"]),
        "booking.created",
        &hook_url,
    );
    assert_eq!(before["status"], "DELIVERED", "{before}");
    vhost.set_permissions(".*", r"^entrip\..*", ".*");
    let (code, stdout, stderr) = redeliver(&[
        "TRACE-00001",
        "--subscriber",
        &hook_url,
        "--topic",
        "booking.created",
    ]);
    vhost.set_permissions(".*", ".*", ".*");
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("RabbitMQ"), "{stderr}");
    let after = delivery(
        &json_trace(&["TRACE-00001", "--json"]),
        "booking.created",
        &hook_url,
    );
    assert_eq!(after["status"], "DELIVERED", "rolled back: {after}");
    assert_eq!(
        after["record"]["attempts"], before["record"]["attempts"],
        "{after}"
    );
    assert_eq!(receiver.counts().get(&created_id), Some(&2), "nothing sent");

    let key2 = format!("trace-{}", Uuid::new_v4().simple());
    let second = api
        .post_keyed("/v1/bookings", booking_body("TRACE-00002"), &key2, None)
        .await;
    let t2 = json_trace(&["--key", &key2, "--client", "e2e", "--json"]);
    assert_eq!(t2["booking"]["id"], second["id"]);
    assert_eq!(t2["keys"].as_array().unwrap().len(), 1);
    assert_eq!(t2["events"][0]["state"], "pending");
    let waiting = delivery(&t2, "booking.created", &hook_url);
    assert_eq!(waiting["status"], "NONE", "{t2}");
    assert!(
        waiting["hint"]
            .as_str()
            .unwrap()
            .contains("not published yet"),
        "{waiting}"
    );
    // The same key from another client for another booking: without the
    // client the key is ambiguous (exit 1), with it each is its own.
    let other = Api {
        base: api.base.clone(),
        client: fleet.api_client_named("other"),
    };
    let third = other
        .post_keyed("/v1/bookings", booking_body("TRACE-00003"), &key2, None)
        .await;
    let (code, _, stderr) = trace(&["--key", &key2]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("answered for several bookings (e2e, other)"),
        "{stderr}"
    );
    assert_eq!(
        json_trace(&["--key", &key2, "--client", "other", "--json"])["booking"]["id"],
        third["id"]
    );
    // A key of one client only, without the client: found all the same.
    let key3 = format!("trace-{}", Uuid::new_v4().simple());
    let fourth = api
        .post_keyed("/v1/bookings", booking_body("TRACE-00004"), &key3, None)
        .await;
    assert_eq!(
        json_trace(&["--key", &key3, "--json"])["booking"]["id"],
        fourth["id"]
    );

    // Redelivering TRACE-00002 now sends nothing: the relay has not
    // published it.
    let (code, stdout, stderr) = redeliver(&["TRACE-00002", "--subscriber", &hook_url]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("0 event(s) sent again"), "{stdout}");
    assert!(
        stdout.contains("not sent: booking.created is pending"),
        "{stdout}"
    );

    // Nothing to trace: exit 1 and why.
    let (code, stdout, stderr) = trace(&["NO-SUCH-CODE"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("no booking with id or code \"NO-SUCH-CODE\""),
        "{stderr}"
    );
    let (code, _, stderr) = trace(&["--key", "no-such-key-0000000"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no stored idempotency key"), "{stderr}");

    for p in [&ingest, &workers] {
        p.signal("-TERM");
    }
    for p in [&mut ingest, &mut workers] {
        assert!(p.wait_exit().await.success());
    }
    let _ = std::fs::remove_file(&fleet.config);
    role.drop_role().await.unwrap();
    pool.close().await;
}

/// What the killing receiver saw: per `webhook-id`, when each copy came.
#[derive(Default)]
struct KillState {
    pid: std::sync::atomic::AtomicU32,
    copies: Mutex<HashMap<String, Vec<std::time::Instant>>>,
    killed_at: Mutex<Option<std::time::Instant>>,
}

/// The workers are SIGKILLed by the webhook receiver itself, while it
/// handles the 10th event: the receiver has taken that event (and may have
/// answered 2xx to others in flight) and the worker recorded none of them,
/// the state of a death between the receiver's 2xx and the record. After a
/// restart, exactly the events the receiver had taken whose pair was not
/// DELIVERED at the kill come once more, and only once the dead worker's
/// lease ran out; every other event comes once.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_worker_killed_during_a_webhook_sends_it_at_most_once_more(
    _opts: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let role = ServiceRole::create(&pool).await.unwrap();
    let vhost = Vhost::new();
    let state = Arc::new(KillState::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let app = Router::new().route(
        "/hooks",
        post({
            let state = state.clone();
            move |headers: HeaderMap| {
                let state = state.clone();
                async move {
                    let id = headers
                        .get("webhook-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let kill = {
                        let mut copies = state.copies.lock().unwrap();
                        copies
                            .entry(id)
                            .or_default()
                            .push(std::time::Instant::now());
                        let mut killed = state.killed_at.lock().unwrap();
                        let kill = killed.is_none() && copies.len() == 10;
                        if kill {
                            *killed = Some(std::time::Instant::now());
                        }
                        kill
                    };
                    if kill {
                        let pid = state.pid.load(std::sync::atomic::Ordering::SeqCst);
                        let status = Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .status()
                            .unwrap();
                        assert!(status.success());
                    }
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let timeout_ms: u64 = 2_000;
    let fleet = Fleet {
        db_url: role.url().to_owned(),
        amqp_url: vhost.url(),
        config: write_webhooks(&[(&hook_url, r#"["booking.created"]"#)]),
    };
    let spawn_workers = || {
        Process::spawn(
            fleet
                .command("workers")
                .env(
                    "ENTRIP__WORKERS__LISTEN",
                    format!("127.0.0.1:{}", free_port()),
                )
                .env("ENTRIP__NOTIFICATIONS__TIMEOUT_MS", timeout_ms.to_string()),
        )
    };
    let (_conn, ch) = channel(&vhost.url()).await;
    let events: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
    let mut workers = spawn_workers();
    state
        .pid
        .store(workers.0.id(), std::sync::atomic::Ordering::SeqCst);
    for id in &events {
        publish_event(
            &ch,
            *id,
            "booking.created",
            json!({"id": id, "code": "BK-0001", "status": "PENDING"}),
        )
        .await;
    }
    assert!(
        !workers.wait_exit().await.success(),
        "killed by the receiver"
    );
    let killed_at = state.killed_at.lock().unwrap().expect("killed");
    let delivered_at_kill: HashSet<String> = sqlx::query_scalar(
        "SELECT event_id::text FROM notification_deliveries WHERE status = 'DELIVERED'",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let taken_at_kill: HashSet<String> = state.copies.lock().unwrap().keys().cloned().collect();
    let resent: HashSet<String> = taken_at_kill
        .difference(&delivered_at_kill)
        .cloned()
        .collect();
    assert!(
        !resent.is_empty(),
        "at least the 10th was taken and not recorded"
    );

    let mut again = spawn_workers();
    let copies = || {
        let c = state.copies.lock().unwrap();
        c.values().map(Vec::len).sum::<usize>()
    };
    let expected = events.len() + resent.len();
    progress(
        "every event delivered, the unrecorded ones twice",
        || async {
            let n = copies();
            (n, n >= expected)
        },
    )
    .await;
    eventually("every pair recorded DELIVERED", || async {
        scalar(
            &pool,
            "SELECT count(*) FROM notification_deliveries WHERE status = 'DELIVERED'",
        )
        .await
            == events.len() as i64
    })
    .await;
    let lease = Duration::from_millis(timeout_ms) + entrip_workers::notifications::LEASE_MARGIN;
    let copies = state.copies.lock().unwrap().clone();
    assert_eq!(copies.len(), events.len());
    for (id, times) in &copies {
        let want = if resent.contains(id) { 2 } else { 1 };
        assert_eq!(times.len(), want, "{id}: {} copies", times.len());
        if want == 2 {
            // Not before the dead worker's lease ran out (claimed before
            // the kill, so at most `lease` after it, and at least `lease`
            // after the first copy was claimed).
            let gap = times[1] - times[0];
            assert!(
                gap >= lease - Duration::from_secs(1),
                "{id}: sent again {gap:?} after the first copy, within the lease"
            );
            assert!(times[1] > killed_at);
        }
    }
    again.signal("-TERM");
    assert!(again.wait_exit().await.success());
    let _ = std::fs::remove_file(&fleet.config);
    role.drop_role().await.unwrap();
    pool.close().await;
}
