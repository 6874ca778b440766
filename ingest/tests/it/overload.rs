//! Overload and slow clients: beyond the in-flight limit requests are shed
//! at once with a 503 (health, readiness and metrics never are), and an
//! adaptive limit shrinks when the admitted requests queue; a
//! request past its deadline gets a problem+json 503 with `Retry-After`;
//! slow or oversized request heads lose their connection. Nothing is ever
//! half-stored.

use std::time::{Duration, Instant};

use entrip_common::config::IngestSettings;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

use crate::support::{Server, key, settings};

/// What a raw HTTP/1.1 exchange gave: status, head, body, and how long the
/// answer took from the moment the request head was sent.
#[derive(Debug)]
pub(crate) struct Raw {
    pub(crate) status: u16,
    pub(crate) head: String,
    pub(crate) body: String,
    pub(crate) took: Duration,
}

/// POSTs `body` to `path` on the test server, slowly (see [`slow_post_to`]).
async fn slow_post(s: &Server, path: &str, body: &Value, pause: Duration) -> Raw {
    slow_post_to(&s.base, &s.api_key, path, body, pause).await
}

/// POSTs `body` to `path` at `base` with `api_key`, sending the first half
/// of the body, then waiting `pause`, then the rest: a slow client holding
/// its request open.
pub(crate) async fn slow_post_to(
    base: &str,
    api_key: &str,
    path: &str,
    body: &Value,
    pause: Duration,
) -> Raw {
    slow_post_until(base, api_key, path, body, tokio::time::sleep(pause)).await
}

