//! The relay on a 3-node RabbitMQ cluster of the test's own
//! (`scripts/rabbit-cluster`): given every node in `amqp.url`, it publishes
//! to node 1, and when node 1 is SIGKILLed in the middle of 5,000 events it
//! moves to another node. Every event is delivered, each aggregate's in
//! order, and no row is marked published that the broker did not confirm.

use std::{path::Path, sync::Arc, time::Duration};

use crate::support::*;
use entrip_common::{
    domain::{AggregateType, EventType},
    events::{self, NewEvent, SOURCE_INGEST},
};
use entrip_testkit::cluster::Cluster;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const AGGREGATES: usize = 100;
const PER_AGGREGATE: usize = 50;
/// Rounds (one event per aggregate each) inserted before node 1 is killed.
const ROUNDS_BEFORE_KILL: usize = 15;

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn the_relay_moves_on_when_its_node_dies_and_loses_nothing(pool: PgPool) {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(Cluster::up)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    // The recorder reads through node 3, which stays up.
    let rec = Recorder::start(&cluster.urls[2], "test.all", &["#"]).await;
    let amqp = amqp_settings(&cluster.amqp_url());
    let relay = start_relay_with(
        &pool,
        amqp.clone(),
        entrip_common::config::DispatcherSettings {
            batch_size: 100,
            ..fast_settings()
        },
    );

    // 500 events/s: a round of one event per aggregate every 200 ms, each
    // round in one transaction, as ingest commits them.
    let ids: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::now_v7()).collect();
    let mut marked_before_kill = Vec::new();
    for n in 0..PER_AGGREGATE {
        if n == ROUNDS_BEFORE_KILL {
            rows_reach(&pool, "published_at IS NOT NULL", 500).await;
            // Connected (500 rows published), and to node 1: the first.
            assert_eq!(amqp.connected_node(), 0, "the relay starts on node 1");
            marked_before_kill = marked(&pool).await;
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || c.kill(1))
                .await
                .unwrap();
        }
        let mut tx = pool.begin().await.unwrap();
        for agg in &ids {
            let ev = NewEvent::new(
                EventType::BookingCreated,
                AggregateType::Booking,
                *agg,
                SOURCE_INGEST,
                json!({ "id": agg, "n": n }),
            );
            events::enqueue(&mut tx, &ev).await.unwrap();
        }
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let total = AGGREGATES * PER_AGGREGATE;
    drained(&pool, "published_at IS NULL").await;
    assert_eq!(count(&pool, "dead_at IS NOT NULL").await, 0);
    assert_ne!(amqp.connected_node(), 0, "the relay left node 1");
    rec.received(total).await;
    // Every row marked, before the kill and after it, reached the broker.
    let marked_after = marked(&pool).await;
    assert_eq!(marked_after.len(), total);
    rec.assert_reached(marked_before_kill.iter().chain(&marked_after))
        .await;
    let sequences = rec.sequences().await;
    assert_eq!(sequences.len(), AGGREGATES);
    assert_ordered(&sequences, PER_AGGREGATE as u64);
    relay.stop().await;
    drop(rec);
    let dir = cluster.dir().to_owned();
    drop(Arc::into_inner(cluster).expect("the cluster's last handle"));
    assert!(!Path::new(&dir).exists(), "{dir} left behind");
}

async fn marked(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM outbox WHERE published_at IS NOT NULL")
        .fetch_all(pool)
        .await
        .unwrap()
}
