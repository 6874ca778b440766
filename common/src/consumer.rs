//! The consumer runtime shared by the workers and ingest's AMQP requests:
//! bounded prefetch, a bounded number of messages in flight, acknowledgement only after the handler's
//! transaction committed, transient failures sent to the retry path with
//! growing delay, poison messages dead-lettered at once with the reason in
//! `x-entrip-error`, reconnects with backoff, and graceful shutdown.
//! Acknowledgements are coalesced per channel (`acks.rs`).

mod acks;

use std::{
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    amqp::{self, ERROR_HEADER},
    config::AmqpSettings,
    trace::{TRACEPARENT_HEADER, TraceParent},
};
use acks::Acks;
use backon::BackoffBuilder;
use futures::{FutureExt, StreamExt, future::BoxFuture};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    message::Delivery,
    options::{
        BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
        BasicQosOptions, ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use prometheus::{HistogramVec, IntCounterVec};

/// Header counting how often a message went through the retry path.
pub const ATTEMPT_HEADER: &str = "x-entrip-attempt";
/// Header keeping a forwarded message's publisher (its `user_id`).
///
/// RabbitMQ refuses a publish whose `user_id` is not the connection's own
/// user, so a forward (retry path, DLQ) cannot keep the original's. It sets
/// `user_id` to the consumer's own broker user and moves the original here;
/// [`Message::publisher`] trusts this header only on a message whose
/// validated `user_id` is that own user: no one else can forge it.
pub const PUBLISHER_HEADER: &str = "x-entrip-user-id";

/// What a handler made of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect is committed.
    Processed,
    /// Seen before (inbox): acknowledged without a second effect.
    Duplicate,
    /// A transient failure: try again later.
    Retry(String),
    /// Can never succeed: dead-letter now.
    Poison(String),
    /// Answered without an effect (a request refused by a business rule):
    /// acknowledged, and counted apart from the processed ones.
    Refused,
}

/// What became of a message, for the outcome label of its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Processed,
    Duplicate,
    Refused,
    Retried,
    DeadLettered,
}

impl Disposition {
    /// The workers' labels (`entrip_worker_messages_total`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Duplicate => "duplicate",
            Self::Refused => "refused",
            Self::Retried => "retried",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// How much a consumer takes on at once, and how often it retries.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerSettings {
    /// Unacknowledged messages the broker hands the consumer.
    pub prefetch: u16,
    /// Messages processed at once.
    pub concurrency: usize,
    /// Retries of a transient failure before the message is dead-lettered.
    pub max_retries: u32,
}

/// The consumer's counter by (label, outcome) and its duration histogram
/// by label; the handler chooses the label (see [`Handler::label`]).
#[derive(Clone)]
pub struct ConsumerMetrics {
    pub messages: IntCounterVec,
    pub duration: HistogramVec,
}

/// A delivered message as handlers see it.
#[derive(Debug, Clone)]
pub struct Message {
    pub message_id: Option<String>,
    /// The `type` property.
    pub kind: Option<String>,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// How many times it went through the retry path before.
    pub attempt: u32,
    /// All of its properties (user id, reply-to, headers, …).
    pub properties: BasicProperties,
    /// The trace of the request that caused it (header `traceparent`).
    pub traceparent: Option<TraceParent>,
}

impl Message {
    /// A first delivery (no retry before) with these properties, for
    /// handing a message to a handler without a broker.
    pub fn new(
        message_id: Option<String>,
        kind: Option<String>,
        routing_key: String,
        body: Vec<u8>,
    ) -> Self {
        Self {
            message_id,
            kind,
            routing_key,
            body,
            attempt: 0,
            properties: BasicProperties::default(),
            traceparent: None,
        }
    }

    /// The broker user that published the message (`user_id`, which
    /// RabbitMQ validated), seen through the fleet's own forwards: `own` is
    /// the consumer's broker user (see [`PUBLISHER_HEADER`]).
    pub fn publisher(&self, own: &str) -> Option<String> {
        let user = self.properties.user_id().as_ref()?.as_str();
        if user == own
            && let Some(original) = self.header_text(PUBLISHER_HEADER)
        {
            return Some(original).filter(|u| !u.is_empty());
        }
        Some(user.to_owned())
    }

