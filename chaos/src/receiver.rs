//! The in-process webhook receiver: one or more subscribers on one axum
//! server, each verifying the Standard Webhooks signature with its secret and
//! recording every accepted (subscriber, webhook-id) with its count. Fault
//! windows make it answer 500, or hang past the workers' timeout, for a while.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use entrip_common::signing;

use crate::Error;

/// One configured subscriber.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub name: String,
    pub secret: String,
    pub topics: Vec<String>,
}

impl Subscriber {
    pub fn wants(&self, topic: &str) -> bool {
        self.topics.iter().any(|p| topic_matches(p, topic))
    }
}

/// AMQP-style topic patterns (`*` one segment, `#` any number), the
/// subscriber filter syntax of the fleet's configuration.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    fn go(p: &[&str], t: &[&str]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let t: Vec<&str> = topic.split('.').collect();
    go(&p, &t)
}

/// The receiver's behaviour right now.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Normal,
    Fail500 { until: Instant },
    Hang { until: Instant, hold: Duration },
}

#[derive(Debug, Default)]
struct Seen {
    /// (subscriber, webhook-id) → accepted deliveries.
    counts: HashMap<(String, String), u64>,
    /// When each pair was first accepted.
    first_seen: HashMap<(String, String), Instant>,
    bad_signatures: u64,
    unknown_subscriber: u64,
    answered_500: u64,
    hung: u64,
}

#[derive(Debug)]
struct Shared {
    keys: HashMap<String, Vec<u8>>,
    seen: Mutex<Seen>,
    mode: Mutex<Mode>,
}

impl Shared {
    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mode(&self) -> MutexGuard<'_, Mode> {
        self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the receiver saw, for the checks and the report.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub counts: HashMap<(String, String), u64>,
    pub first_seen: HashMap<(String, String), Instant>,
    pub bad_signatures: u64,
    pub unknown_subscriber: u64,
    pub answered_500: u64,
    pub hung: u64,
}

/// A running receiver; the server task ends when this is dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    pub subscribers: Vec<Subscriber>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(subscribers: Vec<Subscriber>) -> Result<Self, Error> {
        let mut keys = HashMap::new();
        for s in &subscribers {
            let key = signing::decode_secret(&s.secret).ok_or_else(|| {
                Error::Setup(format!(
                    "subscriber {}: secret is not whsec_ + base64",
                    s.name
                ))
            })?;
            keys.insert(s.name.clone(), key);
        }
        let shared = Arc::new(Shared {
            keys,
            seen: Mutex::new(Seen::default()),
            mode: Mutex::new(Mode::Normal),
        });
        let app = Router::new()
            .route("/hooks/{subscriber}", post(hook))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(%err, "webhook receiver stopped");
            }
        });
        Ok(Self {
            addr,
            subscribers,
            shared,
            task,
        })
    }

    pub fn url(&self, subscriber: &str) -> String {
        format!("http://{}/hooks/{subscriber}", self.addr)
    }

    /// The `ENTRIP_CONFIG` file's text naming every subscriber.
    pub fn config_toml(&self) -> String {
        let mut out = String::new();
        for s in &self.subscribers {
            let topics: Vec<String> = s.topics.iter().map(|t| format!("\"{t}\"")).collect();
            out.push_str(&format!(
                "[[notifications.webhooks]]\nurl = \"{}\"\nsecret = \"{}\"\ntopics = [{}]\n\n",
                self.url(&s.name),
                s.secret,
                topics.join(", ")
            ));
        }
        out
    }

    /// Answer 500 to everything for `d`.
    pub fn fail_for(&self, d: Duration) {
        *self.shared.mode() = Mode::Fail500 {
            until: Instant::now() + d,
        };
    }

    /// Hold every request `hold` (then answer 503, unrecorded) for `d`.
    pub fn hang_for(&self, d: Duration, hold: Duration) {
        *self.shared.mode() = Mode::Hang {
            until: Instant::now() + d,
            hold,
        };
    }

    pub fn heal(&self) {
        *self.shared.mode() = Mode::Normal;
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.shared.seen();
        Snapshot {
            counts: s.counts.clone(),
            first_seen: s.first_seen.clone(),
            bad_signatures: s.bad_signatures,
            unknown_subscriber: s.unknown_subscriber,
            answered_500: s.answered_500,
            hung: s.hung,
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hook(
    State(shared): State<Arc<Shared>>,
    Path(subscriber): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mode = *shared.mode();
    match mode {
        Mode::Fail500 { until } if Instant::now() < until => {
            shared.seen().answered_500 += 1;
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        Mode::Hang { until, hold } if Instant::now() < until => {
            shared.seen().hung += 1;
            // The worker gives up first (its timeout is shorter); if it
            // does not, this is still not a 2xx, so nothing is recorded.
            tokio::time::sleep(hold).await;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        _ => {}
    }
    let Some(key) = shared.keys.get(&subscriber) else {
        shared.seen().unknown_subscriber += 1;
        return StatusCode::NOT_FOUND;
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = header("webhook-id");
    let timestamp = header("webhook-timestamp").parse::<i64>().unwrap_or(0);
    let signature = header("webhook-signature");
    if id.is_empty() || !signing::verify(key, &id, timestamp, &body, &signature) {
        shared.seen().bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let mut seen = shared.seen();
    seen.first_seen
        .entry((subscriber.clone(), id.clone()))
        .or_insert_with(Instant::now);
    *seen.counts.entry((subscriber, id)).or_default() += 1;
    StatusCode::NO_CONTENT
}
