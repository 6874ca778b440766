//! Publishing outbox rows to `entrip.events` on a confirm-mode channel:
//! the whole batch is written pipelined, then every confirm is awaited.

use std::time::Duration;

use entrip_common::{
    amqp::{self, EVENTS_EXCHANGE},
    config::AmqpSettings,
    events::CONTENT_TYPE,
};
use futures::future::join_all;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use crate::outbox::OutboxRow;

/// What became of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broker confirmed it: mark it published.
    Confirmed,
    /// Nack, return (unroutable) or no confirm in time: counts an attempt.
    Refused(String),
    /// The connection broke before a confirm: try again, no attempt counted.
    Unknown,
}

/// The outcomes of a batch, one per row.
#[derive(Debug)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    /// Set when the connection is unusable and must be replaced.
    pub reset: Option<String>,
}

/// A connection with a confirm-mode channel and the topology declared.
pub struct Publisher {
    connection: Connection,
    channel: Channel,
}

impl Publisher {
    pub async fn connect(
        connection: Connection,
        settings: &AmqpSettings,
    ) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        amqp::declare_topology(&channel, settings).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            connection,
            channel,
        })
    }

    /// Publishes the rows in order and waits for their confirms. One
    /// outcome per row; `reset` says why the connection must be replaced.
    pub async fn publish(&self, rows: &[OutboxRow], timeout: Duration) -> Report {
        let mut confirms = Vec::with_capacity(rows.len());
        let mut reset = None;
        for row in rows {
            let sent = self
                .channel
                .basic_publish(
                    EVENTS_EXCHANGE.into(),
                    row.topic.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    row.payload.as_bytes(),
                    properties(row),
                )
                .await;
            match sent {
                Ok(confirm) => confirms.push(confirm),
                Err(err) => {
                    reset = Some(format!("publish failed: {err}"));
                    break;
                }
            }
        }
        let sent = confirms.len();
        let mut outcomes = match tokio::time::timeout(timeout, join_all(confirms)).await {
            Ok(results) => results
                .into_iter()
                .map(|result| match result {
                    Ok(confirmation) => outcome(confirmation),
                    Err(err) => {
                        reset.get_or_insert_with(|| format!("confirm failed: {err}"));
                        Outcome::Unknown
                    }
                })
                .collect(),
            Err(_) => {
                // The channel's state is unknown: start over on a new one.
                reset.get_or_insert_with(|| format!("no confirms within {timeout:?}"));
                vec![Outcome::Refused(format!("no confirm within {timeout:?}")); sent]
            }
        };
        outcomes.resize(rows.len(), Outcome::Unknown);
        Report { outcomes, reset }
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "shutdown".into()).await;
        let _ = self.connection.close(200, "shutdown".into()).await;
    }
}

fn outcome(confirmation: Confirmation) -> Outcome {
    match confirmation {
        Confirmation::Ack(None) => Outcome::Confirmed,
        Confirmation::Ack(Some(returned)) => Outcome::Refused(format!(
            "returned by the broker as unroutable: {} {}",
            returned.reply_code, returned.reply_text
        )),
        Confirmation::Nack(_) => Outcome::Refused("nacked by the broker".into()),
        Confirmation::NotRequested => Outcome::Refused("publisher confirms not enabled".into()),
    }
}

/// Persistent, with the event id, type, content type, time and trace
/// context, as DESIGN.md fixes them.
fn properties(row: &OutboxRow) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(row.id.to_string()))
        .with_type(ShortString::from(row.topic.as_str()))
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_timestamp(u64::try_from(row.created_at.timestamp()).unwrap_or(0));
    if let Some(tp) = &row.traceparent {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString(LongString::from(tp.as_str())),
        );
        props = props.with_headers(headers);
    }
    props
}