    /// Header `name` as text, if it is a string.
    pub fn header_text(&self, name: &str) -> Option<String> {
        let headers = self.properties.headers().as_ref()?;
        match headers.inner().iter().find(|(k, _)| k.as_str() == name)?.1 {
            AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }

    /// `own_user`: the consumer's broker user. The attempt count is the
    /// fleet's own bookkeeping: a message an upstream user published (its
    /// validated `user_id` another than ours) starts at 0 whatever header it
    /// carries, so that no publisher can skip its retries.
    fn from_delivery(d: &Delivery, own_user: &str) -> Self {
        let ours = d
            .properties
            .user_id()
            .as_ref()
            .is_none_or(|u| u.as_str() == own_user);
        let attempt = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| {
                h.inner()
                    .iter()
                    .find(|(k, _)| k.as_str() == ATTEMPT_HEADER)
                    .map(|(_, v)| v.clone())
            })
            .and_then(|v| match v {
                AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
                AMQPValue::LongInt(n) => u32::try_from(n).ok(),
                _ => None,
            })
            .filter(|_| ours)
            .unwrap_or(0);
        let mut msg = Self {
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            kind: d.properties.kind().as_ref().map(|s| s.as_str().to_owned()),
            routing_key: d.routing_key.as_str().to_owned(),
            body: d.data.clone(),
            attempt,
            properties: d.properties.clone(),
            traceparent: None,
        };
        msg.traceparent = msg
            .header_text(TRACEPARENT_HEADER)
            .and_then(|v| TraceParent::parse(&v));
        msg
    }
}

/// A consumer of one queue.
pub trait Handler: Send + Sync + 'static {
    /// The consumer's name: its connection's, its logs' and, by default,
    /// its metrics label.
    fn name(&self) -> &'static str;
    fn queue(&self) -> &'static str;
    /// The first label of the consumer's metrics for `msg`.
    fn label(&self, _msg: &Message) -> &'static str {
        self.name()
    }
    /// The outcome label of the consumer's counter.
    fn outcome(&self, disposition: Disposition) -> &'static str {
        disposition.as_str()
    }
    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome>;
    /// Told when a message is dead-lettered (after its retries or as poison).
    fn dead_lettered<'a>(&'a self, _msg: &'a Message, _reason: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// A session longer than this was healthy: the reconnect backoff restarts.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// Runs `handler` on its queue until `shutdown`.
pub struct Consumer<H: Handler> {
    handler: Arc<H>,
    amqp: AmqpSettings,
    settings: ConsumerSettings,
    metrics: ConsumerMetrics,
}

impl<H: Handler> Consumer<H> {
    pub fn new(
        handler: H,
        amqp: AmqpSettings,
        settings: ConsumerSettings,
        metrics: ConsumerMetrics,
    ) -> Self {
        Self {
            handler: Arc::new(handler),
            amqp,
            settings,
            metrics,
        }
    }

