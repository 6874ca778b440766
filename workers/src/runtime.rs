//! The consumer runtime shared by the workers: bounded prefetch, a bounded
//! number of messages in flight, acknowledgement only after the handler's
//! transaction committed, transient failures sent to the retry path with
//! growing delay, poison messages dead-lettered at once with the reason in
//! `x-entrip-error`, reconnects with backoff, and graceful shutdown.

use std::{
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use backon::BackoffBuilder;
use entrip_common::{
    amqp::{self, ERROR_HEADER},
    config::{AmqpSettings, WorkersSettings},
};
use futures::{FutureExt, StreamExt, future::BoxFuture};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::WorkerMetrics;

/// Header counting how often a message went through the retry path.
pub const ATTEMPT_HEADER: &str = "x-entrip-attempt";

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
}

/// A delivered message as handlers see it.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) message_id: Option<String>,
    /// The `type` property.
    pub(crate) kind: Option<String>,
    pub(crate) routing_key: String,
    pub(crate) body: Vec<u8>,
    /// How many times it went through the retry path before.
    pub(crate) attempt: u32,
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
        }
    }

    fn from_delivery(d: &Delivery) -> Self {
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
            .unwrap_or(0);
        Self {
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            kind: d.properties.kind().as_ref().map(|s| s.as_str().to_owned()),
            routing_key: d.routing_key.as_str().to_owned(),
            body: d.data.clone(),
            attempt,
        }
    }
}

/// A consumer of one queue.
pub trait Handler: Send + Sync + 'static {
    /// The consumer's name: metrics label and inbox consumer.
    fn name(&self) -> &'static str;
    fn queue(&self) -> &'static str;
    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome>;
    /// Told when a message is dead-lettered (after its retries or as poison).
    fn dead_lettered<'a>(&'a self, _msg: &'a Message, _reason: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Runs `handler` on its queue until `shutdown`.
pub struct Consumer<H: Handler> {
    handler: Arc<H>,
    amqp: AmqpSettings,
    settings: WorkersSettings,
    metrics: WorkerMetrics,
}

impl<H: Handler> Consumer<H> {
    pub fn new(
        handler: H,
        amqp: AmqpSettings,
        settings: WorkersSettings,
        metrics: WorkerMetrics,
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
        let name = format!(
            "entrip-workers-{}-{}",
            self.handler.name(),
            std::process::id()
        );
        let mut backoff = amqp::reconnect_backoff().build();
        while !shutdown.is_cancelled() {
            let Some(conn) = amqp::connect_with_retry(&self.amqp.url, &name, &shutdown).await
            else {
                break;
            };
            match self.session(&conn, &shutdown).await {
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
        let mut in_flight: JoinSet<Result<(), lapin::Error>> = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    drain(&mut in_flight).await;
                    let _ = channel.close(200, "shutdown".into()).await;
                    let _ = publisher.close(200, "shutdown".into()).await;
                    return Ok(());
                }
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok(Err(err)) = done {
                        // The channel is gone. The other handlers finish (their
                        // effects commit; their acks fail and the redelivery is
                        // deduplicated): aborting one could cut a webhook between
                        // the receiver's 2xx and its record, and send it twice.
                        drain(&mut in_flight).await;
                        return Err(err);
                    }
                    log_finished(done);
                }
                next = deliveries.next(), if in_flight.len() < self.settings.concurrency => {
                    match next {
                        Some(Ok(delivery)) => {
                            let task = MessageTask {
                                handler: self.handler.clone(),
                                publisher: publisher.clone(),
                                amqp: self.amqp.clone(),
                                max_retries: self.settings.max_retries,
                                metrics: self.metrics.clone(),
                            };
                            in_flight.spawn(task.process(delivery));
                        }
                        Some(Err(err)) => {
                            drain(&mut in_flight).await;
                            return Err(err);
                        }
                        None => {
                            drain(&mut in_flight).await;
                            return Err(lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "consumer ended").into());
                        }
                    }
                }
            }
        }
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
    amqp: AmqpSettings,
    max_retries: u32,
    metrics: WorkerMetrics,
}

impl<H: Handler> MessageTask<H> {
    async fn process(self, delivery: Delivery) -> Result<(), lapin::Error> {
        let msg = Message::from_delivery(&delivery);
        let consumer = self.handler.name();
        let span = tracing::info_span!(
            "message",
            consumer,
            event_id = msg.message_id.as_deref().unwrap_or("-"),
            routing_key = %msg.routing_key,
            attempt = msg.attempt
        );
        async {
            let start = Instant::now();
            // A panicking handler must not strand its message unacknowledged:
            // it goes back to the queue, and x-delivery-limit ends a loop.
            let outcome = match AssertUnwindSafe(self.handler.handle(&msg)).catch_unwind().await {
                Ok(outcome) => outcome,
                Err(_) => {
                    tracing::error!("handler panicked; the message goes back to its queue");
                    delivery
                        .nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        })
                        .await?;
                    return Ok(());
                }
            };
            let label = match &outcome {
                Outcome::Processed => {
                    delivery.ack(BasicAckOptions::default()).await?;
                    "processed"
                }
                Outcome::Duplicate => {
                    delivery.ack(BasicAckOptions::default()).await?;
                    "duplicate"
                }
                Outcome::Retry(reason) if msg.attempt < self.max_retries => {
                    let delays = &self.amqp.retry_delays_ms;
                    let index = usize::try_from(msg.attempt).unwrap_or(usize::MAX).min(delays.len() - 1);
                    let queue = amqp::retry_queue_name(self.handler.queue(), delays[index]);
                    tracing::warn!(%reason, retry_queue = %queue, "transient failure; retrying later");
                    self.forward(&delivery, &queue, msg.attempt + 1, reason).await?;
                    "retried"
                }
                Outcome::Retry(reason) | Outcome::Poison(reason) => {
                    let dlq = amqp::dlq_name(self.handler.queue());
                    tracing::error!(%reason, %dlq, "message dead-lettered");
                    // Told first: a crash after the forward must not leave
                    // the handler's bookkeeping (undelivered counts) behind.
                    self.handler.dead_lettered(&msg, reason).await;
                    self.forward(&delivery, &dlq, msg.attempt, reason).await?;
                    "dead_lettered"
                }
            };
            self.metrics.messages.with_label_values(&[consumer, label]).inc();
            self.metrics
                .processing_duration
                .with_label_values(&[consumer])
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
                    forwarded_properties(&delivery.properties, attempt, reason),
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
            delivery.ack(BasicAckOptions::default()).await.map(drop)
        } else {
            tracing::warn!(%queue, "forward not confirmed; the message goes back to its queue");
            delivery
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
                .map(drop)
        }
    }
}

/// The original properties with the attempt count and the failure reason.
fn forwarded_properties(props: &BasicProperties, attempt: u32, reason: &str) -> BasicProperties {
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
    props.clone().with_headers(headers)
}
