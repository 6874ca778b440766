//! The in-process webhook receiver: one or more subscribers on one axum
//! server, each verifying the Standard Webhooks signature with its secret and
//! recording every accepted (subscriber, webhook-id) with its count. Fault
//! windows make it answer 500, or hang past the workers' timeout, for a while.
//!
//! For the first accepted copy of each pair it also records how its 2xx went
//! out: the time from the handler's start (request head read) until hyper
//! took the end of the response body (the whole response is then buffered and
//! flushed in the same step), whether the connection failed before that (the
//! client gone, when hyper notices), and a lower bound of how long the request waited before
//! the handler ran (from the signed `webhook-timestamp`, whole seconds). A
//! worker whose webhook timeout fired before it read the 2xx sends the event
//! again; these figures tell when that was the case.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
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

pub use entrip_common::amqp::topic_matches;

/// The receiver's behaviour right now.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Normal,
    Fail500 { until: Instant },
    Hang { until: Instant, hold: Duration },
}

/// How the first accepted copy of a pair was answered.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FirstCopy {
    /// From the handler's start to the end of the 2xx (or to the moment the
    /// connection was dropped without it).
    pub handling: Duration,
    /// The body of the 2xx was dropped before hyper took its end: the
    /// connection failed first (as far as hyper noticed: a socket the
    /// client closed may still take the write).
    pub client_gone: bool,
    /// At least this long passed between the signing (just before the
    /// worker sent it) and the handler's start: `now − (webhook-timestamp +
    /// 1 s)`, zero when negative.
    pub waited_at_least: Duration,
}

impl FirstCopy {
    /// Whether the worker's webhook timeout certainly fired before it could
    /// read this 2xx: the client went away first, or the request spent at
    /// least `timeout − margin` between being sent and the 2xx being written.
    pub fn timed_out(&self, timeout: Duration, margin: Duration) -> bool {
        self.client_gone || self.waited_at_least + self.handling >= timeout.saturating_sub(margin)
    }
}

type Key = (String, String);

#[derive(Debug, Default)]
struct Seen {
    /// (subscriber, webhook-id) → accepted deliveries.
    counts: HashMap<Key, u64>,
    /// When each pair was first accepted (the handler's start).
    first_seen: HashMap<Key, Instant>,
    /// How the first accepted copy was answered (once its answer is done).
    first_copy: HashMap<Key, FirstCopy>,
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
    pub counts: HashMap<Key, u64>,
    pub first_seen: HashMap<Key, Instant>,
    pub first_copy: HashMap<Key, FirstCopy>,
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
            first_copy: s.first_copy.clone(),
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

/// Records the first copy's [`FirstCopy`] when the answer's body ends
/// (hyper took the whole 2xx) or is dropped before (the connection is gone).
struct AnswerWatch {
    shared: Arc<Shared>,
    key: Key,
    started: Instant,
    waited_at_least: Duration,
    written: bool,
}

impl Drop for AnswerWatch {
    fn drop(&mut self) {
        let first = FirstCopy {
            handling: self.started.elapsed(),
            client_gone: !self.written,
            waited_at_least: self.waited_at_least,
        };
        self.shared
            .seen()
            .first_copy
            .entry(self.key.clone())
            .or_insert(first);
    }
}

/// A 200 whose body (`ok`, chunked) tells `watch` when hyper has taken all of
/// it: polled for the frame after the last one.
fn watched_ok(watch: Option<AnswerWatch>) -> Response {
    let stream = futures::stream::unfold((watch, false), |(watch, sent)| async move {
        if sent {
            if let Some(mut w) = watch {
                w.written = true;
            }
            None
        } else {
            Some((
                Ok::<_, std::convert::Infallible>(Bytes::from_static(b"ok")),
                (watch, true),
            ))
        }
    });
    (StatusCode::OK, Body::from_stream(stream)).into_response()
}

async fn hook(
    State(shared): State<Arc<Shared>>,
    Path(subscriber): Path<String>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mode = *shared.mode();
    match mode {
        Mode::Fail500 { until } if Instant::now() < until => {
            shared.seen().answered_500 += 1;
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Mode::Hang { until, hold } if Instant::now() < until => {
            shared.seen().hung += 1;
            // The worker gives up first (its timeout is shorter); if it
            // does not, this is still not a 2xx, so nothing is recorded.
            tokio::time::sleep(hold).await;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        _ => {}
    }
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(key) = shared.keys.get(&subscriber) else {
        shared.seen().unknown_subscriber += 1;
        return StatusCode::NOT_FOUND.into_response();
    };
    let header = |name: &str| {
        parts
            .headers
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
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let signed_by = u64::try_from(timestamp)
        .map(|t| Duration::from_secs(t.saturating_add(1)))
        .unwrap_or_default();
    let key: Key = (subscriber, id);
    let first = {
        let mut seen = shared.seen();
        let count = seen.counts.entry(key.clone()).or_default();
        *count += 1;
        let first = *count == 1;
        seen.first_seen.entry(key.clone()).or_insert(started);
        first
    };
    watched_ok(first.then(|| AnswerWatch {
        shared: shared.clone(),
        key,
        started,
        waited_at_least: now_unix.saturating_sub(signed_by),
        written: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_how_the_first_copy_was_answered() {
        #![allow(clippy::unwrap_used)]
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let receiver = Receiver::start(vec![Subscriber {
            name: "s".into(),
            secret: secret.into(),
            topics: vec!["#".into()],
        }])
        .await
        .unwrap();
        let key = signing::decode_secret(secret).unwrap();
        let client = reqwest::Client::new();
        let post = |id: &'static str| {
            let ts = chrono::Utc::now().timestamp();
            let body = b"{}".to_vec();
            client
                .post(receiver.url("s"))
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signing::sign(&key, id, ts, &body))
                .body(body)
                .send()
        };
        for _ in 0..2 {
            assert!(post("evt-1").await.unwrap().status().is_success());
        }
        let snap = receiver.snapshot();
        let k1 = ("s".to_owned(), "evt-1".to_owned());
        assert_eq!(snap.counts.get(&k1), Some(&2));
        let first = snap.first_copy.get(&k1).copied().unwrap();
        assert!(!first.client_gone, "{first:?}");
        assert!(first.handling < Duration::from_secs(1), "{first:?}");
        assert!(!first.timed_out(Duration::from_secs(2), Duration::from_millis(100)));
    }

    #[test]
    fn timed_out_only_past_the_timeout_or_without_the_answer() {
        let t = Duration::from_secs(2);
        let m = Duration::from_millis(100);
        let quick = FirstCopy {
            handling: Duration::from_millis(3),
            ..FirstCopy::default()
        };
        assert!(!quick.timed_out(t, m));
        let gone = FirstCopy {
            client_gone: true,
            ..quick
        };
        assert!(gone.timed_out(t, m));
        let waited = FirstCopy {
            waited_at_least: Duration::from_millis(1950),
            ..quick
        };
        assert!(waited.timed_out(t, m));
        let slow = FirstCopy {
            handling: Duration::from_millis(1899),
            ..quick
        };
        assert!(!slow.timed_out(t, m));
    }
}