    /// Consumes until `shutdown`, reconnecting with backoff when the
    /// connection is lost; returns once the messages in flight finished.
    pub async fn run(self, shutdown: CancellationToken) {
        let name = format!("entrip-{}-{}", self.handler.name(), std::process::id());
        let mut backoff = amqp::reconnect_backoff().build();
        while !shutdown.is_cancelled() {
            let Some(conn) = amqp::connect_with_retry(&self.amqp, &name, &shutdown).await else {
                break;
            };
            let began = std::time::Instant::now();
            let ended = self.session(&conn, &shutdown).await;
            // A session that lasted was a healthy one that broke: its
            // reconnect starts from the shortest wait again.
            if began.elapsed() > HEALTHY_SESSION {
                backoff = amqp::reconnect_backoff().build();
            }
            match ended {
                Ok(()) => {
                    let _ = conn.close(200, "shutdown".into()).await;
                    break;
                }
                Err(err) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(10));
                    amqp::log_setup_error(
                        &err,
                        &format!("consumer {} lost its connection", self.handler.name()),
                    );
                    tracing::debug!(?wait, "waiting before reconnecting");
                    let _ = conn.close(200, "reconnecting".into()).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        tracing::info!(consumer = self.handler.name(), "consumer stopped");
    }

    /// One connection's life: `Ok` on shutdown, `Err` when it broke.
    async fn session(
        &self,
        conn: &Connection,
        shutdown: &CancellationToken,
    ) -> Result<(), lapin::Error> {
        let channel = conn.create_channel().await?;
        amqp::declare_topology(&channel, &self.amqp).await?;
        channel
            .basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await?;
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let tag = format!("{}-{}", self.handler.name(), uuid::Uuid::new_v4().simple());
        let mut deliveries = channel
            .basic_consume(
                self.handler.queue().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(
            consumer = self.handler.name(),
            queue = self.handler.queue(),
            "consuming"
        );
        let own_user: Arc<str> = self.amqp.user().into();
        let (acks, flusher) = Acks::start(self.settings.prefetch);
        let mut in_flight: JoinSet<Result<(), lapin::Error>> = JoinSet::new();
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    break Ok(());
                }
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    match done {
                        // The channel is gone. The other handlers finish (their
                        // effects commit; their acks fail and the redelivery is
                        // deduplicated): aborting one could cut a webhook between
                        // the receiver's 2xx and its record, and send it twice.
                        Ok(Err(err)) => break Err(err),
                        // Its message stays unsettled until the channel closes:
                        // the session ends, and the broker redelivers it (its
                        // delivery limit ends a loop).
                        Err(err) => {
                            tracing::error!(%err, "message task failed; the session ends and the broker redelivers it");
                            break Err(lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Error, "a message task failed").into());
                        }
                        Ok(Ok(())) => {}
                    }
                }
                next = deliveries.next(), if in_flight.len() < self.settings.concurrency => {
                    match next {
                        Some(Ok(delivery)) => {
                            acks.delivered(&delivery);
                            let task = MessageTask {
                                handler: self.handler.clone(),
                                publisher: publisher.clone(),
                                acks: acks.clone(),
                                own_user: own_user.clone(),
                                amqp: self.amqp.clone(),
                                max_retries: self.settings.max_retries,
                                metrics: self.metrics.clone(),
                            };
                            in_flight.spawn(task.process(delivery));
                        }
                        Some(Err(err)) => break Err(err),
                        None => break Err(lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "consumer ended").into()),
                    }
                }
            }
        };
        drain(&mut in_flight).await;
        acks.close(flusher).await;
        if ended.is_ok() {
            let _ = channel.close(200, "shutdown".into()).await;
            let _ = publisher.close(200, "shutdown".into()).await;
        }
        ended
    }
}

/// How long the messages in flight may take to finish once their channel is
/// gone or shutdown began: above a webhook call (5 s by default), a pool
/// acquire (3 s) and a forward (`FORWARD_TIMEOUT`). Past it they are aborted
/// and the broker redelivers them.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// A forward's publish and confirm: a blocked or half-dead connection must
/// not hold a message (and the consumer's reconnect) forever.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits for the messages in flight (dropping the set would abort them), at
/// most `DRAIN_GRACE`.
async fn drain(in_flight: &mut JoinSet<Result<(), lapin::Error>>) {
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while let Some(done) = in_flight.join_next().await {
            log_finished(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = in_flight.len(),
            "messages still in flight after {DRAIN_GRACE:?}; aborted, the broker redelivers them"
        );
        in_flight.abort_all();
        while let Some(done) = in_flight.join_next().await {
            log_finished(done);
        }
    }
}

/// Logs how a message's task ended when it did not end acknowledged.
fn log_finished(done: Result<Result<(), lapin::Error>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::warn!(%err, "message left unacknowledged; the broker redelivers it")
        }
        Err(err) => tracing::error!(%err, "message task failed; the broker redelivers it"),
    }
}

