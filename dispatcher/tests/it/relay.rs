//! The relay against the real PostgreSQL and RabbitMQ (a vhost per test):
//! delivery, properties and CloudEvents bodies, order per aggregate with
//! three dispatchers, the fleet's batch slots, broker connection cuts,
//! refused rows dying and being redriven, unrouted events, DLQ replay,
//! retention and statistics.

use std::{collections::HashSet, time::Duration};

use crate::support::*;
use entrip_common::{
    amqp,
    domain::{AggregateType, EventType},
    events::{self, NewEvent, SOURCE_INGEST},
};
use entrip_dispatcher::{
    dlq,
    outbox::{self, Redrive},
};
use entrip_testkit::{Proxy, Vhost, eventually};
use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn every_row_reaches_the_exchange_with_its_properties(pool: PgPool) {
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    let mut rows = insert_events(&pool, 4, 5, EventType::BookingCreated).await;
    let traced = NewEvent::new(
        EventType::UserCreated,
        AggregateType::User,
        Uuid::now_v7(),
        SOURCE_INGEST,
        json!({"id": "u"}),
    )
    .with_traceparent(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    ));
    let mut tx = pool.begin().await.unwrap();
    events::enqueue(&mut tx, &traced).await.unwrap();
    tx.commit().await.unwrap();
    rows.push((traced.id, traced.aggregate_id, 0));

    let relay = start_relay(&pool, &vhost.url(), fast_settings());
    drained(&pool, "published_at IS NULL").await;
    rec.received(rows.len()).await;

    let received = rec.snapshot().await;
    let expected: HashSet<String> = rows.iter().map(|(id, _, _)| id.to_string()).collect();
    let got: HashSet<String> = received.iter().map(|r| r.message_id()).collect();
    assert_eq!(got, expected);
    for r in &received {
        let p = &r.properties;
        assert_eq!(*p.delivery_mode(), Some(2), "persistent");
        assert_eq!(p.kind().as_ref().unwrap().as_str(), r.routing_key);
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/cloudevents+json"
        );
        assert!(p.timestamp().is_some());
        let b = &r.body;
        assert_eq!(b["specversion"], "1.0");
        assert_eq!(b["id"].as_str().unwrap(), r.message_id());
        assert_eq!(b["type"].as_str().unwrap(), r.routing_key);
        assert_eq!(b["source"], "/entrip/ingest");
        assert_eq!(b["datacontenttype"], "application/json");
        assert!(b["subject"].is_string() && b["time"].is_string() && b["data"].is_object());
    }
    let traced_msg = received
        .iter()
        .find(|r| r.message_id() == traced.id.to_string())
        .unwrap();
    let headers = traced_msg.properties.headers().as_ref().unwrap();
    let tp = headers
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == "traceparent")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(
        tp,
        AMQPValue::LongString(LongString::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ))
    );
    let published: u64 = relay
        .metrics
        .published
        .with_label_values(&["booking.created"])
        .get();
    assert_eq!(published, 20);
    relay.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn three_dispatchers_keep_order_per_aggregate(pool: PgPool) {
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    let total = bulk_insert(&pool, 50, 100).await;
    assert_eq!(total, 5000);
    let settings = || entrip_common::config::DispatcherSettings {
        batch_size: 100,
        ..fast_settings()
    };
    let relays = [
        start_relay(&pool, &vhost.url(), settings()),
        start_relay(&pool, &vhost.url(), settings()),
        start_relay(&pool, &vhost.url(), settings()),
    ];
    drained(&pool, "published_at IS NULL").await;
    rec.received(5000).await;
    let sequences = rec.sequences().await;
    assert_eq!(sequences.len(), 50);
    assert_ordered(&sequences, 100);
    let per_relay: Vec<u64> = relays
        .iter()
        .map(|r| {
            r.metrics
                .published
                .with_label_values(&["booking.created"])
                .get()
        })
        .collect();
    assert_eq!(per_relay.iter().sum::<u64>(), 5000, "{per_relay:?}");
    for r in relays {
        r.stop().await;
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_batch_slot_is_held_by_one_transaction_and_freed_by_its_end(pool: PgPool) {
    let mut a = pool.begin().await.unwrap();
    let mut b = pool.begin().await.unwrap();
    let mut c = pool.begin().await.unwrap();
    assert!(outbox::take_slot(&mut a, 2).await.unwrap());
    assert!(outbox::take_slot(&mut b, 2).await.unwrap());
    assert!(
        !outbox::take_slot(&mut c, 2).await.unwrap(),
        "two slots, both taken"
    );
    assert_eq!(slots_held(&pool).await, 2, "one lock per slot taken");
    a.commit().await.unwrap();
    assert!(
        outbox::take_slot(&mut c, 2).await.unwrap(),
        "freed by a's commit"
    );
    b.rollback().await.unwrap();
    drop(c);
    eventually("the slots to be freed", || async {
        slots_held(&pool).await == 0
    })
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn lanes_stand_by_while_the_slot_is_held_and_take_it_when_its_holder_is_cut(pool: PgPool) {
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    // The only slot, held by a connection that dies without a ROLLBACK,
    // as a dispatcher killed in the middle of a batch.
    let mut holder = pool.acquire().await.unwrap().detach();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    assert!(outbox::take_slot(&mut holder, 1).await.unwrap());
    let settings = || entrip_common::config::DispatcherSettings {
        fleet_lanes: 1,
        ..fast_settings()
    };
    let relays = [
        start_relay(&pool, &vhost.url(), settings()),
        start_relay(&pool, &vhost.url(), settings()),
    ];
    let rows = insert_events(&pool, 3, 4, EventType::BookingCreated).await;
    // Several polling intervals (200 ms): every lane stands by.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&pool, "published_at IS NULL").await,
        rows.len() as i64,
        "nothing relayed while the slot is held"
    );
    sqlx::Connection::close_hard(holder).await.unwrap();
    drained(&pool, "published_at IS NULL").await;
    rec.received(rows.len()).await;
    assert_ordered(&rec.sequences().await, 4);
    for r in relays {
        r.stop().await;
    }
}

/// Granted batch slots (advisory locks of the relay's class) in this
/// test's database.
async fn slots_held(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks
          WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = $1::oid
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(i64::from(outbox::SLOT_LOCK_CLASS))
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn three_dispatchers_share_one_batch_slot_and_keep_order(pool: PgPool) {
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    let total = bulk_insert(&pool, 50, 40).await;
    let settings = || entrip_common::config::DispatcherSettings {
        batch_size: 50,
        lanes: 2,
        fleet_lanes: 1,
        ..fast_settings()
    };
    let relays = [
        start_relay(&pool, &vhost.url(), settings()),
        start_relay(&pool, &vhost.url(), settings()),
        start_relay(&pool, &vhost.url(), settings()),
    ];
    // Six lanes: never more than one batch at a time.
    let mut most = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while count(&pool, "published_at IS NULL").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the outbox drains");
        most = most.max(slots_held(&pool).await);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(most, 1, "one slot, and it was used");
    rec.received(total as usize).await;
    let sequences = rec.sequences().await;
    assert_eq!(sequences.len(), 50);
    assert_ordered(&sequences, 40);
    for r in relays {
        r.stop().await;
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_broker_connection_cut_loses_nothing_and_marks_nothing_unconfirmed(pool: PgPool) {
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    let proxy = Proxy::start(entrip_testkit::amqp_addr()).await;
    bulk_insert(&pool, 50, 100).await;
    let settings = entrip_common::config::DispatcherSettings {
        batch_size: 50,
        ..fast_settings()
    };
    let relay = start_relay(&pool, &vhost.url_via(proxy.addr), settings);
    rows_reach(&pool, "published_at IS NOT NULL", 500).await;

    proxy.cut();
    // A batch confirmed just before the cut may still be marked; once the
    // count has stood still, nothing more is marked while the broker is
    // unreachable.
    let marked_during_cut =
        count_once_quiet(&pool, "published_at IS NOT NULL", Duration::from_secs(1)).await;
    // Time for a wrong mark to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        count(&pool, "published_at IS NOT NULL").await,
        marked_during_cut
    );
    assert!(marked_during_cut < 5000, "the cut came mid-stream");
    let marked_ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM outbox WHERE published_at IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap();

    proxy.restore();
    drained(&pool, "published_at IS NULL").await;
    rec.received(5000).await;
    rec.assert_reached(&marked_ids).await;
    assert_ordered(&rec.sequences().await, 100);
    assert_eq!(
        count(&pool, "attempts > 0").await,
        0,
        "a lost connection is not a failed attempt"
    );
    relay.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_row_always_refused_dies_without_blocking_others_and_can_be_redriven(pool: PgPool) {
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    // A full queue that rejects publishes makes the broker nack every
    // booking.canceled event.
    full_queue(&rec.channel, "booking.canceled").await;

    let a = Uuid::now_v7();
    let mut ids = Vec::new();
    for (topic, n) in [
        (EventType::BookingCreated, 0),
        (EventType::BookingCanceled, 1),
        (EventType::BookingConfirmed, 2),
    ] {
        let ev = NewEvent::new(
            topic,
            AggregateType::Booking,
            a,
            SOURCE_INGEST,
            json!({"n": n}),
        );
        let mut tx = pool.begin().await.unwrap();
        events::enqueue(&mut tx, &ev).await.unwrap();
        tx.commit().await.unwrap();
        ids.push(ev.id);
    }
    insert_events(&pool, 3, 3, EventType::BookingCreated).await;

    let relay = start_relay(&pool, &vhost.url(), fast_settings());
    eventually("the refused row is dead", || async {
        count(&pool, "dead_at IS NOT NULL").await == 1
    })
    .await;
    let (attempts, error, dead): (i32, Option<String>, bool) = sqlx::query_as(
        "SELECT attempts, last_error, dead_at IS NOT NULL FROM outbox WHERE id = $1",
    )
    .bind(ids[1])
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(dead);
    assert_eq!(attempts, 3);
    assert!(error.unwrap().contains("nack"));
    drained(&pool, "published_at IS NULL AND dead_at IS NULL").await;
    assert_eq!(count(&pool, "published_at IS NOT NULL").await, 11);
    assert!(relay.metrics.failures.get() >= 3);

    // The later row of the same aggregate went once the refused one died.
    let stats = outbox::stats(&pool).await.unwrap();
    assert_eq!(stats.dead, 1);
    assert_eq!(stats.undelivered, 0);

    rec.channel
        .queue_delete("test.full".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let n = outbox::redrive(&pool, &Redrive::Topic("booking.canceled".into()))
        .await
        .unwrap();
    assert_eq!(n, 1);
    drained(&pool, "published_at IS NULL").await;
    let received = rec.snapshot().await;
    assert!(
        received
            .iter()
            .any(|r| r.message_id() == ids[1].to_string())
    );
    relay.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_event_no_queue_is_bound_for_lands_in_unrouted(pool: PgPool) {
    let vhost = Vhost::new();
    let conn = amqp::connect(&vhost.url(), "test").await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    amqp::declare_topology(&channel, &amqp_settings(&vhost.url()))
        .await
        .unwrap();
    // Take away the catch-all binding so that user.created routes nowhere.
    channel
        .queue_unbind(
            amqp::NOTIFICATIONS_QUEUE.into(),
            amqp::EVENTS_EXCHANGE.into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let rec = Recorder::consume(conn, channel, amqp::UNROUTED).await;

    // The relay declares the topology at connect: start it, wait until it
    // has published (so it has declared), then unbind again, then insert.
    let relay = start_relay(&pool, &vhost.url(), fast_settings());
    insert_events(&pool, 1, 1, EventType::PaymentApproved).await;
    drained(&pool, "published_at IS NULL").await;
    let conn2 = amqp::connect(&vhost.url(), "test2").await.unwrap();
    let ch2 = conn2.create_channel().await.unwrap();
    ch2.queue_unbind(
        amqp::NOTIFICATIONS_QUEUE.into(),
        amqp::EVENTS_EXCHANGE.into(),
        "#".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let rows = insert_events(&pool, 1, 2, EventType::UserCreated).await;
    rec.received(2).await;
    let got: HashSet<String> = rec
        .snapshot()
        .await
        .iter()
        .map(|r| r.message_id())
        .collect();
    for (id, _, _) in rows {
        assert!(got.contains(&id.to_string()));
    }
    assert_eq!(count(&pool, "published_at IS NULL").await, 0);
    relay.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn dlq_replay_moves_messages_back_and_they_are_consumed(_pool: PgPool) {
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.approved", &["payment.approved"]).await;
    let conn = amqp::connect(&vhost.url(), "test-ops").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let dlq_name = amqp::dlq_name(amqp::SETTLEMENT_QUEUE);
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = Uuid::now_v7().to_string();
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(amqp::ERROR_HEADER),
            AMQPValue::LongString(LongString::from("test: poison")),
        );
        headers.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString(LongString::from(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )),
        );
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(id.as_str()))
            .with_type(ShortString::from("payment.approved"))
            .with_delivery_mode(2)
            .with_headers(headers);
        ch.basic_publish(
            "".into(),
            dlq_name.as_str().into(),
            BasicPublishOptions::default(),
            json!({"id": id, "i": i}).to_string().as_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
        ids.push(id);
    }

    let listed = dlq::list(&conn.create_channel().await.unwrap(), &dlq_name, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 3);
    assert!(
        listed
            .iter()
            .all(|m| m.reason.as_deref() == Some("test: poison"))
    );
    assert!(
        listed
            .iter()
            .all(|m| m.routing_key.as_deref() == Some("payment.approved"))
    );
    let depth = |ch: lapin::Channel, q: String| async move {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
    };
    eventually("listing leaves the messages in the DLQ", || {
        let ch = ch.clone();
        let q = dlq_name.clone();
        async move { depth(ch, q).await == 3 }
    })
    .await;

    let replayed = dlq::replay(
        &conn.create_channel().await.unwrap(),
        &dlq_name,
        None,
        "guest",
    )
    .await
    .unwrap();
    assert_eq!(replayed, 3);
    rec.received(3).await;
    let got = rec.snapshot().await;
    for r in &got {
        assert!(ids.contains(&r.message_id()));
        assert_eq!(r.routing_key, "payment.approved");
        let headers = r.properties.headers().as_ref().unwrap();
        assert!(
            headers
                .inner()
                .iter()
                .any(|(k, _)| k.as_str() == "traceparent")
        );
        assert!(
            !headers
                .inner()
                .iter()
                .any(|(k, _)| k.as_str() == amqp::ERROR_HEADER)
        );
    }
    assert_eq!(
        depth(ch.clone(), dlq_name.clone()).await,
        0,
        "the DLQ is empty"
    );
    // The settlement queue got them too (it is bound to payment.approved).
    assert_eq!(
        depth(ch.clone(), amqp::SETTLEMENT_QUEUE.to_owned()).await,
        3
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn retention_deletes_only_old_published_rows(pool: PgPool) {
    insert_events(&pool, 3, 4, EventType::BookingCreated).await;
    sqlx::query(
        "UPDATE outbox SET published_at = now() - interval '8 days'
          WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT 5)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox SET published_at = now() - interval '1 day'
          WHERE published_at IS NULL AND seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT 8)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let deleted = outbox::purge_published(&pool, Duration::from_secs(7 * 24 * 3600), 2)
        .await
        .unwrap();
    assert_eq!(deleted, 5);
    assert_eq!(count(&pool, "true").await, 7);
    assert_eq!(count(&pool, "published_at IS NULL").await, 4);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn stats_and_redrive_by_id(pool: PgPool) {
    let rows = insert_events(&pool, 2, 2, EventType::PaymentApproved).await;
    sqlx::query("UPDATE outbox SET dead_at = now(), attempts = 10, created_at = now() - interval '1 minute' WHERE id = $1")
        .bind(rows[0].0)
        .execute(&pool)
        .await
        .unwrap();
    let stats = outbox::stats(&pool).await.unwrap();
    assert_eq!(stats.undelivered, 3);
    assert_eq!(stats.dead, 1);
    assert_eq!(stats.by_topic, vec![("payment.approved".to_owned(), 3, 1)]);
    assert!(stats.oldest_undelivered_age_secs < 60.0);
    let n = outbox::redrive(&pool, &Redrive::Ids(vec![Uuid::now_v7()]))
        .await
        .unwrap();
    assert_eq!(n, 0, "an unknown id changes nothing");
    let n = outbox::redrive(&pool, &Redrive::Ids(vec![rows[0].0]))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let (attempts, dead): (i32, bool) =
        sqlx::query_as("SELECT attempts, dead_at IS NOT NULL FROM outbox WHERE id = $1")
            .bind(rows[0].0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((attempts, dead), (0, false));
    assert!(
        outbox::stats(&pool)
            .await
            .unwrap()
            .oldest_undelivered_age_secs
            >= 59.0
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn republish_brings_back_the_window_before_the_newest_mark_and_nothing_older(pool: PgPool) {
    let rows = insert_events(&pool, 3, 2, EventType::PaymentApproved).await;
    // Published 20 min, 10 min, 5 min, 1 s and 0 s before the newest
    // mark; the sixth row is not published yet.
    for (i, age) in [1200, 600, 300, 1, 0].iter().enumerate() {
        sqlx::query(
            "UPDATE outbox SET published_at = now() - make_interval(secs => $2), attempts = 1 WHERE id = $1",
        )
        .bind(rows[i].0)
        .bind(f64::from(*age))
        .execute(&pool)
        .await
        .unwrap();
    }
    let n = outbox::republish_recent(&pool, Duration::from_secs(900))
        .await
        .unwrap();
    assert_eq!(
        n, 4,
        "the rows published 600, 300, 1 and 0 s before the newest"
    );
    let old: Option<i32> = sqlx::query_scalar(
        "SELECT attempts FROM outbox WHERE id = $1 AND published_at IS NOT NULL",
    )
    .bind(rows[0].0)
    .fetch_optional(&pool)
    .await
    .unwrap();
    assert_eq!(old, Some(1), "older than the window: untouched");
    assert_eq!(
        count(
            &pool,
            "published_at IS NULL AND attempts = 0 AND last_error = 'republished after a restore'"
        )
        .await,
        4
    );
    // The relay publishes them again, as any due row, with the one that
    // was waiting.
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    let relay = start_relay(&pool, &vhost.url(), fast_settings());
    drained(&pool, "published_at IS NULL").await;
    rec.received(5).await;
    relay.stop().await;
    let got: HashSet<String> = rec
        .snapshot()
        .await
        .iter()
        .map(|r| r.message_id())
        .collect();
    let expected: HashSet<String> = rows[1..].iter().map(|(id, _, _)| id.to_string()).collect();
    assert_eq!(got, expected);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_database_connection_cut_loses_nothing(
    _opts: sqlx::postgres::PgPoolOptions,
    connect: sqlx::postgres::PgConnectOptions,
) {
    let direct = PgPool::connect_with(connect.clone()).await.unwrap();
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let via_proxy = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(connect.host("127.0.0.1").port(proxy.addr.port()))
        .await
        .unwrap();
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    bulk_insert(&direct, 50, 100).await;
    let settings = entrip_common::config::DispatcherSettings {
        batch_size: 50,
        ..fast_settings()
    };
    let relay = start_relay(&via_proxy, &vhost.url(), settings);
    rows_reach(&direct, "published_at IS NOT NULL", 500).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !relay.handle.is_finished(),
        "the relay survives the lost database"
    );
    proxy.restore();
    drained(&direct, "published_at IS NULL").await;
    rec.received(5000).await;
    assert_ordered(&rec.sequences().await, 100);
    relay.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn rows_behind_a_retry_do_not_hold_back_other_aggregates(pool: PgPool) {
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    // Aggregate A: its first row waits for a retry an hour away, and 300
    // more rows queue behind it, ahead of 50 rows of other aggregates.
    let a = insert_events(&pool, 1, 301, EventType::BookingCreated).await;
    sqlx::query(
        "UPDATE outbox SET attempts = 1, next_attempt_at = now() + interval '1 hour' WHERE id = $1",
    )
    .bind(a[0].0)
    .execute(&pool)
    .await
    .unwrap();
    let others = insert_events(&pool, 50, 1, EventType::BookingCreated).await;
    let settings = entrip_common::config::DispatcherSettings {
        batch_size: 100,
        ..fast_settings()
    };
    let relay = start_relay(&pool, &vhost.url(), settings);
    eventually("the other aggregates are published", || async {
        count(&pool, "published_at IS NOT NULL").await == 50
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&pool, "published_at IS NOT NULL").await,
        50,
        "A waits behind its retry"
    );
    let got: HashSet<String> = rec
        .snapshot()
        .await
        .iter()
        .map(|r| r.message_id())
        .collect();
    for (id, _, _) in &others {
        assert!(got.contains(&id.to_string()));
    }
    relay.stop().await;
}

/// A nacked publish (here a queue that refuses everything; after a cluster
/// node died, a channel whose quorum queue lost its leader nacked every
/// publish) counts an attempt, and the lane gives up its connection for a
/// new one: the channel is not trusted after a nack.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_nacked_publish_counts_an_attempt_and_replaces_the_connection(pool: PgPool) {
    let vhost = Vhost::new();
    let rec = Recorder::start(&vhost.url(), "test.all", &["#"]).await;
    // A classic queue: a quorum queue's length limit is applied too late
    // to nack the publish that goes over it.
    full_queue(&rec.channel, "payment.failed").await;
    let before_relay: HashSet<String> = vhost.connections().into_iter().collect();
    insert_events(&pool, 1, 1, EventType::BookingCreated).await;
    let relay = start_relay(
        &pool,
        &vhost.url(),
        entrip_common::config::DispatcherSettings {
            lanes: 1,
            ..fast_settings()
        },
    );
    rows_reach(&pool, "published_at IS NOT NULL", 1).await;
    let relay_conns: HashSet<String> = vhost
        .connections()
        .into_iter()
        .filter(|c| !before_relay.contains(c))
        .collect();
    assert_eq!(relay_conns.len(), 1, "one lane, one connection");

    insert_events(&pool, 1, 1, EventType::PaymentFailed).await;
    eventually("the nacked row counted an attempt", || async {
        count(&pool, "attempts > 0 AND last_error LIKE 'nacked%'").await == 1
    })
    .await;
    eventually("the lane replaced its connection", || async {
        let now: HashSet<String> = vhost.connections().into_iter().collect();
        relay_conns.is_disjoint(&now)
    })
    .await;
    assert_eq!(count(&pool, "published_at IS NOT NULL").await, 1);
    relay.stop().await;
}

/// Declares `test.full`, a classic queue of length 0 that rejects publishes,
/// bound to `key`: the broker nacks every event with that topic.
async fn full_queue(channel: &lapin::Channel, key: &str) {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(0));
    args.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    channel
        .queue_declare("test.full".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    channel
        .queue_bind(
            "test.full".into(),
            amqp::EVENTS_EXCHANGE.into(),
            key.into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}
