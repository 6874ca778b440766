//! End to end with the three binaries as processes: 200 bookings through
//! payment (some failed), approval (some rejected) and settlement; then
//! settlements equal the approved-and-allowed set, each webhook arrived once,
//! and `workers integrity --once` exits 0. Also: the workers killed with
//! SIGKILL mid-stream and restarted apply every effect once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::HashMap,
    net::TcpListener as StdListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, http::HeaderMap, routing::post};
use entrip_testkit::{Vhost, database_url};
use futures::future::join_all;
use serde_json::{Value, json};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use support::*;
use uuid::Uuid;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_workers")).with_file_name(name)
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Proc {
    fn signal(&self, sig: &str) {
        assert!(
            Command::new("kill")
                .args([sig, &self.0.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    async fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "process did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The environment every service of one test shares.
struct Fleet {
    db_url: String,
    amqp_url: String,
    config: PathBuf,
}

impl Fleet {
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(bin(name));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db_url)
            .env("AMQP_URL", &self.amqp_url)
            .env("ENTRIP_CONFIG", &self.config)
            // The same topology arguments as the test's own declarations.
            .env("ENTRIP__AMQP__RETRY_DELAYS_MS", "200,400")
            .env("ENTRIP__AMQP__DELIVERY_LIMIT", "5")
            .env("ENTRIP__DISPATCHER__POLL_INTERVAL_MS", "200")
            .env("ENTRIP__LOG__LEVEL", "warn")
            .env("ENTRIP__LOG__FORMAT", "json");
        cmd
    }

    fn spawn(&self, name: &str, listen_key: &str, port: u16) -> Proc {
        Proc(
            self.command(name)
                .env(listen_key, format!("127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

/// A webhook receiver that records every delivery's webhook-id.
#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<HashMap<String, usize>>>,
}

impl Receiver {
    async fn start(&self) -> String {
        let seen = self.seen.clone();
        let app = Router::new().route(
            "/hooks",
            post(move |headers: HeaderMap, _body: Bytes| {
                let seen = seen.clone();
                async move {
                    let id = headers
                        .get("webhook-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    *seen.lock().unwrap().entry(id).or_default() += 1;
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/hooks")
    }

    fn counts(&self) -> HashMap<String, usize> {
        self.seen.lock().unwrap().clone()
    }
}

fn write_config(url: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("entrip-e2e-{}.toml", Uuid::new_v4().simple()));
    std::fs::write(
        &path,
        format!(
            "[[notifications.webhooks]]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\ntopics = [\"booking.*\", \"settlement.recorded\"]\n"
        ),
    )
    .unwrap();
    path
}

struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    async fn post(&self, path: &str, body: Value) -> Value {
        let key = format!("e2e-{}", Uuid::new_v4().simple());
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header("idempotency-key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }
}

async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never became ready");
}

/// One booking's journey; returns whether it must end settled.
async fn journey(api: &Api, user: &str, i: usize) -> bool {
    let requires_approval = i.is_multiple_of(3);
    let payment_fails = i.is_multiple_of(10);
    let approval_rejected = i.is_multiple_of(6);
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
    // Approval first for some, payment first for others: order must not matter.
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
    if i.is_multiple_of(2) {
        approve.await;
        pay.await;
    } else {
        pay.await;
        approve.await;
    }
    !payment_fails && (!requires_approval || !approval_rejected)
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn two_hundred_bookings_end_to_end(_opts: PgPoolOptions, connect: PgConnectOptions) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let vhost = Vhost::new();
    let receiver = Receiver::default();
    let hook_url = receiver.start().await;
    let fleet = Fleet {
        db_url: database_url(&connect),
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

    let api = Api {
        base,
        client: reqwest::Client::new(),
    };
    let user = api
        .post(
            "/v1/users",
            json!({"name": "Kim", "email": "kim@example.com", "phone": "010 1234 5678"}),
        )
        .await;
    let user = user["id"].as_str().unwrap().to_owned();
    let mut expected = 0;
    for chunk in (0..200).collect::<Vec<_>>().chunks(20) {
        let settled = join_all(chunk.iter().map(|i| journey(&api, &user, *i))).await;
        expected += settled.into_iter().filter(|s| *s).count() as i64;
    }
    assert!(
        expected > 100 && expected < 200,
        "a mix of outcomes: {expected}"
    );

    eventually(180, "every allowed booking settled", || async {
        scalar(&pool, "SELECT count(*) FROM settlements").await == expected
    })
    .await;
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
    eventually(120, "outbox drained", || async {
        scalar(
            &pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
        )
        .await
            == 0
    })
    .await;
    let hooked = scalar(
        &pool,
        "SELECT count(*) FROM outbox WHERE topic LIKE 'booking.%' OR topic = 'settlement.recorded'",
    )
    .await;
    eventually(120, "every webhook received", || async {
        receiver.counts().len() as i64 == hooked
    })
    .await;
    let counts = receiver.counts();
    assert!(
        counts.values().all(|n| *n == 1),
        "each webhook exactly once"
    );
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
        assert!(p.wait_exit(30).await.success());
    }
    let _ = std::fs::remove_file(&fleet.config);
    pool.close().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn workers_killed_mid_stream_apply_every_effect_once(
    _opts: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = PgPool::connect_with(connect.clone()).await.unwrap();
    let vhost = Vhost::new();
    let receiver = Receiver::default();
    let hook_url = receiver.start().await;
    let fleet = Fleet {
        db_url: database_url(&connect),
        amqp_url: vhost.url(),
        config: write_config(&hook_url),
    };
    let (_conn, ch) = channel(&vhost.url()).await;
    let mut ids = Vec::new();
    for _ in 0..300 {
        let mut f = booking(&pool, false).await;
        add_payment(&pool, &mut f, "APPROVED").await;
        ids.push(f);
    }
    let mut workers = fleet.spawn("workers", "ENTRIP__WORKERS__LISTEN", free_port());
    publish_approved(&ch, &ids).await;
    eventually(60, "some settled", || async {
        scalar(&pool, "SELECT count(*) FROM settlements").await >= 30
    })
    .await;
    workers.signal("-KILL");
    assert!(!workers.wait_exit(10).await.success());
    let at_kill = scalar(&pool, "SELECT count(*) FROM settlements").await;
    // Redeliver everything once more on top, as a relay restart would.
    publish_approved(&ch, ids.iter().take(50)).await;
    let mut again = fleet.spawn("workers", "ENTRIP__WORKERS__LISTEN", free_port());
    eventually(120, "all 300 settled", || async {
        scalar(&pool, "SELECT count(*) FROM settlements").await == 300
    })
    .await;
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
    again.signal("-TERM");
    assert!(again.wait_exit(30).await.success());
    let _ = std::fs::remove_file(&fleet.config);
    pool.close().await;
}
