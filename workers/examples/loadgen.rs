//! Load for `scripts/bench-workers`.
//!
//! `loadgen steady <ingest url> <journeys per second> <seconds>`: drives
//! journeys through ingest at a fixed rate (booking, payment, APPROVED
//! result), so that the commit-to-settlement latency can be read from the
//! database afterwards.
//!
//! `loadgen closed <ingest url> <concurrency> <seconds>`: journeys back to
//! back from `concurrency` clients: the fleet's capacity, the rate the
//! steady runs offer multiples of.
//!
//! Both behave as a real upstream: a 503 is retried with the same
//! Idempotency-Key after its `Retry-After` (at most [`MAX_RETRIES`] times
//! per request), and the refusals, how fast they came, and the retries are
//! counted apart from the journeys.
//!
//! `loadgen backlog <database url> <amqp url> <count>`: stores `count`
//! bookings with approved payments and publishes their `payment.approved`
//! events, building a backlog on `entrip.settlement` for the consumer
//! throughput measurement.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use entrip_common::{amqp, config::AmqpSettings};
use futures::future::join_all;
use lapin::{
    BasicProperties, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use uuid::Uuid;

/// Journeys in flight before the steady load sheds.
const MAX_IN_FLIGHT: usize = 2_000;
/// Retries of one refused (503) request before the journey counts as failed.
const MAX_RETRIES: u32 = 10;
/// The wait when a 503 carries no usable `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the client saw besides the journeys themselves.
#[derive(Default)]
struct Tally {
    /// 503 answers.
    refused: AtomicU64,
    /// Requests sent again after a 503.
    retries: AtomicU64,
    /// How long each refusal took to arrive, in microseconds.
    refusal_us: Mutex<Vec<u64>>,
    /// How long each completed journey took, retries included, in microseconds.
    journey_us: Mutex<Vec<u64>>,
}

impl Tally {
    fn push(list: &Mutex<Vec<u64>>, d: Duration) {
        if let Ok(mut l) = list.lock() {
            l.push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        }
    }

    /// `name_p50_ms=… name_p99_ms=…` of a list (0 when empty).
    fn percentiles(name: &str, list: &Mutex<Vec<u64>>) -> String {
        let mut l = list.lock().map(|l| l.clone()).unwrap_or_default();
        l.sort_unstable();
        let at = |q: f64| {
            if l.is_empty() {
                0.0
            } else {
                let i = ((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1;
                l[i] as f64 / 1000.0
            }
        };
        format!("{name}_p50_ms={:.1} {name}_p99_ms={:.1}", at(0.5), at(0.99))
    }

    fn summary(&self) -> String {
        format!(
            "refused={} retries={} {} {}",
            self.refused.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
            Self::percentiles("refusal", &self.refusal_us),
            Self::percentiles("journey", &self.journey_us),
        )
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("steady") if args.len() == 5 => {
            steady(&args[2], args[3].parse()?, args[4].parse()?).await
        }
        Some("closed") if args.len() == 5 => {
            closed(&args[2], args[3].parse()?, args[4].parse()?).await
        }
        Some("backlog") if args.len() == 5 => backlog(&args[2], &args[3], args[4].parse()?).await,
        _ => bail!(
            "usage: loadgen steady <ingest url> <rate> <seconds> | loadgen closed <ingest url> <concurrency> <seconds> | loadgen backlog <db url> <amqp url> <count>"
        ),
    }
}

/// One request, sent again with the same key after each 503's `Retry-After`.
async fn post(
    client: &reqwest::Client,
    tally: &Tally,
    url: String,
    body: Value,
) -> anyhow::Result<Value> {
    let key = format!("load-{}", Uuid::new_v4().simple());
    for attempt in 0..=MAX_RETRIES {
        if attempt > 0 {
            tally.retries.fetch_add(1, Ordering::Relaxed);
        }
        let sent = Instant::now();
        let resp = client
            .post(&url)
            .header("idempotency-key", &key)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            Tally::push(&tally.refusal_us, sent.elapsed());
            tally.refused.fetch_add(1, Ordering::Relaxed);
            let wait = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs);
            // Read to the end, so that the connection is kept for reuse.
            let _ = resp.bytes().await;
            tokio::time::sleep(wait).await;
            continue;
        }
        let body: Value = resp.json().await?;
        if !status.is_success() {
            bail!("{status}: {body}");
        }
        return Ok(body);
    }
    bail!("{url}: still 503 after {MAX_RETRIES} retries")
}

async fn journey(
    client: reqwest::Client,
    tally: Arc<Tally>,
    base: String,
    user: String,
    n: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let booking = post(
        &client,
        &tally,
        format!("{base}/v1/bookings"),
        json!({
            "code": format!("LOAD-{}-{n}", &Uuid::new_v4().simple().to_string()[..6].to_uppercase()),
            "customerName": "Load", "customerPhone": "010 0000 0000", "itineraryFrom": "ICN", "itineraryTo": "NRT",
            "departAt": "2026-12-24T09:30:00Z", "arriveAt": "2026-12-24T11:45:00Z", "amount": "350000", "userId": user,
        }),
    )
    .await?;
    let payment = post(
        &client,
        &tally,
        format!("{base}/v1/payments"),
        json!({"bookingId": booking["id"], "method": "CARD", "amount": "350000", "currency": "KRW", "tax": "31818"}),
    )
    .await?;
    let id = payment["id"].as_str().context("payment id")?;
    post(
        &client,
        &tally,
        format!("{base}/v1/payments/{id}/result"),
        json!({"status": "APPROVED", "approvalId": format!("PG-{n}")}),
    )
    .await?;
    Tally::push(&tally.journey_us, started.elapsed());
    Ok(())
}

/// The client, the tally and a user for the journeys.
async fn setup(base: &str) -> anyhow::Result<(reqwest::Client, Arc<Tally>, String)> {
    let client = reqwest::Client::builder()
        .default_headers(entrip_testkit::bearer_from_env()?)
        .build()?;
    let tally = Arc::new(Tally::default());
    let user = post(
        &client,
        &tally,
        format!("{base}/v1/users"),
        json!({"name": "Load", "email": format!("load-{}@example.com", Uuid::new_v4().simple()), "phone": "010 0000 0000"}),
    )
    .await?;
    let user = user["id"].as_str().context("user id")?.to_owned();
    // The user's own request is not part of what is measured.
    Ok((client, Arc::new(Tally::default()), user))
}

async fn closed(base: &str, concurrency: u64, secs: u64) -> anyhow::Result<()> {
    let (client, tally, user) = setup(base).await?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let next = Arc::new(AtomicU64::new(0));
    let clients = (0..concurrency).map(|_| {
        let (client, tally, user, base, next) = (
            client.clone(),
            tally.clone(),
            user.clone(),
            base.to_owned(),
            next.clone(),
        );
        tokio::spawn(async move {
            let (mut completed, mut failed) = (0u64, 0u64);
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let done =
                    journey(client.clone(), tally.clone(), base.clone(), user.clone(), n).await;
                match done {
                    Ok(()) if Instant::now() <= deadline => completed += 1,
                    Ok(()) => {}
                    Err(_) => failed += 1,
                }
            }
            (completed, failed)
        })
    });
    let (mut completed, mut failed) = (0, 0);
    for r in join_all(clients).await {
        let (c, f) = r?;
        completed += c;
        failed += f;
    }
    let secs = secs as f64;
    println!(
        "RESULT closed concurrency={concurrency} completed={completed} failed={failed} rps={:.1} {} secs={secs:.1}",
        completed as f64 / secs,
        tally.summary()
    );
    Ok(())
}

