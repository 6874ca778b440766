//! Baseline for `scripts/bench-dispatcher`: the raw publish-with-confirms
//! rate of the broker, with the relay's message shape and batching
//! (pipelined batches on one confirm-mode channel) but no database.
//!
//! Usage: raw_publish <amqp url> <count> <batch>

use std::time::Instant;

use anyhow::{Context, bail};
use entrip_common::{amqp, config::AmqpSettings};
use futures::future::join_all;
use lapin::{
    BasicProperties, Confirmation,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, count, batch] = args.as_slice() else {
        bail!("usage: raw_publish <amqp url> <count> <batch>");
    };
    let count: usize = count.parse().context("count")?;
    let batch: usize = batch.parse().context("batch")?;
    let conn = amqp::connect(url, "bench-raw-publish").await?;
    let channel = conn.create_channel().await?;
    let settings = AmqpSettings {
        url: url.clone(),
        ..AmqpSettings::default()
    };
    amqp::declare_topology(&channel, &settings).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = br#"{"specversion":"1.0","id":"00000000-0000-0000-0000-000000000000","source":"/entrip/ingest","type":"booking.created","subject":"x","time":"2026-11-26T00:00:00Z","datacontenttype":"application/json","data":{"id":"x","n":0}}"#;
    let start = Instant::now();
    let mut sent = 0;
    while sent < count {
        let n = batch.min(count - sent);
        let mut confirms = Vec::with_capacity(n);
        for i in 0..n {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("raw-{}", sent + i).as_str().into())
                .with_type("booking.created".into())
                .with_content_type("application/cloudevents+json".into());
            confirms.push(
                channel
                    .basic_publish(
                        amqp::EVENTS_EXCHANGE.into(),
                        "booking.created".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        body,
                        props,
                    )
                    .await?,
            );
        }
        for c in join_all(confirms).await {
            if c? != Confirmation::Ack(None) {
                bail!("a publish was not confirmed");
            }
        }
        sent += n;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "RESULT raw_publish count={count} batch={batch} secs={secs:.2} rate={:.0}",
        count as f64 / secs
    );
    Ok(())
}
