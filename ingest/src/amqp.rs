//! The AMQP side of ingest: requests that upstream systems publish to the
//! exchange `entrip.ingest` (docs/DESIGN.md "AMQP ingest"), consumed from the
//! queue `entrip.ingest` by the shared consumer runtime
//! (`entrip_common::consumer`: ack after commit, retry path, DLQ).
//!
//! A message's broker user (`user_id`, which RabbitMQ checks against the
//! connection's user) is its API client; its `message_id` is the
//! idempotency key, in the same scope as the client's HTTP keys. The body is
//! validated and submitted exactly as over HTTP (`requests.rs`,
//! `submit.rs`), and the answer (status, body) is the one HTTP gives:
//! - 2xx, 404, 409, 422: replied (when `reply_to` is set) and acked;
//! - the 400 class, 401, 403: replied, then dead-lettered with the reason
//!   in `x-entrip-error` (a message that can never be a request);
//! - 5xx (the database away): the retry path, the DLQ only after it.
//!
//! Replies go out on a connection of their own, with confirms, before the
//! request is acked; the confirm is awaited aside. A reply that cannot be
//! routed is logged and counted, and the request is acked all the same (a
//! resend with the same `message_id` replays the answer). A reply to a
//! direct reply-to address is never counted so (the broker cannot tell).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use entrip_common::{
    amqp::{self, INGEST_QUEUE},
    config::{AmqpSettings, IngestSettings},
    consumer::{Consumer, Disposition, Handler, Message, Outcome},
    domain::IdempotencyKey,
};
use futures::future::BoxFuture;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use prometheus::IntCounterVec;
use sqlx::PgPool;
use tokio::sync::Mutex as AsyncMutex;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    App,
    clients::{self, AmqpUser, Client},
    commands::Context,
    error::ApiError,
    idempotency::Fingerprint,
    requests::{CommandType, Refusal},
    submit::{Outcome as Submitted, submit},
};

/// The header naming the entity a command acts on (the id in the HTTP path).
pub const ENTITY_HEADER: &str = "x-entrip-entity-id";
/// The reply's header with the HTTP status of the same request.
pub const STATUS_HEADER: &str = "x-entrip-status";
/// The reply's header marking a replayed answer.
pub const REPLAYED_HEADER: &str = "x-entrip-replayed";

/// How long a reply may wait for the broker's confirm.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The consumer of `entrip.ingest`, ready to run.
pub fn consumer(app: &App, amqp: AmqpSettings) -> Consumer<AmqpIngest> {
    let settings = app.settings.amqp.consumer();
    let metrics = app.metrics.consumer();
    let handler = AmqpIngest {
        pool: app.pool.clone(),
        settings: app.settings.clone(),
        replies: Replier::new(amqp.clone(), app.metrics.reply_failures.clone()),
        users: UserCache::new(Duration::from_secs(app.settings.auth_cache_secs)),
        auth_failures: app.metrics.auth_failures.clone(),
        replays: app.metrics.replays.clone(),
        own_user: amqp.user(),
    };
    Consumer::new(handler, amqp, settings, metrics)
}

/// Handles one request message; see the module comment.
pub struct AmqpIngest {
    pool: PgPool,
    settings: Arc<IngestSettings>,
    replies: Replier,
    users: UserCache,
    auth_failures: IntCounterVec,
    /// `entrip_idempotency_replays_total`, shared with HTTP: labelled with
    /// the command's HTTP route.
    replays: IntCounterVec,
    /// The broker user ingest consumes as: its forwards carry the
    /// publisher in a header (`entrip_common::consumer::PUBLISHER_HEADER`).
    own_user: String,
}

/// What became of a request: its answer, and how the message ends.
struct Answer {
    status: u16,
    body: serde_json::Value,
    problem: bool,
    replayed: bool,
    outcome: Outcome,
}

impl Answer {
    fn submitted(s: Submitted) -> Self {
        Self {
            status: s.status,
            body: s.body,
            problem: false,
            replayed: s.replayed,
            outcome: if s.replayed {
                Outcome::Duplicate
            } else {
                Outcome::Processed
            },
        }
    }

