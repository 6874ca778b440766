//! The consumer's forward to a retry queue, nacked by the broker: the
//! original goes back to its queue (nothing lost), and the session ends, so
//! the consumer reconnects on a new connection (a channel that nacks once was
//! seen to nack every publish after a cluster node died; see
//! docs/failure-model.md, "A broker node of a cluster dies").

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use entrip_common::{
    amqp,
    consumer::{Handler, Message, Outcome},
};
use entrip_testkit::{Vhost, eventually};
use futures::future::BoxFuture;

use crate::support::*;

/// Asks for a retry of `a` every time, and of `b` the first time only;
/// records every delivery (message id, attempt).
#[derive(Clone, Default)]
struct RetryOnce {
    seen: Arc<Mutex<Vec<(String, u32)>>>,
}

impl RetryOnce {
    fn seen(&self, id: &str) -> Vec<u32> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(i, _)| i == id)
            .map(|(_, a)| *a)
            .collect()
    }
}

impl Handler for RetryOnce {
    fn name(&self) -> &'static str {
        "forward-test"
    }

    fn queue(&self) -> &'static str {
        amqp::SETTLEMENT_QUEUE
    }

    fn handle<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Outcome> {
        let id = msg.message_id.clone().unwrap_or_default();
        let first = {
            let mut seen = self.seen.lock().unwrap();
            seen.push((id.clone(), msg.attempt));
            seen.iter().filter(|(i, _)| *i == id).count() == 1
        };
        Box::pin(async move {
            if id == "a" || first {
                Outcome::Retry("asked for by the test".into())
            } else {
                Outcome::Processed
            }
        })
    }
}

#[tokio::test]
async fn a_nacked_forward_puts_the_message_back_and_replaces_the_connection() {
    let vhost = Vhost::new();
    // The settlement retry queues (quorum, reject-publish) take one message
    // and nack every publish after it.
    vhost.set_queue_policy(
        "retry-full",
        r"^entrip\.settlement\.retry\.",
        r#"{"max-length":0}"#,
    );
    let handler = RetryOnce::default();
    // A first retry delay longer than the test: `a` stays in the retry queue.
    let broker = entrip_common::config::AmqpSettings {
        retry_delays_ms: vec![600_000],
        ..amqp_settings(&vhost.url())
    };
    let worker = start_with(handler.clone(), broker, workers_settings());
    eventually("the consumer connected", || async {
        vhost.connections().len() == 1
    })
    .await;
    let consumer_port = vhost.connections()[0].clone();

    let (conn, ch) = channel(&vhost.url()).await;
    let retry_queue = amqp::retry_queue_name(amqp::SETTLEMENT_QUEUE, 600_000);
    publish_raw(&ch, "", amqp::SETTLEMENT_QUEUE, Some("a"), None, b"{}").await;
    until_count("a in the retry queue", 1, || depth(&ch, &retry_queue)).await;
    // b's forward is nacked: b must come back (attempt 0, not through the
    // retry path) on a new connection, where it is processed.
    publish_raw(&ch, "", amqp::SETTLEMENT_QUEUE, Some("b"), None, b"{}").await;
    until_count("b handled twice", 2, || async { handler.seen("b").len() }).await;
    assert_eq!(
        handler.seen("b"),
        [0, 0],
        "b came back by requeue, not retry"
    );
    eventually("the consumer's first connection closed", || async {
        !vhost.connections().contains(&consumer_port)
    })
    .await;
    eventually("b acknowledged", || async {
        depth(&ch, amqp::SETTLEMENT_QUEUE).await == 0
    })
    .await;
    // Nothing lost, nothing dead-lettered, nothing doubled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(handler.seen("b").len(), 2);
    assert_eq!(handler.seen("a"), [0], "a waits in its retry queue");
    assert_eq!(depth(&ch, &retry_queue).await, 1);
    let dlq = amqp::dlq_name(amqp::SETTLEMENT_QUEUE);
    assert_eq!(depth(&ch, &dlq).await, 0);
    assert_eq!(worker.count("forward-test", "processed"), 1);
    let _ = conn.close(200, "done".into()).await;
    worker.stop().await;
}
