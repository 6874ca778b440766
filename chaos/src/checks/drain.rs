//! The wait after the load: polling the outbox, the worker queues, the
//! settlements and the webhook receiver until the fleet has drained, or
//! until nothing has moved for a while. Table and column names are those of
//! `migrations/`.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use lapin::{options::QueueDeclareOptions, types::FieldTable};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    Error,
    faults::rabbitmqctl,
    receiver::{Receiver, Subscriber},
};

/// What `rabbitmqctl list_queues` tells of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Every message the queue holds.
    pub messages: i64,
    pub ready: i64,
    pub unacked: i64,
}

impl Depth {
    /// Messages neither ready nor delivered: in a quorum queue with
    /// at-least-once dead-lettering, those dead-lettered (a TTL retry queue's
    /// expired messages) and not yet confirmed by their target queue.
    pub fn dead_lettered_waiting(self) -> i64 {
        self.messages - self.ready - self.unacked
    }
}

impl std::fmt::Display for Depth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.messages)?;
        let waiting = self.dead_lettered_waiting();
        if waiting > 0 {
            write!(
                f,
                " ({} ready, {} unacked, {waiting} dead-lettered and not yet moved)",
                self.ready, self.unacked
            )?;
        }
        Ok(())
    }
}

/// Messages in each queue of the vhost.
pub async fn queue_depths(vhost: &str) -> Result<BTreeMap<String, Depth>, String> {
    let out = rabbitmqctl(&[
        "-q",
        "list_queues",
        "-p",
        vhost,
        "--no-table-headers",
        "name",
        "messages",
        "messages_ready",
        "messages_unacknowledged",
    ])
    .await?;
    Ok(parse_depths(&out))
}

fn parse_depths(out: &str) -> BTreeMap<String, Depth> {
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| parts.get(i).and_then(|v| v.parse::<i64>().ok());
        if let (Some(name), Some(messages)) = (parts.first(), n(1)) {
            let depth = Depth {
                messages,
                ready: n(2).unwrap_or(messages),
                unacked: n(3).unwrap_or(0),
            };
            m.insert((*name).to_owned(), depth);
        }
    }
    m
}

pub(super) fn is_dlq(name: &str) -> bool {
    name.ends_with(".dlq")
}

/// Ingest's DLQ: planted poison belongs there (its own check judges it).
pub(super) fn is_ingest_dlq(name: &str) -> bool {
    name == entrip_common::amqp::dlq_name(entrip_common::amqp::INGEST_QUEUE)
}

/// Worker queues and their retry queues: what must drain to zero.
pub(super) fn is_work_queue(name: &str) -> bool {
    !is_dlq(name) && name != entrip_common::amqp::UNROUTED && name.starts_with("entrip.")
}

/// The (subscriber, event id) pairs that must reach the receiver, from the
/// The (subscriber, event id) pairs that must reach the receiver: every
/// outbox event, once for each subscriber whose patterns match its topic.
pub fn wanted_webhooks<'e>(
    events: impl IntoIterator<Item = (Uuid, &'e str)>,
    subscribers: &[Subscriber],
) -> HashSet<(String, String)> {
    let mut want = HashSet::new();
    for (id, topic) in events {
        for s in subscribers.iter().filter(|s| s.wants(topic)) {
            want.insert((s.name.clone(), id.to_string()));
        }
    }
    want
}

/// [`wanted_webhooks`] of the outbox as it is now.
async fn expected_webhooks(
    pool: &PgPool,
    receiver: &Receiver,
) -> Result<HashSet<(String, String)>, Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, topic FROM outbox")
        .fetch_all(pool)
        .await?;
    Ok(wanted_webhooks(
        rows.iter().map(|(id, t)| (*id, t.as_str())),
        &receiver.subscribers,
    ))
}

async fn scalar(pool: &PgPool, sql: &'static str) -> Result<i64, Error> {
    Ok(sqlx::query_scalar(sql).fetch_one(pool).await?)
}

/// Ready messages of some queues, by passive declares over one AMQP
/// connection: cheap enough to poll every few hundred milliseconds, where a
/// `rabbitmqctl` call starts an Erlang VM (over a second of CPU, which a
/// busy machine does not have to spare). It does not count messages
/// delivered and not yet acknowledged, so [`drain`] confirms with
/// [`queue_depths`] before it calls the fleet drained.
struct ReadyProbe {
    url: String,
    conn: Option<lapin::Connection>,
}

impl ReadyProbe {
    async fn ready(&mut self, names: &[String]) -> Result<i64, String> {
        let conn = match self.conn.take() {
            Some(c) if c.status().connected() => c,
            _ => crate::broker_connect(&self.url, "entrip-chaos-drain")
                .await
                .map_err(|e| format!("connect: {e}"))?,
        };
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| format!("channel: {e}"))?;
        let mut total = 0;
        for name in names {
            let q = channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("passive declare of {name}: {e}"))?;
            total += i64::from(q.message_count());
        }
        let _ = channel.close(200, "probed".into()).await;
        self.conn = Some(conn);
        Ok(total)
    }

    async fn close(self) {
        if let Some(c) = self.conn {
            let _ = c.close(200, "drain over".into()).await;
        }
    }
}

/// What the drain saw last.
#[derive(Debug, Default)]
pub struct DrainState {
    pub undelivered: i64,
    /// Messages in the worker and retry queues (ready and unacknowledged,
    /// from the last `rabbitmqctl` confirmation; ready only while polling).
    pub work_messages: i64,
    pub settlements: i64,
    pub webhooks_missing: usize,
    pub drained: bool,
    /// How long nothing moved when the drain ended.
    pub still_for: Duration,
}

