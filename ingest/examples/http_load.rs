//! Load generator for `scripts/bench-ingest`: `POST /v1/bookings` with a
//! fresh Idempotency-Key and booking code per request (which wrk and oha
//! cannot do without scripting), reporting throughput and p50/p95/p99.
//!
//! - `http_load closed <base url> <user id> <concurrency> <seconds>`:
//!   `concurrency` clients, each sending its next request when the last
//!   answer arrives (the throughput ceiling).
//! - `http_load open <base url> <user id> <rate> <seconds>`: requests
//!   started at a fixed rate whatever the answers do; latency counts from the
//!   scheduled start, so queueing is not hidden (no coordinated omission).
//! - `http_load replay <base url> <user id> <concurrency> <seconds>`: creates
//!   1,000 bookings, then sends their requests again with the same keys and
//!   bodies (the stored answer is replayed) from `concurrency` clients.
//!
//! Prints one line: `RESULT mode=… requests=… errors=… rps=… p50_ms=…
//! p95_ms=… p99_ms=… max_ms=…`. An error is any answer other than 201
//! (create) or 201 with `Idempotent-Replayed: true` (replay), or no answer.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use reqwest::StatusCode;
use tokio::sync::Mutex;

/// Keys created for the replay mode.
const REPLAY_KEYS: u64 = 1_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, base, user, n, secs] = args.as_slice() else {
        bail!(
            "usage: http_load closed|open|replay <base url> <user id> <concurrency|rate> <seconds>"
        );
    };
    let n: u64 = n.parse().context("concurrency or rate")?;
    let secs: u64 = secs.parse().context("seconds")?;
    let load = Load {
        client: reqwest::Client::builder()
            .default_headers(entrip_testkit::bearer_from_env()?)
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(30))
            .build()?,
        base: base.trim_end_matches('/').to_owned(),
        user: user.clone(),
        tag: format!("{:x}", std::process::id() ^ nanos()),
        seq: Arc::new(AtomicU64::new(0)),
        errors: Arc::new(AtomicU64::new(0)),
        latencies: Arc::new(Mutex::new(Vec::new())),
        shed: Arc::new(Mutex::new(Vec::new())),
    };
    let duration = Duration::from_secs(secs);
    if mode == "replay" {
        // Not timed: only the replays are.
        load.prepare_replay().await?;
    }
    let started = Instant::now();
    match mode.as_str() {
        "closed" => load.closed(n, duration, false).await,
        "open" => load.open(n, duration).await,
        "replay" => load.closed(n, duration, true).await,
        other => bail!("unknown mode {other}"),
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat = load.latencies.lock().await.clone();
    lat.sort_unstable();
    let mut shed = load.shed.lock().await.clone();
    shed.sort_unstable();
    let pct_of = |lat: &[u64], p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    let pct = |p: f64| pct_of(&lat, p);
    println!(
        "RESULT mode={mode} requests={} errors={} shed={} shed_p99_ms={:.2} rps={:.1} p50_ms={:.2} p95_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        lat.len(),
        load.errors.load(Ordering::Relaxed),
        shed.len(),
        pct_of(&shed, 0.99),
        lat.len() as f64 / elapsed,
        pct(0.50),
        pct(0.95),
        pct(0.99),
        lat.last().map_or(0.0, |m| *m as f64 / 1000.0),
    );
    Ok(())
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[derive(Clone)]
struct Load {
    client: reqwest::Client,
    base: String,
    user: String,
    tag: String,
    seq: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    /// Microseconds per answered request.
    latencies: Arc<Mutex<Vec<u64>>>,
    /// Microseconds per 503 answer.
    shed: Arc<Mutex<Vec<u64>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    Shed,
    Error,
}

impl Load {
    /// Key and body of request `i` (the same `i` gives the same request).
    fn request(&self, i: u64) -> (String, String) {
        let key = format!("load-{}-{i:010}", self.tag);
        let body = format!(
            r#"{{"code":"L{}-{i}","customerName":"Bench User","customerPhone":"+82 10 0000 0000","itineraryFrom":"ICN","itineraryTo":"NRT","departAt":"2026-12-24T09:30:00Z","arriveAt":"2026-12-24T11:45:00Z","amount":"350000","userId":"{}"}}"#,
            self.tag.to_uppercase(),
            self.user
        );
        (key, body)
    }

    /// Sends request `i`: the expected answer, a 503 (shed, or the
    /// deadline), or anything else.
    async fn send(&self, i: u64, replay: bool) -> Answer {
        let (key, body) = self.request(i);
        let answer = self
            .client
            .post(format!("{}/v1/bookings", self.base))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(body)
            .send()
            .await;
        match answer {
            Ok(resp) => {
                let created = resp.status() == StatusCode::CREATED;
                let replayed = resp
                    .headers()
                    .get("idempotent-replayed")
                    .is_some_and(|v| v == "true");
                let shed = resp.status() == StatusCode::SERVICE_UNAVAILABLE;
                // Read the body so the connection is reused.
                let _ = resp.bytes().await;
                if created && replayed == replay {
                    Answer::Ok
                } else if shed {
                    Answer::Shed
                } else {
                    Answer::Error
                }
            }
            Err(_) => Answer::Error,
        }
    }

    async fn record(&self, since: Instant, answer: Answer) {
        let us = since.elapsed().as_micros() as u64;
        match answer {
            Answer::Ok => self.latencies.lock().await.push(us),
            Answer::Shed => self.shed.lock().await.push(us),
            Answer::Error => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn closed(&self, clients: u64, duration: Duration, replay: bool) {
        let end = Instant::now() + duration;
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let load = self.clone();
                tokio::spawn(async move {
                    let mut k = c;
                    while Instant::now() < end {
                        let i = if replay {
                            k = (k * 7 + 13) % REPLAY_KEYS;
                            k
                        } else {
                            load.seq.fetch_add(1, Ordering::Relaxed) + REPLAY_KEYS
                        };
                        let t = Instant::now();
                        let answer = load.send(i, replay).await;
                        load.record(t, answer).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn open(&self, rate: u64, duration: Duration) {
        let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        let mut i = 0u64;
        loop {
            let due = start + period * u32::try_from(i).unwrap_or(u32::MAX);
            if due.duration_since(start) >= duration {
                break;
            }
            tokio::time::sleep_until(due).await;
            let load = self.clone();
            let scheduled = due.into_std();
            tasks.push(tokio::spawn(async move {
                let answer = load.send(REPLAY_KEYS + i, false).await;
                load.record(scheduled, answer).await;
            }));
            i += 1;
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn prepare_replay(&self) -> anyhow::Result<()> {
        for i in 0..REPLAY_KEYS {
            if self.send(i, false).await != Answer::Ok {
                bail!("could not create booking {i} for the replay run");
            }
        }
        Ok(())
    }
}
