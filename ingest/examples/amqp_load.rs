//! Load generator for `scripts/bench-ingest`'s AMQP part: `booking.create`
//! requests published to `entrip.ingest`, each with a fresh `message_id` and
//! booking code, as broker user `guest` (a client with `--amqp-user guest`).
//!
//! - `amqp_load closed <amqp url> <user id> <window> <seconds>`: `window`
//!   requests outstanding, each reply (direct reply-to) releasing the next;
//!   the throughput with replies.
//! - `amqp_load open <amqp url> <user id> <rate> <seconds>`: requests
//!   published at a fixed rate whatever the replies do; latency from the
//!   scheduled publish to the reply (no coordinated omission).
//! - `amqp_load oneway <amqp url> <user id> <count> <database url>`: `count`
//!   requests without `reply_to`, published as fast as the broker confirms
//!   them; the rate is `count` over the time from the first publish until
//!   all are stored (counted in the database by their codes).
//!
//! Prints one line: `RESULT mode=… requests=… errors=… rps=… p50_ms=…
//! p95_ms=… p99_ms=… max_ms=…` (latencies: 0 for `oneway`). An error is a
//! reply other than 201, or none.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::StreamExt;
use lapin::{
    BasicProperties, Channel,
    options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable},
};
use tokio::sync::Semaphore;