    /// A refusal: an answer (404, 409, 422), a message that can never be a
    /// request (the 400 class, 401, 403), or a failure worth retrying (5xx).
    fn refused(err: ApiError) -> Self {
        let status = err.status().as_u16();
        let body = err.body();
        let reason = format!("{status} {}", body["detail"].as_str().unwrap_or_default());
        let outcome = match status {
            404 | 409 | 422 => Outcome::Refused,
            500.. => Outcome::Retry(reason),
            _ => Outcome::Poison(reason),
        };
        Self {
            status,
            body,
            problem: true,
            replayed: false,
            outcome,
        }
    }
}

impl Handler for AmqpIngest {
    fn name(&self) -> &'static str {
        "ingest"
    }

    fn queue(&self) -> &'static str {
        INGEST_QUEUE
    }

    fn label(&self, msg: &Message) -> &'static str {
        msg.kind
            .as_deref()
            .and_then(CommandType::parse)
            .map_or("unknown", CommandType::as_str)
    }

    fn outcome(&self, disposition: Disposition) -> &'static str {
        match disposition {
            Disposition::Processed => "accepted",
            Disposition::Duplicate => "replayed",
            Disposition::Refused => "rejected",
            Disposition::Retried => "retried",
            Disposition::DeadLettered => "dead_lettered",
        }
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        let span = tracing::info_span!(
            "request",
            idempotency_key = msg.message_id.as_deref().unwrap_or("-"),
            r#type = msg.kind.as_deref().unwrap_or("-"),
            booking_id = tracing::field::Empty
        );
        Box::pin(
            async move {
                let answer = match self.answer(msg).await {
                    Ok(submitted) => Answer::submitted(submitted),
                    Err(err) => Answer::refused(err),
                };
                // A failure worth retrying is not answered yet: the retry
                // will be.
                if !matches!(answer.outcome, Outcome::Retry(_)) {
                    self.replies.send(msg, &answer).await;
                }
                if answer.replayed
                    && let Some(kind) = msg.kind.as_deref().and_then(CommandType::parse)
                {
                    self.replays.with_label_values(&[kind.route()]).inc();
                }
                if let Outcome::Poison(reason) = &answer.outcome {
                    tracing::warn!(%reason, "request message refused");
                }
                answer.outcome
            }
            .instrument(span),
        )
    }
}