async fn steady(base: &str, rate: u64, secs: u64) -> anyhow::Result<()> {
    let (client, tally, user) = setup(base).await?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    // Open loop, but not unbounded: past this many journeys in flight the
    // client sheds (counted), rather than exhausting sockets.
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let start = Instant::now();
    let mut tasks = Vec::new();
    let (mut n, mut shed) = (0, 0);
    while start.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        n += 1;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            shed += 1;
            continue;
        };
        let journey = journey(
            client.clone(),
            tally.clone(),
            base.to_owned(),
            user.clone(),
            n,
        );
        tasks.push(tokio::spawn(async move {
            let done = journey.await;
            drop(permit);
            (done, Instant::now())
        }));
    }
    let window_end = Instant::now();
    let offered_secs = start.elapsed().as_secs_f64();
    let (mut failed, mut completed, mut in_window) = (0, 0, 0);
    for t in join_all(tasks).await {
        match t {
            Ok((Ok(()), at)) => {
                completed += 1;
                if at <= window_end {
                    in_window += 1;
                }
            }
            _ => failed += 1,
        }
    }
    // The sustained rate counts only journeys finished while the load was
    // offered: a fleet falling behind finishes the rest afterwards.
    println!(
        "RESULT steady bookings={n} shed={shed} failed={failed} completed={completed} in_window={in_window} {} secs={offered_secs:.1} drained_secs={:.1}",
        tally.summary(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn backlog(db_url: &str, amqp_url: &str, count: i64) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(db_url).await?;
    let user = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO users (id, name, email, phone) VALUES ($1, 'Load', $2, '010 0000 0000')",
    )
    .bind(user)
    .bind(format!("{}@example.com", user.simple()))
    .execute(&pool)
    .await?;
    let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "WITH b AS (
             INSERT INTO bookings (id, code, user_id, customer_name, customer_phone, itinerary_from, itinerary_to,
                                   depart_at, arrive_at, currency, amount)
             SELECT gen_random_uuid(), 'BL-' || lpad(i::text, 8, '0'), $1, 'Load', '010 0000 0000', 'ICN', 'NRT',
                    '2026-12-24T00:30:00Z', '2026-12-24T02:45:00Z', 'KRW', 350000
               FROM generate_series(1, $2) i
             RETURNING id)
         INSERT INTO payments (id, booking_id, method, amount, tax, currency, status, approval_id, decided_at)
         SELECT gen_random_uuid(), id, 'CARD', 350000, 31818, 'KRW', 'APPROVED', 'PG', now() FROM b
         RETURNING id, booking_id",
    )
    .bind(user)
    .bind(count)
    .fetch_all(&pool)
    .await?;
    let conn = amqp::connect(amqp_url, "loadgen").await?;
    let channel = conn.create_channel().await?;
    let settings = AmqpSettings {
        url: amqp_url.to_owned(),
        ..AmqpSettings::default()
    };
    amqp::declare_topology(&channel, &settings).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for chunk in rows.chunks(500) {
        let mut confirms = Vec::new();
        for (payment, booking) in chunk {
            let id = Uuid::now_v7();
            let body = json!({"specversion": "1.0", "id": id, "source": "/entrip/ingest", "type": "payment.approved",
                              "subject": payment, "time": "2026-11-26T00:00:00Z", "datacontenttype": "application/json",
                              "data": {"id": payment, "bookingId": booking, "method": "CARD", "amount": "350000",
                                       "tax": "31818", "currency": "KRW", "status": "APPROVED", "approvalId": "PG",
                                       "reason": null, "decidedAt": "2026-11-26T00:00:00Z",
                                       "createdAt": "2026-11-26T00:00:00Z", "updatedAt": "2026-11-26T00:00:00Z"}});
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.to_string().as_str().into())
                .with_type("payment.approved".into());
            confirms.push(
                channel
                    .basic_publish(
                        amqp::EVENTS_EXCHANGE.into(),
                        "payment.approved".into(),
                        BasicPublishOptions::default(),
                        body.to_string().as_bytes(),
                        props,
                    )
                    .await?,
            );
        }
        for c in join_all(confirms).await {
            if c? != Confirmation::Ack(None) {
                bail!("publish not confirmed");
            }
        }
    }
    println!("RESULT backlog published={}", rows.len());
    Ok(())
}