/// One delivered message with everything its handling needs.
struct MessageTask<H: Handler> {
    handler: Arc<H>,
    publisher: Channel,
    acks: Acks,
    /// The broker user the consumer connects as.
    own_user: Arc<str>,
    amqp: AmqpSettings,
    max_retries: u32,
    metrics: ConsumerMetrics,
}

impl<H: Handler> MessageTask<H> {
    async fn process(self, delivery: Delivery) -> Result<(), lapin::Error> {
        let msg = Message::from_delivery(&delivery, &self.own_user);
        let consumer = self.handler.name();
        let span = tracing::info_span!(
            "message",
            consumer,
            event_id = msg.message_id.as_deref().unwrap_or("-"),
            routing_key = %msg.routing_key,
            attempt = msg.attempt,
            trace_id = msg.traceparent.as_ref().map_or("-", TraceParent::trace_id),
        );
        crate::telemetry::join_trace(&span, msg.traceparent.as_ref());
        async {
            let start = Instant::now();
            // A panicking handler must not strand its message unacknowledged:
            // it goes back to the queue, and x-delivery-limit ends a loop.
            let outcome = match AssertUnwindSafe(self.handler.handle(&msg)).catch_unwind().await {
                Ok(outcome) => outcome,
                Err(_) => {
                    tracing::error!("handler panicked; the message goes back to its queue");
                    self.acks
                        .nack(&delivery, BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await?;
                    return Ok(());
                }
            };
            let disposition = match &outcome {
                Outcome::Processed => {
                    self.acks.ack(&delivery);
                    Disposition::Processed
                }
                Outcome::Duplicate => {
                    self.acks.ack(&delivery);
                    Disposition::Duplicate
                }
                Outcome::Refused => {
                    self.acks.ack(&delivery);
                    Disposition::Refused
                }
                Outcome::Retry(reason) if msg.attempt < self.max_retries => {
                    let delays = &self.amqp.retry_delays_ms;
                    let index = usize::try_from(msg.attempt).unwrap_or(usize::MAX).min(delays.len() - 1);
                    let queue = amqp::retry_queue_name(self.handler.queue(), delays[index]);
                    tracing::warn!(%reason, retry_queue = %queue, "transient failure; retrying later");
                    self.forward(&delivery, &queue, msg.attempt + 1, reason).await?;
                    Disposition::Retried
                }
                Outcome::Retry(reason) | Outcome::Poison(reason) => {
                    let dlq = amqp::dlq_name(self.handler.queue());
                    tracing::error!(%reason, %dlq, "message dead-lettered");
                    // Told first: a crash after the forward must not leave
                    // the handler's bookkeeping (undelivered counts) behind.
                    self.handler.dead_lettered(&msg, reason).await;
                    self.forward(&delivery, &dlq, msg.attempt, reason).await?;
                    Disposition::DeadLettered
                }
            };
            let label = self.handler.label(&msg);
            self.metrics
                .messages
                .with_label_values(&[label, self.handler.outcome(disposition)])
                .inc();
            self.metrics
                .duration
                .with_label_values(&[label])
                .observe(start.elapsed().as_secs_f64());
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Publishes a copy to `queue` (through the default exchange), waits for
    /// the confirm, then acknowledges the original: at least once, never lost.
    async fn forward(
        &self,
        delivery: &Delivery,
        queue: &str,
        attempt: u32,
        reason: &str,
    ) -> Result<(), lapin::Error> {
        let publish = async {
            self.publisher
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &delivery.data,
                    forwarded_properties(&delivery.properties, &self.own_user, attempt, reason),
                )
                .await?
                .await
        };
        let confirmation = tokio::time::timeout(FORWARD_TIMEOUT, publish)
            .await
            .map_err(|_| {
                lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                    lapin::ChannelState::Error,
                    "no confirm for a forward in time",
                ))
            })??;
        if confirmation == Confirmation::Ack(None) {
            self.acks.ack(delivery);
            Ok(())
        } else {
            tracing::warn!(%queue, "forward not confirmed; the message goes back to its queue");
            self.acks
                .nack(
                    delivery,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await?;
            if !matches!(confirmation, Confirmation::Nack(_)) {
                return Ok(());
            }
            // A channel whose quorum queue lost its leader (a cluster node
            // died) was seen to nack every publish from then on: the
            // session ends and the consumer reconnects on a new one.
            Err(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Error,
                "a forward was nacked; the channel is replaced",
            )))
        }
    }
}

