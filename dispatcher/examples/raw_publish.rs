//! Baseline for `scripts/bench-dispatcher`: the raw publish-with-confirms
//! rate of the broker, with the relay's message shape and batching
//! (pipelined batches on one confirm-mode channel) but no database.
//!
//! Usage: raw_publish <amqp url> <count> <batch> [body bytes] [channels]
//!
//! The body is a CloudEvents JSON padded to `body bytes` (default: as is,
//! about 230 bytes), so that the ceiling publishes what the relay publishes.
//! `channels` loops (default 1) publish at once, each on its own channel.

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
    let (url, count, batch, size, channels) = match args.as_slice() {
        [_, url, count, batch, rest @ ..] if rest.len() <= 2 => (
            url,
            count.parse::<usize>().context("count")?,
            batch.parse::<usize>().context("batch")?,
            rest.first()
                .map(|s| s.parse::<usize>())
                .transpose()
                .context("body bytes")?,
            rest.get(1)
                .map(|s| s.parse::<usize>())
                .transpose()
                .context("channels")?
                .unwrap_or(1)
                .max(1),
        ),
        _ => bail!("usage: raw_publish <amqp url> <count> <batch> [body bytes] [channels]"),
    };
    let conn = amqp::connect(url, "bench-raw-publish").await?;
    let settings = AmqpSettings {
        url: url.clone(),
        ..AmqpSettings::default()
    };
    amqp::declare_topology(&conn.create_channel().await?, &settings).await?;
    let head = r#"{"specversion":"1.0","id":"00000000-0000-0000-0000-000000000000","source":"/entrip/ingest","type":"booking.created","subject":"x","time":"2026-11-26T00:00:00Z","datacontenttype":"application/json","data":{"id":"x","n":0"#;
    let pad = size.map_or(0, |s| s.saturating_sub(head.len() + 12));
    let body = format!(r#"{head},"pad":"{}"}}}}"#, "x".repeat(pad)).into_bytes();
    let start = Instant::now();
    let loops = (0..channels).map(|c| {
        let share = count / channels + usize::from(c < count % channels);
        publish_loop(&conn, share, batch, &body)
    });
    for done in join_all(loops).await {
        done?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "RESULT raw_publish count={count} batch={batch} bytes={} channels={channels} secs={secs:.2} rate={:.0}",
        body.len(),
        count as f64 / secs
    );
    Ok(())
}

/// Publishes `count` messages in pipelined batches on a new confirm-mode
/// channel, awaiting each batch's confirms.
async fn publish_loop(
    conn: &lapin::Connection,
    count: usize,
    batch: usize,
    body: &[u8],
) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
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
    Ok(())
}
