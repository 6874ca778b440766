//! `scripts/rabbit-cluster`: three RabbitMQ nodes of this test's own (a
//! directory, node names and ports of its own, beside the broker on 5672)
//! form one cluster; a message confirmed into a quorum queue through node 1
//! is still there, read through node 2, after node 1 is SIGKILLed; node 1
//! started again rejoins; `down` leaves nothing behind.

use std::{path::Path, process::Command, time::Duration};

use futures::StreamExt as _;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// The script with this cluster's settings; its status, stdout and stderr.
fn script(env: &[(&str, String)], args: &[&str]) -> (bool, String) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("bash")
        .arg(repo.join("scripts/rabbit-cluster"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The cluster's running members as `status` prints them (the view of
/// the first node that runs): a node that came back on its own, outside the
/// cluster, is not one.
fn members(status: &str) -> usize {
    status
        .lines()
        .find_map(|l| l.strip_prefix("running nodes as "))
        .and_then(|l| l.split_once(": "))
        .map_or(0, |(_, m)| m.split_whitespace().count())
}

/// A first AMQP port whose three ports and their distribution ports
/// (+20000) are free now.
fn free_ports() -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let start = 30_000 + (std::process::id() % 9_000) as u16;
    (start..start + 2_000)
        .step_by(3)
        .find(|p| (0..3).all(|i| free(p + i) && free(p + i + 20_000)))
        .unwrap()
}

/// Removes the cluster whatever the test's outcome.
struct Down(Vec<(&'static str, String)>);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = script(&self.0, &["down"]);
    }
}

#[tokio::test]
async fn a_three_node_cluster_keeps_a_confirmed_message_when_the_node_that_took_it_dies() {
    let port = free_ports();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let env = vec![
        (
            "ENTRIP_RABBIT_CLUSTER_DIR",
            std::env::temp_dir()
                .join(format!("entrip-rc-test-{tag}"))
                .display()
                .to_string(),
        ),
        (
            "ENTRIP_RABBIT_CLUSTER_NAME",
            format!("entrip-rc-{}", &tag[..8]),
        ),
        ("ENTRIP_RABBIT_CLUSTER_PORT", port.to_string()),
    ];
    let down = Down(env.clone());
    let (ok, out) = script(&env, &["up"]);
    assert!(ok, "up failed:\n{out}");
    let running = |out: &str| {
        out.lines()
            .filter(|l| l.contains(" running amqp://"))
            .count()
    };
    assert_eq!(running(&out), 3, "{out}");
    assert_eq!(members(&out), 3, "one cluster of three: {out}");
    let (ok, urls) = script(&env, &["urls"]);
    assert!(ok, "{urls}");
    let urls: Vec<&str> = urls.trim().split(',').collect();
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
    let (ok, out) = script(&env, &["kill", "1"]);
    assert!(ok, "{out}");
    let (ok, out) = script(&env, &["status"]);
    assert!(ok, "{out}");
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
    let (ok, out) = script(&env, &["start", "1"]);
    assert!(ok, "{out}");
    let (ok, out) = script(&env, &["status"]);
    assert!(ok, "{out}");
    assert_eq!(running(&out), 3, "{out}");
    assert_eq!(members(&out), 3, "node 1 is in the cluster again: {out}");

    drop(down);
    let dir = &env[0].1;
    assert!(!Path::new(dir).exists(), "{dir} left behind");
}
