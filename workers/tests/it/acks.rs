//! The consumer's coalesced acknowledgements (`entrip_common::consumer`,
//! `acks.rs`): every finished message is acknowledged, whatever order the
//! handlers finish in; a message still in its handler holds back no other's
//! ack; a nacked one comes back; a burst's acks share frames; and a graceful
//! shutdown sends the acks still lingering.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use entrip_common::{
    amqp,
    consumer::{Consumer, Handler, Message, Outcome},
    metrics::new_registry,
};
use entrip_testkit::{Vhost, eventually};
use entrip_workers::metrics::WorkerMetrics;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Finishes messages out of order (a few milliseconds each, by id), holds
/// `slow` until released, panics on the first delivery of `boom`, and
/// cancels `stop` (when set) on `last`; counts every delivery by message id.
#[derive(Clone, Default)]
struct OutOfOrder {
    seen: Arc<Mutex<HashMap<String, u32>>>,
    release: Arc<Notify>,
    stop: Option<(String, CancellationToken)>,
}

impl OutOfOrder {
    fn deliveries(&self) -> u32 {
        self.seen.lock().unwrap().values().sum()
    }

    fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Handler for OutOfOrder {
    fn name(&self) -> &'static str {
        "acks-test"
    }

    fn queue(&self) -> &'static str {
        amqp::SETTLEMENT_QUEUE
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        let id = msg.message_id.clone().unwrap_or_default();
        let times = {
            let mut seen = self.seen.lock().unwrap();
            let n = seen.entry(id.clone()).or_default();
            *n += 1;
            *n
        };
        Box::pin(async move {
            if id == "slow" {
                self.release.notified().await;
            } else if id == "boom" && times == 1 {
                // Nacked with requeue by the runtime, among finished neighbours.
                panic!("boom, the first time");
            } else {
                let n: u64 = id.trim_start_matches('m').parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(n * 7 % 5)).await;
            }
            if let Some((last, token)) = &self.stop
                && *last == id
            {
                token.cancel();
            }
            Outcome::Processed
        })
    }
}

#[tokio::test]
async fn out_of_order_acks_all_reach_the_broker_and_a_held_message_holds_back_none() {
    let vhost = Vhost::new();
    let handler = OutOfOrder::default();
    let worker = start(handler.clone(), &vhost.url(), workers_settings());
    let (conn, ch) = channel(&vhost.url()).await;
    // `slow` in the middle: the finished run before it can go as `multiple`
    // acks, the finished ones after it only one by one.
    for i in 0..300 {
        let id = format!("m{i}");
        publish_raw(&ch, "", amqp::SETTLEMENT_QUEUE, Some(&id), None, b"{}").await;
        if i == 149 {
            publish_raw(&ch, "", amqp::SETTLEMENT_QUEUE, Some("slow"), None, b"{}").await;
        }
    }
    until_count("every message handled or in its handler", 301, || async {
        handler.distinct()
    })
    .await;
    // `slow` is still in its handler: every other message is acknowledged
    // all the same, and no `multiple` ack covered it.
    eventually("only the held message unacknowledged", || async {
        vhost.unacked(amqp::SETTLEMENT_QUEUE) == 1
    })
    .await;
    assert_eq!(depth(&ch, amqp::SETTLEMENT_QUEUE).await, 0);
    assert_eq!(worker.count("acks-test", "processed"), 300);
    // Still 1 a moment later: not a passing count on the way to 0.
    assert_eq!(vhost.unacked(amqp::SETTLEMENT_QUEUE), 1);
    handler.release.notify_one();
    eventually("the held message acknowledged too", || async {
        vhost.unacked(amqp::SETTLEMENT_QUEUE) == 0
    })
    .await;
    // Nothing came twice, nothing went back to the queue.
    assert_eq!(handler.deliveries(), 301);
    assert_eq!(depth(&ch, amqp::SETTLEMENT_QUEUE).await, 0);
    assert_eq!(worker.count("acks-test", "processed"), 301);
    let _ = conn.close(200, "done".into()).await;
    worker.stop().await;
}

