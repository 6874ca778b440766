//! Load for `scripts/bench-workers`.
//!
//! `loadgen steady <ingest url> <bookings per second> <seconds>`: drives
//! bookings through ingest at a fixed rate (booking, payment, APPROVED
//! result), so that the commit-to-settlement latency can be read from the
//! database afterwards.
//!
//! `loadgen backlog <database url> <amqp url> <count>`: stores `count`
//! bookings with approved payments and publishes their `payment.approved`
//! events, building a backlog on `entrip.settlement` for the consumer
//! throughput measurement.

use std::{
    sync::Arc,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("steady") if args.len() == 5 => {
            steady(&args[2], args[3].parse()?, args[4].parse()?).await
        }
        Some("backlog") if args.len() == 5 => backlog(&args[2], &args[3], args[4].parse()?).await,
        _ => bail!(
            "usage: loadgen steady <ingest url> <rate> <seconds> | loadgen backlog <db url> <amqp url> <count>"
        ),
    }
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> anyhow::Result<Value> {
    let resp = client
        .post(url)
        .header(
            "idempotency-key",
            format!("load-{}", Uuid::new_v4().simple()),
        )
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let body: Value = resp.json().await?;
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(body)
}

async fn journey(
    client: reqwest::Client,
    base: String,
    user: String,
    n: u64,
) -> anyhow::Result<()> {
    let booking = post(
        &client,
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
        format!("{base}/v1/payments"),
        json!({"bookingId": booking["id"], "method": "CARD", "amount": "350000", "currency": "KRW", "tax": "31818"}),
    )
    .await?;
    let id = payment["id"].as_str().context("payment id")?;
    post(
        &client,
        format!("{base}/v1/payments/{id}/result"),
        json!({"status": "APPROVED", "approvalId": format!("PG-{n}")}),
    )
    .await?;
    Ok(())
}

async fn steady(base: &str, rate: u64, secs: u64) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .default_headers(entrip_testkit::bearer_from_env()?)
        .build()?;
    let user = post(
        &client,
        format!("{base}/v1/users"),
        json!({"name": "Load", "email": format!("load-{}@example.com", Uuid::new_v4().simple()), "phone": "010 0000 0000"}),
    )
    .await?;
    let user = user["id"].as_str().context("user id")?.to_owned();
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
        let journey = journey(client.clone(), base.to_owned(), user.clone(), n);
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
        "RESULT steady bookings={n} shed={shed} failed={failed} completed={completed} in_window={in_window} secs={offered_secs:.1} drained_secs={:.1}",
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
                              "data": {"id": payment, "bookingId": booking, "status": "APPROVED"}});
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
