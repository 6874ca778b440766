//! `scripts/rabbit-cluster`: three RabbitMQ nodes of this test's own (a
//! directory, node names and ports of its own, beside the broker on 5672)
//! form one cluster; a message confirmed into a quorum queue through node 1
//! is still there, read through node 2, after node 1 is SIGKILLed; node 1
//! started again rejoins; `down` leaves nothing behind.

use std::{path::Path, time::Duration};

use entrip_testkit::cluster::{Cluster, members, running};

use futures::StreamExt as _;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

#[tokio::test]
async fn a_three_node_cluster_keeps_a_confirmed_message_when_the_node_that_took_it_dies() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let cluster = Cluster::up().unwrap_or_else(|e| panic!("{e}"));
    let out = cluster.status();
    assert_eq!(running(&out), 3, "{out}");
    assert_eq!(members(&out), 3, "one cluster of three: {out}");
    let urls: Vec<&str> = cluster.urls.iter().map(String::as_str).collect();
    assert_eq!(urls.len(), 3);
    assert!(urls.iter().all(|u| !u.contains(":5672/")), "{urls:?}");

    // A quorum queue, a message confirmed through node 1.
    let queue = format!("rc-test-{tag}");
    let one = Connection::connect(urls[0], ConnectionProperties::default())
        .await
        .unwrap();
    let channel = one.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"kept",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    drop(channel);
    drop(one);

    // Node 1 dies; node 2 still has the message.
    cluster.kill(1);
    let out = cluster.status();
    assert_eq!(running(&out), 2, "{out}");
    assert_eq!(members(&out), 2, "the two left see each other: {out}");
    let two = Connection::connect(urls[1], ConnectionProperties::default())
        .await
        .unwrap();
    let channel = two.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "rc-test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // The queue elects a new leader among the two left first.
    let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .expect("the message within 60 s")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.data, b"kept");
    drop(channel);
    drop(two);

    // Node 1 again: it rejoins.
    cluster.start(1);
    let out = cluster.status();
    assert_eq!(running(&out), 3, "{out}");
    assert_eq!(members(&out), 3, "node 1 is in the cluster again: {out}");

    let dir = cluster.dir().to_owned();
    drop(cluster);
    assert!(!Path::new(&dir).exists(), "{dir} left behind");
}