/// The figures whose movement is the fleet's progress while it drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DrainFigures {
    undelivered: i64,
    published: i64,
    work_messages: i64,
    settlements: i64,
    webhooks_missing: usize,
    webhooks_received: u64,
}

/// Waits until the outbox is delivered, the worker queues are empty, the
/// expected settlements exist and every expected webhook arrived (twice in a
/// row, then confirmed with `rabbitmqctl`, which counts unacknowledged
/// messages too). It gives up only when none of those figures has moved
/// for `stall`: a busy machine drains slowly, a stuck fleet does not drain
/// at all, and a fixed deadline cannot tell the two apart.
pub async fn drain(
    pool: &PgPool,
    vhost: &str,
    amqp_url: &str,
    receiver: &Receiver,
    expected_settlements: i64,
    stall: Duration,
) -> DrainState {
    let mut state = DrainState::default();
    // The queue names from the broker itself (retry queues included).
    let names: Vec<String> = match queue_depths(vhost).await {
        Ok(d) => d.into_keys().filter(|k| is_work_queue(k)).collect(),
        Err(e) => {
            tracing::warn!("drain: cannot list the queues: {e}");
            Vec::new()
        }
    };
    let mut probe = ReadyProbe {
        url: amqp_url.to_owned(),
        conn: None,
    };
    let mut last: Option<DrainFigures> = None;
    // Messages held unacknowledged at the last confirmation.
    let mut last_held: Option<i64> = None;
    let mut moved_at = Instant::now();
    let mut good_in_a_row = 0;
    let mut last_log = Instant::now();
    loop {
        let undelivered = scalar(
            pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND dead_at IS NULL",
        )
        .await;
        let published = scalar(
            pool,
            "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL",
        )
        .await;
        let settlements = scalar(pool, "SELECT count(*) FROM settlements").await;
        let ready = probe.ready(&names).await;
        let want = expected_webhooks(pool, receiver).await;
        match (undelivered, published, settlements, ready, want) {
            (Ok(u), Ok(p), Ok(s), Ok(r), Ok(w)) => {
                let seen = receiver.snapshot();
                let figures = DrainFigures {
                    undelivered: u,
                    published: p,
                    work_messages: r,
                    settlements: s,
                    webhooks_missing: w.iter().filter(|k| !seen.counts.contains_key(*k)).count(),
                    webhooks_received: seen.counts.values().sum(),
                };
                if last != Some(figures) {
                    moved_at = Instant::now();
                    last = Some(figures);
                }
                state.undelivered = u;
                state.settlements = s;
                state.work_messages = r;
                state.webhooks_missing = figures.webhooks_missing;
                let good =
                    u == 0 && r == 0 && s >= expected_settlements && figures.webhooks_missing == 0;
                good_in_a_row = if good { good_in_a_row + 1 } else { 0 };
            }
            (u, p, s, r, w) => {
                good_in_a_row = 0;
                tracing::warn!(
                    "drain: cannot read the figures: {:?} {:?} {:?} {:?} {:?}",
                    u.err(),
                    p.err(),
                    s.err(),
                    r.err(),
                    w.err()
                );
            }
        }
        if good_in_a_row >= 2 {
            match queue_depths(vhost).await {
                Ok(d) => {
                    let held: i64 = d
                        .iter()
                        .filter(|(k, _)| is_work_queue(k))
                        .map(|(_, v)| v.messages)
                        .sum();
                    state.work_messages = held;
                    if held == 0 {
                        state.drained = true;
                        break;
                    }
                    // Delivered, not acknowledged yet (redeliveries the
                    // workers find applied move no other figure): keep
                    // polling, and count their acknowledgement as progress.
                    let held_in: Vec<String> = d
                        .iter()
                        .filter(|(k, v)| is_work_queue(k) && v.messages != 0)
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    tracing::info!(
                        "drain: {held} messages not acknowledged yet (or dead-lettered and not yet moved): {}",
                        held_in.join(", ")
                    );
                    if last_held != Some(held) {
                        moved_at = Instant::now();
                        last_held = Some(held);
                    }
                    good_in_a_row = 0;
                }
                Err(e) => tracing::warn!("drain: cannot list the queues: {e}"),
            }
        }
        state.still_for = moved_at.elapsed();
        if state.still_for >= stall {
            tracing::warn!(?last, "drain: nothing moved for {stall:?}; giving up");
            break;
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            tracing::info!(?last, expected_settlements, "draining");
            last_log = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    state.still_for = moved_at.elapsed();
    probe.close().await;
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depths_tell_dead_lettered_messages_apart() {
        let d = parse_depths(
            "entrip.notifications.retry.3000ms\t8\t0\t0\nentrip.settlement\t3\t1\t2\nnot a queue line\n",
        );
        let retry = d["entrip.notifications.retry.3000ms"];
        assert_eq!(retry.dead_lettered_waiting(), 8);
        assert_eq!(
            retry.to_string(),
            "8 (0 ready, 0 unacked, 8 dead-lettered and not yet moved)"
        );
        let work = d["entrip.settlement"];
        assert_eq!((work.messages, work.ready, work.unacked), (3, 1, 2));
        assert_eq!(work.to_string(), "3");
        assert_eq!(d.len(), 2);
    }
}