const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, url, user, n, last] = args.as_slice() else {
        bail!(
            "usage: amqp_load closed|open <amqp url> <user id> <window|rate> <seconds> | oneway <amqp url> <user id> <count> <database url>"
        );
    };
    let n: u64 = n.parse().context("window, rate or count")?;
    let tag = format!("{:x}", std::process::id() ^ nanos());
    let conn = entrip_common::amqp::connect(url, "amqp-load").await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let load = Load {
        channel: channel.clone(),
        user: user.clone(),
        tag: tag.clone(),
        pending: Arc::default(),
        latencies: Arc::default(),
        errors: Arc::default(),
    };
    let started = Instant::now();
    let requests = match mode.as_str() {
        "closed" | "open" => {
            let secs: u64 = last.parse().context("seconds")?;
            load.listen().await?;
            let duration = Duration::from_secs(secs);
            if mode == "closed" {
                load.closed(n, duration).await?;
            } else {
                load.open(n, duration).await?;
            }
            load.latencies.lock().map(|l| l.len()).unwrap_or(0)
        }
        "oneway" => {
            load.oneway(n, last).await?;
            usize::try_from(n)?
        }
        other => bail!("unknown mode {other}"),
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat = load.latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    let errors = *load
        .errors
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    println!(
        "RESULT mode={mode} requests={requests} errors={errors} rps={:.1} p50_ms={:.2} p95_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        requests as f64 / elapsed,
        pct(0.50),
        pct(0.95),
        pct(0.99),
        lat.last().map_or(0.0, |m| *m as f64 / 1000.0),
    );
    conn.close(200, "done".into()).await?;
    Ok(())
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// When a request was due, and whom to tell when its reply arrives.
type Pending = (Instant, Option<tokio::sync::oneshot::Sender<()>>);

#[derive(Clone)]
struct Load {
    channel: Channel,
    user: String,
    tag: String,
    /// Requests awaiting their reply: correlation id → when it was due,
    /// and what to tell when it arrives.
    pending: Arc<Mutex<HashMap<String, Pending>>>,
    /// Microseconds from the (scheduled) publish to the reply, per 201.
    latencies: Arc<Mutex<Vec<u64>>>,
    errors: Arc<Mutex<u64>>,
}

impl Load {
    fn code(&self, i: u64) -> String {
        format!("A{}-{i}", self.tag.to_uppercase())
    }

    /// Publishes request `i` (waiting for the broker's confirm).
    async fn publish(&self, i: u64, reply: bool) -> anyhow::Result<()> {
        let body = format!(
            r#"{{"code":"{}","customerName":"Bench User","customerPhone":"+82 10 0000 0000","itineraryFrom":"ICN","itineraryTo":"NRT","departAt":"2026-12-24T09:30:00Z","arriveAt":"2026-12-24T11:45:00Z","amount":"350000","userId":"{}"}}"#,
            self.code(i),
            self.user
        );
        let key = format!("amqp-load-{}-{i:010}", self.tag);
        let mut props = BasicProperties::default()
            .with_type("booking.create".into())
            .with_message_id(key.as_str().into())
            .with_user_id("guest".into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if reply {
            props = props.with_reply_to(DIRECT_REPLY_TO.into());
        }
        let confirm = self
            .channel
            .basic_publish(
                "entrip.ingest".into(),
                "booking.create".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            bail!("the broker refused request {i}");
        }
        Ok(())
    }

    /// Consumes the direct replies, matching them to pending requests.
    async fn listen(&self) -> anyhow::Result<()> {
        let mut replies = self
            .channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let load = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let Some(id) = delivery.properties.correlation_id().as_ref() else {
                    continue;
                };
                let Some((due, done)) = load
                    .pending
                    .lock()
                    .ok()
                    .and_then(|mut p| p.remove(id.as_str()))
                else {
                    continue;
                };
                let created = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| {
                        h.inner()
                            .iter()
                            .find(|(k, _)| k.as_str() == "x-entrip-status")
                            .map(|(_, v)| v.clone())
                    })
                    .is_some_and(|s| matches!(s, AMQPValue::LongInt(201)));
                if created {
                    if let Ok(mut l) = load.latencies.lock() {
                        l.push(due.elapsed().as_micros() as u64);
                    }
                } else if let Ok(mut e) = load.errors.lock() {
                    *e += 1;
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
        });
        Ok(())
    }

    fn expect(&self, i: u64, due: Instant, done: Option<tokio::sync::oneshot::Sender<()>>) {
        let key = format!("amqp-load-{}-{i:010}", self.tag);
        if let Ok(mut p) = self.pending.lock() {
            p.insert(key, (due, done));
        }
    }

    async fn closed(&self, window: u64, duration: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + duration;
        let slots = Arc::new(Semaphore::new(usize::try_from(window)?));
        let mut i = 0u64;
        let mut requests = Vec::new();
        while Instant::now() < end {
            let permit = slots.clone().acquire_owned().await?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.expect(i, Instant::now(), Some(tx));
            // Publishes pipelined: a quorum queue's confirm waits for its
            // log, and one at a time would measure that instead.
            let load = self.clone();
            requests.push(tokio::spawn(async move {
                let published = load.publish(i, true).await;
                if published.is_ok() {
                    // A reply lost for good counts as an error at the end.
                    let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
                }
                drop(permit);
                published
            }));
            i += 1;
        }
        for r in requests {
            r.await??;
        }
        self.count_missing();
        Ok(())
    }

    async fn open(&self, rate: u64, duration: Duration) -> anyhow::Result<()> {
        let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
        let start = tokio::time::Instant::now();
        let mut i = 0u64;
        let mut publishes = Vec::new();
        loop {
            let due = start + period * u32::try_from(i).unwrap_or(u32::MAX);
            if due.duration_since(start) >= duration {
                break;
            }
            tokio::time::sleep_until(due).await;
            self.expect(i, due.into_std(), None);
            let load = self.clone();
            publishes.push(tokio::spawn(async move { load.publish(i, true).await }));
            i += 1;
        }
        for p in publishes {
            p.await??;
        }
        // The last replies.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && self.pending.lock().map(|p| !p.is_empty()).unwrap_or(false)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.count_missing();
        Ok(())
    }

    /// Requests that never got a reply are errors.
    fn count_missing(&self) {
        let missing = self.pending.lock().map(|p| p.len() as u64).unwrap_or(0);
        if let Ok(mut e) = self.errors.lock() {
            *e += missing;
        }
    }

    async fn oneway(&self, count: u64, database_url: &str) -> anyhow::Result<()> {
        let pool = sqlx::PgPool::connect(database_url).await?;
        // Confirms pipelined: a window of publishes in flight.
        let slots = Arc::new(Semaphore::new(256));
        let mut publishes = Vec::new();
        for i in 0..count {
            let permit = slots.clone().acquire_owned().await?;
            let load = self.clone();
            publishes.push(tokio::spawn(async move {
                let published = load.publish(i, false).await;
                drop(permit);
                published
            }));
        }
        for p in publishes {
            p.await??;
        }
        let pattern = format!("A{}-%", self.tag.to_uppercase());
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let stored: i64 =
                sqlx::query_scalar("SELECT count(*) FROM bookings WHERE code LIKE $1")
                    .bind(&pattern)
                    .fetch_one(&pool)
                    .await?;
            if stored >= i64::try_from(count)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{stored} of {count} stored after 600 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
