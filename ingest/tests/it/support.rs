//! Test support: a real ingest server on a random port over a test's own
//! database, an HTTP client, fixtures, and a TCP proxy that can cut
//! connections for fault tests.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use entrip_common::config::{AmqpSettings, IngestSettings};
use entrip_ingest::{
    App,
    clients::{self, ClientName, Scope},
};
use reqwest::{
    Client, StatusCode,
    header::{AUTHORIZATION, HeaderMap, HeaderValue},
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running ingest server, and an HTTP client that sends the key of API
/// client `test-all` (scope `*`) with every request.
pub struct Server {
    pub base: String,
    pub client: Client,
    /// The bearer key `client` sends.
    pub api_key: String,
    pub pool: PgPool,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// A response as the tests look at it.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Resp {
    /// The `field` of the first validation error, if any.
    pub fn error_fields(&self) -> Vec<String> {
        self.body["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["field"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn is_problem(&self) -> bool {
        self.headers
            .get("content-type")
            .is_some_and(|v| v == "application/problem+json")
            && self.body["status"] == json!(self.status.as_u16())
            && self.body["type"].is_string()
            && self.body["title"].is_string()
            && self.body["detail"].is_string()
    }

    pub fn id(&self) -> String {
        self.body["id"]
            .as_str()
            .expect("response has an id")
            .to_owned()
    }
}

static KEY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh idempotency key.
pub fn key() -> String {
    format!(
        "test-key-{}-{}",
        uuid::Uuid::new_v4().simple(),
        KEY_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn settings() -> IngestSettings {
    IngestSettings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..IngestSettings::default()
    }
}

impl Server {
    pub async fn start(pool: PgPool) -> Self {
        Self::start_with(pool, settings()).await
    }

    pub async fn start_with(pool: PgPool, settings: IngestSettings) -> Self {
        Self::launch(pool, settings, None).await
    }

    /// The HTTP API and the AMQP consumer on `amqp` (a test's vhost); the
    /// client `test-all` is also broker user `guest`'s.
    pub async fn start_with_amqp(
        pool: PgPool,
        settings: IngestSettings,
        amqp: AmqpSettings,
    ) -> Self {
        Self::launch(pool, settings, Some(amqp)).await
    }

    async fn launch(pool: PgPool, settings: IngestSettings, amqp: Option<AmqpSettings>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = App::new(
            pool.clone(),
            settings,
            entrip_common::metrics::new_registry(),
        )
        .unwrap();
        let amqp_user = amqp.as_ref().map(|_| "guest");
        let api_key = clients::create(
            &pool,
            &ClientName::parse("test-all").unwrap(),
            &[Scope::All],
            amqp_user,
        )
        .await
        .unwrap()
        .reveal();
        let shutdown = CancellationToken::new();
        let consumer = amqp.map(|amqp| entrip_ingest::amqp::consumer(&app, amqp));
        let handle = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let http = entrip_ingest::serve(listener, app, shutdown.clone());
                match consumer {
                    Some(consumer) => {
                        let (served, ()) = tokio::join!(http, consumer.run(shutdown));
                        served.unwrap();
                    }
                    None => http.await.unwrap(),
                }
            }
        });
        Self {
            base: format!("http://{addr}"),
            client: authenticated(&api_key),
            api_key,
            pool,
            shutdown,
            handle: Some(handle),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap();
        }
    }

    /// POST with a JSON body and the given key (`None`: no header).
    pub async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> Resp {
        self.post_raw(path, key, body.to_string().into_bytes())
            .await
    }

    pub async fn post_raw(&self, path: &str, key: Option<&str>, body: Vec<u8>) -> Resp {
        let mut req = self
            .client
            .post(format!("{}{}", self.base, path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        into_resp(req.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        let resp = self
            .client
            .get(format!("{}{}", self.base, path))
            .send()
            .await
            .unwrap();
        into_resp(resp).await
    }

    pub async fn create_user(&self) -> String {
        let n = KEY_COUNTER.fetch_add(1, Ordering::Relaxed);
        let r = self
            .post(
                "/v1/users",
                Some(&key()),
                &json!({
                    "name": "Kim Minji",
                    "email": format!("kim{n}-{}@example.com", uuid::Uuid::new_v4().simple()),
                    "phone": "+82 10 1234 5678",
                }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        r.id()
    }

    pub async fn create_booking(&self, user_id: &str, requires_approval: bool) -> Value {
        let body = booking_body(user_id, &unique_code(), requires_approval);
        let r = self.post("/v1/bookings", Some(&key()), &body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        r.body
    }

    pub async fn create_payment(&self, booking: &Value) -> Value {
        let r = self
            .post("/v1/payments", Some(&key()), &payment_body(booking))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        r.body
    }

    /// The value of one series of `/metrics`, e.g.
    /// `entrip_ingest_requests_total{route="/v1/users",status="201"}`; 0
    /// when it is not exported (yet).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.body;
        let text = text.as_str().expect("the exposition text");
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().expect("a number"))
    }

    /// Counts the rows of a table (test databases only).
    pub async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table}");
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// Issues a key for a new client `name` through the store.
pub async fn issue_key(pool: &PgPool, name: &str, scopes: &[Scope]) -> String {
    clients::create(pool, &ClientName::parse(name).unwrap(), scopes, None)
        .await
        .unwrap()
        .reveal()
}

/// An HTTP client that sends `Authorization: Bearer <key>` with every request.
pub fn authenticated(key: &str) -> Client {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    Client::builder().default_headers(headers).build().unwrap()
}

pub async fn into_resp(resp: reqwest::Response) -> Resp {
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Resp {
        status,
        headers,
        body,
    }
}

pub fn unique_code() -> String {
    let n = KEY_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "BK-{}-{n}",
        &uuid::Uuid::new_v4().simple().to_string()[..8].to_uppercase()
    )
}

pub fn booking_body(user_id: &str, code: &str, requires_approval: bool) -> Value {
    json!({
        "code": code,
        "customerName": "Kim Minji",
        "customerPhone": "+82 10 1234 5678",
        "itineraryFrom": "ICN",
        "itineraryTo": "NRT",
        "departAt": "2026-12-24T09:30:00+09:00",
        "arriveAt": "2026-12-24T11:45:00+09:00",
        "currency": "KRW",
        "amount": "350000",
        "userId": user_id,
        "requiresApproval": requires_approval,
    })
}

pub fn payment_body(booking: &Value) -> Value {
    json!({
        "bookingId": booking["id"],
        "method": "CARD",
        "amount": booking["amount"],
        "currency": booking["currency"],
        "tax": "31818",
    })
}
