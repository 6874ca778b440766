//! Test support for AMQP requests: an upstream system's broker connection
//! that publishes requests to `entrip.ingest` and reads the replies from a
//! queue of its own, and a look into `entrip.ingest.dlq`; every reply and
//! dead letter they read is checked against docs/asyncapi.yaml.

use std::time::Duration;

use entrip_common::{
    amqp::{self, INGEST_EXCHANGE, INGEST_QUEUE},
    config::AmqpSettings,
};
use entrip_testkit::asyncapi::{AmqpMessage, contract};
use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, Consumer,
    options::{
        BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;

/// Retry delays short enough for tests (the path is the real one).
pub const RETRY_DELAYS_MS: [u64; 2] = [200, 500];

pub fn amqp_settings(url: &str) -> AmqpSettings {
    AmqpSettings {
        url: url.to_owned(),
        retry_delays_ms: RETRY_DELAYS_MS.to_vec(),
        delivery_limit: 20,
        ..AmqpSettings::default()
    }
}

/// One request message, built up from a type, a key and a body.
#[derive(Debug, Clone)]
pub struct Req {
    pub kind: Option<String>,
    pub key: Option<String>,
    pub body: Vec<u8>,
    pub entity: Option<String>,
    /// `None`: no `user_id` property.
    pub user: Option<String>,
    pub content_type: Option<String>,
    /// Where the reply goes: the upstream's own queue unless changed.
    pub reply_to: ReplyTo,
    pub correlation_id: Option<String>,
}

#[derive(Debug, Clone)]
pub enum ReplyTo {
    Own,
    None,
    Queue(String),
}

impl Req {
    pub fn new(kind: &str, key: &str, body: &Value) -> Self {
        Self {
            kind: Some(kind.to_owned()),
            key: Some(key.to_owned()),
            body: body.to_string().into_bytes(),
            entity: None,
            user: Some("guest".into()),
            content_type: Some("application/json".into()),
            reply_to: ReplyTo::Own,
            correlation_id: None,
        }
    }

    pub fn on(mut self, id: &str) -> Self {
        self.entity = Some(id.to_owned());
        self
    }
}

/// A reply as the tests look at it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: i64,
    pub replayed: bool,
    pub content_type: String,
    pub correlation_id: Option<String>,
    pub body: Value,
}

/// A dead-lettered message: its key and why.
#[derive(Debug, Clone)]
pub struct Dead {
    pub message_id: Option<String>,
    pub reason: String,
}

pub struct Upstream {
    pub conn: Connection,
    channel: Channel,
    pub reply_queue: String,
    replies: Consumer,
}

fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props
        .headers()
        .as_ref()?
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .map(|(_, v)| v)
}

impl Upstream {
    /// Connects as `guest`, declares the fleet's topology (as ingest does at
    /// start) and a reply queue of its own.
    pub async fn connect(url: &str) -> Self {
        let conn = amqp::connect(url, "test-upstream").await.unwrap();
        let setup = conn.create_channel().await.unwrap();
        amqp::declare_topology(&setup, &amqp_settings(url))
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let reply_queue = queue.name().as_str().to_owned();
        let replies = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            conn,
            channel,
            reply_queue,
            replies,
        }
    }

    /// Publishes `req` to `entrip.ingest` (routing key = its type) and
    /// waits for the broker's confirm.
    pub async fn publish(&self, req: &Req) {
        let routing_key = req.kind.clone().unwrap_or_else(|| "none".into());
        self.publish_to(INGEST_EXCHANGE, &routing_key, req).await;
    }

    /// Publishes `req` to `exchange` with `routing_key` (the default
    /// exchange, `""`, takes it straight to the queue of that name).
    pub async fn publish_to(&self, exchange: &str, routing_key: &str, req: &Req) {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(kind) = &req.kind {
            props = props.with_type(kind.as_str().into());
        }
        if let Some(key) = &req.key {
            props = props.with_message_id(key.as_str().into());
        }
        if let Some(user) = &req.user {
            props = props.with_user_id(user.as_str().into());
        }
        if let Some(ct) = &req.content_type {
            props = props.with_content_type(ct.as_str().into());
        }
        if let Some(c) = &req.correlation_id {
            props = props.with_correlation_id(c.as_str().into());
        }
        match &req.reply_to {
            ReplyTo::Own => props = props.with_reply_to(self.reply_queue.as_str().into()),
            ReplyTo::Queue(q) => props = props.with_reply_to(q.as_str().into()),
            ReplyTo::None => {}
        }
        if let Some(id) = &req.entity {
            let mut headers = FieldTable::default();
            headers.insert(
                "x-entrip-entity-id".into(),
                AMQPValue::LongString(id.as_str().into()),
            );
            props = props.with_headers(headers);
        }
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &req.body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "the broker took the request");
    }

    /// The next reply on the upstream's queue.
    pub async fn reply(&mut self) -> Reply {
        let delivery = tokio::time::timeout(Duration::from_secs(30), self.replies.next())
            .await
            .expect("a reply within 30 s")
            .expect("the reply consumer is open")
            .unwrap();
        // Every reply any test reads is one the contract specifies.
        contract().assert("ingestReplies", &AmqpMessage::of(&delivery));
        let props = &delivery.properties;
        let status = match header(props, "x-entrip-status") {
            Some(AMQPValue::LongInt(n)) => i64::from(*n),
            Some(AMQPValue::LongLongInt(n)) => *n,
            Some(AMQPValue::ShortInt(n)) => i64::from(*n),
            other => panic!("x-entrip-status: {other:?}"),
        };
        let replayed = matches!(
            header(props, "x-entrip-replayed"),
            Some(AMQPValue::Boolean(true))
        );
        Reply {
            status,
            replayed,
            content_type: props
                .content_type()
                .as_ref()
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default(),
            correlation_id: props
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            body: serde_json::from_slice(&delivery.data).expect("a JSON reply"),
        }
    }

    /// Publishes `req` and waits for its reply.
    pub async fn request(&mut self, req: &Req) -> Reply {
        self.publish(req).await;
        self.reply().await
    }

    /// Waits until `n` messages are in `entrip.ingest.dlq` and takes them.
    pub async fn dead(&self, n: usize) -> Vec<Dead> {
        let dlq = amqp::dlq_name(INGEST_QUEUE);
        let channel = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while out.len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} messages in {dlq} after 30 s: {out:?}",
                out.len()
            );
            match channel
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                Some(msg) => {
                    contract().assert_from_queue(&dlq, &AmqpMessage::of(&msg.delivery));
                    let props = &msg.delivery.properties;
                    let reason = match header(props, "x-entrip-error") {
                        Some(AMQPValue::LongString(s)) => {
                            String::from_utf8_lossy(s.as_bytes()).into_owned()
                        }
                        other => format!("{other:?}"),
                    };
                    out.push(Dead {
                        message_id: props.message_id().as_ref().map(|m| m.as_str().to_owned()),
                        reason,
                    });
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        out
    }

    /// How many messages wait in `queue` now.
    pub async fn depth(&self, queue: &str) -> u32 {
        let channel = self.conn.create_channel().await.unwrap();
        amqp::queue_depth(&channel, queue).await.unwrap()
    }
}