impl AmqpIngest {
    /// Checks the message as a request of its client and submits it.
    async fn answer(&self, msg: &Message) -> Result<Submitted, ApiError> {
        let kind_name = msg.kind.as_deref().unwrap_or_default();
        let kind = CommandType::parse(kind_name).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unknown command type {kind_name:?} (property `type`); one of {}",
                CommandType::EVERY.map(CommandType::as_str).join(", ")
            ))
        })?;
        let key = msg
            .message_id
            .as_deref()
            .ok_or_else(|| Refusal::field("message_id", "the property is required"))
            .and_then(|id| {
                IdempotencyKey::parse(id).map_err(|e| Refusal::field("message_id", e.0))
            })?;
        if msg
            .properties
            .reply_to()
            .as_ref()
            .is_some_and(|r| forbidden_reply_to(r.as_str()))
        {
            return Err(Refusal::field(
                "reply_to",
                "must not name one of the fleet's queues (entrip.*)",
            )
            .into());
        }
        let client = self.client(msg, kind).await?;
        if let Some(ct) = msg.properties.content_type() {
            let essence = ct.as_str().split(';').next().unwrap_or_default().trim();
            let essence = essence.to_ascii_lowercase();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "{essence}; send application/json"
                )));
            }
        }
        let limit = self.settings.body_limit_bytes;
        if msg.body.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        let id = if kind.on_entity() {
            let raw = msg.header_text(ENTITY_HEADER).ok_or_else(|| {
                Refusal::field(ENTITY_HEADER, format!("required for {}", kind.as_str()))
            })?;
            let id = Uuid::parse_str(&raw)
                .map_err(|_| Refusal::field(ENTITY_HEADER, "must be a UUID"))?;
            Some(id)
        } else {
            None
        };
        let (command, body) = kind.command(id, &msg.body)?;
        let fingerprint = Fingerprint::new("POST", &kind.path(id), &body);
        let context = Context {
            channel: "amqp",
            client: client.name,
            idempotency_key: key.as_str().to_owned(),
            traceparent: msg.traceparent.as_ref().map(ToString::to_string),
        };
        let ttl = Duration::from_secs(self.settings.idempotency_ttl_secs);
        Ok(submit(&self.pool, ttl, &key, &fingerprint, command, &context).await?)
    }

    /// The API client of the message's broker user, if it may send `kind`.
    async fn client(&self, msg: &Message, kind: CommandType) -> Result<Client, ApiError> {
        let refused = |reason: &str, err: ApiError| {
            self.auth_failures.with_label_values(&[reason]).inc();
            err
        };
        let Some(user) = msg.publisher(&self.own_user) else {
            return Err(refused(
                "missing",
                ApiError::Unidentified(
                    "the message has no user_id; set it to the publishing broker user".into(),
                ),
            ));
        };
        let user = user.as_str();
        let client = match self.users.get(user) {
            Some(client) => client,
            None => match clients::for_amqp_user(&self.pool, user).await {
                Ok(AmqpUser::Client(client)) => {
                    self.users.put(user, client.clone());
                    client
                }
                Ok(AmqpUser::Revoked) => {
                    return Err(refused(
                        "revoked",
                        ApiError::Unidentified(format!(
                            "the API client of broker user {user:?} is revoked"
                        )),
                    ));
                }
                Ok(AmqpUser::Unknown) => {
                    return Err(refused(
                        "unknown",
                        ApiError::Unidentified(format!(
                            "broker user {user:?} belongs to no API client (`ingest clients create … --amqp-user {user}`)"
                        )),
                    ));
                }
                Err(err) => return Err(ApiError::from(err)),
            },
        };
        if !client.allows(kind.scope()) {
            return Err(refused(
                "scope",
                ApiError::Forbidden(format!(
                    "client {} lacks scope {}, which {} needs",
                    client.name,
                    kind.scope(),
                    kind.as_str()
                )),
            ));
        }
        Ok(client)
    }
}

/// A reply goes out as the fleet's broker user, which may write to every
/// queue: a `reply_to` naming one of the fleet's own (`entrip.*`: the worker
/// queues, their DLQs, the ingest queue) would let a publisher drop messages
/// where it may not publish itself. Such a request is refused, unanswered.
fn forbidden_reply_to(reply_to: &str) -> bool {
    reply_to.starts_with("entrip.")
}

/// A direct reply-to address (`amq.rabbitmq.reply-to.…`). RabbitMQ returns a
/// `mandatory` publish to one as unroutable (`NO_ROUTE`) whether or not it
/// delivered it (seen on 3.10; docs/amqp.md), so such replies go
/// without `mandatory`: a return would be a false failure on every reply,
/// and could not tell a gone consumer from a live one anyway.
fn is_direct_reply_to(reply_to: &str) -> bool {
    reply_to.starts_with("amq.rabbitmq.reply-to")
}

/// Broker users found to belong to a client, trusted for
/// `ingest.auth_cache_secs` (as API keys are), so that a revocation takes
/// effect within that time. Users not found are not cached.
struct UserCache {
    ttl: Duration,
    found: Mutex<HashMap<String, (Instant, Client)>>,
}

/// Broker users are few; the bound guards against a flood of them.
const USER_CACHE_LIMIT: usize = 1_000;

impl UserCache {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            found: Mutex::default(),
        }
    }

    fn get(&self, user: &str) -> Option<Client> {
        let found = self.found.lock().ok()?;
        let (at, client) = found.get(user)?;
        (at.elapsed() < self.ttl).then(|| client.clone())
    }

    fn put(&self, user: &str, client: Client) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut found) = self.found.lock() {
            if found.len() >= USER_CACHE_LIMIT {
                found.retain(|_, (at, _)| at.elapsed() < self.ttl);
            }
            if found.len() < USER_CACHE_LIMIT {
                found.insert(user.to_owned(), (Instant::now(), client));
            }
        }
    }
}