/// As [`slow_post_to`], but the rest of the body is sent when `release`
/// completes: a client that holds its request open as long as a test needs.
pub(crate) async fn slow_post_until(
    base: &str,
    api_key: &str,
    path: &str,
    body: &Value,
    release: impl Future<Output = ()>,
) -> Raw {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let body = body.to_string().into_bytes();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nIdempotency-Key: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        api_key,
        key(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (first, rest) = body.split_at(body.len() / 2);
    stream.write_all(first).await.unwrap();
    let sent = Instant::now();
    let mut answer = Vec::new();
    // The server may answer before the body is complete (a shed request).
    let early = tokio::select! {
        // An answer that is complete wins over a release at the same time.
        biased;
        read = stream.read_to_end(&mut answer) => Some(read),
        () = release => None,
    };
    if early.is_none() {
        stream.write_all(rest).await.unwrap();
        stream.read_to_end(&mut answer).await.unwrap();
    }
    let took = sent.elapsed();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Raw {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
        took,
    }
}

/// Waits until every permit is taken: a probe without a key is shed (503)
/// when the server is full, else refused (401) without database work.
/// Returns the probes shed (1). Fails naming what it saw when one of the
/// `held` requests (those meant to fill the server) is answered first, or
/// after [`entrip_testkit::STALL`] without a 503.
pub(crate) async fn wait_until_full(base: &str, held: &mut [JoinHandle<Raw>]) -> u64 {
    let probe = format!("{base}/v1/users/00000000-0000-0000-0000-000000000000");
    let deadline = tokio::time::Instant::now() + entrip_testkit::STALL;
    loop {
        let status = reqwest::get(&probe).await.unwrap().status();
        match status {
            StatusCode::SERVICE_UNAVAILABLE => return 1,
            StatusCode::UNAUTHORIZED => {}
            other => panic!("probe answered {other}"),
        }
        if let Some(h) = held.iter_mut().find(|h| h.is_finished()) {
            panic!(
                "a held request was answered before the server was full (last probe {status}): {:?}",
                h.await
            );
        }
        if tokio::time::Instant::now() >= deadline {
            let metrics = reqwest::get(format!("{base}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let lines: Vec<_> = metrics
                .lines()
                .filter(|l| l.starts_with("entrip_ingest_") && !l.contains("_bucket"))
                .collect();
            panic!(
                "the server was not full after {:?} (last probe {status}):\n{}",
                entrip_testkit::STALL,
                lines.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn user_body() -> Value {
    json!({"name": "Yoon", "email": format!("yoon-{}@example.com", uuid::Uuid::new_v4().simple()), "phone": "010 3333 4444"})
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn beyond_max_in_flight_requests_are_shed_at_once_and_the_accepted_complete(pool: PgPool) {
    let limit = 4;
    let s = Server::start_with(
        pool.clone(),
        IngestSettings {
            max_in_flight: limit,
            adaptive_in_flight: false,
            ..settings()
        },
    )
    .await;
    let pause = Duration::from_secs(3);
    // The first `limit` hold every permit while they send their bodies.
    let held: Vec<_> = (0..limit)
        .map(|_| {
            let s = &s;
            async move { slow_post(s, "/v1/users", &user_body(), pause).await }
        })
        .collect();
    let held = futures::future::join_all(held);
    let excess = async {
        // Let the first ones in before the excess arrives.
        let probes = wait_until_full(&s.base, &mut []).await;
        let excess = (0..3 * limit).map(|_| {
            let s = &s;
            async move { slow_post(s, "/v1/users", &user_body(), pause).await }
        });
        let shed = futures::future::join_all(excess).await;
        // While saturated, the open endpoints still answer.
        for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
            let r = reqwest::get(format!("{}{path}", s.base)).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
        }
        (probes, shed)
    };
    let (held, (probes, shed)) = tokio::join!(held, excess);
    for r in &shed {
        assert_eq!(r.status, 503, "{r:?}");
        assert!(
            r.head.contains("content-type: application/problem+json"),
            "{r:?}"
        );
        assert!(r.head.contains("retry-after: 5"), "{r:?}");
        assert!(r.body.contains("overloaded"), "{r:?}");
        // Shed before the body was read: long before the slow client's
        // pause ends.
        assert!(r.took < pause / 2, "shed after {:?}", r.took);
    }
    for r in &held {
        assert_eq!(r.status, 201, "{r:?}");
    }
    assert_eq!(
        s.metric("entrip_ingest_shed_total").await,
        (3 * limit) as f64 + probes as f64
    );
    // The shed answers skip the metrics layer (shedding comes first) but are
    // counted with the route's other answers all the same.
    assert_eq!(
        s.metric(r#"entrip_ingest_requests_total{route="/v1/users",status="503"}"#)
            .await,
        (3 * limit) as f64
    );
    assert_eq!(
        s.metric(r#"entrip_ingest_requests_total{route="/v1/users/{id}",status="503"}"#)
            .await,
        probes as f64
    );
    // Nothing half-stored: one user, one audit row, one event and one key
    // per accepted request.
    for table in ["users", "audit_log", "outbox", "idempotency_keys"] {
        assert_eq!(s.count(table).await, limit as i64, "{table}");
    }
    s.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_request_past_its_deadline_gets_a_problem_with_retry_after_and_stores_nothing(
    pool: PgPool,
) {
    let s = Server::start_with(
        pool.clone(),
        IngestSettings {
            request_timeout_secs: 1,
            retry_after_secs: 7,
            ..settings()
        },
    )
    .await;
    let r = slow_post(&s, "/v1/users", &user_body(), Duration::from_secs(3)).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.head.contains("content-type: application/problem+json"),
        "{r:?}"
    );
    assert!(r.head.contains("retry-after: 7"), "{r:?}");
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["status"], 503);
    assert!(
        body["type"].as_str().unwrap().ends_with("/timeout"),
        "{body}"
    );
    assert!(
        r.took < Duration::from_secs(3),
        "answered at the deadline: {:?}",
        r.took
    );
    for table in ["users", "audit_log", "outbox", "idempotency_keys"] {
        assert_eq!(s.count(table).await, 0, "{table}");
    }
    s.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn slow_and_oversized_request_heads_lose_their_connection(pool: PgPool) {
    let s = Server::start_with(
        pool.clone(),
        IngestSettings {
            header_read_timeout_secs: 1,
            ..settings()
        },
    )
    .await;
    let addr = s.base.trim_start_matches("http://").to_owned();

    // Half a head, then silence: closed after the header-read timeout.
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(b"POST /v1/users HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection stayed open");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    // A head over ingest.max_header_bytes: 431.
    let big = "x".repeat(20 * 1024);
    let r = reqwest::Client::new()
        .get(format!("{}/healthz", s.base))
        .header("x-filler", &big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    // A URI over ingest.max_uri_bytes: 414, problem+json.
    let r = s
        .get(&format!("/v1/users?q={}", "y".repeat(9 * 1024)))
        .await;
    assert_eq!(r.status, StatusCode::URI_TOO_LONG);
    assert!(r.is_problem(), "{:?}", r.body);
    s.stop().await;
}

/// Sends `n` slow requests at once (each pauses `pause` in its body).
async fn slow_wave(s: &Server, n: usize, pause: Duration) -> Vec<Raw> {
    slow_wave_of(s, n, pause, user_body).await
}

/// Sends `n` slow requests at once with the bodies `body` makes.
async fn slow_wave_of(s: &Server, n: usize, pause: Duration, body: impl Fn() -> Value) -> Vec<Raw> {
    let wave = (0..n).map(|_| {
        let body = body();
        async move { slow_post(s, "/v1/users", &body, pause).await }
    });
    futures::future::join_all(wave).await
}

/// The default, adaptive limit: it starts at `ingest.max_in_flight`, so a
/// burst on a quiet service is admitted whole; answers that took far longer
/// than the quickest (requests queueing) shrink it, and the next burst is
/// shed beyond it; it never goes below `ingest.min_in_flight`.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_adaptive_limit_shrinks_when_requests_queue_and_sheds_beyond_it(pool: PgPool) {
    let (max, min) = (16, 3);
    let s = Server::start_with(
        pool.clone(),
        IngestSettings {
            max_in_flight: max,
            min_in_flight: min,
            ..settings()
        },
    )
    .await;
    assert_eq!(
        s.metric("entrip_ingest_in_flight_limit").await,
        max as f64,
        "starts at ingest.max_in_flight"
    );
    // A refusal does not count (a 404 is answered without the work of a
    // request); a quick create is the no-load baseline.
    let r = s
        .get("/v1/users/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    s.create_user().await;
    let pause = Duration::from_millis(400);
    // Slow refusals (a body without its fields: 400) do not count either,
    // or these would shrink the limit as the slow creates below do.
    let refused = slow_wave_of(&s, max, pause, || json!({"name": "Yoon"})).await;
    assert!(refused.iter().all(|r| r.status == 400), "{refused:?}");
    assert_eq!(
        s.metric("entrip_ingest_in_flight_limit").await,
        max as f64,
        "refusals do not move the limit"
    );
    let first = slow_wave(&s, max, pause).await;
    assert!(
        first.iter().all(|r| r.status == 201),
        "the first burst is admitted whole: {:?}",
        first.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let limit = s.metric("entrip_ingest_in_flight_limit").await;
    assert!(
        (min as f64..max as f64).contains(&limit),
        "answers 100 times slower than the baseline shrank the limit: {limit}"
    );
    let second = slow_wave(&s, max, pause).await;
    let created = second.iter().filter(|r| r.status == 201).count();
    let shed = second.iter().filter(|r| r.status == 503).count();
    assert_eq!(created + shed, max, "{second:?}");
    assert!(
        created >= min && (created as f64) <= limit,
        "{created} admitted with the limit at {limit}"
    );
    assert_eq!(
        s.metric("entrip_ingest_shed_total").await,
        shed as f64,
        "{second:?}"
    );
    // Nothing half-stored: one user, audit row, event and key per 201.
    for table in ["users", "audit_log", "outbox", "idempotency_keys"] {
        assert_eq!(s.count(table).await, (1 + max + created) as i64, "{table}");
    }
    s.stop().await;
}