/// The original properties with the attempt count and the failure reason.
/// A `user_id` other than `own_user` moves to [`PUBLISHER_HEADER`].
fn forwarded_properties(
    props: &BasicProperties,
    own_user: &str,
    attempt: u32,
    reason: &str,
) -> BasicProperties {
    let props = republished_properties(props, own_user);
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(ATTEMPT_HEADER),
        AMQPValue::LongLongInt(i64::from(attempt)),
    );
    let reason: String = reason.chars().take(1000).collect();
    headers.insert(
        ShortString::from(ERROR_HEADER),
        AMQPValue::LongString(LongString::from(reason.as_str())),
    );
    props.with_headers(headers)
}

/// The properties a fleet process republishes a message with, as broker
/// user `own_user` (a retry, a dead-letter, a `dlq replay`). RabbitMQ
/// refuses a `user_id` that is not the connection's own, so another
/// publisher's moves to [`PUBLISHER_HEADER`], where [`Message::publisher`]
/// finds it; without a `user_id`, a header claiming a publisher is no one's
/// word and is dropped.
pub fn republished_properties(props: &BasicProperties, own_user: &str) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    let mut props = props.clone();
    match props.user_id().as_ref().map(|u| u.as_str().to_owned()) {
        Some(user) if user != own_user => {
            headers.insert(
                ShortString::from(PUBLISHER_HEADER),
                AMQPValue::LongString(LongString::from(user.as_str())),
            );
            props = props.with_user_id(own_user.into());
        }
        Some(_) => {}
        // No publisher: a header claiming one is no one's word.
        None => {
            let mut kept = FieldTable::default();
            for (k, v) in headers.inner() {
                if k.as_str() != PUBLISHER_HEADER {
                    kept.insert(k.clone(), v.clone());
                }
            }
            headers = kept;
        }
    }
    props.with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(props: BasicProperties) -> Message {
        Message {
            properties: props,
            ..Message::new(None, None, "k".into(), Vec::new())
        }
    }

    /// A forward keeps the publisher: by header, under the consumer's own
    /// validated user; a header under any other user is not trusted.
    #[test]
    fn forwards_keep_the_publisher_and_no_one_else_can_claim_one() {
        let original = BasicProperties::default().with_user_id("upstream".into());
        assert_eq!(
            message(original.clone()).publisher("fleet").as_deref(),
            Some("upstream")
        );
        let once = forwarded_properties(&original, "fleet", 1, "503 database unavailable");
        assert_eq!(once.user_id().as_ref().map(|u| u.as_str()), Some("fleet"));
        assert_eq!(
            message(once.clone()).publisher("fleet").as_deref(),
            Some("upstream")
        );
        let twice = forwarded_properties(&once, "fleet", 2, "again");
        assert_eq!(
            message(twice).publisher("fleet").as_deref(),
            Some("upstream")
        );

        let mut forged = FieldTable::default();
        forged.insert(
            PUBLISHER_HEADER.into(),
            AMQPValue::LongString("victim".into()),
        );
        let forged = BasicProperties::default()
            .with_user_id("mallory".into())
            .with_headers(forged);
        assert_eq!(
            message(forged).publisher("fleet").as_deref(),
            Some("mallory")
        );
        assert_eq!(message(BasicProperties::default()).publisher("fleet"), None);
        // A message the fleet's user published itself, without the header.
        let own = BasicProperties::default().with_user_id("fleet".into());
        assert_eq!(message(own).publisher("fleet").as_deref(), Some("fleet"));
    }
}
