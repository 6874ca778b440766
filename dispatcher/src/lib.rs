//! Entrip dispatcher: the relay that publishes every committed outbox row to
//! RabbitMQ with publisher confirms, in commit order per aggregate, and the
//! operator commands around the outbox and the dead letter queues, and
//! `trace`, the whole story of one booking or idempotency key, and
//! `notifications redeliver`.

pub mod dlq;
pub mod metrics;
pub mod outbox;
mod publisher;
pub mod redeliver;
pub mod relay;
pub mod trace;