#[tokio::test]
async fn a_nacked_message_among_acked_neighbours_comes_back() {
    let vhost = Vhost::new();
    let handler = OutOfOrder::default();
    let worker = start(handler.clone(), &vhost.url(), workers_settings());
    let (conn, ch) = channel(&vhost.url()).await;
    for i in 0..200 {
        let id = format!("m{i}");
        publish_raw(&ch, "", amqp::SETTLEMENT_QUEUE, Some(&id), None, b"{}").await;
        if i == 99 {
            publish_raw(&ch, "", amqp::SETTLEMENT_QUEUE, Some("boom"), None, b"{}").await;
        }
    }
    // A `multiple` ack covering boom's tag would have settled it before
    // (or instead of) its nack: it would never come back.
    until_count(
        "every message processed, boom on its second delivery",
        201,
        || async { worker.count("acks-test", "processed") },
    )
    .await;
    assert_eq!(handler.seen.lock().unwrap().get("boom"), Some(&2));
    assert_eq!(handler.deliveries(), 202, "only boom came twice");
    eventually("everything acknowledged", || async {
        vhost.unacked(amqp::SETTLEMENT_QUEUE) == 0
    })
    .await;
    assert_eq!(depth(&ch, amqp::SETTLEMENT_QUEUE).await, 0);
    let _ = conn.close(200, "done".into()).await;
    worker.stop().await;
}

#[tokio::test]
async fn a_graceful_shutdown_sends_the_acks_still_lingering() {
    let vhost = Vhost::new();
    let token = CancellationToken::new();
    // The last message's handler starts the shutdown itself, so its ack is
    // still lingering when the consumer drains and closes its channel.
    let handler = OutOfOrder {
        stop: Some(("m199".into(), token.clone())),
        ..OutOfOrder::default()
    };
    let (conn, ch) = channel(&vhost.url()).await;
    for i in 0..200 {
        let id = format!("m{i}");
        publish_raw(&ch, "", amqp::SETTLEMENT_QUEUE, Some(&id), None, b"{}").await;
    }
    let metrics = WorkerMetrics::register(&new_registry()).unwrap();
    let settings = workers_settings();
    let consumer = Consumer::new(
        handler.clone(),
        amqp_settings(&vhost.url()),
        settings.consumer(),
        metrics.consumer(),
    );
    tokio::time::timeout(Duration::from_secs(60), consumer.run(token))
        .await
        .expect("the consumer stops after m199");
    // The consumer's connection is closed: whatever it had not acked is back
    // in the queue. m199 is the last published, so everything was handled.
    assert_eq!(handler.distinct(), 200);
    assert_eq!(handler.deliveries(), 200);
    assert_eq!(
        depth(&ch, amqp::SETTLEMENT_QUEUE).await,
        0,
        "every handled message was acknowledged before the channel closed"
    );
    assert_eq!(metrics.messages_total("acks-test", "processed"), 200);
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn the_acks_of_a_burst_share_frames() {
    let vhost = Vhost::new();
    let handler = OutOfOrder::default();
    let worker = start(handler.clone(), &vhost.url(), workers_settings());
    eventually("the consumer connected", || async {
        vhost.connections().len() == 1
    })
    .await;
    let consumer_port = vhost.connections()[0].clone();
    let (conn, ch) = channel(&vhost.url()).await;
    // A first message: the consumer's set-up (topology, qos, consume) is over
    // once it is acknowledged.
    publish_raw(&ch, "", amqp::SETTLEMENT_QUEUE, Some("m0"), None, b"{}").await;
    eventually("the first message acknowledged", || async {
        worker.count("acks-test", "processed") == 1 && vhost.unacked(amqp::SETTLEMENT_QUEUE) == 0
    })
    .await;
    let before = vhost.received_bytes(&consumer_port);
    for i in 1..=300 {
        let id = format!("m{i}");
        publish_raw(&ch, "", amqp::SETTLEMENT_QUEUE, Some(&id), None, b"{}").await;
    }
    until_count("every message processed", 301, || async {
        worker.count("acks-test", "processed")
    })
    .await;
    eventually("everything acknowledged", || async {
        vhost.unacked(amqp::SETTLEMENT_QUEUE) == 0
    })
    .await;
    // All the consumer sends now is acks: 21 bytes a frame.
    let frames = (vhost.received_bytes(&consumer_port) - before) / 21;
    eprintln!("300 messages acknowledged in {frames} frames");
    assert!(
        frames <= 200,
        "300 messages took {frames} ack frames (one each would be 300)"
    );
    let _ = conn.close(200, "done".into()).await;
    worker.stop().await;
}