/// Publishes replies on a connection of its own, opened when first needed
/// and again after it broke (on whichever node answers).
struct Replier {
    amqp: AmqpSettings,
    channel: AsyncMutex<Option<(Connection, Channel)>>,
    /// By reason: `unroutable`, `broker`.
    failures: IntCounterVec,
}

impl Replier {
    fn new(amqp: AmqpSettings, failures: IntCounterVec) -> Self {
        Self {
            amqp,
            channel: AsyncMutex::new(None),
            failures,
        }
    }

    /// Replies to `msg` when it asks for it (`reply_to`); a reply that fails
    /// is logged and counted, never retried here.
    async fn send(&self, msg: &Message, answer: &Answer) {
        let Some(reply_to) = msg
            .properties
            .reply_to()
            .as_ref()
            .map(|r| r.as_str())
            .filter(|r| !forbidden_reply_to(r))
        else {
            return;
        };
        let correlation = msg
            .properties
            .correlation_id()
            .clone()
            .or_else(|| msg.message_id.as_deref().map(ShortString::from));
        let mut headers = FieldTable::default();
        headers.insert(
            STATUS_HEADER.into(),
            AMQPValue::LongInt(i32::from(answer.status)),
        );
        if answer.replayed {
            headers.insert(REPLAYED_HEADER.into(), AMQPValue::Boolean(true));
        }
        let content_type = if answer.problem {
            "application/problem+json"
        } else {
            "application/json"
        };
        let mut props = BasicProperties::default()
            .with_content_type(content_type.into())
            .with_headers(headers);
        if let Some(correlation) = correlation {
            props = props.with_correlation_id(correlation);
        }
        let body = answer.body.to_string();
        let published =
            tokio::time::timeout(REPLY_TIMEOUT, self.publish(reply_to, body, props)).await;
        let confirm = match published {
            Ok(Ok(confirm)) => confirm,
            Ok(Err(err)) => {
                tracing::warn!(%reply_to, %err, "reply failed; the request stands");
                *self.channel.lock().await = None;
                self.failures.with_label_values(&["broker"]).inc();
                return;
            }
            Err(_) => {
                tracing::warn!(%reply_to, "reply not sent in time; the request stands");
                *self.channel.lock().await = None;
                self.failures.with_label_values(&["broker"]).inc();
                return;
            }
        };
        // The confirm is awaited aside: the request is acked meanwhile (it
        // is stored whatever becomes of its reply), so that the broker's
        // round trip is not on every request's path.
        let failures = self.failures.clone();
        let reply_to = reply_to.to_owned();
        tokio::spawn(async move {
            let reason = match tokio::time::timeout(REPLY_TIMEOUT, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => return,
                Ok(Ok(Confirmation::Ack(Some(_)))) => {
                    tracing::warn!(%reply_to, "reply could not be routed (no such queue); the request stands");
                    "unroutable"
                }
                Ok(Ok(other)) => {
                    tracing::warn!(%reply_to, ?other, "reply not confirmed by the broker; the request stands");
                    "broker"
                }
                Ok(Err(err)) => {
                    tracing::warn!(%reply_to, %err, "reply failed; the request stands");
                    "broker"
                }
                Err(_) => {
                    tracing::warn!(%reply_to, "reply not confirmed in time; the request stands");
                    "broker"
                }
            };
            failures.with_label_values(&[reason]).inc();
        });
    }

    /// Hands the reply to the broker; the confirm follows.
    async fn publish(
        &self,
        reply_to: &str,
        body: String,
        props: BasicProperties,
    ) -> Result<lapin::PublisherConfirm, lapin::Error> {
        let channel = self.channel().await?;
        channel
            .basic_publish(
                "".into(),
                reply_to.into(),
                BasicPublishOptions {
                    mandatory: !is_direct_reply_to(reply_to),
                    ..BasicPublishOptions::default()
                },
                body.as_bytes(),
                props,
            )
            .await
    }

    /// The open reply channel, or a new one on a new connection.
    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut slot = self.channel.lock().await;
        if let Some((conn, channel)) = slot.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let name = format!("entrip-ingest-replies-{}", std::process::id());
        let conn = amqp::connect_any(&self.amqp, &name).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *slot = Some((conn, channel.clone()));
        Ok(channel)
    }
}
