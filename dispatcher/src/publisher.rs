//! Publishing outbox rows to `entrip.events` on a confirm-mode channel:
//! the whole batch is written pipelined, then every confirm is awaited.

use std::time::Duration;

use entrip_common::{
    amqp::{self, EVENTS_EXCHANGE},
    config::AmqpSettings,
    events::CONTENT_TYPE,
    trace::TRACEPARENT_HEADER,
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
pub(crate) enum Outcome {
    /// The broker confirmed it: mark it published.
    Confirmed,
    /// Nack, return (unroutable) or no confirm in time: counts an attempt.
    Refused(String),
    /// The connection broke before a confirm: try again, no attempt counted.
    Unknown,
}

/// The outcomes of a batch, one per row.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) outcomes: Vec<Outcome>,
    /// Set when the connection is unusable and must be replaced.
    pub(crate) reset: Option<String>,
}

/// A connection with a confirm-mode channel and the topology declared.
pub(crate) struct Publisher {
    connection: Connection,
    channel: Channel,
}

impl Publisher {
    pub(crate) async fn connect(
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
    pub(crate) async fn publish(&self, rows: &[OutboxRow], timeout: Duration) -> Report {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut confirms = Vec::with_capacity(rows.len());
        let mut reset = None;
        for row in rows {
            // A blocked broker (memory or disk alarm) stops reading: bound
            // the sending too, not only the confirms.
            let sent = tokio::time::timeout_at(
                deadline,
                self.channel.basic_publish(
                    EVENTS_EXCHANGE.into(),
                    row.topic.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    row.payload.as_bytes(),
                    properties(row),
                ),
            )
            .await;
            match sent {
                Ok(Ok(confirm)) => confirms.push(confirm),
                Ok(Err(err)) => {
                    reset = Some(format!("publish failed: {err}"));
                    break;
                }
                Err(_) => {
                    reset = Some(format!("could not send within {timeout:?}"));
                    break;
                }
            }
        }
        let sent = confirms.len();
        let mut outcomes = match tokio::time::timeout_at(deadline, join_all(confirms)).await {
            Ok(results) => results
                .into_iter()
                .map(|result| match result {
                    Ok(confirmation) => {
                        if matches!(confirmation, Confirmation::Nack(_)) {
                            // Seen after a cluster node died: a channel
                            // whose quorum queue lost its leader nacked
                            // every publish from then on, while a new
                            // channel was acked. Start over on a new one.
                            reset.get_or_insert_with(|| {
                                "nacked by the broker: the channel is replaced".to_owned()
                            });
                        }
                        outcome(confirmation)
                    }
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
        hold_back_after_failures(rows, &mut outcomes);
        Report { outcomes, reset }
    }

    pub(crate) async fn close(self) {
        let _ = self.channel.close(200, "shutdown".into()).await;
        let _ = self.connection.close(200, "shutdown".into()).await;
    }
}

/// Once a row of an aggregate is not confirmed, its later rows in the batch
/// are not marked published either, so that they go again after it and the
/// outbox never records them as delivered ahead of it.
fn hold_back_after_failures(rows: &[OutboxRow], outcomes: &mut [Outcome]) {
    let mut failed = std::collections::HashSet::new();
    for (row, outcome) in rows.iter().zip(outcomes.iter_mut()) {
        if failed.contains(&row.aggregate_id) {
            if *outcome == Outcome::Confirmed {
                *outcome = Outcome::Unknown;
            }
        } else if *outcome != Outcome::Confirmed {
            failed.insert(row.aggregate_id);
        }
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
/// context, as docs/DESIGN.md fixes them.
pub(crate) fn properties(row: &OutboxRow) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(row.id.to_string()))
        .with_type(ShortString::from(row.topic.as_str()))
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_timestamp(u64::try_from(row.created_at.timestamp()).unwrap_or(0));
    if let Some(tp) = &row.traceparent {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(TRACEPARENT_HEADER),
            AMQPValue::LongString(LongString::from(tp.as_str())),
        );
        props = props.with_headers(headers);
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn row(aggregate: Uuid) -> OutboxRow {
        OutboxRow {
            id: Uuid::now_v7(),
            aggregate_id: aggregate,
            topic: "booking.created".into(),
            payload: "{}".into(),
            traceparent: None,
            attempts: 0,
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn later_rows_of_an_aggregate_wait_for_a_failed_one() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let rows = [row(a), row(b), row(a), row(b), row(a)];
        let mut outcomes = vec![
            Outcome::Confirmed,
            Outcome::Refused("nacked".into()),
            Outcome::Confirmed,
            Outcome::Confirmed,
            Outcome::Confirmed,
        ];
        hold_back_after_failures(&rows, &mut outcomes);
        assert_eq!(
            outcomes,
            vec![
                Outcome::Confirmed,
                Outcome::Refused("nacked".into()),
                Outcome::Confirmed,
                Outcome::Unknown,
                Outcome::Confirmed,
            ]
        );
    }
}
