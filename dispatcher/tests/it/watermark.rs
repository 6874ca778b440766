//! The outbox watermark (docs/relay.md, "The watermark"): it never passes a
//! row that a transaction still in flight inserted below newer, published
//! rows, it moves up once they are published, redrive brings it back down,
//! and no index stops the publish mark from being a heap-only update.

use entrip_dispatcher::outbox::{self, Redrive};
use sqlx::{Connection, PgPool};
use uuid::Uuid;

const INSERT: &str = "INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload)
                      VALUES ($1, 'booking', gen_random_uuid(), 'booking.created', '{}')
                      RETURNING seq";

async fn low(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT low_seq FROM outbox_watermark")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Advances a few times (each move takes two calls, and waits for every
/// older transaction of the whole cluster, other tests' too, to end).
async fn settle(pool: &PgPool) -> i64 {
    for _ in 0..4 {
        outbox::advance_watermark(pool).await.unwrap();
    }
    low(pool).await
}

/// Advances until the watermark is above `seq` (at most 10 s).
async fn settle_past(pool: &PgPool, seq: i64) -> i64 {
    for _ in 0..200 {
        outbox::advance_watermark(pool).await.unwrap();
        let now = low(pool).await;
        if now > seq {
            return now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    low(pool).await
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_row_committed_late_below_published_rows_is_still_claimed(pool: PgPool) {
    // A writer takes the lower seq and stays in flight...
    let mut writer = pool.acquire().await.unwrap().detach();
    let mut late = writer.begin().await.unwrap();
    let late_id = Uuid::now_v7();
    let late_seq: i64 = sqlx::query_scalar(INSERT)
        .bind(late_id)
        .fetch_one(&mut *late)
        .await
        .unwrap();
    // ...while a newer row commits and is published.
    let newer_seq: i64 = sqlx::query_scalar(INSERT)
        .bind(Uuid::now_v7())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(newer_seq > late_seq);
    sqlx::query("UPDATE outbox SET published_at = now() WHERE seq = $1")
        .bind(newer_seq)
        .execute(&pool)
        .await
        .unwrap();
    // The watermark cannot see the late row, and must not pass it.
    let held = settle(&pool).await;
    assert!(
        held <= late_seq,
        "the watermark {held} passed seq {late_seq} of a transaction in flight"
    );
    late.commit().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    let claimed = outbox::claim(&mut tx, 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![late_id],
        "the late row is claimed"
    );
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = $1")
        .bind(late_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Everything published: the watermark moves past both rows.
    let moved = settle_past(&pool, newer_seq).await;
    assert!(moved > newer_seq, "the watermark stayed at {moved}");
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn redrive_brings_the_watermark_down_to_the_dead_row(pool: PgPool) {
    let dead_id = Uuid::now_v7();
    let dead_seq: i64 = sqlx::query_scalar(INSERT)
        .bind(dead_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox SET dead_at = now(), attempts = 5 WHERE id = $1")
        .bind(dead_id)
        .execute(&pool)
        .await
        .unwrap();
    let newer: i64 = sqlx::query_scalar(INSERT)
        .bind(Uuid::now_v7())
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox SET published_at = now() WHERE seq = $1")
        .bind(newer)
        .execute(&pool)
        .await
        .unwrap();
    // A dead row does not hold the watermark.
    assert!(settle_past(&pool, newer).await > newer);
    let stats = outbox::stats(&pool).await.unwrap();
    assert_eq!(
        (stats.undelivered, stats.dead),
        (0, 1),
        "the dead row below the watermark is counted"
    );

    assert_eq!(
        outbox::redrive(&pool, &Redrive::Ids(vec![dead_id]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(low(&pool).await, dead_seq, "redrive lowers the watermark");
    let stats = outbox::stats(&pool).await.unwrap();
    assert_eq!((stats.undelivered, stats.dead), (1, 0));
    let mut tx = pool.begin().await.unwrap();
    let claimed = outbox::claim(&mut tx, 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![dead_id]
    );
    tx.rollback().await.unwrap();
    // And the watermark stays at the undelivered row.
    assert_eq!(settle(&pool).await, dead_seq);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn no_index_names_a_column_the_publish_mark_sets(pool: PgPool) {
    let defs: Vec<String> =
        sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE tablename = 'outbox'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(defs.len() >= 3, "{defs:?}");
    for def in &defs {
        assert!(
            !def.contains("published_at") && !def.contains("last_error"),
            "the publish mark cannot be a HOT update with {def}"
        );
    }
    // And no row's seq changes once drawn, as the watermark needs.
    sqlx::query(INSERT)
        .bind(Uuid::now_v7())
        .execute(&pool)
        .await
        .unwrap();
    let moved = sqlx::query("UPDATE outbox SET seq = seq + 1000")
        .execute(&pool)
        .await;
    assert!(moved.is_err(), "outbox.seq was changed");
}
